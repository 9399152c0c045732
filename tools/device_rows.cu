#include <algorithm>
#include <cstdint>

#include "tools/device_rows_kernel.cuh"
#include "tools/element.h"

namespace kvbounce::tools::device_rows {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// The widest access a lane makes; rows are cut into a byte-wise head, a
// middle of aligned words of this size, and a byte-wise tail.
constexpr uint64_t kWordBytes = 16;

// The element size of a launch: a compile-time kE (1, 2, 4 or 8, the sizes
// real pools use, so that the divisions below become shifts) or, for kE ==
// 0, the runtime value.
template <int kE>
__device__ __forceinline__ int ElemBytes(int runtime) {
  return kE > 0 ? kE : runtime;
}

// Byte `offset` of a row whose seed is `seed`: byte offset % e of element
// offset / e, little-endian.
template <int kE>
__device__ __forceinline__ unsigned char ValueByte(uint64_t seed, uint64_t offset, int e_runtime) {
  const int e = ElemBytes<kE>(e_runtime);
  const uint64_t d = offset / static_cast<uint64_t>(e);
  const int b = static_cast<int>(offset - d * static_cast<uint64_t>(e));
  return static_cast<unsigned char>(FromSeed(seed, static_cast<int>(d)) >> (8 * b));
}

// Bytes [offset, offset + 16) of a row, as the 16-byte word memory holds.
// One multiply for the first element, then FromSeed's step per element (an
// add), so the cost is a few integer operations per byte.
template <int kE>
__device__ __forceinline__ uint4 ValueWord(uint64_t seed, uint64_t offset, int e_runtime) {
  const int e = ElemBytes<kE>(e_runtime);
  const uint64_t d = offset / static_cast<uint64_t>(e);
  int b = static_cast<int>(offset - d * static_cast<uint64_t>(e));
  uint64_t value = FromSeed(seed, static_cast<int>(d));
  uint64_t half[2] = {0, 0};
#pragma unroll
  for (int k = 0; k < static_cast<int>(kWordBytes); ++k) {
    half[k / 8] |= ((value >> (8 * b)) & 0xff) << (8 * (k % 8));
    if (++b == e) {
      b = 0;
      value += kElementStep;
    }
  }
  return make_uint4(static_cast<unsigned>(half[0]), static_cast<unsigned>(half[0] >> 32),
                    static_cast<unsigned>(half[1]), static_cast<unsigned>(half[1] >> 32));
}

__device__ __forceinline__ bool SameWord(uint4 a, uint4 b) {
  return a.x == b.x && a.y == b.y && a.z == b.z && a.w == b.w;
}

// Where a row's aligned middle starts and how many words it has.
struct RowSplit {
  uint64_t head;   // bytes before the first aligned word (< 16)
  uint64_t words;  // aligned 16-byte words
  uint64_t tail_begin;
  uint64_t tail;  // bytes after the last word (< 16)
};

__device__ __forceinline__ RowSplit SplitRow(uint64_t address, uint64_t row_bytes) {
  RowSplit s;
  s.head = (kWordBytes - (address & (kWordBytes - 1))) & (kWordBytes - 1);
  if (s.head > row_bytes) s.head = row_bytes;
  s.words = (row_bytes - s.head) / kWordBytes;
  s.tail_begin = s.head + s.words * kWordBytes;
  s.tail = row_bytes - s.tail_begin;
  return s;
}

template <int kE>
__global__ void __launch_bounds__(kThreadsPerBlock)
    FillRowsKernel(const RowDescriptor* __restrict__ rows, uint32_t count, RowShape shape) {
  const unsigned lane = threadIdx.x % kWarpSize;
  const uint32_t warp = (blockIdx.x * blockDim.x + threadIdx.x) / kWarpSize;
  const uint32_t warps = gridDim.x * blockDim.x / kWarpSize;
  for (uint32_t r = warp; r < count; r += warps) {
    const RowDescriptor row = rows[r];
    auto* bytes = reinterpret_cast<unsigned char*>(row.address);
    const RowSplit s = SplitRow(row.address, shape.row_bytes);
    if (lane < s.head) bytes[lane] = ValueByte<kE>(row.seed, lane, shape.elem_bytes);
    auto* words = reinterpret_cast<uint4*>(bytes + s.head);
    for (uint64_t i = lane; i < s.words; i += kWarpSize) {
      words[i] = ValueWord<kE>(row.seed, s.head + i * kWordBytes, shape.elem_bytes);
    }
    if (lane < s.tail) {
      bytes[s.tail_begin + lane] = ValueByte<kE>(row.seed, s.tail_begin + lane, shape.elem_bytes);
    }
  }
}

template <int kE>
__global__ void __launch_bounds__(kThreadsPerBlock)
    VerifyRowsKernel(const RowDescriptor* __restrict__ rows, uint32_t count, uint32_t value_count,
                     uint64_t first_index, RowShape shape, uint8_t sentinel,
                     VerifyCounters* __restrict__ counters) {
  const unsigned lane = threadIdx.x % kWarpSize;
  const uint32_t warp = (blockIdx.x * blockDim.x + threadIdx.x) / kWarpSize;
  const uint32_t warps = gridDim.x * blockDim.x / kWarpSize;
  const unsigned sentinel4 = 0x01010101u * sentinel;
  const uint4 sentinel_word = make_uint4(sentinel4, sentinel4, sentinel4, sentinel4);
  // The loop's bounds are the same for every lane of a warp, so all 32
  // lanes reach the vote below together.
  for (uint32_t r = warp; r < count; r += warps) {
    const RowDescriptor row = rows[r];
    const bool value_row = r < value_count;
    const auto* bytes = reinterpret_cast<const unsigned char*>(row.address);
    const RowSplit s = SplitRow(row.address, shape.row_bytes);
    bool bad = false;
    if (lane < s.head) {
      const unsigned char want =
          value_row ? ValueByte<kE>(row.seed, lane, shape.elem_bytes) : sentinel;
      bad |= bytes[lane] != want;
    }
    const auto* words = reinterpret_cast<const uint4*>(bytes + s.head);
    for (uint64_t i = lane; i < s.words; i += kWarpSize) {
      const uint4 want = value_row
                             ? ValueWord<kE>(row.seed, s.head + i * kWordBytes, shape.elem_bytes)
                             : sentinel_word;
      bad |= !SameWord(words[i], want);
    }
    if (lane < s.tail) {
      const unsigned char want =
          value_row ? ValueByte<kE>(row.seed, s.tail_begin + lane, shape.elem_bytes) : sentinel;
      bad |= bytes[s.tail_begin + lane] != want;
    }
    if (__any_sync(kFullMask, bad) && lane == 0) {
      atomicAdd(&counters->mismatches, 1ULL);
      atomicMin(&counters->first_bad, static_cast<unsigned long long>(first_index + r));
    }
  }
}

uint32_t Blocks(uint32_t count, uint32_t max_blocks) {
  constexpr uint32_t kWarpsPerBlock = kThreadsPerBlock / kWarpSize;
  const uint32_t wanted = count / kWarpsPerBlock + (count % kWarpsPerBlock != 0 ? 1 : 0);
  return std::max<uint32_t>(1, std::min(wanted, max_blocks));
}

}  // namespace

