// Helpers shared by transport implementations and decorators: the range
// check every Transport::Write and Transport::Read performs before issuing
// anything.
//
// Thread safety: pure functions of their arguments.
#ifndef KVBOUNCE_TRANSPORT_WRITE_CHECK_H_
#define KVBOUNCE_TRANSPORT_WRITE_CHECK_H_

#include <cstdint>
#include <span>

#include "kvbounce/status.h"
#include "kvbounce/transport.h"

namespace kvbounce {

// True when [address, address + bytes) lies inside [base, base + size). A
// zero-byte range is inside when base <= address <= base + size. Never
// overflows, whatever the values. Inline: it runs once per op of lists of
// hundreds of thousands.
inline bool RangeInside(Addr address, uint64_t bytes, Addr base, uint64_t size) {
  if (address < base) return false;
  const uint64_t offset = address - base;
  return offset <= size && bytes <= size - offset;
}

// Checks that every op reads inside `source` and writes inside `target`.
// Returns the total number of bytes the ops move.
//
// Errors: kOutOfRange naming the first offending op (its index, its range and
// the region it leaves); also when the total byte count overflows uint64_t.
Result<uint64_t> CheckWriteOps(const RegionInfo& source, const RegionInfo& target,
                               std::span<const WriteOp> ops);

// The same for Read: every op reads inside the peer's region `source` and
// writes inside the local region `target`. The messages say "read op".
Result<uint64_t> CheckReadOps(const RegionInfo& source, const RegionInfo& target,
                              std::span<const ReadOp> ops);

}  // namespace kvbounce

#endif  // KVBOUNCE_TRANSPORT_WRITE_CHECK_H_
