// Transport: moves bytes between registered memory of two agents and carries
// their control messages (docs/transports.md).
//
// A transport is one agent's endpoint. It connects to peers by address,
// delivers control frames in order, registers local memory so that peers can
// write into it, imports the regions a peer exported (from the peer's HELLO),
// and writes from local registered memory into a peer's registered memory,
// asynchronously, with a completion. Implementations: `loopback` (agents of
// one process), `ucx`, `cuda-ipc`; `FaultTransport` decorates any of them.
//
// Completion contract (UCX's non-blocking style): every asynchronous call
// either fails now (returns a non-OK Status; the callback is never called)
// or accepts the operation (returns OK) and then calls its callback exactly
// once, from a transport thread, never inside the call that started it.
// Callbacks must be short and must not block on the transport.
//
// Ordering: control messages to one peer are delivered in the order sent.
// Writes to one peer may complete in any order. A Flush completes after every
// write to that peer that completed before the Flush was issued is visible in
// the peer's memory: a KV_RESULT is sent only after its Flush completed.
//
// Cancellation: Write takes a std::stop_token. Once a stop is requested, the
// ops of that batch that have not started are skipped and `done` runs with
// kCancelled as soon as those already started have completed; an op that
// started is never recalled (a put on the wire lands). A batch that had
// completed before the request reports its own status. Transports may start
// a large op in pieces and check between them (each documents its grain).
//
// Failure and the fence: when a connection dies (the peer vanished,
// Disconnect was called, a fault was injected), the transport fails that
// peer's pending writes and flushes with kUnavailable, refuses new ones, and
// calls on_peer_failure once for the peer, on both ends where both are still
// alive. on_peer_failure is a FENCE: it runs only once nothing of that
// connection can read or write this agent's memory any more — every write of
// the connection, in either direction, and every Read of this agent from
// the peer, has completed or been stopped, and
// every MappedAccess of it has ended (across processes: the peer process is
// gone, or its access was revoked). A session may therefore treat
// on_peer_failure as proof that a dead writer's bytes will not land later.
//
// Thread safety: every method is thread-safe. Callbacks run on transport
// threads with no transport lock held; they may call back into the
// transport (e.g. send a message from on_message).
//
// Lifetime: Shutdown() (also run by the destructor) fails everything pending,
// joins the transport's threads and returns; no callback runs after it
// returns and no write of this transport is still reading or writing memory.
// Messages Send accepted before Shutdown still reach a live peer, ahead of
// its on_peer_failure (a process that sends its last results and exits
// loses none); a transport may bound how long it waits for a peer that
// stopped answering (UCX and cuda-ipc: 2 s, docs/transports.md).
// Writes of peers into this transport's regions are fenced by
// deregistration: destroying a LocalRegion waits until no write or mapped
// access of any peer touches it. Registrations, imported regions and mapped
// accesses must be destroyed before the transport (they borrow it).
#ifndef KVBOUNCE_TRANSPORT_H_
#define KVBOUNCE_TRANSPORT_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <stop_token>
#include <string>
#include <string_view>
#include <vector>

#include "kvbounce/registration.h"
#include "kvbounce/status.h"
#include "kvbounce/types.h"

