#include "tools/bench_report.h"

#include <algorithm>
#include <cmath>

namespace kvbounce::tools {

void PathRun::CountFailure(const Status& outcome) {
  ++failed;
  if (std::string(outcome.message()).find("injected") == std::string::npos) {
    if (unexplained++ == 0) first_unexplained = outcome.ToString();
  } else {
    ++failed_by_injection;
  }
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t rank = static_cast<size_t>(std::ceil(p / 100.0 * static_cast<double>(v.size())));
  return v[std::min(v.size() - 1, rank == 0 ? 0 : rank - 1)];
}

nlohmann::json PathRunJson(const PathRun& run, const std::string& transport,
                           const std::string& memory, double inject_fail_rate,
                           std::optional<double> ceiling_gbps) {
  // Bounce writes nothing where the writer gathered straight into a mapped
  // recv slot (Config::bounce_gather_mapped): count the writes (those of
  // settled requests, or failed ones), not the path.
  const bool through_transport =
      (run.taken.count("per-block") != 0 || run.taken.count("bounce") != 0) &&
      (run.transport_writes > 0 || run.injected_write_failures > 0);
  nlohmann::json j;
  j["transport"] = transport;
  j["memory"] = memory;
  j["path"] = std::string(TransferPathName(run.path));
  j["requests"] = run.requests;
  j["completed"] = run.completed;
  j["failed"] = run.failed;
  j["unexplained_failures"] = run.unexplained;
  if (!run.first_unexplained.empty()) j["first_unexplained_failure"] = run.first_unexplained;
  j["requests_failed_by_injection"] = run.failed_by_injection;
  j["injected_write_failures"] = run.injected_write_failures;
  j["injected_failed_batches"] = run.injected_failed_batches;
  j["fault_injection_applies"] = inject_fail_rate > 0 && through_transport;
  j["bytes"] = run.bytes;
  j["seconds"] = run.seconds;
  j["throughput_gbps"] = run.seconds > 0 ? static_cast<double>(run.bytes) / run.seconds / 1e9 : 0.0;
  if (run.ceiling_seconds > 0 && run.ceiling_bytes > 0) {
    ceiling_gbps = static_cast<double>(run.ceiling_bytes) / run.ceiling_seconds / 1e9;
    j["ceiling_gbps"] = *ceiling_gbps;
    j["ceiling_bytes"] = run.ceiling_bytes;
  }
  if (ceiling_gbps && *ceiling_gbps > 0) {
    j["fraction_of_ceiling"] = j["throughput_gbps"].get<double>() / *ceiling_gbps;
  }
  j["latency_ms"] = {{"p50", Percentile(run.latency_ms, 50)},
                     {"p90", Percentile(run.latency_ms, 90)},
                     {"p99", Percentile(run.latency_ms, 99)},
                     {"max", Percentile(run.latency_ms, 100)}};
  if (!run.dispatch_latency_ms.empty()) {
    j["dispatch_latency_ms"] = {{"p50", Percentile(run.dispatch_latency_ms, 50)},
                                {"p90", Percentile(run.dispatch_latency_ms, 90)},
                                {"p99", Percentile(run.dispatch_latency_ms, 99)},
                                {"max", Percentile(run.dispatch_latency_ms, 100)}};
  }
  j["paths_taken"] = run.taken;
  j["transport_writes"] = run.transport_writes;
  j["verified_bytes"] = run.verified;
  j["mismatches"] = run.mismatches;
  if (!run.first_mismatch.empty()) j["first_mismatch"] = run.first_mismatch;
  j["arena_outstanding_bytes"] = run.arena_outstanding_bytes;
  j["chunks"] = run.chunks;
  j["credit_stall_ms"] = run.credit_stall_ms;
  return j;
}

}  // namespace kvbounce::tools
