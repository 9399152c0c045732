// An in-process cluster for the bench and the end-to-end tests: one or more
// ctx instances of one InstanceSpec and one gen instance, every rank an
// Agent on its own loopback transport (optionally behind a fault-injecting
// decorator), every pool real host memory or device memory of one GPU. Each
// rank's pool, its slots, block tables, fill and verification are a
// RankHarness (tools/rank_harness.h, which `kvbounce worker` shares); the
// cluster wires the ranks' agents together: every gen rank connects to every
// rank of every ctx instance, as a decode rank fed by several prefill
// instances does.
//
// Several ctx instances (options.ctx_instances > 1) are named
// options.ctx_instance ("ctx0") for the first and "ctx1", "ctx2", ... for
// the others. Each holds its own pools, slot tables and element values
// (RankHarnessOptions::ctx_instance), so a request's KV is verified against
// the instance that served it (BlockTables::ctx_instance). The accessors
// without an instance index mean instance 0, which is all there is unless
// asked for more.
//
// Ranks can be restarted (RestartRank): the agent is shut down and a new one
// is created on the same pool memory behind a new loopback endpoint, then
// reconnected, the way a serving engine restarts a worker process that keeps
// its GPU memory.
//
// Thread safety: Fill, Clear, Verify and the slot-memory helpers of distinct
// slots may run concurrently; the agents are thread-safe. CtxAgent/GenAgent,
// FaultTotals and RestartRank may run concurrently with each other and with
// everything else; the reference accessors ctx()/gen()/ctx_faults()/
// gen_faults() must not race with RestartRank.
#ifndef KVBOUNCE_TOOLS_CLUSTER_H_
#define KVBOUNCE_TOOLS_CLUSTER_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "kvbounce/agent.h"
#include "layout/pool_layout.h"
#include "layout/topology.h"
#include "session/agent_internal.h"
#include "tools/rank_harness.h"
#include "transport/fault/fault_transport.h"
#include "transport/loopback/loopback_transport.h"

namespace kvbounce::tools {

struct ClusterOptions {
  InstanceSpec ctx;
  InstanceSpec gen;
  // Ctx instances, each of spec `ctx` (1 to kMaxCtxInstances).
  int ctx_instances = 1;
  // Requests in flight at once (pool slots).
  int slots = 1;
  // The largest request, in tokens.
  int64_t max_tokens = 64;
  Config ctx_config;
  Config gen_config;
  // Wrap every transport in a FaultTransport (with these options).
  bool faults = false;
  FaultOptions ctx_faults;
  FaultOptions gen_faults;
  // What every loopback transport offers (mapped access, reads).
  LoopbackOptions loopback;
  // Give layer-major pools one allocation per layer.
  bool per_layer_pools = false;
  std::chrono::milliseconds grace{200};
  // Test seams applied to every agent of the side (see session/agent_internal.h).
  AgentHooks ctx_hooks;
  AgentHooks gen_hooks;
  // The name of ctx instance 0 (the others are "ctx1", "ctx2", ...).
  std::string ctx_instance = "ctx0";
  std::string gen_instance = "gen0";
  // Seeds the ctx slot tables (RankHarnessOptions::table_seed).
  uint64_t table_seed = 1;
  // Every pool's memory: host, or device memory of `device` (all ranks on
  // the one device; RankHarnessOptions::memory).
  MemoryKind memory = MemoryKind::kHost;
  int device = 0;
};

// A request's block tables: one for the ctx instance that serves it, one
// for the gen instance (an instance hands every rank the same ids).
struct BlockTables {
  int ctx_instance = 0;  // the index of the ctx instance that serves it
  int slot = 0;
  std::vector<int32_t> ctx;
  std::vector<int32_t> gen;
};

// What RestartRank did.
struct RestartInfo {
  std::string old_address;
  std::string new_address;
  // The old agent's Stats().arena_outstanding_bytes after its Shutdown
  // returned (a staging slot it never got back).
  uint64_t outstanding_after_shutdown = 0;
  std::chrono::nanoseconds shutdown_time{0};
};

// Ctx instances one cluster may run.
inline constexpr int kMaxCtxInstances = 16;

class Cluster {
 public:
  static Result<std::unique_ptr<Cluster>> Create(const ClusterOptions& options);
  ~Cluster();

