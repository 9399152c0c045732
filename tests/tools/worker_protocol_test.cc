// The worker's line protocol: every command and the done reply survive a
// format/parse round trip, and every malformed line is refused with a
// message that says what is wrong.
#include "tools/worker_protocol.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace kvbounce::tools {
namespace {

using ::testing::HasSubstr;

TEST(WorkerProtocolTest, CommandsRoundTrip) {
  std::vector<WorkerCommand> commands;
  WorkerCommand c;
  c.kind = WorkerCommandKind::kConnect;
  c.addresses = {"10.0.0.1:5000", "host-b:5001"};
  commands.push_back(c);
  c = {};
  c.kind = WorkerCommandKind::kPublish;
  c.request_id = 18446744073709551615ULL;
  c.slot = 3;
  c.tokens = 8192;
  commands.push_back(c);
  c.kind = WorkerCommandKind::kPull;
  c.path = TransferPath::kBounce;
  commands.push_back(c);
  c.start = 17;
  commands.push_back(c);
  c = {};
  c.kind = WorkerCommandKind::kCancel;
  c.request_id = 9;
  commands.push_back(c);
  for (WorkerCommandKind k : {WorkerCommandKind::kStats, WorkerCommandKind::kQuit}) {
    c = {};
    c.kind = k;
    commands.push_back(c);
  }
  for (const WorkerCommand& command : commands) {
    const std::string line = FormatWorkerCommand(command);
    SCOPED_TRACE(line);
    Result<WorkerCommand> parsed = ParseWorkerCommand(line);
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(parsed->kind, command.kind);
    EXPECT_EQ(parsed->addresses, command.addresses);
    EXPECT_EQ(parsed->request_id, command.request_id);
    EXPECT_EQ(parsed->slot, command.slot);
    EXPECT_EQ(parsed->tokens, command.tokens);
    EXPECT_EQ(parsed->start, command.start);
    EXPECT_EQ(parsed->path, command.path);
    EXPECT_EQ(FormatWorkerCommand(*parsed), line);
  }
  // Extra spaces and a carriage return are tolerated.
  Result<WorkerCommand> spaced = ParseWorkerCommand("  pull  4 0 64 auto \r");
  ASSERT_TRUE(spaced.ok()) << spaced.status();
  EXPECT_EQ(spaced->request_id, 4u);
}

TEST(WorkerProtocolTest, MalformedCommandsAreRefusedWithTheReason) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"", "empty command"},
      {"teleport 1",
       "unknown command 'teleport' (known: connect, publish, pull, cancel, stats, "
       "quit)"},
      {"connect", "connect: expected 'connect <address>...'"},
      {"publish 1 0", "publish: expected"},
      {"publish 1 0 64 9", "publish: expected"},
      {"publish x 0 64", "request_id = 'x'"},
      {"publish 1 -1 64", "slot = -1 is invalid: must be >= 0"},
      {"publish 1 0 0", "tokens = 0 is invalid: must be >= 1"},
      {"pull 1 0 64", "pull: expected"},
      {"pull 1 0 64 sideways", "pull: "},
      {"pull 1 0 64 auto -3", "start = -3 is invalid: must be >= 0"},
      {"pull 1 0 99999999999999999999 auto", "tokens = '99999999999999999999'"},
      {"cancel", "cancel: expected"},
      {"stats now", "stats: expected"},
      {"quit please", "quit: expected"},
  };
  for (const auto& [line, message] : cases) {
    SCOPED_TRACE(line);
    Result<WorkerCommand> c = ParseWorkerCommand(line);
    ASSERT_FALSE(c.ok());
    EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(c.status().message()), HasSubstr(message));
  }
}

TEST(WorkerProtocolTest, DoneRoundTripsWithAndWithoutAMessage) {
  DoneReply d;
  d.request_id = 42;
  d.code = StatusCode::kUnavailable;
  d.bytes = 1 << 20;
  d.latency_us = 1234;
  d.verified_bytes = 1 << 20;
  d.mismatches = 2;
  d.path_taken = "bounce";
  d.transport_writes = 8;
  d.settled_ns = 987654321;
  d.message = "peer ctx0 rank 1 left\nwithout a word";
  const std::string line = FormatDone(d);
  EXPECT_EQ(line.find('\n'), std::string::npos);
  EXPECT_EQ(line,
            "done 42 UNAVAILABLE 1048576 1234 1048576 2 bounce 8 987654321 peer ctx0 rank 1 left "
            "without a word");
  Result<DoneReply> parsed = ParseDone(line);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->request_id, 42u);
  EXPECT_EQ(parsed->code, StatusCode::kUnavailable);
  EXPECT_EQ(parsed->bytes, d.bytes);
  EXPECT_EQ(parsed->latency_us, d.latency_us);
  EXPECT_EQ(parsed->verified_bytes, d.verified_bytes);
  EXPECT_EQ(parsed->mismatches, 2u);
  EXPECT_EQ(parsed->path_taken, "bounce");
  EXPECT_EQ(parsed->transport_writes, 8u);
  EXPECT_EQ(parsed->settled_ns, 987654321);
  EXPECT_EQ(parsed->message, "peer ctx0 rank 1 left without a word");

  DoneReply ok;
  ok.request_id = 1;
  Result<DoneReply> plain = ParseDone(FormatDone(ok));
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_EQ(plain->code, StatusCode::kOk);
  EXPECT_EQ(plain->path_taken, "-");
  EXPECT_EQ(plain->message, "");
}

TEST(WorkerProtocolTest, MalformedDoneLinesAreRefused) {
  for (const std::string line : {"done 1 OK 0 0 0 0 auto 0", "ready 1 OK 0 0 0 0 auto 0 0",
                                 "done 1 FINE 0 0 0 0 auto 0 0", "done 1 OK x 0 0 0 auto 0 0"}) {
    SCOPED_TRACE(line);
    EXPECT_FALSE(ParseDone(line).ok());
  }
}

TEST(WorkerProtocolTest, RepliesSplitIntoKeywordAndRest) {
  ReplyLine r = SplitReply("ready 127.0.0.1:5000 {\"transport\":\"ucx\"}\r");
  EXPECT_EQ(r.keyword, "ready");
  EXPECT_EQ(r.rest, "127.0.0.1:5000 {\"transport\":\"ucx\"}");
  r = SplitReply("bye");
  EXPECT_EQ(r.keyword, "bye");
  EXPECT_EQ(r.rest, "");
  for (int c = 0; c <= static_cast<int>(StatusCode::kInternal); ++c) {
    const StatusCode code = static_cast<StatusCode>(c);
    EXPECT_EQ(ParseStatusCode(StatusCodeName(code)).value(), code);
  }
}

}  // namespace
}  // namespace kvbounce::tools
