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

#include "layout/fragment.h"

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
    const auto merged = [](std::span<const Fragment> in) {
      std::vector<Fragment> out;
      for (const Fragment& f : in) {
        if (!out.empty() && out.back().src + out.back().bytes == f.src &&
            out.back().dst + out.back().bytes == f.dst) {
          out.back().bytes += f.bytes;
        } else {
          out.push_back(f);
        }
      }
      return out;
    };
    EXPECT_EQ(merged(regathered), merged(l.gather));
    EXPECT_EQ(merged(rescattered), merged(l.scatter));
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

}  // namespace
}  // namespace kvbounce
