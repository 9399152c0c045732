#include "layout/topology.h"

#include <algorithm>
#include <string>
#include <utility>

namespace kvbounce {
namespace {

std::string Join(const std::vector<int>& values, char sep) {
  std::string out;
  for (size_t i = 0; i < values.size(); ++i) {
    if (i > 0) out += sep;
    out += std::to_string(values[i]);
  }
  return out;
}

}  // namespace

std::string_view LayoutKindName(LayoutKind kind) {
  switch (kind) {
    case LayoutKind::kBlockMajorHnd:
      return "block-major-hnd";
    case LayoutKind::kLayerMajorHnd:
      return "layer-major-hnd";
    case LayoutKind::kLayerMajorNhd:
      return "layer-major-nhd";
  }
  return "?";
}

Result<LayoutKind> ParseLayoutKind(std::string_view name) {
  for (LayoutKind k :
       {LayoutKind::kBlockMajorHnd, LayoutKind::kLayerMajorHnd, LayoutKind::kLayerMajorNhd}) {
    if (name == LayoutKindName(k)) return k;
  }
  return InvalidArgumentError("layout '" + std::string(name) +
                              "' is not known: use block-major-hnd, layer-major-hnd or "
                              "layer-major-nhd");
}

std::vector<int> EvenLayerSplit(int layers, int stages) {
  std::vector<int> split(static_cast<size_t>(stages), layers / stages);
  for (int s = 0; s < layers % stages; ++s) ++split[static_cast<size_t>(s)];
  return split;
}

Result<Topology> Topology::Create(InstanceSpec spec, std::string_view label) {
  const std::string prefix = std::string(label) + ": ";
  Status model_status = spec.model.Validate();
  if (!model_status.ok()) return model_status.WithContext(label);
  if (DTypeBytes(spec.dtype) == 0) {
    return InvalidArgumentError(prefix + "dtype = " + std::to_string(static_cast<int>(spec.dtype)) +
                                " is not a DType: use bf16, fp16, fp8 or fp32");
  }
  if (LayoutKindName(spec.layout) == "?") {
    return InvalidArgumentError(prefix + "layout = " +
                                std::to_string(static_cast<int>(spec.layout)) +
                                " is not a LayoutKind: use block-major-hnd, layer-major-hnd or "
                                "layer-major-nhd");
  }
  if (spec.tp < 1) {
    return InvalidArgumentError(prefix + "tp = " + std::to_string(spec.tp) +
                                " is invalid: must be >= 1");
  }
  if (spec.pp < 1) {
    return InvalidArgumentError(prefix + "pp = " + std::to_string(spec.pp) +
                                " is invalid: must be >= 1");
  }
  if (spec.tp > kMaxTp || spec.pp > kMaxPp ||
      static_cast<int64_t>(spec.tp) * spec.pp > kMaxRanks) {
    return InvalidArgumentError(prefix + "tp = " + std::to_string(spec.tp) + ", pp = " +
                                std::to_string(spec.pp) + " is invalid: must be tp <= " +
                                std::to_string(kMaxTp) + ", pp <= " + std::to_string(kMaxPp) +
                                " and tp * pp <= " + std::to_string(kMaxRanks));
  }
  if (spec.tokens_per_block < 1) {
    return InvalidArgumentError(prefix +
                                "tokens_per_block = " + std::to_string(spec.tokens_per_block) +
                                " is invalid: must be >= 1");
  }
  const int heads = spec.model.num_kv_heads;
  if (heads >= spec.tp && heads % spec.tp != 0) {
    return InvalidArgumentError(prefix + "kv heads = " + std::to_string(heads) +
                                " cannot be split over tp = " + std::to_string(spec.tp) +
                                ": heads must be a multiple of tp");
  }
  if (heads < spec.tp && spec.tp % heads != 0) {
    return InvalidArgumentError(prefix + "tp = " + std::to_string(spec.tp) +
                                " cannot duplicate kv heads = " + std::to_string(heads) +
                                ": tp must be a multiple of the kv heads when it exceeds them");
  }
  for (const StateTensor& t : spec.model.state) {
    for (size_t i = 0; i < t.segments.size(); ++i) {
      const int units = t.segments[i].units;
      if ((units >= spec.tp && units % spec.tp != 0) || (units < spec.tp && spec.tp % units != 0)) {
        return InvalidArgumentError(prefix + "state tensor '" + t.name + "' segment " +
                                    std::to_string(i) + " has " + std::to_string(units) +
                                    " units: cannot be split over tp = " + std::to_string(spec.tp) +
                                    " (units must be a multiple of tp, or tp of the units)");
      }
    }
  }
  if (StateLayoutKindName(spec.state_layout) == "?") {
    return InvalidArgumentError(
        prefix + "state_layout = " + std::to_string(static_cast<int>(spec.state_layout)) +
        " is not a StateLayoutKind: use slot-major or layer-major");
  }
  const int layers = spec.model.total_layers();
  std::vector<int> stages;
  if (spec.layers_per_stage.empty()) {
    if (spec.pp > layers) {
      return InvalidArgumentError(prefix + "pp = " + std::to_string(spec.pp) +
                                  " exceeds the model's " + std::to_string(layers) +
                                  " layers: every stage needs at least one layer");
    }
    stages = EvenLayerSplit(layers, spec.pp);
  } else {
    stages = spec.layers_per_stage;
    if (static_cast<int>(stages.size()) != spec.pp) {
      return InvalidArgumentError(
          prefix + "layers_per_stage = " + Join(stages, '/') + " has " +
          std::to_string(stages.size()) +
          " entries: must have one per pipeline stage (pp = " + std::to_string(spec.pp) + ")");
    }
    long long sum = 0;
    for (int n : stages) {
      if (n < 1) {
        return InvalidArgumentError(prefix + "layers_per_stage = " + Join(stages, '/') +
                                    " is invalid: every stage needs at least one layer");
      }
      sum += n;
    }
    if (sum != layers) {
      return InvalidArgumentError(prefix + "layers_per_stage = " + Join(stages, '/') + " covers " +
                                  std::to_string(sum) +
                                  " layers: the stages must cover the model's " +
                                  std::to_string(layers) + " layers exactly");
    }
  }
  std::vector<Stage> info(stages.size());
  const std::string& pattern = spec.model.layer_pattern;
  int model_layer = 0, kv_layer = 0, state_layer = 0;
  for (size_t s = 0; s < stages.size(); ++s) {
    Stage& st = info[s];
    st.first_model_layer = model_layer;
    st.first_kv_layer = kv_layer;
    st.first_state_layer = state_layer;
    for (int i = 0; i < stages[s]; ++i, ++model_layer) {
      const char kind = pattern.empty() ? '*' : pattern[static_cast<size_t>(model_layer)];
      if (kind == '*') ++st.num_kv_layers;
      if (kind == 'M') ++st.num_state_layers;
    }
    kv_layer += st.num_kv_layers;
    state_layer += st.num_state_layers;
    if (st.num_kv_layers == 0) {
      return InvalidArgumentError(
          prefix + "pipeline stage " + std::to_string(s) + " (model layers " +
          std::to_string(st.first_model_layer) + " to " + std::to_string(model_layer - 1) +
          ") holds no attention layer: every stage needs one (choose layers_per_stage so)");
    }
  }
  spec.layers_per_stage = stages;
  return Topology(std::move(spec), std::move(stages), std::move(info));
}

UnitShare SegmentShare(const StateSegment& segment, int tp, int tp_rank) {
  UnitShare share;
  if (segment.units >= tp) {
    share.count = segment.units / tp;
    share.first = tp_rank * share.count;
  } else {
    share.count = 1;
    share.copies = tp / segment.units;
    share.first = tp_rank / share.copies;
    share.copy_index = tp_rank % share.copies;
  }
  return share;
}

RankPlacement Topology::Placement(int rank) const {
  RankPlacement p;
  p.rank = rank;
  p.tp_size = spec_.tp;
  p.pp_size = spec_.pp;
  p.tp_rank = rank % spec_.tp;
  p.pp_rank = rank / spec_.tp;
  const Stage& st = stages_[static_cast<size_t>(p.pp_rank)];
  p.first_layer = st.first_kv_layer;
  p.num_layers = st.num_kv_layers;
  p.first_model_layer = st.first_model_layer;
  p.num_model_layers = layers_per_stage_[static_cast<size_t>(p.pp_rank)];
  p.first_state_layer = st.first_state_layer;
  p.num_state_layers = st.num_state_layers;
  const int heads = spec_.model.num_kv_heads;
  if (heads >= spec_.tp) {
    p.num_heads = heads / spec_.tp;
    p.first_head = p.tp_rank * p.num_heads;
    p.head_copies = 1;
    p.copy_index = 0;
  } else {
    p.num_heads = 1;
    p.first_head = p.tp_rank * heads / spec_.tp;
    p.head_copies = spec_.tp / heads;
    p.copy_index = p.tp_rank % p.head_copies;
  }
  return p;
}

Result<RankPlacement> Topology::CheckedPlacement(int rank) const {
  if (rank < 0 || rank >= num_ranks()) {
    return OutOfRangeError("rank " + std::to_string(rank) + " is not a rank of an instance of " +
                           std::to_string(num_ranks()) + " ranks (tp " + std::to_string(spec_.tp) +
                           " x pp " + std::to_string(spec_.pp) + ")");
  }
  return Placement(rank);
}

Status CheckCompatible(const Topology& ctx, const Topology& gen) {
  const ModelShape& a = ctx.spec().model;
  const ModelShape& b = gen.spec().model;
  auto describe = [](const ModelShape& m) {
    std::string d = std::to_string(m.num_layers) + " layers, " + std::to_string(m.num_kv_heads) +
                    " kv heads, head dim " + std::to_string(m.head_dim) + ", kv factor " +
                    std::to_string(m.kv_factor);
    if (m.hybrid()) {
      d += ", layer pattern '" + m.layer_pattern + "', " + std::to_string(m.state.size()) +
           " state tensors of " + std::to_string(m.state_bytes_per_layer()) + " bytes per layer";
    }
    return d;
  };
  if (!(a == b)) {
    return InvalidArgumentError("ctx and gen models differ: ctx has " + describe(a) + ", gen has " +
                                describe(b));
  }
  if (ctx.elem_bytes() != gen.elem_bytes()) {
    return InvalidArgumentError(
        "element sizes differ: ctx " + std::string(DTypeName(ctx.spec().dtype)) + " (" +
        std::to_string(ctx.elem_bytes()) + " bytes) vs gen " +
        std::string(DTypeName(gen.spec().dtype)) + " (" + std::to_string(gen.elem_bytes()) +
        " bytes): dtype conversion is not supported");
  }
  return Status::Ok();
}

Box WriterBox(const Topology& ctx, int ctx_rank, const Topology& gen, int gen_rank,
              bool with_state) {
  const RankPlacement c = ctx.Placement(ctx_rank);
  const RankPlacement g = gen.Placement(gen_rank);
  Box box;
  box.kv_factor = ctx.spec().model.kv_factor;
  const int l0 = std::max(c.first_layer, g.first_layer);
  const int l1 = std::min(c.first_layer + c.num_layers, g.first_layer + g.num_layers);
  const int h0 = std::max(c.first_head, g.first_head);
  const int h1 = std::min(c.first_head + c.num_heads, g.first_head + g.num_heads);
  // Of identical copies of a piece, exactly one writes it.
  if (l1 > l0 && h1 > h0 && (c.head_copies == 1 || c.copy_index == g.tp_rank % c.head_copies)) {
    box.first_layer = l0;
    box.num_layers = l1 - l0;
    box.first_head = h0;
    box.num_heads = h1 - h0;
  }
  if (!with_state || !ctx.spec().model.hybrid()) return box;
  const int s0 = std::max(c.first_state_layer, g.first_state_layer);
  const int s1 =
      std::min(c.first_state_layer + c.num_state_layers, g.first_state_layer + g.num_state_layers);
  if (s1 <= s0) return box;
  bool any = false;
  std::vector<UnitRange> units;
  for (const StateTensor& t : ctx.spec().model.state) {
    for (const StateSegment& seg : t.segments) {
      const UnitShare cs = SegmentShare(seg, c.tp_size, c.tp_rank);
      const UnitShare gs = SegmentShare(seg, g.tp_size, g.tp_rank);
      const int u0 = std::max(cs.first, gs.first);
      const int u1 = std::min(cs.first + cs.count, gs.first + gs.count);
      UnitRange r;
      if (u1 > u0 && (cs.copies == 1 || cs.copy_index == g.tp_rank % cs.copies)) {
        r = UnitRange{u0, u1 - u0};
        any = true;
      }
      units.push_back(r);
    }
  }
  if (!any) return box;
  box.first_state_layer = s0;
  box.num_state_layers = s1 - s0;
  box.state_units = std::move(units);
  return box;
}

std::vector<int> Writers(const Topology& ctx, const Topology& gen, int gen_rank, bool with_state) {
  std::vector<int> writers;
  for (int c = 0; c < ctx.num_ranks(); ++c) {
    if (!WriterBox(ctx, c, gen, gen_rank, with_state).empty()) writers.push_back(c);
  }
  return writers;
}

std::vector<int> Receivers(const Topology& ctx, int ctx_rank, const Topology& gen,
                           bool with_state) {
  std::vector<int> receivers;
  for (int g = 0; g < gen.num_ranks(); ++g) {
    if (!WriterBox(ctx, ctx_rank, gen, g, with_state).empty()) receivers.push_back(g);
  }
  return receivers;
}

}  // namespace kvbounce
