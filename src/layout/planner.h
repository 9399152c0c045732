// The planner (docs/architecture.md §4): for one writer (a ctx rank) and one receiver (a gen
// rank) and a token range, the exact lists of contiguous copies that move the
// writer's box of KV from the writer's pool to the receiver's pool.
//
// The box is walked in the receiver's layout order, the token dimension split
// into the receiver's logical block and the token within it. That walk defines
// the writer's *packed stream*: the box's bytes, densely packed, in that order.
// Both sides compute it from the same inputs and so agree on its size and on
// every offset in it without exchanging anything but the fingerprint.
//
//   gather list   (sender)   sender pool address  -> packed offset
//   scatter list  (receiver) packed offset        -> receiver pool address
//   direct list   (either)   sender pool address  -> receiver pool address
//
// Runs are maximal: dimensions that are contiguous on the relevant sides are
// coalesced before the walk, and consecutive runs that happen to be adjacent
// (e.g. consecutive block ids) merge. Planning cost is proportional to the
// number of runs produced (plus one step per block), never to elements.
//
// The receiver scatters where its own plan says: no destination address
// travels on the wire except the staging slot the receiver granted.
//
// Thread safety: pure functions over immutable inputs; safe from any thread.
#ifndef KVBOUNCE_LAYOUT_PLANNER_H_
#define KVBOUNCE_LAYOUT_PLANNER_H_

#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "kvbounce/status.h"
#include "layout/fragment.h"
#include "layout/pool_layout.h"
#include "layout/state_layout.h"
#include "layout/tiled_list.h"
#include "layout/topology.h"

namespace kvbounce {

// One end of a transfer. Borrowed pointers: the topology and pool must outlive
// the call (not the plan).
struct PlanSide {
  const Topology* topology = nullptr;
  int rank = 0;
  // The rank's pool. Its addresses are used only by the lists that touch this
  // side (a peer's pool may carry base 0 when only its shape is known).
  const PoolLayout* pool = nullptr;
  // Block ids holding tokens [0, n) of the request, in token order. Needed
  // only by the lists that touch this side; may be empty otherwise.
  std::span<const int32_t> block_table;
  // Hybrid models (docs/hybrid.md): the rank's state pool (null where the
  // rank holds no recurrent layer) and the request's state slot in it. The
  // receiver's slot decides: with receiver.state_slot >= 0 the plan moves
  // the state of the writer's box after its KV; with -1, KV only. The
  // writer's slot is needed only by the lists that touch the writer's side.
  const StatePoolLayout* state_pool = nullptr;
  int64_t state_slot = -1;
};

// Which lists to build (bit set).
enum PlanLists : uint8_t {
  kPlanGather = 1,
  kPlanScatter = 2,
  kPlanDirect = 4,
  kPlanAll = kPlanGather | kPlanScatter | kPlanDirect,
  // The lists named are built in tiled form (PairPlan::tiled_*, layout/
  // tiled_list.h) instead of flat: a step per block and per distinct
  // block shape, not per run.
  kPlanTiled = 8,
};

struct PairPlan {
  int writer_rank = 0;
  int receiver_rank = 0;
  Box box;  // empty: this ctx rank is not a writer of this gen rank
  TokenRange tokens;
  // Bytes of the packed stream: the box's payload, KV then state.
  uint64_t packed_bytes = 0;
  // Of those, the state's (hybrid models): the stream's last bytes, one
  // run per recurrent layer, state tensor and segment of the box (fewer
  // where they are adjacent on both sides).
  uint64_t state_bytes = 0;
  // Hash of both layouts, both placements, the token range and the box; the
  // same on both sides. Block tables and addresses are not part of it.
  uint64_t fingerprint = 0;
  FragmentList gather;   // src: sender address, dst: packed offset
  FragmentList scatter;  // src: packed offset, dst: receiver address
  FragmentList direct;   // src: sender address, dst: receiver address
  // With kPlanTiled, the lists named in tiled form (the flat ones stay
  // empty); expanded, each is the flat list above.
  TiledList tiled_gather;
  TiledList tiled_scatter;
  TiledList tiled_direct;
};

// Plans the transfer of `tokens` from `writer` (a ctx rank) to `receiver` (a
// gen rank), building the lists named in `lists`. When the writer writes
// nothing to the receiver (an empty box, docs/architecture.md §3), the plan is empty:
// packed_bytes 0, no lists, fingerprint still set.
//
// Errors:
//   kInvalidArgument  incompatible instances (CheckCompatible), a missing
//                     topology or pool, a pool whose geometry or layout is not
//                     the one of its rank, an empty or negative token range;
//                     with state: a side whose box has state but whose state
//                     pool is missing or not its rank's.
//   kOutOfRange       a bad rank; a block table (of a side a requested list
//                     touches) too short for the token range, or holding a
//                     block id outside the pool; a state slot (of a side a
//                     requested list touches) outside its state pool.
Result<PairPlan> PlanPair(const PlanSide& writer, const PlanSide& receiver, TokenRange tokens,
                          uint8_t lists = kPlanAll);

// How many runs each list of a plan has, and its packed bytes: what the
// receiver's path estimate needs (docs/paths.md), without building lists.
struct PlanRuns {
  uint64_t packed_bytes = 0;
  uint64_t state_bytes = 0;  // PairPlan::state_bytes
  uint64_t fingerprint = 0;  // PairPlan::fingerprint
  uint64_t gather = 0;
  uint64_t scatter = 0;
  uint64_t direct = 0;
};

// The runs PlanPair(writer, receiver, tokens, lists) would produce, only
// counted: no list is built and no run visited (each segment shape's walk
// is summarized once; the cost is a step per segment and outer index).
// The receiver does not know the writer's block table: with an empty
// writer.block_table the writer's blocks are taken to be nowhere adjacent —
// the usual state of a paged pool — (descending ids stand in for them), so
// no run merges across two of them; a real table with adjacent blocks
// merges more. The writer's pool must still be given (its shape and
// strides). Errors: PlanPair's, except that an empty writer table is fine.
// Only the lists named in `lists` are counted (the others stay 0). The
// count of each list stops once it reaches `limit` (a step of the walk may
// pass it): a count of at least `limit` is then at least `limit` and at
// most the full count; a count below it is the full count.
Result<PlanRuns> CountPlanRuns(const PlanSide& writer, const PlanSide& receiver, TokenRange tokens,
                               uint8_t lists = kPlanAll,
                               uint64_t limit = std::numeric_limits<uint64_t>::max());

// The packed bytes and the fingerprint of the plan, with the receiver's
// block table checked as a scatter or direct plan checks it, walking no run
// (the run counts stay 0): what a receiver needs on a path where it copies
// nothing itself. Errors: CountPlanRuns'.
Result<PlanRuns> PlanTotals(const PlanSide& writer, const PlanSide& receiver, TokenRange tokens);

// Bytes of the packed stream of `box` over `tokens` (the size both sides
// agree on). REQUIRES: consistent arguments (no overflow checks).
uint64_t PackedBytes(const Box& box, TokenRange tokens, uint64_t row_bytes);

}  // namespace kvbounce

#endif  // KVBOUNCE_LAYOUT_PLANNER_H_
