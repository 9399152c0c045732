// The UCX transport: agents in different processes and on different hosts
// (docs/transports.md describes it in full).
//
// One transport is one UCP context with `num_workers` UCP workers ("rails"),
// each driven by its own progress thread that sleeps on the worker's event fd
// (ucp_worker_arm + epoll) and on an eventfd that other threads use to hand
// it work. Every UCP call on a worker happens on that worker's thread, so the
// workers run in UCX's single-thread mode.
//
// Connections. Rail 0 listens at `listen_address` (a UCP listener). A
// connection has one control endpoint, client-server over TCP with peer
// error handling, on rail 0: it carries the transport's own handshake, the
// session's control frames (UCP active messages, sent eager, in order) and
// the close handshake. Once the handshake has exchanged the rails' worker
// addresses, each side opens one data endpoint per rail to the peer's rail
// of the same index. Between processes of one host (same boot id) with
// `same_host_shared_memory`, data endpoints have no error handling, so UCX
// takes its shared-memory transports (cross-memory attach for RMA); otherwise
// they use peer error handling like the control endpoint (TCP here, RDMA
// verbs where present). UCX 1.13 cannot give a shared-memory endpoint error
// handling, which is why liveness always comes from the control endpoint.
//
// Writes. Each op is cut into puts of at most `put_chunk_bytes`; the puts of
// a batch are dealt round-robin across the rails; a rail keeps at most
// kPutWindow puts in flight and checks the batch's stop token before each
// put it starts (the grain of a stop is one put). A put that UCX completes
// inside ucp_put_nbx counts at once; completions never run inside the
// caller's Write (the rails issue the puts). Flush flushes the peer's data
// endpoint on every rail.
//
// The fence. When a connection ends — Disconnect, a malformed handshake, a
// control endpoint error (the peer died), the peer's close — the transport
// first stops its own writes to the peer (queued puts are skipped; each rail
// closes its data endpoint, flushing it when the peer is alive, and waits for
// every put it had started), then tells the peer with a FENCED message on
// the control endpoint. on_peer_failure runs once both halves hold: this
// side's writes ended, and the peer confirmed the same for its writes (its
// FENCED arrived) or the control endpoint failed (the peer is gone). A live
// peer that stops answering holds the fence until it answers or dies: across
// processes nothing else can prove that its writes ended.
//
// Departures from the contract in kvbounce/transport.h, which the
// conformance suite gates on the capabilities:
//   * pending_writes_fail is false: a put already handed to the network may
//     land after its peer is gone; the fence above still holds.
//   * Destroying a LocalRegion waits for this transport's own writes that
//     read from it; a peer's writes into it cannot be revoked from here (TCP
//     and cross-memory attach do not check registrations) and are fenced by
//     the session protocol (a KV_RESULT, or on_peer_failure).
//   * map_remote is false: there is no `direct` path over UCX yet.
//   * Import checks a key's format and that it was exported by that very
//     peer, not that the region is still registered.
//
// Thread safety: every public method is thread-safe. Callbacks run on the
// rail threads (control callbacks on rail 0), with no transport lock held.
#ifndef KVBOUNCE_TRANSPORT_UCX_UCX_TRANSPORT_H_
#define KVBOUNCE_TRANSPORT_UCX_UCX_TRANSPORT_H_

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
  Result<std::unique_ptr<MappedAccess>> BeginMappedAccess(const RemoteRegion& target) override;
  Status Flush(PeerId peer, TransportDone done) override;
  void Disconnect(PeerId peer, const Status& reason) override;
  void Shutdown() override;
  TransportStats Stats() const override;

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
