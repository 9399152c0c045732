#include "copy/copy_engine.h"

#include <algorithm>
#include <condition_variable>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

namespace kvbounce {
namespace {

constexpr uint64_t kMaxU64 = std::numeric_limits<uint64_t>::max();

Status BadFragment(size_t index, const Fragment& f, std::string_view why) {
  return InvalidArgumentError("copy batch: fragment " + std::to_string(index) + " (src " +
                              std::to_string(f.src) + ", dst " + std::to_string(f.dst) +
                              ", bytes " + std::to_string(f.bytes) + "): " + std::string(why));
}

// Checks one fragment (not of zero bytes) against the bases and adds its
// bytes to `total`.
Status CheckFragment(size_t i, const Fragment& f, uint64_t src_base, uint64_t dst_base,
                     uint64_t& total) {
  // Each end is checked as "start <= max - bytes" so nothing wraps.
  if (f.src > kMaxU64 - src_base || src_base + f.src > kMaxU64 - f.bytes) {
    return BadFragment(i, f, "source base + offset + bytes overflows 64 bits");
  }
  if (f.dst > kMaxU64 - dst_base || dst_base + f.dst > kMaxU64 - f.bytes) {
    return BadFragment(i, f, "destination base + offset + bytes overflows 64 bits");
  }
  const uint64_t src = src_base + f.src;
  const uint64_t dst = dst_base + f.dst;
  if (src == 0) return BadFragment(i, f, "source address is 0");
  if (dst == 0) return BadFragment(i, f, "destination address is 0");
  if (src < dst + f.bytes && dst < src + f.bytes) {
    return BadFragment(i, f, "source and destination ranges overlap");
  }
  if (total > kMaxU64 - f.bytes) {
    return InvalidArgumentError("copy batch: total bytes overflow 64 bits at fragment " +
                                std::to_string(i));
  }
  total += f.bytes;
  return Status::Ok();
}

// The smallest start and largest end of one coordinate over a set of
// offsets, in 64 bits (`ok` false once an end overflows).
struct Span {
  uint64_t lo = kMaxU64;
  uint64_t hi = 0;
  bool ok = true;
  void Add(uint64_t start, uint64_t bytes) {
    lo = std::min(lo, start);
    if (start > kMaxU64 - bytes)
      ok = false;
    else
      hi = std::max(hi, start + bytes);
  }
};

// a + b, or false when it overflows.
bool AddTo(uint64_t& a, uint64_t b) {
  if (a > kMaxU64 - b) return false;
  a += b;
  return true;
}

// The sources' and the destinations' bounding ranges of a well-formed
// tiled batch: true when each is free of overflow and address 0 and the two
// are disjoint, so that no run can fail a check.
bool TiledBoundsClear(const TiledList& tiles, uint64_t src_base, uint64_t dst_base) {
  Span outer_src, outer_dst, seg_src, seg_dst, run_src, run_dst;
  for (const TileOffset& o : tiles.outer) {
    outer_src.Add(o.src, 0);
    outer_dst.Add(o.dst, 0);
  }
  for (const TileSegment& s : tiles.segments) {
    seg_src.Add(s.src, 0);
    seg_dst.Add(s.dst, 0);
  }
  for (const Fragment& r : tiles.runs) {
    run_src.Add(r.src, r.bytes);
    run_dst.Add(r.dst, r.bytes);
  }
  if (!run_src.ok || !run_dst.ok) return false;
  uint64_t src_lo = src_base, src_hi = src_base, dst_lo = dst_base, dst_hi = dst_base;
  const bool fits =
      AddTo(src_lo, outer_src.lo) && AddTo(src_lo, seg_src.lo) && AddTo(src_lo, run_src.lo) &&
      AddTo(src_hi, outer_src.hi) && AddTo(src_hi, seg_src.hi) && AddTo(src_hi, run_src.hi) &&
      AddTo(dst_lo, outer_dst.lo) && AddTo(dst_lo, seg_dst.lo) && AddTo(dst_lo, run_dst.lo) &&
      AddTo(dst_hi, outer_dst.hi) && AddTo(dst_hi, seg_dst.hi) && AddTo(dst_hi, run_dst.hi);
  return fits && src_lo != 0 && dst_lo != 0 && (src_hi <= dst_lo || dst_hi <= src_lo);
}

Status ValidateTiledBatch(const CopyBatch& batch, uint64_t* total_bytes) {
  const TiledList& tiles = *batch.tiles;
  if (!batch.fragments.empty()) {
    return InvalidArgumentError("copy batch: " + std::to_string(batch.fragments.size()) +
                                " fragments given beside a tiled list");
  }
  if (!tiles.WellFormed()) {
    return InvalidArgumentError(
        "copy batch: malformed tiled list (a shape or run index out of range, a zero-byte run, "
        "or a shape's bytes not the sum of its runs)");
  }
  const uint64_t src_base = batch.src_base.value();
  const uint64_t dst_base = batch.dst_base.value();
  uint64_t total = 0;
  size_t index = 0;
  if (tiles.outer.empty() || tiles.segments.empty()) {
    // No tiled run.
  } else if (TiledBoundsClear(tiles, src_base, dst_base)) {
    uint64_t per_outer = 0;
    bool fits = true;
    for (const TileSegment& s : tiles.segments)
      fits = fits && AddTo(per_outer, tiles.shapes[s.shape].bytes);
    if (!fits || per_outer > kMaxU64 / tiles.outer.size()) {
      return InvalidArgumentError("copy batch: total bytes of the tiled list overflow 64 bits");
    }
    total = per_outer * tiles.outer.size();
    index = static_cast<size_t>(tiles.NumRuns() - tiles.tail.size());
  } else {
    // Some run may be bad: check each, as a flat list would be. The sums
    // are checked before they are formed (ForEachRun's would wrap).
    for (const TileOffset& o : tiles.outer) {
      for (const TileSegment& s : tiles.segments) {
        const TileShape& shape = tiles.shapes[s.shape];
        for (uint64_t r = 0; r < shape.num_runs; ++r, ++index) {
          const Fragment& run = tiles.runs[shape.first_run + r];
          uint64_t src = o.src, dst = o.dst;
          if (!AddTo(src, s.src) || !AddTo(src, run.src) || !AddTo(dst, s.dst) ||
              !AddTo(dst, run.dst)) {
            return InvalidArgumentError("copy batch: run " + std::to_string(index) +
                                        " of the tiled list: an offset overflows 64 bits");
          }
          KVB_RETURN_IF_ERROR(
              CheckFragment(index, Fragment{src, dst, run.bytes}, src_base, dst_base, total));
        }
      }
    }
  }
  // The runs after the tiles (a hybrid model's state), each as a flat run.
  for (const Fragment& run : tiles.tail) {
    KVB_RETURN_IF_ERROR(CheckFragment(index++, run, src_base, dst_base, total));
  }
  if (total_bytes != nullptr) *total_bytes = total;
  return Status::Ok();
}

}  // namespace

Status ValidateCopyBatch(const CopyBatch& batch, uint64_t* total_bytes) {
  if (batch.tiles != nullptr) return ValidateTiledBatch(batch, total_bytes);
  const uint64_t src_base = batch.src_base.value();
  const uint64_t dst_base = batch.dst_base.value();
  uint64_t total = 0;
  for (size_t i = 0; i < batch.fragments.size(); ++i) {
    const Fragment& f = batch.fragments[i];
    if (f.bytes == 0) continue;
    KVB_RETURN_IF_ERROR(CheckFragment(i, f, src_base, dst_base, total));
  }
  if (total_bytes != nullptr) *total_bytes = total;
  return Status::Ok();
}

Status CopyEngine::Submit(const CopyBatch& batch, CopyDone done, std::stop_token stop) {
  if (!done) return InvalidArgumentError("copy batch: the completion callback is empty");
  uint64_t total_bytes = 0;
  KVB_RETURN_IF_ERROR(ValidateCopyBatch(batch, &total_bytes));
  return SubmitChecked(batch, total_bytes, std::move(done), std::move(stop));
}

Status CopyEngine::SubmitChecked(const CopyBatch& batch, uint64_t total_bytes, CopyDone done,
                                 std::stop_token stop) {
  if (batch.tiles != nullptr && !Caps().tiled_lists) {
    // Expanded here; the list lives until `done` has run.
    auto flat = std::make_shared<FragmentList>();
    batch.tiles->ExpandTo(flat.get());
    const CopyBatch expanded{*flat, batch.src_base, batch.dst_base};
    return SubmitValidated(
        expanded, total_bytes,
        [flat, done = std::move(done)](Status status) mutable { done(std::move(status)); },
        std::move(stop));
  }
  return SubmitValidated(batch, total_bytes, std::move(done), std::move(stop));
}

Status CopyEngine::SubmitOrCopyHere(const CopyBatch& batch, uint64_t inline_bytes, CopyDone done,
                                    std::stop_token stop) {
  if (!done) return InvalidArgumentError("copy batch: the completion callback is empty");
  uint64_t total_bytes = 0;
  KVB_RETURN_IF_ERROR(ValidateCopyBatch(batch, &total_bytes));
  if (inline_bytes == 0 || total_bytes > inline_bytes || !CopiesOnCallingThread()) {
    return SubmitChecked(batch, total_bytes, std::move(done), std::move(stop));
  }
  if (batch.tiles != nullptr) {
    FragmentList flat;
    batch.tiles->ExpandTo(&flat);
    done(CopyValidatedHere(CopyBatch{flat, batch.src_base, batch.dst_base}, total_bytes, stop));
    return Status::Ok();
  }
  done(CopyValidatedHere(batch, total_bytes, stop));
  return Status::Ok();
}

Status CopyEngine::CopyValidatedHere(const CopyBatch& /*batch*/, uint64_t /*total_bytes*/,
                                     std::stop_token /*stop*/) {
  return UnimplementedError(std::string(Name()) + " copy engine cannot copy on the calling thread");
}

Status CopyEngine::CopySync(const CopyBatch& batch) {
  // Shared with the callback, which may still be unwinding on the engine
  // thread after the waiter has returned.
  struct Waiter {
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    Status status;
  };
  auto waiter = std::make_shared<Waiter>();
  KVB_RETURN_IF_ERROR(Submit(batch, [waiter](Status status) {
    std::lock_guard<std::mutex> lock(waiter->mu);
    waiter->status = std::move(status);
    waiter->done = true;
    waiter->cv.notify_one();
  }));
  std::unique_lock<std::mutex> lock(waiter->mu);
  waiter->cv.wait(lock, [&] { return waiter->done; });
  return std::move(waiter->status);
}

}  // namespace kvbounce
