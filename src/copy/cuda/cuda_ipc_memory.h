// Sharing device memory with another process of this host through CUDA IPC
// handles (cudaIpcGetMemHandle / cudaIpcOpenMemHandle): the memory of any
// cudaMalloc allocation, without file descriptors. The `cuda-ipc`
// transport (docs/transports.md) exports its registered device regions this
// way and maps its peers' (DeviceSupport::Share / OpenShare).
//
// A handle names a whole allocation; a region inside it is the handle plus
// the region's offset from the allocation's base (cuMemGetAddressRange).
// A process cannot open its own handles (the runtime refuses with
// cudaErrorInvalidContext or the like), and one process opens an allocation
// once at a time: ShareMapping objects of one process that name the same
// allocation share one mapping (reference counted here).
//
// Errors carry the CUDA error text (CudaStatus, CuStatus).
//
// Thread safety: the functions may be called from any thread; a mapping may
// be destroyed on any thread.
#ifndef KVBOUNCE_COPY_CUDA_CUDA_IPC_MEMORY_H_
#define KVBOUNCE_COPY_CUDA_CUDA_IPC_MEMORY_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "kvbounce/status.h"
#include "kvbounce/types.h"

namespace kvbounce {

// The bytes of a CUDA IPC memory handle.
inline constexpr size_t kCudaIpcHandleBytes = 64;

struct CudaIpcExport {
  std::vector<std::byte> handle;  // kCudaIpcHandleBytes
  uint64_t offset = 0;            // of the address from the allocation's base
  uint64_t allocation_bytes = 0;  // the whole allocation
  int device = -1;                // the device the allocation belongs to
};

// Exports the allocation that holds [address, address + bytes).
// Errors: kInvalidArgument (not device memory, or the range leaves the
// allocation), the runtime's (a VMM allocation without legacy IPC support,
// no device).
Result<CudaIpcExport> ExportCudaIpc(Addr address, uint64_t bytes);

// A peer's allocation opened in this process, on `device`; closed when the
// last mapping of it is destroyed.
class CudaIpcMapping {
 public:
  virtual ~CudaIpcMapping() = default;
  // The allocation's base in this process.
  virtual Addr base() const = 0;
};

// Opens `handle` (kCudaIpcHandleBytes). Errors: kInvalidArgument (a handle
// of the wrong size, or one of this process), the runtime's.
Result<std::unique_ptr<CudaIpcMapping>> OpenCudaIpc(std::span<const std::byte> handle, int device);

}  // namespace kvbounce

#endif  // KVBOUNCE_COPY_CUDA_CUDA_IPC_MEMORY_H_
