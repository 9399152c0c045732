// CUDA memory as Allocations (src/memory/allocation.h), and where a pointer
// lives:
//
//   CudaDeviceAllocation  device memory of one device (cudaMalloc);
//   CudaPinnedAllocation  page-locked host memory (cudaHostAlloc), reachable
//                         from every device;
//   CudaVmmAllocation     device memory from the driver's virtual memory
//                         management API (cuMemCreate), exportable as a POSIX
//                         file descriptor to another process on the host;
//   CudaVmmMapping        such memory imported from a file descriptor and
//                         mapped into this process;
//   LocatePointer         the MemoryKind and device of any address.
//
// Driver API: the VMM calls are driver (cu*) calls. They are reached through
// cudaGetDriverEntryPointByVersion, not by linking libcuda, so a program
// built with kvbounce::cuda still starts on a host without a driver (it then
// gets kUnavailable). Every driver call runs with the device's primary
// context current (the one the runtime uses), made current for the call and
// restored after it.
//
// Errors: CUDA runtime errors as CudaStatus (cuda_util.h); driver errors as
// CuStatus below, with the same codes: no driver or no device ->
// kUnavailable; out of memory -> kResourceExhausted; an invalid value,
// handle or device -> kInvalidArgument; an operation the device or platform
// does not support -> kUnimplemented; anything else -> kInternal. Messages
// name the call and carry the driver's error name and text. Arguments that
// can never work (0 bytes, a negative device, a device past the last) are
// kInvalidArgument naming the value, checked before any CUDA call.
//
// Thread safety: the factories and LocatePointer may be called from any
// thread; an allocation or mapping is immutable after creation (see
// Allocation). Destruction makes the owning device current on the calling
// thread (restoring the previous one), so it may happen on any thread.
//
// Ownership: each object owns its memory, handle and virtual address range
// and releases them in its destructor. REQUIRES at destruction: no copy in
// flight still reads or writes the memory. An exported file descriptor is
// owned by the UniqueFd (common/unique_fd.h) returned; an imported one stays
// the caller's.
// Physical VMM memory lives until its last owner is gone: the exporting
// allocation, every mapping of it and every exported descriptor still open.
#ifndef KVBOUNCE_COPY_CUDA_CUDA_MEMORY_H_
#define KVBOUNCE_COPY_CUDA_CUDA_MEMORY_H_

#include <cuda.h>

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <utility>

#include "common/unique_fd.h"
#include "copy/cuda/cuda_util.h"
#include "kvbounce/status.h"
#include "kvbounce/types.h"
#include "memory/allocation.h"

namespace kvbounce {

// OK for CUDA_SUCCESS; otherwise a Status with the code described in the
// file comment and "call: CUDA_ERROR_NAME (text)" as message. Where the
// driver cannot be reached to name the error, the message says "CUresult N".
Status CuStatus(CUresult result, std::string_view call);

// Device memory of one device, from cudaMalloc. Its contents are not
// initialized (zeroing device memory is a kernel launch the caller can do
// on its own stream when it needs it).
class CudaDeviceAllocation final : public Allocation {
 public:
  // Allocates `bytes` on `device`.
  //
  // Errors:
  //   InvalidArgument    bytes == 0; device < 0; device >= the number of
  //                      devices ("device 3 of 1").
  //   Unavailable        no driver or no device.
  //   ResourceExhausted  the device is out of memory.
  static Result<std::unique_ptr<Allocation>> Create(int device, size_t bytes);

  Addr address() const override { return buffer_.addr(); }
  size_t size() const override { return buffer_.size(); }
  MemoryKind kind() const override { return MemoryKind::kCuda; }
  int device() const override { return buffer_.device(); }
  void* host_pointer() const override { return nullptr; }

 private:
  explicit CudaDeviceAllocation(CudaDeviceBuffer buffer) : buffer_(std::move(buffer)) {}

  CudaDeviceBuffer buffer_;  // frees with its device made current
};

// Page-locked host memory from cudaHostAlloc, portable (pinned for every
// device) and mapped (with unified addressing its host address is also its
// device address). Zero-filled at creation, as HostAllocation is, so its
// contents are deterministic and no earlier contents reach a peer.
class CudaPinnedAllocation final : public Allocation {
 public:
  // Errors:
  //   InvalidArgument    bytes == 0.
  //   Unavailable        no driver or no device.
  //   ResourceExhausted  the memory could not be allocated or pinned.
  static Result<std::unique_ptr<Allocation>> Create(size_t bytes);

  Addr address() const override { return buffer_.addr(); }
  size_t size() const override { return buffer_.size(); }
  MemoryKind kind() const override { return MemoryKind::kPinnedHost; }
  void* host_pointer() const override { return buffer_.data(); }

 private:
  explicit CudaPinnedAllocation(CudaPinnedBuffer buffer) : buffer_(std::move(buffer)) {}

