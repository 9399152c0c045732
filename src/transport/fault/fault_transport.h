// FaultTransport: a decorator that injects failures and delays into any
// Transport, so that the session layer's failure paths can be tested
// deterministically (STYLE "fakes over mocks"; LevelDB's ErrorEnv).
//
// It forwards every call to the transport it wraps (the "inner" one) and adds
// the faults below to the data plane: Write and Read are treated alike (a
// Read batch is injected exactly as a Write batch, op for op), except that
// reads are never held (see "Holding writes").
//
//   write_fail_rate  Each data OPERATION (one WriteOp or ReadOp) is chosen to
//                    fail with this probability; a Write or Read batch fails
//                    when any of its ops is chosen. A failed batch is not
//                    issued at all: nothing is written or read, the call
//                    returns OK, and its `done` later receives kUnavailable
//                    with a message containing "injected write failure" (or
//                    "injected read failure"). Flushes and messages are
//                    never failed by injection. The ops are range-checked
//                    first (kOutOfRange as for any transport), and a Read
//                    the inner transport cannot do (its PeerCaps(peer) says
//                    read_remote false) is refused with kUnimplemented, so a
//                    bad batch is never "accepted" by an injection; the peer
//                    is not checked (a batch for a dead peer that is chosen
//                    to fail is accepted and fails later, with the same
//                    code).
//   delay            Added to every write, read and flush completion: `done`
//                    runs no earlier than `delay` after the inner transport
//                    reported the completion (so at least `delay` after the
//                    call), with the inner status. Injected failures are
//                    delayed too. The delay in force when the call was made
//                    applies.
//   message_delay    Added to the delivery of every control message received
//                    (on_message). Messages of one peer keep their order,
//                    and an on_peer_failure for a peer with delayed messages
//                    still pending is held back until after them, so that
//                    "no on_message after on_peer_failure" still holds.
//   drop_after_ops   0 = never. Once this many data operations (write and
//                    read ops of batches the decorator accepted, injected
//                    failures included) were counted since the options were
//                    last set, the next Write or Read drops its connection:
//                    the decorator calls inner.Disconnect(peer, kUnavailable
//                    "injected: connection dropped after N operations") —
//                    both ends get on_peer_failure — and that call fails at
//                    once with that kUnavailable status (its `done` never
//                    runs). Fires once; SetOptions re-arms it.
//   seed             Seeds the one random generator (a std::mt19937_64
//                    used under a mutex), so a run is reproducible: the same
//                    seed and the same sequence of Write and Read calls (from
//                    one thread) choose the same failures. SetOptions
//                    reseeds it. The ops of a batch are chosen by drawing
//                    the gaps between chosen ops (geometric, from one
//                    uniform draw each, through std::log): the draws use no
//                    global state, so decorators may inject on many threads
//                    at once (std::binomial_distribution's lgamma writes the
//                    global `signgam`, a data race).
//
// Cancellation: Write and Read forward their std::stop_token to the inner
// transport, which honours it as it documents. A batch failed by injection is
// never issued and ignores its stop token: its `done` gets the injected
// kUnavailable even when a stop was requested before it ran. A held batch
// (below) ignores its stop token too.
//
// Holding writes (a seam for the session's tests): between HoldWrites() and
// ReleaseWrites(), every Write batch the decorator accepts and does not fail
// by injection is PARKED in the decorator instead of being passed to the
// inner transport (Write returns OK). Parked batches model operations
// already on the wire: their stop tokens are NOT honoured, and
// ReleaseWrites() issues them to the inner transport, in the order they were
// accepted, WITHOUT their stop tokens, so they land if the connection is
// still alive. When the inner transport refuses one at release (e.g. its
// connection died meanwhile: kUnavailable), that batch's `done` gets the
// inner error, once, on the timer thread (after the delay in force when the
// batch was accepted), never inside a caller's call. Shutdown fails every
// batch still parked with kAborted, on the timer thread, never issuing it.
// Reads are never parked: a held write models bytes on the wire towards the
// peer, and a Read goes to the inner transport at once (faults apply).
// While holding, a Write for a peer whose on_peer_failure the decorator
// already received from the inner transport is not parked but passed to the
// inner transport (which refuses it now). A batch parked for a peer that
// was never reachable is accepted and fails at release, as above.
//
// The fence (see transport.h, "Failure and the fence"): the inner transport
// reports on_peer_failure only after its own operations of the connection
// ended, but it does not know of parked batches, nor of completions the
// decorator still holds back (delay, injected failures). So while any Write,
// Read or Flush the decorator accepted for a peer has not completed — parked,
// released and in the inner transport, or its `done` waiting for its delay
// or not yet returned — the decorator holds that peer's on_peer_failure
// from the inner transport back, and delivers it right after the last such
// `done` returned, on that thread (or behind that peer's delayed messages,
// on the timer thread; or on the timer thread when the last one was a call
// the inner transport refused). So on_peer_failure still follows every
// completion of that peer's writes, reads and flushes, and no on_message
// follows it.
//
// Threads: the decorator owns one timer thread (started by Create, joined
// by Shutdown). Delayed completions, injected failures, delayed messages,
// released batches the inner transport refused and parked batches aborted
// by Shutdown run on it; everything else runs on the inner transport's
// threads exactly as without the decorator (an on_peer_failure held back by
// the fence runs where the batch that lifted the fence completed). With
// every fault off and no writes held, the decorator behaves like the inner
// transport (callbacks on the same threads).
//
// Callbacks exactly once: every Write, Read and Flush that returned OK gets its
// `done` called exactly once, never inside the call. At Shutdown the parked
// batches are taken (never to be issued), the inner transport is shut down
// (its pending operations complete as it decides), then every completion
// still waiting for its delay runs at once, on the timer thread, with
// kAborted (the message says what the inner status was), and so does every
// parked batch (kAborted "... held ... never issued"); delayed messages and
// failure notifications still pending or held back by the fence are
// dropped. No callback runs after Shutdown returns.
//
// Stats(): forwarded to the inner transport, so injected failures (never
// issued) do not appear there; fault_stats() counts them.
//
// Thread safety: every method is thread-safe. Shutdown and the destructor
// must not run on the timer thread or an inner transport thread (from a
// callback): that is reported and aborts.
//
// Ownership: the decorator owns the inner transport. Regions returned by
// Register and Import are the inner transport's own objects (the decorator
// does not wrap them); they must be destroyed before the decorator.
#ifndef KVBOUNCE_TRANSPORT_FAULT_FAULT_TRANSPORT_H_
#define KVBOUNCE_TRANSPORT_FAULT_FAULT_TRANSPORT_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <span>
#include <stop_token>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "kvbounce/status.h"
#include "kvbounce/transport.h"
#include "kvbounce/types.h"

