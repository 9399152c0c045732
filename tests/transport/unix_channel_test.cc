// The Unix channel: messages and descriptors between channels of one process
// and of forked processes, the peer-process watch (pidfd), malformed input
// from a raw socket, backpressure, Close and Shutdown.
//
// Peer processes are forked children. Each test forks while the test process
// has one thread (the parent's channel is created, so its address is known,
// but not started: Create starts no thread), so the child may build its own
// UnixChannel and threads, also under the sanitizers. A child never returns
// into GoogleTest: it ends with _exit, and reports failure by exit code.
// Children that only need a raw socket use plain system calls.
#include "transport/unix/unix_channel.h"

#include <dirent.h>
#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "common/status_matchers.h"
#include "common/unique_fd.h"
#include "kvbounce/status.h"

namespace kvbounce {
namespace {

using namespace std::chrono_literals;
using ::kvbounce::testing_util::IsOk;
using ::kvbounce::testing_util::StatusIs;
using ::testing::HasSubstr;

// Generous: only a broken channel ever waits this long.
constexpr auto kWaitTimeout = 60s;
constexpr auto kConnectTimeout = 10s;
// The exit grace of channels whose peers exit: an upper bound only (the
// wait ends when the pidfd fires), so a slow machine cannot change a reason.
constexpr auto kLongGrace = std::chrono::milliseconds(20s);

std::vector<std::byte> Bytes(std::string_view text) {
  std::vector<std::byte> out(text.size());
  std::memcpy(out.data(), text.data(), text.size());
  return out;
}

std::string Text(std::span<const std::byte> bytes) {
  return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

// Deterministic contents for message `seed` of `size` bytes.
std::vector<std::byte> Pattern(size_t size, uint32_t seed) {
  std::vector<std::byte> out(size);
  uint32_t x = seed * 2654435761u + 1;
  for (size_t i = 0; i < size; ++i) {
    x = x * 1664525u + 1013904223u;
    out[i] = static_cast<std::byte>(x >> 24);
  }
  return out;
}

std::vector<std::byte> Indexed(size_t size, uint32_t index) {
  std::vector<std::byte> out = Pattern(size, index);
  for (int i = 0; i < 4 && static_cast<size_t>(i) < size; ++i) {
    out[i] = static_cast<std::byte>(index >> (8 * i));
  }
  return out;
}

uint32_t IndexOf(const std::vector<std::byte>& bytes) {
  uint32_t index = 0;
  for (int i = 0; i < 4; ++i) index |= static_cast<uint32_t>(bytes[i]) << (8 * i);
  return index;
}

bool FdOpen(int fd) { return fcntl(fd, F_GETFD) != -1; }

int CountOpenFds() {
  int count = 0;
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  while (dirent* entry = readdir(dir)) {
    if (entry->d_name[0] != '.') ++count;
  }
  closedir(dir);
  return count;
}

// Opens at most when released, or after kWaitTimeout (so that a failing test
// never hangs).
class Gate {
 public:
  void Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    entered_ = true;
    cv_.notify_all();
    cv_.wait_for(lock, kWaitTimeout, [this] { return open_; });
  }
  bool WaitEntered() {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, kWaitTimeout, [this] { return entered_; });
  }
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool entered_ = false;
  bool open_ = false;
};

struct Received {
  ChannelPeerId peer = 0;
  std::vector<std::byte> bytes;
  std::vector<UniqueFd> fds;
};

// A channel and a record of every callback. The callbacks check that they
// run on one thread, never on the test's thread (inside a call), and never
// after Shutdown returned.
class Endpoint {
 public:
  // Runs inside on_message, before the message is recorded.
  using MessageHook = std::function<void(ChannelPeerId, const std::vector<std::byte>&)>;

  explicit Endpoint(UnixChannelOptions options = {}) {
    Result<std::unique_ptr<UnixChannel>> channel = UnixChannel::Create(std::move(options));
    EXPECT_THAT(channel, IsOk());
    if (channel.ok()) channel_ = *std::move(channel);
  }
  ~Endpoint() {
    if (channel_) Shutdown().IgnoreError();
  }

  bool ok() const { return channel_ != nullptr; }
  UnixChannel& channel() { return *channel_; }
  const std::string& address() const { return channel_->Address(); }
  void set_message_hook(MessageHook hook) { hook_ = std::move(hook); }

  Status Start() {
    UnixChannelCallbacks callbacks;
    callbacks.on_message = [this](ChannelPeerId peer, std::vector<std::byte> bytes,
                                  std::vector<UniqueFd> fds) {
      Check();
      if (hook_) hook_(peer, bytes);
      std::lock_guard<std::mutex> lock(mu_);
      if (closed_.count(peer) != 0) ++violations_;  // a message after on_closed
      messages_.push_back(Received{peer, std::move(bytes), std::move(fds)});
      cv_.notify_all();
    };
    callbacks.on_closed = [this](ChannelPeerId peer, const Status& reason) {
      Check();
      std::lock_guard<std::mutex> lock(mu_);
      closed_[peer].push_back(reason);
      cv_.notify_all();
    };
    callbacks.on_accepted = [this](ChannelPeerId peer, const PeerInfo& info) {
      Check();
      std::lock_guard<std::mutex> lock(mu_);
      if (closed_.count(peer) != 0) ++violations_;
      accepted_.push_back({peer, info});
      cv_.notify_all();
    };
    return channel_->Start(std::move(callbacks));
  }

  Status Shutdown() {
    Status status = channel_->Shutdown();
    shut_down_.store(true);
    return status;
  }

