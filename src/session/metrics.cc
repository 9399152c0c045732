#include "session/metrics.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <nlohmann/json.hpp>
#include <system_error>
#include <utility>

#include "kvbounce/logging.h"

namespace kvbounce {
namespace {

using Clock = std::chrono::steady_clock;

template <typename Enum>
size_t IndexOf(Enum value) {
  return static_cast<size_t>(value);
}

constexpr std::array<TransferPath, kNumTransferPaths> kPaths = {
    TransferPath::kPerBlock, TransferPath::kBounce, TransferPath::kDirect, TransferPath::kAuto};
constexpr std::array<Outcome, kNumOutcomes> kOutcomes = {Outcome::kCompleted, Outcome::kFailed,
                                                         Outcome::kCancelled, Outcome::kTimedOut};
constexpr std::array<Counter, kNumCounters> kCounters = {
    Counter::kRejectedResults, Counter::kDuplicateResults,  Counter::kQuarantinedSlots,
    Counter::kCancelsSent,     Counter::kCancelsReceived,   Counter::kPeerFailures,
    Counter::kChunksGranted,   Counter::kChunksWritten,     Counter::kChunksScattered,
    Counter::kCreditStallNs,   Counter::kInvalidTransitions};
constexpr std::array<TimelinePoint, kNumTimelinePoints> kPoints = {
    TimelinePoint::kRequest,   TimelinePoint::kReserve,     TimelinePoint::kFirstByte,
    TimelinePoint::kWriteDone, TimelinePoint::kScatterDone, TimelinePoint::kComplete};

// Arrays indexed by these enums rely on the values being 0..n-1 in order.
static_assert(static_cast<size_t>(TransferPath::kAuto) == kNumTransferPaths - 1);
static_assert(static_cast<size_t>(Outcome::kTimedOut) == kNumOutcomes - 1);
static_assert(static_cast<size_t>(Counter::kInvalidTransitions) == kNumCounters - 1);
static_assert(static_cast<size_t>(TimelinePoint::kComplete) == kNumTimelinePoints - 1);
static_assert(static_cast<size_t>(Side::kReceiver) == kNumSides - 1);

double Micros(Clock::duration d) {
  return static_cast<double>(std::chrono::duration_cast<std::chrono::nanoseconds>(d).count()) / 1e3;
}

double Millis(std::chrono::nanoseconds d) { return static_cast<double>(d.count()) / 1e6; }

nlohmann::json LatencyJson(const LatencyHistogram& h) {
  nlohmann::json j = nlohmann::json::object();
  j["count"] = h.count();
  j["mean"] = h.mean() / 1e6;
  j["p50"] = Millis(h.Percentile(50));
  j["p90"] = Millis(h.Percentile(90));
  j["p99"] = Millis(h.Percentile(99));
  j["max"] = Millis(h.max());
  return j;
}

nlohmann::json BucketsJson(const std::array<BucketCounts, kNumTransferPaths>& by_path,
                           std::span<const uint64_t> bounds, double unit) {
  nlohmann::json j = nlohmann::json::object();
  nlohmann::json b = nlohmann::json::array();
  for (uint64_t bound : bounds) b.push_back(static_cast<double>(bound) / unit);
  j["bounds"] = std::move(b);
  nlohmann::json paths = nlohmann::json::object();
  for (TransferPath path : kPaths) {
    const BucketCounts& c = by_path[IndexOf(path)];
    nlohmann::json counts = c.counts;
    if (c.counts.empty()) counts = std::vector<uint64_t>(bounds.size() + 1, 0);
    paths[std::string(TransferPathName(path))] = {{"counts", std::move(counts)},
                                                  {"sum", static_cast<double>(c.sum) / unit}};
  }
  j["by_path"] = std::move(paths);
  return j;
}

nlohmann::json SideJson(const SideMetrics& side) {
  nlohmann::json requests = nlohmann::json::object();
  for (Outcome outcome : kOutcomes) {
    requests[std::string(OutcomeName(outcome))] = side.requests_with(outcome);
  }
  requests["total"] = side.requests_total();

  nlohmann::json paths = nlohmann::json::object();
  nlohmann::json latency_by_path = nlohmann::json::object();
  for (TransferPath path : kPaths) {
    const std::string name(TransferPathName(path));
    paths[name] = side.taken(path);
    latency_by_path[name] = LatencyJson(side.latency_by_path[IndexOf(path)]);
  }

  nlohmann::json fallbacks = nlohmann::json::object();
  for (const auto& [reason, n] : side.fallbacks) fallbacks[reason] = n;

  nlohmann::json j = nlohmann::json::object();
  j["requests"] = std::move(requests);
  j["bytes_completed"] = side.bytes_completed;
  j["transport_writes"] = side.transport_writes;
  j["fragments"] = side.fragments;
  j["path_taken"] = std::move(paths);
  j["fallbacks"] = std::move(fallbacks);
  j["latency_ms"] = LatencyJson(side.latency);
  j["latency_ms_by_path"] = std::move(latency_by_path);
  nlohmann::json by_path = nlohmann::json::object();
  for (TransferPath path : kPaths) {
    nlohmann::json outcomes = nlohmann::json::object();
    for (Outcome outcome : kOutcomes) {
      outcomes[std::string(OutcomeName(outcome))] =
          side.requests_by_path[IndexOf(path)][IndexOf(outcome)];
    }
    by_path[std::string(TransferPathName(path))] = std::move(outcomes);
  }
  j["requests_by_path"] = std::move(by_path);
  j["requests_in_flight"] = side.in_flight;
  j["latency_seconds_buckets"] = BucketsJson(side.latency_buckets, kRequestLatencyBoundsNs, 1e9);
  j["bytes_buckets"] = BucketsJson(side.bytes_buckets, kRequestBytesBounds, 1);
  return j;
}

// open(2) failures that are about the path the user gave.
bool IsPathErrno(int err) {
  switch (err) {
    case ENOENT:
    case ENOTDIR:
    case EISDIR:
    case EACCES:
    case EPERM:
    case EROFS:
    case ENAMETOOLONG:
    case ELOOP:
    case EINVAL:
    case ETXTBSY:
      return true;
    default:
      return false;
  }
}

}  // namespace

std::string_view SideName(Side side) {
  switch (side) {
    case Side::kSender:
      return "sender";
    case Side::kReceiver:
      return "receiver";
  }
  return "?";
}

std::string_view OutcomeName(Outcome outcome) {
  switch (outcome) {
    case Outcome::kCompleted:
      return "completed";
    case Outcome::kFailed:
      return "failed";
    case Outcome::kCancelled:
      return "cancelled";
    case Outcome::kTimedOut:
      return "timed_out";
  }
  return "?";
}

std::string_view CounterName(Counter counter) {
  switch (counter) {
    case Counter::kRejectedResults:
      return "rejected_results";
    case Counter::kDuplicateResults:
      return "duplicate_results";
    case Counter::kQuarantinedSlots:
      return "quarantined_slots";
    case Counter::kCancelsSent:
      return "cancels_sent";
    case Counter::kCancelsReceived:
      return "cancels_received";
    case Counter::kPeerFailures:
      return "peer_failures";
    case Counter::kChunksGranted:
      return "chunks_granted";
    case Counter::kChunksWritten:
      return "chunks_written";
    case Counter::kChunksScattered:
      return "chunks_scattered";
    case Counter::kCreditStallNs:
      return "credit_stall_ns";
    case Counter::kInvalidTransitions:
      return "invalid_transitions";
  }
  return "?";
}

std::string_view TimelinePointName(TimelinePoint point) {
  switch (point) {
    case TimelinePoint::kRequest:
      return "request";
    case TimelinePoint::kReserve:
      return "reserve";
    case TimelinePoint::kFirstByte:
      return "first_byte";
    case TimelinePoint::kWriteDone:
      return "write_done";
    case TimelinePoint::kScatterDone:
      return "scatter_done";
    case TimelinePoint::kComplete:
      return "complete";
  }
  return "?";
}

// --- RequestTimeline ---------------------------------------------------------

Clock::time_point RequestTimeline::At(TimelinePoint point) const {
  switch (point) {
    case TimelinePoint::kRequest:
      return request;
    case TimelinePoint::kReserve:
      return reserve;
    case TimelinePoint::kFirstByte:
      return first_byte;
    case TimelinePoint::kWriteDone:
      return write_done;
    case TimelinePoint::kScatterDone:
      return scatter_done;
    case TimelinePoint::kComplete:
      return complete;
  }
  return Clock::time_point();
}

std::optional<double> RequestTimeline::MicrosBetween(TimelinePoint from, TimelinePoint to) const {
  const Clock::time_point a = At(from);
  const Clock::time_point b = At(to);
  if (!Reached(a) || !Reached(b)) return std::nullopt;
  return Micros(b - a);
}

PhaseDurations RequestTimeline::Phases() const {
  std::array<std::optional<double>, kNumTimelinePoints> ending_at;
  std::optional<Clock::time_point> previous;
  for (TimelinePoint point : kPoints) {
    const Clock::time_point t = At(point);
    if (!Reached(t)) continue;
    if (previous) ending_at[IndexOf(point)] = Micros(t - *previous);
    previous = t;
  }
  PhaseDurations phases;
  phases.reserve_us = ending_at[IndexOf(TimelinePoint::kReserve)];
  phases.first_byte_us = ending_at[IndexOf(TimelinePoint::kFirstByte)];
  phases.write_us = ending_at[IndexOf(TimelinePoint::kWriteDone)];
  phases.scatter_us = ending_at[IndexOf(TimelinePoint::kScatterDone)];
  phases.settle_us = ending_at[IndexOf(TimelinePoint::kComplete)];
  phases.total_us = MicrosBetween(TimelinePoint::kRequest, TimelinePoint::kComplete);
  return phases;
}

// --- LatencyHistogram --------------------------------------------------------

size_t LatencyHistogram::BucketOf(uint64_t ns) {
  if (ns < kSubBuckets) return static_cast<size_t>(ns);
  if (ns >= kMaxTrackableNs) return kMaxBuckets - 1;
  const int exponent = std::bit_width(ns) - 1;  // >= kSubBucketBits
  const int shift = exponent - kSubBucketBits;
  const uint64_t sub = (ns >> shift) - kSubBuckets;
  return static_cast<size_t>((static_cast<uint64_t>(shift) + 1) * kSubBuckets + sub);
}

uint64_t LatencyHistogram::BucketUpper(size_t index) {
  if (index < kSubBuckets) return index;
  if (index >= kMaxBuckets - 1) return std::numeric_limits<uint64_t>::max();
  const uint64_t shift = index / kSubBuckets - 1;
  const uint64_t sub = index % kSubBuckets;
  return ((kSubBuckets + sub + 1) << shift) - 1;
}

void LatencyHistogram::Add(std::chrono::nanoseconds value) {
  const uint64_t ns = value.count() > 0 ? static_cast<uint64_t>(value.count()) : 0;
  const size_t index = BucketOf(ns);
  if (index >= counts_.size()) counts_.resize(index + 1, 0);
  ++counts_[index];
  min_ns_ = count_ == 0 ? ns : std::min(min_ns_, ns);
  max_ns_ = std::max(max_ns_, ns);
  sum_ns_ += static_cast<double>(ns);
  ++count_;
}

std::chrono::nanoseconds LatencyHistogram::Percentile(double p) const {
  if (count_ == 0) return std::chrono::nanoseconds(0);
  if (!(p > 0.0)) return min();  // also NaN
  if (p >= 100.0) return max();
  const double wanted = std::ceil(p / 100.0 * static_cast<double>(count_));
  const uint64_t rank = std::clamp<uint64_t>(static_cast<uint64_t>(wanted), uint64_t{1}, count_);
  uint64_t seen = 0;
  for (size_t i = 0; i < counts_.size(); ++i) {
    seen += counts_[i];
    if (seen >= rank) {
      return std::chrono::nanoseconds(static_cast<int64_t>(std::min(BucketUpper(i), max_ns_)));
    }
  }
  return max();  // unreachable: the counts add up to count_
}

void LatencyHistogram::Merge(const LatencyHistogram& other) {
  if (other.count_ == 0) return;
  if (other.counts_.size() > counts_.size()) counts_.resize(other.counts_.size(), 0);
  for (size_t i = 0; i < other.counts_.size(); ++i) counts_[i] += other.counts_[i];
  min_ns_ = count_ == 0 ? other.min_ns_ : std::min(min_ns_, other.min_ns_);
  max_ns_ = std::max(max_ns_, other.max_ns_);
  sum_ns_ += other.sum_ns_;
  count_ += other.count_;
}

// --- SideMetrics / JSON ------------------------------------------------------

uint64_t SideMetrics::requests_with(Outcome outcome) const {
  const size_t i = IndexOf(outcome);
  return i < requests.size() ? requests[i] : 0;
}

uint64_t SideMetrics::requests_total() const {
  uint64_t total = 0;
  for (uint64_t n : requests) total += n;
  return total;
}

uint64_t SideMetrics::taken(TransferPath path) const {
  const size_t i = IndexOf(path);
  return i < path_taken.size() ? path_taken[i] : 0;
}

nlohmann::json ToJson(const MetricsSnapshot& snapshot) {
  nlohmann::json counters = nlohmann::json::object();
  for (Counter counter : kCounters) {
    counters[std::string(CounterName(counter))] = snapshot.counter(counter);
  }
  nlohmann::json j = nlohmann::json::object();
  j[std::string(SideName(Side::kSender))] = SideJson(snapshot.side(Side::kSender));
  j[std::string(SideName(Side::kReceiver))] = SideJson(snapshot.side(Side::kReceiver));
  j["counters"] = std::move(counters);
  j["grant_queue"] = {{"now", snapshot.grant_queue}, {"peak", snapshot.grant_queue_peak}};
  return j;
}

nlohmann::json ToJson(const RequestRecord& record) {
  nlohmann::json j = nlohmann::json::object();
  j["request_id"] = record.request_id;
  j["side"] = SideName(record.side);
  j["rank"] = record.rank;
  j["instance"] = record.instance;
  j["peer_instance"] = record.peer_instance;
  j["path_requested"] = TransferPathName(record.path_requested);
  j["path_taken"] = TransferPathName(record.path_taken);
  j["fallback_reason"] = record.fallback_reason;
  j["bytes"] = record.bytes;
  j["fragments"] = record.fragments;
  j["transport_writes"] = record.transport_writes;
  j["writers"] = record.writers;
  j["outcome"] = OutcomeName(record.outcome);
  j["error"] = record.error;
  j["chunks"] = record.chunks;
  j["chunk_writer_us"] = record.chunk_writer_us;
  j["chunk_scatter_us"] = record.chunk_scatter_us;
  j["chunk_slots_peak"] = record.chunk_slots_peak;
  j["credit_stall_us"] = record.credit_stall_us;

  const RequestTimeline& t = record.timeline;
  const bool has_request = RequestTimeline::Reached(t.request);
  if (has_request) {
    j["request_steady_us"] =
        std::chrono::duration_cast<std::chrono::microseconds>(t.request.time_since_epoch()).count();
  } else {
    j["request_steady_us"] = nullptr;
  }
  for (TimelinePoint point : kPoints) {
    if (point == TimelinePoint::kRequest) continue;
    const std::string key = std::string(TimelinePointName(point)) + "_us";
    const std::optional<double> us = t.MicrosBetween(TimelinePoint::kRequest, point);
    if (us) {
      j[key] = *us;
    } else {
      j[key] = nullptr;
    }
  }
  return j;
}

// --- PerfLog -----------------------------------------------------------------

PerfLog::PerfLog(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}

PerfLog::~PerfLog() {
  if (::close(fd_) != 0) {
    const int err = errno;
    Log(LogLevel::kWarning,
        "perf log: closing '" + path_ + "' failed: " + std::generic_category().message(err));
  }
}

Result<std::unique_ptr<PerfLog>> PerfLog::Open(const std::string& path) {
  if (path.empty()) return InvalidArgumentError("perf log: empty path");
  int fd = -1;
  do {
    fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) {
    const int err = errno;
    const std::string message = "perf log: cannot open '" + path +
                                "' for appending: " + std::generic_category().message(err);
    return IsPathErrno(err) ? InvalidArgumentError(message) : InternalError(message);
  }
  return std::unique_ptr<PerfLog>(new PerfLog(path, fd));
}

Result<std::unique_ptr<PerfLog>> PerfLog::FromEnvironment(const EnvLookup& lookup) {
  const char* value = lookup ? lookup(kEnvVar) : std::getenv(kEnvVar);
  if (value == nullptr || *value == '\0') return std::unique_ptr<PerfLog>();
  auto log = Open(value);
  if (!log.ok()) return log.status().WithContext(kEnvVar);
  return log;
}

void PerfLog::Write(const RequestRecord& record) {
  std::string line = ToJson(record).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  line.push_back('\n');

  int failed_errno = 0;
  bool first_failure = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    size_t done = 0;
    while (done < line.size()) {
      const ssize_t n = ::write(fd_, line.data() + done, line.size() - done);
      if (n < 0) {
        if (errno == EINTR) continue;
        failed_errno = errno;
        break;
      }
      if (n == 0) {  // not expected for a regular file; do not spin
        failed_errno = EIO;
        break;
      }
      done += static_cast<size_t>(n);
    }
    if (failed_errno != 0) first_failure = write_failures_++ == 0;
  }
  if (first_failure) {
    Log(LogLevel::kWarning, "perf log: writing to '" + path_ +
                                "' failed: " + std::generic_category().message(failed_errno) +
                                " (further failures are counted, not logged)");
  }
}

