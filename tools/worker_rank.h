// One rank as `kvbounce worker` runs it: a RankHarness (pool, slots, fill,
// verification), the rank's agent, the requests in flight, and their
// outcomes as protocol replies (tools/worker_protocol.h). The transport is
// given (UCX in the worker; loopback in tests, where several WorkerRanks
// share one process).
//
// Requests are started by Publish (ctx) and Pull (gen); each produces
// exactly one DoneReply, taken by TakeDone once it settled — or at once when
// it could not start. A gen rank verifies the slot before the reply leaves
// and clears it to the sentinel afterwards, so the slot is ready for its
// next request. wake_fd() becomes readable when a reply is waiting: poll it
// with the command input and the signal descriptor.
//
// Thread safety: one thread calls everything except wake_fd's readiness;
// the agent's completion callbacks only queue and signal.
#ifndef KVBOUNCE_TOOLS_WORKER_RANK_H_
#define KVBOUNCE_TOOLS_WORKER_RANK_H_

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "kvbounce/agent.h"
#include "tools/rank_harness.h"
#include "tools/worker_protocol.h"
#include "transport/fault/fault_transport.h"

namespace kvbounce::tools {

struct WorkerRankOptions {
  RankHarnessOptions harness;
  std::string instance_id;
  Config config;
  std::chrono::milliseconds grace{1000};
  std::chrono::milliseconds connect_timeout{10000};
  // gen: the instance pulls read from.
  std::string ctx_instance = "ctx0";
  // The scenario's seed: the gen tables of requests (RankHarness::GenTable)
  // and, through harness.table_seed, the ctx slot tables.
  uint64_t seed = 1;
  // The first token a pull moves when its command names none.
  int64_t start_token = 0;
};

// Counters of the requests a WorkerRank settled.
struct WorkerTally {
  uint64_t requests = 0;
  uint64_t completed = 0;
  uint64_t failed = 0;
  uint64_t bytes = 0;
  uint64_t verified_bytes = 0;
  uint64_t mismatches = 0;
  std::string first_failure;
  std::string first_mismatch;
};

class WorkerRank {
 public:
  // Allocates and fills the pool, creates the agent on `transport` (owned;
  // `faults`, when not null, is its fault decorator, owned by the transport).
  // Errors: the harness's, kInternal (no eventfd), Agent::Create's (named
  // "<instance> rank <r>").
  static Result<std::unique_ptr<WorkerRank>> Create(const Topology& topology,
                                                    const WorkerRankOptions& options,
                                                    std::unique_ptr<Transport> transport,
                                                    FaultTransport* faults = nullptr);
  // Shuts the agent down.
  ~WorkerRank();
  WorkerRank(const WorkerRank&) = delete;
  WorkerRank& operator=(const WorkerRank&) = delete;

  const WorkerRankOptions& options() const { return options_; }
  bool ctx_side() const { return harness_->ctx_side(); }
  // "ctx0 rank 1".
  std::string Who() const;
  Agent& agent() { return *agent_; }
  std::string Address() const { return agent_->Address(); }
  // The transport's capabilities: {"transport": name, "map_remote": bool,
  // "read_remote": bool}.
  const nlohmann::json& caps() const { return caps_; }

  // Connects to `addresses`, retrying a refused or unreachable peer every
  // 200 ms until `deadline` (a peer that is starting). Errors: the last
  // Connect error, with the addresses.
  Status Connect(const std::vector<std::string>& addresses,
                 std::chrono::steady_clock::time_point deadline);

  // gen, once connected: the paths a pull from ctx_instance can take, as
  // "per-block,bounce,direct" (Agent::Paths); "" for a ctx rank or on error.
  std::string PathList() const;

  // ctx: publishes `slot`'s table for tokens [0, tokens).
  void Publish(uint64_t request_id, int slot, int64_t tokens);
  // gen: pulls `range` of `request_id` into `slot` (the request's table).
  // The slot must not hold a request in flight.
  void Pull(uint64_t request_id, int slot, TokenRange range, TransferPath path);
  // Cancels a request in flight. Errors: kNotFound.
  Status Cancel(uint64_t request_id);

  int wake_fd() const { return wake_fd_; }
  // The replies of every request that settled since the last call (clears
  // wake_fd). A gen rank verifies each settled request's slot before it
  // replies; with `verify_when_idle` it holds those replies back until no
  // request of its own is in flight any more, so that verifying (on this
  // thread, and with device pools on the GPU) neither delays the pulls
  // still to be issued nor competes with the transfers still running (the
  // bench driven by a parent: a wave's requests are timed to their settle,
  // and the parent issues the next wave once every reply of this one came).
  std::vector<DoneReply> TakeDone(bool verify_when_idle = false);
  size_t in_flight() const { return in_flight_.size(); }
  // Slots without a request in flight, lowest first.
  std::vector<int> FreeSlots() const;

  // {"agent": <Agent::Stats json>, "transport_write_ops", "arena_outstanding_bytes",
  //  "injected_write_failures", "injected_failed_batches", "in_flight"}.
  nlohmann::json Stats() const;
  const WorkerTally& tally() const { return tally_; }

  // Shuts the agent down: every request in flight settles (their replies
  // wait in TakeDone). Idempotent.
  void Shutdown();

 private:
  struct Settled {
    uint64_t request_id = 0;
    Status status;
    int64_t settled_ns = 0;
  };
  // What the completion callbacks share with this object; outlives it.
  struct Queue {
    std::mutex mu;
    std::vector<Settled> settled;  // guarded by mu
    int fd = -1;                   // the eventfd, closed by WorkerRank
  };
  struct Request {
    std::shared_ptr<Transfer> transfer;
    int slot = 0;
    TokenRange range;
    std::vector<int32_t> table;
  };

  WorkerRank(const WorkerRankOptions& options, std::unique_ptr<RankHarness> harness);
  // A reply for a request that could not start.
  void Refuse(uint64_t request_id, const Status& why);
  // Keeps the request until its reply is taken; a pull occupies its slot.
  void Track(uint64_t request_id, Request request, bool occupies_slot);
  void Count(const DoneReply& done);

  WorkerRankOptions options_;
  std::unique_ptr<RankHarness> harness_;
  std::unique_ptr<Agent> agent_;
  FaultTransport* faults_ = nullptr;
  nlohmann::json caps_;
  std::shared_ptr<Queue> queue_;
  int wake_fd_ = -1;
  std::map<uint64_t, Request> in_flight_;
  std::vector<bool> slot_busy_;
  std::vector<DoneReply> refused_;
  // gen: settled requests whose slots TakeDone has not verified yet.
  struct Unverified {
    DoneReply reply;
    Request request;
    bool ok = false;
  };
  std::vector<Unverified> unverified_;
  WorkerTally tally_;
};

}  // namespace kvbounce::tools

#endif  // KVBOUNCE_TOOLS_WORKER_RANK_H_
