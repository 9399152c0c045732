#include "copy/cpu/cpu_copy_engine.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <future>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <stop_token>
#include <string>
#include <thread>
#include <vector>

#include "copy/copy_engine.h"
#include "copy/cpu/batch_split.h"
#include "copy/cpu/copy_workers.h"
#include "kvbounce/status.h"
#include "kvbounce/types.h"
#include "layout/fragment.h"

namespace kvbounce {
namespace {

using ::testing::HasSubstr;

constexpr uint8_t kGuard = 0xAB;
constexpr size_t kGuardBytes = 256;

uint64_t AddrOf(const void* p) { return Addr::FromPointer(p).value(); }

// A buffer with guard bytes on both sides; the usable bytes start filled with
// `fill` and the guards with kGuard.
class GuardedBuffer {
 public:
  explicit GuardedBuffer(size_t size, uint8_t fill = 0)
      : size_(size), storage_(size + 2 * kGuardBytes, kGuard) {
    std::memset(data(), fill, size);
  }
  uint8_t* data() { return storage_.data() + kGuardBytes; }
  const uint8_t* data() const { return storage_.data() + kGuardBytes; }
  size_t size() const { return size_; }
  Addr addr() const { return Addr::FromPointer(data()); }
  bool GuardsIntact() const {
    for (size_t i = 0; i < kGuardBytes; ++i) {
      if (storage_[i] != kGuard || storage_[kGuardBytes + size_ + i] != kGuard) return false;
    }
    return true;
  }
  void FillRandom(uint32_t seed) {
    std::mt19937 rng(seed);
    for (size_t i = 0; i < size_; ++i) data()[i] = static_cast<uint8_t>(rng());
  }

 private:
  size_t size_;
  std::vector<uint8_t> storage_;
};

// A random plan over a pool: `count` runs at distinct, non-overlapping pool
// offsets (in shuffled order), each 1..max_bytes long, packed densely.
struct RandomPlan {
  std::vector<uint64_t> pool_offsets;
  std::vector<uint64_t> bytes;
  std::vector<uint64_t> packed_offsets;
  uint64_t packed_size = 0;
  uint64_t pool_size = 0;
};

RandomPlan MakeRandomPlan(size_t count, uint64_t max_bytes, uint32_t seed) {
  std::mt19937 rng(seed);
  RandomPlan plan;
  const uint64_t stride = max_bytes + 7;  // leaves gaps between runs
  plan.pool_size = stride * count;
  std::vector<size_t> order(count);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  for (size_t slot : order) {
    const uint64_t n = 1 + rng() % max_bytes;
    plan.pool_offsets.push_back(slot * stride + rng() % (stride - n + 1));
    plan.bytes.push_back(n);
    plan.packed_offsets.push_back(plan.packed_size);
    plan.packed_size += n;
  }
  return plan;
}

// The gather list of `plan` over a pool at `pool` (absolute sources, packed
// offsets as destinations).
std::vector<Fragment> GatherList(const RandomPlan& plan, const uint8_t* pool) {
  std::vector<Fragment> list;
  for (size_t i = 0; i < plan.bytes.size(); ++i) {
    list.push_back({AddrOf(pool) + plan.pool_offsets[i], plan.packed_offsets[i], plan.bytes[i]});
  }
  return list;
}

// What `dst` should hold after the fragments of `batch` ran: `before` with
// every fragment applied by a plain memcpy (the oracle).
std::vector<uint8_t> Expected(const std::vector<uint8_t>& before, uint64_t dst_begin,
                              const CopyBatch& batch) {
  std::vector<uint8_t> out = before;
  for (const Fragment& f : batch.fragments) {
    if (f.bytes == 0) continue;
    const uint64_t dst = batch.dst_base.value() + f.dst;
    std::memcpy(out.data() + (dst - dst_begin), Addr(batch.src_base.value() + f.src).ToPointer(),
                f.bytes);
  }
  return out;
}

std::vector<uint8_t> Bytes(const GuardedBuffer& b) {
  return std::vector<uint8_t>(b.data(), b.data() + b.size());
}

// Counts completions and lets a test wait for a number of them.
class Completions {
 public:
  CopyDone Callback() {
    return [this](Status status) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!status.ok()) ++failures_;
      ++count_;
      cv_.notify_all();
    };
  }
  void WaitFor(int n) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return count_ >= n; });
  }
  int count() {
    std::lock_guard<std::mutex> lock(mu_);
    return count_;
  }
  int failures() {
    std::lock_guard<std::mutex> lock(mu_);
    return failures_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int count_ = 0;
  int failures_ = 0;
};

std::unique_ptr<CpuCopyEngine> MakeEngine(CpuCopyEngine::Options options = {}) {
  Result<std::unique_ptr<CpuCopyEngine>> engine = CpuCopyEngine::Create(options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? std::move(engine).value() : nullptr;
}

CpuCopyEngine::Options FourThreads() {
  CpuCopyEngine::Options options;
  options.num_threads = 4;
  return options;
}

TEST(CpuCopyEngineTest, NameAndCaps) {
  auto engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  EXPECT_EQ(engine->Name(), "cpu");
  EXPECT_TRUE(engine->Caps().host_memory);
  EXPECT_FALSE(engine->Caps().device_memory);
}

TEST(CpuCopyEngineTest, DefaultThreadCountIsSmall) {
  auto engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  EXPECT_GE(engine->num_threads(), 1);
  EXPECT_LE(engine->num_threads(), 4);
}

TEST(CpuCopyEngineTest, CreateRejectsBadOptions) {
  CpuCopyEngine::Options options;
  options.num_threads = -1;
  Result<std::unique_ptr<CpuCopyEngine>> engine = CpuCopyEngine::Create(options);
  ASSERT_FALSE(engine.ok());
  EXPECT_EQ(engine.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(engine.status().message()), HasSubstr("num_threads = -1"));

  options.num_threads = CpuCopyEngine::Options::kMaxThreads + 1;
  EXPECT_EQ(CpuCopyEngine::Create(options).status().code(), StatusCode::kInvalidArgument);

  options = {};
  options.min_chunk_bytes = 0;
  engine = CpuCopyEngine::Create(options);
  ASSERT_FALSE(engine.ok());
  EXPECT_THAT(std::string(engine.status().message()), HasSubstr("min_chunk_bytes"));
}

// --- Engines sharing one pool of workers (copy_workers.h) ------------------------

TEST(CopyWorkersTest, TheSharedPoolIsOnePerProcessWhileHeld) {
  Result<std::shared_ptr<CopyWorkers>> a = CopyWorkers::Shared();
  Result<std::shared_ptr<CopyWorkers>> b = CopyWorkers::Shared();
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->get(), b->get());
  EXPECT_EQ((*a)->num_threads(), CopyWorkers::SharedThreads());
  EXPECT_GE(CopyWorkers::SharedThreads(), 1);
  EXPECT_LE(CopyWorkers::SharedThreads(), CopyWorkers::kMaxSharedThreads);
  EXPECT_FALSE((*a)->OnWorkerThread());
  // Once nobody holds it, its workers are joined; the next caller gets a
  // pool that runs tasks again.
  a->reset();
  b->reset();
  Result<std::shared_ptr<CopyWorkers>> c = CopyWorkers::Shared();
  ASSERT_TRUE(c.ok());
  std::promise<bool> ran;
  ASSERT_TRUE((*c)->Post([&, pool = c->get()] { ran.set_value(pool->OnWorkerThread()); }));
  EXPECT_TRUE(ran.get_future().get());
}

