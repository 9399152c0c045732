// The loopback transport: every agent of one process, connected through a
// shared in-process fabric (DESIGN §8). Used by tests, the in-process bench
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
//     transport's own Write and Flush calls. It also performs this
//     transport's writes (memcpy into the peer's memory).
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
//     `direct` path). Such direct copies bypass the transport and so are NOT
//     protected by the deregistration rules below.
//   * Destroying a LocalRegion deregisters it: it first WAITS for every copy
//     into or out of it that is in progress to finish, so the memory may be
//     freed as soon as the destructor returns; every write that reaches the
//     region afterwards fails (kFailedPrecondition) without touching memory.
//     A LocalRegion only needs the fabric (not the transport) to deregister,
//     so it may be destroyed after the transport, though the Transport
//     contract asks for the opposite order.
//
// Writes
//   * Write checks everything it can before accepting (the source is a
//     region this transport registered, the target was imported by this
//     transport for a live peer, every op lies inside both: kOutOfRange,
//     nothing issued), then queues ONE entry for the whole batch: no per-op
//     allocation; `ops` itself is borrowed (see the Transport contract).
//   * The thread executes the batch in op order as memcpy, after checking
//     that the connection is alive (else kUnavailable) and that both regions
//     are still registered (else kFailedPrecondition, nothing copied), and
//     holding a pin on both regions for the duration (what deregistration
//     waits for). Then it calls `done`.
//   * Each op counts as one transport operation in Stats().write_ops.
//   * Flush(peer) is queued behind every earlier Write of this transport (one
//     FIFO), so when its `done` runs with OK every write to that peer issued
//     before it has landed.
//
// Failure
//   * Disconnect(peer, reason) kills the connection for both ends, once:
//     each end's writes and flushes for it still queued fail with
//     kUnavailable (their callbacks run, in queue order, before the
//     failure notification), new Send/Write/Flush/Import for it fail with
//     kUnavailable, and on_peer_failure runs once on each end, on each end's
//     own thread. The initiating end gets `reason` itself; the other end
//     gets the same code with the initiator's address as context. An OK
//     `reason` is replaced by kUnavailable "disconnected". Disconnect of an
//     unknown or already dead peer does nothing.
//   * Shutdown(): removes the endpoint from the fabric (its name can be
//     reused at once), kills every connection (each remote end gets
//     on_peer_failure with kUnavailable "endpoint loopback:<name> shut
//     down"), fails this transport's queued writes and flushes with kAborted
//     and drops queued messages and failure notifications (the shutting-down
//     end gets NO on_peer_failure for its own peers), joins the thread.
//     Idempotent; the destructor calls it. No callback runs after it
//     returns. Every call made after it started fails with kAborted (Send,
//     Write, Flush, Connect, Import, Register).
//
// Errors of each call (besides those above):
//   * Before Start: Connect/Send/Write/Flush/Import fail with
//     kFailedPrecondition. Start twice: kFailedPrecondition.
//   * Unknown PeerId: kNotFound (Send, Write, Flush, Import).
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
// Ownership: a LoopbackTransport and each of its regions hold a reference to
// the fabric, so the fabric lives as long as any of them.
#ifndef KVBOUNCE_TRANSPORT_LOOPBACK_LOOPBACK_TRANSPORT_H_
#define KVBOUNCE_TRANSPORT_LOOPBACK_LOOPBACK_TRANSPORT_H_

#include <cstddef>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "kvbounce/status.h"
#include "kvbounce/transport.h"
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
  static std::shared_ptr<LoopbackFabric> Create();
  ~LoopbackFabric();

  LoopbackFabric(const LoopbackFabric&) = delete;
  LoopbackFabric& operator=(const LoopbackFabric&) = delete;

  // Observers for tests: endpoints created and not yet shut down, and regions
  // registered and not yet deregistered.
  size_t num_endpoints() const;
  size_t num_regions() const;

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

  // Creates the endpoint `name` on `fabric`. The transport is not started:
  // call Start before connecting or sending (peers cannot connect to it
  // until then).
  //
  // Errors: kInvalidArgument when `fabric` is null or `name` is empty;
  // kAlreadyExists when a live endpoint of that name exists on the fabric.
  static Result<std::unique_ptr<LoopbackTransport>> Create(std::shared_ptr<LoopbackFabric> fabric,
                                                           std::string name);

  // Runs Shutdown(). REQUIRES: not called on this transport's own thread.
  ~LoopbackTransport() override;

  // The endpoint's name on its fabric.
  const std::string& name() const;

  // name "loopback", host_memory, map_remote; no device memory.
  TransportCaps Caps() const override;
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
  using Transport::Write;
  Status Write(const LocalRegion& source, const RemoteRegion& target, std::span<const WriteOp> ops,
               TransportDone done, std::stop_token stop) override;
  Result<std::unique_ptr<MappedAccess>> BeginMappedAccess(const RemoteRegion& target) override;
  Status Flush(PeerId peer, TransportDone done) override;
  void Disconnect(PeerId peer, const Status& reason) override;
  void Shutdown() override;
  TransportStats Stats() const override;

 private:
  explicit LoopbackTransport(std::shared_ptr<loopback_internal::Endpoint> endpoint);

  std::shared_ptr<loopback_internal::Endpoint> endpoint_;
};

}  // namespace kvbounce

#endif  // KVBOUNCE_TRANSPORT_LOOPBACK_LOOPBACK_TRANSPORT_H_
