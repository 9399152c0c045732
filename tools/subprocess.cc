#include "tools/subprocess.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>

extern char** environ;

namespace kvbounce::tools {
namespace {

Status Errno(const std::string& what) { return InternalError(what + ": " + std::strerror(errno)); }

int MillisUntil(SteadyClock::time_point deadline) {
  const auto left =
      std::chrono::duration_cast<std::chrono::milliseconds>(deadline - SteadyClock::now()).count();
  return static_cast<int>(std::clamp<int64_t>(left, 0, 1000));
}

}  // namespace

// --- SignalWatch -----------------------------------------------------------

Result<std::unique_ptr<SignalWatch>> SignalWatch::Create(std::initializer_list<int> signals) {
  std::unique_ptr<SignalWatch> w(new SignalWatch());
  sigemptyset(&w->set_);
  for (int s : signals) sigaddset(&w->set_, s);
  if (int rc = pthread_sigmask(SIG_BLOCK, &w->set_, &w->old_); rc != 0) {
    errno = rc;
    return Errno("pthread_sigmask");
  }
  w->fd_ = signalfd(-1, &w->set_, SFD_NONBLOCK | SFD_CLOEXEC);
  if (w->fd_ < 0) {
    const Status s = Errno("signalfd");
    pthread_sigmask(SIG_SETMASK, &w->old_, nullptr);
    return s;
  }
  return w;
}

SignalWatch::~SignalWatch() {
  if (fd_ < 0) return;
  while (Take() != 0) {
  }
  // Pending signals not yet visible to the signalfd read above.
  timespec zero{};
  while (sigtimedwait(&set_, nullptr, &zero) > 0) {
  }
  close(fd_);
  pthread_sigmask(SIG_SETMASK, &old_, nullptr);
}

int SignalWatch::Take() {
  signalfd_siginfo info{};
  const ssize_t n = read(fd_, &info, sizeof(info));
  return n == static_cast<ssize_t>(sizeof(info)) ? static_cast<int>(info.ssi_signo) : 0;
}

std::string SignalName(int sig) {
  switch (sig) {
    case SIGINT:
      return "SIGINT";
    case SIGTERM:
      return "SIGTERM";
    case SIGKILL:
      return "SIGKILL";
    case SIGSEGV:
      return "SIGSEGV";
    case SIGABRT:
      return "SIGABRT";
    case SIGBUS:
      return "SIGBUS";
    case SIGPIPE:
      return "SIGPIPE";
    case SIGHUP:
      return "SIGHUP";
    default:
      return "signal " + std::to_string(sig);
  }
}

std::string DescribeWaitStatus(int status) {
  if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return "killed by " + SignalName(WTERMSIG(status));
  return "stopped";
}

// --- Child -----------------------------------------------------------------

Result<std::unique_ptr<Child>> Child::Spawn(const Options& options) {
  // Everything the child needs is built before fork: between fork and exec
  // only async-signal-safe calls are allowed.
  std::vector<std::string> argv_storage;
  argv_storage.push_back(options.executable);
  argv_storage.insert(argv_storage.end(), options.args.begin(), options.args.end());
  std::vector<char*> argv;
  for (std::string& a : argv_storage) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<std::string> env_storage;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string_view entry(*e);
    const bool overridden =
        std::any_of(options.env.begin(), options.env.end(), [&](const auto& kv) {
          return entry.size() > kv.first.size() && entry.substr(0, kv.first.size()) == kv.first &&
                 entry[kv.first.size()] == '=';
        });
    if (!overridden) env_storage.emplace_back(entry);
  }
  for (const auto& [key, value] : options.env) env_storage.push_back(key + "=" + value);
  std::vector<char*> envp;
  for (std::string& e : env_storage) envp.push_back(e.data());
  envp.push_back(nullptr);

  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return Errno("socketpair");
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) {
    const Status s = Errno("fork");
    close(sv[0]);
    close(sv[1]);
    return s;
  }
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);  // the parent died before prctl
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigaction(SIGINT, &dfl, nullptr);
    sigaction(SIGTERM, &dfl, nullptr);
    sigaction(SIGPIPE, &dfl, nullptr);
    // dup2 clears close-on-exec on the new descriptors.
    if (dup2(sv[1], STDIN_FILENO) < 0 || dup2(sv[1], STDOUT_FILENO) < 0) _exit(127);
    execve(argv[0], argv.data(), envp.data());
    _exit(127);
  }
  close(sv[1]);
  std::unique_ptr<Child> child(new Child());
  child->pid_ = pid;
  child->fd_ = sv[0];
  child->name_ = options.name;
  return child;
}

Child::~Child() {
  if (!reaped()) {
    Signal(SIGKILL);
    Reap(SteadyClock::now() + std::chrono::seconds(10));
  }
  if (fd_ >= 0) close(fd_);
}

std::string Child::Who() const { return name_ + " (pid " + std::to_string(pid_) + ")"; }

Status Child::Send(std::string_view line) {
  std::string data(line);
  data += '\n';
  size_t sent = 0;
  while (sent < data.size()) {
    const ssize_t n = send(fd_, data.data() + sent, data.size() - sent, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      return UnavailableError(Who() + " does not take commands any more: " + std::strerror(errno));
    }
    sent += static_cast<size_t>(n);
  }
  return Status::Ok();
}

