// What the CUDA copy engine moves, against what CUDA itself offers: for
// fragments of 256 B, 4 KiB, 64 KiB and 1 MiB scattered at random over a
// 4 GiB device pool (sources in one half, destinations in the other), the
// engine's rate (a batch of `--batch-mib` MiB, CopySync, wall clock) next to
// one large cudaMemcpyAsync device to device (the ceiling) and, for 4 KiB,
// one cudaMemcpyAsync per fragment. Beside the engine's figure, the kernel
// alone: the same fragments cut into pieces of --piece-kib KiB (the engine's
// 32 by default), their descriptors uploaded once, one launch timed with
// events — what the device does without the host's per-batch work, with
// lane groups sized to the pieces (as the engine launches) and with a warp
// a piece (the kernel before groups), side by side. Also the
// latency of a one-fragment batch (submit to `done`), the engine's fixed
// cost per batch, and where one batch's time goes (the host's steps timed
// apart: checking the list, copying it into pinned memory, uploading it).
// Then tiled lists (blocks of runs, as a session's writer hands them over):
// one batch, several at once on one engine (of one table, and of as many
// tables as batches, as a receiver reading several writers submits them),
// one on each of several engines.
// Prints three tables; exits 0 with a message when there is no
// device.
//
//   out/release/bench/cuda_copy_bench [--pool-gib 4] [--batch-mib 256] [--reps 5]
//                                     [--piece-kib 32] [--launch-pieces N]
//
// GB/s is bytes moved (each byte read once and written once) per second, 1e9.
#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cinttypes>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "copy/copy_engine.h"
#include "copy/cuda/copy_kernel.cuh"
#include "copy/cuda/cuda_copy_engine.h"
#include "copy/cuda/cuda_util.h"
#include "kvbounce/status.h"
#include "kvbounce/types.h"
#include "layout/fragment.h"
#include "layout/tiled_list.h"

namespace kvbounce {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// `count` fragments of `bytes`, at distinct slots of each half of the pool,
// scattered by an odd multiplier (a permutation of the slots, the half
// holding a power of two of them).
std::vector<Fragment> Scattered(uint64_t src_base, uint64_t dst_base, uint64_t half_bytes,
                                uint64_t bytes, uint64_t count) {
  const uint64_t slots = half_bytes / bytes;  // a power of two
  std::vector<Fragment> list(count);
  for (uint64_t i = 0; i < count; ++i) {
    const uint64_t s = (i * 0x9E3779B97F4A7C15ull + 12345) & (slots - 1);
    const uint64_t d = (i * 0xC2B2AE3D27D4EB4Full + 777) & (slots - 1);
    list[i] = Fragment{src_base + s * bytes, dst_base + d * bytes, bytes};
  }
  return list;
}

// The same kind of traffic as a tiled plan list of a session's writer
// (layout/tiled_list.h): blocks of kRunsPerBlock runs of `bytes` (a block
// pair's shape: one head of every layer and K/V, say), the source runs
// kSourceStride apart inside their block (the writer holds more heads),
// the blocks at scattered slots of each half. `blocks` segments, one
// outer offset.
constexpr uint64_t kRunsPerBlock = 64;
constexpr uint64_t kSourceStride = 4;

TiledList ScatteredBlocks(uint64_t src_base, uint64_t dst_base, uint64_t half_bytes, uint64_t bytes,
                          uint64_t blocks) {
  TiledList t;
  t.outer = {TileOffset{src_base, dst_base}};
  const uint64_t src_block = kRunsPerBlock * kSourceStride * bytes;
  const uint64_t dst_block = kRunsPerBlock * bytes;
  TileShape shape{0, kRunsPerBlock, kRunsPerBlock * bytes};
  for (uint64_t r = 0; r < kRunsPerBlock; ++r) {
    t.runs.push_back(Fragment{r * kSourceStride * bytes, r * bytes, bytes});
  }
  t.shapes = {shape};
  const uint64_t src_slots = std::bit_floor(half_bytes / src_block);
  const uint64_t dst_slots = std::bit_floor(half_bytes / dst_block);
  for (uint64_t i = 0; i < blocks; ++i) {
    const uint64_t s = (i * 0x9E3779B97F4A7C15ull + 12345) & (src_slots - 1);
    const uint64_t d = (i * 0xC2B2AE3D27D4EB4Full + 777) & (dst_slots - 1);
    t.segments.push_back(TileSegment{s * src_block, d * dst_block, 0});
  }
  return t;
}

bool Check(const Status& status, const char* what) {
  if (status.ok()) return true;
  std::fprintf(stderr, "cuda_copy_bench: %s: %s\n", what, status.ToString().c_str());
  return false;
}

// Submits every batch at once (batch i to engine i % engines.size()) and
// waits for all; true when every one completed OK.
bool SubmitAllAndWait(const std::vector<CopyBatch>& batches,
                      const std::vector<CudaCopyEngine*>& engines) {
  std::mutex mu;
  std::condition_variable cv;
  size_t left = batches.size();
  bool ok = true;
  for (size_t i = 0; i < batches.size(); ++i) {
    const Status submitted = engines[i % engines.size()]->Submit(batches[i], [&](Status status) {
      std::lock_guard<std::mutex> lock(mu);
      ok = ok && status.ok();
      --left;
      cv.notify_all();
    });
    if (!Check(submitted, "engine submit")) {
      std::lock_guard<std::mutex> lock(mu);
      --left;
      ok = false;
    }
  }
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return left == 0; });
  return ok;
}

