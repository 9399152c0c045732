// Soak: thousands of requests of random sizes on random paths, from several
// threads at once, with random cancels and injected write failures. Every
// request must settle exactly once, every completed request must be exact,
// every failure must be explained by a fault or a cancel, and every staging
// byte must come back. Bounded in time: it stops issuing at kMaxRequests or
// after kBudget, whichever comes first.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "common/status_matchers.h"
#include "tools/cluster.h"

namespace kvbounce {
namespace {

using testing_util::IsOk;
using tools::BlockTables;
using tools::Cluster;
using tools::ClusterOptions;
using Clock = std::chrono::steady_clock;

constexpr int kThreads = 6;
constexpr int kMaxRequests = 3000;
constexpr auto kBudget = std::chrono::seconds(20);
constexpr int64_t kMaxTokens = 200;

TEST(SoakTest, RandomRequestsCancelsAndFaults) {
  ClusterOptions o;
  const ModelShape model = *CustomModel(4, 4, 16, false);
  o.ctx = {model, DType::kBf16, 4, 1, {}, LayoutKind::kBlockMajorHnd, 16};
  o.gen = {model, DType::kBf16, 2, 1, {}, LayoutKind::kLayerMajorNhd, 8};
  o.slots = kThreads;
  o.max_tokens = kMaxTokens;
  o.faults = true;
  o.ctx_faults.write_fail_rate = 0.003;
  o.ctx_faults.seed = 42;
  o.ctx_config.bounce_size_mb = 1;
  o.ctx_config.reserve_timeout_ms = 5;
  o.gen_config.bounce_size_mb = 1;
  o.gen_config.reserve_timeout_ms = 5;
  o.grace = std::chrono::milliseconds(100);
  auto created = Cluster::Create(o);
  ASSERT_THAT(created, IsOk());
  Cluster& c = **created;

  std::atomic<uint64_t> next_id{1};
  std::atomic<int> issued{0}, completed{0}, failed{0}, cancelled{0}, double_settled{0};
  std::atomic<uint64_t> verified{0}, mismatches{0};
  std::mutex error_mu;
  std::vector<std::string> unexplained;
  const auto stop_at = Clock::now() + kBudget;

  auto worker = [&](int slot) {
    std::mt19937_64 rng(1000 + slot);
    while (Clock::now() < stop_at && issued.fetch_add(1) < kMaxRequests) {
      const uint64_t id = next_id.fetch_add(1);
      const int64_t tokens = 1 + static_cast<int64_t>(rng() % kMaxTokens);
      const int64_t start = rng() % 4 == 0 ? static_cast<int64_t>(rng() % tokens) : 0;
      const TransferPath paths[] = {TransferPath::kPerBlock, TransferPath::kBounce,
                                    TransferPath::kDirect, TransferPath::kAuto};
      PullOptions pull;
      pull.path = paths[rng() % 4];
      c.ClearGen(slot);
      const BlockTables tables = c.Tables(slot, tokens, rng);
      std::vector<std::shared_ptr<Transfer>> pubs, pulls;
      std::vector<std::shared_ptr<std::atomic<int>>> settles;
      for (int r = 0; r < c.num_ctx(); ++r) {
        auto p = c.ctx(r).Publish(id, tables.ctx, tokens);
        ASSERT_THAT(p, IsOk());
        pubs.push_back(*p);
      }
      for (int g = 0; g < c.num_gen(); ++g) {
        auto p = c.gen(g).Pull(id, "ctx0", tables.gen, {start, tokens}, pull);
        ASSERT_THAT(p, IsOk());
        auto count = std::make_shared<std::atomic<int>>(0);
        (*p)->OnDone([count](const Status&) { count->fetch_add(1); });
        settles.push_back(count);
        pulls.push_back(*p);
      }
      if (rng() % 10 == 0) {
        std::this_thread::sleep_for(std::chrono::microseconds(rng() % 500));
        pulls[rng() % pulls.size()]->Cancel();
      }
      for (size_t g = 0; g < pulls.size(); ++g) {
        const Status s = pulls[g]->Wait();
        if (s.ok()) {
          ++completed;
          const tools::VerifyResult v = c.VerifyGen(static_cast<int>(g), tables, {start, tokens});
          verified += v.verified_bytes;
          mismatches += v.mismatches;
          if (v.mismatches != 0) {
            std::lock_guard<std::mutex> lock(error_mu);
            unexplained.push_back("request " + std::to_string(id) + ": " + v.first_mismatch);
          }
        } else if (s.code() == StatusCode::kCancelled) {
          ++cancelled;
        } else {
          ++failed;
          if (std::string(s.message()).find("injected") == std::string::npos) {
            std::lock_guard<std::mutex> lock(error_mu);
            unexplained.push_back("request " + std::to_string(id) + ": " + s.ToString());
          }
        }
      }
      for (auto& p : pubs) {
        if (!p->WaitFor(std::chrono::milliseconds(0))) p->Cancel();
        p->Wait().IgnoreError();
      }
      for (auto& count : settles) {
        if (count->load() != 1) ++double_settled;
      }
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
  for (auto& t : threads) t.join();

  const int pulls = completed + failed + cancelled;
  EXPECT_GE(pulls, 200) << "the soak ran too few requests to mean anything";
  EXPECT_EQ(double_settled.load(), 0);
  EXPECT_EQ(mismatches.load(), 0u);
  EXPECT_TRUE(unexplained.empty()) << unexplained.front();
  EXPECT_GT(completed.load(), pulls / 2);
  EXPECT_GT(verified.load(), 0u);

  // Every staging byte comes back once the last writers stopped.
  const auto deadline = Clock::now() + std::chrono::seconds(5);
  uint64_t outstanding = 0;
  do {
    outstanding = 0;
    for (int r = 0; r < c.num_ctx(); ++r) outstanding += c.ctx(r).Stats().arena_outstanding_bytes;
    for (int r = 0; r < c.num_gen(); ++r) outstanding += c.gen(r).Stats().arena_outstanding_bytes;
  } while (outstanding != 0 && Clock::now() < deadline);
  EXPECT_EQ(outstanding, 0u);

  uint64_t gen_settled = 0;
  for (int g = 0; g < c.num_gen(); ++g) {
    const AgentStats s = c.gen(g).Stats();
    gen_settled +=
        s.requests_completed + s.requests_failed + s.requests_cancelled + s.requests_timed_out;
  }
  EXPECT_EQ(gen_settled, static_cast<uint64_t>(pulls));
  std::printf(
      "soak: %d pulls, %d completed, %d failed (injected), %d cancelled, %llu bytes verified\n",
      pulls, completed.load(), failed.load(), cancelled.load(),
      static_cast<unsigned long long>(verified.load()));
}

}  // namespace
}  // namespace kvbounce
