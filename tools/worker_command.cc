#include "tools/worker_command.h"

#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <csignal>
#include <cstring>
#include <fstream>
#include <sstream>

#include "kvbounce/prometheus.h"
#include "kvbounce/transports.h"
#include "layout/pool_layout.h"
#include "tools/bench_command.h"
#include "tools/bench_report.h"
#include "tools/metrics_server.h"
#include "tools/resource_limits.h"
#include "transport/fault/fault_transport.h"

namespace kvbounce::tools {
namespace {

using Clock = std::chrono::steady_clock;

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}

// "host:port" with a non-empty host and a port in [min_port, 65535].
Status CheckAddress(std::string_view what, std::string_view address, int min_port) {
  const size_t colon = address.rfind(':');
  int port = -1;
  if (colon != std::string_view::npos && colon > 0) {
    const std::string_view text = address.substr(colon + 1);
    auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), port);
    if (ec != std::errc() || ptr != text.data() + text.size() || text.empty()) port = -1;
  }
  if (port < min_port || port > 65535) {
    return InvalidArgumentError(std::string(what) + " '" + std::string(address) +
                                "' is not host:port with a port in [" + std::to_string(min_port) +
                                ", 65535]");
  }
  return Status::Ok();
}

Result<std::vector<std::string>> ReadPeersFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    return InvalidArgumentError("--peers-file " + path + ": cannot read: " + std::strerror(errno));
  }
  std::stringstream text;
  text << in.rdbuf();
  const nlohmann::json j = nlohmann::json::parse(text.str(), nullptr, false);
  const nlohmann::json* list = &j;
  if (j.is_object() && j.contains("peers")) list = &j["peers"];
  if (!list->is_array()) {
    return InvalidArgumentError("--peers-file " + path +
                                ": expected JSON: [\"host:port\", ...] or {\"peers\": [...]}");
  }
  std::vector<std::string> peers;
  for (const nlohmann::json& p : *list) {
    if (!p.is_string()) {
      return InvalidArgumentError("--peers-file " + path + ": every peer must be a string");
    }
    peers.push_back(p.get<std::string>());
  }
  return peers;
}

// Waits up to `timeout` (or until a signal) for fd to become readable.
// Returns the signal that arrived, 0 otherwise.
int WaitReadable(int fd, SignalWatch* signals, int timeout_ms) {
  pollfd fds[2] = {{fd, POLLIN, 0}, {signals != nullptr ? signals->fd() : -1, POLLIN, 0}};
  poll(fds, 2, timeout_ms);
  return signals != nullptr ? signals->Take() : 0;
}

nlohmann::json Summary(const WorkerRank& rank, const std::string& stopped_by,
                       uint64_t outstanding) {
  const WorkerTally& t = rank.tally();
  nlohmann::json j = {{"worker", rank.Who()},
                      {"stopped_by", stopped_by},
                      {"requests", t.requests},
                      {"completed", t.completed},
                      {"failed", t.failed},
                      {"bytes", t.bytes},
                      {"verified_bytes", t.verified_bytes},
                      {"mismatches", t.mismatches},
                      {"arena_outstanding_bytes", outstanding}};
  if (!t.first_failure.empty()) j["first_failure"] = t.first_failure;
  if (!t.first_mismatch.empty()) j["first_mismatch"] = t.first_mismatch;
  return j;
}

// Shuts the rank down and hands the replies of what settled to `done`.
uint64_t ShutDown(WorkerRank& rank, const std::function<void(const DoneReply&)>& done) {
  rank.Shutdown();
  for (const DoneReply& d : rank.TakeDone()) done(d);
  return rank.Stats().value("arena_outstanding_bytes", uint64_t{0});
}

