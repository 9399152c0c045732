// Hybrid models (docs/hybrid.md): the planner's state runs against a
// brute-force oracle on random hybrid shapes and topologies, plus the
// model, topology and state-pool rules.
//
// The oracle knows nothing of the planner: it re-states the state-pool
// layouts (slot-major, layer-major, per-layer bases) and the unit split
// and writer rule of kv heads, one unit at a time, and says what every
// byte of each receiver's state slot must hold. The test runs each plan's
// lists (bounce: gather + scatter; direct; chunked) and compares every
// state byte, and checks that the KV the same plans move is exactly what
// the KV-only plans move (the KV itself is the KV property test's).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "common/status_matchers.h"
#include "layout/chunking.h"
#include "layout/planner.h"
#include "layout/state_layout.h"

namespace kvbounce {
namespace {

using testing_util::StatusIs;

constexpr std::byte kSentinel{0x5A};

// --- The oracle.

struct OracleShare {
  int first, count;
};

OracleShare OracleUnits(int units, int tp, int tp_rank) {
  if (units >= tp) return {tp_rank * (units / tp), units / tp};
  return {tp_rank / (tp / units), 1};
}

// Model layer index -> recurrent ordinal (-1 for other layers).
std::vector<int> RecurrentOrdinals(const std::string& pattern) {
  std::vector<int> out;
  int n = 0;
  for (char c : pattern) out.push_back(c == 'M' ? n++ : -1);
  return out;
}

struct OracleStatePool {
  StateLayoutKind kind;
  int tp, tp_rank;
  std::vector<int> layers;  // recurrent ordinals held, in order
  int64_t slots;
  bool per_layer;
  std::vector<std::vector<std::byte>> memory;  // one, or one per layer

