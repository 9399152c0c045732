// The transport conformance suite: the same cases over every transport.
//
// To add a transport, write a TransportFactory (a TransportNetwork that makes
// endpoints able to reach each other) and add it to the
// INSTANTIATE_TEST_SUITE_P list at the bottom.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <stop_token>
#include <string>
#include <thread>
#include <vector>

#include "common/clock.h"
#include "common/status_matchers.h"
#include "kvbounce/status.h"
#include "kvbounce/transport.h"
#include "kvbounce/types.h"
#include "session/event_loop.h"
#include "transport/fault/fault_transport.h"
#include "transport/loopback/loopback_transport.h"
#include "transport/transport_test_util.h"
#if defined(KVBOUNCE_HAVE_UCX)
#include "transport/ucx/ucx_transport.h"
#endif

namespace kvbounce::transport_test {
namespace {

using ::kvbounce::testing_util::IsOk;
using ::kvbounce::testing_util::StatusIs;
using ::testing::AnyOf;
using ::testing::HasSubstr;

// Endpoints that can reach each other (one fabric, one UCX setup, ...).
class TransportNetwork {
 public:
  virtual ~TransportNetwork() = default;
  virtual Result<std::unique_ptr<Transport>> CreateEndpoint(const std::string& name) = 0;
  // An address nobody listens on, and one this transport cannot parse.
  virtual std::string UnreachableAddress() = 0;
  virtual std::string MalformedAddress() = 0;
};

struct TransportFactory {
  std::string name;
  std::function<std::unique_ptr<TransportNetwork>()> make_network;
  // Optional behaviours a transport may not be able to offer:
  // a write into a deregistered target region fails with
  // kFailedPrecondition instead of landing;
  bool detects_deregistered_target = true;
  // Import checks that a key names a live region of that very peer.
  bool validates_region_owner = true;
  // A read from a region its owner deregistered fails with
  // kFailedPrecondition (the owner's deregistration waits for reads, as for
  // writes) instead of reading what is there.
  bool detects_deregistered_source = true;
};

class LoopbackNetwork : public TransportNetwork {
 public:
  explicit LoopbackNetwork(LoopbackOptions options = {}) : options_(options) {}
  Result<std::unique_ptr<Transport>> CreateEndpoint(const std::string& name) override {
    KVB_ASSIGN_OR_RETURN(auto transport, LoopbackTransport::Create(fabric_, name, options_));
    return std::unique_ptr<Transport>(std::move(transport));
  }
  std::string UnreachableAddress() override { return "loopback:nobody-here"; }
  std::string MalformedAddress() override { return "tcp://1.2.3.4:5"; }

 private:
  LoopbackOptions options_;
  std::shared_ptr<LoopbackFabric> fabric_ = LoopbackFabric::Create();
};

// The fault decorator with every fault off must be indistinguishable.
class FaultLoopbackNetwork : public LoopbackNetwork {
 public:
  Result<std::unique_ptr<Transport>> CreateEndpoint(const std::string& name) override {
    KVB_ASSIGN_OR_RETURN(auto inner, LoopbackNetwork::CreateEndpoint(name));
    KVB_ASSIGN_OR_RETURN(auto transport, FaultTransport::Create(std::move(inner), {}));
    return std::unique_ptr<Transport>(std::move(transport));
  }
};

TransportFactory LoopbackFactory() {
  return {"loopback", [] { return std::make_unique<LoopbackNetwork>(); }};
}

// Endpoint threads that poll before they sleep.
TransportFactory LoopbackPollingFactory() {
  return {"loopback_polling", [] {
            LoopbackOptions options;
            options.poll_before_sleep = std::chrono::microseconds(200);
            return std::make_unique<LoopbackNetwork>(options);
          }};
}

// Endpoints whose queues event loops drive (TakeProgressSource), as an
// agent's control loop does; the loops outlive the endpoints.
class LoopbackOnLoopNetwork : public LoopbackNetwork {
 public:
  Result<std::unique_ptr<Transport>> CreateEndpoint(const std::string& name) override {
    KVB_ASSIGN_OR_RETURN(auto transport, LoopbackNetwork::CreateEndpoint(name));
    std::unique_ptr<ProgressSource> source = transport->TakeProgressSource();
    if (source == nullptr) return InternalError("the loopback transport handed no progress over");
    if (transport->TakeProgressSource() != nullptr) {
      return InternalError("the loopback transport handed its progress over twice");
    }
    KVB_ASSIGN_OR_RETURN(auto loop, EventLoop::Create(Clock::Steady(), {}, std::move(source)));
    loops_.push_back(std::move(loop));
    return transport;
  }

 private:
  std::vector<std::unique_ptr<EventLoop>> loops_;
};

TransportFactory LoopbackOnLoopFactory() {
  return {"loopback_loop", [] { return std::make_unique<LoopbackOnLoopNetwork>(); }};
}

TransportFactory FaultLoopbackFactory() {
  return {"fault_loopback", [] { return std::make_unique<FaultLoopbackNetwork>(); }};
}

#if defined(KVBOUNCE_HAVE_UCX)
// UCX endpoints of this process, each listening on a free port of 127.0.0.1.
// With `on_loop`, each endpoint hands rail 0's progress to an EventLoop of
// the network's (as an agent does with its control loop); the loops outlive
// the endpoints, whose Shutdown thus runs while their rail is driven.
class UcxNetwork : public TransportNetwork {
 public:
  UcxNetwork(bool shared_memory, int workers, std::chrono::microseconds poll = {},
             bool on_loop = false)
      : shared_memory_(shared_memory), workers_(workers), poll_(poll), on_loop_(on_loop) {}
  Result<std::unique_ptr<Transport>> CreateEndpoint(const std::string&) override {
    UcxTransportOptions options;
    options.listen_address = "127.0.0.1:0";
    options.same_host_shared_memory = shared_memory_;
    options.num_workers = workers_;
    options.put_chunk_bytes = 4096;  // several puts per op in the larger cases
    options.poll_before_sleep = poll_;
    KVB_ASSIGN_OR_RETURN(auto transport, UcxTransport::Create(options));
    if (on_loop_) {
      std::unique_ptr<ProgressSource> source = transport->TakeProgressSource();
      if (source == nullptr) return InternalError("the ucx transport handed no progress over");
      if (transport->TakeProgressSource() != nullptr) {
        return InternalError("the ucx transport handed its progress over twice");
      }
      KVB_ASSIGN_OR_RETURN(auto loop, EventLoop::Create(Clock::Steady(), poll_, std::move(source)));
      loops_.push_back(std::move(loop));
    }
    return std::unique_ptr<Transport>(std::move(transport));
  }
  std::string UnreachableAddress() override { return "127.0.0.1:1"; }
  std::string MalformedAddress() override { return "loopback:b"; }

 private:
  bool shared_memory_;
  int workers_;
  std::chrono::microseconds poll_;
  bool on_loop_;
  std::vector<std::unique_ptr<EventLoop>> loops_;
};

// TCP for every byte (endpoints with peer error handling), one rail; shared
// memory for the data between these same-host endpoints, also with progress
// threads that poll before they sleep; TCP over 3 rails.
// Reads (process_vm_readv) are on in every configuration: these endpoints
// are processes of one host (the same process, in fact), and
// same_host_read, not same_host_shared_memory, governs them.
TransportFactory UcxTcpFactory() {
  return {"ucx_tcp", [] { return std::make_unique<UcxNetwork>(false, 1); },
          /*detects_deregistered_target=*/false, /*validates_region_owner=*/true,
          /*detects_deregistered_source=*/false};
}
TransportFactory UcxSharedMemoryFactory() {
  return {"ucx_shm", [] { return std::make_unique<UcxNetwork>(true, 1); },
          /*detects_deregistered_target=*/false, /*validates_region_owner=*/true,
          /*detects_deregistered_source=*/false};
}
TransportFactory UcxSharedMemoryPollingFactory() {
  return {"ucx_shm_polling",
          [] { return std::make_unique<UcxNetwork>(true, 1, std::chrono::microseconds(200)); },
          /*detects_deregistered_target=*/false, /*validates_region_owner=*/true,
          /*detects_deregistered_source=*/false};
}
// Rail 0 on an event loop (ProgressSource), rail 1 on its own thread.
TransportFactory UcxSharedMemoryOnLoopFactory() {
  return {"ucx_shm_2rails_loop",
          [] { return std::make_unique<UcxNetwork>(true, 2, std::chrono::microseconds(0), true); },
          /*detects_deregistered_target=*/false, /*validates_region_owner=*/true,
          /*detects_deregistered_source=*/false};
}
TransportFactory UcxTcpRailsFactory() {
  return {"ucx_tcp_3rails", [] { return std::make_unique<UcxNetwork>(false, 3); },
          /*detects_deregistered_target=*/false, /*validates_region_owner=*/true,
          /*detects_deregistered_source=*/false};
}
#endif

// A fake region of a peer this transport never heard of.
class ForeignRemoteRegion : public RemoteRegion {
 public:
  ForeignRemoteRegion(PeerId peer, RegionInfo info) : peer_(peer), info_(std::move(info)) {}
  PeerId peer() const override { return peer_; }
  const RegionInfo& info() const override { return info_; }
  Addr mapped_address() const override { return Addr(); }

