// The UCX transport. The header and docs/transports.md describe the design;
// this file keeps to it: every UCP call on a worker runs on that worker's
// rail thread; UCX callbacks only record what happened or post a command to
// the rail's own queue, so nothing re-enters UCX from inside a UCX callback.
#include "transport/ucx/ucx_transport.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <new>
#include <optional>
#include <random>
#include <shared_mutex>
#include <span>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "common/checked_math.h"
#include "common/tsan.h"
#include "common/unique_fd.h"
#include "kvbounce/config.h"
#include "kvbounce/logging.h"
#include "memory/allocation.h"
#include "transport/write_check.h"

namespace kvbounce {
namespace ucx_internal {
namespace {

// The transport's own messages on the control endpoint (one UCP active
// message id; the message type is the one-byte AM header).
constexpr unsigned kAmId = 11;
// (4 was a flush's answer, which travels on the data endpoints since
// version 4.)
enum class MsgType : uint8_t { kHello = 1, kFrame = 2, kFenced = 3, kWired = 5 };
// Data travels as active messages of their own id on the rails' data
// endpoints: header = kind u8 | sender identity u64 | destination address
// (kData) or flush sequence number (kFlush) u64; payload = the bytes.
constexpr unsigned kDataAmId = 12;
// A flush is answered on the answering rail's own data endpoint back to
// the flushing rail: kFlushAck when every data message before it landed,
// kFlushNack when some fell outside a registered region (value = the
// flush's sequence number). Same-host connections thus settle a flush in
// shared memory, without the control endpoint's TCP.
enum class DataKind : uint8_t { kData = 1, kFlush = 2, kFlushAck = 3, kFlushNack = 4 };
constexpr size_t kDataHeaderBytes = 17;
constexpr uint32_t kHelloMagic = 0x5542564B;  // "KVBU"
// 2: the peer's pid and read cookie (same-host reads). 3: WIRED, and a
// connection opens only once both sides' data endpoints are wired up. 4:
// flushes are answered on the data endpoints (DataKind::kFlushAck).
constexpr uint16_t kHelloVersion = 4;
constexpr uint32_t kKeyMagic = 0x594B564B;  // "KVKY"
constexpr uint16_t kKeyVersion = 2;
constexpr size_t kMaxHelloRails = static_cast<size_t>(Config::kMaxNumWorkers);
constexpr size_t kMaxWorkerAddressBytes = 64 << 10;
// What a flush's answer orders, for ThreadSanitizer (common/tsan.h):
// released before it is sent, acquired when it arrives.
char g_shm_order = 0;
constexpr size_t kMaxHostIdBytes = 512;

// Calibrated with scripts/bench_ucx.sh on the 2-core development machine
// (UCX 1.13.1, both processes on one host; docs/PERFORMANCE.md): over TCP a
// data message costs ~1.5 µs (per-block with 256-byte fragments) and large
// ones stream at ~3 GB/s; over shared memory ~0.6 µs and ~10 GB/s. A real
// network's rate is its own; Config's transport_* overrides say so.
constexpr TransportCost kTcpCost{.op_us = 1.5, .bytes_per_us = 3000.0};
constexpr TransportCost kSharedMemoryCost{.op_us = 0.6, .bytes_per_us = 10000.0};
// Read (process_vm_readv), measured with bench/read_remote_bench.cc on the
// same machine (docs/transports.md, "Reads"): a 256-byte range costs
// ~0.35-0.55 µs (the kernel pins the peer's pages range by range; 1024
// ranges per call amortize the call's ~1.25 µs), and 1 MiB ranges stream at
// ~7.7-9.5 GB/s.
constexpr TransportCost kCrossMemoryReadCost{.op_us = 0.5, .bytes_per_us = 8500.0};
// Ranges per process_vm_readv call (the kernel's limit on either iovec list).
constexpr size_t kMaxReadRanges = IOV_MAX;

Status UcsError(StatusCode code, std::string_view what, ucs_status_t status) {
  return Status(code, std::string(what) + ": " + ucs_status_string(status));
}

// Routes active messages `id` of `worker` to `cb`, whole messages only.
Status SetAmHandler(ucp_worker_h worker, unsigned id, ucp_am_recv_callback_t cb, void* arg) {
  ucp_am_handler_param_t am{};
  am.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                  UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
  am.id = id;
  am.cb = cb;
  am.arg = arg;
  am.flags = UCP_AM_FLAG_WHOLE_MSG;
  const ucs_status_t s = ucp_worker_set_am_recv_handler(worker, &am);
  if (s != UCS_OK) return UcsError(StatusCode::kUnavailable, "ucp_worker_set_am_recv_handler", s);
  return Status();
}

// Little-endian field writer and reader for the handshake.
class Writer {
 public:
  void U8(uint8_t v) { bytes_.push_back(static_cast<std::byte>(v)); }
  void U16(uint16_t v) { Le(v, 2); }
  void U32(uint32_t v) { Le(v, 4); }
  void U64(uint64_t v) { Le(v, 8); }
  void Blob(std::span<const std::byte> b) {
    U32(static_cast<uint32_t>(b.size()));
    bytes_.insert(bytes_.end(), b.begin(), b.end());
  }
  std::vector<std::byte> Take() { return std::move(bytes_); }

 private:
  void Le(uint64_t v, int n) {
    for (int i = 0; i < n; ++i) bytes_.push_back(static_cast<std::byte>(v >> (8 * i)));
  }
  std::vector<std::byte> bytes_;
};

class Reader {
 public:
  explicit Reader(std::span<const std::byte> bytes) : bytes_(bytes) {}
  bool U8(uint8_t* v) { return Le(v, 1); }
  bool U16(uint16_t* v) { return Le(v, 2); }
  bool U32(uint32_t* v) { return Le(v, 4); }
  bool U64(uint64_t* v) { return Le(v, 8); }
  bool Blob(size_t limit, std::vector<std::byte>* out) {
    uint32_t n = 0;
    if (!U32(&n) || n > limit || n > bytes_.size() - pos_) return false;
    out->assign(bytes_.begin() + static_cast<ptrdiff_t>(pos_),
                bytes_.begin() + static_cast<ptrdiff_t>(pos_ + n));
    pos_ += n;
    return true;
  }
  size_t left() const { return bytes_.size() - pos_; }

 private:
  template <typename T>
  bool Le(T* v, size_t n) {
    if (bytes_.size() - pos_ < n) return false;
    uint64_t x = 0;
    for (size_t i = 0; i < n; ++i) x |= static_cast<uint64_t>(bytes_[pos_ + i]) << (8 * i);
    *v = static_cast<T>(x);
    pos_ += n;
    return true;
  }
  std::span<const std::byte> bytes_;
  size_t pos_ = 0;
};

std::span<const std::byte> AsBytes(const std::string& s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

// Processes that share a kernel and a pid namespace can reach each other's
// memory with cross-memory attach.
std::string HostIdentity() {
  std::string id;
  std::ifstream boot("/proc/sys/kernel/random/boot_id");
  std::getline(boot, id);
  std::array<char, 256> ns{};
  const ssize_t n = readlink("/proc/self/ns/pid", ns.data(), ns.size() - 1);
  if (n > 0) id += "/" + std::string(ns.data(), static_cast<size_t>(n));
  return id;
}

// UCX_TLS, when set, must leave a shared-memory transport in for the
// same-host data endpoints (they have no error handling; over TCP they would
// lose the dead-peer report).
bool EnvAllowsSharedMemory() {
  const char* tls = std::getenv("UCX_TLS");
  if (tls == nullptr || *tls == '\0') return true;
  std::string_view list(tls);
  const bool exclude = list.front() == '^';
  if (exclude) list.remove_prefix(1);
  bool named = false;
  while (!list.empty()) {
    const size_t comma = list.find(',');
    const std::string_view item = list.substr(0, comma);
    if (item == "all") return !exclude;
    if (item == "shm" || item == "sm" || item == "cma" || item == "posix" || item == "sysv") {
      named = true;
    }
    if (comma == std::string_view::npos) break;
    list.remove_prefix(comma + 1);
  }
  return exclude ? !named : named;
}

std::string ErrnoText(int error) {
  return std::error_code(error, std::generic_category()).message();
}

// A pidfd for `pid` (whose exit it reports), or none where the kernel (or a
// seccomp profile) has no pidfd_open.
UniqueFd OpenPidFd(pid_t pid) {
#if defined(SYS_pidfd_open)
  const long fd = syscall(SYS_pidfd_open, pid, 0);
  if (fd >= 0) return UniqueFd(static_cast<int>(fd));
#else
  (void)pid;
#endif
  return UniqueFd();
}

// True when the process behind `pidfd` has exited (a pid can be reused only
// after that, so a read that ended before this says false came from it).
bool ProcessExited(int pidfd) {
  if (pidfd < 0) return false;
  pollfd p{.fd = pidfd, .events = POLLIN, .revents = 0};
  return poll(&p, 1, 0) > 0 && (p.revents & (POLLIN | POLLHUP | POLLERR)) != 0;
}

// Copies `count` (local, remote) pairs of equal lengths, `total` bytes in
// all, from process `pid` into this one, continuing after partial
// transfers. Returns 0 or the errno of the call that failed (EFAULT for a
// call that copied nothing). The iovecs are consumed.
int ReadVectors(pid_t pid, iovec* local, iovec* remote, size_t count, uint64_t total) {
  size_t first = 0;
  while (total > 0) {
    const ssize_t got =
        process_vm_readv(pid, local + first, count - first, remote + first, count - first, 0);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) return errno;
    if (got == 0) return EFAULT;
    auto left = static_cast<uint64_t>(got);
    total -= left;
    while (left > 0) {
      if (left >= local[first].iov_len) {
        left -= local[first].iov_len;
        ++first;
        continue;
      }
      local[first].iov_base = static_cast<std::byte*>(local[first].iov_base) + left;
      local[first].iov_len -= left;
      remote[first].iov_base = static_cast<std::byte*>(remote[first].iov_base) + left;
      remote[first].iov_len -= left;
      left = 0;
    }
  }
  return 0;
}

// Whether this process may read process `pid`: reads the 8-byte cookie the
// peer advertised at `address` and compares it with `expected`. Errors:
// kUnavailable with the errno text when the call fails (EPERM: Yama's
// ptrace_scope, a seccomp profile, other credentials), kFailedPrecondition
// when the value differs.
Status ProbeRead(pid_t pid, uint64_t address, uint64_t expected) {
  uint64_t value = 0;
  iovec local{.iov_base = &value, .iov_len = sizeof(value)};
  iovec remote{.iov_base = reinterpret_cast<void*>(static_cast<uintptr_t>(address)),
               .iov_len = sizeof(value)};
  if (const int error = ReadVectors(pid, &local, &remote, 1, sizeof(value)); error != 0) {
    std::string hint;
    if (error == EPERM) hint = " (ptrace access denied: Yama ptrace_scope or a seccomp profile?)";
    return UnavailableError("process_vm_readv of pid " + std::to_string(pid) + ": " +
                            ErrnoText(error) + hint);
  }
  if (value != expected) {
    return FailedPreconditionError("pid " + std::to_string(pid) +
                                   " is not the peer (its read cookie does not match)");
  }
  return Status();
}

}  // namespace

// --- Completion aggregation -------------------------------------------------

// Counts the parts of one Write or Flush down to zero, keeps the first error,
// and runs `done` once, on the thread that finished the last part.
class Countdown {
 public:
  Countdown(int64_t parts, TransportDone done) : remaining_(parts), done_(std::move(done)) {}

  void Fail(const Status& status) {
    std::lock_guard<std::mutex> lock(mu_);
    if (first_error_.ok()) first_error_ = status;
  }
  void MarkSkipped() { skipped_.store(true, std::memory_order_relaxed); }

  // One part ended (`n` parts at once).
  void Arrive(int64_t n = 1) {
    if (remaining_.fetch_sub(n, std::memory_order_acq_rel) != n) return;
    Status status;
    {
      std::lock_guard<std::mutex> lock(mu_);
      status = first_error_;
    }
    if (status.ok() && skipped_.load(std::memory_order_relaxed)) {
      status = CancelledError("write stopped before every operation was issued");
    }
    TransportDone done = std::move(done_);
    done(status);
  }

 private:
  std::atomic<int64_t> remaining_;
  std::mutex mu_;
  Status first_error_;
  std::atomic<bool> skipped_{false};
  TransportDone done_;
};

// A LocalRegion's count of this transport's operations using it: writes
// reading from it and reads writing into it. Deregistration waits for zero.
struct RegionUse {
  std::mutex mu;
  std::condition_variable cv;
  int64_t uses = 0;
  void Add() {
    std::lock_guard<std::mutex> lock(mu);
    ++uses;
  }
  void Release() {
    std::lock_guard<std::mutex> lock(mu);
    if (--uses == 0) cv.notify_all();
  }
};

// One Write: its countdown (in puts) and the source region's use count.
// The source region's use ends before `done` runs, so the callback may
// destroy the region.
struct Batch {
  Batch(int64_t puts, TransportDone done, std::stop_token stop_token,
        std::shared_ptr<RegionUse> use)
      : countdown(puts,
                  [use = std::move(use), done = std::move(done)](Status status) {
                    use->Release();
                    done(std::move(status));
                  }),
        stop(std::move(stop_token)) {}
  Countdown countdown;
  std::stop_token stop;
};

struct Piece {
  const std::byte* src = nullptr;
  uint64_t bytes = 0;
  std::array<std::byte, kDataHeaderBytes> header{};  // lives until the send completed
};

std::array<std::byte, kDataHeaderBytes> DataHeader(DataKind kind, uint64_t nonce,
                                                   uint64_t value) {
  std::array<std::byte, kDataHeaderBytes> h{};
  h[0] = static_cast<std::byte>(kind);
  for (int i = 0; i < 8; ++i) {
    h[1 + i] = static_cast<std::byte>(nonce >> (8 * i));
    h[9 + i] = static_cast<std::byte>(value >> (8 * i));
  }
  return h;
}

// A write's sends for one rail, or (with `flush` set) a flush queued behind
// the sends before it.
struct WorkItem {
  std::shared_ptr<Batch> batch;
  std::shared_ptr<Countdown> flush;
  PeerId peer = 0;
  std::shared_ptr<std::vector<Piece>> pieces;
  size_t next = 0;
};

// Lives in the memory UCX reserves in front of... behind each request handle
// (ucp_params_t::request_size); built after ucp_*_nbx returned the request.
struct RequestContext {
  std::shared_ptr<Batch> batch;
  std::shared_ptr<std::vector<Piece>> pieces;  // the headers UCX may still read
  PeerId peer = 0;
  uint64_t flush_seq = 0;  // a flush message's sequence number; 0 for data
  bool wiring = false;     // the flush that completes a data endpoint's wire-up
  // A message nothing waits for: a flush's answer (DataKind::kFlushAck or
  // kFlushNack).
  bool message = false;
  // Settled without UCX and handed back with ucp_request_free (see
  // Rail::Abandon): UCX's late completion, if any, only ends the context.
  bool abandoned = false;
};

class Engine;

// What an endpoint's error handler needs.
struct EpErrorArg {
  Engine* engine = nullptr;
  int rail = 0;
  PeerId peer = 0;
  bool control = false;
};

// A rail's view of one peer (owned by the rail thread).
struct RailPeer {
  ucp_ep_h ep = nullptr;
  bool with_errors = true;  // peer error handling; false: shared memory
  std::unordered_set<void*> requests;  // started, not completed
  std::unique_ptr<EpErrorArg> err_arg;
  uint64_t nonce = 0;       // the peer's identity in its data messages
  int64_t outstanding = 0;  // sends started and flushes awaiting their ack
  bool aborting = false;    // no new sends, nothing received; fence pending or done
  bool closing = false;     // ucp_ep_close_nbx in progress
  void* close_request = nullptr;
  bool close_released = false;  // handed back to UCX unfinished at a stop
  bool abandoned = false;   // in-flight sends settled without UCX (Abandon)
  std::function<void()> on_fenced;
};

// One UCP worker and its progress: a thread of its own, or (rail 0 after
// TakeProgressSource) the thread of whoever drives its ProgressSource.
// Either way one thread at a time runs the rail; the hand-over joins the
// rail's thread first, so the rail's state passes with it.
class Rail {
 public:
  Rail(Engine* engine, int index) : engine_(engine), index_(index) {}
  ~Rail();

