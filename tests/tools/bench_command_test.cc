// `kvbounce bench` as a user runs it: every path, every byte verified, the
// report's fields, injected faults, and bad flags.
#include "tools/bench_command.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "copy/device_support.h"
#include "kvbounce/transports.h"
#include "tools/ceiling.h"

namespace kvbounce::tools {
namespace {

using ::testing::HasSubstr;

BenchFlags Small() {
  BenchFlags f;
  f.scenario.layers = 4;
  f.scenario.kv_heads = 4;
  f.scenario.head_dim = 32;
  f.scenario.tokens = 96;
  f.scenario.start_token = 5;
  f.scenario.ctx = "tp=4,pp=1";
  f.scenario.gen = "tp=2,pp=2,layout=layer-major-nhd,tokens-per-block=16";
  f.requests = 6;
  f.concurrency = 3;
  return f;
}

TEST(BenchCommandTest, EveryPathRunsAndVerifies) {
  std::ostringstream log;
  auto report = RunBench(Small(), log);
  ASSERT_TRUE(report.ok()) << report.status();
  const auto& runs = (*report)["runs"];
  ASSERT_EQ(runs.size(), 4u);
  const char* paths[] = {"per-block", "bounce", "direct", "auto"};
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto& r = runs[i];
    EXPECT_EQ(r["path"], paths[i]);
    EXPECT_EQ(r["transport"], "loopback");
    EXPECT_EQ(r["memory"], "host");
    EXPECT_EQ(r["requests"], 6);
    EXPECT_EQ(r["completed"], 6);
    EXPECT_EQ(r["failed"], 0);
    EXPECT_EQ(r["injected_write_failures"], 0);
    EXPECT_EQ(r["requests_failed_by_injection"], 0);
    EXPECT_EQ(r["fault_injection_applies"], false);
    EXPECT_EQ(r["mismatches"], 0);
    EXPECT_EQ(r["arena_outstanding_bytes"], 0);
    // 4 layers x 2 x 4 heads x 91 tokens x 64 B per request, all gen ranks.
    EXPECT_EQ(r["bytes"], 6u * 4 * 2 * 4 * 91 * 64);
    EXPECT_GE(r["verified_bytes"].get<uint64_t>(), r["bytes"].get<uint64_t>());
    EXPECT_GT(r["seconds"].get<double>(), 0);
    EXPECT_GT(r["throughput_gbps"].get<double>(), 0);
    for (const char* p : {"p50", "p90", "p99", "max"})
      EXPECT_GT(r["latency_ms"][p].get<double>(), 0);
    EXPECT_LE(r["latency_ms"]["p50"].get<double>(), r["latency_ms"]["max"].get<double>());
  }
  // Per-block issues one write per fragment; over loopback, bounce gathers
  // straight into the mapped recv slots and direct copies: no write.
  EXPECT_GT(runs[0]["transport_writes"].get<uint64_t>(), 0u);
  EXPECT_EQ(runs[1]["transport_writes"], 0);
  EXPECT_EQ(runs[2]["transport_writes"], 0);
  EXPECT_EQ(runs[0]["paths_taken"]["per-block"], 6 * 4);
  EXPECT_EQ(runs[3]["paths_taken"]["direct"], 6 * 4);
  // Host pools: the ceiling is the requests' own fragments copied plainly,
  // measured before the paths ran and again right after each wave of each
  // path (its paired ceiling); every path is shown as a share of its own.
  ASSERT_TRUE(report->contains("ceiling"));
  EXPECT_THAT((*report)["ceiling"]["what"].get<std::string>(), HasSubstr("fragments copied by"));
  EXPECT_GT((*report)["ceiling"]["gbps"].get<double>(), 0);
  for (const auto& r : runs) {
    ASSERT_TRUE(r.contains("ceiling_gbps")) << r;
    EXPECT_GT(r["ceiling_gbps"].get<double>(), 0);
    // The fragments of exactly the requests it moved, each byte once.
    EXPECT_EQ(r["ceiling_bytes"], r["bytes"]);
    EXPECT_NEAR(r["fraction_of_ceiling"].get<double>(),
                r["throughput_gbps"].get<double>() / r["ceiling_gbps"].get<double>(), 1e-9);
  }
  std::string why;
  EXPECT_TRUE(BenchPassed(*report, &why)) << why;
  std::ostringstream table;
  PrintBenchTable(*report, table);
  EXPECT_THAT(table.str(), HasSubstr("per-block"));
  EXPECT_THAT(table.str(), HasSubstr("GB/s"));
  EXPECT_THAT(table.str(), HasSubstr("ceil%"));
  EXPECT_THAT(table.str(), HasSubstr("paired ceiling"));
}

// The ceiling's copy: every fragment copied once, whatever the thread count
// (also more threads than fragments, and none at all).
TEST(BenchCommandTest, TheCeilingsParallelCopyCopiesEveryFragmentOnce) {
  std::vector<std::byte> src(1 << 17), dst(1 << 17);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<std::byte>(i * 7 + 3);
  std::vector<Fragment> fragments;
  uint64_t at = 0;
  for (uint64_t bytes : {1u, 4096u, 17u, 30000u, 255u, 8u}) {
    // Every other range, reversed into dst: a scattered list.
    ASSERT_LE(at + bytes, src.size());
    fragments.push_back(Fragment{reinterpret_cast<uintptr_t>(src.data() + at),
                                 reinterpret_cast<uintptr_t>(dst.data() + dst.size() - at - bytes),
                                 bytes});
    at += 2 * bytes;
  }
  for (int threads : {1, 2, 3, 16}) {
    std::fill(dst.begin(), dst.end(), std::byte{0});
    EXPECT_GE(CopyFragmentsInParallel(fragments, threads), 0.0);
    for (const Fragment& f : fragments) {
      EXPECT_EQ(std::memcmp(reinterpret_cast<const void*>(f.dst),
                            reinterpret_cast<const void*>(f.src), f.bytes),
                0)
          << threads << " threads, " << f.bytes << " bytes";
    }
  }
  EXPECT_GE(CopyFragmentsInParallel({}, 2), 0.0);
}

// With bounce_gather_mapped=0 the bounce writers gather into send slots
// and write each once: one write per (writer, receiver), 4 gen ranks x 2
// writers each, and fault injection reaches them.
TEST(BenchCommandTest, BounceWritesOncePerWriterWhenItDoesNotGatherIntoTheMappedSlot) {
  BenchFlags f = Small();
  f.paths = "per-block,bounce";
  f.config = {"bounce_gather_mapped=0"};
  std::ostringstream log;
  auto report = RunBench(f, log);
  ASSERT_TRUE(report.ok()) << report.status();
  const auto& runs = (*report)["runs"];
  ASSERT_EQ(runs.size(), 2u);
  EXPECT_GT(runs[0]["transport_writes"].get<uint64_t>(),
            runs[1]["transport_writes"].get<uint64_t>());
  EXPECT_EQ(runs[1]["transport_writes"], 6u * 4 * 2);
  EXPECT_EQ(runs[1]["mismatches"], 0);
  EXPECT_EQ(runs[1]["completed"], 6);
  EXPECT_EQ((*report)["fault_injection"]["paths_touched"],
            nlohmann::json::array({"per-block", "bounce"}));
  f.config = {};
  report = RunBench(f, log);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ((*report)["fault_injection"]["paths_touched"], nlohmann::json::array({"per-block"}));
}

// Three ctx instances feed the one gen instance, the requests dealt to them
// round-robin (7 requests: 3, 2 and 2). Each instance holds bytes of its own
// (tools/element.h), so zero mismatches means every request's KV came from
// the instance it was dealt to, on every path.
TEST(BenchCommandTest, SeveralCtxInstancesFeedOneGenInstance) {
  BenchFlags f = Small();
  f.ctx_instances = 3;
  f.requests = 7;
  std::ostringstream log;
  auto report = RunBench(f, log);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ((*report)["ctx_instances"], 3);
  const auto& runs = (*report)["runs"];
  ASSERT_EQ(runs.size(), 4u);
  const char* paths[] = {"per-block", "bounce", "direct", "auto"};
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto& r = runs[i];
    EXPECT_EQ(r["path"], paths[i]);
    EXPECT_EQ(r["requests"], 7);
    EXPECT_EQ(r["completed"], 7);
    EXPECT_EQ(r["failed"], 0);
    EXPECT_EQ(r["mismatches"], 0);
    EXPECT_EQ(r["arena_outstanding_bytes"], 0);
    // As with one instance: 4 layers x 2 x 4 heads x 91 tokens x 64 B per
    // request, all of it verified.
    EXPECT_EQ(r["bytes"], 7u * 4 * 2 * 4 * 91 * 64);
    EXPECT_GE(r["verified_bytes"].get<uint64_t>(), r["bytes"].get<uint64_t>());
  }
  EXPECT_EQ(runs[1]["transport_writes"], 0);
  std::string why;
  EXPECT_TRUE(BenchPassed(*report, &why)) << why;
  EXPECT_THAT(log.str(), HasSubstr("3 ctx instances (requests round-robin) -> 1 gen instance"));
  EXPECT_THAT(log.str(), HasSubstr("setting up 16 agents"));
  std::ostringstream table;
  PrintBenchTable(*report, table);
  EXPECT_THAT(table.str(), HasSubstr("3 ctx instances -> 1 gen instance"));

