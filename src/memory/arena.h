// The staging arena of docs/architecture.md §6: a contiguous, registered region that the
// bounce path carves into slots, one per transfer.
//
// An Arena owns one Allocation (and, once attached, the transport's
// Registration of it) and hands out Slots: aligned byte ranges of the region,
// reserved for one transfer and returned when the Slot is released or
// destroyed. A sender gathers a request's KV into a send slot; a receiver
// grants a recv slot (split into one sub-slot per writer, for fan-in) that the
// writers' single large writes land in.
//
// Allocation policy: first fit. Offsets and reserved sizes are multiples of
// alignment(); the hole with the LOWEST offset that fits wins, so a hole
// freed out of order is reused at once, and freed holes coalesce with their
// neighbours. A search costs O(number of holes). There is no fairness between
// waiters: when space frees up, every waiter retries and whichever fits first
// gets it (a large request can lose to a stream of small ones until its
// deadline, after which its caller falls back).
//
// Backpressure: Reserve waits on a condition variable until a hole fits or
// its steady-clock deadline passes, then fails with kResourceExhausted; it
// never hangs. A request that could not fit even in the empty region fails at
// once with kOutOfRange.
//
// Quarantine: a slot that a remote may still be writing (its request was
// cancelled or timed out while writers were in flight) is moved into
// quarantine. Its range stays outstanding and is never handed out again
// until ReleaseQuarantined is called for its token.
//
// Close: refuses new reservations and wakes every waiter (they fail with
// kAborted). The memory, and the registration before it, are released
// exactly once, as soon as the arena is closed and nothing is outstanding:
// at Close() when every slot was already returned, otherwise when the last
// slot or quarantine entry is released.
//
// Ownership and lifetimes:
//   * The Arena owns its Allocation and its Registration.
//   * A Slot may outlive the Arena object that issued it: the region (and its
//     registration) stays alive until the last Slot is gone. Destroying the
//     Arena closes it.
//   * Quarantine tokens are only redeemable through the Arena object; when
//     the Arena is destroyed, entries still in quarantine are released (with
//     a warning in the log), since nothing could release them afterwards.
//     Deregistration happens before the memory is freed, so a late remote
//     write faults at the transport rather than landing in reused memory.
//
// Thread safety: every method of Arena is thread-safe; one mutex guards the
// allocator state and is never held while calling out (releasing the
// registration or the allocation, logging). A Slot is an ordinary value:
// one Slot object must not be used from two threads at once, but distinct
// Slots of one arena may be released concurrently from any threads.
#ifndef KVBOUNCE_MEMORY_ARENA_H_
#define KVBOUNCE_MEMORY_ARENA_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvbounce/registration.h"
#include "kvbounce/status.h"
#include "kvbounce/types.h"
#include "memory/allocation.h"

namespace kvbounce {

namespace memory_internal {
class ArenaCore;
}  // namespace memory_internal

// One writer's piece of a fan-in slot (or the whole of a plain slot).
struct SubSlot {
  // From the start of the arena's region; a multiple of the arena alignment.
  uint64_t offset = 0;
  // The exact byte count asked for this piece.
  uint64_t size = 0;
  // The region's base address plus offset (host, device or registered
  // address, as the arena's memory kind says).
  Addr address;
  // The same as a host pointer, or nullptr when the arena's memory is not
  // host-accessible.
  void* host_pointer = nullptr;
};

// A reserved range of an Arena: move-only, returns its range exactly once
// (at Release() or destruction). A default-constructed or moved-from Slot is
// empty (valid() == false) and releases nothing.
//
// Lifetime: a Slot keeps the arena's memory (and registration) alive, and
// may outlive the Arena object. Its addresses stay valid until it is
// released.
//
// Thread safety: not synchronized; use one Slot object from one thread at a
// time. Releasing it synchronizes with the arena internally.
class Slot {
 public:
  Slot() = default;
  ~Slot() { Release(); }

  Slot(Slot&& other) noexcept;
  // Releases this slot's range first, then takes over other's.
  Slot& operator=(Slot&& other) noexcept;
  Slot(const Slot&) = delete;
  Slot& operator=(const Slot&) = delete;

