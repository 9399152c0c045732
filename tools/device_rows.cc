#include "tools/device_rows.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

#include "copy/cuda/cuda_util.h"
#include "tools/device_rows_kernel.cuh"

namespace kvbounce::tools {
namespace {

using device_rows::RowDescriptor;
using device_rows::RowShape;
using device_rows::VerifyCounters;

// Row lists are copied into the staging buffers as they are.
static_assert(sizeof(DeviceRow) == sizeof(RowDescriptor));
static_assert(std::is_standard_layout_v<DeviceRow> && std::is_trivially_copyable_v<DeviceRow>);
static_assert(offsetof(DeviceRow, address) == offsetof(RowDescriptor, address));
static_assert(offsetof(DeviceRow, seed) == offsetof(RowDescriptor, seed));

constexpr size_t kStagingBytes = DeviceRowKernels::kChunkRows * sizeof(RowDescriptor);

Result<RowShape> CheckShape(int head_dim, int elem_bytes) {
  if (head_dim < 1) {
    return InvalidArgumentError("device rows: head_dim = " + std::to_string(head_dim) +
                                " is invalid: must be >= 1");
  }
  if (elem_bytes < 1 || elem_bytes > 8) {
    return InvalidArgumentError("device rows: elem_bytes = " + std::to_string(elem_bytes) +
                                " is invalid: must be 1 to 8");
  }
  return RowShape{static_cast<uint64_t>(head_dim) * static_cast<uint64_t>(elem_bytes), elem_bytes};
}

}  // namespace

struct DeviceRowKernels::Impl {
  // One of the two staging slots a chunk goes through: the host writes the
  // pinned buffer, the stream copies it to the device buffer the kernel
  // reads, and `done` (recorded after the kernel) says when both may be
  // reused.
  struct Slot {
    CudaPinnedBuffer staging;
    CudaDeviceBuffer rows;
    CudaEvent done;
  };

  ~Impl() {
    // A call that failed half-way may have left work in flight that still
    // uses the buffers; let it end before they are freed.
    if (stream.get() != nullptr) {
      ScopedCudaDevice scoped(device);
      (void)cudaStreamSynchronize(stream.get());
      (void)cudaGetLastError();
    }
  }

  // Uploads the concatenation of `first` and `second` chunk by chunk and
  // calls `launch(rows, count, first_index)` for each, `rows` being the
  // chunk in device memory and `first_index` the index of its first row in
  // the concatenation. Returns without waiting for the last chunk.
  template <typename Launch>
  Status ForEachChunk(std::span<const DeviceRow> first, std::span<const DeviceRow> second,
                      Launch launch) {
    const size_t total = first.size() + second.size();
    size_t chunk = 0;
    for (size_t begin = 0; begin < total; begin += kChunkRows, ++chunk) {
      const size_t count = std::min(kChunkRows, total - begin);
      Slot& slot = slots[chunk % slots.size()];
      // The chunk that used this slot two steps ago must be done with it.
      KVB_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(slot.done.get()),
                               "cudaEventSynchronize (device rows staging)");
      auto* staging = static_cast<std::byte*>(slot.staging.data());
      size_t filled = 0;
      if (begin < first.size()) {
        const size_t n = std::min(count, first.size() - begin);
        std::memcpy(staging, first.data() + begin, n * sizeof(DeviceRow));
        filled = n;
      }
      if (filled < count) {
        const size_t from = begin + filled - first.size();
        std::memcpy(staging + filled * sizeof(DeviceRow), second.data() + from,
                    (count - filled) * sizeof(DeviceRow));
      }
      KVB_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(slot.rows.data(), staging, count * sizeof(RowDescriptor),
                          cudaMemcpyHostToDevice, stream.get()),
          "cudaMemcpyAsync(" + std::to_string(count) + " device rows to device " +
              std::to_string(device) + ")");
      KVB_RETURN_IF_ERROR(launch(static_cast<const RowDescriptor*>(slot.rows.data()),
                                 static_cast<uint32_t>(count), static_cast<uint64_t>(begin)));
      KVB_CUDA_RETURN_IF_ERROR(cudaEventRecord(slot.done.get(), stream.get()),
                               "cudaEventRecord (device rows staging)");
    }
    return Status::Ok();
  }

  // Waits for everything the call enqueued, also after a failure (so no
  // work is left in flight on the staging buffers), and returns the call's
  // first error.
  Status Finish(Status status) {
    Status synced = CudaStatus(cudaStreamSynchronize(stream.get()),
                               "cudaStreamSynchronize(device " + std::to_string(device) + ")");
    return status.ok() ? synced : status;
  }

  int device = 0;
  uint32_t max_blocks = 1;
  CudaStream stream;
  std::array<Slot, 2> slots;
  CudaDeviceBuffer counters;          // one VerifyCounters
  CudaPinnedBuffer counters_on_host;  // its copy after a verify
};

