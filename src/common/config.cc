#include "kvbounce/config.h"

#include <array>
#include <charconv>
#include <cstdlib>
#include <optional>
#include <string>
#include <system_error>

#include "kvbounce/logging.h"

namespace kvbounce {
namespace {

// One integer field: its key, where it lives, and its rule.
struct IntField {
  std::string_view key;
  int64_t Config::*member;
  int64_t min;
  int64_t max;
  // The rule as the error messages state it.
  std::string_view rule;
};

// The rule texts spell the limits out; keep them in step.
static_assert(Config::kMaxBounceSizeMb == 1048576);
static_assert(Config::kMaxNumWorkers == 256);
static_assert(Config::kMaxTimeoutMs == 2592000000);
static_assert(Config::kMaxOpNs == 1000000000);
static_assert(Config::kMaxMbPerS == 1000000000);
static_assert(Config::kMaxPollUs == 10000);
static_assert(Config::kMaxInlineCopyKb == 16384);

constexpr std::array<IntField, 13> kIntFields = {{
    {"bounce_size_mb", &Config::bounce_size_mb, 0, Config::kMaxBounceSizeMb,
     "must be an integer >= 0 and <= 1048576 (1 TiB)"},
    {"bounce_chunk_mb", &Config::bounce_chunk_mb, 0, Config::kMaxBounceSizeMb,
     "must be an integer >= 0 and <= 1048576 (0: the default for the pool's memory)"},
    {"num_workers", &Config::num_workers, 1, Config::kMaxNumWorkers,
     "must be an integer >= 1 and <= 256"},
    {"transfer_timeout_ms", &Config::transfer_timeout_ms, 1, Config::kMaxTimeoutMs,
     "must be an integer > 0 and <= 2592000000 (30 days)"},
    {"reserve_timeout_ms", &Config::reserve_timeout_ms, 0, Config::kMaxTimeoutMs,
     "must be an integer >= 0 and <= 2592000000 (30 days)"},
    {"transport_op_ns", &Config::transport_op_ns, 0, Config::kMaxOpNs,
     "must be an integer >= 0 and <= 1000000000 (0: the transport's own figure)"},
    {"transport_mb_per_s", &Config::transport_mb_per_s, 0, Config::kMaxMbPerS,
     "must be an integer >= 0 and <= 1000000000 (0: the transport's own figure)"},
    {"copy_run_ns", &Config::copy_run_ns, 0, Config::kMaxOpNs,
     "must be an integer >= 0 and <= 1000000000 (0: the copy engine's own figure)"},
    {"copy_mb_per_s", &Config::copy_mb_per_s, 0, Config::kMaxMbPerS,
     "must be an integer >= 0 and <= 1000000000 (0: the copy engine's own figure)"},
    {"poll_before_sleep_us", &Config::poll_before_sleep_us, 0, Config::kMaxPollUs,
     "must be an integer >= 0 and <= 10000 (10 ms; 0: sleep at once)"},
    {"inline_copy_kb", &Config::inline_copy_kb, 0, Config::kMaxInlineCopyKb,
     "must be an integer >= 0 and <= 16384 (16 MiB; 0: never copy on the control loop)"},
    {"progress_on_loop", &Config::progress_on_loop, 0, 1,
     "must be an integer, 0 (the transport's own thread) or 1 (the control loop)"},
    {"bounce_gather_mapped", &Config::bounce_gather_mapped, 0, 1,
     "must be an integer, 0 (gather into a send slot, then write) or 1 (gather into the mapped "
     "recv slot)"},
}};

constexpr std::string_view kPathKey = "path";
constexpr std::string_view kPathRule = "must be one of per-block, bounce, direct, auto";

// Declaration order of Config, which Keys() and ToString() follow.
constexpr std::array<std::string_view, 14> kKeys = {
    "bounce_size_mb",      "bounce_chunk_mb",      "num_workers",
    "transfer_timeout_ms", "reserve_timeout_ms",   "path",
    "transport_op_ns",     "transport_mb_per_s",   "copy_run_ns",
    "copy_mb_per_s",       "poll_before_sleep_us", "inline_copy_kb",
    "progress_on_loop",    "bounce_gather_mapped",
};

constexpr std::array<TransferPath, 4> kPaths = {TransferPath::kPerBlock, TransferPath::kBounce,
                                                TransferPath::kDirect, TransferPath::kAuto};

const IntField* FindIntField(std::string_view key) {
  for (const IntField& field : kIntFields) {
    if (field.key == key) return &field;
  }
  return nullptr;
}

// Parses a whole base-10 int64; on failure returns why (for the message).
std::optional<int64_t> ParseInt64(std::string_view text, std::string* why) {
  int64_t value = 0;
  const char* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, value);
  if (ec == std::errc::result_out_of_range) {
    *why = "out of the 64-bit integer range";
    return std::nullopt;
  }
  if (ec != std::errc() || ptr != end) {
    *why = "not an integer";
    return std::nullopt;
  }
  return value;
}

std::string Quote(std::string_view text) {
  std::string out = "\"";
  out += text;
  out += '"';
  return out;
}

Status CheckIntField(const IntField& field, int64_t value) {
  if (value >= field.min && value <= field.max) return Status::Ok();
  return InvalidArgumentError("config: " + std::string(field.key) + " = " + std::to_string(value) +
                              " is invalid: " + std::string(field.rule));
}

std::string_view Trim(std::string_view s) {
  constexpr std::string_view kSpace = " \t\r\n";
  const size_t begin = s.find_first_not_of(kSpace);
  if (begin == std::string_view::npos) return {};
  const size_t end = s.find_last_not_of(kSpace);
  return s.substr(begin, end - begin + 1);
}

}  // namespace

