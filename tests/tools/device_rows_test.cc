// The element values of the bench (tools/element.h) and the GPU fill and
// check of pool rows (tools/device_rows.h). The element values and the
// behaviour without a device run everywhere the target is built; every case
// that needs a GPU skips with "no CUDA device: ..." where there is none.
#include "tools/device_rows.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "common/status_matchers.h"
#include "copy/cuda/cuda_util.h"
#include "kvbounce/status.h"
#include "tools/element.h"
#include "tools/rank_harness.h"

namespace kvbounce::tools {
namespace {

using ::kvbounce::testing_util::IsOk;
using ::kvbounce::testing_util::StatusIs;
using ::testing::HasSubstr;

constexpr uint8_t kSentinel = 0xC3;

#define SKIP_WITHOUT_CUDA_DEVICE()                                             \
  do {                                                                         \
    std::string why;                                                           \
    if (CudaDeviceCount(&why) == 0) GTEST_SKIP() << "no CUDA device: " << why; \
  } while (false)

// --- element.h ----------------------------------------------------------------

// Values computed with the definitions as they stood in rank_harness.cc
// before they moved to element.h: a pool filled by an older build must
// still verify.
TEST(ElementTest, ValuesAreThoseTheBenchHasAlwaysUsed) {
  EXPECT_EQ(ElementValue(3, 1, 5, 1000, 7), 0xf599de3f340ed8e6ULL);
  EXPECT_EQ(ElementValue(0, 0, 0, 0, 0), 0xe220a8397b1dcdafULL);
  EXPECT_EQ(ElementValue(79, 1, 7, 131071, 127), 0x7e24f1961bb8f493ULL);
  EXPECT_EQ(ElementValue(1, 0, 2, -1, 3), 0x6ab78e6ffa6a5b24ULL);
  EXPECT_EQ(Mix(0), 0xe220a8397b1dcdafULL);
  EXPECT_EQ(Mix(1), 0x910a2dec89025cc1ULL);
  EXPECT_EQ(RowSeed(3, 1, 5, 1000), 0x3d2cd9641e7a4bd3ULL);
  EXPECT_EQ(FromSeed(0x123456789abcdef0ULL, 127), 0xdb12d323fdb1b9dbULL);
  EXPECT_EQ(FromSeed(RowSeed(3, 1, 5, 1000), 7), ElementValue(3, 1, 5, 1000, 7));
  // Usable in constant expressions (and so in device code under nvcc).
  static_assert(Mix(1) == 0x910a2dec89025cc1ULL);
  static_assert(FromSeed(RowSeed(3, 1, 5, 1000), 7) == 0xf599de3f340ed8e6ULL);
}

// The kernels walk a row by adding kElementStep instead of multiplying.
TEST(ElementTest, ConsecutiveElementsDifferByTheStep) {
  const uint64_t seed = RowSeed(2, 0, 3, 4096);
  for (int d = 0; d < 300; ++d) EXPECT_EQ(FromSeed(seed, d + 1), FromSeed(seed, d) + kElementStep);
}

// --- Without a device (or with one: the device must exist) -----------------

TEST(DeviceRowKernelsCreateTest, NeedsAnExistingDevice) {
  std::string why;
  const int count = CudaDeviceCount(&why);
  if (count == 0) {
    EXPECT_FALSE(why.empty());
    EXPECT_THAT(DeviceRowKernels::Create(0),
                StatusIs(StatusCode::kUnavailable, HasSubstr("device rows: no CUDA device: ")));
    return;
  }
  EXPECT_THAT(DeviceRowKernels::Create(count),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("does not exist")));
  EXPECT_THAT(DeviceRowKernels::Create(-1), StatusIs(StatusCode::kInvalidArgument));
}

// --- With a device ----------------------------------------------------------------

// The shape of a row, and the alignment of the rows' addresses.
struct Shape {
  int head_dim;
  int elem_bytes;
  uint64_t align;  // rows start at multiples of this
};

std::ostream& operator<<(std::ostream& os, const Shape& s) {
  return os << "head_dim " << s.head_dim << " x " << s.elem_bytes << " bytes, align " << s.align;
}

// A row's global indices, from which the test computes its bytes with
// ElementValue (the bench's own definition).
struct RowKey {
  int layer;
  int kv;
  int head;
  int64_t token;
};

// Rows laid out in one extent with random gaps (so random addresses within
// the alignment), listed in a shuffled order; no two overlap.
struct RowSet {
  std::vector<uint64_t> offsets;  // into the extent, in list order
  std::vector<RowKey> keys;
  uint64_t extent = 0;
};

RowSet MakeRows(std::mt19937_64& rng, size_t count, const Shape& shape) {
  const uint64_t row_bytes = static_cast<uint64_t>(shape.head_dim) * shape.elem_bytes;
  std::uniform_int_distribution<uint64_t> gap(0, 40);
  RowSet set;
  std::vector<uint64_t> placed(count);
  uint64_t cursor = gap(rng);
  for (uint64_t& offset : placed) {
    cursor = (cursor + shape.align - 1) / shape.align * shape.align;
    offset = cursor;
    cursor += row_bytes + gap(rng);
  }
  set.extent = cursor + 64;
  std::shuffle(placed.begin(), placed.end(), rng);
  set.offsets = std::move(placed);
  for (size_t i = 0; i < count; ++i) {
    set.keys.push_back(RowKey{static_cast<int>(rng() % 80), static_cast<int>(rng() % 2),
                              static_cast<int>(rng() % 64), static_cast<int64_t>(rng() % 131072)});
  }
  return set;
}

// The bytes row `key` must hold: the low elem_bytes bytes of each element,
// little-endian.
std::vector<uint8_t> ExpectedRow(const RowKey& key, int head_dim, int elem_bytes) {
  std::vector<uint8_t> bytes;
  for (int d = 0; d < head_dim; ++d) {
    const uint64_t v = ElementValue(key.layer, key.kv, key.head, key.token, d);
    for (int b = 0; b < elem_bytes; ++b) bytes.push_back(static_cast<uint8_t>(v >> (8 * b)));
  }
  return bytes;
}

class DeviceRowKernelsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_CUDA_DEVICE();
    Result<std::unique_ptr<DeviceRowKernels>> kernels = DeviceRowKernels::Create(0);
    ASSERT_THAT(kernels, IsOk());
    kernels_ = std::move(kernels).value();
    EXPECT_EQ(kernels_->device(), 0);
  }

  CudaDeviceBuffer Device(size_t bytes) {
    Result<CudaDeviceBuffer> buffer = CudaDeviceBuffer::Allocate(0, bytes);
    EXPECT_THAT(buffer, IsOk());
    return buffer.ok() ? std::move(buffer).value() : CudaDeviceBuffer();
  }

  static std::vector<uint8_t> Download(const CudaDeviceBuffer& buffer) {
    std::vector<uint8_t> bytes(buffer.size());
    EXPECT_THAT(
        CudaStatus(cudaMemcpy(bytes.data(), buffer.data(), bytes.size(), cudaMemcpyDeviceToHost),
                   "cudaMemcpy"),
        IsOk());
    return bytes;
  }

  // XORs byte `offset` of `buffer` with 0x5A (so it surely changes).
  static void Corrupt(const CudaDeviceBuffer& buffer, uint64_t offset) {
    uint8_t byte = 0;
    auto* at = static_cast<uint8_t*>(buffer.data()) + offset;
    ASSERT_THAT(CudaStatus(cudaMemcpy(&byte, at, 1, cudaMemcpyDeviceToHost), "cudaMemcpy"), IsOk());
    byte ^= 0x5A;
    ASSERT_THAT(CudaStatus(cudaMemcpy(at, &byte, 1, cudaMemcpyHostToDevice), "cudaMemcpy"), IsOk());
  }

  // Rows [begin, end) of `set` at `base`, with their seeds.
  static std::vector<DeviceRow> Rows(const RowSet& set, size_t begin, size_t end, uint64_t base) {
    std::vector<DeviceRow> rows;
    for (size_t i = begin; i < end; ++i) {
      const RowKey& k = set.keys[i];
      rows.push_back(DeviceRow{base + set.offsets[i], RowSeed(k.layer, k.kv, k.head, k.token)});
    }
    return rows;
  }

  // The extent as it must be once rows [0, values) of `set` hold their
  // values and every other byte the sentinel.
  static std::vector<uint8_t> Expected(const RowSet& set, size_t values, const Shape& shape) {
    std::vector<uint8_t> bytes(set.extent, kSentinel);
    for (size_t i = 0; i < values; ++i) {
      const std::vector<uint8_t> row = ExpectedRow(set.keys[i], shape.head_dim, shape.elem_bytes);
      std::copy(row.begin(), row.end(), bytes.begin() + static_cast<ptrdiff_t>(set.offsets[i]));
    }
    return bytes;
  }

  static void ExpectSameBytes(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want) {
    ASSERT_EQ(got.size(), want.size());
    const auto diff = std::mismatch(got.begin(), got.end(), want.begin());
    if (diff.first != got.end()) {
      ADD_FAILURE() << "first differing byte at offset " << (diff.first - got.begin()) << ": got 0x"
                    << std::hex << int{*diff.first} << ", want 0x" << int{*diff.second};
    }
  }

  std::unique_ptr<DeviceRowKernels> kernels_;
};

