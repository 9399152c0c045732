// Behaviour specific to the loopback transport (the shared contract is in
// transport_conformance_test.cc).
#include "transport/loopback/loopback_transport.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/status_matchers.h"
#include "kvbounce/status.h"
#include "kvbounce/transport.h"
#include "kvbounce/types.h"
#include "transport/transport_test_util.h"

namespace kvbounce::transport_test {
namespace {

using ::kvbounce::testing_util::IsOk;
using ::kvbounce::testing_util::StatusIs;
using ::testing::HasSubstr;

class LoopbackTransportTest : public ::testing::Test {
 protected:
  std::unique_ptr<TestEndpoint> MakeEndpoint(const std::string& name, bool start = true) {
    return MakeTestEndpoint(LoopbackTransport::Create(fabric_, name), start);
  }

  std::pair<PeerId, PeerId> Connect(TestEndpoint& from, TestEndpoint& to) {
    return ConnectTestEndpoints(from, to);
  }

  std::shared_ptr<LoopbackFabric> fabric_ = LoopbackFabric::Create();
};

TEST_F(LoopbackTransportTest, CreateValidatesNameAndFabric) {
  EXPECT_THAT(LoopbackTransport::Create(nullptr, "a"), StatusIs(StatusCode::kInvalidArgument));
  EXPECT_THAT(LoopbackTransport::Create(fabric_, ""), StatusIs(StatusCode::kInvalidArgument));
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
  EXPECT_FALSE(caps.device_memory);
  EXPECT_TRUE(caps.map_remote);

  // Shutdown frees the name at once.
  (*a)->Shutdown();
  EXPECT_EQ(fabric_->num_endpoints(), 0u);
  EXPECT_THAT(LoopbackTransport::Create(fabric_, "a"), IsOk());
}

TEST_F(LoopbackTransportTest, RegisterChecksTheRegion) {
  auto a = MakeEndpoint("a", /*start=*/false);  // Register works before Start
  GuardedBuffer buffer(4096);
  EXPECT_THAT((*a)->Register(buffer.addr(), 4096, MemoryKind::kCuda),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("cuda")));
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

// The per-block path of DESIGN §4's example: 40,960 fragments in one batch,
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

}  // namespace
}  // namespace kvbounce::transport_test
