// CUDA memory: device, pinned and VMM allocations, VMM export and import,
// LocatePointer. Argument checks and the errors without a device run
// everywhere the module is built; every case that needs a GPU skips with
// "no CUDA device: ..." where there is none.
#include "copy/cuda/cuda_memory.h"

#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/status_matchers.h"
#include "copy/cuda/cuda_util.h"
#include "kvbounce/status.h"
#include "kvbounce/types.h"
#include "memory/allocation.h"

namespace kvbounce {
namespace {

using ::kvbounce::testing_util::IsOk;
using ::kvbounce::testing_util::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;

constexpr size_t kPiB = size_t{1} << 50;

#define SKIP_WITHOUT_CUDA_DEVICE()                                             \
  do {                                                                         \
    std::string why;                                                           \
    if (CudaDeviceCount(&why) == 0) GTEST_SKIP() << "no CUDA device: " << why; \
  } while (false)

// VMM cases also need the device to support VMM with POSIX descriptors.
#define SKIP_WITHOUT_CUDA_VMM()                                                    \
  do {                                                                             \
    SKIP_WITHOUT_CUDA_DEVICE();                                                    \
    const Status supported = CudaVmmAllocation::CheckSupported(0);                 \
    if (!supported.ok()) GTEST_SKIP() << "no CUDA VMM on device 0: " << supported; \
  } while (false)

void* DevicePointer(Addr address) {
  return reinterpret_cast<void*>(static_cast<uintptr_t>(address.value()));
}

std::vector<uint8_t> Pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> bytes(n);
  for (size_t i = 0; i < n; ++i) bytes[i] = static_cast<uint8_t>(i * 131 + (i >> 9) + seed);
  return bytes;
}

// cudaMemcpy from pageable memory may return before the bytes land:
// synchronize before anything else reads them.
Status Upload(Addr device_address, const std::vector<uint8_t>& bytes) {
  KVB_CUDA_RETURN_IF_ERROR(
      cudaMemcpy(DevicePointer(device_address), bytes.data(), bytes.size(), cudaMemcpyHostToDevice),
      "cudaMemcpy (upload)");
  return CudaStatus(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

Result<std::vector<uint8_t>> Download(Addr device_address, size_t bytes) {
  std::vector<uint8_t> out(bytes);
  KVB_CUDA_RETURN_IF_ERROR(
      cudaMemcpy(out.data(), DevicePointer(device_address), bytes, cudaMemcpyDeviceToHost),
      "cudaMemcpy (download)");
  return out;
}

// Index of the first differing byte, or -1.
int64_t FirstMismatch(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  const auto [ia, ib] = std::mismatch(a.begin(), a.end(), b.begin(), b.end());
  if (ia == a.end() && ib == b.end()) return -1;
  return ia - a.begin();
}

bool FdIsOpen(int fd) { return fcntl(fd, F_GETFD) != -1; }

// Free device memory on the current device.
size_t FreeDeviceBytes() {
  size_t free_bytes = 0;
  size_t total_bytes = 0;
  EXPECT_THAT(CudaStatus(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo"), IsOk());
  return free_bytes;
}

// --- Everywhere: arguments and the errors without a device ---

TEST(CudaMemoryArgumentsTest, ZeroBytesIsInvalid) {
  EXPECT_THAT(CudaDeviceAllocation::Create(0, 0),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("0 bytes")));
  EXPECT_THAT(CudaPinnedAllocation::Create(0),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("0 bytes")));
  EXPECT_THAT(CudaVmmAllocation::Create(0, 0),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("0 bytes")));
  EXPECT_THAT(CudaVmmMapping::Import(0, 0, 0),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("mapped_bytes")));
}

TEST(CudaMemoryArgumentsTest, NegativeDeviceIsInvalid) {
  EXPECT_THAT(CudaDeviceAllocation::Create(-1, 4096),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("device -1")));
  EXPECT_THAT(CudaVmmAllocation::Create(-1, 4096),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("device -1")));
  EXPECT_THAT(CudaVmmAllocation::CheckSupported(-1),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("device -1")));
  EXPECT_THAT(CudaVmmMapping::Import(0, size_t{2} << 20, -1),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("device -1")));
}

