// kvbounce: the command-line tool (DESIGN §13).
#include <CLI/CLI.hpp>
#include <fstream>
#include <iostream>

#include "tools/bench_command.h"
#include "tools/plan_command.h"

int main(int argc, char** argv) {
  CLI::App app("kvbounce: moves paged KV cache from prefill (ctx) to decode (gen) workers");
  app.require_subcommand(1);
  kvbounce::tools::PlanFlags plan_flags;
  CLI::App* plan = kvbounce::tools::AddPlanCommand(app, &plan_flags);
  kvbounce::tools::BenchFlags bench_flags;
  CLI::App* bench = kvbounce::tools::AddBenchCommand(app, &bench_flags);
  CLI11_PARSE(app, argc, argv);

  if (plan->parsed()) {
    const kvbounce::Status status = kvbounce::tools::RunPlan(plan_flags, std::cout);
    if (!status.ok()) {
      std::cerr << "kvbounce plan: error: " << status.message() << "\n";
      return 2;
    }
    return 0;
  }
  if (bench->parsed()) {
    auto report = kvbounce::tools::RunBench(bench_flags, std::cout);
    if (!report.ok()) {
      std::cerr << "kvbounce bench: error: " << report.status().message() << "\n";
      return 2;
    }
    kvbounce::tools::PrintBenchTable(*report, std::cout);
    if (!bench_flags.json_file.empty()) {
      std::ofstream out(bench_flags.json_file);
      out << report->dump(2) << "\n";
      if (!out) {
        std::cerr << "kvbounce bench: error: cannot write " << bench_flags.json_file << "\n";
        return 2;
      }
    }
    std::string why;
    if (!kvbounce::tools::BenchPassed(*report, &why)) {
      std::cerr << "kvbounce bench: FAILED: " << why << "\n";
      return 1;
    }
    return 0;
  }
  return 0;
}
