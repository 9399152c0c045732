// Failure paths of the sessions: each test checks that every request settles
// exactly once, that the application sees the right outcome and reason, and
// that no staging byte stays outstanding.
//
// Nothing here is proved by sleeping. The agents' timers run on a manual
// clock that the tests advance (a deadline "not yet" is checked at 99 ms, and
// "now" at 100 ms); writes in flight are held in the fault decorator until a
// test releases them; and "X has happened on that agent" is awaited, never
// assumed after a pause.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "common/clock.h"
#include "common/status_matchers.h"
#include "tools/cluster.h"

namespace kvbounce {
namespace {

using std::chrono::milliseconds;
using ::testing::AllOf;
using ::testing::HasSubstr;
using testing_util::IsOk;
using testing_util::StatusIs;
using tools::BlockTables;
using tools::Cluster;
using tools::ClusterOptions;

// "Never" for a wait on something that must happen.
constexpr milliseconds kLong(30000);

// ctx TP2 -> gen TP1: two writers fan into one receiver. Every agent's
// timers run on `clock` (when given). The writers' bounce gathers into send
// slots and writes them (bounce_gather_mapped = 0): these cases hold and
// fail the transport's writes and fill its send arenas, which a gather
// straight into the mapped recv slot would bypass (streaming_test and
// settle_safety_test cover that one).
ClusterOptions FanIn(int64_t tokens = 64, std::shared_ptr<ManualClock> clock = nullptr) {
  ClusterOptions o;
  const ModelShape model = *CustomModel(4, 4, 32, false);
  o.ctx = {model, DType::kBf16, 2, 1, {}, LayoutKind::kBlockMajorHnd, 16};
  o.gen = {model, DType::kBf16, 1, 1, {}, LayoutKind::kLayerMajorHnd, 16};
  o.max_tokens = tokens;
  o.slots = 2;
  o.faults = true;
  o.ctx_config.bounce_size_mb = 2;
  o.gen_config.bounce_size_mb = 2;
  o.ctx_config.bounce_gather_mapped = 0;
  o.grace = milliseconds(200);
  o.ctx_hooks.clock = clock;
  o.gen_hooks.clock = clock;
  return o;
}

// Polls `pred` until it holds or `limit` passed: for something that must
// happen, not a pause.
template <typename Pred>
bool WaitUntil(Pred pred, milliseconds limit = kLong) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(milliseconds(1));
  }
  return true;
}

// One of an agent's metrics counters (AgentStats::json "counters").
uint64_t CounterOf(Agent& agent, const char* name) {
  return nlohmann::json::parse(agent.Stats().json)["counters"][name].get<uint64_t>();
}

// Control frames the agent's transport delivered so far.
uint64_t MessagesReceived(Agent& agent) {
  return nlohmann::json::parse(agent.Stats().json)["transport"]["messages_received"]
      .get<uint64_t>();
}

// Returns once every task posted to the agent's control thread before the
// call has run (any call that runs there does: ReceiverCount is one).
void SyncLoop(Agent& agent) { agent.ReceiverCount("no such instance").status().IgnoreError(); }

