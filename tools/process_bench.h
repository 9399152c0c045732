// `kvbounce bench --transport ucx`: the bench with every rank of the ctx and
// the gen instance in its own `kvbounce worker` process, driven over the
// worker's line protocol (tools/worker_protocol.h).
//
//   1. start every worker (ctx ranks, then gen ranks) on 127.0.0.1, port 0,
//      and read each one's "ready <address>";
//   2. send every gen worker "connect <ctx addresses>";
//   3. per path, in waves of --concurrency requests: "publish" to every ctx
//      worker and "pull" to every gen worker, collect each gen worker's
//      "done" (already verified by the worker, which verifies a wave's
//      requests once none of its own is still in flight, so that checking
//      one does not slow the others), cancel the publications
//      still open, collect the ctx workers' "done"; then "stats" from every
//      worker (transport writes, staging bytes still outstanding);
//   4. "quit" to every worker, then SIGTERM, then SIGKILL, and reap them
//      (a step to quit after a clean run; at most 5 s, then 2 s after
//      SIGTERM, once something failed). When a worker died, the others
//      first finish the requests they hold, within 1 s of those 5 s: their
//      pulls settle, the publications still open are cancelled and settle.
//      Each worker's "bye" summary is kept, and the log gets one line per
//      worker that still ran: "gen rank 1: settled 40 completed, 2 failed
//      (first: ...), staging bytes left 0", or "gen rank 1: no summary:
//      killed by SIGKILL (...)".
//
// Every step has a deadline (--step-timeout). A worker that dies, stops
// answering or prints something unexpected ends the run: the bench stops
// every worker (step 4) and the report carries "failure", naming the worker
// ("ctx rank 1 (pid 4242) died: killed by SIGKILL"), so the CLI exits 1.
// Before the first request, such a problem is an error (exit 2). SIGINT or
// SIGTERM to the bench does the same teardown. Workers die with the bench
// (PR_SET_PDEATHSIG), so none is left behind even when the bench is killed.
//
// The parent holds no pool and no agent: it needs no UCX. Throughput counts
// from the moment a wave's commands are sent to the last gen rank's settle
// time (the workers report it on the steady clock that the processes of a
// host share).
//
// Thread safety: one call at a time per process (it blocks SIGINT and
// SIGTERM on the calling thread while it runs and spawns from it).
#ifndef KVBOUNCE_TOOLS_PROCESS_BENCH_H_
#define KVBOUNCE_TOOLS_PROCESS_BENCH_H_

#include <nlohmann/json.hpp>
#include <ostream>

#include "kvbounce/status.h"
#include "tools/bench_command.h"

namespace kvbounce::tools {

// Runs `plan` (validated by RunBench) with one process per rank. Returns
// {"runs": [...], "workers": [{"name", "pid", "address", "exit", and
// "summary": the worker's "bye" JSON when it gave one}], and, when the run
// broke off, "failure": "..."}. Errors: kInternal (no
// executable, a failed fork), and anything that goes wrong before the
// first request (a worker that fails to start or connect, a --path the
// transport cannot take), named.
Result<nlohmann::json> RunProcessBench(const BenchFlags& flags, const BenchPlan& plan,
                                       std::ostream& log);

}  // namespace kvbounce::tools

#endif  // KVBOUNCE_TOOLS_PROCESS_BENCH_H_
