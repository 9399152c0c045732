// UnixChannel: control frames and file descriptors between processes of one
// host, over a Unix socket, with a watch on each peer's process.
//
// The cuda-ipc transport exports its CUDA VMM allocations as POSIX file
// descriptors; a peer process maps them after receiving them over a Unix
// socket (SCM_RIGHTS). The same socket carries the transport's control
// frames. And a peer that maps our memory can only be fenced by its own
// cooperation or by its death, so the channel also tells when the peer
// PROCESS has exited, not only when its socket closed (docs/transports.md,
// "Unix channel").
//
// Model
//   * A UnixChannel is one endpoint. Create binds and listens on a
//     SOCK_SEQPACKET Unix socket at once (peers may connect before Start;
//     they are accepted once Start runs). Its address is "unix:@<name>" (an
//     abstract-namespace name, the default: unique per process and channel,
//     gone with the socket) or "unix:/<path>" (a socket file, created by
//     Create and unlinked by Shutdown).
//   * Connect(address) opens a connection to another channel (of this or
//     another process); it returns this end's ChannelPeerId, and the
//     accepting channel reports its own id for the connection with
//     on_accepted. Ids are per channel, start at 1 and are never reused.
//   * Send(peer, bytes, fds) sends one message: delivered whole, in the
//     order sent on that connection, with up to kMaxFds descriptors. The
//     receiver gets NEW descriptors for the same open files (as dup(2)
//     makes), owned by the UniqueFds handed to on_message; the sender keeps
//     its own.
//   * Each end learns the other's pid, uid and gid from the kernel
//     (SO_PEERCRED): Peer(id). The pid is the process that created the
//     peer's socket (called Connect, or Create for the listener).
//
// Peer process exit (pidfd)
//   * After connecting or accepting, the channel opens a pidfd for the
//     peer's process (SO_PEERPIDFD where the kernel has it, 6.5 on;
//     pidfd_open(2) otherwise, 5.3 on) and watches it with the socket.
//     PeerInfo::process_exit_watched says whether it does: not for a peer in
//     this very process (it cannot exit while we run), not with
//     UnixChannelOptions::watch_peer_process off, and not where the kernel
//     (or a seccomp filter) has no pidfds (ENOSYS): the channel then relies
//     on end-of-file on the socket alone.
//   * End-of-file and process exit say different things. EOF means the
//     peer's socket was closed: the peer closed it (the process may well
//     still run, and still use memory we gave it), or its process died. A
//     readable pidfd means the process has exited: it can no longer run
//     anything, so nothing it mapped is touched any more. A dying process
//     closes its sockets just before the kernel marks it exited, so after
//     EOF from a watched peer the channel waits up to
//     UnixChannelOptions::exit_grace for the pidfd before it decides why the
//     connection ended; a peer that exits in that time is reported as
//     exited. A watched peer that exits while its socket stays open (held by
//     another process that inherited it) is reported as exited too.
//   * Messages the peer sent before it closed or exited are delivered, in
//     order, before on_closed.
//
// Callbacks (UnixChannelCallbacks, installed by Start)
//   * All run on the channel's one I/O thread, one at a time, with no
//     channel lock held, and never inside a call of the channel (a Send, a
//     Close or a Connect starts nothing that calls back on its own thread).
//     They may call Send, Close, Connect, Peer and PeerProcessExited. They
//     must be short: while one runs, the channel reads and writes nothing
//     (a blocked on_message is how a peer stops reading: its sender's
//     messages then queue, see Send).
//   * on_accepted(peer, info): a peer connected to us; it runs before any
//     on_message or on_closed of that peer. Optional.
//   * on_message(peer, bytes, fds): one message, whole.
//   * on_closed(peer, reason): the connection is closed; exactly once per
//     connection (Connect's or accepted), last of that peer's callbacks.
//     reason:
//       closed by this end     the Status given to Close (an OK one becomes
//                              kCancelled "closed by this end");
//       closed by the peer     kUnavailable "peer <pid> closed the
//                              connection" (EOF, and its process did not
//                              exit within exit_grace, or is not watched);
//       peer process exited    kUnavailable "peer process <pid> exited";
//       malformed message      kDataLoss "malformed message from peer
//                              <pid>: <what>" (a truncated packet, a
//                              truncated list of descriptors, a bad
//                              fragment header);
//       socket error           kUnavailable or kInternal naming the call;
//       shutdown               kAborted "channel <address> shut down".
//
// Messages and the socket
//   * A SOCK_SEQPACKET packet is bounded by the sender's socket send buffer
//     (SO_SNDBUF, itself capped by net.core.wmem_max for unprivileged
//     processes), far below kMaxMessageBytes. So the channel fragments: a
//     message travels as packets of at most kMaxPacketBytes, each with an
//     8-byte header (the message's total length and the fragment's offset,
//     little-endian); descriptors ride on the first packet. The receiver
//     reassembles and checks every header; a connection carries one message
//     at a time, so fragments never interleave.
//   * Send never blocks on the socket: it hands what the socket takes now
//     to the kernel and queues the rest in user space, per connection; the
//     I/O thread writes the queue out as the socket drains. The queue is
//     bounded (UnixChannelOptions::max_queued_bytes, max_queued_messages:
//     messages not yet handed whole to the kernel); beyond the bound Send
//     fails with kResourceExhausted and queues nothing.
//   * Received descriptors are installed close-on-exec (MSG_CMSG_CLOEXEC)
//     and owned by UniqueFd from the moment they arrive: a message dropped
//     (malformed, or its connection closed before delivery) closes them.
//
// Errors of each call: see the methods.
//
// Thread safety: every method may be called from any thread, including
// from the channel's own callbacks — except Shutdown, which refuses to run
// there (kFailedPrecondition), and the destructor, which must not run there
// (that is reported and aborts).
//
// Ownership: the channel owns its listening socket, every connection's
// socket and pidfd, its epoll and eventfd descriptors, the descriptors
// queued for sending (duplicates of the caller's) and its I/O thread. Send
// borrows `bytes` and `fds` for the call only. A filesystem socket path is
// unlinked by Shutdown. A small record of every closed connection (its
// PeerInfo and how it ended) is kept for Peer and PeerProcessExited until
// the channel is destroyed.
#ifndef KVBOUNCE_TRANSPORT_UNIX_UNIX_CHANNEL_H_
#define KVBOUNCE_TRANSPORT_UNIX_UNIX_CHANNEL_H_

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/unique_fd.h"
#include "kvbounce/status.h"
#include "kvbounce/types.h"

