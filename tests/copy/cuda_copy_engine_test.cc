// CudaCopyEngine and the CUDA helpers. Every case that needs a GPU skips
// with "no CUDA device: ..." where there is none; the cases that check
// behaviour without one (option checks, the no-device error, the error text)
// run everywhere the engine is built.
#include "copy/cuda/cuda_copy_engine.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <future>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <stop_token>
#include <string>
#include <thread>
#include <vector>

#include "common/status_matchers.h"
#include "copy/copy_engine.h"
#include "copy/cuda/copy_kernel.cuh"
#include "copy/cuda/cuda_util.h"
#include "kvbounce/config.h"
#include "kvbounce/status.h"
#include "kvbounce/types.h"
#include "layout/fragment.h"
#include "layout/tiled_list.h"
#include "random_tiled.h"

namespace kvbounce {
namespace {

using ::kvbounce::testing_util::IsOk;
using ::kvbounce::testing_util::StatusIs;
using ::testing::HasSubstr;

constexpr uint8_t kUntouched = 0xCD;

#define SKIP_WITHOUT_CUDA_DEVICE()                                             \
  do {                                                                         \
    std::string why;                                                           \
    if (CudaDeviceCount(&why) == 0) GTEST_SKIP() << "no CUDA device: " << why; \
  } while (false)

// Fragments over a source extent and a destination extent: sizes from 1 B
// to `max_bytes` (log-uniform), random gaps, so random offsets and
// alignments; about a third of them equally aligned modulo 16 (the vector
// path). Destinations are laid out in a shuffled order. No two fragments
// overlap on either side.
struct RandomList {
  std::vector<Fragment> fragments;  // src / dst are offsets into the extents
  uint64_t src_extent = 0;
  uint64_t dst_extent = 0;
  uint64_t total_bytes = 0;
};

// `word_sized`: the aligned fragments' sizes are whole 16-byte words too
// (at least one, at most max_bytes rounded down), as a KV row's are.
RandomList MakeRandomList(std::mt19937_64& rng, int count, uint64_t max_bytes,
                          bool word_sized = false) {
  RandomList list;
  std::uniform_real_distribution<double> log_size(0.0, std::log(static_cast<double>(max_bytes)));
  std::uniform_int_distribution<uint64_t> gap(0, 40);
  std::vector<uint64_t> sizes(static_cast<size_t>(count));
  std::vector<bool> aligned(sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) {
    sizes[i] = std::clamp<uint64_t>(static_cast<uint64_t>(std::exp(log_size(rng))), 1, max_bytes);
    aligned[i] = rng() % 3 == 0;
    if (word_sized && aligned[i] && max_bytes >= 16) {
      sizes[i] = std::clamp<uint64_t>(sizes[i] / 16 * 16, 16, max_bytes / 16 * 16);
    }
  }
  list.fragments.resize(sizes.size());
  uint64_t cursor = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    cursor += gap(rng);
    if (aligned[i]) cursor = AlignUp(cursor, 16);
    list.fragments[i].src = cursor;
    list.fragments[i].bytes = sizes[i];
    cursor += sizes[i];
  }
  list.src_extent = cursor + 64;
  std::vector<size_t> order(sizes.size());
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  cursor = 0;
  for (size_t i : order) {
    cursor += gap(rng);
    if (aligned[i]) cursor = AlignUp(cursor, 16);
    list.fragments[i].dst = cursor;
    cursor += sizes[i];
    list.total_bytes += sizes[i];
  }
  list.dst_extent = cursor + 64;
  return list;
}

std::vector<uint8_t> RandomBytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> bytes(n);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const uint64_t v = rng();
    std::memcpy(bytes.data() + i, &v, 8);
  }
  for (; i < n; ++i) bytes[i] = static_cast<uint8_t>(rng());
  return bytes;
}

// Applies `list` (offsets) on host copies: the reference result.
void ApplyOnHost(const RandomList& list, const std::vector<uint8_t>& src,
                 std::vector<uint8_t>& dst) {
  for (const Fragment& f : list.fragments) {
    std::memcpy(dst.data() + f.dst, src.data() + f.src, f.bytes);
  }
}

// cudaMemcpy from pageable memory may return before the bytes land, and the
// engine's streams do not wait for the legacy default stream: synchronize.
void Upload(const CudaDeviceBuffer& buffer, const std::vector<uint8_t>& bytes) {
  ASSERT_THAT(CudaStatus(cudaMemcpy(buffer.data(), bytes.data(), bytes.size(),
                                    cudaMemcpyHostToDevice),
                         "cudaMemcpy"),
              IsOk());
  ASSERT_THAT(CudaStatus(cudaDeviceSynchronize(), "cudaDeviceSynchronize"), IsOk());
}

std::vector<uint8_t> Download(const CudaDeviceBuffer& buffer, size_t bytes) {
  std::vector<uint8_t> out(bytes);
  EXPECT_THAT(
      CudaStatus(cudaMemcpy(out.data(), buffer.data(), bytes, cudaMemcpyDeviceToHost), "cudaMemcpy"),
      IsOk());
  return out;
}

// Index of the first differing byte, or -1.
int64_t FirstMismatch(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  const auto [ia, ib] = std::mismatch(a.begin(), a.end(), b.begin(), b.end());
  if (ia == a.end() && ib == b.end()) return -1;
  return ia - a.begin();
}

// Waits for several `done` callbacks.
class DoneCounter {
 public:
  CopyDone Callback() {
    return [this](Status status) {
      std::lock_guard<std::mutex> lock(mu_);
      statuses_.push_back(std::move(status));
      cv_.notify_all();
    };
  }
  std::vector<Status> WaitFor(size_t n) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return statuses_.size() >= n; });
    return statuses_;
  }
  size_t count() {
    std::lock_guard<std::mutex> lock(mu_);
    return statuses_.size();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Status> statuses_;
};

// --- Without a device -------------------------------------------------------

