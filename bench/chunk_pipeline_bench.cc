// What ordering a streamed device request's chunks on the device itself
// would give (docs/cuda.md, "Not yet": streaming device pools). A writer's
// packed stream of --chunks chunks of --chunk-mib MiB, gathered from
// fragments of --frag-kib KiB scattered over a device pool into --slots
// chunk slots and scattered from there into fragments scattered over
// another part of the pool, with the copy engine's batched kernel (one
// launch a chunk and pass, lists uploaded beforehand), three ways:
//
//   host round trips  each gather and each scatter launched once the host
//                     saw the one before it complete (cudaEventSynchronize):
//                     the least a host-driven credit loop costs, before its
//                     frames and hand-offs;
//   device-ordered    every launch enqueued at once on two streams: chunk k's
//                     gather waits on the device (cuStreamWaitValue32) for
//                     the scatter that frees its slot to have written a
//                     credit word, and its scatter for the gather to have
//                     written a ready word (cuStreamWriteValue32);
//   one slot          the whole stream gathered into one slot and scattered
//                     from it: two launches, the rate a request-sized arena
//                     gives.
//
// Every way is checked byte for byte against the source. Prints a table, or
// a skip message without a device.
//
//   out/release/bench/chunk_pipeline_bench [--chunk-mib 2] [--chunks 16] [--frag-kib 4]
//                                          [--slots 1] [--reps 20]
//
// GB/s is the stream's bytes (each gathered once and scattered once) per
// second of the median repetition, 1e9.
#include <cuda.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "copy/cuda/copy_kernel.cuh"
#include "copy/cuda/cuda_util.h"
#include "kvbounce/status.h"

namespace kvbounce {
namespace {

using Clock = std::chrono::steady_clock;
using cuda_copy::PieceDescriptor;

using WaitValueFn = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
using WriteValueFn = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);

bool Check(const Status& status, const char* what) {
  if (status.ok()) return true;
  std::fprintf(stderr, "chunk_pipeline_bench: %s: %s\n", what, status.ToString().c_str());
  return false;
}

bool CheckDriver(CUresult result, const char* what) {
  if (result == CUDA_SUCCESS) return true;
  std::fprintf(stderr, "chunk_pipeline_bench: %s: CUresult %d\n", what, static_cast<int>(result));
  return false;
}

template <typename Fn>
bool LoadDriverEntryPoint(const char* symbol, Fn* fn) {
  void* pointer = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  if (!Check(CudaStatus(cudaGetDriverEntryPointByVersion(symbol, &pointer, 12000, cudaEnableDefault,
                                                         &found),
                        "cudaGetDriverEntryPointByVersion"),
             symbol)) {
    return false;
  }
  if (found != cudaDriverEntryPointSuccess || pointer == nullptr) {
    std::fprintf(stderr, "chunk_pipeline_bench: the driver has no %s\n", symbol);
    return false;
  }
  *fn = reinterpret_cast<Fn>(pointer);
  return true;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int Main(int argc, char** argv) {
  uint64_t chunk_mib = 2;
  uint64_t chunks = 16;
  uint64_t frag_kib = 4;
  uint64_t slots = 1;
  int reps = 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    const uint64_t value = std::strtoull(argv[i + 1], nullptr, 10);
    if (flag == "--chunk-mib") chunk_mib = std::clamp<uint64_t>(value, 1, 256);
    if (flag == "--chunks") chunks = std::clamp<uint64_t>(value, 1, 4096);
    if (flag == "--frag-kib") frag_kib = std::clamp<uint64_t>(value, 1, 1024);
    if (flag == "--slots") slots = std::max<uint64_t>(value, 1);
    if (flag == "--reps") reps = static_cast<int>(std::clamp<uint64_t>(value, 1, 10000));
  }
  const uint64_t chunk_bytes = chunk_mib << 20;
  const uint64_t frag = frag_kib << 10;
  if (chunk_bytes % frag != 0) {
    std::fprintf(stderr, "chunk_pipeline_bench: --chunk-mib must be a multiple of --frag-kib\n");
    return 2;
  }
  slots = std::min(slots, chunks);
  std::string why;
  if (CudaDeviceCount(&why) == 0) {
    std::printf("chunk_pipeline_bench: skipped: no CUDA device: %s\n", why.c_str());
    return 0;
  }
  WaitValueFn wait_value = nullptr;
  WriteValueFn write_value = nullptr;
  if (!LoadDriverEntryPoint("cuStreamWaitValue32", &wait_value) ||
      !LoadDriverEntryPoint("cuStreamWriteValue32", &write_value)) {
    return 1;
  }
  int sms = 0;
  int threads_per_sm = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, 0);
  const auto max_blocks = static_cast<uint32_t>(
      std::max(1, sms) * std::max(1, threads_per_sm / cuda_copy::kThreadsPerBlock));

