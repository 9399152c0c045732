// Random tiled lists (layout/tiled_list.h) for the copy engine tests.
#ifndef KVBOUNCE_TESTS_COPY_RANDOM_TILED_H_
#define KVBOUNCE_TESTS_COPY_RANDOM_TILED_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "layout/tiled_list.h"

namespace kvbounce::testing_tiled {

// A tiled list of offsets into a source and a destination extent.
struct RandomTiled {
  TiledList list;
  uint64_t src_extent = 0;
  uint64_t dst_extent = 0;
};

// `shapes` shapes of up to `runs_per_shape` runs each (1 B to `max_bytes`,
// log-uniform; random gaps; a third equally aligned modulo 16; destinations
// in shuffled order), `segments` segments of random shapes laid out one
// shape-extent apart (destinations shuffled) and `outer` outer offsets one
// segment-extent apart. No two runs of the expansion overlap on either side.
inline RandomTiled MakeRandomTiled(std::mt19937_64& rng, int outer, int segments, int shapes,
                                   int runs_per_shape, uint64_t max_bytes) {
  RandomTiled out;
  TiledList& t = out.list;
  std::uniform_real_distribution<double> log_size(0.0, std::log(static_cast<double>(max_bytes)));
  std::uniform_int_distribution<uint64_t> gap(0, 40);
  uint64_t shape_src = 0, shape_dst = 0;  // the largest shape extent, per side
  for (int s = 0; s < shapes; ++s) {
    const int n = 1 + static_cast<int>(rng() % static_cast<uint64_t>(runs_per_shape));
    std::vector<Fragment> runs(static_cast<size_t>(n));
    std::vector<bool> aligned(runs.size());
    uint64_t cursor = 0;
    for (size_t i = 0; i < runs.size(); ++i) {
      runs[i].bytes =
          std::clamp<uint64_t>(static_cast<uint64_t>(std::exp(log_size(rng))), 1, max_bytes);
      aligned[i] = rng() % 3 == 0;
      cursor += gap(rng);
      if (aligned[i]) cursor = (cursor + 15) / 16 * 16;
      runs[i].src = cursor;
      cursor += runs[i].bytes;
    }
    shape_src = std::max(shape_src, cursor);
    std::vector<size_t> order(runs.size());
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    cursor = 0;
    TileShape shape{t.runs.size(), runs.size(), 0};
    for (size_t i : order) {
      cursor += gap(rng);
      if (aligned[i]) cursor = (cursor + 15) / 16 * 16;
      runs[i].dst = cursor;
      cursor += runs[i].bytes;
    }
    shape_dst = std::max(shape_dst, cursor);
    for (const Fragment& f : runs) {
      shape.bytes += f.bytes;
      t.runs.push_back(f);
    }
    t.shapes.push_back(shape);
  }
  // Segment strides keep 16-byte alignment classes of the runs.
  const uint64_t seg_src = (shape_src + 16 + 15) / 16 * 16;
  const uint64_t seg_dst = (shape_dst + 16 + 15) / 16 * 16;
  std::vector<uint64_t> dst_slot(static_cast<size_t>(segments));
  std::iota(dst_slot.begin(), dst_slot.end(), 0);
  std::shuffle(dst_slot.begin(), dst_slot.end(), rng);
  for (int s = 0; s < segments; ++s) {
    t.segments.push_back(TileSegment{static_cast<uint64_t>(s) * seg_src,
                                     dst_slot[static_cast<size_t>(s)] * seg_dst,
                                     rng() % static_cast<uint64_t>(shapes)});
  }
  const uint64_t outer_src = seg_src * static_cast<uint64_t>(segments);
  const uint64_t outer_dst = seg_dst * static_cast<uint64_t>(segments);
  for (int o = 0; o < outer; ++o) {
    t.outer.push_back(TileOffset{static_cast<uint64_t>(o) * outer_src,
                                 static_cast<uint64_t>(outer - 1 - o) * outer_dst});
  }
  out.src_extent = outer_src * static_cast<uint64_t>(outer) + 64;
  out.dst_extent = outer_dst * static_cast<uint64_t>(outer) + 64;
  return out;
}

// The expansion applied on the host (offsets into `src` and `dst`).
inline void ApplyTiledOnHost(const TiledList& list, const std::vector<uint8_t>& src,
                             std::vector<uint8_t>& dst) {
  list.ForEachRun(
      [&](const Fragment& f) { std::memcpy(dst.data() + f.dst, src.data() + f.src, f.bytes); });
}

}  // namespace kvbounce::testing_tiled

#endif  // KVBOUNCE_TESTS_COPY_RANDOM_TILED_H_
