// The Unix channel. The header describes the design; this file keeps to it:
// one I/O thread owns the epoll loop and is the only thread that reads
// sockets, accepts, closes connections and runs callbacks. Callers' threads
// only write to sockets (non-blocking, under mu_) and hand work to the I/O
// thread through mu_ and the eventfd.
#include "transport/unix/unix_channel.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <optional>
#include <string>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "kvbounce/logging.h"

// Linux 6.5: a pidfd for the peer of a Unix socket, without the race of
// pidfd_open(SO_PEERCRED's pid). Older kernels answer ENOPROTOOPT.
#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif

namespace kvbounce {
namespace unix_internal {
namespace {

using Clock = std::chrono::steady_clock;

// The send buffer asked for on every connection (the kernel caps it at
// net.core.wmem_max and doubles it). Packets are at most half the buffer
// the kernel granted, and at most UnixChannel::kMaxPacketBytes.
constexpr int kSocketBufferBytes = static_cast<int>(MiB(1));
constexpr size_t kMinPacketBytes = KiB(4);
// Packets read from one socket before the loop turns to other sockets (the
// epoll is level-triggered, so the rest are read on the next turn); and
// when the peer's process exited, the most read before closing.
constexpr int kPacketsPerTurn = 64;
constexpr int kPacketsAtExit = 4096;
constexpr int kAcceptsPerTurn = 64;
// How long the listener rests after accept ran out of descriptors or memory
// (it would be readable again at once).
constexpr auto kListenerRest = std::chrono::milliseconds(100);

static_assert(UnixChannel::kMaxMessageBytes <= UINT32_MAX, "the fragment header holds 32 bits");
static_assert(UnixChannel::kMaxPacketBytes > UnixChannel::kPacketHeaderBytes);

// What an epoll event is about: data.u64 = id << 2 | kind.
enum class Tag : uint64_t { kWake = 0, kListener = 1, kSocket = 2, kPidfd = 3 };
uint64_t EpollData(Tag tag, ChannelPeerId id) { return id << 2 | static_cast<uint64_t>(tag); }

std::string ErrnoText(int error) {
  return std::error_code(error, std::generic_category()).message();
}
std::string CallFailed(std::string_view call, int error) {
  return std::string(call) + ": " + ErrnoText(error);
}

void PutLe32(uint32_t value, std::byte* out) {
  for (int i = 0; i < 4; ++i) out[i] = static_cast<std::byte>(value >> (8 * i));
}
uint32_t GetLe32(const std::byte* in) {
  uint32_t value = 0;
  for (int i = 0; i < 4; ++i) value |= static_cast<uint32_t>(in[i]) << (8 * i);
  return value;
}

// A sockaddr_un for "@<abstract name>" or "/<path>".
struct SocketAddress {
  sockaddr_un addr{};
  socklen_t len = 0;
  std::string path;  // the socket file; empty for an abstract name
};

Result<SocketAddress> ParseName(std::string_view name) {
  constexpr size_t kMaxName = sizeof(sockaddr_un::sun_path) - 1;
  if (name.find('\0') != std::string_view::npos) {
    return InvalidArgumentError("unix address holds a NUL byte");
  }
  SocketAddress out;
  out.addr.sun_family = AF_UNIX;
  if (!name.empty() && name.front() == '@') {
    const std::string_view body = name.substr(1);
    if (body.empty()) return InvalidArgumentError("unix address: empty abstract name after '@'");
    if (body.size() > kMaxName) {
      return InvalidArgumentError("unix address: abstract name of " + std::to_string(body.size()) +
                                  " bytes, more than " + std::to_string(kMaxName));
    }
    // Abstract names are exact byte strings: a leading NUL, no trailing one.
    out.addr.sun_path[0] = '\0';
    std::memcpy(out.addr.sun_path + 1, body.data(), body.size());
    out.len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + body.size());
    return out;
  }
  if (!name.empty() && name.front() == '/') {
    if (name.size() > kMaxName) {
      return InvalidArgumentError("unix address: path of " + std::to_string(name.size()) +
                                  " bytes, more than " + std::to_string(kMaxName));
    }
    std::memcpy(out.addr.sun_path, name.data(), name.size());
    out.addr.sun_path[name.size()] = '\0';
    out.len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + name.size() + 1);
    out.path = std::string(name);
    return out;
  }
  return InvalidArgumentError("unix address: \"" + std::string(name) +
                              "\" is neither @<abstract name> nor /<path>");
}

Result<SocketAddress> ParseAddress(std::string_view address) {
  if (!address.starts_with(UnixChannel::kAddressPrefix)) {
    return InvalidArgumentError("\"" + std::string(address) + "\" is not a unix address (unix:@" +
                                "<name> or unix:/<path>)");
  }
  return ParseName(address.substr(UnixChannel::kAddressPrefix.size()));
}

// "@kvbounce-<pid>-<counter>-<random>": unique per process and channel.
std::string UniqueAbstractName() {
  static std::atomic<uint64_t> counter{0};
  uint64_t random = 0;
  if (getrandom(&random, sizeof(random), GRND_NONBLOCK) != static_cast<ssize_t>(sizeof(random))) {
    random = static_cast<uint64_t>(Clock::now().time_since_epoch().count()) * 0x9E3779B97F4A7C15u;
  }
  char buffer[96];
  std::snprintf(buffer, sizeof(buffer), "@kvbounce-%d-%llu-%016llx", static_cast<int>(getpid()),
                static_cast<unsigned long long>(counter.fetch_add(1)),
                static_cast<unsigned long long>(random));
  return buffer;
}

// Unlinks a bound socket file when destroyed.
class SocketFile {
 public:
  SocketFile() = default;
  explicit SocketFile(std::string path) : path_(std::move(path)) {}
  SocketFile(SocketFile&& other) noexcept : path_(std::exchange(other.path_, {})) {}
  SocketFile& operator=(SocketFile&&) = delete;
  SocketFile(const SocketFile&) = delete;
  SocketFile& operator=(const SocketFile&) = delete;
  ~SocketFile() { Reset(); }
  void Reset() {
    if (!path_.empty() && unlink(path_.c_str()) != 0 && errno != ENOENT) {
      Log(LogLevel::kWarning, "unix channel: cannot unlink " + path_ + ": " + ErrnoText(errno));
    }
    path_.clear();
  }

