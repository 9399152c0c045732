#include "layout/tiled_list.h"

namespace kvbounce {

uint64_t TiledList::NumRuns() const {
  uint64_t per_outer = 0;
  for (const TileSegment& s : segments) per_outer += shapes[s.shape].num_runs;
  return per_outer * outer.size() + tail.size();
}

uint64_t TiledList::TotalBytes() const {
  uint64_t per_outer = 0;
  for (const TileSegment& s : segments) per_outer += shapes[s.shape].bytes;
  uint64_t bytes = per_outer * outer.size();
  for (const Fragment& f : tail) bytes += f.bytes;
  return bytes;
}

void TiledList::ExpandTo(FragmentList* out) const {
  out->reserve(out->size() + NumRuns());
  ForEachRun([out](const Fragment& f) {
    if (!out->empty()) {
      Fragment& last = out->back();
      if (last.src + last.bytes == f.src && last.dst + last.bytes == f.dst) {
        last.bytes += f.bytes;
        return;
      }
    }
    out->push_back(f);
  });
}

bool TiledList::WellFormed() const {
  for (const TileShape& shape : shapes) {
    if (shape.first_run > runs.size() || shape.num_runs > runs.size() - shape.first_run) {
      return false;
    }
    uint64_t bytes = 0;
    for (uint64_t r = 0; r < shape.num_runs; ++r) {
      const uint64_t b = runs[shape.first_run + r].bytes;
      if (b == 0 || bytes + b < bytes) return false;
      bytes += b;
    }
    if (bytes != shape.bytes) return false;
  }
  for (const TileSegment& s : segments) {
    if (s.shape >= shapes.size()) return false;
  }
  for (const Fragment& f : tail) {
    if (f.bytes == 0) return false;
  }
  return true;
}

}  // namespace kvbounce
