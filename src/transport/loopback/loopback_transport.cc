#include "transport/loopback/loopback_transport.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cinttypes>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <mutex>
#include <optional>
#include <stop_token>
#include <string>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common/copy_bytes.h"
#include "common/memcpy_rate.h"
#include "common/poll.h"
#include "common/unique_fd.h"
#include "copy/device_support.h"
#include "kvbounce/config.h"
#include "kvbounce/logging.h"
#include "transport/write_check.h"

namespace kvbounce {
namespace loopback_internal {
namespace {

constexpr size_t kRemoteKeyBytes = 8;

std::vector<std::byte> EncodeRegionKey(uint64_t id) {
  std::vector<std::byte> key(kRemoteKeyBytes);
  for (size_t i = 0; i < kRemoteKeyBytes; ++i) {
    key[i] = static_cast<std::byte>((id >> (8 * i)) & 0xff);
  }
  return key;
}

uint64_t DecodeRegionKey(std::span<const std::byte> key) {
  uint64_t id = 0;
  for (size_t i = 0; i < kRemoteKeyBytes; ++i) {
    id |= static_cast<uint64_t>(key[i]) << (8 * i);
  }
  return id;
}

std::string HexAddr(Addr address) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "0x%" PRIx64, address.value());
  return buffer;
}

// What an endpoint with `options` offers (see LoopbackTransport::Caps).
TransportCaps LoopbackCaps(const LoopbackOptions& options) {
  TransportCaps caps;
  caps.name = "loopback";
  caps.host_memory = true;
  // Device memory through the GPU runtime, one copy call per operation
  // (docs/transports.md, "loopback").
  caps.device_memory = options.device_memory && CudaSupport() != nullptr;
  caps.map_remote = options.map_remote;
  caps.concurrent_callbacks = false;
  caps.pending_writes_fail = true;
  caps.writes_land_at_completion = true;  // the thread copies, then reports
  caps.cost.op_us = LoopbackTransport::kLoopbackOpUs;
  caps.cost.bytes_per_us = MemcpyBytesPerUs();
  caps.read_remote = options.read_remote;
  caps.read_cost = caps.cost;  // the same memcpy on the same thread
  caps.map_remote_read = options.map_remote_read;
  return caps;
}

}  // namespace

// One registered region. The descriptive fields are immutable; `registered`
// and `pins` are guarded by FabricImpl::regions_mu_.
struct RegionEntry {
  uint64_t id = 0;
  Addr address;
  uint64_t size = 0;
  MemoryKind kind = MemoryKind::kHost;
  int device = -1;  // kCuda: the device the memory belongs to
  uint64_t owner_endpoint_id = 0;
  bool registered = true;
  uint64_t pins = 0;  // copies in progress into or out of the region
};

class FabricImpl {
 public:
  uint64_t NextEndpointId() { return next_endpoint_id_.fetch_add(1, std::memory_order_relaxed); }
  uint64_t NextPeerId() { return next_peer_id_.fetch_add(1, std::memory_order_relaxed); }

  Status AddEndpoint(const std::string& name, const std::shared_ptr<Endpoint>& endpoint) {
    std::lock_guard<std::mutex> lock(endpoints_mu_);
    auto it = endpoints_.find(name);
    if (it != endpoints_.end() && !it->second.expired()) {
      return AlreadyExistsError("loopback fabric: an endpoint named '" + name + "' already exists");
    }
    endpoints_[name] = endpoint;
    return Status::Ok();
  }

  // Removes `name` when it still refers to `endpoint`.
  void RemoveEndpoint(const std::string& name, const Endpoint* endpoint) {
    std::lock_guard<std::mutex> lock(endpoints_mu_);
    auto it = endpoints_.find(name);
    if (it == endpoints_.end()) return;
    std::shared_ptr<Endpoint> current = it->second.lock();
    if (current == nullptr || current.get() == endpoint) endpoints_.erase(it);
  }

  std::shared_ptr<Endpoint> FindEndpoint(const std::string& name) const {
    std::lock_guard<std::mutex> lock(endpoints_mu_);
    auto it = endpoints_.find(name);
    return it == endpoints_.end() ? nullptr : it->second.lock();
  }

  size_t num_endpoints() const {
    std::lock_guard<std::mutex> lock(endpoints_mu_);
    size_t count = 0;
    for (const auto& [name, endpoint] : endpoints_) count += endpoint.expired() ? 0 : 1;
    return count;
  }

  std::shared_ptr<RegionEntry> AddRegion(Addr address, uint64_t size, MemoryPlace place,
                                         uint64_t owner_endpoint_id) {
    auto entry = std::make_shared<RegionEntry>();
    entry->address = address;
    entry->size = size;
    entry->kind = place.kind;
    entry->device = place.device;
    entry->owner_endpoint_id = owner_endpoint_id;
    std::lock_guard<std::mutex> lock(regions_mu_);
    entry->id = next_region_id_++;
    regions_.emplace(entry->id, entry);
    return entry;
  }

  // Deregisters `entry`, then waits until no copy touches it any more.
  void RemoveRegion(RegionEntry& entry) {
    std::unique_lock<std::mutex> lock(regions_mu_);
    entry.registered = false;
    regions_.erase(entry.id);
    regions_cv_.wait(lock, [&entry] { return entry.pins == 0; });
  }

  std::shared_ptr<RegionEntry> FindRegion(uint64_t id) const {
    std::lock_guard<std::mutex> lock(regions_mu_);
    auto it = regions_.find(id);
    return it == regions_.end() ? nullptr : it->second;
  }

  size_t num_regions() const {
    std::lock_guard<std::mutex> lock(regions_mu_);
    return regions_.size();
  }

  // Pins both regions of a copy (the copying endpoint's own region and the
  // peer's), or fails when either is deregistered. `local_role` and
  // `remote_role` name them in the message ("source", "target").
  Status Pin(RegionEntry& local, const char* local_role, RegionEntry& remote,
             const char* remote_role) {
    std::lock_guard<std::mutex> lock(regions_mu_);
    if (!local.registered) {
      return FailedPreconditionError(std::string(local_role) + " region #" +
                                     std::to_string(local.id) + " was deregistered");
    }
    if (!remote.registered) {
      return FailedPreconditionError(std::string(remote_role) + " region #" +
                                     std::to_string(remote.id) + " was deregistered by its owner");
    }
    ++local.pins;
    ++remote.pins;
    return Status::Ok();
  }

  void Unpin(RegionEntry& local, RegionEntry& remote) {
    bool wake = false;
    {
      std::lock_guard<std::mutex> lock(regions_mu_);
      --local.pins;
      --remote.pins;
      wake = (!local.registered && local.pins == 0) || (!remote.registered && remote.pins == 0);
    }
    if (wake) regions_cv_.notify_all();
  }

  // The same for one region (a mapped access).
  Status PinOne(RegionEntry& region) {
    std::lock_guard<std::mutex> lock(regions_mu_);
    if (!region.registered) {
      return FailedPreconditionError("region #" + std::to_string(region.id) +
                                     " was deregistered by its owner");
    }
    ++region.pins;
    return Status::Ok();
  }

  void UnpinOne(RegionEntry& region) {
    bool wake = false;
    {
      std::lock_guard<std::mutex> lock(regions_mu_);
      wake = --region.pins == 0 && !region.registered;
    }
    if (wake) regions_cv_.notify_all();
  }

  // Connection counters (see num_live_connections and
  // num_connections_awaiting_fence).
  void ConnectionOpened() { live_connections_.fetch_add(1, std::memory_order_relaxed); }
  void ConnectionClosed() { live_connections_.fetch_sub(1, std::memory_order_relaxed); }
  void FenceDeferred() { awaiting_fence_.fetch_add(1, std::memory_order_relaxed); }
  void FenceLifted() { awaiting_fence_.fetch_sub(1, std::memory_order_relaxed); }
  size_t num_live_connections() const { return live_connections_.load(std::memory_order_relaxed); }
  size_t num_awaiting_fence() const { return awaiting_fence_.load(std::memory_order_relaxed); }