  // The i-th accepted peer, once there.
  std::optional<ChannelPeerId> WaitAccepted(size_t i = 0) {
    std::unique_lock<std::mutex> lock(mu_);
    if (!cv_.wait_for(lock, kWaitTimeout, [&] { return accepted_.size() > i; })) return {};
    return accepted_[i].first;
  }
  PeerInfo accepted_info(size_t i) {
    std::lock_guard<std::mutex> lock(mu_);
    return accepted_.at(i).second;
  }
  bool WaitMessages(size_t n) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, kWaitTimeout, [&] { return messages_.size() >= n; });
  }
  std::vector<Received> TakeMessages() {
    std::lock_guard<std::mutex> lock(mu_);
    return std::exchange(messages_, {});
  }
  size_t num_messages() {
    std::lock_guard<std::mutex> lock(mu_);
    return messages_.size();
  }
  // The reason of the peer's on_closed, once it ran.
  std::optional<Status> WaitClosed(ChannelPeerId peer) {
    std::unique_lock<std::mutex> lock(mu_);
    if (!cv_.wait_for(lock, kWaitTimeout, [&] { return closed_.count(peer) != 0; })) return {};
    return closed_[peer].front();
  }
  std::map<ChannelPeerId, std::vector<Status>> closed() {
    std::lock_guard<std::mutex> lock(mu_);
    return closed_;
  }
  int violations() {
    std::lock_guard<std::mutex> lock(mu_);
    return violations_;
  }

 private:
  void Check() {
    std::lock_guard<std::mutex> lock(mu_);
    if (std::this_thread::get_id() == test_thread_ || shut_down_.load()) ++violations_;
    threads_.insert(std::this_thread::get_id());
    if (threads_.size() > 1) ++violations_;
  }

  std::unique_ptr<UnixChannel> channel_;
  MessageHook hook_;
  const std::thread::id test_thread_ = std::this_thread::get_id();
  std::atomic<bool> shut_down_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::pair<ChannelPeerId, PeerInfo>> accepted_;
  std::vector<Received> messages_;
  std::map<ChannelPeerId, std::vector<Status>> closed_;
  std::set<std::thread::id> threads_;
  int violations_ = 0;
};

// Waits for `peer`'s connection to end and checks that `endpoint` was told
// the peer's process `pid` exited.
void ExpectPeerProcessExited(Endpoint& endpoint, ChannelPeerId peer, pid_t pid) {
  std::optional<Status> reason = endpoint.WaitClosed(peer);
  ASSERT_TRUE(reason.has_value());
  EXPECT_THAT(*reason, StatusIs(StatusCode::kUnavailable,
                                HasSubstr("peer process " + std::to_string(pid) + " exited")));
}

// Two started endpoints, `a` connected to `b`.
struct Pair {
  explicit Pair(UnixChannelOptions a_options = {}, UnixChannelOptions b_options = {})
      : a(std::move(a_options)), b(std::move(b_options)) {}
  void Connect() {
    ASSERT_TRUE(a.ok() && b.ok());
    ASSERT_THAT(b.Start(), IsOk());
    ASSERT_THAT(a.Start(), IsOk());
    Result<ChannelPeerId> id = a.channel().Connect(b.address(), kConnectTimeout);
    ASSERT_THAT(id, IsOk());
    a_to_b = *id;
    std::optional<ChannelPeerId> accepted = b.WaitAccepted();
    ASSERT_TRUE(accepted.has_value());
    b_to_a = *accepted;
  }
  Endpoint a;
  Endpoint b;
  ChannelPeerId a_to_b = 0;
  ChannelPeerId b_to_a = 0;
};

// A forked child that runs `body` and _exits with its result. Killed and
// reaped at destruction unless Wait reaped it.
class ChildProcess {
 public:
  explicit ChildProcess(const std::function<int()>& body) {
    pid_ = fork();
    if (pid_ == 0) _exit(body());
  }
  ~ChildProcess() {
    if (pid_ > 0 && !reaped_) {
      kill(pid_, SIGKILL);
      Wait();
    }
  }
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  pid_t pid() const { return pid_; }
  // The wait status.
  int Wait() {
    int status = 0;
    while (waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
    reaped_ = true;
    return status;
  }

 private:
  pid_t pid_ = -1;
  bool reaped_ = false;
};

// In a child: a channel that connects to `address`, sends "hello" with a
// memfd holding `text`, and waits for one message back (the parent's ack).
// Returns the channel and its peer, or nothing.
struct ChildChannel {
  std::unique_ptr<UnixChannel> channel;
  ChannelPeerId peer = 0;
  std::mutex mu;
  std::condition_variable cv;
  bool acked = false;

  int ConnectAndSend(const std::string& address, std::string_view text) {
    Result<std::unique_ptr<UnixChannel>> created = UnixChannel::Create();
    if (!created.ok()) return 10;
    channel = *std::move(created);
    UnixChannelCallbacks callbacks;
    callbacks.on_message = [this](ChannelPeerId, std::vector<std::byte>, std::vector<UniqueFd>) {
      std::lock_guard<std::mutex> lock(mu);
      acked = true;
      cv.notify_all();
    };
    callbacks.on_closed = [](ChannelPeerId, const Status&) {};
    if (!channel->Start(std::move(callbacks)).ok()) return 11;
    Result<ChannelPeerId> id = channel->Connect(address, kConnectTimeout);
    if (!id.ok()) return 12;
    peer = *id;
    UniqueFd memfd(memfd_create("kvbounce-child", MFD_CLOEXEC));
    if (!memfd.valid()) return 13;
    if (write(memfd.get(), text.data(), text.size()) != static_cast<ssize_t>(text.size())) {
      return 14;
    }
    const int fds[] = {memfd.get()};
    if (!channel->Send(peer, Bytes("hello"), fds).ok()) return 15;
    return 0;
  }
  bool WaitAck() {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, kWaitTimeout, [this] { return acked; });
  }
};

// --- Raw sockets speaking the documented wire format ---

UniqueFd RawConnect(std::string_view address) {
  EXPECT_TRUE(address.starts_with("unix:@"));
  const std::string_view name = address.substr(6);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path + 1, name.data(), name.size());
  const auto len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
  UniqueFd fd(socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  EXPECT_TRUE(fd.valid());
  EXPECT_EQ(connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), len), 0) << errno;
  return fd;
}

// One packet: the 8-byte header (total, offset, little-endian) and payload.
std::vector<std::byte> Packet(uint32_t total, uint32_t offset, size_t payload) {
  std::vector<std::byte> out(8 + payload, std::byte{0x5a});
  for (int i = 0; i < 4; ++i) {
    out[i] = static_cast<std::byte>(total >> (8 * i));
    out[4 + i] = static_cast<std::byte>(offset >> (8 * i));
  }
  return out;
}

bool RawSend(int socket_fd, std::span<const std::byte> packet, std::span<const int> fds = {}) {
  iovec iov{const_cast<std::byte*>(packet.data()), packet.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<char> control;
  if (!fds.empty()) {
    control.resize(CMSG_SPACE(sizeof(int) * fds.size()));
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(cmsg), fds.data(), sizeof(int) * fds.size());
  }
  return sendmsg(socket_fd, &msg, MSG_NOSIGNAL) == static_cast<ssize_t>(packet.size());
}

// --- Two channels of one process ---