  bool valid() const { return core_ != nullptr; }

  // The accessors below REQUIRE valid() (an empty slot reports zeros).
  //
  // Offset of the first byte from the start of the arena's region; a
  // multiple of the arena alignment.
  uint64_t offset() const { return offset_; }
  // The bytes asked for. For a plain slot, exactly the request. For a fan-in
  // slot, the extent from offset() to the end of the last sub-slot (the sum
  // of the sub-slot sizes plus the alignment padding between them).
  uint64_t size() const { return size_; }
  // What the slot actually holds in the arena: size() rounded up to the
  // arena alignment. outstanding_bytes() counts this.
  uint64_t reserved_bytes() const { return reserved_; }
  // The region's base address plus offset().
  Addr address() const { return base_ + offset_; }
  // address() as a host pointer, or nullptr when the arena's memory is not
  // host-accessible.
  void* host_pointer() const;

  // The writers' pieces: 1 for a plain slot (the whole slot), else one per
  // size given to the fan-in Reserve, in the same order.
  size_t num_sub_slots() const { return subs_.empty() ? (valid() ? 1 : 0) : subs_.size(); }
  // REQUIRES: i < num_sub_slots().
  SubSlot sub_slot(size_t i) const;

  // Returns the range to the arena (waking reservers waiting for space) and
  // empties this slot. A no-op on an empty slot; safe to call twice.
  void Release();

 private:
  friend class Arena;
  friend class memory_internal::ArenaCore;

  // A sub-slot relative to the slot's own offset.
  struct SubRange {
    uint64_t offset;
    uint64_t size;
  };

  void Clear();

  std::shared_ptr<memory_internal::ArenaCore> core_;
  uint64_t offset_ = 0;
  uint64_t size_ = 0;
  uint64_t reserved_ = 0;
  Addr base_;
  void* host_base_ = nullptr;
  // Empty for a plain slot (its one sub-slot is the slot itself), so the
  // common case allocates nothing.
  std::vector<SubRange> subs_;
};

// Identifies a quarantined range; issued by Arena::Quarantine, never 0,
// never reused by the same arena.
using QuarantineToken = uint64_t;

class Arena {
 public:
  // The smallest alignment an arena accepts (docs/architecture.md §6): copy kernels use
  // 16-byte vectors, and 256 keeps every slot on its own cache lines and in
  // line with cudaMalloc's guarantee.
  static constexpr uint64_t kMinAlignment = 256;

  struct Options {
    // Names the arena in every error and log line ("send", "recv", ...).
    // Must not be empty.
    std::string name = "arena";
    // Offset and size granularity of slots. A power of two >= kMinAlignment.
    uint64_t alignment = kMinAlignment;
  };

  // Builds an arena over `allocation`, which it takes ownership of. The
  // capacity is the allocation's size rounded down to the alignment.
  //
  // Errors (all kInvalidArgument, naming the arena): allocation is null; the
  // name is empty; the alignment is not a power of two or below
  // kMinAlignment; the allocation's address is not a multiple of the
  // alignment; the allocation is smaller than one alignment unit. On error
  // the allocation is freed.
  static Result<std::unique_ptr<Arena>> Create(Options options,
                                               std::unique_ptr<Allocation> allocation);

  // Closes the arena (see Close) and releases any quarantine entries still
  // held. Slots still alive keep the memory until they are released.
  ~Arena();

  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  // Hands the arena the transport's registration of its region. The arena
  // releases it exactly once, after every slot is gone and the arena is
  // closed, and always before freeing the memory.
  //
  // Errors: kInvalidArgument when `registration` is null; kAlreadyExists when
  // a registration is already attached (a region is registered exactly once);
  // kFailedPrecondition when the arena is closed. On error, `registration`
  // is destroyed (deregistered) before returning.
  Status AttachRegistration(std::unique_ptr<Registration> registration);

