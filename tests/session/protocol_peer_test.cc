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
  // A writer of `spec` with a pool of `num_blocks` blocks.
  explicit FakeWriter(std::shared_ptr<LoopbackFabric> fabric, InstanceSpec spec = Spec(),
                      int num_blocks = 2)
      : transport_(*LoopbackTransport::Create(std::move(fabric), "fake-ctx")),
        spec_(spec),
        num_blocks_(num_blocks),
        memory_(static_cast<size_t>(num_blocks) * BlockBytes(spec) + 4096, std::byte{0}) {
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
  void Connect(const std::string& address, uint32_t model_layers = 0) {
    if (model_layers == 0) model_layers = static_cast<uint32_t>(spec_.model.num_layers);
    peer_ = *transport_->Connect(address);
    const Topology topology = *Topology::Create(spec_);
    const PoolLayout pool =
        *PoolLayout::ForRank(topology, 0, num_blocks_, Addr::FromPointer(memory_.data()));
    protocol::Hello h;
    h.instance_id = "ctx0";
    h.role = protocol::Role::kCtx;
    h.placement = {0, 1, 0, 1, {model_layers}};
    h.model = {model_layers, static_cast<uint32_t>(spec_.model.num_kv_heads),
               static_cast<uint32_t>(spec_.model.head_dim), 2, 2};
    h.layout = {protocol::LayoutKind::kBlockMajorHnd,
                static_cast<uint32_t>(spec_.tokens_per_block),
                static_cast<uint32_t>(num_blocks_),
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
  static size_t BlockBytes(const InstanceSpec& spec) {
    return static_cast<size_t>(spec.model.num_layers) * 2 * spec.model.num_kv_heads *
           spec.model.head_dim * 2 * spec.tokens_per_block;
  }

  std::unique_ptr<LoopbackTransport> transport_;
  InstanceSpec spec_;
  int num_blocks_ = 2;
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

// A streamed bounce against the hand-driven writer: 2 layers x 2 kv x 2
// heads x 64 x bf16 = 1 KiB a token, blocks of 256 tokens; a pull of 1536
// tokens (1.5 MiB) through a recv arena of 1 MiB, in chunks of 1 MiB: chunk
// 0 of 1 MiB, chunk 1 of 512 KiB, one slot at a time.
InstanceSpec StreamSpec() {
  InstanceSpec spec;
  spec.model = *CustomModel(2, 2, 64, false);
  spec.layout = LayoutKind::kBlockMajorHnd;
  spec.tokens_per_block = 256;
  return spec;
}

class ProtocolPeerStreamTest : public ::testing::Test {
 protected:
  static constexpr uint64_t kStream = MiB(1) + KiB(512);

  void SetUp() override {
    fabric_ = LoopbackFabric::Create();
    pool_.assign(8 * KiB(256), std::byte{0});
    AgentOptions o;
    o.instance_id = "gen0";
    o.role = Role::kGen;
    o.instance = StreamSpec();
    o.pool.bases = {Addr::FromPointer(pool_.data())};
    o.pool.num_blocks = 8;
    o.config.bounce_size_mb = 1;
    o.config.bounce_chunk_mb = 1;
    o.transport = *LoopbackTransport::Create(fabric_, "gen0-0");
    o.grace = milliseconds(50);
    AgentHooks hooks;
    hooks.clock = clock_;
    gen_ = *CreateAgent(std::move(o), std::move(hooks));
    writer_ = std::make_unique<FakeWriter>(fabric_, StreamSpec(), 8);
    writer_->Connect(gen_->Address());
    ASSERT_TRUE(std::holds_alternative<protocol::Hello>(writer_->Next()));
  }

  // Starts the pull; returns it with its KV_REQUEST and the first KV_GRANT.
  struct Started {
    std::shared_ptr<Transfer> pull;
    protocol::KvRequest request;
    protocol::KvGrant grant;
  };
  Started Start(uint64_t id) {
    Started s;
    PullOptions p;
    p.path = TransferPath::kBounce;
    p.timeout = milliseconds(3000);
    auto pull = gen_->Pull(id, "ctx0", std::vector<int32_t>{2, 7, 0, 5, 1, 3}, {0, 1536}, p);
    EXPECT_THAT(pull, IsOk());
    if (pull.ok()) s.pull = *pull;
    protocol::Message m = writer_->Next();
    EXPECT_TRUE(std::holds_alternative<protocol::KvRequest>(m));
    if (std::holds_alternative<protocol::KvRequest>(m))
      s.request = std::get<protocol::KvRequest>(m);
    m = writer_->Next();
    EXPECT_TRUE(std::holds_alternative<protocol::KvGrant>(m));
    if (std::holds_alternative<protocol::KvGrant>(m)) s.grant = std::get<protocol::KvGrant>(m);
    return s;
  }

  static protocol::KvChunk Chunk(const protocol::KvRequest& req, uint64_t chunk, uint64_t bytes) {
    return protocol::KvChunk{req.request_id, req.slice_id, req.writer_rank, chunk, bytes};
  }

  std::shared_ptr<ManualClock> clock_ = std::make_shared<ManualClock>();
  std::shared_ptr<LoopbackFabric> fabric_;
  std::vector<std::byte> pool_;
  std::unique_ptr<Agent> gen_;
  std::unique_ptr<FakeWriter> writer_;
};

TEST_F(ProtocolPeerStreamTest, ChunksAreGrantedOneSlotAtATimeAndTheResultSettles) {
  Started s = Start(1);
  EXPECT_EQ(s.request.path, protocol::TransferPath::kBounce);
  EXPECT_EQ(s.request.chunk_bytes, MiB(1));
  EXPECT_EQ(s.request.recv_slot_addr, 0u);
  EXPECT_EQ(s.request.recv_slot_size, 0u);
  EXPECT_EQ(s.grant.request_id, 1u);
  EXPECT_EQ(s.grant.chunk, 0u);
  EXPECT_EQ(s.grant.slot_size, MiB(1));
  // The arena holds one chunk: the second is granted once the first was
  // announced and scattered.
  writer_->Send(Chunk(s.request, 0, MiB(1)));
  protocol::Message m = writer_->Next();
  ASSERT_TRUE(std::holds_alternative<protocol::KvGrant>(m));
  const auto& second = std::get<protocol::KvGrant>(m);
  EXPECT_EQ(second.chunk, 1u);
  EXPECT_EQ(second.slot_size, KiB(512));
  writer_->Send(Chunk(s.request, 1, KiB(512)));
  writer_->Send(protocol::KvResult{1, s.request.slice_id, 0, protocol::ResultStatus::kSuccess, 0,
                                   kStream, s.request.plan_fingerprint, ""});
  EXPECT_THAT(s.pull->Wait(), IsOk());
  EXPECT_EQ(s.pull->info().bytes, kStream);
  EXPECT_EQ(gen_->Stats().chunks_granted, 2u);
  EXPECT_EQ(gen_->Stats().chunks_scattered, 2u);
  EXPECT_EQ(gen_->Stats().arena_outstanding_bytes, 0u);
}

TEST_F(ProtocolPeerStreamTest, AChunkThatWasNotGrantedFailsTheWriter) {
  Started s = Start(2);
  writer_->Send(Chunk(s.request, 1, KiB(512)));
  EXPECT_THAT(s.pull->Wait(), StatusIs(StatusCode::kDataLoss, HasSubstr("did not grant")));
  // The writer is terminal: its granted slot is free again.
  EXPECT_TRUE(WaitUntil([&] { return gen_->Stats().arena_outstanding_bytes == 0; }));
}

TEST_F(ProtocolPeerStreamTest, AChunkOfTheWrongSizeFailsTheWriter) {
  Started s = Start(3);
  writer_->Send(Chunk(s.request, 0, 1000));
  EXPECT_THAT(s.pull->Wait(), StatusIs(StatusCode::kDataLoss, HasSubstr("of 1000 bytes")));
  EXPECT_TRUE(WaitUntil([&] { return gen_->Stats().arena_outstanding_bytes == 0; }));
}

TEST_F(ProtocolPeerStreamTest, SuccessBeforeEveryChunkWasAnnouncedFailsTheTransfer) {
  Started s = Start(4);
  writer_->Send(protocol::KvResult{4, s.request.slice_id, 0, protocol::ResultStatus::kSuccess, 0,
                                   kStream, s.request.plan_fingerprint, ""});
  EXPECT_THAT(s.pull->Wait(), StatusIs(StatusCode::kDataLoss, HasSubstr("not announced")));
  EXPECT_TRUE(WaitUntil([&] { return gen_->Stats().arena_outstanding_bytes == 0; }));
}

TEST_F(ProtocolPeerStreamTest, ACancelMidStreamKeepsTheGrantedSlotUntilTheWriterAnswers) {
  Started s = Start(5);
  s.pull->Cancel();
  EXPECT_THAT(s.pull->Wait(), StatusIs(StatusCode::kCancelled));
  protocol::Message m = writer_->Next();
  ASSERT_TRUE(std::holds_alternative<protocol::Cancel>(m));
  // The writer may still write chunk 0's slot: quarantined until it answers.
  EXPECT_EQ(gen_->Stats().arena_quarantined_bytes, MiB(1));
  protocol::KvResult cancelled{
      5, s.request.slice_id,         0,          protocol::ResultStatus::kCancelled, 5,
      0, s.request.plan_fingerprint, "cancelled"};
  writer_->Send(cancelled);
  EXPECT_TRUE(WaitUntil([&] { return gen_->Stats().arena_outstanding_bytes == 0; }));
  EXPECT_EQ(gen_->Stats().arena_quarantined_bytes, 0u);
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
