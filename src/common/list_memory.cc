#include "common/list_memory.h"

#include <sanitizer/asan_interface.h>

#include <bit>

namespace kvbounce {

ListMemory& ListMemory::Global() {
  static ListMemory* const global = new ListMemory(kDefaultCapacityBytes);
  return *global;
}

size_t ListMemory::ClassBytes(size_t bytes) {
  if (bytes < kMinCachedBytes || bytes > kMaxCachedBytes) return 0;
  return std::bit_ceil(bytes);
}

int ListMemory::ClassIndex(size_t class_bytes) { return std::countr_zero(class_bytes) - kMinShift; }

void* ListMemory::Allocate(size_t bytes) {
  const size_t class_bytes = ClassBytes(bytes);
  if (class_bytes == 0) return ::operator new(bytes);
  {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<void*>& list = free_[static_cast<size_t>(ClassIndex(class_bytes))];
    if (!list.empty()) {
      void* p = list.back();
      list.pop_back();
      stats_.held_bytes -= class_bytes;
      ++stats_.reused;
      ASAN_UNPOISON_MEMORY_REGION(p, class_bytes);
      return p;
    }
    ++stats_.fresh;
  }
  return ::operator new(class_bytes);
}

void ListMemory::Deallocate(void* p, size_t bytes) noexcept {
  if (p == nullptr) return;
  const size_t class_bytes = ClassBytes(bytes);
  if (class_bytes != 0) {
    std::lock_guard<std::mutex> lock(mu_);
    if (stats_.held_bytes + class_bytes <= capacity_bytes_) {
      std::vector<void*>& list = free_[static_cast<size_t>(ClassIndex(class_bytes))];
      try {
        list.push_back(p);
        stats_.held_bytes += class_bytes;
        // A kept buffer is freed memory to AddressSanitizer: a list used
        // after its owner freed it is still reported.
        ASAN_POISON_MEMORY_REGION(p, class_bytes);
        return;
      } catch (...) {
        // No room to remember it: it goes back to the system below.
      }
    }
    ++stats_.dropped;
  }
  ::operator delete(p);
}

void ListMemory::Release() noexcept {
  std::array<std::vector<void*>, kMaxShift - kMinShift + 1> free;
  {
    std::lock_guard<std::mutex> lock(mu_);
    free.swap(free_);
    stats_.held_bytes = 0;
  }
  for (size_t i = 0; i < free.size(); ++i) {
    for (void* p : free[i]) {
      ASAN_UNPOISON_MEMORY_REGION(p, kMinCachedBytes << i);
      ::operator delete(p);
    }
  }
}

ListMemory::Stats ListMemory::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace kvbounce
