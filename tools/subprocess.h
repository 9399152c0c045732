// Processes for `kvbounce bench --transport ucx` and `kvbounce worker`: a
// child process talked to line by line over a socket pair, a group of them
// read with one deadline, and signals read from a file descriptor instead of
// handled in a signal handler.
//
// A Child runs `executable args...` with its stdin and stdout connected to
// this process (one AF_UNIX stream socket pair; the parent's end is
// close-on-exec, so no other child inherits it and EOF means this child
// closed its end — it exited, or closed stdout). stderr is inherited. The
// child dies with its parent (PR_SET_PDEATHSIG, SIGKILL) and starts with an
// empty signal mask and default SIGINT/SIGTERM/SIGPIPE dispositions.
//
// Teardown is bounded: ChildGroup::Stop sends "quit", waits, then SIGTERM,
// waits, then SIGKILL, and reaps every child; a Child's destructor kills and
// reaps one still running. No child outlives its owner.
//
// Thread safety: none; one thread owns a Child, a ChildGroup or a
// SignalWatch. PR_SET_PDEATHSIG fires when the thread that spawned the child
// exits: spawn from a thread that lives as long as the children should.
#ifndef KVBOUNCE_TOOLS_SUBPROCESS_H_
#define KVBOUNCE_TOOLS_SUBPROCESS_H_

#include <sys/types.h>

#include <chrono>
#include <csignal>
#include <cstddef>
#include <deque>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kvbounce/status.h"

namespace kvbounce::tools {

using SteadyClock = std::chrono::steady_clock;

// Blocks `signals` in the calling thread (and so in every thread it starts
// afterwards) and makes them readable on fd(), a signalfd. The destructor
// discards those still pending and restores the previous mask.
class SignalWatch {
 public:
  // Errors: kInternal (sigprocmask or signalfd failed).
  static Result<std::unique_ptr<SignalWatch>> Create(std::initializer_list<int> signals);
  ~SignalWatch();
  SignalWatch(const SignalWatch&) = delete;
  SignalWatch& operator=(const SignalWatch&) = delete;

  int fd() const { return fd_; }
  // The next pending signal, 0 when none (never blocks).
  int Take();

 private:
  SignalWatch() = default;
  int fd_ = -1;
  sigset_t set_{};
  sigset_t old_{};
};

// "SIGTERM", "SIGKILL", ... ("signal 42" for others).
std::string SignalName(int sig);

// "exited with status 2", "killed by SIGKILL", ... for a waitpid status.
std::string DescribeWaitStatus(int status);

class Child {
 public:
  struct Options {
    std::string executable;                                // a path, run with execv
    std::vector<std::string> args;                         // argv[1..]
    std::vector<std::pair<std::string, std::string>> env;  // set in the child
    std::string name;                                      // for messages: "ctx rank 1"
  };

  // Errors: kInternal (socketpair or fork failed). A failed exec shows as
  // the child exiting with status 127.
  static Result<std::unique_ptr<Child>> Spawn(const Options& options);
  // Kills (SIGKILL) and reaps the child when it still runs.
  ~Child();
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  pid_t pid() const { return pid_; }
  const std::string& name() const { return name_; }
  // "ctx rank 1 (pid 4242)".
  std::string Who() const;

  // The socket to poll for reading; -1 once the child's output reached EOF.
  int fd() const { return eof_ ? -1 : fd_; }
  bool eof() const { return eof_; }
  // Writes `line` and a newline. Errors: kUnavailable (the child is gone).
  Status Send(std::string_view line);
  // Reads what the socket holds now (call when poll says readable); false
  // at EOF.
  bool ReadSome();
  // Reads everything the socket holds now, without waiting: after the child
  // was reaped, the rest of its output (nothing more can come).
  void Drain();
  // The next complete line read so far, without its newline.
  std::optional<std::string> NextLine();

  // Collects the exit status if the child has exited; with `wait_until`,
  // waits for it until then. True once reaped.
  bool Reap(std::optional<SteadyClock::time_point> wait_until = std::nullopt);
  bool reaped() const { return status_.has_value(); }
  // DescribeWaitStatus of the reaped child, or "still running".
  std::string DescribeExit() const;
  std::optional<int> wait_status() const { return status_; }
  // kill(pid, sig) unless it has exited (then it is reaped instead).
  void Signal(int sig);
  // The last signal Signal() sent; 0 if none.
  int signalled() const { return signalled_; }

 private:
  Child() = default;

  pid_t pid_ = -1;
  int fd_ = -1;
  bool eof_ = false;
  std::string name_;
  std::string buffer_;
  std::deque<std::string> lines_;
  std::optional<int> status_;
  int signalled_ = 0;
};

// Children read together: the next line from any of them, with a deadline.
class ChildGroup {
 public:
  // `signals`, when given, interrupts waits (it must outlive the group).
  explicit ChildGroup(SignalWatch* signals = nullptr) : signals_(signals) {}
  ~ChildGroup() { Stop(std::chrono::milliseconds(0), std::chrono::milliseconds(0)); }
  ChildGroup(const ChildGroup&) = delete;
  ChildGroup& operator=(const ChildGroup&) = delete;

  // Takes ownership; returns the child's index.
  size_t Add(std::unique_ptr<Child> child);
  size_t size() const { return children_.size(); }
  Child& at(size_t i) { return *children_[i]; }
  const Child& at(size_t i) const { return *children_[i]; }

  struct Line {
    size_t child = 0;
    std::string text;
  };
  // The next line from any child in `from` (indices; empty: every child),
  // oldest buffered first. Errors: kUnavailable "<who> died: <exit>" when a
  // child in `from` reached EOF with no line left (it is reaped, waiting up
  // to a second for its exit status); kDeadlineExceeded when `deadline`
  // passed; kAborted "interrupted by SIGINT" when a watched signal arrived.
  Result<Line> Next(SteadyClock::time_point deadline, const std::vector<size_t>& from = {});

  // Ends every child within about quit_wait + term_wait (+ the kernel's
  // time to deliver SIGKILL): sends "quit" to those still running, waits
  // until `quit_wait` for them to exit (reading their output), sends
  // SIGTERM to the rest, waits `term_wait`, sends SIGKILL and reaps. Lines
  // read meanwhile stay in each child's buffer (NextLine), and so does what
  // a child wrote before it went, killed or not: its output is read to the
  // end (a worker's parting "bye" is there). Idempotent.
  void Stop(std::chrono::milliseconds quit_wait, std::chrono::milliseconds term_wait);

 private:
  // Waits until every child is reaped or `until`; true if all are.
  bool WaitAll(SteadyClock::time_point until);

  SignalWatch* signals_;
  std::vector<std::unique_ptr<Child>> children_;
};

}  // namespace kvbounce::tools

#endif  // KVBOUNCE_TOOLS_SUBPROCESS_H_
