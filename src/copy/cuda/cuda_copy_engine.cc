#include "copy/cuda/cuda_copy_engine.h"

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <utility>

#include "common/poll.h"
#include "copy/cuda/copy_kernel.cuh"
#include "kvbounce/config.h"
#include "kvbounce/logging.h"

namespace kvbounce {

using cuda_copy::PieceDescriptor;

// A plan list is uploaded verbatim when its fragments are small enough to
// be pieces themselves: the layouts must agree byte for byte.
static_assert(sizeof(Fragment) == sizeof(PieceDescriptor));
static_assert(offsetof(Fragment, src) == offsetof(PieceDescriptor, src));
static_assert(offsetof(Fragment, dst) == offsetof(PieceDescriptor, dst));
static_assert(offsetof(Fragment, bytes) == offsetof(PieceDescriptor, bytes));
static_assert(std::is_trivially_copyable_v<Fragment>);

// One accepted batch. Everything but the constant fields is touched only by
// the engine thread.
struct CudaCopyEngine::BatchState {
  CopyBatch batch;
  uint64_t total_bytes = 0;
  CopyDone done;
  std::stop_token stop;

  size_t next_fragment = 0;  // cursor: the first byte not launched yet
  uint64_t next_offset = 0;
  // No fragment is larger than a piece (kMaxPieceBytes) or a launch
  // (max_launch_bytes): launches upload runs of the list as they are, with
  // the bases as kernel arguments (set when the engine thread takes the
  // batch up).
  bool verbatim = false;
  // Every piece fits one launch's parameters (cuda_copy::kInlinePieces):
  // the batch is one launch, nothing uploaded.
  bool small = false;
  // A tiled batch (batch.tiles): its shapes cut into pieces at Submit (each
  // shape's first piece and count), the cursor a segment index (a launch
  // holds whole segments).
  struct ShapePieces {
    uint32_t first = 0;
    uint32_t count = 0;
  };
  std::vector<ShapePieces> tile_shapes;
  std::vector<PieceDescriptor> tile_pieces;
  std::vector<uint64_t> tile_shape_bytes;  // per shape, times the outer extent
  uint64_t pieces_per_unit = 0;
  uint64_t tile_max_piece = 0;  // the largest of tile_pieces
  size_t next_segment = 0;
  // A tiled list too large for a slot's staging buffer runs expanded.
  std::shared_ptr<FragmentList> expanded;
  size_t launches_started = 0;
  int in_flight = 0;
  uint64_t bytes_launched = 0;
  bool all_launched = false;  // nothing more will be launched (end, stop or error)
  bool stopped = false;
  bool finished = false;  // `done` called
  Status error;
};

// Outer offsets are uploaded as they are.
static_assert(sizeof(TileOffset) == sizeof(cuda_copy::TileOffsetDescriptor));
static_assert(offsetof(TileOffset, dst) == offsetof(cuda_copy::TileOffsetDescriptor, dst));
static_assert(std::is_trivially_copyable_v<TileOffset>);

// The buffers and events of one launch in flight.
struct CudaCopyEngine::Slot {
  CudaPinnedBuffer staging;      // descriptors written by the host
  const void* staging_on_device = nullptr;  // the same memory, as the kernel reads it mapped
  CudaDeviceBuffer descriptors;  // the kernel's copy of them
  CudaEvent uploaded;            // upload stream: descriptors are on the device
  CudaEvent finished;            // copy stream: the kernel is done
  std::shared_ptr<BatchState> batch;
  // Batches that ride in this launch whole (LaunchTiled), in queue order.
  std::vector<std::shared_ptr<BatchState>> riders;
  uint64_t bytes = 0;
};

// Where one list of a tiled launch lies in the slot's staging buffer.
struct CudaCopyEngine::StagedList {
  const BatchState* owner = nullptr;  // its tables, shapes' pieces and bases
  size_t outer_at = 0;
  size_t pieces_at = 0;
  size_t segments_at = 0;
  size_t num_segments = 0;
};

namespace {

// Whether no fragment of the list is larger than `limit` bytes.
bool NoneLargerThan(std::span<const Fragment> fragments, uint64_t limit) {
  return std::all_of(fragments.begin(), fragments.end(),
                     [limit](const Fragment& f) { return f.bytes <= limit; });
}

// Moves the cursor past zero-byte fragments; true when the batch has no
// bytes left to launch.
bool SkipEmpty(const std::span<const Fragment> fragments, size_t& next, uint64_t& offset) {
  while (next < fragments.size() && offset >= fragments[next].bytes) {
    ++next;
    offset = 0;
  }
  return next == fragments.size();
}

// Bytes of a tiled launch's staging buffer before its segments: the outer
// offsets and the pieces.
size_t TiledFixedBytes(size_t outer, size_t pieces) {
  return outer * sizeof(cuda_copy::TileOffsetDescriptor) + pieces * sizeof(PieceDescriptor);
}

// Whether `a` and `b` have the same bytes (trivially copyable elements).
template <typename T>
bool SameBytes(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

// Whether the batch has nothing left to launch.
bool NothingLeft(const CopyBatch& batch, size_t& next, uint64_t& offset, size_t next_segment) {
  if (batch.tiles != nullptr) {
    return batch.tiles->outer.empty() || next_segment >= batch.tiles->segments.size();
  }
  return SkipEmpty(batch.fragments, next, offset);
}

}  // namespace

Result<std::unique_ptr<CudaCopyEngine>> CudaCopyEngine::Create(const Options& options) {
  if (options.max_launch_bytes == 0) {
    return InvalidArgumentError("cuda copy engine: max_launch_bytes = 0 is invalid: must be >= 1");
  }
  if (options.max_launch_pieces == 0 || options.max_launch_pieces > Options::kMaxLaunchPieces) {
    return InvalidArgumentError("cuda copy engine: max_launch_pieces = " +
                                std::to_string(options.max_launch_pieces) +
                                " is invalid: must be 1 to " +
                                std::to_string(Options::kMaxLaunchPieces));
  }
  if (options.poll_before_sleep < std::chrono::microseconds(0) ||
      options.poll_before_sleep > std::chrono::microseconds(Config::kMaxPollUs)) {
    return InvalidArgumentError("cuda copy engine: poll_before_sleep = " +
                                std::to_string(options.poll_before_sleep.count()) +
                                " µs: must be in [0, " + std::to_string(Config::kMaxPollUs) + "]");
  }
  if (options.spin_before_sleep < std::chrono::microseconds(0) ||
      options.spin_before_sleep > Options::kMaxSpinBeforeSleep) {
    return InvalidArgumentError("cuda copy engine: spin_before_sleep = " +
                                std::to_string(options.spin_before_sleep.count()) +
                                " us must be in [0, " +
                                std::to_string(Options::kMaxSpinBeforeSleep.count()) + "] us");
  }
  if (options.max_inline_pieces > cuda_copy::kInlinePieces) {
    return InvalidArgumentError(
        "cuda copy engine: max_inline_pieces = " + std::to_string(options.max_inline_pieces) +
        " is invalid: must be 0 to " + std::to_string(cuda_copy::kInlinePieces));
  }
  if (options.max_mapped_pieces > Options::kMaxLaunchPieces) {
    return InvalidArgumentError(
        "cuda copy engine: max_mapped_pieces = " + std::to_string(options.max_mapped_pieces) +
        " is invalid: must be 0 to " + std::to_string(Options::kMaxLaunchPieces));
  }
  if (options.launch_slots < 1 || options.launch_slots > Options::kMaxLaunchSlots) {
    return InvalidArgumentError("cuda copy engine: launch_slots = " +
                                std::to_string(options.launch_slots) +
                                " is invalid: must be 1 to " +
                                std::to_string(Options::kMaxLaunchSlots));
  }
  std::string why;
  const int count = CudaDeviceCount(&why);
  if (count == 0) return UnavailableError("cuda copy engine: no CUDA device: " + why);
  if (options.device < 0 || options.device >= count) {
    return InvalidArgumentError("cuda copy engine: device " + std::to_string(options.device) +
                                " does not exist (" + std::to_string(count) + " devices)");
  }
  const int device = options.device;
  int sms = 0;
  KVB_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
                           "cudaDeviceGetAttribute(multiprocessor count, device " +
                               std::to_string(device) + ")");
  int threads_per_sm = 0;
  KVB_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device),
      "cudaDeviceGetAttribute(max threads per multiprocessor, device " + std::to_string(device) +
          ")");

  std::unique_ptr<CudaCopyEngine> engine(new CudaCopyEngine(options));
  engine->max_blocks_ = static_cast<uint32_t>(
      std::max(1, sms) * std::max(1, threads_per_sm / cuda_copy::kThreadsPerBlock));
  KVB_ASSIGN_OR_RETURN(engine->copy_stream_, CudaStream::Create(device));
  KVB_ASSIGN_OR_RETURN(engine->upload_stream_, CudaStream::Create(device));
  // A launch never holds more pieces than bytes.
  const uint64_t pieces =
      std::min<uint64_t>(options.max_launch_pieces, options.max_launch_bytes);
  const size_t descriptor_bytes = static_cast<size_t>(pieces) * sizeof(PieceDescriptor);
  for (int i = 0; i < options.launch_slots; ++i) {
    auto slot = std::make_unique<Slot>();
    KVB_ASSIGN_OR_RETURN(slot->staging, CudaPinnedBuffer::Allocate(descriptor_bytes));
    void* mapped = nullptr;
    KVB_CUDA_RETURN_IF_ERROR(cudaHostGetDevicePointer(&mapped, slot->staging.data(), 0),
                             "cudaHostGetDevicePointer(staging buffer)");
    slot->staging_on_device = mapped;
    KVB_ASSIGN_OR_RETURN(slot->descriptors, CudaDeviceBuffer::Allocate(device, descriptor_bytes));
    KVB_ASSIGN_OR_RETURN(slot->uploaded, CudaEvent::Create(device, /*blocking_sync=*/false));
    KVB_ASSIGN_OR_RETURN(slot->finished, CudaEvent::Create(device, /*blocking_sync=*/true));
    engine->slots_.push_back(std::move(slot));
    engine->free_slots_.push_back(static_cast<size_t>(i));
  }
  // std::thread reports failure by throwing; the library reports Status.
  try {
    engine->thread_ = std::thread([raw = engine.get()] { raw->Loop(); });
  } catch (const std::system_error& e) {
    return ResourceExhaustedError(std::string("cuda copy engine: cannot start its thread: ") +
                                  e.what());
  }
  return engine;
}

