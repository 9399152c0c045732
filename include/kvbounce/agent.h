// Agent: one per rank, the object a serving engine talks to (docs/sessions.md,
// include/kvbounce/agent.h).
//
// A ctx (prefill) rank's agent publishes the KV cache of its requests; a gen
// (decode) rank's agent pulls a token range of a request from a ctx instance
// into its own paged pool. Agents find each other by address, exchange HELLO
// (placement, layout, registered regions) once, and from then on move KV on
// the path the receiver asks for:
//
//   per-block  one transport write per direct-list fragment (the baseline)
//   bounce     the writer gathers into a send slot, writes it once into the
//              slot the receiver granted, the receiver scatters
//   direct     one batched copy from the writer's pool into the receiver's
//              (transports that map peer memory only)
//   auto       the receiver prices the available paths for the pull at
//              hand — each connection's stated cost per write and per
//              byte, the copy engine's per fragment and per byte, the
//              config's overrides — and takes the cheapest (docs/paths.md)
//
//   // ctx rank
//   auto ctx = Agent::Create(std::move(ctx_options)).value();
//   ctx->Connect({gen_address});
//   auto sent = ctx->Publish(request_id, block_table, num_tokens).value();
//   // gen rank
//   auto t = gen->Pull(request_id, "ctx0", my_blocks, {0, num_tokens}).value();
//   Status s = t->Wait();
//
// Semantics every request keeps, whatever happens:
//   * it settles exactly once (OK, or the first error that explains it);
//   * SETTLED MEANS SETTLED: a request — a pull or a publication — settles
//     only when no operation of kvbounce can read or write its blocks any
//     more, on every path and for every way of settling (success, failure,
//     cancel, deadline, retire, ttl, peer death, shutdown). From the moment
//     its transfer reports an outcome (Wait returns, Poll has a value, the
//     OnDone callbacks run) the application owns those blocks again: it may
//     reuse, overwrite or free them. There is no separate "released" event.
//     Where the proof needs the other side, the agent waits for the writer's
//     KV_RESULT (sent only after the writer's operations ended and a flush
//     completed) or for the transport's fence (a dead connection whose
//     operations all ended); a writer silent for `grace` after a cancel has
//     its connection declared dead. Operations are stopped at a fine grain
//     (transports and copy engines check a stop token), so this is prompt;
//     an operation that has started is never recalled, so a settle may wait
//     for it to end;
//   * a receiver request completes only after every writer succeeded and,
//     on the bounce path, after the scatter into the pool landed;
//   * a cancelled or timed-out bounce pull settles at once (its writers
//     write the staging slot, never the pool) and leaves the slot in
//     quarantine until they stop;
//   * a writer whose publication settled before it reported reports
//     CANCELLED, never SUCCESS: no receiver hears OK for blocks the
//     application may already have reused;
//   * every staging slot is returned (Stats().arena_outstanding_bytes is 0
//     when nothing is in flight).
// docs/sessions.md follows one request through these rules.
//
// Threads: each agent owns one control thread that runs every state change
// and every completion callback, and a CPU copy engine's workers; the
// transport may own threads of its own. All are joined by Shutdown().
//
// Thread safety: every method is thread-safe, Stats() also while and after
// Shutdown() runs. Completion callbacks (Transfer::OnDone) run on the
// control thread with no kvbounce lock held — or, for the requests that
// Shutdown itself settles, on the thread calling Shutdown; they must be
// short and must not call Shutdown() or Wait().
//
// Errors: no exception leaves the library. Every enum, duration and size of
// the API is checked with overflow-safe arithmetic; durations must lie in
// [0, Config::kMaxTimeoutMs] (30 days). A thread that cannot start or
// memory that cannot be allocated is reported as kResourceExhausted.
#ifndef KVBOUNCE_AGENT_H_
#define KVBOUNCE_AGENT_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvbounce/config.h"
#include "kvbounce/model.h"
#include "kvbounce/status.h"
#include "kvbounce/transport.h"
#include "kvbounce/transports.h"
#include "kvbounce/types.h"

