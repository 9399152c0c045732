// The loopback transport: every agent of one process, connected through a
// shared in-process fabric (docs/transports.md). Used by tests, the in-process bench
// and any deployment where ctx and gen ranks are threads of one process.
//
// Model
//   * A LoopbackFabric is the "network": a registry of named endpoints and of
//     every registered memory region of the process. Endpoints that should
//     reach each other share one fabric (several fabrics are isolated).
//   * A LoopbackTransport is one agent's endpoint, named uniquely on its
//     fabric; its address is "loopback:<name>".
//   * Each transport owns exactly one thread (created by Start, joined by
//     Shutdown) that serves one FIFO queue. That thread runs EVERY callback
//     of this transport: on_message, on_peer_failure, and the `done` of this
//     transport's own Write, Read and Flush calls. It also performs this
//     transport's writes (memcpy into the peer's memory) and reads (memcpy
//     from the peer's memory into its own). Unless the queue is handed to
//     a driver: see "Progress on a loop" below.
//   * LoopbackOptions (kvbounce/transports.h) say what an endpoint offers:
//     map_remote (BeginMappedAccess) and read_remote (Read), both on by
//     default. Caps() reports this endpoint's options; PeerCaps(peer)
//     reports what the connection offers: a capability only when BOTH ends
//     have it on, as a link either has it or not. BeginMappedAccess and Read
//     fail with kUnimplemented when PeerCaps(peer) says no (checked before
//     anything else when this end has it off; after the peer lookup when
//     only the peer has).
//
// Connections
//   * Connect(address) creates a bidirectional connection with one PeerId on
//     each end. PeerIds are unique across the fabric and never reused. The
//     accepting end learns its PeerId for us with our first message
//     (on_message(peer, ...)); if the connection dies before any message,
//     the accepting end still gets on_peer_failure for a PeerId it never saw
//     (ignore unknown ids).
//   * Send copies the frame into the receiving transport's queue. Frames of
//     one connection are delivered in the order sent, by the receiver's
//     thread. A frame that was queued before the connection died is still
//     delivered, before on_peer_failure; no on_message for a peer follows
//     its on_peer_failure.
//   * Connecting to an endpoint that exists but has not called Start yet
//     fails with kUnavailable (nobody is accepting); so does connecting to a
//     name nobody registered or one that was shut down.
//
// Memory
//   * Host memory only (kHost, kPinnedHost). The fabric keeps a registry of
//     live regions; a region's remote_key is its fabric-wide id, 8 bytes
//     little-endian. Ids are never reused.
//   * Same process, so a RemoteRegion's mapped_address() is the region's own
//     address (Caps().map_remote): a copy engine can write it directly (the
//     `direct` path). Such a copy is protected like a write only while its
//     caller holds a MappedAccess (see "Mapped access" below).
//   * Destroying a LocalRegion deregisters it: it first WAITS for every write
//     or read into or out of it that is in progress and for every
//     MappedAccess of it to end, so the memory may be freed as soon as the
//     destructor returns; every write or read that reaches the region
//     afterwards fails (kFailedPrecondition) without touching memory.
//     Deregistration does not cut a running batch short: the destructor
//     waits until the batch ended (completed, or stopped by a stop request
//     or a dead connection). A
//     LocalRegion only needs the fabric (not the transport) to deregister,
//     so it may be destroyed after the transport, though the Transport
//     contract asks for the opposite order.
//
// Writes
//   * Write checks everything it can before accepting (the source is a
//     region this transport registered, the target was imported by this
//     transport for a live peer, every op lies inside both: kOutOfRange,
//     nothing issued), then queues ONE entry for the whole batch: no per-op
//     allocation; `ops` itself is borrowed (see the Transport contract).
//   * When the thread reaches the batch it checks, in this order, that the
//     connection is alive (else kUnavailable), that no stop was requested
//     (else kCancelled) and that both regions are still registered (else
//     kFailedPrecondition); nothing is copied in each case. Otherwise it
//     pins both regions (what deregistration waits for) and copies the ops
//     in order, each in pieces of at most kWriteGrainBytes (one piece for an
//     op of that size or less, so also one for a zero-byte op). Before EVERY
//     piece it checks the connection's liveness and then the stop token, and
//     ends the batch there when either says so: a piece once begun is copied
//     whole, nothing after it is. Then it unpins and calls `done`.
//   * Flush(peer) is queued behind every earlier Write of this transport (one
//     FIFO), so when its `done` runs with OK every write to that peer issued
//     before it has landed.
//
// Reads (Read: the peer's region into one of ours)
//   * Exactly as a write with the roles swapped, on this transport's thread
//     and queue: Read checks what it can before accepting (kUnimplemented as
//     above; the source was imported by this transport for a live peer and
//     the target registered by it, else kInvalidArgument; an empty `done`,
//     kInvalidArgument; every op inside both regions, else kOutOfRange,
//     nothing issued; kUnavailable for a dead connection, kNotFound for an
//     unknown peer, kAborted after Shutdown) and queues one entry for the
//     batch. The thread then runs the checks, pins, pieces, hook calls,
//     cancellation and liveness rules of "Writes" and "Cancellation" below
//     (messages say "read from <peer>"): a peer region deregistered by its
//     owner fails the read with kFailedPrecondition; while the read copies,
//     that region's deregistration waits, so the peer's memory stays
//     readable; the read counts in its connection's operations in progress
//     (see the fence), so on_peer_failure, on either end, follows its end.
//     Its `done` runs on this transport's thread, before the failure
//     notification of its connection when that dies.
//
// Cancellation (Write's std::stop_token)
//   * Requested before the thread starts the batch (also while the batch is
//     still queued: it then completes in its turn, behind earlier items):
//     nothing is copied, `done` gets kCancelled.
//   * Requested while the batch runs: the piece being copied completes, the
//     rest is skipped, `done` gets kCancelled. The message says what was
//     skipped: "... stopped: <k> of <n> ops (<b> of <B> bytes) not copied",
//     where an op cut short after some of its pieces counts as not copied
//     (its bytes that were copied do not count in <b>).
//   * Requested after the last piece was copied: `done` gets OK. A batch of
//     no ops has nothing to skip: OK as well.
//   * When the connection is also dead, the batch reports kUnavailable.
//
// Stats() (TransportStats)
//   * write_ops, write_bytes: ops and bytes of every batch Write accepted,
//     counted when it accepts it, whatever becomes of the batch.
//   * read_ops, read_bytes: ops of Read batches copied whole, and the bytes
//     copied (also of an op cut short), counted when the batch ends, before
//     its `done` runs.
//   * failed_write_ops: ops of accepted batches that did not land whole:
//     every op of a batch that ended before copying anything (dead
//     connection, stop, deregistered region, Shutdown), and the ops skipped
//     or cut short when a batch ended part-way. Once every `done` ran,
//     write_ops - failed_write_ops ops landed in full.
//   * flushes: flushes accepted; messages_sent: frames accepted by Send;
//     messages_received: frames delivered to on_message.
//
// Failure and the fence
//   * Disconnect(peer, reason) kills the connection for both ends, once. It
//     is dead from that moment: each end's writes, reads and flushes for it
//     still queued fail with kUnavailable without copying (their callbacks
//     run, in queue order, before the failure notification); a write or
//     read of it in progress on either end's thread ends before its next
//     piece with kUnavailable (the message also says, as above, what was not
//     copied); new Send/Write/Read/Flush/Import/BeginMappedAccess for it
//     fail with kUnavailable. on_peer_failure runs once on each end, on each end's own
//     thread. The initiating end gets `reason` itself; the other end gets
//     the same code with the initiator's address as context. An OK `reason`
//     is replaced by kUnavailable "disconnected". Disconnect of an unknown or
//     already dead peer does nothing.
//   * The fence: each connection counts its operations in progress: a write
//     or read batch (of either end) from the moment its thread decided to
//     run it (its liveness check passed) until its memcpys stopped, and
//     every live MappedAccess of it. The on_peer_failure notifications of BOTH ends are
//     queued only once the connection is dead AND that count is zero, by
//     whoever brings it to zero (the writing thread, or the thread that
//     destroys the last MappedAccess). So on_peer_failure proves that
//     nothing of the connection touches either end's memory any more. A
//     dead connection whose notifications wait for its count is reported by
//     LoopbackFabric::num_connections_awaiting_fence().
//   * Shutdown(): removes the endpoint from the fabric (its name can be
//     reused at once), kills every connection (each remote end gets
//     on_peer_failure with kUnavailable "endpoint loopback:<name> shut
//     down", behind the fence above), fails this transport's queued writes
//     reads and flushes with kAborted and drops queued messages and failure
//     notifications (the shutting-down end gets NO on_peer_failure for its
//     own peers), joins the thread. A write or read of this transport in
//     progress ends at its next piece (its connection is dead), so once
//     Shutdown returns no copy of this transport touches memory. Writes and
//     reads of PEERS into and out of this endpoint's regions run on the
//     peers' threads: they too end at their next piece, and destroying the
//     region waits until they did. Idempotent; the destructor calls it. No
//     callback runs after it returns. Every call made after it started fails
//     with kAborted (Send, Write, Read, Flush, Connect, Import, Register,
//     BeginMappedAccess), except that Read and BeginMappedAccess say
//     kUnimplemented first when this end has them turned off.
//
// Mapped access (BeginMappedAccess)
//   * For a region this transport imported, on a live connection, while the
//     region is registered, BeginMappedAccess returns a guard that pins the
//     region (its owner's LocalRegion destructor waits until the guard is
//     destroyed) and counts in its connection's operations in progress (so
//     a failure of the connection is reported, on either end, only after the
//     guard is destroyed). Nothing revokes it: its holder destroys it when
//     its copies are done, and so must not wait for on_peer_failure or for
//     the region's deregistration while holding it. The guard shares
//     ownership of what it needs (fabric, connection, region entry), so it
//     may be destroyed on any thread, at any time, also after both
//     transports shut down.
//   * Errors: kUnimplemented when PeerCaps(peer).map_remote is false (see
//     LoopbackOptions above), kInvalidArgument for a region this transport
//     did not import, kUnavailable when the connection is dead,
//     kFailedPrecondition when the owner deregistered the region, kAborted
//     after Shutdown, kFailedPrecondition before Start.
//   * BeginMappedRead is the same guard for a copy that only reads the
//     region (the receiver's `direct` read with its own copy engine),
//     offered where both ends have LoopbackOptions::map_remote_read on
//     (kUnimplemented otherwise), independently of map_remote.
//
// Progress on a loop (TakeProgressSource; kvbounce/transport.h, ProgressSource)
//   * TakeProgressSource hands the queue to the caller's thread (an agent's
//     control loop): from then on the driver's Poll runs the queue's items
//     in order, up to kItemsPerPoll of them per call, and raises their
//     callbacks on the driver's thread — a frame reaches the agent without
//     a hand-off between threads. A write or read batch of more than
//     kDriverCopyBytes (64 KiB) or kDriverCopyOps (64) ops, one of device
//     memory, and any copy while a write hook is set (see SetWriteHook) is
//     handed to the transport's thread instead, so the driver never runs a
//     long copy or waits on a device; the driver takes no further item
//     until that one ran, so items still run one at a time, in queue order,
//     and every rule above (order of frames, of `done`s and of the failure
//     notification, the fence) holds as before. Callbacks then come from
//     two threads, never at once.
//   * fd() turns readable when the driver has work after PrepareToSleep.
//     Destroying the source hands the whole queue back to the thread.
//     Shutdown may run on any thread but the driver's while it runs an
//     item (from a callback: reported, aborts); it fails what is still
//     queued once no item runs. The source may outlive the transport.
//   * At most one source per transport: later calls, and calls after
//     Shutdown, return nullptr.
//
// Errors of each call (besides those above):
//   * Before Start: Connect/Send/Write/Read/Flush/Import/PeerCaps fail with
//     kFailedPrecondition. Start twice: kFailedPrecondition.
//   * Unknown PeerId: kNotFound (Send, Write, Read, Flush, Import, PeerCaps).
//   * Connect: kInvalidArgument for an address not of the form
//     "loopback:<name>".
//   * Register: kInvalidArgument for 0 bytes, a null address, a range that
//     wraps around, or kCuda memory.
//   * Import: kInvalidArgument for a key that is not 8 bytes, for a region
//     that belongs to another agent than `peer`, or whose address, size or
//     kind disagree with the registry; kNotFound for a region id that is not
//     (or no longer) registered.
//   * Write: kInvalidArgument when the source was not registered by this
//     transport, the target was not imported by it, or `done` is empty;
//     kOutOfRange as above.
//
// Thread safety: every method is thread-safe and may be called from any
// thread, including from this or another loopback transport's callbacks —
// except Shutdown and the destructor, which must not run on this transport's
// own thread (from one of its callbacks): that is reported and aborts.
//
// Ownership: a LoopbackTransport, each of its regions and each MappedAccess
// hold a reference to the fabric, so the fabric lives as long as any of them.
#ifndef KVBOUNCE_TRANSPORT_LOOPBACK_LOOPBACK_TRANSPORT_H_
#define KVBOUNCE_TRANSPORT_LOOPBACK_LOOPBACK_TRANSPORT_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <stop_token>
#include <string>
#include <string_view>

