#include "transport/fault/fault_transport.h"

#include <cmath>
#include <cstdlib>
#include <optional>
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

void FaultTransport::HoldWrites() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!parking_closed_) holding_ = true;
}

void FaultTransport::ReleaseWrites() {
  std::lock_guard<std::mutex> release_lock(release_mu_);
  std::deque<ParkedWrite> released;
  {
    std::lock_guard<std::mutex> lock(mu_);
    holding_ = false;
    released.swap(parked_);
    ++releasing_;
  }
  for (ParkedWrite& write : released) IssueParked(write);
  {
    std::lock_guard<std::mutex> lock(mu_);
    --releasing_;
  }
  parked_cv_.notify_all();
}

size_t FaultTransport::held_writes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return parked_.size();
}

bool FaultTransport::WaitForHeldWrites(size_t n, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  return parked_cv_.wait_for(lock, timeout, [&] { return parked_.size() >= n; });
}

void FaultTransport::IssueParked(ParkedWrite& write) {
  // The inner transport gets a copy: when it refuses, `write.done` is still
  // ours to call.
  Status status = inner_->Write(*write.source, *write.target, write.ops,
                                DelayCompletion(write.done, write.delay), std::stop_token());
  if (status.ok()) return;
  if (write.delay.count() > 0) {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.delayed_completions;
  }
  TimerEntry entry;
  entry.kind = TimerEntry::Kind::kCompletion;
  entry.done = std::move(write.done);
  entry.status = std::move(status);
  if (!Post(Clock::now() + write.delay, entry)) {
    // Unreachable: Shutdown keeps the timer running until no release issues.
    entry.done(AbortedError("fault transport: shut down; the held write was refused with " +
                            entry.status.ToString()));
  }
}

TransportDone FaultTransport::Settling(PeerId peer, TransportDone done) {
  return [this, peer, done = std::move(done)](Status status) {
    done(std::move(status));
    Settle(peer, /*in_call=*/false);
  };
}

void FaultTransport::Settle(PeerId peer, bool in_call) {
  Status reason;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = unsettled_.find(peer);
    if (it == unsettled_.end() || --it->second > 0) return;
    unsettled_.erase(it);
    auto held = held_failures_.find(peer);
    if (held == held_failures_.end()) return;
    reason = std::move(held->second);
    held_failures_.erase(held);
  }
  // Shutting down: the failure is dropped like any pending notification.
  if (!stopping_.load()) DeliverPeerFailure(peer, reason, /*via_timer=*/in_call);
}

