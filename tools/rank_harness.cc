#include "tools/rank_harness.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <tuple>
#include <utility>

#include "copy/device_support.h"
#include "kvbounce/logging.h"
#include "tools/device_rows.h"
#include "tools/element.h"
#include "tools/resource_limits.h"

namespace kvbounce::tools {

uint64_t ElementValue(int layer, int kv, int head, int64_t token, int d) {
  return FromSeed(RowSeed(layer, kv, head, token), d);
}

std::vector<int32_t> SlotTable(int slot, int64_t blocks_per_request, uint64_t seed) {
  std::vector<int32_t> ids(static_cast<size_t>(2 * blocks_per_request));
  std::iota(ids.begin(), ids.end(), static_cast<int32_t>(slot * 2 * blocks_per_request));
  // Fisher-Yates with the raw engine: std::shuffle's algorithm is not
  // specified, and every process must draw the same table.
  std::mt19937_64 rng(Mix(seed ^ Mix(static_cast<uint64_t>(slot))));
  for (size_t i = ids.size(); i > 1; --i) std::swap(ids[i - 1], ids[rng() % i]);
  ids.resize(static_cast<size_t>(blocks_per_request));
  return ids;
}

uint64_t CtxTableSeed(uint64_t seed, int ctx_instance) {
  const uint64_t base = Mix(seed ^ 0x6b76626f756e6365ULL);
  return ctx_instance == 0 ? base : Mix(base ^ static_cast<uint64_t>(ctx_instance));
}

uint64_t RequestTableSeed(uint64_t seed, uint64_t request_id) {
  return Mix(Mix(seed) ^ request_id);
}

std::vector<int32_t> TablePrefix(const std::vector<int32_t>& table, int64_t tokens,
                                 int tokens_per_block) {
  const size_t n = static_cast<size_t>(CeilDiv(tokens, tokens_per_block));
  return std::vector<int32_t>(table.begin(), table.begin() + static_cast<ptrdiff_t>(n));
}

Result<MemoryKind> PoolMemoryFromFlags(const std::string& memory, int device) {
  if (memory == "host") {
    if (device != 0) return InvalidArgumentError("--device applies to --memory cuda only");
    return MemoryKind::kHost;
  }
  if (memory != "cuda") {
    return InvalidArgumentError("--memory " + memory + ": unknown memory (known: host, cuda)");
  }
  const DeviceSupport* support = CudaSupport();
  if (support == nullptr) {
    return UnimplementedError(
        "--memory cuda: this build has no CUDA support (configure it where a CUDA toolkit is "
        "installed)");
  }
  std::string why;
  const int count = support->DeviceCount(&why);
  if (count == 0) return UnavailableError("--memory cuda: no usable CUDA device: " + why);
  if (device < 0 || device >= count) {
    return InvalidArgumentError("--device = " + std::to_string(device) +
                                " is not a CUDA device of this machine (it has " +
                                std::to_string(count) + ")");
  }
  return MemoryKind::kCuda;
}

RankHarness::RankHarness(const Topology& topology, const RankHarnessOptions& options,
                         PoolLayout layout)
    : topology_(topology), options_(options), layout_(std::move(layout)) {}

Result<std::unique_ptr<RankHarness>> RankHarness::Create(const Topology& topology,
                                                         const RankHarnessOptions& options) {
  if (options.slots < 1 || options.max_tokens < 1) {
    return InvalidArgumentError("rank harness: slots and max_tokens must be >= 1");
  }
  if (options.rank < 0 || options.rank >= topology.num_ranks()) {
    return OutOfRangeError("rank " + std::to_string(options.rank) + " is outside the instance (" +
                           std::to_string(topology.num_ranks()) + " ranks)");
  }
  const int64_t per_request = CeilDiv(options.max_tokens, topology.spec().tokens_per_block);
  if (per_request > kMaxPoolBlocks / 2 / options.slots) {
    return InvalidArgumentError("rank harness: " + std::to_string(options.slots) + " slots of " +
                                std::to_string(per_request) +
                                " x 2 blocks are more than 32-bit block ids name");
  }
  if (options.ctx_instance < 0) {
    return InvalidArgumentError("rank harness: ctx_instance must be >= 0");
  }
  if (options.memory != MemoryKind::kHost && options.memory != MemoryKind::kCuda) {
    return InvalidArgumentError("rank harness: pools are host or cuda memory, not " +
                                std::string(MemoryKindName(options.memory)));
  }
  const int64_t num_blocks = options.slots * 2 * per_request;
  KVB_ASSIGN_OR_RETURN(PoolLayout layout,
                       PoolLayout::ForRank(topology, options.rank, num_blocks, Addr()));
  std::unique_ptr<RankHarness> h(new RankHarness(topology, options, layout));
  const bool per_layer = options.per_layer_pools && layout.kind() != LayoutKind::kBlockMajorHnd &&
                         layout.geometry().num_layers > 1;
  const size_t allocations = per_layer ? static_cast<size_t>(layout.geometry().num_layers) : 1;
  const uint64_t bytes = per_layer ? layout.layer_stride() : layout.allocation_bytes();
  if (h->device_pool()) {
#if KVBOUNCE_HAVE_CUDA
    KVB_ASSIGN_OR_RETURN(std::unique_ptr<DeviceRowKernels> kernels,
                         DeviceRowKernels::Create(options.device));
    h->kernels_ = std::move(kernels);
    KVB_ASSIGN_OR_RETURN(h->copier_, CudaSupport()->NewOpCopier(options.device));
    for (size_t i = 0; i < allocations; ++i) {
      // Exportable (VMM) memory where the device offers it, as a serving
      // engine that shares its KV cache would allocate it: cuda-ipc then
      // passes it to peers as a descriptor (cudaMalloc memory travels by
      // IPC handle, as the staging arenas do).
      Result<std::unique_ptr<Allocation>> memory =
          CudaSupport()->AllocateExportable(options.device, static_cast<size_t>(bytes));
      if (!memory.ok() && memory.status().code() == StatusCode::kUnimplemented) {
        memory = CudaSupport()->AllocateDevice(options.device, static_cast<size_t>(bytes));
      }
      if (!memory.ok()) {
        return memory.status().WithContext("the pool of " + std::string(RoleName(options.role)) +
                                           " rank " + std::to_string(options.rank));
      }
      h->bases_.push_back((*memory)->address());
      h->device_memory_.push_back(std::move(memory).value());
    }
    std::vector<std::pair<uint64_t, uint64_t>> all;
    for (const Addr base : h->bases_) all.emplace_back(base.value(), bytes);
    KVB_RETURN_IF_ERROR(h->kernels_->FillBytes(all, static_cast<uint8_t>(kSlotSentinel)));
#else
    return UnimplementedError("rank harness: cuda pools need a build with CUDA");
#endif
  } else {
    for (size_t i = 0; i < allocations; ++i) {
      h->memory_.emplace_back(static_cast<size_t>(bytes), kSlotSentinel);
      h->bases_.push_back(Addr::FromPointer(h->memory_.back().data()));
    }
  }
  Result<PoolLayout> placed =
      per_layer ? PoolLayout::CreatePerLayer(layout.kind(), layout.geometry(), h->bases_)
                : layout.Rebased(h->bases_);
  if (!placed.ok()) return placed.status();
  h->layout_ = std::move(placed).value();
  // Hybrid models: a state pool of one slot per request slot, beside the
  // KV pool (per-layer allocations where the KV pool has them and the state
  // layout allows).
  const RankPlacement placement = topology.Placement(options.rank);
  if (topology.spec().model.hybrid() && placement.num_state_layers > 0) {
    KVB_ASSIGN_OR_RETURN(StatePoolLayout shape, StatePoolLayout::ForRank(topology, options.rank,
                                                                         options.slots, {Addr(1)}));
    const bool state_per_layer = options.per_layer_pools &&
                                 shape.kind() == StateLayoutKind::kLayerMajor &&
                                 shape.num_layers() > 1;
    const size_t count = state_per_layer ? static_cast<size_t>(shape.num_layers()) : 1;
    const uint64_t state_bytes = shape.pool_bytes() / count;
    std::vector<Addr> state_bases;
    for (size_t i = 0; i < count; ++i) {
      if (h->device_pool()) {
#if KVBOUNCE_HAVE_CUDA
        Result<std::unique_ptr<Allocation>> memory =
            CudaSupport()->AllocateDevice(options.device, static_cast<size_t>(state_bytes));
        if (!memory.ok()) {
          return memory.status().WithContext("the state pool of " +
                                             std::string(RoleName(options.role)) + " rank " +
                                             std::to_string(options.rank));
        }
        state_bases.push_back((*memory)->address());
        h->state_device_memory_.push_back(std::move(memory).value());
#endif
      } else {
        h->state_memory_.emplace_back(static_cast<size_t>(state_bytes), kSlotSentinel);
        state_bases.push_back(Addr::FromPointer(h->state_memory_.back().data()));
      }
    }
    KVB_ASSIGN_OR_RETURN(h->state_layout_, StatePoolLayout::ForRank(topology, options.rank,
                                                                    options.slots, state_bases));
    if (h->device_pool()) {
      for (int s = 0; s < options.slots; ++s) h->FillSlot(s, kSlotSentinel);
    }
  }
  if (h->ctx_side()) {
    const uint64_t seed = CtxTableSeed(options.table_seed, options.ctx_instance);
    for (int s = 0; s < options.slots; ++s) {
      h->ctx_tables_.push_back(SlotTable(s, per_request, seed));
      if (h->device_pool()) {
        KVB_RETURN_IF_ERROR(h->FillCtxOnDevice(h->ctx_tables_.back()));
      } else {
        h->FillCtx(h->ctx_tables_.back());
      }
      KVB_RETURN_IF_ERROR(h->FillCtxState(s));
    }
  }
  return h;
}

void RankHarness::ForEachStateUnit(
    int slot, const std::function<void(int, int, int, Addr, uint64_t)>& fn) const {
  if (!state_layout_) return;
  const StatePoolLayout& sp = *state_layout_;
  const int first_layer = topology_.Placement(options_.rank).first_state_layer;
  for (int l = 0; l < sp.num_layers(); ++l) {
    for (size_t i = 0; i < sp.segments().size(); ++i) {
      const StatePoolLayout::Segment& seg = sp.segments()[i];
      const Addr tensor = sp.TensorAddress(l, seg.tensor, slot);
      for (int u = 0; u < seg.units; ++u) {
        fn(first_layer + l, static_cast<int>(i), seg.first_unit + u,
           tensor + seg.offset + static_cast<uint64_t>(u) * seg.unit_bytes, seg.unit_bytes);
      }
    }
  }
}

namespace {

// The element bytes of each flattened state segment.
std::vector<int> SegmentElemBytes(const ModelShape& model) {
  std::vector<int> out;
  for (const StateTensor& t : model.state) {
    for (size_t i = 0; i < t.segments.size(); ++i) {
      out.push_back(static_cast<int>(DTypeBytes(t.dtype)));
    }
  }
  return out;
}

// Writes (or, with `check`, compares) the values of one state unit.
bool StateUnitBytes(std::byte* unit, uint64_t bytes, int elem_bytes, uint64_t seed, bool check) {
  const uint64_t elems = bytes / static_cast<uint64_t>(elem_bytes);
  for (uint64_t e = 0; e < elems; ++e) {
    const uint64_t v = FromSeed(seed, static_cast<int>(e));
    for (int b = 0; b < elem_bytes; ++b) {
      const auto want = static_cast<std::byte>(v >> (8 * b));
      std::byte& at = unit[e * static_cast<uint64_t>(elem_bytes) + static_cast<uint64_t>(b)];
      if (!check) {
        at = want;
      } else if (at != want) {
        return false;
      }
    }
  }
  return true;
}

}  // namespace

Status RankHarness::FillCtxState(int slot) {
  if (!state_layout_) return Status::Ok();
  const std::vector<int> elem = SegmentElemBytes(topology_.spec().model);
  const int instance = options_.ctx_instance;
  if (!device_pool()) {
    ForEachStateUnit(slot, [&](int layer, int seg, int unit, Addr at, uint64_t bytes) {
      StateUnitBytes(static_cast<std::byte*>(at.ToPointer()), bytes, elem[static_cast<size_t>(seg)],
                     StateUnitSeed(instance, layer, seg, unit), false);
    });
    return Status::Ok();
  }
  // Device pools: built on the host, copied over unit by unit (a few per
  // layer: no kernel needed).
  std::vector<std::vector<std::byte>> staged;
  std::vector<std::pair<Addr, size_t>> where;
  ForEachStateUnit(slot, [&](int layer, int seg, int unit, Addr at, uint64_t bytes) {
    staged.emplace_back(static_cast<size_t>(bytes));
    StateUnitBytes(staged.back().data(), bytes, elem[static_cast<size_t>(seg)],
                   StateUnitSeed(instance, layer, seg, unit), false);
    where.emplace_back(at, staged.size() - 1);
  });
  std::lock_guard<std::mutex> lock(kernels_mu_);
  for (const auto& [at, i] : where) {
    KVB_RETURN_IF_ERROR(
        copier_->Enqueue(at, Addr::FromPointer(staged[i].data()), staged[i].size()));
  }
  return copier_->Wait();
}

void RankHarness::VerifyState(int slot, int ctx_instance, VerifyResult& result) const {
  if (!state_layout_) return;
  const std::vector<int> elem = SegmentElemBytes(topology_.spec().model);
  auto check = [&](int layer, int seg, int unit, std::byte* bytes, uint64_t n) {
    result.verified_bytes += n;
    if (!StateUnitBytes(bytes, n, elem[static_cast<size_t>(seg)],
                        StateUnitSeed(ctx_instance, layer, seg, unit), true) &&
        result.mismatches++ == 0) {
      result.first_mismatch = "state: recurrent layer " + std::to_string(layer) + ", segment " +
                              std::to_string(seg) + ", unit " + std::to_string(unit) + " of slot " +
                              std::to_string(slot) + " holds wrong bytes";
    }
  };
  if (!device_pool()) {
    ForEachStateUnit(slot, [&](int layer, int seg, int unit, Addr at, uint64_t bytes) {
      check(layer, seg, unit, static_cast<std::byte*>(at.ToPointer()), bytes);
    });
    return;
  }
  std::vector<std::vector<std::byte>> copied;
  std::vector<std::tuple<int, int, int>> units;
  {
    std::lock_guard<std::mutex> lock(kernels_mu_);
    Status s;
    ForEachStateUnit(slot, [&](int layer, int seg, int unit, Addr at, uint64_t bytes) {
      copied.emplace_back(static_cast<size_t>(bytes));
      units.emplace_back(layer, seg, unit);
      if (s.ok()) s = copier_->Enqueue(Addr::FromPointer(copied.back().data()), at, bytes);
    });
    if (s.ok()) s = copier_->Wait();
    if (!s.ok()) {
      if (result.mismatches++ == 0) result.first_mismatch = "state: " + s.ToString();
      return;
    }
  }
  for (size_t i = 0; i < copied.size(); ++i) {
    const auto [layer, seg, unit] = units[i];
    check(layer, seg, unit, copied[i].data(), copied[i].size());
  }
}

RankHarness::~RankHarness() = default;

int64_t RankHarness::blocks_per_request() const {
  return CeilDiv(options_.max_tokens, topology_.spec().tokens_per_block);
}

int64_t RankHarness::num_blocks() const { return options_.slots * 2 * blocks_per_request(); }

AgentOptions RankHarness::MakeAgentOptions(const std::string& instance_id, const Config& config,
                                           std::chrono::milliseconds grace) const {
  AgentOptions agent;
  agent.instance_id = instance_id;
  agent.role = options_.role;
  agent.instance = topology_.spec();
  agent.rank = options_.rank;
  agent.pool.bases = bases_;
  agent.pool.num_blocks = num_blocks();
  agent.pool.memory = options_.memory;
  agent.pool.device = options_.device;
  if (state_layout_) {
    agent.pool.state.bases = state_layout_->bases();
    agent.pool.state.num_slots = state_layout_->num_slots();
  }
  agent.config = config;
  agent.grace = grace;
  return agent;
}

const std::vector<int32_t>& RankHarness::CtxTable(int slot) const {
  return ctx_tables_[static_cast<size_t>(slot)];
}

std::vector<int32_t> RankHarness::GenTable(int slot, int64_t tokens, uint64_t seed,
                                           uint64_t request_id) const {
  return TablePrefix(SlotTable(slot, blocks_per_request(), RequestTableSeed(seed, request_id)),
                     tokens, topology_.spec().tokens_per_block);
}

std::vector<std::pair<Addr, uint64_t>> RankHarness::SlotRanges(int slot) const {
  const int64_t blocks = 2 * blocks_per_request();
  const int32_t first = static_cast<int32_t>(slot * blocks);
  const uint64_t bytes = static_cast<uint64_t>(blocks) * layout_.block_stride();
  std::vector<std::pair<Addr, uint64_t>> out;
  if (layout_.kind() == LayoutKind::kBlockMajorHnd) {
    out.emplace_back(layout_.RowAddress(0, 0, first, 0, 0), bytes);
  } else {
    const PoolGeometry& g = layout_.geometry();
    for (int l = 0; l < g.num_layers; ++l) {
      for (int kv = 0; kv < g.kv_factor; ++kv) {
        out.emplace_back(layout_.RowAddress(l, kv, first, 0, 0), bytes);
      }
    }
  }
  if (state_layout_) {
    const StatePoolLayout& sp = *state_layout_;
    if (sp.kind() == StateLayoutKind::kSlotMajor) {
      out.emplace_back(sp.TensorAddress(0, 0, slot), sp.slot_bytes());
    } else {
      const int tensors = static_cast<int>(topology_.spec().model.state.size());
      for (int l = 0; l < sp.num_layers(); ++l) {
        for (int t = 0; t < tensors; ++t) {
          out.emplace_back(sp.TensorAddress(l, t, slot), sp.tensor_bytes(t));
        }
      }
    }
  }
  return out;
}

std::vector<std::span<std::byte>> RankHarness::SlotMemory(int slot) const {
  std::vector<std::span<std::byte>> out;
  for (const auto& [address, bytes] : SlotRanges(slot)) {
    out.emplace_back(static_cast<std::byte*>(address.ToPointer()), static_cast<size_t>(bytes));
  }
  return out;
}

Result<std::vector<std::vector<std::byte>>> RankHarness::SlotBytes(int slot) const {
  std::vector<std::vector<std::byte>> out;
  const std::vector<std::pair<Addr, uint64_t>> ranges = SlotRanges(slot);
  for (const auto& [address, bytes] : ranges) out.emplace_back(static_cast<size_t>(bytes));
  if (!device_pool()) {
    for (size_t i = 0; i < ranges.size(); ++i) {
      std::memcpy(out[i].data(), ranges[i].first.ToPointer(), out[i].size());
    }
    return out;
  }
  std::lock_guard<std::mutex> lock(kernels_mu_);
  for (size_t i = 0; i < ranges.size(); ++i) {
    KVB_RETURN_IF_ERROR(
        copier_->Enqueue(Addr::FromPointer(out[i].data()), ranges[i].first, ranges[i].second));
  }
  KVB_RETURN_IF_ERROR(copier_->Wait());
  return out;
}

void RankHarness::FillSlot(int slot, std::byte value) {
  if (device_pool()) {
#if KVBOUNCE_HAVE_CUDA
    std::vector<std::pair<uint64_t, uint64_t>> ranges;
    for (const auto& [address, bytes] : SlotRanges(slot))
      ranges.emplace_back(address.value(), bytes);
    std::lock_guard<std::mutex> lock(kernels_mu_);
    Status filled = kernels_->FillBytes(ranges, static_cast<uint8_t>(value));
    if (!filled.ok()) {
      // The next verification of the slot reports it (the sentinel is missing).
      Log(LogLevel::kError,
          "rank harness: filling slot " + std::to_string(slot) + ": " + filled.ToString());
    }
#endif
    return;
  }
  for (std::span<std::byte> m : SlotMemory(slot)) {
    std::memset(m.data(), static_cast<int>(value), m.size());
  }
}

void RankHarness::FillCtx(const std::vector<int32_t>& table) {
  if (device_pool()) {
    Status filled = FillCtxOnDevice(table);
    if (!filled.ok())
      Log(LogLevel::kError, "rank harness: filling a ctx slot: " + filled.ToString());
    return;
  }
  const int e = static_cast<int>(topology_.elem_bytes());
  const int dim = topology_.spec().model.head_dim;
  const int64_t tpb = topology_.spec().tokens_per_block;
  const RankPlacement p = topology_.Placement(options_.rank);
  for (int l = 0; l < p.num_layers; ++l) {
    for (int kv = 0; kv < layout_.geometry().kv_factor; ++kv) {
      for (int h = 0; h < p.num_heads; ++h) {
        for (int64_t t = 0; t < options_.max_tokens; ++t) {
          auto* row =
              static_cast<std::byte*>(layout_
                                          .RowAddress(l, kv, table[static_cast<size_t>(t / tpb)], h,
                                                      static_cast<int>(t % tpb))
                                          .ToPointer());
          const uint64_t seed =
              InstanceRowSeed(options_.ctx_instance, p.first_layer + l, kv, p.first_head + h, t);
          for (int d = 0; d < dim; ++d) {
            const uint64_t v = FromSeed(seed, d);
            for (int b = 0; b < e; ++b) row[d * e + b] = static_cast<std::byte>(v >> (8 * b));
          }
        }
      }
    }
  }
}

void RankHarness::RefillCtx(int slot) {
  ClearSlot(slot);
  FillCtx(ctx_tables_[static_cast<size_t>(slot)]);
  Status filled = FillCtxState(slot);
  if (!filled.ok()) {
    Log(LogLevel::kError, "rank harness: filling a ctx state slot: " + filled.ToString());
  }
}

// One row of a gen slot, as VerifyGen walks them: its place, and the token
// it holds (-1 for a block outside the request's table).
struct RankHarness::SlotRow {
  int32_t block;
  int l, kv, h, tt;
  int64_t token;
};

void RankHarness::ForEachSlotRow(int slot, std::span<const int32_t> gen_table,
                                 const std::function<void(const SlotRow&)>& fn) const {
  const PoolGeometry& g = layout_.geometry();
  const int64_t tpb = g.tokens_per_block;
  const int64_t blocks = 2 * blocks_per_request();
  const int32_t first = static_cast<int32_t>(slot * blocks);
  std::vector<int64_t> logical(static_cast<size_t>(blocks), -1);  // block -> table index
  for (size_t i = 0; i < gen_table.size(); ++i) {
    logical[static_cast<size_t>(gen_table[i] - first)] = static_cast<int64_t>(i);
  }
  for (int64_t bi = 0; bi < blocks; ++bi) {
    const int32_t block = first + static_cast<int32_t>(bi);
    const int64_t index = logical[static_cast<size_t>(bi)];
    for (int l = 0; l < g.num_layers; ++l) {
      for (int kv = 0; kv < g.kv_factor; ++kv) {
        for (int h = 0; h < g.num_heads; ++h) {
          for (int tt = 0; tt < tpb; ++tt) {
            fn(SlotRow{block, l, kv, h, tt, index < 0 ? -1 : index * tpb + tt});
          }
        }
      }
    }
  }
}

std::string RankHarness::DescribeBadRow(const SlotRow& row, bool value_row) const {
  const RankPlacement p = topology_.Placement(options_.rank);
  const std::string who = "gen rank " + std::to_string(options_.rank);
  if (value_row) {
    return who + ": layer " + std::to_string(p.first_layer + row.l) + " kv " +
           std::to_string(row.kv) + " head " + std::to_string(p.first_head + row.h) + " token " +
           std::to_string(row.token) + " holds wrong bytes";
  }
  return who + ": block " + std::to_string(row.block) + " layer " +
         std::to_string(p.first_layer + row.l) + " token slot " + std::to_string(row.tt) +
         " outside the request was written";
}

VerifyResult RankHarness::VerifyGen(int slot, std::span<const int32_t> gen_table, TokenRange range,
                                    int ctx_instance) const {
  if (device_pool()) {
    VerifyResult on_device = VerifyGenOnDevice(slot, gen_table, range, ctx_instance);
    VerifyState(slot, ctx_instance, on_device);
    return on_device;
  }
  VerifyResult result;
  const RankPlacement p = topology_.Placement(options_.rank);
  const int e = static_cast<int>(topology_.elem_bytes());
  const int dim = layout_.geometry().head_dim;
  auto mismatch = [&](const SlotRow& r, bool value_row) {
    if (result.mismatches++ == 0) result.first_mismatch = DescribeBadRow(r, value_row);
  };
  ForEachSlotRow(slot, gen_table, [&](const SlotRow& r) {
    const auto* row = static_cast<const std::byte*>(
        layout_.RowAddress(r.l, r.kv, r.block, r.h, r.tt).ToPointer());
    if (r.token >= range.start && r.token < range.end) {
      const uint64_t seed =
          InstanceRowSeed(ctx_instance, p.first_layer + r.l, r.kv, p.first_head + r.h, r.token);
      bool ok = true;
      for (int d = 0; d < dim && ok; ++d) {
        const uint64_t v = FromSeed(seed, d);
        for (int b = 0; b < e; ++b) {
          if (row[d * e + b] != static_cast<std::byte>(v >> (8 * b))) ok = false;
        }
      }
      result.verified_bytes += static_cast<uint64_t>(dim * e);
      if (!ok) mismatch(r, true);
    } else {
      for (int i = 0; i < dim * e; ++i) {
        if (row[i] != kSlotSentinel) {
          mismatch(r, false);
          break;
        }
      }
    }
  });
  VerifyState(slot, ctx_instance, result);
  return result;
}

Status RankHarness::FillCtxOnDevice(const std::vector<int32_t>& table) {
#if KVBOUNCE_HAVE_CUDA
  const int64_t tpb = topology_.spec().tokens_per_block;
  const RankPlacement p = topology_.Placement(options_.rank);
  std::vector<DeviceRow> rows;
  rows.reserve(static_cast<size_t>(p.num_layers) * 2 * static_cast<size_t>(p.num_heads) *
               static_cast<size_t>(options_.max_tokens));
  for (int l = 0; l < p.num_layers; ++l) {
    for (int kv = 0; kv < layout_.geometry().kv_factor; ++kv) {
      for (int h = 0; h < p.num_heads; ++h) {
        for (int64_t t = 0; t < options_.max_tokens; ++t) {
          const Addr row = layout_.RowAddress(l, kv, table[static_cast<size_t>(t / tpb)], h,
                                              static_cast<int>(t % tpb));
          rows.push_back(DeviceRow{
              row.value(),
              InstanceRowSeed(options_.ctx_instance, p.first_layer + l, kv, p.first_head + h, t)});
        }
      }
    }
  }
  std::lock_guard<std::mutex> lock(kernels_mu_);
  return kernels_->FillRows(rows, topology_.spec().model.head_dim,
                            static_cast<int>(topology_.elem_bytes()));
#else
  (void)table;
  return UnimplementedError("rank harness: cuda pools need a build with CUDA");
#endif
}

VerifyResult RankHarness::VerifyGenOnDevice(int slot, std::span<const int32_t> gen_table,
                                            TokenRange range, int ctx_instance) const {
  VerifyResult result;
#if KVBOUNCE_HAVE_CUDA
  const PoolGeometry& g = layout_.geometry();
  const RankPlacement p = topology_.Placement(options_.rank);
  const int e = static_cast<int>(topology_.elem_bytes());
  // The rows of the range (values) and the rest (sentinel), each with its
  // place for naming the first mismatch.
  std::vector<DeviceRow> values, sentinels;
  std::vector<SlotRow> value_rows, sentinel_rows;
  ForEachSlotRow(slot, gen_table, [&](const SlotRow& r) {
    const uint64_t row = layout_.RowAddress(r.l, r.kv, r.block, r.h, r.tt).value();
    if (r.token >= range.start && r.token < range.end) {
      values.push_back(DeviceRow{row, InstanceRowSeed(ctx_instance, p.first_layer + r.l, r.kv,
                                                      p.first_head + r.h, r.token)});
      value_rows.push_back(r);
    } else {
      sentinels.push_back(DeviceRow{row, 0});
      sentinel_rows.push_back(r);
    }
  });
  Result<DeviceRowCheck> check = [&] {
    std::lock_guard<std::mutex> lock(kernels_mu_);
    return kernels_->VerifyRows(values, sentinels, g.head_dim, e,
                                static_cast<uint8_t>(kSlotSentinel));
  }();
  result.verified_bytes = values.size() * static_cast<uint64_t>(g.head_dim) * e;
  if (!check.ok()) {
    result.mismatches = 1;
    result.first_mismatch = "gen rank " + std::to_string(options_.rank) +
                            ": the verification kernel failed: " + check.status().ToString();
    return result;
  }
  result.mismatches = check->mismatches;
  if (check->first_bad_row >= 0) {
    // first_bad_row indexes the values, then the sentinel rows.
    const size_t bad = static_cast<size_t>(check->first_bad_row);
    result.first_mismatch = bad < values.size()
                                ? DescribeBadRow(value_rows[bad], true)
                                : DescribeBadRow(sentinel_rows[bad - values.size()], false);
  }
#else
  (void)slot;
  (void)gen_table;
  (void)range;
  (void)ctx_instance;
  result.mismatches = 1;
  result.first_mismatch =
      "gen rank " + std::to_string(options_.rank) + ": cuda pools need a build with CUDA";
#endif
  return result;
}

std::vector<std::span<std::byte>> RankHarness::PoolMemory() {
  std::vector<std::span<std::byte>> out;
  for (auto& allocation : memory_) out.emplace_back(allocation.data(), allocation.size());
  for (auto& allocation : state_memory_) out.emplace_back(allocation.data(), allocation.size());
  return out;
}

}  // namespace kvbounce::tools
