#include "tools/chaos.h"

#include <algorithm>
#include <atomic>
#include <charconv>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <utility>

namespace kvbounce::tools {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::duration_cast;
using std::chrono::microseconds;
using std::chrono::milliseconds;

// What touched a request (bit set). A failure is explained by these.
enum Mark : uint32_t {
  kMarkCancelPull = 1,
  kMarkPullDeadline = 2,
  kMarkPublishTtl = 4,
  kMarkRetire = 8,
  kMarkCancelPublication = 16,
  // The driver cancelled the pulls because a publication could not start.
  kMarkPublishFailed = 32,
};
constexpr uint32_t kPublicationSide = kMarkPublishTtl | kMarkRetire | kMarkCancelPublication;

std::string MarkNames(uint32_t marks, bool restart) {
  std::string out;
  auto add = [&](bool on, const char* name) {
    if (on) out += (out.empty() ? "" : ",") + std::string(name);
  };
  add(marks & kMarkCancelPull, "cancel");
  add(marks & kMarkPullDeadline, "short-deadline");
  add(marks & kMarkPublishTtl, "short-ttl");
  add(marks & kMarkRetire, "retire");
  add(marks & kMarkCancelPublication, "cancel-publication");
  add(marks & kMarkPublishFailed, "publish-failed");
  add(restart, "restart");
  return out.empty() ? "none" : out;
}

bool Injected(const Status& s) {
  return std::string_view(s.message()).find("injected") != std::string_view::npos;
}

// The receiver declared a writer's connection dead: the writer did not stop
// within the grace period after a request was abandoned (docs/architecture.md §6).
bool WriterDeclaredDead(const Status& s) {
  return std::string_view(s.message()).find("did not stop within the grace period") !=
         std::string_view::npos;
}

// "Pull: not connected to writer ctx0 rank 2" -> 2.
std::optional<int> UnconnectedWriter(const Status& s) {
  const std::string_view m = s.message();
  if (s.code() != StatusCode::kFailedPrecondition ||
      m.find("not connected to writer") == std::string_view::npos) {
    return std::nullopt;
  }
  const size_t at = m.rfind("rank ");
  if (at == std::string_view::npos) return std::nullopt;
  int rank = 0;
  const char* begin = m.data() + at + 5;
  const char* end = m.data() + m.size();
  auto [ptr, ec] = std::from_chars(begin, end, rank);
  if (ec != std::errc() || ptr == begin) return std::nullopt;
  return rank;
}

// Whether an outcome of a pull that started is explained by what touched it.
bool PullExplained(const Status& s, uint32_t marks, bool restart, bool injecting) {
  switch (s.code()) {
    case StatusCode::kOk:
      return true;
    case StatusCode::kCancelled:
      return restart || (marks & (kMarkCancelPull | kPublicationSide | kMarkPublishFailed)) != 0;
    case StatusCode::kDeadlineExceeded:
      return restart || (marks & (kMarkPullDeadline | kPublicationSide)) != 0;
    case StatusCode::kUnavailable:
      return restart || (marks & kPublicationSide) != 0 || (injecting && Injected(s)) ||
             WriterDeclaredDead(s);
    case StatusCode::kAborted:
      return restart;
    default:
      return false;
  }
}

// Whether a publication's outcome is explained. A publication whose pulls
// did not all succeed ends at its ttl or with the driver's cancel.
bool PublicationExplained(const Status& s, bool restart) {
  switch (s.code()) {
    case StatusCode::kOk:
    case StatusCode::kCancelled:
    case StatusCode::kDeadlineExceeded:
      return true;
    case StatusCode::kAborted:
      return restart;
    default:
      return false;
  }
}

// A call that could not start (Pull / Publish returned an error).
bool StartExplained(const Status& s, bool restart) {
  switch (s.code()) {
    case StatusCode::kAborted:             // the agent was shut down
    case StatusCode::kFailedPrecondition:  // not (yet) reconnected to a writer
    case StatusCode::kNotFound:
    case StatusCode::kUnavailable:
      return restart;
    default:
      return false;
  }
}

std::string Code(const Status& s) { return std::string(StatusCodeName(s.code())); }

uint64_t Mix(uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Wakes a driver when one of its pulls settled.
struct Signal {
  std::mutex mu;
  std::condition_variable cv;
  uint64_t events = 0;
};

struct Tally {
  std::map<std::string, uint64_t> actions;
  std::map<std::string, uint64_t> pull_outcomes, pulls_not_started;
  std::map<std::string, uint64_t> publication_outcomes, publications_not_started;
  std::map<std::string, std::map<std::string, uint64_t>> by_path;
  uint64_t requests = 0, pulls = 0, publications = 0;
  uint64_t requests_failed_by_injection = 0;
  std::map<std::string, uint64_t> checks;
  uint64_t violations[kNumViolations] = {};
  std::string examples[kNumViolations];
  std::map<std::string, std::map<std::string, uint64_t>> violations_by_path;
  std::map<std::string, std::map<std::string, uint64_t>> violations_by_actions;
  // The first message of each (kind of outcome, code), e.g.
  // "pull UNAVAILABLE" -> "...".
  std::map<std::string, std::string> outcome_examples;
};

class ChaosRun {
 public:
  ChaosRun(Cluster& c, const ChaosOptions& o, std::ostream& log)
      : c_(c), o_(o), log_(log), checker_(c) {
    slots_.resize(static_cast<size_t>(2 * o.concurrency));
    for (const char* a : {"pull_cancels", "pull_deadlines", "publish_ttls", "retires",
                          "publication_cancels", "ctx_restarts", "gen_restarts"}) {
      tally_.actions[a] = 0;
    }
  }

  nlohmann::json Run();

 private:
  struct SlotState {
    bool canary = false;        // its gen slots hold the canary of a settled request
    bool hung = false;          // a request in it never settled: never reused
    std::vector<int> poisoned;  // ctx ranks whose slot holds poison
    // The request that settled last in it, for reports.
    TransferPath last_path = TransferPath::kAuto;
    std::string last_request;
    std::string last_actions;
  };
  enum class ActionKind { kCancelPull, kRetire, kCancelPublication };
  struct Action {
    Clock::time_point at;
    ActionKind kind;
    int target;
  };
  struct PullRec {
    std::shared_ptr<Agent> agent;  // the one that took the call
    std::shared_ptr<Transfer> transfer;
    Status start_error;
    Clock::time_point watchdog;
    std::shared_ptr<std::atomic<uint64_t>> settle_epoch;
    bool processed = false;
  };
  struct PubRec {
    std::shared_ptr<Agent> agent;  // the one that took the call
    std::shared_ptr<Transfer> transfer;
    Status start_error;
    Clock::time_point watchdog;
    bool processed = false;
  };

  void Driver(int d);
  // One request in `slot`; false when something in it never settled.
  bool Request(int slot, std::mt19937_64& rng);
  void Restarter();
  // Reconnects gen rank `g` to ctx rank `k` unless that was done after
  // `since` already. False when the connection could not be made.
  bool Repair(int g, int k, Clock::time_point since);
  // `path`: the path of the request it happened to ("" when none).
  // `actions`: what touched that request (MarkNames), "" when none.
  void Violate(Violation v, const std::string& detail, const TransferPath* path = nullptr,
               const std::string& actions = "");
  void Bump(std::map<std::string, uint64_t> Tally::*field, const std::string& key) {
    std::lock_guard<std::mutex> lock(mu_);
    ++(tally_.*field)[key];
  }
  // Counts an outcome under its code and keeps the first message of each.
  void Outcome(std::map<std::string, uint64_t> Tally::*field, const char* kind, const Status& s) {
    std::lock_guard<std::mutex> lock(mu_);
    ++(tally_.*field)[Code(s)];
    if (!s.ok()) tally_.outcome_examples.emplace(std::string(kind) + " " + Code(s), s.ToString());
  }
  void Check(const std::string& name, uint64_t n = 1) {
    std::lock_guard<std::mutex> lock(mu_);
    tally_.checks[name] += n;
  }
  microseconds ActionDelay(double fraction);
  Clock::duration Watchdog(milliseconds deadline) const {
    return deadline + 2 * c_.options().grace + o_.watchdog_slack;
  }
  nlohmann::json Report(double seconds, uint64_t outstanding);

  Cluster& c_;
  const ChaosOptions& o_;
  std::ostream& log_;
  SettleChecker checker_;
  Clock::time_point end_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> next_id_{1};
  std::atomic<int64_t> issued_{0};
  // Odd while a restart is in progress. Shared with completion callbacks,
  // which may outlive the run.
  std::shared_ptr<std::atomic<uint64_t>> epoch_ = std::make_shared<std::atomic<uint64_t>>(0);
  std::vector<SlotState> slots_;  // slot s is used by driver s / 2 only

  std::mutex mu_;  // tally_ and latency_us_
  Tally tally_;
  double latency_us_ = 1000;  // moving average of OK pulls: scales action delays

  std::mutex stop_mu_;
  std::condition_variable stop_cv_;

  std::mutex repair_mu_;  // serializes Repair
  std::map<std::pair<int, int>, Clock::time_point> repaired_at_;
};

bool ChaosRun::Repair(int g, int k, Clock::time_point since) {
  std::lock_guard<std::mutex> lock(repair_mu_);
  auto it = repaired_at_.find({g, k});
  if (it != repaired_at_.end() && it->second >= since) return true;  // done meanwhile
  const Status s = c_.Reconnect(g, k);
  repaired_at_[{g, k}] = Clock::now();
  Bump(&Tally::actions, "reconnects");
  if (!s.ok()) {
    Violate(Violation::kRestartFailed, "reconnecting gen rank " + std::to_string(g) +
                                           " to ctx rank " + std::to_string(k) + ": " +
                                           s.ToString());
    return false;
  }
  return true;
}

void ChaosRun::Violate(Violation v, const std::string& detail, const TransferPath* path,
                       const std::string& actions) {
  std::lock_guard<std::mutex> lock(mu_);
  const int i = static_cast<int>(v);
  if (tally_.violations[i]++ == 0) tally_.examples[i] = detail;
  const std::string kind(ViolationName(v));
  if (path != nullptr) ++tally_.violations_by_path[kind][std::string(TransferPathName(*path))];
  if (!actions.empty()) ++tally_.violations_by_actions[kind][actions];
}

microseconds ChaosRun::ActionDelay(double fraction) {
  double mean = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    mean = latency_us_;
  }
  const double us = std::clamp(fraction * 2 * mean, 10.0, 20000.0);
  return microseconds(static_cast<int64_t>(us));
}

bool ChaosRun::Request(int slot, std::mt19937_64& rng) {
  const uint64_t id = next_id_.fetch_add(1);
  std::uniform_real_distribution<double> u(0, 1);
  // Every random decision is drawn here, before anything depends on timing.
  const TransferPath path = o_.paths[rng() % o_.paths.size()];
  PullOptions pull_options;
  pull_options.path = path;
  PublishOptions publish_options;
  uint32_t marks = 0;
  if (u(rng) < o_.pull_deadline_rate) {
    marks |= kMarkPullDeadline;
    pull_options.timeout = milliseconds(1 + rng() % 5);
  }
  if (u(rng) < o_.publish_ttl_rate) {
    marks |= kMarkPublishTtl;
    publish_options.ttl = milliseconds(1 + rng() % 5);
  }
  struct Planned {
    ActionKind kind;
    double fraction;
    int target;
  };
  std::vector<Planned> planned;
  const int num_gen = c_.num_gen();
  const int num_ctx = c_.num_ctx();
  if (u(rng) < o_.cancel_rate) {
    // Target num_gen: every gen rank's pull.
    planned.push_back({ActionKind::kCancelPull, u(rng), static_cast<int>(rng() % (num_gen + 1))});
  }
  if (u(rng) < o_.retire_rate) {
    planned.push_back({ActionKind::kRetire, u(rng), static_cast<int>(rng() % num_ctx)});
  }
  if (u(rng) < o_.cancel_publication_rate) {
    planned.push_back({ActionKind::kCancelPublication, u(rng), static_cast<int>(rng() % num_ctx)});
  }
  const bool pulls_first = u(rng) < 0.25;
  const BlockTables tables = c_.Tables(slot, o_.tokens.end, rng);
  const std::string name = "request " + std::to_string(id) + " (" +
                           std::string(TransferPathName(path)) + ", slot " + std::to_string(slot) +
                           ")";

  if (marks & kMarkPullDeadline) Bump(&Tally::actions, "pull_deadlines");
  if (marks & kMarkPublishTtl) Bump(&Tally::actions, "publish_ttls");
  const uint64_t epoch_start = epoch_->load();
  auto signal = std::make_shared<Signal>();
  std::vector<PullRec> pulls(static_cast<size_t>(num_gen));
  std::vector<PubRec> pubs(static_cast<size_t>(num_ctx));

  auto wake = [signal](const Status&) {
    std::lock_guard<std::mutex> lock(signal->mu);
    ++signal->events;
    signal->cv.notify_all();
  };
  auto publish = [&] {
    for (int k = 0; k < num_ctx; ++k) {
      PubRec& rec = pubs[static_cast<size_t>(k)];
      rec.watchdog = Clock::now() +
                     Watchdog(publish_options.ttl.count() > 0 ? publish_options.ttl : o_.timeout);
      rec.agent = c_.CtxAgent(k);
      PublishOptions with_state = publish_options;
      with_state.state_slot = c_.harness(true, k).StateSlot(tables.slot);
      Result<std::shared_ptr<Transfer>> p =
          rec.agent->Publish(id, tables.ctx, o_.tokens.end, with_state);
      if (!p.ok()) {
        rec.start_error = p.status();
        continue;
      }
      rec.transfer = std::move(p).value();
      rec.transfer->OnDone(wake);
    }
  };
  auto pull = [&] {
    for (int g = 0; g < num_gen; ++g) {
      PullRec& rec = pulls[static_cast<size_t>(g)];
      const milliseconds deadline =
          pull_options.timeout.count() > 0 ? pull_options.timeout : o_.timeout;
      rec.watchdog = Clock::now() + Watchdog(deadline);
      PullOptions with_state = pull_options;
      with_state.state_slot = c_.harness(false, g).StateSlot(tables.slot);
      Result<std::shared_ptr<Transfer>> p =
          c_.GenAgent(g)->Pull(id, c_.options().ctx_instance, tables.gen, o_.tokens, with_state);
      if (!p.ok()) {
        rec.start_error = p.status();
        continue;
      }
      rec.transfer = std::move(p).value();
      rec.settle_epoch = std::make_shared<std::atomic<uint64_t>>(0);
      rec.transfer->OnDone([wake, epoch = epoch_, settled = rec.settle_epoch](const Status& s) {
        settled->store(epoch->load());
        wake(s);
      });
    }
  };
  const Clock::time_point t0 = Clock::now();
  if (pulls_first) {
    pull();
    publish();
  } else {
    publish();
    pull();
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++tally_.requests;
    tally_.pulls += static_cast<uint64_t>(num_gen);
    tally_.publications += static_cast<uint64_t>(num_ctx);
  }
  bool publish_failed = false;
  for (int k = 0; k < num_ctx; ++k) {
    const PubRec& p = pubs[static_cast<size_t>(k)];
    if (p.transfer != nullptr) continue;
    publish_failed = true;
    const bool restart = (epoch_start & 1) != 0 || epoch_->load() != epoch_start;
    Outcome(&Tally::publications_not_started, "publish", p.start_error);
    if (!StartExplained(p.start_error, restart)) {
      Violate(Violation::kUnexplainedFailure, name + ": Publish on ctx rank " + std::to_string(k) +
                                                  " failed: " + p.start_error.ToString());
    }
  }
  if (publish_failed) {
    // Its pulls would only wait for their deadline.
    marks |= kMarkPublishFailed;
    for (PullRec& rec : pulls) {
      if (rec.transfer != nullptr) rec.transfer->Cancel();
    }
  }

  std::vector<Action> actions;
  for (const Planned& p : planned)
    actions.push_back({t0 + ActionDelay(p.fraction), p.kind, p.target});
  std::sort(actions.begin(), actions.end(),
            [](const Action& a, const Action& b) { return a.at < b.at; });
  size_t next_action = 0;
  auto perform = [&](const Action& a) {
    switch (a.kind) {
      case ActionKind::kCancelPull:
        marks |= kMarkCancelPull;
        for (int g = 0; g < num_gen; ++g) {
          PullRec& rec = pulls[static_cast<size_t>(g)];
          if ((a.target == num_gen || a.target == g) && rec.transfer != nullptr) {
            rec.transfer->Cancel();
          }
        }
        Bump(&Tally::actions, "pull_cancels");
        break;
      case ActionKind::kRetire:
        marks |= kMarkRetire;
        c_.CtxAgent(a.target)->Retire(id).IgnoreError();  // kNotFound once settled
        Bump(&Tally::actions, "retires");
        break;
      case ActionKind::kCancelPublication:
        marks |= kMarkCancelPublication;
        if (pubs[static_cast<size_t>(a.target)].transfer != nullptr) {
          pubs[static_cast<size_t>(a.target)].transfer->Cancel();
        }
        Bump(&Tally::actions, "publication_cancels");
        break;
    }
  };

  const bool injecting = o_.inject_fail_rate > 0;
  bool failed_by_injection = false;
  auto settled_pull = [&](int g, PullRec& rec, const Status& outcome) {
    const bool restart = (epoch_start & 1) != 0 || rec.settle_epoch->load() != epoch_start;
    const std::string where = name + " on gen rank " + std::to_string(g);
    if (outcome.ok()) {
      const SettleChecker::PullCheck check = checker_.CheckOkPull(g, tables, o_.tokens);
      Check("ok_pulls_verified");
      Check("verified_bytes", check.verify.verified_bytes);
      if (check.violation) {
        Violate(*check.violation,
                where + " (actions: " + MarkNames(marks, restart) + "): " + check.detail, &path,
                MarkNames(marks, restart));
      }
      const double us =
          static_cast<double>(duration_cast<microseconds>(rec.transfer->info().latency).count());
      std::lock_guard<std::mutex> lock(mu_);
      latency_us_ = 0.9 * latency_us_ + 0.1 * us;
    }
    checker_.WriteCanary(g, slot);
    Check("canaries_written");
    Outcome(&Tally::pull_outcomes, "pull", outcome);
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto& p = tally_.by_path[std::string(TransferPathName(path))];
      ++p["pulls"];
      if (outcome.ok()) ++p["ok"];
    }
    if (!outcome.ok() && Injected(outcome)) failed_by_injection = true;
    if (!PullExplained(outcome, marks, restart, injecting)) {
      Violate(Violation::kUnexplainedFailure,
              where + " (actions: " + MarkNames(marks, restart) + "): " + outcome.ToString(), &path,
              MarkNames(marks, restart));
    }
  };

