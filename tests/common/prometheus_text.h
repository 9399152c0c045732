// A strict reader of the Prometheus text exposition format (0.0.4), for
// tests: it checks what a scraper relies on and returns every sample.
//
//   * every line is "# HELP name text", "# TYPE name counter|gauge|histogram"
//     or "name{label="value",...} value" (labels optional), ending in '\n';
//   * a family's HELP and TYPE come once, before its samples, and its
//     samples are contiguous;
//   * names and label names are valid, label values are escaped (\\, \",
//     \n only), values are numbers, +Inf, -Inf or NaN;
//   * no sample (name and labels) appears twice;
//   * counters are not negative; a counter's name ends in _total;
//   * a histogram's buckets are cumulative (non-decreasing in le order),
//     end with le="+Inf", whose count equals _count.
// Header-only.
#ifndef KVBOUNCE_TESTS_COMMON_PROMETHEUS_TEXT_H_
#define KVBOUNCE_TESTS_COMMON_PROMETHEUS_TEXT_H_

#include <cmath>
#include <cstdlib>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace kvbounce::testing_util {

struct PromSample {
  std::string name;                           // with _bucket/_sum/_count
  std::map<std::string, std::string> labels;  // unescaped
  double value = 0;
};

struct PromText {
  std::map<std::string, std::string> types;  // family -> type
  std::vector<PromSample> samples;

  // The value of the sample `name` whose labels include every one of
  // `labels`, summed over all that match; nullopt when none does.
  std::optional<double> Sum(const std::string& name,
                            const std::map<std::string, std::string>& labels = {}) const {
    std::optional<double> out;
    for (const PromSample& s : samples) {
      if (s.name != name) continue;
      bool match = true;
      for (const auto& [k, v] : labels) {
        auto it = s.labels.find(k);
        match = match && it != s.labels.end() && it->second == v;
      }
      if (match) out = out.value_or(0) + s.value;
    }
    return out;
  }

  // "name{k=v,...}" of every sample (labels sorted) -> value.
  std::map<std::string, double> ByKey() const {
    std::map<std::string, double> out;
    for (const PromSample& s : samples) out[Key(s)] = s.value;
    return out;
  }

  static std::string Key(const PromSample& s) {
    std::string k = s.name + "{";
    for (const auto& [n, v] : s.labels) k += n + "=" + v + ",";
    return k + "}";
  }
};

namespace prom_internal {

inline bool NameChar(char c, bool first, bool colon) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (colon && c == ':') ||
         (!first && c >= '0' && c <= '9');
}

inline bool ValidName(const std::string& s, bool colon) {
  if (s.empty()) return false;
  for (size_t i = 0; i < s.size(); ++i) {
    if (!NameChar(s[i], i == 0, colon)) return false;
  }
  return true;
}

inline std::optional<double> ParseValue(const std::string& s) {
  if (s == "+Inf") return HUGE_VAL;
  if (s == "-Inf") return -HUGE_VAL;
  if (s == "NaN") return NAN;
  if (s.empty()) return std::nullopt;
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (end != s.c_str() + s.size()) return std::nullopt;
  return v;
}

inline std::string Family(const std::string& name,
                          const std::map<std::string, std::string>& types) {
  for (const char* suffix : {"_bucket", "_sum", "_count"}) {
    const std::string sfx(suffix);
    if (name.size() > sfx.size() && name.compare(name.size() - sfx.size(), sfx.size(), sfx) == 0) {
      const std::string base = name.substr(0, name.size() - sfx.size());
      auto it = types.find(base);
      if (it != types.end() && it->second == "histogram") return base;
    }
  }
  return name;
}

}  // namespace prom_internal

