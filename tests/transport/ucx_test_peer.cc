// A UCX transport endpoint in a process of its own, for ucx_transport_test:
//
//   ucx_test_peer <address> receiver <shm 0|1>
//     connects to <address>, registers a buffer and sends "REGION" + its
//     RegionInfo; then serves until killed.
//   ucx_test_peer <address> writer <shm 0|1>
//     connects, waits for the parent's "REGION" frame and writes into that
//     region without pause until the connection dies; exits 0 then. After
//     its first write is flushed it sends "WROTE".
//
// Frames: "READY" after connecting; "REGION" + address u64 + size u64 + key.
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "kvbounce/transports.h"
#include "memory/allocation.h"
#include "transport/ucx_peer_frames.h"

using namespace kvbounce;

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: ucx_test_peer <address> receiver|writer <shm 0|1>\n");
    return 2;
  }
  const std::string address = argv[1];
  const std::string mode = argv[2];
  // The memory outlives the transport (declared first, destroyed last).
  auto buffer = HostAllocation::Create(size_t{8} << 20);
  if (!buffer.ok()) return 1;
  UcxTransportOptions options;
  options.same_host_shared_memory = std::string(argv[3]) == "1";
  auto created = NewUcxTransport(options);
  if (!created.ok()) {
    std::fprintf(stderr, "peer: %s\n", created.status().ToString().c_str());
    return 1;
  }
  std::unique_ptr<Transport> transport = std::move(created).value();
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::byte> region_frame;
  bool dead = false;
  TransportCallbacks callbacks;
  callbacks.on_message = [&](PeerId, std::vector<std::byte> frame) {
    std::lock_guard<std::mutex> lock(mu);
    region_frame = std::move(frame);
    cv.notify_all();
  };
  callbacks.on_peer_failure = [&](PeerId, const Status&) {
    std::lock_guard<std::mutex> lock(mu);
    dead = true;
    cv.notify_all();
  };
  if (!transport->Start(std::move(callbacks)).ok()) return 1;
  auto peer = transport->Connect(address);
  if (!peer.ok()) {
    std::fprintf(stderr, "peer: %s\n", peer.status().ToString().c_str());
    return 1;
  }
  std::memset((*buffer)->host_pointer(), 0x5A, size_t{8} << 20);  // what a writer writes
  const Addr base = Addr::FromPointer((*buffer)->host_pointer());
  auto region = transport->Register(base, size_t{8} << 20, MemoryKind::kHost);
  if (!region.ok()) return 1;
  if (!transport->Send(*peer, test_peer::Bytes("READY")).ok()) return 1;

  if (mode == "receiver") {
    if (!transport->Send(*peer, test_peer::EncodeRegion((*region)->info())).ok()) return 1;
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return dead; });
    return 0;
  }
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return !region_frame.empty() || dead; });
  if (dead) return 1;
  auto info = test_peer::DecodeRegion(region_frame);
  lock.unlock();
  if (!info) return 1;
  auto target = transport->Import(*peer, *info);
  if (!target.ok()) return 1;
  const uint64_t bytes = std::min<uint64_t>(info->size, uint64_t{8} << 20);
  const WriteOp op{base, info->address, bytes};
  bool announced = false;
  for (;;) {
    std::mutex done_mu;
    std::condition_variable done_cv;
    bool finished = false;
    Status result;
    Status issued = transport->Write(**region, **target, {&op, 1}, [&](Status s) {
      std::lock_guard<std::mutex> g(done_mu);
      result = s;
      finished = true;
      done_cv.notify_all();
    });
    if (!issued.ok()) return 0;  // the connection is gone
    std::unique_lock<std::mutex> g(done_mu);
    done_cv.wait(g, [&] { return finished; });
    if (!result.ok()) return 0;
    g.unlock();
    if (!announced) {
      // The first write is visible: say so, then keep writing.
      finished = false;
      if (!transport->Flush(*peer, [&](Status s) {
            std::lock_guard<std::mutex> f(done_mu);
            result = s;
            finished = true;
            done_cv.notify_all();
          }).ok()) {
        return 0;
      }
      g.lock();
      done_cv.wait(g, [&] { return finished; });
      if (!result.ok()) return 0;
      g.unlock();
      if (!transport->Send(*peer, test_peer::Bytes("WROTE")).ok()) return 0;
      announced = true;
    }
  }
}