// GB/s of `reps` timed calls of `run` moving `bytes` each, after one warm-up.
template <typename F>
double Rate(uint64_t bytes, int reps, F run) {
  if (!run()) return 0;
  const Clock::time_point start = Clock::now();
  for (int r = 0; r < reps; ++r) {
    if (!run()) return 0;
  }
  return static_cast<double>(bytes) * reps / Seconds(start, Clock::now()) / 1e9;
}

int Main(int argc, char** argv) {
  uint64_t pool_gib = 4;
  uint64_t batch_mib = 256;
  int reps = 5;
  uint64_t piece_kib = cuda_copy::kMaxPieceBytes >> 10;
  uint64_t launch_pieces = 0;  // 0: the engine's default
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    const uint64_t value = std::strtoull(argv[i + 1], nullptr, 10);
    if (flag == "--pool-gib") pool_gib = std::max<uint64_t>(value, 1);
    if (flag == "--batch-mib") batch_mib = std::max<uint64_t>(value, 1);
    if (flag == "--reps") reps = static_cast<int>(std::max<uint64_t>(value, 1));
    if (flag == "--piece-kib") piece_kib = std::max<uint64_t>(value, 1);
    if (flag == "--launch-pieces") launch_pieces = value;
  }
  std::string why;
  if (CudaDeviceCount(&why) == 0) {
    std::printf("cuda_copy_bench: skipped: no CUDA device: %s\n", why.c_str());
    return 0;
  }
  cudaDeviceProp prop{};
  if (!Check(CudaStatus(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties"), "device")) {
    return 1;
  }
  CudaCopyEngine::Options engine_options;
  if (launch_pieces > 0) engine_options.max_launch_pieces = static_cast<uint32_t>(launch_pieces);
  Result<std::unique_ptr<CudaCopyEngine>> engine = CudaCopyEngine::Create(engine_options);
  if (!Check(engine.status(), "create engine")) return 1;
  // Each half a power of two, so Scattered's multipliers permute its slots.
  const uint64_t half = std::bit_floor((pool_gib << 30) / 2);
  const uint64_t pool_bytes = 2 * half;
  Result<CudaDeviceBuffer> pool = CudaDeviceBuffer::Allocate(0, pool_bytes);
  if (!Check(pool.status(), "allocate pool")) return 1;
  if (!Check(CudaStatus(cudaMemset(pool->data(), 1, pool_bytes), "cudaMemset"), "fill") ||
      !Check(CudaStatus(cudaDeviceSynchronize(), "cudaDeviceSynchronize"), "fill")) {
    return 1;
  }
  const uint64_t src_base = pool->addr().value();
  const uint64_t dst_base = src_base + half;
  Result<CudaStream> stream = CudaStream::Create(0);
  Result<CudaEvent> start = CudaEvent::Create(0, true, /*timing=*/true);
  Result<CudaEvent> stop = CudaEvent::Create(0, true, /*timing=*/true);
  if (!Check(stream.status(), "stream") || !Check(start.status(), "event") ||
      !Check(stop.status(), "event")) {
    return 1;
  }

  // Times `enqueue` (stream work) with events; GB/s for `bytes`.
  auto stream_rate = [&](uint64_t bytes, auto enqueue) -> double {
    double best_ms = 0;
    for (int r = 0; r <= reps; ++r) {
      if (!Check(CudaStatus(cudaEventRecord(start->get(), stream->get()), "cudaEventRecord"), "t"))
        return 0;
      if (!enqueue()) return 0;
      if (!Check(CudaStatus(cudaEventRecord(stop->get(), stream->get()), "cudaEventRecord"), "t") ||
          !Check(CudaStatus(cudaEventSynchronize(stop->get()), "cudaEventSynchronize"), "t"))
        return 0;
      float ms = 0;
      if (!Check(CudaStatus(cudaEventElapsedTime(&ms, start->get(), stop->get()),
                            "cudaEventElapsedTime"),
                 "t")) {
        return 0;
      }
      if (r > 0 && (best_ms == 0 || ms < best_ms)) best_ms = ms;  // r == 0: warm-up
    }
    return static_cast<double>(bytes) / (best_ms * 1e-3) / 1e9;
  };

  const uint64_t big = std::min<uint64_t>(uint64_t{1} << 30, half);
  const double ceiling = stream_rate(big, [&] {
    return Check(CudaStatus(cudaMemcpyAsync(reinterpret_cast<void*>(dst_base),
                                            reinterpret_cast<void*>(src_base), big,
                                            cudaMemcpyDeviceToDevice, stream->get()),
                            "cudaMemcpyAsync"),
                 "ceiling");
  });

  // One-fragment batch latency: Submit to `done`.
  const std::vector<Fragment> one = {{src_base, dst_base, 256}};
  constexpr int kLatencyReps = 2000;
  (void)(*engine)->Copy(one);
  const Clock::time_point t0 = Clock::now();
  for (int i = 0; i < kLatencyReps; ++i) {
    if (!Check((*engine)->Copy(one), "latency")) return 1;
  }
  const double batch_us = Seconds(t0, Clock::now()) / kLatencyReps * 1e6;
  // The same with its descriptor uploaded (an engine that puts no batch in
  // the kernel's parameters).
  double uploaded_us = 0;
  {
    CudaCopyEngine::Options no_inline = engine_options;
    no_inline.max_inline_pieces = 0;
    Result<std::unique_ptr<CudaCopyEngine>> other = CudaCopyEngine::Create(no_inline);
    if (!Check(other.status(), "create engine")) return 1;
    (void)(*other)->Copy(one);
    const Clock::time_point t1 = Clock::now();
    for (int i = 0; i < kLatencyReps; ++i) {
      if (!Check((*other)->Copy(one), "latency")) return 1;
    }
    uploaded_us = Seconds(t1, Clock::now()) / kLatencyReps * 1e6;
  }

  // Where a one-fragment round trip goes: the floor (this thread launches
  // the inline kernel, records an event and polls it, as the engine's
  // thread does) against an engine whose thread polls for batches
  // (poll_before_sleep, as an agent with poll_before_sleep_us sets it),
  // submitted with a `done` this thread polls for.
  double floor_us = 0;
  double polling_us = 0;
  double chunk_mapped_us = 0;    // 512 fragments of 4 KiB, descriptors read mapped
  double chunk_uploaded_us = 0;  // the same, uploaded first
  double rows_mapped_us = 0;     // 4096 fragments of 512 B, read mapped
  double rows_uploaded_us = 0;   // the same, uploaded first
  {
    // µs per call of `call` (false: it failed; then 0), after one warm-up call.
    const auto mean_us = [](const auto& call) -> double {
      if (!call()) return 0;
      const Clock::time_point t = Clock::now();
      for (int i = 0; i < kLatencyReps; ++i) {
        if (!call()) return 0;
      }
      return Seconds(t, Clock::now()) / kLatencyReps * 1e6;
    };
    cuda_copy::InlineLaunch launch{};
    launch.src_base = src_base;
    launch.dst_base = dst_base;
    launch.count = 1;
    launch.pieces[0] = cuda_copy::PieceDescriptor{0, 0, 256};
    const auto once = [&]() -> bool {
      if (!Check(CudaStatus(cuda_copy::LaunchInlineCopy(launch, stream->get()), "inline launch"),
                 "floor") ||
          !Check(CudaStatus(cudaEventRecord(stop->get(), stream->get()), "cudaEventRecord"),
                 "floor")) {
        return false;
      }
      cudaError_t polled;
      while ((polled = cudaEventQuery(stop->get())) == cudaErrorNotReady) {
      }
      return Check(CudaStatus(polled, "cudaEventQuery"), "floor");
    };
    floor_us = mean_us(once);
    if (floor_us == 0) return 1;

    // A chunk's copy: 2 MiB in 512 fragments of 4 KiB, or 4096 of 512 B,
    // each source a fragment apart.
    const auto chunk_of = [&](uint64_t n, uint64_t bytes) {
      std::vector<Fragment> list;
      for (uint64_t i = 0; i < n; ++i) {
        list.push_back(Fragment{src_base + 2 * i * bytes, dst_base + i * bytes, bytes});
      }
      return list;
    };
    const std::vector<Fragment> chunk = chunk_of(512, KiB(4));
    const std::vector<Fragment> rows = chunk_of(4096, 512);
    const auto polled_round_trip = [&](uint32_t max_mapped_pieces,
                                       std::span<const Fragment> list) -> double {
      CudaCopyEngine::Options polling = engine_options;
      polling.poll_before_sleep = std::chrono::microseconds(200);
      polling.max_mapped_pieces = max_mapped_pieces;
      Result<std::unique_ptr<CudaCopyEngine>> other = CudaCopyEngine::Create(polling);
      if (!Check(other.status(), "create engine")) return 0;
      std::atomic<int> finished{0};
      const auto submit = [&]() -> bool {
        finished.store(0, std::memory_order_relaxed);
        if (!Check((*other)->Submit(DirectBatch(list), [&](Status) { finished.store(1); }),
                   "submit")) {
          return false;
        }
        while (finished.load() == 0) {
        }
        return true;
      };
      return mean_us(submit);
    };
    polling_us = polled_round_trip(engine_options.max_mapped_pieces, one);
    chunk_mapped_us = polled_round_trip(4096, chunk);
    chunk_uploaded_us = polled_round_trip(0, chunk);
    rows_mapped_us = polled_round_trip(4096, rows);
    rows_uploaded_us = polled_round_trip(0, rows);
    if (polling_us == 0 || chunk_mapped_us == 0 || chunk_uploaded_us == 0 || rows_mapped_us == 0 ||
        rows_uploaded_us == 0) {
      return 1;
    }
  }

  std::printf("device: %s, %d SMs; pool %" PRIu64 " GiB; batch %" PRIu64 " MiB; engine: mean of %d, CUDA: best of as many\n",
              prop.name, prop.multiProcessorCount, pool_gib, batch_mib, reps);
  std::printf("ceiling (one %" PRIu64 " MiB cudaMemcpyAsync, device to device): %.0f GB/s\n",
              big >> 20, ceiling);
  std::printf(
      "engine batch of one 256 B fragment, Copy() round trip: %.1f us (its descriptor "
      "uploaded instead of in the kernel's parameters: %.1f us); polled at both ends: %.1f us, "
      "where one thread's launch, event and poll take %.1f us\n",
      batch_us, uploaded_us, polling_us, floor_us);
  std::printf(
      "engine batch of 512 fragments of 4 KiB, polled at both ends: %.1f us with the descriptors "
      "read mapped, %.1f us uploaded first; of 4096 fragments of 512 B: %.1f us and %.1f us\n\n",
      chunk_mapped_us, chunk_uploaded_us, rows_mapped_us, rows_uploaded_us);
  std::printf(
      "| fragment | fragments | engine GB/s | %% of ceiling | engine, 4 batches at once | "
      "kernel alone GB/s (%" PRIu64
      " KiB pieces) | %% of ceiling | kernel alone, a warp a piece | cudaMemcpyAsync per "
      "fragment GB/s |\n",
      piece_kib);
  std::printf("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  int max_blocks = 0;
  {
    int threads_per_sm = 0;
    cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, 0);
    max_blocks =
        prop.multiProcessorCount * std::max(1, threads_per_sm / cuda_copy::kThreadsPerBlock);
  }
  // Where one batch's time goes, per fragment size (printed after the table).
  std::vector<std::string> phases;
  Result<CudaPinnedBuffer> staging = CudaPinnedBuffer::Allocate(
      std::min<uint64_t>((batch_mib << 20) / 256, half / 256) * sizeof(Fragment));
  if (!Check(staging.status(), "allocate staging")) return 1;
  for (const uint64_t bytes : {uint64_t{256}, KiB(4), KiB(64), MiB(1)}) {
    const uint64_t count = std::min<uint64_t>((batch_mib << 20) / bytes, half / bytes);
    const std::vector<Fragment> list = Scattered(src_base, dst_base, half, bytes, count);
    const uint64_t total = count * bytes;
    const double engine_rate = Rate(total, reps, [&] {
      return Check((*engine)->Copy(list), "engine copy");
    });
    // The same bytes as four batches submitted at once (as a session with
    // several requests in flight submits them): one batch's fixed costs
    // (the hand-offs, the launch calls, the wait) overlap another's copy.
    const double overlapped_rate = Rate(total, reps, [&] {
      std::vector<CopyBatch> quarters;
      const size_t quarter = list.size() / 4;
      for (size_t q = 0; q < 4; ++q) {
        quarters.push_back(DirectBatch(std::span<const Fragment>(
            list.data() + q * quarter, q == 3 ? list.size() - 3 * quarter : quarter)));
      }
      return SubmitAllAndWait(quarters, {engine->get()});
    });
    std::string per_call = "-";
    if (bytes == KiB(4)) {
      constexpr uint64_t kCalls = 4096;
      const double rate = stream_rate(kCalls * bytes, [&] {
        for (uint64_t i = 0; i < kCalls; ++i) {
          if (!Check(CudaStatus(cudaMemcpyAsync(reinterpret_cast<void*>(list[i].dst),
                                                reinterpret_cast<void*>(list[i].src), bytes,
                                                cudaMemcpyDeviceToDevice, stream->get()),
                                "cudaMemcpyAsync"),
                     "per fragment")) {
            return false;
          }
        }
        return true;
      });
      char text[32];
      std::snprintf(text, sizeof(text), "%.1f (%" PRIu64 " calls)", rate, kCalls);
      per_call = text;
    }
    // The kernel alone: pieces cut as the engine cuts them, uploaded once.
    std::vector<cuda_copy::PieceDescriptor> pieces;
    for (const Fragment& f : list) {
      for (uint64_t at = 0; at < f.bytes; at += piece_kib << 10) {
        pieces.push_back({f.src + at, f.dst + at, std::min(piece_kib << 10, f.bytes - at)});
      }
    }
    double kernel_rate = 0;
    double kernel_warp_rate = 0;
    Result<CudaDeviceBuffer> descriptors =
        CudaDeviceBuffer::Allocate(0, pieces.size() * sizeof(cuda_copy::PieceDescriptor));
    if (Check(descriptors.status(), "allocate descriptors") &&
        Check(CudaStatus(cudaMemcpy(descriptors->data(), pieces.data(),
                                    pieces.size() * sizeof(cuda_copy::PieceDescriptor),
                                    cudaMemcpyHostToDevice),
                         "cudaMemcpy(descriptors)"),
              "upload")) {
      // Groups sized to the pieces (the engine's launch), and a warp a
      // piece whatever their size (the kernel before groups), A/B.
      const auto kernel_with = [&](uint64_t max_piece_bytes) {
        return stream_rate(total, [&] {
          return Check(
              CudaStatus(cuda_copy::LaunchBatchedCopy(
                             static_cast<const cuda_copy::PieceDescriptor*>(descriptors->data()),
                             static_cast<uint32_t>(pieces.size()), 0, 0,
                             static_cast<uint32_t>(max_blocks), stream->get(), max_piece_bytes),
                         "kernel launch"),
              "kernel alone");
        });
      };
      kernel_rate = kernel_with(std::min(bytes, piece_kib << 10));
      kernel_warp_rate = kernel_with(cuda_copy::kMaxPieceBytes);
    }
    // The host's steps of the same batch, timed apart (best of reps):
    // checking it as Submit does, copying its fragments into pinned memory
    // (the engine's staging of a list of small fragments), uploading them.
    double validate_us = 0;
    double stage_us = 0;
    double upload_us = 0;
    for (int r = 0; r < reps && descriptors.ok(); ++r) {
      uint64_t checked = 0;
      const Clock::time_point start_check = Clock::now();
      if (!Check(ValidateCopyBatch(DirectBatch(list), &checked), "validate")) return 1;
      const Clock::time_point t1 = Clock::now();
      std::memcpy(staging->data(), list.data(), list.size() * sizeof(Fragment));
      const Clock::time_point t2 = Clock::now();
      if (!Check(CudaStatus(cudaMemcpyAsync(descriptors->data(), staging->data(),
                                            list.size() * sizeof(Fragment), cudaMemcpyHostToDevice,
                                            stream->get()),
                            "cudaMemcpyAsync(upload)"),
                 "upload") ||
          !Check(CudaStatus(cudaStreamSynchronize(stream->get()), "cudaStreamSynchronize"),
                 "upload")) {
        return 1;
      }
      const Clock::time_point t3 = Clock::now();
      const auto best = [r](double& slot, Clock::time_point a, Clock::time_point b) {
        const double us = Seconds(a, b) * 1e6;
        if (r == 0 || us < slot) slot = us;
      };
      best(validate_us, start_check, t1);
      best(stage_us, t1, t2);
      best(upload_us, t2, t3);
    }
    char phase[256];
    std::snprintf(phase, sizeof(phase),
                  "| %" PRIu64 " B | %" PRIu64 " | %.0f | %.0f | %.0f | %.0f | %.0f |", bytes,
                  count, validate_us, stage_us, upload_us,
                  kernel_rate > 0 ? static_cast<double>(total) / kernel_rate / 1e3 : 0.0,
                  engine_rate > 0 ? static_cast<double>(total) / engine_rate / 1e3 : 0.0);
    phases.push_back(phase);
    std::printf("| %" PRIu64 " B | %" PRIu64
                " | %.0f | %.0f%% | %.0f (%.0f%%) | %.0f | %.0f%% | %.0f (%.0f%%) | %s |\n",
                bytes, count, engine_rate, ceiling > 0 ? 100.0 * engine_rate / ceiling : 0.0,
                overlapped_rate, ceiling > 0 ? 100.0 * overlapped_rate / ceiling : 0.0, kernel_rate,
                ceiling > 0 ? 100.0 * kernel_rate / ceiling : 0.0, kernel_warp_rate,
                ceiling > 0 ? 100.0 * kernel_warp_rate / ceiling : 0.0, per_call.c_str());
  }
  // Tiled lists (what the sessions hand this engine): one batch at a
  // time; kWriters batches at once on one engine; one batch on each of
  // kWriters engines at once (a request's writers in one process, each
  // rank an agent with its engine).
  constexpr int kWriters = 8;
  std::vector<std::unique_ptr<CudaCopyEngine>> writers;
  for (int i = 0; i < kWriters; ++i) {
    Result<std::unique_ptr<CudaCopyEngine>> e = CudaCopyEngine::Create(engine_options);
    if (!Check(e.status(), "create engine")) return 1;
    writers.push_back(std::move(e).value());
  }
  // Every tiled list of `lists` at once (list i on engine i % engines.size()).
  const auto run_all = [](const std::vector<TiledList>& lists,
                          const std::vector<CudaCopyEngine*>& engines) {
    std::vector<CopyBatch> batches;
    for (const TiledList& list : lists) batches.push_back(DirectBatch(list));
    return SubmitAllAndWait(batches, engines);
  };
  std::vector<std::string> tiled_rows;
  for (const uint64_t bytes : {uint64_t{256}, KiB(4), KiB(64)}) {
    const uint64_t blocks = std::max<uint64_t>(1, (batch_mib << 20) / (kRunsPerBlock * bytes));
    const uint64_t total = blocks * kRunsPerBlock * bytes;
    const std::vector<TiledList> whole = {ScatteredBlocks(src_base, dst_base, half, bytes, blocks)};
    std::vector<TiledList> parts;
    for (int w = 0; w < kWriters; ++w) {
      TiledList part = whole[0];
      const size_t per = part.segments.size() / kWriters;
      part.segments.assign(whole[0].segments.begin() + static_cast<std::ptrdiff_t>(w * per),
                           w == kWriters - 1 ? whole[0].segments.end()
                                             : whole[0].segments.begin() +
                                                   static_cast<std::ptrdiff_t>((w + 1) * per));
      parts.push_back(std::move(part));
    }
    // The same parts as tables of their own (a receiver reading several
    // writers: each batch another mapping): part w's runs rotated by w,
    // the same copies listed in another order.
    std::vector<TiledList> tables = parts;
    for (size_t w = 0; w < tables.size(); ++w) {
      std::rotate(tables[w].runs.begin(),
                  tables[w].runs.begin() + static_cast<std::ptrdiff_t>(w % tables[w].runs.size()),
                  tables[w].runs.end());
    }
    std::vector<CudaCopyEngine*> many;
    for (auto& e : writers) many.push_back(e.get());
    const double one_batch = Rate(total, reps, [&] { return run_all(whole, {engine->get()}); });
    const double shared = Rate(total, reps, [&] { return run_all(parts, {engine->get()}); });
    const double shared_tables =
        Rate(total, reps, [&] { return run_all(tables, {engine->get()}); });
    const double spread = Rate(total, reps, [&] { return run_all(parts, many); });
    // The tiled kernel alone: the whole list's descriptors uploaded once,
    // one launch timed with events.
    const TiledList& list = whole[0];
    std::vector<cuda_copy::TileSegmentDescriptor> segs;
    for (const TileSegment& seg : list.segments) {
      segs.push_back({seg.src, seg.dst, 0, static_cast<uint32_t>(kRunsPerBlock)});
    }
    double tiled_kernel = 0;
    double tiled_warp = 0;  // a warp a piece, A/B
    const size_t desc_bytes = sizeof(TileOffset) + list.runs.size() * sizeof(Fragment) +
                              segs.size() * sizeof(cuda_copy::TileSegmentDescriptor);
    Result<CudaDeviceBuffer> tiled_desc = CudaDeviceBuffer::Allocate(0, desc_bytes);
    if (Check(tiled_desc.status(), "allocate tiled descriptors")) {
      auto* d = static_cast<std::byte*>(tiled_desc->data());
      cuda_copy::TiledLaunch launch{};
      launch.outer = reinterpret_cast<const cuda_copy::TileOffsetDescriptor*>(d);
      launch.pieces = reinterpret_cast<const cuda_copy::PieceDescriptor*>(d + sizeof(TileOffset));
      launch.segments = reinterpret_cast<const cuda_copy::TileSegmentDescriptor*>(
          d + sizeof(TileOffset) + list.runs.size() * sizeof(Fragment));
      launch.num_outer = 1;
      launch.num_segments = segs.size();
      launch.pieces_per_unit = kRunsPerBlock;
      bool up = Check(
          CudaStatus(cudaMemcpy(d, list.outer.data(), sizeof(TileOffset), cudaMemcpyHostToDevice),
                     "cudaMemcpy"),
          "upload");
      up = up && Check(CudaStatus(cudaMemcpy(const_cast<cuda_copy::PieceDescriptor*>(launch.pieces),
                                             list.runs.data(), list.runs.size() * sizeof(Fragment),
                                             cudaMemcpyHostToDevice),
                                  "cudaMemcpy"),
                       "upload");
      up = up &&
           Check(CudaStatus(
                     cudaMemcpy(const_cast<cuda_copy::TileSegmentDescriptor*>(launch.segments),
                                segs.data(), segs.size() * sizeof(cuda_copy::TileSegmentDescriptor),
                                cudaMemcpyHostToDevice),
                     "cudaMemcpy"),
                 "upload");
      const auto tiled_with = [&](uint64_t max_piece_bytes) {
        launch.max_piece_bytes = max_piece_bytes;
        return stream_rate(total, [&] {
          return Check(CudaStatus(cuda_copy::LaunchTiledCopy(
                                      launch, static_cast<uint32_t>(max_blocks), stream->get()),
                                  "tiled kernel launch"),
                       "tiled kernel alone");
        });
      };
      if (up) {
        tiled_kernel = tiled_with(bytes);
        tiled_warp = tiled_with(cuda_copy::kMaxPieceBytes);
      }
    }
    char row[384];
    std::snprintf(row, sizeof(row),
                  "| %" PRIu64 " B | %" PRIu64
                  " | %.0f (%.0f%%) | %.0f (%.0f%%) | %.0f (%.0f%%) | %.0f (%.0f%%) |"
                  " %.0f (%.0f%%) | %.0f (%.0f%%) |",
                  bytes, blocks * kRunsPerBlock, one_batch,
                  ceiling > 0 ? 100.0 * one_batch / ceiling : 0.0, shared,
                  ceiling > 0 ? 100.0 * shared / ceiling : 0.0, shared_tables,
                  ceiling > 0 ? 100.0 * shared_tables / ceiling : 0.0, spread,
                  ceiling > 0 ? 100.0 * spread / ceiling : 0.0, tiled_kernel,
                  ceiling > 0 ? 100.0 * tiled_kernel / ceiling : 0.0, tiled_warp,
                  ceiling > 0 ? 100.0 * tiled_warp / ceiling : 0.0);
    tiled_rows.push_back(row);
  }
  std::printf("\nTiled lists (blocks of %" PRIu64 " runs), GB/s: one batch of %" PRIu64
              " MiB; %d batches of 1/%d at once on one engine, of one table and of %d tables;"
              " one each on %d engines\n\n",
              kRunsPerBlock, batch_mib, kWriters, kWriters, kWriters, kWriters);
  std::printf(
      "| run | runs | one batch | %d on one engine | %d tables, one engine | %d engines |"
      " kernel alone | kernel alone, a warp a piece |\n",
      kWriters, kWriters, kWriters);
  std::printf("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  for (const std::string& row : tiled_rows) std::printf("%s\n", row.c_str());

  std::printf(
      "\nOne batch, us: the host's steps timed apart (best of %d), the kernel alone and "
      "the engine (Submit to `done`)\n\n",
      reps);
  std::printf(
      "| fragment | fragments | check (Submit) | copy into pinned | upload | kernel | "
      "engine |\n");
  std::printf("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  for (const std::string& row : phases) std::printf("%s\n", row.c_str());
  const CudaCopyEngine::Stats stats = (*engine)->GetStats();
  std::printf("\nengine: %" PRIu64 " batches, %" PRIu64 " launches, %" PRIu64 " failed\n",
              stats.batches_completed, stats.launches, stats.batches_failed);
  return stats.batches_failed == 0 ? 0 : 1;
}

}  // namespace
}  // namespace kvbounce

int main(int argc, char** argv) { return kvbounce::Main(argc, argv); }