namespace kvbounce {

// What one transport operation costs on a link: a fixed price per write
// operation plus the bytes at the link's sustained rate. `auto` compares the
// paths with it (docs/paths.md). Zero means "unknown" for either figure.
struct TransportCost {
  double op_us = 0;         // fixed cost of one write operation, microseconds
  double bytes_per_us = 0;  // sustained rate of large writes, bytes per µs (= MB/s)
  // Fixed cost of one Write call — its batch of operations, from the call
  // to its completion — beyond op_us for each operation, microseconds.
  // Zero: none (not "unknown").
  double write_us = 0;
};

// What a transport can do (docs/transports.md). Caps() answers for the
// transport as a whole; PeerCaps() for one connection, where the answer
// depends on the peer (same host or not: whether `direct` works, which link
// the bytes take and what it costs).
struct TransportCaps {
  std::string name;            // "loopback", "ucx", "cuda-ipc"
  bool host_memory = false;    // reads and writes host (pageable or pinned) memory
  bool device_memory = false;  // reads and writes CUDA device memory
  // A peer's region can be mapped into this process, so a copy engine can
  // read or write it directly (the `direct` path).
  bool map_remote = false;
  // Control callbacks and write completions may run on several transport
  // threads at once (UCX: one progress thread per worker); loopback uses one.
  bool concurrent_callbacks = false;
  // Writes still queued when a connection dies are failed, never landed. A
  // transport that hands bytes to a network stack cannot promise this for
  // bytes already sent; the fence (below) holds either way.
  bool pending_writes_fail = false;
  // A write's `done` runs only once its bytes are in the target memory, as
  // a Flush would prove (loopback and cuda-ipc copy before they report):
  // the sessions then need no Flush before they tell the peer the bytes
  // are there. False where a write's completion only means the source may
  // be reused (UCX: a put's completion is local), so a Flush must follow.
  bool writes_land_at_completion = false;
  TransportCost cost;
  // This process can copy a peer's registered memory into its own with
  // Read (between processes of one host: the kernel copies straight from the
  // peer's address space, many ranges per call). The receiver-side `direct`
  // path ("direct read", docs/paths.md) uses it where map_remote is false.
  bool read_remote = false;
  // What Read costs: a fixed price per range (op_us) and the copy rate.
  TransportCost read_cost;
  // A peer's region can be mapped into this process for reading: this
  // process's copy engine reads it at its mapped_address() while a
  // BeginMappedRead access lives. The receiver's `direct` read then copies
  // with its own engine, its lists in the engine's own form (tiled for the
  // CUDA engine), instead of issuing one Read op per run (docs/paths.md,
  // "Direct read"). Only reads: a copy into a peer's memory still needs
  // map_remote. cuda-ipc offers it; loopback where LoopbackOptions say so.
  bool map_remote_read = false;
};

// Identifies one connection of this transport. Assigned by the transport
// (Connect for outgoing, the first message for incoming); never reused.
using PeerId = uint64_t;

// Everything a peer needs to reach one of our regions; travels in HELLO.
struct RegionInfo {
  Addr address;
  uint64_t size = 0;
  MemoryKind kind = MemoryKind::kHost;
  // The CUDA device of kCuda memory (the transport finds it at Register);
  // -1 for the host kinds.
  int device = -1;
  // Opaque, transport-specific: a packed UCX rkey, an IPC handle, a region id.
  std::vector<std::byte> remote_key;
};

// A local region registered with the transport. Destroying it deregisters
// the region: afterwards a peer's write into it fails instead of landing.
class LocalRegion : public Registration {
 public:
  virtual const RegionInfo& info() const = 0;
};

// A peer's region, imported on this side from its RegionInfo.
class RemoteRegion {
 public:
  virtual ~RemoteRegion() = default;
  virtual PeerId peer() const = 0;
  virtual const RegionInfo& info() const = 0;
  // Where this process can reach the region with a copy engine, when the
  // transport maps remote memory (caps().map_remote, or caps().
  // map_remote_read for reads only); Addr() otherwise. A copy may touch it
  // only while it holds a BeginMappedAccess (writes) or BeginMappedRead
  // (reads) access of the region.
  virtual Addr mapped_address() const = 0;
};

// A copy engine's access to a peer's region through its mapped_address()
// (the `direct` path), from Transport::BeginMappedAccess until this object
// is destroyed. While it lives, the region's owner cannot finish
// deregistering the region, and the connection's failure is not reported
// (on either end): see the fence above. Destroying it ends the access; it
// may be destroyed on any thread, also after the transport shut down.
class MappedAccess {
 public:
  virtual ~MappedAccess() = default;
};

// One transport write: `bytes` from local address `src` to remote address
// `dst` (the regions are given to Transport::Write).
struct WriteOp {
  Addr src;
  Addr dst;
  uint64_t bytes = 0;
};

// One transport read: `bytes` from the peer's address `src` to local address
// `dst` (the regions are given to Transport::Read).
struct ReadOp {
  Addr src;
  Addr dst;
  uint64_t bytes = 0;
};

using TransportDone = std::function<void(Status status)>;

// Counters since the transport started (for metrics and the bench).
struct TransportStats {
  uint64_t write_ops = 0;  // data-plane write operations issued
  uint64_t write_bytes = 0;
  uint64_t failed_write_ops = 0;
  uint64_t read_ops = 0;  // ranges copied by Read
  uint64_t read_bytes = 0;
  uint64_t flushes = 0;
  uint64_t messages_sent = 0;
  uint64_t messages_received = 0;
};

struct TransportCallbacks {
  // A complete control frame from `peer` (the transport does not parse it).
  std::function<void(PeerId peer, std::vector<std::byte> frame)> on_message;
  // The connection to `peer` is dead; called at most once per peer.
  std::function<void(PeerId peer, const Status& reason)> on_peer_failure;
};

// Progress that a transport lets its user drive on the user's own thread
// (Transport::TakeProgressSource; docs/transports.md, "Progress on the
// caller's thread"). The driver is one thread that calls Poll whenever it
// has time, and before it sleeps calls PrepareToSleep and then waits until
// fd() turns readable (or the time PrepareToSleep allowed passed). Work
// that other threads hand the transport makes fd() readable; so does work
// from the link. Callbacks the transport raises from Poll run on the
// driver's thread, exactly as they would on a thread of the transport's
// own (the same rules: no transport lock held, never inside the call that
// started the operation).
//
// Destroying the source detaches it: the transport runs that progress
// itself again (UCX: on a thread of its own). While attached, Shutdown waits
// for the driver to poll the source to its end, so a driver keeps polling
// until Shutdown returned (a Shutdown called on the driver's thread between
// its polls finishes the work there). Every method but the destructor runs
// on the driver's thread only; the destructor runs on any thread once no
// Poll runs.
class ProgressSource {
 public:
  virtual ~ProgressSource() = default;
  // Readable when Poll has something to do. Owned by the transport; valid
  // for the source's lifetime.
  virtual int fd() const = 0;
  // Runs what is ready, never blocking; true when it did anything.
  virtual bool Poll() = 0;
  // Readies the source for the driver's sleep: false when there is work
  // now (the driver polls again instead of sleeping). `*max_sleep` may be
  // lowered to cap the sleep (it comes in as the driver's own limit).
  virtual bool PrepareToSleep(std::chrono::microseconds* max_sleep) = 0;
};

class Transport {
 public:
  Transport() = default;
  Transport(const Transport&) = delete;
  Transport& operator=(const Transport&) = delete;
  virtual ~Transport() = default;

