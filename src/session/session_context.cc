#include "session/session_context.h"

#include <algorithm>
#include <string>

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

// Where [addr, addr + bytes) lies: a local range or a peer's region.
bool Holds(const LocalRange& r, Addr addr, uint64_t bytes) {
  return RangeInside(addr, bytes, r.begin, r.bytes);
}
bool Holds(const std::unique_ptr<RemoteRegion>& r, Addr addr, uint64_t bytes) {
  return RangeInside(addr, bytes, r->info().address, r->info().size);
}
const LocalRegion* RegionOf(const LocalRange& r) { return r.region; }
const RemoteRegion* RegionOf(const std::unique_ptr<RemoteRegion>& r) { return r.get(); }

// Splits `fragments` into groups of one (source region, target region) pair
// each; `make(source, target)` starts a group, `op(src, dst, bytes)` makes
// one of its ops.
template <typename GroupT, typename Sources, typename Targets, typename Op>
Result<std::vector<GroupT>> Group(std::span<const Fragment> fragments, uint64_t dst_offset,
                                 const Sources& sources, const Targets& targets, Op op) {
  // The region holding the range: `last` first, since consecutive fragments
  // usually stay in one pair of regions; -1 when none does.
  auto find = [](const auto& regions, int last, Addr addr, uint64_t bytes) -> int {
    if (last >= 0 && Holds(regions[static_cast<size_t>(last)], addr, bytes)) return last;
    for (size_t i = 0; i < regions.size(); ++i) {
      if (Holds(regions[i], addr, bytes)) return static_cast<int>(i);
    }
    return -1;
  };
  std::vector<GroupT> groups;
  int last_s = -1, last_t = -1;
  for (size_t i = 0; i < fragments.size(); ++i) {
    const Fragment& f = fragments[i];
    const Addr src(f.src);
    const Addr dst(f.dst + dst_offset);
    const int s = find(sources, last_s, src, f.bytes);
    const int t = find(targets, last_t, dst, f.bytes);
    if (s < 0 || t < 0) {
      return OutOfRangeError("fragment " + std::to_string(i) + " (" + std::to_string(f.bytes) +
                             " bytes) lies outside the registered " +
                             (s < 0 ? "source" : "target") + " regions");
    }
    if (groups.empty() || s != last_s || t != last_t) {
      groups.push_back(GroupT{RegionOf(sources[static_cast<size_t>(s)]),
                             RegionOf(targets[static_cast<size_t>(t)]),
                             {}});
      last_s = s;
      last_t = t;
    }
    groups.back().ops.push_back(op(src, dst, f.bytes));
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
