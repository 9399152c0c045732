// RenderPrometheus over Metrics snapshots: the text is valid exposition
// format, names follow the conventions, label values and help are escaped,
// the numbers are those recorded, histograms bucket correctly, counters only
// grow (also while other threads record), and bad labels or stats are
// refused with the reason.
#include "kvbounce/prometheus.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <nlohmann/json.hpp>
#include <thread>

#include "common/prometheus_text.h"
#include "common/status_matchers.h"
#include "session/metrics.h"

namespace kvbounce {
namespace {

using ::testing::HasSubstr;
using testing_util::ParsePrometheusText;
using testing_util::PromText;
using testing_util::StatusIs;

RequestRecord Completed(Side side, TransferPath path, uint64_t bytes,
                        std::chrono::nanoseconds latency) {
  RequestRecord r;
  r.side = side;
  r.path_requested = path;
  r.path_taken = path;
  r.bytes = bytes;
  r.fragments = 3;
  r.transport_writes = 2;
  r.outcome = Outcome::kCompleted;
  r.timeline.request = std::chrono::steady_clock::time_point(std::chrono::seconds(100));
  r.timeline.complete = r.timeline.request + latency;
  return r;
}

// AgentStats as Agent::Stats() builds them from a Metrics (the transport's
// counters given here).
AgentStats StatsOf(const Metrics& m, uint64_t write_ops = 7) {
  nlohmann::json j = ToJson(m.Snapshot());
  j["transport"] = {{"write_ops", write_ops}, {"write_bytes", 4096}, {"failed_write_ops", 1},
                    {"flushes", 2},           {"messages_sent", 3},  {"messages_received", 4}};
  AgentStats s;
  s.json = j.dump();
  s.arena_outstanding_bytes = 8192;
  s.arena_quarantined_bytes = 4096;
  s.arena_peak_bytes = 16384;
  s.grant_queue = 3;
  s.grant_queue_peak = 9;
  return s;
}

PromText Parse(const std::string& text) {
  std::string error;
  std::optional<PromText> p = ParsePrometheusText(text, &error);
  EXPECT_TRUE(p.has_value()) << error << "\n" << text;
  return p.value_or(PromText{});
}

std::string Render(const AgentStats& stats, std::vector<std::pair<std::string, std::string>> labels,
                   uint64_t capacity = 0) {
  std::vector<PrometheusTarget> t(1);
  t[0].labels = std::move(labels);
  t[0].stats = stats;
  t[0].arena_capacity_bytes = capacity;
  Result<std::string> text = RenderPrometheus(t);
  EXPECT_TRUE(text.ok()) << text.status();
  return text.ok() ? *text : std::string();
}

TEST(PrometheusTest, ValidTextWithTheRecordedNumbers) {
  Metrics m;
  m.Record(
      Completed(Side::kReceiver, TransferPath::kBounce, 1 << 20, std::chrono::milliseconds(3)));
  m.Record(
      Completed(Side::kReceiver, TransferPath::kBounce, 3 << 20, std::chrono::microseconds(40)));
  RequestRecord failed = Completed(Side::kReceiver, TransferPath::kPerBlock, 100, {});
  failed.outcome = Outcome::kFailed;
  failed.fallback_reason = "recv arena backpressure";
  m.Record(failed);
  m.Record(Completed(Side::kSender, TransferPath::kDirect, 5000, std::chrono::seconds(2)));
  m.Count(Counter::kCreditStallNs, 1'500'000'000);
  m.Count(Counter::kQuarantinedSlots, 2);

  const PromText p =
      Parse(Render(StatsOf(m), {{"role", "gen"}, {"instance_id", "gen0"}, {"rank", "1"}}, 1 << 24));
  EXPECT_EQ(p.types.at("kvbounce_requests_total"), "counter");
  EXPECT_EQ(p.types.at("kvbounce_request_duration_seconds"), "histogram");
  EXPECT_EQ(p.types.at("kvbounce_request_size_bytes"), "histogram");
  EXPECT_EQ(p.types.at("kvbounce_arena_outstanding_bytes"), "gauge");
  EXPECT_EQ(p.types.at("kvbounce_requests_in_flight"), "gauge");
  for (const auto& [name, type] : p.types) EXPECT_EQ(name.rfind("kvbounce_", 0), 0u) << name;

  const std::map<std::string, std::string> rx = {{"side", "receiver"}, {"role", "gen"}};
  auto with = [&](std::map<std::string, std::string> more) {
    more.insert(rx.begin(), rx.end());
    return more;
  };
  EXPECT_EQ(p.Sum("kvbounce_requests_total", with({{"path", "bounce"}, {"outcome", "completed"}})),
            2);
  EXPECT_EQ(p.Sum("kvbounce_requests_total", with({{"path", "per-block"}, {"outcome", "failed"}})),
            1);
  EXPECT_EQ(p.Sum("kvbounce_requests_total", with({{"outcome", "completed"}})), 2);
  EXPECT_EQ(p.Sum("kvbounce_payload_bytes_total", rx), 4 << 20);
  EXPECT_EQ(p.Sum("kvbounce_fallbacks_total", with({{"reason", "recv arena backpressure"}})), 1);
  EXPECT_EQ(p.Sum("kvbounce_request_writes_total", rx), 6);
  EXPECT_EQ(p.Sum("kvbounce_fragments_total", rx), 9);
  // 40 µs and 3 ms: one at or below 50 µs, both at or below 5 ms, none at
  // or below 25 µs; the sum in seconds.
  const auto bounce = with({{"path", "bounce"}});
  auto bucket = [&](const std::string& le) {
    auto l = bounce;
    l["le"] = le;
    return p.Sum("kvbounce_request_duration_seconds_bucket", l);
  };
  EXPECT_EQ(bucket("2.5e-05"), 0);
  EXPECT_EQ(bucket("5e-05"), 1);
  EXPECT_EQ(bucket("0.0025"), 1);
  EXPECT_EQ(bucket("0.005"), 2);
  EXPECT_EQ(bucket("+Inf"), 2);
  EXPECT_EQ(p.Sum("kvbounce_request_duration_seconds_count", bounce), 2);
  EXPECT_NEAR(*p.Sum("kvbounce_request_duration_seconds_sum", bounce), 0.00304, 1e-12);
  auto size_bucket = bounce;
  size_bucket["le"] = "1048576";
  EXPECT_EQ(p.Sum("kvbounce_request_size_bytes_bucket", size_bucket), 1);
  EXPECT_EQ(p.Sum("kvbounce_request_size_bytes_sum", bounce), 4 << 20);
  // No auto series while nothing took it.
  EXPECT_EQ(p.Sum("kvbounce_requests_total", {{"path", "auto"}}), std::nullopt);

  EXPECT_EQ(p.Sum("kvbounce_requests_total", {{"side", "sender"}, {"outcome", "completed"}}), 1);
  EXPECT_EQ(p.Sum("kvbounce_credit_stall_seconds_total"), 1.5);
  EXPECT_EQ(p.Sum("kvbounce_quarantined_slots_total"), 2);
  EXPECT_EQ(p.Sum("kvbounce_transport_write_operations_total"), 7);
  EXPECT_EQ(p.Sum("kvbounce_transport_failed_write_operations_total"), 1);
  EXPECT_EQ(p.Sum("kvbounce_arena_outstanding_bytes"), 8192);
  EXPECT_EQ(p.Sum("kvbounce_arena_quarantined_bytes"), 4096);
  EXPECT_EQ(p.Sum("kvbounce_arena_capacity_bytes"), 1 << 24);
  EXPECT_EQ(p.Sum("kvbounce_grant_queue_writers"), 3);
  EXPECT_EQ(p.Sum("kvbounce_grant_queue_peak_writers"), 9);
  EXPECT_EQ(p.types.at("kvbounce_grant_queue_writers"), "gauge");
  EXPECT_EQ(p.Sum("kvbounce_requests_in_flight"), 0);
}

TEST(PrometheusTest, LabelValuesAndReasonsAreEscaped) {
  Metrics m;
  RequestRecord r = Completed(Side::kSender, TransferPath::kPerBlock, 1, {});
  r.fallback_reason = "odd \"reason\"\nwith \\ backslash";
  m.Record(r);
  const std::string text = Render(StatsOf(m), {{"instance_id", "ctx\"0\"\n\\x"}});
  EXPECT_THAT(text, HasSubstr("instance_id=\"ctx\\\"0\\\"\\n\\\\x\""));
  EXPECT_THAT(text, HasSubstr("reason=\"odd \\\"reason\\\"\\nwith \\\\ backslash\""));
  const PromText p = Parse(text);
  EXPECT_EQ(p.Sum("kvbounce_fallbacks_total", {{"reason", "odd \"reason\"\nwith \\ backslash"},
                                               {"instance_id", "ctx\"0\"\n\\x"}}),
            1);
}

TEST(PrometheusTest, SeveralTargetsShareEachFamilyOnce) {
  Metrics a, b;
  a.Record(Completed(Side::kReceiver, TransferPath::kBounce, 10, std::chrono::milliseconds(1)));
  b.Record(Completed(Side::kReceiver, TransferPath::kBounce, 20, std::chrono::milliseconds(1)));
  std::vector<PrometheusTarget> t(2);
  t[0].labels = {{"rank", "0"}};
  t[0].stats = StatsOf(a);
  t[1].labels = {{"rank", "1"}};
  t[1].stats = StatsOf(b);
  Result<std::string> text = RenderPrometheus(t);
  ASSERT_TRUE(text.ok()) << text.status();
  const PromText p = Parse(*text);  // rejects a family split in two
  EXPECT_EQ(p.Sum("kvbounce_payload_bytes_total", {{"side", "receiver"}}), 30);
  EXPECT_EQ(p.Sum("kvbounce_payload_bytes_total", {{"side", "receiver"}, {"rank", "1"}}), 20);
}

TEST(PrometheusTest, BadLabelsAndStatsAreRefused) {
  Metrics m;
  const AgentStats ok = StatsOf(m);
  for (const auto& [name, why] :
       std::vector<std::pair<std::string, std::string>>{{"1rank", "invalid"},
                                                        {"__x", "invalid"},
                                                        {"a-b", "invalid"},
                                                        {"", "invalid"},
                                                        {"side", "reserved"},
                                                        {"le", "reserved"},
                                                        {"reason", "reserved"}}) {
    std::vector<PrometheusTarget> t(1);
    t[0].labels = {{name, "v"}};
    t[0].stats = ok;
    EXPECT_THAT(RenderPrometheus(t).status(),
                StatusIs(StatusCode::kInvalidArgument, HasSubstr(why)))
        << name;
  }
  std::vector<PrometheusTarget> t(1);
  t[0].labels = {{"rank", "0"}, {"rank", "1"}};
  t[0].stats = ok;
  EXPECT_THAT(RenderPrometheus(t).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("repeated")));
  t[0].labels = {};
  t[0].stats.json = "";
  EXPECT_THAT(RenderPrometheus(t).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("empty")));
  t[0].stats.json = "{\"sender\": 1}";
  EXPECT_THAT(RenderPrometheus(t).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("stats.json.sender")));
  t[0].stats.json = "not json";
  EXPECT_THAT(RenderPrometheus(t).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("not a JSON object")));
}

