#include "common/clock.h"

#include <utility>

namespace kvbounce {
namespace {

class SteadyClock final : public Clock {
 public:
  TimePoint Now() const override { return std::chrono::steady_clock::now(); }
  // Steady time never jumps: nobody is ever called.
  ListenerId AddJumpListener(std::function<void()> /*on_jump*/) override { return 0; }
  void RemoveJumpListener(ListenerId /*id*/) override {}
};

}  // namespace

Clock* Clock::Steady() {
  static SteadyClock* const clock = new SteadyClock();  // never destroyed: outlives every user
  return clock;
}

Clock::TimePoint ManualClock::Now() const {
  std::lock_guard<std::mutex> lock(time_mu_);
  return now_;
}

Clock::ListenerId ManualClock::AddJumpListener(std::function<void()> on_jump) {
  std::lock_guard<std::mutex> lock(listeners_mu_);
  const ListenerId id = next_id_++;
  listeners_.emplace(id, std::move(on_jump));
  return id;
}

void ManualClock::RemoveJumpListener(ListenerId id) {
  std::lock_guard<std::mutex> lock(listeners_mu_);
  listeners_.erase(id);
}

void ManualClock::Advance(Duration by) {
  std::lock_guard<std::mutex> lock(listeners_mu_);
  if (by > Duration::zero()) {
    std::lock_guard<std::mutex> time_lock(time_mu_);
    now_ += by;
  }
  for (auto& [id, on_jump] : listeners_) on_jump();
}

}  // namespace kvbounce
