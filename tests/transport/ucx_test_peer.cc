// A UCX transport endpoint in a process of its own, for ucx_transport_test:
//
//   ucx_test_peer <address> receiver <shm 0|1> [same_host_read 0|1]
//     connects to <address>, registers a buffer (PatternByte(i) at byte i)
//     and sends "REGION" + its RegionInfo; then serves until killed.
//   ucx_test_peer <address> writer <shm 0|1>
//     connects, waits for the parent's "REGION" frame and writes into that
//     region without pause until the connection dies; exits 0 then. After
//     its first write is flushed it sends "WROTE".
//   ucx_test_peer <address> reader|reader-denied <shm 0|1>
//     (reader-denied first installs a seccomp filter that fails
//     process_vm_readv with EPERM, as a container's profile may; it sends
//     "NOSECCOMP" and exits when it cannot.) Connects, sends
//     "CAPS <read_remote 0|1>" (its PeerCaps for the parent), waits for the
//     parent's "REGION" (PatternByte(i) at byte i), Reads all of it into its
//     buffer and sends "READ <status code name> <pattern ok 0|1>"; then
//     serves until the connection dies.
//   ucx_test_peer <address> farewell <shm 0|1>
//     connects, waits for the parent's "GO", sends "LAST 0" .. "LAST 999"
//     and shuts its transport down at once (a worker that sent its last
//     results and exits); exits 0.
//   ucx_test_peer <address> churn <shm 0|1>
//     kChurnRounds times: connects, sends "REGION" (its buffer, registered
//     once) and waits for the connection to end; in odd rounds it
//     disconnects right after sending REGION. Exits 0 after the last round,
//     1 when a connect fails.
//
// Frames: "READY" after connecting; "REGION" + address u64 + size u64 + key.
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "kvbounce/transports.h"
#include "memory/allocation.h"
#include "transport/ucx_peer_frames.h"

using namespace kvbounce;