TEST(PrometheusTest, InFlightFollowsTrackedTransfers) {
  // A Transfer that settles when told to.
  class FakeTransfer : public Transfer {
   public:
    uint64_t request_id() const override { return 1; }
    Status Wait() override { return Status::Ok(); }
    bool WaitFor(std::chrono::nanoseconds) override { return true; }
    std::optional<Status> Poll() const override { return std::nullopt; }
    void Cancel() override {}
    void OnDone(std::function<void(const Status&)> done) override { done_ = std::move(done); }
    TransferInfo info() const override { return {}; }
    void Settle() { done_(Status::Ok()); }

   private:
    std::function<void(const Status&)> done_;
  };
  Metrics m;
  FakeTransfer a, b;
  m.TrackInFlight(Side::kReceiver, a);
  m.TrackInFlight(Side::kReceiver, b);
  EXPECT_EQ(
      Parse(Render(StatsOf(m), {})).Sum("kvbounce_requests_in_flight", {{"side", "receiver"}}), 2);
  a.Settle();
  EXPECT_EQ(
      Parse(Render(StatsOf(m), {})).Sum("kvbounce_requests_in_flight", {{"side", "receiver"}}), 1);
  b.Settle();
  EXPECT_EQ(Parse(Render(StatsOf(m), {})).Sum("kvbounce_requests_in_flight"), 0);
}

