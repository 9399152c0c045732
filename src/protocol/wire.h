// Wire constants and little-endian encoding helpers of the control protocol.
//
// Every control message travels as one frame (docs/wire_format.md):
//
//   offset 0   magic    u32   kMagic ("KVBC" on the wire)
//   offset 4   version  u16   kProtocolVersion
//   offset 6   type     u16   a MessageType
//   offset 8   length   u32   payload bytes that follow the header
//   offset 12  payload  `length` bytes
//
// Every integer is fixed-width little-endian and is written and read one byte
// at a time with shifts, so the encoding is the same on little- and big-endian
// hosts; no struct is ever copied onto the wire. Strings and byte strings are a
// u32 byte count followed by the bytes; arrays are a u32 element count followed
// by the elements.
//
// This header holds the constants (magic, version, message types, sizes and
// limits) plus WireWriter and WireReader, the two primitives the codec builds
// every message from. The limits bound what a decoder will accept and what an
// encoder will produce; they are part of the protocol version.
//
// Thread safety: the constants and free functions are safe from any thread. A
// WireWriter or WireReader is a value owned by one thread at a time.
#ifndef KVBOUNCE_PROTOCOL_WIRE_H_
#define KVBOUNCE_PROTOCOL_WIRE_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvbounce/status.h"

