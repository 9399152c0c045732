// The agents' statistics in the Prometheus text exposition format (version
// 0.0.4), for an engine that serves them on its own metrics endpoint, and for
// `kvbounce worker --metrics-port` (docs/operations.md lists every metric).
//
//   std::vector<kvbounce::PrometheusTarget> targets(1);
//   targets[0].labels = {{"role", "gen"}, {"instance_id", "gen0"}, {"rank", "3"}};
//   targets[0].stats = agent->Stats();
//   targets[0].arena_capacity_bytes = 512ull << 20;   // optional
//   kvbounce::Result<std::string> text = kvbounce::RenderPrometheus(targets);
//   // serve *text with Content-Type kPrometheusContentType
//
// Every metric is named kvbounce_<what>, counters end in _total, sizes in
// _bytes and durations in _seconds (counters of either: _bytes_total,
// _seconds_total). Each sample carries the target's labels, then its own:
// `side` (sender: a ctx rank's share of a request; receiver: a gen rank's
// pull), `path` (the path taken), `outcome` (completed, failed, cancelled,
// timed_out) and `reason` (a fallback's). Several targets (the ranks of one
// process) render into one exposition, each family's HELP and TYPE once.
//
// Counters are taken from AgentStats as the agent reported them, so a
// counter never goes down between two renders of one agent's stats taken in
// order; an agent that was re-created starts again from 0, which Prometheus
// reads as a counter reset.
//
// Thread safety: pure functions of their arguments.
#ifndef KVBOUNCE_PROMETHEUS_H_
#define KVBOUNCE_PROMETHEUS_H_

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kvbounce/agent.h"
#include "kvbounce/status.h"

namespace kvbounce {

// The Content-Type of the text RenderPrometheus returns.
inline constexpr std::string_view kPrometheusContentType =
    "text/plain; version=0.0.4; charset=utf-8";

// One agent's statistics and the labels that tell it apart from the others.
struct PrometheusTarget {
  // Label names match [a-zA-Z_][a-zA-Z0-9_]*, do not start with "__" and
  // are none of the renderer's own (side, path, outcome, reason, le); values
  // are any UTF-8 text (escaped as the format asks). Prefer names such as
  // "role", "instance_id" and "rank": Prometheus sets "instance" and "job"
  // itself.
  std::vector<std::pair<std::string, std::string>> labels;
  AgentStats stats;
  // The size of the agent's staging arena, exported as
  // kvbounce_arena_capacity_bytes when > 0 (the occupancy is then
  // kvbounce_arena_outstanding_bytes / kvbounce_arena_capacity_bytes).
  uint64_t arena_capacity_bytes = 0;
};

// Renders every target. Errors (kInvalidArgument, naming the target and the
// label or field): a label name that is malformed, reserved or repeated; a
// stats.json that is not the JSON Agent::Stats() produces.
Result<std::string> RenderPrometheus(std::span<const PrometheusTarget> targets);

}  // namespace kvbounce

#endif  // KVBOUNCE_PROMETHEUS_H_
