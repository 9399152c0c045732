// The path a pull takes (docs/paths.md): a forced path is checked
// and kept; `auto` estimates what each available path would cost for the
// plan at hand and takes the cheapest.
//
// The estimate of one pull is the sum over its writers of
//
//   per-block  2 H + W + (D + 1) op + B / link
//   bounce     4 H + W + 2 op + B / link                  (one write, a flush)
//              + 2 batch + (G + S) run + 2 B / copy       (gather, scatter)
//              without the "W + 2 op + B / link" where the writer maps this
//              rank's memory and gathers straight into the recv slot
//              (Config::bounce_gather_mapped, this rank's setting)
//   direct     H + batch + D run + B / copy               (one batched copy)
//              3 H + D (read_op + P) + B / read           (read by this rank)
//              2 H + H + batch + D run + B / copy         (read by this rank's
//                                                          engine, mapped)
//
// where, per writer, B is its packed bytes, D its direct-list runs (one
// transport write each on per-block, one copy run each on direct), G and S
// its gather and scatter runs; W, op and link are the connection's cost
// (Transport::PeerCaps(peer).cost: fixed µs per Write call and per write
// operation, bytes per µs), batch, run and copy the copy engine's
// (CopyEngineCaps::cost), and H = kHandOffUs the price of one asynchronous
// step: every copy batch, write batch and flush ends with a completion
// posted back to the control thread.
// The "+ 1 op" and "2 op" are the flush before the writer's KV_RESULT. On
// direct read (the writer lends its blocks and this rank copies them with
// Transport::Read: KV_READY, the reads, KV_READ_DONE and KV_RESULT), read_op
// and read are the connection's read cost (PeerCaps(peer).read_cost), or the
// copy engine's figures where it states none; P = kReadPlanRunUs is this
// rank planning and grouping the writer's direct list once its blocks are
// lent, on the control thread. Where the writer's pool is mapped here
// (TransportCaps::map_remote_read) this rank's copy engine reads it in one
// batch, planned in the engine's own form (tiled for the CUDA engine):
// priced like the writer's direct copy, with the loan's two extra steps.
//
// Writers run in parallel on their own ranks, but every term scales alike
// with their number, so the sum ranks the paths as the slowest writer would,
// and it also charges the receiver's scatter, which serves all of them.
// The writer's copy engine is priced with the receiver's figures (same
// build, usually the same kind of host).
//
// Availability: per-block only when the transport reaches both pools (a
// device pool over a transport that reaches host memory only is not
// registered with it: docs/cuda.md, "Host-staged bounce"); direct only when
// every writer can map this rank's pool
// (its HELLO says its transport can, and PeerCaps(peer).map_remote agrees)
// or be read by this rank (PeerCaps(peer).read_remote, host pools on both
// sides);
// bounce only with a recv arena here and a send arena at every writer (a
// writer without one would write its gather runs one by one). A path that
// is not available costs +infinity. Ties go to direct, then per-block.
//
// Thread safety: pure functions.
#ifndef KVBOUNCE_SESSION_PATH_CHOICE_H_
#define KVBOUNCE_SESSION_PATH_CHOICE_H_

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "copy/copy_engine.h"
#include "kvbounce/config.h"
#include "kvbounce/status.h"
#include "kvbounce/transport.h"