  // The pool: the source fragments' region, the destination's, and the
  // slots (the whole stream's worth for the one-slot way). Fragments sit
  // at random places of twice the stream, as a paged pool's blocks do.
  const uint64_t total = chunk_bytes * chunks;
  const uint64_t frags = total / frag;
  const uint64_t per_chunk = chunk_bytes / frag;
  const uint64_t region = 2 * total;
  Result<CudaDeviceBuffer> pool = CudaDeviceBuffer::Allocate(0, 2 * region + total);
  Result<CudaDeviceBuffer> words = CudaDeviceBuffer::Allocate(0, 2 * sizeof(uint32_t));
  if (!Check(pool.status(), "allocate pool") || !Check(words.status(), "allocate words")) return 1;
  const uint64_t src_region = pool->addr().value();
  const uint64_t dst_region = src_region + region;
  const uint64_t slot_base = dst_region + region;
  const auto credit_word = static_cast<CUdeviceptr>(words->addr().value());
  const auto ready_word = credit_word + sizeof(uint32_t);

  std::mt19937_64 rng(42);
  std::vector<uint64_t> src_at(2 * frags);
  std::vector<uint64_t> dst_at(2 * frags);
  std::iota(src_at.begin(), src_at.end(), 0);
  std::iota(dst_at.begin(), dst_at.end(), 0);
  std::shuffle(src_at.begin(), src_at.end(), rng);
  std::shuffle(dst_at.begin(), dst_at.end(), rng);
  // Gather lists: source offset in its region, destination offset in the
  // slot; scatter lists the other way round. Per chunk, then whole.
  std::vector<PieceDescriptor> gather(frags);
  std::vector<PieceDescriptor> scatter(frags);
  std::vector<PieceDescriptor> gather_whole(frags);
  std::vector<PieceDescriptor> scatter_whole(frags);
  for (uint64_t i = 0; i < frags; ++i) {
    const uint64_t in_chunk = (i % per_chunk) * frag;
    gather[i] = {src_at[i] * frag, in_chunk, frag};
    scatter[i] = {in_chunk, dst_at[i] * frag, frag};
    gather_whole[i] = {src_at[i] * frag, i * frag, frag};
    scatter_whole[i] = {i * frag, dst_at[i] * frag, frag};
  }
  const size_t list_bytes = frags * sizeof(PieceDescriptor);
  Result<CudaDeviceBuffer> lists = CudaDeviceBuffer::Allocate(0, 4 * list_bytes);
  if (!Check(lists.status(), "allocate lists")) return 1;
  auto* dev_lists = static_cast<PieceDescriptor*>(lists->data());
  PieceDescriptor* dev_gather = dev_lists;
  PieceDescriptor* dev_scatter = dev_lists + frags;
  PieceDescriptor* dev_gather_whole = dev_lists + 2 * frags;
  PieceDescriptor* dev_scatter_whole = dev_lists + 3 * frags;
  // The source holds its byte offset's low bits, a different pattern per
  // fragment slot, so a misplaced fragment shows.
  std::vector<uint32_t> pattern(region / sizeof(uint32_t));
  for (size_t i = 0; i < pattern.size(); ++i) pattern[i] = static_cast<uint32_t>(i * 2654435761u);
  if (!Check(CudaStatus(cudaMemcpy(dev_gather, gather.data(), list_bytes, cudaMemcpyHostToDevice),
                        "cudaMemcpy"),
             "upload") ||
      !Check(CudaStatus(cudaMemcpy(dev_scatter, scatter.data(), list_bytes, cudaMemcpyHostToDevice),
                        "cudaMemcpy"),
             "upload") ||
      !Check(CudaStatus(cudaMemcpy(dev_gather_whole, gather_whole.data(), list_bytes,
                                   cudaMemcpyHostToDevice),
                        "cudaMemcpy"),
             "upload") ||
      !Check(CudaStatus(cudaMemcpy(dev_scatter_whole, scatter_whole.data(), list_bytes,
                                   cudaMemcpyHostToDevice),
                        "cudaMemcpy"),
             "upload") ||
      !Check(CudaStatus(cudaMemcpy(pool->data(), pattern.data(), region, cudaMemcpyHostToDevice),
                        "cudaMemcpy"),
             "fill")) {
    return 1;
  }