namespace kvbounce {

// What to inject. All off by default. See the file comment for each field.
struct FaultOptions {
  // Per data operation (write and read ops alike), in [0, 1].
  double write_fail_rate = 0;
  // Before each write, read and flush completion is reported; >= 0.
  std::chrono::microseconds delay{0};
  // Before each received control message is delivered; >= 0.
  std::chrono::microseconds message_delay{0};
  // Drop the connection after this many data (write and read) operations;
  // 0 = never; >= 0.
  int64_t drop_after_ops = 0;
  uint64_t seed = 1;
  // For tests: called with every received control frame before it is
  // delivered (or delayed), on the thread that received it; it may change
  // the bytes, as a peer that speaks the protocol wrongly would. Empty: off.
  std::function<void(std::vector<std::byte>& frame)> rewrite_message;
};

// What was injected since Create.
struct FaultStats {
  uint64_t injected_write_failures = 0;  // write OPERATIONS chosen to fail
  uint64_t injected_read_failures = 0;   // read OPERATIONS chosen to fail
  uint64_t failed_batches = 0;           // Write and Read batches failed by injection
  uint64_t dropped_connections = 0;      // drop_after_ops and InjectDisconnect
  uint64_t delayed_completions = 0;      // write/read/flush completions delayed
  uint64_t delayed_messages = 0;         // control messages delayed
};

class FaultTransport final : public Transport {
 public:
  // Checks `options`. Errors: kInvalidArgument naming the field and its
  // value: write_fail_rate outside [0, 1] (or NaN), a negative delay,
  // message_delay or drop_after_ops.
  static Status ValidateOptions(const FaultOptions& options);

  // Wraps `inner` and starts the timer thread. Errors: kInvalidArgument for
  // a null `inner` or bad options (see ValidateOptions); kResourceExhausted
  // when the thread cannot be created.
  static Result<std::unique_ptr<FaultTransport>> Create(std::unique_ptr<Transport> inner,
                                                        FaultOptions options = {});

  // Runs Shutdown(), then destroys the inner transport.
  ~FaultTransport() override;

  // Replaces the options at runtime (for operations started afterwards),
  // reseeds the generator and re-arms drop_after_ops (its count restarts at
  // 0). Errors: as ValidateOptions; the old options then stay.
  Status SetOptions(const FaultOptions& options);
  FaultOptions options() const;

