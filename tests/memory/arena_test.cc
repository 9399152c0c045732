#include "memory/arena.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "kvbounce/logging.h"
#include "memory_test_util.h"

namespace kvbounce {
namespace {

using ::kvbounce::testing_util::EventLog;
using ::kvbounce::testing_util::FakeAllocation;
using ::kvbounce::testing_util::FakeRegistration;
using ::kvbounce::testing_util::IsOk;
using ::kvbounce::testing_util::StatusIs;
using std::chrono::milliseconds;
using std::chrono::nanoseconds;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using Clock = std::chrono::steady_clock;

constexpr uint64_t kAlign = Arena::kMinAlignment;

// Silences the arena's warnings (expected in tests that drop an arena with
// slots outstanding) while a test runs.
class QuietLog {
 public:
  QuietLog() : previous_(SetLogSink([](LogLevel, std::string_view) {})) {}
  ~QuietLog() { SetLogSink(previous_); }

 private:
  LogSink previous_;
};

std::unique_ptr<Arena> MakeArena(uint64_t bytes, std::string name = "test",
                                 uint64_t alignment = kAlign) {
  auto allocation = HostAllocation::Create(bytes, 4096);
  EXPECT_TRUE(allocation.ok()) << allocation.status();
  auto arena = Arena::Create({std::move(name), alignment}, std::move(allocation).value());
  EXPECT_TRUE(arena.ok()) << arena.status();
  return std::move(arena).value();
}

Slot MustReserve(Arena& arena, uint64_t bytes) {
  auto slot = arena.TryReserve(bytes);
  EXPECT_TRUE(slot.ok()) << slot.status();
  return slot.ok() ? std::move(slot).value() : Slot();
}

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Waits (bounded) until `arena` has `n` blocked reservers.
bool WaitForWaiters(const Arena& arena, size_t n) {
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  while (arena.num_waiters() < n) {
    if (Clock::now() > deadline) return false;
    std::this_thread::sleep_for(milliseconds(1));
  }
  return true;
}

// ---------------------------------------------------------------------------
// Creation and bad input

TEST(ArenaCreateTest, CapacityIsSizeRoundedDownToAlignment) {
  auto arena = MakeArena(1000);
  EXPECT_EQ(arena->capacity(), 768u);
  EXPECT_EQ(arena->free_bytes(), 768u);
  EXPECT_EQ(arena->largest_hole(), 768u);
  EXPECT_EQ(arena->outstanding_bytes(), 0u);
  EXPECT_EQ(arena->name(), "test");
  EXPECT_EQ(arena->alignment(), kAlign);
  EXPECT_EQ(arena->memory_kind(), MemoryKind::kHost);
  EXPECT_FALSE(arena->closed());
  EXPECT_THAT(arena->CheckInvariants(), IsOk());
}

TEST(ArenaCreateTest, RejectsBadOptionsNamingTheArena) {
  auto host = [] { return std::move(HostAllocation::Create(1 << 16, 4096)).value(); };
  EXPECT_THAT(Arena::Create({"bad", kAlign}, nullptr),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("arena 'bad'")));
  EXPECT_THAT(Arena::Create({"", kAlign}, host()),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("name")));
  for (uint64_t alignment : {uint64_t{0}, uint64_t{1}, uint64_t{128}, uint64_t{300}, uint64_t{1000},
                             uint64_t{3} << 10}) {
    EXPECT_THAT(Arena::Create({"bad", alignment}, host()),
                StatusIs(StatusCode::kInvalidArgument,
                         AllOf(HasSubstr("arena 'bad'"), HasSubstr("alignment"))))
        << "alignment " << alignment;
  }
  // Smaller than one alignment unit.
  EXPECT_THAT(Arena::Create({"bad", 4096}, std::move(HostAllocation::Create(4095)).value()),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("arena 'bad'")));
  // Base address not aligned.
  auto log = std::make_shared<EventLog>();
  EXPECT_THAT(
      Arena::Create({"bad", 1024}, FakeAllocation::Device(Addr(0x100000 + 512), 1 << 20, log)),
      StatusIs(StatusCode::kInvalidArgument,
               AllOf(HasSubstr("arena 'bad'"), HasSubstr("address"))));
  // The rejected allocation was freed.
  EXPECT_THAT(log->events(), ElementsAre("free mem"));
}

TEST(ArenaReserveTest, RejectsZeroBytesNamingTheArena) {
  auto arena = MakeArena(1 << 16, "send");
  EXPECT_THAT(arena->TryReserve(0),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("arena 'send'")));
  EXPECT_THAT(arena->Reserve(0, milliseconds(100)), StatusIs(StatusCode::kInvalidArgument));
  const std::vector<uint64_t> none;
  EXPECT_THAT(arena->TryReserve(none),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("arena 'send'")));
  const std::vector<uint64_t> has_zero = {100, 0, 100};
  EXPECT_THAT(arena->TryReserve(has_zero),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("sub-slot 1")));
  EXPECT_EQ(arena->outstanding_bytes(), 0u);
}

// ---------------------------------------------------------------------------
// First fit

