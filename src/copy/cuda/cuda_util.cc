#include "copy/cuda/cuda_util.h"

#include <string>
#include <utility>

#include "kvbounce/logging.h"

namespace kvbounce {
namespace {

StatusCode CodeFor(cudaError_t error) {
  switch (error) {
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorInitializationError:
    case cudaErrorDevicesUnavailable:
    case cudaErrorStubLibrary:
    case cudaErrorCallRequiresNewerDriver:
    case cudaErrorSystemDriverMismatch:
    case cudaErrorCompatNotSupportedOnDevice:
      return StatusCode::kUnavailable;
    case cudaErrorMemoryAllocation:
      return StatusCode::kResourceExhausted;
    case cudaErrorInvalidValue:
    case cudaErrorInvalidDevice:
    case cudaErrorInvalidDevicePointer:
      return StatusCode::kInvalidArgument;
    default:
      return StatusCode::kInternal;
  }
}

// Destructors log, never propagate.
void LogIfError(cudaError_t error, std::string_view call) {
  if (error == cudaSuccess) return;
  Log(LogLevel::kWarning, CudaStatus(error, call).ToString());
}

}  // namespace

Status CudaStatus(cudaError_t error, std::string_view call) {
  if (error == cudaSuccess) return Status::Ok();
  // Clears the thread's last error when it is not sticky, so it does not
  // resurface from a later call.
  (void)cudaGetLastError();
  std::string message(call);
  message += ": ";
  message += cudaGetErrorName(error);
  message += " (";
  message += cudaGetErrorString(error);
  message += ")";
  return Status(CodeFor(error), message);
}

int CudaDeviceCount(std::string* why) {
  int count = 0;
  const cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess) {
    if (why != nullptr) *why = CudaStatus(error, "cudaGetDeviceCount").ToString();
    (void)cudaGetLastError();
    return 0;
  }
  if (count == 0 && why != nullptr) *why = "cudaGetDeviceCount reported 0 devices";
  return count;
}

ScopedCudaDevice::ScopedCudaDevice(int device) {
  int current = -1;
  status_ = CudaStatus(cudaGetDevice(&current), "cudaGetDevice");
  if (!status_.ok()) return;
  if (current == device) return;
  status_ = CudaStatus(cudaSetDevice(device), "cudaSetDevice(" + std::to_string(device) + ")");
  if (status_.ok()) previous_ = current;
}

ScopedCudaDevice::~ScopedCudaDevice() {
  if (previous_ >= 0) LogIfError(cudaSetDevice(previous_), "cudaSetDevice (restore)");
}

// --- CudaDeviceBuffer ---

Result<CudaDeviceBuffer> CudaDeviceBuffer::Allocate(int device, size_t bytes) {
  if (bytes == 0) return InvalidArgumentError("cuda device buffer: size 0");
  ScopedCudaDevice scoped(device);
  KVB_RETURN_IF_ERROR(scoped.status());
  void* data = nullptr;
  KVB_CUDA_RETURN_IF_ERROR(cudaMalloc(&data, bytes),
                           "cudaMalloc(" + std::to_string(bytes) + " bytes on device " +
                               std::to_string(device) + ")");
  CudaDeviceBuffer buffer;
  buffer.data_ = data;
  buffer.size_ = bytes;
  buffer.device_ = device;
  return buffer;
}

CudaDeviceBuffer::CudaDeviceBuffer(CudaDeviceBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      device_(other.device_) {}

CudaDeviceBuffer& CudaDeviceBuffer::operator=(CudaDeviceBuffer&& other) noexcept {
  if (this != &other) {
    Reset();
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    device_ = other.device_;
  }
  return *this;
}

void CudaDeviceBuffer::Reset() {
  if (data_ == nullptr) return;
  ScopedCudaDevice scoped(device_);
  LogIfError(cudaFree(data_), "cudaFree");
  data_ = nullptr;
  size_ = 0;
}

// --- CudaPinnedBuffer ---

Result<CudaPinnedBuffer> CudaPinnedBuffer::Allocate(size_t bytes) {
  if (bytes == 0) return InvalidArgumentError("cuda pinned buffer: size 0");
  void* data = nullptr;
  KVB_CUDA_RETURN_IF_ERROR(
      cudaHostAlloc(&data, bytes, cudaHostAllocPortable | cudaHostAllocMapped),
      "cudaHostAlloc(" + std::to_string(bytes) + " bytes)");
  CudaPinnedBuffer buffer;
  buffer.data_ = data;
  buffer.size_ = bytes;
  return buffer;
}

CudaPinnedBuffer::CudaPinnedBuffer(CudaPinnedBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}

CudaPinnedBuffer& CudaPinnedBuffer::operator=(CudaPinnedBuffer&& other) noexcept {
  if (this != &other) {
    Reset();
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

void CudaPinnedBuffer::Reset() {
  if (data_ == nullptr) return;
  LogIfError(cudaFreeHost(data_), "cudaFreeHost");
  data_ = nullptr;
  size_ = 0;
}

// --- CudaStream ---

Result<CudaStream> CudaStream::Create(int device) {
  ScopedCudaDevice scoped(device);
  KVB_RETURN_IF_ERROR(scoped.status());
  cudaStream_t stream = nullptr;
  KVB_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
                           "cudaStreamCreateWithFlags(device " + std::to_string(device) + ")");
  CudaStream owner;
  owner.stream_ = stream;
  owner.device_ = device;
  return owner;
}

CudaStream::CudaStream(CudaStream&& other) noexcept
    : stream_(std::exchange(other.stream_, nullptr)), device_(other.device_) {}

CudaStream& CudaStream::operator=(CudaStream&& other) noexcept {
  if (this != &other) {
    Reset();
    stream_ = std::exchange(other.stream_, nullptr);
    device_ = other.device_;
  }
  return *this;
}

void CudaStream::Reset() {
  if (stream_ == nullptr) return;
  ScopedCudaDevice scoped(device_);
  LogIfError(cudaStreamDestroy(stream_), "cudaStreamDestroy");
  stream_ = nullptr;
}

// --- CudaEvent ---

Result<CudaEvent> CudaEvent::Create(int device, bool blocking_sync, bool timing) {
  ScopedCudaDevice scoped(device);
  KVB_RETURN_IF_ERROR(scoped.status());
  unsigned flags = cudaEventDefault;
  if (blocking_sync) flags |= cudaEventBlockingSync;
  if (!timing) flags |= cudaEventDisableTiming;
  cudaEvent_t event = nullptr;
  KVB_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&event, flags),
                           "cudaEventCreateWithFlags(device " + std::to_string(device) + ")");
  CudaEvent owner;
  owner.event_ = event;
  owner.device_ = device;
  return owner;
}

CudaEvent::CudaEvent(CudaEvent&& other) noexcept
    : event_(std::exchange(other.event_, nullptr)), device_(other.device_) {}

CudaEvent& CudaEvent::operator=(CudaEvent&& other) noexcept {
  if (this != &other) {
    Reset();
    event_ = std::exchange(other.event_, nullptr);
    device_ = other.device_;
  }
  return *this;
}

void CudaEvent::Reset() {
  if (event_ == nullptr) return;
  ScopedCudaDevice scoped(device_);
  LogIfError(cudaEventDestroy(event_), "cudaEventDestroy");
  event_ = nullptr;
}

}  // namespace kvbounce
