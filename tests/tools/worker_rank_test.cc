// The per-rank harness and the worker's command loop, in one process over
// loopback: tables are derived the same way everywhere, verification
// catches what it must, and ServeCommands speaks the protocol of
// tools/worker_protocol.h — publish, pull, verify, cancel, stats, refusals,
// and a shutdown that settles every request before "bye".
#include "tools/worker_rank.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <streambuf>
#include <string>
#include <thread>
#include <vector>

#include "kvbounce/transports.h"
#include "tools/rank_harness.h"
#include "tools/worker_command.h"
#include "tools/worker_protocol.h"

namespace kvbounce::tools {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

InstanceSpec Spec(int tp, LayoutKind layout, int tokens_per_block) {
  InstanceSpec s;
  s.model = CustomModel(2, 4, 16, false).value();
  s.tp = tp;
  s.layout = layout;
  s.tokens_per_block = tokens_per_block;
  return s;
}

Topology Make(const InstanceSpec& spec) { return Topology::Create(spec, "test").value(); }

TEST(RankHarnessTest, TablesAreDerivedFromSlotAndSeedAlone) {
  const std::vector<int32_t> a = SlotTable(3, 5, 77);
  EXPECT_EQ(a, SlotTable(3, 5, 77));
  EXPECT_NE(a, SlotTable(3, 5, 78));
  ASSERT_EQ(a.size(), 5u);
  const std::set<int32_t> distinct(a.begin(), a.end());
  EXPECT_EQ(distinct.size(), 5u);
  for (int32_t b : a) {
    EXPECT_GE(b, 3 * 10);
    EXPECT_LT(b, 4 * 10);
  }
  EXPECT_NE(RequestTableSeed(1, 1), RequestTableSeed(1, 2));
  EXPECT_EQ(TablePrefix(a, 17, 8).size(), 3u);

  // Two harnesses of the same instance (two processes) agree on every table.
  const Topology ctx = Make(Spec(2, LayoutKind::kBlockMajorHnd, 8));
  RankHarnessOptions o;
  o.slots = 2;
  o.max_tokens = 40;
  o.table_seed = 5;
  auto r0 = RankHarness::Create(ctx, o).value();
  o.rank = 1;
  auto r1 = RankHarness::Create(ctx, o).value();
  EXPECT_EQ(r0->CtxTable(1), r1->CtxTable(1));
  EXPECT_EQ(r0->GenTable(1, 40, 5, 9), r1->GenTable(1, 40, 5, 9));
  EXPECT_NE(r0->GenTable(1, 40, 5, 9), r0->GenTable(1, 40, 5, 10));
}

TEST(RankHarnessTest, VerifyCatchesMissingDataAndStrayWrites) {
  const Topology gen = Make(Spec(1, LayoutKind::kLayerMajorNhd, 8));
  RankHarnessOptions o;
  o.role = Role::kGen;
  o.slots = 2;
  o.max_tokens = 40;
  auto h = RankHarness::Create(gen, o).value();
  const std::vector<int32_t> table = h->GenTable(1, 40, 1, 1);
  // Nothing arrived: every row of the range is wrong.
  VerifyResult v = h->VerifyGen(1, table, {0, 40});
  EXPECT_EQ(v.mismatches, 2u * 2 * 4 * 40);
  EXPECT_THAT(v.first_mismatch, HasSubstr("holds wrong bytes"));
  // An empty range on a clear slot is fine; one stray byte is not.
  v = h->VerifyGen(1, table, {0, 0});
  EXPECT_EQ(v.mismatches, 0u) << v.first_mismatch;
  h->SlotMemory(1).back().back() = std::byte{1};
  v = h->VerifyGen(1, table, {0, 0});
  EXPECT_EQ(v.mismatches, 1u);
  EXPECT_THAT(v.first_mismatch, HasSubstr("outside the request was written"));
  h->ClearSlot(1);
  EXPECT_EQ(h->VerifyGen(1, table, {0, 0}).mismatches, 0u);
  // Slot 0 is untouched by all of it.
  EXPECT_EQ(h->VerifyGen(0, h->GenTable(0, 40, 1, 1), {0, 0}).mismatches, 0u);
}

// An ostream onto a socket (the worker's stdout).
class FdBuf : public std::streambuf {
 public:
  explicit FdBuf(int fd) : fd_(fd) {}

 protected:
  int_type overflow(int_type c) override {
    if (c == traits_type::eof()) return traits_type::not_eof(c);
    const char ch = static_cast<char>(c);
    return send(fd_, &ch, 1, MSG_NOSIGNAL) == 1 ? c : traits_type::eof();
  }
  std::streamsize xsputn(const char* s, std::streamsize n) override {
    std::streamsize done = 0;
    while (done < n) {
      const ssize_t w = send(fd_, s + done, static_cast<size_t>(n - done), MSG_NOSIGNAL);
      if (w <= 0) return done;
      done += w;
    }
    return done;
  }

