// CopyEngine: executes a batch of fragments (docs/architecture.md §7), asynchronously, with
// one explicit completion.
//
// Every data movement kvbounce does on one machine is a batch of fragments:
// the sender gathers its pool into a send slot, the receiver scatters its recv
// slot into its pool, and the `direct` path copies pool to pool. A batch is a
// plan list (layout/fragment.h) plus one base address per side, so the same
// list runs against whatever slot the arena handed out:
//
//   gather   src_base = 0           dst_base = slot address   (GatherBatch)
//   scatter  src_base = slot addr.  dst_base = 0              (ScatterBatch)
//   direct   src_base = 0           dst_base = 0              (DirectBatch)
//
// Fragment i copies `bytes` bytes from `src_base + src` to `dst_base + dst`.
//
// Completion contract (the one design every engine follows):
//   * Submit() either rejects the batch now — it returns a non-OK Status and
//     `done` is never called — or accepts it: it returns OK and `done(status)`
//     is then called exactly once, from a thread the engine owns, after every
//     byte of the batch has landed (status OK) or the engine gave up on the
//     batch (non-OK; the destination may then be partly written).
//   * `done` is never called inside Submit(), so a caller may hold its own
//     lock across Submit() as long as `done` does not take that same lock
//     while the caller waits for it.
//   * CopySync() (and Gather/Scatter/Copy) submit and wait for `done`.
//
// Validation (the same for every engine, done in Submit before the engine
// sees the batch): zero-byte fragments are skipped and never checked; for the
// others, base + offset and base + offset + bytes must not overflow 64 bits,
// neither side may start at address 0, and a fragment's source and
// destination ranges must not overlap. An empty batch (or one of only
// zero-byte fragments) is accepted and completes OK.
//
// Thread safety: Submit, CopySync and the helpers may be called concurrently
// from any number of threads, including from inside a `done` callback
// (Submit only; the waiting calls must not run on an engine thread).
//
// Ownership: the engine borrows the fragment list and the memory it names; it
// copies neither. Fragments run in no particular order and possibly in
// parallel, so within a batch, and between batches in flight at the same
// time, no two fragments may write the same byte, and no fragment may read a
// byte that another one writes (plan lists satisfy this by construction).
#ifndef KVBOUNCE_COPY_COPY_ENGINE_H_
#define KVBOUNCE_COPY_COPY_ENGINE_H_

#include <cstdint>
#include <functional>
#include <span>
#include <stop_token>
#include <string_view>

#include "kvbounce/status.h"
#include "kvbounce/types.h"
#include "layout/fragment.h"
#include "layout/tiled_list.h"

namespace kvbounce {

// One unit of work for a copy engine: see the file comment.
struct CopyBatch {
  std::span<const Fragment> fragments;
  Addr src_base;
  Addr dst_base;
  // Or, when set, the runs of this tiled list's expansion (layout/
  // tiled_list.h), with `fragments` empty. An engine whose Caps() say
  // tiled_lists expands it itself; for the others Submit expands it into a
  // flat list first (which it keeps until `done` has run). Borrowed like
  // the fragments.
  const TiledList* tiles = nullptr;
};

// A gather list (src = pool address, dst = packed offset) into the slot that
// starts at `slot`.
inline CopyBatch GatherBatch(std::span<const Fragment> gather_list, Addr slot) {
  return CopyBatch{gather_list, Addr(0), slot};
}

// A scatter list (src = packed offset, dst = pool address) out of the slot
// that starts at `slot`.
inline CopyBatch ScatterBatch(std::span<const Fragment> scatter_list, Addr slot) {
  return CopyBatch{scatter_list, slot, Addr(0)};
}

// A direct list (src and dst both absolute addresses).
inline CopyBatch DirectBatch(std::span<const Fragment> direct_list) {
  return CopyBatch{direct_list, Addr(0), Addr(0)};
}

// The same three in tiled form.
inline CopyBatch GatherBatch(const TiledList& gather_list, Addr slot) {
  return CopyBatch{{}, Addr(0), slot, &gather_list};
}
inline CopyBatch ScatterBatch(const TiledList& scatter_list, Addr slot) {
  return CopyBatch{{}, slot, Addr(0), &scatter_list};
}
inline CopyBatch DirectBatch(const TiledList& direct_list) {
  return CopyBatch{{}, Addr(0), Addr(0), &direct_list};
}

// Called exactly once per accepted batch; see the completion contract above.
// It runs on an engine thread: it should be short and must not block on
// another batch of the same engine (CopySync from inside it deadlocks).
using CopyDone = std::function<void(Status status)>;

// What a batch costs an engine, the copy side of `auto`'s estimate
// (docs/paths.md): batch_us + runs * run_us + bytes / bytes_per_us. Each
// engine says in its header whether its figures are measured or calibrated.
// Zero means "unknown" for a figure (the estimate then uses a default).
struct CopyCost {
  double batch_us = 0;      // fixed cost of one batch (a launch; not the hand-off back)
  double run_us = 0;        // per fragment (run) of the batch
  double bytes_per_us = 0;  // sustained rate of large copies, bytes per µs (= MB/s)
  // A batch of at most this many bytes costs no hand-off: its submitter
  // copies it (SubmitOrCopyHere). Engines state 0; a session sets it from
  // Config::inline_copy_kb for an engine that CopiesOnCallingThread().
  uint64_t inline_bytes = 0;
};

// Which memory an engine can read and write, and what it costs. A batch
// whose addresses lie in memory the engine cannot reach is a caller error
// the engine cannot always detect (a host engine handed a device address
// crashes): callers check these flags against the memory they pass.
struct CopyEngineCaps {
  // Pageable or pinned host memory of this process.
  bool host_memory = false;
  // GPU device memory (of the engine's device, or mapped into it).
  bool device_memory = false;
  // Submit takes a tiled batch as it is and expands it where it copies;
  // without it Submit expands the batch into a flat list first (the work
  // a flat plan would have cost). Sessions plan tiled lists for engines
  // that say so (docs/architecture.md §4).
  bool tiled_lists = false;
  CopyCost cost;
};

// What Submit checks before an engine sees a batch (see the file comment).
// Returns kInvalidArgument naming the first bad fragment by index, or OK.
// `total_bytes`, when not null, receives the sum of the fragments' bytes
// (set only on success).
//
// A tiled batch is checked as its expansion would be (a bad run is named
// by its index in the expansion), and also for a malformed list (a shape
// or run index out of range, a zero-byte run, a shape's bytes not its
// runs' sum) and for fragments given beside it. When the bounding ranges
// of all its sources and of all its destinations are disjoint, nonzero
// and overflow-free — any list between two pools, or between a pool and a
// slot — that settles it at a cost of a step per tile, not per run.
Status ValidateCopyBatch(const CopyBatch& batch, uint64_t* total_bytes = nullptr);

class CopyEngine {
 public:
  CopyEngine() = default;
  CopyEngine(const CopyEngine&) = delete;
  CopyEngine& operator=(const CopyEngine&) = delete;
  // Engines finish or fail every accepted batch (calling its `done`) before
  // their destructor returns; see each engine for which of the two.
  virtual ~CopyEngine() = default;

