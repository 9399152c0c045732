#include "copy/copy_engine.h"

#include <condition_variable>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

namespace kvbounce {
namespace {

constexpr uint64_t kMaxU64 = std::numeric_limits<uint64_t>::max();

Status BadFragment(size_t index, const Fragment& f, std::string_view why) {
  return InvalidArgumentError("copy batch: fragment " + std::to_string(index) + " (src " +
                              std::to_string(f.src) + ", dst " + std::to_string(f.dst) +
                              ", bytes " + std::to_string(f.bytes) + "): " + std::string(why));
}

}  // namespace

Status ValidateCopyBatch(const CopyBatch& batch, uint64_t* total_bytes) {
  const uint64_t src_base = batch.src_base.value();
  const uint64_t dst_base = batch.dst_base.value();
  uint64_t total = 0;
  for (size_t i = 0; i < batch.fragments.size(); ++i) {
    const Fragment& f = batch.fragments[i];
    if (f.bytes == 0) continue;
    // Each end is checked as "start <= max - bytes" so nothing wraps.
    if (f.src > kMaxU64 - src_base || src_base + f.src > kMaxU64 - f.bytes) {
      return BadFragment(i, f, "source base + offset + bytes overflows 64 bits");
    }
    if (f.dst > kMaxU64 - dst_base || dst_base + f.dst > kMaxU64 - f.bytes) {
      return BadFragment(i, f, "destination base + offset + bytes overflows 64 bits");
    }
    const uint64_t src = src_base + f.src;
    const uint64_t dst = dst_base + f.dst;
    if (src == 0) return BadFragment(i, f, "source address is 0");
    if (dst == 0) return BadFragment(i, f, "destination address is 0");
    if (src < dst + f.bytes && dst < src + f.bytes) {
      return BadFragment(i, f, "source and destination ranges overlap");
    }
    if (total > kMaxU64 - f.bytes) {
      return InvalidArgumentError("copy batch: total bytes overflow 64 bits at fragment " +
                                  std::to_string(i));
    }
    total += f.bytes;
  }
  if (total_bytes != nullptr) *total_bytes = total;
  return Status::Ok();
}

Status CopyEngine::Submit(const CopyBatch& batch, CopyDone done, std::stop_token stop) {
  if (!done) return InvalidArgumentError("copy batch: the completion callback is empty");
  uint64_t total_bytes = 0;
  KVB_RETURN_IF_ERROR(ValidateCopyBatch(batch, &total_bytes));
  return SubmitValidated(batch, total_bytes, std::move(done), std::move(stop));
}

Status CopyEngine::SubmitOrCopyHere(const CopyBatch& batch, uint64_t inline_bytes, CopyDone done,
                                    std::stop_token stop) {
  if (!done) return InvalidArgumentError("copy batch: the completion callback is empty");
  uint64_t total_bytes = 0;
  KVB_RETURN_IF_ERROR(ValidateCopyBatch(batch, &total_bytes));
  if (inline_bytes == 0 || total_bytes > inline_bytes || !CopiesOnCallingThread()) {
    return SubmitValidated(batch, total_bytes, std::move(done), std::move(stop));
  }
  done(CopyValidatedHere(batch, total_bytes, stop));
  return Status::Ok();
}

Status CopyEngine::CopyValidatedHere(const CopyBatch& /*batch*/, uint64_t /*total_bytes*/,
                                     std::stop_token /*stop*/) {
  return UnimplementedError(std::string(Name()) + " copy engine cannot copy on the calling thread");
}

Status CopyEngine::CopySync(const CopyBatch& batch) {
  // Shared with the callback, which may still be unwinding on the engine
  // thread after the waiter has returned.
  struct Waiter {
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    Status status;
  };
  auto waiter = std::make_shared<Waiter>();
  KVB_RETURN_IF_ERROR(Submit(batch, [waiter](Status status) {
    std::lock_guard<std::mutex> lock(waiter->mu);
    waiter->status = std::move(status);
    waiter->done = true;
    waiter->cv.notify_one();
  }));
  std::unique_lock<std::mutex> lock(waiter->mu);
  waiter->cv.wait(lock, [&] { return waiter->done; });
  return std::move(waiter->status);
}

}  // namespace kvbounce