  // A publication that settled other than OK gives its blocks back: poison
  // them at once, while the pulls may still be in flight.
  auto settled_publication = [&](int k, const Status& outcome) {
    Outcome(&Tally::publication_outcomes, "publication", outcome);
    const bool restart = (epoch_start & 1) != 0 || epoch_->load() != epoch_start;
    if (!PublicationExplained(outcome, restart)) {
      Violate(Violation::kUnexplainedFailure, name + ": the publication on ctx rank " +
                                                  std::to_string(k) + ": " + outcome.ToString());
    }
    if (!outcome.ok()) {
      checker_.Poison(k, slot);
      slots_[static_cast<size_t>(slot)].poisoned.push_back(k);
      Check("publications_poisoned");
    }
  };

  uint64_t seen_events = 0;
  bool pulls_done = false;
  while (true) {
    bool all_settled = true;
    for (int g = 0; g < num_gen; ++g) {
      PullRec& rec = pulls[static_cast<size_t>(g)];
      if (rec.processed) continue;
      if (rec.transfer == nullptr) {
        rec.processed = true;
        const bool restart = (epoch_start & 1) != 0 || epoch_->load() != epoch_start;
        Outcome(&Tally::pulls_not_started, "pull start", rec.start_error);
        bool repaired = false;
        if (const std::optional<int> writer = UnconnectedWriter(rec.start_error);
            writer && !restart && *writer >= 0 && *writer < num_ctx) {
          // Outside a restart only the receiver itself drops a writer (one
          // that did not stop within the grace period): reconnect it, as an
          // engine would.
          repaired = Repair(g, *writer, t0);
        }
        if (!repaired && !StartExplained(rec.start_error, restart)) {
          Violate(Violation::kUnexplainedFailure, name + ": Pull on gen rank " + std::to_string(g) +
                                                      " failed: " + rec.start_error.ToString());
        }
        checker_.WriteCanary(g, slot);  // nothing may write there either
        Check("canaries_written");
        continue;
      }
      if (std::optional<Status> outcome = rec.transfer->Poll()) {
        rec.processed = true;
        settled_pull(g, rec, *outcome);
      } else {
        all_settled = false;
      }
    }
    for (int k = 0; k < num_ctx; ++k) {
      PubRec& rec = pubs[static_cast<size_t>(k)];
      if (rec.processed || rec.transfer == nullptr) continue;
      if (std::optional<Status> outcome = rec.transfer->Poll()) {
        rec.processed = true;
        settled_publication(k, *outcome);
      } else {
        all_settled = false;
      }
    }
    if (!pulls_done &&
        std::all_of(pulls.begin(), pulls.end(), [](const PullRec& r) { return r.processed; })) {
      pulls_done = true;
      Check("watchdog_checks", static_cast<uint64_t>(num_gen));
      // Actions not due yet still act on the publications; then end those
      // still waiting (one of their pulls failed).
      while (next_action < actions.size()) perform(actions[next_action++]);
      for (PubRec& p : pubs) {
        if (p.transfer != nullptr && !p.processed && !p.transfer->Poll()) {
          p.transfer->Cancel();
          p.watchdog = Clock::now() + Watchdog(o_.timeout);
          Bump(&Tally::actions, "driver_publication_cancels");
        }
      }
      continue;
    }
    if (all_settled) break;
    const Clock::time_point now = Clock::now();
    Clock::time_point wake_at = Clock::time_point::max();
    for (int g = 0; g < num_gen; ++g) {
      const PullRec& rec = pulls[static_cast<size_t>(g)];
      if (rec.processed) continue;
      if (now >= rec.watchdog) {
        Violate(Violation::kHang,
                name + ": the pull on gen rank " + std::to_string(g) + " (actions: " +
                    MarkNames(marks, epoch_->load() != epoch_start) + ") did not settle within " +
                    std::to_string(duration_cast<milliseconds>(now - t0).count()) + " ms" +
                    (rec.agent != c_.GenAgent(g) ? "; its agent has been shut down since" : ""),
                &path);
        return false;
      }
      wake_at = std::min(wake_at, rec.watchdog);
    }
    for (int k = 0; k < num_ctx; ++k) {
      const PubRec& rec = pubs[static_cast<size_t>(k)];
      if (rec.processed || rec.transfer == nullptr) continue;
      if (now >= rec.watchdog) {
        Violate(Violation::kHang,
                name + ": the publication on ctx rank " + std::to_string(k) + " (actions: " +
                    MarkNames(marks, epoch_->load() != epoch_start) + ") did not settle within " +
                    std::to_string(duration_cast<milliseconds>(now - t0).count()) + " ms" +
                    (rec.agent != c_.CtxAgent(k) ? "; its agent has been shut down since" : ""),
                &path);
        return false;
      }
      wake_at = std::min(wake_at, rec.watchdog);
    }
    while (next_action < actions.size() && actions[next_action].at <= now) {
      perform(actions[next_action++]);
    }
    if (next_action < actions.size()) wake_at = std::min(wake_at, actions[next_action].at);
    std::unique_lock<std::mutex> lock(signal->mu);
    signal->cv.wait_until(lock, wake_at, [&] { return signal->events != seen_events; });
    seen_events = signal->events;
  }
  Check("watchdog_checks", static_cast<uint64_t>(num_ctx));
  if (failed_by_injection) {
    std::lock_guard<std::mutex> lock(mu_);
    ++tally_.requests_failed_by_injection;
  }
  SlotState& state = slots_[static_cast<size_t>(slot)];
  state.canary = true;
  state.last_path = path;
  state.last_actions = MarkNames(marks, (epoch_start & 1) != 0 || epoch_->load() != epoch_start);
  state.last_request = name + " (actions: " + state.last_actions + ")";
  return true;
}

