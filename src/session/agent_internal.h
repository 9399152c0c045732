// Seams of the agent for tests and tools of this repository (not part of the
// installed API): what a test replaces to make a timing deterministic, the
// way LevelDB's Env lets a test own time and threads.
#ifndef KVBOUNCE_SESSION_AGENT_INTERNAL_H_
#define KVBOUNCE_SESSION_AGENT_INTERNAL_H_

#include <functional>
#include <memory>

#include "common/clock.h"
#include "copy/copy_engine.h"
#include "kvbounce/agent.h"
#include "kvbounce/transports.h"

namespace kvbounce {

struct AgentHooks {
  // Receives the copy engine the agent built for itself (gather, scatter,
  // direct) and returns the one it will use: the same engine, or a decorator
  // around it (e.g. one that holds batches until a test releases them). The
  // agent owns what it returns and destroys it during Shutdown, after its
  // last batch completed. Empty: the agent's own engine.
  std::function<std::unique_ptr<CopyEngine>(std::unique_ptr<CopyEngine>)> wrap_copy_engine;

  // The clock of the agent's timers: request deadlines, publication ttls,
  // reserve timeouts, the grace before a silent writer is disconnected
  // (a ManualClock makes them deterministic: see common/clock.h). Metrics
  // timestamps, Connect's timeout and Shutdown's grace stay in real time.
  // Shared by the agent until it is destroyed. Null: the steady clock.
  std::shared_ptr<Clock> clock;

  // Builds the transport of a TransportSpec of kind "ucx" in place of
  // NewUcxTransport, with the options Create derived (a test checks them,
  // and returns any transport). Empty: NewUcxTransport.
  std::function<Result<std::unique_ptr<Transport>>(const UcxTransportOptions&)> make_ucx_transport;
};

// Agent::Create with `hooks` applied; the same validation and errors.
Result<std::unique_ptr<Agent>> CreateAgent(AgentOptions options, AgentHooks hooks);

}  // namespace kvbounce

#endif  // KVBOUNCE_SESSION_AGENT_INTERNAL_H_
