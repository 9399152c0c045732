#include "copy/cpu/batch_split.h"

#include <algorithm>

namespace kvbounce {

std::vector<CopyChunk> SplitIntoChunks(std::span<const Fragment> fragments, uint64_t total_bytes,
                                       size_t max_chunks) {
  std::vector<CopyChunk> chunks;
  if (total_bytes == 0 || max_chunks == 0) return chunks;
  const uint64_t count = std::min<uint64_t>(max_chunks, total_bytes);
  // Chunk k gets base bytes, plus one for the first `extra` chunks; computed
  // this way so that nothing overflows even for totals near 2^64.
  const uint64_t base = total_bytes / count;
  const uint64_t extra = total_bytes % count;
  chunks.reserve(count);

  size_t i = 0;         // current fragment
  uint64_t offset = 0;  // bytes of fragments[i] already assigned
  for (uint64_t k = 0; k < count; ++k) {
    uint64_t need = base + (k < extra ? 1 : 0);
    while (fragments[i].bytes == offset) {  // skip exhausted and empty ones
      ++i;
      offset = 0;
    }
    CopyChunk chunk;
    chunk.first = i;
    chunk.first_offset = offset;
    chunk.bytes = need;
    while (need > 0) {
      const uint64_t available = fragments[i].bytes - offset;
      if (available == 0) {
        ++i;
        offset = 0;
        continue;
      }
      const uint64_t take = std::min(available, need);
      offset += take;
      need -= take;
      chunk.last = i;
      chunk.last_end = offset;
    }
    chunks.push_back(chunk);
  }
  return chunks;
}

}  // namespace kvbounce
