#include "session/event_loop.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <string>
#include <system_error>
#include <utility>

#include "kvbounce/logging.h"

namespace kvbounce {
namespace {

// The longest single wait: a deadline at the end of time (a saturated one)
// must not overflow the condition variable's arithmetic; waking once an
// hour to look again costs nothing.
constexpr Clock::Duration kMaxWait = std::chrono::hours(1);

}  // namespace

Result<std::unique_ptr<EventLoop>> EventLoop::Create(Clock* clock,
                                                     std::chrono::microseconds poll_before_sleep,
                                                     std::unique_ptr<ProgressSource> source) {
  if (poll_before_sleep.count() < 0) {
    return InvalidArgumentError(
        "event loop: poll_before_sleep = " + std::to_string(poll_before_sleep.count()) +
        " µs is invalid: must be >= 0");
  }
  std::unique_ptr<EventLoop> loop(new EventLoop(clock, poll_before_sleep));
  if (source != nullptr) {
    loop->wake_fd_ = UniqueFd(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
    if (loop->wake_fd_.get() < 0) {
      return UnavailableError(std::string("event loop: eventfd: ") + std::strerror(errno));
    }
    loop->source_ = std::move(source);
  }
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

thread_local const EventLoop* EventLoop::running_ = nullptr;

EventLoop::~EventLoop() { Stop(); }

bool EventLoop::TryRunHere(const Task& task) {
  std::unique_lock<std::mutex> exec(exec_mu_, std::try_to_lock);
  if (!exec.owns_lock()) return false;  // the loop (or another caller) is running work
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ || !tasks_.empty()) return false;  // run it after those, on the loop
  }
  const EventLoop* outer = std::exchange(running_, this);
  task();
  running_ = outer;
  return true;
}

bool EventLoop::TakeSleeperLocked() { return std::exchange(sleeping_, false); }

void EventLoop::Wake(bool sleeping) {
  if (wake_fd_.get() < 0) {  // no source: the loop sleeps on cv_
    cv_.notify_one();
    return;
  }
  if (sleeping) {
    const uint64_t one = 1;
    [[maybe_unused]] ssize_t n = write(wake_fd_.get(), &one, sizeof(one));
  }
}

bool EventLoop::Post(Task task) {
  bool sleeping;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return false;
    tasks_.push_back(std::move(task));
    changes_.fetch_add(1, std::memory_order_release);
    sleeping = TakeSleeperLocked();
  }
  Wake(sleeping);
  return true;
}

EventLoop::TimerId EventLoop::PostAt(TimePoint deadline, Task task) {
  TimerId id;
  bool sleeping;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return 0;
    id = next_timer_++;
    timers_.emplace(std::make_pair(deadline, id), std::move(task));
    timer_deadlines_.emplace(id, deadline);
    changes_.fetch_add(1, std::memory_order_release);
    sleeping = TakeSleeperLocked();
  }
  Wake(sleeping);
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
  Wake(TakeSleeperLocked());
  caught_up_.wait(lock, [&] { return jumps_caught_up_ >= jump || stopped_; });
}

void EventLoop::Stop() {
  bool sleeping;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    changes_.fetch_add(1, std::memory_order_release);
    sleeping = TakeSleeperLocked();
  }
  Wake(sleeping);
  std::lock_guard<std::mutex> join_lock(join_mu_);
  if (thread_.joinable()) thread_.join();
  // The thread has left: the source is detached (see the file comment).
  source_.reset();
  // A jump listener still waiting was released when the thread left Run;
  // once this returns no other can start.
  clock_->RemoveJumpListener(clock_listener_);
  clock_listener_ = 0;
}

bool EventLoop::PollForChange(uint64_t seen, std::chrono::microseconds how_long) const {
  const auto until = std::chrono::steady_clock::now() + how_long;
  while (changes_.load(std::memory_order_acquire) == seen &&
         std::chrono::steady_clock::now() < until) {
    // The source's work counts as a change: its callbacks post tasks, or it
    // did something the next turn may continue.
    if (source_ != nullptr && source_->Poll()) return true;
    std::this_thread::yield();
  }
  return changes_.load(std::memory_order_acquire) != seen;
}

