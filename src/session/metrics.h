// Per-request records, aggregate counters and latency histograms of a
// session, and the JSON-lines perf log (docs/architecture.md §12).
//
// The sender and receiver state machines fill in one RequestRecord per
// request and side: the steady-clock time each phase was reached (its
// RequestTimeline), the bytes, fragments and writes it took, the path that
// was asked for and the one actually taken (a bounce may fall back to
// per-block, and the record says why), and how it ended. When the request
// settles they hand the record to Metrics::Record, which
//   * folds it into the aggregates (requests by outcome, bytes, writes,
//     fragments, paths, fallback reasons, and a latency histogram of
//     complete - request per side and per path), and
//   * appends it to the perf log, when one is attached.
// Events that are not requests (a rejected KV_RESULT, a quarantined slot, a
// peer declared dead) are counted with Metrics::Count. Snapshot() copies
// everything into a plain MetricsSnapshot; ToJson turns that into the JSON
// that Agent::Stats() and the bench report.
//
//   Metrics metrics;
//   auto log = PerfLog::FromEnvironment();          // KVBOUNCE_PERF_LOG
//   if (!log.ok()) return log.status();
//   metrics.SetPerfLog(std::move(log).value());     // nullptr: no log
//   ...
//   RequestRecord record{.request_id = id, .side = Side::kReceiver, ...};
//   record.timeline.request = std::chrono::steady_clock::now();
//   ...
//   metrics.Record(record);                         // once, when settled
//   metrics.Count(Counter::kDuplicateResults);
//   std::string text = ToJson(metrics.Snapshot()).dump(
//       2, ' ', false, nlohmann::json::error_handler_t::replace);
//
// Thread safety:
//   * Metrics: every method is thread-safe. One mutex guards all aggregates;
//     it is held only for the O(1) bookkeeping of one call (and for the copy
//     in Snapshot), never while writing the perf log or logging. The export
//     histograms and the in-flight counts are atomics updated outside it.
//   * PerfLog: Write is thread-safe (one mutex per log serializes the lines
//     of one process). Every line goes to the file in one append-mode
//     write(2), so several processes (the ranks of one host) may share a
//     path without splitting each other's lines.
//   * LatencyHistogram, RequestTimeline, RequestRecord and MetricsSnapshot
//     are plain values and are NOT synchronized: one object must not be
//     modified from two threads at once, or read while it is modified.
//
// Exceptions: nothing here throws except std::bad_alloc. The JSON is built
// with nlohmann-json, whose dump() throws on strings that are not valid UTF-8
// unless it is given error_handler_t::replace; the perf log always passes it,
// and callers that dump ToJson's result should too (instance ids and error
// texts come from peers and are not validated).
#ifndef KVBOUNCE_SESSION_METRICS_H_
#define KVBOUNCE_SESSION_METRICS_H_

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvbounce/agent.h"
#include "kvbounce/config.h"
#include "kvbounce/status.h"