TEST(CopyWorkersTest, CreateRejectsBadCounts) {
  for (int n : {0, -1, CopyWorkers::kMaxThreads + 1}) {
    Result<std::shared_ptr<CopyWorkers>> pool = CopyWorkers::Create(n);
    ASSERT_FALSE(pool.ok());
    EXPECT_EQ(pool.status().code(), StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(pool.status().message()),
                HasSubstr("num_threads = " + std::to_string(n)));
  }
  CpuCopyEngine::Options options;
  options.workers = *CopyWorkers::Create(1);
  options.num_threads = 2;
  Result<std::unique_ptr<CpuCopyEngine>> engine = CpuCopyEngine::Create(options);
  ASSERT_FALSE(engine.ok());
  EXPECT_THAT(std::string(engine.status().message()), HasSubstr("shared pool"));
}

// Two engines on one pool of two workers: both copy correctly, and
// destroying one waits only for its own batches while a batch of the other
// still holds a worker.
TEST(CopyWorkersTest, EnginesSharingAPoolCopyAndShutDownIndependently) {
  Result<std::shared_ptr<CopyWorkers>> pool = CopyWorkers::Create(2);
  ASSERT_TRUE(pool.ok());
  CpuCopyEngine::Options options;
  options.workers = *pool;
  auto first = MakeEngine(options);
  auto second = MakeEngine(options);
  ASSERT_NE(first, nullptr);
  ASSERT_NE(second, nullptr);
  EXPECT_EQ(first->num_threads(), 2);
  EXPECT_EQ(first->workers(), second->workers());

  // The second engine's first batch holds one worker until released.
  std::mutex mu;
  std::condition_variable cv;
  bool release = false;
  Completions held;
  ASSERT_TRUE(second
                  ->Submit(CopyBatch{},
                           [&, done = held.Callback()](Status s) mutable {
                             {
                               std::unique_lock<std::mutex> lock(mu);
                               cv.wait(lock, [&] { return release; });
                             }
                             done(std::move(s));
                           })
                  .ok());

  constexpr size_t kBytes = size_t{512} << 10;  // one chunk: not split
  GuardedBuffer src(kBytes);
  src.FillRandom(21);
  GuardedBuffer dst(kBytes, 0);
  std::vector<Fragment> list{{0, 0, kBytes}};
  Completions done;
  ASSERT_TRUE(first->Submit(CopyBatch{list, src.addr(), dst.addr()}, done.Callback()).ok());
  // The first engine's batch completes on the worker left free, and the
  // engine goes away while the second still holds the other worker.
  first.reset();
  EXPECT_EQ(done.count(), 1);
  EXPECT_EQ(done.failures(), 0);
  EXPECT_EQ(0, std::memcmp(src.data(), dst.data(), kBytes));
  EXPECT_TRUE(dst.GuardsIntact());
  EXPECT_EQ(held.count(), 0);
  {
    std::lock_guard<std::mutex> lock(mu);
    release = true;
  }
  cv.notify_all();
  second.reset();  // waits for its held batch
  EXPECT_EQ(held.count(), 1);
}

TEST(CpuCopyEngineTest, GatherThenScatterRoundTripsWithGuards) {
  auto engine = MakeEngine(FourThreads());
  ASSERT_NE(engine, nullptr);
  const RandomPlan plan = MakeRandomPlan(300, 700, 1);
  GuardedBuffer pool_a(plan.pool_size);
  pool_a.FillRandom(7);
  GuardedBuffer slot(plan.packed_size, 0x11);
  GuardedBuffer pool_b(plan.pool_size, 0x22);

  std::vector<Fragment> gather_list;
  std::vector<Fragment> scatter_list;
  for (size_t i = 0; i < plan.bytes.size(); ++i) {
    gather_list.push_back(
        {AddrOf(pool_a.data()) + plan.pool_offsets[i], plan.packed_offsets[i], plan.bytes[i]});
    scatter_list.push_back(
        {plan.packed_offsets[i], AddrOf(pool_b.data()) + plan.pool_offsets[i], plan.bytes[i]});
  }

  const CopyBatch gather = GatherBatch(gather_list, slot.addr());
  EXPECT_EQ(gather.src_base, Addr(0));
  EXPECT_EQ(gather.dst_base, slot.addr());
  const std::vector<uint8_t> slot_expected = Expected(Bytes(slot), AddrOf(slot.data()), gather);
  ASSERT_TRUE(engine->Gather(gather_list, slot.addr()).ok());
  EXPECT_EQ(Bytes(slot), slot_expected);
  EXPECT_TRUE(slot.GuardsIntact());

  const CopyBatch scatter = ScatterBatch(scatter_list, slot.addr());
  EXPECT_EQ(scatter.src_base, slot.addr());
  EXPECT_EQ(scatter.dst_base, Addr(0));
  const std::vector<uint8_t> pool_expected =
      Expected(Bytes(pool_b), AddrOf(pool_b.data()), scatter);
  ASSERT_TRUE(engine->Scatter(scatter_list, slot.addr()).ok());
  EXPECT_EQ(Bytes(pool_b), pool_expected);
  EXPECT_TRUE(pool_b.GuardsIntact());

  // Every byte of a run equals the source; every byte between runs is the
  // untouched fill.
  std::vector<bool> covered(plan.pool_size, false);
  for (size_t i = 0; i < plan.bytes.size(); ++i) {
    for (uint64_t j = 0; j < plan.bytes[i]; ++j) covered[plan.pool_offsets[i] + j] = true;
  }
  for (size_t i = 0; i < plan.pool_size; ++i) {
    ASSERT_EQ(pool_b.data()[i], covered[i] ? pool_a.data()[i] : 0x22) << "byte " << i;
  }
}

