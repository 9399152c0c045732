// The cuda-ipc transport (transport/cuda_ipc/cuda_ipc_transport.h) with its
// peer in another process, as it runs between workers: the transport
// conformance suite's cases that fit a transport of device memory between
// processes, under the suite's names and with its semantics. (The suite
// itself runs endpoints of one process over host memory; cuda-ipc moves
// device memory only, and a process cannot open the CUDA IPC handles it
// exported itself.) The peer program is cuda_ipc_test_peer (or the one
// $KVBOUNCE_CUDA_IPC_TEST_PEER names), its frames are in
// cuda_ipc_peer_frames.h: this process (endpoint a_) writes into the peer's
// device region and reads it, and the peer checks its own memory on
// request. Every case runs for both kinds of device memory the transport
// exports: cudaMalloc (the region's key carries its IPC handle) and VMM (its
// file descriptor travels on the Unix socket).
//
// Every case but the first needs a CUDA device and skips without one ("no
// CUDA device: ..."). Every wait is bounded, and a failure names what did
// not come in time and how the peer process ended.
#include <cuda_runtime_api.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <optional>
#include <ostream>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "common/no_cuda_device.h"
#include "common/status_matchers.h"
#include "copy/device_support.h"
#include "kvbounce/transports.h"
#include "memory/allocation.h"
#include "transport/cuda_ipc_peer_frames.h"
#include "transport/transport_test_util.h"

#ifndef KVBOUNCE_CUDA_IPC_TEST_PEER
#error "KVBOUNCE_CUDA_IPC_TEST_PEER must name the cuda_ipc_test_peer executable"
#endif

extern char** environ;

namespace kvbounce::transport_test {
namespace {

using ::kvbounce::testing_util::IsOk;
using ::kvbounce::testing_util::StatusIs;
using ::testing::AnyOf;
using ::testing::HasSubstr;

constexpr int kDevice = 0;
// A fresh peer process initializes CUDA before it says READY.
constexpr std::chrono::milliseconds kPeerStartTimeout = 30s;
// The peer's answer to a frame; a connection's end after a kill or a
// disconnect; a peer process's exit.
constexpr std::chrono::milliseconds kAnswerTimeout = 20s;
constexpr std::chrono::milliseconds kFailureTimeout = 20s;
constexpr std::chrono::milliseconds kExitTimeout = 20s;
// Shutdown waits up to 2 s for live peers to confirm (cuda_ipc_transport.cc).
constexpr std::chrono::milliseconds kShutdownBound = 5s;

// The device memory of both ends (the test's parameter).
enum class Memory { kCudaMalloc, kVmm };

std::string_view MemoryName(Memory memory) {
  return memory == Memory::kVmm ? test_peer::kVmm : test_peer::kCudaMalloc;
}

// Names the parameter in test names and messages.
void PrintTo(Memory memory, std::ostream* os) { *os << MemoryName(memory); }

// What this process writes from: distinct from the peer's PatternByte.
uint8_t SourceByte(uint64_t i) { return static_cast<uint8_t>(((i * 29 + 101) ^ (i >> 7)) ^ 0xC3); }

std::vector<uint8_t> Sequence(uint64_t n, uint8_t (*byte)(uint64_t)) {
  std::vector<uint8_t> out(n);
  for (uint64_t i = 0; i < n; ++i) out[i] = byte(i);
  return out;
}

// The peer's region as it starts: PatternByte(i) at byte i.
std::vector<uint8_t> PeerPattern(uint64_t n) { return Sequence(n, test_peer::PatternByte); }

std::string CudaText(cudaError_t error) {
  return std::string(cudaGetErrorName(error)) + " (" + cudaGetErrorString(error) + ")";
}

// "" when `got` equals `want`; otherwise the first and last differing byte
// and how many differ.
std::string Difference(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want) {
  if (got.size() != want.size()) {
    return std::to_string(got.size()) + " bytes, wanted " + std::to_string(want.size());
  }
  size_t differ = 0;
  size_t first = 0;
  size_t last = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] == want[i]) continue;
    if (differ == 0) first = i;
    last = i;
    ++differ;
  }
  if (differ == 0) return "";
  return std::to_string(differ) + " of " + std::to_string(got.size()) +
         " bytes differ; the first at offset " + std::to_string(first) + " (wanted " +
         std::to_string(want[first]) + ", found " + std::to_string(got[first]) +
         "), the last at offset " + std::to_string(last) + " (wanted " +
         std::to_string(want[last]) + ", found " + std::to_string(got[last]) + ")";
}

// The peer program: $KVBOUNCE_CUDA_IPC_TEST_PEER, else the one this build
// made, else cuda_ipc_test_peer beside this test program (test programs
// staged on another host, scripts/cuda_device_check.sh).
std::string PeerProgram() {
  const char* env = std::getenv("KVBOUNCE_CUDA_IPC_TEST_PEER");
  if (env != nullptr && *env != '\0') return env;
  if (::access(KVBOUNCE_CUDA_IPC_TEST_PEER, X_OK) == 0) return KVBOUNCE_CUDA_IPC_TEST_PEER;
  std::string self(4096, '\0');
  const ssize_t n = ::readlink("/proc/self/exe", self.data(), self.size() - 1);
  if (n <= 0) return KVBOUNCE_CUDA_IPC_TEST_PEER;
  self.resize(static_cast<size_t>(n));
  return self.substr(0, self.rfind('/') + 1) + "cuda_ipc_test_peer";
}

// Device memory of this process, filled and read back with cudaMemcpy.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::unique_ptr<Allocation> memory) : memory_(std::move(memory)) {}
  Addr addr(uint64_t offset = 0) const { return memory_->address() + offset; }
  uint64_t size() const { return memory_->size(); }

  Status Upload(const std::vector<uint8_t>& bytes) const {
    if (bytes.size() > size()) return InvalidArgumentError("upload larger than the buffer");
    const cudaError_t error =
        cudaMemcpy(addr().ToPointer(), bytes.data(), bytes.size(), cudaMemcpyHostToDevice);
    if (error != cudaSuccess) return InternalError("cudaMemcpy to the device: " + CudaText(error));
    return Status::Ok();
  }

  Result<std::vector<uint8_t>> Download() const {
    std::vector<uint8_t> out(size());
    const cudaError_t error =
        cudaMemcpy(out.data(), addr().ToPointer(), out.size(), cudaMemcpyDeviceToHost);
    if (error != cudaSuccess) return InternalError("cudaMemcpy to the host: " + CudaText(error));
    return out;
  }

 private:
  std::unique_ptr<Allocation> memory_;
};

// A cuda_ipc_test_peer process; killed (and reaped) when destroyed. Its
// stderr is this test's, so what it complains about shows in the log.
class PeerProcess {
 public:
  PeerProcess(const std::string& address, Memory memory, uint64_t region_bytes) {
    std::vector<std::string> args = {PeerProgram(), address, std::string(MemoryName(memory)),
                                     std::to_string(region_bytes)};
    std::vector<char*> argv;
    for (auto& arg : args) argv.push_back(arg.data());
    argv.push_back(nullptr);
    spawn_error_ = posix_spawn(&pid_, argv[0], nullptr, nullptr, argv.data(), environ);
    if (spawn_error_ != 0) pid_ = -1;
  }
  ~PeerProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  PeerProcess(const PeerProcess&) = delete;
  PeerProcess& operator=(const PeerProcess&) = delete;

  bool started() const { return pid_ > 0 || exit_.has_value(); }
  int spawn_error() const { return spawn_error_; }
  pid_t pid() const { return pid_ > 0 ? pid_ : last_pid_; }

  // How the process ended, once it did within `timeout`: "exited N",
  // "killed by signal N", or "still running".
  std::string WaitExit(std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (pid_ > 0) {
      int status = 0;
      const pid_t done = waitpid(pid_, &status, WNOHANG);
      if (done == pid_) {
        last_pid_ = pid_;
        pid_ = -1;
        exit_ = WIFEXITED(status) ? "exited " + std::to_string(WEXITSTATUS(status))
                                  : "killed by signal " + std::to_string(WTERMSIG(status));
        break;
      }
      if (std::chrono::steady_clock::now() > deadline) return "still running";
      std::this_thread::sleep_for(5ms);
    }
    return exit_.value_or("not started");
  }
  // WaitExit without waiting, with the pid: for failure messages.
  std::string Describe() {
    const pid_t pid = this->pid();
    return "process " + std::to_string(pid) + " " + WaitExit(0ms);
  }
  // SIGKILL, and reaped.
  void Kill() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    last_pid_ = pid_;
    pid_ = -1;
    exit_ = "killed by signal " + std::to_string(SIGKILL);
  }

 private:
  pid_t pid_ = -1;
  pid_t last_pid_ = -1;
  int spawn_error_ = 0;
  std::optional<std::string> exit_;
};

