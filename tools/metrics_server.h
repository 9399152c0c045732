// A Prometheus scrape endpoint: an HTTP server (cpp-httplib) on its own
// thread that answers GET /metrics with whatever `render` returns
// (include/kvbounce/prometheus.h), and 404 for any other path. `kvbounce
// worker --metrics-port` runs one over its agent.
//
// Thread safety: `render` is called from the server's threads, several at
// once when scrapes overlap: it must be thread-safe (Agent::Stats is). The
// object itself is owned by one thread. The destructor stops the server and
// joins its thread; no request runs after it returned.
#ifndef KVBOUNCE_TOOLS_METRICS_SERVER_H_
#define KVBOUNCE_TOOLS_METRICS_SERVER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "kvbounce/status.h"

namespace httplib {
class Server;
}

namespace kvbounce::tools {

class MetricsServer {
 public:
  using Render = std::function<Result<std::string>()>;

  // Listens on host:port (port 0: one the kernel picks; see port()) and
  // serves. Errors: kInvalidArgument (port outside [0, 65535]),
  // kUnavailable (the address cannot be bound, e.g. in use), kInternal (the
  // thread cannot start).
  static Result<std::unique_ptr<MetricsServer>> Create(const std::string& host, int port,
                                                       Render render);
  ~MetricsServer();
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  int port() const { return port_; }
  // "host:port".
  std::string address() const;
  // Requests answered so far (any path, any status).
  uint64_t requests() const;

 private:
  MetricsServer() = default;

  std::string host_;
  int port_ = 0;
  Render render_;
  std::unique_ptr<httplib::Server> server_;
  std::shared_ptr<std::atomic<uint64_t>> requests_;
  std::thread thread_;  // joined by the destructor
};

}  // namespace kvbounce::tools

#endif  // KVBOUNCE_TOOLS_METRICS_SERVER_H_
