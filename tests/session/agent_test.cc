// The Agent API as an application sees it: construction errors, bad
// requests, the publication lifecycle, the perf log, shutdown.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <functional>
#include <limits>

#include "common/status_matchers.h"
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
  o.transport.reset();
  EXPECT_THAT(Agent::Create(std::move(o)),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("transport")));
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
  o.pool.memory = MemoryKind::kCuda;
  EXPECT_THAT(Agent::Create(std::move(o)), StatusIs(StatusCode::kUnimplemented, HasSubstr("cuda")));
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
  EXPECT_FALSE((*published)->WaitFor(milliseconds(30)));  // gen rank 1 still to come
  auto second = c.gen(1).Pull(5, "ctx0", t.gen, {0, 16});
  ASSERT_THAT((*second)->Wait(), IsOk());
  EXPECT_THAT((*published)->Wait(), IsOk());
  EXPECT_EQ((*published)->info().bytes, (*first)->info().bytes + (*second)->info().bytes);
}

TEST(AgentRequestTest, PublicationExpiresAfterItsTtl) {
  auto cluster = Cluster::Create(Small());
  ASSERT_THAT(cluster, IsOk());
  PublishOptions ttl;
  ttl.ttl = milliseconds(50);
  auto published = (*cluster)->ctx(0).Publish(6, std::vector<int32_t>{0, 1, 2, 3}, 16, ttl);
  ASSERT_THAT(published, IsOk());
  EXPECT_THAT((*published)->Wait(), StatusIs(StatusCode::kDeadlineExceeded, HasSubstr("expired")));
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
