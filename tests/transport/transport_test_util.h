// Test helpers shared by the transport suites: an endpoint harness that
// records every callback, a tracker that checks "every callback exactly once,
// never inside the call, never after Shutdown", and guarded host buffers.
#ifndef KVBOUNCE_TESTS_TRANSPORT_TRANSPORT_TEST_UTIL_H_
#define KVBOUNCE_TESTS_TRANSPORT_TRANSPORT_TEST_UTIL_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kvbounce/status.h"
#include "kvbounce/transport.h"
#include "kvbounce/types.h"
#include "memory/allocation.h"

namespace kvbounce::transport_test {

using namespace std::chrono_literals;

// Generous: only a broken transport ever waits this long.
inline constexpr std::chrono::milliseconds kWaitTimeout = 10s;

// True on a thread that is inside a transport call made through the helpers
// below; a callback that sees it set ran inside the call that started it.
inline thread_local bool tls_inside_call = false;

class InsideCall {
 public:
  InsideCall() { tls_inside_call = true; }
  ~InsideCall() { tls_inside_call = false; }
  InsideCall(const InsideCall&) = delete;
  InsideCall& operator=(const InsideCall&) = delete;
};

inline std::vector<std::byte> Bytes(std::string_view text) {
  std::vector<std::byte> out(text.size());
  std::memcpy(out.data(), text.data(), text.size());
  return out;
}

inline std::string Text(std::span<const std::byte> bytes) {
  return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

// Hands out `done` callbacks and records, for each, how often it ran, with
// what status, and whether it ran inside its call or after Seal().
class DoneTracker {
 public:
  DoneTracker() : state_(std::make_shared<State>()) {}

  // A new callback; `index` (optional) receives its number.
  TransportDone Make(size_t* index = nullptr) {
    std::lock_guard<std::mutex> lock(state_->mu);
    const size_t i = state_->calls.size();
    state_->calls.push_back(0);
    state_->statuses.emplace_back();
    if (index != nullptr) *index = i;
    return [state = state_, i](Status status) {
      std::lock_guard<std::mutex> state_lock(state->mu);
      if (tls_inside_call) ++state->inside_call;
      if (state->sealed) ++state->after_seal;
      if (++state->calls[i] == 1) {
        state->statuses[i] = std::move(status);
        ++state->completed;
      }
      state->cv.notify_all();
    };
  }

  // Forgets the last callback made (its call was refused: it must never run).
  void Forget() {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->forgotten.push_back(state_->calls.size() - 1);
  }

  size_t made() const {
    std::lock_guard<std::mutex> lock(state_->mu);
    return state_->calls.size();
  }

  // Waits until every callback made (and not forgotten) ran once.
  bool WaitAll(std::chrono::milliseconds timeout = kWaitTimeout) const {
    std::unique_lock<std::mutex> lock(state_->mu);
    return state_->cv.wait_for(lock, timeout, [this] {
      return state_->completed + state_->forgotten.size() >= state_->calls.size();
    });
  }

  bool Wait(size_t index, std::chrono::milliseconds timeout = kWaitTimeout) const {
    std::unique_lock<std::mutex> lock(state_->mu);
    return state_->cv.wait_for(lock, timeout, [&] { return state_->calls[index] > 0; });
  }

  Status status(size_t index) const {
    std::lock_guard<std::mutex> lock(state_->mu);
    return state_->statuses[index];
  }
  int calls(size_t index) const {
    std::lock_guard<std::mutex> lock(state_->mu);
    return state_->calls[index];
  }
  std::vector<Status> statuses() const {
    std::lock_guard<std::mutex> lock(state_->mu);
    return state_->statuses;
  }

  // Any call after this is recorded as a violation.
  void Seal() {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->sealed = true;
  }

  // "" when every callback ran at most once, none inside its call, none after
  // Seal, and no forgotten one ran; otherwise what went wrong.
  std::string Violations() const {
    std::lock_guard<std::mutex> lock(state_->mu);
    std::string out;
    for (size_t i = 0; i < state_->calls.size(); ++i) {
      if (state_->calls[i] > 1) {
        out += "callback " + std::to_string(i) + " ran " + std::to_string(state_->calls[i]) +
               " times; ";
      }
    }
    for (size_t i : state_->forgotten) {
      if (state_->calls[i] != 0) out += "refused callback " + std::to_string(i) + " ran; ";
    }
    if (state_->inside_call > 0) out += "a callback ran inside the call that started it; ";
    if (state_->after_seal > 0) out += "a callback ran after Shutdown returned; ";
    return out;
  }

 private:
  struct State {
    mutable std::mutex mu;
    std::condition_variable cv;
    std::vector<int> calls;
    std::vector<Status> statuses;
    std::vector<size_t> forgotten;
    size_t completed = 0;
    int inside_call = 0;
    int after_seal = 0;
    bool sealed = false;
  };
  std::shared_ptr<State> state_;
};

// A transport plus a record of everything its callbacks reported.
class TestEndpoint {
 public:
  struct Message {
    PeerId peer;
    std::vector<std::byte> frame;
  };

  explicit TestEndpoint(std::unique_ptr<Transport> transport) : transport_(std::move(transport)) {}

  ~TestEndpoint() { Shutdown(); }

  Transport& t() { return *transport_; }
  Transport* operator->() { return transport_.get(); }

  // Runs inside on_message before the message is recorded (set before
  // Start). May block the transport's thread.
  std::function<void(PeerId, const std::vector<std::byte>&)> on_message_hook;
  // Runs inside on_peer_failure before the failure is recorded (set before
  // Start).
  std::function<void(PeerId, const Status&)> on_peer_failure_hook;

  Status Start() {
    TransportCallbacks callbacks;
    callbacks.on_message = [this](PeerId peer, std::vector<std::byte> frame) {
      if (on_message_hook) on_message_hook(peer, frame);
      std::lock_guard<std::mutex> lock(mu_);
      if (sealed_) ++after_seal_;
      messages_.push_back(Message{peer, std::move(frame)});
      cv_.notify_all();
    };
    callbacks.on_peer_failure = [this](PeerId peer, const Status& reason) {
      if (on_peer_failure_hook) on_peer_failure_hook(peer, reason);
      std::lock_guard<std::mutex> lock(mu_);
      if (sealed_) ++after_seal_;
      ++failures_[peer];
      failure_reasons_[peer] = reason;
      cv_.notify_all();
    };
    return transport_->Start(std::move(callbacks));
  }

  // Shuts the transport down; afterwards any callback is a violation.
  void Shutdown() {
    if (transport_ == nullptr) return;
    transport_->Shutdown();
    std::lock_guard<std::mutex> lock(mu_);
    sealed_ = true;
  }

  Status SendText(PeerId peer, std::string_view text) {
    InsideCall inside;
    return transport_->Send(peer, Bytes(text));
  }

  bool WaitForMessages(size_t count, std::chrono::milliseconds timeout = kWaitTimeout) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return messages_.size() >= count; });
  }

  bool WaitForFailure(PeerId peer, std::chrono::milliseconds timeout = kWaitTimeout) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return failures_.count(peer) > 0; });
  }

  bool WaitForTotalFailures(int count, std::chrono::milliseconds timeout = kWaitTimeout) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] {
      int total = 0;
      for (const auto& [peer, n] : failures_) total += n;
      return total >= count;
    });
  }

  std::vector<Message> messages() const {
    std::lock_guard<std::mutex> lock(mu_);
    return messages_;
  }
  int failures(PeerId peer) const {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = failures_.find(peer);
    return it == failures_.end() ? 0 : it->second;
  }
  int total_failures() const {
    std::lock_guard<std::mutex> lock(mu_);
    int total = 0;
    for (const auto& [peer, count] : failures_) total += count;
    return total;
  }
  Status failure_reason(PeerId peer) const {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = failure_reasons_.find(peer);
    return it == failure_reasons_.end() ? Status() : it->second;
  }
  int callbacks_after_shutdown() const {
    std::lock_guard<std::mutex> lock(mu_);
    return after_seal_;
  }

 private:
  std::unique_ptr<Transport> transport_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Message> messages_;
  std::map<PeerId, int> failures_;
  std::map<PeerId, Status> failure_reasons_;
  bool sealed_ = false;
  int after_seal_ = 0;
};

