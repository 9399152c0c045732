// The line protocol of `kvbounce worker` (README "Running across
// processes"): how a parent — `kvbounce bench --transport ucx`, or a script —
// drives one worker over its stdin and stdout. One command per line in, one
// reply per line out; fields are separated by single spaces; numbers are
// base-10; a free-text message, where there is one, is the rest of the line.
//
// Commands (parent -> worker):
//   connect <address>...                     gen: Connect to the ctx ranks
//   publish <request_id> <slot> <tokens>     ctx: publish slot's table for [0, tokens)
//   pull <request_id> <slot> <tokens> <path> [<start>]
//                                            gen: pull [start, tokens) into the
//                                            slot's table for this request
//                                            (start: the worker's --start-token)
//   cancel <request_id>                      cancel a pull or a publication
//   stats                                    the agent's counters
//   quit                                     settle everything, shut down, exit
//
// Replies (worker -> parent):
//   ready <address> <caps-json>              once listening (first line)
//   connected <count> <paths>                a connect succeeded; gen: the paths
//                                            a pull can take now, comma-separated
//                                            (Agent::Paths), e.g.
//                                            "per-block,bounce,direct"
//   done <request_id> <CODE> <bytes> <latency_us> <verified_bytes> <mismatches>
//        <path_taken> <transport_writes> <settled_ns>[ <message>]
//                                            a publish or pull settled (or could
//                                            not start); exactly one per request
//   stats <json>                             the answer to `stats`
//   error <command> <message>                a command without a request id failed
//   bye <json>                               the last line: shut down, the summary
//
// <CODE> is a StatusCode name ("OK", "UNAVAILABLE", ...). <settled_ns> is
// the worker's steady clock (CLOCK_MONOTONIC on Linux, shared by the
// processes of one host) when the request settled. A gen rank verifies the
// slot before it answers: <verified_bytes> checked, <mismatches> rows wrong,
// the first described in <message>; a ctx rank answers 0 for both.
//
// Thread safety: pure functions.
#ifndef KVBOUNCE_TOOLS_WORKER_PROTOCOL_H_
#define KVBOUNCE_TOOLS_WORKER_PROTOCOL_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "kvbounce/config.h"
#include "kvbounce/status.h"

namespace kvbounce::tools {

enum class WorkerCommandKind { kConnect, kPublish, kPull, kCancel, kStats, kQuit };

struct WorkerCommand {
  WorkerCommandKind kind = WorkerCommandKind::kQuit;
  std::vector<std::string> addresses;       // connect
  uint64_t request_id = 0;                  // publish, pull, cancel
  int slot = 0;                             // publish, pull
  int64_t tokens = 0;                       // publish, pull: the end of the range
  int64_t start = -1;                       // pull: -1 when not given
  TransferPath path = TransferPath::kAuto;  // pull
};

// Parses one command line (without its newline). Errors (kInvalidArgument):
// an unknown command (the message lists the known ones), a missing or extra
// field, a number that is not a base-10 integer in range (slot >= 0,
// tokens >= 1, start >= 0), an unknown path.
Result<WorkerCommand> ParseWorkerCommand(std::string_view line);
std::string FormatWorkerCommand(const WorkerCommand& command);

struct DoneReply {
  uint64_t request_id = 0;
  StatusCode code = StatusCode::kOk;
  uint64_t bytes = 0;
  int64_t latency_us = 0;
  uint64_t verified_bytes = 0;
  uint64_t mismatches = 0;
  std::string path_taken = "-";
  uint64_t transport_writes = 0;
  int64_t settled_ns = 0;
  std::string message;  // empty when none; never holds a newline
};

// "done ..." (newlines in the message become spaces).
std::string FormatDone(const DoneReply& done);
// Parses a whole "done ..." line. Errors (kInvalidArgument): another
// keyword, a missing field, a malformed number or code.
Result<DoneReply> ParseDone(std::string_view line);

// The first word of a reply line and the rest after its space ("" if none).
struct ReplyLine {
  std::string_view keyword;
  std::string_view rest;
};
ReplyLine SplitReply(std::string_view line);

// The inverse of StatusCodeName. Errors: kInvalidArgument.
Result<StatusCode> ParseStatusCode(std::string_view name);

}  // namespace kvbounce::tools

#endif  // KVBOUNCE_TOOLS_WORKER_PROTOCOL_H_
