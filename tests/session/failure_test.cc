// Failure paths of the sessions: each test checks that every request settles
// exactly once, that the application sees the right outcome and reason, and
// that no staging byte stays outstanding.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <random>
#include <thread>

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

// ctx TP2 -> gen TP1: two writers fan into one receiver.
ClusterOptions FanIn(int64_t tokens = 64) {
  ClusterOptions o;
  const ModelShape model = *CustomModel(4, 4, 32, false);
  o.ctx = {model, DType::kBf16, 2, 1, {}, LayoutKind::kBlockMajorHnd, 16};
  o.gen = {model, DType::kBf16, 1, 1, {}, LayoutKind::kLayerMajorHnd, 16};
  o.max_tokens = tokens;
  o.slots = 2;
  o.faults = true;
  o.ctx_config.bounce_size_mb = 2;
  o.gen_config.bounce_size_mb = 2;
  o.grace = milliseconds(200);
  return o;
}

// Counts how often a transfer's completion callback runs.
struct Settlements {
  std::atomic<int> count{0};
  void Watch(Transfer& t) {
    t.OnDone([this](const Status&) { ++count; });
  }
};

// Waits until every agent's arenas are empty again (quarantined slots are
// released once their writers stop or the grace period passes).
bool ArenasDrain(Cluster& c, milliseconds limit = milliseconds(3000)) {
  const auto deadline = Clock::now() + limit;
  while (Clock::now() < deadline) {
    uint64_t outstanding = 0;
    for (int r = 0; r < c.num_ctx(); ++r) outstanding += c.ctx(r).Stats().arena_outstanding_bytes;
    for (int r = 0; r < c.num_gen(); ++r) outstanding += c.gen(r).Stats().arena_outstanding_bytes;
    if (outstanding == 0) return true;
    std::this_thread::sleep_for(milliseconds(5));
  }
  return false;
}

std::vector<std::shared_ptr<Transfer>> PublishAll(Cluster& c, uint64_t id, const BlockTables& t,
                                                  int64_t tokens) {
  std::vector<std::shared_ptr<Transfer>> out;
  for (int r = 0; r < c.num_ctx(); ++r) out.push_back(*c.ctx(r).Publish(id, t.ctx, tokens));
  return out;
}

// Failures every path must handle.
class FailureTest : public ::testing::TestWithParam<TransferPath> {
 protected:
  PullOptions Pull(milliseconds timeout = milliseconds(0)) const {
    PullOptions p;
    p.path = GetParam();
    p.timeout = timeout;
    return p;
  }
};

// Failures of writers that go through the transport (per-block, bounce),
// where the fault decorator can fail, delay and drop them; the direct path
// copies without the transport.
class TransportFailureTest : public FailureTest {};

TEST_P(TransportFailureTest, WriterFailureInFanInDrainsTheOtherWriter) {
  ClusterOptions o = FanIn();
  o.ctx_faults.write_fail_rate = 0;
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  ASSERT_THAT(c.ctx_faults(0)->SetOptions({.write_fail_rate = 1.0}), IsOk());
  ASSERT_THAT(c.ctx_faults(1)->SetOptions({.delay = std::chrono::microseconds(150000)}), IsOk());
  std::mt19937_64 rng(1);
  const BlockTables tables = c.Tables(0, 64, rng);
  auto published = PublishAll(c, 1, tables, 64);
  auto pull = c.gen(0).Pull(1, "ctx0", tables.gen, {0, 64}, Pull());
  ASSERT_THAT(pull, IsOk());
  Settlements settled;
  settled.Watch(**pull);
  const Status outcome = (*pull)->Wait();
  EXPECT_THAT(outcome, StatusIs(StatusCode::kUnavailable, HasSubstr("injected write failure")));
  EXPECT_THAT(std::string(outcome.message()), HasSubstr("ctx0 rank 0"));
  // The request settled only after the slow writer was drained: its job had
  // ended (stopped early or its delayed write done) and reported.
  const AgentStats slow = c.ctx(1).Stats();
  EXPECT_EQ(slow.requests_completed + slow.requests_cancelled + slow.requests_failed, 1u);
  EXPECT_EQ(c.gen(0).Stats().arena_outstanding_bytes, 0u);
  EXPECT_EQ(c.gen(0).Stats().requests_failed, 1u);
  EXPECT_EQ(settled.count.load(), 1);
  EXPECT_TRUE(ArenasDrain(c));
  EXPECT_EQ(c.ctx_faults(0)->fault_stats().failed_batches, 1u);
}