uint64_t PerfLog::write_failures() const {
  std::lock_guard<std::mutex> lock(mu_);
  return write_failures_;
}

// --- Metrics -----------------------------------------------------------------

uint64_t BucketCounts::count() const {
  uint64_t n = 0;
  for (uint64_t c : counts) n += c;
  return n;
}

BucketHistogram::BucketHistogram(std::span<const uint64_t> bounds)
    : bounds_(bounds.first(std::min(bounds.size(), kMaxBounds))) {}

void BucketHistogram::Add(uint64_t value) {
  const size_t i = static_cast<size_t>(std::lower_bound(bounds_.begin(), bounds_.end(), value) -
                                       bounds_.begin());
  counts_[i].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(value, std::memory_order_relaxed);
}

BucketCounts BucketHistogram::Snapshot() const {
  BucketCounts out;
  out.counts.resize(bounds_.size() + 1);
  for (size_t i = 0; i < out.counts.size(); ++i) {
    out.counts[i] = counts_[i].load(std::memory_order_relaxed);
  }
  out.sum = sum_.load(std::memory_order_relaxed);
  return out;
}

void Metrics::Record(const RequestRecord& record) {
  Aggregate(record);
  WriteToPerfLog(record);
}

void Metrics::WriteToPerfLog(const RequestRecord& record) {
  std::shared_ptr<PerfLog> log;
  {
    std::lock_guard<std::mutex> lock(mu_);
    log = perf_log_;
  }
  if (log) log->Write(record);
}