CudaCopyEngine::CudaCopyEngine(const Options& options) : options_(options) {}

CudaCopyEngine::~CudaCopyEngine() {
  if (thread_.joinable() && thread_.get_id() == std::this_thread::get_id()) {
    Log(LogLevel::kError,
        "cuda copy engine destroyed on its own thread (from a done callback); aborting");
    std::abort();
  }
  StopAndJoin();
}

void CudaCopyEngine::StopAndJoin() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  work_cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

CopyEngineCaps CudaCopyEngine::Caps() const {
  return CopyEngineCaps{
      .host_memory = false,
      .device_memory = true,
      .tiled_lists = true,
      .cost = CopyCost{.batch_us = kBatchUs, .run_us = kRunUs, .bytes_per_us = kBytesPerUs}};
}

CudaCopyEngine::Stats CudaCopyEngine::GetStats() const {
  Stats stats;
  stats.batches_completed = batches_completed_.load(std::memory_order_relaxed);
  stats.batches_cancelled = batches_cancelled_.load(std::memory_order_relaxed);
  stats.batches_failed = batches_failed_.load(std::memory_order_relaxed);
  stats.launches = launches_.load(std::memory_order_relaxed);
  stats.bytes_copied = bytes_copied_.load(std::memory_order_relaxed);
  return stats;
}