TEST(CudaMemoryArgumentsTest, NegativeFdIsInvalid) {
  EXPECT_THAT(CudaVmmMapping::Import(-1, size_t{2} << 20, 0),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("fd -1")));
}

TEST(CudaMemoryArgumentsTest, LocatingAddressZeroIsInvalid) {
  EXPECT_THAT(LocatePointer(Addr(0)),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("address 0")));
}

// The first ordinal past the last device: with no device (or no driver)
// nothing can be made, kUnavailable; with devices it names the ordinal and
// the count.
TEST(CudaMemoryNoDeviceTest, DevicePastTheLastIsUnavailableOrInvalid) {
  std::string why;
  const int count = CudaDeviceCount(&why);
  auto expected = [count](std::string_view call) {
    if (count == 0) return StatusIs(StatusCode::kUnavailable, HasSubstr(std::string(call)));
    return StatusIs(StatusCode::kInvalidArgument,
                    HasSubstr("device " + std::to_string(count) + " of " + std::to_string(count)));
  };
  EXPECT_THAT(CudaDeviceAllocation::Create(count, 4096), expected("cudaGetDeviceCount"));
  EXPECT_THAT(CudaVmmAllocation::Create(count, 4096), expected("cudaGetDeviceCount"));
  EXPECT_THAT(CudaVmmAllocation::CheckSupported(count), expected("cudaGetDeviceCount"));
  int pipe_fds[2];
  ASSERT_EQ(pipe(pipe_fds), 0);
  UniqueFd read_end(pipe_fds[0]);
  UniqueFd write_end(pipe_fds[1]);
  EXPECT_THAT(CudaVmmMapping::Import(read_end.get(), size_t{2} << 20, count),
              expected("cudaGetDeviceCount"));
  EXPECT_TRUE(FdIsOpen(read_end.get()));
}

TEST(CudaMemoryNoDeviceTest, PinnedWithoutADeviceIsUnavailable) {
  std::string why;
  if (CudaDeviceCount(&why) > 0) GTEST_SKIP() << "a CUDA device is present";
  EXPECT_THAT(CudaPinnedAllocation::Create(4096),
              StatusIs(StatusCode::kUnavailable, HasSubstr("cudaHostAlloc")));
}

// Without a device nothing can be located; with one, heap memory is kHost.
TEST(CudaMemoryNoDeviceTest, LocatingHostMemory) {
  std::vector<uint8_t> heap(4096);
  const Result<MemoryPlace> place = LocatePointer(Addr::FromPointer(heap.data() + 17));
  std::string why;
  if (CudaDeviceCount(&why) == 0) {
    EXPECT_THAT(place, StatusIs(StatusCode::kUnavailable, HasSubstr("cudaPointerGetAttributes")));
    return;
  }
  ASSERT_THAT(place, IsOk());
  EXPECT_EQ(place->kind, MemoryKind::kHost);
  EXPECT_EQ(place->device, -1);
}

TEST(CuStatusTest, CodesFollowTheRuntimeMapping) {
  EXPECT_THAT(CuStatus(CUDA_SUCCESS, "x"), IsOk());
  EXPECT_THAT(CuStatus(CUDA_ERROR_OUT_OF_MEMORY, "cuMemCreate(1 bytes)"),
              StatusIs(StatusCode::kResourceExhausted, HasSubstr("cuMemCreate(1 bytes): ")));
  EXPECT_THAT(CuStatus(CUDA_ERROR_NO_DEVICE, "x"), StatusIs(StatusCode::kUnavailable));
  EXPECT_THAT(CuStatus(CUDA_ERROR_NOT_INITIALIZED, "x"), StatusIs(StatusCode::kUnavailable));
  EXPECT_THAT(CuStatus(CUDA_ERROR_INVALID_VALUE, "x"), StatusIs(StatusCode::kInvalidArgument));
  EXPECT_THAT(CuStatus(CUDA_ERROR_INVALID_DEVICE, "x"), StatusIs(StatusCode::kInvalidArgument));
  EXPECT_THAT(CuStatus(CUDA_ERROR_NOT_SUPPORTED, "x"), StatusIs(StatusCode::kUnimplemented));
  EXPECT_THAT(CuStatus(CUDA_ERROR_ILLEGAL_ADDRESS, "x"), StatusIs(StatusCode::kInternal));
  // The driver names the error where there is one; otherwise the number.
  std::string why;
  if (CudaDeviceCount(&why) == 0) {
    EXPECT_THAT(CuStatus(CUDA_ERROR_OUT_OF_MEMORY, "x"),
                StatusIs(StatusCode::kResourceExhausted, HasSubstr("CUresult 2")));
  } else {
    EXPECT_THAT(CuStatus(CUDA_ERROR_OUT_OF_MEMORY, "x"),
                StatusIs(StatusCode::kResourceExhausted,
                         HasSubstr("CUDA_ERROR_OUT_OF_MEMORY (out of memory)")));
  }
}

