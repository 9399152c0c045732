// "Settled means settled" (docs/sessions.md): once a request settles — OK,
// failed, cancelled, timed out, retired, shut down — nothing of kvbounce
// reads or writes its blocks again. Each test holds an operation in flight
// deterministically (the fault decorator's HoldWrites, the loopback's write
// hook, a copy engine that parks its batches), settles the request some way,
// and checks that it settles only once the operation ended, that it does not
// report OK with data the application changed after a settle, and that the
// application's memory never changes after the settle.
//
// A few checks watch for a window in which nothing may happen (a
// publication must not settle while its write is held): those are
// deterministic with the fix — nothing can make the request settle while the
// operation is held — and the window only bounds how long an old bug would
// take to show.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "common/clock.h"
#include "common/status_matchers.h"
#include "session/holding_copy_engine.h"
#include "tools/cluster.h"

namespace kvbounce {
namespace {

using ::testing::HasSubstr;
using testing_util::HoldingCopyEngine;
using testing_util::IsOk;
using testing_util::StatusIs;
using tools::BlockTables;
using tools::Cluster;
using tools::ClusterOptions;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr milliseconds kLong(5000);  // "never" for a wait that must succeed

// One ctx rank -> one gen rank; the gen pool is layer-major so that a
// per-block batch has several operations.
ClusterOptions OneToOne(milliseconds grace = milliseconds(20)) {
  ClusterOptions o;
  const ModelShape model = *CustomModel(2, 2, 64, false);
  o.ctx = {model, DType::kBf16, 1, 1, {}, LayoutKind::kBlockMajorHnd, 16};
  o.gen = {model, DType::kBf16, 1, 1, {}, LayoutKind::kLayerMajorHnd, 16};
  o.max_tokens = 64;
  o.slots = 1;
  o.faults = true;
  o.ctx_config.bounce_size_mb = 1;
  o.gen_config.bounce_size_mb = 1;
  o.grace = grace;
  return o;
}

std::vector<std::byte> Snapshot(Cluster& c, bool ctx_side, int rank) {
  std::vector<std::byte> out;
  for (std::span<std::byte> s : c.PoolMemory(ctx_side, rank)) out.insert(out.end(), s.begin(), s.end());
  return out;
}

// The tail every test shares: from the pull's settle on, the gen pool never
// changes, not even while the ctx agent finishes whatever it still runs
// (its Shutdown returns only once none of its operations is left).
void ExpectGenPoolFrozen(Cluster& c) {
  const std::vector<std::byte> after = Snapshot(c, false, 0);
  c.ctx(0).Shutdown();
  EXPECT_TRUE(Snapshot(c, false, 0) == after) << "the gen pool changed after the pull settled";
}

// What an application does with blocks it got back: reuse them.
void Poison(Cluster& c, int ctx_rank) {
  for (std::span<std::byte> s : c.PoolMemory(true, ctx_rank)) std::memset(s.data(), 0x5a, s.size());
}

PullOptions Path(TransferPath path, milliseconds timeout = milliseconds(0)) {
  PullOptions p;
  p.path = path;
  p.timeout = timeout;
  return p;
}

// Blocks the loopback's write thread once, before operation `op` of a
// batch, until Release().
class WriteGate {
 public:
  WriteGate(LoopbackFabric& fabric, size_t op) : fabric_(fabric) {
    fabric_.SetWriteHook([this, op](std::string_view, size_t index) {
      if (index != op) return;
      std::unique_lock<std::mutex> lock(mu_);
      if (used_) return;
      used_ = true;
      entered_ = true;
      cv_.notify_all();
      cv_.wait(lock, [this] { return released_; });
    });
  }
  ~WriteGate() {
    Release();
    fabric_.SetWriteHook(nullptr);
  }
  bool WaitEntered() {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, kLong, [this] { return entered_; });
  }
  void Release() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      released_ = true;
    }
    cv_.notify_all();
  }

 private:
  LoopbackFabric& fabric_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool used_ = false;
  bool entered_ = false;
  bool released_ = false;
};

template <typename Pred>
bool WaitUntil(Pred pred, milliseconds limit = kLong) {
  const auto deadline = Clock::now() + limit;
  while (!pred()) {
    if (Clock::now() > deadline) return false;
    std::this_thread::sleep_for(milliseconds(1));
  }
  return true;
}

// --- 1. A retired, cancelled or expired publication is not served any more,
//        and never to a receiver that hears OK.