 private:
  std::string path_;
};

// A pidfd for the peer of `socket_fd`, whose pid is `pid`; empty where the
// kernel has none.
UniqueFd OpenPeerPidfd(int socket_fd, pid_t pid) {
  int fd = -1;
  socklen_t len = sizeof(fd);
  if (getsockopt(socket_fd, SOL_SOCKET, SO_PEERPIDFD, &fd, &len) == 0 && fd >= 0) {
    return UniqueFd(fd);
  }
#if defined(SYS_pidfd_open)
  // Racy only in a way that does not matter here: the pid can be reused only
  // after the peer exited and was reaped, and then its socket has closed
  // (unless another process inherited it) and EOF ends the connection.
  const long pidfd = syscall(SYS_pidfd_open, pid, 0);
  if (pidfd >= 0) return UniqueFd(static_cast<int>(pidfd));
  if (errno != ENOSYS && errno != ESRCH) {
    Log(LogLevel::kWarning, "unix channel: pidfd_open(" + std::to_string(pid) +
                                "): " + ErrnoText(errno) + "; relying on end-of-file");
  }
#else
  (void)pid;
#endif
  return UniqueFd();
}

bool PidfdReadable(int pidfd) {
  if (pidfd < 0) return false;
  pollfd p{.fd = pidfd, .events = POLLIN, .revents = 0};
  return poll(&p, 1, 0) > 0 && (p.revents & (POLLIN | POLLHUP | POLLERR)) != 0;
}

// A message on its way out: handed to the kernel fragment by fragment.
struct OutMessage {
  std::vector<std::byte> bytes;
  std::vector<UniqueFd> fds;  // duplicates of the caller's, closed once sent
  size_t sent = 0;            // bytes handed to the kernel
  bool started = false;       // the first fragment (with the fds) was sent
};

// kOpen -> kHungUp (EOF from a watched peer: waiting for its process)
// kOpen | kHungUp -> kClosing (the reason is decided; on_closed pending)
// kClosing -> kClosed (sockets closed, on_closed queued)
enum class ConnState { kOpen, kHungUp, kClosing, kClosed };

std::string_view ConnStateName(ConnState state) {
  switch (state) {
    case ConnState::kOpen:
      return "open";
    case ConnState::kHungUp:
      return "hung up";
    case ConnState::kClosing:
      return "closing";
    case ConnState::kClosed:
      return "closed";
  }
  return "?";
}

struct Conn {
  Conn(ChannelPeerId id_in, UniqueFd socket_in, UniqueFd pidfd_in, PeerInfo info_in,
       size_t packet_bytes)
      : id(id_in),
        socket(std::move(socket_in)),
        pidfd(std::move(pidfd_in)),
        info(info_in),
        max_packet_bytes(packet_bytes) {}

  const ChannelPeerId id;
  // Closed only by the I/O thread, after the connection left conns_ (so no
  // other thread can reach them any more).
  UniqueFd socket;
  UniqueFd pidfd;
  const PeerInfo info;
  const size_t max_packet_bytes;

  // Guarded by ChannelCore::mu_.
  ConnState state = ConnState::kOpen;
  Status reason;             // set when leaving kOpen/kHungUp for kClosing
  bool user_closed = false;  // Close() decided the end: deliver no more
  bool send_broken = false;  // sendmsg said the peer is gone (EOF follows)
  bool process_exited = false;
  bool want_out = false;  // EPOLLOUT is armed
  std::deque<OutMessage> queue;
  size_t queued_bytes = 0;
  Clock::time_point hangup_deadline;

  // The message being reassembled: I/O thread only.
  bool in_progress = false;
  uint32_t in_total = 0;
  std::vector<std::byte> in_bytes;
  std::vector<UniqueFd> in_fds;
};

// The one transition function of ConnState. REQUIRES: mu_ held. An illegal
// transition is a bug in this file: reported and aborted.
void Transition(Conn& conn, ConnState to) {
  const ConnState from = conn.state;
  const bool legal =
      (from == ConnState::kOpen && to == ConnState::kHungUp) ||
      ((from == ConnState::kOpen || from == ConnState::kHungUp) && to == ConnState::kClosing) ||
      (from == ConnState::kClosing && to == ConnState::kClosed);
  if (!legal) {
    Log(LogLevel::kError, "unix channel: illegal transition of peer " + std::to_string(conn.id) +
                              " from " + std::string(ConnStateName(from)) + " to " +
                              std::string(ConnStateName(to)) + "; aborting");
    std::abort();
  }
  conn.state = to;
}

struct ClosedPeer {
  PeerInfo info;
  bool process_exited = false;
};

// A callback for the I/O thread to run, in order, outside the lock.
struct Event {
  enum class Kind { kAccepted, kMessage, kClosed };
  Kind kind;
  std::shared_ptr<Conn> conn;
  std::vector<std::byte> bytes;
  std::vector<UniqueFd> fds;
  Status reason;
};

// A socket connected (by Connect or accept), with what the kernel says of
// its peer.
struct Prepared {
  UniqueFd socket;
  UniqueFd pidfd;
  PeerInfo info;
  size_t packet_bytes = 0;
};

}  // namespace

class ChannelCore {
 public:
  static Result<std::unique_ptr<ChannelCore>> Create(UnixChannelOptions options);

  const std::string& address() const { return address_; }
  bool OnIoThread() const;
  Status Start(UnixChannelCallbacks callbacks);
  Result<ChannelPeerId> Connect(std::string_view address, std::chrono::milliseconds timeout);
  Status Send(ChannelPeerId peer, std::span<const std::byte> bytes, std::span<const int> fds);
  void Close(ChannelPeerId peer, const Status& reason);
  Status Shutdown();
  Result<PeerInfo> Peer(ChannelPeerId peer) const;
  bool PeerProcessExited(ChannelPeerId peer) const;

  ChannelCore(UnixChannelOptions options, std::string address, UniqueFd listener, SocketFile file,
              UniqueFd epoll, UniqueFd wake)
      : options_(std::move(options)),
        address_(std::move(address)),
        self_pid_(getpid()),
        listener_(std::move(listener)),
        socket_file_(std::move(file)),
        epoll_(std::move(epoll)),
        wake_(std::move(wake)) {}

 private:
  enum class State { kCreated, kStarted, kStopping };