// --requests on a gen rank: pulls, verifies, tallies like the bench.
WorkerEnd PullAlone(WorkerRank& rank, const WorkerPlan& plan, SignalWatch* signals,
                    std::ostream& log, PathRun* run) {
  run->path = plan.path;
  const TokenRange range = plan.scenario.tokens;
  const uint64_t end = plan.first_request_id + static_cast<uint64_t>(plan.requests);
  uint64_t next = plan.first_request_id;
  int64_t first_start = 0, last_settled = 0;
  log << "kvbounce worker: " << rank.Who() << ": pulling requests " << next << ".." << end - 1
      << " of " << plan.rank.ctx_instance << " on path " << TransferPathName(plan.path) << ", "
      << plan.rank.harness.slots << " in flight\n";
  log.flush();
  auto count = [&](const DoneReply& d) {
    ++run->requests;
    ++run->taken[d.path_taken];
    run->verified += d.verified_bytes;
    run->mismatches += d.mismatches;
    run->transport_writes += d.transport_writes;
    if (d.mismatches != 0 && run->first_mismatch.empty()) run->first_mismatch = d.message;
    last_settled = std::max(last_settled, d.settled_ns);
    if (d.code == StatusCode::kOk) {
      ++run->completed;
      run->bytes += d.bytes;
      run->latency_ms.push_back(static_cast<double>(d.latency_us) / 1e3);
    } else {
      run->CountFailure(Status(d.code, d.message));
    }
  };
  std::string stopped_by;
  while (static_cast<uint64_t>(run->requests) < static_cast<uint64_t>(plan.requests)) {
    for (int slot : rank.FreeSlots()) {
      if (next == end) break;
      if (first_start == 0) first_start = NowNs();
      rank.Pull(next++, slot, range, plan.path);
    }
    if (const int sig = WaitReadable(rank.wake_fd(), signals, -1); sig != 0) {
      stopped_by = SignalName(sig);
      break;
    }
    for (const DoneReply& d : rank.TakeDone()) count(d);
  }
  WorkerEnd e;
  e.stopped_by = stopped_by.empty() ? "requests done" : stopped_by;
  e.arena_outstanding_bytes = ShutDown(rank, count);
  run->seconds =
      last_settled > first_start ? static_cast<double>(last_settled - first_start) / 1e9 : 0.0;
  run->arena_outstanding_bytes = e.arena_outstanding_bytes;
  const nlohmann::json stats = rank.Stats();
  run->injected_write_failures = stats.value("injected_write_failures", uint64_t{0});
  run->injected_failed_batches = stats.value("injected_failed_batches", uint64_t{0});
  e.summary = Summary(rank, e.stopped_by, e.arena_outstanding_bytes);
  return e;
}

// --requests on a ctx rank: waits for the gen instance, then publishes.
Result<WorkerEnd> PublishAlone(WorkerRank& rank, const WorkerPlan& plan, const WorkerFlags& flags,
                               SignalWatch* signals, std::ostream& log) {
  const auto deadline = Clock::now() + plan.connect_timeout;
  Result<int> receivers = rank.agent().ReceiverCount(flags.gen_instance);
  log << "kvbounce worker: " << rank.Who() << ": waiting for a rank of " << flags.gen_instance
      << " to connect to " << rank.Address() << "\n";
  log.flush();
  while (!receivers.ok()) {
    if (Clock::now() >= deadline) {
      return DeadlineExceededError("no rank of gen instance '" + flags.gen_instance +
                                   "' connected to " + rank.Address() + " within " +
                                   std::to_string(plan.connect_timeout.count() / 1000) +
                                   " s (--connect-timeout)");
    }
    if (const int sig = WaitReadable(rank.wake_fd(), signals, 100); sig != 0) {
      WorkerEnd e;
      e.stopped_by = SignalName(sig);
      e.arena_outstanding_bytes = ShutDown(rank, [](const DoneReply&) {});
      e.summary = Summary(rank, e.stopped_by, e.arena_outstanding_bytes);
      return e;
    }
    receivers = rank.agent().ReceiverCount(flags.gen_instance);
  }
  const uint64_t end = plan.first_request_id + static_cast<uint64_t>(plan.requests);
  uint64_t next = plan.first_request_id;
  WorkerEnd e;
  if (*receivers == 0) {
    log << "kvbounce worker: " << rank.Who() << ": no rank of " << flags.gen_instance
        << " reads from this rank (another rank writes its heads): nothing to publish\n";
    next = end;
  } else {
    log << "kvbounce worker: " << rank.Who() << ": publishing requests " << next << ".." << end - 1
        << " for " << *receivers << " gen rank(s), " << plan.rank.harness.slots << " in flight\n";
  }
  log.flush();
  const int slots = plan.rank.harness.slots;
  while (rank.tally().requests < static_cast<uint64_t>(plan.requests)) {
    while (next < end && rank.in_flight() < static_cast<size_t>(slots)) {
      rank.Publish(next, static_cast<int>((next - plan.first_request_id) % slots),
                   plan.scenario.tokens.end);
      ++next;
    }
    if (*receivers == 0) break;
    if (const int sig = WaitReadable(rank.wake_fd(), signals, -1); sig != 0) {
      e.stopped_by = SignalName(sig);
      break;
    }
    rank.TakeDone();
  }
  if (e.stopped_by.empty()) e.stopped_by = "requests done";
  e.arena_outstanding_bytes = ShutDown(rank, [](const DoneReply&) {});
  e.summary = Summary(rank, e.stopped_by, e.arena_outstanding_bytes);
  return e;
}

}  // namespace

