#include "session/sender.h"

#include <algorithm>
#include <array>
#include <deque>
#include <limits>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "kvbounce/logging.h"
#include "layout/chunking.h"

namespace kvbounce {

struct SenderSession::Publication {
  uint64_t request_id = 0;
  std::shared_ptr<TransferState> handle;
  std::shared_ptr<const std::vector<int32_t>> block_table;
  int64_t num_tokens = 0;
  int64_t state_slot = -1;  // hybrid models: the state's slot, -1: none
  // (instance, rank) of every gen rank served successfully.
  std::set<std::pair<std::string, int>> served;
  std::string pulling_instance;
  int expected = -1;  // known once the first pull arrives
  uint64_t bytes = 0;
  EventLoop::TimerId ttl_timer = 0;
  SessionContext::MetricsClock::time_point published;
  // Decided once (served, retired, expired, shut down); from then on no job
  // starts reading the blocks and the transfer settles when `readers` is 0.
  std::optional<Status> outcome;
  int readers = 0;  // jobs whose operations may still read the blocks
};

struct SenderSession::Job {
  Key key;
  PeerId peer = 0;
  std::string peer_name;
  std::string peer_instance;
  int peer_rank = 0;
  protocol::KvRequest request;
  JobState state = JobState::kParked;
  SessionContext::TimePoint deadline;
  EventLoop::TimerId deadline_timer = 0;
  EventLoop::TimerId reserve_timer = 0;

  // Decided once; reported when nothing is in flight (MaybeReport).
  std::optional<Status> outcome;
  // The publication was decided before this job reported: report CANCELLED.
  bool retired = false;
  bool reads_blocks = false;  // counted in the publication's readers
  bool wrote = false;         // a write was accepted: flush before reporting
  bool flushed = false;
  // Report nothing to the peer: a flush failed (nothing proves the writes
  // stopped landing; the peer was disconnected instead) or the transport is
  // down.
  bool silent = false;
  std::stop_source stop;      // every copy and write of the job
  int async_outstanding = 0;  // copies, write batches, flushes in the air

