// Every rank its own process, over UCX (label `ucx`): the multi-process bench
// moves and verifies every byte on every path the transport offers, with TP
// fan-in, fan-out, PP and a layout change; a worker killed mid-run ends the
// bench with a message naming it, within a bound, with every worker reaped
// and every other one reporting how it settled (no staging byte left; a
// pull from a dead writer failed naming its lost connection);
// a killed bench takes its workers with it; a worker stops cleanly on
// SIGTERM, settling what is in flight.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench_process.h"
#include "kvbounce/transports.h"
#include "tools/bench_command.h"
#include "tools/subprocess.h"
#include "tools/worker_protocol.h"

#ifndef KVBOUNCE_BINARY
#error "KVBOUNCE_BINARY must name the kvbounce executable"
#endif

namespace kvbounce::tools {
namespace {

using std::chrono::seconds;
using ::testing::AllOf;
using ::testing::AnyOf;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

constexpr char kBinary[] = KVBOUNCE_BINARY;

class UcxProcessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!UcxTransportAvailable()) GTEST_SKIP() << "this build has no UCX transport";
  }
};

// ---------------------------------------------------------------------------
// The bench, in-process, with worker processes.

struct Shape {
  const char* name;
  const char* ctx;
  const char* gen;
  int64_t poll_us = 0;           // --poll-before-sleep-us, when > 0
  const char* config = nullptr;  // one --config KEY=VALUE, when set
};

class UcxBenchTest : public UcxProcessTest, public ::testing::WithParamInterface<Shape> {};

