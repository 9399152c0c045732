#include "transport/cuda_ipc/cuda_ipc_transport.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/poll.h"
#include "common/unique_fd.h"
#include "copy/device_support.h"
#include "kvbounce/config.h"
#include "kvbounce/logging.h"
#include "transport/unix/unix_channel.h"
#include "transport/write_check.h"

namespace kvbounce {
namespace {

// Channel message types: the first byte of every message.
constexpr uint8_t kMsgFrame = 1;   // a control frame for on_message
constexpr uint8_t kMsgClose = 2;   // the sender stopped its copies; reason text follows
constexpr uint8_t kMsgRegion = 3;  // region id u64, with the region's descriptor

// Remote key: magic, version, exporter pid, region id, offset in the
// allocation, allocation bytes, the IPC handle (empty: the allocation's
// descriptor came in a REGION message of the same id).
constexpr uint32_t kKeyMagic = 0x4943424Bu;  // "KBCI"
constexpr uint16_t kKeyVersion = 2;

// A worker item waits for its copies at least this often.
constexpr size_t kWindowOps = 4096;
constexpr uint64_t kWindowBytes = uint64_t{256} << 20;

// What one Write costs beyond its operations (TransportCost::write_us):
// MEASURED on an H200 (docs/PERFORMANCE.md, 2026-12-03 (evening)): a write
// of one operation into a peer's mapped pool took ~160 µs from the call to
// its completion (the worker's wake-up, the runtime call, the stream
// synchronization), where a whole one-block request on direct took 74 µs;
// less the operation and the hand-off back that `auto` prices apart.
constexpr double kWriteUs = 150;

// How long Shutdown waits for peers to confirm that their copies stopped.
constexpr auto kShutdownWait = std::chrono::seconds(2);

void PutU16(std::vector<std::byte>& out, uint16_t v) {
  for (int i = 0; i < 2; ++i) out.push_back(static_cast<std::byte>(v >> (8 * i)));
}
void PutU32(std::vector<std::byte>& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<std::byte>(v >> (8 * i)));
}
void PutU64(std::vector<std::byte>& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<std::byte>(v >> (8 * i)));
}
uint64_t GetLe(std::span<const std::byte> in, size_t at, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= static_cast<uint64_t>(in[at + i]) << (8 * i);
  return v;
}

struct RegionKey {
  uint32_t pid = 0;
  uint64_t id = 0;
  uint64_t offset = 0;
  uint64_t allocation_bytes = 0;
  std::vector<std::byte> handle;
};

constexpr size_t kKeyFixedBytes = 4 + 2 + 4 + 8 + 8 + 8 + 4;

std::vector<std::byte> EncodeKey(const RegionKey& k) {
  std::vector<std::byte> out;
  PutU32(out, kKeyMagic);
  PutU16(out, kKeyVersion);
  PutU32(out, k.pid);
  PutU64(out, k.id);
  PutU64(out, k.offset);
  PutU64(out, k.allocation_bytes);
  PutU32(out, static_cast<uint32_t>(k.handle.size()));
  out.insert(out.end(), k.handle.begin(), k.handle.end());
  return out;
}

Result<RegionKey> DecodeKey(std::span<const std::byte> in) {
  if (in.size() < kKeyFixedBytes || GetLe(in, 0, 4) != kKeyMagic ||
      GetLe(in, 4, 2) != kKeyVersion) {
    return InvalidArgumentError("cuda-ipc: not a cuda-ipc region key (" +
                                std::to_string(in.size()) + " bytes)");
  }
  RegionKey k;
  k.pid = static_cast<uint32_t>(GetLe(in, 6, 4));
  k.id = GetLe(in, 10, 8);
  k.offset = GetLe(in, 18, 8);
  k.allocation_bytes = GetLe(in, 26, 8);
  const uint64_t handle_bytes = GetLe(in, 34, 4);
  if (handle_bytes != in.size() - kKeyFixedBytes) {
    return InvalidArgumentError("cuda-ipc: a region key's handle has " +
                                std::to_string(in.size() - kKeyFixedBytes) + " bytes, it says " +
                                std::to_string(handle_bytes));
  }
  k.handle.assign(in.begin() + kKeyFixedBytes, in.end());
  if (k.offset > k.allocation_bytes) {
    return InvalidArgumentError("cuda-ipc: a region key's offset lies past its allocation");
  }
  return k;
}

class CudaIpcTransport;

class IpcLocalRegion final : public LocalRegion {
 public:
  IpcLocalRegion(RegionInfo info, std::string description, std::function<void()> on_destroy)
      : info_(std::move(info)),
        description_(std::move(description)),
        on_destroy_(std::move(on_destroy)) {}
  ~IpcLocalRegion() override {
    if (on_destroy_) on_destroy_();
  }
  std::string_view Describe() const override { return description_; }
  const RegionInfo& info() const override { return info_; }

