// EventLoop: the agent's control thread (docs/sessions.md).
//
// One thread runs posted tasks in order and fires timers at their deadlines
// on the loop's Clock (common/clock.h): the steady clock in production, a
// ManualClock in tests. Every state change of an agent's requests runs on
// it, so the state machines need no lock of their own; transports, copy
// engines and the application only post tasks.
//
// Order: queued tasks run before due timers; due timers fire in deadline
// order, timers of one deadline in the order they were posted.
//
// Manual clocks: the loop listens to its clock's jumps. ManualClock::Advance
// returns only once the loop has caught up with the new time: it fired every
// timer due by then and ran every task queued meanwhile (those the timers
// posted included), up to the moment it found nothing left to do. A test can
// thus advance to just before a deadline and check that nothing happened,
// then advance past it and check that it did, without sleeping. (When
// Advance is called on the loop thread itself, from a task, it cannot wait
// for the loop: the timers then fire once the task returned.)
//
// Thread safety: Post, PostAt, CancelTimer and Stop may be called from any
// thread, including from a task. Tasks run one at a time on the loop thread,
// with no loop lock held — or, through TryRunHere, on the thread that asks,
// while the loop has nothing else to run; never two at once (the loop
// thread holds its execution lock from the moment it picks work up until
// it goes idle).
//
// Running here: an agent's API call is a task whose caller waits for its
// result. Posting it costs two thread hand-offs (the loop's wake-up, then
// the caller's), 20-50 µs each on an idle core; when the loop is idle
// (nothing queued, its thread spinning or asleep) TryRunHere runs the task
// on the caller's thread instead, in order with everything posted before
// it (docs/sessions.md).
//
// Polling: a loop created with a poll_before_sleep > 0 that runs out of work
// keeps looking for new work that long (on the steady clock, yielding the
// core to any other runnable thread) before it sleeps on its condition
// variable, so that a task posted meanwhile runs without a wake-up
// (Config::poll_before_sleep_us). It polls once per idle spell: after a
// poll that found nothing it sleeps until woken. Whatever ends a poll early
// (a task posted, a timer armed — also by a task run on a caller's thread,
// see TryRunHere — the source's work, a clock jump) starts a new spell. A
// timer due sooner cuts the poll short.
//
// A progress source (kvbounce/transport.h, ProgressSource): a loop created
// with one drives it, so that the transport's work runs on the loop thread
// between tasks instead of on a thread of its own. The loop polls the
// source when it runs out of tasks and due timers, after every
// kTasksPerSourcePoll tasks while it has many, and on every turn of its
// poll_before_sleep spin; it sleeps in ppoll(2) on the source's fd and an
// eventfd of its own (which Post, timers, clock jumps and Stop write while
// the loop sleeps) instead of on the condition variable. Stop destroys the
// source once the thread has left (detaching it); until then the loop
// drives it, so a transport's Shutdown must run before the loop's Stop.
//
// Lifetime: Stop() runs every task already posted, drops timers that have not
// fired, stops listening to the clock and joins the thread; tasks posted
// afterwards are refused (Post returns false). The destructor calls Stop().
// The clock must outlive the loop.
#ifndef KVBOUNCE_SESSION_EVENT_LOOP_H_
#define KVBOUNCE_SESSION_EVENT_LOOP_H_

#include <atomic>
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

#include "common/clock.h"
#include "common/unique_fd.h"
#include "kvbounce/status.h"
#include "kvbounce/transport.h"

namespace kvbounce {

class EventLoop {
 public:
  using TimePoint = Clock::TimePoint;
  using Task = std::function<void()>;
  // 0 is never a valid timer id.
  using TimerId = uint64_t;

  // Starts the loop thread, with timers on `clock` (borrowed; it must
  // outlive the loop), polling for `poll_before_sleep` when it runs out of
  // work (see the file comment; 0: it sleeps at once). Errors:
  // kResourceExhausted when the thread cannot be created (std::thread's
  // exception does not escape).
  // With a `source`, the loop drives it (see the file comment); errors then
  // also kUnavailable when the loop's eventfd cannot be made.
  static Result<std::unique_ptr<EventLoop>> Create(
      Clock* clock = Clock::Steady(),
      std::chrono::microseconds poll_before_sleep = std::chrono::microseconds(0),
      std::unique_ptr<ProgressSource> source = nullptr);
  // Tasks run between two polls of a source while tasks keep coming.
  static constexpr int kTasksPerSourcePoll = 16;
  ~EventLoop();
  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  // Queues `task`; false (and the task is dropped) once Stop has begun.
  bool Post(Task task);