TEST(UnixChannelTest, MessagesBothWaysInOrderWithPeerCredentials) {
  Pair p;
  ASSERT_NO_FATAL_FAILURE(p.Connect());
  EXPECT_THAT(p.a.address(), ::testing::StartsWith("unix:@kvbounce-"));
  EXPECT_NE(p.a.address(), p.b.address());

  const PeerInfo accepted = p.b.accepted_info(0);
  EXPECT_EQ(accepted.pid, getpid());
  EXPECT_EQ(accepted.uid, getuid());
  EXPECT_EQ(accepted.gid, getgid());
  EXPECT_FALSE(accepted.process_exit_watched);  // this very process
  Result<PeerInfo> a_view = p.a.channel().Peer(p.a_to_b);
  ASSERT_THAT(a_view, IsOk());
  EXPECT_EQ(a_view->pid, getpid());
  EXPECT_EQ(a_view->uid, getuid());
  Result<PeerInfo> b_view = p.b.channel().Peer(p.b_to_a);
  ASSERT_THAT(b_view, IsOk());
  EXPECT_EQ(b_view->pid, getpid());

  // Mixed sizes around the packet boundary, up to the largest message.
  constexpr size_t kPayload = UnixChannel::kMaxPacketBytes - UnixChannel::kPacketHeaderBytes;
  const std::vector<size_t> cycle = {
      0, 1, 7, 100, kPayload - 1, kPayload, kPayload + 1, 2 * kPayload, 3 * kPayload + 5, 1000};
  std::vector<size_t> sizes;
  for (int round = 0; round < 12; ++round) sizes.insert(sizes.end(), cycle.begin(), cycle.end());
  sizes.push_back(MiB(1) + 3);
  sizes.push_back(UnixChannel::kMaxMessageBytes);
  sizes.push_back(4);

  std::thread b_sender([&] {
    for (size_t i = 0; i < sizes.size(); ++i) {
      EXPECT_THAT(p.b.channel().Send(p.b_to_a, Pattern(sizes[i], 1000 + i)), IsOk());
    }
  });
  for (size_t i = 0; i < sizes.size(); ++i) {
    ASSERT_THAT(p.a.channel().Send(p.a_to_b, Pattern(sizes[i], i)), IsOk());
  }
  b_sender.join();

  ASSERT_TRUE(p.b.WaitMessages(sizes.size()));
  ASSERT_TRUE(p.a.WaitMessages(sizes.size()));
  std::vector<Received> at_b = p.b.TakeMessages();
  std::vector<Received> at_a = p.a.TakeMessages();
  ASSERT_EQ(at_b.size(), sizes.size());
  ASSERT_EQ(at_a.size(), sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) {
    EXPECT_EQ(at_b[i].peer, p.b_to_a);
    EXPECT_TRUE(at_b[i].fds.empty());
    ASSERT_EQ(at_b[i].bytes.size(), sizes[i]) << "message " << i;
    EXPECT_TRUE(at_b[i].bytes == Pattern(sizes[i], i)) << "message " << i;
    EXPECT_EQ(at_a[i].peer, p.a_to_b);
    ASSERT_EQ(at_a[i].bytes.size(), sizes[i]) << "message " << i;
    EXPECT_TRUE(at_a[i].bytes == Pattern(sizes[i], 1000 + i)) << "message " << i;
  }
  EXPECT_FALSE(p.a.channel().PeerProcessExited(p.a_to_b));
  EXPECT_EQ(p.a.violations(), 0);
  EXPECT_EQ(p.b.violations(), 0);
}

// I/O threads that poll before they sleep (poll_before_sleep): messages go
// back and forth one at a time (each side's thread finds the next while it
// polls, or after it slept, at random gaps around the poll's end), in
// order, and the channels shut down as usual.
TEST(UnixChannelTest, PollingIoThreadsCarryAPingPong) {
  UnixChannelOptions options;
  options.poll_before_sleep = std::chrono::microseconds(200);
  Pair p(options, options);
  ASSERT_NO_FATAL_FAILURE(p.Connect());
  std::mt19937 random(5);
  std::uniform_int_distribution<int> gap_us(0, 400);
  for (size_t i = 0; i < 200; ++i) {
    std::this_thread::sleep_for(std::chrono::microseconds(gap_us(random)));
    ASSERT_THAT(p.a.channel().Send(p.a_to_b, Pattern(64, i)), IsOk());
    ASSERT_TRUE(p.b.WaitMessages(i + 1)) << "ping " << i;
    ASSERT_THAT(p.b.channel().Send(p.b_to_a, Pattern(64, 1000 + i)), IsOk());
    ASSERT_TRUE(p.a.WaitMessages(i + 1)) << "pong " << i;
  }
  std::vector<Received> at_b = p.b.TakeMessages();
  std::vector<Received> at_a = p.a.TakeMessages();
  ASSERT_EQ(at_b.size(), 200u);
  ASSERT_EQ(at_a.size(), 200u);
  for (size_t i = 0; i < 200; ++i) {
    EXPECT_TRUE(at_b[i].bytes == Pattern(64, i)) << "ping " << i;
    EXPECT_TRUE(at_a[i].bytes == Pattern(64, 1000 + i)) << "pong " << i;
  }
  EXPECT_EQ(p.a.violations(), 0);
  EXPECT_EQ(p.b.violations(), 0);
}

