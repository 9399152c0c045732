// One rank of the bench, without the wiring: its pool in host memory cut
// into request slots, the semantic fill of a ctx pool, clearing and
// verification of a gen pool's slot, the block tables of a request, and the
// AgentOptions of its agent. The in-process Cluster (tools/cluster.h) holds
// one per rank and wires their agents over loopback; `kvbounce worker`
// (tools/worker_command.h) holds one and runs its agent in its own process.
//
// Pools are cut into `slots`, one per request in flight: slot s of a rank
// owns 2 * blocks_per_request() consecutive blocks, and a request's block
// table is a random half of them (so neighbours of its blocks are blocks it
// must not touch). Tables are derived, not exchanged: SlotTable(slot,
// blocks, seed) is the same in every process, so every rank of an instance
// agrees on a request's table from (slot, seed) alone — the ctx instance
// uses CtxTableSeed(seed) for all requests of a slot (the slot is filled
// once), the gen instance RequestTableSeed(seed, request_id).
//
// Verification is semantic and independent of the planner: every element a
// ctx rank holds is ElementValue(global layer, k/v, global kv head, absolute
// token, dim); after a pull, every element of the gen rank's blocks in the
// token range is checked against that function using only the gen pool's
// layout definition, and every other byte of the slot must still hold the
// sentinel the slot was cleared to.
//
// An in-process cluster may run several ctx instances (ctx_instance > 0 in
// the options): each holds its own elements (InstanceRowSeed in
// tools/element.h) and draws its own slot tables (CtxTableSeed(seed,
// ctx_instance)), and a gen rank verifies against the instance that served
// the request. Instance 0 is exactly the single-instance case above.
//
// Device pools (options.memory = kCuda, builds with CUDA): the pool is
// device memory of options.device; filling, clearing and verification run
// as kernels on that device (tools/device_rows.h) with the same element
// function, and SlotMemory/PoolMemory, which hand out host spans, are not
// available (SlotRanges is).
//
// Thread safety: the slot-memory operations (FillSlot, ClearSlot, FillCtx,
// RefillCtx, VerifyGen, SlotMemory) on distinct slots may run concurrently;
// on one slot they need external synchronization. Everything else is const.
#ifndef KVBOUNCE_TOOLS_RANK_HARNESS_H_
#define KVBOUNCE_TOOLS_RANK_HARNESS_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "kvbounce/agent.h"
#include "layout/pool_layout.h"
#include "layout/state_layout.h"
#include "layout/topology.h"
#include "memory/allocation.h"

