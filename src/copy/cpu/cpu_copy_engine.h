// CpuCopyEngine: the host-memory copy engine (docs/architecture.md §7).
//
// Every fragment is a memcpy. A small batch runs on one worker thread; a large
// one (more than `split_bytes` bytes or more than `split_fragments` fragments)
// is cut into contiguous chunks of nearly equal bytes (batch_split.h; a huge
// single fragment is cut too) that run on several workers at once, and the
// batch's `done` fires once, on the worker that finishes the last chunk.
// Copies cannot fail, so an accepted batch completes with OK unless it was
// stopped (below).
//
// Cancellation (Submit's std::stop_token): a fragment is copied in pieces of
// at most kCopyGrainBytes (1 MiB) — the engine's grain — and before every
// piece (so before every fragment of a chunk, and every 1 MiB inside a large
// fragment) the worker checks the batch's stop token: one atomic load, no
// lock. Once a stop is requested, the piece being copied completes and every
// piece not yet begun is skipped, in every chunk of the batch (a chunk still
// queued is skipped whole when a worker reaches it, in its turn). The batch's
// `done` then gets kCancelled when anything was skipped, with the message
// "cpu copy engine: batch stopped: <s> of <t> bytes not copied", and OK when
// every byte had been copied (the stop came too late to skip anything). A
// batch of no bytes completes with OK. The destination of a cancelled batch
// is partly written: which bytes landed is unspecified.
//
// Copying on the caller's thread: CopiesOnCallingThread() is true, so
// SubmitOrCopyHere copies a batch at or under its `inline_bytes` on the
// calling thread, with the same pieces, stop checks and counters as a
// worker (the batch is never split), and runs `done` there before it
// returns.
//
// Memory: host memory only (Caps().host_memory). Handing it a device or
// remote address is undefined behaviour (a crash, most likely): callers check
// Caps() against the memory they pass.
//
// Cost (Caps().cost, for `auto`, docs/paths.md): no batch cost beyond the
// hand-off to a worker (which the estimate counts separately); kRunUs per
// fragment (calibrated: the stop-token check and the call around each
// memcpy, ~10-50 ns on the development machine); and the host's
// single-thread memcpy rate, MEASURED once per process when the first engine
// is created (common/memcpy_rate.h: a few ms). Splitting a batch across
// workers may beat that rate; the estimate does not count on it.
//
// Threads: the engine's batches run on a CopyWorkers pool (copy_workers.h):
// one of its own with `num_threads` workers, or the one Options::workers
// names — CopyWorkers::Shared(), the process's pool that every agent's
// engine uses, so that many agents in one process do not start more copy
// threads than the machine has cores. Submit is thread-safe and never
// blocks on a copy; queued work is served first come, first served (across
// the engines sharing a pool).
//
// Shutdown: the destructor stops accepting batches (a Submit that races with
// it, e.g. from a `done` callback, returns kAborted) and waits until every
// batch already accepted finished — every accepted `done` is called — then
// drops its reference to the pool (the last one joins the workers).
// REQUIRES: the engine is not destroyed on a worker of its pool (from a
// `done` callback); doing so is reported and aborts.
#ifndef KVBOUNCE_COPY_CPU_CPU_COPY_ENGINE_H_
#define KVBOUNCE_COPY_CPU_CPU_COPY_ENGINE_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <stop_token>
#include <string_view>
#include <thread>
#include <vector>

#include "copy/copy_engine.h"
#include "copy/cpu/batch_split.h"
#include "copy/cpu/copy_workers.h"
#include "kvbounce/status.h"
#include "kvbounce/types.h"

namespace kvbounce {

struct CpuCopyEngineOptions {
  // The pool to run on (CopyWorkers::Shared() for the process's); null: a
  // pool of the engine's own with `num_threads` workers.
  std::shared_ptr<CopyWorkers> workers;
  // Worker threads of an own pool; 0 picks min(4, hardware threads). At
  // most kMaxThreads. Must be 0 when `workers` is given.
  int num_threads = 0;
  // A batch is split across workers when its bytes exceed split_bytes or its
  // fragment count exceeds split_fragments ...
  uint64_t split_bytes = MiB(1);
  uint64_t split_fragments = 512;
  // ... into min(num_threads, ceil(bytes / min_chunk_bytes)) chunks, so no
  // chunk is so small that waking a thread costs more than it saves. >= 1.
  uint64_t min_chunk_bytes = KiB(64);

