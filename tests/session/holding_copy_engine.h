// A copy-engine decorator for tests: while holding, every accepted batch is
// parked instead of running, as if its copy were in progress and could not
// be stopped (its stop token is not honoured); Release() runs the parked
// batches on the inner engine, without their stop tokens, so they land.
// Plugged into an agent through AgentHooks::wrap_copy_engine; the test keeps
// the shared Gate to hold, observe and release.
//
// Thread safety: every method is thread-safe.
#ifndef KVBOUNCE_TESTS_SESSION_HOLDING_COPY_ENGINE_H_
#define KVBOUNCE_TESTS_SESSION_HOLDING_COPY_ENGINE_H_

#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string_view>
#include <utility>
#include <vector>

#include "copy/copy_engine.h"
#include "session/agent_internal.h"

namespace kvbounce::testing_util {

class HoldingCopyEngine final : public CopyEngine {
 public:
  // Shared between the test and the engines it wraps.
  class Gate {
   public:
    void Hold() {
      std::lock_guard<std::mutex> lock(mu_);
      holding_ = true;
    }
    // Stops holding and runs every parked batch on its engine.
    void Release() {
      std::vector<Parked> parked;
      {
        std::lock_guard<std::mutex> lock(mu_);
        holding_ = false;
        parked.swap(parked_);
      }
      for (Parked& p : parked) p.run();
    }
    // Waits until at least `n` batches were parked since the gate was made.
    bool WaitForParked(size_t n, std::chrono::milliseconds timeout) {
      std::unique_lock<std::mutex> lock(mu_);
      return cv_.wait_for(lock, timeout, [&] { return parked_total_ >= n; });
    }
    size_t parked_total() const {
      std::lock_guard<std::mutex> lock(mu_);
      return parked_total_;
    }
    // The hook that wraps each agent's engine.
    AgentHooks Hooks() {
      AgentHooks hooks;
      hooks.wrap_copy_engine = [this](std::unique_ptr<CopyEngine> inner) {
        return std::unique_ptr<CopyEngine>(new HoldingCopyEngine(std::move(inner), this));
      };
      return hooks;
    }

   private:
    friend class HoldingCopyEngine;
    struct Parked {
      std::function<void()> run;
    };
    // Parks `run` and returns true while holding; false otherwise.
    bool MaybePark(std::function<void()> run) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (!holding_) return false;
        parked_.push_back(Parked{std::move(run)});
        ++parked_total_;
      }
      cv_.notify_all();
      return true;
    }

    mutable std::mutex mu_;
    std::condition_variable cv_;
    bool holding_ = false;
    size_t parked_total_ = 0;
    std::vector<Parked> parked_;
  };

  // The gate must outlive the engine.
  HoldingCopyEngine(std::unique_ptr<CopyEngine> inner, Gate* gate)
      : inner_(std::move(inner)), gate_(gate) {}

  std::string_view Name() const override { return "holding"; }
  CopyEngineCaps Caps() const override { return inner_->Caps(); }

 protected:
  Status SubmitValidated(const CopyBatch& batch, uint64_t /*total_bytes*/, CopyDone done,
                         std::stop_token stop) override {
    // The inner engine is shared with the parked closure; a batch parked
    // when this engine is destroyed runs then (see the destructor).
    std::shared_ptr<CopyEngine> inner = inner_;
    auto parked_done = std::make_shared<CopyDone>(done);
    if (gate_->MaybePark([inner, batch, parked_done] {
          Status s = inner->Submit(batch, *parked_done);
          if (!s.ok()) (*parked_done)(s);
        })) {
      return Status::Ok();
    }
    return inner_->Submit(batch, std::move(done), std::move(stop));
  }

 private:
  std::shared_ptr<CopyEngine> inner_;
  Gate* gate_;
};

}  // namespace kvbounce::testing_util

#endif  // KVBOUNCE_TESTS_SESSION_HOLDING_COPY_ENGINE_H_