  // Connection set-up shared by Connect and accept.
  Result<Prepared> Prepare(UniqueFd socket) const;
  // Adds a prepared connection: a new id, conns_, the epoll. REQUIRES: mu_.
  Result<std::shared_ptr<Conn>> AddLocked(Prepared prepared);

  void Wake();
  // Hands the connection's queue to the kernel until it is empty or the
  // socket is full. REQUIRES: mu_ held, conn open.
  void DrainLocked(Conn& conn);
  void ArmOutLocked(Conn& conn, bool on);
  void DropQueueLocked(Conn& conn);

  // I/O thread.
  void Loop();
  void Dispatch(const epoll_event& event);
  void AcceptAll();
  std::shared_ptr<Conn> Find(ChannelPeerId id) const;
  // Reads at most `max_packets` packets of an open connection; false when
  // it is no longer open afterwards.
  bool ReadSocket(const std::shared_ptr<Conn>& conn, int max_packets);
  void Malformed(const std::shared_ptr<Conn>& conn, const std::string& what);
  void PeerHungUp(const std::shared_ptr<Conn>& conn, const std::string& detail);
  // The pidfd is readable: reads what is left, then closes.
  void ProcessExited(const std::shared_ptr<Conn>& conn);
  void CloseExited(const std::shared_ptr<Conn>& conn);
  // Decides the end of an open or hung-up connection (a closing or closed
  // one keeps its reason) and closes it.
  void CloseNow(const std::shared_ptr<Conn>& conn, Status reason);
  void FinishClose(const std::shared_ptr<Conn>& conn);
  void HandlePendingCloses();
  void HandleHangUps();
  void CloseAllForShutdown();
  int NextTimeoutMs() const;
  void Deliver();

  const UnixChannelOptions options_;
  const std::string address_;
  const pid_t self_pid_;
  UniqueFd listener_;
  SocketFile socket_file_;
  const UniqueFd epoll_;
  const UniqueFd wake_;

  // Serializes Shutdown; shut_down_ says it finished.
  std::mutex shutdown_mu_;
  bool shut_down_ = false;  // guarded by shutdown_mu_

  mutable std::mutex mu_;
  State state_ = State::kCreated;                                   // guarded by mu_
  std::thread io_thread_;                                           // guarded by mu_
  std::thread::id io_thread_id_;                                    // guarded by mu_
  ChannelPeerId next_id_ = 1;                                       // guarded by mu_
  std::unordered_map<ChannelPeerId, std::shared_ptr<Conn>> conns_;  // guarded by mu_
  std::unordered_map<ChannelPeerId, ClosedPeer> closed_;            // guarded by mu_
  std::vector<ChannelPeerId> pending_closes_;                       // guarded by mu_

  // Written by Start before the I/O thread exists; then read by it only.
  UnixChannelCallbacks callbacks_;
  // I/O thread only.
  std::vector<Event> events_;
  std::vector<std::shared_ptr<Conn>> hung_up_;
  std::optional<Clock::time_point> listener_resume_at_;
  std::vector<std::byte> recv_buffer_;
};

Result<std::unique_ptr<ChannelCore>> ChannelCore::Create(UnixChannelOptions options) {
  if (options.max_queued_bytes < UnixChannel::kMaxMessageBytes) {
    return InvalidArgumentError("unix channel: max_queued_bytes " +
                                std::to_string(options.max_queued_bytes) +
                                " is less than one message of kMaxMessageBytes (" +
                                std::to_string(UnixChannel::kMaxMessageBytes) + ")");
  }
  if (options.max_queued_messages == 0) {
    return InvalidArgumentError("unix channel: max_queued_messages must be at least 1");
  }
  if (options.exit_grace.count() < 0) {
    return InvalidArgumentError("unix channel: exit_grace must not be negative");
  }
  const bool generated = options.name.empty();
  UniqueFd listener;
  SocketAddress where;
  std::string name;
  // A generated name collides only by astronomic chance; try a few anyway.
  for (int attempt = 0;; ++attempt) {
    name = generated ? UniqueAbstractName() : options.name;
    Result<SocketAddress> parsed = ParseName(name);
    if (!parsed.ok()) return std::move(parsed).status().WithContext("unix channel name");
    where = *std::move(parsed);
    listener = UniqueFd(socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (!listener.valid()) return InternalError(CallFailed("unix channel: socket", errno));
    if (bind(listener.get(), reinterpret_cast<const sockaddr*>(&where.addr), where.len) == 0) break;
    const int error = errno;
    if (error == EADDRINUSE) {
      if (generated && attempt < 3) continue;
      return AlreadyExistsError("unix channel: unix:" + name + " is in use");
    }
    return UnavailableError(CallFailed("unix channel: bind unix:" + name, error));
  }
  SocketFile file(where.path);
  if (listen(listener.get(), SOMAXCONN) != 0) {
    return UnavailableError(CallFailed("unix channel: listen on unix:" + name, errno));
  }
  UniqueFd epoll(epoll_create1(EPOLL_CLOEXEC));
  if (!epoll.valid()) return InternalError(CallFailed("unix channel: epoll_create1", errno));
  UniqueFd wake(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!wake.valid()) return InternalError(CallFailed("unix channel: eventfd", errno));
  for (const auto& [fd, tag] : {std::pair<int, Tag>{wake.get(), Tag::kWake},
                                std::pair<int, Tag>{listener.get(), Tag::kListener}}) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = EpollData(tag, 0);
    if (epoll_ctl(epoll.get(), EPOLL_CTL_ADD, fd, &ev) != 0) {
      return InternalError(CallFailed("unix channel: epoll_ctl", errno));
    }
  }
  std::string address = std::string(UnixChannel::kAddressPrefix) + name;
  return std::make_unique<ChannelCore>(std::move(options), std::move(address), std::move(listener),
                                       std::move(file), std::move(epoll), std::move(wake));
}

bool ChannelCore::OnIoThread() const {
  std::lock_guard<std::mutex> lock(mu_);
  return io_thread_id_ == std::this_thread::get_id();
}