  void SetWriteHook(LoopbackFabric::WriteHook hook) {
    auto shared =
        hook ? std::make_shared<const LoopbackFabric::WriteHook>(std::move(hook)) : nullptr;
    std::lock_guard<std::mutex> lock(hook_mu_);
    write_hook_ = std::move(shared);
  }

  std::shared_ptr<const LoopbackFabric::WriteHook> write_hook() const {
    std::lock_guard<std::mutex> lock(hook_mu_);
    return write_hook_;
  }

 private:
  std::atomic<uint64_t> next_endpoint_id_{1};
  std::atomic<uint64_t> next_peer_id_{1};

  mutable std::mutex endpoints_mu_;
  std::unordered_map<std::string, std::weak_ptr<Endpoint>> endpoints_;

  mutable std::mutex regions_mu_;
  std::condition_variable regions_cv_;
  std::unordered_map<uint64_t, std::shared_ptr<RegionEntry>> regions_;
  uint64_t next_region_id_ = 1;

  std::atomic<size_t> live_connections_{0};
  std::atomic<size_t> awaiting_fence_{0};

  mutable std::mutex hook_mu_;
  std::shared_ptr<const LoopbackFabric::WriteHook> write_hook_;
};

namespace {

class LoopbackLocalRegion final : public LocalRegion {
 public:
  LoopbackLocalRegion(std::shared_ptr<LoopbackFabric> fabric, FabricImpl* fabric_impl,
                      std::shared_ptr<RegionEntry> entry, const std::string& owner_address)
      : fabric_(std::move(fabric)), fabric_impl_(fabric_impl), entry_(std::move(entry)) {
    info_.address = entry_->address;
    info_.size = entry_->size;
    info_.kind = entry_->kind;
    info_.device = entry_->device;
    info_.remote_key = EncodeRegionKey(entry_->id);
    description_ = "loopback region #" + std::to_string(entry_->id) + " " +
                   HexAddr(entry_->address) + "+" + std::to_string(entry_->size) + " of " +
                   owner_address;
  }

  ~LoopbackLocalRegion() override { fabric_impl_->RemoveRegion(*entry_); }

  std::string_view Describe() const override { return description_; }
  const RegionInfo& info() const override { return info_; }

  const std::shared_ptr<RegionEntry>& entry() const { return entry_; }

 private:
  const std::shared_ptr<LoopbackFabric> fabric_;  // keeps fabric_impl_ alive
  FabricImpl* const fabric_impl_;
  const std::shared_ptr<RegionEntry> entry_;
  RegionInfo info_;
  std::string description_;
};

class LoopbackRemoteRegion final : public RemoteRegion {
 public:
  LoopbackRemoteRegion(PeerId peer, RegionInfo info, std::shared_ptr<RegionEntry> entry,
                       uint64_t importer_endpoint_id)
      : peer_(peer),
        info_(std::move(info)),
        entry_(std::move(entry)),
        importer_endpoint_id_(importer_endpoint_id) {}

  PeerId peer() const override { return peer_; }
  const RegionInfo& info() const override { return info_; }
  Addr mapped_address() const override { return info_.address; }

  const std::shared_ptr<RegionEntry>& entry() const { return entry_; }
  uint64_t importer_endpoint_id() const { return importer_endpoint_id_; }

 private:
  const PeerId peer_;
  const RegionInfo info_;
  const std::shared_ptr<RegionEntry> entry_;
  const uint64_t importer_endpoint_id_;
};

}  // namespace

// Both ends of one connection. `ends` and `fabric_impl` are immutable once
// the connection is published (inserted into an endpoint's peer table); the
// rest is guarded by `mu`. Lock order: Connection::mu, then
// Endpoint::queue_mu_ (then FabricImpl's counters, which are atomics).
struct Connection {
  struct End {
    std::weak_ptr<Endpoint> endpoint;
    uint64_t endpoint_id = 0;
    std::string address;
    PeerId peer = 0;  // the PeerId this end uses for the other end
    LoopbackOptions options;  // what this end offers (PeerCaps: both ends')
  };
  End ends[2];
  // Whoever holds a connection also holds the fabric (an endpoint, or a
  // mapped access), so this outlives the connection's users.
  FabricImpl* fabric_impl = nullptr;

  std::mutex mu;
  // Written under `mu`; also read without it, between the pieces of a write.
  std::atomic<bool> alive{true};
  Status reason;  // why it died; set once, with `alive` = false
  // The fence: write and read batches running and mapped accesses alive. When the
  // connection dies while this is not zero, the failure notifications wait
  // (`fence_pending`) until it is.
  uint64_t in_progress = 0;
  bool fence_pending = false;
  int initiator_side = 0;
  bool notify_initiator = false;
};

// One entry of a transport's queue.
struct Item {
  enum class Kind { kWrite, kRead, kFlush, kMessage, kPeerFailure };

  Kind kind = Kind::kFlush;
  PeerId peer = 0;
  int side = 0;  // which end of `conn` this transport is
  std::shared_ptr<Connection> conn;
  // kWrite (ops) and kRead (read_ops): every op copies src -> dst.
  std::span<const WriteOp> ops;
  std::span<const ReadOp> read_ops;
  uint64_t bytes = 0;  // of all ops
  std::shared_ptr<RegionEntry> local;   // kWrite: the source; kRead: the target
  std::shared_ptr<RegionEntry> remote;  // the peer's region
  std::stop_token stop;
  // kWrite, kRead, kFlush
  TransportDone done;
  // kMessage
  std::vector<std::byte> frame;
  // kPeerFailure
  Status reason;
  // Run by the driver of the endpoint's progress source, which took it when
  // no write hook was set: it runs without one.
  bool on_driver = false;
};

// All the state of one LoopbackTransport. Shared (weakly) with connections,
// so that a peer can queue into it while it exists.
class Endpoint : public std::enable_shared_from_this<Endpoint> {
 public:
  Endpoint(std::shared_ptr<LoopbackFabric> fabric, std::string name, uint64_t id,
           LoopbackOptions options)
      : fabric_(std::move(fabric)),
        fabric_impl_(*fabric_->impl_),
        name_(std::move(name)),
        address_(std::string(LoopbackTransport::kAddressPrefix) + name_),
        id_(id),
        options_(options) {}

  const std::string& name() const { return name_; }
  const std::string& address() const { return address_; }
  const LoopbackOptions& options() const { return options_; }

  Status Start(TransportCallbacks callbacks);
  Result<PeerId> Connect(std::string_view address);
  Status Send(PeerId peer, std::span<const std::byte> frame);
  Result<std::unique_ptr<LocalRegion>> Register(Addr address, uint64_t bytes, MemoryKind kind);
  Result<std::unique_ptr<RemoteRegion>> Import(PeerId peer, const RegionInfo& info);
  Status Write(const LocalRegion& source, const RemoteRegion& target, std::span<const WriteOp> ops,
               TransportDone done, std::stop_token stop);
  Status Read(const RemoteRegion& source, const LocalRegion& target, std::span<const ReadOp> ops,
              TransportDone done, std::stop_token stop);
  // BeginMappedAccess, or BeginMappedRead when `read_only`.
  Result<std::unique_ptr<MappedAccess>> BeginMappedAccess(const RemoteRegion& target,
                                                          bool read_only);
  Result<TransportCaps> PeerCaps(PeerId peer) const;
  Status Flush(PeerId peer, TransportDone done);
  void Disconnect(PeerId peer, const Status& reason);
  void Shutdown();
  TransportStats Stats() const;

  // Queues `item` (moved from only on success). False when the queue is
  // closed (the transport is shutting down).
  bool Enqueue(Item& item);