namespace kvbounce::protocol {

// ---------------------------------------------------------------------------
// Frame header
// ---------------------------------------------------------------------------

// The first four bytes of every frame are 'K' 'V' 'B' 'C' (0x4B 0x56 0x42
// 0x43), i.e. this value read as a little-endian u32.
inline constexpr uint32_t kMagic = 0x4342564Bu;

// The version this build speaks. A decoder rejects any frame whose header
// carries another version (docs/wire_format.md, "Versioning"): any change of
// the encoding, a new field or a changed limit, takes a new version.
inline constexpr uint16_t kProtocolVersion = 6;

// Bytes of the frame header: magic u32 | version u16 | type u16 | length u32.
inline constexpr size_t kHeaderSize = 12;

// Offsets of the header fields inside a frame.
inline constexpr size_t kMagicOffset = 0;
inline constexpr size_t kVersionOffset = 4;
inline constexpr size_t kTypeOffset = 6;
inline constexpr size_t kLengthOffset = 8;

// The type field of the header. 0 is never a valid type.
enum class MessageType : uint16_t {
  kHello = 1,
  kKvRequest = 2,
  kKvResult = 3,
  kCancel = 4,
  kBye = 5,
  kKvReady = 6,
  kKvReadDone = 7,
  kKvGrant = 8,
  kKvChunk = 9,
};

// Lowest and highest valid MessageType values.
inline constexpr uint16_t kMinMessageType = 1;
inline constexpr uint16_t kMaxMessageType = 9;

// "HELLO", "KV_REQUEST", "KV_RESULT", "CANCEL", "BYE", "KV_READY",
// "KV_READ_DONE", "KV_GRANT", "KV_CHUNK", or "UNKNOWN" for a value
// outside the enum. Used as the prefix of every codec error message.
std::string_view MessageTypeName(MessageType type);

// ---------------------------------------------------------------------------
// Limits. A decoder checks every count and length against these before it
// allocates; an encoder refuses a message that exceeds them.
// ---------------------------------------------------------------------------

// Largest payload of any frame (the length field of the header).
inline constexpr uint32_t kMaxPayloadBytes = 64u << 20;  // 64 MiB

// KV_REQUEST.block_table entries (u32 block ids). 8 Mi blocks is far beyond
// any context length even at one token per block, and keeps the largest
// KV_REQUEST (32 MiB of ids) inside kMaxPayloadBytes.
inline constexpr uint32_t kMaxBlockTableEntries = 1u << 23;

// HELLO.instance_id bytes (an instance id is never empty).
inline constexpr uint32_t kMaxInstanceIdBytes = 256;

// HELLO.placement.layers_per_stage entries, i.e. the largest pp_size.
inline constexpr uint32_t kMaxPipelineStages = 1024;

// HELLO.model.num_layers, HELLO.model.layer_pattern characters (every model
// layer, hybrid models), and so HELLO.layout.layer_bases and
// HELLO.state_layout.layer_bases entries.
inline constexpr uint32_t kMaxLayers = 4096;

// HELLO.model.state entries: the state tensors of a recurrent layer (a Mamba
// layer holds two, conv and SSM state).
inline constexpr uint32_t kMaxStateTensors = 8;

// HELLO.model.state[i].segments entries.
inline constexpr uint32_t kMaxStateSegments = 8;

// HELLO.regions entries.
inline constexpr uint32_t kMaxRegions = 64;

// HELLO.regions[i].remote_key bytes (a packed UCX rkey, a CUDA IPC handle, a
// VMM fabric handle: all far smaller).
inline constexpr uint32_t kMaxRemoteKeyBytes = 16384;

// KV_RESULT.error_text bytes.
inline constexpr uint32_t kMaxErrorTextBytes = 4096;

// CANCEL.reason and BYE.reason bytes.
inline constexpr uint32_t kMaxReasonBytes = 4096;

// Wire bytes of a length or count prefix.
inline constexpr size_t kLengthPrefixBytes = 4;

// Fixed (non variable-length) payload bytes of each message, and the largest
// payload each can have within the limits above. docs/wire_format.md gives
// the field-by-field derivation.
inline constexpr size_t kHelloFixedBytes =
    2 + 1 + 1 +  // protocol_version, role, layout kind
    4 * 4 +      // tp_rank, tp_size, pp_rank, pp_size
    4 * 5 +      // model shape
    4 * 2 +      // tokens_per_block, num_blocks
    8 * 6 +      // layout base, s_layer, s_kv, s_block, s_head, s_token
    8 +          // capabilities
    1 + 4 + 8 +  // state_layout kind, num_slots, base
    4 * 7;       // prefixes of instance_id, layers_per_stage, layer_bases, regions,
                 // layer_pattern, state, state_layout.layer_bases
inline constexpr size_t kRegionFixedBytes = 1 + 1 + 4 + 8 + 8 + 4;
// A state segment (units, unit_elems), and a state tensor without its
// segments (elem_bytes, the segments' prefix).
inline constexpr size_t kStateSegmentBytes = 4 + 4;
inline constexpr size_t kStateTensorFixedBytes = 4 + 4;
inline constexpr size_t kMaxStateTensorBytes =
    kStateTensorFixedBytes + size_t{kMaxStateSegments} * kStateSegmentBytes;
inline constexpr size_t kKvRequestFixedBytes = 8 * 8 + 4 * 4 + 1 + 4;
inline constexpr size_t kKvResultFixedBytes = 8 * 3 + 4 * 2 + 1 + 1 + 4;
inline constexpr size_t kCancelFixedBytes = 8 + 4;
inline constexpr size_t kByeFixedBytes = 1 + 4;
inline constexpr size_t kKvReadyFixedBytes = 8 * 2 + 4 * 3 + 4;
inline constexpr size_t kKvReadDoneFixedBytes = 8 * 2 + 4 * 2 + 1 + 4;
inline constexpr size_t kKvGrantFixedBytes = 8 * 4 + 4 * 2;
inline constexpr size_t kKvChunkFixedBytes = 8 * 3 + 4 * 2;

// The two layer_bases lists are bounded separately (each by kMaxLayers), not
// by their joint bound (attention plus recurrent layers of one stage): a
// looser but simpler bound.
inline constexpr size_t kMaxHelloPayloadBytes =
    kHelloFixedBytes + kMaxInstanceIdBytes + 4 * size_t{kMaxPipelineStages} +
    8 * size_t{kMaxLayers} + size_t{kMaxRegions} * (kRegionFixedBytes + kMaxRemoteKeyBytes) +
    size_t{kMaxLayers} + size_t{kMaxStateTensors} * kMaxStateTensorBytes + 8 * size_t{kMaxLayers};
inline constexpr size_t kMaxKvRequestPayloadBytes =
    kKvRequestFixedBytes + 4 * size_t{kMaxBlockTableEntries};
inline constexpr size_t kMaxKvResultPayloadBytes = kKvResultFixedBytes + kMaxErrorTextBytes;
inline constexpr size_t kMaxCancelPayloadBytes = kCancelFixedBytes + kMaxReasonBytes;
inline constexpr size_t kMaxByePayloadBytes = kByeFixedBytes + kMaxReasonBytes;
inline constexpr size_t kMaxKvReadyPayloadBytes =
    kKvReadyFixedBytes + 4 * size_t{kMaxBlockTableEntries};
inline constexpr size_t kMaxKvReadDonePayloadBytes = kKvReadDoneFixedBytes + kMaxErrorTextBytes;

static_assert(kMaxHelloPayloadBytes <= kMaxPayloadBytes);
static_assert(kMaxKvRequestPayloadBytes <= kMaxPayloadBytes);
static_assert(kMaxKvResultPayloadBytes <= kMaxPayloadBytes);
static_assert(kMaxCancelPayloadBytes <= kMaxPayloadBytes);
static_assert(kMaxByePayloadBytes <= kMaxPayloadBytes);
static_assert(kMaxKvReadyPayloadBytes <= kMaxPayloadBytes);
static_assert(kMaxKvReadDonePayloadBytes <= kMaxPayloadBytes);

// The largest payload a frame of `type` can carry within the limits; 0 for a
// type outside the enum. A header whose length exceeds this is rejected before
// any payload byte is awaited.
constexpr size_t MaxPayloadBytes(MessageType type) {
  switch (type) {
    case MessageType::kHello:
      return kMaxHelloPayloadBytes;
    case MessageType::kKvRequest:
      return kMaxKvRequestPayloadBytes;
    case MessageType::kKvResult:
      return kMaxKvResultPayloadBytes;
    case MessageType::kCancel:
      return kMaxCancelPayloadBytes;
    case MessageType::kBye:
      return kMaxByePayloadBytes;
    case MessageType::kKvReady:
      return kMaxKvReadyPayloadBytes;
    case MessageType::kKvReadDone:
      return kMaxKvReadDonePayloadBytes;
    case MessageType::kKvGrant:
      return kKvGrantFixedBytes;
    case MessageType::kKvChunk:
      return kKvChunkFixedBytes;
  }
  return 0;
}

// ---------------------------------------------------------------------------
// Fixed-width little-endian loads and stores.
// REQUIRES: `p` points at (at least) as many bytes as the width.
// ---------------------------------------------------------------------------

inline void StoreLe16(std::byte* p, uint16_t v) {
  p[0] = static_cast<std::byte>(v);
  p[1] = static_cast<std::byte>(v >> 8);
}
inline void StoreLe32(std::byte* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}
inline void StoreLe64(std::byte* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}
inline uint16_t LoadLe16(const std::byte* p) {
  return static_cast<uint16_t>(static_cast<uint16_t>(p[0]) | (static_cast<uint16_t>(p[1]) << 8));
}
inline uint32_t LoadLe32(const std::byte* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<uint32_t>(p[i]);
  return v;
}
inline uint64_t LoadLe64(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<uint64_t>(p[i]);
  return v;
}

// ---------------------------------------------------------------------------
// WireWriter: appends fixed-width little-endian fields to a byte vector.
//
// It never fails: limits are the caller's to check before writing (the codec
// validates a message first). Signed integers are written as their two's
// complement bit pattern.
// ---------------------------------------------------------------------------
class WireWriter {
 public:
  // Appends to `out`, which must outlive the writer. Existing bytes are kept.
  explicit WireWriter(std::vector<std::byte>* out) : out_(out) {}