  // Reserves `bytes` bytes, waiting up to `timeout` for a hole to appear. A
  // timeout <= 0 tries once without waiting.
  //
  // Errors (each message names the arena):
  //   kInvalidArgument   bytes == 0.
  //   kOutOfRange        bytes > capacity(): it can never fit; returned at
  //                      once, whatever the timeout.
  //   kResourceExhausted backpressure: no hole fitted before the deadline.
  //                      The message gives the requested bytes, the free
  //                      bytes, the largest hole and the timeout.
  //   kAborted           the arena is closed, or was closed while waiting
  //                      (Close wakes waiters, which return promptly).
  Result<Slot> Reserve(uint64_t bytes, std::chrono::nanoseconds timeout);

  // Fan-in: reserves ONE slot holding one sub-slot per entry of `sub_sizes`,
  // sub-slot i of exactly sub_sizes[i] bytes, each starting at an aligned
  // offset right after the previous one (padding only up to the alignment).
  // All-or-nothing: either every writer gets its piece or none does.
  //
  // Errors: as Reserve, plus kInvalidArgument when sub_sizes is empty or
  // holds a 0; kOutOfRange when the aligned pieces together exceed
  // capacity().
  Result<Slot> Reserve(std::span<const uint64_t> sub_sizes, std::chrono::nanoseconds timeout);

  // Reserve without waiting (timeout 0).
  Result<Slot> TryReserve(uint64_t bytes);
  Result<Slot> TryReserve(std::span<const uint64_t> sub_sizes);

  // Moves the slot's range into quarantine: it stays outstanding and is
  // never handed out again until ReleaseQuarantined(token). On success the
  // slot is left empty. Allowed after Close() (quarantine is how a shutdown
  // keeps memory a remote may still write).
  //
  // Errors: kInvalidArgument when the slot is empty or was issued by another
  // arena; the slot is then left untouched (still owned by the caller).
  Result<QuarantineToken> Quarantine(Slot&& slot);

  // Frees a quarantined range (as releasing its slot would have).
  // Errors: kNotFound for a token this arena did not issue or already
  // released.
  Status ReleaseQuarantined(QuarantineToken token);

  // Refuses new reservations and wakes every waiter (they fail with
  // kAborted). Releases the registration, then the memory, right away when
  // nothing is outstanding; otherwise that happens when the last slot or
  // quarantine entry is released. Idempotent.
  //
  // Returns the bytes still outstanding (reserved + quarantined) at this
  // moment; 0 after an orderly shutdown.
  uint64_t Close();

  // Observers. Each takes the arena lock; the value may be stale as soon as
  // it returns when other threads use the arena.
  std::string_view name() const;
  uint64_t alignment() const;
  // The usable bytes: the allocation's size rounded down to alignment().
  uint64_t capacity() const;
  // The region's first byte, and its kind (for a transport to register it).
  Addr base_address() const;
  MemoryKind memory_kind() const;
  // Bytes held by live slots plus quarantined bytes, in reserved (aligned)
  // bytes. capacity() == free_bytes() + outstanding_bytes().
  uint64_t outstanding_bytes() const;
  // The most outstanding_bytes() has been since Create.
  uint64_t peak_outstanding_bytes() const;
  uint64_t quarantined_bytes() const;
  size_t quarantined_count() const;
  uint64_t free_bytes() const;
  // The size of the biggest hole: the largest request that would succeed
  // now. 0 when full.
  uint64_t largest_hole() const;
  bool closed() const;
  // Reservers currently blocked waiting for space.
  size_t num_waiters() const;
  // True once the registration and the memory have been released.
  bool memory_released() const;

  // For tests: checks the allocator state. Holes are sorted, aligned,
  // non-empty, non-overlapping and coalesced (no two adjacent); holes and
  // outstanding ranges (live slots and quarantine) tile [0, capacity())
  // exactly, so no two of them overlap; the byte counters agree with the
  // ranges. Returns kInternal naming the first violation.
  Status CheckInvariants() const;

 private:
  explicit Arena(std::shared_ptr<memory_internal::ArenaCore> core);

  // Shared with every Slot issued, so the memory outlives the last of them.
  std::shared_ptr<memory_internal::ArenaCore> core_;
};

}  // namespace kvbounce

#endif  // KVBOUNCE_MEMORY_ARENA_H_
