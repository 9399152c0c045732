#include "layout/state_layout.h"

#include <optional>
#include <string>
#include <utility>

#include "common/checked_math.h"

namespace kvbounce {

Result<StatePoolLayout> StatePoolLayout::ForRank(const Topology& topology, int rank,
                                                 int64_t num_slots, std::vector<Addr> bases) {
  Result<RankPlacement> placement = topology.CheckedPlacement(rank);
  if (!placement.ok()) return placement.status();
  const InstanceSpec& spec = topology.spec();
  const std::string where = "state pool of rank " + std::to_string(rank) + ": ";
  if (!spec.model.hybrid() || placement->num_state_layers == 0) {
    return InvalidArgumentError(where + (spec.model.hybrid()
                                             ? "the rank's pipeline stage holds no recurrent layer"
                                             : "the model is not hybrid (no layer pattern)"));
  }
  if (num_slots < 1 || num_slots >= kMaxSlots) {
    return InvalidArgumentError(where + "num_slots = " + std::to_string(num_slots) +
                                " is invalid: must be in [1, 2^31)");
  }
  const size_t layers = static_cast<size_t>(placement->num_state_layers);
  if (bases.empty()) return InvalidArgumentError(where + "no base address");
  if (bases.size() > 1 && spec.state_layout != StateLayoutKind::kLayerMajor) {
    return InvalidArgumentError(where + "one base per layer needs the layer-major state layout");
  }
  if (bases.size() > 1 && bases.size() != layers) {
    return InvalidArgumentError(where + std::to_string(bases.size()) +
                                " bases: give one, or one per recurrent layer of the rank (" +
                                std::to_string(layers) + ")");
  }
  for (Addr b : bases) {
    if (b.value() == 0) return InvalidArgumentError(where + "a base address is null");
  }
  StatePoolLayout p;
  p.kind_ = spec.state_layout;
  p.num_layers_ = placement->num_state_layers;
  p.num_slots_ = num_slots;
  for (size_t t = 0; t < spec.model.state.size(); ++t) {
    const StateTensor& tensor = spec.model.state[t];
    uint64_t bytes = 0;
    for (const StateSegment& seg : tensor.segments) {
      const UnitShare share = SegmentShare(seg, spec.tp, placement->tp_rank);
      Segment s;
      s.tensor = static_cast<int>(t);
      s.offset = bytes;
      s.first_unit = share.first;
      s.units = share.count;
      s.unit_bytes = static_cast<uint64_t>(seg.unit_elems) * DTypeBytes(tensor.dtype);
      bytes += s.unit_bytes * static_cast<uint64_t>(s.units);
      p.segments_.push_back(s);
    }
    p.tensor_prefix_.push_back(p.layer_bytes_);
    p.tensor_bytes_.push_back(bytes);
    p.layer_bytes_ += bytes;
  }
  // The pool must fit in 64 bits (layer_bytes_ <= 8 tensors x 2^40 by
  // ModelShape::Validate; layers <= 4096).
  const std::optional<uint64_t> slot = CheckedMul(p.layer_bytes_, static_cast<uint64_t>(layers));
  if (!slot || !CheckedMul(*slot, static_cast<uint64_t>(num_slots)) ||
      *CheckedMul(*slot, static_cast<uint64_t>(num_slots)) > (uint64_t{1} << 62)) {
    return InvalidArgumentError(where + "a pool of " + std::to_string(num_slots) +
                                " slots does not fit in 64 bits");
  }
  p.bases_ = std::move(bases);
  return p;
}

uint64_t StatePoolLayout::allocation_bytes() const {
  return per_layer_bases() ? layer_bytes_ * static_cast<uint64_t>(num_slots_) : pool_bytes();
}

Addr StatePoolLayout::TensorAddress(int layer, int tensor, int64_t slot) const {
  const auto l = static_cast<uint64_t>(layer);
  const auto s = static_cast<uint64_t>(slot);
  const auto t = static_cast<size_t>(tensor);
  if (kind_ == StateLayoutKind::kSlotMajor) {
    return bases_[0] + s * slot_bytes() + l * layer_bytes_ + tensor_prefix_[t];
  }
  const uint64_t slots = static_cast<uint64_t>(num_slots_);
  const Addr layer_base =
      per_layer_bases() ? bases_[static_cast<size_t>(layer)] : bases_[0] + l * slots * layer_bytes_;
  return layer_base + slots * tensor_prefix_[t] + s * tensor_bytes_[t];
}

Result<StatePoolLayout> StatePoolLayout::Rebased(std::vector<Addr> bases) const {
  if (bases.size() != bases_.size()) {
    return InvalidArgumentError("state pool: " + std::to_string(bases.size()) +
                                " bases given for a layout with " + std::to_string(bases_.size()));
  }
  StatePoolLayout p = *this;
  p.bases_ = std::move(bases);
  return p;
}

uint64_t StateBytes(const Box& box, const ModelShape& model) {
  if (box.state_empty()) return 0;
  uint64_t per_layer = 0;
  size_t i = 0;
  for (const StateTensor& t : model.state) {
    for (const StateSegment& seg : t.segments) {
      if (i < box.state_units.size()) {
        per_layer += static_cast<uint64_t>(box.state_units[i].count) *
                     static_cast<uint64_t>(seg.unit_elems) * DTypeBytes(t.dtype);
      }
      ++i;
    }
  }
  return per_layer * static_cast<uint64_t>(box.num_state_layers);
}

}  // namespace kvbounce
