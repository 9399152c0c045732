// Planner behaviour on real model shapes and on bad input. The per-element
// correctness of the lists is the property test's job; here: the counts a
// serving engineer can check by hand (docs/architecture.md §4) and the error paths.
#include "layout/planner.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <numeric>
#include <random>
#include <vector>

namespace kvbounce {
namespace {

using ::testing::HasSubstr;

struct Instance {
  Topology topology;
  std::vector<PoolLayout> pools;
};

Instance Make(const char* preset, int tp, int pp, LayoutKind layout, int64_t blocks,
              int tokens_per_block = 32) {
  InstanceSpec spec;
  spec.model = *FindModelPreset(preset);
  spec.tp = tp;
  spec.pp = pp;
  spec.layout = layout;
  spec.tokens_per_block = tokens_per_block;
  Topology t = *Topology::Create(spec);
  std::vector<PoolLayout> pools;
  for (int r = 0; r < t.num_ranks(); ++r) {
    // Distinct, far-apart fake bases: the planner only computes addresses.
    pools.push_back(*PoolLayout::ForRank(t, r, blocks, Addr(static_cast<uint64_t>(r + 1) << 40)));
  }
  return {std::move(t), std::move(pools)};
}

std::vector<int32_t> Shuffled(int64_t n, uint64_t seed) {
  std::vector<int32_t> ids(static_cast<size_t>(n));
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), std::mt19937_64(seed));
  return ids;
}

TEST(PlannerTest, Llama70bTp8ToTp4MatchesTheDesignExample) {
  const Instance ctx = Make("llama-3.1-70b", 8, 1, LayoutKind::kBlockMajorHnd, 512);
  const Instance gen = Make("llama-3.1-70b", 4, 1, LayoutKind::kBlockMajorHnd, 512);
  const auto ctx_table = Shuffled(512, 1);
  const auto gen_table = Shuffled(512, 2);
  for (int g = 0; g < 4; ++g) {
    const std::vector<int> writers = Writers(ctx.topology, gen.topology, g);
    ASSERT_EQ(writers.size(), 2u);
    for (int c : writers) {
      auto plan = PlanPair({&ctx.topology, c, &ctx.pools[c], ctx_table},
                           {&gen.topology, g, &gen.pools[g], gen_table}, {0, 8192});
      ASSERT_TRUE(plan.ok()) << plan.status();
      EXPECT_EQ(plan->packed_bytes, 335544320u);
      ASSERT_EQ(plan->direct.size(), 40960u);
      for (const Fragment& f : plan->direct) ASSERT_EQ(f.bytes, 8192u);
      // The writer holds one head: a block's 80 layers x 2 kv are one run.
      EXPECT_LE(plan->gather.size(), 256u);
      EXPECT_EQ(plan->scatter.size(), 40960u);
    }
  }
}

TEST(PlannerTest, CountsWithoutTheWritersTableAssumeScatteredBlocks) {
  // What the receiver estimates for docs/architecture.md §4's example: the writer's table
  // is unknown to it.
  const Instance ctx = Make("llama-3.1-70b", 8, 1, LayoutKind::kBlockMajorHnd, 512);
  const Instance gen = Make("llama-3.1-70b", 4, 1, LayoutKind::kBlockMajorHnd, 512);
  auto runs = CountPlanRuns({&ctx.topology, 0, &ctx.pools[0], {}},
                            {&gen.topology, 0, &gen.pools[0], Shuffled(512, 2)}, {0, 8192});
  ASSERT_TRUE(runs.ok()) << runs.status();
  EXPECT_EQ(runs->packed_bytes, 335544320u);
  EXPECT_EQ(runs->direct, 40960u);
  EXPECT_EQ(runs->scatter, 40960u);
  EXPECT_EQ(runs->gather, 256u);  // one run per writer block
  // A known, sequential writer table merges the gather runs into one.
  std::vector<int32_t> sequential(256);
  std::iota(sequential.begin(), sequential.end(), 0);
  auto merged = CountPlanRuns({&ctx.topology, 0, &ctx.pools[0], sequential},
                              {&gen.topology, 0, &gen.pools[0], Shuffled(512, 2)}, {0, 8192});
  ASSERT_TRUE(merged.ok()) << merged.status();
  EXPECT_EQ(merged->gather, 1u);
  // Errors are PlanPair's.
  EXPECT_FALSE(CountPlanRuns({&ctx.topology, 0, &ctx.pools[0], {}},
                             {&gen.topology, 0, &gen.pools[0], {}}, {0, 8192})
                   .ok());
}

