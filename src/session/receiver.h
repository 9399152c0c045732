// ReceiverSession: the gen side of an agent (docs/sessions.md). One receiver
// request per Pull, driven through
//
//   RESERVING -> IN_FLIGHT -> SCATTERING -> DONE
//                    \-------------------> FAILED
//   (the direct path where this rank reads the writers' blocks itself
//    (DIRECT_READ: KV_READY -> reads -> KV_READ_DONE -> KV_RESULT) writes
//    this rank's pool only from its own reads, so a cancel or timeout
//    settles as soon as those reads stopped, whatever the writers do;
//    a cancel or timeout with writers in flight: on the bounce path the
//    request settles at once and its slot goes to QUARANTINED until every
//    writer is terminal; on per-block and direct it settles only once every
//    writer is terminal. A writer is terminal with its KV_RESULT — sent only
//    after its writes ended — or with its connection's failure, which the
//    transport reports only behind its fence; a writer silent for the grace
//    period after a cancel has its connection declared dead.)
//
// by one transition function, on the agent's control thread only.
//
// Rules it keeps: duplicate results count once; results from unknown writers
// are rejected; a result with a wrong fingerprint or byte count fails its
// writer (DataLoss); the scatter starts only when every writer succeeded and
// the request completes only after the scatter landed; when a writer fails,
// the others are cancelled and drained before the slot is released; per-block
// and direct requests that are cancelled or time out settle only once their
// writers stopped writing into the pool.
//
// Reservation: the control thread never blocks. A bounce request whose
// writers each send at most one chunk (StreamChunkBytes) reserves one recv
// slot for all of them: one that finds no hole waits in a FIFO until a slot
// is released or reserve_timeout_ms passes, then falls back to per-block
// ("recv arena backpressure").
//
// Streaming bounce (docs/sessions.md, "Streaming bounce"): any other bounce
// request streams. It waits in the same FIFO for admission (a bounded number
// of streams at once: their windows must fit the arena, or it streams
// alone), then asks its writers for chunks of StreamChunkBytes and grants
// them chunk slots one at a time (KV_GRANT), round-robin over every admitted
// writer of every stream, at most kWindowPerWriter per writer; each chunk
// announced (KV_CHUNK) is scattered at once and its slot returns to the
// arena, to be granted again. The request settles when every writer
// succeeded and every chunk was scattered; on cancel, deadline or failure it
// settles once its scatters stopped, and the chunk slots a writer may still
// write stay quarantined until that writer is terminal.
//
// Thread safety: every method REQUIRES the control thread.
#ifndef KVBOUNCE_SESSION_RECEIVER_H_
#define KVBOUNCE_SESSION_RECEIVER_H_

#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "kvbounce/agent.h"
#include "session/path_choice.h"
#include "session/reservation_queue.h"
#include "session/session_context.h"
#include "session/transfer_state.h"

namespace kvbounce {

class ReceiverSession {
 public:
  // `cancel_hook(request_id, slice)` is what a Transfer handle calls (from
  // any thread) to cancel; the agent routes it back to Cancel on the loop.
  using CancelHook = std::function<void(uint64_t request_id, uint32_t slice)>;

  ReceiverSession(SessionContext& ctx, CancelHook cancel_hook);
  ~ReceiverSession();
  ReceiverSession(const ReceiverSession&) = delete;
  ReceiverSession& operator=(const ReceiverSession&) = delete;

  // Plans and starts a pull; see Agent::Pull for the errors.
  Result<std::shared_ptr<Transfer>> Pull(uint64_t request_id, const std::string& ctx_instance,
                                         std::vector<int32_t> block_table, TokenRange tokens,
                                         const PullOptions& options);

  // See Agent::Paths.
  Result<std::vector<TransferPath>> Paths(const std::string& ctx_instance) const;

  void OnResult(PeerState& peer, const protocol::KvResult& result);
  void OnChunk(PeerState& peer, const protocol::KvChunk& chunk);
  void OnReady(PeerState& peer, const protocol::KvReady& ready);
  void OnPeerFailure(PeerState& peer);
  // Cancels slice `slice` of `request_id` with `why` (kCancelled, kAborted).
  void Cancel(uint64_t request_id, uint32_t slice, const Status& why);

  // Shutdown: cancels every request with kAborted.
  void CancelAll(const Status& why);
  // True when no request is in flight and no slot waits for writers.
  bool Idle() const { return requests_.empty(); }
  // After the transport stopped and this agent's regions were deregistered
  // (which waits for every peer's write and mapped access into them): no
  // byte can land any more. Settles whatever is left and releases every
  // quarantined slot.
  void Abandon(const Status& why);

 private:
  enum class State { kReserving, kInFlight, kScattering, kDone, kFailed, kQuarantined };
  enum class WriterState { kPending, kSucceeded, kFailed, kCancelled };
  struct ChunkSlot;
  struct Writer;
  struct Request;
  using Key = std::pair<uint64_t, uint32_t>;  // (request id, slice)

  static const char* StateName(State state);
  // The one transition function: checks the move is allowed.
  void Transition(Request& r, State next);

