// The Agent API as an application sees it: construction errors, bad
// requests, the publication lifecycle, the perf log, shutdown.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>

#include "common/clock.h"
#include "common/status_matchers.h"
#include "copy/device_support.h"
#include "kvbounce/transports.h"
#include "session/agent_internal.h"
#include "tools/cluster.h"
#include "transport/loopback/loopback_transport.h"

namespace kvbounce {
namespace {

using std::chrono::milliseconds;
using ::testing::HasSubstr;
using testing_util::IsOk;
using testing_util::StatusIs;
using tools::BlockTables;
using tools::Cluster;
using tools::ClusterOptions;

class AgentCreateTest : public ::testing::Test {
 protected:
  AgentOptions Options() {
    AgentOptions o;
    o.instance_id = "ctx0";
    o.role = Role::kCtx;
    o.instance.model = *CustomModel(2, 2, 8, false);
    o.pool.bases = {Addr::FromPointer(pool_.data())};
    o.pool.num_blocks = 4;
    o.transport = *LoopbackTransport::Create(fabric_, "a" + std::to_string(next_++));
    return o;
  }
  std::shared_ptr<LoopbackFabric> fabric_ = LoopbackFabric::Create();
  std::vector<std::byte> pool_ = std::vector<std::byte>(1 << 20);
  int next_ = 0;
};

TEST_F(AgentCreateTest, InvalidOptionsNameTheField) {
  AgentOptions o = Options();
  o.config.transport_op_ns = -1;
  EXPECT_THAT(Agent::Create(std::move(o)),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("transport_op_ns = -1")));
  o = Options();
  o.config.copy_mb_per_s = Config::kMaxMbPerS + 1;
  EXPECT_THAT(Agent::Create(std::move(o)),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("copy_mb_per_s = 1000000001")));
  o = Options();
  o.instance_id = "";
  EXPECT_THAT(Agent::Create(std::move(o)),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("instance_id")));
  o = Options();
  o.config.bounce_size_mb = -1;
  EXPECT_THAT(Agent::Create(std::move(o)),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("bounce_size_mb = -1")));
  o = Options();
  o.instance.tp = 3;
  EXPECT_THAT(Agent::Create(std::move(o)),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("tp = 3")));
  o = Options();
  o.rank = 1;
  EXPECT_THAT(Agent::Create(std::move(o)),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("rank 1")));
  o = Options();
  o.pool.bases.clear();
  EXPECT_THAT(Agent::Create(std::move(o)),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("pool.bases")));
  o = Options();
  o.pool.bases.push_back(Addr::FromPointer(pool_.data() + 4096));  // per layer, block-major
  EXPECT_THAT(Agent::Create(std::move(o)),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("per-layer")));
  o = Options();
  o.pool.memory = MemoryKind::kCuda;  // host memory said to be device memory
  if (CudaSupport() == nullptr) {
    EXPECT_THAT(Agent::Create(std::move(o)),
                StatusIs(StatusCode::kUnimplemented, HasSubstr("no CUDA support")));
  } else if (CudaSupport()->DeviceCount() == 0) {
    EXPECT_THAT(Agent::Create(std::move(o)),
                StatusIs(StatusCode::kUnavailable, HasSubstr("no CUDA device")));
  } else {
    EXPECT_THAT(Agent::Create(std::move(o)),
                StatusIs(StatusCode::kInvalidArgument, HasSubstr("not memory of cuda device 0")));
  }
  o = Options();
  o.pool.num_blocks = 0;
  EXPECT_THAT(Agent::Create(std::move(o)),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("num_blocks")));
}

TEST_F(AgentCreateTest, ConnectToNobodyFails) {
  auto agent = Agent::Create(Options());
  ASSERT_THAT(agent, IsOk());
  const std::vector<std::string> nobody = {"loopback:nobody"};
  EXPECT_THAT((*agent)->Connect(nobody), StatusIs(StatusCode::kUnavailable, HasSubstr("nobody")));
  (*agent)->Shutdown();
  (*agent)->Shutdown();  // idempotent
  EXPECT_THAT((*agent)->Connect(nobody), StatusIs(StatusCode::kAborted));
}

TEST_F(AgentCreateTest, ConnectTimesOutWhenNoHelloComes) {
  AgentOptions o = Options();
  o.connect_timeout = milliseconds(100);
  auto agent = *Agent::Create(std::move(o));
  // A transport that accepts connections but never answers.
  auto silent = *LoopbackTransport::Create(fabric_, "silent");
  ASSERT_THAT(silent->Start({[](PeerId, std::vector<std::byte>) {}, [](PeerId, const Status&) {}}),
              IsOk());
  const std::vector<std::string> addresses = {silent->Address()};
  EXPECT_THAT(agent->Connect(addresses),
              StatusIs(StatusCode::kDeadlineExceeded, HasSubstr("HELLO")));
  agent->Shutdown();
}

