#include "session/session_context.h"

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "common/checked_math.h"
#include "protocol/codec.h"
#include "transport/write_check.h"

namespace kvbounce {

Status SessionContext::CheckStateSlot(std::string_view what, int64_t slot) const {
  const std::string option = std::string(what) + " = " + std::to_string(slot);
  if (slot < -1) return InvalidArgumentError(option + " is invalid: a slot (>= 0) or -1 for none");
  if (slot < 0) return Status::Ok();
  if (!topology->spec().model.hybrid()) {
    return InvalidArgumentError(option + ", but model '" + topology->spec().model.name +
                                "' is not hybrid: it has no recurrent state");
  }
  if (!state_pool) {
    if (topology->Placement(rank).num_state_layers == 0) return Status::Ok();
    return FailedPreconditionError(
        option + ", but this rank was created without a state pool (AgentOptions.pool.state)");
  }
  if (slot >= state_pool->num_slots()) {
    return OutOfRangeError(option + " is outside the state pool of " +
                           std::to_string(state_pool->num_slots()) + " slots");
  }
  return Status::Ok();
}

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

Status SessionContext::NotConnected(std::string_view what, const std::string& instance,
                                    int peer_rank) const {
  std::string message = std::string(what) + ": not connected to writer " + instance + " rank " +
                        std::to_string(peer_rank);
  auto lost = lost_ranks.find({instance, peer_rank});
  if (lost != lost_ranks.end()) {
    message += " (its connection was lost: " + lost->second.ToString() + "; connect to it again)";
  }
  return FailedPreconditionError(message);
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

namespace {

// A region's bounds, read once per list (a peer's region answers info()
// through a virtual call) and the one each group of ops lies in.
struct Bounds {
  Addr base;
  uint64_t size = 0;
};
Bounds BoundsOf(const LocalRange& r) { return {r.begin, r.bytes}; }
Bounds BoundsOf(const std::unique_ptr<RemoteRegion>& r) {
  return {r->info().address, r->info().size};
}
const LocalRegion* RegionOf(const LocalRange& r) { return r.region; }
const RemoteRegion* RegionOf(const std::unique_ptr<RemoteRegion>& r) { return r.get(); }

template <typename Regions>
std::vector<Bounds> AllBounds(const Regions& regions) {
  std::vector<Bounds> bounds;
  bounds.reserve(regions.size());
  for (const auto& r : regions) bounds.push_back(BoundsOf(r));
  return bounds;
}

// Splits `fragments` into groups of one (source region, target region) pair
// each; `op(src, dst, bytes)` makes one of a group's ops. Two passes: where each group starts, then
// each group's ops into a list sized once (no regrowth, no copy of a list of hundreds of thousands
// of ops).
template <typename GroupT, typename Sources, typename Targets, typename Op>
Result<std::vector<GroupT>> Group(std::span<const Fragment> fragments, uint64_t dst_offset,
                                 const Sources& sources, const Targets& targets, Op op) {
  const std::vector<Bounds> source_bounds = AllBounds(sources);
  const std::vector<Bounds> target_bounds = AllBounds(targets);
  // The region holding the range: `last` first, since consecutive fragments
  // usually stay in one pair of regions; -1 when none does.
  auto find = [](const std::vector<Bounds>& regions, int last, Addr addr, uint64_t bytes) -> int {
    if (last >= 0) {
      const Bounds& b = regions[static_cast<size_t>(last)];
      if (RangeInside(addr, bytes, b.base, b.size)) return last;
    }
    for (size_t i = 0; i < regions.size(); ++i) {
      if (RangeInside(addr, bytes, regions[i].base, regions[i].size)) return static_cast<int>(i);
    }
    return -1;
  };
  struct Start {
    size_t first = 0;  // the group's first fragment
    int s = -1, t = -1;
  };
  std::vector<Start> starts;
  int last_s = -1, last_t = -1;
  for (size_t i = 0; i < fragments.size(); ++i) {
    const Fragment& f = fragments[i];
    const int s = find(source_bounds, last_s, Addr(f.src), f.bytes);
    const int t = find(target_bounds, last_t, Addr(f.dst + dst_offset), f.bytes);
    if (s < 0 || t < 0) {
      return OutOfRangeError("fragment " + std::to_string(i) + " (" + std::to_string(f.bytes) +
                             " bytes) lies outside the registered " +
                             (s < 0 ? "source" : "target") + " regions");
    }
    if (starts.empty() || s != last_s || t != last_t) {
      starts.push_back(Start{i, s, t});
      last_s = s;
      last_t = t;
    }
  }
  std::vector<GroupT> groups;
  groups.reserve(starts.size());
  for (size_t g = 0; g < starts.size(); ++g) {
    const size_t end = g + 1 < starts.size() ? starts[g + 1].first : fragments.size();
    groups.push_back(GroupT{RegionOf(sources[static_cast<size_t>(starts[g].s)]),
                            RegionOf(targets[static_cast<size_t>(starts[g].t)]),
                            {}});
    auto& ops = groups.back().ops;
    ops.reserve(end - starts[g].first);
    for (size_t i = starts[g].first; i < end; ++i) {
      const Fragment& f = fragments[i];
      ops.push_back(op(Addr(f.src), Addr(f.dst + dst_offset), f.bytes));
    }
  }
  return groups;
}

}  // namespace

Result<std::vector<WriteGroup>> GroupWrites(
    std::span<const Fragment> fragments, uint64_t dst_offset, std::span<const LocalRange> sources,
    std::span<const std::unique_ptr<RemoteRegion>> targets) {
  return Group<WriteGroup>(fragments, dst_offset, sources, targets,
                           [](Addr src, Addr dst, uint64_t bytes) { return WriteOp{src, dst, bytes}; });
}

Result<std::vector<ReadGroup>> GroupReads(std::span<const Fragment> fragments,
                                          std::span<const std::unique_ptr<RemoteRegion>> sources,
                                          std::span<const LocalRange> targets) {
  return Group<ReadGroup>(fragments, 0, sources, targets,
                          [](Addr src, Addr dst, uint64_t bytes) { return ReadOp{src, dst, bytes}; });
}

}  // namespace kvbounce
