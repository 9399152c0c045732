// The fault-injecting decorator, over the loopback transport.
#include "transport/fault/fault_transport.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <stop_token>
#include <string>
#include <thread>
#include <vector>

#include "common/status_matchers.h"
#include "kvbounce/status.h"
#include "kvbounce/transport.h"
#include "kvbounce/types.h"
#include "transport/loopback/loopback_transport.h"
#include "transport/transport_test_util.h"

namespace kvbounce::transport_test {
namespace {

using ::kvbounce::testing_util::IsOk;
using ::kvbounce::testing_util::StatusIs;
using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;

// A (fault-wrapped) writer and a plain loopback receiver, connected, with a
// source region on the writer and a target region on the receiver.
class FaultTransportTest : public ::testing::Test {
 protected:
  static constexpr size_t kBytes = 1 << 16;

  void SetUp() override { src_.FillPattern(3); }

  // `before_start` may install hooks on the writer's endpoint.
  void Build(FaultOptions options, bool wrap_receiver = false,
             const std::function<void(TestEndpoint&)>& before_start = nullptr) {
    auto inner = LoopbackTransport::Create(fabric_, "writer");
    ASSERT_THAT(inner, IsOk());
    auto fault = FaultTransport::Create(std::move(inner).value(), options);
    ASSERT_THAT(fault, IsOk());
    fault_ = fault->get();
    writer_ = std::make_unique<TestEndpoint>(std::move(fault).value());
    if (before_start) before_start(*writer_);
    ASSERT_THAT(writer_->Start(), IsOk());

    auto receiver = LoopbackTransport::Create(fabric_, "receiver");
    ASSERT_THAT(receiver, IsOk());
    std::unique_ptr<Transport> receiver_transport = std::move(receiver).value();
    if (wrap_receiver) {
      auto wrapped = FaultTransport::Create(std::move(receiver_transport));
      ASSERT_THAT(wrapped, IsOk());
      receiver_fault_ = wrapped->get();
      receiver_transport = std::move(wrapped).value();
    }
    receiver_ = std::make_unique<TestEndpoint>(std::move(receiver_transport));
    ASSERT_THAT(receiver_->Start(), IsOk());

    auto peer = (*writer_)->Connect((*receiver_)->Address());
    ASSERT_THAT(peer, IsOk());
    to_receiver_ = *peer;
    ASSERT_THAT(writer_->SendText(to_receiver_, "HELLO"), IsOk());
    ASSERT_TRUE(receiver_->WaitForMessages(1));
    to_writer_ = receiver_->messages()[0].peer;

    auto source = (*writer_)->Register(src_.addr(), kBytes, MemoryKind::kHost);
    ASSERT_THAT(source, IsOk());
    source_ = std::move(source).value();
    auto target_region = (*receiver_)->Register(dst_.addr(), kBytes, MemoryKind::kHost);
    ASSERT_THAT(target_region, IsOk());
    target_region_ = std::move(target_region).value();
    auto target = (*writer_)->Import(to_receiver_, target_region_->info());
    ASSERT_THAT(target, IsOk());
    target_ = std::move(target).value();
  }

  void TearDown() override {
    target_.reset();
    source_.reset();
    target_region_.reset();
  }

  Status Write(DoneTracker& tracker, std::span<const WriteOp> ops, std::stop_token stop = {}) {
    InsideCall inside;
    Status status = (*writer_)->Write(*source_, *target_, ops, tracker.Make(), std::move(stop));
    if (!status.ok()) tracker.Forget();
    return status;
  }

  Status Flush(DoneTracker& tracker) {
    InsideCall inside;
    Status status = (*writer_)->Flush(to_receiver_, tracker.Make());
    if (!status.ok()) tracker.Forget();
    return status;
  }

  // One op of `bytes` at `offset` on both sides.
  WriteOp Op(uint64_t offset, uint64_t bytes = 64) {
    return {src_.addr(offset), dst_.addr(offset), bytes};
  }

  // The writer reads back: from the receiver's region (target_, as the
  // source) into its own (source_, as the target).
  Status Read(DoneTracker& tracker, std::span<const ReadOp> ops, std::stop_token stop = {}) {
    InsideCall inside;
    Status status = (*writer_)->Read(*target_, *source_, ops, tracker.Make(), std::move(stop));
    if (!status.ok()) tracker.Forget();
    return status;
  }
  ReadOp ReadBackOp(uint64_t offset, uint64_t bytes = 64) {
    return {dst_.addr(offset), src_.addr(offset), bytes};
  }

  // Issues `count` single-op writes one by one; returns which failed.
  std::vector<bool> SingleOpWrites(int count) {
    ops_.assign(count, WriteOp{});
    DoneTracker tracker;
    for (int i = 0; i < count; ++i) {
      ops_[i] = Op((i * 64) % kBytes);
      EXPECT_THAT(Write(tracker, std::span<const WriteOp>(&ops_[i], 1)), IsOk());
    }
    EXPECT_TRUE(tracker.WaitAll());
    EXPECT_EQ(tracker.Violations(), "");
    std::vector<bool> failed;
    for (const Status& status : tracker.statuses()) failed.push_back(!status.ok());
    return failed;
  }

