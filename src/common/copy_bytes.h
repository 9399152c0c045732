// CopyBytes: the host copy of every CPU data path (the CPU copy engine's
// gathers, scatters and direct copies, the loopback transport's writes and
// reads): memcpy, except where memcpy is several times slower than it should
// be.
//
// glibc's memcpy on x86-64 copies forward in vectors, storing a few vectors
// before it loads the next. When the destination lies just above the source
// modulo 4 KiB — (dst - src) mod 4096 in [1, 63] — each load's address
// matches, in the 12 bits the CPU compares, a store still in flight
// ("4K aliasing"), and the load waits for it. On the development machine a
// copy of 4 KiB pieces from a page-aligned buffer into one 16 bytes past a
// page boundary ran at 2.6 GB/s on one thread against 9-12 GB/s for every
// other offset (docs/PERFORMANCE.md, 2026-12-03). That is exactly a bounce
// scatter from a page-aligned arena slot into a pool from malloc (16 bytes
// past a page: numpy arrays, plain new[]). Copied backwards, the loads move
// away from the pending stores: such a copy runs at ~7-8 GB/s on one thread.
//
// Overlapping ranges are not allowed (as for memcpy).
//
// Thread safety: a pure function of its arguments.
#ifndef KVBOUNCE_COMMON_COPY_BYTES_H_
#define KVBOUNCE_COMMON_COPY_BYTES_H_

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace kvbounce {

// Whether a forward copy from `src` to `dst` of `bytes` falls into the 4K
// aliasing case (and is long enough for it to matter).
inline bool AliasesForward(const void* dst, const void* src, size_t bytes) {
  constexpr size_t kMinBytes = 256;
  const uintptr_t distance =
      (reinterpret_cast<uintptr_t>(dst) - reinterpret_cast<uintptr_t>(src)) & 4095;
  return bytes >= kMinBytes && distance != 0 && distance < 64;
}

// Copies `bytes` bytes from `src` to `dst` (non-overlapping).
inline void CopyBytes(void* dst, const void* src, size_t bytes) {
#if defined(__SSE2__)
  if (AliasesForward(dst, src, bytes)) {
    auto* d = static_cast<unsigned char*>(dst);
    const auto* s = static_cast<const unsigned char*>(src);
    size_t i = bytes;
    while (i >= 64) {
      i -= 64;
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 48));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 32));
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 16));
      const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i + 48), a);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i + 32), b);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i + 16), c);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), e);
    }
    if (i > 0) std::memcpy(d, s, i);
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

}  // namespace kvbounce

#endif  // KVBOUNCE_COMMON_COPY_BYTES_H_