  CudaPinnedBuffer buffer_;
};

// A range of this process's virtual addresses mapped onto VMM device memory:
// the memory's handle, the reserved range and the mapping, readable and
// writable from one device. Either imported from a file descriptor another
// CudaVmmAllocation exported (Import), or the mapping behind a
// CudaVmmAllocation. Not copyable or movable: held by unique_ptr.
class CudaVmmMapping {
 public:
  // Imports the memory behind `fd` (from CudaVmmAllocation::ExportFd, in this
  // process or another one on the host, e.g. passed over a Unix socket with
  // SCM_RIGHTS), maps all of it at a new address and makes it readable and
  // writable from `device`. `mapped_bytes` is the exporter's mapped_bytes().
  // The descriptor is borrowed: the caller closes it when it likes, the
  // mapping does not need it afterwards.
  //
  // Errors:
  //   InvalidArgument  fd < 0; mapped_bytes == 0 or not a multiple of the
  //                    allocation granularity of `device`; a bad device;
  //                    mapped_bytes more than the memory behind the
  //                    descriptor (cuMemMap refuses it).
  //   Unimplemented    the device lacks VMM or POSIX descriptor support
  //                    (see CudaVmmAllocation::CheckSupported).
  //   Unavailable      no driver or no device.
  //   (as CuStatus)    a descriptor that is not exported CUDA memory: the
  //                    driver's error for cuMemImportFromShareableHandle,
  //                    kInvalidArgument or kInternal depending on what the
  //                    driver reports.
  // Whatever fails, nothing stays imported, reserved or mapped.
  static Result<std::unique_ptr<CudaVmmMapping>> Import(int fd, size_t mapped_bytes, int device);

  // The same for a fabric handle (CudaVmmAllocation::ExportFabric): the
  // exporter may be another process on this host or, where the GPUs share a
  // fabric (multi-node NVLink with its IMEX service), on another host.
  // Errors: as Import (the handle's instead of the descriptor's), and
  // kUnimplemented when the device offers no fabric handles
  // (CudaVmmAllocation::CheckFabricSupported).
  static Result<std::unique_ptr<CudaVmmMapping>> ImportFabric(const CUmemFabricHandle& handle,
                                                              size_t mapped_bytes, int device);

  // Unmaps the range, frees the addresses and releases this process's
  // reference to the memory, in that order.
  ~CudaVmmMapping();
  CudaVmmMapping(const CudaVmmMapping&) = delete;
  CudaVmmMapping& operator=(const CudaVmmMapping&) = delete;

  // The first byte, a device address: never dereference it from host code.
  Addr address() const { return Addr(base_); }
  // The mapped size: a multiple of the allocation granularity.
  size_t size() const { return size_; }
  int device() const { return device_; }

 private:
  friend class CudaVmmAllocation;

  CudaVmmMapping(int device, size_t size) : device_(device), size_(size) {}

  // Takes ownership of `handle` (released by the destructor, also on
  // failure), reserves `size` bytes of addresses, maps the handle there and
  // grants `device` read/write access. REQUIRES: the device's primary
  // context is current.
  static Result<std::unique_ptr<CudaVmmMapping>> MapHandle(CUmemGenericAllocationHandle handle,
                                                           size_t size, int device);
  // Imports `shareable` (a descriptor, or a pointer to a fabric handle, as
  // `type` says) and maps `mapped_bytes` of it on `device`; `what` names
  // the handle in messages.
  static Result<std::unique_ptr<CudaVmmMapping>> ImportShareable(void* shareable,
                                                                 CUmemAllocationHandleType type,
                                                                 const std::string& what,
                                                                 size_t mapped_bytes, int device);

  int device_;
  size_t size_;
  CUmemGenericAllocationHandle handle_ = 0;
  bool has_handle_ = false;
  CUdeviceptr base_ = 0;  // 0 until the range is reserved
  bool mapped_ = false;
};

// Device memory from cuMemCreate (pinned, on one device, exportable as a
// POSIX file descriptor), mapped into this process and readable and
// writable from its device. A copy engine and a transport treat it as any
// kCuda allocation; a peer process on the same host imports it with
// CudaVmmMapping::Import. Its contents are not initialized.
class CudaVmmAllocation final : public Allocation {
 public:
  // OK when `device` supports virtual memory management and POSIX file
  // descriptor handles.
  //
  // Errors:
  //   InvalidArgument  device < 0 or past the last device.
  //   Unimplemented    the device (or the driver, or the platform) lacks
  //                    either, e.g. under some virtualized or containerized
  //                    setups; the message names the missing attribute.
  //   Unavailable      no driver or no device.
  static Status CheckSupported(int device);