TEST(UniqueFdTest, ClosesAndMoves) {
  int pipe_fds[2];
  ASSERT_EQ(pipe(pipe_fds), 0);
  UniqueFd write_end(pipe_fds[1]);
  {
    UniqueFd read_end(pipe_fds[0]);
    UniqueFd moved(std::move(read_end));
    EXPECT_FALSE(read_end.valid());  // NOLINT(bugprone-use-after-move): moved-from is empty
    EXPECT_EQ(moved.get(), pipe_fds[0]);
    UniqueFd assigned;
    assigned = std::move(moved);
    EXPECT_EQ(assigned.get(), pipe_fds[0]);
    EXPECT_TRUE(FdIsOpen(pipe_fds[0]));
  }
  EXPECT_FALSE(FdIsOpen(pipe_fds[0]));
  const int released = write_end.Release();
  EXPECT_FALSE(write_end.valid());
  EXPECT_TRUE(FdIsOpen(released));
  close(released);
}

// --- With a device ---

TEST(CudaDeviceAllocationTest, HoldsDeviceMemory) {
  SKIP_WITHOUT_CUDA_DEVICE();
  const size_t bytes = (size_t{1} << 20) + 3;
  Result<std::unique_ptr<Allocation>> allocation = CudaDeviceAllocation::Create(0, bytes);
  ASSERT_THAT(allocation, IsOk());
  const Allocation& memory = **allocation;
  EXPECT_NE(memory.address().value(), 0u);
  EXPECT_EQ(memory.size(), bytes);
  EXPECT_EQ(memory.kind(), MemoryKind::kCuda);
  EXPECT_EQ(memory.device(), 0);
  EXPECT_EQ(memory.host_pointer(), nullptr);

  for (const Addr inside : {memory.address(), memory.address() + (bytes - 1)}) {
    Result<MemoryPlace> place = LocatePointer(inside);
    ASSERT_THAT(place, IsOk());
    EXPECT_EQ(place->kind, MemoryKind::kCuda);
    EXPECT_EQ(place->device, 0);
  }

  const std::vector<uint8_t> pattern = Pattern(bytes, 7);
  ASSERT_THAT(Upload(memory.address(), pattern), IsOk());
  Result<std::vector<uint8_t>> back = Download(memory.address(), bytes);
  ASSERT_THAT(back, IsOk());
  EXPECT_EQ(FirstMismatch(*back, pattern), -1);
}

// Each device's memory says which device it is on.
TEST(CudaDeviceAllocationTest, LastDevice) {
  SKIP_WITHOUT_CUDA_DEVICE();
  const int last = CudaDeviceCount() - 1;
  Result<std::unique_ptr<Allocation>> allocation = CudaDeviceAllocation::Create(last, 4096);
  ASSERT_THAT(allocation, IsOk());
  EXPECT_EQ((*allocation)->device(), last);
  Result<MemoryPlace> place = LocatePointer((*allocation)->address());
  ASSERT_THAT(place, IsOk());
  EXPECT_EQ(place->kind, MemoryKind::kCuda);
  EXPECT_EQ(place->device, last);
}