  // For tests only: when set, called on the copying thread (a worker, or the
  // caller of SubmitOrCopyHere) before each piece (see
  // the file comment) of every batch is checked and copied, with the index
  // of the piece's fragment in its batch. A test may block in it to hold a
  // batch part-way, or request the batch's stop from it; that very piece
  // then sees the stop. Left empty it costs one branch per piece.
  std::function<void(size_t fragment_index)> piece_hook_for_testing;

  static constexpr int kMaxThreads = 256;
};

class CpuCopyEngine final : public CopyEngine {
 public:
  using Options = CpuCopyEngineOptions;

  // The engine's grain: fragments are copied in pieces of at most this many
  // bytes, the stop token checked before each (see the file comment).
  static constexpr uint64_t kCopyGrainBytes = MiB(1);

  // Counters since Create, for tests and metrics. Each is updated before the
  // batch's `done` runs, so a caller that observed `done` sees its counts.
  struct Stats {
    uint64_t batches_completed = 0;  // `done` called, with OK or kCancelled
    uint64_t batches_cancelled = 0;  // of those, completed with kCancelled
    uint64_t chunks_completed = 0;   // > batches_completed once batches split
    uint64_t bytes_copied = 0;       // bytes actually copied (not skipped ones)
    uint64_t batches_inline = 0;     // of batches_completed, copied by SubmitOrCopyHere's caller
  };

  // Starts the workers.
  // Errors: kInvalidArgument for num_threads < 0 or > kMaxThreads, or
  // min_chunk_bytes == 0; kResourceExhausted when a thread cannot be started
  // (threads already started are joined first).
  static Result<std::unique_ptr<CpuCopyEngine>> Create(const Options& options);
  static Result<std::unique_ptr<CpuCopyEngine>> Create() { return Create(Options()); }

  // Finishes every accepted batch, then joins the workers (see file comment).
  ~CpuCopyEngine() override;

  // Per fragment, in µs (see "Cost" in the file comment).
  static constexpr double kRunUs = 0.05;

  std::string_view Name() const override { return "cpu"; }
  CopyEngineCaps Caps() const override;

  bool CopiesOnCallingThread() const override { return true; }

  // The workers its batches may be split over (its pool's).
  int num_threads() const { return workers_->num_threads(); }
  const std::shared_ptr<CopyWorkers>& workers() const { return workers_; }
  const Options& options() const { return options_; }
  Stats GetStats() const;

 protected:
  // Errors: kAborted once the destructor has started.
  Status SubmitValidated(const CopyBatch& batch, uint64_t total_bytes, CopyDone done,
                         std::stop_token stop) override;
  Status CopyValidatedHere(const CopyBatch& batch, uint64_t total_bytes,
                           std::stop_token stop) override;

 private:
  // One accepted batch; shared by its chunks' tasks.
  struct BatchState {
    CopyBatch batch;
    uint64_t total_bytes = 0;
    CopyDone done;
    std::stop_token stop;
    std::atomic<size_t> chunks_left{0};
    std::atomic<uint64_t> bytes_skipped{0};
  };
  struct Task {
    std::shared_ptr<BatchState> batch;
    CopyChunk chunk;  // bytes == 0: nothing to copy (empty batch)
  };

  CpuCopyEngine(const Options& options, std::shared_ptr<CopyWorkers> workers);
  void Run(const Task& task);
  // Copies chunk `c` of `batch` piece by piece, checking `stop` (and the
  // test hook) before each; returns the bytes copied.
  uint64_t CopyPieces(const CopyBatch& batch, const CopyChunk& c, const std::stop_token& stop);
  // "cpu copy engine: batch stopped: ..." for a batch that skipped bytes.
  static Status Stopped(uint64_t skipped, uint64_t total_bytes);
  const Options options_;
  std::shared_ptr<CopyWorkers> workers_;

  std::mutex mu_;
  std::condition_variable idle_cv_;
  uint64_t tasks_in_flight_ = 0;  // posted, not finished; guarded by mu_
  bool stopping_ = false;         // guarded by mu_

  std::atomic<uint64_t> batches_completed_{0};
  std::atomic<uint64_t> batches_cancelled_{0};
  std::atomic<uint64_t> chunks_completed_{0};
  std::atomic<uint64_t> bytes_copied_{0};
  std::atomic<uint64_t> batches_inline_{0};
};

}  // namespace kvbounce

#endif  // KVBOUNCE_COPY_CPU_CPU_COPY_ENGINE_H_
