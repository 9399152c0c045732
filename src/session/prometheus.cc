#include "kvbounce/prometheus.h"

#include <array>
#include <charconv>
#include <cmath>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

namespace kvbounce {
namespace {

enum class Type { kCounter, kGauge, kHistogram };

struct Family {
  std::string name;
  Type type = Type::kCounter;
  std::string help;
  std::string samples;  // complete lines
};

constexpr std::array<const char*, 2> kSides = {"sender", "receiver"};
constexpr std::array<const char*, 4> kPathNames = {"per-block", "bounce", "direct", "auto"};
constexpr std::array<const char*, 4> kOutcomeNames = {"completed", "failed", "cancelled",
                                                      "timed_out"};
constexpr std::array<const char*, 5> kOwnLabels = {"side", "path", "outcome", "reason", "le"};

// Counters of Metrics (src/session/metrics.h CounterName) and their names
// here; credit_stall_ns is exported in seconds.
struct CounterSpec {
  const char* key;
  const char* name;
  const char* help;
  double scale;
};
constexpr std::array<CounterSpec, 11> kCounterSpecs = {{
    {"rejected_results", "kvbounce_rejected_results_total",
     "KV_RESULT frames rejected: unknown writer, wrong fingerprint or byte count.", 1},
    {"duplicate_results", "kvbounce_duplicate_results_total",
     "KV_RESULT frames a writer repeated after it had reported.", 1},
    {"quarantined_slots", "kvbounce_quarantined_slots_total",
     "Staging slots put into quarantine because writers might still write into them.", 1},
    {"cancels_sent", "kvbounce_cancels_sent_total", "CANCEL frames sent to peers.", 1},
    {"cancels_received", "kvbounce_cancels_received_total", "CANCEL frames received from peers.",
     1},
    {"peer_failures", "kvbounce_peer_failures_total",
     "Peers declared failed (connection lost, no answer).", 1},
    {"chunks_granted", "kvbounce_chunks_granted_total",
     "Streaming bounce: chunk slots granted to writers.", 1},
    {"chunks_written", "kvbounce_chunks_written_total",
     "Streaming bounce: chunks written and announced.", 1},
    {"chunks_scattered", "kvbounce_chunks_scattered_total",
     "Streaming bounce: chunks scattered into the pool.", 1},
    {"credit_stall_ns", "kvbounce_credit_stall_seconds_total",
     "Streaming bounce: time writers sat idle waiting for a credit, summed.", 1e-9},
    {"invalid_transitions", "kvbounce_invalid_transitions_total",
     "State machine moves that are not allowed (a bug; alert on any).", 1},
}};

struct TransportSpec {
  const char* key;
  const char* name;
  const char* help;
};
constexpr std::array<TransportSpec, 6> kTransportSpecs = {{
    {"write_ops", "kvbounce_transport_write_operations_total",
     "Write operations issued to the transport."},
    {"write_bytes", "kvbounce_transport_written_bytes_total", "Bytes of transport writes issued."},
    {"failed_write_ops", "kvbounce_transport_failed_write_operations_total",
     "Transport write operations that failed."},
    {"flushes", "kvbounce_transport_flushes_total", "Transport flushes issued."},
    {"messages_sent", "kvbounce_transport_messages_sent_total", "Control frames sent."},
    {"messages_received", "kvbounce_transport_messages_received_total", "Control frames received."},
}};

bool ValidLabelName(std::string_view name) {
  if (name.empty() || name.starts_with("__")) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    if (!alpha && !(i > 0 && c >= '0' && c <= '9')) return false;
  }
  return true;
}

void AppendEscaped(std::string& out, std::string_view text, bool quotes) {
  for (char c : text) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '"' && quotes) {
      out += "\\\"";
    } else {
      out += c;
    }
  }
}

std::string FormatDouble(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v);
  return ec == std::errc() ? std::string(buf, end) : std::to_string(v);
}

using Labels = std::vector<std::pair<std::string, std::string>>;

