// The planner against a brute-force, per-element oracle on many random small
// topologies. The oracle knows nothing of the planner: it computes each row's
// address from the layout definitions of docs/architecture.md §2 and each row's writer from
// the rule of docs/architecture.md §3, one element at a time. The test executes the plan's
// lists through the CPU copy engine and checks that every receiver byte is
// what the oracle says and that nothing else was touched.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "copy/cpu/cpu_copy_engine.h"
#include "layout/canonical_runs.h"
#include "layout/chunking.h"
#include "layout/planner.h"
#include "layout/tiled_list.h"

namespace kvbounce {
namespace {

constexpr std::byte kSentinel{0xA5};

// --- The oracle: independent re-statements of the layout and mapping rules.

struct OracleRank {
  int tp_rank, pp_rank;
  int first_layer, num_layers;
  int first_head, num_heads;
};

OracleRank OraclePlacement(int heads, int tp, const std::vector<int>& stages, int rank) {
  OracleRank r;
  r.tp_rank = rank % tp;
  r.pp_rank = rank / tp;
  r.first_layer = 0;
  for (int s = 0; s < r.pp_rank; ++s) r.first_layer += stages[s];
  r.num_layers = stages[r.pp_rank];
  if (heads >= tp) {
    r.num_heads = heads / tp;
    r.first_head = r.tp_rank * r.num_heads;
  } else {
    r.num_heads = 1;
    r.first_head = r.tp_rank * heads / tp;
  }
  return r;
}

struct OraclePool {
  LayoutKind kind;
  int64_t L, K, H, T, R, N;  // local layers, kv, heads, tokens/block, row bytes, blocks
  bool per_layer;
  std::vector<std::vector<std::byte>> memory;  // one vector, or one per layer