class DeviceRowShapeTest : public DeviceRowKernelsTest,
                           public ::testing::WithParamInterface<Shape> {};

// Fill, compare every byte of the extent with the host's values (rows and
// the gaps between them), verify clean data, then corrupt a few rows.
TEST_P(DeviceRowShapeTest, FillWritesTheHostValuesAndVerifyFindsEveryBadRow) {
  const Shape shape = GetParam();
  const uint64_t row_bytes = static_cast<uint64_t>(shape.head_dim) * shape.elem_bytes;
  std::mt19937_64 rng(shape.head_dim * 131 + shape.elem_bytes * 7 + shape.align);
  constexpr size_t kValues = 1500;
  constexpr size_t kSentinels = 700;
  const RowSet set = MakeRows(rng, kValues + kSentinels, shape);
  CudaDeviceBuffer buffer = Device(set.extent);
  ASSERT_NE(buffer.data(), nullptr);
  const uint64_t base = buffer.addr().value();
  const std::vector<std::pair<uint64_t, uint64_t>> whole = {{base, set.extent}};
  ASSERT_THAT(kernels_->FillBytes(whole, kSentinel), IsOk());

  const std::vector<DeviceRow> values = Rows(set, 0, kValues, base);
  const std::vector<DeviceRow> sentinels = Rows(set, kValues, kValues + kSentinels, base);
  ASSERT_THAT(kernels_->FillRows(values, shape.head_dim, shape.elem_bytes), IsOk());
  ExpectSameBytes(Download(buffer), Expected(set, kValues, shape));

  Result<DeviceRowCheck> check =
      kernels_->VerifyRows(values, sentinels, shape.head_dim, shape.elem_bytes, kSentinel);
  ASSERT_THAT(check, IsOk());
  EXPECT_EQ(check->rows_checked, kValues + kSentinels);
  EXPECT_EQ(check->bytes_checked, (kValues + kSentinels) * row_bytes);
  EXPECT_EQ(check->mismatches, 0u);
  EXPECT_EQ(check->first_bad_row, -1);

  // Three value rows (their first, last and a middle byte) and one
  // sentinel row.
  const size_t bad_values[] = {911, 37, 1204};
  Corrupt(buffer, set.offsets[bad_values[0]]);
  Corrupt(buffer, set.offsets[bad_values[1]] + row_bytes - 1);
  Corrupt(buffer, set.offsets[bad_values[2]] + row_bytes / 2);
  const size_t bad_sentinel = 450;
  Corrupt(buffer, set.offsets[kValues + bad_sentinel] + (row_bytes - 1) / 3);

  check = kernels_->VerifyRows(values, sentinels, shape.head_dim, shape.elem_bytes, kSentinel);
  ASSERT_THAT(check, IsOk());
  EXPECT_EQ(check->mismatches, 4u);
  EXPECT_EQ(check->first_bad_row, 37);

  check = kernels_->VerifyRows({}, sentinels, shape.head_dim, shape.elem_bytes, kSentinel);
  ASSERT_THAT(check, IsOk());
  EXPECT_EQ(check->mismatches, 1u);
  EXPECT_EQ(check->first_bad_row, static_cast<int64_t>(bad_sentinel));

  check = kernels_->VerifyRows(values, {}, shape.head_dim, shape.elem_bytes, kSentinel);
  ASSERT_THAT(check, IsOk());
  EXPECT_EQ(check->mismatches, 3u);
  EXPECT_EQ(check->first_bad_row, 37);

  // Another sentinel: every sentinel row is wrong, the first at index kValues.
  check = kernels_->VerifyRows(values, sentinels, shape.head_dim, shape.elem_bytes, 0x00);
  ASSERT_THAT(check, IsOk());
  EXPECT_EQ(check->mismatches, 3u + kSentinels);
  EXPECT_EQ(check->first_bad_row, 37);

  // Refilling repairs the value rows.
  ASSERT_THAT(kernels_->FillRows(values, shape.head_dim, shape.elem_bytes), IsOk());
  check = kernels_->VerifyRows(values, {}, shape.head_dim, shape.elem_bytes, kSentinel);
  ASSERT_THAT(check, IsOk());
  EXPECT_EQ(check->mismatches, 0u);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, DeviceRowShapeTest,
    ::testing::Values(Shape{128, 2, 2},   // the common case: bf16 rows, 2-byte aligned
                      Shape{128, 2, 16},  // ... 16-byte aligned (no head or tail)
                      Shape{128, 2, 1},   // ... at odd addresses
                      Shape{3, 1, 1},     // shorter than one word
                      Shape{64, 4, 4},    // 4-byte elements
                      Shape{7, 4, 1},     // 28 bytes, unaligned
                      Shape{5, 8, 8},     // 8-byte elements
                      Shape{3, 3, 1},     // an element size without its own kernel
                      Shape{1, 1, 1},     // one byte
                      Shape{600, 2, 2}),  // 1200 bytes: several words a lane
    [](const ::testing::TestParamInfo<Shape>& param_info) {
      const Shape& s = param_info.param;
      return "dim" + std::to_string(s.head_dim) + "_e" + std::to_string(s.elem_bytes) + "_align" +
             std::to_string(s.align);
    });