// Parses `text`; on the first violation returns nullopt and sets `error`.
inline std::optional<PromText> ParsePrometheusText(const std::string& text, std::string* error) {
  using namespace prom_internal;
  PromText out;
  std::set<std::string> helped, finished, seen;
  std::string current;  // family whose samples are being read
  auto fail = [&](size_t line_no, const std::string& what) {
    *error = "line " + std::to_string(line_no) + ": " + what;
    return std::nullopt;
  };
  if (!text.empty() && text.back() != '\n') {
    *error = "does not end with a newline";
    return std::nullopt;
  }
  size_t pos = 0, line_no = 0;
  while (pos < text.size()) {
    const size_t nl = text.find('\n', pos);
    const std::string line = text.substr(pos, nl - pos);
    pos = nl + 1;
    ++line_no;
    if (line.empty()) return fail(line_no, "empty line");
    if (line[0] == '#') {
      const bool help = line.rfind("# HELP ", 0) == 0;
      const bool type = line.rfind("# TYPE ", 0) == 0;
      if (!help && !type) return fail(line_no, "a comment that is neither HELP nor TYPE");
      const std::string rest = line.substr(7);
      const size_t sp = rest.find(' ');
      if (sp == std::string::npos) return fail(line_no, "no text after the name");
      const std::string name = rest.substr(0, sp);
      if (!ValidName(name, true)) return fail(line_no, "bad metric name '" + name + "'");
      if (finished.count(name) != 0) return fail(line_no, name + " is not contiguous");
      if (name != current && !current.empty()) finished.insert(current);
      current = name;
      if (help) {
        if (!helped.insert(name).second) return fail(line_no, "second HELP for " + name);
        const std::string h = rest.substr(sp + 1);
        for (size_t i = 0; i < h.size(); ++i) {
          if (h[i] == '\\' && (i + 1 >= h.size() || (h[i + 1] != '\\' && h[i + 1] != 'n'))) {
            return fail(line_no, "bad escape in HELP");
          }
          if (h[i] == '\\') ++i;
        }
      } else {
        if (out.types.count(name) != 0) return fail(line_no, "second TYPE for " + name);
        const std::string t = rest.substr(sp + 1);
        if (t != "counter" && t != "gauge" && t != "histogram") {
          return fail(line_no, "unknown type '" + t + "'");
        }
        out.types[name] = t;
      }
      continue;
    }
    PromSample s;
    size_t i = 0;
    while (i < line.size() && line[i] != '{' && line[i] != ' ') ++i;
    s.name = line.substr(0, i);
    if (!ValidName(s.name, true)) return fail(line_no, "bad sample name '" + s.name + "'");
    if (i < line.size() && line[i] == '{') {
      ++i;
      while (true) {
        if (i < line.size() && line[i] == '}') {
          ++i;
          break;
        }
        size_t eq = line.find('=', i);
        if (eq == std::string::npos) return fail(line_no, "label without '='");
        const std::string lname = line.substr(i, eq - i);
        if (!ValidName(lname, false)) return fail(line_no, "bad label name '" + lname + "'");
        if (eq + 1 >= line.size() || line[eq + 1] != '"') return fail(line_no, "unquoted value");
        i = eq + 2;
        std::string value;
        bool closed = false;
        while (i < line.size()) {
          const char c = line[i++];
          if (c == '"') {
            closed = true;
            break;
          }
          if (c == '\\') {
            if (i >= line.size()) return fail(line_no, "dangling escape");
            const char n = line[i++];
            if (n == '\\') {
              value += '\\';
            } else if (n == '"') {
              value += '"';
            } else if (n == 'n') {
              value += '\n';
            } else {
              return fail(line_no, std::string("bad escape \\") + n);
            }
          } else {
            value += c;
          }
        }
        if (!closed) return fail(line_no, "unterminated label value");
        if (!s.labels.emplace(lname, value).second) return fail(line_no, "repeated label");
        if (i < line.size() && line[i] == ',') ++i;
      }
    }
    if (i >= line.size() || line[i] != ' ') return fail(line_no, "no space before the value");
    const std::optional<double> v = ParseValue(line.substr(i + 1));
    if (!v) return fail(line_no, "bad value '" + line.substr(i + 1) + "'");
    s.value = *v;
    const std::string family = Family(s.name, out.types);
    auto type = out.types.find(family);
    if (type == out.types.end() || helped.count(family) == 0) {
      return fail(line_no, "sample of " + family + " before its HELP and TYPE");
    }
    if (family != current) return fail(line_no, "samples of " + family + " are not contiguous");
    if (type->second == "counter") {
      if (family.size() < 6 || family.compare(family.size() - 6, 6, "_total") != 0) {
        return fail(line_no, "counter " + family + " does not end in _total");
      }
      if (!(s.value >= 0)) return fail(line_no, "negative counter");
    }
    if (!seen.insert(PromText::Key(s)).second) return fail(line_no, "duplicate sample");
    out.samples.push_back(std::move(s));
  }

  // Histograms: per series (labels without le), cumulative buckets ending in
  // +Inf equal to _count.
  for (const auto& [family, type] : out.types) {
    if (type != "histogram") continue;
    std::map<std::string, std::vector<std::pair<double, double>>> buckets;  // series -> (le, n)
    std::map<std::string, double> counts;
    for (const PromSample& s : out.samples) {
      auto labels = s.labels;
      std::optional<double> le;
      if (auto it = labels.find("le"); it != labels.end()) {
        le = ParseValue(it->second);
        labels.erase(it);
      }
      const std::string series = PromText::Key({"", labels, 0});
      if (s.name == family + "_bucket") {
        if (!le) {
          *error = family + ": a bucket without a valid le";
          return std::nullopt;
        }
        buckets[series].push_back({*le, s.value});
      } else if (s.name == family + "_count") {
        counts[series] = s.value;
      }
    }
    for (const auto& [series, list] : buckets) {
      for (size_t k = 1; k < list.size(); ++k) {
        if (!(list[k].first > list[k - 1].first) || list[k].second < list[k - 1].second) {
          *error = family + series + ": buckets not cumulative in ascending le";
          return std::nullopt;
        }
      }
      if (list.empty() || !std::isinf(list.back().first) || counts.count(series) == 0 ||
          counts[series] != list.back().second) {
        *error = family + series + ": no +Inf bucket equal to _count";
        return std::nullopt;
      }
    }
  }
  return out;
}

}  // namespace kvbounce::testing_util

#endif  // KVBOUNCE_TESTS_COMMON_PROMETHEUS_TEXT_H_
