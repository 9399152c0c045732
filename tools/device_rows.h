// The bench's semantic fill and check (tools/rank_harness.h) for pools in GPU
// memory: the host code of a rank walks its layout and lists rows (a row is
// head_dim elements of one (layer, k/v, head, token), elem_bytes bytes
// each), and DeviceRowKernels writes or checks all of them on the GPU in a
// few kernel launches, instead of copying the pool to the host.
//
// Values are those of tools/element.h: element d of a row whose seed is
// `seed` (RowSeed of its global indices) holds the low elem_bytes bytes of
// FromSeed(seed, d), little-endian; so a pool filled here and one filled by
// RankHarness::FillCtx hold the same bytes.
//
// Every call is synchronous: it enqueues its work on the object's own
// stream and waits for it before returning. This is the bench harness, run
// outside timed regions, not the library's transfer path. The caller makes
// sure no other GPU work touches the rows during a call.
//
// The row list is uploaded once per call, kChunkRows rows at a time through
// two pinned staging buffers (the host fills one while the GPU works on the
// other), one kernel launch per chunk.
//
// Errors: kUnavailable without a CUDA device; kInvalidArgument for a bad
// shape, device or size; CUDA failures as CudaStatus describes them
// (copy/cuda/cuda_util.h), with the CUDA error text.
//
// This header needs nothing from the CUDA toolkit, so host code compiles
// against it without nvcc; the implementation is the kvbounce_tools_cuda
// target, built only where CUDA is found.
//
// Thread safety: one object per thread. Distinct objects (on one device or
// several) may be used from distinct threads at once; one object's calls
// need external synchronization (they share its stream and staging).
#ifndef KVBOUNCE_TOOLS_DEVICE_ROWS_H_
#define KVBOUNCE_TOOLS_DEVICE_ROWS_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <utility>

#include "kvbounce/status.h"

namespace kvbounce::tools {

// One row of a pool: head_dim elements of elem_bytes bytes at `address`
// (device memory of the object's device, or pinned host memory mapped into
// its address space).
struct DeviceRow {
  uint64_t address = 0;
  // The row's seed (RowSeed of its global indices) for value rows; ignored
  // for sentinel rows.
  uint64_t seed = 0;
};

// What VerifyRows found.
struct DeviceRowCheck {
  uint64_t rows_checked = 0;
  uint64_t bytes_checked = 0;
  // Rows holding at least one wrong byte.
  uint64_t mismatches = 0;
  // The smallest index of a bad row in the concatenation of the lists given
  // (value_rows first, then sentinel_rows: sentinel row j has index
  // value_rows.size() + j); -1 when every row is right.
  int64_t first_bad_row = -1;
};

class DeviceRowKernels {
 public:
  // Rows uploaded and handled per kernel launch; longer lists are cut.
  static constexpr size_t kChunkRows = size_t{1} << 16;

  // A stream and staging buffers on `device`.
  // Errors: kUnavailable ("no CUDA device: ...") without a usable device;
  // kInvalidArgument for a device that does not exist; CUDA errors.
  static Result<std::unique_ptr<DeviceRowKernels>> Create(int device);

  ~DeviceRowKernels();
  DeviceRowKernels(const DeviceRowKernels&) = delete;
  DeviceRowKernels& operator=(const DeviceRowKernels&) = delete;

  int device() const;

  // Writes the semantic values of every row: element d = FromSeed(seed, d),
  // its low elem_bytes bytes, little-endian.
  // Errors: kInvalidArgument for head_dim < 1 or elem_bytes outside 1..8.
  // REQUIRES: every row's bytes are writable memory of this device.
  Status FillRows(std::span<const DeviceRow> rows, int head_dim, int elem_bytes);

  // Checks value rows (they must hold their semantic values) and sentinel
  // rows (every byte must be `sentinel`); counts the rows that differ.
  // Errors: as FillRows. REQUIRES: every row's bytes are readable memory of
  // this device.
  Result<DeviceRowCheck> VerifyRows(std::span<const DeviceRow> value_rows,
                                    std::span<const DeviceRow> sentinel_rows, int head_dim,
                                    int elem_bytes, uint8_t sentinel);

  // Sets [address, address + bytes) of device memory to `value` for each
  // (address, bytes) range (cudaMemsetAsync); empty ranges are skipped.
  Status FillBytes(std::span<const std::pair<uint64_t, uint64_t>> ranges, uint8_t value);

  // The device-to-device copy ceiling: one cudaMemcpyAsync of `bytes`
  // between two buffers it allocates, after one untimed warm-up, repeated
  // `iterations` times between two events. Returns bytes copied per second
  // (each copy counts `bytes` once, not read plus write).
  // Errors: kInvalidArgument for bytes == 0 or iterations < 1;
  // kResourceExhausted when the two buffers do not fit.
  Result<double> MeasureCopyCeiling(size_t bytes, int iterations);

 private:
  struct Impl;  // holds the CUDA handles, which this header does not name
  explicit DeviceRowKernels(std::unique_ptr<Impl> impl);

  std::unique_ptr<Impl> impl_;
};

// The link ceiling between two devices: one cudaMemcpyPeerAsync of `bytes`
// from a buffer on `src_device` to one on `dst_device`, after one untimed
// warm-up, repeated `iterations` times between two events on the source
// device's stream. Peer access from the source device to the destination
// is turned on first where the devices offer it (`*peer_access` says
// whether it is on); without it the driver stages the copy through host
// memory. Returns bytes copied per second. Never creates a multicast
// object. Errors: kInvalidArgument for bytes == 0, iterations < 1 or equal
// devices; a CUDA error naming the call otherwise.
Result<double> MeasurePeerCopyCeiling(int src_device, int dst_device, size_t bytes, int iterations,
                                      bool* peer_access);

}  // namespace kvbounce::tools

#endif  // KVBOUNCE_TOOLS_DEVICE_ROWS_H_
