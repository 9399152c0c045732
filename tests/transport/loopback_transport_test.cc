// Behaviour specific to the loopback transport (the shared contract is in
// transport_conformance_test.cc).
#include "transport/loopback/loopback_transport.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <poll.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <stop_token>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "common/status_matchers.h"
#include "copy/device_support.h"
#include "kvbounce/config.h"
#include "kvbounce/status.h"
#include "kvbounce/transport.h"
#include "kvbounce/transports.h"
#include "kvbounce/types.h"
#include "transport/transport_test_util.h"

namespace kvbounce::transport_test {
namespace {

using ::kvbounce::testing_util::IsOk;
using ::kvbounce::testing_util::StatusIs;
using ::testing::HasSubstr;

using ::testing::AllOf;

// Holds a write of one writer inside the fabric's write hook: the
// `block_at`-th hook call of `writer` (0-based) blocks until Release().
// Declare it after the endpoints, so that it releases (on destruction)
// before they shut down.
class WriteGate {
 public:
  WriteGate(LoopbackFabric& fabric, std::string writer_address, size_t block_at)
      : state_(std::make_shared<State>()) {
    fabric.SetWriteHook([state = state_, writer = std::move(writer_address), block_at](
                            std::string_view address, size_t op_index) {
      if (address != writer) return;
      std::unique_lock<std::mutex> lock(state->mu);
      const size_t call = state->calls++;
      if (call != block_at) return;
      state->entered_op = op_index;
      state->entered = true;
      state->cv.notify_all();
      state->cv.wait(lock, [&] { return state->released; });
    });
  }
  ~WriteGate() { Release(); }

  bool WaitEntered() {
    std::unique_lock<std::mutex> lock(state_->mu);
    return state_->cv.wait_for(lock, kWaitTimeout, [this] { return state_->entered; });
  }
  size_t entered_op() const {
    std::lock_guard<std::mutex> lock(state_->mu);
    return state_->entered_op;
  }
  void Release() {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->released = true;
    state_->cv.notify_all();
  }

 private:
  struct State {
    mutable std::mutex mu;
    std::condition_variable cv;
    size_t calls = 0;
    size_t entered_op = 0;
    bool entered = false;
    bool released = false;
  };
  std::shared_ptr<State> state_;
};

class LoopbackTransportTest : public ::testing::Test {
 protected:
  std::unique_ptr<TestEndpoint> MakeEndpoint(const std::string& name, bool start = true) {
    return MakeTestEndpoint(LoopbackTransport::Create(fabric_, name), start);
  }

  std::pair<PeerId, PeerId> Connect(TestEndpoint& from, TestEndpoint& to) {
    return ConnectTestEndpoints(from, to);
  }

  // Waits until `endpoint` delivered a message `from` just sent it: every
  // item queued for `endpoint` before that message has been processed.
  void SyncThread(TestEndpoint& from, PeerId to_endpoint, TestEndpoint& endpoint) {
    const size_t before = endpoint.messages().size();
    ASSERT_THAT(from.SendText(to_endpoint, "SYNC"), IsOk());
    ASSERT_TRUE(endpoint.WaitForMessages(before + 1));
  }

  std::shared_ptr<LoopbackFabric> fabric_ = LoopbackFabric::Create();
};

// Two connected endpoints `a` and `b`, a source and a destination buffer
// and `kOps` ops of `kOpBytes` each from src_ to dst_: what the write and
// the read fixtures share (they differ in which side owns which buffer).
class LoopbackDataTest : public LoopbackTransportTest {
 protected:
  static constexpr size_t kOps = 8;
  static constexpr size_t kOpBytes = 4096;
  static constexpr size_t kBytes = kOps * kOpBytes;

  // Connects a and b and fills src_ with `pattern`.
  void ConnectAndFill(uint8_t pattern) {
    a_ = MakeEndpoint("a");
    b_ = MakeEndpoint("b");
    std::tie(a_to_b_, b_to_a_) = Connect(*a_, *b_);
    src_.FillPattern(pattern);
  }

  // The kOps ops from src_ to dst_ (WriteOp or ReadOp).
  template <typename Op>
  std::vector<Op> Ops() const {
    std::vector<Op> ops;
    for (size_t i = 0; i < kOps; ++i) {
      ops.push_back({src_.addr(i * kOpBytes), dst_.addr(i * kOpBytes), kOpBytes});
    }
    return ops;
  }

  // Whether op i landed (true), was left untouched (false); fails the test
  // for anything in between.
  bool OpLanded(size_t i) {
    const uint8_t* got = dst_.data() + i * kOpBytes;
    if (std::memcmp(got, src_.data() + i * kOpBytes, kOpBytes) == 0) return true;
    for (size_t j = 0; j < kOpBytes; ++j) {
      EXPECT_EQ(got[j], 0) << "op " << i << " byte " << j;
      if (got[j] != 0) break;
    }
    return false;
  }

  GuardedBuffer src_{kBytes};
  GuardedBuffer dst_{kBytes, 0};
  std::unique_ptr<TestEndpoint> a_;
  std::unique_ptr<TestEndpoint> b_;
  PeerId a_to_b_ = 0;
  PeerId b_to_a_ = 0;
};

// A writer `a` and a receiver `b`, with a source region on a and a target
// region on b (imported by a).
class LoopbackWriteTest : public LoopbackDataTest {
 protected:
  void SetUp() override {
    ConnectAndFill(17);
    ops_ = Ops<WriteOp>();
    auto source = (*a_)->Register(src_.addr(), kBytes, MemoryKind::kHost);
    ASSERT_THAT(source, IsOk());
    source_ = std::move(source).value();
    auto region = (*b_)->Register(dst_.addr(), kBytes, MemoryKind::kHost);
    ASSERT_THAT(region, IsOk());
    dst_region_ = std::move(region).value();
    auto target = (*a_)->Import(a_to_b_, dst_region_->info());
    ASSERT_THAT(target, IsOk());
    target_ = std::move(target).value();
  }

  void TearDown() override {
    target_.reset();
    dst_region_.reset();
    source_.reset();
  }

  Status Write(DoneTracker& tracker, std::stop_token stop = {}) {
    InsideCall inside;
    Status status = (*a_)->Write(*source_, *target_, ops_, tracker.Make(), std::move(stop));
    if (!status.ok()) tracker.Forget();
    return status;
  }

  std::unique_ptr<LocalRegion> source_;
  std::unique_ptr<LocalRegion> dst_region_;
  std::unique_ptr<RemoteRegion> target_;
  std::vector<WriteOp> ops_;
};

TEST_F(LoopbackTransportTest, CreateValidatesNameAndFabric) {
  EXPECT_THAT(LoopbackTransport::Create(nullptr, "a"), StatusIs(StatusCode::kInvalidArgument));
  EXPECT_THAT(LoopbackTransport::Create(fabric_, ""), StatusIs(StatusCode::kInvalidArgument));
  for (const int64_t us : {int64_t{-1}, Config::kMaxPollUs + 1}) {
    LoopbackOptions options;
    options.poll_before_sleep = std::chrono::microseconds(us);
    EXPECT_THAT(LoopbackTransport::Create(fabric_, "polling", options),
                StatusIs(StatusCode::kInvalidArgument, HasSubstr("poll_before_sleep")));
  }
  auto a = LoopbackTransport::Create(fabric_, "a");
  ASSERT_THAT(a, IsOk());
  EXPECT_THAT(LoopbackTransport::Create(fabric_, "a"),
              StatusIs(StatusCode::kAlreadyExists, HasSubstr("'a'")));
  // Another fabric is another namespace.
  EXPECT_THAT(LoopbackTransport::Create(LoopbackFabric::Create(), "a"), IsOk());
  EXPECT_EQ(fabric_->num_endpoints(), 1u);

  EXPECT_EQ((*a)->name(), "a");
  EXPECT_EQ((*a)->Address(), "loopback:a");
  const TransportCaps caps = (*a)->Caps();
  EXPECT_EQ(caps.name, "loopback");
  EXPECT_TRUE(caps.host_memory);
  // Device memory exactly where the build has a GPU runtime.
  EXPECT_EQ(caps.device_memory, CudaSupport() != nullptr);
  EXPECT_TRUE(caps.map_remote);

  // Shutdown frees the name at once.
  (*a)->Shutdown();
  EXPECT_EQ(fabric_->num_endpoints(), 0u);
  EXPECT_THAT(LoopbackTransport::Create(fabric_, "a"), IsOk());
}

TEST_F(LoopbackTransportTest, RegisterChecksTheRegion) {
  auto a = MakeEndpoint("a", /*start=*/false);  // Register works before Start
  GuardedBuffer buffer(4096);
  // Host memory registered as device memory: refused, for the reason this
  // build and machine give (no GPU runtime, no device, not device memory).
  const Result<std::unique_ptr<LocalRegion>> cuda =
      (*a)->Register(buffer.addr(), 4096, MemoryKind::kCuda);
  if (CudaSupport() == nullptr) {
    EXPECT_THAT(cuda, StatusIs(StatusCode::kInvalidArgument, HasSubstr("build without CUDA")));
  } else if (CudaSupport()->DeviceCount() == 0) {
    EXPECT_THAT(cuda, StatusIs(StatusCode::kUnavailable, HasSubstr("registering cuda memory")));
  } else {
    EXPECT_THAT(cuda, StatusIs(StatusCode::kInvalidArgument, HasSubstr("but is host memory")));
  }
  EXPECT_THAT((*a)->Register(buffer.addr(), 0, MemoryKind::kHost),
              StatusIs(StatusCode::kInvalidArgument));
  EXPECT_THAT((*a)->Register(Addr(), 64, MemoryKind::kHost),
              StatusIs(StatusCode::kInvalidArgument));
  EXPECT_THAT((*a)->Register(Addr(~0ull - 10), 64, MemoryKind::kHost),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("wraps")));

