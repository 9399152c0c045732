// How the CLI reaches the UCX transport: whether this build has it, and a
// transport for a worker.
//
// TRANSITIONAL: the UCX transport's definitions are not on this branch yet,
// so both functions are referenced weakly and report "unavailable" while
// they are missing. Once the transport is merged these become plain calls.
#ifndef KVBOUNCE_TOOLS_UCX_LINK_H_
#define KVBOUNCE_TOOLS_UCX_LINK_H_

#include <memory>

#include "kvbounce/transports.h"

namespace kvbounce {
[[gnu::weak]] bool UcxTransportAvailable();
[[gnu::weak]] Result<std::unique_ptr<Transport>> NewUcxTransport(
    const UcxTransportOptions& options);
}  // namespace kvbounce

namespace kvbounce::tools {

// True when this build has the UCX transport.
inline bool UcxAvailable() {
  return &UcxTransportAvailable != nullptr && UcxTransportAvailable();
}

// NewUcxTransport, or kUnimplemented in a build without it.
inline Result<std::unique_ptr<Transport>> MakeUcxTransport(const UcxTransportOptions& options) {
  if (&NewUcxTransport == nullptr) {
    return UnimplementedError("this build has no UCX transport");
  }
  return NewUcxTransport(options);
}

}  // namespace kvbounce::tools

#endif  // KVBOUNCE_TOOLS_UCX_LINK_H_