// A host buffer with guard bytes on both sides of its usable part.
class GuardedBuffer {
 public:
  static constexpr size_t kGuardBytes = 4096;
  static constexpr uint8_t kGuard = 0xA5;

  explicit GuardedBuffer(size_t size, uint8_t fill = 0) : size_(size) {
    auto allocation = HostAllocation::Create(size + 2 * kGuardBytes);
    if (allocation.ok()) allocation_ = std::move(allocation).value();
    base_ = static_cast<uint8_t*>(allocation_->host_pointer());
    std::memset(base_, kGuard, size + 2 * kGuardBytes);
    std::memset(data(), fill, size);
  }

  uint8_t* data() { return base_ + kGuardBytes; }
  const uint8_t* data() const { return base_ + kGuardBytes; }
  size_t size() const { return size_; }
  Addr addr() const { return Addr::FromPointer(data()); }
  Addr addr(uint64_t offset) const { return addr() + offset; }

  bool GuardsIntact() const {
    for (size_t i = 0; i < kGuardBytes; ++i) {
      if (base_[i] != kGuard || base_[kGuardBytes + size_ + i] != kGuard) return false;
    }
    return true;
  }
  bool AllEqual(uint8_t value) const {
    for (size_t i = 0; i < size_; ++i) {
      if (data()[i] != value) return false;
    }
    return true;
  }
  void FillPattern(uint32_t seed) {
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < size_; ++i) {
      x = x * 1664525u + 1013904223u;
      data()[i] = static_cast<uint8_t>(x >> 24);
    }
  }

 private:
  size_t size_;
  std::unique_ptr<Allocation> allocation_;
  uint8_t* base_ = nullptr;
};

