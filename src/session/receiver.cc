#include "session/receiver.h"

#include <algorithm>
#include <limits>
#include <list>
#include <string>
#include <utility>

#include "kvbounce/logging.h"
#include "layout/chunking.h"
#include "session/path_choice.h"

namespace kvbounce {

// Streaming: one chunk slot granted to a writer, until its chunk was
// scattered (or the writer can no longer write it).
struct ReceiverSession::ChunkSlot {
  uint64_t chunk = 0;
  Slot slot;
  bool landed = false;      // KV_CHUNK arrived: written and flushed
  bool scattering = false;  // its scatter is in the copy engine
  FragmentList list;        // the chunk's part of the scatter list
  TiledList tiled;          // the same, tiled (Writer::scatter_tiled)
  // When the grant went out and when the KV_CHUNK came (RequestRecord::chunk_*).
  SessionContext::MetricsClock::time_point granted_at{};
  SessionContext::MetricsClock::time_point landed_at{};
};

struct ReceiverSession::Writer {
  int rank = 0;
  PeerId peer = 0;
  std::string name;  // "ctx0 rank 3", for messages
  uint64_t bytes = 0;
  uint64_t state_bytes = 0;  // of `bytes`
  uint64_t fingerprint = 0;
  // The scatter list (built on the bounce path only, scatter_planned), in
  // tiled form for an engine that takes it (SessionContext::TiledCopies).
  FragmentList scatter;
  TiledList tiled_scatter;
  bool scatter_tiled = false;
  bool scatter_planned = false;
  WriterState state = WriterState::kPending;
  Status error;
  // Direct read: this rank copies the writer's blocks (KV_READY) itself,
  // with its own copy engine from the writer's pool mapped here
  // (`mapped_read`: TransportCaps::map_remote_read) or through
  // Transport::Read.
  bool reads = false;
  bool mapped_read = false;
  bool ready_seen = false;
  bool read_complete = false;  // every read landed and KV_READ_DONE went out
  int reads_outstanding = 0;   // read batches in the transport
  Status read_error;
  std::stop_source read_stop;
  // Streaming: the writer's chunk cut, the next chunk to grant, the chunks
  // scattered, the chunk slots granted and not yet scattered (at most
  // kWindowPerWriter; a list, so that a slot's scatter list stays put), and
  // since when it has waited idle for a credit.
  std::optional<ChunkCut> cut;
  uint64_t next_grant = 0;
  uint64_t chunks_scattered = 0;
  std::list<ChunkSlot> chunk_slots;
  SessionContext::MetricsClock::time_point stall_since{};
};

struct ReceiverSession::Request {
  Key key;
  std::shared_ptr<TransferState> handle;
  std::string ctx_instance;
  TokenRange tokens;
  std::vector<int32_t> block_table;
  // Hybrid models: this rank's state slot the state lands in; -1: KV only.
  int64_t state_slot = -1;
  uint64_t state_bytes = 0;
  TransferPath requested = TransferPath::kAuto;
  TransferPath path = TransferPath::kPerBlock;
  std::string fallback_reason;
  // Per-block can serve it (the transport reaches every pool involved): the
  // fallback of a bounce that gets no recv slot.
  bool per_block_available = true;
  std::vector<Writer> writers;
  uint64_t bytes = 0;
  uint64_t scatter_runs = 0;
  State state = State::kReserving;
  Slot slot;
  std::optional<QuarantineToken> quarantine;
  // Streaming (see receiver.h): the chunk size, whether the request holds
  // an admission, the stop of its chunk scatters, and the chunk slots
  // quarantined when it settled.
  bool stream = false;
  uint64_t chunk_bytes = 0;
  bool admission_queued = false;  // in reserve_waiters_ for admission
  bool admitted = false;
  std::stop_source scatter_stop;
  std::vector<QuarantineToken> chunk_quarantine;
  // The chunks scattered and their times (RequestRecord::chunk_*).
  uint64_t chunks_scattered = 0;
  std::chrono::nanoseconds chunk_writer_time{0};
  std::chrono::nanoseconds chunk_scatter_time{0};
  // The most chunk slots held at once, and its writers' credit stall
  // (RequestRecord::chunk_slots_peak, credit_stall_us).
  uint64_t chunk_slots_peak = 0;
  std::chrono::nanoseconds credit_stall{0};
  SessionContext::TimePoint deadline;
  EventLoop::TimerId deadline_timer = 0;
  EventLoop::TimerId reserve_timer = 0;
  EventLoop::TimerId grace_timer = 0;
  // A cancel or timeout of a per-block/direct request waits for its writers
  // to stop before it settles with this.
  std::optional<Status> pending_outcome;
  bool settled = false;
  int scatters_outstanding = 0;
  Status scatter_error;
  // The first writer failure: what the request fails with, rather than the
  // cancellations the receiver itself caused to drain the other writers.
  Status root_cause;
  RequestTimeline timeline;

