// Agents over the UCX transport, each with its own UCX endpoint (the wire
// is the one processes use): bad input across the connection — a peer of
// another model, malformed control frames from a raw test peer — and a
// writer lost mid-transfer. In each case the error is clear and the agent
// keeps serving its other peers.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <variant>
#include <vector>

#include "common/status_matchers.h"
#include "kvbounce/agent.h"
#include "kvbounce/transports.h"
#include "protocol/codec.h"
#include "protocol/messages.h"
#include "transport/fault/fault_transport.h"

namespace kvbounce {
namespace {

using ::kvbounce::testing_util::IsOk;
using ::kvbounce::testing_util::StatusIs;
using ::testing::AnyOf;
using ::testing::HasSubstr;
using std::chrono::milliseconds;

class UcxAgentTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!UcxTransportAvailable()) GTEST_SKIP() << "this build has no UCX transport";
  }

  // A rank of CustomModel(2, kv_heads, 8): tp 1, block-major, 32 tokens per
  // block, 16 blocks; UCX over TCP (error handling on every endpoint).
  struct Rank {
    std::vector<std::byte> pool;
    std::unique_ptr<Agent> agent;
  };
  static constexpr int kBlocks = 16;
  static uint64_t BlockBytes(int kv_heads) { return uint64_t{2} * 2 * kv_heads * 32 * 8 * 2; }

  static Result<Rank> MakeRank(Role role, const std::string& instance, int kv_heads = 2,
                               std::unique_ptr<Transport> transport = nullptr) {
    Rank rank;
    rank.pool.assign(kBlocks * BlockBytes(kv_heads), std::byte{0});
    if (role == Role::kCtx) {
      for (size_t i = 0; i < rank.pool.size(); ++i) {
        rank.pool[i] = static_cast<std::byte>(i * 13 + instance.size());
      }
    }
    AgentOptions o;
    o.instance_id = instance;
    o.role = role;
    o.instance.model = *CustomModel(2, kv_heads, 8, false);
    o.pool.bases = {Addr::FromPointer(rank.pool.data())};
    o.pool.num_blocks = kBlocks;
    o.config.bounce_size_mb = 1;
    o.config.transfer_timeout_ms = 20000;
    o.transport_spec.kind = "ucx";
    o.transport_spec.same_host_shared_memory = false;
    o.transport = std::move(transport);
    o.grace = milliseconds(500);
    KVB_ASSIGN_OR_RETURN(rank.agent, Agent::Create(std::move(o)));
    return rank;
  }

  // Publishes `id` on `ctx` from blocks {0, 1}, pulls it into gen blocks
  // {2, 3}, and checks the bytes.
  static void ExpectTransfer(Rank& ctx, const std::string& instance, Rank& gen, uint64_t id) {
    const std::vector<int32_t> ctx_table = {0, 1};
    const std::vector<int32_t> gen_table = {2, 3};
    auto published = ctx.agent->Publish(id, ctx_table, 64);
    ASSERT_THAT(published, IsOk());
    auto pull = gen.agent->Pull(id, instance, gen_table, {0, 64});
    ASSERT_THAT(pull, IsOk());
    ASSERT_THAT((*pull)->Wait(), IsOk());
    EXPECT_THAT((*published)->Wait(), IsOk());
    const uint64_t bytes = BlockBytes(2);
    EXPECT_EQ(std::memcmp(ctx.pool.data(), gen.pool.data() + 2 * bytes, 2 * bytes), 0);
  }
};

TEST_F(UcxAgentTest, APeerOfAnotherModelIsRefusedAndTheAgentKeepsServing) {
  auto gen = MakeRank(Role::kGen, "gen0");
  ASSERT_THAT(gen, IsOk());
  auto other = MakeRank(Role::kCtx, "ctx-other", /*kv_heads=*/4);
  ASSERT_THAT(other, IsOk());
  const std::vector<std::string> wrong = {other->agent->Address()};
  EXPECT_THAT(gen->agent->Connect(wrong),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("another model")));

  auto good = MakeRank(Role::kCtx, "ctx0");
  ASSERT_THAT(good, IsOk());
  const std::vector<std::string> right = {good->agent->Address()};
  ASSERT_THAT(gen->agent->Connect(right), IsOk());
  ExpectTransfer(*good, "ctx0", *gen, 1);
  EXPECT_EQ(gen->agent->Stats().arena_outstanding_bytes, 0u);
}