  Status Init(ucp_context_h context);
  // Errors: kResourceExhausted when the thread cannot be created.
  Status StartThread();
  // Queues `command` for the rail's thread. False when the rail has stopped
  // for good (the command did not and will not run).
  bool Post(std::function<void()> command);
  // Ends the loop once every peer is fenced, then joins (or waits for the
  // driver to poll the rail to its end).
  void StopAndJoin();
  // Stops the rail's own thread at its next pass and hands the rail to an
  // external driver (RailSource). nullptr once stopping or handed over.
  std::unique_ptr<ProgressSource> HandOver(std::shared_ptr<Engine> engine);

  // --- The external driver's side (RailSource) ---------------------------
  bool DrivenPoll();
  bool DrivenPrepareToSleep(std::chrono::microseconds* max_sleep);
  void Detach();
  int epoll_fd() const { return epoll_fd_; }
  // A source drives the rail now (any thread; the answer may be stale).
  bool driven() {
    std::lock_guard<std::mutex> lock(drive_mu_);
    return driven_ && !finished_;
  }

  ucp_worker_h worker() const { return worker_; }
  const std::vector<std::byte>& address() const { return address_; }
  int index() const { return index_; }
  bool stopping() const { return stopping_; }

  // --- Rail-thread operations --------------------------------------------
  void CreateDataEp(PeerId peer, const std::vector<std::byte>& remote_address, bool with_errors);
  void Enqueue(WorkItem item);
  // Sends a flush behind the data queued before it; completes on the ack.
  void Flush(PeerId peer, std::shared_ptr<Countdown> countdown);
  // Stops this rail's writes to `peer`; runs `fenced` (on this thread) once
  // none is left and the data endpoint is closed.
  void AbortPeer(PeerId peer, bool graceful, std::function<void()> fenced);
  // Force-closes the data endpoint to `peer` (after the fence, or at once
  // when the peer is gone).
  void ClosePeer(PeerId peer, bool peer_alive);
  // Settles the requests to `peer` still in flight on an endpoint without
  // error handling, whose peer is gone or whose transport is stopping
  // (UCX can neither cancel them nor force-close such an endpoint). Such a
  // send is never resumed: a dead peer's receive queue does not drain, and
  // after a shutdown nothing progresses the worker.
  void Abandon(PeerId peer);
  // Accepts `peer`'s data messages (its identity `nonce`) from now on.
  void AcceptFrom(PeerId peer, uint64_t nonce);
  // The receiver's answer to a flush: every data message before it landed
  // (ok) or some fell outside a registered region.
  void FlushAcked(uint64_t seq, bool ok);

 private:
  static ucs_status_t OnData(void* arg, const void* header, size_t header_length, void* data,
                             size_t length, const ucp_am_recv_param_t* param);
  void FailPendingFlushes(PeerId peer, const Status& status);
  // The rail's own loop: passes until done (then Finish) or handed over.
  void Run();
  enum class Pass { kIdle, kBusy, kDone };
  // One pass: commands, queued work, UCX progress; kDone once a stopping
  // rail is quiesced (or gave up waiting).
  Pass Step();
  // Arms the worker for a sleep: false when there is work now.
  bool ReadyToSleep();
  // After the last pass: nothing is received any more, what is left fails.
  void Finish();
  bool OnDriverThread() const {
    return driver_.load(std::memory_order_relaxed) == std::this_thread::get_id();
  }
  bool RunCommands();
  void IssueWork();
  void IssueAcks();

  void FinishItem(WorkItem& item, const Status& status, bool skipped);
  void IssueFlush(PeerId peer, std::shared_ptr<Countdown> countdown);
  void CheckFence(PeerId peer);
  bool Quiesced() const;
  static void SendDone(void* request, ucs_status_t status, void* user_data);
  // The parameters of every data-endpoint send: eager, completing through
  // SendDone on this rail.
  ucp_request_param_t EagerSendParam() {
    ucp_request_param_t param{};
    param.op_attr_mask =
        UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = UCP_AM_SEND_FLAG_EAGER;
    param.cb.send = &Rail::SendDone;
    param.user_data = this;
    return param;
  }
  static void CloseDone(void* request, ucs_status_t status, void* user_data);
  void Completed(void* request, ucs_status_t status);

  Engine* engine_;
  const int index_;
  ucp_worker_h worker_ = nullptr;
  std::vector<std::byte> address_;
  int event_fd_ = -1;  // ucp_worker_get_efd, owned by UCX
  int wake_fd_ = -1;
  int epoll_fd_ = -1;
  std::thread thread_;
  // The thread running the rail now (Post skips the wake-up for it).
  std::atomic<std::thread::id> driver_{};

  std::mutex mu_;
  std::deque<std::function<void()>> commands_;
  bool closed_ = false;  // guarded by mu_: no command is accepted any more

  // The hand-over (guarded by drive_mu_, like thread_ once the rail runs):
  // a source was made (handed_over_) and is attached (driven_), and the rail
  // ran to its end (finished_) on whichever thread.
  std::mutex drive_mu_;
  std::condition_variable drive_cv_;
  bool handed_over_ = false;
  bool driven_ = false;
  bool finished_ = false;
  bool started_ = false;        // a thread of its own ran it once
  bool hand_over_now_ = false;  // rail thread: leave Run at the next pass
  std::optional<std::chrono::steady_clock::time_point> stop_deadline_;

  // Rail-thread state.
  // Peers whose data messages this rail accepts, by their identity.
  struct Inbound {
    PeerId peer = 0;
    bool accepting = false;
    bool dropped = false;  // bytes dropped since the last flush
  };
  std::unordered_map<uint64_t, Inbound> inbound_;
  struct PendingFlush {
    PeerId peer = 0;
    std::shared_ptr<Countdown> countdown;
  };
  std::unordered_map<uint64_t, PendingFlush> pending_flushes_;
  // Flushes received, to be answered (IssueAcks).
  struct PendingAck {
    PeerId peer = 0;
    uint64_t seq = 0;
    bool ok = false;
  };
  std::vector<PendingAck> acks_;
  // The headers of abandoned sends; freed after the worker (members are
  // destroyed after ~Rail's body destroyed it).
  std::vector<std::shared_ptr<std::vector<Piece>>> abandoned_pieces_;
  uint64_t next_flush_seq_ = 1;
  bool stopping_ = false;
  std::unordered_map<PeerId, RailPeer> peers_;
  std::deque<WorkItem> work_;
  int64_t in_flight_ = 0;
};

// One connection (rail 0 owns the fields marked so; the others are guarded
// by Engine::conns_mu_).
struct Conn {
  enum State : int { kHandshake, kOpen, kClosing, kDead };
  PeerId id = 0;
  bool outgoing = false;
  std::string where;  // the address for messages
  std::atomic<int> state{kHandshake};
  // Guarded by conns_mu_.
  uint64_t peer_nonce = 0;
  bool shared_memory = false;
  // Read: this process may read the peer's memory (the probe passed); the
  // peer's pid, and a pidfd that tells its exit. Set by the handshake,
  // before the connection opens; immutable afterwards.
  bool read_remote = false;
  pid_t peer_pid = 0;
  UniqueFd peer_pidfd;
  Status connect_error;
  // Rail 0.
  ucp_ep_h ctrl_ep = nullptr;
  std::unique_ptr<EpErrorArg> ctrl_err_arg;
  bool ctrl_failed = false;
  bool peer_fenced = false;
  bool sent_fenced = false;
  bool teardown = false;
  // A shutdown's drain: the connection closes only once the peer answered
  // our FENCED with its own (it has then taken every message we sent before)
  // or the drain ran out.
  bool draining = false;
  bool completed = false;
  bool was_open = false;
  int rails_unfenced = 0;
  int rails_to_accept = 0;
  int rails_to_wire = 0;    // data endpoints whose wire-up is in progress
  bool wired = false;       // ours are wired up and WIRED went out
  bool peer_wired = false;  // the peer's WIRED arrived

  std::vector<std::vector<std::byte>> peer_rails;
  Status reason;
  // The reads of the fence: accepted Reads not yet ended, and whether new
  // ones are refused (set by the teardown; the reader stops at its next
  // piece). Guarded by read_mu; reads_closed is also read without it.
  std::mutex read_mu;
  int64_t reads_pending = 0;
  std::atomic<bool> reads_closed{false};
};

// --- Reads ------------------------------------------------------------------

// One accepted Read.
struct ReadJob {
  std::shared_ptr<Conn> conn;  // keeps the pidfd open
  std::span<const ReadOp> ops;
  uint64_t bytes = 0;
  std::shared_ptr<RegionUse> use;  // the target region's
  TransportDone done;
  std::stop_token stop;
};

// The reader thread: runs every Read's process_vm_readv calls, off the rail
// threads, one job at a time in the order accepted, and their `done`.
class RemoteReader {
 public:
  // `poll`: how long the thread keeps polling for the next job after one
  // ended before it sleeps (UcxTransportOptions::poll_before_sleep).
  RemoteReader(Engine* engine, uint64_t piece_bytes, std::chrono::microseconds poll)
      : engine_(engine), piece_bytes_(piece_bytes), poll_(poll) {}
  ~RemoteReader() { StopAndJoin(); }

  // Errors: kResourceExhausted when the thread cannot be created.
  Status Start();
  // Queues `job` (moved from only on success). False once stopping.
  bool Post(ReadJob& job);
  // Runs `job` on the calling thread (the reader's, or rail 0's for a small
  // read while rail 0 is driven), then its `done`; stops at the next piece
  // once StopAndJoin began.
  void Execute(ReadJob& job);
  // Ends the job in progress at its next piece and fails the queued ones
  // with kAborted (their `done` runs on the reader thread), then joins.
  // Idempotent.
  void StopAndJoin();

 private:
  void Run();

  Engine* const engine_;
  const uint64_t piece_bytes_;
  const std::chrono::microseconds poll_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<ReadJob> queue_;
  // Jobs posted ever, read without the lock while the thread polls.
  std::atomic<uint64_t> posted_{0};
  bool closed_ = false;  // guarded by mu_
  std::atomic<bool> aborting_{false};
  std::thread thread_;
};

// A request of rail 0 on a control endpoint (a message or a close), until
// UCX completes it or a stopping transport hands it back unfinished.
struct ControlRequest {
  Engine* engine = nullptr;
  void* request = nullptr;
  std::vector<std::byte> buffer;  // a message's bytes
  bool close = false;
  bool released = false;  // handed back with ucp_request_free before completion
};

class Engine : public std::enable_shared_from_this<Engine> {
 public:
  explicit Engine(UcxTransportOptions options) : options_(std::move(options)) {}
  ~Engine();

  Status Init();
  TransportCaps Caps() const;
  Result<TransportCaps> PeerCaps(PeerId peer) const;
  std::string Address() const { return address_; }
  Status Start(TransportCallbacks callbacks);
  Result<PeerId> Connect(std::string_view address);
  Status Send(PeerId peer, std::span<const std::byte> frame);
  Result<std::unique_ptr<LocalRegion>> Register(Addr address, uint64_t bytes, MemoryKind kind);
  Result<std::unique_ptr<RemoteRegion>> Import(PeerId peer, const RegionInfo& info);
  Status Write(const LocalRegion& source, const RemoteRegion& target,
               std::span<const WriteOp> ops, TransportDone done, std::stop_token stop);
  Status Read(const RemoteRegion& source, const LocalRegion& target, std::span<const ReadOp> ops,
              TransportDone done, std::stop_token stop);
  Status Flush(PeerId peer, TransportDone done);
  void Disconnect(PeerId peer, const Status& reason);
  void Shutdown();
  TransportStats Stats() const;
  std::unique_ptr<ProgressSource> TakeProgressSource();

  // For the rails and the regions.
  ucp_context_h context() const { return context_; }
  Rail& rail(int i) { return *rails_[static_cast<size_t>(i)]; }
  int num_rails() const { return static_cast<int>(rails_.size()); }
  void OnDataEpError(PeerId peer, ucs_status_t status);
  // A rail's data endpoint to `peer` is wired up (any thread).
  void DataEpWired(PeerId peer);

  void OnControlEpError(PeerId peer, ucs_status_t status);
  uint64_t nonce() const { return nonce_; }
  const UcxTransportOptions& options() const { return options_; }
  // The registry of local regions a data message may land in.
  void AddRegion(uint64_t address, uint64_t size);
  void RemoveRegion(uint64_t address, uint64_t size);
  // Copies a data message to `address` when the whole range lies inside a
  // registered region; false (and nothing written) otherwise.
  bool CopyIn(uint64_t address, const void* data, size_t length);
  bool shut() const { return shut_.load(std::memory_order_acquire); }
  void CountPut(uint64_t bytes) {
    write_ops_.fetch_add(1, std::memory_order_relaxed);
    write_bytes_.fetch_add(bytes, std::memory_order_relaxed);
  }
  void CountFailedPut() { failed_write_ops_.fetch_add(1, std::memory_order_relaxed); }
  void CountRead(uint64_t ops, uint64_t bytes) {
    read_ops_.fetch_add(ops, std::memory_order_relaxed);
    read_bytes_.fetch_add(bytes, std::memory_order_relaxed);
  }
  // The reader: a Read of `conn` ended (its `done` returned); the last one
  // of a connection being torn down lets the teardown complete.
  void ReadEnded(const std::shared_ptr<Conn>& conn);

