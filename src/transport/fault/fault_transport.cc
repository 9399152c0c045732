#include "transport/fault/fault_transport.h"

#include <cmath>
#include <cstdlib>
#include <string>
#include <system_error>

#include "kvbounce/logging.h"
#include "transport/write_check.h"

namespace kvbounce {
namespace {

std::string Micros(std::chrono::microseconds d) { return std::to_string(d.count()) + "us"; }

}  // namespace

Status FaultTransport::ValidateOptions(const FaultOptions& options) {
  if (!(options.write_fail_rate >= 0.0 && options.write_fail_rate <= 1.0)) {
    return InvalidArgumentError(
        "fault transport: write_fail_rate = " + std::to_string(options.write_fail_rate) +
        " is invalid: must be in [0, 1]");
  }
  if (options.delay.count() < 0) {
    return InvalidArgumentError("fault transport: delay = " + Micros(options.delay) +
                                " is invalid: must be >= 0");
  }
  if (options.message_delay.count() < 0) {
    return InvalidArgumentError("fault transport: message_delay = " +
                                Micros(options.message_delay) + " is invalid: must be >= 0");
  }
  if (options.drop_after_ops < 0) {
    return InvalidArgumentError(
        "fault transport: drop_after_ops = " + std::to_string(options.drop_after_ops) +
        " is invalid: must be >= 0 (0 = never)");
  }
  return Status::Ok();
}

Result<std::unique_ptr<FaultTransport>> FaultTransport::Create(std::unique_ptr<Transport> inner,
                                                               FaultOptions options) {
  if (inner == nullptr) return InvalidArgumentError("fault transport: the inner transport is null");
  KVB_RETURN_IF_ERROR(ValidateOptions(options));
  std::unique_ptr<FaultTransport> transport(new FaultTransport(std::move(inner), options));
  // std::thread reports failure by throwing; the library reports Status.
  try {
    transport->timer_thread_ = std::thread([raw = transport.get()] { raw->TimerLoop(); });
  } catch (const std::system_error& e) {
    return ResourceExhaustedError(std::string("fault transport: cannot start the timer thread: ") +
                                  e.what());
  }
  return transport;
}

FaultTransport::FaultTransport(std::unique_ptr<Transport> inner, FaultOptions options)
    : inner_(std::move(inner)), options_(options), rng_(options.seed) {}

FaultTransport::~FaultTransport() { Shutdown(); }

Status FaultTransport::SetOptions(const FaultOptions& options) {
  KVB_RETURN_IF_ERROR(ValidateOptions(options));
  std::lock_guard<std::mutex> lock(mu_);
  options_ = options;
  rng_.seed(options.seed);
  ops_since_options_ = 0;
  drop_fired_ = false;
  return Status::Ok();
}

FaultOptions FaultTransport::options() const {
  std::lock_guard<std::mutex> lock(mu_);
  return options_;
}

FaultStats FaultTransport::fault_stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void FaultTransport::InjectDisconnect(PeerId peer) {
  if (stopping_.load()) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.dropped_connections;
  }
  inner_->Disconnect(peer, UnavailableError("injected disconnect"));
}

TransportCaps FaultTransport::Caps() const { return inner_->Caps(); }

std::string FaultTransport::Address() const { return inner_->Address(); }

Status FaultTransport::Start(TransportCallbacks callbacks) {
  if (stopping_.load()) return AbortedError("fault transport: shut down");
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (started_) return FailedPreconditionError("fault transport: already started");
    started_ = true;
    callbacks_ = std::move(callbacks);
  }
  TransportCallbacks wrapped;
  wrapped.on_message = [this](PeerId peer, std::vector<std::byte> frame) {
    OnMessage(peer, std::move(frame));
  };
  wrapped.on_peer_failure = [this](PeerId peer, const Status& reason) {
    OnPeerFailure(peer, reason);
  };
  Status status = inner_->Start(std::move(wrapped));
  if (!status.ok()) {
    // The inner transport runs no callback: Start may be tried again.
    std::lock_guard<std::mutex> lock(mu_);
    started_ = false;
    callbacks_ = {};
  }
  return status;
}

Result<PeerId> FaultTransport::Connect(std::string_view address) {
  return inner_->Connect(address);
}

Status FaultTransport::Send(PeerId peer, std::span<const std::byte> frame) {
  return inner_->Send(peer, frame);
}

Result<std::unique_ptr<LocalRegion>> FaultTransport::Register(Addr address, uint64_t bytes,
                                                              MemoryKind kind) {
  return inner_->Register(address, bytes, kind);
}