namespace kvbounce {

// Which end of a transfer a record describes: the sender is a ctx rank
// writing one writer's share; the receiver is the gen rank that pulled the
// request (one record for all of its writers).
enum class Side { kSender, kReceiver };
inline constexpr size_t kNumSides = 2;

// "sender", "receiver" ("?" for a value outside the enum).
std::string_view SideName(Side side);

// How a request settled (docs/sessions.md: each request settles exactly once).
enum class Outcome {
  // Every byte landed (on the receiver: after the scatter).
  kCompleted,
  // A writer, the transport or a copy failed; see RequestRecord::error.
  kFailed,
  // The application or the peer cancelled.
  kCancelled,
  // The transfer deadline passed first.
  kTimedOut,
};
inline constexpr size_t kNumOutcomes = 4;

// "completed", "failed", "cancelled", "timed_out" ("?" outside the enum).
std::string_view OutcomeName(Outcome outcome);

// Every TransferPath value, kAuto included (a record should never carry
// kAuto as the path taken, but it is counted rather than lost if it does).
inline constexpr size_t kNumTransferPaths = 4;

// Events of a session that are not requests; Metrics::Count adds to them.
enum class Counter {
  // KV_RESULTs rejected: unknown writer, wrong fingerprint or byte count.
  kRejectedResults,
  // KV_RESULTs repeated by a writer that had already reported (counted once).
  kDuplicateResults,
  // Slots moved into quarantine (writers possibly still in flight).
  kQuarantinedSlots,
  // CANCEL frames sent to peers.
  kCancelsSent,
  // CANCEL frames received from peers.
  kCancelsReceived,
  // Peers declared failed (connection lost, no answer).
  kPeerFailures,
  // Streaming bounce (docs/sessions.md): chunk slots granted (receiver),
  // chunks written and announced (sender), chunks scattered (receiver).
  kChunksGranted,
  kChunksWritten,
  kChunksScattered,
  // Nanoseconds writers of streamed requests sat idle for want of a credit
  // (a writer with no chunk granted and chunks left to send), summed.
  kCreditStallNs,
  // A state machine was asked for a move it does not allow: a bug. Tests
  // assert it stays 0.
  kInvalidTransitions,
};
inline constexpr size_t kNumCounters = 11;

// "rejected_results", "duplicate_results", "quarantined_slots",
// "cancels_sent", "cancels_received", "peer_failures", "chunks_granted",
// "chunks_written", "chunks_scattered", "credit_stall_ns",
// "invalid_transitions" ("?" outside the enum).
std::string_view CounterName(Counter counter);

// ---------------------------------------------------------------------------
// Timeline of one request on one side.

// The points a request passes, in the order it passes them.
enum class TimelinePoint {
  kRequest,      // receiver: Pull called; sender: KV_REQUEST received
  kReserve,      // the recv slot (receiver) or send slot (sender) was granted
  kFirstByte,    // the first data write was issued
  kWriteDone,    // sender: writes flushed; receiver: last writer's result in
  kScatterDone,  // receiver: the scatter landed
  kComplete,     // the request settled (any outcome)
};
inline constexpr size_t kNumTimelinePoints = 6;

// "request", "reserve", "first_byte", "write_done", "scatter_done",
// "complete" ("?" outside the enum).
std::string_view TimelinePointName(TimelinePoint point);

// How long each phase of a request took, in microseconds (fractional: the
// clock's nanoseconds are kept). A phase ends at one point of the timeline
// and starts at the latest EARLIER point that was reached, so a point that a
// path skips (no reserve on the direct path, no scatter on the sender) does
// not hide the time spent: the phases that are set always add up to
// total_us. A phase is nullopt when its end was not reached, or when no
// earlier point was. Values are negative only if the points were stamped out
// of order.
struct PhaseDurations {
  std::optional<double> reserve_us;     // waiting for a slot
  std::optional<double> first_byte_us;  // until the first write (the gather, on a bounce sender)
  std::optional<double> write_us;       // until the writes were flushed / all results were in
  std::optional<double> scatter_us;     // until the scatter landed
  std::optional<double> settle_us;      // until the request settled
  std::optional<double> total_us;       // request -> complete (both must be reached)
};

// Steady-clock stamps of the points of TimelinePoint. A default-constructed
// time_point (the clock's epoch) means "not reached"; the session stamps a
// point with std::chrono::steady_clock::now() when it reaches it.
struct RequestTimeline {
  using Clock = std::chrono::steady_clock;

  Clock::time_point request;
  Clock::time_point reserve;
  Clock::time_point first_byte;
  Clock::time_point write_done;
  Clock::time_point scatter_done;
  Clock::time_point complete;

  // Whether a stamp is set (differs from the default-constructed point).
  static bool Reached(Clock::time_point t) { return t != Clock::time_point(); }

  // The stamp of `point` (the default point for a value outside the enum).
  Clock::time_point At(TimelinePoint point) const;

  // `to - from` in microseconds, or nullopt unless both points were reached.
  std::optional<double> MicrosBetween(TimelinePoint from, TimelinePoint to) const;

  // The phases, as PhaseDurations describes them.
  PhaseDurations Phases() const;