  // Kills the connection to `peer` now, as a network failure would: calls
  // inner.Disconnect(peer, kUnavailable "injected disconnect"). Counts in
  // dropped_connections. Does nothing after Shutdown.
  void InjectDisconnect(PeerId peer);

  FaultStats fault_stats() const;

  // Starts parking accepted Write batches (see "Holding writes" in the file
  // comment). Does nothing after Shutdown started.
  void HoldWrites();
  // Stops parking and issues every parked batch to the inner transport, in
  // the order accepted, without its stop token (see the file comment). May
  // be called from any thread, also from a callback; concurrent calls issue
  // in one order.
  void ReleaseWrites();
  // Batches parked now.
  size_t held_writes() const;
  // Waits until at least `n` batches are parked; false on timeout.
  bool WaitForHeldWrites(size_t n, std::chrono::milliseconds timeout);

  // The wrapped transport (e.g. to read its own counters).
  Transport& inner() { return *inner_; }

  // Forwarded to the inner transport as they are, cost included (injected
  // delays are faults, not the link's price). concurrent_callbacks is the
  // inner transport's, which is exact with every fault off (see "Threads");
  // with faults on, the timer thread may also run a callback.
  TransportCaps Caps() const override;
  Result<TransportCaps> PeerCaps(PeerId peer) const override;
  Result<TransportCaps> PeerCapsFor(PeerId peer, MemoryKind kind) const override;
  std::string Address() const override;
  // Errors: the inner transport's; kFailedPrecondition when already
  // started; kAborted after Shutdown.
  Status Start(TransportCallbacks callbacks) override;
  Result<PeerId> Connect(std::string_view address) override;
  Status Send(PeerId peer, std::span<const std::byte> frame) override;
  Result<std::unique_ptr<LocalRegion>> Register(Addr address, uint64_t bytes,
                                                MemoryKind kind) override;
  Result<std::unique_ptr<RemoteRegion>> Import(PeerId peer, const RegionInfo& info) override;
  // Errors: kOutOfRange (checked here too), kInvalidArgument for an empty
  // `done`, kAborted after Shutdown started, and the inner transport's.
  // `stop` goes to the inner transport; injected failures and held batches
  // ignore it (see the file comment).
  using Transport::Write;
  Status Write(const LocalRegion& source, const RemoteRegion& target, std::span<const WriteOp> ops,
               TransportDone done, std::stop_token stop) override;
  // Errors: kOutOfRange (checked here too), kInvalidArgument for an empty
  // `done`, kUnimplemented when the inner transport's PeerCaps(peer) says
  // read_remote false, kAborted after Shutdown started, and the inner
  // transport's. `stop` goes to the inner transport; injected failures
  // ignore it. Never held (see the file comment).
  Status Read(const RemoteRegion& source, const LocalRegion& target, std::span<const ReadOp> ops,
              TransportDone done, std::stop_token stop) override;
  // Forwarded to the inner transport.
  Result<std::unique_ptr<MappedAccess>> BeginMappedAccess(const RemoteRegion& target) override;
  // Forwarded as it is: a mapped read has no operations to fail or delay.
  Result<std::unique_ptr<MappedAccess>> BeginMappedRead(const RemoteRegion& source) override;
  // Errors: kInvalidArgument for an empty `done`, kAborted after Shutdown
  // started, and the inner transport's.
  Status Flush(PeerId peer, TransportDone done) override;
  void Disconnect(PeerId peer, const Status& reason) override;
  // Takes the parked batches, shuts the inner transport down, then runs
  // every delayed completion still pending and every parked batch with
  // kAborted and joins the timer thread. Idempotent.
  void Shutdown() override;
  TransportStats Stats() const override;
  // The inner transport's: its callbacks still pass through this decorator.
  std::unique_ptr<ProgressSource> TakeProgressSource() override {
    return inner_->TakeProgressSource();
  }

 private:
  using Clock = std::chrono::steady_clock;

  // Something the timer thread runs when due.
  struct TimerEntry {
    enum class Kind { kCompletion, kMessage, kPeerFailure };
    Kind kind = Kind::kCompletion;
    TransportDone done;            // kCompletion
    Status status;                 // kCompletion: the result; kPeerFailure: the reason
    PeerId peer = 0;               // kMessage, kPeerFailure
    std::vector<std::byte> frame;  // kMessage
    // kCompletion: report `status` as it is also when Shutdown drains the
    // timer (it already says kAborted), instead of wrapping it.
    bool final_status = false;
  };

  // Delayed deliveries still pending for one peer.
  struct PeerBacklog {
    uint64_t pending = 0;
    Clock::time_point last_due;
  };

