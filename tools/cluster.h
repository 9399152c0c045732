// An in-process cluster for the bench and the end-to-end tests: one ctx
// instance and one gen instance, every rank an Agent on its own loopback
// transport (optionally behind a fault-injecting decorator), every pool real
// host memory.
//
// Pools are cut into `slots`, one per request in flight: slot s of a rank
// owns 2 * blocks_per_request consecutive blocks, and a request's block
// table is a random half of them (so neighbours of its blocks are blocks it
// must not touch).
//
// Verification is semantic and independent of the planner: every element a
// ctx rank holds is a deterministic function of (global layer, k/v, global
// kv head, absolute token, dim); after a request, every element of the gen
// rank's blocks in the token range is checked against that function using
// only the gen pool's layout definition, and every other byte of the slot
// must still hold the sentinel the slot was cleared to.
//
// Thread safety: Fill, Clear and Verify of distinct slots may run
// concurrently; the agents are thread-safe.
#ifndef KVBOUNCE_TOOLS_CLUSTER_H_
#define KVBOUNCE_TOOLS_CLUSTER_H_

#include <cstdint>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "kvbounce/agent.h"
#include "layout/pool_layout.h"
#include "layout/topology.h"
#include "session/agent_internal.h"
#include "transport/fault/fault_transport.h"
#include "transport/loopback/loopback_transport.h"

namespace kvbounce::tools {

struct ClusterOptions {
  InstanceSpec ctx;
  InstanceSpec gen;
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
  // Give layer-major pools one allocation per layer.
  bool per_layer_pools = false;
  std::chrono::milliseconds grace{200};
  // Test seams applied to every agent of the side (see session/agent_internal.h).
  AgentHooks ctx_hooks;
  AgentHooks gen_hooks;
  std::string ctx_instance = "ctx0";
  std::string gen_instance = "gen0";
};

// A request's block tables: one for the ctx instance, one for the gen
// instance (an instance hands every rank the same ids).
struct BlockTables {
  int slot = 0;
  std::vector<int32_t> ctx;
  std::vector<int32_t> gen;
};

struct VerifyResult {
  uint64_t verified_bytes = 0;
  uint64_t mismatches = 0;
  std::string first_mismatch;  // empty when none
};

class Cluster {
 public:
  static Result<std::unique_ptr<Cluster>> Create(const ClusterOptions& options);
  ~Cluster();

  const ClusterOptions& options() const { return options_; }
  const Topology& ctx_topology() const { return ctx_topology_; }
  const Topology& gen_topology() const { return gen_topology_; }
  int num_ctx() const { return ctx_topology_.num_ranks(); }
  int num_gen() const { return gen_topology_.num_ranks(); }
  Agent& ctx(int rank) { return *ctx_[static_cast<size_t>(rank)].agent; }
  Agent& gen(int rank) { return *gen_[static_cast<size_t>(rank)].agent; }
  // The rank's fault decorator (null unless options.faults).
  FaultTransport* ctx_faults(int rank) { return ctx_[static_cast<size_t>(rank)].faults; }
  FaultTransport* gen_faults(int rank) { return gen_[static_cast<size_t>(rank)].faults; }
  int64_t blocks_per_request(bool ctx_side) const;

  // The tables of a request of `tokens` tokens in `slot`: the slot's ctx
  // table (drawn once, its KV filled at Create for max_tokens tokens) and a
  // fresh random gen table.
  BlockTables Tables(int slot, int64_t tokens, std::mt19937_64& rng) const;
  // Sets every byte of `slot` in every gen rank's pool to the sentinel.
  void ClearGen(int slot);
  // Checks gen rank `rank` after a pull of `range` into `tables` (see the
  // file comment). Tokens [0, range.start) must be untouched too.
  VerifyResult VerifyGen(int rank, const BlockTables& tables, TokenRange range) const;

  // Publishes on every ctx rank and pulls on every gen rank; waits for all.
  // Returns the first pull error (OK when every pull completed); `infos`,
  // when given, receives each gen rank's TransferInfo.
  Status RunRequest(uint64_t request_id, const BlockTables& tables, TokenRange range,
                    PullOptions pull = {}, std::vector<TransferInfo>* infos = nullptr);

  // Shuts every agent down (gen first).
  void Shutdown();

  // The bytes of a rank's pool, one span per allocation: the memory the
  // application owns (tests snapshot it, poison it, compare it).
  std::vector<std::span<std::byte>> PoolMemory(bool ctx_side, int rank);
  // The loopback fabric of every rank (its test seams and observers).
  LoopbackFabric& fabric() { return *fabric_; }

 private:
  struct Rank {
    std::vector<std::vector<std::byte>> memory;  // one allocation, or one per layer
    std::unique_ptr<PoolLayout> layout;
    std::unique_ptr<Agent> agent;
    FaultTransport* faults = nullptr;
  };

  Cluster(const ClusterOptions& options, Topology ctx, Topology gen);
  Status AddRank(bool ctx_side, int rank, const std::shared_ptr<LoopbackFabric>& fabric);
  // Writes the semantic values of tokens [0, max_tokens) into every ctx
  // rank's blocks of `table`.
  void FillCtx(const std::vector<int32_t>& table);

  ClusterOptions options_;
  std::shared_ptr<LoopbackFabric> fabric_;
  Topology ctx_topology_;
  Topology gen_topology_;
  std::vector<Rank> ctx_;
  std::vector<Rank> gen_;
  std::vector<std::vector<int32_t>> ctx_tables_;  // per slot
};

// The semantic value of one element's bytes: element `d` of the row
// (layer, kv, head, token), all global indices; `elem_bytes` of it are used.
uint64_t ElementValue(int layer, int kv, int head, int64_t token, int d);

}  // namespace kvbounce::tools

#endif  // KVBOUNCE_TOOLS_CLUSTER_H_