TEST(UnixChannelTest, PassesDescriptorsThatTheReceiverOwns) {
  Pair p;
  ASSERT_NO_FATAL_FAILURE(p.Connect());

  constexpr std::string_view kContents = "KV blocks live here";
  UniqueFd memfd(memfd_create("kvbounce-test", MFD_CLOEXEC));
  ASSERT_TRUE(memfd.valid());
  ASSERT_EQ(write(memfd.get(), kContents.data(), kContents.size()),
            static_cast<ssize_t>(kContents.size()));
  int pipe_fds[2];
  ASSERT_EQ(pipe2(pipe_fds, O_CLOEXEC), 0);
  UniqueFd read_end(pipe_fds[0]);
  UniqueFd write_end(pipe_fds[1]);

  const int sent[] = {memfd.get(), write_end.get()};
  ASSERT_THAT(p.a.channel().Send(p.a_to_b, Bytes("two fds"), sent), IsOk());
  ASSERT_TRUE(p.b.WaitMessages(1));
  std::vector<Received> got = p.b.TakeMessages();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(Text(got[0].bytes), "two fds");
  ASSERT_EQ(got[0].fds.size(), 2u);
  const int r0 = got[0].fds[0].get();
  const int r1 = got[0].fds[1].get();
  EXPECT_NE(r0, r1);
  for (int fd : {r0, r1}) {
    EXPECT_NE(fd, memfd.get());
    EXPECT_NE(fd, write_end.get());
    EXPECT_NE(fd, read_end.get());
    EXPECT_EQ(fcntl(fd, F_GETFD) & FD_CLOEXEC, FD_CLOEXEC) << "received fds are close-on-exec";
  }
  // The receiver reads the memfd through its own descriptor and writes into
  // the pipe.
  std::string contents(kContents.size(), '\0');
  ASSERT_EQ(pread(r0, contents.data(), contents.size(), 0), static_cast<ssize_t>(contents.size()));
  EXPECT_EQ(contents, kContents);
  ASSERT_EQ(write(r1, "pong", 4), 4);
  char pong[4];
  ASSERT_EQ(read(read_end.get(), pong, sizeof(pong)), 4);
  EXPECT_EQ(std::string_view(pong, 4), "pong");

  // Dropping the message closes the received descriptors; the sender's stay.
  got.clear();
  errno = 0;
  EXPECT_FALSE(FdOpen(r0));
  EXPECT_EQ(errno, EBADF);
  EXPECT_FALSE(FdOpen(r1));
  EXPECT_TRUE(FdOpen(memfd.get()));
  EXPECT_TRUE(FdOpen(write_end.get()));

  // kMaxFds descriptors in one message.
  std::vector<int> many(UnixChannel::kMaxFds, memfd.get());
  ASSERT_THAT(p.a.channel().Send(p.a_to_b, Bytes("many"), many), IsOk());
  ASSERT_TRUE(p.b.WaitMessages(1));
  got = p.b.TakeMessages();
  ASSERT_EQ(got.size(), 1u);
  ASSERT_EQ(got[0].fds.size(), UnixChannel::kMaxFds);
  std::set<int> distinct;
  for (const UniqueFd& fd : got[0].fds) {
    distinct.insert(fd.get());
    char c;
    EXPECT_EQ(pread(fd.get(), &c, 1, 0), 1);
    EXPECT_EQ(c, 'K');
  }
  EXPECT_EQ(distinct.size(), UnixChannel::kMaxFds);
  EXPECT_EQ(p.b.violations(), 0);
}

// --- Peers in other processes ---

TEST(UnixChannelProcessTest, MessageAndFdFromAChildThenItsExit) {
  UnixChannelOptions options;
  options.exit_grace = kLongGrace;
  Endpoint parent(options);
  ASSERT_TRUE(parent.ok());
  const std::string address = parent.address();
  constexpr std::string_view kText = "written by the child";
  // Forked before the parent starts its thread.
  ChildProcess child([&] {
    ChildChannel c;
    if (const int rc = c.ConnectAndSend(address, kText); rc != 0) return rc;
    if (!c.WaitAck()) return 16;
    _exit(0);  // the process ends with its connection open
  });
  ASSERT_GT(child.pid(), 0);
  ASSERT_THAT(parent.Start(), IsOk());

  std::optional<ChannelPeerId> peer = parent.WaitAccepted();
  ASSERT_TRUE(peer.has_value());
  const PeerInfo info = parent.accepted_info(0);
  EXPECT_EQ(info.pid, child.pid());
  EXPECT_EQ(info.uid, getuid());
  EXPECT_TRUE(info.process_exit_watched) << "this kernel has pidfds (5.3 on)";

  ASSERT_TRUE(parent.WaitMessages(1));
  std::vector<Received> got = parent.TakeMessages();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(Text(got[0].bytes), "hello");
  ASSERT_EQ(got[0].fds.size(), 1u);
  std::string contents(kText.size(), '\0');
  ASSERT_EQ(pread(got[0].fds[0].get(), contents.data(), contents.size(), 0),
            static_cast<ssize_t>(kText.size()));
  EXPECT_EQ(contents, kText);
  EXPECT_FALSE(parent.channel().PeerProcessExited(*peer));

  ASSERT_THAT(parent.channel().Send(*peer, Bytes("ack")), IsOk());
  ExpectPeerProcessExited(parent, *peer, child.pid());
  if (HasFatalFailure()) return;
  EXPECT_TRUE(parent.channel().PeerProcessExited(*peer));
  EXPECT_THAT(parent.channel().Send(*peer, Bytes("late")), StatusIs(StatusCode::kUnavailable));
  Result<PeerInfo> after = parent.channel().Peer(*peer);
  ASSERT_THAT(after, IsOk());
  EXPECT_EQ(after->pid, child.pid());

  const int status = child.Wait();
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_EQ(parent.violations(), 0);
}

TEST(UnixChannelProcessTest, KilledChildIsReportedAsExited) {
  UnixChannelOptions options;
  options.exit_grace = kLongGrace;
  Endpoint parent(options);
  ASSERT_TRUE(parent.ok());
  const std::string address = parent.address();
  ChildProcess child([&] {
    ChildChannel c;
    if (const int rc = c.ConnectAndSend(address, "doomed"); rc != 0) return rc;
    while (true) pause();  // until SIGKILL
  });
  ASSERT_GT(child.pid(), 0);
  ASSERT_THAT(parent.Start(), IsOk());
  std::optional<ChannelPeerId> peer = parent.WaitAccepted();
  ASSERT_TRUE(peer.has_value());
  ASSERT_TRUE(parent.WaitMessages(1));

  ASSERT_EQ(kill(child.pid(), SIGKILL), 0);
  ExpectPeerProcessExited(parent, *peer, child.pid());
  if (HasFatalFailure()) return;
  EXPECT_TRUE(parent.channel().PeerProcessExited(*peer));
  const int status = child.Wait();
  ASSERT_TRUE(WIFSIGNALED(status));
  EXPECT_EQ(WTERMSIG(status), SIGKILL);
  EXPECT_EQ(parent.violations(), 0);
}

