// Tiled lists (layout/tiled_list.h) and tiled copy batches on an engine that
// expands them in Submit (the CPU engine): the copies, the checks, the
// errors.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <future>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "copy/copy_engine.h"
#include "copy/cpu/cpu_copy_engine.h"
#include "kvbounce/status.h"
#include "layout/tiled_list.h"
#include "random_tiled.h"

namespace kvbounce {
namespace {

using ::testing::HasSubstr;
using testing_tiled::ApplyTiledOnHost;
using testing_tiled::MakeRandomTiled;
using testing_tiled::RandomTiled;

// Two outer offsets x two segments of one shape with two runs.
TiledList SmallList() {
  TiledList t;
  t.outer = {{0, 0}, {1000, 2000}};
  t.segments = {{0, 0, 0}, {100, 100, 0}};
  t.shapes = {{0, 2, 30}};
  t.runs = {{0, 0, 10}, {10, 10, 20}};
  return t;
}

TEST(TiledListTest, ExpansionIsOuterMajorAndMergesAdjacentRuns) {
  const TiledList t = SmallList();
  EXPECT_TRUE(t.WellFormed());
  EXPECT_EQ(t.NumRuns(), 8u);
  EXPECT_EQ(t.TotalBytes(), 120u);
  std::vector<Fragment> seen;
  t.ForEachRun([&](const Fragment& f) { seen.push_back(f); });
  ASSERT_EQ(seen.size(), 8u);
  EXPECT_EQ(seen[2], (Fragment{100, 100, 10}));
  EXPECT_EQ(seen[4], (Fragment{1000, 2000, 10}));
  // The shape's two runs are adjacent on both sides: each tile merges into
  // one run; tiles 100 apart do not merge.
  FragmentList flat;
  t.ExpandTo(&flat);
  EXPECT_EQ(flat, (FragmentList{{0, 0, 30}, {100, 100, 30}, {1000, 2000, 30}, {1100, 2100, 30}}));
}

TEST(TiledListTest, MalformedListsAreNotWellFormed) {
  TiledList t = SmallList();
  t.segments[1].shape = 1;
  EXPECT_FALSE(t.WellFormed());
  t = SmallList();
  t.shapes[0].num_runs = 3;
  EXPECT_FALSE(t.WellFormed());
  t = SmallList();
  t.shapes[0].bytes = 31;
  EXPECT_FALSE(t.WellFormed());
  t = SmallList();
  t.runs[1].bytes = 0;
  t.shapes[0].bytes = 10;
  EXPECT_FALSE(t.WellFormed());
  EXPECT_TRUE(TiledList().WellFormed());
  EXPECT_TRUE(TiledList().empty());
}

class TiledBatchTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto engine = CpuCopyEngine::Create();
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = std::move(engine).value();
    ASSERT_FALSE(engine_->Caps().tiled_lists);  // Submit expands
  }

  std::unique_ptr<CpuCopyEngine> engine_;
};

TEST_F(TiledBatchTest, RandomListsCopyAsTheirExpansion) {
  for (uint64_t seed = 1; seed <= 20; ++seed) {
    SCOPED_TRACE("seed " + std::to_string(seed));
    std::mt19937_64 rng(seed);
    const RandomTiled r = MakeRandomTiled(rng, 1 + static_cast<int>(rng() % 4),
                                          1 + static_cast<int>(rng() % 20), 3, 12, 5000);
    std::vector<uint8_t> src(r.src_extent), dst(r.dst_extent, 0xCD);
    for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint8_t>(i * 131 + seed);
    std::vector<uint8_t> expected = dst;
    ApplyTiledOnHost(r.list, src, expected);
    const Addr src_base = Addr::FromPointer(src.data());
    const Addr dst_base = Addr::FromPointer(dst.data());
    if (seed % 2 == 0) {
      // Bases as batch arguments (a gather into a slot at dst_base).
      CopyBatch batch{{}, src_base, dst_base, &r.list};
      ASSERT_TRUE(engine_->CopySync(batch).ok());
    } else {
      // Absolute addresses in the outer offsets, copied on this thread.
      TiledList absolute = r.list;
      for (TileOffset& o : absolute.outer) {
        o.src += src_base.value();
        o.dst += dst_base.value();
      }
      std::promise<Status> done;
      ASSERT_TRUE(engine_
                      ->SubmitOrCopyHere(DirectBatch(absolute), uint64_t{1} << 30,
                                         [&](Status s) { done.set_value(std::move(s)); })
                      .ok());
      ASSERT_TRUE(done.get_future().get().ok());
    }
    EXPECT_EQ(dst, expected);
  }
}

