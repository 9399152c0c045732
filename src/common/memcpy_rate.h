// The host's memcpy rate, measured once per process: the figure the CPU copy
// engine and the loopback transport state as their byte rate (copy_engine.h
// CopyCost, transport.h TransportCost), which `auto` compares the paths with
// (docs/paths.md).
//
// The first call allocates 4 MiB, touches it, and copies 2 MiB three times on
// the calling thread, each time after evicting both buffers from the caches
// (x86-64: clflush), so that the figure is that of memory, as for a pool far
// larger than the caches (on the development machine it matches a 64 MiB
// copy, ~22 GB/s, where a cached copy shows 40-60 GB/s); it keeps the
// fastest copy's rate. About 2 ms, once. Later calls return that figure. On
// a loaded machine the figure may come out low; Config::copy_mb_per_s
// overrides it where a reproducible choice matters.
//
// Thread safety: thread-safe; concurrent first calls measure once.
#ifndef KVBOUNCE_COMMON_MEMCPY_RATE_H_
#define KVBOUNCE_COMMON_MEMCPY_RATE_H_

namespace kvbounce {

// Bytes per microsecond (= MB/s) of one thread's memcpy of a few MiB; > 0.
// When the buffer cannot be allocated, kFallbackMemcpyBytesPerUs.
double MemcpyBytesPerUs();

// What MemcpyBytesPerUs reports when it cannot measure (10 GB/s, a
// conservative figure for one thread of a current server).
inline constexpr double kFallbackMemcpyBytesPerUs = 10000;

}  // namespace kvbounce

#endif  // KVBOUNCE_COMMON_MEMCPY_RATE_H_