TEST(CpuCopyEngineTest, DirectCopyWithAbsoluteAddresses) {
  auto engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  GuardedBuffer src(4096);
  src.FillRandom(3);
  GuardedBuffer dst(4096, 0x5A);
  const std::vector<Fragment> list = {
      {AddrOf(src.data()) + 0, AddrOf(dst.data()) + 1000, 100},
      {AddrOf(src.data()) + 100, AddrOf(dst.data()) + 0, 1},
      {AddrOf(src.data()) + 4000, AddrOf(dst.data()) + 4095, 1},
      {AddrOf(src.data()) + 2048, AddrOf(dst.data()) + 2048, 1024},
  };
  const std::vector<uint8_t> expected = Expected(Bytes(dst), AddrOf(dst.data()), DirectBatch(list));
  ASSERT_TRUE(engine->Copy(list).ok());
  EXPECT_EQ(Bytes(dst), expected);
  EXPECT_TRUE(dst.GuardsIntact());
  EXPECT_EQ(dst.data()[1], 0x5A);
}

TEST(CpuCopyEngineTest, BothBasesAreAdded) {
  auto engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  GuardedBuffer src(1024);
  src.FillRandom(4);
  GuardedBuffer dst(1024, 0);
  const std::vector<Fragment> list = {{10, 500, 20}, {600, 0, 300}};
  const CopyBatch batch{list, src.addr(), dst.addr()};
  ASSERT_TRUE(engine->CopySync(batch).ok());
  EXPECT_EQ(0, std::memcmp(dst.data() + 500, src.data() + 10, 20));
  EXPECT_EQ(0, std::memcmp(dst.data(), src.data() + 600, 300));
  EXPECT_EQ(dst.data()[300], 0);
  EXPECT_EQ(dst.data()[499], 0);
  EXPECT_EQ(dst.data()[520], 0);
  EXPECT_TRUE(dst.GuardsIntact());
}

TEST(CpuCopyEngineTest, ManySmallFragmentsSplitAcrossWorkers) {
  auto engine = MakeEngine(FourThreads());
  ASSERT_NE(engine, nullptr);
  // 20,000 runs averaging ~48 bytes: above split_fragments, and ~1 MB in all,
  // so the batch is cut into several chunks.
  const RandomPlan plan = MakeRandomPlan(20000, 96, 2);
  GuardedBuffer pool(plan.pool_size);
  pool.FillRandom(9);
  GuardedBuffer slot(plan.packed_size, 0);
  const std::vector<Fragment> list = GatherList(plan, pool.data());
  const std::vector<uint8_t> expected =
      Expected(Bytes(slot), AddrOf(slot.data()), GatherBatch(list, slot.addr()));
  const CpuCopyEngine::Stats before = engine->GetStats();
  ASSERT_TRUE(engine->Gather(list, slot.addr()).ok());
  const CpuCopyEngine::Stats after = engine->GetStats();
  EXPECT_EQ(Bytes(slot), expected);
  EXPECT_TRUE(slot.GuardsIntact());
  EXPECT_EQ(after.batches_completed - before.batches_completed, 1u);
  EXPECT_GT(after.chunks_completed - before.chunks_completed, 1u);
  EXPECT_EQ(after.bytes_copied - before.bytes_copied, plan.packed_size);
}

TEST(CpuCopyEngineTest, HugeSingleFragmentIsSplitAcrossThreads) {
  auto engine = MakeEngine(FourThreads());
  ASSERT_NE(engine, nullptr);
  const size_t size = MiB(32) + 3;  // not a multiple of the chunk count
  GuardedBuffer src(size);
  src.FillRandom(5);
  GuardedBuffer dst(size, 0);
  const std::vector<Fragment> list = {{AddrOf(src.data()), AddrOf(dst.data()), size}};
  const CpuCopyEngine::Stats before = engine->GetStats();
  ASSERT_TRUE(engine->Copy(list).ok());
  const CpuCopyEngine::Stats after = engine->GetStats();
  EXPECT_EQ(0, std::memcmp(src.data(), dst.data(), size));
  EXPECT_TRUE(dst.GuardsIntact());
  EXPECT_EQ(after.chunks_completed - before.chunks_completed, 4u);
  EXPECT_EQ(after.bytes_copied - before.bytes_copied, size);
}

TEST(CpuCopyEngineTest, SmallBatchRunsAsOneChunk) {
  auto engine = MakeEngine(FourThreads());
  ASSERT_NE(engine, nullptr);
  GuardedBuffer src(KiB(512));
  src.FillRandom(6);
  GuardedBuffer dst(KiB(512), 0);
  const std::vector<Fragment> list = {{AddrOf(src.data()), AddrOf(dst.data()), KiB(512)}};
  const CpuCopyEngine::Stats before = engine->GetStats();
  ASSERT_TRUE(engine->Copy(list).ok());
  EXPECT_EQ(engine->GetStats().chunks_completed - before.chunks_completed, 1u);
  EXPECT_EQ(0, std::memcmp(src.data(), dst.data(), KiB(512)));
}

TEST(CpuCopyEngineTest, SplitBatchesCompleteExactlyOnce) {
  CpuCopyEngine::Options options = FourThreads();
  options.split_bytes = 1024;
  options.min_chunk_bytes = 256;
  auto engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  constexpr int kBatches = 200;
  constexpr size_t kBatchBytes = 64 * 1024;
  GuardedBuffer src(kBatches * kBatchBytes);
  src.FillRandom(8);
  GuardedBuffer dst(kBatches * kBatchBytes, 0);
  // Each batch: 16 fragments of 4 KiB, in reverse order within the batch.
  std::vector<std::vector<Fragment>> lists(kBatches);
  std::vector<std::atomic<int>> calls(kBatches);
  Completions all;
  for (int b = 0; b < kBatches; ++b) {
    for (int j = 15; j >= 0; --j) {
      const uint64_t off = b * kBatchBytes + static_cast<uint64_t>(j) * 4096;
      lists[b].push_back({off, off, 4096});
    }
    CopyDone count_all = all.Callback();
    ASSERT_TRUE(engine
                    ->Submit(CopyBatch{lists[b], src.addr(), dst.addr()},
                             [&calls, b, count_all](Status status) {
                               EXPECT_TRUE(status.ok()) << status;
                               calls[b].fetch_add(1);
                               count_all(std::move(status));
                             })
                    .ok());
  }
  all.WaitFor(kBatches);
  engine.reset();  // joins: any duplicate call would have happened by now
  EXPECT_EQ(all.count(), kBatches);
  EXPECT_EQ(all.failures(), 0);
  for (int b = 0; b < kBatches; ++b) EXPECT_EQ(calls[b].load(), 1) << "batch " << b;
  EXPECT_EQ(0, std::memcmp(src.data(), dst.data(), kBatches * kBatchBytes));
}