  // One instance is the default, and the report says so too.
  f.ctx_instances = 1;
  f.requests = 1;
  f.paths = "direct";
  report = RunBench(f, log);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ((*report)["ctx_instances"], 1);
  EXPECT_EQ(BenchFlags().ctx_instances, 1);
}

TEST(BenchCommandTest, CtxInstancesOutsideTheRangeAreRefused) {
  std::ostringstream log;
  for (int bad : {0, 17, -1}) {
    BenchFlags f = Small();
    f.ctx_instances = bad;
    auto report = RunBench(f, log);
    EXPECT_EQ(report.status().code(), StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(std::string(report.status().message()),
                HasSubstr("--ctx-instances = " + std::to_string(bad) + " is invalid"));
  }
  EXPECT_THAT(log.str(), ::testing::Not(HasSubstr("setting up")));
  // The multi-process runner and chaos mode run one ctx instance: refused,
  // naming the flag and what refuses it, in any build.
  for (const char* transport : {"ucx", "cuda-ipc"}) {
    BenchFlags f = Small();
    f.ctx_instances = 2;
    f.transport = transport;
    auto report = RunBench(f, log);
    EXPECT_EQ(report.status().code(), StatusCode::kUnimplemented);
    EXPECT_THAT(std::string(report.status().message()),
                HasSubstr("--ctx-instances 2: --transport " + std::string(transport)));
  }
  BenchFlags f = Small();
  f.ctx_instances = 2;
  f.chaos = true;
  auto report = RunBench(f, log);
  EXPECT_EQ(report.status().code(), StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(report.status().message()), HasSubstr("--ctx-instances 2: --chaos"));
  // The memory check counts every instance's pools.
  f = Small();
  f.ctx_instances = 3;
  f.scenario.memory_cap_bytes = 64 * 1024;
  report = RunBench(f, log);
  EXPECT_EQ(report.status().code(), StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(report.status().message()), HasSubstr("pools of 16 ranks"));
}

TEST(BenchCommandTest, InjectedFaultsFailRequestsButNotTheBench) {
  BenchFlags f = Small();
  f.paths = "per-block,bounce,direct";
  f.requests = 20;
  f.inject_fail_rate = 0.05;
  // Bounce writes through the transport only when it does not gather
  // straight into the mapped recv slot (the loopback default).
  f.config = {"bounce_gather_mapped=0"};
  std::ostringstream log;
  auto report = RunBench(f, log);
  ASSERT_TRUE(report.ok()) << report.status();
  uint64_t injected = 0, failed = 0;
  for (const auto& r : (*report)["runs"]) {
    EXPECT_EQ(r["completed"].get<int>() + r["failed"].get<int>(), 20);
    EXPECT_EQ(r["unexplained_failures"], 0);
    // Requests and operations are counted apart: every failed request here
    // failed by injection, and each needed at least one injected operation.
    EXPECT_EQ(r["requests_failed_by_injection"], r["failed"]);
    EXPECT_GE(r["injected_write_failures"].get<uint64_t>(),
              r["requests_failed_by_injection"].get<uint64_t>());
    EXPECT_GE(r["injected_write_failures"].get<uint64_t>(),
              r["injected_failed_batches"].get<uint64_t>());
    if (r["path"] == "direct") {
      // Direct copies without the transport: the injector never acts.
      EXPECT_EQ(r["fault_injection_applies"], false);
      EXPECT_EQ(r["injected_write_failures"], 0);
      EXPECT_EQ(r["failed"], 0);
    } else {
      EXPECT_EQ(r["fault_injection_applies"], true);
      injected += r["injected_write_failures"].get<uint64_t>();
      failed += r["failed"].get<uint64_t>();
    }
  }
  EXPECT_GT(injected, 0u);
  EXPECT_GT(failed, 0u);
  const auto& fi = (*report)["fault_injection"];
  EXPECT_EQ(fi["write_fail_rate"], 0.05);
  EXPECT_EQ(fi["acts_on"], "transport write operations");
  EXPECT_EQ(fi["paths_touched"], nlohmann::json::array({"per-block", "bounce"}));
  EXPECT_EQ(fi["paths_untouched"], nlohmann::json::array({"direct"}));
  EXPECT_THAT(log.str(), HasSubstr("touches per-block and bounce"));
  EXPECT_THAT(log.str(), HasSubstr("direct: done (no transport writes: fault injection did not "
                                   "apply)"));
  std::string why;
  EXPECT_TRUE(BenchPassed(*report, &why)) << why;

  // Gathering into the mapped slot, bounce writes nothing: the injector
  // does not reach it, and the report says so.
  f.config = {};
  f.paths = "bounce";
  std::ostringstream mapped_log;
  report = RunBench(f, mapped_log);
  ASSERT_TRUE(report.ok()) << report.status();
  const auto& run = (*report)["runs"][0];
  EXPECT_EQ(run["fault_injection_applies"], false);
  EXPECT_EQ(run["failed"], 0);
  EXPECT_EQ((*report)["fault_injection"]["paths_untouched"], nlohmann::json::array({"bounce"}));
  EXPECT_THAT(mapped_log.str(), HasSubstr("not bounce (it gathers straight into the mapped recv "
                                          "slot; --config bounce_gather_mapped=0 writes instead)"));
  EXPECT_THAT(mapped_log.str(), HasSubstr("bounce: done (no transport writes"));
}

TEST(BenchCommandTest, WarmupRequestsAreVerifiedButLeftOutOfTheFigures) {
  BenchFlags f = Small();
  f.paths = "direct,bounce";
  f.warmup = 4;
  std::ostringstream log;
  auto report = RunBench(f, log);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_THAT(log.str(), HasSubstr("6 requests per path (after 4 to warm up)"));
  const uint64_t request_bytes = 4u * 2 * 4 * 91 * 64;
  for (const auto& r : (*report)["runs"]) {
    // The figures are the measured run's alone.
    EXPECT_EQ(r["requests"], 6);
    EXPECT_EQ(r["completed"], 6);
    EXPECT_EQ(r["bytes"], 6 * request_bytes);
    ASSERT_TRUE(r.contains("warmup")) << r.dump();
    const auto& w = r["warmup"];
    EXPECT_EQ(w["requests"], 4);
    EXPECT_EQ(w["completed"], 4);
    EXPECT_EQ(w["failed"], 0);
    EXPECT_EQ(w["mismatches"], 0);
    EXPECT_GE(w["verified_bytes"].get<uint64_t>(), 4 * request_bytes);
  }
  std::string why;
  EXPECT_TRUE(BenchPassed(*report, &why)) << why;
  // A warm-up that delivered wrong bytes fails the bench like a run would.
  nlohmann::json bad = *report;
  bad["runs"][0]["warmup"]["mismatches"] = 3;
  EXPECT_FALSE(BenchPassed(bad, &why));
  EXPECT_THAT(why, HasSubstr("direct warm-up: 3 mismatched rows"));
  bad = *report;
  bad["runs"][1]["warmup"]["unexplained_failures"] = 1;
  bad["runs"][1]["warmup"]["first_unexplained_failure"] = "INTERNAL: lost";
  EXPECT_FALSE(BenchPassed(bad, &why));
  EXPECT_THAT(why, HasSubstr("bounce warm-up: 1 requests failed without an injected fault "
                             "(INTERNAL: lost)"));
  // Without --warmup the report has no warm-up.
  f.warmup = 0;
  report = RunBench(f, log);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_FALSE((*report)["runs"][0].contains("warmup"));
}

TEST(BenchCommandTest, BounceSizeZeroTurnsTheBouncePathOff) {
  BenchFlags f = Small();
  f.requests = 2;
  f.bounce_size_mb = 0;
  std::ostringstream log;
  auto report = RunBench(f, log);
  ASSERT_TRUE(report.ok()) << report.status();
  std::vector<std::string> paths;
  for (const auto& r : (*report)["runs"]) paths.push_back(r["path"]);
  EXPECT_EQ(paths, (std::vector<std::string>{"per-block", "direct", "auto"}));
  EXPECT_EQ((*report)["bounce_size_mb"]["ctx"], 0);
  EXPECT_EQ((*report)["bounce_size_mb"]["gen"], 0);
  EXPECT_THAT(log.str(), HasSubstr("bounce path off (--bounce-size-mb 0): not run"));
  EXPECT_THAT(log.str(), HasSubstr("arenas off"));

  // auto with the arena off is fine: it just never picks bounce.
  f.paths = "auto";
  EXPECT_TRUE(RunBench(f, log).ok());
  // Naming bounce with the arena off is an error, alone or in a list.
  for (const char* p : {"bounce", "per-block,bounce"}) {
    f.paths = p;
    auto bad = RunBench(f, log);
    EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(bad.status().message()),
                HasSubstr("--path bounce needs --bounce-size-mb > 0"));
  }
}

