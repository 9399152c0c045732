#include "tools/process_bench.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "tools/bench_report.h"
#include "tools/ceiling.h"
#include "tools/progress.h"
#include "tools/subprocess.h"
#include "tools/worker_protocol.h"

namespace kvbounce::tools {
namespace {

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(SteadyClock::now().time_since_epoch())
      .count();
}

Result<std::string> SelfExecutable() {
  char path[PATH_MAX];
  const ssize_t n = readlink("/proc/self/exe", path, sizeof(path) - 1);
  if (n <= 0) return InternalError("cannot find this program's executable (/proc/self/exe)");
  return std::string(path, static_cast<size_t>(n));
}

// Appends "(during ...)" to an error's message.
Status During(const Status& s, const std::string& during) {
  return Status(s.code(), std::string(s.message()) + " (during " + during + ")");
}

struct Worker {
  bool ctx = true;
  int rank = 0;
  std::string address;
};

class Driver {
 public:
  Driver(const BenchFlags& flags, const BenchPlan& plan, std::ostream& log, SignalWatch* signals)
      : flags_(flags), plan_(plan), log_(log), group_(signals) {
    step_ = std::chrono::milliseconds(
        static_cast<int64_t>(flags.step_timeout_s.value_or(kDefaultStepTimeoutS) * 1000));
  }

  int num_ctx() const { return plan_.scenario.ctx.num_ranks(); }
  int num_gen() const { return plan_.scenario.gen.num_ranks(); }
  // Whether `direct` can run: the writers map the receivers' pools, or the
  // receivers read the writers' (between processes of one host).
  bool direct() const { return direct_; }
  // Every gen rank can take per-block (not so for device pools, which the
  // ucx transport cannot reach: they stage through host memory on bounce).
  bool per_block() const { return per_block_; }

  Status Start(const std::string& executable);
  Status ConnectGen();
  Result<PathRun> RunPath(TransferPath path, uint64_t first_id);
  // Fills the run's counters that come from the workers' stats.
  Status FinishPath(PathRun& run, const nlohmann::json& before);
  // Every worker's stats, in worker order.
  Result<std::vector<nlohmann::json>> Stats(const std::string& during);
  // After a worker died mid-wave: lets the others finish the requests they
  // hold, the way a wave ends (their pulls settle; the publications still
  // open then are cancelled and settle), until `deadline` at most. So their
  // summaries say how the failure reached them (a pull from the dead rank
  // fails with its connection lost; the others complete) rather than how
  // the shutdown cut them off. Answers are discarded; a second death or the
  // deadline ends it early.
  void SettleSurvivors(SteadyClock::time_point deadline);
  // Quits, terminates or kills every worker and keeps the "bye" summary of
  // each that had one; the first worker that did not exit with status 0 on
  // its own, when `expect_clean`. After a failure the survivors first
  // settle what they hold (SettleSurvivors) when `settle`, for at most 1 s
  // of the time they are given to quit.
  std::string Stop(bool expect_clean, bool settle = false);
  // One line per worker that was still running when Stop began: how it
  // settled (its summary), or how it ended without one.
  void LogSettlement();
  nlohmann::json WorkersJson() const;

 private:
  SteadyClock::time_point Deadline() const { return SteadyClock::now() + step_; }
  // The error for a worker we could not write to.
  Status Gone(size_t w);
  Status Send(size_t w, const std::string& line);
  // The next line, with the context of `during` on errors; `waiting`
  // names the workers whose answers are missing on a timeout.
  Result<ChildGroup::Line> Next(SteadyClock::time_point deadline, const std::string& during,
                                const std::set<size_t>& waiting);
  std::string Names(const std::set<size_t>& workers);
  // After a step timed out: the workers that do not answer "stats" within
  // `wait` (stopped, or stuck in a call).
  std::set<size_t> Unresponsive(std::chrono::milliseconds wait);