  virtual TransportCaps Caps() const = 0;

  // The capabilities of the connection to `peer` (see TransportCaps). The
  // default is Caps(). Errors: kNotFound for an unknown peer.
  virtual Result<TransportCaps> PeerCaps(PeerId /*peer*/) const { return Caps(); }

  // The capabilities of the connection to `peer` for memory of `kind`: what
  // the transport can do with a region of that kind on this connection
  // (whether `direct` maps or reads it, what it costs). The default is
  // PeerCaps(peer) with map_remote, read_remote and map_remote_read cleared
  // when the transport cannot reach `kind` at all (host_memory,
  // device_memory); transports whose answer depends on the kind (a
  // host-only read of a transport that also moves device memory) override
  // it. Errors: kNotFound for an unknown peer.
  virtual Result<TransportCaps> PeerCapsFor(PeerId peer, MemoryKind kind) const {
    Result<TransportCaps> caps = PeerCaps(peer);
    if (!caps.ok()) return caps;
    const bool host = kind != MemoryKind::kCuda;
    if (host ? !caps->host_memory : !caps->device_memory) {
      caps->map_remote = false;
      caps->read_remote = false;
      caps->map_remote_read = false;
    }
    return caps;
  }

  // The address peers pass to Connect.
  virtual std::string Address() const = 0;

  // Installs the callbacks and starts accepting peers and messages. Called
  // once, before any other call but Caps/Address/Register. Errors:
  // kFailedPrecondition when already started.
  virtual Status Start(TransportCallbacks callbacks) = 0;

  // Opens a connection to the transport at `address`. The peer learns our
  // PeerId from our first message. Errors: kUnavailable (nobody there),
  // kInvalidArgument (malformed address), kAborted (shut down).
  virtual Result<PeerId> Connect(std::string_view address) = 0;

  // Sends one control frame. Errors: kUnavailable when the connection is
  // dead, kNotFound for an unknown peer.
  virtual Status Send(PeerId peer, std::span<const std::byte> frame) = 0;

  // Registers [address, address + bytes) of `kind` memory. For kCuda the
  // transport finds the device the memory belongs to (info().device).
  // Errors: kInvalidArgument (empty region, a kind the transport cannot
  // reach, kCuda memory that is not device memory).
  virtual Result<std::unique_ptr<LocalRegion>> Register(Addr address, uint64_t bytes,
                                                        MemoryKind kind) = 0;

  // Imports a region `peer` exported. Errors: kInvalidArgument (a key this
  // transport cannot read), kNotFound (unknown peer).
  virtual Result<std::unique_ptr<RemoteRegion>> Import(PeerId peer, const RegionInfo& info) = 0;

