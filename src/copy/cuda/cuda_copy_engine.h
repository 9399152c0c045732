// CudaCopyEngine: the GPU copy engine (docs/architecture.md §7), one batched kernel per
// launch.
//
// A batch's fragments are cut into pieces of at most 32 KiB
// (cuda_copy::kMaxPieceBytes) whose descriptors are written into a pinned
// staging buffer (a list whose fragments all fit a piece is copied there as
// it is, a Fragment having a descriptor's layout, with the batch's bases
// passed to the kernel), uploaded to device memory on the engine's upload stream
// — or, for a flat launch of at most `max_mapped_pieces` pieces, read by the
// kernel from the staging buffer itself, mapped into the device —
// and copied by ONE kernel launch on the engine's copy stream (copy_kernel.cuh:
// a warp per piece (8 or 16 lanes for pieces of 128 or 256 bytes at most),
// 16-byte vector accesses when source and destination are
// equally aligned modulo 16, narrower words and byte-wise edges otherwise).
// A batch larger than `max_launch_bytes` or `max_launch_pieces` runs as
// several launches (sub-batches). Up to `launch_slots` launches are in flight
// at a time, so descriptor upload of the next launch overlaps the copy of the
// one before; batches share the slots first come, first served.
//
// Small batches: a batch of at most cuda_copy::kInlinePieces pieces (and
// at most max_launch_bytes) travels whole in the kernel's parameters — one
// launch call, no descriptor upload and no wait between the upload and copy
// streams, the bulk of a one-block request's copy (in a parameter block
// of ~200 bytes up to cuda_copy::kSmallInlinePieces pieces, of 3 KiB above).
//
// Tiled batches (CopyBatch::tiles, Caps().tiled_lists): the engine cuts
// each distinct shape's runs into pieces once, at Submit, and uploads per
// launch the outer offsets, the shapes, their pieces and a range of
// segments — a few KiB for a request of tens of thousands of runs — and
// one kernel (cuda_copy::LaunchTiledCopy) expands the product on the
// device, a group per piece as above. A launch holds whole segments: as
// many as max_launch_bytes and the staging buffer allow, at least one. A
// tiled list whose outer offsets, shapes and pieces alone overflow a
// launch's staging buffer (max_launch_pieces descriptors) is expanded and
// runs as a flat list.
//
// Merged launches: where a tiled batch's last launch has room left, the
// tiled batches queued right behind it ride in the same launch, each
// whole, in queue order, up to max_launch_bytes and the staging buffer. A
// rider with the same outer offsets, shapes, pieces and bases as the list
// before it (the copies of one plan shape for other requests: they differ
// in their segments only) adds its segments to that list; any other
// becomes a list of its own (up to cuda_copy::kMaxTiledLists a launch, the
// lists' headers staged after their descriptors), as long as its pieces
// take the same lane groups as the batch's (cuda_copy::GroupLanesFor).
// A receiver reading the blocks of several writers has one batch a writer
// a request, each with other bases: they merge too. Each batch
// still completes on its own (its `done` once the launch ended, in queue
// order); a batch whose stop was requested before the launch does not
// ride; a launch's error fails every batch in it. A copy of 32 MiB is a
// launch of ~18 µs on an H200, and the gap and tail of every launch cost
// about a quarter of that (docs/PERFORMANCE.md): merging is what lets a
// writer with many requests in flight copy at the kernel's rate.
//
// Memory (Caps()): the kernel reaches device memory of the engine's device
// (and of peers mapped into it) and pinned host memory that is mapped into
// the device's address space (cudaHostAlloc, cudaHostRegister with
// cudaHostRegisterMapped; with unified addressing its host address is its
// device address). Caps().host_memory is false: PAGEABLE host memory (plain
// malloc/new) is not reachable without HMM, and a batch naming it faults on
// the device — that batch fails with kInternal, and the fault is sticky: the
// CUDA context of the process is lost and every later batch of every engine
// on that device fails too. Callers check the memory they pass.
//
// Cancellation (Submit's std::stop_token): the grain is one launch. The
// engine thread checks the batch's stop token before it stages each launch;
// once a stop is requested, launches already enqueued complete and the rest
// of the batch is skipped. `done` then gets kCancelled with "cuda copy
// engine: batch stopped: <s> of <t> bytes not copied", or OK when every byte
// had been launched before the stop was seen. A batch of no bytes completes
// with OK. The destination of a cancelled batch is partly written.
//
// Errors reported through `done` (the batch is then failed, the destination
// may be partly written): a CUDA error staging, uploading, launching or
// completing one of its launches (kInternal and the like, as CudaStatus
// maps them, with the call and the CUDA error text); once a launch fails the
// rest of that batch is not launched.
//
// Cost (Caps().cost, for `auto`, docs/paths.md): MEASURED on an H200 (docs/
// PERFORMANCE.md: 2026-12-01 with bench/cuda_copy_bench.cc, 2026-12-03 with
// the perf log), not at Create:
//   kBatchUs     one batch of one small fragment: Submit to its `done` run
//                on the submitting control loop, ~20 µs (the launch call
//                ~5, the event record ~2, the kernel and the poll), less
//                the hand-off back that `auto` counts apart;
//   kRunUs       per fragment: ~10 ns on the GPU host's CPU, checking it
//                at Submit, staging and uploading its descriptor (the
//                256 B row, less its bytes);
//   kBytesPerUs  large fragments device to device, one batch at a time:
//                1050 GB/s (half of one large cudaMemcpyAsync, 2.07 TB/s,
//                in the same run; the kernel alone: 1.8 TB/s); pinned host
//                memory is bounded by PCIe instead.
//
// Threads: the engine owns one thread, started by Create and joined by the
// destructor; it stages and launches every batch, waits for its launches'
// events (polling for `spin_before_sleep` plus the launch's expected run
// time at kKernelBytesPerUs, at most kMaxSpinBeforeSleep, then a blocking
// wait: it sleeps, it does not spin on; a batch submitted while it polls
// with a launch slot free is launched first) and calls every `done`.
// No `done` runs inside a CUDA callback. Submit is thread-safe and never
// blocks on a copy.
//
// Shutdown: the destructor stops accepting batches (a Submit that races with
// it returns kAborted), lets the thread launch and finish every batch already
// accepted — every accepted `done` is called — and then joins it.
// REQUIRES: the engine is not destroyed on its own thread (from a `done`
// callback); doing so is reported and aborts.
#ifndef KVBOUNCE_COPY_CUDA_CUDA_COPY_ENGINE_H_
#define KVBOUNCE_COPY_CUDA_CUDA_COPY_ENGINE_H_

