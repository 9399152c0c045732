// Chunks of a writer's packed stream: the cut streaming bounce moves one
// chunk slot at a time (docs/architecture.md §6, "Streaming").
//
// A writer's packed stream of P bytes is cut into chunks of C bytes: chunk k
// holds bytes [k*C, min((k+1)*C, P)). Both sides know P (the plan) and C
// (the chunk size the receiver names), so both derive the same cut and no
// run list or pointer crosses the wire. A chunk boundary may fall inside a
// run: the run is then split between two chunks.
//
// A gather list (packed offset on the destination side) and a scatter list
// (packed offset on the source side) cover the packed stream densely and in
// order: run i starts where run i-1 ends. SliceChunk takes the part of such
// a list that lands in one chunk, its packed side made relative to the
// chunk's start, so that the same engine batch helpers (GatherBatch /
// ScatterBatch with the chunk slot's address) run it.
//
// Thread safety: pure functions over immutable inputs.
#ifndef KVBOUNCE_LAYOUT_CHUNKING_H_
#define KVBOUNCE_LAYOUT_CHUNKING_H_

#include <cstdint>
#include <span>

#include "kvbounce/status.h"
#include "layout/fragment.h"
#include "layout/tiled_list.h"

namespace kvbounce {

// The cut of one stream.
class ChunkCut {
 public:
  // Errors: kInvalidArgument for chunk_bytes = 0.
  static Result<ChunkCut> Create(uint64_t stream_bytes, uint64_t chunk_bytes);

  uint64_t stream_bytes() const { return stream_bytes_; }
  uint64_t chunk_bytes() const { return chunk_bytes_; }
  // 0 for an empty stream.
  uint64_t num_chunks() const { return num_chunks_; }
  // Chunk k's bytes of the stream, [begin(k), end(k)). REQUIRES: k < num_chunks().
  uint64_t begin(uint64_t k) const { return k * chunk_bytes_; }
  uint64_t end(uint64_t k) const;
  uint64_t size(uint64_t k) const { return end(k) - begin(k); }

 private:
  ChunkCut(uint64_t stream_bytes, uint64_t chunk_bytes);
  uint64_t stream_bytes_ = 0;
  uint64_t chunk_bytes_ = 1;
  uint64_t num_chunks_ = 0;
};

// Which side of a list's fragments holds the packed offset.
enum class PackedSide : uint8_t {
  kDestination,  // a gather list
  kSource,       // a scatter list
};

// Puts the runs of a gather or scatter list in the order of their packed
// offsets (`packed` naming the side), which SliceChunk needs: the planner
// emits runs in the walk order of the writer, and where the two sides'
// layouts differ that is not always the order of the packed stream. A list
// already in order is left as it is (one pass to check).
void OrderForSlicing(FragmentList& list, PackedSide packed);

// Appends to `out` the runs of `list` (a gather or scatter list, `packed`
// naming which) that land in bytes [begin, end) of the packed stream, cut
// at the two ends, with their packed offsets less `begin`. Costs a binary
// search plus a step per run appended.
// Errors: kInvalidArgument when begin > end; kOutOfRange when `end` lies
// past the list's last byte; kInvalidArgument when the runs it walks do
// not cover the stream densely (a run starting elsewhere than where the one
// before ended: not a gather or scatter list), naming the run. `out` may
// then hold a part of the slice.
Status SliceChunk(std::span<const Fragment> list, PackedSide packed, uint64_t begin, uint64_t end,
                  FragmentList* out);

// Whether a tiled gather or scatter list (`packed` naming which) covers its
// packed stream densely in its own run order: each tile's runs packed one
// after another, each tile starting where the one before it ended, then the
// tail's runs likewise, from packed byte 0. SliceTiledChunk needs this.
// The planner's lists are in this order where the packed stream follows the
// receiver's block in the walk's order (a receiver block not cut by the
// writer's block edges into interleaving segments); a list that is not
// (or not WellFormed, or with a tile of no bytes) is sliced flat instead.
// Costs a step per tile and per run.
bool TiledInPackedOrder(const TiledList& list, PackedSide packed);

// Sets `out` to the part of `list` that lands in bytes [begin, end) of the
// packed stream, with packed offsets relative to `begin`, as SliceChunk
// does for a flat list (the same runs, cut the same way: their expansions
// copy the same bytes). The tiles wholly inside the range stay tiles
// (those of one outer index, or of whole outer indices), so a chunk costs
// the host a step per tile and the engine expands it as it does the whole
// list; the tiles cut by `begin` or `end`, and the whole tiles of an outer
// index only partly inside the range beside whole outer indices, go to
// `out->tail` as flat runs.
// REQUIRES: TiledInPackedOrder(list, packed).
// Errors: kInvalidArgument when begin > end; kOutOfRange when `end` lies
// past the list's last byte.
Status SliceTiledChunk(const TiledList& list, PackedSide packed, uint64_t begin, uint64_t end,
                       TiledList* out);

}  // namespace kvbounce

#endif  // KVBOUNCE_LAYOUT_CHUNKING_H_