  // Rail 0: the last steps of a shutdown.
  bool ControlQuiesced() const;
  // Hands every control request UCX has not completed back to it, so that
  // the worker can be destroyed (a stuck peer never completes them).
  void ReleaseControlRequests();
  void DestroyListener();

 private:
  static void OnConnRequest(ucp_conn_request_h request, void* arg);
  static ucs_status_t OnAm(void* arg, const void* header, size_t header_length, void* data,
                           size_t length, const ucp_am_recv_param_t* param);
  static void OnEpError(void* arg, ucp_ep_h ep, ucs_status_t status);
  static void ControlDone(void* request, ucs_status_t status, void* user_data);

  std::shared_ptr<Conn> FindConn(PeerId peer) const;
  // The connection to `peer` for new work (the caller holds api_mu_
  // shared). Errors: kAborted, kFailedPrecondition (not started),
  // kNotFound, kUnavailable (not open).
  Result<std::shared_ptr<Conn>> OpenConn(PeerId peer) const;
  std::shared_ptr<Conn> NewConn(bool outgoing, std::string where);

  // Rail 0.
  void AcceptConn(ucp_conn_request_h request);
  void StartConnect(const std::shared_ptr<Conn>& conn, sockaddr_storage addr, socklen_t len);
  // The control endpoint of `conn` from `params` (a socket address or a
  // connection request), with peer error handling; on failure the
  // connection is torn down with `what` and false returned.
  bool CreateControlEp(const std::shared_ptr<Conn>& conn, ucp_ep_params_t params,
                       const std::string& what);
  void HandleAm(ucp_ep_h ep, MsgType type, std::vector<std::byte> payload);
  void HandleHello(const std::shared_ptr<Conn>& conn, std::span<const std::byte> payload);
  bool SendMessage(const std::shared_ptr<Conn>& conn, MsgType type, std::vector<std::byte> body);
  std::vector<std::byte> HelloMessage() const;
  void OpenDataEps(const std::shared_ptr<Conn>& conn);
  void RailAccepted(const std::shared_ptr<Conn>& conn);
  // Opens a connection in handshake once both sides' data endpoints are
  // wired up (rail 0).
  void MaybeOpen(const std::shared_ptr<Conn>& conn);
  void BeginTeardown(const std::shared_ptr<Conn>& conn, Status reason, bool graceful);
  void RailFenced(const std::shared_ptr<Conn>& conn);
  void MaybeComplete(const std::shared_ptr<Conn>& conn);
  void SetState(Conn& conn, int state);

  const UcxTransportOptions options_;
  uint64_t put_chunk_ = kDefaultUcxPutChunkBytes;
  ucp_context_h context_ = nullptr;
  std::vector<std::unique_ptr<Rail>> rails_;
  ucp_listener_h listener_ = nullptr;
  std::string address_;
  uint64_t nonce_ = 0;
  std::string host_id_;
  bool shared_memory_allowed_ = false;
  // Same-host reads: on here (options.same_host_read), and the random value
  // whose address and value the HELLO advertises, which a peer reads back to
  // prove that it may read this process. Written by Init only.
  bool read_allowed_ = false;
  uint64_t read_cookie_ = 0;
  std::unique_ptr<RemoteReader> reader_;  // when read_allowed_

  // Held shared by every call that posts work, exclusively by Shutdown, so
  // no post races the rails' last drain.
  mutable std::shared_mutex api_mu_;
  std::atomic<bool> started_{false};
  std::atomic<bool> shut_{false};
  TransportCallbacks callbacks_;

  mutable std::mutex conns_mu_;
  std::condition_variable conns_cv_;
  std::unordered_map<PeerId, std::shared_ptr<Conn>> conns_;
  PeerId next_peer_ = 1;
  std::shared_mutex regions_mu_;
  std::map<uint64_t, std::vector<uint64_t>> regions_;  // start -> sizes

  // Rail 0.
  std::unordered_map<ucp_ep_h, PeerId> by_ep_;
  // Set when a shutdown's drain ended: from then on every teardown cuts
  // (sends cancelled, endpoints force-closed) and waits for no peer.
  bool hard_stop_ = false;
  std::unordered_set<ControlRequest*> control_requests_;
  std::vector<ControlRequest*> released_control_requests_;  // deleted after the workers

  std::atomic<uint64_t> write_ops_{0};
  std::atomic<uint64_t> write_bytes_{0};
  std::atomic<uint64_t> failed_write_ops_{0};
  std::atomic<uint64_t> read_ops_{0};
  std::atomic<uint64_t> read_bytes_{0};
  std::atomic<uint64_t> flushes_{0};
  std::atomic<uint64_t> messages_sent_{0};
  std::atomic<uint64_t> messages_received_{0};
};

// --- Rail -----------------------------------------------------------------

Rail::~Rail() {
  if (worker_ != nullptr) ucp_worker_destroy(worker_);
  if (wake_fd_ >= 0) close(wake_fd_);
  if (epoll_fd_ >= 0) close(epoll_fd_);
}

Status Rail::Init(ucp_context_h context) {
  ucp_worker_params_t params{};
  params.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  params.thread_mode = UCS_THREAD_MODE_SINGLE;
  ucs_status_t s = ucp_worker_create(context, &params, &worker_);
  if (s != UCS_OK) return UcsError(StatusCode::kUnavailable, "ucp_worker_create", s);
  ucp_address_t* address = nullptr;
  size_t length = 0;
  s = ucp_worker_get_address(worker_, &address, &length);
  if (s != UCS_OK) return UcsError(StatusCode::kUnavailable, "ucp_worker_get_address", s);
  const auto* begin = reinterpret_cast<const std::byte*>(address);
  address_.assign(begin, begin + length);
  ucp_worker_release_address(worker_, address);
  KVB_RETURN_IF_ERROR(SetAmHandler(worker_, kDataAmId, &Rail::OnData, this));
  s = ucp_worker_get_efd(worker_, &event_fd_);
  if (s != UCS_OK) return UcsError(StatusCode::kUnavailable, "ucp_worker_get_efd", s);
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
  if (wake_fd_ < 0 || epoll_fd_ < 0) {
    return UnavailableError(std::string("eventfd/epoll: ") + std::strerror(errno));
  }
  for (int fd : {event_fd_, wake_fd_}) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev) != 0) {
      return UnavailableError(std::string("epoll_ctl: ") + std::strerror(errno));
    }
  }
  return Status();
}

bool Rail::Post(std::function<void()> command) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return false;
    commands_.push_back(std::move(command));
  }
  // The rail's own thread runs its commands before it sleeps (ReadyToSleep).
  if (!OnDriverThread()) {
    const uint64_t one = 1;
    [[maybe_unused]] ssize_t n = write(wake_fd_, &one, sizeof(one));
  }
  return true;
}

Status Rail::StartThread() {
  // std::thread reports failure by throwing; the library reports Status.
  try {
    thread_ = std::thread([this] { Run(); });
  } catch (const std::system_error& e) {
    return ResourceExhaustedError("ucx: cannot start the progress thread of rail " +
                                  std::to_string(index_) + ": " + e.what());
  }
  started_ = true;
  return Status();
}

void Rail::StopAndJoin() {
  Post([this] {
    stopping_ = true;
    // Shutdown: whatever peer is still connected is cut off now.
    std::vector<PeerId> ids;
    for (auto& [id, peer] : peers_) ids.push_back(id);
    for (PeerId id : ids) AbortPeer(id, /*graceful=*/false, nullptr);
  });
  std::unique_lock<std::mutex> lock(drive_mu_);
  for (;;) {
    if (thread_.joinable()) {
      // Its own thread (or the one a detached source gave back) runs it to
      // the end.
      std::thread running = std::move(thread_);
      lock.unlock();
      running.join();
      lock.lock();
      continue;
    }
    if (finished_ || !started_) return;
    if (driven_ && !OnDriverThread()) {
      drive_cv_.wait(lock);  // the driver polls it to its end, or detaches
      continue;
    }
    // The driver itself shuts the transport down (between its polls: it
    // cannot wait for its own next poll), or a detached source could not
    // give the rail its thread back: the rest runs here.
    driven_ = false;
    lock.unlock();
    Run();
    return;
  }
}

bool Rail::RunCommands() {
  std::deque<std::function<void()>> batch;
  {
    std::lock_guard<std::mutex> lock(mu_);
    batch.swap(commands_);
  }
  for (auto& command : batch) command();
  return !batch.empty();
}

bool Rail::Quiesced() const {
  if (!work_.empty() || in_flight_ != 0) return false;
  for (const auto& [id, peer] : peers_) {
    if (peer.closing || (peer.ep != nullptr && peer.with_errors)) return false;
  }
  return index_ != 0 || engine_->ControlQuiesced();
}

Rail::Pass Rail::Step() {
  using Clock = std::chrono::steady_clock;
  bool busy = RunCommands();
  IssueWork();
  if (stopping_) {
    if (!stop_deadline_) stop_deadline_ = Clock::now() + std::chrono::seconds(2);
    if (Quiesced()) return Pass::kDone;
    if (Clock::now() > *stop_deadline_) {
      // A peer that stopped answering (alive, but not reading) never lets
      // a graceful close finish: hand what is left back to UCX, which
      // releases it with the worker.
      int closing = 0;
      for (auto& [id, peer] : peers_) {
        if (!peer.closing) continue;
        ++closing;
        peer.close_released = true;
        ucp_request_free(peer.close_request);
        peer.close_request = nullptr;
        peer.closing = false;
        peer.ep = nullptr;
      }
      if (index_ == 0) engine_->ReleaseControlRequests();
      Log(LogLevel::kWarning, "ucx: rail " + std::to_string(index_) + " stops after 2 s with " +
                                  std::to_string(in_flight_) + " operations in flight and " +
                                  std::to_string(closing) +
                                  " data endpoints closing; a peer stopped answering");
      return Pass::kDone;
    }
  }
  // Bounded, so commands (a peer's failure among them) are never starved
  // by a worker that always has something to retry.
  for (int i = 0; i < 64 && ucp_worker_progress(worker_) != 0; ++i) busy = true;
  return busy ? Pass::kBusy : Pass::kIdle;
}

bool Rail::ReadyToSleep() {
  if (!work_.empty() && in_flight_ < UcxTransport::kPutWindow) return false;
  if (!acks_.empty()) return false;
  {
    // A command this thread posted to itself wrote no wake-up.
    std::lock_guard<std::mutex> lock(mu_);
    if (!commands_.empty()) return false;
  }
  return ucp_worker_arm(worker_) != UCS_ERR_BUSY;
}

void Rail::Run() {
  using Clock = std::chrono::steady_clock;
  driver_.store(std::this_thread::get_id(), std::memory_order_relaxed);
  const std::chrono::microseconds poll = engine_->options().poll_before_sleep;
  Clock::time_point last_busy = Clock::now();
  for (;;) {
    const Pass pass = Step();
    if (pass == Pass::kDone) break;
    if (hand_over_now_) return;  // HandOver joins this thread
    if (pass == Pass::kBusy) {
      if (poll.count() > 0) last_busy = Clock::now();
      continue;
    }
    // Keep polling a while before sleeping (UcxTransportOptions::
    // poll_before_sleep): the next command or message of the same request
    // then needs no wake-up.
    if (poll.count() > 0 && !stopping_ && Clock::now() - last_busy < poll) {
      std::this_thread::yield();
      continue;
    }
    if (!ReadyToSleep()) continue;
    std::array<epoll_event, 2> events;
    const int timeout_ms = stopping_ ? 10 : -1;
    const int n = epoll_wait(epoll_fd_, events.data(), static_cast<int>(events.size()), timeout_ms);
    if (n < 0 && errno != EINTR) {
      Log(LogLevel::kError, std::string("ucx: epoll_wait: ") + std::strerror(errno));
    }
    uint64_t drained = 0;
    [[maybe_unused]] ssize_t r = read(wake_fd_, &drained, sizeof(drained));
  }
  Finish();
  hand_over_now_ = false;  // finished here: nothing is left to hand over
  {
    std::lock_guard<std::mutex> lock(drive_mu_);
    finished_ = true;
  }
  drive_cv_.notify_all();
}

void Rail::Finish() {
  if (index_ == 0) engine_->DestroyListener();
  // Nothing is received from here on.
  inbound_.clear();
  // Last drain: commands posted before the engine refused new ones run now,
  // against a stopped rail (they fail their work).
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (commands_.empty()) {
        closed_ = true;
        break;
      }
    }
    RunCommands();
  }
  for (auto& item : work_) FinishItem(item, AbortedError("transport shut down"), false);
  work_.clear();
  for (auto& [id, peer] : peers_) Abandon(id);
  // A driver that keeps waiting on the epoll fd must not be woken by a
  // worker that is done.
  for (int fd : {event_fd_, wake_fd_}) epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, fd, nullptr);
}

// The source a driver polls rail 0 through (UcxTransport::TakeProgressSource).
class RailSource final : public ProgressSource {
 public:
  explicit RailSource(std::shared_ptr<Engine> engine, Rail* rail)
      : engine_(std::move(engine)), rail_(rail) {}
  ~RailSource() override { rail_->Detach(); }
  int fd() const override { return rail_->epoll_fd(); }
  bool Poll() override { return rail_->DrivenPoll(); }
  bool PrepareToSleep(std::chrono::microseconds* max_sleep) override {
    return rail_->DrivenPrepareToSleep(max_sleep);
  }

 private:
  std::shared_ptr<Engine> engine_;  // keeps the rail alive
  Rail* const rail_;
};

std::unique_ptr<ProgressSource> Rail::HandOver(std::shared_ptr<Engine> engine) {
  // The engine's api_mu_ (held shared by the caller) keeps Shutdown, and so
  // StopAndJoin, out until this returned.
  std::thread running;
  {
    std::lock_guard<std::mutex> lock(drive_mu_);
    if (handed_over_ || finished_ || !thread_.joinable()) return nullptr;
    if (!Post([this] { hand_over_now_ = true; })) return nullptr;
    running = std::move(thread_);
  }
  running.join();
  std::lock_guard<std::mutex> lock(drive_mu_);
  if (!hand_over_now_ || finished_) return nullptr;  // it finished meanwhile
  hand_over_now_ = false;
  handed_over_ = true;
  driven_ = true;
  driver_.store(std::thread::id(), std::memory_order_relaxed);
  return std::make_unique<RailSource>(std::move(engine), this);
}

