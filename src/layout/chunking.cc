#include "layout/chunking.h"

#include <algorithm>
#include <string>

namespace kvbounce {

ChunkCut::ChunkCut(uint64_t stream_bytes, uint64_t chunk_bytes)
    : stream_bytes_(stream_bytes),
      chunk_bytes_(chunk_bytes),
      num_chunks_(stream_bytes / chunk_bytes + (stream_bytes % chunk_bytes != 0 ? 1 : 0)) {}

Result<ChunkCut> ChunkCut::Create(uint64_t stream_bytes, uint64_t chunk_bytes) {
  if (chunk_bytes == 0) {
    return InvalidArgumentError("chunk cut: chunk_bytes = 0 is invalid: must be >= 1");
  }
  return ChunkCut(stream_bytes, chunk_bytes);
}

uint64_t ChunkCut::end(uint64_t k) const {
  // (k + 1) * chunk_bytes may exceed 64 bits for the last chunk of a huge
  // chunk size: compare against what is left instead.
  const uint64_t start = begin(k);
  return stream_bytes_ - start <= chunk_bytes_ ? stream_bytes_ : start + chunk_bytes_;
}

void OrderForSlicing(FragmentList& list, PackedSide packed) {
  const auto offset = [packed](const Fragment& f) {
    return packed == PackedSide::kDestination ? f.dst : f.src;
  };
  const auto before = [&offset](const Fragment& a, const Fragment& b) {
    return offset(a) < offset(b);
  };
  if (!std::is_sorted(list.begin(), list.end(), before)) {
    std::sort(list.begin(), list.end(), before);
  }
}

Status SliceChunk(std::span<const Fragment> list, PackedSide packed, uint64_t begin, uint64_t end,
                  FragmentList* out) {
  if (begin > end) {
    return InvalidArgumentError("chunk slice [" + std::to_string(begin) + ", " +
                                std::to_string(end) + ") is invalid: begin > end");
  }
  const bool on_dst = packed == PackedSide::kDestination;
  const auto packed_of = [on_dst](const Fragment& f) { return on_dst ? f.dst : f.src; };
  const uint64_t total = list.empty() ? 0 : packed_of(list.back()) + list.back().bytes;
  if (end > total) {
    return OutOfRangeError("chunk slice [" + std::to_string(begin) + ", " + std::to_string(end) +
                           ") lies past the stream's " + std::to_string(total) + " bytes");
  }
  if (begin == end) return Status::Ok();
  // The first run that ends past `begin` (runs are in packed order).
  const auto first = std::partition_point(
      list.begin(), list.end(), [&](const Fragment& f) { return packed_of(f) + f.bytes <= begin; });
  uint64_t pos = first == list.end() ? total : packed_of(*first);
  if (pos > begin) {
    return InvalidArgumentError("chunk slice: no run covers packed byte " + std::to_string(begin) +
                                ": not a gather or scatter list");
  }
  for (auto it = first; pos < end; ++it) {
    if (it == list.end()) {
      return OutOfRangeError("chunk slice: the list ends at packed byte " + std::to_string(pos) +
                             ", before " + std::to_string(end));
    }
    const Fragment& f = *it;
    if (packed_of(f) != pos) {
      return InvalidArgumentError("chunk slice: run " + std::to_string(it - list.begin()) +
                                  " starts at packed byte " + std::to_string(packed_of(f)) +
                                  ", not at " + std::to_string(pos) +
                                  " where the run before it ended: not a gather or scatter list");
    }
    const uint64_t lo = std::max(begin, pos);
    const uint64_t hi = std::min(end, pos + f.bytes);
    if (hi > lo) {
      const uint64_t skip = lo - pos;
      Fragment piece{f.src + skip, f.dst + skip, hi - lo};
      (on_dst ? piece.dst : piece.src) = lo - begin;
      out->push_back(piece);
    }
    pos += f.bytes;
  }
  return Status::Ok();
}

}  // namespace kvbounce
