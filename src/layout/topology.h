// Instances, ranks and the parallel mapping of docs/architecture.md §3.
//
// An InstanceSpec describes one ctx or gen server: the model, the element
// type, its tensor- and pipeline-parallel sizes and the layout of every rank's
// KV pool. Topology::Create validates it once; afterwards a Topology answers
// which layers and kv heads each rank holds. WriterBox / Writers apply the
// writer-choice rule between a ctx instance and a gen instance, so that the
// sender and the receiver of a transfer agree on who writes what.
//
// Ranks are numbered pp_rank * tp + tp_rank.
//
// Thread safety: Topology is immutable after Create; all functions here are
// pure and safe from any thread.
#ifndef KVBOUNCE_LAYOUT_TOPOLOGY_H_
#define KVBOUNCE_LAYOUT_TOPOLOGY_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kvbounce/model.h"
#include "kvbounce/status.h"

namespace kvbounce {

// Where one rank sits and what it holds. Heads are global kv-head indices.
struct RankPlacement {
  int rank = 0;
  int tp_rank = 0;
  int tp_size = 1;
  int pp_rank = 0;
  int pp_size = 1;
  int first_layer = 0;
  int num_layers = 0;
  int first_head = 0;
  int num_heads = 0;
  // How many TP ranks of the instance hold these same heads (> 1 only when
  // heads are duplicated: kv heads < tp, MLA included), and this rank's index
  // among them, in TP order.
  int head_copies = 1;
  int copy_index = 0;
  // Hybrid models (docs/hybrid.md): the model layers of the rank's stage,
  // and among them the recurrent ones (as ordinals among the model's
  // recurrent layers). first_layer / num_layers above count attention
  // layers only — the layers of the KV pool — and equal these model layers
  // for a model that is not hybrid.
  int first_model_layer = 0;
  int num_model_layers = 0;
  int first_state_layer = 0;
  int num_state_layers = 0;
};

// The units of one state segment a TP rank holds, and how many ranks hold
// the same ones (StateSegment's rule).
struct UnitShare {
  int first = 0;
  int count = 0;
  int copies = 1;
  int copy_index = 0;
};
UnitShare SegmentShare(const StateSegment& segment, int tp, int tp_rank);

class Topology {
 public:
  // Validates the spec. Errors (kInvalidArgument, the message names the
  // instance `label`, the field, its value and the rule):
  //   the model is invalid; dtype or layout outside their enums; tp or pp
  //   < 1, tp > kMaxTp, pp > kMaxPp or tp * pp > kMaxRanks; tokens_per_block
  //   < 1;
  //   kv heads not divisible by tp (heads >= tp) or tp not divisible by kv
  //   heads (heads < tp); pp greater than the number of layers;
  //   layers_per_stage with the wrong number of entries, a stage with no
  //   layer, or stages that do not add up to the model's layers (for a
  //   hybrid model: all of the pattern's layers); a hybrid model's stage
  //   without an attention layer (every rank holds KV), a state layout
  //   outside its enum, or a state segment whose units do not split over tp
  //   as kv heads must.
  static Result<Topology> Create(InstanceSpec spec, std::string_view label = "instance");

  // Limits that keep rank arithmetic in range; far beyond any deployment
  // (kMaxPp is the wire protocol's limit on pipeline stages).
  static constexpr int kMaxTp = 1 << 16;
  static constexpr int kMaxPp = 1024;
  static constexpr int kMaxRanks = 1 << 20;

  const InstanceSpec& spec() const { return spec_; }
  int num_ranks() const { return spec_.tp * spec_.pp; }
  // The effective split (equal to spec().layers_per_stage when one was given).
  const std::vector<int>& layers_per_stage() const { return layers_per_stage_; }
  uint32_t elem_bytes() const { return DTypeBytes(spec_.dtype); }

  // REQUIRES: 0 <= rank < num_ranks().
  RankPlacement Placement(int rank) const;
  // Errors: kOutOfRange when rank is not a rank of this instance.
  Result<RankPlacement> CheckedPlacement(int rank) const;

 private:
  // Per stage: its first model layer, and the attention and recurrent
  // ordinals it starts at and holds.
  struct Stage {
    int first_model_layer = 0;
    int first_kv_layer = 0;
    int num_kv_layers = 0;
    int first_state_layer = 0;
    int num_state_layers = 0;
  };

  Topology(InstanceSpec spec, std::vector<int> stages, std::vector<Stage> stage_info)
      : spec_(std::move(spec)),
        layers_per_stage_(std::move(stages)),
        stages_(std::move(stage_info)) {}

  InstanceSpec spec_;
  std::vector<int> layers_per_stage_;  // model layers per stage
  std::vector<Stage> stages_;
};

// The default split of docs/architecture.md §3: as even as possible, earlier stages take the
// remainder. REQUIRES: 1 <= stages <= layers.
std::vector<int> EvenLayerSplit(int layers, int stages);

// Checks that a ctx and a gen instance can exchange KV at all. Errors
// (kInvalidArgument): different model shapes (layers, kv heads, head dim, kv
// factor) or different element sizes (dtype conversion is out of scope; equal
// sizes such as bf16/fp16 pass, bytes are moved as they are).
Status CheckCompatible(const Topology& ctx, const Topology& gen);

// The part of the KV cache one writer sends to one receiver: layers
// [first_layer, first_layer + num_layers) x all kv x heads [first_head,
// first_head + num_heads), all global indices. Tokens are given separately.
//
// Hybrid models, when the request carries state: also the recurrent layers
// [first_state_layer, first_state_layer + num_state_layers) (ordinals among
// the recurrent layers) x, per state segment (every tensor's segments in
// order, flattened), the units state_units[i] of it.
struct UnitRange {
  int first = 0;
  int count = 0;
  friend bool operator==(const UnitRange&, const UnitRange&) = default;
};

struct Box {
  int first_layer = 0;
  int num_layers = 0;
  int first_head = 0;
  int num_heads = 0;
  int kv_factor = 2;
  int first_state_layer = 0;
  int num_state_layers = 0;
  std::vector<UnitRange> state_units;  // empty: no state

  bool kv_empty() const { return num_layers == 0 || num_heads == 0; }
  bool state_empty() const {
    if (num_state_layers == 0) return true;
    for (const UnitRange& u : state_units) {
      if (u.count > 0) return false;
    }
    return true;
  }
  // Nothing to write: neither KV nor state.
  bool empty() const { return kv_empty() && state_empty(); }
  friend bool operator==(const Box&, const Box&) = default;
};

// The box ctx rank `ctx_rank` writes to gen rank `gen_rank`, after the
// writer-choice rule (of identical copies, the one with copy index
// gen_tp_rank mod copies writes; for state, per segment). Empty when
// ctx_rank is not a writer. `with_state`: the request carries a hybrid
// model's state (for another model, or without it, the box holds KV
// only). A rank may write state and no KV (its kv heads are another copy's
// to write, its state units are not).
// REQUIRES: CheckCompatible(ctx, gen) is OK; both ranks are valid.
Box WriterBox(const Topology& ctx, int ctx_rank, const Topology& gen, int gen_rank,
              bool with_state = false);

// Every ctx rank with a non-empty WriterBox for gen_rank, ascending.
std::vector<int> Writers(const Topology& ctx, const Topology& gen, int gen_rank,
                         bool with_state = false);

// Every gen rank that ctx_rank writes to, ascending (fan-out).
std::vector<int> Receivers(const Topology& ctx, int ctx_rank, const Topology& gen,
                           bool with_state = false);

}  // namespace kvbounce

#endif  // KVBOUNCE_LAYOUT_TOPOLOGY_H_