TEST(PlannerTest, TotalsCheckTheReceiversTableWithoutWalkingRuns) {
  const Instance ctx = Make("llama-3.1-70b", 8, 1, LayoutKind::kBlockMajorHnd, 512);
  const Instance gen = Make("llama-3.1-70b", 4, 1, LayoutKind::kBlockMajorHnd, 512);
  const auto table = Shuffled(512, 2);
  auto totals = PlanTotals({&ctx.topology, 0, &ctx.pools[0], {}},
                           {&gen.topology, 0, &gen.pools[0], table}, {0, 8192});
  ASSERT_TRUE(totals.ok()) << totals.status();
  EXPECT_EQ(totals->packed_bytes, 335544320u);
  auto plan = PlanPair({&ctx.topology, 0, &ctx.pools[0], {}},
                       {&gen.topology, 0, &gen.pools[0], table}, {0, 8192}, kPlanScatter);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(totals->fingerprint, plan->fingerprint);
  EXPECT_EQ(totals->scatter, 0u);
  // The receiver's table is checked as a scatter plan checks it.
  std::vector<int32_t> short_table(table.begin(), table.begin() + 100);
  EXPECT_EQ(PlanTotals({&ctx.topology, 0, &ctx.pools[0], {}},
                       {&gen.topology, 0, &gen.pools[0], short_table}, {0, 8192})
                .status()
                .code(),
            StatusCode::kOutOfRange);
  std::vector<int32_t> outside = table;
  outside[7] = 512;
  EXPECT_EQ(PlanTotals({&ctx.topology, 0, &ctx.pools[0], {}},
                       {&gen.topology, 0, &gen.pools[0], outside}, {0, 8192})
                .status()
                .code(),
            StatusCode::kOutOfRange);
}

TEST(PlannerTest, SameTpMovesWholeBlocksAndMergesConsecutiveOnes) {
  const Instance ctx = Make("llama-3.1-70b", 8, 1, LayoutKind::kBlockMajorHnd, 256);
  const Instance gen = Make("llama-3.1-70b", 8, 1, LayoutKind::kBlockMajorHnd, 256);
  const auto shuffled = Shuffled(256, 3);
  auto plan = PlanPair({&ctx.topology, 5, &ctx.pools[5], shuffled},
                       {&gen.topology, 5, &gen.pools[5], Shuffled(256, 4)}, {0, 8192});
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->direct.size(), 256u);
  for (const Fragment& f : plan->direct) EXPECT_EQ(f.bytes, 1310720u);  // 1.25 MiB

  std::vector<int32_t> sequential(256);
  std::iota(sequential.begin(), sequential.end(), 0);
  auto merged = PlanPair({&ctx.topology, 5, &ctx.pools[5], sequential},
                         {&gen.topology, 5, &gen.pools[5], sequential}, {0, 8192});
  ASSERT_TRUE(merged.ok());
  ASSERT_EQ(merged->direct.size(), 1u);
  EXPECT_EQ(merged->direct[0].bytes, 256u * 1310720u);
}

TEST(PlannerTest, NhdReceiverCutsEveryTokenIntoItsOwnFragment) {
  const Instance ctx = Make("llama-3.1-70b", 8, 1, LayoutKind::kBlockMajorHnd, 64);
  const Instance gen = Make("llama-3.1-70b", 4, 1, LayoutKind::kLayerMajorNhd, 64);
  const auto table = Shuffled(64, 5);
  auto plan = PlanPair({&ctx.topology, 0, &ctx.pools[0], table},
                       {&gen.topology, 0, &gen.pools[0], table}, {0, 2048});
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->direct.size(), 80u * 2 * 2048);
  EXPECT_EQ(plan->scatter.size(), 80u * 2 * 2048);
  for (const Fragment& f : plan->scatter) ASSERT_EQ(f.bytes, 256u);
}

TEST(PlannerTest, StartTokenInsideABlockMovesOnlyTheTail) {
  const Instance ctx = Make("llama-3.1-8b", 2, 1, LayoutKind::kBlockMajorHnd, 8);
  const Instance gen = Make("llama-3.1-8b", 1, 1, LayoutKind::kLayerMajorHnd, 16, 16);
  const auto ctx_table = Shuffled(8, 6);
  const auto gen_table = Shuffled(16, 7);
  auto plan = PlanPair({&ctx.topology, 1, &ctx.pools[1], ctx_table},
                       {&gen.topology, 0, &gen.pools[0], gen_table}, {100, 130});
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->packed_bytes, 32u * 2 * 4 * 30 * 256);
  EXPECT_EQ(plan->box.first_head, 4);
}