enum class SettleBy { kRetire, kCancel, kTtl };

struct RetireCase {
  TransferPath path;
  SettleBy how;
};

class PublicationSettleTest : public ::testing::TestWithParam<RetireCase> {};

TEST_P(PublicationSettleTest, WaitsForTheReadsAndTheReceiverIsNotToldOk) {
  const RetireCase param = GetParam();
  HoldingCopyEngine::Gate copies;
  ClusterOptions o = OneToOne(milliseconds(2000));
  o.ctx_hooks = copies.Hooks();
  auto clock = std::make_shared<ManualClock>();  // the ttl expires when the test says
  o.ctx_hooks.clock = clock;
  o.gen_hooks.clock = clock;
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(1);
  const BlockTables tables = c.Tables(0, 64, rng);

  // The operation that reads the ctx blocks is held: per-block's transport
  // writes, bounce's gather, direct's copy.
  const bool hold_copy = param.path != TransferPath::kPerBlock;
  if (hold_copy) {
    copies.Hold();
  } else {
    c.ctx_faults(0)->HoldWrites();
  }
  PublishOptions publish;
  if (param.how == SettleBy::kTtl) publish.ttl = milliseconds(400);
  auto pub = c.ctx(0).Publish(1, tables.ctx, 64, publish);
  ASSERT_THAT(pub, IsOk());
  auto pull = c.gen(0).Pull(1, "ctx0", tables.gen, {0, 64}, Path(param.path));
  ASSERT_THAT(pull, IsOk());
  if (hold_copy) {
    ASSERT_TRUE(copies.WaitForParked(1, kLong));
  } else {
    ASSERT_TRUE(c.ctx_faults(0)->WaitForHeldWrites(1, kLong));
  }

  switch (param.how) {
    case SettleBy::kRetire:
      ASSERT_THAT(c.ctx(0).Retire(1), IsOk());
      break;
    case SettleBy::kCancel:
      (*pub)->Cancel();
      // Runs on the control thread after the cancel: OK, already settling.
      ASSERT_THAT(c.ctx(0).Retire(1), IsOk());
      break;
    case SettleBy::kTtl:
      // The ttl expires now (Advance returns once the ctx rank's loop ran
      // it), but nothing can settle the publication while the read is held.
      clock->Advance(milliseconds(400));
      break;
  }
  EXPECT_FALSE((*pub)->Poll().has_value())
      << "the publication settled while an operation could still read its blocks";

  if (hold_copy) {
    copies.Release();
  } else {
    c.ctx_faults(0)->ReleaseWrites();
  }
  const Status settled = (*pub)->Wait();
  EXPECT_FALSE(settled.ok());
  EXPECT_THAT(settled, StatusIs(param.how == SettleBy::kTtl ? StatusCode::kDeadlineExceeded
                                                            : StatusCode::kCancelled));
  // The application reuses its blocks the moment the publication settled.
  Poison(c, 0);
  const Status pulled = (*pull)->Wait();
  EXPECT_THAT(pulled, StatusIs(StatusCode::kCancelled, HasSubstr("publication of request 1")))
      << "a receiver of a retired publication must not hear OK";

  ExpectGenPoolFrozen(c);
  EXPECT_EQ(c.ctx(0).Stats().arena_outstanding_bytes, 0u);
  EXPECT_EQ(c.gen(0).Stats().arena_outstanding_bytes, 0u);
}

INSTANTIATE_TEST_SUITE_P(
    Paths, PublicationSettleTest,
    ::testing::Values(RetireCase{TransferPath::kPerBlock, SettleBy::kRetire},
                      RetireCase{TransferPath::kPerBlock, SettleBy::kCancel},
                      RetireCase{TransferPath::kPerBlock, SettleBy::kTtl},
                      RetireCase{TransferPath::kBounce, SettleBy::kRetire},
                      RetireCase{TransferPath::kBounce, SettleBy::kTtl},
                      RetireCase{TransferPath::kDirect, SettleBy::kRetire},
                      RetireCase{TransferPath::kDirect, SettleBy::kCancel}));