Status CudaCopyEngine::SubmitValidated(const CopyBatch& batch, uint64_t total_bytes,
                                       CopyDone done, std::stop_token stop) {
  auto state = std::make_shared<BatchState>();
  state->batch = batch;
  state->total_bytes = total_bytes;
  if (batch.tiles != nullptr) {
    // Cut every shape's runs into pieces once; the device expands the rest.
    const TiledList& tiles = *batch.tiles;
    const size_t staging = slots_.front()->staging.size();
    const uint64_t max_pieces = staging / sizeof(PieceDescriptor);  // far below 2^32
    for (const TileShape& shape : tiles.shapes) {
      const size_t first = state->tile_pieces.size();
      for (uint64_t r = 0; r < shape.num_runs && state->tile_pieces.size() <= max_pieces; ++r) {
        const Fragment& run = tiles.runs[shape.first_run + r];
        for (uint64_t off = 0; off < run.bytes && state->tile_pieces.size() <= max_pieces;
             off += cuda_copy::kMaxPieceBytes) {
          const uint64_t piece = std::min(cuda_copy::kMaxPieceBytes, run.bytes - off);
          state->tile_pieces.push_back(PieceDescriptor{run.src + off, run.dst + off, piece});
          state->tile_max_piece = std::max(state->tile_max_piece, piece);
        }
      }
      const BatchState::ShapePieces d{static_cast<uint32_t>(first),
                                      static_cast<uint32_t>(state->tile_pieces.size() - first)};
      state->pieces_per_unit = std::max<uint64_t>(state->pieces_per_unit, d.count);
      state->tile_shapes.push_back(d);
      state->tile_shape_bytes.push_back(shape.bytes * tiles.outer.size());
    }
    if (!tiles.tail.empty() || TiledFixedBytes(tiles.outer.size(), state->tile_pieces.size()) +
                                       sizeof(cuda_copy::TileSegmentDescriptor) >
                                   staging) {
      // Too large to stage at once (not a plan's list), or with runs after
      // the tiles (a hybrid model's state): run it expanded.
      state->expanded = std::make_shared<FragmentList>();
      tiles.ExpandTo(state->expanded.get());
      state->batch.tiles = nullptr;
      state->batch.fragments = *state->expanded;
      state->tile_shapes.clear();
      state->tile_pieces.clear();
    }
  }
  state->done = std::move(done);
  state->stop = std::move(stop);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return AbortedError("cuda copy engine: shutting down, batch not accepted");
    queue_.push_back(std::move(state));
    submitted_.fetch_add(1, std::memory_order_release);
  }
  work_cv_.notify_one();
  return Status::Ok();
}