bool Child::ReadSome() {
  if (eof_) return false;
  char chunk[65536];
  ssize_t n;
  do {
    n = recv(fd_, chunk, sizeof(chunk), MSG_DONTWAIT);
  } while (n < 0 && errno == EINTR);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;
  if (n <= 0) {
    eof_ = true;
    return false;
  }
  buffer_.append(chunk, static_cast<size_t>(n));
  size_t start = 0;
  for (size_t nl; (nl = buffer_.find('\n', start)) != std::string::npos; start = nl + 1) {
    lines_.emplace_back(buffer_, start, nl - start);
  }
  buffer_.erase(0, start);
  return true;
}

void Child::Drain() {
  while (!eof_) {
    const size_t lines = lines_.size(), partial = buffer_.size();
    if (!ReadSome() || (lines_.size() == lines && buffer_.size() == partial)) break;
  }
}

std::optional<std::string> Child::NextLine() {
  if (lines_.empty()) return std::nullopt;
  std::string line = std::move(lines_.front());
  lines_.pop_front();
  return line;
}

bool Child::Reap(std::optional<SteadyClock::time_point> wait_until) {
  while (!reaped()) {
    int status = 0;
    const pid_t r = waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      status_ = status;
      break;
    }
    if (r < 0 && errno != EINTR) {
      status_ = 0;  // not our child any more (reaped elsewhere): nothing to wait for
      break;
    }
    if (!wait_until || SteadyClock::now() >= *wait_until) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return reaped();
}

std::string Child::DescribeExit() const {
  return status_ ? DescribeWaitStatus(*status_) : "still running";
}

void Child::Signal(int sig) {
  // One that already exited is reaped instead, so signalled() names only
  // signals that reached a running child.
  if (Reap()) return;
  kill(pid_, sig);
  signalled_ = sig;
}

// --- ChildGroup ------------------------------------------------------------

size_t ChildGroup::Add(std::unique_ptr<Child> child) {
  children_.push_back(std::move(child));
  return children_.size() - 1;
}

Result<ChildGroup::Line> ChildGroup::Next(SteadyClock::time_point deadline,
                                          const std::vector<size_t>& from) {
  std::vector<size_t> watch = from;
  if (watch.empty()) {
    for (size_t i = 0; i < children_.size(); ++i) watch.push_back(i);
  }
  while (true) {
    for (size_t i : watch) {
      if (std::optional<std::string> line = children_[i]->NextLine()) {
        return Line{i, std::move(*line)};
      }
    }
    for (size_t i : watch) {
      Child& c = *children_[i];
      if (c.eof()) {
        c.Reap(SteadyClock::now() + std::chrono::seconds(1));
        return UnavailableError(
            c.Who() + " died: " + (c.reaped() ? c.DescribeExit() : "it closed its output"));
      }
    }
    if (signals_ != nullptr) {
      if (const int sig = signals_->Take(); sig != 0) {
        return AbortedError("interrupted by " + SignalName(sig));
      }
    }
    if (SteadyClock::now() >= deadline) return DeadlineExceededError("no answer in time");
    std::vector<pollfd> fds;
    for (size_t i : watch) fds.push_back({children_[i]->fd(), POLLIN, 0});
    if (signals_ != nullptr) fds.push_back({signals_->fd(), POLLIN, 0});
    const int rc = poll(fds.data(), fds.size(), MillisUntil(deadline));
    if (rc < 0 && errno != EINTR) return Errno("poll");
    for (size_t k = 0; k < watch.size(); ++k) {
      if (fds[k].revents != 0) children_[watch[k]]->ReadSome();
    }
  }
}

bool ChildGroup::WaitAll(SteadyClock::time_point until) {
  while (true) {
    bool all = true;
    std::vector<pollfd> fds;
    for (auto& c : children_) {
      if (c->reaped()) continue;
      if (c->eof()) {
        if (!c->Reap()) all = false;
        continue;
      }
      all = false;
      fds.push_back({c->fd(), POLLIN, 0});
    }
    if (all) return true;
    if (SteadyClock::now() >= until) return false;
    if (fds.empty()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      continue;
    }
    const int ms = std::min(MillisUntil(until), 50);
    if (poll(fds.data(), fds.size(), ms) > 0) {
      for (auto& c : children_) {
        if (!c->eof()) c->ReadSome();
      }
    }
  }
}

void ChildGroup::Stop(std::chrono::milliseconds quit_wait, std::chrono::milliseconds term_wait) {
  for (auto& c : children_) {
    if (!c->reaped() && !c->eof()) c->Send("quit").IgnoreError();
  }
  if (!WaitAll(SteadyClock::now() + quit_wait)) {
    for (auto& c : children_) c->Signal(SIGTERM);
    if (!WaitAll(SteadyClock::now() + term_wait)) {
      for (auto& c : children_) c->Signal(SIGKILL);
      for (auto& c : children_) c->Reap(SteadyClock::now() + std::chrono::seconds(10));
    }
  }
  // What a child wrote before it went and nobody read yet (killed, or reaped
  // before its output reached EOF) is still in the socket.
  for (auto& c : children_) {
    if (c->reaped()) c->Drain();
  }
}

}  // namespace kvbounce::tools