Result<std::unique_ptr<RemoteRegion>> FaultTransport::Import(PeerId peer, const RegionInfo& info) {
  return inner_->Import(peer, info);
}

Result<std::unique_ptr<MappedAccess>> FaultTransport::BeginMappedAccess(
    const RemoteRegion& target) {
  if (stopping_.load()) return AbortedError("fault transport: shut down");
  return inner_->BeginMappedAccess(target);
}

Status FaultTransport::Write(const LocalRegion& source, const RemoteRegion& target,
                             std::span<const WriteOp> ops, TransportDone done,
                             std::stop_token stop) {
  if (stopping_.load()) return AbortedError("fault transport: shut down");
  if (!done) return InvalidArgumentError("fault transport: Write needs a done callback");
  KVB_RETURN_IF_ERROR(CheckWriteOps(source.info(), target.info(), ops).status());

  bool drop = false;
  uint64_t failures = 0;
  int64_t drop_after = 0;
  std::chrono::microseconds delay{0};
  {
    std::lock_guard<std::mutex> lock(mu_);
    delay = options_.delay;
    drop_after = options_.drop_after_ops;
    if (drop_after > 0 && !drop_fired_ && ops_since_options_ >= static_cast<uint64_t>(drop_after)) {
      drop_fired_ = true;
      drop = true;
      ++stats_.dropped_connections;
    } else {
      const double rate = options_.write_fail_rate;
      if (rate >= 1.0) {
        failures = ops.size();
      } else if (rate > 0.0 && !ops.empty()) {
        std::binomial_distribution<uint64_t> chosen(ops.size(), rate);
        failures = chosen(rng_);
      }
      ops_since_options_ += ops.size();
      if (failures > 0) {
        stats_.injected_write_failures += failures;
        ++stats_.failed_batches;
        if (delay.count() > 0) ++stats_.delayed_completions;
      }
    }
  }

  if (drop) {
    Status reason = UnavailableError("injected: connection dropped after " +
                                     std::to_string(drop_after) + " operations");
    inner_->Disconnect(target.peer(), reason);
    return reason;
  }
  if (failures > 0) {
    TimerEntry entry;
    entry.kind = TimerEntry::Kind::kCompletion;
    entry.done = std::move(done);
    entry.status = UnavailableError("injected write failure: " + std::to_string(failures) + " of " +
                                    std::to_string(ops.size()) + " operations chosen to fail");
    if (!Post(Clock::now() + delay, entry)) return AbortedError("fault transport: shut down");
    return Status::Ok();
  }
  return inner_->Write(source, target, ops, DelayCompletion(std::move(done), delay),
                       std::move(stop));
}

Status FaultTransport::Flush(PeerId peer, TransportDone done) {
  if (stopping_.load()) return AbortedError("fault transport: shut down");
  if (!done) return InvalidArgumentError("fault transport: Flush needs a done callback");
  std::chrono::microseconds delay{0};
  {
    std::lock_guard<std::mutex> lock(mu_);
    delay = options_.delay;
  }
  return inner_->Flush(peer, DelayCompletion(std::move(done), delay));
}

void FaultTransport::Disconnect(PeerId peer, const Status& reason) {
  inner_->Disconnect(peer, reason);
}

TransportStats FaultTransport::Stats() const { return inner_->Stats(); }

TransportDone FaultTransport::DelayCompletion(TransportDone done, std::chrono::microseconds delay) {
  if (delay.count() <= 0) return done;
  return [this, delay, done = std::move(done)](Status status) mutable {
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++stats_.delayed_completions;
    }
    TimerEntry entry;
    entry.kind = TimerEntry::Kind::kCompletion;
    entry.done = std::move(done);
    entry.status = std::move(status);
    if (!Post(Clock::now() + delay, entry)) {
      // Unreachable while the inner transport runs (the timer stops after
      // it); still, never drop a completion.
      entry.done(AbortedError("fault transport: shut down; the operation had completed with " +
                              entry.status.ToString()));
    }
  };
}

bool FaultTransport::Post(Clock::time_point due, TimerEntry& entry) {
  {
    std::lock_guard<std::mutex> lock(timer_mu_);
    if (timer_closed_) return false;
    timers_.emplace(std::make_pair(due, timer_seq_++), std::move(entry));
  }
  timer_cv_.notify_one();
  return true;
}

