#include "tools/bench_command.h"

#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include "copy/cpu/copy_workers.h"
#include "copy/device_support.h"
#include "kvbounce/transports.h"
#include "layout/planner.h"
#include "tools/bench_report.h"
#include "tools/ceiling.h"
#include "tools/chaos.h"
#include "tools/cluster.h"
#include "tools/device_rows.h"
#include "tools/process_bench.h"
#include "tools/progress.h"
#include "tools/resource_limits.h"

namespace kvbounce::tools {
namespace {

using Clock = std::chrono::steady_clock;

// Bytes one request moves through the busiest rank of each side: what its
// arenas must hold per request in flight.
uint64_t BusiestStream(const Scenario& s, bool ctx_side) {
  const uint64_t row = static_cast<uint64_t>(s.ctx.spec().model.head_dim) * s.ctx.elem_bytes();
  uint64_t busiest = 0;
  const int n = ctx_side ? s.ctx.num_ranks() : s.gen.num_ranks();
  const int m = ctx_side ? s.gen.num_ranks() : s.ctx.num_ranks();
  for (int a = 0; a < n; ++a) {
    uint64_t total = 0;
    for (int b = 0; b < m; ++b) {
      const Box box = ctx_side ? WriterBox(s.ctx, a, s.gen, b) : WriterBox(s.ctx, b, s.gen, a);
      // Each fan-in piece starts aligned: allow a page of padding per piece.
      if (!box.empty()) total += PackedBytes(box, s.tokens, row) + 4096;
    }
    busiest = std::max(busiest, total);
  }
  return busiest;
}

uint64_t CtxWrites(Cluster& c) {
  uint64_t n = 0;
  for (int i = 0; i < c.num_ctx_instances(); ++i) {
    for (int r = 0; r < c.num_ctx(); ++r) n += c.ctx(i, r).Stats().transport_write_ops;
  }
  return n;
}

// The gen ranks' streaming counters: chunks scattered, credit stall.
std::pair<uint64_t, std::chrono::nanoseconds> GenChunks(Cluster& c) {
  uint64_t chunks = 0;
  std::chrono::nanoseconds stall{0};
  for (int r = 0; r < c.num_gen(); ++r) {
    const AgentStats s = c.gen(r).Stats();
    chunks += s.chunks_scattered;
    stall += s.credit_stall;
  }
  return {chunks, stall};
}

// The most arena bytes any one rank of each side held at once.
nlohmann::json ArenaPeaks(Cluster& c) {
  uint64_t ctx = 0, gen = 0;
  for (int i = 0; i < c.num_ctx_instances(); ++i) {
    for (int r = 0; r < c.num_ctx(); ++r) ctx = std::max(ctx, c.ctx(i, r).Stats().arena_peak_bytes);
  }
  for (int r = 0; r < c.num_gen(); ++r) gen = std::max(gen, c.gen(r).Stats().arena_peak_bytes);
  return {{"ctx", ctx}, {"gen", gen}};
}

uint64_t Outstanding(Cluster& c) {
  uint64_t n = 0;
  for (int i = 0; i < c.num_ctx_instances(); ++i) {
    for (int r = 0; r < c.num_ctx(); ++r) n += c.ctx(i, r).Stats().arena_outstanding_bytes;
  }
  for (int r = 0; r < c.num_gen(); ++r) n += c.gen(r).Stats().arena_outstanding_bytes;
  return n;
}

// Runs fn(0), ..., fn(n - 1) at once, each on a thread of its own kept
// for the next call, and returns when all have: the bench's ranks issue
// their calls in parallel, as the ranks of a serving engine do (each
// drives its own agent), instead of one thread calling every agent in
// turn.
class ParallelIssuer {
 public:
  explicit ParallelIssuer(int n) {
    for (int i = 0; i < n; ++i) {
      threads_.emplace_back([this, i] { Serve(i); });
    }
  }
  ~ParallelIssuer() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
  }

  void Run(const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> lock(mu_);
    fn_ = &fn;
    pending_ = static_cast<int>(threads_.size());
    ++generation_;
    cv_.notify_all();
    done_cv_.wait(lock, [&] { return pending_ == 0; });
    fn_ = nullptr;
  }

 private:
  void Serve(int i) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [&] { return stopping_ || generation_ != seen; });
      if (stopping_) return;
      seen = generation_;
      const std::function<void(int)>* fn = fn_;
      lock.unlock();
      (*fn)(i);
      lock.lock();
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int)>* fn_ = nullptr;  // guarded by mu_
  uint64_t generation_ = 0;                       // guarded by mu_
  int pending_ = 0;                               // guarded by mu_
  bool stopping_ = false;                         // guarded by mu_
  std::vector<std::jthread> threads_;             // last: joined first
};

