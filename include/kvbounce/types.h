// Small vocabulary types shared by every kvbounce module.
//
// Addr is an address that may point at host, device or remote memory. Host
// code never dereferences one directly: only the owner of the memory (a copy
// engine, a transport) turns it into a pointer, and only when the memory kind
// allows it. Keeping it a distinct type stops an offset, a size and an
// address from being mixed up silently.
#ifndef KVBOUNCE_TYPES_H_
#define KVBOUNCE_TYPES_H_

#include <compare>
#include <cstddef>
#include <cstdint>

namespace kvbounce {

class Addr {
 public:
  constexpr Addr() = default;
  constexpr explicit Addr(uint64_t value) : value_(value) {}
  static Addr FromPointer(const void* p) { return Addr(reinterpret_cast<uintptr_t>(p)); }

  constexpr uint64_t value() const { return value_; }
  // REQUIRES: the memory behind this address is host-accessible.
  void* ToPointer() const { return reinterpret_cast<void*>(static_cast<uintptr_t>(value_)); }

  constexpr Addr operator+(uint64_t offset) const { return Addr(value_ + offset); }
  constexpr Addr& operator+=(uint64_t offset) {
    value_ += offset;
    return *this;
  }
  // The distance from `base` to this address. REQUIRES: *this >= base.
  constexpr uint64_t operator-(Addr base) const { return value_ - base.value_; }
  constexpr auto operator<=>(const Addr&) const = default;

 private:
  uint64_t value_ = 0;
};

// Where bytes live: pageable host memory, pinned (page-locked) host memory,
// or CUDA device memory.
enum class MemoryKind { kHost, kPinnedHost, kCuda };

// Where memory lives: its kind and, for device memory, the CUDA device
// ordinal it belongs to (-1 for the host kinds, which every device of the
// process reaches alike).
struct MemoryPlace {
  MemoryKind kind = MemoryKind::kHost;
  int device = -1;
  friend bool operator==(const MemoryPlace&, const MemoryPlace&) = default;
};

// Bytes from a count in MiB.
constexpr uint64_t MiB(uint64_t n) { return n << 20; }
constexpr uint64_t KiB(uint64_t n) { return n << 10; }

constexpr uint64_t AlignUp(uint64_t value, uint64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

}  // namespace kvbounce

#endif  // KVBOUNCE_TYPES_H_