// Wraps a freshly created transport (any Transport subclass) in a
// TestEndpoint, started unless `start` is false; nullptr (and a test
// failure) when creation failed.
template <typename T>
std::unique_ptr<TestEndpoint> MakeTestEndpoint(Result<std::unique_ptr<T>> transport,
                                               bool start = true) {
  EXPECT_TRUE(transport.ok()) << transport.status();
  if (!transport.ok()) return nullptr;
  auto endpoint =
      std::make_unique<TestEndpoint>(std::unique_ptr<Transport>(std::move(transport).value()));
  if (start) {
    const Status started = endpoint->Start();
    EXPECT_TRUE(started.ok()) << started;
  }
  return endpoint;
}

// Connects `from` to `to` and sends a HELLO so that `to` learns its PeerId
// for `from`. Returns {from's id for to, to's id for from}.
inline std::pair<PeerId, PeerId> ConnectTestEndpoints(TestEndpoint& from, TestEndpoint& to) {
  const size_t before = to.messages().size();
  auto peer = from->Connect(to->Address());
  EXPECT_TRUE(peer.ok()) << peer.status();
  if (!peer.ok()) return {0, 0};
  const Status sent = from.SendText(*peer, "HELLO from " + from->Address());
  EXPECT_TRUE(sent.ok()) << sent;
  EXPECT_TRUE(to.WaitForMessages(before + 1));
  return {*peer, to.messages()[before].peer};
}

}  // namespace kvbounce::transport_test

#endif  // KVBOUNCE_TESTS_TRANSPORT_TRANSPORT_TEST_UTIL_H_
