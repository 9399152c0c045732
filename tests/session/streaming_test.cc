// The streamed bounce (docs/sessions.md, "Streaming bounce"): a request
// larger than the receiver's recv arena goes through chunk slots the
// receiver grants, one credit at a time. Each test checks every byte the
// receiver got against the element function, that every request settles
// exactly once, and that no arena byte stays outstanding afterwards; the
// failure cases also check that a settled request's blocks never change
// again.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>
#include <tuple>
#include <vector>

#include "common/clock.h"
#include "common/status_matchers.h"
#include "copy/copy_engine.h"
#include "protocol/codec.h"
#include "session/holding_copy_engine.h"
#include "tools/cluster.h"

namespace kvbounce {
namespace {

using std::chrono::milliseconds;
using ::testing::AnyOf;
using ::testing::HasSubstr;
using testing_util::HoldingCopyEngine;
using testing_util::IsOk;
using testing_util::StatusIs;
using tools::BlockTables;
using tools::Cluster;
using tools::ClusterOptions;

constexpr milliseconds kLong(60000);

template <typename Pred>
bool WaitUntil(Pred pred, milliseconds limit = kLong) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(milliseconds(1));
  }
  return true;
}

// ctx TP `writers` -> gen TP1, block-major into layer-major (the scatter
// has real work), bf16, 16 tokens a block; arenas of `send_mb` / `recv_mb`
// MiB and chunks of `chunk_mb` MiB.
ClusterOptions Streaming(int writers, int layers, int kv_heads, int head_dim, int64_t tokens,
                         int64_t send_mb, int64_t recv_mb, int64_t chunk_mb) {
  ClusterOptions o;
  const ModelShape model = *CustomModel(layers, kv_heads, head_dim, false);
  o.ctx = {model, DType::kBf16, writers, 1, {}, LayoutKind::kBlockMajorHnd, 16};
  o.gen = {model, DType::kBf16, 1, 1, {}, LayoutKind::kLayerMajorHnd, 16};
  o.max_tokens = tokens;
  o.slots = 1;
  o.faults = true;
  o.ctx_config.bounce_size_mb = send_mb;
  o.gen_config.bounce_size_mb = recv_mb;
  o.ctx_config.bounce_chunk_mb = chunk_mb;
  o.gen_config.bounce_chunk_mb = chunk_mb;
  // Admission waits must never turn into fallbacks in these tests.
  o.gen_config.reserve_timeout_ms = 120000;
  o.grace = milliseconds(200);
  return o;
}

// The writers gather into send slots and write them through the transport
// (what the fault transport can fail or hold), instead of gathering
// straight into the recv slots they map over loopback.
ClusterOptions Writes(ClusterOptions o) {
  o.ctx_config.bounce_gather_mapped = 0;
  return o;
}

PullOptions Bounce(milliseconds timeout = milliseconds(0)) {
  PullOptions p;
  p.path = TransferPath::kBounce;
  p.timeout = timeout;
  return p;
}

std::vector<std::shared_ptr<Transfer>> PublishAll(Cluster& c, int instance, uint64_t id,
                                                  const BlockTables& t, int64_t tokens) {
  std::vector<std::shared_ptr<Transfer>> out;
  for (int r = 0; r < c.num_ctx(); ++r) {
    Result<std::shared_ptr<Transfer>> p = c.ctx(instance, r).Publish(id, t.ctx, tokens, {});
    EXPECT_THAT(p, IsOk());
    if (p.ok()) out.push_back(*p);
  }
  return out;
}

uint64_t Outstanding(Cluster& c) {
  uint64_t n = 0;
  for (int i = 0; i < c.num_ctx_instances(); ++i) {
    for (int r = 0; r < c.num_ctx(); ++r) n += c.ctx(i, r).Stats().arena_outstanding_bytes;
  }
  for (int r = 0; r < c.num_gen(); ++r) n += c.gen(r).Stats().arena_outstanding_bytes;
  return n;
}

std::vector<std::byte> GenPool(Cluster& c) {
  std::vector<std::byte> out;
  for (std::span<std::byte> s : c.PoolMemory(false, 0)) out.insert(out.end(), s.begin(), s.end());
  return out;
}

bool ArenasDrain(Cluster& c) {
  return WaitUntil([&] { return Outstanding(c) == 0; });
}

uint64_t ChunksWritten(Cluster& c) {
  uint64_t n = 0;
  for (int i = 0; i < c.num_ctx_instances(); ++i) {
    for (int r = 0; r < c.num_ctx(); ++r) n += c.ctx(i, r).Stats().chunks_written;
  }
  return n;
}

