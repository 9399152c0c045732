#include <algorithm>
#include <type_traits>

#include "copy/cuda/copy_kernel.cuh"

namespace kvbounce::cuda_copy {
namespace {

constexpr int kWarpSize = 32;
// Independent loads each lane has in flight before its first store, for
// a piece copied word by word.
constexpr int kUnroll = 4;
// Small pieces (a group of fewer lanes than a warp): pieces each group
// has in flight at once, every descriptor loaded before any data.
constexpr int kSmallUnroll = 4;

// Copies `n` words with the G lanes of a group, kUnroll loads per lane in
// flight, coalesced across the group.
template <int G, typename Word>
__device__ __forceinline__ void CopyWords(const Word* __restrict__ src, Word* __restrict__ dst,
                                          uint64_t n, unsigned lane) {
  constexpr uint64_t kStep = uint64_t{G} * kUnroll;
  uint64_t i = lane;
  for (; i + (kUnroll - 1) * G < n; i += kStep) {
    Word v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = src[i + u * G];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) dst[i + u * G] = v[u];
  }
  for (; i < n; i += G) dst[i] = src[i];
}

// One piece, by the G lanes of a group (a warp, or part of one). The widest
// word that source and destination can both be aligned to carries the
// middle; the head before it and the tail after it (each under 16 bytes)
// go byte by byte.
template <int G>
__device__ __forceinline__ void CopyPiece(const unsigned char* src, unsigned char* dst, uint64_t n,
                                          unsigned lane) {
  const uint64_t diff = reinterpret_cast<uint64_t>(src) ^ reinterpret_cast<uint64_t>(dst);
  uint64_t word = 16;
  while (word > 1 && (diff & (word - 1)) != 0) word >>= 1;
  uint64_t head = (word - (reinterpret_cast<uint64_t>(src) & (word - 1))) & (word - 1);
  if (head > n) head = n;
  for (uint64_t i = lane; i < head; i += G) dst[i] = src[i];
  src += head;
  dst += head;
  n -= head;
  const uint64_t words = n / word;
  switch (word) {
    case 16:
      CopyWords<G>(reinterpret_cast<const uint4*>(src), reinterpret_cast<uint4*>(dst), words, lane);
      break;
    case 8:
      CopyWords<G>(reinterpret_cast<const uint2*>(src), reinterpret_cast<uint2*>(dst), words, lane);
      break;
    case 4:
      CopyWords<G>(reinterpret_cast<const unsigned*>(src), reinterpret_cast<unsigned*>(dst), words,
                   lane);
      break;
    case 2:
      CopyWords<G>(reinterpret_cast<const unsigned short*>(src),
                   reinterpret_cast<unsigned short*>(dst), words, lane);
      break;
    default:
      CopyWords<G>(src, dst, words, lane);
      break;
  }
  const uint64_t done = words * word;
  for (uint64_t i = done + lane; i < n; i += G) dst[i] = src[i];
}

// A piece's absolute addresses.
struct Piece {
  uint64_t src;
  uint64_t dst;
  uint64_t bytes;
};

// Copies tasks [0, tasks) of `source` (source.Get(t, &piece) is false for a
// task without a piece), a group of G lanes per task in a grid-stride
// loop. A warp-sized group copies its piece as CopyPiece does. Smaller
// groups (pieces of at most 16 * G bytes expected) take kSmallUnroll tasks
// at a time: the descriptors of all, then a 16-byte word a lane of each
// piece that is 16-byte aligned on both sides and a whole number of words,
// then their stores; any other piece goes through CopyPiece with the group.
template <int G, typename Index, typename Source>
__device__ __forceinline__ void CopyTasks(const Source& source, Index tasks) {
  const unsigned lane = threadIdx.x % G;
  const Index group = (Index{blockIdx.x} * blockDim.x + threadIdx.x) / G;
  const Index groups = Index{gridDim.x} * blockDim.x / G;
  if constexpr (G == kWarpSize) {
    for (Index t = group; t < tasks; t += groups) {
      Piece p;
      if (!source.Get(t, &p) || p.bytes == 0) continue;
      CopyPiece<G>(reinterpret_cast<const unsigned char*>(p.src),
                   reinterpret_cast<unsigned char*>(p.dst), p.bytes, lane);
    }
  } else {
    for (Index t = group; t < tasks; t += groups * kSmallUnroll) {
      Piece p[kSmallUnroll];
      bool fast[kSmallUnroll];
#pragma unroll
      for (int u = 0; u < kSmallUnroll; ++u) {
        const Index tu = t + static_cast<Index>(u) * groups;
        // No piece: 0 bytes, and then its addresses are never used (they
        // stay unset, costing no registers).
        if (tu >= tasks || !source.Get(tu, &p[u])) p[u].bytes = 0;
        fast[u] = ((p[u].src | p[u].dst | p[u].bytes) & 15) == 0 && p[u].bytes <= 16 * G;
      }
      uint4 v[kSmallUnroll];
#pragma unroll
      for (int u = 0; u < kSmallUnroll; ++u) {
        if (fast[u] && lane * 16 < p[u].bytes) {
          v[u] = reinterpret_cast<const uint4*>(p[u].src)[lane];
        }
      }
#pragma unroll
      for (int u = 0; u < kSmallUnroll; ++u) {
        if (fast[u] && lane * 16 < p[u].bytes) reinterpret_cast<uint4*>(p[u].dst)[lane] = v[u];
      }
      // The rest, one call site (inlined once, not once per u): a piece
      // picked by selects keeps p in registers.
      unsigned slow = 0;
#pragma unroll
      for (int u = 0; u < kSmallUnroll; ++u) {
        if (!fast[u] && p[u].bytes != 0) slow |= 1u << u;
      }
      while (slow != 0) {
        const int pick = __ffs(slow) - 1;
        slow &= slow - 1;
        Piece q = p[0];
#pragma unroll
        for (int u = 1; u < kSmallUnroll; ++u) {
          if (pick == u) q = p[u];
        }
        CopyPiece<G>(reinterpret_cast<const unsigned char*>(q.src),
                     reinterpret_cast<unsigned char*>(q.dst), q.bytes, lane);
      }
    }
  }
}

// Blocks for `tasks` tasks with groups of `lanes` lanes, at most `max_blocks`.
uint32_t BlocksFor(uint64_t tasks, int lanes, uint32_t max_blocks) {
  const uint64_t per_block = static_cast<uint64_t>(kThreadsPerBlock / lanes);
  const uint64_t wanted = tasks / per_block + (tasks % per_block != 0 ? 1 : 0);
  return static_cast<uint32_t>(std::max<uint64_t>(1, std::min<uint64_t>(wanted, max_blocks)));
}

struct FlatSource {
  const PieceDescriptor* __restrict__ descriptors;
  uint64_t src_base;
  uint64_t dst_base;
  __device__ __forceinline__ bool Get(uint32_t t, Piece* p) const {
    const PieceDescriptor d = descriptors[t];
    *p = Piece{src_base + d.src, dst_base + d.dst, d.bytes};
    return true;
  }
};

// Small groups keep four pieces' loads in flight: at least kSmallMinBlocks
// blocks an SM (registers capped to fit them) keeps enough of them resident.
constexpr int kSmallMinBlocks = 4;
constexpr int MinBlocks(int lanes) { return lanes == kWarpSize ? 1 : kSmallMinBlocks; }

template <int G>
__global__ void __launch_bounds__(kThreadsPerBlock, MinBlocks(G))
    BatchedCopyKernel(const FlatSource source, uint32_t count) {
  CopyTasks<G, uint32_t>(source, count);
}

// Task t of a tiled launch: unit t / pieces_per_unit, piece t mod it; unit
// u = s * num_outer + o. Index arithmetic in 32 bits when the launch's
// tasks fit (divisions are several times cheaper), else in 64.
template <typename Index>
__device__ __forceinline__ bool GetTiled(const TiledLaunch& l, Index t, Piece* out) {
  const auto per_unit = static_cast<Index>(l.pieces_per_unit);
  const auto num_outer = static_cast<Index>(l.num_outer);
  const Index unit = t / per_unit;
  const Index p = t - unit * per_unit;
  const Index s = unit / num_outer;
  const Index o = unit - s * num_outer;
  const TileSegmentDescriptor seg = l.segments[s];
  if (p >= seg.num_pieces) return false;
  const TileOffsetDescriptor off = l.outer[o];
  const PieceDescriptor piece = l.pieces[seg.first_piece + p];
  *out = Piece{l.src_base + off.src + seg.src + piece.src,
               l.dst_base + off.dst + seg.dst + piece.dst, piece.bytes};
  return true;
}

template <typename Index>
struct TiledSource {
  TiledLaunch l;
  __device__ __forceinline__ bool Get(Index t, Piece* out) const { return GetTiled(l, t, out); }
};

// Task t of merged lists: the first list whose task_end is above t, and
// its task t - (the end of the list before).
template <typename Index>
struct TiledListsSource {
  TiledLists m;
  __device__ __forceinline__ bool Get(Index t, Piece* out) const {
    uint32_t lo = 0;
    uint32_t hi = m.count - 1;
    while (lo < hi) {
      const uint32_t mid = (lo + hi) / 2;
      if (static_cast<Index>(m.task_end[mid]) > t) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    const Index begin = lo == 0 ? Index{0} : static_cast<Index>(m.task_end[lo - 1]);
    return GetTiled(m.lists[lo], t - begin, out);
  }
};

template <int G, typename Index>
__global__ void __launch_bounds__(kThreadsPerBlock, MinBlocks(G))
    TiledCopyKernel(const TiledLaunch l) {
  const auto tasks = static_cast<Index>(l.num_segments * l.num_outer * l.pieces_per_unit);
  CopyTasks<G, Index>(TiledSource<Index>{l}, tasks);
}

template <int G, typename Index>
__global__ void __launch_bounds__(kThreadsPerBlock, MinBlocks(G))
    TiledListsCopyKernel(const TiledLists m, uint64_t tasks) {
  CopyTasks<G, Index>(TiledListsSource<Index>{m}, static_cast<Index>(tasks));
}

// The parameter is read in place (__grid_constant__): no per-thread copy of
// its up to 3 KiB.
template <uint32_t N>
struct InlineSource {
  const InlineLaunchOf<N>& l;
  __device__ __forceinline__ bool Get(uint32_t t, Piece* p) const {
    const PieceDescriptor d = l.pieces[t];
    *p = Piece{l.src_base + d.src, l.dst_base + d.dst, d.bytes};
    return true;
  }
};

template <int G, uint32_t N>
__global__ void __launch_bounds__(kThreadsPerBlock, MinBlocks(G))
    InlineCopyKernel(const __grid_constant__ InlineLaunchOf<N> l) {
  CopyTasks<G, uint32_t>(InlineSource<N>{l}, l.count);
}

// Calls launch(std::integral_constant<int, G>{}) for the group size
// `lanes` (GroupLanesFor's 8, 16 or a warp): one kernel instance per size.
template <typename Launch>
void WithGroupLanes(int lanes, Launch launch) {
  switch (lanes) {
    case 8:
      launch(std::integral_constant<int, 8>{});
      break;
    case 16:
      launch(std::integral_constant<int, 16>{});
      break;
    default:
      launch(std::integral_constant<int, kWarpSize>{});
      break;
  }
}

}  // namespace

// The fewest lanes that cover such a piece with one 16-byte word each (8,
// 16), or a warp.
int GroupLanesFor(uint64_t max_piece_bytes) {
  if (max_piece_bytes <= 16 * 8) return 8;
  if (max_piece_bytes <= 16 * 16) return 16;
  return kWarpSize;
}

cudaError_t LaunchInlineCopy(const InlineLaunch& launch, cudaStream_t stream) {
  uint64_t largest = 0;
  for (uint32_t i = 0; i < launch.count; ++i) largest = std::max(largest, launch.pieces[i].bytes);
  const int lanes = GroupLanesFor(largest);
  const uint32_t blocks = BlocksFor(launch.count, lanes, launch.count);
  if (launch.count <= kSmallInlinePieces) {
    // The few pieces of a small request travel in a parameter block of a
    // few hundred bytes: the launch and the kernel's start cost less than
    // with the whole 3 KiB.
    InlineLaunchOf<kSmallInlinePieces> small{};
    small.src_base = launch.src_base;
    small.dst_base = launch.dst_base;
    small.count = launch.count;
    std::copy_n(launch.pieces, launch.count, small.pieces);
    WithGroupLanes(lanes, [&](auto g) {
      InlineCopyKernel<g.value, kSmallInlinePieces><<<blocks, kThreadsPerBlock, 0, stream>>>(small);
    });
  } else {
    WithGroupLanes(lanes, [&](auto g) {
      InlineCopyKernel<g.value, kInlinePieces><<<blocks, kThreadsPerBlock, 0, stream>>>(launch);
    });
  }
  return cudaGetLastError();
}

cudaError_t LaunchTiledCopy(const TiledLaunch& launch, uint32_t max_blocks, cudaStream_t stream) {
  const int lanes = GroupLanesFor(launch.max_piece_bytes);
  const uint64_t tasks = launch.num_segments * launch.num_outer * launch.pieces_per_unit;
  const uint32_t blocks = BlocksFor(tasks, lanes, max_blocks);
  // The largest task index the grid-stride loop forms is below tasks plus
  // kSmallUnroll times the grid's groups.
  const uint64_t groups = uint64_t{blocks} * (kThreadsPerBlock / lanes);
  const bool narrow = tasks + kSmallUnroll * groups < (uint64_t{1} << 32);
  WithGroupLanes(lanes, [&](auto g) {
    if (narrow) {
      TiledCopyKernel<g.value, uint32_t><<<blocks, kThreadsPerBlock, 0, stream>>>(launch);
    } else {
      TiledCopyKernel<g.value, uint64_t><<<blocks, kThreadsPerBlock, 0, stream>>>(launch);
    }
  });
  return cudaGetLastError();
}

cudaError_t LaunchTiledListsCopy(const TiledLists& launch, uint64_t tasks, uint32_t max_blocks,
                                 cudaStream_t stream) {
  const int lanes = GroupLanesFor(launch.max_piece_bytes);
  const uint32_t blocks = BlocksFor(tasks, lanes, max_blocks);
  const uint64_t groups = uint64_t{blocks} * (kThreadsPerBlock / lanes);
  const bool narrow = tasks + kSmallUnroll * groups < (uint64_t{1} << 32);
  WithGroupLanes(lanes, [&](auto g) {
    if (narrow) {
      TiledListsCopyKernel<g.value, uint32_t>
          <<<blocks, kThreadsPerBlock, 0, stream>>>(launch, tasks);
    } else {
      TiledListsCopyKernel<g.value, uint64_t>
          <<<blocks, kThreadsPerBlock, 0, stream>>>(launch, tasks);
    }
  });
  return cudaGetLastError();
}

cudaError_t LaunchBatchedCopy(const PieceDescriptor* descriptors, uint32_t count, uint64_t src_base,
                              uint64_t dst_base, uint32_t max_blocks, cudaStream_t stream,
                              uint64_t max_piece_bytes) {
  const int lanes = GroupLanesFor(max_piece_bytes);
  const uint32_t blocks = BlocksFor(count, lanes, max_blocks);
  const FlatSource source{descriptors, src_base, dst_base};
  WithGroupLanes(lanes, [&](auto g) {
    BatchedCopyKernel<g.value><<<blocks, kThreadsPerBlock, 0, stream>>>(source, count);
  });
  return cudaGetLastError();
}

}  // namespace kvbounce::cuda_copy