TEST_P(UcxBenchTest, EveryPathMovesAndVerifiesEveryByte) {
  const Shape& shape = GetParam();
  BenchFlags f;
  f.transport = "ucx";
  f.worker_executable = kBinary;
  f.step_timeout_s = 40;
  f.scenario.layers = 4;
  f.scenario.kv_heads = 4;
  f.scenario.head_dim = 32;
  f.scenario.tokens = 96;
  f.scenario.start_token = 5;
  f.scenario.ctx = shape.ctx;
  f.scenario.gen = shape.gen;
  f.requests = 4;
  f.concurrency = 2;
  if (shape.poll_us > 0) f.poll_before_sleep_us = shape.poll_us;
  if (shape.config != nullptr) f.config.push_back(shape.config);
  std::ostringstream log;
  Result<nlohmann::json> report = RunBench(f, log);
  ASSERT_TRUE(report.ok()) << report.status() << "\n" << log.str();
  std::string why;
  EXPECT_TRUE(BenchPassed(*report, &why)) << why << "\n" << log.str();
  EXPECT_FALSE(report->contains("failure")) << log.str();
  const auto& runs = (*report)["runs"];
  std::vector<std::string> paths;
  for (const auto& r : runs) paths.push_back(r["path"]);
  // Direct too: the gen workers read the ctx workers' pools (one host).
  const std::vector<std::string> expected = {"per-block", "bounce", "direct", "auto"};
  EXPECT_EQ(paths, expected) << log.str();
  for (const auto& r : runs) {
    SCOPED_TRACE(r["path"].get<std::string>());
    EXPECT_EQ(r["transport"], "ucx");
    EXPECT_EQ(r["requests"], 4);
    EXPECT_EQ(r["completed"], 4);
    EXPECT_EQ(r["mismatches"], 0);
    EXPECT_EQ(r["arena_outstanding_bytes"], 0);
    // 4 layers x 2 x 4 heads x 91 tokens x 64 B per request, all gen ranks.
    EXPECT_EQ(r["bytes"], 4u * 4 * 2 * 4 * 91 * 64);
    EXPECT_GE(r["verified_bytes"].get<uint64_t>(), r["bytes"].get<uint64_t>());
    if (r["path"] == "direct") {
      EXPECT_EQ(r["transport_writes"].get<uint64_t>(), 0u);  // the receivers read
    } else {
      EXPECT_GT(r["transport_writes"].get<uint64_t>(), 0u);
    }
    EXPECT_GT(r["throughput_gbps"].get<double>(), 0);
  }
  ASSERT_GE(runs.size(), 2u);
  EXPECT_TRUE(runs[0]["paths_taken"].contains("per-block"));
  EXPECT_TRUE(runs[1]["paths_taken"].contains("bounce"));
  // Every worker quit and said how it settled: nothing failed on a gen
  // rank, no staging byte is left anywhere, and the log has a line each.
  for (const auto& w : (*report)["workers"]) {
    SCOPED_TRACE(w["name"].get<std::string>());
    EXPECT_EQ(w["exit"], "exited with status 0") << w.dump();
    ASSERT_TRUE(w.contains("summary")) << w.dump();
    const nlohmann::json& summary = w["summary"];
    EXPECT_EQ(summary["stopped_by"], "quit");
    EXPECT_EQ(summary["arena_outstanding_bytes"], 0);
    EXPECT_EQ(summary["mismatches"], 0);
    if (w["name"].get<std::string>().starts_with("gen")) {
      EXPECT_EQ(summary["failed"], 0) << summary.dump();
      EXPECT_EQ(summary["completed"], 4 * runs.size());
    }
    EXPECT_THAT(log.str(), HasSubstr("  " + w["name"].get<std::string>() + ": settled "));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, UcxBenchTest,
    ::testing::Values(Shape{"FanIn", "tp=2", "tp=1"}, Shape{"FanOut", "tp=1", "tp=2"},
                      Shape{"Pipeline", "tp=1,pp=2", "tp=2,pp=1"},
                      Shape{"LayoutChange", "tp=2",
                            "tp=2,layout=layer-major-nhd,tokens-per-block=16"},
                      // Control loops and UCX progress threads that poll
                      // before they sleep (Config::poll_before_sleep_us).
                      Shape{"FanInPolling", "tp=2", "tp=1", 200},
                      // Every gather, scatter and copy of these
                      // requests (~93 KiB a writer) on a control loop.
                      Shape{"FanInLoopCopies", "tp=2", "tp=1", 0, "inline_copy_kb=1024"},
                      // UCX's rail 0 on a thread of its own, not on the
                      // control loop (the default), polling and not.
                      Shape{"FanInRailThreads", "tp=2", "tp=1", 0, "progress_on_loop=0"},
                      Shape{"FanOutRailThreadsPolling", "tp=1", "tp=2", 200, "progress_on_loop=0"}),
    [](const ::testing::TestParamInfo<Shape>& p) { return std::string(p.param.name); });

// ---------------------------------------------------------------------------
// The bench as a process, and things happening to it.

TEST_F(UcxProcessTest, AKilledCtxWorkerEndsTheBenchNamingIt) {
  KillWorkerMidRun(kBinary, "--transport ucx", "ctx rank 1", "per-block");
}

TEST_F(UcxProcessTest, AKilledGenWorkerEndsTheBenchNamingIt) {
  KillWorkerMidRun(kBinary, "--transport ucx", "gen rank 0", "per-block");
}

// On the bounce path both sides hold staging slots while a request is in
// flight: the survivors return every one.
TEST_F(UcxProcessTest, AKilledCtxWorkerMidBounceLeavesNoStagingBehind) {
  KillWorkerMidRun(kBinary, "--transport ucx", "ctx rank 0", "bounce");
}

TEST_F(UcxProcessTest, AKilledGenWorkerMidBounceLeavesNoStagingBehind) {
  KillWorkerMidRun(kBinary, "--transport ucx", "gen rank 1", "bounce");
}

// gen rank 0 is stopped while ctx rank 1 dies: the bench kills it after the
// bounded wait and says it has no summary; ctx rank 0, which was serving it,
// still settles and returns its staging slots.
TEST_F(UcxProcessTest, AWorkerThatCannotQuitIsKilledAndSaysSo) {
  KillWorkerMidRun(kBinary, "--transport ucx", "ctx rank 1", "bounce", "gen rank 0");
}

TEST_F(UcxProcessTest, AKilledBenchTakesItsWorkersWithIt) {
  Bench b = StartBench(kBinary, "--transport ucx", 30);
  ASSERT_NE(b.child, nullptr);
  ASSERT_EQ(b.workers.size(), 4u) << b.output;
  b.child->Signal(SIGKILL);
  EXPECT_TRUE(b.child->Reap(std::chrono::steady_clock::now() + seconds(10)));
  EXPECT_TRUE(AllGoneWithin(b.workers, std::chrono::seconds(10)));
}

TEST_F(UcxProcessTest, SigtermStopsTheBenchAndItsWorkers) {
  Bench b = StartBench(kBinary, "--transport ucx", 30);
  ASSERT_NE(b.child, nullptr);
  b.child->Signal(SIGTERM);
  FinishBench(b, seconds(45));
  ASSERT_TRUE(b.child->wait_status().has_value());
  EXPECT_EQ(WEXITSTATUS(*b.child->wait_status()), 1) << b.output;
  EXPECT_THAT(b.output, HasSubstr("interrupted by SIGTERM"));
  EXPECT_TRUE(AllGoneWithin(b.workers, std::chrono::milliseconds(0))) << b.output;
}

// ---------------------------------------------------------------------------
// A worker on its own, driven by the test.

std::unique_ptr<Child> StartWorker(const std::vector<std::string>& args, const std::string& name) {
  Child::Options o;
  o.executable = kBinary;
  o.args = {"worker",   "--layers", "2",     "--kv-heads", "4",     "--head-dim", "16",
            "--tokens", "64",       "--ctx", "tp=1",       "--gen", "tp=1"};
  o.args.insert(o.args.end(), args.begin(), args.end());
  o.name = name;
  auto child = Child::Spawn(o);
  EXPECT_TRUE(child.ok()) << child.status();
  return child.ok() ? std::move(child).value() : nullptr;
}

std::string NextLine(ChildGroup& group, size_t child) {
  Result<ChildGroup::Line> line =
      group.Next(std::chrono::steady_clock::now() + seconds(20), {child});
  EXPECT_TRUE(line.ok()) << line.status();
  return line.ok() ? line->text : "";
}

TEST_F(UcxProcessTest, AWorkerStopsCleanlyOnSigtermSettlingWhatIsInFlight) {
  ChildGroup group;
  const size_t ctx = group.Add(StartWorker({"--role", "ctx"}, "ctx rank 0"));
  const size_t gen = group.Add(StartWorker({"--role", "gen"}, "gen rank 0"));
  const std::string ready = NextLine(group, ctx);
  ASSERT_THAT(ready, StartsWith("ready 127.0.0.1:"));
  EXPECT_THAT(ready, HasSubstr("\"transport\":\"ucx\""));
  ASSERT_THAT(NextLine(group, gen), StartsWith("ready "));
  const std::string address = std::string(SplitReply(SplitReply(ready).rest).keyword);
  ASSERT_TRUE(group.at(gen).Send("connect " + address).ok());
  // The paths a pull can take: direct too, the gen worker reading the ctx
  // worker's pool on this host.
  EXPECT_THAT(NextLine(group, gen), StartsWith("connected 1 per-block,"));
  // One request completes; another waits for a publication that never comes.
  ASSERT_TRUE(group.at(ctx).Send("publish 1 0 64").ok());
  ASSERT_TRUE(group.at(gen).Send("pull 1 0 64 bounce").ok());
  Result<DoneReply> done = ParseDone(NextLine(group, gen));
  ASSERT_TRUE(done.ok());
  EXPECT_EQ(done->code, StatusCode::kOk) << done->message;
  EXPECT_GT(done->verified_bytes, 0u);
  EXPECT_EQ(done->mismatches, 0u);
  ASSERT_TRUE(group.at(gen).Send("pull 2 1 64 per-block").ok());
  ASSERT_TRUE(group.at(gen).Send("stats").ok());
  EXPECT_THAT(NextLine(group, gen), HasSubstr("\"in_flight\":1"));

  group.at(gen).Signal(SIGTERM);
  done = ParseDone(NextLine(group, gen));
  ASSERT_TRUE(done.ok());
  EXPECT_EQ(done->request_id, 2u);
  EXPECT_NE(done->code, StatusCode::kOk);
  const std::string bye = NextLine(group, gen);
  ASSERT_THAT(bye, StartsWith("bye {"));
  const nlohmann::json summary = nlohmann::json::parse(bye.substr(4));
  EXPECT_EQ(summary["stopped_by"], "SIGTERM");
  EXPECT_EQ(summary["arena_outstanding_bytes"], 0);
  EXPECT_EQ(summary["completed"], 1);
  EXPECT_TRUE(group.at(gen).Reap(std::chrono::steady_clock::now() + seconds(20)));
  EXPECT_EQ(*group.at(gen).wait_status(), 0) << group.at(gen).DescribeExit();

  ASSERT_TRUE(group.at(ctx).Send("quit").ok());
  EXPECT_TRUE(group.at(ctx).Reap(std::chrono::steady_clock::now() + seconds(20)));
  EXPECT_EQ(*group.at(ctx).wait_status(), 0) << group.at(ctx).DescribeExit();
}

}  // namespace
}  // namespace kvbounce::tools