TEST(UnixChannelProcessTest, ExitWhileAnotherProcessHoldsTheSocketIsSeenByPidfd) {
  // The child connects with a raw socket, forks a grandchild that inherits
  // it, and exits: the socket stays open (no EOF), only the pidfd tells.
  UnixChannelOptions options;
  options.exit_grace = kLongGrace;
  Endpoint parent(options);
  ASSERT_TRUE(parent.ok());
  const std::string address = parent.address();
  int release[2];
  ASSERT_EQ(pipe2(release, O_CLOEXEC), 0);
  UniqueFd release_read(release[0]);
  UniqueFd release_write(release[1]);
  ChildProcess child([&] {
    // Raw system calls only from here on.
    close(release_write.get());
    const std::string_view name = std::string_view(address).substr(6);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path + 1, name.data(), name.size());
    const int fd = socket(AF_UNIX, SOCK_SEQPACKET, 0);
    if (fd < 0) return 20;
    if (connect(fd, reinterpret_cast<const sockaddr*>(&addr),
                static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size())) != 0) {
      return 21;
    }
    // Wait until the parent accepted (it then sends one message), so that
    // it watches this process, not a pid that is gone.
    char buffer[64];
    if (recv(fd, buffer, sizeof(buffer), 0) <= 0) return 22;
    const pid_t grandchild = fork();
    if (grandchild < 0) return 23;
    if (grandchild == 0) {
      // Holds the socket until the parent closes the release pipe.
      char c;
      while (read(release_read.get(), &c, 1) < 0 && errno == EINTR) {
      }
      _exit(0);
    }
    return 0;
  });
  ASSERT_GT(child.pid(), 0);
  release_read.Reset();
  ASSERT_THAT(parent.Start(), IsOk());
  std::optional<ChannelPeerId> peer = parent.WaitAccepted();
  ASSERT_TRUE(peer.has_value());
  EXPECT_EQ(parent.accepted_info(0).pid, child.pid());
  ASSERT_THAT(parent.channel().Send(*peer, Bytes("accepted")), IsOk());

  ExpectPeerProcessExited(parent, *peer, child.pid());
  if (HasFatalFailure()) return;
  const int status = child.Wait();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  release_write.Reset();  // the grandchild exits
  EXPECT_EQ(parent.violations(), 0);
}

TEST(UnixChannelProcessTest, LivePeerThatClosesIsNotReportedAsExited) {
  UnixChannelOptions options;
  options.exit_grace = 50ms;  // the wait before "closed", with the child alive
  Endpoint parent(options);
  ASSERT_TRUE(parent.ok());
  const std::string address = parent.address();
  int release[2];
  ASSERT_EQ(pipe2(release, O_CLOEXEC), 0);
  UniqueFd release_read(release[0]);
  UniqueFd release_write(release[1]);
  ChildProcess child([&] {
    release_write.Reset();
    ChildChannel c;
    if (const int rc = c.ConnectAndSend(address, "alive"); rc != 0) return rc;
    if (!c.WaitAck()) return 16;
    if (!c.channel->Shutdown().ok()) return 17;  // EOF, the process lives on
    char byte;
    while (read(release_read.get(), &byte, 1) < 0 && errno == EINTR) {
    }
    _exit(0);
  });
  ASSERT_GT(child.pid(), 0);
  release_read.Reset();
  ASSERT_THAT(parent.Start(), IsOk());
  std::optional<ChannelPeerId> peer = parent.WaitAccepted();
  ASSERT_TRUE(peer.has_value());
  ASSERT_TRUE(parent.WaitMessages(1));
  ASSERT_THAT(parent.channel().Send(*peer, Bytes("ack")), IsOk());

  std::optional<Status> reason = parent.WaitClosed(*peer);
  ASSERT_TRUE(reason.has_value());
  EXPECT_THAT(*reason, StatusIs(StatusCode::kUnavailable,
                                HasSubstr("peer " + std::to_string(child.pid()) +
                                          " closed the connection (its process is still "
                                          "running)")));
  EXPECT_FALSE(parent.channel().PeerProcessExited(*peer));
  release_write.Reset();
  const int status = child.Wait();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
}

TEST(UnixChannelProcessTest, WithoutTheWatchOnlyEndOfFileIsSeen) {
  UnixChannelOptions options;
  options.watch_peer_process = false;
  Endpoint parent(options);
  ASSERT_TRUE(parent.ok());
  const std::string address = parent.address();
  ChildProcess child([&] {
    ChildChannel c;
    if (const int rc = c.ConnectAndSend(address, "unwatched"); rc != 0) return rc;
    if (!c.WaitAck()) return 16;
    _exit(0);
  });
  ASSERT_GT(child.pid(), 0);
  ASSERT_THAT(parent.Start(), IsOk());
  std::optional<ChannelPeerId> peer = parent.WaitAccepted();
  ASSERT_TRUE(peer.has_value());
  EXPECT_FALSE(parent.accepted_info(0).process_exit_watched);
  ASSERT_TRUE(parent.WaitMessages(1));
  ASSERT_THAT(parent.channel().Send(*peer, Bytes("ack")), IsOk());
  std::optional<Status> reason = parent.WaitClosed(*peer);
  ASSERT_TRUE(reason.has_value());
  EXPECT_THAT(*reason,
              StatusIs(StatusCode::kUnavailable, HasSubstr("peer " + std::to_string(child.pid()) +
                                                           " closed the connection")));
  EXPECT_FALSE(parent.channel().PeerProcessExited(*peer));
  const int status = child.Wait();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
}

// --- Bad input ---

