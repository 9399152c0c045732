#include "memory/arena.h"

#include <algorithm>
#include <cassert>
#include <condition_variable>
#include <iterator>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>

#include "kvbounce/logging.h"

// Clang's thread-safety analysis (-Wthread-safety) checks that the allocator
// state is only touched under the lock. The attributes are no-ops elsewhere.
#if defined(__clang__)
#define KVB_TSA_(x) __attribute__((x))
#else
#define KVB_TSA_(x)
#endif
#define KVB_CAPABILITY(x) KVB_TSA_(capability(x))
#define KVB_SCOPED_CAPABILITY KVB_TSA_(scoped_lockable)
#define KVB_GUARDED_BY(x) KVB_TSA_(guarded_by(x))
#define KVB_REQUIRES(...) KVB_TSA_(requires_capability(__VA_ARGS__))
#define KVB_EXCLUDES(...) KVB_TSA_(locks_excluded(__VA_ARGS__))
#define KVB_ACQUIRE(...) KVB_TSA_(acquire_capability(__VA_ARGS__))
#define KVB_RELEASE(...) KVB_TSA_(release_capability(__VA_ARGS__))

namespace kvbounce {
namespace memory_internal {
namespace {

using Clock = std::chrono::steady_clock;

// std::mutex carries no capability attributes in libstdc++; this thin wrapper
// does, and exposes condition waits that keep the analysis informed.
class KVB_CAPABILITY("mutex") Mutex {
 public:
  void Lock() KVB_ACQUIRE() { mu_.lock(); }
  void Unlock() KVB_RELEASE() { mu_.unlock(); }

  // Waits on `cv` (releasing and re-acquiring the lock) until notified or
  // `deadline`; spurious wake-ups are the caller's to handle.
  void WaitUntil(std::condition_variable& cv, Clock::time_point deadline) KVB_REQUIRES(this) {
    std::unique_lock<std::mutex> lock(mu_, std::adopt_lock);
    if (deadline == Clock::time_point::max()) {
      cv.wait(lock);
    } else {
      cv.wait_until(lock, deadline);
    }
    lock.release();  // still held: ownership stays with the caller
  }

 private:
  std::mutex mu_;
};

class KVB_SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex& mu) KVB_ACQUIRE(mu) : mu_(mu) { mu_.Lock(); }
  ~MutexLock() KVB_RELEASE() { mu_.Unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex& mu_;
};

bool IsPowerOfTwo(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

// now + timeout, saturating instead of overflowing for huge timeouts.
Clock::time_point DeadlineAfter(Clock::time_point now, std::chrono::nanoseconds timeout) {
  const auto room = Clock::time_point::max() - now;
  if (timeout >= std::chrono::duration_cast<std::chrono::nanoseconds>(room)) {
    return Clock::time_point::max();
  }
  return now + std::chrono::duration_cast<Clock::duration>(timeout);
}

std::string FormatTimeout(std::chrono::nanoseconds timeout) {
  using std::chrono::duration_cast;
  if (timeout.count() <= 0) return "0ms (no wait)";
  if (timeout < std::chrono::milliseconds(1)) return std::to_string(timeout.count()) + "ns";
  return std::to_string(duration_cast<std::chrono::milliseconds>(timeout).count()) + "ms";
}

}  // namespace

// Everything the arena shares with its slots. Lives until the Arena object
// and every Slot are gone; the memory inside it may be released earlier
// (closed, nothing outstanding).
class ArenaCore : public std::enable_shared_from_this<ArenaCore> {
 public:
  ArenaCore(std::string name, uint64_t alignment, uint64_t capacity,
            std::unique_ptr<Allocation> allocation)
      : name_(std::move(name)),
        alignment_(alignment),
        capacity_(capacity),
        base_(allocation->address()),
        host_base_(allocation->host_pointer()),
        kind_(allocation->kind()),
        allocation_(std::move(allocation)) {
    holes_.emplace(0, capacity_);
  }

  // Normally everything was released at Close() or by the last slot; this
  // covers a core whose arena was never closed. Registration goes first.
  ~ArenaCore() {
    registration_.reset();
    allocation_.reset();
  }

  // The registration and the memory, released in that order when this goes
  // out of scope. Declared before a MutexLock so that it is destroyed after
  // the lock is dropped: releasing calls out, and must not hold the lock.
  struct Doomed {
    std::unique_ptr<Registration> registration;
    std::unique_ptr<Allocation> allocation;
    Doomed() = default;
    Doomed(const Doomed&) = delete;
    Doomed& operator=(const Doomed&) = delete;
    ~Doomed() {
      registration.reset();
      allocation.reset();
    }
  };

