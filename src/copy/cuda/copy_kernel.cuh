// The batched copy kernel of the CUDA copy engine, and its host launcher.
//
// One launch moves many pieces: a piece is `bytes` bytes from `src` to `dst`
// (device pointers, or pinned host memory mapped into the device's address
// space). The pieces' descriptors lie in device memory. Each group of lanes
// of the grid takes pieces in turn (a grid-stride loop over the descriptor
// array). A group is a warp, which copies a piece with its 32 lanes: 16-byte
// vector loads and stores, several in flight per lane, when source and
// destination are equally aligned modulo 16; otherwise the widest word (8,
// 4, 2 or 1 bytes) both share, with a byte-wise head and tail around the
// aligned middle. When the launch's pieces are small (at most 256 bytes:
// the launcher is told the largest), a group is 8 or 16 lanes, one 16-byte
// word a lane, and it loads several pieces before it stores any — a warp
// per 256-byte piece would leave half its lanes idle and one load in flight
// per lane. The group size only tunes speed: any piece is copied whole by
// any group. The host keeps pieces to at most kMaxPieceBytes so one large
// fragment spreads over many groups.
//
// Thread safety: LaunchBatchedCopy may be called from any thread whose
// current device owns `stream`.
#ifndef KVBOUNCE_COPY_CUDA_COPY_KERNEL_CUH_
#define KVBOUNCE_COPY_CUDA_COPY_KERNEL_CUH_

#include <cuda_runtime_api.h>

#include <cstdint>