ClusterOptions Small() {
  ClusterOptions o;
  const ModelShape model = *CustomModel(2, 4, 8, false);
  o.ctx = {model, DType::kFp16, 2, 1, {}, LayoutKind::kBlockMajorHnd, 4};
  o.gen = {model, DType::kFp16, 1, 1, {}, LayoutKind::kBlockMajorHnd, 4};
  o.max_tokens = 16;
  o.ctx_config.bounce_size_mb = 1;
  o.gen_config.bounce_size_mb = 1;
  return o;
}

TEST(AgentRequestTest, BadRequestsAreRefusedWithClearErrors) {
  auto cluster = Cluster::Create(Small());
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  const std::vector<int32_t> table = {0, 1, 2, 3};
  EXPECT_THAT(c.gen(0).Publish(1, table, 16),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("gen rank")));
  EXPECT_THAT(c.ctx(0).Pull(1, "ctx0", table, {0, 16}),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("ctx rank")));
  EXPECT_THAT(c.ctx(0).Publish(1, table, 0),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("num_tokens")));
  EXPECT_THAT(c.ctx(0).Publish(1, table, 17),
              StatusIs(StatusCode::kOutOfRange, HasSubstr("17 tokens need 5 blocks")));
  const std::vector<int32_t> outside = {0, 1, 99, 3};
  EXPECT_THAT(c.ctx(0).Publish(1, outside, 16),
              StatusIs(StatusCode::kOutOfRange, HasSubstr("= 99")));
  ASSERT_THAT(c.ctx(0).Publish(1, table, 16), IsOk());
  EXPECT_THAT(c.ctx(0).Publish(1, table, 16), StatusIs(StatusCode::kAlreadyExists));
  EXPECT_THAT(c.ctx(0).Retire(2), StatusIs(StatusCode::kNotFound));
  EXPECT_THAT(c.ctx(0).Retire(1), IsOk());

  EXPECT_THAT(c.gen(0).Pull(1, "ctx9", table, {0, 16}),
              StatusIs(StatusCode::kNotFound, HasSubstr("ctx9")));
  EXPECT_THAT(c.gen(0).Pull(1, "ctx0", table, {0, 17}),
              StatusIs(StatusCode::kOutOfRange, HasSubstr("block table")));
  EXPECT_THAT(c.gen(0).Pull(1, "ctx0", table, {5, 5}),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("token range")));
  auto first = c.gen(0).Pull(1, "ctx0", table, {0, 16});
  ASSERT_THAT(first, IsOk());
  EXPECT_THAT(c.gen(0).Pull(1, "ctx0", table, {0, 16}), StatusIs(StatusCode::kAlreadyExists));
  (*first)->Cancel();
  EXPECT_THAT((*first)->Wait(), StatusIs(StatusCode::kCancelled));
  EXPECT_THAT(c.ctx(0).ReceiverCount("gen0"), IsOk());
  EXPECT_EQ(*c.ctx(0).ReceiverCount("gen0"), 1);
  EXPECT_THAT(c.ctx(0).ReceiverCount("gen9"), StatusIs(StatusCode::kNotFound));
}

TEST(AgentRequestTest, PublicationSettlesOnceEveryReceiverWasServed) {
  ClusterOptions o = Small();
  o.ctx.tp = 1;
  o.gen.tp = 2;  // fan-out: the one ctx rank serves two gen ranks
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(1);
  const BlockTables t = c.Tables(0, 16, rng);
  auto published = c.ctx(0).Publish(5, t.ctx, 16);
  ASSERT_THAT(published, IsOk());
  auto first = c.gen(0).Pull(5, "ctx0", t.gen, {0, 16});
  ASSERT_THAT((*first)->Wait(), IsOk());
  // The ctx rank handled that job's end before the result left; once a call
  // on its control thread returns, a settle it decided would show.
  ASSERT_THAT(c.ctx(0).ReceiverCount("gen0"), IsOk());
  EXPECT_FALSE((*published)->Poll().has_value());  // gen rank 1 still to come
  auto second = c.gen(1).Pull(5, "ctx0", t.gen, {0, 16});
  ASSERT_THAT((*second)->Wait(), IsOk());
  EXPECT_THAT((*published)->Wait(), IsOk());
  EXPECT_EQ((*published)->info().bytes, (*first)->info().bytes + (*second)->info().bytes);
}