  // Progress on the caller's thread (see "Progress on a loop" in the
  // header): hands the queue to a driver; nullptr when already handed over,
  // shut down, or the eventfd cannot be made.
  std::unique_ptr<ProgressSource> TakeProgressSource();
  // The source's methods, on the driver's thread.
  bool DrivenPoll();
  bool DrivenPrepareToSleep();
  int wake_fd() const { return wake_fd_.get(); }
  // The source was destroyed: the thread serves the whole queue again.
  void Detach();

 private:
  enum class State { kCreated, kStarted, kShutDown };

  struct PeerEntry {
    std::shared_ptr<Connection> conn;
    int side = 0;
  };

  // How far a write or read batch got.
  struct Progress {
    enum class End { kCompleted, kStopped, kDied, kFailed };
    End end = End::kCompleted;
    size_t ops_copied = 0;  // ops copied whole
    uint64_t bytes_copied = 0;
    Status error;  // kFailed: why (a device copy failed)
  };

  // Inserts the accepting end of `conn` (side 1) into the peer table.
  Status Accept(const std::shared_ptr<Connection>& conn);
  Result<PeerEntry> LookupPeer(PeerId peer) const;
  // Queues an item of our own for a peer, if the connection is alive.
  Status EnqueueForPeer(Connection& conn, int side, Item& item);
  // kUnavailable naming the dead connection; `detail` is appended.
  // REQUIRES: conn.mu held.
  Status ClosedErrorLocked(const Connection& conn, int side, std::string_view detail = {}) const;

  void Loop();
  // Whether the driver hands `item` to the thread instead of running it:
  // a copy larger than kDriverCopyBytes or kDriverCopyOps, one of device
  // memory (the runtime's copies wait on a stream), or any copy while a
  // write hook is set (a test may block in it).
  bool RunsOnThread(const Item& item) const;
  // REQUIRES: queue_mu_ held. Wakes a sleeping driver that has work.
  void WakeDriverLocked();
  void Process(Item& item);
  void Abort(Item& item);
  // Runs a write or read batch (see "Writes" and "Reads" in the header).
  void ExecuteCopy(Item& item);
  // Copies the ops of a pinned, counted batch piece by piece (see the header).
  template <typename Op>
  Progress CopyOps(const Item& item, std::span<const Op> ops);
  // CopyOps when either region is device memory.
  template <typename Op>
  Progress CopyOpsOnDevice(const Item& item, std::span<const Op> ops);

  const std::shared_ptr<LoopbackFabric> fabric_;
  FabricImpl& fabric_impl_;
  const std::string name_;
  const std::string address_;
  const uint64_t id_;
  const LoopbackOptions options_;

  mutable std::mutex mu_;
  State state_ = State::kCreated;
  std::unordered_map<PeerId, PeerEntry> peers_;
  std::thread thread_;
  std::thread::id thread_id_;
  // Device copies of the transport thread (created on first use, for the
  // device of the last item that needed one). Used by that thread only.
  std::unique_ptr<OpCopier> op_copier_;
  int op_copier_device_ = -1;
  // A device item waits for its enqueued copies at least every this many
  // ops or bytes (its grain of cancellation).
  static constexpr size_t kDeviceWindowOps = 4096;
  static constexpr uint64_t kDeviceWindowBytes = 256ull << 20;

  std::mutex shutdown_mu_;  // serializes Shutdown calls

  std::mutex queue_mu_;
  std::condition_variable queue_cv_;
  std::deque<Item> queue_;
  std::atomic<uint64_t> enqueued_{0};  // items queued ever (read while polling)
  bool queue_closed_ = false;
  // Set when Shutdown starts: the thread fails or drops what it pops.
  std::atomic<bool> aborting_{false};

  // Progress on a driver (TakeProgressSource), guarded by queue_mu_:
  // while `driven_`, the driver takes items from the queue's head in order
  // and runs them, except those RunsOnThread, which it hands to the thread
  // (`thread_item_`) and waits for: `thread_busy_` from the hand-over (or,
  // undriven, from the thread's pop) until the item ran, and nobody takes
  // the next item meanwhile. One item runs at a time, in queue order.
  bool source_taken_ = false;
  bool driven_ = false;
  bool thread_busy_ = false;
  std::optional<Item> thread_item_;
  bool driver_sleeping_ = false;  // between PrepareToSleep and the next Poll
  UniqueFd wake_fd_;              // readable when a sleeping driver has work
  // Held by the driver while it runs items; Shutdown takes it to fail what
  // is left once no item runs.
  std::mutex poll_mu_;
  // The endpoint whose items this thread is running as a driver, if any.
  static thread_local const Endpoint* driving_;
  static constexpr uint64_t kDriverCopyBytes = 64 * 1024;
  static constexpr size_t kDriverCopyOps = 64;
  static constexpr int kItemsPerPoll = 16;

  // Written by Start before the thread exists, then used by the thread only.
  TransportCallbacks callbacks_;

  std::atomic<uint64_t> write_ops_{0};
  std::atomic<uint64_t> write_bytes_{0};
  std::atomic<uint64_t> failed_write_ops_{0};
  std::atomic<uint64_t> read_ops_{0};
  std::atomic<uint64_t> read_bytes_{0};
  std::atomic<uint64_t> flushes_{0};
  std::atomic<uint64_t> messages_sent_{0};
  std::atomic<uint64_t> messages_received_{0};
};

namespace {

// Queues on_peer_failure for the ends of dead `conn` (the initiator's own
// end only when it asked). REQUIRES: conn.mu held, conn dead.
void NotifyLocked(Connection& conn) {
  const int initiator = conn.initiator_side;
  for (int side = 0; side < 2; ++side) {
    if (side == initiator && !conn.notify_initiator) continue;
    std::shared_ptr<Endpoint> endpoint = conn.ends[side].endpoint.lock();
    if (endpoint == nullptr) continue;
    Item item;
    item.kind = Item::Kind::kPeerFailure;
    item.peer = conn.ends[side].peer;
    item.side = side;
    item.reason =
        side == initiator
            ? conn.reason
            : conn.reason.WithContext(conn.ends[initiator].address + " closed the connection");
    endpoint->Enqueue(item);
  }
}

// Counts an operation of `conn` in progress; false when it is dead.
// REQUIRES: conn.mu held.
bool EnterLocked(Connection& conn) {
  if (!conn.alive.load(std::memory_order_relaxed)) return false;
  ++conn.in_progress;
  return true;
}

// Ends an operation counted by EnterLocked; the last one out of a dead
// connection lifts the fence. REQUIRES: conn.mu held.
void ExitLocked(Connection& conn) {
  if (--conn.in_progress == 0 && conn.fence_pending) {
    conn.fence_pending = false;
    conn.fabric_impl->FenceLifted();
    NotifyLocked(conn);
  }
}

// Marks `conn` dead and queues on_peer_failure for its ends (the initiator's
// own end only when `notify_initiator`), at once or, while operations of it
// are in progress, when the last one ends. REQUIRES: conn.mu held, alive.
void KillLocked(Connection& conn, const Status& reason, int initiator_side, bool notify_initiator) {
  conn.reason = reason;
  conn.alive.store(false, std::memory_order_release);
  conn.initiator_side = initiator_side;
  conn.notify_initiator = notify_initiator;
  conn.fabric_impl->ConnectionClosed();
  if (conn.in_progress == 0) {
    NotifyLocked(conn);
  } else {
    conn.fence_pending = true;
    conn.fabric_impl->FenceDeferred();
  }
}

// The guard BeginMappedAccess returns: a pin on the region and an operation
// in progress on the connection, both released by the destructor.
class LoopbackMappedAccess final : public MappedAccess {
 public:
  LoopbackMappedAccess(std::shared_ptr<LoopbackFabric> fabric, FabricImpl* fabric_impl,
                       std::shared_ptr<Connection> conn, std::shared_ptr<RegionEntry> region)
      : fabric_(std::move(fabric)),
        fabric_impl_(fabric_impl),
        conn_(std::move(conn)),
        region_(std::move(region)) {}

