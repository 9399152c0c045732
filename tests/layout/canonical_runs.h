// A copy list's canonical form, for tests that compare two lists by the
// bytes they copy rather than by how their runs are cut.
#ifndef KVBOUNCE_TESTS_LAYOUT_CANONICAL_RUNS_H_
#define KVBOUNCE_TESTS_LAYOUT_CANONICAL_RUNS_H_

#include <algorithm>
#include <span>
#include <vector>

#include "layout/chunking.h"
#include "layout/fragment.h"
#include "layout/tiled_list.h"

namespace kvbounce {

// The runs sorted by their packed offset (`packed` naming the side), each
// merged with the one before where both sides continue it: two lists copy
// the same bytes to the same places exactly when these are equal.
inline std::vector<Fragment> CanonicalRuns(std::span<const Fragment> runs, PackedSide packed) {
  std::vector<Fragment> sorted(runs.begin(), runs.end());
  const auto key = [packed](const Fragment& f) {
    return packed == PackedSide::kDestination ? f.dst : f.src;
  };
  std::sort(sorted.begin(), sorted.end(),
            [&key](const Fragment& a, const Fragment& b) { return key(a) < key(b); });
  std::vector<Fragment> out;
  for (const Fragment& f : sorted) {
    if (f.bytes == 0) continue;
    if (!out.empty() && out.back().src + out.back().bytes == f.src &&
        out.back().dst + out.back().bytes == f.dst) {
      out.back().bytes += f.bytes;
    } else {
      out.push_back(f);
    }
  }
  return out;
}

inline std::vector<Fragment> CanonicalRuns(const TiledList& list, PackedSide packed) {
  std::vector<Fragment> runs;
  list.ForEachRun([&runs](const Fragment& f) { runs.push_back(f); });
  return CanonicalRuns(runs, packed);
}

}  // namespace kvbounce

#endif  // KVBOUNCE_TESTS_LAYOUT_CANONICAL_RUNS_H_