bool Rail::DrivenPoll() {
  {
    std::lock_guard<std::mutex> lock(drive_mu_);
    if (finished_ || !driven_) return false;
  }
  driver_.store(std::this_thread::get_id(), std::memory_order_relaxed);
  const Pass pass = Step();
  if (pass != Pass::kDone) return pass == Pass::kBusy;
  Finish();
  {
    std::lock_guard<std::mutex> lock(drive_mu_);
    finished_ = true;
  }
  drive_cv_.notify_all();
  return true;
}

bool Rail::DrivenPrepareToSleep(std::chrono::microseconds* max_sleep) {
  {
    std::lock_guard<std::mutex> lock(drive_mu_);
    if (finished_ || !driven_) return true;
  }
  // Drained before the last look at the commands: a Post after it wakes
  // the driver again.
  uint64_t drained = 0;
  [[maybe_unused]] ssize_t r = read(wake_fd_, &drained, sizeof(drained));
  if (!ReadyToSleep()) return false;
  // A stopping rail looks again every 10 ms (its 2 s deadline).
  if (stopping_) *max_sleep = std::min(*max_sleep, std::chrono::microseconds(10000));
  return true;
}

void Rail::Detach() {
  {
    std::lock_guard<std::mutex> lock(drive_mu_);
    if (!driven_) return;
    driven_ = false;
    if (!finished_) {
      // The rail gets its own thread back; without one, Shutdown runs what
      // is left on its caller's thread.
      driver_.store(std::thread::id(), std::memory_order_relaxed);
      Status started = StartThread();
      if (!started.ok()) Log(LogLevel::kError, std::string(started.message()));
    }
  }
  drive_cv_.notify_all();
}

void Rail::CreateDataEp(PeerId peer_id, const std::vector<std::byte>& remote_address,
                        bool with_errors) {
  RailPeer& peer = peers_[peer_id];
  if (peer.aborting || stopping_ || peer.ep != nullptr) return;
  peer.with_errors = with_errors;
  peer.err_arg = std::make_unique<EpErrorArg>(
      EpErrorArg{.engine = engine_, .rail = index_, .peer = peer_id, .control = false});
  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
  params.address = reinterpret_cast<const ucp_address_t*>(remote_address.data());
  params.err_mode = with_errors ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
  if (with_errors) {
    params.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLER;
    params.err_handler.cb = [](void* arg, ucp_ep_h, ucs_status_t status) {
      auto* a = static_cast<EpErrorArg*>(arg);
      a->engine->OnDataEpError(a->peer, status);
    };
    params.err_handler.arg = peer.err_arg.get();
  }
  const ucs_status_t s = ucp_ep_create(worker_, &params, &peer.ep);
  if (s != UCS_OK) {
    peer.ep = nullptr;
    engine_->OnDataEpError(peer_id, s);
    return;
  }
  // Wire the endpoint up now rather than on the first write: UCX 1.13 can
  // abort a process whose endpoint fails while wire-up messages are still
  // queued on it (a peer that disconnects right after its first write), so
  // the connection opens only once both sides' flushes have completed
  // (docs/transports.md, "Connections").
  ucp_request_param_t flush{};
  flush.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  flush.cb.send = &Rail::SendDone;
  flush.user_data = this;
  void* request = ucp_ep_flush_nbx(peer.ep, &flush);
  if (request == nullptr) {
    engine_->DataEpWired(peer_id);
  } else if (UCS_PTR_IS_ERR(request)) {
    engine_->OnDataEpError(peer_id, UCS_PTR_STATUS(request));
  } else {
    new (request) RequestContext{.peer = peer_id, .wiring = true};
    ++in_flight_;
    ++peer.outstanding;
    peer.requests.insert(request);
  }
}

void Rail::AcceptFrom(PeerId peer_id, uint64_t nonce) {
  RailPeer& peer = peers_[peer_id];
  peer.nonce = nonce;
  if (peer.aborting || stopping_) return;
  inbound_[nonce] = Inbound{.peer = peer_id, .accepting = true, .dropped = false};
}

ucs_status_t Rail::OnData(void* arg, const void* header, size_t header_length, void* data,
                          size_t length, const ucp_am_recv_param_t* param) {
  auto* rail = static_cast<Rail*>(arg);
  if (header_length != kDataHeaderBytes) return UCS_OK;
  const auto* h = static_cast<const std::byte*>(header);
  uint64_t nonce = 0;
  uint64_t value = 0;
  for (int i = 0; i < 8; ++i) {
    nonce |= static_cast<uint64_t>(h[1 + i]) << (8 * i);
    value |= static_cast<uint64_t>(h[9 + i]) << (8 * i);
  }
  auto it = rail->inbound_.find(nonce);
  // A peer this rail does not accept (unknown, or fenced): dropped.
  if (it == rail->inbound_.end() || !it->second.accepting) return UCS_OK;
  Inbound& in = it->second;
  switch (static_cast<DataKind>(h[0])) {
    case DataKind::kData:
      if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0 ||
          !rail->engine_->CopyIn(value, data, length)) {
        in.dropped = true;
      }
      return UCS_OK;
    case DataKind::kFlush: {
      // Answered after this progress call (UCX is not re-entered from its
      // own callback). The answer orders the copies before it.
      TsanRelease(&g_shm_order);
      rail->acks_.push_back(PendingAck{.peer = in.peer, .seq = value, .ok = !in.dropped});
      in.dropped = false;
      return UCS_OK;
    }
    case DataKind::kFlushAck:
    case DataKind::kFlushNack: {
      // Only the peer the flush went to answers it.
      auto pending = rail->pending_flushes_.find(value);
      if (pending == rail->pending_flushes_.end() || pending->second.peer != in.peer) {
        return UCS_OK;
      }
      TsanAcquire(&g_shm_order);
      rail->FlushAcked(value, static_cast<DataKind>(h[0]) == DataKind::kFlushAck);
      return UCS_OK;
    }
  }
  return UCS_OK;
}

void Rail::IssueAcks() {
  std::vector<PendingAck> acks;
  acks.swap(acks_);
  for (const PendingAck& ack : acks) {
    auto it = peers_.find(ack.peer);
    // A connection ending: the flushing side's teardown fails the flush.
    if (it == peers_.end() || it->second.aborting || it->second.ep == nullptr || stopping_) {
      continue;
    }
    RailPeer& peer = it->second;
    auto pieces = std::make_shared<std::vector<Piece>>(1);
    (*pieces)[0].header =
        DataHeader(ack.ok ? DataKind::kFlushAck : DataKind::kFlushNack, engine_->nonce(), ack.seq);
    const ucp_request_param_t param = EagerSendParam();
    void* request = ucp_am_send_nbx(peer.ep, kDataAmId, (*pieces)[0].header.data(),
                                    kDataHeaderBytes, nullptr, 0, &param);
    // A failed send fails the endpoint too (its error handler, or the
    // control endpoint's for shared memory, tears the connection down).
    if (request == nullptr || UCS_PTR_IS_ERR(request)) continue;
    new (request) RequestContext{.pieces = std::move(pieces), .peer = ack.peer, .message = true};
    ++in_flight_;
    ++peer.outstanding;
    peer.requests.insert(request);
  }
}

void Rail::Enqueue(WorkItem item) {
  auto it = peers_.find(item.peer);
  if (stopping_) {
    FinishItem(item, AbortedError("transport shut down"), false);
    return;
  }
  if (it == peers_.end() || it->second.aborting || it->second.ep == nullptr) {
    FinishItem(item, UnavailableError("connection to peer " + std::to_string(item.peer) +
                                      " is closed"),
               false);
    return;
  }
  work_.push_back(std::move(item));
}

void Rail::FinishItem(WorkItem& item, const Status& status, bool skipped) {
  if (item.flush) {
    std::shared_ptr<Countdown> flush = std::move(item.flush);
    flush->Fail(status.ok() ? AbortedError("flush dropped") : status);
    flush->Arrive();
    return;
  }
  const int64_t left = static_cast<int64_t>(item.pieces->size() - item.next);
  item.next = item.pieces->size();
  if (left == 0) return;
  if (skipped) {
    item.batch->countdown.MarkSkipped();
  } else {
    item.batch->countdown.Fail(status);
  }
  item.batch->countdown.Arrive(left);
}

void Rail::IssueWork() {
  if (!acks_.empty()) IssueAcks();
  while (!work_.empty() && in_flight_ < UcxTransport::kPutWindow) {
    WorkItem& item = work_.front();
    auto it = peers_.find(item.peer);
    if (it == peers_.end() || it->second.aborting || it->second.ep == nullptr) {
      FinishItem(item,
                 UnavailableError("connection to peer " + std::to_string(item.peer) + " closed"),
                 false);
      work_.pop_front();
      continue;
    }
    if (item.flush) {
      std::shared_ptr<Countdown> flush = std::move(item.flush);
      const PeerId peer = item.peer;
      work_.pop_front();
      IssueFlush(peer, std::move(flush));
      continue;
    }
    if (item.batch->stop.stop_requested()) {
      FinishItem(item, Status(), /*skipped=*/true);
      work_.pop_front();
      continue;
    }
    RailPeer& peer = it->second;
    const Piece& piece = (*item.pieces)[item.next++];
    const ucp_request_param_t param = EagerSendParam();
    engine_->CountPut(piece.bytes);
    void* request = ucp_am_send_nbx(peer.ep, kDataAmId, piece.header.data(), kDataHeaderBytes,
                                    piece.src, piece.bytes, &param);
    if (request == nullptr) {
      item.batch->countdown.Arrive();
    } else if (UCS_PTR_IS_ERR(request)) {
      engine_->CountFailedPut();
      item.batch->countdown.Fail(
          UcsError(StatusCode::kUnavailable, "ucp_am_send_nbx", UCS_PTR_STATUS(request)));
      item.batch->countdown.Arrive();
    } else {
      new (request) RequestContext{.batch = item.batch,
                                   .pieces = item.pieces,
                                   .peer = item.peer,
                                   .flush_seq = 0};
      ++in_flight_;
      ++peer.outstanding;
      peer.requests.insert(request);
    }
    if (item.next == item.pieces->size()) work_.pop_front();
  }
}

void Rail::SendDone(void* request, ucs_status_t status, void* user_data) {
  static_cast<Rail*>(user_data)->Completed(request, status);
}

void Rail::Completed(void* request, ucs_status_t status) {
  auto* context = static_cast<RequestContext*>(request);
  RequestContext taken = std::move(*context);
  context->~RequestContext();
  if (taken.abandoned) return;  // released already
  ucp_request_free(request);
  --in_flight_;
  auto it = peers_.find(taken.peer);
  if (it != peers_.end()) {
    --it->second.outstanding;
    it->second.requests.erase(request);
  }
  if (taken.wiring) {
    if (status == UCS_OK) {
      engine_->DataEpWired(taken.peer);
    } else {
      engine_->OnDataEpError(taken.peer, status);
    }
  } else if (taken.message) {
    // It left (or failed with its endpoint): nothing waits for it.
  } else if (taken.flush_seq != 0) {
    // The flush message left; its ack settles the flush, unless it failed.
    if (status != UCS_OK) {
      FlushAcked(taken.flush_seq, false);
    }
  } else {
    if (status != UCS_OK) {
      engine_->CountFailedPut();
      taken.batch->countdown.Fail(UcsError(StatusCode::kUnavailable, "send", status));
    }
    taken.batch->countdown.Arrive();
  }
  if (it != peers_.end() && it->second.aborting) CheckFence(taken.peer);
}

void Rail::Flush(PeerId peer_id, std::shared_ptr<Countdown> countdown) {
  WorkItem item;
  item.flush = std::move(countdown);
  item.peer = peer_id;
  Enqueue(std::move(item));
}

void Rail::IssueFlush(PeerId peer_id, std::shared_ptr<Countdown> countdown) {
  RailPeer& peer = peers_[peer_id];
  const uint64_t seq = next_flush_seq_++;
  pending_flushes_[seq] = PendingFlush{.peer = peer_id, .countdown = std::move(countdown)};
  ++peer.outstanding;
  auto pieces = std::make_shared<std::vector<Piece>>(1);
  (*pieces)[0].header = DataHeader(DataKind::kFlush, engine_->nonce(), seq);
  const ucp_request_param_t param = EagerSendParam();
  void* request = ucp_am_send_nbx(peer.ep, kDataAmId, (*pieces)[0].header.data(),
                                  kDataHeaderBytes, nullptr, 0, &param);
  if (UCS_PTR_IS_ERR(request)) {
    FlushAcked(seq, false);
  } else if (request != nullptr) {
    new (request) RequestContext{.batch = nullptr,
                                 .pieces = std::move(pieces),
                                 .peer = peer_id,
                                 .flush_seq = seq};
    ++in_flight_;
    ++peer.outstanding;
    peer.requests.insert(request);
  }
}

void Rail::FlushAcked(uint64_t seq, bool ok) {
  auto it = pending_flushes_.find(seq);
  if (it == pending_flushes_.end()) return;  // failed already
  PendingFlush pending = std::move(it->second);
  pending_flushes_.erase(it);
  auto peer = peers_.find(pending.peer);
  if (peer != peers_.end()) --peer->second.outstanding;
  if (!ok) {
    pending.countdown->Fail(FailedPreconditionError(
        "a write to peer " + std::to_string(pending.peer) +
        " did not land: its target is not a registered region of the peer (any more), or the "
        "flush could not be sent"));
  }
  pending.countdown->Arrive();
  if (peer != peers_.end() && peer->second.aborting) CheckFence(pending.peer);
}

void Rail::FailPendingFlushes(PeerId peer_id, const Status& status) {
  RailPeer& peer = peers_[peer_id];
  for (auto it = pending_flushes_.begin(); it != pending_flushes_.end();) {
    if (it->second.peer != peer_id) {
      ++it;
      continue;
    }
    std::shared_ptr<Countdown> countdown = std::move(it->second.countdown);
    it = pending_flushes_.erase(it);
    --peer.outstanding;
    countdown->Fail(status);
    countdown->Arrive();
  }
}

