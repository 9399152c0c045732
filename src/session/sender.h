// SenderSession: the ctx side of an agent (docs/sessions.md; docs/sessions.md).
//
// A request's KV becomes available with Publish; KV_REQUESTs for it may
// arrive before or after that — they rendezvous by request id, a KV_REQUEST
// waiting at most until its deadline plus the grace period (the receiver
// times out first and cancels). Each KV_REQUEST becomes a job that
// follows the path the receiver chose:
//
//   per-block  one transport write per direct-list fragment, pool to pool
//   bounce     gather into a send slot, one write into the receiver's recv
//              slot; when no send slot frees up within reserve_timeout_ms
//              (or the stream is larger than the send arena) the gather runs
//              are written from the pool straight into the recv slot instead
//              ("send arena backpressure"), so the receiver's scatter is the
//              same either way
//   direct     one batched copy from the pool into the mapped receiver pool,
//              under a MappedAccess of the receiver's regions; or, where the
//              receiver reads instead (the DIRECT_READ request of a
//              transport that reads peer memory, between processes), the
//              job lends its blocks: KV_READY names them, the receiver
//              copies them into its own pool and says KV_READ_DONE, and the
//              job reports SUCCESS only if its publication still held the
//              blocks then (the receiver discards what it read otherwise)
//
// Settle-safety (docs/sessions.md "Settled means settled"):
//   * A job reports exactly one KV_RESULT, and only once none of its
//     operations can touch memory any more: every copy and write it issued
//     completed or was stopped (stop tokens make that prompt) and, when any
//     write was issued, a transport Flush completed (or the transport's
//     writes land before they report: writes_land_at_completion). A KV_RESULT of any
//     status is therefore the writer's promise that nothing more of the job
//     lands at the receiver. A job whose flush fails reports nothing and
//     disconnects the peer instead (the transport's fence then speaks).
//   * A publication counts its readers: the jobs whose operations may still
//     read its blocks (per-block and write-from-pool writes, a gather, a
//     direct copy, a lending). Once its outcome is decided — every receiver served,
//     Retire, the Transfer's Cancel, its ttl, shutdown — no new job reads
//     its blocks, the jobs still running are stopped, and the transfer
//     settles as soon as the readers are 0. A job whose publication was
//     decided before it reported reports CANCELLED, never SUCCESS.
//
// A send slot is released once its write completed or failed.
//
// Thread safety: every method REQUIRES the control thread (or, for Abandon,
// a thread that has taken the control thread's place after it stopped).
#ifndef KVBOUNCE_SESSION_SENDER_H_
#define KVBOUNCE_SESSION_SENDER_H_

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <stop_token>
#include <string>
#include <tuple>
#include <vector>

#include "kvbounce/agent.h"
#include "session/reservation_queue.h"
#include "session/session_context.h"
#include "session/transfer_state.h"

namespace kvbounce {

class SenderSession {
 public:
  // `retire_hook(request_id)` is what a publication's Cancel calls (from any
  // thread); the agent routes it back to Retire on the loop.
  using RetireHook = std::function<void(uint64_t request_id)>;

  SenderSession(SessionContext& ctx, RetireHook retire_hook);
  ~SenderSession();
  SenderSession(const SenderSession&) = delete;
  SenderSession& operator=(const SenderSession&) = delete;

  // See Agent::Publish. REQUIRES: the arguments passed the agent's API-edge
  // checks (role, num_tokens, the block table, the ttl).
  Result<std::shared_ptr<Transfer>> Publish(uint64_t request_id, std::vector<int32_t> block_table,
                                            int64_t num_tokens, const PublishOptions& options);
  // Decides the publication's outcome (`why`) and stops its jobs; its
  // transfer settles once no job reads its blocks. OK when it was already
  // being settled. Errors: kNotFound.
  Status Retire(uint64_t request_id, const Status& why);

  void OnRequest(PeerState& peer, const protocol::KvRequest& request);
  void OnCancel(PeerState& peer, const protocol::Cancel& cancel);
  void OnReadDone(PeerState& peer, const protocol::KvReadDone& done);
  void OnGrant(PeerState& peer, const protocol::KvGrant& grant);
  void OnPeerFailure(PeerState& peer);

