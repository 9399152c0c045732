// Owning handles to the memory that kvbounce stages KV cache in.
//
// An Allocation owns one contiguous region of memory of some MemoryKind and
// frees it in its destructor. The arena (arena.h) carves an Allocation into
// slots; a transport registers it; a copy engine reads and writes it. Only the
// owner of the memory knows how to free it, so every kind of memory derives
// from the same small interface:
//
//   kHost        plain pageable host memory (HostAllocation, this file);
//   kPinnedHost  page-locked host memory, for host-staged transfers where the
//                transport cannot reach device memory (a later module);
//   kCuda        device memory (cudaMalloc or CUDA VMM), exportable to a peer
//                on the same node (a later module).
//
// A new kind adds a class deriving from Allocation, a factory returning
// Result<std::unique_ptr<Allocation>>, and, when its memory is not
// host-accessible, a host_pointer() that returns nullptr. Nothing else in this
// module changes: the arena only ever sees the interface.
//
// Thread safety: an Allocation is immutable after creation; its accessors may
// be called from any thread. Destroying it races with every other use, as for
// any owning object.
//
// Ownership: the Allocation owns its memory. Every pointer or Addr derived
// from it (slots, registrations, copy lists) borrows and must not outlive it.
#ifndef KVBOUNCE_MEMORY_ALLOCATION_H_
#define KVBOUNCE_MEMORY_ALLOCATION_H_

#include <cstddef>
#include <memory>
#include <string_view>

#include "kvbounce/status.h"
#include "kvbounce/types.h"

namespace kvbounce {

// "host", "pinned-host" or "cuda" (used in messages and the wire's HELLO).
std::string_view MemoryKindName(MemoryKind kind);

// True when host code may dereference pointers into memory of this kind
// (kHost, kPinnedHost); false for kCuda.
bool IsHostAccessible(MemoryKind kind);

// One owned, contiguous region of memory. Abstract: see the subclasses.
class Allocation {
 public:
  // Frees the memory. REQUIRES: nothing still uses it (no registration of it
  // is alive, no copy is in flight). The arena guarantees that for the
  // allocations it owns.
  virtual ~Allocation() = default;

  Allocation(const Allocation&) = delete;
  Allocation& operator=(const Allocation&) = delete;

  // The first byte of the region. For device memory a device address; never
  // dereference it from host code (use host_pointer()).
  virtual Addr address() const = 0;
  // The region's size in bytes, as requested at creation (> 0).
  virtual size_t size() const = 0;
  virtual MemoryKind kind() const = 0;
  // The CUDA device ordinal the memory belongs to for kCuda; -1 for host
  // kinds (pinned host memory is reachable from every device).
  virtual int device() const { return -1; }
  // The first byte as a host pointer, or nullptr when the memory is not
  // host-accessible (device memory). When non-null it equals
  // address().ToPointer().
  virtual void* host_pointer() const = 0;

 protected:
  Allocation() = default;
};

// Plain host memory from the C++ heap, aligned as requested.
//
// The memory is zero-filled at creation: contents are deterministic (tests
// compare bytes, and no earlier heap contents can leak to a peer through a
// staging slot). Zero-filling also commits every page up front, so the first
// transfer does not pay for page faults; the cost is one memset at creation.
class HostAllocation final : public Allocation {
 public:
  // The default alignment: one page, so a region never shares its first
  // page with unrelated heap data (registering memory with a transport pins
  // whole pages).
  static constexpr size_t kDefaultAlignment = 4096;

  // Allocates `bytes` bytes aligned to `alignment`.
  //
  // Errors:
  //   InvalidArgument    bytes == 0, or alignment is not a power of two
  //                      (0 included).
  //   ResourceExhausted  the heap could not provide the memory, or the
  //                      rounded-up size does not fit in size_t.
  static Result<std::unique_ptr<Allocation>> Create(size_t bytes,
                                                    size_t alignment = kDefaultAlignment);

  ~HostAllocation() override;

  Addr address() const override { return Addr::FromPointer(data_); }
  size_t size() const override { return size_; }
  MemoryKind kind() const override { return MemoryKind::kHost; }
  void* host_pointer() const override { return data_; }

 private:
  HostAllocation(void* data, size_t size, size_t alignment)
      : data_(data), size_(size), alignment_(alignment) {}

  void* data_;
  size_t size_;
  size_t alignment_;  // needed to free with the matching aligned delete
};

}  // namespace kvbounce

#endif  // KVBOUNCE_MEMORY_ALLOCATION_H_
