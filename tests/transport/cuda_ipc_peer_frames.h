// The frames cuda_ipc_transport_test and its peer program
// (cuda_ipc_test_peer) exchange. Text frames and the region pattern are
// ucx_peer_frames.h's; the REGION frame here also carries the memory kind
// and device of the region, which the cuda-ipc transport's Import checks.
#ifndef KVBOUNCE_TESTS_TRANSPORT_CUDA_IPC_PEER_FRAMES_H_
#define KVBOUNCE_TESTS_TRANSPORT_CUDA_IPC_PEER_FRAMES_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "kvbounce/transport.h"
#include "kvbounce/types.h"
#include "transport/ucx_peer_frames.h"

namespace kvbounce::test_peer {

// How the peer program allocates its region (its second argument).
inline constexpr std::string_view kCudaMalloc = "cuda_malloc";  // an IPC handle travels
inline constexpr std::string_view kVmm = "vmm";  // a file descriptor travels (SCM_RIGHTS)

// "DEVREGION" + address u64 + size u64 + kind i32 + device i32 + key bytes
// (host byte order: both processes run on one host).
inline constexpr std::string_view kDeviceRegionTag = "DEVREGION";

inline std::vector<std::byte> EncodeDeviceRegion(const RegionInfo& info) {
  const uint64_t fields[2] = {info.address.value(), info.size};
  const int32_t place[2] = {static_cast<int32_t>(info.kind), static_cast<int32_t>(info.device)};
  constexpr size_t kHeader = kDeviceRegionTag.size() + sizeof(fields) + sizeof(place);
  std::vector<std::byte> out(kHeader + info.remote_key.size());
  std::memcpy(out.data(), kDeviceRegionTag.data(), kDeviceRegionTag.size());
  std::memcpy(out.data() + kDeviceRegionTag.size(), fields, sizeof(fields));
  std::memcpy(out.data() + kDeviceRegionTag.size() + sizeof(fields), place, sizeof(place));
  if (!info.remote_key.empty()) {
    std::memcpy(out.data() + kHeader, info.remote_key.data(), info.remote_key.size());
  }
  return out;
}

inline std::optional<RegionInfo> DecodeDeviceRegion(std::span<const std::byte> frame) {
  constexpr size_t kHeader = kDeviceRegionTag.size() + 2 * sizeof(uint64_t) + 2 * sizeof(int32_t);
  if (frame.size() < kHeader ||
      std::memcmp(frame.data(), kDeviceRegionTag.data(), kDeviceRegionTag.size()) != 0) {
    return std::nullopt;
  }
  uint64_t fields[2];
  int32_t place[2];
  std::memcpy(fields, frame.data() + kDeviceRegionTag.size(), sizeof(fields));
  std::memcpy(place, frame.data() + kDeviceRegionTag.size() + sizeof(fields), sizeof(place));
  RegionInfo info;
  info.address = Addr(fields[0]);
  info.size = fields[1];
  info.kind = static_cast<MemoryKind>(place[0]);
  info.device = place[1];
  info.remote_key.assign(frame.begin() + kHeader, frame.end());
  return info;
}

// "CHECK" + the bytes the peer's whole region should hold.
inline constexpr std::string_view kCheckTag = "CHECK";

inline std::vector<std::byte> EncodeCheck(std::span<const uint8_t> image) {
  std::vector<std::byte> out(kCheckTag.size() + image.size());
  std::memcpy(out.data(), kCheckTag.data(), kCheckTag.size());
  if (!image.empty()) std::memcpy(out.data() + kCheckTag.size(), image.data(), image.size());
  return out;
}

}  // namespace kvbounce::test_peer

#endif  // KVBOUNCE_TESTS_TRANSPORT_CUDA_IPC_PEER_FRAMES_H_