// Counters and histogram buckets never go down from one render to the next,
// while four threads record requests of every path and outcome.
TEST(PrometheusTest, CountersAreMonotoneUnderConcurrentRecording) {
  Metrics m;
  std::atomic<bool> stop{false};
  std::vector<std::jthread> writers;
  for (int w = 0; w < 4; ++w) {
    writers.emplace_back([&, w] {
      uint64_t i = 0;
      while (!stop.load()) {
        RequestRecord r =
            Completed(w % 2 ? Side::kSender : Side::kReceiver, static_cast<TransferPath>(i % 3),
                      1000 * (i % 17 + 1), std::chrono::microseconds(10 * (i % 50 + 1)));
        if (i % 5 == 0) r.outcome = Outcome::kFailed;
        if (i % 7 == 0) r.fallback_reason = "send arena backpressure";
        m.Record(r);
        m.Count(Counter::kChunksScattered);
        ++i;
      }
    });
  }
  std::map<std::string, double> last;
  for (int round = 0; round < 50; ++round) {
    const PromText p = Parse(Render(StatsOf(m), {{"rank", "0"}}));
    for (const auto& [key, value] : p.ByKey()) {
      if (key.find("_in_flight") != std::string::npos || key.find("arena") != std::string::npos)
        continue;
      auto it = last.find(key);
      if (it != last.end()) {
        EXPECT_GE(value, it->second) << key;
      }
      last[key] = value;
    }
  }
  stop.store(true);
  writers.clear();
  EXPECT_GT(last.size(), 50u);
}

}  // namespace
}  // namespace kvbounce
