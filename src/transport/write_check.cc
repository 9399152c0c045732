#include "transport/write_check.h"

#include <cinttypes>
#include <cstdio>
#include <limits>
#include <string>

namespace kvbounce {
namespace {

std::string RangeText(Addr address, uint64_t bytes) {
  char buffer[64];
  std::snprintf(buffer, sizeof(buffer), "0x%" PRIx64 "+%" PRIu64, address.value(), bytes);
  return buffer;
}

Status OpOutOfRange(const char* kind, size_t index, const char* side, Addr address, uint64_t bytes,
                    const RegionInfo& region) {
  return OutOfRangeError(std::string(kind) + " op " + std::to_string(index) + ": " + side +
                         " range " + RangeText(address, bytes) + " is outside the " + side +
                         " region " + RangeText(region.address, region.size));
}

// WriteOp and ReadOp alike: `src` inside `source`, `dst` inside `target`.
template <typename Op>
Result<uint64_t> CheckOps(const char* kind, const RegionInfo& source, const RegionInfo& target,
                          std::span<const Op> ops) {
  uint64_t total = 0;
  for (size_t i = 0; i < ops.size(); ++i) {
    const Op& op = ops[i];
    if (!RangeInside(op.src, op.bytes, source.address, source.size)) {
      return OpOutOfRange(kind, i, "source", op.src, op.bytes, source);
    }
    if (!RangeInside(op.dst, op.bytes, target.address, target.size)) {
      return OpOutOfRange(kind, i, "target", op.dst, op.bytes, target);
    }
    if (op.bytes > std::numeric_limits<uint64_t>::max() - total) {
      return OutOfRangeError(std::string(kind) + " ops: the total byte count overflows");
    }
    total += op.bytes;
  }
  return total;
}

}  // namespace

Result<uint64_t> CheckWriteOps(const RegionInfo& source, const RegionInfo& target,
                               std::span<const WriteOp> ops) {
  return CheckOps("write", source, target, ops);
}

Result<uint64_t> CheckReadOps(const RegionInfo& source, const RegionInfo& target,
                              std::span<const ReadOp> ops) {
  return CheckOps("read", source, target, ops);
}

}  // namespace kvbounce