namespace kvbounce::tools {

// What every slot byte outside a request holds once cleared.
inline constexpr std::byte kSlotSentinel{0xC3};

// The semantic value of one element's bytes: element `d` of the row
// (layer, kv, head, token), all global indices; the low elem_bytes bytes of
// it are stored, little-endian.
uint64_t ElementValue(int layer, int kv, int head, int64_t token, int d);

// A random half of slot `slot`'s 2 * `blocks_per_request` blocks, drawn from
// `seed`: `blocks_per_request` distinct ids in
// [slot * 2 * blocks_per_request, (slot + 1) * 2 * blocks_per_request).
// Deterministic across processes and standard libraries.
std::vector<int32_t> SlotTable(int slot, int64_t blocks_per_request, uint64_t seed);

// The seed of the ctx instance's slot tables for a run seeded by `seed`;
// ctx instance `ctx_instance` of a cluster that runs several draws from a
// seed of its own (instance 0 from the single instance's).
uint64_t CtxTableSeed(uint64_t seed, int ctx_instance = 0);
// The seed of the gen table of request `request_id` in a run seeded by `seed`.
uint64_t RequestTableSeed(uint64_t seed, uint64_t request_id);

// ceil(tokens / tokens_per_block) entries of `table` (the blocks of a
// request of `tokens` tokens).
std::vector<int32_t> TablePrefix(const std::vector<int32_t>& table, int64_t tokens,
                                 int tokens_per_block);

// The pool memory of --memory `memory` (host or cuda) on --device `device`:
// kHost, or kCuda where this build has CUDA and the machine has that device.
// Errors, naming the flag: kInvalidArgument (an unknown kind, --device with
// host memory, a device the machine lacks), kUnimplemented (cuda in a build
// without CUDA), kUnavailable (no usable CUDA device, with the reason).
Result<MemoryKind> PoolMemoryFromFlags(const std::string& memory, int device);

struct VerifyResult {
  uint64_t verified_bytes = 0;
  uint64_t mismatches = 0;
  std::string first_mismatch;  // empty when none
};

struct RankHarnessOptions {
  Role role = Role::kCtx;
  int rank = 0;
  // Requests in flight at once (pool slots), >= 1.
  int slots = 1;
  // The largest request, in tokens, >= 1.
  int64_t max_tokens = 64;
  // Give layer-major pools one allocation per layer.
  bool per_layer_pools = false;
  // Seeds the ctx slot tables (CtxTableSeed(table_seed, ctx_instance)).
  uint64_t table_seed = 1;
  // Ctx side: which ctx instance of a cluster that runs several this rank
  // belongs to (>= 0); its elements and tables are that instance's (see the
  // file comment). 0 for a single instance.
  int ctx_instance = 0;
  // kHost: the pool is host memory; kCuda: device memory of `device`.
  MemoryKind memory = MemoryKind::kHost;
  int device = 0;
};

class DeviceRowKernels;
}  // namespace kvbounce::tools
namespace kvbounce {
class OpCopier;
}  // namespace kvbounce
namespace kvbounce::tools {

class RankHarness {
 public:
  // Allocates rank `options.rank` of `topology`'s pool, every byte the
  // sentinel; a ctx rank's slots then hold the semantic values of their
  // tables (CtxTable) for tokens [0, max_tokens).
  // Errors: kInvalidArgument (slots or max_tokens < 1, a pool of more blocks
  // than 32-bit ids name, a memory kind other than kHost and kCuda),
  // kOutOfRange (a rank outside the topology), the layout's errors;
  // kUnimplemented (kCuda in a build without CUDA), and for kCuda what
  // allocating device memory or starting the kernels reports (kUnavailable
  // without a device, kResourceExhausted when the pool does not fit).
  static Result<std::unique_ptr<RankHarness>> Create(const Topology& topology,
                                                     const RankHarnessOptions& options);
  ~RankHarness();

  RankHarness(const RankHarness&) = delete;
  RankHarness& operator=(const RankHarness&) = delete;

  const RankHarnessOptions& options() const { return options_; }
  bool ctx_side() const { return options_.role == Role::kCtx; }
  const Topology& topology() const { return topology_; }
  const PoolLayout& layout() const { return layout_; }
  // Blocks of a request of max_tokens tokens.
  int64_t blocks_per_request() const;
  // slots * 2 * blocks_per_request().
  int64_t num_blocks() const;

  // The options of this rank's agent: instance, role, rank, pool, `config`
  // and `grace`; the caller adds the transport. The pool memory is owned by
  // this harness, which must outlive the agent.
  AgentOptions MakeAgentOptions(const std::string& instance_id, const Config& config,
                                std::chrono::milliseconds grace) const;

  // Hybrid models: the rank's state pool (one state slot per request slot,
  // slot s for slot s), or null where the rank holds no recurrent layer or
  // the model is not hybrid.
  const StatePoolLayout* state_layout() const { return state_layout_ ? &*state_layout_ : nullptr; }
  // The state slot of request slot `slot` for Publish / Pull
  // (PublishOptions / PullOptions::state_slot): `slot`, or -1 without a
  // state pool.
  int64_t StateSlot(int slot) const { return state_layout_ ? slot : -1; }

  // The ctx table of `slot` (max_tokens tokens). REQUIRES: ctx side.
  const std::vector<int32_t>& CtxTable(int slot) const;
  // The gen table of request `request_id` in `slot`, for `tokens` tokens, in
  // a run seeded by `seed` (TablePrefix of SlotTable(slot, ...,
  // RequestTableSeed(seed, request_id))).
  std::vector<int32_t> GenTable(int slot, int64_t tokens, uint64_t seed, uint64_t request_id) const;

  bool device_pool() const { return options_.memory == MemoryKind::kCuda; }