namespace kvbounce {

enum class Role { kCtx, kGen };
std::string_view RoleName(Role role);  // "ctx", "gen"

// This rank's KV pool: memory the application owns and keeps alive until the
// agent is shut down.
struct PoolSpec {
  // One base address, or one per local layer (layer-major layouts only).
  std::vector<Addr> bases;
  int64_t num_blocks = 0;
  // kHost or kPinnedHost: host memory; kCuda: device memory of `device`
  // (every base must lie in it: Create checks with the CUDA runtime). The
  // pool's memory decides the agent's copy engine and staging memory
  // (docs/cuda.md, "Device pools").
  MemoryKind memory = MemoryKind::kHost;
  // The CUDA device ordinal of a kCuda pool; ignored for the host kinds.
  int device = 0;
  // Hybrid models (docs/hybrid.md): the rank's recurrent-state pool, in the
  // same memory as the KV pool — one base, or (layer-major state layout)
  // one per recurrent layer of the rank; `num_slots` slots of
  // InstanceSpec::state_layout. Empty bases: the rank moves KV only (and
  // must, where its pipeline stage holds no recurrent layer).
  struct StatePool {
    std::vector<Addr> bases;
    int64_t num_slots = 0;
  };
  StatePool state;
};

// Which transport Agent::Create builds for this rank when
// AgentOptions::transport is not given:
//   "loopback"  NewLoopbackTransport(fabric, loopback_name, or
//               "<instance_id>-<rank>" when empty); `fabric` is required.
//   "ucx"       NewUcxTransport with listen_address, put_chunk_bytes and
//               same_host_shared_memory from here, num_workers =
//               Config::num_workers after KVBOUNCE_NUM_WORKERS (so the
//               override reaches the transport), and connect_timeout =
//               AgentOptions::connect_timeout.
struct TransportSpec {
  // "ucx", "loopback" or "cuda-ipc" (device pools of processes of one host:
  // listening on `ipc_address`, mapping peers for the pool's device).
  std::string kind = "ucx";
  // loopback: the fabric shared by the agents of this process, and this
  // endpoint's name on it (empty: "<instance>-<rank>").
  std::shared_ptr<LoopbackFabric> fabric;
  std::string loopback_name;
  // ucx: see UcxTransportOptions.
  std::string listen_address = "127.0.0.1:0";
  uint64_t put_chunk_bytes = 0;
  bool same_host_shared_memory = true;
  // cuda-ipc: "unix:@name" or "unix:/path"; empty: a unique name.
  std::string ipc_address;
};

struct AgentOptions {
  // Names the instance this rank belongs to; gen ranks pull by it.
  std::string instance_id;
  Role role = Role::kCtx;
  // The instance's model, dtype, TP/PP split, pool layout and block size.
  InstanceSpec instance;
  // This rank: pp_rank * tp + tp_rank.
  int rank = 0;
  PoolSpec pool;
  // Validated by Create after the KVBOUNCE_* environment overrides. With
  // bounce_size_mb > 0 a ctx rank gets a send arena and a gen rank a recv
  // arena of that size (docs/architecture.md §6; a rank's role is fixed, so
  // the arena it would never use is not allocated).
  Config config;
  // The transport Create builds (see TransportSpec)...
  TransportSpec transport_spec;
  // ...unless a ready-made one is given here (tests, the fault decorator):
  // then transport_spec is ignored. The agent takes ownership.
  // kvbounce/transports.h makes them.
  std::unique_ptr<Transport> transport;
  // How long Connect waits for the peers' HELLO (and a UCX transport built
  // from transport_spec for its handshake). In (0, kMaxTimeoutMs].
  std::chrono::milliseconds connect_timeout{10000};
  // How long a writer may stay silent after a cancel or deadline before its
  // connection is declared dead, and how long Shutdown lets requests in
  // flight finish on their own. In [0, kMaxTimeoutMs].
  std::chrono::milliseconds grace{1000};
};

// What happened to one request on one side.
struct TransferInfo {
  uint64_t request_id = 0;
  TransferPath path_requested = TransferPath::kAuto;
  TransferPath path_taken = TransferPath::kAuto;
  std::string fallback_reason;  // empty unless a fallback happened
  uint64_t bytes = 0;           // payload of the request on this rank
  uint64_t state_bytes = 0;     // of which recurrent state (hybrid models)
  uint64_t fragments = 0;       // plan runs executed on this rank
  uint64_t transport_writes = 0;
  int writers = 0;
  // Steady-clock durations from the start of the request.
  std::chrono::nanoseconds latency{0};
};

// A request in flight: Pull's receiver request, or Publish's publication.
// Shared between the application and the agent; outlives either.
class Transfer {
 public:
  virtual ~Transfer() = default;
  virtual uint64_t request_id() const = 0;
  // Blocks until the request settled (and the OnDone callbacks registered
  // before that ran); returns its outcome.
  virtual Status Wait() = 0;
  // Waits at most `timeout`; true when settled.
  virtual bool WaitFor(std::chrono::nanoseconds timeout) = 0;
  // The outcome once settled, nullopt before.
  virtual std::optional<Status> Poll() const = 0;
  // Asks the agent to cancel; the request settles with kCancelled unless it
  // settles otherwise first. Idempotent; never blocks.
  virtual void Cancel() = 0;
  // Runs `done` once with the outcome: on the control thread when the
  // request settles, or at once on the calling thread if it already has.
  virtual void OnDone(std::function<void(const Status&)> done) = 0;
  // Path, bytes, fragments and timing; final once settled.
  virtual TransferInfo info() const = 0;
};

struct PullOptions {
  // kAuto: the agent's configured path (Config::path).
  TransferPath path = TransferPath::kAuto;
  // 0: the agent's Config::transfer_timeout_ms.
  std::chrono::milliseconds timeout{0};
  // Hybrid models: this rank's state slot the request's recurrent state
  // lands in, with the KV, on the same path (the pull settles only when
  // both landed); -1: KV only. With a slot, the range must end where the
  // publication's tokens end (the state is the one after its last token).
  int64_t state_slot = -1;
};

struct PublishOptions {
  // How long the publication waits for its pulls; 0: the agent's
  // Config::transfer_timeout_ms.
  std::chrono::milliseconds ttl{0};
  // Hybrid models: this rank's state slot holding the request's recurrent
  // state after its last token; -1: none (pulls asking for state are
  // refused). With a slot the publication also waits for the gen ranks
  // that take only state from this rank.
  int64_t state_slot = -1;
};

// Aggregates of one agent (docs/architecture.md §12).
struct AgentStats {
  uint64_t requests_completed = 0;
  uint64_t requests_failed = 0;
  uint64_t requests_cancelled = 0;
  uint64_t requests_timed_out = 0;
  uint64_t bytes_completed = 0;
  uint64_t transport_writes = 0;  // by settled requests (metrics)
  // Write operations the transport issued so far, finished or not.
  uint64_t transport_write_ops = 0;
  uint64_t rejected_results = 0;
  uint64_t quarantined_slots = 0;  // slots ever quarantined
  uint64_t fallbacks = 0;
  uint64_t arena_outstanding_bytes = 0;  // send + recv, now
  uint64_t arena_quarantined_bytes = 0;  // now
  // The most bytes the agent's arena (send or recv: a rank has one) has
  // held at once since Create.
  uint64_t arena_peak_bytes = 0;
  // Streaming bounce (docs/sessions.md): chunk slots this gen rank granted
  // and scattered, chunks this ctx rank wrote, and how long writers of
  // streamed requests waited idle for a credit, summed over them.
  uint64_t chunks_granted = 0;
  uint64_t chunks_written = 0;
  uint64_t chunks_scattered = 0;
  std::chrono::nanoseconds credit_stall{0};
  // This gen rank's grant queue: writers of admitted streams that want a
  // chunk slot its recv arena has no room for, as of the last grant pass,
  // and the most there have been since Create.
  uint64_t grant_queue = 0;
  uint64_t grant_queue_peak = 0;
  // Everything, as JSON text (counters, per-path counts, fallbacks by
  // reason, latency percentiles, transport counters).
  std::string json;
};

class Agent {
 public:
  // Validates everything (config, instance, rank, pool), builds the
  // transport from options.transport_spec unless options.transport is given,
  // creates the arenas, registers the pool and the arenas with the transport
  // and starts the control thread.
  //
  // Errors: kInvalidArgument naming the field (bad config value, a value
  // outside its enum — role, dtype, layout, memory kind —, grace or
  // connect_timeout out of range, impossible topology, rank outside the
  // instance, pool without bases, a null base, a base count that does not
  // match the layout, num_blocks < 1 or too large, pool memory the transport
  // cannot reach; a kCuda pool whose device is not one of this process's or
  // whose bases are not device memory of that device; transport_spec.kind
  // other than "ucx" or "loopback", a loopback spec without a fabric);
  // kUnimplemented (a kCuda pool in a build without CUDA, or over a
  // transport that cannot reach device memory; a "ucx" spec in a build
  // without UCX); kUnavailable (a kCuda pool where no CUDA device can be
  // used, with the runtime's reason); kResourceExhausted (a
  // thread cannot start); whatever building the transport from the spec
  // reports (e.g. kAlreadyExists for a loopback name taken on the fabric,
  // kUnavailable for a UCX address it cannot listen on), with
  // "AgentOptions.transport_spec" as context; whatever the transport's
  // Register reports.
  static Result<std::unique_ptr<Agent>> Create(AgentOptions options);

