// `kvbounce plan` as a user runs it: flags in, table or JSON out, clear errors.
#include "tools/plan_command.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <set>
#include <sstream>

namespace kvbounce::tools {
namespace {

using ::testing::HasSubstr;

nlohmann::json PlanJson(const PlanFlags& flags) {
  std::ostringstream out;
  PlanFlags f = flags;
  f.json = true;
  Status s = RunPlan(f, out);
  EXPECT_TRUE(s.ok()) << s;
  return s.ok() ? nlohmann::json::parse(out.str()) : nlohmann::json();
}

std::string PlanError(const PlanFlags& flags) {
  std::ostringstream out;
  Status s = RunPlan(flags, out);
  EXPECT_FALSE(s.ok());
  return std::string(s.message());
}

TEST(PlanCommandTest, ReproducesTheLlama70bExample) {
  PlanFlags flags;
  flags.scenario.model = "llama-3.1-70b";
  flags.scenario.tokens = 8192;
  flags.scenario.ctx = "tp=8,pp=1";
  flags.scenario.gen = "tp=4,pp=1";
  const nlohmann::json j = PlanJson(flags);
  ASSERT_EQ(j["pairs"].size(), 8u);
  for (const auto& p : j["pairs"]) {
    EXPECT_EQ(p["bytes"], 335544320u);
    EXPECT_EQ(p["direct_fragments"], 40960u);
    EXPECT_EQ(p["scatter_runs"], 40960u);
    EXPECT_LE(p["gather_runs"].get<uint64_t>(), 256u);
  }
  ASSERT_EQ(j["gen_ranks"].size(), 4u);
  for (const auto& g : j["gen_ranks"]) {
    const int rank = g["gen_rank"];
    EXPECT_EQ(g["writers"], nlohmann::json::array({2 * rank, 2 * rank + 1}));
    EXPECT_EQ(g["bytes"], 2u * 335544320u);
  }
  EXPECT_EQ(j["totals"]["bytes"], 8u * 335544320u);
  EXPECT_EQ(j["totals"]["direct_fragments"], 8u * 40960u);
  EXPECT_EQ(j["totals"]["pairs"], 8u);
}

TEST(PlanCommandTest, BlockTablesDependOnTheSeedButTheCountsDoNot) {
  PlanFlags a;
  a.scenario.tokens = 4096;
  PlanFlags b = a;
  b.scenario.seed = 99;
  const nlohmann::json ja = PlanJson(a), jb = PlanJson(b);
  EXPECT_EQ(ja["totals"], jb["totals"]);
  EXPECT_EQ(PlanJson(a), ja);  // same seed, same plan
}

TEST(PlanCommandTest, MlaAndDuplicatedHeadsHaveOneWriterPerGenRank) {
  PlanFlags flags;
  flags.scenario.model = "deepseek-v3";
  flags.scenario.tokens = 1000;
  flags.scenario.start_token = 17;
  flags.scenario.ctx = "tp=8,pp=2,layers-per-stage=40/21";
  flags.scenario.gen = "tp=2,pp=1,layout=layer-major-nhd,tokens-per-block=64";
  const nlohmann::json j = PlanJson(flags);
  ASSERT_EQ(j["gen_ranks"].size(), 2u);
  // Each gen rank takes the latent cache from one TP copy in each PP stage.
  EXPECT_EQ(j["gen_ranks"][0]["writers"], nlohmann::json::array({0, 8}));
  EXPECT_EQ(j["gen_ranks"][1]["writers"], nlohmann::json::array({1, 9}));
  EXPECT_EQ(j["gen_ranks"][0]["bytes"], 61u * 983u * 576u * 2u);
}

TEST(PlanCommandTest, CustomModelAndTable) {
  PlanFlags flags;
  flags.scenario.layers = 4;
  flags.scenario.kv_heads = 2;
  flags.scenario.head_dim = 64;
  flags.scenario.dtype = "fp8";
  flags.scenario.tokens = 100;
  flags.scenario.ctx = "tp=1,pp=2";
  flags.scenario.gen = "tp=2,pp=1";
  std::ostringstream out;
  ASSERT_TRUE(RunPlan(flags, out).ok());
  EXPECT_THAT(out.str(), HasSubstr("custom fp8, tokens [0, 100), ctx tp1 pp2 (2/2 layers)"));
  EXPECT_THAT(out.str(), HasSubstr("gen rank 1: writers {0,1}"));
  EXPECT_THAT(out.str(), HasSubstr("total: 4 pairs"));
}

TEST(PlanCommandTest, BadFlagsNameWhatIsWrong) {
  PlanFlags flags;
  flags.scenario.model = "llama-3.1-70b";
  flags.scenario.layers = 3;
  EXPECT_THAT(PlanError(flags), HasSubstr("--model cannot be combined"));
  flags = PlanFlags();
  flags.scenario.layers = 3;
  EXPECT_THAT(PlanError(flags),
              HasSubstr("needs all of --layers (or --layer-pattern), --kv-heads and --head-dim"));
  flags = PlanFlags();
  flags.scenario.model = "gpt-5";
  EXPECT_THAT(PlanError(flags), HasSubstr("model preset 'gpt-5' is not known"));
  flags = PlanFlags();
  flags.scenario.dtype = "int8";
  EXPECT_THAT(PlanError(flags), HasSubstr("--dtype: dtype 'int8'"));
  flags = PlanFlags();
  flags.scenario.start_token = 8192;
  EXPECT_THAT(PlanError(flags), HasSubstr("--start-token = 8192 is invalid"));
  flags = PlanFlags();
  flags.scenario.ctx = "tp=3";
  EXPECT_THAT(PlanError(flags), HasSubstr("--ctx: kv heads = 8 cannot be split over tp = 3"));
  flags = PlanFlags();
  flags.scenario.gen = "tp=4,pp=2,layers-per-stage=40/41";
  EXPECT_THAT(PlanError(flags), HasSubstr("--gen: layers_per_stage = 40/41 covers 81 layers"));
  flags = PlanFlags();
  flags.scenario.tokens = 0;
  EXPECT_THAT(PlanError(flags), HasSubstr("--tokens = 0 is invalid"));
}

// Hybrid models' flags (docs/hybrid.md): a bad pattern, tensor or state
// layout names what is wrong; a pipeline stage without attention is refused.
TEST(PlanCommandTest, BadHybridFlagsNameWhatIsWrong) {
  PlanFlags flags;
  flags.scenario.layer_pattern = "M*Mx";
  flags.scenario.kv_heads = 2;
  flags.scenario.head_dim = 16;
  flags.scenario.state_tensors = {"conv=bf16:4x3"};
  EXPECT_THAT(PlanError(flags), HasSubstr("layer 3 is 'x'"));
  flags.scenario.layer_pattern = "M*M";
  flags.scenario.state_tensors = {"conv=bf16:4y3"};
  EXPECT_THAT(PlanError(flags), HasSubstr("--state-tensor 'conv=bf16:4y3': segment '4y3'"));
  flags.scenario.state_tensors = {"conv=int4:4x3"};
  EXPECT_THAT(PlanError(flags), HasSubstr("dtype 'int4'"));
  flags.scenario.state_tensors = {"conv"};
  EXPECT_THAT(PlanError(flags), HasSubstr("use NAME=DTYPE:UNITSxELEMS"));
  flags.scenario.state_tensors = {};
  EXPECT_THAT(PlanError(flags), HasSubstr("no state tensor is described"));
  flags.scenario.state_tensors = {"conv=bf16:3x4"};
  flags.scenario.ctx = "tp=2";
  EXPECT_THAT(PlanError(flags), HasSubstr("'conv' segment 0 has 3 units: cannot be split"));
  flags.scenario.ctx = "tp=1,pp=2,layers-per-stage=1/2";  // stage 0 is "M"
  EXPECT_THAT(PlanError(flags), HasSubstr("holds no attention layer"));
  flags = PlanFlags();
  flags.scenario.model = "jamba-v0.1";
  flags.scenario.state_layout = "row-major";
  EXPECT_THAT(PlanError(flags), HasSubstr("--state-layout: state layout 'row-major'"));
  flags = PlanFlags();
  flags.scenario.model = "jamba-v0.1";
  flags.scenario.layer_pattern = "M*";
  EXPECT_THAT(PlanError(flags), HasSubstr("--model cannot be combined"));
}

TEST(PlanCommandTest, LimitsAreCheckedBeforePlanning) {
  PlanFlags flags;
  flags.scenario.ctx = "tp=1024,pp=2";
  EXPECT_THAT(PlanError(flags), HasSubstr("an instance has at most 1024 ranks (tp x pp <= 1024)"));
  flags = PlanFlags();
  flags.scenario.gen = "tp=2147483647";
  EXPECT_THAT(PlanError(flags), HasSubstr("--gen tp=2147483647,pp=1 is invalid"));
  flags = PlanFlags();
  flags.scenario.tokens = INT64_MAX;
  EXPECT_THAT(PlanError(flags), HasSubstr("block ids are 32-bit"));
  flags = PlanFlags();
  flags.scenario.tokens = int64_t{1} << 35;  // 2^30 blocks of 32: the most there is
  flags.scenario.memory_cap_bytes = uint64_t{1} << 30;
  EXPECT_THAT(PlanError(flags), HasSubstr("more than the 1.00 GiB memory cap"));
  // The cap counts: the llama-70b example fits in 64 MiB.
  flags = PlanFlags();
  flags.scenario.memory_cap_bytes = uint64_t{64} << 20;
  std::ostringstream out;
  EXPECT_TRUE(RunPlan(flags, out).ok());
}

TEST(SideSpecTest, ParsesEveryKeyAndRejectsBadText) {
  auto s = ParseSideSpec("ctx",
                         "tp=8,pp=3,layout=layer-major-nhd,tokens-per-block=16,"
                         "layers-per-stage=30/30/20");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->tp, 8);
  EXPECT_EQ(s->pp, 3);
  EXPECT_EQ(s->layout, LayoutKind::kLayerMajorNhd);
  EXPECT_EQ(s->tokens_per_block, 16);
  EXPECT_EQ(s->layers_per_stage, (std::vector<int>{30, 30, 20}));

  auto error = [](std::string_view text) {
    return std::string(ParseSideSpec("gen", text).status().message());
  };
  EXPECT_THAT(error("tp=0"), HasSubstr("--gen tp = 0 is invalid: must be >= 1"));
  EXPECT_THAT(error("tp=two"), HasSubstr("--gen tp = 'two' is invalid: must be an integer"));
  EXPECT_THAT(error("tp=2,tp=4"), HasSubstr("key 'tp' is given twice"));
  EXPECT_THAT(error("dp=2"), HasSubstr("unknown key 'dp'"));
  EXPECT_THAT(error("tp"), HasSubstr("'tp' is not key=value"));
  EXPECT_THAT(error("tp=2,"), HasSubstr("empty item"));
  EXPECT_THAT(error("layout=paged"), HasSubstr("layout 'paged' is not known"));
  EXPECT_THAT(error("layers-per-stage=4//4"), HasSubstr("must be an integer"));
}

}  // namespace
}  // namespace kvbounce::tools