void CudaCopyEngine::Loop() {
  // The current device is per thread; every launch happens on this one.
  Status device_status = CudaStatus(cudaSetDevice(options_.device),
                                    "cudaSetDevice(" + std::to_string(options_.device) + ")");
  if (!device_status.ok()) Log(LogLevel::kError, "cuda copy engine: " + device_status.ToString());

  std::shared_ptr<BatchState> current;  // the batch being launched
  for (;;) {
    if (current == nullptr) {
      std::unique_lock<std::mutex> lock(mu_);
      if (in_flight_.empty() && queue_.empty() && !stopping_ &&
          options_.poll_before_sleep.count() > 0) {
        // Look for the next batch a while before sleeping (Options::
        // poll_before_sleep), yielding the core meanwhile.
        const uint64_t seen = submitted_.load(std::memory_order_relaxed);
        lock.unlock();
        PollForCounter(submitted_, seen, options_.poll_before_sleep);
        lock.lock();
      }
      if (in_flight_.empty()) {
        work_cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      }
      submitted_seen_ = submitted_.load(std::memory_order_relaxed);
      if (!queue_.empty()) {
        current = std::move(queue_.front());
        queue_.pop_front();
        lock.unlock();
        current->verbatim =
            current->batch.tiles == nullptr &&
            NoneLargerThan(current->batch.fragments,
                           std::min(cuda_copy::kMaxPieceBytes, options_.max_launch_bytes));
        current->all_launched =
            current->total_bytes == 0 || NothingLeft(current->batch, current->next_fragment,
                                                     current->next_offset, current->next_segment);
        current->small = !current->all_launched &&
                         current->total_bytes <= options_.max_launch_bytes &&
                         InlinePieces(*current) <= std::min<uint64_t>(options_.max_inline_pieces,
                                                                      options_.max_launch_pieces);
      } else if (in_flight_.empty()) {
        return;  // stopping, and every accepted batch is done
      }
    }
    if (current != nullptr && !current->all_launched && !free_slots_.empty()) {
      BatchState& batch = *current;
      if (options_.launch_hook_for_testing) options_.launch_hook_for_testing(batch.launches_started);
      if (batch.stop.stop_requested()) {
        batch.stopped = true;
        batch.all_launched = true;
      } else {
        const size_t index = free_slots_.back();
        free_slots_.pop_back();
        ++batch.launches_started;
        Status status = batch.small                    ? LaunchInline(batch, *slots_[index])
                        : batch.batch.tiles != nullptr ? LaunchTiled(batch, *slots_[index])
                                                       : Launch(batch, *slots_[index]);
        if (status.ok()) {
          slots_[index]->batch = current;
          in_flight_.push_back(index);
          ++batch.in_flight;
          batch.all_launched =
              NothingLeft(batch.batch, batch.next_fragment, batch.next_offset, batch.next_segment);
        } else {
          free_slots_.push_back(index);
          batch.error = std::move(status);
          batch.all_launched = true;
        }
      }
    }
    if (current != nullptr && current->all_launched) {
      MaybeFinish(current);
      current.reset();
      for (std::shared_ptr<BatchState>& rider : failed_riders_) MaybeFinish(rider);
      failed_riders_.clear();
      continue;
    }
    // Nothing to launch now (no batch, or no free slot): wait for the oldest launch.
    if (!in_flight_.empty()) Retire();
  }
}