// The destructor makes the device current itself: any thread may free.
TEST(CudaDeviceAllocationTest, DestroyedOnAnotherThread) {
  SKIP_WITHOUT_CUDA_DEVICE();
  Result<std::unique_ptr<Allocation>> allocation = CudaDeviceAllocation::Create(0, 4096);
  ASSERT_THAT(allocation, IsOk());
  std::thread([memory = std::move(allocation).value()]() mutable { memory.reset(); }).join();
  SUCCEED();
}

TEST(CudaDeviceAllocationTest, OutOfMemoryIsResourceExhausted) {
  SKIP_WITHOUT_CUDA_DEVICE();
  EXPECT_THAT(CudaDeviceAllocation::Create(0, kPiB),
              StatusIs(StatusCode::kResourceExhausted,
                       AllOf(HasSubstr("cudaMalloc"), HasSubstr("cudaErrorMemoryAllocation"))));
  // The error does not linger: the next allocation works.
  EXPECT_THAT(CudaDeviceAllocation::Create(0, 4096), IsOk());
}

TEST(CudaPinnedAllocationTest, ZeroFilledHostAccessiblePinned) {
  SKIP_WITHOUT_CUDA_DEVICE();
  const size_t bytes = (size_t{64} << 10) + 3;
  Result<std::unique_ptr<Allocation>> allocation = CudaPinnedAllocation::Create(bytes);
  ASSERT_THAT(allocation, IsOk());
  const Allocation& memory = **allocation;
  EXPECT_EQ(memory.size(), bytes);
  EXPECT_EQ(memory.kind(), MemoryKind::kPinnedHost);
  EXPECT_EQ(memory.device(), -1);
  ASSERT_NE(memory.host_pointer(), nullptr);
  EXPECT_EQ(memory.host_pointer(), memory.address().ToPointer());
  const auto* host = static_cast<const uint8_t*>(memory.host_pointer());
  EXPECT_TRUE(std::all_of(host, host + bytes, [](uint8_t b) { return b == 0; }));

  Result<MemoryPlace> place = LocatePointer(memory.address() + 100);
  ASSERT_THAT(place, IsOk());
  EXPECT_EQ(place->kind, MemoryKind::kPinnedHost);
  EXPECT_EQ(place->device, -1);

  // Written by the host, copied to the device and back into pinned memory.
  const std::vector<uint8_t> pattern = Pattern(bytes, 3);
  std::memcpy(memory.host_pointer(), pattern.data(), bytes);
  Result<std::unique_ptr<Allocation>> device = CudaDeviceAllocation::Create(0, bytes);
  ASSERT_THAT(device, IsOk());
  ASSERT_THAT(CudaStatus(cudaMemcpy(DevicePointer((*device)->address()), memory.host_pointer(),
                                    bytes, cudaMemcpyHostToDevice),
                         "cudaMemcpy"),
              IsOk());
  std::memset(memory.host_pointer(), 0, bytes);
  ASSERT_THAT(CudaStatus(cudaMemcpy(memory.host_pointer(), DevicePointer((*device)->address()),
                                    bytes, cudaMemcpyDeviceToHost),
                         "cudaMemcpy"),
              IsOk());
  EXPECT_EQ(std::memcmp(memory.host_pointer(), pattern.data(), bytes), 0);
}

TEST(LocatePointerTest, ManagedMemoryIsRefused) {
  SKIP_WITHOUT_CUDA_DEVICE();
  void* managed = nullptr;
  ASSERT_THAT(CudaStatus(cudaMallocManaged(&managed, 4096), "cudaMallocManaged"), IsOk());
  EXPECT_THAT(LocatePointer(Addr::FromPointer(managed)),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("managed memory is not supported")));
  EXPECT_THAT(CudaStatus(cudaFree(managed), "cudaFree"), IsOk());
}

// --- VMM ---