// A bounce write that lands after the retire (the gather had finished, so
// the publication may settle at once) is still reported CANCELLED.
TEST(PublicationSettleTest, BounceWriteLandingAfterRetireIsNotReportedOk) {
  ClusterOptions o = OneToOne(milliseconds(2000));
  o.ctx_config.bounce_gather_mapped = 0;  // gather into a send slot, then write it
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(2);
  const BlockTables tables = c.Tables(0, 64, rng);
  c.ctx_faults(0)->HoldWrites();
  auto pub = c.ctx(0).Publish(2, tables.ctx, 64);
  ASSERT_THAT(pub, IsOk());
  auto pull = c.gen(0).Pull(2, "ctx0", tables.gen, {0, 64}, Path(TransferPath::kBounce));
  ASSERT_THAT(pull, IsOk());
  ASSERT_TRUE(c.ctx_faults(0)->WaitForHeldWrites(1, kLong));
  ASSERT_THAT(c.ctx(0).Retire(2), IsOk());
  // The gather ended before the write was issued: no read of the blocks is
  // left, so the publication may settle before the write lands.
  EXPECT_THAT((*pub)->Wait(), StatusIs(StatusCode::kCancelled));
  Poison(c, 0);
  c.ctx_faults(0)->ReleaseWrites();
  EXPECT_THAT((*pull)->Wait(), StatusIs(StatusCode::kCancelled));
  EXPECT_TRUE(WaitUntil([&] { return c.gen(0).Stats().arena_outstanding_bytes == 0; }));
}

// Every bounce writer reported SUCCESS and the scatter runs when the
// writer's connection ends (its agent shut down and said BYE): the request
// is not advanced again, so the scatter runs once and settles it OK.
TEST(PullSettleTest, WriterLeavingDuringTheScatterDoesNotScatterTwice) {
  HoldingCopyEngine::Gate copies;
  ClusterOptions o = OneToOne(milliseconds(200));
  o.gen_hooks = copies.Hooks();
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(3);
  const BlockTables tables = c.Tables(0, 64, rng);
  copies.Hold();  // the gen side's scatter
  auto pub = c.ctx(0).Publish(3, tables.ctx, 64);
  ASSERT_THAT(pub, IsOk());
  auto pull = c.gen(0).Pull(3, "ctx0", tables.gen, {0, 64}, Path(TransferPath::kBounce));
  ASSERT_THAT(pull, IsOk());
  ASSERT_TRUE(copies.WaitForParked(1, kLong));
  EXPECT_THAT((*pub)->Wait(), IsOk());
  c.ctx(0).Shutdown();  // BYE: the gen side sees the writer's connection end
  (void)c.gen(0).Stats();  // a round trip through the gen's control loop
  EXPECT_EQ(copies.parked_total(), 1u) << "the scatter was started again";
  EXPECT_FALSE((*pull)->Poll().has_value()) << "settled while its scatter was held";
  copies.Release();
  EXPECT_THAT((*pull)->Wait(), IsOk());
  EXPECT_EQ(copies.parked_total(), 1u);
  const tools::VerifyResult verified = c.VerifyGen(0, tables, {0, 64});
  EXPECT_GT(verified.verified_bytes, 0u);
  EXPECT_EQ(verified.mismatches, 0u) << verified.first_mismatch;
  EXPECT_EQ(c.gen(0).Stats().arena_outstanding_bytes, 0u);
}

// --- 2. A cancelled per-block or direct pull settles only once its writer's
//        operations ended, even after the grace-period disconnect.

TEST(PullSettleTest, PerBlockCancelWaitsForABatchStillCopying) {
  auto cluster = Cluster::Create(OneToOne(milliseconds(10)));
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(3);
  const BlockTables tables = c.Tables(0, 64, rng);
  WriteGate gate(c.fabric(), 1);  // the batch stops between its ops 0 and 1
  auto pub = c.ctx(0).Publish(3, tables.ctx, 64);
  ASSERT_THAT(pub, IsOk());
  auto pull = c.gen(0).Pull(3, "ctx0", tables.gen, {0, 64}, Path(TransferPath::kPerBlock));
  ASSERT_THAT(pull, IsOk());
  ASSERT_TRUE(gate.WaitEntered());
  (*pull)->Cancel();
  // The writer cannot answer (its transport thread is inside the batch): the
  // grace period passes and the receiver declares the connection dead.
  ASSERT_TRUE(WaitUntil([&] { return c.fabric().num_connections_awaiting_fence() > 0; }));
  EXPECT_FALSE((*pull)->Poll().has_value())
      << "the pull settled while a write into its blocks was still copying";
  gate.Release();
  EXPECT_THAT((*pull)->Wait(), StatusIs(StatusCode::kCancelled));
  ExpectGenPoolFrozen(c);
  (*pub)->Wait().IgnoreError();
}

