// kvbounce's configuration (docs/architecture.md §11): the knobs a serving engine sets once
// per agent, how they are parsed from text, validated, and overridden from the
// environment.
//
// Typical use:
//
//   kvbounce::Config config;                       // the library defaults
//   KVB_RETURN_IF_ERROR(config.Set("bounce_size_mb", "256"));  // CLI, files
//   config = kvbounce::ApplyEnvironment(config);   // KVBOUNCE_* variables
//   KVB_RETURN_IF_ERROR(config.Validate());        // Agent::Create does this
//
// Every error message names the field, the value and the rule, e.g.
//   config: bounce_size_mb = -1 is invalid: must be an integer >= 0 and <= 1048576
//
// Thread safety: Config is a plain value; the functions here are reentrant.
// ApplyEnvironment reads the process environment (when no lookup is given),
// which must not be modified concurrently (a POSIX rule, not a kvbounce one).
#ifndef KVBOUNCE_CONFIG_H_
#define KVBOUNCE_CONFIG_H_

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <utility>

#include "kvbounce/status.h"

namespace kvbounce {

// How a plan is executed (docs/paths.md).
enum class TransferPath {
  // One transport write per direct-list fragment (the baseline).
  kPerBlock,
  // Gather into a send slot, one write into the receiver's recv slot, scatter.
  kBounce,
  // One batched copy straight from the sender's pool into the receiver's.
  kDirect,
  // The receiver estimates what each available path costs for the plan at
  // hand, from the transport's and the copy engine's stated costs (and the
  // overrides below), and takes the cheapest (docs/paths.md).
  kAuto,
};

// "per-block", "bounce", "direct", "auto" ("?" for a value outside the enum).
std::string_view TransferPathName(TransferPath path);

// The inverse of TransferPathName (exact, lower case).
// Errors: kInvalidArgument naming the text and the accepted names.
Result<TransferPath> ParseTransferPath(std::string_view name);

struct Config {
  // --- Limits beyond docs/architecture.md §11's rules. They keep derived quantities (bytes
  // of a region, deadlines on the steady clock in nanoseconds) from
  // overflowing; no real deployment comes near them.
  static constexpr int64_t kMaxBounceSizeMb = int64_t{1} << 20;  // 1 TiB per region
  static constexpr int64_t kMaxNumWorkers = 256;
  static constexpr int64_t kMaxTimeoutMs = int64_t{30} * 24 * 3600 * 1000;  // 30 days
  static constexpr int64_t kMaxOpNs = 1000000000;                           // 1 s per operation
  static constexpr int64_t kMaxMbPerS = 1000000000;                         // 1 PB/s
  static constexpr int64_t kMaxPollUs = 10000;                              // 10 ms
  static constexpr int64_t kMaxInlineCopyKb = 16384;                        // 16 MiB

  // Size of each of the agent's two arenas (send, recv), in MiB. 0 turns the
  // bounce path off, which is the library's default (the CLI's bench turns it
  // on). Rule: integer >= 0 (and <= kMaxBounceSizeMb).
  int64_t bounce_size_mb = 0;

  // Streaming bounce (docs/sessions.md, "Streaming bounce"): a writer's
  // packed stream larger than one chunk is cut into chunks of this many MiB,
  // each written into a chunk slot of the recv arena the receiver grants as
  // a credit and scattered as soon as it landed, so that gather, link and
  // scatter overlap and any request fits any recv arena that holds one chunk
  // per writer. A receiver uses min(this, arena / writers) for a request;
  // with host pools min(this, arena / (2 * writers)) where that is at least
  // 1 MiB, so that each writer holds two chunk slots (docs/sessions.md).
  // Only a request larger than the recv arena streams: one that fits takes
  // a whole slot, which measured as fast or faster.
  // 0: the default for the pool's memory (kDefaultChunkMbHost,
  // kDefaultChunkMbDevice). Rule: integer >= 0 (and <= kMaxBounceSizeMb).
  int64_t bounce_chunk_mb = 0;
  static constexpr int64_t kDefaultChunkMbHost = 4;
  // Device pools: in effect arena / writers. A device chunk's round has
  // fixed costs (launches, engine round trips, frames), so the largest
  // chunk one slot a writer allows measured fastest (docs/PERFORMANCE.md,
  // "2026-12-04").
  static constexpr int64_t kDefaultChunkMbDevice = 1024;

  // UCP workers per agent; a large write is striped across them. Rule:
  // integer >= 1 (and <= kMaxNumWorkers). KVBOUNCE_NUM_WORKERS overrides it
  // when valid (ApplyEnvironment).
  int64_t num_workers = 1;

  // Deadline of a whole transfer, from Pull to completion. Rule: > 0 (and <=
  // kMaxTimeoutMs).
  int64_t transfer_timeout_ms = 60000;

  // How long Reserve waits for arena space before reporting backpressure
  // (the caller then falls back or retries). 0 = do not wait. Rule: >= 0
  // (and <= kMaxTimeoutMs).
  int64_t reserve_timeout_ms = 200;

  // The path used when a Pull does not name one. Rule: one of the enum.
  // kBounce additionally needs bounce_size_mb > 0.
  TransferPath path = TransferPath::kAuto;