// A connected peer process, as the test sees it.
struct Peer {
  PeerProcess* process = nullptr;
  PeerId id = 0;      // a_'s id for the connection
  RegionInfo region;  // its device region: PatternByte(i) at byte i
};

// A region that looks like the peer's but was not imported by a_.
class ForeignRemoteRegion : public RemoteRegion {
 public:
  ForeignRemoteRegion(PeerId peer, RegionInfo info) : peer_(peer), info_(std::move(info)) {}
  PeerId peer() const override { return peer_; }
  const RegionInfo& info() const override { return info_; }
  Addr mapped_address() const override { return Addr(); }

 private:
  PeerId peer_;
  RegionInfo info_;
};

// Issues one operation after another on a thread of its own (`issue`
// starts one with the `done` it is given, 1 ms apart) until stopped or
// refused, and counts the operations accepted, those that ended, and those
// that ended after a_'s on_peer_failure for `peer` had run (which the fence
// forbids). The counts outlive the pump: a `done` may run after it.
class Pump {
 public:
  Pump(TestEndpoint& endpoint, PeerId peer, DoneTracker tracker,
       std::function<Status(TransportDone)> issue)
      : counts_(std::make_shared<Counts>()) {
    thread_ = std::thread([this, &endpoint, peer, tracker, issue = std::move(issue)]() mutable {
      while (!stop_) {
        InsideCall inside;
        TransportDone done = [&endpoint, peer, counts = counts_,
                              inner = tracker.Make()](Status status) {
          if (endpoint.failures(peer) > 0) ++counts->ended_after_failure;
          ++counts->ended;
          inner(std::move(status));
        };
        const Status status = issue(std::move(done));
        if (!status.ok()) {
          tracker.Forget();
          refusal_ = status;
          return;
        }
        ++counts_->accepted;
        std::this_thread::sleep_for(1ms);
      }
    });
  }
  ~Pump() { Stop(); }
  Pump(const Pump&) = delete;
  Pump& operator=(const Pump&) = delete;

  // Stops issuing and joins the thread.
  void Stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  // Whether `count` operations were accepted within `timeout`.
  bool WaitAccepted(int count, std::chrono::milliseconds timeout) const {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (counts_->accepted < count) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      std::this_thread::sleep_for(1ms);
    }
    return true;
  }
  int accepted() const { return counts_->accepted; }
  int ended() const { return counts_->ended; }
  int ended_after_failure() const { return counts_->ended_after_failure; }
  // The call that was refused (after Stop): OK when none was.
  const Status& refusal() const { return refusal_; }
  std::string Describe() const {
    return "operations accepted " + std::to_string(accepted()) + ", ended " +
           std::to_string(ended()) + ", ended after on_peer_failure " +
           std::to_string(ended_after_failure());
  }

 private:
  struct Counts {
    std::atomic<int> accepted{0};
    std::atomic<int> ended{0};
    std::atomic<int> ended_after_failure{0};
  };
  std::shared_ptr<Counts> counts_;
  std::atomic<bool> stop_{false};
  Status refusal_;  // written by the thread, read after the join
  std::thread thread_;
};

class CudaIpcTransportTest : public ::testing::TestWithParam<Memory> {
 protected:
  void SetUp() override {
    if (const std::string why = testing_util::NoCudaDevice(); !why.empty()) GTEST_SKIP() << why;
    if (GetParam() == Memory::kVmm) {
      // Where the device or driver has no VMM with POSIX descriptors, the
      // transport shares cudaMalloc memory only: nothing to test here.
      auto probe = CudaSupport()->AllocateExportable(kDevice, 1);
      if (!probe.ok() && probe.status().code() == StatusCode::kUnimplemented) {
        GTEST_SKIP() << "no exportable (VMM) device memory here: " << probe.status();
      }
      ASSERT_THAT(probe, IsOk()) << "allocating exportable (VMM) device memory";
    }
    CudaIpcTransportOptions options;
    options.device = kDevice;
    a_ = MakeTestEndpoint(NewCudaIpcTransport(options), /*start=*/true);
    ASSERT_NE(a_, nullptr);
  }

  // Every copy and callback ends before the test's regions and memory go,
  // also when the test ended early.
  void TearDown() override {
    if (a_ != nullptr) a_->Shutdown();
  }

  // Starts a peer process with a region of `region_bytes` and waits for its
  // READY and its region (*peer).
  void StartPeer(uint64_t region_bytes, Peer* peer) {
    children_.push_back(std::make_unique<PeerProcess>((*a_)->Address(), GetParam(), region_bytes));
    PeerProcess& child = *children_.back();
    ASSERT_TRUE(child.started()) << "posix_spawn(" << PeerProgram()
                                 << "): " << std::strerror(child.spawn_error());
    peer->process = &child;
    // Waits in slices, to report a peer that died on its way at once.
    std::optional<PeerId> id;
    for (auto waited = 0ms; !id.has_value() && waited < kPeerStartTimeout; waited += 500ms) {
      id = NextNewPeer(500ms);
      if (!id.has_value() && child.WaitExit(0ms) != "still running") break;
    }
    ASSERT_TRUE(id.has_value()) << "the peer process did not connect within "
                                << kPeerStartTimeout.count() << " ms: " << child.Describe();
    peer->id = *id;
    auto ready = NextFrom(peer->id, kAnswerTimeout);
    ASSERT_TRUE(ready.has_value());
    ASSERT_EQ(Text(*ready), "READY") << "the peer's first frame";
    auto region = NextFrom(peer->id, kPeerStartTimeout);
    ASSERT_TRUE(region.has_value()) << "the peer sent no region within "
                                    << kPeerStartTimeout.count() << " ms: " << child.Describe();
    auto info = test_peer::DecodeDeviceRegion(*region);
    ASSERT_TRUE(info.has_value()) << "the peer sent '" << Text(*region) << "' for its region ("
                                  << MemoryName(GetParam()) << ", " << region_bytes << " bytes)";
    ASSERT_EQ(info->size, region_bytes);
    ASSERT_EQ(info->kind, MemoryKind::kCuda);
    peer->region = std::move(*info);
  }