TEST(CpuCopyEngineTest, EmptyBatchCompletesOkOnAnEngineThread) {
  auto engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  std::mutex mu;
  std::condition_variable cv;
  bool called = false;
  std::thread::id caller;
  Status result = InternalError("not called");
  ASSERT_TRUE(engine
                  ->Submit(CopyBatch{},
                           [&](Status status) {
                             std::lock_guard<std::mutex> lock(mu);
                             called = true;
                             caller = std::this_thread::get_id();
                             result = std::move(status);
                             cv.notify_all();
                           })
                  .ok());
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return called; });
    EXPECT_TRUE(result.ok()) << result;
    EXPECT_NE(caller, std::this_thread::get_id());
  }
  EXPECT_TRUE(engine->Copy({}).ok());
}

TEST(CpuCopyEngineTest, ZeroByteFragmentsAreSkippedUnchecked) {
  auto engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  GuardedBuffer src(64);
  src.FillRandom(10);
  GuardedBuffer dst(64, 0);
  constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();
  const std::vector<Fragment> list = {
      {0, 0, 0},
      {kMax, kMax, 0},
      {AddrOf(src.data()), AddrOf(dst.data()), 64},
      {0, AddrOf(dst.data()), 0},
  };
  ASSERT_TRUE(engine->Copy(list).ok());
  EXPECT_EQ(0, std::memcmp(src.data(), dst.data(), 64));
  const std::vector<Fragment> only_empty = {{0, 0, 0}, {1, 2, 0}};
  EXPECT_TRUE(engine->Copy(only_empty).ok());
}

TEST(CpuCopyEngineTest, InvalidBatchesAreRejectedWithoutCallingDone) {
  auto engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  std::atomic<int> calls{0};
  auto submit = [&](const CopyBatch& batch) {
    return engine->Submit(batch, [&calls](Status) { calls.fetch_add(1); });
  };
  constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();
  std::vector<uint8_t> buffer(128);
  const uint64_t a = AddrOf(buffer.data());
  constexpr uint64_t kHuge = (uint64_t{1} << 62) + (uint64_t{1} << 61);

  struct Case {
    const char* name;
    std::vector<Fragment> list;
    Addr src_base;
    Addr dst_base;
    const char* message;
  };
  const std::vector<Case> cases = {
      {"src base + offset overflows", {{10, a, 1}}, Addr(kMax - 5), Addr(0), "source base"},
      {"src end overflows", {{kMax - 3, a, 8}}, Addr(0), Addr(0), "source base"},
      {"dst base + offset overflows", {{a, kMax, 1}}, Addr(0), Addr(2), "destination base"},
      {"dst end overflows", {{a, 8, 16}}, Addr(0), Addr(kMax - 10), "destination base"},
      {"null source", {{0, a, 4}}, Addr(0), Addr(0), "source address is 0"},
      {"null destination", {{a, 0, 4}}, Addr(0), Addr(0), "destination address is 0"},
      {"overlap", {{a, a + 8, 16}}, Addr(0), Addr(0), "overlap"},
      // Three disjoint-sided fragments of 3/8 of the address space each.
      {"total overflows",
       {{1, 1 + kHuge, kHuge}, {1, 1 + kHuge, kHuge}, {1, 1 + kHuge, kHuge}},
       Addr(0),
       Addr(0),
       "total bytes overflow"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const Status status = submit(CopyBatch{c.list, c.src_base, c.dst_base});
    EXPECT_EQ(status.code(), StatusCode::kInvalidArgument) << status;
    EXPECT_THAT(std::string(status.message()), HasSubstr(c.message));
    // CopySync reports the same error.
    EXPECT_EQ(engine->CopySync(CopyBatch{c.list, c.src_base, c.dst_base}), status);
  }
  // A later valid fragment does not hide an earlier bad one; the index is named.
  const std::vector<Fragment> second_bad = {{a, a + 64, 8}, {a, 0, 8}};
  const Status status = submit(DirectBatch(second_bad));
  EXPECT_THAT(std::string(status.message()), HasSubstr("fragment 1"));

  const Status no_callback = engine->Submit(CopyBatch{}, CopyDone());
  EXPECT_EQ(no_callback.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(no_callback.message()), HasSubstr("callback"));

  engine.reset();
  EXPECT_EQ(calls.load(), 0);
}

TEST(CpuCopyEngineTest, ConcurrentSubmitsFromSeveralThreads) {
  auto engine = MakeEngine(FourThreads());
  ASSERT_NE(engine, nullptr);
  constexpr int kThreads = 4;
  constexpr int kBatchesPerThread = 50;
  constexpr size_t kRegion = 32 * 1024;  // per batch: 32 fragments of 1 KiB
  const size_t total = kThreads * kBatchesPerThread * kRegion;
  GuardedBuffer src(total);
  src.FillRandom(11);
  GuardedBuffer dst(total, 0);
  std::vector<std::vector<Fragment>> lists(kThreads * kBatchesPerThread);
  for (size_t b = 0; b < lists.size(); ++b) {
    for (size_t j = 0; j < 32; ++j) {
      const uint64_t off = b * kRegion + j * 1024;
      // Swap neighbouring fragments between src and dst to vary addresses.
      lists[b].push_back({off, b * kRegion + (j ^ 1) * 1024, 1024});
    }
  }
  Completions done;
  std::vector<std::thread> submitters;
  std::atomic<int> submit_failures{0};
  for (int t = 0; t < kThreads; ++t) {
    submitters.emplace_back([&, t] {
      for (int i = 0; i < kBatchesPerThread; ++i) {
        const size_t b = static_cast<size_t>(t * kBatchesPerThread + i);
        if (i % 2 == 0) {
          if (!engine->Submit(CopyBatch{lists[b], src.addr(), dst.addr()}, done.Callback()).ok()) {
            submit_failures.fetch_add(1);
          }
        } else {
          Status status = engine->CopySync(CopyBatch{lists[b], src.addr(), dst.addr()});
          if (!status.ok()) submit_failures.fetch_add(1);
        }
      }
    });
  }
  for (std::thread& t : submitters) t.join();
  done.WaitFor(kThreads * kBatchesPerThread / 2);
  EXPECT_EQ(submit_failures.load(), 0);
  EXPECT_EQ(done.failures(), 0);
  for (size_t b = 0; b < lists.size(); ++b) {
    for (size_t j = 0; j < 32; ++j) {
      ASSERT_EQ(0, std::memcmp(dst.data() + b * kRegion + (j ^ 1) * 1024,
                               src.data() + b * kRegion + j * 1024, 1024))
          << "batch " << b << " fragment " << j;
    }
  }
  EXPECT_TRUE(dst.GuardsIntact());
}

TEST(CpuCopyEngineTest, SubmitFromDoneCallbackChainsGatherAndScatter) {
  auto engine = MakeEngine(FourThreads());
  ASSERT_NE(engine, nullptr);
  GuardedBuffer pool_a(8192);
  pool_a.FillRandom(12);
  GuardedBuffer slot(4096, 0);
  GuardedBuffer pool_b(8192, 0);
  const std::vector<Fragment> gather_list = {{AddrOf(pool_a.data()) + 4096, 0, 4096}};
  const std::vector<Fragment> scatter_list = {{0, AddrOf(pool_b.data()), 4096}};
  Completions done;
  CopyEngine* raw = engine.get();
  ASSERT_TRUE(
      engine
          ->Submit(
              GatherBatch(gather_list, slot.addr()),
              [&, raw](Status status) {
                ASSERT_TRUE(status.ok());
                ASSERT_TRUE(
                    raw->Submit(ScatterBatch(scatter_list, slot.addr()), done.Callback()).ok());
              })
          .ok());
  done.WaitFor(1);
  EXPECT_EQ(0, std::memcmp(pool_b.data(), pool_a.data() + 4096, 4096));
  EXPECT_TRUE(pool_b.GuardsIntact());
}

TEST(CpuCopyEngineTest, DestructionFinishesQueuedWorkThenJoins) {
  CpuCopyEngine::Options options;
  options.num_threads = 1;
  auto engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  CpuCopyEngine* raw = engine.get();

  // The first batch's callback holds the only worker until released, so the
  // batches behind it are certainly still queued when destruction begins.
  std::mutex mu;
  std::condition_variable cv;
  bool release = false;
  ASSERT_TRUE(raw->Submit(CopyBatch{},
                          [&](Status) {
                            std::unique_lock<std::mutex> lock(mu);
                            cv.wait(lock, [&] { return release; });
                          })
                  .ok());

  constexpr int kQueued = 20;
  constexpr size_t kBytes = 256 * 1024;
  GuardedBuffer src(kQueued * kBytes);
  src.FillRandom(13);
  GuardedBuffer dst(kQueued * kBytes, 0);
  std::vector<std::vector<Fragment>> lists(kQueued);
  Completions done;
  for (int i = 0; i < kQueued; ++i) {
    lists[i].push_back({i * kBytes, i * kBytes, kBytes});
    ASSERT_TRUE(raw->Submit(CopyBatch{lists[i], src.addr(), dst.addr()}, done.Callback()).ok());
  }

  std::thread destroyer([&] { engine.reset(); });
  // Once the destructor has begun, new batches are refused; batches accepted
  // before that are still part of the queued work that must complete.
  int accepted_late = 0;
  for (;;) {
    const Status status = raw->Submit(CopyBatch{}, done.Callback());
    if (!status.ok()) {
      EXPECT_EQ(status.code(), StatusCode::kAborted) << status;
      break;
    }
    ++accepted_late;
    std::this_thread::yield();
  }
  {
    std::lock_guard<std::mutex> lock(mu);
    release = true;
  }
  cv.notify_all();
  destroyer.join();
  EXPECT_EQ(done.count(), kQueued + accepted_late);
  EXPECT_EQ(done.failures(), 0);
  EXPECT_EQ(0, std::memcmp(src.data(), dst.data(), kQueued * kBytes));
}

// --- Cancellation ------------------------------------------------------------

// Records a batch's completion status.
class StatusWaiter {
 public:
  CopyDone Callback() {
    return [this](Status status) {
      std::lock_guard<std::mutex> lock(mu_);
      status_ = std::move(status);
      ++calls_;
      cv_.notify_all();
    };
  }
  Status Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return calls_ > 0; });
    return status_;
  }
  int calls() {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  Status status_;
  int calls_ = 0;
};