TEST(CudaUtilTest, CudaStatusCarriesTheCallAndTheErrorText) {
  EXPECT_THAT(CudaStatus(cudaSuccess, "cudaMalloc"), IsOk());
  const Status status = CudaStatus(cudaErrorMemoryAllocation, "cudaMalloc(64 bytes on device 0)");
  EXPECT_THAT(status, StatusIs(StatusCode::kResourceExhausted,
                               HasSubstr("cudaMalloc(64 bytes on device 0): "
                                         "cudaErrorMemoryAllocation (")));
  EXPECT_THAT(CudaStatus(cudaErrorNoDevice, "x"), StatusIs(StatusCode::kUnavailable));
  EXPECT_THAT(CudaStatus(cudaErrorInvalidValue, "x"), StatusIs(StatusCode::kInvalidArgument));
  EXPECT_THAT(CudaStatus(cudaErrorIllegalAddress, "x"),
              StatusIs(StatusCode::kInternal, HasSubstr("cudaErrorIllegalAddress")));
}

TEST(CudaCopyEngineOptionsTest, BadOptionsAreInvalidArguments) {
  CudaCopyEngine::Options options;
  options.launch_slots = 0;
  EXPECT_THAT(CudaCopyEngine::Create(options),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("launch_slots")));
  options = CudaCopyEngine::Options();
  options.max_launch_bytes = 0;
  EXPECT_THAT(CudaCopyEngine::Create(options),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("max_launch_bytes")));
  options = CudaCopyEngine::Options();
  options.max_launch_pieces = 0;
  EXPECT_THAT(CudaCopyEngine::Create(options),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("max_launch_pieces")));
  options = CudaCopyEngine::Options();
  options.max_inline_pieces = cuda_copy::kInlinePieces + 1;
  EXPECT_THAT(CudaCopyEngine::Create(options),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("max_inline_pieces")));
  options = CudaCopyEngine::Options();
  options.max_mapped_pieces = CudaCopyEngine::Options::kMaxLaunchPieces + 1;
  EXPECT_THAT(CudaCopyEngine::Create(options),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("max_mapped_pieces")));
  for (const auto spin :
       {std::chrono::microseconds(-1),
        CudaCopyEngine::Options::kMaxSpinBeforeSleep + std::chrono::microseconds(1)}) {
    options = CudaCopyEngine::Options();
    options.spin_before_sleep = spin;
    EXPECT_THAT(CudaCopyEngine::Create(options),
                StatusIs(StatusCode::kInvalidArgument, HasSubstr("spin_before_sleep")));
  }
  for (const auto poll :
       {std::chrono::microseconds(-1), std::chrono::microseconds(Config::kMaxPollUs + 1)}) {
    options = CudaCopyEngine::Options();
    options.poll_before_sleep = poll;
    EXPECT_THAT(CudaCopyEngine::Create(options),
                StatusIs(StatusCode::kInvalidArgument, HasSubstr("poll_before_sleep")));
  }
}

TEST(CudaCopyEngineOptionsTest, CreateWithoutADeviceIsUnavailable) {
  std::string why;
  if (CudaDeviceCount(&why) > 0) GTEST_SKIP() << "a CUDA device is present";
  EXPECT_FALSE(why.empty());
  EXPECT_THAT(CudaCopyEngine::Create(0),
              StatusIs(StatusCode::kUnavailable, HasSubstr("no CUDA device")));
  EXPECT_THAT(CudaDeviceBuffer::Allocate(0, 64), ::testing::Not(IsOk()));
}

// --- With a device ----------------------------------------------------------

class CudaCopyEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_CUDA_DEVICE();
    MakeEngine(CudaCopyEngine::Options());
  }

  void MakeEngine(const CudaCopyEngine::Options& options) {
    engine_.reset();
    Result<std::unique_ptr<CudaCopyEngine>> engine = CudaCopyEngine::Create(options);
    ASSERT_THAT(engine, IsOk());
    engine_ = std::move(engine).value();
  }

  CudaDeviceBuffer Device(size_t bytes) {
    Result<CudaDeviceBuffer> buffer = CudaDeviceBuffer::Allocate(0, bytes);
    EXPECT_THAT(buffer, IsOk());
    return buffer.ok() ? std::move(buffer).value() : CudaDeviceBuffer();
  }

  enum class Kind { kGather, kScatter, kDirect };

  // Runs one random list of `kind` between two device buffers and compares
  // the whole destination (gaps included) with the host reference.
  // `with_empty`: zero-byte fragments with addresses nothing may touch are
  // mixed into the list (they are skipped, never checked).
  void RunRandom(Kind kind, uint64_t seed, int count, uint64_t max_bytes, bool with_empty = false,
                 bool word_sized = false) {
    std::mt19937_64 rng(seed);
    const RandomList list = MakeRandomList(rng, count, max_bytes, word_sized);
    CudaDeviceBuffer src = Device(list.src_extent);
    CudaDeviceBuffer dst = Device(list.dst_extent);
    ASSERT_NE(src.data(), nullptr);
    ASSERT_NE(dst.data(), nullptr);
    const std::vector<uint8_t> host_src = RandomBytes(list.src_extent, seed + 1);
    std::vector<uint8_t> expected(list.dst_extent, kUntouched);
    Upload(src, host_src);
    Upload(dst, expected);
    ApplyOnHost(list, host_src, expected);

    std::vector<Fragment> fragments = list.fragments;
    CopyBatch batch;
    switch (kind) {
      case Kind::kGather:  // absolute sources, offsets into the slot
        for (Fragment& f : fragments) f.src += src.addr().value();
        batch = GatherBatch(fragments, dst.addr());
        break;
      case Kind::kScatter:  // offsets out of the slot, absolute destinations
        for (Fragment& f : fragments) f.dst += dst.addr().value();
        batch = ScatterBatch(fragments, src.addr());
        break;
      case Kind::kDirect:
        for (Fragment& f : fragments) {
          f.src += src.addr().value();
          f.dst += dst.addr().value();
        }
        batch = DirectBatch(fragments);
        break;
    }
    if (with_empty) {
      std::vector<Fragment> mixed;
      for (size_t i = 0; i < fragments.size(); ++i) {
        if (i % 7 == 3) mixed.push_back({0xdead0000beef0000ull, 0xfeed0000face0000ull, 0});
        mixed.push_back(fragments[i]);
      }
      mixed.push_back({1, 2, 0});
      fragments = std::move(mixed);
      batch.fragments = fragments;
    }
    ASSERT_THAT(engine_->CopySync(batch), IsOk());
    EXPECT_EQ(FirstMismatch(Download(dst, list.dst_extent), expected), -1)
        << "seed " << seed << ", " << count << " fragments, " << list.total_bytes << " bytes";
  }

  // Runs one random tiled list (tests/copy/random_tiled.h) between two
  // device buffers, the bases as batch arguments or, for `absolute`, in
  // the outer offsets, and compares the whole destination with the host
  // reference.
  void RunRandomTiled(uint64_t seed, int outer, int segments, int shapes, int runs,
                      uint64_t max_bytes, bool absolute) {
    std::mt19937_64 rng(seed);
    const testing_tiled::RandomTiled r =
        testing_tiled::MakeRandomTiled(rng, outer, segments, shapes, runs, max_bytes);
    CudaDeviceBuffer src = Device(r.src_extent);
    CudaDeviceBuffer dst = Device(r.dst_extent);
    ASSERT_NE(src.data(), nullptr);
    ASSERT_NE(dst.data(), nullptr);
    const std::vector<uint8_t> host_src = RandomBytes(r.src_extent, seed + 1);
    std::vector<uint8_t> expected(r.dst_extent, kUntouched);
    Upload(src, host_src);
    Upload(dst, expected);
    testing_tiled::ApplyTiledOnHost(r.list, host_src, expected);
    TiledList list = r.list;
    CopyBatch batch{{}, src.addr(), dst.addr(), &list};
    if (absolute) {
      for (TileOffset& o : list.outer) {
        o.src += src.addr().value();
        o.dst += dst.addr().value();
      }
      batch = DirectBatch(list);
    }
    ASSERT_THAT(engine_->CopySync(batch), IsOk());
    EXPECT_EQ(FirstMismatch(Download(dst, r.dst_extent), expected), -1)
        << "seed " << seed << ", " << r.list.NumRuns() << " runs, " << r.list.TotalBytes()
        << " bytes";
  }

  std::unique_ptr<CudaCopyEngine> engine_;
};

