#include "layout/chunking.h"

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "common/checked_math.h"

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

namespace {

// The packed coordinate of a run, a tile's outer offset or its segment.
template <typename T>
uint64_t& PackedOf(T& x, PackedSide packed) {
  return packed == PackedSide::kDestination ? x.dst : x.src;
}
template <typename T>
uint64_t PackedOf(const T& x, PackedSide packed) {
  return packed == PackedSide::kDestination ? x.dst : x.src;
}

// Each shape's runs' first packed offset, when each shape's runs follow one
// another densely in packed order and hold bytes; nullopt otherwise.
std::optional<std::vector<uint64_t>> ShapeBases(const TiledList& list, PackedSide packed) {
  std::vector<uint64_t> bases(list.shapes.size(), 0);
  for (size_t i = 0; i < list.shapes.size(); ++i) {
    const TileShape& shape = list.shapes[i];
    if (shape.num_runs == 0) return std::nullopt;
    uint64_t pos = PackedOf(list.runs[shape.first_run], packed);
    bases[i] = pos;
    for (uint64_t r = 0; r < shape.num_runs; ++r) {
      const Fragment& run = list.runs[shape.first_run + r];
      if (PackedOf(run, packed) != pos) return std::nullopt;
      std::optional<uint64_t> next = CheckedAdd(pos, run.bytes);
      if (!next) return std::nullopt;
      pos = *next;
    }
  }
  return bases;
}

// The tiles of a list in packed order, indexed t = o * segments + s.
class TileIndex {
 public:
  TileIndex(const TiledList& list, PackedSide packed, const std::vector<uint64_t>& bases)
      : list_(list), packed_(packed), bases_(bases) {}

  uint64_t size() const {
    return list_.segments.empty() ? 0 : list_.outer.size() * list_.segments.size();
  }
  const TileOffset& outer(uint64_t t) const { return list_.outer[t / list_.segments.size()]; }
  const TileSegment& segment(uint64_t t) const { return list_.segments[t % list_.segments.size()]; }
  uint64_t start(uint64_t t) const {
    const TileSegment& s = segment(t);
    return PackedOf(outer(t), packed_) + PackedOf(s, packed_) + bases_[s.shape];
  }
  uint64_t bytes(uint64_t t) const { return list_.shapes[segment(t).shape].bytes; }
  uint64_t end(uint64_t t) const { return start(t) + bytes(t); }

  // Appends tile t's runs, cut to [begin, end), to `out` with packed
  // offsets less `begin`.
  void AppendCut(uint64_t t, uint64_t begin, uint64_t end, std::vector<Fragment>* out) const {
    const TileOffset& o = outer(t);
    const TileSegment& s = segment(t);
    const TileShape& shape = list_.shapes[s.shape];
    for (uint64_t r = 0; r < shape.num_runs; ++r) {
      const Fragment& run = list_.runs[shape.first_run + r];
      AppendRunCut(Fragment{o.src + s.src + run.src, o.dst + s.dst + run.dst, run.bytes}, packed_,
                   begin, end, out);
    }
  }

  static void AppendRunCut(const Fragment& f, PackedSide packed, uint64_t begin, uint64_t end,
                           std::vector<Fragment>* out) {
    const uint64_t pos = PackedOf(f, packed);
    const uint64_t lo = std::max(begin, pos);
    const uint64_t hi = std::min(end, pos + f.bytes);
    if (hi <= lo) return;
    const uint64_t skip = lo - pos;
    Fragment piece{f.src + skip, f.dst + skip, hi - lo};
    PackedOf(piece, packed) = lo - begin;
    out->push_back(piece);
  }

 private:
  const TiledList& list_;
  PackedSide packed_;
  const std::vector<uint64_t>& bases_;
};

}  // namespace

bool TiledInPackedOrder(const TiledList& list, PackedSide packed) {
  if (!list.WellFormed()) return false;
  std::optional<std::vector<uint64_t>> bases = ShapeBases(list, packed);
  if (!bases) return false;
  uint64_t expected = 0;
  for (const TileOffset& o : list.outer) {
    for (const TileSegment& s : list.segments) {
      std::optional<uint64_t> start = CheckedAdd(PackedOf(o, packed), PackedOf(s, packed));
      if (start) start = CheckedAdd(*start, (*bases)[s.shape]);
      if (!start || *start != expected) return false;
      std::optional<uint64_t> next = CheckedAdd(expected, list.shapes[s.shape].bytes);
      if (!next) return false;
      expected = *next;
    }
  }
  for (const Fragment& f : list.tail) {
    if (PackedOf(f, packed) != expected) return false;
    std::optional<uint64_t> next = CheckedAdd(expected, f.bytes);
    if (!next) return false;
    expected = *next;
  }
  return true;
}