class Exposition {
 public:
  Family& Get(const std::string& name, Type type, const std::string& help) {
    auto it = index_.find(name);
    if (it != index_.end()) return families_[it->second];
    index_.emplace(name, families_.size());
    families_.push_back({name, type, help, ""});
    return families_.back();
  }

  void Sample(const std::string& family, Type type, const std::string& help,
              const std::string& suffix, const Labels& labels, const std::string& value) {
    Family& f = Get(family, type, help);
    f.samples += family + suffix;
    if (!labels.empty()) {
      f.samples += '{';
      for (size_t i = 0; i < labels.size(); ++i) {
        if (i > 0) f.samples += ',';
        f.samples += labels[i].first + "=\"";
        AppendEscaped(f.samples, labels[i].second, true);
        f.samples += '"';
      }
      f.samples += '}';
    }
    f.samples += ' ' + value + '\n';
  }

  std::string Text() const {
    std::string out;
    for (const Family& f : families_) {
      out += "# HELP " + f.name + ' ';
      AppendEscaped(out, f.help, false);
      out += "\n# TYPE " + f.name + ' ';
      out += f.type == Type::kCounter ? "counter" : f.type == Type::kGauge ? "gauge" : "histogram";
      out += '\n';
      out += f.samples;
    }
    return out;
  }

 private:
  std::vector<Family> families_;
  std::map<std::string, size_t> index_;
};

Labels With(const Labels& base, std::initializer_list<std::pair<const char*, std::string>> more) {
  Labels out = base;
  for (const auto& [k, v] : more) out.emplace_back(k, v);
  return out;
}

// The unsigned integer or number at j[key]; an error naming `where`.
Result<double> Number(const nlohmann::json& j, const std::string& key, const std::string& where) {
  if (!j.is_object()) return InvalidArgumentError(where + ": not an object");
  auto it = j.find(key);
  if (it == j.end() || !it->is_number()) {
    return InvalidArgumentError(where + "." + key + ": missing or not a number");
  }
  return it->get<double>();
}

Result<const nlohmann::json*> Object(const nlohmann::json& j, const std::string& key,
                                     const std::string& where) {
  if (!j.is_object()) return InvalidArgumentError(where + ": not an object");
  auto it = j.find(key);
  if (it == j.end() || !it->is_object()) {
    return InvalidArgumentError(where + "." + key + ": missing or not an object");
  }
  return &*it;
}

std::string Count(double v) { return FormatDouble(v); }

// One export histogram ("latency_seconds_buckets" / "bytes_buckets") of one
// side, every path whose count is not zero or that is not "auto".
Status AppendHistogram(Exposition& e, const std::string& family, const std::string& help,
                       const nlohmann::json& side, const char* key, const Labels& labels,
                       const std::string& where) {
  KVB_ASSIGN_OR_RETURN(const nlohmann::json* h, Object(side, key, where));
  const std::string here = where + "." + key;
  auto bounds = h->find("bounds");
  if (bounds == h->end() || !bounds->is_array()) {
    return InvalidArgumentError(here + ".bounds: missing or not an array");
  }
  KVB_ASSIGN_OR_RETURN(const nlohmann::json* by_path, Object(*h, "by_path", here));
  for (const char* path : kPathNames) {
    KVB_ASSIGN_OR_RETURN(const nlohmann::json* p, Object(*by_path, path, here + ".by_path"));
    auto counts = p->find("counts");
    if (counts == p->end() || !counts->is_array() || counts->size() != bounds->size() + 1) {
      return InvalidArgumentError(here + ".by_path." + path +
                                  ".counts: missing, or not one count per bound and one more");
    }
    KVB_ASSIGN_OR_RETURN(double sum, Number(*p, "sum", here + ".by_path." + path));
    double cumulative = 0;
    std::vector<std::string> lines;
    const Labels base = With(labels, {{"path", path}});
    for (size_t i = 0; i < counts->size(); ++i) {
      if (!(*counts)[i].is_number() || (i < bounds->size() && !(*bounds)[i].is_number())) {
        return InvalidArgumentError(here + ".by_path." + path +
                                    ": a count or bound is not a number");
      }
      cumulative += (*counts)[i].get<double>();
    }
    if (std::string_view(path) == "auto" && cumulative == 0) continue;
    cumulative = 0;
    for (size_t i = 0; i < counts->size(); ++i) {
      cumulative += (*counts)[i].get<double>();
      const std::string le =
          i < bounds->size() ? FormatDouble((*bounds)[i].get<double>()) : std::string("+Inf");
      e.Sample(family, Type::kHistogram, help, "_bucket", With(base, {{"le", le}}),
               Count(cumulative));
    }
    e.Sample(family, Type::kHistogram, help, "_sum", base, FormatDouble(sum));
    e.Sample(family, Type::kHistogram, help, "_count", base, Count(cumulative));
  }
  return Status::Ok();
}