Result<std::unique_ptr<DeviceRowKernels>> DeviceRowKernels::Create(int device) {
  std::string why;
  const int count = CudaDeviceCount(&why);
  if (count == 0) return UnavailableError("device rows: no CUDA device: " + why);
  if (device < 0 || device >= count) {
    return InvalidArgumentError("device rows: device " + std::to_string(device) +
                                " does not exist (" + std::to_string(count) + " devices)");
  }
  auto impl = std::make_unique<Impl>();
  impl->device = device;
  int sms = 0;
  KVB_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
      "cudaDeviceGetAttribute(multiprocessor count, device " + std::to_string(device) + ")");
  int threads_per_sm = 0;
  KVB_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device),
      "cudaDeviceGetAttribute(max threads per multiprocessor, device " + std::to_string(device) +
          ")");
  // Enough blocks to fill every multiprocessor once; the kernels loop over
  // the rest of the rows.
  impl->max_blocks = static_cast<uint32_t>(
      std::max(1, sms * std::max(1, threads_per_sm / device_rows::kThreadsPerBlock)));
  KVB_ASSIGN_OR_RETURN(impl->stream, CudaStream::Create(device));
  for (Impl::Slot& slot : impl->slots) {
    KVB_ASSIGN_OR_RETURN(slot.staging, CudaPinnedBuffer::Allocate(kStagingBytes));
    KVB_ASSIGN_OR_RETURN(slot.rows, CudaDeviceBuffer::Allocate(device, kStagingBytes));
    KVB_ASSIGN_OR_RETURN(slot.done, CudaEvent::Create(device, /*blocking_sync=*/false));
  }
  KVB_ASSIGN_OR_RETURN(impl->counters, CudaDeviceBuffer::Allocate(device, sizeof(VerifyCounters)));
  KVB_ASSIGN_OR_RETURN(impl->counters_on_host, CudaPinnedBuffer::Allocate(sizeof(VerifyCounters)));
  return std::unique_ptr<DeviceRowKernels>(new DeviceRowKernels(std::move(impl)));
}

DeviceRowKernels::DeviceRowKernels(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

DeviceRowKernels::~DeviceRowKernels() = default;

int DeviceRowKernels::device() const { return impl_->device; }

Status DeviceRowKernels::FillRows(std::span<const DeviceRow> rows, int head_dim, int elem_bytes) {
  KVB_ASSIGN_OR_RETURN(const RowShape shape, CheckShape(head_dim, elem_bytes));
  if (rows.empty()) return Status::Ok();
  ScopedCudaDevice scoped(impl_->device);
  KVB_RETURN_IF_ERROR(scoped.status());
  Impl& impl = *impl_;
  return impl.Finish(impl.ForEachChunk(
      rows, {}, [&](const RowDescriptor* chunk, uint32_t count, uint64_t /*first_index*/) {
        return CudaStatus(
            device_rows::LaunchFillRows(chunk, count, shape, impl.max_blocks, impl.stream.get()),
            "fill rows kernel (" + std::to_string(count) + " rows)");
      }));
}

Result<DeviceRowCheck> DeviceRowKernels::VerifyRows(std::span<const DeviceRow> value_rows,
                                                    std::span<const DeviceRow> sentinel_rows,
                                                    int head_dim, int elem_bytes,
                                                    uint8_t sentinel) {
  KVB_ASSIGN_OR_RETURN(const RowShape shape, CheckShape(head_dim, elem_bytes));
  DeviceRowCheck check;
  check.rows_checked = value_rows.size() + sentinel_rows.size();
  check.bytes_checked = check.rows_checked * shape.row_bytes;
  if (check.rows_checked == 0) return check;
  ScopedCudaDevice scoped(impl_->device);
  KVB_RETURN_IF_ERROR(scoped.status());
  Impl& impl = *impl_;
  auto* counters = static_cast<VerifyCounters*>(impl.counters.data());
  Status status = [&]() -> Status {
    // No mismatches yet; first_bad starts at the largest index so that
    // atomicMin keeps the smallest bad one.
    KVB_CUDA_RETURN_IF_ERROR(
        cudaMemsetAsync(counters, 0x00, sizeof(VerifyCounters), impl.stream.get()),
        "cudaMemsetAsync (verify counters)");
    KVB_CUDA_RETURN_IF_ERROR(
        cudaMemsetAsync(
            static_cast<std::byte*>(impl.counters.data()) + offsetof(VerifyCounters, first_bad),
            0xff, sizeof(VerifyCounters::first_bad), impl.stream.get()),
        "cudaMemsetAsync (verify counters)");
    const uint64_t values = value_rows.size();
    KVB_RETURN_IF_ERROR(impl.ForEachChunk(
        value_rows, sentinel_rows,
        [&](const RowDescriptor* chunk, uint32_t count, uint64_t first_index) {
          // The chunk's value rows come first: those before index `values`.
          const uint32_t chunk_values = static_cast<uint32_t>(
              first_index >= values ? 0 : std::min<uint64_t>(count, values - first_index));
          return CudaStatus(
              device_rows::LaunchVerifyRows(chunk, count, chunk_values, first_index, shape,
                                            sentinel, counters, impl.max_blocks, impl.stream.get()),
              "verify rows kernel (" + std::to_string(count) + " rows)");
        }));
    KVB_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(impl.counters_on_host.data(), counters, sizeof(VerifyCounters),
                        cudaMemcpyDeviceToHost, impl.stream.get()),
        "cudaMemcpyAsync (verify counters to host)");
    return Status::Ok();
  }();
  KVB_RETURN_IF_ERROR(impl.Finish(std::move(status)));
  VerifyCounters found;
  std::memcpy(&found, impl.counters_on_host.data(), sizeof(found));
  check.mismatches = found.mismatches;
  check.first_bad_row = found.mismatches == 0 ? -1 : static_cast<int64_t>(found.first_bad);
  return check;
}