TEST(AgentRequestTest, PublicationExpiresAfterItsTtl) {
  auto clock = std::make_shared<ManualClock>();
  ClusterOptions o = Small();
  o.ctx_hooks.clock = clock;
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  PublishOptions ttl;
  ttl.ttl = milliseconds(50);
  auto published = (*cluster)->ctx(0).Publish(6, std::vector<int32_t>{0, 1, 2, 3}, 16, ttl);
  ASSERT_THAT(published, IsOk());
  clock->Advance(milliseconds(49));  // returns once the ctx rank's loop caught up
  EXPECT_FALSE((*published)->Poll().has_value());
  clock->Advance(milliseconds(1));
  ASSERT_TRUE((*published)->Poll().has_value());
  EXPECT_THAT(*(*published)->Poll(), StatusIs(StatusCode::kDeadlineExceeded, HasSubstr("expired")));
}

TEST(AgentRequestTest, PerfLogHasOneLinePerRequestAndSide) {
  const std::string path =
      ::testing::TempDir() + "/kvbounce_perf_" + std::to_string(::getpid()) + ".jsonl";
  std::remove(path.c_str());
  ::setenv("KVBOUNCE_PERF_LOG", path.c_str(), 1);
  auto cluster = Cluster::Create(Small());
  ::unsetenv("KVBOUNCE_PERF_LOG");
  ASSERT_THAT(cluster, IsOk());
  std::mt19937_64 rng(2);
  ASSERT_THAT((*cluster)->RunRequest(9, (*cluster)->Tables(0, 16, rng), {0, 16}), IsOk());
  (*cluster)->Shutdown();
  std::ifstream in(path);
  std::string line;
  int sender = 0, receiver = 0;
  while (std::getline(in, line)) {
    const nlohmann::json j = nlohmann::json::parse(line);
    EXPECT_EQ(j["request_id"], 9);
    EXPECT_EQ(j["outcome"], "completed");
    (j["side"] == "sender" ? sender : receiver)++;
  }
  EXPECT_EQ(sender, 2);    // two ctx ranks
  EXPECT_EQ(receiver, 1);  // one gen rank
  std::remove(path.c_str());
}

TEST(AgentRequestTest, UnopenablePerfLogFailsCreate) {
  ::setenv("KVBOUNCE_PERF_LOG", "/nonexistent-dir/perf.jsonl", 1);
  auto cluster = Cluster::Create(Small());
  ::unsetenv("KVBOUNCE_PERF_LOG");
  EXPECT_THAT(cluster, StatusIs(StatusCode::kInvalidArgument, HasSubstr("KVBOUNCE_PERF_LOG")));
}

TEST(AgentRequestTest, StatsAfterShutdownShowNothingOutstanding) {
  auto cluster = Cluster::Create(Small());
  ASSERT_THAT(cluster, IsOk());
  std::mt19937_64 rng(3);
  ASSERT_THAT((*cluster)->RunRequest(1, (*cluster)->Tables(0, 16, rng), {0, 16}), IsOk());
  (*cluster)->Shutdown();
  const AgentStats s = (*cluster)->gen(0).Stats();
  EXPECT_EQ(s.requests_completed, 1u);
  EXPECT_EQ(s.arena_outstanding_bytes, 0u);
  const nlohmann::json j = nlohmann::json::parse(s.json);
  EXPECT_TRUE(j.contains("transport"));
}

}  // namespace
}  // namespace kvbounce