Status CudaCopyEngine::Launch(BatchState& batch, Slot& slot) {
  const std::span<const Fragment> fragments = batch.batch.fragments;
  const uint64_t src_base = batch.batch.src_base.value();
  const uint64_t dst_base = batch.batch.dst_base.value();
  const uint64_t capacity = slot.staging.size() / sizeof(PieceDescriptor);
  auto* descriptors = static_cast<PieceDescriptor*>(slot.staging.data());
  uint32_t count = 0;
  uint64_t bytes = 0;
  uint64_t largest = 0;          // the largest piece: the kernel's group size
  uint64_t kernel_src_base = 0;  // the pieces' addresses are absolute ...
  uint64_t kernel_dst_base = 0;
  if (batch.verbatim) {
    // ... or, for a list of small fragments, the list itself: the longest
    // run from the cursor within the launch's bounds (at least the
    // cursor's fragment, which is not empty and fits), copied as it is.
    const size_t first = batch.next_fragment;
    const size_t limit = std::min<size_t>(capacity, fragments.size() - first);
    while (count < limit && bytes + fragments[first + count].bytes <= options_.max_launch_bytes) {
      bytes += fragments[first + count].bytes;
      ++count;
    }
    std::memcpy(descriptors, fragments.data() + first, count * sizeof(PieceDescriptor));
    for (uint32_t i = 0; i < count; ++i) largest = std::max(largest, fragments[first + i].bytes);
    batch.next_fragment += count;
    kernel_src_base = src_base;
    kernel_dst_base = dst_base;
  }
  while (!batch.verbatim && batch.next_fragment < fragments.size() && count < capacity &&
         bytes < options_.max_launch_bytes) {
    const Fragment& f = fragments[batch.next_fragment];
    const uint64_t remaining = f.bytes - batch.next_offset;
    if (remaining == 0) {
      ++batch.next_fragment;
      batch.next_offset = 0;
      continue;
    }
    const uint64_t piece =
        std::min({remaining, cuda_copy::kMaxPieceBytes, options_.max_launch_bytes - bytes});
    descriptors[count++] = PieceDescriptor{src_base + f.src + batch.next_offset,
                                           dst_base + f.dst + batch.next_offset, piece};
    largest = std::max(largest, piece);
    bytes += piece;
    batch.next_offset += piece;
    if (batch.next_offset == f.bytes) {
      ++batch.next_fragment;
      batch.next_offset = 0;
    }
  }
  // The loop calls Launch only while bytes remain (SkipEmpty), so count > 0.
  slot.bytes = bytes;
  batch.bytes_launched += bytes;
  // A launch of few pieces reads them where the host wrote them (see
  // Options::max_mapped_pieces); the slot is not reused before its kernel
  // ended, so nothing overwrites them while it reads.
  const bool mapped = count <= options_.max_mapped_pieces;
  const auto* pieces = static_cast<const PieceDescriptor*>(mapped ? slot.staging_on_device
                                                                  : slot.descriptors.data());
  const auto launch = [&] {
    return CudaStatus(cuda_copy::LaunchBatchedCopy(pieces, count, kernel_src_base, kernel_dst_base,
                                                   max_blocks_, copy_stream_.get(), largest),
                      "batched copy kernel launch (" + std::to_string(count) + " pieces, " +
                          std::to_string(bytes) + " bytes)");
  };
  if (!mapped) return Enqueue(batch, slot, count * sizeof(PieceDescriptor), launch);
  return FinishUnstagedLaunch(batch, slot, launch());
}

Status CudaCopyEngine::FinishUnstagedLaunch(BatchState& batch, Slot& slot, Status launched) {
  if (launched.ok()) {
    launched = CudaStatus(cudaEventRecord(slot.finished.get(), copy_stream_.get()),
                          "cudaEventRecord(copy)");
  }
  if (!launched.ok()) {
    batch.bytes_launched -= slot.bytes;
    return launched.WithContext("cuda copy engine");
  }
  return Status::Ok();
}

uint64_t CudaCopyEngine::InlinePieces(const BatchState& batch) {
  constexpr uint64_t kMore = cuda_copy::kInlinePieces + 1;  // "too many", early
  const auto pieces = [](uint64_t bytes) {
    return bytes / cuda_copy::kMaxPieceBytes + (bytes % cuda_copy::kMaxPieceBytes != 0 ? 1 : 0);
  };
  uint64_t n = 0;
  if (batch.batch.tiles == nullptr) {
    if (batch.batch.fragments.size() > 4 * kMore) return kMore;  // zero-byte ones aside
    for (const Fragment& f : batch.batch.fragments) {
      n += pieces(f.bytes);
      if (n >= kMore) return kMore;
    }
    return n;
  }
  const TiledList& tiles = *batch.batch.tiles;
  if (tiles.outer.size() >= kMore || tiles.segments.size() >= kMore) return kMore;
  for (const TileSegment& seg : tiles.segments) {
    n += batch.tile_shapes[seg.shape].count * tiles.outer.size();
    if (n >= kMore) return kMore;
  }
  return n;
}

Status CudaCopyEngine::LaunchInline(BatchState& batch, Slot& slot) {
  cuda_copy::InlineLaunch launch;
  launch.src_base = batch.batch.src_base.value();
  launch.dst_base = batch.batch.dst_base.value();
  launch.count = 0;
  const auto add = [&launch](uint64_t src, uint64_t dst, uint64_t bytes) {
    for (uint64_t at = 0; at < bytes; at += cuda_copy::kMaxPieceBytes) {
      launch.pieces[launch.count++] =
          PieceDescriptor{src + at, dst + at, std::min(cuda_copy::kMaxPieceBytes, bytes - at)};
    }
  };
  if (batch.batch.tiles == nullptr) {
    for (const Fragment& f : batch.batch.fragments) add(f.src, f.dst, f.bytes);
    batch.next_fragment = batch.batch.fragments.size();
  } else {
    // Pieces of the tiles, the shapes' pieces already cut at Submit.
    const TiledList& tiles = *batch.batch.tiles;
    for (const TileOffset& o : tiles.outer) {
      for (const TileSegment& seg : tiles.segments) {
        const BatchState::ShapePieces shape = batch.tile_shapes[seg.shape];
        for (uint32_t p = 0; p < shape.count; ++p) {
          const PieceDescriptor& piece = batch.tile_pieces[shape.first + p];
          launch.pieces[launch.count++] = PieceDescriptor{o.src + seg.src + piece.src,
                                                          o.dst + seg.dst + piece.dst, piece.bytes};
        }
      }
    }
    batch.next_segment = tiles.segments.size();
  }
  slot.bytes = batch.total_bytes;
  batch.bytes_launched += batch.total_bytes;
  return FinishUnstagedLaunch(
      batch, slot,
      CudaStatus(cuda_copy::LaunchInlineCopy(launch, copy_stream_.get()),
                 "inline copy kernel launch (" + std::to_string(launch.count) + " pieces, " +
                     std::to_string(batch.total_bytes) + " bytes)"));
}

