// Hybrid models (docs/hybrid.md) end to end: a request's recurrent state
// moves with its KV on every path, verified element by element by the
// bench's harness; a rank that writes only state is a writer like the
// others; the state options are checked; and a cancel in the middle of a
// hybrid request leaves neither KV nor state written after it settled.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <random>
#include <string>
#include <vector>

#include "common/status_matchers.h"
#include "session/holding_copy_engine.h"
#include "tools/cluster.h"

namespace kvbounce {
namespace {

using std::chrono::milliseconds;
using ::testing::HasSubstr;
using testing_util::HoldingCopyEngine;
using testing_util::IsOk;
using testing_util::StatusIs;
using tools::BlockTables;
using tools::Cluster;
using tools::ClusterOptions;

constexpr milliseconds kLong(5000);

// Attention at layers 1 and 4, recurrent at 0, 2, 5, 6, an MLP at 3; one
// kv head (duplicated under TP), a conv state of two segments (one of
// them a single group, duplicated under TP) and an fp32 ssm state.
ModelShape SmallHybrid() {
  ModelShape m = *CustomModel(2, 1, 16, false);
  m.name = "small-hybrid";
  m.layer_pattern = "M*M-*MM";
  m.state = {{"conv", DType::kBf16, {{4, 3}, {1, 6}}}, {"ssm", DType::kFp32, {{4, 8}}}};
  return m;
}

ClusterOptions Options(int ctx_tp, int ctx_pp, int gen_tp, StateLayoutKind state_layout) {
  ClusterOptions o;
  const ModelShape model = SmallHybrid();
  o.ctx = {model, DType::kBf16, ctx_tp, ctx_pp, {}, LayoutKind::kBlockMajorHnd, 16, state_layout};
  o.gen = {model, DType::kBf16, gen_tp, 1, {}, LayoutKind::kLayerMajorNhd, 8, state_layout};
  o.max_tokens = 64;
  o.slots = 2;
  o.ctx_config.bounce_size_mb = 1;
  o.gen_config.bounce_size_mb = 1;
  return o;
}

// Every byte of gen rank 0's KV and state pools.
std::vector<std::byte> GenPools(Cluster& c) {
  std::vector<std::byte> out;
  for (std::span<std::byte> s : c.PoolMemory(false, 0)) out.insert(out.end(), s.begin(), s.end());
  return out;
}

PullOptions Path(TransferPath path, int64_t state_slot) {
  PullOptions p;
  p.path = path;
  p.state_slot = state_slot;
  return p;
}

struct Shape {
  int ctx_tp, ctx_pp, gen_tp;
  StateLayoutKind layout;
  bool per_layer;
};

class HybridPathsTest : public ::testing::TestWithParam<Shape> {};

TEST_P(HybridPathsTest, EveryPathMovesKvAndStateVerified) {
  const Shape shape = GetParam();
  ClusterOptions o = Options(shape.ctx_tp, shape.ctx_pp, shape.gen_tp, shape.layout);
  o.per_layer_pools = shape.per_layer;
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk()) << cluster.status();
  Cluster& c = **cluster;
  std::mt19937_64 rng(7);
  uint64_t id = 1;
  for (TransferPath path : {TransferPath::kPerBlock, TransferPath::kBounce, TransferPath::kDirect,
                            TransferPath::kAuto}) {
    SCOPED_TRACE(std::string(TransferPathName(path)));
    for (TokenRange range : {TokenRange{0, 64}, TokenRange{19, 64}}) {
      const BlockTables tables = c.Tables(static_cast<int>(id % 2), range.end, rng);
      for (int g = 0; g < c.num_gen(); ++g) c.harness(false, g).ClearSlot(tables.slot);
      std::vector<TransferInfo> infos;
      PullOptions pull;
      pull.path = path;
      ASSERT_THAT(c.RunRequest(id++, tables, range, pull, &infos), IsOk());
      for (const TransferInfo& info : infos) {
        EXPECT_GT(info.state_bytes, 0u);
        EXPECT_LT(info.state_bytes, info.bytes);
      }
      for (int g = 0; g < c.num_gen(); ++g) {
        const tools::VerifyResult v = c.VerifyGen(g, tables, range);
        EXPECT_EQ(v.mismatches, 0u) << v.first_mismatch;
        EXPECT_GT(v.verified_bytes, 0u);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, HybridPathsTest,
                         ::testing::Values(
                             // Fan-in: each ctx rank holds a copy of the kv head; one writes KV,
                             // the other only state.
                             Shape{2, 1, 1, StateLayoutKind::kSlotMajor, false},
                             // Fan-out under a pipeline split, layer-major state with a base per
                             // layer.
                             Shape{1, 2, 4, StateLayoutKind::kLayerMajor, true},
                             Shape{4, 1, 2, StateLayoutKind::kLayerMajor, false}));

TEST(HybridOptionsTest, StateSlotsAreCheckedAndTheStateIsTheLastToken) {
  auto cluster = Cluster::Create(Options(1, 1, 1, StateLayoutKind::kSlotMajor));
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(8);
  const BlockTables tables = c.Tables(0, 64, rng);
  PublishOptions bad;
  bad.state_slot = 2;  // two slots
  EXPECT_THAT(c.ctx(0).Publish(1, tables.ctx, 64, bad).status(),
              StatusIs(StatusCode::kOutOfRange, HasSubstr("state_slot = 2")));
  bad.state_slot = -2;
  EXPECT_THAT(c.ctx(0).Publish(1, tables.ctx, 64, bad).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("state_slot = -2")));
  EXPECT_THAT(
      c.gen(0).Pull(1, "ctx0", tables.gen, {0, 64}, Path(TransferPath::kDirect, 5)).status(),
      StatusIs(StatusCode::kOutOfRange, HasSubstr("state pool of 2 slots")));

  // Published without a state slot: a pull asking for state fails, naming
  // the option; one without state moves the KV.
  auto pub = c.ctx(0).Publish(2, tables.ctx, 64);
  ASSERT_THAT(pub, IsOk());
  auto with_state = c.gen(0).Pull(2, "ctx0", tables.gen, {0, 64}, Path(TransferPath::kDirect, 0));
  ASSERT_THAT(with_state, IsOk());
  EXPECT_THAT((*with_state)->Wait(),
              StatusIs(StatusCode::kFailedPrecondition, HasSubstr("PublishOptions.state_slot")));
  (*pub)->Cancel();
  (*pub)->Wait().IgnoreError();

  // The state is the one after the publication's last token: a range with
  // state must end there.
  PublishOptions publish;
  publish.state_slot = 0;
  auto pub3 = c.ctx(0).Publish(3, tables.ctx, 64, publish);
  ASSERT_THAT(pub3, IsOk());
  auto early = c.gen(0).Pull(3, "ctx0", tables.gen, {0, 32}, Path(TransferPath::kBounce, 0));
  ASSERT_THAT(early, IsOk());
  EXPECT_THAT((*early)->Wait(), StatusIs(StatusCode::kOutOfRange, HasSubstr("must end there")));
  (*pub3)->Cancel();
  (*pub3)->Wait().IgnoreError();

  // A model without state takes no state slot.
  ClusterOptions plain;
  const ModelShape model = *CustomModel(2, 2, 16, false);
  plain.ctx = {model, DType::kBf16, 1, 1, {}, LayoutKind::kBlockMajorHnd, 16};
  plain.gen = plain.ctx;
  auto pc = Cluster::Create(plain);
  ASSERT_THAT(pc, IsOk());
  const BlockTables t2 = (*pc)->Tables(0, 64, rng);
  EXPECT_THAT(
      (*pc)->gen(0).Pull(4, "ctx0", t2.gen, {0, 64}, Path(TransferPath::kDirect, 0)).status(),
      StatusIs(StatusCode::kInvalidArgument, HasSubstr("not hybrid")));
}

TEST(HybridOptionsTest, AgentsRefuseStatePoolsTheRankCannotHave) {
  auto cluster = Cluster::Create(Options(1, 1, 1, StateLayoutKind::kSlotMajor));
  ASSERT_THAT(cluster, IsOk());
  auto options = [&] {
    AgentOptions a =
        (*cluster)->ctx_harness(0, 0).MakeAgentOptions("x", Config(), milliseconds(10));
    a.transport_spec.kind = "loopback";
    a.transport_spec.fabric = NewLoopbackFabric();
    return a;
  };
  AgentOptions a = options();
  a.pool.state.num_slots = 0;
  EXPECT_THAT(Agent::Create(std::move(a)).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("num_slots")));
  AgentOptions b = options();
  b.pool.state.bases.clear();
  b.pool.state.num_slots = 3;
  EXPECT_THAT(Agent::Create(std::move(b)).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("without a base")));
}

// A cancel while the direct copy of a hybrid request (KV and state in one
// batch) is held: the pull settles only once the copy ended, and from
// then on neither the KV pool nor the state pool changes.
TEST(HybridSettleTest, DirectCancelWaitsForTheCopyAndThenNothingChanges) {
  HoldingCopyEngine::Gate copies;
  ClusterOptions o = Options(1, 1, 1, StateLayoutKind::kSlotMajor);
  o.ctx_hooks = copies.Hooks();
  o.grace = milliseconds(10);
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(9);
  const BlockTables tables = c.Tables(0, 64, rng);
  copies.Hold();
  PublishOptions publish;
  publish.state_slot = 0;
  auto pub = c.ctx(0).Publish(9, tables.ctx, 64, publish);
  ASSERT_THAT(pub, IsOk());
  auto pull = c.gen(0).Pull(9, "ctx0", tables.gen, {0, 64}, Path(TransferPath::kDirect, 0));
  ASSERT_THAT(pull, IsOk());
  ASSERT_TRUE(copies.WaitForParked(1, kLong));
  (*pull)->Cancel();
  EXPECT_FALSE((*pull)->WaitFor(milliseconds(50)))
      << "the pull settled while a copy into its KV and state was pending";
  copies.Release();
  EXPECT_THAT((*pull)->Wait(), StatusIs(StatusCode::kCancelled));
  const std::vector<std::byte> after = GenPools(c);
  c.ctx(0).Shutdown();
  EXPECT_TRUE(GenPools(c) == after) << "the gen KV or state pool changed after the pull settled";
  (*pub)->Wait().IgnoreError();
}

// A bounce pull of a hybrid request cancelled while its writer's gather
// is held: it settles at once (the gather writes the staging slot, never
// the pools), and neither pool ever changes.
TEST(HybridSettleTest, BounceCancelLeavesKvAndStateUntouched) {
  HoldingCopyEngine::Gate copies;
  ClusterOptions o = Options(2, 1, 1, StateLayoutKind::kLayerMajor);
  o.ctx_hooks = copies.Hooks();
  o.grace = milliseconds(10);
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(10);
  const BlockTables tables = c.Tables(1, 64, rng);
  c.harness(false, 0).ClearSlot(1);
  const std::vector<std::byte> before = GenPools(c);
  copies.Hold();
  std::vector<std::shared_ptr<Transfer>> pubs;
  for (int r = 0; r < 2; ++r) {
    PublishOptions publish;
    publish.state_slot = 1;
    auto pub = c.ctx(r).Publish(10, tables.ctx, 64, publish);
    ASSERT_THAT(pub, IsOk());
    pubs.push_back(*pub);
  }
  auto pull = c.gen(0).Pull(10, "ctx0", tables.gen, {0, 64}, Path(TransferPath::kBounce, 1));
  ASSERT_THAT(pull, IsOk());
  ASSERT_TRUE(copies.WaitForParked(1, kLong));
  (*pull)->Cancel();
  EXPECT_THAT((*pull)->Wait(), StatusIs(StatusCode::kCancelled));
  copies.Release();
  for (auto& p : pubs) {
    p->Cancel();
    p->Wait().IgnoreError();
  }
  EXPECT_TRUE(GenPools(c) == before) << "a cancelled hybrid bounce wrote the KV or state pool";
}

}  // namespace
}  // namespace kvbounce
