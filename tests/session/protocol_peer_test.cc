// The receiver against a hand-driven writer speaking the wire protocol: what
// it does with results it must not trust (wrong fingerprint, wrong byte
// count, unknown writer, duplicates), with malformed frames and with an
// incompatible peer.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "common/clock.h"
#include "common/status_matchers.h"
#include "kvbounce/agent.h"
#include "session/agent_internal.h"
#include "layout/pool_layout.h"
#include "protocol/codec.h"
#include "transport/loopback/loopback_transport.h"

namespace kvbounce {
namespace {

using std::chrono::milliseconds;
using ::testing::HasSubstr;
using testing_util::IsOk;
using testing_util::StatusIs;

// Polls `pred` until it holds (30 s at most): for something that must
// happen, not a pause.
template <typename Pred>
bool WaitUntil(Pred pred) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!pred()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(milliseconds(1));
  }
  return true;
}

InstanceSpec Spec() {
  InstanceSpec spec;
  spec.model = *CustomModel(2, 2, 8, false);
  spec.layout = LayoutKind::kBlockMajorHnd;
  spec.tokens_per_block = 4;
  return spec;
}

// A ctx rank played by the test: it speaks HELLO and answers KV_REQUESTs
// however the test says.
class FakeWriter {
 public:
  explicit FakeWriter(std::shared_ptr<LoopbackFabric> fabric)
      : transport_(*LoopbackTransport::Create(std::move(fabric), "fake-ctx")),
        memory_(4096, std::byte{0}) {
    TransportCallbacks callbacks;
    callbacks.on_message = [this](PeerId, std::vector<std::byte> frame) {
      std::lock_guard<std::mutex> lock(mu_);
      frames_.push_back(std::move(frame));
      cv_.notify_all();
    };
    callbacks.on_peer_failure = [this](PeerId, const Status&) {
      std::lock_guard<std::mutex> lock(mu_);
      disconnected_ = true;
      cv_.notify_all();
    };
    EXPECT_THAT(transport_->Start(callbacks), IsOk());
    region_ =
        *transport_->Register(Addr::FromPointer(memory_.data()), memory_.size(), MemoryKind::kHost);
  }

  // Connects and exchanges HELLO; `model_layers` lets a test lie about the model.
  void Connect(const std::string& address, uint32_t model_layers = 2) {
    peer_ = *transport_->Connect(address);
    const Topology topology = *Topology::Create(Spec());
    const PoolLayout pool = *PoolLayout::ForRank(topology, 0, 2, Addr::FromPointer(memory_.data()));
    protocol::Hello h;
    h.instance_id = "ctx0";
    h.role = protocol::Role::kCtx;
    h.placement = {0, 1, 0, 1, {model_layers}};
    h.model = {model_layers, 2, 8, 2, 2};
    h.layout = {protocol::LayoutKind::kBlockMajorHnd,
                4,
                2,
                pool.layer_base(0).value(),
                pool.layer_stride(),
                pool.kv_stride(),
                pool.block_stride(),
                pool.head_stride(),
                pool.token_stride(),
                {}};
    const RegionInfo& info = region_->info();
    h.regions.push_back({protocol::RegionKind::kPool, protocol::MemoryKind::kHost,
                         protocol::kNoDevice, info.address.value(), info.size, info.remote_key});
    Send(h);
  }

  void Send(const protocol::Message& m) {
    ASSERT_THAT(transport_->Send(peer_, *protocol::EncodeFrame(m)), IsOk());
  }
  // Sets every byte of the writer's pool (its two blocks) to `value`.
  void Fill(std::byte value) { std::fill(memory_.begin(), memory_.end(), value); }
  void SendRaw(std::vector<std::byte> bytes) {
    ASSERT_THAT(transport_->Send(peer_, bytes), IsOk());
  }

  // The next frame, decoded.
  protocol::Message Next() {
    std::unique_lock<std::mutex> lock(mu_);
    EXPECT_TRUE(cv_.wait_for(lock, milliseconds(30000), [&] { return !frames_.empty(); }));
    if (frames_.empty()) return protocol::Bye{};
    std::vector<std::byte> frame = std::move(frames_.front());
    frames_.pop_front();
    return *protocol::DecodeFrame(frame);
  }
  bool WaitDisconnected() {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, milliseconds(30000), [&] { return disconnected_; });
  }

  ~FakeWriter() {
    region_.reset();
    transport_->Shutdown();
  }

 private:
  std::unique_ptr<LoopbackTransport> transport_;
  std::vector<std::byte> memory_;
  std::unique_ptr<LocalRegion> region_;
  PeerId peer_ = 0;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::vector<std::byte>> frames_;
  bool disconnected_ = false;
};

class ProtocolPeerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    fabric_ = LoopbackFabric::Create();
    pool_.assign(8 * 2 * 2 * 2 * 4 * 16, std::byte{0});
    AgentOptions o;
    o.instance_id = "gen0";
    o.role = Role::kGen;
    o.instance = Spec();
    o.pool.bases = {Addr::FromPointer(pool_.data())};
    o.pool.num_blocks = 8;
    o.config.bounce_size_mb = 1;
    o.transport = *LoopbackTransport::Create(fabric_, "gen0-0", gen_loopback_);
    o.grace = milliseconds(50);
    // The receiver's deadlines run on a clock nobody advances: a slow run
    // never times a pull out.
    AgentHooks hooks;
    hooks.clock = clock_;
    gen_ = *CreateAgent(std::move(o), std::move(hooks));
    writer_ = std::make_unique<FakeWriter>(fabric_);
    writer_->Connect(gen_->Address());
    ASSERT_TRUE(std::holds_alternative<protocol::Hello>(writer_->Next()));
  }

  // Starts a pull and returns it with the KV_REQUEST the writer received.
  std::pair<std::shared_ptr<Transfer>, protocol::KvRequest> StartPull(
      uint64_t id, TransferPath path = TransferPath::kPerBlock) {
    PullOptions p;
    p.path = path;
    p.timeout = milliseconds(3000);
    auto pull = gen_->Pull(id, "ctx0", std::vector<int32_t>{3, 5}, {0, 8}, p);
    EXPECT_THAT(pull, IsOk());
    protocol::Message m = writer_->Next();
    EXPECT_TRUE(std::holds_alternative<protocol::KvRequest>(m));
    return {*pull, std::get<protocol::KvRequest>(m)};
  }

  static protocol::KvResult Success(const protocol::KvRequest& req, uint64_t bytes) {
    return protocol::KvResult{req.request_id,
                              req.slice_id,
                              req.writer_rank,
                              protocol::ResultStatus::kSuccess,
                              0,
                              bytes,
                              req.plan_fingerprint,
                              ""};
  }

  static constexpr uint64_t kBytes = 2 * 2 * 2 * 8 * 16;  // layers x kv x heads x tokens x row

  LoopbackOptions gen_loopback_;
  std::shared_ptr<ManualClock> clock_ = std::make_shared<ManualClock>();
  std::shared_ptr<LoopbackFabric> fabric_;
  std::vector<std::byte> pool_;
  std::unique_ptr<Agent> gen_;
  std::unique_ptr<FakeWriter> writer_;
};

TEST_F(ProtocolPeerTest, KvRequestCarriesWhatTheWriterNeeds) {
  auto [pull, req] = StartPull(1);
  EXPECT_EQ(req.request_id, 1u);
  EXPECT_EQ(req.token_start, 0u);
  EXPECT_EQ(req.token_end, 8u);
  EXPECT_EQ(req.block_table, (std::vector<uint32_t>{3, 5}));
  EXPECT_EQ(req.path, protocol::TransferPath::kPerBlock);
  EXPECT_EQ(req.writer_rank, 0u);
  EXPECT_EQ(req.deadline_ms, 3000u);  // the clock stands still
  writer_->Send(Success(req, kBytes));
  EXPECT_THAT(pull->Wait(), IsOk());
  EXPECT_EQ(pull->info().bytes, kBytes);
}

TEST_F(ProtocolPeerTest, WrongFingerprintFailsTheTransfer) {
  auto [pull, req] = StartPull(2);
  protocol::KvResult result = Success(req, kBytes);
  result.plan_fingerprint ^= 1;
  writer_->Send(result);
  EXPECT_THAT(pull->Wait(), StatusIs(StatusCode::kDataLoss, HasSubstr("plan fingerprint")));
  EXPECT_EQ(gen_->Stats().rejected_results, 1u);
}

TEST_F(ProtocolPeerTest, WrongByteCountFailsTheTransfer) {
  auto [pull, req] = StartPull(3);
  writer_->Send(Success(req, kBytes - 1));
  EXPECT_THAT(pull->Wait(), StatusIs(StatusCode::kDataLoss, HasSubstr("bytes written")));
}