cudaError_t LaunchFillRows(const RowDescriptor* rows, uint32_t count, RowShape shape,
                           uint32_t max_blocks, cudaStream_t stream) {
  const uint32_t blocks = Blocks(count, max_blocks);
  switch (shape.elem_bytes) {
    case 1:
      FillRowsKernel<1><<<blocks, kThreadsPerBlock, 0, stream>>>(rows, count, shape);
      break;
    case 2:
      FillRowsKernel<2><<<blocks, kThreadsPerBlock, 0, stream>>>(rows, count, shape);
      break;
    case 4:
      FillRowsKernel<4><<<blocks, kThreadsPerBlock, 0, stream>>>(rows, count, shape);
      break;
    case 8:
      FillRowsKernel<8><<<blocks, kThreadsPerBlock, 0, stream>>>(rows, count, shape);
      break;
    default:
      FillRowsKernel<0><<<blocks, kThreadsPerBlock, 0, stream>>>(rows, count, shape);
      break;
  }
  return cudaGetLastError();
}

cudaError_t LaunchVerifyRows(const RowDescriptor* rows, uint32_t count, uint32_t value_count,
                             uint64_t first_index, RowShape shape, uint8_t sentinel,
                             VerifyCounters* counters, uint32_t max_blocks, cudaStream_t stream) {
  const uint32_t blocks = Blocks(count, max_blocks);
  switch (shape.elem_bytes) {
    case 1:
      VerifyRowsKernel<1><<<blocks, kThreadsPerBlock, 0, stream>>>(
          rows, count, value_count, first_index, shape, sentinel, counters);
      break;
    case 2:
      VerifyRowsKernel<2><<<blocks, kThreadsPerBlock, 0, stream>>>(
          rows, count, value_count, first_index, shape, sentinel, counters);
      break;
    case 4:
      VerifyRowsKernel<4><<<blocks, kThreadsPerBlock, 0, stream>>>(
          rows, count, value_count, first_index, shape, sentinel, counters);
      break;
    case 8:
      VerifyRowsKernel<8><<<blocks, kThreadsPerBlock, 0, stream>>>(
          rows, count, value_count, first_index, shape, sentinel, counters);
      break;
    default:
      VerifyRowsKernel<0><<<blocks, kThreadsPerBlock, 0, stream>>>(
          rows, count, value_count, first_index, shape, sentinel, counters);
      break;
  }
  return cudaGetLastError();
}

}  // namespace kvbounce::tools::device_rows