TEST(ArenaFirstFitTest, ReusesAHoleFreedOutOfOrderAtOnce) {
  auto arena = MakeArena(16 * kAlign);
  Slot a = MustReserve(*arena, 2 * kAlign);
  Slot b = MustReserve(*arena, 3 * kAlign - 10);  // rounds up to 3 units
  Slot c = MustReserve(*arena, kAlign);
  EXPECT_EQ(a.offset(), 0u);
  EXPECT_EQ(b.offset(), 2 * kAlign);
  EXPECT_EQ(b.size(), 3 * kAlign - 10);
  EXPECT_EQ(b.reserved_bytes(), 3 * kAlign);
  EXPECT_EQ(c.offset(), 5 * kAlign);
  EXPECT_EQ(arena->outstanding_bytes(), 6 * kAlign);

  const uint64_t b_offset = b.offset();
  b.Release();
  EXPECT_FALSE(b.valid());
  EXPECT_THAT(arena->CheckInvariants(), IsOk());
  // Fits in B's hole: takes it, although the tail hole is bigger.
  Slot d = MustReserve(*arena, 2 * kAlign);
  EXPECT_EQ(d.offset(), b_offset);
  // The rest of B's hole (1 unit) is still the lowest 1-unit hole.
  Slot e = MustReserve(*arena, 1);
  EXPECT_EQ(e.offset(), b_offset + 2 * kAlign);
  // Too big for any hole below C: goes after C.
  Slot f = MustReserve(*arena, 2 * kAlign);
  EXPECT_EQ(f.offset(), 6 * kAlign);
  EXPECT_THAT(arena->CheckInvariants(), IsOk());

  // Free A and D (neighbours): one coalesced hole [0, 4 units) that a
  // 4-unit request takes at offset 0.
  a.Release();
  d.Release();
  EXPECT_THAT(arena->CheckInvariants(), IsOk());
  Slot g = MustReserve(*arena, 4 * kAlign);
  EXPECT_EQ(g.offset(), 0u);

  g.Release();
  c.Release();
  e.Release();
  f.Release();
  EXPECT_EQ(arena->outstanding_bytes(), 0u);
  EXPECT_EQ(arena->largest_hole(), arena->capacity());
  EXPECT_THAT(arena->CheckInvariants(), IsOk());
}

TEST(ArenaFirstFitTest, LowestHoleWins) {
  auto arena = MakeArena(10 * kAlign);
  std::vector<Slot> slots;
  for (int i = 0; i < 10; ++i) slots.push_back(MustReserve(*arena, kAlign));
  // Holes at units 7, 2 and 5 freed in that order: the next three 1-unit
  // reservations come back lowest first.
  slots[7].Release();
  slots[2].Release();
  slots[5].Release();
  EXPECT_EQ(MustReserve(*arena, kAlign).offset(), 2 * kAlign);  // released at once
  Slot x = MustReserve(*arena, kAlign);
  Slot y = MustReserve(*arena, kAlign);
  EXPECT_EQ(x.offset(), 2 * kAlign);
  EXPECT_EQ(y.offset(), 5 * kAlign);
  EXPECT_EQ(arena->largest_hole(), kAlign);
}

TEST(ArenaSlotTest, MoveAndReleaseReturnTheRangeExactlyOnce) {
  auto arena = MakeArena(8 * kAlign);
  Slot empty;
  EXPECT_FALSE(empty.valid());
  EXPECT_EQ(empty.num_sub_slots(), 0u);
  empty.Release();  // no-op

  Slot a = MustReserve(*arena, 100);
  ASSERT_TRUE(a.valid());
  EXPECT_EQ(a.num_sub_slots(), 1u);
  EXPECT_EQ(a.sub_slot(0).offset, a.offset());
  EXPECT_EQ(a.sub_slot(0).size, 100u);
  EXPECT_EQ(a.host_pointer(), static_cast<std::byte*>(arena->base_address().ToPointer()));
  EXPECT_EQ(a.address(), arena->base_address());

  Slot moved(std::move(a));
  EXPECT_FALSE(a.valid());  // NOLINT(bugprone-use-after-move): checking the moved-from state
  EXPECT_EQ(arena->outstanding_bytes(), kAlign);

  Slot b = MustReserve(*arena, 2 * kAlign);
  EXPECT_EQ(arena->outstanding_bytes(), 3 * kAlign);
  b = std::move(moved);  // releases b's 2 units, takes moved's 1
  EXPECT_EQ(arena->outstanding_bytes(), kAlign);
  EXPECT_EQ(b.offset(), 0u);
  b.Release();
  b.Release();
  EXPECT_EQ(arena->outstanding_bytes(), 0u);
  EXPECT_THAT(arena->CheckInvariants(), IsOk());
}

// ---------------------------------------------------------------------------
// Fan-in sub-slots