  auto host = (*a)->Register(buffer.addr(), 4096, MemoryKind::kHost);
  ASSERT_THAT(host, IsOk());
  auto pinned = (*a)->Register(buffer.addr(), 1024, MemoryKind::kPinnedHost);
  ASSERT_THAT(pinned, IsOk());  // overlapping registrations are allowed
  EXPECT_EQ(fabric_->num_regions(), 2u);

  const RegionInfo& info = (*host)->info();
  EXPECT_EQ(info.address, buffer.addr());
  EXPECT_EQ(info.size, 4096u);
  EXPECT_EQ(info.kind, MemoryKind::kHost);
  EXPECT_EQ((*pinned)->info().kind, MemoryKind::kPinnedHost);
  // The key is the region id, 8 bytes little-endian; ids are distinct.
  ASSERT_EQ(info.remote_key.size(), 8u);
  EXPECT_NE(info.remote_key, (*pinned)->info().remote_key);
  EXPECT_THAT(std::string((*host)->Describe()), HasSubstr("loopback:a"));

  host->reset();
  EXPECT_EQ(fabric_->num_regions(), 1u);
  pinned->reset();
  EXPECT_EQ(fabric_->num_regions(), 0u);

  a->Shutdown();
  EXPECT_THAT((*a)->Register(buffer.addr(), 64, MemoryKind::kHost), StatusIs(StatusCode::kAborted));
}

TEST_F(LoopbackTransportTest, RemoteKeyIsTheRegionIdLittleEndian) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  GuardedBuffer buffer(256);
  auto region = (*b)->Register(buffer.addr(), 256, MemoryKind::kHost);
  ASSERT_THAT(region, IsOk());
  const RegionInfo info = (*region)->info();
  uint64_t id = 0;
  for (size_t i = 0; i < 8; ++i) id |= static_cast<uint64_t>(info.remote_key[i]) << (8 * i);
  EXPECT_GE(id, 1u);

  auto remote = (*a)->Import(a_to_b, info);
  ASSERT_THAT(remote, IsOk());
  EXPECT_EQ((*remote)->mapped_address(), buffer.addr());  // same process: direct path

  RegionInfo unknown = info;
  const uint64_t other = id + 1000;
  for (size_t i = 0; i < 8; ++i) unknown.remote_key[i] = static_cast<std::byte>(other >> (8 * i));
  EXPECT_THAT((*a)->Import(a_to_b, unknown), StatusIs(StatusCode::kNotFound));
  // A region of the importer itself, offered as the peer's.
  GuardedBuffer own(64);
  auto own_region = (*a)->Register(own.addr(), 64, MemoryKind::kHost);
  ASSERT_THAT(own_region, IsOk());
  EXPECT_THAT((*a)->Import(a_to_b, (*own_region)->info()),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("does not belong")));
  RegionInfo wrong_kind = info;
  wrong_kind.kind = MemoryKind::kPinnedHost;
  EXPECT_THAT((*a)->Import(a_to_b, wrong_kind), StatusIs(StatusCode::kInvalidArgument));
}

TEST_F(LoopbackTransportTest, ConnectNeedsAStartedLiveEndpointOnTheSameFabric) {
  auto a = MakeEndpoint("a");
  auto idle = MakeEndpoint("idle", /*start=*/false);
  EXPECT_THAT((*a)->Connect("loopback:idle"),
              StatusIs(StatusCode::kUnavailable, HasSubstr("not started")));
  EXPECT_THAT((*a)->Connect("loopback:"), StatusIs(StatusCode::kInvalidArgument));
  EXPECT_THAT((*a)->Connect("ucx:a"), StatusIs(StatusCode::kInvalidArgument));

  auto b = MakeEndpoint("b");
  b->Shutdown();
  EXPECT_THAT((*a)->Connect("loopback:b"), StatusIs(StatusCode::kUnavailable));

  auto elsewhere = LoopbackTransport::Create(LoopbackFabric::Create(), "far");
  ASSERT_THAT(elsewhere, IsOk());
  ASSERT_THAT((*elsewhere)->Start({}), IsOk());
  EXPECT_THAT((*a)->Connect("loopback:far"), StatusIs(StatusCode::kUnavailable));
}

TEST_F(LoopbackTransportTest, SelfConnectionWorks) {
  auto a = MakeEndpoint("a");
  auto out = (*a)->Connect((*a)->Address());
  ASSERT_THAT(out, IsOk());
  ASSERT_THAT(a->SendText(*out, "to myself"), IsOk());
  ASSERT_TRUE(a->WaitForMessages(1));
  const PeerId in = a->messages()[0].peer;
  EXPECT_NE(in, *out);
  ASSERT_THAT(a->SendText(in, "back"), IsOk());
  ASSERT_TRUE(a->WaitForMessages(2));
  EXPECT_EQ(a->messages()[1].peer, *out);

  (*a)->Disconnect(*out, UnavailableError("bye"));
  ASSERT_TRUE(a->WaitForFailure(*out));
  ASSERT_TRUE(a->WaitForFailure(in));
  EXPECT_EQ(a->total_failures(), 2);
}

TEST_F(LoopbackTransportTest, MessagesSentBeforeADisconnectArriveBeforeTheFailure) {
  auto b = MakeEndpoint("b", /*start=*/false);
  std::mutex mu;
  std::vector<std::string> events;
  TransportCallbacks callbacks;
  callbacks.on_message = [&](PeerId, std::vector<std::byte> frame) {
    std::lock_guard<std::mutex> lock(mu);
    events.push_back(Text(frame));
  };
  callbacks.on_peer_failure = [&](PeerId, const Status&) {
    std::lock_guard<std::mutex> lock(mu);
    events.push_back("FAILED");
  };
  ASSERT_THAT(b->t().Start(std::move(callbacks)), IsOk());
  auto a = MakeEndpoint("a");
  auto a_to_b = (*a)->Connect("loopback:b");
  ASSERT_THAT(a_to_b, IsOk());
  for (int i = 0; i < 100; ++i) ASSERT_THAT(a->SendText(*a_to_b, std::to_string(i)), IsOk());
  (*a)->Disconnect(*a_to_b, CancelledError("done here"));
  ASSERT_TRUE(a->WaitForFailure(*a_to_b));
  EXPECT_THAT(a->failure_reason(*a_to_b), StatusIs(StatusCode::kCancelled, "done here"));
  const auto deadline = std::chrono::steady_clock::now() + kWaitTimeout;
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (events.size() >= 101 || std::chrono::steady_clock::now() > deadline) break;
    }
    std::this_thread::sleep_for(1ms);
  }
  b->Shutdown();  // joins b's thread: nothing changes `events` any more

  ASSERT_EQ(events.size(), 101u);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(events[i], std::to_string(i));
  EXPECT_EQ(events[100], "FAILED");
}

TEST_F(LoopbackTransportTest, AcceptingEndHearsOfAFailureBeforeAnyMessage) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto a_to_b = (*a)->Connect("loopback:b");
  ASSERT_THAT(a_to_b, IsOk());
  (*a)->Disconnect(*a_to_b, Status());  // an OK reason becomes kUnavailable
  ASSERT_TRUE(a->WaitForFailure(*a_to_b));
  EXPECT_THAT(a->failure_reason(*a_to_b), StatusIs(StatusCode::kUnavailable));
  // b never saw a message, but still hears (for a PeerId new to it).
  ASSERT_TRUE(b->WaitForTotalFailures(1));
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(b->total_failures(), 1);
  EXPECT_TRUE(b->messages().empty());
}

TEST_F(LoopbackTransportTest, WriteRejectsRegionsOfOtherTransportsAndEmptyDone) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto c = MakeEndpoint("c");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  auto [c_to_b, b_to_c] = Connect(*c, *b);
  GuardedBuffer src(64);
  GuardedBuffer dst(64);
  auto a_src = (*a)->Register(src.addr(), 64, MemoryKind::kHost);
  auto c_src = (*c)->Register(src.addr(), 64, MemoryKind::kHost);
  auto b_dst = (*b)->Register(dst.addr(), 64, MemoryKind::kHost);
  ASSERT_THAT(b_dst, IsOk());
  auto a_target = (*a)->Import(a_to_b, (*b_dst)->info());
  auto c_target = (*c)->Import(c_to_b, (*b_dst)->info());
  ASSERT_THAT(a_target, IsOk());
  ASSERT_THAT(c_target, IsOk());
  const WriteOp ops[] = {{src.addr(), dst.addr(), 64}};
  DoneTracker tracker;
  EXPECT_THAT((*a)->Write(**c_src, **a_target, ops, tracker.Make()),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("source")));
  tracker.Forget();
  // c's import names c's PeerId; a has no such peer or a different one.
  Status foreign_target = (*a)->Write(**a_src, **c_target, ops, tracker.Make());
  tracker.Forget();
  EXPECT_FALSE(foreign_target.ok());
  EXPECT_THAT((*a)->Write(**a_src, **a_target, ops, nullptr),
              StatusIs(StatusCode::kInvalidArgument));
  EXPECT_THAT((*a)->Flush(a_to_b, nullptr), StatusIs(StatusCode::kInvalidArgument));
  EXPECT_TRUE(dst.AllEqual(0));
  EXPECT_EQ(tracker.Violations(), "");
}

