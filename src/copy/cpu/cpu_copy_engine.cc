#include "copy/cpu/cpu_copy_engine.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <system_error>
#include <utility>

#include "common/copy_bytes.h"
#include "common/memcpy_rate.h"
#include "kvbounce/logging.h"

namespace kvbounce {

Result<std::unique_ptr<CpuCopyEngine>> CpuCopyEngine::Create(const Options& options) {
  if (options.num_threads < 0 || options.num_threads > Options::kMaxThreads) {
    return InvalidArgumentError(
        "cpu copy engine: num_threads = " + std::to_string(options.num_threads) +
        " is invalid: must be 0 (automatic) to " + std::to_string(Options::kMaxThreads));
  }
  if (options.workers != nullptr && options.num_threads != 0) {
    return InvalidArgumentError(
        "cpu copy engine: num_threads = " + std::to_string(options.num_threads) +
        " is invalid with a shared pool: its workers are the pool's");
  }
  if (options.min_chunk_bytes == 0) {
    return InvalidArgumentError("cpu copy engine: min_chunk_bytes = 0 is invalid: must be >= 1");
  }
  MemcpyBytesPerUs();  // measure now (once per process), not on a request's path
  std::shared_ptr<CopyWorkers> workers = options.workers;
  if (workers == nullptr) {
    const int n = options.num_threads > 0 ? options.num_threads : CopyWorkers::SharedThreads();
    Result<std::shared_ptr<CopyWorkers>> own = CopyWorkers::Create(n);
    if (!own.ok()) return own.status().WithContext("cpu copy engine");
    workers = std::move(own).value();
  }
  return std::unique_ptr<CpuCopyEngine>(new CpuCopyEngine(options, std::move(workers)));
}

CpuCopyEngine::CpuCopyEngine(const Options& options, std::shared_ptr<CopyWorkers> workers)
    : options_(options), workers_(std::move(workers)) {}

CopyEngineCaps CpuCopyEngine::Caps() const {
  return CopyEngineCaps{
      .host_memory = true,
      .device_memory = false,
      .cost = CopyCost{.batch_us = 0, .run_us = kRunUs, .bytes_per_us = MemcpyBytesPerUs()}};
}

CpuCopyEngine::~CpuCopyEngine() {
  if (workers_->OnWorkerThread()) {
    Log(LogLevel::kError,
        "cpu copy engine destroyed on a worker of its pool (from a done callback); aborting");
    std::abort();
  }
  std::unique_lock<std::mutex> lock(mu_);
  stopping_ = true;
  idle_cv_.wait(lock, [this] { return tasks_in_flight_ == 0; });
}

CpuCopyEngine::Stats CpuCopyEngine::GetStats() const {
  Stats stats;
  stats.batches_completed = batches_completed_.load(std::memory_order_relaxed);
  stats.batches_cancelled = batches_cancelled_.load(std::memory_order_relaxed);
  stats.chunks_completed = chunks_completed_.load(std::memory_order_relaxed);
  stats.bytes_copied = bytes_copied_.load(std::memory_order_relaxed);
  stats.batches_inline = batches_inline_.load(std::memory_order_relaxed);
  return stats;
}

Status CpuCopyEngine::SubmitValidated(const CopyBatch& batch, uint64_t total_bytes, CopyDone done,
                                      std::stop_token stop) {
  const bool large =
      total_bytes > options_.split_bytes || batch.fragments.size() > options_.split_fragments;
  size_t max_chunks = 1;
  if (large) {
    const uint64_t by_bytes = total_bytes / options_.min_chunk_bytes +
                              (total_bytes % options_.min_chunk_bytes != 0 ? 1 : 0);
    max_chunks = static_cast<size_t>(
        std::clamp<uint64_t>(by_bytes, 1, static_cast<uint64_t>(workers_->num_threads())));
  }
  std::vector<CopyChunk> chunks = SplitIntoChunks(batch.fragments, total_bytes, max_chunks);
  if (chunks.empty()) chunks.push_back(CopyChunk{});  // nothing to copy, still complete

  auto state = std::make_shared<BatchState>();
  state->batch = batch;
  state->total_bytes = total_bytes;
  state->done = std::move(done);
  state->stop = std::move(stop);
  state->chunks_left.store(chunks.size(), std::memory_order_relaxed);
  std::vector<CopyWorkers::Task> tasks;
  tasks.reserve(chunks.size());
  for (const CopyChunk& chunk : chunks) {
    tasks.push_back([this, task = Task{state, chunk}] { Run(task); });
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (stopping_) return AbortedError("cpu copy engine: shutting down, batch not accepted");
  // Counted before they can run: the destructor waits for them.
  tasks_in_flight_ += chunks.size();
  if (!workers_->PostAll(std::move(tasks))) {
    tasks_in_flight_ -= chunks.size();
    return AbortedError("cpu copy engine: its workers are shutting down, batch not accepted");
  }
  return Status::Ok();
}

void CpuCopyEngine::Run(const Task& task) {
  BatchState& state = *task.batch;
  const CopyChunk& c = task.chunk;
  const uint64_t copied = c.bytes > 0 ? CopyPieces(state.batch, c, state.stop) : 0;
  chunks_completed_.fetch_add(1, std::memory_order_relaxed);
  bytes_copied_.fetch_add(copied, std::memory_order_relaxed);
  if (copied < c.bytes) state.bytes_skipped.fetch_add(c.bytes - copied, std::memory_order_relaxed);
  // acq_rel: the last chunk's finisher sees every other chunk's bytes (and
  // skipped count) before it reports the batch done.
  if (state.chunks_left.fetch_sub(1, std::memory_order_acq_rel) == 1) {
    batches_completed_.fetch_add(1, std::memory_order_relaxed);
    const uint64_t skipped = state.bytes_skipped.load(std::memory_order_relaxed);
    Status status;
    if (skipped > 0) {
      batches_cancelled_.fetch_add(1, std::memory_order_relaxed);
      status = Stopped(skipped, state.total_bytes);
    }
    CopyDone done = std::move(state.done);
    done(std::move(status));
  }
  // Last: once it is 0 the destructor may return, and `this` is gone.
  std::lock_guard<std::mutex> lock(mu_);
  if (--tasks_in_flight_ == 0 && stopping_) idle_cv_.notify_all();
}

Status CpuCopyEngine::CopyValidatedHere(const CopyBatch& batch, uint64_t total_bytes,
                                        std::stop_token stop) {
  std::vector<CopyChunk> chunks = SplitIntoChunks(batch.fragments, total_bytes, 1);
  uint64_t copied = 0;
  for (const CopyChunk& c : chunks) copied += CopyPieces(batch, c, stop);
  chunks_completed_.fetch_add(1, std::memory_order_relaxed);
  bytes_copied_.fetch_add(copied, std::memory_order_relaxed);
  batches_inline_.fetch_add(1, std::memory_order_relaxed);
  batches_completed_.fetch_add(1, std::memory_order_relaxed);
  if (copied == total_bytes) return Status::Ok();
  batches_cancelled_.fetch_add(1, std::memory_order_relaxed);
  return Stopped(total_bytes - copied, total_bytes);
}

uint64_t CpuCopyEngine::CopyPieces(const CopyBatch& batch, const CopyChunk& c,
                                   const std::stop_token& stop) {
  const uint64_t src_base = batch.src_base.value();
  const uint64_t dst_base = batch.dst_base.value();
  const auto& hook = options_.piece_hook_for_testing;
  uint64_t copied = 0;
  for (size_t i = c.first; i <= c.last; ++i) {
    const Fragment& f = batch.fragments[i];
    const uint64_t lo = i == c.first ? c.first_offset : 0;
    const uint64_t hi = i == c.last ? c.last_end : f.bytes;
    for (uint64_t at = lo; at < hi;) {
      if (hook) hook(i);
      if (stop.stop_requested()) return copied;
      const uint64_t piece = std::min(hi - at, kCopyGrainBytes);
      CopyBytes(Addr(dst_base + f.dst + at).ToPointer(), Addr(src_base + f.src + at).ToPointer(),
                piece);
      at += piece;
      copied += piece;
    }
  }
  return copied;
}

Status CpuCopyEngine::Stopped(uint64_t skipped, uint64_t total_bytes) {
  return CancelledError("cpu copy engine: batch stopped: " + std::to_string(skipped) + " of " +
                        std::to_string(total_bytes) + " bytes not copied");
}

}  // namespace kvbounce
