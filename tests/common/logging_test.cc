// KVBOUNCE_LOG_LEVEL is read once, when the log is first used. CTest runs
// every case of this file in a process of its own (gtest_discover_tests), so
// each case sets the variable before anything touches the log.
#include "kvbounce/logging.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

namespace kvbounce {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

struct Captured {
  std::mutex mu;
  std::vector<std::string> lines;
};

LogSink Capture(Captured* c) {
  return [c](LogLevel level, std::string_view message) {
    std::lock_guard<std::mutex> lock(c->mu);
    c->lines.push_back(std::string(LogLevelName(level)) + ": " + std::string(message));
  };
}

TEST(LoggingEnvTest, AnUnknownLevelWarnsOnceNamingTheVariableTheValueAndTheChoices) {
  setenv("KVBOUNCE_LOG_LEVEL", "verbose", 1);
  Captured c;
  SetLogSink(Capture(&c));  // the first use of the log: the sink gets the warning
  EXPECT_EQ(MinLogLevel(), LogLevel::kWarning);
  Log(LogLevel::kWarning, "something else");
  SetLogSink(nullptr);
  EXPECT_THAT(c.lines,
              ElementsAre("warning: KVBOUNCE_LOG_LEVEL = 'verbose' is not a log level (accepted: "
                          "debug, info, warning, error); using warning",
                          "warning: something else"));
}

TEST(LoggingEnvTest, TheWarningComesBeforeALevelSetInCode) {
  setenv("KVBOUNCE_LOG_LEVEL", "LOUD", 1);
  SetMinLogLevel(LogLevel::kError);  // reports first, then raises the level
  Captured c;
  SetLogSink(Capture(&c));
  Log(LogLevel::kWarning, "dropped");
  SetLogSink(nullptr);
  EXPECT_TRUE(c.lines.empty());
  EXPECT_EQ(MinLogLevel(), LogLevel::kError);
}

TEST(LoggingEnvTest, AKnownLevelIsTakenSilently) {
  setenv("KVBOUNCE_LOG_LEVEL", "debug", 1);
  Captured c;
  SetLogSink(Capture(&c));
  EXPECT_EQ(MinLogLevel(), LogLevel::kDebug);
  SetLogSink(nullptr);
  EXPECT_TRUE(c.lines.empty());
}

TEST(LoggingEnvTest, AnEmptyValueMeansUnset) {
  setenv("KVBOUNCE_LOG_LEVEL", "", 1);
  Captured c;
  SetLogSink(Capture(&c));
  EXPECT_EQ(MinLogLevel(), LogLevel::kWarning);
  SetLogSink(nullptr);
  EXPECT_TRUE(c.lines.empty());
}

}  // namespace
}  // namespace kvbounce