  // What the connection to `peer` offers a pull: its link cost, whether
  // direct works (mapped or read) and what a read costs, a send arena.
  WriterLoad LinkLoad(const PeerState& peer) const;
  // Plans `writer`'s scatter list (tiled when the copy engine takes tiled
  // lists) and sets its bytes and fingerprint.
  Status PlanScatter(const PlanSide& writer_side, const PlanSide& our_side, TokenRange tokens,
                     Writer& writer) const;
  // The plan sides of a request: this rank's (block table, state slot) and
  // a writer's as its HELLO described it (its table when lent, its state
  // slot unknown).
  PlanSide OurSide(const Request& r) const;
  PlanSide WriterSide(const PeerState& peer, int rank, std::span<const int32_t> table) const;
  // `auto`'s inputs: fills each writer's gather and direct run counts in
  // `loads` (one per writer, in order) when more than per-block is possible.
  // `bounce_dominated` (every writer copies into this rank's pool): only
  // the direct runs are counted, and only until per-block cannot win
  // (PerBlockLosesFrom; docs/paths.md, "Run counts"), and the gather and
  // scatter runs set to the least they can be, which still prices bounce
  // above direct.
  Status CountWriterRuns(const Request& r, bool recv_arena, bool bounce_dominated,
                         std::span<WriterLoad> loads) const;
  void TryReserve(Request& r);
  // Streaming: the chunk size for a request of `writers` writers (0: the
  // arena is too small to stream): bounce_chunk_mb or its default, at most
  // the arena's share of one writer — half of it with host pools while that
  // is at least kMinPipelinedChunk —, the recv-arena bytes an admitted stream
  // counts for, admission, and the grants.
  uint64_t StreamChunkBytes(size_t writers) const;
  static uint64_t StreamNeed(const Request& r);
  void Admit(Request& r);
  void EndStream(Request& r);
  bool WantsGrant(const Request& r, const Writer& w) const;
  // Grants chunk slots round-robin while the arena has room (see file
  // comment); holds back while a whole-slot request waits at the head of
  // the FIFO, so that streams cannot starve it.
  void PumpGrants();
  void StartChunkScatter(Request& r, size_t writer, uint64_t chunk);
  void OnChunkScattered(Key key, size_t writer, uint64_t chunk, const Status& status);
  void AdvanceStream(Request& r);
  // A terminal writer's chunk slots that are not being scattered go back.
  void ReleaseChunkSlots(Writer& w);
  // Arena space came back: whole-slot waiters first, then grants.
  void OnArenaSpace();
  void OnReserveTimeout(Key key);
  void FallBack(Request& r, const std::string& reason);
  // Settles a request none of whose writers was asked anything yet.
  void AbandonUnsent(Request& r, const Status& why);
  void SendRequests(Request& r);
  void OnDeadline(Key key);
  void WriterDone(Request& r, Writer& w, WriterState state, const Status& error);
  // The writer of a KV_RESULT, KV_READY: checked against the request.
  Writer* FindWriter(Request& r, const PeerState& peer, uint32_t writer_rank);
  // Direct read: copies writer `index`'s lent blocks into the pool.
  void StartReads(Request& r, size_t index, const protocol::KvReady& ready);
  // StartReads where the writer's pool is mapped here: `plan` (its lists
  // at the mapped addresses, tiled when `tiled`) copied by this rank's
  // engine in one batch, under BeginMappedRead accesses.
  void StartMappedRead(Request& r, size_t index, const PeerState& peer,
                       std::shared_ptr<PairPlan> plan, bool tiled);
  void OnReadDone(Key key, size_t index, const Status& status);
  // Tells a writer whose loan this rank gave up that it may end it.
  void EndLoan(Request& r, const Writer& w, const Status& why);
  void Advance(Request& r);
  void StartScatter(Request& r);
  void OnScatterDone(Key key, const Status& status);
  void StopWriters(Request& r, const std::string& reason);
  // Settles the application's transfer (once) and records metrics.
  void Settle(Request& r, const Status& outcome);
  // Erases r when nothing refers to it any more; releases its quarantine.
  void MaybeRetire(Request& r);
  void RetryReservations();
  TransferInfo Info(const Request& r) const;
  Request* Find(Key key);

  SessionContext& ctx_;
  CancelHook cancel_hook_;
  std::map<Key, std::unique_ptr<Request>> requests_;
  std::map<uint64_t, uint32_t> active_;  // request id -> slice not yet settled
  ReservationQueue<Key> reserve_waiters_;
  // Streaming: every admitted stream's writers in grant order, the next to
  // serve, and the recv-arena bytes the admitted streams count for.
  std::vector<std::pair<Key, size_t>> grant_ring_;
  size_t grant_cursor_ = 0;
  uint64_t admitted_need_ = 0;
  size_t admitted_streams_ = 0;
  bool pumping_ = false;
  static constexpr size_t kWindowPerWriter = 3;
  // The smallest chunk StreamChunkBytes cuts to give each writer of a host
  // pool two chunk slots of the arena: below it a chunk's fixed costs (its
  // frames and hand-offs) outweigh the overlap (UCX shared memory: 1 MiB
  // chunks measured 9-27 % slower than 2 MiB ones, docs/PERFORMANCE.md).
  static constexpr uint64_t kMinPipelinedChunk = uint64_t{1} << 20;
  static constexpr size_t kRecentRetired = 4096;
  std::set<Key> recent_;
  std::deque<Key> recent_order_;
};

}  // namespace kvbounce

#endif  // KVBOUNCE_SESSION_RECEIVER_H_
