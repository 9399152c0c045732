// The UCX transport: agents in different processes and on different hosts
// (docs/transports.md describes it in full).
//
// One transport is one UCP context with `num_workers` UCP workers ("rails"),
// each driven by its own progress thread that sleeps on the worker's event fd
// (ucp_worker_arm + epoll) and on an eventfd that other threads use to hand
// it work. Every UCP call on a worker happens on that worker's thread, so the
// workers run in UCX's single-thread mode.
//
// Progress. TakeProgressSource hands rail 0 to the caller: its thread ends
// and is joined, and the caller's thread runs it through the ProgressSource
// (kvbounce/transport.h) from then on — the agent's control loop, so that
// the session and UCX share a thread. Shutdown then waits for the driver to
// poll rail 0 to its end; a source destroyed before that gives rail 0 its
// thread back. Callbacks of rail 0 then run on the driver's thread.
//
// Connections. Rail 0 listens at `listen_address` (a UCP listener). A
// connection has one control endpoint, client-server over TCP with peer
// error handling, on rail 0: it carries the transport's own handshake, the
// session's control frames (UCP active messages, sent eager, in order) and
// the close handshake. Once the handshake has exchanged the rails' worker
// addresses, each side opens one data endpoint per rail to the peer's rail
// of the same index. Between processes of one host (same boot id) with
// `same_host_shared_memory`, data endpoints have no error handling, so UCX
// takes its shared-memory transports; otherwise
// they use peer error handling like the control endpoint (TCP here, RDMA
// verbs where present). UCX 1.13 cannot give a shared-memory endpoint error
// handling, which is why liveness always comes from the control endpoint.
//
// Data. Each op is cut into sends of at most `put_chunk_bytes`, dealt
// round-robin across the rails; a send is an active message naming the
// writer and the destination address, and the receiving rail copies it in
// only when it still accepts that writer and the range lies inside a live
// registered region (not RMA puts: docs/transports.md says why). A rail
// keeps at most kPutWindow sends in flight and checks the write's stop token
// before each. Flush sends a flush message behind the data on every rail and
// completes when every receiving rail acknowledged it (on its own data
// endpoint).
//
// Reads. Between processes of one host, Read copies a peer's registered
// memory into this process with process_vm_readv(2) (cross-memory attach:
// the kernel copies from the peer's address space, no link involved). The
// handshake carries each side's pid and the address and value of a random
// "read cookie" in its memory; the side that may read reads the peer's
// cookie back once (a probe) and PeerCaps(peer).read_remote is true only
// when it matched: same host identity (boot id and pid namespace),
// `same_host_read` on both ends, and the kernel allows it (EPERM from Yama's
// ptrace_scope, a container's seccomp profile or other credentials turns it
// off for that peer, with an info line in the log saying why). Caps() says
// read_remote when `same_host_read` is on: some peers may be readable.
// One reader thread per transport (started by Create, joined by Shutdown)
// runs every Read, one at a time in the order accepted, off the rails (UCX
// progress never waits for a copy) — but a Read of at most kLoopReadBytes
// while rail 0 is driven by a caller (Progress, above) runs on rail 0, on
// that caller's thread, after the caller's current work: each call copies up to IOV_MAX ranges
// and at most `put_chunk_bytes` bytes (a larger op takes several calls),
// and before each call the reader checks the transport's shutdown, the
// connection's end and the stop token, so a Read ends at its next call. A
// read's `done` runs on the thread that ran it. Errors in `done`: kUnavailable
// when the connection ended or the peer process is gone (ESRCH, or its
// pidfd says it exited: a pid is never trusted after its process exited),
// kFailedPrecondition when the peer's range is not mapped (EFAULT: the
// peer freed it), kCancelled, kAborted (Shutdown), kResourceExhausted
// (ENOMEM); every message names the peer and its pid and carries the errno
// text. The peer's region is not pinned: a peer that deregistered it may
// be read anyway (its old contents or garbage, which the session discards).
// Read refuses at once: kUnimplemented (PeerCaps(peer).read_remote false),
// kOutOfRange, kInvalidArgument (foreign regions, empty `done`), kNotFound,
// kUnavailable (connection closed), kAborted, kFailedPrecondition (before
// Start). The target region's deregistration waits for the reads into it.
//
// The fence. When a connection ends, each rail first stops accepting the
// peer's data (nothing of it lands here afterwards), then ends its own sends
// to the peer (completed, cancelled, or settled as failed when the peer is
// gone); then the transport tells the peer (FENCED); once also every Read of
// the peer ended (stopped at its next call; its `done` returned), it raises
// on_peer_failure.
//
// Departures from kvbounce/transport.h (the conformance suite gates on the
// capabilities): pending_writes_fail is false; a write into a deregistered
// region lands nothing but is reported by the next Flush, not by its own
// `done`; map_remote is false (`direct` between processes is the receiver's
// Read, docs/sessions.md); a Read of a region
// its owner deregistered is not refused (see Reads). Stats: read_ops and
// read_bytes count the ranges read whole and the bytes of the calls that
// succeeded.
//
// Thread safety: every public method is thread-safe. Callbacks run on the
// rail threads (control callbacks on rail 0, or on its driver's thread) and
// on the reader thread (read completions), with no transport lock held; concurrent_callbacks is
// true with more than one rail or with same_host_read. Shutdown must not be called from a callback.
#ifndef KVBOUNCE_TRANSPORT_UCX_UCX_TRANSPORT_H_
#define KVBOUNCE_TRANSPORT_UCX_UCX_TRANSPORT_H_

