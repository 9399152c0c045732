// ReservationQueue: the requests waiting for an arena slot, oldest first.
//
// The control thread never blocks on an arena: a request that finds no hole
// joins this queue, and every release retries the queue in FIFO order,
// stopping at the first request that still does not fit (so a large request
// is not starved by smaller ones behind it). A retry may itself release a
// slot (a request that settles at once); that asks for another round instead
// of recursing.
//
// Thread safety: none; used on the control thread only.
#ifndef KVBOUNCE_SESSION_RESERVATION_QUEUE_H_
#define KVBOUNCE_SESSION_RESERVATION_QUEUE_H_

#include <algorithm>
#include <deque>
#include <functional>

namespace kvbounce {

template <typename Key>
class ReservationQueue {
 public:
  void Add(const Key& key) { waiting_.push_back(key); }
  void Remove(const Key& key) {
    waiting_.erase(std::remove(waiting_.begin(), waiting_.end(), key), waiting_.end());
  }
  void Clear() { waiting_.clear(); }
  // The oldest waiter, or nullptr.
  const Key* Front() const { return waiting_.empty() ? nullptr : &waiting_.front(); }

  // Offers the arena to the waiters in order. `try_reserve(key)` attempts
  // the reservation and returns true while `key` must keep waiting; a key
  // that no longer waits (served, settled, gone) returns false.
  void Retry(const std::function<bool(const Key&)>& try_reserve) {
    if (retrying_) {
      again_ = true;
      return;
    }
    retrying_ = true;
    do {
      again_ = false;
      while (!waiting_.empty()) {
        const Key key = waiting_.front();
        if (try_reserve(key)) break;
        Remove(key);
      }
    } while (again_);
    retrying_ = false;
  }

 private:
  std::deque<Key> waiting_;
  bool retrying_ = false;
  bool again_ = false;
};

}  // namespace kvbounce

#endif  // KVBOUNCE_SESSION_RESERVATION_QUEUE_H_