void Metrics::Aggregate(const RequestRecord& record) {
  std::lock_guard<std::mutex> lock(mu_);
  const size_t side_index = IndexOf(record.side);
  const size_t outcome_index = IndexOf(record.outcome);
  if (side_index < kNumSides && outcome_index < kNumOutcomes) {
    SideMetrics& side = state_.sides[side_index];
    ++side.requests[outcome_index];
    side.transport_writes += record.transport_writes;
    side.fragments += record.fragments;
    const size_t path_index = IndexOf(record.path_taken);
    const bool known_path = path_index < kNumTransferPaths;
    if (known_path) {
      ++side.path_taken[path_index];
      ++side.requests_by_path[path_index][outcome_index];
    }
    if (!record.fallback_reason.empty()) ++side.fallbacks[record.fallback_reason];
    if (record.outcome == Outcome::kCompleted) {
      side.bytes_completed += record.bytes;
      if (known_path) buckets_[side_index][path_index].bytes.Add(record.bytes);
      const RequestTimeline& t = record.timeline;
      if (RequestTimeline::Reached(t.request) && RequestTimeline::Reached(t.complete)) {
        const auto latency =
            std::chrono::duration_cast<std::chrono::nanoseconds>(t.complete - t.request);
        side.latency.Add(latency);
        if (known_path) {
          side.latency_by_path[path_index].Add(latency);
          buckets_[side_index][path_index].latency.Add(
              static_cast<uint64_t>(std::max<int64_t>(0, latency.count())));
        }
      }
    }
  }
}

