#include "common/clock.h"

#include <utility>
#include <vector>

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
  std::lock_guard<std::mutex> lock(mu_);
  return now_;
}

Clock::ListenerId ManualClock::AddJumpListener(std::function<void()> on_jump) {
  auto listener = std::make_shared<Listener>();
  listener->on_jump = std::move(on_jump);
  std::lock_guard<std::mutex> lock(mu_);
  const ListenerId id = next_id_++;
  listeners_.emplace(id, std::move(listener));
  return id;
}

void ManualClock::RemoveJumpListener(ListenerId id) {
  std::unique_lock<std::mutex> lock(mu_);
  auto it = listeners_.find(id);
  if (it == listeners_.end()) return;
  std::shared_ptr<Listener> listener = std::move(it->second);
  listeners_.erase(it);
  calls_done_.wait(lock, [&] { return listener->calls == 0; });
}

void ManualClock::Advance(Duration by) {
  std::vector<std::shared_ptr<Listener>> to_call;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (by > Duration::zero()) now_ += by;
    for (auto& [id, listener] : listeners_) {
      ++listener->calls;
      to_call.push_back(listener);
    }
  }
  // Unlocked: a listener may wait for a thread that reads the time or
  // advances it itself.
  for (const std::shared_ptr<Listener>& listener : to_call) {
    listener->on_jump();
    {
      std::lock_guard<std::mutex> lock(mu_);
      --listener->calls;
    }
    calls_done_.notify_all();
  }
}

}  // namespace kvbounce
