#include "session/event_loop.h"

#include <string>
#include <system_error>

namespace kvbounce {

Result<std::unique_ptr<EventLoop>> EventLoop::Create() {
  std::unique_ptr<EventLoop> loop(new EventLoop());
  try {
    loop->thread_ = std::thread([raw = loop.get()] { raw->Run(); });
  } catch (const std::system_error& e) {
    return ResourceExhaustedError(std::string("cannot start the control thread: ") + e.what());
  }
  return loop;
}

EventLoop::~EventLoop() { Stop(); }

bool EventLoop::Post(Task task) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return false;
    tasks_.push_back(std::move(task));
  }
  cv_.notify_one();
  return true;
}

EventLoop::TimerId EventLoop::PostAt(Clock::time_point deadline, Task task) {
  TimerId id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return 0;
    id = next_timer_++;
    timers_.emplace(std::make_pair(deadline, id), std::move(task));
    timer_deadlines_.emplace(id, deadline);
  }
  cv_.notify_one();
  return id;
}

void EventLoop::CancelTimer(TimerId id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = timer_deadlines_.find(id);
  if (it == timer_deadlines_.end()) return;
  timers_.erase({it->second, id});
  timer_deadlines_.erase(it);
}

void EventLoop::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_one();
  std::lock_guard<std::mutex> join_lock(join_mu_);
  if (thread_.joinable()) thread_.join();
}

void EventLoop::Run() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    if (!tasks_.empty()) {
      Task task = std::move(tasks_.front());
      tasks_.pop_front();
      lock.unlock();
      task();
      lock.lock();
      continue;
    }
    if (stopping_) break;  // every posted task ran; pending timers are dropped
    if (!timers_.empty()) {
      auto first = timers_.begin();
      if (first->first.first <= Clock::now()) {
        Task task = std::move(first->second);
        timer_deadlines_.erase(first->first.second);
        timers_.erase(first);
        lock.unlock();
        task();
        lock.lock();
        continue;
      }
      cv_.wait_until(lock, first->first.first);
    } else {
      cv_.wait(lock);
    }
  }
  timers_.clear();
  timer_deadlines_.clear();
}

}  // namespace kvbounce
