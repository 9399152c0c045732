// The bench as a process, and things happening to its workers: shared by the
// process tests of the transports that run ranks as `kvbounce worker`
// processes (ucx, cuda-ipc). Header-only; for tests.
#ifndef KVBOUNCE_TESTS_TOOLS_BENCH_PROCESS_H_
#define KVBOUNCE_TESTS_TOOLS_BENCH_PROCESS_H_

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

#include "tools/subprocess.h"

namespace kvbounce::tools {

// True when `pid` is gone (or a zombie nobody reaps, or another program that
// got the number since).
inline bool Gone(pid_t pid) {
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

inline bool AllGoneWithin(const std::map<std::string, pid_t>& pids,
                          std::chrono::milliseconds bound) {
  const auto deadline = std::chrono::steady_clock::now() + bound;
  while (true) {
    bool all = true;
    for (const auto& [name, pid] : pids) all = all && Gone(pid);
    if (all) return true;
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

struct Bench {
  std::unique_ptr<Child> child;
  std::map<std::string, pid_t> workers;  // "ctx rank 1" -> pid
  std::string output;
};

// Starts `kvbounce bench <transport_args>` (the program `binary`) with
// enough requests to run for a while on `path`, and reads its output until
// that path runs. With `json_file`, the bench writes its report there.
inline Bench StartBench(const std::string& binary, const std::string& transport_args,
                        int step_timeout_s, const std::string& json_file = "",
                        const std::string& path = "per-block") {
  Bench b;
  Child::Options o;
  o.executable = "/bin/sh";
  o.args = {"-c",
            "exec \"$0\" bench " + transport_args +
                " --layers 4 --kv-heads 4 --head-dim 64 --tokens 512 "
                "--ctx tp=2 --gen tp=2 --requests 100000 --path " +
                path + " --step-timeout " + std::to_string(step_timeout_s) +
                (json_file.empty() ? "" : " --json '" + json_file + "'") + " 2>&1",
            binary};
  o.name = "bench";
  auto child = Child::Spawn(o);
  EXPECT_TRUE(child.ok()) << child.status();
  if (!child.ok()) return b;
  b.child = std::move(child).value();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
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
    if (line->find(path + ": running") != std::string::npos) return b;
  }
  ADD_FAILURE() << "the bench did not start its run:\n" << b.output;
  return b;
}

// Reads the rest of the bench's output and reaps it, within `bound`.
inline void FinishBench(Bench& b, std::chrono::milliseconds bound) {
  const auto deadline = std::chrono::steady_clock::now() + bound;
  while (std::chrono::steady_clock::now() < deadline) {
    while (std::optional<std::string> line = b.child->NextLine()) b.output += *line + "\n";
    if (!b.child->ReadSome()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  while (std::optional<std::string> line = b.child->NextLine()) b.output += *line + "\n";
  EXPECT_TRUE(b.child->Reap(deadline)) << "the bench did not end within the bound:\n" << b.output;
}

// Kills `victim` ("ctx rank 1") mid-run on `path`: the bench ends within
// its bound, naming it, and reports how every other worker settled. With
// `frozen`, that worker is SIGSTOPped first: it cannot quit, is killed and
// has no summary. In this shape (tp=2 -> tp=2, 4 kv heads) gen rank i pulls
// from ctx rank i alone.
inline void KillWorkerMidRun(const std::string& binary, const std::string& transport_args,
                             const std::string& victim, const std::string& path,
                             const std::string& frozen = "") {
  constexpr int kStep = 8;
  const std::string json_file = ::testing::TempDir() + "kvbounce_kill_" + std::to_string(getpid()) +
                                "_" + std::to_string(std::hash<std::string>()(victim + path)) +
                                ".json";
  std::remove(json_file.c_str());
  Bench b = StartBench(binary, transport_args, kStep, json_file, path);
  ASSERT_NE(b.child, nullptr);
  ASSERT_EQ(b.workers.size(), 4u) << b.output;
  const pid_t pid = b.workers.at(victim);
  if (!frozen.empty()) {
    ASSERT_EQ(kill(b.workers.at(frozen), SIGSTOP), 0);
  }
  const auto start = std::chrono::steady_clock::now();
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  // Noticed at once; the others get at most 5 s to settle what they hold
  // and quit, 2 s after SIGTERM, then SIGKILL.
  FinishBench(b, std::chrono::seconds(20));
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20));
  ASSERT_TRUE(b.child->wait_status().has_value());
  EXPECT_TRUE(WIFEXITED(*b.child->wait_status()));
  EXPECT_EQ(WEXITSTATUS(*b.child->wait_status()), 1) << b.output;
  EXPECT_THAT(b.output, ::testing::HasSubstr("kvbounce bench: FAILED: " + victim + " (pid " +
                                             std::to_string(pid) + ") died: killed by SIGKILL"));
  // Every worker was reaped by the bench: none is left.
  EXPECT_TRUE(AllGoneWithin(b.workers, std::chrono::milliseconds(0))) << b.output;

  // How the survivors settled, from the report.
  std::ifstream file(json_file);
  ASSERT_TRUE(file.good()) << "no report at " << json_file << "\n" << b.output;
  const nlohmann::json report = nlohmann::json::parse(file, nullptr, false);
  std::remove(json_file.c_str());
  ASSERT_TRUE(report.is_object()) << b.output;
  ASSERT_EQ(report["workers"].size(), 4u) << report.dump(2);
  const bool ctx_victim = victim.starts_with("ctx");
  const std::string victim_rank = victim.substr(victim.size() - 1);
  for (const nlohmann::json& w : report["workers"]) {
    const std::string name = w["name"];
    SCOPED_TRACE(name);
    if (name == victim) {
      EXPECT_EQ(w["exit"], "killed by SIGKILL");
      EXPECT_FALSE(w.contains("summary")) << w.dump();
      EXPECT_THAT(b.output, ::testing::Not(::testing::HasSubstr("  " + name + ": ")));
      continue;
    }
    if (name == frozen) {
      EXPECT_EQ(w["exit"], "killed by SIGKILL");
      EXPECT_FALSE(w.contains("summary")) << w.dump();
      EXPECT_THAT(b.output, ::testing::ContainsRegex(
                                "  " + name +
                                ": no summary: killed by SIGKILL \\(it did not quit within "
                                "[0-9.]+ s of 'quit', nor 2 s after SIGTERM\\)"));
      continue;
    }
    // A survivor without a summary did not finish its shutdown within the
    // bound and was killed: that is a bug of the agent or the transport
    // (src/session, src/transport), not of the bench.
    ASSERT_TRUE(w.contains("summary")) << w.dump() << "\n" << b.output;
    const nlohmann::json& summary = w["summary"];
    EXPECT_EQ(summary["stopped_by"], "quit") << summary.dump();
    EXPECT_EQ(w["exit"], "exited with status 0");
    // Every staging slot came back, whatever happened to the requests.
    EXPECT_EQ(summary["arena_outstanding_bytes"], 0) << summary.dump();
    EXPECT_EQ(summary["mismatches"], 0) << summary.dump();
    EXPECT_EQ(summary["requests"].get<uint64_t>(),
              summary["completed"].get<uint64_t>() + summary["failed"].get<uint64_t>());
    EXPECT_THAT(b.output, ::testing::ContainsRegex("  " + name +
                                                   ": settled [0-9]+ completed, [0-9]+ failed.*"
                                                   "staging bytes left 0"));
    // With a frozen peer the survivors cannot settle everything before
    // they quit: what they held then ends with the shutdown.
    if (!frozen.empty()) continue;
    const bool ctx = name.starts_with("ctx");
    const uint64_t failed = summary["failed"];
    const std::string first = summary.value("first_failure", "");
    if (ctx_victim && !ctx && failed > 0) {
      // A pull from the dead writer: its connection was lost while the
      // writer wrote, was closed when the pull asked for the data, or was
      // gone when the pull started. (The gen rank of the other writer
      // completes what it holds: it has none.)
      EXPECT_THAT(first, ::testing::AllOf(::testing::HasSubstr("ctx0 rank " + victim_rank),
                                          ::testing::AnyOf(::testing::HasSubstr("lost"),
                                                           ::testing::HasSubstr("not connected"),
                                                           ::testing::HasSubstr("closed"))));
    }
    if (!ctx_victim && ctx && failed > 0) {
      // A publication for the dead reader: its job failed with the reader
      // lost, or the publication stayed open and the bench cancelled it.
      EXPECT_THAT(first, ::testing::AnyOf(::testing::HasSubstr("gen0 rank " + victim_rank),
                                          ::testing::HasSubstr("CANCELLED")));
    }
  }
}

}  // namespace kvbounce::tools

#endif  // KVBOUNCE_TESTS_TOOLS_BENCH_PROCESS_H_