// The perf log's lines of a streamed request count its chunks and where
// their round trips went, on the receiver and on each writer; a request
// that fits the arena (one slot) has none.
TEST(StreamingTest, ThePerfLogTimesAStreamsChunks) {
  const std::string path =
      ::testing::TempDir() + "/kvbounce_chunks_" + std::to_string(::getpid()) + ".jsonl";
  std::remove(path.c_str());
  ::setenv("KVBOUNCE_PERF_LOG", path.c_str(), 1);
  // 2 writers of 8 MiB (8 layers x 2 x 8 heads x 128 x 2 B x 512 tokens / 2)
  // through a 2 MiB arena in 1 MiB chunks: 16 chunks; the second request,
  // of 32 tokens (1 MiB), fits the arena.
  auto cluster = Cluster::Create(Streaming(2, 8, 8, 128, 512, 4, 2, 1));
  ::unsetenv("KVBOUNCE_PERF_LOG");
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(7);
  for (const auto& [id, tokens] : {std::pair<uint64_t, int64_t>{1, 512}, {2, 32}}) {
    const BlockTables tables = c.Tables(0, tokens, rng);
    auto published = PublishAll(c, 0, id, tables, tokens);
    auto pull = c.gen(0).Pull(id, "ctx0", tables.gen, {0, tokens}, Bounce());
    ASSERT_THAT(pull, IsOk());
    ASSERT_THAT((*pull)->Wait(), IsOk());
    for (auto& p : published) EXPECT_THAT(p->Wait(), IsOk());
  }
  c.Shutdown();
  std::ifstream in(path);
  std::string line;
  int receivers = 0;
  int writers = 0;
  double writers_us = 0;  // the writers' share of the chunks' round trips
  double receiver_writer_us = 0;
  while (std::getline(in, line)) {
    const nlohmann::json j = nlohmann::json::parse(line);
    if (j["request_id"] == 2) {
      EXPECT_EQ(j["chunks"], 0) << line;
      EXPECT_EQ(j["chunk_slots_peak"], 0) << line;
      EXPECT_EQ(j["chunk_writer_us"], 0.0) << line;
      EXPECT_EQ(j["chunk_scatter_us"], 0.0) << line;
      continue;
    }
    if (j["side"] == "sender") {
      ++writers;
      EXPECT_EQ(j["chunk_slots_peak"], 0) << line;  // the receiver's figures
      EXPECT_EQ(j["credit_stall_us"], 0.0) << line;
      EXPECT_EQ(j["chunks"], 8) << line;
      EXPECT_GT(j["chunk_writer_us"].get<double>(), 0.0) << line;
      EXPECT_EQ(j["chunk_scatter_us"], 0.0) << line;
      writers_us += j["chunk_writer_us"].get<double>();
      continue;
    }
    ++receivers;
    receiver_writer_us = j["chunk_writer_us"].get<double>();
    EXPECT_EQ(j["chunks"], 16) << line;
    // One 1 MiB slot a writer fits the 2 MiB arena: both held theirs at once.
    EXPECT_EQ(j["chunk_slots_peak"], 2) << line;
    const double complete = j["complete_us"].get<double>();
    EXPECT_GE(j["credit_stall_us"].get<double>(), 0.0) << line;
    EXPECT_LT(j["credit_stall_us"].get<double>(), 2 * complete) << line;
    // Each chunk took time on both legs, and no leg outlasted the request.
    EXPECT_GT(j["chunk_writer_us"].get<double>(), 0.0) << line;
    EXPECT_GT(j["chunk_scatter_us"].get<double>(), 0.0) << line;
    EXPECT_LT(j["chunk_writer_us"].get<double>() / 16, complete) << line;
    EXPECT_LT(j["chunk_scatter_us"].get<double>() / 16, complete) << line;
  }
  EXPECT_EQ(receivers, 1);
  EXPECT_EQ(writers, 2);
  // Each writer's leg of a chunk lies inside the receiver's (grant sent
  // before it arrived, KV_CHUNK sent before it arrived; one clock).
  EXPECT_LE(writers_us, receiver_writer_us);
  std::remove(path.c_str());
}

// One writer, a recv arena of exactly one chunk, a request 100 times it:
// 100 chunks through the one slot, every byte verified.
TEST(StreamingTest, ARequestAHundredTimesAnArenaOfOneChunk) {
  // 8 layers x 2 x 8 heads x 128 x 2 B = 32 KiB a token: 3200 tokens = 100 MiB.
  auto cluster = Cluster::Create(Streaming(1, 8, 8, 128, 3200, 1, 1, 1));
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(1);
  const BlockTables tables = c.Tables(0, 3200, rng);
  auto published = PublishAll(c, 0, 1, tables, 3200);
  auto pull = c.gen(0).Pull(1, "ctx0", tables.gen, {0, 3200}, Bounce());
  ASSERT_THAT(pull, IsOk());
  ASSERT_THAT((*pull)->Wait(), IsOk());
  EXPECT_EQ((*pull)->info().path_taken, TransferPath::kBounce);
  EXPECT_EQ((*pull)->info().fallback_reason, "");
  EXPECT_EQ((*pull)->info().bytes, MiB(100));
  const tools::VerifyResult v = c.VerifyGen(0, tables, {0, 3200});
  EXPECT_EQ(v.mismatches, 0u) << v.first_mismatch;
  EXPECT_EQ(v.verified_bytes, MiB(100));
  const AgentStats gen = c.gen(0).Stats();
  EXPECT_EQ(gen.chunks_granted, 100u);
  EXPECT_EQ(gen.chunks_scattered, 100u);
  EXPECT_EQ(gen.arena_peak_bytes, MiB(1));
  EXPECT_EQ(gen.fallbacks, 0u);
  EXPECT_EQ(ChunksWritten(c), 100u);
  for (auto& p : published) EXPECT_THAT(p->Wait(), IsOk());
  EXPECT_TRUE(ArenasDrain(c));
}