namespace kvbounce {

namespace unix_internal {
class ChannelCore;
}  // namespace unix_internal

// Identifies one connection of one channel. Assigned by the channel
// (Connect, or accept: on_accepted); starts at 1, never reused.
using ChannelPeerId = uint64_t;

// The peer process of a connection, from the kernel (SO_PEERCRED).
struct PeerInfo {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
  // A pidfd watches the peer's process, so its exit is reported as such
  // (see "Peer process exit"). False for a peer in this process, with
  // watch_peer_process off, or where the kernel has no pidfds.
  bool process_exit_watched = false;
};

struct UnixChannelOptions {
  // Where to listen: empty for a unique abstract-namespace name
  // ("kvbounce-<pid>-<counter>-<random>"), "@<name>" for that abstract name,
  // "/<path>" for a socket file. Address() is "unix:" followed by it.
  std::string name;
  // Per connection: the bound on messages queued in user space (see
  // "Messages and the socket"). max_queued_bytes must be at least
  // kMaxMessageBytes, max_queued_messages at least 1.
  size_t max_queued_bytes = MiB(64);
  size_t max_queued_messages = 4096;
  // Watch each peer's process with a pidfd (see "Peer process exit").
  bool watch_peer_process = true;
  // After EOF from a watched peer: how long to wait for its process to exit
  // before reporting "closed the connection". 0 reports EOF at once.
  std::chrono::milliseconds exit_grace{200};
  // How long the I/O thread, after its last event, keeps polling the
  // sockets before it sleeps in epoll_wait (0: it sleeps at once).
  std::chrono::microseconds poll_before_sleep{0};
};

struct UnixChannelCallbacks {
  // One whole message from `peer` and the descriptors that came with it (in
  // the order sent). Required.
  std::function<void(ChannelPeerId peer, std::vector<std::byte> bytes, std::vector<UniqueFd> fds)>
      on_message;
  // The connection to `peer` is closed; exactly once per connection.
  // Required.
  std::function<void(ChannelPeerId peer, const Status& reason)> on_closed;
  // A peer connected to this channel. Optional.
  std::function<void(ChannelPeerId peer, const PeerInfo& info)> on_accepted;
};

class UnixChannel {
 public:
  // The largest message Send takes, and the most descriptors per message.
  static constexpr size_t kMaxMessageBytes = MiB(4);
  static constexpr size_t kMaxFds = 16;
  // The largest packet on the socket (header included), and the header.
  static constexpr size_t kMaxPacketBytes = KiB(64);
  static constexpr size_t kPacketHeaderBytes = 8;
  // The prefix of every address.
  static constexpr std::string_view kAddressPrefix = "unix:";

