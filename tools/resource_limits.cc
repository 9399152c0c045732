#include "tools/resource_limits.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>

#include "layout/fragment.h"

namespace kvbounce::tools {
namespace {

constexpr uint64_t kSaturated = UINT64_MAX;

uint64_t U(int64_t v) { return v < 0 ? 0 : static_cast<uint64_t>(v); }

bool TokenInnerContiguous(const Topology& t) {
  // HND layouts keep a head's tokens of one block next to each other.
  return t.spec().layout != LayoutKind::kLayerMajorNhd;
}

// Blocks of `tokens_per_block` that [start, end) touches.
uint64_t BlocksTouched(TokenRange r, int tokens_per_block) {
  if (r.end <= r.start) return 0;
  return U((r.end - 1) / tokens_per_block - r.start / tokens_per_block + 1);
}

// Bytes of one block of `rank`'s pool.
uint64_t BlockBytes(const Topology& t, int rank) {
  const RankPlacement p = t.Placement(rank);
  uint64_t b = SatMul(U(p.num_layers), U(t.spec().model.kv_factor));
  b = SatMul(b, U(p.num_heads));
  b = SatMul(b, U(t.spec().tokens_per_block));
  b = SatMul(b, U(t.spec().model.head_dim));
  return SatMul(b, t.elem_bytes());
}

}  // namespace

uint64_t SatMul(uint64_t a, uint64_t b) {
  uint64_t r = 0;
  return __builtin_mul_overflow(a, b, &r) ? kSaturated : r;
}

uint64_t SatAdd(uint64_t a, uint64_t b) {
  uint64_t r = 0;
  return __builtin_add_overflow(a, b, &r) ? kSaturated : r;
}

int64_t CeilDiv(int64_t a, int64_t b) { return a / b + (a % b != 0 ? 1 : 0); }

std::string HumanBytes(uint64_t bytes) {
  if (bytes == kSaturated) return "more than 16 EiB";
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 6) {
    v /= 1024;
    ++u;
  }
  char buf[48];
  std::snprintf(buf, sizeof(buf), u == 0 ? "%.0f %s" : "%.2f %s", v, units[u]);
  return buf;
}

uint64_t PhysicalMemoryBytes() {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page = sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page <= 0) return 0;
  return SatMul(static_cast<uint64_t>(pages), static_cast<uint64_t>(page));
}

uint64_t MemoryNeed::total() const {
  uint64_t t = 0;
  for (const auto& [what, bytes] : parts) t = SatAdd(t, bytes);
  return t;
}

uint64_t FragmentBound(const Topology& ctx, const Topology& gen, const Box& box,
                       TokenRange tokens) {
  if (box.empty() || tokens.end <= tokens.start) return 0;
  const uint64_t lanes = SatMul(SatMul(U(box.num_layers), U(box.kv_factor)), U(box.num_heads));
  const uint64_t rows = SatMul(lanes, U(tokens.size()));
  if (!TokenInnerContiguous(ctx) || !TokenInnerContiguous(gen)) return rows;
  // A piece lies inside one ctx block and one gen block: at most one per
  // block boundary crossed on either side, plus one.
  const uint64_t pieces = SatAdd(BlocksTouched(tokens, ctx.spec().tokens_per_block),
                                 BlocksTouched(tokens, gen.spec().tokens_per_block));
  return std::min(rows, SatMul(lanes, pieces));
}

MemoryNeed PlanMemory(const Topology& ctx, const Topology& gen, TokenRange tokens) {
  MemoryNeed need;
  const uint64_t ctx_blocks = U(CeilDiv(tokens.end, ctx.spec().tokens_per_block));
  const uint64_t gen_blocks = U(CeilDiv(tokens.end, gen.spec().tokens_per_block));
  need.Add("block tables", SatMul(SatAdd(ctx_blocks, gen_blocks), 2 * sizeof(int32_t)));
  uint64_t largest = 0;
  for (int g = 0; g < gen.num_ranks(); ++g) {
    for (int c = 0; c < ctx.num_ranks(); ++c) {
      largest = std::max(largest, FragmentBound(ctx, gen, WriterBox(ctx, c, gen, g), tokens));
    }
  }
  // Three lists, each up to twice its size while a vector grows.
  need.Add("plan lists of the largest pair", SatMul(largest, 3 * 2 * sizeof(Fragment)));
  return need;
}

MemoryNeed BenchMemory(const Topology& ctx, const Topology& gen, TokenRange tokens,
                       int64_t ctx_pool_blocks, int64_t gen_pool_blocks, int64_t ctx_arena_mb,
                       int64_t gen_arena_mb, int in_flight, int ctx_instances) {
  MemoryNeed need;
  uint64_t ctx_pools = 0, pools = 0;
  for (int r = 0; r < ctx.num_ranks(); ++r)
    ctx_pools = SatAdd(ctx_pools, SatMul(BlockBytes(ctx, r), U(ctx_pool_blocks)));
  pools = SatMul(ctx_pools, U(ctx_instances));
  for (int r = 0; r < gen.num_ranks(); ++r)
    pools = SatAdd(pools, SatMul(BlockBytes(gen, r), U(gen_pool_blocks)));
  const uint64_t ctx_ranks = SatMul(U(ctx.num_ranks()), U(ctx_instances));
  need.Add("pools of " + std::to_string(SatAdd(ctx_ranks, U(gen.num_ranks()))) + " ranks", pools);
  const uint64_t arenas =
      SatAdd(SatMul(ctx_ranks, SatMul(U(ctx_arena_mb), uint64_t{1} << 20)),
             SatMul(U(gen.num_ranks()), SatMul(U(gen_arena_mb), uint64_t{1} << 20)));
  need.Add("staging arenas", arenas);
  // Per request in flight and pair: the sender's and the receiver's lists
  // (gather + scatter, or direct twice) and one write operation per fragment.
  uint64_t lists = 0;
  for (int g = 0; g < gen.num_ranks(); ++g) {
    for (int c = 0; c < ctx.num_ranks(); ++c) {
      lists = SatAdd(lists, FragmentBound(ctx, gen, WriterBox(ctx, c, gen, g), tokens));
    }
  }
  need.Add("plan lists of " + std::to_string(in_flight) + " requests in flight",
           SatMul(SatMul(lists, U(in_flight)), 3 * sizeof(Fragment)));
  return need;
}

Status CheckMemory(const MemoryNeed& need, uint64_t cap, std::string_view cap_name,
                   std::string_view hint) {
  const uint64_t total = need.total();
  if (cap == 0 || total <= cap) return Status::Ok();
  std::string parts;
  for (const auto& [what, bytes] : need.parts) {
    if (bytes == 0) continue;
    parts += (parts.empty() ? "" : ", ") + what + " " + HumanBytes(bytes);
  }
  return ResourceExhaustedError("this run needs about " + HumanBytes(total) + " of memory (" +
                                parts + "), more than the " + HumanBytes(cap) + " " +
                                std::string(cap_name) + (hint.empty() ? "" : ": ") +
                                std::string(hint));
}

uint64_t MemoryCap(uint64_t configured, std::string* name) {
  if (configured != 0) {
    *name = "memory cap";
    return configured;
  }
  *name = "of physical memory of this machine";
  return PhysicalMemoryBytes();
}

}  // namespace kvbounce::tools