TEST(UnixChannelTest, RefusesBadCalls) {
  Pair p;
  ASSERT_NO_FATAL_FAILURE(p.Connect());
  UnixChannel& a = p.a.channel();

  EXPECT_THAT(a.Send(9999, Bytes("x")), StatusIs(StatusCode::kNotFound));
  EXPECT_THAT(a.Peer(9999), StatusIs(StatusCode::kNotFound));
  EXPECT_FALSE(a.PeerProcessExited(9999));
  a.Close(9999, Status::Ok());  // nothing to close

  const std::vector<std::byte> too_big(UnixChannel::kMaxMessageBytes + 1);
  EXPECT_THAT(a.Send(p.a_to_b, too_big),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("kMaxMessageBytes")));
  UniqueFd memfd(memfd_create("kvbounce-test", MFD_CLOEXEC));
  ASSERT_TRUE(memfd.valid());
  const std::vector<int> too_many(UnixChannel::kMaxFds + 1, memfd.get());
  EXPECT_THAT(a.Send(p.a_to_b, Bytes("x"), too_many),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("kMaxFds")));
  const int negative[] = {-1};
  EXPECT_THAT(a.Send(p.a_to_b, Bytes("x"), negative), StatusIs(StatusCode::kInvalidArgument));
  int closed_fd;
  {
    UniqueFd temp(memfd_create("kvbounce-closed", MFD_CLOEXEC));
    closed_fd = temp.get();
  }
  const int not_open[] = {closed_fd};
  EXPECT_THAT(a.Send(p.a_to_b, Bytes("x"), not_open),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("not open")));

  for (std::string_view address :
       {"", "tcp:127.0.0.1:5", "unix:", "unix:@", "unix:relative/path", "@name"}) {
    EXPECT_THAT(a.Connect(address, 1s), StatusIs(StatusCode::kInvalidArgument)) << address;
  }
  EXPECT_THAT(a.Connect("unix:@" + std::string(200, 'x'), 1s),
              StatusIs(StatusCode::kInvalidArgument));
  EXPECT_THAT(a.Connect(std::string("unix:@a\0b", 9), 1s), StatusIs(StatusCode::kInvalidArgument));

  // Nobody listens: refused at once, well within the timeout.
  const auto start = std::chrono::steady_clock::now();
  EXPECT_THAT(a.Connect("unix:@kvbounce-test-nobody-" + std::to_string(getpid()), 5s),
              StatusIs(StatusCode::kUnavailable));
  EXPECT_THAT(a.Connect("unix:/nonexistent-dir-kvbounce/socket", 5s),
              StatusIs(StatusCode::kUnavailable));
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);

  // Every refused call above left the connection as it was.
  ASSERT_THAT(a.Send(p.a_to_b, Bytes("still fine")), IsOk());
  ASSERT_TRUE(p.b.WaitMessages(1));

  // Close, then Send: unavailable; on_closed once, with "closed by this end".
  a.Close(p.a_to_b, Status::Ok());
  EXPECT_THAT(a.Send(p.a_to_b, Bytes("x")), StatusIs(StatusCode::kUnavailable));
  a.Close(p.a_to_b, CancelledError("again"));
  std::optional<Status> reason = p.a.WaitClosed(p.a_to_b);
  ASSERT_TRUE(reason.has_value());
  EXPECT_THAT(*reason, StatusIs(StatusCode::kCancelled, HasSubstr("closed by this end")));
  EXPECT_THAT(a.Send(p.a_to_b, Bytes("x")), StatusIs(StatusCode::kUnavailable));
  EXPECT_THAT(a.Peer(p.a_to_b), IsOk());
  // The peer sees EOF (same process: no pidfd, no grace).
  std::optional<Status> b_reason = p.b.WaitClosed(p.b_to_a);
  ASSERT_TRUE(b_reason.has_value());
  EXPECT_THAT(*b_reason, StatusIs(StatusCode::kUnavailable, HasSubstr("closed the connection")));

  ASSERT_THAT(p.a.Shutdown(), IsOk());
  ASSERT_THAT(p.b.Shutdown(), IsOk());
  EXPECT_EQ(p.a.closed().at(p.a_to_b).size(), 1u);
  EXPECT_EQ(p.b.closed().at(p.b_to_a).size(), 1u);
  EXPECT_EQ(p.a.violations(), 0);
  EXPECT_EQ(p.b.violations(), 0);
}

TEST(UnixChannelTest, LifecycleErrors) {
  UnixChannelOptions bad;
  bad.name = "relative";
  EXPECT_THAT(UnixChannel::Create(bad), StatusIs(StatusCode::kInvalidArgument));
  bad.name = "@";
  EXPECT_THAT(UnixChannel::Create(bad), StatusIs(StatusCode::kInvalidArgument));
  bad = {};
  bad.max_queued_messages = 0;
  EXPECT_THAT(UnixChannel::Create(bad), StatusIs(StatusCode::kInvalidArgument));
  bad = {};
  bad.max_queued_bytes = UnixChannel::kMaxMessageBytes - 1;
  EXPECT_THAT(UnixChannel::Create(bad), StatusIs(StatusCode::kInvalidArgument));

  Result<std::unique_ptr<UnixChannel>> first = UnixChannel::Create();
  ASSERT_THAT(first, IsOk());
  UnixChannel& channel = **first;
  UnixChannelOptions same;
  same.name = channel.Address().substr(UnixChannel::kAddressPrefix.size());
  EXPECT_THAT(UnixChannel::Create(same), StatusIs(StatusCode::kAlreadyExists));

  EXPECT_THAT(channel.Connect(channel.Address(), 1s), StatusIs(StatusCode::kFailedPrecondition));
  EXPECT_THAT(channel.Send(1, Bytes("x")), StatusIs(StatusCode::kFailedPrecondition));
  EXPECT_THAT(channel.Start({}), StatusIs(StatusCode::kInvalidArgument));
  UnixChannelCallbacks callbacks;
  callbacks.on_message = [](ChannelPeerId, std::vector<std::byte>, std::vector<UniqueFd>) {};
  callbacks.on_closed = [](ChannelPeerId, const Status&) {};
  ASSERT_THAT(channel.Start(callbacks), IsOk());
  EXPECT_THAT(channel.Start(callbacks), StatusIs(StatusCode::kFailedPrecondition));

  // Concurrent Shutdowns: both OK, once done.
  Status s1, s2;
  std::thread t1([&] { s1 = channel.Shutdown(); });
  std::thread t2([&] { s2 = channel.Shutdown(); });
  t1.join();
  t2.join();
  EXPECT_THAT(s1, IsOk());
  EXPECT_THAT(s2, IsOk());
  EXPECT_THAT(channel.Shutdown(), IsOk());
  EXPECT_THAT(channel.Start(callbacks), StatusIs(StatusCode::kAborted));
  EXPECT_THAT(channel.Connect("unix:@x", 1s), StatusIs(StatusCode::kAborted));
  EXPECT_THAT(channel.Send(1, Bytes("x")), StatusIs(StatusCode::kAborted));
  // The name is free again once the listener is closed.
  EXPECT_THAT(UnixChannel::Create(same), IsOk());
}

