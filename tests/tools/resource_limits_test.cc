// The CLI's resource rules: saturating byte arithmetic, and a fragment bound
// that really bounds the planner's lists (else the memory check would let
// through a plan that does not fit).
#include "tools/resource_limits.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "layout/planner.h"
#include "layout/pool_layout.h"
#include "tools/scenario.h"

namespace kvbounce::tools {
namespace {

using ::testing::HasSubstr;

TEST(ResourceLimitsTest, ArithmeticSaturatesInsteadOfWrapping) {
  EXPECT_EQ(SatMul(uint64_t{1} << 40, uint64_t{1} << 30), UINT64_MAX);
  EXPECT_EQ(SatMul(6, 7), 42u);
  EXPECT_EQ(SatAdd(UINT64_MAX - 1, 2), UINT64_MAX);
  EXPECT_EQ(SatAdd(1, 2), 3u);
  EXPECT_EQ(CeilDiv(INT64_MAX, 2), INT64_MAX / 2 + 1);
  EXPECT_EQ(CeilDiv(64, 32), 2);
  EXPECT_EQ(HumanBytes(UINT64_MAX), "more than 16 EiB");
  EXPECT_EQ(HumanBytes(1536), "1.50 KiB");
  EXPECT_GT(PhysicalMemoryBytes(), 0u);
}

TEST(ResourceLimitsTest, MemoryErrorsNameTheTotalThePartsAndTheCap) {
  MemoryNeed need;
  need.Add("pools", uint64_t{3} << 30);
  need.Add("arenas", 0);
  need.Add("lists", UINT64_MAX);
  EXPECT_EQ(need.total(), UINT64_MAX);
  const Status s = CheckMemory(need, uint64_t{1} << 30, "memory cap", "use less");
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("needs about more than 16 EiB of memory (pools 3.00 GiB, lists more than "
                        "16 EiB), more than the 1.00 GiB memory cap: use less"));
  need.parts.pop_back();
  EXPECT_TRUE(CheckMemory(need, uint64_t{4} << 30, "memory cap", "").ok());
  EXPECT_TRUE(CheckMemory(need, 0, "unknown", "").ok());  // no cap known
}

// Every list of every pair of many small topologies stays within the bound.
TEST(ResourceLimitsTest, FragmentBoundBoundsEveryPlanList) {
  const char* layouts[] = {"block-major-hnd", "layer-major-hnd", "layer-major-nhd"};
  const char* sides[] = {"tp=1", "tp=2", "tp=4", "tp=2,pp=2", "tp=8"};
  int checked = 0;
  for (const char* ctx_layout : layouts) {
    for (const char* gen_layout : layouts) {
      for (const char* ctx_side : sides) {
        for (const char* gen_side : sides) {
          for (auto [ctx_tpb, gen_tpb] : {std::pair{16, 16}, std::pair{8, 32}, std::pair{5, 3}}) {
            ScenarioFlags f;
            f.layers = 4;
            f.kv_heads = 4;
            f.head_dim = 8;
            f.tokens = 77;
            f.start_token = 9;
            f.ctx = std::string(ctx_side) + ",layout=" + ctx_layout +
                    ",tokens-per-block=" + std::to_string(ctx_tpb);
            f.gen = std::string(gen_side) + ",layout=" + gen_layout +
                    ",tokens-per-block=" + std::to_string(gen_tpb);
            Result<Scenario> s = BuildScenario(f);
            ASSERT_TRUE(s.ok()) << s.status();
            int64_t ctx_blocks = 0, gen_blocks = 0;
            const std::vector<int32_t> ctx_table =
                RandomBlockTable(f.tokens, ctx_tpb, 3, &ctx_blocks);
            const std::vector<int32_t> gen_table =
                RandomBlockTable(f.tokens, gen_tpb, 4, &gen_blocks);
            for (int c = 0; c < s->ctx.num_ranks(); ++c) {
              for (int g = 0; g < s->gen.num_ranks(); ++g) {
                Result<PoolLayout> cp =
                    PoolLayout::ForRank(s->ctx, c, ctx_blocks, Addr(uint64_t{1} << 40));
                Result<PoolLayout> gp =
                    PoolLayout::ForRank(s->gen, g, gen_blocks, Addr(uint64_t{1} << 44));
                ASSERT_TRUE(cp.ok() && gp.ok());
                Result<PairPlan> plan = PlanPair({&s->ctx, c, &*cp, ctx_table},
                                                 {&s->gen, g, &*gp, gen_table}, s->tokens);
                ASSERT_TRUE(plan.ok()) << plan.status();
                const uint64_t bound =
                    FragmentBound(s->ctx, s->gen, WriterBox(s->ctx, c, s->gen, g), s->tokens);
                EXPECT_LE(plan->direct.size(), bound) << f.ctx << " -> " << f.gen;
                EXPECT_LE(plan->gather.size(), bound) << f.ctx << " -> " << f.gen;
                EXPECT_LE(plan->scatter.size(), bound) << f.ctx << " -> " << f.gen;
                ++checked;
              }
            }
          }
        }
      }
    }
  }
  EXPECT_GT(checked, 1000);
}

TEST(ResourceLimitsTest, PlanMemoryOfTheLlama70bExampleIsModest) {
  ScenarioFlags f;
  f.model = "llama-3.1-70b";
  f.tokens = 8192;
  Result<Scenario> s = BuildScenario(f);
  ASSERT_TRUE(s.ok()) << s.status();
  const MemoryNeed need = PlanMemory(s->ctx, s->gen, s->tokens);
  // 40960 direct fragments per pair: the bound is within a small factor.
  EXPECT_LT(need.total(), uint64_t{64} << 20);
  EXPECT_GT(need.total(), uint64_t{40960} * 24);
}

}  // namespace
}  // namespace kvbounce::tools
