// Factories for the transports this build provides, for applications that
// only include the installed headers.
//
//   auto fabric = kvbounce::NewLoopbackFabric();
//   auto transport = kvbounce::NewLoopbackTransport(fabric, "ctx0-3").value();
//   options.transport = std::move(transport);
//
// Thread safety: the factories may be called from any thread.
#ifndef KVBOUNCE_TRANSPORTS_H_
#define KVBOUNCE_TRANSPORTS_H_

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "kvbounce/status.h"
#include "kvbounce/transport.h"

namespace kvbounce {

// Connects the loopback transports of one process; kept alive by every
// transport made on it.
class LoopbackFabric;
std::shared_ptr<LoopbackFabric> NewLoopbackFabric();

// A transport for agents of this process, at address "loopback:<name>".
// Errors: kInvalidArgument (null fabric, empty name), kAlreadyExists (the
// name is taken on the fabric).
Result<std::unique_ptr<Transport>> NewLoopbackTransport(std::shared_ptr<LoopbackFabric> fabric,
                                                        std::string name);

// What a loopback transport offers its agents (map_remote and read_remote
// on by default). Turning one off makes the transport behave like a link without it (tests of the
// paths and of `auto`).
struct LoopbackOptions {
  bool map_remote = true;   // BeginMappedAccess: `direct` copies by the writer
  bool read_remote = true;  // Read: `direct` copies by the receiver
  // BeginMappedRead: the receiver's `direct` read copies with its own copy
  // engine from the mapped peer pool instead of through Read (as over
  // cuda-ipc). Off by default, so that a loopback without map_remote
  // behaves like UCX between processes of one host.
  bool map_remote_read = false;
  // Device memory (builds with CUDA): registered and copied through the GPU
  // runtime. Off, the endpoint reaches host memory only, as Debian's UCX
  // does: device pools then stage through pinned host arenas.
  bool device_memory = true;
  // How long the endpoint's thread, out of work, keeps looking for more
  // before it sleeps (Config::poll_before_sleep_us, which the agent passes
  // here). In [0, Config::kMaxPollUs µs]; 0: it sleeps at once.
  std::chrono::microseconds poll_before_sleep{0};
};
Result<std::unique_ptr<Transport>> NewLoopbackTransport(std::shared_ptr<LoopbackFabric> fabric,
                                                        std::string name,
                                                        const LoopbackOptions& options);

// The UCX transport (docs/transports.md): one agent's UCP context with
// `num_workers` workers (rails), a listener at `listen_address`, active
// messages for control frames and RMA puts for data.
struct UcxTransportOptions {
  // "host:port" to listen on; port 0 picks a free port (Address() then tells
  // the one chosen). A host of 0.0.0.0 listens on every interface and
  // advertises this host's name.
  std::string listen_address = "127.0.0.1:0";
  // UCP workers, each with its own progress thread; a large write is striped
  // across them. In [1, Config::kMaxNumWorkers].
  int num_workers = 1;
  // A write op larger than this goes out as a pipeline of puts of this size.
  // 0 = the default (kDefaultUcxPutChunkBytes). In [4 KiB, 1 GiB] otherwise.
  uint64_t put_chunk_bytes = 0;
  // Puts to a peer on the same host use UCX's shared-memory transports
  // (cross-memory attach), with liveness from the TCP control connection.
  // Off: every byte takes the error-handling endpoints (TCP here).
  bool same_host_shared_memory = true;
  // Read (Transport::Read, the receiver's "direct read") between processes
  // of one host: this process copies a peer's registered memory straight
  // into its own with process_vm_readv(2), where the kernel lets it (a probe
  // at connection set-up; PeerCaps(peer).read_remote says per peer). Both
  // ends must have it on. Independent of same_host_shared_memory; a UCX_TLS
  // that names none of UCX's same-host transports (shm, sm, cma, posix,
  // sysv) turns it off too, so that UCX_TLS=tcp behaves as two hosts would.
  // Off: Read fails with kUnimplemented, and this transport offers its own
  // memory to no peer's Read.
  bool same_host_read = true;
  // How long Connect waits for the peer's transport handshake.
  std::chrono::milliseconds connect_timeout{10000};
  // How long a worker's progress thread keeps polling after its last piece
  // of work before it sleeps on the worker's event fd, and the reader
  // thread (direct read) after its last read before it sleeps (see
  // Config::poll_before_sleep_us, which the agent passes here). In
  // [0, Config::kMaxPollUs µs]; 0: it sleeps at once.
  std::chrono::microseconds poll_before_sleep{0};
};
inline constexpr uint64_t kDefaultUcxPutChunkBytes = uint64_t{1} << 20;

// True when this build has the UCX transport.
bool UcxTransportAvailable();

// A UCX transport listening at options.listen_address. Errors:
// kInvalidArgument (a malformed address or option), kUnavailable (UCX could
// not start or listen there), kUnimplemented (a build without UCX).
Result<std::unique_ptr<Transport>> NewUcxTransport(const UcxTransportOptions& options);

// The cuda-ipc transport (docs/transports.md): device memory of processes
// of one host, mapped with CUDA IPC handles and copied by the GPU; control
// frames on a Unix socket.
struct CudaIpcTransportOptions {
  // "unix:@name" (abstract namespace) or "unix:/path"; empty: a name unique
  // to this process and endpoint.
  std::string listen_address;
  // The device this rank's memory lives on: peers' regions are mapped for
  // it and its copies run there.
  int device = 0;
  // How long Connect waits for the peer's socket.
  std::chrono::milliseconds connect_timeout{10000};
  // How long the transport's threads (the socket's, the copies', the copy
  // engine's), out of work, keep looking for more before they sleep
  // (Config::poll_before_sleep_us, which the agent passes here). In
  // [0, Config::kMaxPollUs µs]; 0: they sleep at once.
  std::chrono::microseconds poll_before_sleep{0};
};

// A cuda-ipc transport. Errors: kUnimplemented (a build without CUDA),
// kUnavailable (no usable CUDA device), kInvalidArgument (a device the
// process lacks, a malformed address), kAlreadyExists or kUnavailable (the
// address is taken or cannot be listened on).
Result<std::unique_ptr<Transport>> NewCudaIpcTransport(const CudaIpcTransportOptions& options);

// Faults to inject into a transport's data plane (tests, benchmarks).
struct FaultInjection {
  double write_fail_rate = 0;          // per write operation, [0, 1]
  std::chrono::microseconds delay{0};  // before each write/flush completion
  int64_t drop_after_ops = 0;          // drop the connection after N operations
  uint64_t seed = 1;
};

// Wraps `inner` in a fault-injecting decorator. Errors: kInvalidArgument
// naming a bad field.
Result<std::unique_ptr<Transport>> NewFaultTransport(std::unique_ptr<Transport> inner,
                                                     const FaultInjection& faults);

}  // namespace kvbounce

#endif  // KVBOUNCE_TRANSPORTS_H_