void ChaosRun::Driver(int d) {
  std::mt19937_64 rng(Mix(o_.seed * 1000003 + static_cast<uint64_t>(d)));
  for (int i = 0; !stop_.load(); ++i) {
    if (Clock::now() >= end_) break;
    if (o_.max_requests > 0 && issued_.fetch_add(1) >= o_.max_requests) break;
    const int slot = 2 * d + (i % 2);
    SlotState& s = slots_[static_cast<size_t>(slot)];
    if (s.canary) {
      for (int g = 0; g < c_.num_gen(); ++g) {
        Check("canary_checks");
        if (std::optional<std::string> bad = checker_.CheckCanary(g, slot)) {
          Violate(Violation::kWriteAfterSettle,
                  "before reuse, after " + s.last_request + ": " + *bad, &s.last_path,
                  s.last_actions);
        }
      }
      s.canary = false;
    }
    for (int k : s.poisoned) {
      checker_.Refill(k, slot);
      Check("ctx_refills");
    }
    s.poisoned.clear();
    c_.ClearGen(slot);
    if (!Request(slot, rng)) {
      s.hung = true;
      return;
    }
  }
}

void ChaosRun::Restarter() {
  std::mt19937_64 rng(Mix(o_.seed ^ 0x7265737461727421ULL));
  std::uniform_real_distribution<double> jitter(0.5, 1.5);
  for (int n = 0;; ++n) {
    const auto wait = duration_cast<microseconds>(o_.restart_interval * jitter(rng));
    {
      std::unique_lock<std::mutex> lock(stop_mu_);
      if (stop_cv_.wait_for(lock, wait, [&] { return stop_.load(); })) return;
    }
    const bool ctx_side = n % 2 == 0;
    const int rank =
        static_cast<int>(rng() % static_cast<uint64_t>(ctx_side ? c_.num_ctx() : c_.num_gen()));
    const std::string what =
        std::string(ctx_side ? "ctx" : "gen") + " rank " + std::to_string(rank);
    RestartInfo info;
    epoch_->fetch_add(1);
    const Status s = c_.RestartRank(ctx_side, rank, &info);
    epoch_->fetch_add(1);
    Bump(&Tally::actions, ctx_side ? "ctx_restarts" : "gen_restarts");
    if (info.outstanding_after_shutdown != 0) {
      Violate(Violation::kArenaNotDrained, what + ": the agent still held " +
                                               std::to_string(info.outstanding_after_shutdown) +
                                               " staging bytes after Shutdown returned");
    }
    if (!s.ok()) {
      Violate(Violation::kRestartFailed, "restarting " + what + ": " + s.ToString());
      stop_.store(true);  // the cluster is incomplete: stop the run
      return;
    }
  }
}

