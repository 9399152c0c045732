// What process_vm_readv(2) costs on this host: the figures behind the UCX
// transport's read_cost (docs/transports.md, "Reads").
//
//   out/release/bench/read_remote_bench [repeats]
//
// A forked child holds a 256 MiB buffer (touched, so resident) and waits; the
// parent copies from it into a buffer of its own with process_vm_readv, as
// UcxTransport::Read does, in four shapes: one 8-byte range per call (the
// fixed cost of a call), 1024 ranges of 256 B and of 4 KiB per call (ranges
// 4 KiB apart, so every range is a page of its own, as a KV fragment is),
// 1024 adjacent ranges of 256 B per call (marked *: 16 ranges share a page),
// and 1 MiB ranges (one per call). Each shape walks the whole 256 MiB so
// that the copy is from memory, not from the caches, and keeps the fastest
// of `repeats` passes (5 by default). It prints microseconds per call and
// per range and the byte rate.
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

constexpr size_t kBufferBytes = size_t{256} << 20;

struct Shape {
  const char* name;
  size_t range_bytes;
  size_t stride;  // distance between consecutive ranges, both sides
  size_t ranges_per_call;
};

// Seconds for one pass over the buffer in `shape`; < 0 on error.
double Pass(pid_t child, const std::byte* remote, std::byte* local, const Shape& shape) {
  const size_t calls = std::max<size_t>(1, kBufferBytes / (shape.stride * shape.ranges_per_call));
  std::vector<iovec> local_iov(shape.ranges_per_call);
  std::vector<iovec> remote_iov(shape.ranges_per_call);
  const auto start = std::chrono::steady_clock::now();
  for (size_t c = 0; c < calls; ++c) {
    size_t total = 0;
    for (size_t i = 0; i < shape.ranges_per_call; ++i) {
      const size_t offset = ((c * shape.ranges_per_call + i) * shape.stride) % kBufferBytes;
      local_iov[i] = {local + offset, shape.range_bytes};
      remote_iov[i] = {const_cast<std::byte*>(remote + offset), shape.range_bytes};
      total += shape.range_bytes;
    }
    const ssize_t n = process_vm_readv(child, local_iov.data(), local_iov.size(),
                                       remote_iov.data(), remote_iov.size(), 0);
    if (n != static_cast<ssize_t>(total)) {
      std::fprintf(stderr, "process_vm_readv: %zd of %zu bytes: %s\n", n, total,
                   n < 0 ? std::strerror(errno) : "partial");
      return -1;
    }
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) {
  const int repeats = argc > 1 ? std::max(1, std::atoi(argv[1])) : 5;
  auto* remote = static_cast<std::byte*>(std::aligned_alloc(4096, kBufferBytes));
  auto* local = static_cast<std::byte*>(std::aligned_alloc(4096, kBufferBytes));
  if (remote == nullptr || local == nullptr) return 1;
  std::memset(remote, 0x5A, kBufferBytes);  // the child inherits it resident
  int ready[2];
  if (pipe(ready) != 0) return 1;
  const pid_t child = fork();
  if (child < 0) return 1;
  if (child == 0) {
    close(ready[0]);
    std::memset(remote, 0x6B, kBufferBytes);  // its own copy of every page
    const char one = 1;
    if (write(ready[1], &one, 1) != 1) _exit(1);
    pause();
    _exit(0);
  }
  close(ready[1]);
  char byte = 0;
  if (read(ready[0], &byte, 1) != 1) return 1;
  std::memset(local, 0, kBufferBytes);

  const Shape shapes[] = {
      {"8 B x 1", 8, 4096, 1},
      {"256 B x 1024", 256, 4096, 1024},
      {"256 B x 1024 *", 256, 256, 1024},
      {"4 KiB x 1024", 4096, 4096, 1024},
      {"1 MiB x 1", size_t{1} << 20, size_t{1} << 20, 1},
  };
  std::printf("%-16s %12s %12s %10s\n", "ranges/call", "us/call", "us/range", "MB/s");
  int status = 0;
  for (const Shape& shape : shapes) {
    double best = 1e30;
    for (int r = 0; r < repeats; ++r) {
      const double s = Pass(child, remote, local, shape);
      if (s < 0) {
        status = 1;
        break;
      }
      best = std::min(best, s);
    }
    if (status != 0) break;
    const size_t calls =
        std::max<size_t>(1, kBufferBytes / (shape.stride * shape.ranges_per_call));
    const double ranges = static_cast<double>(calls * shape.ranges_per_call);
    const double bytes = ranges * static_cast<double>(shape.range_bytes);
    std::printf("%-16s %12.2f %12.3f %10.0f\n", shape.name, best * 1e6 / static_cast<double>(calls),
                best * 1e6 / ranges, bytes / (best * 1e6));
  }
  kill(child, SIGKILL);
  waitpid(child, nullptr, 0);
  std::free(remote);
  std::free(local);
  return status;
}
