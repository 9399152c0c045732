#include "kvbounce/logging.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

namespace kvbounce {
namespace {

constexpr std::string_view kLevelVariable = "KVBOUNCE_LOG_LEVEL";

// The level KVBOUNCE_LOG_LEVEL names (unset or empty: warning). An unknown
// value keeps the default and leaves a warning in `*complaint`.
LogLevel InitialLevel(std::string* complaint) {
  const char* env = std::getenv(kLevelVariable.data());
  if (env == nullptr || *env == '\0') return LogLevel::kWarning;
  const std::string_view v(env);
  for (LogLevel level : {LogLevel::kDebug, LogLevel::kInfo, LogLevel::kWarning, LogLevel::kError}) {
    if (v == LogLevelName(level)) return level;
  }
  *complaint = std::string(kLevelVariable) + " = '" + std::string(v) +
               "' is not a log level (accepted: debug, info, warning, error); using warning";
  return LogLevel::kWarning;
}

struct LogState {
  LogState() {
    min_level.store(static_cast<int>(InitialLevel(&complaint)));
    complaint_pending.store(!complaint.empty());
  }

  std::mutex mu;
  // Shared so that a sink replaced while another thread is inside it stays
  // alive until that call returns.
  std::shared_ptr<LogSink> sink;
  std::atomic<int> min_level{static_cast<int>(LogLevel::kWarning)};
  // A bad KVBOUNCE_LOG_LEVEL, reported once through the log itself on the
  // first use of the log after the state exists (so that a sink installed by
  // that first call receives it).
  std::string complaint;  // written once, by the constructor
  std::atomic<bool> complaint_pending{false};
};

LogState& State() {
  static LogState* state = new LogState();  // never destroyed: used at exit
  return *state;
}

// Reports a bad KVBOUNCE_LOG_LEVEL once, whoever gets here first.
void ReportBadLevel(LogState& state) {
  if (!state.complaint_pending.load(std::memory_order_acquire)) return;
  if (!state.complaint_pending.exchange(false)) return;
  Log(LogLevel::kWarning, state.complaint);
}

}  // namespace

std::string_view LogLevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return "debug";
    case LogLevel::kInfo:
      return "info";
    case LogLevel::kWarning:
      return "warning";
    case LogLevel::kError:
      return "error";
  }
  return "?";
}

LogSink SetLogSink(LogSink sink) {
  LogState& state = State();
  std::shared_ptr<LogSink> next = sink ? std::make_shared<LogSink>(std::move(sink)) : nullptr;
  std::shared_ptr<LogSink> previous;
  {
    std::lock_guard<std::mutex> lock(state.mu);
    previous = std::exchange(state.sink, std::move(next));
  }
  ReportBadLevel(state);
  return previous ? *previous : LogSink();
}

void SetMinLogLevel(LogLevel level) {
  LogState& state = State();
  ReportBadLevel(state);  // at the level the environment asked for
  state.min_level.store(static_cast<int>(level), std::memory_order_relaxed);
}

LogLevel MinLogLevel() {
  LogState& state = State();
  ReportBadLevel(state);
  return static_cast<LogLevel>(state.min_level.load(std::memory_order_relaxed));
}

void Log(LogLevel level, std::string_view message) {
  LogState& state = State();
  ReportBadLevel(state);
  if (static_cast<int>(level) < state.min_level.load(std::memory_order_relaxed)) return;
  std::shared_ptr<LogSink> sink;
  {
    std::lock_guard<std::mutex> lock(state.mu);
    sink = state.sink;
  }
  if (sink) {
    (*sink)(level, message);
    return;
  }
  std::string line = "kvbounce ";
  line += LogLevelName(level);
  line += ": ";
  line += message;
  line += '\n';
  std::fwrite(line.data(), 1, line.size(), stderr);
}

}  // namespace kvbounce