 private:
  PeerId peer_;
  RegionInfo info_;
};

class TransportConformanceTest : public ::testing::TestWithParam<TransportFactory> {
 protected:
  void SetUp() override { network_ = GetParam().make_network(); }

  std::unique_ptr<TestEndpoint> MakeEndpoint(const std::string& name, bool start = true) {
    return MakeTestEndpoint(network_->CreateEndpoint(name), start);
  }

  std::pair<PeerId, PeerId> Connect(TestEndpoint& from, TestEndpoint& to) {
    return ConnectTestEndpoints(from, to);
  }

  std::unique_ptr<LocalRegion> Register(TestEndpoint& endpoint, const GuardedBuffer& buffer) {
    auto region = endpoint->Register(buffer.addr(), buffer.size(), MemoryKind::kHost);
    EXPECT_THAT(region, IsOk());
    return region.ok() ? std::move(region).value() : nullptr;
  }

  std::unique_ptr<RemoteRegion> Import(TestEndpoint& endpoint, PeerId peer,
                                       const LocalRegion& region) {
    auto remote = endpoint->Import(peer, region.info());
    EXPECT_THAT(remote, IsOk());
    return remote.ok() ? std::move(remote).value() : nullptr;
  }

  // Write through the tracker; the callback must not run inside the call.
  Status Write(TestEndpoint& endpoint, DoneTracker& tracker, const LocalRegion& source,
               const RemoteRegion& target, std::span<const WriteOp> ops,
               std::stop_token stop = {}) {
    InsideCall inside;
    Status status = endpoint->Write(source, target, ops, tracker.Make(), std::move(stop));
    if (!status.ok()) tracker.Forget();
    return status;
  }

  // Read through the tracker; the callback must not run inside the call.
  Status Read(TestEndpoint& endpoint, DoneTracker& tracker, const RemoteRegion& source,
              const LocalRegion& target, std::span<const ReadOp> ops, std::stop_token stop = {}) {
    InsideCall inside;
    Status status = endpoint->Read(source, target, ops, tracker.Make(), std::move(stop));
    if (!status.ok()) tracker.Forget();
    return status;
  }

  // Whether `endpoint` may Read from `peer` (PeerCaps); when it may not, a
  // Read must say kUnimplemented, which this checks with a zero-byte read.
  bool CanRead(TestEndpoint& endpoint, PeerId peer, const RemoteRegion& source,
               const LocalRegion& target) {
    auto caps = endpoint->PeerCaps(peer);
    EXPECT_THAT(caps, IsOk());
    if (caps.ok() && caps->read_remote) {
      EXPECT_TRUE(endpoint->Caps().read_remote);
      EXPECT_GT(caps->read_cost.bytes_per_us, 0);
      EXPECT_GT(caps->read_cost.op_us, 0);
      return true;
    }
    DoneTracker tracker;
    EXPECT_THAT(Read(endpoint, tracker, source, target, {}), StatusIs(StatusCode::kUnimplemented));
    return false;
  }

  Status Flush(TestEndpoint& endpoint, DoneTracker& tracker, PeerId peer) {
    InsideCall inside;
    Status status = endpoint->Flush(peer, tracker.Make());
    if (!status.ok()) tracker.Forget();
    return status;
  }

  // Blocks `endpoint`'s callback thread inside on_message until Release().
  // Installs the hook; call before Start.
  class ThreadBlocker {
   public:
    void Install(TestEndpoint& endpoint) {
      endpoint.on_message_hook = [this](PeerId, const std::vector<std::byte>& frame) {
        if (Text(frame) != "BLOCK") return;
        std::unique_lock<std::mutex> lock(mu_);
        entered_ = true;
        cv_.notify_all();
        cv_.wait(lock, [this] { return released_; });
      };
    }
    bool WaitEntered() {
      std::unique_lock<std::mutex> lock(mu_);
      return cv_.wait_for(lock, kWaitTimeout, [this] { return entered_; });
    }
    void Release() {
      std::lock_guard<std::mutex> lock(mu_);
      released_ = true;
      cv_.notify_all();
    }

   private:
    std::mutex mu_;
    std::condition_variable cv_;
    bool entered_ = false;
    bool released_ = false;
  };

  std::unique_ptr<TransportNetwork> network_;
};

TEST_P(TransportConformanceTest, HelloRoundTrip) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  EXPECT_FALSE((*a)->Address().empty());
  EXPECT_NE((*a)->Address(), (*b)->Address());

  auto [a_to_b, b_to_a] = Connect(*a, *b);
  ASSERT_EQ(b->messages().size(), 1u);
  EXPECT_EQ(Text(b->messages()[0].frame), "HELLO from " + (*a)->Address());

  ASSERT_THAT(b->SendText(b_to_a, "HELLO from " + (*b)->Address()), IsOk());
  ASSERT_TRUE(a->WaitForMessages(1));
  EXPECT_EQ(a->messages()[0].peer, a_to_b);
  EXPECT_EQ(Text(a->messages()[0].frame), "HELLO from " + (*b)->Address());
  EXPECT_EQ(a->total_failures(), 0);
  EXPECT_EQ(b->total_failures(), 0);
}

TEST_P(TransportConformanceTest, EmptyFrameIsDelivered) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  ASSERT_THAT((*a)->Send(a_to_b, {}), IsOk());
  ASSERT_TRUE(b->WaitForMessages(2));
  EXPECT_TRUE(b->messages()[1].frame.empty());
}

TEST_P(TransportConformanceTest, MessagesArriveInOrder) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  constexpr int kMessages = 1000;
  for (int i = 0; i < kMessages; ++i) {
    ASSERT_THAT(a->SendText(a_to_b, std::to_string(i)), IsOk());
  }
  ASSERT_TRUE(b->WaitForMessages(kMessages + 1));
  const auto messages = b->messages();
  for (int i = 0; i < kMessages; ++i) {
    EXPECT_EQ(messages[i + 1].peer, b_to_a);
    ASSERT_EQ(Text(messages[i + 1].frame), std::to_string(i)) << "message " << i;
  }
}

TEST_P(TransportConformanceTest, WriteThenFlushMakesBytesVisible) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  GuardedBuffer src(4096);
  src.FillPattern(7);
  GuardedBuffer dst(8192, 0);
  auto src_region = Register(*a, src);
  auto dst_region = Register(*b, dst);
  auto target = Import(*a, a_to_b, *dst_region);
  ASSERT_NE(target, nullptr);
  EXPECT_EQ(target->peer(), a_to_b);
  EXPECT_EQ(target->info().address, dst.addr());
  EXPECT_EQ(target->info().size, dst.size());

  DoneTracker tracker;
  const WriteOp ops[] = {{src.addr(), dst.addr(1000), 4096}};
  ASSERT_THAT(Write(*a, tracker, *src_region, *target, ops), IsOk());
  ASSERT_THAT(Flush(*a, tracker, a_to_b), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(0), IsOk());
  EXPECT_THAT(tracker.status(1), IsOk());
  EXPECT_EQ(std::memcmp(dst.data() + 1000, src.data(), 4096), 0);
  for (size_t i = 0; i < dst.size(); ++i) {
    if (i < 1000 || i >= 5096) {
      ASSERT_EQ(dst.data()[i], 0) << "byte " << i;
    }
  }
  EXPECT_TRUE(dst.GuardsIntact());
  EXPECT_EQ(tracker.Violations(), "");
}

// Caps().writes_land_at_completion: the bytes are in the target by the
// time the write's `done` runs, with no flush (the sessions then tell the
// peer at once). A transport that does not say so is not held to it.
TEST_P(TransportConformanceTest, AWriteThatLandsAtCompletionNeedsNoFlush) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  if (!a->t().Caps().writes_land_at_completion) {
    GTEST_SKIP() << a->t().Caps().name
                 << ": a write's completion does not promise its bytes landed";
  }
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  GuardedBuffer src(1 << 20);
  src.FillPattern(11);
  GuardedBuffer dst(1 << 20, 0);
  auto src_region = Register(*a, src);
  auto dst_region = Register(*b, dst);
  auto target = Import(*a, a_to_b, *dst_region);
  ASSERT_NE(target, nullptr);
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  bool landed = false;
  Status status;
  const WriteOp ops[] = {{src.addr(), dst.addr(), src.size() / 2},
                         {src.addr(src.size() / 2), dst.addr(src.size() / 2), src.size() / 2}};
  ASSERT_THAT(a->t().Write(*src_region, *target, ops,
                           [&](Status s) {
                             // Checked inside the callback: before any flush.
                             const bool same = std::memcmp(dst.data(), src.data(), src.size()) == 0;
                             std::lock_guard<std::mutex> lock(mu);
                             status = s;
                             landed = same;
                             done = true;
                             cv.notify_all();
                           }),
              IsOk());
  std::unique_lock<std::mutex> lock(mu);
  ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(30), [&] { return done; }));
  EXPECT_THAT(status, IsOk());
  EXPECT_TRUE(landed) << "the write reported before its bytes were in the target";
  EXPECT_TRUE(dst.GuardsIntact());
}