nlohmann::json ChaosRun::Run() {
  const Clock::time_point start = Clock::now();
  end_ = start + o_.duration;
  std::string paths;
  for (TransferPath p : o_.paths)
    paths += (paths.empty() ? "" : ",") + std::string(TransferPathName(p));
  char line[512];
  std::snprintf(
      line, sizeof(line),
      "  chaos: %.1f s%s, paths %s (one at random per request), %d drivers, restarts "
      "%s; per request: cancel %.0f%%, short deadline %.0f%%, short ttl %.0f%%, retire "
      "%.0f%%, cancel publication %.0f%%; seed %llu\n",
      static_cast<double>(o_.duration.count()) / 1000,
      o_.max_requests > 0 ? (" or " + std::to_string(o_.max_requests) + " requests").c_str() : "",
      paths.c_str(), o_.concurrency,
      o_.restart_interval.count() > 0
          ? ("every ~" + std::to_string(o_.restart_interval.count()) + " ms").c_str()
          : "off",
      100 * o_.cancel_rate, 100 * o_.pull_deadline_rate, 100 * o_.publish_ttl_rate,
      100 * o_.retire_rate, 100 * o_.cancel_publication_rate,
      static_cast<unsigned long long>(o_.seed));
  log_ << line;
  log_.flush();

  // The run's own watchdog: a driver stuck inside the library (a Wait that
  // never returns, a Shutdown that never ends) cannot report itself.
  std::mutex done_mu;
  std::condition_variable done_cv;
  bool done = false;
  std::thread stuck;
  if (o_.exit_when_stuck) {
    stuck = std::thread([&] {
      std::unique_lock<std::mutex> lock(done_mu);
      const auto limit = end_ + Watchdog(o_.timeout) + std::chrono::seconds(60);
      if (done_cv.wait_until(lock, limit, [&] { return done; })) return;
      std::string why;
      {
        std::lock_guard<std::mutex> tally_lock(mu_);
        for (int i = 0; i < kNumViolations; ++i) {
          if (tally_.violations[i] != 0) {
            why += "  " + std::string(ViolationName(static_cast<Violation>(i))) + ": " +
                   std::to_string(tally_.violations[i]) + " (first: " + tally_.examples[i] + ")\n";
          }
        }
      }
      std::fprintf(stderr,
                   "kvbounce bench: FAILED: hang: the chaos run did not finish a minute after "
                   "its end (a call into the library never returned)\n%s",
                   why.c_str());
      std::fflush(stderr);
      std::_Exit(1);
    });
  }

  std::vector<std::thread> drivers;
  for (int d = 0; d < o_.concurrency; ++d) drivers.emplace_back([this, d] { Driver(d); });
  std::thread restarter;
  if (o_.restart_interval.count() > 0) restarter = std::thread([this] { Restarter(); });
  for (std::thread& t : drivers) t.join();
  {
    std::lock_guard<std::mutex> lock(stop_mu_);
    stop_.store(true);
  }
  stop_cv_.notify_all();
  if (restarter.joinable()) restarter.join();
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();

  // Late writes land within the grace period, if the library keeps its word
  // at all; then every slot must still hold its canary.
  std::this_thread::sleep_for(2 * c_.options().grace + milliseconds(100));
  for (int slot = 0; slot < static_cast<int>(slots_.size()); ++slot) {
    const SlotState& s = slots_[static_cast<size_t>(slot)];
    if (!s.canary || s.hung) continue;
    for (int g = 0; g < c_.num_gen(); ++g) {
      Check("final_canary_checks");
      if (std::optional<std::string> bad = checker_.CheckCanary(g, slot)) {
        Violate(Violation::kWriteAfterSettle, "at the end, after " + s.last_request + ": " + *bad,
                &s.last_path, s.last_actions);
      }
    }
  }
  auto outstanding = [&] {
    uint64_t n = 0;
    for (int r = 0; r < c_.num_ctx(); ++r) n += c_.CtxAgent(r)->Stats().arena_outstanding_bytes;
    for (int r = 0; r < c_.num_gen(); ++r) n += c_.GenAgent(r)->Stats().arena_outstanding_bytes;
    return n;
  };
  const Clock::time_point drain_deadline =
      Clock::now() + 2 * c_.options().grace + std::chrono::seconds(2);
  uint64_t left = outstanding();
  while (left != 0 && Clock::now() < drain_deadline) {
    std::this_thread::sleep_for(milliseconds(5));
    left = outstanding();
  }
  if (left != 0) {
    Violate(Violation::kArenaNotDrained,
            std::to_string(left) + " staging bytes still outstanding at the end of the run");
  }
  if (stuck.joinable()) {
    {
      std::lock_guard<std::mutex> lock(done_mu);
      done = true;
    }
    done_cv.notify_all();
    stuck.join();
  }
  return Report(seconds, left);
}