Status CudaCopyEngine::LaunchTiled(BatchState& batch, Slot& slot) {
  const TiledList& tiles = *batch.batch.tiles;
  // Staging: outer offsets, shapes, pieces, then as many segments from the
  // cursor as the buffer and max_launch_bytes allow (at least one).
  const size_t fixed = TiledFixedBytes(tiles.outer.size(), batch.tile_pieces.size());
  const size_t capacity = slot.staging.size();
  const size_t room = (capacity - fixed) / sizeof(cuda_copy::TileSegmentDescriptor);
  const size_t first = batch.next_segment;
  size_t count = 0;
  uint64_t bytes = 0;
  while (first + count < tiles.segments.size() && count < room) {
    const uint64_t b = batch.tile_shape_bytes[tiles.segments[first + count].shape];
    if (count > 0 && bytes + b > options_.max_launch_bytes) break;
    bytes += b;
    ++count;
  }
  auto* const staging = static_cast<std::byte*>(slot.staging.data());
  size_t used = 0;
  auto put = [&](const void* data, size_t n) {
    if (n > 0) std::memcpy(staging + used, data, n);
    used += n;
  };
  auto put_segments = [&](const BatchState& owner, size_t from, size_t n) {
    auto* segments = reinterpret_cast<cuda_copy::TileSegmentDescriptor*>(staging + used);
    for (size_t i = 0; i < n; ++i) {
      const TileSegment& seg = owner.batch.tiles->segments[from + i];
      const BatchState::ShapePieces shape = owner.tile_shapes[seg.shape];
      segments[i] = cuda_copy::TileSegmentDescriptor{seg.src, seg.dst, shape.first, shape.count};
    }
    used += n * sizeof(cuda_copy::TileSegmentDescriptor);
  };
  // The launch's lists: the batch's, then one per rider of other tables.
  std::vector<StagedList>& lists = staged_lists_;
  lists.clear();
  auto stage_list = [&](const BatchState& owner, size_t from, size_t n) {
    const TiledList& t = *owner.batch.tiles;
    StagedList list;
    list.owner = &owner;
    list.outer_at = used;
    put(t.outer.data(), t.outer.size() * sizeof(TileOffset));
    list.pieces_at = used;
    put(owner.tile_pieces.data(), owner.tile_pieces.size() * sizeof(PieceDescriptor));
    list.segments_at = used;
    put_segments(owner, from, n);
    list.num_segments = n;
    lists.push_back(list);
  };
  stage_list(batch, first, count);
  batch.next_segment += count;
  slot.bytes = bytes;
  batch.bytes_launched += bytes;
  // The batch ends in this launch: the queued batches behind it ride
  // along, whole ("Merged launches").
  std::vector<std::shared_ptr<BatchState>> riders;
  if (batch.next_segment == tiles.segments.size() && bytes < options_.max_launch_bytes) {
    TakeRiders(batch, capacity - used, options_.max_launch_bytes - bytes, &riders);
  }
  for (const std::shared_ptr<BatchState>& rider : riders) {
    const size_t n = rider->batch.tiles->segments.size();
    if (SameTables(*lists.back().owner, *rider)) {
      put_segments(*rider, 0, n);  // right after the last list's segments
      lists.back().num_segments += n;
    } else {
      stage_list(*rider, 0, n);
    }
    bytes += rider->total_bytes;
    rider->next_segment = n;
    rider->bytes_launched = rider->total_bytes;
    rider->launches_started = 1;
    rider->in_flight = 1;
    rider->all_launched = true;
  }
  slot.bytes = bytes;
  slot.riders = std::move(riders);

  const auto* device = static_cast<const std::byte*>(slot.descriptors.data());
  auto launch_of = [device](const StagedList& list) {
    const BatchState& owner = *list.owner;
    cuda_copy::TiledLaunch launch;
    launch.outer = reinterpret_cast<const cuda_copy::TileOffsetDescriptor*>(device + list.outer_at);
    launch.pieces = reinterpret_cast<const PieceDescriptor*>(device + list.pieces_at);
    launch.segments =
        reinterpret_cast<const cuda_copy::TileSegmentDescriptor*>(device + list.segments_at);
    launch.num_outer = owner.batch.tiles->outer.size();
    launch.num_segments = list.num_segments;
    launch.pieces_per_unit = owner.pieces_per_unit;
    launch.src_base = owner.batch.src_base.value();
    launch.dst_base = owner.batch.dst_base.value();
    launch.max_piece_bytes = owner.tile_max_piece;
    return launch;
  };
  const std::string what =
      std::to_string(lists.size()) + " list(s), " + std::to_string(bytes) + " bytes";
  std::function<Status()> enqueue_kernel;
  if (lists.size() == 1) {
    const cuda_copy::TiledLaunch launch = launch_of(lists.front());
    enqueue_kernel = [this, launch, what] {
      if (launch.pieces_per_unit == 0) return Status::Ok();  // shapes without runs
      return CudaStatus(cuda_copy::LaunchTiledCopy(launch, max_blocks_, copy_stream_.get()),
                        "tiled copy kernel launch (" + what + ")");
    };
  } else {
    // The lists' headers and task ends follow their descriptors (TakeRiders
    // kept room for them; every size staged is a multiple of 8).
    const size_t headers_at = used;
    uint64_t tasks = 0;
    uint64_t largest = 0;
    std::vector<uint64_t> ends;
    ends.reserve(lists.size());
    for (const StagedList& list : lists) {
      const cuda_copy::TiledLaunch launch = launch_of(list);
      put(&launch, sizeof(launch));
      tasks += launch.num_segments * launch.num_outer * launch.pieces_per_unit;
      ends.push_back(tasks);
      largest = std::max(largest, launch.max_piece_bytes);
    }
    const size_t ends_at = used;
    put(ends.data(), ends.size() * sizeof(uint64_t));
    cuda_copy::TiledLists merged;
    merged.lists = reinterpret_cast<const cuda_copy::TiledLaunch*>(device + headers_at);
    merged.task_end = reinterpret_cast<const uint64_t*>(device + ends_at);
    merged.count = static_cast<uint32_t>(lists.size());
    merged.max_piece_bytes = largest;
    enqueue_kernel = [this, merged, tasks, what] {
      if (tasks == 0) return Status::Ok();
      return CudaStatus(
          cuda_copy::LaunchTiledListsCopy(merged, tasks, max_blocks_, copy_stream_.get()),
          "merged tiled copy kernel launch (" + what + ")");
    };
  }
  Status status = Enqueue(batch, slot, used, enqueue_kernel);
  if (!status.ok()) {
    // Nothing of the launch runs: its riders fail with it, after the batch
    // (Enqueue took the whole launch's bytes off the batch's count).
    batch.bytes_launched += RidersBytes(slot.riders);
    for (std::shared_ptr<BatchState>& rider : slot.riders) {
      rider->in_flight = 0;
      rider->bytes_launched = 0;
      rider->error = status;
    }
    failed_riders_ = std::move(slot.riders);
    slot.riders.clear();
  }
  return status;
}

