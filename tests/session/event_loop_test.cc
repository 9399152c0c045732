#include "session/event_loop.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/clock.h"

namespace kvbounce {
namespace {

using std::chrono::milliseconds;

// What the loop's tasks and timers recorded, read by the test thread.
class Record {
 public:
  void Add(int value) {
    std::lock_guard<std::mutex> lock(mu_);
    values_.push_back(value);
  }
  std::vector<int> values() const {
    std::lock_guard<std::mutex> lock(mu_);
    return values_;
  }

 private:
  mutable std::mutex mu_;
  std::vector<int> values_;
};

// Sets a timer due at `deadline` (steady clock) on `loop` and waits for it,
// 30 s at most: success when it fired, and not before its deadline.
::testing::AssertionResult FiresOnTime(EventLoop& loop,
                                       std::chrono::steady_clock::time_point deadline) {
  struct Fired {
    std::mutex mu;
    std::condition_variable cv;
    std::optional<std::chrono::steady_clock::time_point> at;
  };
  auto fired = std::make_shared<Fired>();  // outlives a timer that fires late
  loop.PostAt(deadline, [fired] {
    std::lock_guard<std::mutex> lock(fired->mu);
    fired->at = std::chrono::steady_clock::now();
    fired->cv.notify_all();
  });
  std::unique_lock<std::mutex> lock(fired->mu);
  if (!fired->cv.wait_for(lock, std::chrono::seconds(30), [&] { return fired->at.has_value(); })) {
    return ::testing::AssertionFailure() << "the timer did not fire within 30 s";
  }
  if (*fired->at < deadline) return ::testing::AssertionFailure() << "the timer fired early";
  return ::testing::AssertionSuccess();
}

TEST(EventLoopTest, TasksRunInOrderOnTheLoopThread) {
  auto created = EventLoop::Create();
  ASSERT_TRUE(created.ok()) << created.status();
  EventLoop& loop = **created;
  std::vector<int> order;
  std::atomic<bool> on_loop{true};
  for (int i = 0; i < 100; ++i) {
    loop.Post([&, i] {
      order.push_back(i);
      if (!loop.InLoop()) on_loop = false;
    });
  }
  loop.Stop();  // runs every task already posted
  ASSERT_EQ(order.size(), 100u);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(order[static_cast<size_t>(i)], i);
  EXPECT_TRUE(on_loop);
  EXPECT_FALSE(loop.InLoop());
  EXPECT_FALSE(loop.Post([] {}));
  EXPECT_EQ(loop.PostAt(loop.clock().Now(), [] {}), 0u);
}

TEST(EventLoopTest, TimersFireInDeadlineOrderAndCanBeCancelled) {
  ManualClock clock;
  auto created = EventLoop::Create(&clock);
  ASSERT_TRUE(created.ok()) << created.status();
  EventLoop& loop = **created;
  Record fired;
  const auto start = clock.Now();
  loop.PostAt(start + milliseconds(30), [&] { fired.Add(3); });
  loop.PostAt(start + milliseconds(10), [&] { fired.Add(1); });
  const EventLoop::TimerId cancelled =
      loop.PostAt(start + milliseconds(20), [&] { fired.Add(2); });
  loop.PostAt(start + milliseconds(10), [&] { fired.Add(11); });  // same deadline: posted later
  loop.CancelTimer(cancelled);
  loop.CancelTimer(cancelled);  // twice: no-op

  // Advance returns once the loop caught up: what is due has fired, nothing else.
  clock.Advance(milliseconds(9));
  EXPECT_EQ(fired.values(), (std::vector<int>{}));
  clock.Advance(milliseconds(1));
  EXPECT_EQ(fired.values(), (std::vector<int>{1, 11}));
  clock.Advance(milliseconds(19));
  EXPECT_EQ(fired.values(), (std::vector<int>{1, 11}));
  clock.Advance(milliseconds(100));
  EXPECT_EQ(fired.values(), (std::vector<int>{1, 11, 3}));

  // A timer not yet due when the loop stops never fires.
  std::atomic<bool> late{false};
  loop.PostAt(clock.Now() + milliseconds(500), [&] { late = true; });
  loop.Stop();
  EXPECT_FALSE(late);
  clock.Advance(milliseconds(1000));  // no loop listens any more
  EXPECT_FALSE(late);
}

TEST(EventLoopTest, ATimerDueAlreadyFiresAtOnce) {
  ManualClock clock;
  auto created = EventLoop::Create(&clock);
  ASSERT_TRUE(created.ok()) << created.status();
  EventLoop& loop = **created;
  Record fired;
  loop.PostAt(clock.Now() - milliseconds(5), [&] { fired.Add(1); });
  loop.PostAt(clock.Now(), [&] { fired.Add(2); });
  clock.Advance(milliseconds(0));  // no time passes; the loop still catches up
  EXPECT_EQ(fired.values(), (std::vector<int>{1, 2}));
}

TEST(EventLoopTest, AdvanceWaitsForWhatTheTimersPosted) {
  ManualClock clock;
  auto created = EventLoop::Create(&clock);
  ASSERT_TRUE(created.ok()) << created.status();
  EventLoop& loop = **created;
  Record fired;
  // A timer whose task posts a task that posts a timer already due.
  loop.PostAt(clock.Now() + milliseconds(10), [&] {
    fired.Add(1);
    loop.Post([&] {
      fired.Add(2);
      loop.PostAt(clock.Now(), [&] { fired.Add(3); });
    });
  });
  clock.Advance(milliseconds(10));
  EXPECT_EQ(fired.values(), (std::vector<int>{1, 2, 3}));
}

TEST(EventLoopTest, AdvanceFromATaskDoesNotWaitForItself) {
  ManualClock clock;
  auto created = EventLoop::Create(&clock);
  ASSERT_TRUE(created.ok()) << created.status();
  EventLoop& loop = **created;
  Record fired;
  loop.PostAt(clock.Now() + milliseconds(10), [&] { fired.Add(2); });
  loop.Post([&] {
    clock.Advance(milliseconds(10));  // returns at once on the loop thread
    fired.Add(1);
  });
  clock.Advance(milliseconds(0));  // from here: waits for both
  EXPECT_EQ(fired.values(), (std::vector<int>{1, 2}));
}

TEST(EventLoopTest, OneClockDrivesSeveralLoops) {
  ManualClock clock;
  auto a = EventLoop::Create(&clock);
  auto b = EventLoop::Create(&clock);
  ASSERT_TRUE(a.ok() && b.ok());
  Record fired;
  (*a)->PostAt(clock.Now() + milliseconds(5), [&] { fired.Add(1); });
  (*b)->PostAt(clock.Now() + milliseconds(5), [&] { fired.Add(1); });
  clock.Advance(milliseconds(5));
  EXPECT_EQ(fired.values(), (std::vector<int>{1, 1}));
  (*a)->Stop();
  (*b)->PostAt(clock.Now() + milliseconds(5), [&] { fired.Add(2); });
  clock.Advance(milliseconds(5));  // the stopped loop no longer listens
  EXPECT_EQ(fired.values(), (std::vector<int>{1, 1, 2}));
}

TEST(EventLoopTest, TheSteadyClockFiresTimersByItself) {
  // Production's clock: a timer fires without anybody advancing anything.
  auto created = EventLoop::Create();
  ASSERT_TRUE(created.ok()) << created.status();
  EXPECT_TRUE(FiresOnTime(**created, std::chrono::steady_clock::now() + milliseconds(2)));
}

// A loop that polls before it sleeps runs every task, whether it comes in
// while the loop polls, just as the poll ends, or once it sleeps: the posts
// here land at random moments around the end of a short poll, the race a
// lost wake-up would lose. Timers fire, never early, also while it polls.
TEST(EventLoopTest, APollingLoopRunsWhatComesWhilePollingAndAfterSleeping) {
  auto created = EventLoop::Create(Clock::Steady(), std::chrono::microseconds(300));
  ASSERT_TRUE(created.ok()) << created.status();
  EventLoop& loop = **created;
  std::mutex mu;
  std::condition_variable cv;
  int ran = 0;
  std::mt19937 random(7);
  std::uniform_int_distribution<int> gap_us(0, 600);
  for (int i = 1; i <= 300; ++i) {
    std::this_thread::sleep_for(std::chrono::microseconds(gap_us(random)));
    ASSERT_TRUE(loop.Post([&] {
      std::lock_guard<std::mutex> lock(mu);
      ++ran;
      cv.notify_all();
    }));
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(30), [&] { return ran == i; }))
        << "task " << i << " did not run";
  }
  loop.Post([] {});  // the loop is polling when the timer comes in
  EXPECT_TRUE(FiresOnTime(loop, std::chrono::steady_clock::now() + std::chrono::microseconds(100)));
  loop.Stop();  // also while it may still poll
  EXPECT_FALSE(loop.Post([] {}));
}