TEST_P(TransportConformanceTest, ManySmallOpsInOneBatchLandExactly) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  constexpr size_t kOps = 10000;
  constexpr size_t kOpBytes = 16;
  constexpr size_t kStride = 24;  // 8 untouched bytes between targets
  GuardedBuffer src(kOps * kOpBytes);
  src.FillPattern(11);
  GuardedBuffer dst(kOps * kStride, 0x5A);
  auto src_region = Register(*a, src);
  auto dst_region = Register(*b, dst);
  auto target = Import(*a, a_to_b, *dst_region);
  ASSERT_NE(target, nullptr);

  // Source op i goes to target slot perm[i]: scattered, not sequential.
  std::vector<size_t> perm(kOps);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937(3));
  std::vector<WriteOp> ops(kOps);
  for (size_t i = 0; i < kOps; ++i) {
    ops[i] = {src.addr(i * kOpBytes), dst.addr(perm[i] * kStride), kOpBytes};
  }
  const TransportStats before = (*a)->Stats();
  DoneTracker tracker;
  ASSERT_THAT(Write(*a, tracker, *src_region, *target, ops), IsOk());
  ASSERT_THAT(Flush(*a, tracker, a_to_b), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(0), IsOk());
  EXPECT_THAT(tracker.status(1), IsOk());

  for (size_t i = 0; i < kOps; ++i) {
    const uint8_t* slot = dst.data() + perm[i] * kStride;
    ASSERT_EQ(std::memcmp(slot, src.data() + i * kOpBytes, kOpBytes), 0) << "op " << i;
    for (size_t j = kOpBytes; j < kStride; ++j) ASSERT_EQ(slot[j], 0x5A) << "gap after " << i;
  }
  EXPECT_TRUE(dst.GuardsIntact());
  const TransportStats after = (*a)->Stats();
  EXPECT_EQ(after.write_ops - before.write_ops, kOps);
  EXPECT_EQ(after.write_bytes - before.write_bytes, kOps * kOpBytes);
  EXPECT_EQ(after.failed_write_ops, before.failed_write_ops);
  EXPECT_EQ(tracker.Violations(), "");
}

TEST_P(TransportConformanceTest, OpOutsideSourceOrTargetIsRejectedAndNothingWritten) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  GuardedBuffer src(1024);
  src.FillPattern(5);
  GuardedBuffer dst(1024, 0);
  auto src_region = Register(*a, src);
  auto dst_region = Register(*b, dst);
  auto target = Import(*a, a_to_b, *dst_region);
  ASSERT_NE(target, nullptr);

  const WriteOp good = {src.addr(), dst.addr(), 64};
  const std::vector<std::vector<WriteOp>> bad_batches = {
      {good, {src.addr(1000), dst.addr(), 25}},               // past the source's end
      {good, {src.addr(), dst.addr(1000), 25}},               // past the target's end
      {good, {src.addr() + (-1ull), dst.addr(), 1}},          // before the source (wraps)
      {good, {src.addr(), Addr(dst.addr().value() - 1), 1}},  // before the target
      {good, {src.addr(), dst.addr(), ~0ull}},                // overflowing length
      {{src.addr(), dst.addr(1024), 1}},                      // starts at the end
  };
  DoneTracker tracker;
  for (size_t i = 0; i < bad_batches.size(); ++i) {
    EXPECT_THAT(Write(*a, tracker, *src_region, *target, bad_batches[i]),
                StatusIs(StatusCode::kOutOfRange))
        << "batch " << i;
  }
  ASSERT_THAT(Flush(*a, tracker, a_to_b), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_TRUE(dst.AllEqual(0));
  EXPECT_TRUE(dst.GuardsIntact());
  EXPECT_EQ(tracker.Violations(), "");
  EXPECT_EQ((*a)->Stats().write_ops, 0u);

  // A zero-byte op at the very end is inside; an empty batch completes OK.
  const WriteOp edge[] = {{src.addr(1024), dst.addr(1024), 0}};
  ASSERT_THAT(Write(*a, tracker, *src_region, *target, edge), IsOk());
  ASSERT_THAT(Write(*a, tracker, *src_region, *target, {}), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  for (const Status& status : tracker.statuses()) EXPECT_THAT(status, IsOk());
}

// Documented outcome: kFailedPrecondition, from Write or from its `done`.
TEST_P(TransportConformanceTest, WriteIntoDeregisteredRegionFailsAndMemoryIsUntouched) {
  if (!GetParam().detects_deregistered_target) GTEST_SKIP() << "not detected by this transport";
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  GuardedBuffer src(256);
  src.FillPattern(9);
  GuardedBuffer dst(256, 0);
  auto src_region = Register(*a, src);
  auto dst_region = Register(*b, dst);
  auto target = Import(*a, a_to_b, *dst_region);
  ASSERT_NE(target, nullptr);
  dst_region.reset();  // deregistered: a quarantined or freed slot

  DoneTracker tracker;
  const WriteOp ops[] = {{src.addr(), dst.addr(), 256}};
  Status status = Write(*a, tracker, *src_region, *target, ops);
  if (status.ok()) {
    ASSERT_TRUE(tracker.WaitAll());
    status = tracker.status(0);
  }
  EXPECT_THAT(status, StatusIs(StatusCode::kFailedPrecondition));
  EXPECT_TRUE(dst.AllEqual(0));
  EXPECT_TRUE(dst.GuardsIntact());
  // Importing it again fails too.
  EXPECT_FALSE((*a)->Import(a_to_b, target->info()).ok());
  EXPECT_EQ(tracker.Violations(), "");
}

TEST_P(TransportConformanceTest, ImportRejectsBadKeysAndWrongPeers) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto c = MakeEndpoint("c");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  auto [a_to_c, c_to_a] = Connect(*a, *c);
  GuardedBuffer b_buffer(512);
  GuardedBuffer c_buffer(512);
  auto b_region = Register(*b, b_buffer);
  auto c_region = Register(*c, c_buffer);

  RegionInfo truncated = b_region->info();
  truncated.remote_key.resize(truncated.remote_key.size() / 2);
  EXPECT_FALSE((*a)->Import(a_to_b, truncated).ok());
  RegionInfo no_key = b_region->info();
  no_key.remote_key.clear();
  EXPECT_THAT((*a)->Import(a_to_b, no_key), StatusIs(StatusCode::kInvalidArgument));
  EXPECT_THAT((*a)->Import(999999, b_region->info()), StatusIs(StatusCode::kNotFound));

  if (GetParam().validates_region_owner) {
    // c's region offered as if it were b's.
    EXPECT_THAT((*a)->Import(a_to_b, c_region->info()),
                AnyOf(StatusIs(StatusCode::kInvalidArgument), StatusIs(StatusCode::kNotFound)));
    RegionInfo moved = b_region->info();
    moved.address = moved.address + 64;
    EXPECT_THAT((*a)->Import(a_to_b, moved), StatusIs(StatusCode::kInvalidArgument));
    RegionInfo grown = b_region->info();
    grown.size += 1;
    EXPECT_THAT((*a)->Import(a_to_b, grown), StatusIs(StatusCode::kInvalidArgument));
  }
  EXPECT_THAT((*a)->Import(a_to_c, c_region->info()), IsOk());
}

TEST_P(TransportConformanceTest, UnknownPeerIsNotFound) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  Connect(*a, *b);
  constexpr PeerId kUnknown = 987654321;
  EXPECT_THAT((*a)->Send(kUnknown, Bytes("x")), StatusIs(StatusCode::kNotFound));
  DoneTracker tracker;
  EXPECT_THAT(Flush(*a, tracker, kUnknown), StatusIs(StatusCode::kNotFound));

  GuardedBuffer src(64);
  auto src_region = Register(*a, src);
  RegionInfo info;
  info.address = Addr(0x10000);
  info.size = 64;
  info.remote_key = std::vector<std::byte>(8);
  ForeignRemoteRegion foreign(kUnknown, info);
  const WriteOp ops[] = {{src.addr(), Addr(0x10000), 64}};
  EXPECT_THAT(Write(*a, tracker, *src_region, foreign, ops), StatusIs(StatusCode::kNotFound));
  (*a)->Disconnect(kUnknown, UnavailableError("nothing"));  // ignored
  EXPECT_EQ(tracker.Violations(), "");
  EXPECT_EQ(a->total_failures(), 0);
}

TEST_P(TransportConformanceTest, ConnectAndStartErrors) {
  auto a = MakeEndpoint("a");
  EXPECT_THAT((*a)->Connect(network_->UnreachableAddress()), StatusIs(StatusCode::kUnavailable));
  EXPECT_THAT((*a)->Connect(network_->MalformedAddress()), StatusIs(StatusCode::kInvalidArgument));
  EXPECT_THAT((*a)->Connect(""), StatusIs(StatusCode::kInvalidArgument));
  EXPECT_THAT((*a)->Start({}), StatusIs(StatusCode::kFailedPrecondition));

  auto idle = MakeEndpoint("idle", /*start=*/false);
  EXPECT_THAT((*idle)->Connect((*a)->Address()), StatusIs(StatusCode::kFailedPrecondition));
  EXPECT_THAT((*idle)->Send(1, Bytes("x")), StatusIs(StatusCode::kFailedPrecondition));

  GuardedBuffer buffer(64);
  EXPECT_THAT((*a)->Register(buffer.addr(), 0, MemoryKind::kHost),
              StatusIs(StatusCode::kInvalidArgument));

  a->Shutdown();
  a->Shutdown();  // idempotent
  EXPECT_THAT((*a)->Connect((*idle)->Address()), StatusIs(StatusCode::kAborted));
}

