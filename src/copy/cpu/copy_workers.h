// CopyWorkers: the threads that run CPU copy engines' batches
// (docs/architecture.md §7), shared by every engine of a process that asks
// for the shared pool.
//
// Each agent owns a copy engine; an in-process cluster (the bench over
// loopback, a test) runs many agents in one process. With a pool of
// threads per engine such a process starts agents × threads copy threads,
// far more than it has cores, and large copies then run slower than with
// one thread per core (oversubscribed threads evict each other's cache
// lines and wait for the scheduler). Shared() gives every engine that asks
// the same pool, sized by the machine: min(kMaxSharedThreads, hardware
// threads) workers for the whole process.
//
// Work: Post queues a task; the workers run tasks first come, first served
// across every engine that posts, each on one worker, never two at once
// with the pool's lock held. A task must not block on another task.
//
// Lifetime: the pool lives as long as a shared_ptr to it does (Shared()
// keeps only a weak reference: the pool of a process whose engines are all
// gone is joined, and the next Shared() starts a new one). Its destructor
// refuses new tasks (Post returns false), runs every task already queued
// and joins the workers. REQUIRES: the last reference is not dropped on one
// of the pool's own workers (a task that destroys the last engine holding
// the pool); doing so is reported and aborts.
//
// Thread safety: every member is thread-safe.
#ifndef KVBOUNCE_COPY_CPU_COPY_WORKERS_H_
#define KVBOUNCE_COPY_CPU_COPY_WORKERS_H_

#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "kvbounce/status.h"

namespace kvbounce {

class CopyWorkers {
 public:
  using Task = std::function<void()>;

  // The shared pool's size: at most this many threads, fewer on a machine
  // with fewer hardware threads.
  static constexpr int kMaxSharedThreads = 4;
  static constexpr int kMaxThreads = 256;

  // A pool of its own with `num_threads` workers (1 to kMaxThreads).
  // Errors: kInvalidArgument for a bad count; kResourceExhausted when a
  // thread cannot be started (those started are joined first).
  static Result<std::shared_ptr<CopyWorkers>> Create(int num_threads);

  // The process's shared pool (see the file comment): the one that exists
  // while anyone holds it, else a new one. Errors: Create's.
  static Result<std::shared_ptr<CopyWorkers>> Shared();

  // min(kMaxSharedThreads, hardware threads), at least 1.
  static int SharedThreads();

  ~CopyWorkers();
  CopyWorkers(const CopyWorkers&) = delete;
  CopyWorkers& operator=(const CopyWorkers&) = delete;

  // Queues `task` and wakes a worker (PostAll: `tasks`, waking as many
  // workers). False, and nothing is queued, once the pool is being
  // destroyed.
  bool Post(Task task);
  bool PostAll(std::vector<Task> tasks);

  // Whether the calling thread is one of this pool's workers.
  bool OnWorkerThread() const;

  int num_threads() const { return static_cast<int>(threads_.size()); }

 private:
  CopyWorkers() = default;
  void WorkerLoop();
  void StopAndJoin();

  std::vector<std::thread> threads_;  // written only by Create and StopAndJoin
  mutable std::mutex mu_;
  std::condition_variable work_cv_;
  std::deque<Task> queue_;  // guarded by mu_
  bool stopping_ = false;   // guarded by mu_
};

}  // namespace kvbounce

#endif  // KVBOUNCE_COPY_CPU_COPY_WORKERS_H_