namespace kvbounce::cuda_copy {

// One piece of a launch (24 bytes, uploaded as-is: host and device share
// the layout, which is also kvbounce::Fragment's, so a plan list whose
// fragments are all small enough is uploaded verbatim). The kernel copies
// from src_base + src to dst_base + dst (the launch's two bases).
struct PieceDescriptor {
  uint64_t src;
  uint64_t dst;
  uint64_t bytes;
};
static_assert(sizeof(PieceDescriptor) == 24);

// Fragments longer than this are cut into pieces of at most this many
// bytes; a warp copies one piece (32 KiB: 16 passes of 2 KiB a warp).
inline constexpr uint64_t kMaxPieceBytes = uint64_t{32} << 10;

// Threads per block of the kernel (8 warps).
inline constexpr int kThreadsPerBlock = 256;

// A tiled launch (layout/tiled_list.h): the kernel expands the product of
// outer offsets, segments and shape pieces itself. Unit u = s * num_outer
// + o pairs segment s with outer offset o; each unit has pieces_per_unit
// tasks (the most pieces of any shape), of which a segment whose shape has
// fewer pieces skips the rest; a group takes a task in turn and copies
//   pieces[segments[s].first_piece + p].bytes bytes from
//   src_base + outer[o].src + segments[s].src + pieces[...].src
// to the same sum on the destination side. The host writes each segment's
// shape into its descriptor (first piece and count), so a task's loads do
// not depend on one another beyond the segment's.
struct TileOffsetDescriptor {
  uint64_t src;
  uint64_t dst;
};
static_assert(sizeof(TileOffsetDescriptor) == 16);

struct TileSegmentDescriptor {
  uint64_t src;
  uint64_t dst;
  uint32_t first_piece;
  uint32_t num_pieces;
};
static_assert(sizeof(TileSegmentDescriptor) == 24);

struct TiledLaunch {
  const TileOffsetDescriptor* outer;  // device memory, num_outer entries
  const TileSegmentDescriptor* segments;
  const PieceDescriptor* pieces;  // relative to (outer + segment)
  uint64_t num_outer;
  uint64_t num_segments;
  uint64_t pieces_per_unit;
  uint64_t src_base;
  uint64_t dst_base;
  // The largest piece's bytes (or more): picks the group size.
  uint64_t max_piece_bytes = kMaxPieceBytes;
};

// Several tiled lists in one launch (the CUDA engine's merged launches of
// batches with different tables): list k's tasks are numbered after those
// of lists 0..k-1, task_end[k] being the end of list k's; a group finds
// its task's list by binary search over task_end (a few cached loads) and
// copies it as a TiledLaunch of its own would.
inline constexpr uint32_t kMaxTiledLists = 64;
struct TiledLists {
  const TiledLaunch* lists;  // device memory, count entries
  const uint64_t* task_end;  // device memory, count entries, non-decreasing
  uint32_t count;
  // The largest piece of any list: picks the group size.
  uint64_t max_piece_bytes = kMaxPieceBytes;
};

// The lanes of the group that copies pieces of at most `max_piece_bytes`
// (8, 16 or a warp): lists merged into one launch must agree on it, or the
// smaller pieces would be copied by groups too wide for them.
int GroupLanesFor(uint64_t max_piece_bytes);

// A batch small enough to travel in the kernel's parameters (under the
// 4 KiB every CUDA version takes): no descriptor upload, no wait between
// two streams, so a one-block request's copy is one launch call. Two sizes
// of parameter block: a batch of at most kSmallInlinePieces pieces (a
// one-block request's few fragments) travels in one of ~200 bytes, which
// launches and starts ~1 µs sooner on an H200 than the whole 3 KiB
// (docs/PERFORMANCE.md); LaunchInlineCopy picks the size.
inline constexpr uint32_t kInlinePieces = 128;
template <uint32_t N>
struct InlineLaunchOf {
  uint64_t src_base;
  uint64_t dst_base;
  uint32_t count;  // pieces used, 1 to N
  PieceDescriptor pieces[N];
};
using InlineLaunch = InlineLaunchOf<kInlinePieces>;
inline constexpr uint32_t kSmallInlinePieces = 8;
static_assert(sizeof(InlineLaunch) <= 4000);

// Enqueues one kernel on `stream` copying the pieces of `launch` (a group
// per piece, sized to the largest). Returns the launch's error.
cudaError_t LaunchInlineCopy(const InlineLaunch& launch, cudaStream_t stream);

// Enqueues one kernel on `stream` that copies the tiled launch `launch`,
// using at most `max_blocks` blocks. Returns the launch's error.
// REQUIRES: num_outer, num_segments and pieces_per_unit > 0; the arrays
// stay valid until the kernel has finished.
cudaError_t LaunchTiledCopy(const TiledLaunch& launch, uint32_t max_blocks, cudaStream_t stream);

// Enqueues one kernel on `stream` that copies every list of `launch`
// (`tasks` tasks in all: task_end[count - 1]), using at most `max_blocks`
// blocks. Returns the launch's error.
// REQUIRES: 1 <= count <= kMaxTiledLists; every list as LaunchTiledCopy
// requires, except that a list may have no tasks; the arrays stay valid
// until the kernel has finished.
cudaError_t LaunchTiledListsCopy(const TiledLists& launch, uint64_t tasks, uint32_t max_blocks,
                                 cudaStream_t stream);

// Enqueues one kernel on `stream` that copies the `count` pieces at
// `descriptors` (device memory), each from src_base + src to dst_base + dst,
// using at most `max_blocks` blocks, with groups sized for pieces of at
// most `max_piece_bytes` (a hint: larger ones are copied too, slower). A
// piece of 0 bytes is skipped (its addresses are not used). Returns the
// launch's error (cudaSuccess when enqueued).
// REQUIRES: count > 0; max_blocks > 0; descriptors stay valid until the
// kernel has finished.
cudaError_t LaunchBatchedCopy(const PieceDescriptor* descriptors, uint32_t count, uint64_t src_base,
                              uint64_t dst_base, uint32_t max_blocks, cudaStream_t stream,
                              uint64_t max_piece_bytes = kMaxPieceBytes);

}  // namespace kvbounce::cuda_copy

#endif  // KVBOUNCE_COPY_CUDA_COPY_KERNEL_CUH_
