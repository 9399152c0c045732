// The frames ucx_transport_test and its peer program exchange.
#ifndef KVBOUNCE_TESTS_TRANSPORT_UCX_PEER_FRAMES_H_
#define KVBOUNCE_TESTS_TRANSPORT_UCX_PEER_FRAMES_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "kvbounce/transport.h"

namespace kvbounce::test_peer {

// How many "LAST i" frames a farewell peer sends before it shuts down.
inline constexpr int kFarewellMessages = 1000;
// How many connections a churn peer opens, one after another.
inline constexpr int kChurnRounds = 96;

inline std::vector<std::byte> Bytes(std::string_view text) {
  std::vector<std::byte> out(text.size());
  std::memcpy(out.data(), text.data(), text.size());
  return out;
}

// "REGION" + address u64 + size u64 + key bytes (host byte order: one host).
inline std::vector<std::byte> EncodeRegion(const RegionInfo& info) {
  const uint64_t fields[2] = {info.address.value(), info.size};
  std::vector<std::byte> out(6 + sizeof(fields) + info.remote_key.size());
  std::memcpy(out.data(), "REGION", 6);
  std::memcpy(out.data() + 6, fields, sizeof(fields));
  if (!info.remote_key.empty()) {
    std::memcpy(out.data() + 6 + sizeof(fields), info.remote_key.data(), info.remote_key.size());
  }
  return out;
}

// The bytes a receiver's and a reader's buffer hold: byte i of a region.
inline uint8_t PatternByte(uint64_t i) { return static_cast<uint8_t>((i * 131 + 7) ^ (i >> 9)); }

inline std::optional<RegionInfo> DecodeRegion(std::span<const std::byte> frame) {
  constexpr size_t kHeader = 6 + 16;
  if (frame.size() <= kHeader || std::memcmp(frame.data(), "REGION", 6) != 0) return std::nullopt;
  uint64_t fields[2];
  std::memcpy(fields, frame.data() + 6, sizeof(fields));
  RegionInfo info;
  info.address = Addr(fields[0]);
  info.size = fields[1];
  info.remote_key.assign(frame.begin() + kHeader, frame.end());
  return info;
}

}  // namespace kvbounce::test_peer

#endif  // KVBOUNCE_TESTS_TRANSPORT_UCX_PEER_FRAMES_H_
