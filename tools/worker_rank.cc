#include "tools/worker_rank.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>
#include <utility>

namespace kvbounce::tools {
namespace {

int64_t SteadyNowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

WorkerRank::WorkerRank(const WorkerRankOptions& options, std::unique_ptr<RankHarness> harness)
    : options_(options), harness_(std::move(harness)) {}

Result<std::unique_ptr<WorkerRank>> WorkerRank::Create(const Topology& topology,
                                                       const WorkerRankOptions& options,
                                                       std::unique_ptr<Transport> transport,
                                                       FaultTransport* faults) {
  KVB_ASSIGN_OR_RETURN(std::unique_ptr<RankHarness> harness,
                       RankHarness::Create(topology, options.harness));
  std::unique_ptr<WorkerRank> w(new WorkerRank(options, std::move(harness)));
  w->slot_busy_.assign(static_cast<size_t>(options.harness.slots), false);
  w->queue_ = std::make_shared<Queue>();
  w->wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (w->wake_fd_ < 0) return InternalError(std::string("eventfd: ") + std::strerror(errno));
  w->queue_->fd = w->wake_fd_;
  const TransportCaps caps = transport->Caps();
  w->caps_ = {{"transport", caps.name},
              {"map_remote", caps.map_remote},
              {"read_remote", caps.read_remote}};
  AgentOptions agent =
      w->harness_->MakeAgentOptions(options.instance_id, options.config, options.grace);
  agent.transport = std::move(transport);
  agent.connect_timeout = options.connect_timeout;
  Result<std::unique_ptr<Agent>> created = Agent::Create(std::move(agent));
  if (!created.ok()) return created.status().WithContext(w->Who());
  w->agent_ = std::move(created).value();
  w->faults_ = faults;
  return w;
}

WorkerRank::~WorkerRank() {
  if (agent_) agent_->Shutdown();
  agent_.reset();
  if (wake_fd_ >= 0) close(wake_fd_);
}

std::string WorkerRank::Who() const {
  return options_.instance_id + " rank " + std::to_string(options_.harness.rank);
}

std::string WorkerRank::PathList() const {
  Result<std::vector<TransferPath>> paths = agent_->Paths(options_.ctx_instance);
  if (!paths.ok()) return "";
  std::string out;
  for (TransferPath p : *paths) {
    if (!out.empty()) out += ",";
    out += TransferPathName(p);
  }
  return out;
}

Status WorkerRank::Connect(const std::vector<std::string>& addresses,
                           std::chrono::steady_clock::time_point deadline) {
  // One peer at a time, so that a retry never repeats a HELLO that arrived.
  const auto start = std::chrono::steady_clock::now();
  for (const std::string& address : addresses) {
    const std::vector<std::string> one = {address};
    for (int attempt = 1;; ++attempt) {
      const Status s = agent_->Connect(one);
      if (s.ok()) break;
      const bool starting = s.code() == StatusCode::kUnavailable;
      const auto now = std::chrono::steady_clock::now();
      if (!starting || now + std::chrono::milliseconds(200) >= deadline) {
        const auto tried =
            std::chrono::duration_cast<std::chrono::milliseconds>(now - start).count();
        return Status(s.code(), Who() + ": connect to " + address + ": " +
                                    std::string(s.message()) +
                                    (attempt > 1 ? " (tried " + std::to_string(attempt) +
                                                       " times in " + std::to_string(tried) + " ms)"
                                                 : ""));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  }
  return Status::Ok();
}

void WorkerRank::Refuse(uint64_t request_id, const Status& why) {
  DoneReply d;
  d.request_id = request_id;
  d.code = why.code();
  d.settled_ns = SteadyNowNs();
  d.message = std::string(why.message());
  refused_.push_back(std::move(d));
  const uint64_t one = 1;
  [[maybe_unused]] const ssize_t n = write(wake_fd_, &one, sizeof(one));
}

void WorkerRank::Track(uint64_t request_id, Request request, bool occupies_slot) {
  std::shared_ptr<Transfer> transfer = request.transfer;
  if (occupies_slot) slot_busy_[static_cast<size_t>(request.slot)] = true;
  in_flight_.emplace(request_id, std::move(request));
  std::weak_ptr<Queue> weak = queue_;
  transfer->OnDone([weak, request_id](const Status& status) {
    std::shared_ptr<Queue> q = weak.lock();
    if (!q) return;
    {
      std::lock_guard<std::mutex> lock(q->mu);
      q->settled.push_back({request_id, status, SteadyNowNs()});
    }
    const uint64_t one = 1;
    [[maybe_unused]] const ssize_t n = write(q->fd, &one, sizeof(one));
  });
}

void WorkerRank::Publish(uint64_t request_id, int slot, int64_t tokens) {
  if (!ctx_side())
    return Refuse(request_id, FailedPreconditionError("publish: this is a gen rank"));
  if (slot < 0 || slot >= options_.harness.slots) {
    return Refuse(request_id,
                  OutOfRangeError("publish: slot " + std::to_string(slot) + " is outside [0, " +
                                  std::to_string(options_.harness.slots) + ")"));
  }
  if (tokens > options_.harness.max_tokens) {
    return Refuse(request_id, OutOfRangeError("publish: " + std::to_string(tokens) +
                                              " tokens: the pool slots hold " +
                                              std::to_string(options_.harness.max_tokens)));
  }
  if (in_flight_.count(request_id) != 0) {
    return Refuse(request_id, AlreadyExistsError("publish: request " + std::to_string(request_id) +
                                                 " is in flight here"));
  }
  Request r;
  r.slot = slot;
  r.range = {0, tokens};
  r.table =
      TablePrefix(harness_->CtxTable(slot), tokens, harness_->topology().spec().tokens_per_block);
  PublishOptions publish;
  publish.state_slot = harness_->StateSlot(slot);
  Result<std::shared_ptr<Transfer>> t = agent_->Publish(request_id, r.table, tokens, publish);
  if (!t.ok()) return Refuse(request_id, t.status().WithContext("publish"));
  r.transfer = std::move(t).value();
  // Publications of one slot may overlap: they only read it.
  Track(request_id, std::move(r), /*occupies_slot=*/false);
}

void WorkerRank::Pull(uint64_t request_id, int slot, TokenRange range, TransferPath path) {
  if (ctx_side()) return Refuse(request_id, FailedPreconditionError("pull: this is a ctx rank"));
  if (slot < 0 || slot >= options_.harness.slots) {
    return Refuse(request_id,
                  OutOfRangeError("pull: slot " + std::to_string(slot) + " is outside [0, " +
                                  std::to_string(options_.harness.slots) + ")"));
  }
  if (range.end > options_.harness.max_tokens || range.start < 0 || range.start >= range.end) {
    return Refuse(request_id,
                  OutOfRangeError("pull: tokens [" + std::to_string(range.start) + ", " +
                                  std::to_string(range.end) + ") do not fit a slot of " +
                                  std::to_string(options_.harness.max_tokens) + " tokens"));
  }
  if (in_flight_.count(request_id) != 0) {
    return Refuse(request_id, AlreadyExistsError("pull: request " + std::to_string(request_id) +
                                                 " is in flight here"));
  }
  if (slot_busy_[static_cast<size_t>(slot)]) {
    return Refuse(request_id, FailedPreconditionError("pull: slot " + std::to_string(slot) +
                                                      " holds a request in flight"));
  }
  Request r;
  r.slot = slot;
  r.range = range;
  r.table = harness_->GenTable(slot, range.end, options_.seed, request_id);
  PullOptions pull;
  pull.path = path;
  pull.state_slot = harness_->StateSlot(slot);
  Result<std::shared_ptr<Transfer>> t =
      agent_->Pull(request_id, options_.ctx_instance, r.table, range, pull);
  if (!t.ok()) return Refuse(request_id, t.status());
  r.transfer = std::move(t).value();
  Track(request_id, std::move(r), /*occupies_slot=*/true);
}

Status WorkerRank::Cancel(uint64_t request_id) {
  auto it = in_flight_.find(request_id);
  if (it == in_flight_.end()) {
    return NotFoundError("request " + std::to_string(request_id) + " is not in flight here");
  }
  it->second.transfer->Cancel();
  return Status::Ok();
}

std::vector<DoneReply> WorkerRank::TakeDone(bool verify_when_idle) {
  uint64_t count = 0;
  [[maybe_unused]] const ssize_t n = read(wake_fd_, &count, sizeof(count));
  std::vector<Settled> settled;
  {
    std::lock_guard<std::mutex> lock(queue_->mu);
    settled.swap(queue_->settled);
  }
  std::vector<DoneReply> out;
  out.swap(refused_);
  for (DoneReply& d : out) Count(d);
  for (Settled& s : settled) {
    auto it = in_flight_.find(s.request_id);
    if (it == in_flight_.end()) continue;
    Request& r = it->second;
    const TransferInfo info = r.transfer->info();
    DoneReply d;
    d.request_id = s.request_id;
    d.code = s.status.code();
    d.bytes = info.bytes;
    d.latency_us = std::chrono::duration_cast<std::chrono::microseconds>(info.latency).count();
    d.path_taken = std::string(TransferPathName(info.path_taken));
    d.transport_writes = info.transport_writes;
    d.settled_ns = s.settled_ns;
    d.message = std::string(s.status.message());
    if (!ctx_side()) {
      // Settled: nothing writes the slot any more; verified below.
      unverified_.push_back({std::move(d), std::move(r), s.status.ok()});
      in_flight_.erase(it);
      continue;
    }
    in_flight_.erase(it);
    Count(d);
    out.push_back(std::move(d));
  }
  if (!verify_when_idle || in_flight_.empty()) {
    for (Unverified& u : unverified_) {
      DoneReply& d = u.reply;
      if (u.ok) {
        const VerifyResult v =
            harness_->VerifyGen(u.request.slot, u.request.table, u.request.range);
        d.verified_bytes = v.verified_bytes;
        d.mismatches = v.mismatches;
        if (v.mismatches != 0) d.message = v.first_mismatch;
      }
      harness_->ClearSlot(u.request.slot);
      slot_busy_[static_cast<size_t>(u.request.slot)] = false;
      Count(d);
      out.push_back(std::move(d));
    }
    unverified_.clear();
  }
  return out;
}

void WorkerRank::Count(const DoneReply& d) {
  ++tally_.requests;
  if (d.code == StatusCode::kOk) {
    ++tally_.completed;
    tally_.bytes += d.bytes;
  } else {
    ++tally_.failed;
    if (tally_.first_failure.empty()) {
      tally_.first_failure = "request " + std::to_string(d.request_id) + ": " +
                             std::string(StatusCodeName(d.code)) + ": " + d.message;
    }
  }
  tally_.verified_bytes += d.verified_bytes;
  tally_.mismatches += d.mismatches;
  if (d.mismatches != 0 && tally_.first_mismatch.empty()) tally_.first_mismatch = d.message;
}

std::vector<int> WorkerRank::FreeSlots() const {
  std::vector<int> free;
  for (size_t s = 0; s < slot_busy_.size(); ++s) {
    if (!slot_busy_[s]) free.push_back(static_cast<int>(s));
  }
  return free;
}

nlohmann::json WorkerRank::Stats() const {
  const AgentStats s = agent_->Stats();
  nlohmann::json j;
  j["transport_write_ops"] = s.transport_write_ops;
  j["arena_outstanding_bytes"] = s.arena_outstanding_bytes;
  j["chunks_scattered"] = s.chunks_scattered;
  j["credit_stall_ns"] = static_cast<uint64_t>(s.credit_stall.count());
  j["in_flight"] = in_flight_.size();
  uint64_t injected = 0, batches = 0;
  if (faults_ != nullptr) {
    const FaultStats f = faults_->fault_stats();
    injected = f.injected_write_failures;
    batches = f.failed_batches;
  }
  j["injected_write_failures"] = injected;
  j["injected_failed_batches"] = batches;
  j["agent"] = nlohmann::json::parse(s.json, nullptr, /*allow_exceptions=*/false);
  return j;
}

void WorkerRank::Shutdown() {
  if (agent_) agent_->Shutdown();
}

}  // namespace kvbounce::tools