  void PutU8(uint8_t v) { out_->push_back(static_cast<std::byte>(v)); }
  void PutU16(uint16_t v);
  void PutU32(uint32_t v);
  void PutU64(uint64_t v);
  void PutI64(int64_t v) { PutU64(static_cast<uint64_t>(v)); }
  // The bytes as they are, with no prefix.
  void PutRaw(std::span<const std::byte> bytes);
  // u32 byte count, then the bytes. REQUIRES: size <= UINT32_MAX.
  void PutString(std::string_view s);
  void PutBytes(std::span<const std::byte> bytes);
  // u32 element count, then each element. REQUIRES: size <= UINT32_MAX.
  void PutU32Array(std::span<const uint32_t> values);
  void PutU64Array(std::span<const uint64_t> values);

  // Overwrites 4 bytes at `offset` of the output. REQUIRES: offset + 4 <= size.
  void PatchU32(size_t offset, uint32_t v);

  size_t size() const { return out_->size(); }

 private:
  std::vector<std::byte>* out_;
};

// ---------------------------------------------------------------------------
// WireReader: reads fixed-width little-endian fields from a byte span, never
// past its end.
//
// Every read names the field it reads. On failure it returns kDataLoss with a
// message of the form
//   "<CONTEXT>.<field>: truncated at offset 24 (need 8 bytes, have 3)"
//   "<CONTEXT>.<field>: count 4294967295 exceeds limit 8388608"
//   "<CONTEXT>.<field>: count 1000 needs 4000 bytes, have 12 (offset 40)"
//   "<CONTEXT>.<field>: length 5000 exceeds limit 4096"   (strings, bytes)
// and leaves the output untouched and the position unchanged. Offsets are
// reported relative to the start of the frame (`base_offset` says where the
// span starts in it). Counts and lengths are checked against the limit and
// then against the bytes remaining, before anything is allocated, so a reader
// never allocates more than the span it reads holds.
//
// Inside an array of structures, EnterElement / LeaveElement make the field
// names read "<CONTEXT>.<array>[<index>].<field>".
// ---------------------------------------------------------------------------
class WireReader {
 public:
  // `data` and `context` must outlive the reader. `context` names the message
  // (e.g. "KV_REQUEST").
  WireReader(std::span<const std::byte> data, std::string_view context, size_t base_offset = 0)
      : data_(data), context_(context), base_offset_(base_offset) {}

