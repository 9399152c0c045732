// The ceiling a bench or sweep compares every path with, measured in the same
// run: what the memory or the link moves at best, with nothing of kvbounce in
// the way.
//
//   * loopback, host pools: one thread's memcpy (src/common/memcpy_rate.h:
//     a few MiB, caches evicted, the fastest of three) in a sweep; in a
//     bench, the scattered copy of its own requests (MeasureScatteredCopy-
//     Ceiling below);
//   * device pools (loopback, cuda-ipc): one cudaMemcpyAsync of 256 MiB,
//     device to device (cuda-ipc with ranks on two devices: one
//     cudaMemcpyPeerAsync between them, MeasureLinkCeiling);
//   * ucx, host pools: `ucx_perftest -t ucp_put_bw` between two processes on
//     127.0.0.1 (with the bench's UCX_TLS), the better of 256 KiB and
//     16 MiB puts, 128 MiB each.
//
// Thread safety: one call at a time (the UCX measurement spawns processes).
#ifndef KVBOUNCE_TOOLS_CEILING_H_
#define KVBOUNCE_TOOLS_CEILING_H_

#include <ostream>
#include <span>
#include <string>

#include "kvbounce/model.h"
#include "kvbounce/status.h"
#include "layout/fragment.h"

namespace kvbounce::tools {

class Cluster;
struct BlockTables;

struct Ceiling {
  std::string what;  // one line: what was measured
  double gbps = 0;   // 10^9 bytes per second
};

// Bytes of the device ceiling's copy.
inline constexpr size_t kDeviceCeilingBytes = size_t{256} << 20;

// One large device-to-device copy on `device`. Errors: kUnimplemented in a
// build without CUDA; the runtime's (no device, out of memory).
Result<Ceiling> MeasureDeviceCeiling(int device);

// The link between the devices of two ranks: MeasureDeviceCeiling of the
// device when they are one, else one large cudaMemcpyPeerAsync from
// `src_device` to `dst_device` (peer access on where the devices offer it;
// the description says which). Errors: a build without CUDA
// (kUnimplemented), the CUDA calls'.
Result<Ceiling> MeasureLinkCeiling(int src_device, int dst_device);

// One thread's memcpy of host memory.
Ceiling HostMemcpyCeiling();

// What the bytes of a wave of requests cost at their own fragmentation with
// nothing of kvbounce in the way: every writer's direct list for every gen
// rank, planned once per pool slot for the tokens of `range` (KV and, for hybrid
// models, state), copied by `threads` threads (the fragments split evenly
// by bytes), the fastest of a few rounds. The copies write the gen pools'
// slots; the bench clears a slot before each request.
// Errors: the planner's; kInvalidArgument for device pools or threads < 1.
Result<Ceiling> MeasureScatteredCopyCeiling(Cluster& cluster, TokenRange range, int slots,
                                            int threads);

// The fragments of one request of the bench as a plain copy moves them:
// every writer's direct list (of the request's ctx instance) for every gen
// rank, for the tokens of `range` (KV and, for hybrid models, state), at
// the pools' addresses. Errors: the planner's.
Result<FragmentList> RequestFragments(Cluster& cluster, const BlockTables& tables,
                                      TokenRange range);

// Copies the fragments (absolute addresses) with `threads` threads, split
// evenly by bytes, each with CopyBytes (src/common/copy_bytes.h: memcpy, or
// backwards where memcpy stalls on 4K aliasing, as kvbounce's own host
// copies do); returns the seconds it took.
double CopyFragmentsInParallel(std::span<const Fragment> fragments, int threads);

// UCX put bandwidth between two `ucx_perftest` processes on this host.
// Errors: kNotFound (no ucx_perftest on PATH: Debian's ucx-utils has it),
// kUnavailable (it failed or printed no result; its last line is named),
// kDeadlineExceeded (a run took over a minute).
Result<Ceiling> MeasureUcxPutCeiling(const std::string& ucx_tls);

// The ceiling for a run on `transport` ("loopback", "ucx", "cuda-ipc") with
// pools of `memory` ("host", "cuda"): one of the above.
Result<Ceiling> MeasureCeiling(const std::string& transport, const std::string& memory, int device,
                               const std::string& ucx_tls);

}  // namespace kvbounce::tools

#endif  // KVBOUNCE_TOOLS_CEILING_H_