// More rows than one launch takes: the value rows span two chunks and the
// second chunk mixes value and sentinel rows, so chunk offsets and the
// split between the lists are exercised.
TEST_F(DeviceRowKernelsTest, ListsLongerThanAChunk) {
  const Shape shape{3, 1, 1};
  std::mt19937_64 rng(99);
  const size_t values_count = DeviceRowKernels::kChunkRows + 1234;
  const size_t sentinels_count = 5000;
  const RowSet set = MakeRows(rng, values_count + sentinels_count, shape);
  CudaDeviceBuffer buffer = Device(set.extent);
  ASSERT_NE(buffer.data(), nullptr);
  const uint64_t base = buffer.addr().value();
  const std::vector<std::pair<uint64_t, uint64_t>> whole = {{base, set.extent}};
  ASSERT_THAT(kernels_->FillBytes(whole, kSentinel), IsOk());
  const std::vector<DeviceRow> values = Rows(set, 0, values_count, base);
  const std::vector<DeviceRow> sentinels =
      Rows(set, values_count, values_count + sentinels_count, base);
  ASSERT_THAT(kernels_->FillRows(values, shape.head_dim, shape.elem_bytes), IsOk());
  ExpectSameBytes(Download(buffer), Expected(set, values_count, shape));

  Result<DeviceRowCheck> check =
      kernels_->VerifyRows(values, sentinels, shape.head_dim, shape.elem_bytes, kSentinel);
  ASSERT_THAT(check, IsOk());
  EXPECT_EQ(check->rows_checked, values_count + sentinels_count);
  EXPECT_EQ(check->mismatches, 0u);

  // A value row of the second chunk and a sentinel row (both in chunk 2).
  const size_t bad_value = DeviceRowKernels::kChunkRows + 100;
  Corrupt(buffer, set.offsets[bad_value] + 2);
  Corrupt(buffer, set.offsets[values_count + 4321]);
  check = kernels_->VerifyRows(values, sentinels, shape.head_dim, shape.elem_bytes, kSentinel);
  ASSERT_THAT(check, IsOk());
  EXPECT_EQ(check->mismatches, 2u);
  EXPECT_EQ(check->first_bad_row, static_cast<int64_t>(bad_value));
  // Sentinels alone: the bad one keeps its index in that list.
  check = kernels_->VerifyRows({}, sentinels, shape.head_dim, shape.elem_bytes, kSentinel);
  ASSERT_THAT(check, IsOk());
  EXPECT_EQ(check->mismatches, 1u);
  EXPECT_EQ(check->first_bad_row, 4321);
}

