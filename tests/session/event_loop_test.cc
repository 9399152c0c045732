#include "session/event_loop.h"

#include <gtest/gtest.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <utility>
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

// An idle loop lets the caller run a task on its own thread; a busy one, a
// queued task or a stopped loop sends it back to Post.
TEST(EventLoopTest, AnIdleLoopRunsATaskOnTheCallersThread) {
  for (const auto poll : {std::chrono::microseconds(0), std::chrono::microseconds(500)}) {
    SCOPED_TRACE("poll_before_sleep " + std::to_string(poll.count()) + " us");
    auto created = EventLoop::Create(Clock::Steady(), poll);
    ASSERT_TRUE(created.ok()) << created.status();
    EventLoop& loop = **created;
    // Idle once a posted task ran and nothing else is queued.
    std::promise<void> ran_first;
    loop.Post([&] { ran_first.set_value(); });
    ran_first.get_future().wait();
    std::thread::id ran_on;
    bool in_loop = false;
    bool ran = false;
    for (int attempt = 0; attempt < 1000 && !ran; ++attempt) {
      ran = loop.TryRunHere([&] {
        ran_on = std::this_thread::get_id();
        in_loop = loop.InLoop();
      });
      if (!ran) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    ASSERT_TRUE(ran);
    EXPECT_EQ(ran_on, std::this_thread::get_id());
    EXPECT_TRUE(in_loop);
    EXPECT_FALSE(loop.InLoop());

    // While a task runs on the loop, and while one waits behind it, the
    // caller's task is not run here (it would overtake or overlap them).
    std::promise<void> entered, release;
    std::shared_future<void> released = release.get_future().share();
    loop.Post([&, released] {
      entered.set_value();
      released.wait();
    });
    entered.get_future().wait();
    int calls = 0;
    EXPECT_FALSE(loop.TryRunHere([&] { ++calls; }));
    std::promise<void> second_ran;
    loop.Post([&] { second_ran.set_value(); });
    release.set_value();
    EXPECT_EQ(calls, 0);
    second_ran.get_future().wait();
    loop.Stop();
    EXPECT_FALSE(loop.TryRunHere([&] { ++calls; }));
    EXPECT_EQ(calls, 0);
  }
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

// A progress source for the loop to drive: work that other threads add
// (readable fd while some is pending), taken by Poll on the loop thread.
class FakeSource final : public ProgressSource {
 public:
  // What outlives the source: the test reads it after the loop destroyed it.
  struct Shared {
    std::mutex mu;
    std::condition_variable cv;
    int64_t pending = 0;
    int64_t taken = 0;
    int64_t polls = 0;
    int64_t prepares = 0;
    int refusals_left = 0;             // PrepareToSleep says "work now" this often
    std::chrono::microseconds cap{0};  // 0: leaves max_sleep alone
    std::thread::id poll_thread;
    bool polled_off_thread = false;
    bool destroyed = false;
    std::function<void()> on_take;  // runs on the loop thread, per taking
    std::function<void()> on_prepare;  // runs first in every PrepareToSleep
  };

  explicit FakeSource(std::shared_ptr<Shared> shared)
      : shared_(std::move(shared)), fd_(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {}
  ~FakeSource() override {
    close(fd_);
    std::lock_guard<std::mutex> lock(shared_->mu);
    shared_->destroyed = true;
    shared_->cv.notify_all();
  }

  // Any thread: adds `n` items and makes the fd readable.
  static void Add(Shared& shared, int fd, int64_t n) {
    {
      std::lock_guard<std::mutex> lock(shared.mu);
      shared.pending += n;
    }
    const uint64_t one = 1;
    ASSERT_EQ(write(fd, &one, sizeof(one)), static_cast<ssize_t>(sizeof(one)));
  }

  int fd() const override { return fd_; }
  bool Poll() override {
    std::function<void()> on_take;
    int64_t items;
    {
      std::lock_guard<std::mutex> lock(shared_->mu);
      ++shared_->polls;
      if (shared_->poll_thread == std::thread::id())
        shared_->poll_thread = std::this_thread::get_id();
      if (shared_->poll_thread != std::this_thread::get_id()) shared_->polled_off_thread = true;
      if (shared_->pending == 0) return false;
      uint64_t drained = 0;
      [[maybe_unused]] ssize_t n = read(fd_, &drained, sizeof(drained));
      items = std::exchange(shared_->pending, 0);
      on_take = shared_->on_take;
    }
    if (on_take) on_take();  // before the test sees the items taken
    std::lock_guard<std::mutex> lock(shared_->mu);
    shared_->taken += items;
    shared_->cv.notify_all();
    return true;
  }
  bool PrepareToSleep(std::chrono::microseconds* max_sleep) override {
    std::function<void()> on_prepare;
    {
      std::lock_guard<std::mutex> lock(shared_->mu);
      on_prepare = shared_->on_prepare;
    }
    if (on_prepare) on_prepare();
    std::lock_guard<std::mutex> lock(shared_->mu);
    ++shared_->prepares;
    if (shared_->refusals_left > 0) {
      --shared_->refusals_left;
      return false;
    }
    if (shared_->cap.count() > 0) *max_sleep = std::min(*max_sleep, shared_->cap);
    return shared_->pending == 0;
  }

 private:
  std::shared_ptr<Shared> shared_;
  const int fd_;
};

struct DrivenLoop {
  std::shared_ptr<FakeSource::Shared> shared = std::make_shared<FakeSource::Shared>();
  std::unique_ptr<EventLoop> loop;
  int fd = -1;

  explicit DrivenLoop(std::chrono::microseconds poll = std::chrono::microseconds(0)) {
    auto source = std::make_unique<FakeSource>(shared);
    fd = source->fd();
    auto created = EventLoop::Create(Clock::Steady(), poll, std::move(source));
    EXPECT_TRUE(created.ok()) << created.status();
    if (created.ok()) loop = std::move(created).value();
  }
  // Adds one item and waits until the loop took it (30 s at most).
  bool AddAndWaitTaken() {
    int64_t before;
    {
      std::lock_guard<std::mutex> lock(shared->mu);
      before = shared->taken;
    }
    FakeSource::Add(*shared, fd, 1);
    std::unique_lock<std::mutex> lock(shared->mu);
    return shared->cv.wait_for(lock, std::chrono::seconds(30),
                               [&] { return shared->taken == before + 1; });
  }
};

// The loop drives the source on its own thread: work that comes in while
// the loop sleeps in ppoll wakes it (the source's fd), and so do tasks and
// timers (the loop's eventfd), whichever comes first, at random moments.
TEST(EventLoopSourceTest, WorkTasksAndTimersWakeALoopThatSleepsOnTheSource) {
  for (const auto poll : {std::chrono::microseconds(0), std::chrono::microseconds(200)}) {
    SCOPED_TRACE("poll_before_sleep " + std::to_string(poll.count()) + " µs");
    DrivenLoop driven(poll);
    ASSERT_NE(driven.loop, nullptr);
    EventLoop& loop = *driven.loop;
    std::thread::id loop_thread;
    std::mutex mu;
    std::condition_variable cv;
    int ran = 0;
    std::mt19937 random(11);
    std::uniform_int_distribution<int> gap_us(0, 400);
    for (int i = 1; i <= 200; ++i) {
      std::this_thread::sleep_for(std::chrono::microseconds(gap_us(random)));
      if (i % 2 == 0) {
        ASSERT_TRUE(driven.AddAndWaitTaken()) << "item " << i << " was not taken";
        continue;
      }
      ASSERT_TRUE(loop.Post([&] {
        std::lock_guard<std::mutex> lock(mu);
        loop_thread = std::this_thread::get_id();
        ++ran;
        cv.notify_all();
      }));
      std::unique_lock<std::mutex> lock(mu);
      ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(30), [&] { return ran == (i + 1) / 2; }))
          << "task " << i << " did not run";
    }
    EXPECT_TRUE(FiresOnTime(loop, std::chrono::steady_clock::now() + std::chrono::milliseconds(2)));
    std::lock_guard<std::mutex> lock(driven.shared->mu);
    EXPECT_EQ(driven.shared->poll_thread, loop_thread) << "the source was polled off the loop";
    EXPECT_FALSE(driven.shared->polled_off_thread);
    EXPECT_EQ(driven.shared->taken, 100);
  }
}

// A loop that always has a task queued still polls its source: a chain of
// tasks that reposts itself does not hold back the source's work.
TEST(EventLoopSourceTest, TasksThatKeepComingDoNotStarveTheSource) {
  DrivenLoop driven;
  ASSERT_NE(driven.loop, nullptr);
  EventLoop& loop = *driven.loop;
  std::atomic<int> chain{0};
  std::atomic<int> chain_when_taken{-1};
  driven.shared->on_take = [&] { chain_when_taken.store(chain.load()); };
  constexpr int kChain = 20000;
  std::function<void()> step = [&] {
    if (chain.fetch_add(1) == 0) {
      // The first link adds the work: from here on a task is always queued.
      FakeSource::Add(*driven.shared, driven.fd, 1);
    }
    if (chain.load() < kChain) loop.Post(step);
  };
  ASSERT_TRUE(loop.Post(step));
  std::unique_lock<std::mutex> lock(driven.shared->mu);
  ASSERT_TRUE(driven.shared->cv.wait_for(lock, std::chrono::seconds(30),
                                         [&] { return driven.shared->taken == 1; }));
  lock.unlock();
  // Taken within a few rounds of kTasksPerSourcePoll tasks, not at the end.
  EXPECT_GE(chain_when_taken.load(), 1);
  EXPECT_LE(chain_when_taken.load(), 4 * EventLoop::kTasksPerSourcePoll);
  loop.Stop();
}

// PrepareToSleep decides: "work now" keeps the loop polling instead of
// sleeping, and a cap on the sleep makes an idle loop look again.
TEST(EventLoopSourceTest, PrepareToSleepCanRefuseTheSleepAndCapIt) {
  DrivenLoop driven;
  ASSERT_NE(driven.loop, nullptr);
  {
    std::lock_guard<std::mutex> lock(driven.shared->mu);
    driven.shared->refusals_left = 50;
    driven.shared->cap = std::chrono::microseconds(1000);
  }
  // The loop may be asleep already, uncapped: a task wakes it, and it
  // prepares its next sleep with these settings.
  ASSERT_TRUE(driven.loop->Post([] {}));
  // Idle: every refusal costs a poll; then each capped sleep ends on its
  // own (nothing else wakes this loop), so the prepares keep coming.
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(driven.shared->mu);
      if (driven.shared->refusals_left == 0 && driven.shared->prepares >= 60) break;
    }
    ASSERT_LT(std::chrono::steady_clock::now(), until) << "the loop stopped preparing to sleep";
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  std::lock_guard<std::mutex> lock(driven.shared->mu);
  EXPECT_GE(driven.shared->polls, 50);
}

