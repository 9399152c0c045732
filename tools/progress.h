// Progress of `kvbounce bench` and `kvbounce sweep` on standard error: a live
// line redrawn in place when it is a terminal (requests done per path, the
// current path's GB/s, elapsed time, estimated time left), plain lines
// otherwise — one when a path run ends and one every `plain_interval` while
// it runs. Never written to the report's stream: the table and the JSON stay
// clean.
//
//   Progress progress(std::cerr, /*live=*/isatty(2), "kvbounce bench");
//   progress.SetTotal(paths * requests);
//   progress.StartPath("bounce", requests);
//   progress.Add(wave_requests, wave_bytes);   // after each wave
//   progress.EndPath();
//
// Thread safety: every method is thread-safe. A ticker thread (started by
// the constructor, joined by the destructor) redraws the live line or prints
// the periodic plain line; the destructor clears a live line it left. The
// ticker blocks every signal, so signals reach the threads that wait for
// them (a signalfd set up after the Progress was made).
#ifndef KVBOUNCE_TOOLS_PROGRESS_H_
#define KVBOUNCE_TOOLS_PROGRESS_H_

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <ostream>
#include <string>
#include <thread>
#include <vector>

namespace kvbounce::tools {

class Progress {
 public:
  using Clock = std::chrono::steady_clock;

  // `out` must outlive the object. `live`: redraw one line in place (a
  // terminal); otherwise plain lines. `command` starts every line.
  Progress(std::ostream& out, bool live, std::string command,
           std::chrono::milliseconds plain_interval = std::chrono::seconds(10),
           std::chrono::milliseconds live_interval = std::chrono::milliseconds(200));
  ~Progress();
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  // Requests the whole command will run (every path of every point): the
  // estimate of the time left. 0: unknown (no estimate).
  void SetTotal(int64_t requests);
  int64_t total() const;
  // What the command is at, shown before the paths ("point 2/5 tokens=4096");
  // it also forgets the paths of the stage before.
  void SetStage(std::string stage);
  // A path run of `requests` requests starts. A live line is cleared first,
  // so that a log line written now starts at the left.
  void StartPath(const std::string& path, int64_t requests);
  // `requests` more requests of the current path settled, `bytes` of payload.
  void Add(int64_t requests, uint64_t bytes);
  // The current path ended: a line for it (live: the final state of the
  // line, then a newline).
  void EndPath();

  // The text of the line now (for tests).
  std::string Line() const;

 private:
  struct PathState {
    std::string name;
    int64_t requests = 0;
    int64_t done = 0;
    uint64_t bytes = 0;
    Clock::time_point start;
    Clock::time_point end;
    bool ended = false;
  };

  std::string LineLocked(Clock::time_point now) const;
  void Tick();
  void ClearLocked();

  std::ostream& out_;
  const bool live_;
  const std::string command_;
  const std::chrono::milliseconds plain_interval_;
  const std::chrono::milliseconds live_interval_;
  const Clock::time_point start_ = Clock::now();

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;         // guarded by mu_
  int64_t total_ = 0;             // guarded by mu_
  int64_t done_ = 0;              // guarded by mu_ (every path, every stage)
  std::string stage_;             // guarded by mu_
  std::vector<PathState> paths_;  // guarded by mu_ (this stage's)
  bool drawn_ = false;            // guarded by mu_: a live line is on screen
  bool changed_ = false;          // guarded by mu_: since the last plain line
  Clock::time_point last_plain_;  // guarded by mu_
  std::jthread ticker_;           // last: joined first
};

}  // namespace kvbounce::tools

#endif  // KVBOUNCE_TOOLS_PROGRESS_H_