  ~LoopbackMappedAccess() override {
    fabric_impl_->UnpinOne(*region_);
    std::lock_guard<std::mutex> lock(conn_->mu);
    ExitLocked(*conn_);
  }

 private:
  const std::shared_ptr<LoopbackFabric> fabric_;  // keeps fabric_impl_ alive
  FabricImpl* const fabric_impl_;
  const std::shared_ptr<Connection> conn_;
  const std::shared_ptr<RegionEntry> region_;
};

}  // namespace

Status Endpoint::Start(TransportCallbacks callbacks) {
  std::lock_guard<std::mutex> lock(mu_);
  if (state_ == State::kShutDown) return AbortedError(address_ + " is shut down");
  if (state_ == State::kStarted) return FailedPreconditionError(address_ + " is already started");
  callbacks_ = std::move(callbacks);
  // std::thread reports failure by throwing; the library reports Status.
  try {
    thread_ = std::thread([this] { Loop(); });
  } catch (const std::system_error& e) {
    callbacks_ = {};
    return ResourceExhaustedError(address_ + ": cannot start the transport thread: " + e.what());
  }
  thread_id_ = thread_.get_id();
  state_ = State::kStarted;
  return Status::Ok();
}

Status Endpoint::Accept(const std::shared_ptr<Connection>& conn) {
  std::lock_guard<std::mutex> lock(mu_);
  if (state_ != State::kStarted) {
    return UnavailableError("endpoint " + address_ + " is not accepting connections (" +
                            (state_ == State::kCreated ? "not started" : "shut down") + ")");
  }
  peers_.emplace(conn->ends[1].peer, PeerEntry{conn, 1});
  return Status::Ok();
}

Result<PeerId> Endpoint::Connect(std::string_view address) {
  const std::string_view prefix = LoopbackTransport::kAddressPrefix;
  if (!address.starts_with(prefix) || address.size() == prefix.size()) {
    return InvalidArgumentError("malformed loopback address '" + std::string(address) +
                                "': expected '" + std::string(prefix) + "<name>'");
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (state_ == State::kShutDown) return AbortedError(address_ + " is shut down");
    if (state_ == State::kCreated) return FailedPreconditionError(address_ + " is not started");
  }
  std::shared_ptr<Endpoint> remote =
      fabric_impl_.FindEndpoint(std::string(address.substr(prefix.size())));
  if (remote == nullptr) {
    return UnavailableError("no loopback endpoint at '" + std::string(address) + "'");
  }
  auto conn = std::make_shared<Connection>();
  conn->ends[0] = {weak_from_this(), id_, address_, fabric_impl_.NextPeerId(), options_};
  conn->ends[1] = {remote, remote->id_, remote->address_, fabric_impl_.NextPeerId(),
                   remote->options_};
  conn->fabric_impl = &fabric_impl_;
  // Counted before it is published: whoever kills it may do so at once.
  fabric_impl_.ConnectionOpened();
  if (Status accepted = remote->Accept(conn); !accepted.ok()) {
    fabric_impl_.ConnectionClosed();
    return accepted;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (state_ == State::kStarted) {
      peers_.emplace(conn->ends[0].peer, PeerEntry{conn, 0});
      return conn->ends[0].peer;
    }
  }
  // Shut down while connecting: the accepting end holds a dead connection.
  Status reason = UnavailableError("endpoint " + address_ + " shut down");
  {
    std::lock_guard<std::mutex> lock(conn->mu);
    if (conn->alive) KillLocked(*conn, reason, 0, /*notify_initiator=*/false);
  }
  return AbortedError(address_ + " is shut down");
}

Result<Endpoint::PeerEntry> Endpoint::LookupPeer(PeerId peer) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (state_ == State::kCreated) return FailedPreconditionError(address_ + " is not started");
  if (state_ == State::kShutDown) return AbortedError(address_ + " is shut down");
  auto it = peers_.find(peer);
  if (it == peers_.end()) {
    return NotFoundError(address_ + ": unknown peer " + std::to_string(peer));
  }
  return it->second;
}

thread_local const Endpoint* Endpoint::driving_ = nullptr;

bool Endpoint::Enqueue(Item& item) {
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    if (queue_closed_) return false;
    queue_.push_back(std::move(item));
    enqueued_.fetch_add(1, std::memory_order_release);
    if (driven_) {
      WakeDriverLocked();
      return true;
    }
  }
  queue_cv_.notify_one();
  return true;
}

void Endpoint::WakeDriverLocked() {
  if (!driver_sleeping_ || thread_busy_ || queue_.empty()) return;
  driver_sleeping_ = false;
  const uint64_t one = 1;
  // An eventfd write fails only when its counter would overflow, and then
  // it is readable already.
  [[maybe_unused]] const ssize_t n = ::write(wake_fd_.get(), &one, sizeof(one));
}

bool Endpoint::RunsOnThread(const Item& item) const {
  if (item.kind != Item::Kind::kWrite && item.kind != Item::Kind::kRead) return false;
  const size_t ops = item.kind == Item::Kind::kWrite ? item.ops.size() : item.read_ops.size();
  return item.bytes > kDriverCopyBytes || ops > kDriverCopyOps ||
         item.local->kind == MemoryKind::kCuda || item.remote->kind == MemoryKind::kCuda ||
         fabric_impl_.write_hook() != nullptr;
}

namespace {

class LoopbackSource final : public ProgressSource {
 public:
  explicit LoopbackSource(std::shared_ptr<Endpoint> endpoint) : endpoint_(std::move(endpoint)) {}
  ~LoopbackSource() override { endpoint_->Detach(); }
  int fd() const override { return endpoint_->wake_fd(); }
  bool Poll() override { return endpoint_->DrivenPoll(); }
  bool PrepareToSleep(std::chrono::microseconds* /*max_sleep*/) override {
    return endpoint_->DrivenPrepareToSleep();
  }

 private:
  const std::shared_ptr<Endpoint> endpoint_;
};

}  // namespace

std::unique_ptr<ProgressSource> Endpoint::TakeProgressSource() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (state_ == State::kShutDown) return nullptr;
  }
  std::lock_guard<std::mutex> lock(queue_mu_);
  if (source_taken_ || queue_closed_) return nullptr;
  UniqueFd fd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!fd.valid()) {
    Log(LogLevel::kWarning, address_ + ": no eventfd for progress on a loop (" +
                                std::strerror(errno) + "); the endpoint's thread keeps it");
    return nullptr;
  }
  wake_fd_ = std::move(fd);
  source_taken_ = true;
  driven_ = true;
  driver_sleeping_ = false;
  return std::make_unique<LoopbackSource>(shared_from_this());
}

bool Endpoint::DrivenPoll() {
  std::lock_guard<std::mutex> poll_lock(poll_mu_);
  bool did = false;
  bool handed = false;
  for (int n = 0; n < kItemsPerPoll; ++n) {
    Item item;
    {
      std::lock_guard<std::mutex> lock(queue_mu_);
      driver_sleeping_ = false;
      if (!driven_ || thread_busy_ || queue_.empty()) break;
      did = true;
      if (RunsOnThread(queue_.front())) {
        thread_item_.emplace(std::move(queue_.front()));
        queue_.pop_front();
        thread_busy_ = true;
        handed = true;
        break;
      }
      item = std::move(queue_.front());
      queue_.pop_front();
    }
    item.on_driver = true;
    driving_ = this;
    if (aborting_.load()) {
      Abort(item);
    } else {
      Process(item);
    }
    driving_ = nullptr;
  }
  if (handed) queue_cv_.notify_one();
  return did;
}

