// The cuda-ipc transport (docs/transports.md, "cuda-ipc"): device memory of
// processes of one host, moved by the GPU through CUDA IPC mappings, with
// control frames on a Unix socket (transport/unix/unix_channel.h).
//
// Model
//   * Memory: device memory only (kCuda, of any device this process can
//     use). Register exports the allocation that holds the region with the
//     runtime's IPC handle (DeviceSupport::Share); the region's remote key
//     carries the handle, the region's offset in its allocation and the
//     exporter's pid. Import opens the handle in this process on
//     `options.device` (DeviceSupport::OpenShare): from then on the peer's
//     region has an address here, and the GPU copies to and from it.
//   * Write: one cudaMemcpyAsync per op from local device memory into the
//     peer's mapped region, on the transport's worker thread and stream (the
//     per-operation cost a descriptor-list transport pays); the worker waits
//     for its copies at least every 4,096 ops or 256 MiB, checks the stop
//     token and the connection there, and reports once its copies landed.
//   * Read: ONE batched copy kernel (the device copy engine) from the peer's
//     mapped region into local memory — the receiver-side `direct` path
//     (direct read), where the writer lends its blocks and only the
//     receiver writes its own memory.
//   * map_remote_read is true: an imported region's mapped_address() is its
//     mapping here, and BeginMappedRead lets the caller's own copy engine
//     read it (the receiver's direct read then copies its plan's tiled
//     lists with the agent's engine, without one Read op per run). The
//     access counts as a read of the connection until it is destroyed.
//     The mapping is made on `options.device`: an engine of another device
//     reaches it only with peer access.
//   * Flush: completes behind every write queued before it; a write's
//     `done` already means its copies landed, so a flush only orders.
//   * map_remote is false: between processes a writer's copy into the
//     receiver's pool could not be recalled by the receiver, so `direct`
//     runs as a read. read_remote is true.
//
// The fence (a peer's copies cannot be revoked by the owner of the memory)
// When a connection ends — Disconnect, the peer's CLOSE, a malformed
// message, Shutdown — this end stops its own copies to and from the peer
// (queued writes fail, running ones stop at their next window, reads stop at
// their next launch) and then tells the peer CLOSE. on_peer_failure runs
// once this end's copies have ended AND the peer can no longer copy into
// this process: it said CLOSE after stopping its own copies, or its process
// has exited (a pidfd became readable; the socket's end alone does not
// prove it, as a dying process may still have copies queued on its GPU). A
// peer that is alive but never answers (a stopped process) therefore
// delays on_peer_failure, and with it the settle of the requests that wait
// for the fence, until it resumes or exits: safety first.
//
// Threads: the channel's I/O thread (on_message, CLOSE, connections), one
// worker thread (writes, flushes, their `done`), the copy engine's thread
// (reads and their `done`), and a reaper thread that waits for peer
// processes to exit. concurrent_callbacks is true. All are joined by
// Shutdown.
#ifndef KVBOUNCE_TRANSPORT_CUDA_IPC_CUDA_IPC_TRANSPORT_H_
#define KVBOUNCE_TRANSPORT_CUDA_IPC_CUDA_IPC_TRANSPORT_H_

#include <memory>

#include "kvbounce/status.h"
#include "kvbounce/transport.h"
#include "kvbounce/transports.h"

namespace kvbounce {

// Errors: kUnimplemented (a build without CUDA), kUnavailable (no usable
// device), kInvalidArgument (a device the process lacks, a malformed listen
// address), the channel's (the address is taken).
Result<std::unique_ptr<Transport>> CreateCudaIpcTransport(const CudaIpcTransportOptions& options);

}  // namespace kvbounce

#endif  // KVBOUNCE_TRANSPORT_CUDA_IPC_CUDA_IPC_TRANSPORT_H_
