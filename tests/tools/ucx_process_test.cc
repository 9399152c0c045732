// Every rank its own process, over UCX (label `ucx`): the multi-process bench
// moves and verifies every byte on every path the transport offers, with TP
// fan-in, fan-out, PP and a layout change; a worker killed mid-run ends the
// bench with a message naming it, within a bound, with every worker reaped;
// a killed bench takes its workers with it; a worker stops cleanly on
// SIGTERM, settling what is in flight.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

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
using ::testing::HasSubstr;
using ::testing::StartsWith;

constexpr char kBinary[] = KVBOUNCE_BINARY;

class UcxProcessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!UcxTransportAvailable()) GTEST_SKIP() << "this build has no UCX transport";
  }
};

// True when `pid` is gone (or a zombie nobody reaps, or another program that
// got the number since).
bool Gone(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  if (!stat) return true;
  std::string line;
  std::getline(stat, line);
  const size_t paren = line.rfind(')');
  if (paren != std::string::npos && paren + 2 < line.size() && line[paren + 2] == 'Z') return true;
  std::ifstream cmdline("/proc/" + std::to_string(pid) + "/cmdline");
  std::stringstream text;
  text << cmdline.rdbuf();
  return text.str().find("worker") == std::string::npos;
}

bool AllGoneWithin(const std::map<std::string, pid_t>& pids, std::chrono::milliseconds bound) {
  const auto deadline = std::chrono::steady_clock::now() + bound;
  while (true) {
    bool all = true;
    for (const auto& [name, pid] : pids) all = all && Gone(pid);
    if (all) return true;
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

// ---------------------------------------------------------------------------
// The bench, in-process, with worker processes.

struct Shape {
  const char* name;
  const char* ctx;
  const char* gen;
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
  std::ostringstream log;
  Result<nlohmann::json> report = RunBench(f, log);
  ASSERT_TRUE(report.ok()) << report.status() << "\n" << log.str();
  std::string why;
  EXPECT_TRUE(BenchPassed(*report, &why)) << why << "\n" << log.str();
  EXPECT_FALSE(report->contains("failure")) << log.str();
  const auto& runs = (*report)["runs"];
  std::vector<std::string> paths;
  for (const auto& r : runs) paths.push_back(r["path"]);
  // Direct only where the transport maps peer memory; the log says so.
  std::vector<std::string> expected = {"per-block", "bounce", "auto"};
  if (log.str().find("direct: not run") == std::string::npos) {
    expected.insert(expected.begin() + 2, "direct");
  }
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
    EXPECT_GT(r["transport_writes"].get<uint64_t>(), 0u);
    EXPECT_GT(r["throughput_gbps"].get<double>(), 0);
  }
  ASSERT_GE(runs.size(), 2u);
  EXPECT_TRUE(runs[0]["paths_taken"].contains("per-block"));
  EXPECT_TRUE(runs[1]["paths_taken"].contains("bounce"));
  for (const auto& w : (*report)["workers"]) {
    EXPECT_EQ(w["exit"], "exited with status 0") << w.dump();
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, UcxBenchTest,
    ::testing::Values(Shape{"FanIn", "tp=2", "tp=1"}, Shape{"FanOut", "tp=1", "tp=2"},
                      Shape{"Pipeline", "tp=1,pp=2", "tp=2,pp=1"},
                      Shape{"LayoutChange", "tp=2",
                            "tp=2,layout=layer-major-nhd,tokens-per-block=16"}),
    [](const ::testing::TestParamInfo<Shape>& p) { return std::string(p.param.name); });

// ---------------------------------------------------------------------------
// The bench as a process, and things happening to it.

struct Bench {
  std::unique_ptr<Child> child;
  std::map<std::string, pid_t> workers;  // "ctx rank 1" -> pid
  std::string output;
};

// Starts `kvbounce bench --transport ucx` with enough requests to run for a
// while, and reads its output until the first path runs.
Bench StartBench(int step_timeout_s) {
  Bench b;
  Child::Options o;
  o.executable = "/bin/sh";
  o.args = {"-c",
            "exec \"$0\" bench --transport ucx --layers 4 --kv-heads 4 --head-dim 64 --tokens 512 "
            "--ctx tp=2 --gen tp=2 --requests 100000 --path per-block --step-timeout " +
                std::to_string(step_timeout_s) + " 2>&1",
            kBinary};
  o.name = "bench";
  auto child = Child::Spawn(o);
  EXPECT_TRUE(child.ok()) << child.status();
  if (!child.ok()) return b;
  b.child = std::move(child).value();
  const auto deadline = std::chrono::steady_clock::now() + seconds(30);
  while (std::chrono::steady_clock::now() < deadline) {
    std::optional<std::string> line = b.child->NextLine();
    if (!line) {
      if (!b.child->ReadSome()) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      continue;
    }
    b.output += *line + "\n";
    // "  ctx rank 1 (pid 4242) at 127.0.0.1:5000"
    const size_t pid_at = line->find(" (pid ");
    if (pid_at != std::string::npos && line->find(") at ") != std::string::npos) {
      b.workers[line->substr(2, pid_at - 2)] = std::stoi(line->substr(pid_at + 6));
    }
    if (line->find("per-block: running") != std::string::npos) return b;
  }
  ADD_FAILURE() << "the bench did not start its run:\n" << b.output;
  return b;
}

// Reads the rest of the bench's output and reaps it, within `bound`.
void FinishBench(Bench& b, std::chrono::milliseconds bound) {
  const auto deadline = std::chrono::steady_clock::now() + bound;
  while (std::chrono::steady_clock::now() < deadline) {
    while (std::optional<std::string> line = b.child->NextLine()) b.output += *line + "\n";
    if (!b.child->ReadSome()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  while (std::optional<std::string> line = b.child->NextLine()) b.output += *line + "\n";
  EXPECT_TRUE(b.child->Reap(deadline)) << "the bench did not end within the bound:\n" << b.output;
}

void KillWorkerMidRun(const std::string& victim) {
  constexpr int kStep = 8;
  Bench b = StartBench(kStep);
  ASSERT_NE(b.child, nullptr);
  ASSERT_EQ(b.workers.size(), 4u) << b.output;
  const pid_t pid = b.workers.at(victim);
  const auto start = std::chrono::steady_clock::now();
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  // Noticed at once; the survivors get at most 5 s to quit, 2 s after
  // SIGTERM, then SIGKILL.
  FinishBench(b, seconds(20));
  EXPECT_LT(std::chrono::steady_clock::now() - start, seconds(20));
  ASSERT_TRUE(b.child->wait_status().has_value());
  EXPECT_TRUE(WIFEXITED(*b.child->wait_status()));
  EXPECT_EQ(WEXITSTATUS(*b.child->wait_status()), 1) << b.output;
  EXPECT_THAT(b.output, HasSubstr("kvbounce bench: FAILED: " + victim + " (pid " +
                                  std::to_string(pid) + ") died: killed by SIGKILL"));
  // Every worker was reaped by the bench: none is left.
  EXPECT_TRUE(AllGoneWithin(b.workers, std::chrono::milliseconds(0))) << b.output;
}

TEST_F(UcxProcessTest, AKilledCtxWorkerEndsTheBenchNamingIt) { KillWorkerMidRun("ctx rank 1"); }

TEST_F(UcxProcessTest, AKilledGenWorkerEndsTheBenchNamingIt) { KillWorkerMidRun("gen rank 0"); }

TEST_F(UcxProcessTest, AKilledBenchTakesItsWorkersWithIt) {
  Bench b = StartBench(30);
  ASSERT_NE(b.child, nullptr);
  ASSERT_EQ(b.workers.size(), 4u) << b.output;
  b.child->Signal(SIGKILL);
  EXPECT_TRUE(b.child->Reap(std::chrono::steady_clock::now() + seconds(10)));
  EXPECT_TRUE(AllGoneWithin(b.workers, std::chrono::seconds(10)));
}

TEST_F(UcxProcessTest, SigtermStopsTheBenchAndItsWorkers) {
  Bench b = StartBench(30);
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
  EXPECT_EQ(NextLine(group, gen), "connected 1");
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
