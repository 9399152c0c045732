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

LogLevel InitialLevel() {
  const char* env = std::getenv("KVBOUNCE_LOG_LEVEL");
  if (env == nullptr) return LogLevel::kWarning;
  const std::string_view v(env);
  if (v == "debug") return LogLevel::kDebug;
  if (v == "info") return LogLevel::kInfo;
  if (v == "error") return LogLevel::kError;
  return LogLevel::kWarning;
}

struct LogState {
  std::mutex mu;
  // Shared so that a sink replaced while another thread is inside it stays
  // alive until that call returns.
  std::shared_ptr<LogSink> sink;
  std::atomic<int> min_level{static_cast<int>(InitialLevel())};
};

LogState& State() {
  static LogState* state = new LogState();  // never destroyed: used at exit
  return *state;
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
  std::lock_guard<std::mutex> lock(state.mu);
  std::shared_ptr<LogSink> previous = std::exchange(state.sink, std::move(next));
  return previous ? *previous : LogSink();
}

void SetMinLogLevel(LogLevel level) {
  State().min_level.store(static_cast<int>(level), std::memory_order_relaxed);
}

LogLevel MinLogLevel() {
  return static_cast<LogLevel>(State().min_level.load(std::memory_order_relaxed));
}

void Log(LogLevel level, std::string_view message) {
  LogState& state = State();
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