namespace kvbounce {
namespace {

// --- The API edge: every enum, duration and size is checked with
//     overflow-safe arithmetic, errors carry the documented code, and no
//     exception leaves the library.

TEST_F(AgentCreateTest, EnumsDurationsAndSizesAreCheckedAtCreate) {
  struct Case {
    const char* name;
    std::function<void(AgentOptions&)> spoil;
    const char* field;
  };
  const std::vector<Case> cases = {
      {"role", [](AgentOptions& o) { o.role = static_cast<Role>(7); }, "role = 7"},
      {"dtype", [](AgentOptions& o) { o.instance.dtype = static_cast<DType>(9); }, "dtype = 9"},
      {"layout", [](AgentOptions& o) { o.instance.layout = static_cast<LayoutKind>(5); },
       "layout = 5"},
      {"memory", [](AgentOptions& o) { o.pool.memory = static_cast<MemoryKind>(4); },
       "pool.memory = 4"},
      {"grace<0", [](AgentOptions& o) { o.grace = milliseconds(-1); }, "grace = -1 ms"},
      {"grace=max", [](AgentOptions& o) { o.grace = milliseconds::max(); }, "AgentOptions.grace"},
      {"connect=0", [](AgentOptions& o) { o.connect_timeout = milliseconds(0); },
       "connect_timeout = 0 ms"},
      {"connect<0", [](AgentOptions& o) { o.connect_timeout = milliseconds(-5); },
       "connect_timeout = -5 ms"},
      {"connect=1000y",
       [](AgentOptions& o) {
         o.connect_timeout = std::chrono::duration_cast<milliseconds>(
             std::chrono::hours(24 * 365 * 1000));
       },
       "connect_timeout"},
      {"null base", [](AgentOptions& o) { o.pool.bases = {Addr()}; }, "pool.bases[0] is null"},
      {"tp huge", [](AgentOptions& o) { o.instance.tp = 1 << 20; }, "tp = 1048576"},
      {"rank<0", [](AgentOptions& o) { o.rank = -1; }, "rank -1"},
      {"blocks huge",
       [](AgentOptions& o) { o.pool.num_blocks = std::numeric_limits<int64_t>::max(); },
       "num_blocks"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    AgentOptions o = Options();
    c.spoil(o);
    EXPECT_THAT(Agent::Create(std::move(o)),
                StatusIs(StatusCode::kInvalidArgument, HasSubstr(c.field)));
  }
}

TEST(AgentEdgeTest, HugeAndInvalidRequestsAreRefusedWithTheirCodes) {
  auto cluster = Cluster::Create(Small());
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  const std::vector<int32_t> table = {0, 1, 2, 3};

  // Publish: a token count near the limit needs more blocks than any table.
  EXPECT_THAT(c.ctx(0).Publish(1, table, kMax),
              StatusIs(StatusCode::kOutOfRange, HasSubstr("blocks")));
  PublishOptions forever;
  forever.ttl = milliseconds::max();
  EXPECT_THAT(c.ctx(0).Publish(1, table, 16, forever),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("ttl")));
  forever.ttl =
      std::chrono::duration_cast<milliseconds>(std::chrono::hours(24 * 365 * 1000));
  EXPECT_THAT(c.ctx(0).Publish(1, table, 16, forever),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("ttl")));
  forever.ttl = milliseconds(-1);
  EXPECT_THAT(c.ctx(0).Publish(1, table, 16, forever),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("ttl = -1")));

  // Pull: ranges near INT64_MAX, negative starts, unknown paths, timeouts.
  EXPECT_THAT(c.gen(0).Pull(1, "ctx0", table, {0, kMax}),
              StatusIs(StatusCode::kOutOfRange, HasSubstr("blocks")));
  EXPECT_THAT(c.gen(0).Pull(1, "ctx0", table, {kMax - 1, kMax}),
              StatusIs(StatusCode::kOutOfRange));
  EXPECT_THAT(c.gen(0).Pull(1, "ctx0", table, {-1, 4}),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("token range")));
  PullOptions bad_path;
  bad_path.path = static_cast<TransferPath>(9);
  EXPECT_THAT(c.gen(0).Pull(1, "ctx0", table, {0, 16}, bad_path),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("path = 9")));
  PullOptions endless;
  endless.timeout = milliseconds::max();
  EXPECT_THAT(c.gen(0).Pull(1, "ctx0", table, {0, 16}, endless),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("timeout")));
  // Every entry the request carries is checked, also below the range.
  const std::vector<int32_t> negative_below = {-1, 1, 2, 3};
  EXPECT_THAT(c.gen(0).Pull(1, "ctx0", negative_below, {8, 16}),
              StatusIs(StatusCode::kOutOfRange, HasSubstr("entry 0 = -1")));
  EXPECT_EQ(c.gen(0).Stats().requests_failed, 0u);
}

TEST(AgentEdgeTest, AWritersRefusalKeepsItsCode) {
  auto cluster = Cluster::Create(Small());
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(1);
  const BlockTables t = c.Tables(0, 16, rng);
  // Published with 8 tokens, pulled with 16: the writers refuse.
  std::vector<std::shared_ptr<Transfer>> pubs;
  for (int r = 0; r < c.num_ctx(); ++r) pubs.push_back(*c.ctx(r).Publish(1, t.ctx, 8));
  auto pull = c.gen(0).Pull(1, "ctx0", t.gen, {0, 16});
  ASSERT_THAT(pull, IsOk());
  EXPECT_THAT((*pull)->Wait(),
              StatusIs(StatusCode::kOutOfRange, HasSubstr("published with 8 tokens")));
  for (int r = 0; r < c.num_ctx(); ++r) EXPECT_THAT(c.ctx(r).Retire(1), IsOk());
  for (auto& p : pubs) EXPECT_THAT(p->Wait(), StatusIs(StatusCode::kCancelled));
}

TEST_F(AgentCreateTest, AnIncompatiblePeerIsAnInvalidArgument) {
  AgentOptions ctx = Options();
  auto ctx_agent = Agent::Create(std::move(ctx));
  ASSERT_THAT(ctx_agent, IsOk());
  AgentOptions gen = Options();
  gen.instance_id = "gen0";
  gen.role = Role::kGen;
  gen.instance.model = *CustomModel(2, 2, 16, false);  // another head dim
  auto gen_agent = Agent::Create(std::move(gen));
  ASSERT_THAT(gen_agent, IsOk());
  const std::vector<std::string> address = {(*ctx_agent)->Address()};
  EXPECT_THAT((*gen_agent)->Connect(address),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("another model")));
}

}  // namespace
}  // namespace kvbounce

