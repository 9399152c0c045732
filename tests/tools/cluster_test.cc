// The in-process cluster with several ctx instances feeding one gen
// instance (tools/cluster.h): every gen rank reaches every instance by name,
// requests of two instances interleave on the same gen ranks at once, and
// verification tells the instances apart, so every byte is checked against
// the instance that served it.
#include "tools/cluster.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/status_matchers.h"

namespace kvbounce::tools {
namespace {

using ::testing::HasSubstr;
using testing_util::IsOk;
using testing_util::StatusIs;

// ctx TP4 -> gen TP2, gen pool layer-major with another block size: every
// gen rank hears from two writers of each instance.
ClusterOptions TwoInstances() {
  ClusterOptions o;
  const ModelShape model = *CustomModel(4, 4, 16, false);
  o.ctx = {model, DType::kBf16, 4, 1, {}, LayoutKind::kBlockMajorHnd, 8};
  o.gen = {model, DType::kBf16, 2, 1, {}, LayoutKind::kLayerMajorNhd, 16};
  o.ctx_instances = 2;
  o.slots = 4;
  o.max_tokens = 40;
  o.ctx_config.bounce_size_mb = 4;
  o.gen_config.bounce_size_mb = 4;
  return o;
}

TEST(ClusterTest, CtxInstancesAreNamedAndEveryGenRankReachesEach) {
  auto cluster = Cluster::Create(TwoInstances());
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  EXPECT_EQ(c.num_ctx_instances(), 2);
  EXPECT_EQ(c.ctx_instance_name(0), "ctx0");
  EXPECT_EQ(c.ctx_instance_name(1), "ctx1");
  // The accessors without an instance are instance 0's.
  EXPECT_EQ(&c.ctx(1), &c.ctx(0, 1));
  EXPECT_EQ(c.CtxAgent(1), c.CtxAgent(0, 1));
  EXPECT_NE(c.CtxAgent(0, 1), c.CtxAgent(1, 1));
  EXPECT_EQ(&c.harness(true, 2), &c.ctx_harness(0, 2));
  for (int g = 0; g < c.num_gen(); ++g) {
    for (const char* instance : {"ctx0", "ctx1"}) {
      EXPECT_THAT(c.gen(g).Paths(instance), IsOk()) << instance;
    }
    EXPECT_THAT(c.gen(g).Paths("ctx2"), StatusIs(StatusCode::kNotFound));
  }
  // Each instance draws its own tables, in pools of its own.
  EXPECT_NE(c.ctx_harness(0, 0).CtxTable(0), c.ctx_harness(1, 0).CtxTable(0));
  EXPECT_NE(c.ctx_harness(0, 0).PoolMemory().front().data(),
            c.ctx_harness(1, 0).PoolMemory().front().data());
}

TEST(ClusterTest, TheNumberOfCtxInstancesIsChecked) {
  for (int bad : {0, -1, kMaxCtxInstances + 1}) {
    ClusterOptions o = TwoInstances();
    o.ctx_instances = bad;
    EXPECT_THAT(Cluster::Create(o), StatusIs(StatusCode::kInvalidArgument)) << bad;
  }
  // Instance 1 would be called "ctx1": a first instance of that name clashes.
  ClusterOptions o = TwoInstances();
  o.ctx_instance = "ctx1";
  EXPECT_THAT(Cluster::Create(o), StatusIs(StatusCode::kInvalidArgument));
}

// Two threads, one per ctx instance, each running its instance's requests
// through the same gen ranks at once on every path; the requests of the two
// interleave. Every byte is verified against the instance that served it.
TEST(ClusterTest, TwoCtxInstancesServeInterleavedRequestsToOneGenInstance) {
  auto cluster = Cluster::Create(TwoInstances());
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  constexpr int kRounds = 6;
  const TokenRange range{3, 40};
  std::vector<std::vector<std::string>> errors(2);
  std::vector<uint64_t> verified(2, 0);
  auto serve = [&](int instance) {
    std::mt19937_64 rng(11 + static_cast<uint64_t>(instance));
    uint64_t n = 0;
    for (int round = 0; round < kRounds; ++round) {
      for (TransferPath path : {TransferPath::kPerBlock, TransferPath::kBounce,
                                TransferPath::kDirect, TransferPath::kAuto}) {
        // Instance i uses slots i and i + 2: its own, alternating.
        const int slot = instance + 2 * (round % 2);
        // Odd ids from ctx0, even ones from ctx1: a gen rank's ids are
        // unique across the instances.
        const uint64_t id = 2 * n++ + static_cast<uint64_t>(instance) + 1;
        c.ClearGen(slot);
        const BlockTables tables = c.Tables(instance, slot, range.end, rng);
        PullOptions pull;
        pull.path = path;
        std::vector<TransferInfo> infos;
        const Status s = c.RunRequest(id, tables, range, pull, &infos);
        if (!s.ok()) {
          errors[static_cast<size_t>(instance)].push_back(s.ToString());
          continue;
        }
        for (int g = 0; g < c.num_gen(); ++g) {
          const VerifyResult v = c.VerifyGen(g, tables, range);
          verified[static_cast<size_t>(instance)] += v.verified_bytes;
          if (v.mismatches != 0) {
            errors[static_cast<size_t>(instance)].push_back(v.first_mismatch);
          }
        }
      }
    }
  };
  { std::jthread a(serve, 0), b(serve, 1); }
  for (int i = 0; i < 2; ++i) {
    EXPECT_THAT(errors[static_cast<size_t>(i)], ::testing::IsEmpty()) << "ctx" << i;
    // 4 layers x 2 x 4 heads x 37 tokens x 32 B per request, over the gen
    // ranks, per path and round.
    EXPECT_EQ(verified[static_cast<size_t>(i)], uint64_t{kRounds} * 4 * (4 * 2 * 4 * 37 * 32));
  }
  // Every rank of both instances wrote for its own requests only.
  for (int i = 0; i < 2; ++i) {
    for (int r = 0; r < c.num_ctx(); ++r) {
      const AgentStats stats = c.ctx(i, r).Stats();
      EXPECT_EQ(stats.requests_failed, 0u);
      EXPECT_GT(stats.bytes_completed, 0u) << "ctx" << i << " rank " << r;
      EXPECT_EQ(stats.arena_outstanding_bytes, 0u);
    }
  }
  for (int g = 0; g < c.num_gen(); ++g) {
    EXPECT_EQ(c.gen(g).Stats().requests_completed, uint64_t{2} * kRounds * 4);
  }
}

// The instances hold different bytes: a request's KV checked against the
// instance that did not serve it mismatches, so a pull from the wrong
// instance cannot pass verification.
TEST(ClusterTest, VerificationTellsTheInstancesApart) {
  auto cluster = Cluster::Create(TwoInstances());
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(5);
  c.ClearGen(0);
  BlockTables tables = c.Tables(1, 0, 40, rng);
  ASSERT_THAT(c.RunRequest(1, tables, {0, 40}), IsOk());
  for (int g = 0; g < c.num_gen(); ++g) {
    EXPECT_EQ(c.VerifyGen(g, tables, {0, 40}).mismatches, 0u);
  }
  tables.ctx_instance = 0;
  const VerifyResult wrong = c.VerifyGen(0, tables, {0, 40});
  EXPECT_GT(wrong.mismatches, 0u);
  EXPECT_THAT(wrong.first_mismatch, HasSubstr("holds wrong bytes"));
  EXPECT_THAT(wrong.first_mismatch, HasSubstr("verified against ctx0's KV"));
}

}  // namespace
}  // namespace kvbounce::tools