TEST_F(DeviceRowKernelsTest, EmptyListsAreOk) {
  EXPECT_THAT(kernels_->FillRows({}, 128, 2), IsOk());
  Result<DeviceRowCheck> check = kernels_->VerifyRows({}, {}, 128, 2, kSentinel);
  ASSERT_THAT(check, IsOk());
  EXPECT_EQ(check->rows_checked, 0u);
  EXPECT_EQ(check->bytes_checked, 0u);
  EXPECT_EQ(check->mismatches, 0u);
  EXPECT_EQ(check->first_bad_row, -1);
  EXPECT_THAT(kernels_->FillBytes({}, kSentinel), IsOk());
  const std::vector<std::pair<uint64_t, uint64_t>> empty_range = {{0, 0}};
  EXPECT_THAT(kernels_->FillBytes(empty_range, kSentinel), IsOk());
}

TEST_F(DeviceRowKernelsTest, BadShapesAreInvalidArguments) {
  CudaDeviceBuffer buffer = Device(4096);
  ASSERT_NE(buffer.data(), nullptr);
  const std::vector<DeviceRow> rows = {{buffer.addr().value(), 1}};
  EXPECT_THAT(kernels_->FillRows(rows, 0, 2),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("head_dim = 0")));
  EXPECT_THAT(kernels_->FillRows(rows, 128, 9),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("elem_bytes = 9")));
  EXPECT_THAT(kernels_->VerifyRows(rows, {}, 128, 0, kSentinel),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("elem_bytes = 0")));
  EXPECT_THAT(kernels_->MeasureCopyCeiling(0, 1), StatusIs(StatusCode::kInvalidArgument));
  EXPECT_THAT(kernels_->MeasureCopyCeiling(1024, 0), StatusIs(StatusCode::kInvalidArgument));
}

TEST_F(DeviceRowKernelsTest, CopyCeilingIsPositive) {
  Result<double> ceiling = kernels_->MeasureCopyCeiling(size_t{256} << 20, 5);
  ASSERT_THAT(ceiling, IsOk());
  EXPECT_GT(*ceiling, 0.0);
  RecordProperty("copy_ceiling_gbps", std::to_string(*ceiling / 1e9));
}

}  // namespace
}  // namespace kvbounce::tools