  friend bool operator==(const RequestTimeline&, const RequestTimeline&) = default;
};

// ---------------------------------------------------------------------------
// One request on one side: what the perf log writes and Metrics aggregates.
struct RequestRecord {
  uint64_t request_id = 0;
  Side side = Side::kReceiver;
  // This agent's rank within its instance.
  int rank = 0;
  // This agent's instance id, and the peer's (the ctx instance pulled from,
  // or the gen instance that asked).
  std::string instance;
  std::string peer_instance;
  // What the Pull asked for (possibly kAuto) and what was executed; they
  // differ after a fallback (then fallback_reason says why).
  TransferPath path_requested = TransferPath::kAuto;
  TransferPath path_taken = TransferPath::kPerBlock;
  // Empty when the path was not changed; otherwise a short fixed phrase, e.g.
  // "recv arena backpressure", "request larger than arena",
  // "send arena backpressure". Aggregated verbatim: keep the set of phrases
  // small (no ids or sizes in it), or the fallback map grows without bound.
  std::string fallback_reason;
  // Payload bytes moved for this request (this writer's share on a sender).
  uint64_t bytes = 0;
  // Plan runs executed (gather/scatter runs or direct-list fragments).
  uint64_t fragments = 0;
  // Transport write operations issued.
  uint64_t transport_writes = 0;
  // Receiver: the number of writers of the request; sender: 1.
  int writers = 1;
  Outcome outcome = Outcome::kCompleted;
  // Why the request did not complete; empty when it did.
  std::string error;
  RequestTimeline timeline;
  // A streamed bounce (0 otherwise). On the receiver: the chunks scattered,
  // and summed over them the microseconds from a chunk's KV_GRANT to its
  // KV_CHUNK (the frames there and back, the writer's gather and write) and
  // from its KV_CHUNK to the end of its scatter: together a chunk's round
  // trip, what bounds a stream through a small arena (docs/sessions.md,
  // "Streaming bounce"). On a writer: the chunks announced, and summed the
  // microseconds from a KV_GRANT's arrival to its KV_CHUNK going out (its
  // gather and write); the receiver's chunk_writer_us less the writers'
  // is the frames' time.
  uint64_t chunks = 0;
  double chunk_writer_us = 0;
  double chunk_scatter_us = 0;
  // A streamed bounce on the receiver (0 otherwise, and on a writer): the
  // most chunk slots of the recv arena the request held at once, over all
  // its writers, and how long its writers sat idle for want of a credit (a
  // writer with no chunk slot and chunks left to send), summed over them —
  // this request's share of Counter::kCreditStallNs.
  uint64_t chunk_slots_peak = 0;
  double credit_stall_us = 0;

  friend bool operator==(const RequestRecord&, const RequestRecord&) = default;
};

// ---------------------------------------------------------------------------
// A histogram of durations with bounded relative error (the log-linear bucket
// scheme of HdrHistogram).
//
// Values are nanoseconds. Below 128 ns every value has its own bucket (exact).
// Above, each power of two [2^e, 2^(e+1)) is split into 128 equal buckets, so
// a bucket is at most 1/128 (< 0.8%) of the values it holds. Values from
// 2^42 ns (about 73 minutes) up are counted in one overflow bucket. The
// bucket array grows only as far as the largest value added: at most
// kMaxBuckets counters (36 KiB), a few KiB for latencies of milliseconds, and
// nothing while empty.
//
// min(), max(), count() are exact; mean() is exact up to double rounding.
// Negative durations are recorded as 0.
//
// Thread safety: none; a histogram is a plain value (Metrics guards its own).
class LatencyHistogram {
 public:
  // Values below this many nanoseconds are exact.
  static constexpr int kSubBucketBits = 7;
  static constexpr uint64_t kSubBuckets = uint64_t{1} << kSubBucketBits;  // 128
  // Values at or above this many nanoseconds share the overflow bucket.
  static constexpr int kMaxExponent = 42;
  static constexpr uint64_t kMaxTrackableNs = uint64_t{1} << kMaxExponent;
  static constexpr size_t kMaxBuckets = (kMaxExponent - kSubBucketBits + 1) * kSubBuckets + 1;

  LatencyHistogram() = default;

  void Add(std::chrono::nanoseconds value);

  // The nearest-rank percentile: the smallest recorded value v such that at
  // least p% of the values are <= v (rank ceil(p/100 * count), at least 1).
  // The result is the upper end of the bucket holding v, capped at max():
  // never below v, and above it by at most 1/128 of v (exact below 128 ns).
  // If v lies in the overflow bucket the result is max(). p is clamped to
  // [0, 100] (NaN counts as 0): p = 0 gives min(), p = 100 gives max().
  // Returns 0 when empty.
  std::chrono::nanoseconds Percentile(double p) const;

  // Adds every value of `other` (exactly as if they had been added here).
  void Merge(const LatencyHistogram& other);