TEST_F(LoopbackTransportTest, SourceDeregisteredBeforeTheWriteRunsFails) {
  // Hold a's thread so the write is still queued when its source goes away.
  std::mutex mu;
  std::condition_variable cv;
  bool entered = false;
  bool released = false;
  auto a = MakeEndpoint("a", /*start=*/false);
  a->on_message_hook = [&](PeerId, const std::vector<std::byte>& frame) {
    if (Text(frame) != "BLOCK") return;
    std::unique_lock<std::mutex> lock(mu);
    entered = true;
    cv.notify_all();
    cv.wait(lock, [&] { return released; });
  };
  ASSERT_THAT(a->Start(), IsOk());
  auto b = MakeEndpoint("b");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  GuardedBuffer src(128);
  src.FillPattern(4);
  GuardedBuffer dst(128, 0);
  auto source = (*a)->Register(src.addr(), 128, MemoryKind::kHost);
  auto dst_region = (*b)->Register(dst.addr(), 128, MemoryKind::kHost);
  ASSERT_THAT(dst_region, IsOk());
  auto target = (*a)->Import(a_to_b, (*dst_region)->info());
  ASSERT_THAT(target, IsOk());

  ASSERT_THAT(b->SendText(b_to_a, "BLOCK"), IsOk());
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, kWaitTimeout, [&] { return entered; }));
  }
  DoneTracker tracker;
  const WriteOp ops[] = {{src.addr(), dst.addr(), 128}};
  ASSERT_THAT((*a)->Write(**source, **target, ops, tracker.Make()), IsOk());
  source->reset();
  {
    std::lock_guard<std::mutex> lock(mu);
    released = true;
    cv.notify_all();
  }
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(0), StatusIs(StatusCode::kFailedPrecondition, HasSubstr("source")));
  EXPECT_TRUE(dst.AllEqual(0));
  EXPECT_EQ((*a)->Stats().failed_write_ops, 1u);
}

// Deregistration waits for a copy in progress: once the LocalRegion is gone
// its memory is never touched again (TSan checks the reads below).
TEST_F(LoopbackTransportTest, DeregistrationWaitsForACopyInProgress) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  constexpr size_t kBytes = 4 << 20;
  GuardedBuffer src(kBytes, 0x11);
  auto source = (*a)->Register(src.addr(), kBytes, MemoryKind::kHost);
  ASSERT_THAT(source, IsOk());
  int landed = 0;
  int refused = 0;
  for (int round = 0; round < 8; ++round) {
    GuardedBuffer dst(kBytes, 0);
    auto dst_region = (*b)->Register(dst.addr(), kBytes, MemoryKind::kHost);
    ASSERT_THAT(dst_region, IsOk());
    auto target = (*a)->Import(a_to_b, (*dst_region)->info());
    ASSERT_THAT(target, IsOk());
    // Many ops so the copy takes a while; deregister at varying moments.
    std::vector<WriteOp> ops;
    for (size_t offset = 0; offset < kBytes; offset += 4096) {
      ops.push_back({src.addr(offset), dst.addr(offset), 4096});
    }
    DoneTracker tracker;
    ASSERT_THAT((*a)->Write(**source, **target, ops, tracker.Make()), IsOk());
    std::this_thread::sleep_for(std::chrono::microseconds(round * 150));
    dst_region->reset();
    // Whatever happened, the copy is over: all of it or none of it landed.
    const bool all = dst.AllEqual(0x11);
    const bool none = dst.AllEqual(0);
    EXPECT_TRUE(all || none) << "round " << round;
    std::memset(dst.data(), 0x22, kBytes);  // would race with a copy still running
    ASSERT_TRUE(tracker.WaitAll());
    if (tracker.status(0).ok()) {
      EXPECT_TRUE(all);
      ++landed;
    } else {
      EXPECT_THAT(tracker.status(0), StatusIs(StatusCode::kFailedPrecondition));
      EXPECT_TRUE(none);
      ++refused;
    }
    EXPECT_TRUE(dst.GuardsIntact());
  }
  EXPECT_EQ(landed + refused, 8);
}

TEST_F(LoopbackTransportTest, PeerShutdownFailsWritesStillQueuedForIt) {
  std::mutex mu;
  std::condition_variable cv;
  bool entered = false;
  bool released = false;
  auto a = MakeEndpoint("a", /*start=*/false);
  a->on_message_hook = [&](PeerId, const std::vector<std::byte>& frame) {
    if (Text(frame) != "BLOCK") return;
    std::unique_lock<std::mutex> lock(mu);
    entered = true;
    cv.notify_all();
    cv.wait(lock, [&] { return released; });
  };
  ASSERT_THAT(a->Start(), IsOk());
  auto b = MakeEndpoint("b");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  GuardedBuffer src(128);
  GuardedBuffer dst(128, 0);
  src.FillPattern(8);
  auto source = (*a)->Register(src.addr(), 128, MemoryKind::kHost);
  auto dst_region = (*b)->Register(dst.addr(), 128, MemoryKind::kHost);
  ASSERT_THAT(dst_region, IsOk());
  auto target = (*a)->Import(a_to_b, (*dst_region)->info());
  ASSERT_THAT(target, IsOk());
  ASSERT_THAT(b->SendText(b_to_a, "BLOCK"), IsOk());
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, kWaitTimeout, [&] { return entered; }));
  }
  DoneTracker tracker;
  const WriteOp ops[] = {{src.addr(), dst.addr(), 128}};
  ASSERT_THAT((*a)->Write(**source, **target, ops, tracker.Make()), IsOk());
  ASSERT_THAT((*a)->Flush(a_to_b, tracker.Make()), IsOk());
  b->Shutdown();
  EXPECT_EQ(b->total_failures(), 0);  // the shutting-down end is not told
  {
    std::lock_guard<std::mutex> lock(mu);
    released = true;
    cv.notify_all();
  }
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(0), StatusIs(StatusCode::kUnavailable, HasSubstr("shut down")));
  EXPECT_THAT(tracker.status(1), StatusIs(StatusCode::kUnavailable));
  ASSERT_TRUE(a->WaitForFailure(a_to_b));
  EXPECT_THAT(a->failure_reason(a_to_b),
              StatusIs(StatusCode::kUnavailable, HasSubstr("endpoint loopback:b shut down")));
  EXPECT_TRUE(dst.AllEqual(0));
}

TEST_F(LoopbackTransportTest, DisconnectFromInsideACallback) {
  auto b = MakeEndpoint("b", /*start=*/false);
  Transport* b_transport = &b->t();
  b->on_message_hook = [b_transport](PeerId peer, const std::vector<std::byte>& frame) {
    if (Text(frame) == "kick me") b_transport->Disconnect(peer, UnavailableError("kicked"));
  };
  ASSERT_THAT(b->Start(), IsOk());
  auto a = MakeEndpoint("a");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  ASSERT_THAT(a->SendText(a_to_b, "kick me"), IsOk());
  ASSERT_TRUE(a->WaitForFailure(a_to_b));
  ASSERT_TRUE(b->WaitForFailure(b_to_a));
  EXPECT_THAT(a->failure_reason(a_to_b), StatusIs(StatusCode::kUnavailable, HasSubstr("kicked")));
}

// The per-block path of docs/architecture.md §4's example: 40,960 fragments in one batch,
// one transport operation each.
TEST_F(LoopbackTransportTest, FortyThousandOpBatchIsOneQueueEntry) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  constexpr size_t kOps = 40960;
  constexpr size_t kOpBytes = 16;
  GuardedBuffer src(kOps * kOpBytes);
  src.FillPattern(40);
  GuardedBuffer dst(kOps * kOpBytes, 0);
  auto source = (*a)->Register(src.addr(), src.size(), MemoryKind::kHost);
  auto dst_region = (*b)->Register(dst.addr(), dst.size(), MemoryKind::kHost);
  ASSERT_THAT(dst_region, IsOk());
  auto target = (*a)->Import(a_to_b, (*dst_region)->info());
  ASSERT_THAT(target, IsOk());
  std::vector<WriteOp> ops(kOps);
  for (size_t i = 0; i < kOps; ++i) {
    // Reverse order, so no two neighbours could be merged by accident.
    const size_t j = kOps - 1 - i;
    ops[i] = {src.addr(i * kOpBytes), dst.addr(j * kOpBytes), kOpBytes};
  }
  DoneTracker tracker;
  ASSERT_THAT((*a)->Write(**source, **target, ops, tracker.Make()), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(0), IsOk());
  for (size_t i = 0; i < kOps; ++i) {
    ASSERT_EQ(
        std::memcmp(dst.data() + (kOps - 1 - i) * kOpBytes, src.data() + i * kOpBytes, kOpBytes), 0)
        << "op " << i;
  }
  EXPECT_EQ((*a)->Stats().write_ops, kOps);
  EXPECT_EQ((*a)->Stats().write_bytes, kOps * kOpBytes);
}