WorkerFlags::WorkerFlags() {
  const BenchFlags bench;
  scenario = bench.scenario;
  concurrency = bench.concurrency;
}

CLI::App* AddWorkerCommand(CLI::App& app, WorkerFlags* flags) {
  CLI::App* cmd = app.add_subcommand(
      "worker",
      "Run one rank of a ctx or gen instance as its own process over UCX: driven by "
      "commands on stdin, or on its own with --requests");
  cmd->add_option("--role", flags->role, "ctx (publishes) or gen (pulls and verifies)")->required();
  cmd->add_option("--instance", flags->instance, "This rank's instance (default ctx0 / gen0)");
  cmd->add_option("--rank", flags->rank, "This rank: pp_rank * tp + tp_rank")
      ->capture_default_str();
  flags->scenario.Register(*cmd);
  cmd->add_option(
         "--concurrency", flags->concurrency,
         "Pool slots: requests in flight at once (1.." + std::to_string(kMaxConcurrency) + ")")
      ->capture_default_str();
  cmd->add_option("--transport", flags->transport,
                  "ucx (host memory, or device pools staged through pinned host memory), or "
                  "cuda-ipc (device pools of processes of one host; --memory cuda)")
      ->capture_default_str();
  cmd->add_option("--listen", flags->listen,
                  "host:port to listen on (port 0: any free port; 0.0.0.0: every interface)")
      ->capture_default_str();
  cmd->add_option("--peers", flags->peers,
                  "Comma list of host:port to connect to (a gen rank: every ctx rank)");
  cmd->add_option("--peers-file", flags->peers_file,
                  "JSON file with the peers: [\"host:port\", ...] or {\"peers\": [...]}");
  cmd->add_option("--ctx-instance", flags->ctx_instance, "gen: the instance to pull from")
      ->capture_default_str();
  cmd->add_option("--gen-instance", flags->gen_instance,
                  "ctx with --requests: the instance to wait for")
      ->capture_default_str();
  cmd->add_option_function<int64_t>(
      "--bounce-size-mb", [flags](const int64_t& v) { flags->bounce_size_mb = v; },
      "MiB of the staging arena (default: room for --concurrency requests; 0: bounce off)");
  cmd->add_option("--memory", flags->memory,
                  "The pool's memory: host, or cuda (device memory of --device; over ucx the KV "
                  "stages through pinned host arenas on the bounce path)")
      ->capture_default_str();
  cmd->add_option("--device", flags->device, "The CUDA device of --memory cuda")
      ->capture_default_str();
  cmd->add_option("--config", flags->config,
                  "KEY=VALUE of the agent's config (e.g. transfer_timeout_ms=30000); repeatable");
  cmd->add_option("--num-workers", flags->num_workers,
                  "UCP workers of the agent (default: the config's num_workers)");
  cmd->add_option("--inject-fail-rate", flags->inject_fail_rate,
                  "ctx: probability (0..1) that a transport write operation fails")
      ->capture_default_str();
  cmd->add_option("--connect-timeout", flags->connect_timeout_s,
                  "Seconds to wait for the peers (gen: to reach them; ctx with --requests: for "
                  "the gen instance to connect)")
      ->capture_default_str();
  cmd->add_option("--requests", flags->requests,
                  "Run on its own: gen pulls, ctx publishes this many requests, then exits (0: "
                  "take commands on stdin)")
      ->capture_default_str();
  cmd->add_option("--first-request-id", flags->first_request_id,
                  "With --requests: the first request id (both sides must agree)")
      ->capture_default_str();
  cmd->add_option_function<std::string>(
      "--path", [flags](const std::string& v) { flags->path = v; },
      "gen with --requests: per-block, bounce, direct or auto (default auto)");
  cmd->add_option("--json", flags->json_file, "With --requests: also write the summary here");
  cmd->add_option("--metrics-port", flags->metrics_port,
                  "Serve the agent's stats in the Prometheus text format at "
                  "http://HOST:PORT/metrics, HOST that of --listen (0: any free port, printed "
                  "as 'metrics HOST:PORT' before 'ready'; default: off)");
  return cmd;
}