// Tiled lists are expanded on the device: runs from 1 B to 256 KiB (cut
// into pieces), unaligned and aligned, shapes of different piece counts.
TEST_F(CudaCopyEngineTest, TiledListsMatchTheHostReference) {
  EXPECT_TRUE(engine_->Caps().tiled_lists);
  RunRandomTiled(61, 1, 40, 3, 20, KiB(256), /*absolute=*/false);
  RunRandomTiled(62, 7, 25, 2, 30, KiB(4), /*absolute=*/true);
  RunRandomTiled(63, 33, 130, 4, 8, 300, /*absolute=*/false);
  RunRandomTiled(64, 2, 1, 1, 1, MiB(2), /*absolute=*/true);
  const CudaCopyEngine::Stats stats = engine_->GetStats();
  EXPECT_EQ(stats.batches_completed, 4u);
  EXPECT_EQ(stats.launches, 4u);  // each list in one launch
}

// Batches of at most kInlinePieces pieces go in the kernel's parameters,
// one launch each: flat and tiled, at the limit and one piece past it, and
// at the small parameter block's limit and one past it.
TEST_F(CudaCopyEngineTest, SmallBatchesMatchTheHostReference) {
  RunRandom(Kind::kDirect, 91, 60, KiB(2));
  RunRandom(Kind::kGather, 92, 128, KiB(32));  // exactly the limit: every fragment one piece
  RunRandom(Kind::kScatter, 93, 3, KiB(200));  // fragments cut into several pieces
  RunRandomTiled(94, 2, 3, 2, 8, 5000, /*absolute=*/false);
  RunRandomTiled(95, 1, 1, 1, 1, 100, /*absolute=*/true);
  // The small parameter block: one piece, at its bound, one past it.
  RunRandom(Kind::kDirect, 99, 1, KiB(4));
  RunRandom(Kind::kScatter, 100, cuda_copy::kSmallInlinePieces, KiB(32));
  RunRandom(Kind::kGather, 101, cuda_copy::kSmallInlinePieces + 1, 300);
  EXPECT_EQ(engine_->GetStats().launches, 8u);
  RunRandom(Kind::kDirect, 96, 129, KiB(32));  // one past: uploaded, still one launch
  EXPECT_EQ(engine_->GetStats().launches, 9u);
  CudaCopyEngine::Options options;
  options.max_inline_pieces = 0;  // every batch uploaded
  MakeEngine(options);
  RunRandom(Kind::kDirect, 97, 10, KiB(2));
  RunRandomTiled(98, 1, 2, 1, 3, 100, /*absolute=*/true);
  EXPECT_EQ(engine_->GetStats().launches, 2u);
}

// A flat launch of at most max_mapped_pieces pieces reads its descriptors
// from the pinned staging buffer, a larger one from their upload: lists
// below, at and above the bound, verbatim and cut, over one launch and
// several, give the same bytes as the host reference either way.
TEST_F(CudaCopyEngineTest, DescriptorsReadMappedOrUploadedMatchTheHostReference) {
  for (const uint32_t mapped : {0u, 300u, CudaCopyEngine::Options::kMaxLaunchPieces}) {
    CudaCopyEngine::Options options;
    options.max_mapped_pieces = mapped;
    options.max_launch_pieces = 1000;
    MakeEngine(options);
    RunRandom(Kind::kDirect, 131, 299, KiB(4));   // verbatim, one launch
    RunRandom(Kind::kGather, 132, 300, KiB(32));  // at the bound: a piece each
    RunRandom(Kind::kScatter, 133, 301, 256, /*with_empty=*/false, /*word_sized=*/true);
    RunRandom(Kind::kDirect, 134, 40, KiB(300));  // cut into pieces: ~370 of them
    RunRandom(Kind::kDirect, 135, 2500, KiB(2));  // three launches, the last of 500 pieces
    const CudaCopyEngine::Stats stats = engine_->GetStats();
    EXPECT_EQ(stats.batches_failed, 0u) << "max_mapped_pieces " << mapped;
    EXPECT_EQ(stats.batches_completed, 5u) << "max_mapped_pieces " << mapped;
  }
}

