// Polling a counter before sleeping (Config::poll_before_sleep_us).
//
// A thread that ran out of work keeps looking for more for a while before
// it sleeps on its condition variable or fd: work handed to it meanwhile
// then costs no wake-up. What it looks at is a counter its producers bump
// (under their lock, before they notify) whenever they hand it work.
#ifndef KVBOUNCE_COMMON_POLL_H_
#define KVBOUNCE_COMMON_POLL_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>

namespace kvbounce {

// Spins, yielding the core between looks, until `counter` differs from
// `seen` or `how_long` passed on the steady clock; true when it changed.
// Returns at once for a `how_long` <= 0.
inline bool PollForCounter(const std::atomic<uint64_t>& counter, uint64_t seen,
                           std::chrono::microseconds how_long) {
  const auto until = std::chrono::steady_clock::now() + how_long;
  while (counter.load(std::memory_order_acquire) == seen) {
    if (std::chrono::steady_clock::now() >= until) return false;
    std::this_thread::yield();
  }
  return true;
}

}  // namespace kvbounce

#endif  // KVBOUNCE_COMMON_POLL_H_