// Holds the piece hook's `block_at`-th call (0-based) until Release().
class PieceGate {
 public:
  explicit PieceGate(size_t block_at) : state_(std::make_shared<State>()) {
    state_->block_at = block_at;
  }
  ~PieceGate() { Release(); }
  std::function<void(size_t)> Hook() {
    return [state = state_](size_t fragment_index) {
      std::unique_lock<std::mutex> lock(state->mu);
      if (state->calls++ != state->block_at) return;
      state->entered_fragment = fragment_index;
      state->entered = true;
      state->cv.notify_all();
      state->cv.wait(lock, [&] { return state->released; });
    };
  }
  size_t WaitEntered() {
    std::unique_lock<std::mutex> lock(state_->mu);
    state_->cv.wait(lock, [this] { return state_->entered; });
    return state_->entered_fragment;
  }
  void Release() {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->released = true;
    state_->cv.notify_all();
  }

 private:
  struct State {
    std::mutex mu;
    std::condition_variable cv;
    size_t block_at = 0;
    size_t calls = 0;
    size_t entered_fragment = 0;
    bool entered = false;
    bool released = false;
  };
  std::shared_ptr<State> state_;
};

// A one-thread engine whose only worker is held in a gate batch's `done`
// until Open(), so batches submitted meanwhile are certainly still queued.
class GatedEngine {
 public:
  explicit GatedEngine(CpuCopyEngine::Options options = {}) {
    options.num_threads = 1;
    engine_ = MakeEngine(options);
    EXPECT_TRUE(engine_
                    ->Submit(CopyBatch{},
                             [this](Status) {
                               std::unique_lock<std::mutex> lock(mu_);
                               cv_.wait(lock, [this] { return open_; });
                             })
                    .ok());
  }
  ~GatedEngine() { Open(); }
  CpuCopyEngine& operator*() { return *engine_; }
  CpuCopyEngine* operator->() { return engine_.get(); }
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
  std::unique_ptr<CpuCopyEngine> engine_;
};

std::vector<Fragment> EvenFragments(size_t count, uint64_t bytes) {
  std::vector<Fragment> list;
  for (size_t i = 0; i < count; ++i) list.push_back({i * bytes, i * bytes, bytes});
  return list;
}

TEST(CpuCopyEngineCancelTest, StopRequestedBeforeSubmitCopiesNothing) {
  auto engine = MakeEngine(FourThreads());
  GuardedBuffer src(64 * 1024);
  src.FillRandom(31);
  GuardedBuffer dst(64 * 1024, 0);
  const std::vector<Fragment> list = EvenFragments(16, 4096);
  std::stop_source stop;
  stop.request_stop();
  StatusWaiter waiter;
  ASSERT_TRUE(
      engine->Submit(CopyBatch{list, src.addr(), dst.addr()}, waiter.Callback(), stop.get_token())
          .ok());
  const Status status = waiter.Wait();
  EXPECT_EQ(status.code(), StatusCode::kCancelled) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("65536 of 65536 bytes not copied"));
  EXPECT_EQ(std::count(dst.data(), dst.data() + dst.size(), 0), 64 * 1024);
  EXPECT_TRUE(dst.GuardsIntact());
}