Status DeviceRowKernels::FillBytes(std::span<const std::pair<uint64_t, uint64_t>> ranges,
                                   uint8_t value) {
  ScopedCudaDevice scoped(impl_->device);
  KVB_RETURN_IF_ERROR(scoped.status());
  Impl& impl = *impl_;
  Status status;
  for (const auto& [address, bytes] : ranges) {
    if (bytes == 0) continue;
    status = CudaStatus(cudaMemsetAsync(reinterpret_cast<void*>(address), value,
                                        static_cast<size_t>(bytes), impl.stream.get()),
                        "cudaMemsetAsync(" + std::to_string(bytes) + " bytes on device " +
                            std::to_string(impl.device) + ")");
    if (!status.ok()) break;
  }
  return impl.Finish(std::move(status));
}

Result<double> DeviceRowKernels::MeasureCopyCeiling(size_t bytes, int iterations) {
  if (bytes == 0 || iterations < 1) {
    return InvalidArgumentError("device rows: copy ceiling of " + std::to_string(bytes) +
                                " bytes x " + std::to_string(iterations) +
                                " iterations is invalid: both must be >= 1");
  }
  ScopedCudaDevice scoped(impl_->device);
  KVB_RETURN_IF_ERROR(scoped.status());
  Impl& impl = *impl_;
  KVB_ASSIGN_OR_RETURN(CudaDeviceBuffer src, CudaDeviceBuffer::Allocate(impl.device, bytes));
  KVB_ASSIGN_OR_RETURN(CudaDeviceBuffer dst, CudaDeviceBuffer::Allocate(impl.device, bytes));
  KVB_ASSIGN_OR_RETURN(CudaEvent start,
                       CudaEvent::Create(impl.device, /*blocking_sync=*/true, /*timing=*/true));
  KVB_ASSIGN_OR_RETURN(CudaEvent stop,
                       CudaEvent::Create(impl.device, /*blocking_sync=*/true, /*timing=*/true));
  const std::string copy = "cudaMemcpyAsync(" + std::to_string(bytes) +
                           " bytes device to device on device " + std::to_string(impl.device) + ")";
  Status status = [&]() -> Status {
    // The first copy pays for lazy setup (page mapping, the copy engine's
    // first use) and is not timed.
    KVB_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(dst.data(), src.data(), bytes, cudaMemcpyDeviceToDevice, impl.stream.get()),
        copy);
    KVB_CUDA_RETURN_IF_ERROR(cudaEventRecord(start.get(), impl.stream.get()),
                             "cudaEventRecord (copy ceiling start)");
    for (int i = 0; i < iterations; ++i) {
      KVB_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst.data(), src.data(), bytes,
                                               cudaMemcpyDeviceToDevice, impl.stream.get()),
                               copy);
    }
    KVB_CUDA_RETURN_IF_ERROR(cudaEventRecord(stop.get(), impl.stream.get()),
                             "cudaEventRecord (copy ceiling stop)");
    return Status::Ok();
  }();
  // The buffers must outlive the copies even when one of them failed.
  KVB_RETURN_IF_ERROR(impl.Finish(std::move(status)));
  float ms = 0;
  KVB_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, start.get(), stop.get()),
                           "cudaEventElapsedTime (copy ceiling)");
  if (!(ms > 0)) {
    return InternalError("device rows: copy ceiling: " + std::to_string(iterations) +
                         " copies of " + std::to_string(bytes) + " bytes timed at " +
                         std::to_string(ms) + " ms");
  }
  return static_cast<double>(bytes) * iterations / (static_cast<double>(ms) * 1e-3);
}

