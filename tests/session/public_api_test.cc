// What an application sees through the installed headers alone: two agents
// on loopback move a request and the bytes arrive.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "kvbounce/agent.h"
#include "kvbounce/transports.h"

namespace {

TEST(PublicApiTest, PublishAndPullThroughTheInstalledHeaders) {
  // llama-style model, tiny: 2 layers, 2 kv heads, head dim 4, fp32.
  kvbounce::InstanceSpec spec;
  spec.model = *kvbounce::CustomModel(2, 2, 4, false);
  spec.dtype = kvbounce::DType::kFp32;
  spec.tokens_per_block = 2;
  // block-major: a block holds layers x kv x heads x tokens x dim floats.
  constexpr size_t kBlockFloats = 2 * 2 * 2 * 2 * 4;
  constexpr int kBlocks = 4;
  std::vector<float> ctx_pool(kBlockFloats * kBlocks), gen_pool(kBlockFloats * kBlocks, -1.0f);
  for (size_t i = 0; i < ctx_pool.size(); ++i) ctx_pool[i] = static_cast<float>(i);

  auto fabric = kvbounce::NewLoopbackFabric();
  auto make = [&](kvbounce::Role role, const char* id, std::vector<float>& pool) {
    kvbounce::AgentOptions o;
    o.instance_id = id;
    o.role = role;
    o.instance = spec;
    o.pool = {{kvbounce::Addr::FromPointer(pool.data())}, kBlocks, kvbounce::MemoryKind::kHost};
    o.config.bounce_size_mb = 1;
    o.transport = kvbounce::NewLoopbackTransport(fabric, id).value();
    auto agent = kvbounce::Agent::Create(std::move(o));
    EXPECT_TRUE(agent.ok()) << agent.status();
    return std::move(agent).value();
  };
  auto ctx = make(kvbounce::Role::kCtx, "ctx0", ctx_pool);
  auto gen = make(kvbounce::Role::kGen, "gen0", gen_pool);
  const std::vector<std::string> peers = {ctx->Address()};
  ASSERT_TRUE(gen->Connect(peers).ok());

  // Blocks 2 and 0 on the ctx side land in blocks 1 and 3 on the gen side.
  const std::vector<int32_t> ctx_blocks = {2, 0}, gen_blocks = {1, 3};
  auto published = ctx->Publish(7, ctx_blocks, 4);
  ASSERT_TRUE(published.ok()) << published.status();
  kvbounce::PullOptions pull;
  pull.path = kvbounce::TransferPath::kBounce;
  auto t = gen->Pull(7, "ctx0", gen_blocks, {0, 4}, pull);
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_TRUE((*t)->Wait().ok());
  EXPECT_TRUE((*published)->Wait().ok());
  EXPECT_EQ((*t)->info().path_taken, kvbounce::TransferPath::kBounce);
  EXPECT_EQ(std::memcmp(&gen_pool[1 * kBlockFloats], &ctx_pool[2 * kBlockFloats], kBlockFloats * 4),
            0);
  EXPECT_EQ(std::memcmp(&gen_pool[3 * kBlockFloats], &ctx_pool[0], kBlockFloats * 4), 0);
  EXPECT_EQ(gen_pool[0], -1.0f);  // block 0 untouched
  EXPECT_EQ(gen_pool[2 * kBlockFloats], -1.0f);
  gen->Shutdown();
  ctx->Shutdown();
}

}  // namespace
