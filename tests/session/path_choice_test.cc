// `auto`'s chooser (session/path_choice.h): the path with the lowest
// estimate, from the transport's and the copy engine's figures and the
// config's overrides; forced paths as asked, when available.
#include "session/path_choice.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "common/status_matchers.h"

namespace kvbounce {
namespace {

using ::testing::HasSubstr;
using testing_util::IsOk;
using testing_util::StatusIs;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;

// A network link: 5 µs per write op, 10 GB/s.
constexpr TransportCost kNetwork{.op_us = 5, .bytes_per_us = 10000};
// Loopback: a memcpy per op.
constexpr TransportCost kMemcpyLink{.op_us = 0.05, .bytes_per_us = 10000};
// The CPU engine: 50 ns per run, 10 GB/s.
constexpr CopyCost kCpu{.batch_us = 0, .run_us = 0.05, .bytes_per_us = 10000};

// `writers` writers, each `runs` fragments of `fragment` bytes (direct,
// gather and scatter lists alike).
std::vector<WriterLoad> Loads(int writers, uint64_t runs, uint64_t fragment, TransportCost link,
                              bool direct = false) {
  WriterLoad load;
  load.bytes = runs * fragment;
  load.direct_runs = load.gather_runs = load.scatter_runs = runs;
  load.link = link;
  load.direct = direct;
  load.send_arena = true;
  return std::vector<WriterLoad>(static_cast<size_t>(writers), load);
}

TransferPath Auto(const Config& config, const std::vector<WriterLoad>& loads,
                  bool recv_arena = true, CopyCost copy = kCpu) {
  Result<PathChoice> choice =
      ChoosePath(config, TransferPath::kAuto, loads, copy, recv_arena, "test");
  EXPECT_THAT(choice, IsOk());
  return choice.ok() ? choice->path : TransferPath::kAuto;
}

TEST(PathChoiceTest, FewLargeFragmentsStayPerBlock) {
  // docs/architecture.md §4: llama-3.1-70b TP8 -> TP8, 256 fragments of 1.25 MiB.
  EXPECT_EQ(Auto(Config(), Loads(1, 256, 1280 * kKiB, kNetwork)), TransferPath::kPerBlock);
  // A one-block request: the extra steps of a bounce cost more than one op.
  EXPECT_EQ(Auto(Config(), Loads(1, 1, 64, kNetwork)), TransferPath::kPerBlock);
}

TEST(PathChoiceTest, ManyTinyFragmentsOnACostlyLinkBounce) {
  // docs/architecture.md §4: TP8 -> TP4, 40,960 fragments of 8 KiB per writer, two writers.
  const std::vector<WriterLoad> loads = Loads(2, 40960, 8 * kKiB, kNetwork);
  EXPECT_EQ(Auto(Config(), loads), TransferPath::kBounce);
  const PathEstimate e = EstimatePaths(Config(), loads, kCpu, true);
  // per-block: 2 x (20 + 40,961 x 5 + 320 MiB / 10,000) µs.
  EXPECT_NEAR(e.per_block_us, 2 * (20 + 40961 * 5.0 + 320.0 * kMiB / 10000), 1);
  // bounce: 2 x (40 + 2 x 5 + 320 MiB / 10,000 + 81,920 x 0.05 + 2 x 320 MiB / 10,000) µs.
  EXPECT_NEAR(e.bounce_us, 2 * (40 + 10 + 3 * 320.0 * kMiB / 10000 + 81920 * 0.05), 1);
  EXPECT_TRUE(std::isinf(e.direct_us));
}

TEST(PathChoiceTest, ACheapLinkNeverBounces) {
  // A memcpy per op: the extra passes of a bounce never pay.
  EXPECT_EQ(Auto(Config(), Loads(4, 4096, 8 * kKiB, kMemcpyLink)), TransferPath::kPerBlock);
  EXPECT_EQ(Auto(Config(), Loads(1, 100000, 64, kMemcpyLink)), TransferPath::kPerBlock);
}

TEST(PathChoiceTest, DirectWhenAvailableAndCheapest) {
  // Loopback: one batched copy against one memcpy per op plus a flush.
  EXPECT_EQ(Auto(Config(), Loads(4, 4096, 8 * kKiB, kMemcpyLink, true)), TransferPath::kDirect);
  EXPECT_EQ(Auto(Config(), Loads(1, 1, 64, kMemcpyLink, true)), TransferPath::kDirect);
  // Only when every writer can map this pool.
  std::vector<WriterLoad> mixed = Loads(2, 4096, 8 * kKiB, kMemcpyLink, true);
  mixed[1].direct = false;
  EXPECT_EQ(Auto(Config(), mixed), TransferPath::kPerBlock);
  // Available but not the cheapest: a copy engine far slower than the link.
  const CopyCost slow_copy{.batch_us = 0, .run_us = 0.05, .bytes_per_us = 100};
  EXPECT_EQ(Auto(Config(), Loads(1, 16, 1 * kMiB, kNetwork, true), true, slow_copy),
            TransferPath::kPerBlock);
}

// The receiver's read: through Transport::Read, a read op and the planning
// of a run each; mapped here (map_remote_read), one batch of its own engine.
TEST(PathChoiceTest, AMappedReadIsPricedAsTheReceiversCopy) {
  // cuda-ipc's shape: 4 KiB runs, a device engine, a costly op per read.
  const CopyCost device{.batch_us = 10, .run_us = 0.001, .bytes_per_us = 1.5e6};
  std::vector<WriterLoad> loads = Loads(4, 32768, 4 * kKiB, kNetwork);
  for (WriterLoad& w : loads) {
    w.direct_read = true;
    w.read = TransportCost{.op_us = 0.02, .bytes_per_us = 1.5e6};
  }
  const PathEstimate read = EstimatePaths(Config(), loads, device, true);
  // 4 x (3 x 10 + 32,768 x (0.02 + 0.05) + 128 MiB / 1.5e6) µs.
  EXPECT_NEAR(read.direct_us, 4 * (30 + 32768 * 0.07 + 128.0 * kMiB / 1.5e6), 1);
  for (WriterLoad& w : loads) w.mapped_read = true;
  const PathEstimate mapped = EstimatePaths(Config(), loads, device, true);
  // 4 x (3 x 10 + 10 + 32,768 x 0.001 + 128 MiB / 1.5e6) µs.
  EXPECT_NEAR(mapped.direct_us, 4 * (40 + 32768 * 0.001 + 128.0 * kMiB / 1.5e6), 1);
  EXPECT_LT(mapped.direct_us, read.direct_us / 5);
  // Where bounce had won against the reads, the mapped read wins.
  EXPECT_LT(mapped.direct_us, mapped.bounce_us);
  EXPECT_EQ(Auto(Config(), loads, true, device), TransferPath::kDirect);
}

TEST(PathChoiceTest, AWriteCallsFixedCostIsPricedOncePerWriterOnPerBlockAndBounce) {
  // cuda-ipc's shape for one block: a runtime call per fragment, and each
  // Write call ~150 µs to its completion whatever its operations; this
  // rank reads the writer's pool through a mapping (direct).
  const CopyCost kernel{.batch_us = 10, .run_us = 0.009, .bytes_per_us = 1.05e6};
  TransportCost link{.op_us = 4, .bytes_per_us = 2.1e6};
  auto loads = [&] {
    std::vector<WriterLoad> l = Loads(2, 1, 32 * kKiB, link);
    for (WriterLoad& w : l) w.direct_read = w.mapped_read = true;
    return l;
  };
  const PathEstimate without = EstimatePaths(Config(), loads(), kernel, true);
  EXPECT_EQ(Auto(Config(), loads(), true, kernel), TransferPath::kPerBlock);
  link.write_us = 150;
  const PathEstimate with = EstimatePaths(Config(), loads(), kernel, true);
  EXPECT_NEAR(with.per_block_us - without.per_block_us, 2 * 150, 1e-6);
  EXPECT_NEAR(with.bounce_us - without.bounce_us, 2 * 150, 1e-6);  // its one write
  EXPECT_NEAR(with.direct_us, without.direct_us, 1e-6);
  EXPECT_EQ(Auto(Config(), loads(), true, kernel), TransferPath::kDirect);
  // Nonsense is no cost, not an unknown one.
  for (double bad : {-1.0, static_cast<double>(NAN), static_cast<double>(INFINITY)}) {
    EXPECT_EQ(EffectiveLinkCost(Config(), TransportCost{.op_us = 4, .write_us = bad}).write_us, 0);
  }
  EXPECT_EQ(EffectiveLinkCost(Config(), TransportCost{.write_us = 150}).write_us, 150);
}

TEST(PathChoiceTest, BounceNeedsBothArenas) {
  const std::vector<WriterLoad> loads = Loads(2, 40960, 8 * kKiB, kNetwork);
  EXPECT_EQ(Auto(Config(), loads, /*recv_arena=*/false), TransferPath::kPerBlock);
  std::vector<WriterLoad> no_send = loads;
  no_send[0].send_arena = false;  // it would write its gather runs one by one
  EXPECT_EQ(Auto(Config(), no_send), TransferPath::kPerBlock);
  EXPECT_TRUE(std::isinf(EstimatePaths(Config(), no_send, kCpu, true).bounce_us));
}

TEST(PathChoiceTest, OverridesReplaceTheStatedFigures) {
  // 4,096 fragments of 8 KiB: per-block on a memcpy link ...
  const std::vector<WriterLoad> loads = Loads(1, 4096, 8 * kKiB, kMemcpyLink);
  EXPECT_EQ(Auto(Config(), loads), TransferPath::kPerBlock);
  // ... bounce once the config says a write op costs 20 µs ...
  Config costly;
  costly.transport_op_ns = 20000;
  EXPECT_EQ(Auto(costly, loads), TransferPath::kBounce);
  // ... and per-block again when the copy engine is said to be slow.
  costly.copy_mb_per_s = 500;
  EXPECT_EQ(Auto(costly, loads), TransferPath::kPerBlock);
  // A slow link with direct available: direct.
  Config slow_link;
  slow_link.transport_mb_per_s = 100;
  EXPECT_EQ(Auto(slow_link, Loads(1, 16, 1 * kMiB, kNetwork, true), true,
                 CopyCost{.batch_us = 0, .run_us = 0.05, .bytes_per_us = 1000}),
            TransferPath::kDirect);

  const TransportCost link = EffectiveLinkCost(costly, kMemcpyLink);
  EXPECT_DOUBLE_EQ(link.op_us, 20);
  EXPECT_DOUBLE_EQ(link.bytes_per_us, kMemcpyLink.bytes_per_us);
  const CopyCost copy = EffectiveCopyCost(costly, kCpu);
  EXPECT_DOUBLE_EQ(copy.run_us, kCpu.run_us);
  EXPECT_DOUBLE_EQ(copy.bytes_per_us, 500);
  Config run;
  run.copy_run_ns = 1500;
  EXPECT_DOUBLE_EQ(EffectiveCopyCost(run, kCpu).run_us, 1.5);
}

TEST(PathChoiceTest, UnknownFiguresTakeTheDefaults) {
  const TransportCost link = EffectiveLinkCost(Config(), TransportCost{});
  EXPECT_DOUBLE_EQ(link.op_us, kUnknownOpUs);
  EXPECT_DOUBLE_EQ(link.bytes_per_us, kUnknownLinkBytesPerUs);
  const CopyCost copy = EffectiveCopyCost(Config(), CopyCost{});
  EXPECT_DOUBLE_EQ(copy.batch_us, 0);
  EXPECT_DOUBLE_EQ(copy.run_us, kUnknownRunUs);
  EXPECT_DOUBLE_EQ(copy.bytes_per_us, kUnknownCopyBytesPerUs);
  // Nonsense figures are unknown ones.
  const TransportCost nonsense = EffectiveLinkCost(Config(), TransportCost{-1, -3});
  EXPECT_DOUBLE_EQ(nonsense.op_us, kUnknownOpUs);
  EXPECT_DOUBLE_EQ(nonsense.bytes_per_us, kUnknownLinkBytesPerUs);
}

TEST(PathChoiceTest, ForcedPathsAreKeptWhenAvailable) {
  // Bounce would be the cheapest; forced paths do not care.
  const std::vector<WriterLoad> loads = Loads(2, 40960, 8 * kKiB, kNetwork, true);
  for (TransferPath path :
       {TransferPath::kPerBlock, TransferPath::kBounce, TransferPath::kDirect}) {
    Result<PathChoice> choice = ChoosePath(Config(), path, loads, kCpu, true, "test");
    ASSERT_THAT(choice, IsOk());
    EXPECT_EQ(choice->path, path);
  }
  EXPECT_THAT(ChoosePath(Config(), TransferPath::kBounce, loads, kCpu, false, "test"),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("bounce_size_mb > 0")));
  std::vector<WriterLoad> unmappable = loads;
  unmappable[1].direct = false;
  EXPECT_THAT(ChoosePath(Config(), TransferPath::kDirect, unmappable, kCpu, true, "ucx"),
              StatusIs(StatusCode::kUnimplemented, HasSubstr("the ucx transport cannot")));
  // A writer without a send arena does not stop a forced bounce (it writes
  // from its pool instead).
  std::vector<WriterLoad> no_send = loads;
  no_send[0].send_arena = false;
  Result<PathChoice> bounce = ChoosePath(Config(), TransferPath::kBounce, no_send, kCpu, true, "t");
  ASSERT_THAT(bounce, IsOk());
  EXPECT_EQ(bounce->path, TransferPath::kBounce);
}

// Device pools over a transport that reaches host memory only: per-block
// cannot run (the pools are not registered), bounce stages through host
// memory and is what auto takes, even where per-block would be cheaper.
TEST(PathChoiceTest, WithoutPerBlockAutoTakesBounceAndForcingPerBlockFails) {
  std::vector<WriterLoad> loads = Loads(2, 4, 4 * kMiB, kNetwork);  // per-block's best case
  EXPECT_EQ(Auto(Config(), loads), TransferPath::kPerBlock);
  loads[1].per_block = false;
  EXPECT_FALSE(PerBlockAvailable(loads));
  EXPECT_EQ(Auto(Config(), loads), TransferPath::kBounce);
  const PathEstimate e = EstimatePaths(Config(), loads, kCpu, true);
  EXPECT_TRUE(std::isinf(e.per_block_us));
  EXPECT_THAT(ChoosePath(Config(), TransferPath::kPerBlock, loads, kCpu, true, "ucx"),
              StatusIs(StatusCode::kUnimplemented, HasSubstr("the ucx transport cannot reach")));
  // And with the bounce path off, nothing is left.
  EXPECT_THAT(ChoosePath(Config(), TransferPath::kAuto, loads, kCpu, false, "ucx"),
              StatusIs(StatusCode::kFailedPrecondition, HasSubstr("no path is available")));
}

TEST(PathChoiceTest, OnAFreeLinkTheFewestStepsWin) {
  // With a free link and free copies, every path costs only its hand-offs:
  // direct has the fewest.
  const TransportCost free_link{.op_us = 1e-9, .bytes_per_us = 1e12};
  const CopyCost free_copy{.batch_us = 0, .run_us = 1e-9, .bytes_per_us = 1e12};
  EXPECT_EQ(Auto(Config(), Loads(1, 1, 1, free_link, true), true, free_copy),
            TransferPath::kDirect);
  EXPECT_EQ(Auto(Config(), Loads(1, 1, 1, free_link), true, free_copy), TransferPath::kPerBlock);
}

TEST(PathChoiceTest, PerBlockLosesFromTheCountWhereItsEstimatePassesDirects) {
  // The CUDA figures of one process: a runtime call per fragment against one
  // batched kernel (docs/paths.md, "Run counts").
  const TransportCost device_op{.op_us = 4, .bytes_per_us = 2.1e6};
  const CopyCost kernel{.batch_us = 10, .run_us = 0.009, .bytes_per_us = 1.05e6};
  for (const uint64_t bytes : {32 * kMiB, 80 * kMiB, 4096 * kMiB}) {
    std::vector<WriterLoad> one = Loads(1, 1, bytes, device_op, /*direct=*/true);
    const uint64_t from = PerBlockLosesFrom(Config(), one[0], kernel);
    // Per-block's faster link pays for a few operations.
    ASSERT_GT(from, 0u) << bytes;
    ASSERT_LT(from, uint64_t{1} << 40) << bytes;
    auto estimate = [&](uint64_t runs) {
      one[0].direct_runs = runs;
      return EstimatePaths(Config(), one, kernel, true);
    };
    const PathEstimate at = estimate(from);
    EXPECT_GT(at.per_block_us, at.direct_us) << bytes << " bytes, " << from << " runs";
    const PathEstimate below = estimate(from - 1);
    EXPECT_LE(below.per_block_us, below.direct_us) << bytes << " bytes, " << from - 1 << " runs";
    const PathEstimate far = estimate(from * 1000);
    EXPECT_GT(far.per_block_us, far.direct_us) << bytes;
  }
  // The more bytes, the more runs per-block's faster link can pay for; a
  // small request goes direct whatever its runs (one block: the hand-off
  // of per-block's flush outprices the batched copy).
  const std::vector<WriterLoad> small = Loads(1, 1, 64 * kKiB, device_op, true);
  const std::vector<WriterLoad> large = Loads(1, 1, 80 * kMiB, device_op, true);
  EXPECT_EQ(PerBlockLosesFrom(Config(), small[0], kernel), 0u);
  EXPECT_LT(PerBlockLosesFrom(Config(), large[0], kernel),
            PerBlockLosesFrom(Config(), Loads(1, 1, 4096 * kMiB, device_op, true)[0], kernel));

  // Per-block dearer at no run at all: from any count.
  const std::vector<WriterLoad> loopback = Loads(1, 1, 64, kMemcpyLink, true);
  EXPECT_EQ(PerBlockLosesFrom(Config(), loopback[0], kCpu), 0u);
  // A writer that cannot copy into the pool, or a link whose operations
  // cost less than a copy run: no count settles it.
  const std::vector<WriterLoad> network = Loads(1, 1, 64, kNetwork, false);
  EXPECT_EQ(PerBlockLosesFrom(Config(), network[0], kCpu), UINT64_MAX);
  const CopyCost slow_runs{.batch_us = 0, .run_us = 10, .bytes_per_us = 10000};
  const std::vector<WriterLoad> cheap_ops = Loads(1, 1, 64, kNetwork, true);
  EXPECT_EQ(PerBlockLosesFrom(Config(), cheap_ops[0], slow_runs), UINT64_MAX);
  // The config's overrides count: with transport_op_ns at 1 ms per-block's
  // flush alone outprices direct.
  Config costly;
  costly.transport_op_ns = 1'000'000;
  EXPECT_GT(PerBlockLosesFrom(Config(), large[0], kernel), 0u);
  EXPECT_EQ(PerBlockLosesFrom(costly, large[0], kernel), 0u);
}

TEST(PathChoiceTest, DescribeEstimate) {
  PathEstimate e{.per_block_us = 12.34, .bounce_us = INFINITY, .direct_us = 3};
  EXPECT_EQ(DescribeEstimate(e), "per-block 12.3 us, bounce n/a, direct 3.0 us");
}

}  // namespace
}  // namespace kvbounce
