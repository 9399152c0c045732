// TiledList: a plan list kept in the form the planner walks it, for engines
// that expand it where they copy (docs/architecture.md §4, "Tiled lists").
//
// The planner walks a pair's box as three nested loops: the receiver's
// dimensions outside its block (layers and K/V of a layer-major pool; none
// for a block-major one), the segments (the token range cut at both sides'
// block edges: one per block, typically) and, inside a segment, the runs of
// its shape (every full block has the same). A flat list (FragmentList) is
// the product of the three; a TiledList keeps the three factors:
//
//   run (o, s, r) copies runs[shapes[segments[s].shape].first_run + r].bytes
//   bytes from  outer[o].src + segments[s].src + runs[...].src
//   to          outer[o].dst + segments[s].dst + runs[...].dst
//
// in the order o, then s, then r (outer-major, the flat list's order), then
// the runs of `tail` as they are. Its
// size is the outer extent plus the segments plus the distinct shapes'
// runs — hundreds of entries where the flat list has tens of thousands — so
// planning a request costs a step per block, and an engine that expands the
// product itself (the CUDA engine, on the device) touches nothing per run on
// the host.
//
// Runs merge inside a shape as in a flat list; runs of two tiles that
// happen to be adjacent are not merged (ExpandTo merges them, and so yields
// exactly the flat list the planner would have built).
//
// Thread safety: a plain value; const members are safe from any thread.
#ifndef KVBOUNCE_LAYOUT_TILED_LIST_H_
#define KVBOUNCE_LAYOUT_TILED_LIST_H_

#include <cstdint>
#include <vector>

#include "layout/fragment.h"

namespace kvbounce {

// An offset pair: where a tile starts on each side.
struct TileOffset {
  uint64_t src = 0;
  uint64_t dst = 0;

  friend bool operator==(const TileOffset&, const TileOffset&) = default;
};

struct TileSegment {
  uint64_t src = 0;
  uint64_t dst = 0;
  uint64_t shape = 0;  // index into TiledList::shapes

  friend bool operator==(const TileSegment&, const TileSegment&) = default;
};

struct TileShape {
  uint64_t first_run = 0;  // into TiledList::runs
  uint64_t num_runs = 0;
  uint64_t bytes = 0;  // sum of its runs' bytes

  friend bool operator==(const TileShape&, const TileShape&) = default;
};

struct TiledList {
  std::vector<TileOffset> outer;      // empty: the list has no runs
  std::vector<TileSegment> segments;  // in token order
  std::vector<TileShape> shapes;
  std::vector<Fragment> runs;  // relative to (outer + segment); no zero-byte run
  // Runs after the product, absolute (a hybrid model's state, layout/
  // state_layout.h: a few per layer, no tile to factor out).
  std::vector<Fragment> tail;

  bool empty() const { return (outer.empty() || segments.empty()) && tail.empty(); }
  // The runs of the expansion (before ExpandTo's merging) and their bytes.
  uint64_t NumRuns() const;
  uint64_t TotalBytes() const;

  // Calls f(Fragment) for every run of the expansion, in order (unmerged).
  template <typename F>
  void ForEachRun(F&& f) const {
    for (const TileOffset& o : outer) {
      for (const TileSegment& s : segments) {
        const TileShape& shape = shapes[s.shape];
        for (uint64_t r = 0; r < shape.num_runs; ++r) {
          const Fragment& run = runs[shape.first_run + r];
          f(Fragment{o.src + s.src + run.src, o.dst + s.dst + run.dst, run.bytes});
        }
      }
    }
    for (const Fragment& run : tail) f(run);
  }

  // Appends the expansion to `out`, merging each run with the one before
  // when they are adjacent on both sides: the flat list the planner builds
  // for the same plan.
  void ExpandTo(FragmentList* out) const;

  // Whether every index is in range (segment shapes, shape runs) and every
  // shape's `bytes` is its runs' sum. The planner's lists always are; an
  // engine checks a list handed to it (ValidateCopyBatch).
  bool WellFormed() const;

  friend bool operator==(const TiledList&, const TiledList&) = default;
};

}  // namespace kvbounce

#endif  // KVBOUNCE_LAYOUT_TILED_LIST_H_