#include "kvbounce/status.h"
#include "kvbounce/transport.h"
#include "kvbounce/transports.h"
#include "kvbounce/types.h"
#include "memory/allocation.h"

namespace kvbounce {

namespace loopback_internal {
class FabricImpl;
class Endpoint;
}  // namespace loopback_internal

// The in-process "network" that loopback endpoints connect through.
//
// Thread safety: all methods are thread-safe.
class LoopbackFabric {
 public:
  // See SetWriteHook.
  using WriteHook = std::function<void(std::string_view writer_address, size_t op_index)>;

  static std::shared_ptr<LoopbackFabric> Create();
  ~LoopbackFabric();

  LoopbackFabric(const LoopbackFabric&) = delete;
  LoopbackFabric& operator=(const LoopbackFabric&) = delete;

  // Observers for tests: endpoints created and not yet shut down, and regions
  // registered and not yet deregistered (a region leaves this count when its
  // deregistration BEGINS, before the destructor waits for its pins).
  size_t num_endpoints() const;
  size_t num_regions() const;

  // Observers for tests: connections not yet killed, and connections killed
  // whose on_peer_failure notifications still wait for the fence (a write
  // in progress or a MappedAccess alive; see the file comment).
  size_t num_live_connections() const;
  size_t num_connections_awaiting_fence() const;