#include <atomic>
#include <chrono>
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
#include "copy/cuda/cuda_util.h"
#include "kvbounce/status.h"
#include "kvbounce/types.h"

namespace kvbounce {

struct CudaCopyEngineOptions {
  // The CUDA device the engine's streams, buffers and kernels live on.
  int device = 0;
  // Bounds of one launch (sub-batch): the grain of cancellation. >= 1 each;
  // max_launch_pieces at most kMaxLaunchPieces.
  uint64_t max_launch_bytes = MiB(128);
  uint32_t max_launch_pieces = 65536;
  // Launches in flight at a time (each has its own staging and device
  // descriptor buffers). 1 to kMaxLaunchSlots.
  int launch_slots = 4;
  // A batch of at most this many pieces travels in the kernel's
  // parameters, uploading nothing (0: never). 0 to
  // cuda_copy::kInlinePieces.
  uint32_t max_inline_pieces = 128;
  // A flat launch of at most this many pieces has the kernel read their
  // descriptors from the slot's pinned staging buffer, mapped into the
  // device, instead of uploading them first (0: always upload). The upload
  // is a copy on another stream and a wait between the streams, ~20 µs of
  // a small batch's round trip on an H200 (docs/PERFORMANCE.md); reading
  // them over the bus costs the kernel a few µs for a few thousand pieces,
  // while a launch of tens of thousands reads them faster from device
  // memory. Tiled launches, whose pieces every unit reads again, are always
  // uploaded. 0 to kMaxLaunchPieces.
  uint32_t max_mapped_pieces = 1024;
  // How long the engine thread polls a launch's completion, beyond the
  // time the launch's bytes should take (kKernelBytesPerUs), before it
  // sleeps on it (0: sleep at once, not polling at all). A small batch
  // completes a few µs after its launch, and waking from the blocking wait
  // costs 20-40 µs, the bulk of a one-block request's copy; polling costs
  // the thread this much CPU per launch plus the launch's expected run
  // time, kMaxSpinBeforeSleep at most. In [0, kMaxSpinBeforeSleep].
  std::chrono::microseconds spin_before_sleep{20};
  // How long the engine thread, out of batches, keeps looking for the next
  // one before it sleeps (Config::poll_before_sleep_us, which the agent
  // passes here): a batch submitted meanwhile starts without a wake-up.
  // In [0, Config::kMaxPollUs µs]; 0: it sleeps at once.
  std::chrono::microseconds poll_before_sleep{0};