  uint64_t UnitBytes(const ModelShape& m, size_t t, size_t s) const {
    return static_cast<uint64_t>(m.state[t].segments[s].unit_elems) * DTypeBytes(m.state[t].dtype);
  }
  uint64_t TensorBytes(const ModelShape& m, size_t t) const {
    uint64_t b = 0;
    for (size_t s = 0; s < m.state[t].segments.size(); ++s) {
      b += UnitBytes(m, t, s) *
           static_cast<uint64_t>(OracleUnits(m.state[t].segments[s].units, tp, tp_rank).count);
    }
    return b;
  }
  uint64_t LayerBytes(const ModelShape& m) const {
    uint64_t b = 0;
    for (size_t t = 0; t < m.state.size(); ++t) b += TensorBytes(m, t);
    return b;
  }
  // Where unit u of segment s of tensor t of local layer l in `slot` lies:
  // (allocation, offset). REQUIRES: the rank holds the unit.
  std::pair<size_t, uint64_t> Unit(const ModelShape& m, size_t l, size_t t, size_t s, int u,
                                   int64_t slot) const {
    uint64_t in_tensor = 0;
    for (size_t i = 0; i < s; ++i) {
      in_tensor +=
          UnitBytes(m, t, i) *
          static_cast<uint64_t>(OracleUnits(m.state[t].segments[i].units, tp, tp_rank).count);
    }
    const OracleShare share = OracleUnits(m.state[t].segments[s].units, tp, tp_rank);
    in_tensor += static_cast<uint64_t>(u - share.first) * UnitBytes(m, t, s);
    uint64_t prefix = 0;
    for (size_t i = 0; i < t; ++i) prefix += TensorBytes(m, i);
    const uint64_t L = layers.size();
    const auto S = static_cast<uint64_t>(slots);
    const auto sl = static_cast<uint64_t>(slot);
    if (kind == StateLayoutKind::kSlotMajor) {
      return {0, (sl * L + l) * LayerBytes(m) + prefix + in_tensor};
    }
    const uint64_t within = S * prefix + sl * TensorBytes(m, t) + in_tensor;
    if (per_layer) return {l, within};
    return {0, l * S * LayerBytes(m) + within};
  }
};

struct HybridSide {
  InstanceSpec spec;
  std::unique_ptr<Topology> topology;
  std::vector<std::vector<std::byte>> kv_memory;
  std::vector<PoolLayout> kv_layouts;
  std::vector<std::vector<int32_t>> tables;
  std::vector<OracleStatePool> state;  // per rank (layers empty: none)
  std::vector<std::optional<StatePoolLayout>> state_layouts;
  std::vector<int64_t> slots;  // the request's slot per rank
};

bool TpFits(const ModelShape& m, int tp) {
  auto fits = [tp](int units) {
    return (units >= tp && units % tp == 0) || (units < tp && tp % units == 0);
  };
  if (!fits(m.num_kv_heads)) return false;
  for (const StateTensor& t : m.state) {
    for (const StateSegment& s : t.segments) {
      if (!fits(s.units)) return false;
    }
  }
  return true;
}

ModelShape RandomHybrid(std::mt19937_64& rng) {
  ModelShape m;
  m.name = "random-hybrid";
  const int layers = 2 + static_cast<int>(rng() % 9);
  std::string pattern;
  for (int i = 0; i < layers; ++i) {
    const int r = static_cast<int>(rng() % 10);
    pattern += r < 3 ? '*' : r < 8 ? 'M' : '-';
  }
  pattern[rng() % pattern.size()] = '*';
  if (pattern.find('M') == std::string::npos) {
    pattern[(pattern.find('*') + 1) % pattern.size()] = 'M';
  }
  m.layer_pattern = pattern;
  m.num_layers = static_cast<int>(std::count(pattern.begin(), pattern.end(), '*'));
  const int kHeads[] = {1, 2, 4, 8};
  m.num_kv_heads = kHeads[rng() % 4];
  m.head_dim = 1 + static_cast<int>(rng() % 4);
  const int kUnits[] = {1, 2, 3, 4, 8, 16};
  const DType kDtypes[] = {DType::kFp8, DType::kBf16, DType::kFp32};
  const int tensors = 1 + static_cast<int>(rng() % 3);
  for (int t = 0; t < tensors; ++t) {
    StateTensor st;
    st.name = "t" + std::to_string(t);
    st.dtype = kDtypes[rng() % 3];
    const int segs = 1 + static_cast<int>(rng() % 3);
    for (int s = 0; s < segs; ++s) {
      st.segments.push_back({kUnits[rng() % 6], 1 + static_cast<int>(rng() % 5)});
    }
    m.state.push_back(st);
  }
  return m;
}

// A topology for `model` with a random tp (among those that fit), pp and
// stage split; stages without an attention layer are re-drawn.
bool BuildTopology(std::mt19937_64& rng, const ModelShape& model, HybridSide* side) {
  std::vector<int> tps;
  for (int t = 1; t <= 8; ++t) {
    if (TpFits(model, t)) tps.push_back(t);
  }
  if (tps.empty()) return false;
  InstanceSpec& spec = side->spec;
  spec.model = model;
  spec.dtype = DType::kBf16;
  spec.tp = tps[rng() % tps.size()];
  spec.layout = static_cast<LayoutKind>(rng() % 3);
  spec.state_layout = static_cast<StateLayoutKind>(rng() % 2);
  spec.tokens_per_block = 1 + static_cast<int>(rng() % 4);
  const int total = model.total_layers();
  for (int attempt = 0; attempt < 20; ++attempt) {
    spec.pp = attempt < 19 ? 1 + static_cast<int>(rng() % std::min(3, total)) : 1;
    spec.layers_per_stage.clear();
    if (rng() % 2 == 0) {
      std::vector<int> stages(static_cast<size_t>(spec.pp), 1);
      for (int i = spec.pp; i < total; ++i) ++stages[rng() % stages.size()];
      spec.layers_per_stage = stages;
    }
    auto topology = Topology::Create(spec);
    if (topology.ok()) {
      side->topology = std::make_unique<Topology>(*topology);
      return true;
    }
  }
  return false;
}

void BuildPools(std::mt19937_64& rng, int64_t end, bool fill, HybridSide* side) {
  const InstanceSpec& spec = side->spec;
  const ModelShape& m = spec.model;
  const std::vector<int> ordinals = RecurrentOrdinals(m.layer_pattern);
  const int64_t needed = (end + spec.tokens_per_block - 1) / spec.tokens_per_block;
  for (int r = 0; r < side->topology->num_ranks(); ++r) {
    const RankPlacement p = side->topology->Placement(r);
    // KV: one allocation, shuffled blocks.
    const int64_t blocks = needed + static_cast<int64_t>(rng() % 3);
    PoolGeometry g{
        p.num_layers,           m.kv_factor, p.num_heads, spec.tokens_per_block, m.head_dim,
        DTypeBytes(spec.dtype), blocks};
    auto probe = PoolLayout::Create(spec.layout, g, Addr(1));
    ASSERT_TRUE(probe.ok()) << probe.status();
    side->kv_memory.emplace_back(probe->pool_bytes(), kSentinel);
    if (fill) {
      for (auto& b : side->kv_memory.back()) b = static_cast<std::byte>(rng());
    }
    side->kv_layouts.push_back(
        *PoolLayout::Create(spec.layout, g, Addr::FromPointer(side->kv_memory.back().data())));
    std::vector<int32_t> ids(static_cast<size_t>(blocks));
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    side->tables.push_back(ids);

    // State.
    OracleStatePool sp;
    sp.kind = spec.state_layout;
    sp.tp = spec.tp;
    sp.tp_rank = p.tp_rank;
    for (int l = p.first_model_layer; l < p.first_model_layer + p.num_model_layers; ++l) {
      if (ordinals[static_cast<size_t>(l)] >= 0)
        sp.layers.push_back(ordinals[static_cast<size_t>(l)]);
    }
    ASSERT_EQ(static_cast<int>(sp.layers.size()), p.num_state_layers);
    if (!sp.layers.empty()) {
      ASSERT_EQ(sp.layers.front(), p.first_state_layer);
    }
    sp.slots = 1 + static_cast<int64_t>(rng() % 4);
    sp.per_layer =
        sp.kind == StateLayoutKind::kLayerMajor && sp.layers.size() > 1 && rng() % 2 == 0;
    side->slots.push_back(static_cast<int64_t>(rng() % static_cast<uint64_t>(sp.slots)));
    if (sp.layers.empty()) {
      side->state.push_back(sp);
      side->state_layouts.emplace_back();
      continue;
    }
    const uint64_t bytes =
        sp.LayerBytes(m) * static_cast<uint64_t>(sp.slots) * (sp.per_layer ? 1 : sp.layers.size());
    sp.memory.assign(sp.per_layer ? sp.layers.size() : 1, std::vector<std::byte>(bytes, kSentinel));
    if (fill) {
      for (auto& mem : sp.memory) {
        for (auto& b : mem) b = static_cast<std::byte>(rng());
      }
    }
    std::vector<Addr> bases;
    for (auto& mem : sp.memory) bases.push_back(Addr::FromPointer(mem.data()));
    auto layout = StatePoolLayout::ForRank(*side->topology, r, sp.slots, bases);
    ASSERT_TRUE(layout.ok()) << layout.status();
    ASSERT_EQ(layout->pool_bytes(), sp.LayerBytes(m) * sp.slots * sp.layers.size());
    side->state.push_back(std::move(sp));
    side->state_layouts.push_back(*layout);
  }
}

PlanSide SideOf(HybridSide& s, int rank, const PoolLayout* kv, const StatePoolLayout* state,
                bool with_slot) {
  PlanSide p{s.topology.get(), rank, kv, s.tables[static_cast<size_t>(rank)]};
  p.state_pool = state;
  p.state_slot = with_slot ? s.slots[static_cast<size_t>(rank)] : -1;
  return p;
}

void Copy(std::span<const Fragment> list, const std::byte* src_base, std::byte* dst_base) {
  for (const Fragment& f : list) {
    std::memcpy(reinterpret_cast<std::byte*>(dst_base) + f.dst,
                reinterpret_cast<const std::byte*>(src_base) + f.src, f.bytes);
  }
}

TEST(HybridPlannerTest, StateMatchesPerUnitOracleOnRandomTopologies) {
  int trials = 0, state_only_writers = 0, duplicated_units = 0, fan_in = 0, fan_out = 0, uneven = 0,
      per_layer = 0, layer_major = 0, stateless_stages = 0;
  for (int trial = 0; trials < 400 && trial < 4000; ++trial) {
    SCOPED_TRACE("trial " + std::to_string(trial));
    std::mt19937_64 rng(0xb1d0000 + trial);
    const ModelShape model = RandomHybrid(rng);
    ASSERT_TRUE(model.Validate().ok()) << model.Validate();
    HybridSide ctx, gen;
    if (!BuildTopology(rng, model, &ctx) || !BuildTopology(rng, model, &gen)) continue;
    ++trials;
    const int64_t end = 1 + static_cast<int64_t>(rng() % 12);
    const TokenRange tokens{static_cast<int64_t>(rng() % static_cast<uint64_t>(end)), end};
    BuildPools(rng, end, /*fill=*/true, &ctx);
    BuildPools(rng, end, /*fill=*/false, &gen);
    if (HasFatalFailure()) return;
    fan_in += ctx.spec.tp > gen.spec.tp || ctx.spec.pp > gen.spec.pp;
    fan_out += ctx.spec.tp < gen.spec.tp || ctx.spec.pp < gen.spec.pp;
    uneven += !ctx.spec.layers_per_stage.empty() || !gen.spec.layers_per_stage.empty();
    layer_major += ctx.spec.state_layout == StateLayoutKind::kLayerMajor;
    for (const auto& s : ctx.state) {
      per_layer += s.per_layer;
      stateless_stages += s.layers.empty();
    }
    for (const StateTensor& t : model.state) {
      for (const StateSegment& s : t.segments) duplicated_units += s.units < ctx.spec.tp;
    }

    const auto ctx_state_before = [&] {
      std::vector<std::vector<std::vector<std::byte>>> v;
      for (const auto& s : ctx.state) v.push_back(s.memory);
      return v;
    }();

    for (int g = 0; g < gen.topology->num_ranks(); ++g) {
      SCOPED_TRACE("gen rank " + std::to_string(g));
      const OracleStatePool& gs = gen.state[static_cast<size_t>(g)];
      const RankPlacement gp = gen.topology->Placement(g);
      const int64_t g_slot = gen.slots[static_cast<size_t>(g)];

      // The oracle: every unit of the receiver's slot from the one ctx rank
      // the writer rule picks.
      std::vector<std::vector<std::byte>> expected = gs.memory;
      std::map<int, uint64_t> state_from;
      for (size_t l = 0; l < gs.layers.size(); ++l) {
        const int layer = gs.layers[l];
        for (size_t t = 0; t < model.state.size(); ++t) {
          for (size_t s = 0; s < model.state[t].segments.size(); ++s) {
            const int units = model.state[t].segments[s].units;
            const OracleShare gshare = OracleUnits(units, gen.spec.tp, gp.tp_rank);
            for (int u = gshare.first; u < gshare.first + gshare.count; ++u) {
              std::vector<int> holders;
              for (int c = 0; c < ctx.topology->num_ranks(); ++c) {
                const OracleStatePool& cs = ctx.state[static_cast<size_t>(c)];
                const OracleShare cshare = OracleUnits(units, ctx.spec.tp, cs.tp_rank);
                if (std::find(cs.layers.begin(), cs.layers.end(), layer) != cs.layers.end() &&
                    u >= cshare.first && u < cshare.first + cshare.count) {
                  holders.push_back(c);
                }
              }
              ASSERT_FALSE(holders.empty());
              const int c = holders[static_cast<size_t>(gp.tp_rank) % holders.size()];
              const OracleStatePool& cs = ctx.state[static_cast<size_t>(c)];
              const size_t cl = static_cast<size_t>(
                  std::find(cs.layers.begin(), cs.layers.end(), layer) - cs.layers.begin());
              const auto [sa, so] = cs.Unit(model, cl, t, s, u, ctx.slots[static_cast<size_t>(c)]);
              const auto [da, dof] = gs.Unit(model, l, t, s, u, g_slot);
              const uint64_t ub = gs.UnitBytes(model, t, s);
              std::memcpy(expected[da].data() + dof, cs.memory[sa].data() + so, ub);
              state_from[c] += ub;
            }
          }
        }
      }

      // The receiver's memory, three times (bounce, direct, chunked), each
      // state pool and KV pool rebased onto it.
      struct Target {
        std::vector<std::vector<std::byte>> state;
        std::vector<std::byte> kv;
        std::optional<StatePoolLayout> state_layout;
        std::optional<PoolLayout> kv_layout;
      };
      auto target = [&]() {
        Target t;
        t.state = gs.memory;
        t.kv = gen.kv_memory[static_cast<size_t>(g)];
        std::vector<Addr> bases;
        for (auto& m : t.state) bases.push_back(Addr::FromPointer(m.data()));
        if (gen.state_layouts[static_cast<size_t>(g)]) {
          t.state_layout = *gen.state_layouts[static_cast<size_t>(g)]->Rebased(bases);
        }
        t.kv_layout =
            *gen.kv_layouts[static_cast<size_t>(g)].Rebased({Addr::FromPointer(t.kv.data())});
        return t;
      };
      Target bounced = target(), direct = target(), chunked = target(), kv_only = target();
      auto state_ptr = [](Target& t) { return t.state_layout ? &*t.state_layout : nullptr; };

      const std::vector<int> writers = Writers(*ctx.topology, *gen.topology, g, true);
      for (int c = 0; c < ctx.topology->num_ranks(); ++c) {
        SCOPED_TRACE("ctx rank " + std::to_string(c));
        const auto ci = static_cast<size_t>(c);
        const StatePoolLayout* cstate = ctx.state_layouts[ci] ? &*ctx.state_layouts[ci] : nullptr;
        const PlanSide writer = SideOf(ctx, c, &ctx.kv_layouts[ci], cstate, true);
        const PlanSide to_bounce = SideOf(gen, g, &*bounced.kv_layout, state_ptr(bounced), true);
        const PlanSide to_direct = SideOf(gen, g, &*direct.kv_layout, state_ptr(direct), true);
        auto full = PlanPair(writer, to_bounce, tokens, kPlanGather | kPlanScatter);
        ASSERT_TRUE(full.ok()) << full.status();
        auto dir = PlanPair(writer, to_direct, tokens, kPlanDirect);
        ASSERT_TRUE(dir.ok()) << dir.status();
        auto kv = PlanPair(SideOf(ctx, c, &ctx.kv_layouts[ci], cstate, false),
                           SideOf(gen, g, &*kv_only.kv_layout, state_ptr(kv_only), false), tokens,
                           kPlanDirect);
        ASSERT_TRUE(kv.ok()) << kv.status();
        EXPECT_EQ(full->state_bytes, state_from[c]);
        EXPECT_EQ(full->packed_bytes, kv->packed_bytes + state_from[c]);
        EXPECT_EQ(full->box.state_empty(), state_from[c] == 0);
        EXPECT_EQ(std::count(writers.begin(), writers.end(), c) == 1, full->packed_bytes > 0);
        if (full->box.kv_empty() && !full->box.state_empty()) ++state_only_writers;
        if (full->packed_bytes > 0) {
          EXPECT_NE(full->fingerprint, kv->fingerprint);
        }

        // Tiled forms: the state is the tail, and the expansion is the flat list.
        auto tiled = PlanPair(writer, to_bounce, tokens, kPlanGather | kPlanScatter | kPlanTiled);
        ASSERT_TRUE(tiled.ok()) << tiled.status();
        for (const auto& [list, flat] : {std::pair{&tiled->tiled_gather, &full->gather},
                                         std::pair{&tiled->tiled_scatter, &full->scatter}}) {
          EXPECT_TRUE(list->WellFormed());
          EXPECT_EQ(list->TotalBytes(), full->packed_bytes);
          FragmentList expanded;
          list->ExpandTo(&expanded);
          EXPECT_EQ(expanded, *flat);
        }

        // Each side alone, knowing the other's shape only: they agree.
        std::vector<Addr> zero(ctx.state[ci].memory.size(), Addr());
        std::optional<StatePoolLayout> cshape;
        if (cstate != nullptr) cshape = *cstate->Rebased(zero);
        PlanSide receiver_view{ctx.topology.get(), c, &ctx.kv_layouts[ci], {}};
        receiver_view.state_pool = cshape ? &*cshape : nullptr;  // slot unknown: -1
        auto receiver_only = PlanPair(receiver_view, to_bounce, tokens, kPlanScatter);
        ASSERT_TRUE(receiver_only.ok()) << receiver_only.status();
        EXPECT_EQ(receiver_only->fingerprint, full->fingerprint);
        EXPECT_EQ(receiver_only->scatter, full->scatter);
        auto counted = CountPlanRuns(writer, to_direct, tokens);
        ASSERT_TRUE(counted.ok()) << counted.status();
        EXPECT_EQ(counted->state_bytes, full->state_bytes);
        EXPECT_EQ(counted->gather, full->gather.size());
        EXPECT_EQ(counted->scatter, full->scatter.size());
        EXPECT_EQ(counted->direct, dir->direct.size());

        if (full->packed_bytes == 0) continue;
        std::vector<std::byte> packed(full->packed_bytes, kSentinel);
        Copy(full->gather, nullptr, packed.data());
        Copy(full->scatter, packed.data(), nullptr);
        Copy(dir->direct, nullptr, nullptr);
        Copy(kv->direct, nullptr, nullptr);

        PlanSide to_chunked = SideOf(gen, g, &*chunked.kv_layout, state_ptr(chunked), true);
        auto chunk_plan = PlanPair(writer, to_chunked, tokens, kPlanGather | kPlanScatter);
        ASSERT_TRUE(chunk_plan.ok()) << chunk_plan.status();
        OrderForSlicing(chunk_plan->gather, PackedSide::kDestination);
        OrderForSlicing(chunk_plan->scatter, PackedSide::kSource);
        const uint64_t chunk = 1 + rng() % full->packed_bytes;
        Result<ChunkCut> cut = ChunkCut::Create(full->packed_bytes, chunk);
        ASSERT_TRUE(cut.ok());
        std::vector<std::byte> slot(chunk, kSentinel);
        for (uint64_t k = 0; k < cut->num_chunks(); ++k) {
          FragmentList gl, sl;
          ASSERT_TRUE(SliceChunk(chunk_plan->gather, PackedSide::kDestination, cut->begin(k),
                                 cut->end(k), &gl)
                          .ok());
          ASSERT_TRUE(
              SliceChunk(chunk_plan->scatter, PackedSide::kSource, cut->begin(k), cut->end(k), &sl)
                  .ok());
          Copy(gl, nullptr, slot.data());
          Copy(sl, slot.data(), nullptr);
        }
      }
      ASSERT_EQ(bounced.state, expected) << "bounce state differs from the oracle";
      ASSERT_EQ(direct.state, expected) << "direct state differs from the oracle";
      ASSERT_EQ(chunked.state, expected) << "chunked state differs from the oracle";
      ASSERT_EQ(bounced.kv, kv_only.kv) << "the KV moved with the state differs from KV only";
      ASSERT_EQ(direct.kv, kv_only.kv);
      ASSERT_EQ(chunked.kv, kv_only.kv);
    }
    for (size_t c = 0; c < ctx.state.size(); ++c) {
      ASSERT_EQ(ctx.state[c].memory, ctx_state_before[c]) << "a sender state pool was written";
    }
  }
  EXPECT_GE(trials, 400);
  EXPECT_GT(state_only_writers, 20);
  EXPECT_GT(duplicated_units, 50);
  EXPECT_GT(fan_in, 50);
  EXPECT_GT(fan_out, 50);
  EXPECT_GT(uneven, 50);
  EXPECT_GT(per_layer, 20);
  EXPECT_GT(layer_major, 50);
  EXPECT_GT(stateless_stages, 10);
}

TEST(HybridModelTest, PresetsAreValidAndMatchTheirConfigurations) {
  for (const char* name : {"jamba-v0.1", "nemotron-h-8b", "qwen3-next-80b-a3b"}) {
    auto m = FindModelPreset(name);
    ASSERT_TRUE(m.ok()) << m.status();
    EXPECT_TRUE(m->Validate().ok()) << m->Validate();
    EXPECT_TRUE(m->hybrid());
  }
  const ModelShape jamba = *FindModelPreset("jamba-v0.1");
  EXPECT_EQ(jamba.total_layers(), 32);
  EXPECT_EQ(jamba.num_layers, 4);
  EXPECT_EQ(jamba.recurrent_layers(), 28);
  EXPECT_EQ(jamba.layer_pattern.substr(0, 9), "MMMM*MMMM");
  // conv 8192 x 3 + ssm 8192 x 16, bf16.
  EXPECT_EQ(jamba.state_bytes_per_layer(), uint64_t{8192} * (3 + 16) * 2);
  const ModelShape nemotron = *FindModelPreset("nemotron-h-8b");
  EXPECT_EQ(nemotron.total_layers(), 52);
  EXPECT_EQ(nemotron.num_layers, 4);
  EXPECT_EQ(nemotron.recurrent_layers(), 24);
  // conv (8192 + 2 x 8 x 128) x 3 + ssm 128 x 64 x 128, bf16.
  EXPECT_EQ(nemotron.state_bytes_per_layer(), (uint64_t{10240} * 3 + 128 * 64 * 128) * 2);
  const ModelShape qwen = *FindModelPreset("qwen3-next-80b-a3b");
  EXPECT_EQ(qwen.total_layers(), 48);
  EXPECT_EQ(qwen.num_layers, 12);
  EXPECT_EQ(qwen.layer_pattern.substr(0, 8), "MMM*MMM*");
}

TEST(HybridModelTest, BadShapesAreRefusedNamingTheRule) {
  ModelShape m = *FindModelPreset("jamba-v0.1");
  m.layer_pattern[0] = 'x';
  EXPECT_THAT(m.Validate(), StatusIs(StatusCode::kInvalidArgument, testing::HasSubstr("'x'")));
  m = *FindModelPreset("jamba-v0.1");
  m.num_layers = 5;
  EXPECT_THAT(m.Validate(), StatusIs(StatusCode::kInvalidArgument,
                                     testing::HasSubstr("4 attention ('*') layers")));
  m = *FindModelPreset("jamba-v0.1");
  m.state.clear();
  EXPECT_THAT(m.Validate(),
              StatusIs(StatusCode::kInvalidArgument, testing::HasSubstr("no state tensor")));
  m = *FindModelPreset("jamba-v0.1");
  m.state[1].segments[0].units = 0;
  EXPECT_THAT(m.Validate(), StatusIs(StatusCode::kInvalidArgument,
                                     testing::HasSubstr("state tensor 'ssm': segment 0")));
  m = *FindModelPreset("llama-3.1-8b");
  m.state = FindModelPreset("jamba-v0.1")->state;
  EXPECT_THAT(m.Validate(), StatusIs(StatusCode::kInvalidArgument,
                                     testing::HasSubstr("without a layer pattern")));
  EXPECT_THAT(PeriodicLayerPattern(8, 4, 4).status(), StatusIs(StatusCode::kInvalidArgument));
  EXPECT_EQ(*PeriodicLayerPattern(8, 4, 3), "MMM*MMM*");
  EXPECT_THAT(ParseStateLayoutKind("row-major").status(),
              StatusIs(StatusCode::kInvalidArgument, testing::HasSubstr("slot-major")));
}

TEST(HybridTopologyTest, StagesSplitModelLayersAndEachNeedsAttention) {
  InstanceSpec spec;
  spec.model = *FindModelPreset("jamba-v0.1");  // attention at 4, 12, 20, 28
  spec.tp = 2;
  spec.pp = 4;
  auto t = Topology::Create(spec);
  ASSERT_TRUE(t.ok()) << t.status();
  const RankPlacement p = t->Placement(2 * 2 + 1);  // stage 2: model layers 16..23
  EXPECT_EQ(p.first_model_layer, 16);
  EXPECT_EQ(p.num_model_layers, 8);
  EXPECT_EQ(p.first_layer, 2);  // layer 20 is the third attention layer
  EXPECT_EQ(p.num_layers, 1);
  EXPECT_EQ(p.first_state_layer, 14);
  EXPECT_EQ(p.num_state_layers, 7);
  spec.pp = 8;  // stages of 4 layers: stage 0 (layers 0..3) has no attention
  EXPECT_THAT(Topology::Create(spec).status(),
              StatusIs(StatusCode::kInvalidArgument, testing::HasSubstr("no attention layer")));
  spec.pp = 1;
  spec.tp = 3;  // 8 kv heads do not split over 3
  EXPECT_FALSE(Topology::Create(spec).ok());
  spec.model = *FindModelPreset("nemotron-h-8b");
  spec.tp = 16;  // 8 kv heads and 8 groups duplicate, 128 heads split
  ASSERT_TRUE(Topology::Create(spec).ok());
  spec.tp = 6;
  EXPECT_THAT(Topology::Create(spec).status(),
              StatusIs(StatusCode::kInvalidArgument, testing::HasSubstr("kv heads")));
}

TEST(HybridPlannerTest, StateSlotsAndPoolsAreChecked) {
  InstanceSpec spec;
  spec.model = *FindModelPreset("jamba-v0.1");
  spec.tokens_per_block = 4;
  auto topology = Topology::Create(spec);
  ASSERT_TRUE(topology.ok());
  PoolGeometry g{4, 2, 8, 4, 128, 2, 4};
  std::vector<std::byte> kv(
      static_cast<size_t>(PoolLayout::Create(spec.layout, g, Addr(1))->pool_bytes()));
  auto pool = PoolLayout::Create(spec.layout, g, Addr::FromPointer(kv.data()));
  std::vector<std::byte> state(static_cast<size_t>(28 * spec.model.state_bytes_per_layer() * 2));
  auto sp = StatePoolLayout::ForRank(*topology, 0, 2, {Addr::FromPointer(state.data())});
  ASSERT_TRUE(sp.ok()) << sp.status();
  EXPECT_EQ(sp->pool_bytes(), state.size());
  const std::vector<int32_t> table = {0, 1};
  PlanSide w{&*topology, 0, &*pool, table};
  PlanSide r{&*topology, 0, &*pool, table};
  w.state_pool = r.state_pool = &*sp;
  w.state_slot = 0;
  r.state_slot = 2;  // the pool has 2 slots
  EXPECT_THAT(PlanPair(w, r, {0, 8}, kPlanDirect).status(),
              StatusIs(StatusCode::kOutOfRange, testing::HasSubstr("state slot 2")));
  r.state_slot = 1;
  w.state_pool = nullptr;
  EXPECT_THAT(PlanPair(w, r, {0, 8}, kPlanDirect).status(),
              StatusIs(StatusCode::kInvalidArgument, testing::HasSubstr("no state pool")));
  w.state_pool = &*sp;
  auto plan = PlanPair(w, r, {0, 8}, kPlanDirect);
  ASSERT_TRUE(plan.ok()) << plan.status();
  // One rank on each side, slot-major: the whole slot is one run.
  EXPECT_EQ(plan->state_bytes, 28 * spec.model.state_bytes_per_layer());
  EXPECT_EQ(plan->direct.back().bytes, plan->state_bytes);
  // Without the receiver's slot: KV only.
  r.state_slot = -1;
  auto kv_only = PlanPair(w, r, {0, 8}, kPlanDirect);
  ASSERT_TRUE(kv_only.ok());
  EXPECT_EQ(kv_only->state_bytes, 0u);
  EXPECT_EQ(kv_only->packed_bytes + plan->state_bytes, plan->packed_bytes);
  // Pools the rank cannot have.
  EXPECT_THAT(StatePoolLayout::ForRank(*topology, 0, 0, {Addr::FromPointer(state.data())}).status(),
              StatusIs(StatusCode::kInvalidArgument, testing::HasSubstr("num_slots")));
  EXPECT_THAT(StatePoolLayout::ForRank(*topology, 0, 2, {Addr::FromPointer(state.data()), Addr(64)})
                  .status(),
              StatusIs(StatusCode::kInvalidArgument, testing::HasSubstr("layer-major")));
  InstanceSpec plain;
  plain.model = *FindModelPreset("llama-3.1-8b");
  auto plain_topology = Topology::Create(plain);
  EXPECT_THAT(StatePoolLayout::ForRank(*plain_topology, 0, 2, {Addr(64)}).status(),
              StatusIs(StatusCode::kInvalidArgument, testing::HasSubstr("not hybrid")));
}

}  // namespace
}  // namespace kvbounce