TEST(PullSettleTest, DirectCancelWaitsForTheCopyIntoItsBlocks) {
  HoldingCopyEngine::Gate copies;
  ClusterOptions o = OneToOne(milliseconds(10));
  o.ctx_hooks = copies.Hooks();
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(4);
  const BlockTables tables = c.Tables(0, 64, rng);
  copies.Hold();
  auto pub = c.ctx(0).Publish(4, tables.ctx, 64);
  ASSERT_THAT(pub, IsOk());
  auto pull = c.gen(0).Pull(4, "ctx0", tables.gen, {0, 64}, Path(TransferPath::kDirect));
  ASSERT_THAT(pull, IsOk());
  ASSERT_TRUE(copies.WaitForParked(1, kLong));
  (*pull)->Cancel();
  // The writer stops its job at once, but the copy it started cannot be
  // recalled: the disconnect after the grace period is fenced by the copy's
  // mapped access.
  ASSERT_TRUE(WaitUntil([&] { return c.fabric().num_connections_awaiting_fence() > 0; }));
  EXPECT_FALSE((*pull)->Poll().has_value())
      << "the pull settled while a direct copy into its blocks was pending";
  copies.Release();
  EXPECT_THAT((*pull)->Wait(), StatusIs(StatusCode::kCancelled));
  ExpectGenPoolFrozen(c);
  (*pub)->Wait().IgnoreError();
}

// Bounce where the writer gathers straight into the mapped recv slot: a
// cancel settles the pull at once (the gather writes the slot, not the
// pool), the slot stays quarantined until the held gather ended, and the
// pool never changes.
TEST(PullSettleTest, MappedBounceCancelQuarantinesTheSlotTheGatherWrites) {
  HoldingCopyEngine::Gate copies;
  ClusterOptions o = OneToOne(milliseconds(10));
  o.ctx_hooks = copies.Hooks();
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(5);
  const BlockTables tables = c.Tables(0, 64, rng);
  copies.Hold();
  auto pub = c.ctx(0).Publish(5, tables.ctx, 64);
  ASSERT_THAT(pub, IsOk());
  auto pull = c.gen(0).Pull(5, "ctx0", tables.gen, {0, 64}, Path(TransferPath::kBounce));
  ASSERT_THAT(pull, IsOk());
  ASSERT_TRUE(copies.WaitForParked(1, kLong));
  const std::vector<std::byte> before = Snapshot(c, false, 0);
  (*pull)->Cancel();
  EXPECT_THAT((*pull)->Wait(), StatusIs(StatusCode::kCancelled));
  EXPECT_GT(c.gen(0).Stats().arena_quarantined_bytes, 0u);
  copies.Release();
  EXPECT_TRUE(WaitUntil([&] {
    const AgentStats s = c.gen(0).Stats();
    return s.arena_quarantined_bytes == 0 && s.arena_outstanding_bytes == 0;
  }));
  EXPECT_TRUE(Snapshot(c, false, 0) == before);
  EXPECT_EQ(c.ctx(0).Stats().transport_writes, 0u);
  ExpectGenPoolFrozen(c);
  (*pub)->Wait().IgnoreError();
}

TEST(PullSettleTest, DeadlineOfADirectPullWaitsForTheCopy) {
  HoldingCopyEngine::Gate copies;
  ClusterOptions o = OneToOne(milliseconds(5000));
  o.ctx_hooks = copies.Hooks();
  auto clock = std::make_shared<ManualClock>();
  o.ctx_hooks.clock = clock;
  o.gen_hooks.clock = clock;
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(5);
  const BlockTables tables = c.Tables(0, 64, rng);
  copies.Hold();
  auto pub = c.ctx(0).Publish(5, tables.ctx, 64);
  ASSERT_THAT(pub, IsOk());
  auto pull = c.gen(0).Pull(5, "ctx0", tables.gen, {0, 64},
                            Path(TransferPath::kDirect, milliseconds(30)));
  ASSERT_THAT(pull, IsOk());
  ASSERT_TRUE(copies.WaitForParked(1, kLong));
  // The deadline passes while the copy into the pull's blocks is held: once
  // Advance returns the receiver has handled it (and cancelled the writer),
  // and the pull must not have settled.
  clock->Advance(milliseconds(30));
  EXPECT_FALSE((*pull)->Poll().has_value());
  copies.Release();
  EXPECT_THAT((*pull)->Wait(), StatusIs(StatusCode::kDeadlineExceeded));
  ExpectGenPoolFrozen(c);
  (*pub)->Wait().IgnoreError();
}

