// The UCX transport beyond the conformance suite: its options and address
// parsing, per-peer capabilities, and peers in other processes that are
// killed in the middle of a transfer or read from (the peer program is
// ucx_test_peer).
#include "transport/ucx/ucx_transport.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/status_matchers.h"
#include "kvbounce/config.h"
#include "kvbounce/transports.h"
#include "transport/transport_test_util.h"
#include "transport/ucx_peer_frames.h"

extern char** environ;

namespace kvbounce::transport_test {
namespace {

using ::kvbounce::testing_util::IsOk;
using ::kvbounce::testing_util::StatusIs;
using ::testing::AnyOf;
using ::testing::HasSubstr;

TEST(ParseHostPortTest, AcceptsNamesAddressesAndBracketedIpv6) {
  auto a = ParseHostPort("127.0.0.1:5000");
  ASSERT_THAT(a, IsOk());
  EXPECT_EQ(a->host, "127.0.0.1");
  EXPECT_EQ(a->port, 5000);
  auto b = ParseHostPort("node-7.cluster:0");
  ASSERT_THAT(b, IsOk());
  EXPECT_EQ(b->host, "node-7.cluster");
  EXPECT_EQ(b->port, 0);
  auto c = ParseHostPort("[::1]:65535");
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(c->host, "::1");
  EXPECT_EQ(c->port, 65535);
}

TEST(ParseHostPortTest, RejectsMalformedAddressesWithTheReason) {
  EXPECT_THAT(ParseHostPort(""), StatusIs(StatusCode::kInvalidArgument, HasSubstr("host:port")));
  EXPECT_THAT(ParseHostPort("host"), StatusIs(StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseHostPort(":80"), StatusIs(StatusCode::kInvalidArgument, HasSubstr("empty host")));
  EXPECT_THAT(ParseHostPort("h:65536"), StatusIs(StatusCode::kInvalidArgument, HasSubstr("port")));
  EXPECT_THAT(ParseHostPort("h:-1"), StatusIs(StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseHostPort("h:80x"), StatusIs(StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseHostPort("::1:80"), StatusIs(StatusCode::kInvalidArgument, HasSubstr("brackets")));
  EXPECT_THAT(ParseHostPort("[::1]80"), StatusIs(StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseHostPort("a b:80"), StatusIs(StatusCode::kInvalidArgument));
}

TEST(UcxTransportTest, CreateRejectsBadOptionsNamingThem) {
  UcxTransportOptions options;
  options.num_workers = 0;
  EXPECT_THAT(UcxTransport::Create(options),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("num_workers")));
  options = {};
  options.put_chunk_bytes = 100;
  EXPECT_THAT(UcxTransport::Create(options),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("put_chunk_bytes")));
  options = {};
  options.connect_timeout = std::chrono::milliseconds(0);
  EXPECT_THAT(UcxTransport::Create(options),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("connect_timeout")));
  options = {};
  options.listen_address = "no-port";
  EXPECT_THAT(UcxTransport::Create(options),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("no-port")));
  for (const int64_t us : {int64_t{-1}, Config::kMaxPollUs + 1}) {
    options = {};
    options.poll_before_sleep = std::chrono::microseconds(us);
    EXPECT_THAT(UcxTransport::Create(options),
                StatusIs(StatusCode::kInvalidArgument,
                         HasSubstr("poll_before_sleep = " + std::to_string(us))));
  }
}

TEST(UcxTransportTest, ATakenPortIsUnavailable) {
  auto first = UcxTransport::Create({});
  ASSERT_THAT(first, IsOk());
  const std::string taken = (*first)->Address();
  UcxTransportOptions options;
  options.listen_address = taken;
  EXPECT_THAT(UcxTransport::Create(options),
              StatusIs(StatusCode::kUnavailable, HasSubstr(taken)));
}

TEST(UcxTransportTest, CapabilitiesPerPeer) {
  for (const bool shm : {false, true}) {
    UcxTransportOptions options;
    options.same_host_shared_memory = shm;
    auto a = MakeTestEndpoint(NewUcxTransport(options), true);
    auto b = MakeTestEndpoint(NewUcxTransport(options), true);
    auto [a_to_b, b_to_a] = ConnectTestEndpoints(*a, *b);
    const TransportCaps caps = (*a)->Caps();
    EXPECT_EQ(caps.name, "ucx");
    EXPECT_TRUE(caps.host_memory);
    EXPECT_FALSE(caps.device_memory);
    EXPECT_FALSE(caps.map_remote);
    EXPECT_FALSE(caps.pending_writes_fail);
    auto peer = (*a)->PeerCaps(a_to_b);
    ASSERT_THAT(peer, IsOk());
    // Shared memory (same host, allowed): a cheaper operation, a faster link.
    if (shm) {
      EXPECT_LT(peer->cost.op_us, caps.cost.op_us);
      EXPECT_GT(peer->cost.bytes_per_us, caps.cost.bytes_per_us);
    } else {
      EXPECT_EQ(peer->cost.op_us, caps.cost.op_us);
    }
    EXPECT_THAT((*a)->PeerCaps(424242), StatusIs(StatusCode::kNotFound));
    EXPECT_THAT((*a)->Register(Addr(4096), 4096, MemoryKind::kCuda),
                StatusIs(StatusCode::kInvalidArgument, HasSubstr("host memory")));
    // Reads: on by default, whatever the data endpoints; this process may
    // read itself, so the probe passes. Their completions run on the reader
    // thread, beside the rail.
    EXPECT_TRUE(caps.read_remote);
    EXPECT_TRUE(caps.concurrent_callbacks);
    EXPECT_TRUE(peer->read_remote);
    EXPECT_GT(peer->read_cost.op_us, 0);
    EXPECT_GT(peer->read_cost.bytes_per_us, 0);
  }
}

// same_host_read off on either end: no reads on that link, either way.
TEST(UcxTransportTest, SameHostReadOffMakesReadUnimplemented) {
  UcxTransportOptions off;
  off.same_host_read = false;
  auto a = MakeTestEndpoint(NewUcxTransport(off), true);
  auto b = MakeTestEndpoint(NewUcxTransport({}), true);
  auto [a_to_b, b_to_a] = ConnectTestEndpoints(*a, *b);
  EXPECT_FALSE((*a)->Caps().read_remote);
  EXPECT_FALSE((*a)->Caps().concurrent_callbacks);  // one rail, no reader thread
  EXPECT_TRUE((*b)->Caps().read_remote);
  auto a_caps = (*a)->PeerCaps(a_to_b);
  auto b_caps = (*b)->PeerCaps(b_to_a);
  ASSERT_THAT(a_caps, IsOk());
  ASSERT_THAT(b_caps, IsOk());
  EXPECT_FALSE(a_caps->read_remote);
  EXPECT_FALSE(b_caps->read_remote);  // a does not offer its memory

  GuardedBuffer a_buffer(4096);
  GuardedBuffer b_buffer(4096);
  b_buffer.FillPattern(9);
  auto a_region = (*a)->Register(a_buffer.addr(), 4096, MemoryKind::kHost);
  auto b_region = (*b)->Register(b_buffer.addr(), 4096, MemoryKind::kHost);
  ASSERT_THAT(a_region, IsOk());
  ASSERT_THAT(b_region, IsOk());
  auto b_in_a = (*a)->Import(a_to_b, (*b_region)->info());
  auto a_in_b = (*b)->Import(b_to_a, (*a_region)->info());
  ASSERT_THAT(b_in_a, IsOk());
  ASSERT_THAT(a_in_b, IsOk());
  const ReadOp a_reads[] = {{b_buffer.addr(), a_buffer.addr(), 4096}};
  const ReadOp b_reads[] = {{a_buffer.addr(), b_buffer.addr(), 4096}};
  EXPECT_THAT((*a)->Read(**b_in_a, **a_region, a_reads, [](Status) {}, {}),
              StatusIs(StatusCode::kUnimplemented, HasSubstr("same_host_read")));
  EXPECT_THAT((*b)->Read(**a_in_b, **b_region, b_reads, [](Status) {}, {}),
              StatusIs(StatusCode::kUnimplemented));
  EXPECT_TRUE(a_buffer.AllEqual(0));
  // Writes do not care.
  DoneTracker tracker;
  const WriteOp writes[] = {{b_buffer.addr(), a_buffer.addr(), 4096}};
  ASSERT_THAT((*b)->Write(**b_region, **a_in_b, writes, tracker.Make()), IsOk());
  ASSERT_THAT((*b)->Flush(b_to_a, tracker.Make()), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(1), IsOk());
  EXPECT_EQ(std::memcmp(a_buffer.data(), b_buffer.data(), 4096), 0);
}

// The receiving side checks every data message against its live regions:
// a write into a deregistered region lands nothing, and the writer's flush
// says so.
TEST(UcxTransportTest, WriteIntoADeregisteredRegionLandsNothingAndFailsTheFlush) {
  for (const bool shm : {false, true}) {
    UcxTransportOptions options;
    options.same_host_shared_memory = shm;
    auto a = MakeTestEndpoint(NewUcxTransport(options), true);
    auto b = MakeTestEndpoint(NewUcxTransport(options), true);
    auto [a_to_b, b_to_a] = ConnectTestEndpoints(*a, *b);
    GuardedBuffer src(4096);
    src.FillPattern(5);
    GuardedBuffer dst(4096, 0);
    auto source = (*a)->Register(src.addr(), src.size(), MemoryKind::kHost);
    auto region = (*b)->Register(dst.addr(), dst.size(), MemoryKind::kHost);
    ASSERT_THAT(source, IsOk());
    ASSERT_THAT(region, IsOk());
    auto target = (*a)->Import(a_to_b, (*region)->info());
    ASSERT_THAT(target, IsOk());
    region->reset();  // deregistered: a quarantined or freed slot

    DoneTracker tracker;
    const WriteOp op{src.addr(), dst.addr(), 4096};
    ASSERT_THAT((*a)->Write(**source, **target, {&op, 1}, tracker.Make()), IsOk());
    ASSERT_THAT((*a)->Flush(a_to_b, tracker.Make()), IsOk());
    ASSERT_TRUE(tracker.WaitAll());
    EXPECT_THAT(tracker.status(1),
                StatusIs(StatusCode::kFailedPrecondition, HasSubstr("registered region")));
    EXPECT_TRUE(dst.AllEqual(0));
    EXPECT_TRUE(dst.GuardsIntact());
    // The connection itself is fine: the next flush reports OK.
    ASSERT_THAT((*a)->Flush(a_to_b, tracker.Make()), IsOk());
    ASSERT_TRUE(tracker.WaitAll());
    EXPECT_THAT(tracker.status(2), IsOk());
    EXPECT_EQ(a->total_failures(), 0);
  }
}

// Drives a ProgressSource on a thread of its own, as an agent's control
// loop does: polls while there is work, sleeps on the source's fd (1 ms at
// most, to see Stop) when PrepareToSleep allows.
class SourceDriver {
 public:
  explicit SourceDriver(std::unique_ptr<ProgressSource> source) : source_(std::move(source)) {
    thread_ = std::thread([this] { Run(); });
  }
  ~SourceDriver() { Detach(); }
  std::thread::id thread_id() const { return thread_.get_id(); }
  // Stops polling and destroys the source (which detaches it).
  void Detach() {
    stop_.store(true);
    if (thread_.joinable()) thread_.join();
    source_.reset();
  }