  virtual ~Agent() = default;

  // The transport address peers Connect to.
  virtual std::string Address() const = 0;

  // Connects to each address and exchanges HELLO both ways; returns once
  // every peer's HELLO arrived. Peers may also connect to us: their HELLO is
  // answered automatically.
  //
  // Errors: kUnavailable (a peer is not reachable, or left), kDeadlineExceeded
  // (a HELLO did not arrive within connect_timeout), kInvalidArgument (a peer
  // is incompatible — same role, another model or element size, a layout we
  // do not understand — whichever side found out), kDataLoss (the peer found
  // our frames malformed), kAborted (shut down).
  virtual Status Connect(std::span<const std::string> addresses) = 0;

  // ctx side: the KV of `request_id` is ready in `block_table` (pool block
  // ids of tokens [0, num_tokens)). Pulls that arrived earlier are served
  // now; later ones as they come. The returned transfer settles OK once every
  // gen rank of the pulling instance that needs data from this rank has been
  // served successfully, or with an error when the ttl passed first
  // (kDeadlineExceeded), Retire or the transfer's Cancel was called
  // (kCancelled) or the agent shut down (kAborted). In every case it
  // settles only once no operation reads the blocks any more (those still
  // running are stopped first, and their receivers hear CANCELLED): then the
  // blocks may be reused.
  //
  // Errors: kAlreadyExists (the id is published, or its last publication is
  // still settling), kOutOfRange (a block id outside the pool, a table too
  // short for num_tokens), kInvalidArgument (wrong role, num_tokens < 1, a
  // ttl outside [0, kMaxTimeoutMs]), kAborted (shut down).
  virtual Result<std::shared_ptr<Transfer>> Publish(uint64_t request_id,
                                                    std::span<const int32_t> block_table,
                                                    int64_t num_tokens,
                                                    PublishOptions options = {}) = 0;