Result<WorkerPlan> PlanWorker(const WorkerFlags& flags) {
  if (flags.role != "ctx" && flags.role != "gen") {
    return InvalidArgumentError("--role '" + flags.role + "' is invalid: must be ctx or gen");
  }
  KVB_ASSIGN_OR_RETURN(Scenario scenario, BuildScenario(flags.scenario));
  WorkerPlan plan{std::move(scenario)};
  plan.ctx_side = flags.role == "ctx";
  const Topology& topology = plan.ctx_side ? plan.scenario.ctx : plan.scenario.gen;
  if (flags.rank < 0 || flags.rank >= topology.num_ranks()) {
    return InvalidArgumentError(
        "--rank = " + std::to_string(flags.rank) + " is invalid: the " + flags.role +
        " instance has " + std::to_string(topology.num_ranks()) + " ranks (--" + flags.role + ")");
  }
  if (flags.concurrency < 1 || flags.concurrency > kMaxConcurrency) {
    return InvalidArgumentError("--concurrency = " + std::to_string(flags.concurrency) +
                                " is invalid: must be in [1, " + std::to_string(kMaxConcurrency) +
                                "]");
  }
  if (flags.metrics_port < -1 || flags.metrics_port > 65535) {
    return InvalidArgumentError("--metrics-port = " + std::to_string(flags.metrics_port) +
                                " is invalid: must be in [0, 65535] (0: any free port)");
  }
  if (flags.requests < 0) {
    return InvalidArgumentError("--requests = " + std::to_string(flags.requests) +
                                " is invalid: must be >= 0 (0: take commands on stdin)");
  }
  if (!(flags.connect_timeout_s > 0 && flags.connect_timeout_s <= 86400)) {
    return InvalidArgumentError("--connect-timeout = " + std::to_string(flags.connect_timeout_s) +
                                " is invalid: must be in (0, 86400] seconds");
  }
  if (!(flags.inject_fail_rate >= 0 && flags.inject_fail_rate <= 1)) {
    return InvalidArgumentError("--inject-fail-rate = " + std::to_string(flags.inject_fail_rate) +
                                " is invalid: must be in [0, 1]");
  }
  if (flags.inject_fail_rate > 0 && !plan.ctx_side) {
    return InvalidArgumentError("--inject-fail-rate applies to ctx workers (they write)");
  }
  if (flags.path) {
    if (plan.ctx_side) return InvalidArgumentError("--path applies to gen workers (they pull)");
    Result<TransferPath> path = ParseTransferPath(*flags.path);
    if (!path.ok()) return path.status().WithContext("--path");
    plan.path = *path;
  }
  if (flags.bounce_size_mb &&
      (*flags.bounce_size_mb < 0 || *flags.bounce_size_mb > Config::kMaxBounceSizeMb)) {
    return InvalidArgumentError("--bounce-size-mb = " + std::to_string(*flags.bounce_size_mb) +
                                " is invalid: must be in [0, " +
                                std::to_string(Config::kMaxBounceSizeMb) + "]");
  }
  if (flags.num_workers < 0 || flags.num_workers > Config::kMaxNumWorkers) {
    return InvalidArgumentError("--num-workers = " + std::to_string(flags.num_workers) +
                                " is invalid: must be in [1, " +
                                std::to_string(Config::kMaxNumWorkers) + "]");
  }
  if (flags.transport != "ucx" && flags.transport != "cuda-ipc") {
    return InvalidArgumentError("--transport " + flags.transport +
                                ": unknown transport (known: ucx, cuda-ipc)");
  }
  plan.transport = flags.transport;
  const bool ipc = flags.transport == "cuda-ipc";
  if (ipc) {
    // Unix socket addresses; the UCX default means "pick one".
    plan.listen = flags.listen == WorkerFlags().listen ? "" : flags.listen;
    if (!plan.listen.empty() && plan.listen.rfind("unix:", 0) != 0) {
      return InvalidArgumentError("--listen " + flags.listen +
                                  ": a cuda-ipc address is unix:@name or unix:/path");
    }
  } else {
    KVB_RETURN_IF_ERROR(CheckAddress("--listen", flags.listen, 0));
    plan.listen = flags.listen;
  }
  if (!flags.peers.empty()) {
    size_t pos = 0;
    while (pos <= flags.peers.size()) {
      size_t comma = flags.peers.find(',', pos);
      if (comma == std::string::npos) comma = flags.peers.size();
      plan.peers.push_back(flags.peers.substr(pos, comma - pos));
      pos = comma + 1;
    }
  }
  if (!flags.peers_file.empty()) {
    KVB_ASSIGN_OR_RETURN(std::vector<std::string> more, ReadPeersFile(flags.peers_file));
    plan.peers.insert(plan.peers.end(), more.begin(), more.end());
  }
  for (const std::string& p : plan.peers) {
    if (ipc) {
      if (p.rfind("unix:", 0) != 0) {
        return InvalidArgumentError("peer " + p +
                                    ": a cuda-ipc address is unix:@name or unix:/path");
      }
    } else {
      KVB_RETURN_IF_ERROR(CheckAddress("peer", p, 1));
    }
  }
  if (flags.requests > 0 && !plan.ctx_side && plan.peers.empty()) {
    return InvalidArgumentError(
        "a gen worker with --requests needs --peers or --peers-file (the ctx ranks' "
        "addresses)");
  }

  // The pool (twice a request's blocks per slot) and the staging arena.
  const int64_t per_request = CeilDiv(plan.scenario.tokens.end, topology.spec().tokens_per_block);
  if (per_request > kMaxPoolBlocks / 2 / flags.concurrency) {
    return InvalidArgumentError("--tokens = " + std::to_string(plan.scenario.tokens.end) +
                                " with --concurrency " + std::to_string(flags.concurrency) +
                                " needs more pool blocks than 32-bit block ids name");
  }
  Result<PoolLayout> layout =
      PoolLayout::ForRank(topology, flags.rank, 2 * flags.concurrency * per_request, Addr());
  if (!layout.ok()) return layout.status().WithContext("--" + flags.role);
  KVB_ASSIGN_OR_RETURN(const MemoryKind pool_memory,
                       PoolMemoryFromFlags(flags.memory, flags.device));
  if (ipc && pool_memory != MemoryKind::kCuda) {
    return InvalidArgumentError("--transport cuda-ipc moves device memory: it needs --memory cuda");
  }
  auto check_memory = [&](int64_t arena_mb) {
    MemoryNeed need;
    // A device pool is not host memory; its staging arena (pinned) is.
    if (pool_memory == MemoryKind::kHost) need.Add("the pool", layout->allocation_bytes());
    need.Add("the staging arena", SatMul(static_cast<uint64_t>(arena_mb), MiB(1)));
    std::string cap_name;
    const uint64_t cap = MemoryCap(plan.scenario.memory_cap_bytes, &cap_name);
    return CheckMemory(need, cap, cap_name,
                       "use fewer --tokens, a smaller model, more ranks, a lower "
                       "--concurrency or a smaller --bounce-size-mb");
  };
  const int64_t arena_mb = flags.bounce_size_mb.value_or(
      DefaultArenaMb(plan.scenario, plan.ctx_side, flags.concurrency));
  KVB_RETURN_IF_ERROR(check_memory(arena_mb));

  Config config;
  config.bounce_size_mb = arena_mb;
  for (const std::string& kv : flags.config) {
    const size_t eq = kv.find('=');
    if (eq == std::string::npos) {
      return InvalidArgumentError("--config '" + kv + "' is not KEY=VALUE");
    }
    const Status s = config.Set(kv.substr(0, eq), kv.substr(eq + 1));
    if (!s.ok()) return s.WithContext("--config");
  }
  if (flags.num_workers != 0) config.num_workers = flags.num_workers;
  config = ApplyEnvironment(config);
  if (Status s = config.Validate(); !s.ok()) return s.WithContext("--config");
  plan.num_workers = static_cast<int>(config.num_workers);
  if (config.bounce_size_mb != arena_mb) KVB_RETURN_IF_ERROR(check_memory(config.bounce_size_mb));

  plan.rank.harness.role = plan.ctx_side ? Role::kCtx : Role::kGen;
  plan.rank.harness.rank = flags.rank;
  plan.rank.harness.slots = flags.concurrency;
  plan.rank.harness.max_tokens = plan.scenario.tokens.end;
  plan.rank.harness.table_seed = plan.scenario.seed;
  plan.rank.harness.memory = pool_memory;
  plan.rank.harness.device = flags.device;
  plan.rank.instance_id = flags.instance.empty() ? flags.role + "0" : flags.instance;
  plan.rank.config = config;
  plan.rank.ctx_instance = flags.ctx_instance;
  plan.rank.seed = plan.scenario.seed;
  plan.rank.start_token = plan.scenario.tokens.start;
  plan.connect_timeout =
      std::chrono::milliseconds(static_cast<int64_t>(flags.connect_timeout_s * 1000));
  plan.rank.connect_timeout = plan.connect_timeout;
  plan.inject_fail_rate = flags.inject_fail_rate;
  plan.requests = flags.requests;
  plan.first_request_id = flags.first_request_id;
  if (!flags.json_file.empty() && flags.requests == 0) {
    return InvalidArgumentError("--json needs --requests (a driven worker answers on stdout)");
  }
  return plan;
}