 private:
  void Run() {
    while (!stop_.load()) {
      if (source_->Poll()) continue;
      std::chrono::microseconds cap(1000);
      if (!source_->PrepareToSleep(&cap)) continue;
      pollfd fd{.fd = source_->fd(), .events = POLLIN, .revents = 0};
      const int ms = static_cast<int>(std::clamp<int64_t>((cap.count() + 999) / 1000, 0, 1));
      poll(&fd, 1, ms);
    }
  }

  std::unique_ptr<ProgressSource> source_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// Rail 0 handed to a caller's thread (TakeProgressSource) carries the
// connection, frames, writes and flushes; its callbacks run on that thread;
// Shutdown waits for the driver to poll it to its end; nothing is handed
// over twice or after the shutdown.
TEST(UcxProgressSourceTest, ADrivenRailCarriesEverythingAndShutdownWaitsForItsDriver) {
  for (const bool shm : {false, true}) {
    SCOPED_TRACE(shm ? "shared memory" : "tcp");
    UcxTransportOptions options;
    options.same_host_shared_memory = shm;
    auto made = NewUcxTransport(options);
    ASSERT_THAT(made, IsOk());
    std::unique_ptr<ProgressSource> source = (*made)->TakeProgressSource();
    ASSERT_NE(source, nullptr);
    EXPECT_EQ((*made)->TakeProgressSource(), nullptr);
    auto driver = std::make_unique<SourceDriver>(std::move(source));
    std::atomic<bool> off_driver{false};
    const std::thread::id driver_id = driver->thread_id();
    auto a = MakeTestEndpoint(std::move(made), /*start=*/false);
    a->on_message_hook = [&](PeerId, const std::vector<std::byte>&) {
      if (std::this_thread::get_id() != driver_id) off_driver.store(true);
    };
    ASSERT_THAT(a->Start(), IsOk());
    auto b = MakeTestEndpoint(NewUcxTransport(options), true);
    auto [a_to_b, b_to_a] = ConnectTestEndpoints(*a, *b);
    ASSERT_THAT(b->SendText(b_to_a, "to a"), IsOk());
    ASSERT_TRUE(a->WaitForMessages(1));
    EXPECT_FALSE(off_driver.load()) << "a frame's callback ran off the driver's thread";

    GuardedBuffer src(256 << 10);
    src.FillPattern(9);
    GuardedBuffer dst(256 << 10, 0);
    auto source_region = (*a)->Register(src.addr(), src.size(), MemoryKind::kHost);
    auto region = (*b)->Register(dst.addr(), dst.size(), MemoryKind::kHost);
    ASSERT_THAT(source_region, IsOk());
    ASSERT_THAT(region, IsOk());
    auto target = (*a)->Import(a_to_b, (*region)->info());
    ASSERT_THAT(target, IsOk());
    DoneTracker tracker;
    const WriteOp op{src.addr(), dst.addr(), src.size()};
    ASSERT_THAT((*a)->Write(**source_region, **target, {&op, 1}, tracker.Make()), IsOk());
    ASSERT_THAT((*a)->Flush(a_to_b, tracker.Make()), IsOk());
    ASSERT_TRUE(tracker.WaitAll());
    EXPECT_THAT(tracker.status(0), IsOk());
    EXPECT_THAT(tracker.status(1), IsOk());
    EXPECT_EQ(std::memcmp(dst.data(), src.data(), dst.size()), 0);

    // Reads (same host): one of at most kLoopReadBytes runs on the driver's
    // thread, a larger one on the reader thread; both land.
    GuardedBuffer back(256 << 10, 0);
    auto back_region = (*a)->Register(back.addr(), back.size(), MemoryKind::kHost);
    ASSERT_THAT(back_region, IsOk());
    for (const uint64_t n :
         {uint64_t{4096}, UcxTransport::kLoopReadBytes, UcxTransport::kLoopReadBytes + 4096}) {
      const bool small = n <= UcxTransport::kLoopReadBytes;
      std::atomic<bool> on_driver{false};
      DoneTracker reads;
      TransportDone done = reads.Make();
      const ReadOp read{dst.addr(), back.addr(), n};
      ASSERT_THAT((*a)->Read(**target, **back_region, {&read, 1},
                             [&, done](Status st) {
                               on_driver.store(std::this_thread::get_id() == driver_id);
                               done(std::move(st));
                             },
                             {}),
                  IsOk());
      ASSERT_TRUE(reads.WaitAll());
      EXPECT_THAT(reads.status(0), IsOk());
      EXPECT_EQ(on_driver.load(), small) << n << " bytes";
      EXPECT_EQ(std::memcmp(back.data(), src.data(), n), 0);
    }
    back_region->reset();

    // Shutdown from this thread while the driver polls: it returns once the
    // driver finished the rail, and the peer sees the connection end.
    source_region->reset();
    a->Shutdown();
    EXPECT_TRUE(b->WaitForFailure(b_to_a));
    EXPECT_EQ((*a)->TakeProgressSource(), nullptr);
    driver->Detach();
    EXPECT_EQ(tracker.Violations(), "");
  }
}

// A source destroyed before the shutdown detaches: rail 0 gets its own
// thread back and carries on (frames still flow), and Shutdown ends it as
// it ends any rail (the peer hears the connection end).
TEST(UcxProgressSourceTest, ADetachedSourceLeavesTheShutdownToItsCaller) {
  UcxTransportOptions options;
  auto made = NewUcxTransport(options);
  ASSERT_THAT(made, IsOk());
  auto driver = std::make_unique<SourceDriver>((*made)->TakeProgressSource());
  auto a = MakeTestEndpoint(std::move(made), true);
  auto b = MakeTestEndpoint(NewUcxTransport(options), true);
  auto [a_to_b, b_to_a] = ConnectTestEndpoints(*a, *b);
  ASSERT_THAT(a->SendText(a_to_b, "before the detach"), IsOk());
  ASSERT_TRUE(b->WaitForMessages(2));  // ConnectTestEndpoints' HELLO, and this
  driver->Detach();
  ASSERT_THAT(a->SendText(a_to_b, "after the detach"), IsOk());
  ASSERT_THAT(b->SendText(b_to_a, "to a, after the detach"), IsOk());
  ASSERT_TRUE(b->WaitForMessages(3));
  ASSERT_TRUE(a->WaitForMessages(1));
  a->Shutdown();
  EXPECT_TRUE(b->WaitForFailure(b_to_a));
  EXPECT_EQ(a->total_failures(), 0);
}

// A read of a peer range that is no longer mapped (its owner deregistered
// and freed it) fails with kFailedPrecondition; what came before it in the
// same call landed.
TEST(UcxTransportTest, ReadOfAnUnmappedPeerRangeFails) {
  auto a = MakeTestEndpoint(NewUcxTransport({}), true);
  auto b = MakeTestEndpoint(NewUcxTransport({}), true);
  auto [a_to_b, b_to_a] = ConnectTestEndpoints(*a, *b);
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* mapped =
      mmap(nullptr, 3 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(mapped, MAP_FAILED);
  auto* peer_bytes = static_cast<uint8_t*>(mapped);
  std::memset(peer_bytes, 0x42, 3 * page);
  GuardedBuffer dst(3 * page, 0);
  auto peer_region = (*b)->Register(Addr::FromPointer(peer_bytes), 3 * page, MemoryKind::kHost);
  auto target = (*a)->Register(dst.addr(), dst.size(), MemoryKind::kHost);
  ASSERT_THAT(peer_region, IsOk());
  ASSERT_THAT(target, IsOk());
  auto source = (*a)->Import(a_to_b, (*peer_region)->info());
  ASSERT_THAT(source, IsOk());
  peer_region->reset();
  ASSERT_EQ(munmap(peer_bytes + page, page), 0);  // the middle page is gone

  const Addr base = Addr::FromPointer(peer_bytes);
  const ReadOp ops[] = {{base, dst.addr(), page},
                        {base + page, dst.addr(page), page},
                        {base + 2 * page, dst.addr(2 * page), page}};
  DoneTracker tracker;
  ASSERT_THAT((*a)->Read(**source, **target, ops, tracker.Make(), {}), IsOk());
  ASSERT_TRUE(tracker.WaitAll());
  EXPECT_THAT(tracker.status(0),
              StatusIs(StatusCode::kFailedPrecondition, HasSubstr("not mapped")));
  for (size_t i = 0; i < page; ++i) ASSERT_EQ(dst.data()[i], 0x42) << "byte " << i;
  for (size_t i = page; i < 3 * page; ++i) ASSERT_EQ(dst.data()[i], 0) << "byte " << i;
  EXPECT_EQ(a->total_failures(), 0);  // the connection is fine
  EXPECT_EQ(tracker.Violations(), "");
  munmap(peer_bytes, page);
  munmap(peer_bytes + 2 * page, page);
}

// --- Peers in other processes ----------------------------------------------

class PeerProcess {
 public:
  PeerProcess(const std::string& address, const char* mode, bool shm,
              std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {KVBOUNCE_UCX_TEST_PEER, address, mode, shm ? "1" : "0"};
    args.insert(args.end(), extra.begin(), extra.end());
    std::vector<char*> argv;
    for (auto& arg : args) argv.push_back(arg.data());
    argv.push_back(nullptr);
    if (posix_spawn(&pid_, argv[0], nullptr, nullptr, argv.data(), environ) != 0) pid_ = -1;
  }
  ~PeerProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  bool started() const { return pid_ > 0; }
  // How the process ended, once it did within `timeout`: "exited N",
  // "killed by signal N", or "still running".
  std::string WaitExit(std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (pid_ > 0) {
      int status = 0;
      const pid_t done = waitpid(pid_, &status, WNOHANG);
      if (done == pid_) {
        pid_ = -1;
        if (WIFEXITED(status)) return "exited " + std::to_string(WEXITSTATUS(status));
        return "killed by signal " + std::to_string(WTERMSIG(status));
      }
      if (std::chrono::steady_clock::now() > deadline) return "still running";
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return "not started";
  }
  // WaitExit without waiting.
  std::string Describe() { return WaitExit(std::chrono::milliseconds(0)); }
  void Stop() { kill(pid_, SIGSTOP); }
  void Kill() {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

 private:
  pid_t pid_ = -1;
};

// Waits for `count` messages and returns the peer of the last.
PeerId WaitForPeer(TestEndpoint& endpoint, size_t count) {
  if (!endpoint.WaitForMessages(count, 20s)) return 0;
  return endpoint.messages()[count - 1].peer;
}

class UcxPeerDeathTest : public ::testing::TestWithParam<bool> {
 protected:
  // Endpoint a_ (shared memory or not, per the parameter), a "receiver" peer
  // process connected to it, the peer's region imported (target_) and a
  // source of the same size registered (source_).
  void ConnectReceiver() {
    UcxTransportOptions options;
    options.same_host_shared_memory = GetParam();
    options.put_chunk_bytes = 64 << 10;
    a_ = MakeTestEndpoint(NewUcxTransport(options), true);
    ASSERT_NE(a_, nullptr);
    child_ = std::make_unique<PeerProcess>((*a_)->Address(), "receiver", GetParam());
    ASSERT_TRUE(child_->started());
    peer_ = WaitForPeer(*a_, 2);  // READY, REGION
    ASSERT_NE(peer_, 0u);
    auto info = test_peer::DecodeRegion(a_->messages()[1].frame);
    ASSERT_TRUE(info.has_value());
    info_ = *info;
    auto target = (*a_)->Import(peer_, info_);
    ASSERT_THAT(target, IsOk());
    target_ = std::move(target).value();
    src_ = std::make_unique<GuardedBuffer>(info_.size);
    src_->FillPattern(3);
    auto source = (*a_)->Register(src_->addr(), src_->size(), MemoryKind::kHost);
    ASSERT_THAT(source, IsOk());
    source_ = std::move(source).value();
  }

  std::unique_ptr<TestEndpoint> a_;
  std::unique_ptr<PeerProcess> child_;
  PeerId peer_ = 0;
  RegionInfo info_;
  std::unique_ptr<RemoteRegion> target_;
  std::unique_ptr<GuardedBuffer> src_;
  std::unique_ptr<LocalRegion> source_;
};

// We write into a peer process that is killed: every write settles, the
// failure is reported once and names the connection, new work is refused,
// and a restarted peer connects again.
TEST_P(UcxPeerDeathTest, ReceiverKilledMidWrite) {
  ConnectReceiver();
  ASSERT_FALSE(HasFatalFailure());
  auto& a = a_;
  auto& child = *child_;
  const PeerId peer = peer_;
  auto* target = &target_;
  auto* source = &source_;
  GuardedBuffer& src = *src_;
  const RegionInfo* info = &info_;
  // Writes in flight without pause until the peer is gone.
  DoneTracker tracker;
  const WriteOp op{src.addr(), info->address, info->size};
  std::atomic<bool> stop{false};
  std::atomic<int> refused{0};
  std::thread writer([&] {
    while (!stop) {
      Status status = (*a)->Write(**source, **target, {&op, 1}, tracker.Make());
      if (!status.ok()) {
        tracker.Forget();
        ++refused;
        EXPECT_THAT(status, StatusIs(StatusCode::kUnavailable));
        return;
      }
      std::this_thread::sleep_for(1ms);
    }
  });
  std::this_thread::sleep_for(100ms);
  child.Kill();
  ASSERT_TRUE(a->WaitForFailure(peer, 20s));
  stop = true;
  writer.join();
  ASSERT_TRUE(tracker.WaitAll(20s));
  EXPECT_EQ(tracker.Violations(), "");
  EXPECT_EQ(a->failures(peer), 1);
  EXPECT_THAT(a->failure_reason(peer), StatusIs(StatusCode::kUnavailable));
  EXPECT_THAT((*a)->Write(**source, **target, {&op, 1}, [](Status) {}),
              StatusIs(StatusCode::kUnavailable));
  EXPECT_THAT((*a)->Send(peer, test_peer::Bytes("late")), StatusIs(StatusCode::kUnavailable));
  target->reset();

  // A restarted peer connects again.
  PeerProcess again((*a)->Address(), "receiver", GetParam());
  const PeerId second = WaitForPeer(*a, 4);
  EXPECT_NE(second, 0u);
  EXPECT_NE(second, peer);
}

// A peer process writing into our memory is killed: the failure is reported
// once (the fence: the process is gone), and the connection's writes are over.
TEST_P(UcxPeerDeathTest, WriterKilledMidWrite) {
  UcxTransportOptions options;
  options.same_host_shared_memory = GetParam();
  auto a = MakeTestEndpoint(NewUcxTransport(options), true);
  GuardedBuffer dst(8 << 20, 0);
  auto region = (*a)->Register(dst.addr(), dst.size(), MemoryKind::kHost);
  ASSERT_THAT(region, IsOk());
  PeerProcess child((*a)->Address(), "writer", GetParam());
  ASSERT_TRUE(child.started());
  const PeerId peer = WaitForPeer(*a, 1);  // READY
  ASSERT_NE(peer, 0u);
  ASSERT_THAT((*a)->Send(peer, test_peer::EncodeRegion((*region)->info())), IsOk());
  // Its first write landed (it says so after a flush); kill it mid-stream.
  ASSERT_EQ(WaitForPeer(*a, 2), peer) << "the writer's bytes never arrived";
  child.Kill();
  ASSERT_TRUE(a->WaitForFailure(peer, 20s));
  EXPECT_EQ(a->failures(peer), 1);
  EXPECT_TRUE(dst.GuardsIntact());
  EXPECT_THAT((*a)->Flush(peer, [](Status) {}), StatusIs(StatusCode::kUnavailable));
}

// A peer process sends its last messages and shuts down at once while we
// keep sending to it (unread data on its side of the connection): every
// message it sent arrives, in order, before its connection ends here. A
// shutdown that reset the connection under them would lose the last
// KV_RESULTs of a prefill worker that exits after serving.
TEST_P(UcxPeerDeathTest, MessagesSentBeforeAPeersShutdownAllArrive) {
  UcxTransportOptions options;
  options.same_host_shared_memory = GetParam();
  auto a = MakeTestEndpoint(NewUcxTransport(options), true);
  PeerProcess child((*a)->Address(), "farewell", GetParam());
  ASSERT_TRUE(child.started());
  const PeerId peer = WaitForPeer(*a, 1);  // READY
  ASSERT_NE(peer, 0u);
  ASSERT_THAT((*a)->Send(peer, test_peer::Bytes("GO")), IsOk());
  std::atomic<bool> stop{false};
  std::thread flood([&] {
    const std::vector<std::byte> frame(16 << 10, std::byte{0x33});
    while (!stop && (*a)->Send(peer, frame).ok()) std::this_thread::sleep_for(50us);
  });
  const bool ended = a->WaitForFailure(peer, 20s);
  stop = true;
  flood.join();
  ASSERT_TRUE(ended);
  const auto messages = a->messages();
  ASSERT_EQ(messages.size(), static_cast<size_t>(1 + test_peer::kFarewellMessages));
  for (int i = 0; i < test_peer::kFarewellMessages; ++i) {
    ASSERT_EQ(Text(messages[1 + i].frame), "LAST " + std::to_string(i)) << "message " << i;
  }
  EXPECT_EQ(a->failures(peer), 1);
}

// Connections that end right after their first write, while that write is
// in flight, over TCP, one after another with a peer process: half end from
// here (the writer leaves), half from the peer (right after it connected).
// With data endpoints wired up on the first write, UCX 1.13 aborted the
// process whose wire-up messages were still queued when the other end left;
// a connection now opens with both sides' data endpoints wired. Both
// processes must live through every round. (A peer process, not a second
// transport in this one: UCX 1.13 can also abort a process whose workers
// reuse each other's closed socket numbers under such churn.)
TEST(UcxPeerChurnTest, ConnectionsThatEndRightAfterTheirFirstWriteLeaveBothProcessesRunning) {
  UcxTransportOptions options;
  options.same_host_shared_memory = false;  // TCP, whose endpoints report errors
  auto a = MakeTestEndpoint(NewUcxTransport(options), true);
  GuardedBuffer src(4096);
  src.FillPattern(3);
  auto source = (*a)->Register(src.addr(), src.size(), MemoryKind::kHost);
  ASSERT_THAT(source, IsOk());
  PeerProcess child((*a)->Address(), "churn", false);
  ASSERT_TRUE(child.started());
  for (int round = 0; round < test_peer::kChurnRounds; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    const PeerId peer = WaitForPeer(*a, round + 1);  // its REGION
    ASSERT_NE(peer, 0u) << "the peer process did not connect: " << child.Describe();
    auto info = test_peer::DecodeRegion(a->messages()[round].frame);
    ASSERT_TRUE(info.has_value());
    auto target = (*a)->Import(peer, *info);
    if (!target.ok()) {
      // The peer left before the import.
      ASSERT_TRUE(round % 2 == 1) << target.status();
      ASSERT_TRUE(a->WaitForFailure(peer));
      continue;
    }
    const bool peer_leaves = round % 2 == 1;  // right after its REGION
    DoneTracker tracker;
    const WriteOp op{src.addr(), info->address, 4096};
    const Status issued = (*a)->Write(**source, **target, {&op, 1}, tracker.Make());
    if (!peer_leaves) (*a)->Disconnect(peer, UnavailableError("the writer leaves"));
    if (issued.ok()) {
      ASSERT_TRUE(tracker.WaitAll());
      EXPECT_THAT(tracker.status(0), AnyOf(IsOk(), StatusIs(StatusCode::kUnavailable)));
    } else {
      EXPECT_TRUE(peer_leaves) << issued;  // refused: the peer is gone already
    }
    ASSERT_TRUE(a->WaitForFailure(peer));
  }
  EXPECT_EQ(child.WaitExit(20s), "exited 0");
}

// A live peer that writes into us is disconnected: once on_peer_failure
// ran, nothing of it lands any more (the receiving half of the fence holds
// without the peer's cooperation).
TEST_P(UcxPeerDeathTest, NothingLandsAfterTheFenceOfALiveWriter) {
  UcxTransportOptions options;
  options.same_host_shared_memory = GetParam();
  auto a = MakeTestEndpoint(NewUcxTransport(options), true);
  GuardedBuffer dst(8 << 20, 0);
  auto region = (*a)->Register(dst.addr(), dst.size(), MemoryKind::kHost);
  ASSERT_THAT(region, IsOk());
  PeerProcess child((*a)->Address(), "writer", GetParam());
  ASSERT_TRUE(child.started());
  const PeerId peer = WaitForPeer(*a, 1);
  ASSERT_NE(peer, 0u);
  ASSERT_THAT((*a)->Send(peer, test_peer::EncodeRegion((*region)->info())), IsOk());
  ASSERT_EQ(WaitForPeer(*a, 2), peer) << "the writer's bytes never arrived";
  (*a)->Disconnect(peer, UnavailableError("the writer went silent"));
  ASSERT_TRUE(a->WaitForFailure(peer, 20s));
  EXPECT_THAT(a->failure_reason(peer), StatusIs(StatusCode::kUnavailable, HasSubstr("silent")));
  // Clear the region; nothing may write it again.
  std::memset(dst.data(), 0, dst.size());
  std::this_thread::sleep_for(100ms);
  EXPECT_TRUE(dst.AllEqual(0));
  EXPECT_TRUE(dst.GuardsIntact());
}

// A peer that is alive but stopped (SIGSTOP) answers nothing: our shutdown
// still ends within a bound, runs every callback once, and does not crash
// UCX with requests the peer never completed.
TEST_P(UcxPeerDeathTest, AStoppedPeerDoesNotHoldTheShutdown) {
  ConnectReceiver();
  ASSERT_FALSE(HasFatalFailure());
  auto& a = a_;
  auto& child = *child_;
  const PeerId peer = peer_;
  auto* target = &target_;
  auto* source = &source_;
  GuardedBuffer& src = *src_;
  const RegionInfo* info = &info_;
  child.Stop();
  // Enough writes that some cannot leave while the peer does not read.
  DoneTracker tracker;
  const WriteOp op{src.addr(), info->address, info->size};
  for (int i = 0; i < 16; ++i) {
    ASSERT_THAT((*a)->Write(**source, **target, {&op, 1}, tracker.Make()), IsOk());
  }
  ASSERT_THAT((*a)->Flush(peer, tracker.Make()), IsOk());
  (*a)->Disconnect(peer, UnavailableError("the peer stopped answering"));
  const auto start = std::chrono::steady_clock::now();
  a->Shutdown();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 10s);
  tracker.Seal();
  EXPECT_TRUE(tracker.WaitAll(0ms));
  EXPECT_EQ(tracker.Violations(), "");
  source->reset();
  target->reset();
  child.Kill();
}

INSTANTIATE_TEST_SUITE_P(Links, UcxPeerDeathTest, ::testing::Values(false, true),
                         [](const ::testing::TestParamInfo<bool>& param_info) {
                           return param_info.param ? "shared_memory" : "tcp";
                         });

// --- Reads from peer processes (process_vm_readv) ---------------------------

class UcxPeerReadTest : public UcxPeerDeathTest {
 protected:
  // a_ reads the receiver's region (target_, the source here) into a
  // region of its own (src_/source_, the target here).
  Status Read(DoneTracker& tracker, std::span<const ReadOp> ops) {
    InsideCall inside;
    Status status = (*a_)->Read(*target_, *source_, ops, tracker.Make(), {});
    if (!status.ok()) tracker.Forget();
    return status;
  }
};

// The receiver process holds PatternByte(i) at byte i of its region.
TEST_P(UcxPeerReadTest, ReadsAPeerProcessesMemory) {
  ConnectReceiver();
  ASSERT_FALSE(HasFatalFailure());
  auto caps = (*a_)->PeerCaps(peer_);
  ASSERT_THAT(caps, IsOk());
  ASSERT_TRUE(caps->read_remote) << "the probe of a child process failed";
  std::memset(src_->data(), 0, src_->size());
  // Scattered 256-byte ranges over the first MiB (many per call), then the
  // rest as one range (several calls).
  constexpr uint64_t kSmall = 256;
  constexpr uint64_t kSmallArea = uint64_t{1} << 20;
  std::vector<ReadOp> ops;
  for (uint64_t i = 0; i < kSmallArea / kSmall; ++i) {
    const uint64_t from = ((i * 7919) % (kSmallArea / kSmall)) * kSmall;
    ops.push_back({info_.address + from, src_->addr(i * kSmall), kSmall});
  }
  ops.push_back({info_.address + kSmallArea, src_->addr(kSmallArea), info_.size - kSmallArea});
  DoneTracker tracker;
  ASSERT_THAT(Read(tracker, ops), IsOk());
  ASSERT_TRUE(tracker.WaitAll(20s));
  ASSERT_THAT(tracker.status(0), IsOk());
  for (uint64_t i = 0; i < kSmallArea / kSmall; ++i) {
    const uint64_t from = ((i * 7919) % (kSmallArea / kSmall)) * kSmall;
    for (uint64_t j = 0; j < kSmall; ++j) {
      ASSERT_EQ(src_->data()[i * kSmall + j], test_peer::PatternByte(from + j)) << "range " << i;
    }
  }
  for (uint64_t i = kSmallArea; i < info_.size; ++i) {
    ASSERT_EQ(src_->data()[i], test_peer::PatternByte(i)) << "byte " << i;
  }
  EXPECT_TRUE(src_->GuardsIntact());
  const TransportStats stats = (*a_)->Stats();
  EXPECT_EQ(stats.read_ops, ops.size());
  EXPECT_EQ(stats.read_bytes, info_.size);
  EXPECT_EQ(tracker.Violations(), "");
}

// The peer process dies while we read it: every read ends within a bound
// (kUnavailable once it is gone), and on_peer_failure comes once, after the
// last of them ended (the fence).
TEST_P(UcxPeerReadTest, PeerKilledMidRead) {
  ConnectReceiver();
  ASSERT_FALSE(HasFatalFailure());
  auto caps = (*a_)->PeerCaps(peer_);
  ASSERT_THAT(caps, IsOk());
  ASSERT_TRUE(caps->read_remote);
  // Reads in flight without pause until the peer is gone; each `done`
  // notes whether the failure was already reported (it must not be).
  const ReadOp op{info_.address, src_->addr(), info_.size};
  DoneTracker tracker;
  std::atomic<int> accepted{0};
  std::atomic<int> ended{0};
  std::atomic<int> ended_after_failure{0};
  std::atomic<bool> stop{false};
  std::thread reader([&] {
    while (!stop) {
      InsideCall inside;
      TransportDone done = [this, &ended, &ended_after_failure,
                            inner = tracker.Make()](Status status) {
        if (a_->failures(peer_) > 0) ++ended_after_failure;
        ++ended;
        inner(std::move(status));
      };
      Status status = (*a_)->Read(*target_, *source_, {&op, 1}, std::move(done), {});
      if (!status.ok()) {
        tracker.Forget();
        EXPECT_THAT(status, StatusIs(StatusCode::kUnavailable));
        return;
      }
      ++accepted;
      std::this_thread::sleep_for(1ms);
    }
  });
  std::this_thread::sleep_for(100ms);
  const auto killed = std::chrono::steady_clock::now();
  child_->Kill();
  ASSERT_TRUE(a_->WaitForFailure(peer_, 20s));
  stop = true;
  reader.join();
  ASSERT_TRUE(tracker.WaitAll(20s));
  EXPECT_LT(std::chrono::steady_clock::now() - killed, 20s);
  EXPECT_GT(accepted.load(), 0);
  EXPECT_EQ(ended.load(), accepted.load());
  EXPECT_EQ(ended_after_failure.load(), 0) << "a read ended after on_peer_failure";
  EXPECT_EQ(a_->failures(peer_), 1);
  EXPECT_THAT(a_->failure_reason(peer_), StatusIs(StatusCode::kUnavailable));
  EXPECT_EQ(tracker.Violations(), "");
  // A read that did not finish says the peer or its connection is gone.
  for (const Status& status : tracker.statuses()) {
    if (!status.ok()) {
      EXPECT_THAT(status, StatusIs(StatusCode::kUnavailable));
    }
  }
  EXPECT_THAT((*a_)->Read(*target_, *source_, {&op, 1}, [](Status) {}, {}),
              StatusIs(StatusCode::kUnavailable));
  target_.reset();
}

// A peer process with same_host_read off offers nothing to read.
TEST_P(UcxPeerReadTest, APeerWithSameHostReadOffIsNotRead) {
  UcxTransportOptions options;
  options.same_host_shared_memory = GetParam();
  a_ = MakeTestEndpoint(NewUcxTransport(options), true);
  PeerProcess child((*a_)->Address(), "receiver", GetParam(), {"0"});
  ASSERT_TRUE(child.started());
  const PeerId peer = WaitForPeer(*a_, 2);
  ASSERT_NE(peer, 0u);
  auto caps = (*a_)->PeerCaps(peer);
  ASSERT_THAT(caps, IsOk());
  EXPECT_FALSE(caps->read_remote);
  auto info = test_peer::DecodeRegion(a_->messages()[1].frame);
  ASSERT_TRUE(info.has_value());
  auto source = (*a_)->Import(peer, *info);
  ASSERT_THAT(source, IsOk());
  GuardedBuffer dst(4096);
  auto target = (*a_)->Register(dst.addr(), dst.size(), MemoryKind::kHost);
  ASSERT_THAT(target, IsOk());
  const ReadOp op{info->address, dst.addr(), 4096};
  EXPECT_THAT((*a_)->Read(**source, **target, {&op, 1}, [](Status) {}, {}),
              StatusIs(StatusCode::kUnimplemented));
  source->reset();
}

// The peer process reads us (the child reads its parent). A seccomp
// profile that refuses process_vm_readv turns reads off at the probe, for
// that peer only, and Read then says kUnimplemented.
TEST_P(UcxPeerReadTest, APeerProcessReadsUsUnlessTheKernelRefuses) {
  UcxTransportOptions options;
  options.same_host_shared_memory = GetParam();
  a_ = MakeTestEndpoint(NewUcxTransport(options), true);
  GuardedBuffer region_buffer(size_t{1} << 20);
  for (size_t i = 0; i < region_buffer.size(); ++i) {
    region_buffer.data()[i] = test_peer::PatternByte(i);
  }
  auto region = (*a_)->Register(region_buffer.addr(), region_buffer.size(), MemoryKind::kHost);
  ASSERT_THAT(region, IsOk());
  size_t seen = 0;
  for (const char* mode : {"reader", "reader-denied"}) {
    SCOPED_TRACE(mode);
    // reader-denied takes TCP for its data: UCX's own cross-memory attach
    // would meet the same filter.
    const bool shm = GetParam() && std::string(mode) == "reader";
    PeerProcess child((*a_)->Address(), mode, shm);
    ASSERT_TRUE(child.started());
    const PeerId peer = WaitForPeer(*a_, seen + 2);  // READY, then CAPS or NOSECCOMP
    ASSERT_NE(peer, 0u);
    const std::string answer = Text(a_->messages()[seen + 1].frame);
    seen += 2;
    if (answer == "NOSECCOMP") {
      GTEST_SKIP() << "seccomp filters are not available here";
    }
    const bool denied = std::string(mode) == "reader-denied";
    EXPECT_EQ(answer, denied ? "CAPS 0" : "CAPS 1");
    ASSERT_THAT((*a_)->Send(peer, test_peer::EncodeRegion((*region)->info())), IsOk());
    ASSERT_EQ(WaitForPeer(*a_, seen + 1), peer);
    EXPECT_EQ(Text(a_->messages()[seen].frame), denied ? "READ UNIMPLEMENTED 0" : "READ OK 1");
    seen += 1;
    (*a_)->Disconnect(peer, UnavailableError("done"));
    ASSERT_TRUE(a_->WaitForFailure(peer, 20s));
  }
}

INSTANTIATE_TEST_SUITE_P(Links, UcxPeerReadTest, ::testing::Values(false, true),
                         [](const ::testing::TestParamInfo<bool>& param_info) {
                           return param_info.param ? "shared_memory" : "tcp";
                         });

}  // namespace
}  // namespace kvbounce::transport_test
