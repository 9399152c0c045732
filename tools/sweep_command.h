// `kvbounce sweep`: the bench (tools/bench_command.h) run once per value of
// one axis — fragment size, tokens per request, ctx TP fan-in, concurrency or
// staging arena size — on every path of the chosen transport and memory,
// every run verified as the bench verifies it, with the ceiling measured in
// the same run (tools/ceiling.h). It writes the raw results as CSV and JSON,
// one row per point and path, and plots throughput per path against the
// axis (tools/plot_sweep.py, matplotlib) as PNG and SVG.
//
// Axes and what a value sets (every other flag is the bench's):
//   fragment     tokens per block of both sides (--tokens-per-block): the
//                direct fragment a per-block write moves grows with it (a
//                ctx rank's heads times the block's tokens times a head's
//                row); the plot's x is the mean direct fragment in bytes
//                the planner computes for the point
//   tokens       tokens per request (--tokens)
//   ctx-tp       the ctx instance's TP (--ctx tp=V, its other keys kept),
//                into the fixed --gen: the fan-in
//   concurrency  requests in flight (--concurrency)
//   arena-mb     MiB of every staging arena (--bounce-size-mb); a request
//                larger than the recv arena streams through it
//
// Thread safety: one call at a time (it runs the bench).
#ifndef KVBOUNCE_TOOLS_SWEEP_COMMAND_H_
#define KVBOUNCE_TOOLS_SWEEP_COMMAND_H_

#include <CLI/CLI.hpp>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <ostream>
#include <string>
#include <vector>

#include "kvbounce/status.h"
#include "tools/bench_command.h"

namespace kvbounce::tools {

struct SweepFlags {
  SweepFlags();  // the bench's defaults

  BenchFlags bench;
  std::string axis;    // required: one of kSweepAxes
  std::string values;  // required: comma list of positive integers
  // Where the results go: PREFIX.csv, PREFIX.json, PREFIX.png, PREFIX.svg.
  std::string out = "kvbounce-sweep";
  bool no_plot = false;
  std::string python = "/usr/bin/python3";
  // The plot script; empty: tools/plot_sweep.py as installed beside the
  // binary (../share/kvbounce/), else the one of the source tree it was
  // built from.
  std::string plot_script;
};

inline constexpr const char* kSweepAxes[] = {"fragment", "tokens", "ctx-tp", "concurrency",
                                             "arena-mb"};

CLI::App* AddSweepCommand(CLI::App& app, SweepFlags* flags);

// One point of the sweep: the axis value and the bench flags that run it.
struct SweepPoint {
  int64_t value = 0;
  BenchFlags bench;
};

// Validates --axis and --values and every point's bench flags (PlanBench),
// before anything runs. Errors (kInvalidArgument, naming the flag and the
// value, or the point and the bench's reason): an unknown axis, an empty
// list, a value that is not a positive integer, a repeated value, more than
// 64 points, a value out of the axis's range, a point the bench refuses.
Result<std::vector<SweepPoint>> PlanSweep(const SweepFlags& flags);

// Runs every point (progress to flags.bench.progress) and returns the
// report: {"axis", "x_label", "values", "transport", "memory", "ceiling",
// "rows": [one per point and path], "points": [each point's bench report],
// "passed"}. A point whose run did not verify is not an error (see
// "passed", and each point's "failure"). Errors: PlanSweep's, the
// ceiling's measurement, and the bench's own errors for a point.
Result<nlohmann::json> RunSweep(const SweepFlags& flags, std::ostream& log);

// The rows as CSV (RFC 4180, a header line first).
std::string SweepCsv(const nlohmann::json& report);

// Writes PREFIX.csv and PREFIX.json; then, unless no_plot, runs the plot
// script on the JSON for PREFIX.png and PREFIX.svg. Errors:
// kInvalidArgument (a file cannot be written), kNotFound (no plot script),
// kUnavailable (the script failed: its message, e.g. no matplotlib).
Status WriteSweep(const SweepFlags& flags, const nlohmann::json& report, std::ostream& log);

// One line per point and path: value, path, GB/s, share of the ceiling,
// verified bytes.
void PrintSweepTable(const nlohmann::json& report, std::ostream& out);

}  // namespace kvbounce::tools

#endif  // KVBOUNCE_TOOLS_SWEEP_COMMAND_H_
