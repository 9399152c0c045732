// DeviceSupport: what the rest of kvbounce needs from a GPU runtime, behind
// one interface, so that the modules to the right of copy (transports,
// sessions, the tools) handle device pools without depending on CUDA at
// compile time (docs/cuda.md, "Device pools").
//
// A build with a CUDA toolkit provides one implementation (CudaSupport(),
// in kvbounce::cuda); a build without one returns nullptr from CudaSupport()
// and every caller reports kUnimplemented for device memory. Whether a
// device is actually present is a run-time question (DeviceCount).
//
// What it offers:
//   * where an address lives (Locate): the Agent checks that a pool said to
//     be device memory of device d is;
//   * memory: device allocations (arenas of device pools) and pinned host
//     allocations (arenas of host-staged bounce);
//   * a copy engine for a device (gather, scatter and direct of device pools);
//   * an OpCopier: one runtime copy per operation (cudaMemcpyAsync), the way
//     a descriptor-list transport moves device memory — the loopback
//     transport's writes and reads of device memory, and so the faithful
//     `per-block` baseline.
//
// Thread safety: every method may be called from any thread. An OpCopier is
// used by one thread at a time.
#ifndef KVBOUNCE_COPY_DEVICE_SUPPORT_H_
#define KVBOUNCE_COPY_DEVICE_SUPPORT_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/unique_fd.h"
#include "copy/copy_engine.h"
#include "kvbounce/status.h"
#include "kvbounce/types.h"
#include "memory/allocation.h"

namespace kvbounce {

// Copies between any two addresses the runtime can reach (device memory,
// pinned or pageable host memory), one runtime call per operation, in order
// on one stream. Enqueue may return before the bytes landed; Wait returns
// once everything enqueued so far has landed (or failed).
class OpCopier {
 public:
  virtual ~OpCopier() = default;
  // Enqueues one copy of `bytes` bytes from `src` to `dst`. Errors: the
  // runtime's, with the call named; the copier then keeps failing until Wait.
  virtual Status Enqueue(Addr dst, Addr src, uint64_t bytes) = 0;
  // Blocks until every enqueued copy landed; the first error since the
  // last Wait, if any.
  virtual Status Wait() = 0;
};

// What one operation of an OpCopier costs (the loopback transport's cost
// for device memory): the fixed price of one runtime call and the rate of
// a large one.
struct OpCopyCost {
  double op_us = 0;
  double bytes_per_us = 0;
};

// Device memory shared with another process of this host: what that
// process needs to map it (DeviceSupport::Share, OpenShare, OpenShareFd).
// Exportable (VMM) allocations travel as a file descriptor, passed over a
// Unix socket; other device memory as the runtime's IPC handle.
struct DeviceShare {
  // Set for VMM memory: a descriptor of the whole allocation.
  UniqueFd fd;
  // Otherwise: the runtime's IPC handle of the whole allocation.
  std::vector<std::byte> handle;
  uint64_t offset = 0;  // of the shared address from the allocation's base
  uint64_t allocation_bytes = 0;
};

// A peer's allocation mapped into this process; unmapped when destroyed
// (which may happen on any thread).
class DeviceShareMapping {
 public:
  virtual ~DeviceShareMapping() = default;
  // The allocation's first byte in this process.
  virtual Addr base() const = 0;
};

class DeviceSupport {
 public:
  virtual ~DeviceSupport() = default;

  // "cuda".
  virtual std::string_view Name() const = 0;

  // The devices this process can use; 0 (with *why saying why, when not
  // null) when there is no driver or no device.
  virtual int DeviceCount(std::string* why = nullptr) const = 0;

  // The kind and device of the memory at `address`: kCuda and its device for
  // device memory, kPinnedHost (device -1) for page-locked host memory the
  // runtime knows, kHost (device -1) for anything else.
  // Errors: kUnavailable without a driver or device.
  virtual Result<MemoryPlace> Locate(Addr address) const = 0;

  // `bytes` of device memory on `device` (not initialized).
  virtual Result<std::unique_ptr<Allocation>> AllocateDevice(int device, size_t bytes) const = 0;
  // `bytes` of page-locked host memory, mapped into every device's address
  // space (zero-filled).
  virtual Result<std::unique_ptr<Allocation>> AllocatePinned(size_t bytes) const = 0;

  // A batched copy engine on `device`: it reaches that device's memory and
  // pinned host memory, not pageable host memory. Its thread polls for the
  // next batch for `poll_before_sleep` before it sleeps (0: never).
  virtual Result<std::unique_ptr<CopyEngine>> NewCopyEngine(
      int device, std::chrono::microseconds poll_before_sleep) const = 0;

  // A copier issuing one runtime copy per operation, on `device`.
  virtual Result<std::unique_ptr<OpCopier>> NewOpCopier(int device) const = 0;
  virtual OpCopyCost OpCost() const = 0;

  // Exports the allocation holding [address, address + bytes) for another
  // process of this host (CUDA: an IPC handle). Errors: kInvalidArgument
  // (not device memory, a range that leaves its allocation), the runtime's.
  virtual Result<DeviceShare> Share(Addr address, uint64_t bytes) const = 0;
  // Maps a handle another process exported, for `device`. A process cannot
  // map its own handles. Errors: kInvalidArgument (a malformed handle), the
  // runtime's.
  virtual Result<std::unique_ptr<DeviceShareMapping>> OpenShare(std::span<const std::byte> handle,
                                                                int device) const = 0;
  // Maps a descriptor another process exported (`allocation_bytes` as it
  // said), for `device`. The caller keeps `fd`. Errors: kInvalidArgument
  // (not a descriptor, a size that is not the allocation's), the runtime's.
  virtual Result<std::unique_ptr<DeviceShareMapping>> OpenShareFd(int fd, uint64_t allocation_bytes,
                                                                  int device) const = 0;

  // `bytes` of device memory on `device` that Share exports as a file
  // descriptor (CUDA VMM). Errors: kUnimplemented where the device or
  // driver cannot (then AllocateDevice's memory is shared by IPC handle),
  // the runtime's.
  virtual Result<std::unique_ptr<Allocation>> AllocateExportable(int device,
                                                                 size_t bytes) const = 0;
};

// The CUDA support of this build, or nullptr when it was built without a
// CUDA toolkit. Never destroyed.
const DeviceSupport* CudaSupport();

}  // namespace kvbounce

#endif  // KVBOUNCE_COPY_DEVICE_SUPPORT_H_
