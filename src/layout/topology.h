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
};

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
  //   layer, or stages that do not add up to the model's layers.
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
  Topology(InstanceSpec spec, std::vector<int> stages, std::vector<int> first_layers)
      : spec_(std::move(spec)),
        layers_per_stage_(std::move(stages)),
        first_layer_(std::move(first_layers)) {}

  InstanceSpec spec_;
  std::vector<int> layers_per_stage_;
  std::vector<int> first_layer_;  // per stage
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
struct Box {
  int first_layer = 0;
  int num_layers = 0;
  int first_head = 0;
  int num_heads = 0;
  int kv_factor = 2;

  bool empty() const { return num_layers == 0 || num_heads == 0; }
  friend bool operator==(const Box&, const Box&) = default;
};

// The box ctx rank `ctx_rank` writes to gen rank `gen_rank`, after the
// writer-choice rule (of identical copies, the one with copy index
// gen_tp_rank mod copies writes). Empty when ctx_rank is not a writer.
// REQUIRES: CheckCompatible(ctx, gen) is OK; both ranks are valid.
Box WriterBox(const Topology& ctx, int ctx_rank, const Topology& gen, int gen_rank);

// Every ctx rank with a non-empty WriterBox for gen_rank, ascending.
std::vector<int> Writers(const Topology& ctx, const Topology& gen, int gen_rank);

// Every gen rank that ctx_rank writes to, ascending (fan-out).
std::vector<int> Receivers(const Topology& ctx, int ctx_rank, const Topology& gen);

}  // namespace kvbounce

#endif  // KVBOUNCE_LAYOUT_TOPOLOGY_H_
