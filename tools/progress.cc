#include "tools/progress.h"

#include <pthread.h>

#include <csignal>
#include <cstdio>

namespace kvbounce::tools {
namespace {

double Seconds(Progress::Clock::duration d) { return std::chrono::duration<double>(d).count(); }

std::string FormatSeconds(double s) {
  char buf[32];
  if (s < 60) {
    std::snprintf(buf, sizeof(buf), "%.1f s", s);
  } else {
    std::snprintf(buf, sizeof(buf), "%dm%02ds", static_cast<int>(s) / 60, static_cast<int>(s) % 60);
  }
  return buf;
}

}  // namespace

Progress::Progress(std::ostream& out, bool live, std::string command,
                   std::chrono::milliseconds plain_interval,
                   std::chrono::milliseconds live_interval)
    : out_(out),
      live_(live),
      command_(std::move(command)),
      plain_interval_(plain_interval),
      live_interval_(live_interval),
      last_plain_(start_) {
  // The ticker takes no signal: a process that reads SIGINT/SIGTERM from a
  // signalfd (the bench over UCX blocks them after this thread started)
  // must not have them delivered here, where they would end it.
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, &old);
  ticker_ = std::jthread([this] { Tick(); });
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
}

Progress::~Progress() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  ticker_ = std::jthread();  // joins
  std::lock_guard<std::mutex> lock(mu_);
  ClearLocked();
}

void Progress::SetTotal(int64_t requests) {
  std::lock_guard<std::mutex> lock(mu_);
  total_ = requests;
}

int64_t Progress::total() const {
  std::lock_guard<std::mutex> lock(mu_);
  return total_;
}

void Progress::SetStage(std::string stage) {
  std::lock_guard<std::mutex> lock(mu_);
  stage_ = std::move(stage);
  paths_.clear();
  changed_ = true;
}

void Progress::StartPath(const std::string& path, int64_t requests) {
  std::lock_guard<std::mutex> lock(mu_);
  ClearLocked();
  PathState p;
  p.name = path;
  p.requests = requests;
  p.start = Clock::now();
  paths_.push_back(std::move(p));
  changed_ = true;
}

void Progress::Add(int64_t requests, uint64_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  if (paths_.empty() || paths_.back().ended) return;
  paths_.back().done += requests;
  paths_.back().bytes += bytes;
  done_ += requests;
  changed_ = true;
}

void Progress::EndPath() {
  std::lock_guard<std::mutex> lock(mu_);
  if (paths_.empty() || paths_.back().ended) return;
  paths_.back().ended = true;
  paths_.back().end = Clock::now();
  const std::string line = LineLocked(Clock::now());
  if (live_) {
    out_ << "\r" << line << "\x1b[K\n";
    drawn_ = false;
  } else {
    out_ << line << "\n";
    last_plain_ = Clock::now();
    changed_ = false;
  }
  out_.flush();
}

std::string Progress::Line() const {
  std::lock_guard<std::mutex> lock(mu_);
  return LineLocked(Clock::now());
}

std::string Progress::LineLocked(Clock::time_point now) const {
  std::string line = command_ + ":";
  if (!stage_.empty()) line += " [" + stage_ + "]";
  for (size_t i = 0; i < paths_.size(); ++i) {
    const PathState& p = paths_[i];
    line += (i == 0 ? " " : ", ") + p.name + " " + std::to_string(p.done) + "/" +
            std::to_string(p.requests);
  }
  if (!paths_.empty()) {
    const PathState& p = paths_.back();
    const double s = Seconds((p.ended ? p.end : now) - p.start);
    char buf[64];
    std::snprintf(buf, sizeof(buf), " | %.2f GB/s",
                  s > 0 ? static_cast<double>(p.bytes) / s / 1e9 : 0);
    line += buf;
  }
  const double elapsed = Seconds(now - start_);
  line += " | elapsed " + FormatSeconds(elapsed);
  if (total_ > 0 && done_ > 0 && done_ < total_) {
    line += " | ETA " + FormatSeconds(elapsed / static_cast<double>(done_) *
                                      static_cast<double>(total_ - done_));
  } else if (total_ > 0 && done_ >= total_) {
    line += " | ETA 0.0 s";
  }
  return line;
}

void Progress::ClearLocked() {
  if (live_ && drawn_) {
    out_ << "\r\x1b[K";
    out_.flush();
    drawn_ = false;
  }
}

void Progress::Tick() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    cv_.wait_for(lock, live_ ? live_interval_ : std::chrono::milliseconds(100),
                 [&] { return stopping_; });
    if (stopping_) return;
    const bool running = !paths_.empty() && !paths_.back().ended;
    if (!running) continue;
    const auto now = Clock::now();
    if (live_) {
      out_ << "\r" << LineLocked(now) << "\x1b[K";
      out_.flush();
      drawn_ = true;
    } else if (changed_ && now - last_plain_ >= plain_interval_) {
      out_ << LineLocked(now) << "\n";
      out_.flush();
      last_plain_ = now;
      changed_ = false;
    }
  }
}

}  // namespace kvbounce::tools