  std::shared_ptr<LoopbackFabric> fabric_ = LoopbackFabric::Create();
  GuardedBuffer src_{kBytes};
  GuardedBuffer dst_{kBytes, 0};
  std::unique_ptr<TestEndpoint> writer_;
  std::unique_ptr<TestEndpoint> receiver_;
  FaultTransport* fault_ = nullptr;
  FaultTransport* receiver_fault_ = nullptr;
  PeerId to_receiver_ = 0;
  PeerId to_writer_ = 0;
  std::unique_ptr<LocalRegion> source_;
  std::unique_ptr<LocalRegion> target_region_;
  std::unique_ptr<RemoteRegion> target_;
  std::vector<WriteOp> ops_;
};

TEST(FaultOptionsTest, BadOptionsAreRejectedNamingTheField) {
  auto make = [](FaultOptions options) {
    auto inner = LoopbackTransport::Create(LoopbackFabric::Create(), "x");
    EXPECT_THAT(inner, IsOk());
    return FaultTransport::Create(std::move(inner).value(), options).status();
  };
  FaultOptions options;
  options.write_fail_rate = -0.1;
  EXPECT_THAT(make(options), StatusIs(StatusCode::kInvalidArgument, HasSubstr("write_fail_rate")));
  options.write_fail_rate = 1.5;
  EXPECT_THAT(make(options), StatusIs(StatusCode::kInvalidArgument, HasSubstr("write_fail_rate")));
  options.write_fail_rate = std::numeric_limits<double>::quiet_NaN();
  EXPECT_THAT(make(options), StatusIs(StatusCode::kInvalidArgument, HasSubstr("write_fail_rate")));
  options = {};
  options.delay = std::chrono::microseconds(-1);
  EXPECT_THAT(make(options), StatusIs(StatusCode::kInvalidArgument, HasSubstr("delay")));
  options = {};
  options.message_delay = std::chrono::microseconds(-5);
  EXPECT_THAT(make(options), StatusIs(StatusCode::kInvalidArgument, HasSubstr("message_delay")));
  options = {};
  options.drop_after_ops = -1;
  EXPECT_THAT(make(options), StatusIs(StatusCode::kInvalidArgument, HasSubstr("drop_after_ops")));
  options = {};
  options.write_fail_rate = 1.0;
  EXPECT_THAT(make(options), IsOk());
  EXPECT_THAT(FaultTransport::Create(nullptr), StatusIs(StatusCode::kInvalidArgument));

  auto inner = LoopbackTransport::Create(LoopbackFabric::Create(), "y");
  ASSERT_THAT(inner, IsOk());
  auto fault = FaultTransport::Create(std::move(inner).value(), {.write_fail_rate = 0.25});
  ASSERT_THAT(fault, IsOk());
  EXPECT_THAT((*fault)->SetOptions({.write_fail_rate = 2}),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("write_fail_rate")));
  EXPECT_EQ((*fault)->options().write_fail_rate, 0.25);  // unchanged
  EXPECT_EQ((*fault)->Caps().name, "loopback");
  EXPECT_EQ((*fault)->Address(), "loopback:y");
}

TEST_F(FaultTransportTest, RateOneFailsEveryBatchAndNothingLands) {
  Build({.write_fail_rate = 1.0});
  DoneTracker tracker;
  std::vector<WriteOp> ops;
  for (int i = 0; i < 5; ++i) ops.push_back(Op(i * 128));
  for (int batch = 0; batch < 10; ++batch) ASSERT_THAT(Write(tracker, ops), IsOk());
  ASSERT_THAT(Flush(tracker), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  for (size_t i = 0; i < 10; ++i) {
    EXPECT_THAT(tracker.status(i),
                StatusIs(StatusCode::kUnavailable, HasSubstr("injected write failure")));
  }
  EXPECT_THAT(tracker.status(10), IsOk());  // flushes are not failed
  EXPECT_EQ(tracker.Violations(), "");
  const FaultStats stats = fault_->fault_stats();
  EXPECT_EQ(stats.injected_write_failures, 50u);
  EXPECT_EQ(stats.failed_batches, 10u);
  EXPECT_EQ(stats.dropped_connections, 0u);
  EXPECT_EQ(stats.delayed_completions, 0u);
  EXPECT_TRUE(dst_.AllEqual(0));
  EXPECT_EQ((*writer_)->Stats().write_ops, 0u);  // never issued to the inner transport

  // Range checks still come first.
  const WriteOp bad[] = {Op(kBytes - 10, 64)};
  EXPECT_THAT(Write(tracker, bad), StatusIs(StatusCode::kOutOfRange));
  EXPECT_EQ(fault_->fault_stats().failed_batches, 10u);
}

TEST_F(FaultTransportTest, RateZeroFailsNothing) {
  Build({.write_fail_rate = 0.0});
  const std::vector<bool> failed = SingleOpWrites(200);
  for (bool f : failed) EXPECT_FALSE(f);
  EXPECT_EQ(fault_->fault_stats().injected_write_failures, 0u);
  EXPECT_EQ((*writer_)->Stats().write_ops, 200u);
}

TEST_F(FaultTransportTest, RateHalfFailsAboutHalfAndIsReproducible) {
  Build({.write_fail_rate = 0.5, .seed = 42});
  constexpr int kWrites = 2000;
  const std::vector<bool> first = SingleOpWrites(kWrites);
  const auto failures = static_cast<int>(std::count(first.begin(), first.end(), true));
  EXPECT_GT(failures, kWrites * 4 / 10);
  EXPECT_LT(failures, kWrites * 6 / 10);
  EXPECT_EQ(fault_->fault_stats().injected_write_failures, static_cast<uint64_t>(failures));
  EXPECT_EQ(fault_->fault_stats().failed_batches, static_cast<uint64_t>(failures));

  // Same seed, same choices; another seed, other choices.
  ASSERT_THAT(fault_->SetOptions({.write_fail_rate = 0.5, .seed = 42}), IsOk());
  EXPECT_EQ(SingleOpWrites(kWrites), first);
  ASSERT_THAT(fault_->SetOptions({.write_fail_rate = 0.5, .seed = 43}), IsOk());
  EXPECT_NE(SingleOpWrites(kWrites), first);

  // A batch fails when any of its ops is chosen: 20-op batches at rate 0.5
  // essentially always fail.
  ASSERT_THAT(fault_->SetOptions({.write_fail_rate = 0.5, .seed = 7}), IsOk());
  std::vector<WriteOp> ops;
  for (int i = 0; i < 20; ++i) ops.push_back(Op(i * 64));
  DoneTracker tracker;
  for (int i = 0; i < 20; ++i) ASSERT_THAT(Write(tracker, ops), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  int failed_batches = 0;
  for (const Status& status : tracker.statuses()) failed_batches += status.ok() ? 0 : 1;
  EXPECT_GE(failed_batches, 19);
}

TEST_F(FaultTransportTest, SetOptionsTurnsFaultsOnAndOffAtRuntime) {
  Build({});
  EXPECT_FALSE(SingleOpWrites(10)[0]);
  ASSERT_THAT(fault_->SetOptions({.write_fail_rate = 1.0}), IsOk());
  EXPECT_TRUE(SingleOpWrites(10)[9]);
  ASSERT_THAT(fault_->SetOptions({}), IsOk());
  EXPECT_FALSE(SingleOpWrites(10)[9]);
  EXPECT_EQ(fault_->fault_stats().failed_batches, 10u);
}

TEST_F(FaultTransportTest, DropAfterOpsKillsTheConnectionForBothEnds) {
  Build({.drop_after_ops = 10});
  DoneTracker tracker;
  std::vector<WriteOp> ops;
  for (int i = 0; i < 4; ++i) ops.push_back(Op(i * 64));
  // 4 + 4 + 4 ops: 12 >= 10 after the third batch, so the fourth drops.
  for (int batch = 0; batch < 3; ++batch) ASSERT_THAT(Write(tracker, ops), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  for (const Status& status : tracker.statuses()) EXPECT_THAT(status, IsOk());
  EXPECT_EQ(fault_->fault_stats().dropped_connections, 0u);

  EXPECT_THAT(Write(tracker, ops), StatusIs(StatusCode::kUnavailable));
  EXPECT_EQ(fault_->fault_stats().dropped_connections, 1u);
  ASSERT_TRUE(writer_->WaitForFailure(to_receiver_));
  ASSERT_TRUE(receiver_->WaitForFailure(to_writer_));
  EXPECT_THAT(writer_->failure_reason(to_receiver_),
              StatusIs(StatusCode::kUnavailable,
                       HasSubstr("injected: connection dropped after 10 operations")));
  EXPECT_THAT(receiver_->failure_reason(to_writer_),
              StatusIs(StatusCode::kUnavailable, HasSubstr("injected")));
  // Dead for good.
  EXPECT_THAT(Write(tracker, ops), StatusIs(StatusCode::kUnavailable));
  EXPECT_THAT(writer_->SendText(to_receiver_, "x"), StatusIs(StatusCode::kUnavailable));
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(writer_->failures(to_receiver_), 1);
  EXPECT_EQ(receiver_->failures(to_writer_), 1);
  EXPECT_EQ(tracker.Violations(), "");
}

TEST_F(FaultTransportTest, DelayHoldsCompletionsBack) {
  constexpr auto kDelay = 30ms;
  Build({.delay = kDelay});
  DoneTracker tracker;
  const WriteOp ops[] = {Op(0, 4096)};
  const auto start = Clock::now();
  ASSERT_THAT(Write(tracker, ops), IsOk());
  ASSERT_THAT(Flush(tracker), IsOk());
  ASSERT_TRUE(tracker.Wait(0));
  const auto write_done = Clock::now();
  ASSERT_TRUE(tracker.WaitAll());
  const auto flush_done = Clock::now();
  EXPECT_GE(write_done - start, kDelay);
  EXPECT_GE(flush_done - start, kDelay);
  EXPECT_LT(flush_done - start, 5s);  // the delay is not a hang
  EXPECT_THAT(tracker.status(0), IsOk());
  EXPECT_THAT(tracker.status(1), IsOk());
  EXPECT_EQ(std::memcmp(dst_.data(), src_.data(), 4096), 0);
  EXPECT_EQ(fault_->fault_stats().delayed_completions, 2u);

  // Injected failures are delayed too.
  ASSERT_THAT(fault_->SetOptions({.write_fail_rate = 1.0, .delay = kDelay}), IsOk());
  const auto failure_start = Clock::now();
  DoneTracker failing;
  ASSERT_THAT(Write(failing, ops), IsOk());
  ASSERT_TRUE(failing.WaitAll());
  EXPECT_GE(Clock::now() - failure_start, kDelay);
  EXPECT_THAT(failing.status(0), StatusIs(StatusCode::kUnavailable));
  EXPECT_EQ(tracker.Violations(), "");
  EXPECT_EQ(failing.Violations(), "");
}

TEST_F(FaultTransportTest, MessageDelayKeepsOrderAndFailureComesLast) {
  constexpr auto kDelay = 30ms;
  Build({}, /*wrap_receiver=*/true);
  ASSERT_THAT(receiver_fault_->SetOptions({.message_delay = kDelay}), IsOk());
  const auto start = Clock::now();
  for (int i = 0; i < 50; ++i) {
    ASSERT_THAT(writer_->SendText(to_receiver_, std::to_string(i)), IsOk());
  }
  // Delay off again once those are held back: later messages must not
  // overtake them.
  const auto deadline = Clock::now() + kWaitTimeout;
  while (receiver_fault_->fault_stats().delayed_messages < 50 && Clock::now() < deadline) {
    std::this_thread::sleep_for(100us);
  }
  ASSERT_EQ(receiver_fault_->fault_stats().delayed_messages, 50u);
  ASSERT_THAT(receiver_fault_->SetOptions({}), IsOk());
  for (int i = 50; i < 100; ++i) {
    ASSERT_THAT(writer_->SendText(to_receiver_, std::to_string(i)), IsOk());
  }
  (*writer_)->Disconnect(to_receiver_, UnavailableError("bye"));
  ASSERT_TRUE(receiver_->WaitForFailure(to_writer_));
  const auto failed_at = Clock::now();
  // The HELLO and 100 messages, all before the failure.
  const auto messages = receiver_->messages();
  ASSERT_EQ(messages.size(), 101u);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(Text(messages[i + 1].frame), std::to_string(i));
  EXPECT_GE(failed_at - start, kDelay);
  EXPECT_EQ(receiver_fault_->fault_stats().delayed_messages, 50u);
}

TEST_F(FaultTransportTest, InjectDisconnectNotifiesBothEnds) {
  Build({});
  DoneTracker tracker;
  fault_->InjectDisconnect(to_receiver_);
  ASSERT_TRUE(writer_->WaitForFailure(to_receiver_));
  ASSERT_TRUE(receiver_->WaitForFailure(to_writer_));
  EXPECT_THAT(writer_->failure_reason(to_receiver_),
              StatusIs(StatusCode::kUnavailable, HasSubstr("injected disconnect")));
  EXPECT_EQ(fault_->fault_stats().dropped_connections, 1u);
  const WriteOp ops[] = {Op(0)};
  EXPECT_THAT(Write(tracker, ops), StatusIs(StatusCode::kUnavailable));
  EXPECT_THAT(Flush(tracker), StatusIs(StatusCode::kUnavailable));
  fault_->InjectDisconnect(to_receiver_);  // already dead: no second notification
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(writer_->failures(to_receiver_), 1);
  EXPECT_EQ(receiver_->failures(to_writer_), 1);
}

TEST_F(FaultTransportTest, ShutdownRunsDelayedCompletionsOnceWithAborted) {
  Build({.delay = 10s});
  DoneTracker tracker;
  const WriteOp ops[] = {Op(0, 1024)};
  for (int i = 0; i < 20; ++i) ASSERT_THAT(Write(tracker, ops), IsOk());
  ASSERT_THAT(Flush(tracker), IsOk());
  ASSERT_THAT(fault_->SetOptions({.write_fail_rate = 1.0, .delay = 10s}), IsOk());
  ASSERT_THAT(Write(tracker, ops), IsOk());  // an injected failure, also held
  // Wait until the inner transport completed everything (held by the delay).
  const auto deadline = Clock::now() + kWaitTimeout;
  while (fault_->fault_stats().delayed_completions < 22 && Clock::now() < deadline) {
    std::this_thread::sleep_for(1ms);
  }
  ASSERT_EQ(fault_->fault_stats().delayed_completions, 22u);
  EXPECT_EQ(tracker.calls(0), 0);

  const auto start = Clock::now();
  writer_->Shutdown();
  tracker.Seal();
  EXPECT_LT(Clock::now() - start, 5s);  // did not wait out the delay
  EXPECT_TRUE(tracker.WaitAll(0ms));
  for (const Status& status : tracker.statuses()) {
    EXPECT_THAT(status, StatusIs(StatusCode::kAborted));
  }
  EXPECT_THAT(tracker.status(0), StatusIs(StatusCode::kAborted, HasSubstr("OK")));
  EXPECT_THAT(Write(tracker, ops), StatusIs(StatusCode::kAborted));
  EXPECT_THAT(Flush(tracker), StatusIs(StatusCode::kAborted));
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(tracker.Violations(), "");
  EXPECT_EQ(writer_->callbacks_after_shutdown(), 0);
  ASSERT_TRUE(receiver_->WaitForFailure(to_writer_));
}

TEST_F(FaultTransportTest, ShutdownDropsDelayedMessages) {
  Build({}, /*wrap_receiver=*/true);
  ASSERT_THAT(receiver_fault_->SetOptions({.message_delay = 10s}), IsOk());
  for (int i = 0; i < 10; ++i) ASSERT_THAT(writer_->SendText(to_receiver_, "late"), IsOk());
  const auto deadline = Clock::now() + kWaitTimeout;
  while (receiver_fault_->fault_stats().delayed_messages < 10 && Clock::now() < deadline) {
    std::this_thread::sleep_for(1ms);
  }
  const auto start = Clock::now();
  receiver_->Shutdown();
  EXPECT_LT(Clock::now() - start, 5s);
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(receiver_->messages().size(), 1u);  // only the HELLO
  EXPECT_EQ(receiver_->callbacks_after_shutdown(), 0);
}

TEST_F(FaultTransportTest, StatsAndRegionsComeFromTheInnerTransport) {
  Build({});
  DoneTracker tracker;
  const WriteOp ops[] = {Op(0, 100), Op(100, 50)};
  ASSERT_THAT(Write(tracker, ops), IsOk());
  ASSERT_THAT(Flush(tracker), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  const TransportStats outer = (*writer_)->Stats();
  const TransportStats inner = fault_->inner().Stats();
  EXPECT_EQ(outer.write_ops, 2u);
  EXPECT_EQ(outer.write_bytes, 150u);
  EXPECT_EQ(outer.flushes, 1u);
  EXPECT_EQ(inner.write_ops, outer.write_ops);
  EXPECT_EQ(inner.messages_sent, outer.messages_sent);
  EXPECT_EQ(target_->mapped_address(), dst_.addr());
}

// --- Cancellation -------------------------------------------------------------

TEST_F(FaultTransportTest, StopTokenIsForwardedToTheInnerTransport) {
  Build({});
  std::stop_source stop;
  stop.request_stop();
  DoneTracker tracker;
  const WriteOp ops[] = {Op(0, 4096)};
  ASSERT_THAT(Write(tracker, ops, stop.get_token()), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(0), StatusIs(StatusCode::kCancelled));
  EXPECT_TRUE(dst_.AllEqual(0));
  EXPECT_EQ(tracker.Violations(), "");
}

TEST_F(FaultTransportTest, InjectedFailureIgnoresTheStopToken) {
  Build({.write_fail_rate = 1.0, .delay = 10ms});
  std::stop_source stop;
  DoneTracker tracker;
  const WriteOp ops[] = {Op(0, 4096)};
  ASSERT_THAT(Write(tracker, ops, stop.get_token()), IsOk());
  stop.request_stop();
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(0),
              StatusIs(StatusCode::kUnavailable, HasSubstr("injected write failure")));
  EXPECT_EQ(tracker.Violations(), "");
}

// --- Holding writes -------------------------------------------------------------

// Three batches into the same bytes: the last one issued wins, so the
// contents show the order; the stop requested while held is ignored.
TEST_F(FaultTransportTest, ReleasedWritesLandInOrderIgnoringTheirStopTokens) {
  Build({});
  GuardedBuffer other(kBytes);
  other.FillPattern(99);
  auto other_source = (*writer_)->Register(other.addr(), kBytes, MemoryKind::kHost);
  ASSERT_THAT(other_source, IsOk());
  const WriteOp from_src[] = {Op(0, 4096)};
  const WriteOp from_other[] = {{other.addr(), dst_.addr(), 4096}};

  fault_->HoldWrites();
  std::stop_source stop;
  DoneTracker tracker;
  ASSERT_THAT(Write(tracker, from_src, stop.get_token()), IsOk());
  {
    InsideCall inside;
    ASSERT_THAT(
        (*writer_)->Write(**other_source, *target_, from_other, tracker.Make(), stop.get_token()),
        IsOk());
  }
  ASSERT_THAT(Write(tracker, from_src, stop.get_token()), IsOk());
  EXPECT_TRUE(fault_->WaitForHeldWrites(3, kWaitTimeout));
  EXPECT_EQ(fault_->held_writes(), 3u);
  EXPECT_FALSE(fault_->WaitForHeldWrites(4, 0ms));
  stop.request_stop();
  EXPECT_EQ(tracker.calls(0), 0);
  EXPECT_TRUE(dst_.AllEqual(0));  // nothing issued
  EXPECT_EQ((*writer_)->Stats().write_ops, 0u);

  {
    InsideCall inside;
    fault_->ReleaseWrites();
  }
  EXPECT_EQ(fault_->held_writes(), 0u);
  ASSERT_TRUE(tracker.WaitAll());
  for (const Status& status : tracker.statuses()) EXPECT_THAT(status, IsOk());
  EXPECT_EQ(std::memcmp(dst_.data(), src_.data(), 4096), 0);  // the third, issued last
  EXPECT_EQ((*writer_)->Stats().write_ops, 3u);

  // No longer holding: the next write goes straight through (and its stop
  // token is honoured again).
  DoneTracker after;
  ASSERT_THAT(Write(after, from_src, stop.get_token()), IsOk());
  ASSERT_TRUE(after.WaitAll());
  EXPECT_THAT(after.status(0), StatusIs(StatusCode::kCancelled));
  EXPECT_EQ(tracker.Violations(), "");
  EXPECT_EQ(after.Violations(), "");
  other_source->reset();
}

TEST_F(FaultTransportTest, ShutdownFailsHeldWritesWithAbortedNeverIssuingThem) {
  Build({});
  fault_->HoldWrites();
  DoneTracker tracker;
  const WriteOp ops[] = {Op(0, 4096)};
  for (int i = 0; i < 3; ++i) ASSERT_THAT(Write(tracker, ops), IsOk());
  ASSERT_TRUE(fault_->WaitForHeldWrites(3, kWaitTimeout));
  writer_->Shutdown();
  tracker.Seal();
  EXPECT_TRUE(tracker.WaitAll(0ms));  // every one ran, before Shutdown returned
  for (const Status& status : tracker.statuses()) {
    EXPECT_THAT(status, StatusIs(StatusCode::kAborted, HasSubstr("never issued")));
  }
  EXPECT_EQ(fault_->held_writes(), 0u);
  fault_->ReleaseWrites();  // nothing left to release
  EXPECT_TRUE(dst_.AllEqual(0));
  EXPECT_EQ(fault_->inner().Stats().write_ops, 0u);
  EXPECT_EQ(tracker.Violations(), "");
  EXPECT_EQ(writer_->callbacks_after_shutdown(), 0);
  ASSERT_TRUE(receiver_->WaitForFailure(to_writer_));
}

// The connection dies while batches are held: the inner transport reports
// the failure at once, the decorator holds it back until the released
// batches (refused by the inner transport, reported on the timer thread)
// have completed.
TEST_F(FaultTransportTest, FailureWaitsForHeldWritesToBeReleasedAndCompleted) {
  std::mutex mu;
  std::vector<std::string> events;
  Build({}, /*wrap_receiver=*/false, [&](TestEndpoint& writer) {
    writer.on_peer_failure_hook = [&](PeerId, const Status&) {
      std::lock_guard<std::mutex> lock(mu);
      events.push_back("failure");
    };
  });
  auto c = MakeTestEndpoint(LoopbackTransport::Create(fabric_, "c"));
  auto [c_to_writer, writer_to_c] = ConnectTestEndpoints(*c, *writer_);

  fault_->HoldWrites();
  const WriteOp ops[] = {Op(0, 4096)};
  auto record = [&](std::string name) {
    return [&, name](Status status) {
      std::lock_guard<std::mutex> lock(mu);
      events.push_back(name + " " + std::string(StatusCodeName(status.code())));
    };
  };
  ASSERT_THAT((*writer_)->Write(*source_, *target_, ops, record("done1")), IsOk());
  ASSERT_THAT((*writer_)->Write(*source_, *target_, ops, record("done2")), IsOk());
  ASSERT_TRUE(fault_->WaitForHeldWrites(2, kWaitTimeout));

  (*receiver_)->Disconnect(to_writer_, UnavailableError("receiver left"));
  ASSERT_TRUE(receiver_->WaitForFailure(to_writer_));
  // The inner transport delivers in order: once c's message is through, the
  // failure before it reached the decorator (and was held back).
  const size_t before = writer_->messages().size();
  ASSERT_THAT(c->SendText(c_to_writer, "SYNC"), IsOk());
  ASSERT_TRUE(writer_->WaitForMessages(before + 1));
  EXPECT_EQ(writer_->total_failures(), 0);
  // A write for the dead peer is not held: the inner transport refuses it.
  DoneTracker refused;
  EXPECT_THAT(Write(refused, ops), StatusIs(StatusCode::kUnavailable));
  EXPECT_EQ(fault_->held_writes(), 2u);

  {
    InsideCall inside;  // nothing may run inside ReleaseWrites
    fault_->ReleaseWrites();
  }
  ASSERT_TRUE(writer_->WaitForFailure(to_receiver_));
  EXPECT_THAT(writer_->failure_reason(to_receiver_),
              StatusIs(StatusCode::kUnavailable, HasSubstr("receiver left")));
  {
    std::lock_guard<std::mutex> lock(mu);
    const std::string unavailable(StatusCodeName(StatusCode::kUnavailable));
    EXPECT_EQ(events, (std::vector<std::string>{"done1 " + unavailable, "done2 " + unavailable,
                                                "failure"}));
  }
  EXPECT_TRUE(dst_.AllEqual(0));
  EXPECT_EQ(refused.Violations(), "");
  writer_->Shutdown();
  EXPECT_EQ(writer_->failures(to_receiver_), 1);
}

// Released batches that the inner transport accepts land; the failure that
// comes later follows their completions as usual.
TEST_F(FaultTransportTest, HeldWritesReleasedOnALiveConnectionLandBeforeTheFailure) {
  Build({.delay = 1ms});
  fault_->HoldWrites();
  DoneTracker tracker;
  const WriteOp ops[] = {Op(0, 8192)};
  ASSERT_THAT(Write(tracker, ops), IsOk());
  ASSERT_TRUE(fault_->WaitForHeldWrites(1, kWaitTimeout));
  fault_->ReleaseWrites();
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(0), IsOk());
  EXPECT_EQ(std::memcmp(dst_.data(), src_.data(), 8192), 0);
  fault_->InjectDisconnect(to_receiver_);
  ASSERT_TRUE(writer_->WaitForFailure(to_receiver_));
  ASSERT_TRUE(receiver_->WaitForFailure(to_writer_));
  EXPECT_EQ(tracker.Violations(), "");
}

// Every accepted callback exactly once, whatever mix of held, released,
// injected and plain writes and a Shutdown racing with ReleaseWrites.
TEST_F(FaultTransportTest, HoldReleaseAndShutdownRunEveryCallbackOnce) {
  Build({.write_fail_rate = 0.3, .seed = 5});
  DoneTracker tracker;
  const WriteOp ops[] = {Op(0, 256), Op(256, 256)};
  std::atomic<bool> stop_threads{false};
  std::thread toggler([&] {
    while (!stop_threads.load()) {
      fault_->HoldWrites();
      std::this_thread::yield();
      fault_->ReleaseWrites();
    }
  });
  for (int i = 0; i < 300; ++i) {
    const Status status = Write(tracker, ops);
    EXPECT_TRUE(status.ok() || status.code() == StatusCode::kAborted) << status;
  }
  fault_->HoldWrites();
  for (int i = 0; i < 5; ++i) (void)Write(tracker, ops);
  writer_->Shutdown();
  tracker.Seal();
  stop_threads = true;
  toggler.join();
  EXPECT_TRUE(tracker.WaitAll(0ms));
  EXPECT_EQ(tracker.Violations(), "");
  EXPECT_EQ(writer_->callbacks_after_shutdown(), 0);
}

// Completions the decorator holds back (delay, injected failures) are
// completions of the peer's writes too: the failure follows them.
TEST_F(FaultTransportTest, FailureFollowsDelayedAndInjectedCompletions) {
  std::mutex mu;
  std::vector<std::string> events;
  Build({.delay = 30ms}, /*wrap_receiver=*/false, [&](TestEndpoint& writer) {
    writer.on_peer_failure_hook = [&](PeerId, const Status&) {
      std::lock_guard<std::mutex> lock(mu);
      events.push_back("failure");
    };
  });
  auto record = [&](std::string name) {
    return [&, name](Status status) {
      std::lock_guard<std::mutex> lock(mu);
      events.push_back(name + " " + std::string(StatusCodeName(status.code())));
    };
  };
  const WriteOp ops[] = {Op(0, 1024)};
  ASSERT_THAT((*writer_)->Write(*source_, *target_, ops, record("write")), IsOk());
  ASSERT_THAT((*writer_)->Flush(to_receiver_, record("flush")), IsOk());
  ASSERT_THAT(fault_->SetOptions({.write_fail_rate = 1.0, .delay = 30ms}), IsOk());
  ASSERT_THAT((*writer_)->Write(*source_, *target_, ops, record("injected")), IsOk());
  // The inner transport completed the write and the flush; the decorator
  // holds all three completions for their delay.
  const auto deadline = Clock::now() + kWaitTimeout;
  while (fault_->fault_stats().delayed_completions < 3 && Clock::now() < deadline) {
    std::this_thread::sleep_for(100us);
  }
  ASSERT_EQ(fault_->fault_stats().delayed_completions, 3u);
  fault_->InjectDisconnect(to_receiver_);
  ASSERT_TRUE(writer_->WaitForFailure(to_receiver_));
  std::lock_guard<std::mutex> lock(mu);
  const std::string ok(StatusCodeName(StatusCode::kOk));
  const std::string unavailable(StatusCodeName(StatusCode::kUnavailable));
  // The three completions in any order (their delays start at different
  // moments), then the failure.
  ASSERT_EQ(events.size(), 4u);
  EXPECT_THAT(
      std::vector<std::string>(events.begin(), events.begin() + 3),
      ::testing::UnorderedElementsAre("write " + ok, "flush " + ok, "injected " + unavailable));
  EXPECT_EQ(events[3], "failure");
}

// --- Injection on many threads ------------------------------------------------

// Several decorators injecting at once, from several threads. With
// std::binomial_distribution this raced on glibc's global `signgam` (inside
// lgamma) under ThreadSanitizer; the choice must use no global state.
TEST(FaultInjectionConcurrencyTest, SeveralDecoratorsInjectFromSeveralThreads) {
  constexpr int kDecorators = 4;
  constexpr int kWrites = 100;
  constexpr size_t kOps = 64;  // n * rate >= 8: binomial's lgamma path
  auto fabric = LoopbackFabric::Create();
  auto receiver = MakeTestEndpoint(LoopbackTransport::Create(fabric, "receiver"));
  GuardedBuffer dst(kOps * 16, 0);
  auto dst_region = (*receiver)->Register(dst.addr(), dst.size(), MemoryKind::kHost);
  ASSERT_THAT(dst_region, IsOk());
  GuardedBuffer src(kOps * 16);
  src.FillPattern(8);
  std::vector<WriteOp> ops;
  for (size_t i = 0; i < kOps; ++i) ops.push_back({src.addr(i * 16), dst.addr(i * 16), 16});

  struct Writer {
    std::unique_ptr<TestEndpoint> endpoint;
    FaultTransport* fault = nullptr;
    std::unique_ptr<LocalRegion> source;
    std::unique_ptr<RemoteRegion> target;
  };
  std::vector<Writer> writers(kDecorators);
  for (int d = 0; d < kDecorators; ++d) {
    auto inner = LoopbackTransport::Create(fabric, "w" + std::to_string(d));
    ASSERT_THAT(inner, IsOk());
    auto fault = FaultTransport::Create(std::move(inner).value(),
                                        {.write_fail_rate = 0.5, .seed = uint64_t(d + 1)});
    ASSERT_THAT(fault, IsOk());
    writers[d].fault = fault->get();
    writers[d].endpoint = MakeTestEndpoint(std::move(fault));
    auto [to_receiver, unused] = ConnectTestEndpoints(*writers[d].endpoint, *receiver);
    auto source = (*writers[d].endpoint)->Register(src.addr(), src.size(), MemoryKind::kHost);
    ASSERT_THAT(source, IsOk());
    writers[d].source = std::move(source).value();
    auto target = (*writers[d].endpoint)->Import(to_receiver, (*dst_region)->info());
    ASSERT_THAT(target, IsOk());
    writers[d].target = std::move(target).value();
  }
  // One tracker per thread: a shared one would order the threads' calls
  // (through its mutex) and hide a race from ThreadSanitizer.
  std::vector<DoneTracker> trackers(kDecorators);
  std::vector<std::thread> threads;
  for (int d = 0; d < kDecorators; ++d) {
    threads.emplace_back([&, d] {
      for (int i = 0; i < kWrites; ++i) {
        Status status =
            (*writers[d].endpoint)
                ->Write(*writers[d].source, *writers[d].target, ops, trackers[d].Make());
        EXPECT_THAT(status, IsOk());
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (const DoneTracker& tracker : trackers) ASSERT_TRUE(tracker.WaitAll());
  uint64_t chosen = 0;
  for (const Writer& writer : writers) {
    const FaultStats stats = writer.fault->fault_stats();
    EXPECT_GE(stats.failed_batches, kWrites - 1u);  // 64 ops at 0.5: all but surely fail
    chosen += stats.injected_write_failures;
  }
  const double total_ops = double(kDecorators) * kWrites * kOps;
  EXPECT_NEAR(double(chosen) / total_ops, 0.5, 0.05);
  for (const DoneTracker& tracker : trackers) EXPECT_EQ(tracker.Violations(), "");
  for (Writer& writer : writers) {
    writer.target.reset();
    writer.source.reset();
  }
  dst_region->reset();
}

// The chosen ops follow the rate also for small rates and large batches, and
// the same seed makes the same choices.
TEST_F(FaultTransportTest, ChosenOpsFollowTheRateAndTheSeed) {
  Build({.write_fail_rate = 0.02, .seed = 11});
  std::vector<WriteOp> ops;
  for (size_t i = 0; i < 100; ++i) ops.push_back(Op(i * 64, 64));
  auto run = [&] {
    DoneTracker tracker;
    for (int i = 0; i < 500; ++i) EXPECT_THAT(Write(tracker, ops), IsOk());
    EXPECT_TRUE(tracker.WaitAll());
    std::vector<bool> failed;
    for (const Status& status : tracker.statuses()) failed.push_back(!status.ok());
    return failed;
  };
  const std::vector<bool> first = run();
  const FaultStats stats = fault_->fault_stats();
  // 50,000 ops at 2%: about 1,000 chosen; a batch fails with 1 - 0.98^100.
  EXPECT_NEAR(double(stats.injected_write_failures), 1000.0, 150.0);
  EXPECT_NEAR(double(stats.failed_batches), 500 * (1 - std::pow(0.98, 100)), 40.0);
  ASSERT_THAT(fault_->SetOptions({.write_fail_rate = 0.02, .seed = 11}), IsOk());
  EXPECT_EQ(run(), first);
}

// --- Read: forwarded, with the faults of a write ------------------------------

TEST_F(FaultTransportTest, ReadIsForwardedToTheInnerTransport) {
  Build({});
  std::memset(dst_.data(), 0x3C, kBytes);
  DoneTracker tracker;
  const ReadOp ops[] = {ReadBackOp(0, 4096), ReadBackOp(8192, 100)};
  ASSERT_THAT(Read(tracker, ops), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(0), IsOk());
  for (size_t i = 0; i < 4096; ++i) ASSERT_EQ(src_.data()[i], 0x3C) << "byte " << i;
  for (size_t i = 8192; i < 8292; ++i) ASSERT_EQ(src_.data()[i], 0x3C) << "byte " << i;
  EXPECT_EQ((*writer_)->Stats().read_ops, 2u);  // the inner transport's counters
  EXPECT_EQ((*writer_)->Stats().read_bytes, 4196u);
  EXPECT_TRUE((*writer_)->Caps().read_remote);
  auto caps = (*writer_)->PeerCaps(to_receiver_);
  ASSERT_THAT(caps, IsOk());
  EXPECT_TRUE(caps->read_remote);
  // Range checks and the done callback are checked here too.
  const ReadOp bad[] = {ReadBackOp(kBytes - 10, 64)};
  EXPECT_THAT(Read(tracker, bad), StatusIs(StatusCode::kOutOfRange, HasSubstr("read op 0")));
  EXPECT_THAT((*writer_)->Read(*target_, *source_, ops, TransportDone(), {}),
              StatusIs(StatusCode::kInvalidArgument));
  // Held writes do not hold reads.
  fault_->HoldWrites();
  ASSERT_THAT(Read(tracker, ops), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(2), IsOk());
  EXPECT_EQ(fault_->held_writes(), 0u);
  fault_->ReleaseWrites();
  EXPECT_EQ(tracker.Violations(), "");
}

TEST_F(FaultTransportTest, RateOneFailsEveryReadAndNothingIsRead) {
  Build({.write_fail_rate = 1.0});
  std::memset(dst_.data(), 0x3C, kBytes);
  const std::vector<uint8_t> before(src_.data(), src_.data() + kBytes);
  DoneTracker tracker;
  std::vector<ReadOp> ops;
  for (int i = 0; i < 5; ++i) ops.push_back(ReadBackOp(i * 128));
  for (int batch = 0; batch < 4; ++batch) ASSERT_THAT(Read(tracker, ops), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_THAT(tracker.status(i),
                StatusIs(StatusCode::kUnavailable, HasSubstr("injected read failure: 5 of 5")));
  }
  const FaultStats stats = fault_->fault_stats();
  EXPECT_EQ(stats.injected_read_failures, 20u);
  EXPECT_EQ(stats.injected_write_failures, 0u);
  EXPECT_EQ(stats.failed_batches, 4u);
  EXPECT_EQ((*writer_)->Stats().read_ops, 0u);                    // never issued
  EXPECT_EQ(std::memcmp(src_.data(), before.data(), kBytes), 0);  // nothing read
  EXPECT_EQ(tracker.Violations(), "");
}

// drop_after_ops counts write and read ops alike; a Read may fire it.
TEST_F(FaultTransportTest, DropAfterOpsCountsReadOps) {
  Build({.drop_after_ops = 6});
  DoneTracker tracker;
  std::vector<WriteOp> writes = {Op(0), Op(64), Op(128), Op(192)};
  std::vector<ReadOp> reads = {ReadBackOp(0), ReadBackOp(64), ReadBackOp(128)};
  ASSERT_THAT(Write(tracker, writes), IsOk());  // 4
  ASSERT_THAT(Read(tracker, reads), IsOk());    // 7 >= 6: the next call drops
  ASSERT_TRUE(tracker.WaitAll());
  for (const Status& status : tracker.statuses()) EXPECT_THAT(status, IsOk());
  EXPECT_THAT(Read(tracker, reads),
              StatusIs(StatusCode::kUnavailable, HasSubstr("dropped after 6 operations")));
  EXPECT_EQ(fault_->fault_stats().dropped_connections, 1u);
  ASSERT_TRUE(writer_->WaitForFailure(to_receiver_));
  ASSERT_TRUE(receiver_->WaitForFailure(to_writer_));
  EXPECT_THAT(Read(tracker, reads), StatusIs(StatusCode::kUnavailable));
  EXPECT_EQ(tracker.Violations(), "");
}

// A delayed read completion is reported no earlier than the delay, and the
// connection's failure waits for it (the fence).
TEST_F(FaultTransportTest, DelayHoldsReadCompletionsAndTheFailureBehindThem) {
  constexpr auto kDelay = 30ms;
  Build({.delay = kDelay});
  std::memset(dst_.data(), 0x3C, kBytes);
  std::atomic<bool> done_ran{false};
  std::atomic<int> done_before_failure{-1};
  DoneTracker tracker;
  const ReadOp ops[] = {ReadBackOp(0, 4096)};
  const auto start = Clock::now();
  {
    InsideCall inside;
    auto done = tracker.Make();
    ASSERT_THAT((*writer_)->Read(*target_, *source_, ops,
                                 [&, done](Status status) {
                                   done_before_failure = writer_->failures(to_receiver_);
                                   done_ran = true;
                                   done(std::move(status));
                                 },
                                 {}),
                IsOk());
  }
  (*receiver_)->Disconnect(to_writer_, UnavailableError("test disconnect"));
  ASSERT_TRUE(writer_->WaitForFailure(to_receiver_));
  EXPECT_TRUE(done_ran.load());
  EXPECT_EQ(done_before_failure.load(), 0);
  EXPECT_GE(Clock::now() - start, kDelay);
  ASSERT_TRUE(tracker.WaitAll());
  // Read at once by the inner transport, or refused as the connection died.
  EXPECT_THAT(tracker.status(0), testing::AnyOf(IsOk(), StatusIs(StatusCode::kUnavailable)));
  EXPECT_EQ(fault_->fault_stats().delayed_completions, 1u);
  EXPECT_EQ(tracker.Violations(), "");
}

TEST_F(FaultTransportTest, ReadTheInnerTransportCannotDoIsUnimplementedNotInjected) {
  auto inner =
      LoopbackTransport::Create(fabric_, "plain-writer", LoopbackOptions{.read_remote = false});
  ASSERT_THAT(inner, IsOk());
  auto fault = FaultTransport::Create(std::move(inner).value(), {.write_fail_rate = 1.0});
  ASSERT_THAT(fault, IsOk());
  TestEndpoint reader(std::move(fault).value());
  ASSERT_THAT(reader.Start(), IsOk());
  auto peer = MakeTestEndpoint(LoopbackTransport::Create(fabric_, "plain-peer"));
  auto [to_peer, to_reader] = ConnectTestEndpoints(reader, *peer);
  auto peer_region = (*peer)->Register(dst_.addr(), kBytes, MemoryKind::kHost);
  auto own_region = reader->Register(src_.addr(), kBytes, MemoryKind::kHost);
  ASSERT_THAT(peer_region, IsOk());
  ASSERT_THAT(own_region, IsOk());
  auto source = reader->Import(to_peer, (*peer_region)->info());
  ASSERT_THAT(source, IsOk());
  const ReadOp ops[] = {ReadBackOp(0)};
  EXPECT_THAT(reader->Read(**source, **own_region, ops, [](Status) {}, {}),
              StatusIs(StatusCode::kUnimplemented));
  EXPECT_THAT(reader->Read(**source, **own_region, ops, [](Status) {}, {}),
              StatusIs(StatusCode::kUnimplemented));
}

}  // namespace
}  // namespace kvbounce::transport_test
