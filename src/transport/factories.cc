// The public factories of kvbounce/transports.h.
#include "kvbounce/transports.h"
#include "transport/fault/fault_transport.h"
#include "transport/loopback/loopback_transport.h"

namespace kvbounce {

std::shared_ptr<LoopbackFabric> NewLoopbackFabric() { return LoopbackFabric::Create(); }

Result<std::unique_ptr<Transport>> NewLoopbackTransport(std::shared_ptr<LoopbackFabric> fabric,
                                                        std::string name) {
  KVB_ASSIGN_OR_RETURN(std::unique_ptr<LoopbackTransport> t,
                       LoopbackTransport::Create(std::move(fabric), std::move(name)));
  return std::unique_ptr<Transport>(std::move(t));
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