TEST(BenchCommandTest, BounceSizeDefaultsToEnoughForTheConcurrency) {
  BenchFlags f = Small();
  f.requests = 2;
  f.paths = "bounce";
  std::ostringstream log;
  auto report = RunBench(f, log);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_GT((*report)["bounce_size_mb"]["ctx"].get<int64_t>(), 0);
  EXPECT_GT((*report)["bounce_size_mb"]["gen"].get<int64_t>(), 0);
  f.bounce_size_mb = 3;
  report = RunBench(f, log);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ((*report)["bounce_size_mb"]["gen"], 3);
}

// A send arena smaller than a writer's stream (8 MiB against 1 MiB): the
// writers stream through it, one write per chunk of 256 KiB, every byte
// verified.
TEST(BenchCommandTest, ASendArenaSmallerThanTheStreamIsStreamedThrough) {
  BenchFlags f;
  f.scenario.layers = 8;
  f.scenario.kv_heads = 8;
  f.scenario.head_dim = 128;
  f.scenario.tokens = 256;
  f.scenario.ctx = "tp=1";
  f.scenario.gen = "tp=1";
  f.requests = 2;
  f.concurrency = 1;
  f.paths = "bounce";
  f.send_arena_mb = 1;
  f.config = {"bounce_gather_mapped=0"};  // through the send arena, not the mapped slot
  std::ostringstream log;
  auto report = RunBench(f, log);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ((*report)["bounce_size_mb"]["ctx"], 1);
  const nlohmann::json& run = (*report)["runs"][0];
  EXPECT_EQ(run["completed"], 2);
  EXPECT_EQ(run["mismatches"], 0);
  EXPECT_EQ(run["transport_writes"], 2 * 32);
  EXPECT_EQ(run["arena_outstanding_bytes"], 0);
  for (int64_t bad : {int64_t{0}, int64_t{-3}, Config::kMaxBounceSizeMb + 1}) {
    f.send_arena_mb = bad;
    auto refused = RunBench(f, log);
    EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(refused.status().message()),
                HasSubstr("--send-arena-mb = " + std::to_string(bad) + " is invalid"));
  }
}