// A raw UCX endpoint that connects to an agent and sends bytes that are no
// frame: the agent answers BYE (a protocol error) and closes the connection;
// it goes on serving a well-behaved peer.
TEST_F(UcxAgentTest, MalformedFramesFromATestPeerEndItsConnectionOnly) {
  auto gen = MakeRank(Role::kGen, "gen0");
  ASSERT_THAT(gen, IsOk());

  auto raw = NewUcxTransport({});
  ASSERT_THAT(raw, IsOk());
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::vector<std::byte>> frames;
  bool failed = false;
  Status reason;
  TransportCallbacks callbacks;
  callbacks.on_message = [&](PeerId, std::vector<std::byte> frame) {
    std::lock_guard<std::mutex> lock(mu);
    frames.push_back(std::move(frame));
    cv.notify_all();
  };
  callbacks.on_peer_failure = [&](PeerId, const Status& why) {
    std::lock_guard<std::mutex> lock(mu);
    failed = true;
    reason = why;
    cv.notify_all();
  };
  ASSERT_THAT((*raw)->Start(std::move(callbacks)), IsOk());
  auto peer = (*raw)->Connect(gen->agent->Address());
  ASSERT_THAT(peer, IsOk());
  const std::string garbage = "GET / HTTP/1.1\r\n\r\n";
  ASSERT_THAT((*raw)->Send(*peer, std::as_bytes(std::span(garbage.data(), garbage.size()))),
              IsOk());
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(20), [&] { return failed; }))
        << "the agent kept the connection of a peer that sent garbage";
    // What it said before closing: a BYE naming the protocol error.
    ASSERT_FALSE(frames.empty());
    auto message = protocol::DecodeFrame(frames.back());
    ASSERT_THAT(message, IsOk());
    const auto* bye = std::get_if<protocol::Bye>(&*message);
    ASSERT_NE(bye, nullptr);
    EXPECT_EQ(bye->reason, protocol::ByeReason::kProtocolError);
  }
  (*raw)->Shutdown();

  auto ctx = MakeRank(Role::kCtx, "ctx0");
  ASSERT_THAT(ctx, IsOk());
  const std::vector<std::string> address = {ctx->agent->Address()};
  ASSERT_THAT(gen->agent->Connect(address), IsOk());
  ExpectTransfer(*ctx, "ctx0", *gen, 2);
}

// A writer's connection is lost in the middle of its writes (the fault
// decorator cuts it while its first write batch is held, as a killed
// process's connection would end):
// the pull fails within its timeout naming the writer, its slot comes back,
// and the gen rank keeps serving requests from another ctx instance.
TEST_F(UcxAgentTest, AWriterLostMidTransferFailsItsPullAndOthersAreServed) {
  UcxTransportOptions ucx;
  ucx.same_host_shared_memory = false;
  auto inner = NewUcxTransport(ucx);
  ASSERT_THAT(inner, IsOk());
  auto dropping = FaultTransport::Create(std::move(inner).value(), FaultOptions{});
  ASSERT_THAT(dropping, IsOk());
  FaultTransport* faults = dropping->get();
  auto lost = MakeRank(Role::kCtx, "ctx-lost", 2, std::move(dropping).value());
  ASSERT_THAT(lost, IsOk());
  auto ctx = MakeRank(Role::kCtx, "ctx0");
  ASSERT_THAT(ctx, IsOk());
  auto gen = MakeRank(Role::kGen, "gen0");
  ASSERT_THAT(gen, IsOk());
  const std::vector<std::string> addresses = {lost->agent->Address(), ctx->agent->Address()};
  ASSERT_THAT(gen->agent->Connect(addresses), IsOk());

  // The writer's first write batch is held, then its connection is cut (the
  // gen rank's is the only connection of ctx-lost: peer id 1).
  faults->HoldWrites();
  const std::vector<int32_t> ctx_table = {0, 2, 4, 6};
  const std::vector<int32_t> gen_table = {9, 7, 5, 3};
  auto published = lost->agent->Publish(7, ctx_table, 128);
  ASSERT_THAT(published, IsOk());
  PullOptions per_block;
  per_block.path = TransferPath::kPerBlock;
  auto pull = gen->agent->Pull(7, "ctx-lost", gen_table, {0, 128}, per_block);
  ASSERT_THAT(pull, IsOk());
  ASSERT_TRUE(faults->WaitForHeldWrites(1, milliseconds(20000)));
  faults->InjectDisconnect(1);
  faults->ReleaseWrites();
  const Status outcome = (*pull)->Wait();
  EXPECT_THAT(outcome, StatusIs(StatusCode::kUnavailable, HasSubstr("ctx-lost")));
  EXPECT_FALSE((*published)->Wait().ok());

  ExpectTransfer(*ctx, "ctx0", *gen, 8);
  EXPECT_EQ(gen->agent->Stats().arena_outstanding_bytes, 0u);
  EXPECT_EQ(lost->agent->Stats().arena_outstanding_bytes, 0u);
}

}  // namespace
}  // namespace kvbounce
