// The chunk cut of a packed stream and the slices of gather and scatter
// lists per chunk, against the unchunked stream.
#include "layout/chunking.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "layout/canonical_runs.h"
#include "layout/fragment.h"
#include "layout/tiled_list.h"

namespace kvbounce {
namespace {

using ::testing::HasSubstr;

TEST(ChunkCutTest, CutsTheStreamIntoChunksAndALastShortOne) {
  auto cut = ChunkCut::Create(10, 4);
  ASSERT_TRUE(cut.ok());
  EXPECT_EQ(cut->num_chunks(), 3u);
  EXPECT_EQ(cut->begin(1), 4u);
  EXPECT_EQ(cut->end(1), 8u);
  EXPECT_EQ(cut->size(2), 2u);
  EXPECT_EQ(ChunkCut::Create(0, 4)->num_chunks(), 0u);
  EXPECT_EQ(ChunkCut::Create(3, 4)->num_chunks(), 1u);
  EXPECT_EQ(ChunkCut::Create(3, 4)->end(0), 3u);
  EXPECT_EQ(ChunkCut::Create(8, 4)->num_chunks(), 2u);
  // A chunk size near 2^64 does not wrap.
  const uint64_t huge = ~uint64_t{0} - 3;
  EXPECT_EQ(ChunkCut::Create(huge, huge - 1)->end(1), huge);
  const Status zero = ChunkCut::Create(10, 0).status();
  EXPECT_EQ(zero.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(zero.message()), HasSubstr("chunk_bytes = 0"));
}

// A random gather list (scattered sources -> the dense packed stream) and a
// scatter list cutting the same stream at other run boundaries (-> scattered
// destinations), over buffers of `src_bytes` and `dst_bytes`.
struct Lists {
  std::vector<Fragment> gather, scatter;
  uint64_t stream = 0, src_bytes = 0, dst_bytes = 0;
};

std::vector<Fragment> DenseRuns(std::mt19937_64& rng, uint64_t stream, uint64_t max_run,
                                bool packed_on_dst, uint64_t* extent) {
  std::vector<uint64_t> sizes;
  for (uint64_t at = 0; at < stream;) {
    const uint64_t b = std::min(stream - at, 1 + rng() % max_run);
    sizes.push_back(b);
    at += b;
  }
  // Place the other side's runs in shuffled order with gaps.
  std::vector<size_t> order(sizes.size());
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<uint64_t> place(sizes.size());
  uint64_t cursor = 0;
  for (size_t i : order) {
    cursor += rng() % 8;
    place[i] = cursor;
    cursor += sizes[i];
  }
  *extent = cursor + 8;
  std::vector<Fragment> list;
  uint64_t packed = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    list.push_back(packed_on_dst ? Fragment{place[i], packed, sizes[i]}
                                 : Fragment{packed, place[i], sizes[i]});
    packed += sizes[i];
  }
  return list;
}

void Apply(std::span<const Fragment> list, const std::vector<uint8_t>& src, uint64_t src_base,
           std::vector<uint8_t>& dst, uint64_t dst_base) {
  for (const Fragment& f : list) {
    std::memcpy(dst.data() + (f.dst - dst_base), src.data() + (f.src - src_base), f.bytes);
  }
}

TEST(SliceChunkTest, ChunkByChunkEqualsTheWholeStream) {
  for (int trial = 0; trial < 300; ++trial) {
    SCOPED_TRACE("trial " + std::to_string(trial));
    std::mt19937_64 rng(0xC0FFEE + trial);
    Lists l;
    l.stream = trial % 10 == 0 ? 1 + rng() % 8 : 1 + rng() % 5000;
    l.gather = DenseRuns(rng, l.stream, 1 + rng() % 300, /*packed_on_dst=*/true, &l.src_bytes);
    l.scatter = DenseRuns(rng, l.stream, 1 + rng() % 300, /*packed_on_dst=*/false, &l.dst_bytes);
    // Chunks of one byte, of a few bytes (cuts inside runs), larger than
    // the stream.
    const uint64_t kChoices[] = {1, 1 + rng() % 64, 1 + rng() % l.stream, l.stream,
                                 l.stream + 1 + rng() % 100};
    const uint64_t chunk = kChoices[rng() % 5];
    SCOPED_TRACE("stream " + std::to_string(l.stream) + ", chunk " + std::to_string(chunk));
    std::vector<uint8_t> src(l.src_bytes);
    for (auto& b : src) b = static_cast<uint8_t>(rng());

    // Unchunked: gather the whole stream, scatter it.
    std::vector<uint8_t> packed(l.stream), expected(l.dst_bytes, 0);
    Apply(l.gather, src, 0, packed, 0);
    Apply(l.scatter, packed, 0, expected, 0);

    // Chunked: a slot of one chunk, gathered into and scattered out of.
    auto cut = ChunkCut::Create(l.stream, chunk);
    ASSERT_TRUE(cut.ok());
    std::vector<uint8_t> got(l.dst_bytes, 0), slot(std::min(chunk, l.stream));
    FragmentList regathered, rescattered;
    for (uint64_t k = 0; k < cut->num_chunks(); ++k) {
      FragmentList g, s;
      ASSERT_TRUE(
          SliceChunk(l.gather, PackedSide::kDestination, cut->begin(k), cut->end(k), &g).ok());
      ASSERT_TRUE(SliceChunk(l.scatter, PackedSide::kSource, cut->begin(k), cut->end(k), &s).ok());
      // Each slice covers its chunk densely from 0.
      uint64_t at = 0;
      for (const Fragment& f : g) {
        EXPECT_EQ(f.dst, at);
        at += f.bytes;
      }
      EXPECT_EQ(at, cut->size(k));
      at = 0;
      for (const Fragment& f : s) {
        EXPECT_EQ(f.src, at);
        at += f.bytes;
      }
      EXPECT_EQ(at, cut->size(k));
      std::fill(slot.begin(), slot.end(), 0xEE);
      Apply(g, src, 0, slot, 0);
      Apply(s, slot, 0, got, 0);
      for (Fragment f : g) {
        f.dst += cut->begin(k);
        regathered.push_back(f);
      }
      for (Fragment f : s) {
        f.src += cut->begin(k);
        rescattered.push_back(f);
      }
    }
    EXPECT_EQ(got, expected);
    // Put back together (runs adjacent on both sides merged, in both: the
    // random lists may hold such neighbours), the slices are the lists.
    EXPECT_EQ(CanonicalRuns(regathered, PackedSide::kDestination),
              CanonicalRuns(l.gather, PackedSide::kDestination));
    EXPECT_EQ(CanonicalRuns(rescattered, PackedSide::kSource),
              CanonicalRuns(l.scatter, PackedSide::kSource));
  }
}

TEST(SliceChunkTest, BadSlicesAndListsAreClearErrors) {
  const std::vector<Fragment> gather = {{100, 0, 10}, {300, 10, 5}, {200, 15, 20}};
  FragmentList out;
  Status s = SliceChunk(gather, PackedSide::kDestination, 8, 4, &out);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("begin > end"));
  s = SliceChunk(gather, PackedSide::kDestination, 30, 36, &out);
  EXPECT_EQ(s.code(), StatusCode::kOutOfRange);
  EXPECT_THAT(std::string(s.message()), HasSubstr("past the stream's 35 bytes"));
  EXPECT_TRUE(SliceChunk(gather, PackedSide::kDestination, 35, 35, &out).ok());
  EXPECT_TRUE(out.empty());
  EXPECT_TRUE(SliceChunk({}, PackedSide::kSource, 0, 0, &out).ok());
  // Read as a scatter list, the packed offsets (sources) are not dense.
  s = SliceChunk(gather, PackedSide::kSource, 100, 120, &out);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("not a gather or scatter list"));
  const std::vector<Fragment> gap = {{0, 0, 10}, {50, 12, 5}};
  out.clear();
  s = SliceChunk(gap, PackedSide::kDestination, 0, 17, &out);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("run 1 starts at packed byte 12, not at 10"));
  // A slice inside one run.
  out.clear();
  ASSERT_TRUE(SliceChunk(gather, PackedSide::kDestination, 17, 21, &out).ok());
  EXPECT_EQ(out, (FragmentList{{202, 0, 4}}));
}