void EventLoop::SleepWithSource(std::unique_lock<std::mutex>& lock, std::chrono::microseconds limit,
                                uint64_t seen) {
  // Armed without the lock (the source may post), then a last look under
  // it: whatever changed meanwhile (a task, a timer due sooner than `limit`,
  // a clock jump, Stop: each bumps changes_ under the lock) sends the loop
  // round again; from here on, a change sees sleeping_ and writes the fd.
  lock.unlock();
  std::chrono::microseconds cap = limit;
  const bool may_sleep = source_->PrepareToSleep(&cap);
  lock.lock();
  if (!may_sleep || changes_.load(std::memory_order_relaxed) != seen) return;
  sleeping_ = true;
  lock.unlock();
  std::array<pollfd, 2> fds{};
  fds[0].fd = wake_fd_.get();
  fds[0].events = POLLIN;
  fds[1].fd = source_->fd();
  fds[1].events = POLLIN;
  cap = std::max(cap, std::chrono::microseconds(0));
  timespec timeout{};
  timeout.tv_sec = static_cast<time_t>(cap.count() / 1000000);
  timeout.tv_nsec = static_cast<long>((cap.count() % 1000000) * 1000);
  if (ppoll(fds.data(), fds.size(), &timeout, nullptr) < 0 && errno != EINTR) {
    Log(LogLevel::kError, std::string("event loop: ppoll: ") + std::strerror(errno));
  }
  if ((fds[0].revents & POLLIN) != 0) {
    uint64_t drained = 0;
    [[maybe_unused]] ssize_t n = read(wake_fd_.get(), &drained, sizeof(drained));
  }
  lock.lock();
  sleeping_ = false;
}

void EventLoop::Run() {
  running_ = this;
  std::unique_lock<std::mutex> exec(exec_mu_);
  std::unique_lock<std::mutex> lock(mu_);
  // Idle spells (spinning, sleeping) release the execution lock so that a
  // caller may run a task here (TryRunHere); it is taken back, before mu_,
  // once they end.
  const auto resume = [&] {
    lock.unlock();
    exec.lock();
    lock.lock();
  };
  bool polled = false;     // this idle spell's poll is over
  int tasks_unpolled = 0;  // tasks run since the source's last poll
  // Polls the source without the lock; true when it did anything.
  const auto poll_source = [&] {
    tasks_unpolled = 0;
    lock.unlock();
    const bool did = source_->Poll();
    lock.lock();
    return did;
  };
  while (true) {
    if (source_ != nullptr && tasks_unpolled >= kTasksPerSourcePoll) poll_source();
    if (!tasks_.empty()) {
      Task task = std::move(tasks_.front());
      tasks_.pop_front();
      lock.unlock();
      task();
      lock.lock();
      polled = false;
      ++tasks_unpolled;
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
      ++tasks_unpolled;
      continue;
    }
    // Out of tasks and due timers: the source's turn. A change from here on
    // (a task, a timer, a jump, Stop) keeps the loop from sleeping on what
    // it saw (SleepWithSource).
    const uint64_t idle_seen = changes_.load(std::memory_order_relaxed);
    if (source_ != nullptr && poll_source()) {
      polled = false;
      continue;
    }
    if (!tasks_.empty()) continue;  // the source posted some
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
        exec.unlock();
        // Whatever ended the poll early is activity, as a task is: the
        // next idle spell polls again. Not only a task or the source's
        // work: a timer armed (by a caller's task run here, say — an API
        // call arms its deadline so) leaves no task, and a loop that slept
        // on it would pay a wake-up for the frame that follows.
        if (PollForChange(seen, how_long)) polled = false;
        exec.lock();
        lock.lock();
      }
      continue;
    }
    // The wait is in real time whatever the clock: on the steady clock it
    // ends at the deadline; on a manual one it ends early (harmlessly) or
    // when a jump wakes the loop.
    const Clock::Duration left =
        timers_.empty() ? kMaxWait
                        : std::min<Clock::Duration>(timers_.begin()->first.first - now, kMaxWait);
    exec.unlock();
    if (source_ != nullptr) {
      // Rounded up: a timer is never fired early by a short sleep.
      SleepWithSource(lock, std::chrono::ceil<std::chrono::microseconds>(left), idle_seen);
    } else if (!timers_.empty()) {
      cv_.wait_for(lock, left);
    } else {
      cv_.wait(lock);
    }
    resume();
  }
  timers_.clear();
  timer_deadlines_.clear();
  stopped_ = true;
  caught_up_.notify_all();
}

}  // namespace kvbounce