bool Endpoint::DrivenPrepareToSleep() {
  std::lock_guard<std::mutex> lock(queue_mu_);
  if (!driven_) return true;
  if (!queue_.empty() && !thread_busy_) return false;
  uint64_t drained = 0;
  while (::read(wake_fd_.get(), &drained, sizeof(drained)) > 0) {
  }
  driver_sleeping_ = true;
  return true;
}

void Endpoint::Detach() {
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    driven_ = false;
    driver_sleeping_ = false;
  }
  queue_cv_.notify_all();
}

Status Endpoint::ClosedErrorLocked(const Connection& conn, int side,
                                   std::string_view detail) const {
  std::string message = address_ + ": connection to " + conn.ends[1 - side].address + " (peer " +
                        std::to_string(conn.ends[side].peer) +
                        ") is closed: " + conn.reason.ToString();
  message += detail;
  return UnavailableError(message);
}

Status Endpoint::EnqueueForPeer(Connection& conn, int side, Item& item) {
  std::lock_guard<std::mutex> lock(conn.mu);
  if (!conn.alive) return ClosedErrorLocked(conn, side);
  if (!Enqueue(item)) return AbortedError(address_ + " is shut down");
  return Status::Ok();
}

Status Endpoint::Send(PeerId peer, std::span<const std::byte> frame) {
  KVB_ASSIGN_OR_RETURN(PeerEntry entry, LookupPeer(peer));
  const Connection::End& remote_end = entry.conn->ends[1 - entry.side];
  Item item;
  item.kind = Item::Kind::kMessage;
  item.peer = remote_end.peer;
  item.side = 1 - entry.side;
  item.conn = entry.conn;
  item.frame.assign(frame.begin(), frame.end());
  std::shared_ptr<Endpoint> remote = remote_end.endpoint.lock();
  {
    std::lock_guard<std::mutex> lock(entry.conn->mu);
    if (!entry.conn->alive) return ClosedErrorLocked(*entry.conn, entry.side);
    // The remote closes its queue only after killing all its connections,
    // so this only fails in a race with its shutdown.
    if (remote == nullptr || !remote->Enqueue(item)) {
      return UnavailableError(address_ + ": " + remote_end.address + " is gone");
    }
  }
  messages_sent_.fetch_add(1, std::memory_order_relaxed);
  return Status::Ok();
}

Result<std::unique_ptr<LocalRegion>> Endpoint::Register(Addr address, uint64_t bytes,
                                                        MemoryKind kind) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (state_ == State::kShutDown) return AbortedError(address_ + " is shut down");
  }
  if (bytes == 0) return InvalidArgumentError(address_ + ": cannot register an empty region");
  if (address == Addr()) {
    return InvalidArgumentError(address_ + ": cannot register a region at address 0");
  }
  if (bytes > std::numeric_limits<uint64_t>::max() - address.value()) {
    return InvalidArgumentError(address_ + ": region " + HexAddr(address) + "+" +
                                std::to_string(bytes) + " wraps around the address space");
  }
  MemoryPlace place{kind, -1};
  if (!IsHostAccessible(kind)) {
    const DeviceSupport* device = CudaSupport();
    if (kind != MemoryKind::kCuda || device == nullptr) {
      return InvalidArgumentError(address_ + ": the loopback transport cannot reach " +
                                  std::string(MemoryKindName(kind)) +
                                  " memory in a build without CUDA");
    }
    if (!options_.device_memory) {
      return InvalidArgumentError(address_ +
                                  ": this loopback endpoint reaches host memory only "
                                  "(LoopbackOptions::device_memory is off)");
    }
    Result<MemoryPlace> located = device->Locate(address);
    if (!located.ok()) return located.status().WithContext(address_ + ": registering cuda memory");
    if (located->kind != MemoryKind::kCuda) {
      return InvalidArgumentError(address_ + ": region " + HexAddr(address) +
                                  " is registered as cuda memory but is " +
                                  std::string(MemoryKindName(located->kind)) + " memory");
    }
    place = *located;
  }
  std::shared_ptr<RegionEntry> entry = fabric_impl_.AddRegion(address, bytes, place, id_);
  return std::unique_ptr<LocalRegion>(
      new LoopbackLocalRegion(fabric_, &fabric_impl_, std::move(entry), address_));
}

Result<std::unique_ptr<RemoteRegion>> Endpoint::Import(PeerId peer, const RegionInfo& info) {
  KVB_ASSIGN_OR_RETURN(PeerEntry entry, LookupPeer(peer));
  {
    std::lock_guard<std::mutex> lock(entry.conn->mu);
    if (!entry.conn->alive) return ClosedErrorLocked(*entry.conn, entry.side);
  }
  const Connection::End& remote_end = entry.conn->ends[1 - entry.side];
  if (info.remote_key.size() != kRemoteKeyBytes) {
    return InvalidArgumentError(address_ + ": a loopback remote key has " +
                                std::to_string(kRemoteKeyBytes) + " bytes, got " +
                                std::to_string(info.remote_key.size()));
  }
  const uint64_t id = DecodeRegionKey(info.remote_key);
  std::shared_ptr<RegionEntry> region = fabric_impl_.FindRegion(id);
  if (region == nullptr) {
    return NotFoundError(address_ + ": region #" + std::to_string(id) + " of " +
                         remote_end.address + " is not registered");
  }
  if (region->owner_endpoint_id != remote_end.endpoint_id) {
    return InvalidArgumentError(address_ + ": region #" + std::to_string(id) +
                                " does not belong to peer " + std::to_string(peer) + " (" +
                                remote_end.address + ")");
  }
  if (region->address != info.address || region->size != info.size || region->kind != info.kind) {
    return InvalidArgumentError(
        address_ + ": region #" + std::to_string(id) + " of " + remote_end.address + " is " +
        HexAddr(region->address) + "+" + std::to_string(region->size) + " (" +
        std::string(MemoryKindName(region->kind)) + "), but the info says " +
        HexAddr(info.address) + "+" + std::to_string(info.size) + " (" +
        std::string(MemoryKindName(info.kind)) + ")");
  }
  return std::unique_ptr<RemoteRegion>(
      new LoopbackRemoteRegion(peer, info, std::move(region), id_));
}

Status Endpoint::Write(const LocalRegion& source, const RemoteRegion& target,
                       std::span<const WriteOp> ops, TransportDone done, std::stop_token stop) {
  KVB_ASSIGN_OR_RETURN(PeerEntry entry, LookupPeer(target.peer()));
  const auto* src = dynamic_cast<const LoopbackLocalRegion*>(&source);
  if (src == nullptr || src->entry()->owner_endpoint_id != id_) {
    return InvalidArgumentError(address_ +
                                ": the write's source region was not registered "
                                "with this transport");
  }
  const auto* dst = dynamic_cast<const LoopbackRemoteRegion*>(&target);
  if (dst == nullptr || dst->importer_endpoint_id() != id_) {
    return InvalidArgumentError(address_ +
                                ": the write's target region was not imported "
                                "by this transport");
  }
  if (!done) return InvalidArgumentError(address_ + ": Write needs a done callback");
  KVB_ASSIGN_OR_RETURN(uint64_t bytes, CheckWriteOps(src->info(), dst->info(), ops));

  Item item;
  item.kind = Item::Kind::kWrite;
  item.peer = target.peer();
  item.side = entry.side;
  item.conn = entry.conn;
  item.ops = ops;
  item.bytes = bytes;
  item.local = src->entry();
  item.remote = dst->entry();
  item.stop = std::move(stop);
  item.done = std::move(done);
  // Counted before queueing, so that a `done` observer sees its own ops.
  write_ops_.fetch_add(ops.size(), std::memory_order_relaxed);
  write_bytes_.fetch_add(bytes, std::memory_order_relaxed);
  Status status = EnqueueForPeer(*entry.conn, entry.side, item);
  if (!status.ok()) {
    write_ops_.fetch_sub(ops.size(), std::memory_order_relaxed);
    write_bytes_.fetch_sub(bytes, std::memory_order_relaxed);
  }
  return status;
}