Status ChannelCore::Start(UnixChannelCallbacks callbacks) {
  if (!callbacks.on_message || !callbacks.on_closed) {
    return InvalidArgumentError(address_ + ": Start needs on_message and on_closed");
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (state_ == State::kStopping) return AbortedError(address_ + " is shut down");
  if (state_ == State::kStarted) return FailedPreconditionError(address_ + " is already started");
  callbacks_ = std::move(callbacks);
  recv_buffer_.resize(UnixChannel::kMaxPacketBytes);
  // std::thread reports failure by throwing; the library reports Status.
  try {
    io_thread_ = std::thread([this] { Loop(); });
  } catch (const std::system_error& e) {
    callbacks_ = {};
    return ResourceExhaustedError(address_ + ": cannot start the I/O thread: " + e.what());
  }
  io_thread_id_ = io_thread_.get_id();
  state_ = State::kStarted;
  return Status::Ok();
}

Result<Prepared> ChannelCore::Prepare(UniqueFd socket) const {
  Prepared out;
  const int fd = socket.get();
  // A packet must fit the send buffer (EMSGSIZE otherwise): ask for enough,
  // and cut packets to what the kernel granted.
  const int asked = kSocketBufferBytes;
  if (setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &asked, sizeof(asked)) != 0) {
    Log(LogLevel::kDebug, "unix channel: " + CallFailed("setsockopt(SO_SNDBUF)", errno));
  }
  int granted = 0;
  socklen_t len = sizeof(granted);
  if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &granted, &len) != 0) {
    return InternalError(CallFailed("getsockopt(SO_SNDBUF)", errno));
  }
  out.packet_bytes = std::min(UnixChannel::kMaxPacketBytes, static_cast<size_t>(granted) / 2);
  if (out.packet_bytes < kMinPacketBytes) {
    return InternalError("the socket's send buffer of " + std::to_string(granted) +
                         " bytes cannot hold a packet of " + std::to_string(kMinPacketBytes));
  }
  ucred cred{};
  len = sizeof(cred);
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    return InternalError(CallFailed("getsockopt(SO_PEERCRED)", errno));
  }
  out.info.pid = cred.pid;
  out.info.uid = cred.uid;
  out.info.gid = cred.gid;
  if (options_.watch_peer_process && cred.pid > 0 && cred.pid != self_pid_) {
    out.pidfd = OpenPeerPidfd(fd, cred.pid);
  }
  out.info.process_exit_watched = out.pidfd.valid();
  out.socket = std::move(socket);
  return out;
}

Result<std::shared_ptr<Conn>> ChannelCore::AddLocked(Prepared prepared) {
  const ChannelPeerId id = next_id_++;
  auto conn = std::make_shared<Conn>(id, std::move(prepared.socket), std::move(prepared.pidfd),
                                     prepared.info, prepared.packet_bytes);
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLRDHUP;
  ev.data.u64 = EpollData(Tag::kSocket, id);
  if (epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, conn->socket.get(), &ev) != 0) {
    return InternalError(CallFailed("epoll_ctl", errno));
  }
  if (conn->pidfd.valid()) {
    ev.events = EPOLLIN;
    ev.data.u64 = EpollData(Tag::kPidfd, id);
    if (epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, conn->pidfd.get(), &ev) != 0) {
      const int error = errno;
      epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, conn->socket.get(), nullptr);
      return InternalError(CallFailed("epoll_ctl", error));
    }
  }
  conns_.emplace(id, conn);
  return conn;
}

Result<ChannelPeerId> ChannelCore::Connect(std::string_view address,
                                           std::chrono::milliseconds timeout) {
  KVB_ASSIGN_OR_RETURN(const SocketAddress target, ParseAddress(address));
  const std::string what = "connect to " + std::string(address);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (state_ == State::kCreated) return FailedPreconditionError(what + ": channel not started");
    if (state_ == State::kStopping) return AbortedError(what + ": " + address_ + " is shut down");
  }
  UniqueFd socket_fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!socket_fd.valid()) {
    const int error = errno;
    if (error == EMFILE || error == ENFILE) return ResourceExhaustedError(CallFailed(what, error));
    return InternalError(CallFailed(what + ": socket", error));
  }
  // Only a full backlog makes a Unix connect wait, for as long as
  // SO_SNDTIMEO says (0 would mean forever: non-blocking instead).
  const Clock::time_point deadline = Clock::now() + timeout;
  if (timeout.count() <= 0) {
    if (fcntl(socket_fd.get(), F_SETFL, O_NONBLOCK) != 0) {
      return InternalError(CallFailed(what + ": fcntl", errno));
    }
  }
  while (true) {
    if (timeout.count() > 0) {
      const auto left =
          std::max(std::chrono::duration_cast<std::chrono::microseconds>(deadline - Clock::now()),
                   std::chrono::microseconds(1));
      timeval tv{.tv_sec = static_cast<time_t>(left.count() / 1000000),
                 .tv_usec = static_cast<suseconds_t>(left.count() % 1000000)};
      if (setsockopt(socket_fd.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) != 0) {
        return InternalError(CallFailed(what + ": setsockopt(SO_SNDTIMEO)", errno));
      }
    }
    if (::connect(socket_fd.get(), reinterpret_cast<const sockaddr*>(&target.addr), target.len) ==
        0) {
      break;
    }
    const int error = errno;
    if (error == EINTR && Clock::now() < deadline) continue;
    if (error == EAGAIN || error == EWOULDBLOCK || error == EINTR || error == EINPROGRESS) {
      return DeadlineExceededError(what + ": the listener did not take the connection within " +
                                   std::to_string(timeout.count()) + " ms");
    }
    if (error == ECONNREFUSED || error == ENOENT || error == ENOTDIR || error == EACCES ||
        error == EPERM || error == ECONNRESET) {
      return UnavailableError(CallFailed(what + ": nobody listens there", error));
    }
    return InternalError(CallFailed(what, error));
  }
  if (fcntl(socket_fd.get(), F_SETFL, O_NONBLOCK) != 0) {
    return InternalError(CallFailed(what + ": fcntl", errno));
  }
  Result<Prepared> prepared = Prepare(std::move(socket_fd));
  if (!prepared.ok()) return std::move(prepared).status().WithContext(what);
  std::lock_guard<std::mutex> lock(mu_);
  if (state_ != State::kStarted) return AbortedError(what + ": " + address_ + " is shut down");
  Result<std::shared_ptr<Conn>> conn = AddLocked(*std::move(prepared));
  if (!conn.ok()) return std::move(conn).status().WithContext(what);
  return (*conn)->id;
}

void ChannelCore::Wake() {
  const uint64_t one = 1;
  [[maybe_unused]] const ssize_t n = write(wake_.get(), &one, sizeof(one));
}

