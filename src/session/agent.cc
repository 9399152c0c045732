// The agent: owns a rank's transport, memory, control loop and sessions,
// speaks HELLO/BYE with its peers and routes every frame to the sender or
// receiver session (docs/sessions.md, include/kvbounce/agent.h).
#include "kvbounce/agent.h"

#include <condition_variable>
#include <exception>
#include <future>
#include <limits>
#include <map>
#include <mutex>
#include <new>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/checked_math.h"
#include "copy/cpu/cpu_copy_engine.h"
#include "copy/device_support.h"
#include "kvbounce/logging.h"
#include "kvbounce/transport.h"
#include "layout/planner.h"
#include "layout/state_layout.h"
#include "memory/allocation.h"
#include "memory/arena.h"
#include "protocol/codec.h"
#include "session/agent_internal.h"
#include "session/event_loop.h"
#include "session/metrics.h"
#include "session/receiver.h"
#include "session/sender.h"
#include "session/session_context.h"

namespace kvbounce {

std::string_view RoleName(Role role) { return role == Role::kCtx ? "ctx" : "gen"; }

namespace {

protocol::MemoryKind ToWire(MemoryKind kind) { return static_cast<protocol::MemoryKind>(kind); }
MemoryKind FromWire(protocol::MemoryKind kind) { return static_cast<MemoryKind>(kind); }

DType DTypeOfSize(uint32_t bytes, DType same_size) {
  if (DTypeBytes(same_size) == bytes) return same_size;
  switch (bytes) {
    case 1:
      return DType::kFp8;
    case 4:
      return DType::kFp32;
    default:
      return DType::kBf16;
  }
}

// Whether a HELLO's model has this rank's layer pattern and state shapes
// (element sizes, not names: bytes move as they are).
bool SameStateShape(const protocol::ModelShape& wire, const ModelShape& mine) {
  if (wire.layer_pattern != mine.layer_pattern || wire.state.size() != mine.state.size()) {
    return false;
  }
  for (size_t t = 0; t < mine.state.size(); ++t) {
    const StateTensor& st = mine.state[t];
    const protocol::StateTensorDescriptor& d = wire.state[t];
    if (d.elem_bytes != DTypeBytes(st.dtype) || d.segments.size() != st.segments.size()) {
      return false;
    }
    for (size_t i = 0; i < st.segments.size(); ++i) {
      if (static_cast<int64_t>(d.segments[i].units) != st.segments[i].units ||
          static_cast<int64_t>(d.segments[i].unit_elems) != st.segments[i].unit_elems) {
        return false;
      }
    }
  }
  return true;
}

// The API edge: no exception leaves the library. Everything that could throw
// (allocation, a thread that cannot start) is checked or caught where it
// happens; this is the last net, turning what slipped through into a Status.
template <typename F>
auto Guarded(const char* what, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    return ResourceExhaustedError(std::string(what) + ": out of memory");
  } catch (const std::exception& e) {
    return InternalError(std::string(what) + ": " + e.what());
  }
}

// A duration field of the API: `min_ms` <= value <= Config::kMaxTimeoutMs.
Status CheckDuration(const char* field, std::chrono::milliseconds value, int64_t min_ms) {
  if (value.count() < min_ms || value.count() > Config::kMaxTimeoutMs) {
    return InvalidArgumentError(std::string(field) + " = " + std::to_string(value.count()) +
                                " ms is invalid: must be in [" + std::to_string(min_ms) + ", " +
                                std::to_string(Config::kMaxTimeoutMs) + "] ms");
  }
  return Status::Ok();
}

bool IsTransferPath(TransferPath path) {
  return path == TransferPath::kPerBlock || path == TransferPath::kBounce ||
         path == TransferPath::kDirect || path == TransferPath::kAuto;
}

bool IsMemoryKind(MemoryKind kind) {
  return kind == MemoryKind::kHost || kind == MemoryKind::kPinnedHost || kind == MemoryKind::kCuda;
}

// The transport AgentOptions::transport_spec describes (see TransportSpec).
// `config` is the validated config, after the environment's overrides.
// A kCuda pool: this build has CUDA, the device exists, and every
// allocation of the pool (its first and its last byte) is device memory of
// that device. Returns the runtime to use.
Result<const DeviceSupport*> CheckDevicePool(const PoolSpec& pool, const PoolLayout& layout) {
  const DeviceSupport* device = CudaSupport();
  if (device == nullptr) {
    return UnimplementedError(
        "AgentOptions.pool.memory = cuda: this build has no CUDA support (configure it where a "
        "CUDA toolkit is installed)");
  }
  std::string why;
  const int count = device->DeviceCount(&why);
  if (count == 0) {
    return UnavailableError("AgentOptions.pool.memory = cuda: no CUDA device can be used: " + why);
  }
  if (pool.device < 0 || pool.device >= count) {
    return InvalidArgumentError("AgentOptions.pool.device = " + std::to_string(pool.device) +
                                " is not a CUDA device of this process (it has " +
                                std::to_string(count) + ")");
  }
  const size_t allocations = layout.per_layer_bases() ? pool.bases.size() : 1;
  for (size_t i = 0; i < allocations; ++i) {
    const Addr base = layout.layer_base(static_cast<int>(i));
    for (const Addr a : {base, base + (layout.allocation_bytes() - 1)}) {
      Result<MemoryPlace> place = device->Locate(a);
      if (!place.ok()) return place.status().WithContext("AgentOptions.pool.bases");
      if (place->kind != MemoryKind::kCuda || place->device != pool.device) {
        return InvalidArgumentError("AgentOptions.pool.bases[" + std::to_string(i) +
                                    "]: the pool's " + (a == base ? "first" : "last") +
                                    " byte is " +
                                    (place->kind == MemoryKind::kCuda
                                         ? "memory of cuda device " + std::to_string(place->device)
                                         : std::string(MemoryKindName(place->kind)) + " memory") +
                                    ", not memory of cuda device " + std::to_string(pool.device));
      }
    }
  }
  return device;
}

// A kCuda pool's state pool lies in the pool's device memory, first and
// last byte of each allocation.
Status CheckDeviceStatePool(const DeviceSupport& device, const PoolSpec& pool,
                            const StatePoolLayout& layout) {
  for (size_t i = 0; i < layout.bases().size(); ++i) {
    const Addr base = layout.bases()[i];
    for (const Addr a : {base, base + (layout.allocation_bytes() - 1)}) {
      Result<MemoryPlace> place = device.Locate(a);
      if (!place.ok()) return place.status().WithContext("AgentOptions.pool.state.bases");
      if (place->kind != MemoryKind::kCuda || place->device != pool.device) {
        return InvalidArgumentError("AgentOptions.pool.state.bases[" + std::to_string(i) +
                                    "]: the state pool is not memory of cuda device " +
                                    std::to_string(pool.device) + " like the KV pool");
      }
    }
  }
  return Status::Ok();
}

Result<std::unique_ptr<Transport>> BuildTransport(const AgentOptions& options, const Config& config,
                                                  const AgentHooks& hooks) {
  const TransportSpec& spec = options.transport_spec;
  if (spec.kind == "loopback") {
    if (spec.fabric == nullptr) {
      return InvalidArgumentError(
          "AgentOptions.transport_spec.fabric is null: a loopback transport needs the fabric its "
          "peers share (NewLoopbackFabric)");
    }
    const std::string name = spec.loopback_name.empty()
                                 ? options.instance_id + "-" + std::to_string(options.rank)
                                 : spec.loopback_name;
    LoopbackOptions loopback;
    loopback.poll_before_sleep = std::chrono::microseconds(config.poll_before_sleep_us);
    Result<std::unique_ptr<Transport>> made = NewLoopbackTransport(spec.fabric, name, loopback);
    if (!made.ok()) return made.status().WithContext("AgentOptions.transport_spec (loopback)");
    return made;
  }
  if (spec.kind == "ucx") {
    UcxTransportOptions ucx;
    ucx.listen_address = spec.listen_address;
    ucx.num_workers = static_cast<int>(config.num_workers);  // <= kMaxNumWorkers: validated
    ucx.put_chunk_bytes = spec.put_chunk_bytes;
    ucx.same_host_shared_memory = spec.same_host_shared_memory;
    ucx.connect_timeout = options.connect_timeout;
    ucx.poll_before_sleep = std::chrono::microseconds(config.poll_before_sleep_us);
    Result<std::unique_ptr<Transport>> made =
        hooks.make_ucx_transport ? hooks.make_ucx_transport(ucx) : NewUcxTransport(ucx);
    if (!made.ok()) return made.status().WithContext("AgentOptions.transport_spec (ucx)");
    if (*made == nullptr) return InternalError("the ucx transport factory returned null");
    return made;
  }
  if (spec.kind == "cuda-ipc") {
    CudaIpcTransportOptions ipc;
    ipc.listen_address = spec.ipc_address;
    ipc.device = options.pool.memory == MemoryKind::kCuda ? options.pool.device : 0;
    ipc.connect_timeout = options.connect_timeout;
    ipc.poll_before_sleep = std::chrono::microseconds(config.poll_before_sleep_us);
    Result<std::unique_ptr<Transport>> made = NewCudaIpcTransport(ipc);
    if (!made.ok()) return made.status().WithContext("AgentOptions.transport_spec (cuda-ipc)");
    return made;
  }
  return InvalidArgumentError("AgentOptions.transport_spec.kind = \"" + spec.kind +
                              "\" is invalid: must be one of ucx, loopback, cuda-ipc");
}

// Lets a Transfer handle reach its agent's loop for as long as the agent
// runs, and nothing afterwards.
class LoopGate {
 public:
  explicit LoopGate(EventLoop* loop) : loop_(loop) {}
  void Post(EventLoop::Task task) {
    std::lock_guard<std::mutex> lock(mu_);
    if (loop_ != nullptr) loop_->Post(std::move(task));
  }
  void Close() {
    std::lock_guard<std::mutex> lock(mu_);
    loop_ = nullptr;
  }

