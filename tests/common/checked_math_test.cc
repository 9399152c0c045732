// Property tests of the overflow-safe arithmetic the API edge relies on: at
// the limits of each type, and against a 128-bit oracle on random operands.
#include "common/checked_math.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>
#include <cmath>

namespace kvbounce {
namespace {

// The oracle: wide enough for any sum or difference of 64-bit values and for
// any product of two signed ones; an unsigned product uses the unsigned type.
__extension__ typedef __int128 i128;
__extension__ typedef unsigned __int128 u128;

template <typename T>
bool Fits(i128 v) {
  return v >= static_cast<i128>(std::numeric_limits<T>::min()) &&
         v <= static_cast<i128>(std::numeric_limits<T>::max());
}

template <typename T>
void CheckAgainstOracle(T a, T b) {
  const i128 sum = static_cast<i128>(a) + b;
  const i128 diff = static_cast<i128>(a) - b;
  bool prod_fits = false;
  i128 prod = 0;
  if constexpr (std::numeric_limits<T>::is_signed) {
    prod = static_cast<i128>(a) * b;
    prod_fits = Fits<T>(prod);
  } else {
    const u128 p = static_cast<u128>(a) * b;
    prod_fits = p <= std::numeric_limits<T>::max();
    prod = prod_fits ? static_cast<i128>(p) : 0;
  }
  const auto add = CheckedAdd(a, b);
  const auto sub = CheckedSub(a, b);
  const auto mul = CheckedMul(a, b);
  ASSERT_EQ(add.has_value(), Fits<T>(sum)) << +a << " + " << +b;
  ASSERT_EQ(sub.has_value(), Fits<T>(diff)) << +a << " - " << +b;
  ASSERT_EQ(mul.has_value(), prod_fits) << +a << " * " << +b;
  if (add) {
    ASSERT_TRUE(static_cast<i128>(*add) == sum);
  }
  if (sub) {
    ASSERT_TRUE(static_cast<i128>(*sub) == diff);
  }
  if (mul) {
    ASSERT_TRUE(static_cast<i128>(*mul) == prod);
  }
  if (static_cast<i128>(a) >= 0 && static_cast<i128>(b) > 0) {
    const auto ceil = CheckedCeilDiv(a, b);
    ASSERT_TRUE(ceil.has_value());
    ASSERT_EQ(static_cast<i128>(*ceil), (static_cast<i128>(a) + b - 1) / b) << +a << " / " << +b;
  }
}

// The values where arithmetic goes wrong: 0, ±1, the extremes and their
// neighbours, and the square roots of the extremes.
template <typename T>
std::vector<T> EdgeValues() {
  using L = std::numeric_limits<T>;
  std::vector<T> v = {0, 1, 2, L::max(), static_cast<T>(L::max() - 1),
                      static_cast<T>(L::max() / 2), static_cast<T>(L::max() / 2 + 1)};
  const T root = static_cast<T>(std::sqrt(static_cast<long double>(L::max())));
  v.push_back(root);
  v.push_back(static_cast<T>(root + 1));
  if constexpr (L::is_signed) {
    v.push_back(-1);
    v.push_back(L::min());
    v.push_back(static_cast<T>(L::min() + 1));
    v.push_back(static_cast<T>(-root));
    v.push_back(static_cast<T>(-root - 1));
  }
  return v;
}

template <typename T>
void CheckType() {
  const std::vector<T> edges = EdgeValues<T>();
  for (T a : edges) {
    for (T b : edges) CheckAgainstOracle(a, b);
  }
  std::mt19937_64 rng(0x5eed);
  for (int i = 0; i < 20000; ++i) {
    // Random bit widths, so that both small and huge operands occur.
    const int wa = static_cast<int>(rng() % (8 * sizeof(T)));
    const int wb = static_cast<int>(rng() % (8 * sizeof(T)));
    T a = static_cast<T>(rng() >> (63 - wa));
    T b = static_cast<T>(rng() >> (63 - wb));
    if constexpr (std::numeric_limits<T>::is_signed) {
      if (rng() & 1) a = static_cast<T>(-a);
      if (rng() & 1) b = static_cast<T>(-b);
    }
    CheckAgainstOracle(a, b);
  }
}

TEST(CheckedMathTest, Int32MatchesTheOracle) { CheckType<int32_t>(); }
TEST(CheckedMathTest, Int64MatchesTheOracle) { CheckType<int64_t>(); }
TEST(CheckedMathTest, Uint32MatchesTheOracle) { CheckType<uint32_t>(); }
TEST(CheckedMathTest, Uint64MatchesTheOracle) { CheckType<uint64_t>(); }

TEST(CheckedMathTest, CeilDivNearTheMaximumDoesNotOverflow) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  EXPECT_EQ(CheckedCeilDiv<int64_t>(kMax, 1), kMax);
  EXPECT_EQ(CheckedCeilDiv<int64_t>(kMax, 32), kMax / 32 + 1);
  EXPECT_EQ(CheckedCeilDiv<int64_t>(kMax, kMax), 1);
  EXPECT_EQ(CheckedCeilDiv<int64_t>(0, 7), 0);
  EXPECT_FALSE(CheckedCeilDiv<int64_t>(-1, 7).has_value());
  EXPECT_FALSE(CheckedCeilDiv<int64_t>(7, 0).has_value());
  EXPECT_FALSE(CheckedCeilDiv<int64_t>(7, -1).has_value());
}

TEST(CheckedMathTest, CastsRefuseWhatDoesNotFit) {
  EXPECT_EQ(CheckedCast<int32_t>(int64_t{2147483647}), 2147483647);
  EXPECT_FALSE(CheckedCast<int32_t>(int64_t{2147483648}).has_value());
  EXPECT_FALSE(CheckedCast<uint32_t>(int64_t{-1}).has_value());
  EXPECT_FALSE(CheckedCast<int64_t>(std::numeric_limits<uint64_t>::max()).has_value());
  EXPECT_EQ(CheckedCast<uint64_t>(int64_t{5}), 5u);
}

TEST(CheckedMathTest, DeadlinesSaturateInsteadOfWrappingIntoThePast) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point now = Clock::now();
  EXPECT_EQ(CheckedDeadline<Clock>(now, std::chrono::milliseconds(5)),
            now + std::chrono::milliseconds(5));
  // milliseconds::max() and 1000 years do not fit steady_clock's
  // nanoseconds: refused, never a deadline in the past.
  EXPECT_FALSE(CheckedDeadline<Clock>(now, std::chrono::milliseconds::max()).has_value());
  EXPECT_FALSE(CheckedDeadline<Clock>(now, std::chrono::hours(24 * 365 * 1000)).has_value());
  EXPECT_FALSE(CheckedDeadline<Clock>(now, std::chrono::milliseconds(-1)).has_value());
  // The largest that fits is accepted.
  const auto room = Clock::time_point::max() - now;
  const auto fits = std::chrono::duration_cast<std::chrono::milliseconds>(room);
  const auto deadline = CheckedDeadline<Clock>(now, fits);
  ASSERT_TRUE(deadline.has_value());
  EXPECT_GE(*deadline, now);
  EXPECT_FALSE(
      CheckedDeadline<Clock>(now, fits + std::chrono::milliseconds(1)).has_value());
}

}  // namespace
}  // namespace kvbounce