  // For tests only: called on the engine thread before the stop token of a
  // batch is checked for each of its launches, with the launch's index in
  // its batch (0, 1, ...). A test may request the batch's stop from it, or
  // block in it to hold the engine thread.
  std::function<void(size_t launch_index)> launch_hook_for_testing;

  static constexpr uint32_t kMaxLaunchPieces = 1u << 22;
  static constexpr std::chrono::microseconds kMaxSpinBeforeSleep{1000};
  static constexpr int kMaxLaunchSlots = 64;
};

class CudaCopyEngine final : public CopyEngine {
 public:
  using Options = CudaCopyEngineOptions;

  // Measured cost figures (see the file comment).
  static constexpr double kBatchUs = 10.0;
  static constexpr double kRunUs = 0.009;
  static constexpr double kBytesPerUs = 1.05e6;
  // The kernel alone on fragments of 4 KiB and more, launches back to back
  // (cuda_copy_bench's "kernel alone", H200: 1.8 TB/s): how long the engine
  // thread expects a launch to run, which it polls for before it sleeps.
  static constexpr double kKernelBytesPerUs = 1.8e6;

  // Counters since Create, for tests and metrics; each is updated before the
  // batch's `done` runs.
  struct Stats {
    uint64_t batches_completed = 0;  // `done` called (any status)
    uint64_t batches_cancelled = 0;  // of those, completed with kCancelled
    uint64_t batches_failed = 0;     // of those, failed with a CUDA error
    uint64_t launches = 0;           // kernel launches that completed
    uint64_t bytes_copied = 0;       // bytes of launches that completed
  };

  // Creates the streams, events and buffers on `options.device` and starts
  // the engine thread.
  // Errors: kUnavailable with the CUDA error text when there is no driver or
  // no device; kInvalidArgument for a bad option or device ordinal;
  // kResourceExhausted when buffers cannot be allocated or the thread cannot
  // start; other codes as CudaStatus maps a failing call.
  static Result<std::unique_ptr<CudaCopyEngine>> Create(const Options& options);
  static Result<std::unique_ptr<CudaCopyEngine>> Create(
      int device = 0, std::chrono::microseconds poll_before_sleep = {}) {
    Options options;
    options.device = device;
    options.poll_before_sleep = poll_before_sleep;
    return Create(options);
  }

  // Finishes every accepted batch, then joins the thread (see file comment).
  ~CudaCopyEngine() override;

  std::string_view Name() const override { return "cuda"; }
  CopyEngineCaps Caps() const override;

  int device() const { return options_.device; }
  const Options& options() const { return options_; }
  Stats GetStats() const;

 protected:
  // Errors: kAborted once the destructor has started.
  Status SubmitValidated(const CopyBatch& batch, uint64_t total_bytes, CopyDone done,
                         std::stop_token stop) override;

 private:
  struct BatchState;
  struct Slot;
  struct StagedList;