TEST(CudaVmmAllocationTest, MapsRoundedUpDeviceMemory) {
  SKIP_WITHOUT_CUDA_VMM();
  const size_t bytes = (size_t{1} << 20) + 3;
  Result<std::unique_ptr<CudaVmmAllocation>> allocation = CudaVmmAllocation::Create(0, bytes);
  ASSERT_THAT(allocation, IsOk());
  const CudaVmmAllocation& memory = **allocation;
  EXPECT_NE(memory.address().value(), 0u);
  EXPECT_EQ(memory.size(), bytes);
  EXPECT_GE(memory.mapped_bytes(), bytes);
  EXPECT_EQ(memory.kind(), MemoryKind::kCuda);
  EXPECT_EQ(memory.device(), 0);
  EXPECT_EQ(memory.host_pointer(), nullptr);

  Result<MemoryPlace> place = LocatePointer(memory.address() + (memory.mapped_bytes() - 1));
  ASSERT_THAT(place, IsOk());
  EXPECT_EQ(place->kind, MemoryKind::kCuda);
  EXPECT_EQ(place->device, 0);

  const std::vector<uint8_t> pattern = Pattern(memory.mapped_bytes(), 11);
  ASSERT_THAT(Upload(memory.address(), pattern), IsOk());
  Result<std::vector<uint8_t>> back = Download(memory.address(), pattern.size());
  ASSERT_THAT(back, IsOk());
  EXPECT_EQ(FirstMismatch(*back, pattern), -1);
}

// Exported and imported in the same process: a second mapping of the same
// memory at another address; writes through either show through the other.
TEST(CudaVmmAllocationTest, ExportedFdImportsAsASecondMapping) {
  SKIP_WITHOUT_CUDA_VMM();
  Result<std::unique_ptr<CudaVmmAllocation>> allocation =
      CudaVmmAllocation::Create(0, size_t{4} << 20);
  ASSERT_THAT(allocation, IsOk());
  const CudaVmmAllocation& memory = **allocation;
  const std::vector<uint8_t> pattern = Pattern(memory.mapped_bytes(), 21);
  ASSERT_THAT(Upload(memory.address(), pattern), IsOk());

  Result<UniqueFd> fd = memory.ExportFd();
  ASSERT_THAT(fd, IsOk());
  ASSERT_TRUE(fd->valid());
  Result<std::unique_ptr<CudaVmmMapping>> mapping =
      CudaVmmMapping::Import(fd->get(), memory.mapped_bytes(), 0);
  ASSERT_THAT(mapping, IsOk());
  EXPECT_TRUE(FdIsOpen(fd->get())) << "the imported descriptor is borrowed, not closed";
  EXPECT_NE((*mapping)->address(), memory.address());
  EXPECT_EQ((*mapping)->size(), memory.mapped_bytes());
  EXPECT_EQ((*mapping)->device(), 0);

  Result<std::vector<uint8_t>> back = Download((*mapping)->address(), pattern.size());
  ASSERT_THAT(back, IsOk());
  EXPECT_EQ(FirstMismatch(*back, pattern), -1);

  const std::vector<uint8_t> second = Pattern(memory.mapped_bytes(), 99);
  ASSERT_THAT(Upload((*mapping)->address(), second), IsOk());
  back = Download(memory.address(), second.size());
  ASSERT_THAT(back, IsOk());
  EXPECT_EQ(FirstMismatch(*back, second), -1);

  // Every export is a descriptor of its own.
  Result<UniqueFd> another = memory.ExportFd();
  ASSERT_THAT(another, IsOk());
  EXPECT_NE(another->get(), fd->get());
}