// One path: requests in waves of `concurrency`, one per pool slot, request
// i of the run served by ctx instance i mod the cluster's instances. Only
// the transfers are timed; clearing and verifying happen between waves.
// With `ceiling_threads` > 0 (host pools), each wave's requests' fragments
// are then copied plainly by that many threads, timed apart (the paired
// ceiling, PathRun::ceiling_*): this shared machine's copy rate drifts by
// tens of percent within a minute, so a path is compared with a ceiling
// measured in the same seconds. The pulls and publications have settled
// by then; the copy writes the bytes the wave delivered, after they were
// verified.
// Each rank's calls (its Publish of every request of the wave its instance
// serves, or its Pull of every request, in order) come from a thread of its
// own.
PathRun RunPath(Cluster& c, TransferPath path, const BenchFlags& flags, TokenRange range,
                uint64_t first_id, uint64_t seed, int ceiling_threads) {
  PathRun run;
  run.path = path;
  int issued = 0;
  uint64_t id = first_id;
  const int num_ctx = c.num_ctx();
  const int num_gen = c.num_gen();
  const int instances = c.num_ctx_instances();
  const int ctx_threads = instances * num_ctx;  // instance by instance
  ParallelIssuer issuer(ctx_threads + num_gen);
  while (issued < flags.requests) {
    const int wave = std::min(flags.concurrency, flags.requests - issued);
    struct Request {
      uint64_t id = 0;
      BlockTables tables;
      std::vector<std::shared_ptr<Transfer>> pubs, pulls;  // by rank; null: not started
      std::vector<std::shared_ptr<std::atomic<int64_t>>> done_ns;
      std::atomic<int64_t> start_ns{std::numeric_limits<int64_t>::max()};  // first call
    };
    std::vector<Request> reqs(static_cast<size_t>(wave));
    for (int s = 0; s < wave; ++s) {
      c.ClearGen(s);
      Request& r = reqs[static_cast<size_t>(s)];
      r.id = id++;
      r.tables = c.Tables((issued + s) % instances, s, range.end, seed, r.id);
      r.pubs.resize(static_cast<size_t>(num_ctx));
      r.pulls.resize(static_cast<size_t>(num_gen));
      for (int g = 0; g < num_gen; ++g) {
        r.done_ns.push_back(std::make_shared<std::atomic<int64_t>>(0));
      }
    }
    PullOptions pull;
    pull.path = path;
    const auto wave_start = Clock::now();
    issuer.Run([&](int rank) {
      for (Request& r : reqs) {
        const int64_t now = Clock::now().time_since_epoch().count();
        int64_t first = r.start_ns.load();
        while (now < first && !r.start_ns.compare_exchange_weak(first, now)) {
        }
        if (rank < ctx_threads) {
          if (rank / num_ctx != r.tables.ctx_instance) continue;  // another instance's
          // Hybrid models: the state moves with the KV, from and into the
          // state slot of the request's slot.
          PublishOptions publish;
          publish.state_slot =
              c.ctx_harness(r.tables.ctx_instance, rank % num_ctx).StateSlot(r.tables.slot);
          auto p = c.ctx(r.tables.ctx_instance, rank % num_ctx)
                       .Publish(r.id, r.tables.ctx, range.end, publish);
          if (p.ok()) r.pubs[static_cast<size_t>(rank % num_ctx)] = *p;
          continue;
        }
        const int g = rank - ctx_threads;
        const std::shared_ptr<std::atomic<int64_t>> done = r.done_ns[static_cast<size_t>(g)];
        PullOptions with_state = pull;
        with_state.state_slot = c.harness(false, g).StateSlot(r.tables.slot);
        auto p = c.gen(g).Pull(r.id, c.ctx_instance_name(r.tables.ctx_instance), r.tables.gen,
                               range, with_state);
        if (!p.ok()) {
          done->store(1);
          continue;
        }
        (*p)->OnDone(
            [done](const Status&) { done->store(Clock::now().time_since_epoch().count()); });
        r.pulls[static_cast<size_t>(g)] = *p;
      }
    });
    for (Request& r : reqs) {
      std::erase(r.pubs, nullptr);
      std::erase(r.pulls, nullptr);
      for (auto& p : r.pulls) p->Wait().IgnoreError();
    }
    run.seconds += std::chrono::duration<double>(Clock::now() - wave_start).count();

    for (int s = 0; s < wave; ++s) {
      Request& r = reqs[static_cast<size_t>(s)];
      ++run.requests;
      Status outcome = r.pulls.size() == static_cast<size_t>(c.num_gen())
                           ? Status::Ok()
                           : InternalError("a pull could not start");
      uint64_t bytes = 0;
      int64_t last_ns = 0;
      for (auto& p : r.pulls) {
        const Status st = *p->Poll();
        if (outcome.ok() && !st.ok()) outcome = st;
        const TransferInfo info = p->info();
        bytes += info.bytes;
        ++run.taken[std::string(TransferPathName(info.path_taken))];
      }
      for (auto& d : r.done_ns) last_ns = std::max<int64_t>(last_ns, d->load());
      if (outcome.ok()) {
        ++run.completed;
        run.bytes += bytes;
        run.latency_ms.push_back(static_cast<double>(last_ns - r.start_ns.load()) / 1e6);
        for (int g = 0; g < c.num_gen(); ++g) {
          const VerifyResult v = c.VerifyGen(g, r.tables, range);
          run.verified += v.verified_bytes;
          run.mismatches += v.mismatches;
          if (v.mismatches != 0 && run.first_mismatch.empty())
            run.first_mismatch = v.first_mismatch;
        }
      } else {
        run.CountFailure(outcome);
      }
      if (flags.progress != nullptr) flags.progress->Add(1, outcome.ok() ? bytes : 0);
      for (auto& p : r.pubs) {
        if (!p->WaitFor(std::chrono::milliseconds(0))) p->Cancel();
        p->Wait().IgnoreError();
      }
    }
    if (ceiling_threads > 0) {
      FragmentList fragments;
      uint64_t bytes = 0;
      bool planned = true;
      for (const Request& r : reqs) {
        Result<FragmentList> one = RequestFragments(c, r.tables, range);
        if (!one.ok()) {
          planned = false;  // the bench's own planning failed: no pairing
          break;
        }
        for (const Fragment& f : *one) bytes += f.bytes;
        fragments.insert(fragments.end(), one->begin(), one->end());
      }
      if (planned && bytes > 0) {
        run.ceiling_seconds += CopyFragmentsInParallel(fragments, ceiling_threads);
        run.ceiling_bytes += bytes;
      }
    }
    issued += wave;
  }
  return run;
}

void LogPathDone(const nlohmann::json& run, double inject_fail_rate, std::ostream& log) {
  log << "  " << run["path"].get<std::string>() << ": done";
  if (inject_fail_rate > 0 && !run["fault_injection_applies"].get<bool>()) {
    log << " (no transport writes: fault injection did not apply)";
  }
  log << "\n";
  log.flush();
}

// The paths the fault injector reaches: it fails transport write
// operations, and only per-block and bounce write through the transport —
// bounce not where the writer gathers straight into the mapped recv slot
// (`bounce_writes` false: loopback with bounce_gather_mapped=1).
bool InjectorTouches(TransferPath path, bool bounce_writes) {
  return path == TransferPath::kPerBlock || (path == TransferPath::kBounce && bounce_writes);
}

nlohmann::json FaultInjectionReport(double rate, const std::vector<TransferPath>& paths,
                                    bool bounce_writes) {
  nlohmann::json touched = nlohmann::json::array(), untouched = nlohmann::json::array();
  for (TransferPath p : paths) {
    if (p == TransferPath::kAuto) continue;
    (InjectorTouches(p, bounce_writes) ? touched : untouched)
        .push_back(std::string(TransferPathName(p)));
  }
  return {{"write_fail_rate", rate},
          {"acts_on", "transport write operations"},
          {"paths_touched", touched},
          {"paths_untouched", untouched},
          {"auto", "touched only when it resolves to per-block or bounce"}};
}