TEST(ArenaFanInTest, SubSlotsAreExactAlignedDisjointAndInsideTheSlot) {
  auto arena = MakeArena(64 * kAlign, "recv");
  Slot first = MustReserve(*arena, 3 * kAlign);  // so the slot does not start at 0
  const std::vector<uint64_t> sizes = {1000, 256, 1, 5000, 257};
  auto slot = arena->TryReserve(sizes);
  ASSERT_TRUE(slot.ok()) << slot.status();
  ASSERT_EQ(slot->num_sub_slots(), sizes.size());
  EXPECT_EQ(slot->offset(), 3 * kAlign);

  uint64_t expected_offset = slot->offset();
  uint64_t aligned_total = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    const SubSlot sub = slot->sub_slot(i);
    EXPECT_EQ(sub.size, sizes[i]) << i;
    EXPECT_EQ(sub.offset, expected_offset) << i;  // packed right after the previous one
    EXPECT_EQ(sub.offset % kAlign, 0u) << i;
    EXPECT_EQ(sub.address, arena->base_address() + sub.offset) << i;
    EXPECT_EQ(sub.host_pointer,
              static_cast<std::byte*>(arena->base_address().ToPointer()) + sub.offset)
        << i;
    EXPECT_GE(sub.offset, slot->offset());
    EXPECT_LE(sub.offset + sub.size, slot->offset() + slot->size());
    if (i > 0) {
      const SubSlot prev = slot->sub_slot(i - 1);
      EXPECT_GE(sub.offset, prev.offset + prev.size) << i;  // disjoint
    }
    // Each writer's piece is writable (ASan checks the bounds).
    std::memset(sub.host_pointer, static_cast<int>(i), sub.size);
    expected_offset += AlignUp(sizes[i], kAlign);
    aligned_total += AlignUp(sizes[i], kAlign);
  }
  const SubSlot last = slot->sub_slot(sizes.size() - 1);
  EXPECT_EQ(slot->size(), last.offset + last.size - slot->offset());
  EXPECT_EQ(slot->reserved_bytes(), aligned_total);
  EXPECT_EQ(arena->outstanding_bytes(), 3 * kAlign + aligned_total);
  EXPECT_THAT(arena->CheckInvariants(), IsOk());

  slot->Release();
  first.Release();
  EXPECT_EQ(arena->outstanding_bytes(), 0u);
}

TEST(ArenaFanInTest, AllOrNothingAndOversizeAfterAlignment) {
  auto arena = MakeArena(4 * kAlign, "recv");
  // Five 1-byte writers need five aligned units: can never fit in four.
  const std::vector<uint64_t> five = {1, 1, 1, 1, 1};
  EXPECT_THAT(arena->Reserve(five, std::chrono::seconds(10)),
              StatusIs(StatusCode::kOutOfRange, HasSubstr("arena 'recv'")));
  const std::vector<uint64_t> huge = {std::numeric_limits<uint64_t>::max(),
                                      std::numeric_limits<uint64_t>::max()};
  EXPECT_THAT(arena->TryReserve(huge), StatusIs(StatusCode::kOutOfRange));
  // Four fit exactly.
  const std::vector<uint64_t> four = {1, kAlign, 2, kAlign};
  auto slot = arena->TryReserve(four);
  ASSERT_TRUE(slot.ok()) << slot.status();
  EXPECT_EQ(arena->free_bytes(), 0u);
  // Nothing left: backpressure, and nothing partially reserved.
  const std::vector<uint64_t> two = {1, 1};
  EXPECT_THAT(arena->TryReserve(two), StatusIs(StatusCode::kResourceExhausted));
  EXPECT_EQ(arena->outstanding_bytes(), 4 * kAlign);
}

TEST(ArenaFanInTest, DeviceMemoryHasAddressesButNoHostPointers) {
  auto log = std::make_shared<EventLog>();
  const Addr base(0x7f0000000000);
  auto arena = Arena::Create({"gpu", 4096}, FakeAllocation::Device(base, 1 << 20, log));
  ASSERT_TRUE(arena.ok()) << arena.status();
  EXPECT_EQ((*arena)->memory_kind(), MemoryKind::kCuda);
  EXPECT_EQ((*arena)->base_address(), base);
  Slot pad = MustReserve(**arena, 1);
  const std::vector<uint64_t> sizes = {5000, 3};
  auto slot = (*arena)->TryReserve(sizes);
  ASSERT_TRUE(slot.ok()) << slot.status();
  EXPECT_EQ(slot->address(), base + 4096);
  EXPECT_EQ(slot->host_pointer(), nullptr);
  EXPECT_EQ(slot->sub_slot(1).address, base + 4096 + 8192);
  EXPECT_EQ(slot->sub_slot(1).host_pointer, nullptr);
}

// ---------------------------------------------------------------------------
// Backpressure, oversize, close

TEST(ArenaBackpressureTest, FullArenaReportsBackpressureAfterItsTimeout) {
  auto arena = MakeArena(4 * kAlign, "send");
  Slot all = MustReserve(*arena, 4 * kAlign);
  const auto timeout = milliseconds(200);
  const auto start = Clock::now();
  auto slot = arena->Reserve(1, timeout);
  const double waited = SecondsSince(start);
  EXPECT_THAT(slot, StatusIs(StatusCode::kResourceExhausted,
                             AllOf(HasSubstr("arena 'send'"), HasSubstr("backpressure"),
                                   HasSubstr("1 bytes"), HasSubstr("free 0"),
                                   HasSubstr("largest hole 0"), HasSubstr("200ms"))));
  EXPECT_GE(waited, 0.2);
  EXPECT_LT(waited, 2.2);
  EXPECT_EQ(arena->num_waiters(), 0u);
}

TEST(ArenaBackpressureTest, ZeroOrNegativeTimeoutTriesOnce) {
  auto arena = MakeArena(4 * kAlign);
  Slot all = MustReserve(*arena, 4 * kAlign);
  for (nanoseconds timeout : {nanoseconds(0), nanoseconds(-5'000'000)}) {
    const auto start = Clock::now();
    EXPECT_THAT(arena->Reserve(1, timeout), StatusIs(StatusCode::kResourceExhausted));
    EXPECT_LT(SecondsSince(start), 1.0);
  }
}

