// Factories for the transports this build provides, for applications that
// only include the installed headers.
//
//   auto fabric = kvbounce::NewLoopbackFabric();
//   auto transport = kvbounce::NewLoopbackTransport(fabric, "ctx0-3").value();
//   options.transport = std::move(transport);
//
// Thread safety: the factories may be called from any thread.
#ifndef KVBOUNCE_TRANSPORTS_H_
#define KVBOUNCE_TRANSPORTS_H_

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "kvbounce/status.h"
#include "kvbounce/transport.h"

namespace kvbounce {

// Connects the loopback transports of one process; kept alive by every
// transport made on it.
class LoopbackFabric;
std::shared_ptr<LoopbackFabric> NewLoopbackFabric();

// A transport for agents of this process, at address "loopback:<name>".
// Errors: kInvalidArgument (null fabric, empty name), kAlreadyExists (the
// name is taken on the fabric).
Result<std::unique_ptr<Transport>> NewLoopbackTransport(std::shared_ptr<LoopbackFabric> fabric,
                                                        std::string name);

// Faults to inject into a transport's data plane (tests, benchmarks).
struct FaultInjection {
  double write_fail_rate = 0;          // per write operation, [0, 1]
  std::chrono::microseconds delay{0};  // before each write/flush completion
  int64_t drop_after_ops = 0;          // drop the connection after N operations
  uint64_t seed = 1;
};

// Wraps `inner` in a fault-injecting decorator. Errors: kInvalidArgument
// naming a bad field.
Result<std::unique_ptr<Transport>> NewFaultTransport(std::unique_ptr<Transport> inner,
                                                     const FaultInjection& faults);

}  // namespace kvbounce

#endif  // KVBOUNCE_TRANSPORTS_H_
