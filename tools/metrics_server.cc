#include "tools/metrics_server.h"

#include <httplib.h>
#include <pthread.h>
#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <system_error>
#include <thread>

#include "kvbounce/prometheus.h"

namespace kvbounce::tools {

Result<std::unique_ptr<MetricsServer>> MetricsServer::Create(const std::string& host, int port,
                                                             Render render) {
  if (port < 0 || port > 65535) {
    return InvalidArgumentError("--metrics-port = " + std::to_string(port) +
                                " is invalid: must be in [0, 65535] (0: any free port)");
  }
  std::unique_ptr<MetricsServer> s(new MetricsServer());
  s->host_ = host;
  s->render_ = std::move(render);
  s->requests_ = std::make_shared<std::atomic<uint64_t>>(0);
  s->server_ = std::make_unique<httplib::Server>();
  // Not the library's default SO_REUSEPORT: a port another server holds is
  // an error here, not a second listener that takes half the scrapes.
  s->server_->set_socket_options([](socket_t sock) {
    const int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
  MetricsServer* self = s.get();
  auto counter = s->requests_;
  s->server_->Get("/metrics", [self, counter](const httplib::Request&, httplib::Response& res) {
    counter->fetch_add(1, std::memory_order_relaxed);
    Result<std::string> text = self->render_();
    if (!text.ok()) {
      res.status = 500;
      res.set_content(text.status().ToString() + "\n", "text/plain; charset=utf-8");
      return;
    }
    res.set_content(std::move(text).value(), std::string(kPrometheusContentType));
  });
  s->server_->set_error_handler([counter](const httplib::Request&, httplib::Response& res) {
    counter->fetch_add(1, std::memory_order_relaxed);
    if (res.status == 404) res.set_content("not found: try /metrics\n", "text/plain");
  });
  const int bound = port == 0 ? s->server_->bind_to_any_port(host)
                              : (s->server_->bind_to_port(host, port) ? port : -1);
  if (bound <= 0) {
    return UnavailableError("--metrics-port: cannot listen on " + host + ":" +
                            std::to_string(port) + " (in use, or not an address of this host)");
  }
  s->port_ = bound;
  // The server's threads (this one and the pool it starts) take no signal:
  // the worker reads SIGINT/SIGTERM from a signalfd.
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, &old);
  try {
    s->thread_ = std::thread([self] { self->server_->listen_after_bind(); });
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
  } catch (const std::system_error& e) {
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    return InternalError(std::string("--metrics-port: cannot start the server thread: ") +
                         e.what());
  }
  // stop() only reaches a server that runs: wait for it, so that the
  // destructor never meets a server that starts after it was told to stop.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!s->server_->is_running()) {
    if (std::chrono::steady_clock::now() >= deadline) {
      return InternalError("--metrics-port: the server did not start within 10 s");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return s;
}

MetricsServer::~MetricsServer() {
  if (server_ != nullptr) server_->stop();
  if (thread_.joinable()) thread_.join();
}

std::string MetricsServer::address() const { return host_ + ":" + std::to_string(port_); }

uint64_t MetricsServer::requests() const { return requests_->load(std::memory_order_relaxed); }

}  // namespace kvbounce::tools