// Holds every write of the ctx ranks in their fault decorators.
void HoldCtxWrites(Cluster& c) {
  for (int r = 0; r < c.num_ctx(); ++r) c.ctx_faults(r)->HoldWrites();
}
void ReleaseCtxWrites(Cluster& c) {
  for (int r = 0; r < c.num_ctx(); ++r) c.ctx_faults(r)->ReleaseWrites();
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
bool ArenasDrain(Cluster& c) {
  return WaitUntil([&] {
    uint64_t outstanding = 0;
    for (int r = 0; r < c.num_ctx(); ++r) outstanding += c.ctx(r).Stats().arena_outstanding_bytes;
    for (int r = 0; r < c.num_gen(); ++r) outstanding += c.gen(r).Stats().arena_outstanding_bytes;
    return outstanding == 0;
  });
}

std::vector<std::shared_ptr<Transfer>> PublishAll(Cluster& c, uint64_t id, const BlockTables& t,
                                                  int64_t tokens, PublishOptions options = {}) {
  std::vector<std::shared_ptr<Transfer>> out;
  for (int r = 0; r < c.num_ctx(); ++r) {
    out.push_back(*c.ctx(r).Publish(id, t.ctx, tokens, options));
  }
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
  c.ctx_faults(1)->HoldWrites();  // the slow writer: its write stays on the wire
  std::mt19937_64 rng(1);
  const BlockTables tables = c.Tables(0, 64, rng);
  // Writer 1 is published first and its write is held before writer 0, the
  // failing one, may start: the failure always finds writer 1 in flight.
  auto published_1 = c.ctx(1).Publish(1, tables.ctx, 64);
  ASSERT_THAT(published_1, IsOk());
  auto pull = c.gen(0).Pull(1, "ctx0", tables.gen, {0, 64}, Pull());
  ASSERT_THAT(pull, IsOk());
  Settlements settled;
  settled.Watch(**pull);
  std::atomic<bool> released{false};
  std::atomic<bool> settled_before_release{false};
  (*pull)->OnDone([&](const Status&) { settled_before_release = !released.load(); });
  ASSERT_TRUE(c.ctx_faults(1)->WaitForHeldWrites(1, kLong));
  auto published_0 = c.ctx(0).Publish(1, tables.ctx, 64);
  ASSERT_THAT(published_0, IsOk());
  // The receiver heard of writer 0's failure (and cancelled writer 1) while
  // writer 1's write is still held: the request must wait for it.
  ASSERT_TRUE(WaitUntil([&] { return CounterOf(c.gen(0), "cancels_sent") >= 1; }));
  SyncLoop(c.gen(0));
  EXPECT_FALSE((*pull)->Poll().has_value());
  released = true;
  c.ctx_faults(1)->ReleaseWrites();
  const Status outcome = (*pull)->Wait();
  EXPECT_FALSE(settled_before_release.load());
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
  auto clock = std::make_shared<ManualClock>();
  auto cluster = Cluster::Create(FanIn(64, clock));
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
  // The writers heard of it: a later publication serves nobody, so it lives
  // until its ttl and then expires with no receiver served.
  PublishOptions ttl;
  ttl.ttl = milliseconds(1000);
  auto published = PublishAll(c, 7, tables, 64, ttl);
  clock->Advance(milliseconds(999));
  for (auto& p : published) EXPECT_FALSE(p->Poll().has_value());
  clock->Advance(milliseconds(1));
  for (auto& p : published) {
    EXPECT_THAT(p->Wait(), StatusIs(StatusCode::kDeadlineExceeded, HasSubstr("with 0 of")));
  }
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
  // A manual clock: the grace period never disconnects the held writers.
  auto clock = std::make_shared<ManualClock>();
  auto cluster = Cluster::Create(FanIn(64, clock));
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  HoldCtxWrites(c);
  std::mt19937_64 rng(3);
  const BlockTables tables = c.Tables(0, 64, rng);
  auto published = PublishAll(c, 9, tables, 64);
  auto pull = c.gen(0).Pull(9, "ctx0", tables.gen, {0, 64}, Pull());
  ASSERT_THAT(pull, IsOk());
  Settlements settled;
  settled.Watch(**pull);
  std::atomic<bool> released{false};
  std::atomic<bool> settled_while_held{false};
  (*pull)->OnDone([&](const Status&) { settled_while_held = !released.load(); });
  // Both writers' writes are on the wire (held).
  for (int r = 0; r < 2; ++r) ASSERT_TRUE(c.ctx_faults(r)->WaitForHeldWrites(1, kLong));
  (*pull)->Cancel();
  if (GetParam() == TransferPath::kBounce) {
    // Bounce settles at once: the writers can only reach the slot, which is
    // quarantined until they stop — and the pool was never written.
    ASSERT_TRUE((*pull)->WaitFor(kLong));
    EXPECT_TRUE(settled_while_held.load());
    EXPECT_THAT(*(*pull)->Poll(), StatusIs(StatusCode::kCancelled));
    EXPECT_EQ(c.gen(0).Stats().quarantined_slots, 1u);
    EXPECT_GT(c.gen(0).Stats().arena_outstanding_bytes, 0u);  // quarantined
    const tools::VerifyResult v = c.VerifyGen(0, tables, {0, 0});
    EXPECT_EQ(v.mismatches, 0u) << v.first_mismatch;
    released = true;
    ReleaseCtxWrites(c);
  } else {
    // Per-block and direct writers write into the pool: the request settles
    // only once they stopped, which the held writes cannot before release.
    SyncLoop(c.gen(0));  // the cancel was handled: CANCELs sent, nothing settled
    EXPECT_FALSE((*pull)->Poll().has_value());
    released = true;
    ReleaseCtxWrites(c);
    EXPECT_THAT((*pull)->Wait(), StatusIs(StatusCode::kCancelled));
    EXPECT_FALSE(settled_while_held.load());
  }
  EXPECT_TRUE(ArenasDrain(c));
  EXPECT_EQ(settled.count.load(), 1);
  EXPECT_EQ(c.gen(0).Stats().requests_cancelled, 1u);
}

TEST_P(FailureTest, TimeoutWhenTheKvNeverComes) {
  auto clock = std::make_shared<ManualClock>();
  auto cluster = Cluster::Create(FanIn(64, clock));
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(4);
  const BlockTables tables = c.Tables(0, 64, rng);
  auto pull = c.gen(0).Pull(11, "ctx0", tables.gen, {0, 64}, Pull(milliseconds(100)));
  ASSERT_THAT(pull, IsOk());
  Settlements settled;
  settled.Watch(**pull);
  // Advance returns once the agents' loops caught up with the new time.
  clock->Advance(milliseconds(99));
  EXPECT_FALSE((*pull)->Poll().has_value());
  clock->Advance(milliseconds(1));
  EXPECT_THAT((*pull)->Wait(), StatusIs(StatusCode::kDeadlineExceeded, HasSubstr("request 11")));
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
  // The broken writer is gone: a new pull cannot start without it, and the
  // refusal says why (what the connection died of) and what to do.
  EXPECT_THAT(c.gen(0).Pull(14, "ctx0", tables.gen, {0, 64}, Pull()),
              StatusIs(StatusCode::kFailedPrecondition,
                       AllOf(HasSubstr("not connected to writer ctx0 rank 1"),
                             HasSubstr("its connection was lost: UNAVAILABLE"),
                             HasSubstr("connection dropped"), HasSubstr("connect to it again"))));
  EXPECT_THAT(c.gen(0).Paths("ctx0"),
              StatusIs(StatusCode::kFailedPrecondition, HasSubstr("its connection was lost")));
  for (auto& p : published) p->Cancel();
}

TEST_P(TransportFailureTest, GenShutdownWithRequestsInFlight) {
  auto cluster = Cluster::Create(FanIn());
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  HoldCtxWrites(c);  // the requests stay in flight until the shutdown
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
  const uint64_t before = MessagesReceived(c.ctx(1));
  auto pull = c.gen(0).Pull(40, "ctx0", tables.gen, {0, 64}, Pull());  // parked on ctx
  ASSERT_THAT(pull, IsOk());
  Settlements settled;
  settled.Watch(**pull);
  // The KV_REQUEST reached ctx rank 1 (its handling is queued ahead of
  // anything Shutdown does on the control thread).
  ASSERT_TRUE(WaitUntil([&] { return MessagesReceived(c.ctx(1)) > before; }));
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
// receiver's fan-in slot is 1 MiB. The writes are held, so the slots stay
// taken for as long as the test says; reserve timeouts run on the manual
// clock, so they fire exactly when the test advances it.
struct Bounced {
  std::vector<BlockTables> tables;
  std::vector<std::shared_ptr<Transfer>> pulls;
};

// Publishes and pulls `n` bounce requests; does not wait for them.
Bounced StartMany(Cluster& c, int n, int64_t tokens, std::mt19937_64& rng) {
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
  return b;
}

// Waits for every pull and checks the bytes.
void FinishMany(Cluster& c, const Bounced& b, int64_t tokens) {
  for (auto& p : b.pulls) EXPECT_THAT(p->Wait(), IsOk());
  for (size_t i = 0; i < b.tables.size(); ++i) {
    const tools::VerifyResult v = c.VerifyGen(0, b.tables[i], {0, tokens});
    EXPECT_EQ(v.mismatches, 0u) << v.first_mismatch;
  }
}

TEST(ArenaExhaustionTest, BackpressureWaitsForASlot) {
  auto clock = std::make_shared<ManualClock>();
  ClusterOptions o = FanIn(512, clock);
  o.gen_config.bounce_size_mb = 1;
  o.gen_config.reserve_timeout_ms = 5000;
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  HoldCtxWrites(c);
  std::mt19937_64 rng(8);
  const Bounced b = StartMany(c, 2, 512, rng);
  // The first holds the only slot (its writes are on the wire); the second
  // waits for it: its reserve timeout has not come.
  for (int r = 0; r < 2; ++r) ASSERT_TRUE(c.ctx_faults(r)->WaitForHeldWrites(1, kLong));
  clock->Advance(milliseconds(4999));
  EXPECT_FALSE(b.pulls[1]->Poll().has_value());
  EXPECT_EQ(b.pulls[1]->info().path_taken, TransferPath::kBounce);
  EXPECT_EQ(b.pulls[1]->info().fallback_reason, "");
  ReleaseCtxWrites(c);
  FinishMany(c, b, 512);
  // The second got the first's slot, then bounced too.
  for (const auto& p : b.pulls) {
    EXPECT_EQ(p->info().path_taken, TransferPath::kBounce);
    EXPECT_EQ(p->info().fallback_reason, "");
  }
  EXPECT_EQ(c.gen(0).Stats().fallbacks, 0u);
  EXPECT_TRUE(ArenasDrain(c));
}

TEST(ArenaExhaustionTest, FullArenaFallsBackAfterTheReserveTimeout) {
  auto clock = std::make_shared<ManualClock>();
  ClusterOptions o = FanIn(512, clock);
  o.gen_config.bounce_size_mb = 1;
  o.gen_config.reserve_timeout_ms = 30;
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  HoldCtxWrites(c);
  std::mt19937_64 rng(9);
  const Bounced b = StartMany(c, 2, 512, rng);
  for (int r = 0; r < 2; ++r) ASSERT_TRUE(c.ctx_faults(r)->WaitForHeldWrites(1, kLong));
  clock->Advance(milliseconds(29));
  EXPECT_EQ(b.pulls[1]->info().path_taken, TransferPath::kBounce);  // still waiting
  clock->Advance(milliseconds(1));
  EXPECT_EQ(b.pulls[1]->info().path_taken, TransferPath::kPerBlock);
  EXPECT_EQ(b.pulls[1]->info().fallback_reason, "recv arena backpressure");
  ReleaseCtxWrites(c);
  FinishMany(c, b, 512);
  EXPECT_EQ(b.pulls[0]->info().path_taken, TransferPath::kBounce);
  EXPECT_EQ(b.pulls[1]->info().path_taken, TransferPath::kPerBlock);
  EXPECT_EQ(c.gen(0).Stats().fallbacks, 1u);
  EXPECT_TRUE(ArenasDrain(c));
}

TEST(ArenaExhaustionTest, RequestLargerThanTheRecvArenaStreamsThroughIt) {
  // On a manual clock that nobody advances: a request that waited for
  // space (or a timeout) would never settle.
  auto clock = std::make_shared<ManualClock>();
  ClusterOptions o = FanIn(1100, clock);  // 2 writers x 1100 KiB > 1 MiB
  o.gen_config.bounce_size_mb = 1;
  o.gen_config.reserve_timeout_ms = 10000;
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(10);
  const BlockTables tables = c.Tables(0, 1100, rng);
  PullOptions bounce;
  bounce.path = TransferPath::kBounce;
  auto published = PublishAll(c, 1, tables, 1100);
  auto pull = c.gen(0).Pull(1, "ctx0", tables.gen, {0, 1100}, bounce);
  ASSERT_THAT(pull, IsOk());
  ASSERT_TRUE((*pull)->WaitFor(kLong));
  EXPECT_THAT(*(*pull)->Poll(), IsOk());
  EXPECT_EQ((*pull)->info().fallback_reason, "");
  EXPECT_EQ((*pull)->info().path_taken, TransferPath::kBounce);
  EXPECT_EQ(c.VerifyGen(0, tables, {0, 1100}).mismatches, 0u);
  // Chunks of half the arena (one per writer at once): three per writer.
  const AgentStats gen = c.gen(0).Stats();
  EXPECT_EQ(gen.chunks_granted, 6u);
  EXPECT_EQ(gen.chunks_scattered, 6u);
  EXPECT_LE(gen.arena_peak_bytes, MiB(1));
  EXPECT_EQ(c.ctx(0).Stats().chunks_written + c.ctx(1).Stats().chunks_written, 6u);
  for (auto& p : published) EXPECT_THAT(p->Wait(), IsOk());
  EXPECT_TRUE(ArenasDrain(c));
}

TEST(ArenaExhaustionTest, SendArenaBackpressureWritesFromThePool) {
  auto clock = std::make_shared<ManualClock>();
  ClusterOptions o = FanIn(512, clock);
  o.ctx_config.bounce_size_mb = 1;  // two 512 KiB send slots per writer
  o.ctx_config.reserve_timeout_ms = 0;
  o.gen_config.bounce_size_mb = 4;
  o.slots = 3;
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  HoldCtxWrites(c);
  std::mt19937_64 rng(11);
  const Bounced b = StartMany(c, 3, 512, rng);
  // Each writer's first two streams hold its send slots (their writes are
  // held); the third found none and writes from the pool (held too).
  for (int r = 0; r < 2; ++r) ASSERT_TRUE(c.ctx_faults(r)->WaitForHeldWrites(3, kLong));
  ReleaseCtxWrites(c);
  FinishMany(c, b, 512);
  // The receiver still bounced (and scattered) every request; one stream
  // per writer went from the pool straight into the recv slot.
  for (const auto& p : b.pulls) EXPECT_EQ(p->info().path_taken, TransferPath::kBounce);
  EXPECT_EQ(c.ctx(0).Stats().fallbacks, 1u);
  EXPECT_EQ(c.ctx(1).Stats().fallbacks, 1u);
  EXPECT_THAT(c.ctx(0).Stats().json, HasSubstr("send arena backpressure"));
  EXPECT_TRUE(ArenasDrain(c));
}

// Each writer's stream (4 MiB) is larger than its send arena (1 MiB): it
// streams through it in chunks of 256 KiB, two at a time, each written into
// the recv slot at its offset.
ClusterOptions StreamingFanIn() {
  ClusterOptions o = FanIn(4096);
  o.ctx_config.bounce_size_mb = 1;
  o.gen_config.bounce_size_mb = 16;
  return o;
}

// Publishes request `id` (tokens [0, 4096) on slot 0, fresh tables) on every
// ctx rank and pulls it by bounce on gen rank 0.
struct StreamingPull {
  BlockTables tables;
  std::vector<std::shared_ptr<Transfer>> published;
  std::shared_ptr<Transfer> pull;  // null: Pull failed (reported)
};
StreamingPull PullByBounce(Cluster& c, uint64_t id, std::mt19937_64& rng) {
  StreamingPull s;
  s.tables = c.Tables(0, 4096, rng);
  s.published = PublishAll(c, id, s.tables, 4096);
  PullOptions bounce;
  bounce.path = TransferPath::kBounce;
  auto pull = c.gen(0).Pull(id, "ctx0", s.tables.gen, {0, 4096}, bounce);
  EXPECT_THAT(pull, IsOk());
  if (pull.ok()) s.pull = *pull;
  return s;
}

TEST(SendStreamTest, AStreamLargerThanTheSendArenaGoesThroughItInChunks) {
  auto cluster = Cluster::Create(StreamingFanIn());
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  for (uint64_t id = 1; id <= 3; ++id) {
    std::mt19937_64 rng(id);
    c.ClearGen(0);
    const StreamingPull s = PullByBounce(c, id, rng);
    ASSERT_NE(s.pull, nullptr);
    ASSERT_THAT(s.pull->Wait(), IsOk());
    EXPECT_EQ(s.pull->info().path_taken, TransferPath::kBounce);
    EXPECT_EQ(s.pull->info().fallback_reason, "");
    const tools::VerifyResult v = c.VerifyGen(0, s.tables, {0, 4096});
    EXPECT_EQ(v.mismatches, 0u) << v.first_mismatch;
    for (auto& p : s.published) EXPECT_THAT(p->Wait(), IsOk());
  }
  for (int r = 0; r < 2; ++r) {
    // 16 chunks a request: one write each, no fallback.
    EXPECT_EQ(c.ctx(r).Stats().transport_write_ops, 3u * 16);
    EXPECT_EQ(c.ctx(r).Stats().fallbacks, 0u);
  }
  EXPECT_TRUE(ArenasDrain(c));
}

TEST(SendStreamTest, AFailedChunkFailsTheRequestAndFreesEverything) {
  auto cluster = Cluster::Create(StreamingFanIn());
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  FaultOptions faults;
  faults.write_fail_rate = 0.15;
  faults.seed = 5;
  for (int r = 0; r < 2; ++r) ASSERT_THAT(c.ctx_faults(r)->SetOptions(faults), IsOk());
  std::mt19937_64 rng(21);
  const StreamingPull failed = PullByBounce(c, 1, rng);
  ASSERT_NE(failed.pull, nullptr);
  const Status status = failed.pull->Wait();
  EXPECT_FALSE(status.ok());
  EXPECT_THAT(std::string(status.message()), HasSubstr("write of bytes"));
  // Every lane, the blocks and the recv slot are free again.
  for (auto& p : failed.published) p->Cancel();
  for (auto& p : failed.published) EXPECT_TRUE(p->WaitFor(kLong));
  EXPECT_TRUE(ArenasDrain(c));
  // The next request, without faults, streams through the same arena.
  for (int r = 0; r < 2; ++r) ASSERT_THAT(c.ctx_faults(r)->SetOptions({}), IsOk());
  c.ClearGen(0);
  const StreamingPull again = PullByBounce(c, 2, rng);
  ASSERT_NE(again.pull, nullptr);
  ASSERT_THAT(again.pull->Wait(), IsOk());
  EXPECT_EQ(c.VerifyGen(0, again.tables, {0, 4096}).mismatches, 0u);
  EXPECT_TRUE(ArenasDrain(c));
}

TEST(SendStreamTest, CancelMidStreamSettlesOnceAndFreesTheLanes) {
  auto clock = std::make_shared<ManualClock>();
  ClusterOptions o = StreamingFanIn();
  o.ctx_hooks.clock = clock;
  o.gen_hooks.clock = clock;
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  HoldCtxWrites(c);
  std::mt19937_64 rng(31);
  const StreamingPull s = PullByBounce(c, 1, rng);
  ASSERT_NE(s.pull, nullptr);
  Settlements settled;
  settled.Watch(*s.pull);
  // Both lanes of both writers have a chunk on the wire (held).
  for (int r = 0; r < 2; ++r) ASSERT_TRUE(c.ctx_faults(r)->WaitForHeldWrites(2, kLong));
  s.pull->Cancel();
  EXPECT_THAT(s.pull->Wait(), StatusIs(StatusCode::kCancelled));
  ReleaseCtxWrites(c);
  for (auto& p : s.published) p->Cancel();
  for (auto& p : s.published) EXPECT_TRUE(p->WaitFor(kLong));
  EXPECT_TRUE(ArenasDrain(c));
  EXPECT_EQ(settled.count.load(), 1);
  // Cancelled after two chunks each: no more were written.
  for (int r = 0; r < 2; ++r) EXPECT_EQ(c.ctx(r).Stats().transport_write_ops, 2u);
}

}  // namespace
}  // namespace kvbounce
