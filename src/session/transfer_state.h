// TransferState: the Transfer handle of kvbounce/agent.h.
//
// The agent's control thread settles it exactly once (Settle); application
// threads wait on it, poll it and register callbacks. Cancel forwards to the
// agent through a function the agent installs, so the handle never touches
// agent state itself and stays valid after the agent is gone.
//
// Thread safety: every method is thread-safe; callbacks run with no lock
// held (on the settling thread, or on the registering thread when the
// transfer had already settled).
#ifndef KVBOUNCE_SESSION_TRANSFER_STATE_H_
#define KVBOUNCE_SESSION_TRANSFER_STATE_H_

#include <condition_variable>
#include <functional>
#include <mutex>
#include <optional>
#include <vector>

#include "kvbounce/agent.h"

namespace kvbounce {

class TransferState final : public Transfer {
 public:
  // `cancel` is called (outside the handle's lock) by Cancel(); it must be
  // safe to call at any time, also after the agent shut down.
  TransferState(uint64_t request_id, std::function<void()> cancel);

  uint64_t request_id() const override { return request_id_; }
  Status Wait() override;
  bool WaitFor(std::chrono::nanoseconds timeout) override;
  std::optional<Status> Poll() const override;
  void Cancel() override;
  void OnDone(std::function<void(const Status&)> done) override;
  TransferInfo info() const override;

  // Updates the info while the request runs (control thread).
  void SetInfo(const TransferInfo& info);
  // Settles the transfer: records outcome and final info, wakes waiters and
  // runs the callbacks. Returns false (and changes nothing) if it had already
  // settled — every request settles exactly once.
  bool Settle(const Status& status, const TransferInfo& info);
  bool settled() const;

 private:
  const uint64_t request_id_;
  const std::function<void()> cancel_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::optional<Status> outcome_;
  // Set once the callbacks registered before settling have run: Wait
  // returns only then, so a waiter sees their effects.
  bool callbacks_done_ = false;
  TransferInfo info_;
  std::vector<std::function<void(const Status&)>> callbacks_;
};

}  // namespace kvbounce

#endif  // KVBOUNCE_SESSION_TRANSFER_STATE_H_