TEST_P(FailureTest, CancelBeforeTheKvIsPublished) {
  auto cluster = Cluster::Create(FanIn());
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(2);
  const BlockTables tables = c.Tables(0, 64, rng);
  auto pull = c.gen(0).Pull(7, "ctx0", tables.gen, {0, 64}, Pull());
  ASSERT_THAT(pull, IsOk());
  Settlements settled;
  settled.Watch(**pull);
  (*pull)->Cancel();
  (*pull)->Cancel();  // idempotent
  EXPECT_THAT((*pull)->Wait(),
              StatusIs(StatusCode::kCancelled, HasSubstr("cancelled by the application")));
  EXPECT_TRUE(ArenasDrain(c));
  // The writers heard of it: a later publication serves nobody and expires
  // only through Retire.
  auto published = PublishAll(c, 7, tables, 64);
  for (auto& p : published) EXPECT_FALSE(p->WaitFor(milliseconds(50)));
  for (int r = 0; r < c.num_ctx(); ++r) EXPECT_THAT(c.ctx(r).Retire(7), IsOk());
  for (auto& p : published) EXPECT_THAT(p->Wait(), StatusIs(StatusCode::kCancelled));
  EXPECT_EQ(settled.count.load(), 1);
  // Nothing reached the pool.
  const tools::VerifyResult v = c.VerifyGen(0, tables, {0, 0});
  EXPECT_EQ(v.mismatches, 0u) << v.first_mismatch;
  // And the agents go on working.
  c.ClearGen(1);
  const BlockTables next = c.Tables(1, 64, rng);
  EXPECT_THAT(c.RunRequest(8, next, {0, 64}, Pull()), IsOk());
  EXPECT_EQ(c.VerifyGen(0, next, {0, 64}).mismatches, 0u);
}

TEST_P(TransportFailureTest, CancelDuringTheTransfer) {
  auto cluster = Cluster::Create(FanIn());
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  for (int r = 0; r < 2; ++r) {
    ASSERT_THAT(c.ctx_faults(r)->SetOptions({.delay = std::chrono::microseconds(200000)}), IsOk());
  }
  std::mt19937_64 rng(3);
  const BlockTables tables = c.Tables(0, 64, rng);
  auto published = PublishAll(c, 9, tables, 64);
  auto pull = c.gen(0).Pull(9, "ctx0", tables.gen, {0, 64}, Pull());
  ASSERT_THAT(pull, IsOk());
  Settlements settled;
  settled.Watch(**pull);
  std::this_thread::sleep_for(milliseconds(50));
  const auto cancelled_at = Clock::now();
  (*pull)->Cancel();
  EXPECT_THAT((*pull)->Wait(), StatusIs(StatusCode::kCancelled));
  if (GetParam() == TransferPath::kBounce) {
    // Bounce settles at once: the writers can only reach the slot, which is
    // quarantined until they stop — and the pool was never written.
    EXPECT_LT(Clock::now() - cancelled_at, milliseconds(100));
    EXPECT_EQ(c.gen(0).Stats().quarantined_slots, 1u);
    const tools::VerifyResult v = c.VerifyGen(0, tables, {0, 0});
    EXPECT_EQ(v.mismatches, 0u) << v.first_mismatch;
  } else {
    // Per-block and direct writers write into the pool: the request settles
    // only once they stopped.
    EXPECT_GE(Clock::now() - cancelled_at, milliseconds(100));
  }
  EXPECT_TRUE(ArenasDrain(c));
  EXPECT_EQ(settled.count.load(), 1);
  EXPECT_EQ(c.gen(0).Stats().requests_cancelled, 1u);
}