TEST(BenchCommandTest, TheMemoryCapIsCheckedBeforeAnythingIsAllocated) {
  BenchFlags f = Small();
  f.scenario.memory_cap_bytes = 64 * 1024;  // less than the pools
  std::ostringstream log;
  auto report = RunBench(f, log);
  EXPECT_EQ(report.status().code(), StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(report.status().message()),
              HasSubstr("more than the 64.00 KiB memory cap"));
  EXPECT_THAT(std::string(report.status().message()), HasSubstr("pools of 8 ranks"));
  EXPECT_THAT(log.str(), ::testing::Not(HasSubstr("setting up")));
  f.scenario.memory_cap_bytes = uint64_t{1} << 30;
  f.requests = 1;
  EXPECT_TRUE(RunBench(f, log).ok());
}

TEST(BenchCommandTest, TheJsonPathIsCheckedBeforeTheRunAndLeftAsItWas) {
  BenchFlags f = Small();
  f.json_file = "/nonexistent-kvbounce-dir/x.json";
  std::ostringstream log;
  auto report = RunBench(f, log);
  EXPECT_EQ(report.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(report.status().message()), HasSubstr("cannot write"));
  EXPECT_THAT(log.str(), ::testing::Not(HasSubstr("setting up")));
  // A writable path passes, and the check leaves no file behind (the CLI
  // writes the report after the run).
  f.json_file = ::testing::TempDir() + "/kvbounce_bench_json_check.json";
  std::remove(f.json_file.c_str());
  f.requests = 1;
  f.paths = "direct";
  EXPECT_TRUE(RunBench(f, log).ok());
  EXPECT_FALSE(std::ifstream(f.json_file).good());
}

