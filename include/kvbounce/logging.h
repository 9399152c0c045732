// kvbounce's diagnostic log.
//
// The library writes warnings and errors (a rejected environment override, a
// peer that vanished) through one process-wide sink. By default it prints to
// stderr; a serving engine routes it into its own logger with SetLogSink.
//
// Thread safety: Log and SetLogSink may be called from any thread. The sink is
// called with no kvbounce lock held, and concurrently from several threads:
// it must be thread-safe itself.
#ifndef KVBOUNCE_LOGGING_H_
#define KVBOUNCE_LOGGING_H_

#include <functional>
#include <string_view>

namespace kvbounce {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

std::string_view LogLevelName(LogLevel level);

using LogSink = std::function<void(LogLevel level, std::string_view message)>;

// Replaces the sink; an empty function restores the stderr sink. Returns the
// previous sink (empty when it was the default).
LogSink SetLogSink(LogSink sink);

// Messages below this level are dropped (default kWarning, or the level
// named by KVBOUNCE_LOG_LEVEL: debug, info, warning, error).
void SetMinLogLevel(LogLevel level);
LogLevel MinLogLevel();

void Log(LogLevel level, std::string_view message);

}  // namespace kvbounce

#endif  // KVBOUNCE_LOGGING_H_