// Launches whose pieces are all small copy a piece per group of 8 (at most
// 128 bytes) or 16 lanes (at most 256): a 16-byte word a lane where the
// piece is aligned and word-sized on both sides, the general way for the
// rest. Flat lists uploaded and in the kernel's parameters, tiled lists,
// empty fragments among them; at 129 and 257 bytes the next size up.
TEST_F(CudaCopyEngineTest, SmallPiecesInLaneGroupsMatchTheHostReference) {
  RunRandom(Kind::kDirect, 111, 20000, 128, /*with_empty=*/true, /*word_sized=*/true);
  RunRandom(Kind::kGather, 112, 20000, 256, /*with_empty=*/false, /*word_sized=*/true);
  RunRandom(Kind::kScatter, 113, 5000, 256);
  RunRandom(Kind::kDirect, 114, 5000, 129, /*with_empty=*/false, /*word_sized=*/true);
  RunRandom(Kind::kDirect, 115, 5000, 257, /*with_empty=*/false, /*word_sized=*/true);
  RunRandom(Kind::kDirect, 116, 100, 256, /*with_empty=*/true, /*word_sized=*/true);  // inline
  RunRandom(Kind::kGather, 117, 120, 100);                                           // inline
  RunRandomTiled(118, 9, 60, 3, 20, 256, /*absolute=*/false);
  RunRandomTiled(119, 5, 30, 2, 10, 128, /*absolute=*/true);
  RunRandomTiled(120, 2, 3, 2, 8, 64, /*absolute=*/false);  // inline
  EXPECT_EQ(engine_->GetStats().batches_failed, 0u);
}

// A launch holds whole segments within max_launch_bytes; a list whose
// fixed part does not fit the staging buffer runs expanded.
TEST_F(CudaCopyEngineTest, TiledListsOverSeveralLaunchesOrExpanded) {
  CudaCopyEngine::Options options;
  options.max_launch_bytes = 50000;
  options.launch_slots = 2;
  MakeEngine(options);
  RunRandomTiled(71, 3, 60, 3, 10, KiB(8), /*absolute=*/false);
  EXPECT_GT(engine_->GetStats().launches, 5u);
  options = CudaCopyEngine::Options();
  options.max_launch_pieces = 8;  // 192 staging bytes: too few for the shapes
  MakeEngine(options);
  RunRandomTiled(72, 2, 10, 3, 10, 2000, /*absolute=*/true);
  EXPECT_GT(engine_->GetStats().launches, 2u);
}

// A stop between two launches of a tiled batch skips the rest.
TEST_F(CudaCopyEngineTest, StopDuringATiledBatchSkipsTheRest) {
  std::stop_source stop;
  CudaCopyEngine::Options options;
  options.max_launch_bytes = 1;  // one segment a launch
  options.launch_hook_for_testing = [&](size_t launch) {
    if (launch == 2) stop.request_stop();
  };
  MakeEngine(options);
  std::mt19937_64 rng(81);
  testing_tiled::RandomTiled r = testing_tiled::MakeRandomTiled(rng, 1, 20, 1, 4, 1000);
  CudaDeviceBuffer src = Device(r.src_extent);
  CudaDeviceBuffer dst = Device(r.dst_extent);
  std::promise<Status> done;
  ASSERT_THAT(engine_->Submit(
                  CopyBatch{{}, src.addr(), dst.addr(), &r.list},
                  [&](Status s) { done.set_value(std::move(s)); }, stop.get_token()),
              IsOk());
  const Status status = done.get_future().get();
  EXPECT_THAT(status, StatusIs(StatusCode::kCancelled));
  EXPECT_THAT(std::string(status.message()), HasSubstr("not copied"));
  EXPECT_EQ(engine_->GetStats().launches, 2u);
}

// Merged launches: tiled batches of the same tables queued right behind a
// batch that ends in a launch ride in it, each whole, each with its own
// `done`; a batch of other tables, or one whose stop came before its
// launch, does not ride; every byte of the batches that ran lands, nothing
// of the stopped one.
// The largest run of a tiled list (its pieces are the runs when none is
// above cuda_copy::kMaxPieceBytes).
uint64_t LargestRun(const TiledList& list) {
  uint64_t largest = 0;
  for (const Fragment& run : list.runs) largest = std::max(largest, run.bytes);
  return largest;
}