TEST(BenchCommandTest, ReportsThatFailTheBench) {
  nlohmann::json report = {{"runs", nlohmann::json::array()}};
  nlohmann::json run = {{"path", "bounce"},
                        {"mismatches", 0},
                        {"arena_outstanding_bytes", 0},
                        {"unexplained_failures", 0}};
  report["runs"].push_back(run);
  std::string why;
  EXPECT_TRUE(BenchPassed(report, &why));
  report["runs"][0]["mismatches"] = 3;
  EXPECT_FALSE(BenchPassed(report, &why));
  EXPECT_THAT(why, HasSubstr("3 mismatched"));
  report["runs"][0]["mismatches"] = 0;
  report["runs"][0]["arena_outstanding_bytes"] = 256;
  EXPECT_FALSE(BenchPassed(report, &why));
  EXPECT_THAT(why, HasSubstr("256 arena bytes"));
  report["runs"][0]["arena_outstanding_bytes"] = 0;
  report["runs"][0]["unexplained_failures"] = 1;
  report["runs"][0]["first_unexplained_failure"] = "DEADLINE_EXCEEDED: x";
  EXPECT_FALSE(BenchPassed(report, &why));
  EXPECT_THAT(why, HasSubstr("without an injected fault"));
}

// --gpus: one device per rank's worker process, ctx ranks first; the shape
// of the list is checked before the devices, whose absence is named too.
TEST(BenchCommandTest, GpusPlaceEachRankAndBadListsAreNamed) {
  std::ostringstream log;
  auto error = [&](BenchFlags f) { return std::string(RunBench(f, log).status().message()); };
  BenchFlags f = Small();  // 4 ctx ranks, 4 gen ranks (tp=2, pp=2)
  f.gpus = {0, 0, 0, 0, 0, 0, 0, 0};
  EXPECT_THAT(error(f), HasSubstr("--gpus applies to --memory cuda only"));
  f.memory = "cuda";
  EXPECT_THAT(error(f), HasSubstr("--gpus places every rank's worker process"));
  EXPECT_THAT(error(f), HasSubstr("needs --transport cuda-ipc"));
  f.transport = "cuda-ipc";
  f.device = 1;
  EXPECT_THAT(error(f), HasSubstr("--gpus and --device 1: give one of the two"));
  f.device = 0;
  f.gpus = {0, 1, 2};
  EXPECT_THAT(error(f), HasSubstr("--gpus lists 3 devices: it needs one per rank, 8 (ctx ranks "
                                  "first: 4 ctx, then 4 gen)"));
  f.gpus = {0, 1, 2, 3, -1, 5, 6, 7};
  EXPECT_THAT(error(f), HasSubstr("--gpus entry 4 = -1 is not a device ordinal"));
  f.gpus = {0, 0, 0, 0, 0, 0, 0, 99};
  if (CudaSupport() == nullptr || CudaSupport()->DeviceCount() == 0) {
    EXPECT_THAT(error(f), HasSubstr("--gpus entry 0"));  // no device at all
  } else {
    EXPECT_THAT(error(f), HasSubstr("--gpus entry 7"));  // not 99 of them
  }

  auto scenario = BuildScenario(f.scenario);
  ASSERT_TRUE(scenario.ok()) << scenario.status();
  f.gpus = {10, 11, 12, 13, 20, 21, 22, 23};
  EXPECT_EQ(RankDevice(f, *scenario, /*ctx=*/true, 0), 10);
  EXPECT_EQ(RankDevice(f, *scenario, /*ctx=*/true, 3), 13);
  EXPECT_EQ(RankDevice(f, *scenario, /*ctx=*/false, 0), 20);
  EXPECT_EQ(RankDevice(f, *scenario, /*ctx=*/false, 3), 23);
  f.gpus.clear();
  f.device = 2;
  EXPECT_EQ(RankDevice(f, *scenario, /*ctx=*/false, 1), 2);
}

