#include "tools/plan_command.h"

#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "layout/pool_layout.h"
#include "layout/state_layout.h"
#include "tools/resource_limits.h"

namespace kvbounce::tools {

CLI::App* AddPlanCommand(CLI::App& app, PlanFlags* flags) {
  CLI::App* cmd = app.add_subcommand(
      "plan",
      "Show the transfer plan of one request: per ctx/gen rank pair, bytes, direct "
      "fragments, gather and scatter runs");
  flags->scenario.Register(*cmd);
  cmd->add_flag("--json", flags->json, "Print one JSON object instead of a table");
  return cmd;
}

Result<nlohmann::json> PlanScenario(const Scenario& s) {
  std::string cap_name;
  const uint64_t cap = MemoryCap(s.memory_cap_bytes, &cap_name);
  KVB_RETURN_IF_ERROR(CheckMemory(PlanMemory(s.ctx, s.gen, s.tokens), cap, cap_name,
                                  "plan fewer --tokens or use larger blocks"));
  // One block table per instance (a serving engine's block manager gives all
  // ranks of an instance the same ids), random from a pool twice the size
  // needed. The counts of bytes and direct fragments do not depend on it.
  int64_t ctx_blocks = 0, gen_blocks = 0;
  const std::vector<int32_t> ctx_table =
      RandomBlockTable(s.tokens.end, s.ctx.spec().tokens_per_block, s.seed, &ctx_blocks);
  const std::vector<int32_t> gen_table =
      RandomBlockTable(s.tokens.end, s.gen.spec().tokens_per_block, s.seed + 1, &gen_blocks);
  std::vector<PoolLayout> ctx_pools, gen_pools;
  // Ranks get far-apart fake bases: planning only computes addresses.
  for (int r = 0; r < s.ctx.num_ranks(); ++r) {
    KVB_ASSIGN_OR_RETURN(
        PoolLayout p,
        PoolLayout::ForRank(s.ctx, r, ctx_blocks, Addr(static_cast<uint64_t>(r + 1) << 44)));
    ctx_pools.push_back(std::move(p));
  }
  for (int r = 0; r < s.gen.num_ranks(); ++r) {
    KVB_ASSIGN_OR_RETURN(
        PoolLayout p,
        PoolLayout::ForRank(s.gen, r, gen_blocks, Addr(static_cast<uint64_t>(r + 65) << 44)));
    gen_pools.push_back(std::move(p));
  }
  // Hybrid models: each rank's state pool (one slot) and the request's
  // state, which moves with the KV.
  std::vector<std::optional<StatePoolLayout>> ctx_state, gen_state;
  const bool hybrid = s.ctx.spec().model.hybrid();
  for (int side = 0; side < 2 && hybrid; ++side) {
    const Topology& t = side == 0 ? s.ctx : s.gen;
    auto& out = side == 0 ? ctx_state : gen_state;
    for (int r = 0; r < t.num_ranks(); ++r) {
      out.emplace_back();
      if (t.Placement(r).num_state_layers == 0) continue;
      KVB_ASSIGN_OR_RETURN(
          StatePoolLayout sp,
          StatePoolLayout::ForRank(t, r, 1,
                                   {Addr(static_cast<uint64_t>(r + (side ? 193 : 129)) << 44)}));
      out.back() = std::move(sp);
    }
  }
  auto with_state = [&](PlanSide side, const std::vector<std::optional<StatePoolLayout>>& pools) {
    if (!hybrid) return side;
    const auto& sp = pools[static_cast<size_t>(side.rank)];
    side.state_pool = sp ? &*sp : nullptr;
    side.state_slot = 0;
    return side;
  };

  nlohmann::json pairs = nlohmann::json::array();
  nlohmann::json gen_ranks = nlohmann::json::array();
  uint64_t total_bytes = 0, total_direct = 0, total_pairs = 0, total_state = 0;
  for (int g = 0; g < s.gen.num_ranks(); ++g) {
    nlohmann::json writers = nlohmann::json::array();
    uint64_t gen_bytes = 0, gen_state_bytes = 0;
    for (int c = 0; c < s.ctx.num_ranks(); ++c) {
      KVB_ASSIGN_OR_RETURN(
          PairPlan plan,
          PlanPair(
              with_state({&s.ctx, c, &ctx_pools[static_cast<size_t>(c)], ctx_table}, ctx_state),
              with_state({&s.gen, g, &gen_pools[static_cast<size_t>(g)], gen_table}, gen_state),
              s.tokens));
      if (plan.packed_bytes == 0) continue;
      nlohmann::json pair = {{"ctx_rank", c},
                             {"gen_rank", g},
                             {"bytes", plan.packed_bytes},
                             {"direct_fragments", plan.direct.size()},
                             {"gather_runs", plan.gather.size()},
                             {"scatter_runs", plan.scatter.size()}};
      if (hybrid) pair["state_bytes"] = plan.state_bytes;
      pairs.push_back(std::move(pair));
      writers.push_back(c);
      gen_bytes += plan.packed_bytes;
      gen_state_bytes += plan.state_bytes;
      total_direct += plan.direct.size();
      ++total_pairs;
    }
    total_bytes += gen_bytes;
    total_state += gen_state_bytes;
    nlohmann::json rank = {{"gen_rank", g}, {"writers", writers}, {"bytes", gen_bytes}};
    if (hybrid) rank["state_bytes"] = gen_state_bytes;
    gen_ranks.push_back(std::move(rank));
  }
  nlohmann::json out;
  out["scenario"] = DescribeScenario(s);
  out["pairs"] = std::move(pairs);
  out["gen_ranks"] = std::move(gen_ranks);
  out["totals"] = {
      {"bytes", total_bytes}, {"direct_fragments", total_direct}, {"pairs", total_pairs}};
  if (hybrid) out["totals"]["state_bytes"] = total_state;
  return out;
}

Status RunPlan(const PlanFlags& flags, std::ostream& out) {
  KVB_ASSIGN_OR_RETURN(Scenario scenario, BuildScenario(flags.scenario));
  KVB_ASSIGN_OR_RETURN(nlohmann::json plan, PlanScenario(scenario));
  if (flags.json) {
    out << plan.dump(2) << "\n";
    return Status::Ok();
  }
  out << "kvbounce plan: " << DescribeScenario(scenario) << "\n\n";
  char line[256];
  std::snprintf(line, sizeof(line), "%8s %8s %14s %12s %14s %12s %12s\n", "ctx rank", "gen rank",
                "bytes", "size", "direct frags", "gather runs", "scatter runs");
  out << line;
  for (const auto& p : plan["pairs"]) {
    const uint64_t bytes = p["bytes"];
    const uint64_t direct = p["direct_fragments"];
    std::snprintf(line, sizeof(line), "%8d %8d %14llu %12s %14llu %12llu %12llu\n",
                  p["ctx_rank"].get<int>(), p["gen_rank"].get<int>(),
                  static_cast<unsigned long long>(bytes), HumanBytes(bytes).c_str(),
                  static_cast<unsigned long long>(direct),
                  static_cast<unsigned long long>(p["gather_runs"].get<uint64_t>()),
                  static_cast<unsigned long long>(p["scatter_runs"].get<uint64_t>()));
    out << line;
  }
  out << "\n";
  for (const auto& g : plan["gen_ranks"]) {
    std::string writers;
    for (const auto& w : g["writers"])
      writers += (writers.empty() ? "" : ",") + std::to_string(w.get<int>());
    out << "gen rank " << g["gen_rank"].get<int>() << ": writers {" << writers << "}, "
        << HumanBytes(g["bytes"].get<uint64_t>());
    if (g.contains("state_bytes")) {
      out << " (state " << HumanBytes(g["state_bytes"].get<uint64_t>()) << ")";
    }
    out << "\n";
  }
  const auto& t = plan["totals"];
  const uint64_t total_bytes = t["bytes"];
  const uint64_t total_direct = t["direct_fragments"];
  out << "\ntotal: " << t["pairs"].get<uint64_t>() << " pairs, " << total_bytes << " bytes ("
      << HumanBytes(total_bytes) << "), " << total_direct << " direct fragments, mean "
      << HumanBytes(total_direct ? total_bytes / total_direct : 0) << " per fragment\n";
  if (t.contains("state_bytes")) {
    out << "of which recurrent state: " << t["state_bytes"].get<uint64_t>() << " bytes ("
        << HumanBytes(t["state_bytes"].get<uint64_t>()) << ")\n";
  }
  return Status::Ok();
}

}  // namespace kvbounce::tools
