// The cuda-ipc transport between processes of one host (docs/transports.md):
// `kvbounce bench --transport cuda-ipc --memory cuda` with every rank a
// `kvbounce worker` process, every path, every byte verified on the device;
// and the flags that cannot work. The transfer cases need a CUDA device and
// skip without one ("no CUDA device: ..."); the flag checks run everywhere.
//
// The workers run the kvbounce program named by $KVBOUNCE_BINARY, or the one
// this build made.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "bench_process.h"
#include "common/no_cuda_device.h"
#include "copy/device_support.h"
#include "tools/bench_command.h"

#ifndef KVBOUNCE_BINARY
#error "KVBOUNCE_BINARY must name the kvbounce executable"
#endif

namespace kvbounce::tools {
namespace {

using ::testing::HasSubstr;

std::string Binary() {
  const char* env = std::getenv("KVBOUNCE_BINARY");
  return env != nullptr && *env != '\0' ? env : KVBOUNCE_BINARY;
}

std::string NoDevice() { return testing_util::NoCudaDevice(); }

BenchFlags Flags(const char* ctx, const char* gen) {
  BenchFlags f;
  f.transport = "cuda-ipc";
  f.memory = "cuda";
  f.worker_executable = Binary();
  f.step_timeout_s = 60;
  f.scenario.layers = 4;
  f.scenario.kv_heads = 4;
  f.scenario.head_dim = 32;
  f.scenario.tokens = 96;
  f.scenario.start_token = 5;
  f.scenario.ctx = ctx;
  f.scenario.gen = gen;
  f.requests = 4;
  f.concurrency = 2;
  return f;
}

struct Shape {
  const char* name;
  const char* ctx;
  const char* gen;
};

class CudaIpcBenchTest : public ::testing::TestWithParam<Shape> {};

TEST_P(CudaIpcBenchTest, EveryPathMovesAndVerifiesEveryByte) {
  if (const std::string why = NoDevice(); !why.empty()) GTEST_SKIP() << why;
  std::ostringstream log;
  Result<nlohmann::json> report = RunBench(Flags(GetParam().ctx, GetParam().gen), log);
  ASSERT_TRUE(report.ok()) << report.status() << "\n" << log.str();
  std::string why;
  EXPECT_TRUE(BenchPassed(*report, &why)) << why << "\n" << log.str();
  const auto& runs = (*report)["runs"];
  std::vector<std::string> paths;
  for (const auto& r : runs) paths.push_back(r["path"]);
  // Direct too: the gen workers read the ctx workers' mapped pools.
  const std::vector<std::string> expected = {"per-block", "bounce", "direct", "auto"};
  EXPECT_EQ(paths, expected) << log.str();
  for (const auto& r : runs) {
    SCOPED_TRACE(r["path"].get<std::string>());
    EXPECT_EQ(r["transport"], "cuda-ipc");
    EXPECT_EQ(r["memory"], "cuda");
    EXPECT_EQ(r["completed"], 4);
    EXPECT_EQ(r["mismatches"], 0);
    EXPECT_EQ(r["arena_outstanding_bytes"], 0);
    // 4 layers x 2 x 4 heads x 91 tokens x 64 B per request, all gen ranks.
    EXPECT_EQ(r["bytes"], 4u * 4 * 2 * 4 * 91 * 64);
    EXPECT_GE(r["verified_bytes"].get<uint64_t>(), r["bytes"].get<uint64_t>());
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaIpcBenchTest,
                         ::testing::Values(Shape{"FanIn", "tp=2", "tp=1,layout=layer-major-nhd"},
                                           Shape{"FanOut", "tp=1", "tp=2"}),
                         [](const auto& p) { return std::string(p.param.name); });

// SIGKILL of a worker mid-run (tools/bench_process.h): the bench ends within
// its bound naming it, and every survivor settles what it held, returns
// every staging slot and quits cleanly; a killed writer's mapping of the
// survivors' memory is fenced by its exit.
class CudaIpcKillTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (const std::string why = NoDevice(); !why.empty()) GTEST_SKIP() << why;
  }
  const std::string args_ = "--transport cuda-ipc --memory cuda";
};

TEST_F(CudaIpcKillTest, AKilledCtxWorkerEndsTheBenchNamingIt) {
  KillWorkerMidRun(Binary(), args_, "ctx rank 1", "per-block");
}

TEST_F(CudaIpcKillTest, AKilledGenWorkerMidBounceLeavesNoStagingBehind) {
  KillWorkerMidRun(Binary(), args_, "gen rank 1", "bounce");
}

TEST_F(CudaIpcKillTest, AKilledCtxWorkerMidDirectReadLeavesNoStagingBehind) {
  KillWorkerMidRun(Binary(), args_, "ctx rank 0", "direct");
}

TEST(CudaIpcFlagsTest, CudaIpcMovesDeviceMemoryOnly) {
  BenchFlags f = Flags("tp=1", "tp=1");
  f.memory = "host";
  std::ostringstream log;
  EXPECT_THAT(std::string(RunBench(f, log).status().message()),
              HasSubstr("--transport cuda-ipc moves device memory: it needs --memory cuda"));
  f = Flags("tp=1", "tp=1");
  f.ucx_tls = "tcp";
  if (NoDevice().empty()) {
    EXPECT_THAT(std::string(RunBench(f, log).status().message()),
                HasSubstr("--ucx-tls applies to --transport ucx only"));
  }
}

}  // namespace
}  // namespace kvbounce::tools
