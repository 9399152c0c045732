// A cuda-ipc transport endpoint in a process of its own, for
// cuda_ipc_transport_test. A process cannot open the CUDA IPC handles it
// exported itself, so every peer of that test is this program:
//
//   cuda_ipc_test_peer <address> cuda_malloc|vmm <region bytes>
//
// It connects to <address> and sends "READY"; then it allocates <region
// bytes> of device memory on device 0 (cudaMalloc, whose IPC handle travels
// in the key; or a VMM allocation, whose file descriptor travels on the
// socket), fills byte i with PatternByte(i), registers it and sends
// "DEVREGION" + its RegionInfo (cuda_ipc_peer_frames.h). When the memory
// cannot be made or registered it sends "NOMEMORY <status>" instead (and
// then serves as below, without a region).
//
// Then, one frame at a time, in the order they came:
//   "CHECK" + image   copies its region to the host and answers "CHECK ok"
//                     when it equals `image`, else "CHECK bad ..." naming
//                     the first differing byte (offset, wanted, found), the
//                     last one and how many differ;
//   "BURST <n>"       sends "B0" .. "B<n-1>" and then an empty frame;
//   "LEAVE <reason>"  disconnects, with kUnavailable <reason>;
//   anything else     goes back as it came (an empty frame too).
//
// It exits 0 once its on_peer_failure ran (the connection ended: the
// parent's Disconnect or Shutdown, or the parent process exited), after
// shutting its transport down and freeing its memory; 1 when something
// fails before (the reason on stderr); 3 when it is still running after
// kLifetime, so that no peer outlives a test that lost track of it.
#include <cuda_runtime_api.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "copy/device_support.h"
#include "kvbounce/status.h"
#include "kvbounce/transports.h"
#include "memory/allocation.h"
#include "transport/cuda_ipc_peer_frames.h"

using namespace kvbounce;

namespace {

constexpr int kDevice = 0;
constexpr auto kLifetime = std::chrono::seconds(120);

void Complain(const std::string& what) {
  std::fprintf(stderr, "cuda_ipc_test_peer[%d]: %s\n", static_cast<int>(::getpid()), what.c_str());
}

std::string Hex(unsigned value) {
  char text[8];
  std::snprintf(text, sizeof(text), "0x%02x", value);
  return text;
}

// Compares the region (copied to the host) with `image`: "CHECK ok" or
// "CHECK bad ...".
std::string Check(const Allocation* memory, std::span<const std::byte> image) {
  if (memory == nullptr) return "CHECK bad: this peer has no region";
  if (image.size() != memory->size()) {
    return "CHECK bad: the image has " + std::to_string(image.size()) + " bytes, the region " +
           std::to_string(memory->size());
  }
  std::vector<uint8_t> region(memory->size());
  const cudaError_t copied = cudaMemcpy(region.data(), memory->address().ToPointer(), region.size(),
                                        cudaMemcpyDeviceToHost);
  if (copied != cudaSuccess) {
    return std::string("CHECK bad: cudaMemcpy of the region to the host: ") +
           cudaGetErrorName(copied) + " (" + cudaGetErrorString(copied) + ")";
  }
  size_t differ = 0;
  size_t first = 0;
  size_t last = 0;
  for (size_t i = 0; i < region.size(); ++i) {
    if (region[i] == static_cast<uint8_t>(image[i])) continue;
    if (differ == 0) first = i;
    last = i;
    ++differ;
  }
  if (differ == 0) return "CHECK ok";
  return "CHECK bad: " + std::to_string(differ) + " of " + std::to_string(region.size()) +
         " bytes differ; the first at offset " + std::to_string(first) + " (wanted " +
         Hex(static_cast<uint8_t>(image[first])) + ", found " + Hex(region[first]) +
         "), the last at offset " + std::to_string(last) + " (wanted " +
         Hex(static_cast<uint8_t>(image[last])) + ", found " + Hex(region[last]) + ")";
}

bool StartsWith(std::span<const std::byte> frame, std::string_view prefix) {
  return frame.size() >= prefix.size() &&
         std::memcmp(frame.data(), prefix.data(), prefix.size()) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: cuda_ipc_test_peer <address> cuda_malloc|vmm <region bytes>\n");
    return 2;
  }
  const std::string address = argv[1];
  const std::string memory_kind = argv[2];
  const uint64_t region_bytes = std::strtoull(argv[3], nullptr, 10);
  if ((memory_kind != test_peer::kCudaMalloc && memory_kind != test_peer::kVmm) ||
      region_bytes == 0) {
    Complain("bad arguments: memory '" + memory_kind + "', region bytes '" + argv[3] + "'");
    return 2;
  }
  const auto deadline = std::chrono::steady_clock::now() + kLifetime;
  const DeviceSupport* device = CudaSupport();
  if (device == nullptr) {
    Complain("this build has no CUDA support");
    return 1;
  }