TEST_F(ProtocolPeerTest, UnknownWritersAndDuplicatesAreNotCounted) {
  auto [pull, req] = StartPull(4);
  int settled = 0;
  pull->OnDone([&](const Status&) { ++settled; });
  protocol::KvResult stranger = Success(req, kBytes);
  stranger.writer_rank = 7;
  writer_->Send(stranger);  // not a writer of this request: rejected
  protocol::KvResult unknown = Success(req, kBytes);
  unknown.request_id = 999;
  writer_->Send(unknown);  // no such request: rejected
  // Both were handled (and counted) on the control thread; neither settled
  // the request, which a result it accepted would have done there and then.
  ASSERT_TRUE(WaitUntil([&] { return gen_->Stats().rejected_results == 2; }));
  EXPECT_FALSE(pull->Poll().has_value());
  writer_->Send(Success(req, kBytes));
  writer_->Send(Success(req, kBytes));  // a duplicate counts once
  EXPECT_THAT(pull->Wait(), IsOk());
  EXPECT_EQ(gen_->Stats().rejected_results, 2u);
  // The duplicate may land after completion (the request is gone by then):
  // either way it changes nothing.
  EXPECT_EQ(settled, 1);
  EXPECT_EQ(gen_->Stats().requests_completed, 1u);
}

TEST_F(ProtocolPeerTest, WriterFailureReasonReachesTheApplication) {
  auto [pull, req] = StartPull(5);
  protocol::KvResult failed = Success(req, 0);
  failed.status = protocol::ResultStatus::kFailed;
  failed.error_code = 7;  // UNAVAILABLE
  failed.error_text = "the pool was evicted";
  writer_->Send(failed);
  EXPECT_THAT(pull->Wait(), StatusIs(StatusCode::kUnavailable, HasSubstr("the pool was evicted")));
}

TEST_F(ProtocolPeerTest, WriterRefusalKeepsItsCode) {
  // A refusal is not a retryable failure: the writer's code reaches the
  // application unchanged.
  auto [pull, req] = StartPull(15);
  protocol::KvResult refused = Success(req, 0);
  refused.status = protocol::ResultStatus::kFailed;
  refused.error_code = 2;  // OUT_OF_RANGE
  refused.error_text = "tokens [0, 8) asked, but request 15 was published with 4 tokens";
  writer_->Send(refused);
  EXPECT_THAT(pull->Wait(),
              StatusIs(StatusCode::kOutOfRange, HasSubstr("published with 4 tokens")));
}

TEST_F(ProtocolPeerTest, MalformedFrameEndsTheConnection) {
  auto [pull, req] = StartPull(6);
  std::vector<std::byte> garbage(20, std::byte{0x5a});
  writer_->SendRaw(garbage);
  protocol::Message m = writer_->Next();
  ASSERT_TRUE(std::holds_alternative<protocol::Bye>(m));
  EXPECT_EQ(std::get<protocol::Bye>(m).reason, protocol::ByeReason::kProtocolError);
  EXPECT_TRUE(writer_->WaitDisconnected());
  EXPECT_THAT(pull->Wait(), StatusIs(StatusCode::kUnavailable));
  EXPECT_EQ(gen_->Stats().arena_outstanding_bytes, 0u);
}

TEST_F(ProtocolPeerTest, KvReadyForAWritePathFailsTheWriterAndEndsTheLoan) {
  auto [pull, req] = StartPull(16);
  writer_->Send(protocol::KvReady{req.request_id, req.slice_id, req.writer_rank,
                                  req.plan_fingerprint, {0, 1}});
  EXPECT_THAT(pull->Wait(), StatusIs(StatusCode::kDataLoss, HasSubstr("lent its blocks")));
  protocol::Message m = writer_->Next();
  ASSERT_TRUE(std::holds_alternative<protocol::Cancel>(m));
  EXPECT_EQ(std::get<protocol::Cancel>(m).request_id, 16u);
}

// The gen agent's transport cannot map the writer's pool but can read it:
// `direct` is DIRECT_READ, and the fake writer plays its side by hand.
class ProtocolPeerReadTest : public ProtocolPeerTest {
 protected:
  void SetUp() override {
    gen_loopback_.map_remote = false;
    ProtocolPeerTest::SetUp();
  }

  std::pair<std::shared_ptr<Transfer>, protocol::KvRequest> StartDirectPull(uint64_t id) {
    return StartPull(id, TransferPath::kDirect);
  }

  static protocol::KvReady Ready(const protocol::KvRequest& req) {
    return protocol::KvReady{req.request_id, req.slice_id, req.writer_rank,
                             req.plan_fingerprint, {0, 1}};
  }