// Stopped while queued behind another batch: every chunk is skipped when a
// worker reaches it, and `done` runs once.
TEST(CpuCopyEngineCancelTest, StopRequestedWhileQueuedSkipsEveryChunk) {
  GatedEngine engine;
  constexpr size_t kBytes = 4 << 20;
  GuardedBuffer src(kBytes);
  src.FillRandom(32);
  GuardedBuffer dst(kBytes, 0);
  const std::vector<Fragment> list = EvenFragments(64, kBytes / 64);
  std::stop_source stop;
  StatusWaiter waiter;
  ASSERT_TRUE(
      engine->Submit(CopyBatch{list, src.addr(), dst.addr()}, waiter.Callback(), stop.get_token())
          .ok());
  stop.request_stop();
  engine.Open();
  const Status status = waiter.Wait();
  EXPECT_EQ(status.code(), StatusCode::kCancelled) << status;
  EXPECT_EQ(std::count(dst.data(), dst.data() + dst.size(), 0), static_cast<long>(kBytes));
  const CpuCopyEngine::Stats stats = engine->GetStats();
  EXPECT_EQ(stats.batches_cancelled, 1u);
  EXPECT_EQ(stats.bytes_copied, 0u);
  EXPECT_EQ(waiter.calls(), 1);
}

// The hook holds the worker before fragment 5; the stop requested meanwhile
// is seen by that fragment's own check.
TEST(CpuCopyEngineCancelTest, StopRequestedMidBatchSkipsTheFragmentsNotStarted) {
  PieceGate gate(/*block_at=*/5);
  CpuCopyEngine::Options options;
  options.num_threads = 1;
  options.piece_hook_for_testing = gate.Hook();
  auto engine = MakeEngine(options);
  constexpr size_t kFragments = 16;
  constexpr size_t kFragmentBytes = 4096;
  GuardedBuffer src(kFragments * kFragmentBytes);
  src.FillRandom(33);
  GuardedBuffer dst(kFragments * kFragmentBytes, 0);
  const std::vector<Fragment> list = EvenFragments(kFragments, kFragmentBytes);
  std::stop_source stop;
  StatusWaiter waiter;
  ASSERT_TRUE(
      engine->Submit(CopyBatch{list, src.addr(), dst.addr()}, waiter.Callback(), stop.get_token())
          .ok());
  EXPECT_EQ(gate.WaitEntered(), 5u);
  stop.request_stop();
  gate.Release();
  const Status status = waiter.Wait();
  EXPECT_EQ(status.code(), StatusCode::kCancelled) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("45056 of 65536 bytes not copied"));
  EXPECT_EQ(std::memcmp(dst.data(), src.data(), 5 * kFragmentBytes), 0);
  for (size_t i = 5 * kFragmentBytes; i < dst.size(); ++i) ASSERT_EQ(dst.data()[i], 0) << i;
  EXPECT_EQ(engine->GetStats().bytes_copied, 5 * kFragmentBytes);
  EXPECT_TRUE(dst.GuardsIntact());
}

// A fragment larger than the grain is copied in pieces, checked one by one.
TEST(CpuCopyEngineCancelTest, StopInsideAHugeFragmentEndsAtTheNextPiece) {
  static_assert(CpuCopyEngine::kCopyGrainBytes == MiB(1));
  PieceGate gate(/*block_at=*/2);  // before the third piece
  CpuCopyEngine::Options options;
  options.num_threads = 1;
  options.piece_hook_for_testing = gate.Hook();
  auto engine = MakeEngine(options);
  constexpr size_t kBytes = (4 << 20) + 10;
  GuardedBuffer src(kBytes);
  src.FillRandom(34);
  GuardedBuffer dst(kBytes, 0);
  const std::vector<Fragment> list = {{0, 0, kBytes}};
  std::stop_source stop;
  StatusWaiter waiter;
  ASSERT_TRUE(
      engine->Submit(CopyBatch{list, src.addr(), dst.addr()}, waiter.Callback(), stop.get_token())
          .ok());
  EXPECT_EQ(gate.WaitEntered(), 0u);
  stop.request_stop();
  gate.Release();
  const Status status = waiter.Wait();
  EXPECT_EQ(status.code(), StatusCode::kCancelled) << status;
  EXPECT_EQ(std::memcmp(dst.data(), src.data(), MiB(2)), 0);
  for (size_t i = MiB(2); i < kBytes; ++i) ASSERT_EQ(dst.data()[i], 0) << i;
  EXPECT_EQ(engine->GetStats().bytes_copied, MiB(2));
}

TEST(CpuCopyEngineCancelTest, StopRequestedAfterCompletionReportsOk) {
  auto engine = MakeEngine(FourThreads());
  constexpr size_t kBytes = 4 << 20;
  GuardedBuffer src(kBytes);
  src.FillRandom(35);
  GuardedBuffer dst(kBytes, 0);
  const std::vector<Fragment> list = EvenFragments(256, kBytes / 256);
  std::stop_source stop;
  StatusWaiter waiter;
  ASSERT_TRUE(
      engine->Submit(CopyBatch{list, src.addr(), dst.addr()}, waiter.Callback(), stop.get_token())
          .ok());
  EXPECT_TRUE(waiter.Wait().ok());
  stop.request_stop();
  EXPECT_EQ(std::memcmp(dst.data(), src.data(), kBytes), 0);
  EXPECT_EQ(engine->GetStats().batches_cancelled, 0u);
  EXPECT_EQ(waiter.calls(), 1);
}

// A stop requested after a batch's last piece was copied (here, from its own
// `done`) leaves it OK; a batch sharing the token, still queued, is skipped.
TEST(CpuCopyEngineCancelTest, StopFromALaterBatchDoesNotCancelAnEarlierOne) {
  GatedEngine engine;
  GuardedBuffer src(8192);
  src.FillRandom(36);
  GuardedBuffer dst(8192, 0);
  const std::vector<Fragment> first = {{0, 0, 4096}};
  const std::vector<Fragment> second = {{4096, 4096, 4096}};
  std::stop_source stop;
  StatusWaiter first_done;
  StatusWaiter second_done;
  ASSERT_TRUE(engine
                  ->Submit(
                      CopyBatch{first, src.addr(), dst.addr()},
                      [&](Status status) {
                        stop.request_stop();  // the second batch is still queued
                        first_done.Callback()(std::move(status));
                      },
                      stop.get_token())
                  .ok());
  ASSERT_TRUE(engine
                  ->Submit(CopyBatch{second, src.addr(), dst.addr()}, second_done.Callback(),
                           stop.get_token())
                  .ok());
  engine.Open();
  EXPECT_TRUE(first_done.Wait().ok());
  EXPECT_EQ(second_done.Wait().code(), StatusCode::kCancelled);
  EXPECT_EQ(std::memcmp(dst.data(), src.data(), 4096), 0);
  EXPECT_EQ(std::count(dst.data() + 4096, dst.data() + 8192, 0), 4096);
}