  // What the callbacks touch, and the device memory, outlive the transport
  // (declared before it, so destroyed after its Shutdown joined the threads
  // that run them and ended every copy).
  std::unique_ptr<Allocation> memory;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::vector<std::byte>> frames;
  bool dead = false;
  Status death;

  CudaIpcTransportOptions options;
  options.device = kDevice;
  auto created = NewCudaIpcTransport(options);
  if (!created.ok()) {
    Complain("NewCudaIpcTransport: " + created.status().ToString());
    return 1;
  }
  std::unique_ptr<Transport> transport = std::move(created).value();
  TransportCallbacks callbacks;
  callbacks.on_message = [&](PeerId, std::vector<std::byte> frame) {
    std::lock_guard<std::mutex> lock(mu);
    frames.push_back(std::move(frame));
    cv.notify_all();
  };
  callbacks.on_peer_failure = [&](PeerId, const Status& reason) {
    std::lock_guard<std::mutex> lock(mu);
    dead = true;
    death = reason;
    cv.notify_all();
  };
  if (Status started = transport->Start(std::move(callbacks)); !started.ok()) {
    Complain("Start: " + started.ToString());
    return 1;
  }
  auto connected = transport->Connect(address);
  if (!connected.ok()) {
    Complain("Connect(" + address + "): " + connected.status().ToString());
    return 1;
  }
  const PeerId peer = *connected;
  auto send = [&](std::span<const std::byte> frame) {
    Status sent = transport->Send(peer, frame);
    // A connection that ended is seen by on_peer_failure; say anything else.
    if (!sent.ok() && sent.code() != StatusCode::kUnavailable) Complain("Send: " + sent.ToString());
    return sent.ok();
  };
  if (!send(test_peer::Bytes("READY"))) return 1;

  // The region: PatternByte(i) at byte i.
  std::unique_ptr<LocalRegion> region;
  {
    Result<std::unique_ptr<Allocation>> allocated =
        memory_kind == test_peer::kVmm ? device->AllocateExportable(kDevice, region_bytes)
                                       : device->AllocateDevice(kDevice, region_bytes);
    Status status = allocated.status();
    if (allocated.ok()) {
      memory = std::move(allocated).value();
      std::vector<uint8_t> pattern(region_bytes);
      for (uint64_t i = 0; i < region_bytes; ++i) pattern[i] = test_peer::PatternByte(i);
      const cudaError_t filled = cudaMemcpy(memory->address().ToPointer(), pattern.data(),
                                            region_bytes, cudaMemcpyHostToDevice);
      if (filled != cudaSuccess) {
        status = InternalError(std::string("cudaMemcpy of the pattern to the region: ") +
                               cudaGetErrorName(filled) + " (" + cudaGetErrorString(filled) + ")");
      } else {
        auto registered = transport->Register(memory->address(), region_bytes, MemoryKind::kCuda);
        status = registered.status();
        if (registered.ok()) region = std::move(registered).value();
      }
    }
    if (region != nullptr) {
      if (!send(test_peer::EncodeDeviceRegion(region->info()))) return 1;
    } else {
      Complain(memory_kind + " region of " + std::to_string(region_bytes) +
               " bytes: " + status.ToString());
      if (!send(test_peer::Bytes("NOMEMORY " + status.ToString()))) return 1;
    }
  }

  // Serve, one frame at a time, until the connection ends.
  for (;;) {
    std::vector<std::byte> frame;
    {
      std::unique_lock<std::mutex> lock(mu);
      if (!cv.wait_until(lock, deadline, [&] { return dead || !frames.empty(); })) {
        Complain("still running after " + std::to_string(kLifetime.count()) +
                 " s: the test lost track of this peer");
        std::fflush(stderr);
        ::_exit(3);  // no clean shutdown: the parent may hold the connection open
      }
      if (frames.empty()) break;  // dead, and every frame answered
      frame = std::move(frames.front());
      frames.pop_front();
    }
    if (StartsWith(frame, test_peer::kCheckTag)) {
      const std::string answer = Check(
          memory.get(), std::span<const std::byte>(frame).subspan(test_peer::kCheckTag.size()));
      send(test_peer::Bytes(answer));
    } else if (StartsWith(frame, "BURST ")) {
      const std::string count(reinterpret_cast<const char*>(frame.data()) + 6, frame.size() - 6);
      const int n = std::atoi(count.c_str());
      for (int i = 0; i < n; ++i) {
        if (!send(test_peer::Bytes("B" + std::to_string(i)))) break;
      }
      send({});
    } else if (StartsWith(frame, "LEAVE ")) {
      const std::string reason(reinterpret_cast<const char*>(frame.data()) + 6, frame.size() - 6);
      transport->Disconnect(peer, UnavailableError(reason));
    } else {
      send(frame);
    }
  }
  {
    std::lock_guard<std::mutex> lock(mu);
    std::fprintf(stderr, "cuda_ipc_test_peer[%d]: connection ended: %s\n",
                 static_cast<int>(::getpid()), death.ToString().c_str());
  }
  region.reset();
  transport->Shutdown();
  transport.reset();
  memory.reset();
  return 0;
}