  explicit CudaCopyEngine(const Options& options);
  void Loop();
  // Stages and enqueues the next launch of `batch` into `slot`; sets the
  // batch's cursor past what it launched. Returns the CUDA error, if any.
  Status Launch(BatchState& batch, Slot& slot);
  // The same for a tiled batch: the next segments of its list, and after
  // its last segment the queued batches that can ride along (see "Merged
  // launches"), taken off the queue into slot.riders.
  Status LaunchTiled(BatchState& batch, Slot& slot);
  // Takes off the queue's head the batches that can ride in `batch`'s
  // launch with at most `staging` staging bytes and `bytes` bytes more, in
  // order, stopping at the first that cannot (see "Merged launches").
  void TakeRiders(const BatchState& batch, size_t staging, uint64_t bytes,
                  std::vector<std::shared_ptr<BatchState>>* riders);
  static uint64_t RidersBytes(const std::vector<std::shared_ptr<BatchState>>& riders);
  // Whether two tiled batches have the same outer offsets, shapes, pieces
  // and bases: a launch's list then takes the second's segments too.
  static bool SameTables(const BatchState& a, const BatchState& b);
  // The whole of a small batch (BatchState::small) in the kernel's
  // parameters: no upload.
  Status LaunchInline(BatchState& batch, Slot& slot);
  // After a launch that uploaded nothing (inline, or reading its
  // descriptors mapped): records the slot's event when `launched` is OK,
  // else takes the slot's bytes back off the batch. Returns the error.
  Status FinishUnstagedLaunch(BatchState& batch, Slot& slot, Status launched);
  // The pieces of `batch`, or any number above cuda_copy::kInlinePieces
  // once it has that many.
  static uint64_t InlinePieces(const BatchState& batch);
  // Uploads the slot's first `staged_bytes` staging bytes, runs `launch`
  // (which enqueues the kernel on the copy stream) after the upload and
  // records the slot's completion event.
  Status Enqueue(BatchState& batch, Slot& slot, size_t staged_bytes,
                 const std::function<Status()>& launch);
  // Waits for the oldest launch in flight and settles its batch. While it
  // polls, a batch submitted meanwhile ends the wait when a slot is free
  // (the launch is then left in flight): the loop launches the batch
  // first, so the device gets it while it still copies the one before.
  void Retire();
  // Calls `done` when the batch has nothing queued or in flight any more.
  void MaybeFinish(std::shared_ptr<BatchState>& batch);
  void StopAndJoin();

  const Options options_;
  uint32_t max_blocks_ = 1;  // blocks per launch: enough to fill the device once
  CudaStream copy_stream_;
  CudaStream upload_stream_;
  std::vector<std::unique_ptr<Slot>> slots_;  // fixed after Create
  std::thread thread_;

  // Engine-thread state: the launches in flight, oldest first (indices into
  // slots_), and the free slots.
  std::deque<size_t> in_flight_;
  std::vector<size_t> free_slots_;
  // Riders of a launch that failed to enqueue, finished (failed) after the
  // batch they rode with.
  std::vector<std::shared_ptr<BatchState>> failed_riders_;
  // LaunchTiled's lists, kept for their storage.
  std::vector<StagedList> staged_lists_;
  // submitted_ when the loop last found the queue empty: Retire stops
  // waiting for a launch once a batch came after it (and a slot is free).
  uint64_t submitted_seen_ = 0;

  std::mutex mu_;
  std::condition_variable work_cv_;
  std::atomic<uint64_t> submitted_{0};             // batches queued ever (read while polling)
  std::deque<std::shared_ptr<BatchState>> queue_;  // guarded by mu_
  bool stopping_ = false;                          // guarded by mu_

  std::atomic<uint64_t> batches_completed_{0};
  std::atomic<uint64_t> batches_cancelled_{0};
  std::atomic<uint64_t> batches_failed_{0};
  std::atomic<uint64_t> launches_{0};
  std::atomic<uint64_t> bytes_copied_{0};
};

}  // namespace kvbounce

#endif  // KVBOUNCE_COPY_CUDA_CUDA_COPY_ENGINE_H_