Status SliceTiledChunk(const TiledList& list, PackedSide packed, uint64_t begin, uint64_t end,
                       TiledList* out) {
  if (begin > end) {
    return InvalidArgumentError("chunk slice [" + std::to_string(begin) + ", " +
                                std::to_string(end) + ") is invalid: begin > end");
  }
  std::optional<std::vector<uint64_t>> bases = ShapeBases(list, packed);
  if (!bases) {
    return InvalidArgumentError(
        "chunk slice: a tiled list whose shapes' runs are not in packed "
        "order (REQUIRES TiledInPackedOrder)");
  }
  const TileIndex tiles(list, packed, *bases);
  const uint64_t num_tiles = tiles.size();
  // In packed order the product ends where its last tile does, and the
  // stream where the tail does: no pass over the segments a chunk.
  const uint64_t product_end = num_tiles == 0 ? 0 : tiles.end(num_tiles - 1);
  const uint64_t total =
      list.tail.empty() ? product_end : PackedOf(list.tail.back(), packed) + list.tail.back().bytes;
  if (end > total) {
    return OutOfRangeError("chunk slice [" + std::to_string(begin) + ", " + std::to_string(end) +
                           ") lies past the stream's " + std::to_string(total) + " bytes");
  }
  *out = TiledList();
  if (begin == end) return Status::Ok();

  if (num_tiles > 0 && begin < product_end) {
    // [t0, t1): the tiles holding some byte of [begin, end).
    uint64_t t0 = 0, t1 = num_tiles;
    {
      uint64_t lo = 0, hi = num_tiles;  // first tile ending past `begin`
      while (lo < hi) {
        const uint64_t mid = lo + (hi - lo) / 2;
        (tiles.end(mid) <= begin) ? lo = mid + 1 : hi = mid;
      }
      t0 = lo;
      hi = num_tiles;  // first tile starting at or past `end`
      while (lo < hi) {
        const uint64_t mid = lo + (hi - lo) / 2;
        (tiles.start(mid) < end) ? lo = mid + 1 : hi = mid;
      }
      t1 = lo;
    }
    // The tiles cut by either end go flat.
    uint64_t full_begin = t0, full_end = t1;
    if (t0 < t1 && tiles.start(t0) < begin) {
      tiles.AppendCut(t0, begin, end, &out->tail);
      full_begin = t0 + 1;
    }
    if (full_begin < full_end && tiles.end(t1 - 1) > end) {
      tiles.AppendCut(t1 - 1, begin, end, &out->tail);
      full_end = t1 - 1;
    }
    if (full_begin < full_end) {
      // Whole tiles [full_begin, full_end): one product over outer indices
      // [oa, ob) and segments [sa, sb); the rest flat.
      const uint64_t segs = list.segments.size();
      uint64_t oa = full_begin / segs, ob = (full_end - 1) / segs + 1;
      uint64_t sa = 0, sb = segs;
      const auto flat = [&](uint64_t from, uint64_t to) {
        for (uint64_t t = from; t < to; ++t) tiles.AppendCut(t, begin, end, &out->tail);
      };
      if (ob - oa == 1) {
        sa = full_begin % segs;
        sb = (full_end - 1) % segs + 1;
      } else {
        const bool lead = full_begin % segs != 0;  // outer oa only partly inside
        const bool trail = full_end % segs != 0;   // outer ob - 1 likewise
        const uint64_t inner_a = oa + (lead ? 1 : 0), inner_b = ob - (trail ? 1 : 0);
        if (inner_a < inner_b) {
          if (lead) flat(full_begin, inner_a * segs);
          if (trail) flat(inner_b * segs, full_end);
          oa = inner_a;
          ob = inner_b;
        } else {
          // Two partial outers, nothing whole between: the larger stays tiled.
          const uint64_t lead_tiles = (oa + 1) * segs - full_begin;
          const uint64_t trail_tiles = full_end - (ob - 1) * segs;
          if (lead_tiles >= trail_tiles) {
            flat((ob - 1) * segs, full_end);
            ob = oa + 1;
            sa = full_begin % segs;
          } else {
            flat(full_begin, (oa + 1) * segs);
            oa = ob - 1;
            sb = full_end - oa * segs;
          }
        }
      }
      // Packed offsets: each outer's first tile (segment sa) starts at or
      // past `begin`, and within an outer the tiles ascend, so both parts
      // stay non-negative once each shape's runs start at 0.
      const TileSegment& first = list.segments[sa];
      const uint64_t first_start = PackedOf(first, packed) + (*bases)[first.shape];
      out->outer.reserve(ob - oa);
      for (uint64_t o = oa; o < ob; ++o) {
        TileOffset offset = list.outer[o];
        PackedOf(offset, packed) = PackedOf(offset, packed) + first_start - begin;
        out->outer.push_back(offset);
      }
      out->segments.reserve(sb - sa);
      for (uint64_t s = sa; s < sb; ++s) {
        TileSegment segment = list.segments[s];
        PackedOf(segment, packed) =
            PackedOf(segment, packed) + (*bases)[segment.shape] - first_start;
        out->segments.push_back(segment);
      }
      out->shapes = list.shapes;
      out->runs = list.runs;
      for (size_t i = 0; i < list.shapes.size(); ++i) {
        const TileShape& shape = list.shapes[i];
        for (uint64_t r = 0; r < shape.num_runs; ++r) {
          PackedOf(out->runs[shape.first_run + r], packed) =
              PackedOf(list.runs[shape.first_run + r], packed) - (*bases)[i];
        }
      }
    }
  }
  if (end > product_end) {
    for (const Fragment& f : list.tail) TileIndex::AppendRunCut(f, packed, begin, end, &out->tail);
  }
  return Status::Ok();
}

}  // namespace kvbounce