  // ctx side: forgets a publication: its transfer will settle kCancelled,
  // once the operations still reading its blocks have stopped (at their next
  // grain; see Publish). Returns at once; OK also when the publication was
  // already settling. Errors: kNotFound.
  virtual Status Retire(uint64_t request_id) = 0;

  // gen side: pulls `tokens` of `request_id` from instance `ctx_instance`
  // into this rank's blocks `block_table` (ids of tokens [0, tokens.end)).
  //
  // Errors (the request is not started): kInvalidArgument (wrong role, an
  // empty range or one starting below 0, a path outside the enum, a timeout
  // outside [0, kMaxTimeoutMs]), kFailedPrecondition (not connected to every
  // writer rank of that instance; for a rank whose connection was lost the
  // message carries what it died of — Connect to it again), kNotFound
  // (unknown instance), kOutOfRange
  // (a block table too short for tokens.end, a block id outside the pool
  // among the table's first ceil(tokens.end / tokens_per_block) entries —
  // all of them travel, also those below tokens.start —, or a range needing
  // more blocks than a request carries), kAlreadyExists (the id is in flight
  // here), kUnimplemented (direct requested but the transport cannot map
  // peer memory; per-block requested where the transport cannot reach a
  // device pool), kFailedPrecondition (auto with no path available: device
  // pools the transport cannot reach and the bounce path off), kAborted
  // (shut down). Everything after that — writer
  // failures (with the writer's own code: a refusal such as a range the
  // publication does not hold is kOutOfRange), timeouts, cancellation — is
  // the transfer's outcome.
  virtual Result<std::shared_ptr<Transfer>> Pull(uint64_t request_id, std::string_view ctx_instance,
                                                 std::span<const int32_t> block_table,
                                                 TokenRange tokens, PullOptions options = {}) = 0;

  // The number of gen ranks of `gen_instance` this ctx rank writes to.
  virtual Result<int> ReceiverCount(std::string_view gen_instance) const = 0;

  // The paths a Pull from `ctx_instance` can take now, over the connections
  // to its writers: per-block when the transport reaches every pool
  // involved (always, but for device pools over a transport that reaches
  // host memory only); bounce when this rank and every
  // writer have arenas; direct when every writer can map this rank's pool
  // or this rank can read the writer's (between processes of one host).
  // Errors: kInvalidArgument (a ctx rank), kNotFound (no such instance is
  // connected), kFailedPrecondition (a writer rank is not connected),
  // kAborted (shut down).
  virtual Result<std::vector<TransferPath>> Paths(std::string_view ctx_instance) const = 0;

  virtual AgentStats Stats() const = 0;

  // Stops accepting requests, cancels those in flight and lets them finish
  // for up to `grace`, says BYE to every peer, stops the transport, the copy
  // engine and the control thread, deregisters the pool and the arenas, and
  // settles (kAborted, kCancelled) whatever is left. Returns only when no
  // operation of this agent reads or writes application memory and no other
  // agent's write or direct copy touches this agent's pool or arenas — so
  // the pool may be freed as soon as it returns; that may take longer than
  // `grace` when such an operation is slow to end. Idempotent; the
  // destructor calls it. REQUIRES: not called from a completion callback.
  virtual void Shutdown() = 0;
};

}  // namespace kvbounce

#endif  // KVBOUNCE_AGENT_H_
