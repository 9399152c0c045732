#include "copy/device_support.h"

namespace kvbounce {

#if KVBOUNCE_HAVE_CUDA
// Defined by kvbounce::cuda (copy/cuda/cuda_support.cc).
const DeviceSupport* CudaSupportImpl();
const DeviceSupport* CudaSupport() { return CudaSupportImpl(); }
#else
const DeviceSupport* CudaSupport() { return nullptr; }
#endif

}  // namespace kvbounce
