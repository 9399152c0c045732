// PoolLayout: the strided descriptor of one rank's KV pool (docs/architecture.md §2).
//
//   address(layer, kv, block, head, token, d) =
//       layer_base(layer) + layer*s_layer + kv*s_kv + block*s_block
//     + head*s_head + token*s_token + d*elem_bytes
//
// Indices are rank-local: `layer` counts from the rank's first layer, `head`
// from its first kv head, `token` within the block. The strides follow from the
// named layout and the pool's geometry; the head dim is always innermost and
// contiguous, so a (layer, kv, block, head, token) position names one *row* of
// head_dim elements.
//
// A pool is one allocation (one base address) or, for the layer-major layouts,
// one allocation per layer (per-layer bases and s_layer = 0), as engines that
// keep a tensor per layer do.
//
// Addresses may be host, device or remote: a PoolLayout only computes them.
//
// Thread safety: immutable value; safe from any thread.
#ifndef KVBOUNCE_LAYOUT_POOL_LAYOUT_H_
#define KVBOUNCE_LAYOUT_POOL_LAYOUT_H_

#include <array>
#include <cstdint>
#include <vector>

#include "kvbounce/status.h"
#include "kvbounce/types.h"
#include "layout/topology.h"

namespace kvbounce {

// The rank-local shape of a pool.
struct PoolGeometry {
  int num_layers = 0;  // layers this rank holds
  int kv_factor = 2;
  int num_heads = 0;  // kv heads this rank holds
  int tokens_per_block = 0;
  int head_dim = 0;
  uint32_t elem_bytes = 0;
  int64_t num_blocks = 0;  // pool capacity in blocks

  friend bool operator==(const PoolGeometry&, const PoolGeometry&) = default;
};

// The dimensions of a pool, as named in a layout's order.
enum class PoolDim : uint8_t { kLayer, kKv, kBlock, kHead, kToken };

class PoolLayout {
 public:
  // One allocation starting at `base`. Errors (kInvalidArgument): a
  // non-positive geometry field, a kv factor other than 1 or 2, or a pool
  // whose size does not fit in 64 bits.
  static Result<PoolLayout> Create(LayoutKind kind, const PoolGeometry& geometry, Addr base);

  // One allocation per local layer. Errors: as Create, plus a block-major
  // layout (its layers live inside each block) or a base count different from
  // geometry.num_layers.
  static Result<PoolLayout> CreatePerLayer(LayoutKind kind, const PoolGeometry& geometry,
                                           std::vector<Addr> layer_bases);

  // The geometry of rank `rank` of `topology` with `num_blocks` blocks, in the
  // instance's layout, at `base`. Errors: as Create, kOutOfRange for a bad
  // rank.
  static Result<PoolLayout> ForRank(const Topology& topology, int rank, int64_t num_blocks,
                                    Addr base);

  LayoutKind kind() const { return kind_; }
  const PoolGeometry& geometry() const { return geometry_; }

  uint64_t layer_stride() const { return s_layer_; }
  uint64_t kv_stride() const { return s_kv_; }
  uint64_t block_stride() const { return s_block_; }
  uint64_t head_stride() const { return s_head_; }
  uint64_t token_stride() const { return s_token_; }
  // Bytes of one (layer, kv, block, head, token) row: head_dim * elem_bytes.
  uint64_t row_bytes() const { return row_bytes_; }

  bool per_layer_bases() const { return layer_bases_.size() > 1; }
  // The base of local layer `layer` (the single base when not per layer).
  Addr layer_base(int layer) const {
    return layer_bases_.size() > 1 ? layer_bases_[static_cast<size_t>(layer)] : layer_bases_[0];
  }
  // Bytes spanned by one allocation: the whole pool, or one layer when the
  // bases are per layer.
  uint64_t allocation_bytes() const { return allocation_bytes_; }
  // Bytes of KV held by the pool in all.
  uint64_t pool_bytes() const;

  // The address of a row. REQUIRES: every index in range.
  Addr RowAddress(int layer, int kv, int64_t block, int head, int token) const {
    return layer_base(layer) + static_cast<uint64_t>(layer) * s_layer_ +
           static_cast<uint64_t>(kv) * s_kv_ + static_cast<uint64_t>(block) * s_block_ +
           static_cast<uint64_t>(head) * s_head_ + static_cast<uint64_t>(token) * s_token_;
  }

  // The layout's dimensions from outer to inner (the head dim, innermost in
  // every layout, is not listed).
  const std::array<PoolDim, 5>& order() const;

  // The same layout moved to other base address(es): the view a peer has of
  // this pool once it knows where the pool lives. Errors: a base count that
  // does not match this layout.
  Result<PoolLayout> Rebased(std::vector<Addr> layer_bases) const;

 private:
  PoolLayout() = default;

  LayoutKind kind_ = LayoutKind::kBlockMajorHnd;
  PoolGeometry geometry_;
  uint64_t s_layer_ = 0, s_kv_ = 0, s_block_ = 0, s_head_ = 0, s_token_ = 0;
  uint64_t row_bytes_ = 0;
  uint64_t allocation_bytes_ = 0;
  std::vector<Addr> layer_bases_;
};

}  // namespace kvbounce

#endif  // KVBOUNCE_LAYOUT_POOL_LAYOUT_H_
