// The `direct` path read by the receiver (docs/sessions.md "Direct read"):
// where the writer cannot map the receiver's pool but the receiver's
// transport can read the writer's, the writer lends its blocks (KV_READY),
// the receiver copies them into its own pool (Transport::Read) and says
// KV_READ_DONE, and the writer's KV_RESULT says whether the loan held.
//
// The agents run over loopback transports made without mapped access
// (LoopbackOptions::map_remote = false), the shape of the UCX transport
// between processes of one host. A read in flight is kept in flight by the
// fault decorator's completion delay on the gen side: the bytes land at once,
// the completion — and so the end of the read, as the session sees it —
// comes `delay` later.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <random>
#include <thread>
#include <vector>

#include "common/status_matchers.h"
#include "tools/cluster.h"

namespace kvbounce {
namespace {

using ::testing::HasSubstr;
using testing_util::IsOk;
using testing_util::StatusIs;
using tools::BlockTables;
using tools::Cluster;
using tools::ClusterOptions;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr milliseconds kLong(5000);

template <typename Pred>
bool WaitUntil(Pred pred, milliseconds limit = kLong) {
  const auto deadline = Clock::now() + limit;
  while (!pred()) {
    if (Clock::now() > deadline) return false;
    std::this_thread::sleep_for(milliseconds(1));
  }
  return true;
}

PullOptions Path(TransferPath path) {
  PullOptions p;
  p.path = path;
  return p;
}

struct Shape {
  const char* name;
  int ctx_tp;
  int gen_tp;
  LayoutKind gen_layout;
};

ClusterOptions Unmapped(const Shape& shape) {
  ClusterOptions o;
  const ModelShape model = *CustomModel(2, 4, 64, false);
  o.ctx = {model, DType::kBf16, shape.ctx_tp, 1, {}, LayoutKind::kBlockMajorHnd, 16};
  o.gen = {model, DType::kBf16, shape.gen_tp, 1, {}, shape.gen_layout, 16};
  o.max_tokens = 64;
  o.slots = 1;
  o.faults = true;
  o.ctx_config.bounce_size_mb = 1;
  o.gen_config.bounce_size_mb = 1;
  o.grace = milliseconds(50);
  o.loopback.map_remote = false;  // the writer cannot map: the receiver reads
  return o;
}

std::vector<std::byte> GenPool(Cluster& c) {
  std::vector<std::byte> out;
  for (std::span<std::byte> s : c.PoolMemory(false, 0)) out.insert(out.end(), s.begin(), s.end());
  return out;
}

// Moves one request forced onto direct and one by auto (from seed
// `seed`'s tables), checking that both took direct and every byte landed.
void PullOnDirectAndAuto(Cluster& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  uint64_t id = 1;
  for (TransferPath path : {TransferPath::kDirect, TransferPath::kAuto}) {
    SCOPED_TRACE(std::string(TransferPathName(path)));
    const BlockTables tables = c.Tables(0, 64, rng);
    c.ClearGen(0);
    std::vector<std::shared_ptr<Transfer>> pubs;
    for (int r = 0; r < c.num_ctx(); ++r) {
      auto pub = c.ctx(r).Publish(id, tables.ctx, 64);
      ASSERT_THAT(pub, IsOk());
      pubs.push_back(*pub);
    }
    std::vector<std::shared_ptr<Transfer>> pulls;
    for (int g = 0; g < c.num_gen(); ++g) {
      auto pull = c.gen(g).Pull(id, "ctx0", tables.gen, {0, 64}, Path(path));
      ASSERT_THAT(pull, IsOk());
      pulls.push_back(*pull);
    }
    for (int g = 0; g < c.num_gen(); ++g) {
      ASSERT_THAT(pulls[static_cast<size_t>(g)]->Wait(), IsOk());
      EXPECT_EQ(pulls[static_cast<size_t>(g)]->info().path_taken, TransferPath::kDirect);
      const tools::VerifyResult v = c.VerifyGen(g, tables, {0, 64});
      EXPECT_GT(v.verified_bytes, 0u);
      EXPECT_EQ(v.mismatches, 0u) << v.first_mismatch;
    }
    for (const auto& pub : pubs) EXPECT_THAT(pub->Wait(), IsOk());
    ++id;
  }
}

class DirectReadShapeTest : public ::testing::TestWithParam<Shape> {};

TEST_P(DirectReadShapeTest, TheReceiverReadsEveryByteAndNothingIsWritten) {
  ClusterOptions o = Unmapped(GetParam());
  o.gen_config.transport_op_ns = 100000;
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  // Forced, and chosen by auto where a transport write costs 100 µs (so
  // per-block and bounce lose to this rank's own reads).
  ASSERT_NO_FATAL_FAILURE(PullOnDirectAndAuto(c, 7));
  // The writers wrote nothing through the transport; the receivers read.
  for (int r = 0; r < c.num_ctx(); ++r) EXPECT_EQ(c.ctx_faults(r)->Stats().write_ops, 0u);
  for (int g = 0; g < c.num_gen(); ++g) EXPECT_GT(c.gen_faults(g)->Stats().read_ops, 0u);
}

// Where the transport maps the writer's pool for reading
// (LoopbackOptions::map_remote_read, as cuda-ipc does), the receiver copies
// the lent blocks with its own copy engine in one batch: no Read op at all,
// and every byte lands.
TEST_P(DirectReadShapeTest, AMappedReadCopiesEveryByteWithTheReceiversEngine) {
  ClusterOptions o = Unmapped(GetParam());
  o.loopback.map_remote_read = true;
  o.gen_config.transport_op_ns = 100000;
  o.gen_config.inline_copy_kb = 0;  // every copy on the engine's threads
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  ASSERT_NO_FATAL_FAILURE(PullOnDirectAndAuto(c, 11));
  for (int r = 0; r < c.num_ctx(); ++r) EXPECT_EQ(c.ctx_faults(r)->Stats().write_ops, 0u);
  for (int g = 0; g < c.num_gen(); ++g) {
    EXPECT_EQ(c.gen_faults(g)->Stats().read_ops, 0u);
    EXPECT_EQ(c.gen(g).Stats().arena_outstanding_bytes, 0u);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, DirectReadShapeTest,
    ::testing::Values(Shape{"one_to_one_layout_change", 1, 1, LayoutKind::kLayerMajorNhd},
                      Shape{"fan_in", 2, 1, LayoutKind::kLayerMajorHnd},
                      Shape{"fan_out", 1, 2, LayoutKind::kBlockMajorHnd}),
    [](const ::testing::TestParamInfo<Shape>& param) { return std::string(param.param.name); });

// One writer, one receiver, the gen side's read completions held back by
// `delay`: the test acts while the read is (as the session sees it) in
// flight.
class HeldReadTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ClusterOptions o = Unmapped(Shape{"one", 1, 1, LayoutKind::kLayerMajorHnd});
    o.gen_faults.delay = std::chrono::milliseconds(1000);
    auto cluster = Cluster::Create(o);
    ASSERT_THAT(cluster, IsOk());
    cluster_ = std::move(cluster).value();
    std::mt19937_64 rng(11);
    tables_ = cluster_->Tables(0, 64, rng);
    cluster_->ClearGen(0);
  }