  const ClusterOptions& options() const { return options_; }
  const Topology& ctx_topology() const { return ctx_topology_; }
  const Topology& gen_topology() const { return gen_topology_; }
  // Ranks per ctx instance, and of the gen instance.
  int num_ctx() const { return ctx_topology_.num_ranks(); }
  int num_gen() const { return gen_topology_.num_ranks(); }
  int num_ctx_instances() const { return options_.ctx_instances; }
  // The name of ctx instance `instance` (what gen ranks Pull from).
  const std::string& ctx_instance_name(int instance) const {
    return ctx_names_[static_cast<size_t>(instance)];
  }
  Agent& ctx(int rank) { return ctx(0, rank); }
  Agent& ctx(int instance, int rank) { return *CtxRank(instance, rank).agent; }
  Agent& gen(int rank) { return *gen_[static_cast<size_t>(rank)].agent; }
  // The rank's current agent, safe against a concurrent RestartRank (the
  // returned agent may be shut down by one, and then answers kAborted).
  std::shared_ptr<Agent> CtxAgent(int rank) const { return CtxAgent(0, rank); }
  std::shared_ptr<Agent> CtxAgent(int instance, int rank) const;
  std::shared_ptr<Agent> GenAgent(int rank) const;
  // The rank's fault decorator (null unless options.faults).
  FaultTransport* ctx_faults(int rank) { return ctx_faults(0, rank); }
  FaultTransport* ctx_faults(int instance, int rank) { return CtxRank(instance, rank).faults; }
  FaultTransport* gen_faults(int rank) { return gen_[static_cast<size_t>(rank)].faults; }
  int64_t blocks_per_request(bool ctx_side) const;
  // The rank's pool, slots, fill and verification (ctx side: instance 0).
  RankHarness& harness(bool ctx_side, int rank) {
    return ctx_side ? ctx_harness(0, rank) : *gen_[static_cast<size_t>(rank)].harness;
  }
  RankHarness& ctx_harness(int instance, int rank) { return *CtxRank(instance, rank).harness; }
  // Fault counters of every transport the side ever had (restarted ranks'
  // included; ctx side: of every instance).
  FaultStats FaultTotals(bool ctx_side) const;

  // Shuts the rank's agent down (gen ranks' pulls and ctx ranks'
  // publications settle with kAborted), creates a new agent on the same pool
  // memory and config behind the endpoint "<instance>-<rank>.r<n>", and
  // reconnects: a new ctx rank (of instance 0) is connected to by every gen
  // rank, a new gen rank connects to every rank of every ctx instance. One
  // restart at a time (calls serialize). REQUIRES: not called from a
  // completion callback.
  // Errors: whatever creating the agent or Connect reports.
  Status RestartRank(bool ctx_side, int rank, RestartInfo* info = nullptr);

  // Connects gen rank `gen_rank` to ctx rank `ctx_rank` (of instance 0)
  // again, after the gen rank declared that writer's connection dead (a
  // writer that did not stop within the grace period). OK when the two are
  // connected already. Serialized with RestartRank. REQUIRES: not called
  // from a completion callback. Errors: Connect's.
  Status Reconnect(int gen_rank, int ctx_rank);

  // The tables of a request of `tokens` tokens in `slot` served by ctx
  // instance 0: the slot's ctx table (drawn once, its KV filled at Create
  // for max_tokens tokens) and a fresh random gen table.
  BlockTables Tables(int slot, int64_t tokens, std::mt19937_64& rng) const {
    return Tables(0, slot, tokens, rng);
  }
  // The same for a request served by ctx instance `ctx_instance`.
  BlockTables Tables(int ctx_instance, int slot, int64_t tokens, std::mt19937_64& rng) const;
  // The same with the gen table of request `request_id` in a run seeded by
  // `seed` (RankHarness::GenTable): what `kvbounce worker` derives.
  BlockTables Tables(int slot, int64_t tokens, uint64_t seed, uint64_t request_id) const {
    return Tables(0, slot, tokens, seed, request_id);
  }
  BlockTables Tables(int ctx_instance, int slot, int64_t tokens, uint64_t seed,
                     uint64_t request_id) const;
  // Sets every byte of `slot` in every gen rank's pool to the sentinel.
  void ClearGen(int slot);
  // Checks gen rank `rank` after a pull of `range` into `tables` from the
  // ctx instance `tables` names (see the file comment). Tokens [0,
  // range.start) must be untouched too.
  VerifyResult VerifyGen(int rank, const BlockTables& tables, TokenRange range) const;