TEST(ArenaBackpressureTest, MessageGivesFreeBytesAndLargestHole) {
  auto arena = MakeArena(8 * kAlign, "send");
  std::vector<Slot> slots;
  for (int i = 0; i < 8; ++i) slots.push_back(MustReserve(*arena, kAlign));
  slots[1].Release();
  slots[2].Release();
  slots[5].Release();
  EXPECT_THAT(arena->TryReserve(3 * kAlign),
              StatusIs(StatusCode::kResourceExhausted,
                       AllOf(HasSubstr("768 bytes"), HasSubstr("free 768 of 2048"),
                             HasSubstr("largest hole 512"))));
}

TEST(ArenaBackpressureTest, ReleaseFromAnotherThreadWakesTheWaiter) {
  auto arena = MakeArena(4 * kAlign);
  Slot all = MustReserve(*arena, 4 * kAlign);
  std::thread releaser([&arena, slot = std::move(all)]() mutable {
    ASSERT_TRUE(WaitForWaiters(*arena, 1));
    slot.Release();
  });
  const auto start = Clock::now();
  auto slot = arena->Reserve(2 * kAlign, std::chrono::seconds(20));
  const double waited = SecondsSince(start);
  releaser.join();
  ASSERT_TRUE(slot.ok()) << slot.status();
  EXPECT_EQ(slot->offset(), 0u);
  EXPECT_LT(waited, 10.0);
}

TEST(ArenaBackpressureTest, UnboundedTimeoutWaitsUntilSpaceAppears) {
  auto arena = MakeArena(4 * kAlign);
  Slot all = MustReserve(*arena, 4 * kAlign);
  std::thread releaser([&arena, slot = std::move(all)]() mutable {
    ASSERT_TRUE(WaitForWaiters(*arena, 1));
    slot.Release();
  });
  auto slot = arena->Reserve(kAlign, nanoseconds::max());
  releaser.join();
  EXPECT_TRUE(slot.ok()) << slot.status();
}

TEST(ArenaBackpressureTest, OversizeIsRefusedAtOnceWhateverTheTimeout) {
  auto arena = MakeArena(4 * kAlign, "send");
  const auto start = Clock::now();
  EXPECT_THAT(arena->Reserve(4 * kAlign + 1, std::chrono::seconds(30)),
              StatusIs(StatusCode::kOutOfRange,
                       AllOf(HasSubstr("arena 'send'"), HasSubstr("1025"), HasSubstr("1024"))));
  EXPECT_THAT(arena->Reserve(std::numeric_limits<uint64_t>::max(), nanoseconds::max()),
              StatusIs(StatusCode::kOutOfRange));
  EXPECT_LT(SecondsSince(start), 1.0);
  // Even when the arena is full, exactly-capacity is backpressure, not oversize.
  Slot all = MustReserve(*arena, 4 * kAlign);
  EXPECT_THAT(arena->TryReserve(4 * kAlign), StatusIs(StatusCode::kResourceExhausted));
}

TEST(ArenaCloseTest, CloseWakesEveryBlockedReserver) {
  auto arena = MakeArena(4 * kAlign, "recv");
  Slot all = MustReserve(*arena, 4 * kAlign);
  constexpr int kWaiters = 3;
  std::vector<std::optional<Status>> results(kWaiters);
  std::vector<std::thread> threads;
  for (int i = 0; i < kWaiters; ++i) {
    threads.emplace_back([&, i] {
      const auto timeout = i == 0 ? nanoseconds::max() : nanoseconds(std::chrono::seconds(60));
      auto slot = arena->Reserve(kAlign, timeout);
      results[i] = slot.status();
    });
  }
  ASSERT_TRUE(WaitForWaiters(*arena, kWaiters));
  const auto start = Clock::now();
  EXPECT_EQ(arena->Close(), 4 * kAlign);
  for (auto& t : threads) t.join();
  EXPECT_LT(SecondsSince(start), 5.0);
  for (int i = 0; i < kWaiters; ++i) {
    ASSERT_TRUE(results[i].has_value());
    EXPECT_THAT(*results[i], StatusIs(StatusCode::kAborted,
                                      AllOf(HasSubstr("arena 'recv'"), HasSubstr("closed"))));
  }
  EXPECT_TRUE(arena->closed());
  EXPECT_THAT(arena->TryReserve(1), StatusIs(StatusCode::kAborted));
  EXPECT_THAT(arena->Reserve(1, std::chrono::seconds(10)), StatusIs(StatusCode::kAborted));
  EXPECT_FALSE(arena->memory_released());
  all.Release();
  EXPECT_TRUE(arena->memory_released());
  EXPECT_EQ(arena->Close(), 0u);  // idempotent
}

// ---------------------------------------------------------------------------
// Quarantine

