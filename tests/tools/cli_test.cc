// The `kvbounce` command line as the binary runs it (RunCli, in-process):
// every bad flag exits 2 with one "kvbounce <command>: error: ..." line, huge
// values are refused before anything is allocated, --help exits 0, and the
// --json report is written where asked.
#include "tools/cli.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

namespace kvbounce::tools {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

struct CliResult {
  int status = 0;
  std::string out;
  std::string err;
};

CliResult Cli(std::vector<std::string> args) {
  args.insert(args.begin(), "kvbounce");
  std::vector<const char*> argv;
  for (const std::string& a : args) argv.push_back(a.c_str());
  std::ostringstream out, err;
  CliResult r;
  r.status = RunCli(static_cast<int>(argv.size()), argv.data(), out, err);
  r.out = out.str();
  r.err = err.str();
  return r;
}

// A bench small enough to run in a unit test.
std::vector<std::string> SmallBench() {
  return {"bench", "--layers", "2",    "--kv-heads", "4",    "--head-dim", "16", "--tokens",
          "64",    "--ctx",    "tp=4", "--gen",      "tp=2", "--requests", "2"};
}

long PeakRssKb() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss;
}

TEST(CliTest, HelpExitsZero) {
  CliResult r = Cli({"--help"});
  EXPECT_EQ(r.status, 0);
  EXPECT_THAT(r.out, HasSubstr("bench"));
  r = Cli({"bench", "--help"});
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("--chaos-seconds"));
  EXPECT_THAT(r.out, HasSubstr("--bounce-size-mb"));
  EXPECT_EQ(r.err, "");
  r = Cli({"plan", "--help"});
  EXPECT_EQ(r.status, 0);
  EXPECT_THAT(r.out, HasSubstr("--tokens"));
  r = Cli({"worker", "--help"});
  EXPECT_EQ(r.status, 0);
  EXPECT_THAT(r.out, HasSubstr("--peers-file"));
  EXPECT_THAT(r.out, HasSubstr("--requests"));
}

struct BadFlag {
  std::vector<std::string> args;
  std::string prefix;   // the first words of the error line
  std::string message;  // a part of it
};

