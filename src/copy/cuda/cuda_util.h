// CUDA runtime helpers for the CUDA copy engine: CUDA errors as Status, a
// probe for devices, and move-only RAII owners for the runtime handles the
// engine uses (device memory, pinned host memory, a stream, an event).
//
// Errors: every wrapper turns a failing cudaError_t into a Status whose
// message names the call and carries cudaGetErrorName / cudaGetErrorString,
// e.g. "cudaMalloc(1073741824 bytes on device 0): cudaErrorMemoryAllocation
// (out of memory)". Codes: no driver or no device -> kUnavailable; out of
// (device or host) memory -> kResourceExhausted; an invalid value or device
// ordinal -> kInvalidArgument; anything else (launch failures, illegal
// addresses, ...) -> kInternal. A non-sticky error is cleared
// (cudaGetLastError) when it is converted, so it does not resurface from a
// later, unrelated call; a sticky one (the context is lost) cannot be.
//
// Devices: the owners remember the device they were created on and make it
// current (on the calling thread, restoring the previous one) to free
// their handle, so they may be destroyed on any thread.
//
// Thread safety: the free functions may be called from any thread. An owner
// is a value: distinct owners may be used from distinct threads; one owner
// needs external synchronization. Destroying an owner while the GPU still
// uses its handle (a kernel still reading the buffer) is a caller bug.
#ifndef KVBOUNCE_COPY_CUDA_CUDA_UTIL_H_
#define KVBOUNCE_COPY_CUDA_CUDA_UTIL_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>
#include <string_view>

#include "kvbounce/status.h"
#include "kvbounce/types.h"

namespace kvbounce {

// OK for cudaSuccess; otherwise the Status described in the file comment,
// with `call` (what was called, with its arguments where they help) in front.
Status CudaStatus(cudaError_t error, std::string_view call);

// Returns the enclosing function's Status when a CUDA call fails.
#define KVB_CUDA_RETURN_IF_ERROR(expr, call) \
  KVB_RETURN_IF_ERROR(::kvbounce::CudaStatus((expr), (call)))

// The number of CUDA devices this process can use: 0, not an error, when
// there is no driver, no device, or the driver is older than the runtime.
// When it returns 0 and `why` is not null, *why says why (the CUDA error
// text, or "cudaGetDeviceCount reported 0 devices").
int CudaDeviceCount(std::string* why = nullptr);

// Makes `device` current on this thread for its lifetime, then restores the
// device that was current before. Check status() before relying on it.
class ScopedCudaDevice {
 public:
  explicit ScopedCudaDevice(int device);
  ~ScopedCudaDevice();
  ScopedCudaDevice(const ScopedCudaDevice&) = delete;
  ScopedCudaDevice& operator=(const ScopedCudaDevice&) = delete;

  // OK when `device` is now current.
  const Status& status() const { return status_; }

 private:
  int previous_ = -1;  // -1: nothing to restore
  Status status_;
};

// Device memory of one device (cudaMalloc / cudaFree). Move-only.
class CudaDeviceBuffer {
 public:
  // An empty owner (size 0, no memory).
  CudaDeviceBuffer() = default;
  // Allocates `bytes` (> 0) on `device`. The memory is not initialized.
  // Errors: kInvalidArgument for bytes == 0 or a bad device; kResourceExhausted
  // when the device is out of memory; kUnavailable with no device.
  static Result<CudaDeviceBuffer> Allocate(int device, size_t bytes);

  ~CudaDeviceBuffer() { Reset(); }
  CudaDeviceBuffer(CudaDeviceBuffer&& other) noexcept;
  CudaDeviceBuffer& operator=(CudaDeviceBuffer&& other) noexcept;
  CudaDeviceBuffer(const CudaDeviceBuffer&) = delete;
  CudaDeviceBuffer& operator=(const CudaDeviceBuffer&) = delete;

  // A device pointer: never dereference it from host code.
  void* data() const { return data_; }
  Addr addr() const { return Addr::FromPointer(data_); }
  size_t size() const { return size_; }
  int device() const { return device_; }

  // Frees the memory now (the owner becomes empty).
  void Reset();

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
  int device_ = 0;
};

// Page-locked host memory (cudaHostAlloc / cudaFreeHost), allocated portable
// and mapped: with unified addressing its host pointer is also the address
// a kernel on any device uses. Move-only.
class CudaPinnedBuffer {
 public:
  CudaPinnedBuffer() = default;
  // Allocates `bytes` (> 0). The memory is not initialized.
  // Errors: kInvalidArgument for bytes == 0; kResourceExhausted when it
  // cannot be allocated or pinned; kUnavailable with no driver.
  static Result<CudaPinnedBuffer> Allocate(size_t bytes);

  ~CudaPinnedBuffer() { Reset(); }
  CudaPinnedBuffer(CudaPinnedBuffer&& other) noexcept;
  CudaPinnedBuffer& operator=(CudaPinnedBuffer&& other) noexcept;
  CudaPinnedBuffer(const CudaPinnedBuffer&) = delete;
  CudaPinnedBuffer& operator=(const CudaPinnedBuffer&) = delete;

  void* data() const { return data_; }
  Addr addr() const { return Addr::FromPointer(data_); }
  size_t size() const { return size_; }

  void Reset();

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

// A non-blocking stream (it does not synchronize with the legacy default
// stream) of one device. Move-only.
class CudaStream {
 public:
  CudaStream() = default;
  // Errors: as CudaStatus for cudaSetDevice / cudaStreamCreateWithFlags.
  static Result<CudaStream> Create(int device);

  ~CudaStream() { Reset(); }
  CudaStream(CudaStream&& other) noexcept;
  CudaStream& operator=(CudaStream&& other) noexcept;
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;

  cudaStream_t get() const { return stream_; }
  int device() const { return device_; }
  void Reset();

 private:
  cudaStream_t stream_ = nullptr;
  int device_ = 0;
};

// An event of one device, without timing unless `timing` is set. With
// `blocking_sync` a host thread waiting in cudaEventSynchronize sleeps
// instead of spinning. Move-only.
class CudaEvent {
 public:
  CudaEvent() = default;
  static Result<CudaEvent> Create(int device, bool blocking_sync, bool timing = false);

  ~CudaEvent() { Reset(); }
  CudaEvent(CudaEvent&& other) noexcept;
  CudaEvent& operator=(CudaEvent&& other) noexcept;
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;

  cudaEvent_t get() const { return event_; }
  void Reset();

 private:
  cudaEvent_t event_ = nullptr;
  int device_ = 0;
};

}  // namespace kvbounce

#endif  // KVBOUNCE_COPY_CUDA_CUDA_UTIL_H_