TEST(ArenaQuarantineTest, QuarantinedRangeIsNeverHandedOut) {
  constexpr int kUnits = 8;
  auto arena = MakeArena(kUnits * kAlign);
  std::vector<Slot> slots;
  for (int i = 0; i < kUnits; ++i) slots.push_back(MustReserve(*arena, kAlign));
  const uint64_t q_offset = slots[3].offset();
  auto token = arena->Quarantine(std::move(slots[3]));
  ASSERT_TRUE(token.ok()) << token.status();
  EXPECT_FALSE(slots[3].valid());
  EXPECT_EQ(arena->quarantined_bytes(), kAlign);
  EXPECT_EQ(arena->quarantined_count(), 1u);
  EXPECT_EQ(arena->outstanding_bytes(), kUnits * kAlign);
  EXPECT_THAT(arena->CheckInvariants(), IsOk());

  slots.clear();
  EXPECT_EQ(arena->outstanding_bytes(), kAlign);
  // The largest request that fits avoids the quarantined unit.
  EXPECT_EQ(arena->largest_hole(), 4 * kAlign);
  EXPECT_THAT(arena->TryReserve(5 * kAlign), StatusIs(StatusCode::kResourceExhausted));
  // Fill everything that can be had; nothing may overlap the quarantine.
  for (int i = 0; i < kUnits; ++i) {
    auto slot = arena->TryReserve(kAlign);
    if (!slot.ok()) {
      EXPECT_THAT(slot, StatusIs(StatusCode::kResourceExhausted));
      break;
    }
    EXPECT_NE(slot->offset(), q_offset);
    slots.push_back(std::move(slot).value());
  }
  EXPECT_EQ(slots.size(), kUnits - 1u);
  EXPECT_THAT(arena->CheckInvariants(), IsOk());

  ASSERT_THAT(arena->ReleaseQuarantined(*token), IsOk());
  EXPECT_EQ(arena->quarantined_bytes(), 0u);
  Slot reused = MustReserve(*arena, kAlign);
  EXPECT_EQ(reused.offset(), q_offset);
  EXPECT_THAT(arena->ReleaseQuarantined(*token),
              StatusIs(StatusCode::kNotFound, HasSubstr("arena 'test'")));
  EXPECT_THAT(arena->ReleaseQuarantined(12345), StatusIs(StatusCode::kNotFound));
}

TEST(ArenaQuarantineTest, RejectsEmptySlotsAndSlotsOfAnotherArena) {
  auto a = MakeArena(4 * kAlign, "a");
  auto b = MakeArena(4 * kAlign, "b");
  Slot empty;
  EXPECT_THAT(a->Quarantine(std::move(empty)),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("arena 'a'")));
  Slot from_b = MustReserve(*b, kAlign);
  EXPECT_THAT(a->Quarantine(std::move(from_b)),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("another arena")));
  EXPECT_TRUE(from_b.valid());  // NOLINT(bugprone-use-after-move): untouched on error
  EXPECT_EQ(b->outstanding_bytes(), kAlign);
  EXPECT_EQ(a->outstanding_bytes(), 0u);
}

TEST(ArenaQuarantineTest, TokensAreDistinctAndAllowedAfterClose) {
  auto arena = MakeArena(4 * kAlign);
  Slot s1 = MustReserve(*arena, kAlign);
  Slot s2 = MustReserve(*arena, kAlign);
  auto t1 = arena->Quarantine(std::move(s1));
  ASSERT_TRUE(t1.ok());
  arena->Close();
  auto t2 = arena->Quarantine(std::move(s2));
  ASSERT_TRUE(t2.ok());
  EXPECT_NE(*t1, *t2);
  EXPECT_NE(*t1, 0u);
  EXPECT_EQ(arena->quarantined_bytes(), 2 * kAlign);
  EXPECT_THAT(arena->ReleaseQuarantined(*t2), IsOk());
  EXPECT_FALSE(arena->memory_released());
  EXPECT_THAT(arena->ReleaseQuarantined(*t1), IsOk());
  EXPECT_TRUE(arena->memory_released());
  EXPECT_THAT(arena->CheckInvariants(), IsOk());
}

// ---------------------------------------------------------------------------
// Registration and memory lifetime

struct ArenaWithLog {
  std::shared_ptr<EventLog> log = std::make_shared<EventLog>();
  std::unique_ptr<Arena> arena;
};

ArenaWithLog MakeRegisteredArena(uint64_t bytes) {
  ArenaWithLog out;
  auto arena = Arena::Create({"reg", kAlign}, FakeAllocation::Host(bytes, out.log));
  EXPECT_TRUE(arena.ok()) << arena.status();
  out.arena = std::move(arena).value();
  EXPECT_THAT(out.arena->AttachRegistration(std::make_unique<FakeRegistration>(out.log, "reg")),
              IsOk());
  return out;
}

TEST(ArenaRegistrationTest, CloseWithNothingOutstandingReleasesRegistrationThenMemory) {
  auto [log, arena] = MakeRegisteredArena(8 * kAlign);
  { Slot s = MustReserve(*arena, kAlign); }
  EXPECT_THAT(log->events(), IsEmpty());
  EXPECT_EQ(arena->Close(), 0u);
  EXPECT_TRUE(arena->memory_released());
  EXPECT_THAT(log->events(), ElementsAre("deregister reg", "free mem"));
  arena->Close();
  arena.reset();
  EXPECT_THAT(log->events(), ElementsAre("deregister reg", "free mem"));
}

TEST(ArenaRegistrationTest, DestroyingTheArenaReleasesOnce) {
  auto [log, arena] = MakeRegisteredArena(8 * kAlign);
  arena.reset();
  EXPECT_THAT(log->events(), ElementsAre("deregister reg", "free mem"));
}