TEST_P(FailureTest, TimeoutWhenTheKvNeverComes) {
  auto cluster = Cluster::Create(FanIn());
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(4);
  const BlockTables tables = c.Tables(0, 64, rng);
  const auto start = Clock::now();
  auto pull = c.gen(0).Pull(11, "ctx0", tables.gen, {0, 64}, Pull(milliseconds(100)));
  ASSERT_THAT(pull, IsOk());
  Settlements settled;
  settled.Watch(**pull);
  EXPECT_THAT((*pull)->Wait(), StatusIs(StatusCode::kDeadlineExceeded, HasSubstr("request 11")));
  EXPECT_GE(Clock::now() - start, milliseconds(100));
  EXPECT_LT(Clock::now() - start, milliseconds(2000));
  EXPECT_TRUE(ArenasDrain(c));
  EXPECT_EQ(c.gen(0).Stats().requests_timed_out, 1u);
  EXPECT_EQ(settled.count.load(), 1);
}

TEST_P(TransportFailureTest, PeerDisconnectFailsTheRequestAndFreesTheSlot) {
  auto cluster = Cluster::Create(FanIn());
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  // Writer 1's connection drops at its second write: the first request goes
  // through, the second loses the writer mid-transfer.
  ASSERT_THAT(c.ctx_faults(1)->SetOptions({.drop_after_ops = 1}), IsOk());
  std::mt19937_64 rng(5);
  const BlockTables first = c.Tables(0, 64, rng);
  ASSERT_THAT(c.RunRequest(12, first, {0, 64}, Pull()), IsOk());
  const BlockTables tables = c.Tables(1, 64, rng);
  auto published = PublishAll(c, 13, tables, 64);
  auto pull = c.gen(0).Pull(13, "ctx0", tables.gen, {0, 64}, Pull());
  ASSERT_THAT(pull, IsOk());
  Settlements settled;
  settled.Watch(**pull);
  const Status outcome = (*pull)->Wait();
  EXPECT_THAT(outcome, StatusIs(StatusCode::kUnavailable));
  EXPECT_THAT(std::string(outcome.message()), HasSubstr("ctx0 rank 1"));
  EXPECT_THAT(std::string(outcome.message()), HasSubstr("connection dropped"));
  EXPECT_TRUE(ArenasDrain(c));
  EXPECT_EQ(settled.count.load(), 1);
  EXPECT_EQ(c.ctx_faults(1)->fault_stats().dropped_connections, 1u);
  // The broken writer is gone: a new pull cannot start without it.
  EXPECT_THAT(c.gen(0).Pull(14, "ctx0", tables.gen, {0, 64}, Pull()),
              StatusIs(StatusCode::kFailedPrecondition, HasSubstr("ctx0 rank 1")));
  for (auto& p : published) p->Cancel();
}