  // Binds and listens at options.name (see UnixChannelOptions). Peers can
  // connect at once; nothing is accepted before Start.
  //
  // Errors:
  //   InvalidArgument  a name not of the forms above, longer than a socket
  //                    address holds (107 bytes) or holding a NUL byte;
  //                    max_queued_bytes < kMaxMessageBytes;
  //                    max_queued_messages == 0; a negative exit_grace.
  //   AlreadyExists    the name or path is in use (a stale socket file is
  //                    not removed: the caller decides).
  //   Unavailable      bind or listen failed otherwise (e.g. no directory,
  //                    no permission), naming the call and errno.
  //   Internal         socket, epoll or eventfd could not be created.
  static Result<std::unique_ptr<UnixChannel>> Create(UnixChannelOptions options = {});

  // Runs Shutdown(). REQUIRES: not called on the channel's own I/O thread
  // (from a callback): that is reported and aborts.
  ~UnixChannel();

  UnixChannel(const UnixChannel&) = delete;
  UnixChannel& operator=(const UnixChannel&) = delete;

  // "unix:@<name>" or "unix:/<path>": what peers pass to Connect.
  const std::string& Address() const;

  // Installs the callbacks and starts the I/O thread, which accepts peers
  // (also those that connected since Create) and delivers messages.
  //
  // Errors: kInvalidArgument without on_message or on_closed;
  // kFailedPrecondition when already started; kAborted after Shutdown;
  // kResourceExhausted when the thread cannot be created.
  Status Start(UnixChannelCallbacks callbacks);

  // Connects to the channel at `address` ("unix:@<name>" or "unix:/<path>"),
  // waiting at most `timeout` for the listener to take the connection (only
  // a listener whose backlog is full makes it wait). The peer's
  // on_accepted follows once its I/O thread accepts.
  //
  // Errors:
  //   InvalidArgument     a malformed address.
  //   Unavailable         nobody listens there (refused, or no such socket
  //                       file).
  //   DeadlineExceeded    the listener did not take the connection within
  //                       `timeout`.
  //   ResourceExhausted   the process is out of descriptors.
  //   FailedPrecondition  before Start.
  //   Aborted             after Shutdown began.
  //   Internal            a failed system call (named, with errno).
  Result<ChannelPeerId> Connect(std::string_view address, std::chrono::milliseconds timeout);

  // Sends one message of `bytes` with duplicates of `fds` (the caller keeps
  // its descriptors). OK means the message was handed to the kernel or
  // queued (see "Messages and the socket"); a message queued when the
  // connection closes is dropped.
  //
  // Errors:
  //   NotFound            an id this channel never assigned.
  //   Unavailable         the connection is closed or closing (also when
  //                       the peer closed it and on_closed has not run yet).
  //   InvalidArgument     more than kMaxMessageBytes bytes, more than kMaxFds
  //                       descriptors, or a descriptor that is not open.
  //   ResourceExhausted   the connection's queue is full (nothing queued),
  //                       or the process is out of descriptors (EMFILE).
  //   FailedPrecondition  before Start.
  //   Aborted             after Shutdown began.
  Status Send(ChannelPeerId peer, std::span<const std::byte> bytes, std::span<const int> fds = {});

  // Closes the connection to `peer`: queued messages are dropped, the
  // socket and pidfd are closed by the I/O thread, which then runs
  // on_closed(peer, reason) (an OK reason becomes kCancelled "closed by this
  // end"). No on_message of the peer starts after Close returns, except one
  // the I/O thread had already begun delivering. Does nothing for an
  // unknown peer or one already closed or closing.
  void Close(ChannelPeerId peer, const Status& reason);

  // Closes every connection (on_closed for each not yet closed, with
  // kAborted "channel <address> shut down"; queued messages are dropped),
  // stops accepting, joins the I/O thread, closes the listener and unlinks
  // a socket file. No callback runs after it returns. Idempotent (a second
  // call returns OK when the first finished; concurrent calls wait for it).
  // Every call made after it began fails with kAborted (Start, Connect,
  // Send).
  //
  // Errors: kFailedPrecondition when called on the channel's own I/O thread
  // (from a callback): nothing is done then.
  Status Shutdown();

  // The peer process of a connection, open or closed. Errors: kNotFound for
  // an id this channel never assigned.
  Result<PeerInfo> Peer(ChannelPeerId peer) const;

  // True when the peer's process is known to have exited: the connection
  // was closed because it did, or it is open and its pidfd says so now
  // (before the I/O thread has acted on it). False otherwise, also for an
  // unknown peer, a peer whose process is not watched, and a connection
  // closed for another reason (its pidfd was closed with it).
  bool PeerProcessExited(ChannelPeerId peer) const;

 private:
  explicit UnixChannel(std::unique_ptr<unix_internal::ChannelCore> core);

  std::unique_ptr<unix_internal::ChannelCore> core_;
};

}  // namespace kvbounce

#endif  // KVBOUNCE_TRANSPORT_UNIX_UNIX_CHANNEL_H_
