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

Result<std::unique_ptr<EventLoop>> EventLoop::Create(Clock* clock) {
  std::unique_ptr<EventLoop> loop(new EventLoop(clock));
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
  cv_.notify_one();
  caught_up_.wait(lock, [&] { return jumps_caught_up_ >= jump || stopped_; });
}

void EventLoop::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_one();
  std::lock_guard<std::mutex> join_lock(join_mu_);
  if (thread_.joinable()) thread_.join();
  // A jump listener still waiting was released when the thread left Run;
  // once this returns no other can start.
  clock_->RemoveJumpListener(clock_listener_);
  clock_listener_ = 0;
}

void EventLoop::Run() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    if (!tasks_.empty()) {
      Task task = std::move(tasks_.front());
      tasks_.pop_front();
      lock.unlock();
      task();
      lock.lock();
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
      continue;
    }
    // Idle: caught up with every jump so far.
    if (jumps_caught_up_ != jumps_) {
      jumps_caught_up_ = jumps_;
      caught_up_.notify_all();
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