  Result<CudaStream> gather_stream = CudaStream::Create(0);
  Result<CudaStream> scatter_stream = CudaStream::Create(0);
  Result<CudaEvent> start = CudaEvent::Create(0, true, /*timing=*/true);
  Result<CudaEvent> stop = CudaEvent::Create(0, true, /*timing=*/true);
  Result<CudaEvent> step = CudaEvent::Create(0, false, /*timing=*/false);
  if (!Check(gather_stream.status(), "stream") || !Check(scatter_stream.status(), "stream") ||
      !Check(start.status(), "event") || !Check(stop.status(), "event") ||
      !Check(step.status(), "event")) {
    return 1;
  }
  cudaStream_t g = gather_stream->get();
  cudaStream_t s = scatter_stream->get();
  const auto launch = [&](const PieceDescriptor* list, uint64_t count, uint64_t src_base,
                          uint64_t dst_base, cudaStream_t stream) {
    return Check(
        CudaStatus(cuda_copy::LaunchBatchedCopy(list, static_cast<uint32_t>(count), src_base,
                                                dst_base, max_blocks, stream, frag),
                   "LaunchBatchedCopy"),
        "launch");
  };
  const auto slot_of = [&](uint64_t k) { return slot_base + (k % slots) * chunk_bytes; };

  // Host round trips: each launch after the host saw the one before end.
  const auto host_driven = [&]() {
    for (uint64_t k = 0; k < chunks; ++k) {
      if (!launch(dev_gather + k * per_chunk, per_chunk, src_region, slot_of(k), g) ||
          !Check(CudaStatus(cudaEventRecord(step->get(), g), "cudaEventRecord"), "t") ||
          !Check(CudaStatus(cudaEventSynchronize(step->get()), "cudaEventSynchronize"), "t") ||
          !launch(dev_scatter + k * per_chunk, per_chunk, slot_of(k), dst_region, s) ||
          !Check(CudaStatus(cudaEventRecord(step->get(), s), "cudaEventRecord"), "t") ||
          !Check(CudaStatus(cudaEventSynchronize(step->get()), "cudaEventSynchronize"), "t")) {
        return false;
      }
    }
    return true;
  };
  // Device-ordered: everything enqueued at once, credits as device words.
  const auto device_ordered = [&]() {
    if (!Check(CudaStatus(cudaMemsetAsync(words->data(), 0, words->size(), g), "cudaMemsetAsync"),
               "reset") ||
        !Check(CudaStatus(cudaEventRecord(step->get(), g), "cudaEventRecord"), "t") ||
        !Check(CudaStatus(cudaStreamWaitEvent(s, step->get(), 0), "cudaStreamWaitEvent"), "t")) {
      return false;
    }
    for (uint64_t k = 0; k < chunks; ++k) {
      if (k >= slots &&
          !CheckDriver(wait_value(g, credit_word, static_cast<cuuint32_t>(k - slots + 1),
                                  CU_STREAM_WAIT_VALUE_GEQ),
                       "cuStreamWaitValue32")) {
        return false;
      }
      if (!launch(dev_gather + k * per_chunk, per_chunk, src_region, slot_of(k), g) ||
          !CheckDriver(write_value(g, ready_word, static_cast<cuuint32_t>(k + 1),
                                   CU_STREAM_WRITE_VALUE_DEFAULT),
                       "cuStreamWriteValue32") ||
          !CheckDriver(
              wait_value(s, ready_word, static_cast<cuuint32_t>(k + 1), CU_STREAM_WAIT_VALUE_GEQ),
              "cuStreamWaitValue32") ||
          !launch(dev_scatter + k * per_chunk, per_chunk, slot_of(k), dst_region, s) ||
          !CheckDriver(write_value(s, credit_word, static_cast<cuuint32_t>(k + 1),
                                   CU_STREAM_WRITE_VALUE_DEFAULT),
                       "cuStreamWriteValue32")) {
        return false;
      }
    }
    return true;
  };
  const auto one_slot = [&]() {
    return launch(dev_gather_whole, frags, src_region, slot_base, g) &&
           launch(dev_scatter_whole, frags, slot_base, dst_region, g);
  };