  // The next frame from `peer` (in the order a_ received them), or nullopt
  // when none came within `timeout`.
  std::optional<std::vector<std::byte>> NextFrom(PeerId peer, std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    size_t& cursor = cursors_[peer];
    for (;;) {
      const auto messages = a_->messages();
      for (; cursor < messages.size(); ++cursor) {
        if (messages[cursor].peer == peer) return messages[cursor++].frame;
      }
      const auto now = std::chrono::steady_clock::now();
      if (now >= deadline) return std::nullopt;
      a_->WaitForMessages(messages.size() + 1,
                          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now));
    }
  }

  // The id of the next peer whose first frame arrives (NextFrom returns
  // that frame next).
  std::optional<PeerId> NextNewPeer(std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      const auto messages = a_->messages();
      for (size_t i = 0; i < messages.size(); ++i) {
        if (cursors_.count(messages[i].peer) == 0) {
          cursors_[messages[i].peer] = i;
          return messages[i].peer;
        }
      }
      const auto now = std::chrono::steady_clock::now();
      if (now >= deadline) return std::nullopt;
      a_->WaitForMessages(messages.size() + 1,
                          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now));
    }
  }

  // Asks `peer` to compare its whole region with `image`: "CHECK ok", or
  // the peer's account of what differs, or why no answer came.
  std::string Check(const Peer& peer, const std::vector<uint8_t>& image) {
    const Status sent = (*a_)->Send(peer.id, test_peer::EncodeCheck(image));
    if (!sent.ok()) return "CHECK not sent: " + sent.ToString();
    auto answer = NextFrom(peer.id, kAnswerTimeout);
    if (!answer.has_value()) {
      return "no answer to CHECK within " + std::to_string(kAnswerTimeout.count()) +
             " ms: the peer " + peer.process->Describe();
    }
    return Text(*answer);
  }

  // `contents.size()` bytes of device memory of the parameter's kind
  // holding `contents`; lives until the fixture is gone (after a_).
  DeviceBuffer* NewBuffer(const std::vector<uint8_t>& contents) {
    const DeviceSupport* device = CudaSupport();
    auto memory = GetParam() == Memory::kVmm ? device->AllocateExportable(kDevice, contents.size())
                                             : device->AllocateDevice(kDevice, contents.size());
    EXPECT_THAT(memory, IsOk()) << MemoryName(GetParam()) << " memory of " << contents.size()
                                << " bytes";
    if (!memory.ok()) return nullptr;
    buffers_.push_back(std::make_unique<DeviceBuffer>(std::move(memory).value()));
    const Status uploaded = buffers_.back()->Upload(contents);
    EXPECT_THAT(uploaded, IsOk());
    return uploaded.ok() ? buffers_.back().get() : nullptr;
  }

  // `buffer` registered with a_, or nullptr (and a failure). The region
  // lives until TearDown shut a_ down: no copy of a test that ended early
  // can outlive it.
  LocalRegion* Register(const DeviceBuffer& buffer) {
    auto region = (*a_)->Register(buffer.addr(), buffer.size(), MemoryKind::kCuda);
    EXPECT_THAT(region, IsOk()) << "registering " << buffer.size() << " bytes of "
                                << MemoryName(GetParam()) << " memory";
    if (!region.ok()) return nullptr;
    local_regions_.push_back(std::move(region).value());
    return local_regions_.back().get();
  }

  // `peer`'s region imported by a_, or nullptr (and a failure); lives as
  // Register's regions do.
  RemoteRegion* Import(const Peer& peer) {
    auto remote = (*a_)->Import(peer.id, peer.region);
    EXPECT_THAT(remote, IsOk()) << "importing the region of the peer " << peer.process->Describe();
    if (!remote.ok()) return nullptr;
    remote_regions_.push_back(std::move(remote).value());
    return remote_regions_.back().get();
  }

  // Write, Read and Flush through `tracker`; a callback must not run inside
  // the call that started it.
  Status Write(DoneTracker& tracker, const LocalRegion& source, const RemoteRegion& target,
               std::span<const WriteOp> ops) {
    InsideCall inside;
    Status status = (*a_)->Write(source, target, ops, tracker.Make());
    if (!status.ok()) tracker.Forget();
    return status;
  }
  Status Read(DoneTracker& tracker, const RemoteRegion& source, const LocalRegion& target,
              std::span<const ReadOp> ops) {
    InsideCall inside;
    Status status = (*a_)->Read(source, target, ops, tracker.Make(), {});
    if (!status.ok()) tracker.Forget();
    return status;
  }
  Status Flush(DoneTracker& tracker, PeerId peer) {
    InsideCall inside;
    Status status = (*a_)->Flush(peer, tracker.Make());
    if (!status.ok()) tracker.Forget();
    return status;
  }

  // Checks that this process's CUDA context still works (a peer that died
  // while mapped must not have broken it): a round trip through `buffer`.
  void ExpectDeviceStillWorks(const DeviceBuffer& buffer) {
    const std::vector<uint8_t> bytes = Sequence(buffer.size(), SourceByte);
    ASSERT_THAT(buffer.Upload(bytes), IsOk()) << "this process's CUDA context after the peer died";
    auto back = buffer.Download();
    ASSERT_THAT(back, IsOk()) << "this process's CUDA context after the peer died";
    EXPECT_EQ(Difference(*back, bytes), "");
  }

  // Destroyed in reverse: the regions (after TearDown's Shutdown ended every
  // copy), the transport, the peer processes (which its Shutdown told that
  // the connection ended), and last the device memory.
  std::vector<std::unique_ptr<DeviceBuffer>> buffers_;
  std::vector<std::unique_ptr<PeerProcess>> children_;
  std::unique_ptr<TestEndpoint> a_;
  std::vector<std::unique_ptr<LocalRegion>> local_regions_;
  std::vector<std::unique_ptr<RemoteRegion>> remote_regions_;
  std::map<PeerId, size_t> cursors_;  // per peer: the next of a_'s messages to look at
};

// --- Without a device ---------------------------------------------------------

// Options that can never work are refused naming them; without a device
// the transport says so (kUnavailable) rather than failing later.
TEST(CudaIpcTransportCreateTest, RefusesWhatCannotWorkNamingIt) {
  CudaIpcTransportOptions options;
  options.poll_before_sleep = std::chrono::microseconds(-1);
  EXPECT_THAT(NewCudaIpcTransport(options),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("poll_before_sleep = -1")));
  if (const std::string why = testing_util::NoCudaDevice(); !why.empty()) {
    EXPECT_THAT(NewCudaIpcTransport({}),
                StatusIs(StatusCode::kUnavailable, HasSubstr("no usable CUDA device")));
    return;
  }
  options = {};
  options.device = 99;
  EXPECT_THAT(NewCudaIpcTransport(options),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("device 99")));
  options = {};
  options.listen_address = "tcp:127.0.0.1:1";
  EXPECT_THAT(NewCudaIpcTransport(options),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("tcp:127.0.0.1:1")));
}

// --- Capabilities and registration ---------------------------------------------

// What the header claims: device memory only, no mapping for a copy engine
// of the caller (map_remote), reads of peer memory (read_remote), pending
// writes fail rather than land; Register refuses what is not device memory.
TEST_P(CudaIpcTransportTest, CapabilitiesAndWhatRegisterRefuses) {
  const TransportCaps caps = (*a_)->Caps();
  EXPECT_EQ(caps.name, "cuda-ipc");
  EXPECT_TRUE(caps.device_memory);
  EXPECT_FALSE(caps.host_memory);
  EXPECT_FALSE(caps.map_remote);
  EXPECT_TRUE(caps.read_remote);
  EXPECT_TRUE(caps.concurrent_callbacks);
  EXPECT_TRUE(caps.pending_writes_fail);
  EXPECT_GT(caps.cost.op_us, 0);
  EXPECT_GT(caps.cost.bytes_per_us, 0);
  EXPECT_GT(caps.read_cost.bytes_per_us, 0);

  Peer peer;
  ASSERT_NO_FATAL_FAILURE(StartPeer(4096, &peer));
  auto peer_caps = (*a_)->PeerCaps(peer.id);
  ASSERT_THAT(peer_caps, IsOk());
  EXPECT_EQ(peer_caps->name, "cuda-ipc");
  EXPECT_TRUE(peer_caps->read_remote);
  EXPECT_THAT((*a_)->PeerCaps(987654321), StatusIs(StatusCode::kNotFound));
  auto host_caps = (*a_)->PeerCapsFor(peer.id, MemoryKind::kHost);
  ASSERT_THAT(host_caps, IsOk());
  EXPECT_FALSE(host_caps->read_remote) << "host memory is not this transport's";

  std::vector<uint8_t> host(4096);
  const Addr host_addr = Addr::FromPointer(host.data());
  EXPECT_THAT((*a_)->Register(host_addr, host.size(), MemoryKind::kHost),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("device memory only")));
  EXPECT_THAT((*a_)->Register(host_addr, host.size(), MemoryKind::kCuda),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("host memory")));
  DeviceBuffer* buffer = NewBuffer(std::vector<uint8_t>(4096));
  ASSERT_NE(buffer, nullptr);
  EXPECT_THAT((*a_)->Register(buffer->addr(), 0, MemoryKind::kCuda),
              StatusIs(StatusCode::kInvalidArgument));
  LocalRegion* region = Register(*buffer);
  ASSERT_NE(region, nullptr);
  EXPECT_EQ(region->info().kind, MemoryKind::kCuda);
  EXPECT_EQ(region->info().device, kDevice);
  EXPECT_FALSE(region->info().remote_key.empty());

  // No writes by the caller's copy engine: `direct` runs as a read, by the
  // transport (Read) or by the caller's engine through the mapping.
  EXPECT_FALSE(caps.map_remote);
  EXPECT_TRUE(caps.map_remote_read);
  RemoteRegion* target = Import(peer);
  ASSERT_NE(target, nullptr);
  EXPECT_NE(target->mapped_address(), Addr());
  EXPECT_THAT((*a_)->BeginMappedAccess(*target), StatusIs(StatusCode::kUnimplemented));
  EXPECT_FALSE(host_caps->map_remote_read);
}

