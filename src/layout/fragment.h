// Fragment: one contiguous copy of `bytes` bytes, the unit every plan list and
// every copy engine batch is made of.
//
// What `src` and `dst` hold depends on the list (docs/architecture.md §4):
//   gather list   src = sender pool address,  dst = offset in the packed stream
//   scatter list  src = offset in the packed stream, dst = receiver pool address
//   direct list   src = sender pool address,  dst = receiver pool address
// A copy engine adds a per-batch base to each side (the staging slot's address
// for packed offsets, 0 for absolute addresses), so the same list runs against
// any slot.
#ifndef KVBOUNCE_LAYOUT_FRAGMENT_H_
#define KVBOUNCE_LAYOUT_FRAGMENT_H_

#include <cstdint>

#include "common/list_memory.h"

namespace kvbounce {

struct Fragment {
  uint64_t src = 0;
  uint64_t dst = 0;
  uint64_t bytes = 0;

  friend bool operator==(const Fragment&, const Fragment&) = default;
};

// A list of fragments (a plan list): its storage is kept for the next
// request's list (common/list_memory.h), so building one touches no fresh
// page once a shape has been planned.
using FragmentList = ListVector<Fragment>;

}  // namespace kvbounce

#endif  // KVBOUNCE_LAYOUT_FRAGMENT_H_
