#include "session/session_context.h"

#include <algorithm>
#include <string>

#include "common/checked_math.h"
#include "protocol/codec.h"
#include "transport/write_check.h"

namespace kvbounce {

std::string RequestName(uint64_t request_id) { return "request " + std::to_string(request_id); }

Outcome OutcomeOf(const Status& s) {
  switch (s.code()) {
    case StatusCode::kOk:
      return Outcome::kCompleted;
    case StatusCode::kCancelled:
    case StatusCode::kAborted:
      return Outcome::kCancelled;
    case StatusCode::kDeadlineExceeded:
      return Outcome::kTimedOut;
    default:
      return Outcome::kFailed;
  }
}

std::string PeerState::Describe() const {
  if (rank < 0) return "peer " + std::to_string(id);
  return instance_id + " rank " + std::to_string(rank);
}

PeerState* SessionContext::FindPeer(const std::string& instance, int peer_rank) {
  auto it = peer_by_rank.find({instance, peer_rank});
  if (it == peer_by_rank.end()) return nullptr;
  PeerState* peer = FindPeer(it->second);
  return peer != nullptr && peer->ready() ? peer : nullptr;
}

PeerState* SessionContext::FindPeer(PeerId id) {
  auto it = peers.find(id);
  return it == peers.end() ? nullptr : &it->second;
}

Status SessionContext::Send(PeerId peer, const protocol::Message& message) {
  Result<std::vector<std::byte>> frame = protocol::EncodeFrame(message);
  if (!frame.ok()) return InternalError("encoding a frame: " + frame.status().ToString());
  return transport->Send(peer, *frame);
}

SessionContext::TimePoint SessionContext::DeadlineAfter(std::chrono::milliseconds timeout) const {
  if (timeout.count() <= 0) timeout = std::chrono::milliseconds(config.transfer_timeout_ms);
  return CheckedDeadline<std::chrono::steady_clock>(Now(), timeout).value_or(TimePoint::max());
}

uint8_t ToWireErrorCode(StatusCode code) {
  static_assert(static_cast<int>(StatusCode::kInternal) == protocol::kMaxErrorCode,
                "KV_RESULT.error_code numbers the codes as StatusCode does");
  return static_cast<uint8_t>(code);
}

std::optional<StatusCode> FromWireErrorCode(uint8_t code) {
  if (code == 0 || code > protocol::kMaxErrorCode) return std::nullopt;
  return static_cast<StatusCode>(code);
}

uint64_t SessionContext::MillisLeft(TimePoint deadline) const {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Now()).count();
  return left < 1 ? 1 : static_cast<uint64_t>(left);
}

Result<std::vector<WriteGroup>> GroupWrites(
    std::span<const Fragment> fragments, uint64_t dst_offset, std::span<const LocalRange> sources,
    std::span<const std::unique_ptr<RemoteRegion>> targets) {
  // The region holding [addr, addr + bytes): `last` first, since consecutive
  // fragments usually stay in one pair of regions; -1 when none does.
  auto find = [](size_t count, int last, auto&& contains) -> int {
    if (last >= 0 && contains(static_cast<size_t>(last))) return last;
    for (size_t i = 0; i < count; ++i) {
      if (contains(i)) return static_cast<int>(i);
    }
    return -1;
  };
  std::vector<WriteGroup> groups;
  int last_s = -1, last_t = -1;
  for (size_t i = 0; i < fragments.size(); ++i) {
    const Fragment& f = fragments[i];
    const Addr src(f.src);
    const Addr dst(f.dst + dst_offset);
    const int s = find(sources.size(), last_s, [&](size_t k) {
      return RangeInside(src, f.bytes, sources[k].begin, sources[k].bytes);
    });
    const int t = find(targets.size(), last_t, [&](size_t k) {
      const RegionInfo& info = targets[k]->info();
      return RangeInside(dst, f.bytes, info.address, info.size);
    });
    if (s < 0 || t < 0) {
      return OutOfRangeError("fragment " + std::to_string(i) + " (" + std::to_string(f.bytes) +
                             " bytes) lies outside the registered " +
                             (s < 0 ? "source" : "target") + " regions");
    }
    if (groups.empty() || s != last_s || t != last_t) {
      groups.push_back(WriteGroup{
          sources[static_cast<size_t>(s)].region, targets[static_cast<size_t>(t)].get(), {}});
      last_s = s;
      last_t = t;
    }
    groups.back().ops.push_back(WriteOp{src, dst, f.bytes});
  }
  return groups;
}

}  // namespace kvbounce