// A random tiled list in packed order (`packed` naming its side): shapes of
// a few runs scattered on the other side, outer offsets and segments placed
// so that the tiles follow one another in the packed stream, and a tail.
TiledList RandomOrderedTiles(std::mt19937_64& rng, PackedSide packed) {
  const auto make = [packed](uint64_t other, uint64_t at, uint64_t bytes) {
    return packed == PackedSide::kDestination ? Fragment{other, at, bytes}
                                              : Fragment{at, other, bytes};
  };
  TiledList list;
  const uint64_t num_shapes = 1 + rng() % 3;
  for (uint64_t i = 0; i < num_shapes; ++i) {
    TileShape shape{list.runs.size(), 1 + rng() % 4, 0};
    const uint64_t base = i == 0 ? 0 : rng() % 3;  // a shape's runs need not start at 0
    for (uint64_t r = 0; r < shape.num_runs; ++r) {
      const uint64_t b = 1 + rng() % 9;
      list.runs.push_back(make(r * 40 + rng() % 8, base + shape.bytes, b));
      shape.bytes += b;
    }
    list.shapes.push_back(shape);
  }
  const uint64_t num_outer = 1 + rng() % 4, num_segments = 1 + rng() % 6;
  // Each outer's tiles: the segments' packed offsets ascend densely.
  uint64_t per_outer = 0;
  for (uint64_t s = 0; s < num_segments; ++s) {
    // A shape's base above the packed bytes before it would put the
    // segment before 0: shape 0 (base 0) there.
    uint64_t shape = s == 0 ? 0 : rng() % num_shapes;
    const auto base_of = [&](uint64_t i) {
      const Fragment& first = list.runs[list.shapes[i].first_run];
      return packed == PackedSide::kDestination ? first.dst : first.src;
    };
    if (base_of(shape) > per_outer) shape = 0;
    const uint64_t base = base_of(shape);
    TileSegment segment{};
    segment.shape = shape;
    const Fragment at = make(100000 + s * 1000, per_outer - base, 0);
    segment.src = at.src;
    segment.dst = at.dst;
    list.segments.push_back(segment);
    per_outer += list.shapes[shape].bytes;
  }
  uint64_t packed_at = 0;
  for (uint64_t o = 0; o < num_outer; ++o) {
    const Fragment at = make(10000000 * (o + 1), packed_at, 0);
    list.outer.push_back(TileOffset{at.src, at.dst});
    packed_at += per_outer;
  }
  const uint64_t tail = rng() % 3;
  for (uint64_t t = 0; t < tail; ++t) {
    const uint64_t b = 1 + rng() % 7;
    list.tail.push_back(make(900000000 + t * 100, packed_at, b));
    packed_at += b;
  }
  return list;
}