  struct Way {
    const char* name;
    std::function<bool()> run;
  };
  const Way ways[] = {{"host round trips", host_driven},
                      {"device-ordered", device_ordered},
                      {"one slot", one_slot}};
  std::printf(
      "chunk_pipeline_bench: %llu chunks of %llu MiB (%llu fragments of %llu KiB each) through "
      "%llu slot(s); median of %d repetitions\n",
      static_cast<unsigned long long>(chunks), static_cast<unsigned long long>(chunk_mib),
      static_cast<unsigned long long>(per_chunk), static_cast<unsigned long long>(frag_kib),
      static_cast<unsigned long long>(slots), reps);
  std::printf("| way | us (device) | us (host, enqueue to end) | GB/s | us a chunk | verified |\n");
  std::printf("| --- | ---: | ---: | ---: | ---: | --- |\n");
  std::vector<uint32_t> got(region / sizeof(uint32_t));
  for (const Way& way : ways) {
    std::vector<double> device_us;
    std::vector<double> host_us;
    if (!Check(CudaStatus(cudaMemset(reinterpret_cast<void*>(dst_region), 0, region), "cudaMemset"),
               "clear")) {
      return 1;
    }
    for (int r = 0; r <= reps; ++r) {  // r == 0: warm-up
      if (!Check(CudaStatus(cudaDeviceSynchronize(), "cudaDeviceSynchronize"), "t")) return 1;
      const Clock::time_point host_start = Clock::now();
      if (!Check(CudaStatus(cudaEventRecord(start->get(), g), "cudaEventRecord"), "t") ||
          !Check(CudaStatus(cudaStreamWaitEvent(s, start->get(), 0), "cudaStreamWaitEvent"), "t") ||
          !way.run() ||
          !Check(CudaStatus(cudaEventRecord(step->get(), g), "cudaEventRecord"), "t") ||
          !Check(CudaStatus(cudaStreamWaitEvent(s, step->get(), 0), "cudaStreamWaitEvent"), "t") ||
          !Check(CudaStatus(cudaEventRecord(stop->get(), s), "cudaEventRecord"), "t") ||
          !Check(CudaStatus(cudaEventSynchronize(stop->get()), "cudaEventSynchronize"), "t")) {
        return 1;
      }
      const double host =
          std::chrono::duration<double, std::micro>(Clock::now() - host_start).count();
      float ms = 0;
      if (!Check(CudaStatus(cudaEventElapsedTime(&ms, start->get(), stop->get()),
                            "cudaEventElapsedTime"),
                 "t")) {
        return 1;
      }
      if (r > 0) {
        device_us.push_back(ms * 1e3);
        host_us.push_back(host);
      }
    }
    // Every fragment where the plan put it.
    if (!Check(CudaStatus(cudaMemcpy(got.data(), reinterpret_cast<void*>(dst_region), region,
                                     cudaMemcpyDeviceToHost),
                          "cudaMemcpy"),
               "read back")) {
      return 1;
    }
    uint64_t bad = 0;
    for (uint64_t i = 0; i < frags; ++i) {
      if (std::memcmp(reinterpret_cast<const char*>(got.data()) + dst_at[i] * frag,
                      reinterpret_cast<const char*>(pattern.data()) + src_at[i] * frag,
                      frag) != 0) {
        ++bad;
      }
    }
    const double us = Median(device_us);
    std::printf("| %s | %.1f | %.1f | %.1f | %.2f | %s |\n", way.name, us, Median(host_us),
                static_cast<double>(total) / (us * 1e-6) / 1e9, us / static_cast<double>(chunks),
                bad == 0 ? "yes" : (std::to_string(bad) + " fragments wrong").c_str());
    if (bad != 0) return 1;
  }
  return 0;
}

}  // namespace
}  // namespace kvbounce

int main(int argc, char** argv) { return kvbounce::Main(argc, argv); }