  const BenchFlags& flags_;
  const BenchPlan& plan_;
  std::ostream& log_;
  ChildGroup group_;
  std::vector<Worker> workers_;  // ctx ranks, then gen ranks: index = child index
  // Filled by Stop, by worker: whether it still ran when Stop began, and
  // its "bye" summary.
  std::vector<bool> survived_;
  std::vector<std::optional<nlohmann::json>> summaries_;
  // What Stop gave the workers to quit, and then after SIGTERM.
  std::chrono::milliseconds quit_wait_{0};
  std::chrono::milliseconds term_wait_{0};
  std::chrono::milliseconds step_{0};
  bool direct_ = false;
  bool per_block_ = true;
  // The requests of the wave RunPath runs that are not settled yet:
  // (worker, request id); what the survivors still hold when it fails.
  std::set<std::pair<size_t, uint64_t>> open_gen_, open_ctx_;
};

std::string Driver::Names(const std::set<size_t>& workers) {
  std::string out;
  size_t shown = 0;
  for (size_t w : workers) {
    if (shown++ == 4) {
      out += " and " + std::to_string(workers.size() - 4) + " more";
      break;
    }
    out += (out.empty() ? "" : ", ") + group_.at(w).Who();
  }
  return out;
}

Status Driver::Gone(size_t w) {
  Child& c = group_.at(w);
  c.Reap(SteadyClock::now() + std::chrono::seconds(1));
  return UnavailableError(
      c.Who() + " died: " + (c.reaped() ? c.DescribeExit() : "it stopped reading commands"));
}

Status Driver::Send(size_t w, const std::string& line) {
  if (!group_.at(w).Send(line).ok()) return Gone(w);
  return Status::Ok();
}

Result<ChildGroup::Line> Driver::Next(SteadyClock::time_point deadline, const std::string& during,
                                      const std::set<size_t>& waiting) {
  Result<ChildGroup::Line> line = group_.Next(deadline);
  if (line.ok()) return line;
  if (line.status().code() == StatusCode::kDeadlineExceeded) {
    char seconds[32];
    std::snprintf(seconds, sizeof(seconds), "%g", static_cast<double>(step_.count()) / 1000);
    const std::set<size_t> silent =
        Unresponsive(std::min<std::chrono::milliseconds>(step_, std::chrono::seconds(3)));
    return DeadlineExceededError(
        "no answer within " + std::string(seconds) + " s (--step-timeout) from " + Names(waiting) +
        " (during " + during + "); " +
        (silent.empty() ? std::string("every worker still answers commands")
                        : Names(silent) + (silent.size() == 1 ? " does" : " do") +
                              " not answer commands at all"));
  }
  return During(line.status(), during);
}

std::set<size_t> Driver::Unresponsive(std::chrono::milliseconds wait) {
  std::set<size_t> waiting;
  for (size_t w = 0; w < workers_.size(); ++w) {
    if (group_.at(w).Send("stats").ok()) waiting.insert(w);
  }
  const auto deadline = SteadyClock::now() + wait;
  while (!waiting.empty()) {
    Result<ChildGroup::Line> line = group_.Next(deadline);
    if (!line.ok()) break;
    if (SplitReply(line->text).keyword == "stats") waiting.erase(line->child);
  }
  return waiting;
}

Status Driver::Start(const std::string& executable) {
  std::vector<std::string> common = flags_.scenario.ToArgs();
  std::vector<std::string> more = {
      "--concurrency",     std::to_string(plan_.slots),
      "--transport",       flags_.transport,
      "--connect-timeout", std::to_string(std::max<int64_t>(1, step_.count() / 1000))};
  if (flags_.transport == "ucx") {
    more.push_back("--listen");
    more.push_back("127.0.0.1:0");
  }
  common.insert(common.end(), more.begin(), more.end());
  if (flags_.num_workers != 0) {
    common.push_back("--num-workers");
    common.push_back(std::to_string(flags_.num_workers));
  }
  for (const std::string& kv : flags_.config) {
    common.push_back("--config");
    common.push_back(kv);
  }
  if (flags_.poll_before_sleep_us) {
    common.push_back("--config");
    common.push_back("poll_before_sleep_us=" + std::to_string(*flags_.poll_before_sleep_us));
  }
  if (flags_.chunk_mb) {
    common.push_back("--config");
    common.push_back("bounce_chunk_mb=" + std::to_string(*flags_.chunk_mb));
  }
  std::vector<std::pair<std::string, std::string>> env;
  if (!flags_.ucx_tls.empty()) env.emplace_back("UCX_TLS", flags_.ucx_tls);
  // UCX logs to stdout unless told otherwise, and a worker's stdout is its
  // protocol: a UCX error there (say, on a peer that just died) would read
  // as a garbled answer. UCX reads this before main(), so it is set here.
  if (std::getenv("UCX_LOG_FILE") == nullptr) env.emplace_back("UCX_LOG_FILE", "stderr");
  log_ << "  starting " << num_ctx() + num_gen() << " worker processes (" << executable
       << " worker ...)" << (flags_.ucx_tls.empty() ? "" : ", UCX_TLS=" + flags_.ucx_tls) << "\n";
  log_.flush();
  for (int side = 0; side < 2; ++side) {
    const bool ctx = side == 0;
    for (int r = 0; r < (ctx ? num_ctx() : num_gen()); ++r) {
      Child::Options o;
      o.executable = executable;
      o.args = {"worker",
                "--role",
                ctx ? "ctx" : "gen",
                "--instance",
                ctx ? "ctx0" : "gen0",
                "--rank",
                std::to_string(r),
                "--bounce-size-mb",
                std::to_string(ctx ? plan_.ctx_arena_mb : plan_.gen_arena_mb),
                "--memory",
                flags_.memory,
                "--device",
                std::to_string(RankDevice(flags_, plan_.scenario, ctx, r))};
      if (ctx && flags_.inject_fail_rate > 0) {
        o.args.push_back("--inject-fail-rate");
        o.args.push_back(std::to_string(flags_.inject_fail_rate));
      }
      if (!ctx) {
        o.args.push_back("--ctx-instance");
        o.args.push_back("ctx0");
      }
      o.args.insert(o.args.end(), common.begin(), common.end());
      o.env = env;
      o.name = std::string(ctx ? "ctx" : "gen") + " rank " + std::to_string(r);
      KVB_ASSIGN_OR_RETURN(std::unique_ptr<Child> child, Child::Spawn(o));
      group_.Add(std::move(child));
      workers_.push_back({ctx, r, ""});
    }
  }
  std::set<size_t> waiting;
  for (size_t w = 0; w < workers_.size(); ++w) waiting.insert(w);
  const auto deadline = Deadline();
  while (!waiting.empty()) {
    KVB_ASSIGN_OR_RETURN(ChildGroup::Line line, Next(deadline, "starting the workers", waiting));
    const ReplyLine reply = SplitReply(line.text);
    Worker& w = workers_[line.child];
    if (reply.keyword != "ready" || waiting.count(line.child) == 0) {
      return InternalError(group_.at(line.child).Who() + " said '" + line.text +
                           "' where 'ready <address>' was expected");
    }
    const size_t space = reply.rest.find(' ');
    w.address = std::string(reply.rest.substr(0, space));
    if (!w.ctx && space != std::string_view::npos) {
      const nlohmann::json caps =
          nlohmann::json::parse(reply.rest.substr(space + 1), nullptr, false);
      // A first guess from the transport; the connected replies decide.
      direct_ = caps.is_object() &&
                (caps.value("map_remote", false) || caps.value("read_remote", false));
    }
    waiting.erase(line.child);
  }
  for (size_t w = 0; w < workers_.size(); ++w) {
    log_ << "  " << group_.at(w).Who() << " at " << workers_[w].address << "\n";
  }
  log_.flush();
  return Status::Ok();
}

Status Driver::ConnectGen() {
  std::string command = "connect";
  for (const Worker& w : workers_) {
    if (w.ctx) command += " " + w.address;
  }
  std::set<size_t> waiting;
  for (size_t w = 0; w < workers_.size(); ++w) {
    if (workers_[w].ctx) continue;
    KVB_RETURN_IF_ERROR(During(Send(w, command), "connecting"));
    waiting.insert(w);
  }
  const auto deadline = Deadline();
  while (!waiting.empty()) {
    KVB_ASSIGN_OR_RETURN(ChildGroup::Line line, Next(deadline, "connecting", waiting));
    const ReplyLine reply = SplitReply(line.text);
    if (reply.keyword == "connected" && waiting.count(line.child) != 0) {
      // "<count> <paths>": direct runs only where every gen rank can take it.
      const std::string_view rest = reply.rest;
      const size_t space = rest.find(' ');
      const std::string paths =
          space == std::string_view::npos ? "" : "," + std::string(rest.substr(space + 1)) + ",";
      direct_ = direct_ && paths.find(",direct,") != std::string::npos;
      per_block_ = per_block_ && paths.find(",per-block,") != std::string::npos;
      waiting.erase(line.child);
      continue;
    }
    return UnavailableError(group_.at(line.child).Who() + " could not connect: " + line.text);
  }
  log_ << "  every gen rank connected to the " << num_ctx() << " ctx ranks\n";
  log_.flush();
  return Status::Ok();
}

Result<PathRun> Driver::RunPath(TransferPath path, uint64_t first_id) {
  PathRun run;
  run.path = path;
  const TokenRange range = plan_.scenario.tokens;
  const std::string during = "the " + std::string(TransferPathName(path)) + " run";
  int issued = 0;
  uint64_t id = first_id;
  while (issued < flags_.requests) {
    const int wave = std::min(plan_.concurrency, flags_.requests - issued);
    struct Request {
      int64_t start_ns = 0;
      std::vector<DoneReply> gen;  // by gen rank
      std::vector<bool> answered;  // by gen rank
    };
    std::map<uint64_t, Request> reqs;
    open_gen_.clear();
    open_ctx_.clear();
    const int64_t wave_start = NowNs();
    for (int s = 0; s < wave; ++s, ++id) {
      Request& r = reqs[id];
      r.start_ns = NowNs();
      r.gen.resize(static_cast<size_t>(num_gen()));
      r.answered.assign(static_cast<size_t>(num_gen()), false);
      WorkerCommand publish;
      publish.kind = WorkerCommandKind::kPublish;
      publish.request_id = id;
      publish.slot = s;
      publish.tokens = range.end;
      WorkerCommand pull = publish;
      pull.kind = WorkerCommandKind::kPull;
      pull.path = path;
      pull.start = range.start;
      for (size_t w = 0; w < workers_.size(); ++w) {
        const bool ctx = workers_[w].ctx;
        KVB_RETURN_IF_ERROR(During(Send(w, FormatWorkerCommand(ctx ? publish : pull)), during));
        (ctx ? open_ctx_ : open_gen_).insert({w, id});
      }
    }
    auto waiting = [&](const std::set<std::pair<size_t, uint64_t>>& open) {
      std::set<size_t> out;
      for (const auto& [w, unused] : open) out.insert(w);
      return out;
    };
    auto take = [&](const ChildGroup::Line& line) -> Status {
      Result<DoneReply> done = ParseDone(line.text);
      if (!done.ok()) {
        return InternalError(group_.at(line.child).Who() + " said '" + line.text +
                             "' where 'done ...' was expected (" + during + ")");
      }
      const Worker& w = workers_[line.child];
      auto& open = w.ctx ? open_ctx_ : open_gen_;
      if (open.erase({line.child, done->request_id}) == 0) {
        return InternalError(group_.at(line.child).Who() + " answered for request " +
                             std::to_string(done->request_id) + ", which it does not hold (" +
                             during + ")");
      }
      if (!w.ctx) {
        Request& r = reqs[done->request_id];
        r.gen[static_cast<size_t>(w.rank)] = *done;
        r.answered[static_cast<size_t>(w.rank)] = true;
      }
      return Status::Ok();
    };
    auto deadline = Deadline();
    while (!open_gen_.empty()) {
      KVB_ASSIGN_OR_RETURN(ChildGroup::Line line, Next(deadline, during, waiting(open_gen_)));
      KVB_RETURN_IF_ERROR(take(line));
    }
    const int64_t wave_end = NowNs();
    // Publications no pull needs (a duplicated head's spare writer) or whose
    // pulls failed wait for their ttl: cancel them, as the loopback bench does.
    for (const auto& [w, request_id] : open_ctx_) {
      WorkerCommand cancel;
      cancel.kind = WorkerCommandKind::kCancel;
      cancel.request_id = request_id;
      KVB_RETURN_IF_ERROR(During(Send(w, FormatWorkerCommand(cancel)), during));
    }
    deadline = Deadline();
    while (!open_ctx_.empty()) {
      KVB_ASSIGN_OR_RETURN(ChildGroup::Line line, Next(deadline, during, waiting(open_ctx_)));
      KVB_RETURN_IF_ERROR(take(line));
    }

    int64_t last_settled = wave_start;
    for (auto& [request_id, r] : reqs) {
      ++run.requests;
      Status outcome;
      int64_t settled = r.start_ns;
      uint64_t bytes = 0;
      int64_t worst_us = 0;  // the slowest gen rank's Pull to completion
      for (const DoneReply& d : r.gen) {
        if (outcome.ok() && d.code != StatusCode::kOk) outcome = Status(d.code, d.message);
        bytes += d.bytes;
        worst_us = std::max(worst_us, d.latency_us);
        settled = std::max(settled, d.settled_ns);
        ++run.taken[d.path_taken];
        run.verified += d.verified_bytes;
        run.mismatches += d.mismatches;
        if (d.mismatches != 0 && run.first_mismatch.empty()) run.first_mismatch = d.message;
      }
      // Another host's clock, or none: the parent's own.
      if (settled > wave_end) settled = wave_end;
      last_settled = std::max(last_settled, settled);
      if (outcome.ok()) {
        ++run.completed;
        run.bytes += bytes;
        // What a serving engine sees is its Pull's latency; the commands'
        // way through the pipes to the worker processes is the harness's.
        run.latency_ms.push_back(static_cast<double>(worst_us) / 1e3);
        run.dispatch_latency_ms.push_back(static_cast<double>(settled - r.start_ns) / 1e6);
      } else {
        run.CountFailure(outcome);
      }
      if (flags_.progress != nullptr) flags_.progress->Add(1, outcome.ok() ? bytes : 0);
    }
    run.seconds += static_cast<double>(last_settled - wave_start) / 1e9;
    issued += wave;
  }
  return run;
}

Result<std::vector<nlohmann::json>> Driver::Stats(const std::string& during) {
  std::set<size_t> waiting;
  for (size_t w = 0; w < workers_.size(); ++w) {
    KVB_RETURN_IF_ERROR(During(Send(w, "stats"), during));
    waiting.insert(w);
  }
  std::vector<nlohmann::json> out(workers_.size());
  const auto deadline = Deadline();
  while (!waiting.empty()) {
    KVB_ASSIGN_OR_RETURN(ChildGroup::Line line, Next(deadline, during, waiting));
    const ReplyLine reply = SplitReply(line.text);
    nlohmann::json j = nlohmann::json::parse(reply.rest, nullptr, false);
    if (reply.keyword != "stats" || !j.is_object() || waiting.count(line.child) == 0) {
      return InternalError(group_.at(line.child).Who() + " said '" + line.text +
                           "' where 'stats <json>' was expected (" + during + ")");
    }
    out[line.child] = std::move(j);
    waiting.erase(line.child);
  }
  return out;
}

Status Driver::FinishPath(PathRun& run, const nlohmann::json& before) {
  const std::string during = "the " + std::string(TransferPathName(run.path)) + " run's counters";
  auto sum = [&](const std::vector<nlohmann::json>& stats, const char* key, bool ctx_only) {
    uint64_t total = 0;
    for (size_t w = 0; w < stats.size(); ++w) {
      if (ctx_only && !workers_[w].ctx) continue;
      total += stats[w].value(key, uint64_t{0});
    }
    return total;
  };
  std::vector<nlohmann::json> stats;
  // Quarantined slots come back once their writers stopped.
  const auto deadline = SteadyClock::now() + std::chrono::seconds(5);
  while (true) {
    KVB_ASSIGN_OR_RETURN(stats, Stats(during));
    run.arena_outstanding_bytes = sum(stats, "arena_outstanding_bytes", false);
    if (run.arena_outstanding_bytes == 0 || SteadyClock::now() >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  run.transport_writes =
      sum(stats, "transport_write_ops", true) - before.value("transport_write_ops", uint64_t{0});
  run.injected_write_failures = sum(stats, "injected_write_failures", true) -
                                before.value("injected_write_failures", uint64_t{0});
  run.injected_failed_batches = sum(stats, "injected_failed_batches", true) -
                                before.value("injected_failed_batches", uint64_t{0});
  run.chunks =
      sum(stats, "chunks_scattered", false) - before.value("chunks_scattered", uint64_t{0});
  run.credit_stall_ms = static_cast<double>(sum(stats, "credit_stall_ns", false) -
                                            before.value("credit_stall_ns", uint64_t{0})) /
                        1e6;
  return Status::Ok();
}

void Driver::SettleSurvivors(SteadyClock::time_point deadline) {
  std::vector<size_t> alive;
  for (size_t w = 0; w < workers_.size(); ++w) {
    if (!group_.at(w).reaped() && !group_.at(w).eof()) alive.push_back(w);
  }
  auto dead = [&](const std::pair<size_t, uint64_t>& open) {
    return std::find(alive.begin(), alive.end(), open.first) == alive.end();
  };
  std::erase_if(open_gen_, dead);
  std::erase_if(open_ctx_, dead);
  auto settle = [&](const std::set<std::pair<size_t, uint64_t>>& open) {
    while (!open.empty()) {
      Result<ChildGroup::Line> line = group_.Next(deadline, alive);
      if (!line.ok()) return false;
      Result<DoneReply> done = ParseDone(line->text);
      if (!done.ok()) continue;  // an answer to a command of the broken step
      open_gen_.erase({line->child, done->request_id});
      open_ctx_.erase({line->child, done->request_id});
    }
    return true;
  };
  if (alive.empty() || !settle(open_gen_)) return;
  for (const auto& [w, request_id] : open_ctx_) {
    WorkerCommand cancel;
    cancel.kind = WorkerCommandKind::kCancel;
    cancel.request_id = request_id;
    group_.at(w).Send(FormatWorkerCommand(cancel)).IgnoreError();
  }
  settle(open_ctx_);
}

std::string Driver::Stop(bool expect_clean, bool settle) {
  if (survived_.empty()) {
    survived_.resize(workers_.size());
    for (size_t w = 0; w < workers_.size(); ++w) survived_[w] = !group_.at(w).reaped();
  }
  // After a failure the survivors may wait on a dead or stuck peer: shorter.
  using std::chrono::milliseconds;
  quit_wait_ = expect_clean ? step_ : std::min<milliseconds>(step_, std::chrono::seconds(5));
  term_wait_ = expect_clean ? milliseconds(5000) : milliseconds(2000);
  if (settle) {
    // As long as an agent's shutdown lets requests in flight finish (its
    // default grace), and at most half the time to quit: a survivor that
    // cannot settle (its peer is stuck) still has time for its shutdown.
    const auto start = SteadyClock::now();
    SettleSurvivors(start + std::min<milliseconds>(quit_wait_ / 2, std::chrono::seconds(1)));
    quit_wait_ -= std::chrono::duration_cast<milliseconds>(SteadyClock::now() - start);
  }
  std::vector<bool> before(workers_.size());
  for (size_t w = 0; w < workers_.size(); ++w) before[w] = group_.at(w).reaped();
  group_.Stop(quit_wait_, term_wait_);
  // The summary is a worker's last line; what came before it (answers the
  // run no longer waited for) is of no use now.
  summaries_.resize(workers_.size());
  for (size_t w = 0; w < workers_.size(); ++w) {
    while (std::optional<std::string> line = group_.at(w).NextLine()) {
      const ReplyLine reply = SplitReply(*line);
      if (reply.keyword != "bye") continue;
      nlohmann::json j = nlohmann::json::parse(reply.rest, nullptr, false);
      if (j.is_object()) summaries_[w] = std::move(j);
    }
  }
  if (!expect_clean) return "";
  for (size_t w = 0; w < workers_.size(); ++w) {
    const std::optional<int> status = group_.at(w).wait_status();
    if (!before[w] && status && *status != 0) {
      return group_.at(w).Who() + " " + group_.at(w).DescribeExit() +
             " when asked to quit (see its messages above)";
    }
  }
  return "";
}

void Driver::LogSettlement() {
  auto seconds = [](std::chrono::milliseconds ms) {
    char text[32];
    std::snprintf(text, sizeof(text), "%.3g s", static_cast<double>(ms.count()) / 1000);
    return std::string(text);
  };
  for (size_t w = 0; w < workers_.size(); ++w) {
    if (w >= survived_.size() || !survived_[w]) continue;
    const Child& c = group_.at(w);
    std::string late;
    if (c.signalled() == SIGKILL) {
      late = " (it did not quit within " + seconds(quit_wait_) + " of 'quit', nor " +
             seconds(term_wait_) + " after SIGTERM)";
    } else if (c.signalled() == SIGTERM) {
      late = " (it did not quit within " + seconds(quit_wait_) + " of 'quit': sent SIGTERM)";
    }
    log_ << "  " << c.name() << ": ";
    if (!summaries_[w]) {
      // Killed, or it died, before it could say how it settled.
      log_ << "no summary: " << c.DescribeExit() << late << "\n";
      continue;
    }
    const nlohmann::json& j = *summaries_[w];
    log_ << "settled " << j.value("completed", uint64_t{0}) << " completed, "
         << j.value("failed", uint64_t{0}) << " failed";
    if (const std::string first = j.value("first_failure", std::string()); !first.empty()) {
      log_ << " (first: " << first << ")";
    }
    if (const uint64_t bad = j.value("mismatches", uint64_t{0}); bad != 0) {
      log_ << ", " << bad << " mismatches (first: " << j.value("first_mismatch", std::string())
           << ")";
    }
    log_ << ", staging bytes left " << j.value("arena_outstanding_bytes", uint64_t{0});
    if (const std::string by = j.value("stopped_by", std::string()); by != "quit") {
      log_ << " (stopped by " << by << ")";
    }
    log_ << late << "\n";
  }
  log_.flush();
}

nlohmann::json Driver::WorkersJson() const {
  nlohmann::json out = nlohmann::json::array();
  for (size_t w = 0; w < workers_.size(); ++w) {
    const Child& c = group_.at(w);
    out.push_back({{"name", c.name()},
                   {"pid", c.pid()},
                   {"address", workers_[w].address},
                   {"exit", c.DescribeExit()}});
    if (w < summaries_.size() && summaries_[w]) out.back()["summary"] = *summaries_[w];
  }
  return out;
}

}  // namespace

Result<nlohmann::json> RunProcessBench(const BenchFlags& flags, const BenchPlan& plan,
                                       std::ostream& log) {
  std::string executable = flags.worker_executable;
  if (executable.empty()) {
    KVB_ASSIGN_OR_RETURN(executable, SelfExecutable());
  }
  // Device pools of worker processes on one host: the link every path is
  // compared with, measured before the workers take their memory — the
  // device's own copy, or a peer copy between the first ctx rank's device
  // and the first gen rank's (--gpus).
  nlohmann::json result;
  std::optional<double> ceiling_gbps;
  if (flags.transport == "cuda-ipc") {
    const int src = RankDevice(flags, plan.scenario, /*ctx=*/true, 0);
    const int dst = RankDevice(flags, plan.scenario, /*ctx=*/false, 0);
    Result<Ceiling> measured = MeasureLinkCeiling(src, dst);
    if (!measured.ok()) return measured.status().WithContext("measuring the link ceiling");
    const Ceiling& ceiling = *measured;
    ceiling_gbps = ceiling.gbps;
    result["ceiling"] = {{"what", ceiling.what}, {"gbps", ceiling.gbps}};
    log << "  ceiling: " << ceiling.what << ": " << ceiling.gbps << " GB/s\n";
  }
  KVB_ASSIGN_OR_RETURN(std::unique_ptr<SignalWatch> signals,
                       SignalWatch::Create({SIGINT, SIGTERM}));
  Driver driver(flags, plan, log, signals.get());
  auto setup = [&]() -> Status {
    KVB_RETURN_IF_ERROR(driver.Start(executable));
    return driver.ConnectGen();
  };
  if (Status s = setup(); !s.ok()) {
    driver.Stop(false);
    return s;
  }
  std::vector<TransferPath> paths;
  for (TransferPath p : plan.paths) {
    if (p == TransferPath::kDirect && !driver.direct()) {
      if (!flags.paths.empty()) {
        driver.Stop(false);
        return UnimplementedError("--path direct: the " + flags.transport +
                                  " transport between these workers can neither map nor read "
                                  "peer memory (the direct path needs one of the two)");
      }
      log << "  direct: not run (the " << flags.transport
          << " transport can neither map nor read peer memory)\n";
      continue;
    }
    if (p == TransferPath::kPerBlock && !driver.per_block()) {
      if (!flags.paths.empty()) {
        driver.Stop(false);
        return UnimplementedError("--path per-block: the " + flags.transport +
                                  " transport cannot reach the device pools (they stage "
                                  "through host memory on the bounce path)");
      }
      log << "  per-block: not run (the " << flags.transport
          << " transport cannot reach the device pools)\n";
      continue;
    }
    paths.push_back(p);
  }

  nlohmann::json runs = nlohmann::json::array();
  Status failed;
  uint64_t next_id = 1;
  for (TransferPath path : paths) {
    log << "  " << TransferPathName(path) << ": running\n";
    log.flush();
    if (flags.progress != nullptr) {
      flags.progress->StartPath(std::string(TransferPathName(path)), flags.requests);
    }
    Result<std::vector<nlohmann::json>> before = driver.Stats("before the run");
    Result<PathRun> run =
        before.ok() ? driver.RunPath(path, next_id) : Result<PathRun>(before.status());
    next_id += static_cast<uint64_t>(flags.requests);
    if (flags.progress != nullptr) flags.progress->EndPath();
    if (run.ok()) {
      nlohmann::json totals;
      for (const char* key :
           {"transport_write_ops", "injected_write_failures", "injected_failed_batches"}) {
        uint64_t total = 0;
        for (int w = 0; w < plan.scenario.ctx.num_ranks(); ++w) {
          total += (*before)[static_cast<size_t>(w)].value(key, uint64_t{0});
        }
        totals[key] = total;
      }
      for (const char* key : {"chunks_scattered", "credit_stall_ns"}) {
        uint64_t total = 0;
        for (const nlohmann::json& worker : *before) total += worker.value(key, uint64_t{0});
        totals[key] = total;
      }
      const Status finished = driver.FinishPath(*run, totals);
      if (finished.ok()) {
        const nlohmann::json j =
            PathRunJson(*run, flags.transport, flags.memory, flags.inject_fail_rate, ceiling_gbps);
        runs.push_back(j);
        log << "  " << TransferPathName(path) << ": done";
        if (flags.inject_fail_rate > 0 && !j["fault_injection_applies"].get<bool>()) {
          log << " (no transport writes: fault injection did not apply)";
        }
        log << "\n";
        log.flush();
        continue;
      }
      failed = finished;
    } else {
      failed = run.status();
    }
    break;
  }
  // A worker died: the others finish what they hold before they quit. Not
  // after a timeout (a worker is stuck) or an interruption (stop now).
  const bool settle = failed.code() == StatusCode::kUnavailable;
  log << "  stopping the workers" << (settle ? " (the others settle what they hold first)" : "")
      << "\n";
  log.flush();
  const std::string at_exit = driver.Stop(failed.ok(), settle);
  driver.LogSettlement();
  std::string failure = failed.ok() ? at_exit : std::string(failed.message());
  result["runs"] = std::move(runs);
  result["workers"] = driver.WorkersJson();
  if (!failure.empty()) result["failure"] = failure;
  return result;
}

}  // namespace kvbounce::tools