// The core failure contract, with the writer's thread held so that its write
// and flush are certainly still pending when the connection dies.
TEST_P(TransportConformanceTest, DisconnectFailsPendingAndNewWorkOnBothEnds) {
  for (const bool writer_disconnects : {true, false}) {
    SCOPED_TRACE(writer_disconnects ? "writer disconnects" : "receiver disconnects");
    ThreadBlocker blocker;
    auto a = MakeEndpoint("a" + std::to_string(writer_disconnects), /*start=*/false);
    blocker.Install(*a);
    ASSERT_THAT(a->Start(), IsOk());
    auto b = MakeEndpoint("b" + std::to_string(writer_disconnects));
    auto [a_to_b, b_to_a] = Connect(*a, *b);
    GuardedBuffer src(4096);
    src.FillPattern(1);
    GuardedBuffer dst(4096, 0);
    auto src_region = Register(*a, src);
    auto dst_region = Register(*b, dst);
    auto target = Import(*a, a_to_b, *dst_region);
    ASSERT_NE(target, nullptr);

    ASSERT_THAT(b->SendText(b_to_a, "BLOCK"), IsOk());
    ASSERT_TRUE(blocker.WaitEntered());
    DoneTracker tracker;
    const WriteOp ops[] = {{src.addr(), dst.addr(), 4096}};
    ASSERT_THAT(Write(*a, tracker, *src_region, *target, ops), IsOk());
    ASSERT_THAT(Flush(*a, tracker, a_to_b), IsOk());
    if (writer_disconnects) {
      (*a)->Disconnect(a_to_b, UnavailableError("test disconnect"));
    } else {
      (*b)->Disconnect(b_to_a, UnavailableError("test disconnect"));
    }
    blocker.Release();

    ASSERT_TRUE(tracker.WaitAll());
    // A transport that hands bytes to a network stack may land a write that
    // was issued before the connection died; the fence holds either way.
    const bool pending_fail = (*a)->Caps().pending_writes_fail;
    if (pending_fail) {
      EXPECT_THAT(tracker.status(0), StatusIs(StatusCode::kUnavailable));
      EXPECT_THAT(tracker.status(1), StatusIs(StatusCode::kUnavailable));
    } else {
      EXPECT_THAT(tracker.status(0), AnyOf(IsOk(), StatusIs(StatusCode::kUnavailable)));
      EXPECT_THAT(tracker.status(1), AnyOf(IsOk(), StatusIs(StatusCode::kUnavailable)));
    }
    ASSERT_TRUE(a->WaitForFailure(a_to_b));
    ASSERT_TRUE(b->WaitForFailure(b_to_a));
    EXPECT_THAT(a->failure_reason(a_to_b), StatusIs(StatusCode::kUnavailable));
    EXPECT_THAT(b->failure_reason(b_to_a), StatusIs(StatusCode::kUnavailable));
    EXPECT_THAT(writer_disconnects ? a->failure_reason(a_to_b) : b->failure_reason(b_to_a),
                StatusIs(StatusCode::kUnavailable, HasSubstr("test disconnect")));

    // New work is refused on both ends; disconnecting again changes nothing.
    EXPECT_THAT(a->SendText(a_to_b, "late"), StatusIs(StatusCode::kUnavailable));
    EXPECT_THAT(b->SendText(b_to_a, "late"), StatusIs(StatusCode::kUnavailable));
    EXPECT_THAT(Write(*a, tracker, *src_region, *target, ops), StatusIs(StatusCode::kUnavailable));
    EXPECT_THAT(Flush(*a, tracker, a_to_b), StatusIs(StatusCode::kUnavailable));
    EXPECT_THAT(Flush(*b, tracker, b_to_a), StatusIs(StatusCode::kUnavailable));
    EXPECT_FALSE((*a)->Import(a_to_b, dst_region->info()).ok());
    (*a)->Disconnect(a_to_b, UnavailableError("again"));
    (*b)->Disconnect(b_to_a, UnavailableError("again"));

    // Let any stray callback show up before counting.
    std::this_thread::sleep_for(50ms);
    EXPECT_EQ(a->failures(a_to_b), 1);
    EXPECT_EQ(b->failures(b_to_a), 1);
    EXPECT_EQ(a->total_failures(), 1);
    EXPECT_EQ(b->total_failures(), 1);
    EXPECT_EQ(tracker.Violations(), "");
    if (pending_fail) {
      // Pending work failed rather than landed.
      EXPECT_TRUE(dst.AllEqual(0));
      EXPECT_EQ((*a)->Stats().failed_write_ops, 1u);
    } else {
      // Whatever landed is the write's own bytes, nothing else.
      for (size_t i = 0; i < dst.size(); ++i) {
        ASSERT_TRUE(dst.data()[i] == 0 || dst.data()[i] == src.data()[i]) << "byte " << i;
      }
    }
    EXPECT_TRUE(dst.GuardsIntact());

    // The other connections of an endpoint are unaffected.
    auto c = MakeEndpoint("c" + std::to_string(writer_disconnects));
    auto [a_to_c, c_to_a] = Connect(*a, *c);
    EXPECT_THAT(c->SendText(c_to_a, "still here"), IsOk());
    EXPECT_TRUE(a->WaitForMessages(2));
  }
}

TEST_P(TransportConformanceTest, ShutdownWithWritesInFlightRunsEveryCallbackOnce) {
  for (const bool hold_thread : {true, false}) {
    SCOPED_TRACE(hold_thread ? "thread held" : "thread free");
    ThreadBlocker blocker;
    const std::string suffix = std::to_string(hold_thread);
    auto a = MakeEndpoint("a" + suffix, /*start=*/false);
    blocker.Install(*a);
    ASSERT_THAT(a->Start(), IsOk());
    auto b = MakeEndpoint("b" + suffix);
    auto [a_to_b, b_to_a] = Connect(*a, *b);
    constexpr size_t kOps = 1000;
    constexpr int kWrites = 100;
    GuardedBuffer src(kOps * 64);
    src.FillPattern(2);
    // Each write into its own part: writes may run on several threads.
    GuardedBuffer dst(kWrites * kOps * 64, 0);
    auto src_region = Register(*a, src);
    auto dst_region = Register(*b, dst);
    auto target = Import(*a, a_to_b, *dst_region);
    ASSERT_NE(target, nullptr);
    std::vector<std::vector<WriteOp>> ops(kWrites, std::vector<WriteOp>(kOps));
    for (int w = 0; w < kWrites; ++w) {
      for (size_t i = 0; i < kOps; ++i) {
        ops[w][i] = {src.addr(i * 64), dst.addr((w * kOps + i) * 64), 64};
      }
    }

    if (hold_thread) {
      ASSERT_THAT(b->SendText(b_to_a, "BLOCK"), IsOk());
      ASSERT_TRUE(blocker.WaitEntered());
    }
    DoneTracker tracker;
    for (int i = 0; i < kWrites; ++i) {
      ASSERT_THAT(Write(*a, tracker, *src_region, *target, ops[i]), IsOk());
      if (i % 10 == 0) {
        ASSERT_THAT(Flush(*a, tracker, a_to_b), IsOk());
      }
    }
    std::thread releaser([&] {
      std::this_thread::sleep_for(20ms);
      blocker.Release();
    });
    if (!hold_thread) blocker.Release();
    a->Shutdown();
    tracker.Seal();
    releaser.join();
    // Shutdown returned: every accepted callback already ran exactly once.
    EXPECT_EQ(tracker.Violations(), "");
    EXPECT_TRUE(tracker.WaitAll(0ms));
    size_t failed = 0;
    for (const Status& status : tracker.statuses()) {
      if (!status.ok()) {
        ++failed;
        EXPECT_THAT(status,
                    AnyOf(StatusIs(StatusCode::kAborted), StatusIs(StatusCode::kUnavailable)));
      }
    }
    // Holding the one callback thread holds every write; with callbacks on
    // several threads (UCX rails) the other threads keep writing.
    if (hold_thread && !(*a)->Caps().concurrent_callbacks) {
      EXPECT_EQ(failed, tracker.made());
    }

    ASSERT_TRUE(b->WaitForFailure(b_to_a));
    EXPECT_THAT(b->failure_reason(b_to_a), StatusIs(StatusCode::kUnavailable));
    // Calls after Shutdown fail; nothing runs any more.
    EXPECT_THAT(a->SendText(a_to_b, "late"), StatusIs(StatusCode::kAborted));
    EXPECT_THAT(Write(*a, tracker, *src_region, *target, ops[0]), StatusIs(StatusCode::kAborted));
    EXPECT_THAT(Flush(*a, tracker, a_to_b), StatusIs(StatusCode::kAborted));
    EXPECT_THAT(b->SendText(b_to_a, "late"), StatusIs(StatusCode::kUnavailable));
    std::this_thread::sleep_for(20ms);
    EXPECT_EQ(a->callbacks_after_shutdown(), 0);
    EXPECT_EQ(b->failures(b_to_a), 1);
    EXPECT_EQ(tracker.Violations(), "");
  }
}