TEST(CpuCopyEngineCancelTest, EmptyBatchCompletesOkEvenWhenStopped) {
  auto engine = MakeEngine();
  std::stop_source stop;
  stop.request_stop();
  StatusWaiter waiter;
  ASSERT_TRUE(engine->Submit(CopyBatch{}, waiter.Callback(), stop.get_token()).ok());
  EXPECT_TRUE(waiter.Wait().ok());
}

// --- SubmitOrCopyHere ------------------------------------------------------------

// Runs `batch` through SubmitOrCopyHere with `inline_bytes` and reports on
// which thread `done` ran and whether it had run before the call returned.
struct HereResult {
  Status submitted;
  bool done_before_return = false;
  bool done_on_caller = false;
  Status status;
};
HereResult RunHere(CopyEngine& engine, const CopyBatch& batch, uint64_t inline_bytes,
                   std::stop_token stop = {}) {
  HereResult result;
  std::mutex mu;
  std::condition_variable cv;
  bool called = false;
  const std::thread::id caller = std::this_thread::get_id();
  result.submitted = engine.SubmitOrCopyHere(
      batch, inline_bytes,
      [&](Status status) {
        std::lock_guard<std::mutex> lock(mu);
        result.status = std::move(status);
        result.done_on_caller = std::this_thread::get_id() == caller;
        called = true;
        cv.notify_all();
      },
      std::move(stop));
  std::unique_lock<std::mutex> lock(mu);
  result.done_before_return = called;
  if (result.submitted.ok()) cv.wait(lock, [&] { return called; });
  return result;
}

TEST(CpuCopyEngineHereTest, ABatchAtTheLimitIsCopiedOnTheCallingThread) {
  auto engine = MakeEngine(FourThreads());
  const RandomPlan plan = MakeRandomPlan(40, 300, 41);
  GuardedBuffer pool(plan.pool_size);
  pool.FillRandom(41);
  GuardedBuffer slot(plan.packed_size, 0);
  const std::vector<Fragment> gather = GatherList(plan, pool.data());
  const CopyBatch batch = GatherBatch(gather, slot.addr());
  const std::vector<uint8_t> want = Expected(Bytes(slot), AddrOf(slot.data()), batch);
  const HereResult here = RunHere(*engine, batch, plan.packed_size);
  ASSERT_TRUE(here.submitted.ok()) << here.submitted;
  EXPECT_TRUE(here.status.ok()) << here.status;
  EXPECT_TRUE(here.done_before_return);
  EXPECT_TRUE(here.done_on_caller);
  EXPECT_EQ(Bytes(slot), want);
  EXPECT_TRUE(slot.GuardsIntact());
  const CpuCopyEngine::Stats stats = engine->GetStats();
  EXPECT_EQ(stats.batches_inline, 1u);
  EXPECT_EQ(stats.batches_completed, 1u);
  EXPECT_EQ(stats.bytes_copied, plan.packed_size);
}

TEST(CpuCopyEngineHereTest, ABatchOverTheLimitOrALimitOfZeroGoesToTheWorkers) {
  auto engine = MakeEngine(FourThreads());
  GuardedBuffer src(8192);
  src.FillRandom(42);
  GuardedBuffer dst(8192, 0);
  const std::vector<Fragment> list = EvenFragments(2, 4096);
  for (const uint64_t limit : {uint64_t{8191}, uint64_t{0}}) {
    SCOPED_TRACE(limit);
    std::memset(dst.data(), 0, dst.size());
    const HereResult here = RunHere(*engine, CopyBatch{list, src.addr(), dst.addr()}, limit);
    ASSERT_TRUE(here.submitted.ok()) << here.submitted;
    EXPECT_TRUE(here.status.ok()) << here.status;
    EXPECT_FALSE(here.done_on_caller);
    EXPECT_EQ(Bytes(dst), Bytes(src));
  }
  // An empty batch with a limit of 0 is not "at most the limit" either.
  const HereResult empty = RunHere(*engine, CopyBatch{}, 0);
  ASSERT_TRUE(empty.submitted.ok());
  EXPECT_FALSE(empty.done_on_caller);
  EXPECT_EQ(engine->GetStats().batches_inline, 0u);
}

TEST(CpuCopyEngineHereTest, AStopAlreadyRequestedCopiesNothingAndReportsCancelled) {
  auto engine = MakeEngine(FourThreads());
  GuardedBuffer src(4096);
  src.FillRandom(43);
  GuardedBuffer dst(4096, 0);
  const std::vector<Fragment> list = EvenFragments(4, 1024);
  std::stop_source stop;
  stop.request_stop();
  const HereResult here =
      RunHere(*engine, CopyBatch{list, src.addr(), dst.addr()}, 4096, stop.get_token());
  ASSERT_TRUE(here.submitted.ok());
  EXPECT_TRUE(here.done_on_caller);
  EXPECT_EQ(here.status.code(), StatusCode::kCancelled) << here.status;
  EXPECT_THAT(std::string(here.status.message()), HasSubstr("4096 of 4096 bytes not copied"));
  EXPECT_EQ(std::count(dst.data(), dst.data() + dst.size(), 0), 4096);
  EXPECT_EQ(engine->GetStats().batches_cancelled, 1u);
}

// A stop requested part-way (from the test hook, on the calling thread)
// skips the fragments not yet begun, as on a worker.
TEST(CpuCopyEngineHereTest, AStopMidBatchSkipsTheRest) {
  std::stop_source stop;
  CpuCopyEngine::Options options;
  options.num_threads = 1;
  options.piece_hook_for_testing = [&](size_t fragment) {
    if (fragment == 2) stop.request_stop();
  };
  auto engine = MakeEngine(options);
  GuardedBuffer src(4096);
  src.FillRandom(44);
  GuardedBuffer dst(4096, 0);
  const std::vector<Fragment> list = EvenFragments(4, 1024);
  const HereResult here =
      RunHere(*engine, CopyBatch{list, src.addr(), dst.addr()}, 4096, stop.get_token());
  ASSERT_TRUE(here.submitted.ok());
  EXPECT_TRUE(here.done_on_caller);
  EXPECT_EQ(here.status.code(), StatusCode::kCancelled) << here.status;
  EXPECT_THAT(std::string(here.status.message()), HasSubstr("2048 of 4096 bytes not copied"));
  EXPECT_EQ(0, std::memcmp(dst.data(), src.data(), 2048));
  EXPECT_EQ(std::count(dst.data() + 2048, dst.data() + 4096, 0), 2048);
}

