// Happens-before edges that ThreadSanitizer cannot see by itself.
//
// UCX's shared-memory transports hand a message from one thread to another
// through a queue in shared memory, synchronized inside UCX, which is not
// instrumented. Where kvbounce relies on such a message for ordering (a
// flush's answer means "the data before it landed"), the sender calls
// TsanRelease and the receiver TsanAcquire on the same address, so that a ThreadSanitizer build
// sees the order the hardware already gives. Outside such a build both are no-ops.
#ifndef KVBOUNCE_COMMON_TSAN_H_
#define KVBOUNCE_COMMON_TSAN_H_

#if defined(__SANITIZE_THREAD__)
#define KVBOUNCE_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define KVBOUNCE_TSAN 1
#endif
#endif

#if defined(KVBOUNCE_TSAN)
#include <sanitizer/tsan_interface.h>
#endif

namespace kvbounce {

#if defined(KVBOUNCE_TSAN)
inline void TsanRelease(void* address) { __tsan_release(address); }
inline void TsanAcquire(void* address) { __tsan_acquire(address); }
#else
inline void TsanRelease(void* /*address*/) {}
inline void TsanAcquire(void* /*address*/) {}
#endif

}  // namespace kvbounce

#endif  // KVBOUNCE_COMMON_TSAN_H_