// A process that sends its last results and shuts down (a prefill worker
// whose publications all settled) must not lose them: a live peer takes
// every message accepted before Shutdown, then sees the connection end.
TEST_P(TransportConformanceTest, MessagesSentBeforeShutdownReachALivePeer) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  constexpr int kMessages = 1000;
  for (int i = 0; i < kMessages; ++i) {
    ASSERT_THAT(a->SendText(a_to_b, "last " + std::to_string(i)), IsOk());
  }
  a->Shutdown();
  ASSERT_TRUE(b->WaitForFailure(b_to_a));
  const auto messages = b->messages();
  ASSERT_EQ(messages.size(), static_cast<size_t>(kMessages + 1));
  for (int i = 0; i < kMessages; ++i) {
    ASSERT_EQ(Text(messages[i + 1].frame), "last " + std::to_string(i)) << "message " << i;
  }
  EXPECT_EQ(b->failures(b_to_a), 1);
}

TEST_P(TransportConformanceTest, FanInFromTwoWritersIntoOneRegion) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto c = MakeEndpoint("c");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  auto [c_to_b, b_to_c] = Connect(*c, *b);
  EXPECT_NE(b_to_a, b_to_c);
  GuardedBuffer a_src(1000);
  a_src.FillPattern(21);
  GuardedBuffer c_src(3000);
  c_src.FillPattern(22);
  GuardedBuffer dst(4096, 0);
  auto a_region = Register(*a, a_src);
  auto c_region = Register(*c, c_src);
  auto dst_region = Register(*b, dst);
  auto a_target = Import(*a, a_to_b, *dst_region);
  auto c_target = Import(*c, c_to_b, *dst_region);
  ASSERT_NE(a_target, nullptr);
  ASSERT_NE(c_target, nullptr);

  DoneTracker tracker;
  const WriteOp a_ops[] = {{a_src.addr(), dst.addr(), 1000}};
  const WriteOp c_ops[] = {{c_src.addr(), dst.addr(1024), 3000}};
  ASSERT_THAT(Write(*a, tracker, *a_region, *a_target, a_ops), IsOk());
  ASSERT_THAT(Write(*c, tracker, *c_region, *c_target, c_ops), IsOk());
  ASSERT_THAT(Flush(*a, tracker, a_to_b), IsOk());
  ASSERT_THAT(Flush(*c, tracker, c_to_b), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  for (const Status& status : tracker.statuses()) EXPECT_THAT(status, IsOk());
  EXPECT_EQ(std::memcmp(dst.data(), a_src.data(), 1000), 0);
  EXPECT_EQ(std::memcmp(dst.data() + 1024, c_src.data(), 3000), 0);
  EXPECT_TRUE(dst.GuardsIntact());
}

TEST_P(TransportConformanceTest, StatsCountOperationsAndMessages) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  GuardedBuffer src(256);
  GuardedBuffer dst(256);
  auto src_region = Register(*a, src);
  auto dst_region = Register(*b, dst);
  auto target = Import(*a, a_to_b, *dst_region);
  ASSERT_NE(target, nullptr);
  DoneTracker tracker;
  const WriteOp ops[] = {{src.addr(), dst.addr(), 100}, {src.addr(100), dst.addr(100), 28}};
  ASSERT_THAT(Write(*a, tracker, *src_region, *target, ops), IsOk());
  ASSERT_THAT(Flush(*a, tracker, a_to_b), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  ASSERT_THAT(b->SendText(b_to_a, "reply"), IsOk());
  ASSERT_TRUE(a->WaitForMessages(1));

  const TransportStats a_stats = (*a)->Stats();
  EXPECT_EQ(a_stats.write_ops, 2u);
  EXPECT_EQ(a_stats.write_bytes, 128u);
  EXPECT_EQ(a_stats.failed_write_ops, 0u);
  EXPECT_EQ(a_stats.flushes, 1u);
  EXPECT_EQ(a_stats.messages_sent, 1u);  // the HELLO
  EXPECT_EQ(a_stats.messages_received, 1u);
  const TransportStats b_stats = (*b)->Stats();
  EXPECT_EQ(b_stats.write_ops, 0u);
  EXPECT_EQ(b_stats.messages_sent, 1u);
  EXPECT_EQ(b_stats.messages_received, 1u);
}

// Writers on several threads, each into its own part of one region, while
// both ends exchange messages. Runs under ThreadSanitizer in CI.
TEST_P(TransportConformanceTest, ConcurrentWritesAndSendsFromManyThreads) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  // Plain variables: lambdas below capture them.
  const std::pair<PeerId, PeerId> peers = Connect(*a, *b);
  const PeerId a_to_b = peers.first;
  const PeerId b_to_a = peers.second;
  constexpr int kThreads = 4;
  constexpr int kRounds = 50;
  constexpr size_t kOpsPerWrite = 32;
  constexpr size_t kOpBytes = 8;
  constexpr size_t kPerThread = kRounds * kOpsPerWrite * kOpBytes;
  GuardedBuffer src(kThreads * kPerThread);
  src.FillPattern(31);
  GuardedBuffer dst(kThreads * kPerThread, 0);
  auto src_region = Register(*a, src);
  auto dst_region = Register(*b, dst);
  auto target = Import(*a, a_to_b, *dst_region);
  ASSERT_NE(target, nullptr);

  // Every op list must outlive its write.
  std::vector<std::vector<WriteOp>> ops(kThreads * kRounds);
  for (int t = 0; t < kThreads; ++t) {
    for (int r = 0; r < kRounds; ++r) {
      auto& list = ops[t * kRounds + r];
      for (size_t i = 0; i < kOpsPerWrite; ++i) {
        const uint64_t offset = t * kPerThread + (r * kOpsPerWrite + i) * kOpBytes;
        list.push_back({src.addr(offset), dst.addr(offset), kOpBytes});
      }
    }
  }
  DoneTracker tracker;
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int r = 0; r < kRounds; ++r) {
        if (!Write(*a, tracker, *src_region, *target, ops[t * kRounds + r]).ok()) ++errors;
        if (!a->SendText(a_to_b, std::to_string(t) + ":" + std::to_string(r)).ok()) ++errors;
        if (r % 10 == 0 && !Flush(*a, tracker, a_to_b).ok()) ++errors;
      }
    });
  }
  threads.emplace_back([&] {
    for (int r = 0; r < kRounds; ++r) {
      if (!b->SendText(b_to_a, std::to_string(r)).ok()) ++errors;
      (void)(*b)->Stats();
    }
  });
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(errors.load(), 0);
  ASSERT_THAT(Flush(*a, tracker, a_to_b), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  for (const Status& status : tracker.statuses()) ASSERT_THAT(status, IsOk());
  EXPECT_EQ(std::memcmp(dst.data(), src.data(), dst.size()), 0);
  EXPECT_TRUE(dst.GuardsIntact());

  // Each sending thread's messages arrive in its own order.
  ASSERT_TRUE(b->WaitForMessages(1 + kThreads * kRounds));
  std::vector<int> next(kThreads, 0);
  for (const auto& message : b->messages()) {
    const std::string text = Text(message.frame);
    if (text.starts_with("HELLO")) continue;
    const int t = std::stoi(text.substr(0, text.find(':')));
    const int r = std::stoi(text.substr(text.find(':') + 1));
    EXPECT_EQ(r, next[t]++) << "thread " << t;
  }
  ASSERT_TRUE(a->WaitForMessages(kRounds));
  const auto a_messages = a->messages();
  for (int r = 0; r < kRounds; ++r) EXPECT_EQ(Text(a_messages[r].frame), std::to_string(r));
  EXPECT_EQ(tracker.Violations(), "");
}

TEST_P(TransportConformanceTest, CallbacksMayCallBackIntoTheTransport) {
  auto a = MakeEndpoint("a", /*start=*/false);
  auto b = MakeEndpoint("b");
  // a answers every message from its callback.
  Transport* a_transport = &a->t();
  a->on_message_hook = [a_transport](PeerId peer, const std::vector<std::byte>& frame) {
    if (Text(frame) == "ping") {
      EXPECT_THAT(a_transport->Send(peer, Bytes("pong")), IsOk());
    }
  };
  ASSERT_THAT(a->Start(), IsOk());
  auto [b_to_a, a_to_b] = Connect(*b, *a);
  ASSERT_THAT(b->SendText(b_to_a, "ping"), IsOk());
  ASSERT_TRUE(b->WaitForMessages(1));
  EXPECT_EQ(Text(b->messages()[0].frame), "pong");
  EXPECT_EQ(b->messages()[0].peer, b_to_a);
}

// --- Cancellation and the fence (transport.h) ---------------------------------

