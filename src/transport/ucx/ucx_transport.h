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
// completes when every receiving rail acknowledged it.
//
// The fence. When a connection ends, each rail first stops accepting the
// peer's data (nothing of it lands here afterwards), then ends its own sends
// to the peer (completed, cancelled, or settled as failed when the peer is
// gone); then the transport tells the peer (FENCED) and raises
// on_peer_failure.
//
// Departures from kvbounce/transport.h (the conformance suite gates on the
// capabilities): pending_writes_fail is false; a write into a deregistered
// region lands nothing but is reported by the next Flush, not by its own
// `done`; map_remote is false (no `direct` over UCX yet).
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