  // A test seam, for tests only: `hook` is called on the copying endpoint's
  // thread before each piece of every write or read op of every endpoint of
  // this fabric is checked and copied (see "Writes": once per op of at most
  // kWriteGrainBytes, once per piece of a larger one), with the address of
  // the endpoint that copies (the writer, or the reader) and the op's index
  // in its batch. It runs with both regions
  // pinned and the batch counted in its connection's operations in progress,
  // and no lock held, so a test may block inside it to hold a write
  // part-way through its batch; whatever it changes (a stop requested, a
  // connection killed) is seen by the checks of that very piece. A batch
  // uses the hook in force when its thread started running it. An empty
  // function removes it. Blocking in it blocks the writer's thread, so
  // that endpoint's Shutdown waits for it.
  void SetWriteHook(WriteHook hook);

 private:
  friend class LoopbackTransport;
  friend class loopback_internal::Endpoint;

  LoopbackFabric();

  std::unique_ptr<loopback_internal::FabricImpl> impl_;
};

class LoopbackTransport final : public Transport {
 public:
  // The prefix of every loopback address.
  static constexpr std::string_view kAddressPrefix = "loopback:";

  // The loopback's grain: a write or read op is copied in pieces of at most
  // this many bytes, and the stop token and the connection's liveness are
  // checked before each piece (see "Writes" in the file comment).
  static constexpr uint64_t kWriteGrainBytes = MiB(1);

