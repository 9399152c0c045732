// MetricsServer: concurrent scrapes over loopback HTTP of a live Metrics
// that other threads record into (every answer valid exposition text, no
// counter going down), 404 elsewhere, a render error as 500, a port in use
// refused, and the server thread stopped and joined by the destructor while
// clients still scrape.
#include "tools/metrics_server.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <httplib.h>

#include <atomic>
#include <nlohmann/json.hpp>
#include <thread>

#include "common/prometheus_text.h"
#include "common/status_matchers.h"
#include "kvbounce/prometheus.h"
#include "session/metrics.h"

// Debian's libcpp-httplib is not built with ThreadSanitizer: its inline
// fast paths (a function-local static's guard check, its own atomics) are
// invisible to TSan, which then reports the library's worker threads as
// racing on memory another worker initialised. Reports whose accesses come
// from inside that library are suppressed; kvbounce's own code (the handler,
// the render callback, Metrics) stays checked.
#if defined(__SANITIZE_THREAD__)
extern "C" const char* __tsan_default_suppressions() {
  return "called_from_lib:libcpp-httplib.so\n";
}
#endif

namespace kvbounce::tools {
namespace {

using testing_util::ParsePrometheusText;
using testing_util::StatusIs;

Result<std::string> RenderOf(const Metrics& m) {
  nlohmann::json j = ToJson(m.Snapshot());
  j["transport"] = {{"write_ops", 0}, {"write_bytes", 0},   {"failed_write_ops", 0},
                    {"flushes", 0},   {"messages_sent", 0}, {"messages_received", 0}};
  PrometheusTarget t;
  t.labels = {{"rank", "0"}};
  t.stats.json = j.dump();
  return RenderPrometheus({&t, 1});
}

TEST(MetricsServerTest, ConcurrentScrapesWhileRecording) {
  Metrics m;
  auto server = MetricsServer::Create("127.0.0.1", 0, [&m] { return RenderOf(m); });
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();
  ASSERT_GT(port, 0);

  std::atomic<bool> stop{false};
  std::jthread recorder([&] {
    uint64_t i = 0;
    while (!stop.load()) {
      RequestRecord r;
      r.side = Side::kReceiver;
      r.path_taken = static_cast<TransferPath>(i % 3);
      r.bytes = 4096 * (i % 5 + 1);
      r.timeline.request = std::chrono::steady_clock::now();
      r.timeline.complete = r.timeline.request + std::chrono::microseconds(i % 700);
      m.Record(r);
      ++i;
    }
  });
  std::atomic<int> bad{0}, ok{0};
  {
    std::vector<std::jthread> clients;
    for (int t = 0; t < 4; ++t) {
      clients.emplace_back([&] {
        httplib::Client c("127.0.0.1", port);
        double last = 0;
        for (int k = 0; k < 25; ++k) {
          auto res = c.Get("/metrics");
          std::string error;
          std::optional<testing_util::PromText> p;
          if (res && res->status == 200) p = ParsePrometheusText(res->body, &error);
          const double n = p ? p->Sum("kvbounce_requests_total").value_or(-1) : -1;
          if (!p || n < last) {
            ++bad;
          } else {
            ++ok;
          }
          last = n;
        }
      });
    }
  }
  stop.store(true);
  EXPECT_EQ(bad.load(), 0);
  EXPECT_EQ(ok.load(), 100);
  EXPECT_GE((*server)->requests(), 100u);

  httplib::Client c("127.0.0.1", port);
  auto res = c.Get("/other");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 404);

  // The port is taken now.
  EXPECT_THAT(
      MetricsServer::Create("127.0.0.1", port, [] { return Result<std::string>(""); }).status(),
      StatusIs(StatusCode::kUnavailable));
  EXPECT_THAT(
      MetricsServer::Create("127.0.0.1", 70000, [] { return Result<std::string>(""); }).status(),
      StatusIs(StatusCode::kInvalidArgument));
}

TEST(MetricsServerTest, RenderErrorsAre500AndTheDestructorJoinsUnderLoad) {
  std::atomic<bool> fail{false};
  auto server = MetricsServer::Create("127.0.0.1", 0, [&]() -> Result<std::string> {
    if (fail.load()) return InternalError("no stats");
    return std::string(
        "# HELP kvbounce_x_total x\n# TYPE kvbounce_x_total counter\nkvbounce_x_total 1\n");
  });
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();
  httplib::Client c("127.0.0.1", port);
  auto res = c.Get("/metrics");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  fail.store(true);
  res = c.Get("/metrics");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 500);
  EXPECT_THAT(res->body, ::testing::HasSubstr("no stats"));

  // Clients keep scraping while the server goes away: the destructor
  // returns (its thread joined), and later scrapes find nobody listening.
  std::atomic<bool> stop{false};
  std::vector<std::jthread> clients;
  for (int t = 0; t < 3; ++t) {
    clients.emplace_back([&] {
      httplib::Client cl("127.0.0.1", port);
      cl.set_connection_timeout(0, 200000);
      while (!stop.load()) cl.Get("/metrics");
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  server->reset();
  stop.store(true);
  clients.clear();
  EXPECT_FALSE(httplib::Client("127.0.0.1", port).Get("/metrics"));
}

}  // namespace
}  // namespace kvbounce::tools