void FaultTransport::OnMessage(PeerId peer, std::vector<std::byte> frame) {
  std::chrono::microseconds delay{0};
  {
    std::lock_guard<std::mutex> lock(mu_);
    delay = options_.message_delay;
    if (delay.count() > 0) ++stats_.delayed_messages;
  }
  {
    std::lock_guard<std::mutex> lock(timer_mu_);
    if (timer_closed_) return;
    auto backlog = backlogs_.find(peer);
    if (delay.count() > 0 || backlog != backlogs_.end()) {
      // Queued behind this peer's earlier delayed messages, to keep order.
      Clock::time_point due = Clock::now() + delay;
      PeerBacklog& b = backlogs_[peer];
      if (b.pending > 0 && b.last_due > due) due = b.last_due;
      ++b.pending;
      b.last_due = due;
      TimerEntry entry;
      entry.kind = TimerEntry::Kind::kMessage;
      entry.peer = peer;
      entry.frame = std::move(frame);
      timers_.emplace(std::make_pair(due, timer_seq_++), std::move(entry));
      timer_cv_.notify_one();
      return;
    }
  }
  if (callbacks_.on_message) callbacks_.on_message(peer, std::move(frame));
}

void FaultTransport::OnPeerFailure(PeerId peer, const Status& reason) {
  {
    std::lock_guard<std::mutex> lock(timer_mu_);
    if (timer_closed_) return;
    auto backlog = backlogs_.find(peer);
    if (backlog != backlogs_.end()) {
      // After the delayed messages still pending for this peer.
      ++backlog->second.pending;
      TimerEntry entry;
      entry.kind = TimerEntry::Kind::kPeerFailure;
      entry.peer = peer;
      entry.status = reason;
      timers_.emplace(std::make_pair(backlog->second.last_due, timer_seq_++), std::move(entry));
      timer_cv_.notify_one();
      return;
    }
  }
  if (callbacks_.on_peer_failure) callbacks_.on_peer_failure(peer, reason);
}

void FaultTransport::TimerLoop() {
  std::unique_lock<std::mutex> lock(timer_mu_);
  while (!timer_stop_) {
    if (timers_.empty()) {
      timer_cv_.wait(lock);
      continue;
    }
    auto first = timers_.begin();
    if (first->first.first > Clock::now()) {
      timer_cv_.wait_until(lock, first->first.first);
      continue;
    }
    TimerEntry entry = std::move(first->second);
    timers_.erase(first);
    lock.unlock();
    const TimerEntry::Kind kind = entry.kind;
    const PeerId peer = entry.peer;
    switch (kind) {
      case TimerEntry::Kind::kCompletion:
        entry.done(std::move(entry.status));
        break;
      case TimerEntry::Kind::kMessage:
        if (callbacks_.on_message) callbacks_.on_message(peer, std::move(entry.frame));
        break;
      case TimerEntry::Kind::kPeerFailure:
        if (callbacks_.on_peer_failure) callbacks_.on_peer_failure(peer, entry.status);
        break;
    }
    entry = TimerEntry();  // release the callback's captures outside the lock
    lock.lock();
    // Only after the delivery returned: a message arriving meanwhile must
    // queue behind it rather than overtake it on the inner thread.
    if (kind != TimerEntry::Kind::kCompletion) {
      auto backlog = backlogs_.find(peer);
      if (backlog != backlogs_.end() && --backlog->second.pending == 0) backlogs_.erase(backlog);
    }
  }
  // Shutdown: the inner transport is stopped, nothing new arrives.
  timer_closed_ = true;
  std::map<std::pair<Clock::time_point, uint64_t>, TimerEntry> left;
  left.swap(timers_);
  backlogs_.clear();
  lock.unlock();
  for (auto& [due, entry] : left) {
    if (entry.kind == TimerEntry::Kind::kCompletion) {
      entry.done(
          AbortedError("fault transport shut down before a delayed completion was "
                       "reported; the operation had completed with " +
                       entry.status.ToString()));
    }
  }
}

bool FaultTransport::OnOwnThread() const {
  return std::this_thread::get_id() == timer_thread_.get_id();
}

void FaultTransport::Shutdown() {
  if (OnOwnThread()) {
    Log(LogLevel::kError,
        "fault transport shut down (or destroyed) on its timer thread, from a callback; "
        "aborting");
    std::abort();
  }
  std::lock_guard<std::mutex> shutdown_lock(shutdown_mu_);
  if (shut_down_) return;
  shut_down_ = true;
  stopping_.store(true);
  inner_->Shutdown();
  {
    std::lock_guard<std::mutex> lock(timer_mu_);
    timer_stop_ = true;
  }
  timer_cv_.notify_all();
  if (timer_thread_.joinable()) timer_thread_.join();
  callbacks_ = {};
}

}  // namespace kvbounce