  uint64_t count() const { return count_; }
  // The smallest and largest recorded values; 0 when empty.
  std::chrono::nanoseconds min() const { return std::chrono::nanoseconds(count_ ? min_ns_ : 0); }
  std::chrono::nanoseconds max() const { return std::chrono::nanoseconds(max_ns_); }
  // The arithmetic mean in nanoseconds; 0 when empty.
  double mean() const { return count_ ? sum_ns_ / static_cast<double>(count_) : 0.0; }

 private:
  static size_t BucketOf(uint64_t ns);
  // The largest value a bucket holds (UINT64_MAX for the overflow bucket).
  static uint64_t BucketUpper(size_t index);

  // counts_[i] = values in bucket i; sized to the highest bucket used.
  std::vector<uint64_t> counts_;
  uint64_t count_ = 0;
  uint64_t min_ns_ = 0;
  uint64_t max_ns_ = 0;
  double sum_ns_ = 0.0;
};

// ---------------------------------------------------------------------------
// Histograms over fixed upper bounds, for export in the Prometheus text format
// (include/kvbounce/prometheus.h), where a bucket is "values <= bound" and
// the bounds must be the same at every scrape.

// Request latency bounds, nanoseconds: 25 µs to 60 s.
inline constexpr std::array<uint64_t, 20> kRequestLatencyBoundsNs = {
    25'000,        50'000,        100'000,        250'000,        500'000,
    1'000'000,     2'500'000,     5'000'000,      10'000'000,     25'000'000,
    50'000'000,    100'000'000,   250'000'000,    500'000'000,    1'000'000'000,
    2'500'000'000, 5'000'000'000, 10'000'000'000, 30'000'000'000, 60'000'000'000};
// Bytes per request bounds: powers of 4 from 4 KiB to 16 GiB.
inline constexpr std::array<uint64_t, 12> kRequestBytesBounds = {
    uint64_t{1} << 12, uint64_t{1} << 14, uint64_t{1} << 16, uint64_t{1} << 18,
    uint64_t{1} << 20, uint64_t{1} << 22, uint64_t{1} << 24, uint64_t{1} << 26,
    uint64_t{1} << 28, uint64_t{1} << 30, uint64_t{1} << 32, uint64_t{1} << 34};

// A BucketHistogram's counts at one instant: counts[i] holds the values in
// (bounds[i-1], bounds[i]] (not cumulative), and the last entry those above
// every bound; sum is the sum of the values.
struct BucketCounts {
  std::vector<uint64_t> counts;
  uint64_t sum = 0;
  uint64_t count() const;
  friend bool operator==(const BucketCounts&, const BucketCounts&) = default;
};

// Counts values into fixed buckets. Add is two relaxed atomic additions and a
// binary search over at most kMaxBounds bounds: no lock, so the sessions may
// record from any thread at any rate.
//
// Thread safety: Add and Snapshot are thread-safe. A Snapshot taken while
// values are added may see a value in its bucket but not yet in the sum (or
// the reverse); every count it reports is at least that of an earlier
// Snapshot, so exported counters never go down.
class BucketHistogram {
 public:
  static constexpr size_t kMaxBounds = 31;

  // `bounds`: ascending upper bounds (inclusive), at most kMaxBounds; the
  // span must outlive the histogram (the constants above are static).
  explicit BucketHistogram(std::span<const uint64_t> bounds);
  BucketHistogram(const BucketHistogram&) = delete;
  BucketHistogram& operator=(const BucketHistogram&) = delete;

  void Add(uint64_t value);
  BucketCounts Snapshot() const;
  std::span<const uint64_t> bounds() const { return bounds_; }

 private:
  const std::span<const uint64_t> bounds_;
  std::array<std::atomic<uint64_t>, kMaxBounds + 1> counts_{};
  std::atomic<uint64_t> sum_{0};
};

// ---------------------------------------------------------------------------
// Aggregates of one side.
struct SideMetrics {
  // Records by outcome, indexed by Outcome.
  std::array<uint64_t, kNumOutcomes> requests{};
  // Sum of `bytes` over completed requests.
  uint64_t bytes_completed = 0;
  // Sums over all records, whatever their outcome (work that was done).
  uint64_t transport_writes = 0;
  uint64_t fragments = 0;
  // Records by path_taken (all outcomes), indexed by TransferPath.
  std::array<uint64_t, kNumTransferPaths> path_taken{};
  // Records by path_taken and outcome: [TransferPath][Outcome].
  std::array<std::array<uint64_t, kNumOutcomes>, kNumTransferPaths> requests_by_path{};
  // Records with a non-empty fallback_reason, by reason.
  std::map<std::string, uint64_t> fallbacks;
  // complete - request of completed records that reached both points, over
  // all paths and per path_taken (indexed by TransferPath).
  LatencyHistogram latency;
  std::array<LatencyHistogram, kNumTransferPaths> latency_by_path;
  // The same requests in the export buckets, per path_taken: latency in
  // nanoseconds (kRequestLatencyBoundsNs) and bytes (kRequestBytesBounds).
  // Filled by Metrics::Snapshot (they are kept outside the lock).
  std::array<BucketCounts, kNumTransferPaths> latency_buckets;
  std::array<BucketCounts, kNumTransferPaths> bytes_buckets;
  // Requests of this side started and not settled yet (Metrics::TrackInFlight).
  int64_t in_flight = 0;

  uint64_t requests_with(Outcome outcome) const;
  uint64_t requests_total() const;
  uint64_t taken(TransferPath path) const;
};

// Everything Metrics holds, copied at one instant.
struct MetricsSnapshot {
  // Indexed by Side.
  std::array<SideMetrics, kNumSides> sides;
  // Indexed by Counter.
  std::array<uint64_t, kNumCounters> counters{};
  // Streaming bounce, receiver: the writers of admitted streams that wanted
  // a chunk slot the recv arena had no room for, as of the last grant pass,
  // and the most there ever were (Metrics::SetGrantQueue).
  uint64_t grant_queue = 0;
  uint64_t grant_queue_peak = 0;

  // REQUIRES: a value of the enum.
  const SideMetrics& side(Side s) const { return sides[static_cast<size_t>(s)]; }
  uint64_t counter(Counter c) const { return counters[static_cast<size_t>(c)]; }
};

// The snapshot as JSON:
//   {"sender": SIDE, "receiver": SIDE,
//    "counters": {"rejected_results": n, ...every Counter...},
//    "grant_queue": {"now": n, "peak": n}}
// with SIDE =
//   {"requests": {"completed": n, "failed": n, "cancelled": n, "timed_out": n,
//                 "total": n},
//    "bytes_completed": n, "transport_writes": n, "fragments": n,
//    "path_taken": {"per-block": n, "bounce": n, "direct": n, "auto": n},
//    "fallbacks": {"<reason>": n, ...},
//    "latency_ms": LATENCY,
//    "latency_ms_by_path": {"per-block": LATENCY, ..., "auto": LATENCY},
//    "requests_by_path": {"per-block": {"completed": n, ...every outcome}, ...},
//    "requests_in_flight": n,
//    "latency_seconds_buckets": BUCKETS, "bytes_buckets": BUCKETS}
// with BUCKETS = {"bounds": [upper bound, ...], "by_path": {"per-block":
// {"counts": [n, ..., n above every bound], "sum": total}, ...}}: the export
// histograms (latency bounds and sums in seconds, byte bounds and sums in
// bytes; counts not cumulative);
// and LATENCY = {"count": n, "mean": ms, "p50": ms, "p90": ms, "p99": ms,
// "max": ms} (milliseconds as doubles; all 0 when count is 0). Every key is
// always present, so the shape does not depend on the traffic.
nlohmann::json ToJson(const MetricsSnapshot& snapshot);

// One record as the perf log writes it: every field of RequestRecord under its
// own name (enums by their names), then the timeline as
//   "request_steady_us": the request stamp, integer microseconds of the
//                        steady clock (comparable within one host only),
//   "reserve_us", "first_byte_us", "write_done_us", "scatter_done_us",
//   "complete_us":       microseconds since the request stamp (fractional),
// each null when that point (or the request itself) was not reached.
nlohmann::json ToJson(const RequestRecord& record);

// ---------------------------------------------------------------------------
// The JSON-lines perf log: one ToJson(RequestRecord) object per line.
class PerfLog {
 public:
  // The environment variable FromEnvironment reads.
  static constexpr const char* kEnvVar = "KVBOUNCE_PERF_LOG";

  // Opens (creating it, mode 0644 less the umask) `path` for appending.
  // Errors:
  //   kInvalidArgument  empty path; or the path cannot be opened because of
  //                     the path itself (missing directory, a directory,
  //                     permission, read-only file system, too long, loop).
  //   kInternal         any other open(2) failure (e.g. out of descriptors).
  // The message names the path and the errno text.
  static Result<std::unique_ptr<PerfLog>> Open(const std::string& path);

  // Open(value of KVBOUNCE_PERF_LOG), read through `lookup` (std::getenv
  // when empty). Unset or empty: returns nullptr, which is not an error.
  // Errors: those of Open, prefixed with "KVBOUNCE_PERF_LOG".
  static Result<std::unique_ptr<PerfLog>> FromEnvironment(const EnvLookup& lookup = EnvLookup());

  // Closes the file.
  ~PerfLog();
  PerfLog(const PerfLog&) = delete;
  PerfLog& operator=(const PerfLog&) = delete;

  // Appends ToJson(record) and a newline with one write(2) (retried for a
  // partial write or EINTR), so the line is in the kernel when Write returns
  // and a crash of the process loses nothing already written. Invalid UTF-8
  // in the record's strings is replaced by U+FFFD. A failed write is not
  // reported to the caller (metrics never fail a transfer): it is counted in
  // write_failures(), and the first one is logged as a warning.
  void Write(const RequestRecord& record);

  const std::string& path() const { return path_; }
  // Lines that could not be written completely.
  uint64_t write_failures() const;

 private:
  PerfLog(std::string path, int fd);

  const std::string path_;
  // Guards the file position of our writes and write_failures_.
  mutable std::mutex mu_;
  const int fd_;                 // owned; closed by the destructor
  uint64_t write_failures_ = 0;  // guarded by mu_
};

// ---------------------------------------------------------------------------
// The thread-safe aggregate of a session's metrics.
class Metrics {
 public:
  Metrics() = default;
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // Folds one settled request into the aggregates (see SideMetrics for what
  // each field sums), then writes it to the perf log, if one is set (outside
  // the aggregate lock). Record each request once per side, when it settles.
  // A record whose side or outcome lies outside its enum is written to the
  // perf log but not aggregated.
  void Record(const RequestRecord& record);
  // Record in two steps, for a caller that must aggregate before its peer or
  // application hears the outcome but would not make them wait for the perf
  // log's write(2): Aggregate, tell them, then WriteToPerfLog.
  void Aggregate(const RequestRecord& record);
  void WriteToPerfLog(const RequestRecord& record);

  // Adds n to a counter. A value outside the enum is ignored.
  void Count(Counter counter, uint64_t n = 1);
  // Sets MetricsSnapshot::grant_queue (and raises grant_queue_peak to it).
  void SetGrantQueue(uint64_t writers);

  // Counts `transfer` as in flight on `side` until it settles (a callback
  // registered with OnDone takes it off again; for a transfer that already
  // settled, at once). The count is an atomic shared with the callback, so a
  // transfer that outlives this object is harmless. A side outside the
  // enum is ignored.
  void TrackInFlight(Side side, Transfer& transfer);

  // A copy of every aggregate, taken under the lock (consistent: it reflects
  // a prefix of the Record/Count calls).
  MetricsSnapshot Snapshot() const;

  // Attaches a perf log, replacing (and eventually closing) any previous one;
  // nullptr turns the log off. Records in flight on other threads finish
  // writing to the log they started with.
  void SetPerfLog(std::unique_ptr<PerfLog> log);

 private:
  struct PathBuckets {
    BucketHistogram latency{kRequestLatencyBoundsNs};
    BucketHistogram bytes{kRequestBytesBounds};
  };

  mutable std::mutex mu_;
  MetricsSnapshot state_;              // guarded by mu_
  std::shared_ptr<PerfLog> perf_log_;  // guarded by mu_; shared with writers in flight
  // Lock-free: [Side][TransferPath].
  std::array<std::array<PathBuckets, kNumTransferPaths>, kNumSides> buckets_;
  std::array<std::shared_ptr<std::atomic<int64_t>>, kNumSides> in_flight_ = {
      std::make_shared<std::atomic<int64_t>>(0), std::make_shared<std::atomic<int64_t>>(0)};
};

}  // namespace kvbounce

#endif  // KVBOUNCE_SESSION_METRICS_H_