// Flags the parser itself rejects, and flags the commands reject: one line,
// the command named, status 2.
TEST(CliTest, EveryBadFlagExitsTwoWithTheCommandsPrefix) {
  const std::vector<BadFlag> cases = {
      {{}, "kvbounce: error: ", "subcommand"},
      {{"teleport"}, "kvbounce: error: ", "teleport"},
      {{"plan", "--tokens", "abc"}, "kvbounce plan: error: ", "--tokens"},
      {{"plan", "--tokens"}, "kvbounce plan: error: ", "--tokens"},
      {{"plan", "--bogus"}, "kvbounce plan: error: ", "--bogus"},
      {{"plan", "--head-dim", "3000000000", "--layers", "2", "--kv-heads", "8"},
       "kvbounce plan: error: ",
       "--head-dim"},
      {{"plan", "--ctx", "tp=3"}, "kvbounce plan: error: ", "tp = 3"},
      {{"plan", "--seed", "-1"}, "kvbounce plan: error: ", "--seed"},
      {{"bench", "--requests", "many"}, "kvbounce bench: error: ", "--requests"},
      {{"bench", "--bogus"}, "kvbounce bench: error: ", "--bogus"},
      {{"bench", "--inject-fail-rate", "lots"}, "kvbounce bench: error: ", "--inject-fail-rate"},
      {{"bench", "--inject-fail-rate", "2"}, "kvbounce bench: error: ", "--inject-fail-rate"},
      {{"bench", "--concurrency", "0"}, "kvbounce bench: error: ", "--concurrency = 0"},
      {{"bench", "--concurrency", "5000"}, "kvbounce bench: error: ", "--concurrency = 5000"},
      {{"bench", "--bounce-size-mb", "-1"}, "kvbounce bench: error: ", "--bounce-size-mb = -1"},
      {{"bench", "--bounce-size-mb", "-2"}, "kvbounce bench: error: ", "--bounce-size-mb = -2"},
      {{"bench", "--bounce-size-mb", "0", "--path", "bounce"},
       "kvbounce bench: error: ",
       "--path bounce needs --bounce-size-mb > 0"},
      {{"bench", "--chaos-seconds", "3"}, "kvbounce bench: error: ", "requires --chaos"},
      {{"bench", "--chaos", "--chaos-seconds", "0"}, "kvbounce bench: error: ", "--chaos-seconds"},
      {{"bench", "--chaos", "--chaos-requests", "-1"},
       "kvbounce bench: error: ",
       "--chaos-requests"},
      {{"bench", "--chaos", "--chaos-restart-ms", "-5"},
       "kvbounce bench: error: ",
       "--chaos-restart-ms"},
      {{"bench", "--transport", "tcp"}, "kvbounce bench: error: ", "--transport tcp: unknown"},
      {{"bench", "--ucx-tls", "tcp"}, "kvbounce bench: error: ", "--ucx-tls applies to"},
      {{"bench", "--num-workers", "2"}, "kvbounce bench: error: ", "--num-workers applies to"},
      {{"bench", "--step-timeout", "3"}, "kvbounce bench: error: ", "--step-timeout applies to"},
      {{"bench", "--poll-before-sleep-us", "-1"},
       "kvbounce bench: error: ",
       "--poll-before-sleep-us: config: poll_before_sleep_us = -1 is invalid"},
      {{"bench", "--poll-before-sleep-us", "10001"},
       "kvbounce bench: error: ",
       "poll_before_sleep_us = 10001 is invalid: must be an integer >= 0 and <= 10000"},
      {{"bench", "--config", "inline_copy_kb=-1"},
       "kvbounce bench: error: ",
       "--config: config: inline_copy_kb = -1 is invalid"},
      {{"bench", "--config", "inline_copy_kb"},
       "kvbounce bench: error: ",
       "--config 'inline_copy_kb' is not KEY=VALUE"},
      {{"bench", "--config", "no_such_key=1"}, "kvbounce bench: error: ", "no_such_key"},
      {{"bench", "--config", "path=bounce"},
       "kvbounce bench: error: ",
       "--config path: the bench sets it; use --path"},
      {{"bench", "--config", "bounce-size-mb=4"},
       "kvbounce bench: error: ",
       "use --bounce-size-mb"},
      {{"bench", "--transport", "ucx", "--chaos"}, "kvbounce bench: error: ", "--transport"},
      {{"bench", "--transport", "ucx", "--step-timeout", "0"}, "kvbounce bench: error: ", "--"},
      {{"worker"}, "kvbounce worker: error: ", "--role is required"},
      {{"worker", "--role", "foo"}, "kvbounce worker: error: ", "--role 'foo' is invalid"},
      {{"worker", "--role", "gen", "--config", "poll_before_sleep_us=-5"},
       "kvbounce worker: error: ",
       "poll_before_sleep_us = -5 is invalid"},
      {{"worker", "--role", "gen", "--rank", "2"},
       "kvbounce worker: error: ",
       "--rank = 2 is invalid: the gen instance has 2 ranks"},
      {{"worker", "--role", "gen", "--rank", "x"}, "kvbounce worker: error: ", "--rank"},
      {{"worker", "--role", "gen", "--requests", "3"},
       "kvbounce worker: error: ",
       "needs --peers or --peers-file"},
      {{"worker", "--role", "gen", "--requests", "-1"}, "kvbounce worker: error: ", "--requests"},
      {{"worker", "--role", "gen", "--listen", "nohost"},
       "kvbounce worker: error: ",
       "--listen 'nohost' is not host:port"},
      {{"worker", "--role", "gen", "--listen", "h:70000"}, "kvbounce worker: error: ", "--listen"},
      {{"worker", "--role", "gen", "--peers", "a:1,b:0"}, "kvbounce worker: error: ", "peer 'b:0'"},
      {{"worker", "--role", "gen", "--peers-file", "/nonexistent-kvbounce/peers.json"},
       "kvbounce worker: error: ",
       "cannot read"},
      {{"worker", "--role", "ctx", "--path", "bounce"},
       "kvbounce worker: error: ",
       "--path applies to gen workers"},
      {{"worker", "--role", "gen", "--path", "sideways"}, "kvbounce worker: error: ", "--path"},
      {{"worker", "--role", "gen", "--inject-fail-rate", "0.5"},
       "kvbounce worker: error: ",
       "--inject-fail-rate applies to ctx workers"},
      {{"worker", "--role", "ctx", "--inject-fail-rate", "2"},
       "kvbounce worker: error: ",
       "--inject-fail-rate = 2"},
      {{"worker", "--role", "gen", "--config", "bounce_size_mb"},
       "kvbounce worker: error: ",
       "--config 'bounce_size_mb' is not KEY=VALUE"},
      {{"worker", "--role", "gen", "--config", "colour=blue"},
       "kvbounce worker: error: ",
       "--config: "},
      {{"worker", "--role", "gen", "--config", "path=bounce", "--bounce-size-mb", "0"},
       "kvbounce worker: error: ",
       "--config: "},
      {{"worker", "--role", "gen", "--concurrency", "0"},
       "kvbounce worker: error: ",
       "--concurrency = 0"},
      {{"worker", "--role", "gen", "--connect-timeout", "0"},
       "kvbounce worker: error: ",
       "--connect-timeout"},
      {{"worker", "--role", "gen", "--num-workers", "-1"},
       "kvbounce worker: error: ",
       "--num-workers = -1"},
      {{"worker", "--role", "gen", "--bounce-size-mb", "-1"},
       "kvbounce worker: error: ",
       "--bounce-size-mb = -1"},
      {{"worker", "--role", "gen", "--ctx", "tp=3"}, "kvbounce worker: error: ", "tp = 3"},
      {{"worker", "--role", "gen", "--json", "x.json"},
       "kvbounce worker: error: ",
       "--json needs --requests"},
      {{"worker", "--role", "gen", "--bogus"}, "kvbounce worker: error: ", "--bogus"},
  };
  for (const BadFlag& c : cases) {
    std::string joined;
    for (const std::string& a : c.args) joined += a + " ";
    SCOPED_TRACE(joined);
    const CliResult r = Cli(c.args);
    EXPECT_EQ(r.status, 2);
    EXPECT_THAT(r.err, StartsWith(c.prefix));
    EXPECT_THAT(r.err, HasSubstr(c.message));
    // One line, and nothing ran.
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_THAT(r.out, ::testing::Not(HasSubstr("setting up")));
  }
}