 private:
  RegionInfo info_;
  std::string description_;
  std::function<void()> on_destroy_;
};

class IpcRemoteRegion final : public RemoteRegion {
 public:
  IpcRemoteRegion(PeerId peer, RegionInfo info, std::unique_ptr<DeviceShareMapping> mapping,
                  uint64_t offset, const void* owner)
      : peer_(peer),
        info_(std::move(info)),
        mapping_(std::move(mapping)),
        offset_(offset),
        owner_(owner) {}
  PeerId peer() const override { return peer_; }
  const RegionInfo& info() const override { return info_; }
  // Where the peer's region lies in this process: read by the transport's
  // own reads, or by the caller's copy engine under BeginMappedRead. A
  // writer's copy into it is never offered (see map_remote).
  Addr mapped_address() const override { return local(); }
  // The region's first byte in this process.
  Addr local() const { return mapping_->base() + offset_; }
  // The address here of the peer's address `peer_address` inside the region.
  Addr Translate(Addr peer_address) const { return local() + (peer_address - info_.address); }
  const void* owner() const { return owner_; }

 private:
  const PeerId peer_;
  const RegionInfo info_;
  const std::unique_ptr<DeviceShareMapping> mapping_;
  const uint64_t offset_;
  const void* const owner_;
};

class CudaIpcTransport final : public Transport {
 public:
  CudaIpcTransport(const CudaIpcTransportOptions& options, const DeviceSupport* device,
                   std::unique_ptr<UnixChannel> channel, std::unique_ptr<CopyEngine> engine,
                   std::unique_ptr<OpCopier> copier, UniqueFd wake)
      : options_(options),
        device_(device),
        channel_(std::move(channel)),
        engine_(std::move(engine)),
        copier_(std::move(copier)),
        wake_(std::move(wake)) {}

  ~CudaIpcTransport() override { Shutdown(); }

  TransportCaps Caps() const override {
    TransportCaps caps;
    caps.name = "cuda-ipc";
    caps.host_memory = false;
    caps.device_memory = true;
    caps.map_remote = false;
    caps.read_remote = true;
    caps.map_remote_read = true;
    caps.concurrent_callbacks = true;
    caps.pending_writes_fail = true;
    caps.writes_land_at_completion = true;  // the worker waits for its copies, then reports
    const OpCopyCost op = device_->OpCost();
    caps.cost = TransportCost{op.op_us, op.bytes_per_us, kWriteUs};
    const CopyCost batch = engine_->Caps().cost;
    caps.read_cost = TransportCost{batch.run_us, batch.bytes_per_us};
    return caps;
  }

  Result<TransportCaps> PeerCaps(PeerId peer) const override {
    std::lock_guard<std::mutex> lock(mu_);
    if (conns_.count(peer) == 0)
      return NotFoundError("cuda-ipc: unknown peer " + std::to_string(peer));
    return Caps();
  }

  std::string Address() const override { return channel_->Address(); }