TEST_F(LoopbackTransportTest, RegionsMayOutliveTheirTransport) {
  GuardedBuffer buffer(64);
  std::unique_ptr<LocalRegion> region;
  {
    auto a = MakeEndpoint("a");
    auto registered = (*a)->Register(buffer.addr(), 64, MemoryKind::kHost);
    ASSERT_THAT(registered, IsOk());
    region = std::move(registered).value();
  }
  EXPECT_EQ(fabric_->num_regions(), 1u);
  region.reset();
  EXPECT_EQ(fabric_->num_regions(), 0u);
}

// --- Cancellation ------------------------------------------------------------

TEST_F(LoopbackWriteTest, StopRequestedBeforeTheBatchStartsCopiesNothing) {
  std::stop_source stop;
  stop.request_stop();
  DoneTracker tracker;
  ASSERT_THAT(Write(tracker, stop.get_token()), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(0),
              StatusIs(StatusCode::kCancelled,
                       AllOf(HasSubstr("before it started"),
                             HasSubstr("8 of 8 ops (32768 of 32768 bytes) not copied"))));
  EXPECT_TRUE(dst_.AllEqual(0));
  const TransportStats stats = (*a_)->Stats();
  EXPECT_EQ(stats.write_ops, kOps);
  EXPECT_EQ(stats.failed_write_ops, kOps);
  EXPECT_EQ(tracker.Violations(), "");
}

// The hook holds the batch before op 3; the stop requested meanwhile is seen
// by op 3's own check: ops 0-2 landed, 3-7 did not.
TEST_F(LoopbackWriteTest, StopRequestedMidBatchSkipsTheOpsNotStarted) {
  WriteGate gate(*fabric_, (*a_)->Address(), /*block_at=*/3);
  std::stop_source stop;
  DoneTracker tracker;
  ASSERT_THAT(Write(tracker, stop.get_token()), IsOk());
  ASSERT_TRUE(gate.WaitEntered());
  EXPECT_EQ(gate.entered_op(), 3u);
  stop.request_stop();
  gate.Release();
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(0),
              StatusIs(StatusCode::kCancelled,
                       AllOf(HasSubstr("stopped"),
                             HasSubstr("5 of 8 ops (20480 of 32768 bytes) not copied"))));
  for (size_t i = 0; i < kOps; ++i) EXPECT_EQ(OpLanded(i), i < 3) << "op " << i;
  EXPECT_TRUE(dst_.GuardsIntact());
  const TransportStats stats = (*a_)->Stats();
  EXPECT_EQ(stats.write_ops - stats.failed_write_ops, 3u);  // landed whole
  EXPECT_EQ(tracker.Violations(), "");
}

TEST_F(LoopbackWriteTest, StopRequestedAfterCompletionChangesNothing) {
  std::stop_source stop;
  DoneTracker tracker;
  ASSERT_THAT(Write(tracker, stop.get_token()), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  stop.request_stop();
  EXPECT_THAT(tracker.status(0), IsOk());
  for (size_t i = 0; i < kOps; ++i) EXPECT_TRUE(OpLanded(i)) << "op " << i;
  EXPECT_EQ((*a_)->Stats().failed_write_ops, 0u);
  EXPECT_EQ(tracker.Violations(), "");
}

// A large op is copied in pieces of kWriteGrainBytes, checked one by one.
TEST_F(LoopbackTransportTest, StopInsideALargeOpEndsAtTheNextPiece) {
  static_assert(LoopbackTransport::kWriteGrainBytes == MiB(1));
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  constexpr size_t kBytes = MiB(3) + 100;  // pieces: 1 MiB, 1 MiB, 1 MiB, 100 B
  GuardedBuffer src(kBytes);
  src.FillPattern(5);
  GuardedBuffer dst(kBytes, 0);
  auto source = (*a)->Register(src.addr(), kBytes, MemoryKind::kHost);
  auto region = (*b)->Register(dst.addr(), kBytes, MemoryKind::kHost);
  ASSERT_THAT(source, IsOk());
  ASSERT_THAT(region, IsOk());
  auto target = (*a)->Import(a_to_b, (*region)->info());
  ASSERT_THAT(target, IsOk());
  WriteGate gate(*fabric_, (*a)->Address(), /*block_at=*/2);  // before the third piece
  std::stop_source stop;
  DoneTracker tracker;
  const WriteOp ops[] = {{src.addr(), dst.addr(), kBytes}};
  ASSERT_THAT((*a)->Write(**source, **target, ops, tracker.Make(), stop.get_token()), IsOk());
  ASSERT_TRUE(gate.WaitEntered());
  EXPECT_EQ(gate.entered_op(), 0u);
  stop.request_stop();
  gate.Release();
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(0),
              StatusIs(StatusCode::kCancelled,
                       HasSubstr("1 of 1 ops (" + std::to_string(MiB(1) + 100) + " of " +
                                 std::to_string(kBytes) + " bytes) not copied")));
  EXPECT_EQ(std::memcmp(dst.data(), src.data(), MiB(2)), 0);
  for (size_t i = MiB(2); i < kBytes; ++i) ASSERT_EQ(dst.data()[i], 0) << "byte " << i;
  EXPECT_EQ((*a)->Stats().failed_write_ops, 1u);
  target->reset();
  region->reset();
  source->reset();
}

// --- The fence ---------------------------------------------------------------

TEST_F(LoopbackWriteTest, DisconnectDuringAWriteDefersBothFailuresUntilItStops) {
  for (const bool writer_disconnects : {true, false}) {
    SCOPED_TRACE(writer_disconnects ? "writer disconnects" : "receiver disconnects");
    if (!writer_disconnects) {
      // A fresh pair: the first round killed the connection.
      TearDown();
      a_->Shutdown();
      b_->Shutdown();
      ops_.clear();
      std::memset(dst_.data(), 0, kBytes);
      a_.reset();
      b_.reset();
      SetUp();
    }
    auto c = MakeEndpoint(writer_disconnects ? "c1" : "c2");
    auto [c_to_a, a_to_c] = Connect(*c, *a_);
    auto [c_to_b, b_to_c] = Connect(*c, *b_);
    EXPECT_EQ(fabric_->num_live_connections(), 3u);

    WriteGate gate(*fabric_, (*a_)->Address(), /*block_at=*/3);
    DoneTracker tracker;
    ASSERT_THAT(Write(tracker), IsOk());
    ASSERT_TRUE(gate.WaitEntered());
    if (writer_disconnects) {
      (*a_)->Disconnect(a_to_b_, UnavailableError("test disconnect"));
    } else {
      (*b_)->Disconnect(b_to_a_, UnavailableError("test disconnect"));
    }
    // Dead at once, its notifications held by the write in progress.
    EXPECT_EQ(fabric_->num_live_connections(), 2u);
    EXPECT_EQ(fabric_->num_connections_awaiting_fence(), 1u);
    EXPECT_THAT(b_->SendText(b_to_a_, "late"), StatusIs(StatusCode::kUnavailable));
    // b's thread is free: anything queued for it before c's message has run.
    SyncThread(*c, c_to_b, *b_);
    EXPECT_EQ(b_->total_failures(), 0);
    EXPECT_EQ(a_->total_failures(), 0);
    EXPECT_EQ(tracker.calls(0), 0);

    gate.Release();
    ASSERT_TRUE(tracker.WaitAll());
    EXPECT_THAT(tracker.status(0),
                StatusIs(StatusCode::kUnavailable,
                         AllOf(HasSubstr("test disconnect"),
                               HasSubstr("5 of 8 ops (20480 of 32768 bytes) not copied"))));
    for (size_t i = 0; i < kOps; ++i) EXPECT_EQ(OpLanded(i), i < 3) << "op " << i;
    ASSERT_TRUE(a_->WaitForFailure(a_to_b_));
    ASSERT_TRUE(b_->WaitForFailure(b_to_a_));
    EXPECT_THAT(b_->failure_reason(b_to_a_), StatusIs(StatusCode::kUnavailable));
    EXPECT_EQ(fabric_->num_connections_awaiting_fence(), 0u);
    EXPECT_EQ((*a_)->Stats().failed_write_ops, 5u);
    EXPECT_EQ(tracker.Violations(), "");
    // The other connections still work.
    SyncThread(*c, c_to_a, *a_);
    EXPECT_EQ(a_->total_failures(), 1);
    EXPECT_EQ(b_->total_failures(), 1);
  }
}

