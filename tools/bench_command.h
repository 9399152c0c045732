// `kvbounce bench`: runs every rank of one ctx instance and one gen instance
// (agents of this process over loopback, or `kvbounce worker` processes over
// UCX: tools/process_bench.h), moves the KV of many requests on each path,
// verifies every received byte semantically and reports throughput, latency,
// writes, path and leaks. Over loopback, --ctx-instances N runs N ctx
// instances that feed the one gen instance, the requests dealt to them
// round-robin.
#ifndef KVBOUNCE_TOOLS_BENCH_COMMAND_H_
#define KVBOUNCE_TOOLS_BENCH_COMMAND_H_

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "kvbounce/config.h"
#include "kvbounce/status.h"
#include "tools/scenario.h"

namespace kvbounce::tools {

class Progress;

struct BenchFlags {
  BenchFlags();  // the bench's own scenario defaults (see bench_command.cc)

  ScenarioFlags scenario;
  std::string transport = "loopback";
  std::string memory = "host";  // "host" or "cuda"
  int device = 0;               // the CUDA device of --memory cuda
  // --gpus: the CUDA device of each rank's worker process, ctx ranks first
  // then gen ranks (--transport cuda-ipc); empty: every rank on --device.
  std::vector<int> gpus;
  std::string paths;            // empty: every path the transport supports (bounce only when on)
  int requests = 16;
  // Requests each path moves right before its measured run, verified but
  // neither timed nor counted in its figures: the first launches, page
  // faults and caches of a run paid outside it. Loopback only.
  int warmup = 0;
  int concurrency = 2;
  // Ctx instances feeding the gen instance (1..kMaxCtxInstances); request i
  // of a path run goes to instance i mod ctx_instances. Loopback only.
  int ctx_instances = 1;
  // MiB of each staging arena. Unset: enough for `concurrency` requests on
  // the busiest rank; 0: the bounce path is off; negative: an error.
  std::optional<int64_t> bounce_size_mb;
  // MiB of each ctx rank's send arena alone (unset: as bounce_size_mb); a
  // writer's stream larger than it streams through it in chunks.
  std::optional<int64_t> send_arena_mb;
  // Config::bounce_chunk_mb of every agent (the workers' too): the
  // streaming bounce's chunk; unset: the config's default.
  std::optional<int64_t> chunk_mb;
  double inject_fail_rate = 0;
  std::string json_file;  // checked for writability before the run
  // Config::poll_before_sleep_us of every agent (the workers' too); unset:
  // the config's default.
  std::optional<int64_t> poll_before_sleep_us;
  // KEY=VALUE settings of every agent's Config (the workers' too), applied
  // in order over the defaults; bounce_size_mb and path have flags of
  // their own (--bounce-size-mb, --path) and are refused here.
  std::vector<std::string> config;

  // --transport ucx: every rank is a `kvbounce worker` process
  // (tools/process_bench.h).
  std::string ucx_tls;                   // UCX_TLS of the workers; empty: inherited
  int num_workers = 0;                   // Config::num_workers of the workers; 0: default
  std::optional<double> step_timeout_s;  // unset: kDefaultStepTimeoutS
  // Not a flag: the program the workers run ("worker" is its first
  // argument). Empty: this process's own executable (/proc/self/exe).
  std::string worker_executable;

  // Chaos mode (tools/chaos.h): one run that mixes every path with random
  // cancels, deadlines, retires and restarts, bounded by chaos_seconds and,
  // when > 0, chaos_requests.
  bool chaos = false;
  double chaos_seconds = 20;
  int64_t chaos_requests = 0;
  int64_t chaos_restart_ms = 500;  // 0: no restarts
  // Not a flag: the CLI sets it so that a run stuck inside the library ends
  // the process with a report (ChaosOptions::exit_when_stuck).
  bool chaos_exit_when_stuck = false;

  // --quiet: no progress on standard error (the CLI then passes no Progress).
  bool quiet = false;
  // Not a flag: where the runs report requests as they settle (path runs
  // start and end, each request's bytes); null: nowhere. Borrowed.
  Progress* progress = nullptr;
};

// Requests in flight at once: at most this many (each owns pool slots).
inline constexpr int kMaxConcurrency = 1024;
// How long one step of a multi-process bench may take by default.
inline constexpr double kDefaultStepTimeoutS = 120;

// What RunBench validated and derived from the flags, for the driver that
// runs it (in-process, or tools/process_bench.h).
struct BenchPlan {
  Scenario scenario;
  std::vector<TransferPath> paths;
  int concurrency = 1;  // requests in flight
  int slots = 1;        // pool slots per rank
  int64_t ctx_arena_mb = 0;
  int64_t gen_arena_mb = 0;
};

// The staging arena (MiB) that holds `concurrency` requests on the busiest
// rank of one side: the bench's and the worker's default --bounce-size-mb.
int64_t DefaultArenaMb(const Scenario& scenario, bool ctx_side, int concurrency);

CLI::App* AddBenchCommand(CLI::App& app, BenchFlags* flags);

// The CUDA device of ctx rank `rank` (gen rank, `ctx` false) of a
// multi-process bench: its --gpus entry, else --device.
int RankDevice(const BenchFlags& flags, const Scenario& scenario, bool ctx, int rank);

// Registers the bench's flags on `app` (AddBenchCommand's command; `kvbounce
// sweep` takes them too, less --json and the chaos flags when `sweep`).
void RegisterBenchFlags(CLI::App& app, BenchFlags* flags, bool sweep);

// Validates the flags and derives the plan of the run, before anything is
// allocated: RunBench's errors up to the check of the --json file (below).
Result<BenchPlan> PlanBench(const BenchFlags& flags);

// Applies --config settings ("KEY=VALUE", '-' accepted for '_') to `config`
// in order. Errors (kInvalidArgument, naming the flag): no '=', a key the
// bench sets itself (bounce_size_mb, path), anything Config::Set refuses.
Status ApplyConfigFlags(const std::vector<std::string>& settings, Config* config);

// Runs the bench. The report holds {"runs": [...]} (one object per path
// run) or, with --chaos, {"chaos": {...}}, plus "fault_injection" and the
// scenario (README "kvbounce bench" lists every field); over UCX also
// "workers" and, when a worker died or hung, "failure".
//
// Errors, all before anything is allocated: kInvalidArgument /
// kUnimplemented / kNotFound for a bad flag (named; --transport ucx in a
// build without UCX, --chaos with ucx, a ucx-only flag with loopback),
// kResourceExhausted when the run would need more memory than the machine
// has (tools/resource_limits.h), kInvalidArgument for a --json file that
// cannot be written; afterwards, a cluster that cannot be built, or worker
// processes that cannot start or connect. A run that mismatched, leaked,
// lost a worker or violated a chaos check is not an error here: see
// BenchPassed.
Result<nlohmann::json> RunBench(const BenchFlags& flags, std::ostream& log);

// True when no worker failed ("failure"), no byte mismatched, no arena byte
// is outstanding, and every request completed or failed because of an
// injected fault; for a chaos report, when no check found a violation. `why`
// receives the reasons (one line per kind) when false.
bool BenchPassed(const nlohmann::json& report, std::string* why);

// Prints the runs (or the chaos summary) as a table.
void PrintBenchTable(const nlohmann::json& report, std::ostream& out);

}  // namespace kvbounce::tools

#endif  // KVBOUNCE_TOOLS_BENCH_COMMAND_H_