// Fabric handles where the device offers them. Whichever way this device
// and host answer, the allocation says so and behaves accordingly: with
// fabric handles, one exported and imported maps the same memory; without,
// exporting one is refused with the reason, and descriptors still work.
TEST(CudaVmmAllocationTest, FabricHandlesWhereTheDeviceOffersThem) {
  SKIP_WITHOUT_CUDA_VMM();
  const Status offered = CudaVmmAllocation::CheckFabricSupported(0);
  Result<std::unique_ptr<CudaVmmAllocation>> allocation =
      CudaVmmAllocation::Create(0, size_t{2} << 20);
  ASSERT_THAT(allocation, IsOk());
  const CudaVmmAllocation& memory = **allocation;
  std::cout << "fabric handles on device 0: "
            << (offered.ok() ? std::string("offered") : offered.ToString()) << "; this allocation: "
            << (memory.exports_fabric() ? std::string("has them")
                                        : memory.fabric_status().ToString())
            << "\n";
  if (!offered.ok()) {
    EXPECT_THAT(offered, StatusIs(StatusCode::kUnimplemented,
                                  HasSubstr("CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED")));
    EXPECT_FALSE(memory.exports_fabric());
    EXPECT_THAT(CudaVmmMapping::ImportFabric(CUmemFabricHandle{}, memory.mapped_bytes(), 0),
                StatusIs(StatusCode::kUnimplemented, HasSubstr("fabric")));
  }
  if (!memory.exports_fabric()) {
    EXPECT_THAT(memory.ExportFabric(), StatusIs(StatusCode::kUnimplemented, HasSubstr("fabric")));
    Result<UniqueFd> fd = memory.ExportFd();
    EXPECT_THAT(fd, IsOk());
    return;
  }
  const std::vector<uint8_t> pattern = Pattern(memory.mapped_bytes(), 57);
  ASSERT_THAT(Upload(memory.address(), pattern), IsOk());
  Result<CUmemFabricHandle> handle = memory.ExportFabric();
  ASSERT_THAT(handle, IsOk());
  Result<std::unique_ptr<CudaVmmMapping>> mapping =
      CudaVmmMapping::ImportFabric(*handle, memory.mapped_bytes(), 0);
  ASSERT_THAT(mapping, IsOk());
  Result<std::vector<uint8_t>> back = Download((*mapping)->address(), pattern.size());
  ASSERT_THAT(back, IsOk());
  EXPECT_EQ(FirstMismatch(*back, pattern), -1);
  // Descriptors still work beside it.
  EXPECT_THAT(memory.ExportFd(), IsOk());
  // A handle of nothing is the driver's error, not a mapping.
  CUmemFabricHandle garbage;
  std::memset(&garbage, 0x5A, sizeof(garbage));
  EXPECT_FALSE(CudaVmmMapping::ImportFabric(garbage, memory.mapped_bytes(), 0).ok());
}

// The memory is reference-counted: a mapping keeps it (and its bytes) after
// the exporting allocation and the descriptor are gone.
TEST(CudaVmmAllocationTest, MappingOutlivesTheExporter) {
  SKIP_WITHOUT_CUDA_VMM();
  Result<std::unique_ptr<CudaVmmAllocation>> allocation =
      CudaVmmAllocation::Create(0, size_t{2} << 20);
  ASSERT_THAT(allocation, IsOk());
  const size_t mapped_bytes = (*allocation)->mapped_bytes();
  const std::vector<uint8_t> pattern = Pattern(mapped_bytes, 42);
  ASSERT_THAT(Upload((*allocation)->address(), pattern), IsOk());
  Result<std::unique_ptr<CudaVmmMapping>> mapping = [&]() {
    Result<UniqueFd> fd = (*allocation)->ExportFd();
    if (!fd.ok()) return Result<std::unique_ptr<CudaVmmMapping>>(fd.status());
    return CudaVmmMapping::Import(fd->get(), mapped_bytes, 0);
  }();
  ASSERT_THAT(mapping, IsOk());
  allocation.value().reset();

  Result<std::vector<uint8_t>> back = Download((*mapping)->address(), mapped_bytes);
  ASSERT_THAT(back, IsOk());
  EXPECT_EQ(FirstMismatch(*back, pattern), -1);
}

// An exported descriptor alone keeps the memory importable after the
// exporter is destroyed (the exporter may go before a peer imports).
TEST(CudaVmmAllocationTest, OpenDescriptorOutlivesTheExporter) {
  SKIP_WITHOUT_CUDA_VMM();
  Result<std::unique_ptr<CudaVmmAllocation>> allocation =
      CudaVmmAllocation::Create(0, size_t{2} << 20);
  ASSERT_THAT(allocation, IsOk());
  const size_t mapped_bytes = (*allocation)->mapped_bytes();
  const std::vector<uint8_t> pattern = Pattern(mapped_bytes, 5);
  ASSERT_THAT(Upload((*allocation)->address(), pattern), IsOk());
  Result<UniqueFd> fd = (*allocation)->ExportFd();
  ASSERT_THAT(fd, IsOk());
  allocation.value().reset();

  Result<std::unique_ptr<CudaVmmMapping>> mapping =
      CudaVmmMapping::Import(fd->get(), mapped_bytes, 0);
  ASSERT_THAT(mapping, IsOk());
  Result<std::vector<uint8_t>> back = Download((*mapping)->address(), mapped_bytes);
  ASSERT_THAT(back, IsOk());
  EXPECT_EQ(FirstMismatch(*back, pattern), -1);
}

