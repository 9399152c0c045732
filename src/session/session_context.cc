#include "session/session_context.h"

#include <algorithm>
#include <string>

#include "protocol/codec.h"

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

SessionContext::Clock::time_point SessionContext::DeadlineAfter(
    std::chrono::milliseconds timeout) const {
  if (timeout.count() <= 0) timeout = std::chrono::milliseconds(config.transfer_timeout_ms);
  return Clock::now() + timeout;
}

uint64_t SessionContext::MillisLeft(Clock::time_point deadline) {
  const auto left =
      std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return left < 1 ? 1 : static_cast<uint64_t>(left);
}

Result<std::vector<WriteGroup>> GroupWrites(
    std::span<const Fragment> fragments, uint64_t dst_offset, std::span<const LocalRange> sources,
    std::span<const std::unique_ptr<RemoteRegion>> targets) {
  std::vector<WriteGroup> groups;
  auto find_source = [&](uint64_t addr, uint64_t bytes) -> int {
    for (size_t i = 0; i < sources.size(); ++i) {
      const uint64_t b = sources[i].begin.value();
      if (addr >= b && addr - b <= sources[i].bytes && bytes <= sources[i].bytes - (addr - b)) {
        return static_cast<int>(i);
      }
    }
    return -1;
  };
  auto find_target = [&](uint64_t addr, uint64_t bytes) -> int {
    for (size_t i = 0; i < targets.size(); ++i) {
      const uint64_t b = targets[i]->info().address.value();
      const uint64_t size = targets[i]->info().size;
      if (addr >= b && addr - b <= size && bytes <= size - (addr - b)) return static_cast<int>(i);
    }
    return -1;
  };
  int last_s = -1, last_t = -1;
  WriteGroup* group = nullptr;
  for (size_t i = 0; i < fragments.size(); ++i) {
    const Fragment& f = fragments[i];
    const uint64_t dst = f.dst + dst_offset;
    // Consecutive fragments usually stay in one pair of regions.
    auto in = [](const LocalRange& r, uint64_t a, uint64_t n) {
      const uint64_t b = r.begin.value();
      return a >= b && a - b <= r.bytes && n <= r.bytes - (a - b);
    };
    int s = last_s >= 0 && in(sources[static_cast<size_t>(last_s)], f.src, f.bytes)
                ? last_s
                : find_source(f.src, f.bytes);
    int t = -1;
    if (last_t >= 0) {
      const RegionInfo& info = targets[static_cast<size_t>(last_t)]->info();
      const uint64_t b = info.address.value();
      if (dst >= b && dst - b <= info.size && f.bytes <= info.size - (dst - b)) t = last_t;
    }
    if (t < 0) t = find_target(dst, f.bytes);
    if (s < 0 || t < 0) {
      return OutOfRangeError("fragment " + std::to_string(i) + " (" + std::to_string(f.bytes) +
                             " bytes) lies outside the registered " +
                             (s < 0 ? "source" : "target") + " regions");
    }
    if (group == nullptr || s != last_s || t != last_t) {
      groups.push_back(WriteGroup{
          sources[static_cast<size_t>(s)].region, targets[static_cast<size_t>(t)].get(), {}});
      group = &groups.back();
      last_s = s;
      last_t = t;
    }
    group->ops.push_back(WriteOp{Addr(f.src), Addr(dst), f.bytes});
  }
  return groups;
}

}  // namespace kvbounce