// Queued tiled batches ride in the launch the batch ahead of them ends in:
// those of its tables as more segments of its list, those of other tables
// and bases as lists of their own; a batch whose pieces take other lane
// groups, or whose stop came first, does not ride.
TEST_F(CudaCopyEngineTest, QueuedTiledBatchesRideInOneLaunch) {
  std::promise<void> all_queued;
  std::shared_future<void> queued = all_queued.get_future().share();
  CudaCopyEngine::Options options;
  options.max_inline_pieces = 0;  // every batch uploaded, as large ones are
  // Every batch's first launch waits until all are queued.
  options.launch_hook_for_testing = [queued](size_t launch) {
    if (launch == 0) queued.wait();
  };
  MakeEngine(options);
  std::mt19937_64 rng(131);
  const testing_tiled::RandomTiled r = testing_tiled::MakeRandomTiled(rng, 3, 24, 3, 6, KiB(2));
  std::mt19937_64 rng2(132);
  const testing_tiled::RandomTiled other = testing_tiled::MakeRandomTiled(rng2, 2, 4, 2, 8, 3000);
  std::mt19937_64 rng3(135);
  const testing_tiled::RandomTiled tiny = testing_tiled::MakeRandomTiled(rng3, 2, 5, 2, 4, 100);
  ASSERT_EQ(cuda_copy::GroupLanesFor(LargestRun(r.list)), 32);
  ASSERT_EQ(cuda_copy::GroupLanesFor(LargestRun(other.list)), 32);
  ASSERT_EQ(cuda_copy::GroupLanesFor(LargestRun(tiny.list)), 8);
  CudaDeviceBuffer src = Device(r.src_extent);
  CudaDeviceBuffer dst = Device(r.dst_extent);
  CudaDeviceBuffer other_src = Device(other.src_extent);
  CudaDeviceBuffer other_dst = Device(other.dst_extent);
  CudaDeviceBuffer tiny_src = Device(tiny.src_extent);
  CudaDeviceBuffer tiny_dst = Device(tiny.dst_extent);
  ASSERT_NE(dst.data(), nullptr);
  ASSERT_NE(other_dst.data(), nullptr);
  ASSERT_NE(tiny_dst.data(), nullptr);
  const std::vector<uint8_t> host_src = RandomBytes(r.src_extent, 133);
  const std::vector<uint8_t> other_host_src = RandomBytes(other.src_extent, 134);
  const std::vector<uint8_t> tiny_host_src = RandomBytes(tiny.src_extent, 136);
  Upload(src, host_src);
  Upload(other_src, other_host_src);
  Upload(tiny_src, tiny_host_src);
  Upload(dst, std::vector<uint8_t>(r.dst_extent, kUntouched));
  Upload(other_dst, std::vector<uint8_t>(other.dst_extent, kUntouched));
  Upload(tiny_dst, std::vector<uint8_t>(tiny.dst_extent, kUntouched));

  // Six batches of r's tables, four of its segments each.
  std::vector<TiledList> parts(6, r.list);
  for (size_t i = 0; i < parts.size(); ++i) {
    parts[i].segments.assign(r.list.segments.begin() + static_cast<std::ptrdiff_t>(4 * i),
                             r.list.segments.begin() + static_cast<std::ptrdiff_t>(4 * i + 4));
  }
  std::stop_source stop_part4;
  stop_part4.request_stop();
  std::mutex mu;
  std::vector<int> order;
  std::vector<Status> statuses(9);
  DoneCounter counter;
  auto submit = [&](int index, const CopyBatch& batch, std::stop_token stop) {
    ASSERT_THAT(engine_->Submit(
                    batch,
                    [&, index, done = counter.Callback()](Status s) mutable {
                      {
                        std::lock_guard<std::mutex> lock(mu);
                        order.push_back(index);
                        statuses[static_cast<size_t>(index)] = s;
                      }
                      done(std::move(s));
                    },
                    std::move(stop)),
                IsOk());
  };
  // Queue: parts 0-2 (one list), other (a list of its own), part 3 (a third
  // list: the one before it is other's), tiny (other lane groups: not
  // riding, a launch of its own), part 4 (stopped), part 5 (alone: the
  // stopped batch ahead of it ended the riding), other again (rides with
  // part 5).
  for (int i = 0; i < 3; ++i) submit(i, CopyBatch{{}, src.addr(), dst.addr(), &parts[i]}, {});
  submit(3, CopyBatch{{}, other_src.addr(), other_dst.addr(), &other.list}, {});
  submit(4, CopyBatch{{}, src.addr(), dst.addr(), &parts[3]}, {});
  submit(5, CopyBatch{{}, tiny_src.addr(), tiny_dst.addr(), &tiny.list}, {});
  submit(6, CopyBatch{{}, src.addr(), dst.addr(), &parts[4]}, stop_part4.get_token());
  submit(7, CopyBatch{{}, src.addr(), dst.addr(), &parts[5]}, {});
  submit(8, CopyBatch{{}, other_src.addr(), other_dst.addr(), &other.list}, {});
  all_queued.set_value();
  counter.WaitFor(9);

  for (int i : {0, 1, 2, 3, 4, 5, 7, 8}) EXPECT_THAT(statuses[static_cast<size_t>(i)], IsOk()) << i;
  EXPECT_THAT(statuses[6], StatusIs(StatusCode::kCancelled));
  {
    std::lock_guard<std::mutex> lock(mu);
    // The stopped batch may finish at once, ahead of launches in flight;
    // the riders finish right after the batch they rode with, in order.
    const auto at = std::find(order.begin(), order.end(), 0);
    ASSERT_LE(at + 5, order.end());
    EXPECT_EQ(std::vector<int>(at, at + 5), (std::vector<int>{0, 1, 2, 3, 4}))
        << "the riders finish after the batch they rode with, in queue order";
    const auto at7 = std::find(order.begin(), order.end(), 7);
    ASSERT_LE(at7 + 2, order.end());
    EXPECT_EQ(*(at7 + 1), 8);
  }
  const CudaCopyEngine::Stats stats = engine_->GetStats();
  EXPECT_EQ(stats.batches_completed, 9u);
  EXPECT_EQ(stats.batches_cancelled, 1u);
  EXPECT_EQ(stats.launches, 3u) << "parts 0-3 with other; tiny alone; part 5 with other";

  std::vector<uint8_t> expected(r.dst_extent, kUntouched);
  for (int i : {0, 1, 2, 3, 5}) testing_tiled::ApplyTiledOnHost(parts[i], host_src, expected);
  EXPECT_EQ(FirstMismatch(Download(dst, r.dst_extent), expected), -1);
  std::vector<uint8_t> other_expected(other.dst_extent, kUntouched);
  testing_tiled::ApplyTiledOnHost(other.list, other_host_src, other_expected);
  EXPECT_EQ(FirstMismatch(Download(other_dst, other.dst_extent), other_expected), -1);
  std::vector<uint8_t> tiny_expected(tiny.dst_extent, kUntouched);
  testing_tiled::ApplyTiledOnHost(tiny.list, tiny_host_src, tiny_expected);
  EXPECT_EQ(FirstMismatch(Download(tiny_dst, tiny.dst_extent), tiny_expected), -1);
}

