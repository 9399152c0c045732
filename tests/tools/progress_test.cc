// Progress: plain lines (no carriage return, one per path run), a live line
// redrawn in place and cleared, the estimate of the time left.
#include "tools/progress.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <sstream>
#include <thread>

namespace kvbounce::tools {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

TEST(ProgressTest, PlainLinesOnePerPathRun) {
  std::ostringstream out;
  {
    Progress p(out, /*live=*/false, "kvbounce bench");
    p.SetTotal(8);
    p.StartPath("per-block", 4);
    p.Add(2, 2'000'000'000);
    EXPECT_THAT(p.Line(), HasSubstr("per-block 2/4"));
    EXPECT_THAT(p.Line(), HasSubstr("ETA"));
    p.Add(2, 0);
    p.EndPath();
    p.StartPath("bounce", 4);
    p.Add(4, 1000);
    p.EndPath();
  }
  const std::string text = out.str();
  EXPECT_THAT(text, Not(HasSubstr("\r")));
  EXPECT_THAT(text, HasSubstr("kvbounce bench: per-block 4/4 | "));
  EXPECT_THAT(text, HasSubstr("kvbounce bench: per-block 4/4, bounce 4/4 | "));
  EXPECT_THAT(text, HasSubstr("GB/s | elapsed "));
  EXPECT_THAT(text, HasSubstr("ETA 0.0 s"));
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 2);
}

TEST(ProgressTest, PeriodicPlainLinesWhileAPathRuns) {
  std::ostringstream out;
  {
    Progress p(out, false, "kvbounce sweep", std::chrono::milliseconds(1));
    p.SetStage("point 1/2 tokens=64");
    p.StartPath("direct", 100);
    for (int i = 0; i < 30 && out.str().empty(); ++i) {
      p.Add(1, 10);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  EXPECT_THAT(out.str(), HasSubstr("kvbounce sweep: [point 1/2 tokens=64] direct "));
}

TEST(ProgressTest, LiveLineIsRedrawnInPlaceAndCleared) {
  std::ostringstream out;
  {
    Progress p(out, /*live=*/true, "kvbounce bench", std::chrono::seconds(10),
               std::chrono::milliseconds(1));
    p.SetTotal(10);
    p.StartPath("bounce", 10);
    for (int i = 0; i < 50 && out.str().find("bounce 1/10") == std::string::npos; ++i) {
      if (i == 0) p.Add(1, 100);
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  const std::string text = out.str();
  EXPECT_THAT(text, HasSubstr("\rkvbounce bench: bounce 1/10 | "));
  EXPECT_THAT(text, HasSubstr("\x1b[K"));
  // Cleared at the end: the last thing written erases the line.
  EXPECT_EQ(text.substr(text.size() - 4), "\r\x1b[K");
  EXPECT_THAT(text, Not(HasSubstr("\n")));
}

}  // namespace
}  // namespace kvbounce::tools
