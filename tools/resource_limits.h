// What `kvbounce plan` and `kvbounce bench` may ask of the machine, checked
// before anything is allocated: ranks per instance, 32-bit block ids, and the
// bytes a run would hold at once (pools of every rank, staging arenas, block
// tables, plan lists), computed with saturating arithmetic so that no flag
// value can overflow the estimate into something small.
//
// The memory rule: a run whose estimate exceeds the cap (by default the
// machine's physical memory, sysconf) is refused with an error that names
// the estimate, its parts and the cap. The estimate is an upper bound of
// what the run holds at its peak, not of what the operating system reports.
//
// Thread safety: pure functions; PhysicalMemoryBytes reads sysconf.
#ifndef KVBOUNCE_TOOLS_RESOURCE_LIMITS_H_
#define KVBOUNCE_TOOLS_RESOURCE_LIMITS_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kvbounce/status.h"
#include "layout/topology.h"

namespace kvbounce::tools {

// Ranks (tp × pp) one instance may have. The planner command walks every
// (ctx rank, gen rank) pair; the bench runs every rank as an agent with its
// own threads (control, copy workers, transport) in this process.
inline constexpr int kPlanMaxRanksPerInstance = 1024;
inline constexpr int kBenchMaxRanksPerInstance = 64;

// Block ids are int32 (the wire format and the public API): a pool, and so a
// block table, has at most this many blocks.
inline constexpr int64_t kMaxPoolBlocks = INT32_MAX;

// Saturating arithmetic: UINT64_MAX stands for "does not fit in 64 bits".
uint64_t SatMul(uint64_t a, uint64_t b);
uint64_t SatAdd(uint64_t a, uint64_t b);

// ceil(a / b) for a >= 0, b >= 1, without overflow.
int64_t CeilDiv(int64_t a, int64_t b);

// "1.50 GiB"; saturated values print as "more than 16 EiB".
std::string HumanBytes(uint64_t bytes);

// The machine's physical memory (sysconf(_SC_PHYS_PAGES) × page size); 0 when
// unknown (then no memory cap applies).
uint64_t PhysicalMemoryBytes();

// The bytes a run would hold at once, by part.
struct MemoryNeed {
  std::vector<std::pair<std::string, uint64_t>> parts;

  void Add(std::string what, uint64_t bytes) { parts.emplace_back(std::move(what), bytes); }
  uint64_t total() const;
};

// An upper bound of the fragments in any one list (gather, scatter or direct)
// of the plan that moves `box` over `tokens` from a ctx rank to a gen rank:
// one fragment per row (head_dim elements) in general, and one per (layer,
// kv, head, piece of a block on both sides) when both pools keep a head's
// tokens contiguous (the HND layouts).
uint64_t FragmentBound(const Topology& ctx, const Topology& gen, const Box& box, TokenRange tokens);

// What `kvbounce plan` holds: two block tables (twice the blocks needed, as
// RandomBlockTable draws them) and the three lists of the largest pair (pairs
// are planned one at a time), with room for vector growth.
MemoryNeed PlanMemory(const Topology& ctx, const Topology& gen, TokenRange tokens);

// What `kvbounce bench` holds: every rank's pool of `pool_blocks_*` blocks,
// the staging arenas (one per rank of its side), and the plan lists and
// write operations of `in_flight` requests across every pair; the ctx
// ranks' pools and arenas `ctx_instances` times (each instance has its own).
MemoryNeed BenchMemory(const Topology& ctx, const Topology& gen, TokenRange tokens,
                       int64_t ctx_pool_blocks, int64_t gen_pool_blocks, int64_t ctx_arena_mb,
                       int64_t gen_arena_mb, int in_flight, int ctx_instances = 1);

// OK when need.total() <= cap (or cap is 0: unknown). Otherwise
// kResourceExhausted: "this run needs about 1.2 TiB of memory (pools of 10
// ranks 1.2 TiB, ...), more than the 23.4 GiB <cap_name>: <hint>".
Status CheckMemory(const MemoryNeed& need, uint64_t cap, std::string_view cap_name,
                   std::string_view hint);

// The cap a command uses: `configured` when non-zero, else the physical
// memory; `name` receives how to call it in an error.
uint64_t MemoryCap(uint64_t configured, std::string* name);

}  // namespace kvbounce::tools

#endif  // KVBOUNCE_TOOLS_RESOURCE_LIMITS_H_
