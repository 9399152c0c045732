// SenderSession: the ctx side of an agent (DESIGN §10).
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
//   direct     one batched copy from the pool into the mapped receiver pool
//
// and ends with exactly one KV_RESULT — sent only after the transport's
// Flush, so the bytes it reports are visible — unless the receiver's
// connection died. A send slot is released once its write completed or
// failed. A CANCEL stops jobs that have not started writing; jobs already
// writing finish their writes and report CANCELLED.
//
// A publication settles OK once every gen rank of the pulling instance that
// this rank writes to has been served successfully (then its blocks may be
// reused), kDeadlineExceeded when its ttl passes first, kCancelled on Retire.
//
// Thread safety: every method REQUIRES the control thread.
#ifndef KVBOUNCE_SESSION_SENDER_H_
#define KVBOUNCE_SESSION_SENDER_H_

#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <set>
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

  // See Agent::Publish / Agent::Retire.
  Result<std::shared_ptr<Transfer>> Publish(uint64_t request_id, std::vector<int32_t> block_table,
                                            int64_t num_tokens, const PublishOptions& options);
  Status Retire(uint64_t request_id, const Status& why);

  void OnRequest(PeerState& peer, const protocol::KvRequest& request);
  void OnCancel(PeerState& peer, const protocol::Cancel& cancel);
  void OnPeerFailure(PeerState& peer);

  // Shutdown: fails jobs that have not started writing and settles every
  // publication with `why`; jobs already writing finish.
  void AbortAll(const Status& why);
  // True when no job is in flight.
  bool Idle() const { return jobs_.empty(); }
  // After the transport stopped: drops every job.
  void Abandon(const Status& why);

 private:
  struct Job;
  struct Publication;
  using Key = std::tuple<PeerId, uint64_t, uint32_t>;  // (peer, request, slice)

  void Start(Job& job);
  void Reserve(Job& job);
  void OnReserveTimeout(Key key);
  void RetryReservations();
  void WriteFromPool(Job& job, const std::string& reason);
  void OnGathered(Key key, const Status& status);
  void IssueWrites(Job& job);
  void OnWriteDone(Key key, const Status& status);
  // The job's bytes are visible at the receiver (its flush or its direct
  // copy completed), or `what` failed.
  void OnLanded(Key key, const Status& status, const char* what);
  // Ends a job: sends its KV_RESULT (when the peer is alive), records it,
  // credits its publication, and erases it once nothing async refers to it.
  void Finish(Job& job, const Status& status);
  void MaybeErase(Job& job);
  Job* Find(const Key& key);
  void SettlePublication(Publication& pub, const Status& status);

  SessionContext& ctx_;
  RetireHook retire_hook_;
  std::map<Key, std::unique_ptr<Job>> jobs_;
  std::map<uint64_t, std::unique_ptr<Publication>> publications_;
  std::map<uint64_t, std::vector<Key>> parked_;  // request id -> jobs waiting for Publish
  ReservationQueue<Key> reserve_waiters_;
};

}  // namespace kvbounce

#endif  // KVBOUNCE_SESSION_SENDER_H_