// Creates `path` when missing (and removes it again) or opens it for
// appending: whether the report can be written, before the run.
Status CheckWritable(const std::string& path) {
  struct stat st {};
  const bool existed = ::stat(path.c_str(), &st) == 0;
  if (existed && S_ISDIR(st.st_mode)) {
    return InvalidArgumentError("--json " + path + ": is a directory");
  }
  std::FILE* f = std::fopen(path.c_str(), "a");
  if (f == nullptr) {
    return InvalidArgumentError("--json " + path + ": cannot write: " + std::strerror(errno));
  }
  std::fclose(f);
  if (!existed) std::remove(path.c_str());
  return Status::Ok();
}

// --memory and --device: a kind this build and machine can run, with a
// mode that supports it.
}  // namespace

Status ApplyConfigFlags(const std::vector<std::string>& settings, Config* config) {
  for (const std::string& kv : settings) {
    const size_t eq = kv.find('=');
    if (eq == std::string::npos) {
      return InvalidArgumentError("--config '" + kv + "' is not KEY=VALUE");
    }
    std::string key = kv.substr(0, eq);
    std::replace(key.begin(), key.end(), '-', '_');
    if (key == "bounce_size_mb" || key == "path") {
      return InvalidArgumentError("--config " + key + ": the bench sets it; use --" +
                                  (key == "path" ? std::string("path") : "bounce-size-mb"));
    }
    KVB_RETURN_IF_ERROR(config->Set(key, kv.substr(eq + 1)).WithContext("--config"));
  }
  return Status::Ok();
}

namespace {

// --gpus (docs/cuda.md, "Several GPUs"): one device per rank's worker
// process. The shape of the list is checked before the devices themselves,
// so that a machine without them still names what is wrong with it.
Status CheckGpusFlag(const BenchFlags& flags, const Scenario& scenario) {
  if (flags.gpus.empty()) return Status::Ok();
  if (flags.memory != "cuda") {
    return InvalidArgumentError("--gpus applies to --memory cuda only");
  }
  if (flags.transport != "cuda-ipc") {
    return UnimplementedError(
        "--gpus places every rank's worker process on a device of its own: it needs --transport "
        "cuda-ipc (over " +
        flags.transport + " every rank uses --device)");
  }
  if (flags.device != 0) {
    return InvalidArgumentError("--gpus and --device " + std::to_string(flags.device) +
                                ": give one of the two");
  }
  const int ranks = scenario.ctx.num_ranks() + scenario.gen.num_ranks();
  if (static_cast<int>(flags.gpus.size()) != ranks) {
    return InvalidArgumentError("--gpus lists " + std::to_string(flags.gpus.size()) +
                                " devices: it needs one per rank, " + std::to_string(ranks) +
                                " (ctx ranks first: " + std::to_string(scenario.ctx.num_ranks()) +
                                " ctx, then " + std::to_string(scenario.gen.num_ranks()) + " gen)");
  }
  for (size_t i = 0; i < flags.gpus.size(); ++i) {
    if (flags.gpus[i] < 0) {
      return InvalidArgumentError("--gpus entry " + std::to_string(i) + " = " +
                                  std::to_string(flags.gpus[i]) + " is not a device ordinal");
    }
  }
  for (size_t i = 0; i < flags.gpus.size(); ++i) {
    if (Status s = PoolMemoryFromFlags(flags.memory, flags.gpus[i]).status(); !s.ok()) {
      return s.WithContext("--gpus entry " + std::to_string(i));
    }
  }
  return Status::Ok();
}

Status CheckMemoryFlags(const BenchFlags& flags, const Scenario& scenario) {
  if (!flags.gpus.empty()) return CheckGpusFlag(flags, scenario);
  return PoolMemoryFromFlags(flags.memory, flags.device).status();
}

}  // namespace

int64_t DefaultArenaMb(const Scenario& scenario, bool ctx_side, int concurrency) {
  const uint64_t bytes =
      SatMul(BusiestStream(scenario, ctx_side), static_cast<uint64_t>(concurrency));
  return static_cast<int64_t>(std::min<uint64_t>(bytes / MiB(1) + 2, uint64_t{1} << 62));
}

BenchFlags::BenchFlags() {
  // A shape that fits a workstation's memory and still shows the TP
  // mismatch: llama-3.1-8b, ctx TP8 (one kv head per rank) -> gen TP2.
  scenario.default_model = "llama-3.1-8b";
  scenario.tokens = 2048;
  scenario.ctx = "tp=8,pp=1";
  scenario.gen = "tp=2,pp=1";
  scenario.max_ranks_per_instance = kBenchMaxRanksPerInstance;
}

CLI::App* AddBenchCommand(CLI::App& app, BenchFlags* flags) {
  CLI::App* cmd = app.add_subcommand(
      "bench",
      "Move the KV of many requests between an in-process ctx and gen instance on each "
      "path, verify every byte, report throughput, latency and leaks");
  RegisterBenchFlags(*cmd, flags, /*sweep=*/false);
  return cmd;
}