TEST(UnixChannelTest, SocketFileIsCreatedAndUnlinked) {
  UnixChannelOptions options;
  options.name = "/tmp/kvbounce-unix-channel-test-" + std::to_string(getpid()) + ".sock";
  unlink(options.name.c_str());
  Endpoint server(options);
  ASSERT_TRUE(server.ok());
  EXPECT_EQ(server.address(), "unix:" + options.name);
  struct stat st;
  ASSERT_EQ(stat(options.name.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_THAT(UnixChannel::Create(options), StatusIs(StatusCode::kAlreadyExists));
  ASSERT_EQ(stat(options.name.c_str(), &st), 0) << "a refused Create leaves the file alone";

  Endpoint client;
  ASSERT_TRUE(client.ok());
  ASSERT_THAT(server.Start(), IsOk());
  ASSERT_THAT(client.Start(), IsOk());
  Result<ChannelPeerId> peer = client.channel().Connect(server.address(), kConnectTimeout);
  ASSERT_THAT(peer, IsOk());
  ASSERT_THAT(client.channel().Send(*peer, Bytes("over a file")), IsOk());
  ASSERT_TRUE(server.WaitMessages(1));
  EXPECT_EQ(Text(server.TakeMessages()[0].bytes), "over a file");

  ASSERT_THAT(server.Shutdown(), IsOk());
  errno = 0;
  EXPECT_NE(stat(options.name.c_str(), &st), 0);
  EXPECT_EQ(errno, ENOENT);
  EXPECT_THAT(client.WaitClosed(*peer), ::testing::Optional(StatusIs(StatusCode::kUnavailable)));
}

TEST(UnixChannelTest, ConnectTimesOutWhenTheBacklogIsFull) {
  Endpoint a;
  ASSERT_TRUE(a.ok());
  ASSERT_THAT(a.Start(), IsOk());
  // A raw listener that never accepts, with no backlog to speak of.
  const std::string name = "kvbounce-test-backlog-" + std::to_string(getpid());
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path + 1, name.data(), name.size());
  UniqueFd listener(socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  ASSERT_TRUE(listener.valid());
  ASSERT_EQ(bind(listener.get(), reinterpret_cast<const sockaddr*>(&addr),
                 static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size())),
            0);
  ASSERT_EQ(listen(listener.get(), 0), 0);
  const std::string address = "unix:@" + name;
  ASSERT_THAT(a.channel().Connect(address, kConnectTimeout), IsOk());  // fills the backlog
  const auto start = std::chrono::steady_clock::now();
  EXPECT_THAT(a.channel().Connect(address, 200ms), StatusIs(StatusCode::kDeadlineExceeded));
  EXPECT_GE(std::chrono::steady_clock::now() - start, 150ms);
  EXPECT_THAT(a.channel().Connect(address, 0ms), StatusIs(StatusCode::kDeadlineExceeded));
}

// Packets from a raw socket that break the wire format: the channel closes
// the connection as malformed and leaks no descriptor.
struct MalformedCase {
  std::string name;
  std::function<void(int socket_fd, int some_fd)> send;
  std::string reason;
};

class UnixChannelMalformedTest : public ::testing::TestWithParam<MalformedCase> {};

TEST_P(UnixChannelMalformedTest, ClosesTheConnectionAndLeaksNothing) {
  Endpoint server;
  ASSERT_TRUE(server.ok());
  ASSERT_THAT(server.Start(), IsOk());
  const int fds_before = CountOpenFds();
  {
    UniqueFd memfd(memfd_create("kvbounce-test", MFD_CLOEXEC));
    ASSERT_TRUE(memfd.valid());
    UniqueFd raw = RawConnect(server.address());
    std::optional<ChannelPeerId> peer = server.WaitAccepted();
    ASSERT_TRUE(peer.has_value());
    GetParam().send(raw.get(), memfd.get());
    std::optional<Status> reason = server.WaitClosed(*peer);
    ASSERT_TRUE(reason.has_value());
    EXPECT_THAT(*reason, StatusIs(StatusCode::kDataLoss, HasSubstr("malformed message")));
    EXPECT_THAT(*reason, StatusIs(StatusCode::kDataLoss, HasSubstr(GetParam().reason)));
    EXPECT_EQ(server.num_messages(), 0u);
  }
  EXPECT_EQ(CountOpenFds(), fds_before);
  EXPECT_EQ(server.violations(), 0);
}

INSTANTIATE_TEST_SUITE_P(
    WireFormat, UnixChannelMalformedTest,
    ::testing::Values(
        MalformedCase{"ShortPacket", [](int s, int) { ASSERT_TRUE(RawSend(s, Bytes("abc"))); },
                      "shorter than its header"},
        MalformedCase{"EmptyPacket", [](int s, int) { ASSERT_TRUE(RawSend(s, {})); },
                      "an empty packet"},
        MalformedCase{"FirstFragmentAtAnOffset",
                      [](int s, int) { ASSERT_TRUE(RawSend(s, Packet(10, 4, 6))); },
                      "starts a message"},
        MalformedCase{"MessageTooLarge",
                      [](int s, int) {
                        ASSERT_TRUE(RawSend(s, Packet(UnixChannel::kMaxMessageBytes + 1, 0, 8)));
                      },
                      "more than"},
        MalformedCase{"FragmentOutOfSequence",
                      [](int s, int) {
                        ASSERT_TRUE(RawSend(s, Packet(100, 0, 50)));
                        ASSERT_TRUE(RawSend(s, Packet(100, 60, 40)));
                      },
                      "was due"},
        MalformedCase{"DescriptorsOnALaterFragment",
                      [](int s, int fd) {
                        ASSERT_TRUE(RawSend(s, Packet(100, 0, 50)));
                        const int fds[] = {fd};
                        ASSERT_TRUE(RawSend(s, Packet(100, 50, 50), fds));
                      },
                      "descriptors on a fragment after the first"},
        MalformedCase{"TruncatedPacket",
                      [](int s, int) { ASSERT_TRUE(RawSend(s, Packet(70000, 0, 70000 - 8))); },
                      "(truncated)"},
        MalformedCase{"TooManyDescriptors",
                      [](int s, int fd) {
                        const std::vector<int> fds(UnixChannel::kMaxFds + 1, fd);
                        ASSERT_TRUE(RawSend(s, Packet(4, 0, 4), fds));
                      },
                      "descriptors (truncated)"}),
    [](const ::testing::TestParamInfo<MalformedCase>& param) { return param.param.name; });

TEST(UnixChannelTest, AcceptsTheDocumentedWireFormat) {
  Endpoint server;
  ASSERT_TRUE(server.ok());
  ASSERT_THAT(server.Start(), IsOk());
  UniqueFd raw = RawConnect(server.address());
  ASSERT_TRUE(server.WaitAccepted().has_value());
  UniqueFd memfd(memfd_create("kvbounce-test", MFD_CLOEXEC));
  const int fds[] = {memfd.get()};
  // Two fragments of one 10-byte message, the descriptor on the first; then
  // an empty message.
  std::vector<std::byte> first = Packet(10, 0, 6);
  std::vector<std::byte> second = Packet(10, 6, 4);
  ASSERT_TRUE(RawSend(raw.get(), first, fds));
  ASSERT_TRUE(RawSend(raw.get(), second));
  ASSERT_TRUE(RawSend(raw.get(), Packet(0, 0, 0)));
  ASSERT_TRUE(server.WaitMessages(2));
  std::vector<Received> got = server.TakeMessages();
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0].bytes, std::vector<std::byte>(10, std::byte{0x5a}));
  EXPECT_EQ(got[0].fds.size(), 1u);
  EXPECT_TRUE(got[1].bytes.empty());
  EXPECT_TRUE(got[1].fds.empty());
}

// --- Backpressure, Close and Shutdown ---