// With host pools the receiver cuts chunks so that each writer can hold two
// chunk slots, as long as they stay at least 1 MiB: the default 4 MiB
// chunk through a 4 MiB arena for two writers becomes 1 MiB (two slots a
// writer), while through a 2 MiB arena (two slots a writer would be 512
// KiB) it stays at one writer's share, 1 MiB.
TEST(StreamingTest, HostPoolWritersGetTwoChunkSlotsWhereTheArenaAllows) {
  // 2 writers of 8 MiB (8 layers x 2 x 8 heads x 128 x 2 B x 512 tokens / 2).
  for (const auto& [recv_mb, chunks_per_writer, peak_mb] :
       {std::tuple<int64_t, uint64_t, uint64_t>{4, 8, 4}, {2, 8, 2}, {8, 4, 8}}) {
    SCOPED_TRACE("recv arena " + std::to_string(recv_mb) + " MiB");
    auto cluster = Cluster::Create(Streaming(2, 8, 8, 128, 512, 4, recv_mb, 0));
    ASSERT_THAT(cluster, IsOk());
    Cluster& c = **cluster;
    std::mt19937_64 rng(static_cast<uint64_t>(recv_mb));
    const BlockTables tables = c.Tables(0, 512, rng);
    auto published = PublishAll(c, 0, 1, tables, 512);
    auto pull = c.gen(0).Pull(1, "ctx0", tables.gen, {0, 512}, Bounce());
    ASSERT_THAT(pull, IsOk());
    ASSERT_THAT((*pull)->Wait(), IsOk());
    EXPECT_EQ((*pull)->info().fallback_reason, "");
    const tools::VerifyResult v = c.VerifyGen(0, tables, {0, 512});
    EXPECT_EQ(v.mismatches, 0u) << v.first_mismatch;
    EXPECT_EQ(v.verified_bytes, MiB(16));
    for (auto& p : published) EXPECT_THAT(p->Wait(), IsOk());
    const AgentStats gen = c.gen(0).Stats();
    EXPECT_EQ(gen.chunks_scattered, 2 * chunks_per_writer);
    EXPECT_LE(gen.arena_peak_bytes, MiB(peak_mb));
    for (int r = 0; r < 2; ++r) EXPECT_EQ(c.ctx(r).Stats().chunks_written, chunks_per_writer);
    EXPECT_TRUE(ArenasDrain(c));
  }
}

// TP fan-in: 8 writers into one receiver whose arena holds one chunk per
// writer; the grants go round-robin, so every writer streams.
TEST(StreamingTest, EightWritersIntoAnArenaOfOneChunkEach) {
  // Per writer: 4 layers x 2 x 1 head x 64 x 2 B = 1 KiB a token; 8 MiB each.
  auto cluster = Cluster::Create(Streaming(8, 4, 8, 64, 8192, 1, 8, 1));
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  for (uint64_t id = 1; id <= 2; ++id) {
    std::mt19937_64 rng(id);
    c.ClearGen(0);
    const BlockTables tables = c.Tables(0, 8192, rng);
    auto published = PublishAll(c, 0, id, tables, 8192);
    auto pull = c.gen(0).Pull(id, "ctx0", tables.gen, {0, 8192}, Bounce());
    ASSERT_THAT(pull, IsOk());
    ASSERT_THAT((*pull)->Wait(), IsOk());
    EXPECT_EQ((*pull)->info().writers, 8);
    EXPECT_EQ((*pull)->info().fallback_reason, "");
    const tools::VerifyResult v = c.VerifyGen(0, tables, {0, 8192});
    EXPECT_EQ(v.mismatches, 0u) << v.first_mismatch;
    for (auto& p : published) EXPECT_THAT(p->Wait(), IsOk());
  }
  EXPECT_EQ(c.gen(0).Stats().chunks_scattered, 2u * 8 * 8);
  EXPECT_LE(c.gen(0).Stats().arena_peak_bytes, MiB(8));
  // Once each writer held its one slot, all eight wanted more (a window of
  // three) and queued for room; the queue emptied with the streams.
  EXPECT_EQ(c.gen(0).Stats().grant_queue_peak, 8u);
  EXPECT_EQ(c.gen(0).Stats().grant_queue, 0u);
  for (int r = 0; r < 8; ++r) EXPECT_EQ(c.ctx(r).Stats().chunks_written, 2u * 8);
  EXPECT_TRUE(ArenasDrain(c));
}