  Status Start(TransportCallbacks callbacks) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (started_) return FailedPreconditionError("cuda-ipc: already started");
      started_ = true;
      callbacks_ = std::move(callbacks);
    }
    UnixChannelCallbacks c;
    c.on_accepted = [this](ChannelPeerId peer, const PeerInfo& info) {
      AddConn(peer, info.pid);
      // Before anything else on the socket: the descriptors of our VMM
      // regions, which our HELLO's keys name.
      SendRegions(peer);
    };
    c.on_message = [this](ChannelPeerId peer, std::vector<std::byte> bytes,
                          std::vector<UniqueFd> fds) {
      OnChannelMessage(peer, std::move(bytes), std::move(fds));
    };
    c.on_closed = [this](ChannelPeerId peer, const Status& reason) {
      OnChannelClosed(peer, reason);
    };
    try {
      worker_ = std::thread([this] { WorkerLoop(); });
      reaper_ = std::thread([this] { ReaperLoop(); });
    } catch (const std::system_error& e) {
      return ResourceExhaustedError(std::string("cuda-ipc: cannot start a thread: ") + e.what());
    }
    return channel_->Start(std::move(c));
  }

  Result<PeerId> Connect(std::string_view address) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (shut_) return AbortedError("cuda-ipc: shut down");
    }
    KVB_ASSIGN_OR_RETURN(ChannelPeerId peer, channel_->Connect(address, options_.connect_timeout));
    Result<PeerInfo> info = channel_->Peer(peer);
    AddConn(peer, info.ok() ? info->pid : 0);
    SendRegions(peer);
    return static_cast<PeerId>(peer);
  }

  Status Send(PeerId peer, std::span<const std::byte> frame) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = conns_.find(peer);
      if (it == conns_.end())
        return NotFoundError("cuda-ipc: unknown peer " + std::to_string(peer));
      if (it->second.dead)
        return UnavailableError("cuda-ipc: connection " + std::to_string(peer) +
                                " is closed: " + it->second.reason.ToString());
    }
    std::vector<std::byte> message;
    message.reserve(frame.size() + 1);
    message.push_back(static_cast<std::byte>(kMsgFrame));
    message.insert(message.end(), frame.begin(), frame.end());
    Status sent = channel_->Send(peer, message);
    if (!sent.ok()) {
      if (sent.code() == StatusCode::kUnavailable) {
        // The socket is gone (the peer hung up or died): the connection ends.
        const Status closed =
            UnavailableError("cuda-ipc: connection to peer " + std::to_string(peer) +
                             " closed: " + std::string(sent.message()));
        TearDown(peer, closed);
        return closed;
      }
      return sent;
    }
    messages_sent_.fetch_add(1);
    return Status::Ok();
  }

  Result<std::unique_ptr<LocalRegion>> Register(Addr address, uint64_t bytes,
                                                MemoryKind kind) override {
    if (bytes == 0) return InvalidArgumentError("cuda-ipc: cannot register an empty region");
    if (kind != MemoryKind::kCuda) {
      return InvalidArgumentError("cuda-ipc: reaches device memory only, not " +
                                  std::string(MemoryKindName(kind)) + " memory");
    }
    KVB_ASSIGN_OR_RETURN(MemoryPlace place, device_->Locate(address));
    if (place.kind != MemoryKind::kCuda) {
      return InvalidArgumentError("cuda-ipc: the region is registered as cuda memory but is " +
                                  std::string(MemoryKindName(place.kind)) + " memory");
    }
    KVB_ASSIGN_OR_RETURN(DeviceShare share, device_->Share(address, bytes));
    RegionKey key;
    key.pid = static_cast<uint32_t>(::getpid());
    key.id = next_region_.fetch_add(1);
    key.offset = share.offset;
    key.allocation_bytes = share.allocation_bytes;
    key.handle = std::move(share.handle);
    RegionInfo info;
    info.address = address;
    info.size = bytes;
    info.kind = kind;
    info.device = place.device;
    info.remote_key = EncodeKey(key);
    const uint64_t id = key.id;
    std::function<void()> on_destroy;
    if (share.fd.valid()) {
      // A VMM allocation: its descriptor goes to every peer, now and at
      // every connection to come, ahead of the frames that name it.
      std::vector<PeerId> peers;
      {
        std::lock_guard<std::mutex> lock(mu_);
        for (const auto& [p, conn] : conns_) {
          if (!conn.dead) peers.push_back(p);
        }
        fd_regions_.emplace(id, std::move(share.fd));
      }
      for (PeerId p : peers) SendRegion(p, id);
      on_destroy = [this, id] {
        std::lock_guard<std::mutex> lock(mu_);
        fd_regions_.erase(id);
      };
    }
    return std::unique_ptr<LocalRegion>(new IpcLocalRegion(
        std::move(info), "cuda-ipc region #" + std::to_string(id) + " of " + Address(),
        std::move(on_destroy)));
  }

  Result<std::unique_ptr<RemoteRegion>> Import(PeerId peer, const RegionInfo& info) override {
    pid_t pid = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = conns_.find(peer);
      if (it == conns_.end())
        return NotFoundError("cuda-ipc: unknown peer " + std::to_string(peer));
      if (it->second.dead) return UnavailableError("cuda-ipc: connection is closed");
      pid = it->second.pid;
    }
    if (info.kind != MemoryKind::kCuda) {
      return InvalidArgumentError("cuda-ipc: reaches device memory only, not " +
                                  std::string(MemoryKindName(info.kind)) + " memory");
    }
    KVB_ASSIGN_OR_RETURN(RegionKey key, DecodeKey(info.remote_key));
    if (pid != 0 && key.pid != static_cast<uint32_t>(pid)) {
      return InvalidArgumentError("cuda-ipc: the region was exported by process " +
                                  std::to_string(key.pid) + ", not by the peer (" +
                                  std::to_string(pid) + ")");
    }
    if (key.offset > key.allocation_bytes || info.size > key.allocation_bytes - key.offset) {
      return InvalidArgumentError("cuda-ipc: the region leaves its shared allocation");
    }
    std::unique_ptr<DeviceShareMapping> mapping;
    if (key.handle.empty()) {
      int fd = -1;
      {
        std::lock_guard<std::mutex> lock(mu_);
        auto& fds = conns_[peer].region_fds;
        auto it = fds.find(key.id);
        if (it != fds.end()) fd = it->second.get();
        if (fd < 0) {
          return InvalidArgumentError("cuda-ipc: the peer sent no descriptor for its region #" +
                                      std::to_string(key.id));
        }
        // The descriptor stays with the connection while it is imported.
      }
      KVB_ASSIGN_OR_RETURN(mapping,
                           device_->OpenShareFd(fd, key.allocation_bytes, options_.device));
    } else {
      KVB_ASSIGN_OR_RETURN(mapping, device_->OpenShare(key.handle, options_.device));
    }
    return std::unique_ptr<RemoteRegion>(
        new IpcRemoteRegion(peer, info, std::move(mapping), key.offset, this));
  }

  Status Write(const LocalRegion& source, const RemoteRegion& target, std::span<const WriteOp> ops,
               TransportDone done, std::stop_token stop) override {
    const auto* remote = dynamic_cast<const IpcRemoteRegion*>(&target);
    if (remote == nullptr || remote->owner() != this) {
      return InvalidArgumentError("cuda-ipc: the target was not imported by this transport");
    }
    if (!done) return InvalidArgumentError("cuda-ipc: Write needs a done callback");
    KVB_ASSIGN_OR_RETURN(uint64_t bytes, CheckWriteOps(source.info(), target.info(), ops));
    Item item;
    item.kind = Item::Kind::kWrite;
    item.peer = target.peer();
    item.ops.reserve(ops.size());
    for (const WriteOp& op : ops) {
      item.ops.push_back(Copy{remote->Translate(op.dst), op.src, op.bytes});
    }
    item.bytes = bytes;
    item.stop = std::move(stop);
    item.done = std::move(done);
    const uint64_t n = ops.size();
    KVB_RETURN_IF_ERROR(Enqueue(std::move(item)));
    write_ops_.fetch_add(n);
    write_bytes_.fetch_add(bytes);
    return Status::Ok();
  }

  Result<std::unique_ptr<MappedAccess>> BeginMappedAccess(const RemoteRegion&) override {
    return UnimplementedError(
        "cuda-ipc: a writer's copy into another process's memory cannot be fenced by its owner; "
        "direct runs as a read by the receiver");
  }

  // Counted as a read of the connection until the access is destroyed:
  // the fence waits for it, as for Read. Its copy cannot be stopped from
  // here; the caller's copy is one batch, and it ends the access when
  // that batch ended.
  Result<std::unique_ptr<MappedAccess>> BeginMappedRead(const RemoteRegion& source) override {
    const auto* remote = dynamic_cast<const IpcRemoteRegion*>(&source);
    if (remote == nullptr || remote->owner() != this) {
      return InvalidArgumentError("cuda-ipc: the mapped region was not imported by this transport");
    }
    const PeerId peer = source.peer();
    std::lock_guard<std::mutex> lock(mu_);
    if (shut_) return AbortedError("cuda-ipc: shut down");
    auto it = conns_.find(peer);
    if (it == conns_.end()) return NotFoundError("cuda-ipc: unknown peer " + std::to_string(peer));
    if (it->second.dead) return UnavailableError("cuda-ipc: connection is closed");
    ++it->second.reads;
    return std::unique_ptr<MappedAccess>(new MappedRead(this, peer));
  }

  Status Read(const RemoteRegion& source, const LocalRegion& target, std::span<const ReadOp> ops,
              TransportDone done, std::stop_token stop) override {
    const auto* remote = dynamic_cast<const IpcRemoteRegion*>(&source);
    if (remote == nullptr || remote->owner() != this) {
      return InvalidArgumentError("cuda-ipc: the source was not imported by this transport");
    }
    if (!done) return InvalidArgumentError("cuda-ipc: Read needs a done callback");
    KVB_ASSIGN_OR_RETURN(uint64_t bytes, CheckReadOps(source.info(), target.info(), ops));
    auto fragments = std::make_shared<FragmentList>();
    fragments->reserve(ops.size());
    for (const ReadOp& op : ops) {
      fragments->push_back(Fragment{remote->Translate(op.src).value(), op.dst.value(), op.bytes});
    }
    const PeerId peer = source.peer();
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (shut_) return AbortedError("cuda-ipc: shut down");
      auto it = conns_.find(peer);
      if (it == conns_.end())
        return NotFoundError("cuda-ipc: unknown peer " + std::to_string(peer));
      if (it->second.dead) return UnavailableError("cuda-ipc: connection is closed");
      ++it->second.reads;
    }
    // One batched kernel; the connection's end stops it at its next launch.
    auto stop_source = std::make_shared<std::stop_source>();
    auto forward = std::make_shared<std::stop_callback<std::function<void()>>>(
        stop, std::function<void()>([stop_source] { stop_source->request_stop(); }));
    {
      std::lock_guard<std::mutex> lock(mu_);
      conns_[peer].read_stops.push_back(stop_source);
    }
    Status submitted = engine_->Submit(
        CopyBatch{*fragments, Addr(0), Addr(0)},
        [this, peer, fragments, forward, stop_source, done = std::move(done), n = ops.size(),
         bytes](Status s) {
          if (s.ok()) {
            read_ops_.fetch_add(n);
            read_bytes_.fetch_add(bytes);
          }
          done(s.ok() ? s : s.WithContext("cuda-ipc read"));
          ReadEnded(peer, stop_source.get());
        },
        stop_source->get_token());
    if (!submitted.ok()) {
      ReadEnded(peer, stop_source.get());
      return submitted;
    }
    return Status::Ok();
  }

  Status Flush(PeerId peer, TransportDone done) override {
    if (!done) return InvalidArgumentError("cuda-ipc: Flush needs a done callback");
    Item item;
    item.kind = Item::Kind::kFlush;
    item.peer = peer;
    item.done = std::move(done);
    KVB_RETURN_IF_ERROR(Enqueue(std::move(item)));
    flushes_.fetch_add(1);
    return Status::Ok();
  }

  void Disconnect(PeerId peer, const Status& reason) override { TearDown(peer, reason); }

  void Shutdown() override {
    std::vector<PeerId> peers;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (shut_) return;
      shut_ = true;
      for (const auto& [id, conn] : conns_) peers.push_back(id);
    }
    for (PeerId p : peers) TearDown(p, AbortedError("cuda-ipc: shut down"));
    {
      // Peers that are alive confirm promptly; a stopped one is not waited
      // for beyond this (its copies into this process's memory are then
      // not fenced: the memory must outlive it, see docs/transports.md).
      std::unique_lock<std::mutex> lock(mu_);
      reported_cv_.wait_for(lock, kShutdownWait, [this] {
        for (const auto& [id, conn] : conns_) {
          if (!conn.reported) return false;
        }
        return true;
      });
      stopping_ = true;
    }
    work_cv_.notify_all();
    Wake();
    if (worker_.joinable()) worker_.join();
    if (reaper_.joinable()) reaper_.join();
    channel_->Shutdown().IgnoreError();
    engine_.reset();  // finishes the reads still running
    std::deque<Item> left;
    {
      std::lock_guard<std::mutex> lock(mu_);
      left.swap(queue_);
    }
    for (Item& item : left) item.done(AbortedError("cuda-ipc: shut down before it ran"));
  }

  TransportStats Stats() const override {
    TransportStats s;
    s.write_ops = write_ops_.load();
    s.write_bytes = write_bytes_.load();
    s.failed_write_ops = failed_write_ops_.load();
    s.read_ops = read_ops_.load();
    s.read_bytes = read_bytes_.load();
    s.flushes = flushes_.load();
    s.messages_sent = messages_sent_.load();
    s.messages_received = messages_received_.load();
    return s;
  }

 private:
  // BeginMappedRead's access: one read of its connection while it lives.
  class MappedRead final : public MappedAccess {
   public:
    MappedRead(CudaIpcTransport* transport, PeerId peer) : transport_(transport), peer_(peer) {}
    ~MappedRead() override { transport_->ReadEnded(peer_, nullptr); }

   private:
    CudaIpcTransport* const transport_;
    const PeerId peer_;
  };

  struct Copy {
    Addr dst;
    Addr src;
    uint64_t bytes;
  };

  struct Item {
    enum class Kind { kWrite, kFlush, kFence };
    Kind kind = Kind::kFlush;
    PeerId peer = 0;
    std::vector<Copy> ops;
    uint64_t bytes = 0;
    std::stop_token stop;
    TransportDone done;
  };

  struct Conn {
    pid_t pid = 0;
    bool dead = false;
    Status reason;
    bool ops_fenced = false;  // our writes to it ended (the worker passed its fence)
    int reads = 0;            // our reads from it still running
    std::vector<std::shared_ptr<std::stop_source>> read_stops;
    bool close_sent = false;
    bool close_received = false;  // it stopped its copies into our memory
    bool channel_closed = false;
    bool exited = false;        // its process is gone
    bool waiting_exit = false;  // the reaper watches its pid
    bool reported = false;      // on_peer_failure ran
    // The descriptors of its VMM regions, by region id (REGION messages).
    std::map<uint64_t, UniqueFd> region_fds;
  };

  // One REGION message: region `id`'s descriptor, to `peer`.
  void SendRegion(PeerId peer, uint64_t id) {
    int fd = -1;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = fd_regions_.find(id);
      if (it == fd_regions_.end()) return;
      fd = it->second.get();
      // The channel duplicates the descriptor into its message before Send
      // returns; the lock keeps it open until then.
      std::vector<std::byte> message = {static_cast<std::byte>(kMsgRegion)};
      PutU64(message, id);
      const int fds[1] = {fd};
      Status sent = channel_->Send(peer, message, fds);
      if (!sent.ok()) {
        Log(LogLevel::kWarning, "cuda-ipc: sending region #" + std::to_string(id) + " to peer " +
                                    std::to_string(peer) + ": " + sent.ToString());
      }
    }
  }

  void SendRegions(PeerId peer) {
    std::vector<uint64_t> ids;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (const auto& [id, fd] : fd_regions_) ids.push_back(id);
    }
    for (uint64_t id : ids) SendRegion(peer, id);
  }

  void AddConn(ChannelPeerId peer, pid_t pid) {
    std::lock_guard<std::mutex> lock(mu_);
    Conn& c = conns_[static_cast<PeerId>(peer)];
    if (pid > 0) c.pid = pid;
  }

  Status Enqueue(Item item) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (shut_ && item.kind != Item::Kind::kFence) return AbortedError("cuda-ipc: shut down");
      auto it = conns_.find(item.peer);
      if (it == conns_.end()) {
        return NotFoundError("cuda-ipc: unknown peer " + std::to_string(item.peer));
      }
      if (it->second.dead && item.kind != Item::Kind::kFence) {
        return UnavailableError("cuda-ipc: connection " + std::to_string(item.peer) +
                                " is closed: " + it->second.reason.ToString());
      }
      queue_.push_back(std::move(item));
      queued_.fetch_add(1, std::memory_order_release);
    }
    work_cv_.notify_one();
    return Status::Ok();
  }

  void WorkerLoop() {
    for (;;) {
      Item item;
      {
        std::unique_lock<std::mutex> lock(mu_);
        if (queue_.empty() && !stopping_ && options_.poll_before_sleep.count() > 0) {
          // Look for more a while before sleeping (poll_before_sleep).
          const uint64_t seen = queued_.load(std::memory_order_relaxed);
          lock.unlock();
          PollForCounter(queued_, seen, options_.poll_before_sleep);
          lock.lock();
        }
        work_cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;
        item = std::move(queue_.front());
        queue_.pop_front();
      }
      Run(item);
    }
  }

  bool Dead(PeerId peer) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = conns_.find(peer);
    return it == conns_.end() || it->second.dead;
  }

  void Run(Item& item) {
    switch (item.kind) {
      case Item::Kind::kFence: {
        std::lock_guard<std::mutex> lock(mu_);
        conns_[item.peer].ops_fenced = true;
        break;
      }
      case Item::Kind::kFlush:
        item.done(Dead(item.peer) ? UnavailableError("cuda-ipc: connection closed before the flush")
                                  : Status::Ok());
        return;
      case Item::Kind::kWrite:
        RunWrite(item);
        return;
    }
    MaybeFinish(item.peer);
  }

  void RunWrite(Item& item) {
    size_t copied_ops = 0;
    uint64_t copied = 0;
    size_t window_start = 0;
    uint64_t window_bytes = 0;
    Status error;
    auto wait_window = [&](size_t end) {
      Status waited = copier_->Wait();
      if (!waited.ok()) {
        error = waited.WithContext("cuda-ipc write");
        return false;
      }
      for (size_t j = window_start; j < end; ++j) copied += item.ops[j].bytes;
      copied_ops = end;
      window_start = end;
      window_bytes = 0;
      return true;
    };
    for (size_t i = 0; i < item.ops.size() && error.ok(); ++i) {
      if (i == 0 || i - window_start >= kWindowOps || window_bytes >= kWindowBytes) {
        if (i > 0 && !wait_window(i)) break;
        if (Dead(item.peer)) {
          error = UnavailableError("cuda-ipc: connection closed during the write");
          break;
        }
        if (item.stop.stop_requested()) {
          error = CancelledError("cuda-ipc: write stopped");
          break;
        }
      }
      const Copy& op = item.ops[i];
      Status enqueued = copier_->Enqueue(op.dst, op.src, op.bytes);
      if (!enqueued.ok()) {
        copier_->Wait().IgnoreError();
        error = enqueued.WithContext("cuda-ipc write");
        break;
      }
      window_bytes += op.bytes;
    }
    if (error.ok()) wait_window(item.ops.size());
    if (copied_ops < item.ops.size()) {
      failed_write_ops_.fetch_add(item.ops.size() - copied_ops);
      if (!error.ok() && error.code() != StatusCode::kInternal) {
        error = error.WithContext(std::to_string(item.ops.size() - copied_ops) + " of " +
                                  std::to_string(item.ops.size()) + " ops (" +
                                  std::to_string(item.bytes - copied) + " bytes) not copied");
      }
    }
    item.done(error);
  }

  void ReadEnded(PeerId peer, const std::stop_source* stop) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = conns_.find(peer);
      if (it == conns_.end()) return;
      --it->second.reads;
      auto& stops = it->second.read_stops;
      for (auto s = stops.begin(); s != stops.end(); ++s) {
        if (s->get() == stop) {
          stops.erase(s);
          break;
        }
      }
    }
    MaybeFinish(peer);
  }

  // Starts the end of a connection (see the fence in the header).
  void TearDown(PeerId peer, const Status& reason) {
    std::vector<std::shared_ptr<std::stop_source>> stops;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = conns_.find(peer);
      if (it == conns_.end() || it->second.dead) return;
      it->second.dead = true;
      it->second.reason = reason;
      stops = it->second.read_stops;
      // Writes queued for it fail when the worker reaches them (the
      // connection is dead), ahead of the fence.
      Item fence;
      fence.kind = Item::Kind::kFence;
      fence.peer = peer;
      queue_.push_back(std::move(fence));
      queued_.fetch_add(1, std::memory_order_release);
    }
    for (auto& s : stops) s->request_stop();
    work_cv_.notify_one();
  }

  // Sends CLOSE once our copies ended, and reports once the peer's did too.
  void MaybeFinish(PeerId peer) {
    bool send_close = false;
    bool report = false;
    Status reason;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = conns_.find(peer);
      if (it == conns_.end()) return;
      Conn& c = it->second;
      // After Shutdown nothing is reported (a mapped read released late).
      if (stopping_ || !c.dead || !c.ops_fenced || c.reads > 0) return;
      if (!c.close_sent && !c.channel_closed) {
        c.close_sent = true;
        send_close = true;
      }
      reason = c.reason;
      if ((c.close_received || c.exited) && !c.reported) {
        c.reported = true;
        report = true;
        // Its descriptors would keep its memory alive here: imports made
        // from them hold their own references.
        c.region_fds.clear();
      }
    }
    if (send_close) {
      std::vector<std::byte> message = {static_cast<std::byte>(kMsgClose)};
      const std::string text = reason.ToString();
      for (char ch : text) message.push_back(static_cast<std::byte>(ch));
      channel_->Send(peer, message).IgnoreError();
    }
    if (report) {
      channel_->Close(peer, reason);
      if (callbacks_.on_peer_failure) callbacks_.on_peer_failure(peer, reason);
      std::lock_guard<std::mutex> lock(mu_);
      reported_cv_.notify_all();
    }
  }

  void OnChannelMessage(ChannelPeerId channel_peer, std::vector<std::byte> bytes,
                        std::vector<UniqueFd> fds) {
    const PeerId peer = static_cast<PeerId>(channel_peer);
    if (bytes.empty()) {
      TearDown(peer, DataLossError("cuda-ipc: an empty message from peer " + std::to_string(peer)));
      return;
    }
    const auto type = static_cast<uint8_t>(bytes[0]);
    if (type == kMsgFrame) {
      {
        // A message may come before Connect has recorded the connection.
        std::lock_guard<std::mutex> lock(mu_);
        if (conns_[peer].dead) return;
      }
      messages_received_.fetch_add(1);
      if (callbacks_.on_message) {
        callbacks_.on_message(peer, std::vector<std::byte>(bytes.begin() + 1, bytes.end()));
      }
      return;
    }
    if (type == kMsgRegion) {
      if (bytes.size() != 9 || fds.size() != 1) {
        TearDown(peer, DataLossError("cuda-ipc: a malformed REGION message from peer " +
                                     std::to_string(peer)));
        return;
      }
      std::lock_guard<std::mutex> lock(mu_);
      conns_[peer].region_fds[GetLe(bytes, 1, 8)] = std::move(fds[0]);
      return;
    }
    if (type == kMsgClose) {
      std::string text;
      for (size_t i = 1; i < bytes.size(); ++i) text.push_back(static_cast<char>(bytes[i]));
      {
        std::lock_guard<std::mutex> lock(mu_);
        conns_[peer].close_received = true;
      }
      TearDown(peer, UnavailableError("cuda-ipc: peer " + std::to_string(peer) +
                                      " closed the connection: " + text));
      MaybeFinish(peer);
      return;
    }
    TearDown(peer, DataLossError("cuda-ipc: unknown message type " + std::to_string(type) +
                                 " from peer " + std::to_string(peer)));
  }

  void OnChannelClosed(ChannelPeerId channel_peer, const Status& reason) {
    const PeerId peer = static_cast<PeerId>(channel_peer);
    bool watch = false;
    const bool exited = channel_->PeerProcessExited(channel_peer);
    {
      std::lock_guard<std::mutex> lock(mu_);
      Conn& c = conns_[peer];
      c.channel_closed = true;
      if (exited) c.exited = true;
      if (!c.close_received && !c.exited && !c.waiting_exit) {
        c.waiting_exit = true;
        watch = true;
      }
    }
    TearDown(peer, UnavailableError("cuda-ipc: connection to peer " + std::to_string(peer) +
                                    " ended: " + reason.ToString()));
    if (watch) Wake();
    MaybeFinish(peer);
  }

  void Wake() {
    const uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(wake_.get(), &one, sizeof(one));
  }

  // Waits for the processes of peers whose socket ended without CLOSE: only
  // their exit proves that nothing of theirs still copies into our memory.
  void ReaperLoop() {
    std::map<PeerId, UniqueFd> watched;
    for (;;) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (stopping_) return;
        for (auto& [id, c] : conns_) {
          if (!c.waiting_exit || c.exited || watched.count(id) != 0) continue;
          const int fd = c.pid > 0 ? static_cast<int>(::syscall(SYS_pidfd_open, c.pid, 0)) : -1;
          if (fd < 0) {
            // No pidfd (an old kernel) or no pid: the socket's end is all
            // there is to go by.
            c.exited = true;
            continue;
          }
          watched.emplace(id, UniqueFd(fd));
        }
      }
      std::vector<PeerId> exited;
      {
        std::lock_guard<std::mutex> lock(mu_);
        for (auto& [id, c] : conns_) {
          if (c.waiting_exit && c.exited && !c.reported) exited.push_back(id);
        }
      }
      for (PeerId id : exited) MaybeFinish(id);
      std::vector<pollfd> fds;
      std::vector<PeerId> ids;
      fds.push_back(pollfd{wake_.get(), POLLIN, 0});
      for (auto& [id, fd] : watched) {
        fds.push_back(pollfd{fd.get(), POLLIN, 0});
        ids.push_back(id);
      }
      const int n = ::poll(fds.data(), fds.size(), 1000);
      if (n < 0 && errno != EINTR) return;
      if (fds[0].revents != 0) {
        uint64_t count = 0;
        [[maybe_unused]] ssize_t r = ::read(wake_.get(), &count, sizeof(count));
      }
      for (size_t i = 1; i < fds.size(); ++i) {
        if (fds[i].revents == 0) continue;
        const PeerId id = ids[i - 1];
        watched.erase(id);
        {
          std::lock_guard<std::mutex> lock(mu_);
          conns_[id].exited = true;
        }
        MaybeFinish(id);
      }
    }
  }

  const CudaIpcTransportOptions options_;
  const DeviceSupport* const device_;
  std::unique_ptr<UnixChannel> channel_;
  std::unique_ptr<CopyEngine> engine_;
  std::unique_ptr<OpCopier> copier_;  // the worker's
  UniqueFd wake_;                     // eventfd: wakes the reaper

  mutable std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable reported_cv_;
  bool started_ = false;
  bool shut_ = false;
  bool stopping_ = false;
  TransportCallbacks callbacks_;
  std::map<PeerId, Conn> conns_;
  std::map<uint64_t, UniqueFd> fd_regions_;  // our VMM regions' descriptors, by id
  std::deque<Item> queue_;
  std::atomic<uint64_t> queued_{0};  // items queued ever (read while polling)
  std::thread worker_;
  std::thread reaper_;
  std::atomic<uint64_t> next_region_{1};

  std::atomic<uint64_t> write_ops_{0}, write_bytes_{0}, failed_write_ops_{0}, read_ops_{0},
      read_bytes_{0}, flushes_{0}, messages_sent_{0}, messages_received_{0};
};

}  // namespace