// BeginMappedRead: the caller's own copy engine reads the peer process's
// region at its mapped_address(); the access holds the connection's
// failure back (the fence) until it is destroyed, and none is granted on
// a closed connection.
TEST_P(CudaIpcTransportTest, AMappedReadLetsTheCallersEngineCopyAndHoldsTheFence) {
  constexpr uint64_t kBytes = 1 << 20;
  Peer peer;
  ASSERT_NO_FATAL_FAILURE(StartPeer(kBytes, &peer));
  DeviceBuffer* dst = NewBuffer(std::vector<uint8_t>(kBytes + 512, 0x5A));
  ASSERT_NE(dst, nullptr);
  RemoteRegion* source = Import(peer);
  ASSERT_NE(source, nullptr);
  auto access = (*a_)->BeginMappedRead(*source);
  ASSERT_THAT(access, IsOk());

  auto engine = CudaSupport()->NewCopyEngine(kDevice, std::chrono::microseconds(0));
  ASSERT_THAT(engine, IsOk());
  // Two pieces, the second at an odd offset of each side.
  const Fragment pieces[] = {
      {source->mapped_address().value(), dst->addr(256).value(), 4096},
      {(source->mapped_address() + 4097).value(), dst->addr(256 + 4097).value(), kBytes - 4097}};
  ASSERT_THAT((*engine)->CopySync(CopyBatch{pieces, Addr(0), Addr(0)}), IsOk());
  auto got = dst->Download();
  ASSERT_THAT(got, IsOk());
  std::vector<uint8_t> want(kBytes + 512, 0x5A);
  const std::vector<uint8_t> pattern = PeerPattern(kBytes);
  std::copy(pattern.begin(), pattern.begin() + 4096, want.begin() + 256);
  std::copy(pattern.begin() + 4097, pattern.end(), want.begin() + 256 + 4097);
  EXPECT_EQ(Difference(*got, want), "");
  EXPECT_EQ((*a_)->Stats().read_ops, 0u) << "no Read was issued";

  // The peer dies: nothing is reported while the access lives.
  peer.process->Kill();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(a_->failures(peer.id), 0) << "on_peer_failure while a mapped read was held";
  access->reset();
  ASSERT_TRUE(a_->WaitForFailure(peer.id, kFailureTimeout))
      << "no on_peer_failure once the mapped read ended";
  EXPECT_THAT((*a_)->BeginMappedRead(*source), StatusIs(StatusCode::kUnavailable));
  engine->reset();
}

// --- Control frames -------------------------------------------------------------

// A frame to the peer process and its answer, each attributed to the one
// connection.
TEST_P(CudaIpcTransportTest, HelloRoundTrip) {
  Peer peer;
  ASSERT_NO_FATAL_FAILURE(StartPeer(4096, &peer));
  const std::string hello = "HELLO from " + (*a_)->Address();
  ASSERT_THAT(a_->SendText(peer.id, hello), IsOk());
  auto echo = NextFrom(peer.id, kAnswerTimeout);
  ASSERT_TRUE(echo.has_value()) << "no answer from the peer " << peer.process->Describe();
  EXPECT_EQ(Text(*echo), hello);
  for (const auto& message : a_->messages()) EXPECT_EQ(message.peer, peer.id);
  EXPECT_EQ(a_->total_failures(), 0);
}

// An empty frame is delivered as one, both ways: ours reaches the peer,
// which sends it back, and the peer's own (after a BURST of 0).
TEST_P(CudaIpcTransportTest, EmptyFrameIsDelivered) {
  Peer peer;
  ASSERT_NO_FATAL_FAILURE(StartPeer(4096, &peer));
  ASSERT_THAT((*a_)->Send(peer.id, {}), IsOk());
  auto echo = NextFrom(peer.id, kAnswerTimeout);
  ASSERT_TRUE(echo.has_value()) << "the empty frame did not come back: the peer "
                                << peer.process->Describe();
  EXPECT_TRUE(echo->empty()) << "came back as '" << Text(*echo) << "'";
  ASSERT_THAT(a_->SendText(peer.id, "BURST 0"), IsOk());
  auto own = NextFrom(peer.id, kAnswerTimeout);
  ASSERT_TRUE(own.has_value());
  EXPECT_TRUE(own->empty()) << "the peer's empty frame came as '" << Text(*own) << "'";
}

// 1,000 frames each way arrive in the order sent: ours come back in order
// (the peer answers each as it arrives), then the peer's own burst.
TEST_P(CudaIpcTransportTest, MessagesArriveInOrder) {
  constexpr int kMessages = 1000;
  Peer peer;
  ASSERT_NO_FATAL_FAILURE(StartPeer(4096, &peer));
  for (int i = 0; i < kMessages; ++i) {
    ASSERT_THAT(a_->SendText(peer.id, "M" + std::to_string(i)), IsOk()) << "message " << i;
  }
  ASSERT_THAT(a_->SendText(peer.id, "BURST " + std::to_string(kMessages)), IsOk());
  for (int i = 0; i < kMessages; ++i) {
    auto frame = NextFrom(peer.id, kAnswerTimeout);
    ASSERT_TRUE(frame.has_value())
        << "echo " << i << " did not come: the peer " << peer.process->Describe();
    ASSERT_EQ(Text(*frame), "M" + std::to_string(i)) << "echo " << i;
  }
  for (int i = 0; i < kMessages; ++i) {
    auto frame = NextFrom(peer.id, kAnswerTimeout);
    ASSERT_TRUE(frame.has_value()) << "the peer's frame " << i << " did not come";
    ASSERT_EQ(Text(*frame), "B" + std::to_string(i)) << "the peer's frame " << i;
  }
  auto last = NextFrom(peer.id, kAnswerTimeout);
  ASSERT_TRUE(last.has_value());
  EXPECT_TRUE(last->empty());
  EXPECT_EQ((*a_)->Stats().messages_sent, static_cast<uint64_t>(kMessages + 1));
  EXPECT_EQ(a_->total_failures(), 0);
}

// --- Writes into the peer process's device memory ----------------------------------

// Once a write and the flush behind it completed, the peer process's own
// copy of its region shows the bytes, and nothing around them changed.
TEST_P(CudaIpcTransportTest, WriteThenFlushMakesBytesVisible) {
  Peer peer;
  ASSERT_NO_FATAL_FAILURE(StartPeer(8192, &peer));
  const std::vector<uint8_t> src_bytes = Sequence(4096, SourceByte);
  DeviceBuffer* src = NewBuffer(src_bytes);
  ASSERT_NE(src, nullptr);
  LocalRegion* source = Register(*src);
  RemoteRegion* target = Import(peer);
  ASSERT_NE(source, nullptr);
  ASSERT_NE(target, nullptr);
  EXPECT_EQ(target->peer(), peer.id);
  EXPECT_EQ(target->info().address, peer.region.address);
  EXPECT_EQ(target->info().size, peer.region.size);

  DoneTracker tracker;
  const WriteOp ops[] = {{src->addr(), peer.region.address + 1000, 4096}};
  ASSERT_THAT(Write(tracker, *source, *target, ops), IsOk());
  ASSERT_THAT(Flush(tracker, peer.id), IsOk());
  ASSERT_TRUE(tracker.WaitAll()) << "the write or flush did not complete";
  EXPECT_THAT(tracker.status(0), IsOk());
  EXPECT_THAT(tracker.status(1), IsOk());
  std::vector<uint8_t> want = PeerPattern(8192);
  std::copy(src_bytes.begin(), src_bytes.end(), want.begin() + 1000);
  EXPECT_EQ(Check(peer, want), "CHECK ok");
  EXPECT_EQ(tracker.Violations(), "");
  const TransportStats stats = (*a_)->Stats();
  EXPECT_EQ(stats.write_ops, 1u);
  EXPECT_EQ(stats.write_bytes, 4096u);
  EXPECT_EQ(stats.flushes, 1u);
}

// Thousands of small ops in one Write — odd sizes (1 to 37 bytes) from odd
// source offsets, into target ranges of which half touch the range before
// them, issued in shuffled order, more than one wait window (4,096 ops) —
// land exactly, and no byte outside them changes.
TEST_P(CudaIpcTransportTest, ManySmallOpsInOneBatchLandExactly) {
  constexpr size_t kOps = 5000;
  constexpr uint64_t kTargetBytes = 256 << 10;
  std::mt19937 rng(17);
  std::vector<WriteOp> ops(kOps);
  std::vector<uint64_t> src_offsets(kOps);
  std::vector<uint64_t> dst_offsets(kOps);
  uint64_t src_cursor = 1;
  uint64_t dst_cursor = 3;
  for (size_t i = 0; i < kOps; ++i) {
    const uint64_t bytes = 1 + rng() % 37;
    src_cursor += rng() % 3;
    dst_cursor += rng() % 2 == 0 ? 0 : 1 + rng() % 9;  // adjacent, or a gap
    src_offsets[i] = src_cursor;
    dst_offsets[i] = dst_cursor;
    ops[i].bytes = bytes;
    src_cursor += bytes;
    dst_cursor += bytes;
  }
  ASSERT_LE(dst_cursor, kTargetBytes);
  const std::vector<uint8_t> src_bytes = Sequence(src_cursor, SourceByte);
  Peer peer;
  ASSERT_NO_FATAL_FAILURE(StartPeer(kTargetBytes, &peer));
  DeviceBuffer* src = NewBuffer(src_bytes);
  ASSERT_NE(src, nullptr);
  LocalRegion* source = Register(*src);
  RemoteRegion* target = Import(peer);
  ASSERT_NE(source, nullptr);
  ASSERT_NE(target, nullptr);
  std::vector<uint8_t> want = PeerPattern(kTargetBytes);
  uint64_t total = 0;
  for (size_t i = 0; i < kOps; ++i) {
    ops[i].src = src->addr(src_offsets[i]);
    ops[i].dst = peer.region.address + dst_offsets[i];
    std::copy_n(src_bytes.begin() + src_offsets[i], ops[i].bytes, want.begin() + dst_offsets[i]);
    total += ops[i].bytes;
  }
  std::shuffle(ops.begin(), ops.end(), rng);

  const TransportStats before = (*a_)->Stats();
  DoneTracker tracker;
  ASSERT_THAT(Write(tracker, *source, *target, ops), IsOk());
  ASSERT_THAT(Flush(tracker, peer.id), IsOk());
  ASSERT_TRUE(tracker.WaitAll()) << "the write or flush did not complete";
  EXPECT_THAT(tracker.status(0), IsOk());
  EXPECT_THAT(tracker.status(1), IsOk());
  EXPECT_EQ(Check(peer, want), "CHECK ok");
  const TransportStats after = (*a_)->Stats();
  EXPECT_EQ(after.write_ops - before.write_ops, kOps);
  EXPECT_EQ(after.write_bytes - before.write_bytes, total);
  EXPECT_EQ(after.failed_write_ops, before.failed_write_ops);
  EXPECT_EQ(tracker.Violations(), "");
}