TEST_P(TransportConformanceTest, StopRequestedBeforeTheWriteCopiesNothing) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  GuardedBuffer src(8192);
  src.FillPattern(41);
  GuardedBuffer dst(8192, 0);
  auto src_region = Register(*a, src);
  auto dst_region = Register(*b, dst);
  auto target = Import(*a, a_to_b, *dst_region);
  ASSERT_NE(target, nullptr);
  std::vector<WriteOp> ops;
  for (size_t i = 0; i < 8; ++i) ops.push_back({src.addr(i * 1024), dst.addr(i * 1024), 1024});
  std::stop_source stop;
  stop.request_stop();
  DoneTracker tracker;
  ASSERT_THAT(Write(*a, tracker, *src_region, *target, ops, stop.get_token()), IsOk());
  ASSERT_THAT(Flush(*a, tracker, a_to_b), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(0), StatusIs(StatusCode::kCancelled));
  EXPECT_THAT(tracker.status(1), IsOk());
  EXPECT_TRUE(dst.AllEqual(0));
  EXPECT_TRUE(dst.GuardsIntact());
  EXPECT_EQ(tracker.Violations(), "");
  // The connection is not affected.
  EXPECT_EQ(a->total_failures(), 0);
  ASSERT_THAT(Write(*a, tracker, *src_region, *target, ops), IsOk());
  ASSERT_THAT(Flush(*a, tracker, a_to_b), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(2), IsOk());
  EXPECT_THAT(tracker.status(3), IsOk());
  EXPECT_EQ(std::memcmp(dst.data(), src.data(), 8192), 0);
}

TEST_P(TransportConformanceTest, StopRequestedAfterCompletionReportsOk) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  GuardedBuffer src(4096);
  src.FillPattern(43);
  GuardedBuffer dst(4096, 0);
  auto src_region = Register(*a, src);
  auto dst_region = Register(*b, dst);
  auto target = Import(*a, a_to_b, *dst_region);
  ASSERT_NE(target, nullptr);
  std::stop_source stop;
  DoneTracker tracker;
  const WriteOp ops[] = {{src.addr(), dst.addr(), 4096}};
  ASSERT_THAT(Write(*a, tracker, *src_region, *target, ops, stop.get_token()), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  stop.request_stop();
  EXPECT_THAT(tracker.status(0), IsOk());
  ASSERT_THAT(Flush(*a, tracker, a_to_b), IsOk());  // visibility takes a flush
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_EQ(std::memcmp(dst.data(), src.data(), 4096), 0);
  EXPECT_EQ(tracker.Violations(), "");
}

// A mapped access holds the connection's failure back, on both ends, until
// it is destroyed; the errors of BeginMappedAccess.
TEST_P(TransportConformanceTest, MappedAccessHoldsTheFailureBackUntilItEnds) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  GuardedBuffer src(4096);
  src.FillPattern(47);
  GuardedBuffer dst(4096, 0);
  auto dst_region = Register(*b, dst);
  auto target = Import(*a, a_to_b, *dst_region);
  ASSERT_NE(target, nullptr);
  if (!(*a)->Caps().map_remote) {
    EXPECT_THAT((*a)->BeginMappedAccess(*target), StatusIs(StatusCode::kUnimplemented));
    return;
  }
  EXPECT_THAT((*b)->BeginMappedAccess(*target), StatusIs(StatusCode::kInvalidArgument));
  auto access = (*a)->BeginMappedAccess(*target);
  ASSERT_THAT(access, IsOk());
  std::memcpy(target->mapped_address().ToPointer(), src.data(), 4096);  // the direct path

  (*b)->Disconnect(b_to_a, UnavailableError("gone"));
  EXPECT_THAT((*a)->BeginMappedAccess(*target), StatusIs(StatusCode::kUnavailable));
  // Both ends are free to run callbacks; neither may report the failure yet.
  ASSERT_THAT(a->SendText(a_to_b, "late"), StatusIs(StatusCode::kUnavailable));
  EXPECT_EQ(a->total_failures(), 0);
  EXPECT_EQ(b->total_failures(), 0);
  access->reset();
  ASSERT_TRUE(a->WaitForFailure(a_to_b));
  ASSERT_TRUE(b->WaitForFailure(b_to_a));
  EXPECT_EQ(std::memcmp(dst.data(), src.data(), 4096), 0);

  a->Shutdown();
  EXPECT_THAT((*a)->BeginMappedAccess(*target), StatusIs(StatusCode::kAborted));
}

TEST_P(TransportConformanceTest, DeregistrationWaitsForAMappedAccess) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  if (!(*a)->Caps().map_remote) GTEST_SKIP() << "no mapped access";
  GuardedBuffer dst(4096, 0);
  auto dst_region = Register(*b, dst);
  auto target = Import(*a, a_to_b, *dst_region);
  ASSERT_NE(target, nullptr);
  auto access = (*a)->BeginMappedAccess(*target);
  ASSERT_THAT(access, IsOk());
  std::atomic<bool> access_ended{false};
  std::atomic<bool> ended_before_deregistered{false};
  std::thread owner([&] {
    dst_region.reset();
    ended_before_deregistered = access_ended.load();
  });
  // Still ours to write while the owner's destructor runs.
  std::memset(target->mapped_address().ToPointer(), 0x77, 4096);
  access_ended = true;
  access->reset();
  owner.join();
  EXPECT_TRUE(ended_before_deregistered.load());
  EXPECT_TRUE(dst.AllEqual(0x77));
  EXPECT_THAT((*a)->BeginMappedAccess(*target), StatusIs(StatusCode::kFailedPrecondition));
}

// --- Read (transport.h): the receiver copies the peer's memory into its own --

// `a` reads from `b`: b's region `src` (the source, imported by a) and a's
// region `dst` (the target).
class ReadSetup {
 public:
  ReadSetup(size_t src_bytes, size_t dst_bytes, uint8_t dst_fill = 0)
      : src(src_bytes), dst(dst_bytes, dst_fill) {}
  GuardedBuffer src;
  GuardedBuffer dst;
  std::unique_ptr<LocalRegion> src_region;  // b's
  std::unique_ptr<LocalRegion> dst_region;  // a's
  std::unique_ptr<RemoteRegion> source;     // b's region, imported by a
};

#define KVB_READ_SETUP(setup, a, a_to_b, b)                                         \
  do {                                                                              \
    (setup).src_region = Register(b, (setup).src);                                  \
    (setup).dst_region = Register(a, (setup).dst);                                  \
    ASSERT_NE((setup).src_region, nullptr);                                         \
    ASSERT_NE((setup).dst_region, nullptr);                                         \
    (setup).source = Import(a, a_to_b, *(setup).src_region);                        \
    ASSERT_NE((setup).source, nullptr);                                             \
    if (!CanRead(a, a_to_b, *(setup).source, *(setup).dst_region)) {                \
      GTEST_SKIP() << "this link cannot read peer memory (kUnimplemented checked)"; \
    }                                                                               \
  } while (false)

TEST_P(TransportConformanceTest, ReadCopiesThePeersBytesIntoTheTarget) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  ReadSetup r(4096, 8192);
  r.src.FillPattern(51);
  KVB_READ_SETUP(r, *a, a_to_b, *b);

  DoneTracker tracker;
  const ReadOp ops[] = {{r.src.addr(), r.dst.addr(1000), 4096}};
  ASSERT_THAT(Read(*a, tracker, *r.source, *r.dst_region, ops), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(0), IsOk());
  // Landed when `done` ran: no flush needed for a read.
  EXPECT_EQ(std::memcmp(r.dst.data() + 1000, r.src.data(), 4096), 0);
  for (size_t i = 0; i < r.dst.size(); ++i) {
    if (i < 1000 || i >= 5096) {
      ASSERT_EQ(r.dst.data()[i], 0) << "byte " << i;
    }
  }
  EXPECT_TRUE(r.dst.GuardsIntact());
  EXPECT_TRUE(r.src.GuardsIntact());
  EXPECT_EQ(tracker.Violations(), "");
  EXPECT_EQ(a->total_failures(), 0);
}

TEST_P(TransportConformanceTest, ManyRangesInOneReadLandExactly) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  constexpr size_t kOps = 10000;
  constexpr size_t kOpBytes = 16;
  constexpr size_t kStride = 24;  // 8 untouched bytes between targets
  // Three large ops after the small ones: each several pieces of any grain.
  constexpr size_t kLargeOps = 3;
  constexpr size_t kLargeBytes = (size_t{1} << 20) + 4321;
  const size_t small_area = kOps * kOpBytes;
  ReadSetup r(small_area + kLargeOps * kLargeBytes, kOps * kStride + kLargeOps * kLargeBytes, 0x5A);
  r.src.FillPattern(53);
  KVB_READ_SETUP(r, *a, a_to_b, *b);

  // Source op i goes to target slot perm[i]: scattered, not sequential.
  std::vector<size_t> perm(kOps);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937(5));
  std::vector<ReadOp> ops;
  for (size_t i = 0; i < kOps; ++i) {
    ops.push_back({r.src.addr(i * kOpBytes), r.dst.addr(perm[i] * kStride), kOpBytes});
  }
  for (size_t i = 0; i < kLargeOps; ++i) {
    ops.push_back({r.src.addr(small_area + i * kLargeBytes),
                   r.dst.addr(kOps * kStride + (kLargeOps - 1 - i) * kLargeBytes), kLargeBytes});
  }
  const TransportStats a_before = (*a)->Stats();
  const TransportStats b_before = (*b)->Stats();
  DoneTracker tracker;
  ASSERT_THAT(Read(*a, tracker, *r.source, *r.dst_region, ops), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(0), IsOk());

  for (size_t i = 0; i < kOps; ++i) {
    const uint8_t* slot = r.dst.data() + perm[i] * kStride;
    ASSERT_EQ(std::memcmp(slot, r.src.data() + i * kOpBytes, kOpBytes), 0) << "op " << i;
    for (size_t j = kOpBytes; j < kStride; ++j) ASSERT_EQ(slot[j], 0x5A) << "gap after " << i;
  }
  for (size_t i = 0; i < kLargeOps; ++i) {
    EXPECT_EQ(std::memcmp(r.dst.data() + kOps * kStride + (kLargeOps - 1 - i) * kLargeBytes,
                          r.src.data() + small_area + i * kLargeBytes, kLargeBytes),
              0)
        << "large op " << i;
  }
  EXPECT_TRUE(r.dst.GuardsIntact());
  const TransportStats a_after = (*a)->Stats();
  const TransportStats b_after = (*b)->Stats();
  EXPECT_EQ(a_after.read_ops - a_before.read_ops, kOps + kLargeOps);
  EXPECT_EQ(a_after.read_bytes - a_before.read_bytes, small_area + kLargeOps * kLargeBytes);
  EXPECT_EQ(a_after.write_ops, a_before.write_ops);
  EXPECT_EQ(b_after.read_ops, b_before.read_ops);  // the reader counts, not the peer
  EXPECT_EQ(b_after.write_ops, b_before.write_ops);
  EXPECT_EQ(tracker.Violations(), "");
}