Result<std::unique_ptr<Transport>> CreateCudaIpcTransport(const CudaIpcTransportOptions& options) {
  const DeviceSupport* device = CudaSupport();
  if (device == nullptr) {
    return UnimplementedError("the cuda-ipc transport needs a build with CUDA");
  }
  if (options.poll_before_sleep.count() < 0 ||
      options.poll_before_sleep.count() > Config::kMaxPollUs) {
    return InvalidArgumentError(
        "cuda-ipc: poll_before_sleep = " + std::to_string(options.poll_before_sleep.count()) +
        " µs: must be in [0, " + std::to_string(Config::kMaxPollUs) + "]");
  }
  std::string why;
  const int count = device->DeviceCount(&why);
  if (count == 0) return UnavailableError("cuda-ipc: no usable CUDA device: " + why);
  if (options.device < 0 || options.device >= count) {
    return InvalidArgumentError("cuda-ipc: device " + std::to_string(options.device) +
                                " is not one of this process's " + std::to_string(count));
  }
  UnixChannelOptions channel_options;
  std::string_view name = options.listen_address;
  if (!name.empty()) {
    if (name.substr(0, UnixChannel::kAddressPrefix.size()) != UnixChannel::kAddressPrefix) {
      return InvalidArgumentError("cuda-ipc: listen address " + options.listen_address +
                                  " is not unix:@name or unix:/path");
    }
    name.remove_prefix(UnixChannel::kAddressPrefix.size());
  }
  channel_options.name = std::string(name);
  channel_options.poll_before_sleep = options.poll_before_sleep;
  KVB_ASSIGN_OR_RETURN(std::unique_ptr<UnixChannel> channel, UnixChannel::Create(channel_options));
  KVB_ASSIGN_OR_RETURN(std::unique_ptr<CopyEngine> engine,
                       device->NewCopyEngine(options.device, options.poll_before_sleep));
  KVB_ASSIGN_OR_RETURN(std::unique_ptr<OpCopier> copier, device->NewOpCopier(options.device));
  const int wake = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake < 0) {
    return ResourceExhaustedError(std::string("cuda-ipc: eventfd: ") + std::strerror(errno));
  }
  return std::unique_ptr<Transport>(new CudaIpcTransport(
      options, device, std::move(channel), std::move(engine), std::move(copier), UniqueFd(wake)));
}

}  // namespace kvbounce