TEST(SliceTiledChunkTest, CopiesWhatTheFlatSliceCopies) {
  int kept_tiles = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    SCOPED_TRACE("trial " + std::to_string(trial));
    std::mt19937_64 rng(0x711ED + trial);
    const PackedSide side = trial % 2 == 0 ? PackedSide::kDestination : PackedSide::kSource;
    const TiledList tiles = RandomOrderedTiles(rng, side);
    ASSERT_TRUE(TiledInPackedOrder(tiles, side));
    FragmentList flat;
    tiles.ExpandTo(&flat);
    OrderForSlicing(flat, side);
    const uint64_t stream = tiles.TotalBytes();
    const uint64_t kChoices[] = {1, 1 + rng() % 16, 1 + rng() % stream, stream, stream + 5};
    const uint64_t chunk = kChoices[rng() % 5];
    auto cut = ChunkCut::Create(stream, chunk);
    ASSERT_TRUE(cut.ok());
    std::vector<Fragment> whole;
    for (uint64_t k = 0; k < cut->num_chunks(); ++k) {
      TiledList slice;
      FragmentList expected;
      ASSERT_TRUE(SliceTiledChunk(tiles, side, cut->begin(k), cut->end(k), &slice).ok());
      ASSERT_TRUE(SliceChunk(flat, side, cut->begin(k), cut->end(k), &expected).ok());
      ASSERT_TRUE(slice.WellFormed());
      EXPECT_EQ(slice.TotalBytes(), cut->size(k));
      ASSERT_EQ(CanonicalRuns(slice, side), CanonicalRuns(expected, side))
          << "chunk " << k << " of " << cut->num_chunks() << " (" << chunk << " bytes)";
      if (!slice.outer.empty() && !slice.segments.empty()) ++kept_tiles;
      slice.ForEachRun([&](Fragment f) {
        (side == PackedSide::kDestination ? f.dst : f.src) += cut->begin(k);
        whole.push_back(f);
      });
    }
    // The chunks together are the list.
    EXPECT_EQ(CanonicalRuns(whole, side), CanonicalRuns(tiles, side));
  }
  // Most chunks keep some whole tiles tiled (not all go flat).
  EXPECT_GT(kept_tiles, 2000);
}

TEST(SliceTiledChunkTest, ListsOutOfPackedOrderAndBadSlicesAreRefused) {
  std::mt19937_64 rng(7);
  TiledList tiles = RandomOrderedTiles(rng, PackedSide::kDestination);
  while (tiles.segments.size() < 2) tiles = RandomOrderedTiles(rng, PackedSide::kDestination);
  EXPECT_TRUE(TiledInPackedOrder(tiles, PackedSide::kDestination));
  // Read on the other side, or with two segments swapped, the packed
  // stream is not the run order.
  EXPECT_FALSE(TiledInPackedOrder(tiles, PackedSide::kSource));
  TiledList swapped = tiles;
  std::swap(swapped.segments[0], swapped.segments[1]);
  EXPECT_FALSE(TiledInPackedOrder(swapped, PackedSide::kDestination));
  TiledList malformed = tiles;
  malformed.segments[0].shape = 99;
  EXPECT_FALSE(TiledInPackedOrder(malformed, PackedSide::kDestination));

  TiledList out;
  const uint64_t total = tiles.TotalBytes();
  Status s = SliceTiledChunk(tiles, PackedSide::kDestination, 4, 2, &out);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("begin > end"));
  s = SliceTiledChunk(tiles, PackedSide::kDestination, 0, total + 1, &out);
  EXPECT_EQ(s.code(), StatusCode::kOutOfRange);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("past the stream's " + std::to_string(total) + " bytes"));
  ASSERT_TRUE(SliceTiledChunk(tiles, PackedSide::kDestination, 3, 3, &out).ok());
  EXPECT_TRUE(out.empty());
  // The whole stream in one chunk is every tile, none flat.
  ASSERT_TRUE(SliceTiledChunk(tiles, PackedSide::kDestination, 0, total, &out).ok());
  EXPECT_EQ(out.outer.size(), tiles.outer.size());
  EXPECT_EQ(out.segments.size(), tiles.segments.size());
  EXPECT_EQ(out.tail.size(), tiles.tail.size());
}

}  // namespace
}  // namespace kvbounce