  // The figures `auto` prices the paths with (docs/paths.md), each 0 by
  // default: "use the figure the transport (per connection) or the copy
  // engine states". A non-zero value replaces that figure for every
  // connection, e.g. with one measured on the deployment's link.
  //   transport_op_ns     fixed cost of one transport write operation, ns
  //   transport_mb_per_s  the link's sustained rate, MB/s (10^6 bytes/s)
  //   copy_run_ns         the copy engine's cost per fragment (run), ns
  //   copy_mb_per_s       the copy engine's sustained rate, MB/s
  // Rules: integers >= 0, the _ns ones <= kMaxOpNs (1 s), the _mb_per_s ones
  // <= kMaxMbPerS (1 PB/s).
  int64_t transport_op_ns = 0;
  int64_t transport_mb_per_s = 0;
  int64_t copy_run_ns = 0;
  int64_t copy_mb_per_s = 0;

  // How long an agent thread that ran out of work keeps polling for more
  // before it sleeps, in µs: the agent's control loop, over UCX each
  // worker's progress thread and the reader, the loopback endpoint's thread,
  // and with device pools the CUDA copy engine's thread and the cuda-ipc
  // transport's socket and copy threads. A hand-off to a thread that is still polling
  // costs about a microsecond, one to a sleeping thread a wake-up (17-48 µs
  // on an idle core), and a small request takes several hand-offs per side
  // (docs/architecture.md §10). Polling spends that time on a core instead,
  // yielding to any other runnable thread: worth it where each rank is its
  // own process with cores to spare, harmful where more threads than cores
  // poll (many agents in one process on few cores). 0 = sleep at once.
  // Rule: integer >= 0 and <= kMaxPollUs (10 ms).
  int64_t poll_before_sleep_us = 0;

  // A copy batch (a gather, a scatter, a direct copy) of at most this many
  // KiB runs on the agent's control loop itself when the copy engine can do
  // that (the CPU engine), instead of going to a copy worker and its
  // completion coming back: two thread hand-offs, each a wake-up of 17-48 µs
  // on an idle core, saved for a copy of a few µs. Larger batches, and every
  // batch of a device engine, go to the engine's workers or stream. While
  // the loop copies it serves nothing else, so keep it small: at the 64 KiB
  // default one inline copy holds the loop for ~5-10 µs. 0 = never inline.
  // Rule: integer >= 0 and <= kMaxInlineCopyKb (16 MiB).
  int64_t inline_copy_kb = 64;

  // 1: the agent's control loop also runs the transport's progress where
  // the transport hands it over (UCX: its first worker, the one that
  // carries control frames; loopback: its queue, but for copies over 64 KiB),
  // so that a frame, a write completion or a flush reaches its request
  // without a thread hand-off and each process has one thread fewer that
  // polls (docs/architecture.md §10). The loop then sleeps on the
  // transport's fd. 0: the transport runs that progress on a thread of its
  // own. Rule: 0 or 1.
  int64_t progress_on_loop = 1;

  // 1: where the transport maps the receiver's memory into this process
  // (loopback), a bounce writer gathers straight into the recv slot the
  // receiver granted: no send slot, no transport write and no flush, one
  // pass over the bytes fewer (docs/paths.md). 0: it gathers into a send
  // slot and writes that, as over a transport that does not map (what a
  // test of the transport's write path, or an A/B measurement, wants).
  // Rule: 0 or 1.
  int64_t bounce_gather_mapped = 1;

  // Checks every rule above: the integer fields in declaration order, then
  // path, then the rules across fields. Returns the first violation as kInvalidArgument
  // ("config: <field> = <value> is invalid: <rule>"), or OK.
  Status Validate() const;

  // Sets one field from text (command line, key=value files). `key` is a
  // field name as above; '-' is accepted for '_' ("bounce-size-mb"). Integer
  // fields take base-10 integers only: an optional '-', digits, nothing else
  // (no spaces, no '+', no fraction, no exponent). `path` takes a
  // TransferPathName. The field's own rule is checked too; rules across
  // fields are left to Validate, so the order of Set calls never matters.
  // The field is changed only on success.
  // Errors (kInvalidArgument): unknown key (the message lists the known
  // keys); text that is not an integer, out of the 64-bit range, or breaks the
  // field's rule; an unknown path name.
  Status Set(std::string_view key, std::string_view value);

  // Defaults, then Set for each (key, value) in order, then Validate.
  // Errors: the first error of Set or Validate.
  static Result<Config> FromKeyValues(
      std::span<const std::pair<std::string_view, std::string_view>> key_values);

  // Defaults, then one "key = value" per line of `text` (blank lines and
  // lines starting with '#' are ignored; spaces around key and value are
  // trimmed), then Validate. Errors: those of Set, prefixed with the line
  // number; a line without '='.
  static Result<Config> FromText(std::string_view text);

  // The keys Set accepts, in declaration order.
  static std::span<const std::string_view> Keys();

  // "bounce_size_mb=0 num_workers=1 ..." in declaration order, in the form
  // Set and FromText accept.
  std::string ToString() const;

  friend bool operator==(const Config&, const Config&) = default;
};

// Looks up an environment variable: the value, or nullptr when unset. The
// returned pointer needs to stay valid only until the next lookup.
using EnvLookup = std::function<const char*(const char* name)>;

// Returns `config` with the KVBOUNCE_* environment overrides applied, read
// through `lookup` (std::getenv when empty; tests inject their own).
//
//   KVBOUNCE_NUM_WORKERS  overrides num_workers when it is a base-10 integer
//                         obeying num_workers' rule (>= 1, <= kMaxNumWorkers).
//                         Anything else (0, negative, a fraction, text, empty,
//                         out of range) is ignored with a kWarning log that
//                         names the variable, its value and the rule.
//
// An unset variable changes nothing and logs nothing. The result is not
// validated (other fields may still be wrong): call Validate.
Config ApplyEnvironment(Config config, const EnvLookup& lookup = EnvLookup());

}  // namespace kvbounce

#endif  // KVBOUNCE_CONFIG_H_
