// Splitting a copy batch into contiguous chunks of nearly equal bytes, so a
// large batch (or one huge fragment) can run on several threads at once.
//
// Think of a batch as one byte stream: fragment 0's bytes, then fragment 1's,
// and so on. A chunk is a contiguous piece of that stream. It may start or end
// in the middle of a fragment, which is how a single huge fragment is shared
// between threads. The chunks of one split cover every byte of the batch
// exactly once, in order, and never overlap.
//
// Thread safety: pure functions.
#ifndef KVBOUNCE_COPY_CPU_BATCH_SPLIT_H_
#define KVBOUNCE_COPY_CPU_BATCH_SPLIT_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "layout/fragment.h"

namespace kvbounce {

// Bytes [first_offset, end of fragment) of fragments[first], every fragment
// strictly between first and last whole, and bytes [0, last_end) of
// fragments[last]. When first == last the chunk is bytes
// [first_offset, last_end) of that one fragment. Zero-byte fragments inside
// the range are harmless (nothing to copy).
struct CopyChunk {
  size_t first = 0;
  uint64_t first_offset = 0;
  size_t last = 0;
  uint64_t last_end = 0;
  // Bytes the chunk covers (> 0).
  uint64_t bytes = 0;

  friend bool operator==(const CopyChunk&, const CopyChunk&) = default;
};

// Splits the stream of `fragments` (whose bytes sum to `total_bytes`) into
// min(max_chunks, total_bytes) chunks whose sizes differ by at most one byte.
// Returns no chunks when total_bytes is 0.
//
// REQUIRES: max_chunks >= 1; total_bytes is the exact sum of the fragments'
// bytes (ValidateCopyBatch computes it).
std::vector<CopyChunk> SplitIntoChunks(std::span<const Fragment> fragments, uint64_t total_bytes,
                                       size_t max_chunks);

}  // namespace kvbounce

#endif  // KVBOUNCE_COPY_CPU_BATCH_SPLIT_H_
