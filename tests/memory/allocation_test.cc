#include "memory/allocation.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

#include "memory_test_util.h"

namespace kvbounce {
namespace {

using ::kvbounce::testing_util::StatusIs;
using ::testing::HasSubstr;

TEST(MemoryKindTest, Names) {
  EXPECT_EQ(MemoryKindName(MemoryKind::kHost), "host");
  EXPECT_EQ(MemoryKindName(MemoryKind::kPinnedHost), "pinned-host");
  EXPECT_EQ(MemoryKindName(MemoryKind::kCuda), "cuda");
}

TEST(MemoryKindTest, HostAccessibility) {
  EXPECT_TRUE(IsHostAccessible(MemoryKind::kHost));
  EXPECT_TRUE(IsHostAccessible(MemoryKind::kPinnedHost));
  EXPECT_FALSE(IsHostAccessible(MemoryKind::kCuda));
}

TEST(HostAllocationTest, AlignedZeroFilledAndWritable) {
  for (size_t alignment : {size_t{1}, size_t{64}, size_t{4096}, size_t{1} << 16}) {
    for (size_t bytes : {size_t{1}, size_t{100}, size_t{4096}, size_t{123457}}) {
      auto allocation = HostAllocation::Create(bytes, alignment);
      ASSERT_TRUE(allocation.ok()) << allocation.status();
      const Allocation& a = **allocation;
      EXPECT_EQ(a.size(), bytes);
      EXPECT_EQ(a.kind(), MemoryKind::kHost);
      ASSERT_NE(a.host_pointer(), nullptr);
      EXPECT_EQ(a.address(), Addr::FromPointer(a.host_pointer()));
      EXPECT_EQ(a.address().ToPointer(), a.host_pointer());
      EXPECT_EQ(a.address().value() % alignment, 0u) << "alignment " << alignment;
      const auto* bytes_ptr = static_cast<const std::byte*>(a.host_pointer());
      for (size_t i = 0; i < bytes; ++i) {
        ASSERT_EQ(bytes_ptr[i], std::byte{0}) << "byte " << i;
      }
      // The whole range is ours to write (ASan checks the bounds).
      std::memset(a.host_pointer(), 0xab, bytes);
    }
  }
}

TEST(HostAllocationTest, DefaultAlignmentIsAPage) {
  auto allocation = HostAllocation::Create(10);
  ASSERT_TRUE(allocation.ok()) << allocation.status();
  EXPECT_EQ((*allocation)->address().value() % HostAllocation::kDefaultAlignment, 0u);
}

TEST(HostAllocationTest, RejectsZeroBytes) {
  EXPECT_THAT(HostAllocation::Create(0), StatusIs(StatusCode::kInvalidArgument, HasSubstr("0")));
}

TEST(HostAllocationTest, RejectsAlignmentThatIsNotAPowerOfTwo) {
  for (size_t alignment : {size_t{0}, size_t{3}, size_t{100}, size_t{4097}}) {
    EXPECT_THAT(HostAllocation::Create(64, alignment),
                StatusIs(StatusCode::kInvalidArgument, HasSubstr("power of two")))
        << "alignment " << alignment;
  }
}

TEST(HostAllocationTest, SizeThatWrapsWhenAlignedIsResourceExhausted) {
  EXPECT_THAT(HostAllocation::Create(std::numeric_limits<size_t>::max(), 4096),
              StatusIs(StatusCode::kResourceExhausted));
}

}  // namespace
}  // namespace kvbounce