TEST_F(TiledBatchTest, GatherThenScatterThroughASlotRoundTrips) {
  std::mt19937_64 rng(77);
  const RandomTiled r = MakeRandomTiled(rng, 3, 9, 2, 8, 3000);
  std::vector<uint8_t> src(r.src_extent), slot(r.dst_extent, 0), back(r.src_extent, 0);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint8_t>(i * 7 + 3);
  // The scatter list is the gather list with the sides swapped.
  TiledList scatter = r.list;
  for (TileOffset& o : scatter.outer) std::swap(o.src, o.dst);
  for (TileSegment& s : scatter.segments) std::swap(s.src, s.dst);
  for (Fragment& f : scatter.runs) std::swap(f.src, f.dst);
  TiledList gather = r.list;
  for (TileOffset& o : gather.outer) o.src += Addr::FromPointer(src.data()).value();
  for (TileOffset& o : scatter.outer) o.dst += Addr::FromPointer(back.data()).value();
  ASSERT_TRUE(engine_->CopySync(GatherBatch(gather, Addr::FromPointer(slot.data()))).ok());
  ASSERT_TRUE(engine_->CopySync(ScatterBatch(scatter, Addr::FromPointer(slot.data()))).ok());
  std::vector<uint8_t> expected(r.src_extent, 0);
  r.list.ForEachRun([&](const Fragment& f) {
    std::copy_n(src.begin() + static_cast<std::ptrdiff_t>(f.src), f.bytes,
                expected.begin() + static_cast<std::ptrdiff_t>(f.src));
  });
  EXPECT_EQ(back, expected);
}

TEST_F(TiledBatchTest, BadBatchesAreRejectedWithoutCallingDone) {
  std::vector<uint8_t> a(4096), b(4096);
  const Addr pa = Addr::FromPointer(a.data());
  const Addr pb = Addr::FromPointer(b.data());
  bool called = false;
  auto submit = [&](const CopyBatch& batch) {
    return engine_->Submit(batch, [&](Status) { called = true; });
  };
  const TiledList good = SmallList();
  ASSERT_TRUE(engine_->CopySync(CopyBatch{{}, pa, pb, &good}).ok());

  // Fragments beside the list.
  const Fragment extra{0, 0, 1};
  Status s = submit(CopyBatch{{&extra, 1}, pa, pb, &good});
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("beside a tiled list"));

  TiledList bad = SmallList();
  bad.segments[0].shape = 5;
  s = submit(CopyBatch{{}, pa, pb, &bad});
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("malformed tiled list"));

  // Source and destination in one buffer, overlapping at one run: the run
  // is named by its index in the expansion.
  TiledList overlap = SmallList();
  overlap.outer = {{0, 40}};
  overlap.segments = {{0, 0, 0}, {200, 200, 0}, {400, 355, 0}};
  s = submit(CopyBatch{{}, pa, pa, &overlap});
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("fragment 4"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("overlap"));
  // In one buffer without an overlap: checked run by run, and copied.
  overlap.segments[2].dst = 300;
  EXPECT_TRUE(engine_->CopySync(CopyBatch{{}, pa, pa, &overlap}).ok());

  // Address 0, and offsets past 64 bits.
  s = submit(CopyBatch{{}, Addr(0), pb, &good});
  EXPECT_THAT(std::string(s.message()), HasSubstr("source address is 0"));
  TiledList huge = SmallList();
  huge.outer[1].dst = ~uint64_t{0} - 5;
  s = submit(CopyBatch{{}, pa, pb, &huge});
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("overflows 64 bits"));
  // Runs that each fit, repeated past 2^64 bytes in all (one outer offset).
  TiledList repeated;
  repeated.outer = {{0, 0}};
  repeated.shapes = {{0, 1, uint64_t{1} << 62}};
  repeated.runs = {{0, uint64_t{1} << 63, uint64_t{1} << 62}};
  repeated.segments.assign(5, TileSegment{0, 0, 0});
  s = submit(CopyBatch{{}, Addr(4096), Addr(0), &repeated});
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("total bytes"));
  EXPECT_FALSE(called);

  // An empty list completes OK.
  const TiledList empty;
  EXPECT_TRUE(engine_->CopySync(CopyBatch{{}, pa, pb, &empty}).ok());
}

}  // namespace
}  // namespace kvbounce