#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <stop_token>
#include <string>
#include <string_view>

#include "kvbounce/status.h"
#include "kvbounce/transport.h"
#include "kvbounce/transports.h"

namespace kvbounce {

namespace ucx_internal {
class Engine;
}  // namespace ucx_internal

class UcxTransport final : public Transport {
 public:
  // Puts in flight per rail.
  static constexpr int kPutWindow = 128;
  static constexpr uint64_t kMinPutChunkBytes = uint64_t{4} << 10;
  static constexpr uint64_t kMaxPutChunkBytes = uint64_t{1} << 30;
  // How long Shutdown waits for open peers to confirm the close (each has
  // then taken every message this transport sent it) before it cuts them.
  static constexpr std::chrono::milliseconds kShutdownDrain{2000};
  // A Read of at most this many bytes runs on rail 0 while a caller drives
  // it (TakeProgressSource), not on the reader thread.
  static constexpr uint64_t kLoopReadBytes = uint64_t{64} << 10;

  // Creates the context, the workers and their threads, and listens.
  // Errors: kInvalidArgument naming a bad option, kUnavailable when UCX
  // cannot start or cannot listen at the address.
  static Result<std::unique_ptr<UcxTransport>> Create(const UcxTransportOptions& options);

  ~UcxTransport() override;

  TransportCaps Caps() const override;
  Result<TransportCaps> PeerCaps(PeerId peer) const override;
  std::string Address() const override;
  Status Start(TransportCallbacks callbacks) override;
  Result<PeerId> Connect(std::string_view address) override;
  Status Send(PeerId peer, std::span<const std::byte> frame) override;
  Result<std::unique_ptr<LocalRegion>> Register(Addr address, uint64_t bytes,
                                                MemoryKind kind) override;
  Result<std::unique_ptr<RemoteRegion>> Import(PeerId peer, const RegionInfo& info) override;
  using Transport::Write;
  Status Write(const LocalRegion& source, const RemoteRegion& target,
               std::span<const WriteOp> ops, TransportDone done, std::stop_token stop) override;
  // See "Reads" in the file comment.
  Status Read(const RemoteRegion& source, const LocalRegion& target, std::span<const ReadOp> ops,
              TransportDone done, std::stop_token stop) override;
  Result<std::unique_ptr<MappedAccess>> BeginMappedAccess(const RemoteRegion& target) override;
  Status Flush(PeerId peer, TransportDone done) override;
  void Disconnect(PeerId peer, const Status& reason) override;
  void Shutdown() override;
  TransportStats Stats() const override;
  // Rail 0 (see "Progress" in the file comment).
  std::unique_ptr<ProgressSource> TakeProgressSource() override;

 private:
  explicit UcxTransport(std::shared_ptr<ucx_internal::Engine> engine);

  std::shared_ptr<ucx_internal::Engine> engine_;
};

// Parses "host:port" (a name, an IPv4 address, or an IPv6 address in
// brackets; port in [0, 65535]). Errors: kInvalidArgument saying what is
// wrong.
struct HostPort {
  std::string host;
  uint16_t port = 0;
};
Result<HostPort> ParseHostPort(std::string_view address);

}  // namespace kvbounce

#endif  // KVBOUNCE_TRANSPORT_UCX_UCX_TRANSPORT_H_