namespace kvbounce {
namespace {

// --- Agent::Create builds the transport from AgentOptions::transport_spec.

// Sets an environment variable for the scope of a test.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) { ::setenv(name, value, 1); }
  ~ScopedEnv() { ::unsetenv(name_); }

 private:
  const char* name_;
};

// One ctx and one gen rank of CustomModel(2, 2, 8): tp 1 each, block-major,
// 32 tokens per block, 4 blocks of 4 KiB each.
class TransportSpecTest : public ::testing::Test {
 protected:
  static constexpr uint64_t kBlockBytes = 2 * 2 * 2 * 32 * 8 * 2;

  AgentOptions Options(Role role, std::vector<std::byte>& pool) {
    AgentOptions o;
    o.instance_id = role == Role::kCtx ? "ctx0" : "gen0";
    o.role = role;
    o.instance.model = *CustomModel(2, 2, 8, false);
    o.pool.bases = {Addr::FromPointer(pool.data())};
    o.pool.num_blocks = 4;
    return o;
  }

  std::shared_ptr<LoopbackFabric> fabric_ = NewLoopbackFabric();
  std::vector<std::byte> ctx_pool_ = std::vector<std::byte>(4 * kBlockBytes);
  std::vector<std::byte> gen_pool_ = std::vector<std::byte>(4 * kBlockBytes, std::byte{0});
};

TEST_F(TransportSpecTest, LoopbackSpecWorksEndToEnd) {
  for (size_t i = 0; i < ctx_pool_.size(); ++i) ctx_pool_[i] = static_cast<std::byte>(i * 7 + 1);
  AgentOptions c = Options(Role::kCtx, ctx_pool_);
  c.transport_spec.kind = "loopback";
  c.transport_spec.fabric = fabric_;  // name: "<instance>-<rank>"
  AgentOptions g = Options(Role::kGen, gen_pool_);
  g.transport_spec.kind = "loopback";
  g.transport_spec.fabric = fabric_;
  g.transport_spec.loopback_name = "decode";
  auto ctx = Agent::Create(std::move(c));
  ASSERT_THAT(ctx, IsOk());
  auto gen = Agent::Create(std::move(g));
  ASSERT_THAT(gen, IsOk());
  EXPECT_EQ((*ctx)->Address(), "loopback:ctx0-0");
  EXPECT_EQ((*gen)->Address(), "loopback:decode");
  const std::vector<std::string> address = {(*ctx)->Address()};
  ASSERT_THAT((*gen)->Connect(address), IsOk());

  const std::vector<int32_t> ctx_table = {2, 0};
  const std::vector<int32_t> gen_table = {1, 3};
  auto published = (*ctx)->Publish(1, ctx_table, 64);
  ASSERT_THAT(published, IsOk());
  auto pull = (*gen)->Pull(1, "ctx0", gen_table, {0, 64});
  ASSERT_THAT(pull, IsOk());
  ASSERT_THAT((*pull)->Wait(), IsOk());
  EXPECT_THAT((*published)->Wait(), IsOk());
  for (size_t b = 0; b < 2; ++b) {
    const std::byte* from = ctx_pool_.data() + static_cast<size_t>(ctx_table[b]) * kBlockBytes;
    const std::byte* to = gen_pool_.data() + static_cast<size_t>(gen_table[b]) * kBlockBytes;
    EXPECT_EQ(std::memcmp(from, to, kBlockBytes), 0) << "block " << b;
  }
}

TEST_F(TransportSpecTest, BadSpecsNameTheField) {
  AgentOptions o = Options(Role::kCtx, ctx_pool_);
  o.transport_spec.kind = "tcp";
  EXPECT_THAT(Agent::Create(std::move(o)),
              StatusIs(StatusCode::kInvalidArgument,
                       HasSubstr("transport_spec.kind = \"tcp\" is invalid: must be one of ucx, "
                                 "loopback")));
  o = Options(Role::kCtx, ctx_pool_);
  o.transport_spec.kind = "loopback";  // no fabric
  EXPECT_THAT(Agent::Create(std::move(o)),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("transport_spec.fabric")));
  // A name taken on the fabric.
  auto taken = *NewLoopbackTransport(fabric_, "ctx0-0");
  o = Options(Role::kCtx, ctx_pool_);
  o.transport_spec.kind = "loopback";
  o.transport_spec.fabric = fabric_;
  EXPECT_THAT(Agent::Create(std::move(o)),
              StatusIs(StatusCode::kAlreadyExists, HasSubstr("transport_spec (loopback)")));
}