void RegisterBenchFlags(CLI::App& app, BenchFlags* flags, bool sweep) {
  CLI::App* cmd = &app;
  flags->scenario.Register(*cmd);
  cmd->add_option("--transport", flags->transport,
                  "Transport: loopback (every rank a thread of this process) or ucx (every rank "
                  "a `kvbounce worker` process)")
      ->capture_default_str();
  cmd->add_option("--memory", flags->memory,
                  "Pool memory: host, or cuda (every pool in device memory of --device, builds "
                  "with CUDA; over ucx, which reaches host memory only, the KV stages through "
                  "pinned host arenas on the bounce path)")
      ->capture_default_str();
  cmd->add_option("--device", flags->device, "The CUDA device of --memory cuda")
      ->capture_default_str();
  cmd->add_option("--gpus", flags->gpus,
                  "Comma list of CUDA devices, one per rank, ctx ranks first (--transport "
                  "cuda-ipc): each rank's worker process on its device; the ceiling is then a "
                  "peer copy from the first ctx rank's device to the first gen rank's")
      ->delimiter(',');
  cmd->add_option("--path", flags->paths,
                  "Comma list of per-block,bounce,direct,auto (default: every path the "
                  "transport supports, one run each; bounce only while it is on)");
  cmd->add_option("--requests", flags->requests, "Requests per path run")->capture_default_str();
  cmd->add_option("--warmup", flags->warmup,
                  "Requests each path moves right before its measured run, verified but not "
                  "timed (loopback only)")
      ->capture_default_str();
  cmd->add_option("--concurrency", flags->concurrency,
                  "Requests in flight at once (1.." + std::to_string(kMaxConcurrency) + ")")
      ->capture_default_str();
  cmd->add_option("--ctx-instances", flags->ctx_instances,
                  "Ctx (prefill) instances feeding the one gen instance, each of --ctx, the "
                  "requests dealt to them round-robin (1.." +
                      std::to_string(kMaxCtxInstances) + "; loopback only)")
      ->capture_default_str();
  cmd->add_option_function<int64_t>(
      "--bounce-size-mb", [flags](const int64_t& v) { flags->bounce_size_mb = v; },
      "MiB of each staging arena (default: enough for --concurrency requests; 0 turns the "
      "bounce path off)");
  cmd->add_option_function<int64_t>(
      "--send-arena-mb", [flags](const int64_t& v) { flags->send_arena_mb = v; },
      "MiB of each ctx rank's send arena alone (default: as --bounce-size-mb); a writer's "
      "stream larger than it streams through it in chunks");
  cmd->add_option_function<int64_t>(
      "--chunk-mb", [flags](const int64_t& v) { flags->chunk_mb = v; },
      "MiB of a streamed bounce's chunk (Config::bounce_chunk_mb; default: per memory kind, 0 "
      "the same); a writer's stream larger than one chunk streams through chunk slots the "
      "receiver grants");
  cmd->add_option("--inject-fail-rate", flags->inject_fail_rate,
                  "Probability (0..1) that a transport write operation fails (per-block and "
                  "bounce write through the transport; direct does not)")
      ->capture_default_str();
  if (!sweep)
    cmd->add_option("--json", flags->json_file, "Also write the report to this JSON file");
  cmd->add_flag("--quiet", flags->quiet,
                "No progress on standard error (a live line on a terminal, else a line per "
                "path run and every 10 s)");
  cmd->add_option("--poll-before-sleep-us", flags->poll_before_sleep_us,
                  "µs an idle agent thread (control loop, UCX progress) keeps polling before it "
                  "sleeps (Config::poll_before_sleep_us; default 0)");
  cmd->add_option("--config", flags->config,
                  "KEY=VALUE of every agent's config (e.g. inline_copy_kb=0); repeatable; "
                  "bounce_size_mb and path have their own flags");
  cmd->add_option("--ucx-tls", flags->ucx_tls,
                  "ucx: UCX_TLS for the worker processes (e.g. tcp, or shm,tcp)");
  cmd->add_option("--num-workers", flags->num_workers,
                  "ucx: UCP workers per agent (default: the config's num_workers)");
  cmd->add_option_function<double>(
      "--step-timeout", [flags](const double& v) { flags->step_timeout_s = v; },
      "ucx: seconds one step (start, connect, a wave of requests, shutdown) may take before "
      "the bench ends every worker (default " +
          std::to_string(static_cast<int>(kDefaultStepTimeoutS)) + ")");
  if (sweep) return;
  CLI::Option* chaos =
      cmd->add_flag("--chaos", flags->chaos,
                    "Chaos mode: random cancels, deadlines, retires and agent restarts on every "
                    "path; checks that settled requests stay settled");
  cmd->add_option("--chaos-seconds", flags->chaos_seconds, "How long chaos mode runs")
      ->capture_default_str()
      ->needs(chaos);
  cmd->add_option("--chaos-requests", flags->chaos_requests,
                  "Stop chaos mode after this many requests too (0: no limit)")
      ->capture_default_str()
      ->needs(chaos);
  cmd->add_option("--chaos-restart-ms", flags->chaos_restart_ms,
                  "Mean time between agent restarts in chaos mode (0: none)")
      ->capture_default_str()
      ->needs(chaos);
}

int RankDevice(const BenchFlags& flags, const Scenario& scenario, bool ctx, int rank) {
  if (flags.gpus.empty()) return flags.device;
  const size_t index = static_cast<size_t>(ctx ? rank : scenario.ctx.num_ranks() + rank);
  return index < flags.gpus.size() ? flags.gpus[index] : flags.device;
}