// What comes in while the loop readies its source for a sleep (the loop's
// lock is free then) is not slept through: a timer due soon fires on time
// rather than after the hour the loop meant to sleep, and Stop returns.
TEST(EventLoopSourceTest, ATimerOrStopThatComesWhileTheSourcePreparesIsNotSleptThrough) {
  for (const bool stop : {false, true}) {
    SCOPED_TRACE(stop ? "Stop" : "a timer");
    DrivenLoop driven;
    ASSERT_NE(driven.loop, nullptr);
    EventLoop& loop = *driven.loop;
    std::atomic<bool> armed{true};
    std::atomic<bool> done{false};
    // The next PrepareToSleep (the loop idle, no timer: it means to sleep
    // for the longest wait) posts the change itself, once.
    {
      std::lock_guard<std::mutex> lock(driven.shared->mu);
      driven.shared->on_prepare = [&] {
        if (!armed.exchange(false)) return;
        if (stop) {
          std::thread([&] {
            loop.Stop();
            done.store(true);
          }).detach();
          std::this_thread::sleep_for(std::chrono::milliseconds(20));  // Stop has begun
        } else {
          loop.PostAt(std::chrono::steady_clock::now() + std::chrono::milliseconds(1),
                      [&] { done.store(true); });
        }
      };
    }
    ASSERT_TRUE(loop.Post([] {}));  // wakes the loop, which then prepares again
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (!done.load() && std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    EXPECT_TRUE(done.load()) << "the loop slept through it";
    if (stop) {
      // The detached Stop returned; the loop is joined.
      EXPECT_FALSE(loop.Post([] {}));
    }
  }
}

// A timer armed while the loop polls ends that poll without a task to run:
// the loop polls on, it does not go to sleep. An API call run on the
// caller's thread arms its deadline so, and a loop asleep then would pay a
// wake-up for the frame that follows.
TEST(EventLoopSourceTest, ATimerArmedWhileThePollRunsKeepsTheLoopPolling) {
  DrivenLoop d(std::chrono::seconds(60));  // polls far longer than the test
  ASSERT_NE(d.loop, nullptr);
  // Polls on until the source has been polled `more` times beyond now
  // (30 s at most), never preparing to sleep.
  const auto polls_on = [&](int64_t more) {
    std::unique_lock<std::mutex> lock(d.shared->mu);
    const int64_t target = d.shared->polls + more;
    lock.unlock();
    for (int i = 0; i < 30000; ++i) {
      lock.lock();
      if (d.shared->polls >= target) return d.shared->prepares == 0;
      lock.unlock();
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return false;
  };
  ASSERT_TRUE(polls_on(10));
  const auto far = std::chrono::steady_clock::now() + std::chrono::hours(1);
  // From another thread...
  const EventLoop::TimerId first = d.loop->PostAt(far, [] {});
  ASSERT_NE(first, 0u);
  EXPECT_TRUE(polls_on(100)) << "the loop slept after a timer was armed";
  // ... from a task run on the caller's thread, and when a timer is
  // cancelled and another armed.
  bool ran = false;
  for (int attempt = 0; attempt < 1000 && !ran; ++attempt) {
    ran = d.loop->TryRunHere([&] { d.loop->PostAt(far, [] {}); });
    if (!ran) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_TRUE(ran);
  EXPECT_TRUE(polls_on(100)) << "the loop slept after a task run here armed a timer";
  d.loop->CancelTimer(first);
  d.loop->PostAt(far, [] {});
  EXPECT_TRUE(polls_on(100)) << "the loop slept after a timer was re-armed";
  d.loop->Stop();  // ends the poll too
  std::lock_guard<std::mutex> lock(d.shared->mu);
  EXPECT_TRUE(d.shared->destroyed);
}

// Stop runs the tasks posted before it, then destroys (detaches) the source
// once the thread has left; nothing polls it afterwards.
TEST(EventLoopSourceTest, StopRunsTheQueuedTasksThenDestroysTheSource) {
  DrivenLoop driven;
  ASSERT_NE(driven.loop, nullptr);
  std::atomic<int> ran{0};
  for (int i = 0; i < 100; ++i) driven.loop->Post([&] { ran.fetch_add(1); });
  driven.loop->Stop();
  EXPECT_EQ(ran.load(), 100);
  int64_t polls;
  {
    std::lock_guard<std::mutex> lock(driven.shared->mu);
    EXPECT_TRUE(driven.shared->destroyed);
    polls = driven.shared->polls;
  }
  EXPECT_FALSE(driven.loop->Post([] {}));
  driven.loop.reset();
  std::lock_guard<std::mutex> lock(driven.shared->mu);
  EXPECT_EQ(driven.shared->polls, polls);
}

}  // namespace
}  // namespace kvbounce