TEST(CudaVmmMappingTest, BadDescriptorsAndSizesAreErrors) {
  SKIP_WITHOUT_CUDA_VMM();
  Result<std::unique_ptr<CudaVmmAllocation>> allocation =
      CudaVmmAllocation::Create(0, size_t{2} << 20);
  ASSERT_THAT(allocation, IsOk());
  const size_t mapped_bytes = (*allocation)->mapped_bytes();

  // A descriptor that is not CUDA memory: the driver refuses it, and it
  // stays the caller's.
  int pipe_fds[2];
  ASSERT_EQ(pipe(pipe_fds), 0);
  UniqueFd read_end(pipe_fds[0]);
  UniqueFd write_end(pipe_fds[1]);
  Result<std::unique_ptr<CudaVmmMapping>> from_pipe =
      CudaVmmMapping::Import(read_end.get(), mapped_bytes, 0);
  EXPECT_FALSE(from_pipe.ok());
  EXPECT_THAT(from_pipe.status().message(), HasSubstr("cuMemImportFromShareableHandle"));
  EXPECT_TRUE(FdIsOpen(read_end.get()));

  Result<UniqueFd> fd = (*allocation)->ExportFd();
  ASSERT_THAT(fd, IsOk());
  EXPECT_THAT(CudaVmmMapping::Import(fd->get(), mapped_bytes + 1, 0),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("granularity")));
  // More than the memory behind the descriptor: imported, then the map
  // fails and the import is released.
  Result<std::unique_ptr<CudaVmmMapping>> too_large =
      CudaVmmMapping::Import(fd->get(), 2 * mapped_bytes, 0);
  EXPECT_FALSE(too_large.ok());
  EXPECT_THAT(too_large.status().message(), HasSubstr("cuMemMap"));
  EXPECT_TRUE(FdIsOpen(fd->get()));
}

// Nothing is leaked: once the allocation, its mappings (including a failed
// import's) and its descriptors are gone, the device memory is free again.
TEST(CudaVmmMappingTest, EverythingReleasedFreesTheMemory) {
  SKIP_WITHOUT_CUDA_VMM();
  constexpr size_t kBytes = size_t{256} << 20;
  ASSERT_THAT(CudaStatus(cudaSetDevice(0), "cudaSetDevice"), IsOk());
  ASSERT_THAT(CudaStatus(cudaFree(nullptr), "cudaFree(0)"), IsOk());
  const size_t baseline = FreeDeviceBytes();
  {
    Result<std::unique_ptr<CudaVmmAllocation>> allocation = CudaVmmAllocation::Create(0, kBytes);
    ASSERT_THAT(allocation, IsOk());
    EXPECT_LE(FreeDeviceBytes() + kBytes, baseline + (size_t{32} << 20));
    Result<UniqueFd> fd = (*allocation)->ExportFd();
    ASSERT_THAT(fd, IsOk());
    Result<std::unique_ptr<CudaVmmMapping>> mapping =
        CudaVmmMapping::Import(fd->get(), (*allocation)->mapped_bytes(), 0);
    ASSERT_THAT(mapping, IsOk());
    EXPECT_FALSE(CudaVmmMapping::Import(fd->get(), 2 * (*allocation)->mapped_bytes(), 0).ok());
  }
  EXPECT_GE(FreeDeviceBytes() + (size_t{32} << 20), baseline);
}

TEST(CudaVmmAllocationTest, OutOfMemoryIsResourceExhausted) {
  SKIP_WITHOUT_CUDA_VMM();
  EXPECT_THAT(CudaVmmAllocation::Create(0, kPiB),
              StatusIs(StatusCode::kResourceExhausted, HasSubstr("cuMemCreate")));
  EXPECT_THAT(CudaVmmAllocation::Create(0, 4096), IsOk());
}

}  // namespace
}  // namespace kvbounce