  // Creates the endpoint `name` on `fabric`, offering what `options` say.
  // The transport is not started: call Start before connecting or sending
  // (peers cannot connect to it until then).
  //
  // Errors: kInvalidArgument when `fabric` is null or `name` is empty;
  // kAlreadyExists when a live endpoint of that name exists on the fabric.
  static Result<std::unique_ptr<LoopbackTransport>> Create(std::shared_ptr<LoopbackFabric> fabric,
                                                           std::string name,
                                                           const LoopbackOptions& options = {});

  // Runs Shutdown(). REQUIRES: not called on this transport's own thread.
  ~LoopbackTransport() override;

  // The endpoint's name on its fabric.
  const std::string& name() const;

  // name "loopback", host_memory; map_remote and read_remote as the
  // options say; no device memory; callbacks one at a time
  // (concurrent_callbacks false); writes queued on a dead connection fail
  // (pending_writes_fail). Cost: a write op is a memcpy on the transport's
  // thread, so kLoopbackOpUs per op (calibrated: the liveness and stop
  // checks around the call) and the host's memcpy rate
  // (common/memcpy_rate.h, measured once per process) per byte; a read op
  // is the same memcpy, so read_cost is the same figures.
  TransportCaps Caps() const override;
  static constexpr double kLoopbackOpUs = 0.05;
  // Caps() with map_remote and read_remote true only where both ends of the
  // connection offer them. Errors: kNotFound for an unknown peer,
  // kFailedPrecondition before Start, kAborted after Shutdown.
  Result<TransportCaps> PeerCaps(PeerId peer) const override;
  // For kCuda memory, the cost of the GPU runtime's copies (one call per
  // operation) instead of memcpy's.
  Result<TransportCaps> PeerCapsFor(PeerId peer, MemoryKind kind) const override;
  // "loopback:<name>".
  std::string Address() const override;
  // Starts the transport's thread. Errors: kFailedPrecondition when already
  // started, kAborted after Shutdown, kResourceExhausted when the thread
  // cannot be created.
  Status Start(TransportCallbacks callbacks) override;
  Result<PeerId> Connect(std::string_view address) override;
  Status Send(PeerId peer, std::span<const std::byte> frame) override;
  Result<std::unique_ptr<LocalRegion>> Register(Addr address, uint64_t bytes,
                                                MemoryKind kind) override;
  Result<std::unique_ptr<RemoteRegion>> Import(PeerId peer, const RegionInfo& info) override;
  // See "Writes" and "Cancellation" in the file comment.
  using Transport::Write;
  Status Write(const LocalRegion& source, const RemoteRegion& target, std::span<const WriteOp> ops,
               TransportDone done, std::stop_token stop) override;
  // See "Reads" in the file comment.
  Status Read(const RemoteRegion& source, const LocalRegion& target, std::span<const ReadOp> ops,
              TransportDone done, std::stop_token stop) override;
  // See "Mapped access" in the file comment.
  Result<std::unique_ptr<MappedAccess>> BeginMappedAccess(const RemoteRegion& target) override;
  Result<std::unique_ptr<MappedAccess>> BeginMappedRead(const RemoteRegion& source) override;
  Status Flush(PeerId peer, TransportDone done) override;
  void Disconnect(PeerId peer, const Status& reason) override;
  void Shutdown() override;
  // See "Stats()" in the file comment.
  TransportStats Stats() const override;
  // See "Progress on a loop" in the file comment.
  std::unique_ptr<ProgressSource> TakeProgressSource() override;

 private:
  explicit LoopbackTransport(std::shared_ptr<loopback_internal::Endpoint> endpoint);

  std::shared_ptr<loopback_internal::Endpoint> endpoint_;
};

}  // namespace kvbounce

#endif  // KVBOUNCE_TRANSPORT_LOOPBACK_LOOPBACK_TRANSPORT_H_