// --- 3. Shutdown returns only when no agent writes into this agent's pool.

TEST(ShutdownSettleTest, GenShutdownWaitsForADirectCopyIntoItsPool) {
  HoldingCopyEngine::Gate copies;
  ClusterOptions o = OneToOne(milliseconds(10));
  o.ctx_hooks = copies.Hooks();
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(6);
  const BlockTables tables = c.Tables(0, 64, rng);
  copies.Hold();
  auto pub = c.ctx(0).Publish(6, tables.ctx, 64);
  ASSERT_THAT(pub, IsOk());
  auto pull = c.gen(0).Pull(6, "ctx0", tables.gen, {0, 64}, Path(TransferPath::kDirect));
  ASSERT_THAT(pull, IsOk());
  ASSERT_TRUE(copies.WaitForParked(1, kLong));
  std::atomic<bool> returned{false};
  std::thread shutdown([&] {
    c.gen(0).Shutdown();
    returned = true;
  });
  // The pool may be freed as soon as Shutdown returns: it must not return
  // while the ctx agent's copy into it is pending.
  EXPECT_FALSE(WaitUntil([&] { return returned.load(); }, milliseconds(300)))
      << "gen Shutdown returned while another agent's copy into its pool was pending";
  copies.Release();
  shutdown.join();
  EXPECT_TRUE(returned.load());
  ASSERT_TRUE((*pull)->Poll().has_value());
  EXPECT_FALSE((*pull)->Poll()->ok());
  ExpectGenPoolFrozen(c);
  (*pub)->Wait().IgnoreError();
}

TEST(ShutdownSettleTest, GenShutdownWaitsForAPerBlockBatchIntoItsPool) {
  auto cluster = Cluster::Create(OneToOne(milliseconds(10)));
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(7);
  const BlockTables tables = c.Tables(0, 64, rng);
  auto gate = std::make_unique<WriteGate>(c.fabric(), 1);
  auto pub = c.ctx(0).Publish(7, tables.ctx, 64);
  ASSERT_THAT(pub, IsOk());
  auto pull = c.gen(0).Pull(7, "ctx0", tables.gen, {0, 64}, Path(TransferPath::kPerBlock));
  ASSERT_THAT(pull, IsOk());
  ASSERT_TRUE(gate->WaitEntered());
  std::atomic<bool> returned{false};
  std::thread shutdown([&] {
    c.gen(0).Shutdown();
    returned = true;
  });
  EXPECT_FALSE(WaitUntil([&] { return returned.load(); }, milliseconds(300)));
  gate->Release();
  shutdown.join();
  ASSERT_TRUE((*pull)->Poll().has_value());
  ExpectGenPoolFrozen(c);
  gate.reset();
  (*pub)->Wait().IgnoreError();
}

// --- 4. Stats() may race Shutdown() (both are documented thread-safe).

TEST(ShutdownSettleTest, StatsRacingShutdownIsSafe) {
  auto cluster = Cluster::Create(OneToOne());
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(8);
  const BlockTables tables = c.Tables(0, 64, rng);
  ASSERT_THAT(c.RunRequest(8, tables, {0, 64}, Path(TransferPath::kBounce)), IsOk());
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> reads{0};
  std::vector<std::thread> readers;
  for (int t = 0; t < 2; ++t) {
    readers.emplace_back([&, t] {
      while (!stop.load()) {
        const AgentStats s = t == 0 ? c.gen(0).Stats() : c.ctx(0).Stats();
        reads += s.requests_completed > 0 ? 1 : 1;
      }
    });
  }
  ASSERT_TRUE(WaitUntil([&] { return reads.load() > 10; }));
  c.gen(0).Shutdown();
  c.ctx(0).Shutdown();
  const uint64_t before = reads.load();
  ASSERT_TRUE(WaitUntil([&] { return reads.load() > before + 10; }));
  stop = true;
  for (std::thread& t : readers) t.join();
  EXPECT_EQ(c.gen(0).Stats().arena_outstanding_bytes, 0u);
  EXPECT_EQ(c.gen(0).Stats().requests_completed, 1u);
}

}  // namespace
}  // namespace kvbounce