TEST_P(TransportFailureTest, GenShutdownWithRequestsInFlight) {
  auto cluster = Cluster::Create(FanIn());
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  for (int r = 0; r < 2; ++r) {
    ASSERT_THAT(c.ctx_faults(r)->SetOptions({.delay = std::chrono::microseconds(100000)}), IsOk());
  }
  std::mt19937_64 rng(6);
  std::vector<std::shared_ptr<Transfer>> pulls;
  Settlements settled;
  for (uint64_t id = 20; id < 22; ++id) {
    const BlockTables tables = c.Tables(static_cast<int>(id % 2), 64, rng);
    PublishAll(c, id, tables, 64);
    auto pull = c.gen(0).Pull(id, "ctx0", tables.gen, {0, 64}, Pull());
    ASSERT_THAT(pull, IsOk());
    settled.Watch(**pull);
    pulls.push_back(*pull);
  }
  c.gen(0).Shutdown();
  for (auto& p : pulls) {
    ASSERT_TRUE(p->Poll().has_value());
    EXPECT_FALSE(p->Poll()->ok());
  }
  EXPECT_EQ(settled.count.load(), 2);
  EXPECT_EQ(c.gen(0).Stats().arena_outstanding_bytes, 0u);
  EXPECT_THAT(c.gen(0).Pull(30, "ctx0", {}, {0, 1}, Pull()), StatusIs(StatusCode::kAborted));
}

TEST_P(FailureTest, CtxShutdownFailsThePullsItServes) {
  auto cluster = Cluster::Create(FanIn());
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(7);
  const BlockTables tables = c.Tables(0, 64, rng);
  auto pull = c.gen(0).Pull(40, "ctx0", tables.gen, {0, 64}, Pull());  // parked on ctx
  ASSERT_THAT(pull, IsOk());
  Settlements settled;
  settled.Watch(**pull);
  std::this_thread::sleep_for(milliseconds(20));
  c.ctx(1).Shutdown();
  const Status outcome = (*pull)->Wait();
  EXPECT_FALSE(outcome.ok());
  EXPECT_THAT(std::string(outcome.message()), HasSubstr("ctx0 rank 1"));
  EXPECT_TRUE(ArenasDrain(c));
  EXPECT_EQ(settled.count.load(), 1);
}

std::string PathName(const ::testing::TestParamInfo<TransferPath>& param) {
  std::string n(TransferPathName(param.param));
  n.erase(std::remove(n.begin(), n.end(), '-'), n.end());
  return n;
}

INSTANTIATE_TEST_SUITE_P(Paths, FailureTest,
                         ::testing::Values(TransferPath::kPerBlock, TransferPath::kBounce,
                                           TransferPath::kDirect),
                         PathName);
INSTANTIATE_TEST_SUITE_P(Paths, TransportFailureTest,
                         ::testing::Values(TransferPath::kPerBlock, TransferPath::kBounce),
                         PathName);

// Arena exhaustion. FanIn(512): each writer streams 512 KiB per request, the
// receiver's fan-in slot is 1 MiB.
struct Bounced {
  std::vector<BlockTables> tables;
  std::vector<std::shared_ptr<Transfer>> pulls;
};

Bounced PullMany(Cluster& c, int n, int64_t tokens, std::mt19937_64& rng) {
  Bounced b;
  PullOptions bounce;
  bounce.path = TransferPath::kBounce;
  for (int i = 0; i < n; ++i) {
    b.tables.push_back(c.Tables(i, tokens, rng));
    PublishAll(c, static_cast<uint64_t>(i + 1), b.tables.back(), tokens);
  }
  for (int i = 0; i < n; ++i) {
    b.pulls.push_back(*c.gen(0).Pull(static_cast<uint64_t>(i + 1), "ctx0",
                                     b.tables[static_cast<size_t>(i)].gen, {0, tokens}, bounce));
  }
  for (auto& p : b.pulls) EXPECT_THAT(p->Wait(), IsOk());
  for (size_t i = 0; i < b.tables.size(); ++i) {
    const tools::VerifyResult v = c.VerifyGen(0, b.tables[i], {0, tokens});
    EXPECT_EQ(v.mismatches, 0u) << v.first_mismatch;
  }
  return b;
}