  // Publishes and pulls request `id` on the direct path and waits until the
  // receiver's read landed (its completion still held back).
  void StartHeldRead(uint64_t id) {
    auto pub = cluster_->ctx(0).Publish(id, tables_.ctx, 64);
    ASSERT_THAT(pub, IsOk());
    pub_ = *pub;
    const uint64_t reads_before = cluster_->gen_faults(0)->Stats().read_ops;
    auto pull = cluster_->gen(0).Pull(id, "ctx0", tables_.gen, {0, 64}, Path(TransferPath::kDirect));
    ASSERT_THAT(pull, IsOk());
    pull_ = *pull;
    ASSERT_TRUE(
        WaitUntil([&] { return cluster_->gen_faults(0)->Stats().read_ops > reads_before; }));
  }

  std::unique_ptr<Cluster> cluster_;
  BlockTables tables_;
  std::shared_ptr<Transfer> pub_;
  std::shared_ptr<Transfer> pull_;
};

TEST_F(HeldReadTest, ALoanEndedByTheWriterIsNeverReportedOk) {
  StartHeldRead(1);
  // The application takes its blocks back while the receiver still reads:
  // the publication settles at once (nothing of it writes anything), and
  // the receiver, hearing CANCELLED, discards what it read.
  pub_->Cancel();
  ASSERT_TRUE(pub_->WaitFor(milliseconds(500)))
      << "the publication waited for the receiver's read";
  EXPECT_THAT(*pub_->Poll(), StatusIs(StatusCode::kCancelled));
  EXPECT_FALSE(pull_->Poll().has_value()) << "the pull settled while its read was in flight";
  EXPECT_THAT(pull_->Wait(), StatusIs(StatusCode::kCancelled, HasSubstr("cancelled")));
  // Settled means settled: the gen pool does not change afterwards.
  const std::vector<std::byte> after = GenPool(*cluster_);
  cluster_->ctx(0).Shutdown();
  cluster_->gen(0).Shutdown();
  EXPECT_TRUE(GenPool(*cluster_) == after);
}

TEST_F(HeldReadTest, ACancelledPullSettlesOnceItsOwnReadEndedAndTheLoanEnds) {
  StartHeldRead(1);
  pull_->Cancel();
  // The writer hears CANCEL and ends the loan; the pull itself waits only
  // for its own read, not for the writer.
  EXPECT_FALSE(pull_->Poll().has_value()) << "the pull settled while its read was in flight";
  EXPECT_THAT(pull_->Wait(), StatusIs(StatusCode::kCancelled));
  // The publication was not served: the same request can be pulled again.
  EXPECT_FALSE(pub_->Poll().has_value());
  ASSERT_THAT(cluster_->gen_faults(0)->SetOptions(FaultOptions{}), IsOk());
  cluster_->ClearGen(0);
  auto again = cluster_->gen(0).Pull(1, "ctx0", tables_.gen, {0, 64}, Path(TransferPath::kDirect));
  ASSERT_THAT(again, IsOk());
  ASSERT_THAT((*again)->Wait(), IsOk());
  EXPECT_EQ(cluster_->VerifyGen(0, tables_, {0, 64}).mismatches, 0u);
  EXPECT_THAT(pub_->Wait(), IsOk());
}

TEST_F(HeldReadTest, AWriterShuttingDownMidLoanFailsThePullAfterItsRead) {
  StartHeldRead(1);
  cluster_->ctx(0).Shutdown();  // the publication settles ABORTED, the peer leaves
  EXPECT_THAT(pub_->Wait(), StatusIs(StatusCode::kAborted));
  const Status pulled = pull_->Wait();
  EXPECT_FALSE(pulled.ok()) << "a pull whose writer left mid-loan reported OK";
}

TEST(DirectReadTest, NeitherMappedNorReadableRefusesDirect) {
  ClusterOptions o = Unmapped(Shape{"one", 1, 1, LayoutKind::kLayerMajorHnd});
  o.loopback.read_remote = false;
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(3);
  const BlockTables tables = c.Tables(0, 64, rng);
  auto pub = c.ctx(0).Publish(1, tables.ctx, 64);
  ASSERT_THAT(pub, IsOk());
  EXPECT_THAT(c.gen(0).Pull(1, "ctx0", tables.gen, {0, 64}, Path(TransferPath::kDirect)),
              StatusIs(StatusCode::kUnimplemented, HasSubstr("can read")));
  // auto takes another path, and the bytes arrive.
  auto pull = c.gen(0).Pull(1, "ctx0", tables.gen, {0, 64}, Path(TransferPath::kAuto));
  ASSERT_THAT(pull, IsOk());
  ASSERT_THAT((*pull)->Wait(), IsOk());
  EXPECT_NE((*pull)->info().path_taken, TransferPath::kDirect);
  EXPECT_EQ(c.VerifyGen(0, tables, {0, 64}).mismatches, 0u);
  EXPECT_THAT((*pub)->Wait(), IsOk());
}

}  // namespace
}  // namespace kvbounce