  // The memory of `slot`'s blocks in one rank's pool (ctx side: of instance
  // 0): one range (block-major) or one per (layer, k/v) (layer-major), in
  // address order.
  std::vector<std::span<std::byte>> SlotMemory(bool ctx_side, int rank, int slot) const;
  // A copy of it (RankHarness::SlotBytes): also for device pools.
  Result<std::vector<std::vector<std::byte>>> SlotBytes(bool ctx_side, int rank, int slot) const;
  // Sets every byte of `slot` in one rank's pool to `value`.
  void FillSlot(bool ctx_side, int rank, int slot, std::byte value);
  // Restores a ctx rank's `slot`: the sentinel everywhere, then the semantic
  // values of the slot's table (as Create wrote them).
  void RefillCtx(int rank, int slot);

  // Publishes on every rank of the ctx instance `tables` names and pulls on
  // every gen rank from it; waits for all. Returns the first pull error (OK
  // when every pull completed); `infos`, when given, receives each gen
  // rank's TransferInfo.
  Status RunRequest(uint64_t request_id, const BlockTables& tables, TokenRange range,
                    PullOptions pull = {}, std::vector<TransferInfo>* infos = nullptr);

  // Shuts every agent down (gen first, then every ctx instance).
  void Shutdown();

  // The bytes of a rank's pool (ctx side: of instance 0), one span per
  // allocation: the memory the application owns (tests snapshot it, poison
  // it, compare it).
  std::vector<std::span<std::byte>> PoolMemory(bool ctx_side, int rank);
  // The loopback fabric of every rank (its test seams and observers).
  LoopbackFabric& fabric() { return *fabric_; }

 private:
  struct Rank {
    std::unique_ptr<RankHarness> harness;
    // agent, faults and generation are guarded by mu_ once Create returned.
    std::shared_ptr<Agent> agent;
    FaultTransport* faults = nullptr;  // owned by the agent
    int generation = 0;                // restarts so far
  };

  Cluster(const ClusterOptions& options, Topology ctx, Topology gen);
  // Adds rank `rank` of ctx instance `instance` (ctx side) or of the gen
  // instance (instance 0).
  Status AddRank(bool ctx_side, int instance, int rank);
  // A started agent for `r` (its memory placed) of `instance_name` behind
  // endpoint `name`; `faults` receives its fault decorator (or null).
  Result<std::shared_ptr<Agent>> MakeAgent(bool ctx_side, const std::string& instance_name,
                                           int rank, const Rank& r, const std::string& name,
                                           uint64_t fault_seed, FaultTransport** faults);
  Rank& CtxRank(int instance, int rank) {
    return ctx_[static_cast<size_t>(instance * num_ctx() + rank)];
  }
  const Rank& CtxRank(int instance, int rank) const {
    return ctx_[static_cast<size_t>(instance * num_ctx() + rank)];
  }
  // Every rank's address of every ctx instance, instance by instance.
  std::vector<std::string> CtxAddresses() const;

  ClusterOptions options_;
  Topology ctx_topology_;
  Topology gen_topology_;
  std::vector<std::string> ctx_names_;  // by ctx instance
  std::vector<Rank> ctx_;               // instance by instance, num_ctx() ranks each
  std::vector<Rank> gen_;
  std::shared_ptr<LoopbackFabric> fabric_;

  mutable std::mutex mu_;         // the agents, faults and generations of the ranks
  FaultStats retired_faults_[2];  // [ctx_side]: of transports shut down by restarts
  std::mutex restart_mu_;         // serializes RestartRank
};

}  // namespace kvbounce::tools

#endif  // KVBOUNCE_TOOLS_CLUSTER_H_
