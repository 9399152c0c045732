// Overflow-safe arithmetic for sizes, counts and durations that come from the
// API edge (STYLE: "overflow-safe arithmetic at the API edge"). Each helper
// returns the exact result, or nullopt when it is not representable in the
// result type, so a caller turns "too large" into an error naming the field
// instead of wrapping around or invoking undefined behaviour.
//
// Thread safety: pure functions.
#ifndef KVBOUNCE_COMMON_CHECKED_MATH_H_
#define KVBOUNCE_COMMON_CHECKED_MATH_H_

#include <chrono>
#include <concepts>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>

namespace kvbounce {

// a + b, a - b, a * b in T, or nullopt on overflow.
template <std::integral T>
constexpr std::optional<T> CheckedAdd(T a, T b) {
  T out;
  if (__builtin_add_overflow(a, b, &out)) return std::nullopt;
  return out;
}
template <std::integral T>
constexpr std::optional<T> CheckedSub(T a, T b) {
  T out;
  if (__builtin_sub_overflow(a, b, &out)) return std::nullopt;
  return out;
}
template <std::integral T>
constexpr std::optional<T> CheckedMul(T a, T b) {
  T out;
  if (__builtin_mul_overflow(a, b, &out)) return std::nullopt;
  return out;
}

// ceil(a / b) for a >= 0 and b > 0, without forming a + b - 1 (which
// overflows near the type's maximum). nullopt for a < 0 or b <= 0.
template <std::integral T>
constexpr std::optional<T> CheckedCeilDiv(T a, T b) {
  if constexpr (std::is_signed_v<T>) {
    if (a < 0 || b < 0) return std::nullopt;
  }
  if (b == 0) return std::nullopt;
  return static_cast<T>(a / b + (a % b != 0 ? 1 : 0));
}

// `value` converted to To, or nullopt when it does not fit.
template <std::integral To, std::integral From>
constexpr std::optional<To> CheckedCast(From value) {
  if (!std::in_range<To>(value)) return std::nullopt;
  return static_cast<To>(value);
}

// `now + timeout` on a clock whose duration may be finer than `timeout`'s
// (steady_clock counts nanoseconds in 64 bits: ~292 years), or nullopt when
// the sum or the conversion would overflow. REQUIRES: timeout >= 0.
template <typename Clock, typename Rep, typename Period>
std::optional<typename Clock::time_point> CheckedDeadline(
    typename Clock::time_point now, std::chrono::duration<Rep, Period> timeout) {
  using Dur = typename Clock::duration;
  if (timeout.count() < 0) return std::nullopt;
  // The largest timeout representable in the clock's duration, in the
  // caller's unit (rounded down), compared before converting.
  const auto room = Clock::time_point::max() - now;
  if (timeout > std::chrono::duration_cast<std::chrono::duration<Rep, Period>>(room)) {
    return std::nullopt;
  }
  const Dur converted = std::chrono::duration_cast<Dur>(timeout);
  if (converted > room) return std::nullopt;
  return now + converted;
}

}  // namespace kvbounce

#endif  // KVBOUNCE_COMMON_CHECKED_MATH_H_