// A batch with one op outside the source or the target is refused whole
// (kOutOfRange, nothing issued, the peer's memory unchanged); a zero-byte
// op at the very end and an empty batch are fine. A Write without `done`,
// and one into a region this transport did not import, are refused too.
TEST_P(CudaIpcTransportTest, OpOutsideSourceOrTargetIsRejectedAndNothingWritten) {
  Peer peer;
  ASSERT_NO_FATAL_FAILURE(StartPeer(1024, &peer));
  DeviceBuffer* src = NewBuffer(Sequence(1024, SourceByte));
  ASSERT_NE(src, nullptr);
  LocalRegion* source = Register(*src);
  RemoteRegion* target = Import(peer);
  ASSERT_NE(source, nullptr);
  ASSERT_NE(target, nullptr);
  const Addr dst = peer.region.address;

  const WriteOp good = {src->addr(), dst, 64};
  const std::vector<std::vector<WriteOp>> bad_batches = {
      {good, {src->addr(1000), dst, 25}},               // past the source's end
      {good, {src->addr(), dst + 1000, 25}},            // past the target's end
      {good, {src->addr() + (-1ull), dst, 1}},          // before the source (wraps)
      {good, {src->addr(), Addr(dst.value() - 1), 1}},  // before the target
      {good, {src->addr(), dst, ~0ull}},                // overflowing length
      {{src->addr(), dst + 1024, 1}},                   // starts at the end
  };
  DoneTracker tracker;
  for (size_t i = 0; i < bad_batches.size(); ++i) {
    EXPECT_THAT(Write(tracker, *source, *target, bad_batches[i]), StatusIs(StatusCode::kOutOfRange))
        << "batch " << i;
  }
  EXPECT_THAT((*a_)->Write(*source, *target, {&good, 1}, TransportDone()),
              StatusIs(StatusCode::kInvalidArgument));
  const ForeignRemoteRegion foreign(peer.id, peer.region);
  EXPECT_THAT(Write(tracker, *source, foreign, {&good, 1}),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("not imported by this transport")));
  ASSERT_THAT(Flush(tracker, peer.id), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_EQ(Check(peer, PeerPattern(1024)), "CHECK ok");
  EXPECT_EQ(tracker.Violations(), "");
  EXPECT_EQ((*a_)->Stats().write_ops, 0u);

  // A zero-byte op at the very end is inside; an empty batch completes OK.
  const WriteOp edge[] = {{src->addr(1024), dst + 1024, 0}};
  ASSERT_THAT(Write(tracker, *source, *target, edge), IsOk());
  ASSERT_THAT(Write(tracker, *source, *target, {}), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  for (const Status& status : tracker.statuses()) EXPECT_THAT(status, IsOk());
  EXPECT_EQ(Check(peer, PeerPattern(1024)), "CHECK ok");
}

// --- Import ------------------------------------------------------------------------

// Import refuses a key it cannot read (none, truncated, garbage, one byte
// too long), memory that is not device memory, a region larger than the
// allocation its key names, an unknown peer, and a region that another
// process exported (another peer's, or our own) offered as this peer's:
// the key names its exporter's pid. The refused imports leave nothing
// behind: the good ones work, and a write through one lands.
TEST_P(CudaIpcTransportTest, ImportRejectsBadKeysAndWrongPeers) {
  Peer b;
  Peer c;
  ASSERT_NO_FATAL_FAILURE(StartPeer(4096, &b));
  ASSERT_NO_FATAL_FAILURE(StartPeer(4096, &c));
  const std::string b_pid = std::to_string(b.process->pid());
  const std::string c_pid = std::to_string(c.process->pid());

  RegionInfo no_key = b.region;
  no_key.remote_key.clear();
  EXPECT_THAT((*a_)->Import(b.id, no_key),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("not a cuda-ipc region key")));
  RegionInfo truncated = b.region;
  truncated.remote_key.resize(truncated.remote_key.size() / 2);
  EXPECT_THAT((*a_)->Import(b.id, truncated),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("region key")));
  RegionInfo garbage = b.region;
  std::mt19937 rng(23);
  for (std::byte& byte : garbage.remote_key) byte = static_cast<std::byte>(rng());
  EXPECT_THAT((*a_)->Import(b.id, garbage),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("not a cuda-ipc region key")));
  RegionInfo longer = b.region;
  longer.remote_key.push_back(std::byte{0});
  EXPECT_THAT((*a_)->Import(b.id, longer),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("region key")));
  RegionInfo host = b.region;
  host.kind = MemoryKind::kHost;
  EXPECT_THAT((*a_)->Import(b.id, host),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("device memory only")));
  RegionInfo grown = b.region;
  grown.size = uint64_t{1} << 50;
  EXPECT_THAT((*a_)->Import(b.id, grown),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("leaves its shared allocation")));
  EXPECT_THAT((*a_)->Import(987654321, b.region), StatusIs(StatusCode::kNotFound));

  // c's region offered as b's, and our own as b's.
  EXPECT_THAT((*a_)->Import(b.id, c.region),
              StatusIs(StatusCode::kInvalidArgument,
                       HasSubstr("exported by process " + c_pid + ", not by the peer (" + b_pid)));
  DeviceBuffer* own = NewBuffer(Sequence(4096, SourceByte));
  ASSERT_NE(own, nullptr);
  LocalRegion* own_region = Register(*own);
  ASSERT_NE(own_region, nullptr);
  EXPECT_THAT((*a_)->Import(b.id, own_region->info()),
              StatusIs(StatusCode::kInvalidArgument,
                       HasSubstr("exported by process " + std::to_string(::getpid()))));

  RemoteRegion* b_target = Import(b);
  RemoteRegion* c_target = Import(c);
  ASSERT_NE(b_target, nullptr);
  ASSERT_NE(c_target, nullptr);
  DoneTracker tracker;
  const WriteOp op = {own->addr(), b.region.address, 4096};
  ASSERT_THAT(Write(tracker, *own_region, *b_target, {&op, 1}), IsOk());
  ASSERT_THAT(Flush(tracker, b.id), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(0), IsOk());
  EXPECT_EQ(Check(b, Sequence(4096, SourceByte)), "CHECK ok");
  EXPECT_EQ(Check(c, PeerPattern(4096)), "CHECK ok");
  EXPECT_EQ(a_->total_failures(), 0);
}

// --- Reads of the peer process's device memory (one kernel per Read) ----------------

// The peer's bytes land in our device memory when `done` runs (no flush for
// a read), exactly where asked, and nothing around them changes.
TEST_P(CudaIpcTransportTest, ReadCopiesThePeersBytesIntoTheTarget) {
  Peer peer;
  ASSERT_NO_FATAL_FAILURE(StartPeer(4096, &peer));
  DeviceBuffer* dst = NewBuffer(std::vector<uint8_t>(8192, 0x5A));
  ASSERT_NE(dst, nullptr);
  LocalRegion* target = Register(*dst);
  RemoteRegion* source = Import(peer);
  ASSERT_NE(target, nullptr);
  ASSERT_NE(source, nullptr);

  DoneTracker tracker;
  const ReadOp ops[] = {{peer.region.address, dst->addr(1000), 4096}};
  ASSERT_THAT(Read(tracker, *source, *target, ops), IsOk());
  ASSERT_TRUE(tracker.WaitAll()) << "the read did not complete";
  EXPECT_THAT(tracker.status(0), IsOk());
  auto got = dst->Download();
  ASSERT_THAT(got, IsOk());
  std::vector<uint8_t> want(8192, 0x5A);
  const std::vector<uint8_t> pattern = PeerPattern(4096);
  std::copy(pattern.begin(), pattern.end(), want.begin() + 1000);
  EXPECT_EQ(Difference(*got, want), "");
  const TransportStats stats = (*a_)->Stats();
  EXPECT_EQ(stats.read_ops, 1u);
  EXPECT_EQ(stats.read_bytes, 4096u);
  EXPECT_EQ(stats.write_ops, 0u);
  EXPECT_EQ(tracker.Violations(), "");
  EXPECT_EQ(a_->total_failures(), 0);
}