TEST(ArenaRegistrationTest, SlotsOutliveTheArenaAndKeepTheMemory) {
  QuietLog quiet;
  auto [log, arena] = MakeRegisteredArena(8 * kAlign);
  Slot s1 = MustReserve(*arena, 2 * kAlign);
  const std::vector<uint64_t> sizes = {100, 200};
  auto s2 = arena->TryReserve(sizes);
  ASSERT_TRUE(s2.ok());
  arena.reset();
  EXPECT_THAT(log->events(), IsEmpty());
  // Still valid memory (ASan would flag a use after free).
  std::memset(s1.host_pointer(), 0x5a, s1.size());
  std::memset(s2->sub_slot(1).host_pointer, 0x5b, s2->sub_slot(1).size);
  s1.Release();
  EXPECT_THAT(log->events(), IsEmpty());
  Slot last = std::move(s2).value();
  last = Slot();  // move-assigning an empty slot releases the old range
  EXPECT_THAT(log->events(), ElementsAre("deregister reg", "free mem"));
}

TEST(ArenaRegistrationTest, CloseWithSlotsOutstandingDefersTheRelease) {
  auto [log, arena] = MakeRegisteredArena(8 * kAlign);
  Slot s = MustReserve(*arena, 3 * kAlign);
  EXPECT_EQ(arena->Close(), 3 * kAlign);
  EXPECT_FALSE(arena->memory_released());
  EXPECT_THAT(log->events(), IsEmpty());
  s.Release();
  EXPECT_TRUE(arena->memory_released());
  EXPECT_THAT(log->events(), ElementsAre("deregister reg", "free mem"));
  arena.reset();
  EXPECT_THAT(log->events(), ElementsAre("deregister reg", "free mem"));
}

TEST(ArenaRegistrationTest, DestroyingTheArenaDropsQuarantine) {
  QuietLog quiet;
  auto [log, arena] = MakeRegisteredArena(8 * kAlign);
  auto token = arena->Quarantine(MustReserve(*arena, kAlign));
  ASSERT_TRUE(token.ok());
  arena->Close();
  EXPECT_THAT(log->events(), IsEmpty());
  arena.reset();
  EXPECT_THAT(log->events(), ElementsAre("deregister reg", "free mem"));
}

TEST(ArenaRegistrationTest, ReleasedFromTheThreadThatReleasesTheLastSlot) {
  auto [log, arena] = MakeRegisteredArena(8 * kAlign);
  Slot s = MustReserve(*arena, kAlign);
  arena->Close();
  std::thread t([slot = std::move(s)]() mutable { slot.Release(); });
  t.join();
  EXPECT_THAT(log->events(), ElementsAre("deregister reg", "free mem"));
}

TEST(ArenaRegistrationTest, AttachRejectsNullDuplicatesAndClosedArenas) {
  auto [log, arena] = MakeRegisteredArena(8 * kAlign);
  EXPECT_THAT(arena->AttachRegistration(nullptr),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("arena 'reg'")));
  EXPECT_THAT(arena->AttachRegistration(std::make_unique<FakeRegistration>(log, "second")),
              StatusIs(StatusCode::kAlreadyExists,
                       AllOf(HasSubstr("arena 'reg'"), HasSubstr("already registered as 'reg'"))));
  // The refused registration was released at once; the first one is kept.
  EXPECT_THAT(log->events(), ElementsAre("deregister second"));
  arena->Close();
  EXPECT_THAT(log->events(), ElementsAre("deregister second", "deregister reg", "free mem"));

  auto other = MakeArena(4 * kAlign, "closed");
  other->Close();
  EXPECT_THAT(other->AttachRegistration(std::make_unique<FakeRegistration>(log, "late")),
              StatusIs(StatusCode::kFailedPrecondition, HasSubstr("arena 'closed'")));
  EXPECT_EQ(log->events().back(), "deregister late");
}

TEST(ArenaRegistrationTest, WithoutARegistrationOnlyTheMemoryIsFreed) {
  auto log = std::make_shared<EventLog>();
  auto arena = Arena::Create({"plain", kAlign}, FakeAllocation::Host(4 * kAlign, log));
  ASSERT_TRUE(arena.ok());
  (*arena)->Close();
  EXPECT_THAT(log->events(), ElementsAre("free mem"));
}

// ---------------------------------------------------------------------------
// Random operation sequences against an independent model

// The model: one owner id per alignment unit (0 = free). A reservation of n
// units must land at the lowest run of n free units, found by brute force.
class Model {
 public:
  explicit Model(size_t units) : owner_(units, 0) {}

  std::optional<size_t> LowestFit(size_t n) const {
    size_t run = 0;
    for (size_t i = 0; i < owner_.size(); ++i) {
      run = owner_[i] == 0 ? run + 1 : 0;
      if (run == n) return i + 1 - n;
    }
    return std::nullopt;
  }
  size_t LongestRun() const {
    size_t run = 0;
    size_t best = 0;
    for (int o : owner_) {
      run = o == 0 ? run + 1 : 0;
      best = std::max(best, run);
    }
    return best;
  }
  size_t FreeUnits() const { return std::count(owner_.begin(), owner_.end(), 0); }
  size_t units() const { return owner_.size(); }