// Sizes beyond the machine, ranks beyond the rule, block counts beyond 32
// bits: a clear error at once, without allocating (the peak RSS of this
// process does not grow) and without hanging.
TEST(CliTest, HugeValuesAreRefusedBeforeAllocating) {
  const std::vector<BadFlag> cases = {
      {{"bench", "--head-dim", "2000000000", "--layers", "2", "--kv-heads", "8"},
       "kvbounce bench: error: ",
       "of memory"},
      {{"bench", "--tokens", "1000000000"}, "kvbounce bench: error: ", "of memory"},
      {{"bench", "--tokens-per-block", "2147483647"}, "kvbounce bench: error: ", "of memory"},
      {{"bench", "--bounce-size-mb", "1000000"}, "kvbounce bench: error: ", "of memory"},
      {{"bench", "--ctx", "tp=16384"}, "kvbounce bench: error: ", "at most 64 ranks"},
      {{"bench", "--ctx", "tp=2147483647"}, "kvbounce bench: error: ", "at most 64 ranks"},
      {{"bench", "--gen", "tp=8,pp=16"}, "kvbounce bench: error: ", "tp x pp <= 64"},
      {{"worker", "--role", "gen", "--tokens", "1000000000"},
       "kvbounce worker: error: ",
       "of memory"},
      {{"worker", "--role", "ctx", "--bounce-size-mb", "1000000"},
       "kvbounce worker: error: ",
       "of memory"},
      {{"plan", "--ctx", "tp=16384"}, "kvbounce plan: error: ", "at most 1024 ranks"},
      {{"plan", "--ctx", "tp=2147483647"}, "kvbounce plan: error: ", "at most 1024 ranks"},
      {{"plan", "--tokens", "100000000000"}, "kvbounce plan: error: ", "32-bit"},
      {{"plan", "--tokens", "9223372036854775807"}, "kvbounce plan: error: ", "32-bit"},
      {{"bench", "--tokens", "9223372036854775807"}, "kvbounce bench: error: ", "32-bit"},
      {{"plan", "--tokens", "1000000000", "--tokens-per-block", "1"},
       "kvbounce plan: error: ",
       "of memory"},
      {{"plan", "--tokens", "1000000000000000000", "--tokens-per-block", "2147483647", "--head-dim",
        "2000000000", "--layers", "1000", "--kv-heads", "8"},
       "kvbounce plan: error: ",
       "2^63 bytes"},
  };
  const long rss_before = PeakRssKb();
  for (const BadFlag& c : cases) {
    std::string joined;
    for (const std::string& a : c.args) joined += a + " ";
    SCOPED_TRACE(joined);
    const auto start = std::chrono::steady_clock::now();
    const CliResult r = Cli(c.args);
    EXPECT_EQ(r.status, 2);
    EXPECT_THAT(r.err, StartsWith(c.prefix));
    EXPECT_THAT(r.err, HasSubstr(c.message));
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  }
  EXPECT_LT(PeakRssKb() - rss_before, 64 * 1024) << "KiB of peak RSS added";
}