  const std::string& name() const { return name_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t capacity() const { return capacity_; }
  Addr base() const { return base_; }
  MemoryKind kind() const { return kind_; }

  std::string Prefix() const { return "arena '" + name_ + "': "; }

  Status AttachRegistration(std::unique_ptr<Registration> registration) KVB_EXCLUDES(mu_) {
    // On every error path `registration` dies at return, after the lock.
    if (registration == nullptr) {
      return InvalidArgumentError(Prefix() + "registration is null");
    }
    // Describe() is transport code: call it before taking the lock.
    std::string description(registration->Describe());
    MutexLock lock(mu_);
    if (closed_) {
      return FailedPreconditionError(Prefix() + "cannot attach registration '" + description +
                                     "': arena closed");
    }
    if (registration_ != nullptr) {
      return AlreadyExistsError(Prefix() + "cannot attach registration '" + description +
                                "': already registered as '" + registration_description_ + "'");
    }
    registration_ = std::move(registration);
    registration_description_ = std::move(description);
    return Status::Ok();
  }

  // `subs` empty: a plain slot of `extent` bytes. Otherwise the fan-in
  // pieces, relative to the slot's offset, ending at `extent`.
  Result<Slot> Reserve(uint64_t extent, std::vector<Slot::SubRange> subs,
                       std::chrono::nanoseconds timeout) KVB_EXCLUDES(mu_) {
    const uint64_t need = AlignUp(extent, alignment_);  // extent <= capacity_: no wrap
    const Clock::time_point deadline = DeadlineAfter(Clock::now(), timeout);
    MutexLock lock(mu_);
    while (true) {
      if (closed_) return AbortedError(Prefix() + "arena closed");
      if (std::optional<uint64_t> offset = AllocateLocked(need)) {
        Slot slot;
        slot.core_ = shared_from_this();
        slot.offset_ = *offset;
        slot.size_ = extent;
        slot.reserved_ = need;
        slot.base_ = base_;
        slot.host_base_ = host_base_;
        slot.subs_ = std::move(subs);
        return slot;
      }
      if (timeout.count() <= 0 || Clock::now() >= deadline) {
        return ResourceExhaustedError(
            Prefix() + "backpressure: no hole for " + std::to_string(extent) + " bytes (" +
            std::to_string(need) + " aligned) within " + FormatTimeout(timeout) + "; free " +
            std::to_string(capacity_ - outstanding_) + " of " + std::to_string(capacity_) +
            " bytes, largest hole " + std::to_string(LargestHoleLocked()) + " bytes");
      }
      ++waiters_;
      mu_.WaitUntil(cv_, deadline);
      --waiters_;
    }
  }

  // Returns a live slot's range.
  void Free(uint64_t offset) KVB_EXCLUDES(mu_) {
    Doomed doomed;
    std::string error;
    {
      MutexLock lock(mu_);
      auto it = allocated_.find(offset);
      if (it == allocated_.end() || it->second.quarantined) {
        // A Slot releases once by construction; reaching this is a bug.
        error = Prefix() + "release of unknown range at offset " + std::to_string(offset);
      } else {
        const uint64_t bytes = it->second.bytes;
        allocated_.erase(it);
        InsertHoleLocked(offset, bytes);
        outstanding_ -= bytes;
        cv_.notify_all();
        TakeMemoryIfDoneLocked(doomed);
      }
    }
    if (!error.empty()) Log(LogLevel::kError, error);
  }

  Result<QuarantineToken> Quarantine(const Slot& slot) KVB_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    auto it = allocated_.find(slot.offset_);
    if (it == allocated_.end() || it->second.quarantined) {
      return InternalError(Prefix() + "quarantine of unknown range at offset " +
                           std::to_string(slot.offset_));
    }
    it->second.quarantined = true;
    quarantined_ += it->second.bytes;
    const QuarantineToken token = next_token_++;
    quarantine_.emplace(token, slot.offset_);
    return token;
  }

  Status ReleaseQuarantined(QuarantineToken token) KVB_EXCLUDES(mu_) {
    Doomed doomed;
    MutexLock lock(mu_);
    auto q = quarantine_.find(token);
    if (q == quarantine_.end()) {
      return NotFoundError(Prefix() + "no quarantine entry " + std::to_string(token));
    }
    ReleaseQuarantineEntryLocked(q->second);
    quarantine_.erase(q);
    TakeMemoryIfDoneLocked(doomed);
    return Status::Ok();
  }