uint64_t CudaCopyEngine::RidersBytes(const std::vector<std::shared_ptr<BatchState>>& riders) {
  uint64_t bytes = 0;
  for (const std::shared_ptr<BatchState>& rider : riders) bytes += rider->total_bytes;
  return bytes;
}

bool CudaCopyEngine::SameTables(const BatchState& a, const BatchState& b) {
  return a.batch.src_base == b.batch.src_base && a.batch.dst_base == b.batch.dst_base &&
         SameBytes(a.batch.tiles->outer, b.batch.tiles->outer) &&
         SameBytes(a.tile_pieces, b.tile_pieces) && SameBytes(a.tile_shapes, b.tile_shapes);
}

void CudaCopyEngine::TakeRiders(const BatchState& batch, size_t staging, uint64_t bytes,
                                std::vector<std::shared_ptr<BatchState>>* riders) {
  // What a list's header and task end take when the launch has several.
  constexpr size_t kHeader = sizeof(cuda_copy::TiledLaunch) + sizeof(uint64_t);
  const int lanes = cuda_copy::GroupLanesFor(batch.tile_max_piece);
  const BatchState* last = &batch;  // the owner of the launch's last list
  size_t lists = 1;
  std::lock_guard<std::mutex> lock(mu_);
  while (!queue_.empty()) {
    BatchState& next = *queue_.front();
    const TiledList* t = next.batch.tiles;
    if (t == nullptr || next.total_bytes == 0 || next.total_bytes > bytes ||
        next.stop.stop_requested()) {
      return;
    }
    const size_t segments = t->segments.size() * sizeof(cuda_copy::TileSegmentDescriptor);
    size_t need = 0;
    size_t more_lists = lists;
    if (SameTables(*last, next)) {
      need = segments;
    } else {
      // A list of its own: only pieces the launch's groups are sized for.
      if (cuda_copy::GroupLanesFor(next.tile_max_piece) != lanes ||
          lists == cuda_copy::kMaxTiledLists) {
        return;
      }
      more_lists = lists + 1;
      need = TiledFixedBytes(t->outer.size(), next.tile_pieces.size()) + segments;
    }
    const size_t headers = more_lists > 1 ? more_lists * kHeader : 0;
    const size_t headers_before = lists > 1 ? lists * kHeader : 0;
    if (need + headers > staging + headers_before) return;
    staging = staging + headers_before - headers - need;
    bytes -= next.total_bytes;
    lists = more_lists;
    last = &next;
    riders->push_back(std::move(queue_.front()));
    queue_.pop_front();
  }
}

