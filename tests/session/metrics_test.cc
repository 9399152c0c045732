#include "session/metrics.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/status_matchers.h"
#include "kvbounce/logging.h"

namespace kvbounce {
namespace {

using ::kvbounce::testing_util::IsOk;
using ::kvbounce::testing_util::StatusIs;
using std::chrono::microseconds;
using std::chrono::milliseconds;
using std::chrono::nanoseconds;
using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;

// The nearest-rank percentile of sorted values, as LatencyHistogram defines it.
int64_t ExactPercentile(const std::vector<int64_t>& sorted, double p) {
  if (p <= 0) return sorted.front();
  if (p >= 100) return sorted.back();
  const double wanted = std::ceil(p / 100.0 * static_cast<double>(sorted.size()));
  const size_t rank = std::clamp<size_t>(static_cast<size_t>(wanted), 1, sorted.size());
  return sorted[rank - 1];
}

// Checks the histogram's contract against the exact values.
void ExpectMatches(const LatencyHistogram& h, std::vector<int64_t> values) {
  std::sort(values.begin(), values.end());
  ASSERT_EQ(h.count(), values.size());
  EXPECT_EQ(h.min().count(), values.front());
  EXPECT_EQ(h.max().count(), values.back());
  double sum = 0;
  for (int64_t v : values) sum += static_cast<double>(v);
  EXPECT_NEAR(h.mean(), sum / static_cast<double>(values.size()), 1e-9 * sum);
  std::vector<double> ps = {0,    0.001, 0.1, 1,  5,  10,   25,    33.3, 50,
                            66.6, 75,    90,  95, 99, 99.9, 99.99, 100};
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> any_p(0.0, 100.0);
  for (int i = 0; i < 200; ++i) ps.push_back(any_p(rng));
  for (double p : ps) {
    const int64_t exact = ExactPercentile(values, p);
    const int64_t got = h.Percentile(p).count();
    EXPECT_GE(got, exact) << "p" << p;
    EXPECT_LE(static_cast<double>(got), static_cast<double>(exact) * 1.01) << "p" << p;
    if (exact < static_cast<int64_t>(LatencyHistogram::kSubBuckets)) {
      EXPECT_EQ(got, exact) << "p" << p;
    }
  }
}

// Log-uniform durations from 1 ns to about an hour.
std::vector<int64_t> RandomDurations(uint64_t seed, size_t n) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> log_ns(0.0, std::log(3.6e12));
  std::vector<int64_t> values;
  values.reserve(n);
  for (size_t i = 0; i < n; ++i) values.push_back(static_cast<int64_t>(std::exp(log_ns(rng))));
  return values;
}

TEST(LatencyHistogramTest, EmptyReportsZeros) {
  LatencyHistogram h;
  EXPECT_EQ(h.count(), 0u);
  EXPECT_EQ(h.min(), nanoseconds(0));
  EXPECT_EQ(h.max(), nanoseconds(0));
  EXPECT_EQ(h.mean(), 0.0);
  for (double p : {0.0, 50.0, 99.0, 100.0}) EXPECT_EQ(h.Percentile(p), nanoseconds(0));
}

TEST(LatencyHistogramTest, PercentilesWithinOnePercentOnRandomData) {
  const std::vector<int64_t> values = RandomDurations(1, 20000);
  LatencyHistogram h;
  for (int64_t v : values) h.Add(nanoseconds(v));
  ExpectMatches(h, values);
}

TEST(LatencyHistogramTest, PercentilesWithinOnePercentOnNarrowData) {
  // Millisecond latencies with a tail: many values share a few buckets.
  std::mt19937_64 rng(2);
  std::normal_distribution<double> ms(3.0, 0.4);
  std::vector<int64_t> values;
  for (int i = 0; i < 5000; ++i) values.push_back(static_cast<int64_t>(std::abs(ms(rng)) * 1e6));
  for (int i = 0; i < 50; ++i) values.push_back(int64_t{40'000'000} + i * 1'000'003);
  LatencyHistogram h;
  for (int64_t v : values) h.Add(nanoseconds(v));
  ExpectMatches(h, values);
}

TEST(LatencyHistogramTest, EveryValueIsWithinItsBucketBound) {
  // Two values, v and 2v, across bucket edges: p50 is v's bucket's upper end
  // (v itself below 256 ns, where buckets are 1 ns wide), p100 is max.
  for (int64_t v : {int64_t{0}, int64_t{1}, int64_t{127}, int64_t{128}, int64_t{129}, int64_t{255},
                    int64_t{256}, int64_t{1000}, int64_t{1023}, int64_t{1024}, int64_t{999'999},
                    int64_t{3'600'000'000'000}}) {
    LatencyHistogram h;
    h.Add(nanoseconds(v));
    h.Add(nanoseconds(v) * 2);
    const int64_t p50 = h.Percentile(50).count();
    EXPECT_GE(p50, v) << v;
    EXPECT_LE(p50, v + v / 128) << v;
    if (v < 256) {
      EXPECT_EQ(p50, v) << v;
    }
    EXPECT_EQ(h.Percentile(100).count(), 2 * v) << v;
  }
  // Above 256 ns buckets are 2 ns wide: 256 reports 257, its bucket's end.
  LatencyHistogram h;
  h.Add(nanoseconds(256));
  h.Add(nanoseconds(10'000));
  EXPECT_EQ(h.Percentile(50).count(), 257);
  // The upper end is capped at max().
  LatencyHistogram one;
  one.Add(nanoseconds(1000));
  EXPECT_EQ(one.Percentile(50).count(), 1000);
}

TEST(LatencyHistogramTest, NegativeIsZeroAndHugeIsTrackedByMax) {
  LatencyHistogram h;
  h.Add(nanoseconds(-5));
  EXPECT_EQ(h.min(), nanoseconds(0));
  const nanoseconds two_hours = std::chrono::hours(2);
  const nanoseconds three_hours = std::chrono::hours(3);
  h.Add(two_hours);
  h.Add(three_hours);
  EXPECT_EQ(h.count(), 3u);
  EXPECT_EQ(h.max(), three_hours);
  // Both huge values share the overflow bucket, which reports max().
  EXPECT_EQ(h.Percentile(50), three_hours);
  EXPECT_EQ(h.Percentile(100), three_hours);
  EXPECT_EQ(h.Percentile(10), nanoseconds(0));
  EXPECT_EQ(h.Percentile(std::nan("")), nanoseconds(0));
  EXPECT_EQ(h.Percentile(-3), nanoseconds(0));
  EXPECT_EQ(h.Percentile(250), three_hours);
  h.Add(nanoseconds::max());
  EXPECT_EQ(h.max(), nanoseconds::max());
  EXPECT_EQ(h.Percentile(100), nanoseconds::max());
}

TEST(LatencyHistogramTest, MergeEqualsAddingEverything) {
  const std::vector<int64_t> a = RandomDurations(3, 3000);
  const std::vector<int64_t> b = RandomDurations(4, 5000);
  LatencyHistogram ha, hb, all;
  for (int64_t v : a) ha.Add(nanoseconds(v));
  for (int64_t v : b) hb.Add(nanoseconds(v));
  for (int64_t v : a) all.Add(nanoseconds(v));
  for (int64_t v : b) all.Add(nanoseconds(v));

  LatencyHistogram merged = ha;
  merged.Merge(hb);
  std::vector<int64_t> both = a;
  both.insert(both.end(), b.begin(), b.end());
  ExpectMatches(merged, both);
  for (double p = 0; p <= 100; p += 0.5) EXPECT_EQ(merged.Percentile(p), all.Percentile(p)) << p;

  // Merging into and from an empty histogram.
  LatencyHistogram empty;
  LatencyHistogram copy = ha;
  copy.Merge(empty);
  EXPECT_EQ(copy.count(), ha.count());
  EXPECT_EQ(copy.min(), ha.min());
  empty.Merge(hb);
  ExpectMatches(empty, b);
}

// --- RequestTimeline ---------------------------------------------------------

TEST(RequestTimelineTest, PhasesSpanTheReachedPoints) {
  const Clock::time_point t0 = Clock::now();
  RequestTimeline t;
  EXPECT_FALSE(RequestTimeline::Reached(t.request));
  PhaseDurations none = t.Phases();
  EXPECT_FALSE(none.total_us.has_value());
  EXPECT_FALSE(none.reserve_us.has_value());

  t.request = t0;
  t.reserve = t0 + microseconds(10);
  t.first_byte = t0 + microseconds(25);
  t.write_done = t0 + microseconds(100);
  t.complete = t0 + microseconds(101) + nanoseconds(500);
  // A sender: no scatter, so settle runs from write_done.
  const PhaseDurations p = t.Phases();
  EXPECT_EQ(p.reserve_us, 10.0);
  EXPECT_EQ(p.first_byte_us, 15.0);
  EXPECT_EQ(p.write_us, 75.0);
  EXPECT_FALSE(p.scatter_us.has_value());
  EXPECT_EQ(p.settle_us, 1.5);
  EXPECT_EQ(p.total_us, 101.5);
  EXPECT_EQ(t.MicrosBetween(TimelinePoint::kReserve, TimelinePoint::kWriteDone), 90.0);
  EXPECT_FALSE(t.MicrosBetween(TimelinePoint::kRequest, TimelinePoint::kScatterDone));

  // A direct path without a reservation: first_byte counts from request.
  t.reserve = Clock::time_point();
  EXPECT_EQ(t.Phases().reserve_us, std::nullopt);
  EXPECT_EQ(t.Phases().first_byte_us, 25.0);
  EXPECT_EQ(TimelinePointName(TimelinePoint::kScatterDone), "scatter_done");
}

// --- Metrics -----------------------------------------------------------------

RequestRecord MakeRecord(uint64_t id, Side side, TransferPath taken, Outcome outcome,
                         microseconds latency, uint64_t bytes = 1000) {
  RequestRecord r;
  r.request_id = id;
  r.side = side;
  r.rank = 3;
  r.instance = side == Side::kSender ? "ctx0" : "gen0";
  r.peer_instance = side == Side::kSender ? "gen0" : "ctx0";
  r.path_requested = TransferPath::kAuto;
  r.path_taken = taken;
  r.bytes = bytes;
  r.fragments = 10;
  r.transport_writes = taken == TransferPath::kBounce ? 1 : 10;
  r.writers = side == Side::kSender ? 1 : 2;
  r.outcome = outcome;
  if (outcome != Outcome::kCompleted) r.error = "writer 1 failed";
  const Clock::time_point t0 = Clock::now();
  r.timeline.request = t0;
  r.timeline.reserve = t0 + latency / 4;
  r.timeline.first_byte = t0 + latency / 2;
  r.timeline.write_done = t0 + latency * 3 / 4;
  if (side == Side::kReceiver) r.timeline.scatter_done = t0 + latency * 7 / 8;
  r.timeline.complete = t0 + latency;
  return r;
}

TEST(MetricsTest, AggregatesByOutcomeSidePathAndFallback) {
  Metrics metrics;
  metrics.Record(MakeRecord(1, Side::kReceiver, TransferPath::kBounce, Outcome::kCompleted,
                            microseconds(1000), 4096));
  metrics.Record(MakeRecord(2, Side::kReceiver, TransferPath::kBounce, Outcome::kCompleted,
                            microseconds(3000), 4096));
  RequestRecord fallback = MakeRecord(3, Side::kReceiver, TransferPath::kPerBlock,
                                      Outcome::kCompleted, microseconds(5000), 100);
  fallback.fallback_reason = "recv arena backpressure";
  metrics.Record(fallback);
  fallback.request_id = 4;
  metrics.Record(fallback);
  fallback.fallback_reason = "request larger than arena";
  fallback.outcome = Outcome::kFailed;
  metrics.Record(fallback);
  metrics.Record(
      MakeRecord(6, Side::kReceiver, TransferPath::kDirect, Outcome::kTimedOut, microseconds(100)));
  metrics.Record(
      MakeRecord(7, Side::kSender, TransferPath::kBounce, Outcome::kCancelled, microseconds(100)));
  metrics.Record(MakeRecord(8, Side::kSender, TransferPath::kBounce, Outcome::kCompleted,
                            microseconds(2000), 7));
  // A completed record that never stamped its request: counted, no latency.
  RequestRecord unstamped =
      MakeRecord(9, Side::kSender, TransferPath::kDirect, Outcome::kCompleted, microseconds(1), 1);
  unstamped.timeline.request = Clock::time_point();
  metrics.Record(unstamped);
  metrics.Count(Counter::kDuplicateResults);
  metrics.Count(Counter::kDuplicateResults, 4);
  metrics.Count(Counter::kQuarantinedSlots, 2);

  const MetricsSnapshot s = metrics.Snapshot();
  const SideMetrics& rx = s.side(Side::kReceiver);
  EXPECT_EQ(rx.requests_with(Outcome::kCompleted), 4u);
  EXPECT_EQ(rx.requests_with(Outcome::kFailed), 1u);
  EXPECT_EQ(rx.requests_with(Outcome::kCancelled), 0u);
  EXPECT_EQ(rx.requests_with(Outcome::kTimedOut), 1u);
  EXPECT_EQ(rx.requests_total(), 6u);
  EXPECT_EQ(rx.bytes_completed, 4096u + 4096u + 100u + 100u);
  EXPECT_EQ(rx.fragments, 60u);
  EXPECT_EQ(rx.transport_writes, 1u + 1u + 10u + 10u + 10u + 10u);
  EXPECT_EQ(rx.taken(TransferPath::kBounce), 2u);
  EXPECT_EQ(rx.taken(TransferPath::kPerBlock), 3u);
  EXPECT_EQ(rx.taken(TransferPath::kDirect), 1u);
  EXPECT_EQ(rx.taken(TransferPath::kAuto), 0u);
  EXPECT_THAT(rx.fallbacks,
              ::testing::UnorderedElementsAre(::testing::Pair("recv arena backpressure", 2u),
                                              ::testing::Pair("request larger than arena", 1u)));
  EXPECT_EQ(rx.latency.count(), 4u);
  EXPECT_EQ(rx.latency.min(), microseconds(1000));
  EXPECT_EQ(rx.latency.max(), microseconds(5000));
  const LatencyHistogram& rx_bounce =
      rx.latency_by_path[static_cast<size_t>(TransferPath::kBounce)];
  EXPECT_EQ(rx_bounce.count(), 2u);
  EXPECT_EQ(rx_bounce.max(), microseconds(3000));
  EXPECT_EQ(rx.latency_by_path[static_cast<size_t>(TransferPath::kPerBlock)].count(), 2u);
  EXPECT_EQ(rx.latency_by_path[static_cast<size_t>(TransferPath::kDirect)].count(), 0u);

  const SideMetrics& tx = s.side(Side::kSender);
  EXPECT_EQ(tx.requests_total(), 3u);
  EXPECT_EQ(tx.requests_with(Outcome::kCancelled), 1u);
  EXPECT_EQ(tx.requests_with(Outcome::kCompleted), 2u);
  EXPECT_EQ(tx.bytes_completed, 8u);
  EXPECT_TRUE(tx.fallbacks.empty());
  EXPECT_EQ(tx.latency.count(), 1u);
  EXPECT_EQ(tx.latency.max(), microseconds(2000));

  EXPECT_EQ(s.counter(Counter::kDuplicateResults), 5u);
  EXPECT_EQ(s.counter(Counter::kQuarantinedSlots), 2u);
  EXPECT_EQ(s.counter(Counter::kRejectedResults), 0u);
  EXPECT_EQ(s.counter(Counter::kPeerFailures), 0u);
}

TEST(MetricsTest, ValuesOutsideTheEnumsAreNotAggregated) {
  Metrics metrics;
  RequestRecord r =
      MakeRecord(1, Side::kSender, TransferPath::kBounce, Outcome::kCompleted, microseconds(10));
  r.side = static_cast<Side>(7);
  metrics.Record(r);
  r.side = Side::kSender;
  r.outcome = static_cast<Outcome>(9);
  metrics.Record(r);
  r.outcome = Outcome::kCompleted;
  r.path_taken = static_cast<TransferPath>(11);
  metrics.Record(r);
  metrics.Count(static_cast<Counter>(40), 5);

  const MetricsSnapshot s = metrics.Snapshot();
  EXPECT_EQ(s.side(Side::kSender).requests_total(), 1u);
  EXPECT_EQ(s.side(Side::kSender).latency.count(), 1u);
  EXPECT_EQ(s.side(Side::kReceiver).requests_total(), 0u);
  uint64_t paths = 0;
  for (uint64_t n : s.side(Side::kSender).path_taken) paths += n;
  EXPECT_EQ(paths, 0u);
  for (uint64_t n : s.counters) EXPECT_EQ(n, 0u);
  EXPECT_EQ(SideName(static_cast<Side>(7)), "?");
  EXPECT_EQ(OutcomeName(static_cast<Outcome>(9)), "?");
  EXPECT_EQ(CounterName(static_cast<Counter>(40)), "?");
}

TEST(MetricsTest, ConcurrentRecordsAddUpExactly) {
  constexpr int kThreads = 4;
  constexpr int kPerThread = 2000;
  Metrics metrics;
  std::atomic<bool> done{false};
  std::thread reader([&] {
    // Snapshots taken while writers run are consistent prefixes.
    while (!done.load()) {
      const MetricsSnapshot s = metrics.Snapshot();
      const SideMetrics& rx = s.side(Side::kReceiver);
      EXPECT_EQ(rx.latency.count(), rx.requests_with(Outcome::kCompleted));
      EXPECT_EQ(rx.fragments, 10 * rx.requests_total());
      std::this_thread::sleep_for(microseconds(50));
    }
  });
  std::vector<std::thread> writers;
  for (int t = 0; t < kThreads; ++t) {
    writers.emplace_back([&metrics, t] {
      for (int i = 0; i < kPerThread; ++i) {
        const Outcome outcome = i % 4 == 0 ? Outcome::kFailed : Outcome::kCompleted;
        RequestRecord r = MakeRecord(static_cast<uint64_t>(t * kPerThread + i), Side::kReceiver,
                                     i % 2 ? TransferPath::kBounce : TransferPath::kPerBlock,
                                     outcome, microseconds(1 + i % 100), 3);
        if (i % 8 == 0) r.fallback_reason = "recv arena backpressure";
        metrics.Record(r);
        metrics.Count(Counter::kCancelsSent);
      }
    });
  }
  for (std::thread& w : writers) w.join();
  done.store(true);
  reader.join();

  const MetricsSnapshot s = metrics.Snapshot();
  const SideMetrics& rx = s.side(Side::kReceiver);
  constexpr uint64_t kTotal = uint64_t{kThreads} * kPerThread;
  EXPECT_EQ(rx.requests_total(), kTotal);
  EXPECT_EQ(rx.requests_with(Outcome::kFailed), kTotal / 4);
  EXPECT_EQ(rx.requests_with(Outcome::kCompleted), kTotal * 3 / 4);
  EXPECT_EQ(rx.bytes_completed, 3 * kTotal * 3 / 4);
  EXPECT_EQ(rx.taken(TransferPath::kBounce), kTotal / 2);
  EXPECT_EQ(rx.taken(TransferPath::kPerBlock), kTotal / 2);
  EXPECT_EQ(rx.fallbacks.at("recv arena backpressure"), kTotal / 8);
  EXPECT_EQ(rx.latency.count(), kTotal * 3 / 4);
  EXPECT_EQ(rx.latency.min(), microseconds(2));  // i % 4 != 0 → 1 + i % 100 >= 2
  EXPECT_EQ(rx.latency.max(), microseconds(100));
  EXPECT_EQ(s.counter(Counter::kCancelsSent), kTotal);
}

TEST(MetricsTest, JsonSnapshotHasEveryField) {
  Metrics metrics;
  for (int i = 1; i <= 100; ++i) {
    metrics.Record(MakeRecord(static_cast<uint64_t>(i), Side::kReceiver, TransferPath::kBounce,
                              Outcome::kCompleted, microseconds(i * 100)));
  }
  RequestRecord bad =
      MakeRecord(200, Side::kReceiver, TransferPath::kPerBlock, Outcome::kFailed, microseconds(1));
  bad.fallback_reason = "recv arena \xff backpressure";  // not UTF-8
  metrics.Record(bad);
  metrics.Count(Counter::kPeerFailures, 3);
  // The grant queue: its last value, and the most it held.
  metrics.SetGrantQueue(5);
  metrics.SetGrantQueue(2);
  const nlohmann::json j = ToJson(metrics.Snapshot());
  EXPECT_EQ(j["grant_queue"]["now"], 2);
  EXPECT_EQ(j["grant_queue"]["peak"], 5);

  for (const char* side : {"sender", "receiver"}) {
    SCOPED_TRACE(side);
    ASSERT_TRUE(j.contains(side));
    const nlohmann::json& s = j[side];
    for (const char* key : {"requests", "bytes_completed", "transport_writes", "fragments",
                            "path_taken", "fallbacks", "latency_ms", "latency_ms_by_path"}) {
      EXPECT_TRUE(s.contains(key)) << key;
    }
    for (const char* key : {"completed", "failed", "cancelled", "timed_out", "total"}) {
      EXPECT_TRUE(s["requests"].contains(key)) << key;
    }
    for (const char* path : {"per-block", "bounce", "direct", "auto"}) {
      EXPECT_TRUE(s["path_taken"].contains(path)) << path;
      EXPECT_TRUE(s["latency_ms_by_path"].contains(path)) << path;
    }
    for (const char* key : {"count", "mean", "p50", "p90", "p99", "max"}) {
      EXPECT_TRUE(s["latency_ms"].contains(key)) << key;
    }
  }
  const nlohmann::json& rx = j["receiver"];
  EXPECT_EQ(rx["requests"]["completed"], 100);
  EXPECT_EQ(rx["requests"]["failed"], 1);
  EXPECT_EQ(rx["requests"]["total"], 101);
  EXPECT_EQ(rx["path_taken"]["bounce"], 100);
  EXPECT_EQ(rx["latency_ms"]["count"], 100);
  // Latencies of 0.1 ms .. 10 ms in steps of 0.1 ms.
  EXPECT_NEAR(rx["latency_ms"]["p50"].get<double>(), 5.0, 5.0 * 0.01);
  EXPECT_NEAR(rx["latency_ms"]["p90"].get<double>(), 9.0, 9.0 * 0.01);
  EXPECT_NEAR(rx["latency_ms"]["p99"].get<double>(), 9.9, 9.9 * 0.01);
  EXPECT_DOUBLE_EQ(rx["latency_ms"]["max"].get<double>(), 10.0);
  EXPECT_DOUBLE_EQ(rx["latency_ms"]["mean"].get<double>(), 5.05);
  EXPECT_EQ(rx["latency_ms_by_path"]["bounce"]["count"], 100);
  EXPECT_EQ(rx["latency_ms_by_path"]["direct"]["p99"], 0.0);
  EXPECT_EQ(j["sender"]["latency_ms"]["p50"], 0.0);
  EXPECT_EQ(j["counters"]["peer_failures"], 3);
  for (const char* key : {"rejected_results", "duplicate_results", "quarantined_slots",
                          "cancels_sent", "cancels_received", "peer_failures"}) {
    EXPECT_TRUE(j["counters"].contains(key)) << key;
  }
  // The invalid UTF-8 reason survives a dump with the replace handler.
  const std::string text = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  EXPECT_THAT(text, HasSubstr("recv arena \xEF\xBF\xBD backpressure"));
}

// --- PerfLog -----------------------------------------------------------------

// A fresh file path for one test, removed at the end.
class TempPath {
 public:
  explicit TempPath(const std::string& name)
      : path_(::testing::TempDir() + "kvbounce_metrics_" + std::to_string(::getpid()) + "_" + name +
              ".jsonl") {
    std::remove(path_.c_str());
  }
  ~TempPath() { std::remove(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::vector<nlohmann::json> ReadLines(const std::string& path) {
  std::ifstream in(path);
  std::vector<nlohmann::json> lines;
  std::string line;
  while (std::getline(in, line)) {
    // Tests may throw; the library never parses.
    lines.push_back(nlohmann::json::parse(line));
  }
  return lines;
}

TEST(PerfLogTest, WritesOneJsonLinePerRecordAndAppends) {
  TempPath file("lines");
  RequestRecord rx = MakeRecord(42, Side::kReceiver, TransferPath::kPerBlock, Outcome::kFailed,
                                microseconds(800), 123456);
  rx.path_requested = TransferPath::kBounce;
  rx.fallback_reason = "request larger than arena";
  rx.error = "ctx0 rank 1: \"quoted\"\nnewline";
  rx.chunks = 6;
  rx.chunk_writer_us = 1500.5;
  rx.chunk_scatter_us = 250.25;
  rx.chunk_slots_peak = 3;
  rx.credit_stall_us = 75.5;
  RequestRecord tx =
      MakeRecord(43, Side::kSender, TransferPath::kBounce, Outcome::kCompleted, microseconds(500));
  {
    auto log = PerfLog::Open(file.path());
    ASSERT_THAT(log, IsOk());
    EXPECT_EQ((*log)->path(), file.path());
    (*log)->Write(rx);
    (*log)->Write(tx);
    EXPECT_EQ((*log)->write_failures(), 0u);
    // Each line is on disk before Write returns.
    EXPECT_EQ(ReadLines(file.path()).size(), 2u);
  }
  {
    auto log = PerfLog::Open(file.path());
    ASSERT_THAT(log, IsOk());
    RequestRecord unreached;  // nothing stamped
    unreached.request_id = 44;
    (*log)->Write(unreached);
  }

  const std::vector<nlohmann::json> lines = ReadLines(file.path());
  ASSERT_EQ(lines.size(), 3u);
  const nlohmann::json& a = lines[0];
  EXPECT_EQ(a["request_id"], 42);
  EXPECT_EQ(a["side"], "receiver");
  EXPECT_EQ(a["rank"], 3);
  EXPECT_EQ(a["instance"], "gen0");
  EXPECT_EQ(a["peer_instance"], "ctx0");
  EXPECT_EQ(a["path_requested"], "bounce");
  EXPECT_EQ(a["path_taken"], "per-block");
  EXPECT_EQ(a["fallback_reason"], "request larger than arena");
  EXPECT_EQ(a["bytes"], 123456);
  EXPECT_EQ(a["fragments"], 10);
  EXPECT_EQ(a["transport_writes"], 10);
  EXPECT_EQ(a["writers"], 2);
  EXPECT_EQ(a["outcome"], "failed");
  EXPECT_EQ(a["error"], rx.error);
  EXPECT_EQ(
      a["request_steady_us"].get<int64_t>(),
      std::chrono::duration_cast<microseconds>(rx.timeline.request.time_since_epoch()).count());
  EXPECT_DOUBLE_EQ(a["reserve_us"].get<double>(), 200.0);
  EXPECT_DOUBLE_EQ(a["first_byte_us"].get<double>(), 400.0);
  EXPECT_DOUBLE_EQ(a["write_done_us"].get<double>(), 600.0);
  EXPECT_DOUBLE_EQ(a["scatter_done_us"].get<double>(), 700.0);
  EXPECT_DOUBLE_EQ(a["complete_us"].get<double>(), 800.0);
  EXPECT_EQ(a["chunks"], 6);
  EXPECT_DOUBLE_EQ(a["chunk_writer_us"].get<double>(), 1500.5);
  EXPECT_DOUBLE_EQ(a["chunk_scatter_us"].get<double>(), 250.25);
  EXPECT_EQ(a["chunk_slots_peak"], 3);
  EXPECT_DOUBLE_EQ(a["credit_stall_us"].get<double>(), 75.5);
  EXPECT_EQ(a.size(), 25u);  // 19 record fields + request_steady_us + 5 times

  const nlohmann::json& b = lines[1];
  EXPECT_EQ(b["side"], "sender");
  EXPECT_EQ(b["outcome"], "completed");
  EXPECT_EQ(b["writers"], 1);
  EXPECT_EQ(b["fallback_reason"], "");
  EXPECT_EQ(b["chunks"], 0);  // not streamed
  EXPECT_DOUBLE_EQ(b["chunk_writer_us"].get<double>(), 0.0);
  EXPECT_TRUE(b["scatter_done_us"].is_null());
  EXPECT_DOUBLE_EQ(b["complete_us"].get<double>(), 500.0);

  const nlohmann::json& c = lines[2];
  EXPECT_EQ(c["request_id"], 44);
  for (const char* key : {"request_steady_us", "reserve_us", "first_byte_us", "write_done_us",
                          "scatter_done_us", "complete_us"}) {
    EXPECT_TRUE(c[key].is_null()) << key;
  }
}

TEST(PerfLogTest, InvalidUtf8IsReplacedNotThrown) {
  TempPath file("utf8");
  auto log = PerfLog::Open(file.path());
  ASSERT_THAT(log, IsOk());
  RequestRecord r;
  r.error = "bad \xc3\x28 bytes";
  r.peer_instance = "\xff";
  (*log)->Write(r);
  const std::vector<nlohmann::json> lines = ReadLines(file.path());
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[0]["peer_instance"], "\xEF\xBF\xBD");
}

TEST(PerfLogTest, BadPathIsAnErrorNamingIt) {
  const std::string missing = "/nonexistent-kvbounce-dir/perf.jsonl";
  EXPECT_THAT(PerfLog::Open(missing),
              StatusIs(StatusCode::kInvalidArgument,
                       ::testing::AllOf(HasSubstr(missing), HasSubstr("No such file"))));
  EXPECT_THAT(PerfLog::Open(::testing::TempDir()),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("Is a directory")));
  EXPECT_THAT(PerfLog::Open(""), StatusIs(StatusCode::kInvalidArgument, HasSubstr("empty")));
}

TEST(PerfLogTest, FromEnvironment) {
  ::unsetenv(PerfLog::kEnvVar);
  auto unset = PerfLog::FromEnvironment();
  ASSERT_THAT(unset, IsOk());
  EXPECT_EQ(*unset, nullptr);

  ASSERT_EQ(::setenv(PerfLog::kEnvVar, "", 1), 0);
  auto empty = PerfLog::FromEnvironment();
  ASSERT_THAT(empty, IsOk());
  EXPECT_EQ(*empty, nullptr);

  TempPath file("env");
  ASSERT_EQ(::setenv(PerfLog::kEnvVar, file.path().c_str(), 1), 0);
  auto set = PerfLog::FromEnvironment();
  ASSERT_THAT(set, IsOk());
  ASSERT_NE(*set, nullptr);
  EXPECT_EQ((*set)->path(), file.path());

  ASSERT_EQ(::setenv(PerfLog::kEnvVar, "/nonexistent-kvbounce-dir/x.jsonl", 1), 0);
  EXPECT_THAT(PerfLog::FromEnvironment(),
              StatusIs(StatusCode::kInvalidArgument,
                       ::testing::AllOf(HasSubstr("KVBOUNCE_PERF_LOG"),
                                        HasSubstr("/nonexistent-kvbounce-dir/x.jsonl"))));
  ::unsetenv(PerfLog::kEnvVar);

  // An injected lookup is used instead of the process environment.
  auto injected = PerfLog::FromEnvironment([&file](const char* name) -> const char* {
    return std::string(name) == "KVBOUNCE_PERF_LOG" ? file.path().c_str() : nullptr;
  });
  ASSERT_THAT(injected, IsOk());
  EXPECT_NE(*injected, nullptr);
}

TEST(PerfLogTest, MetricsWritesEveryRecordToItsLog) {
  TempPath file("metrics");
  Metrics metrics;
  metrics.Record(MakeRecord(1, Side::kSender, TransferPath::kBounce, Outcome::kCompleted,
                            microseconds(5)));  // before a log is set: not written
  auto log = PerfLog::Open(file.path());
  ASSERT_THAT(log, IsOk());
  metrics.SetPerfLog(std::move(log).value());

  constexpr int kThreads = 3;
  constexpr int kPerThread = 100;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&metrics, t] {
      for (int i = 0; i < kPerThread; ++i) {
        metrics.Record(MakeRecord(static_cast<uint64_t>(1000 * (t + 1) + i), Side::kReceiver,
                                  TransferPath::kDirect, Outcome::kCompleted, microseconds(7)));
      }
    });
  }
  for (std::thread& th : threads) th.join();
  metrics.SetPerfLog(nullptr);
  metrics.Record(MakeRecord(2, Side::kSender, TransferPath::kBounce, Outcome::kCompleted,
                            microseconds(5)));  // after the log is removed: not written

  const std::vector<nlohmann::json> lines = ReadLines(file.path());
  ASSERT_EQ(lines.size(), static_cast<size_t>(kThreads * kPerThread));
  std::vector<uint64_t> ids;
  for (const nlohmann::json& line : lines) ids.push_back(line["request_id"].get<uint64_t>());
  std::sort(ids.begin(), ids.end());
  EXPECT_EQ(std::adjacent_find(ids.begin(), ids.end()), ids.end());
  EXPECT_EQ(ids.front(), 1000u);
  EXPECT_EQ(ids.back(), 3099u);
  EXPECT_EQ(metrics.Snapshot().side(Side::kReceiver).requests_total(),
            static_cast<uint64_t>(kThreads * kPerThread));
}

}  // namespace
}  // namespace kvbounce