  uint64_t Close() KVB_EXCLUDES(mu_) {
    Doomed doomed;
    MutexLock lock(mu_);
    if (!closed_) {
      closed_ = true;
      cv_.notify_all();
    }
    TakeMemoryIfDoneLocked(doomed);
    return outstanding_;
  }

  // Close, then drop every quarantine entry (nobody can redeem them once the
  // Arena object is gone). Returns {bytes dropped from quarantine, bytes
  // still held by live slots}.
  std::pair<uint64_t, uint64_t> Shutdown() KVB_EXCLUDES(mu_) {
    Doomed doomed;
    MutexLock lock(mu_);
    if (!closed_) {
      closed_ = true;
      cv_.notify_all();
    }
    const uint64_t dropped = quarantined_;
    for (const auto& [token, offset] : quarantine_) ReleaseQuarantineEntryLocked(offset);
    quarantine_.clear();
    TakeMemoryIfDoneLocked(doomed);
    return {dropped, outstanding_};
  }

  uint64_t outstanding_bytes() const KVB_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    return outstanding_;
  }
  uint64_t quarantined_bytes() const KVB_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    return quarantined_;
  }
  uint64_t peak_outstanding_bytes() const KVB_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    return peak_outstanding_;
  }
  size_t quarantined_count() const KVB_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    return quarantine_.size();
  }
  uint64_t largest_hole() const KVB_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    return LargestHoleLocked();
  }
  bool closed() const KVB_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    return closed_;
  }
  size_t num_waiters() const KVB_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    return waiters_;
  }
  bool memory_released() const KVB_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    return memory_released_;
  }

  Status CheckInvariants() const KVB_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    const std::string p = Prefix() + "invariant violated: ";
    uint64_t hole_bytes = 0;
    uint64_t prev_hole_end = 0;
    bool first = true;
    for (const auto& [offset, bytes] : holes_) {
      if (bytes == 0 || offset % alignment_ != 0 || bytes % alignment_ != 0) {
        return InternalError(p + "hole at " + std::to_string(offset) + " of " +
                             std::to_string(bytes) + " bytes is empty or unaligned");
      }
      if (offset > capacity_ || bytes > capacity_ - offset) {
        return InternalError(p + "hole at " + std::to_string(offset) + " ends past capacity");
      }
      if (!first && offset <= prev_hole_end) {
        return InternalError(p + "hole at " + std::to_string(offset) +
                             (offset == prev_hole_end ? " is not coalesced with" : " overlaps") +
                             " the previous hole");
      }
      first = false;
      prev_hole_end = offset + bytes;
      hole_bytes += bytes;
    }
    uint64_t held = 0;
    uint64_t held_quarantined = 0;
    size_t quarantined_ranges = 0;
    for (const auto& [offset, range] : allocated_) {
      if (range.bytes == 0 || offset % alignment_ != 0 || range.bytes % alignment_ != 0) {
        return InternalError(p + "range at " + std::to_string(offset) + " is empty or unaligned");
      }
      held += range.bytes;
      if (range.quarantined) {
        held_quarantined += range.bytes;
        ++quarantined_ranges;
      }
    }
    // Holes and held ranges, merged in offset order, must tile the region.
    uint64_t cursor = 0;
    auto h = holes_.begin();
    auto a = allocated_.begin();
    while (h != holes_.end() || a != allocated_.end()) {
      const bool take_hole = a == allocated_.end() || (h != holes_.end() && h->first < a->first);
      const uint64_t offset = take_hole ? h->first : a->first;
      const uint64_t bytes = take_hole ? h->second : a->second.bytes;
      if (offset != cursor) {
        return InternalError(p + (offset < cursor ? "overlap" : "gap") + " at offset " +
                             std::to_string(std::min(offset, cursor)));
      }
      cursor = offset + bytes;
      if (take_hole) {
        ++h;
      } else {
        ++a;
      }
    }
    if (cursor != capacity_) {
      return InternalError(p + "ranges cover " + std::to_string(cursor) + " of " +
                           std::to_string(capacity_) + " bytes");
    }
    if (held != outstanding_ || hole_bytes + outstanding_ != capacity_) {
      return InternalError(p + "counters disagree: outstanding " + std::to_string(outstanding_) +
                           ", held " + std::to_string(held) + ", holes " +
                           std::to_string(hole_bytes) + ", capacity " + std::to_string(capacity_));
    }
    if (held_quarantined != quarantined_ || quarantined_ranges != quarantine_.size()) {
      return InternalError(p + "quarantine disagrees: " + std::to_string(quarantined_) +
                           " bytes counted, " + std::to_string(held_quarantined) + " held");
    }
    for (const auto& [token, offset] : quarantine_) {
      auto it = allocated_.find(offset);
      if (it == allocated_.end() || !it->second.quarantined) {
        return InternalError(p + "quarantine entry " + std::to_string(token) +
                             " has no quarantined range");
      }
    }
    if (memory_released_ && (outstanding_ != 0 || !closed_)) {
      return InternalError(p + "memory released while in use");
    }
    return Status::Ok();
  }

 private:
  struct HeldRange {
    uint64_t bytes;
    bool quarantined;
  };

  // First fit: the lowest hole that holds `need` bytes.
  std::optional<uint64_t> AllocateLocked(uint64_t need) KVB_REQUIRES(mu_) {
    for (auto it = holes_.begin(); it != holes_.end(); ++it) {
      if (it->second < need) continue;
      const uint64_t offset = it->first;
      const uint64_t rest = it->second - need;
      auto next = holes_.erase(it);
      if (rest > 0) holes_.emplace_hint(next, offset + need, rest);
      allocated_.emplace(offset, HeldRange{need, false});
      outstanding_ += need;
      peak_outstanding_ = std::max(peak_outstanding_, outstanding_);
      return offset;
    }
    return std::nullopt;
  }

  // Adds [offset, offset + bytes) to the holes, merging with the neighbours
  // it touches so that holes stay coalesced.
  void InsertHoleLocked(uint64_t offset, uint64_t bytes) KVB_REQUIRES(mu_) {
    auto next = holes_.lower_bound(offset);
    if (next != holes_.begin()) {
      auto prev = std::prev(next);
      if (prev->first + prev->second == offset) {
        offset = prev->first;
        bytes += prev->second;
        holes_.erase(prev);
      }
    }
    if (next != holes_.end() && offset + bytes == next->first) {
      bytes += next->second;
      next = holes_.erase(next);
    }
    holes_.emplace_hint(next, offset, bytes);
  }

  void ReleaseQuarantineEntryLocked(uint64_t offset) KVB_REQUIRES(mu_) {
    auto it = allocated_.find(offset);
    assert(it != allocated_.end() && it->second.quarantined);
    const uint64_t bytes = it->second.bytes;
    allocated_.erase(it);
    InsertHoleLocked(offset, bytes);
    outstanding_ -= bytes;
    quarantined_ -= bytes;
    cv_.notify_all();
  }

  uint64_t LargestHoleLocked() const KVB_REQUIRES(mu_) {
    uint64_t largest = 0;
    for (const auto& [offset, bytes] : holes_) largest = std::max(largest, bytes);
    return largest;
  }

  // Hands the registration and memory to `doomed` once the arena is closed
  // and nothing is outstanding; exactly once, since they are moved out.
  void TakeMemoryIfDoneLocked(Doomed& doomed) KVB_REQUIRES(mu_) {
    if (!closed_ || outstanding_ != 0 || memory_released_) return;
    memory_released_ = true;
    doomed.registration = std::move(registration_);
    doomed.allocation = std::move(allocation_);
  }

  // Immutable after construction.
  const std::string name_;
  const uint64_t alignment_;
  const uint64_t capacity_;
  const Addr base_;
  void* const host_base_;
  const MemoryKind kind_;

  mutable Mutex mu_;
  std::condition_variable cv_;  // signalled when space frees up or on Close
  std::unique_ptr<Allocation> allocation_ KVB_GUARDED_BY(mu_);
  std::unique_ptr<Registration> registration_ KVB_GUARDED_BY(mu_);
  std::string registration_description_ KVB_GUARDED_BY(mu_);
  std::map<uint64_t, uint64_t> holes_ KVB_GUARDED_BY(mu_);                        // offset -> bytes
  std::map<uint64_t, HeldRange> allocated_ KVB_GUARDED_BY(mu_);                   // offset -> range
  std::unordered_map<QuarantineToken, uint64_t> quarantine_ KVB_GUARDED_BY(mu_);  // -> offset
  uint64_t outstanding_ KVB_GUARDED_BY(mu_) = 0;
  uint64_t peak_outstanding_ KVB_GUARDED_BY(mu_) = 0;
  uint64_t quarantined_ KVB_GUARDED_BY(mu_) = 0;
  QuarantineToken next_token_ KVB_GUARDED_BY(mu_) = 1;
  size_t waiters_ KVB_GUARDED_BY(mu_) = 0;
  bool closed_ KVB_GUARDED_BY(mu_) = false;
  bool memory_released_ KVB_GUARDED_BY(mu_) = false;
};

}  // namespace memory_internal

