#include "tools/sweep_command.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <climits>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include "tools/bench_report.h"
#include "tools/ceiling.h"
#include "tools/plan_command.h"
#include "tools/progress.h"
#include "tools/resource_limits.h"

namespace kvbounce::tools {
namespace {

constexpr size_t kMaxPoints = 64;

std::string KnownAxes() {
  std::string out;
  for (const char* a : kSweepAxes) out += (out.empty() ? "" : ", ") + std::string(a);
  return out;
}

// The range of an axis's values, and what the plot calls it.
struct AxisSpec {
  int64_t min;
  int64_t max;
  const char* x_label;
};

AxisSpec SpecOf(const std::string& axis) {
  if (axis == "fragment") return {1, 1 << 20, "mean direct fragment (bytes)"};
  if (axis == "tokens") return {1, int64_t{1} << 30, "tokens per request"};
  if (axis == "ctx-tp") return {1, kBenchMaxRanksPerInstance, "ctx TP (fan-in into the gen TP)"};
  if (axis == "concurrency") return {1, kMaxConcurrency, "requests in flight"};
  return {1, Config::kMaxBounceSizeMb, "staging arena (MiB)"};
}

// "tp=8,pp=1,layout=x" with tp set to `tp` (added when missing).
std::string WithTp(const std::string& side, int64_t tp) {
  std::stringstream in(side);
  std::string item, out;
  bool set = false;
  while (std::getline(in, item, ',')) {
    if (item.rfind("tp=", 0) == 0) {
      item = "tp=" + std::to_string(tp);
      set = true;
    }
    if (!item.empty()) out += (out.empty() ? "" : ",") + item;
  }
  if (!set) out = "tp=" + std::to_string(tp) + (out.empty() ? "" : "," + out);
  return out;
}

BenchFlags PointFlags(const SweepFlags& flags, int64_t value) {
  BenchFlags b = flags.bench;
  if (flags.axis == "fragment") {
    b.scenario.tokens_per_block = static_cast<int>(value);
  } else if (flags.axis == "tokens") {
    b.scenario.tokens = value;
  } else if (flags.axis == "ctx-tp") {
    b.scenario.ctx = WithTp(b.scenario.ctx, value);
  } else if (flags.axis == "concurrency") {
    b.concurrency = static_cast<int>(value);
  } else {
    b.bounce_size_mb = value;
  }
  b.json_file.clear();
  return b;
}

std::string CsvField(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string out = "\"";
  for (char c : s) out += c == '"' ? std::string("\"\"") : std::string(1, c);
  return out + "\"";
}

std::string JsonField(const nlohmann::json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_boolean()) return v.get<bool>() ? "true" : "false";
  if (v.is_null()) return "";
  return v.dump();
}

constexpr const char* kCsvColumns[] = {"axis",
                                       "value",
                                       "x",
                                       "transport",
                                       "memory",
                                       "path",
                                       "requests",
                                       "completed",
                                       "failed",
                                       "bytes",
                                       "seconds",
                                       "throughput_gbps",
                                       "ceiling_gbps",
                                       "fraction_of_ceiling",
                                       "latency_p50_ms",
                                       "latency_p99_ms",
                                       "transport_writes",
                                       "verified_bytes",
                                       "mismatches",
                                       "arena_outstanding_bytes",
                                       "verified",
                                       "fragment_bytes",
                                       "direct_fragments",
                                       "paths_taken",
                                       "scenario"};

// The script that draws the plot: --plot-script, else beside the binary
// (as installed), else in the source tree this binary was built from.
Result<std::string> PlotScript(const SweepFlags& flags) {
  if (!flags.plot_script.empty()) {
    if (access(flags.plot_script.c_str(), R_OK) != 0) {
      return NotFoundError("--plot-script " + flags.plot_script +
                           ": cannot read: " + std::strerror(errno));
    }
    return flags.plot_script;
  }
  std::vector<std::string> candidates;
  char exe[PATH_MAX];
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n > 0) {
    std::string dir(exe, static_cast<size_t>(n));
    dir = dir.substr(0, dir.rfind('/'));
    candidates.push_back(dir + "/../share/kvbounce/plot_sweep.py");
  }
#ifdef KVBOUNCE_SOURCE_PLOT_SCRIPT
  candidates.push_back(KVBOUNCE_SOURCE_PLOT_SCRIPT);
#endif
  for (const std::string& c : candidates) {
    if (access(c.c_str(), R_OK) == 0) return c;
  }
  return NotFoundError(
      "no plot script (plot_sweep.py) beside the binary or in its source tree; "
      "give --plot-script, or --no-plot");
}