TEST(CliTest, AMemoryErrorNamesTheEstimateItsPartsAndTheCap) {
  const CliResult r = Cli({"bench", "--tokens", "1000000000"});
  EXPECT_THAT(r.err, HasSubstr("this run needs about"));
  EXPECT_THAT(r.err, HasSubstr("pools of 10 ranks"));
  EXPECT_THAT(r.err, HasSubstr("staging arenas"));
  EXPECT_THAT(r.err, HasSubstr("of physical memory of this machine"));
}

TEST(CliTest, AnUnwritableJsonPathFailsBeforeTheRun) {
  std::vector<std::string> args = SmallBench();
  args.insert(args.end(), {"--json", "/nonexistent-kvbounce-dir/report.json"});
  CliResult r = Cli(args);
  EXPECT_EQ(r.status, 2);
  EXPECT_THAT(r.err, StartsWith("kvbounce bench: error: --json /nonexistent-kvbounce-dir/"));
  EXPECT_THAT(r.out, ::testing::Not(HasSubstr("setting up")));

  const std::string dir = ::testing::TempDir();
  args = SmallBench();
  args.insert(args.end(), {"--json", dir});
  r = Cli(args);
  EXPECT_EQ(r.status, 2);
  EXPECT_THAT(r.err, HasSubstr("is a directory"));
}

TEST(CliTest, TheJsonReportIsWrittenWithTheDocumentedFields) {
  const std::string path = ::testing::TempDir() + "/kvbounce_cli_test_report.json";
  std::remove(path.c_str());
  std::vector<std::string> args = SmallBench();
  args.insert(args.end(),
              {"--path", "per-block,direct", "--inject-fail-rate", "0.2", "--json", path});
  const CliResult r = Cli(args);
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("fault injection"));
  EXPECT_THAT(r.out, HasSubstr("no transport writes: fault injection did not apply"));
  std::ifstream in(path);
  ASSERT_TRUE(in.good());
  const nlohmann::json j = nlohmann::json::parse(in);
  ASSERT_EQ(j["runs"].size(), 2u);
  for (const char* key : {"requests_failed_by_injection", "injected_write_failures",
                          "injected_failed_batches", "fault_injection_applies"}) {
    EXPECT_TRUE(j["runs"][0].contains(key)) << key;
  }
  EXPECT_FALSE(j["runs"][0].contains("injected_failures"));
  EXPECT_EQ(j["fault_injection"]["paths_touched"], nlohmann::json::array({"per-block"}));
  EXPECT_EQ(j["fault_injection"]["paths_untouched"], nlohmann::json::array({"direct"}));
  std::remove(path.c_str());
}

}  // namespace
}  // namespace kvbounce::tools
