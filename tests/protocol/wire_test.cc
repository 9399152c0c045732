// Tests of the little-endian primitives: WireWriter and WireReader.
#include "protocol/wire.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

namespace kvbounce::protocol {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::vector<std::byte> Bytes(std::initializer_list<int> values) {
  std::vector<std::byte> out;
  for (int v : values) out.push_back(static_cast<std::byte>(v));
  return out;
}

TEST(WireTest, MagicSpellsKvbcOnTheWire) {
  std::byte b[4];
  StoreLe32(b, kMagic);
  EXPECT_EQ(b[0], std::byte{'K'});
  EXPECT_EQ(b[1], std::byte{'V'});
  EXPECT_EQ(b[2], std::byte{'B'});
  EXPECT_EQ(b[3], std::byte{'C'});
}

TEST(WireTest, StoresAreLittleEndianWhateverTheHost) {
  std::vector<std::byte> out;
  WireWriter w(&out);
  w.PutU8(0xAB);
  w.PutU16(0x0102);
  w.PutU32(0x03040506);
  w.PutU64(0x0708090A0B0C0D0Eull);
  w.PutI64(-2);
  EXPECT_EQ(out, Bytes({0xAB, 0x02, 0x01, 0x06, 0x05, 0x04, 0x03, 0x0E, 0x0D, 0x0C, 0x0B, 0x0A,
                        0x09, 0x08, 0x07, 0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF}));
}

TEST(WireTest, LoadsInvertStores) {
  std::byte b[8];
  for (uint64_t v : {uint64_t{0}, uint64_t{1}, uint64_t{0x8000000000000000ull}, UINT64_MAX,
                     uint64_t{0x0123456789ABCDEFull}}) {
    StoreLe64(b, v);
    EXPECT_EQ(LoadLe64(b), v);
    StoreLe32(b, static_cast<uint32_t>(v));
    EXPECT_EQ(LoadLe32(b), static_cast<uint32_t>(v));
    StoreLe16(b, static_cast<uint16_t>(v));
    EXPECT_EQ(LoadLe16(b), static_cast<uint16_t>(v));
  }
}

TEST(WireTest, StringsAndArraysArePrefixedWithU32Counts) {
  std::vector<std::byte> out;
  WireWriter w(&out);
  w.PutString("ab");
  const uint32_t u32s[] = {1, 0x01020304};
  w.PutU32Array(u32s);
  const uint64_t u64s[] = {0xFF};
  w.PutU64Array(u64s);
  EXPECT_EQ(out, Bytes({2, 0, 0, 0, 'a',  'b',                    //
                        2, 0, 0, 0, 1,    0,   0, 0, 4, 3, 2, 1,  //
                        1, 0, 0, 0, 0xFF, 0,   0, 0, 0, 0, 0, 0}));
}

TEST(WireTest, ReaderReadsBackWhatWriterWrote) {
  std::vector<std::byte> out;
  WireWriter w(&out);
  w.PutU8(7);
  w.PutU16(65535);
  w.PutU32(123456789);
  w.PutU64(UINT64_MAX);
  w.PutI64(INT64_MIN);
  w.PutString("hello");
  const std::byte key[] = {std::byte{0}, std::byte{0xFF}};
  w.PutBytes(key);
  const uint32_t u32s[] = {4, 5, 6};
  w.PutU32Array(u32s);
  w.PutU64Array({});

  WireReader r(out, "TEST");
  uint8_t u8 = 0;
  uint16_t u16 = 0;
  uint32_t u32 = 0;
  uint64_t u64 = 0;
  int64_t i64 = 0;
  std::string s;
  std::vector<std::byte> bytes;
  std::vector<uint32_t> a32;
  std::vector<uint64_t> a64 = {99};
  ASSERT_TRUE(r.ReadU8("a", &u8).ok());
  ASSERT_TRUE(r.ReadU16("b", &u16).ok());
  ASSERT_TRUE(r.ReadU32("c", &u32).ok());
  ASSERT_TRUE(r.ReadU64("d", &u64).ok());
  ASSERT_TRUE(r.ReadI64("e", &i64).ok());
  ASSERT_TRUE(r.ReadString("f", 5, &s).ok());
  ASSERT_TRUE(r.ReadBytes("g", 2, &bytes).ok());
  ASSERT_TRUE(r.ReadU32Array("h", 3, &a32).ok());
  ASSERT_TRUE(r.ReadU64Array("i", 0, &a64).ok());
  EXPECT_TRUE(r.ExpectEnd().ok());
  EXPECT_EQ(u8, 7);
  EXPECT_EQ(u16, 65535);
  EXPECT_EQ(u32, 123456789u);
  EXPECT_EQ(u64, UINT64_MAX);
  EXPECT_EQ(i64, INT64_MIN);
  EXPECT_EQ(s, "hello");
  EXPECT_THAT(bytes, ElementsAre(std::byte{0}, std::byte{0xFF}));
  EXPECT_THAT(a32, ElementsAre(4u, 5u, 6u));
  EXPECT_TRUE(a64.empty());
}

TEST(WireTest, ReaderReportsTruncationWithFieldAndOffsetAndLeavesOutputAlone) {
  const std::vector<std::byte> data = Bytes({1, 2, 3});
  WireReader r(data, "MSG", /*base_offset=*/12);
  uint64_t v = 42;
  Status s = r.ReadU64("field", &v);
  EXPECT_EQ(s.code(), StatusCode::kDataLoss);
  EXPECT_EQ(s.message(), "MSG.field: truncated at offset 12 (need 8 bytes, have 3)");
  EXPECT_EQ(v, 42u);
  EXPECT_EQ(r.remaining(), 3u);
}

TEST(WireTest, ReaderChecksCountsAgainstLimitThenBytes) {
  std::vector<std::byte> data;
  WireWriter w(&data);
  w.PutU32(0xFFFFFFFF);
  {
    WireReader r(data, "MSG");
    std::vector<uint32_t> out;
    Status s = r.ReadU32Array("list", 100, &out);
    EXPECT_EQ(s.message(), "MSG.list: count 4294967295 exceeds limit 100");
    EXPECT_EQ(r.offset(), 0u) << "a failed read must not move the position";
  }
  data.clear();
  w.PutU32(10);
  w.PutU32(1);
  {
    WireReader r(data, "MSG", 12);
    std::vector<uint64_t> out;
    Status s = r.ReadU64Array("list", 100, &out);
    EXPECT_EQ(s.message(), "MSG.list: count 10 needs 80 bytes, have 4 (offset 12)");
  }
  {
    WireReader r(data, "MSG");
    std::string out = "keep";
    Status s = r.ReadString("text", 5, &out);
    EXPECT_EQ(s.message(), "MSG.text: length 10 exceeds limit 5");
    EXPECT_EQ(out, "keep");
  }
}

TEST(WireTest, ElementScopeNamesTheIndex) {
  const std::vector<std::byte> data;
  WireReader r(data, "HELLO");
  r.EnterElement("regions", 3);
  uint8_t v = 0;
  EXPECT_THAT(r.ReadU8("kind", &v).message(), HasSubstr("HELLO.regions[3].kind: truncated"));
  r.LeaveElement();
  EXPECT_EQ(r.FieldName("x"), "HELLO.x");
}

TEST(WireTest, ExpectEndReportsTrailingBytes) {
  const std::vector<std::byte> data = Bytes({1, 2});
  WireReader r(data, "BYE", 12);
  uint8_t v = 0;
  ASSERT_TRUE(r.ReadU8("a", &v).ok());
  Status s = r.ExpectEnd();
  EXPECT_EQ(s.code(), StatusCode::kDataLoss);
  EXPECT_EQ(s.message(), "BYE: 1 trailing bytes after the last field (offset 13)");
}

TEST(WireTest, PerTypeLimitsFitTheGlobalLimit) {
  for (uint16_t t = kMinMessageType; t <= kMaxMessageType; ++t) {
    const auto type = static_cast<MessageType>(t);
    EXPECT_GT(MaxPayloadBytes(type), 0u) << MessageTypeName(type);
    EXPECT_LE(MaxPayloadBytes(type), kMaxPayloadBytes) << MessageTypeName(type);
  }
  EXPECT_EQ(MaxPayloadBytes(static_cast<MessageType>(0)), 0u);
  EXPECT_EQ(MessageTypeName(static_cast<MessageType>(99)), "UNKNOWN");
}

// The sizes docs/wire_format.md §3 and §5 give; a change here is a change of
// the wire format and of that document.
TEST(WireTest, SizesMatchTheSpecification) {
  EXPECT_EQ(kProtocolVersion, 6);
  EXPECT_EQ(kHelloFixedBytes, 145u);
  EXPECT_EQ(kRegionFixedBytes, 26u);
  EXPECT_EQ(kMaxStateTensorBytes, 72u);
  EXPECT_EQ(kKvRequestFixedBytes, 85u);
  EXPECT_EQ(kKvReadyFixedBytes, 32u);
  EXPECT_EQ(kMaxHelloPayloadBytes, 1124945u);
  EXPECT_EQ(kMaxKvRequestPayloadBytes, 33554517u);
  EXPECT_EQ(kMaxKvReadyPayloadBytes, 33554464u);
}

}  // namespace
}  // namespace kvbounce::protocol