// Runs `argv` with stdout and stderr captured; its exit status and output.
Result<std::pair<int, std::string>> Capture(const std::vector<std::string>& argv) {
  int fds[2];
  if (pipe(fds) != 0) return InternalError(std::string("pipe: ") + std::strerror(errno));
  const pid_t pid = fork();
  if (pid < 0) {
    close(fds[0]);
    close(fds[1]);
    return InternalError(std::string("fork: ") + std::strerror(errno));
  }
  if (pid == 0) {
    dup2(fds[1], 1);
    dup2(fds[1], 2);
    close(fds[0]);
    close(fds[1]);
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  close(fds[1]);
  std::string output;
  char buf[4096];
  for (;;) {
    const ssize_t r = read(fds[0], buf, sizeof(buf));
    if (r > 0) {
      output.append(buf, static_cast<size_t>(r));
    } else if (r < 0 && errno == EINTR) {
      continue;
    } else {
      break;
    }
  }
  close(fds[0]);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return std::pair<int, std::string>(
      WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), output);
}

}  // namespace

SweepFlags::SweepFlags() = default;

CLI::App* AddSweepCommand(CLI::App& app, SweepFlags* flags) {
  CLI::App* cmd = app.add_subcommand(
      "sweep",
      "Run the bench across one axis on every path, verify every run, write CSV and JSON and "
      "plot throughput per path against the axis with the measured ceiling");
  cmd->add_option("--axis", flags->axis, "The axis: " + KnownAxes())->required();
  cmd->add_option("--values", flags->values, "Comma list of the axis's values (positive integers)")
      ->required();
  cmd->add_option("--out", flags->out,
                  "Prefix of the results: PREFIX.csv, PREFIX.json, PREFIX.png, PREFIX.svg")
      ->capture_default_str();
  cmd->add_flag("--no-plot", flags->no_plot, "Write CSV and JSON only");
  cmd->add_option("--python", flags->python, "The Python 3 with matplotlib that plots")
      ->capture_default_str();
  cmd->add_option("--plot-script", flags->plot_script,
                  "The plot script (default: plot_sweep.py shipped with kvbounce)");
  RegisterBenchFlags(*cmd, &flags->bench, /*sweep=*/true);
  return cmd;
}

Result<std::vector<SweepPoint>> PlanSweep(const SweepFlags& flags) {
  bool known = false;
  for (const char* a : kSweepAxes) known = known || flags.axis == a;
  if (!known) {
    return InvalidArgumentError("--axis '" + flags.axis + "' is unknown (known: " + KnownAxes() +
                                ")");
  }
  const AxisSpec spec = SpecOf(flags.axis);
  std::vector<SweepPoint> points;
  std::set<int64_t> seen;
  std::stringstream in(flags.values);
  std::string item;
  while (std::getline(in, item, ',')) {
    int64_t v = 0;
    auto [ptr, ec] = std::from_chars(item.data(), item.data() + item.size(), v);
    if (item.empty() || ec != std::errc() || ptr != item.data() + item.size()) {
      return InvalidArgumentError("--values: '" + item + "' is not an integer (--axis " +
                                  flags.axis + " takes integers in [" + std::to_string(spec.min) +
                                  ", " + std::to_string(spec.max) + "])");
    }
    if (v < spec.min || v > spec.max) {
      return InvalidArgumentError("--values: " + item + " is out of range for --axis " +
                                  flags.axis + ": must be in [" + std::to_string(spec.min) + ", " +
                                  std::to_string(spec.max) + "]");
    }
    if (!seen.insert(v).second) {
      return InvalidArgumentError("--values: " + item + " is repeated");
    }
    points.push_back({v, PointFlags(flags, v)});
  }
  if (points.empty() || flags.values.back() == ',') {
    return InvalidArgumentError("--values '" + flags.values +
                                "': give a comma list of integers, e.g. 256,1024,4096");
  }
  if (points.size() > kMaxPoints) {
    return InvalidArgumentError("--values: " + std::to_string(points.size()) + " points; at most " +
                                std::to_string(kMaxPoints));
  }
  for (const SweepPoint& p : points) {
    Result<BenchPlan> plan = PlanBench(p.bench);
    if (!plan.ok()) {
      return plan.status().WithContext("--axis " + flags.axis + " = " + std::to_string(p.value));
    }
  }
  return points;
}