// The writer's own thread: the write's `done` runs before on_peer_failure.
TEST_F(LoopbackWriteTest, TheWritersDoneRunsBeforeItsFailureNotification) {
  std::mutex mu;
  std::vector<std::string> events;
  a_->Shutdown();
  auto a = MakeEndpoint("a2", /*start=*/false);
  a->on_peer_failure_hook = [&](PeerId, const Status&) {
    std::lock_guard<std::mutex> lock(mu);
    events.push_back("failure");
  };
  ASSERT_THAT(a->Start(), IsOk());
  auto [a_to_b, b_to_a] = Connect(*a, *b_);
  auto source = (*a)->Register(src_.addr(), kBytes, MemoryKind::kHost);
  ASSERT_THAT(source, IsOk());
  auto target = (*a)->Import(a_to_b, dst_region_->info());
  ASSERT_THAT(target, IsOk());
  WriteGate gate(*fabric_, (*a)->Address(), /*block_at=*/1);
  ASSERT_THAT((*a)->Write(**source, **target, ops_,
                          [&](Status status) {
                            std::lock_guard<std::mutex> lock(mu);
                            events.push_back("done " + std::string(StatusCodeName(status.code())));
                          }),
              IsOk());
  ASSERT_TRUE(gate.WaitEntered());
  (*b_)->Disconnect(b_to_a, UnavailableError("bye"));
  gate.Release();
  ASSERT_TRUE(a->WaitForFailure(a_to_b));
  a->Shutdown();
  std::lock_guard<std::mutex> lock(mu);
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0], "done " + std::string(StatusCodeName(StatusCode::kUnavailable)));
  EXPECT_EQ(events[1], "failure");
  target->reset();
  source->reset();
}

TEST_F(LoopbackWriteTest, MappedAccessDefersTheFailureUntilItIsDestroyed) {
  auto c = MakeEndpoint("c");
  auto [c_to_a, a_to_c] = Connect(*c, *a_);
  auto [c_to_b, b_to_c] = Connect(*c, *b_);
  auto access = (*a_)->BeginMappedAccess(*target_);
  ASSERT_THAT(access, IsOk());
  // The direct path: a copy engine writes through mapped_address().
  std::memcpy(target_->mapped_address().ToPointer(), src_.data(), kOpBytes);

  (*b_)->Disconnect(b_to_a_, UnavailableError("gone"));
  EXPECT_EQ(fabric_->num_connections_awaiting_fence(), 1u);
  EXPECT_THAT((*a_)->BeginMappedAccess(*target_), StatusIs(StatusCode::kUnavailable));
  SyncThread(*c, c_to_a, *a_);
  SyncThread(*c, c_to_b, *b_);
  EXPECT_EQ(a_->total_failures(), 0);
  EXPECT_EQ(b_->total_failures(), 0);

  access->reset();  // on the test thread: whoever ends the last operation
  EXPECT_EQ(fabric_->num_connections_awaiting_fence(), 0u);
  ASSERT_TRUE(a_->WaitForFailure(a_to_b_));
  ASSERT_TRUE(b_->WaitForFailure(b_to_a_));
  EXPECT_THAT(b_->failure_reason(b_to_a_), StatusIs(StatusCode::kUnavailable, "gone"));
  EXPECT_THAT(a_->failure_reason(a_to_b_), StatusIs(StatusCode::kUnavailable, HasSubstr("gone")));
  EXPECT_TRUE(OpLanded(0));
}

// A write and a mapped access at once: the failure waits for both.
TEST_F(LoopbackWriteTest, TheFenceWaitsForEveryOperationOfTheConnection) {
  auto c = MakeEndpoint("c");
  auto [c_to_b, b_to_c] = Connect(*c, *b_);
  auto access = (*a_)->BeginMappedAccess(*target_);
  ASSERT_THAT(access, IsOk());
  WriteGate gate(*fabric_, (*a_)->Address(), /*block_at=*/0);
  DoneTracker tracker;
  ASSERT_THAT(Write(tracker), IsOk());
  ASSERT_TRUE(gate.WaitEntered());
  (*a_)->Disconnect(a_to_b_, UnavailableError("bye"));
  gate.Release();
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(0), StatusIs(StatusCode::kUnavailable, HasSubstr("8 of 8 ops")));
  SyncThread(*c, c_to_b, *b_);
  EXPECT_EQ(b_->total_failures(), 0);
  EXPECT_EQ(fabric_->num_connections_awaiting_fence(), 1u);
  access->reset();
  ASSERT_TRUE(a_->WaitForFailure(a_to_b_));
  ASSERT_TRUE(b_->WaitForFailure(b_to_a_));
  EXPECT_TRUE(dst_.AllEqual(0));
}

TEST_F(LoopbackWriteTest, BeginMappedAccessErrors) {
  // Not imported by this transport: b's own region seen through a's import
  // is fine for a, not for b; nor is another transport's region object.
  EXPECT_THAT((*b_)->BeginMappedAccess(*target_), StatusIs(StatusCode::kInvalidArgument));
  class ForeignRegion final : public RemoteRegion {
   public:
    PeerId peer() const override { return 1; }
    const RegionInfo& info() const override { return info_; }
    Addr mapped_address() const override { return Addr(); }

   private:
    RegionInfo info_;
  };
  EXPECT_THAT((*a_)->BeginMappedAccess(ForeignRegion()), StatusIs(StatusCode::kInvalidArgument));

  // Deregistered by its owner.
  GuardedBuffer other(256);
  auto other_region = (*b_)->Register(other.addr(), 256, MemoryKind::kHost);
  ASSERT_THAT(other_region, IsOk());
  auto other_target = (*a_)->Import(a_to_b_, (*other_region)->info());
  ASSERT_THAT(other_target, IsOk());
  other_region->reset();
  EXPECT_THAT((*a_)->BeginMappedAccess(**other_target),
              StatusIs(StatusCode::kFailedPrecondition, HasSubstr("deregistered")));
  // A failed attempt leaves nothing counted: the failure is not held back.
  (*a_)->Disconnect(a_to_b_, UnavailableError("bye"));
  EXPECT_EQ(fabric_->num_connections_awaiting_fence(), 0u);
  ASSERT_TRUE(b_->WaitForFailure(b_to_a_));

  // Dead connection.
  EXPECT_THAT((*a_)->BeginMappedAccess(*target_), StatusIs(StatusCode::kUnavailable));
  // Shut down.
  a_->Shutdown();
  EXPECT_THAT((*a_)->BeginMappedAccess(*target_), StatusIs(StatusCode::kAborted));
  other_target->reset();
}

// The owner's deregistration waits for a mapped access of the region.
TEST_F(LoopbackWriteTest, DeregistrationWaitsForAMappedAccess) {
  auto access = (*a_)->BeginMappedAccess(*target_);
  ASSERT_THAT(access, IsOk());
  const size_t regions = fabric_->num_regions();
  std::atomic<bool> access_ended{false};
  std::atomic<bool> ended_before_deregistered{false};
  std::thread owner([&] {
    dst_region_.reset();
    ended_before_deregistered = access_ended.load();
  });
  // Deregistration began (the region left the registry) and now waits.
  const auto deadline = std::chrono::steady_clock::now() + kWaitTimeout;
  while (fabric_->num_regions() == regions && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::yield();
  }
  EXPECT_EQ(fabric_->num_regions(), regions - 1);
  // Still usable until the access ends.
  std::memcpy(target_->mapped_address().ToPointer(), src_.data(), kBytes);
  access_ended = true;
  access->reset();
  owner.join();
  EXPECT_TRUE(ended_before_deregistered.load());
  EXPECT_THAT((*a_)->BeginMappedAccess(*target_), StatusIs(StatusCode::kFailedPrecondition));
}

// A guard shares what it needs: it may outlive both transports.
TEST_F(LoopbackWriteTest, MappedAccessMayOutliveBothTransports) {
  auto access = (*a_)->BeginMappedAccess(*target_);
  ASSERT_THAT(access, IsOk());
  target_.reset();
  a_->Shutdown();
  b_->Shutdown();
  EXPECT_EQ(fabric_->num_connections_awaiting_fence(), 1u);
  a_.reset();
  b_.reset();
  std::thread([&] { access->reset(); }).join();  // any thread
  EXPECT_EQ(fabric_->num_connections_awaiting_fence(), 0u);
  EXPECT_EQ(fabric_->num_live_connections(), 0u);
}

// A peer's write into a region of an endpoint that shuts down runs on the
// peer's thread; it ends at its next piece, and the region's destructor waits
// for it.
TEST_F(LoopbackTransportTest, PeerWriteIntoAShuttingDownEndpointEndsAtTheNextPiece) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  constexpr size_t kBytes = MiB(4);
  GuardedBuffer src(kBytes);
  src.FillPattern(9);
  GuardedBuffer dst(kBytes, 0);
  auto source = (*a)->Register(src.addr(), kBytes, MemoryKind::kHost);
  auto region = (*b)->Register(dst.addr(), kBytes, MemoryKind::kHost);
  ASSERT_THAT(source, IsOk());
  ASSERT_THAT(region, IsOk());
  auto target = (*a)->Import(a_to_b, (*region)->info());
  ASSERT_THAT(target, IsOk());
  WriteGate gate(*fabric_, (*a)->Address(), /*block_at=*/1);  // before the second piece
  DoneTracker tracker;
  const WriteOp ops[] = {{src.addr(), dst.addr(), kBytes}};
  ASSERT_THAT((*a)->Write(**source, **target, ops, tracker.Make()), IsOk());
  ASSERT_TRUE(gate.WaitEntered());

  b->Shutdown();  // does not wait for a's thread
  EXPECT_EQ(b->total_failures(), 0);
  EXPECT_EQ(fabric_->num_connections_awaiting_fence(), 1u);
  const size_t regions = fabric_->num_regions();
  std::atomic<bool> released{false};
  std::atomic<bool> released_before_deregistered{false};
  std::thread owner([&] {
    region->reset();  // waits for the write's pin
    released_before_deregistered = released.load();
  });
  const auto deadline = std::chrono::steady_clock::now() + kWaitTimeout;
  while (fabric_->num_regions() == regions && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::yield();
  }
  EXPECT_EQ(fabric_->num_regions(), regions - 1);  // deregistration began, and waits
  released = true;
  gate.Release();
  owner.join();
  EXPECT_TRUE(released_before_deregistered.load());
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(0),
              StatusIs(StatusCode::kUnavailable,
                       AllOf(HasSubstr("endpoint loopback:b shut down"),
                             HasSubstr("1 of 1 ops (3145728 of 4194304 bytes) not copied"))));
  EXPECT_EQ(std::memcmp(dst.data(), src.data(), MiB(1)), 0);
  for (size_t i = MiB(1); i < kBytes; ++i) ASSERT_EQ(dst.data()[i], 0) << "byte " << i;
  ASSERT_TRUE(a->WaitForFailure(a_to_b));
  EXPECT_EQ(fabric_->num_connections_awaiting_fence(), 0u);
  target->reset();
  source->reset();
}