 private:
  std::mutex mu_;
  EventLoop* loop_;
};

class AgentImpl final : public Agent {
 public:
  AgentImpl() = default;
  ~AgentImpl() override { Shutdown(); }

  Status Init(AgentOptions options, AgentHooks hooks);

  std::string Address() const override { return transport_->Address(); }
  Status Connect(std::span<const std::string> addresses) override;
  Result<std::shared_ptr<Transfer>> Publish(uint64_t request_id,
                                            std::span<const int32_t> block_table,
                                            int64_t num_tokens, PublishOptions options) override;
  Status Retire(uint64_t request_id) override;
  Result<std::shared_ptr<Transfer>> Pull(uint64_t request_id, std::string_view ctx_instance,
                                         std::span<const int32_t> block_table, TokenRange tokens,
                                         PullOptions options) override;
  Result<int> ReceiverCount(std::string_view gen_instance) const override;
  Result<std::vector<TransferPath>> Paths(std::string_view ctx_instance) const override;
  AgentStats Stats() const override;
  void Shutdown() override;

 private:
  // Runs `fn` on the control thread and returns its result (inline when
  // already there). kAborted once the loop has stopped.
  template <typename T>
  Result<T> OnLoop(std::function<Result<T>()> fn) const;
  Status OnLoopStatus(std::function<Status()> fn) const;
  Status ConnectAll(std::span<const std::string> addresses);
  AgentStats CollectStats() const;
  void ShutdownLocked();
  // The block table of Publish or Pull covers tokens [0, tokens_end) with
  // ids inside the pool (kOutOfRange otherwise, naming `call`).
  Status CheckBlockTable(const char* call, std::span<const int32_t> block_table,
                         int64_t tokens_end, const std::string& tokens_text) const;
  // Pull's API-edge checks (see Agent::Pull's errors).
  Status CheckPull(std::span<const int32_t> block_table, TokenRange tokens,
                   const PullOptions& options) const;

  void HandleMessage(PeerId peer, const std::vector<std::byte>& frame);
  void HandleHello(PeerId id, const protocol::Hello& hello);
  Status AdoptHello(PeerState& peer, const protocol::Hello& hello);
  void HandlePeerFailure(PeerId id, const Status& reason);
  void Refuse(PeerState& peer, protocol::ByeReason reason, const Status& why);
  // The HELLO for `peer`, with the capabilities of our connection to it.
  protocol::Hello BuildHello(PeerId peer) const;
  void NotifyConnect(PeerId id, const Status& status);

  // Declared so that members are destroyed in a safe order: the clock and
  // the transport last (the loop borrows the one, regions and arenas the
  // other), the loop before the sessions' context goes away.
  std::shared_ptr<Clock> clock_;
  std::unique_ptr<Transport> transport_;
  std::vector<std::unique_ptr<LocalRegion>> pool_regions_;
  std::unique_ptr<Arena> send_arena_;
  std::unique_ptr<Arena> recv_arena_;
  std::unique_ptr<CopyEngine> copy_;
  Metrics metrics_;
  SessionContext ctx_;
  std::unique_ptr<ReceiverSession> receiver_;
  std::unique_ptr<SenderSession> sender_;
  std::shared_ptr<LoopGate> gate_;
  std::unique_ptr<EventLoop> loop_;
  std::chrono::milliseconds connect_timeout_{10000};

  // Connect's waiters: the outcome of each peer's HELLO exchange.
  mutable std::mutex connect_mu_;
  std::condition_variable connect_cv_;
  std::map<PeerId, Status> connect_results_;
  bool connect_aborted_ = false;  // Shutdown: waiters return kAborted