TEST(ArenaExhaustionTest, BackpressureWaitsForASlot) {
  ClusterOptions o = FanIn(512);
  o.gen_config.bounce_size_mb = 1;
  o.gen_config.reserve_timeout_ms = 5000;
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  for (int r = 0; r < 2; ++r) {
    ASSERT_THAT(c.ctx_faults(r)->SetOptions({.delay = std::chrono::microseconds(60000)}), IsOk());
  }
  std::mt19937_64 rng(8);
  const Bounced b = PullMany(c, 2, 512, rng);
  // The second waited for the first's slot, then bounced too.
  for (const auto& p : b.pulls) {
    EXPECT_EQ(p->info().path_taken, TransferPath::kBounce);
    EXPECT_EQ(p->info().fallback_reason, "");
  }
  EXPECT_GE(b.pulls[1]->info().latency, milliseconds(110));
  EXPECT_TRUE(ArenasDrain(c));
}

TEST(ArenaExhaustionTest, FullArenaFallsBackAfterTheReserveTimeout) {
  ClusterOptions o = FanIn(512);
  o.gen_config.bounce_size_mb = 1;
  o.gen_config.reserve_timeout_ms = 30;
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  for (int r = 0; r < 2; ++r) {
    ASSERT_THAT(c.ctx_faults(r)->SetOptions({.delay = std::chrono::microseconds(150000)}), IsOk());
  }
  std::mt19937_64 rng(9);
  const Bounced b = PullMany(c, 2, 512, rng);
  EXPECT_EQ(b.pulls[0]->info().path_taken, TransferPath::kBounce);
  EXPECT_EQ(b.pulls[1]->info().path_taken, TransferPath::kPerBlock);
  EXPECT_EQ(b.pulls[1]->info().fallback_reason, "recv arena backpressure");
  EXPECT_EQ(c.gen(0).Stats().fallbacks, 1u);
  EXPECT_TRUE(ArenasDrain(c));
}

TEST(ArenaExhaustionTest, RequestLargerThanTheArenaFallsBackAtOnce) {
  ClusterOptions o = FanIn(1100);  // 2 x 550 KiB > 1 MiB
  o.gen_config.bounce_size_mb = 1;
  o.gen_config.reserve_timeout_ms = 10000;  // would show if it waited
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(10);
  const BlockTables tables = c.Tables(0, 1100, rng);
  PullOptions bounce;
  bounce.path = TransferPath::kBounce;
  std::vector<TransferInfo> infos;
  const auto start = Clock::now();
  ASSERT_THAT(c.RunRequest(1, tables, {0, 1100}, bounce, &infos), IsOk());
  EXPECT_LT(Clock::now() - start, milliseconds(5000));
  EXPECT_EQ(infos[0].fallback_reason, "request larger than arena");
  EXPECT_EQ(infos[0].path_taken, TransferPath::kPerBlock);
  EXPECT_EQ(c.VerifyGen(0, tables, {0, 1100}).mismatches, 0u);
}

TEST(ArenaExhaustionTest, SendArenaBackpressureWritesFromThePool) {
  ClusterOptions o = FanIn(512);
  o.ctx_config.bounce_size_mb = 1;  // two 512 KiB send slots per writer
  o.ctx_config.reserve_timeout_ms = 0;
  o.gen_config.bounce_size_mb = 4;
  o.slots = 3;
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  for (int r = 0; r < 2; ++r) {
    ASSERT_THAT(c.ctx_faults(r)->SetOptions({.delay = std::chrono::microseconds(100000)}), IsOk());
  }
  std::mt19937_64 rng(11);
  const Bounced b = PullMany(c, 3, 512, rng);
  // The receiver still bounced (and scattered) every request; one writer-side
  // stream went from the pool straight into the recv slot.
  for (const auto& p : b.pulls) EXPECT_EQ(p->info().path_taken, TransferPath::kBounce);
  EXPECT_GE(c.ctx(0).Stats().fallbacks + c.ctx(1).Stats().fallbacks, 2u);
  EXPECT_THAT(c.ctx(0).Stats().json, HasSubstr("send arena backpressure"));
  EXPECT_TRUE(ArenasDrain(c));
}

}  // namespace
}  // namespace kvbounce