nlohmann::json ChaosRun::Report(double seconds, uint64_t outstanding) {
  std::lock_guard<std::mutex> lock(mu_);
  nlohmann::json j;
  j["seconds"] = seconds;
  j["seed"] = o_.seed;
  nlohmann::json paths = nlohmann::json::array();
  for (TransferPath p : o_.paths) paths.push_back(std::string(TransferPathName(p)));
  j["paths"] = paths;
  j["concurrency"] = o_.concurrency;
  j["timeout_ms"] = o_.timeout.count();
  j["watchdog_ms"] = duration_cast<milliseconds>(Watchdog(o_.timeout)).count();
  j["restart_interval_ms"] = o_.restart_interval.count();
  j["requests"] = tally_.requests;
  j["pulls"] = tally_.pulls;
  j["publications"] = tally_.publications;
  j["actions"] = tally_.actions;
  j["pull_outcomes"] = tally_.pull_outcomes;
  j["pulls_not_started"] = tally_.pulls_not_started;
  j["publication_outcomes"] = tally_.publication_outcomes;
  j["publications_not_started"] = tally_.publications_not_started;
  j["by_path"] = tally_.by_path;
  j["outcome_examples"] = tally_.outcome_examples;
  j["requests_failed_by_injection"] = tally_.requests_failed_by_injection;
  nlohmann::json checks = nlohmann::json::object();
  for (const char* k :
       {"ok_pulls_verified", "verified_bytes", "canaries_written", "canary_checks",
        "final_canary_checks", "publications_poisoned", "ctx_refills", "watchdog_checks"}) {
    checks[k] = tally_.checks.count(k) ? tally_.checks.at(k) : 0;
  }
  j["checks"] = checks;
  nlohmann::json violations = nlohmann::json::object();
  nlohmann::json examples = nlohmann::json::object();
  uint64_t total = 0;
  for (int i = 0; i < kNumViolations; ++i) {
    const std::string kind(ViolationName(static_cast<Violation>(i)));
    violations[kind] = tally_.violations[i];
    total += tally_.violations[i];
    if (tally_.violations[i] != 0) examples[kind] = tally_.examples[i];
  }
  j["violations"] = violations;
  j["violation_examples"] = examples;
  j["violations_by_path"] = tally_.violations_by_path;
  j["violations_by_actions"] = tally_.violations_by_actions;
  j["violations_total"] = total;
  j["arena_outstanding_bytes"] = outstanding;
  return j;
}