  // The memory of `slot`'s blocks: one range (block-major) or one per
  // (layer, k/v) (layer-major), in address order, as (address, bytes);
  // then, with a state pool, its state slot's: one range (slot-major) or
  // one per (recurrent layer, state tensor).
  std::vector<std::pair<Addr, uint64_t>> SlotRanges(int slot) const;
  // The same as host spans. REQUIRES: !device_pool().
  std::vector<std::span<std::byte>> SlotMemory(int slot) const;
  // A copy of the slot's memory, one vector per range of SlotRanges (copied
  // from the device for device pools). Errors: the runtime's, for a device
  // pool.
  Result<std::vector<std::vector<std::byte>>> SlotBytes(int slot) const;
  // Sets every byte of `slot` to `value`.
  void FillSlot(int slot, std::byte value);
  // Sets every byte of `slot` to the sentinel.
  void ClearSlot(int slot) { FillSlot(slot, kSlotSentinel); }
  // Writes the semantic values of tokens [0, max_tokens) into the blocks of
  // `table`. REQUIRES: ctx side.
  void FillCtx(const std::vector<int32_t>& table);
  // Restores `slot` of a ctx rank: the sentinel everywhere, then the
  // semantic values of its table (as Create wrote them).
  void RefillCtx(int slot);
  // Checks a gen rank's `slot` after a pull of `range` into `gen_table` from
  // ctx instance `ctx_instance` (see the file comment). Tokens [0,
  // range.start) must be untouched too. With a state pool, every state
  // element of the slot too: StateUnitSeed's values (the pull carried the
  // state). REQUIRES: gen side.
  VerifyResult VerifyGen(int slot, std::span<const int32_t> gen_table, TokenRange range,
                         int ctx_instance = 0) const;

  // The bytes of the pool, one span per allocation, the state pool's
  // allocations after the KV pool's. REQUIRES: !device_pool().
  std::vector<std::span<std::byte>> PoolMemory();

 private:
  RankHarness(const Topology& topology, const RankHarnessOptions& options, PoolLayout layout);

  Topology topology_;
  RankHarnessOptions options_;
  struct SlotRow;
  // Calls `fn` for every row of gen slot `slot`, in the order of its
  // blocks, layers, k/v, heads and in-block tokens, with the token each
  // holds under `gen_table`.
  void ForEachSlotRow(int slot, std::span<const int32_t> gen_table,
                      const std::function<void(const SlotRow&)>& fn) const;
  // What VerifyGen says about a bad row (value_row: one of the range).
  std::string DescribeBadRow(const SlotRow& row, bool value_row) const;

  // Hybrid models: writes the semantic values of the state of `slot`
  // (ctx side), and checks them (gen side) into `result`.
  Status FillCtxState(int slot);
  void VerifyState(int slot, int ctx_instance, VerifyResult& result) const;
  // Calls fn(layer, segment index, unit, address) for every unit of
  // `slot`'s state this rank holds.
  void ForEachStateUnit(int slot,
                        const std::function<void(int, int, int, Addr, uint64_t)>& fn) const;

  // Device pools: fill, clear and verify through kernels.
  Status FillCtxOnDevice(const std::vector<int32_t>& table);
  VerifyResult VerifyGenOnDevice(int slot, std::span<const int32_t> gen_table, TokenRange range,
                                 int ctx_instance) const;

  std::vector<std::vector<std::byte>> memory_;              // one allocation, or one per layer
  std::vector<std::unique_ptr<Allocation>> device_memory_;  // the same, on the device
  // One user at a time (the kernels own one stream and staging buffers).
  // A shared_ptr: its deleter is bound where it is made (builds with CUDA
  // only), so a build without CUDA never needs the kernels' destructor.
  mutable std::mutex kernels_mu_;
  std::shared_ptr<DeviceRowKernels> kernels_;
  std::unique_ptr<OpCopier> copier_;  // device pools: copies slots to the host
  std::vector<Addr> bases_;
  PoolLayout layout_;
  std::vector<std::vector<int32_t>> ctx_tables_;  // per slot (ctx side)
  // Hybrid models: the state pool (host memory, or device memory beside a
  // device pool).
  std::optional<StatePoolLayout> state_layout_;
  std::vector<std::vector<std::byte>> state_memory_;
  std::vector<std::unique_ptr<Allocation>> state_device_memory_;
};

}  // namespace kvbounce::tools

#endif  // KVBOUNCE_TOOLS_RANK_HARNESS_H_