// Shutdown joins the transport's thread: its own write in progress ends at
// its next piece and its `done` has run when Shutdown returns.
TEST_F(LoopbackWriteTest, ShutdownEndsItsOwnWriteInProgress) {
  WriteGate gate(*fabric_, (*a_)->Address(), /*block_at=*/2);
  DoneTracker tracker;
  ASSERT_THAT(Write(tracker), IsOk());
  ASSERT_TRUE(gate.WaitEntered());
  std::thread shutdown([&] { a_->Shutdown(); });
  // Shutdown killed the connection (and now waits for a's thread).
  const auto deadline = std::chrono::steady_clock::now() + kWaitTimeout;
  while (fabric_->num_connections_awaiting_fence() == 0 &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::yield();
  }
  EXPECT_EQ(fabric_->num_connections_awaiting_fence(), 1u);
  gate.Release();
  shutdown.join();
  tracker.Seal();
  EXPECT_TRUE(tracker.WaitAll(0ms));
  EXPECT_THAT(tracker.status(0), StatusIs(StatusCode::kUnavailable, HasSubstr("6 of 8 ops")));
  for (size_t i = 0; i < kOps; ++i) EXPECT_EQ(OpLanded(i), i < 2) << "op " << i;
  ASSERT_TRUE(b_->WaitForFailure(b_to_a_));
  EXPECT_EQ(a_->total_failures(), 0);
  EXPECT_EQ(tracker.Violations(), "");
}

TEST_F(LoopbackTransportTest, ConnectionCountersFollowConnectAndDisconnect) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  EXPECT_EQ(fabric_->num_live_connections(), 0u);
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  Connect(*b, *a);
  EXPECT_EQ(fabric_->num_live_connections(), 2u);
  EXPECT_THAT((*a)->Connect("loopback:nobody"), StatusIs(StatusCode::kUnavailable));
  EXPECT_EQ(fabric_->num_live_connections(), 2u);
  (*a)->Disconnect(a_to_b, UnavailableError("one"));
  EXPECT_EQ(fabric_->num_live_connections(), 1u);
  EXPECT_EQ(fabric_->num_connections_awaiting_fence(), 0u);  // nothing in progress
  b->Shutdown();
  EXPECT_EQ(fabric_->num_live_connections(), 0u);
  ASSERT_TRUE(a->WaitForTotalFailures(2));
}

// --- LoopbackOptions and Read ------------------------------------------------

TEST_F(LoopbackTransportTest, CapsAndPeerCapsFollowTheOptionsOfBothEnds) {
  auto a = MakeTestEndpoint(LoopbackTransport::Create(fabric_, "a"));
  auto no_read = MakeTestEndpoint(
      LoopbackTransport::Create(fabric_, "no-read", LoopbackOptions{.read_remote = false}));
  auto no_map = MakeTestEndpoint(
      LoopbackTransport::Create(fabric_, "no-map", LoopbackOptions{.map_remote = false}));
  const TransportCaps caps = (*a)->Caps();
  EXPECT_TRUE(caps.map_remote);
  EXPECT_TRUE(caps.read_remote);
  EXPECT_EQ(caps.read_cost.op_us, caps.cost.op_us);
  EXPECT_EQ(caps.read_cost.bytes_per_us, caps.cost.bytes_per_us);
  EXPECT_GT(caps.read_cost.bytes_per_us, 0);
  EXPECT_FALSE((*no_read)->Caps().read_remote);
  EXPECT_TRUE((*no_read)->Caps().map_remote);
  EXPECT_FALSE((*no_map)->Caps().map_remote);
  EXPECT_TRUE((*no_map)->Caps().read_remote);

  auto [a_to_nr, nr_to_a] = Connect(*a, *no_read);
  auto [a_to_nm, nm_to_a] = Connect(*a, *no_map);
  // A link has a capability only when both ends offer it.
  auto a_nr = (*a)->PeerCaps(a_to_nr);
  ASSERT_THAT(a_nr, IsOk());
  EXPECT_FALSE(a_nr->read_remote);
  EXPECT_TRUE(a_nr->map_remote);
  auto nr_a = (*no_read)->PeerCaps(nr_to_a);
  ASSERT_THAT(nr_a, IsOk());
  EXPECT_FALSE(nr_a->read_remote);
  auto a_nm = (*a)->PeerCaps(a_to_nm);
  ASSERT_THAT(a_nm, IsOk());
  EXPECT_FALSE(a_nm->map_remote);
  EXPECT_TRUE(a_nm->read_remote);
  EXPECT_THAT((*a)->PeerCaps(424242), StatusIs(StatusCode::kNotFound));

  // The public factory takes the options too (and keeps its two-argument form).
  auto made = NewLoopbackTransport(fabric_, "made",
                                   LoopbackOptions{.map_remote = false, .read_remote = false});
  ASSERT_THAT(made, IsOk());
  EXPECT_FALSE((*made)->Caps().map_remote);
  EXPECT_FALSE((*made)->Caps().read_remote);
  auto plain = NewLoopbackTransport(fabric_, "plain");
  ASSERT_THAT(plain, IsOk());
  EXPECT_TRUE((*plain)->Caps().read_remote);
  EXPECT_TRUE((*plain)->Caps().map_remote);
}

TEST_F(LoopbackTransportTest, ReadAndMappedAccessAreUnimplementedWhereAnEndTurnedThemOff) {
  auto a = MakeEndpoint("a");
  auto off = MakeTestEndpoint(LoopbackTransport::Create(
      fabric_, "off", LoopbackOptions{.map_remote = false, .read_remote = false}));
  auto [a_to_off, off_to_a] = Connect(*a, *off);
  GuardedBuffer a_buffer(256);
  GuardedBuffer off_buffer(256);
  auto a_region = (*a)->Register(a_buffer.addr(), 256, MemoryKind::kHost);
  auto off_region = (*off)->Register(off_buffer.addr(), 256, MemoryKind::kHost);
  ASSERT_THAT(a_region, IsOk());
  ASSERT_THAT(off_region, IsOk());
  auto off_in_a = (*a)->Import(a_to_off, (*off_region)->info());
  auto a_in_off = (*off)->Import(off_to_a, (*a_region)->info());
  ASSERT_THAT(off_in_a, IsOk());
  ASSERT_THAT(a_in_off, IsOk());

  DoneTracker tracker;
  const ReadOp a_reads[] = {{off_buffer.addr(), a_buffer.addr(), 256}};
  const ReadOp off_reads[] = {{a_buffer.addr(), off_buffer.addr(), 256}};
  // The peer does not offer it; this end does not.
  EXPECT_THAT((*a)->Read(**off_in_a, **a_region, a_reads, tracker.Make(), {}),
              StatusIs(StatusCode::kUnimplemented, HasSubstr("loopback:off")));
  tracker.Forget();
  EXPECT_THAT((*off)->Read(**a_in_off, **off_region, off_reads, tracker.Make(), {}),
              StatusIs(StatusCode::kUnimplemented, HasSubstr("read_remote")));
  tracker.Forget();
  EXPECT_THAT((*a)->BeginMappedAccess(**off_in_a), StatusIs(StatusCode::kUnimplemented));
  EXPECT_THAT((*off)->BeginMappedAccess(**a_in_off),
              StatusIs(StatusCode::kUnimplemented, HasSubstr("map_remote")));
  // Writes are unaffected.
  const WriteOp writes[] = {{a_buffer.addr(), off_buffer.addr(), 256}};
  ASSERT_THAT((*a)->Write(**a_region, **off_in_a, writes, tracker.Make()), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(2), IsOk());
  EXPECT_EQ(tracker.Violations(), "");
}

