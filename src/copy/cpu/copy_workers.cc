#include "copy/cpu/copy_workers.h"

#include <algorithm>
#include <cstdlib>
#include <string>
#include <system_error>
#include <utility>

#include "kvbounce/logging.h"

namespace kvbounce {

Result<std::shared_ptr<CopyWorkers>> CopyWorkers::Create(int num_threads) {
  if (num_threads < 1 || num_threads > kMaxThreads) {
    return InvalidArgumentError("copy workers: num_threads = " + std::to_string(num_threads) +
                                " is invalid: must be 1 to " + std::to_string(kMaxThreads));
  }
  std::shared_ptr<CopyWorkers> pool(new CopyWorkers());
  pool->threads_.reserve(static_cast<size_t>(num_threads));
  for (int i = 0; i < num_threads; ++i) {
    // std::thread reports failure by throwing; the library reports Status.
    try {
      pool->threads_.emplace_back([raw = pool.get()] { raw->WorkerLoop(); });
    } catch (const std::system_error& e) {
      pool->StopAndJoin();
      return ResourceExhaustedError(std::string("copy workers: cannot start a thread: ") +
                                    e.what());
    }
  }
  return pool;
}

int CopyWorkers::SharedThreads() {
  const unsigned hardware = std::thread::hardware_concurrency();
  return static_cast<int>(std::clamp(hardware, 1u, static_cast<unsigned>(kMaxSharedThreads)));
}

Result<std::shared_ptr<CopyWorkers>> CopyWorkers::Shared() {
  static std::mutex mu;
  static std::weak_ptr<CopyWorkers> shared;
  std::lock_guard<std::mutex> lock(mu);
  if (std::shared_ptr<CopyWorkers> live = shared.lock()) return live;
  KVB_ASSIGN_OR_RETURN(std::shared_ptr<CopyWorkers> pool, Create(SharedThreads()));
  shared = pool;
  return pool;
}

CopyWorkers::~CopyWorkers() {
  if (OnWorkerThread()) {
    Log(LogLevel::kError,
        "copy workers destroyed on one of their own threads (a task dropped the last "
        "reference); aborting");
    std::abort();
  }
  StopAndJoin();
}

void CopyWorkers::StopAndJoin() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  work_cv_.notify_all();
  for (std::thread& t : threads_) t.join();
  threads_.clear();
}

bool CopyWorkers::Post(Task task) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return false;
    queue_.push_back(std::move(task));
  }
  work_cv_.notify_one();
  return true;
}

bool CopyWorkers::PostAll(std::vector<Task> tasks) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return false;
    for (Task& t : tasks) queue_.push_back(std::move(t));
  }
  if (tasks.size() == 1) {
    work_cv_.notify_one();
  } else {
    work_cv_.notify_all();
  }
  return true;
}

bool CopyWorkers::OnWorkerThread() const {
  const std::thread::id self = std::this_thread::get_id();
  return std::any_of(threads_.begin(), threads_.end(),
                     [self](const std::thread& t) { return t.get_id() == self; });
}

void CopyWorkers::WorkerLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    work_cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
    // Accepted work is drained before a stopping worker exits.
    if (queue_.empty()) return;
    Task task = std::move(queue_.front());
    queue_.pop_front();
    lock.unlock();
    task();
    task = nullptr;  // whatever it holds dies unlocked
    lock.lock();
  }
}

}  // namespace kvbounce