  std::mutex shutdown_mu_;
  bool shut_down_ = false;
};

template <typename T>
Result<T> AgentImpl::OnLoop(std::function<Result<T>()> fn) const {
  if (loop_->InLoop()) return fn();
  // On this thread when the loop is idle: no hand-off either way.
  std::optional<Result<T>> here;
  if (loop_->TryRunHere([&] { here.emplace(fn()); })) return std::move(*here);
  auto task = std::make_shared<std::packaged_task<Result<T>()>>(std::move(fn));
  std::future<Result<T>> result = task->get_future();
  if (!loop_->Post([task] { (*task)(); })) return AbortedError("the agent has shut down");
  return result.get();
}

Status AgentImpl::OnLoopStatus(std::function<Status()> fn) const {
  Result<bool> r = OnLoop<bool>([&]() -> Result<bool> {
    Status s = fn();
    if (!s.ok()) return s;
    return true;
  });
  return r.status();
}

Status AgentImpl::Init(AgentOptions options, AgentHooks hooks) {
  if (options.instance_id.empty()) {
    return InvalidArgumentError("AgentOptions.instance_id must not be empty");
  }
  if (options.role != Role::kCtx && options.role != Role::kGen) {
    return InvalidArgumentError("AgentOptions.role = " +
                                std::to_string(static_cast<int>(options.role)) +
                                " is not a Role: use kCtx or kGen");
  }
  KVB_RETURN_IF_ERROR(CheckDuration("AgentOptions.grace", options.grace, 0));
  KVB_RETURN_IF_ERROR(CheckDuration("AgentOptions.connect_timeout", options.connect_timeout, 1));
  Config config = ApplyEnvironment(options.config);
  KVB_RETURN_IF_ERROR(config.Validate());
  KVB_ASSIGN_OR_RETURN(Topology topology, Topology::Create(options.instance, options.instance_id));
  Result<RankPlacement> placement = topology.CheckedPlacement(options.rank);
  if (!placement.ok()) {
    return InvalidArgumentError("AgentOptions.rank: " + std::string(placement.status().message()));
  }
  const PoolSpec& pool = options.pool;
  if (pool.bases.empty()) return InvalidArgumentError("AgentOptions.pool.bases is empty");
  for (size_t i = 0; i < pool.bases.size(); ++i) {
    if (pool.bases[i] == Addr()) {
      return InvalidArgumentError("AgentOptions.pool.bases[" + std::to_string(i) + "] is null");
    }
  }
  if (!IsMemoryKind(pool.memory)) {
    return InvalidArgumentError("AgentOptions.pool.memory = " +
                                std::to_string(static_cast<int>(pool.memory)) +
                                " is not a MemoryKind");
  }
  if (pool.num_blocks < 1) {
    return InvalidArgumentError("AgentOptions.pool.num_blocks = " +
                                std::to_string(pool.num_blocks) + " is invalid: must be >= 1");
  }
  if (pool.num_blocks > std::numeric_limits<uint32_t>::max()) {
    return InvalidArgumentError(
        "AgentOptions.pool.num_blocks = " + std::to_string(pool.num_blocks) +
        " exceeds the protocol's 2^32 - 1 blocks");
  }
  KVB_ASSIGN_OR_RETURN(PoolLayout layout,
                       PoolLayout::ForRank(topology, options.rank, pool.num_blocks, pool.bases[0]));
  if (pool.bases.size() > 1) {
    KVB_ASSIGN_OR_RETURN(layout,
                         PoolLayout::CreatePerLayer(layout.kind(), layout.geometry(), pool.bases));
  }
  // Hybrid models: the state pool, where the rank has one.
  std::optional<StatePoolLayout> state_layout;
  if (!pool.state.bases.empty()) {
    Result<StatePoolLayout> sl =
        StatePoolLayout::ForRank(topology, options.rank, pool.state.num_slots, pool.state.bases);
    if (!sl.ok()) return sl.status().WithContext("AgentOptions.pool.state");
    state_layout = std::move(sl).value();
  } else if (pool.state.num_slots != 0) {
    return InvalidArgumentError("AgentOptions.pool.state.num_slots = " +
                                std::to_string(pool.state.num_slots) + " without a base");
  }
  const DeviceSupport* device = nullptr;
  if (pool.memory == MemoryKind::kCuda) {
    KVB_ASSIGN_OR_RETURN(device, CheckDevicePool(pool, layout));
    if (state_layout) KVB_RETURN_IF_ERROR(CheckDeviceStatePool(*device, pool, *state_layout));
  }
  if (options.transport != nullptr) {
    transport_ = std::move(options.transport);
  } else {
    KVB_ASSIGN_OR_RETURN(transport_, BuildTransport(options, config, hooks));
  }
  const TransportCaps caps = transport_->Caps();
  if (!caps.host_memory && pool.memory != MemoryKind::kCuda) {
    return InvalidArgumentError(
        "AgentOptions.pool.memory = " + std::string(MemoryKindName(pool.memory)) + ": the " +
        caps.name + " transport cannot reach host memory");
  }
  // A device pool the transport cannot reach (Debian's UCX has no CUDA
  // support) is not registered with it: its KV is staged through pinned
  // host arenas on the bounce path, the only path it then has
  // (docs/cuda.md, "Host-staged bounce").
  const bool pool_registered = pool.memory != MemoryKind::kCuda || caps.device_memory;

  // Register the pool, one region per allocation.
  std::vector<LocalRange> ranges;
  const size_t allocations = !pool_registered           ? 0
                             : layout.per_layer_bases() ? pool.bases.size()
                                                        : 1;
  for (size_t i = 0; i < allocations; ++i) {
    const Addr base = layout.layer_base(static_cast<int>(i));
    Result<std::unique_ptr<LocalRegion>> region =
        transport_->Register(base, layout.allocation_bytes(), pool.memory);
    if (!region.ok()) return region.status().WithContext("registering the KV pool");
    ranges.push_back(LocalRange{base, layout.allocation_bytes(), region->get()});
    pool_regions_.push_back(std::move(region).value());
  }
  // The state pool's allocations follow, as more pool regions (HELLO lists
  // them after the KV pool's).
  if (pool_registered && state_layout) {
    for (const Addr base : state_layout->bases()) {
      Result<std::unique_ptr<LocalRegion>> region =
          transport_->Register(base, state_layout->allocation_bytes(), pool.memory);
      if (!region.ok()) return region.status().WithContext("registering the state pool");
      ranges.push_back(LocalRange{base, state_layout->allocation_bytes(), region->get()});
      pool_regions_.push_back(std::move(region).value());
    }
  }

  // The copy engine follows the pool (docs/cuda.md, "Device pools"): the
  // batched kernel on the pool's device for a device pool, the CPU engine
  // for host pools.
  if (device != nullptr) {
    Result<std::unique_ptr<CopyEngine>> engine =
        device->NewCopyEngine(pool.device, std::chrono::microseconds(config.poll_before_sleep_us));
    if (!engine.ok()) return engine.status().WithContext("the copy engine of the cuda pool");
    copy_ = std::move(engine).value();
  } else {
    // Every agent of the process copies on the one shared pool of workers
    // (copy/cpu/copy_workers.h): a cluster of agents in one process starts
    // no more copy threads than the machine has cores.
    KVB_ASSIGN_OR_RETURN(std::shared_ptr<CopyWorkers> workers, CopyWorkers::Shared());
    CpuCopyEngine::Options copy_options;
    copy_options.workers = std::move(workers);
    KVB_ASSIGN_OR_RETURN(std::unique_ptr<CpuCopyEngine> engine,
                         CpuCopyEngine::Create(copy_options));
    copy_ = std::move(engine);
  }
  if (hooks.wrap_copy_engine) {
    copy_ = hooks.wrap_copy_engine(std::move(copy_));
    if (copy_ == nullptr) return InvalidArgumentError("AgentHooks.wrap_copy_engine returned null");
  }

  const LocalRegion* send_region = nullptr;
  const LocalRegion* recv_region = nullptr;
  if (config.bounce_size_mb > 0) {
    const uint64_t bytes = MiB(static_cast<uint64_t>(config.bounce_size_mb));
    auto make_arena = [&](const char* which, std::unique_ptr<Arena>* out,
                          const LocalRegion** region_out) -> Status {
      // Staging memory follows the pool and the transport (docs/cuda.md):
      // device memory beside a device pool that the transport reaches,
      // pinned host memory (which the device's copy engine reaches too)
      // beside one it does not, host memory beside a host pool.
      Result<std::unique_ptr<Allocation>> allocated =
          device == nullptr ? HostAllocation::Create(bytes)
          : pool_registered ? device->AllocateDevice(pool.device, bytes)
                            : device->AllocatePinned(bytes);
      if (!allocated.ok()) {
        return allocated.status().WithContext(std::string("allocating the ") + which);
      }
      std::unique_ptr<Allocation> memory = std::move(allocated).value();
      const MemoryKind kind = memory->kind();
      Arena::Options arena_options;
      arena_options.name = options.instance_id + "/" + std::to_string(options.rank) + " " + which;
      const Addr address = memory->address();
      KVB_ASSIGN_OR_RETURN(std::unique_ptr<Arena> arena,
                           Arena::Create(arena_options, std::move(memory)));
      Result<std::unique_ptr<LocalRegion>> region = transport_->Register(address, bytes, kind);
      if (!region.ok()) return region.status().WithContext(std::string("registering the ") + which);
      *region_out = region->get();
      KVB_RETURN_IF_ERROR(arena->AttachRegistration(std::move(region).value()));
      *out = std::move(arena);
      return Status::Ok();
    };
    // A rank's role is fixed: a ctx rank only ever gathers into a send
    // arena, a gen rank only grants recv slots. Each gets the one it uses.
    if (options.role == Role::kCtx) {
      KVB_RETURN_IF_ERROR(make_arena("send arena", &send_arena_, &send_region));
    } else {
      KVB_RETURN_IF_ERROR(make_arena("recv arena", &recv_arena_, &recv_region));
    }
  }

  Result<std::unique_ptr<PerfLog>> perf_log = PerfLog::FromEnvironment();
  if (!perf_log.ok()) return perf_log.status();
  if (*perf_log) metrics_.SetPerfLog(std::move(perf_log).value());

  connect_timeout_ = options.connect_timeout;
  clock_ = hooks.clock != nullptr
               ? std::move(hooks.clock)
               : std::shared_ptr<Clock>(std::shared_ptr<Clock>(), Clock::Steady());
  // The transport's progress joins the loop where it can (Config::
  // progress_on_loop); the transport's Shutdown runs before the loop's Stop.
  std::unique_ptr<ProgressSource> progress;
  if (config.progress_on_loop != 0) progress = transport_->TakeProgressSource();
  KVB_ASSIGN_OR_RETURN(
      loop_, EventLoop::Create(clock_.get(), std::chrono::microseconds(config.poll_before_sleep_us),
                               std::move(progress)));
  gate_ = std::make_shared<LoopGate>(loop_.get());
  ctx_.instance_id = options.instance_id;
  ctx_.role = options.role;
  ctx_.rank = options.rank;
  ctx_.topology = std::make_shared<const Topology>(std::move(topology));
  ctx_.pool = std::move(layout);
  ctx_.state_pool = std::move(state_layout);
  ctx_.pool_memory = pool.memory;
  ctx_.pool_device = pool.memory == MemoryKind::kCuda ? pool.device : -1;
  ctx_.config = config;
  ctx_.grace = options.grace;
  ctx_.transport = transport_.get();
  ctx_.writes_land_at_completion = transport_->Caps().writes_land_at_completion;
  ctx_.copy = copy_.get();
  ctx_.send_arena = send_arena_.get();
  ctx_.recv_arena = recv_arena_.get();
  ctx_.send_region = send_region;
  ctx_.recv_region = recv_region;
  ctx_.pool_ranges = std::move(ranges);
  ctx_.loop = loop_.get();
  ctx_.clock = clock_.get();
  ctx_.metrics = &metrics_;
  std::weak_ptr<LoopGate> gate = gate_;
  receiver_ = std::make_unique<ReceiverSession>(ctx_, [this, gate](uint64_t id, uint32_t slice) {
    if (auto g = gate.lock()) {
      g->Post([this, id, slice] {
        receiver_->Cancel(
            id, slice,
            CancelledError("request " + std::to_string(id) + " cancelled by the application"));
      });
    }
  });
  sender_ = std::make_unique<SenderSession>(ctx_, [this, gate](uint64_t id) {
    if (auto g = gate.lock()) {
      g->Post([this, id] {
        sender_
            ->Retire(id, CancelledError("publication of request " + std::to_string(id) +
                                        " cancelled by the application"))
            .IgnoreError();
      });
    }
  });

  TransportCallbacks callbacks;
  callbacks.on_message = [this](PeerId peer, std::vector<std::byte> frame) {
    loop_->Post([this, peer, frame = std::move(frame)] { HandleMessage(peer, frame); });
  };
  callbacks.on_peer_failure = [this](PeerId peer, const Status& reason) {
    loop_->Post([this, peer, reason] { HandlePeerFailure(peer, reason); });
  };
  return transport_->Start(std::move(callbacks));
}

protocol::Hello AgentImpl::BuildHello(PeerId peer) const {
  protocol::Hello h;
  h.instance_id = ctx_.instance_id;
  h.role = ctx_.role == Role::kCtx ? protocol::Role::kCtx : protocol::Role::kGen;
  const RankPlacement p = ctx_.topology->Placement(ctx_.rank);
  h.placement.tp_rank = static_cast<uint32_t>(p.tp_rank);
  h.placement.tp_size = static_cast<uint32_t>(p.tp_size);
  h.placement.pp_rank = static_cast<uint32_t>(p.pp_rank);
  h.placement.pp_size = static_cast<uint32_t>(p.pp_size);
  for (int n : ctx_.topology->layers_per_stage())
    h.placement.layers_per_stage.push_back(static_cast<uint32_t>(n));
  const ModelShape& m = ctx_.topology->spec().model;
  h.model.num_layers = static_cast<uint32_t>(m.num_layers);
  h.model.num_kv_heads = static_cast<uint32_t>(m.num_kv_heads);
  h.model.head_dim = static_cast<uint32_t>(m.head_dim);
  h.model.kv_factor = static_cast<uint32_t>(m.kv_factor);
  h.model.elem_bytes = ctx_.topology->elem_bytes();
  h.model.layer_pattern = m.layer_pattern;
  for (const StateTensor& t : m.state) {
    protocol::StateTensorDescriptor d;
    d.elem_bytes = DTypeBytes(t.dtype);
    for (const StateSegment& seg : t.segments) {
      d.segments.push_back(protocol::StateSegmentDescriptor{static_cast<uint32_t>(seg.units),
                                                            static_cast<uint32_t>(seg.unit_elems)});
    }
    h.model.state.push_back(std::move(d));
  }
  if (ctx_.state_pool) {
    const StatePoolLayout& sp = *ctx_.state_pool;
    h.state_layout.kind = static_cast<protocol::StateLayoutKind>(sp.kind());
    h.state_layout.num_slots = static_cast<uint32_t>(sp.num_slots());
    if (sp.per_layer_bases()) {
      for (Addr b : sp.bases()) h.state_layout.layer_bases.push_back(b.value());
    } else {
      h.state_layout.base = sp.bases()[0].value();
    }
  } else {
    h.state_layout.kind =
        static_cast<protocol::StateLayoutKind>(ctx_.topology->spec().state_layout);
  }
  const PoolLayout& pool = *ctx_.pool;
  h.layout.kind = static_cast<protocol::LayoutKind>(pool.kind());
  h.layout.tokens_per_block = static_cast<uint32_t>(pool.geometry().tokens_per_block);
  h.layout.num_blocks = static_cast<uint32_t>(pool.geometry().num_blocks);
  h.layout.base = pool.layer_base(0).value();
  h.layout.s_layer = pool.layer_stride();
  h.layout.s_kv = pool.kv_stride();
  h.layout.s_block = pool.block_stride();
  h.layout.s_head = pool.head_stride();
  h.layout.s_token = pool.token_stride();
  if (pool.per_layer_bases()) {
    for (int l = 0; l < pool.geometry().num_layers; ++l)
      h.layout.layer_bases.push_back(pool.layer_base(l).value());
  }
  auto region = [&](protocol::RegionKind kind, const LocalRegion& r) {
    const RegionInfo& info = r.info();
    const uint32_t device = info.kind == MemoryKind::kCuda && info.device >= 0
                                ? static_cast<uint32_t>(info.device)
                                : protocol::kNoDevice;
    h.regions.push_back(protocol::RegionDescriptor{
        kind, ToWire(info.kind), device, info.address.value(), info.size, info.remote_key});
  };
  for (const LocalRange& r : ctx_.pool_ranges) region(protocol::RegionKind::kPool, *r.region);
  if (ctx_.send_region != nullptr) region(protocol::RegionKind::kSendArena, *ctx_.send_region);
  if (ctx_.recv_region != nullptr) region(protocol::RegionKind::kRecvArena, *ctx_.recv_region);
  // Per connection: whether this end can map the peer's memory may depend
  // on the peer (same host or not).
  Result<TransportCaps> peer_caps = transport_->PeerCaps(peer);
  const TransportCaps caps = peer_caps.ok() ? *peer_caps : transport_->Caps();
  if (ctx_.recv_region != nullptr) h.capabilities |= protocol::kCapabilityBounce;
  if (caps.map_remote) h.capabilities |= protocol::kCapabilityDirect;
  if (caps.host_memory) h.capabilities |= protocol::kCapabilityHostMemory;
  if (caps.device_memory) h.capabilities |= protocol::kCapabilityDeviceMemory;
  return h;
}

Status AgentImpl::AdoptHello(PeerState& peer, const protocol::Hello& h) {
  const Role role = h.role == protocol::Role::kCtx ? Role::kCtx : Role::kGen;
  if (role == ctx_.role) {
    return InvalidArgumentError("peer '" + h.instance_id + "' is a " + std::string(RoleName(role)) +
                                " rank like this one: ctx ranks talk to gen ranks");
  }
  const InstanceSpec& mine = ctx_.topology->spec();
  if (static_cast<int>(h.model.num_layers) != mine.model.num_layers ||
      static_cast<int>(h.model.num_kv_heads) != mine.model.num_kv_heads ||
      static_cast<int>(h.model.head_dim) != mine.model.head_dim ||
      static_cast<int>(h.model.kv_factor) != mine.model.kv_factor) {
    return InvalidArgumentError(
        "peer '" + h.instance_id + "' serves another model: " + std::to_string(h.model.num_layers) +
        " layers, " + std::to_string(h.model.num_kv_heads) + " kv heads, head dim " +
        std::to_string(h.model.head_dim) + ", kv factor " + std::to_string(h.model.kv_factor));
  }
  if (!SameStateShape(h.model, mine.model)) {
    return InvalidArgumentError("peer '" + h.instance_id +
                                "' serves another model: layer pattern '" + h.model.layer_pattern +
                                "' with " + std::to_string(h.model.state.size()) +
                                " state tensors, this rank '" + mine.model.layer_pattern +
                                "' with " + std::to_string(mine.model.state.size()) +
                                " (hybrid models must agree on their layers and state shapes)");
  }
  if (h.model.elem_bytes != ctx_.topology->elem_bytes()) {
    return InvalidArgumentError("peer '" + h.instance_id + "' stores " +
                                std::to_string(h.model.elem_bytes) + "-byte elements, this rank " +
                                std::to_string(ctx_.topology->elem_bytes()) +
                                ": dtype conversion is not supported");
  }
  InstanceSpec spec;
  spec.model = mine.model;
  spec.dtype = DTypeOfSize(h.model.elem_bytes, mine.dtype);
  spec.tp = static_cast<int>(h.placement.tp_size);
  spec.pp = static_cast<int>(h.placement.pp_size);
  for (uint32_t n : h.placement.layers_per_stage)
    spec.layers_per_stage.push_back(static_cast<int>(n));
  spec.layout = static_cast<LayoutKind>(h.layout.kind);
  spec.tokens_per_block = static_cast<int>(h.layout.tokens_per_block);
  spec.state_layout = static_cast<StateLayoutKind>(h.state_layout.kind);
  Result<Topology> topology = Topology::Create(spec, "peer instance '" + h.instance_id + "'");
  if (!topology.ok()) return topology.status();
  const int rank =
      static_cast<int>(h.placement.pp_rank * h.placement.tp_size + h.placement.tp_rank);

  std::shared_ptr<const Topology> shared;
  auto known = ctx_.instances.find(h.instance_id);
  if (known != ctx_.instances.end()) {
    const InstanceSpec& other = known->second->spec();
    if (other.tp != spec.tp || other.pp != spec.pp ||
        known->second->layers_per_stage() != topology->layers_per_stage() ||
        other.layout != spec.layout || other.tokens_per_block != spec.tokens_per_block ||
        other.state_layout != spec.state_layout ||
        DTypeBytes(other.dtype) != DTypeBytes(spec.dtype)) {
      return InvalidArgumentError("rank " + std::to_string(rank) + " of instance '" +
                                  h.instance_id +
                                  "' describes the instance differently from its other ranks");
    }
    shared = known->second;
  } else {
    shared = std::make_shared<const Topology>(std::move(topology).value());
  }
  if (PeerState* existing = ctx_.FindPeer(h.instance_id, rank);
      existing != nullptr && existing->id != peer.id) {
    return AlreadyExistsError("instance '" + h.instance_id + "' rank " + std::to_string(rank) +
                              " is already connected");
  }

  Result<PoolLayout> pool =
      PoolLayout::ForRank(*shared, rank, h.layout.num_blocks, Addr(h.layout.base));
  if (!pool.ok()) return pool.status().WithContext("peer pool");
  if (!h.layout.layer_bases.empty()) {
    std::vector<Addr> bases;
    for (uint64_t b : h.layout.layer_bases) bases.push_back(Addr(b));
    pool = PoolLayout::CreatePerLayer(pool->kind(), pool->geometry(), bases);
    if (!pool.ok()) return pool.status().WithContext("peer pool");
  }
  if (pool->layer_stride() != h.layout.s_layer || pool->kv_stride() != h.layout.s_kv ||
      pool->block_stride() != h.layout.s_block || pool->head_stride() != h.layout.s_head ||
      pool->token_stride() != h.layout.s_token) {
    return InvalidArgumentError("peer '" + h.instance_id + "' rank " + std::to_string(rank) +
                                ": its " + std::string(LayoutKindName(pool->kind())) +
                                " strides differ from this build's definition of that layout");
  }

  // Its state pool (hybrid models), where it has one.
  std::optional<StatePoolLayout> state_pool;
  if (h.state_layout.num_slots > 0) {
    std::vector<Addr> bases;
    if (h.state_layout.layer_bases.empty()) {
      bases.push_back(Addr(h.state_layout.base));
    } else {
      for (uint64_t b : h.state_layout.layer_bases) bases.push_back(Addr(b));
    }
    Result<StatePoolLayout> sp =
        StatePoolLayout::ForRank(*shared, rank, h.state_layout.num_slots, std::move(bases));
    if (!sp.ok()) return sp.status().WithContext("peer state pool");
    state_pool = std::move(sp).value();
  }

  // Import the regions we may write into: the pool (per allocation, the
  // state pool's after the KV pool's) and the recv arena.
  std::vector<std::unique_ptr<RemoteRegion>> pool_regions;
  std::unique_ptr<RemoteRegion> recv_arena;
  bool send_arena = false;
  MemoryKind pool_memory = MemoryKind::kHost;
  int pool_device = -1;
  for (const protocol::RegionDescriptor& d : h.regions) {
    if (d.kind == protocol::RegionKind::kSendArena) {
      send_arena = true;  // the peer gathers there; nothing to import
      continue;
    }
    const int device = d.device == protocol::kNoDevice ? -1 : static_cast<int>(d.device);
    RegionInfo info{Addr(d.addr), d.size, FromWire(d.memory), device, d.remote_key};
    Result<std::unique_ptr<RemoteRegion>> imported = transport_->Import(peer.id, info);
    if (!imported.ok())
      return imported.status().WithContext("importing a region of peer '" + h.instance_id + "'");
    if (d.kind == protocol::RegionKind::kPool) {
      pool_memory = FromWire(d.memory);
      pool_device = device;
      pool_regions.push_back(std::move(imported).value());
    } else {
      recv_arena = std::move(imported).value();
    }
  }
  // No pool region at all: a device pool its transport cannot reach
  // (host-staged bounce). Only per-block and direct need them.
  const size_t kv_allocations = pool->per_layer_bases() ? h.layout.layer_bases.size() : 1;
  const size_t state_allocations = state_pool ? state_pool->bases().size() : 0;
  const size_t allocations = pool_regions.empty() ? 0 : kv_allocations + state_allocations;
  if (pool_regions.size() != allocations) {
    return InvalidArgumentError("peer '" + h.instance_id + "' registered " +
                                std::to_string(pool_regions.size()) + " pool regions for " +
                                std::to_string(allocations) + " pool allocations");
  }
  // The state pool's regions, apart (the KV pool's mapping below takes the
  // first kv_allocations).
  std::vector<Addr> mapped_state;
  for (size_t i = 0; allocations > 0 && i < state_allocations; ++i) {
    const uint64_t base = state_pool->bases()[i].value();
    const RemoteRegion& region = *pool_regions[kv_allocations + i];
    const RegionInfo& info = region.info();
    if (base < info.address.value() ||
        base - info.address.value() + state_pool->allocation_bytes() > info.size) {
      return InvalidArgumentError("peer '" + h.instance_id + "': state pool allocation " +
                                  std::to_string(i) + " lies outside its registered region");
    }
    if (region.mapped_address() != Addr()) {
      mapped_state.push_back(region.mapped_address() + (base - info.address.value()));
    }
  }
  std::vector<Addr> mapped;
  for (size_t i = 0; allocations > 0 && i < kv_allocations; ++i) {
    const uint64_t base = pool->layer_base(static_cast<int>(i)).value();
    const RegionInfo& info = pool_regions[i]->info();
    if (base < info.address.value() ||
        base - info.address.value() + pool->allocation_bytes() > info.size) {
      return InvalidArgumentError("peer '" + h.instance_id + "': pool allocation " +
                                  std::to_string(i) + " lies outside its registered region");
    }
    if (pool_regions[i]->mapped_address() != Addr()) {
      mapped.push_back(pool_regions[i]->mapped_address() + (base - info.address.value()));
    }
  }

  peer.instance_id = h.instance_id;
  peer.role = role;
  peer.rank = rank;
  peer.topology = shared;
  peer.pool = std::move(pool).value();
  if (allocations > 0 && mapped.size() == kv_allocations) {
    Result<PoolLayout> m = peer.pool->Rebased(mapped);
    if (m.ok()) peer.mapped_pool = std::move(m).value();
  }
  peer.state_pool = std::move(state_pool);
  peer.mapped_state_pool.reset();
  if (peer.state_pool && allocations > 0 && mapped_state.size() == state_allocations) {
    Result<StatePoolLayout> m = peer.state_pool->Rebased(mapped_state);
    if (m.ok()) peer.mapped_state_pool = std::move(m).value();
  }
  peer.pool_regions = std::move(pool_regions);
  peer.recv_arena = std::move(recv_arena);
  peer.send_arena = send_arena;
  peer.pool_memory = pool_memory;
  peer.pool_device = pool_device;
  peer.capabilities = h.capabilities;
  peer.hello_received = true;
  ctx_.instances[h.instance_id] = shared;
  ctx_.peer_by_rank[{h.instance_id, rank}] = peer.id;
  ctx_.lost_ranks.erase({h.instance_id, rank});
  return Status::Ok();
}

void AgentImpl::HandleHello(PeerId id, const protocol::Hello& hello) {
  PeerState& peer = ctx_.peers[id];
  peer.id = id;
  if (peer.dead) return;
  if (peer.hello_received) {
    Refuse(peer, protocol::ByeReason::kProtocolError,
           InvalidArgumentError("second HELLO from " + peer.Describe()));
    return;
  }
  Status adopted = AdoptHello(peer, hello);
  if (!adopted.ok()) {
    Log(LogLevel::kWarning, "refusing peer: " + adopted.ToString());
    Refuse(peer, protocol::ByeReason::kIncompatible, adopted);
    return;
  }
  if (!peer.hello_sent) {
    peer.hello_sent = true;
    Status sent = ctx_.Send(id, BuildHello(id));
    if (!sent.ok()) Log(LogLevel::kWarning, "HELLO to " + peer.Describe() + ": " + sent.ToString());
  }
  NotifyConnect(id, Status::Ok());
}

void AgentImpl::Refuse(PeerState& peer, protocol::ByeReason reason, const Status& why) {
  protocol::Bye bye{reason, std::string(why.message()).substr(0, 4000)};
  const PeerId id = peer.id;
  ctx_.Send(id, bye).IgnoreError();
  HandlePeerFailure(id, why);  // settles whatever depended on the peer
  transport_->Disconnect(id, why);
}

void AgentImpl::HandleMessage(PeerId id, const std::vector<std::byte>& frame) {
  Result<protocol::Message> message = protocol::DecodeFrame(frame);
  if (!message.ok()) {
    PeerState& peer = ctx_.peers[id];
    peer.id = id;
    Log(LogLevel::kWarning,
        "malformed frame from " + peer.Describe() + ": " + message.status().ToString());
    if (!peer.dead) Refuse(peer, protocol::ByeReason::kProtocolError, message.status());
    return;
  }
  if (const auto* hello = std::get_if<protocol::Hello>(&*message)) {
    HandleHello(id, *hello);
    return;
  }
  PeerState* peer = ctx_.FindPeer(id);
  if (const auto* bye = std::get_if<protocol::Bye>(&*message)) {
    if (peer != nullptr) {
      // What Connect reports: the peer refused us as incompatible
      // (kInvalidArgument), found our frames malformed (kDataLoss), or left.
      const std::string text = peer->Describe() + " said BYE (" +
                               std::string(protocol::ByeReasonName(bye->reason)) +
                               "): " + bye->message;
      const Status why = bye->reason == protocol::ByeReason::kIncompatible
                             ? InvalidArgumentError(text)
                         : bye->reason == protocol::ByeReason::kProtocolError
                             ? DataLossError(text)
                             : UnavailableError(text);
      HandlePeerFailure(id, why);
      transport_->Disconnect(id, why);
    }
    return;
  }
  if (peer == nullptr || !peer->ready()) {
    PeerState& p = ctx_.peers[id];
    p.id = id;
    if (!p.dead) {
      Refuse(p, protocol::ByeReason::kProtocolError,
             InvalidArgumentError("a message before HELLO from peer " + std::to_string(id)));
    }
    return;
  }
  if (const auto* request = std::get_if<protocol::KvRequest>(&*message)) {
    if (ctx_.role == Role::kCtx) sender_->OnRequest(*peer, *request);
  } else if (const auto* result = std::get_if<protocol::KvResult>(&*message)) {
    if (ctx_.role == Role::kGen) receiver_->OnResult(*peer, *result);
  } else if (const auto* cancel = std::get_if<protocol::Cancel>(&*message)) {
    if (ctx_.role == Role::kCtx) sender_->OnCancel(*peer, *cancel);
  } else if (const auto* ready = std::get_if<protocol::KvReady>(&*message)) {
    if (ctx_.role == Role::kGen) receiver_->OnReady(*peer, *ready);
  } else if (const auto* read_done = std::get_if<protocol::KvReadDone>(&*message)) {
    if (ctx_.role == Role::kCtx) sender_->OnReadDone(*peer, *read_done);
  } else if (const auto* grant = std::get_if<protocol::KvGrant>(&*message)) {
    if (ctx_.role == Role::kCtx) sender_->OnGrant(*peer, *grant);
  } else if (const auto* chunk = std::get_if<protocol::KvChunk>(&*message)) {
    if (ctx_.role == Role::kGen) receiver_->OnChunk(*peer, *chunk);
  }
}

void AgentImpl::HandlePeerFailure(PeerId id, const Status& reason) {
  PeerState& peer = ctx_.peers[id];
  peer.id = id;
  if (peer.dead) return;
  peer.dead = true;
  peer.death = reason;
  metrics_.Count(Counter::kPeerFailures);
  if (peer.rank >= 0) {
    auto it = ctx_.peer_by_rank.find({peer.instance_id, peer.rank});
    if (it != ctx_.peer_by_rank.end() && it->second == id) {
      ctx_.peer_by_rank.erase(it);
      ctx_.lost_ranks[{peer.instance_id, peer.rank}] = reason;
    }
  }
  receiver_->OnPeerFailure(peer);
  sender_->OnPeerFailure(peer);
  NotifyConnect(id, reason);
}

void AgentImpl::NotifyConnect(PeerId id, const Status& status) {
  {
    std::lock_guard<std::mutex> lock(connect_mu_);
    connect_results_.emplace(id, status);  // the first outcome counts
  }
  connect_cv_.notify_all();
}

Status AgentImpl::Connect(std::span<const std::string> addresses) {
  return Guarded("Connect", [&] { return ConnectAll(addresses); });
}

Status AgentImpl::ConnectAll(std::span<const std::string> addresses) {
  if (ctx_.shutting_down.load()) return AbortedError("Connect: the agent is shutting down");
  std::vector<std::pair<PeerId, std::string>> pending;
  for (const std::string& address : addresses) {
    Result<PeerId> id = transport_->Connect(address);
    if (!id.ok()) return id.status().WithContext("Connect to '" + address + "'");
    PeerId peer_id = *id;
    KVB_RETURN_IF_ERROR(OnLoopStatus([&]() -> Status {
      PeerState& peer = ctx_.peers[peer_id];
      peer.id = peer_id;
      if (peer.hello_sent || peer.dead) return Status::Ok();
      peer.hello_sent = true;
      return ctx_.Send(peer_id, BuildHello(peer_id)).WithContext("HELLO to '" + address + "'");
    }));
    pending.emplace_back(peer_id, address);
  }
  std::unique_lock<std::mutex> lock(connect_mu_);
  const auto deadline = std::chrono::steady_clock::now() + connect_timeout_;
  for (const auto& [id, address] : pending) {
    const PeerId peer_id = id;
    if (!connect_cv_.wait_until(lock, deadline, [&] {
          return connect_results_.count(peer_id) != 0 || connect_aborted_;
        })) {
      return DeadlineExceededError("Connect to '" + address + "': no HELLO within " +
                                   std::to_string(connect_timeout_.count()) + " ms");
    }
    if (connect_results_.count(peer_id) == 0) {
      return AbortedError("Connect to '" + address + "': the agent is shutting down");
    }
    const Status& result = connect_results_[peer_id];
    if (!result.ok()) return result.WithContext("Connect to '" + address + "'");
  }
  return Status::Ok();
}

Result<std::shared_ptr<Transfer>> AgentImpl::Publish(uint64_t request_id,
                                                     std::span<const int32_t> block_table,
                                                     int64_t num_tokens, PublishOptions options) {
  return Guarded("Publish", [&]() -> Result<std::shared_ptr<Transfer>> {
    if (ctx_.shutting_down.load()) return AbortedError("Publish: the agent is shutting down");
    if (ctx_.role != Role::kCtx) {
      return InvalidArgumentError("Publish: this agent is a gen rank; only ctx ranks publish");
    }
    KVB_RETURN_IF_ERROR(CheckDuration("Publish: PublishOptions.ttl", options.ttl, 0));
    if (num_tokens < 1) {
      return InvalidArgumentError("Publish: num_tokens = " + std::to_string(num_tokens) +
                                  " is invalid: must be >= 1");
    }
    KVB_RETURN_IF_ERROR(CheckBlockTable("Publish", block_table, num_tokens,
                                        std::to_string(num_tokens) + " tokens"));
    KVB_RETURN_IF_ERROR(
        ctx_.CheckStateSlot("Publish: PublishOptions.state_slot", options.state_slot));
    std::vector<int32_t> table(block_table.begin(), block_table.end());
    auto t = OnLoop<std::shared_ptr<Transfer>>(
        [&]() { return sender_->Publish(request_id, std::move(table), num_tokens, options); });
    if (t.ok()) metrics_.TrackInFlight(Side::kSender, **t);
    return t;
  });
}

Status AgentImpl::Retire(uint64_t request_id) {
  return Guarded("Retire", [&] {
    return OnLoopStatus([&] {
      return sender_->Retire(request_id, CancelledError("publication of request " +
                                                        std::to_string(request_id) + " retired"));
    });
  });
}

Status AgentImpl::CheckPull(std::span<const int32_t> block_table, TokenRange tokens,
                            const PullOptions& options) const {
  if (!IsTransferPath(options.path)) {
    return InvalidArgumentError("Pull: PullOptions.path = " +
                                std::to_string(static_cast<int>(options.path)) +
                                " is not a TransferPath");
  }
  KVB_RETURN_IF_ERROR(CheckDuration("Pull: PullOptions.timeout", options.timeout, 0));
  if (tokens.start < 0 || tokens.end <= tokens.start) {
    return InvalidArgumentError("Pull: token range [" + std::to_string(tokens.start) + ", " +
                                std::to_string(tokens.end) +
                                ") is invalid: must be non-empty and start at >= 0");
  }
  const int64_t tpb = ctx_.topology->spec().tokens_per_block;
  const int64_t needed = *CheckedCeilDiv(tokens.end, tpb);
  if (needed > static_cast<int64_t>(protocol::kMaxBlockTableEntries)) {
    return OutOfRangeError("Pull: tokens [" + std::to_string(tokens.start) + ", " +
                           std::to_string(tokens.end) + ") need " + std::to_string(needed) +
                           " blocks; a request carries at most " +
                           std::to_string(protocol::kMaxBlockTableEntries));
  }
  // Every entry the request carries is checked, also those below the range
  // (the writers plan with the whole table).
  return CheckBlockTable("Pull", block_table, tokens.end,
                         "tokens [0, " + std::to_string(tokens.end) + ")");
}

Status AgentImpl::CheckBlockTable(const char* call, std::span<const int32_t> block_table,
                                  int64_t tokens_end, const std::string& tokens_text) const {
  // The table must cover ceil(tokens_end / tokens_per_block) blocks, each
  // inside the pool; a count no table can reach is refused before anything
  // is copied.
  const int64_t tpb = ctx_.topology->spec().tokens_per_block;
  const int64_t needed = *CheckedCeilDiv(tokens_end, tpb);
  if (needed > static_cast<int64_t>(block_table.size())) {
    return OutOfRangeError(std::string(call) + ": " + tokens_text + " need " +
                           std::to_string(needed) + " blocks of " + std::to_string(tpb) +
                           " tokens but the block table has " +
                           std::to_string(block_table.size()));
  }
  const int64_t pool_blocks = ctx_.pool->geometry().num_blocks;
  for (int64_t i = 0; i < needed; ++i) {
    const int32_t id = block_table[static_cast<size_t>(i)];
    if (id < 0 || id >= pool_blocks) {
      return OutOfRangeError(std::string(call) + ": block table entry " + std::to_string(i) +
                             " = " + std::to_string(id) + " is outside the pool of " +
                             std::to_string(pool_blocks) + " blocks");
    }
  }
  return Status::Ok();
}

Result<std::shared_ptr<Transfer>> AgentImpl::Pull(uint64_t request_id,
                                                  std::string_view ctx_instance,
                                                  std::span<const int32_t> block_table,
                                                  TokenRange tokens, PullOptions options) {
  return Guarded("Pull", [&]() -> Result<std::shared_ptr<Transfer>> {
    if (ctx_.shutting_down.load()) return AbortedError("Pull: the agent is shutting down");
    if (ctx_.role != Role::kGen) {
      return InvalidArgumentError("Pull: this agent is a ctx rank; only gen ranks pull");
    }
    KVB_RETURN_IF_ERROR(CheckPull(block_table, tokens, options));
    std::vector<int32_t> table(block_table.begin(), block_table.end());
    std::string instance(ctx_instance);
    auto t = OnLoop<std::shared_ptr<Transfer>>(
        [&]() { return receiver_->Pull(request_id, instance, std::move(table), tokens, options); });
    if (t.ok()) metrics_.TrackInFlight(Side::kReceiver, **t);
    return t;
  });
}

Result<int> AgentImpl::ReceiverCount(std::string_view gen_instance) const {
  return Guarded("ReceiverCount", [&]() -> Result<int> {
    std::string instance(gen_instance);
    return OnLoop<int>([&]() -> Result<int> {
      auto it = ctx_.instances.find(instance);
      if (it == ctx_.instances.end()) {
        return NotFoundError("no gen instance '" + instance + "' is connected");
      }
      return static_cast<int>(Receivers(*ctx_.topology, ctx_.rank, *it->second).size());
    });
  });
}

Result<std::vector<TransferPath>> AgentImpl::Paths(std::string_view ctx_instance) const {
  return Guarded("Paths", [&]() -> Result<std::vector<TransferPath>> {
    std::string instance(ctx_instance);
    return OnLoop<std::vector<TransferPath>>(
        [&]() -> Result<std::vector<TransferPath>> { return receiver_->Paths(instance); });
  });
}

AgentStats AgentImpl::Stats() const {
  try {
    return CollectStats();
  } catch (const std::exception& e) {
    Log(LogLevel::kError, std::string("Stats: ") + e.what());
    return AgentStats();
  }
}

AgentStats AgentImpl::CollectStats() const {
  const MetricsSnapshot snap = metrics_.Snapshot();
  AgentStats stats;
  for (Side side : {Side::kSender, Side::kReceiver}) {
    const SideMetrics& m = snap.side(side);
    stats.requests_completed += m.requests_with(Outcome::kCompleted);
    stats.requests_failed += m.requests_with(Outcome::kFailed);
    stats.requests_cancelled += m.requests_with(Outcome::kCancelled);
    stats.requests_timed_out += m.requests_with(Outcome::kTimedOut);
    stats.bytes_completed += m.bytes_completed;
    stats.transport_writes += m.transport_writes;
    for (const auto& [reason, n] : m.fallbacks) stats.fallbacks += n;
  }
  stats.rejected_results = snap.counter(Counter::kRejectedResults);
  stats.quarantined_slots = snap.counter(Counter::kQuarantinedSlots);
  for (const Arena* arena : {send_arena_.get(), recv_arena_.get()}) {
    if (arena == nullptr) continue;
    stats.arena_outstanding_bytes += arena->outstanding_bytes();
    stats.arena_quarantined_bytes += arena->quarantined_bytes();
    stats.arena_peak_bytes = std::max(stats.arena_peak_bytes, arena->peak_outstanding_bytes());
  }
  stats.chunks_granted = snap.counter(Counter::kChunksGranted);
  stats.chunks_written = snap.counter(Counter::kChunksWritten);
  stats.chunks_scattered = snap.counter(Counter::kChunksScattered);
  stats.credit_stall = std::chrono::nanoseconds(snap.counter(Counter::kCreditStallNs));
  stats.grant_queue = snap.grant_queue;
  stats.grant_queue_peak = snap.grant_queue_peak;
  nlohmann::json j = ToJson(snap);
  const TransportStats t = transport_->Stats();
  stats.transport_write_ops = t.write_ops;
  j["transport"] = {{"write_ops", t.write_ops},
                    {"write_bytes", t.write_bytes},
                    {"failed_write_ops", t.failed_write_ops},
                    {"flushes", t.flushes},
                    {"messages_sent", t.messages_sent},
                    {"messages_received", t.messages_received}};
  j["arena_outstanding_bytes"] = stats.arena_outstanding_bytes;
  j["arena_peak_bytes"] = stats.arena_peak_bytes;
  stats.json = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  return stats;
}

void AgentImpl::Shutdown() {
  std::lock_guard<std::mutex> lock(shutdown_mu_);
  if (shut_down_ || loop_ == nullptr) {
    shut_down_ = true;
    return;
  }
  shut_down_ = true;
  try {
    ShutdownLocked();
  } catch (const std::exception& e) {
    Log(LogLevel::kError, std::string("Shutdown: ") + e.what());
  }
}

// The order is what makes "settled means settled" hold at shutdown
// (docs/sessions.md "Shutdown"): nothing settles until no operation of this
// agent, and no peer's operation into its memory, can run any more.
void AgentImpl::ShutdownLocked() {
  ctx_.shutting_down.store(true);
  const Status why =
      AbortedError(ctx_.instance_id + " rank " + std::to_string(ctx_.rank) + " is shutting down");

  // 1. Stop accepting; cancel pulls and stop jobs (their operations end at
  //    the next grain); give writers and readers the grace period to finish
  //    on their own, so that most requests settle with their real outcome.
  OnLoopStatus([&] {
    receiver_->CancelAll(why);
    sender_->AbortAll(why);
    return Status::Ok();
  }).IgnoreError();
  const auto deadline = std::chrono::steady_clock::now() + ctx_.grace;
  while (std::chrono::steady_clock::now() < deadline) {
    Result<bool> idle =
        OnLoop<bool>([&]() -> Result<bool> { return receiver_->Idle() && sender_->Idle(); });
    if (!idle.ok() || *idle) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }

  // 2. Say goodbye and stop the transport: its own writes have ended when
  //    it returns (their completions are posted to the loop), and every peer
  //    sees our connections die.
  OnLoopStatus([&] {
    for (auto& [id, peer] : ctx_.peers) {
      if (!peer.dead && peer.hello_received) {
        ctx_.Send(id, protocol::Bye{protocol::ByeReason::kShutdown, std::string(why.message())})
            .IgnoreError();
      }
    }
    return Status::Ok();
  }).IgnoreError();
  gate_->Close();
  transport_->Shutdown();
  {
    std::lock_guard<std::mutex> connect_lock(connect_mu_);
    connect_aborted_ = true;
  }
  connect_cv_.notify_all();

  // 3. Drain the copy engine: accepted batches finish (or stop at their
  //    grain); their completions still reach the loop.
  OnLoopStatus([&] {
    ctx_.copy = nullptr;
    return Status::Ok();
  }).IgnoreError();
  copy_.reset();

  // 4. Stop the loop: every completion posted so far runs first. From here
  //    this thread stands in for the control thread.
  loop_->Stop();

  // 5. Deregister what peers can reach: the imported regions, the pool and
  //    the arenas. Destroying a registration waits until no peer's write or
  //    mapped access touches it, so after this nothing lands in our memory.
  ctx_.peers.clear();
  ctx_.peer_by_rank.clear();
  pool_regions_.clear();
  for (Arena* arena : {send_arena_.get(), recv_arena_.get()}) {
    if (arena != nullptr) arena->Close();  // deregisters once nothing is outstanding
  }

  // 6. Settle what is left: its blocks can no longer be touched.
  receiver_->Abandon(why);
  sender_->Abandon(why);
  for (Arena* arena : {send_arena_.get(), recv_arena_.get()}) {
    if (arena != nullptr && arena->outstanding_bytes() != 0) {
      Log(LogLevel::kError, std::string(arena->name()) + ": " +
                                std::to_string(arena->outstanding_bytes()) +
                                " bytes still outstanding at shutdown");
    }
  }
  ctx_.send_arena = ctx_.recv_arena = nullptr;
}

}  // namespace

Result<std::unique_ptr<Agent>> CreateAgent(AgentOptions options, AgentHooks hooks) {
  return Guarded("Agent::Create", [&]() -> Result<std::unique_ptr<Agent>> {
    auto agent = std::make_unique<AgentImpl>();
    KVB_RETURN_IF_ERROR(agent->Init(std::move(options), std::move(hooks)));
    return std::unique_ptr<Agent>(std::move(agent));
  });
}

Result<std::unique_ptr<Agent>> Agent::Create(AgentOptions options) {
  return CreateAgent(std::move(options), AgentHooks());
}

}  // namespace kvbounce