// BeginMappedRead: offered only where both ends turned map_remote_read on,
// independently of map_remote; the guard reads through mapped_address() and
// holds the connection's failure back until it is destroyed.
TEST_F(LoopbackTransportTest, MappedReadNeedsBothEndsAndDefersTheFailure) {
  const LoopbackOptions reading{.map_remote = false, .read_remote = true, .map_remote_read = true};
  auto a = MakeTestEndpoint(LoopbackTransport::Create(fabric_, "a", reading));
  auto b = MakeTestEndpoint(LoopbackTransport::Create(fabric_, "b", reading));
  auto plain = MakeEndpoint("plain");
  EXPECT_TRUE((*a)->Caps().map_remote_read);
  EXPECT_FALSE((*plain)->Caps().map_remote_read);
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  auto [a_to_plain, plain_to_a] = Connect(*a, *plain);
  ASSERT_THAT((*a)->PeerCaps(a_to_b), IsOk());
  EXPECT_TRUE((*a)->PeerCaps(a_to_b)->map_remote_read);
  EXPECT_FALSE((*a)->PeerCaps(a_to_plain)->map_remote_read);

  GuardedBuffer b_buffer(256, 0x5a);
  GuardedBuffer plain_buffer(256);
  auto b_region = (*b)->Register(b_buffer.addr(), 256, MemoryKind::kHost);
  auto plain_region = (*plain)->Register(plain_buffer.addr(), 256, MemoryKind::kHost);
  ASSERT_THAT(b_region, IsOk());
  ASSERT_THAT(plain_region, IsOk());
  auto b_in_a = (*a)->Import(a_to_b, (*b_region)->info());
  auto plain_in_a = (*a)->Import(a_to_plain, (*plain_region)->info());
  ASSERT_THAT(b_in_a, IsOk());
  ASSERT_THAT(plain_in_a, IsOk());

  // The peer does not offer it; mapping for writes stays off.
  EXPECT_THAT((*a)->BeginMappedRead(**plain_in_a),
              StatusIs(StatusCode::kUnimplemented, HasSubstr("map_remote_read")));
  EXPECT_THAT((*plain)->BeginMappedRead(**plain_in_a),
              StatusIs(StatusCode::kUnimplemented, HasSubstr("map_remote_read")));
  EXPECT_THAT((*a)->BeginMappedAccess(**b_in_a),
              StatusIs(StatusCode::kUnimplemented, HasSubstr("map_remote")));

  auto access = (*a)->BeginMappedRead(**b_in_a);
  ASSERT_THAT(access, IsOk());
  std::byte copy[256];
  std::memcpy(copy, (*b_in_a)->mapped_address().ToPointer(), sizeof(copy));
  EXPECT_EQ(copy[17], std::byte{0x5a});

  (*b)->Disconnect(b_to_a, UnavailableError("gone"));
  EXPECT_EQ(fabric_->num_connections_awaiting_fence(), 1u);
  EXPECT_THAT((*a)->BeginMappedRead(**b_in_a), StatusIs(StatusCode::kUnavailable));
  EXPECT_EQ(a->total_failures(), 0);
  access->reset();
  EXPECT_EQ(fabric_->num_connections_awaiting_fence(), 0u);
  ASSERT_TRUE(a->WaitForFailure(a_to_b));
  ASSERT_TRUE(b->WaitForFailure(b_to_a));
  plain_in_a->reset();
  b_in_a->reset();
}

// `a` reads b's region (the source) into its own (the target), kOps ops of
// kOpBytes; the write hook holds the read part-way.
class LoopbackReadTest : public LoopbackDataTest {
 protected:
  void SetUp() override {
    ConnectAndFill(19);
    ops_ = Ops<ReadOp>();
    auto source_region = (*b_)->Register(src_.addr(), kBytes, MemoryKind::kHost);
    ASSERT_THAT(source_region, IsOk());
    source_region_ = std::move(source_region).value();
    auto target = (*a_)->Register(dst_.addr(), kBytes, MemoryKind::kHost);
    ASSERT_THAT(target, IsOk());
    target_ = std::move(target).value();
    auto source = (*a_)->Import(a_to_b_, source_region_->info());
    ASSERT_THAT(source, IsOk());
    source_ = std::move(source).value();
  }

  void TearDown() override {
    source_.reset();
    target_.reset();
    source_region_.reset();
  }

  Status Read(DoneTracker& tracker, std::stop_token stop = {}) {
    InsideCall inside;
    Status status = (*a_)->Read(*source_, *target_, ops_, tracker.Make(), std::move(stop));
    if (!status.ok()) tracker.Forget();
    return status;
  }

  std::unique_ptr<LocalRegion> source_region_;  // b's
  std::unique_ptr<LocalRegion> target_;         // a's
  std::unique_ptr<RemoteRegion> source_;        // b's, imported by a
  std::vector<ReadOp> ops_;
};

TEST_F(LoopbackReadTest, ReadLandsOnTheTransportsThreadAndCounts) {
  std::thread::id done_thread;
  DoneTracker tracker;
  {
    InsideCall inside;
    auto done = tracker.Make();
    ASSERT_THAT((*a_)->Read(*source_, *target_, ops_,
                            [&done_thread, done](Status status) {
                              done_thread = std::this_thread::get_id();
                              done(std::move(status));
                            },
                            {}),
                IsOk());
  }
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(0), IsOk());
  EXPECT_NE(done_thread, std::this_thread::get_id());
  for (size_t i = 0; i < kOps; ++i) EXPECT_TRUE(OpLanded(i)) << "op " << i;
  const TransportStats stats = (*a_)->Stats();
  EXPECT_EQ(stats.read_ops, kOps);
  EXPECT_EQ(stats.read_bytes, kBytes);
  EXPECT_EQ(stats.write_ops, 0u);
  EXPECT_EQ((*b_)->Stats().read_ops, 0u);
  EXPECT_EQ(tracker.Violations(), "");
}

// The hook holds the read before op 3; the stop requested meanwhile is seen
// by op 3's own check: ops 0-2 landed, 3-7 did not.
TEST_F(LoopbackReadTest, StopRequestedMidReadSkipsTheOpsNotStarted) {
  WriteGate gate(*fabric_, (*a_)->Address(), /*block_at=*/3);
  std::stop_source stop;
  DoneTracker tracker;
  ASSERT_THAT(Read(tracker, stop.get_token()), IsOk());
  ASSERT_TRUE(gate.WaitEntered());
  EXPECT_EQ(gate.entered_op(), 3u);
  stop.request_stop();
  gate.Release();
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(0),
              StatusIs(StatusCode::kCancelled,
                       AllOf(HasSubstr("read from loopback:b stopped"),
                             HasSubstr("5 of 8 ops (20480 of 32768 bytes) not copied"))));
  for (size_t i = 0; i < kOps; ++i) EXPECT_EQ(OpLanded(i), i < 3) << "op " << i;
  EXPECT_EQ((*a_)->Stats().read_ops, 3u);
  EXPECT_EQ((*a_)->Stats().read_bytes, 3 * kOpBytes);
  EXPECT_EQ(tracker.Violations(), "");
}

// A read in progress holds both ends' failure notifications back.
TEST_F(LoopbackReadTest, DisconnectDuringAReadDefersBothFailuresUntilItStops) {
  auto c = MakeEndpoint("c");
  auto [c_to_b, b_to_c] = Connect(*c, *b_);
  WriteGate gate(*fabric_, (*a_)->Address(), /*block_at=*/3);
  DoneTracker tracker;
  ASSERT_THAT(Read(tracker), IsOk());
  ASSERT_TRUE(gate.WaitEntered());
  (*b_)->Disconnect(b_to_a_, UnavailableError("test disconnect"));
  EXPECT_EQ(fabric_->num_connections_awaiting_fence(), 1u);
  // b's thread is free: anything queued for it before c's message has run.
  SyncThread(*c, c_to_b, *b_);
  EXPECT_EQ(b_->total_failures(), 0);
  EXPECT_EQ(a_->total_failures(), 0);
  EXPECT_EQ(tracker.calls(0), 0);

  gate.Release();
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(0),
              StatusIs(StatusCode::kUnavailable,
                       AllOf(HasSubstr("test disconnect"),
                             HasSubstr("5 of 8 ops (20480 of 32768 bytes) not copied"))));
  for (size_t i = 0; i < kOps; ++i) EXPECT_EQ(OpLanded(i), i < 3) << "op " << i;
  ASSERT_TRUE(a_->WaitForFailure(a_to_b_));
  ASSERT_TRUE(b_->WaitForFailure(b_to_a_));
  EXPECT_EQ(fabric_->num_connections_awaiting_fence(), 0u);
  EXPECT_EQ(tracker.Violations(), "");
}

// The peer's region stays registered while a read copies from it: its
// owner's deregistration waits; a read that reaches it afterwards fails.
TEST_F(LoopbackReadTest, TheSourcesDeregistrationWaitsForAReadInProgress) {
  WriteGate gate(*fabric_, (*a_)->Address(), /*block_at=*/3);
  DoneTracker tracker;
  ASSERT_THAT(Read(tracker), IsOk());
  ASSERT_TRUE(gate.WaitEntered());
  std::atomic<bool> released{false};
  std::atomic<bool> deregistered_before_release{false};
  std::thread owner([&] {
    source_region_.reset();
    deregistered_before_release = !released.load();
  });
  // The owner's deregistration began (b's region left the registry; a's
  // target is left) and now waits for the read.
  const auto deadline = std::chrono::steady_clock::now() + kWaitTimeout;
  while (fabric_->num_regions() != 1 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(1ms);
  }
  EXPECT_EQ(fabric_->num_regions(), 1u);
  released = true;
  gate.Release();
  owner.join();
  EXPECT_FALSE(deregistered_before_release.load());
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(0), IsOk());  // deregistration does not cut a read short
  for (size_t i = 0; i < kOps; ++i) EXPECT_TRUE(OpLanded(i)) << "op " << i;

  std::memset(dst_.data(), 0, kBytes);
  ASSERT_THAT(Read(tracker), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(1),
              StatusIs(StatusCode::kFailedPrecondition, HasSubstr("deregistered by its owner")));
  EXPECT_TRUE(dst_.AllEqual(0));
  EXPECT_EQ(tracker.Violations(), "");
}