  // A batch parked by HoldWrites.
  struct ParkedWrite {
    const LocalRegion* source = nullptr;
    const RemoteRegion* target = nullptr;
    std::span<const WriteOp> ops;
    TransportDone done;  // the caller's, wrapped by Settling
    std::chrono::microseconds delay{0};
  };

  // What the decorator decided for one Write or Read batch.
  struct Decision {
    bool drop = false;      // drop_after_ops fired: drop the connection
    uint64_t failures = 0;  // ops chosen to fail (the batch is not issued)
    int64_t drop_after = 0;
    std::chrono::microseconds delay{0};
  };

  FaultTransport(std::unique_ptr<Transport> inner, FaultOptions options);

  // Draws the faults of a batch of `num_ops` ops for `peer` and counts them.
  // Unless it drops the connection, the batch counts as unsettled from here
  // on and `done` is wrapped by Settling. REQUIRES: mu_ held.
  Decision DecideLocked(PeerId peer, size_t num_ops, bool read, TransportDone& done);
  // Carries out a drop (the status the call returns) or an injected failure
  // (`done` posted to the timer; OK). nullopt when the batch is to be
  // issued to the inner transport.
  std::optional<Status> Inject(const Decision& decision, PeerId peer, TransportDone& done,
                               bool read, size_t num_ops);

  // How many of `num_ops` ops are chosen to fail at `rate` (in (0, 1)).
  // REQUIRES: mu_ held.
  uint64_t CountChosenLocked(uint64_t num_ops, double rate);
  // Issues one released batch to the inner transport.
  void IssueParked(ParkedWrite& write);
  // Wraps `done` so that Settle(peer) runs after it returned.
  TransportDone Settling(PeerId peer, TransportDone done);
  // An operation of `peer` counted in unsettled_ completed (or was refused,
  // `in_call`); the last one delivers a held on_peer_failure (through the
  // timer thread when `in_call`, so never inside the caller's call).
  void Settle(PeerId peer, bool in_call);
  // Delivers on_peer_failure: now, on this thread, or, when `via_timer` or
  // behind that peer's delayed messages, on the timer thread.
  void DeliverPeerFailure(PeerId peer, const Status& reason, bool via_timer);
  // Queues `entry` for `due`. False when the timer thread has stopped.
  bool Post(Clock::time_point due, TimerEntry& entry);
  // Holds `done` back by `delay` once the inner transport completes.
  TransportDone DelayCompletion(TransportDone done, std::chrono::microseconds delay);
  void OnMessage(PeerId peer, std::vector<std::byte> frame);
  void OnPeerFailure(PeerId peer, const Status& reason);
  void TimerLoop();
  bool OnOwnThread() const;

  const std::unique_ptr<Transport> inner_;

  // Options, generator, drop state and fault counters.
  mutable std::mutex mu_;
  FaultOptions options_;
  std::mt19937_64 rng_;
  uint64_t ops_since_options_ = 0;
  bool drop_fired_ = false;
  FaultStats stats_;
  bool started_ = false;
  // Holding writes and the fence (see the file comment).
  bool holding_ = false;
  bool parking_closed_ = false;  // Shutdown took the parked batches
  std::deque<ParkedWrite> parked_;
  std::condition_variable parked_cv_;                 // parked_ grew; releasing_ fell to 0
  int releasing_ = 0;                                 // ReleaseWrites calls issuing now
  std::unordered_map<PeerId, uint64_t> unsettled_;    // accepted, `done` not yet returned
  std::unordered_map<PeerId, Status> held_failures_;  // on_peer_failure held by the fence
  std::unordered_set<PeerId> failed_peers_;           // on_peer_failure received from inner
  std::mutex release_mu_;  // serializes ReleaseWrites, keeping one issue order

  std::atomic<bool> stopping_{false};
  std::mutex shutdown_mu_;  // serializes Shutdown calls
  bool shut_down_ = false;  // guarded by shutdown_mu_

  // Written by Start before the inner transport starts; read by callbacks.
  TransportCallbacks callbacks_;

  // The timer queue, ordered by (due time, sequence number) so that entries
  // due at the same time run in the order they were posted.
  std::mutex timer_mu_;
  std::condition_variable timer_cv_;
  std::map<std::pair<Clock::time_point, uint64_t>, TimerEntry> timers_;
  uint64_t timer_seq_ = 0;
  bool timer_stop_ = false;    // Shutdown asks the thread to drain and exit
  bool timer_closed_ = false;  // drained: Post refuses
  std::unordered_map<PeerId, PeerBacklog> backlogs_;
  std::thread timer_thread_;
};

}  // namespace kvbounce

#endif  // KVBOUNCE_TRANSPORT_FAULT_FAULT_TRANSPORT_H_