// Many batches of random tables merge into few launches, up to the
// staging buffer and the lists a launch holds; every byte lands.
TEST_F(CudaCopyEngineTest, ManyTablesMergeWithinTheStagingBuffer) {
  for (const uint32_t launch_pieces : {65536u, 300u}) {
    std::promise<void> all_queued;
    std::shared_future<void> queued = all_queued.get_future().share();
    CudaCopyEngine::Options options;
    options.max_inline_pieces = 0;
    options.max_launch_pieces = launch_pieces;  // 300: a few lists a launch
    options.launch_hook_for_testing = [queued](size_t launch) {
      if (launch == 0) queued.wait();
    };
    MakeEngine(options);
    constexpr int kBatches = 80;  // more than cuda_copy::kMaxTiledLists
    std::vector<testing_tiled::RandomTiled> lists;
    std::vector<CudaDeviceBuffer> srcs, dsts;
    std::vector<std::vector<uint8_t>> host_srcs;
    for (int i = 0; i < kBatches; ++i) {
      std::mt19937_64 rng(1000 + static_cast<uint64_t>(i));
      // Some lists hold only pieces of at most 256 B: other lane groups.
      lists.push_back(testing_tiled::MakeRandomTiled(rng, 2, 3, 2, 6, KiB(4)));
      srcs.push_back(Device(lists.back().src_extent));
      dsts.push_back(Device(lists.back().dst_extent));
      ASSERT_NE(dsts.back().data(), nullptr);
      host_srcs.push_back(RandomBytes(lists.back().src_extent, 2000 + static_cast<uint64_t>(i)));
      Upload(srcs.back(), host_srcs.back());
      Upload(dsts.back(), std::vector<uint8_t>(lists.back().dst_extent, kUntouched));
    }
    DoneCounter counter;
    for (int i = 0; i < kBatches; ++i) {
      const size_t k = static_cast<size_t>(i);
      ASSERT_THAT(engine_->Submit(CopyBatch{{}, srcs[k].addr(), dsts[k].addr(), &lists[k].list},
                                  counter.Callback()),
                  IsOk());
    }
    all_queued.set_value();
    for (const Status& s : counter.WaitFor(kBatches)) EXPECT_THAT(s, IsOk());
    for (int i = 0; i < kBatches; ++i) {
      const size_t k = static_cast<size_t>(i);
      std::vector<uint8_t> expected(lists[k].dst_extent, kUntouched);
      testing_tiled::ApplyTiledOnHost(lists[k].list, host_srcs[k], expected);
      EXPECT_EQ(FirstMismatch(Download(dsts[k], lists[k].dst_extent), expected), -1)
          << "batch " << i << ", max_launch_pieces " << launch_pieces;
    }
    const uint64_t launches = engine_->GetStats().launches;
    EXPECT_GE(launches, 2u) << "at most kMaxTiledLists lists a launch";
    EXPECT_LT(launches, static_cast<uint64_t>(kBatches) / 2) << launch_pieces;
  }
}

TEST_F(CudaCopyEngineTest, CapsSayDeviceMemoryOnly) {
  const CopyEngineCaps caps = engine_->Caps();
  EXPECT_TRUE(caps.device_memory);
  EXPECT_FALSE(caps.host_memory);
  EXPECT_GT(caps.cost.batch_us, 0);
  EXPECT_GT(caps.cost.bytes_per_us, 0);
  EXPECT_EQ(engine_->Name(), "cuda");
}

TEST_F(CudaCopyEngineTest, GatherMatchesTheHostReference) {
  for (uint64_t seed = 1; seed <= 4; ++seed) RunRandom(Kind::kGather, seed, 300, MiB(1));
}

TEST_F(CudaCopyEngineTest, ScatterMatchesTheHostReference) {
  for (uint64_t seed = 11; seed <= 14; ++seed) RunRandom(Kind::kScatter, seed, 300, MiB(1));
}

TEST_F(CudaCopyEngineTest, DirectMatchesTheHostReference) {
  for (uint64_t seed = 21; seed <= 24; ++seed) RunRandom(Kind::kDirect, seed, 300, MiB(1));
}

TEST_F(CudaCopyEngineTest, ManySmallFragmentsMatchTheHostReference) {
  RunRandom(Kind::kDirect, 31, 20000, 300);
}

TEST_F(CudaCopyEngineTest, SmallLaunchesMatchTheHostReference) {
  CudaCopyEngine::Options options;
  options.max_launch_bytes = 100000;  // fragments span launches
  options.max_launch_pieces = 7;
  options.launch_slots = 2;
  MakeEngine(options);
  RunRandom(Kind::kDirect, 41, 200, KiB(256));
  EXPECT_GT(engine_->GetStats().launches, 20u);
}

// Lists whose fragments all fit a piece (at most 32 KiB) go up as they are,
// with the slot's base as a kernel argument: gather, scatter and direct, over
// several launches, with empty fragments among them.
TEST_F(CudaCopyEngineTest, ListsOfSmallFragmentsMatchTheHostReference) {
  CudaCopyEngine::Options options;
  options.max_launch_pieces = 500;
  MakeEngine(options);
  RunRandom(Kind::kGather, 51, 4000, KiB(32), /*with_empty=*/true);
  RunRandom(Kind::kScatter, 52, 4000, KiB(32), /*with_empty=*/true);
  RunRandom(Kind::kDirect, 53, 4000, KiB(4), /*with_empty=*/true);
  EXPECT_GE(engine_->GetStats().launches, 3u * 8);
  // A byte bound below a piece: the run stops before it would pass it.
  options.max_launch_pieces = 65536;
  options.max_launch_bytes = 10000;
  MakeEngine(options);
  RunRandom(Kind::kGather, 54, 500, 4000, /*with_empty=*/true);
  EXPECT_GE(engine_->GetStats().launches, 10u);  // ~240 KB in launches of <= 10000 B
}