void ChannelCore::ArmOutLocked(Conn& conn, bool on) {
  if (conn.want_out == on || conn.state != ConnState::kOpen) return;
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLRDHUP | (on ? EPOLLOUT : 0u);
  ev.data.u64 = EpollData(Tag::kSocket, conn.id);
  if (epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, conn.socket.get(), &ev) != 0) {
    Log(LogLevel::kError, address_ + ": " + CallFailed("epoll_ctl(MOD)", errno));
    return;
  }
  conn.want_out = on;
}

void ChannelCore::DropQueueLocked(Conn& conn) {
  conn.queue.clear();
  conn.queued_bytes = 0;
  ArmOutLocked(conn, false);
}

void ChannelCore::DrainLocked(Conn& conn) {
  alignas(cmsghdr) std::array<char, CMSG_SPACE(sizeof(int) * UnixChannel::kMaxFds)> control{};
  while (!conn.queue.empty() && conn.state == ConnState::kOpen && !conn.send_broken) {
    OutMessage& m = conn.queue.front();
    const size_t payload =
        std::min(m.bytes.size() - m.sent, conn.max_packet_bytes - UnixChannel::kPacketHeaderBytes);
    std::array<std::byte, UnixChannel::kPacketHeaderBytes> header;
    PutLe32(static_cast<uint32_t>(m.bytes.size()), header.data());
    PutLe32(static_cast<uint32_t>(m.sent), header.data() + 4);
    std::array<iovec, 2> iov = {iovec{header.data(), header.size()},
                                iovec{m.bytes.data() + m.sent, payload}};
    msghdr msg{};
    msg.msg_iov = iov.data();
    msg.msg_iovlen = payload > 0 ? 2 : 1;
    if (!m.started && !m.fds.empty()) {
      const size_t fd_bytes = sizeof(int) * m.fds.size();
      msg.msg_control = control.data();
      msg.msg_controllen = CMSG_SPACE(fd_bytes);
      cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
      cmsg->cmsg_level = SOL_SOCKET;
      cmsg->cmsg_type = SCM_RIGHTS;
      cmsg->cmsg_len = CMSG_LEN(fd_bytes);
      int* out = reinterpret_cast<int*>(CMSG_DATA(cmsg));
      for (size_t i = 0; i < m.fds.size(); ++i) out[i] = m.fds[i].get();
    }
    const ssize_t rc = sendmsg(conn.socket.get(), &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (rc < 0) {
      const int error = errno;
      if (error == EINTR) continue;
      if (error == EAGAIN || error == EWOULDBLOCK) {
        ArmOutLocked(conn, true);  // the I/O thread goes on when there is room
        return;
      }
      if (error == EPIPE || error == ECONNRESET || error == ENOTCONN) {
        // The peer is gone; the I/O thread reads what it sent, then EOF.
        conn.send_broken = true;
        DropQueueLocked(conn);
        return;
      }
      Transition(conn, ConnState::kClosing);
      conn.reason = UnavailableError(
          address_ + ": " + CallFailed("sendmsg to peer " + std::to_string(conn.info.pid), error));
      DropQueueLocked(conn);
      pending_closes_.push_back(conn.id);
      Wake();
      return;
    }
    m.started = true;
    m.sent += payload;
    if (m.sent == m.bytes.size()) {
      // The kernel holds its own references to the fds in flight.
      conn.queued_bytes -= m.bytes.size();
      conn.queue.pop_front();
    }
  }
  ArmOutLocked(conn, false);
}

Status ChannelCore::Send(ChannelPeerId peer, std::span<const std::byte> bytes,
                         std::span<const int> fds) {
  // Built only for an error: Send is on the control path of every message.
  const auto what = [&] { return address_ + ": send to peer " + std::to_string(peer); };
  if (bytes.size() > UnixChannel::kMaxMessageBytes) {
    return InvalidArgumentError(what() + ": a message of " + std::to_string(bytes.size()) +
                                " bytes, more than kMaxMessageBytes (" +
                                std::to_string(UnixChannel::kMaxMessageBytes) + ")");
  }
  if (fds.size() > UnixChannel::kMaxFds) {
    return InvalidArgumentError(what() + ": " + std::to_string(fds.size()) +
                                " descriptors, more than kMaxFds (" +
                                std::to_string(UnixChannel::kMaxFds) + ")");
  }
  OutMessage m;
  m.fds.reserve(fds.size());
  for (size_t i = 0; i < fds.size(); ++i) {
    const int dup = fds[i] < 0 ? -1 : fcntl(fds[i], F_DUPFD_CLOEXEC, 0);
    if (dup < 0) {
      const int error = fds[i] < 0 ? EBADF : errno;
      const std::string which =
          "descriptor " + std::to_string(fds[i]) + " (index " + std::to_string(i) + ")";
      if (error == EMFILE || error == ENFILE) {
        return ResourceExhaustedError(what() + ": cannot duplicate " + which + ": " +
                                      ErrnoText(error));
      }
      return InvalidArgumentError(what() + ": " + which + " is not open: " + ErrnoText(error));
    }
    m.fds.emplace_back(dup);
  }
  m.bytes.assign(bytes.begin(), bytes.end());

  std::lock_guard<std::mutex> lock(mu_);
  if (state_ == State::kCreated) return FailedPreconditionError(what() + ": channel not started");
  if (state_ == State::kStopping) return AbortedError(what() + ": channel shut down");
  auto it = conns_.find(peer);
  if (it == conns_.end()) {
    if (closed_.count(peer) != 0) return UnavailableError(what() + ": the connection is closed");
    return NotFoundError(what() + ": no such peer");
  }
  Conn& conn = *it->second;
  if (conn.state != ConnState::kOpen || conn.send_broken) {
    return UnavailableError(
        what() + ": the connection is " +
        (conn.send_broken ? "closed by the peer" : std::string(ConnStateName(conn.state))));
  }
  if (conn.queue.size() >= options_.max_queued_messages ||
      conn.queued_bytes + m.bytes.size() > options_.max_queued_bytes) {
    return ResourceExhaustedError(
        what() + ": the queue is full (" + std::to_string(conn.queue.size()) + " messages, " +
        std::to_string(conn.queued_bytes) + " bytes; the peer is not reading)");
  }
  conn.queued_bytes += m.bytes.size();
  conn.queue.push_back(std::move(m));
  DrainLocked(conn);
  if (conn.state != ConnState::kOpen || conn.send_broken) {
    return UnavailableError(what() + ": the connection failed while sending" +
                            (conn.reason.ok() ? std::string() : ": " + conn.reason.ToString()));
  }
  return Status::Ok();
}

void ChannelCore::Close(ChannelPeerId peer, const Status& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = conns_.find(peer);
  if (it == conns_.end()) return;
  Conn& conn = *it->second;
  if (conn.state != ConnState::kOpen && conn.state != ConnState::kHungUp) return;
  DropQueueLocked(conn);
  Transition(conn, ConnState::kClosing);
  conn.reason = reason.ok() ? CancelledError("closed by this end") : reason;
  conn.user_closed = true;
  pending_closes_.push_back(peer);
  Wake();
}

Status ChannelCore::Shutdown() {
  if (OnIoThread()) {
    return FailedPreconditionError(address_ + ": Shutdown called on the channel's own I/O thread");
  }
  std::lock_guard<std::mutex> shutdown_lock(shutdown_mu_);
  if (shut_down_) return Status::Ok();
  std::thread thread;
  {
    std::lock_guard<std::mutex> lock(mu_);
    state_ = State::kStopping;
    thread = std::move(io_thread_);
  }
  Wake();
  if (thread.joinable()) thread.join();
  {
    std::lock_guard<std::mutex> lock(mu_);
    io_thread_id_ = std::thread::id();
  }
  // Every connection was closed by the I/O thread (none exist without it:
  // Connect needs Start). The eventfd and epoll stay open until destruction,
  // so a late Close or Send never touches a closed descriptor.
  listener_.Reset();
  socket_file_.Reset();
  shut_down_ = true;
  return Status::Ok();
}

Result<PeerInfo> ChannelCore::Peer(ChannelPeerId peer) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (auto it = conns_.find(peer); it != conns_.end()) return it->second->info;
  if (auto it = closed_.find(peer); it != closed_.end()) return it->second.info;
  return NotFoundError(address_ + ": no peer " + std::to_string(peer));
}

