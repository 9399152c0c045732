#include <algorithm>

#include "copy/cuda/copy_kernel.cuh"

namespace kvbounce::cuda_copy {
namespace {

constexpr int kWarpSize = 32;
// Independent loads each lane has in flight before its first store.
constexpr int kUnroll = 4;

// Copies `n` words with the 32 lanes of a warp, kUnroll loads per lane in
// flight, coalesced across the warp.
template <typename Word>
__device__ __forceinline__ void CopyWords(const Word* __restrict__ src, Word* __restrict__ dst,
                                          uint64_t n, unsigned lane) {
  constexpr uint64_t kStep = uint64_t{kWarpSize} * kUnroll;
  uint64_t i = lane;
  for (; i + (kUnroll - 1) * kWarpSize < n; i += kStep) {
    Word v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = src[i + u * kWarpSize];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) dst[i + u * kWarpSize] = v[u];
  }
  for (; i < n; i += kWarpSize) dst[i] = src[i];
}

// One piece, by one warp. The widest word that source and destination can
// both be aligned to carries the middle; the head before it and the tail
// after it (each under 16 bytes) go byte by byte, one byte a lane.
__device__ __forceinline__ void CopyPiece(const unsigned char* src, unsigned char* dst,
                                          uint64_t n, unsigned lane) {
  const uint64_t diff = reinterpret_cast<uint64_t>(src) ^ reinterpret_cast<uint64_t>(dst);
  uint64_t word = 16;
  while (word > 1 && (diff & (word - 1)) != 0) word >>= 1;
  uint64_t head = (word - (reinterpret_cast<uint64_t>(src) & (word - 1))) & (word - 1);
  if (head > n) head = n;
  if (lane < head) dst[lane] = src[lane];
  src += head;
  dst += head;
  n -= head;
  const uint64_t words = n / word;
  switch (word) {
    case 16:
      CopyWords(reinterpret_cast<const uint4*>(src), reinterpret_cast<uint4*>(dst), words, lane);
      break;
    case 8:
      CopyWords(reinterpret_cast<const uint2*>(src), reinterpret_cast<uint2*>(dst), words, lane);
      break;
    case 4:
      CopyWords(reinterpret_cast<const unsigned*>(src), reinterpret_cast<unsigned*>(dst), words,
                lane);
      break;
    case 2:
      CopyWords(reinterpret_cast<const unsigned short*>(src),
                reinterpret_cast<unsigned short*>(dst), words, lane);
      break;
    default:
      CopyWords(src, dst, words, lane);
      break;
  }
  const uint64_t done = words * word;
  const uint64_t tail = n - done;
  if (lane < tail) dst[done + lane] = src[done + lane];
}

__global__ void __launch_bounds__(kThreadsPerBlock)
    BatchedCopyKernel(const PieceDescriptor* __restrict__ descriptors, uint32_t count,
                      uint64_t src_base, uint64_t dst_base) {
  const unsigned lane = threadIdx.x % kWarpSize;
  const uint32_t warp = (blockIdx.x * blockDim.x + threadIdx.x) / kWarpSize;
  const uint32_t warps = gridDim.x * blockDim.x / kWarpSize;
  for (uint32_t p = warp; p < count; p += warps) {
    const PieceDescriptor piece = descriptors[p];
    if (piece.bytes == 0) continue;
    CopyPiece(reinterpret_cast<const unsigned char*>(src_base + piece.src),
              reinterpret_cast<unsigned char*>(dst_base + piece.dst), piece.bytes, lane);
  }
}

}  // namespace

cudaError_t LaunchBatchedCopy(const PieceDescriptor* descriptors, uint32_t count, uint64_t src_base,
                              uint64_t dst_base, uint32_t max_blocks, cudaStream_t stream) {
  constexpr uint32_t kWarpsPerBlock = kThreadsPerBlock / kWarpSize;
  const uint32_t wanted = count / kWarpsPerBlock + (count % kWarpsPerBlock != 0 ? 1 : 0);
  const uint32_t blocks = std::max<uint32_t>(1, std::min(wanted, max_blocks));
  BatchedCopyKernel<<<blocks, kThreadsPerBlock, 0, stream>>>(descriptors, count, src_base,
                                                             dst_base);
  return cudaGetLastError();
}

}  // namespace kvbounce::cuda_copy