namespace {

constexpr size_t kBufferBytes = size_t{8} << 20;

// Makes process_vm_readv fail with EPERM in this process (every thread
// created from here on).
bool DenyProcessVmReadv() {
  sock_filter filter[] = {
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_process_vm_readv, 0, 1),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
  };
  sock_fprog program{.len = static_cast<unsigned short>(sizeof(filter) / sizeof(filter[0])),
                     .filter = filter};
  return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 &&
         prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4 && argc != 5) {
    std::fprintf(stderr,
                 "usage: ucx_test_peer <address> "
                 "receiver|writer|reader|reader-denied|farewell|churn <shm 0|1> "
                 "[same_host_read 0|1]\n");
    return 2;
  }
  const std::string address = argv[1];
  const std::string mode = argv[2];
  const bool reader = mode == "reader" || mode == "reader-denied";
  const bool seccomp = mode == "reader-denied" && DenyProcessVmReadv();
  // The memory outlives the transport (declared first, destroyed last).
  auto buffer = HostAllocation::Create(kBufferBytes);
  if (!buffer.ok()) return 1;
  UcxTransportOptions options;
  options.same_host_shared_memory = std::string(argv[3]) == "1";
  options.same_host_read = argc < 5 || std::string(argv[4]) == "1";
  // What the callbacks touch outlives the transport (declared before it, so
  // destroyed after its Shutdown joined the threads that run them).
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::byte> region_frame;
  bool dead = false;
  std::set<PeerId> failed;  // connections that ended
  auto created = NewUcxTransport(options);
  if (!created.ok()) {
    std::fprintf(stderr, "peer: %s\n", created.status().ToString().c_str());
    return 1;
  }
  std::unique_ptr<Transport> transport = std::move(created).value();
  TransportCallbacks callbacks;
  callbacks.on_message = [&](PeerId, std::vector<std::byte> frame) {
    std::lock_guard<std::mutex> lock(mu);
    region_frame = std::move(frame);
    cv.notify_all();
  };
  callbacks.on_peer_failure = [&](PeerId from, const Status&) {
    std::lock_guard<std::mutex> lock(mu);
    failed.insert(from);
    dead = true;
    cv.notify_all();
  };
  if (!transport->Start(std::move(callbacks)).ok()) return 1;
  if (mode == "churn") {
    std::memset((*buffer)->host_pointer(), 0, kBufferBytes);
    auto region = transport->Register(Addr::FromPointer((*buffer)->host_pointer()), kBufferBytes,
                                      MemoryKind::kHost);
    if (!region.ok()) return 1;
    for (int round = 0; round < test_peer::kChurnRounds; ++round) {
      auto peer = transport->Connect(address);
      if (!peer.ok()) {
        std::fprintf(stderr, "peer: round %d: %s\n", round, peer.status().ToString().c_str());
        return 1;
      }
      if (!transport->Send(*peer, test_peer::EncodeRegion((*region)->info())).ok()) return 1;
      // Odd rounds: leave at once, as the parent's first write arrives.
      if (round % 2 == 1) transport->Disconnect(*peer, UnavailableError("the churn peer leaves"));
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return failed.contains(*peer); });
    }
    return 0;
  }
  auto peer = transport->Connect(address);
  if (!peer.ok()) {
    std::fprintf(stderr, "peer: %s\n", peer.status().ToString().c_str());
    return 1;
  }
  auto* bytes = static_cast<uint8_t*>((*buffer)->host_pointer());
  if (mode == "writer") {
    std::memset(bytes, 0x5A, kBufferBytes);  // what a writer writes
  } else if (mode == "receiver") {
    for (size_t i = 0; i < kBufferBytes; ++i) bytes[i] = test_peer::PatternByte(i);
  } else {
    std::memset(bytes, 0, kBufferBytes);  // what a reader overwrites
  }
  const Addr base = Addr::FromPointer((*buffer)->host_pointer());
  auto region = transport->Register(base, kBufferBytes, MemoryKind::kHost);
  if (!region.ok()) return 1;
  if (!transport->Send(*peer, test_peer::Bytes("READY")).ok()) return 1;

  if (mode == "farewell") {
    {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return !region_frame.empty() || dead; });
      if (dead) return 1;
    }
    for (int i = 0; i < test_peer::kFarewellMessages; ++i) {
      if (!transport->Send(*peer, test_peer::Bytes("LAST " + std::to_string(i))).ok()) return 1;
    }
    transport->Shutdown();
    return 0;
  }
  if (mode == "receiver") {
    if (!transport->Send(*peer, test_peer::EncodeRegion((*region)->info())).ok()) return 1;
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return dead; });
    return 0;
  }
  if (reader) {
    if (mode == "reader-denied" && !seccomp) {
      (void)transport->Send(*peer, test_peer::Bytes("NOSECCOMP"));
      return 0;
    }
    auto caps = transport->PeerCaps(*peer);
    const bool readable = caps.ok() && caps->read_remote;
    if (!transport->Send(*peer, test_peer::Bytes(readable ? "CAPS 1" : "CAPS 0")).ok()) return 1;
  }
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return !region_frame.empty() || dead; });
  if (dead) return 1;
  auto info = test_peer::DecodeRegion(region_frame);
  lock.unlock();
  if (!info) return 1;
  auto target = transport->Import(*peer, *info);
  if (!target.ok()) return 1;
  const uint64_t size = std::min<uint64_t>(info->size, kBufferBytes);

  if (reader) {
    // The parent's region into ours, in 4 KiB ranges.
    std::vector<ReadOp> ops;
    for (uint64_t offset = 0; offset < size; offset += 4096) {
      ops.push_back(
          {info->address + offset, base + offset, std::min<uint64_t>(4096, size - offset)});
    }
    std::mutex done_mu;
    std::condition_variable done_cv;
    bool finished = false;
    Status result;
    Status issued = transport->Read(**target, **region, ops,
                                    [&](Status s) {
                                      std::lock_guard<std::mutex> g(done_mu);
                                      result = s;
                                      finished = true;
                                      done_cv.notify_all();
                                    },
                                    {});
    if (issued.ok()) {
      std::unique_lock<std::mutex> g(done_mu);
      done_cv.wait(g, [&] { return finished; });
    } else {
      result = issued;
    }
    bool pattern = true;
    for (uint64_t i = 0; i < size && pattern; ++i) pattern = bytes[i] == test_peer::PatternByte(i);
    const std::string reply =
        "READ " + std::string(StatusCodeName(result.code())) + " " + (pattern ? "1" : "0");
    if (!transport->Send(*peer, test_peer::Bytes(reply)).ok()) return 1;
    lock.lock();
    cv.wait(lock, [&] { return dead; });
    return 0;
  }

  const WriteOp op{base, info->address, size};
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
      if (!transport->Send(*peer, test_peer::Bytes("WROTE")).ok()) return 1;
      announced = true;
    }
  }
}