 private:
  int fd_;
};

// One WorkerRank served by ServeCommands on its own thread; the test talks
// to it over a socket pair.
class Served {
 public:
  Served(std::unique_ptr<WorkerRank> rank) : rank_(std::move(rank)) {
    int sv[2];
    EXPECT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    mine_ = sv[0];
    theirs_ = sv[1];
    thread_ = std::thread([this] {
      FdBuf buf(theirs_);
      std::ostream out(&buf);
      end_ = ServeCommands(*rank_, theirs_, out, nullptr, std::chrono::seconds(5));
      shutdown(theirs_, SHUT_WR);
    });
  }
  ~Served() {
    CloseInput();
    if (thread_.joinable()) thread_.join();
    close(mine_);
    close(theirs_);
  }

  WorkerRank& rank() { return *rank_; }
  void Send(const std::string& line) {
    const std::string data = line + "\n";
    ASSERT_EQ(write(mine_, data.data(), data.size()), static_cast<ssize_t>(data.size()));
  }
  // The next reply line; "" after 10 s or at EOF.
  std::string Line() {
    while (true) {
      const size_t nl = buffer_.find('\n');
      if (nl != std::string::npos) {
        std::string line = buffer_.substr(0, nl);
        buffer_.erase(0, nl + 1);
        return line;
      }
      pollfd p{mine_, POLLIN, 0};
      if (poll(&p, 1, 10000) <= 0) return "";
      char chunk[4096];
      const ssize_t n = read(mine_, chunk, sizeof(chunk));
      if (n <= 0) return "";
      buffer_.append(chunk, static_cast<size_t>(n));
    }
  }
  DoneReply Done() {
    const std::string line = Line();
    Result<DoneReply> d = ParseDone(line);
    EXPECT_TRUE(d.ok()) << line;
    return d.ok() ? *d : DoneReply{};
  }
  // Closes our end: the worker sees the end of its input.
  void CloseInput() { shutdown(mine_, SHUT_WR); }
  const WorkerEnd& Join() {
    thread_.join();
    return end_;
  }

 private:
  std::unique_ptr<WorkerRank> rank_;
  int mine_ = -1, theirs_ = -1;
  std::string buffer_;
  std::thread thread_;
  WorkerEnd end_;
};

class WorkerLoopTest : public ::testing::Test {
 protected:
  void SetUp() override {
    fabric_ = NewLoopbackFabric();
    const Topology ctx = Make(Spec(2, LayoutKind::kBlockMajorHnd, 8));
    const Topology gen = Make(Spec(1, LayoutKind::kLayerMajorNhd, 16));
    for (int r = 0; r < 2; ++r) ctx_.push_back(std::make_unique<Served>(Rank(ctx, Role::kCtx, r)));
    gen_ = std::make_unique<Served>(Rank(gen, Role::kGen, 0));
  }

  std::unique_ptr<WorkerRank> Rank(const Topology& t, Role role, int rank) {
    WorkerRankOptions o;
    o.harness.role = role;
    o.harness.rank = rank;
    o.harness.slots = 2;
    o.harness.max_tokens = 40;
    o.instance_id = role == Role::kCtx ? "ctx0" : "gen0";
    o.config.bounce_size_mb = 1;
    o.config.transfer_timeout_ms = 5000;
    o.grace = std::chrono::milliseconds(200);
    o.start_token = 3;
    auto transport = NewLoopbackTransport(fabric_, o.instance_id + "-" + std::to_string(rank));
    EXPECT_TRUE(transport.ok());
    auto w = WorkerRank::Create(t, o, std::move(transport).value());
    EXPECT_TRUE(w.ok()) << w.status();
    return std::move(w).value();
  }

  void ConnectGen() {
    gen_->Send("connect " + ctx_[0]->rank().Address() + " " + ctx_[1]->rank().Address());
    EXPECT_EQ(gen_->Line(), "connected 2 per-block,bounce,direct");
  }

