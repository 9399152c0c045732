// Encoding and decoding of control-protocol frames (docs/wire_format.md).
//
// A frame is the 12-byte header of wire.h followed by exactly `length`
// payload bytes; docs/wire_format.md is the byte-level specification.
//
// Encoding: Encode(message) validates the message (messages.h Validate) and
// returns the complete frame, header included. A message that passes Validate
// always encodes, and what an encoder produces always decodes to an equal
// message. The encoding is canonical: decoding a frame and encoding the result
// gives back the same bytes.
//
// Decoding: every decoder takes one complete frame, header included, and
// checks, in this order, before it allocates anything:
//   * the header: magic, version (must be kProtocolVersion), type (must be
//     known, and for the typed decoders the expected one), length (at most
//     the type's MaxPayloadBytes);
//   * that the span holds exactly kHeaderSize + length bytes (a short frame
//     and trailing bytes are both errors);
//   * every field against the bytes left, every count and string length
//     against its limit and against the bytes left, every enum value;
//   * that the payload has no bytes after its last field;
//   * the protocol invariants of Validate.
// Every failure is kDataLoss, with a message naming the message type and the
// field, e.g.
//   "KV_REQUEST.block_table: count 4294967295 exceeds limit 8388608"
//   "KV_RESULT.bytes_written: truncated at offset 20 (need 8 bytes, have 3)"
//   "frame header: unsupported protocol version 2 (this build speaks 1)"
// Offsets in messages are counted from the first byte of the frame. A decoder
// never reads outside the span and allocates at most the span's size.
//
// Reading from a stream: FrameLength tells a socket reader how long the frame
// at the front of its buffer is, as soon as the header has arrived, and
// rejects a bad header (wrong magic, unknown version or type, oversize length)
// at once, so a reader never waits for or buffers an impossible frame.
//
// Thread safety: every function is pure and may be called from any thread.
#ifndef KVBOUNCE_PROTOCOL_CODEC_H_
#define KVBOUNCE_PROTOCOL_CODEC_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "kvbounce/status.h"
#include "protocol/messages.h"
#include "protocol/wire.h"

namespace kvbounce::protocol {

// A decoded, validated frame header.
struct FrameHeader {
  uint16_t version = kProtocolVersion;
  MessageType type = MessageType::kHello;
  uint32_t payload_length = 0;  // <= MaxPayloadBytes(type)

  // kHeaderSize + payload_length.
  size_t frame_length() const { return kHeaderSize + payload_length; }

  friend bool operator==(const FrameHeader&, const FrameHeader&) = default;
};

// ---------------------------------------------------------------------------
// Encoding. Each returns the whole frame, or kInvalidArgument (from Validate)
// when the message breaks a protocol invariant or a limit.
// ---------------------------------------------------------------------------
Result<std::vector<std::byte>> Encode(const Hello& hello);
Result<std::vector<std::byte>> Encode(const KvRequest& request);
Result<std::vector<std::byte>> Encode(const KvResult& result);
Result<std::vector<std::byte>> Encode(const Cancel& cancel);
Result<std::vector<std::byte>> Encode(const Bye& bye);
Result<std::vector<std::byte>> Encode(const KvReady& ready);
Result<std::vector<std::byte>> Encode(const KvReadDone& done);
Result<std::vector<std::byte>> Encode(const KvGrant& grant);
Result<std::vector<std::byte>> Encode(const KvChunk& chunk);
// Dispatches on the alternative held.
Result<std::vector<std::byte>> EncodeFrame(const Message& message);

// ---------------------------------------------------------------------------
// Decoding.
// ---------------------------------------------------------------------------

// Decodes and validates the first kHeaderSize bytes of `bytes` (which may hold
// more: the payload, or further frames). kDataLoss when fewer than
// kHeaderSize bytes are present, or on a bad magic, version, type or length.
Result<FrameHeader> DecodeHeader(std::span<const std::byte> bytes);

// For a buffer that starts at a frame boundary and may hold part of a frame,
// one frame or several: the length of the first frame (header included) once
// its header is complete, std::nullopt while fewer than kHeaderSize bytes are
// present. kDataLoss as soon as the bytes present prove the frame bad: a magic
// byte that differs (checked byte by byte, before the header is complete), or
// an unknown version or type, or a length over the type's limit.
Result<std::optional<size_t>> FrameLength(std::span<const std::byte> bytes);

// Decode one complete frame of the named type. `frame` must be exactly one
// frame. kDataLoss on any failure (see the top of this file), including a
// frame of another type ("expected a KV_RESULT frame, got CANCEL").
Result<Hello> DecodeHello(std::span<const std::byte> frame);
Result<KvRequest> DecodeKvRequest(std::span<const std::byte> frame);
Result<KvResult> DecodeKvResult(std::span<const std::byte> frame);
Result<Cancel> DecodeCancel(std::span<const std::byte> frame);
Result<Bye> DecodeBye(std::span<const std::byte> frame);
Result<KvReady> DecodeKvReady(std::span<const std::byte> frame);
Result<KvReadDone> DecodeKvReadDone(std::span<const std::byte> frame);
Result<KvGrant> DecodeKvGrant(std::span<const std::byte> frame);
Result<KvChunk> DecodeKvChunk(std::span<const std::byte> frame);

// Decodes one complete frame of any type, dispatching on its header.
Result<Message> DecodeFrame(std::span<const std::byte> frame);

}  // namespace kvbounce::protocol

#endif  // KVBOUNCE_PROTOCOL_CODEC_H_