TEST(BenchCommandTest, BadFlagsNameWhatIsWrong) {
  std::ostringstream log;
  auto error = [&](BenchFlags f) { return std::string(RunBench(f, log).status().message()); };
  BenchFlags f = Small();
  f.transport = "carrier-pigeon";
  EXPECT_THAT(error(f), HasSubstr("--transport carrier-pigeon"));
  f = Small();
  f.memory = "cuda";  // this machine has no usable device, or no CUDA build
  if (CudaSupport() == nullptr || CudaSupport()->DeviceCount() == 0) {
    EXPECT_THAT(error(f), HasSubstr("--memory cuda"));
  }
  f = Small();
  f.memory = "hbm";
  EXPECT_THAT(error(f), HasSubstr("--memory hbm: unknown memory"));
  f = Small();
  f.device = 1;
  EXPECT_THAT(error(f), HasSubstr("--device applies to --memory cuda only"));
  f = Small();
  f.paths = "bounce,teleport";
  EXPECT_THAT(error(f), HasSubstr("--path"));
  f = Small();
  f.requests = 0;
  EXPECT_THAT(error(f), HasSubstr("--requests = 0"));
  f = Small();
  f.warmup = -1;
  EXPECT_THAT(error(f), HasSubstr("--warmup = -1 is invalid"));
  f = Small();
  f.warmup = 2;
  f.chaos = true;
  EXPECT_THAT(error(f), HasSubstr("--warmup: --chaos"));
  if (UcxTransportAvailable()) {
    f = Small();
    f.warmup = 2;
    f.transport = "ucx";
    EXPECT_THAT(error(f), HasSubstr("--warmup: --transport ucx runs its requests in worker"));
  }
  f = Small();
  f.concurrency = -1;
  EXPECT_THAT(error(f), HasSubstr("--concurrency = -1"));
  f = Small();
  f.inject_fail_rate = 1.5;
  EXPECT_THAT(error(f), HasSubstr("--inject-fail-rate"));
  f = Small();
  f.bounce_size_mb = 0;
  f.paths = "bounce";
  EXPECT_THAT(error(f), HasSubstr("--bounce-size-mb > 0"));
  for (int64_t bad : {int64_t{-1}, int64_t{-2}, -(int64_t{1} << 40)}) {
    f = Small();
    f.bounce_size_mb = bad;
    EXPECT_THAT(error(f), HasSubstr("--bounce-size-mb = " + std::to_string(bad) + " is invalid"));
  }
  f = Small();
  f.concurrency = kMaxConcurrency + 1;
  EXPECT_THAT(error(f), HasSubstr("--concurrency"));
  f = Small();
  f.scenario.ctx = "tp=128";
  EXPECT_THAT(error(f), HasSubstr("at most 64 ranks"));
  f = Small();
  f.scenario.ctx = "tp=3";
  EXPECT_THAT(error(f), HasSubstr("--ctx"));
}

}  // namespace
}  // namespace kvbounce::tools