Result<nlohmann::json> RunSweep(const SweepFlags& flags, std::ostream& log) {
  KVB_ASSIGN_OR_RETURN(std::vector<SweepPoint> points, PlanSweep(flags));
  const BenchFlags& b = flags.bench;
  int64_t total = 0;
  for (const SweepPoint& p : points) {
    KVB_ASSIGN_OR_RETURN(BenchPlan plan, PlanBench(p.bench));
    total += static_cast<int64_t>(plan.paths.size()) * p.bench.requests;
  }
  Progress* progress = b.progress;
  if (progress != nullptr) progress->SetTotal(total);

  log << "kvbounce sweep: --axis " << flags.axis << " over " << points.size()
      << " points, transport " << b.transport << ", memory " << b.memory << "\n";
  log.flush();
  Result<Ceiling> ceiling = MeasureCeiling(b.transport, b.memory, b.device, b.ucx_tls);
  if (!ceiling.ok()) return ceiling.status().WithContext("measuring the ceiling");
  log << "  ceiling: " << ceiling->what << ": " << ceiling->gbps << " GB/s\n";
  log.flush();

  const AxisSpec spec = SpecOf(flags.axis);
  nlohmann::json report;
  report["axis"] = flags.axis;
  report["x_label"] = spec.x_label;
  report["transport"] = b.transport;
  report["memory"] = b.memory;
  report["ceiling"] = {{"what", ceiling->what}, {"gbps", ceiling->gbps}};
  nlohmann::json values = nlohmann::json::array(), rows = nlohmann::json::array(),
                 reports = nlohmann::json::array();
  bool passed = true;
  for (size_t i = 0; i < points.size(); ++i) {
    const SweepPoint& p = points[i];
    values.push_back(p.value);
    const std::string name = flags.axis + "=" + std::to_string(p.value);
    if (progress != nullptr) {
      progress->SetStage("point " + std::to_string(i + 1) + "/" + std::to_string(points.size()) +
                         " " + name);
    }
    BenchFlags point = p.bench;
    point.progress = progress;
    // The bench's own log is long; the sweep keeps one line per point.
    std::ostringstream bench_log;
    Result<nlohmann::json> ran = RunBench(point, bench_log);
    if (!ran.ok()) return ran.status().WithContext("--axis " + name);
    nlohmann::json r = std::move(ran).value();
    KVB_ASSIGN_OR_RETURN(Scenario scenario, BuildScenario(point.scenario));
    KVB_ASSIGN_OR_RETURN(nlohmann::json plan, PlanScenario(scenario));
    const uint64_t plan_bytes = plan["totals"]["bytes"].get<uint64_t>();
    const uint64_t fragments = plan["totals"]["direct_fragments"].get<uint64_t>();
    const double fragment_bytes =
        fragments > 0 ? static_cast<double>(plan_bytes) / static_cast<double>(fragments) : 0;
    std::string why;
    const bool ok = BenchPassed(r, &why);
    passed = passed && ok;
    const double point_ceiling =
        r.contains("ceiling") ? r["ceiling"]["gbps"].get<double>() : ceiling->gbps;
    log << "  " << name << ":";
    for (const nlohmann::json& run : r["runs"]) {
      std::string taken;
      for (const auto& [path, n] : run["paths_taken"].items()) {
        taken += (taken.empty() ? "" : " ") + path + "=" + std::to_string(n.get<uint64_t>());
      }
      const double gbps = run["throughput_gbps"].get<double>();
      nlohmann::json row;
      row["axis"] = flags.axis;
      row["value"] = p.value;
      row["x"] = flags.axis == "fragment" ? fragment_bytes : static_cast<double>(p.value);
      row["transport"] = run["transport"];
      row["memory"] = run["memory"];
      row["path"] = run["path"];
      for (const char* k :
           {"requests", "completed", "failed", "bytes", "seconds", "throughput_gbps",
            "transport_writes", "verified_bytes", "mismatches", "arena_outstanding_bytes"}) {
        row[k] = run[k];
      }
      // A host-pool run's own paired ceiling where it has one (the bench's
      // RunPath), else the point's.
      const double run_ceiling =
          run.contains("ceiling_gbps") ? run["ceiling_gbps"].get<double>() : point_ceiling;
      row["ceiling_gbps"] = run_ceiling;
      row["fraction_of_ceiling"] = run_ceiling > 0 ? gbps / run_ceiling : 0.0;
      row["latency_p50_ms"] = run["latency_ms"]["p50"];
      row["latency_p99_ms"] = run["latency_ms"]["p99"];
      row["verified"] = ok && run["mismatches"].get<uint64_t>() == 0 &&
                        run["unexplained_failures"].get<int>() == 0 &&
                        run["arena_outstanding_bytes"].get<uint64_t>() == 0 &&
                        run["verified_bytes"].get<uint64_t>() > 0;
      row["fragment_bytes"] = fragment_bytes;
      row["direct_fragments"] = fragments;
      row["paths_taken"] = taken;
      row["scenario"] = r["scenario"];
      char line[128];
      std::snprintf(line, sizeof(line), " %s %.2f GB/s", run["path"].get<std::string>().c_str(),
                    gbps);
      log << line;
      rows.push_back(std::move(row));
    }
    log << (ok ? " (verified)" : " (FAILED: " + why + ")") << "\n";
    log.flush();
    nlohmann::json entry = {{"value", p.value}, {"passed", ok}, {"report", std::move(r)}};
    if (!ok) entry["failure"] = why;
    reports.push_back(std::move(entry));
  }
  report["values"] = std::move(values);
  report["rows"] = std::move(rows);
  report["points"] = std::move(reports);
  report["passed"] = passed;
  return report;
}