  std::shared_ptr<LoopbackFabric> fabric_;
  std::vector<std::unique_ptr<Served>> ctx_;
  std::unique_ptr<Served> gen_;
};

TEST_F(WorkerLoopTest, PublishPullVerifyOnEveryLoopbackPath) {
  ConnectGen();
  uint64_t id = 1;
  for (const char* path : {"per-block", "bounce", "direct", "auto"}) {
    for (int slot = 0; slot < 2; ++slot, ++id) {
      SCOPED_TRACE(std::string(path) + " slot " + std::to_string(slot));
      for (auto& c : ctx_)
        c->Send("publish " + std::to_string(id) + " " + std::to_string(slot) + " 40");
      // Slot 1 names its start; slot 0 takes the worker's start token (3).
      gen_->Send("pull " + std::to_string(id) + " " + std::to_string(slot) + " 40 " + path +
                 (slot == 1 ? " 0" : ""));
      const DoneReply d = gen_->Done();
      EXPECT_EQ(d.request_id, id);
      EXPECT_EQ(d.code, StatusCode::kOk) << d.message;
      const uint64_t tokens = slot == 1 ? 40 : 37;
      EXPECT_EQ(d.bytes, tokens * 2 * 2 * 4 * 16 * 2);  // tokens x layers x k/v x heads x row
      EXPECT_EQ(d.verified_bytes, d.bytes);
      EXPECT_EQ(d.mismatches, 0u) << d.message;
      if (std::string(path) != "auto") {
        EXPECT_EQ(d.path_taken, path);
      }
      EXPECT_GT(d.settled_ns, 0);
      for (auto& c : ctx_) {
        const DoneReply p = c->Done();
        EXPECT_EQ(p.request_id, id);
        EXPECT_EQ(p.code, StatusCode::kOk) << p.message;
      }
    }
  }
  gen_->Send("stats");
  const std::string stats = gen_->Line();
  ASSERT_THAT(stats, StartsWith("stats {"));
  const nlohmann::json j = nlohmann::json::parse(stats.substr(6));
  EXPECT_EQ(j["arena_outstanding_bytes"], 0);
  EXPECT_EQ(j["in_flight"], 0);
  EXPECT_TRUE(j["agent"].is_object());
  EXPECT_EQ(gen_->rank().tally().completed, 8u);
}

TEST_F(WorkerLoopTest, RefusalsAreRepliesAndBadLinesAreErrors) {
  ConnectGen();
  gen_->Send("teleport 1");
  EXPECT_EQ(gen_->Line(),
            "error teleport unknown command 'teleport' (known: connect, publish, pull, cancel, "
            "stats, quit)");
  gen_->Send("pull 1 0");
  EXPECT_THAT(gen_->Line(), StartsWith("error pull pull: expected"));
  gen_->Send("publish 1 0 40");
  EXPECT_THAT(gen_->Done().message, HasSubstr("this is a gen rank"));
  gen_->Send("pull 2 7 40 auto");
  DoneReply d = gen_->Done();
  EXPECT_EQ(d.code, StatusCode::kOutOfRange);
  EXPECT_THAT(d.message, HasSubstr("slot 7 is outside [0, 2)"));
  gen_->Send("pull 3 0 41 auto");
  EXPECT_EQ(gen_->Done().code, StatusCode::kOutOfRange);
  // Request 4 waits for its publication; slot 0 is taken meanwhile.
  gen_->Send("pull 4 0 40 bounce");
  gen_->Send("pull 5 0 40 bounce");
  d = gen_->Done();
  EXPECT_EQ(d.request_id, 5u);
  EXPECT_EQ(d.code, StatusCode::kFailedPrecondition);
  EXPECT_THAT(d.message, HasSubstr("slot 0 holds a request in flight"));
  gen_->Send("pull 4 1 40 bounce");
  EXPECT_EQ(gen_->Done().code, StatusCode::kAlreadyExists);
  gen_->Send("cancel 4");
  d = gen_->Done();
  EXPECT_EQ(d.request_id, 4u);
  EXPECT_EQ(d.code, StatusCode::kCancelled);
  // Cancelling what is not in flight says nothing; the next reply is stats.
  gen_->Send("cancel 4");
  gen_->Send("stats");
  EXPECT_THAT(gen_->Line(), StartsWith("stats "));
  ctx_[0]->Send("pull 6 0 40 auto");
  EXPECT_THAT(ctx_[0]->Done().message, HasSubstr("this is a ctx rank"));
  // The slot was cleared after the cancel settled: a real pull verifies.
  for (auto& c : ctx_) c->Send("publish 7 0 40");
  gen_->Send("pull 7 0 40 bounce 0");
  d = gen_->Done();
  EXPECT_EQ(d.code, StatusCode::kOk) << d.message;
  EXPECT_EQ(d.mismatches, 0u) << d.message;
}

TEST_F(WorkerLoopTest, QuitSettlesWhatIsInFlightBeforeBye) {
  ConnectGen();
  gen_->Send("pull 9 1 40 per-block");              // never published
  for (auto& c : ctx_) c->Send("publish 10 0 40");  // never pulled
  gen_->Send("quit");
  const DoneReply d = gen_->Done();
  EXPECT_EQ(d.request_id, 9u);
  EXPECT_NE(d.code, StatusCode::kOk);
  const std::string bye = gen_->Line();
  ASSERT_THAT(bye, StartsWith("bye {"));
  const nlohmann::json j = nlohmann::json::parse(bye.substr(4));
  EXPECT_EQ(j["stopped_by"], "quit");
  EXPECT_EQ(j["arena_outstanding_bytes"], 0);
  EXPECT_EQ(j["failed"], 1);
  EXPECT_EQ(gen_->Join().stopped_by, "quit");
  // A ctx worker whose input ends stops the same way.
  ctx_[0]->CloseInput();
  EXPECT_EQ(ctx_[0]->Done().request_id, 10u);
  EXPECT_THAT(ctx_[0]->Line(), HasSubstr("\"stopped_by\":\"end of input\""));
  EXPECT_EQ(ctx_[0]->Join().arena_outstanding_bytes, 0u);
}

}  // namespace
}  // namespace kvbounce::tools