Result<BenchPlan> PlanBench(const BenchFlags& flags) {
  KVB_ASSIGN_OR_RETURN(Scenario scenario, BuildScenario(flags.scenario));
  // Checked before the transport's own requirements, so that a build or
  // machine without UCX or CUDA names this flag too.
  if (flags.ctx_instances < 1 || flags.ctx_instances > kMaxCtxInstances) {
    return InvalidArgumentError("--ctx-instances = " + std::to_string(flags.ctx_instances) +
                                " is invalid: must be in [1, " + std::to_string(kMaxCtxInstances) +
                                "]");
  }
  if (flags.ctx_instances > 1 && (flags.transport == "ucx" || flags.transport == "cuda-ipc")) {
    // The workers of the multi-process bench are one ctx instance and one
    // gen instance; their command protocol names no other.
    return UnimplementedError("--ctx-instances " + std::to_string(flags.ctx_instances) +
                              ": --transport " + flags.transport +
                              " runs one ctx instance; several run over --transport loopback only");
  }
  if (flags.ctx_instances > 1 && flags.chaos) {
    return UnimplementedError("--ctx-instances " + std::to_string(flags.ctx_instances) +
                              ": --chaos runs one ctx instance (it restarts the ranks of one)");
  }
  if (flags.transport == "ucx") {
    if (!UcxTransportAvailable()) {
      return UnimplementedError(
          "--transport ucx: this build has no UCX transport (build with "
          "UCX installed: libucx-dev / ucx-devel)");
    }
    if (flags.chaos) {
      return UnimplementedError(
          "--chaos runs over --transport loopback only (it restarts agents "
          "inside one process)");
    }
  } else if (flags.transport == "cuda-ipc") {
    if (flags.memory != "cuda") {
      return InvalidArgumentError(
          "--transport cuda-ipc moves device memory: it needs --memory cuda");
    }
    if (flags.chaos) {
      return UnimplementedError(
          "--chaos runs over --transport loopback only (it restarts agents inside one process)");
    }
    for (const auto& [set, name] : {std::pair{!flags.ucx_tls.empty(), "--ucx-tls"},
                                    std::pair{flags.num_workers != 0, "--num-workers"}}) {
      if (set) return InvalidArgumentError(std::string(name) + " applies to --transport ucx only");
    }
  } else if (flags.transport == "loopback") {
    for (const auto& [set, name] :
         {std::pair{!flags.ucx_tls.empty(), "--ucx-tls"},
          std::pair{flags.num_workers != 0, "--num-workers"},
          std::pair{flags.step_timeout_s.has_value(), "--step-timeout"}}) {
      if (set) return InvalidArgumentError(std::string(name) + " applies to --transport ucx only");
    }
  } else {
    return InvalidArgumentError("--transport " + flags.transport +
                                ": unknown transport (known: loopback, ucx, cuda-ipc)");
  }
  if (flags.num_workers < 0 || flags.num_workers > Config::kMaxNumWorkers) {
    return InvalidArgumentError("--num-workers = " + std::to_string(flags.num_workers) +
                                " is invalid: must be in [1, " +
                                std::to_string(Config::kMaxNumWorkers) + "]");
  }
  if (flags.step_timeout_s && !(*flags.step_timeout_s > 0 && *flags.step_timeout_s <= 86400)) {
    return InvalidArgumentError("--step-timeout = " + std::to_string(*flags.step_timeout_s) +
                                " is invalid: must be in (0, 86400] seconds");
  }
  if (flags.poll_before_sleep_us) {
    Config probe;
    if (Status s = probe.Set("poll_before_sleep_us", std::to_string(*flags.poll_before_sleep_us));
        !s.ok()) {
      return s.WithContext("--poll-before-sleep-us");
    }
  }
  if (flags.chunk_mb) {
    Config probe;
    if (Status s = probe.Set("bounce_chunk_mb", std::to_string(*flags.chunk_mb)); !s.ok()) {
      return s.WithContext("--chunk-mb");
    }
  }
  {
    Config probe;
    KVB_RETURN_IF_ERROR(ApplyConfigFlags(flags.config, &probe));
  }
  KVB_RETURN_IF_ERROR(CheckMemoryFlags(flags, scenario));
  if (flags.requests < 1) {
    return InvalidArgumentError("--requests = " + std::to_string(flags.requests) +
                                " is invalid: must be >= 1");
  }
  if (flags.warmup < 0) {
    return InvalidArgumentError("--warmup = " + std::to_string(flags.warmup) +
                                " is invalid: must be >= 0");
  }
  if (flags.warmup > 0 && (flags.transport == "ucx" || flags.transport == "cuda-ipc")) {
    return UnimplementedError("--warmup: --transport " + flags.transport +
                              " runs its requests in worker processes; warm-up runs over "
                              "--transport loopback only");
  }
  if (flags.warmup > 0 && flags.chaos) {
    return InvalidArgumentError("--warmup: --chaos has no measured runs to warm up");
  }
  if (flags.concurrency < 1 || flags.concurrency > kMaxConcurrency) {
    return InvalidArgumentError("--concurrency = " + std::to_string(flags.concurrency) +
                                " is invalid: must be in [1, " + std::to_string(kMaxConcurrency) +
                                "]");
  }
  if (!(flags.inject_fail_rate >= 0 && flags.inject_fail_rate <= 1)) {
    return InvalidArgumentError("--inject-fail-rate = " + std::to_string(flags.inject_fail_rate) +
                                " is invalid: must be in [0, 1]");
  }
  if (flags.bounce_size_mb && *flags.bounce_size_mb < 0) {
    return InvalidArgumentError("--bounce-size-mb = " + std::to_string(*flags.bounce_size_mb) +
                                " is invalid: must be >= 0 (0 turns the bounce path off; leave "
                                "it out for an arena sized for --concurrency)");
  }
  if (flags.bounce_size_mb && *flags.bounce_size_mb > Config::kMaxBounceSizeMb) {
    return InvalidArgumentError(
        "--bounce-size-mb = " + std::to_string(*flags.bounce_size_mb) +
        " is invalid: must be <= " + std::to_string(Config::kMaxBounceSizeMb));
  }
  if (flags.send_arena_mb &&
      (*flags.send_arena_mb < 1 || *flags.send_arena_mb > Config::kMaxBounceSizeMb)) {
    return InvalidArgumentError("--send-arena-mb = " + std::to_string(*flags.send_arena_mb) +
                                " is invalid: must be 1 to " +
                                std::to_string(Config::kMaxBounceSizeMb));
  }
  if (flags.chaos) {
    if (!(flags.chaos_seconds > 0 && flags.chaos_seconds <= 86400)) {
      return InvalidArgumentError("--chaos-seconds = " + std::to_string(flags.chaos_seconds) +
                                  " is invalid: must be in (0, 86400]");
    }
    if (flags.chaos_requests < 0) {
      return InvalidArgumentError("--chaos-requests = " + std::to_string(flags.chaos_requests) +
                                  " is invalid: must be >= 0 (0: no limit)");
    }
    if (flags.chaos_restart_ms < 0 || flags.chaos_restart_ms > 3600000) {
      return InvalidArgumentError("--chaos-restart-ms = " + std::to_string(flags.chaos_restart_ms) +
                                  " is invalid: must be in [0, 3600000] (0: no restarts)");
    }
  }
  const bool bounce_off = flags.bounce_size_mb && *flags.bounce_size_mb == 0;
  std::vector<TransferPath> paths;
  if (flags.paths.empty()) {
    paths = {TransferPath::kPerBlock, TransferPath::kDirect, TransferPath::kAuto};
    if (!bounce_off) paths.insert(paths.begin() + 1, TransferPath::kBounce);
  } else {
    size_t pos = 0;
    while (pos <= flags.paths.size()) {
      size_t comma = flags.paths.find(',', pos);
      if (comma == std::string::npos) comma = flags.paths.size();
      Result<TransferPath> p = ParseTransferPath(flags.paths.substr(pos, comma - pos));
      if (!p.ok()) return p.status().WithContext("--path");
      if (*p == TransferPath::kBounce && bounce_off) {
        return InvalidArgumentError(
            "--path bounce needs --bounce-size-mb > 0 (0 turns the bounce path off)");
      }
      paths.push_back(*p);
      pos = comma + 1;
    }
  }
  const int concurrency =
      flags.chaos ? flags.concurrency : std::min(flags.concurrency, flags.requests);
  // Chaos drivers alternate between two slots each.
  const int slots = flags.chaos ? 2 * concurrency : concurrency;
  const int64_t ctx_arena_mb =
      bounce_off ? 0
                 : flags.send_arena_mb.value_or(
                       flags.bounce_size_mb.value_or(DefaultArenaMb(scenario, true, concurrency)));
  const int64_t gen_arena_mb =
      flags.bounce_size_mb.value_or(DefaultArenaMb(scenario, false, concurrency));

  // Block ids are int32: every slot holds twice a request's blocks.
  for (const Topology* t : {&scenario.ctx, &scenario.gen}) {
    const int64_t per_request = CeilDiv(scenario.tokens.end, t->spec().tokens_per_block);
    if (per_request > kMaxPoolBlocks / 2 / slots) {
      return InvalidArgumentError(
          "--tokens = " + std::to_string(scenario.tokens.end) + " with " + std::to_string(slots) +
          " pool slots (--concurrency" + (flags.chaos ? ", two per chaos driver" : "") +
          ") needs " + std::to_string(per_request) + " x 2 x " + std::to_string(slots) +
          " blocks per pool: more than the 2^31 - 1 that 32-bit block ids can name");
    }
  }
  const int64_t ctx_pool_blocks =
      2 * slots * CeilDiv(scenario.tokens.end, scenario.ctx.spec().tokens_per_block);
  const int64_t gen_pool_blocks =
      2 * slots * CeilDiv(scenario.tokens.end, scenario.gen.spec().tokens_per_block);
  const bool device_pools = flags.memory == "cuda";
  std::string cap_name;
  const uint64_t cap = MemoryCap(scenario.memory_cap_bytes, &cap_name);
  // Device pools and arenas live on the GPU: a run that does not fit there
  // fails allocating them, with the runtime's out-of-memory error.
  if (!device_pools) {
    KVB_RETURN_IF_ERROR(CheckMemory(
        BenchMemory(scenario.ctx, scenario.gen, scenario.tokens, ctx_pool_blocks, gen_pool_blocks,
                    ctx_arena_mb, gen_arena_mb, concurrency, flags.ctx_instances),
        cap, cap_name,
        "use fewer --tokens, a smaller model, fewer ranks, a lower "
        "--concurrency or a smaller --bounce-size-mb"));
  }
  if (!flags.json_file.empty()) KVB_RETURN_IF_ERROR(CheckWritable(flags.json_file));
  return BenchPlan{std::move(scenario), std::move(paths), concurrency, slots,
                   ctx_arena_mb,        gen_arena_mb};
}

