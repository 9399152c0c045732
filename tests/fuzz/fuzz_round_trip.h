// Shared body of the protocol fuzz targets.
//
// For one input, a target:
//   1. decodes the input as a frame with the decoder under test;
//   2. wraps the input in a well-formed header of the decoder's type (so the
//      fuzzer reaches payload parsing without having to discover the magic
//      and a consistent length) and decodes that too.
// Every decode must either fail with kDataLoss and a message, or succeed; a
// success must re-encode to exactly the input bytes (the encoding is
// canonical) and decode again to an equal message. FrameLength must agree
// with the decoder. Any violation aborts, which libFuzzer reports as a crash.
#ifndef KVBOUNCE_TESTS_FUZZ_FUZZ_ROUND_TRIP_H_
#define KVBOUNCE_TESTS_FUZZ_FUZZ_ROUND_TRIP_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "protocol/codec.h"
#include "protocol/messages.h"
#include "protocol/wire.h"

namespace kvbounce::protocol::fuzz {

[[noreturn]] inline void Fail(const char* what, const std::string& detail) {
  std::fprintf(stderr, "fuzz invariant broken: %s: %s\n", what, detail.c_str());
  std::abort();
}

// Encodes with the typed encoder, or EncodeFrame for the variant.
template <typename M>
Result<std::vector<std::byte>> EncodeAny(const M& message) {
  if constexpr (std::is_same_v<M, Message>) {
    return EncodeFrame(message);
  } else {
    return Encode(message);
  }
}

template <typename M>
void CheckOne(std::span<const std::byte> frame, Result<M> (*decode)(std::span<const std::byte>)) {
  Result<M> decoded = decode(frame);
  Result<std::optional<size_t>> length = FrameLength(frame);
  if (!decoded.ok()) {
    if (decoded.status().code() != StatusCode::kDataLoss) {
      Fail("decode error is not DATA_LOSS", decoded.status().ToString());
    }
    if (decoded.status().message().empty()) Fail("decode error without a message", "");
    return;
  }
  if (!length.ok() || !length->has_value() || **length != frame.size()) {
    Fail("FrameLength disagrees with a successful decode",
         length.ok() ? std::to_string(length->value_or(0)) : length.status().ToString());
  }
  Result<std::vector<std::byte>> encoded = EncodeAny(*decoded);
  if (!encoded.ok()) Fail("a decoded message does not encode", encoded.status().ToString());
  if (encoded->size() != frame.size() ||
      !std::equal(encoded->begin(), encoded->end(), frame.begin())) {
    Fail("re-encoding is not byte-identical",
         std::to_string(encoded->size()) + " vs " + std::to_string(frame.size()) + " bytes");
  }
  Result<M> again = decode(*encoded);
  if (!again.ok()) Fail("re-encoded frame does not decode", again.status().ToString());
  if (!(*again == *decoded)) Fail("re-decoded message differs", "");
}

// Runs both checks of the file comment. `type` is the header type used to wrap
// the input as a payload.
template <typename M>
int FuzzOne(const uint8_t* data, size_t size, MessageType type,
            Result<M> (*decode)(std::span<const std::byte>)) {
  const std::span<const std::byte> input(reinterpret_cast<const std::byte*>(data), size);
  CheckOne<M>(input, decode);

  if (size <= MaxPayloadBytes(type)) {
    std::vector<std::byte> framed(kHeaderSize + size);
    StoreLe32(framed.data() + kMagicOffset, kMagic);
    StoreLe16(framed.data() + kVersionOffset, kProtocolVersion);
    StoreLe16(framed.data() + kTypeOffset, static_cast<uint16_t>(type));
    StoreLe32(framed.data() + kLengthOffset, static_cast<uint32_t>(size));
    if (size > 0) std::copy(input.begin(), input.end(), framed.begin() + kHeaderSize);
    CheckOne<M>(framed, decode);
  }
  return 0;
}

}  // namespace kvbounce::protocol::fuzz

#endif  // KVBOUNCE_TESTS_FUZZ_FUZZ_ROUND_TRIP_H_
