#include "memory/allocation.h"

#include <cstring>
#include <limits>
#include <new>
#include <string>

namespace kvbounce {

std::string_view MemoryKindName(MemoryKind kind) {
  switch (kind) {
    case MemoryKind::kHost:
      return "host";
    case MemoryKind::kPinnedHost:
      return "pinned-host";
    case MemoryKind::kCuda:
      return "cuda";
  }
  return "unknown";
}

bool IsHostAccessible(MemoryKind kind) {
  return kind == MemoryKind::kHost || kind == MemoryKind::kPinnedHost;
}

Result<std::unique_ptr<Allocation>> HostAllocation::Create(size_t bytes, size_t alignment) {
  if (bytes == 0) {
    return InvalidArgumentError("host allocation: size must be > 0 bytes");
  }
  if (alignment == 0 || (alignment & (alignment - 1)) != 0) {
    return InvalidArgumentError("host allocation: alignment " + std::to_string(alignment) +
                                " is not a power of two");
  }
  // Aligned operator new wants a size that is a multiple of the alignment on
  // some platforms; round up, refusing sizes where that would wrap.
  if (bytes > std::numeric_limits<size_t>::max() - (alignment - 1)) {
    return ResourceExhaustedError("host allocation: " + std::to_string(bytes) +
                                  " bytes aligned to " + std::to_string(alignment) +
                                  " do not fit in the address space");
  }
  const size_t rounded = (bytes + alignment - 1) / alignment * alignment;
  void* data = ::operator new(rounded, std::align_val_t(alignment), std::nothrow);
  if (data == nullptr) {
    return ResourceExhaustedError("host allocation: out of memory allocating " +
                                  std::to_string(bytes) + " bytes");
  }
  std::memset(data, 0, rounded);
  return std::unique_ptr<Allocation>(new HostAllocation(data, bytes, alignment));
}

HostAllocation::~HostAllocation() { ::operator delete(data_, std::align_val_t(alignment_)); }

}  // namespace kvbounce