Result<nlohmann::json> RunBench(const BenchFlags& flags, std::ostream& log) {
  KVB_ASSIGN_OR_RETURN(BenchPlan plan, PlanBench(flags));
  const Scenario& scenario = plan.scenario;
  const std::vector<TransferPath>& paths = plan.paths;
  const int concurrency = plan.concurrency;
  const int slots = plan.slots;
  const int64_t ctx_arena_mb = plan.ctx_arena_mb;
  const int64_t gen_arena_mb = plan.gen_arena_mb;
  const bool bounce_off = flags.bounce_size_mb && *flags.bounce_size_mb == 0;
  const bool device_pools = flags.memory == "cuda";
  // Over loopback the writer maps the recv arena and, by default, gathers
  // straight into it: its bounce then writes nothing through the transport.
  Config probe;
  KVB_RETURN_IF_ERROR(ApplyConfigFlags(flags.config, &probe));
  const bool bounce_writes = flags.transport != "loopback" || probe.bounce_gather_mapped == 0;

  ClusterOptions options;
  options.ctx = scenario.ctx.spec();
  options.gen = scenario.gen.spec();
  options.ctx_instances = flags.ctx_instances;
  options.slots = slots;
  options.max_tokens = scenario.tokens.end;
  options.ctx_config.bounce_size_mb = ctx_arena_mb;
  options.gen_config.bounce_size_mb = gen_arena_mb;
  KVB_RETURN_IF_ERROR(ApplyConfigFlags(flags.config, &options.ctx_config));
  KVB_RETURN_IF_ERROR(ApplyConfigFlags(flags.config, &options.gen_config));
  if (flags.poll_before_sleep_us) {
    options.ctx_config.poll_before_sleep_us = *flags.poll_before_sleep_us;
    options.gen_config.poll_before_sleep_us = *flags.poll_before_sleep_us;
  }
  if (flags.chunk_mb) {
    options.ctx_config.bounce_chunk_mb = *flags.chunk_mb;
    options.gen_config.bounce_chunk_mb = *flags.chunk_mb;
  }
  options.faults = true;
  options.memory = device_pools ? MemoryKind::kCuda : MemoryKind::kHost;
  options.device = flags.device;
  options.ctx_faults.write_fail_rate = flags.inject_fail_rate;
  options.ctx_faults.seed = scenario.seed;
  ChaosOptions chaos;
  if (flags.chaos) {
    chaos.paths = paths;
    chaos.tokens = scenario.tokens;
    chaos.concurrency = concurrency;
    chaos.duration = std::chrono::milliseconds(static_cast<int64_t>(flags.chaos_seconds * 1000));
    chaos.max_requests = flags.chaos_requests;
    chaos.restart_interval = std::chrono::milliseconds(flags.chaos_restart_ms);
    chaos.seed = scenario.seed;
    chaos.inject_fail_rate = flags.inject_fail_rate;
    options.ctx_config.transfer_timeout_ms = chaos.timeout.count();
    options.gen_config.transfer_timeout_ms = chaos.timeout.count();
  }
  std::string path_list;
  for (TransferPath p : paths) {
    path_list += (path_list.empty() ? "" : ",") + std::string(TransferPathName(p));
  }
  log << "kvbounce bench: " << DescribeScenario(scenario) << "\n"
      << "  transport " << flags.transport << ", memory " << flags.memory << ", paths " << path_list
      << ", ";
  if (flags.ctx_instances > 1) {
    log << flags.ctx_instances << " ctx instances (requests round-robin) -> 1 gen instance, ";
  }
  if (flags.chaos) {
    log << "chaos mode";
  } else {
    log << flags.requests << " requests per path";
    if (flags.warmup > 0) log << " (after " << flags.warmup << " to warm up)";
  }
  log << ", " << concurrency << " in flight, arenas ";
  if (ctx_arena_mb == 0 && gen_arena_mb == 0) {
    log << "off";
  } else {
    log << ctx_arena_mb << " MiB (ctx send) / " << gen_arena_mb << " MiB (gen recv)";
  }
  log << "\n";
  if (bounce_off && flags.paths.empty()) {
    log << "  bounce path off (--bounce-size-mb 0): not run\n";
  }
  if (flags.inject_fail_rate > 0) {
    log << "  fault injection: each transport write operation fails with probability "
        << flags.inject_fail_rate
        << (bounce_writes
                ? "; it touches per-block and bounce (they write through the transport), not "
                  "direct (it copies without the transport), and auto only when it picks "
                  "per-block or bounce\n"
                : "; it touches per-block (it writes through the transport), not bounce (it "
                  "gathers straight into the mapped recv slot; --config bounce_gather_mapped=0 "
                  "writes instead) or direct (they copy without the transport), and auto only "
                  "when it picks per-block\n");
  }
  nlohmann::json report;
  report["scenario"] = DescribeScenario(scenario);
  report["bounce_size_mb"] = {{"ctx", ctx_arena_mb}, {"gen", gen_arena_mb}};
  report["concurrency"] = concurrency;
  if (flags.chunk_mb) report["bounce_chunk_mb"] = *flags.chunk_mb;
  report["ctx_instances"] = flags.ctx_instances;
  report["fault_injection"] = FaultInjectionReport(flags.inject_fail_rate, paths, bounce_writes);
  if (flags.progress != nullptr && !flags.chaos && flags.progress->total() == 0) {
    flags.progress->SetTotal(static_cast<int64_t>(paths.size()) * flags.requests);
  }
  if (flags.transport == "ucx" || flags.transport == "cuda-ipc") {
    KVB_ASSIGN_OR_RETURN(nlohmann::json result, RunProcessBench(flags, plan, log));
    report.update(result);
    return report;
  }
  log << "  setting up "
      << flags.ctx_instances * scenario.ctx.num_ranks() + scenario.gen.num_ranks()
      << " agents and filling the ctx pools...\n";
  log.flush();
  KVB_ASSIGN_OR_RETURN(std::unique_ptr<Cluster> cluster, Cluster::Create(options));

  if (flags.chaos) {
    chaos.exit_when_stuck = flags.chaos_exit_when_stuck;
    const FaultStats before = cluster->FaultTotals(true);
    nlohmann::json c = RunChaos(*cluster, chaos, log);
    const FaultStats after = cluster->FaultTotals(true);
    c["injected_write_failures"] = after.injected_write_failures - before.injected_write_failures;
    c["injected_failed_batches"] = after.failed_batches - before.failed_batches;
    cluster->Shutdown();
    report["chaos"] = std::move(c);
    return report;
  }

  // The ceiling every path is compared with, measured in this run: one large
  // device-to-device copy for device pools.
  std::optional<double> ceiling_gbps;
  if (device_pools) {
    Result<Ceiling> ceiling = MeasureDeviceCeiling(flags.device);
    if (!ceiling.ok()) return ceiling.status().WithContext("measuring the device copy ceiling");
    ceiling_gbps = ceiling->gbps;
    report["ceiling"] = {{"what", ceiling->what}, {"gbps", ceiling->gbps}};
    log << "  ceiling: device-to-device copy " << *ceiling_gbps << " GB/s\n";
  } else if (!flags.chaos) {
    // Host pools: the requests' own fragments copied by as many threads as
    // the process's copy workers (CopyWorkers::SharedThreads).
    Result<Ceiling> ceiling = MeasureScatteredCopyCeiling(
        *cluster, scenario.tokens, std::min(flags.concurrency, flags.requests),
        CopyWorkers::SharedThreads());
    if (!ceiling.ok()) return ceiling.status().WithContext("measuring the scattered copy ceiling");
    ceiling_gbps = ceiling->gbps;
    report["ceiling"] = {{"what", ceiling->what}, {"gbps", ceiling->gbps}};
    log << "  ceiling: " << ceiling->what << ": " << *ceiling_gbps << " GB/s\n";
  }

  // Host pools: each path also against its paired ceiling (RunPath).
  const int paired_ceiling_threads =
      !device_pools && !flags.chaos ? CopyWorkers::SharedThreads() : 0;
  nlohmann::json runs = nlohmann::json::array();
  uint64_t next_id = 1;
  for (TransferPath path : paths) {
    // Warm-up: the same kind of requests, verified, outside the figures.
    std::optional<PathRun> warm;
    if (flags.warmup > 0) {
      BenchFlags warm_flags = flags;
      warm_flags.requests = flags.warmup;
      warm_flags.progress = nullptr;
      warm = RunPath(*cluster, path, warm_flags, scenario.tokens, next_id, scenario.seed, 0);
      next_id += static_cast<uint64_t>(flags.warmup);
    }
    const uint64_t writes_before = CtxWrites(*cluster);
    const auto chunks_before = GenChunks(*cluster);
    const FaultStats faults_before = cluster->FaultTotals(true);
    if (flags.progress != nullptr) {
      flags.progress->StartPath(std::string(TransferPathName(path)), flags.requests);
    }
    PathRun run = RunPath(*cluster, path, flags, scenario.tokens, next_id, scenario.seed,
                          paired_ceiling_threads);
    if (flags.progress != nullptr) flags.progress->EndPath();
    next_id += static_cast<uint64_t>(flags.requests);
    // Quarantined slots come back once their writers stopped.
    const auto deadline = Clock::now() + std::chrono::seconds(5);
    uint64_t outstanding = Outstanding(*cluster);
    while (outstanding != 0 && Clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      outstanding = Outstanding(*cluster);
    }
    const FaultStats faults_after = cluster->FaultTotals(true);
    run.injected_write_failures =
        faults_after.injected_write_failures - faults_before.injected_write_failures;
    run.injected_failed_batches = faults_after.failed_batches - faults_before.failed_batches;
    run.transport_writes = CtxWrites(*cluster) - writes_before;
    run.arena_outstanding_bytes = outstanding;
    const auto chunks_after = GenChunks(*cluster);
    run.chunks = chunks_after.first - chunks_before.first;
    run.credit_stall_ms =
        std::chrono::duration<double, std::milli>(chunks_after.second - chunks_before.second)
            .count();
    nlohmann::json j =
        PathRunJson(run, flags.transport, flags.memory, flags.inject_fail_rate, ceiling_gbps);
    if (warm.has_value()) {
      nlohmann::json w = {
          {"requests", warm->requests},     {"completed", warm->completed},
          {"failed", warm->failed},         {"unexplained_failures", warm->unexplained},
          {"mismatches", warm->mismatches}, {"verified_bytes", warm->verified}};
      if (!warm->first_mismatch.empty()) w["first_mismatch"] = warm->first_mismatch;
      if (!warm->first_unexplained.empty())
        w["first_unexplained_failure"] = warm->first_unexplained;
      j["warmup"] = std::move(w);
    }
    runs.push_back(j);
    LogPathDone(j, flags.inject_fail_rate, log);
  }
  report["arena_peak_bytes"] = ArenaPeaks(*cluster);
  cluster->Shutdown();
  report["runs"] = std::move(runs);
  return report;
}

