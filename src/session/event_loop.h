// EventLoop: the agent's control thread (DESIGN §10 "Threads").
//
// One thread runs posted tasks in order and fires timers at their steady-clock
// deadlines. Every state change of an agent's requests runs on it, so the
// state machines need no lock of their own; transports, copy engines and the
// application only post tasks.
//
// Thread safety: Post, PostAt, CancelTimer and Stop may be called from any
// thread, including from a task. Tasks run one at a time on the loop thread,
// with no loop lock held.
//
// Lifetime: Stop() runs every task already posted, drops timers that have not
// fired, and joins the thread; tasks posted afterwards are refused (Post
// returns false). The destructor calls Stop().
#ifndef KVBOUNCE_SESSION_EVENT_LOOP_H_
#define KVBOUNCE_SESSION_EVENT_LOOP_H_

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>

#include "kvbounce/status.h"

namespace kvbounce {

class EventLoop {
 public:
  using Clock = std::chrono::steady_clock;
  using Task = std::function<void()>;
  // 0 is never a valid timer id.
  using TimerId = uint64_t;

  // Starts the loop thread. Errors: kResourceExhausted when the thread
  // cannot be created (std::thread's exception does not escape).
  static Result<std::unique_ptr<EventLoop>> Create();
  ~EventLoop();
  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  // Queues `task`; false (and the task is dropped) once Stop has begun.
  bool Post(Task task);

  // Runs `task` on the loop at `deadline` (at once if it has passed);
  // returns 0 once Stop has begun.
  TimerId PostAt(Clock::time_point deadline, Task task);

  // Cancels a timer that has not fired; a no-op otherwise.
  void CancelTimer(TimerId id);

  // True on the loop thread.
  bool InLoop() const { return std::this_thread::get_id() == thread_.get_id(); }

  // See the file comment. Idempotent. REQUIRES: not called on the loop thread.
  void Stop();

 private:
  EventLoop() = default;
  void Run();

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Task> tasks_;
  std::map<std::pair<Clock::time_point, TimerId>, Task> timers_;
  std::unordered_map<TimerId, Clock::time_point> timer_deadlines_;
  TimerId next_timer_ = 1;
  bool stopping_ = false;
  std::mutex join_mu_;  // one Stop joins, concurrent ones wait for it
  std::thread thread_;
};

}  // namespace kvbounce

#endif  // KVBOUNCE_SESSION_EVENT_LOOP_H_