// The first byte of `memory` that differs from `value`, and how many do.
struct Difference {
  size_t region = 0;
  size_t offset = 0;
  std::byte found{};
  uint64_t changed = 0;
};

std::optional<Difference> FindDifference(const std::vector<std::vector<std::byte>>& memory,
                                         std::byte value) {
  std::optional<Difference> first;
  for (size_t r = 0; r < memory.size(); ++r) {
    const std::vector<std::byte>& m = memory[r];
    for (size_t i = 0; i < m.size(); ++i) {
      if (m[i] == value) continue;
      if (!first) first = Difference{r, i, m[i], 0};
      ++first->changed;
    }
  }
  return first;
}

}  // namespace

std::string_view ViolationName(Violation v) {
  switch (v) {
    case Violation::kWriteAfterSettle:
      return "write_after_settle";
    case Violation::kOkPullPoisoned:
      return "ok_pull_poisoned";
    case Violation::kOkPullMismatch:
      return "ok_pull_mismatch";
    case Violation::kHang:
      return "hang";
    case Violation::kArenaNotDrained:
      return "arena_not_drained";
    case Violation::kUnexplainedFailure:
      return "unexplained_failure";
    case Violation::kRestartFailed:
      return "restart_failed";
  }
  return "?";
}

void SettleChecker::WriteCanary(int gen_rank, int slot) {
  cluster_.FillSlot(false, gen_rank, slot, kCanary);
}