std::string_view TransferPathName(TransferPath path) {
  switch (path) {
    case TransferPath::kPerBlock:
      return "per-block";
    case TransferPath::kBounce:
      return "bounce";
    case TransferPath::kDirect:
      return "direct";
    case TransferPath::kAuto:
      return "auto";
  }
  return "?";
}

Result<TransferPath> ParseTransferPath(std::string_view name) {
  for (TransferPath path : kPaths) {
    if (TransferPathName(path) == name) return path;
  }
  return InvalidArgumentError("transfer path " + Quote(name) +
                              " is invalid: " + std::string(kPathRule));
}

Status Config::Validate() const {
  for (const IntField& field : kIntFields) {
    KVB_RETURN_IF_ERROR(CheckIntField(field, this->*field.member));
  }
  if (TransferPathName(path) == "?") {
    return InvalidArgumentError("config: path = " + std::to_string(static_cast<int>(path)) +
                                " is invalid: " + std::string(kPathRule));
  }
  if (path == TransferPath::kBounce && bounce_size_mb == 0) {
    return InvalidArgumentError(
        "config: path = bounce is invalid: needs bounce_size_mb > 0 (bounce_size_mb = 0 turns "
        "the bounce path off)");
  }
  return Status::Ok();
}

Status Config::Set(std::string_view key, std::string_view value) {
  std::string normalized(key);
  for (char& c : normalized) {
    if (c == '-') c = '_';
  }
  if (normalized == kPathKey) {
    Result<TransferPath> parsed = ParseTransferPath(value);
    if (!parsed.ok()) {
      return InvalidArgumentError("config: path = " + Quote(value) +
                                  " is invalid: " + std::string(kPathRule));
    }
    path = *parsed;
    return Status::Ok();
  }
  const IntField* field = FindIntField(normalized);
  if (field == nullptr) {
    std::string known;
    for (std::string_view k : kKeys) {
      if (!known.empty()) known += ", ";
      known += k;
    }
    return InvalidArgumentError("config: unknown key " + Quote(key) + "; known keys: " + known);
  }
  std::string why;
  const std::optional<int64_t> parsed = ParseInt64(value, &why);
  if (!parsed) {
    return InvalidArgumentError("config: " + std::string(field->key) + " = " + Quote(value) +
                                " is invalid: " + std::string(field->rule) + " (" + why + ")");
  }
  KVB_RETURN_IF_ERROR(CheckIntField(*field, *parsed));
  this->*field->member = *parsed;
  return Status::Ok();
}

Result<Config> Config::FromKeyValues(
    std::span<const std::pair<std::string_view, std::string_view>> key_values) {
  Config config;
  for (const auto& [key, value] : key_values) {
    KVB_RETURN_IF_ERROR(config.Set(key, value));
  }
  KVB_RETURN_IF_ERROR(config.Validate());
  return config;
}

Result<Config> Config::FromText(std::string_view text) {
  Config config;
  size_t line_number = 0;
  while (!text.empty()) {
    ++line_number;
    const size_t newline = text.find('\n');
    std::string_view line = Trim(text.substr(0, newline));
    text = newline == std::string_view::npos ? std::string_view() : text.substr(newline + 1);
    if (line.empty() || line.front() == '#') continue;
    const std::string context = "config text line " + std::to_string(line_number);
    const size_t equals = line.find('=');
    if (equals == std::string_view::npos) {
      return InvalidArgumentError(context + ": expected key = value, got " + Quote(line));
    }
    KVB_RETURN_IF_ERROR(config.Set(Trim(line.substr(0, equals)), Trim(line.substr(equals + 1)))
                            .WithContext(context));
  }
  KVB_RETURN_IF_ERROR(config.Validate());
  return config;
}

std::span<const std::string_view> Config::Keys() { return kKeys; }

std::string Config::ToString() const {
  std::string out;
  for (std::string_view key : kKeys) {
    if (!out.empty()) out += ' ';
    out += key;
    out += '=';
    if (key == kPathKey) {
      out += TransferPathName(path);
    } else {
      out += std::to_string(this->*FindIntField(key)->member);
    }
  }
  return out;
}

Config ApplyEnvironment(Config config, const EnvLookup& lookup) {
  static constexpr const char* kNumWorkersVar = "KVBOUNCE_NUM_WORKERS";
  const char* raw = lookup ? lookup(kNumWorkersVar) : std::getenv(kNumWorkersVar);
  if (raw == nullptr) return config;
  const std::string_view text(raw);
  const IntField& field = *FindIntField("num_workers");
  std::string why;
  const std::optional<int64_t> parsed = ParseInt64(text, &why);
  if (parsed && CheckIntField(field, *parsed).ok()) {
    config.num_workers = *parsed;
    Log(LogLevel::kInfo, std::string("config: num_workers = ") + std::to_string(*parsed) +
                             " from " + kNumWorkersVar);
    return config;
  }
  std::string message =
      std::string(kNumWorkersVar) + " = " + Quote(text) + " is ignored: " + std::string(field.rule);
  if (!why.empty()) message += " (" + why + ")";
  message += "; num_workers stays " + std::to_string(config.num_workers);
  Log(LogLevel::kWarning, message);
  return config;
}

}  // namespace kvbounce
