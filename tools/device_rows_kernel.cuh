// The kernels behind DeviceRowKernels (tools/device_rows.h) and their host
// launchers. Kept apart from device_rows.h because the .cu file compiles as
// C++17 and device_rows.h uses C++20 (std::span); only device_rows.cc and
// device_rows.cu include this header.
//
// Each kernel gives one warp to a row (a grid-stride loop over the row
// list), so a row's bytes are read or written by 32 neighbouring lanes:
// 16-byte words over the part of the row that is 16-byte aligned, single
// bytes for the head before it and the tail after it. Element values come
// from tools/element.h, the same definition the host fill uses.
//
// Thread safety: a launcher may be called from any thread whose current
// device owns `stream`.
#ifndef KVBOUNCE_TOOLS_DEVICE_ROWS_KERNEL_CUH_
#define KVBOUNCE_TOOLS_DEVICE_ROWS_KERNEL_CUH_

#include <cuda_runtime_api.h>

#include <cstdint>

namespace kvbounce::tools::device_rows {

// One row as uploaded (16 bytes; the same layout as DeviceRow, which
// device_rows.cc checks).
struct RowDescriptor {
  uint64_t address;
  uint64_t seed;
};
static_assert(sizeof(RowDescriptor) == 16, "uploaded as-is");

// What a verify launch accumulates, in device memory. Both fields are
// unsigned long long because that is what the 64-bit atomics take.
struct VerifyCounters {
  unsigned long long mismatches;  // rows that differ
  unsigned long long first_bad;   // smallest bad row index; ~0 when none
};

// The shape of every row of a call: `row_bytes` = head_dim * elem_bytes.
struct RowShape {
  uint64_t row_bytes;
  int elem_bytes;  // 1 to 8
};

// Threads per block of every kernel (8 warps).
inline constexpr int kThreadsPerBlock = 256;

// Enqueues one kernel on `stream` writing the semantic values of the `count`
// rows at `rows` (device memory), using at most `max_blocks` blocks.
// Returns the launch's error. REQUIRES: count > 0, max_blocks > 0.
cudaError_t LaunchFillRows(const RowDescriptor* rows, uint32_t count, RowShape shape,
                           uint32_t max_blocks, cudaStream_t stream);

// Enqueues one kernel on `stream` checking the `count` rows at `rows`:
// rows [0, value_count) must hold their semantic values, rows
// [value_count, count) the byte `sentinel` everywhere. Row i of this launch
// has index `first_index + i` in `counters` (mismatches counted with
// atomicAdd, the smallest bad index kept with atomicMin).
// Returns the launch's error. REQUIRES: count > 0, value_count <= count,
// max_blocks > 0.
cudaError_t LaunchVerifyRows(const RowDescriptor* rows, uint32_t count, uint32_t value_count,
                             uint64_t first_index, RowShape shape, uint8_t sentinel,
                             VerifyCounters* counters, uint32_t max_blocks, cudaStream_t stream);

}  // namespace kvbounce::tools::device_rows

#endif  // KVBOUNCE_TOOLS_DEVICE_ROWS_KERNEL_CUH_
