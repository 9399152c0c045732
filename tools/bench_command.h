// `kvbounce bench`: runs every rank of one ctx instance and one gen instance,
// moves the KV of many requests on each path, verifies every received byte
// semantically and reports throughput, latency, writes, path and leaks.
#ifndef KVBOUNCE_TOOLS_BENCH_COMMAND_H_
#define KVBOUNCE_TOOLS_BENCH_COMMAND_H_

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <ostream>
#include <string>

#include "kvbounce/status.h"
#include "tools/scenario.h"

namespace kvbounce::tools {

struct BenchFlags {
  BenchFlags();  // the bench's own scenario defaults (see bench_command.cc)

  ScenarioFlags scenario;
  std::string transport = "loopback";
  std::string memory = "host";
  std::string paths;  // empty: every path the transport supports
  int requests = 16;
  int concurrency = 2;
  int64_t bounce_size_mb = -1;  // -1: large enough for `concurrency` requests
  double inject_fail_rate = 0;
  std::string json_file;
};

CLI::App* AddBenchCommand(CLI::App& app, BenchFlags* flags);

// Runs the bench. `report` receives {"runs": [...]} (one object per path
// run). Errors: bad flags, a cluster that cannot be built. A run that
// mismatched or leaked is not an error here: see BenchPassed.
Result<nlohmann::json> RunBench(const BenchFlags& flags, std::ostream& log);

// True when no byte mismatched, no arena byte is outstanding, and every
// request completed or failed because of an injected fault. `why` receives
// the reason when false.
bool BenchPassed(const nlohmann::json& report, std::string* why);

// Prints the runs as a table.
void PrintBenchTable(const nlohmann::json& report, std::ostream& out);

}  // namespace kvbounce::tools

#endif  // KVBOUNCE_TOOLS_BENCH_COMMAND_H_