WorkerEnd ServeCommands(WorkerRank& rank, int in_fd, std::ostream& out, SignalWatch* signals,
                        std::chrono::milliseconds connect_timeout) {
  bool output_ok = true;
  auto emit = [&](const std::string& line) {
    if (!output_ok) return;
    out << line << '\n';
    out.flush();
    if (!out) output_ok = false;
  };
  std::string buffer;
  std::string stopped_by;
  auto handle = [&](std::string_view line) {
    if (line.find_first_not_of(" \r") == std::string_view::npos) return;
    Result<WorkerCommand> c = ParseWorkerCommand(line);
    if (!c.ok()) {
      const ReplyLine words = SplitReply(line.substr(line.find_first_not_of(' ')));
      emit("error " + std::string(words.keyword) + " " + std::string(c.status().message()));
      return;
    }
    switch (c->kind) {
      case WorkerCommandKind::kConnect: {
        const Status s = rank.Connect(c->addresses, Clock::now() + connect_timeout);
        emit(s.ok() ? "connected " + std::to_string(c->addresses.size()) + " " + rank.PathList()
                    : "error connect " + std::string(s.message()));
        break;
      }
      case WorkerCommandKind::kPublish:
        rank.Publish(c->request_id, c->slot, c->tokens);
        break;
      case WorkerCommandKind::kPull:
        rank.Pull(c->request_id, c->slot,
                  {c->start >= 0 ? c->start : rank.options().start_token, c->tokens}, c->path);
        break;
      case WorkerCommandKind::kCancel:
        // No reply of its own: the request's "done" follows, or already went.
        rank.Cancel(c->request_id).IgnoreError();
        break;
      case WorkerCommandKind::kStats:
        emit("stats " + rank.Stats().dump());
        break;
      case WorkerCommandKind::kQuit:
        stopped_by = "quit";
        break;
    }
  };
  while (stopped_by.empty()) {
    pollfd fds[3] = {{in_fd, POLLIN, 0},
                     {rank.wake_fd(), POLLIN, 0},
                     {signals != nullptr ? signals->fd() : -1, POLLIN, 0}};
    if (poll(fds, 3, -1) < 0 && errno != EINTR) {
      stopped_by = std::string("poll: ") + std::strerror(errno);
      break;
    }
    if (signals != nullptr) {
      if (const int sig = signals->Take(); sig != 0) {
        stopped_by = SignalName(sig);
        break;
      }
    }
    if (fds[1].revents != 0) {
      for (const DoneReply& d : rank.TakeDone(/*verify_when_idle=*/true)) emit(FormatDone(d));
    }
    if (fds[0].revents != 0) {
      char chunk[65536];
      const ssize_t n = read(in_fd, chunk, sizeof(chunk));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        stopped_by = "end of input";
      } else {
        buffer.append(chunk, static_cast<size_t>(n));
        size_t start = 0;
        for (size_t nl; stopped_by.empty() && (nl = buffer.find('\n', start)) != std::string::npos;
             start = nl + 1) {
          handle(std::string_view(buffer).substr(start, nl - start));
        }
        buffer.erase(0, start);
      }
    }
    if (!output_ok && stopped_by.empty()) stopped_by = "output closed";
  }
  WorkerEnd e;
  e.stopped_by = stopped_by;
  e.arena_outstanding_bytes = ShutDown(rank, [&](const DoneReply& d) { emit(FormatDone(d)); });
  e.summary = Summary(rank, stopped_by, e.arena_outstanding_bytes);
  emit("bye " + e.summary.dump());
  return e;
}

