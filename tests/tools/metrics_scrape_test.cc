// `kvbounce worker --metrics-port` as an operator scrapes it: a ctx and a gen
// worker process over UCX, driven over their command protocol as the bench
// drives them; four threads scrape the gen worker's endpoint over loopback
// HTTP all the while requests run. Every scrape is valid exposition text
// and no counter goes down; at the end the scraped counters equal what the
// bench's own accounting says (the workers' verified "done" replies) and
// the worker's "stats" reply. Skips without UCX.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <poll.h>

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "common/prometheus_text.h"
#include "kvbounce/transports.h"
#include "tools/subprocess.h"
#include "tools/worker_protocol.h"

namespace kvbounce::tools {
namespace {

using testing_util::ParsePrometheusText;
using testing_util::PromText;

constexpr const char* kShape[] = {"--layers", "2",        "--kv-heads",    "4",     "--head-dim",
                                  "32",       "--tokens", "256",           "--ctx", "tp=2",
                                  "--gen",    "tp=1",     "--concurrency", "4"};

std::unique_ptr<Child> StartWorker(const std::string& role, int rank, bool metrics) {
  Child::Options o;
  o.executable = KVBOUNCE_BINARY;
  o.args = {"worker", "--role", role, "--rank", std::to_string(rank)};
  for (const char* a : kShape) o.args.push_back(a);
  if (metrics) {
    o.args.push_back("--metrics-port");
    o.args.push_back("0");
  }
  o.env = {{"UCX_LOG_FILE", "stderr"}, {"UCX_TLS", "tcp"}};
  o.name = role + " rank " + std::to_string(rank);
  auto child = Child::Spawn(o);
  EXPECT_TRUE(child.ok()) << child.status();
  return child.ok() ? std::move(child).value() : nullptr;
}

std::string NextLine(Child& c, std::chrono::seconds bound = std::chrono::seconds(30)) {
  const auto deadline = std::chrono::steady_clock::now() + bound;
  while (std::chrono::steady_clock::now() < deadline) {
    if (std::optional<std::string> line = c.NextLine()) return *line;
    pollfd p{c.fd(), POLLIN, 0};
    if (c.eof() || (poll(&p, 1, 100) > 0 && !c.ReadSome())) return "";
  }
  return "";
}

// The next line that starts with `word` or "error", skipping others.
std::string Expect(Child& c, const std::string& word) {
  for (int i = 0; i < 100; ++i) {
    const std::string line = NextLine(c);
    if (line.empty() || line.rfind(word, 0) == 0 || line.rfind("error", 0) == 0) return line;
  }
  return "";
}

TEST(MetricsScrapeTest, ConcurrentScrapesDuringLoadMatchTheBenchAtTheEnd) {
  if (!UcxTransportAvailable()) GTEST_SKIP() << "this build has no UCX transport";
  std::vector<std::unique_ptr<Child>> ctx;
  std::vector<std::string> addresses;
  for (int r = 0; r < 2; ++r) {
    ctx.push_back(StartWorker("ctx", r, false));
    ASSERT_NE(ctx.back(), nullptr);
    const std::string ready = Expect(*ctx.back(), "ready ");
    ASSERT_FALSE(ready.empty()) << "ctx rank " << r << " did not start";
    addresses.push_back(ready.substr(6, ready.find(' ', 6) - 6));
  }
  std::unique_ptr<Child> gen = StartWorker("gen", 0, true);
  ASSERT_NE(gen, nullptr);
  const std::string metrics_line = NextLine(*gen);
  ASSERT_EQ(metrics_line.rfind("metrics 127.0.0.1:", 0), 0u) << metrics_line;
  const int port = std::stoi(metrics_line.substr(metrics_line.rfind(':') + 1));
  ASSERT_FALSE(Expect(*gen, "ready ").empty());
  ASSERT_TRUE(gen->Send("connect " + addresses[0] + " " + addresses[1]).ok());
  ASSERT_EQ(Expect(*gen, "connected ").rfind("connected 2", 0), 0u);

  std::atomic<bool> stop{false};
  std::atomic<int> scrapes{0}, bad{0};
  std::mutex mu;
  std::string first_bad;
  std::vector<std::jthread> scrapers;
  // Declared after them: an assertion that returns early stops the
  // scrapers before their threads are joined.
  struct StopOnExit {
    std::atomic<bool>& stop;
    ~StopOnExit() { stop.store(true); }
  } stop_on_exit{stop};
  for (int t = 0; t < 4; ++t) {
    scrapers.emplace_back([&] {
      httplib::Client client("127.0.0.1", port);
      std::map<std::string, double> last;
      while (!stop.load()) {
        auto res = client.Get("/metrics");
        std::string error;
        std::optional<PromText> p;
        if (res && res->status == 200) p = ParsePrometheusText(res->body, &error);
        if (!p) {
          std::lock_guard<std::mutex> lock(mu);
          if (bad++ == 0) first_bad = res ? std::to_string(res->status) + " " + error : "no answer";
          continue;
        }
        for (const auto& [key, value] : p->ByKey()) {
          auto it = last.find(key);
          const bool gauge = key.find("in_flight") != std::string::npos ||
                             key.find("_arena_outstanding") != std::string::npos ||
                             key.find("_arena_quarantined") != std::string::npos;
          if (!gauge && it != last.end() && value < it->second) {
            std::lock_guard<std::mutex> lock(mu);
            if (bad++ == 0) first_bad = key + " went down";
          }
          last[key] = value;
        }
        ++scrapes;
      }
    });
  }

  // The bench's own accounting: requests, bytes and paths from the
  // workers' "done" replies (each verified by the gen worker).
  // Over UCX's TCP transport the gen rank cannot read the ctx pools: no
  // direct path; auto picks one of the two.
  const char* paths[] = {"per-block", "bounce", "auto"};
  constexpr int kWaves = 6;
  int completed = 0;
  uint64_t bytes = 0, verified = 0;
  std::map<std::string, int> by_path;
  int scrapes_before_last_wave = 0;
  uint64_t id = 1;
  for (int wave = 0; wave < kWaves; ++wave) {
    if (wave == kWaves - 1) scrapes_before_last_wave = scrapes.load();
    const std::string path = paths[wave % 3];
    std::vector<uint64_t> ids;
    for (int slot = 0; slot < 4; ++slot, ++id) {
      for (auto& c : ctx) {
        ASSERT_TRUE(
            c->Send("publish " + std::to_string(id) + " " + std::to_string(slot) + " 256").ok());
      }
      ASSERT_TRUE(
          gen->Send("pull " + std::to_string(id) + " " + std::to_string(slot) + " 256 " + path)
              .ok());
      ids.push_back(id);
    }
    for (size_t i = 0; i < ids.size(); ++i) {
      const std::string line = Expect(*gen, "done ");
      Result<DoneReply> d = ParseDone(line);
      ASSERT_TRUE(d.ok()) << line;
      ASSERT_EQ(d->code, StatusCode::kOk) << line;
      ASSERT_EQ(d->mismatches, 0u) << line;
      ++completed;
      bytes += d->bytes;
      verified += d->verified_bytes;
      ++by_path[d->path_taken];
    }
    for (auto& c : ctx) {
      for (size_t i = 0; i < ids.size(); ++i) ASSERT_FALSE(Expect(*c, "done ").empty());
    }
  }
  stop.store(true);
  scrapers.clear();
  EXPECT_EQ(bad.load(), 0) << first_bad;
  EXPECT_GT(scrapes_before_last_wave, 0) << "no scrape while requests ran";

  // At the end: the scraped numbers are the bench's.
  httplib::Client client("127.0.0.1", port);
  auto res = client.Get("/metrics");
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200);
  EXPECT_THAT(res->get_header_value("Content-Type"), ::testing::HasSubstr("version=0.0.4"));
  std::string error;
  std::optional<PromText> p = ParsePrometheusText(res->body, &error);
  ASSERT_TRUE(p) << error;
  const std::map<std::string, std::string> rx = {
      {"side", "receiver"}, {"role", "gen"}, {"instance_id", "gen0"}, {"rank", "0"}};
  auto with = [&](std::map<std::string, std::string> more) {
    more.insert(rx.begin(), rx.end());
    return more;
  };
  EXPECT_EQ(p->Sum("kvbounce_requests_total", with({{"outcome", "completed"}})), completed);
  EXPECT_EQ(p->Sum("kvbounce_requests_total", rx), completed);
  EXPECT_EQ(p->Sum("kvbounce_payload_bytes_total", rx), static_cast<double>(bytes));
  EXPECT_EQ(verified, bytes);
  for (const auto& [path, n] : by_path) {
    EXPECT_EQ(p->Sum("kvbounce_requests_total", with({{"path", path}, {"outcome", "completed"}})),
              n)
        << path;
    EXPECT_EQ(p->Sum("kvbounce_request_duration_seconds_count", with({{"path", path}})), n) << path;
  }
  EXPECT_EQ(p->Sum("kvbounce_request_size_bytes_sum", rx), static_cast<double>(bytes));
  EXPECT_EQ(p->Sum("kvbounce_requests_in_flight", rx), 0);
  EXPECT_EQ(p->Sum("kvbounce_arena_outstanding_bytes"), 0);
  // ... and the worker's own stats.
  ASSERT_TRUE(gen->Send("stats").ok());
  const std::string stats_line = Expect(*gen, "stats ");
  const nlohmann::json stats = nlohmann::json::parse(stats_line.substr(6), nullptr, false);
  ASSERT_FALSE(stats.is_discarded()) << stats_line;
  EXPECT_EQ(p->Sum("kvbounce_transport_write_operations_total"),
            stats["transport_write_ops"].get<double>());
  EXPECT_EQ(p->Sum("kvbounce_requests_total", with({{"outcome", "completed"}})),
            stats["agent"]["receiver"]["requests"]["completed"].get<double>());
  EXPECT_EQ(p->Sum("kvbounce_payload_bytes_total", rx),
            stats["agent"]["receiver"]["bytes_completed"].get<double>());

  for (auto& c : ctx) ASSERT_TRUE(c->Send("quit").ok());
  ASSERT_TRUE(gen->Send("quit").ok());
  EXPECT_FALSE(Expect(*gen, "bye ").empty());
  EXPECT_TRUE(gen->Reap(std::chrono::steady_clock::now() + std::chrono::seconds(20)));
  EXPECT_EQ(gen->DescribeExit(), "exited with status 0");
  for (auto& c : ctx)
    EXPECT_TRUE(c->Reap(std::chrono::steady_clock::now() + std::chrono::seconds(20)));
}

}  // namespace
}  // namespace kvbounce::tools