  // Writes every op of `ops` — one transport operation each — from `source`
  // to `target`; `done` runs once when all completed locally (the source may
  // be reused), with the first error if any failed, or kCancelled when
  // `stop` skipped some (see Cancellation above). REQUIRES: `ops`, `source`
  // and `target` stay valid until `done` runs; every op lies inside `source`
  // and `target` (checked: kOutOfRange, nothing issued).
  virtual Status Write(const LocalRegion& source, const RemoteRegion& target,
                       std::span<const WriteOp> ops, TransportDone done,
                       std::stop_token stop) = 0;
  // The same without cancellation.
  Status Write(const LocalRegion& source, const RemoteRegion& target,
               std::span<const WriteOp> ops, TransportDone done) {
    return Write(source, target, ops, std::move(done), std::stop_token());
  }

  // Begins a mapped access to `target` (see MappedAccess); the caller holds
  // it for as long as a copy engine may touch target.mapped_address().
  // Errors: kUnimplemented when the transport cannot map peer memory,
  // kUnavailable when the connection is dead, kFailedPrecondition when the
  // region was deregistered by its owner, kAborted after Shutdown,
  // kInvalidArgument for a region another transport imported.
  virtual Result<std::unique_ptr<MappedAccess>> BeginMappedAccess(const RemoteRegion& target) = 0;

  // Begins a read-only mapped access to the peer's region `source`
  // (caps().map_remote_read): while it lives, this process's copy engine
  // may read source.mapped_address() (and nothing may write it). It counts
  // as a Read of the connection: on_peer_failure for the peer waits until
  // it ended (the fence above), so the caller releases it as soon as its
  // copy ended. A copy through it reads what the peer's memory holds then:
  // as with Read, whether the peer held those bytes throughout is the
  // session's question (docs/sessions.md). Errors: as BeginMappedAccess,
  // kUnimplemented when PeerCaps(peer).map_remote_read is false.
  virtual Result<std::unique_ptr<MappedAccess>> BeginMappedRead(const RemoteRegion& /*source*/) {
    return UnimplementedError(Caps().name + " transport cannot map peer memory for reading");
  }

  // Copies every op of `ops` from the peer's region `source` into the local
  // region `target`; `done` runs once when all have landed here, with the
  // first error if any failed, or kCancelled when `stop` skipped some (the
  // Write rules above). A read writes only this process's memory and only
  // reads the peer's, so it needs no fence on the peer's side: what it read
  // after the peer stopped caring is garbage the session discards (the
  // writer's KV_RESULT says whether its blocks were held throughout,
  // docs/sessions.md). On this side the fence holds: on_peer_failure for
  // the peer runs only after its reads ended. REQUIRES: `ops`, `source` and
  // `target` stay valid until `done` runs. Errors (nothing issued):
  // kUnimplemented when PeerCaps(peer).read_remote is false, kOutOfRange for
  // an op outside the regions, kUnavailable when the connection is dead,
  // kInvalidArgument for a region another transport made, kAborted after
  // Shutdown.
  virtual Status Read(const RemoteRegion& /*source*/, const LocalRegion& /*target*/,
                      std::span<const ReadOp> /*ops*/, TransportDone /*done*/,
                      std::stop_token /*stop*/) {
    return UnimplementedError(Caps().name + " transport cannot read peer memory");
  }

  // Completes once every write to `target.peer()` that completed before this
  // call is visible in the peer's memory.
  virtual Status Flush(PeerId peer, TransportDone done) = 0;

  // Closes the connection: both ends see on_peer_failure(reason).
  virtual void Disconnect(PeerId peer, const Status& reason) = 0;

  // Fails everything pending (messages already accepted still reach live
  // peers), stops and joins the transport's threads. Idempotent.
  virtual void Shutdown() = 0;

  virtual TransportStats Stats() const = 0;

  // Hands progress that the transport would run on a thread of its own to
  // the caller, who drives it from then on (ProgressSource): the agent runs
  // it on its control loop, so that frames and completions reach a request
  // without a thread hand-off. nullptr when the transport has nothing to
  // hand over (the default), already handed it over, or is shut down.
  virtual std::unique_ptr<ProgressSource> TakeProgressSource() { return nullptr; }
};

}  // namespace kvbounce

#endif  // KVBOUNCE_TRANSPORT_H_
