#include "tools/worker_protocol.h"

#include <charconv>

namespace kvbounce::tools {
namespace {

std::vector<std::string_view> Words(std::string_view line) {
  std::vector<std::string_view> words;
  size_t pos = 0;
  while (pos < line.size()) {
    while (pos < line.size() && line[pos] == ' ') ++pos;
    if (pos == line.size()) break;
    size_t end = line.find(' ', pos);
    if (end == std::string_view::npos) end = line.size();
    words.push_back(line.substr(pos, end - pos));
    pos = end;
  }
  return words;
}

template <typename T>
Result<T> ParseNumber(std::string_view what, std::string_view text, T min) {
  T value{};
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, value);
  if (text.empty() || ec != std::errc() || ptr != end) {
    return InvalidArgumentError(std::string(what) + " = '" + std::string(text) +
                                "' is not a base-10 integer in range");
  }
  if (value < min) {
    return InvalidArgumentError(std::string(what) + " = " + std::string(text) +
                                " is invalid: must be >= " + std::to_string(min));
  }
  return value;
}

Status Arity(std::string_view command, const std::vector<std::string_view>& words, size_t min,
             size_t max, std::string_view usage) {
  if (words.size() < min || words.size() > max) {
    return InvalidArgumentError(std::string(command) + ": expected '" + std::string(usage) + "'");
  }
  return Status::Ok();
}

}  // namespace

Result<StatusCode> ParseStatusCode(std::string_view name) {
  for (int c = 0; c <= static_cast<int>(StatusCode::kInternal); ++c) {
    if (StatusCodeName(static_cast<StatusCode>(c)) == name) return static_cast<StatusCode>(c);
  }
  return InvalidArgumentError("'" + std::string(name) + "' is not a status code");
}

Result<WorkerCommand> ParseWorkerCommand(std::string_view line) {
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  const std::vector<std::string_view> w = Words(line);
  if (w.empty()) return InvalidArgumentError("empty command");
  WorkerCommand c;
  const std::string_view name = w[0];
  if (name == "connect") {
    c.kind = WorkerCommandKind::kConnect;
    KVB_RETURN_IF_ERROR(Arity(name, w, 2, SIZE_MAX, "connect <address>..."));
    for (size_t i = 1; i < w.size(); ++i) c.addresses.emplace_back(w[i]);
  } else if (name == "publish") {
    c.kind = WorkerCommandKind::kPublish;
    KVB_RETURN_IF_ERROR(Arity(name, w, 4, 4, "publish <request_id> <slot> <tokens>"));
    KVB_ASSIGN_OR_RETURN(c.request_id, ParseNumber<uint64_t>("request_id", w[1], 0));
    KVB_ASSIGN_OR_RETURN(c.slot, ParseNumber<int>("slot", w[2], 0));
    KVB_ASSIGN_OR_RETURN(c.tokens, ParseNumber<int64_t>("tokens", w[3], 1));
  } else if (name == "pull") {
    c.kind = WorkerCommandKind::kPull;
    KVB_RETURN_IF_ERROR(Arity(name, w, 5, 6, "pull <request_id> <slot> <tokens> <path> [<start>]"));
    KVB_ASSIGN_OR_RETURN(c.request_id, ParseNumber<uint64_t>("request_id", w[1], 0));
    KVB_ASSIGN_OR_RETURN(c.slot, ParseNumber<int>("slot", w[2], 0));
    KVB_ASSIGN_OR_RETURN(c.tokens, ParseNumber<int64_t>("tokens", w[3], 1));
    Result<TransferPath> path = ParseTransferPath(w[4]);
    if (!path.ok()) return path.status().WithContext("pull");
    c.path = *path;
    if (w.size() == 6) {
      KVB_ASSIGN_OR_RETURN(c.start, ParseNumber<int64_t>("start", w[5], 0));
    }
  } else if (name == "cancel") {
    c.kind = WorkerCommandKind::kCancel;
    KVB_RETURN_IF_ERROR(Arity(name, w, 2, 2, "cancel <request_id>"));
    KVB_ASSIGN_OR_RETURN(c.request_id, ParseNumber<uint64_t>("request_id", w[1], 0));
  } else if (name == "stats") {
    c.kind = WorkerCommandKind::kStats;
    KVB_RETURN_IF_ERROR(Arity(name, w, 1, 1, "stats"));
  } else if (name == "quit") {
    c.kind = WorkerCommandKind::kQuit;
    KVB_RETURN_IF_ERROR(Arity(name, w, 1, 1, "quit"));
  } else {
    return InvalidArgumentError("unknown command '" + std::string(name) +
                                "' (known: connect, publish, pull, cancel, stats, quit)");
  }
  return c;
}