// The head mismatch that shatters a request into row-sized runs (a
// layer-major-nhd receiver of block-major writers), streamed: the chunks
// cut runs in the middle, and every row still lands where it belongs.
TEST(StreamingTest, RowSizedRunsIntoALayerMajorNhdReceiver) {
  ClusterOptions o = Streaming(4, 4, 8, 64, 4096, 1, 2, 1);
  o.gen.layout = LayoutKind::kLayerMajorNhd;
  o.gen.tokens_per_block = 32;
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  for (uint64_t id = 1; id <= 2; ++id) {
    std::mt19937_64 rng(id + 40);
    c.ClearGen(0);
    const BlockTables tables = c.Tables(0, 4096, rng);
    auto published = PublishAll(c, 0, id, tables, 4096);
    auto pull = c.gen(0).Pull(id, "ctx0", tables.gen, {5, 4096}, Bounce());
    ASSERT_THAT(pull, IsOk());
    ASSERT_THAT((*pull)->Wait(), IsOk());
    EXPECT_EQ((*pull)->info().fallback_reason, "");
    const tools::VerifyResult v = c.VerifyGen(0, tables, {5, 4096});
    EXPECT_EQ(v.mismatches, 0u) << v.first_mismatch;
    for (auto& p : published) EXPECT_THAT(p->Wait(), IsOk());
  }
  EXPECT_GT(c.gen(0).Stats().chunks_scattered, 8u);
  EXPECT_TRUE(ArenasDrain(c));
}

// An engine that takes tiled lists as the CUDA engine does (the sessions
// then plan and slice tiled lists) and counts the tiled batches it gets;
// the CPU engine under it expands each one.
class TiledCountingEngine final : public CopyEngine {
 public:
  TiledCountingEngine(std::unique_ptr<CopyEngine> inner, std::atomic<uint64_t>* tiled)
      : inner_(std::move(inner)), tiled_(tiled) {}
  std::string_view Name() const override { return "tiled-counting"; }
  CopyEngineCaps Caps() const override {
    CopyEngineCaps caps = inner_->Caps();
    caps.tiled_lists = true;
    return caps;
  }
  static AgentHooks Hooks(std::atomic<uint64_t>* tiled) {
    AgentHooks hooks;
    hooks.wrap_copy_engine = [tiled](std::unique_ptr<CopyEngine> inner) {
      return std::unique_ptr<CopyEngine>(new TiledCountingEngine(std::move(inner), tiled));
    };
    return hooks;
  }

 protected:
  Status SubmitValidated(const CopyBatch& batch, uint64_t /*total_bytes*/, CopyDone done,
                         std::stop_token stop) override {
    if (batch.tiles != nullptr) tiled_->fetch_add(1);
    return inner_->Submit(batch, std::move(done), std::move(stop));
  }

 private:
  std::unique_ptr<CopyEngine> inner_;
  std::atomic<uint64_t>* tiled_;
};

// Where the engine takes tiled lists, each chunk's gather and scatter are
// sliced from them (layout/chunking.h, SliceTiledChunk) when they are in
// packed order, and from the flat lists when not: a block-major receiver
// (one outer index), a layer-major one whose chunks span several layers'
// tiles, and one whose 32-token blocks the writers' 16-token blocks cut
// into interleaving segments (not in packed order: flat). Every byte lands.
TEST(StreamingTest, ChunksSlicedFromTiledListsWhereTheyAreInPackedOrder) {
  struct Case {
    const char* name;
    LayoutKind gen_layout;
    int gen_tpb;
    int layers, kv_heads;
    bool tiled;  // whether the chunks go tiled
  };
  // Each writer's 4 KiB a token (layers x 2 x heads/2 x 64 x 2 B): the
  // range [5, 1500) is ~5.8 MiB a writer, through a 2 MiB arena in 1 MiB
  // chunks that end mid-block; layer-major with 16 layers and one head a
  // writer, each spans five or six (layer, K/V) tiles of 187 KiB. With
  // four heads a writer, a 32-token head-major block cut into two 16-token
  // segments interleaves them.
  for (const auto& [k, mapped] :
       {std::pair{Case{"block-major", LayoutKind::kBlockMajorHnd, 16, 16, 2, true}, true},
        std::pair{Case{"layer-major", LayoutKind::kLayerMajorHnd, 16, 16, 2, true}, true},
        std::pair{Case{"interleaved", LayoutKind::kLayerMajorHnd, 32, 4, 8, false}, true},
        // Gathered into send lanes of 512 KiB and written: units cut
        // inside the chunks.
        std::pair{Case{"layer-major, written", LayoutKind::kLayerMajorHnd, 16, 16, 2, true},
                  false}}) {
    SCOPED_TRACE(k.name);
    ClusterOptions o = Streaming(2, k.layers, k.kv_heads, 64, 1500, 2, 2, 1);
    if (!mapped) o = Writes(o);
    o.gen.layout = k.gen_layout;
    o.gen.tokens_per_block = k.gen_tpb;
    std::atomic<uint64_t> ctx_tiled{0}, gen_tiled{0};
    o.ctx_hooks = TiledCountingEngine::Hooks(&ctx_tiled);
    o.gen_hooks = TiledCountingEngine::Hooks(&gen_tiled);
    auto cluster = Cluster::Create(o);
    ASSERT_THAT(cluster, IsOk());
    Cluster& c = **cluster;
    for (uint64_t id = 1; id <= 2; ++id) {
      std::mt19937_64 rng(id + 70);
      c.ClearGen(0);
      const BlockTables tables = c.Tables(0, 1500, rng);
      auto published = PublishAll(c, 0, id, tables, 1500);
      auto pull = c.gen(0).Pull(id, "ctx0", tables.gen, {5, 1500}, Bounce());
      ASSERT_THAT(pull, IsOk());
      ASSERT_THAT((*pull)->Wait(), IsOk());
      EXPECT_EQ((*pull)->info().path_taken, TransferPath::kBounce);
      EXPECT_EQ((*pull)->info().fallback_reason, "");
      const tools::VerifyResult v = c.VerifyGen(0, tables, {5, 1500});
      EXPECT_EQ(v.mismatches, 0u) << v.first_mismatch;
      EXPECT_GT(v.verified_bytes, MiB(11));
      for (auto& p : published) EXPECT_THAT(p->Wait(), IsOk());
    }
    const uint64_t chunks = c.gen(0).Stats().chunks_scattered;
    EXPECT_EQ(chunks, 2u * 2 * 6);  // 2 requests x 2 writers x 6 chunks
    // The receiver's only copies are the chunks' scatters; the writers'
    // are their gathers.
    EXPECT_EQ(gen_tiled.load(), k.tiled ? chunks : 0u);
    EXPECT_EQ(ctx_tiled.load(), k.tiled ? (mapped ? chunks : 2 * chunks) : 0u);
    EXPECT_TRUE(ArenasDrain(c));
  }
}