bool ChannelCore::PeerProcessExited(ChannelPeerId peer) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (auto it = conns_.find(peer); it != conns_.end()) {
    return it->second->process_exited || PidfdReadable(it->second->pidfd.get());
  }
  if (auto it = closed_.find(peer); it != closed_.end()) return it->second.process_exited;
  return false;
}

// --- The I/O thread ---

void ChannelCore::Loop() {
  std::array<epoll_event, 64> events;
  // Polls (epoll_wait without a timeout) for poll_before_sleep after the
  // last event, yielding the core between rounds, before it sleeps.
  auto last_event = Clock::now();
  while (true) {
    int timeout_ms = NextTimeoutMs();
    if (options_.poll_before_sleep.count() > 0 && timeout_ms != 0 &&
        Clock::now() - last_event < options_.poll_before_sleep) {
      std::this_thread::yield();
      timeout_ms = 0;
    }
    const int n =
        epoll_wait(epoll_.get(), events.data(), static_cast<int>(events.size()), timeout_ms);
    if (n < 0 && errno != EINTR) {
      Log(LogLevel::kError, address_ + ": " + CallFailed("epoll_wait", errno));
    }
    if (n > 0) last_event = Clock::now();
    for (int i = 0; i < n; ++i) Dispatch(events[i]);
    HandlePendingCloses();
    HandleHangUps();
    if (listener_resume_at_ && Clock::now() >= *listener_resume_at_) {
      listener_resume_at_.reset();
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.u64 = EpollData(Tag::kListener, 0);
      epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, listener_.get(), &ev);
    }
    bool stopping;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping = state_ == State::kStopping;
    }
    if (stopping) CloseAllForShutdown();
    Deliver();
    if (stopping) return;
  }
}

int ChannelCore::NextTimeoutMs() const {
  std::optional<Clock::time_point> next = listener_resume_at_;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& conn : hung_up_) {
      if (conn->state != ConnState::kHungUp) continue;
      if (!next || conn->hangup_deadline < *next) next = conn->hangup_deadline;
    }
  }
  if (!next) return -1;
  const auto left = *next - Clock::now();
  if (left <= Clock::duration::zero()) return 0;
  // Round up, so that the loop wakes at or after the deadline.
  const auto ms = std::chrono::ceil<std::chrono::milliseconds>(left).count();
  return static_cast<int>(std::min<decltype(ms)>(ms, INT_MAX));
}

void ChannelCore::Dispatch(const epoll_event& event) {
  const auto tag = static_cast<Tag>(event.data.u64 & 3);
  const ChannelPeerId id = event.data.u64 >> 2;
  switch (tag) {
    case Tag::kWake: {
      uint64_t value;
      [[maybe_unused]] const ssize_t n = read(wake_.get(), &value, sizeof(value));
      return;
    }
    case Tag::kListener:
      AcceptAll();
      return;
    case Tag::kSocket: {
      std::shared_ptr<Conn> conn = Find(id);
      if (!conn) return;  // closed earlier in this turn
      if ((event.events & EPOLLOUT) != 0) {
        std::lock_guard<std::mutex> lock(mu_);
        if (conn->state == ConnState::kOpen) DrainLocked(*conn);
      }
      if ((event.events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0) {
        ReadSocket(conn, kPacketsPerTurn);
      }
      return;
    }
    case Tag::kPidfd: {
      std::shared_ptr<Conn> conn = Find(id);
      if (conn) ProcessExited(conn);
      return;
    }
  }
}

std::shared_ptr<Conn> ChannelCore::Find(ChannelPeerId id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = conns_.find(id);
  return it == conns_.end() ? nullptr : it->second;
}

void ChannelCore::AcceptAll() {
  for (int i = 0; i < kAcceptsPerTurn; ++i) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (state_ == State::kStopping) return;
    }
    const int fd = accept4(listener_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      const int error = errno;
      if (error == EINTR || error == ECONNABORTED) continue;
      if (error == EAGAIN || error == EWOULDBLOCK) return;
      // Out of descriptors or memory: the listener stays readable, so rest
      // it a while instead of spinning.
      Log(LogLevel::kWarning,
          address_ + ": " + CallFailed("accept4", error) + "; accepting again in 100 ms");
      epoll_event ev{};
      ev.data.u64 = EpollData(Tag::kListener, 0);
      epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, listener_.get(), &ev);
      listener_resume_at_ = Clock::now() + kListenerRest;
      return;
    }
    Result<Prepared> prepared = Prepare(UniqueFd(fd));
    if (!prepared.ok()) {
      Log(LogLevel::kWarning,
          address_ + ": dropped an incoming connection: " + prepared.status().ToString());
      continue;
    }
    std::lock_guard<std::mutex> lock(mu_);
    Result<std::shared_ptr<Conn>> conn = AddLocked(*std::move(prepared));
    if (!conn.ok()) {
      Log(LogLevel::kWarning,
          address_ + ": dropped an incoming connection: " + conn.status().ToString());
      continue;
    }
    events_.push_back(Event{.kind = Event::Kind::kAccepted, .conn = *conn});
  }
}