  // The byte offset of a row in memory[layer or 0].
  std::pair<size_t, int64_t> Row(int64_t l, int64_t kv, int64_t b, int64_t h, int64_t t) const {
    int64_t idx = 0;
    const int64_t ll = per_layer ? 0 : l;
    switch (kind) {
      case LayoutKind::kBlockMajorHnd:
        idx = (((b * L + l) * K + kv) * H + h) * T + t;
        break;
      case LayoutKind::kLayerMajorHnd:
        idx = (((ll * K + kv) * N + b) * H + h) * T + t;
        break;
      case LayoutKind::kLayerMajorNhd:
        idx = (((ll * K + kv) * N + b) * T + t) * H + h;
        break;
    }
    return {per_layer ? static_cast<size_t>(l) : 0, idx * R};
  }
};

struct Side {
  InstanceSpec spec;
  std::vector<int> stages;  // effective
  std::unique_ptr<Topology> topology;
  std::vector<OraclePool> pools;
  std::vector<PoolLayout> layouts;
  std::vector<std::vector<int32_t>> tables;
};

int RandomTp(std::mt19937_64& rng, int heads) {
  std::vector<int> ok;
  for (int t = 1; t <= 8; ++t) {
    if ((heads >= t && heads % t == 0) || (heads < t && t % heads == 0)) ok.push_back(t);
  }
  return ok[rng() % ok.size()];
}

std::vector<int> RandomStages(std::mt19937_64& rng, int layers, int pp) {
  std::vector<int> stages(pp, 1);
  for (int i = pp; i < layers; ++i) ++stages[rng() % pp];
  return stages;
}

void BuildSide(std::mt19937_64& rng, const ModelShape& model, DType dtype, int64_t end, bool fill,
               Side* side) {
  InstanceSpec& spec = side->spec;
  spec.model = model;
  spec.dtype = dtype;
  spec.tp = RandomTp(rng, model.num_kv_heads);
  spec.pp = 1 + static_cast<int>(rng() % std::min(3, model.num_layers));
  const bool explicit_stages = rng() % 2 == 0;
  side->stages = explicit_stages ? RandomStages(rng, model.num_layers, spec.pp)
                                 : EvenLayerSplit(model.num_layers, spec.pp);
  if (explicit_stages) spec.layers_per_stage = side->stages;
  spec.layout = static_cast<LayoutKind>(rng() % 3);
  const int kTpb[] = {1, 2, 3, 4, 5, 8, 16};
  spec.tokens_per_block = kTpb[rng() % 7];
  auto topology = Topology::Create(spec);
  ASSERT_TRUE(topology.ok()) << topology.status();
  side->topology = std::make_unique<Topology>(*topology);

  const int64_t needed = (end + spec.tokens_per_block - 1) / spec.tokens_per_block;
  for (int r = 0; r < side->topology->num_ranks(); ++r) {
    const OracleRank o = OraclePlacement(model.num_kv_heads, spec.tp, side->stages, r);
    OraclePool pool;
    pool.kind = spec.layout;
    pool.L = o.num_layers;
    pool.K = model.kv_factor;
    pool.H = o.num_heads;
    pool.T = spec.tokens_per_block;
    pool.R = int64_t{model.head_dim} * DTypeBytes(dtype);
    pool.N = needed + static_cast<int64_t>(rng() % 6);
    pool.per_layer = spec.layout != LayoutKind::kBlockMajorHnd && pool.L > 1 && rng() % 3 == 0;
    const int64_t rows = pool.L * pool.K * pool.N * pool.H * pool.T;
    const size_t count = pool.per_layer ? static_cast<size_t>(pool.L) : 1;
    const size_t bytes = static_cast<size_t>(rows * pool.R) / count;
    pool.memory.assign(count, std::vector<std::byte>(bytes, kSentinel));
    if (fill) {
      for (auto& m : pool.memory) {
        for (auto& b : m) b = static_cast<std::byte>(rng());
      }
    }
    PoolGeometry g{static_cast<int>(pool.L),
                   static_cast<int>(pool.K),
                   static_cast<int>(pool.H),
                   static_cast<int>(pool.T),
                   model.head_dim,
                   DTypeBytes(dtype),
                   pool.N};
    Result<PoolLayout> layout = [&]() -> Result<PoolLayout> {
      if (!pool.per_layer) {
        return PoolLayout::Create(spec.layout, g, Addr::FromPointer(pool.memory[0].data()));
      }
      std::vector<Addr> bases;
      for (auto& m : pool.memory) bases.push_back(Addr::FromPointer(m.data()));
      return PoolLayout::CreatePerLayer(spec.layout, g, bases);
    }();
    ASSERT_TRUE(layout.ok()) << layout.status();
    ASSERT_EQ(layout->pool_bytes(), rows * pool.R);
    side->layouts.push_back(*layout);
    side->pools.push_back(std::move(pool));

    std::vector<int32_t> ids(static_cast<size_t>(side->pools.back().N));
    std::iota(ids.begin(), ids.end(), 0);
    if (rng() % 5 != 0) std::shuffle(ids.begin(), ids.end(), rng);  // else: sequential ids merge
    ids.resize(static_cast<size_t>(needed));
    side->tables.push_back(ids);
  }
}

// Copies `list` with `src_base`/`dst_base` through the engine.
void RunCopies(CopyEngine& engine, std::span<const Fragment> list, Addr src_base, Addr dst_base) {
  ASSERT_TRUE(engine.CopySync(CopyBatch{list, src_base, dst_base}).ok());
}

// Checks that the packed-side fields of `list` tile [0, bytes) exactly once.
void ExpectTiles(std::span<const Fragment> plan_list, bool packed_is_dst, uint64_t bytes) {
  std::vector<Fragment> list(plan_list.begin(), plan_list.end());
  auto key = [&](const Fragment& f) { return packed_is_dst ? f.dst : f.src; };
  std::sort(list.begin(), list.end(),
            [&](const Fragment& a, const Fragment& b) { return key(a) < key(b); });
  uint64_t next = 0;
  for (const Fragment& f : list) {
    ASSERT_EQ(key(f), next) << "packed stream has a gap or an overlap";
    ASSERT_GT(f.bytes, 0u);
    next += f.bytes;
  }
  EXPECT_EQ(next, bytes);
}

TEST(PlannerPropertyTest, MatchesPerElementOracleOnRandomTopologies) {
  auto engine = CpuCopyEngine::Create();
  ASSERT_TRUE(engine.ok()) << engine.status();
  int trials_with_duplicates = 0, trials_with_mla = 0, trials_uneven = 0, trials_fan_in = 0,
      trials_fan_out = 0, trials_unaligned = 0, trials_mixed_tpb = 0, trials_per_layer = 0,
      trials_tiled_ordered = 0, trials_tiled_unordered = 0;
  constexpr int kTrials = 1200;
  for (int trial = 0; trial < kTrials; ++trial) {
    SCOPED_TRACE("trial " + std::to_string(trial));
    std::mt19937_64 rng(0x5eed0000 + trial);
    const bool mla = rng() % 6 == 0;
    const int kHeads[] = {1, 2, 4, 8};
    const int kDims[] = {1, 2, 3, 4, 8};
    const DType kDtypes[] = {DType::kFp8, DType::kBf16, DType::kFp32};
    ModelShape model{"random", 1 + static_cast<int>(rng() % 6), mla ? 1 : kHeads[rng() % 4],
                     kDims[rng() % 5], mla ? 1 : 2};
    const DType dtype = kDtypes[rng() % 3];
    const int64_t end = 1 + static_cast<int64_t>(rng() % 40);
    const int64_t start = static_cast<int64_t>(rng() % static_cast<uint64_t>(end));
    const TokenRange tokens{start, end};

    Side ctx, gen;
    BuildSide(rng, model, dtype, end, /*fill=*/true, &ctx);
    BuildSide(rng, model, dtype, end, /*fill=*/false, &gen);
    if (HasFatalFailure()) return;
    const int ctx_tp = ctx.spec.tp, gen_tp = gen.spec.tp;
    trials_with_duplicates += (ctx_tp > model.num_kv_heads && !mla);
    trials_with_mla += mla && ctx_tp > 1;
    trials_uneven += !ctx.spec.layers_per_stage.empty() || !gen.spec.layers_per_stage.empty();
    trials_fan_in += ctx_tp > gen_tp || ctx.spec.pp > gen.spec.pp;
    trials_fan_out += ctx_tp < gen_tp || ctx.spec.pp < gen.spec.pp;
    trials_unaligned +=
        start % gen.spec.tokens_per_block != 0 || end % gen.spec.tokens_per_block != 0;
    trials_mixed_tpb += ctx.spec.tokens_per_block != gen.spec.tokens_per_block;
    for (const auto& p : ctx.pools) trials_per_layer += p.per_layer;

    const std::vector<std::vector<std::vector<std::byte>>> ctx_before = [&] {
      std::vector<std::vector<std::vector<std::byte>>> copy;
      for (const auto& p : ctx.pools) copy.push_back(p.memory);
      return copy;
    }();

    for (int g = 0; g < gen.topology->num_ranks(); ++g) {
      SCOPED_TRACE("gen rank " + std::to_string(g));
      const OraclePool& gp = gen.pools[g];
      const OracleRank go = OraclePlacement(model.num_kv_heads, gen_tp, gen.stages, g);

      // The oracle's receiver pool: sentinel everywhere, and each row in the
      // range copied from the one ctx rank the writer rule picks.
      std::vector<std::vector<std::byte>> expected = gp.memory;
      uint64_t expected_bytes_from[64] = {};
      for (int64_t l = 0; l < gp.L; ++l) {
        for (int64_t h = 0; h < gp.H; ++h) {
          const int gl = go.first_layer + static_cast<int>(l);
          const int gh = go.first_head + static_cast<int>(h);
          std::vector<int> holders;
          for (int c = 0; c < ctx.topology->num_ranks(); ++c) {
            const OracleRank co = OraclePlacement(model.num_kv_heads, ctx_tp, ctx.stages, c);
            if (gl >= co.first_layer && gl < co.first_layer + co.num_layers &&
                gh >= co.first_head && gh < co.first_head + co.num_heads) {
              holders.push_back(c);
            }
          }
          ASSERT_FALSE(holders.empty());
          const int c = holders[static_cast<size_t>(go.tp_rank) % holders.size()];
          const OracleRank co = OraclePlacement(model.num_kv_heads, ctx_tp, ctx.stages, c);
          const OraclePool& cp = ctx.pools[c];
          for (int64_t kv = 0; kv < gp.K; ++kv) {
            for (int64_t t = start; t < end; ++t) {
              const auto [sa, so] =
                  cp.Row(gl - co.first_layer, kv, ctx.tables[c][static_cast<size_t>(t / cp.T)],
                         gh - co.first_head, t % cp.T);
              const auto [da, dof] =
                  gp.Row(l, kv, gen.tables[g][static_cast<size_t>(t / gp.T)], h, t % gp.T);
              std::memcpy(expected[da].data() + dof, cp.memory[sa].data() + so,
                          static_cast<size_t>(gp.R));
              expected_bytes_from[c] += static_cast<uint64_t>(gp.R);
            }
          }
        }
      }

      std::vector<std::vector<std::byte>> bounced = gp.memory, direct = gp.memory,
                                          chunked = gp.memory;
      std::vector<PoolLayout> bounced_layout, direct_layout;
      auto rebased = [&](const PoolLayout& layout, std::vector<std::vector<std::byte>>& mem) {
        std::vector<Addr> bases;
        for (auto& m : mem) bases.push_back(Addr::FromPointer(m.data()));
        auto r = layout.Rebased(bases);
        EXPECT_TRUE(r.ok());
        return *r;
      };
      const PoolLayout bounce_pool = rebased(gen.layouts[g], bounced);
      const PoolLayout direct_pool = rebased(gen.layouts[g], direct);
      const PoolLayout chunked_pool = rebased(gen.layouts[g], chunked);
      std::vector<Addr> zero_bases(gp.per_layer ? static_cast<size_t>(gp.L) : 1, Addr());

      for (int c = 0; c < ctx.topology->num_ranks(); ++c) {
        SCOPED_TRACE("ctx rank " + std::to_string(c));
        const PlanSide writer{ctx.topology.get(), c, &ctx.layouts[c], ctx.tables[c]};
        const PlanSide to_bounce{gen.topology.get(), g, &bounce_pool, gen.tables[g]};
        const PlanSide to_direct{gen.topology.get(), g, &direct_pool, gen.tables[g]};
        auto full = PlanPair(writer, to_bounce, tokens, kPlanGather | kPlanScatter);
        ASSERT_TRUE(full.ok()) << full.status();
        auto dir = PlanPair(writer, to_direct, tokens, kPlanDirect);
        ASSERT_TRUE(dir.ok()) << dir.status();
        EXPECT_EQ(full->packed_bytes, expected_bytes_from[c]);

        // The tiled forms expand to the very same lists.
        auto tiled = PlanPair(writer, to_bounce, tokens, kPlanGather | kPlanScatter | kPlanTiled);
        auto tiled_dir = PlanPair(writer, to_direct, tokens, kPlanDirect | kPlanTiled);
        ASSERT_TRUE(tiled.ok()) << tiled.status();
        ASSERT_TRUE(tiled_dir.ok()) << tiled_dir.status();
        EXPECT_TRUE(tiled->gather.empty() && tiled->scatter.empty() && tiled_dir->direct.empty());
        EXPECT_EQ(tiled->fingerprint, full->fingerprint);
        EXPECT_EQ(tiled->packed_bytes, full->packed_bytes);
        for (const auto& [list, flat] : {std::pair{&tiled->tiled_gather, &full->gather},
                                         std::pair{&tiled->tiled_scatter, &full->scatter},
                                         std::pair{&tiled_dir->tiled_direct, &dir->direct}}) {
          EXPECT_TRUE(list->WellFormed());
          EXPECT_EQ(list->TotalBytes(), full->packed_bytes);
          FragmentList expanded;
          list->ExpandTo(&expanded);
          EXPECT_EQ(expanded, *flat);
        }

        // Each side plans alone, knowing only the other's shape: they agree.
        std::vector<Addr> ctx_zero(ctx.pools[c].per_layer ? static_cast<size_t>(ctx.pools[c].L) : 1,
                                   Addr());
        const PoolLayout ctx_shape = *ctx.layouts[c].Rebased(ctx_zero);
        const PoolLayout gen_shape = *gen.layouts[g].Rebased(zero_bases);
        auto sender_only =
            PlanPair(writer, PlanSide{gen.topology.get(), g, &gen_shape, {}}, tokens, kPlanGather);
        auto receiver_only = PlanPair(PlanSide{ctx.topology.get(), c, &ctx_shape, {}}, to_bounce,
                                      tokens, kPlanScatter);
        ASSERT_TRUE(sender_only.ok()) << sender_only.status();
        ASSERT_TRUE(receiver_only.ok()) << receiver_only.status();
        EXPECT_EQ(sender_only->packed_bytes, receiver_only->packed_bytes);
        EXPECT_EQ(sender_only->fingerprint, receiver_only->fingerprint);
        EXPECT_EQ(sender_only->fingerprint, full->fingerprint);
        EXPECT_EQ(sender_only->gather, full->gather);
        EXPECT_EQ(receiver_only->scatter, full->scatter);

        // Counting walks the same lists without building them.
        auto counted = CountPlanRuns(writer, to_direct, tokens);
        ASSERT_TRUE(counted.ok()) << counted.status();
        EXPECT_EQ(counted->packed_bytes, full->packed_bytes);
        EXPECT_EQ(counted->gather, full->gather.size());
        EXPECT_EQ(counted->scatter, full->scatter.size());
        EXPECT_EQ(counted->direct, dir->direct.size());
        EXPECT_EQ(counted->fingerprint, full->fingerprint);
        // The totals alone (a receiver that copies nothing) agree too.
        auto totals =
            PlanTotals(PlanSide{ctx.topology.get(), c, &ctx.layouts[c], {}}, to_direct, tokens);
        ASSERT_TRUE(totals.ok()) << totals.status();
        EXPECT_EQ(totals->packed_bytes, full->packed_bytes);
        EXPECT_EQ(totals->fingerprint, full->fingerprint);
        EXPECT_EQ(totals->gather + totals->scatter + totals->direct, 0u);
        // The receiver's count, without the writer's table, is that of a
        // table of descending (never adjacent) blocks.
        std::vector<int32_t> descending(ctx.tables[c].size());
        for (size_t i = 0; i < descending.size(); ++i) {
          descending[i] = static_cast<int32_t>(descending.size() - 1 - i);
        }
        auto unknown = CountPlanRuns(PlanSide{ctx.topology.get(), c, &ctx.layouts[c], {}},
                                     to_direct, tokens, kPlanGather | kPlanDirect);
        auto stand_in = PlanPair(PlanSide{ctx.topology.get(), c, &ctx.layouts[c], descending},
                                 to_direct, tokens, kPlanGather | kPlanDirect);
        ASSERT_TRUE(unknown.ok()) << unknown.status();
        ASSERT_TRUE(stand_in.ok()) << stand_in.status();
        EXPECT_EQ(unknown->gather, stand_in->gather.size());
        EXPECT_EQ(unknown->direct, stand_in->direct.size());
        EXPECT_EQ(unknown->scatter, 0u);  // not asked for
        // A count told to stop at a limit: at least the limit and at most
        // the full count where the full count reaches it, the full count
        // where it does not.
        for (const uint64_t limit : {uint64_t{0}, uint64_t{1}, unknown->direct / 2 + 1,
                                     unknown->direct, unknown->direct + 1}) {
          auto stopped = CountPlanRuns(PlanSide{ctx.topology.get(), c, &ctx.layouts[c], {}},
                                       to_direct, tokens, kPlanGather | kPlanDirect, limit);
          ASSERT_TRUE(stopped.ok()) << stopped.status();
          EXPECT_EQ(stopped->packed_bytes, unknown->packed_bytes);
          EXPECT_EQ(stopped->fingerprint, unknown->fingerprint);
          for (auto [part, whole] : {std::pair{stopped->direct, unknown->direct},
                                     std::pair{stopped->gather, unknown->gather}}) {
            if (whole >= limit) {
              EXPECT_GE(part, limit) << "limit " << limit;
              EXPECT_LE(part, whole) << "limit " << limit;
            } else {
              EXPECT_EQ(part, whole) << "limit " << limit;
            }
          }
        }
        // A direct run ends only where a gather run or a scatter run ends
        // (the same walk): D <= G + S - 1, with the writer's table known or
        // not. `auto` relies on it: where the writer maps this rank's pool,
        // bounce cannot be cheaper than direct, whatever G and S are, so it
        // does not count them (docs/paths.md).
        if (counted->direct > 0) {
          EXPECT_LE(counted->direct + 1, counted->gather + counted->scatter);
          auto unknown_scatter = CountPlanRuns(PlanSide{ctx.topology.get(), c, &ctx.layouts[c], {}},
                                               to_direct, tokens, kPlanScatter);
          ASSERT_TRUE(unknown_scatter.ok()) << unknown_scatter.status();
          EXPECT_LE(unknown->direct + 1, unknown->gather + unknown_scatter->scatter);
        }

        if (full->packed_bytes == 0) {
          EXPECT_TRUE(full->gather.empty() && full->scatter.empty() && dir->direct.empty());
          continue;
        }
        ExpectTiles(full->gather, /*packed_is_dst=*/true, full->packed_bytes);
        ExpectTiles(full->scatter, /*packed_is_dst=*/false, full->packed_bytes);
        uint64_t direct_bytes = 0;
        for (const Fragment& f : dir->direct) direct_bytes += f.bytes;
        EXPECT_EQ(direct_bytes, full->packed_bytes);

        std::vector<std::byte> packed(full->packed_bytes + 64, kSentinel);
        RunCopies(**engine, full->gather, Addr(), Addr::FromPointer(packed.data()));
        for (size_t i = full->packed_bytes; i < packed.size(); ++i) {
          ASSERT_EQ(packed[i], kSentinel) << "gather wrote past the packed stream";
        }
        RunCopies(**engine, full->scatter, Addr::FromPointer(packed.data()), Addr());
        RunCopies(**engine, dir->direct, Addr(), Addr());

        // Streamed (layout/chunking.h): the same plan cut into chunks of a
        // random size (one byte, a few, mid-run, the whole stream, more),
        // each gathered into one chunk slot and scattered out of it, both
        // sides slicing their own list.
        auto to_chunked =
            PlanPair(writer, PlanSide{gen.topology.get(), g, &chunked_pool, gen.tables[g]}, tokens,
                     kPlanGather | kPlanScatter);
        ASSERT_TRUE(to_chunked.ok()) << to_chunked.status();
        // The same lists in tiled form: where they are in packed order, a
        // chunk sliced from them copies what the flat slice copies.
        auto tiled_chunked =
            PlanPair(writer, PlanSide{gen.topology.get(), g, &chunked_pool, gen.tables[g]}, tokens,
                     kPlanGather | kPlanScatter | kPlanTiled);
        ASSERT_TRUE(tiled_chunked.ok()) << tiled_chunked.status();
        const bool gather_ordered =
            TiledInPackedOrder(tiled_chunked->tiled_gather, PackedSide::kDestination);
        const bool scatter_ordered =
            TiledInPackedOrder(tiled_chunked->tiled_scatter, PackedSide::kSource);
        trials_tiled_ordered += gather_ordered && scatter_ordered ? 1 : 0;
        trials_tiled_unordered += gather_ordered && scatter_ordered ? 0 : 1;
        OrderForSlicing(to_chunked->gather, PackedSide::kDestination);
        OrderForSlicing(to_chunked->scatter, PackedSide::kSource);
        const uint64_t bytes = full->packed_bytes;
        const uint64_t kChunks[] = {1, 1 + rng() % 64, 1 + rng() % bytes, bytes, bytes + 7};
        // At most 256 chunks a stream: one-byte chunks on streams of up to
        // 256 bytes.
        const uint64_t chunk = std::max(kChunks[rng() % 5], (bytes + 255) / 256);
        Result<ChunkCut> cut = ChunkCut::Create(bytes, chunk);
        ASSERT_TRUE(cut.ok()) << cut.status();
        for (uint64_t k = 0; k < cut->num_chunks(); ++k) {
          for (auto [ordered, tiled, flat, side] :
               {std::tuple{gather_ordered, &tiled_chunked->tiled_gather, &to_chunked->gather,
                           PackedSide::kDestination},
                std::tuple{scatter_ordered, &tiled_chunked->tiled_scatter, &to_chunked->scatter,
                           PackedSide::kSource}}) {
            if (!ordered) continue;
            TiledList tiled_slice;
            FragmentList flat_slice;
            ASSERT_TRUE(
                SliceTiledChunk(*tiled, side, cut->begin(k), cut->end(k), &tiled_slice).ok());
            ASSERT_TRUE(SliceChunk(*flat, side, cut->begin(k), cut->end(k), &flat_slice).ok());
            ASSERT_EQ(CanonicalRuns(tiled_slice, side), CanonicalRuns(flat_slice, side))
                << "chunk " << k << " of " << cut->num_chunks() << ", "
                << (side == PackedSide::kDestination ? "gather" : "scatter");
          }
        }
        std::vector<std::byte> slot(std::min(chunk, bytes) + 64, kSentinel);
        for (uint64_t k = 0; k < cut->num_chunks(); ++k) {
          FragmentList gather, scatter;
          const Status g_sliced = SliceChunk(to_chunked->gather, PackedSide::kDestination,
                                             cut->begin(k), cut->end(k), &gather);
          ASSERT_TRUE(g_sliced.ok()) << g_sliced;
          const Status s_sliced = SliceChunk(to_chunked->scatter, PackedSide::kSource,
                                             cut->begin(k), cut->end(k), &scatter);
          ASSERT_TRUE(s_sliced.ok()) << s_sliced;
          // Copied here run by run (the engine's own per-batch cost would
          // dominate this many small batches).
          std::fill(slot.begin(), slot.end(), kSentinel);
          for (const Fragment& f : gather) {
            std::memcpy(slot.data() + f.dst, reinterpret_cast<const void*>(f.src), f.bytes);
          }
          ASSERT_EQ(slot[cut->size(k)], kSentinel) << "a chunk's gather wrote past its slot";
          for (const Fragment& f : scatter) {
            std::memcpy(reinterpret_cast<void*>(f.dst), slot.data() + f.src, f.bytes);
          }
        }
      }
      ASSERT_EQ(bounced, expected) << "gather + scatter differs from the oracle";
      ASSERT_EQ(chunked, expected) << "the chunked gather + scatter differs from the oracle";
      ASSERT_EQ(direct, expected) << "direct differs from the oracle";
    }
    for (size_t c = 0; c < ctx.pools.size(); ++c) {
      ASSERT_EQ(ctx.pools[c].memory, ctx_before[c]) << "a sender pool was written";
    }
  }
  // The random draw must have covered every feature the planner handles.
  EXPECT_GT(trials_with_duplicates, 20);
  EXPECT_GT(trials_with_mla, 20);
  EXPECT_GT(trials_uneven, 100);
  EXPECT_GT(trials_fan_in, 100);
  EXPECT_GT(trials_fan_out, 100);
  EXPECT_GT(trials_unaligned, 100);
  EXPECT_GT(trials_mixed_tpb, 100);
  EXPECT_GT(trials_per_layer, 50);
  EXPECT_GT(trials_tiled_ordered, 100);
  EXPECT_GT(trials_tiled_unordered, 20);
}

}  // namespace
}  // namespace kvbounce
