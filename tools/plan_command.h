// `kvbounce plan`: what the planner makes of a topology, per (ctx rank, gen
// rank) pair — bytes, direct fragments, gather and scatter runs.
#ifndef KVBOUNCE_TOOLS_PLAN_COMMAND_H_
#define KVBOUNCE_TOOLS_PLAN_COMMAND_H_

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <ostream>

#include "kvbounce/status.h"
#include "tools/scenario.h"

namespace kvbounce::tools {

struct PlanFlags {
  ScenarioFlags scenario;
  bool json = false;
};

// Adds the `plan` subcommand with its flags to `app`.
CLI::App* AddPlanCommand(CLI::App& app, PlanFlags* flags);

// The plan of every pair of `scenario` as the JSON object of the CLI's
// contract: {"pairs": [...], "gen_ranks": [...], "totals": {...}, ...}.
// Errors: whatever the planner reports.
Result<nlohmann::json> PlanScenario(const Scenario& scenario);

// Runs the command: prints the JSON (--json) or a table to `out`.
Status RunPlan(const PlanFlags& flags, std::ostream& out);

}  // namespace kvbounce::tools

#endif  // KVBOUNCE_TOOLS_PLAN_COMMAND_H_