TEST(EventLoopTest, CreateRejectsANegativePoll) {
  auto created = EventLoop::Create(Clock::Steady(), std::chrono::microseconds(-1));
  ASSERT_FALSE(created.ok());
  EXPECT_EQ(created.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(created.status().message().find("poll_before_sleep = -1"), std::string::npos)
      << created.status();
}

TEST(EventLoopTest, PostFromManyThreadsAndFromTasks) {
  auto created = EventLoop::Create();
  ASSERT_TRUE(created.ok()) << created.status();
  EventLoop& loop = **created;
  std::mutex mu;
  std::condition_variable cv;
  int ran = 0;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 1000; ++i) {
        loop.Post([&] {
          loop.Post([&] {
            std::lock_guard<std::mutex> lock(mu);
            if (++ran == 4000) cv.notify_all();
          });
        });
      }
    });
  }
  for (auto& t : threads) t.join();
  // Tasks posted by tasks run too (while the loop is not stopping).
  {
    std::unique_lock<std::mutex> lock(mu);
    EXPECT_TRUE(cv.wait_for(lock, std::chrono::seconds(30), [&] { return ran == 4000; }));
  }
  // Concurrent Stop calls: one joins, the other waits for it.
  std::thread other([&] { loop.Stop(); });
  loop.Stop();
  other.join();
  std::lock_guard<std::mutex> lock(mu);
  EXPECT_EQ(ran, 4000);
}

}  // namespace
}  // namespace kvbounce