  // Shutdown: settles every publication with `why` (once its readers are
  // done) and stops every job.
  void AbortAll(const Status& why);
  // True when no job is in flight and every publication has settled.
  bool Idle() const { return jobs_.empty() && publications_.empty(); }
  // After the transport and the copy engine stopped and every completion
  // ran: settles and drops whatever is left.
  void Abandon(const Status& why);

 private:
  struct Job;
  struct Publication;
  using Key = std::tuple<PeerId, uint64_t, uint32_t>;  // (peer, request, slice)
  enum class JobState {
    kParked,
    kReserving,
    kGathering,
    kWriting,
    kCopying,
    kLent,  // the receiver reads the blocks (direct read)
    kFlushing,
    kDone
  };

  // The data plane of a job: each variant's steps start in one function
  // (Start dispatches on it) and continue in the handlers named beside it.
  //   kPerBlock      StartPerBlock: the direct list grouped into writes from
  //                  the pool straight into the receiver's pool
  //                  -> IssueWrites -> flush -> KV_RESULT.
  //   kBounce        StartBounce: a send slot (Reserve) -> gather into it
  //                  (OnGathered) -> one write into the granted recv slot
  //                  -> flush -> KV_RESULT. A stream larger than the send
  //                  arena streams through it (StartStream): units of a
  //                  quarter of the arena, each gathered into one of
  //                  kStreamLanes lane slots (PumpLanes -> OnUnitGathered)
  //                  and written into the recv slot at its offset
  //                  (-> OnUnitWritten, which gathers the lane's next
  //                  unit), so one unit's gather overlaps another's write
  //                  -> flush -> KV_RESULT. Without a slot (no arena,
  //                  backpressure, not even one lane free) the gather runs
  //                  are written from the pool into the recv slot instead
  //                  (WriteFromPool).
  //                  A streamed request (KV_REQUEST.chunk_bytes > 0, no
  //                  recv slot; docs/sessions.md "Streaming bounce") runs
  //                  the same lanes over granted chunks (StartStreamed):
  //                  each KV_GRANT (OnGrant) queues its chunk's units with
  //                  the granted slot as destination; once a chunk's
  //                  units are written, a flush, then KV_CHUNK
  //                  (AnnounceChunk); after the last chunk, KV_RESULT.
  //                  Lanes are held only while units wait, so a job that
  //                  waits for grants holds no send-arena bytes.
  //   kStagedBounce  bounce from a pool the transport cannot reach (device
  //                  memory over a host-only link, docs/cuda.md): the same
  //                  steps, but the gathered send slot is the only source,
  //                  so a job that gets no slot fails naming why.
  //   kMappedBounce  bounce where the receiver's recv arena is mapped here
  //                  (a transport with map_remote, Config::
  //                  bounce_gather_mapped): StartBounce's checks, then
  //                  GatherIntoMappedSlot gathers
  //                  straight into the granted recv slot under a
  //                  MappedAccess of the arena -> OnCopied -> KV_RESULT; no
  //                  send slot, no transport write, no flush (the copy has
  //                  landed when it reports). Streamed, each granted chunk
  //                  is gathered straight into its slot the same way (a
  //                  lane per chunk, no send-arena slot) -> KV_CHUNK.
  //   kDirect        StartDirect: the copy engine copies the direct list
  //                  into the receiver's pool, mapped here -> KV_RESULT.
  //   kLend          Lend (direct read): KV_READY with our block table; the
  //                  receiver reads and answers KV_READ_DONE -> KV_RESULT.
  enum class DataPath { kPerBlock, kBounce, kStagedBounce, kMappedBounce, kDirect, kLend };
  static const char* DataPathName(DataPath path);

  static const char* StateName(JobState state);
  // The one transition function of a job: checks the move is allowed.
  void Transition(Job& job, JobState next);

