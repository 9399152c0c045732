// Planner speed on real model shapes (Google Benchmark). Planning is on the
// request path: the figure that matters is nanoseconds per produced run
// (gather + scatter + direct), reported as the `time_per_run` counter (seconds, with an SI prefix:
// 15n = 15 ns).
//
//   build/bench/planner_bench
#include <benchmark/benchmark.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "layout/chunking.h"
#include "layout/planner.h"
#include "layout/tiled_list.h"

namespace kvbounce {
namespace {

struct Case {
  Topology ctx;
  Topology gen;
  std::vector<PoolLayout> ctx_pools, gen_pools;
  std::vector<int32_t> ctx_table, gen_table;
};

Case MakeCase(const char* preset, int ctx_tp, int gen_tp, LayoutKind gen_layout, int64_t tokens,
              bool sequential_blocks) {
  auto make = [&](int tp, LayoutKind layout) {
    InstanceSpec spec;
    spec.model = *FindModelPreset(preset);
    spec.tp = tp;
    spec.layout = layout;
    return *Topology::Create(spec);
  };
  Case c{make(ctx_tp, LayoutKind::kBlockMajorHnd), make(gen_tp, gen_layout), {}, {}, {}, {}};
  const int64_t blocks = (tokens + 31) / 32;
  std::mt19937_64 rng(42);
  for (auto* table : {&c.ctx_table, &c.gen_table}) {
    std::vector<int32_t> ids(static_cast<size_t>(2 * blocks));
    std::iota(ids.begin(), ids.end(), 0);
    if (!sequential_blocks) std::shuffle(ids.begin(), ids.end(), rng);
    ids.resize(static_cast<size_t>(blocks));
    *table = ids;
  }
  for (int r = 0; r < c.ctx.num_ranks(); ++r) {
    c.ctx_pools.push_back(*PoolLayout::ForRank(c.ctx, r, 2 * blocks, Addr(uint64_t{1} << 40)));
  }
  for (int r = 0; r < c.gen.num_ranks(); ++r) {
    c.gen_pools.push_back(*PoolLayout::ForRank(c.gen, r, 2 * blocks, Addr(uint64_t{1} << 44)));
  }
  return c;
}

void RunPair(benchmark::State& state, const Case& c, int lists) {
  const int writer = Writers(c.ctx, c.gen, 0).front();
  const PlanSide w{&c.ctx, writer, &c.ctx_pools[static_cast<size_t>(writer)], c.ctx_table};
  const PlanSide r{&c.gen, 0, &c.gen_pools[0], c.gen_table};
  const TokenRange tokens{0, static_cast<int64_t>(c.ctx_table.size()) * 32};
  uint64_t runs = 0;
  for (auto _ : state) {
    Result<PairPlan> plan = PlanPair(w, r, tokens, static_cast<uint8_t>(lists));
    runs = plan->gather.size() + plan->scatter.size() + plan->direct.size();
    benchmark::DoNotOptimize(plan->direct.data());
  }
  state.counters["runs"] = static_cast<double>(runs);
  state.counters["time_per_run"] =
      benchmark::Counter(static_cast<double>(runs), benchmark::Counter::kIsIterationInvariantRate |
                                                        benchmark::Counter::kInvert);
  state.SetItemsProcessed(static_cast<int64_t>(runs) * state.iterations());
}

// docs/architecture.md §4's example: llama-3.1-70b, 8192 tokens, ctx TP8 -> gen TP4, both
// block-major-hnd: 40,960 direct fragments of 8 KiB per pair.
void BM_Llama70bTp8ToTp4(benchmark::State& state) {
  static const Case c = MakeCase("llama-3.1-70b", 8, 4, LayoutKind::kBlockMajorHnd, 8192, false);
  RunPair(state, c, static_cast<int>(state.range(0)));
}
BENCHMARK(BM_Llama70bTp8ToTp4)
    ->Arg(kPlanAll)
    ->Arg(kPlanGather)
    ->Arg(kPlanScatter)
    ->Arg(kPlanDirect);

// A vLLM-style layer-major-nhd receiver cuts every token into its own 256-byte
// fragment: 327,680 per list for 2048 tokens.
void BM_Llama70bTp8ToTp4Nhd(benchmark::State& state) {
  static const Case c = MakeCase("llama-3.1-70b", 8, 4, LayoutKind::kLayerMajorNhd, 2048, false);
  RunPair(state, c, static_cast<int>(state.range(0)));
}
BENCHMARK(BM_Llama70bTp8ToTp4Nhd)->Arg(kPlanAll)->Arg(kPlanDirect);

// Whole blocks that coalesce: TP8 -> TP8 moves 1.25 MiB blocks; with
// consecutive block ids everything merges into one run per list. The cost is
// then one step per block, not per element or token.
void BM_Llama70bTp8ToTp8(benchmark::State& state) {
  static const Case shuffled =
      MakeCase("llama-3.1-70b", 8, 8, LayoutKind::kBlockMajorHnd, 8192, false);
  static const Case sequential =
      MakeCase("llama-3.1-70b", 8, 8, LayoutKind::kBlockMajorHnd, 8192, true);
  RunPair(state, state.range(0) ? sequential : shuffled, kPlanAll);
}
BENCHMARK(BM_Llama70bTp8ToTp8)->ArgName("sequential_blocks")->Arg(0)->Arg(1);

// What `auto` adds to a pull on the receiver (docs/paths.md): counting the
// gather and direct runs of a writer whose block table it does not know,
// building no list. The same walk as planning; per run it should cost less.
void BM_CountRunsForAuto(benchmark::State& state) {
  static const Case hnd = MakeCase("llama-3.1-70b", 8, 4, LayoutKind::kBlockMajorHnd, 8192, false);
  static const Case nhd = MakeCase("llama-3.1-70b", 8, 4, LayoutKind::kLayerMajorNhd, 2048, false);
  const Case& c = state.range(0) ? nhd : hnd;
  const int writer = Writers(c.ctx, c.gen, 0).front();
  const PlanSide w{&c.ctx, writer, &c.ctx_pools[static_cast<size_t>(writer)], {}};
  const PlanSide r{&c.gen, 0, &c.gen_pools[0], c.gen_table};
  const TokenRange tokens{0, static_cast<int64_t>(c.ctx_table.size()) * 32};
  uint64_t runs = 0;
  for (auto _ : state) {
    Result<PlanRuns> counted = CountPlanRuns(w, r, tokens, kPlanGather | kPlanDirect);
    runs = counted->gather + counted->direct;
    benchmark::DoNotOptimize(runs);
  }
  state.counters["runs"] = static_cast<double>(runs);
  state.counters["time_per_run"] =
      benchmark::Counter(static_cast<double>(runs), benchmark::Counter::kIsIterationInvariantRate |
                                                        benchmark::Counter::kInvert);
}
BENCHMARK(BM_CountRunsForAuto)->ArgName("nhd")->Arg(0)->Arg(1);

// What `auto` costs a pull where every writer copies into the receiver's
// pool (docs/paths.md, "Run counts"), per writer, on the 256-byte-row shape
// of the CUDA bench: llama-3.1-8b, ctx TP2 -> gen TP1 layer-major-nhd, 512
// tokens, 16 a block (131,072 direct runs a writer). Arg 0: the totals
// alone (a named path); 1: the direct runs counted in full; 2: counted
// until per-block cannot win, which on the CUDA engine's figures for this
// writer's 32 MiB is at 4 runs (PerBlockLosesFrom).
void BM_PullEstimate8bNhd(benchmark::State& state) {
  auto make = [](int tp, LayoutKind layout) {
    InstanceSpec spec;
    spec.model = *FindModelPreset("llama-3.1-8b");
    spec.tp = tp;
    spec.layout = layout;
    spec.tokens_per_block = 16;
    return *Topology::Create(spec);
  };
  static const Topology ctx = make(2, LayoutKind::kBlockMajorHnd);
  static const Topology gen = make(1, LayoutKind::kLayerMajorNhd);
  static const PoolLayout writer_pool = *PoolLayout::ForRank(ctx, 0, 1024, Addr(uint64_t{1} << 40));
  static const PoolLayout receiver_pool =
      *PoolLayout::ForRank(gen, 0, 1024, Addr(uint64_t{1} << 44));
  std::vector<int32_t> table(32);
  std::iota(table.begin(), table.end(), 100);
  const PlanSide w{&ctx, 0, &writer_pool, {}};
  const PlanSide r{&gen, 0, &receiver_pool, table};
  const TokenRange tokens{0, 512};
  uint64_t runs = 0;
  for (auto _ : state) {
    Result<PlanRuns> counted = state.range(0) == 0 ? PlanTotals(w, r, tokens)
                               : state.range(0) == 1
                                   ? CountPlanRuns(w, r, tokens, kPlanDirect)
                                   : CountPlanRuns(w, r, tokens, kPlanDirect, /*limit=*/4);
    runs = counted->direct;
    benchmark::DoNotOptimize(runs);
  }
  state.counters["runs"] = static_cast<double>(runs);
}
BENCHMARK(BM_PullEstimate8bNhd)->ArgName("count")->Arg(0)->Arg(1)->Arg(2);

// Token count scaling of the same shape: time should grow with runs.
void BM_Llama8bTp2ToTp1Tokens(benchmark::State& state) {
  const Case c = MakeCase("llama-3.1-8b", 2, 1, LayoutKind::kBlockMajorHnd, state.range(0), false);
  RunPair(state, c, kPlanAll);
}
BENCHMARK(BM_Llama8bTp2ToTp1Tokens)->ArgName("tokens")->Arg(1024)->Arg(8192)->Arg(65536);

// A streamed request's host work on one receiver, per writer: its scatter
// list made ready to slice, then sliced into every chunk — from the flat
// list (the tiled one expanded first, as the sessions did before
// SliceTiledChunk) or from the tiled one (checked to be in packed order
// once). Llama-3.1-8B, ctx TP8 -> gen TP2, 32,768 tokens: 512 MiB a writer
// in 32 MiB chunks (the recv arena 1/16 of the request).
void BM_SliceStreamChunks(benchmark::State& state) {
  const bool tiled = state.range(0) != 0;
  const Case c = MakeCase("llama-3.1-8b", 8, 2, LayoutKind::kBlockMajorHnd, 32768, false);
  const int writer = Writers(c.ctx, c.gen, 0).front();
  const PlanSide w{&c.ctx, writer, &c.ctx_pools[static_cast<size_t>(writer)], c.ctx_table};
  const PlanSide r{&c.gen, 0, &c.gen_pools[0], c.gen_table};
  Result<PairPlan> plan = PlanPair(w, r, {0, 32768}, kPlanScatter | kPlanTiled);
  if (!plan.ok()) {
    state.SkipWithError(std::string(plan.status().message()).c_str());
    return;
  }
  constexpr uint64_t kChunk = uint64_t{32} << 20;
  uint64_t pieces = 0;
  for (auto _ : state) {
    pieces = 0;
    if (tiled) {
      if (!TiledInPackedOrder(plan->tiled_scatter, PackedSide::kSource)) {
        state.SkipWithError("the scatter list is not in packed order");
        return;
      }
      TiledList chunk;
      for (uint64_t at = 0; at < plan->packed_bytes; at += kChunk) {
        const uint64_t end = std::min(plan->packed_bytes, at + kChunk);
        benchmark::DoNotOptimize(
            SliceTiledChunk(plan->tiled_scatter, PackedSide::kSource, at, end, &chunk));
        pieces += chunk.segments.size() + chunk.tail.size();
      }
    } else {
      FragmentList flat;
      plan->tiled_scatter.ExpandTo(&flat);
      OrderForSlicing(flat, PackedSide::kSource);
      FragmentList chunk;
      for (uint64_t at = 0; at < plan->packed_bytes; at += kChunk) {
        const uint64_t end = std::min(plan->packed_bytes, at + kChunk);
        chunk.clear();
        benchmark::DoNotOptimize(SliceChunk(flat, PackedSide::kSource, at, end, &chunk));
        pieces += chunk.size();
      }
    }
    benchmark::DoNotOptimize(pieces);
  }
  // What the engine is handed over the whole stream: runs (flat) or
  // segments and edge runs (tiled).
  state.counters["pieces"] = static_cast<double>(pieces);
}
BENCHMARK(BM_SliceStreamChunks)->ArgName("tiled")->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace kvbounce

BENCHMARK_MAIN();