std::optional<std::string> SettleChecker::CheckCanary(int gen_rank, int slot) const {
  // A copy (device pools are copied to the host): what the slot held at
  // this moment.
  const Result<std::vector<std::vector<std::byte>>> copied =
      cluster_.SlotBytes(false, gen_rank, slot);
  if (!copied.ok()) {
    return "gen rank " + std::to_string(gen_rank) + " slot " + std::to_string(slot) +
           ": cannot read the slot: " + copied.status().ToString();
  }
  const std::vector<std::vector<std::byte>>& memory = *copied;
  const std::optional<Difference> d = FindDifference(memory, kCanary);
  if (!d) return std::nullopt;
  const int64_t blocks = 2 * cluster_.blocks_per_request(false);
  const size_t block_bytes = memory[d->region].size() / static_cast<size_t>(blocks);
  const int64_t block = slot * blocks + static_cast<int64_t>(d->offset / block_bytes);
  char found[8];
  std::snprintf(found, sizeof(found), "0x%02x", static_cast<unsigned>(d->found));
  return "gen rank " + std::to_string(gen_rank) + " slot " + std::to_string(slot) + ": " +
         std::to_string(d->changed) + " bytes changed after the pull settled; the first is in " +
         (memory.size() > 1 ? "region " + std::to_string(d->region) + " (layer-major k/v plane), "
                            : std::string()) +
         "block " + std::to_string(block) + ", byte " + std::to_string(d->offset % block_bytes) +
         ", which holds " + found + " instead of the canary";
}

