#include "common/list_memory.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace kvbounce {
namespace {

constexpr size_t kKiB = 1024;
constexpr size_t kMiB = 1024 * kKiB;

TEST(ListMemoryTest, ClassesArePowersOfTwoWithinTheKeptRange) {
  EXPECT_EQ(ListMemory::ClassBytes(0), 0u);
  EXPECT_EQ(ListMemory::ClassBytes(64 * kKiB - 1), 0u);
  EXPECT_EQ(ListMemory::ClassBytes(64 * kKiB), 64 * kKiB);
  EXPECT_EQ(ListMemory::ClassBytes(64 * kKiB + 1), 128 * kKiB);
  EXPECT_EQ(ListMemory::ClassBytes(3 * kMiB), 4 * kMiB);
  EXPECT_EQ(ListMemory::ClassBytes(ListMemory::kMaxCachedBytes), ListMemory::kMaxCachedBytes);
  EXPECT_EQ(ListMemory::ClassBytes(ListMemory::kMaxCachedBytes + 1), 0u);
}

TEST(ListMemoryTest, AFreedBufferServesTheNextRequestOfItsClass) {
  ListMemory memory(64 * kMiB);
  void* first = memory.Allocate(300 * kKiB);
  ASSERT_NE(first, nullptr);
  std::memset(first, 0x5A, 512 * kKiB);  // the whole class is usable
  memory.Deallocate(first, 300 * kKiB);
  EXPECT_EQ(memory.stats().held_bytes, 512 * kKiB);
  // Another size of the same class gets the same buffer back.
  void* second = memory.Allocate(400 * kKiB);
  EXPECT_EQ(second, first);
  ListMemory::Stats stats = memory.stats();
  EXPECT_EQ(stats.reused, 1u);
  EXPECT_EQ(stats.fresh, 1u);
  EXPECT_EQ(stats.held_bytes, 0u);
  // A size of another class does not.
  void* other = memory.Allocate(2 * kMiB);
  EXPECT_NE(other, first);
  memory.Deallocate(second, 400 * kKiB);
  memory.Deallocate(other, 2 * kMiB);
  EXPECT_EQ(memory.stats().held_bytes, 512 * kKiB + 2 * kMiB);
  memory.Release();
  EXPECT_EQ(memory.stats().held_bytes, 0u);
}

TEST(ListMemoryTest, SmallAndHugeBuffersAreNeverKept) {
  ListMemory memory(1024 * kMiB);
  void* small = memory.Allocate(100);
  void* huge = memory.Allocate(ListMemory::kMaxCachedBytes + 1);
  memory.Deallocate(small, 100);
  memory.Deallocate(huge, ListMemory::kMaxCachedBytes + 1);
  const ListMemory::Stats stats = memory.stats();
  EXPECT_EQ(stats.held_bytes, 0u);
  EXPECT_EQ(stats.fresh, 0u);
  EXPECT_EQ(stats.reused, 0u);
}

TEST(ListMemoryTest, HoldsNoMoreThanItsCapacity) {
  ListMemory memory(1 * kMiB);
  std::vector<void*> buffers;
  for (int i = 0; i < 5; ++i) buffers.push_back(memory.Allocate(256 * kKiB));
  for (void* p : buffers) memory.Deallocate(p, 256 * kKiB);
  const ListMemory::Stats stats = memory.stats();
  EXPECT_EQ(stats.held_bytes, 1 * kMiB);
  EXPECT_EQ(stats.dropped, 1u);
  // A buffer larger than the capacity is dropped too.
  void* big = memory.Allocate(2 * kMiB);
  memory.Deallocate(big, 2 * kMiB);
  EXPECT_EQ(memory.stats().held_bytes, 1 * kMiB);
  EXPECT_EQ(memory.stats().dropped, 2u);
}

TEST(ListMemoryTest, ListVectorsKeepTheirContentsAcrossGrowth) {
  ListVector<uint64_t> list;
  for (uint64_t i = 0; i < 300'000; ++i) list.push_back(i * 7);
  for (uint64_t i = 0; i < list.size(); ++i) ASSERT_EQ(list[i], i * 7) << i;
  ListVector<uint64_t> copy = list;
  list.clear();
  list.shrink_to_fit();
  EXPECT_EQ(copy.size(), 300'000u);
  EXPECT_EQ(copy.back(), 299'999u * 7);
}

// Lists built and freed on several threads at once, some freed on another
// thread than the one that built them: every list reads back what was
// written (no buffer handed to two owners).
TEST(ListMemoryTest, ConcurrentListsNeverShareABuffer) {
  constexpr int kThreads = 4;
  constexpr int kRounds = 200;
  std::vector<std::thread> threads;
  std::vector<ListVector<uint32_t>> handed(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([t, &handed] {
      for (int r = 0; r < kRounds; ++r) {
        const uint32_t tag = static_cast<uint32_t>(t * kRounds + r);
        ListVector<uint32_t> list(20'000 + static_cast<size_t>(r % 7) * 10'000, tag);
        for (uint32_t v : list) ASSERT_EQ(v, tag);
        if (r == kRounds - 1) handed[static_cast<size_t>(t)] = std::move(list);
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  // Freed here, on another thread.
  for (int t = 0; t < kThreads; ++t) {
    const uint32_t tag = static_cast<uint32_t>(t * kRounds + kRounds - 1);
    for (uint32_t v : handed[static_cast<size_t>(t)]) ASSERT_EQ(v, tag);
  }
  handed.clear();
}

}  // namespace
}  // namespace kvbounce
