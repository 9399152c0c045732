#include "session/event_loop.h"

#include <algorithm>
#include <string>
#include <system_error>

namespace kvbounce {
namespace {

// The longest single wait: a deadline at the end of time (a saturated one)
// must not overflow the condition variable's arithmetic; waking once an
// hour to look again costs nothing.
constexpr Clock::Duration kMaxWait = std::chrono::hours(1);

}  // namespace

Result<std::unique_ptr<EventLoop>> EventLoop::Create(Clock* clock,
                                                     std::chrono::microseconds poll_before_sleep) {
  if (poll_before_sleep.count() < 0) {
    return InvalidArgumentError(
        "event loop: poll_before_sleep = " + std::to_string(poll_before_sleep.count()) +
        " µs is invalid: must be >= 0");
  }
  std::unique_ptr<EventLoop> loop(new EventLoop(clock, poll_before_sleep));
  EventLoop* raw = loop.get();
  loop->clock_listener_ = clock->AddJumpListener([raw] { raw->OnClockJump(); });
  try {
    loop->thread_ = std::thread([raw] { raw->Run(); });
  } catch (const std::system_error& e) {
    {
      // A jump listener must not wait for a loop that never runs.
      std::lock_guard<std::mutex> lock(loop->mu_);
      loop->stopping_ = loop->stopped_ = true;
    }
    loop->caught_up_.notify_all();
    return ResourceExhaustedError(std::string("cannot start the control thread: ") + e.what());
  }
  return loop;
}

EventLoop::~EventLoop() { Stop(); }

bool EventLoop::Post(Task task) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return false;
    tasks_.push_back(std::move(task));
    changes_.fetch_add(1, std::memory_order_release);
  }
  cv_.notify_one();
  return true;
}

EventLoop::TimerId EventLoop::PostAt(TimePoint deadline, Task task) {
  TimerId id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return 0;
    id = next_timer_++;
    timers_.emplace(std::make_pair(deadline, id), std::move(task));
    timer_deadlines_.emplace(id, deadline);
    changes_.fetch_add(1, std::memory_order_release);
  }
  cv_.notify_one();
  return id;
}

void EventLoop::CancelTimer(TimerId id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = timer_deadlines_.find(id);
  if (it == timer_deadlines_.end()) return;
  timers_.erase({it->second, id});
  timer_deadlines_.erase(it);
}

void EventLoop::OnClockJump() {
  std::unique_lock<std::mutex> lock(mu_);
  if (stopped_ || InLoop()) return;  // nobody to wait for, or the loop is us
  const uint64_t jump = ++jumps_;
  changes_.fetch_add(1, std::memory_order_release);
  cv_.notify_one();
  caught_up_.wait(lock, [&] { return jumps_caught_up_ >= jump || stopped_; });
}

void EventLoop::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    changes_.fetch_add(1, std::memory_order_release);
  }
  cv_.notify_one();
  std::lock_guard<std::mutex> join_lock(join_mu_);
  if (thread_.joinable()) thread_.join();
  // A jump listener still waiting was released when the thread left Run;
  // once this returns no other can start.
  clock_->RemoveJumpListener(clock_listener_);
  clock_listener_ = 0;
}

void EventLoop::PollForChange(uint64_t seen, std::chrono::microseconds how_long) const {
  const auto until = std::chrono::steady_clock::now() + how_long;
  while (changes_.load(std::memory_order_acquire) == seen &&
         std::chrono::steady_clock::now() < until) {
    std::this_thread::yield();
  }
}

void EventLoop::Run() {
  std::unique_lock<std::mutex> lock(mu_);
  bool polled = false;  // this idle spell's poll is over
  while (true) {
    if (!tasks_.empty()) {
      Task task = std::move(tasks_.front());
      tasks_.pop_front();
      lock.unlock();
      task();
      lock.lock();
      polled = false;
      continue;
    }
    if (stopping_) break;  // every posted task ran; pending timers are dropped
    // Read under the lock: a jump counted in jumps_ set the time before it
    // took the lock, so this read sees it.
    const TimePoint now = clock_->Now();
    if (!timers_.empty() && timers_.begin()->first.first <= now) {
      auto first = timers_.begin();
      Task task = std::move(first->second);
      timer_deadlines_.erase(first->first.second);
      timers_.erase(first);
      lock.unlock();
      task();
      lock.lock();
      polled = false;
      continue;
    }
    // Idle: caught up with every jump so far.
    if (jumps_caught_up_ != jumps_) {
      jumps_caught_up_ = jumps_;
      caught_up_.notify_all();
    }
    if (!polled && poll_before_sleep_.count() > 0) {
      // Poll, then look again from the top (a change may have come in while
      // the lock was free; only then does the loop wait for a notification).
      polled = true;
      std::chrono::microseconds how_long = poll_before_sleep_;
      if (!timers_.empty()) {
        how_long = std::min(how_long, std::chrono::duration_cast<std::chrono::microseconds>(
                                          timers_.begin()->first.first - now));
      }
      if (how_long.count() > 0) {
        const uint64_t seen = changes_.load(std::memory_order_relaxed);
        lock.unlock();
        PollForChange(seen, how_long);
        lock.lock();
      }
      continue;
    }
    if (!timers_.empty()) {
      // The wait is in real time whatever the clock: on the steady clock it
      // ends at the deadline; on a manual one it ends early (harmlessly) or
      // when a jump wakes the loop.
      const Clock::Duration left = timers_.begin()->first.first - now;
      cv_.wait_for(lock, std::min(left, kMaxWait));
    } else {
      cv_.wait(lock);
    }
  }
  timers_.clear();
  timer_deadlines_.clear();
  stopped_ = true;
  caught_up_.notify_all();
}

}  // namespace kvbounce
