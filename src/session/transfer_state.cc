#include "session/transfer_state.h"

#include <utility>

namespace kvbounce {

TransferState::TransferState(uint64_t request_id, std::function<void()> cancel)
    : request_id_(request_id), cancel_(std::move(cancel)) {
  info_.request_id = request_id;
}

Status TransferState::Wait() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return callbacks_done_; });
  return *outcome_;
}

bool TransferState::WaitFor(std::chrono::nanoseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  return cv_.wait_for(lock, timeout, [&] { return callbacks_done_; });
}

std::optional<Status> TransferState::Poll() const {
  std::lock_guard<std::mutex> lock(mu_);
  return outcome_;
}

void TransferState::Cancel() {
  if (settled()) return;
  if (cancel_) cancel_();
}

void TransferState::OnDone(std::function<void(const Status&)> done) {
  Status outcome;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!outcome_) {
      callbacks_.push_back(std::move(done));
      return;
    }
    outcome = *outcome_;
  }
  done(outcome);
}

TransferInfo TransferState::info() const {
  std::lock_guard<std::mutex> lock(mu_);
  return info_;
}

void TransferState::SetInfo(const TransferInfo& info) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!outcome_) info_ = info;
}

bool TransferState::Settle(const Status& status, const TransferInfo& info) {
  std::vector<std::function<void(const Status&)>> callbacks;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (outcome_) return false;
    outcome_ = status;
    info_ = info;
    callbacks.swap(callbacks_);
  }
  for (auto& cb : callbacks) cb(status);
  {
    std::lock_guard<std::mutex> lock(mu_);
    callbacks_done_ = true;
  }
  cv_.notify_all();
  return true;
}

bool TransferState::settled() const {
  std::lock_guard<std::mutex> lock(mu_);
  return outcome_.has_value();
}

}  // namespace kvbounce
