#include "session/event_loop.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>
#include <vector>

namespace kvbounce {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

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
  EXPECT_EQ(loop.PostAt(Clock::now(), [] {}), 0u);
}

TEST(EventLoopTest, TimersFireInDeadlineOrderAndCanBeCancelled) {
  auto created = EventLoop::Create();
  ASSERT_TRUE(created.ok()) << created.status();
  EventLoop& loop = **created;
  std::mutex mu;
  std::vector<int> fired;
  const auto now = Clock::now();
  loop.PostAt(now + milliseconds(30), [&] {
    std::lock_guard<std::mutex> l(mu);
    fired.push_back(3);
  });
  loop.PostAt(now + milliseconds(10), [&] {
    std::lock_guard<std::mutex> l(mu);
    fired.push_back(1);
  });
  const EventLoop::TimerId cancelled = loop.PostAt(now + milliseconds(20), [&] {
    std::lock_guard<std::mutex> l(mu);
    fired.push_back(2);
  });
  loop.CancelTimer(cancelled);
  loop.CancelTimer(cancelled);  // twice: no-op
  std::this_thread::sleep_for(milliseconds(60));
  {
    std::lock_guard<std::mutex> l(mu);
    EXPECT_EQ(fired, (std::vector<int>{1, 3}));
  }
  // A timer not yet due when the loop stops never fires.
  std::atomic<bool> late{false};
  loop.PostAt(Clock::now() + milliseconds(500), [&] { late = true; });
  loop.Stop();
  EXPECT_FALSE(late);
}

TEST(EventLoopTest, ATimerDoesNotFireEarly) {
  auto created = EventLoop::Create();
  ASSERT_TRUE(created.ok()) << created.status();
  EventLoop& loop = **created;
  std::atomic<int64_t> at{0};
  const auto start = Clock::now();
  loop.PostAt(start + milliseconds(25), [&] { at = (Clock::now() - start).count(); });
  std::this_thread::sleep_for(milliseconds(60));
  EXPECT_GE(at.load(), std::chrono::nanoseconds(milliseconds(25)).count());
}

TEST(EventLoopTest, PostFromManyThreadsAndFromTasks) {
  auto created = EventLoop::Create();
  ASSERT_TRUE(created.ok()) << created.status();
  EventLoop& loop = **created;
  std::atomic<int> ran{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 1000; ++i) loop.Post([&] { loop.Post([&] { ++ran; }); });
    });
  }
  for (auto& t : threads) t.join();
  // Tasks posted by tasks run too (while the loop is not stopping).
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  while (ran.load() < 4000 && Clock::now() < deadline) std::this_thread::sleep_for(milliseconds(1));
  // Concurrent Stop calls: one joins, the other waits for it.
  std::thread other([&] { loop.Stop(); });
  loop.Stop();
  other.join();
  EXPECT_EQ(ran.load(), 4000);
}

}  // namespace
}  // namespace kvbounce
