// CopyBytes (common/copy_bytes.h): the same bytes as memcpy whatever the
// distance between source and destination modulo 4 KiB — the backward copy
// of the 4K-aliasing case included — and nothing outside the destination.
#include "common/copy_bytes.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

namespace kvbounce {
namespace {

constexpr size_t kPage = 4096;

TEST(CopyBytesTest, AliasingIsTheShortForwardDistanceModuloAPage) {
  std::vector<unsigned char> buffer(4 * kPage);
  unsigned char* base = buffer.data();
  EXPECT_FALSE(AliasesForward(base + kPage, base, 4096));          // distance 0
  EXPECT_TRUE(AliasesForward(base + kPage + 16, base, 4096));      // 16
  EXPECT_TRUE(AliasesForward(base + 2 * kPage + 63, base, 4096));  // 63
  EXPECT_FALSE(AliasesForward(base + kPage + 64, base, 4096));     // 64
  EXPECT_FALSE(AliasesForward(base + kPage - 16, base, 4096));     // 4080: behind
  EXPECT_FALSE(AliasesForward(base + kPage + 16, base, 255));      // too short to matter
  EXPECT_TRUE(AliasesForward(base + kPage + 16, base, 256));
}

// Every distance class that matters (and some that do not), sizes around
// the 64-byte steps and the 256-byte threshold: the destination holds the
// source's bytes and the guard bytes around it are untouched.
TEST(CopyBytesTest, CopiesExactlyTheBytesAtEveryDistance) {
  std::vector<unsigned char> src_buffer(3 * kPage);
  for (size_t i = 0; i < src_buffer.size(); ++i) {
    src_buffer[i] = static_cast<unsigned char>(i * 131 + 7);
  }
  std::vector<unsigned char> dst_buffer(6 * kPage);
  for (size_t distance : {0, 1, 8, 15, 16, 31, 32, 48, 63, 64, 65, 100, 2048, 4080, 4095}) {
    for (size_t bytes : {0, 1, 63, 64, 65, 255, 256, 257, 320, 4096, 4096 + 7, 2 * 4096 + 40}) {
      for (size_t src_offset : {0, 3, 16}) {
        const unsigned char* src = src_buffer.data() + src_offset;
        // dst - src == distance modulo a page, and the ranges never overlap.
        const uintptr_t src_page_offset = reinterpret_cast<uintptr_t>(src) % kPage;
        const uintptr_t dst_base = reinterpret_cast<uintptr_t>(dst_buffer.data());
        uintptr_t at = (dst_base + kPage - 1) / kPage * kPage + kPage;  // a guard page ahead
        at += (src_page_offset + distance) % kPage;
        auto* dst = reinterpret_cast<unsigned char*>(at);
        ASSERT_LE(at + bytes + 1, dst_base + dst_buffer.size());
        std::fill(dst_buffer.begin(), dst_buffer.end(), 0xee);
        CopyBytes(dst, src, bytes);
        for (size_t i = 0; i < bytes; ++i) {
          ASSERT_EQ(dst[i], src[i])
              << "distance " << distance << ", " << bytes << " bytes, byte " << i;
        }
        EXPECT_EQ(dst[-1], 0xee) << "distance " << distance << ", " << bytes << " bytes";
        EXPECT_EQ(dst[bytes], 0xee) << "distance " << distance << ", " << bytes << " bytes";
      }
    }
  }
}

}  // namespace
}  // namespace kvbounce