  TransferPath path = TransferPath::kPerBlock;
  DataPath data_path = DataPath::kPerBlock;
  std::string fallback_reason;
  std::shared_ptr<const std::vector<int32_t>> block_table;  // keeps the lists' source valid
  int64_t state_slot = -1;                                  // the publication's (hybrid models)
  PairPlan plan;
  // The plan's copied list is in tiled form (plan.tiled_*).
  bool tiled = false;
  Slot send_slot;
  // Streaming through the send arena (StartStream: a stream larger than
  // it; StartStreamed: a streamed request, its chunks granted one by one):
  // units of the packed stream, each gathered into a lane's slot and
  // written to its destination, kStreamLanes lanes so that one unit's
  // gather overlaps another's write.
  static constexpr uint64_t kNoChunk = std::numeric_limits<uint64_t>::max();
  struct Unit {
    uint64_t begin = 0;  // bytes [begin, end) of the packed stream
    uint64_t end = 0;
    Addr dst;                   // where the receiver wants them
    uint64_t chunk = kNoChunk;  // the granted chunk it belongs to
  };
  struct Lane {
    Slot slot;
    bool busy = false;
    Unit unit;
    FragmentList list;           // the unit's part of the gather list
    TiledList tiled;             // the same, tiled (Job::slice_tiled)
    std::vector<WriteOp> write;  // alive until the write completed
  };
  bool streaming = false;  // units and lanes are in use
  // Units are sliced from the tiled gather list, which is in packed order
  // (PrepareSlicing), not from the flat one.
  bool slice_tiled = false;
  bool streamed = false;   // KV_REQUEST.chunk_bytes > 0
  // kMappedBounce: units are gathered straight into the mapped recv slots,
  // lanes hold no send-arena slot and nothing is written.
  bool mapped = false;
  uint64_t lane_bytes = 0;
  std::deque<Unit> units;
  std::array<Lane, kStreamLanes> lanes;
  bool lane_waiting = false;  // in reserve_waiters_ for a first lane
  int gathers_outstanding = 0;
  // A streamed request: the receiver's cut, the chunks granted so far, the
  // units of each granted chunk not written yet, the chunks announced, and
  // the grants that came before the job started.
  std::optional<ChunkCut> cut;
  std::unordered_set<uint64_t> granted;
  std::map<uint64_t, uint64_t> units_left;
  uint64_t chunks_announced = 0;
  // When each granted chunk's KV_GRANT arrived, until its KV_CHUNK went
  // out; the time between the two, summed (RequestRecord::chunk_writer_us).
  std::unordered_map<uint64_t, SessionContext::MetricsClock::time_point> granted_at;
  std::chrono::nanoseconds chunk_writer_time{0};
  std::vector<protocol::KvGrant> early_grants;
  std::vector<WriteGroup> groups;
  Status write_error;
  uint64_t fragments = 0;
  uint64_t transport_writes = 0;
  RequestTimeline timeline;
};

SenderSession::SenderSession(SessionContext& ctx, RetireHook retire_hook)
    : ctx_(ctx), retire_hook_(std::move(retire_hook)) {}

SenderSession::~SenderSession() = default;

const char* SenderSession::DataPathName(DataPath path) {
  switch (path) {
    case DataPath::kPerBlock:
      return "per-block";
    case DataPath::kBounce:
      return "bounce";
    case DataPath::kStagedBounce:
      return "host-staged bounce";
    case DataPath::kMappedBounce:
      return "bounce into the mapped recv slot";
    case DataPath::kDirect:
      return "direct";
    case DataPath::kLend:
      return "direct read";
  }
  return "?";
}

const char* SenderSession::StateName(JobState state) {
  switch (state) {
    case JobState::kParked:
      return "PARKED";
    case JobState::kReserving:
      return "RESERVING";
    case JobState::kGathering:
      return "GATHERING";
    case JobState::kWriting:
      return "WRITING";
    case JobState::kCopying:
      return "COPYING";
    case JobState::kLent:
      return "LENT";
    case JobState::kFlushing:
      return "FLUSHING";
    case JobState::kDone:
      return "DONE";
  }
  return "?";
}

void SenderSession::Transition(Job& job, JobState next) {
  bool allowed = false;
  switch (job.state) {
    case JobState::kParked:
      allowed = next == JobState::kReserving || next == JobState::kWriting ||
                next == JobState::kCopying || next == JobState::kLent || next == JobState::kDone;
      break;
    case JobState::kReserving:
      allowed = next == JobState::kGathering || next == JobState::kWriting ||
                next == JobState::kDone;
      break;
    case JobState::kGathering:
      allowed = next == JobState::kWriting || next == JobState::kFlushing ||
                next == JobState::kDone;
      break;
    case JobState::kWriting:
    case JobState::kCopying:
      allowed = next == JobState::kFlushing || next == JobState::kDone;
      break;
    case JobState::kLent:
    case JobState::kFlushing:
      allowed = next == JobState::kDone;
      break;
    case JobState::kDone:
      break;
  }
  if (!allowed) {
    ctx_.metrics->Count(Counter::kInvalidTransitions);
    Log(LogLevel::kError, RequestName(job.request.request_id) + ": invalid sender transition " +
                              StateName(job.state) + " -> " + StateName(next));
    return;
  }
  job.state = next;
}

SenderSession::Job* SenderSession::Find(const Key& key) {
  auto it = jobs_.find(key);
  return it == jobs_.end() ? nullptr : it->second.get();
}

Result<std::shared_ptr<Transfer>> SenderSession::Publish(uint64_t request_id,
                                                         std::vector<int32_t> block_table,
                                                         int64_t num_tokens,
                                                         const PublishOptions& options) {
  if (ctx_.shutting_down.load()) return AbortedError("Publish: the agent is shutting down");
  if (auto it = publications_.find(request_id); it != publications_.end()) {
    return AlreadyExistsError(
        "Publish: " + RequestName(request_id) +
        (it->second->outcome ? " is still settling: publish it again once its transfer settled"
                             : " is already published"));
  }
  auto pub = std::make_unique<Publication>();
  pub->request_id = request_id;
  pub->block_table = std::make_shared<const std::vector<int32_t>>(std::move(block_table));
  pub->num_tokens = num_tokens;
  pub->state_slot = options.state_slot;
  pub->published = SessionContext::MetricsClock::now();
  pub->handle = std::make_shared<TransferState>(
      request_id, [hook = retire_hook_, request_id] { hook(request_id); });
  std::shared_ptr<TransferState> handle = pub->handle;
  pub->ttl_timer = ctx_.loop->PostAt(ctx_.DeadlineAfter(options.ttl), [this, request_id] {
    auto it = publications_.find(request_id);
    if (it == publications_.end()) return;
    it->second->ttl_timer = 0;
    Publication& p = *it->second;
    DecidePublication(
        p, DeadlineExceededError("publication of " + RequestName(request_id) + " expired with " +
                                 std::to_string(p.served.size()) + " of " +
                                 (p.expected < 0 ? std::string("?") : std::to_string(p.expected)) +
                                 " receivers served"));
  });
  publications_.emplace(request_id, std::move(pub));

  // Serve the pulls that arrived first.
  auto parked = parked_.find(request_id);
  if (parked != parked_.end()) {
    std::vector<Key> keys = std::move(parked->second);
    parked_.erase(parked);
    for (const Key& key : keys) {
      if (Job* job = Find(key); job != nullptr && job->state == JobState::kParked && !job->outcome) {
        if (job->deadline_timer != 0) ctx_.loop->CancelTimer(job->deadline_timer);
        job->deadline_timer = 0;
        Start(*job);
      }
    }
  }
  return std::shared_ptr<Transfer>(handle);
}

Status SenderSession::Retire(uint64_t request_id, const Status& why) {
  auto it = publications_.find(request_id);
  if (it == publications_.end()) {
    return NotFoundError("Retire: " + RequestName(request_id) + " is not published");
  }
  DecidePublication(*it->second, why);
  return Status::Ok();
}

void SenderSession::DecidePublication(Publication& pub, const Status& outcome) {
  if (pub.outcome) return;
  pub.outcome = outcome;
  if (pub.ttl_timer != 0) ctx_.loop->CancelTimer(pub.ttl_timer);
  pub.ttl_timer = 0;
  const uint64_t id = pub.request_id;
  // Every job of this request still running stops: its receiver hears
  // CANCELLED once the job's operations ended.
  std::vector<Key> keys;
  for (const auto& [key, job] : jobs_) {
    if (std::get<1>(key) == id && job->state != JobState::kParked && !job->outcome) {
      keys.push_back(key);
    }
  }
  const std::string why = "publication of " + RequestName(id) + " " +
                          (outcome.ok() ? "was served to every receiver"
                                        : "settled: " + std::string(outcome.message()));
  for (const Key& key : keys) {
    if (Job* job = Find(key); job != nullptr && !job->outcome) {
      job->retired = true;
      Finish(*job, CancelledError(why));
    }
  }
  MaybeSettlePublication(id);  // `pub` may be gone
}

void SenderSession::MaybeSettlePublication(uint64_t request_id) {
  auto it = publications_.find(request_id);
  if (it == publications_.end()) return;
  Publication& pub = *it->second;
  if (!pub.outcome || pub.readers > 0) return;
  TransferInfo info;
  info.request_id = pub.request_id;
  info.bytes = pub.bytes;
  info.writers = 1;
  info.latency = SessionContext::MetricsClock::now() - pub.published;
  std::shared_ptr<TransferState> handle = pub.handle;
  const Status outcome = *pub.outcome;
  publications_.erase(it);  // `pub` is gone
  handle->Settle(outcome, info);
}

void SenderSession::AcquireBlocks(Job& job) {
  if (job.reads_blocks) return;
  auto it = publications_.find(job.request.request_id);
  if (it == publications_.end()) return;  // unreachable: Start checked it
  ++it->second->readers;
  job.reads_blocks = true;
}

void SenderSession::ReleaseBlocks(Job& job) {
  if (!job.reads_blocks) return;
  job.reads_blocks = false;
  auto it = publications_.find(job.request.request_id);
  if (it == publications_.end()) {
    Log(LogLevel::kError, RequestName(job.request.request_id) +
                              ": a job released blocks of a publication that is gone");
    return;
  }
  --it->second->readers;
  MaybeSettlePublication(job.request.request_id);
}

void SenderSession::Unpark(const Key& key, uint64_t request_id) {
  auto it = parked_.find(request_id);
  if (it == parked_.end()) return;
  auto& list = it->second;
  list.erase(std::remove(list.begin(), list.end(), key), list.end());
  if (list.empty()) parked_.erase(it);
}

void SenderSession::OnRequest(PeerState& peer, const protocol::KvRequest& request) {
  const Key key{peer.id, request.request_id, request.slice_id};
  if (jobs_.count(key) != 0) return;  // a repeated KV_REQUEST: already being served
  auto job = std::make_unique<Job>();
  job->key = key;
  job->peer = peer.id;
  job->peer_name = peer.Describe();
  job->peer_instance = peer.instance_id;
  job->peer_rank = peer.rank;
  job->request = request;
  job->timeline.request = SessionContext::MetricsClock::now();
  // The receiver times its request out itself; the writer's copy of the
  // deadline, a grace period later, only bounds how long a pull waits here
  // for its Publish. Both terms are bounded, so the sum cannot overflow.
  const uint64_t max_ms = static_cast<uint64_t>(Config::kMaxTimeoutMs);
  job->deadline =
      ctx_.Now() + ctx_.grace +
      std::chrono::milliseconds(request.deadline_ms == protocol::kNoDeadline
                                    ? static_cast<uint64_t>(ctx_.config.transfer_timeout_ms)
                                    : std::min(request.deadline_ms, max_ms));
  Job& j = *job;
  jobs_.emplace(key, std::move(job));

  if (peer.role != Role::kGen || static_cast<int64_t>(request.receiver_rank) != peer.rank ||
      static_cast<int64_t>(request.writer_rank) != ctx_.rank) {
    Finish(j, InvalidArgumentError("KV_REQUEST from " + j.peer_name + " names receiver rank " +
                                   std::to_string(request.receiver_rank) + " and writer rank " +
                                   std::to_string(request.writer_rank) + "; this is " +
                                   ctx_.instance_id + " rank " + std::to_string(ctx_.rank)));
    return;
  }
  auto pub = publications_.find(request.request_id);
  if (pub != publications_.end() && !pub->second->outcome) {
    Start(j);
    return;
  }
  // Not published yet (or its last publication is still settling): wait
  // for a Publish until the deadline.
  parked_[request.request_id].push_back(key);
  j.deadline_timer = ctx_.loop->PostAt(j.deadline, [this, key] {
    Job* parked = Find(key);
    if (parked == nullptr || parked->state != JobState::kParked || parked->outcome) return;
    parked->deadline_timer = 0;
    Finish(*parked, DeadlineExceededError(RequestName(std::get<1>(key)) +
                                          " was not published before the pull's deadline"));
  });
}

void SenderSession::Start(Job& job) {
  auto pub_it = publications_.find(job.request.request_id);
  if (pub_it == publications_.end() || pub_it->second->outcome) {
    Finish(job, NotFoundError(RequestName(job.request.request_id) + " is not published"));
    return;
  }
  Publication& pub = *pub_it->second;
  PeerState* peer = ctx_.FindPeer(job.peer);
  if (peer == nullptr || !peer->ready()) {
    Finish(job, UnavailableError("receiver " + job.peer_name + " is gone"));
    return;
  }
  if (pub.expected < 0) {
    pub.pulling_instance = peer->instance_id;
    // A publication with state also serves the gen ranks that take only
    // state from this rank (docs/hybrid.md).
    pub.expected = static_cast<int>(
        Receivers(*ctx_.topology, ctx_.rank, *peer->topology, pub.state_slot >= 0).size());
  }
  const protocol::KvRequest& req = job.request;
  if (req.token_end > static_cast<uint64_t>(pub.num_tokens)) {
    Finish(job, OutOfRangeError("tokens [" + std::to_string(req.token_start) + ", " +
                                std::to_string(req.token_end) + ") asked, but " +
                                RequestName(req.request_id) + " was published with " +
                                std::to_string(pub.num_tokens) + " tokens"));
    return;
  }
  const bool with_state = req.state_slot != protocol::kNoStateSlot;
  if (with_state && ctx_.topology->spec().model.hybrid() &&
      ctx_.topology->Placement(ctx_.rank).num_state_layers > 0) {
    if (pub.state_slot < 0) {
      Finish(job, FailedPreconditionError(
                      "the pull asks for the recurrent state, but " + RequestName(req.request_id) +
                      " was published without a state slot (PublishOptions.state_slot)"));
      return;
    }
    if (req.token_end != static_cast<uint64_t>(pub.num_tokens)) {
      Finish(job, OutOfRangeError("the pull asks for the recurrent state with tokens [" +
                                  std::to_string(req.token_start) + ", " +
                                  std::to_string(req.token_end) + "), but the state of " +
                                  RequestName(req.request_id) + " is the one after its " +
                                  std::to_string(pub.num_tokens) +
                                  " tokens: a range with state must end there"));
      return;
    }
  }
  switch (req.path) {
    case protocol::TransferPath::kPerBlock:
      job.path = TransferPath::kPerBlock;
      job.data_path = DataPath::kPerBlock;
      break;
    case protocol::TransferPath::kBounce:
      job.path = TransferPath::kBounce;
      // The pool is registered with the transport only when it can reach
      // it (docs/cuda.md): otherwise only a gathered slot can be written.
      job.data_path = ctx_.pool_ranges.empty() ? DataPath::kStagedBounce : DataPath::kBounce;
      if (ctx_.config.bounce_gather_mapped != 0 && peer->recv_arena != nullptr &&
          peer->recv_arena->mapped_address() != Addr()) {
        // The connection's own word: a transport may map memory in general
        // but not on this connection (docs/paths.md).
        Result<TransportCaps> caps =
            ctx_.transport->PeerCapsFor(peer->id, peer->recv_arena->info().kind);
        if (caps.ok() && caps->map_remote) job.data_path = DataPath::kMappedBounce;
      }
      break;
    case protocol::TransferPath::kDirect:
      job.path = TransferPath::kDirect;
      job.data_path = DataPath::kDirect;
      break;
    case protocol::TransferPath::kDirectRead:
      job.path = TransferPath::kDirect;
      job.data_path = DataPath::kLend;
      break;
    case protocol::TransferPath::kAuto:
      Finish(job, InvalidArgumentError("KV_REQUEST path auto: the receiver must resolve it"));
      return;
  }
  std::vector<int32_t> receiver_table;
  receiver_table.reserve(req.block_table.size());
  for (size_t i = 0; i < req.block_table.size(); ++i) {
    const uint32_t id = req.block_table[i];
    if (id > static_cast<uint32_t>(std::numeric_limits<int32_t>::max())) {
      Finish(job, OutOfRangeError("receiver block table entry " + std::to_string(i) + " = " +
                                  std::to_string(id) + " is out of range"));
      return;
    }
    receiver_table.push_back(static_cast<int32_t>(id));
  }
  const PoolLayout* receiver_pool = &*peer->pool;
  const StatePoolLayout* receiver_state = peer->state_pool ? &*peer->state_pool : nullptr;
  if (job.data_path == DataPath::kDirect) {
    if (!peer->mapped_pool || (peer->state_pool && !peer->mapped_state_pool)) {
      Finish(job, UnimplementedError("the direct path needs the receiver's pool mapped here; the " +
                                     ctx_.transport->Caps().name + " transport cannot"));
      return;
    }
    receiver_pool = &*peer->mapped_pool;
    if (peer->mapped_state_pool) receiver_state = &*peer->mapped_state_pool;
  }
  job.block_table = pub.block_table;
  job.state_slot = pub.state_slot;
  const bool bounce = job.data_path == DataPath::kBounce ||
                      job.data_path == DataPath::kStagedBounce ||
                      job.data_path == DataPath::kMappedBounce;
  // The lists the copy engine copies are planned tiled when it takes them
  // (a step per block); per-block writes need the flat list.
  const bool tiled = job.data_path != DataPath::kPerBlock && ctx_.TiledCopies();
  const uint8_t lists = (bounce ? kPlanGather : kPlanDirect) | (tiled ? kPlanTiled : 0);
  PlanSide ours{ctx_.topology.get(), ctx_.rank, &*ctx_.pool, *job.block_table};
  ours.state_pool = ctx_.state_pool ? &*ctx_.state_pool : nullptr;
  ours.state_slot = pub.state_slot;
  PlanSide theirs{peer->topology.get(), peer->rank, receiver_pool, receiver_table};
  theirs.state_pool = receiver_state;
  theirs.state_slot = with_state ? static_cast<int64_t>(req.state_slot) : -1;
  Result<PairPlan> plan = PlanPair(
      ours, theirs,
      TokenRange{static_cast<int64_t>(req.token_start), static_cast<int64_t>(req.token_end)},
      lists);
  if (!plan.ok()) {
    Finish(job, plan.status().WithContext("planning " + RequestName(req.request_id) + " (" +
                                          DataPathName(job.data_path) + ")"));
    return;
  }
  job.plan = std::move(plan).value();
  if (job.plan.box.empty()) {
    Finish(job, InvalidArgumentError(ctx_.instance_id + " rank " + std::to_string(ctx_.rank) +
                                     " holds nothing " + job.peer_name + " needs"));
    return;
  }
  if (job.plan.fingerprint != req.plan_fingerprint) {
    Finish(job, DataLossError("plan fingerprint mismatch: receiver " +
                              std::to_string(req.plan_fingerprint) + ", writer " +
                              std::to_string(job.plan.fingerprint) +
                              " (the two sides disagree on layouts, placements or tokens)"));
    return;
  }
  job.tiled = tiled;
  job.fragments = bounce ? (tiled ? job.plan.tiled_gather.NumRuns() : job.plan.gather.size())
                         : (tiled ? job.plan.tiled_direct.NumRuns() : job.plan.direct.size());
  switch (job.data_path) {
    case DataPath::kPerBlock:
      StartPerBlock(job, *peer);
      return;
    case DataPath::kBounce:
    case DataPath::kStagedBounce:
    case DataPath::kMappedBounce:
      StartBounce(job, *peer);
      return;
    case DataPath::kDirect:
      StartDirect(job, *peer);
      return;
    case DataPath::kLend:
      Lend(job);
      return;
  }
}

void SenderSession::StartPerBlock(Job& job, PeerState& peer) {
  if (ctx_.pool_ranges.empty() || peer.pool_regions.empty()) {
    Finish(job, UnimplementedError(
                    "per-block: the " + ctx_.transport->Caps().name +
                    " transport cannot reach the device pool of " +
                    (ctx_.pool_ranges.empty() ? std::string("this rank") : job.peer_name)));
    return;
  }
  Result<std::vector<WriteGroup>> groups =
      GroupWrites(job.plan.direct, 0, ctx_.pool_ranges, peer.pool_regions);
  if (!groups.ok()) {
    Finish(job, groups.status().WithContext("per-block writes to " + job.peer_name));
    return;
  }
  job.groups = std::move(groups).value();
  AcquireBlocks(job);
  IssueWrites(job);
}

void SenderSession::StartBounce(Job& job, PeerState& peer) {
  if (peer.recv_arena == nullptr) {
    Finish(job, FailedPreconditionError(job.peer_name + " asked for bounce but has no recv arena"));
    return;
  }
  if (job.request.chunk_bytes > 0) {
    job.mapped = job.data_path == DataPath::kMappedBounce;
    StartStreamed(job);
    return;
  }
  if (job.request.recv_slot_size != job.plan.packed_bytes) {
    Finish(job, DataLossError("recv slot of " + std::to_string(job.request.recv_slot_size) +
                              " bytes granted for a packed stream of " +
                              std::to_string(job.plan.packed_bytes) + " bytes"));
    return;
  }
  if (job.data_path == DataPath::kMappedBounce) {
    GatherIntoMappedSlot(job, peer);
    return;
  }
  Transition(job, JobState::kReserving);
  Reserve(job);
}

void SenderSession::GatherIntoMappedSlot(Job& job, PeerState& peer) {
  Result<Addr> slot = MappedRecvAddress(peer, job.request.recv_slot_addr, job.plan.packed_bytes);
  if (!slot.ok()) {
    Finish(job, slot.status());
    return;
  }
  const RemoteRegion* arena = peer.recv_arena.get();
  CopyIntoPeer(
      job, std::span<const RemoteRegion* const>(&arena, 1),
      job.tiled ? GatherBatch(job.plan.tiled_gather, *slot) : GatherBatch(job.plan.gather, *slot),
      "gather into the mapped recv slot");
}

Result<Addr> SenderSession::MappedRecvAddress(const PeerState& peer, uint64_t addr,
                                              uint64_t bytes) const {
  const RegionInfo& arena = peer.recv_arena->info();
  const uint64_t base = arena.address.value();
  if (addr < base || addr - base > arena.size || bytes > arena.size - (addr - base)) {
    return DataLossError("recv slot [" + std::to_string(addr) + ", +" + std::to_string(bytes) +
                         ") lies outside the recv arena of " + peer.Describe());
  }
  return peer.recv_arena->mapped_address() + (addr - base);
}

void SenderSession::StartDirect(Job& job, PeerState& peer) {
  std::vector<const RemoteRegion*> regions;
  regions.reserve(peer.pool_regions.size());
  for (const std::unique_ptr<RemoteRegion>& region : peer.pool_regions) {
    regions.push_back(region.get());
  }
  CopyIntoPeer(job, regions,
               job.tiled ? DirectBatch(job.plan.tiled_direct) : DirectBatch(job.plan.direct),
               "direct copy");
}

void SenderSession::CopyIntoPeer(Job& job, std::span<const RemoteRegion* const> regions,
                                 const CopyBatch& batch, const char* what) {
  if (ctx_.copy == nullptr) {
    Finish(job, AbortedError("agent shutting down"));
    return;
  }
  // Hold a mapped access to every region the copy may touch for as long
  // as it may touch it: the receiver's deregistration (its shutdown) and
  // the connection's failure wait for it. Released by the copy's `done`
  // the moment the copy ended: on the engine thread, or here when the loop
  // copied a small batch itself (SubmitCopy).
  auto access = std::make_shared<std::vector<std::unique_ptr<MappedAccess>>>();
  access->reserve(regions.size());
  for (const RemoteRegion* region : regions) {
    Result<std::unique_ptr<MappedAccess>> a = ctx_.transport->BeginMappedAccess(*region);
    if (!a.ok()) {
      Finish(job, a.status().WithContext("mapping the memory of " + job.peer_name));
      return;
    }
    access->push_back(std::move(a).value());
  }
  Transition(job, JobState::kCopying);
  job.timeline.first_byte = SessionContext::MetricsClock::now();
  AcquireBlocks(job);
  const Key key = job.key;
  ++job.async_outstanding;
  Status submitted = ctx_.SubmitCopy(
      batch,
      [this, key, access](Status s) {
        access->clear();
        ctx_.loop->Post([this, key, s] { OnCopied(key, s); });
      },
      job.stop.get_token());
  if (!submitted.ok()) {
    --job.async_outstanding;
    access->clear();
    ReleaseBlocks(job);
    Finish(job, submitted.WithContext(what));
  }
}

void SenderSession::Lend(Job& job) {
  auto pub = publications_.find(job.request.request_id);
  if (pub == publications_.end()) {  // unreachable: Start checked it
    Finish(job, NotFoundError(RequestName(job.request.request_id) + " is not published"));
    return;
  }
  // The writer's block ids for tokens [0, token_end): what the receiver
  // needs to plan the same copy from its side.
  const int64_t per_block = ctx_.topology->spec().tokens_per_block;
  const size_t needed =
      static_cast<size_t>((static_cast<int64_t>(job.request.token_end) + per_block - 1) / per_block);
  const std::vector<int32_t>& table = *pub->second->block_table;
  if (needed > table.size()) {  // unreachable: the plan covered these tokens
    Finish(job, InternalError("the block table does not cover the tokens asked"));
    return;
  }
  protocol::KvReady ready;
  ready.request_id = job.request.request_id;
  ready.slice_id = job.request.slice_id;
  ready.writer_rank = static_cast<uint32_t>(ctx_.rank);
  ready.plan_fingerprint = job.plan.fingerprint;
  ready.state_slot =
      job.plan.state_bytes > 0 ? static_cast<uint32_t>(job.state_slot) : protocol::kNoStateSlot;
  ready.block_table.reserve(needed);
  for (size_t i = 0; i < needed; ++i) ready.block_table.push_back(static_cast<uint32_t>(table[i]));
  // Lent until the receiver's KV_READ_DONE, its cancel, the publication's
  // own outcome or the job's deadline: whichever comes first ends the loan
  // at once (a read after that copies garbage the receiver discards).
  AcquireBlocks(job);
  Transition(job, JobState::kLent);
  job.timeline.first_byte = SessionContext::MetricsClock::now();
  const Key key = job.key;
  job.deadline_timer = ctx_.loop->PostAt(job.deadline, [this, key] {
    Job* lent = Find(key);
    if (lent == nullptr || lent->state != JobState::kLent || lent->outcome) return;
    lent->deadline_timer = 0;
    Finish(*lent, DeadlineExceededError("the receiver did not finish reading " +
                                        RequestName(std::get<1>(key)) + " before its deadline"));
  });
  Status sent = ctx_.Send(job.peer, ready);
  if (!sent.ok()) Finish(job, sent.WithContext("KV_READY to " + job.peer_name));
}

void SenderSession::OnReadDone(PeerState& peer, const protocol::KvReadDone& done) {
  Job* job = Find({peer.id, done.request_id, done.slice_id});
  if (job == nullptr || job->outcome || job->state != JobState::kLent ||
      static_cast<int64_t>(done.writer_rank) != ctx_.rank) {
    // A loan that already ended (cancel, ttl, retire): its KV_RESULT said so.
    Log(LogLevel::kDebug, "KV_READ_DONE for " + RequestName(done.request_id) + " from " +
                              peer.Describe() + " ignored: no loan of it is open");
    return;
  }
  job->timeline.write_done = SessionContext::MetricsClock::now();
  if (done.status != protocol::ResultStatus::kSuccess) {
    Finish(*job, AbortedError(job->peer_name + " could not read the blocks: " + done.error_text));
    return;
  }
  if (done.bytes_read != job->plan.packed_bytes) {
    Finish(*job, DataLossError(job->peer_name + " read " + std::to_string(done.bytes_read) +
                               " bytes, the plan has " + std::to_string(job->plan.packed_bytes)));
    return;
  }
  // Still lent, so the publication held the blocks throughout the reads.
  Finish(*job, Status::Ok());
}

void SenderSession::OnCopied(Key key, const Status& status) {
  Job* job = Find(key);
  if (job == nullptr) return;
  --job->async_outstanding;
  job->timeline.write_done = SessionContext::MetricsClock::now();
  ReleaseBlocks(*job);
  job = Find(key);
  if (job == nullptr) return;
  Finish(*job, status.ok() ? Status::Ok()
                           : status.WithContext(job->data_path == DataPath::kDirect
                                                    ? "direct copy"
                                                    : "gather into the mapped recv slot"));
  if (Job* j = Find(key); j != nullptr) MaybeReport(*j);
}

void SenderSession::Reserve(Job& job) {
  if (ctx_.send_arena == nullptr) {
    WithoutSendSlot(job, "no send arena");
    return;
  }
  if (ctx_.copy == nullptr) {
    Finish(job, AbortedError("agent shutting down"));
    return;
  }
  Result<Slot> slot = ctx_.send_arena->TryReserve(job.plan.packed_bytes);
  if (slot.ok()) {
    if (job.reserve_timer != 0) ctx_.loop->CancelTimer(job.reserve_timer);
    job.reserve_timer = 0;
    job.send_slot = std::move(slot).value();
    job.timeline.reserve = SessionContext::MetricsClock::now();
    Transition(job, JobState::kGathering);
    AcquireBlocks(job);
    const Key key = job.key;
    ++job.async_outstanding;
    Status submitted = ctx_.SubmitCopy(
        job.tiled ? GatherBatch(job.plan.tiled_gather, job.send_slot.address())
                  : GatherBatch(job.plan.gather, job.send_slot.address()),
        [this, key](Status s) { ctx_.loop->Post([this, key, s] { OnGathered(key, s); }); },
        job.stop.get_token());
    if (!submitted.ok()) {
      --job.async_outstanding;
      job.send_slot.Release();
      ReleaseBlocks(job);
      Finish(job, submitted.WithContext("gather"));
    }
    return;
  }
  if (slot.status().code() == StatusCode::kResourceExhausted) {
    if (job.reserve_timer == 0) {
      const Key key = job.key;
      reserve_waiters_.Add(key);
      job.reserve_timer =
          ctx_.loop->PostAt(ctx_.Now() + std::chrono::milliseconds(ctx_.config.reserve_timeout_ms),
                            [this, key] { OnReserveTimeout(key); });
    }
    return;
  }
  if (slot.status().code() == StatusCode::kOutOfRange) {
    StartStream(job);
    return;
  }
  Finish(job, slot.status().WithContext("reserving a send slot"));
}

uint64_t SenderSession::LaneBytes(uint64_t capacity) {
  // A quarter of the arena, two lanes: half the arena at most, so that
  // other streams still find room.
  return std::max<uint64_t>(capacity / 4, std::min<uint64_t>(capacity, KiB(64)));
}

void SenderSession::StartStream(Job& job) {
  job.lane_bytes = LaneBytes(ctx_.send_arena->capacity());
  Result<Slot> first = ctx_.send_arena->TryReserve(job.lane_bytes);
  if (!first.ok()) {  // the arena is busy: not even one lane fits now
    WithoutSendSlot(job, "request larger than send arena");
    return;
  }
  job.lanes[0].slot = std::move(first).value();
  PrepareSlicing(job);
  // The whole stream, unit by unit, into the recv slot at its offsets.
  for (uint64_t begin = 0; begin < job.plan.packed_bytes; begin += job.lane_bytes) {
    job.units.push_back(Job::Unit{begin, std::min(begin + job.lane_bytes, job.plan.packed_bytes),
                                  Addr(job.request.recv_slot_addr + begin), Job::kNoChunk});
  }
  job.streaming = true;
  if (job.reserve_timer != 0) ctx_.loop->CancelTimer(job.reserve_timer);
  job.reserve_timer = 0;
  job.timeline.reserve = SessionContext::MetricsClock::now();
  Transition(job, JobState::kGathering);
  AcquireBlocks(job);
  const Key key = job.key;
  PumpLanes(job);
  if (Job* j = Find(key); j != nullptr) EndStreamIfIdle(*j);
}

void SenderSession::StartStreamed(Job& job) {
  if ((ctx_.send_arena == nullptr && !job.mapped) || ctx_.copy == nullptr) {
    Finish(job, ctx_.copy == nullptr
                    ? AbortedError("agent shutting down")
                    : FailedPreconditionError(job.peer_name +
                                              " asked for a streamed bounce, but this rank has "
                                              "no send arena"));
    return;
  }
  Result<ChunkCut> cut = ChunkCut::Create(job.plan.packed_bytes, job.request.chunk_bytes);
  if (!cut.ok()) {
    Finish(job, cut.status().WithContext("streamed bounce"));
    return;
  }
  job.cut = *cut;
  job.streamed = true;
  job.streaming = true;
  // Gathered straight into the mapped slot, a chunk needs no lane slot:
  // one unit per chunk.
  job.lane_bytes = job.mapped
                       ? job.request.chunk_bytes
                       : std::min(job.request.chunk_bytes, LaneBytes(ctx_.send_arena->capacity()));
  PrepareSlicing(job);
  job.timeline.reserve = SessionContext::MetricsClock::now();
  Transition(job, JobState::kReserving);  // until the first grant's gather
  AcquireBlocks(job);
  const Key key = job.key;
  std::vector<protocol::KvGrant> early = std::move(job.early_grants);
  for (const protocol::KvGrant& grant : early) {
    Job* j = Find(key);
    if (j == nullptr || j->outcome) return;
    AcceptGrant(*j, grant);
  }
  if (Job* j = Find(key); j != nullptr) EndStreamIfIdle(*j);
}

void SenderSession::OnGrant(PeerState& peer, const protocol::KvGrant& grant) {
  Job* job = Find({peer.id, grant.request_id, grant.slice_id});
  if (job == nullptr || job->outcome) {
    // The job ended (its KV_RESULT tells the receiver): nothing to write.
    Log(LogLevel::kDebug, "KV_GRANT for " + RequestName(grant.request_id) + " from " +
                              peer.Describe() + " ignored: no job of it is running");
    return;
  }
  if (static_cast<int64_t>(grant.writer_rank) != ctx_.rank) {
    Finish(*job, InvalidArgumentError("KV_GRANT from " + job->peer_name + " names writer rank " +
                                      std::to_string(grant.writer_rank) + "; this is rank " +
                                      std::to_string(ctx_.rank)));
    return;
  }
  if (!job->streamed) {
    if (job->state == JobState::kParked && job->request.chunk_bytes > 0 &&
        job->early_grants.size() < (uint64_t{1} << 16)) {
      job->early_grants.push_back(grant);  // before Publish: kept for the start
      return;
    }
    Finish(*job, DataLossError("KV_GRANT from " + job->peer_name + " for " +
                               RequestName(grant.request_id) + ", which is not streamed"));
    return;
  }
  AcceptGrant(*job, grant);
}

void SenderSession::AcceptGrant(Job& job, const protocol::KvGrant& grant) {
  const ChunkCut& cut = *job.cut;
  const uint64_t k = grant.chunk;
  const std::string what = "KV_GRANT of chunk " + std::to_string(k) + " from " + job.peer_name;
  if (k >= cut.num_chunks()) {
    Finish(job, DataLossError(what + ": the stream has " + std::to_string(cut.num_chunks()) +
                              " chunks"));
    return;
  }
  if (grant.slot_size != cut.size(k)) {
    Finish(job, DataLossError(what + ": a slot of " + std::to_string(grant.slot_size) +
                              " bytes for a chunk of " + std::to_string(cut.size(k))));
    return;
  }
  if (!job.granted.insert(k).second) {
    Finish(job, DataLossError(what + ": granted twice"));
    return;
  }
  job.granted_at[k] = SessionContext::MetricsClock::now();
  uint64_t units = 0;
  for (uint64_t begin = cut.begin(k); begin < cut.end(k); begin += job.lane_bytes) {
    job.units.push_back(Job::Unit{begin, std::min(begin + job.lane_bytes, cut.end(k)),
                                  Addr(grant.slot_addr + (begin - cut.begin(k))), k});
    ++units;
  }
  job.units_left[k] = units;
  const Key key = job.key;
  PumpLanes(job);
  if (Job* j = Find(key); j != nullptr) EndStreamIfIdle(*j);
}

void SenderSession::PumpLanes(Job& job) {
  const Key key = job.key;
  for (size_t i = 0; i < job.lanes.size(); ++i) {
    Job* j = Find(key);
    if (j == nullptr || j->units.empty() || j->outcome || !j->write_error.ok()) break;
    Job::Lane& lane = j->lanes[i];
    if (lane.busy) continue;
    if (!j->mapped && !lane.slot.valid()) {
      Result<Slot> slot = ctx_.send_arena->TryReserve(j->lane_bytes);
      if (!slot.ok()) {
        const bool holds_lane = std::any_of(j->lanes.begin(), j->lanes.end(),
                                            [](const Job::Lane& l) { return l.slot.valid(); });
        if (!holds_lane && !j->lane_waiting) {
          // Not even one lane: wait for the arena (lanes are held only by
          // jobs with units to move, so one frees up without waiting on
          // anything else).
          j->lane_waiting = true;
          reserve_waiters_.Add(key);
        }
        break;
      }
      lane.slot = std::move(slot).value();
    }
    if (j->lane_waiting) {
      j->lane_waiting = false;
      reserve_waiters_.Remove(key);
    }
    GatherUnit(*j, i);
  }
}

void SenderSession::PrepareSlicing(Job& job) {
  job.slice_tiled =
      job.tiled && TiledInPackedOrder(job.plan.tiled_gather, PackedSide::kDestination);
  if (job.slice_tiled) return;
  if (job.tiled && job.plan.gather.empty()) job.plan.tiled_gather.ExpandTo(&job.plan.gather);
  OrderForSlicing(job.plan.gather, PackedSide::kDestination);
}

void SenderSession::GatherUnit(Job& job, size_t lane_index) {
  Job::Lane& lane = job.lanes[lane_index];
  lane.unit = job.units.front();
  job.units.pop_front();
  lane.busy = true;
  lane.list.clear();
  if (job.state == JobState::kReserving) Transition(job, JobState::kGathering);
  Status status = job.slice_tiled ? SliceTiledChunk(job.plan.tiled_gather, PackedSide::kDestination,
                                                    lane.unit.begin, lane.unit.end, &lane.tiled)
                                  : SliceChunk(job.plan.gather, PackedSide::kDestination,
                                               lane.unit.begin, lane.unit.end, &lane.list);
  // Straight into the mapped recv slot, under a MappedAccess of the arena
  // until the copy ended (see CopyIntoPeer); else into the lane's slot.
  Addr dst = lane.slot.address();
  auto access = std::make_shared<std::unique_ptr<MappedAccess>>();
  if (status.ok() && job.mapped) {
    PeerState* peer = ctx_.FindPeer(job.peer);
    if (peer == nullptr || !peer->ready()) {
      status = UnavailableError("receiver " + job.peer_name + " is gone");
    } else {
      Result<Addr> mapped =
          MappedRecvAddress(*peer, lane.unit.dst.value(), lane.unit.end - lane.unit.begin);
      Result<std::unique_ptr<MappedAccess>> a =
          mapped.ok() ? ctx_.transport->BeginMappedAccess(*peer->recv_arena)
                      : Result<std::unique_ptr<MappedAccess>>(mapped.status());
      if (a.ok()) {
        dst = *mapped;
        *access = std::move(a).value();
      } else {
        status = a.status();
      }
    }
  }
  if (status.ok()) {
    const Key key = job.key;
    ++job.async_outstanding;
    ++job.gathers_outstanding;
    status = ctx_.SubmitCopy(
        job.slice_tiled ? GatherBatch(lane.tiled, dst) : GatherBatch(lane.list, dst),
        [this, key, lane_index, access](Status st) {
          access->reset();
          ctx_.loop->Post([this, key, lane_index, st] { OnUnitGathered(key, lane_index, st); });
        },
        job.stop.get_token());
    if (status.ok()) return;
    access->reset();
    --job.async_outstanding;
    --job.gathers_outstanding;
  }
  lane.busy = false;
  job.write_error = status.WithContext("gather of bytes [" + std::to_string(lane.unit.begin) +
                                       ", " + std::to_string(lane.unit.end) + ")");
  job.stop.request_stop();
}

void SenderSession::OnUnitGathered(Key key, size_t lane_index, const Status& status) {
  Job* job = Find(key);
  if (job == nullptr) return;
  --job->async_outstanding;
  --job->gathers_outstanding;
  Job::Lane& lane = job->lanes[lane_index];
  if (!status.ok() && job->write_error.ok()) {
    job->write_error = status.WithContext("gather of bytes [" + std::to_string(lane.unit.begin) +
                                          ", " + std::to_string(lane.unit.end) + ")");
    job->stop.request_stop();
  }
  PeerState* peer = ctx_.FindPeer(job->peer);
  if (!job->outcome && job->write_error.ok() && (peer == nullptr || !peer->ready())) {
    job->write_error = UnavailableError("receiver " + job->peer_name + " is gone");
    job->stop.request_stop();
  }
  if (job->outcome || !job->write_error.ok()) {
    lane.busy = false;
    EndStreamIfIdle(*job);
    return;
  }
  if (job->state != JobState::kWriting) {
    Transition(*job, JobState::kWriting);
    job->timeline.first_byte = SessionContext::MetricsClock::now();
  }
  if (job->mapped) {
    // Gathered into the receiver's slot: the unit has landed.
    ++job->async_outstanding;
    OnUnitWritten(key, lane_index, Status::Ok());
    return;
  }
  lane.write = {WriteOp{lane.slot.address(), lane.unit.dst, lane.unit.end - lane.unit.begin}};
  ++job->async_outstanding;
  Status issued = ctx_.transport->Write(
      *ctx_.send_region, *peer->recv_arena, lane.write,
      [this, key, lane_index](Status s) {
        ctx_.loop->Post([this, key, lane_index, s] { OnUnitWritten(key, lane_index, s); });
      },
      job->stop.get_token());
  if (issued.ok()) {
    job->wrote = true;
    ++job->transport_writes;
  } else {
    --job->async_outstanding;
    lane.busy = false;
    job->write_error =
        issued.WithContext("write of bytes [" + std::to_string(lane.unit.begin) + ", " +
                           std::to_string(lane.unit.end) + ") to " + job->peer_name);
    job->stop.request_stop();
  }
  // The lane that gathered may take the next unit while this one is written.
  PumpLanes(*job);
  if (Job* j = Find(key); j != nullptr) EndStreamIfIdle(*j);
}

void SenderSession::OnUnitWritten(Key key, size_t lane_index, const Status& status) {
  Job* job = Find(key);
  if (job == nullptr) return;
  --job->async_outstanding;
  Job::Lane& lane = job->lanes[lane_index];
  lane.busy = false;
  if (!status.ok() && job->write_error.ok()) {
    job->write_error =
        status.WithContext("write of bytes [" + std::to_string(lane.unit.begin) + ", " +
                           std::to_string(lane.unit.end) + ") to " + job->peer_name);
    job->stop.request_stop();
  }
  if (status.ok() && lane.unit.chunk != Job::kNoChunk && !job->outcome && job->write_error.ok()) {
    auto left = job->units_left.find(lane.unit.chunk);
    if (left != job->units_left.end() && --left->second == 0) {
      const uint64_t chunk = lane.unit.chunk;
      job->units_left.erase(left);
      AnnounceChunk(*job, chunk);
      job = Find(key);
      if (job == nullptr) return;
    }
  }
  PumpLanes(*job);
  if (Job* j = Find(key); j != nullptr) EndStreamIfIdle(*j);
}

void SenderSession::AnnounceChunk(Job& job, uint64_t chunk) {
  // KV_CHUNK only once the chunk's bytes are visible at the receiver: a
  // flush proves it, unless the transport's writes land before they report.
  const Key key = job.key;
  ++job.async_outstanding;
  if (ctx_.writes_land_at_completion || job.mapped) {
    OnChunkFlushed(key, chunk, Status::Ok());  // counts it back down
    return;
  }
  Status flushing = ctx_.transport->Flush(job.peer, [this, key, chunk](Status s) {
    ctx_.loop->Post([this, key, chunk, s] { OnChunkFlushed(key, chunk, s); });
  });
  if (!flushing.ok()) OnChunkFlushed(key, chunk, flushing);  // counts it back down
}

void SenderSession::OnChunkFlushed(Key key, uint64_t chunk, const Status& status) {
  Job* job = Find(key);
  if (job == nullptr) return;
  if (job->async_outstanding > 0) --job->async_outstanding;
  if (!status.ok()) {
    // Nothing proves the chunk landed or stopped landing: say nothing more
    // and let the transport's fence speak (as a failed final flush does).
    const Status why =
        status.WithContext("flush of chunk " + std::to_string(chunk) + " to " + job->peer_name);
    if (job->write_error.ok()) job->write_error = why;
    job->silent = true;
    job->stop.request_stop();
    PeerState* peer = ctx_.FindPeer(job->peer);
    if (peer != nullptr && !peer->dead) ctx_.transport->Disconnect(job->peer, why);
  } else if (!job->outcome && job->write_error.ok()) {
    protocol::KvChunk msg;
    msg.request_id = job->request.request_id;
    msg.slice_id = job->request.slice_id;
    msg.writer_rank = static_cast<uint32_t>(ctx_.rank);
    msg.chunk = chunk;
    msg.bytes = job->cut->size(chunk);
    Status sent = ctx_.Send(job->peer, msg);
    if (sent.ok()) {
      ++job->chunks_announced;
      ctx_.metrics->Count(Counter::kChunksWritten);
      if (auto at = job->granted_at.find(chunk); at != job->granted_at.end()) {
        job->chunk_writer_time += SessionContext::MetricsClock::now() - at->second;
        job->granted_at.erase(at);
      }
    } else {
      job->write_error = sent.WithContext("KV_CHUNK to " + job->peer_name);
      job->stop.request_stop();
    }
  }
  if (Job* j = Find(key); j != nullptr) EndStreamIfIdle(*j);
}

void SenderSession::EndStreamIfIdle(Job& job) {
  if (!job.streaming || job.async_outstanding > 0) return;
  const bool stopped = job.outcome.has_value() || !job.write_error.ok();
  const bool complete =
      job.streamed ? job.chunks_announced == job.cut->num_chunks() : job.units.empty();
  const Key key = job.key;
  bool released = false;
  for (Job::Lane& lane : job.lanes) {
    // A lane with nothing to move holds no arena bytes.
    if (lane.slot.valid() && (stopped || complete || job.units.empty())) {
      lane.slot.Release();
      released = true;
    }
  }
  if (released) RetryReservations();
  Job* j = Find(key);
  if (j == nullptr || !(stopped || complete)) return;
  // Every unit gathered (or stopped): the pool is read no more.
  if (j->lane_waiting) {
    j->lane_waiting = false;
    reserve_waiters_.Remove(key);
  }
  j->streaming = false;
  ReleaseBlocks(*j);
  j = Find(key);
  if (j == nullptr) return;
  j->timeline.write_done = SessionContext::MetricsClock::now();
  if (j->outcome) {
    MaybeReport(*j);
    return;
  }
  Finish(*j, j->write_error);
}

void SenderSession::OnReserveTimeout(Key key) {
  Job* job = Find(key);
  if (job == nullptr || job->state != JobState::kReserving || job->outcome) return;
  job->reserve_timer = 0;
  reserve_waiters_.Remove(key);
  WithoutSendSlot(*job, "send arena backpressure");
}

void SenderSession::RetryReservations() {
  reserve_waiters_.Retry([this](const Key& key) {
    Job* job = Find(key);
    if (job == nullptr || job->outcome) return false;
    if (job->streaming) {  // waits for a first lane
      if (!job->lane_waiting) return false;
      PumpLanes(*job);
      job = Find(key);
      if (job != nullptr) EndStreamIfIdle(*job);
      job = Find(key);
      return job != nullptr && job->lane_waiting && !job->outcome;
    }
    if (job->state != JobState::kReserving) return false;
    Reserve(*job);
    job = Find(key);
    return job != nullptr && job->state == JobState::kReserving && !job->outcome;
  });
}

void SenderSession::WithoutSendSlot(Job& job, const std::string& reason) {
  job.fallback_reason = reason;
  if (job.data_path == DataPath::kStagedBounce) {
    // The pool is device memory the transport cannot reach: only a
    // gathered send slot can be written (docs/cuda.md).
    Finish(job, (reason == "request larger than send arena" ? OutOfRangeError(reason)
                                                            : ResourceExhaustedError(reason))
                    .WithContext("the " + ctx_.transport->Caps().name +
                                 " transport cannot write from the device pool"));
    return;
  }
  WriteFromPool(job, reason);
}

void SenderSession::WriteFromPool(Job& job, const std::string& reason) {
  // The gather runs become writes from the pool into the recv slot: the
  // receiver's packed stream, and so its scatter, are the same.
  job.fallback_reason = reason;
  job.timeline.reserve = SessionContext::MetricsClock::now();
  PeerState* peer = ctx_.FindPeer(job.peer);
  if (peer == nullptr || !peer->ready()) {
    Finish(job, UnavailableError("receiver " + job.peer_name + " is gone"));
    return;
  }
  if (job.tiled && job.plan.gather.empty()) job.plan.tiled_gather.ExpandTo(&job.plan.gather);
  Result<std::vector<WriteGroup>> groups =
      GroupWrites(job.plan.gather, job.request.recv_slot_addr, ctx_.pool_ranges,
                  std::span<const std::unique_ptr<RemoteRegion>>(&peer->recv_arena, 1));
  if (!groups.ok()) {
    Finish(job, groups.status().WithContext("writes into the recv slot of " + job.peer_name));
    return;
  }
  job.groups = std::move(groups).value();
  AcquireBlocks(job);
  IssueWrites(job);
}

void SenderSession::OnGathered(Key key, const Status& status) {
  Job* job = Find(key);
  if (job == nullptr) return;
  --job->async_outstanding;
  // The pool has been read: the send slot holds the packed stream now.
  ReleaseBlocks(*job);
  job = Find(key);
  if (job == nullptr) return;
  if (job->outcome) {  // stopped meanwhile (cancel, retire, peer gone)
    job->send_slot.Release();
    RetryReservations();
    if (Job* j = Find(key); j != nullptr) MaybeReport(*j);
    return;
  }
  if (!status.ok()) {
    job->send_slot.Release();
    RetryReservations();
    if (Job* j = Find(key); j != nullptr) Finish(*j, status.WithContext("gather"));
    return;
  }
  PeerState* peer = ctx_.FindPeer(job->peer);
  if (peer == nullptr || !peer->ready()) {
    job->send_slot.Release();
    RetryReservations();
    if (Job* j = Find(key); j != nullptr) {
      Finish(*j, UnavailableError("receiver " + j->peer_name + " is gone"));
    }
    return;
  }
  WriteGroup group{ctx_.send_region, peer->recv_arena.get(), {}};
  group.ops.push_back(
      WriteOp{job->send_slot.address(), Addr(job->request.recv_slot_addr), job->plan.packed_bytes});
  job->groups.clear();
  job->groups.push_back(std::move(group));
  IssueWrites(*job);
}

void SenderSession::IssueWrites(Job& job) {
  Transition(job, JobState::kWriting);
  job.timeline.first_byte = SessionContext::MetricsClock::now();
  const Key key = job.key;
  for (const WriteGroup& g : job.groups) {
    ++job.async_outstanding;
    Status issued = ctx_.transport->Write(
        *g.source, *g.target, g.ops,
        [this, key](Status s) { ctx_.loop->Post([this, key, s] { OnWriteDone(key, s); }); },
        job.stop.get_token());
    if (issued.ok()) {
      job.wrote = true;
      job.transport_writes += g.ops.size();
    } else {
      --job.async_outstanding;
      if (job.write_error.ok()) job.write_error = issued.WithContext("write to " + job.peer_name);
      break;
    }
  }
  if (job.async_outstanding == 0) OnWritesDone(job);
}

void SenderSession::OnWriteDone(Key key, const Status& status) {
  Job* job = Find(key);
  if (job == nullptr) return;
  if (job->async_outstanding > 0) --job->async_outstanding;
  if (!status.ok() && job->write_error.ok()) {
    job->write_error = status.WithContext("write to " + job->peer_name);
  }
  if (job->async_outstanding > 0) return;
  OnWritesDone(*job);
}

void SenderSession::OnWritesDone(Job& job) {
  // Every write completed or failed: the send slot is free again and the
  // pool is no longer read.
  const Key key = job.key;
  job.timeline.write_done = SessionContext::MetricsClock::now();
  if (job.send_slot.valid()) {
    job.send_slot.Release();
    RetryReservations();
  }
  if (Job* j = Find(key); j != nullptr) ReleaseBlocks(*j);
  Job* j = Find(key);
  if (j == nullptr) return;
  Finish(*j, j->write_error);
  if (Job* again = Find(key); again != nullptr) MaybeReport(*again);
}

void SenderSession::Finish(Job& job, const Status& status) {
  if (job.outcome) return;
  job.outcome = status;
  job.timeline.complete = SessionContext::MetricsClock::now();
  if (job.deadline_timer != 0) ctx_.loop->CancelTimer(job.deadline_timer);
  if (job.reserve_timer != 0) ctx_.loop->CancelTimer(job.reserve_timer);
  job.deadline_timer = job.reserve_timer = 0;
  if (job.state == JobState::kParked) Unpark(job.key, job.request.request_id);
  if (job.state == JobState::kReserving || job.lane_waiting) reserve_waiters_.Remove(job.key);
  job.lane_waiting = false;
  if (job.async_outstanding > 0) {
    // Its operations end at their next grain; their completions report it.
    job.stop.request_stop();
    return;
  }
  MaybeReport(job);
}

void SenderSession::MaybeReport(Job& job) {
  if (!job.outcome || job.async_outstanding > 0 || job.state == JobState::kDone) return;
  PeerState* peer = ctx_.FindPeer(job.peer);
  const bool alive = peer != nullptr && !peer->dead;
  if (job.wrote && !job.flushed && alive && ctx_.writes_land_at_completion) {
    // Every write reported, so every byte landed (or never will): nothing
    // to flush.
    job.flushed = true;
  }
  if (job.wrote && !job.flushed && alive) {
    // Whatever the outcome, the receiver may reuse its memory once it hears
    // from us: every write must be visible (or known dead) first.
    Transition(job, JobState::kFlushing);
    const Key key = job.key;
    ++job.async_outstanding;
    Status flushing = ctx_.transport->Flush(job.peer, [this, key](Status s) {
      ctx_.loop->Post([this, key, s] { OnFlushed(key, s); });
    });
    if (flushing.ok()) return;
    --job.async_outstanding;
    OnFlushed(key, flushing);
    return;
  }
  Report(job);
}

void SenderSession::OnFlushed(Key key, const Status& status) {
  Job* job = Find(key);
  if (job == nullptr) return;
  if (job->async_outstanding > 0) --job->async_outstanding;
  job->flushed = true;
  if (!status.ok()) {
    // Without a completed flush nothing proves the writes landed or
    // stopped: say nothing and let the transport's fence speak for us.
    const Status why = status.WithContext("flush to " + job->peer_name);
    if (job->outcome->ok()) job->outcome = why;
    job->silent = true;
    PeerState* peer = ctx_.FindPeer(job->peer);
    if (peer != nullptr && !peer->dead) ctx_.transport->Disconnect(job->peer, why);
  }
  job->timeline.write_done = SessionContext::MetricsClock::now();
  Report(*job);
}

void SenderSession::Report(Job& job) {
  Transition(job, JobState::kDone);
  // What the receiver hears: a job cancelled or retired reports CANCELLED
  // even when its writes went through (nobody may rely on them).
  Status outcome = *job.outcome;
  if (job.retired && outcome.ok()) {
    outcome = CancelledError("publication of " + RequestName(job.request.request_id) +
                             " settled before the job reported");
  }
  protocol::KvResult result;
  result.request_id = job.request.request_id;
  result.slice_id = job.request.slice_id;
  result.writer_rank = static_cast<uint32_t>(ctx_.rank);
  result.plan_fingerprint = job.plan.fingerprint;
  if (outcome.ok()) {
    result.status = protocol::ResultStatus::kSuccess;
    result.error_code = 0;
    result.bytes_written = job.plan.packed_bytes;
  } else {
    result.status = outcome.code() == StatusCode::kCancelled ? protocol::ResultStatus::kCancelled
                                                             : protocol::ResultStatus::kFailed;
    result.error_code = ToWireErrorCode(outcome.code());
    std::string text(outcome.message());
    if (text.size() > protocol::kMaxErrorTextBytes) text.resize(protocol::kMaxErrorTextBytes);
    result.error_text = text;
  }
  // Recorded before the peer hears of it: whoever sees the result sees the
  // job finished in this agent's metrics.
  RequestRecord rec;
  rec.request_id = job.request.request_id;
  rec.side = Side::kSender;
  rec.rank = ctx_.rank;
  rec.instance = ctx_.instance_id;
  rec.peer_instance = job.peer_instance;
  rec.path_requested = job.path;
  rec.path_taken = job.path;
  rec.fallback_reason = job.fallback_reason;
  rec.bytes = job.plan.packed_bytes;
  rec.fragments = job.fragments;
  rec.transport_writes = job.transport_writes;
  rec.writers = 1;
  rec.outcome = OutcomeOf(outcome);
  rec.error = std::string(outcome.message());
  rec.timeline = job.timeline;
  rec.chunks = job.chunks_announced;
  rec.chunk_writer_us = std::chrono::duration<double, std::micro>(job.chunk_writer_time).count();
  ctx_.metrics->Aggregate(rec);

  PeerState* peer = ctx_.FindPeer(job.peer);
  if (!job.silent && peer != nullptr && !peer->dead) {
    Status sent = ctx_.Send(job.peer, result);
    if (!sent.ok()) {
      // A connection that just died is ordinary (its failure is on its way
      // to the loop); anything else is worth a warning.
      Log(sent.code() == StatusCode::kUnavailable ? LogLevel::kDebug : LogLevel::kWarning,
          "KV_RESULT for " + RequestName(job.request.request_id) + " to " + job.peer_name +
              " not sent: " + sent.ToString());
    }
  }
  // The perf log's line once the KV_RESULT is out: its write(2) is not on
  // the request's path.
  ctx_.metrics->WriteToPerfLog(rec);

  const uint64_t request_id = job.request.request_id;
  const bool had_slot =
      job.send_slot.valid() || std::any_of(job.lanes.begin(), job.lanes.end(),
                                           [](const Job::Lane& l) { return l.slot.valid(); });
  const std::string peer_instance = job.peer_instance;
  const int peer_rank = job.peer_rank;
  const uint64_t bytes = job.plan.packed_bytes;
  ReleaseBlocks(job);  // normally released already; never leak a reader
  jobs_.erase(job.key);  // `job` is gone
  if (had_slot) RetryReservations();

  if (outcome.ok()) {
    auto it = publications_.find(request_id);
    if (it != publications_.end() && !it->second->outcome) {
      Publication& pub = *it->second;
      pub.served.insert({peer_instance, peer_rank});
      pub.bytes += bytes;
      if (peer_instance == pub.pulling_instance &&
          static_cast<int>(pub.served.size()) >= pub.expected) {
        DecidePublication(pub, Status::Ok());
      }
    }
  }
}

void SenderSession::OnCancel(PeerState& peer, const protocol::Cancel& cancel) {
  ctx_.metrics->Count(Counter::kCancelsReceived);
  std::vector<Key> keys;
  for (const auto& [key, job] : jobs_) {
    if (std::get<0>(key) == peer.id && std::get<1>(key) == cancel.request_id) keys.push_back(key);
  }
  for (const Key& key : keys) {
    Job* job = Find(key);
    if (job == nullptr || job->outcome) continue;
    Finish(*job, CancelledError("cancelled by " + job->peer_name + ": " + cancel.reason));
  }
}

void SenderSession::OnPeerFailure(PeerState& peer) {
  std::vector<Key> keys;
  for (const auto& [key, job] : jobs_) {
    if (std::get<0>(key) == peer.id) keys.push_back(key);
  }
  for (const Key& key : keys) {
    Job* job = Find(key);
    if (job == nullptr || job->outcome) continue;
    // Writes in the air fail at the transport and come back through
    // OnWriteDone; nothing is sent to a dead peer.
    Finish(*job, UnavailableError("receiver " + job->peer_name +
                                  " lost: " + std::string(peer.death.message())));
  }
}

void SenderSession::AbortAll(const Status& why) {
  std::vector<uint64_t> ids;
  for (const auto& [id, pub] : publications_) ids.push_back(id);
  for (uint64_t id : ids) {
    auto it = publications_.find(id);
    if (it != publications_.end()) DecidePublication(*it->second, why);
  }
  std::vector<Key> keys;
  for (const auto& [key, job] : jobs_) keys.push_back(key);
  for (const Key& key : keys) {
    if (Job* job = Find(key); job != nullptr && !job->outcome) Finish(*job, why);
  }
  parked_.clear();
  reserve_waiters_.Clear();
}

void SenderSession::Abandon(const Status& why) {
  AbortAll(why);
  std::vector<Key> keys;
  for (const auto& [key, job] : jobs_) keys.push_back(key);
  for (const Key& key : keys) {
    Job* job = Find(key);
    if (job == nullptr) continue;
    if (job->async_outstanding > 0) {
      // The transport and the copy engine have stopped and every completion
      // they owed has run: nothing can still be in flight.
      Log(LogLevel::kError, RequestName(job->request.request_id) + ": " +
                                std::to_string(job->async_outstanding) +
                                " operations unaccounted for at shutdown");
      job->async_outstanding = 0;
    }
    job->wrote = false;  // the transport is down: there is nobody to flush to
    job->silent = true;
    ReleaseBlocks(*job);
    if (Job* j = Find(key); j != nullptr) MaybeReport(*j);
  }
  std::vector<uint64_t> ids;
  for (const auto& [id, pub] : publications_) ids.push_back(id);
  for (uint64_t id : ids) {
    auto it = publications_.find(id);
    if (it == publications_.end()) continue;
    it->second->readers = 0;
    MaybeSettlePublication(id);
  }
}

}  // namespace kvbounce