Status AppendTarget(Exposition& e, const PrometheusTarget& t, size_t index) {
  const std::string who = "target " + std::to_string(index);
  std::set<std::string> names;
  for (const auto& [name, value] : t.labels) {
    if (!ValidLabelName(name)) {
      return InvalidArgumentError(who + ": label name '" + name +
                                  "' is invalid: must match [a-zA-Z_][a-zA-Z0-9_]* and not start "
                                  "with __");
    }
    for (const char* own : kOwnLabels) {
      if (name == own) {
        return InvalidArgumentError(who + ": label name '" + name +
                                    "' is reserved (side, path, outcome, reason and le are the "
                                    "renderer's own)");
      }
    }
    if (!names.insert(name).second) {
      return InvalidArgumentError(who + ": label name '" + name + "' is repeated");
    }
  }
  if (t.stats.json.empty()) {
    return InvalidArgumentError(who + ": stats.json is empty (not from Agent::Stats())");
  }
  const nlohmann::json j = nlohmann::json::parse(t.stats.json, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return InvalidArgumentError(who + ": stats.json is not a JSON object");
  }
  const std::string where = who + ": stats.json";
  const Labels& base = t.labels;

  for (const char* side_name : kSides) {
    KVB_ASSIGN_OR_RETURN(const nlohmann::json* side, Object(j, side_name, where));
    const std::string here = where + "." + side_name;
    const Labels side_labels = With(base, {{"side", side_name}});
    KVB_ASSIGN_OR_RETURN(const nlohmann::json* by_path, Object(*side, "requests_by_path", here));
    for (const char* path : kPathNames) {
      KVB_ASSIGN_OR_RETURN(const nlohmann::json* outcomes,
                           Object(*by_path, path, here + ".requests_by_path"));
      std::vector<double> n;
      double total = 0;
      for (const char* outcome : kOutcomeNames) {
        KVB_ASSIGN_OR_RETURN(double v,
                             Number(*outcomes, outcome, here + ".requests_by_path." + path));
        n.push_back(v);
        total += v;
      }
      if (std::string_view(path) == "auto" && total == 0) continue;
      for (size_t o = 0; o < kOutcomeNames.size(); ++o) {
        e.Sample("kvbounce_requests_total", Type::kCounter,
                 "Requests settled, by side, path taken and outcome.", "",
                 With(side_labels, {{"path", path}, {"outcome", kOutcomeNames[o]}}), Count(n[o]));
      }
    }
    KVB_ASSIGN_OR_RETURN(double bytes, Number(*side, "bytes_completed", here));
    e.Sample("kvbounce_payload_bytes_total", Type::kCounter,
             "Payload bytes of completed requests (a sender counts its own share).", "",
             side_labels, Count(bytes));
    KVB_ASSIGN_OR_RETURN(double writes, Number(*side, "transport_writes", here));
    e.Sample("kvbounce_request_writes_total", Type::kCounter,
             "Transport write operations of settled requests.", "", side_labels, Count(writes));
    KVB_ASSIGN_OR_RETURN(double fragments, Number(*side, "fragments", here));
    e.Sample("kvbounce_fragments_total", Type::kCounter,
             "Plan runs executed by settled requests (gather/scatter runs or direct fragments).",
             "", side_labels, Count(fragments));
    const char* fallback_help = "Requests that left the path asked for, by the reason.";
    e.Get("kvbounce_fallbacks_total", Type::kCounter, fallback_help);
    KVB_ASSIGN_OR_RETURN(const nlohmann::json* fallbacks, Object(*side, "fallbacks", here));
    for (const auto& [reason, n] : fallbacks->items()) {
      if (!n.is_number()) return InvalidArgumentError(here + ".fallbacks: not a number");
      e.Sample("kvbounce_fallbacks_total", Type::kCounter, fallback_help, "",
               With(side_labels, {{"reason", reason}}), Count(n.get<double>()));
    }
    KVB_ASSIGN_OR_RETURN(double in_flight, Number(*side, "requests_in_flight", here));
    e.Sample("kvbounce_requests_in_flight", Type::kGauge,
             "Requests started and not settled yet (sender: publications; receiver: pulls).", "",
             side_labels, FormatDouble(in_flight));
    KVB_RETURN_IF_ERROR(AppendHistogram(
        e, "kvbounce_request_duration_seconds",
        "Time from the request to its settle, completed requests, by side and path taken.", *side,
        "latency_seconds_buckets", side_labels, here));
    KVB_RETURN_IF_ERROR(AppendHistogram(e, "kvbounce_request_size_bytes",
                                        "Payload bytes per completed request, by side and path.",
                                        *side, "bytes_buckets", side_labels, here));
  }

  KVB_ASSIGN_OR_RETURN(const nlohmann::json* counters, Object(j, "counters", where));
  for (const CounterSpec& c : kCounterSpecs) {
    KVB_ASSIGN_OR_RETURN(double v, Number(*counters, c.key, where + ".counters"));
    e.Sample(c.name, Type::kCounter, c.help, "", base, FormatDouble(v * c.scale));
  }
  KVB_ASSIGN_OR_RETURN(const nlohmann::json* transport, Object(j, "transport", where));
  for (const TransportSpec& c : kTransportSpecs) {
    KVB_ASSIGN_OR_RETURN(double v, Number(*transport, c.key, where + ".transport"));
    e.Sample(c.name, Type::kCounter, c.help, "", base, Count(v));
  }

  const AgentStats& s = t.stats;
  e.Sample("kvbounce_arena_outstanding_bytes", Type::kGauge,
           "Staging arena bytes reserved now (send and recv), quarantined ones included.", "", base,
           std::to_string(s.arena_outstanding_bytes));
  e.Sample("kvbounce_arena_quarantined_bytes", Type::kGauge,
           "Staging arena bytes in quarantine now (writers may still write there).", "", base,
           std::to_string(s.arena_quarantined_bytes));
  e.Sample("kvbounce_arena_peak_bytes", Type::kGauge,
           "The most staging arena bytes held at once since the agent started.", "", base,
           std::to_string(s.arena_peak_bytes));
  e.Sample("kvbounce_grant_queue_writers", Type::kGauge,
           "Writers of admitted streams waiting for a chunk slot of the recv arena, as of the "
           "last grant pass.",
           "", base, std::to_string(s.grant_queue));
  e.Sample("kvbounce_grant_queue_peak_writers", Type::kGauge,
           "The most writers that have waited for a chunk slot at once since the agent started.",
           "", base, std::to_string(s.grant_queue_peak));
  if (t.arena_capacity_bytes > 0) {
    e.Sample("kvbounce_arena_capacity_bytes", Type::kGauge, "Size of the staging arena.", "", base,
             std::to_string(t.arena_capacity_bytes));
  }
  return Status::Ok();
}

}  // namespace

Result<std::string> RenderPrometheus(std::span<const PrometheusTarget> targets) {
  try {
    Exposition e;
    for (size_t i = 0; i < targets.size(); ++i) {
      KVB_RETURN_IF_ERROR(AppendTarget(e, targets[i], i));
    }
    return e.Text();
  } catch (const std::bad_alloc&) {
    return ResourceExhaustedError("RenderPrometheus: out of memory");
  }
}

}  // namespace kvbounce
