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

// Index arithmetic in 32 bits when the launch's tasks fit (divisions are
// several times cheaper), else in 64.
template <typename Index>
__global__ void __launch_bounds__(kThreadsPerBlock) TiledCopyKernel(const TiledLaunch l) {
  const unsigned lane = threadIdx.x % kWarpSize;
  const Index warp = (Index{blockIdx.x} * blockDim.x + threadIdx.x) / kWarpSize;
  const Index warps = Index{gridDim.x} * blockDim.x / kWarpSize;
  const auto per_unit = static_cast<Index>(l.pieces_per_unit);
  const auto num_outer = static_cast<Index>(l.num_outer);
  const auto tasks = static_cast<Index>(l.num_segments * l.num_outer * l.pieces_per_unit);
  for (Index t = warp; t < tasks; t += warps) {
    const Index unit = t / per_unit;
    const Index p = t - unit * per_unit;
    const Index s = unit / num_outer;
    const Index o = unit - s * num_outer;
    const TileSegmentDescriptor seg = l.segments[s];
    if (p >= seg.num_pieces) continue;
    const TileOffsetDescriptor off = l.outer[o];
    const PieceDescriptor piece = l.pieces[seg.first_piece + p];
    CopyPiece(reinterpret_cast<const unsigned char*>(l.src_base + off.src + seg.src + piece.src),
              reinterpret_cast<unsigned char*>(l.dst_base + off.dst + seg.dst + piece.dst),
              piece.bytes, lane);
  }
}

// The parameter is read in place (__grid_constant__): no per-thread copy of
// its 3 KiB.
__global__ void __launch_bounds__(kThreadsPerBlock)
    InlineCopyKernel(const __grid_constant__ InlineLaunch l) {
  const unsigned lane = threadIdx.x % kWarpSize;
  const uint32_t warp = (blockIdx.x * blockDim.x + threadIdx.x) / kWarpSize;
  const uint32_t warps = gridDim.x * blockDim.x / kWarpSize;
  for (uint32_t p = warp; p < l.count; p += warps) {
    const PieceDescriptor piece = l.pieces[p];
    CopyPiece(reinterpret_cast<const unsigned char*>(l.src_base + piece.src),
              reinterpret_cast<unsigned char*>(l.dst_base + piece.dst), piece.bytes, lane);
  }
}

}  // namespace

cudaError_t LaunchInlineCopy(const InlineLaunch& launch, cudaStream_t stream) {
  constexpr uint32_t kWarpsPerBlock = kThreadsPerBlock / kWarpSize;
  const uint32_t blocks =
      std::max<uint32_t>(1, (launch.count + kWarpsPerBlock - 1) / kWarpsPerBlock);
  InlineCopyKernel<<<blocks, kThreadsPerBlock, 0, stream>>>(launch);
  return cudaGetLastError();
}

cudaError_t LaunchTiledCopy(const TiledLaunch& launch, uint32_t max_blocks, cudaStream_t stream) {
  constexpr uint64_t kWarpsPerBlock = kThreadsPerBlock / kWarpSize;
  const uint64_t tasks = launch.num_segments * launch.num_outer * launch.pieces_per_unit;
  const uint64_t wanted = tasks / kWarpsPerBlock + (tasks % kWarpsPerBlock != 0 ? 1 : 0);
  const auto blocks =
      static_cast<uint32_t>(std::max<uint64_t>(1, std::min<uint64_t>(wanted, max_blocks)));
  // The largest task index the grid-stride loop forms is below tasks +
  // the grid's warps.
  if (tasks + uint64_t{blocks} * kWarpsPerBlock < (uint64_t{1} << 32)) {
    TiledCopyKernel<uint32_t><<<blocks, kThreadsPerBlock, 0, stream>>>(launch);
  } else {
    TiledCopyKernel<uint64_t><<<blocks, kThreadsPerBlock, 0, stream>>>(launch);
  }
  return cudaGetLastError();
}

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