Result<double> MeasurePeerCopyCeiling(int src_device, int dst_device, size_t bytes, int iterations,
                                      bool* peer_access) {
  if (bytes == 0 || iterations < 1 || src_device == dst_device) {
    return InvalidArgumentError(
        "peer copy ceiling: " + std::to_string(bytes) + " bytes x " + std::to_string(iterations) +
        " iterations from device " + std::to_string(src_device) + " to device " +
        std::to_string(dst_device) + " is invalid: both counts must be >= 1, the devices distinct");
  }
  const std::string link =
      "device " + std::to_string(src_device) + " to device " + std::to_string(dst_device);
  int can_access = 0;
  KVB_CUDA_RETURN_IF_ERROR(cudaDeviceCanAccessPeer(&can_access, src_device, dst_device),
                           "cudaDeviceCanAccessPeer(" + link + ")");
  ScopedCudaDevice scoped(src_device);
  KVB_RETURN_IF_ERROR(scoped.status());
  bool enabled = false;
  if (can_access != 0) {
    const cudaError_t e = cudaDeviceEnablePeerAccess(dst_device, 0);
    if (e == cudaErrorPeerAccessAlreadyEnabled) {
      cudaGetLastError();  // clears the (not sticky) error the call left
      enabled = true;
    } else {
      KVB_CUDA_RETURN_IF_ERROR(e, "cudaDeviceEnablePeerAccess(" + link + ")");
      enabled = true;
    }
  }
  if (peer_access != nullptr) *peer_access = enabled;
  KVB_ASSIGN_OR_RETURN(CudaDeviceBuffer src, CudaDeviceBuffer::Allocate(src_device, bytes));
  KVB_ASSIGN_OR_RETURN(CudaDeviceBuffer dst, CudaDeviceBuffer::Allocate(dst_device, bytes));
  KVB_ASSIGN_OR_RETURN(CudaStream stream, CudaStream::Create(src_device));
  KVB_ASSIGN_OR_RETURN(CudaEvent start,
                       CudaEvent::Create(src_device, /*blocking_sync=*/true, /*timing=*/true));
  KVB_ASSIGN_OR_RETURN(CudaEvent stop,
                       CudaEvent::Create(src_device, /*blocking_sync=*/true, /*timing=*/true));
  const std::string copy = "cudaMemcpyPeerAsync(" + std::to_string(bytes) + " bytes, " + link + ")";
  Status status = [&]() -> Status {
    KVB_CUDA_RETURN_IF_ERROR(
        cudaMemcpyPeerAsync(dst.data(), dst_device, src.data(), src_device, bytes, stream.get()),
        copy);
    KVB_CUDA_RETURN_IF_ERROR(cudaEventRecord(start.get(), stream.get()),
                             "cudaEventRecord (peer ceiling start)");
    for (int i = 0; i < iterations; ++i) {
      KVB_CUDA_RETURN_IF_ERROR(
          cudaMemcpyPeerAsync(dst.data(), dst_device, src.data(), src_device, bytes, stream.get()),
          copy);
    }
    KVB_CUDA_RETURN_IF_ERROR(cudaEventRecord(stop.get(), stream.get()),
                             "cudaEventRecord (peer ceiling stop)");
    return Status::Ok();
  }();
  // The buffers must outlive the copies even when one of them failed.
  const Status synced =
      CudaStatus(cudaStreamSynchronize(stream.get()),
                 "cudaStreamSynchronize(device " + std::to_string(src_device) + ")");
  KVB_RETURN_IF_ERROR(status);
  KVB_RETURN_IF_ERROR(synced);
  float ms = 0;
  KVB_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, start.get(), stop.get()),
                           "cudaEventElapsedTime (peer ceiling)");
  if (!(ms > 0)) {
    return InternalError("peer copy ceiling: " + std::to_string(iterations) + " copies of " +
                         std::to_string(bytes) + " bytes timed at " + std::to_string(ms) + " ms");
  }
  return static_cast<double>(bytes) * iterations / (static_cast<double>(ms) * 1e-3);
}

}  // namespace kvbounce::tools
