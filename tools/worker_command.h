// `kvbounce worker`: one rank of a ctx or gen instance as its own process,
// on the UCX transport, for runs across processes and hosts (README
// "Running across processes and hosts").
//
// The worker allocates its rank's pool (a ctx rank fills it with the
// semantic values of tools/rank_harness.h), listens, prints
// "ready <address> <caps-json>", connects to --peers when given (retrying
// while they start, up to --connect-timeout) and prints "connected <n>".
// Then either
//   * it is driven: commands on stdin, replies on stdout (the protocol of
//     tools/worker_protocol.h) until "quit", the end of stdin, SIGINT or
//     SIGTERM; or
//   * with --requests N it runs on its own: a gen worker pulls requests
//     --first-request-id .. +N-1 (--concurrency at a time, each verified),
//     a ctx worker waits for a rank of --gen-instance to connect and
//     publishes the same ids (--concurrency at a time); each prints a
//     summary and exits.
// Either way it ends by shutting its agent down — every request settles,
// every staging slot comes back — and prints "bye <summary-json>".
// SIGINT/SIGTERM are read from a signalfd by the main loop, never handled
// in a signal handler.
//
// Exit status: 0 done (driven: shut down cleanly, also after a signal;
// alone: every request completed and verified); 1 a mismatch, a failed
// request, staging bytes still outstanding after shutdown, or a run on its
// own cut short by a signal; 2 a bad flag or a setup error (listen, connect,
// allocation), as "kvbounce worker: error: ..." on stderr.
//
// Thread safety: RunWorker owns the process while it runs (it ignores
// SIGPIPE and blocks SIGINT/SIGTERM); ServeCommands and RunAlone run on the
// thread that owns the WorkerRank.
#ifndef KVBOUNCE_TOOLS_WORKER_COMMAND_H_
#define KVBOUNCE_TOOLS_WORKER_COMMAND_H_

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "kvbounce/status.h"
#include "tools/scenario.h"
#include "tools/subprocess.h"
#include "tools/worker_rank.h"

namespace kvbounce::tools {

struct WorkerFlags {
  WorkerFlags();  // the bench's scenario defaults

  ScenarioFlags scenario;
  std::string role;      // "ctx" or "gen"; required
  std::string instance;  // empty: "ctx0" / "gen0"
  int rank = 0;
  int concurrency = 2;  // pool slots; requests in flight when alone
  std::string transport = "ucx";       // "ucx" or "cuda-ipc" (device pools of one host)
  std::string listen = "127.0.0.1:0";  // ucx: host:port; cuda-ipc: unix:@name (or empty)
  std::string peers;       // comma list of host:port
  std::string peers_file;  // JSON: ["host:port", ...] or {"peers": [...]}
  std::string ctx_instance = "ctx0";
  std::string gen_instance = "gen0";
  std::optional<int64_t> bounce_size_mb;  // unset: room for --concurrency requests
  std::string memory = "host";            // the pool: "host" or "cuda"
  int device = 0;                         // the CUDA device of --memory cuda
  std::vector<std::string> config;        // KEY=VALUE, Config::Set keys
  int num_workers = 0;                    // 0: the config's
  double inject_fail_rate = 0;            // ctx only
  double connect_timeout_s = 60;
  // Alone.
  int64_t requests = 0;  // 0: driven over stdin
  uint64_t first_request_id = 1;
  std::optional<std::string> path;  // gen only; unset: auto
  std::string json_file;
  // Serve the agent's stats in the Prometheus format on this port (0: any
  // free one) of --listen's host (127.0.0.1 for cuda-ipc); -1: off.
  int metrics_port = -1;
};

CLI::App* AddWorkerCommand(CLI::App& app, WorkerFlags* flags);

// What the flags come to, checked.
struct WorkerPlan {
  Scenario scenario;
  bool ctx_side = true;
  WorkerRankOptions rank;
  std::string transport = "ucx";
  std::string listen;
  std::vector<std::string> peers;
  int num_workers = 1;  // after KVBOUNCE_NUM_WORKERS
  double inject_fail_rate = 0;
  std::chrono::milliseconds connect_timeout{60000};
  int64_t requests = 0;
  uint64_t first_request_id = 1;
  TransferPath path = TransferPath::kAuto;
};

// Validates the flags, before anything is allocated. Errors
// (kInvalidArgument, kNotFound, kResourceExhausted), each naming the flag:
// a missing or unknown --role, a --rank outside the instance, a malformed
// --listen or peer address, an unreadable or malformed --peers-file, a bad
// --config entry, --concurrency / --requests / --connect-timeout /
// --inject-fail-rate / --bounce-size-mb out of range, --path or
// --inject-fail-rate on the side that does not use it, --requests on a gen
// worker without peers, a pool beyond the machine's memory; and every
// scenario error (tools/scenario.h).
Result<WorkerPlan> PlanWorker(const WorkerFlags& flags);

// Runs the worker (see the file comment). Commands are read from `in_fd`;
// protocol lines and the summary go to `out`, progress to `log`. Returns
// whether it passed (exit 0 or 1). Errors (exit 2): PlanWorker's,
// kUnimplemented (a build without UCX), the transport's (listen), the
// connect's, the agent's.
Result<bool> RunWorker(const WorkerFlags& flags, int in_fd, std::ostream& out, std::ostream& log);

// How a worker's run ended.
struct WorkerEnd {
  std::string stopped_by;  // "quit", "end of input", "output closed", "SIGTERM", "requests done"
  uint64_t arena_outstanding_bytes = 0;  // after shutdown
  nlohmann::json summary;                // what "bye" printed
};

// The driven loop: serves commands from `in_fd` on `rank`, replies to `out`,
// until quit / end of input / a signal on `signals` (may be null) / a
// failed write; then shuts the rank down, writes the replies of the
// requests that settled and "bye <summary>".
WorkerEnd ServeCommands(WorkerRank& rank, int in_fd, std::ostream& out, SignalWatch* signals,
                        std::chrono::milliseconds connect_timeout);

}  // namespace kvbounce::tools

#endif  // KVBOUNCE_TOOLS_WORKER_COMMAND_H_
