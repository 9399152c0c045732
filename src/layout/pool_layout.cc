#include "layout/pool_layout.h"

#include <string>
#include <utility>

namespace kvbounce {
namespace {

// a * b, or false when it overflows.
bool Mul(uint64_t a, uint64_t b, uint64_t* out) { return !__builtin_mul_overflow(a, b, out); }

Status ValidateGeometry(const PoolGeometry& g) {
  auto bad = [](const char* field, int64_t value) {
    return InvalidArgumentError(std::string("pool geometry: ") + field + " = " +
                                std::to_string(value) + " is invalid: must be >= 1");
  };
  if (g.num_layers < 1) return bad("num_layers", g.num_layers);
  if (g.num_heads < 1) return bad("num_heads", g.num_heads);
  if (g.tokens_per_block < 1) return bad("tokens_per_block", g.tokens_per_block);
  if (g.head_dim < 1) return bad("head_dim", g.head_dim);
  if (g.elem_bytes < 1) return bad("elem_bytes", g.elem_bytes);
  if (g.num_blocks < 1) return bad("num_blocks", g.num_blocks);
  if (g.kv_factor != 1 && g.kv_factor != 2) {
    return InvalidArgumentError("pool geometry: kv_factor = " + std::to_string(g.kv_factor) +
                                " is invalid: must be 1 or 2");
  }
  return Status::Ok();
}

constexpr std::array<PoolDim, 5> kBlockMajorHndOrder = {
    PoolDim::kBlock, PoolDim::kLayer, PoolDim::kKv, PoolDim::kHead, PoolDim::kToken};
constexpr std::array<PoolDim, 5> kLayerMajorHndOrder = {
    PoolDim::kLayer, PoolDim::kKv, PoolDim::kBlock, PoolDim::kHead, PoolDim::kToken};
constexpr std::array<PoolDim, 5> kLayerMajorNhdOrder = {
    PoolDim::kLayer, PoolDim::kKv, PoolDim::kBlock, PoolDim::kToken, PoolDim::kHead};

}  // namespace

Result<PoolLayout> PoolLayout::Create(LayoutKind kind, const PoolGeometry& g, Addr base) {
  KVB_RETURN_IF_ERROR(ValidateGeometry(g));
  PoolLayout p;
  p.kind_ = kind;
  p.geometry_ = g;
  p.layer_bases_ = {base};
  const uint64_t e = g.elem_bytes;
  const uint64_t d = static_cast<uint64_t>(g.head_dim);
  const uint64_t t = static_cast<uint64_t>(g.tokens_per_block);
  const uint64_t h = static_cast<uint64_t>(g.num_heads);
  const uint64_t k = static_cast<uint64_t>(g.kv_factor);
  const uint64_t l = static_cast<uint64_t>(g.num_layers);
  const uint64_t n = static_cast<uint64_t>(g.num_blocks);
  bool ok = Mul(d, e, &p.row_bytes_);
  uint64_t block_bytes = 0;  // one block of one (layer, kv): h * t rows
  ok = ok && Mul(p.row_bytes_, h * t, &block_bytes);
  switch (kind) {
    case LayoutKind::kBlockMajorHnd:
      p.s_token_ = p.row_bytes_;
      p.s_head_ = t * p.row_bytes_;
      p.s_kv_ = block_bytes;
      p.s_layer_ = k * block_bytes;
      ok = ok && Mul(p.s_layer_, l, &p.s_block_) && Mul(p.s_block_, n, &p.allocation_bytes_);
      break;
    case LayoutKind::kLayerMajorHnd:
    case LayoutKind::kLayerMajorNhd:
      if (kind == LayoutKind::kLayerMajorHnd) {
        p.s_token_ = p.row_bytes_;
        p.s_head_ = t * p.row_bytes_;
      } else {
        p.s_head_ = p.row_bytes_;
        p.s_token_ = h * p.row_bytes_;
      }
      p.s_block_ = block_bytes;
      ok = ok && Mul(block_bytes, n, &p.s_kv_) && Mul(p.s_kv_, k, &p.s_layer_) &&
           Mul(p.s_layer_, l, &p.allocation_bytes_);
      break;
  }
  if (!ok || p.allocation_bytes_ > (uint64_t{1} << 62)) {
    return InvalidArgumentError("pool of " + std::to_string(g.num_blocks) +
                                " blocks is too large to address");
  }
  return p;
}

Result<PoolLayout> PoolLayout::CreatePerLayer(LayoutKind kind, const PoolGeometry& geometry,
                                              std::vector<Addr> layer_bases) {
  if (kind == LayoutKind::kBlockMajorHnd) {
    return InvalidArgumentError(
        "per-layer base addresses need a layer-major layout: block-major-hnd keeps every "
        "layer inside each block");
  }
  if (static_cast<int64_t>(layer_bases.size()) != geometry.num_layers) {
    return InvalidArgumentError("per-layer pool: " + std::to_string(layer_bases.size()) +
                                " base addresses given for " + std::to_string(geometry.num_layers) +
                                " layers");
  }
  KVB_ASSIGN_OR_RETURN(PoolLayout p, Create(kind, geometry, Addr()));
  if (layer_bases.size() > 1) {
    p.allocation_bytes_ = p.s_layer_;
    p.s_layer_ = 0;
  }
  p.layer_bases_ = std::move(layer_bases);
  return p;
}

Result<PoolLayout> PoolLayout::ForRank(const Topology& topology, int rank, int64_t num_blocks,
                                       Addr base) {
  KVB_ASSIGN_OR_RETURN(RankPlacement placement, topology.CheckedPlacement(rank));
  const InstanceSpec& spec = topology.spec();
  PoolGeometry g;
  g.num_layers = placement.num_layers;
  g.kv_factor = spec.model.kv_factor;
  g.num_heads = placement.num_heads;
  g.tokens_per_block = spec.tokens_per_block;
  g.head_dim = spec.model.head_dim;
  g.elem_bytes = topology.elem_bytes();
  g.num_blocks = num_blocks;
  return Create(spec.layout, g, base);
}

uint64_t PoolLayout::pool_bytes() const {
  return per_layer_bases() ? allocation_bytes_ * layer_bases_.size() : allocation_bytes_;
}

const std::array<PoolDim, 5>& PoolLayout::order() const {
  switch (kind_) {
    case LayoutKind::kBlockMajorHnd:
      return kBlockMajorHndOrder;
    case LayoutKind::kLayerMajorHnd:
      return kLayerMajorHndOrder;
    case LayoutKind::kLayerMajorNhd:
      return kLayerMajorNhdOrder;
  }
  return kBlockMajorHndOrder;
}

Result<PoolLayout> PoolLayout::Rebased(std::vector<Addr> layer_bases) const {
  if (layer_bases.size() != layer_bases_.size()) {
    return InvalidArgumentError("pool rebase: " + std::to_string(layer_bases.size()) +
                                " base addresses given, the layout has " +
                                std::to_string(layer_bases_.size()));
  }
  PoolLayout p = *this;
  p.layer_bases_ = std::move(layer_bases);
  return p;
}

}  // namespace kvbounce