TEST(UnixChannelTest, QueuesWhileThePeerDoesNotReadAndBoundsTheQueue) {
  UnixChannelOptions a_options;
  a_options.max_queued_messages = 8;
  Pair p(a_options);
  Gate gate;
  p.b.set_message_hook([&](ChannelPeerId, const std::vector<std::byte>& bytes) {
    if (IndexOf(bytes) == 0) gate.Wait();  // b stops reading
  });
  ASSERT_NO_FATAL_FAILURE(p.Connect());

  // Sends never block: they fill the socket, then the queue, then fail.
  constexpr size_t kSize = KiB(32);
  uint32_t accepted = 0;
  Status refused;
  for (uint32_t i = 0; i < 100000; ++i) {
    Status s = p.a.channel().Send(p.a_to_b, Indexed(kSize, i));
    if (!s.ok()) {
      refused = s;
      break;
    }
    ++accepted;
  }
  EXPECT_THAT(refused, StatusIs(StatusCode::kResourceExhausted, HasSubstr("queue is full")));
  EXPECT_GT(accepted, 8u);
  ASSERT_TRUE(gate.WaitEntered());

  gate.Open();
  ASSERT_TRUE(p.b.WaitMessages(accepted));
  std::vector<Received> got = p.b.TakeMessages();
  ASSERT_EQ(got.size(), accepted);
  for (uint32_t i = 0; i < accepted; ++i) {
    ASSERT_EQ(IndexOf(got[i].bytes), i);
    ASSERT_TRUE(got[i].bytes == Indexed(kSize, i)) << "message " << i;
  }
  // The queue drained: Send takes messages again.
  ASSERT_THAT(p.a.channel().Send(p.a_to_b, Indexed(kSize, accepted)), IsOk());
  ASSERT_TRUE(p.b.WaitMessages(1));
  EXPECT_EQ(IndexOf(p.b.TakeMessages()[0].bytes), accepted);
  EXPECT_EQ(p.a.violations(), 0);
  EXPECT_EQ(p.b.violations(), 0);
}

TEST(UnixChannelTest, ShutdownClosesEveryConnectionOnce) {
  UnixChannelOptions a_options;
  a_options.max_queued_messages = 4;
  Pair p(a_options);
  Gate gate;
  p.b.set_message_hook([&](ChannelPeerId, const std::vector<std::byte>&) { gate.Wait(); });
  ASSERT_NO_FATAL_FAILURE(p.Connect());
  Result<ChannelPeerId> second = p.a.channel().Connect(p.b.address(), kConnectTimeout);
  ASSERT_THAT(second, IsOk());
  std::optional<ChannelPeerId> b_second = p.b.WaitAccepted(1);
  ASSERT_TRUE(b_second.has_value());

  // Messages queued on the first connection (b does not read).
  Status s;
  for (uint32_t i = 0; i < 100000 && s.ok(); ++i) {
    s = p.a.channel().Send(p.a_to_b, Indexed(KiB(32), i));
  }
  ASSERT_THAT(s, StatusIs(StatusCode::kResourceExhausted));
  ASSERT_TRUE(gate.WaitEntered());

  ASSERT_THAT(p.a.Shutdown(), IsOk());
  std::map<ChannelPeerId, std::vector<Status>> closed = p.a.closed();
  ASSERT_EQ(closed.size(), 2u);
  for (ChannelPeerId peer : {p.a_to_b, *second}) {
    ASSERT_EQ(closed[peer].size(), 1u) << "peer " << peer;
    EXPECT_THAT(closed[peer][0], StatusIs(StatusCode::kAborted, HasSubstr("shut down")));
  }
  EXPECT_THAT(p.a.Shutdown(), IsOk());
  EXPECT_THAT(p.a.channel().Send(*second, Bytes("x")), StatusIs(StatusCode::kAborted));
  EXPECT_EQ(p.a.closed().size(), 2u);

  // b reads what reached its socket, then sees both connections end.
  gate.Open();
  for (ChannelPeerId peer : {p.b_to_a, *b_second}) {
    std::optional<Status> reason = p.b.WaitClosed(peer);
    ASSERT_TRUE(reason.has_value());
    EXPECT_THAT(*reason, StatusIs(StatusCode::kUnavailable, HasSubstr("closed the connection")));
  }
  std::vector<Received> got = p.b.TakeMessages();
  for (uint32_t i = 0; i < got.size(); ++i) EXPECT_EQ(IndexOf(got[i].bytes), i);
  ASSERT_THAT(p.b.Shutdown(), IsOk());
  closed = p.b.closed();
  EXPECT_EQ(closed.size(), 2u);
  for (const auto& [peer, reasons] : closed) EXPECT_EQ(reasons.size(), 1u) << "peer " << peer;
  EXPECT_EQ(p.a.violations(), 0);
  EXPECT_EQ(p.b.violations(), 0);
}

TEST(UnixChannelTest, CloseFromInsideOnMessage) {
  Pair p;
  std::mutex mu;
  Status shutdown_inside;
  Status send_after_close;
  Gate all_sent;  // b closes only once a sent everything (else a's Send may fail)
  p.b.set_message_hook([&](ChannelPeerId peer, const std::vector<std::byte>&) {
    // Runs on b's I/O thread.
    all_sent.Wait();
    p.b.channel().Close(peer, CancelledError("enough"));
    std::lock_guard<std::mutex> lock(mu);
    shutdown_inside = p.b.channel().Shutdown();
    send_after_close = p.b.channel().Send(peer, Bytes("after close"));
  });
  ASSERT_NO_FATAL_FAILURE(p.Connect());
  for (int i = 0; i < 3; ++i) ASSERT_THAT(p.a.channel().Send(p.a_to_b, Bytes("m")), IsOk());
  all_sent.Open();

  std::optional<Status> reason = p.b.WaitClosed(p.b_to_a);
  ASSERT_TRUE(reason.has_value());
  EXPECT_THAT(*reason, StatusIs(StatusCode::kCancelled, HasSubstr("enough")));
  EXPECT_EQ(p.b.num_messages(), 1u) << "no message after Close";
  {
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_THAT(shutdown_inside, StatusIs(StatusCode::kFailedPrecondition));
    EXPECT_THAT(send_after_close, StatusIs(StatusCode::kUnavailable));
  }
  std::optional<Status> a_reason = p.a.WaitClosed(p.a_to_b);
  ASSERT_TRUE(a_reason.has_value());
  EXPECT_THAT(*a_reason, StatusIs(StatusCode::kUnavailable, HasSubstr("closed the connection")));
  // The channel still works after the refused Shutdown.
  Result<ChannelPeerId> again = p.a.channel().Connect(p.b.address(), kConnectTimeout);
  ASSERT_THAT(again, IsOk());
  EXPECT_EQ(p.a.violations(), 0);
  EXPECT_EQ(p.b.violations(), 0);
}

}  // namespace
}  // namespace kvbounce