  void Take(size_t first, size_t n, int id) {
    for (size_t i = first; i < first + n; ++i) {
      ASSERT_EQ(owner_[i], 0) << "unit " << i << " handed out twice";
      owner_[i] = id;
    }
  }
  void Give(size_t first, size_t n, int id) {
    for (size_t i = first; i < first + n; ++i) {
      ASSERT_EQ(owner_[i], id) << "unit " << i;
      owner_[i] = 0;
    }
  }

 private:
  std::vector<int> owner_;
};

struct LiveSlot {
  Slot slot;
  int id;
};
struct Quarantined {
  QuarantineToken token;
  uint64_t offset;
  uint64_t reserved;
  int id;
};

void RunRandomSequence(uint64_t seed, uint64_t alignment, uint64_t region_bytes, int ops) {
  SCOPED_TRACE("seed " + std::to_string(seed));
  auto arena = MakeArena(region_bytes, "random", alignment);
  ASSERT_NE(arena, nullptr);
  const uint64_t capacity = arena->capacity();
  Model model(capacity / alignment);
  std::mt19937_64 rng(seed);
  auto uniform = [&rng](uint64_t lo, uint64_t hi) {
    return std::uniform_int_distribution<uint64_t>(lo, hi)(rng);
  };
  std::vector<LiveSlot> live;
  std::vector<Quarantined> quarantined;
  int next_id = 1;
  uint64_t quarantined_bytes = 0;

  auto random_size = [&]() -> uint64_t {
    switch (uniform(0, 9)) {
      case 0:
        return uniform(1, capacity + 4 * alignment);  // sometimes oversize
      case 1:
        return uniform(1, 3) * alignment;  // exact multiples
      default:
        return uniform(1, 6 * alignment);
    }
  };
  auto check_reserved = [&](Result<Slot>& result, const std::vector<uint64_t>& sizes) {
    uint64_t units = 0;
    bool oversize = false;
    for (uint64_t s : sizes) {
      if (s > capacity) oversize = true;
      units += AlignUp(s, alignment) / alignment;
    }
    if (oversize || units > model.units()) {
      ASSERT_THAT(result, StatusIs(StatusCode::kOutOfRange));
      return;
    }
    const std::optional<size_t> fit = model.LowestFit(units);
    if (!fit.has_value()) {
      ASSERT_THAT(result, StatusIs(StatusCode::kResourceExhausted));
      return;
    }
    ASSERT_TRUE(result.ok()) << result.status();
    ASSERT_EQ(result->offset(), *fit * alignment);
    ASSERT_EQ(result->reserved_bytes(), units * alignment);
    ASSERT_EQ(result->num_sub_slots(), sizes.size());
    for (size_t i = 0; i < sizes.size(); ++i) {
      ASSERT_EQ(result->sub_slot(i).size, sizes[i]);
      ASSERT_EQ(result->sub_slot(i).offset % alignment, 0u);
    }
    const int id = next_id++;
    model.Take(*fit, units, id);
    live.push_back({std::move(result).value(), id});
  };

  for (int op = 0; op < ops; ++op) {
    const uint64_t kind = uniform(0, 99);
    if (kind < 40) {
      const uint64_t size = random_size();
      auto result = arena->TryReserve(size);
      check_reserved(result, {size});
    } else if (kind < 50) {
      std::vector<uint64_t> sizes(uniform(1, 4));
      for (auto& s : sizes) s = uniform(1, 3 * alignment);
      auto result = arena->TryReserve(sizes);
      check_reserved(result, sizes);
    } else if (kind < 80 && !live.empty()) {
      const size_t i = uniform(0, live.size() - 1);
      const Slot& s = live[i].slot;
      model.Give(s.offset() / alignment, s.reserved_bytes() / alignment, live[i].id);
      std::swap(live[i], live.back());
      live.pop_back();  // destroying the Slot releases it
    } else if (kind < 85 && live.size() >= 2) {
      // Move-assign one live slot onto another: the target's range is freed.
      const size_t i = uniform(0, live.size() - 2);
      LiveSlot& target = live[i];
      model.Give(target.slot.offset() / alignment, target.slot.reserved_bytes() / alignment,
                 target.id);
      target.slot = std::move(live.back().slot);
      target.id = live.back().id;
      live.pop_back();
    } else if (kind < 92 && !live.empty()) {
      const size_t i = uniform(0, live.size() - 1);
      const uint64_t offset = live[i].slot.offset();
      const uint64_t reserved = live[i].slot.reserved_bytes();
      auto token = arena->Quarantine(std::move(live[i].slot));
      ASSERT_TRUE(token.ok()) << token.status();
      quarantined.push_back({*token, offset, reserved, live[i].id});
      quarantined_bytes += reserved;
      std::swap(live[i], live.back());
      live.pop_back();
    } else if (!quarantined.empty()) {
      const size_t i = uniform(0, quarantined.size() - 1);
      ASSERT_THAT(arena->ReleaseQuarantined(quarantined[i].token), IsOk());
      model.Give(quarantined[i].offset / alignment, quarantined[i].reserved / alignment,
                 quarantined[i].id);
      quarantined_bytes -= quarantined[i].reserved;
      std::swap(quarantined[i], quarantined.back());
      quarantined.pop_back();
    }
    if (::testing::Test::HasFatalFailure()) return;

    ASSERT_THAT(arena->CheckInvariants(), IsOk()) << "after op " << op;
    const uint64_t used = (model.units() - model.FreeUnits()) * alignment;
    ASSERT_EQ(arena->outstanding_bytes(), used) << "after op " << op;
    ASSERT_EQ(arena->free_bytes(), capacity - used);
    ASSERT_EQ(arena->quarantined_bytes(), quarantined_bytes);
    ASSERT_EQ(arena->quarantined_count(), quarantined.size());
    ASSERT_EQ(arena->largest_hole(), model.LongestRun() * alignment) << "after op " << op;
  }

  live.clear();
  for (const Quarantined& q : quarantined) ASSERT_THAT(arena->ReleaseQuarantined(q.token), IsOk());
  EXPECT_EQ(arena->outstanding_bytes(), 0u);
  EXPECT_EQ(arena->largest_hole(), capacity);
  EXPECT_THAT(arena->CheckInvariants(), IsOk());
}

