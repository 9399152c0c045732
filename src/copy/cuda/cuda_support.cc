// DeviceSupport over the CUDA runtime (copy/device_support.h).
#include <cuda_runtime_api.h>

#include <memory>
#include <string>

#include "copy/cuda/cuda_copy_engine.h"
#include "copy/cuda/cuda_ipc_memory.h"
#include "copy/cuda/cuda_memory.h"
#include "copy/cuda/cuda_util.h"
#include "copy/device_support.h"

namespace kvbounce {
namespace {

// One cudaMemcpyAsync per operation on a stream of its own.
class CudaOpCopier final : public OpCopier {
 public:
  explicit CudaOpCopier(CudaStream stream) : stream_(std::move(stream)) {}

  Status Enqueue(Addr dst, Addr src, uint64_t bytes) override {
    if (!error_.ok()) return error_;
    if (bytes == 0) return Status::Ok();
    ScopedCudaDevice device(stream_.device());
    if (!device.status().ok()) return error_ = device.status();
    error_ = CudaStatus(
        cudaMemcpyAsync(dst.ToPointer(), src.ToPointer(), bytes, cudaMemcpyDefault, stream_.get()),
        "cudaMemcpyAsync(" + std::to_string(bytes) + " bytes)");
    return error_;
  }

  Status Wait() override {
    ScopedCudaDevice device(stream_.device());
    Status synced = device.status().ok()
                        ? CudaStatus(cudaStreamSynchronize(stream_.get()), "cudaStreamSynchronize")
                        : device.status();
    Status first = error_.ok() ? synced : error_;
    error_ = Status::Ok();
    return first;
  }

 private:
  CudaStream stream_;
  Status error_;
};

class VmmShareMapping final : public DeviceShareMapping {
 public:
  explicit VmmShareMapping(std::unique_ptr<CudaVmmMapping> mapping)
      : mapping_(std::move(mapping)) {}
  Addr base() const override { return mapping_->address(); }

 private:
  std::unique_ptr<CudaVmmMapping> mapping_;
};

class IpcShareMapping final : public DeviceShareMapping {
 public:
  explicit IpcShareMapping(std::unique_ptr<CudaIpcMapping> mapping)
      : mapping_(std::move(mapping)) {}
  Addr base() const override { return mapping_->base(); }

 private:
  std::unique_ptr<CudaIpcMapping> mapping_;
};

class CudaDeviceSupport final : public DeviceSupport {
 public:
  std::string_view Name() const override { return "cuda"; }

  int DeviceCount(std::string* why) const override { return CudaDeviceCount(why); }

  Result<MemoryPlace> Locate(Addr address) const override { return LocatePointer(address); }

  Result<std::unique_ptr<Allocation>> AllocateDevice(int device, size_t bytes) const override {
    return CudaDeviceAllocation::Create(device, bytes);
  }

  Result<std::unique_ptr<Allocation>> AllocatePinned(size_t bytes) const override {
    return CudaPinnedAllocation::Create(bytes);
  }

  Result<std::unique_ptr<CopyEngine>> NewCopyEngine(
      int device, std::chrono::microseconds poll_before_sleep) const override {
    KVB_ASSIGN_OR_RETURN(std::unique_ptr<CudaCopyEngine> engine,
                         CudaCopyEngine::Create(device, poll_before_sleep));
    return std::unique_ptr<CopyEngine>(std::move(engine));
  }

  Result<std::unique_ptr<OpCopier>> NewOpCopier(int device) const override {
    KVB_ASSIGN_OR_RETURN(CudaStream stream, CudaStream::Create(device));
    return std::unique_ptr<OpCopier>(new CudaOpCopier(std::move(stream)));
  }

  // One cudaMemcpyAsync per fragment costs ~4 µs on the H200 (1.1 GB/s at
  // 4 KiB); a large device-to-device copy runs at ~2.1 TB/s
  // (docs/PERFORMANCE.md, "CUDA copy engine").
  OpCopyCost OpCost() const override { return OpCopyCost{4.0, 2.1e6}; }

  Result<DeviceShare> Share(Addr address, uint64_t bytes) const override {
    // VMM memory as a descriptor; anything else (cudaMalloc) by IPC handle.
    Result<CudaVmmExport> vmm = ExportVmmContaining(address, bytes);
    if (vmm.ok()) {
      return DeviceShare{std::move(vmm->fd), {}, vmm->offset, vmm->allocation_bytes};
    }
    if (vmm.status().code() != StatusCode::kNotFound) return vmm.status();
    KVB_ASSIGN_OR_RETURN(CudaIpcExport e, ExportCudaIpc(address, bytes));
    return DeviceShare{UniqueFd(), std::move(e.handle), e.offset, e.allocation_bytes};
  }

  Result<std::unique_ptr<DeviceShareMapping>> OpenShareFd(int fd, uint64_t allocation_bytes,
                                                          int device) const override {
    KVB_ASSIGN_OR_RETURN(std::unique_ptr<CudaVmmMapping> mapping,
                         CudaVmmMapping::Import(fd, allocation_bytes, device));
    return std::unique_ptr<DeviceShareMapping>(new VmmShareMapping(std::move(mapping)));
  }

  Result<std::unique_ptr<Allocation>> AllocateExportable(int device, size_t bytes) const override {
    KVB_RETURN_IF_ERROR(CudaVmmAllocation::CheckSupported(device));
    KVB_ASSIGN_OR_RETURN(std::unique_ptr<CudaVmmAllocation> memory,
                         CudaVmmAllocation::Create(device, bytes));
    return std::unique_ptr<Allocation>(std::move(memory));
  }

  Result<std::unique_ptr<DeviceShareMapping>> OpenShare(std::span<const std::byte> handle,
                                                        int device) const override {
    KVB_ASSIGN_OR_RETURN(std::unique_ptr<CudaIpcMapping> mapping, OpenCudaIpc(handle, device));
    return std::unique_ptr<DeviceShareMapping>(new IpcShareMapping(std::move(mapping)));
  }
};

}  // namespace

const DeviceSupport* CudaSupportImpl() {
  static const CudaDeviceSupport* const support = new CudaDeviceSupport();
  return support;
}

}  // namespace kvbounce