// Thousands of ranges in one Read — odd sizes from scattered (and
// overlapping) places of the peer's region into target ranges of which
// half touch the one before, in shuffled order — and three large ranges
// (1 MiB + 4,321 bytes each, in reverse order) land exactly; nothing else
// of the target changes.
TEST_P(CudaIpcTransportTest, ManyRangesInOneReadLandExactly) {
  constexpr size_t kOps = 5000;
  constexpr uint64_t kSmallSource = 256 << 10;
  constexpr size_t kLargeOps = 3;
  constexpr uint64_t kLargeBytes = (uint64_t{1} << 20) + 4321;
  constexpr uint64_t kPeerBytes = kSmallSource + kLargeOps * kLargeBytes;
  std::mt19937 rng(29);
  std::vector<ReadOp> ops;
  std::vector<std::pair<uint64_t, uint64_t>> offsets;  // source, target
  uint64_t dst_cursor = 5;
  for (size_t i = 0; i < kOps; ++i) {
    const uint64_t bytes = 1 + rng() % 37;
    dst_cursor += rng() % 2 == 0 ? 0 : 1 + rng() % 9;
    offsets.emplace_back(rng() % (kSmallSource - bytes), dst_cursor);
    ops.push_back({Addr(), Addr(), bytes});
    dst_cursor += bytes;
  }
  const uint64_t small_target = dst_cursor;
  for (size_t i = 0; i < kLargeOps; ++i) {
    offsets.emplace_back(kSmallSource + i * kLargeBytes,
                         small_target + (kLargeOps - 1 - i) * kLargeBytes);
    ops.push_back({Addr(), Addr(), kLargeBytes});
  }
  const uint64_t target_bytes = small_target + kLargeOps * kLargeBytes;

  Peer peer;
  ASSERT_NO_FATAL_FAILURE(StartPeer(kPeerBytes, &peer));
  DeviceBuffer* dst = NewBuffer(std::vector<uint8_t>(target_bytes, 0x5A));
  ASSERT_NE(dst, nullptr);
  LocalRegion* target = Register(*dst);
  RemoteRegion* source = Import(peer);
  ASSERT_NE(target, nullptr);
  ASSERT_NE(source, nullptr);
  const std::vector<uint8_t> pattern = PeerPattern(kPeerBytes);
  std::vector<uint8_t> want(target_bytes, 0x5A);
  uint64_t total = 0;
  for (size_t i = 0; i < ops.size(); ++i) {
    ops[i].src = peer.region.address + offsets[i].first;
    ops[i].dst = dst->addr(offsets[i].second);
    std::copy_n(pattern.begin() + offsets[i].first, ops[i].bytes, want.begin() + offsets[i].second);
    total += ops[i].bytes;
  }
  std::shuffle(ops.begin(), ops.begin() + kOps, rng);

  DoneTracker tracker;
  ASSERT_THAT(Read(tracker, *source, *target, ops), IsOk());
  ASSERT_TRUE(tracker.WaitAll()) << "the read did not complete";
  EXPECT_THAT(tracker.status(0), IsOk());
  auto got = dst->Download();
  ASSERT_THAT(got, IsOk());
  EXPECT_EQ(Difference(*got, want), "");
  const TransportStats stats = (*a_)->Stats();
  EXPECT_EQ(stats.read_ops, ops.size());
  EXPECT_EQ(stats.read_bytes, total);
  EXPECT_EQ(stats.write_ops, 0u);
  EXPECT_EQ(tracker.Violations(), "");
}

// A Read with one op outside the peer's region or the target is refused
// whole (kOutOfRange, nothing read); so are a Read without `done` and one
// from a region this transport did not import. A zero-byte op at the very
// end and an empty batch are fine.
TEST_P(CudaIpcTransportTest, ReadOpOutsideSourceOrTargetIsRejectedAndNothingRead) {
  Peer peer;
  ASSERT_NO_FATAL_FAILURE(StartPeer(1024, &peer));
  DeviceBuffer* dst = NewBuffer(std::vector<uint8_t>(1024, 0x5A));
  ASSERT_NE(dst, nullptr);
  LocalRegion* target = Register(*dst);
  RemoteRegion* source = Import(peer);
  ASSERT_NE(target, nullptr);
  ASSERT_NE(source, nullptr);
  const Addr src = peer.region.address;

  const ReadOp good = {src, dst->addr(), 64};
  const std::vector<std::vector<ReadOp>> bad_batches = {
      {good, {src + 1000, dst->addr(), 25}},            // past the source's end
      {good, {src, dst->addr(1000), 25}},               // past the target's end
      {good, {src + (-1ull), dst->addr(), 1}},          // before the source (wraps)
      {good, {src, Addr(dst->addr().value() - 1), 1}},  // before the target
      {good, {src, dst->addr(), ~0ull}},                // overflowing length
      {{src + 1024, dst->addr(), 1}},                   // starts at the end
  };
  DoneTracker tracker;
  for (size_t i = 0; i < bad_batches.size(); ++i) {
    EXPECT_THAT(Read(tracker, *source, *target, bad_batches[i]), StatusIs(StatusCode::kOutOfRange))
        << "batch " << i;
  }
  EXPECT_THAT((*a_)->Read(*source, *target, {&good, 1}, TransportDone(), {}),
              StatusIs(StatusCode::kInvalidArgument));
  const ForeignRemoteRegion foreign(peer.id, peer.region);
  EXPECT_THAT(Read(tracker, foreign, *target, {&good, 1}),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("not imported by this transport")));
  ASSERT_TRUE(tracker.WaitAll());
  auto got = dst->Download();
  ASSERT_THAT(got, IsOk());
  EXPECT_EQ(Difference(*got, std::vector<uint8_t>(1024, 0x5A)), "");
  EXPECT_EQ((*a_)->Stats().read_ops, 0u);
  EXPECT_EQ((*a_)->Stats().read_bytes, 0u);

  // A zero-byte op at the very end is inside; an empty batch completes OK.
  const ReadOp edge[] = {{src + 1024, dst->addr(1024), 0}};
  ASSERT_THAT(Read(tracker, *source, *target, edge), IsOk());
  ASSERT_THAT(Read(tracker, *source, *target, {}), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  for (const Status& status : tracker.statuses()) EXPECT_THAT(status, IsOk());
  got = dst->Download();
  ASSERT_THAT(got, IsOk());
  EXPECT_EQ(Difference(*got, std::vector<uint8_t>(1024, 0x5A)), "");
  EXPECT_EQ(tracker.Violations(), "");
}

// --- A peer process killed while its region is mapped here --------------------------

