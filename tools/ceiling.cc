#include "tools/ceiling.h"

#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>
#include <thread>
#include <vector>

#include "common/copy_bytes.h"
#include "common/memcpy_rate.h"
#include "layout/planner.h"
#include "tools/cluster.h"
#include "tools/device_rows.h"
#include "tools/subprocess.h"

namespace kvbounce::tools {
namespace {

// A TCP port nothing listens on now (the kernel's pick for port 0).
int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return 0;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  int port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
    port = ntohs(a.sin_port);
  }
  close(fd);
  return port;
}

Result<std::string> FindOnPath(const std::string& program) {
  const char* path = std::getenv("PATH");
  std::stringstream dirs(path != nullptr ? path : "/usr/bin:/bin");
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    const std::string candidate = (dir.empty() ? "." : dir) + "/" + program;
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return NotFoundError(program + " is not on PATH (Debian: apt-get install ucx-utils)");
}

// Reads `child` until it exits or `deadline`; returns its lines.
Result<std::vector<std::string>> ReadAll(Child& child, SteadyClock::time_point deadline) {
  std::vector<std::string> lines;
  while (!child.eof()) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - SteadyClock::now());
    if (left.count() <= 0) {
      return DeadlineExceededError("ucx_perftest took over a minute");
    }
    pollfd p{child.fd(), POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(std::min<int64_t>(left.count(), 200))) > 0) child.ReadSome();
    while (std::optional<std::string> line = child.NextLine()) lines.push_back(*line);
  }
  while (std::optional<std::string> line = child.NextLine()) lines.push_back(*line);
  child.Reap(deadline);
  return lines;
}

// One server/client pair of put size `bytes`: bytes per second, from the
// client's "Final:" line (overall bandwidth, in MiB/s).
Result<double> PerftestOnce(const std::string& exe, const std::string& ucx_tls, size_t bytes,
                            int iterations) {
  const int port = FreePort();
  if (port == 0) return UnavailableError("no free TCP port for ucx_perftest");
  std::vector<std::string> common = {
      "-t", "ucp_put_bw",        "-s", std::to_string(bytes), "-n", std::to_string(iterations),
      "-p", std::to_string(port)};
  Child::Options server;
  server.executable = exe;
  server.args = common;
  server.name = "ucx_perftest server";
  if (!ucx_tls.empty()) server.env.emplace_back("UCX_TLS", ucx_tls);
  KVB_ASSIGN_OR_RETURN(std::unique_ptr<Child> srv, Child::Spawn(server));
  const auto deadline = SteadyClock::now() + std::chrono::minutes(1);
  std::string last = "(no output)";
  // The server listens a moment after it starts: the client retries.
  for (int attempt = 0; attempt < 20; ++attempt) {
    Child::Options client = server;
    client.name = "ucx_perftest client";
    client.args.insert(client.args.begin(), "127.0.0.1");
    KVB_ASSIGN_OR_RETURN(std::unique_ptr<Child> cli, Child::Spawn(client));
    KVB_ASSIGN_OR_RETURN(std::vector<std::string> lines, ReadAll(*cli, deadline));
    for (const std::string& line : lines) {
      if (!line.empty()) last = line;
      if (line.rfind("Final:", 0) != 0) continue;
      std::istringstream in(line.substr(6));
      std::vector<double> v;
      double x = 0;
      while (in >> x) v.push_back(x);
      if (v.size() < 6 || !(v[5] > 0)) break;
      srv->Reap(SteadyClock::now() + std::chrono::seconds(5));
      return v[5] * 1048576.0;
    }
    if (srv->reaped() || SteadyClock::now() >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return UnavailableError("ucx_perftest measured nothing: " + last);
}

}  // namespace

Result<Ceiling> MeasureDeviceCeiling(int device) {
#if KVBOUNCE_HAVE_CUDA
  KVB_ASSIGN_OR_RETURN(std::unique_ptr<DeviceRowKernels> kernels, DeviceRowKernels::Create(device));
  KVB_ASSIGN_OR_RETURN(double rate, kernels->MeasureCopyCeiling(kDeviceCeilingBytes, 20));
  return Ceiling{"one cudaMemcpyAsync of " + std::to_string(kDeviceCeilingBytes >> 20) +
                     " MiB, device to device",
                 rate / 1e9};
#else
  (void)device;
  return UnimplementedError("a device copy ceiling needs a build with CUDA");
#endif
}

Result<Ceiling> MeasureLinkCeiling(int src_device, int dst_device) {
  if (src_device == dst_device) return MeasureDeviceCeiling(src_device);
#if KVBOUNCE_HAVE_CUDA
  bool peer_access = false;
  KVB_ASSIGN_OR_RETURN(double rate, MeasurePeerCopyCeiling(src_device, dst_device,
                                                           kDeviceCeilingBytes, 20, &peer_access));
  return Ceiling{
      "one cudaMemcpyPeerAsync of " + std::to_string(kDeviceCeilingBytes >> 20) + " MiB, device " +
          std::to_string(src_device) + " to device " + std::to_string(dst_device) +
          (peer_access ? " (peer access on)" : " (no peer access: staged by the driver)"),
      rate / 1e9};
#else
  return UnimplementedError("a device link ceiling needs a build with CUDA");
#endif
}

Ceiling HostMemcpyCeiling() {
  return Ceiling{"one thread's memcpy of a few MiB, caches evicted", MemcpyBytesPerUs() / 1e3};
}

Result<FragmentList> RequestFragments(Cluster& cluster, const BlockTables& tables,
                                      TokenRange range) {
  FragmentList all;
  const int slot = tables.slot;
  for (int w = 0; w < cluster.num_ctx(); ++w) {
    const RankHarness& ctx = cluster.ctx_harness(tables.ctx_instance, w);
    PlanSide writer{&cluster.ctx_topology(), w, &ctx.layout(), tables.ctx, ctx.state_layout(),
                    ctx.StateSlot(slot)};
    for (int g = 0; g < cluster.num_gen(); ++g) {
      const RankHarness& gen = cluster.harness(false, g);
      PlanSide receiver{&cluster.gen_topology(), g, &gen.layout(), tables.gen, gen.state_layout(),
                        gen.StateSlot(slot)};
      KVB_ASSIGN_OR_RETURN(PairPlan plan, PlanPair(writer, receiver, range, kPlanDirect));
      all.insert(all.end(), plan.direct.begin(), plan.direct.end());
    }
  }
  return all;
}

double CopyFragmentsInParallel(std::span<const Fragment> fragments, int threads) {
  uint64_t total = 0;
  for (const Fragment& f : fragments) total += f.bytes;
  // Cut points: each thread takes a contiguous range of about total/threads
  // bytes (the lists run through the pools in order, as a copy engine's do).
  std::vector<size_t> cuts = {0};
  uint64_t sum = 0;
  for (size_t i = 0; i < fragments.size() && static_cast<int>(cuts.size()) < threads; ++i) {
    sum += fragments[i].bytes;
    if (sum * static_cast<uint64_t>(threads) >= total * cuts.size()) cuts.push_back(i + 1);
  }
  cuts.push_back(fragments.size());
  const auto copy = [fragments](size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i) {
      const Fragment& f = fragments[i];
      CopyBytes(reinterpret_cast<void*>(f.dst), reinterpret_cast<const void*>(f.src), f.bytes);
    }
  };
  const auto start = SteadyClock::now();
  {
    std::vector<std::jthread> workers;
    for (size_t t = 1; t + 1 < cuts.size(); ++t) workers.emplace_back(copy, cuts[t], cuts[t + 1]);
    copy(cuts[0], cuts[1]);
  }
  return std::chrono::duration<double>(SteadyClock::now() - start).count();
}