void Rail::AbortPeer(PeerId peer_id, bool graceful, std::function<void()> fenced) {
  RailPeer& peer = peers_[peer_id];
  if (fenced) peer.on_fenced = std::move(fenced);
  const Status closed =
      UnavailableError("connection to peer " + std::to_string(peer_id) + " closed");
  if (!peer.aborting) {
    peer.aborting = true;
    // Nothing of the peer lands here from now on: the receiving half of the
    // fence, whatever the peer still sends.
    auto in = inbound_.find(peer.nonce);
    if (in != inbound_.end() && in->second.peer == peer_id) inbound_.erase(in);
    // Queued sends to the peer are never started; flushes awaiting an ack
    // will not get one.
    for (auto it = work_.begin(); it != work_.end();) {
      if (it->peer == peer_id) {
        FinishItem(*it, closed, false);
        it = work_.erase(it);
      } else {
        ++it;
      }
    }
    FailPendingFlushes(peer_id, closed);
  }
  // The sending half: a live peer lets the sends in flight complete; a gone
  // one (or a shutdown) has them cancelled or abandoned.
  if (!graceful || stopping_) {
    if (peer.with_errors) {
      ClosePeer(peer_id, /*peer_alive=*/false);
    } else {
      Abandon(peer_id);
    }
  }
  CheckFence(peer_id);
}

void Rail::ClosePeer(PeerId peer_id, bool peer_alive) {
  RailPeer& peer = peers_[peer_id];
  peer.aborting = true;
  if (peer.ep == nullptr || peer.closing) return;
  if (!peer.with_errors && !peer_alive) {
    // UCX cannot force-close an endpoint without error handling; the worker
    // releases it when the transport stops.
    CheckFence(peer_id);
    return;
  }
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  param.cb.send = &Rail::CloseDone;
  param.user_data = &peer;  // RailPeer nodes are stable in an unordered_map
  if (peer.with_errors) {
    param.op_attr_mask |= UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = UCP_EP_CLOSE_FLAG_FORCE;
  }
  void* request = ucp_ep_close_nbx(peer.ep, &param);
  if (request == nullptr || UCS_PTR_IS_ERR(request)) {
    peer.ep = nullptr;
  } else {
    peer.closing = true;
    peer.close_request = request;
  }
  CheckFence(peer_id);
}

void Rail::Abandon(PeerId peer_id) {
  RailPeer& peer = peers_[peer_id];
  peer.abandoned = true;
  for (void* request : peer.requests) {
    auto* context = static_cast<RequestContext*>(request);
    context->abandoned = true;
    // Released now: UCX may destroy the endpoint (and the worker) with it
    // still pending and never complete it. UCX may still read the message
    // header (a send it replays), so the pieces live until the worker is
    // gone; the context keeps nothing that needs freeing.
    ucp_request_free(request);
    if (context->pieces) abandoned_pieces_.push_back(std::move(context->pieces));
    if (context->batch) {
      engine_->CountFailedPut();
      context->batch->countdown.Fail(UnavailableError(
          "connection to peer " + std::to_string(peer_id) + " closed with the write in flight"));
      context->batch->countdown.Arrive();
      context->batch.reset();
    }
    --in_flight_;
    --peer.outstanding;
  }
  peer.requests.clear();
  FailPendingFlushes(peer_id, UnavailableError("connection to peer " + std::to_string(peer_id) +
                                               " closed"));
  CheckFence(peer_id);
}

void Rail::CloseDone(void* request, ucs_status_t /*status*/, void* user_data) {
  auto* peer = static_cast<RailPeer*>(user_data);
  if (peer->close_released) return;  // handed back at a stop
  ucp_request_free(request);
  peer->close_request = nullptr;
  peer->closing = false;
  peer->ep = nullptr;
  // The fence check runs from the loop (CheckFence needs the peer id); a
  // command keeps it out of the UCX callback.
  if (peer->err_arg) {
    Rail& rail = peer->err_arg->engine->rail(peer->err_arg->rail);
    const PeerId id = peer->err_arg->peer;
    rail.Post([&rail, id] { rail.CheckFence(id); });
  }
}

void Rail::CheckFence(PeerId peer_id) {
  auto it = peers_.find(peer_id);
  if (it == peers_.end()) return;
  RailPeer& peer = it->second;
  if (!peer.aborting || peer.outstanding != 0 || !peer.on_fenced) return;
  std::function<void()> fenced = std::move(peer.on_fenced);
  peer.on_fenced = nullptr;
  fenced();
}

// --- RemoteReader -----------------------------------------------------------

Status RemoteReader::Start() {
  // std::thread reports failure by throwing; the library reports Status.
  try {
    thread_ = std::thread([this] { Run(); });
  } catch (const std::system_error& e) {
    return ResourceExhaustedError(std::string("ucx: cannot start the reader thread: ") + e.what());
  }
  return Status();
}

bool RemoteReader::Post(ReadJob& job) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return false;
    queue_.push_back(std::move(job));
    posted_.fetch_add(1, std::memory_order_release);
  }
  cv_.notify_one();
  return true;
}

void RemoteReader::StopAndJoin() {
  aborting_.store(true, std::memory_order_release);
  {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void RemoteReader::Run() {
  uint64_t taken = 0;  // jobs this thread took from the queue
  for (bool ran = false;; ran = true) {
    if (ran && poll_.count() > 0) {
      // Poll for the next job a while before sleeping (a request's next
      // read then needs no wake-up), yielding the core between looks.
      const auto until = std::chrono::steady_clock::now() + poll_;
      while (posted_.load(std::memory_order_acquire) == taken &&
             !aborting_.load(std::memory_order_acquire) &&
             std::chrono::steady_clock::now() < until) {
        std::this_thread::yield();
      }
    }
    ReadJob job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return !queue_.empty() || closed_; });
      if (queue_.empty()) return;  // closed and drained
      job = std::move(queue_.front());
      queue_.pop_front();
      ++taken;
    }
    Execute(job);
  }
}

void RemoteReader::Execute(ReadJob& job) {
  Conn& conn = *job.conn;
  const size_t num_ops = job.ops.size();
  const std::string what =
      "read from " + conn.where + " (pid " + std::to_string(conn.peer_pid) + ")";
  size_t ops_read = 0;  // ops read whole
  uint64_t bytes_read = 0;
  auto skipped = [&] {
    return std::to_string(num_ops - ops_read) + " of " + std::to_string(num_ops) + " ops (" +
           std::to_string(job.bytes - bytes_read) + " of " + std::to_string(job.bytes) +
           " bytes) not read";
  };
  std::array<iovec, kMaxReadRanges> local;
  std::array<iovec, kMaxReadRanges> remote;
  Status status;
  size_t next = 0;      // the first op not yet handed to a call
  uint64_t offset = 0;  // how much of ops[next] was
  while (next < num_ops) {
    // Between pieces: a shutdown, the connection's end, a stop.
    if (aborting_.load(std::memory_order_acquire)) {
      status = AbortedError("ucx: the transport shut down: " + what + " ended, " + skipped());
      break;
    }
    if (conn.reads_closed.load(std::memory_order_acquire)) {
      status = UnavailableError("ucx: connection to " + conn.where + " closed: " + what +
                                " ended, " + skipped());
      break;
    }
    if (job.stop.stop_requested()) {
      status = CancelledError("ucx: " + what + " stopped: " + skipped());
      break;
    }
    // One piece: up to kMaxReadRanges ranges and piece_bytes_ bytes.
    size_t count = 0;
    uint64_t total = 0;
    size_t ends = 0;  // ops this piece completes
    while (next < num_ops && count < kMaxReadRanges && total < piece_bytes_) {
      const ReadOp& op = job.ops[next];
      const uint64_t n = std::min(op.bytes - offset, piece_bytes_ - total);
      if (n > 0) {
        local[count] = {.iov_base = (op.dst + offset).ToPointer(), .iov_len = n};
        remote[count] = {.iov_base = (op.src + offset).ToPointer(), .iov_len = n};
        ++count;
        total += n;
      }
      offset += n;
      if (offset == op.bytes) {
        ++next;
        offset = 0;
        ++ends;
      }
    }
    if (const int error = ReadVectors(conn.peer_pid, local.data(), remote.data(), count, total);
        error != 0) {
      const std::string text = "ucx: " + what + ": process_vm_readv: " + ErrnoText(error);
      if (error == ESRCH) {
        status = UnavailableError(text + " (the peer process is gone); " + skipped());
      } else if (error == EFAULT) {
        status = FailedPreconditionError(text + " (the peer's range is not mapped: freed?); " +
                                         skipped());
      } else if (error == ENOMEM) {
        status = ResourceExhaustedError(text + "; " + skipped());
      } else {
        status = UnavailableError(text + "; " + skipped());
      }
      break;
    }
    // What a pid names once its process exited is not the peer.
    if (ProcessExited(conn.peer_pidfd.get())) {
      status = UnavailableError("ucx: " + what + ": the peer process exited; " + skipped());
      break;
    }
    ops_read += ends;
    bytes_read += total;
    engine_->CountRead(ends, total);
  }
  // The target's use ends before `done`, so the callback may deregister it.
  job.use->Release();
  job.use.reset();
  TransportDone done = std::move(job.done);
  done(std::move(status));
  engine_->ReadEnded(job.conn);
}

// --- Regions ----------------------------------------------------------------

class UcxLocalRegion final : public LocalRegion {
 public:
  UcxLocalRegion(std::shared_ptr<Engine> engine, RegionInfo info)
      : engine_(std::move(engine)), info_(std::move(info)), use_(std::make_shared<RegionUse>()) {
    describe_ = "ucx region " + std::to_string(info_.address.value()) + "+" +
                std::to_string(info_.size);
  }
  ~UcxLocalRegion() override {
    // No data message lands in it once this returns (a copy in progress is
    // waited for)...
    engine_->RemoveRegion(info_.address.value(), info_.size);
    // ...and no write of ours reads from it, no read of ours writes into it.
    std::unique_lock<std::mutex> lock(use_->mu);
    use_->cv.wait(lock, [this] { return use_->uses == 0; });
  }
  const RegionInfo& info() const override { return info_; }
  std::string_view Describe() const override { return describe_; }
  const Engine* engine() const { return engine_.get(); }
  const std::shared_ptr<RegionUse>& use() const { return use_; }

 private:
  std::shared_ptr<Engine> engine_;
  RegionInfo info_;
  std::shared_ptr<RegionUse> use_;
  std::string describe_;
};

class UcxRemoteRegion final : public RemoteRegion {
 public:
  UcxRemoteRegion(std::shared_ptr<Engine> engine, PeerId peer, RegionInfo info)
      : engine_(std::move(engine)), peer_(peer), info_(std::move(info)) {}
  PeerId peer() const override { return peer_; }
  const RegionInfo& info() const override { return info_; }
  Addr mapped_address() const override { return Addr(); }
  const Engine* engine() const { return engine_.get(); }

 private:
  std::shared_ptr<Engine> engine_;
  PeerId peer_;
  RegionInfo info_;
};

// --- Engine -----------------------------------------------------------------

Engine::~Engine() {
  Shutdown();
  DestroyListener();
  rails_.clear();  // destroys the workers: no UCX callback runs after this
  for (ControlRequest* pending : released_control_requests_) delete pending;
  if (context_ != nullptr) ucp_cleanup(context_);
}