  void Start(Job& job);
  void StartPerBlock(Job& job, PeerState& peer);
  void StartBounce(Job& job, PeerState& peer);
  // kMappedBounce, whole slot: the gather straight into the recv slot.
  void GatherIntoMappedSlot(Job& job, PeerState& peer);
  void StartDirect(Job& job, PeerState& peer);
  // Submits the job's copy `batch`, which writes into `regions` of the
  // peer (mapped here), holding a MappedAccess of each until the copy
  // ended; the end reaches OnCopied. `what` names the copy in errors.
  void CopyIntoPeer(Job& job, std::span<const RemoteRegion* const> regions, const CopyBatch& batch,
                    const char* what);
  // Where the peer's recv-arena bytes [addr, addr + bytes) are mapped here.
  // Errors: kDataLoss when they are not inside the arena.
  Result<Addr> MappedRecvAddress(const PeerState& peer, uint64_t addr, uint64_t bytes) const;
  void Lend(Job& job);
  void Reserve(Job& job);
  void OnReserveTimeout(Key key);
  // Streaming through the send arena (see kBounce above).
  static constexpr int kStreamLanes = 2;
  // A lane's size for a send arena of `capacity` bytes.
  static uint64_t LaneBytes(uint64_t capacity);
  void StartStream(Job& job);
  void StartStreamed(Job& job);
  void AcceptGrant(Job& job, const protocol::KvGrant& grant);
  // Gathers queued units into free lanes, reserving lanes as needed.
  void PumpLanes(Job& job);
  // Makes the gather list ready to be sliced into units: tiled where it is
  // in packed order (each unit a tiled list the engine expands), else flat.
  void PrepareSlicing(Job& job);
  void GatherUnit(Job& job, size_t lane_index);
  void OnUnitGathered(Key key, size_t lane_index, const Status& status);
  void OnUnitWritten(Key key, size_t lane_index, const Status& status);
  void AnnounceChunk(Job& job, uint64_t chunk);
  void OnChunkFlushed(Key key, uint64_t chunk, const Status& status);
  // Once nothing of the stream is in the air: frees the lanes and, when
  // the stream is complete or stopped, the blocks, and finishes the job (or
  // reports a job already finished).
  void EndStreamIfIdle(Job& job);
  void RetryReservations();
  // A bounce job that gets no send slot: writes from the pool (kBounce) or
  // fails (kStagedBounce).
  void WithoutSendSlot(Job& job, const std::string& reason);
  void WriteFromPool(Job& job, const std::string& reason);
  void OnGathered(Key key, const Status& status);
  void IssueWrites(Job& job);
  void OnWriteDone(Key key, const Status& status);
  void OnWritesDone(Job& job);
  void OnCopied(Key key, const Status& status);
  void OnFlushed(Key key, const Status& status);

  // The job now may read its publication's blocks / no longer does.
  void AcquireBlocks(Job& job);
  void ReleaseBlocks(Job& job);

  // Decides the job's outcome (the first one counts) and stops its
  // operations; the job reports once they all ended (MaybeReport).
  void Finish(Job& job, const Status& status);
  // Reports the job when its outcome is decided and nothing is in flight:
  // flushes first when it wrote, then sends KV_RESULT, records it, credits
  // its publication and erases it.
  void MaybeReport(Job& job);
  void Report(Job& job);
  Job* Find(const Key& key);
  void Unpark(const Key& key, uint64_t request_id);

  // Decides a publication's outcome once; settles it when no job reads its
  // blocks any more.
  void DecidePublication(Publication& pub, const Status& outcome);
  void MaybeSettlePublication(uint64_t request_id);

  SessionContext& ctx_;
  RetireHook retire_hook_;
  std::map<Key, std::unique_ptr<Job>> jobs_;
  std::map<uint64_t, std::unique_ptr<Publication>> publications_;
  std::map<uint64_t, std::vector<Key>> parked_;  // request id -> jobs waiting for Publish
  ReservationQueue<Key> reserve_waiters_;
};

}  // namespace kvbounce

#endif  // KVBOUNCE_SESSION_SENDER_H_
