// The public factories of kvbounce/transports.h.
#include "kvbounce/transports.h"
#include "transport/cuda_ipc/cuda_ipc_transport.h"
#include "transport/fault/fault_transport.h"
#include "transport/loopback/loopback_transport.h"
#if defined(KVBOUNCE_HAVE_UCX)
#include "transport/ucx/ucx_transport.h"
#endif

namespace kvbounce {

std::shared_ptr<LoopbackFabric> NewLoopbackFabric() { return LoopbackFabric::Create(); }

Result<std::unique_ptr<Transport>> NewLoopbackTransport(std::shared_ptr<LoopbackFabric> fabric,
                                                        std::string name) {
  KVB_ASSIGN_OR_RETURN(std::unique_ptr<LoopbackTransport> t,
                       LoopbackTransport::Create(std::move(fabric), std::move(name)));
  return std::unique_ptr<Transport>(std::move(t));
}

Result<std::unique_ptr<Transport>> NewLoopbackTransport(std::shared_ptr<LoopbackFabric> fabric,
                                                        std::string name,
                                                        const LoopbackOptions& options) {
  KVB_ASSIGN_OR_RETURN(std::unique_ptr<LoopbackTransport> t,
                       LoopbackTransport::Create(std::move(fabric), std::move(name), options));
  return std::unique_ptr<Transport>(std::move(t));
}

Result<std::unique_ptr<Transport>> NewCudaIpcTransport(const CudaIpcTransportOptions& options) {
  return CreateCudaIpcTransport(options);
}

bool UcxTransportAvailable() {
#if defined(KVBOUNCE_HAVE_UCX)
  return true;
#else
  return false;
#endif
}

Result<std::unique_ptr<Transport>> NewUcxTransport(const UcxTransportOptions& options) {
#if defined(KVBOUNCE_HAVE_UCX)
  KVB_ASSIGN_OR_RETURN(std::unique_ptr<UcxTransport> t, UcxTransport::Create(options));
  return std::unique_ptr<Transport>(std::move(t));
#else
  (void)options;
  return UnimplementedError("this build of kvbounce has no UCX transport (UCX was not found)");
#endif
}

Result<std::unique_ptr<Transport>> NewFaultTransport(std::unique_ptr<Transport> inner,
                                                     const FaultInjection& faults) {
  FaultOptions options;
  options.write_fail_rate = faults.write_fail_rate;
  options.delay = faults.delay;
  options.drop_after_ops = faults.drop_after_ops;
  options.seed = faults.seed;
  KVB_ASSIGN_OR_RETURN(std::unique_ptr<FaultTransport> t,
                       FaultTransport::Create(std::move(inner), options));
  return std::unique_ptr<Transport>(std::move(t));
}

}  // namespace kvbounce
