#include "tools/cli.h"

#include <unistd.h>

#include <CLI/CLI.hpp>
#include <exception>
#include <fstream>
#include <iostream>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <string_view>

#include "kvbounce/logging.h"
#include "tools/bench_command.h"
#include "tools/plan_command.h"
#include "tools/progress.h"
#include "tools/sweep_command.h"
#include "tools/worker_command.h"

namespace kvbounce::tools {
namespace {

// "kvbounce plan" / "kvbounce bench", from the first argument that names a
// command (a parse error can come before CLI11 knows which one ran).
std::string CommandName(int argc, const char* const* argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string_view a(argv[i]);
    if (a == "plan" || a == "bench" || a == "sweep" || a == "worker") {
      return "kvbounce " + std::string(a);
    }
  }
  return "kvbounce";
}

int Run(int argc, const char* const* argv, std::ostream& out, std::ostream& err) {
  // Reports a bad KVBOUNCE_LOG_LEVEL (once) before anything else is printed.
  MinLogLevel();
  CLI::App app("kvbounce: moves paged KV cache from prefill (ctx) to decode (gen) workers");
  app.require_subcommand(1);
  PlanFlags plan_flags;
  CLI::App* plan = AddPlanCommand(app, &plan_flags);
  BenchFlags bench_flags;
  CLI::App* bench = AddBenchCommand(app, &bench_flags);
  SweepFlags sweep_flags;
  CLI::App* sweep = AddSweepCommand(app, &sweep_flags);
  WorkerFlags worker_flags;
  CLI::App* worker = AddWorkerCommand(app, &worker_flags);
  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {  // --help
    return app.exit(e, out, err);
  } catch (const CLI::ParseError& e) {
    const std::string command = CommandName(argc, argv);
    if (command == "kvbounce" && argc > 1 && argv[1][0] != '-') {
      err << "kvbounce: error: unknown command '" << argv[1]
          << "' (known: plan, bench, sweep, worker; see kvbounce --help)\n";
      return 2;
    }
    err << command << ": error: " << e.what() << " (see " << command << " --help)\n";
    return 2;
  }

  if (plan->parsed()) {
    const Status status = RunPlan(plan_flags, out);
    if (!status.ok()) {
      err << "kvbounce plan: error: " << status.message() << "\n";
      return 2;
    }
    return 0;
  }
  // Progress goes to `err`: a live line when that is a terminal.
  const bool live = &err == &std::cerr && isatty(STDERR_FILENO) == 1;
  if (bench->parsed()) {
    bench_flags.chaos_exit_when_stuck = true;
    std::optional<Progress> progress;
    if (!bench_flags.quiet && !bench_flags.chaos) {
      progress.emplace(err, live, "kvbounce bench");
      bench_flags.progress = &*progress;
    }
    Result<nlohmann::json> report = RunBench(bench_flags, out);
    if (!report.ok()) {
      err << "kvbounce bench: error: " << report.status().message() << "\n";
      return 2;
    }
    progress.reset();
    PrintBenchTable(*report, out);
    if (!bench_flags.json_file.empty()) {
      std::ofstream file(bench_flags.json_file);
      file << report->dump(2) << "\n";
      if (!file) {
        err << "kvbounce bench: error: cannot write " << bench_flags.json_file << "\n";
        return 2;
      }
    }
    std::string why;
    if (!BenchPassed(*report, &why)) {
      err << "kvbounce bench: FAILED: " << why << "\n";
      return 1;
    }
    return 0;
  }
  if (sweep->parsed()) {
    std::optional<Progress> progress;
    if (!sweep_flags.bench.quiet) {
      progress.emplace(err, live, "kvbounce sweep");
      sweep_flags.bench.progress = &*progress;
    }
    Result<nlohmann::json> report = RunSweep(sweep_flags, out);
    progress.reset();
    if (!report.ok()) {
      err << "kvbounce sweep: error: " << report.status().message() << "\n";
      return 2;
    }
    PrintSweepTable(*report, out);
    if (Status s = WriteSweep(sweep_flags, *report, out); !s.ok()) {
      err << "kvbounce sweep: error: " << s.message() << "\n";
      return 2;
    }
    if (!report->value("passed", false)) {
      for (const nlohmann::json& p : (*report)["points"]) {
        if (!p["passed"].get<bool>()) {
          err << "kvbounce sweep: FAILED: " << sweep_flags.axis << "=" << p["value"].get<int64_t>()
              << ": " << p["failure"].get<std::string>() << "\n";
        }
      }
      return 1;
    }
    return 0;
  }
  if (worker->parsed()) {
    Result<bool> passed = RunWorker(worker_flags, /*in_fd=*/0, out, err);
    if (!passed.ok()) {
      err << "kvbounce worker: error: " << passed.status().message() << "\n";
      return 2;
    }
    return *passed ? 0 : 1;
  }
  return 0;
}

}  // namespace

int RunCli(int argc, const char* const* argv, std::ostream& out, std::ostream& err) {
  try {
    return Run(argc, argv, out, err);
  } catch (const std::bad_alloc&) {
    err << CommandName(argc, argv) << ": error: out of memory\n";
  } catch (const std::exception& e) {
    err << CommandName(argc, argv) << ": error: " << e.what() << "\n";
  } catch (...) {
    err << CommandName(argc, argv) << ": error: unknown exception\n";
  }
  return 2;
}

}  // namespace kvbounce::tools