bool BenchPassed(const nlohmann::json& report, std::string* why) {
  if (report.contains("chaos")) {
    return ChaosViolations(report["chaos"], why) == 0;
  }
  if (report.contains("failure")) {
    *why = report["failure"].get<std::string>();
    return false;
  }
  // A run or its warm-up (`who` names it) that delivered wrong bytes, or
  // failed a request without an injected fault.
  auto mismatched = [why](const nlohmann::json& r, const std::string& who) {
    if (r["mismatches"].get<uint64_t>() == 0) return false;
    *why =
        who + ": " + std::to_string(r["mismatches"].get<uint64_t>()) + " mismatched rows" +
        (r.contains("first_mismatch") ? " (" + r["first_mismatch"].get<std::string>() + ")" : "");
    return true;
  };
  auto unexplained = [why](const nlohmann::json& r, const std::string& who) {
    if (r["unexplained_failures"].get<int>() == 0) return false;
    *why = who + ": " + std::to_string(r["unexplained_failures"].get<int>()) +
           " requests failed without an injected fault (" +
           r.value("first_unexplained_failure", std::string()) + ")";
    return true;
  };
  for (const auto& run : report["runs"]) {
    const std::string path = run["path"];
    if (run.contains("warmup") && (mismatched(run["warmup"], path + " warm-up") ||
                                   unexplained(run["warmup"], path + " warm-up"))) {
      return false;
    }
    if (mismatched(run, path)) return false;
    if (run["arena_outstanding_bytes"].get<uint64_t>() != 0) {
      *why = path + ": " + std::to_string(run["arena_outstanding_bytes"].get<uint64_t>()) +
             " arena bytes still outstanding";
      return false;
    }
    if (unexplained(run, path)) return false;
  }
  return true;
}

