// libFuzzer target: DecodeKvGrant on arbitrary bytes (see fuzz_round_trip.h).
#include <cstddef>
#include <cstdint>

#include "fuzz_round_trip.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace p = kvbounce::protocol;
  return p::fuzz::FuzzOne<p::KvGrant>(data, size, p::MessageType::kKvGrant, &p::DecodeKvGrant);
}