// Several ctx instances feed one gen rank, many requests in flight at
// once, the arena far smaller than what they hold together: admission and
// round-robin credits get every request through, none falls back.
TEST(StreamingTest, ManyRequestsFromSeveralCtxInstancesAtOnce) {
  constexpr int kInstances = 3;
  constexpr int kRequests = 9;
  // Per writer 4 layers x 2 x 2 heads x 32 x 2 B = 1 KiB a token: 4 MiB
  // each, 8 MiB a request, 72 MiB in all through a 4 MiB arena.
  ClusterOptions o = Streaming(2, 4, 4, 32, 4096, 2, 4, 1);
  o.ctx_instances = kInstances;
  o.slots = kRequests;
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::vector<BlockTables> tables;
  std::vector<std::shared_ptr<Transfer>> published, pulls;
  std::mt19937_64 rng(7);
  for (int i = 0; i < kRequests; ++i) {
    const int instance = i % kInstances;
    tables.push_back(c.Tables(instance, i, 4096, rng));
    for (auto& p : PublishAll(c, instance, 100 + i, tables.back(), 4096)) published.push_back(p);
  }
  // Every pull at once, from threads of their own.
  std::vector<std::thread> threads;
  pulls.resize(kRequests);
  for (int i = 0; i < kRequests; ++i) {
    threads.emplace_back([&, i] {
      auto pull = c.gen(0).Pull(100 + i, c.ctx_instance_name(i % kInstances), tables[i].gen,
                                {0, 4096}, Bounce());
      EXPECT_THAT(pull, IsOk());
      if (pull.ok()) pulls[i] = *pull;
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kRequests; ++i) {
    ASSERT_NE(pulls[i], nullptr);
    EXPECT_THAT(pulls[i]->Wait(), IsOk()) << "request " << i;
    EXPECT_EQ(pulls[i]->info().fallback_reason, "") << "request " << i;
    const tools::VerifyResult v = c.VerifyGen(0, tables[i], {0, 4096});
    EXPECT_EQ(v.mismatches, 0u) << "request " << i << ": " << v.first_mismatch;
  }
  for (auto& p : published) EXPECT_THAT(p->Wait(), IsOk());
  const AgentStats gen = c.gen(0).Stats();
  EXPECT_EQ(gen.chunks_scattered, uint64_t{kRequests} * 2 * 4);
  EXPECT_LE(gen.arena_peak_bytes, MiB(4));
  EXPECT_EQ(gen.fallbacks, 0u);
  EXPECT_EQ(ChunksWritten(c), uint64_t{kRequests} * 2 * 4);
  EXPECT_TRUE(ArenasDrain(c));
}

// Cancels land at random points of the stream: each request settles once,
// as cancelled (or completed, when the cancel came too late), its pool is
// not touched after it settled, and every slot comes back.
TEST(StreamingTest, CancelAtRandomChunksSettlesOnceAndTouchesNothingAfter) {
  // 2 writers x 16 MiB, chunks of 1 MiB through a 2 MiB arena.
  auto cluster = Cluster::Create(Streaming(2, 4, 4, 32, 16384, 1, 2, 1));
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(11);
  int cancelled = 0;
  for (uint64_t id = 1; id <= 6; ++id) {
    SCOPED_TRACE("request " + std::to_string(id));
    c.ClearGen(0);
    const BlockTables tables = c.Tables(0, 16384, rng);
    auto published = PublishAll(c, 0, id, tables, 16384);
    const uint64_t scattered_before = c.gen(0).Stats().chunks_scattered;
    auto pull = c.gen(0).Pull(id, "ctx0", tables.gen, {0, 16384}, Bounce());
    ASSERT_THAT(pull, IsOk());
    std::atomic<int> settled{0};
    (*pull)->OnDone([&](const Status&) { ++settled; });
    // Cancel once a random number of chunks (0 .. 24 of 32) was scattered.
    const uint64_t at = rng() % 25;
    WaitUntil([&] {
      return c.gen(0).Stats().chunks_scattered - scattered_before >= at ||
             (*pull)->Poll().has_value();
    });
    (*pull)->Cancel();
    const Status outcome = (*pull)->Wait();
    EXPECT_THAT(outcome, AnyOf(IsOk(), StatusIs(StatusCode::kCancelled)));
    if (!outcome.ok()) ++cancelled;
    // What the pool holds at settle is what it holds once every writer
    // stopped and every slot came back.
    Result<std::vector<std::vector<std::byte>>> at_settle = c.SlotBytes(false, 0, 0);
    ASSERT_THAT(at_settle, IsOk());
    for (auto& p : published) p->Cancel();
    for (auto& p : published) EXPECT_TRUE(p->WaitFor(kLong));
    EXPECT_TRUE(ArenasDrain(c));
    Result<std::vector<std::vector<std::byte>>> after = c.SlotBytes(false, 0, 0);
    ASSERT_THAT(after, IsOk());
    EXPECT_TRUE(*at_settle == *after) << "the pool changed after the request settled";
    EXPECT_EQ(settled.load(), 1);
    if (outcome.ok()) {
      EXPECT_EQ(c.VerifyGen(0, tables, {0, 16384}).mismatches, 0u);
    }
  }
  EXPECT_GT(cancelled, 0);
  EXPECT_EQ(c.gen(0).Stats().requests_completed + c.gen(0).Stats().requests_cancelled, 6u);
}

// Writes fail at random chunks: a request with a failed chunk fails with
// the writer's reason, frees everything, and the next one streams on.
TEST(StreamingTest, WriteFailuresAtRandomChunksFailCleanly) {
  ClusterOptions o = Writes(Streaming(2, 4, 4, 32, 16384, 1, 2, 1));
  o.ctx_faults.write_fail_rate = 0.02;
  o.ctx_faults.seed = 3;
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(13);
  int failed = 0;
  for (uint64_t id = 1; id <= 6; ++id) {
    SCOPED_TRACE("request " + std::to_string(id));
    c.ClearGen(0);
    const BlockTables tables = c.Tables(0, 16384, rng);
    auto published = PublishAll(c, 0, id, tables, 16384);
    auto pull = c.gen(0).Pull(id, "ctx0", tables.gen, {0, 16384}, Bounce());
    ASSERT_THAT(pull, IsOk());
    const Status outcome = (*pull)->Wait();
    if (outcome.ok()) {
      EXPECT_EQ(c.VerifyGen(0, tables, {0, 16384}).mismatches, 0u);
    } else {
      ++failed;
      EXPECT_THAT(std::string(outcome.message()), HasSubstr("injected write failure"));
    }
    for (auto& p : published) p->Cancel();
    for (auto& p : published) EXPECT_TRUE(p->WaitFor(kLong));
    EXPECT_TRUE(ArenasDrain(c));
  }
  EXPECT_GT(failed, 0);
  // Without faults, the same cluster streams again.
  for (int r = 0; r < c.num_ctx(); ++r) ASSERT_THAT(c.ctx_faults(r)->SetOptions({}), IsOk());
  c.ClearGen(0);
  const BlockTables tables = c.Tables(0, 16384, rng);
  auto published = PublishAll(c, 0, 99, tables, 16384);
  auto pull = c.gen(0).Pull(99, "ctx0", tables.gen, {0, 16384}, Bounce());
  ASSERT_THAT(pull, IsOk());
  ASSERT_THAT((*pull)->Wait(), IsOk());
  EXPECT_EQ(c.VerifyGen(0, tables, {0, 16384}).mismatches, 0u);
  EXPECT_TRUE(ArenasDrain(c));
}

// A deadline that passes mid-stream, with chunk writes held in flight:
// the request settles at once with DEADLINE_EXCEEDED, the slots the
// writers may still write stay quarantined until they stop, and nothing of
// them reaches the pool.
TEST(StreamingTest, ADeadlineMidStreamQuarantinesTheGrantedSlots) {
  auto cluster = Cluster::Create(Writes(Streaming(2, 4, 4, 32, 16384, 1, 2, 1)));
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(17);
  c.ClearGen(0);
  const BlockTables tables = c.Tables(0, 16384, rng);
  auto published = PublishAll(c, 0, 1, tables, 16384);
  for (int r = 0; r < c.num_ctx(); ++r) c.ctx_faults(r)->HoldWrites();
  auto pull = c.gen(0).Pull(1, "ctx0", tables.gen, {0, 16384}, Bounce(milliseconds(300)));
  ASSERT_THAT(pull, IsOk());
  // Each writer has its first chunk on the wire.
  for (int r = 0; r < c.num_ctx(); ++r) ASSERT_TRUE(c.ctx_faults(r)->WaitForHeldWrites(1, kLong));
  EXPECT_THAT((*pull)->Wait(), StatusIs(StatusCode::kDeadlineExceeded));
  EXPECT_GT(c.gen(0).Stats().arena_quarantined_bytes, 0u);
  Result<std::vector<std::vector<std::byte>>> at_settle = c.SlotBytes(false, 0, 0);
  ASSERT_THAT(at_settle, IsOk());
  for (int r = 0; r < c.num_ctx(); ++r) c.ctx_faults(r)->ReleaseWrites();
  for (auto& p : published) p->Cancel();
  for (auto& p : published) EXPECT_TRUE(p->WaitFor(kLong));
  EXPECT_TRUE(ArenasDrain(c));
  EXPECT_EQ(c.gen(0).Stats().arena_quarantined_bytes, 0u);
  Result<std::vector<std::vector<std::byte>>> after = c.SlotBytes(false, 0, 0);
  ASSERT_THAT(after, IsOk());
  EXPECT_TRUE(*at_settle == *after);
}

// The same where the writers gather straight into the mapped chunk slots
// (the loopback default), their gathers held in flight: the request
// settles at the deadline, the slots being gathered into stay quarantined
// until the gathers end, and none of it reaches the pool.
TEST(StreamingTest, ADeadlineMidStreamQuarantinesTheSlotsGatheredInto) {
  HoldingCopyEngine::Gate gathers;
  ClusterOptions o = Streaming(2, 4, 4, 32, 16384, 1, 2, 1);
  o.ctx_hooks = gathers.Hooks();
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(23);
  c.ClearGen(0);
  const BlockTables tables = c.Tables(0, 16384, rng);
  const std::vector<std::byte> before = GenPool(c);
  auto published = PublishAll(c, 0, 1, tables, 16384);
  gathers.Hold();
  auto pull = c.gen(0).Pull(1, "ctx0", tables.gen, {0, 16384}, Bounce(milliseconds(300)));
  ASSERT_THAT(pull, IsOk());
  // Each writer has its first chunk's gather in flight.
  ASSERT_TRUE(gathers.WaitForParked(2, kLong));
  EXPECT_THAT((*pull)->Wait(), StatusIs(StatusCode::kDeadlineExceeded));
  EXPECT_GT(c.gen(0).Stats().arena_quarantined_bytes, 0u);
  gathers.Release();
  for (auto& p : published) p->Cancel();
  for (auto& p : published) EXPECT_TRUE(p->WaitFor(kLong));
  EXPECT_TRUE(ArenasDrain(c));
  EXPECT_EQ(c.gen(0).Stats().arena_quarantined_bytes, 0u);
  EXPECT_TRUE(GenPool(c) == before) << "a gather held past the deadline reached the pool";
  for (int r = 0; r < c.num_ctx(); ++r) EXPECT_EQ(c.ctx(0, r).Stats().transport_writes, 0u);
}

// More streams than the arena admits: the second waits in order for
// admission, and once reserve_timeout_ms passed it falls back to per-block
// (which can serve it here) while the first streams on.
TEST(StreamingTest, AStreamNotAdmittedInTimeFallsBackToPerBlock) {
  auto clock = std::make_shared<ManualClock>();
  ClusterOptions o = Writes(Streaming(2, 4, 4, 32, 16384, 1, 2, 1));
  o.slots = 2;
  o.gen_config.reserve_timeout_ms = 100;
  o.ctx_hooks.clock = clock;
  o.gen_hooks.clock = clock;
  auto cluster = Cluster::Create(o);
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(23);
  const BlockTables first = c.Tables(0, 16384, rng);
  const BlockTables second = c.Tables(1, 16384, rng);
  auto published = PublishAll(c, 0, 1, first, 16384);
  for (auto& p : PublishAll(c, 0, 2, second, 16384)) published.push_back(p);
  for (int r = 0; r < c.num_ctx(); ++r) c.ctx_faults(r)->HoldWrites();
  auto a = c.gen(0).Pull(1, "ctx0", first.gen, {0, 16384}, Bounce());
  ASSERT_THAT(a, IsOk());
  for (int r = 0; r < c.num_ctx(); ++r) ASSERT_TRUE(c.ctx_faults(r)->WaitForHeldWrites(1, kLong));
  auto b = c.gen(0).Pull(2, "ctx0", second.gen, {0, 16384}, Bounce());
  ASSERT_THAT(b, IsOk());
  EXPECT_FALSE((*b)->Poll().has_value());
  clock->Advance(milliseconds(99));
  EXPECT_EQ((*b)->info().path_taken, TransferPath::kBounce);  // still waiting
  clock->Advance(milliseconds(1));
  // The fallback's per-block writes go through the held decorators too.
  for (int r = 0; r < c.num_ctx(); ++r) c.ctx_faults(r)->ReleaseWrites();
  ASSERT_THAT((*b)->Wait(), IsOk());
  EXPECT_EQ((*b)->info().path_taken, TransferPath::kPerBlock);
  EXPECT_EQ((*b)->info().fallback_reason, "recv arena backpressure");
  ASSERT_THAT((*a)->Wait(), IsOk());
  EXPECT_EQ((*a)->info().path_taken, TransferPath::kBounce);
  EXPECT_EQ(c.VerifyGen(0, first, {0, 16384}).mismatches, 0u);
  EXPECT_EQ(c.VerifyGen(0, second, {0, 16384}).mismatches, 0u);
  EXPECT_TRUE(ArenasDrain(c));
}

// The writer refuses grants it cannot trust: a chunk the stream does not
// have, a slot of the wrong size, a chunk granted twice. Each fails its job
// (DATA_LOSS, naming the grant); the request fails and everything is freed.
TEST(StreamingTest, AWriterRefusesGrantsItCannotTrust) {
  struct Tamper {
    const char* name;
    std::function<void(protocol::KvGrant&)> change;
    const char* why;
  };
  const std::vector<Tamper> tampers = {
      {"chunk out of range", [](protocol::KvGrant& g) { g.chunk += 1000; }, "chunks"},
      {"wrong size", [](protocol::KvGrant& g) { g.slot_size -= 1; }, "a slot of"},
      {"granted twice", [](protocol::KvGrant& g) { g.chunk = g.chunk == 1 ? 0 : g.chunk; },
       "granted twice"},
  };
  auto cluster = Cluster::Create(Streaming(1, 4, 4, 32, 8192, 1, 2, 1));
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(29);
  uint64_t id = 1;
  for (const Tamper& t : tampers) {
    SCOPED_TRACE(t.name);
    FaultOptions faults;
    faults.rewrite_message = [&t](std::vector<std::byte>& frame) {
      Result<protocol::KvGrant> grant = protocol::DecodeKvGrant(frame);
      if (!grant.ok()) return;  // not a KV_GRANT
      t.change(*grant);
      frame = *protocol::Encode(*grant);
    };
    ASSERT_THAT(c.ctx_faults(0)->SetOptions(faults), IsOk());
    const BlockTables tables = c.Tables(0, 8192, rng);
    auto published = PublishAll(c, 0, id, tables, 8192);
    auto pull = c.gen(0).Pull(id, "ctx0", tables.gen, {0, 8192}, Bounce());
    ASSERT_THAT(pull, IsOk());
    const Status outcome = (*pull)->Wait();
    EXPECT_THAT(outcome, StatusIs(StatusCode::kDataLoss, HasSubstr("KV_GRANT of chunk")));
    EXPECT_THAT(std::string(outcome.message()), HasSubstr(t.why));
    for (auto& p : published) p->Cancel();
    EXPECT_TRUE(ArenasDrain(c));
    ++id;
  }
  ASSERT_THAT(c.ctx_faults(0)->SetOptions({}), IsOk());
}

// A writer that dies mid-stream: the request fails naming the lost
// connection, the other writer is drained, every slot comes back.
TEST(StreamingTest, AWriterRestartedMidStreamFailsTheRequestAndFreesEverything) {
  auto cluster = Cluster::Create(Writes(Streaming(2, 4, 4, 32, 16384, 1, 2, 1)));
  ASSERT_THAT(cluster, IsOk());
  Cluster& c = **cluster;
  std::mt19937_64 rng(19);
  const BlockTables tables = c.Tables(0, 16384, rng);
  auto published = PublishAll(c, 0, 1, tables, 16384);
  c.ctx_faults(1)->HoldWrites();
  auto pull = c.gen(0).Pull(1, "ctx0", tables.gen, {0, 16384}, Bounce());
  ASSERT_THAT(pull, IsOk());
  // Its first chunk is on the wire: released, then the writer restarts
  // while the rest of its 16 chunks are still to come.
  ASSERT_TRUE(c.ctx_faults(1)->WaitForHeldWrites(1, kLong));
  c.ctx_faults(1)->ReleaseWrites();
  ASSERT_THAT(c.RestartRank(/*ctx_side=*/true, 1), IsOk());
  const Status outcome = (*pull)->Wait();
  EXPECT_FALSE(outcome.ok());
  EXPECT_THAT(outcome.code(),
              AnyOf(StatusCode::kUnavailable, StatusCode::kAborted, StatusCode::kCancelled));
  for (auto& p : published) p->Cancel();
  EXPECT_TRUE(ArenasDrain(c));
  // The restarted writer serves the next request.
  c.ClearGen(0);
  const BlockTables again = c.Tables(0, 16384, rng);
  auto republished = PublishAll(c, 0, 2, again, 16384);
  auto next = c.gen(0).Pull(2, "ctx0", again.gen, {0, 16384}, Bounce());
  ASSERT_THAT(next, IsOk());
  ASSERT_THAT((*next)->Wait(), IsOk());
  EXPECT_EQ(c.VerifyGen(0, again, {0, 16384}).mismatches, 0u);
  EXPECT_TRUE(ArenasDrain(c));
}

}  // namespace
}  // namespace kvbounce