// The reader's own target: a's Shutdown ends its read at the next piece.
TEST_F(LoopbackReadTest, ShutdownEndsItsOwnReadInProgress) {
  WriteGate gate(*fabric_, (*a_)->Address(), /*block_at=*/2);
  DoneTracker tracker;
  ASSERT_THAT(Read(tracker), IsOk());
  ASSERT_TRUE(gate.WaitEntered());
  std::thread releaser([&] {
    std::this_thread::sleep_for(20ms);
    gate.Release();
  });
  a_->Shutdown();
  tracker.Seal();
  releaser.join();
  EXPECT_TRUE(tracker.WaitAll(0ms));
  EXPECT_THAT(tracker.status(0), StatusIs(StatusCode::kUnavailable));
  for (size_t i = 0; i < kOps; ++i) EXPECT_EQ(OpLanded(i), i < 2) << "op " << i;
  ASSERT_TRUE(b_->WaitForFailure(b_to_a_));
  EXPECT_EQ(tracker.Violations(), "");
  EXPECT_THAT(Read(tracker), StatusIs(StatusCode::kAborted));
}

// Progress on a loop (TakeProgressSource): `b` hands its queue to the test,
// which drives it by hand; `a` keeps its own thread.
class LoopbackDrivenTest : public LoopbackTransportTest {
 protected:
  static constexpr size_t kSmall = 4096;        // a copy the driver runs
  static constexpr size_t kLarge = 256 * 1024;  // one it hands to the thread
  static constexpr size_t kBytes = kSmall + kLarge;

  void SetUp() override {
    a_ = MakeEndpoint("a");
    b_ = MakeEndpoint("b", /*start=*/false);
    source_ = (*b_)->TakeProgressSource();
    ASSERT_NE(source_, nullptr);
    b_->on_message_hook = [this](PeerId, const std::vector<std::byte>& frame) {
      Record("message " + Text(frame));
    };
    ASSERT_THAT(b_->Start(), IsOk());
    std::tie(b_to_a_, a_to_b_) = Connect(*b_, *a_);
    src_.FillPattern(5);
    auto source = (*b_)->Register(src_.addr(), kBytes, MemoryKind::kHost);
    ASSERT_THAT(source, IsOk());
    src_region_ = std::move(source).value();
    auto region = (*a_)->Register(dst_.addr(), kBytes, MemoryKind::kHost);
    ASSERT_THAT(region, IsOk());
    dst_region_ = std::move(region).value();
    auto target = (*b_)->Import(b_to_a_, dst_region_->info());
    ASSERT_THAT(target, IsOk());
    target_ = std::move(target).value();
  }

  void TearDown() override {
    b_->Shutdown();
    source_.reset();
    target_.reset();
    dst_region_.reset();
    src_region_.reset();
  }

  // Polls b's source until `done` says so or the wait times out.
  bool DriveUntil(const std::function<bool()>& done) {
    const auto deadline = std::chrono::steady_clock::now() + kWaitTimeout;
    while (!done()) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      if (!source_->Poll()) std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    return true;
  }

  // Whether b's fd turns readable within `timeout`.
  bool Readable(std::chrono::milliseconds timeout) {
    pollfd p{source_->fd(), POLLIN, 0};
    return ::poll(&p, 1, static_cast<int>(timeout.count())) == 1;
  }

  void Record(std::string event) {
    std::lock_guard<std::mutex> lock(mu_);
    events_.push_back(Event{std::move(event), std::this_thread::get_id()});
  }
  size_t num_events() {
    std::lock_guard<std::mutex> lock(mu_);
    return events_.size();
  }

  // A write of b's source range [offset, offset + bytes) into a's region.
  Status Write(size_t offset, size_t bytes, const std::string& name) {
    ops_.push_back(std::make_unique<WriteOp>(
        WriteOp{src_.addr(offset), dst_.addr(offset), static_cast<uint64_t>(bytes)}));
    return (*b_)->Write(*src_region_, *target_, std::span<const WriteOp>(ops_.back().get(), 1),
                        [this, name](Status status) {
                          Record(name + " " + std::string(StatusCodeName(status.code())));
                        });
  }

  struct Event {
    std::string what;
    std::thread::id thread;
  };
  std::mutex mu_;
  std::vector<Event> events_;
  std::unique_ptr<TestEndpoint> a_;
  std::unique_ptr<TestEndpoint> b_;
  std::unique_ptr<ProgressSource> source_;
  PeerId a_to_b_ = 0;
  PeerId b_to_a_ = 0;
  GuardedBuffer src_{kBytes};
  GuardedBuffer dst_{kBytes, 0};
  std::unique_ptr<LocalRegion> src_region_;
  std::unique_ptr<LocalRegion> dst_region_;
  std::unique_ptr<RemoteRegion> target_;
  std::vector<std::unique_ptr<WriteOp>> ops_;
};

TEST_F(LoopbackDrivenTest, TheDriverRunsFramesAndSmallCopiesInOrderAndTheThreadLargeOnes) {
  // Nothing is delivered until the driver polls; its fd says when to.
  ASSERT_THAT(a_->SendText(a_to_b_, "one"), IsOk());
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(num_events(), 0u);
  std::chrono::microseconds sleep(1000);
  while (source_->Poll()) {
  }
  ASSERT_TRUE(source_->PrepareToSleep(&sleep));
  EXPECT_FALSE(Readable(std::chrono::milliseconds(0)));
  ASSERT_THAT(a_->SendText(a_to_b_, "two"), IsOk());
  EXPECT_TRUE(Readable(std::chrono::milliseconds(1000)));
  EXPECT_FALSE(source_->PrepareToSleep(&sleep)) << "work is queued";

  // A small write, a large one, a frame from a, a flush: run in that order.
  ASSERT_THAT(Write(0, kSmall, "small"), IsOk());
  ASSERT_THAT(Write(kSmall, kLarge, "large"), IsOk());
  ASSERT_THAT(a_->SendText(a_to_b_, "three"), IsOk());
  ASSERT_THAT((*b_)->Flush(b_to_a_,
                           [this](Status status) {
                             Record("flush " + std::string(StatusCodeName(status.code())));
                           }),
              IsOk());
  ASSERT_TRUE(DriveUntil([this] { return num_events() == 6; }));
  const std::thread::id driver = std::this_thread::get_id();
  std::lock_guard<std::mutex> lock(mu_);
  ASSERT_EQ(events_.size(), 6u);
  const std::vector<std::pair<std::string, bool>> expected = {
      {"message one", true}, {"message two", true},   {"small OK", true},
      {"large OK", false},   {"message three", true}, {"flush OK", true}};
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(events_[i].what, expected[i].first) << i;
    EXPECT_EQ(events_[i].thread == driver, expected[i].second) << events_[i].what;
  }
  EXPECT_EQ(std::memcmp(dst_.data(), src_.data(), kBytes), 0);
}

TEST_F(LoopbackDrivenTest, DestroyingTheSourceHandsTheQueueBackToTheThread) {
  ASSERT_THAT(a_->SendText(a_to_b_, "queued"), IsOk());
  ASSERT_THAT(Write(0, kSmall, "small"), IsOk());
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(num_events(), 0u);
  source_.reset();
  const auto deadline = std::chrono::steady_clock::now() + kWaitTimeout;
  while (num_events() < 2 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  std::lock_guard<std::mutex> lock(mu_);
  ASSERT_EQ(events_.size(), 2u);
  EXPECT_EQ(events_[0].what, "message queued");
  EXPECT_EQ(events_[1].what, "small OK");
  EXPECT_NE(events_[1].thread, std::this_thread::get_id());
}

TEST_F(LoopbackDrivenTest, ShutdownFailsWhatTheDriverNeverRan) {
  ASSERT_THAT(Write(0, kSmall, "small"), IsOk());
  ASSERT_THAT(Write(kSmall, kLarge, "large"), IsOk());
  b_->Shutdown();
  std::lock_guard<std::mutex> lock(mu_);
  ASSERT_EQ(events_.size(), 2u);
  EXPECT_EQ(events_[0].what, "small ABORTED");
  EXPECT_EQ(events_[1].what, "large ABORTED");
  for (size_t i = 0; i < kBytes; ++i) ASSERT_EQ(dst_.data()[i], 0) << i;
  EXPECT_FALSE(source_->Poll());  // the source outlives the transport
}

TEST_F(LoopbackDrivenTest, OneSourcePerTransportAndNoneAfterShutdown) {
  EXPECT_EQ((*b_)->TakeProgressSource(), nullptr);
  auto c = MakeEndpoint("c");
  c->Shutdown();
  EXPECT_EQ((*c)->TakeProgressSource(), nullptr);
}

}  // namespace
}  // namespace kvbounce::transport_test