// Writes run without pause into the peer's region (8 MiB each) when the
// peer process is SIGKILLed: every accepted write ends once (OK, or
// kUnavailable once the connection is dead), all of them before
// on_peer_failure (the fence), which comes once and in bounded time; new
// work is refused; this process's CUDA context still works; a new peer
// process connects and a write into it lands; and Shutdown is prompt.
TEST_P(CudaIpcTransportTest, PeerKilledMidWrite) {
  constexpr uint64_t kBytes = 8 << 20;
  Peer peer;
  ASSERT_NO_FATAL_FAILURE(StartPeer(kBytes, &peer));
  DeviceBuffer* src = NewBuffer(Sequence(kBytes, SourceByte));
  ASSERT_NE(src, nullptr);
  LocalRegion* source = Register(*src);
  RemoteRegion* target = Import(peer);
  ASSERT_NE(source, nullptr);
  ASSERT_NE(target, nullptr);

  // The mapping is in use: a first write landed.
  const WriteOp op{src->addr(), peer.region.address, kBytes};
  DoneTracker tracker;
  ASSERT_THAT(Write(tracker, *source, *target, {&op, 1}), IsOk());
  ASSERT_TRUE(tracker.WaitAll()) << "the first write did not complete";
  ASSERT_THAT(tracker.status(0), IsOk()) << "the first write, before the kill";

  Pump writes(*a_, peer.id, tracker, [this, source, target, op](TransportDone done) {
    return (*a_)->Write(*source, *target, {&op, 1}, std::move(done));
  });
  ASSERT_TRUE(writes.WaitAccepted(3, kAnswerTimeout)) << "the writes did not get going";
  const auto killed = std::chrono::steady_clock::now();
  peer.process->Kill();
  ASSERT_TRUE(a_->WaitForFailure(peer.id, kFailureTimeout))
      << "no on_peer_failure within " << kFailureTimeout.count() << " ms of the peer's SIGKILL; "
      << writes.Describe();
  const auto reported = std::chrono::steady_clock::now() - killed;
  writes.Stop();
  ASSERT_TRUE(tracker.WaitAll(kFailureTimeout)) << "after the peer died: " << writes.Describe();
  EXPECT_LT(reported, kFailureTimeout);
  EXPECT_EQ(writes.ended(), writes.accepted()) << writes.Describe();
  EXPECT_EQ(writes.ended_after_failure(), 0) << "writes ended after on_peer_failure (the fence)";
  EXPECT_EQ(tracker.Violations(), "");
  const std::vector<Status> statuses = tracker.statuses();
  for (size_t i = 0; i < statuses.size(); ++i) {
    EXPECT_THAT(statuses[i], AnyOf(IsOk(), StatusIs(StatusCode::kUnavailable))) << "write " << i;
  }
  if (!writes.refusal().ok()) {
    EXPECT_THAT(writes.refusal(), StatusIs(StatusCode::kUnavailable))
        << "a write refused after the kill";
  }
  EXPECT_EQ(a_->failures(peer.id), 1);
  EXPECT_THAT(a_->failure_reason(peer.id), StatusIs(StatusCode::kUnavailable));

  // New work on the dead connection is refused.
  EXPECT_THAT((*a_)->Write(*source, *target, {&op, 1}, [](Status) {}),
              StatusIs(StatusCode::kUnavailable));
  EXPECT_THAT((*a_)->Flush(peer.id, [](Status) {}), StatusIs(StatusCode::kUnavailable));
  EXPECT_THAT(a_->SendText(peer.id, "late"), StatusIs(StatusCode::kUnavailable));
  EXPECT_FALSE((*a_)->Import(peer.id, peer.region).ok());
  ASSERT_NO_FATAL_FAILURE(ExpectDeviceStillWorks(*src));

  // A new peer process connects, and a write into it lands.
  Peer again;
  ASSERT_NO_FATAL_FAILURE(StartPeer(4096, &again));
  EXPECT_NE(again.id, peer.id);
  RemoteRegion* again_target = Import(again);
  ASSERT_NE(again_target, nullptr);
  DoneTracker again_tracker;
  const WriteOp small{src->addr(), again.region.address, 4096};
  ASSERT_THAT(Write(again_tracker, *source, *again_target, {&small, 1}), IsOk());
  ASSERT_THAT(Flush(again_tracker, again.id), IsOk());
  ASSERT_TRUE(again_tracker.WaitAll());
  EXPECT_THAT(again_tracker.status(0), IsOk());
  EXPECT_THAT(again_tracker.status(1), IsOk());
  EXPECT_EQ(Check(again, Sequence(4096, SourceByte)), "CHECK ok");

  const auto start = std::chrono::steady_clock::now();
  a_->Shutdown();
  EXPECT_LT(std::chrono::steady_clock::now() - start, kShutdownBound);
  EXPECT_EQ(again.process->WaitExit(kExitTimeout), "exited 0")
      << "the live peer did not see the connection end";
}

// Reads (one kernel each, 1 MiB) run without pause from the peer's region
// when the peer process is SIGKILLed: every accepted read ends once, OK or
// with the connection's end, all before on_peer_failure (the fence), which
// comes once in bounded time; a new Read is refused; the CUDA context still
// works; Shutdown is prompt.
TEST_P(CudaIpcTransportTest, PeerKilledMidRead) {
  constexpr uint64_t kBytes = 1 << 20;
  Peer peer;
  ASSERT_NO_FATAL_FAILURE(StartPeer(kBytes, &peer));
  DeviceBuffer* dst = NewBuffer(std::vector<uint8_t>(kBytes, 0));
  ASSERT_NE(dst, nullptr);
  LocalRegion* target = Register(*dst);
  RemoteRegion* source = Import(peer);
  ASSERT_NE(target, nullptr);
  ASSERT_NE(source, nullptr);

  // The mapping is in use: a first read landed, and brought the pattern.
  const ReadOp op{peer.region.address, dst->addr(), kBytes};
  DoneTracker tracker;
  ASSERT_THAT(Read(tracker, *source, *target, {&op, 1}), IsOk());
  ASSERT_TRUE(tracker.WaitAll()) << "the first read did not complete";
  ASSERT_THAT(tracker.status(0), IsOk()) << "the first read, before the kill";
  {
    auto got = dst->Download();
    ASSERT_THAT(got, IsOk());
    EXPECT_EQ(Difference(*got, PeerPattern(kBytes)), "") << "the first read";
  }

  Pump reads(*a_, peer.id, tracker, [this, source, target, op](TransportDone done) {
    return (*a_)->Read(*source, *target, {&op, 1}, std::move(done), {});
  });
  ASSERT_TRUE(reads.WaitAccepted(3, kAnswerTimeout)) << "the reads did not get going";
  peer.process->Kill();
  ASSERT_TRUE(a_->WaitForFailure(peer.id, kFailureTimeout))
      << "no on_peer_failure within " << kFailureTimeout.count() << " ms of the peer's SIGKILL; "
      << reads.Describe();
  reads.Stop();
  ASSERT_TRUE(tracker.WaitAll(kFailureTimeout)) << "after the peer died: " << reads.Describe();
  EXPECT_EQ(reads.ended(), reads.accepted()) << reads.Describe();
  EXPECT_EQ(reads.ended_after_failure(), 0) << "reads ended after on_peer_failure (the fence)";
  EXPECT_EQ(tracker.Violations(), "");
  // A read the connection's end stopped before its kernel launched ends
  // with the copy engine's kCancelled ("batch stopped"), where loopback and
  // ucx say kUnavailable: the race is narrow (a launch follows its Submit by
  // microseconds), so it is counted, not failed; any other error fails.
  const std::vector<Status> statuses = tracker.statuses();
  int stopped = 0;
  for (size_t i = 0; i < statuses.size(); ++i) {
    if (statuses[i].code() == StatusCode::kCancelled) {
      EXPECT_THAT(statuses[i], StatusIs(StatusCode::kCancelled, HasSubstr("batch stopped")))
          << "read " << i;
      ++stopped;
      continue;
    }
    EXPECT_THAT(statuses[i], AnyOf(IsOk(), StatusIs(StatusCode::kUnavailable))) << "read " << i;
  }
  RecordProperty("reads_stopped_as_cancelled", stopped);
  if (!reads.refusal().ok()) {
    EXPECT_THAT(reads.refusal(), StatusIs(StatusCode::kUnavailable))
        << "a read refused after the kill";
  }
  EXPECT_EQ(a_->failures(peer.id), 1);
  EXPECT_THAT(a_->failure_reason(peer.id), StatusIs(StatusCode::kUnavailable));
  EXPECT_THAT((*a_)->Read(*source, *target, {&op, 1}, [](Status) {}, {}),
              StatusIs(StatusCode::kUnavailable));
  ASSERT_NO_FATAL_FAILURE(ExpectDeviceStillWorks(*dst));

  const auto start = std::chrono::steady_clock::now();
  a_->Shutdown();
  EXPECT_LT(std::chrono::steady_clock::now() - start, kShutdownBound);
}

// The peer process is SIGKILLed right after its region was imported (the
// IPC mapping just opened, nothing copied yet): a write and a flush issued
// at once are either refused (kUnavailable) or end once (OK or
// kUnavailable); on_peer_failure comes once in bounded time; Shutdown is
// prompt.
TEST_P(CudaIpcTransportTest, PeerKilledRightAfterImport) {
  Peer peer;
  ASSERT_NO_FATAL_FAILURE(StartPeer(1 << 20, &peer));
  DeviceBuffer* src = NewBuffer(Sequence(1 << 20, SourceByte));
  ASSERT_NE(src, nullptr);
  LocalRegion* source = Register(*src);
  RemoteRegion* target = Import(peer);
  ASSERT_NE(source, nullptr);
  ASSERT_NE(target, nullptr);

  peer.process->Kill();
  DoneTracker tracker;
  const WriteOp op{src->addr(), peer.region.address, 1 << 20};
  const Status wrote = Write(tracker, *source, *target, {&op, 1});
  const Status flushed = Flush(tracker, peer.id);
  EXPECT_THAT(wrote, AnyOf(IsOk(), StatusIs(StatusCode::kUnavailable)));
  EXPECT_THAT(flushed, AnyOf(IsOk(), StatusIs(StatusCode::kUnavailable)));
  ASSERT_TRUE(a_->WaitForFailure(peer.id, kFailureTimeout))
      << "no on_peer_failure within " << kFailureTimeout.count() << " ms of the peer's SIGKILL";
  ASSERT_TRUE(tracker.WaitAll(kFailureTimeout)) << "a write or flush never ended";
  for (const Status& status : tracker.statuses()) {
    EXPECT_THAT(status, AnyOf(IsOk(), StatusIs(StatusCode::kUnavailable)));
  }
  EXPECT_EQ(tracker.Violations(), "");
  std::this_thread::sleep_for(50ms);  // a second report would show by now
  EXPECT_EQ(a_->failures(peer.id), 1);
  EXPECT_THAT((*a_)->Write(*source, *target, {&op, 1}, [](Status) {}),
              StatusIs(StatusCode::kUnavailable));
  ASSERT_NO_FATAL_FAILURE(ExpectDeviceStillWorks(*src));

  const auto start = std::chrono::steady_clock::now();
  a_->Shutdown();
  EXPECT_LT(std::chrono::steady_clock::now() - start, kShutdownBound);
}

