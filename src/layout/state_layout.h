// StatePoolLayout: where a rank's recurrent state lives (hybrid models,
// docs/hybrid.md).
//
// A rank holds, per recurrent layer of its pipeline stage and per state
// slot, each state tensor's local share: the rank's units of every segment
// of the tensor, packed segment after segment (SegmentShare). With
// layer_bytes the sum of the shares of one layer's tensors:
//
//   slot-major   share(layer, t, slot) = base + slot * layers * layer_bytes
//                                        + layer * layer_bytes + prefix(t)
//   layer-major  share(layer, t, slot) = layer_base(layer)
//                                        + slots * prefix(t) + slot * bytes(t)
//
// where prefix(t) is the bytes of the shares of the tensors before t and,
// for layer-major, layer_base(layer) = base + layer * slots * layer_bytes
// for one allocation, or one base per layer (a tensor group per layer, as
// engines that keep a cache tensor per layer do).
//
// Addresses may be host, device or remote: a StatePoolLayout only computes
// them.
//
// Thread safety: immutable value; safe from any thread.
#ifndef KVBOUNCE_LAYOUT_STATE_LAYOUT_H_
#define KVBOUNCE_LAYOUT_STATE_LAYOUT_H_

#include <cstdint>
#include <vector>

#include "kvbounce/model.h"
#include "kvbounce/status.h"
#include "kvbounce/types.h"
#include "layout/topology.h"

namespace kvbounce {

class StatePoolLayout {
 public:
  // State slot ids are int32 on the API and the wire.
  static constexpr int64_t kMaxSlots = int64_t{1} << 31;

  // Rank `rank`'s state pool of `num_slots` slots: one base, or (layer-major
  // only) one per recurrent layer of the rank. Errors (kInvalidArgument):
  // the instance is not hybrid or the rank holds no recurrent layer,
  // num_slots outside [1, kMaxSlots), no base, a null base, several bases
  // for a slot-major layout or a count other than the rank's recurrent
  // layers, a pool whose size overflows 64 bits; kOutOfRange for a bad
  // rank.
  static Result<StatePoolLayout> ForRank(const Topology& topology, int rank, int64_t num_slots,
                                         std::vector<Addr> bases);

  // One segment of a tensor (model order, every tensor's segments in turn)
  // as this rank holds it.
  struct Segment {
    int tensor = 0;
    uint64_t offset = 0;  // of the rank's share, within the tensor's share
    int first_unit = 0;   // global unit index of the share's first unit
    int units = 0;        // units held
    uint64_t unit_bytes = 0;
  };

  StateLayoutKind kind() const { return kind_; }
  int num_layers() const { return num_layers_; }
  int64_t num_slots() const { return num_slots_; }
  const std::vector<Segment>& segments() const { return segments_; }
  // Bytes of the rank's share of tensor t in one layer and slot.
  uint64_t tensor_bytes(int t) const { return tensor_bytes_[static_cast<size_t>(t)]; }
  // Bytes of one slot on this rank: every layer's every tensor share.
  uint64_t slot_bytes() const { return layer_bytes_ * static_cast<uint64_t>(num_layers_); }
  // Bytes of the whole pool.
  uint64_t pool_bytes() const { return slot_bytes() * static_cast<uint64_t>(num_slots_); }
  // Bytes one allocation spans: the pool, or one layer with per-layer bases.
  uint64_t allocation_bytes() const;

  bool per_layer_bases() const { return bases_.size() > 1; }
  const std::vector<Addr>& bases() const { return bases_; }

  // The address of the rank's share of tensor `tensor` of local recurrent
  // layer `layer` in `slot`. REQUIRES: every index in range.
  Addr TensorAddress(int layer, int tensor, int64_t slot) const;

  // The same layout at other base address(es): a peer's view once it knows
  // where the pool lives. Errors: a base count that does not match.
  Result<StatePoolLayout> Rebased(std::vector<Addr> bases) const;

 private:
  StatePoolLayout() = default;

  StateLayoutKind kind_ = StateLayoutKind::kSlotMajor;
  int num_layers_ = 0;
  int64_t num_slots_ = 0;
  std::vector<Segment> segments_;
  std::vector<uint64_t> tensor_bytes_;
  std::vector<uint64_t> tensor_prefix_;
  uint64_t layer_bytes_ = 0;
  std::vector<Addr> bases_;
};

// Bytes of the state `box` carries: its recurrent layers times its units'
// bytes (the packed stream's state part). 0 for a box without state.
uint64_t StateBytes(const Box& box, const ModelShape& model);

}  // namespace kvbounce

#endif  // KVBOUNCE_LAYOUT_STATE_LAYOUT_H_