Status Endpoint::Read(const RemoteRegion& source, const LocalRegion& target,
                      std::span<const ReadOp> ops, TransportDone done, std::stop_token stop) {
  if (!options_.read_remote) {
    return UnimplementedError(address_ + ": reading peer memory is turned off (read_remote)");
  }
  KVB_ASSIGN_OR_RETURN(PeerEntry entry, LookupPeer(source.peer()));
  const auto* src = dynamic_cast<const LoopbackRemoteRegion*>(&source);
  if (src == nullptr || src->importer_endpoint_id() != id_) {
    return InvalidArgumentError(address_ +
                                ": the read's source region was not imported by this transport");
  }
  const auto* dst = dynamic_cast<const LoopbackLocalRegion*>(&target);
  if (dst == nullptr || dst->entry()->owner_endpoint_id != id_) {
    return InvalidArgumentError(address_ +
                                ": the read's target region was not registered "
                                "with this transport");
  }
  const Connection::End& remote_end = entry.conn->ends[1 - entry.side];
  if (!remote_end.options.read_remote) {
    return UnimplementedError(address_ + ": " + remote_end.address +
                              " does not offer its memory to be read (read_remote)");
  }
  if (!done) return InvalidArgumentError(address_ + ": Read needs a done callback");
  KVB_ASSIGN_OR_RETURN(uint64_t bytes, CheckReadOps(src->info(), dst->info(), ops));

  Item item;
  item.kind = Item::Kind::kRead;
  item.peer = source.peer();
  item.side = entry.side;
  item.conn = entry.conn;
  item.read_ops = ops;
  item.bytes = bytes;
  item.local = dst->entry();
  item.remote = src->entry();
  item.stop = std::move(stop);
  item.done = std::move(done);
  return EnqueueForPeer(*entry.conn, entry.side, item);
}

Result<TransportCaps> Endpoint::PeerCaps(PeerId peer) const {
  KVB_ASSIGN_OR_RETURN(PeerEntry entry, LookupPeer(peer));
  const LoopbackOptions& remote = entry.conn->ends[1 - entry.side].options;
  TransportCaps caps = LoopbackCaps(options_);
  caps.map_remote = caps.map_remote && remote.map_remote;
  caps.read_remote = caps.read_remote && remote.read_remote;
  caps.map_remote_read = caps.map_remote_read && remote.map_remote_read;
  return caps;
}

Result<std::unique_ptr<MappedAccess>> Endpoint::BeginMappedAccess(const RemoteRegion& target,
                                                                  bool read_only) {
  const char* option = read_only ? "map_remote_read" : "map_remote";
  if (!(read_only ? options_.map_remote_read : options_.map_remote)) {
    return UnimplementedError(address_ + ": mapping peer memory " +
                              (read_only ? "for reading " : "") + "is turned off (" + option + ")");
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (state_ == State::kShutDown) return AbortedError(address_ + " is shut down");
  }
  const auto* region = dynamic_cast<const LoopbackRemoteRegion*>(&target);
  if (region == nullptr || region->importer_endpoint_id() != id_) {
    return InvalidArgumentError(address_ +
                                ": the mapped region was not imported by this transport");
  }
  KVB_ASSIGN_OR_RETURN(PeerEntry entry, LookupPeer(target.peer()));
  if (const Connection::End& remote_end = entry.conn->ends[1 - entry.side];
      !(read_only ? remote_end.options.map_remote_read : remote_end.options.map_remote)) {
    return UnimplementedError(address_ + ": " + remote_end.address +
                              " does not offer its memory to be mapped (" + option + ")");
  }
  {
    std::lock_guard<std::mutex> lock(entry.conn->mu);
    if (!EnterLocked(*entry.conn)) return ClosedErrorLocked(*entry.conn, entry.side);
  }
  // Counted first: from here on a failure of the connection waits for us.
  if (Status pinned = fabric_impl_.PinOne(*region->entry()); !pinned.ok()) {
    std::lock_guard<std::mutex> lock(entry.conn->mu);
    ExitLocked(*entry.conn);
    return pinned.WithContext(address_ + ": cannot map " +
                              entry.conn->ends[1 - entry.side].address + "'s region");
  }
  return std::unique_ptr<MappedAccess>(
      new LoopbackMappedAccess(fabric_, &fabric_impl_, entry.conn, region->entry()));
}

Status Endpoint::Flush(PeerId peer, TransportDone done) {
  KVB_ASSIGN_OR_RETURN(PeerEntry entry, LookupPeer(peer));
  if (!done) return InvalidArgumentError(address_ + ": Flush needs a done callback");
  Item item;
  item.kind = Item::Kind::kFlush;
  item.peer = peer;
  item.side = entry.side;
  item.conn = entry.conn;
  item.done = std::move(done);
  KVB_RETURN_IF_ERROR(EnqueueForPeer(*entry.conn, entry.side, item));
  flushes_.fetch_add(1, std::memory_order_relaxed);
  return Status::Ok();
}

void Endpoint::Disconnect(PeerId peer, const Status& reason) {
  Result<PeerEntry> entry = LookupPeer(peer);
  if (!entry.ok()) {
    Log(LogLevel::kDebug, "loopback Disconnect ignored: " + entry.status().ToString());
    return;
  }
  Status why = reason.ok() ? UnavailableError("disconnected") : reason;
  std::lock_guard<std::mutex> lock(entry->conn->mu);
  if (entry->conn->alive) KillLocked(*entry->conn, why, entry->side, /*notify_initiator=*/true);
}

void Endpoint::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (state_ == State::kStarted &&
        (std::this_thread::get_id() == thread_id_ || driving_ == this)) {
      Log(LogLevel::kError, address_ +
                                " shut down (or destroyed) on its own thread, from a callback; "
                                "aborting");
      std::abort();
    }
  }
  std::lock_guard<std::mutex> shutdown_lock(shutdown_mu_);
  std::vector<PeerEntry> peers;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (state_ == State::kShutDown) return;
    state_ = State::kShutDown;
    peers.reserve(peers_.size());
    for (const auto& [id, entry] : peers_) peers.push_back(entry);
  }
  aborting_.store(true);
  fabric_impl_.RemoveEndpoint(name_, this);
  const Status reason = UnavailableError("endpoint " + address_ + " shut down");
  for (const PeerEntry& entry : peers) {
    std::lock_guard<std::mutex> lock(entry.conn->mu);
    if (entry.conn->alive) KillLocked(*entry.conn, reason, entry.side, /*notify_initiator=*/false);
  }
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    queue_closed_ = true;
  }
  queue_cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  // Without a thread nothing could be queued; fail whatever is there anyway
  // (a driver's items: once it runs none).
  std::deque<Item> left;
  {
    std::lock_guard<std::mutex> poll_lock(poll_mu_);
    std::lock_guard<std::mutex> lock(queue_mu_);
    left.swap(queue_);
    if (thread_item_.has_value()) {  // handed over, never started (no thread)
      left.push_front(std::move(*thread_item_));
      thread_item_.reset();
    }
    thread_busy_ = false;
  }
  for (Item& item : left) Abort(item);
  {
    std::lock_guard<std::mutex> lock(mu_);
    peers_.clear();
  }
  callbacks_ = {};
}

