// Every path over every shape of transfer, verified semantically: each gen
// element is compared with the function the ctx side filled it from, and
// every byte outside the request must be untouched (tools/cluster.h).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "common/status_matchers.h"
#include "tools/cluster.h"

namespace kvbounce {
namespace {

using testing_util::IsOk;
using tools::BlockTables;
using tools::Cluster;
using tools::ClusterOptions;

struct Shape {
  std::string name;
  ModelShape model;
  int ctx_tp, ctx_pp;
  std::vector<int> ctx_stages;
  LayoutKind ctx_layout;
  int ctx_tpb;
  int gen_tp, gen_pp;
  std::vector<int> gen_stages;
  LayoutKind gen_layout;
  int gen_tpb;
  int64_t start, end;
  bool per_layer = false;
};

ModelShape Model(int layers, int heads, int dim, bool mla = false) {
  return *CustomModel(layers, heads, dim, mla);
}

std::vector<Shape> Shapes() {
  const auto bm = LayoutKind::kBlockMajorHnd;
  const auto lh = LayoutKind::kLayerMajorHnd;
  const auto ln = LayoutKind::kLayerMajorNhd;
  return {
      {"FanIn", Model(4, 4, 16), 4, 1, {}, bm, 8, 2, 1, {}, bm, 8, 0, 40},
      {"FanOut", Model(4, 4, 16), 1, 1, {}, bm, 8, 4, 1, {}, bm, 8, 0, 40},
      {"Mla", Model(3, 1, 24, true), 2, 1, {}, bm, 8, 4, 1, {}, ln, 4, 0, 37},
      {"DuplicatedHeads", Model(4, 2, 8), 4, 1, {}, lh, 8, 1, 1, {}, bm, 16, 0, 50},
      {"UnevenPp", Model(7, 4, 8), 2, 2, {5, 2}, bm, 8, 2, 3, {1, 4, 2}, lh, 8, 0, 33},
      {"LayoutsAndBlockSizes", Model(4, 8, 8), 8, 1, {}, ln, 4, 2, 1, {}, lh, 16, 0, 45},
      {"StartInsideABlock", Model(4, 4, 8), 2, 1, {}, bm, 8, 4, 1, {}, ln, 16, 21, 60},
      {"PerLayerPools", Model(3, 4, 8), 2, 1, {}, ln, 8, 1, 1, {}, lh, 8, 5, 29, true},
  };
}

struct Case {
  Shape shape;
  TransferPath path;
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.shape.name << " over " << TransferPathName(c.path);
}

std::string CaseName(const ::testing::TestParamInfo<Case>& info) {
  std::string path(TransferPathName(info.param.path));
  path.erase(std::remove(path.begin(), path.end(), '-'), path.end());
  return info.param.shape.name + "_" + path;
}

std::vector<Case> Cases() {
  std::vector<Case> cases;
  for (const Shape& s : Shapes()) {
    for (TransferPath p : {TransferPath::kPerBlock, TransferPath::kBounce, TransferPath::kDirect,
                           TransferPath::kAuto}) {
      cases.push_back({s, p});
    }
  }
  return cases;
}

class EndToEndTest : public ::testing::TestWithParam<Case> {};

TEST_P(EndToEndTest, EveryGenElementArrivesAndNothingElseChanges) {
  const Shape& s = GetParam().shape;
  ClusterOptions options;
  options.ctx = {s.model, DType::kBf16, s.ctx_tp, s.ctx_pp, s.ctx_stages, s.ctx_layout, s.ctx_tpb};
  options.gen = {s.model, DType::kBf16, s.gen_tp, s.gen_pp, s.gen_stages, s.gen_layout, s.gen_tpb};
  options.slots = 2;
  options.max_tokens = s.end;
  options.per_layer_pools = s.per_layer;
  options.ctx_config.bounce_size_mb = 4;
  options.gen_config.bounce_size_mb = 4;
  auto cluster = Cluster::Create(options);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;

  std::mt19937_64 rng(7);
  for (uint64_t id = 1; id <= 3; ++id) {  // reuses a slot: stale bytes would show
    const int slot = static_cast<int>(id % 2);
    c.ClearGen(slot);
    const BlockTables tables = c.Tables(slot, s.end, rng);
    PullOptions pull;
    pull.path = GetParam().path;
    std::vector<TransferInfo> infos;
    ASSERT_THAT(c.RunRequest(id, tables, {s.start, s.end}, pull, &infos), IsOk());
    ASSERT_EQ(infos.size(), static_cast<size_t>(c.num_gen()));
    for (const TransferInfo& info : infos) {
      // Loopback maps peer memory, so auto takes the direct path.
      EXPECT_EQ(info.path_taken,
                GetParam().path == TransferPath::kAuto ? TransferPath::kDirect : GetParam().path);
      EXPECT_EQ(info.fallback_reason, "");
      EXPECT_GT(info.bytes, 0u);
    }
    for (int g = 0; g < c.num_gen(); ++g) {
      const tools::VerifyResult v = c.VerifyGen(g, tables, {s.start, s.end});
      EXPECT_EQ(v.mismatches, 0u) << v.first_mismatch;
      EXPECT_GT(v.verified_bytes, 0u);
    }
  }
  for (int g = 0; g < c.num_gen(); ++g) {
    const AgentStats stats = c.gen(g).Stats();
    EXPECT_EQ(stats.requests_completed, 3u);
    EXPECT_EQ(stats.arena_outstanding_bytes, 0u);
  }
  for (int r = 0; r < c.num_ctx(); ++r) EXPECT_EQ(c.ctx(r).Stats().arena_outstanding_bytes, 0u);
}

INSTANTIATE_TEST_SUITE_P(AllPaths, EndToEndTest, ::testing::ValuesIn(Cases()), CaseName);

}  // namespace
}  // namespace kvbounce