TEST(CpuCopyEngineHereTest, BadBatchesAreRejectedWithoutCallingDone) {
  auto engine = MakeEngine(FourThreads());
  GuardedBuffer buf(4096, 0);
  const std::vector<Fragment> overlap = {{0, 100, 200}};
  const HereResult here = RunHere(*engine, CopyBatch{overlap, buf.addr(), buf.addr()}, 4096);
  EXPECT_EQ(here.submitted.code(), StatusCode::kInvalidArgument) << here.submitted;
  EXPECT_FALSE(here.done_before_return);
  EXPECT_EQ(engine->SubmitOrCopyHere(CopyBatch{}, 4096, nullptr).code(),
            StatusCode::kInvalidArgument);
}

// An engine that cannot copy on the caller's thread ignores the limit.
class WorkerOnlyEngine final : public CopyEngine {
 public:
  std::string_view Name() const override { return "worker-only"; }
  CopyEngineCaps Caps() const override { return {}; }
  ~WorkerOnlyEngine() override {
    for (std::thread& t : threads_) t.join();
  }

 protected:
  Status SubmitValidated(const CopyBatch& batch, uint64_t, CopyDone done,
                         std::stop_token) override {
    threads_.emplace_back([batch, done = std::move(done)] {
      for (const Fragment& f : batch.fragments) {
        std::memcpy(Addr(batch.dst_base.value() + f.dst).ToPointer(),
                    Addr(batch.src_base.value() + f.src).ToPointer(), f.bytes);
      }
      done(Status::Ok());
    });
    return Status::Ok();
  }

 private:
  std::vector<std::thread> threads_;
};

TEST(CpuCopyEngineHereTest, AnEngineThatCannotCopyHereUsesItsThreads) {
  WorkerOnlyEngine engine;
  EXPECT_FALSE(engine.CopiesOnCallingThread());
  GuardedBuffer src(1024);
  src.FillRandom(45);
  GuardedBuffer dst(1024, 0);
  const std::vector<Fragment> list = EvenFragments(1, 1024);
  const HereResult here = RunHere(engine, CopyBatch{list, src.addr(), dst.addr()}, 1 << 20);
  ASSERT_TRUE(here.submitted.ok());
  EXPECT_FALSE(here.done_on_caller);
  EXPECT_EQ(Bytes(dst), Bytes(src));
}

// --- SplitIntoChunks ---------------------------------------------------------

// Replays the chunks and checks they cover every byte of the stream once, in
// order, with sizes within one byte of each other.
void CheckChunks(const std::vector<Fragment>& fragments, const std::vector<CopyChunk>& chunks,
                 size_t max_chunks) {
  uint64_t total = 0;
  for (const Fragment& f : fragments) total += f.bytes;
  if (total == 0) {
    EXPECT_TRUE(chunks.empty());
    return;
  }
  ASSERT_EQ(chunks.size(), std::min<uint64_t>(max_chunks, total));
  uint64_t min_bytes = std::numeric_limits<uint64_t>::max();
  uint64_t max_bytes = 0;
  size_t index = 0;
  uint64_t offset = 0;  // next expected (fragment, offset) in stream order
  for (const CopyChunk& c : chunks) {
    ASSERT_GT(c.bytes, 0u);
    min_bytes = std::min(min_bytes, c.bytes);
    max_bytes = std::max(max_bytes, c.bytes);
    while (fragments[index].bytes == offset) {
      ++index;
      offset = 0;
    }
    ASSERT_EQ(c.first, index);
    ASSERT_EQ(c.first_offset, offset);
    ASSERT_LE(c.first, c.last);
    uint64_t covered = 0;
    for (size_t i = c.first; i <= c.last; ++i) {
      const uint64_t lo = i == c.first ? c.first_offset : 0;
      const uint64_t hi = i == c.last ? c.last_end : fragments[i].bytes;
      ASSERT_LE(hi, fragments[i].bytes);
      ASSERT_LE(lo, hi);
      covered += hi - lo;
    }
    ASSERT_EQ(covered, c.bytes);
    index = c.last;
    offset = c.last_end;
  }
  // The last chunk ends at the end of the stream.
  for (size_t i = index + 1; i < fragments.size(); ++i) ASSERT_EQ(fragments[i].bytes, 0u);
  ASSERT_EQ(offset, fragments[index].bytes);
  EXPECT_LE(max_bytes - min_bytes, 1u);
}

TEST(SplitIntoChunksTest, OneFragmentSplitsEvenly) {
  const std::vector<Fragment> one = {{0, 0, 10}};
  const std::vector<CopyChunk> chunks = SplitIntoChunks(one, 10, 3);
  ASSERT_EQ(chunks.size(), 3u);
  EXPECT_EQ(chunks[0], (CopyChunk{0, 0, 0, 4, 4}));
  EXPECT_EQ(chunks[1], (CopyChunk{0, 4, 0, 7, 3}));
  EXPECT_EQ(chunks[2], (CopyChunk{0, 7, 0, 10, 3}));
  CheckChunks(one, chunks, 3);
}

TEST(SplitIntoChunksTest, NeverMoreChunksThanBytes) {
  const std::vector<Fragment> two = {{0, 0, 1}, {0, 0, 1}};
  CheckChunks(two, SplitIntoChunks(two, 2, 8), 8);
  EXPECT_EQ(SplitIntoChunks(two, 2, 8).size(), 2u);
}

TEST(SplitIntoChunksTest, EmptyStreamHasNoChunks) {
  const std::vector<Fragment> none;
  EXPECT_TRUE(SplitIntoChunks(none, 0, 4).empty());
  const std::vector<Fragment> zeros = {{1, 2, 0}, {3, 4, 0}};
  EXPECT_TRUE(SplitIntoChunks(zeros, 0, 4).empty());
}

TEST(SplitIntoChunksTest, HugeTotalsDoNotOverflow) {
  const uint64_t big = std::numeric_limits<uint64_t>::max() / 2;
  const std::vector<Fragment> list = {{0, 0, big}, {0, 0, big}};
  CheckChunks(list, SplitIntoChunks(list, 2 * big, 7), 7);
}

TEST(SplitIntoChunksTest, RandomStreamsAreCoveredExactlyOnce) {
  std::mt19937 rng(42);
  for (int trial = 0; trial < 500; ++trial) {
    std::vector<Fragment> list(1 + rng() % 40);
    uint64_t total = 0;
    for (Fragment& f : list) {
      // Plenty of zero-byte fragments, including first and last.
      f.bytes = rng() % 3 == 0 ? 0 : rng() % 100;
      total += f.bytes;
    }
    const size_t max_chunks = 1 + rng() % 9;
    SCOPED_TRACE(trial);
    CheckChunks(list, SplitIntoChunks(list, total, max_chunks), max_chunks);
  }
}

}  // namespace
}  // namespace kvbounce