  // No writer can touch the pool or the slot any more, and no read of this
  // rank writes into the pool.
  bool AllTerminal() const {
    return std::all_of(writers.begin(), writers.end(), [](const Writer& w) {
      return w.state != WriterState::kPending && w.reads_outstanding == 0;
    });
  }
};

ReceiverSession::ReceiverSession(SessionContext& ctx, CancelHook cancel_hook)
    : ctx_(ctx), cancel_hook_(std::move(cancel_hook)) {}

ReceiverSession::~ReceiverSession() = default;

const char* ReceiverSession::StateName(State state) {
  switch (state) {
    case State::kReserving:
      return "RESERVING";
    case State::kInFlight:
      return "IN_FLIGHT";
    case State::kScattering:
      return "SCATTERING";
    case State::kDone:
      return "DONE";
    case State::kFailed:
      return "FAILED";
    case State::kQuarantined:
      return "QUARANTINED";
  }
  return "?";
}

void ReceiverSession::Transition(Request& r, State next) {
  bool allowed = false;
  switch (r.state) {
    case State::kReserving:
      allowed = next == State::kInFlight || next == State::kFailed;
      break;
    case State::kInFlight:
      allowed = next == State::kScattering || next == State::kDone || next == State::kFailed ||
                next == State::kQuarantined;
      break;
    case State::kScattering:
      allowed = next == State::kDone || next == State::kFailed;
      break;
    case State::kQuarantined:
      allowed = next == State::kFailed;  // the slot was released
      break;
    case State::kDone:
    case State::kFailed:
      break;
  }
  if (!allowed) {
    Log(LogLevel::kError, RequestName(r.key.first) + ": invalid receiver transition " +
                              StateName(r.state) + " -> " + StateName(next));
    return;
  }
  r.state = next;
}

ReceiverSession::Request* ReceiverSession::Find(Key key) {
  auto it = requests_.find(key);
  return it == requests_.end() ? nullptr : it->second.get();
}

Result<std::shared_ptr<Transfer>> ReceiverSession::Pull(uint64_t request_id,
                                                        const std::string& ctx_instance,
                                                        std::vector<int32_t> block_table,
                                                        TokenRange tokens,
                                                        const PullOptions& options) {
  if (ctx_.role != Role::kGen) {
    return InvalidArgumentError("Pull: this agent is a ctx rank; only gen ranks pull");
  }
  if (ctx_.shutting_down.load()) return AbortedError("Pull: the agent is shutting down");
  if (active_.count(request_id) != 0) {
    return AlreadyExistsError("Pull: " + RequestName(request_id) +
                              " is already in flight on this rank");
  }
  auto inst = ctx_.instances.find(ctx_instance);
  if (inst == ctx_.instances.end()) {
    return NotFoundError("Pull: no ctx instance '" + ctx_instance + "' is connected");
  }
  const Topology& ctx_topology = *inst->second;
  KVB_RETURN_IF_ERROR(ctx_.CheckStateSlot("Pull: PullOptions.state_slot", options.state_slot));
  const bool with_state = options.state_slot >= 0;
  const std::vector<int> writer_ranks =
      Writers(ctx_topology, *ctx_.topology, ctx_.rank, with_state);
  if (writer_ranks.empty()) return InternalError("Pull: no writer covers this rank");

  const TransferPath requested =
      options.path == TransferPath::kAuto ? ctx_.config.path : options.path;
  const bool wants_scatter = requested == TransferPath::kBounce;
  auto r = std::make_unique<Request>();
  r->ctx_instance = ctx_instance;
  r->tokens = tokens;
  r->block_table = std::move(block_table);
  r->state_slot = options.state_slot;
  r->timeline.request = SessionContext::MetricsClock::now();
  uint64_t fragments = 0;
  // What each writer's connection offers; the counts and bytes come below.
  std::vector<PeerState*> peers;
  std::vector<WriterLoad> loads;
  for (int w : writer_ranks) {
    PeerState* peer = ctx_.FindPeer(ctx_instance, w);
    if (peer == nullptr) {
      return ctx_.NotConnected("Pull", ctx_instance, w);
    }
    peers.push_back(peer);
    loads.push_back(LinkLoad(*peer));
  }
  // Auto where every writer copies into this rank's pool itself: bounce
  // cannot be priced below direct whatever its runs (a direct run ends only
  // where a gather or a scatter run ends, and bounce's other terms are
  // direct's and more: docs/paths.md), so only the direct runs are counted.
  const bool bounce_dominated =
      requested == TransferPath::kAuto &&
      std::all_of(loads.begin(), loads.end(), [](const WriterLoad& l) { return l.direct; });
  for (size_t i = 0; i < writer_ranks.size(); ++i) {
    const int w = writer_ranks[i];
    PeerState* peer = peers[i];
    // The scatter list is needed on the bounce path only: built now when
    // bounce was asked for, counted when auto must price it (a fraction of
    // the cost, and the same checks of our block table; built below if the
    // choice falls on bounce), and neither on a path where the writer
    // copies (only the totals, walking no run).
    const PlanSide writer_side = WriterSide(*peer, w, {});
    const PlanSide our_side = OurSide(*r);
    Writer writer;
    writer.rank = w;
    writer.peer = peer->id;
    writer.name = peer->Describe();
    uint64_t scatter_runs = 0;
    if (wants_scatter) {
      Status planned = PlanScatter(writer_side, our_side, tokens, writer);
      if (!planned.ok()) return planned.WithContext("Pull " + RequestName(request_id));
      scatter_runs = writer.scatter_tiled ? writer.tiled_scatter.NumRuns() : writer.scatter.size();
    } else {
      Result<PlanRuns> runs = requested == TransferPath::kAuto && !bounce_dominated
                                  ? CountPlanRuns(writer_side, our_side, tokens, kPlanScatter)
                                  : PlanTotals(writer_side, our_side, tokens);
      if (!runs.ok()) return runs.status().WithContext("Pull " + RequestName(request_id));
      writer.bytes = runs->packed_bytes;
      writer.state_bytes = runs->state_bytes;
      writer.fingerprint = runs->fingerprint;
      scatter_runs = runs->scatter;
    }
    fragments += scatter_runs;
    r->bytes += writer.bytes;
    r->state_bytes += writer.state_bytes;
    WriterLoad& load = loads[i];
    load.bytes = writer.bytes;
    load.scatter_runs = scatter_runs;
    writer.reads = load.direct_read;
    writer.mapped_read = load.mapped_read;
    r->writers.push_back(std::move(writer));
  }
  r->scatter_runs = fragments;
  r->per_block_available = PerBlockAvailable(loads);

  r->requested = requested;
  const bool recv_arena = ctx_.recv_arena != nullptr;
  if (r->requested == TransferPath::kAuto) {
    KVB_RETURN_IF_ERROR(CountWriterRuns(*r, recv_arena, bounce_dominated, loads)
                            .WithContext("Pull " + RequestName(request_id)));
  }
  Result<PathChoice> choice = ChoosePath(ctx_.config, r->requested, loads, ctx_.CopyCostForAuto(),
                                         recv_arena, ctx_.transport->Caps().name);
  if (!choice.ok()) return choice.status();
  r->path = choice->path;
  if (r->path == TransferPath::kBounce) {
    for (Writer& writer : r->writers) {
      if (writer.scatter_planned) continue;
      const PeerState* peer = ctx_.FindPeer(writer.peer);
      if (peer == nullptr) return InternalError("Pull: writer " + writer.name + " vanished");
      Status planned = PlanScatter(WriterSide(*peer, writer.rank, {}), OurSide(*r), tokens, writer);
      if (!planned.ok()) return planned.WithContext("Pull " + RequestName(request_id));
    }
  }
  if (r->path == TransferPath::kBounce && recv_arena) {
    // Streamed when the request cannot fit the arena whole: a request that
    // fits takes one slot, which is as fast as a stream or faster (twice
    // as fast with device pools, about 1.25x over UCX shared memory; a
    // stream gained 0-20 % only over loopback and UCX TCP with host pools:
    // docs/PERFORMANCE.md, 2026-12-02).
    const uint64_t chunk = StreamChunkBytes(r->writers.size());
    uint64_t whole = 0;
    for (const Writer& w : r->writers) {
      const uint64_t a = ctx_.recv_arena->alignment();
      whole += (w.bytes + a - 1) / a * a;
    }
    const bool fits = whole <= ctx_.recv_arena->capacity();
    r->stream = chunk > 0 && !fits &&
                std::any_of(r->writers.begin(), r->writers.end(),
                            [chunk](const Writer& w) { return w.bytes > chunk; });
    if (r->stream) {
      r->chunk_bytes = chunk;
      for (Writer& writer : r->writers) {
        Result<ChunkCut> cut = ChunkCut::Create(writer.bytes, chunk);
        if (!cut.ok()) return cut.status().WithContext("Pull " + RequestName(request_id));
        writer.cut = *cut;
        // Chunks are cut out of the tiled scatter list where it is in
        // packed order (each chunk then a tiled list the engine expands),
        // else out of the flat one.
        if (writer.scatter_tiled &&
            !TiledInPackedOrder(writer.tiled_scatter, PackedSide::kSource)) {
          writer.tiled_scatter.ExpandTo(&writer.scatter);
          writer.tiled_scatter = TiledList();
          writer.scatter_tiled = false;
        }
        if (!writer.scatter_tiled) OrderForSlicing(writer.scatter, PackedSide::kSource);
      }
    }
  }
  if (r->requested == TransferPath::kAuto && MinLogLevel() <= LogLevel::kDebug) {
    Log(LogLevel::kDebug, "Pull " + RequestName(request_id) + ": auto takes " +
                              std::string(TransferPathName(r->path)) + " (" +
                              DescribeEstimate(choice->estimate) + ")");
  }

  const uint32_t slice = ctx_.next_slice++;
  r->key = {request_id, slice};
  const Key key = r->key;
  r->handle = std::make_shared<TransferState>(
      request_id, [hook = cancel_hook_, request_id, slice] { hook(request_id, slice); });
  std::shared_ptr<TransferState> handle = r->handle;
  r->deadline = ctx_.DeadlineAfter(options.timeout);
  r->deadline_timer = ctx_.loop->PostAt(r->deadline, [this, key] { OnDeadline(key); });
  Request& req = *r;
  requests_.emplace(key, std::move(r));
  active_.emplace(request_id, slice);
  handle->SetInfo(Info(req));

  if (req.path == TransferPath::kBounce) {
    TryReserve(req);  // may settle and erase the request
  } else {
    req.timeline.reserve = SessionContext::MetricsClock::now();
    SendRequests(req);  // may settle and erase the request
  }
  return std::shared_ptr<Transfer>(handle);
}

PlanSide ReceiverSession::OurSide(const Request& r) const {
  PlanSide side{ctx_.topology.get(), ctx_.rank, &*ctx_.pool, r.block_table};
  side.state_pool = ctx_.state_pool ? &*ctx_.state_pool : nullptr;
  side.state_slot = r.state_slot;
  return side;
}

PlanSide ReceiverSession::WriterSide(const PeerState& peer, int rank,
                                     std::span<const int32_t> table) const {
  PlanSide side{peer.topology.get(), rank, &*peer.pool, table};
  side.state_pool = peer.state_pool ? &*peer.state_pool : nullptr;
  return side;
}

Status ReceiverSession::PlanScatter(const PlanSide& writer_side, const PlanSide& our_side,
                                    TokenRange tokens, Writer& writer) const {
  const bool tiled = ctx_.TiledCopies();
  Result<PairPlan> plan =
      PlanPair(writer_side, our_side, tokens, kPlanScatter | (tiled ? kPlanTiled : 0));
  if (!plan.ok()) return plan.status();
  writer.bytes = plan->packed_bytes;
  writer.state_bytes = plan->state_bytes;
  writer.fingerprint = plan->fingerprint;
  writer.scatter = std::move(plan->scatter);
  writer.tiled_scatter = std::move(plan->tiled_scatter);
  writer.scatter_tiled = tiled;
  writer.scatter_planned = true;
  return Status::Ok();
}

WriterLoad ReceiverSession::LinkLoad(const PeerState& peer) const {
  WriterLoad load;
  // Direct: the writer copies into our pool where its transport maps it
  // (its HELLO says whether it can, over this connection); otherwise this
  // rank reads the writer's pool where our transport can (between
  // processes of one host). Each is asked for the memory kind at stake:
  // ours written by the writer, the writer's read by us (a read lands in
  // our pool, so ours must be reachable too). One question when both pools
  // are of one kind, the usual case.
  const Result<TransportCaps> ours = ctx_.transport->PeerCapsFor(peer.id, ctx_.pool_memory);
  const Result<TransportCaps> theirs = peer.pool_memory == ctx_.pool_memory
                                           ? ours
                                           : ctx_.transport->PeerCapsFor(peer.id, peer.pool_memory);
  load.link = ours.ok() ? ours->cost : ctx_.transport->Caps().cost;
  // The writer's copy engine follows its pool: the CPU engine reaches no
  // device memory, the CUDA engine no pageable host memory and (without
  // peer access, not set up) no other device's memory.
  const bool ours_device = ctx_.pool_memory == MemoryKind::kCuda;
  const bool same_device = ours_device == (peer.pool_memory == MemoryKind::kCuda) &&
                           (!ours_device || ctx_.pool_device == peer.pool_device);
  load.direct = (peer.capabilities & protocol::kCapabilityDirect) != 0 && ours.ok() &&
                ours->map_remote && same_device;
  // Per-block writes from the writer's pool into ours through the
  // transport: both must be registered with it (a device pool over a
  // transport that cannot reach device memory is not, and announces no
  // pool region).
  load.per_block = !ctx_.pool_ranges.empty() && !peer.pool_regions.empty();
  load.direct_read =
      !load.direct && theirs.ok() && theirs->read_remote && ours.ok() && ours->read_remote;
  if (theirs.ok()) load.read = theirs->read_cost;
  // The read by our own copy engine from the writer's pool mapped here:
  // every allocation of its pool mapped, and an engine that reaches the
  // memory on both sides.
  if (load.direct_read && theirs->map_remote_read && peer.mapped_pool &&
      (!peer.state_pool || peer.mapped_state_pool) && ctx_.copy != nullptr) {
    const CopyEngineCaps engine = ctx_.copy->Caps();
    auto reaches = [&engine](MemoryKind kind) {
      return kind == MemoryKind::kCuda ? engine.device_memory : engine.host_memory;
    };
    load.mapped_read = reaches(peer.pool_memory) && reaches(ctx_.pool_memory);
  }
  load.send_arena = peer.send_arena;
  return load;
}

Result<std::vector<TransferPath>> ReceiverSession::Paths(const std::string& ctx_instance) const {
  if (ctx_.role != Role::kGen) {
    return InvalidArgumentError("Paths: this agent is a ctx rank; only gen ranks pull");
  }
  auto inst = ctx_.instances.find(ctx_instance);
  if (inst == ctx_.instances.end()) {
    return NotFoundError("Paths: no ctx instance '" + ctx_instance + "' is connected");
  }
  std::vector<WriterLoad> loads;
  for (int w : Writers(*inst->second, *ctx_.topology, ctx_.rank)) {
    const PeerState* peer = ctx_.FindPeer(ctx_instance, w);
    if (peer == nullptr) {
      return ctx_.NotConnected("Paths", ctx_instance, w);
    }
    loads.push_back(LinkLoad(*peer));
  }
  std::vector<TransferPath> paths;
  if (PerBlockAvailable(loads)) paths.push_back(TransferPath::kPerBlock);
  if (BounceAvailable(loads, ctx_.recv_arena != nullptr)) paths.push_back(TransferPath::kBounce);
  if (DirectAvailable(loads)) paths.push_back(TransferPath::kDirect);
  return paths;
}

Status ReceiverSession::CountWriterRuns(const Request& r, bool recv_arena, bool bounce_dominated,
                                        std::span<WriterLoad> loads) const {
  // Counting walks the plan again (without building it): worth it only
  // when there is a choice to make.
  if (!DirectAvailable(loads) && !BounceAvailable(loads, recv_arena)) return Status::Ok();
  const bool per_block = PerBlockAvailable(loads);
  const CopyCost copy = ctx_.CopyCostForAuto();
  // Where bounce is dominated, only direct and per-block are left to rank,
  // and a writer's count stops where per-block cannot be its cheaper path
  // any more (PerBlockLosesFrom; at once without per-block). A stopped
  // count is a lower bound that ranks the two as the full count would when
  // every writer's count stopped; when only some did, the exact ones could
  // still tip the sum toward per-block, so the stopped ones are then
  // counted in full.
  std::vector<uint64_t> limits(r.writers.size(), std::numeric_limits<uint64_t>::max());
  if (bounce_dominated) {
    for (size_t i = 0; i < limits.size(); ++i) {
      limits[i] = per_block ? PerBlockLosesFrom(ctx_.config, loads[i], copy) : 0;
    }
  }
  auto count = [&](size_t i, uint64_t limit) -> Status {
    const PeerState* peer = ctx_.FindPeer(r.writers[i].peer);
    if (peer == nullptr) return InternalError("writer " + r.writers[i].name + " vanished");
    // The writer's block table is not known here: its runs are counted as
    // if none of its blocks were adjacent (planner.h).
    Result<PlanRuns> runs =
        CountPlanRuns(WriterSide(*peer, r.writers[i].rank, {}), OurSide(r), r.tokens,
                      bounce_dominated ? kPlanDirect : kPlanGather | kPlanDirect, limit);
    if (!runs.ok()) return runs.status();
    loads[i].direct_runs = runs->direct;
    if (bounce_dominated) {
      // Not counted: the least they can be (G + S >= D + 1), which still
      // prices bounce above direct.
      loads[i].gather_runs = runs->direct;
      loads[i].scatter_runs = 1;
    } else {
      loads[i].gather_runs = runs->gather;
    }
    return Status::Ok();
  };
  bool all_stopped = true;
  bool any_stopped = false;
  for (size_t i = 0; i < r.writers.size(); ++i) {
    KVB_RETURN_IF_ERROR(count(i, limits[i]));
    const bool stopped = loads[i].direct_runs >= limits[i];
    all_stopped = all_stopped && stopped;
    any_stopped = any_stopped || stopped;
  }
  if (!any_stopped || all_stopped) return Status::Ok();
  // Mixed: the exact writers may favour per-block by more than the stopped
  // ones favour direct at their partial counts.
  for (size_t i = 0; i < r.writers.size(); ++i) {
    if (loads[i].direct_runs >= limits[i]) {
      KVB_RETURN_IF_ERROR(count(i, std::numeric_limits<uint64_t>::max()));
    }
  }
  return Status::Ok();
}

uint64_t ReceiverSession::StreamChunkBytes(size_t writers) const {
  if (ctx_.recv_arena == nullptr || writers == 0) return 0;
  const int64_t mb = ctx_.config.bounce_chunk_mb > 0         ? ctx_.config.bounce_chunk_mb
                     : ctx_.pool_memory == MemoryKind::kCuda ? Config::kDefaultChunkMbDevice
                                                             : Config::kDefaultChunkMbHost;
  // One chunk per writer must fit the arena at once. With host pools, two
  // where they stay at least kMinPipelinedChunk: a writer then gathers and
  // writes its next chunk while the receiver scatters the one before,
  // instead of waiting for it (docs/sessions.md, "Streaming bounce"; with
  // device pools a chunk's round is fixed costs, and two smaller chunks a
  // writer measured no faster: docs/PERFORMANCE.md).
  const uint64_t capacity = ctx_.recv_arena->capacity();
  const auto share = [&](uint64_t slots) {
    return capacity / writers / slots / Arena::kMinAlignment * Arena::kMinAlignment;
  };
  uint64_t per_writer = share(1);
  if (ctx_.pool_memory != MemoryKind::kCuda && share(2) >= kMinPipelinedChunk) {
    per_writer = share(2);
  }
  return std::min(MiB(static_cast<uint64_t>(mb)), per_writer);
}

uint64_t ReceiverSession::StreamNeed(const Request& r) {
  return r.writers.size() * kWindowPerWriter * r.chunk_bytes;
}

void ReceiverSession::Admit(Request& r) {
  r.admitted = true;
  ++admitted_streams_;
  admitted_need_ += StreamNeed(r);
  if (r.reserve_timer != 0) ctx_.loop->CancelTimer(r.reserve_timer);
  r.reserve_timer = 0;
  r.timeline.reserve = SessionContext::MetricsClock::now();
  for (size_t i = 0; i < r.writers.size(); ++i) grant_ring_.emplace_back(r.key, i);
  SendRequests(r);  // may settle the request (a writer out of reach)
  PumpGrants();
}

void ReceiverSession::EndStream(Request& r) {
  if (!r.admitted) return;
  r.admitted = false;
  --admitted_streams_;
  admitted_need_ -= StreamNeed(r);
  const Key key = r.key;
  size_t before_cursor = 0;
  for (size_t i = 0; i < grant_ring_.size() && i < grant_cursor_; ++i) {
    if (grant_ring_[i].first == key) ++before_cursor;
  }
  std::erase_if(grant_ring_, [&key](const auto& entry) { return entry.first == key; });
  grant_cursor_ -= before_cursor;
}

bool ReceiverSession::WantsGrant(const Request& r, const Writer& w) const {
  return r.admitted && !r.settled && !r.pending_outcome && r.root_cause.ok() &&
         r.scatter_error.ok() && w.state == WriterState::kPending && w.cut &&
         w.next_grant < w.cut->num_chunks() && w.chunk_slots.size() < kWindowPerWriter;
}

void ReceiverSession::PumpGrants() {
  if (pumping_ || grant_ring_.empty() || ctx_.recv_arena == nullptr) return;
  // A whole-slot request at the head of the FIFO gets the space first.
  if (const Key* front = reserve_waiters_.Front(); front != nullptr) {
    const Request* head = Find(*front);
    if (head != nullptr && !head->stream) return;
  }
  pumping_ = true;
  struct Failed {
    Key key;
    size_t writer;
    Status why;
  };
  std::vector<Failed> failed;
  const auto now = SessionContext::MetricsClock::now();
  size_t idle = 0;  // ring entries in a row that wanted nothing
  uint64_t waiting = 0;  // writers that want a slot the arena has no room for
  while (idle < grant_ring_.size()) {
    grant_cursor_ %= grant_ring_.size();
    const auto [key, index] = grant_ring_[grant_cursor_];
    Request* r = Find(key);
    if (r == nullptr || index >= r->writers.size() || !WantsGrant(*r, r->writers[index])) {
      ++grant_cursor_;
      ++idle;
      continue;
    }
    Writer& w = r->writers[index];
    const uint64_t k = w.next_grant;
    Result<Slot> slot = ctx_.recv_arena->TryReserve(w.cut->size(k));
    if (!slot.ok()) {
      // No room now: this writer is served first when room comes back, and
      // every writer with nothing granted waits idle for a credit.
      for (const auto& [other_key, other_index] : grant_ring_) {
        Request* other = Find(other_key);
        if (other == nullptr || other_index >= other->writers.size()) continue;
        Writer& o = other->writers[other_index];
        if (!WantsGrant(*other, o)) continue;
        ++waiting;
        if (o.chunk_slots.empty() && o.stall_since == SessionContext::MetricsClock::time_point()) {
          o.stall_since = now;
        }
      }
      break;
    }
    if (w.stall_since != SessionContext::MetricsClock::time_point()) {
      const std::chrono::nanoseconds stalled = now - w.stall_since;
      ctx_.metrics->Count(Counter::kCreditStallNs, static_cast<uint64_t>(stalled.count()));
      r->credit_stall += stalled;
      w.stall_since = {};
    }
    ChunkSlot& cs = w.chunk_slots.emplace_back();
    cs.chunk = k;
    cs.slot = std::move(slot).value();
    cs.granted_at = now;
    uint64_t held = 0;
    for (const Writer& each : r->writers) held += each.chunk_slots.size();
    r->chunk_slots_peak = std::max(r->chunk_slots_peak, held);
    ++w.next_grant;
    protocol::KvGrant grant;
    grant.request_id = key.first;
    grant.slice_id = key.second;
    grant.writer_rank = static_cast<uint32_t>(w.rank);
    grant.chunk = k;
    grant.slot_addr = cs.slot.address().value();
    grant.slot_size = w.cut->size(k);
    Status sent = ctx_.Send(w.peer, grant);
    if (sent.ok()) {
      ctx_.metrics->Count(Counter::kChunksGranted);
    } else {
      failed.push_back({key, index, sent.WithContext("KV_GRANT to " + w.name)});
    }
    ++grant_cursor_;
    idle = 0;
  }
  pumping_ = false;
  ctx_.metrics->SetGrantQueue(waiting);
  for (const Failed& f : failed) {
    Request* r = Find(f.key);
    if (r == nullptr || f.writer >= r->writers.size()) continue;
    Writer& w = r->writers[f.writer];
    if (w.state == WriterState::kPending) WriterDone(*r, w, WriterState::kFailed, f.why);
  }
}

void ReceiverSession::OnArenaSpace() {
  RetryReservations();
  PumpGrants();
}

void ReceiverSession::TryReserve(Request& r) {
  if (r.stream) {
    // Admission, in FIFO order: the admitted streams' windows must fit the
    // arena, or this one streams alone.
    const Key* front = reserve_waiters_.Front();
    const bool first = front == nullptr || *front == r.key;
    if (first &&
        (admitted_streams_ == 0 || admitted_need_ + StreamNeed(r) <= ctx_.recv_arena->capacity())) {
      Admit(r);
      return;
    }
    if (!r.admission_queued) {
      const Key key = r.key;
      r.admission_queued = true;
      reserve_waiters_.Add(key);
      // The reserve deadline, when per-block can stand in; otherwise only
      // the request's own deadline bounds the wait (failing it sooner would
      // serve nobody: host-staged bounce has no other path).
      if (r.per_block_available) {
        r.reserve_timer = ctx_.loop->PostAt(
            ctx_.Now() + std::chrono::milliseconds(ctx_.config.reserve_timeout_ms),
            [this, key] { OnReserveTimeout(key); });
      }
    }
    return;
  }
  std::vector<uint64_t> sizes;
  for (const Writer& w : r.writers) sizes.push_back(w.bytes);
  Result<Slot> slot = ctx_.recv_arena->TryReserve(sizes);
  if (slot.ok()) {
    r.slot = std::move(slot).value();
    r.timeline.reserve = SessionContext::MetricsClock::now();
    if (r.reserve_timer != 0) ctx_.loop->CancelTimer(r.reserve_timer);
    r.reserve_timer = 0;
    SendRequests(r);
    return;
  }
  switch (slot.status().code()) {
    case StatusCode::kResourceExhausted: {
      if (r.reserve_timer == 0) {
        const Key key = r.key;
        reserve_waiters_.Add(key);
        r.reserve_timer = ctx_.loop->PostAt(
            ctx_.Now() + std::chrono::milliseconds(ctx_.config.reserve_timeout_ms),
            [this, key] { OnReserveTimeout(key); });
      }
      return;
    }
    case StatusCode::kOutOfRange:
      FallBack(r, "request larger than arena");
      return;
    default:
      AbandonUnsent(r, slot.status().WithContext("reserving a recv slot"));
      return;
  }
}

void ReceiverSession::RetryReservations() {
  reserve_waiters_.Retry([this](const Key& key) {
    Request* r = Find(key);
    if (r == nullptr || r->state != State::kReserving || r->settled) return false;
    TryReserve(*r);
    r = Find(key);
    return r != nullptr && r->state == State::kReserving && !r->settled;
  });
}

void ReceiverSession::OnReserveTimeout(Key key) {
  Request* r = Find(key);
  if (r == nullptr || r->state != State::kReserving || r->settled) return;
  r->reserve_timer = 0;
  reserve_waiters_.Remove(key);
  FallBack(*r, "recv arena backpressure");
}

void ReceiverSession::AbandonUnsent(Request& r, const Status& why) {
  // No writer was asked for anything: each is done without a word.
  for (Writer& w : r.writers) {
    w.state = WriterState::kCancelled;
    w.error = why;
  }
  Settle(r, why);
  MaybeRetire(r);
}

void ReceiverSession::FallBack(Request& r, const std::string& reason) {
  if (!r.per_block_available) {
    // Host-staged bounce (docs/cuda.md): the transport cannot reach the
    // device pools, so per-block cannot stand in for the recv slot.
    const std::string why = RequestName(r.key.first) + ": " + reason +
                            ", and per-block cannot serve it: the " + ctx_.transport->Caps().name +
                            " transport cannot reach the device pools";
    AbandonUnsent(r, reason == "request larger than arena"
                         ? OutOfRangeError(why + " (raise bounce_size_mb)")
                         : ResourceExhaustedError(why));
    return;
  }
  r.path = TransferPath::kPerBlock;
  r.stream = false;
  for (Writer& w : r.writers) w.cut.reset();
  r.fallback_reason = reason;
  r.timeline.reserve = SessionContext::MetricsClock::now();
  SendRequests(r);
}

void ReceiverSession::SendRequests(Request& r) {
  Transition(r, State::kInFlight);
  r.timeline.first_byte = SessionContext::MetricsClock::now();
  r.handle->SetInfo(Info(r));
  protocol::KvRequest msg;
  msg.request_id = r.key.first;
  msg.slice_id = r.key.second;
  msg.token_start = static_cast<uint64_t>(r.tokens.start);
  msg.token_end = static_cast<uint64_t>(r.tokens.end);
  const size_t needed =
      static_cast<size_t>((r.tokens.end + ctx_.topology->spec().tokens_per_block - 1) /
                          ctx_.topology->spec().tokens_per_block);
  msg.block_table.reserve(needed);
  for (size_t i = 0; i < needed; ++i)
    msg.block_table.push_back(static_cast<uint32_t>(r.block_table[i]));
  msg.deadline_ms = ctx_.MillisLeft(r.deadline);
  msg.receiver_rank = static_cast<uint32_t>(ctx_.rank);
  msg.state_slot = r.state_slot >= 0 ? static_cast<uint32_t>(r.state_slot) : protocol::kNoStateSlot;
  for (size_t i = 0; i < r.writers.size(); ++i) {
    Writer& w = r.writers[i];
    if (r.path != TransferPath::kDirect) w.reads = false;
    msg.path = w.reads ? protocol::TransferPath::kDirectRead
                       : static_cast<protocol::TransferPath>(r.path);
    msg.writer_rank = static_cast<uint32_t>(w.rank);
    msg.plan_fingerprint = w.fingerprint;
    msg.chunk_bytes = 0;
    if (r.stream) {
      msg.chunk_bytes = r.chunk_bytes;
      msg.recv_slot_addr = 0;
      msg.recv_slot_size = 0;
    } else if (r.path == TransferPath::kBounce) {
      const SubSlot sub = r.slot.sub_slot(i);
      msg.recv_slot_addr = sub.address.value();
      msg.recv_slot_size = sub.size;
    } else {
      msg.recv_slot_addr = 0;
      msg.recv_slot_size = 0;
    }
    Status sent = ctx_.Send(w.peer, msg);
    if (!sent.ok()) {
      w.state = WriterState::kFailed;
      w.error = sent.WithContext("sending KV_REQUEST to " + w.name);
      if (r.root_cause.ok()) r.root_cause = w.error;
    }
  }
  if (!r.root_cause.ok()) StopWriters(r, std::string(r.root_cause.message()));
  Advance(r);  // a writer that could not be reached may already decide it
}

ReceiverSession::Writer* ReceiverSession::FindWriter(Request& r, const PeerState& peer,
                                                     uint32_t writer_rank) {
  for (Writer& candidate : r.writers) {
    if (candidate.rank == static_cast<int>(writer_rank) && candidate.peer == peer.id) {
      return &candidate;
    }
  }
  ctx_.metrics->Count(Counter::kRejectedResults);
  Log(LogLevel::kWarning, "answer for " + RequestName(r.key.first) + " from " + peer.Describe() +
                              " (writer rank " + std::to_string(writer_rank) +
                              ") rejected: not a writer of this request");
  return nullptr;
}

void ReceiverSession::OnReady(PeerState& peer, const protocol::KvReady& ready) {
  Request* r = Find({ready.request_id, ready.slice_id});
  if (r == nullptr) {
    // Settled already (it was cancelled or timed out, and the writer heard
    // CANCEL): nothing to read.
    Log(LogLevel::kDebug, "KV_READY for " + RequestName(ready.request_id) + " from " +
                              peer.Describe() + " ignored: the request is gone");
    return;
  }
  Writer* w = FindWriter(*r, peer, ready.writer_rank);
  if (w == nullptr) return;
  const size_t index = static_cast<size_t>(w - r->writers.data());
  // A writer this rank already gave up on (a cancel crossed its KV_READY):
  // it heard CANCEL and ends the loan itself.
  if (w->state != WriterState::kPending) return;
  if (!w->reads || w->ready_seen) {
    ctx_.metrics->Count(Counter::kRejectedResults);
    if (!w->reads) {
      const Status why =
          DataLossError(w->name + " lent its blocks, but this rank asked it to write");
      EndLoan(*r, *w, why);
      WriterDone(*r, *w, WriterState::kFailed, why);
    }
    return;  // a repeated KV_READY: the first one counts
  }
  w->ready_seen = true;
  if (r->settled || r->pending_outcome) return;  // cancelled: the writer heard CANCEL
  StartReads(*r, index, ready);
}

void ReceiverSession::StartReads(Request& r, size_t index, const protocol::KvReady& ready) {
  Writer& w = r.writers[index];
  auto fail = [&](const Status& why) {
    EndLoan(r, w, why);
    WriterDone(r, w, WriterState::kFailed, why);
  };
  if (ready.plan_fingerprint != w.fingerprint) {
    fail(DataLossError(w.name + " lent blocks for plan fingerprint " +
                       std::to_string(ready.plan_fingerprint) + ", expected " +
                       std::to_string(w.fingerprint) +
                       ": the two sides planned different transfers"));
    return;
  }
  PeerState* peer = ctx_.FindPeer(w.peer);
  if (peer == nullptr || !peer->ready()) return;  // its failure settles the writer
  std::vector<int32_t> writer_table;
  writer_table.reserve(ready.block_table.size());
  for (size_t i = 0; i < ready.block_table.size(); ++i) {
    const uint32_t id = ready.block_table[i];
    if (id > static_cast<uint32_t>(std::numeric_limits<int32_t>::max())) {
      fail(OutOfRangeError(w.name + " lent block table entry " + std::to_string(i) + " = " +
                           std::to_string(id) + ", out of range"));
      return;
    }
    writer_table.push_back(static_cast<int32_t>(id));
  }
  // The same plan the writer made, with both block tables known here; on
  // a mapped read with the writer's pool at its addresses here.
  PlanSide writer_side = WriterSide(*peer, w.rank, writer_table);
  const bool mapped = w.mapped_read && peer->mapped_pool.has_value();
  if (mapped) {
    writer_side.pool = &*peer->mapped_pool;
    writer_side.state_pool = peer->mapped_state_pool ? &*peer->mapped_state_pool : nullptr;
  }
  if (r.state_slot >= 0) {
    writer_side.state_slot =
        ready.state_slot == protocol::kNoStateSlot ? -1 : static_cast<int64_t>(ready.state_slot);
  }
  const bool tiled = mapped && ctx_.TiledCopies();
  Result<PairPlan> plan =
      PlanPair(writer_side, OurSide(r), r.tokens, kPlanDirect | (tiled ? kPlanTiled : 0));
  if (!plan.ok()) {
    fail(plan.status().WithContext("planning the reads from " + w.name));
    return;
  }
  if (mapped) {
    StartMappedRead(r, index, *peer, std::make_shared<PairPlan>(std::move(plan).value()), tiled);
    return;
  }
  Result<std::vector<ReadGroup>> grouped =
      GroupReads(plan->direct, peer->pool_regions, ctx_.pool_ranges);
  if (!grouped.ok()) {
    fail(grouped.status().WithContext("reads from " + w.name));
    return;
  }
  // The ops live until the last completion has run.
  auto groups = std::make_shared<std::vector<ReadGroup>>(std::move(grouped).value());
  const Key key = r.key;
  for (const ReadGroup& g : *groups) {
    ++w.reads_outstanding;
    Status issued = ctx_.transport->Read(
        *g.source, *g.target, g.ops,
        [this, key, index, groups](Status s) {
          ctx_.loop->Post([this, key, index, s] { OnReadDone(key, index, s); });
        },
        w.read_stop.get_token());
    if (!issued.ok()) {
      --w.reads_outstanding;
      if (w.read_error.ok()) w.read_error = issued.WithContext("reading from " + w.name);
      w.read_stop.request_stop();
      break;
    }
  }
  if (w.reads_outstanding == 0) {
    // Nothing in the air: settle the writer now (posted, so that this
    // call never re-enters the request's state machine).
    ++w.reads_outstanding;
    ctx_.loop->Post([this, key, index] { OnReadDone(key, index, Status::Ok()); });
  }
}

void ReceiverSession::StartMappedRead(Request& r, size_t index, const PeerState& peer,
                                      std::shared_ptr<PairPlan> plan, bool tiled) {
  Writer& w = r.writers[index];
  if (ctx_.copy == nullptr) {
    const Status why = AbortedError("agent shutting down");
    EndLoan(r, w, why);
    WriterDone(r, w, WriterState::kFailed, why);
    return;
  }
  // Every allocation of the writer's pool the plan may read, held until
  // the copy ended (the connection's fence waits for them), released by
  // the copy's `done` wherever it runs.
  auto access = std::make_shared<std::vector<std::unique_ptr<MappedAccess>>>();
  access->reserve(peer.pool_regions.size());
  for (const std::unique_ptr<RemoteRegion>& region : peer.pool_regions) {
    Result<std::unique_ptr<MappedAccess>> a = ctx_.transport->BeginMappedRead(*region);
    if (!a.ok()) {
      const Status why = a.status().WithContext("mapping the pool of " + w.name + " for reading");
      EndLoan(r, w, why);
      WriterDone(r, w, WriterState::kFailed, why);
      return;
    }
    access->push_back(std::move(a).value());
  }
  const CopyBatch batch = tiled ? DirectBatch(plan->tiled_direct) : DirectBatch(plan->direct);
  const Key key = r.key;
  ++w.reads_outstanding;
  Status submitted = ctx_.SubmitCopy(
      batch,
      [this, key, index, access, plan](Status s) {
        access->clear();
        ctx_.loop->Post([this, key, index, s] { OnReadDone(key, index, s); });
      },
      w.read_stop.get_token());
  if (!submitted.ok()) {
    --w.reads_outstanding;
    access->clear();
    const Status why = submitted.WithContext("reading from " + w.name);
    EndLoan(r, w, why);
    WriterDone(r, w, WriterState::kFailed, why);
  }
}

void ReceiverSession::OnReadDone(Key key, size_t index, const Status& status) {
  Request* r = Find(key);
  if (r == nullptr || index >= r->writers.size()) return;
  Writer& w = r->writers[index];
  if (!status.ok() && w.read_error.ok()) w.read_error = status.WithContext("reading from " + w.name);
  if (w.reads_outstanding > 0 && --w.reads_outstanding > 0) return;
  // Every read from this writer ended: nothing of it writes the pool.
  if (w.state != WriterState::kPending || r->settled || r->pending_outcome) {
    if (w.state == WriterState::kPending) {
      w.state = WriterState::kCancelled;
      w.error = r->pending_outcome ? *r->pending_outcome : CancelledError("request settled");
    }
    Advance(*r);
    return;
  }
  if (!w.read_error.ok()) {
    const Status why = w.read_error;
    EndLoan(*r, w, why);
    WriterDone(*r, w, WriterState::kFailed, why);
    return;
  }
  w.read_complete = true;
  protocol::KvReadDone done;
  done.request_id = key.first;
  done.slice_id = key.second;
  done.writer_rank = static_cast<uint32_t>(w.rank);
  done.status = protocol::ResultStatus::kSuccess;
  done.bytes_read = w.bytes;
  Status sent = ctx_.Send(w.peer, done);
  if (!sent.ok()) {
    WriterDone(*r, w, WriterState::kFailed, sent.WithContext("KV_READ_DONE to " + w.name));
  }
  // The writer's KV_RESULT decides: SUCCESS only if it held the blocks
  // until our KV_READ_DONE arrived.
}

void ReceiverSession::EndLoan(Request& r, const Writer& w, const Status& why) {
  PeerState* peer = ctx_.FindPeer(w.peer);
  if (peer == nullptr || peer->dead) return;
  if (ctx_.Send(w.peer, protocol::Cancel{r.key.first, std::string(why.message())}).ok()) {
    ctx_.metrics->Count(Counter::kCancelsSent);
  }
}

void ReceiverSession::OnResult(PeerState& peer, const protocol::KvResult& result) {
  Request* r = Find({result.request_id, result.slice_id});
  if (r == nullptr) {
    if (recent_.count({result.request_id, result.slice_id}) != 0) {
      ctx_.metrics->Count(Counter::kDuplicateResults);  // a late repeat
      return;
    }
    ctx_.metrics->Count(Counter::kRejectedResults);
    Log(LogLevel::kWarning, "KV_RESULT for unknown " + RequestName(result.request_id) + " slice " +
                                std::to_string(result.slice_id) + " from " + peer.Describe() +
                                " rejected");
    return;
  }
  Writer* w = FindWriter(*r, peer, result.writer_rank);
  if (w == nullptr) return;
  if (w->state != WriterState::kPending) {
    ctx_.metrics->Count(Counter::kDuplicateResults);
    return;
  }
  switch (result.status) {
    case protocol::ResultStatus::kSuccess:
      if (result.plan_fingerprint != w->fingerprint) {
        ctx_.metrics->Count(Counter::kRejectedResults);
        WriterDone(*r, *w, WriterState::kFailed,
                   DataLossError(w->name + " reported plan fingerprint " +
                                 std::to_string(result.plan_fingerprint) + ", expected " +
                                 std::to_string(w->fingerprint) +
                                 ": the two sides planned different transfers"));
      } else if (w->reads && !w->read_complete) {
        ctx_.metrics->Count(Counter::kRejectedResults);
        WriterDone(*r, *w, WriterState::kFailed,
                   DataLossError(w->name + " reported SUCCESS before this rank read its blocks"));
      } else if (w->cut && (w->next_grant < w->cut->num_chunks() ||
                            std::any_of(w->chunk_slots.begin(), w->chunk_slots.end(),
                                        [](const ChunkSlot& cs) { return !cs.landed; }))) {
        // Its KV_CHUNKs precede its KV_RESULT on the connection.
        ctx_.metrics->Count(Counter::kRejectedResults);
        WriterDone(*r, *w, WriterState::kFailed,
                   DataLossError(w->name + " reported SUCCESS with chunks of its stream " +
                                 "not announced"));
      } else if (result.bytes_written != w->bytes) {
        ctx_.metrics->Count(Counter::kRejectedResults);
        WriterDone(*r, *w, WriterState::kFailed,
                   DataLossError(w->name + " reported " + std::to_string(result.bytes_written) +
                                 " bytes written, expected " + std::to_string(w->bytes)));
      } else {
        WriterDone(*r, *w, WriterState::kSucceeded, Status::Ok());
      }
      return;
    case protocol::ResultStatus::kFailed: {
      // The writer's own code: a refusal (OUT_OF_RANGE, DATA_LOSS ...) is
      // reported as what it is, not as a retryable UNAVAILABLE.
      const StatusCode code =
          FromWireErrorCode(result.error_code).value_or(StatusCode::kInternal);
      WriterDone(*r, *w, WriterState::kFailed,
                 Status(code, w->name + " failed: " + result.error_text));
      return;
    }
    case protocol::ResultStatus::kCancelled:
      WriterDone(*r, *w, WriterState::kCancelled,
                 CancelledError(w->name + " cancelled: " + result.error_text));
      return;
  }
}

void ReceiverSession::WriterDone(Request& r, Writer& w, WriterState state, const Status& error) {
  w.state = state;
  w.error = error;
  // Reads from a writer that failed or was cancelled stop at their next
  // piece; the request settles once they did (AllTerminal).
  if (state != WriterState::kSucceeded) w.read_stop.request_stop();
  if (state != WriterState::kSucceeded && r.root_cause.ok()) r.root_cause = error;
  if (state != WriterState::kSucceeded && !r.settled && !r.pending_outcome) {
    // Drain: the request fails; the other writers need not finish.
    StopWriters(r, "another writer failed: " + std::string(error.message()));
  }
  if (state != WriterState::kSucceeded && r.stream) {
    r.scatter_stop.request_stop();
    ReleaseChunkSlots(w);
  }
  Advance(r);
}

void ReceiverSession::ReleaseChunkSlots(Writer& w) {
  // The writer is terminal: nothing of it lands any more. Its slots that
  // are not being scattered go back to the arena (and the credits to the
  // other streams).
  const size_t before = w.chunk_slots.size();
  w.chunk_slots.remove_if([](const ChunkSlot& cs) { return !cs.scattering; });
  if (w.chunk_slots.size() != before) ctx_.loop->Post([this] { OnArenaSpace(); });
}

void ReceiverSession::Advance(Request& r) {
  if (r.stream) {
    AdvanceStream(r);
    return;
  }
  if (!r.AllTerminal()) return;
  if (r.state == State::kInFlight &&
      r.timeline.write_done == SessionContext::MetricsClock::time_point()) {
    r.timeline.write_done = SessionContext::MetricsClock::now();
  }
  if (r.settled) {
    MaybeRetire(r);
    return;
  }
  // Every writer reported SUCCESS and the scatter runs; its completion
  // settles the request. A writer's connection failing now (say, after its
  // BYE) changes nothing.
  if (r.state == State::kScattering) return;
  if (r.pending_outcome) {
    Settle(r, *r.pending_outcome);
    MaybeRetire(r);
    return;
  }
  if (!r.root_cause.ok()) {
    Settle(r, r.root_cause);
    MaybeRetire(r);
    return;
  }
  if (r.path == TransferPath::kBounce) {
    StartScatter(r);
    return;
  }
  Settle(r, Status::Ok());
  MaybeRetire(r);
}

void ReceiverSession::OnChunk(PeerState& peer, const protocol::KvChunk& chunk) {
  Request* r = Find({chunk.request_id, chunk.slice_id});
  if (r == nullptr) {
    // Retired: every writer was terminal, so this is a late repeat.
    Log(LogLevel::kDebug, "KV_CHUNK for " + RequestName(chunk.request_id) + " from " +
                              peer.Describe() + " ignored: the request is gone");
    return;
  }
  Writer* w = FindWriter(*r, peer, chunk.writer_rank);
  if (w == nullptr) return;
  if (w->state != WriterState::kPending) return;  // terminal: its slots were handled
  const size_t index = static_cast<size_t>(w - r->writers.data());
  const auto fail = [&](const std::string& why) {
    ctx_.metrics->Count(Counter::kRejectedResults);
    WriterDone(*r, *w, WriterState::kFailed,
               DataLossError(w->name + " announced chunk " + std::to_string(chunk.chunk) + why));
  };
  if (!r->stream) {
    fail(" of a request that is not streamed");
    return;
  }
  auto it = std::find_if(w->chunk_slots.begin(), w->chunk_slots.end(),
                         [&chunk](const ChunkSlot& cs) { return cs.chunk == chunk.chunk; });
  if (it == w->chunk_slots.end() || it->landed) {
    fail(it == w->chunk_slots.end() ? ", which this rank did not grant (or already scattered)"
                                    : " twice");
    return;
  }
  if (chunk.bytes != w->cut->size(chunk.chunk)) {
    fail(" of " + std::to_string(chunk.bytes) + " bytes; the chunk has " +
         std::to_string(w->cut->size(chunk.chunk)));
    return;
  }
  it->landed = true;
  it->landed_at = SessionContext::MetricsClock::now();
  r->chunk_writer_time += it->landed_at - it->granted_at;
  if (r->settled || r->pending_outcome || !r->root_cause.ok() || !r->scatter_error.ok()) {
    // Not wanted any more, and the writer is done with the slot.
    w->chunk_slots.erase(it);
    OnArenaSpace();
    return;
  }
  StartChunkScatter(*r, index, chunk.chunk);
}

void ReceiverSession::StartChunkScatter(Request& r, size_t index, uint64_t chunk) {
  Writer& w = r.writers[index];
  auto it = std::find_if(w.chunk_slots.begin(), w.chunk_slots.end(),
                         [chunk](const ChunkSlot& cs) { return cs.chunk == chunk; });
  ChunkSlot& cs = *it;
  Status status =
      ctx_.copy == nullptr ? AbortedError("agent shutting down before the scatter") : Status::Ok();
  if (status.ok()) {
    cs.list.clear();
    status = w.scatter_tiled ? SliceTiledChunk(w.tiled_scatter, PackedSide::kSource,
                                               w.cut->begin(chunk), w.cut->end(chunk), &cs.tiled)
                             : SliceChunk(w.scatter, PackedSide::kSource, w.cut->begin(chunk),
                                          w.cut->end(chunk), &cs.list);
  }
  if (status.ok()) {
    const Key key = r.key;
    cs.scattering = true;
    ++r.scatters_outstanding;
    status = ctx_.SubmitCopy(
        w.scatter_tiled ? ScatterBatch(cs.tiled, cs.slot.address())
                        : ScatterBatch(cs.list, cs.slot.address()),
        [this, key, index, chunk](Status s) {
          ctx_.loop->Post([this, key, index, chunk, s] { OnChunkScattered(key, index, chunk, s); });
        },
        r.scatter_stop.get_token());
    if (status.ok()) return;
    cs.scattering = false;
    --r.scatters_outstanding;
  }
  if (r.scatter_error.ok()) {
    r.scatter_error =
        status.WithContext("scatter of chunk " + std::to_string(chunk) + " of " + w.name);
  }
  w.chunk_slots.erase(it);
  r.scatter_stop.request_stop();
  StopWriters(r, std::string(r.scatter_error.message()));
  ctx_.loop->Post([this] { OnArenaSpace(); });
  Advance(r);
}

void ReceiverSession::OnChunkScattered(Key key, size_t index, uint64_t chunk,
                                       const Status& status) {
  Request* r = Find(key);
  if (r == nullptr || index >= r->writers.size()) return;
  --r->scatters_outstanding;
  Writer& w = r->writers[index];
  auto it = std::find_if(w.chunk_slots.begin(), w.chunk_slots.end(),
                         [chunk](const ChunkSlot& cs) { return cs.chunk == chunk; });
  if (status.ok() && it != w.chunk_slots.end()) {
    ++r->chunks_scattered;
    r->chunk_scatter_time += SessionContext::MetricsClock::now() - it->landed_at;
  }
  if (it != w.chunk_slots.end()) w.chunk_slots.erase(it);
  if (status.ok()) {
    ++w.chunks_scattered;
    ctx_.metrics->Count(Counter::kChunksScattered);
  } else if (r->scatter_error.ok() && !r->pending_outcome && !r->settled) {
    r->scatter_error =
        status.WithContext("scatter of chunk " + std::to_string(chunk) + " of " + w.name);
    r->scatter_stop.request_stop();
    StopWriters(*r, std::string(r->scatter_error.message()));
  }
  AdvanceStream(*r);  // may settle and retire the request
  OnArenaSpace();
}

void ReceiverSession::AdvanceStream(Request& r) {
  // Nothing settles while a scatter may still write the pool.
  if (r.scatters_outstanding > 0) return;
  if (r.settled) {
    MaybeRetire(r);
    return;
  }
  if (r.pending_outcome) {  // cancelled or timed out: the writers need not stop first
    Settle(r, *r.pending_outcome);
    MaybeRetire(r);
    return;
  }
  if (!r.AllTerminal()) return;
  if (r.timeline.write_done == SessionContext::MetricsClock::time_point()) {
    r.timeline.write_done = SessionContext::MetricsClock::now();
  }
  Status outcome = !r.root_cause.ok() ? r.root_cause : r.scatter_error;
  if (outcome.ok()) {
    for (const Writer& w : r.writers) {
      if (w.cut && w.chunks_scattered != w.cut->num_chunks()) {
        outcome = DataLossError(w.name + ": " + std::to_string(w.chunks_scattered) + " of " +
                                std::to_string(w.cut->num_chunks()) + " chunks scattered");
        break;
      }
    }
  }
  if (outcome.ok()) r.timeline.scatter_done = SessionContext::MetricsClock::now();
  Settle(r, outcome);
  MaybeRetire(r);
}

void ReceiverSession::StartScatter(Request& r) {
  if (ctx_.copy == nullptr) {  // shutting down: the copy engine is gone
    Settle(r, AbortedError("agent shutting down before the scatter"));
    MaybeRetire(r);
    return;
  }
  Transition(r, State::kScattering);
  const Key key = r.key;
  r.scatters_outstanding = static_cast<int>(r.writers.size());
  for (size_t i = 0; i < r.writers.size(); ++i) {
    const SubSlot sub = r.slot.sub_slot(i);
    const Writer& w = r.writers[i];
    Status submitted =
        ctx_.SubmitCopy(w.scatter_tiled ? ScatterBatch(w.tiled_scatter, sub.address)
                                        : ScatterBatch(w.scatter, sub.address),
                        [this, key](Status status) {
                          ctx_.loop->Post([this, key, status] { OnScatterDone(key, status); });
                        });
    if (!submitted.ok()) {
      if (r.scatter_error.ok()) r.scatter_error = submitted.WithContext("scatter");
      --r.scatters_outstanding;
    }
  }
  if (r.scatters_outstanding == 0) OnScatterDone(key, Status::Ok());
}

void ReceiverSession::OnScatterDone(Key key, const Status& status) {
  Request* r = Find(key);
  if (r == nullptr) return;
  if (!status.ok() && r->scatter_error.ok()) r->scatter_error = status.WithContext("scatter");
  if (r->scatters_outstanding > 0 && --r->scatters_outstanding > 0) return;
  r->timeline.scatter_done = SessionContext::MetricsClock::now();
  Settle(*r, r->scatter_error);
  MaybeRetire(*r);
}

void ReceiverSession::StopWriters(Request& r, const std::string& reason) {
  protocol::Cancel cancel{r.key.first, reason};
  for (const Writer& w : r.writers) {
    if (w.state != WriterState::kPending) continue;
    PeerState* peer = ctx_.FindPeer(w.peer);
    if (peer == nullptr || peer->dead) continue;
    if (ctx_.Send(w.peer, cancel).ok()) ctx_.metrics->Count(Counter::kCancelsSent);
  }
}

void ReceiverSession::OnDeadline(Key key) {
  Request* r = Find(key);
  if (r == nullptr) return;
  r->deadline_timer = 0;
  if (r->settled) return;
  Cancel(key.first, key.second,
         DeadlineExceededError(RequestName(key.first) + " did not complete within its deadline"));
}

void ReceiverSession::Cancel(uint64_t request_id, uint32_t slice, const Status& why) {
  Request* r = Find({request_id, slice});
  if (r == nullptr || r->settled || r->pending_outcome) return;
  switch (r->state) {
    case State::kReserving:
      AbandonUnsent(*r, why);
      return;
    case State::kScattering:
      return;  // the data has arrived; the scatter finishes and settles it
    case State::kInFlight:
      break;
    default:
      return;
  }
  StopWriters(*r, std::string(why.message()));
  // A writer whose blocks this rank reads never writes here: it is done
  // with the request as soon as our reads of it stopped (AllTerminal).
  bool writes_here = false;
  for (Writer& w : r->writers) {
    if (w.state != WriterState::kPending) continue;
    if (w.reads) {
      w.read_stop.request_stop();
      w.state = WriterState::kCancelled;
      w.error = why;
    } else {
      writes_here = true;
    }
  }
  // A writer that does not answer within the grace period has its
  // connection declared dead; the transport's fence (on_peer_failure) then
  // proves that nothing of it lands any more.
  const Key key = r->key;
  if (writes_here) r->grace_timer = ctx_.loop->PostAt(ctx_.Now() + ctx_.grace, [this, key] {
    Request* req = Find(key);
    if (req == nullptr) return;
    req->grace_timer = 0;
    for (const Writer& w : req->writers) {
      if (w.state == WriterState::kPending) {
        ctx_.transport->Disconnect(
            w.peer, UnavailableError("writer did not stop within the grace period after " +
                                     RequestName(key.first) + " was abandoned"));
      }
    }
  });
  if (r->stream) {
    // The writers write only into chunk slots; this rank's own scatters
    // write the pool: settle once they stopped (AdvanceStream), with the
    // slots the writers may still write quarantined.
    r->scatter_stop.request_stop();
    r->pending_outcome = why;
    AdvanceStream(*r);
    return;
  }
  if (r->path == TransferPath::kBounce) {
    // The writers may still be writing into the slot, never into the pool:
    // settle now and keep the slot out of use until they stop.
    Settle(*r, why);
    MaybeRetire(*r);
    return;
  }
  // Per-block and direct writers write into the pool itself (and this
  // rank's own reads do on direct read): the request settles once they
  // stopped.
  r->pending_outcome = why;
  Advance(*r);
}

void ReceiverSession::OnPeerFailure(PeerState& peer) {
  std::vector<Key> affected;
  for (auto& [key, r] : requests_) {
    for (const Writer& w : r->writers) {
      if (w.peer == peer.id) affected.push_back(key);
    }
  }
  for (const Key& key : affected) {
    Request* r = Find(key);
    if (r == nullptr) continue;
    for (Writer& w : r->writers) {
      if (w.peer != peer.id) continue;
      // The transport reports a failure only behind its fence: nothing of
      // this writer can land any more, so it is terminal.
      if (w.state == WriterState::kPending) {
        w.state = WriterState::kFailed;
        w.error = UnavailableError("connection to writer " + w.name +
                                   " lost: " + std::string(peer.death.message()));
        if (r->root_cause.ok()) r->root_cause = w.error;
        if (r->stream) {
          r->scatter_stop.request_stop();
          ReleaseChunkSlots(w);
        }
      }
    }
    if (!r->settled && !r->pending_outcome) {
      if (!r->root_cause.ok()) StopWriters(*r, std::string(r->root_cause.message()));
    }
    Advance(*r);
  }
}

void ReceiverSession::Settle(Request& r, const Status& outcome) {
  if (r.settled) return;
  r.settled = true;
  r.timeline.complete = SessionContext::MetricsClock::now();
  if (r.deadline_timer != 0) ctx_.loop->CancelTimer(r.deadline_timer);
  if (r.reserve_timer != 0) ctx_.loop->CancelTimer(r.reserve_timer);
  r.deadline_timer = r.reserve_timer = 0;
  auto a = active_.find(r.key.first);
  if (a != active_.end() && a->second == r.key.second) active_.erase(a);
  if (r.stream) EndStream(r);
  bool chunks_quarantined = false;
  for (Writer& w : r.writers) {
    // Settled with no scatter in flight (AdvanceStream): a chunk slot a
    // writer may still write is quarantined until it is terminal, the rest
    // go back.
    for (ChunkSlot& cs : w.chunk_slots) {
      if (w.state != WriterState::kPending || cs.landed || !cs.slot.valid()) continue;
      Result<QuarantineToken> token = ctx_.recv_arena->Quarantine(std::move(cs.slot));
      if (token.ok()) {
        r.chunk_quarantine.push_back(*token);
        ctx_.metrics->Count(Counter::kQuarantinedSlots);
        chunks_quarantined = true;
      }
    }
    w.chunk_slots.remove_if([](const ChunkSlot& cs) { return !cs.scattering; });
  }
  if (r.state == State::kInFlight || r.state == State::kScattering) {
    if (outcome.ok()) {
      Transition(r, State::kDone);
    } else if (chunks_quarantined) {
      Transition(r, State::kQuarantined);
    } else if (r.slot.valid() && !r.AllTerminal()) {
      // Writers may still write into the slot: quarantine it.
      Result<QuarantineToken> token = ctx_.recv_arena->Quarantine(std::move(r.slot));
      if (token.ok()) {
        r.quarantine = *token;
        ctx_.metrics->Count(Counter::kQuarantinedSlots);
      }
      Transition(r, State::kQuarantined);
    } else {
      Transition(r, State::kFailed);
    }
  } else if (r.state == State::kReserving) {
    Transition(r, State::kFailed);
  }

  RequestRecord rec;
  rec.request_id = r.key.first;
  rec.side = Side::kReceiver;
  rec.rank = ctx_.rank;
  rec.instance = ctx_.instance_id;
  rec.peer_instance = r.ctx_instance;
  rec.path_requested = r.requested;
  rec.path_taken = r.path;
  rec.fallback_reason = r.fallback_reason;
  rec.bytes = r.bytes;
  rec.fragments = Info(r).fragments;
  rec.transport_writes = 0;
  rec.writers = static_cast<int>(r.writers.size());
  rec.outcome = OutcomeOf(outcome);
  rec.error = std::string(outcome.message());
  rec.timeline = r.timeline;
  rec.chunks = r.chunks_scattered;
  rec.chunk_writer_us = std::chrono::duration<double, std::micro>(r.chunk_writer_time).count();
  rec.chunk_scatter_us = std::chrono::duration<double, std::micro>(r.chunk_scatter_time).count();
  rec.chunk_slots_peak = r.chunk_slots_peak;
  rec.credit_stall_us = std::chrono::duration<double, std::micro>(r.credit_stall).count();
  ctx_.metrics->Aggregate(rec);
  // Return the slot before the application hears of the outcome, so that a
  // settled request never holds arena bytes it no longer needs.
  bool released = false;
  if (r.slot.valid() && r.AllTerminal() && r.scatters_outstanding == 0) {
    r.slot.Release();
    released = true;
  }
  r.handle->Settle(outcome, Info(r));
  // The perf log's line once the application heard: its write(2) is not
  // on the request's path.
  ctx_.metrics->WriteToPerfLog(rec);
  if (released) RetryReservations();
  if (r.stream) ctx_.loop->Post([this] { OnArenaSpace(); });  // admission and credits
}

void ReceiverSession::MaybeRetire(Request& r) {
  // Every writer is terminal (its KV_RESULT, sent after its writes ended,
  // or its connection's fenced failure): nothing can land in the slot.
  if (!r.settled || !r.AllTerminal() || r.scatters_outstanding > 0) return;
  if (r.grace_timer != 0) ctx_.loop->CancelTimer(r.grace_timer);
  for (QuarantineToken token : r.chunk_quarantine) {
    ctx_.recv_arena->ReleaseQuarantined(token).IgnoreError();
  }
  if (r.quarantine) ctx_.recv_arena->ReleaseQuarantined(*r.quarantine).IgnoreError();
  if ((r.quarantine || !r.chunk_quarantine.empty()) && r.state == State::kQuarantined) {
    Transition(r, State::kFailed);
  }
  bool freed = r.quarantine.has_value() || r.slot.valid() || !r.chunk_quarantine.empty();
  for (const Writer& w : r.writers) freed = freed || !w.chunk_slots.empty();
  // Remember the last retired requests, so that a writer's late repeat of
  // its result counts as a duplicate rather than as a stranger's.
  recent_.insert(r.key);
  recent_order_.push_back(r.key);
  if (recent_order_.size() > kRecentRetired) {
    recent_.erase(recent_order_.front());
    recent_order_.pop_front();
  }
  requests_.erase(r.key);  // releases the slot(s); `r` is gone
  if (freed) OnArenaSpace();
}

TransferInfo ReceiverSession::Info(const Request& r) const {
  TransferInfo info;
  info.request_id = r.key.first;
  info.path_requested = r.requested;
  info.path_taken = r.path;
  info.fallback_reason = r.fallback_reason;
  info.bytes = r.bytes;
  info.state_bytes = r.state_bytes;
  info.fragments = r.path == TransferPath::kBounce ? r.scatter_runs : 0;
  info.writers = static_cast<int>(r.writers.size());
  const auto end = r.timeline.complete != SessionContext::MetricsClock::time_point()
                       ? r.timeline.complete
                       : SessionContext::MetricsClock::now();
  info.latency = end - r.timeline.request;
  return info;
}

void ReceiverSession::CancelAll(const Status& why) {
  std::vector<Key> keys;
  for (const auto& [key, r] : requests_) keys.push_back(key);
  for (const Key& key : keys) Cancel(key.first, key.second, why);
}

void ReceiverSession::Abandon(const Status& why) {
  std::vector<Key> keys;
  for (const auto& [key, r] : requests_) keys.push_back(key);
  for (const Key& key : keys) {
    Request* r = Find(key);
    if (r == nullptr) continue;
    for (Writer& w : r->writers) {
      if (w.state == WriterState::kPending) {
        w.state = WriterState::kFailed;
        w.error = why;
      }
      w.reads_outstanding = 0;  // the transport stopped: every read ended
    }
    r->scatters_outstanding = 0;
    Settle(*r, why);
    MaybeRetire(*r);
  }
  reserve_waiters_.Clear();
}

}  // namespace kvbounce