void PrintBenchTable(const nlohmann::json& report, std::ostream& out) {
  if (report.contains("chaos")) {
    PrintChaosTable(report["chaos"], out);
    return;
  }
  char line[512];
  const bool ceiling = report.contains("ceiling");
  if (report.contains("ctx_instances")) {
    const int n = report["ctx_instances"].get<int>();
    out << "\n"
        << n << " ctx instance" << (n == 1 ? "" : "s") << " -> 1 gen instance"
        << (n == 1 ? "" : " (requests round-robin)") << "\n";
  }
  std::snprintf(line, sizeof(line),
                "\n%-9s %5s %5s %5s %9s %6s %8s %8s %8s %8s %10s %10s %6s %6s %7s %8s  %s\n",
                "path", "reqs", "done", "fail", "GB/s", ceiling ? "ceil%" : "", "p50 ms", "p90 ms",
                "p99 ms", "max ms", "writes", "verified", "bad", "leak", "chunks", "stall ms",
                "paths taken");
  out << line;
  for (const auto& r : report["runs"]) {
    std::string taken;
    for (const auto& [name, n] : r["paths_taken"].items()) {
      taken += (taken.empty() ? "" : " ") + name + "=" + std::to_string(n.get<uint64_t>());
    }
    const auto& l = r["latency_ms"];
    char fraction[16] = "";
    if (r.contains("fraction_of_ceiling")) {
      std::snprintf(fraction, sizeof(fraction), "%.1f",
                    100 * r["fraction_of_ceiling"].get<double>());
    }
    std::snprintf(line, sizeof(line),
                  "%-9s %5d %5d %5d %9.2f %6s %8.2f %8.2f %8.2f %8.2f %10llu %9.1fM %6llu %6llu "
                  "%7llu %8.2f  %s\n",
                  r["path"].get<std::string>().c_str(), r["requests"].get<int>(),
                  r["completed"].get<int>(), r["failed"].get<int>(),
                  r["throughput_gbps"].get<double>(), fraction, l["p50"].get<double>(),
                  l["p90"].get<double>(), l["p99"].get<double>(), l["max"].get<double>(),
                  static_cast<unsigned long long>(r["transport_writes"].get<uint64_t>()),
                  static_cast<double>(r["verified_bytes"].get<uint64_t>()) / 1e6,
                  static_cast<unsigned long long>(r["mismatches"].get<uint64_t>()),
                  static_cast<unsigned long long>(r["arena_outstanding_bytes"].get<uint64_t>()),
                  static_cast<unsigned long long>(r.value("chunks", uint64_t{0})),
                  r.value("credit_stall_ms", 0.0), taken.c_str());
    out << line;
  }
  out << "\nGB/s: payload delivered by completed requests per second of transfer (10^9 B/s); "
         "writes: data-plane transport operations; verified: bytes checked element by element;\n"
         "chunks: chunks of streamed bounce requests scattered; stall ms: time their writers "
         "waited idle for a credit, summed.\n";
  if (report.contains("arena_peak_bytes")) {
    std::snprintf(line, sizeof(line),
                  "peak arena use (one rank, whole bench): ctx send %.1f MiB of %lld, gen recv "
                  "%.1f MiB of %lld\n",
                  static_cast<double>(report["arena_peak_bytes"]["ctx"].get<uint64_t>()) / MiB(1),
                  static_cast<long long>(report["bounce_size_mb"]["ctx"].get<int64_t>()),
                  static_cast<double>(report["arena_peak_bytes"]["gen"].get<uint64_t>()) / MiB(1),
                  static_cast<long long>(report["bounce_size_mb"]["gen"].get<int64_t>()));
    out << line;
  }
  if (ceiling) {
    std::string paired;
    for (const auto& r : report["runs"]) {
      if (!r.contains("ceiling_gbps")) continue;
      std::snprintf(line, sizeof(line), "%s%s %.2f", paired.empty() ? "" : ", ",
                    r["path"].get<std::string>().c_str(), r["ceiling_gbps"].get<double>());
      paired += line;
    }
    if (paired.empty()) {
      out << "ceil%: GB/s as a share of the ceiling measured in the same run ("
          << report["ceiling"]["what"].get<std::string>() << ": "
          << report["ceiling"]["gbps"].get<double>() << " GB/s).\n";
    } else {
      out << "ceil%: GB/s as a share of the path's paired ceiling: its requests' fragments copied "
             "the same way right after each of its waves ("
          << paired << " GB/s; before the paths ran: " << report["ceiling"]["gbps"].get<double>()
          << ").\n";
    }
  }
}

}  // namespace kvbounce::tools
