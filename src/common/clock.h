// Clock: the time kvbounce's timers run on, injectable so that a test can own
// it (LevelDB's Env lets a test own time the same way).
//
// Production uses Clock::Steady(), std::chrono::steady_clock. A test hands an
// agent (session/agent_internal.h, AgentHooks::clock) or an EventLoop a
// ManualClock instead: time then stands still until the test calls
// Advance(), and a test proves "the deadline did not fire before 100 ms" by
// advancing to 99 ms and looking, not by sleeping.
//
// Time points are steady_clock time points whatever the clock, so deadlines
// keep one type everywhere; only their source changes.
//
// Jumps: a clock whose time can change other than by passing (a manual one)
// tells its listeners after every change, so that a thread waiting for a
// deadline on it computes the wait anew. The steady clock never jumps: it
// accepts listeners and never calls them.
//
// Thread safety: every method is thread-safe.
#ifndef KVBOUNCE_COMMON_CLOCK_H_
#define KVBOUNCE_COMMON_CLOCK_H_

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>

namespace kvbounce {

class Clock {
 public:
  using TimePoint = std::chrono::steady_clock::time_point;
  using Duration = std::chrono::steady_clock::duration;
  // 0 is never a valid listener id.
  using ListenerId = uint64_t;

  Clock() = default;
  Clock(const Clock&) = delete;
  Clock& operator=(const Clock&) = delete;
  virtual ~Clock() = default;

  virtual TimePoint Now() const = 0;

  // Calls `on_jump` after every jump of this clock's time (see the file
  // comment), on the thread that moved it, with no clock lock held, until
  // RemoveJumpListener(id) returned. It may block (an EventLoop's waits for
  // the loop to catch up), but must not remove itself.
  virtual ListenerId AddJumpListener(std::function<void()> on_jump) = 0;
  // Returns once the calls of that listener in progress have returned; no
  // call follows. Unknown ids are ignored.
  virtual void RemoveJumpListener(ListenerId id) = 0;

  // The process's steady clock; never destroyed.
  static Clock* Steady();
};

// A clock that moves only when told to (tests).
class ManualClock final : public Clock {
 public:
  // Starts at `start` (by default the steady clock's now, so that its time
  // points look like those of production).
  explicit ManualClock(TimePoint start = std::chrono::steady_clock::now()) : now_(start) {}

  TimePoint Now() const override;
  ListenerId AddJumpListener(std::function<void()> on_jump) override;
  void RemoveJumpListener(ListenerId id) override;

  // Moves the time forward by `by` (a negative or zero step changes
  // nothing), then calls every jump listener in turn and returns once they
  // returned. An EventLoop on this clock listens: Advance returns only after
  // that loop fired every timer due at the new time and ran the tasks queued
  // before it went idle (see session/event_loop.h). Calls may overlap (also
  // one from a loop's task: that loop does not wait for itself).
  void Advance(Duration by);

 private:
  struct Listener {
    std::function<void()> on_jump;
    int calls = 0;  // in progress; guarded by mu_
  };

  mutable std::mutex mu_;
  std::condition_variable calls_done_;  // a listener call returned
  TimePoint now_;                       // guarded by mu_
  std::map<ListenerId, std::shared_ptr<Listener>> listeners_;  // guarded by mu_
  ListenerId next_id_ = 1;                                     // guarded by mu_
};

}  // namespace kvbounce

#endif  // KVBOUNCE_COMMON_CLOCK_H_