TEST_P(TransportConformanceTest, ReadOpOutsideSourceOrTargetIsRejectedAndNothingRead) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  ReadSetup r(1024, 1024);
  r.src.FillPattern(55);
  KVB_READ_SETUP(r, *a, a_to_b, *b);
  const GuardedBuffer& src = r.src;
  const GuardedBuffer& dst = r.dst;

  const ReadOp good = {src.addr(), dst.addr(), 64};
  const std::vector<std::vector<ReadOp>> bad_batches = {
      {good, {src.addr(1000), dst.addr(), 25}},               // past the source's end
      {good, {src.addr(), dst.addr(1000), 25}},               // past the target's end
      {good, {src.addr() + (-1ull), dst.addr(), 1}},          // before the source (wraps)
      {good, {src.addr(), Addr(dst.addr().value() - 1), 1}},  // before the target
      {good, {src.addr(), dst.addr(), ~0ull}},                // overflowing length
      {{src.addr(1024), dst.addr(), 1}},                      // starts at the end
  };
  DoneTracker tracker;
  for (size_t i = 0; i < bad_batches.size(); ++i) {
    EXPECT_THAT(Read(*a, tracker, *r.source, *r.dst_region, bad_batches[i]),
                StatusIs(StatusCode::kOutOfRange))
        << "batch " << i;
  }
  // Regions swapped: a's own region is no import, b's is not a's.
  const ReadOp one[] = {good};
  EXPECT_THAT(Read(*b, tracker, *r.source, *r.dst_region, one),
              AnyOf(StatusIs(StatusCode::kInvalidArgument), StatusIs(StatusCode::kNotFound)));
  EXPECT_THAT((*a)->Read(*r.source, *r.dst_region, one, TransportDone(), {}),
              StatusIs(StatusCode::kInvalidArgument));
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_TRUE(dst.AllEqual(0));
  EXPECT_TRUE(dst.GuardsIntact());
  EXPECT_EQ(tracker.Violations(), "");
  EXPECT_EQ((*a)->Stats().read_ops, 0u);
  EXPECT_EQ((*a)->Stats().read_bytes, 0u);

  // A zero-byte op at the very end is inside; an empty batch completes OK.
  const ReadOp edge[] = {{src.addr(1024), dst.addr(1024), 0}};
  ASSERT_THAT(Read(*a, tracker, *r.source, *r.dst_region, edge), IsOk());
  ASSERT_THAT(Read(*a, tracker, *r.source, *r.dst_region, {}), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  for (const Status& status : tracker.statuses()) EXPECT_THAT(status, IsOk());
  EXPECT_TRUE(dst.AllEqual(0));
  EXPECT_EQ(tracker.Violations(), "");
}

TEST_P(TransportConformanceTest, StopRequestedBeforeTheReadCopiesNothing) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  ReadSetup r(8192, 8192);
  r.src.FillPattern(57);
  KVB_READ_SETUP(r, *a, a_to_b, *b);
  std::vector<ReadOp> ops;
  for (size_t i = 0; i < 8; ++i) ops.push_back({r.src.addr(i * 1024), r.dst.addr(i * 1024), 1024});
  std::stop_source stop;
  stop.request_stop();
  DoneTracker tracker;
  ASSERT_THAT(Read(*a, tracker, *r.source, *r.dst_region, ops, stop.get_token()), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(0), StatusIs(StatusCode::kCancelled));
  EXPECT_TRUE(r.dst.AllEqual(0));
  EXPECT_EQ((*a)->Stats().read_ops, 0u);
  // The connection is not affected; a stop after completion changes nothing.
  EXPECT_EQ(a->total_failures(), 0);
  std::stop_source late;
  ASSERT_THAT(Read(*a, tracker, *r.source, *r.dst_region, ops, late.get_token()), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  late.request_stop();
  EXPECT_THAT(tracker.status(1), IsOk());
  EXPECT_EQ(std::memcmp(r.dst.data(), r.src.data(), 8192), 0);
  EXPECT_EQ((*a)->Stats().read_ops, 8u);
  EXPECT_EQ(tracker.Violations(), "");
}

// A stop requested while large reads run: each ends OK (it finished first)
// or kCancelled, and the bytes of every one that reported OK are all there.
TEST_P(TransportConformanceTest, StopDuringReadsEndsThemCleanly) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  constexpr size_t kReads = 16;
  constexpr size_t kBytesPerRead = size_t{2} << 20;
  ReadSetup r(kBytesPerRead, kReads * kBytesPerRead);
  r.src.FillPattern(59);
  KVB_READ_SETUP(r, *a, a_to_b, *b);
  std::vector<std::vector<ReadOp>> ops(kReads);
  for (size_t i = 0; i < kReads; ++i) {
    ops[i] = {{r.src.addr(), r.dst.addr(i * kBytesPerRead), kBytesPerRead}};
  }
  std::stop_source stop;
  DoneTracker tracker;
  for (size_t i = 0; i < kReads; ++i) {
    ASSERT_THAT(Read(*a, tracker, *r.source, *r.dst_region, ops[i], stop.get_token()), IsOk());
  }
  stop.request_stop();
  ASSERT_TRUE(tracker.WaitAll());
  size_t cancelled = 0;
  for (size_t i = 0; i < kReads; ++i) {
    const Status status = tracker.status(i);
    if (status.ok()) {
      EXPECT_EQ(std::memcmp(r.dst.data() + i * kBytesPerRead, r.src.data(), kBytesPerRead), 0)
          << "read " << i;
    } else {
      EXPECT_THAT(status, StatusIs(StatusCode::kCancelled)) << "read " << i;
      ++cancelled;
    }
  }
  EXPECT_EQ((*a)->Stats().read_ops, kReads - cancelled);
  EXPECT_TRUE(r.dst.GuardsIntact());
  EXPECT_EQ(tracker.Violations(), "");
  EXPECT_EQ(a->total_failures(), 0);
}

TEST_P(TransportConformanceTest, ReadFromAnUnknownOrDeadPeerIsRefused) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  ReadSetup r(256, 256);
  KVB_READ_SETUP(r, *a, a_to_b, *b);
  constexpr PeerId kUnknown = 987654321;
  RegionInfo info;
  info.address = Addr(0x10000);
  info.size = 64;
  info.remote_key = std::vector<std::byte>(8);
  ForeignRemoteRegion foreign(kUnknown, info);
  DoneTracker tracker;
  const ReadOp unknown_ops[] = {{Addr(0x10000), r.dst.addr(), 64}};
  EXPECT_THAT(Read(*a, tracker, foreign, *r.dst_region, unknown_ops),
              AnyOf(StatusIs(StatusCode::kNotFound), StatusIs(StatusCode::kInvalidArgument)));

  (*b)->Disconnect(b_to_a, UnavailableError("gone"));
  ASSERT_TRUE(a->WaitForFailure(a_to_b));
  const ReadOp ops[] = {{r.src.addr(), r.dst.addr(), 256}};
  EXPECT_THAT(Read(*a, tracker, *r.source, *r.dst_region, ops), StatusIs(StatusCode::kUnavailable));
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_TRUE(r.dst.AllEqual(0));
  EXPECT_EQ(tracker.Violations(), "");
  a->Shutdown();
  EXPECT_THAT(Read(*a, tracker, *r.source, *r.dst_region, ops), StatusIs(StatusCode::kAborted));
  EXPECT_EQ(tracker.Violations(), "");
}

