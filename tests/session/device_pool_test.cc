// Device pools in one process (docs/cuda.md, "Device pools"): every agent's
// pool and staging arena in memory of one GPU, over the loopback transport.
// Every path over several shapes is verified element by element on the
// device (tools/device_rows.h); a cancelled pull leaves nothing written
// after it settled; Agent::Create names what is wrong with a device pool.
//
// Needs a CUDA device: the transfer cases skip without one ("no CUDA
// device: ..."); the checks of Create's errors run everywhere.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "common/no_cuda_device.h"
#include "common/status_matchers.h"
#include "copy/device_support.h"
#include "kvbounce/transports.h"
#include "tools/cluster.h"

namespace kvbounce {
namespace {

using testing::HasSubstr;
using testing_util::IsOk;
using testing_util::StatusIs;
using tools::BlockTables;
using tools::Cluster;
using tools::ClusterOptions;

// Why the transfer cases cannot run here, or "" when they can.
std::string NoDevice() { return testing_util::NoCudaDevice(); }

struct Shape {
  std::string name;
  ModelShape model;
  int ctx_tp;
  LayoutKind ctx_layout;
  int gen_tp;
  LayoutKind gen_layout;
  int tpb;
  int64_t start, end;
  bool per_layer = false;
};

std::vector<Shape> Shapes() {
  const auto bm = LayoutKind::kBlockMajorHnd;
  const auto lh = LayoutKind::kLayerMajorHnd;
  const auto ln = LayoutKind::kLayerMajorNhd;
  return {
      // TP fan-in with head-dim rows of 128 bf16 elements (whole 256-byte rows).
      {"FanIn", *CustomModel(4, 8, 128, false), 4, bm, 2, bm, 16, 0, 70},
      // The head mismatch that shatters a request into tiny fragments.
      {"HeadMismatch", *CustomModel(4, 8, 64, false), 2, bm, 1, ln, 16, 0, 50},
      {"FanOutLayerMajor", *CustomModel(3, 4, 32, false), 1, lh, 2, lh, 8, 5, 41},
      {"PerLayerPools", *CustomModel(3, 4, 16, false), 2, ln, 1, lh, 8, 3, 29, true},
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

ClusterOptions DeviceCluster(const Shape& s) {
  ClusterOptions options;
  options.ctx = {s.model, DType::kBf16, s.ctx_tp, 1, {}, s.ctx_layout, s.tpb};
  options.gen = {s.model, DType::kBf16, s.gen_tp, 1, {}, s.gen_layout, s.tpb};
  options.slots = 2;
  options.max_tokens = s.end;
  options.per_layer_pools = s.per_layer;
  options.ctx_config.bounce_size_mb = 4;
  options.gen_config.bounce_size_mb = 4;
  options.memory = MemoryKind::kCuda;
  options.device = 0;
  return options;
}

class DevicePoolTest : public ::testing::TestWithParam<Case> {};

TEST_P(DevicePoolTest, EveryGenElementArrivesAndNothingElseChanges) {
  if (const std::string why = NoDevice(); !why.empty()) GTEST_SKIP() << why;
  const Shape& s = GetParam().shape;
  auto cluster = Cluster::Create(DeviceCluster(s));
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;

  std::mt19937_64 rng(11);
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
      if (GetParam().path != TransferPath::kAuto) {
        EXPECT_EQ(info.path_taken, GetParam().path);
      }
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

INSTANTIATE_TEST_SUITE_P(AllPaths, DevicePoolTest, ::testing::ValuesIn(Cases()), CaseName);

// A pull cancelled at once settles; from then on nothing of kvbounce writes
// its blocks: the slot is cleared right after the settle, every writer is
// then stopped (the publications settle only once their operations ended),
// and the slot must still hold nothing but the sentinel.
TEST(DevicePoolSettleTest, CancelledPullWritesNothingAfterItSettled) {
  if (const std::string why = NoDevice(); !why.empty()) GTEST_SKIP() << why;
  Shape s = Shapes()[1];  // head mismatch: many fragments, a long per-block run
  s.end = 512;
  auto cluster = Cluster::Create(DeviceCluster(s));
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(3);
  uint64_t id = 100;
  for (TransferPath path :
       {TransferPath::kPerBlock, TransferPath::kBounce, TransferPath::kDirect}) {
    SCOPED_TRACE(std::string(TransferPathName(path)));
    ++id;
    const int slot = static_cast<int>(id % 2);
    c.ClearGen(slot);
    const BlockTables tables = c.Tables(slot, s.end, rng);
    std::vector<std::shared_ptr<Transfer>> published, pulled;
    for (int r = 0; r < c.num_ctx(); ++r) {
      auto t = c.ctx(r).Publish(id, tables.ctx, s.end);
      ASSERT_THAT(t, IsOk());
      published.push_back(*t);
    }
    PullOptions pull;
    pull.path = path;
    for (int g = 0; g < c.num_gen(); ++g) {
      auto t = c.gen(g).Pull(id, c.options().ctx_instance, tables.gen, {0, s.end}, pull);
      ASSERT_THAT(t, IsOk());
      (*t)->Cancel();
      pulled.push_back(*t);
    }
    for (auto& t : pulled) {
      const Status outcome = t->Wait();
      // It may have finished before the cancel was seen.
      EXPECT_TRUE(outcome.ok() || outcome.code() == StatusCode::kCancelled) << outcome;
    }
    c.ClearGen(slot);
    for (auto& t : published) {
      t->Cancel();
      t->Wait().IgnoreError();
    }
    for (int g = 0; g < c.num_gen(); ++g) {
      const tools::VerifyResult v = c.VerifyGen(g, tables, {0, 0});
      EXPECT_EQ(v.mismatches, 0u) << v.first_mismatch;
    }
  }
}

// Host-staged bounce (docs/cuda.md): a transport that reaches host memory
// only (loopback with device_memory off, as Debian's UCX) cannot register
// the device pools; bounce gathers into pinned host arenas, the transport
// moves those, the receiver scatters. It is the only path, and its
// fallbacks fail instead of writing from the pool.
TEST(DevicePoolStagedTest, BounceStagesThroughPinnedHostMemoryAndIsTheOnlyPath) {
  if (const std::string why = NoDevice(); !why.empty()) GTEST_SKIP() << why;
  const Shape s = Shapes()[1];  // head mismatch
  ClusterOptions options = DeviceCluster(s);
  options.loopback.device_memory = false;
  auto cluster = Cluster::Create(options);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  for (int g = 0; g < c.num_gen(); ++g) {
    const Result<std::vector<TransferPath>> paths = c.gen(g).Paths(c.options().ctx_instance);
    ASSERT_THAT(paths, IsOk());
    EXPECT_THAT(*paths, testing::ElementsAre(TransferPath::kBounce));
  }
  std::mt19937_64 rng(5);
  uint64_t id = 1;
  for (TransferPath path : {TransferPath::kBounce, TransferPath::kAuto}) {
    const BlockTables tables = c.Tables(static_cast<int>(id % 2), s.end, rng);
    c.ClearGen(tables.slot);
    PullOptions pull;
    pull.path = path;
    std::vector<TransferInfo> infos;
    ASSERT_THAT(c.RunRequest(id++, tables, {s.start, s.end}, pull, &infos), IsOk());
    for (const TransferInfo& info : infos) EXPECT_EQ(info.path_taken, TransferPath::kBounce);
    for (int g = 0; g < c.num_gen(); ++g) {
      const tools::VerifyResult v = c.VerifyGen(g, tables, {s.start, s.end});
      EXPECT_EQ(v.mismatches, 0u) << v.first_mismatch;
    }
  }
  // Per-block and direct would need the transport to reach the pools.
  const BlockTables tables = c.Tables(0, s.end, rng);
  for (TransferPath path : {TransferPath::kPerBlock, TransferPath::kDirect}) {
    PullOptions pull;
    pull.path = path;
    EXPECT_THAT(c.gen(0).Pull(id++, c.options().ctx_instance, tables.gen, {0, s.end}, pull),
                StatusIs(StatusCode::kUnimplemented));
  }
  for (int g = 0; g < c.num_gen(); ++g) EXPECT_EQ(c.gen(g).Stats().arena_outstanding_bytes, 0u);
}

// A request many times the arenas streams through them (docs/sessions.md,
// "Streaming bounce"): chunk slots the receiver grants, gathered from and
// scattered into device pools by the copy kernels, each chunk's part of the
// plan sliced from the tiled lists where they are in packed order and from
// the flat ones where they are not (the shapes have both: a layer-major
// receiver's chunks span several layers' tiles; a receiver block cut by the
// writer's block edges interleaves). Host-staged (the transport reaches
// host memory only: the only way such a request can move) and
// device-resident staging alike.
class DevicePoolStreamTest : public ::testing::TestWithParam<std::tuple<int, bool>> {};

TEST_P(DevicePoolStreamTest, ARequestLargerThanTheArenasStreamsThroughThem) {
  if (const std::string why = NoDevice(); !why.empty()) GTEST_SKIP() << why;
  const auto [shape_index, host_staged] = GetParam();
  Shape s = Shapes()[static_cast<size_t>(shape_index)];
  // Every gen rank's share well over its 1 MiB arena: FanIn 4 layers x 8
  // heads x 128 x 2 B x 2 x 2048 tokens, 32 MiB (16 a gen rank).
  const int64_t kTokens[] = {2048, 2048, 4096, 4096};
  s.end = s.start + kTokens[shape_index];
  ClusterOptions options = DeviceCluster(s);
  options.loopback.device_memory = !host_staged;
  options.ctx_config.bounce_size_mb = 1;
  options.gen_config.bounce_size_mb = 1;
  auto cluster = Cluster::Create(options);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(9);
  for (uint64_t id = 1; id <= 2; ++id) {
    const BlockTables tables = c.Tables(0, s.end, rng);
    c.ClearGen(0);
    PullOptions pull;
    pull.path = TransferPath::kBounce;
    std::vector<TransferInfo> infos;
    ASSERT_THAT(c.RunRequest(id, tables, {s.start, s.end}, pull, &infos), IsOk());
    for (const TransferInfo& info : infos) {
      EXPECT_EQ(info.path_taken, TransferPath::kBounce);
      EXPECT_EQ(info.fallback_reason, "");
    }
    for (int g = 0; g < c.num_gen(); ++g) {
      const tools::VerifyResult v = c.VerifyGen(g, tables, {s.start, s.end});
      EXPECT_EQ(v.mismatches, 0u) << v.first_mismatch;
    }
  }
  for (int g = 0; g < c.num_gen(); ++g) {
    if (shape_index == 0) {
      // Two writers a gen rank, chunks of half its 1 MiB arena: 8 MiB each.
      EXPECT_EQ(c.gen(g).Stats().chunks_scattered, 2u * 2 * 16);
    } else {
      EXPECT_GT(c.gen(g).Stats().chunks_scattered, 2u * 2);  // streamed, in chunks
    }
    EXPECT_LE(c.gen(g).Stats().arena_peak_bytes, MiB(1));
    EXPECT_EQ(c.gen(g).Stats().arena_outstanding_bytes, 0u);
  }
}

INSTANTIATE_TEST_SUITE_P(Staging, DevicePoolStreamTest,
                         ::testing::Combine(::testing::Range(0, static_cast<int>(Shapes().size())),
                                            ::testing::Bool()),
                         [](const ::testing::TestParamInfo<std::tuple<int, bool>>& param) {
                           return Shapes()[static_cast<size_t>(std::get<0>(param.param))].name +
                                  (std::get<1>(param.param) ? std::string("HostStaged")
                                                            : std::string("Device"));
                         });

TEST(DevicePoolStagedTest, NoPathWithoutArenasIsAClearError) {
  if (const std::string why = NoDevice(); !why.empty()) GTEST_SKIP() << why;
  const Shape s = Shapes()[2];
  ClusterOptions options = DeviceCluster(s);
  options.loopback.device_memory = false;
  options.ctx_config.bounce_size_mb = 0;
  options.gen_config.bounce_size_mb = 0;
  auto cluster = Cluster::Create(options);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(2);
  const BlockTables tables = c.Tables(0, s.end, rng);
  EXPECT_THAT(c.gen(0).Pull(1, c.options().ctx_instance, tables.gen, {0, s.end}, {}),
              StatusIs(StatusCode::kFailedPrecondition, HasSubstr("no path is available")));
}

// --- Agent::Create with a device pool ------------------------------------

AgentOptions GenOptions(std::shared_ptr<LoopbackFabric> fabric) {
  AgentOptions options;
  options.instance_id = "gen0";
  options.role = Role::kGen;
  options.instance = {
      *CustomModel(2, 2, 8, false), DType::kBf16, 1, 1, {}, LayoutKind::kBlockMajorHnd, 4};
  options.transport_spec.kind = "loopback";
  options.transport_spec.fabric = std::move(fabric);
  options.pool.num_blocks = 4;
  options.pool.memory = MemoryKind::kCuda;
  return options;
}

TEST(DevicePoolCreateTest, NamesWhatIsWrongWithTheDevicePool) {
  std::vector<std::byte> host(1 << 16);
  AgentOptions options = GenOptions(NewLoopbackFabric());
  options.pool.bases = {Addr::FromPointer(host.data())};
  Result<std::unique_ptr<Agent>> agent = Agent::Create(std::move(options));
  if (CudaSupport() == nullptr) {
    EXPECT_THAT(agent, StatusIs(StatusCode::kUnimplemented, HasSubstr("no CUDA support")));
    return;
  }
  std::string why;
  if (CudaSupport()->DeviceCount(&why) == 0) {
    EXPECT_THAT(agent, StatusIs(StatusCode::kUnavailable, HasSubstr("no CUDA device can be used")));
    return;
  }
  // Host memory said to be device memory.
  EXPECT_THAT(agent,
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("not memory of cuda device 0")));

  // A device that does not exist.
  AgentOptions other = GenOptions(NewLoopbackFabric());
  other.pool.bases = {Addr::FromPointer(host.data())};
  other.pool.device = 4096;
  EXPECT_THAT(Agent::Create(std::move(other)),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("AgentOptions.pool.device = 4096")));
}

}  // namespace
}  // namespace kvbounce