std::string FormatWorkerCommand(const WorkerCommand& c) {
  switch (c.kind) {
    case WorkerCommandKind::kConnect: {
      std::string out = "connect";
      for (const std::string& a : c.addresses) out += " " + a;
      return out;
    }
    case WorkerCommandKind::kPublish:
      return "publish " + std::to_string(c.request_id) + " " + std::to_string(c.slot) + " " +
             std::to_string(c.tokens);
    case WorkerCommandKind::kPull: {
      std::string out = "pull " + std::to_string(c.request_id) + " " + std::to_string(c.slot) +
                        " " + std::to_string(c.tokens) + " " +
                        std::string(TransferPathName(c.path));
      if (c.start >= 0) out += " " + std::to_string(c.start);
      return out;
    }
    case WorkerCommandKind::kCancel:
      return "cancel " + std::to_string(c.request_id);
    case WorkerCommandKind::kStats:
      return "stats";
    case WorkerCommandKind::kQuit:
      return "quit";
  }
  return "quit";
}

std::string FormatDone(const DoneReply& d) {
  std::string out = "done " + std::to_string(d.request_id) + " " +
                    std::string(StatusCodeName(d.code)) + " " + std::to_string(d.bytes) + " " +
                    std::to_string(d.latency_us) + " " + std::to_string(d.verified_bytes) + " " +
                    std::to_string(d.mismatches) + " " +
                    (d.path_taken.empty() ? std::string("-") : d.path_taken) + " " +
                    std::to_string(d.transport_writes) + " " + std::to_string(d.settled_ns);
  if (!d.message.empty()) {
    std::string message = d.message;
    for (char& ch : message) {
      if (ch == '\n' || ch == '\r') ch = ' ';
    }
    out += " " + message;
  }
  return out;
}

Result<DoneReply> ParseDone(std::string_view line) {
  // The ten fixed fields, then the message.
  std::vector<std::string_view> w;
  size_t pos = 0;
  while (w.size() < 10 && pos <= line.size()) {
    size_t end = line.find(' ', pos);
    if (end == std::string_view::npos) end = line.size();
    w.push_back(line.substr(pos, end - pos));
    pos = end + 1;
  }
  if (w.size() < 10 || w[0] != "done") {
    return InvalidArgumentError("not a done line: '" + std::string(line) + "'");
  }
  DoneReply d;
  KVB_ASSIGN_OR_RETURN(d.request_id, ParseNumber<uint64_t>("request_id", w[1], 0));
  KVB_ASSIGN_OR_RETURN(d.code, ParseStatusCode(w[2]));
  KVB_ASSIGN_OR_RETURN(d.bytes, ParseNumber<uint64_t>("bytes", w[3], 0));
  KVB_ASSIGN_OR_RETURN(d.latency_us, ParseNumber<int64_t>("latency_us", w[4], 0));
  KVB_ASSIGN_OR_RETURN(d.verified_bytes, ParseNumber<uint64_t>("verified_bytes", w[5], 0));
  KVB_ASSIGN_OR_RETURN(d.mismatches, ParseNumber<uint64_t>("mismatches", w[6], 0));
  d.path_taken = std::string(w[7]);
  KVB_ASSIGN_OR_RETURN(d.transport_writes, ParseNumber<uint64_t>("transport_writes", w[8], 0));
  KVB_ASSIGN_OR_RETURN(d.settled_ns, ParseNumber<int64_t>("settled_ns", w[9], 0));
  if (pos <= line.size()) d.message = std::string(line.substr(pos));
  return d;
}

ReplyLine SplitReply(std::string_view line) {
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  const size_t space = line.find(' ');
  if (space == std::string_view::npos) return {line, {}};
  return {line.substr(0, space), line.substr(space + 1)};
}

}  // namespace kvbounce::tools
