// SessionContext: what an agent's sender and receiver sessions share — the
// agent's own description, its memory and transport, its control loop and
// the peers it knows from their HELLO.
//
// Threading: everything below "control-thread state" is read and written on
// the agent's control thread only (EventLoop); the rest is fixed after the
// agent was created, or thread-safe by itself (Metrics, Arena, Transport,
// CopyEngine).
#ifndef KVBOUNCE_SESSION_SESSION_CONTEXT_H_
#define KVBOUNCE_SESSION_SESSION_CONTEXT_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <stop_token>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/clock.h"
#include "common/list_memory.h"
#include "copy/copy_engine.h"
#include "kvbounce/agent.h"
#include "kvbounce/config.h"
#include "kvbounce/transport.h"
#include "layout/planner.h"
#include "layout/pool_layout.h"
#include "layout/state_layout.h"
#include "layout/topology.h"
#include "memory/arena.h"
#include "protocol/messages.h"
#include "session/event_loop.h"
#include "session/metrics.h"

namespace kvbounce {

// A connected agent, as its HELLO described it.
struct PeerState {
  PeerId id = 0;
  bool hello_sent = false;
  bool hello_received = false;
  bool dead = false;
  Status death;  // why the peer is dead (or was refused)

  std::string instance_id;
  Role role = Role::kCtx;
  int rank = -1;
  std::shared_ptr<const Topology> topology;
  // The peer's pool at the peer's own addresses (for transport writes), and
  // at the addresses this process maps it to (for the direct path).
  std::optional<PoolLayout> pool;
  std::optional<PoolLayout> mapped_pool;
  // Its state pool (hybrid models), likewise; none where it has none.
  std::optional<StatePoolLayout> state_pool;
  std::optional<StatePoolLayout> mapped_state_pool;
  std::vector<std::unique_ptr<RemoteRegion>> pool_regions;  // one per allocation
  std::unique_ptr<RemoteRegion> recv_arena;                 // null: no bounce into it
  bool send_arena = false;  // it announced a send arena (it can gather to bounce)
  MemoryKind pool_memory = MemoryKind::kHost;  // its pool's memory, from HELLO
  int pool_device = -1;                        // and its CUDA device (kCuda)
  uint64_t capabilities = 0;

  bool ready() const { return hello_received && !dead; }
  std::string Describe() const;  // "ctx0 rank 3"
};

// A local registered region and the address range it covers.
struct LocalRange {
  Addr begin;
  uint64_t bytes = 0;
  const LocalRegion* region = nullptr;
};

struct SessionContext {
  // Metrics timestamps: real time, whatever clock the timers run on.
  using MetricsClock = std::chrono::steady_clock;
  using TimePoint = Clock::TimePoint;

  // --- Fixed after Agent::Create.
  std::string instance_id;
  Role role = Role::kCtx;
  int rank = 0;
  std::shared_ptr<const Topology> topology;
  std::optional<PoolLayout> pool;
  // Hybrid models: the rank's state pool (docs/hybrid.md); none where the
  // application gave none.
  std::optional<StatePoolLayout> state_pool;
  MemoryKind pool_memory = MemoryKind::kHost;
  int pool_device = -1;  // kCuda: the pool's device
  Config config;
  std::chrono::milliseconds grace{1000};
  Transport* transport = nullptr;
  // transport->Caps().writes_land_at_completion: no Flush before telling
  // a peer that written bytes are there.
  bool writes_land_at_completion = false;
  CopyEngine* copy = nullptr;
  Arena* send_arena = nullptr;  // null when bounce_size_mb == 0
  Arena* recv_arena = nullptr;
  const LocalRegion* send_region = nullptr;
  const LocalRegion* recv_region = nullptr;
  std::vector<LocalRange> pool_ranges;  // the registered pool allocation(s)
  EventLoop* loop = nullptr;
  // Deadlines and timers (loop->clock(): the steady clock in production).
  Clock* clock = nullptr;
  Metrics* metrics = nullptr;

  // Set once shutdown begins: new requests are refused.
  std::atomic<bool> shutting_down{false};

  // --- Control-thread state.
  std::map<PeerId, PeerState> peers;
  std::map<std::pair<std::string, int>, PeerId> peer_by_rank;
  // Why the connection to (instance, rank) was lost, until a new one says
  // HELLO: named when a Pull needs that rank.
  std::map<std::pair<std::string, int>, Status> lost_ranks;
  std::map<std::string, std::shared_ptr<const Topology>> instances;
  uint32_t next_slice = 1;

  // The live peer of (instance, rank) with a HELLO, or nullptr.
  PeerState* FindPeer(const std::string& instance, int rank);
  // kFailedPrecondition "<what>: not connected to writer <instance> rank
  // <rank>", with why its connection was lost when it had one.
  Status NotConnected(std::string_view what, const std::string& instance, int rank) const;
  PeerState* FindPeer(PeerId id);