// Whether the engine thread polls a launch's end or sleeps on it at once,
// every batch completes with its bytes in place.
TEST_F(CudaCopyEngineTest, PollingOrSleepingOnALaunchBothComplete) {
  for (const auto spin : {std::chrono::microseconds(0), std::chrono::microseconds(1000)}) {
    SCOPED_TRACE("spin_before_sleep " + std::to_string(spin.count()) + " us");
    CudaCopyEngine::Options options;
    options.spin_before_sleep = spin;
    options.max_launch_pieces = 16;  // several launches a batch
    MakeEngine(options);
    RunRandom(Kind::kDirect, 43, 100, KiB(64));
    EXPECT_GT(engine_->GetStats().launches, 4u);
  }
}

TEST_F(CudaCopyEngineTest, EmptyBatchesCompleteOk) {
  EXPECT_THAT(engine_->Copy({}), IsOk());
  CudaDeviceBuffer buffer = Device(64);
  const uint64_t base = buffer.addr().value();
  const std::vector<Fragment> zero = {{base, base + 32, 0}, {0, 0, 0}};
  EXPECT_THAT(engine_->Copy(zero), IsOk());
  EXPECT_EQ(engine_->GetStats().launches, 0u);
}

TEST_F(CudaCopyEngineTest, ValidationErrorsAreReturnedBySubmit) {
  CudaDeviceBuffer buffer = Device(4096);
  const uint64_t base = buffer.addr().value();
  bool called = false;
  const std::vector<Fragment> overlapping = {{base, base + 100, 200}};
  EXPECT_THAT(engine_->Submit(DirectBatch(overlapping), [&](Status) { called = true; }),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("overlap")));
  const std::vector<Fragment> null_source = {{0, base, 16}};
  EXPECT_THAT(engine_->Submit(DirectBatch(null_source), [&](Status) { called = true; }),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("address is 0")));
  const std::vector<Fragment> ok = {{base, base + 2048, 16}};
  EXPECT_THAT(engine_->Submit(DirectBatch(ok), CopyDone()),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("callback")));
  EXPECT_FALSE(called);
}

TEST_F(CudaCopyEngineTest, ManyBatchesInFlightFromSeveralThreads) {
  constexpr int kThreads = 4;
  constexpr int kBatchesPerThread = 12;
  constexpr uint64_t kRegion = MiB(4);
  constexpr uint64_t kFragment = KiB(4) + 3;  // unaligned ends
  constexpr uint64_t kPerBatch = kRegion / kBatchesPerThread / kFragment;
  CudaDeviceBuffer src = Device(kThreads * kRegion);
  CudaDeviceBuffer dst = Device(kThreads * kRegion);
  const std::vector<uint8_t> host_src = RandomBytes(kThreads * kRegion, 7);
  Upload(src, host_src);
  Upload(dst, std::vector<uint8_t>(kThreads * kRegion, kUntouched));

  // Each batch copies its own run of fragments to the mirrored place.
  std::vector<std::vector<Fragment>> lists(kThreads * kBatchesPerThread);
  for (int t = 0; t < kThreads; ++t) {
    for (int b = 0; b < kBatchesPerThread; ++b) {
      auto& list = lists[static_cast<size_t>(t * kBatchesPerThread + b)];
      for (uint64_t i = 0; i < kPerBatch; ++i) {
        const uint64_t offset = t * kRegion + (b * kPerBatch + i) * kFragment;
        list.push_back({src.addr().value() + offset, dst.addr().value() + offset, kFragment});
      }
    }
  }
  DoneCounter counter;
  std::vector<std::thread> threads;
  std::atomic<int> submit_errors{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int b = 0; b < kBatchesPerThread; ++b) {
        const auto& list = lists[static_cast<size_t>(t * kBatchesPerThread + b)];
        if (!engine_->Submit(DirectBatch(list), counter.Callback()).ok()) ++submit_errors;
      }
    });
  }
  for (std::thread& t : threads) t.join();
  ASSERT_EQ(submit_errors.load(), 0);
  for (const Status& status : counter.WaitFor(lists.size())) EXPECT_THAT(status, IsOk());

  std::vector<uint8_t> expected(kThreads * kRegion, kUntouched);
  for (const auto& list : lists) {
    for (const Fragment& f : list) {
      const uint64_t offset = f.src - src.addr().value();
      std::memcpy(expected.data() + offset, host_src.data() + offset, f.bytes);
    }
  }
  EXPECT_EQ(FirstMismatch(Download(dst, expected.size()), expected), -1);
  EXPECT_EQ(engine_->GetStats().batches_completed, lists.size());
}

TEST_F(CudaCopyEngineTest, StopBeforeSubmitCancelsTheWholeBatch) {
  CudaDeviceBuffer src = Device(MiB(1));
  CudaDeviceBuffer dst = Device(MiB(1));
  Upload(dst, std::vector<uint8_t>(MiB(1), kUntouched));
  const std::vector<Fragment> list = {{src.addr().value(), dst.addr().value(), MiB(1)}};
  std::stop_source stop;
  stop.request_stop();
  DoneCounter counter;
  ASSERT_THAT(engine_->Submit(DirectBatch(list), counter.Callback(), stop.get_token()), IsOk());
  const std::vector<Status> statuses = counter.WaitFor(1);
  EXPECT_THAT(statuses[0], StatusIs(StatusCode::kCancelled,
                                    HasSubstr("1048576 of 1048576 bytes not copied")));
  EXPECT_EQ(FirstMismatch(Download(dst, MiB(1)), std::vector<uint8_t>(MiB(1), kUntouched)), -1);
  EXPECT_EQ(engine_->GetStats().batches_cancelled, 1u);
}

