// `kvbounce bench --chaos`: requests on every path, with concurrency, while
// random cancels, deadlines, retires and agent restarts hit them, and checks
// that "settled means settled" (docs/sessions.md) held for every one of them:
//
//   * every pull and publication settles within a watchdog bound;
//   * a pull that settled OK holds exactly the ctx data (Cluster::VerifyGen)
//     and no poison;
//   * once a pull settled (any outcome), its gen rank's slot is overwritten
//     with a canary; the canary is re-checked before the slot is reused and
//     at the end: a changed byte is a write after settle;
//   * once a publication settled other than OK (retired, expired, cancelled,
//     aborted), its ctx slot is overwritten with poison (and refilled before
//     the slot is reused): an OK pull holding poison read after settle;
//   * every outcome is explained by an action that touched the request
//     (CANCELLED by a cancel, DEADLINE_EXCEEDED by a short deadline, ABORTED /
//     UNAVAILABLE / FAILED_PRECONDITION by a restart, UNAVAILABLE "injected"
//     by the fault injector, ...);
//   * the staging arenas drain to 0 outstanding bytes, and a restarted
//     agent leaves none behind.
//
// Each of `concurrency` drivers owns two pool slots and alternates between
// them, so a slot's canary is checked a whole request after it was written.
// A restarter thread restarts a random ctx or gen rank (alternately) every
// restart interval. Decisions come from generators seeded by `seed` (one per
// driver and one for the restarter), so a run is reproducible up to thread
// timing.
//
// Thread safety: RunChaos owns its threads and joins them before returning.
// SettleChecker methods on distinct (rank, slot) pairs may run concurrently.
#ifndef KVBOUNCE_TOOLS_CHAOS_H_
#define KVBOUNCE_TOOLS_CHAOS_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

#include "kvbounce/config.h"
#include "tools/cluster.h"

namespace kvbounce::tools {

// What chaos mode reports as broken. Names (ViolationName) are the JSON keys.
enum class Violation {
  kWriteAfterSettle,    // "write_after_settle": a settled pull's slot changed
  kOkPullPoisoned,      // "ok_pull_poisoned": an OK pull holds poison
  kOkPullMismatch,      // "ok_pull_mismatch": an OK pull holds other wrong bytes
  kHang,                // "hang": not settled within the watchdog bound
  kArenaNotDrained,     // "arena_not_drained": staging bytes never returned
  kUnexplainedFailure,  // "unexplained_failure": an outcome no action explains
  kRestartFailed,       // "restart_failed": a rank could not be restarted
};
inline constexpr int kNumViolations = 7;
std::string_view ViolationName(Violation v);

// The canary and poison checks over a cluster's slot memory.
class SettleChecker {
 public:
  static constexpr std::byte kCanary{0x5A};
  static constexpr std::byte kPoison{0xDB};

  // `cluster` must outlive the checker.
  explicit SettleChecker(Cluster& cluster) : cluster_(cluster) {}

  // A pull on `gen_rank` into `slot` settled: the slot's blocks there now
  // hold the canary.
  void WriteCanary(int gen_rank, int slot);
  // Empty while every byte of the slot on `gen_rank` still holds the canary;
  // else where the first changed byte is and what it holds.
  std::optional<std::string> CheckCanary(int gen_rank, int slot) const;

  // A publication of `slot` on `ctx_rank` settled other than OK: poison its
  // blocks there. Refill restores the ctx data.
  void Poison(int ctx_rank, int slot);
  void Refill(int ctx_rank, int slot);

  // Checks a pull that settled OK: the data (VerifyGen), and, when it is
  // wrong, whether poison is what arrived.
  struct PullCheck {
    VerifyResult verify;
    std::optional<Violation> violation;  // kOkPullPoisoned or kOkPullMismatch
    std::string detail;
  };
  PullCheck CheckOkPull(int gen_rank, const BlockTables& tables, TokenRange range) const;

 private:
  Cluster& cluster_;
};

struct ChaosOptions {
  std::vector<TransferPath> paths;  // each request picks one at random
  TokenRange tokens;
  int concurrency = 2;  // drivers; the cluster needs 2 * concurrency slots
  std::chrono::milliseconds duration{20000};
  int64_t max_requests = 0;  // 0: until `duration`
  // Between restarts (jittered by ±50%); 0: no restarts.
  std::chrono::milliseconds restart_interval{500};
  // The deadline of pulls and publications that no action shortens (the
  // cluster's transfer_timeout_ms); bounds the watchdog.
  std::chrono::milliseconds timeout{2000};
  // Added to a request's deadline and twice the grace period before the
  // watchdog calls it a hang.
  std::chrono::milliseconds watchdog_slack{3000};
  uint64_t seed = 1;
  // A write fail rate is set: UNAVAILABLE "injected ..." is explained.
  double inject_fail_rate = 0;
  // Per request, the probability of each action.
  double cancel_rate = 0.15;
  double pull_deadline_rate = 0.1;
  double publish_ttl_rate = 0.1;
  double retire_rate = 0.1;
  double cancel_publication_rate = 0.1;
  // When the run itself is stuck (threads not joined a minute after the
  // duration ended), print what is known and _Exit(1) (the CLI sets it).
  bool exit_when_stuck = false;
};

// Runs chaos on `cluster` (built with 2 * concurrency slots and
// transfer_timeout_ms = timeout on both sides) and returns the report (see
// README "kvbounce bench --chaos"). Progress goes to `log`.
nlohmann::json RunChaos(Cluster& cluster, const ChaosOptions& options, std::ostream& log);

// The total number of violations of a chaos report; `why` receives one line
// per kind that occurred ("write_after_settle: 3 (first: ...)").
uint64_t ChaosViolations(const nlohmann::json& chaos, std::string* why);

// Prints the actions, outcomes, checks and violations of a chaos report.
void PrintChaosTable(const nlohmann::json& chaos, std::ostream& out);

}  // namespace kvbounce::tools

#endif  // KVBOUNCE_TOOLS_CHAOS_H_
