// ListMemory: storage for the large per-request lists (plan lists of
// fragments, write and read operation lists) that is used again instead of
// going back to the system.
//
// Every request builds lists of tens of thousands of small entries and frees
// them when it ends. glibc's malloc serves buffers that large with mmap and
// unmaps them on free (or trims the heap under them), so every request pays
// one page fault per 4 KiB it fills: on a plan of 41k runs that is ~85% of
// the planner's time (bench/planner_bench: 25.7 ns a run against 3.8 ns with
// the memory kept; docs/PERFORMANCE.md). ListMemory keeps freed buffers of
// kMinCachedBytes and more in power-of-two size classes, up to a bound on the
// bytes it holds, and hands them out again: after the first requests of a
// shape, planning touches no fresh page.
//
// What it holds: at most `capacity_bytes` (Global(): kDefaultCapacityBytes)
// of buffers nobody uses, and never a buffer larger than kMaxCachedBytes
// (those go straight back to the system). Release() returns everything it
// holds.
//
// Thread safety: every member is thread-safe; buffers may be freed on
// another thread than the one that allocated them.
#ifndef KVBOUNCE_COMMON_LIST_MEMORY_H_
#define KVBOUNCE_COMMON_LIST_MEMORY_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <new>
#include <vector>

namespace kvbounce {

class ListMemory {
 public:
  // Smaller buffers come from operator new directly (malloc keeps those).
  static constexpr size_t kMinCachedBytes = size_t{64} << 10;
  // Larger buffers are not kept.
  static constexpr size_t kMaxCachedBytes = size_t{256} << 20;
  // What Global() keeps at most.
  static constexpr size_t kDefaultCapacityBytes = size_t{256} << 20;

  // The process's instance, used by ListAllocator. Never destroyed, so lists
  // in static storage may outlive everything else.
  static ListMemory& Global();

  explicit ListMemory(size_t capacity_bytes) : capacity_bytes_(capacity_bytes) {}
  ListMemory(const ListMemory&) = delete;
  ListMemory& operator=(const ListMemory&) = delete;
  ~ListMemory() { Release(); }

  // At least `bytes` bytes aligned for any standard type; throws
  // std::bad_alloc like operator new when the system has no memory (the
  // lists are standard containers).
  void* Allocate(size_t bytes);
  // REQUIRES: `p` came from Allocate(bytes) of this instance, with the same
  // `bytes`.
  void Deallocate(void* p, size_t bytes) noexcept;
  // Returns every buffer held to the system.
  void Release() noexcept;

  struct Stats {
    uint64_t reused = 0;      // allocations served from a kept buffer
    uint64_t fresh = 0;       // allocations of a kept size that were not
    uint64_t held_bytes = 0;  // bytes of buffers kept now
    uint64_t dropped = 0;     // frees of a kept size that found it full
  };
  Stats stats() const;

  // The size class that serves `bytes` (the power of two at or above it),
  // or 0 when such a buffer is not kept.
  static size_t ClassBytes(size_t bytes);

 private:
  static constexpr int kMinShift = 16;  // log2(kMinCachedBytes)
  static constexpr int kMaxShift = 28;  // log2(kMaxCachedBytes)
  static int ClassIndex(size_t class_bytes);

  const size_t capacity_bytes_;
  mutable std::mutex mu_;
  std::array<std::vector<void*>, kMaxShift - kMinShift + 1> free_;  // guarded by mu_
  Stats stats_;                                                     // guarded by mu_
};

// A standard allocator over ListMemory::Global().
template <typename T>
class ListAllocator {
 public:
  using value_type = T;
  static_assert(alignof(T) <= __STDCPP_DEFAULT_NEW_ALIGNMENT__,
                "ListMemory hands out operator new's default alignment");

  ListAllocator() noexcept = default;
  template <typename U>
  ListAllocator(const ListAllocator<U>& /*other*/) noexcept {}

  T* allocate(size_t n) {
    if (n > SIZE_MAX / sizeof(T)) throw std::bad_array_new_length();
    return static_cast<T*>(ListMemory::Global().Allocate(n * sizeof(T)));
  }
  void deallocate(T* p, size_t n) noexcept { ListMemory::Global().Deallocate(p, n * sizeof(T)); }

  template <typename U>
  friend bool operator==(const ListAllocator&, const ListAllocator<U>&) noexcept {
    return true;
  }
};

// A vector whose large buffers ListMemory keeps for the next request.
template <typename T>
using ListVector = std::vector<T, ListAllocator<T>>;

}  // namespace kvbounce

#endif  // KVBOUNCE_COMMON_LIST_MEMORY_H_