uint64_t FaultTransport::CountChosenLocked(uint64_t num_ops, double rate) {
  // Bernoulli(rate) per op, drawn as the geometric gaps between chosen ops:
  // P(gap >= k) = P(u <= (1 - rate)^k) for u uniform in (0, 1].
  const double log_keep = std::log1p(-rate);
  uint64_t chosen = 0;
  uint64_t next = 0;  // the first op not yet decided
  while (next < num_ops) {
    const double u = (static_cast<double>(rng_() >> 11) + 1.0) * 0x1.0p-53;
    const double gap = std::floor(std::log(u) / log_keep);
    if (!(gap < static_cast<double>(num_ops - next))) break;
    next += static_cast<uint64_t>(gap) + 1;
    ++chosen;
  }
  return chosen;
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

Result<TransportCaps> FaultTransport::PeerCaps(PeerId peer) const { return inner_->PeerCaps(peer); }

Result<TransportCaps> FaultTransport::PeerCapsFor(PeerId peer, MemoryKind kind) const {
  return inner_->PeerCapsFor(peer, kind);
}

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

Result<std::unique_ptr<MappedAccess>> FaultTransport::BeginMappedRead(const RemoteRegion& source) {
  if (stopping_.load()) return AbortedError("fault transport: shut down");
  return inner_->BeginMappedRead(source);
}

FaultTransport::Decision FaultTransport::DecideLocked(PeerId peer, size_t num_ops, bool read,
                                                      TransportDone& done) {
  Decision decision;
  decision.delay = options_.delay;
  decision.drop_after = options_.drop_after_ops;
  if (decision.drop_after > 0 && !drop_fired_ &&
      ops_since_options_ >= static_cast<uint64_t>(decision.drop_after)) {
    drop_fired_ = true;
    decision.drop = true;
    ++stats_.dropped_connections;
    return decision;
  }
  const double rate = options_.write_fail_rate;
  if (rate >= 1.0) {
    decision.failures = num_ops;
  } else if (rate > 0.0 && num_ops > 0) {
    decision.failures = CountChosenLocked(num_ops, rate);
  }
  ops_since_options_ += num_ops;
  // Counted until its `done` returned (or the inner transport refused it).
  ++unsettled_[peer];
  done = Settling(peer, std::move(done));
  if (decision.failures > 0) {
    (read ? stats_.injected_read_failures : stats_.injected_write_failures) += decision.failures;
    ++stats_.failed_batches;
    if (decision.delay.count() > 0) ++stats_.delayed_completions;
  }
  return decision;
}

std::optional<Status> FaultTransport::Inject(const Decision& decision, PeerId peer,
                                             TransportDone& done, bool read, size_t num_ops) {
  if (decision.drop) {
    Status reason = UnavailableError("injected: connection dropped after " +
                                     std::to_string(decision.drop_after) + " operations");
    inner_->Disconnect(peer, reason);
    return reason;
  }
  if (decision.failures == 0) return std::nullopt;
  TimerEntry entry;
  entry.kind = TimerEntry::Kind::kCompletion;
  entry.done = std::move(done);
  entry.status =
      UnavailableError(std::string(read ? "injected read failure: " : "injected write failure: ") +
                       std::to_string(decision.failures) + " of " + std::to_string(num_ops) +
                       " operations chosen to fail");
  if (!Post(Clock::now() + decision.delay, entry)) {
    Settle(peer, /*in_call=*/true);
    return AbortedError("fault transport: shut down");
  }
  return Status::Ok();
}

Status FaultTransport::Write(const LocalRegion& source, const RemoteRegion& target,
                             std::span<const WriteOp> ops, TransportDone done,
                             std::stop_token stop) {
  if (stopping_.load()) return AbortedError("fault transport: shut down");
  if (!done) return InvalidArgumentError("fault transport: Write needs a done callback");
  KVB_RETURN_IF_ERROR(CheckWriteOps(source.info(), target.info(), ops).status());

  const PeerId peer = target.peer();
  bool parked = false;
  Decision decision;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (parking_closed_) return AbortedError("fault transport: shut down");
    decision = DecideLocked(peer, ops.size(), /*read=*/false, done);
    if (!decision.drop && decision.failures == 0 && holding_ && !failed_peers_.contains(peer)) {
      ParkedWrite write;
      write.source = &source;
      write.target = &target;
      write.ops = ops;
      write.done = std::move(done);
      write.delay = decision.delay;
      parked_.push_back(std::move(write));
      parked = true;
    }
  }
  if (parked) {
    parked_cv_.notify_all();
    return Status::Ok();
  }
  if (std::optional<Status> injected = Inject(decision, peer, done, /*read=*/false, ops.size())) {
    return *injected;
  }
  Status status = inner_->Write(source, target, ops,
                                DelayCompletion(std::move(done), decision.delay), std::move(stop));
  if (!status.ok()) Settle(peer, /*in_call=*/true);
  return status;
}