// The fence: the reader's on_peer_failure runs only after every read of
// that peer ended, whichever end closes the connection.
TEST_P(TransportConformanceTest, PeerFailureFollowsTheEndOfEveryRead) {
  for (const bool reader_disconnects : {true, false}) {
    SCOPED_TRACE(reader_disconnects ? "reader disconnects" : "peer disconnects");
    const std::string suffix = std::to_string(reader_disconnects);
    std::atomic<int> reads_ended{0};
    std::atomic<int> ended_at_failure{-1};
    auto a = MakeEndpoint("a" + suffix, /*start=*/false);
    a->on_peer_failure_hook = [&](PeerId, const Status&) { ended_at_failure = reads_ended.load(); };
    ASSERT_THAT(a->Start(), IsOk());
    auto b = MakeEndpoint("b" + suffix);
    auto [a_to_b, b_to_a] = Connect(*a, *b);
    constexpr size_t kReads = 32;
    constexpr size_t kBytesPerRead = size_t{1} << 20;
    ReadSetup r(kBytesPerRead, kReads * kBytesPerRead);
    r.src.FillPattern(61);
    KVB_READ_SETUP(r, *a, a_to_b, *b);
    std::vector<std::vector<ReadOp>> ops(kReads);
    DoneTracker tracker;
    int accepted = 0;
    for (size_t i = 0; i < kReads; ++i) {
      ops[i] = {{r.src.addr(), r.dst.addr(i * kBytesPerRead), kBytesPerRead}};
      InsideCall inside;
      TransportDone counted = [&reads_ended, done = tracker.Make()](Status status) {
        ++reads_ended;
        done(std::move(status));
      };
      ASSERT_THAT((*a)->Read(*r.source, *r.dst_region, ops[i], std::move(counted), {}), IsOk());
      ++accepted;
    }
    if (reader_disconnects) {
      (*a)->Disconnect(a_to_b, UnavailableError("test disconnect"));
    } else {
      (*b)->Disconnect(b_to_a, UnavailableError("test disconnect"));
    }
    ASSERT_TRUE(a->WaitForFailure(a_to_b));
    ASSERT_TRUE(b->WaitForFailure(b_to_a));
    EXPECT_EQ(ended_at_failure.load(), accepted);
    ASSERT_TRUE(tracker.WaitAll(0ms));
    for (size_t i = 0; i < kReads; ++i) {
      const Status status = tracker.status(i);
      if (status.ok()) {
        EXPECT_EQ(std::memcmp(r.dst.data() + i * kBytesPerRead, r.src.data(), kBytesPerRead), 0);
      } else {
        EXPECT_THAT(status, StatusIs(StatusCode::kUnavailable)) << "read " << i;
      }
    }
    EXPECT_EQ(tracker.Violations(), "");
    EXPECT_EQ(a->failures(a_to_b), 1);
  }
}

// Shutdown ends the reads in progress and fails the queued ones; every
// `done` ran once before it returned.
TEST_P(TransportConformanceTest, ShutdownEndsReadsInProgress) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  constexpr size_t kReads = 32;
  constexpr size_t kBytesPerRead = size_t{1} << 20;
  ReadSetup r(kBytesPerRead, kReads * kBytesPerRead);
  r.src.FillPattern(63);
  KVB_READ_SETUP(r, *a, a_to_b, *b);
  std::vector<std::vector<ReadOp>> ops(kReads);
  DoneTracker tracker;
  for (size_t i = 0; i < kReads; ++i) {
    ops[i] = {{r.src.addr(), r.dst.addr(i * kBytesPerRead), kBytesPerRead}};
    ASSERT_THAT(Read(*a, tracker, *r.source, *r.dst_region, ops[i]), IsOk());
  }
  a->Shutdown();
  tracker.Seal();
  EXPECT_TRUE(tracker.WaitAll(0ms));
  EXPECT_EQ(tracker.Violations(), "");
  for (const Status& status : tracker.statuses()) {
    EXPECT_THAT(status,
                AnyOf(IsOk(), StatusIs(StatusCode::kAborted), StatusIs(StatusCode::kUnavailable)));
  }
  ASSERT_TRUE(b->WaitForFailure(b_to_a));
  EXPECT_EQ(a->callbacks_after_shutdown(), 0);
}

// Documented outcome where the owner's deregistration fences reads too:
// kFailedPrecondition, from Read or from its `done`, nothing copied.
TEST_P(TransportConformanceTest, ReadFromADeregisteredRegionFails) {
  if (!GetParam().detects_deregistered_source) GTEST_SKIP() << "not detected by this transport";
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  auto [a_to_b, b_to_a] = Connect(*a, *b);
  ReadSetup r(256, 256);
  r.src.FillPattern(65);
  KVB_READ_SETUP(r, *a, a_to_b, *b);
  r.src_region.reset();  // deregistered by its owner
  DoneTracker tracker;
  const ReadOp ops[] = {{r.src.addr(), r.dst.addr(), 256}};
  Status status = Read(*a, tracker, *r.source, *r.dst_region, ops);
  if (status.ok()) {
    ASSERT_TRUE(tracker.WaitAll());
    status = tracker.status(0);
  }
  EXPECT_THAT(status, StatusIs(StatusCode::kFailedPrecondition));
  EXPECT_TRUE(r.dst.AllEqual(0));
  EXPECT_EQ(tracker.Violations(), "");
}

// Many threads read while the peer writes into the reader and both send.
// Runs under ThreadSanitizer in CI.
TEST_P(TransportConformanceTest, ConcurrentReadsFromManyThreads) {
  auto a = MakeEndpoint("a");
  auto b = MakeEndpoint("b");
  const std::pair<PeerId, PeerId> peers = Connect(*a, *b);
  const PeerId a_to_b = peers.first;
  const PeerId b_to_a = peers.second;
  constexpr int kThreads = 4;
  constexpr int kRounds = 25;
  constexpr size_t kOpsPerRead = 32;
  constexpr size_t kOpBytes = 64;
  constexpr size_t kPerThread = kRounds * kOpsPerRead * kOpBytes;
  ReadSetup r(kThreads * kPerThread, kThreads * kPerThread);
  r.src.FillPattern(67);
  KVB_READ_SETUP(r, *a, a_to_b, *b);
  // b writes into a region of a's meanwhile, each write into its own part
  // (writes may run on several threads).
  constexpr size_t kWriteBytes = 256;
  GuardedBuffer b_src(kRounds * kWriteBytes);
  b_src.FillPattern(68);
  GuardedBuffer a_dst(kRounds * kWriteBytes);
  auto b_src_region = Register(*b, b_src);
  auto a_dst_region = Register(*a, a_dst);
  auto b_target = Import(*b, b_to_a, *a_dst_region);
  ASSERT_NE(b_target, nullptr);

  std::vector<std::vector<ReadOp>> ops(kThreads * kRounds);
  for (int t = 0; t < kThreads; ++t) {
    for (int round = 0; round < kRounds; ++round) {
      auto& list = ops[t * kRounds + round];
      for (size_t i = 0; i < kOpsPerRead; ++i) {
        const uint64_t offset = t * kPerThread + (round * kOpsPerRead + i) * kOpBytes;
        list.push_back({r.src.addr(offset), r.dst.addr(offset), kOpBytes});
      }
    }
  }
  std::vector<WriteOp> write_ops;
  for (int round = 0; round < kRounds; ++round) {
    write_ops.push_back(
        {b_src.addr(round * kWriteBytes), a_dst.addr(round * kWriteBytes), kWriteBytes});
  }
  DoneTracker tracker;
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < kRounds; ++round) {
        if (!Read(*a, tracker, *r.source, *r.dst_region, ops[t * kRounds + round]).ok()) ++errors;
        if (!a->SendText(a_to_b, std::to_string(t)).ok()) ++errors;
        (void)(*a)->Stats();
      }
    });
  }
  threads.emplace_back([&] {
    for (int round = 0; round < kRounds; ++round) {
      if (!Write(*b, tracker, *b_src_region, *b_target, {&write_ops[round], 1}).ok()) ++errors;
      if (!b->SendText(b_to_a, std::to_string(round)).ok()) ++errors;
    }
  });
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(errors.load(), 0);
  ASSERT_THAT(Flush(*b, tracker, b_to_a), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  for (const Status& status : tracker.statuses()) ASSERT_THAT(status, IsOk());
  EXPECT_EQ(std::memcmp(r.dst.data(), r.src.data(), r.dst.size()), 0);
  EXPECT_EQ(std::memcmp(a_dst.data(), b_src.data(), a_dst.size()), 0);
  EXPECT_EQ((*a)->Stats().read_ops, static_cast<uint64_t>(kThreads * kRounds * kOpsPerRead));
  EXPECT_EQ(tracker.Violations(), "");
}

#undef KVB_READ_SETUP

std::vector<TransportFactory> AllFactories() {
  std::vector<TransportFactory> factories = {LoopbackFactory(), LoopbackPollingFactory(),
                                             LoopbackOnLoopFactory(), FaultLoopbackFactory()};
#if defined(KVBOUNCE_HAVE_UCX)
  factories.push_back(UcxTcpFactory());
  factories.push_back(UcxSharedMemoryFactory());
  factories.push_back(UcxTcpRailsFactory());
  factories.push_back(UcxSharedMemoryPollingFactory());
  factories.push_back(UcxSharedMemoryOnLoopFactory());
#endif
  return factories;
}

INSTANTIATE_TEST_SUITE_P(Transports, TransportConformanceTest, ::testing::ValuesIn(AllFactories()),
                         [](const ::testing::TestParamInfo<TransportFactory>& param_info) {
                           return param_info.param.name;
                         });

}  // namespace
}  // namespace kvbounce::transport_test