Result<bool> RunWorker(const WorkerFlags& flags, int in_fd, std::ostream& out, std::ostream& log) {
  KVB_ASSIGN_OR_RETURN(WorkerPlan plan, PlanWorker(flags));
  if (plan.transport == "ucx" && !UcxTransportAvailable()) {
    return UnimplementedError(
        "this build has no UCX transport (build with UCX installed: libucx-dev / ucx-devel)");
  }
  // A parent that went away shows as a failed write, not a fatal signal.
  std::signal(SIGPIPE, SIG_IGN);
  KVB_ASSIGN_OR_RETURN(std::unique_ptr<SignalWatch> signals,
                       SignalWatch::Create({SIGINT, SIGTERM}));

  Result<std::unique_ptr<Transport>> transport = [&]() -> Result<std::unique_ptr<Transport>> {
    if (plan.transport == "cuda-ipc") {
      CudaIpcTransportOptions ipc;
      ipc.listen_address = plan.listen;
      ipc.device = flags.device;
      ipc.connect_timeout = plan.connect_timeout;
      return NewCudaIpcTransport(ipc);
    }
    UcxTransportOptions ucx;
    ucx.listen_address = plan.listen;
    ucx.num_workers = plan.num_workers;
    ucx.connect_timeout = plan.connect_timeout;
    ucx.poll_before_sleep = std::chrono::microseconds(plan.rank.config.poll_before_sleep_us);
    return NewUcxTransport(ucx);
  }();
  if (!transport.ok()) {
    return transport.status().WithContext("--transport " + plan.transport + " --listen " +
                                          plan.listen);
  }
  FaultTransport* faults = nullptr;
  if (plan.inject_fail_rate > 0) {
    FaultOptions fault_options;
    fault_options.write_fail_rate = plan.inject_fail_rate;
    fault_options.seed = plan.scenario.seed + static_cast<uint64_t>(flags.rank);
    KVB_ASSIGN_OR_RETURN(std::unique_ptr<FaultTransport> faulty,
                         FaultTransport::Create(std::move(transport).value(), fault_options));
    faults = faulty.get();
    transport = std::unique_ptr<Transport>(std::move(faulty));
  }
  const Topology& topology = plan.ctx_side ? plan.scenario.ctx : plan.scenario.gen;
  KVB_ASSIGN_OR_RETURN(
      std::unique_ptr<WorkerRank> rank,
      WorkerRank::Create(topology, plan.rank, std::move(transport).value(), faults));
  // Declared after the rank: it stops, and no scrape runs, before the rank
  // goes away.
  std::unique_ptr<MetricsServer> metrics;
  if (flags.metrics_port >= 0) {
    const size_t colon = plan.listen.rfind(':');
    const std::string host = plan.transport == "ucx" && colon != std::string::npos && colon > 0
                                 ? plan.listen.substr(0, colon)
                                 : "127.0.0.1";
    std::vector<std::pair<std::string, std::string>> labels = {
        {"role", plan.ctx_side ? "ctx" : "gen"},
        {"instance_id", plan.rank.instance_id},
        {"rank", std::to_string(flags.rank)}};
    const uint64_t capacity = static_cast<uint64_t>(plan.rank.config.bounce_size_mb) << 20;
    Agent* agent = &rank->agent();
    KVB_ASSIGN_OR_RETURN(metrics,
                         MetricsServer::Create(host, flags.metrics_port,
                                               [agent, labels, capacity]() -> Result<std::string> {
                                                 PrometheusTarget t;
                                                 t.labels = labels;
                                                 t.stats = agent->Stats();
                                                 t.arena_capacity_bytes = capacity;
                                                 return RenderPrometheus({&t, 1});
                                               }));
    out << "metrics " << metrics->address() << std::endl;
    log << "kvbounce worker: " << rank->Who() << ": metrics at http://" << metrics->address()
        << "/metrics\n";
  }
  out << "ready " << rank->Address() << " " << rank->caps().dump() << std::endl;
  if (!plan.peers.empty()) {
    KVB_RETURN_IF_ERROR(rank->Connect(plan.peers, Clock::now() + plan.connect_timeout));
    out << "connected " << plan.peers.size() << " " << rank->PathList() << std::endl;
  }

  WorkerEnd end;
  bool passed = true;
  if (plan.requests == 0) {
    end = ServeCommands(*rank, in_fd, out, signals.get(), plan.connect_timeout);
  } else {
    nlohmann::json report;
    if (plan.ctx_side) {
      KVB_ASSIGN_OR_RETURN(end, PublishAlone(*rank, plan, flags, signals.get(), log));
      const WorkerTally& t = rank->tally();
      out << rank->Who() << ": " << t.requests << " publications settled, " << t.completed
          << " served, " << t.failed << " failed"
          << (t.first_failure.empty() ? "" : " (first: " + t.first_failure + ")") << "\n";
      passed = t.failed == 0 && end.stopped_by == "requests done";
    } else {
      PathRun run;
      end = PullAlone(*rank, plan, signals.get(), log, &run);
      report["scenario"] = DescribeScenario(plan.scenario);
      report["runs"] = nlohmann::json::array(
          {PathRunJson(run, plan.transport, flags.memory, plan.inject_fail_rate)});
      PrintBenchTable(report, out);
      std::string why;
      passed = BenchPassed(report, &why) && run.completed == plan.requests &&
               end.stopped_by == "requests done";
      if (!passed && why.empty()) {
        why = std::to_string(run.completed) + " of " + std::to_string(plan.requests) +
              " requests completed (" + end.stopped_by + ")";
      }
      if (!passed) log << "kvbounce worker: FAILED: " << why << "\n";
    }
    report["worker"] = end.summary;
    out << "bye " << end.summary.dump() << std::endl;
    if (!flags.json_file.empty()) {
      std::ofstream file(flags.json_file);
      file << report.dump(2) << "\n";
      if (!file) return InvalidArgumentError("--json " + flags.json_file + ": cannot write");
    }
  }
  if (end.stopped_by != "quit" && end.stopped_by != "requests done") {
    log << "kvbounce worker: " << rank->Who() << ": stopped (" << end.stopped_by << ")\n";
  }
  if (end.arena_outstanding_bytes != 0) {
    log << "kvbounce worker: " << rank->Who() << ": " << end.arena_outstanding_bytes
        << " staging bytes still outstanding after shutdown\n";
    passed = false;
  }
  return passed;
}

}  // namespace kvbounce::tools