// --- Disconnect and Shutdown with writes in flight ---------------------------------

// 100 writes of 1,000 ops each, with a flush after every tenth, are in
// flight when the connection is closed, from this end (Disconnect) or from
// the peer's (it disconnects on "LEAVE"): every callback runs once, each
// write and flush OK or kUnavailable (the failed writes are counted as
// failed ops), both ends see the failure (the peer exits 0 once its own
// on_peer_failure ran), ours once and with the reason, and new work on the
// connection is refused.
TEST_P(CudaIpcTransportTest, DisconnectFailsPendingAndNewWorkOnBothEnds) {
  constexpr size_t kOps = 1000;
  constexpr int kWrites = 100;
  for (const bool we_disconnect : {true, false}) {
    SCOPED_TRACE(we_disconnect ? "this end disconnects" : "the peer disconnects");
    Peer peer;
    ASSERT_NO_FATAL_FAILURE(StartPeer(kWrites * kOps * 64, &peer));
    DeviceBuffer* src = NewBuffer(Sequence(kOps * 64, SourceByte));
    ASSERT_NE(src, nullptr);
    LocalRegion* source = Register(*src);
    RemoteRegion* target = Import(peer);
    ASSERT_NE(source, nullptr);
    ASSERT_NE(target, nullptr);
    // Each write into its own part of the region.
    std::vector<std::vector<WriteOp>> ops(kWrites, std::vector<WriteOp>(kOps));
    for (int w = 0; w < kWrites; ++w) {
      for (size_t i = 0; i < kOps; ++i) {
        ops[w][i] = {src->addr(i * 64), peer.region.address + (w * kOps + i) * 64, 64};
      }
    }

    const TransportStats before = (*a_)->Stats();
    DoneTracker tracker;
    std::vector<size_t> write_index;
    for (int w = 0; w < kWrites; ++w) {
      write_index.push_back(tracker.made());
      ASSERT_THAT(Write(tracker, *source, *target, ops[w]), IsOk()) << "write " << w;
      if (w % 10 == 0) {
        ASSERT_THAT(Flush(tracker, peer.id), IsOk());
      }
    }
    if (we_disconnect) {
      (*a_)->Disconnect(peer.id, UnavailableError("test disconnect"));
    } else {
      ASSERT_THAT(a_->SendText(peer.id, "LEAVE test disconnect"), IsOk());
    }
    ASSERT_TRUE(tracker.WaitAll(kFailureTimeout))
        << "of " << tracker.made() << " writes and flushes, some never ended";
    ASSERT_TRUE(a_->WaitForFailure(peer.id, kFailureTimeout))
        << "no on_peer_failure here; the peer " << peer.process->Describe();
    EXPECT_THAT(a_->failure_reason(peer.id),
                StatusIs(StatusCode::kUnavailable, HasSubstr("test disconnect")));
    EXPECT_EQ(peer.process->WaitExit(kExitTimeout), "exited 0")
        << "the peer process did not see the connection end (its on_peer_failure)";
    size_t failed_writes = 0;
    for (size_t i = 0; i < tracker.made(); ++i) {
      const Status status = tracker.status(i);
      EXPECT_THAT(status, AnyOf(IsOk(), StatusIs(StatusCode::kUnavailable))) << "callback " << i;
      const bool is_write =
          std::find(write_index.begin(), write_index.end(), i) != write_index.end();
      if (is_write && !status.ok()) ++failed_writes;
    }
    // Writes of 1,000 ops (less than a wait window) fail whole or not at all.
    EXPECT_EQ((*a_)->Stats().failed_write_ops - before.failed_write_ops, failed_writes * kOps);

    // New work is refused; disconnecting again changes nothing.
    EXPECT_THAT(a_->SendText(peer.id, "late"), StatusIs(StatusCode::kUnavailable));
    EXPECT_THAT(Write(tracker, *source, *target, ops[0]), StatusIs(StatusCode::kUnavailable));
    EXPECT_THAT(Flush(tracker, peer.id), StatusIs(StatusCode::kUnavailable));
    EXPECT_FALSE((*a_)->Import(peer.id, peer.region).ok());
    (*a_)->Disconnect(peer.id, UnavailableError("again"));
    std::this_thread::sleep_for(50ms);  // a stray callback would show by now
    EXPECT_EQ(a_->failures(peer.id), 1);
    EXPECT_EQ(tracker.Violations(), "");
  }
}

// Shutdown with 100 writes (and their flushes) in flight returns within its
// bound, and only after every accepted callback ran, once (OK, kAborted or
// kUnavailable); nothing runs after it; calls after it are refused; the
// peer process sees the connection end and exits 0.
TEST_P(CudaIpcTransportTest, ShutdownWithWritesInFlightRunsEveryCallbackOnce) {
  constexpr size_t kOps = 1000;
  constexpr int kWrites = 100;
  Peer peer;
  ASSERT_NO_FATAL_FAILURE(StartPeer(kWrites * kOps * 64, &peer));
  DeviceBuffer* src = NewBuffer(Sequence(kOps * 64, SourceByte));
  ASSERT_NE(src, nullptr);
  LocalRegion* source = Register(*src);
  RemoteRegion* target = Import(peer);
  ASSERT_NE(source, nullptr);
  ASSERT_NE(target, nullptr);
  std::vector<std::vector<WriteOp>> ops(kWrites, std::vector<WriteOp>(kOps));
  for (int w = 0; w < kWrites; ++w) {
    for (size_t i = 0; i < kOps; ++i) {
      ops[w][i] = {src->addr(i * 64), peer.region.address + (w * kOps + i) * 64, 64};
    }
  }
  DoneTracker tracker;
  for (int w = 0; w < kWrites; ++w) {
    ASSERT_THAT(Write(tracker, *source, *target, ops[w]), IsOk()) << "write " << w;
    if (w % 10 == 0) {
      ASSERT_THAT(Flush(tracker, peer.id), IsOk());
    }
  }
  const auto start = std::chrono::steady_clock::now();
  a_->Shutdown();
  const auto took = std::chrono::steady_clock::now() - start;
  tracker.Seal();
  EXPECT_LT(took, kShutdownBound);
  // Shutdown returned: every accepted callback already ran exactly once.
  EXPECT_TRUE(tracker.WaitAll(0ms)) << "Shutdown returned before every callback ran";
  EXPECT_EQ(tracker.Violations(), "");
  for (size_t i = 0; i < tracker.made(); ++i) {
    EXPECT_THAT(tracker.status(i),
                AnyOf(IsOk(), StatusIs(StatusCode::kAborted), StatusIs(StatusCode::kUnavailable)))
        << "callback " << i;
  }

  // Calls after Shutdown fail; nothing runs any more. (Send finds the
  // connection closed by the shutdown: kUnavailable or kAborted.)
  EXPECT_THAT(a_->SendText(peer.id, "late"),
              AnyOf(StatusIs(StatusCode::kAborted), StatusIs(StatusCode::kUnavailable)));
  EXPECT_THAT(Write(tracker, *source, *target, ops[0]), StatusIs(StatusCode::kAborted));
  EXPECT_THAT(Flush(tracker, peer.id), StatusIs(StatusCode::kAborted));
  EXPECT_EQ(peer.process->WaitExit(kExitTimeout), "exited 0")
      << "the peer process did not see the connection end (its on_peer_failure)";
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(a_->callbacks_after_shutdown(), 0);
  EXPECT_EQ(tracker.Violations(), "");
}

INSTANTIATE_TEST_SUITE_P(DeviceMemory, CudaIpcTransportTest,
                         ::testing::Values(Memory::kCudaMalloc, Memory::kVmm),
                         [](const ::testing::TestParamInfo<Memory>& param_info) {
                           return std::string(MemoryName(param_info.param));
                         });

}  // namespace
}  // namespace kvbounce::transport_test
