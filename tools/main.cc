// kvbounce: the command-line tool (DESIGN §13).
#include <iostream>

#include <CLI/CLI.hpp>

#include "tools/plan_command.h"

int main(int argc, char** argv) {
  CLI::App app("kvbounce: moves paged KV cache from prefill (ctx) to decode (gen) workers");
  app.require_subcommand(1);
  kvbounce::tools::PlanFlags plan_flags;
  CLI::App* plan = kvbounce::tools::AddPlanCommand(app, &plan_flags);
  CLI11_PARSE(app, argc, argv);

  kvbounce::Status status;
  std::string command;
  if (plan->parsed()) {
    command = "plan";
    status = kvbounce::tools::RunPlan(plan_flags, std::cout);
  }
  if (!status.ok()) {
    std::cerr << "kvbounce " << command << ": error: " << status.message() << "\n";
    return 2;
  }
  return 0;
}