// ---------------------------------------------------------------------------
// Slot

Slot::Slot(Slot&& other) noexcept
    : core_(std::move(other.core_)),
      offset_(other.offset_),
      size_(other.size_),
      reserved_(other.reserved_),
      base_(other.base_),
      host_base_(other.host_base_),
      subs_(std::move(other.subs_)) {
  other.Clear();
}

Slot& Slot::operator=(Slot&& other) noexcept {
  if (this != &other) {
    Release();
    core_ = std::move(other.core_);
    offset_ = other.offset_;
    size_ = other.size_;
    reserved_ = other.reserved_;
    base_ = other.base_;
    host_base_ = other.host_base_;
    subs_ = std::move(other.subs_);
    other.Clear();
  }
  return *this;
}

void* Slot::host_pointer() const {
  if (host_base_ == nullptr) return nullptr;
  return static_cast<std::byte*>(host_base_) + offset_;
}

SubSlot Slot::sub_slot(size_t i) const {
  assert(i < num_sub_slots());
  const SubRange range = subs_.empty() ? SubRange{0, size_} : subs_[i];
  SubSlot sub;
  sub.offset = offset_ + range.offset;
  sub.size = range.size;
  sub.address = base_ + sub.offset;
  sub.host_pointer =
      host_base_ == nullptr ? nullptr : static_cast<std::byte*>(host_base_) + sub.offset;
  return sub;
}