TEST_F(TransportSpecTest, AReadyMadeTransportWins) {
  AgentOptions o = Options(Role::kCtx, ctx_pool_);
  o.transport_spec.kind = "no such transport";
  o.transport = *NewLoopbackTransport(fabric_, "given");
  auto agent = Agent::Create(std::move(o));
  ASSERT_THAT(agent, IsOk());
  EXPECT_EQ((*agent)->Address(), "loopback:given");
}

TEST_F(TransportSpecTest, UcxSpecGetsTheWorkersAfterTheEnvironment) {
  std::vector<UcxTransportOptions> made;
  AgentHooks hooks;
  hooks.make_ucx_transport =
      [&](const UcxTransportOptions& options) -> Result<std::unique_ptr<Transport>> {
    made.push_back(options);
    return NewLoopbackTransport(fabric_, "ucx-stand-in-" + std::to_string(made.size()));
  };
  auto options = [&] {
    AgentOptions o = Options(Role::kCtx, ctx_pool_);
    o.transport_spec.kind = "ucx";
    o.transport_spec.listen_address = "0.0.0.0:4711";
    o.transport_spec.put_chunk_bytes = 256 << 10;
    o.transport_spec.same_host_shared_memory = false;
    o.connect_timeout = milliseconds(1234);
    o.config.num_workers = 2;
    return o;
  };
  {
    ScopedEnv env("KVBOUNCE_NUM_WORKERS", "3");
    ASSERT_THAT(CreateAgent(options(), hooks), IsOk());
  }
  ASSERT_EQ(made.size(), 1u);
  EXPECT_EQ(made[0].num_workers, 3);  // the override reached the transport
  EXPECT_EQ(made[0].listen_address, "0.0.0.0:4711");
  EXPECT_EQ(made[0].put_chunk_bytes, uint64_t{256} << 10);
  EXPECT_FALSE(made[0].same_host_shared_memory);
  EXPECT_EQ(made[0].connect_timeout, milliseconds(1234));
  {
    ScopedEnv env("KVBOUNCE_NUM_WORKERS", "0");  // invalid: ignored
    ASSERT_THAT(CreateAgent(options(), hooks), IsOk());
  }
  ASSERT_EQ(made.size(), 2u);
  EXPECT_EQ(made[1].num_workers, 2);

  // The factory's error reaches the caller, naming the spec.
  hooks.make_ucx_transport = [](const UcxTransportOptions&) -> Result<std::unique_ptr<Transport>> {
    return UnavailableError("cannot listen");
  };
  EXPECT_THAT(CreateAgent(options(), hooks),
              StatusIs(StatusCode::kUnavailable, HasSubstr("transport_spec (ucx)")));
}

TEST_F(TransportSpecTest, UcxSpecWorksEndToEnd) {
  if (!UcxTransportAvailable()) GTEST_SKIP() << "this build has no UCX transport";
  for (size_t i = 0; i < ctx_pool_.size(); ++i) ctx_pool_[i] = static_cast<std::byte>(i * 5 + 3);
  AgentOptions c = Options(Role::kCtx, ctx_pool_);
  c.transport_spec.kind = "ucx";  // listens on 127.0.0.1, a free port
  c.config.bounce_size_mb = 1;
  AgentOptions g = Options(Role::kGen, gen_pool_);
  g.transport_spec.kind = "ucx";
  g.config.bounce_size_mb = 1;
  auto ctx = Agent::Create(std::move(c));
  ASSERT_THAT(ctx, IsOk());
  auto gen = Agent::Create(std::move(g));
  ASSERT_THAT(gen, IsOk());
  const std::vector<std::string> address = {(*ctx)->Address()};
  ASSERT_THAT((*gen)->Connect(address), IsOk());
  // Every path, auto included: the bytes arrive (direct: the gen agent reads
  // the ctx agent's blocks, both being on this host).
  uint64_t id = 1;
  for (TransferPath path : {TransferPath::kPerBlock, TransferPath::kBounce, TransferPath::kDirect,
                            TransferPath::kAuto}) {
    SCOPED_TRACE(std::string(TransferPathName(path)));
    std::fill(gen_pool_.begin(), gen_pool_.end(), std::byte{0});
    const std::vector<int32_t> ctx_table = {3, 0, 2, 1};
    const std::vector<int32_t> gen_table = {1, 2, 0, 3};
    auto published = (*ctx)->Publish(id, ctx_table, 128);
    ASSERT_THAT(published, IsOk());
    PullOptions options;
    options.path = path;
    auto pull = (*gen)->Pull(id, "ctx0", gen_table, {0, 128}, options);
    ASSERT_THAT(pull, IsOk());
    ASSERT_THAT((*pull)->Wait(), IsOk());
    EXPECT_THAT((*published)->Wait(), IsOk());
    if (path != TransferPath::kAuto) {
      EXPECT_EQ((*pull)->info().path_taken, path);
    }
    for (size_t b = 0; b < 4; ++b) {
      const std::byte* from = ctx_pool_.data() + static_cast<size_t>(ctx_table[b]) * kBlockBytes;
      const std::byte* to = gen_pool_.data() + static_cast<size_t>(gen_table[b]) * kBlockBytes;
      EXPECT_EQ(std::memcmp(from, to, kBlockBytes), 0) << "block " << b;
    }
    ++id;
  }
}