Status CudaCopyEngine::Enqueue(BatchState& batch, Slot& slot, size_t staged_bytes,
                               const std::function<Status()>& launch) {
  const cudaStream_t upload = upload_stream_.get();
  const cudaStream_t copy = copy_stream_.get();
  Status status = CudaStatus(
      cudaMemcpyAsync(slot.descriptors.data(), slot.staging.data(), staged_bytes,
                      cudaMemcpyHostToDevice, upload),
      "cudaMemcpyAsync(" + std::to_string(staged_bytes) + " bytes of descriptors, host to device)");
  if (status.ok()) {
    status = CudaStatus(cudaEventRecord(slot.uploaded.get(), upload), "cudaEventRecord(upload)");
  }
  if (status.ok()) {
    status = CudaStatus(cudaStreamWaitEvent(copy, slot.uploaded.get(), 0), "cudaStreamWaitEvent");
  }
  if (status.ok()) status = launch();
  if (status.ok()) {
    status = CudaStatus(cudaEventRecord(slot.finished.get(), copy), "cudaEventRecord(copy)");
  }
  if (!status.ok()) {
    // The upload may still read the staging buffer: let it drain before the
    // slot is reused.
    CudaStatus(cudaStreamSynchronize(upload), "cudaStreamSynchronize(upload)").IgnoreError();
    batch.bytes_launched -= slot.bytes;
    return status.WithContext("cuda copy engine");
  }
  return Status::Ok();
}

void CudaCopyEngine::Retire() {
  const size_t index = in_flight_.front();
  Slot& slot = *slots_[index];
  // A small launch ends microseconds after it was enqueued, and waking
  // from the blocking wait costs tens of microseconds: poll first, for
  // spin_before_sleep plus the time the launch's bytes take at the kernel's
  // rate (at most kMaxSpinBeforeSleep), then sleep.
  cudaError_t polled = cudaEventQuery(slot.finished.get());
  if (polled == cudaErrorNotReady && options_.spin_before_sleep.count() > 0) {
    const auto expected = std::chrono::microseconds(
        static_cast<int64_t>(static_cast<double>(slot.bytes) / kKernelBytesPerUs));
    const auto until =
        std::chrono::steady_clock::now() +
        std::min(options_.spin_before_sleep + expected, Options::kMaxSpinBeforeSleep);
    const bool can_launch = !free_slots_.empty();
    while (polled == cudaErrorNotReady && std::chrono::steady_clock::now() < until) {
      if (can_launch && submitted_.load(std::memory_order_acquire) != submitted_seen_) {
        return;  // launch the new batch first; the loop comes back here
      }
      polled = cudaEventQuery(slot.finished.get());
    }
  }
  Status status =
      polled == cudaErrorNotReady
          ? CudaStatus(cudaEventSynchronize(slot.finished.get()), "cudaEventSynchronize(copy)")
          : CudaStatus(polled, "cudaEventQuery(copy)");
  in_flight_.pop_front();
  std::shared_ptr<BatchState> batch = std::move(slot.batch);
  std::vector<std::shared_ptr<BatchState>> riders = std::move(slot.riders);
  slot.riders.clear();
  free_slots_.push_back(index);
  if (batch == nullptr) return;
  --batch->in_flight;
  if (status.ok()) {
    launches_.fetch_add(1, std::memory_order_relaxed);
    bytes_copied_.fetch_add(slot.bytes, std::memory_order_relaxed);
  } else {
    if (batch->error.ok()) batch->error = status.WithContext("cuda copy engine");
    batch->all_launched = true;
  }
  MaybeFinish(batch);
  // The riders came after the batch in the queue: they finish after it.
  for (std::shared_ptr<BatchState>& rider : riders) {
    --rider->in_flight;
    if (!status.ok() && rider->error.ok()) rider->error = status.WithContext("cuda copy engine");
    MaybeFinish(rider);
  }
}

void CudaCopyEngine::MaybeFinish(std::shared_ptr<BatchState>& batch) {
  if (batch->finished || !batch->all_launched || batch->in_flight > 0) return;
  batch->finished = true;
  Status status;
  if (!batch->error.ok()) {
    batches_failed_.fetch_add(1, std::memory_order_relaxed);
    status = batch->error;
  } else if (batch->stopped) {
    batches_cancelled_.fetch_add(1, std::memory_order_relaxed);
    status = CancelledError("cuda copy engine: batch stopped: " +
                            std::to_string(batch->total_bytes - batch->bytes_launched) + " of " +
                            std::to_string(batch->total_bytes) + " bytes not copied");
  }
  batches_completed_.fetch_add(1, std::memory_order_relaxed);
  CopyDone done = std::move(batch->done);
  done(std::move(status));
}

}  // namespace kvbounce