void Slot::Release() {
  if (core_ == nullptr) return;
  // Keep the core alive across Free even if this slot held the last ref.
  std::shared_ptr<memory_internal::ArenaCore> core = std::move(core_);
  const uint64_t offset = offset_;
  Clear();
  core->Free(offset);
}

void Slot::Clear() {
  core_.reset();
  offset_ = 0;
  size_ = 0;
  reserved_ = 0;
  base_ = Addr();
  host_base_ = nullptr;
  subs_.clear();
}

// ---------------------------------------------------------------------------
// Arena

Result<std::unique_ptr<Arena>> Arena::Create(Options options,
                                             std::unique_ptr<Allocation> allocation) {
  if (options.name.empty()) {
    return InvalidArgumentError("arena: name must not be empty");
  }
  const std::string prefix = "arena '" + options.name + "': ";
  if (allocation == nullptr) {
    return InvalidArgumentError(prefix + "allocation is null");
  }
  if (!memory_internal::IsPowerOfTwo(options.alignment) || options.alignment < kMinAlignment) {
    return InvalidArgumentError(prefix + "alignment " + std::to_string(options.alignment) +
                                " must be a power of two >= " + std::to_string(kMinAlignment));
  }
  if (allocation->address().value() % options.alignment != 0) {
    return InvalidArgumentError(
        prefix + "allocation address " + std::to_string(allocation->address().value()) +
        " is not a multiple of the alignment " + std::to_string(options.alignment));
  }
  const uint64_t capacity = allocation->size() / options.alignment * options.alignment;
  if (capacity == 0) {
    return InvalidArgumentError(prefix + "allocation of " + std::to_string(allocation->size()) +
                                " bytes is smaller than the alignment " +
                                std::to_string(options.alignment));
  }
  auto core = std::make_shared<memory_internal::ArenaCore>(
      std::move(options.name), options.alignment, capacity, std::move(allocation));
  return std::unique_ptr<Arena>(new Arena(std::move(core)));
}

Arena::Arena(std::shared_ptr<memory_internal::ArenaCore> core) : core_(std::move(core)) {}

Arena::~Arena() {
  const auto [dropped, held] = core_->Shutdown();
  if (dropped > 0) {
    Log(LogLevel::kWarning, core_->Prefix() + "destroyed with " + std::to_string(dropped) +
                                " bytes in quarantine; released them");
  }
  if (held > 0) {
    Log(LogLevel::kWarning, core_->Prefix() + "destroyed with " + std::to_string(held) +
                                " bytes held by live slots; memory is freed when the last "
                                "of them is released");
  }
}

Status Arena::AttachRegistration(std::unique_ptr<Registration> registration) {
  return core_->AttachRegistration(std::move(registration));
}