namespace kvbounce {

// The price of one hand-off between threads (µs): waking the thread that
// takes a step and posting its completion back. Calibrated on the
// development machine (docs/PERFORMANCE.md: a one-block request takes about
// 0.10 ms on direct and 0.14 ms on per-block, which has two more steps).
inline constexpr double kHandOffUs = 10;

// Planning and grouping one run of a lent direct list on the receiver's
// control thread (µs): the planner's 20–29 ns a run
// (docs/PERFORMANCE.md, planner) and as much again to group the runs into
// read operations. Measured on an H200 host over cuda-ipc: a direct read of
// 131,072 runs a writer took 31 ms for two writers where bounce took 12 ms.
inline constexpr double kReadPlanRunUs = 0.05;

// The figures used for one the transport or the copy engine leaves at 0
// (unknown) and the config does not override.
inline constexpr double kUnknownOpUs = 5;                // a network or DMA op
inline constexpr double kUnknownLinkBytesPerUs = 10000;  // 10 GB/s
inline constexpr double kUnknownRunUs = 0.05;
inline constexpr double kUnknownCopyBytesPerUs = 10000;  // 10 GB/s

// What one writer of a pull moves, and over what.
struct WriterLoad {
  uint64_t bytes = 0;         // its packed stream
  uint64_t direct_runs = 0;   // D above
  uint64_t gather_runs = 0;   // G
  uint64_t scatter_runs = 0;  // S
  TransportCost link;         // as the transport states it for the connection
  bool direct = false;        // the writer can copy into this rank's pool
  bool direct_read = false;   // this rank can read the writer's pool
  // ... with its own copy engine, the pool mapped here
  // (TransportCaps::map_remote_read): priced as a copy, not as reads.
  bool mapped_read = false;
  TransportCost read;         // what such a read costs, as stated
  bool send_arena = false;    // the writer can gather (bounce)
  // The transport reaches the writer's pool and this rank's: it can write
  // fragment by fragment (per-block).
  bool per_block = true;
};

// Whether direct (every writer maps this rank's pool or is read by it) and
// bounce (a recv arena here, a send arena at every writer) are available to
// a pull with these writers (none: neither).
bool DirectAvailable(std::span<const WriterLoad> writers);
// Whether per-block is (the transport reaches every writer's pool and ours).
bool PerBlockAvailable(std::span<const WriterLoad> writers);
bool BounceAvailable(std::span<const WriterLoad> writers, bool recv_arena);

// The estimate of each path, in µs; +infinity when it is not available.
struct PathEstimate {
  double per_block_us = 0;
  double bounce_us = 0;
  double direct_us = 0;
};

struct PathChoice {
  TransferPath path = TransferPath::kPerBlock;
  PathEstimate estimate;  // filled for kAuto only
};

// `stated` with the config's overrides (transport_op_ns, transport_mb_per_s)
// applied, and the kUnknown* figures for what is still 0.
TransportCost EffectiveLinkCost(const Config& config, TransportCost stated);
// `stated` with copy_run_ns and copy_mb_per_s applied, and the kUnknown*
// figures for what is still 0 (batch_us stays as stated).
CopyCost EffectiveCopyCost(const Config& config, CopyCost stated);

// The formula above, with the effective figures. `recv_arena`: this rank
// has one.
PathEstimate EstimatePaths(const Config& config, std::span<const WriterLoad> writers,
                           const CopyCost& copy, bool recv_arena);

// For a writer that copies into this rank's pool (WriterLoad::direct, with
// its bytes and link set): the fewest direct runs at which its share of
// per-block's estimate exceeds its share of direct's. Both grow with the
// runs, per-block by the link's op_us a run and direct by the copy engine's
// run_us, so per-block cannot be this writer's cheaper path from that count
// on, whatever the true count above it (docs/paths.md, "Run counts"). 0:
// from any count; UINT64_MAX: no such count (a writer that cannot copy into
// the pool, or a link whose operations cost less than a copy run).
uint64_t PerBlockLosesFrom(const Config& config, const WriterLoad& writer, const CopyCost& copy);

// The path of a pull that asked for `requested` (kAuto: the config's path
// already substituted, so kAuto means "choose"). Forced paths are returned
// as they are, when available. Errors: kUnimplemented (direct asked, a
// writer cannot map this rank's pool; per-block asked where the transport
// cannot reach a pool; the message names `transport_name`),
// kInvalidArgument (bounce asked without a recv arena: bounce_size_mb = 0),
// kFailedPrecondition (auto, and no path is available: a device pool the
// transport cannot reach, with the bounce path off).
Result<PathChoice> ChoosePath(const Config& config, TransferPath requested,
                              std::span<const WriterLoad> writers, const CopyCost& copy,
                              bool recv_arena, std::string_view transport_name);

// `stated` read cost with the copy engine's per-run and per-byte figures for
// what is 0.
TransportCost EffectiveReadCost(const Config& config, TransportCost stated, const CopyCost& copy);

// "per-block 120.5 us, bounce 80.1 us, direct n/a", for logs.
std::string DescribeEstimate(const PathEstimate& estimate);

}  // namespace kvbounce

#endif  // KVBOUNCE_SESSION_PATH_CHOICE_H_