void Endpoint::Loop() {
  for (;;) {
    Item item;
    {
      std::unique_lock<std::mutex> lock(queue_mu_);
      // Undriven, the thread serves the queue; driven, only what the
      // driver hands it.
      const auto ready = [this] {
        return queue_closed_ || thread_item_.has_value() || (!driven_ && !queue_.empty());
      };
      if (!ready() && !driven_ && options_.poll_before_sleep.count() > 0) {
        // Look for more a while before sleeping (LoopbackOptions::
        // poll_before_sleep), yielding the core meanwhile.
        const uint64_t seen = enqueued_.load(std::memory_order_relaxed);
        lock.unlock();
        PollForCounter(enqueued_, seen, options_.poll_before_sleep);
        lock.lock();
      }
      queue_cv_.wait(lock, ready);
      if (thread_item_.has_value()) {
        item = std::move(*thread_item_);
        thread_item_.reset();
      } else if (!driven_ && !queue_.empty()) {
        item = std::move(queue_.front());
        queue_.pop_front();
        thread_busy_ = true;
      } else {
        return;  // closed, and nothing of ours left (Shutdown fails a driver's)
      }
    }
    if (aborting_.load()) {
      Abort(item);
    } else {
      Process(item);
    }
    std::lock_guard<std::mutex> lock(queue_mu_);
    thread_busy_ = false;
    if (driven_) WakeDriverLocked();
  }
}

void Endpoint::Process(Item& item) {
  switch (item.kind) {
    case Item::Kind::kWrite:
    case Item::Kind::kRead:
      ExecuteCopy(item);
      break;
    case Item::Kind::kFlush: {
      Status status;
      {
        std::lock_guard<std::mutex> lock(item.conn->mu);
        if (!item.conn->alive) status = ClosedErrorLocked(*item.conn, item.side);
      }
      item.done(std::move(status));
      break;
    }
    case Item::Kind::kMessage:
      messages_received_.fetch_add(1, std::memory_order_relaxed);
      if (callbacks_.on_message) callbacks_.on_message(item.peer, std::move(item.frame));
      break;
    case Item::Kind::kPeerFailure:
      if (callbacks_.on_peer_failure) callbacks_.on_peer_failure(item.peer, item.reason);
      break;
  }
}

void Endpoint::ExecuteCopy(Item& item) {
  Connection& conn = *item.conn;
  const bool read = item.kind == Item::Kind::kRead;
  const size_t num_ops = read ? item.read_ops.size() : item.ops.size();
  const std::string what =
      std::string(read ? "read from " : "write to ") + conn.ends[1 - item.side].address;
  // What was not copied, for the messages of a batch that ended early.
  auto skipped = [&](const Progress& progress) {
    return std::to_string(num_ops - progress.ops_copied) + " of " + std::to_string(num_ops) +
           " ops (" + std::to_string(item.bytes - progress.bytes_copied) + " of " +
           std::to_string(item.bytes) + " bytes) not copied";
  };
  // Counted before `done` runs, so that its observer sees its own ops.
  auto count = [&](const Progress& progress) {
    if (read) {
      read_ops_.fetch_add(progress.ops_copied, std::memory_order_relaxed);
      read_bytes_.fetch_add(progress.bytes_copied, std::memory_order_relaxed);
    } else if (progress.ops_copied < num_ops) {
      failed_write_ops_.fetch_add(num_ops - progress.ops_copied, std::memory_order_relaxed);
    }
  };

  Status refused;
  {
    std::lock_guard<std::mutex> lock(conn.mu);
    if (!EnterLocked(conn)) refused = ClosedErrorLocked(conn, item.side);
  }
  if (!refused.ok()) {
    count(Progress{});
    return item.done(std::move(refused));
  }
  Progress progress;
  if (num_ops > 0 && item.stop.stop_requested()) {
    refused =
        CancelledError(address_ + ": " + what + " stopped before it started: " + skipped(progress));
  } else {
    refused = read ? fabric_impl_.Pin(*item.local, "target", *item.remote, "source")
                   : fabric_impl_.Pin(*item.local, "source", *item.remote, "target");
    if (refused.ok()) {
      progress = read ? CopyOps(item, item.read_ops) : CopyOps(item, item.ops);
      fabric_impl_.Unpin(*item.local, *item.remote);
    }
  }
  Status status;
  {
    std::lock_guard<std::mutex> lock(conn.mu);
    if (progress.end == Progress::End::kDied) {
      status = ClosedErrorLocked(conn, item.side, "; " + skipped(progress));
    }
    // The memcpys are over: the fence may lift (and queue our own
    // notification behind the `done` below).
    ExitLocked(conn);
  }
  if (!refused.ok()) {
    count(Progress{});
    return item.done(std::move(refused));
  }
  if (progress.end == Progress::End::kStopped) {
    status = CancelledError(address_ + ": " + what + " stopped: " + skipped(progress));
  } else if (progress.end == Progress::End::kFailed) {
    status = progress.error.WithContext(what + ": " + skipped(progress));
  }
  count(progress);
  item.done(std::move(status));
}

template <typename Op>
Endpoint::Progress Endpoint::CopyOps(const Item& item, std::span<const Op> ops) {
  if (item.local->kind == MemoryKind::kCuda || item.remote->kind == MemoryKind::kCuda) {
    return CopyOpsOnDevice(item, ops);
  }
  // A driver's copy runs without the hook (RunsOnThread: there was none).
  const std::shared_ptr<const LoopbackFabric::WriteHook> hook =
      item.on_driver ? nullptr : fabric_impl_.write_hook();
  const Connection& conn = *item.conn;
  Progress progress;
  for (size_t i = 0; i < ops.size(); ++i) {
    const Op& op = ops[i];
    uint64_t offset = 0;
    do {
      if (hook != nullptr) (*hook)(address_, i);
      if (!conn.alive.load(std::memory_order_acquire)) {
        progress.end = Progress::End::kDied;
      } else if (item.stop.stop_requested()) {
        progress.end = Progress::End::kStopped;
      }
      if (progress.end != Progress::End::kCompleted) {
        progress.bytes_copied += offset;
        return progress;
      }
      const uint64_t piece = std::min(op.bytes - offset, LoopbackTransport::kWriteGrainBytes);
      if (piece > 0) {
        CopyBytes((op.dst + offset).ToPointer(), (op.src + offset).ToPointer(), piece);
      }
      offset += piece;
    } while (offset < op.bytes);
    progress.bytes_copied += op.bytes;
    ++progress.ops_copied;
  }
  return progress;
}

template <typename Op>
Endpoint::Progress Endpoint::CopyOpsOnDevice(const Item& item, std::span<const Op> ops) {
  // One runtime copy per op (the per-operation cost a descriptor-list
  // transport pays for device memory), enqueued on this thread's stream. The
  // stop token and the connection are checked between windows of ops, and
  // every window is waited for before the next check: the grain of
  // cancellation is one window, and nothing enqueued is still running when
  // the item reports (the fence and `done` come after Wait).
  const std::shared_ptr<const LoopbackFabric::WriteHook> hook = fabric_impl_.write_hook();
  const Connection& conn = *item.conn;
  Progress progress;
  const int device =
      item.local->kind == MemoryKind::kCuda ? item.local->device : item.remote->device;
  if (op_copier_ == nullptr || op_copier_device_ != device) {
    op_copier_.reset();
    Result<std::unique_ptr<OpCopier>> copier = CudaSupport()->NewOpCopier(device);
    if (!copier.ok()) {
      progress.end = Progress::End::kFailed;
      progress.error = copier.status().WithContext(address_ + ": device copies");
      return progress;
    }
    op_copier_ = std::move(copier).value();
    op_copier_device_ = device;
  }
  size_t window_start = 0;
  uint64_t window_bytes = 0;
  auto finish_window = [&](size_t end) -> bool {
    Status waited = op_copier_->Wait();
    if (!waited.ok()) {
      progress.end = Progress::End::kFailed;
      progress.error = waited.WithContext(address_ + ": device copies");
      return false;
    }
    for (size_t j = window_start; j < end; ++j) progress.bytes_copied += ops[j].bytes;
    progress.ops_copied = end;
    window_start = end;
    window_bytes = 0;
    return true;
  };
  for (size_t i = 0; i < ops.size(); ++i) {
    if (hook != nullptr) (*hook)(address_, i);
    const bool window_full =
        i - window_start >= kDeviceWindowOps || window_bytes >= kDeviceWindowBytes;
    if (i == 0 || window_full) {
      if (i > 0 && !finish_window(i)) return progress;
      if (!conn.alive.load(std::memory_order_acquire)) {
        progress.end = Progress::End::kDied;
        return progress;
      }
      if (item.stop.stop_requested()) {
        progress.end = Progress::End::kStopped;
        return progress;
      }
    }
    const Op& op = ops[i];
    Status enqueued = op_copier_->Enqueue(op.dst, op.src, op.bytes);
    if (!enqueued.ok()) {
      op_copier_->Wait().IgnoreError();
      progress.end = Progress::End::kFailed;
      progress.error = enqueued.WithContext(address_ + ": device copies");
      return progress;
    }
    window_bytes += op.bytes;
  }
  finish_window(ops.size());
  return progress;
}

