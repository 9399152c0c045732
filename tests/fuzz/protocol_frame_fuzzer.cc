// libFuzzer target: DecodeFrame, the dispatching decoder, on arbitrary bytes
// (see fuzz_round_trip.h). The first input byte picks the header type used
// when the rest is wrapped as a payload, so every message type is reached.
#include <cstddef>
#include <cstdint>

#include "fuzz_round_trip.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace p = kvbounce::protocol;
  const std::span<const std::byte> input(reinterpret_cast<const std::byte*>(data), size);
  p::fuzz::CheckOne<p::Message>(input, &p::DecodeFrame);
  if (size == 0) return 0;
  const auto type = static_cast<p::MessageType>(p::kMinMessageType + data[0] % p::kMaxMessageType);
  return p::fuzz::FuzzOne<p::Message>(data + 1, size - 1, type, &p::DecodeFrame);
}