std::string SweepCsv(const nlohmann::json& report) {
  std::string out;
  for (const char* c : kCsvColumns) out += (out.empty() ? "" : ",") + std::string(c);
  out += "\n";
  for (const nlohmann::json& row : report["rows"]) {
    std::string line;
    for (const char* c : kCsvColumns) {
      line += (line.empty() ? "" : ",") + CsvField(row.contains(c) ? JsonField(row[c]) : "");
    }
    out += line + "\n";
  }
  return out;
}

Status WriteSweep(const SweepFlags& flags, const nlohmann::json& report, std::ostream& log) {
  const std::string csv = flags.out + ".csv", json = flags.out + ".json";
  {
    std::ofstream f(csv);
    f << SweepCsv(report);
    if (!f) return InvalidArgumentError("--out: cannot write " + csv);
  }
  {
    std::ofstream f(json);
    f << report.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
    if (!f) return InvalidArgumentError("--out: cannot write " + json);
  }
  log << "  wrote " << csv << " and " << json << "\n";
  if (flags.no_plot) return Status::Ok();
  KVB_ASSIGN_OR_RETURN(std::string script, PlotScript(flags));
  KVB_ASSIGN_OR_RETURN(
      auto result, Capture({flags.python, script, json, flags.out + ".png", flags.out + ".svg"}));
  if (result.first != 0) {
    std::string text = result.second;
    while (!text.empty() && text.back() == '\n') text.pop_back();
    const size_t last = text.rfind('\n');
    return UnavailableError("plotting with " + flags.python + " " + script + " failed (exit " +
                            std::to_string(result.first) +
                            "): " + (last == std::string::npos ? text : text.substr(last + 1)) +
                            " (Debian: apt-get install python3-matplotlib; or --no-plot)");
  }
  log << "  plotted " << flags.out << ".png and " << flags.out << ".svg\n";
  return Status::Ok();
}

void PrintSweepTable(const nlohmann::json& report, std::ostream& out) {
  char line[256];
  std::snprintf(line, sizeof(line), "\n%-12s %-9s %10s %8s %7s %10s %8s\n",
                report["axis"].get<std::string>().c_str(), "path", "GB/s", "ceil%", "p99 ms",
                "verified", "ok");
  out << line;
  for (const nlohmann::json& r : report["rows"]) {
    std::snprintf(line, sizeof(line), "%-12lld %-9s %10.2f %8.1f %7.2f %9.1fM %8s\n",
                  static_cast<long long>(r["value"].get<int64_t>()),
                  r["path"].get<std::string>().c_str(), r["throughput_gbps"].get<double>(),
                  100 * r["fraction_of_ceiling"].get<double>(), r["latency_p99_ms"].get<double>(),
                  static_cast<double>(r["verified_bytes"].get<uint64_t>()) / 1e6,
                  r["verified"].get<bool>() ? "yes" : "NO");
    out << line;
  }
  out << "\nceiling: " << report["ceiling"]["what"].get<std::string>() << ": "
      << report["ceiling"]["gbps"].get<double>() << " GB/s\n";
}

}  // namespace kvbounce::tools