TEST_F(CudaCopyEngineTest, StopDuringAMultiLaunchBatchSkipsTheRest) {
  CudaCopyEngine::Options options;
  options.max_launch_bytes = MiB(1);
  std::stop_source stop;
  options.launch_hook_for_testing = [&stop](size_t launch_index) {
    if (launch_index == 3) stop.request_stop();
  };
  MakeEngine(options);
  constexpr uint64_t kTotal = MiB(32);
  CudaDeviceBuffer src = Device(kTotal);
  CudaDeviceBuffer dst = Device(kTotal);
  const std::vector<uint8_t> host_src = RandomBytes(kTotal, 3);
  Upload(src, host_src);
  Upload(dst, std::vector<uint8_t>(kTotal, kUntouched));
  std::vector<Fragment> list;
  for (uint64_t at = 0; at < kTotal; at += KiB(256)) {
    list.push_back({src.addr().value() + at, dst.addr().value() + at, KiB(256)});
  }
  DoneCounter counter;
  ASSERT_THAT(engine_->Submit(DirectBatch(list), counter.Callback(), stop.get_token()), IsOk());
  const std::vector<Status> statuses = counter.WaitFor(1);
  EXPECT_THAT(statuses[0],
              StatusIs(StatusCode::kCancelled,
                       HasSubstr(std::to_string(kTotal - MiB(3)) + " of " +
                                 std::to_string(kTotal) + " bytes not copied")));
  // The three launches before the stop landed; nothing after them did.
  const std::vector<uint8_t> out = Download(dst, kTotal);
  EXPECT_TRUE(std::equal(out.begin(), out.begin() + MiB(3), host_src.begin()));
  EXPECT_TRUE(std::all_of(out.begin() + MiB(3), out.end(),
                          [](uint8_t b) { return b == kUntouched; }));
  EXPECT_EQ(engine_->GetStats().launches, 3u);
  engine_.reset();  // its hook refers to `stop`
}

TEST_F(CudaCopyEngineTest, DestructionFinishesEveryAcceptedBatch) {
  constexpr int kBatches = 8;
  constexpr uint64_t kEach = MiB(16);
  CudaDeviceBuffer src = Device(kBatches * kEach);
  CudaDeviceBuffer dst = Device(kBatches * kEach);
  const std::vector<uint8_t> host_src = RandomBytes(kBatches * kEach, 5);
  Upload(src, host_src);
  std::vector<std::vector<Fragment>> lists(kBatches);
  for (int b = 0; b < kBatches; ++b) {
    for (uint64_t at = 0; at < kEach; at += KiB(64)) {
      const uint64_t offset = b * kEach + at;
      lists[static_cast<size_t>(b)].push_back(
          {src.addr().value() + offset, dst.addr().value() + offset, KiB(64)});
    }
  }
  DoneCounter counter;
  for (const auto& list : lists) {
    ASSERT_THAT(engine_->Submit(DirectBatch(list), counter.Callback()), IsOk());
  }
  engine_.reset();  // joins: every `done` has run when this returns
  ASSERT_EQ(counter.count(), static_cast<size_t>(kBatches));
  for (const Status& status : counter.WaitFor(kBatches)) EXPECT_THAT(status, IsOk());
  EXPECT_EQ(FirstMismatch(Download(dst, host_src.size()), host_src), -1);
}

TEST_F(CudaCopyEngineTest, PinnedHostMemoryAsSourceAndDestination) {
  constexpr uint64_t kBytes = MiB(8) + 5;
  Result<CudaPinnedBuffer> pinned_src = CudaPinnedBuffer::Allocate(kBytes);
  Result<CudaPinnedBuffer> pinned_dst = CudaPinnedBuffer::Allocate(kBytes);
  ASSERT_THAT(pinned_src, IsOk());
  ASSERT_THAT(pinned_dst, IsOk());
  const std::vector<uint8_t> bytes = RandomBytes(kBytes, 9);
  std::memcpy(pinned_src->data(), bytes.data(), kBytes);
  std::memset(pinned_dst->data(), kUntouched, kBytes);
  CudaDeviceBuffer device = Device(kBytes);

  // Pinned host -> device, in unaligned fragments of 100 KiB + 1.
  std::vector<Fragment> up, down;
  for (uint64_t at = 0; at < kBytes; at += KiB(100) + 1) {
    const uint64_t n = std::min<uint64_t>(KiB(100) + 1, kBytes - at);
    up.push_back({pinned_src->addr().value() + at, device.addr().value() + at, n});
    down.push_back({device.addr().value() + at, pinned_dst->addr().value() + at, n});
  }
  ASSERT_THAT(engine_->Copy(up), IsOk());
  EXPECT_EQ(FirstMismatch(Download(device, kBytes), bytes), -1);
  // Device -> pinned host.
  ASSERT_THAT(engine_->Copy(down), IsOk());
  const auto* landed = static_cast<const uint8_t*>(pinned_dst->data());
  EXPECT_EQ(FirstMismatch(std::vector<uint8_t>(landed, landed + kBytes), bytes), -1);
}

TEST_F(CudaCopyEngineTest, SubmitFromADoneCallback) {
  CudaDeviceBuffer src = Device(KiB(64));
  CudaDeviceBuffer dst = Device(KiB(64));
  const std::vector<uint8_t> host_src = RandomBytes(KiB(64), 11);
  Upload(src, host_src);
  const std::vector<Fragment> first = {{src.addr().value(), dst.addr().value(), KiB(32)}};
  const std::vector<Fragment> second = {
      {src.addr().value() + KiB(32), dst.addr().value() + KiB(32), KiB(32)}};
  DoneCounter counter;
  CopyDone then = counter.Callback();
  ASSERT_THAT(engine_->Submit(DirectBatch(first),
                              [&](Status status) {
                                EXPECT_THAT(status, IsOk());
                                EXPECT_THAT(engine_->Submit(DirectBatch(second), then), IsOk());
                              }),
              IsOk());
  EXPECT_THAT(counter.WaitFor(1)[0], IsOk());
  EXPECT_EQ(FirstMismatch(Download(dst, KiB(64)), host_src), -1);
}

}  // namespace
}  // namespace kvbounce