// --- `auto` over real agents: the receiver prices each path with its
//     connections' and copy engine's figures and the config's overrides.

// A loopback transport whose connections cannot map or read peer memory (as
// UCX between hosts): every call is forwarded; PeerCaps says map_remote and
// read_remote false
// and, when `peer_op_us` is set, that a write op costs that much. Caps()
// (the transport as a whole) says what loopback says unless `caps_too`.
class UnmappedTransport final : public Transport {
 public:
  explicit UnmappedTransport(std::unique_ptr<Transport> inner, bool caps_too = true,
                             double peer_op_us = 0)
      : inner_(std::move(inner)), caps_too_(caps_too), peer_op_us_(peer_op_us) {}
  TransportCaps Caps() const override {
    TransportCaps caps = inner_->Caps();
    if (caps_too_) caps.map_remote = caps.read_remote = false;
    return caps;
  }
  Result<TransportCaps> PeerCaps(PeerId peer) const override {
    KVB_ASSIGN_OR_RETURN(TransportCaps caps, inner_->PeerCaps(peer));
    caps.map_remote = caps.read_remote = false;
    if (peer_op_us_ > 0) caps.cost.op_us = peer_op_us_;
    return caps;
  }
  std::string Address() const override { return inner_->Address(); }
  Status Start(TransportCallbacks callbacks) override {
    return inner_->Start(std::move(callbacks));
  }
  Result<PeerId> Connect(std::string_view address) override { return inner_->Connect(address); }
  Status Send(PeerId peer, std::span<const std::byte> frame) override {
    return inner_->Send(peer, frame);
  }
  Result<std::unique_ptr<LocalRegion>> Register(Addr address, uint64_t bytes,
                                                MemoryKind kind) override {
    return inner_->Register(address, bytes, kind);
  }
  Result<std::unique_ptr<RemoteRegion>> Import(PeerId peer, const RegionInfo& info) override {
    return inner_->Import(peer, info);
  }
  using Transport::Write;
  Status Write(const LocalRegion& source, const RemoteRegion& target, std::span<const WriteOp> ops,
               TransportDone done, std::stop_token stop) override {
    return inner_->Write(source, target, ops, std::move(done), std::move(stop));
  }
  Result<std::unique_ptr<MappedAccess>> BeginMappedAccess(const RemoteRegion&) override {
    return UnimplementedError("unmapped transport");
  }
  Status Flush(PeerId peer, TransportDone done) override {
    return inner_->Flush(peer, std::move(done));
  }
  void Disconnect(PeerId peer, const Status& reason) override { inner_->Disconnect(peer, reason); }
  void Shutdown() override { inner_->Shutdown(); }
  TransportStats Stats() const override { return inner_->Stats(); }

 private:
  std::unique_ptr<Transport> inner_;
  const bool caps_too_;
  const double peer_op_us_;
};

class AutoPathTest : public TransportSpecTest {
 protected:
  // Connects a ctx and a gen agent with `gen_config`, both with 1 MiB
  // arenas; `mapped`: on plain loopback transports (direct available), else
  // on UnmappedTransports.
  void Connect(Config gen_config, bool mapped, bool caps_too = true, double peer_op_us = 0) {
    auto transport = [&](const char* name) -> std::unique_ptr<Transport> {
      std::unique_ptr<Transport> t = *NewLoopbackTransport(fabric_, name);
      if (mapped) return t;
      return std::make_unique<UnmappedTransport>(std::move(t), caps_too, peer_op_us);
    };
    AgentOptions c = Options(Role::kCtx, ctx_pool_);
    c.config.bounce_size_mb = 1;
    c.transport = transport("ctx");
    AgentOptions g = Options(Role::kGen, gen_pool_);
    gen_config.bounce_size_mb = 1;
    g.config = gen_config;
    g.transport = transport("gen");
    ctx_ = *Agent::Create(std::move(c));
    gen_ = *Agent::Create(std::move(g));
    const std::vector<std::string> address = {ctx_->Address()};
    ASSERT_THAT(gen_->Connect(address), IsOk());
  }

