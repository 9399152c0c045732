#include "common/clock.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "common/memcpy_rate.h"

namespace kvbounce {
namespace {

using std::chrono::milliseconds;

TEST(ClockTest, TheSteadyClockIsSteadyClock) {
  Clock* clock = Clock::Steady();
  ASSERT_EQ(clock, Clock::Steady());
  const auto before = std::chrono::steady_clock::now();
  const auto now = clock->Now();
  EXPECT_LE(before, now);
  EXPECT_LE(now, std::chrono::steady_clock::now());
  // It never jumps: listeners are accepted and never called.
  const Clock::ListenerId id = clock->AddJumpListener([] { FAIL() << "called"; });
  clock->RemoveJumpListener(id);
}

TEST(ManualClockTest, MovesOnlyWhenAdvanced) {
  const auto start = std::chrono::steady_clock::time_point(std::chrono::hours(5));
  ManualClock clock(start);
  EXPECT_EQ(clock.Now(), start);
  clock.Advance(milliseconds(250));
  EXPECT_EQ(clock.Now(), start + milliseconds(250));
  clock.Advance(milliseconds(-10));  // never backwards
  clock.Advance(milliseconds(0));
  EXPECT_EQ(clock.Now(), start + milliseconds(250));
}

TEST(ManualClockTest, ListenersHearEveryJumpUntilRemoved) {
  ManualClock clock;
  int a = 0, b = 0;
  const Clock::ListenerId first = clock.AddJumpListener([&] { ++a; });
  const Clock::ListenerId second = clock.AddJumpListener([&] { ++b; });
  EXPECT_NE(first, 0u);
  EXPECT_NE(first, second);
  clock.Advance(milliseconds(1));
  clock.Advance(milliseconds(0));  // no time passed, still a jump to look at
  EXPECT_EQ(a, 2);
  EXPECT_EQ(b, 2);
  clock.RemoveJumpListener(first);
  clock.RemoveJumpListener(first);  // twice: no-op
  clock.Advance(milliseconds(1));
  EXPECT_EQ(a, 2);
  EXPECT_EQ(b, 3);
  clock.RemoveJumpListener(second);
}

TEST(ManualClockTest, RemoveWaitsForACallInProgress) {
  ManualClock clock;
  std::atomic<bool> entered{false}, release{false}, returned{false};
  const Clock::ListenerId id = clock.AddJumpListener([&] {
    entered = true;
    while (!release) std::this_thread::yield();
    returned = true;
  });
  std::thread advancing([&] { clock.Advance(milliseconds(1)); });
  while (!entered) std::this_thread::yield();
  std::thread removing([&] {
    clock.RemoveJumpListener(id);
    // Only once the call returned.
    EXPECT_TRUE(returned.load());
  });
  release = true;
  removing.join();
  advancing.join();
}

TEST(MemcpyRateTest, IsMeasuredOnceAndPositive) {
  const double rate = MemcpyBytesPerUs();
  EXPECT_GT(rate, 0);
  EXPECT_EQ(MemcpyBytesPerUs(), rate);  // the same figure from then on
}

}  // namespace
}  // namespace kvbounce