  // Creates `bytes` of device memory on `device`, rounded up to the
  // device's recommended allocation granularity, and maps all of it.
  //
  // Errors:
  //   InvalidArgument    bytes == 0; device < 0 or past the last device.
  //   Unimplemented      as for CheckSupported.
  //   Unavailable        no driver or no device.
  //   ResourceExhausted  the device is out of memory, or the rounded size
  //                      does not fit in size_t.
  static Result<std::unique_ptr<CudaVmmAllocation>> Create(int device, size_t bytes);

  // OK when `device` offers fabric handles
  // (CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED). Errors: as
  // CheckSupported, and kUnimplemented naming the attribute when it does not
  // (or the driver does not know it).
  static Status CheckFabricSupported(int device);

  // A new descriptor for the memory, for a peer's CudaVmmMapping::Import.
  // Each call returns its own descriptor; while it is open the memory stays
  // alive even if this allocation is destroyed.
  //
  // Errors: as CuStatus for cuMemExportToShareableHandle (e.g.
  // kResourceExhausted when the process is out of descriptors, kInternal).
  Result<UniqueFd> ExportFd() const;

  // Fabric handles where the device offers them: Create asks for them
  // beside POSIX descriptors when CheckFabricSupported says so and the host
  // has IMEX channels (/dev/nvidia-caps-imex-channels), and falls back to
  // descriptors alone otherwise or when the driver still refuses
  // (CUDA_ERROR_NOT_PERMITTED without access to a channel);
  // fabric_status() says which, and why.
  bool exports_fabric() const { return fabric_status_.ok(); }
  const Status& fabric_status() const { return fabric_status_; }

  // The memory's fabric handle (64 opaque bytes, no descriptor: it can
  // travel in any message), for a peer's CudaVmmMapping::ImportFabric.
  // Errors: fabric_status() when the allocation has none (kUnimplemented,
  // with the reason); as CuStatus for cuMemExportToShareableHandle.
  Result<CUmemFabricHandle> ExportFabric() const;

  Addr address() const override { return mapping_->address(); }
  // The size requested at creation.
  size_t size() const override { return size_; }
  MemoryKind kind() const override { return MemoryKind::kCuda; }
  int device() const override { return mapping_->device(); }
  void* host_pointer() const override { return nullptr; }
  // The size actually created and mapped (>= size()): what a peer passes to
  // CudaVmmMapping::Import.
  size_t mapped_bytes() const { return mapping_->size(); }

 private:
  CudaVmmAllocation(std::unique_ptr<CudaVmmMapping> mapping, size_t size, Status fabric_status)
      : mapping_(std::move(mapping)), size_(size), fabric_status_(std::move(fabric_status)) {}

  std::unique_ptr<CudaVmmMapping> mapping_;  // owns the memory's handle
  size_t size_;
  Status fabric_status_;  // OK: created with fabric handles
};

// The device allocation (cudaMalloc or VMM) that holds [address, address +
// bytes): its base and size, from cuMemGetAddressRange. REQUIRES: the
// memory's device is current. Errors: kInvalidArgument (an address in no
// allocation, a range that leaves it), the driver's.
struct CudaAllocationRange {
  uint64_t base = 0;
  uint64_t size = 0;
};
Result<CudaAllocationRange> AllocationRange(Addr address, uint64_t bytes);

// The VMM allocation that holds [address, address + bytes), exported as a
// POSIX file descriptor for a peer's CudaVmmMapping::Import(fd,
// allocation_bytes, ...): the descriptor, the address's offset from the
// allocation's base, the allocation's mapped size and its device.
// Errors: kNotFound (not VMM memory: cudaMalloc's, say), kUnimplemented (an
// allocation made without POSIX-fd handles), kInvalidArgument (not device
// memory, a range leaving the allocation), the driver's.
struct CudaVmmExport {
  UniqueFd fd;
  uint64_t offset = 0;
  uint64_t allocation_bytes = 0;
  int device = -1;
};
Result<CudaVmmExport> ExportVmmContaining(Addr address, uint64_t bytes);

// The kind (and device) of the memory at `address`, which may point anywhere
// inside an allocation:
//   device memory (cudaMalloc, VMM mappings, IPC-opened memory)
//                                   -> kCuda and its device;
//   page-locked host memory (cudaHostAlloc, cudaHostRegister)
//                                   -> kPinnedHost, device -1;
//   any other host address          -> kHost, device -1.
// Managed (unified) memory is refused: it moves between host and device on
// demand, so no single kind describes it and a transport cannot register it
// as either.
//
// Errors:
//   InvalidArgument  address 0; managed memory ("managed memory is not
//                    supported").
//   Unavailable      no driver or no device (nothing can be located).
Result<MemoryPlace> LocatePointer(Addr address);

}  // namespace kvbounce

#endif  // KVBOUNCE_COPY_CUDA_CUDA_MEMORY_H_