  // Moves 4 blocks (scattered, so 4 runs) and returns the path auto took.
  TransferPath RunAuto(uint64_t id) {
    const std::vector<int32_t> ctx_table = {3, 1, 2, 0};
    const std::vector<int32_t> gen_table = {0, 2, 1, 3};
    auto published = ctx_->Publish(id, ctx_table, 128);
    auto pull = gen_->Pull(id, "ctx0", gen_table, {0, 128});
    EXPECT_THAT(pull, IsOk());
    if (!pull.ok()) return TransferPath::kAuto;
    EXPECT_THAT((*pull)->Wait(), IsOk());
    EXPECT_THAT((*published)->Wait(), IsOk());
    EXPECT_EQ((*pull)->info().path_requested, TransferPath::kAuto);
    return (*pull)->info().path_taken;
  }

  std::unique_ptr<Agent> ctx_;
  std::unique_ptr<Agent> gen_;
};

TEST_F(AutoPathTest, LoopbackTakesDirect) {
  Connect(Config(), /*mapped=*/true);
  EXPECT_EQ(RunAuto(1), TransferPath::kDirect);
}

TEST_F(AutoPathTest, ASlowCopyEngineMakesItWrite) {
  Config config;
  config.copy_mb_per_s = 1;  // the copy engine is said to move 1 byte per µs
  Connect(config, /*mapped=*/true);
  EXPECT_EQ(RunAuto(1), TransferPath::kPerBlock);
}

TEST_F(AutoPathTest, CopiesOnTheControlLoopMakeASmallRequestBounceOverACheapLink) {
  // A 16 KiB request over a link of 2 µs per op, with the default inline
  // limit (64 KiB): the gather and the scatter cost no step, so bounce's
  // 2 ops, 2 steps and two passes at 20 GB/s (~1.6 µs; a stated rate, not
  // the machine's measured one) beat per-block's 5 ops and 2 steps.
  Config cheap;
  cheap.transport_op_ns = 2000;
  cheap.copy_mb_per_s = 20000;
  ASSERT_GE(cheap.inline_copy_kb, 16);
  Connect(cheap, /*mapped=*/false);
  EXPECT_EQ(RunAuto(1), TransferPath::kBounce);
  // A limit below the request's bytes brings the steps back.
  Config limited = cheap;
  limited.inline_copy_kb = 8;
  ctx_.reset();
  gen_.reset();
  Connect(limited, /*mapped=*/false);
  EXPECT_EQ(RunAuto(2), TransferPath::kPerBlock);
}

TEST_F(AutoPathTest, WithoutMappingACostlyLinkBounces) {
  // Four runs: per-block pays 5 ops and 2 steps, bounce 2 ops and 4 steps
  // plus two passes over 16 KiB.
  Config costly;
  costly.transport_op_ns = 100000;  // 100 µs per write op
  Connect(costly, /*mapped=*/false);
  EXPECT_EQ(RunAuto(1), TransferPath::kBounce);
}

TEST_F(AutoPathTest, EachConnectionsOwnCapsDecide) {
  // The transports as a whole say "loopback" (map_remote, 0.05 µs per op);
  // their connections say no mapping and 100 µs per op: the receiver prices
  // the connection, so it bounces.
  Connect(Config(), /*mapped=*/false, /*caps_too=*/false, /*peer_op_us=*/100);
  EXPECT_EQ(RunAuto(1), TransferPath::kBounce);
  PullOptions direct;
  direct.path = TransferPath::kDirect;
  EXPECT_THAT(gen_->Pull(2, "ctx0", std::vector<int32_t>{0, 1, 2, 3}, {0, 128}, direct),
              StatusIs(StatusCode::kUnimplemented));
}

TEST_F(AutoPathTest, WithoutMappingACheapLinkWrites) {
  // Per-block pays 5 ops of 1 µs and 2 steps; bounce 2 ops and 4 steps,
  // since its gather and scatter go to copy workers here.
  Config cheap;
  cheap.transport_op_ns = 1000;  // 1 µs per write op
  cheap.inline_copy_kb = 0;
  Connect(cheap, /*mapped=*/false);
  EXPECT_EQ(RunAuto(1), TransferPath::kPerBlock);
  // A forced direct is refused: the writer cannot map this pool.
  PullOptions direct;
  direct.path = TransferPath::kDirect;
  EXPECT_THAT(gen_->Pull(2, "ctx0", std::vector<int32_t>{0, 1, 2, 3}, {0, 128}, direct),
              StatusIs(StatusCode::kUnimplemented, HasSubstr("cannot")));
}

}  // namespace
}  // namespace kvbounce