bool ChannelCore::ReadSocket(const std::shared_ptr<Conn>& conn, int max_packets) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (conn->state != ConnState::kOpen) return false;
  }
  alignas(cmsghdr) std::array<char, CMSG_SPACE(sizeof(int) * UnixChannel::kMaxFds)> control;
  for (int packet = 0; packet < max_packets; ++packet) {
    iovec iov{recv_buffer_.data(), recv_buffer_.size()};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    const ssize_t got = recvmsg(conn->socket.get(), &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (got < 0) {
      const int error = errno;
      if (error == EINTR) continue;
      if (error == EAGAIN || error == EWOULDBLOCK) return true;
      if (error == ECONNRESET) {
        PeerHungUp(conn, " (connection reset)");
        return false;
      }
      CloseNow(conn, UnavailableError(
                         CallFailed("recvmsg from peer " + std::to_string(conn->info.pid), error)));
      return false;
    }
    // Own every descriptor that arrived before anything else can fail.
    // (With MSG_CTRUNC the kernel installed those that fit and closed the
    // rest.)
    std::vector<UniqueFd> fds;
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      const auto* data = reinterpret_cast<const unsigned char*>(CMSG_DATA(c));
      for (size_t i = 0; i < count; ++i) {
        int fd;
        std::memcpy(&fd, data + i * sizeof(int), sizeof(int));
        fds.emplace_back(fd);
      }
    }
    if (got == 0 && fds.empty() && (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) == 0) {
      // End of file, or a packet of no bytes (never sent by a channel).
      pollfd p{.fd = conn->socket.get(), .events = POLLRDHUP, .revents = 0};
      if (poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP)) != 0) {
        PeerHungUp(conn, "");
      } else {
        Malformed(conn, "an empty packet");
      }
      return false;
    }
    if ((msg.msg_flags & MSG_TRUNC) != 0) {
      Malformed(conn, "a packet larger than " + std::to_string(UnixChannel::kMaxPacketBytes) +
                          " bytes (truncated)");
      return false;
    }
    if ((msg.msg_flags & MSG_CTRUNC) != 0) {
      Malformed(conn,
                "more than " + std::to_string(UnixChannel::kMaxFds) + " descriptors (truncated)");
      return false;
    }
    const size_t size = static_cast<size_t>(got);
    if (size < UnixChannel::kPacketHeaderBytes) {
      Malformed(conn, "a packet of " + std::to_string(size) + " bytes, shorter than its header");
      return false;
    }
    const uint32_t total = GetLe32(recv_buffer_.data());
    const uint32_t offset = GetLe32(recv_buffer_.data() + 4);
    const size_t payload = size - UnixChannel::kPacketHeaderBytes;
    const std::byte* data = recv_buffer_.data() + UnixChannel::kPacketHeaderBytes;
    if (!conn->in_progress) {
      if (offset != 0) {
        Malformed(conn, "a fragment at offset " + std::to_string(offset) + " starts a message");
        return false;
      }
      if (total > UnixChannel::kMaxMessageBytes) {
        Malformed(conn, "a message of " + std::to_string(total) + " bytes, more than " +
                            std::to_string(UnixChannel::kMaxMessageBytes));
        return false;
      }
      if (payload > total || (payload == 0 && total > 0)) {
        Malformed(conn, "a first fragment of " + std::to_string(payload) +
                            " bytes in a message of " + std::to_string(total));
        return false;
      }
      conn->in_progress = true;
      conn->in_total = total;
      conn->in_bytes.clear();
      conn->in_bytes.reserve(total);
      conn->in_fds = std::move(fds);
    } else {
      if (total != conn->in_total || offset != conn->in_bytes.size() || payload == 0 ||
          payload > total - offset) {
        Malformed(conn, "a fragment of " + std::to_string(payload) + " bytes at offset " +
                            std::to_string(offset) + " of " + std::to_string(total) +
                            " where offset " + std::to_string(conn->in_bytes.size()) + " of " +
                            std::to_string(conn->in_total) + " was due");
        return false;
      }
      if (!fds.empty()) {
        Malformed(conn, "descriptors on a fragment after the first");
        return false;
      }
    }
    conn->in_bytes.insert(conn->in_bytes.end(), data, data + payload);
    if (conn->in_bytes.size() == conn->in_total) {
      conn->in_progress = false;
      events_.push_back(Event{.kind = Event::Kind::kMessage,
                              .conn = conn,
                              .bytes = std::exchange(conn->in_bytes, {}),
                              .fds = std::exchange(conn->in_fds, {})});
    }
  }
  return true;
}

void ChannelCore::Malformed(const std::shared_ptr<Conn>& conn, const std::string& what) {
  CloseNow(conn, DataLossError("malformed message from peer " + std::to_string(conn->info.pid) +
                               ": " + what));
}

void ChannelCore::PeerHungUp(const std::shared_ptr<Conn>& conn, const std::string& detail) {
  const std::string closed =
      "peer " + std::to_string(conn->info.pid) + " closed the connection" + detail;
  if (!conn->pidfd.valid() || options_.exit_grace.count() == 0) {
    CloseNow(conn, UnavailableError(closed));
    return;
  }
  if (PidfdReadable(conn->pidfd.get())) {
    CloseExited(conn);
    return;
  }
  // The process may be on its way out (it closes its sockets just before the
  // kernel marks it exited): wait for the pidfd, up to exit_grace.
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (conn->state != ConnState::kOpen) return;
    Transition(*conn, ConnState::kHungUp);
    DropQueueLocked(*conn);
    conn->hangup_deadline = Clock::now() + options_.exit_grace;
  }
  epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, conn->socket.get(), nullptr);
  hung_up_.push_back(conn);
}