Status FaultTransport::Read(const RemoteRegion& source, const LocalRegion& target,
                            std::span<const ReadOp> ops, TransportDone done, std::stop_token stop) {
  if (stopping_.load()) return AbortedError("fault transport: shut down");
  if (!done) return InvalidArgumentError("fault transport: Read needs a done callback");
  KVB_RETURN_IF_ERROR(CheckReadOps(source.info(), target.info(), ops).status());
  const PeerId peer = source.peer();
  // A read the inner transport cannot do is refused, never "failed by
  // injection" later.
  if (Result<TransportCaps> caps = inner_->PeerCaps(peer); caps.ok() && !caps->read_remote) {
    return UnimplementedError("fault transport: the inner " + caps->name +
                              " transport cannot read the memory of peer " + std::to_string(peer));
  }

  Decision decision;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (parking_closed_) return AbortedError("fault transport: shut down");
    decision = DecideLocked(peer, ops.size(), /*read=*/true, done);
  }
  if (std::optional<Status> injected = Inject(decision, peer, done, /*read=*/true, ops.size())) {
    return *injected;
  }
  Status status = inner_->Read(source, target, ops,
                               DelayCompletion(std::move(done), decision.delay), std::move(stop));
  if (!status.ok()) Settle(peer, /*in_call=*/true);
  return status;
}

Status FaultTransport::Flush(PeerId peer, TransportDone done) {
  if (stopping_.load()) return AbortedError("fault transport: shut down");
  if (!done) return InvalidArgumentError("fault transport: Flush needs a done callback");
  std::chrono::microseconds delay{0};
  {
    std::lock_guard<std::mutex> lock(mu_);
    delay = options_.delay;
    ++unsettled_[peer];
  }
  Status status = inner_->Flush(peer, DelayCompletion(Settling(peer, std::move(done)), delay));
  if (!status.ok()) Settle(peer, /*in_call=*/true);
  return status;
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
  std::function<void(std::vector<std::byte>&)> rewrite;
  {
    std::lock_guard<std::mutex> lock(mu_);
    delay = options_.message_delay;
    if (delay.count() > 0) ++stats_.delayed_messages;
    rewrite = options_.rewrite_message;
  }
  if (rewrite) rewrite(frame);
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
    std::lock_guard<std::mutex> lock(mu_);
    failed_peers_.insert(peer);
    if (unsettled_.contains(peer)) {
      held_failures_[peer] = reason;  // Settle delivers it
      return;
    }
  }
  DeliverPeerFailure(peer, reason, /*via_timer=*/false);
}

void FaultTransport::DeliverPeerFailure(PeerId peer, const Status& reason, bool via_timer) {
  {
    std::lock_guard<std::mutex> lock(timer_mu_);
    if (timer_closed_) return;
    auto backlog = backlogs_.find(peer);
    if (backlog != backlogs_.end() || via_timer) {
      // After the delayed messages still pending for this peer.
      PeerBacklog& b = backlogs_[peer];
      const Clock::time_point due = b.pending > 0 ? b.last_due : Clock::now();
      ++b.pending;
      b.last_due = due;
      TimerEntry entry;
      entry.kind = TimerEntry::Kind::kPeerFailure;
      entry.peer = peer;
      entry.status = reason;
      timers_.emplace(std::make_pair(due, timer_seq_++), std::move(entry));
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
    if (entry.kind == TimerEntry::Kind::kCompletion && entry.final_status) {
      entry.done(std::move(entry.status));
    } else if (entry.kind == TimerEntry::Kind::kCompletion) {
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
  std::deque<ParkedWrite> parked;
  {
    std::lock_guard<std::mutex> lock(mu_);
    parking_closed_ = true;
    holding_ = false;
    parked.swap(parked_);
  }
  inner_->Shutdown();
  {
    // A ReleaseWrites still issuing may need the timer for a refusal.
    std::unique_lock<std::mutex> lock(mu_);
    parked_cv_.wait(lock, [this] { return releasing_ == 0; });
  }
  for (ParkedWrite& write : parked) {
    TimerEntry entry;
    entry.kind = TimerEntry::Kind::kCompletion;
    entry.done = std::move(write.done);
    entry.status =
        AbortedError("fault transport shut down while the write was held; it was never issued");
    entry.final_status = true;
    if (!Post(Clock::now(), entry)) {
      entry.done(std::move(entry.status));  // unreachable: the timer runs until below
    }
  }
  {
    std::lock_guard<std::mutex> lock(timer_mu_);
    timer_stop_ = true;
  }
  timer_cv_.notify_all();
  if (timer_thread_.joinable()) timer_thread_.join();
  callbacks_ = {};
}

}  // namespace kvbounce
