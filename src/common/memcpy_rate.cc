#include "common/memcpy_rate.h"

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <memory>
#include <new>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace kvbounce {
namespace {

// Evicts [p, p + bytes) from every cache level, so that the copy that
// follows runs from and to memory, as a copy of a pool much larger than the
// caches does. Elsewhere than x86-64 this does nothing (the figure then
// comes out of the caches, optimistic).
void Evict(std::byte* p, size_t bytes) {
#if defined(__x86_64__)
  for (size_t offset = 0; offset < bytes; offset += 64) _mm_clflush(p + offset);
  _mm_mfence();
#else
  (void)p;
  (void)bytes;
#endif
}

double Measure() {
  constexpr size_t kHalf = size_t{2} << 20;
  std::unique_ptr<std::byte[]> buffer(new (std::nothrow) std::byte[2 * kHalf]);
  if (buffer == nullptr) return kFallbackMemcpyBytesPerUs;
  std::byte* src = buffer.get();
  std::byte* dst = buffer.get() + kHalf;
  // Touch every page first: the page faults are not the copy's cost.
  std::memset(src, 0x5a, 2 * kHalf);
  double best = 0;
  for (int i = 0; i < 3; ++i) {
    Evict(src, 2 * kHalf);
    const auto start = std::chrono::steady_clock::now();
    std::memcpy(dst, src, kHalf);
    const auto end = std::chrono::steady_clock::now();
    // Keep the copy from being optimized away.
    src[static_cast<size_t>(i)] = dst[kHalf - 1 - static_cast<size_t>(i)];
    const double us = std::chrono::duration<double, std::micro>(end - start).count();
    if (us > 0) best = std::max(best, static_cast<double>(kHalf) / us);
  }
  return best > 0 ? best : kFallbackMemcpyBytesPerUs;
}

}  // namespace

double MemcpyBytesPerUs() {
  static const double rate = Measure();
  return rate;
}

}  // namespace kvbounce