Result<Ceiling> MeasureScatteredCopyCeiling(Cluster& cluster, TokenRange range, int slots,
                                            int threads) {
  if (threads < 1) {
    return InvalidArgumentError("scattered copy ceiling: threads = " + std::to_string(threads) +
                                ": must be >= 1");
  }
  if (cluster.options().memory != MemoryKind::kHost) {
    return InvalidArgumentError("scattered copy ceiling: host pools only");
  }
  FragmentList all;
  uint64_t bytes = 0;
  std::mt19937_64 rng(7);
  for (int slot = 0; slot < slots; ++slot) {
    KVB_ASSIGN_OR_RETURN(FragmentList one,
                         RequestFragments(cluster, cluster.Tables(slot, range.end, rng), range));
    for (const Fragment& f : one) bytes += f.bytes;
    all.insert(all.end(), one.begin(), one.end());
  }
  // A first round warms the pages and caches up; the best of the others
  // counts (at least two, more while a round takes under 100 ms).
  CopyFragmentsInParallel(all, threads);
  double best = 0;
  for (int round = 0; round < 2 || (round < 8 && best < 0.1); ++round) {
    const double seconds = CopyFragmentsInParallel(all, threads);
    if (best == 0 || seconds < best) best = seconds;
  }
  const double gbps = best > 0 ? static_cast<double>(bytes) / best / 1e9 : 0;
  return Ceiling{"the requests' own fragments copied by " + std::to_string(threads) +
                     " threads (a plain copy each, a wave of " + std::to_string(slots) + ")",
                 gbps};
}

Result<Ceiling> MeasureUcxPutCeiling(const std::string& ucx_tls) {
  KVB_ASSIGN_OR_RETURN(std::string exe, FindOnPath("ucx_perftest"));
  double best = 0;
  for (const auto& [bytes, iterations] : {std::pair<size_t, int>{size_t{256} << 10, 512},
                                          std::pair<size_t, int>{size_t{16} << 20, 8}}) {
    KVB_ASSIGN_OR_RETURN(double rate, PerftestOnce(exe, ucx_tls, bytes, iterations));
    best = std::max(best, rate);
  }
  return Ceiling{"ucx_perftest ucp_put_bw between two processes on 127.0.0.1" +
                     (ucx_tls.empty() ? std::string() : " (UCX_TLS=" + ucx_tls + ")") +
                     ", best of 256 KiB and 16 MiB puts",
                 best / 1e9};
}

Result<Ceiling> MeasureCeiling(const std::string& transport, const std::string& memory, int device,
                               const std::string& ucx_tls) {
  if (transport == "ucx") return MeasureUcxPutCeiling(ucx_tls);
  if (memory == "cuda") return MeasureDeviceCeiling(device);
  return HostMemcpyCeiling();
}

}  // namespace kvbounce::tools