TEST(PlannerTest, NonWriterGetsAnEmptyPlan) {
  const Instance ctx = Make("llama-3.1-70b", 8, 1, LayoutKind::kBlockMajorHnd, 4);
  const Instance gen = Make("llama-3.1-70b", 4, 1, LayoutKind::kBlockMajorHnd, 4);
  const std::vector<int32_t> table = {0, 1, 2, 3};
  auto plan = PlanPair({&ctx.topology, 0, &ctx.pools[0], table},
                       {&gen.topology, 3, &gen.pools[3], table}, {0, 64});
  ASSERT_TRUE(plan.ok());
  EXPECT_TRUE(plan->box.empty());
  EXPECT_EQ(plan->packed_bytes, 0u);
  EXPECT_TRUE(plan->direct.empty());
}

TEST(PlannerTest, FingerprintChangesWithEveryInput) {
  const Instance ctx = Make("llama-3.1-8b", 2, 1, LayoutKind::kBlockMajorHnd, 8);
  const Instance gen = Make("llama-3.1-8b", 1, 1, LayoutKind::kBlockMajorHnd, 8);
  const Instance gen_nhd = Make("llama-3.1-8b", 1, 1, LayoutKind::kLayerMajorNhd, 8);
  const std::vector<int32_t> table = {0, 1, 2, 3, 4, 5, 6, 7};
  auto fp = [&](const Instance& g, int c, TokenRange r) {
    return PlanPair({&ctx.topology, c, &ctx.pools[c], table}, {&g.topology, 0, &g.pools[0], table},
                    r)
        ->fingerprint;
  };
  const uint64_t base = fp(gen, 0, {0, 64});
  EXPECT_EQ(base, fp(gen, 0, {0, 64}));
  EXPECT_NE(base, fp(gen, 1, {0, 64}));
  EXPECT_NE(base, fp(gen, 0, {1, 64}));
  EXPECT_NE(base, fp(gen, 0, {0, 63}));
  EXPECT_NE(base, fp(gen_nhd, 0, {0, 64}));
}

TEST(PlannerTest, BadInputIsAClearError) {
  const Instance ctx = Make("llama-3.1-8b", 2, 1, LayoutKind::kBlockMajorHnd, 8);
  const Instance gen = Make("llama-3.1-8b", 1, 1, LayoutKind::kBlockMajorHnd, 8);
  const std::vector<int32_t> table = {0, 1, 2, 3};
  const PlanSide writer{&ctx.topology, 0, &ctx.pools[0], table};
  const PlanSide receiver{&gen.topology, 0, &gen.pools[0], table};

  auto past_table = PlanPair(writer, receiver, {0, 129});
  EXPECT_EQ(past_table.status().code(), StatusCode::kOutOfRange);
  EXPECT_THAT(
      std::string(past_table.status().message()),
      HasSubstr("token range [0, 129) needs 5 blocks of 32 tokens but the block table has 4"));

  const std::vector<int32_t> bad_ids = {0, 1, 8, 3};
  auto bad_block = PlanPair(writer, {&gen.topology, 0, &gen.pools[0], bad_ids}, {0, 128});
  EXPECT_EQ(bad_block.status().code(), StatusCode::kOutOfRange);
  EXPECT_THAT(
      std::string(bad_block.status().message()),
      HasSubstr("receiver rank 0: block table entry 2 = 8 is outside the pool of 8 blocks"));
  // Only the blocks of the range matter, and only on the sides the lists touch.
  EXPECT_TRUE(PlanPair(writer, {&gen.topology, 0, &gen.pools[0], bad_ids}, {0, 64}).ok());
  EXPECT_TRUE(PlanPair(writer, {&gen.topology, 0, &gen.pools[0], {}}, {0, 128}, kPlanGather).ok());

  EXPECT_EQ(PlanPair(writer, receiver, {10, 10}).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(PlanPair(writer, receiver, {-1, 10}).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(PlanPair({&ctx.topology, 2, &ctx.pools[0], table}, receiver, {0, 10}).status().code(),
            StatusCode::kOutOfRange);
  EXPECT_EQ(PlanPair({&ctx.topology, 0, nullptr, table}, receiver, {0, 10}).status().code(),
            StatusCode::kInvalidArgument);

  // A pool that is not the rank's (gen's pool holds 8 heads, ctx rank 1 holds 4).
  auto wrong_pool = PlanPair({&ctx.topology, 1, &gen.pools[0], table}, receiver, {0, 10});
  EXPECT_EQ(wrong_pool.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(wrong_pool.status().message()), HasSubstr("does not match the rank"));

  InstanceSpec fp32 = gen.topology.spec();
  fp32.dtype = DType::kFp32;
  const Topology gen32 = *Topology::Create(fp32);
  const PoolLayout pool32 = *PoolLayout::ForRank(gen32, 0, 8, Addr(1 << 20));
  auto mismatch = PlanPair(writer, {&gen32, 0, &pool32, table}, {0, 10});
  EXPECT_EQ(mismatch.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(mismatch.status().message()), HasSubstr("element sizes differ"));
}

}  // namespace
}  // namespace kvbounce