  // Runs `task` on the loop once the clock reaches `deadline` (at once if it
  // has); returns 0 once Stop has begun.
  TimerId PostAt(TimePoint deadline, Task task);

  // Cancels a timer that has not fired; a no-op otherwise.
  void CancelTimer(TimerId id);

  // Runs `task` on the calling thread, as a task of this loop, when the
  // loop is idle: no task queued, no other task running, not stopping.
  // Returns whether it ran; false leaves the caller to Post it. Inside the
  // task InLoop() is true. REQUIRES: not called from a task of this loop
  // (the caller runs such work directly).
  bool TryRunHere(const Task& task);

  // True on the loop thread, and inside a task TryRunHere runs.
  bool InLoop() const { return running_ == this; }

  Clock& clock() const { return *clock_; }

  // See the file comment. Idempotent. REQUIRES: not called on the loop thread.
  void Stop();

 private:
  EventLoop(Clock* clock, std::chrono::microseconds poll_before_sleep)
      : clock_(clock), poll_before_sleep_(poll_before_sleep) {}
  void Run();
  // Wakes the loop after a change made under mu_: `sleeping` is what
  // TakeSleeperLocked returned under that lock.
  void Wake(bool sleeping);
  // Under mu_: whether the loop sleeps in ppoll (and must be written to);
  // clears the flag so that one write per sleep suffices.
  bool TakeSleeperLocked();
  // Sleeps on the source's fd and the eventfd for at most `limit` (the
  // lock released meanwhile), unless changes_ moved past `seen` (what the
  // loop saw when it found itself idle) or the source has work.
  void SleepWithSource(std::unique_lock<std::mutex>& lock, std::chrono::microseconds limit,
                       uint64_t seen);
  // The clock jumped: wait until the loop caught up (see the file comment).
  void OnClockJump();
  // Polls, without the lock, until `changes_` moves past `seen`, the source
  // did something or `how_long` passed; true unless the time ran out.
  bool PollForChange(uint64_t seen, std::chrono::microseconds how_long) const;

  Clock* const clock_;
  const std::chrono::microseconds poll_before_sleep_;
  std::unique_ptr<ProgressSource> source_;  // loop thread only; reset by Stop
  UniqueFd wake_fd_;                        // with a source
  bool sleeping_ = false;                   // guarded by mu_: in ppoll
  Clock::ListenerId clock_listener_ = 0;  // written before the thread starts

  // Held by whoever runs this loop's work: the loop thread from the moment
  // it picks work up until it goes idle, or TryRunHere's caller. Taken
  // before mu_ when both are held.
  std::mutex exec_mu_;
  // The loop whose task this thread is running, if any.
  static thread_local const EventLoop* running_;
  mutable std::mutex mu_;
  std::condition_variable cv_;         // wakes the loop
  std::condition_variable caught_up_;  // wakes OnClockJump
  std::deque<Task> tasks_;
  // Bumped (under mu_) by whatever would wake the loop: a task, a timer, a
  // clock jump, Stop. Read without the lock while polling.
  std::atomic<uint64_t> changes_{0};
  std::map<std::pair<TimePoint, TimerId>, Task> timers_;
  std::unordered_map<TimerId, TimePoint> timer_deadlines_;
  TimerId next_timer_ = 1;
  // Clock jumps seen by OnClockJump, and those the loop had caught up with
  // when it last went idle.
  uint64_t jumps_ = 0;
  uint64_t jumps_caught_up_ = 0;
  bool stopping_ = false;
  bool stopped_ = false;  // the thread has left Run
  std::mutex join_mu_;    // one Stop joins, concurrent ones wait for it
  std::thread thread_;
};

}  // namespace kvbounce

#endif  // KVBOUNCE_SESSION_EVENT_LOOP_H_