Result<Slot> Arena::Reserve(uint64_t bytes, std::chrono::nanoseconds timeout) {
  if (bytes == 0) {
    return InvalidArgumentError(core_->Prefix() + "cannot reserve 0 bytes");
  }
  if (bytes > core_->capacity()) {
    return OutOfRangeError(core_->Prefix() + "request of " + std::to_string(bytes) +
                           " bytes can never fit in the capacity of " +
                           std::to_string(core_->capacity()) + " bytes");
  }
  return core_->Reserve(bytes, {}, timeout);
}

Result<Slot> Arena::Reserve(std::span<const uint64_t> sub_sizes, std::chrono::nanoseconds timeout) {
  if (sub_sizes.empty()) {
    return InvalidArgumentError(core_->Prefix() + "fan-in reservation with no sub-slots");
  }
  const uint64_t capacity = core_->capacity();
  const uint64_t alignment = core_->alignment();
  std::vector<Slot::SubRange> subs;
  subs.reserve(sub_sizes.size());
  uint64_t cursor = 0;  // aligned end of the pieces so far; <= capacity
  uint64_t extent = 0;
  uint64_t requested = 0;
  bool fits = true;
  for (size_t i = 0; i < sub_sizes.size(); ++i) {
    const uint64_t size = sub_sizes[i];
    if (size == 0) {
      return InvalidArgumentError(core_->Prefix() + "sub-slot " + std::to_string(i) +
                                  " of a fan-in reservation has 0 bytes");
    }
    // Saturate the total only for the message; fit is decided below.
    requested = size > std::numeric_limits<uint64_t>::max() - requested
                    ? std::numeric_limits<uint64_t>::max()
                    : requested + size;
    if (!fits || size > capacity - cursor) {
      fits = false;
      continue;
    }
    subs.push_back({cursor, size});
    extent = cursor + size;
    cursor += AlignUp(size, alignment);  // <= capacity: capacity is aligned
  }
  if (!fits) {
    return OutOfRangeError(
        core_->Prefix() + "fan-in request of " + std::to_string(sub_sizes.size()) + " sub-slots (" +
        std::to_string(requested) + " bytes before alignment) can never fit in the capacity of " +
        std::to_string(capacity) + " bytes");
  }
  return core_->Reserve(extent, std::move(subs), timeout);
}

Result<Slot> Arena::TryReserve(uint64_t bytes) {
  return Reserve(bytes, std::chrono::nanoseconds::zero());
}

Result<Slot> Arena::TryReserve(std::span<const uint64_t> sub_sizes) {
  return Reserve(sub_sizes, std::chrono::nanoseconds::zero());
}

Result<QuarantineToken> Arena::Quarantine(Slot&& slot) {
  if (!slot.valid()) {
    return InvalidArgumentError(core_->Prefix() + "cannot quarantine an empty slot");
  }
  if (slot.core_ != core_) {
    return InvalidArgumentError(core_->Prefix() + "cannot quarantine a slot of another arena");
  }
  KVB_ASSIGN_OR_RETURN(QuarantineToken token, core_->Quarantine(slot));
  // The range now belongs to the quarantine entry: empty the slot without
  // returning it.
  slot.Clear();
  return token;
}

Status Arena::ReleaseQuarantined(QuarantineToken token) { return core_->ReleaseQuarantined(token); }

uint64_t Arena::Close() { return core_->Close(); }

std::string_view Arena::name() const { return core_->name(); }
uint64_t Arena::alignment() const { return core_->alignment(); }
uint64_t Arena::capacity() const { return core_->capacity(); }
Addr Arena::base_address() const { return core_->base(); }
MemoryKind Arena::memory_kind() const { return core_->kind(); }
uint64_t Arena::outstanding_bytes() const { return core_->outstanding_bytes(); }
uint64_t Arena::quarantined_bytes() const { return core_->quarantined_bytes(); }
uint64_t Arena::peak_outstanding_bytes() const { return core_->peak_outstanding_bytes(); }
size_t Arena::quarantined_count() const { return core_->quarantined_count(); }
uint64_t Arena::free_bytes() const { return core_->capacity() - core_->outstanding_bytes(); }
uint64_t Arena::largest_hole() const { return core_->largest_hole(); }
bool Arena::closed() const { return core_->closed(); }
size_t Arena::num_waiters() const { return core_->num_waiters(); }
bool Arena::memory_released() const { return core_->memory_released(); }
Status Arena::CheckInvariants() const { return core_->CheckInvariants(); }

}  // namespace kvbounce
