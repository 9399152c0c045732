// Why a test that needs a CUDA device cannot run here, for GTEST_SKIP: ""
// when it can (this build has CUDA and the machine a usable device).
#ifndef KVBOUNCE_TESTS_COMMON_NO_CUDA_DEVICE_H_
#define KVBOUNCE_TESTS_COMMON_NO_CUDA_DEVICE_H_

#include <string>

#include "copy/device_support.h"

namespace kvbounce::testing_util {

inline std::string NoCudaDevice() {
  const DeviceSupport* device = CudaSupport();
  if (device == nullptr) return "this build has no CUDA support";
  std::string why;
  if (device->DeviceCount(&why) == 0) return "no CUDA device: " + why;
  return "";
}

}  // namespace kvbounce::testing_util

#endif  // KVBOUNCE_TESTS_COMMON_NO_CUDA_DEVICE_H_