  Status ReadU8(std::string_view field, uint8_t* out);
  Status ReadU16(std::string_view field, uint16_t* out);
  Status ReadU32(std::string_view field, uint32_t* out);
  Status ReadU64(std::string_view field, uint64_t* out);
  Status ReadI64(std::string_view field, int64_t* out);

  // A u32 byte count (at most `max_bytes`), then that many bytes.
  Status ReadString(std::string_view field, uint32_t max_bytes, std::string* out);
  Status ReadBytes(std::string_view field, uint32_t max_bytes, std::vector<std::byte>* out);

  // A u32 element count (at most `max_count`), then that many u32 / u64.
  Status ReadU32Array(std::string_view field, uint32_t max_count, std::vector<uint32_t>* out);
  Status ReadU64Array(std::string_view field, uint32_t max_count, std::vector<uint64_t>* out);

  // A u32 element count for an array whose elements take at least
  // `min_element_bytes` each: checks the count against `max_count` and
  // count * min_element_bytes against the bytes remaining. The caller then
  // reads the elements (each read is bounds-checked again).
  Status ReadCount(std::string_view field, uint32_t max_count, size_t min_element_bytes,
                   uint32_t* out);

  // OK when every byte was consumed; kDataLoss naming the trailing byte count
  // and offset otherwise.
  Status ExpectEnd() const;

  // Field names of the following reads read "<array>[<index>].<field>" until
  // LeaveElement. Not nested. `array` must outlive the element scope.
  void EnterElement(std::string_view array, size_t index) {
    element_array_ = array;
    element_index_ = index;
    in_element_ = true;
  }
  void LeaveElement() { in_element_ = false; }

  // "<CONTEXT>.<field>", with the element prefix when inside one.
  std::string FieldName(std::string_view field) const;

  // kDataLoss "<CONTEXT>.<field>: <what>".
  Status Error(std::string_view field, std::string_view what) const;

  // Frame offset of the next byte to read.
  size_t offset() const { return base_offset_ + pos_; }
  size_t remaining() const { return data_.size() - pos_; }

 private:
  // OK when `need` bytes remain; a truncation error naming `field` otherwise.
  Status Need(std::string_view field, size_t need) const;
  // Reads a u32 count or length prefix and checks it (CheckCount); on failure
  // the position is restored.
  Status ReadPrefix(std::string_view field, std::string_view noun, uint32_t limit,
                    size_t element_bytes, uint32_t* out);
  // Checks a count ("count") or byte length ("length") read from the wire
  // against the limit and then the remaining bytes; `count_offset` is where
  // the prefix itself was.
  Status CheckCount(std::string_view field, std::string_view noun, uint64_t count, uint64_t limit,
                    size_t element_bytes, size_t count_offset) const;

  std::span<const std::byte> data_;
  std::string_view context_;
  size_t base_offset_ = 0;
  size_t pos_ = 0;
  std::string_view element_array_;
  size_t element_index_ = 0;
  bool in_element_ = false;
};

}  // namespace kvbounce::protocol

#endif  // KVBOUNCE_PROTOCOL_WIRE_H_