void Endpoint::Abort(Item& item) {
  switch (item.kind) {
    case Item::Kind::kWrite:
      failed_write_ops_.fetch_add(item.ops.size(), std::memory_order_relaxed);
      item.done(AbortedError(address_ + " shut down before the write ran"));
      break;
    case Item::Kind::kRead:
      item.done(AbortedError(address_ + " shut down before the read ran"));
      break;
    case Item::Kind::kFlush:
      item.done(AbortedError(address_ + " shut down before the flush ran"));
      break;
    case Item::Kind::kMessage:
    case Item::Kind::kPeerFailure:
      break;  // nobody is listening any more
  }
}

TransportStats Endpoint::Stats() const {
  TransportStats stats;
  stats.write_ops = write_ops_.load(std::memory_order_relaxed);
  stats.write_bytes = write_bytes_.load(std::memory_order_relaxed);
  stats.failed_write_ops = failed_write_ops_.load(std::memory_order_relaxed);
  stats.read_ops = read_ops_.load(std::memory_order_relaxed);
  stats.read_bytes = read_bytes_.load(std::memory_order_relaxed);
  stats.flushes = flushes_.load(std::memory_order_relaxed);
  stats.messages_sent = messages_sent_.load(std::memory_order_relaxed);
  stats.messages_received = messages_received_.load(std::memory_order_relaxed);
  return stats;
}

}  // namespace loopback_internal

// ---------------------------------------------------------------------------

LoopbackFabric::LoopbackFabric() : impl_(std::make_unique<loopback_internal::FabricImpl>()) {}
LoopbackFabric::~LoopbackFabric() = default;

std::shared_ptr<LoopbackFabric> LoopbackFabric::Create() {
  return std::shared_ptr<LoopbackFabric>(new LoopbackFabric());
}

size_t LoopbackFabric::num_endpoints() const { return impl_->num_endpoints(); }
size_t LoopbackFabric::num_regions() const { return impl_->num_regions(); }
size_t LoopbackFabric::num_live_connections() const { return impl_->num_live_connections(); }
size_t LoopbackFabric::num_connections_awaiting_fence() const {
  return impl_->num_awaiting_fence();
}

void LoopbackFabric::SetWriteHook(WriteHook hook) { impl_->SetWriteHook(std::move(hook)); }

Result<std::unique_ptr<LoopbackTransport>> LoopbackTransport::Create(
    std::shared_ptr<LoopbackFabric> fabric, std::string name, const LoopbackOptions& options) {
  if (fabric == nullptr) return InvalidArgumentError("loopback transport: the fabric is null");
  if (name.empty()) return InvalidArgumentError("loopback transport: the name is empty");
  if (options.poll_before_sleep.count() < 0 ||
      options.poll_before_sleep.count() > Config::kMaxPollUs) {
    return InvalidArgumentError("loopback transport: poll_before_sleep = " +
                                std::to_string(options.poll_before_sleep.count()) +
                                " µs: must be in [0, " + std::to_string(Config::kMaxPollUs) + "]");
  }
  loopback_internal::FabricImpl& impl = *fabric->impl_;
  const uint64_t id = impl.NextEndpointId();
  auto endpoint =
      std::make_shared<loopback_internal::Endpoint>(std::move(fabric), name, id, options);
  KVB_RETURN_IF_ERROR(impl.AddEndpoint(name, endpoint));
  return std::unique_ptr<LoopbackTransport>(new LoopbackTransport(std::move(endpoint)));
}

LoopbackTransport::LoopbackTransport(std::shared_ptr<loopback_internal::Endpoint> endpoint)
    : endpoint_(std::move(endpoint)) {}

LoopbackTransport::~LoopbackTransport() { endpoint_->Shutdown(); }

const std::string& LoopbackTransport::name() const { return endpoint_->name(); }

TransportCaps LoopbackTransport::Caps() const {
  return loopback_internal::LoopbackCaps(endpoint_->options());
}

Result<TransportCaps> LoopbackTransport::PeerCaps(PeerId peer) const {
  return endpoint_->PeerCaps(peer);
}

Result<TransportCaps> LoopbackTransport::PeerCapsFor(PeerId peer, MemoryKind kind) const {
  Result<TransportCaps> caps = Transport::PeerCapsFor(peer, kind);
  if (caps.ok() && kind == MemoryKind::kCuda && caps->device_memory) {
    const OpCopyCost cost = CudaSupport()->OpCost();
    caps->cost = TransportCost{cost.op_us, cost.bytes_per_us};
    caps->read_cost = caps->cost;
  }
  return caps;
}

std::string LoopbackTransport::Address() const { return endpoint_->address(); }

Status LoopbackTransport::Start(TransportCallbacks callbacks) {
  return endpoint_->Start(std::move(callbacks));
}

Result<PeerId> LoopbackTransport::Connect(std::string_view address) {
  return endpoint_->Connect(address);
}

Status LoopbackTransport::Send(PeerId peer, std::span<const std::byte> frame) {
  return endpoint_->Send(peer, frame);
}

Result<std::unique_ptr<LocalRegion>> LoopbackTransport::Register(Addr address, uint64_t bytes,
                                                                 MemoryKind kind) {
  return endpoint_->Register(address, bytes, kind);
}

Result<std::unique_ptr<RemoteRegion>> LoopbackTransport::Import(PeerId peer,
                                                                const RegionInfo& info) {
  return endpoint_->Import(peer, info);
}

Status LoopbackTransport::Write(const LocalRegion& source, const RemoteRegion& target,
                                std::span<const WriteOp> ops, TransportDone done,
                                std::stop_token stop) {
  return endpoint_->Write(source, target, ops, std::move(done), std::move(stop));
}

Status LoopbackTransport::Read(const RemoteRegion& source, const LocalRegion& target,
                               std::span<const ReadOp> ops, TransportDone done,
                               std::stop_token stop) {
  return endpoint_->Read(source, target, ops, std::move(done), std::move(stop));
}

Result<std::unique_ptr<MappedAccess>> LoopbackTransport::BeginMappedAccess(
    const RemoteRegion& target) {
  return endpoint_->BeginMappedAccess(target, /*read_only=*/false);
}

Result<std::unique_ptr<MappedAccess>> LoopbackTransport::BeginMappedRead(
    const RemoteRegion& source) {
  return endpoint_->BeginMappedAccess(source, /*read_only=*/true);
}

Status LoopbackTransport::Flush(PeerId peer, TransportDone done) {
  return endpoint_->Flush(peer, std::move(done));
}

void LoopbackTransport::Disconnect(PeerId peer, const Status& reason) {
  endpoint_->Disconnect(peer, reason);
}

void LoopbackTransport::Shutdown() { endpoint_->Shutdown(); }

TransportStats LoopbackTransport::Stats() const { return endpoint_->Stats(); }

std::unique_ptr<ProgressSource> LoopbackTransport::TakeProgressSource() {
  return endpoint_->TakeProgressSource();
}

}  // namespace kvbounce