TEST(ArenaRandomTest, MatchesBruteForceModel) {
  for (uint64_t seed : {1u, 2u, 3u, 42u}) {
    RunRandomSequence(seed, kAlign, 96 * kAlign, 2500);
    if (HasFatalFailure()) return;
  }
}

TEST(ArenaRandomTest, MatchesBruteForceModelWithLargeAlignmentAndRaggedRegion) {
  // 37 units of 4 KiB plus a tail that is not a whole unit.
  RunRandomSequence(7, 4096, 37 * 4096 + 1000, 3000);
}

// ---------------------------------------------------------------------------
// Concurrency

TEST(ArenaStressTest, ConcurrentReserveReleaseQuarantineEndsWithNothingOutstanding) {
  auto arena = MakeArena(128 * kAlign, "stress");
  constexpr int kThreads = 4;
  constexpr int kIterations = 400;
  std::atomic<int> successes{0};
  std::atomic<int> backpressure{0};
  std::atomic<bool> done{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(1000 + t);
      std::vector<Slot> held;
      for (int i = 0; i < kIterations; ++i) {
        const uint64_t bytes = std::uniform_int_distribution<uint64_t>(1, 16 * kAlign)(rng);
        Result<Slot> slot =
            (i % 5 == 0)
                ? arena->Reserve(std::array<uint64_t, 3>{bytes / 3 + 1, 7, 300}, milliseconds(5))
                : arena->Reserve(bytes, milliseconds(5));
        if (!slot.ok()) {
          EXPECT_THAT(slot, StatusIs(StatusCode::kResourceExhausted));
          ++backpressure;
        } else {
          ++successes;
          // Touch the first and last bytes we own: overlapping slots would be
          // a data race that TSan reports.
          auto* p = static_cast<unsigned char*>(slot->host_pointer());
          p[0] = static_cast<unsigned char>(t);
          p[slot->size() - 1] = static_cast<unsigned char>(i);
          if (i % 17 == 0) {
            auto token = arena->Quarantine(std::move(slot).value());
            EXPECT_TRUE(token.ok());
            if (token.ok()) {
              EXPECT_THAT(arena->ReleaseQuarantined(*token), IsOk());
            }
          } else {
            held.push_back(std::move(slot).value());
          }
        }
        // Hold up to three slots, releasing in a scrambled order.
        if (held.size() > 3 || (i % 3 == 0 && !held.empty())) {
          const size_t k = std::uniform_int_distribution<size_t>(0, held.size() - 1)(rng);
          held.erase(held.begin() + static_cast<std::ptrdiff_t>(k));
        }
      }
    });
  }
  std::thread checker([&] {
    while (!done.load()) {
      EXPECT_THAT(arena->CheckInvariants(), IsOk());
      std::this_thread::sleep_for(milliseconds(2));
    }
  });
  for (auto& t : threads) t.join();
  done = true;
  checker.join();
  EXPECT_GT(successes.load(), 0);
  EXPECT_EQ(successes.load() + backpressure.load(), kThreads * kIterations);
  EXPECT_EQ(arena->outstanding_bytes(), 0u);
  EXPECT_EQ(arena->quarantined_bytes(), 0u);
  EXPECT_EQ(arena->num_waiters(), 0u);
  EXPECT_THAT(arena->CheckInvariants(), IsOk());
}

TEST(ArenaStressTest, CloseRacingWithReserversLeavesNothingBehind) {
  auto log = std::make_shared<EventLog>();
  auto created = Arena::Create({"race", kAlign}, FakeAllocation::Host(8 * kAlign, log));
  ASSERT_TRUE(created.ok());
  std::unique_ptr<Arena> arena = std::move(created).value();
  ASSERT_THAT(arena->AttachRegistration(std::make_unique<FakeRegistration>(log, "reg")), IsOk());
  std::vector<std::thread> threads;
  std::atomic<int> aborted{0};
  for (int t = 0; t < 3; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 1000; ++i) {
        auto slot = arena->Reserve(3 * kAlign, milliseconds(50));
        if (!slot.ok() && slot.status().code() == StatusCode::kAborted) {
          ++aborted;
          return;
        }
      }
    });
  }
  std::this_thread::sleep_for(milliseconds(20));
  arena->Close();
  for (auto& t : threads) t.join();
  EXPECT_EQ(arena->outstanding_bytes(), 0u);
  EXPECT_TRUE(arena->memory_released());
  EXPECT_THAT(log->events(), ElementsAre("deregister reg", "free mem"));
}

}  // namespace
}  // namespace kvbounce
