// Chaos mode: its checkers catch what they are there to catch (a write into a
// settled request's blocks, poison in an OK pull), a short run takes every
// kind of action and runs every check, and the report fails the bench on any
// violation. Whether the library passes is the business of the cli_bench_chaos
// CTest, not of these tests.
#include "tools/chaos.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <sstream>

#include "tools/bench_command.h"

namespace kvbounce::tools {
namespace {

using ::testing::HasSubstr;

InstanceSpec Spec(int tp, LayoutKind layout) {
  InstanceSpec s;
  s.model = CustomModel(2, 4, 16, false).value();
  s.tp = tp;
  s.layout = layout;
  s.tokens_per_block = 8;
  return s;
}

std::unique_ptr<Cluster> SmallCluster(int slots = 1) {
  ClusterOptions o;
  o.ctx = Spec(4, LayoutKind::kBlockMajorHnd);
  o.gen = Spec(2, LayoutKind::kLayerMajorNhd);
  o.slots = slots;
  o.max_tokens = 40;
  o.ctx_config.bounce_size_mb = 1;
  o.gen_config.bounce_size_mb = 1;
  // ChaosOptions::timeout: what the watchdog expects.
  o.ctx_config.transfer_timeout_ms = 2000;
  o.gen_config.transfer_timeout_ms = 2000;
  auto c = Cluster::Create(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? std::move(c).value() : nullptr;
}

TEST(SettleCheckerTest, ACanaryReportsAWriteIntoASettledRequestsBlocks) {
  auto c = SmallCluster();
  ASSERT_NE(c, nullptr);
  SettleChecker checker(*c);
  std::mt19937_64 rng(1);
  const BlockTables t = c->Tables(0, 40, rng);
  ASSERT_TRUE(c->RunRequest(1, t, {0, 40}).ok());
  for (int g = 0; g < c->num_gen(); ++g) {
    EXPECT_FALSE(checker.CheckOkPull(g, t, {0, 40}).violation);
    checker.WriteCanary(g, 0);
    EXPECT_EQ(checker.CheckCanary(g, 0), std::nullopt);
  }
  // A "late write" into one of the request's blocks on gen rank 1.
  std::vector<std::span<std::byte>> memory = c->SlotMemory(false, 1, 0);
  ASSERT_GE(memory.size(), 2u);  // layer-major: one range per (layer, k/v)
  memory[1][100] = std::byte{0x01};
  memory[1][101] = std::byte{0x02};
  EXPECT_EQ(checker.CheckCanary(0, 0), std::nullopt);
  const std::optional<std::string> bad = checker.CheckCanary(1, 0);
  ASSERT_TRUE(bad.has_value());
  EXPECT_THAT(*bad, HasSubstr("gen rank 1 slot 0: 2 bytes changed after the pull settled"));
  EXPECT_THAT(*bad, HasSubstr("region 1"));
  EXPECT_THAT(*bad, HasSubstr("holds 0x01 instead of the canary"));
}

TEST(SettleCheckerTest, PoisonInAnOkPullIsReported) {
  auto c = SmallCluster();
  ASSERT_NE(c, nullptr);
  SettleChecker checker(*c);
  std::mt19937_64 rng(2);
  // The publications "settled" and gave their blocks back: poison them; a
  // pull that then reads them and reports OK carries the poison.
  for (int k = 0; k < c->num_ctx(); ++k) checker.Poison(k, 0);
  BlockTables t = c->Tables(0, 40, rng);
  ASSERT_TRUE(c->RunRequest(1, t, {3, 40}).ok());
  SettleChecker::PullCheck check = checker.CheckOkPull(0, t, {3, 40});
  ASSERT_TRUE(check.violation.has_value());
  EXPECT_EQ(*check.violation, Violation::kOkPullPoisoned);
  EXPECT_THAT(check.detail, HasSubstr("poison of a settled publication arrived"));
  EXPECT_GT(check.verify.mismatches, 0u);

  // Refilled, the same request is clean again.
  for (int k = 0; k < c->num_ctx(); ++k) checker.Refill(k, 0);
  c->ClearGen(0);
  t = c->Tables(0, 40, rng);
  ASSERT_TRUE(c->RunRequest(2, t, {3, 40}).ok());
  check = checker.CheckOkPull(0, t, {3, 40});
  EXPECT_FALSE(check.violation.has_value()) << check.detail;

  // Wrong bytes that are not poison are a mismatch.
  c->SlotMemory(false, 0, 0)[0][7] ^= std::byte{0xff};
  check = checker.CheckOkPull(0, t, {3, 40});
  ASSERT_TRUE(check.violation.has_value());
  EXPECT_EQ(*check.violation, Violation::kOkPullMismatch);
}

TEST(ClusterTest, ARestartedRankServesRequestsOnTheSamePoolMemory) {
  auto c = SmallCluster();
  ASSERT_NE(c, nullptr);
  std::mt19937_64 rng(3);
  for (bool ctx_side : {true, false}) {
    RestartInfo info;
    ASSERT_TRUE(c->RestartRank(ctx_side, 1, &info).ok());
    EXPECT_NE(info.old_address, info.new_address);
    EXPECT_THAT(info.new_address, HasSubstr(".r1"));
    EXPECT_EQ(info.outstanding_after_shutdown, 0u);
    c->ClearGen(0);
    const BlockTables t = c->Tables(0, 40, rng);
    ASSERT_TRUE(c->RunRequest(ctx_side ? 10 : 11, t, {0, 40}).ok());
    for (int g = 0; g < c->num_gen(); ++g) EXPECT_EQ(c->VerifyGen(g, t, {0, 40}).mismatches, 0u);
  }
}

// Every action kind and every check, in a run of about two seconds.
TEST(ChaosTest, AShortRunTakesEveryActionAndRunsEveryCheck) {
  auto c = SmallCluster(4);
  ASSERT_NE(c, nullptr);
  ChaosOptions o;
  o.paths = {TransferPath::kPerBlock, TransferPath::kBounce, TransferPath::kDirect,
             TransferPath::kAuto};
  o.tokens = {0, 40};
  o.concurrency = 2;
  o.duration = std::chrono::milliseconds(2000);
  o.restart_interval = std::chrono::milliseconds(150);
  o.cancel_rate = o.pull_deadline_rate = o.publish_ttl_rate = o.retire_rate =
      o.cancel_publication_rate = 0.3;
  std::ostringstream log;
  const nlohmann::json j = RunChaos(*c, o, log);
  EXPECT_THAT(log.str(), HasSubstr("chaos: 2.0 s"));
  for (const char* action : {"pull_cancels", "pull_deadlines", "publish_ttls", "retires",
                             "publication_cancels", "ctx_restarts", "gen_restarts"}) {
    EXPECT_GT(j["actions"][action].get<uint64_t>(), 0u) << action;
  }
  for (const char* check :
       {"ok_pulls_verified", "verified_bytes", "canaries_written", "canary_checks",
        "final_canary_checks", "publications_poisoned", "ctx_refills", "watchdog_checks"}) {
    EXPECT_GT(j["checks"][check].get<uint64_t>(), 0u) << check;
  }
  EXPECT_GT(j["requests"].get<uint64_t>(), 0u);
  EXPECT_EQ(j["pulls"], j["requests"].get<uint64_t>() * 2);
  EXPECT_EQ(j["publications"], j["requests"].get<uint64_t>() * 4);
  EXPECT_GT(j["pull_outcomes"]["OK"].get<uint64_t>(), 0u);
  for (const char* path : {"per-block", "bounce", "direct", "auto"}) {
    EXPECT_GT(j["by_path"][path]["pulls"].get<uint64_t>(), 0u) << path;
  }
  // Every kind is reported, with its count (zero or not).
  for (const char* kind : {"write_after_settle", "ok_pull_poisoned", "ok_pull_mismatch", "hang",
                           "arena_not_drained", "unexplained_failure", "restart_failed"}) {
    EXPECT_TRUE(j["violations"].contains(kind)) << kind;
  }
  std::string why;
  EXPECT_EQ(ChaosViolations(j, &why), j["violations_total"].get<uint64_t>());
  std::ostringstream table;
  PrintChaosTable(j, table);
  EXPECT_THAT(table.str(), HasSubstr("actions taken"));
  EXPECT_THAT(table.str(), HasSubstr("pull outcomes"));
  EXPECT_THAT(table.str(), HasSubstr("write_after_settle"));
}

TEST(ChaosTest, TheBenchRunsChaosModeAndBoundsItByRequests) {
  BenchFlags f;
  f.scenario.layers = 2;
  f.scenario.kv_heads = 4;
  f.scenario.head_dim = 16;
  f.scenario.tokens = 48;
  f.scenario.tokens_per_block = 16;
  f.scenario.ctx = "tp=4";
  f.scenario.gen = "tp=2";
  f.chaos = true;
  f.chaos_seconds = 30;
  f.chaos_requests = 12;
  f.chaos_restart_ms = 0;
  f.bounce_size_mb = 0;  // the bounce path is off: chaos picks from the others
  std::ostringstream log;
  auto report = RunBench(f, log);
  ASSERT_TRUE(report.ok()) << report.status();
  const nlohmann::json& j = (*report)["chaos"];
  EXPECT_EQ(j["requests"], 12);
  EXPECT_LT(j["seconds"].get<double>(), 30);
  EXPECT_EQ(j["paths"], nlohmann::json::array({"per-block", "direct", "auto"}));
  EXPECT_EQ(j["actions"]["ctx_restarts"], 0);
  EXPECT_FALSE(j["by_path"].contains("bounce"));
  for (const char* key : {"injected_write_failures", "injected_failed_batches",
                          "requests_failed_by_injection", "arena_outstanding_bytes"}) {
    EXPECT_TRUE(j.contains(key)) << key;
  }
  EXPECT_TRUE((*report).contains("fault_injection"));
  EXPECT_FALSE((*report).contains("runs"));
}

TEST(ChaosTest, AnyViolationFailsTheBenchAndEachKindIsNamed) {
  nlohmann::json report;
  report["chaos"]["violations"] = {{"write_after_settle", 0}, {"ok_pull_poisoned", 0}, {"hang", 0}};
  report["chaos"]["violation_examples"] = nlohmann::json::object();
  std::string why;
  EXPECT_TRUE(BenchPassed(report, &why));
  report["chaos"]["violations"]["write_after_settle"] = 3;
  report["chaos"]["violation_examples"]["write_after_settle"] = "gen rank 0 slot 1: ...";
  report["chaos"]["violations"]["hang"] = 1;
  EXPECT_FALSE(BenchPassed(report, &why));
  EXPECT_THAT(why, HasSubstr("write_after_settle: 3 (first: gen rank 0 slot 1: ...)"));
  EXPECT_THAT(why, HasSubstr("hang: 1\n"));
  EXPECT_EQ(ChaosViolations(report["chaos"], nullptr), 4u);
}

}  // namespace
}  // namespace kvbounce::tools