void SettleChecker::Poison(int ctx_rank, int slot) {
  cluster_.FillSlot(true, ctx_rank, slot, kPoison);
}

void SettleChecker::Refill(int ctx_rank, int slot) { cluster_.RefillCtx(ctx_rank, slot); }

SettleChecker::PullCheck SettleChecker::CheckOkPull(int gen_rank, const BlockTables& tables,
                                                    TokenRange range) const {
  PullCheck check;
  check.verify = cluster_.VerifyGen(gen_rank, tables, range);
  if (check.verify.mismatches == 0) return check;
  // Poison is 8 or more poison bytes in a row (data rows of the semantic
  // function virtually never hold that).
  bool poisoned = false;
  const Result<std::vector<std::vector<std::byte>>> copied =
      cluster_.SlotBytes(false, gen_rank, tables.slot);
  for (const std::vector<std::byte>& m :
       copied.ok() ? *copied : std::vector<std::vector<std::byte>>()) {
    size_t run = 0;
    for (size_t i = 0; i < m.size() && !poisoned; ++i) {
      run = m[i] == kPoison ? run + 1 : 0;
      poisoned = run >= 8;
    }
    if (poisoned) break;
  }
  check.violation = poisoned ? Violation::kOkPullPoisoned : Violation::kOkPullMismatch;
  check.detail = std::to_string(check.verify.mismatches) +
                 " rows wrong (first: " + check.verify.first_mismatch + ")" +
                 (poisoned ? "; poison of a settled publication arrived" : "");
  return check;
}

nlohmann::json RunChaos(Cluster& cluster, const ChaosOptions& options, std::ostream& log) {
  ChaosRun run(cluster, options, log);
  return run.Run();
}

uint64_t ChaosViolations(const nlohmann::json& chaos, std::string* why) {
  uint64_t total = 0;
  std::string lines;
  for (const auto& [kind, n] : chaos["violations"].items()) {
    const uint64_t count = n.get<uint64_t>();
    if (count == 0) continue;
    total += count;
    lines += (lines.empty() ? "" : "\n") + kind + ": " + std::to_string(count);
    if (chaos.contains("violation_examples") && chaos["violation_examples"].contains(kind)) {
      lines += " (first: " + chaos["violation_examples"][kind].get<std::string>() + ")";
    }
  }
  if (why != nullptr) *why = lines;
  return total;
}

void PrintChaosTable(const nlohmann::json& chaos, std::ostream& out) {
  auto row = [&](const std::string& title, const nlohmann::json& counts) {
    std::string items;
    for (const auto& [k, n] : counts.items()) {
      items += (items.empty() ? "" : "  ") + k + " " + std::to_string(n.get<uint64_t>());
    }
    char line[64];
    std::snprintf(line, sizeof(line), "  %-24s ", title.c_str());
    out << line << (items.empty() ? "-" : items) << "\n";
  };
  char head[256];
  std::snprintf(head, sizeof(head),
                "\nchaos: %.1f s, %llu requests (%llu pulls, %llu publications), %d drivers\n",
                chaos["seconds"].get<double>(),
                static_cast<unsigned long long>(chaos["requests"].get<uint64_t>()),
                static_cast<unsigned long long>(chaos["pulls"].get<uint64_t>()),
                static_cast<unsigned long long>(chaos["publications"].get<uint64_t>()),
                chaos["concurrency"].get<int>());
  out << head;
  row("actions taken", chaos["actions"]);
  row("pull outcomes", chaos["pull_outcomes"]);
  row("pulls not started", chaos["pulls_not_started"]);
  row("publication outcomes", chaos["publication_outcomes"]);
  row("publications not started", chaos["publications_not_started"]);
  for (const auto& [path, counts] : chaos["by_path"].items()) row("path " + path, counts);
  row("checks", chaos["checks"]);
  out << "  violations:\n";
  for (const auto& [kind, n] : chaos["violations"].items()) {
    char line[128];
    std::snprintf(line, sizeof(line), "    %-22s %8llu", kind.c_str(),
                  static_cast<unsigned long long>(n.get<uint64_t>()));
    out << line;
    if (chaos.contains("violations_by_path") && chaos["violations_by_path"].contains(kind)) {
      std::string by;
      for (const auto& [path, m] : chaos["violations_by_path"][kind].items()) {
        by += (by.empty() ? "" : ", ") + path + " " + std::to_string(m.get<uint64_t>());
      }
      out << "  (" << by << ")";
    }
    if (chaos["violation_examples"].contains(kind)) {
      out << "  first: " << chaos["violation_examples"][kind].get<std::string>();
    }
    out << "\n";
  }
}

}  // namespace kvbounce::tools
