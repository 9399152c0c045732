// What one path run of the bench counted, and its JSON object in the report
// (README "kvbounce bench" lists the fields). Shared by the in-process bench,
// the multi-process bench (`--transport ucx`) and a `kvbounce worker` that
// runs requests on its own, so all three report the same way.
//
// Thread safety: plain values and pure functions.
#ifndef KVBOUNCE_TOOLS_BENCH_REPORT_H_
#define KVBOUNCE_TOOLS_BENCH_REPORT_H_

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "kvbounce/config.h"
#include "kvbounce/status.h"

namespace kvbounce::tools {

struct PathRun {
  TransferPath path = TransferPath::kAuto;
  int requests = 0;
  int completed = 0;
  int failed = 0;
  int unexplained = 0;
  int failed_by_injection = 0;
  std::string first_unexplained;
  uint64_t bytes = 0;
  double seconds = 0;
  std::vector<double> latency_ms;
  // Multi-process runs only: from the parent's dispatch of the request's
  // commands to its last completion (latency_ms is then the agents' own
  // measure, each gen rank's Pull to its completion, the worst rank).
  std::vector<double> dispatch_latency_ms;
  std::map<std::string, uint64_t> taken;
  uint64_t verified = 0;
  uint64_t mismatches = 0;
  std::string first_mismatch;
  // Filled in after the run.
  uint64_t transport_writes = 0;
  uint64_t arena_outstanding_bytes = 0;
  uint64_t injected_write_failures = 0;
  uint64_t injected_failed_batches = 0;
  // Streaming bounce (docs/sessions.md): chunks the gen ranks scattered,
  // and how long writers waited idle for a credit, summed over them.
  uint64_t chunks = 0;
  double credit_stall_ms = 0;
  // Host pools over loopback: the ceiling paired with this path, the same
  // requests' fragments copied plainly right after each of its waves
  // (bytes and seconds summed over the waves; 0: not measured).
  uint64_t ceiling_bytes = 0;
  double ceiling_seconds = 0;

  // A request that failed with `outcome`: explained when the fault injector
  // caused it (its message says "injected").
  void CountFailure(const Status& outcome);
};

// The p-th percentile (nearest rank) of `v`; 0 when empty.
double Percentile(std::vector<double> v, double p);

// The run's object in the report's "runs" array; with a ceiling measured in
// the same run (GB/s, > 0), its `fraction_of_ceiling` too — against the
// run's own paired ceiling (`ceiling_gbps`) where it has one.
nlohmann::json PathRunJson(const PathRun& run, const std::string& transport,
                           const std::string& memory, double inject_fail_rate,
                           std::optional<double> ceiling_gbps = std::nullopt);

}  // namespace kvbounce::tools

#endif  // KVBOUNCE_TOOLS_BENCH_REPORT_H_