  // A short name for logs and metrics, e.g. "cpu".
  virtual std::string_view Name() const = 0;

  virtual CopyEngineCaps Caps() const = 0;

  // Starts copying `batch`; see the completion contract in the file comment.
  //
  // REQUIRES: batch.fragments and every byte it names stay valid (and are not
  // written by anyone else) until `done` has been called.
  //
  // Errors (returned now, `done` not called):
  //   kInvalidArgument  `done` is empty, or a fragment fails validation.
  //   kAborted          the engine is shutting down.
  //   other             engine-specific, documented by the engine.
  //
  // Cancellation: once `stop` is requested, the parts of the batch that
  // have not started are skipped and `done` runs with kCancelled after the
  // parts already started finished (each engine documents its grain); a
  // batch that had finished before the request reports its own status.
  Status Submit(const CopyBatch& batch, CopyDone done, std::stop_token stop = {});

  // Like Submit, except that a batch of at most `inline_bytes` bytes is
  // copied on the calling thread when this engine can do that (a CPU engine
  // can; see CopiesOnCallingThread): the copy happens before this returns,
  // and so does its `done` — the one exception to "never inside Submit",
  // which the caller asks for by calling this. Larger batches, and every
  // batch of an engine that cannot, go to Submit unchanged. A session uses
  // it on its control loop for small batches, where handing the batch to a
  // worker and the completion back costs two thread wake-ups (17-48 µs each
  // on an idle core) for a copy of a few µs (docs/architecture.md §7).
  // `inline_bytes` = 0 never copies inline. Same errors as Submit (then
  // `done` is not called); a stop requested before the call skips the copy
  // as Submit would (kCancelled in `done`).
  Status SubmitOrCopyHere(const CopyBatch& batch, uint64_t inline_bytes, CopyDone done,
                          std::stop_token stop = {});

  // Submits `batch` and blocks until it completed; returns the status that
  // Submit returned or, if it was accepted, the status passed to `done`.
  //
  // REQUIRES: not called on one of this engine's threads (i.e. not from a
  // `done` callback); the same memory rules as Submit.
  Status CopySync(const CopyBatch& batch);

  // CopySync of GatherBatch / ScatterBatch / DirectBatch.
  Status Gather(std::span<const Fragment> gather_list, Addr slot) {
    return CopySync(GatherBatch(gather_list, slot));
  }
  Status Scatter(std::span<const Fragment> scatter_list, Addr slot) {
    return CopySync(ScatterBatch(scatter_list, slot));
  }
  Status Copy(std::span<const Fragment> direct_list) { return CopySync(DirectBatch(direct_list)); }

  // Whether SubmitOrCopyHere may copy on the calling thread (the engine
  // reaches its memory with plain loads and stores). Default: no.
  virtual bool CopiesOnCallingThread() const { return false; }

 protected:
  // Called by SubmitOrCopyHere, on the caller's thread, with a validated
  // batch when CopiesOnCallingThread(): copies it (skipping zero-byte
  // fragments) and returns OK, or kCancelled when `stop` skipped part of it.
  // The default, never called, returns kUnimplemented.
  virtual Status CopyValidatedHere(const CopyBatch& batch, uint64_t total_bytes,
                                   std::stop_token stop);

  // Called by Submit with a batch that passed ValidateCopyBatch (it may still
  // hold zero-byte fragments, which the engine must skip) and a non-empty
  // `done`. `total_bytes` is the sum of the fragments' bytes. Same contract as
  // Submit: return non-OK without calling `done`, or OK and call `done`
  // exactly once from an engine thread.
  virtual Status SubmitValidated(const CopyBatch& batch, uint64_t total_bytes, CopyDone done,
                                 std::stop_token stop) = 0;

 private:
  // SubmitValidated, after expanding a tiled batch for an engine without
  // Caps().tiled_lists.
  Status SubmitChecked(const CopyBatch& batch, uint64_t total_bytes, CopyDone done,
                       std::stop_token stop);
};

}  // namespace kvbounce

#endif  // KVBOUNCE_COPY_COPY_ENGINE_H_
