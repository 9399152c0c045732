#include "copy/cuda/cuda_memory.h"

#include <cudaTypedefs.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>

#include "kvbounce/logging.h"

namespace kvbounce {
namespace {

// The driver entry points this file uses, with the signatures they have had
// since CUDA 12.0 (the version asked for below; a runtime of this toolkit
// needs a newer driver anyway).
struct DriverApi {
  PFN_cuInit_v2000 init = nullptr;
  PFN_cuGetErrorName_v6000 get_error_name = nullptr;
  PFN_cuGetErrorString_v6000 get_error_string = nullptr;
  PFN_cuDeviceGet_v2000 device_get = nullptr;
  PFN_cuDeviceGetAttribute_v2000 device_get_attribute = nullptr;
  PFN_cuMemGetAllocationGranularity_v10020 mem_get_allocation_granularity = nullptr;
  PFN_cuMemCreate_v10020 mem_create = nullptr;
  PFN_cuMemRelease_v10020 mem_release = nullptr;
  PFN_cuMemAddressReserve_v10020 mem_address_reserve = nullptr;
  PFN_cuMemAddressFree_v10020 mem_address_free = nullptr;
  PFN_cuMemMap_v10020 mem_map = nullptr;
  PFN_cuMemUnmap_v10020 mem_unmap = nullptr;
  PFN_cuMemSetAccess_v10020 mem_set_access = nullptr;
  PFN_cuMemExportToShareableHandle_v10020 mem_export_to_shareable_handle = nullptr;
  PFN_cuMemImportFromShareableHandle_v10020 mem_import_from_shareable_handle = nullptr;
  PFN_cuMemRetainAllocationHandle_v11000 mem_retain_allocation_handle = nullptr;
  PFN_cuMemGetAddressRange_v3020 mem_get_address_range = nullptr;
};

constexpr unsigned kDriverApiVersion = 12000;

template <typename Fn>
Status LoadEntryPoint(const char* symbol, Fn* fn) {
  void* pointer = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  KVB_RETURN_IF_ERROR(
      CudaStatus(cudaGetDriverEntryPointByVersion(symbol, &pointer, kDriverApiVersion,
                                                  cudaEnableDefault, &found),
                 std::string("cudaGetDriverEntryPointByVersion(") + symbol + ")"));
  if (found != cudaDriverEntryPointSuccess || pointer == nullptr) {
    return UnimplementedError(std::string("the CUDA driver has no ") + symbol +
                              " (as of CUDA 12.0)");
  }
  *fn = reinterpret_cast<Fn>(pointer);
  return Status::Ok();
}

// The codes CudaStatus gives runtime errors (cuda_util.cc), for the driver's
// results; CUDA_ERROR_NOT_SUPPORTED is a capability the device, driver or
// platform lacks, which the caller may work around (another kind of memory).
StatusCode CodeFor(CUresult result) {
  switch (result) {
    case CUDA_ERROR_NO_DEVICE:
    case CUDA_ERROR_NOT_INITIALIZED:
    case CUDA_ERROR_DEINITIALIZED:
    case CUDA_ERROR_STUB_LIBRARY:
    case CUDA_ERROR_DEVICE_UNAVAILABLE:
    case CUDA_ERROR_SYSTEM_DRIVER_MISMATCH:
    case CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE:
    case CUDA_ERROR_SYSTEM_NOT_READY:
      return StatusCode::kUnavailable;
    case CUDA_ERROR_OUT_OF_MEMORY:
      return StatusCode::kResourceExhausted;
    case CUDA_ERROR_INVALID_VALUE:
    case CUDA_ERROR_INVALID_DEVICE:
    case CUDA_ERROR_INVALID_HANDLE:
      return StatusCode::kInvalidArgument;
    case CUDA_ERROR_NOT_SUPPORTED:
      return StatusCode::kUnimplemented;
    default:
      return StatusCode::kInternal;
  }
}

// CuStatus with the error names taken from `api` (whatever part of it is
// loaded).
Status CuStatusWith(const DriverApi& api, CUresult result, std::string_view call) {
  if (result == CUDA_SUCCESS) return Status::Ok();
  std::string message(call);
  message += ": ";
  const char* name = nullptr;
  const char* text = nullptr;
  // The names come from the driver itself; without one, the number.
  if (api.get_error_name != nullptr && api.get_error_name(result, &name) == CUDA_SUCCESS &&
      name != nullptr) {
    message += name;
    if (api.get_error_string != nullptr && api.get_error_string(result, &text) == CUDA_SUCCESS &&
        text != nullptr) {
      message += " (";
      message += text;
      message += ")";
    }
  } else {
    message += "CUresult " + std::to_string(static_cast<int>(result));
  }
  return Status(CodeFor(result), message);
}

struct LoadedDriverApi {
  DriverApi api;
  Status status;
};

LoadedDriverApi LoadDriverApi() {
  LoadedDriverApi loaded;
  DriverApi& api = loaded.api;
  loaded.status = [&api]() -> Status {
    KVB_RETURN_IF_ERROR(LoadEntryPoint("cuInit", &api.init));
    KVB_RETURN_IF_ERROR(LoadEntryPoint("cuGetErrorName", &api.get_error_name));
    KVB_RETURN_IF_ERROR(LoadEntryPoint("cuGetErrorString", &api.get_error_string));
    KVB_RETURN_IF_ERROR(LoadEntryPoint("cuDeviceGet", &api.device_get));
    KVB_RETURN_IF_ERROR(LoadEntryPoint("cuDeviceGetAttribute", &api.device_get_attribute));
    KVB_RETURN_IF_ERROR(
        LoadEntryPoint("cuMemGetAllocationGranularity", &api.mem_get_allocation_granularity));
    KVB_RETURN_IF_ERROR(LoadEntryPoint("cuMemCreate", &api.mem_create));
    KVB_RETURN_IF_ERROR(LoadEntryPoint("cuMemRelease", &api.mem_release));
    KVB_RETURN_IF_ERROR(LoadEntryPoint("cuMemAddressReserve", &api.mem_address_reserve));
    KVB_RETURN_IF_ERROR(LoadEntryPoint("cuMemAddressFree", &api.mem_address_free));
    KVB_RETURN_IF_ERROR(LoadEntryPoint("cuMemMap", &api.mem_map));
    KVB_RETURN_IF_ERROR(LoadEntryPoint("cuMemUnmap", &api.mem_unmap));
    KVB_RETURN_IF_ERROR(LoadEntryPoint("cuMemSetAccess", &api.mem_set_access));
    KVB_RETURN_IF_ERROR(
        LoadEntryPoint("cuMemExportToShareableHandle", &api.mem_export_to_shareable_handle));
    KVB_RETURN_IF_ERROR(
        LoadEntryPoint("cuMemImportFromShareableHandle", &api.mem_import_from_shareable_handle));
    KVB_RETURN_IF_ERROR(
        LoadEntryPoint("cuMemRetainAllocationHandle", &api.mem_retain_allocation_handle));
    KVB_RETURN_IF_ERROR(LoadEntryPoint("cuMemGetAddressRange", &api.mem_get_address_range));
    // The runtime has initialized the driver by now; cuInit is idempotent
    // and makes that explicit for the driver calls that follow.
    return CuStatusWith(api, api.init(0), "cuInit");
  }();
  return loaded;
}

// The same entry points for the life of the process: loaded on first use
// (thread-safe), including a failure to load them (no driver does not come
// back later).
const LoadedDriverApi& Loaded() {
  static const LoadedDriverApi loaded = LoadDriverApi();
  return loaded;
}

// The driver API, or why it cannot be used.
Result<const DriverApi*> Driver() {
  const LoadedDriverApi& loaded = Loaded();
  if (!loaded.status.ok()) return loaded.status;
  return &loaded.api;
}

// Only for objects created after Driver() succeeded.
const DriverApi& LoadedDriver() { return Loaded().api; }

// Destructors log, never propagate.
void LogIfError(CUresult result, std::string_view call) {
  if (result == CUDA_SUCCESS) return;
  Log(LogLevel::kWarning, CuStatus(result, call).ToString());
}

std::string Hex(uint64_t value) {
  char text[24];
  std::snprintf(text, sizeof(text), "0x%llx", static_cast<unsigned long long>(value));
  return text;
}

// OK when `device` is the ordinal of a device this process can use.
// `what` names the object being made, for the message.
Status CheckDevice(int device, std::string_view what) {
  if (device < 0) {
    return InvalidArgumentError(std::string(what) + ": device " + std::to_string(device) +
                                " is negative");
  }
  int count = 0;
  KVB_RETURN_IF_ERROR(
      CudaStatus(cudaGetDeviceCount(&count), "cudaGetDeviceCount").WithContext(what));
  if (device >= count) {
    return InvalidArgumentError(std::string(what) + ": device " + std::to_string(device) + " of " +
                                std::to_string(count) + " does not exist (ordinals start at 0)");
  }
  return Status::Ok();
}

// Makes sure the primary context of the device `scoped` made current exists
// and is current, so driver calls run in the context the runtime uses.
Status InitPrimaryContext(const ScopedCudaDevice& scoped, int device) {
  KVB_RETURN_IF_ERROR(scoped.status());
  return CudaStatus(cudaFree(nullptr), "cudaFree(0) (initializes the primary context of device " +
                                           std::to_string(device) + ")");
}

Status CheckSupportedOn(const DriverApi& api, int device) {
  CUdevice cu_device = 0;
  KVB_RETURN_IF_ERROR(
      CuStatus(api.device_get(&cu_device, device), "cuDeviceGet(" + std::to_string(device) + ")"));
  struct Needed {
    CUdevice_attribute attribute;
    const char* name;
    const char* what;
  };
  static constexpr Needed kNeeded[] = {
      {CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
       "CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED", "virtual memory management"},
      {CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED,
       "CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED",
       "POSIX file descriptor handles"},
  };
  for (const Needed& needed : kNeeded) {
    int value = 0;
    KVB_RETURN_IF_ERROR(CuStatus(api.device_get_attribute(&value, needed.attribute, cu_device),
                                 std::string("cuDeviceGetAttribute(") + needed.name + ", device " +
                                     std::to_string(device) + ")"));
    if (value == 0) {
      return UnimplementedError("cuda vmm: device " + std::to_string(device) +
                                " does not support " + needed.what + " (" + needed.name + " is 0)");
    }
  }
  return Status::Ok();
}

// Pinned device memory on `device`, exportable as a POSIX descriptor.
// The properties of kvbounce's VMM allocations: pinned device memory of
// `device`, exportable as a POSIX descriptor and, with `fabric`, as a fabric
// handle too.
CUmemAllocationProp VmmProperties(int device, bool fabric = false) {
  CUmemAllocationProp prop;
  std::memset(&prop, 0, sizeof(prop));
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  prop.requestedHandleTypes =
      fabric ? static_cast<CUmemAllocationHandleType>(CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR |
                                                      CU_MEM_HANDLE_TYPE_FABRIC)
             : CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
  return prop;
}

// Where the IMEX service's channels appear; a process needs one to create or
// import memory with fabric handles.
constexpr const char* kImexChannels = "/dev/nvidia-caps-imex-channels";

// Whether `device` offers fabric handles; a driver that does not know the
// attribute does not.
Status CheckFabricOn(const DriverApi& api, int device) {
  CUdevice cu_device = 0;
  KVB_RETURN_IF_ERROR(
      CuStatus(api.device_get(&cu_device, device), "cuDeviceGet(" + std::to_string(device) + ")"));
  int value = 0;
  const CUresult result =
      api.device_get_attribute(&value, CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED, cu_device);
  if (result != CUDA_SUCCESS || value == 0) {
    return UnimplementedError(
        "cuda vmm: device " + std::to_string(device) +
        " offers no fabric handles "
        "(CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED is " +
        (result == CUDA_SUCCESS ? std::string("0") : "unknown to the driver") + ")");
  }
  return Status::Ok();
}

Result<size_t> Granularity(const DriverApi& api, const CUmemAllocationProp& prop) {
  size_t granularity = 0;
  KVB_RETURN_IF_ERROR(CuStatus(
      api.mem_get_allocation_granularity(&granularity, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED),
      "cuMemGetAllocationGranularity(device " + std::to_string(prop.location.id) + ")"));
  if (granularity == 0) {
    return InternalError("cuMemGetAllocationGranularity returned 0 for device " +
                         std::to_string(prop.location.id));
  }
  return granularity;
}

}  // namespace

Status CuStatus(CUresult result, std::string_view call) {
  if (result == CUDA_SUCCESS) return Status::Ok();
  return CuStatusWith(Loaded().api, result, call);
}

// --- CudaDeviceAllocation ---

Result<std::unique_ptr<Allocation>> CudaDeviceAllocation::Create(int device, size_t bytes) {
  constexpr std::string_view kWhat = "cuda device allocation";
  if (bytes == 0) return InvalidArgumentError("cuda device allocation: size must be > 0 bytes");
  KVB_RETURN_IF_ERROR(CheckDevice(device, kWhat));
  Result<CudaDeviceBuffer> buffer = CudaDeviceBuffer::Allocate(device, bytes);
  if (!buffer.ok()) return buffer.status().WithContext(kWhat);
  return std::unique_ptr<Allocation>(new CudaDeviceAllocation(std::move(buffer).value()));
}

// --- CudaPinnedAllocation ---

Result<std::unique_ptr<Allocation>> CudaPinnedAllocation::Create(size_t bytes) {
  if (bytes == 0) return InvalidArgumentError("cuda pinned allocation: size must be > 0 bytes");
  Result<CudaPinnedBuffer> buffer = CudaPinnedBuffer::Allocate(bytes);
  if (!buffer.ok()) return buffer.status().WithContext("cuda pinned allocation");
  // Deterministic contents, and every page touched now rather than on the
  // first transfer.
  std::memset(buffer->data(), 0, bytes);
  return std::unique_ptr<Allocation>(new CudaPinnedAllocation(std::move(buffer).value()));
}

// --- CudaVmmMapping ---

Result<std::unique_ptr<CudaVmmMapping>> CudaVmmMapping::MapHandle(
    CUmemGenericAllocationHandle handle, size_t size, int device) {
  const DriverApi& api = LoadedDriver();
  // From here on the destructor undoes whatever was done, whichever step
  // fails.
  std::unique_ptr<CudaVmmMapping> mapping(new CudaVmmMapping(device, size));
  mapping->handle_ = handle;
  mapping->has_handle_ = true;
  const std::string sized = std::to_string(size) + " bytes";
  CUdeviceptr base = 0;
  KVB_RETURN_IF_ERROR(CuStatus(api.mem_address_reserve(&base, size, 0, 0, 0),
                               "cuMemAddressReserve(" + sized + ")"));
  mapping->base_ = base;
  KVB_RETURN_IF_ERROR(CuStatus(api.mem_map(base, size, 0, handle, 0),
                               "cuMemMap(" + sized + " at " + Hex(base) + ")"));
  mapping->mapped_ = true;
  CUmemAccessDesc access;
  std::memset(&access, 0, sizeof(access));
  access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  access.location.id = device;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  KVB_RETURN_IF_ERROR(CuStatus(api.mem_set_access(base, size, &access, 1),
                               "cuMemSetAccess(" + sized + " at " + Hex(base) +
                                   ", read/write for device " + std::to_string(device) + ")"));
  return mapping;
}

Result<std::unique_ptr<CudaVmmMapping>> CudaVmmMapping::ImportFabric(
    const CUmemFabricHandle& handle, size_t mapped_bytes, int device) {
  if (mapped_bytes == 0) return InvalidArgumentError("cuda vmm import: mapped_bytes must be > 0");
  CUmemFabricHandle copy = handle;  // the driver reads the handle through a pointer
  return ImportShareable(&copy, CU_MEM_HANDLE_TYPE_FABRIC, "a fabric handle", mapped_bytes, device);
}

Result<std::unique_ptr<CudaVmmMapping>> CudaVmmMapping::Import(int fd, size_t mapped_bytes,
                                                               int device) {
  if (fd < 0) {
    return InvalidArgumentError("cuda vmm import: fd " + std::to_string(fd) +
                                " is not a descriptor");
  }
  if (mapped_bytes == 0) {
    return InvalidArgumentError("cuda vmm import: mapped_bytes must be > 0");
  }
  // The descriptor travels as the pointer-sized handle argument; the driver
  // does not take it over.
  return ImportShareable(reinterpret_cast<void*>(static_cast<uintptr_t>(fd)),
                         CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, "fd " + std::to_string(fd),
                         mapped_bytes, device);
}

Result<std::unique_ptr<CudaVmmMapping>> CudaVmmMapping::ImportShareable(
    void* shareable, CUmemAllocationHandleType type, const std::string& what, size_t mapped_bytes,
    int device) {
  constexpr std::string_view kWhat = "cuda vmm import";
  KVB_RETURN_IF_ERROR(CheckDevice(device, kWhat));
  KVB_ASSIGN_OR_RETURN(const DriverApi* api, Driver());
  ScopedCudaDevice scoped(device);
  KVB_RETURN_IF_ERROR(InitPrimaryContext(scoped, device).WithContext(kWhat));
  KVB_RETURN_IF_ERROR(CheckSupportedOn(*api, device));
  if (type == CU_MEM_HANDLE_TYPE_FABRIC)
    KVB_RETURN_IF_ERROR(CheckFabricOn(*api, device).WithContext(kWhat));
  KVB_ASSIGN_OR_RETURN(const size_t granularity, Granularity(*api, VmmProperties(device)));
  if (mapped_bytes % granularity != 0) {
    return InvalidArgumentError("cuda vmm import: mapped_bytes " + std::to_string(mapped_bytes) +
                                " is not a multiple of the allocation granularity " +
                                std::to_string(granularity) +
                                " (pass the exporter's mapped_bytes())");
  }
  CUmemGenericAllocationHandle handle = 0;
  KVB_RETURN_IF_ERROR(CuStatus(api->mem_import_from_shareable_handle(&handle, shareable, type),
                               "cuMemImportFromShareableHandle(" + what + ")")
                          .WithContext(kWhat));
  Result<std::unique_ptr<CudaVmmMapping>> mapping = MapHandle(handle, mapped_bytes, device);
  if (!mapping.ok()) return mapping.status().WithContext(kWhat);
  return mapping;
}

CudaVmmMapping::~CudaVmmMapping() {
  const DriverApi& api = LoadedDriver();
  ScopedCudaDevice scoped(device_);
  // The reverse of MapHandle: the mapping goes before the addresses it
  // occupies; the handle (this process's reference to the memory) last.
  if (mapped_) LogIfError(api.mem_unmap(base_, size_), "cuMemUnmap");
  if (base_ != 0) LogIfError(api.mem_address_free(base_, size_), "cuMemAddressFree");
  if (has_handle_) LogIfError(api.mem_release(handle_), "cuMemRelease");
}

// --- CudaVmmAllocation ---

Status CudaVmmAllocation::CheckSupported(int device) {
  KVB_RETURN_IF_ERROR(CheckDevice(device, "cuda vmm"));
  KVB_ASSIGN_OR_RETURN(const DriverApi* api, Driver());
  return CheckSupportedOn(*api, device);
}

Result<std::unique_ptr<CudaVmmAllocation>> CudaVmmAllocation::Create(int device, size_t bytes) {
  constexpr std::string_view kWhat = "cuda vmm allocation";
  if (bytes == 0) return InvalidArgumentError("cuda vmm allocation: size must be > 0 bytes");
  KVB_RETURN_IF_ERROR(CheckDevice(device, kWhat));
  KVB_ASSIGN_OR_RETURN(const DriverApi* api, Driver());
  ScopedCudaDevice scoped(device);
  KVB_RETURN_IF_ERROR(InitPrimaryContext(scoped, device).WithContext(kWhat));
  KVB_RETURN_IF_ERROR(CheckSupportedOn(*api, device));
  Status fabric = CheckFabricOn(*api, device);
  if (fabric.ok() && access(kImexChannels, F_OK) != 0) {
    // The driver grants fabric handles only through an IMEX channel; without
    // any, asking would only fail (and show as an error in CUDA's tools).
    fabric = UnimplementedError("cuda vmm: device " + std::to_string(device) +
                                " offers fabric handles but this host has no IMEX channel (" +
                                kImexChannels + " is absent)");
  }
  const CUmemAllocationProp prop = VmmProperties(device);
  KVB_ASSIGN_OR_RETURN(const size_t granularity, Granularity(*api, prop));
  if (bytes > std::numeric_limits<size_t>::max() - (granularity - 1)) {
    return ResourceExhaustedError("cuda vmm allocation: " + std::to_string(bytes) +
                                  " bytes rounded up to the granularity " +
                                  std::to_string(granularity) + " do not fit in size_t");
  }
  const size_t mapped_bytes = (bytes + granularity - 1) / granularity * granularity;
  CUmemGenericAllocationHandle handle = 0;
  const std::string create =
      "cuMemCreate(" + std::to_string(mapped_bytes) + " bytes on device " + std::to_string(device);
  if (fabric.ok()) {
    // Fabric handles beside descriptors. The device may offer them while
    // this host cannot grant them (no IMEX channel): then descriptors alone.
    const CUmemAllocationProp both = VmmProperties(device, /*fabric=*/true);
    const CUresult created = api->mem_create(&handle, mapped_bytes, &both, 0);
    if (created == CUDA_ERROR_OUT_OF_MEMORY) {
      return CuStatus(created, create + ", with fabric handles)").WithContext(kWhat);
    }
    if (created != CUDA_SUCCESS) {
      fabric = UnimplementedError(
          "cuda vmm: device " + std::to_string(device) +
          " offers fabric handles but this process cannot create them (it needs access to an "
          "IMEX channel): " +
          CuStatus(created, create + ", with fabric handles)").ToString());
      handle = 0;
    }
  }
  if (!fabric.ok()) {
    KVB_RETURN_IF_ERROR(CuStatus(api->mem_create(&handle, mapped_bytes, &prop, 0), create + ")")
                            .WithContext(kWhat));
  }
  Result<std::unique_ptr<CudaVmmMapping>> mapping =
      CudaVmmMapping::MapHandle(handle, mapped_bytes, device);
  if (!mapping.ok()) return mapping.status().WithContext(kWhat);
  return std::unique_ptr<CudaVmmAllocation>(
      new CudaVmmAllocation(std::move(mapping).value(), bytes, std::move(fabric)));
}

Result<UniqueFd> CudaVmmAllocation::ExportFd() const {
  const DriverApi& api = LoadedDriver();
  ScopedCudaDevice scoped(mapping_->device());
  KVB_RETURN_IF_ERROR(scoped.status());
  int fd = -1;
  KVB_RETURN_IF_ERROR(
      CuStatus(api.mem_export_to_shareable_handle(&fd, mapping_->handle_,
                                                  CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
               "cuMemExportToShareableHandle")
          .WithContext("cuda vmm export"));
  return UniqueFd(fd);
}

Status CudaVmmAllocation::CheckFabricSupported(int device) {
  KVB_RETURN_IF_ERROR(CheckSupported(device));
  KVB_ASSIGN_OR_RETURN(const DriverApi* api, Driver());
  return CheckFabricOn(*api, device);
}

Result<CUmemFabricHandle> CudaVmmAllocation::ExportFabric() const {
  if (!fabric_status_.ok()) return fabric_status_;
  const DriverApi& api = LoadedDriver();
  ScopedCudaDevice scoped(mapping_->device());
  KVB_RETURN_IF_ERROR(scoped.status());
  CUmemFabricHandle handle;
  std::memset(&handle, 0, sizeof(handle));
  KVB_RETURN_IF_ERROR(CuStatus(api.mem_export_to_shareable_handle(&handle, mapping_->handle_,
                                                                  CU_MEM_HANDLE_TYPE_FABRIC, 0),
                               "cuMemExportToShareableHandle(fabric)")
                          .WithContext("cuda vmm export"));
  return handle;
}

Result<CudaVmmExport> ExportVmmContaining(Addr address, uint64_t bytes) {
  constexpr std::string_view kWhat = "cuda vmm export";
  KVB_ASSIGN_OR_RETURN(const DriverApi* api, Driver());
  KVB_ASSIGN_OR_RETURN(const MemoryPlace place, LocatePointer(address));
  if (place.kind != MemoryKind::kCuda) {
    return InvalidArgumentError("cuda vmm export: " + Hex(address.value()) +
                                " is not device memory");
  }
  ScopedCudaDevice scoped(place.device);
  KVB_RETURN_IF_ERROR(scoped.status());
  CUmemGenericAllocationHandle handle = 0;
  const CUresult retained = api->mem_retain_allocation_handle(
      &handle, reinterpret_cast<void*>(static_cast<uintptr_t>(address.value())));
  if (retained != CUDA_SUCCESS) {
    // Memory of cudaMalloc (or of another allocator) has no VMM handle.
    return NotFoundError("cuda vmm export: " + Hex(address.value()) +
                         " is not in a VMM allocation");
  }
  Result<CudaAllocationRange> range = AllocationRange(address, bytes);
  Status status = range.status().WithContext(kWhat);
  int fd = -1;
  if (status.ok()) {
    // Fails (kUnimplemented) for an allocation made without POSIX-fd handles.
    status = CuStatus(api->mem_export_to_shareable_handle(
                          &fd, handle, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
                      "cuMemExportToShareableHandle")
                 .WithContext(kWhat);
  }
  api->mem_release(handle);  // the reference Retain took
  if (!status.ok()) return status;
  return CudaVmmExport{UniqueFd(fd), address.value() - range->base, range->size, place.device};
}

Result<CudaAllocationRange> AllocationRange(Addr address, uint64_t bytes) {
  KVB_ASSIGN_OR_RETURN(const DriverApi* api, Driver());
  CUdeviceptr base = 0;
  size_t size = 0;
  KVB_RETURN_IF_ERROR(
      CuStatus(api->mem_get_address_range(&base, &size, address.value()),
               "cuMemGetAddressRange(" + Hex(address.value()) + ")"));
  const uint64_t offset = address.value() - base;
  if (address.value() < base || offset > size || bytes > size - offset) {
    return InvalidArgumentError(Hex(address.value()) + "+" + std::to_string(bytes) +
                                " leaves its allocation " + Hex(base) + "+" +
                                std::to_string(size));
  }
  return CudaAllocationRange{base, size};
}

// --- LocatePointer ---

Result<MemoryPlace> LocatePointer(Addr address) {
  if (address.value() == 0) return InvalidArgumentError("locate pointer: address 0");
  cudaPointerAttributes attributes;
  std::memset(&attributes, 0, sizeof(attributes));
  const void* pointer = reinterpret_cast<const void*>(static_cast<uintptr_t>(address.value()));
  KVB_RETURN_IF_ERROR(CudaStatus(cudaPointerGetAttributes(&attributes, pointer),
                                 "cudaPointerGetAttributes(" + Hex(address.value()) + ")")
                          .WithContext("locate pointer"));
  switch (attributes.type) {
    case cudaMemoryTypeDevice:
      return MemoryPlace{.kind = MemoryKind::kCuda, .device = attributes.device};
    case cudaMemoryTypeHost:
      return MemoryPlace{.kind = MemoryKind::kPinnedHost, .device = -1};
    case cudaMemoryTypeUnregistered:
      return MemoryPlace{.kind = MemoryKind::kHost, .device = -1};
    case cudaMemoryTypeManaged:
      return InvalidArgumentError("locate pointer: " + Hex(address.value()) +
                                  " is managed memory: managed memory is not supported");
  }
  return InternalError("locate pointer: cudaPointerGetAttributes(" + Hex(address.value()) +
                       ") returned memory type " +
                       std::to_string(static_cast<int>(attributes.type)));
}

}  // namespace kvbounce