void Metrics::Count(Counter counter, uint64_t n) {
  const size_t i = IndexOf(counter);
  if (i >= kNumCounters) return;
  std::lock_guard<std::mutex> lock(mu_);
  state_.counters[i] += n;
}

void Metrics::SetGrantQueue(uint64_t writers) {
  std::lock_guard<std::mutex> lock(mu_);
  state_.grant_queue = writers;
  state_.grant_queue_peak = std::max(state_.grant_queue_peak, writers);
}

void Metrics::TrackInFlight(Side side, Transfer& transfer) {
  const size_t i = IndexOf(side);
  if (i >= kNumSides) return;
  std::shared_ptr<std::atomic<int64_t>> n = in_flight_[i];
  n->fetch_add(1, std::memory_order_relaxed);
  transfer.OnDone([n](const Status&) { n->fetch_sub(1, std::memory_order_relaxed); });
}

MetricsSnapshot Metrics::Snapshot() const {
  MetricsSnapshot out;
  {
    std::lock_guard<std::mutex> lock(mu_);
    out = state_;
  }
  // After the locked copy: a request counted there is in these buckets too.
  for (size_t s = 0; s < kNumSides; ++s) {
    SideMetrics& side = out.sides[s];
    for (size_t p = 0; p < kNumTransferPaths; ++p) {
      side.latency_buckets[p] = buckets_[s][p].latency.Snapshot();
      side.bytes_buckets[p] = buckets_[s][p].bytes.Snapshot();
    }
    side.in_flight = in_flight_[s]->load(std::memory_order_relaxed);
  }
  return out;
}

void Metrics::SetPerfLog(std::unique_ptr<PerfLog> log) {
  std::shared_ptr<PerfLog> previous;
  {
    std::lock_guard<std::mutex> lock(mu_);
    previous = std::exchange(perf_log_, std::shared_ptr<PerfLog>(std::move(log)));
  }
  // `previous` is closed here, outside the lock, unless a Record still uses it.
}

}  // namespace kvbounce