Status Engine::Init() {
  if (options_.num_workers < 1 || options_.num_workers > Config::kMaxNumWorkers) {
    return InvalidArgumentError("num_workers = " + std::to_string(options_.num_workers) +
                                ": must be in [1, " + std::to_string(Config::kMaxNumWorkers) +
                                "]");
  }
  if (options_.put_chunk_bytes != 0) {
    if (options_.put_chunk_bytes < UcxTransport::kMinPutChunkBytes ||
        options_.put_chunk_bytes > UcxTransport::kMaxPutChunkBytes) {
      return InvalidArgumentError("put_chunk_bytes = " + std::to_string(options_.put_chunk_bytes) +
                                  ": must be 0 (the default) or in [4 KiB, 1 GiB]");
    }
    put_chunk_ = options_.put_chunk_bytes;
  }
  if (options_.poll_before_sleep.count() < 0 ||
      options_.poll_before_sleep.count() > Config::kMaxPollUs) {
    return InvalidArgumentError(
        "poll_before_sleep = " + std::to_string(options_.poll_before_sleep.count()) +
        " µs: must be in [0, " + std::to_string(Config::kMaxPollUs) + "]");
  }
  if (options_.connect_timeout.count() <= 0 ||
      options_.connect_timeout.count() > Config::kMaxTimeoutMs) {
    return InvalidArgumentError("connect_timeout must be in (0, " +
                                std::to_string(Config::kMaxTimeoutMs) + "] ms");
  }
  KVB_ASSIGN_OR_RETURN(HostPort listen, ParseHostPort(options_.listen_address));

  ucp_config_t* config = nullptr;
  ucs_status_t s = ucp_config_read(nullptr, nullptr, &config);
  if (s != UCS_OK) return UcsError(StatusCode::kUnavailable, "ucp_config_read", s);
  // Host memory only, never registered with UCX: the memory-type cache has
  // nothing to learn.
  if (std::getenv("UCX_MEMTYPE_CACHE") == nullptr) {
    (void)ucp_config_modify(config, "MEMTYPE_CACHE", "n");
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_REQUEST_SIZE |
                      UCP_PARAM_FIELD_MT_WORKERS_SHARED | UCP_PARAM_FIELD_NAME;
  params.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  params.request_size = sizeof(RequestContext);
  params.mt_workers_shared = 1;
  params.name = "kvbounce";
  s = ucp_init(&params, config, &context_);
  ucp_config_release(config);
  if (s != UCS_OK) {
    context_ = nullptr;
    return UcsError(StatusCode::kUnavailable, "ucp_init", s);
  }
  for (int i = 0; i < options_.num_workers; ++i) {
    rails_.push_back(std::make_unique<Rail>(this, i));
    KVB_RETURN_IF_ERROR(rails_.back()->Init(context_));
  }

  // The transport's identity, and whether same-host peers may share memory.
  const auto now = std::chrono::steady_clock::now().time_since_epoch().count();
  nonce_ = (static_cast<uint64_t>(getpid()) << 40) ^ static_cast<uint64_t>(now) ^
           reinterpret_cast<uintptr_t>(this);
  host_id_ = HostIdentity();
  shared_memory_allowed_ = options_.same_host_shared_memory && EnvAllowsSharedMemory();
  // A UCX_TLS naming no same-host transport asks for what two hosts would
  // do: no shortcut through this host's memory, reads included.
  read_allowed_ = options_.same_host_read && EnvAllowsSharedMemory();
  if (read_allowed_) {
    std::random_device random;
    read_cookie_ = ((static_cast<uint64_t>(random()) << 32) ^ random() ^ nonce_) | 1;
    reader_ = std::make_unique<RemoteReader>(this, put_chunk_, options_.poll_before_sleep);
    KVB_RETURN_IF_ERROR(reader_->Start());
  }

  // The listener, on rail 0.
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const std::string port = std::to_string(listen.port);
  if (getaddrinfo(listen.host.c_str(), port.c_str(), &hints, &found) != 0 || found == nullptr) {
    return UnavailableError("cannot resolve listen address '" + options_.listen_address + "'");
  }
  ucp_listener_params_t lp{};
  lp.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
  lp.sockaddr.addr = found->ai_addr;
  lp.sockaddr.addrlen = found->ai_addrlen;
  lp.conn_handler.cb = &Engine::OnConnRequest;
  lp.conn_handler.arg = this;
  s = ucp_listener_create(rails_[0]->worker(), &lp, &listener_);
  freeaddrinfo(found);
  if (s != UCS_OK) {
    listener_ = nullptr;
    return UcsError(StatusCode::kUnavailable,
                    "cannot listen at '" + options_.listen_address + "' (ucp_listener_create)", s);
  }
  ucp_listener_attr_t attr{};
  attr.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
  s = ucp_listener_query(listener_, &attr);
  if (s != UCS_OK) return UcsError(StatusCode::kUnavailable, "ucp_listener_query", s);
  uint16_t bound_port = 0;
  if (attr.sockaddr.ss_family == AF_INET) {
    bound_port = ntohs(reinterpret_cast<const sockaddr_in*>(&attr.sockaddr)->sin_port);
  } else if (attr.sockaddr.ss_family == AF_INET6) {
    bound_port = ntohs(reinterpret_cast<const sockaddr_in6*>(&attr.sockaddr)->sin6_port);
  }
  std::string host = listen.host;
  if (host == "0.0.0.0" || host == "::") {
    std::array<char, 256> name{};
    host = gethostname(name.data(), name.size() - 1) == 0 ? std::string(name.data()) : "127.0.0.1";
  }
  address_ = (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" +
             std::to_string(bound_port);

  KVB_RETURN_IF_ERROR(SetAmHandler(rails_[0]->worker(), kAmId, &Engine::OnAm, this));
  for (auto& rail : rails_) KVB_RETURN_IF_ERROR(rail->StartThread());
  return Status();
}

TransportCaps Engine::Caps() const {
  TransportCaps caps;
  caps.name = "ucx";
  caps.host_memory = true;
  caps.device_memory = false;
  caps.map_remote = false;
  // Read completions run on the reader thread, beside the rails.
  caps.concurrent_callbacks = rails_.size() > 1 || read_allowed_;
  caps.pending_writes_fail = false;
  caps.cost = kTcpCost;
  // Some peers (same host, probe passed) may be read; PeerCaps says which.
  caps.read_remote = read_allowed_;
  if (read_allowed_) caps.read_cost = kCrossMemoryReadCost;
  return caps;
}

Result<TransportCaps> Engine::PeerCaps(PeerId peer) const {
  std::shared_ptr<Conn> conn = FindConn(peer);
  if (!conn) return NotFoundError("unknown peer " + std::to_string(peer));
  TransportCaps caps = Caps();
  std::lock_guard<std::mutex> lock(conns_mu_);
  if (conn->shared_memory) caps.cost = kSharedMemoryCost;
  caps.read_remote = conn->read_remote;
  return caps;
}

Status Engine::Start(TransportCallbacks callbacks) {
  std::unique_lock<std::shared_mutex> lock(api_mu_);
  if (shut_) return AbortedError("the ucx transport is shut down");
  if (started_) return FailedPreconditionError("the ucx transport is already started");
  callbacks_ = std::move(callbacks);
  started_ = true;
  return Status();
}

std::shared_ptr<Conn> Engine::FindConn(PeerId peer) const {
  std::lock_guard<std::mutex> lock(conns_mu_);
  auto it = conns_.find(peer);
  return it == conns_.end() ? nullptr : it->second;
}

std::shared_ptr<Conn> Engine::NewConn(bool outgoing, std::string where) {
  auto conn = std::make_shared<Conn>();
  conn->outgoing = outgoing;
  conn->where = std::move(where);
  std::lock_guard<std::mutex> lock(conns_mu_);
  conn->id = next_peer_++;
  conns_.emplace(conn->id, conn);
  return conn;
}

void Engine::SetState(Conn& conn, int state) {
  {
    std::lock_guard<std::mutex> lock(conns_mu_);
    conn.state.store(state, std::memory_order_release);
  }
  conns_cv_.notify_all();
}

Result<PeerId> Engine::Connect(std::string_view address) {
  KVB_ASSIGN_OR_RETURN(HostPort target, ParseHostPort(address));
  if (!started_) return FailedPreconditionError("Connect before Start");
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const std::string port = std::to_string(target.port);
  if (target.port == 0) return InvalidArgumentError("address '" + std::string(address) +
                                                    "': port 0 names no listener");
  if (getaddrinfo(target.host.c_str(), port.c_str(), &hints, &found) != 0 || found == nullptr) {
    return UnavailableError("cannot resolve host of '" + std::string(address) + "'");
  }
  sockaddr_storage storage{};
  const socklen_t length = found->ai_addrlen;
  std::memcpy(&storage, found->ai_addr, found->ai_addrlen);
  freeaddrinfo(found);

  std::shared_ptr<Conn> conn;
  {
    std::shared_lock<std::shared_mutex> lock(api_mu_);
    if (shut_) return AbortedError("the ucx transport is shut down");
    conn = NewConn(true, std::string(address));
    rails_[0]->Post([this, conn, storage, length] { StartConnect(conn, storage, length); });
  }
  std::unique_lock<std::mutex> lock(conns_mu_);
  const bool settled = conns_cv_.wait_for(lock, options_.connect_timeout, [&] {
    return conn->state.load() != Conn::kHandshake;
  });
  if (settled && conn->state.load() == Conn::kOpen) return conn->id;
  Status error = conn->connect_error;
  lock.unlock();
  if (!settled) {
    error = UnavailableError(
        "no complete transport handshake (HELLO, then both sides' data "
        "endpoints wired up) with '" +
        std::string(address) + "' within " + std::to_string(options_.connect_timeout.count()) +
        " ms");
    std::shared_lock<std::shared_mutex> api(api_mu_);
    if (!shut_) {
      rails_[0]->Post([this, conn, error] { BeginTeardown(conn, error, false); });
    }
  }
  if (error.ok()) error = UnavailableError("connection to '" + std::string(address) + "' closed");
  return error;
}

void Engine::StartConnect(const std::shared_ptr<Conn>& conn, sockaddr_storage addr,
                          socklen_t len) {
  if (conn->teardown) return;
  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR;
  params.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
  params.sockaddr.addr = reinterpret_cast<const sockaddr*>(&addr);
  params.sockaddr.addrlen = len;
  if (CreateControlEp(conn, params, "cannot reach '" + conn->where + "'")) {
    SendMessage(conn, MsgType::kHello, HelloMessage());
  }
}

bool Engine::CreateControlEp(const std::shared_ptr<Conn>& conn, ucp_ep_params_t params,
                             const std::string& what) {
  conn->ctrl_err_arg = std::make_unique<EpErrorArg>(
      EpErrorArg{.engine = this, .rail = 0, .peer = conn->id, .control = true});
  params.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
  params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  params.err_handler.cb = &Engine::OnEpError;
  params.err_handler.arg = conn->ctrl_err_arg.get();
  const ucs_status_t s = ucp_ep_create(rails_[0]->worker(), &params, &conn->ctrl_ep);
  if (s != UCS_OK) {
    conn->ctrl_ep = nullptr;
    conn->ctrl_failed = true;
    BeginTeardown(conn, UcsError(StatusCode::kUnavailable, what, s), false);
    return false;
  }
  by_ep_[conn->ctrl_ep] = conn->id;
  return true;
}

void Engine::OnConnRequest(ucp_conn_request_h request, void* arg) {
  auto* engine = static_cast<Engine*>(arg);
  engine->rails_[0]->Post([engine, request] { engine->AcceptConn(request); });
}

void Engine::AcceptConn(ucp_conn_request_h request) {
  // Peers are accepted from Start on (transport.h).
  if (shut_ || !started_.load(std::memory_order_acquire)) {
    ucp_listener_reject(listener_, request);
    return;
  }
  std::shared_ptr<Conn> conn = NewConn(false, "incoming peer");
  conn->where = "peer " + std::to_string(conn->id);
  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST;
  params.conn_request = request;
  CreateControlEp(conn, params, "cannot accept a connection");
}

std::vector<std::byte> Engine::HelloMessage() const {
  Writer w;
  w.U32(kHelloMagic);
  w.U16(kHelloVersion);
  w.U64(nonce_);
  w.Blob(AsBytes(host_id_));
  w.U8(shared_memory_allowed_ ? 1 : 0);
  // Same-host reads: offered or not, this process's pid, and where to find
  // which cookie (0, 0 when not offered).
  w.U8(read_allowed_ ? 1 : 0);
  w.U32(static_cast<uint32_t>(getpid()));
  w.U64(read_allowed_ ? reinterpret_cast<uintptr_t>(&read_cookie_) : 0);
  w.U64(read_allowed_ ? read_cookie_ : 0);
  w.U16(static_cast<uint16_t>(rails_.size()));
  for (const auto& rail : rails_) w.Blob(rail->address());
  return w.Take();
}

bool Engine::SendMessage(const std::shared_ptr<Conn>& conn, MsgType type,
                         std::vector<std::byte> body) {
  if (conn->ctrl_ep == nullptr || conn->ctrl_failed) return false;
  auto pending = std::make_unique<ControlRequest>();
  pending->engine = this;
  pending->buffer = std::move(body);
  static_assert(sizeof(MsgType) == 1);
  static const std::array<MsgType, 6> kHeaders = {
      MsgType{0}, MsgType::kHello, MsgType::kFrame, MsgType::kFenced, MsgType{4}, MsgType::kWired};
  ucp_request_param_t param{};
  param.op_attr_mask =
      UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
  param.flags = UCP_AM_SEND_FLAG_EAGER | UCP_AM_SEND_FLAG_REPLY;
  param.cb.send = &Engine::ControlDone;
  param.user_data = pending.get();
  void* request = ucp_am_send_nbx(conn->ctrl_ep, kAmId, &kHeaders[static_cast<size_t>(type)], 1,
                                  pending->buffer.data(), pending->buffer.size(), &param);
  if (request == nullptr) return true;
  if (UCS_PTR_IS_ERR(request)) {
    BeginTeardown(conn, UcsError(StatusCode::kUnavailable, "ucp_am_send_nbx", UCS_PTR_STATUS(request)),
                  false);
    return false;
  }
  // A failed send also fails the control endpoint, whose error handler
  // tears the connection down; ControlDone only ends the request.
  pending->request = request;
  control_requests_.insert(pending.release());
  return true;
}

void Engine::ControlDone(void* request, ucs_status_t /*status*/, void* user_data) {
  auto* pending = static_cast<ControlRequest*>(user_data);
  if (pending->released) return;  // the engine deletes it after the worker
  pending->engine->control_requests_.erase(pending);
  ucp_request_free(request);
  delete pending;
}

void Engine::ReleaseControlRequests() {
  for (ControlRequest* pending : control_requests_) {
    // UCX frees the request when (if ever) it completes; `pending` stays
    // until the worker is gone, since a late completion still names it.
    pending->released = true;
    ucp_request_free(pending->request);
    released_control_requests_.push_back(pending);
  }
  control_requests_.clear();
}

ucs_status_t Engine::OnAm(void* arg, const void* header, size_t header_length, void* data,
                          size_t length, const ucp_am_recv_param_t* param) {
  auto* engine = static_cast<Engine*>(arg);
  if (header_length != 1 || (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) == 0 ||
      (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0) {
    Log(LogLevel::kWarning, "ucx: dropped a control message of unexpected shape");
    return UCS_OK;
  }
  const auto type = static_cast<MsgType>(*static_cast<const uint8_t*>(header));
  const auto* begin = static_cast<const std::byte*>(data);
  std::vector<std::byte> payload(begin, begin + length);
  ucp_ep_h ep = param->reply_ep;
  engine->rails_[0]->Post([engine, ep, type, payload = std::move(payload)]() mutable {
    engine->HandleAm(ep, type, std::move(payload));
  });
  return UCS_OK;
}

void Engine::HandleAm(ucp_ep_h ep, MsgType type, std::vector<std::byte> payload) {
  auto it = by_ep_.find(ep);
  if (it == by_ep_.end()) return;  // a connection already torn down
  std::shared_ptr<Conn> conn = FindConn(it->second);
  if (!conn) return;
  switch (type) {
    case MsgType::kHello:
      HandleHello(conn, payload);
      return;
    case MsgType::kFrame:
      // started_ (acquire) orders this read of callbacks_ after Start's write.
      if (conn->state.load() != Conn::kOpen || !started_.load(std::memory_order_acquire)) return;
      messages_received_.fetch_add(1, std::memory_order_relaxed);
      if (callbacks_.on_message) callbacks_.on_message(conn->id, std::move(payload));
      return;
    case MsgType::kWired:
      if (!payload.empty() || conn->peer_wired) {
        BeginTeardown(conn, DataLossError(conn->where + " sent a malformed WIRED"), true);
        return;
      }
      conn->peer_wired = true;
      MaybeOpen(conn);
      return;
    case MsgType::kFenced:
      conn->peer_fenced = true;
      BeginTeardown(conn, UnavailableError(conn->where + " closed the connection"), true);
      MaybeComplete(conn);
      return;
  }
  BeginTeardown(conn, DataLossError(conn->where + " sent an unknown transport message"), true);
}

void Engine::HandleHello(const std::shared_ptr<Conn>& conn, std::span<const std::byte> payload) {
  if (conn->teardown || conn->state.load() != Conn::kHandshake) return;
  Reader r(payload);
  uint32_t magic = 0;
  uint16_t version = 0;
  uint64_t nonce = 0;
  std::vector<std::byte> host;
  uint8_t shm = 0;
  uint8_t read_offered = 0;
  uint32_t pid = 0;
  uint64_t cookie_address = 0;
  uint64_t cookie = 0;
  uint16_t num_rails = 0;
  std::vector<std::vector<std::byte>> rails;
  bool ok = r.U32(&magic) && magic == kHelloMagic && r.U16(&version);
  if (ok && version != kHelloVersion) {
    Status error = InvalidArgumentError(conn->where + " speaks ucx transport version " +
                                        std::to_string(version) + ", this one " +
                                        std::to_string(kHelloVersion));
    {
      std::lock_guard<std::mutex> lock(conns_mu_);
      conn->connect_error = error;
    }
    BeginTeardown(conn, error, true);
    return;
  }
  ok = ok && r.U64(&nonce) && r.Blob(kMaxHostIdBytes, &host) && r.U8(&shm) && r.U8(&read_offered) &&
       r.U32(&pid) && r.U64(&cookie_address) && r.U64(&cookie) && r.U16(&num_rails) &&
       num_rails >= 1 && num_rails <= kMaxHelloRails;
  for (uint16_t i = 0; ok && i < num_rails; ++i) {
    rails.emplace_back();
    ok = r.Blob(kMaxWorkerAddressBytes, &rails.back());
  }
  ok = ok && r.left() == 0;
  if (!ok) {
    Status error = DataLossError(conn->where + " sent a malformed transport handshake");
    {
      std::lock_guard<std::mutex> lock(conns_mu_);
      conn->connect_error = error;
    }
    BeginTeardown(conn, error, true);
    return;
  }
  const std::string peer_host(reinterpret_cast<const char*>(host.data()), host.size());
  const bool same_host = !host_id_.empty() && peer_host == host_id_;
  const bool shared_memory = shared_memory_allowed_ && shm != 0 && same_host;
  // Reads: same host, offered by both, and the probe reads the peer's cookie.
  // (One syscall of 8 bytes, once per connection: on rail 0, so that the
  // answer is settled before the connection opens.)
  std::string no_read;
  LogLevel level = LogLevel::kDebug;
  UniqueFd pidfd;
  if (!read_allowed_) {
    no_read = "same_host_read is off here";
  } else if (!same_host) {
    no_read = "the peer is on another host (or in another pid namespace)";
  } else if (read_offered == 0 || pid == 0 || cookie_address == 0) {
    no_read = "the peer does not offer it (same_host_read is off there)";
  } else {
    // The pidfd first: if the probe then reads the cookie, it names the peer.
    pidfd = OpenPidFd(static_cast<pid_t>(pid));
    if (Status probe = ProbeRead(static_cast<pid_t>(pid), cookie_address, cookie); !probe.ok()) {
      no_read = probe.message();
      level = LogLevel::kInfo;
    }
  }
  if (!no_read.empty()) {
    Log(level, "ucx: no same-host reads from " + conn->where + ": " + no_read);
  }
  {
    std::lock_guard<std::mutex> lock(conns_mu_);
    conn->peer_nonce = nonce;
    conn->shared_memory = shared_memory;
    conn->read_remote = no_read.empty();
    conn->peer_pid = static_cast<pid_t>(pid);
    conn->peer_pidfd = std::move(pidfd);
  }
  conn->peer_rails = std::move(rails);
  // Every rail accepts the peer's data before the peer can learn that it
  // may send (our HELLO, or Connect returning).
  conn->rails_to_accept = static_cast<int>(rails_.size());
  for (auto& rail_ptr : rails_) {
    Rail& rail = *rail_ptr;
    const PeerId id = conn->id;
    rail.Post([this, &rail, id, nonce, conn] {
      rail.AcceptFrom(id, nonce);
      rails_[0]->Post([this, conn] { RailAccepted(conn); });
    });
  }
}

void Engine::RailAccepted(const std::shared_ptr<Conn>& conn) {
  if (--conn->rails_to_accept > 0 || conn->teardown) return;
  if (!conn->outgoing) SendMessage(conn, MsgType::kHello, HelloMessage());
  OpenDataEps(conn);
}

void Engine::DataEpWired(PeerId peer) {
  rails_[0]->Post([this, peer] {
    std::shared_ptr<Conn> conn = FindConn(peer);
    if (!conn || conn->teardown || --conn->rails_to_wire > 0) return;
    conn->wired = true;
    SendMessage(conn, MsgType::kWired, {});
    MaybeOpen(conn);
  });
}

void Engine::MaybeOpen(const std::shared_ptr<Conn>& conn) {
  if (!conn->wired || !conn->peer_wired || conn->teardown ||
      conn->state.load() != Conn::kHandshake) {
    return;
  }
  conn->was_open = true;
  SetState(*conn, Conn::kOpen);
}

void Engine::OpenDataEps(const std::shared_ptr<Conn>& conn) {
  bool shared_memory = false;
  {
    std::lock_guard<std::mutex> lock(conns_mu_);
    shared_memory = conn->shared_memory;
  }
  // Rail i writes to the peer's rail (i mod its rail count).
  conn->rails_to_wire = static_cast<int>(rails_.size());
  for (size_t i = 0; i < rails_.size(); ++i) {
    const std::vector<std::byte>& address = conn->peer_rails[i % conn->peer_rails.size()];
    Rail& rail = *rails_[i];
    const PeerId id = conn->id;
    rail.Post([&rail, id, address, shared_memory] {
      rail.CreateDataEp(id, address, /*with_errors=*/!shared_memory);
    });
  }
}

void Engine::OnEpError(void* arg, ucp_ep_h /*ep*/, ucs_status_t status) {
  auto* a = static_cast<EpErrorArg*>(arg);
  a->engine->OnControlEpError(a->peer, status);
}

void Engine::OnControlEpError(PeerId peer, ucs_status_t status) {
  rails_[0]->Post([this, peer, status] {
    std::shared_ptr<Conn> conn = FindConn(peer);
    if (!conn) return;
    conn->ctrl_failed = true;
    {
      std::lock_guard<std::mutex> lock(conns_mu_);
      if (conn->connect_error.ok()) {
        conn->connect_error =
            UcsError(StatusCode::kUnavailable, "cannot reach '" + conn->where + "'", status);
      }
    }
    BeginTeardown(conn, UcsError(StatusCode::kUnavailable, "connection to " + conn->where + " lost",
                                 status),
                  false);
    MaybeComplete(conn);
  });
}

void Engine::OnDataEpError(PeerId peer, ucs_status_t status) {
  rails_[0]->Post([this, peer, status] {
    std::shared_ptr<Conn> conn = FindConn(peer);
    if (!conn) return;
    BeginTeardown(conn, UcsError(StatusCode::kUnavailable,
                                 "data connection to " + conn->where + " lost", status),
                  false);
  });
}

void Engine::BeginTeardown(const std::shared_ptr<Conn>& conn, Status reason, bool graceful) {
  if (conn->teardown) {
    // Escalate a graceful teardown whose peer turned out to be gone.
    if (!graceful) {
      for (auto& rail_ptr : rails_) {
        Rail& rail = *rail_ptr;
        const PeerId id = conn->id;
        rail.Post([&rail, id] { rail.AbortPeer(id, false, nullptr); });
      }
    }
    return;
  }
  conn->teardown = true;
  conn->reason = std::move(reason);
  {
    // No new Read of the peer from here on; those running end at their next
    // piece, and MaybeComplete waits for them.
    std::lock_guard<std::mutex> lock(conn->read_mu);
    conn->reads_closed.store(true, std::memory_order_release);
  }
  if (conn->state.load() != Conn::kHandshake) SetState(*conn, Conn::kClosing);
  conn->rails_unfenced = static_cast<int>(rails_.size());
  for (auto& rail_ptr : rails_) {
    Rail& rail = *rail_ptr;
    const PeerId id = conn->id;
    const bool soft = graceful && !hard_stop_;
    const bool posted = rail.Post([this, &rail, id, conn, soft] {
      rail.AbortPeer(id, soft,
                     [this, conn] { rails_[0]->Post([this, conn] { RailFenced(conn); }); });
    });
    if (!posted) --conn->rails_unfenced;
  }
  if (conn->rails_unfenced == 0) RailFenced(conn);
}

void Engine::RailFenced(const std::shared_ptr<Conn>& conn) {
  if (conn->rails_unfenced > 0) --conn->rails_unfenced;
  if (conn->rails_unfenced > 0) return;
  // Every write of ours to the peer has ended: tell it.
  if (!conn->sent_fenced && conn->was_open) {
    conn->sent_fenced = true;
    SendMessage(conn, MsgType::kFenced, {});
  }
  MaybeComplete(conn);
}

void Engine::MaybeComplete(const std::shared_ptr<Conn>& conn) {
  if (conn->completed || !conn->teardown || conn->rails_unfenced > 0) return;
  {
    // Our reads of the peer write our memory: they end first (ReadEnded
    // calls again).
    std::lock_guard<std::mutex> lock(conn->read_mu);
    if (conn->reads_pending > 0) return;
  }
  // Draining for a shutdown: the peer's FENCED (or its endpoint's error)
  // calls again. Closing earlier could reset the connection under messages
  // the peer has not taken yet (a KV_RESULT: its request would fail).
  if (conn->draining && !hard_stop_ && conn->was_open && !conn->peer_fenced && !conn->ctrl_failed) {
    return;
  }
  // Both halves of the fence hold once every rail fenced: our sends ended
  // and nothing the peer sends lands here any more.
  conn->completed = true;
  for (auto& rail_ptr : rails_) {
    Rail& rail = *rail_ptr;
    const PeerId id = conn->id;
    const bool alive = conn->peer_fenced && !conn->ctrl_failed;
    rail.Post([&rail, id, alive] { rail.ClosePeer(id, alive); });
  }
  if (conn->ctrl_ep != nullptr) {
    by_ep_.erase(conn->ctrl_ep);
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    auto pending = std::make_unique<ControlRequest>();
    pending->engine = this;
    pending->close = true;
    param.cb.send = &Engine::ControlDone;
    param.user_data = pending.get();
    // A live peer gets our FENCED before the close (flush mode delivers
    // it); a gone one, or a shutdown past its drain, closes at once.
    if (conn->ctrl_failed || hard_stop_) {
      param.op_attr_mask |= UCP_OP_ATTR_FIELD_FLAGS;
      param.flags = UCP_EP_CLOSE_FLAG_FORCE;
    }
    void* request = ucp_ep_close_nbx(conn->ctrl_ep, &param);
    if (request != nullptr && !UCS_PTR_IS_ERR(request)) {
      pending->request = request;
      control_requests_.insert(pending.release());
    }
    conn->ctrl_ep = nullptr;
  }
  SetState(*conn, Conn::kDead);
  if (conn->was_open && !shut_ && started_.load(std::memory_order_acquire) &&
      callbacks_.on_peer_failure) {
    callbacks_.on_peer_failure(conn->id, conn->reason);
  }
}

void Engine::ReadEnded(const std::shared_ptr<Conn>& conn) {
  bool last = false;
  {
    std::lock_guard<std::mutex> lock(conn->read_mu);
    last = --conn->reads_pending == 0 && conn->reads_closed.load(std::memory_order_relaxed);
  }
  // Rail 0 runs until every teardown completed, so it takes this.
  if (last) rails_[0]->Post([this, conn] { MaybeComplete(conn); });
}

bool Engine::ControlQuiesced() const {
  for (const ControlRequest* pending : control_requests_) {
    if (pending->close) return false;
  }
  std::lock_guard<std::mutex> lock(conns_mu_);
  for (const auto& [id, conn] : conns_) {
    if (conn->teardown && !conn->completed) return false;
  }
  return true;
}

void Engine::DestroyListener() {
  if (listener_ != nullptr) ucp_listener_destroy(listener_);
  listener_ = nullptr;
  // Endpoints whose close did not finish are released with the worker.
}

void Engine::AddRegion(uint64_t address, uint64_t size) {
  std::unique_lock<std::shared_mutex> lock(regions_mu_);
  regions_[address].push_back(size);
}

void Engine::RemoveRegion(uint64_t address, uint64_t size) {
  std::unique_lock<std::shared_mutex> lock(regions_mu_);
  auto it = regions_.find(address);
  if (it == regions_.end()) return;
  auto& sizes = it->second;
  auto one = std::find(sizes.begin(), sizes.end(), size);
  if (one != sizes.end()) sizes.erase(one);
  if (sizes.empty()) regions_.erase(it);
}

bool Engine::CopyIn(uint64_t address, const void* data, size_t length) {
  std::shared_lock<std::shared_mutex> lock(regions_mu_);
  auto it = regions_.upper_bound(address);
  while (it != regions_.begin()) {
    --it;
    for (uint64_t size : it->second) {
      if (RangeInside(Addr(address), length, Addr(it->first), size)) {
        if (length != 0) std::memcpy(Addr(address).ToPointer(), data, length);
        return true;
      }
    }
  }
  return false;
}

Result<std::shared_ptr<Conn>> Engine::OpenConn(PeerId peer) const {
  if (shut_) return AbortedError("the ucx transport is shut down");
  if (!started_) return FailedPreconditionError("the ucx transport is not started");
  std::shared_ptr<Conn> conn = FindConn(peer);
  if (!conn) return NotFoundError("unknown peer " + std::to_string(peer));
  if (conn->state.load() != Conn::kOpen) {
    return UnavailableError("connection to " + conn->where + " is closed");
  }
  return conn;
}

Status Engine::Send(PeerId peer, std::span<const std::byte> frame) {
  std::shared_lock<std::shared_mutex> lock(api_mu_);
  KVB_ASSIGN_OR_RETURN(std::shared_ptr<Conn> conn, OpenConn(peer));
  std::vector<std::byte> body(frame.begin(), frame.end());
  messages_sent_.fetch_add(1, std::memory_order_relaxed);
  rails_[0]->Post([this, conn, body = std::move(body)]() mutable {
    if (conn->state.load() != Conn::kOpen) return;
    SendMessage(conn, MsgType::kFrame, std::move(body));
  });
  return Status();
}

Result<std::unique_ptr<LocalRegion>> Engine::Register(Addr address, uint64_t bytes,
                                                      MemoryKind kind) {
  if (bytes == 0) return InvalidArgumentError("cannot register an empty region");
  if (!IsHostAccessible(kind)) {  // pageable or pinned
    return InvalidArgumentError("the ucx transport of this build reaches host memory only");
  }
  if (address.value() == 0 || !RangeInside(address, bytes, Addr(0), ~uint64_t{0})) {
    return InvalidArgumentError("the region's address range is invalid");
  }
  if (shut_) return AbortedError("the ucx transport is shut down");
  // The key names the region by its exporter, address and size: the
  // receiving side checks every data message against its live regions.
  Writer w;
  w.U32(kKeyMagic);
  w.U16(kKeyVersion);
  w.U64(nonce_);
  w.U64(address.value());
  w.U64(bytes);
  RegionInfo info{.address = address, .size = bytes, .kind = kind, .remote_key = w.Take()};
  AddRegion(address.value(), bytes);
  return std::unique_ptr<LocalRegion>(
      std::make_unique<UcxLocalRegion>(shared_from_this(), std::move(info)));
}

Result<std::unique_ptr<RemoteRegion>> Engine::Import(PeerId peer, const RegionInfo& info) {
  std::shared_ptr<Conn> conn = FindConn(peer);
  if (!conn) return NotFoundError("unknown peer " + std::to_string(peer));
  if (!IsHostAccessible(info.kind)) {
    return InvalidArgumentError("the ucx transport of this build reaches host memory only");
  }
  if (conn->state.load() != Conn::kOpen) {
    return UnavailableError("connection to " + conn->where + " is closed");
  }
  uint64_t peer_nonce = 0;
  {
    std::lock_guard<std::mutex> lock(conns_mu_);
    peer_nonce = conn->peer_nonce;
  }
  Reader r(info.remote_key);
  uint32_t magic = 0;
  uint16_t version = 0;
  uint64_t nonce = 0;
  uint64_t address = 0;
  uint64_t size = 0;
  if (!r.U32(&magic) || magic != kKeyMagic || !r.U16(&version) || version != kKeyVersion ||
      !r.U64(&nonce) || !r.U64(&address) || !r.U64(&size) || r.left() != 0) {
    return InvalidArgumentError("not a ucx remote key of this transport version");
  }
  if (nonce != peer_nonce) {
    return InvalidArgumentError("the remote key was not exported by " + conn->where);
  }
  if (address != info.address.value() || size != info.size) {
    return InvalidArgumentError("the region's address or size does not match its remote key");
  }
  return std::unique_ptr<RemoteRegion>(
      std::make_unique<UcxRemoteRegion>(shared_from_this(), peer, info));
}

Status Engine::Write(const LocalRegion& source, const RemoteRegion& target,
                     std::span<const WriteOp> ops, TransportDone done, std::stop_token stop) {
  if (!FindConn(target.peer())) return NotFoundError("unknown peer " + std::to_string(target.peer()));
  const auto* local = dynamic_cast<const UcxLocalRegion*>(&source);
  const auto* remote = dynamic_cast<const UcxRemoteRegion*>(&target);
  if (local == nullptr || local->engine() != this) {
    return InvalidArgumentError("the source region is not registered with this ucx transport");
  }
  if (remote == nullptr || remote->engine() != this) {
    return InvalidArgumentError("the target region was not imported by this ucx transport");
  }
  KVB_RETURN_IF_ERROR(CheckWriteOps(source.info(), target.info(), ops).status());
  std::shared_lock<std::shared_mutex> lock(api_mu_);
  KVB_ASSIGN_OR_RETURN(std::shared_ptr<Conn> conn, OpenConn(target.peer()));

  // Cut the ops into sends and deal them across the rails.
  const size_t num_rails = rails_.size();
  std::vector<WorkItem> items(num_rails);
  for (auto& item : items) item.pieces = std::make_shared<std::vector<Piece>>();
  static std::atomic<uint64_t> rotation{0};
  size_t next_rail = rotation.fetch_add(1, std::memory_order_relaxed) % num_rails;
  int64_t puts = 0;
  for (const WriteOp& op : ops) {
    const auto* src = static_cast<const std::byte*>(op.src.ToPointer());
    for (uint64_t off = 0; off < op.bytes; off += put_chunk_) {
      const uint64_t n = std::min(put_chunk_, op.bytes - off);
      items[next_rail].pieces->push_back(
          Piece{src + off, n, DataHeader(DataKind::kData, nonce_, op.dst.value() + off)});
      next_rail = (next_rail + 1) % num_rails;
      ++puts;
    }
  }
  local->use()->Add();
  auto batch = std::make_shared<Batch>(puts, std::move(done), std::move(stop), local->use());
  if (puts == 0) {
    // Nothing to move; complete from the rail, never inside this call.
    rails_[0]->Post([batch] {
      batch->countdown.Arrive(0);
    });
    return Status();
  }
  for (size_t i = 0; i < num_rails; ++i) {
    if (items[i].pieces->empty()) continue;
    items[i].batch = batch;
    items[i].peer = target.peer();
    Rail& rail = *rails_[i];
    rail.Post([&rail, item = std::move(items[i])]() mutable { rail.Enqueue(std::move(item)); });
  }
  return Status();
}

Status Engine::Read(const RemoteRegion& source, const LocalRegion& target,
                    std::span<const ReadOp> ops, TransportDone done, std::stop_token stop) {
  if (!FindConn(source.peer())) {
    return NotFoundError("unknown peer " + std::to_string(source.peer()));
  }
  const auto* remote = dynamic_cast<const UcxRemoteRegion*>(&source);
  const auto* local = dynamic_cast<const UcxLocalRegion*>(&target);
  if (remote == nullptr || remote->engine() != this) {
    return InvalidArgumentError("the read's source region was not imported by this ucx transport");
  }
  if (local == nullptr || local->engine() != this) {
    return InvalidArgumentError(
        "the read's target region is not registered with this ucx transport");
  }
  if (!done) return InvalidArgumentError("Read needs a done callback");
  std::shared_lock<std::shared_mutex> lock(api_mu_);
  KVB_ASSIGN_OR_RETURN(std::shared_ptr<Conn> conn, OpenConn(source.peer()));
  bool readable = false;
  {
    std::lock_guard<std::mutex> conns_lock(conns_mu_);
    readable = conn->read_remote;
  }
  if (!readable || reader_ == nullptr) {
    return UnimplementedError("the ucx transport cannot read the memory of " + conn->where +
                              (read_allowed_ ? " (not a same-host peer this process may read)"
                                             : " (same_host_read is off)"));
  }
  KVB_ASSIGN_OR_RETURN(uint64_t bytes, CheckReadOps(source.info(), target.info(), ops));
  {
    std::lock_guard<std::mutex> read_lock(conn->read_mu);
    if (conn->reads_closed.load(std::memory_order_relaxed)) {
      return UnavailableError("connection to " + conn->where + " is closed");
    }
    ++conn->reads_pending;
  }
  local->use()->Add();
  ReadJob job{.conn = conn,
              .ops = ops,
              .bytes = bytes,
              .use = local->use(),
              .done = std::move(done),
              .stop = std::move(stop)};
  // A small read while rail 0 runs on its caller's thread (an agent's
  // control loop) runs there too, after the caller's current task, instead
  // of costing a hand-off to the reader and one back; a few microseconds of
  // copy hold rail 0 up no longer than a data message does.
  if (bytes <= UcxTransport::kLoopReadBytes && rails_[0]->driven() &&
      rails_[0]->Post([this, job]() mutable { reader_->Execute(job); })) {
    return Status();
  }
  if (!reader_->Post(job)) {
    // Unreachable: the reader stops only after Shutdown took api_mu_.
    local->use()->Release();
    ReadEnded(conn);
    return AbortedError("the ucx transport is shut down");
  }
  return Status();
}

Status Engine::Flush(PeerId peer, TransportDone done) {
  std::shared_lock<std::shared_mutex> lock(api_mu_);
  KVB_ASSIGN_OR_RETURN(std::shared_ptr<Conn> conn, OpenConn(peer));
  flushes_.fetch_add(1, std::memory_order_relaxed);
  auto countdown = std::make_shared<Countdown>(static_cast<int64_t>(rails_.size()), std::move(done));
  for (auto& rail_ptr : rails_) {
    Rail& rail = *rail_ptr;
    rail.Post([&rail, peer, countdown] { rail.Flush(peer, countdown); });
  }
  return Status();
}

void Engine::Disconnect(PeerId peer, const Status& reason) {
  std::shared_lock<std::shared_mutex> lock(api_mu_);
  if (shut_) return;
  std::shared_ptr<Conn> conn = FindConn(peer);
  if (!conn) return;
  rails_[0]->Post([this, conn, reason] { BeginTeardown(conn, reason, /*graceful=*/true); });
}

std::unique_ptr<ProgressSource> Engine::TakeProgressSource() {
  // Held shared: Shutdown, which joins the rails too, waits for the
  // hand-over.
  std::shared_lock<std::shared_mutex> lock(api_mu_);
  if (shut_ || rails_.empty()) return nullptr;
  return rails_[0]->HandOver(shared_from_this());
}

void Engine::Shutdown() {
  {
    std::unique_lock<std::shared_mutex> lock(api_mu_);
    if (shut_) return;
    shut_ = true;
  }
  if (rails_.empty()) return;
  std::vector<std::shared_ptr<Conn>> all;
  std::vector<std::shared_ptr<Conn>> open;
  {
    std::lock_guard<std::mutex> lock(conns_mu_);
    for (auto& [id, conn] : conns_) {
      all.push_back(conn);
      if (conn->state.load() == Conn::kOpen) open.push_back(conn);
    }
  }
  // The drain: every open connection is closed gracefully (our sends in
  // flight complete, FENCED goes out behind every message sent before) and
  // stays until the peer answers with its FENCED, so that what this process
  // sent last (a KV_RESULT) is taken, not lost to a reset. A peer that does
  // not answer within kShutdownDrain is cut like a dead one.
  if (!open.empty() && rails_[0]->Post([this, open] {
        for (const auto& conn : open) {
          if (conn->teardown || conn->ctrl_failed) continue;
          conn->draining = true;
          BeginTeardown(conn, AbortedError("the ucx transport is shut down"), true);
          MaybeComplete(conn);
        }
      })) {
    std::unique_lock<std::mutex> lock(conns_mu_);
    conns_cv_.wait_for(lock, UcxTransport::kShutdownDrain, [&] {
      return std::all_of(open.begin(), open.end(),
                         [](const auto& conn) { return conn->state.load() == Conn::kDead; });
    });
  }
  // Rail 0 tears every connection left down (telling live peers); then
  // every rail cuts what is left and stops.
  rails_[0]->Post([this, all] {
    hard_stop_ = true;
    for (const auto& conn : all) {
      BeginTeardown(conn, AbortedError("the ucx transport is shut down"), false);
      MaybeComplete(conn);
    }
  });
  // The reads end (at their next piece) and report to rail 0 while it still
  // runs: it stops only once every teardown completed.
  if (reader_) reader_->StopAndJoin();
  for (size_t i = rails_.size(); i-- > 0;) rails_[i]->StopAndJoin();
  conns_cv_.notify_all();
}

TransportStats Engine::Stats() const {
  TransportStats stats;
  stats.write_ops = write_ops_.load(std::memory_order_relaxed);
  stats.write_bytes = write_bytes_.load(std::memory_order_relaxed);
  stats.failed_write_ops = failed_write_ops_.load(std::memory_order_relaxed);
  stats.read_ops = read_ops_.load(std::memory_order_relaxed);
  stats.read_bytes = read_bytes_.load(std::memory_order_relaxed);
  stats.flushes = flushes_.load(std::memory_order_relaxed);
  stats.messages_sent = messages_sent_.load(std::memory_order_relaxed);
  stats.messages_received = messages_received_.load(std::memory_order_relaxed);
  return stats;
}

}  // namespace ucx_internal

// --- UcxTransport ---------------------------------------------------------

Result<HostPort> ParseHostPort(std::string_view address) {
  const std::string quoted = "'" + std::string(address) + "'";
  std::string_view host;
  std::string_view port;
  if (!address.empty() && address.front() == '[') {
    const size_t close = address.find(']');
    if (close == std::string_view::npos || close + 1 >= address.size() ||
        address[close + 1] != ':') {
      return InvalidArgumentError("address " + quoted + ": expected [ipv6]:port");
    }
    host = address.substr(1, close - 1);
    port = address.substr(close + 2);
  } else {
    const size_t colon = address.rfind(':');
    if (colon == std::string_view::npos) {
      return InvalidArgumentError("address " + quoted + ": expected host:port");
    }
    host = address.substr(0, colon);
    port = address.substr(colon + 1);
    if (host.find(':') != std::string_view::npos) {
      return InvalidArgumentError("address " + quoted + ": put an IPv6 host in brackets");
    }
  }
  if (host.empty()) return InvalidArgumentError("address " + quoted + ": empty host");
  for (char c : host) {
    const bool ok = std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' ||
                    c == '_' || c == ':' || c == '%';
    if (!ok) return InvalidArgumentError("address " + quoted + ": bad character in host");
  }
  uint32_t value = 0;
  const auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
  if (port.empty() || ec != std::errc() || end != port.data() + port.size() || value > 65535) {
    return InvalidArgumentError("address " + quoted + ": port must be an integer in [0, 65535]");
  }
  return HostPort{std::string(host), static_cast<uint16_t>(value)};
}

UcxTransport::UcxTransport(std::shared_ptr<ucx_internal::Engine> engine)
    : engine_(std::move(engine)) {}

UcxTransport::~UcxTransport() { Shutdown(); }

Result<std::unique_ptr<UcxTransport>> UcxTransport::Create(const UcxTransportOptions& options) {
  auto engine = std::make_shared<ucx_internal::Engine>(options);
  KVB_RETURN_IF_ERROR(engine->Init());
  return std::unique_ptr<UcxTransport>(new UcxTransport(std::move(engine)));
}

TransportCaps UcxTransport::Caps() const { return engine_->Caps(); }
Result<TransportCaps> UcxTransport::PeerCaps(PeerId peer) const { return engine_->PeerCaps(peer); }
std::string UcxTransport::Address() const { return engine_->Address(); }
Status UcxTransport::Start(TransportCallbacks callbacks) {
  return engine_->Start(std::move(callbacks));
}
Result<PeerId> UcxTransport::Connect(std::string_view address) {
  return engine_->Connect(address);
}
Status UcxTransport::Send(PeerId peer, std::span<const std::byte> frame) {
  return engine_->Send(peer, frame);
}
Result<std::unique_ptr<LocalRegion>> UcxTransport::Register(Addr address, uint64_t bytes,
                                                            MemoryKind kind) {
  return engine_->Register(address, bytes, kind);
}
Result<std::unique_ptr<RemoteRegion>> UcxTransport::Import(PeerId peer, const RegionInfo& info) {
  return engine_->Import(peer, info);
}
Status UcxTransport::Write(const LocalRegion& source, const RemoteRegion& target,
                           std::span<const WriteOp> ops, TransportDone done,
                           std::stop_token stop) {
  return engine_->Write(source, target, ops, std::move(done), std::move(stop));
}
Status UcxTransport::Read(const RemoteRegion& source, const LocalRegion& target,
                          std::span<const ReadOp> ops, TransportDone done, std::stop_token stop) {
  return engine_->Read(source, target, ops, std::move(done), std::move(stop));
}
Result<std::unique_ptr<MappedAccess>> UcxTransport::BeginMappedAccess(const RemoteRegion&) {
  return UnimplementedError("the ucx transport cannot map peer memory (no direct path over ucx)");
}
Status UcxTransport::Flush(PeerId peer, TransportDone done) {
  return engine_->Flush(peer, std::move(done));
}
void UcxTransport::Disconnect(PeerId peer, const Status& reason) {
  engine_->Disconnect(peer, reason);
}
void UcxTransport::Shutdown() { engine_->Shutdown(); }
std::unique_ptr<ProgressSource> UcxTransport::TakeProgressSource() {
  return engine_->TakeProgressSource();
}
TransportStats UcxTransport::Stats() const { return engine_->Stats(); }

}  // namespace kvbounce