  // Encodes and sends a message. Errors: encoding (a bug: kInternal),
  // kUnavailable / kNotFound from the transport.
  Status Send(PeerId peer, const protocol::Message& message);

  // Submits a copy batch from the control loop: a batch of at most
  // config.inline_copy_kb KiB is copied right here when the engine can (and
  // `done` runs here, before this returns), anything else goes to the
  // engine's threads (CopyEngine::SubmitOrCopyHere). Either way `done` must
  // only post back to the loop, as every session completion does.
  Status SubmitCopy(const CopyBatch& batch, CopyDone done, std::stop_token stop = {}) {
    return copy->SubmitOrCopyHere(batch, InlineCopyBytes(), std::move(done), std::move(stop));
  }
  // Whether the copy engine expands tiled plan lists itself: the sessions
  // then plan the lists it copies in tiled form (a step per block, not per
  // run; docs/architecture.md §4).
  bool TiledCopies() const { return copy != nullptr && copy->Caps().tiled_lists; }
  uint64_t InlineCopyBytes() const { return static_cast<uint64_t>(config.inline_copy_kb) * 1024; }
  // The copy engine's stated cost, with inline_bytes set where SubmitCopy
  // copies on the loop (what `auto` prices the copies of a pull with);
  // all zero without an engine (shutting down).
  CopyCost CopyCostForAuto() const {
    if (copy == nullptr) return CopyCost();
    CopyCost cost = copy->Caps().cost;
    if (copy->CopiesOnCallingThread()) cost.inline_bytes = InlineCopyBytes();
    return cost;
  }

  // Hybrid models: the checks of a state slot the application names for a
  // request on this rank (docs/hybrid.md), `what` naming the option
  // ("Pull: PullOptions.state_slot"): -1 (none) or a slot of the state
  // pool; a slot only for a hybrid model (kInvalidArgument) and a rank with
  // a state pool where its stage has recurrent layers
  // (kFailedPrecondition); kOutOfRange outside the pool.
  Status CheckStateSlot(std::string_view what, int64_t slot) const;

  // Now on the agent's clock.
  TimePoint Now() const { return clock->Now(); }

  // The deadline `timeout` from now, with 0 meaning the configured transfer
  // timeout. REQUIRES: 0 <= timeout <= Config::kMaxTimeoutMs (the API edge
  // checks); anything the clock cannot represent saturates at its maximum.
  TimePoint DeadlineAfter(std::chrono::milliseconds timeout) const;

  // Milliseconds left until `deadline` (at least 1, so that a live request
  // never travels as already expired).
  uint64_t MillisLeft(TimePoint deadline) const;
};

// "request <id>", for messages.
std::string RequestName(uint64_t request_id);

// How a request's final status counts in the metrics.
Outcome OutcomeOf(const Status& status);

// KV_RESULT.error_code <-> StatusCode (protocol/messages.h numbers the wire
// codes as status.h numbers StatusCode). ToWireErrorCode(kOk) is 0;
// FromWireErrorCode returns nullopt for a value outside 1..kMaxErrorCode.
uint8_t ToWireErrorCode(StatusCode code);
std::optional<StatusCode> FromWireErrorCode(uint8_t code);

// Whole write batches: the ops of one list that fall in one (source region,
// target region) pair. Every op of a list lies in exactly one registered
// region on each side; the caller checks the result's status.
struct WriteGroup {
  const LocalRegion* source = nullptr;
  const RemoteRegion* target = nullptr;
  ListVector<WriteOp> ops;
};

// Splits `fragments` (absolute addresses, plus dst_offset on the target side)
// into write groups by the regions that contain them. Errors: kOutOfRange
// when a fragment lies outside every region (naming it).
Result<std::vector<WriteGroup>> GroupWrites(std::span<const Fragment> fragments,
                                            uint64_t dst_offset,
                                            std::span<const LocalRange> sources,
                                            std::span<const std::unique_ptr<RemoteRegion>> targets);

// The same for reads (the `direct` path copied by the receiver): fragments
// whose source lies in a peer's regions and whose target is local.
struct ReadGroup {
  const RemoteRegion* source = nullptr;
  const LocalRegion* target = nullptr;
  ListVector<ReadOp> ops;
};
Result<std::vector<ReadGroup>> GroupReads(std::span<const Fragment> fragments,
                                          std::span<const std::unique_ptr<RemoteRegion>> sources,
                                          std::span<const LocalRange> targets);

}  // namespace kvbounce

#endif  // KVBOUNCE_SESSION_SESSION_CONTEXT_H_
