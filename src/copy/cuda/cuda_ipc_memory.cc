#include "copy/cuda/cuda_ipc_memory.h"

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "copy/cuda/cuda_memory.h"
#include "copy/cuda/cuda_util.h"
#include "kvbounce/logging.h"

namespace kvbounce {
namespace {

std::string Hex(uint64_t v) {
  char text[32];
  std::snprintf(text, sizeof(text), "0x%llx", static_cast<unsigned long long>(v));
  return text;
}

// One opened allocation, shared by the mappings of this process that name
// it (the runtime opens a handle once per process).
struct Opened {
  void* base = nullptr;
  int device = 0;
  int users = 0;
};

std::mutex& OpenedMutex() {
  static std::mutex mu;
  return mu;
}

std::map<std::vector<std::byte>, Opened>& OpenedTable() {
  static auto* table = new std::map<std::vector<std::byte>, Opened>();
  return *table;
}

class Mapping final : public CudaIpcMapping {
 public:
  Mapping(std::vector<std::byte> handle, void* base) : handle_(std::move(handle)), base_(base) {}
  ~Mapping() override {
    std::lock_guard<std::mutex> lock(OpenedMutex());
    auto it = OpenedTable().find(handle_);
    if (it == OpenedTable().end() || --it->second.users > 0) return;
    ScopedCudaDevice device(it->second.device);
    const Status closed =
        CudaStatus(cudaIpcCloseMemHandle(it->second.base), "cudaIpcCloseMemHandle");
    if (!closed.ok()) Log(LogLevel::kWarning, "cuda ipc: " + closed.ToString());
    OpenedTable().erase(it);
  }
  Addr base() const override { return Addr::FromPointer(base_); }

 private:
  const std::vector<std::byte> handle_;
  void* const base_;
};

}  // namespace

Result<CudaIpcExport> ExportCudaIpc(Addr address, uint64_t bytes) {
  cudaPointerAttributes attributes{};
  KVB_RETURN_IF_ERROR(CudaStatus(cudaPointerGetAttributes(&attributes, address.ToPointer()),
                                 "cudaPointerGetAttributes(" + Hex(address.value()) + ")"));
  if (attributes.type != cudaMemoryTypeDevice) {
    return InvalidArgumentError("cuda ipc: " + Hex(address.value()) + " is not device memory");
  }
  ScopedCudaDevice device(attributes.device);
  KVB_RETURN_IF_ERROR(device.status());
  Result<CudaAllocationRange> range = AllocationRange(address, bytes);
  if (!range.ok()) return range.status().WithContext("cuda ipc");
  const uint64_t base = range->base;
  const uint64_t size = range->size;
  const uint64_t offset = address.value() - base;
  cudaIpcMemHandle_t handle{};
  KVB_RETURN_IF_ERROR(CudaStatus(cudaIpcGetMemHandle(&handle, reinterpret_cast<void*>(base)),
                                 "cudaIpcGetMemHandle(" + Hex(base) + ")"));
  static_assert(sizeof(handle) == kCudaIpcHandleBytes);
  CudaIpcExport out;
  out.handle.resize(kCudaIpcHandleBytes);
  std::memcpy(out.handle.data(), &handle, kCudaIpcHandleBytes);
  out.offset = offset;
  out.allocation_bytes = size;
  out.device = attributes.device;
  return out;
}

Result<std::unique_ptr<CudaIpcMapping>> OpenCudaIpc(std::span<const std::byte> handle, int device) {
  if (handle.size() != kCudaIpcHandleBytes) {
    return InvalidArgumentError("cuda ipc: a handle has " + std::to_string(kCudaIpcHandleBytes) +
                                " bytes, got " + std::to_string(handle.size()));
  }
  std::vector<std::byte> key(handle.begin(), handle.end());
  std::lock_guard<std::mutex> lock(OpenedMutex());
  auto it = OpenedTable().find(key);
  if (it == OpenedTable().end()) {
    ScopedCudaDevice current(device);
    KVB_RETURN_IF_ERROR(current.status());
    cudaIpcMemHandle_t h{};
    std::memcpy(&h, handle.data(), kCudaIpcHandleBytes);
    void* base = nullptr;
    KVB_RETURN_IF_ERROR(
        CudaStatus(cudaIpcOpenMemHandle(&base, h, cudaIpcMemLazyEnablePeerAccess),
                   "cudaIpcOpenMemHandle(on device " + std::to_string(device) + ")"));
    it = OpenedTable().emplace(key, Opened{base, device, 0}).first;
  }
  ++it->second.users;
  return std::unique_ptr<CudaIpcMapping>(new Mapping(std::move(key), it->second.base));
}

}  // namespace kvbounce