  // Bytes of gen block `b` (block-major: 512 bytes a block) equal to `value`.
  size_t BlockBytesEqual(int b, std::byte value) const {
    constexpr size_t kBlock = kBytes / 2;
    return static_cast<size_t>(std::count(pool_.begin() + b * kBlock,
                                          pool_.begin() + (b + 1) * kBlock, value));
  }
};

TEST_F(ProtocolPeerReadTest, TheReceiverReadsTheLentBlocksThenAwaitsTheVerdict) {
  writer_->Fill(std::byte{0x3c});
  auto [pull, req] = StartDirectPull(21);
  EXPECT_EQ(req.path, protocol::TransferPath::kDirectRead);
  writer_->Send(Ready(req));
  protocol::Message m = writer_->Next();
  ASSERT_TRUE(std::holds_alternative<protocol::KvReadDone>(m));
  const auto& done = std::get<protocol::KvReadDone>(m);
  EXPECT_EQ(done.request_id, 21u);
  EXPECT_EQ(done.status, protocol::ResultStatus::kSuccess);
  EXPECT_EQ(done.bytes_read, kBytes);
  // The bytes are in blocks 3 and 5, and nowhere else; the pull waits for
  // the writer to say its loan held.
  EXPECT_EQ(BlockBytesEqual(3, std::byte{0x3c}), kBytes / 2);
  EXPECT_EQ(BlockBytesEqual(5, std::byte{0x3c}), kBytes / 2);
  EXPECT_EQ(BlockBytesEqual(4, std::byte{0}), kBytes / 2);
  EXPECT_FALSE(pull->Poll().has_value());
  writer_->Send(Success(req, kBytes));
  EXPECT_THAT(pull->Wait(), IsOk());
}

TEST_F(ProtocolPeerReadTest, ALoanTheWriterEndedFailsThePull) {
  auto [pull, req] = StartDirectPull(22);
  writer_->Send(Ready(req));
  ASSERT_TRUE(std::holds_alternative<protocol::KvReadDone>(writer_->Next()));
  protocol::KvResult cancelled = Success(req, 0);
  cancelled.status = protocol::ResultStatus::kCancelled;
  cancelled.error_code = 5;  // CANCELLED
  cancelled.error_text = "publication settled before the job reported";
  writer_->Send(cancelled);
  EXPECT_THAT(pull->Wait(), StatusIs(StatusCode::kCancelled, HasSubstr("publication settled")));
}

TEST_F(ProtocolPeerReadTest, SuccessBeforeTheReadIsRefused) {
  auto [pull, req] = StartDirectPull(23);
  writer_->Send(Success(req, kBytes));
  EXPECT_THAT(pull->Wait(),
              StatusIs(StatusCode::kDataLoss, HasSubstr("before this rank read its blocks")));
}

TEST_F(ProtocolPeerReadTest, ALentBlockOutsideThePoolFailsTheWriter) {
  auto [pull, req] = StartDirectPull(24);
  protocol::KvReady ready = Ready(req);
  ready.block_table = {0, 9};  // the writer's pool has 2 blocks
  writer_->Send(ready);
  EXPECT_FALSE(pull->Wait().ok());
  // Nothing was read into the pool, and the writer was told to end its loan.
  EXPECT_EQ(BlockBytesEqual(3, std::byte{0}), kBytes / 2);
  protocol::Message m = writer_->Next();
  EXPECT_TRUE(std::holds_alternative<protocol::Cancel>(m));
}

TEST(ProtocolPeerHelloTest, IncompatiblePeerIsRefusedWithAReason) {
  auto fabric = LoopbackFabric::Create();
  std::vector<std::byte> pool(8 * 2 * 2 * 2 * 4 * 16);
  AgentOptions o;
  o.instance_id = "gen0";
  o.role = Role::kGen;
  o.instance = Spec();
  o.pool.bases = {Addr::FromPointer(pool.data())};
  o.pool.num_blocks = 8;
  o.transport = *LoopbackTransport::Create(fabric, "gen0-0");
  auto gen = *Agent::Create(std::move(o));
  FakeWriter writer(fabric);
  writer.Connect(gen->Address(), /*model_layers=*/3);
  protocol::Message m = writer.Next();
  ASSERT_TRUE(std::holds_alternative<protocol::Bye>(m));
  EXPECT_EQ(std::get<protocol::Bye>(m).reason, protocol::ByeReason::kIncompatible);
  EXPECT_THAT(std::get<protocol::Bye>(m).message, HasSubstr("another model"));
  EXPECT_THAT(gen->Pull(1, "ctx0", std::vector<int32_t>{0, 1}, {0, 8}),
              StatusIs(StatusCode::kNotFound));
}

}  // namespace
}  // namespace kvbounce