void ChannelCore::ProcessExited(const std::shared_ptr<Conn>& conn) {
  // What it sent before it died is delivered first (EOF, or a malformed
  // packet, may end the connection on the way; if not, its socket lives on
  // in another process).
  ReadSocket(conn, kPacketsAtExit);
  CloseExited(conn);
}

void ChannelCore::CloseExited(const std::shared_ptr<Conn>& conn) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (conn->state != ConnState::kOpen && conn->state != ConnState::kHungUp) return;
    conn->process_exited = true;
  }
  CloseNow(conn, UnavailableError("peer process " + std::to_string(conn->info.pid) + " exited"));
}

void ChannelCore::CloseNow(const std::shared_ptr<Conn>& conn, Status reason) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (conn->state == ConnState::kClosed) return;
    if (conn->state == ConnState::kOpen || conn->state == ConnState::kHungUp) {
      DropQueueLocked(*conn);
      Transition(*conn, ConnState::kClosing);
      conn->reason = std::move(reason);
    }
  }
  FinishClose(conn);
}

void ChannelCore::FinishClose(const std::shared_ptr<Conn>& conn) {
  Status reason;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (conn->state != ConnState::kClosing) return;
    Transition(*conn, ConnState::kClosed);
    conns_.erase(conn->id);
    closed_[conn->id] = ClosedPeer{conn->info, conn->process_exited};
    conn->queue.clear();
    conn->queued_bytes = 0;
    reason = conn->reason;
  }
  // No other thread can reach the descriptors now.
  epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, conn->socket.get(), nullptr);
  if (conn->pidfd.valid()) epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, conn->pidfd.get(), nullptr);
  conn->socket.Reset();
  conn->pidfd.Reset();
  conn->in_progress = false;
  conn->in_bytes = {};
  conn->in_fds.clear();
  events_.push_back(Event{.kind = Event::Kind::kClosed, .conn = conn, .reason = std::move(reason)});
}

void ChannelCore::HandlePendingCloses() {
  std::vector<ChannelPeerId> ids;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ids.swap(pending_closes_);
  }
  for (ChannelPeerId id : ids) {
    if (std::shared_ptr<Conn> conn = Find(id)) FinishClose(conn);
  }
}

void ChannelCore::HandleHangUps() {
  if (hung_up_.empty()) return;
  const Clock::time_point now = Clock::now();
  std::vector<std::shared_ptr<Conn>> still;
  for (std::shared_ptr<Conn>& conn : hung_up_) {
    bool due;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (conn->state != ConnState::kHungUp) continue;
      due = now >= conn->hangup_deadline;
    }
    if (!due) {
      still.push_back(std::move(conn));
    } else if (PidfdReadable(conn->pidfd.get())) {
      CloseExited(conn);
    } else {
      CloseNow(conn, UnavailableError("peer " + std::to_string(conn->info.pid) +
                                      " closed the connection (its process is still running)"));
    }
  }
  hung_up_.swap(still);
}

void ChannelCore::CloseAllForShutdown() {
  std::vector<std::shared_ptr<Conn>> conns;
  {
    std::lock_guard<std::mutex> lock(mu_);
    conns.reserve(conns_.size());
    for (const auto& [id, conn] : conns_) conns.push_back(conn);
  }
  // In id order, so that on_closed runs in a predictable order.
  std::sort(conns.begin(), conns.end(), [](const auto& a, const auto& b) { return a->id < b->id; });
  for (const std::shared_ptr<Conn>& conn : conns) {
    CloseNow(conn, AbortedError("channel " + address_ + " shut down"));
  }
  hung_up_.clear();
}

void ChannelCore::Deliver() {
  // Callbacks may Close or Send, which touch mu_ but never events_; events
  // they cause are delivered on the next turn.
  std::vector<Event> events;
  events.swap(events_);
  for (Event& event : events) {
    switch (event.kind) {
      case Event::Kind::kAccepted:
        if (callbacks_.on_accepted) callbacks_.on_accepted(event.conn->id, event.conn->info);
        break;
      case Event::Kind::kMessage: {
        {
          std::lock_guard<std::mutex> lock(mu_);
          if (event.conn->user_closed) break;
        }
        callbacks_.on_message(event.conn->id, std::move(event.bytes), std::move(event.fds));
        break;
      }
      case Event::Kind::kClosed:
        callbacks_.on_closed(event.conn->id, event.reason);
        break;
    }
  }
}

}  // namespace unix_internal

// --- UnixChannel ---

using unix_internal::ChannelCore;

Result<std::unique_ptr<UnixChannel>> UnixChannel::Create(UnixChannelOptions options) {
  KVB_ASSIGN_OR_RETURN(std::unique_ptr<ChannelCore> core, ChannelCore::Create(std::move(options)));
  return std::unique_ptr<UnixChannel>(new UnixChannel(std::move(core)));
}

UnixChannel::UnixChannel(std::unique_ptr<ChannelCore> core) : core_(std::move(core)) {}

UnixChannel::~UnixChannel() {
  if (core_->OnIoThread()) {
    Log(LogLevel::kError,
        core_->address() + " destroyed on its own I/O thread, from a callback; aborting");
    std::abort();
  }
  core_->Shutdown().IgnoreError();
}

const std::string& UnixChannel::Address() const { return core_->address(); }

Status UnixChannel::Start(UnixChannelCallbacks callbacks) {
  return core_->Start(std::move(callbacks));
}

Result<ChannelPeerId> UnixChannel::Connect(std::string_view address,
                                           std::chrono::milliseconds timeout) {
  return core_->Connect(address, timeout);
}

Status UnixChannel::Send(ChannelPeerId peer, std::span<const std::byte> bytes,
                         std::span<const int> fds) {
  return core_->Send(peer, bytes, fds);
}

void UnixChannel::Close(ChannelPeerId peer, const Status& reason) { core_->Close(peer, reason); }

Status UnixChannel::Shutdown() { return core_->Shutdown(); }

Result<PeerInfo> UnixChannel::Peer(ChannelPeerId peer) const { return core_->Peer(peer); }

bool UnixChannel::PeerProcessExited(ChannelPeerId peer) const {
  return core_->PeerProcessExited(peer);
}

}  // namespace kvbounce
