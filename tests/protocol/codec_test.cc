// Tests of the control-protocol codec: round trips, golden frames, and every
// way a frame can be malformed.
#include "protocol/codec.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <new>
#include <string>
#include <vector>

#include "protocol/messages.h"
#include "protocol/wire.h"

// --- Allocation probe -----------------------------------------------------
// The global allocation functions are replaced so a test can assert that a
// decoder handed a huge count never asks for a huge buffer. Only allocations
// made while a probe is active on this thread are recorded.
namespace {
thread_local bool g_probe_active = false;
thread_local size_t g_probe_largest = 0;

void* ProbedAlloc(size_t size) {
  if (g_probe_active && size > g_probe_largest) g_probe_largest = size;
  void* p = std::malloc(size == 0 ? 1 : size);
  if (p == nullptr) std::abort();
  return p;
}
}  // namespace

void* operator new(size_t size) { return ProbedAlloc(size); }
void* operator new[](size_t size) { return ProbedAlloc(size); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t) noexcept { std::free(p); }

namespace kvbounce::protocol {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

// Records the largest allocation made while it is alive.
class AllocationProbe {
 public:
  AllocationProbe() {
    g_probe_largest = 0;
    g_probe_active = true;
  }
  ~AllocationProbe() { g_probe_active = false; }
  size_t largest() const { return g_probe_largest; }
};

// --- Status matchers --------------------------------------------------------

MATCHER_P(IsErrorCode, code, "") {
  if (arg.code() == code) return true;
  *result_listener << "status is " << arg.ToString();
  return false;
}

MATCHER_P2(IsError, code, substring, "") {
  if (arg.code() == code && arg.message().find(substring) != std::string_view::npos) {
    return true;
  }
  *result_listener << "status is " << arg.ToString();
  return false;
}

// --- Helpers ---------------------------------------------------------------

using Frame = std::vector<std::byte>;

Frame Bytes(std::initializer_list<int> values) {
  Frame out;
  for (int v : values) out.push_back(static_cast<std::byte>(v));
  return out;
}

Frame MustEncode(const Message& message) {
  Result<Frame> frame = EncodeFrame(message);
  EXPECT_TRUE(frame.ok()) << frame.status();
  return frame.ok() ? *frame : Frame();
}

void PatchU8(Frame& f, size_t offset, uint8_t v) { f.at(offset) = static_cast<std::byte>(v); }
void PatchU16(Frame& f, size_t offset, uint16_t v) {
  ASSERT_LE(offset + 2, f.size());
  StoreLe16(f.data() + offset, v);
}
void PatchU32(Frame& f, size_t offset, uint32_t v) {
  ASSERT_LE(offset + 4, f.size());
  StoreLe32(f.data() + offset, v);
}
void PatchU64(Frame& f, size_t offset, uint64_t v) {
  ASSERT_LE(offset + 8, f.size());
  StoreLe64(f.data() + offset, v);
}

// Decodes with the typed decoder of the message's type.
Status DecodeTyped(MessageType type, std::span<const std::byte> frame) {
  switch (type) {
    case MessageType::kHello:
      return DecodeHello(frame).status();
    case MessageType::kKvRequest:
      return DecodeKvRequest(frame).status();
    case MessageType::kKvResult:
      return DecodeKvResult(frame).status();
    case MessageType::kCancel:
      return DecodeCancel(frame).status();
    case MessageType::kBye:
      return DecodeBye(frame).status();
    case MessageType::kKvReady:
      return DecodeKvReady(frame).status();
    case MessageType::kKvReadDone:
      return DecodeKvReadDone(frame).status();
    case MessageType::kKvGrant:
      return DecodeKvGrant(frame).status();
    case MessageType::kKvChunk:
      return DecodeKvChunk(frame).status();
  }
  return InternalError("unreachable");
}

Hello SmallHello() {
  Hello h;
  h.instance_id = "ctx-instance-0";
  h.role = Role::kCtx;
  h.placement = {
      .tp_rank = 1, .tp_size = 2, .pp_rank = 1, .pp_size = 2, .layers_per_stage = {17, 15}};
  h.model = {.num_layers = 32, .num_kv_heads = 8, .head_dim = 128, .kv_factor = 2, .elem_bytes = 2};
  h.layout = {.kind = LayoutKind::kBlockMajorHnd,
              .tokens_per_block = 32,
              .num_blocks = 1024,
              .base = 0x7f0000000000,
              .s_layer = 2 * 4 * 32 * 128 * 2,
              .s_kv = 4 * 32 * 128 * 2,
              .s_block = 15ull * 2 * 4 * 32 * 128 * 2,
              .s_head = 32 * 128 * 2,
              .s_token = 256,
              .layer_bases = {}};
  h.regions = {
      {.kind = RegionKind::kPool,
       .memory = MemoryKind::kCuda,
       .device = 1,
       .addr = 0x7f0000000000,
       .size = 1ull << 30,
       .remote_key = Bytes({1, 2, 3, 4, 5})},
      {.kind = RegionKind::kSendArena,
       .memory = MemoryKind::kPinnedHost,
       .addr = 0x1000,
       .size = 64 << 20,
       .remote_key = {}},
      {.kind = RegionKind::kRecvArena,
       .memory = MemoryKind::kHost,
       .addr = 0,
       .size = UINT64_MAX,
       .remote_key = Bytes({0xFF})},
  };
  h.capabilities = kCapabilityBounce | kCapabilityDeviceMemory | (uint64_t{1} << 63);
  return h;
}

// The largest HELLO the limits allow: every list and string at its limit.
Hello MaxHello(bool max_stages) {
  Hello h;
  h.instance_id = std::string(kMaxInstanceIdBytes, 'i');
  h.role = Role::kGen;
  if (max_stages) {
    h.placement = {.tp_rank = UINT32_MAX - 1,
                   .tp_size = UINT32_MAX,
                   .pp_rank = kMaxPipelineStages - 1,
                   .pp_size = kMaxPipelineStages,
                   .layers_per_stage =
                       std::vector<uint32_t>(kMaxPipelineStages, kMaxLayers / kMaxPipelineStages)};
  } else {
    h.placement = {
        .tp_rank = 0, .tp_size = 1, .pp_rank = 0, .pp_size = 1, .layers_per_stage = {kMaxLayers}};
  }
  h.model = {.num_layers = kMaxLayers,
             .num_kv_heads = UINT32_MAX,
             .head_dim = UINT32_MAX,
             .kv_factor = UINT32_MAX,
             .elem_bytes = UINT32_MAX};
  const uint32_t local = h.placement.layers_per_stage[h.placement.pp_rank];
  h.layout = {.kind = LayoutKind::kLayerMajorNhd,
              .tokens_per_block = UINT32_MAX,
              .num_blocks = UINT32_MAX,
              .base = UINT64_MAX,
              .s_layer = UINT64_MAX,
              .s_kv = UINT64_MAX,
              .s_block = UINT64_MAX,
              .s_head = UINT64_MAX,
              .s_token = UINT64_MAX,
              .layer_bases = std::vector<uint64_t>(local, UINT64_MAX)};
  for (uint32_t i = 0; i < kMaxRegions; ++i) {
    h.regions.push_back({.kind = RegionKind::kRecvArena,
                         .memory = MemoryKind::kCuda,
                         .device = kMaxDevice,
                         .addr = UINT64_MAX,
                         .size = 0,
                         .remote_key = Frame(kMaxRemoteKeyBytes, std::byte{0x5A})});
  }
  h.capabilities = UINT64_MAX;
  return h;
}

// A hybrid model's HELLO (version 6): seven layers, attention only at index
// 3, recurrent layers holding a conv state of two segments and an SSM state;
// one pipeline stage, a layer-major state pool with one base per recurrent
// layer.
Hello HybridHello() {
  Hello h;
  h.instance_id = "gen-hybrid-0";
  h.role = Role::kGen;
  h.placement = {.tp_rank = 1, .tp_size = 2, .pp_rank = 0, .pp_size = 1, .layers_per_stage = {7}};
  h.model = {.num_layers = 1,
             .num_kv_heads = 8,
             .head_dim = 128,
             .kv_factor = 2,
             .elem_bytes = 2,
             .layer_pattern = "M-M*-M-",
             .state = {
                 // conv state
                 {.elem_bytes = 2,
                  .segments = {{.units = 64, .unit_elems = 3}, {.units = 8, .unit_elems = 384}}},
                 // SSM state
                 {.elem_bytes = 4, .segments = {{.units = 64, .unit_elems = 4096}}},
             }};
  h.layout = {.kind = LayoutKind::kLayerMajorHnd,
              .tokens_per_block = 16,
              .num_blocks = 512,
              .base = 0,
              .s_layer = 0,
              .s_kv = 512 * 4 * 16 * 128 * 2,
              .s_block = 4 * 16 * 128 * 2,
              .s_head = 16 * 128 * 2,
              .s_token = 128 * 2,
              .layer_bases = {0x7f1000000000}};
  h.state_layout = {.kind = StateLayoutKind::kLayerMajor,
                    .num_slots = 64,
                    .base = 0,
                    .layer_bases = {0x7f2000000000, 0x7f2000100000, 0x7f2000200000}};
  h.regions = {{.kind = RegionKind::kPool,
                .memory = MemoryKind::kCuda,
                .device = 0,
                .addr = 0x7f1000000000,
                .size = 1ull << 32,
                .remote_key = Bytes({7, 7})}};
  h.capabilities = kCapabilityBounce | kCapabilityDeviceMemory;
  return h;
}

// HybridHello's model split over two stages, "M-M" (two recurrent layers) and
// "*-M-" (one attention, one recurrent layer), seen from stage `pp_rank`.
// `single_base`: the state pool is one slot-major allocation instead of one
// per recurrent layer.
Hello HybridStageHello(uint32_t pp_rank, bool single_base) {
  Hello h = HybridHello();
  h.placement.pp_size = 2;
  h.placement.pp_rank = pp_rank;
  h.placement.layers_per_stage = {3, 4};
  h.layout.layer_bases.clear();  // stage 0 holds no attention layer
  if (pp_rank == 1) h.layout.layer_bases = {0x7f1000000000};
  h.state_layout.layer_bases.clear();
  if (single_base) {
    h.state_layout.kind = StateLayoutKind::kSlotMajor;
    h.state_layout.base = 0x7f2000000000;
  } else {
    for (uint32_t i = 0; i < (pp_rank == 0 ? 2u : 1u); ++i) {
      h.state_layout.layer_bases.push_back(0x7f2000000000 + (uint64_t{i} << 20));
    }
  }
  return h;
}

// The largest hybrid HELLO: the pattern, the state shape and both layer_bases
// lists as long as the limits and the rules allow.
Hello MaxHybridHello() {
  Hello h = MaxHello(false);
  h.model.layer_pattern.clear();
  for (uint32_t i = 0; i < kMaxLayers / 2; ++i) h.model.layer_pattern += "*M";
  h.model.num_layers = kMaxLayers / 2;
  h.layout.layer_bases.assign(kMaxLayers / 2, UINT64_MAX);
  StateTensorDescriptor tensor;
  tensor.elem_bytes = 8;
  tensor.segments.assign(kMaxStateSegments, {.units = UINT32_MAX, .unit_elems = UINT32_MAX});
  h.model.state.assign(kMaxStateTensors, tensor);
  h.state_layout = {.kind = StateLayoutKind::kLayerMajor,
                    .num_slots = UINT32_MAX,
                    .base = 0,
                    .layer_bases = std::vector<uint64_t>(kMaxLayers / 2, UINT64_MAX)};
  return h;
}

KvRequest SmallKvRequest() {
  KvRequest r;
  r.request_id = 0x1122334455667788;
  r.slice_id = 3;
  r.token_start = 128;
  r.token_end = 8192;
  r.block_table = {0, 1, 2, 7, 1000, 4294967295u};
  r.path = TransferPath::kBounce;
  r.recv_slot_addr = 0x7f00deadb000;
  r.recv_slot_size = 320ull << 20;
  r.plan_fingerprint = 0xfeedfacecafebeef;
  r.deadline_ms = 60000;
  r.receiver_rank = 2;
  r.writer_rank = 5;
  return r;
}

KvResult SmallKvResult() {
  KvResult r;
  r.request_id = 99;
  r.slice_id = 0;
  r.writer_rank = 7;
  r.status = ResultStatus::kFailed;
  r.error_code = 6;  // DATA_LOSS
  r.bytes_written = 1234;
  r.plan_fingerprint = 42;
  r.error_text = "plan fingerprint mismatch";
  return r;
}

struct Sample {
  std::string name;
  Message message;
  bool big = false;  // too big for the quadratic truncation sweep
};

std::vector<Sample> Samples() {
  std::vector<Sample> s;
  s.push_back({"hello_small", SmallHello()});
  {
    Hello h = SmallHello();
    h.instance_id = "x";
    h.placement = {.tp_rank = 0, .tp_size = 1, .pp_rank = 0, .pp_size = 1, .layers_per_stage = {0}};
    h.model = {};
    h.layout = {};
    h.regions.clear();
    h.capabilities = 0;
    s.push_back({"hello_minimal", h});
  }
  {
    Hello h = SmallHello();
    h.layout.kind = LayoutKind::kLayerMajorHnd;
    h.layout.layer_bases = std::vector<uint64_t>(15);
    for (size_t i = 0; i < 15; ++i) h.layout.layer_bases[i] = 0x10000000 * (i + 1);
    s.push_back({"hello_layer_bases", h});
  }
  s.push_back({"hello_max_stages", MaxHello(true), true});
  s.push_back({"hello_max_layers", MaxHello(false), true});

  s.push_back({"kv_request_small", SmallKvRequest()});
  s.push_back({"kv_request_zero", KvRequest{.deadline_ms = 0}});
  {
    KvRequest r;
    r.request_id = UINT64_MAX;
    r.slice_id = UINT32_MAX;
    r.token_start = UINT64_MAX;
    r.token_end = UINT64_MAX;
    r.block_table = {UINT32_MAX, 0};
    r.path = TransferPath::kAuto;
    r.recv_slot_addr = UINT64_MAX;
    r.recv_slot_size = 0;
    r.plan_fingerprint = UINT64_MAX;
    r.deadline_ms = kNoDeadline;
    r.receiver_rank = UINT32_MAX;
    r.writer_rank = UINT32_MAX;
    s.push_back({"kv_request_max_values", r});
  }
  {
    KvRequest r = SmallKvRequest();
    r.path = TransferPath::kDirect;
    r.block_table.resize(100000);
    for (size_t i = 0; i < r.block_table.size(); ++i) {
      r.block_table[i] = static_cast<uint32_t>(i * 2654435761u);
    }
    s.push_back({"kv_request_long_table", r, true});
  }

  s.push_back({"kv_result_small", SmallKvResult()});
  s.push_back({"kv_result_success", KvResult{.request_id = 1, .bytes_written = 1ull << 40}});
  {
    KvResult r;
    r.request_id = UINT64_MAX;
    r.slice_id = UINT32_MAX;
    r.writer_rank = UINT32_MAX;
    r.status = ResultStatus::kCancelled;
    r.error_code = kMaxErrorCode;
    r.bytes_written = UINT64_MAX;
    r.plan_fingerprint = UINT64_MAX;
    r.error_text = std::string(kMaxErrorTextBytes, 'e');
    s.push_back({"kv_result_max", r});
  }

  s.push_back({"kv_ready_empty", KvReady{}});
  s.push_back({"kv_ready_small", KvReady{.request_id = 3,
                                         .slice_id = 1,
                                         .writer_rank = 2,
                                         .plan_fingerprint = 0xFEED,
                                         .block_table = {4, 9, 1}}});
  {
    KvReady r;
    r.request_id = UINT64_MAX;
    r.slice_id = UINT32_MAX;
    r.writer_rank = UINT32_MAX;
    r.plan_fingerprint = UINT64_MAX;
    r.block_table.assign(100000, UINT32_MAX);
    s.push_back({"kv_ready_long_table", r, true});
  }
  s.push_back({"kv_read_done_success",
               KvReadDone{.request_id = 8, .slice_id = 2, .writer_rank = 1, .bytes_read = 4096}});
  s.push_back({"kv_read_done_max", KvReadDone{.request_id = UINT64_MAX,
                                              .slice_id = UINT32_MAX,
                                              .writer_rank = UINT32_MAX,
                                              .status = ResultStatus::kCancelled,
                                              .bytes_read = UINT64_MAX,
                                              .error_text = std::string(kMaxErrorTextBytes, 'x')}});

  s.push_back({"kv_grant_small", KvGrant{.request_id = 8,
                                         .slice_id = 2,
                                         .writer_rank = 1,
                                         .chunk = 3,
                                         .slot_addr = 0x10000,
                                         .slot_size = 1 << 20}});
  s.push_back({"kv_grant_max", KvGrant{.request_id = UINT64_MAX,
                                       .slice_id = UINT32_MAX,
                                       .writer_rank = UINT32_MAX,
                                       .chunk = UINT64_MAX,
                                       .slot_addr = 0,
                                       .slot_size = UINT64_MAX}});
  s.push_back(
      {"kv_chunk_small",
       KvChunk{.request_id = 8, .slice_id = 2, .writer_rank = 1, .chunk = 3, .bytes = 300}});
  s.push_back({"kv_chunk_max", KvChunk{.request_id = UINT64_MAX,
                                       .slice_id = UINT32_MAX,
                                       .writer_rank = UINT32_MAX,
                                       .chunk = UINT64_MAX,
                                       .bytes = UINT64_MAX}});
  {
    KvRequest r;
    r.request_id = 4;
    r.token_end = 64;
    r.path = TransferPath::kBounce;
    r.chunk_bytes = uint64_t{1} << 20;
    r.block_table = {1, 2};
    s.push_back({"kv_request_streamed", r});
  }

  s.push_back({"hello_hybrid", HybridHello()});
  s.push_back({"hello_hybrid_stage0", HybridStageHello(0, false)});
  s.push_back({"hello_hybrid_stage1_single_base", HybridStageHello(1, true)});
  s.push_back({"hello_hybrid_max", MaxHybridHello(), true});
  {
    KvRequest r = SmallKvRequest();
    r.state_slot = 17;
    s.push_back({"kv_request_state_slot", r});
    r.state_slot = 0;
    s.push_back({"kv_request_state_slot0", r});
  }
  s.push_back({"kv_ready_state_slot", KvReady{.request_id = 3,
                                              .slice_id = 1,
                                              .writer_rank = 2,
                                              .plan_fingerprint = 0xFEED,
                                              .block_table = {4, 9, 1},
                                              .state_slot = kNoStateSlot - 1}});

  s.push_back({"cancel_empty", Cancel{}});
  s.push_back({"cancel_small", Cancel{.request_id = 77, .reason = "deadline exceeded"}});
  s.push_back({"cancel_max",
               Cancel{.request_id = UINT64_MAX, .reason = std::string(kMaxReasonBytes, 'r')}});

  s.push_back({"bye_default", Bye{}});
  s.push_back({"bye_error", Bye{.reason = ByeReason::kProtocolError, .message = "bad frame"}});
  s.push_back({"bye_max", Bye{.reason = ByeReason::kIncompatible,
                              .message = std::string(kMaxReasonBytes, '\0')}});
  return s;
}

// --- Round trips ------------------------------------------------------------

TEST(CodecTest, EveryMessageRoundTripsThroughTypedAndDispatchingDecoders) {
  for (const Sample& sample : Samples()) {
    SCOPED_TRACE(sample.name);
    const Frame frame = MustEncode(sample.message);
    ASSERT_GE(frame.size(), kHeaderSize);
    EXPECT_LE(frame.size() - kHeaderSize, MaxPayloadBytes(TypeOf(sample.message)));

    Result<Message> decoded = DecodeFrame(frame);
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_TRUE(*decoded == sample.message);
    EXPECT_EQ(DecodeTyped(TypeOf(sample.message), frame), Status::Ok());

    // Canonical: re-encoding what was decoded gives back the same bytes.
    EXPECT_TRUE(MustEncode(*decoded) == frame);

    Result<FrameHeader> header = DecodeHeader(frame);
    ASSERT_TRUE(header.ok()) << header.status();
    EXPECT_EQ(header->version, kProtocolVersion);
    EXPECT_EQ(header->type, TypeOf(sample.message));
    EXPECT_EQ(header->frame_length(), frame.size());
  }
}

TEST(CodecTest, TypedEncodersMatchEncodeFrame) {
  const Hello hello = SmallHello();
  EXPECT_TRUE(*Encode(hello) == MustEncode(hello));
  EXPECT_TRUE(*Encode(SmallKvRequest()) == MustEncode(SmallKvRequest()));
  EXPECT_TRUE(*Encode(SmallKvResult()) == MustEncode(SmallKvResult()));
  EXPECT_TRUE(*Encode(Cancel{.request_id = 5}) == MustEncode(Cancel{.request_id = 5}));
  EXPECT_TRUE(*Encode(Bye{}) == MustEncode(Bye{}));

  Result<Hello> h = DecodeHello(*Encode(hello));
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_TRUE(*h == hello);
  Result<KvResult> r = DecodeKvResult(*Encode(SmallKvResult()));
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(*r == SmallKvResult());
}

TEST(CodecTest, UnknownCapabilityBitsAreCarriedUnchanged) {
  Hello h = SmallHello();
  h.capabilities = 0xA5A5A5A5A5A5A5A5ull;
  Result<Hello> decoded = DecodeHello(MustEncode(h));
  ASSERT_TRUE(decoded.ok());
  EXPECT_EQ(decoded->capabilities, 0xA5A5A5A5A5A5A5A5ull);
}

// --- Golden frames ------------------------------------------------------------
// Hand-written expected bytes. If one of these fails, the wire format changed:
// that needs a new protocol version and an update of docs/wire_format.md.

TEST(CodecGoldenTest, KvResult) {
  KvResult m;
  m.request_id = 0x0102030405060708;
  m.slice_id = 9;
  m.writer_rank = 3;
  m.status = ResultStatus::kFailed;
  m.error_code = 3;  // RESOURCE_EXHAUSTED
  m.bytes_written = 0x1000;
  m.plan_fingerprint = 0xA1B2C3D4E5F60718;
  m.error_text = "oom";
  const Frame expected = Bytes({
      0x4B, 0x56, 0x42, 0x43,                          // magic "KVBC"
      0x06, 0x00,                                      // version 6
      0x03, 0x00,                                      // type KV_RESULT
      0x29, 0x00, 0x00, 0x00,                          // payload length 41
      0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01,  // request_id
      0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // bytes_written
      0x18, 0x07, 0xF6, 0xE5, 0xD4, 0xC3, 0xB2, 0xA1,  // plan_fingerprint
      0x09, 0x00, 0x00, 0x00,                          // slice_id
      0x03, 0x00, 0x00, 0x00,                          // writer_rank
      0x01,                                            // status FAILED
      0x03,                                            // error_code RESOURCE_EXHAUSTED
      0x03, 0x00, 0x00, 0x00, 'o',  'o',  'm',         // error_text
  });
  EXPECT_TRUE(MustEncode(m) == expected);
  Result<KvResult> decoded = DecodeKvResult(expected);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_TRUE(*decoded == m);
}

TEST(CodecGoldenTest, KvReadyAndKvReadDone) {
  const KvReady ready{.request_id = 7,
                      .slice_id = 1,
                      .writer_rank = 2,
                      .plan_fingerprint = 0xDEADBEEF,
                      .block_table = {5, 0x01020304},
                      .state_slot = 3};
  const Frame ready_frame = Bytes({
      0x4B, 0x56, 0x42, 0x43, 0x06, 0x00, 0x06, 0x00,  // magic, version 6, KV_READY
      0x28, 0x00, 0x00, 0x00,                          // payload length 40
      0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // request_id
      0xEF, 0xBE, 0xAD, 0xDE, 0x00, 0x00, 0x00, 0x00,  // plan_fingerprint
      0x01, 0x00, 0x00, 0x00,                          // slice_id
      0x02, 0x00, 0x00, 0x00,                          // writer_rank
      0x03, 0x00, 0x00, 0x00,                          // state_slot 3
      0x02, 0x00, 0x00, 0x00,                          // block_table count
      0x05, 0x00, 0x00, 0x00, 0x04, 0x03, 0x02, 0x01,  // block ids
  });
  EXPECT_TRUE(MustEncode(ready) == ready_frame);
  Result<KvReady> decoded_ready = DecodeKvReady(ready_frame);
  ASSERT_TRUE(decoded_ready.ok()) << decoded_ready.status();
  EXPECT_TRUE(*decoded_ready == ready);

  const KvReadDone done{.request_id = 7,
                        .slice_id = 1,
                        .writer_rank = 2,
                        .status = ResultStatus::kFailed,
                        .bytes_read = 0x1000,
                        .error_text = "io"};
  const Frame done_frame = Bytes({
      0x4B, 0x56, 0x42, 0x43, 0x06, 0x00, 0x07, 0x00,  // magic, version 6, KV_READ_DONE
      0x1F, 0x00, 0x00, 0x00,                          // payload length 31
      0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // request_id
      0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // bytes_read
      0x01, 0x00, 0x00, 0x00,                          // slice_id
      0x02, 0x00, 0x00, 0x00,                          // writer_rank
      0x01,                                            // status FAILED
      0x02, 0x00, 0x00, 0x00, 'i',  'o',               // error_text
  });
  EXPECT_TRUE(MustEncode(done) == done_frame);
  Result<KvReadDone> decoded_done = DecodeKvReadDone(done_frame);
  ASSERT_TRUE(decoded_done.ok()) << decoded_done.status();
  EXPECT_TRUE(*decoded_done == done);
  // A status outside the enum is refused.
  Frame bad = done_frame;
  bad[kHeaderSize + 24] = std::byte{9};
  EXPECT_THAT(DecodeKvReadDone(bad).status(), IsErrorCode(StatusCode::kDataLoss));
}

TEST(CodecGoldenTest, KvRequest) {
  KvRequest m;
  m.request_id = 7;
  m.token_start = 16;
  m.token_end = 48;
  m.recv_slot_addr = 0x10000000;
  m.recv_slot_size = 0x2000;
  m.plan_fingerprint = 0xDEADBEEF;
  m.deadline_ms = 5000;
  m.slice_id = 1;
  m.receiver_rank = 0;
  m.writer_rank = 2;
  m.path = TransferPath::kBounce;
  m.block_table = {5, 0x01020304};
  const Frame expected = Bytes({
      0x4B, 0x56, 0x42, 0x43, 0x06, 0x00, 0x02, 0x00,  // magic, version 6, KV_REQUEST
      0x5D, 0x00, 0x00, 0x00,                          // payload length 93
      0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // request_id
      0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // token_start
      0x30, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // token_end
      0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00,  // recv_slot_addr
      0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // recv_slot_size
      0xEF, 0xBE, 0xAD, 0xDE, 0x00, 0x00, 0x00, 0x00,  // plan_fingerprint
      0x88, 0x13, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // deadline_ms 5000
      0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // chunk_bytes 0 (not streamed)
      0x01, 0x00, 0x00, 0x00,                          // slice_id
      0x00, 0x00, 0x00, 0x00,                          // receiver_rank
      0x02, 0x00, 0x00, 0x00,                          // writer_rank
      0xFF, 0xFF, 0xFF, 0xFF,                          // state_slot none (KV only)
      0x01,                                            // path BOUNCE
      0x02, 0x00, 0x00, 0x00,                          // block_table count
      0x05, 0x00, 0x00, 0x00, 0x04, 0x03, 0x02, 0x01,  // block ids
  });
  EXPECT_TRUE(MustEncode(m) == expected);
  Result<KvRequest> decoded = DecodeKvRequest(expected);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_TRUE(*decoded == m);
}

TEST(CodecGoldenTest, KvGrantAndKvChunk) {
  const KvGrant grant{.request_id = 7,
                      .slice_id = 1,
                      .writer_rank = 2,
                      .chunk = 3,
                      .slot_addr = 0x10000000,
                      .slot_size = 0x100000};
  const Frame grant_frame = Bytes({
      0x4B, 0x56, 0x42, 0x43, 0x06, 0x00, 0x08, 0x00,  // magic, version 6, KV_GRANT
      0x28, 0x00, 0x00, 0x00,                          // payload length 40
      0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // request_id
      0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // chunk
      0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00,  // slot_addr
      0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00,  // slot_size
      0x01, 0x00, 0x00, 0x00,                          // slice_id
      0x02, 0x00, 0x00, 0x00,                          // writer_rank
  });
  EXPECT_TRUE(MustEncode(grant) == grant_frame);
  Result<KvGrant> decoded_grant = DecodeKvGrant(grant_frame);
  ASSERT_TRUE(decoded_grant.ok()) << decoded_grant.status();
  EXPECT_TRUE(*decoded_grant == grant);

  const KvChunk chunk{.request_id = 7, .slice_id = 1, .writer_rank = 2, .chunk = 3, .bytes = 300};
  const Frame chunk_frame = Bytes({
      0x4B, 0x56, 0x42, 0x43, 0x06, 0x00, 0x09, 0x00,  // magic, version 6, KV_CHUNK
      0x20, 0x00, 0x00, 0x00,                          // payload length 32
      0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // request_id
      0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // chunk
      0x2C, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // bytes 300
      0x01, 0x00, 0x00, 0x00,                          // slice_id
      0x02, 0x00, 0x00, 0x00,                          // writer_rank
  });
  EXPECT_TRUE(MustEncode(chunk) == chunk_frame);
  Result<KvChunk> decoded_chunk = DecodeKvChunk(chunk_frame);
  ASSERT_TRUE(decoded_chunk.ok()) << decoded_chunk.status();
  EXPECT_TRUE(*decoded_chunk == chunk);
  // A frame one byte short, or with a byte to spare, is DATA_LOSS.
  Frame short_frame(chunk_frame.begin(), chunk_frame.end() - 1);
  PatchU32(short_frame, kLengthOffset, 31);
  EXPECT_THAT(DecodeKvChunk(short_frame).status(), IsErrorCode(StatusCode::kDataLoss));
  Frame long_frame = grant_frame;
  long_frame.push_back(std::byte{0});
  PatchU32(long_frame, kLengthOffset, 41);
  EXPECT_THAT(DecodeKvGrant(long_frame).status(), IsErrorCode(StatusCode::kDataLoss));
}

TEST(CodecGoldenTest, CancelAndBye) {
  const Frame cancel = Bytes({
      0x4B, 0x56, 0x42, 0x43, 0x06, 0x00, 0x04, 0x00,  // magic, version 6, CANCEL
      0x0F, 0x00, 0x00, 0x00,                          // payload length 15
      0x2A, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // request_id 42
      0x03, 0x00, 0x00, 0x00, 't',  't',  'l',         // reason
  });
  EXPECT_TRUE(MustEncode(Cancel{.request_id = 42, .reason = "ttl"}) == cancel);
  const Frame bye = Bytes({
      0x4B, 0x56, 0x42, 0x43, 0x06, 0x00, 0x05, 0x00,  // magic, version 6, BYE
      0x05, 0x00, 0x00, 0x00,                          // payload length 5
      0x00,                                            // reason SHUTDOWN
      0x00, 0x00, 0x00, 0x00,                          // message ""
  });
  EXPECT_TRUE(MustEncode(Bye{}) == bye);
}

TEST(CodecGoldenTest, Hello) {
  Hello m;
  m.instance_id = "g0";
  m.role = Role::kGen;
  m.placement = {.tp_rank = 1, .tp_size = 2, .pp_rank = 0, .pp_size = 1, .layers_per_stage = {2}};
  m.model = {.num_layers = 2, .num_kv_heads = 8, .head_dim = 128, .kv_factor = 2, .elem_bytes = 2};
  m.layout = {.kind = LayoutKind::kLayerMajorNhd,
              .tokens_per_block = 16,
              .num_blocks = 4,
              .base = 0x100000,
              .s_layer = 0,
              .s_kv = 0x10000,
              .s_block = 0x4000,
              .s_head = 0x100,
              .s_token = 0x400,
              .layer_bases = {0x100000, 0x200000}};
  m.regions = {{.kind = RegionKind::kRecvArena,
                .memory = MemoryKind::kCuda,
                .device = 2,
                .addr = 0x7F0000000000,
                .size = 0x400000,
                .remote_key = Bytes({0xAA, 0xBB})}};
  m.capabilities = kCapabilityBounce | kCapabilityDeviceMemory;
  const Frame expected = Bytes({
      0x4B, 0x56, 0x42, 0x43, 0x06, 0x00, 0x01, 0x00,  // magic, version 6, HELLO
      0xC3, 0x00, 0x00, 0x00,                          // payload length 195
      0x06, 0x00,                                      // protocol_version 6
      0x01,                                            // role GEN
      0x02,                                            // layout.kind LAYER_MAJOR_NHD
      0x01, 0x00, 0x00, 0x00,                          // tp_rank
      0x02, 0x00, 0x00, 0x00,                          // tp_size
      0x00, 0x00, 0x00, 0x00,                          // pp_rank
      0x01, 0x00, 0x00, 0x00,                          // pp_size
      0x02, 0x00, 0x00, 0x00,                          // num_layers
      0x08, 0x00, 0x00, 0x00,                          // num_kv_heads
      0x80, 0x00, 0x00, 0x00,                          // head_dim
      0x02, 0x00, 0x00, 0x00,                          // kv_factor
      0x02, 0x00, 0x00, 0x00,                          // elem_bytes
      0x10, 0x00, 0x00, 0x00,                          // tokens_per_block
      0x04, 0x00, 0x00, 0x00,                          // num_blocks
      0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00,  // layout.base
      0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // s_layer
      0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00,  // s_kv
      0x00, 0x40, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // s_block
      0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // s_head
      0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // s_token
      0x09, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // capabilities
      0x02, 0x00, 0x00, 0x00, 'g',  '0',               // instance_id
      0x01, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00,  // layers_per_stage {2}
      0x02, 0x00, 0x00, 0x00,                          // layer_bases count
      0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00,  //   0x100000
      0x00, 0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00,  //   0x200000
      0x01, 0x00, 0x00, 0x00,                          // regions count
      0x02,                                            //   kind RECV_ARENA
      0x02,                                            //   memory CUDA
      0x02, 0x00, 0x00, 0x00,                          //   device 2
      0x00, 0x00, 0x00, 0x00, 0x00, 0x7F, 0x00, 0x00,  //   addr
      0x00, 0x00, 0x40, 0x00, 0x00, 0x00, 0x00, 0x00,  //   size
      0x02, 0x00, 0x00, 0x00, 0xAA, 0xBB,              //   remote_key
      0x00, 0x00, 0x00, 0x00,                          // model.layer_pattern "" (no hybrid)
      0x00, 0x00, 0x00, 0x00,                          // model.state count
      0x00,                                            // state_layout.kind SLOT_MAJOR
      0x00, 0x00, 0x00, 0x00,                          // state_layout.num_slots
      0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // state_layout.base
      0x00, 0x00, 0x00, 0x00,                          // state_layout.layer_bases count
  });
  EXPECT_TRUE(MustEncode(m) == expected);
  Result<Hello> decoded = DecodeHello(expected);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_TRUE(*decoded == m);
}

// --- Truncation -------------------------------------------------------------

TEST(CodecTest, EveryPrefixOfEveryFrameIsRejected) {
  for (const Sample& sample : Samples()) {
    SCOPED_TRACE(sample.name);
    const Frame frame = MustEncode(sample.message);
    const MessageType type = TypeOf(sample.message);
    for (size_t n = 0; n < frame.size(); ++n) {
      // Big frames: every prefix near either end, a stride in between.
      if (sample.big && n > 4096 && n + 4096 < frame.size() && n % 997 != 0) continue;
      const std::span<const std::byte> prefix(frame.data(), n);
      Result<Message> decoded = DecodeFrame(prefix);
      ASSERT_FALSE(decoded.ok()) << "prefix " << n;
      ASSERT_EQ(decoded.status().code(), StatusCode::kDataLoss) << decoded.status();
      ASSERT_EQ(DecodeTyped(type, prefix).code(), StatusCode::kDataLoss) << "prefix " << n;
      // A stream reader keeps waiting: never an error, never a short length.
      Result<std::optional<size_t>> length = FrameLength(prefix);
      ASSERT_TRUE(length.ok()) << length.status();
      if (n < kHeaderSize) {
        ASSERT_FALSE(length->has_value());
      } else {
        ASSERT_EQ(length->value(), frame.size());
      }
    }
  }
}

// The header is patched to agree with a cut payload, so the decoder has to
// find the missing field itself.
TEST(CodecTest, EveryConsistentlyTruncatedPayloadIsRejected) {
  for (const Sample& sample : Samples()) {
    if (sample.big) continue;
    SCOPED_TRACE(sample.name);
    const Frame frame = MustEncode(sample.message);
    const MessageType type = TypeOf(sample.message);
    const std::string name(MessageTypeName(type));
    for (size_t cut = 0; cut < frame.size() - kHeaderSize; ++cut) {
      Frame truncated(frame.begin(), frame.begin() + static_cast<ptrdiff_t>(kHeaderSize + cut));
      PatchU32(truncated, kLengthOffset, static_cast<uint32_t>(cut));
      Result<Message> decoded = DecodeFrame(truncated);
      ASSERT_FALSE(decoded.ok()) << "payload cut at " << cut;
      ASSERT_EQ(decoded.status().code(), StatusCode::kDataLoss);
      ASSERT_THAT(std::string(decoded.status().message()), StartsWith(name + "."))
          << decoded.status();
    }
  }
}

TEST(CodecTest, TruncationNamesFieldAndOffset) {
  Frame frame = MustEncode(SmallKvResult());
  // Keep request_id and 3 bytes of bytes_written.
  frame.resize(kHeaderSize + 8 + 3);
  PatchU32(frame, kLengthOffset, 11);
  EXPECT_THAT(DecodeKvResult(frame).status(),
              IsError(StatusCode::kDataLoss,
                      "KV_RESULT.bytes_written: truncated at offset 20 (need 8 bytes, have 3)"));
}

// --- Header -----------------------------------------------------------------

TEST(CodecTest, BadMagicIsRejected) {
  Frame frame = MustEncode(SmallKvResult());
  PatchU32(frame, kMagicOffset, 0xDEADBEEF);
  EXPECT_THAT(DecodeFrame(frame).status(),
              IsError(StatusCode::kDataLoss, "bad magic 0xdeadbeef (expected 0x4342564b)"));
  EXPECT_THAT(DecodeKvResult(frame).status(), IsErrorCode(StatusCode::kDataLoss));
  EXPECT_THAT(DecodeHeader(frame).status(), IsErrorCode(StatusCode::kDataLoss));
  EXPECT_THAT(FrameLength(frame).status(), IsErrorCode(StatusCode::kDataLoss));
}

TEST(CodecTest, FrameLengthRejectsBadMagicFromTheFirstByte) {
  EXPECT_THAT(FrameLength(Bytes({'X'})).status(),
              IsError(StatusCode::kDataLoss, "byte 0 is 0x58, expected 0x4b"));
  EXPECT_THAT(FrameLength(Bytes({'K', 'V', 'X'})).status(),
              IsError(StatusCode::kDataLoss, "byte 2 is 0x58, expected 0x42"));
  Result<std::optional<size_t>> ok = FrameLength(Bytes({'K', 'V', 'B', 'C', 1}));
  ASSERT_TRUE(ok.ok());
  EXPECT_FALSE(ok->has_value());
  Result<std::optional<size_t>> empty = FrameLength({});
  ASSERT_TRUE(empty.ok());
  EXPECT_FALSE(empty->has_value());
}

TEST(CodecTest, UnknownVersionIsRejectedNamingBothVersions) {
  Frame frame = MustEncode(SmallKvRequest());
  PatchU16(frame, kVersionOffset, 1);
  const std::string want = "unsupported protocol version 1 (this build speaks 6)";
  EXPECT_THAT(DecodeFrame(frame).status(), IsError(StatusCode::kDataLoss, want));
  EXPECT_THAT(DecodeKvRequest(frame).status(), IsError(StatusCode::kDataLoss, want));
  EXPECT_THAT(FrameLength(frame).status(), IsError(StatusCode::kDataLoss, want));
  PatchU16(frame, kVersionOffset, 0);
  EXPECT_THAT(DecodeFrame(frame).status(), IsError(StatusCode::kDataLoss, "version 0"));
}

TEST(CodecTest, HelloPayloadVersionMustMatch) {
  Frame frame = MustEncode(SmallHello());
  PatchU16(frame, kHeaderSize + 0, 7);
  EXPECT_THAT(DecodeHello(frame).status(),
              IsError(StatusCode::kDataLoss, "HELLO.protocol_version: 7, this build speaks 6"));
  Hello h = SmallHello();
  h.protocol_version = 1;
  EXPECT_THAT(Encode(h).status(), IsErrorCode(StatusCode::kInvalidArgument));
}

TEST(CodecTest, UnknownTypeIsRejected) {
  for (uint16_t type : {0, 10, 0x100, 0xFFFF}) {
    Frame frame = MustEncode(Bye{});
    PatchU16(frame, kTypeOffset, type);
    EXPECT_THAT(DecodeFrame(frame).status(),
                IsError(StatusCode::kDataLoss, "unknown message type " + std::to_string(type)));
    EXPECT_THAT(FrameLength(frame).status(), IsErrorCode(StatusCode::kDataLoss));
  }
}

TEST(CodecTest, TypedDecoderRejectsAnotherType) {
  const Frame cancel = MustEncode(Cancel{.request_id = 1});
  EXPECT_THAT(DecodeKvResult(cancel).status(),
              IsError(StatusCode::kDataLoss, "expected a KV_RESULT frame, got CANCEL"));
  EXPECT_THAT(DecodeHello(cancel).status(), IsErrorCode(StatusCode::kDataLoss));
  EXPECT_THAT(DecodeKvRequest(cancel).status(), IsErrorCode(StatusCode::kDataLoss));
  EXPECT_THAT(DecodeBye(cancel).status(), IsErrorCode(StatusCode::kDataLoss));
  EXPECT_TRUE(DecodeCancel(cancel).ok());
}

TEST(CodecTest, OversizeLengthIsRejectedFromTheHeaderAlone) {
  struct Case {
    Message message;
    uint32_t length;
    std::string want;
  };
  const std::vector<Case> cases = {
      {KvResult{}, 0xFFFFFFFF, "KV_RESULT payload length 4294967295 exceeds limit 4134"},
      {KvResult{}, kKvResultFixedBytes + kMaxErrorTextBytes + 1, "exceeds limit"},
      {Cancel{}, kMaxPayloadBytes, "CANCEL payload length"},
      {Bye{}, 1u << 20, "BYE payload length"},
      {KvRequest{}, kMaxPayloadBytes + 1, "KV_REQUEST payload length"},
      {SmallHello(), kMaxPayloadBytes, "HELLO payload length"},
  };
  for (const Case& c : cases) {
    Frame header = MustEncode(c.message);
    header.resize(kHeaderSize);
    PatchU32(header, kLengthOffset, c.length);
    EXPECT_THAT(FrameLength(header).status(), IsError(StatusCode::kDataLoss, c.want));
    EXPECT_THAT(DecodeHeader(header).status(), IsError(StatusCode::kDataLoss, c.want));
    EXPECT_THAT(DecodeFrame(header).status(), IsError(StatusCode::kDataLoss, c.want));
  }
}

TEST(CodecTest, HeaderLengthMustMatchTheBytesPresent) {
  const Frame frame = MustEncode(SmallKvResult());
  const uint32_t length = static_cast<uint32_t>(frame.size() - kHeaderSize);
  {
    Frame f = frame;
    PatchU32(f, kLengthOffset, length + 1);  // claims a byte that is not there
    EXPECT_THAT(DecodeFrame(f).status(),
                IsError(StatusCode::kDataLoss, "KV_RESULT frame: truncated, header says " +
                                                   std::to_string(length + 1) + " payload bytes, " +
                                                   std::to_string(length) + " present"));
  }
  {
    Frame f = frame;
    PatchU32(f, kLengthOffset, length - 1);  // the last byte becomes trailing
    EXPECT_THAT(DecodeFrame(f).status(),
                IsError(StatusCode::kDataLoss, "KV_RESULT frame: 1 trailing bytes"));
  }
}

TEST(CodecTest, TrailingBytesAreRejected) {
  for (const Sample& sample : Samples()) {
    SCOPED_TRACE(sample.name);
    const std::string name(MessageTypeName(TypeOf(sample.message)));
    Frame frame = MustEncode(sample.message);
    // After the frame, with the header unchanged.
    Frame longer = frame;
    longer.push_back(std::byte{0});
    EXPECT_THAT(DecodeFrame(longer).status(),
                IsError(StatusCode::kDataLoss, name + " frame: 1 trailing bytes"));
    // Inside the payload, with the header length covering it.
    Frame padded = frame;
    padded.push_back(std::byte{0});
    padded.push_back(std::byte{0});
    PatchU32(padded, kLengthOffset, static_cast<uint32_t>(padded.size() - kHeaderSize));
    const Status status = DecodeFrame(padded).status();
    if (padded.size() - kHeaderSize > MaxPayloadBytes(TypeOf(sample.message))) {
      EXPECT_THAT(status, IsError(StatusCode::kDataLoss, "exceeds limit"));
    } else {
      EXPECT_THAT(status,
                  IsError(StatusCode::kDataLoss, name + ": 2 trailing bytes after the last field"));
    }
  }
}

// --- Counts and lengths -----------------------------------------------------

constexpr size_t kKvRequestPathOffset = kHeaderSize + 80;
constexpr size_t kKvRequestTableOffset = kHeaderSize + 81;
constexpr size_t kKvResultStatusOffset = kHeaderSize + 32;
constexpr size_t kKvResultTextOffset = kHeaderSize + 34;
constexpr size_t kHelloInstanceIdOffset = kHeaderSize + 104;

// Offset of the regions count in an encoded HELLO.
size_t HelloRegionsOffset(const Hello& h) {
  return kHelloInstanceIdOffset + 4 + h.instance_id.size() + 4 +
         4 * h.placement.layers_per_stage.size() + 4 + 8 * h.layout.layer_bases.size();
}

// Offsets of the version 6 fields in an encoded HELLO, which follow the
// regions: model.layer_pattern's length, model.state's count, tensor i of
// model.state (its elem_bytes; its segments' count 4 bytes later, segment j
// 8 + 8 * j bytes in), and state_layout (kind, then num_slots at + 1, base
// at + 5, the layer_bases count at + 13).
size_t HelloPatternOffset(const Hello& h) {
  size_t at = HelloRegionsOffset(h) + 4;
  for (const RegionDescriptor& r : h.regions) at += kRegionFixedBytes + r.remote_key.size();
  return at;
}
size_t HelloStateOffset(const Hello& h) {
  return HelloPatternOffset(h) + 4 + h.model.layer_pattern.size();
}
size_t HelloTensorOffset(const Hello& h, size_t i) {
  size_t at = HelloStateOffset(h) + 4;
  for (size_t k = 0; k < i; ++k) {
    at += kStateTensorFixedBytes + kStateSegmentBytes * h.model.state[k].segments.size();
  }
  return at;
}
size_t HelloStateLayoutOffset(const Hello& h) { return HelloTensorOffset(h, h.model.state.size()); }

TEST(CodecTest, HugeCountsAreRejectedBeforeAllocating) {
  struct Case {
    std::string name;
    Frame frame;
    size_t offset;
    uint32_t value;
    std::string want;
  };
  const Hello hello = SmallHello();
  const size_t regions = HelloRegionsOffset(hello);
  const std::vector<Case> cases = {
      {"block_table", MustEncode(SmallKvRequest()), kKvRequestTableOffset, 0xFFFFFFFF,
       "KV_REQUEST.block_table: count 4294967295 exceeds limit 8388608"},
      {"block_table_at_limit", MustEncode(SmallKvRequest()), kKvRequestTableOffset,
       kMaxBlockTableEntries,
       "KV_REQUEST.block_table: count 8388608 needs 33554432 bytes, have 24"},
      {"error_text", MustEncode(SmallKvResult()), kKvResultTextOffset, 0xFFFFFFFF,
       "KV_RESULT.error_text: length 4294967295 exceeds limit 4096"},
      {"error_text_short", MustEncode(SmallKvResult()), kKvResultTextOffset, 4000,
       "KV_RESULT.error_text: length 4000 needs 4000 bytes, have 25 (offset 46)"},
      {"cancel_reason", MustEncode(Cancel{.reason = "x"}), kHeaderSize + 8, 0x80000000,
       "CANCEL.reason: length 2147483648 exceeds limit 4096"},
      {"bye_message", MustEncode(Bye{}), kHeaderSize + 1, 4096,
       "BYE.message: length 4096 needs 4096 bytes, have 0"},
      {"instance_id", MustEncode(hello), kHelloInstanceIdOffset, 0xFFFFFFFF,
       "HELLO.instance_id: length 4294967295 exceeds limit 256"},
      {"layers_per_stage", MustEncode(hello), kHelloInstanceIdOffset + 4 + 14, 0xFFFFFFF0,
       "HELLO.placement.layers_per_stage: count 4294967280 exceeds limit 1024"},
      {"layer_bases", MustEncode(hello), regions - 4, 4096,
       "HELLO.layout.layer_bases: count 4096 needs 32768 bytes"},
      {"regions", MustEncode(hello), regions, 0xFFFFFFFF,
       "HELLO.regions: count 4294967295 exceeds limit 64"},
      {"regions_short", MustEncode(hello), regions, 64, "HELLO.regions: count 64 needs 1664 bytes"},
      {"remote_key", MustEncode(hello), regions + 4 + 22, 0xFFFFFFFF,
       "HELLO.regions[0].remote_key: length 4294967295 exceeds limit 16384"},
      {"remote_key_short", MustEncode(hello), regions + 4 + 22, 16384,
       "HELLO.regions[0].remote_key: length 16384 needs 16384 bytes"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    Frame frame = c.frame;
    PatchU32(frame, c.offset, c.value);
    Status status;
    size_t largest = 0;
    {
      AllocationProbe probe;
      status = DecodeFrame(frame).status();
      largest = probe.largest();
    }
    EXPECT_THAT(status, IsError(StatusCode::kDataLoss, c.want));
    // Error messages and small fields only; never a buffer sized by the count.
    EXPECT_LT(largest, 4096u) << "largest allocation " << largest;
  }
}

TEST(CodecTest, AllocationProbeSeesDecoderAllocations) {
  KvRequest r = SmallKvRequest();
  r.block_table.assign(100000, 1);
  const Frame frame = MustEncode(r);
  size_t largest = 0;
  {
    AllocationProbe probe;
    ASSERT_TRUE(DecodeFrame(frame).ok());
    largest = probe.largest();
  }
  EXPECT_GE(largest, 4 * r.block_table.size());
}

// --- Enums and invariants ---------------------------------------------------

TEST(CodecTest, EnumValuesOutOfRangeAreRejected) {
  struct Case {
    std::string name;
    Frame frame;
    size_t offset;
    uint8_t value;
    std::string want;
  };
  const Hello hello = SmallHello();
  const size_t region0 = HelloRegionsOffset(hello) + 4;
  const std::vector<Case> cases = {
      {"status3", MustEncode(SmallKvResult()), kKvResultStatusOffset, 3,
       "KV_RESULT.status: value 3 out of range 0..2"},
      {"status255", MustEncode(SmallKvResult()), kKvResultStatusOffset, 255,
       "KV_RESULT.status: value 255 out of range 0..2"},
      {"path", MustEncode(SmallKvRequest()), kKvRequestPathOffset, 5,
       "KV_REQUEST.path: value 5 out of range 0..4"},
      {"role", MustEncode(hello), kHeaderSize + 2, 2, "HELLO.role: value 2 out of range 0..1"},
      {"layout_kind", MustEncode(hello), kHeaderSize + 3, 3,
       "HELLO.layout.kind: value 3 out of range 0..2"},
      {"region_kind", MustEncode(hello), region0, 3,
       "HELLO.regions[0].kind: value 3 out of range 0..2"},
      {"memory_kind", MustEncode(hello), region0 + 1, 200,
       "HELLO.regions[0].memory: value 200 out of range 0..2"},
      {"bye_reason", MustEncode(Bye{}), kHeaderSize, 3, "BYE.reason: value 3 out of range 0..2"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    Frame frame = c.frame;
    PatchU8(frame, c.offset, c.value);
    EXPECT_THAT(DecodeFrame(frame).status(), IsError(StatusCode::kDataLoss, c.want));
  }
}

TEST(CodecTest, InvertedTokenRangeIsRejectedBothWays) {
  KvRequest r = SmallKvRequest();
  r.token_start = 9;
  r.token_end = 4;
  EXPECT_THAT(Encode(r).status(),
              IsError(StatusCode::kInvalidArgument, "KV_REQUEST.token_range: start 9 > end 4"));
  Frame frame = MustEncode(SmallKvRequest());
  PatchU64(frame, kHeaderSize + 8, 9);   // token_start
  PatchU64(frame, kHeaderSize + 16, 4);  // token_end
  EXPECT_THAT(DecodeKvRequest(frame).status(),
              IsError(StatusCode::kDataLoss, "KV_REQUEST.token_range: start 9 > end 4"));
}

TEST(CodecTest, WrappingAddressRangesAreRejected) {
  KvRequest r = SmallKvRequest();
  r.recv_slot_addr = UINT64_MAX - 10;
  r.recv_slot_size = 11;
  EXPECT_THAT(Encode(r).status(),
              IsError(StatusCode::kInvalidArgument, "KV_REQUEST.recv_slot_size"));
  r.recv_slot_size = 10;
  EXPECT_TRUE(Encode(r).ok());

  Hello h = SmallHello();
  h.regions[1].addr = UINT64_MAX;
  h.regions[1].size = 1;
  EXPECT_THAT(Encode(h).status(),
              IsError(StatusCode::kInvalidArgument, "HELLO.regions[1].size: address"));
  Frame frame = MustEncode(SmallHello());
  PatchU64(frame, HelloRegionsOffset(SmallHello()) + 4 + 6, UINT64_MAX);  // region 0 addr
  EXPECT_THAT(DecodeHello(frame).status(),
              IsError(StatusCode::kDataLoss, "HELLO.regions[0].size: address"));
}

TEST(CodecTest, InconsistentPlacementIsRejected) {
  struct Case {
    std::string name;
    void (*mutate)(Hello&);
    std::string want;
  };
  const std::vector<Case> cases = {
      {"tp_size0", [](Hello& h) { h.placement.tp_size = 0; }, "HELLO.placement.tp_size: 0"},
      {"tp_rank", [](Hello& h) { h.placement.tp_rank = 2; },
       "HELLO.placement.tp_rank: 2 not below tp_size 2"},
      {"pp_size0", [](Hello& h) { h.placement.pp_size = 0; }, "HELLO.placement.pp_size: 0"},
      {"pp_size_limit",
       [](Hello& h) {
         h.placement.pp_size = kMaxPipelineStages + 1;
         h.placement.layers_per_stage.assign(kMaxPipelineStages + 1, 0);
       },
       "HELLO.placement.pp_size: 1025 exceeds limit 1024"},
      {"pp_rank", [](Hello& h) { h.placement.pp_rank = 5; },
       "HELLO.placement.pp_rank: 5 not below pp_size 2"},
      {"stages", [](Hello& h) { h.placement.layers_per_stage = {32}; },
       "HELLO.placement.layers_per_stage: 1 entries, pp_size is 2"},
      {"sum",
       [](Hello& h) {
         h.placement.layers_per_stage = {16, 15};
       },
       "HELLO.placement.layers_per_stage: entries sum to 31, model.num_layers is 32"},
      {"num_layers",
       [](Hello& h) {
         h.model.num_layers = kMaxLayers + 1;
         h.placement.layers_per_stage = {kMaxLayers, 1};
       },
       "HELLO.model.num_layers: 4097 exceeds limit 4096"},
      {"layer_bases",
       [](Hello& h) {
         h.layout.layer_bases = {1, 2, 3};
       },
       "HELLO.layout.layer_bases: 3 entries, must be 0 or the 15 layers of stage 1"},
      {"instance_empty", [](Hello& h) { h.instance_id.clear(); }, "HELLO.instance_id: empty"},
      {"instance_long", [](Hello& h) { h.instance_id.assign(kMaxInstanceIdBytes + 1, 'a'); },
       "HELLO.instance_id: 257 bytes exceed limit 256"},
      {"regions", [](Hello& h) { h.regions.resize(kMaxRegions + 1); },
       "HELLO.regions: 65 entries exceed limit 64"},
      {"remote_key", [](Hello& h) { h.regions[2].remote_key.resize(kMaxRemoteKeyBytes + 1); },
       "HELLO.regions[2].remote_key: 16385 bytes exceed limit 16384"},
      {"role", [](Hello& h) { h.role = static_cast<Role>(9); },
       "HELLO.role: value 9 out of range 0..1"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    Hello h = SmallHello();
    c.mutate(h);
    EXPECT_THAT(Validate(h), IsError(StatusCode::kInvalidArgument, c.want));
    EXPECT_THAT(Encode(h).status(), IsError(StatusCode::kInvalidArgument, c.want));
    EXPECT_THAT(EncodeFrame(Message(h)).status(), IsErrorCode(StatusCode::kInvalidArgument));
  }
}

TEST(CodecTest, DecodedPlacementIsValidated) {
  Frame frame = MustEncode(SmallHello());
  PatchU32(frame, kHeaderSize + 4, 2);  // tp_rank = tp_size
  EXPECT_THAT(DecodeHello(frame).status(),
              IsError(StatusCode::kDataLoss, "HELLO.placement.tp_rank: 2 not below tp_size 2"));
}

TEST(CodecTest, EncodersRejectOversizeFields) {
  KvRequest r;
  r.block_table.resize(size_t{kMaxBlockTableEntries} + 1);
  EXPECT_THAT(Encode(r).status(),
              IsError(StatusCode::kInvalidArgument,
                      "KV_REQUEST.block_table: 8388609 entries exceed limit 8388608"));
  r.block_table.resize(kMaxBlockTableEntries);
  Result<Frame> max_request = Encode(r);
  ASSERT_TRUE(max_request.ok()) << max_request.status();
  EXPECT_EQ(max_request->size(), kHeaderSize + kMaxKvRequestPayloadBytes);
  Result<KvRequest> decoded = DecodeKvRequest(*max_request);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->block_table.size(), kMaxBlockTableEntries);

  KvResult res;
  res.error_text.assign(kMaxErrorTextBytes + 1, 'x');
  EXPECT_THAT(Encode(res).status(), IsError(StatusCode::kInvalidArgument,
                                            "KV_RESULT.error_text: 4097 bytes exceed limit 4096"));
  res.status = static_cast<ResultStatus>(3);
  EXPECT_THAT(Encode(res).status(),
              IsError(StatusCode::kInvalidArgument, "KV_RESULT.status: value 3 out of range"));
  EXPECT_THAT(Encode(Cancel{.reason = std::string(kMaxReasonBytes + 1, 'c')}).status(),
              IsError(StatusCode::kInvalidArgument, "CANCEL.reason: 4097 bytes"));
  EXPECT_THAT(Encode(Bye{.message = std::string(kMaxReasonBytes + 1, 'c')}).status(),
              IsError(StatusCode::kInvalidArgument, "BYE.message: 4097 bytes"));
  EXPECT_THAT(Encode(Bye{.reason = static_cast<ByeReason>(3)}).status(),
              IsError(StatusCode::kInvalidArgument, "BYE.reason: value 3"));
  KvRequest bad_path;
  bad_path.path = static_cast<TransferPath>(5);
  EXPECT_THAT(Encode(bad_path).status(),
              IsError(StatusCode::kInvalidArgument, "KV_REQUEST.path: value 5"));
}

// The fixed bytes of each message are its payload with every list and
// string empty (a HELLO has at least one instance_id byte and one stage).
TEST(CodecTest, FixedBytesAreTheSmallestPayloads) {
  Hello h;
  h.instance_id = "x";
  h.placement.layers_per_stage = {0};
  EXPECT_EQ(MustEncode(h).size(), kHeaderSize + kHelloFixedBytes + 1 + 4);
  EXPECT_EQ(MustEncode(KvRequest{}).size(), kHeaderSize + kKvRequestFixedBytes);
  EXPECT_EQ(MustEncode(KvReady{}).size(), kHeaderSize + kKvReadyFixedBytes);
  EXPECT_EQ(MustEncode(KvResult{}).size(), kHeaderSize + kKvResultFixedBytes);
  EXPECT_EQ(MustEncode(KvReadDone{}).size(), kHeaderSize + kKvReadDoneFixedBytes);
}

TEST(CodecTest, LargestHelloFitsItsLimit) {
  for (const Hello& hello : {MaxHello(true), MaxHello(false), MaxHybridHello()}) {
    Result<Frame> frame = Encode(hello);
    ASSERT_TRUE(frame.ok()) << frame.status();
    EXPECT_LE(frame->size() - kHeaderSize, kMaxHelloPayloadBytes);
  }
}

// --- Streaming --------------------------------------------------------------

TEST(CodecTest, FrameLengthSplitsAStreamFedByteByByte) {
  const std::vector<Message> sent = {SmallHello(), SmallKvRequest(), SmallKvResult(),
                                     Cancel{.request_id = 3, .reason = "user"}, Bye{}};
  Frame stream;
  for (const Message& m : sent) {
    const Frame f = MustEncode(m);
    stream.insert(stream.end(), f.begin(), f.end());
  }
  Frame buffer;
  std::vector<Message> received;
  for (std::byte b : stream) {
    buffer.push_back(b);
    for (;;) {
      Result<std::optional<size_t>> length = FrameLength(buffer);
      ASSERT_TRUE(length.ok()) << length.status();
      if (!length->has_value() || buffer.size() < **length) break;
      Result<Message> m = DecodeFrame(std::span<const std::byte>(buffer).first(**length));
      ASSERT_TRUE(m.ok()) << m.status();
      received.push_back(*std::move(m));
      buffer.erase(buffer.begin(), buffer.begin() + static_cast<ptrdiff_t>(**length));
    }
  }
  EXPECT_TRUE(buffer.empty());
  ASSERT_EQ(received.size(), sent.size());
  for (size_t i = 0; i < sent.size(); ++i) EXPECT_TRUE(received[i] == sent[i]) << i;
}

TEST(CodecTest, FrameLengthLooksOnlyAtTheFirstFrame) {
  Frame two = MustEncode(Bye{});
  const size_t first = two.size();
  const Frame second = MustEncode(Cancel{.request_id = 1});
  two.insert(two.end(), second.begin(), second.end());
  Result<std::optional<size_t>> length = FrameLength(two);
  ASSERT_TRUE(length.ok());
  EXPECT_EQ(length->value(), first);
  // A decoder given both frames at once sees trailing bytes.
  EXPECT_THAT(DecodeFrame(two).status(), IsError(StatusCode::kDataLoss, "trailing bytes"));
}

TEST(CodecTest, EnumNames) {
  EXPECT_EQ(ResultStatusName(ResultStatus::kCancelled), "CANCELLED");
  EXPECT_EQ(TransferPathName(TransferPath::kPerBlock), "PER_BLOCK");
  EXPECT_EQ(RoleName(Role::kGen), "GEN");
  EXPECT_EQ(LayoutKindName(LayoutKind::kLayerMajorNhd), "LAYER_MAJOR_NHD");
  EXPECT_EQ(RegionKindName(RegionKind::kSendArena), "SEND_ARENA");
  EXPECT_EQ(MemoryKindName(MemoryKind::kPinnedHost), "PINNED_HOST");
  EXPECT_EQ(ByeReasonName(ByeReason::kIncompatible), "INCOMPATIBLE");
  EXPECT_EQ(StateLayoutKindName(StateLayoutKind::kSlotMajor), "SLOT_MAJOR");
  EXPECT_EQ(StateLayoutKindName(StateLayoutKind::kLayerMajor), "LAYER_MAJOR");
  EXPECT_EQ(StateLayoutKindName(static_cast<StateLayoutKind>(2)), "UNKNOWN");
  EXPECT_EQ(ResultStatusName(static_cast<ResultStatus>(7)), "UNKNOWN");
  EXPECT_EQ(TypeOf(Message(Cancel{})), MessageType::kCancel);
}

}  // namespace
}  // namespace kvbounce::protocol

namespace kvbounce::protocol {
namespace {

// Streaming bounce's frames: a streamed KV_REQUEST is BOUNCE without a recv
// slot; a grant names a slot of at least one byte that does not wrap; a
// chunk holds bytes. Encoders refuse the rest as INVALID_ARGUMENT, decoders
// as DATA_LOSS, naming the field.
TEST(CodecTest, StreamingFramesKeepTheirRules) {
  KvRequest r;
  r.path = TransferPath::kPerBlock;
  r.chunk_bytes = 4096;
  EXPECT_THAT(Encode(r).status(), IsError(StatusCode::kInvalidArgument, "KV_REQUEST.chunk_bytes"));
  r.path = TransferPath::kBounce;
  r.recv_slot_addr = 4096;
  r.recv_slot_size = 4096;
  EXPECT_THAT(Encode(r).status(), IsError(StatusCode::kInvalidArgument, "KV_REQUEST.chunk_bytes"));
  r.recv_slot_addr = r.recv_slot_size = 0;
  ASSERT_TRUE(Encode(r).ok());
  // On the wire: the same request with its path patched to PER_BLOCK.
  std::vector<std::byte> frame = *Encode(r);
  frame[kKvRequestPathOffset] = std::byte{0};
  EXPECT_THAT(DecodeKvRequest(frame).status(),
              IsError(StatusCode::kDataLoss, "KV_REQUEST.chunk_bytes"));

  KvGrant g{.slot_addr = 4096, .slot_size = 0};
  EXPECT_THAT(Encode(g).status(), IsError(StatusCode::kInvalidArgument, "KV_GRANT.slot_size"));
  g.slot_addr = UINT64_MAX - 10;
  g.slot_size = 100;
  EXPECT_THAT(Encode(g).status(), IsError(StatusCode::kInvalidArgument, "KV_GRANT.slot_size"));
  g.slot_addr = 4096;
  ASSERT_TRUE(Encode(g).ok());
  frame = *Encode(g);
  PatchU64(frame, kHeaderSize + 24, 0);  // slot_size
  EXPECT_THAT(DecodeKvGrant(frame).status(), IsError(StatusCode::kDataLoss, "KV_GRANT.slot_size"));

  EXPECT_THAT(Encode(KvChunk{}).status(), IsError(StatusCode::kInvalidArgument, "KV_CHUNK.bytes"));
  frame = *Encode(KvChunk{.bytes = 1});
  PatchU64(frame, kHeaderSize + 16, 0);  // bytes
  EXPECT_THAT(DecodeKvChunk(frame).status(), IsError(StatusCode::kDataLoss, "KV_CHUNK.bytes"));
}

TEST(CodecTest, ErrorCodeMustMatchTheStatus) {
  KvResult r;
  r.status = ResultStatus::kSuccess;
  r.error_code = 2;
  EXPECT_THAT(Encode(r).status(), IsError(StatusCode::kInvalidArgument, "KV_RESULT.error_code"));
  r.status = ResultStatus::kFailed;
  r.error_code = 0;
  EXPECT_THAT(Encode(r).status(), IsError(StatusCode::kInvalidArgument, "KV_RESULT.error_code"));
  r.error_code = kMaxErrorCode + 1;
  EXPECT_THAT(Encode(r).status(), IsErrorCode(StatusCode::kInvalidArgument));
  r.error_code = kMaxErrorCode;
  ASSERT_TRUE(Encode(r).ok());
  // A decoder refuses the same on the wire, as DATA_LOSS.
  std::vector<std::byte> frame = *Encode(r);
  frame[kHeaderSize + 33] = std::byte{kMaxErrorCode + 1};
  EXPECT_THAT(DecodeKvResult(frame).status(),
              IsError(StatusCode::kDataLoss, "KV_RESULT.error_code"));
  frame[kHeaderSize + 33] = std::byte{0};
  EXPECT_THAT(DecodeKvResult(frame).status(),
              IsError(StatusCode::kDataLoss, "KV_RESULT.error_code"));
}

// --- Hybrid models (version 6) ----------------------------------------------

// `frame` with the `erase` bytes at `offset` replaced by `insert`, and the
// header length updated: a frame whose lists are longer or shorter than an
// encoder would write for the message it was encoded from.
Frame Splice(const Frame& frame, size_t offset, size_t erase, const Frame& insert = {}) {
  Frame out(frame.begin(), frame.begin() + static_cast<ptrdiff_t>(offset));
  out.insert(out.end(), insert.begin(), insert.end());
  out.insert(out.end(), frame.begin() + static_cast<ptrdiff_t>(offset + erase), frame.end());
  StoreLe32(out.data() + kLengthOffset, static_cast<uint32_t>(out.size() - kHeaderSize));
  return out;
}

TEST(CodecHybridTest, HybridHelloRoundTrips) {
  for (const Hello& hello : {HybridHello(), HybridStageHello(0, false), HybridStageHello(0, true),
                             HybridStageHello(1, false), HybridStageHello(1, true)}) {
    SCOPED_TRACE(hello.placement.pp_size == 1 ? "one stage"
                                              : "stage " + std::to_string(hello.placement.pp_rank));
    ASSERT_EQ(Validate(hello), Status::Ok());
    const Frame frame = MustEncode(hello);
    Result<Hello> decoded = DecodeHello(frame);
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_TRUE(*decoded == hello);
    EXPECT_EQ(decoded->model.layer_pattern, "M-M*-M-");
    ASSERT_EQ(decoded->model.state.size(), 2u);
    EXPECT_TRUE(MustEncode(*decoded) == frame);
  }
}

// The bytes of the version 6 fields, which follow the regions (the fields
// before them are pinned by CodecGoldenTest.Hello).
TEST(CodecHybridTest, HybridHelloGoldenTail) {
  const Hello hello = HybridHello();
  const Frame frame = MustEncode(hello);
  const Frame expected_tail = Bytes({
      0x07, 0x00, 0x00, 0x00, 'M',  '-',  'M',  '*',  '-', 'M', '-',  // model.layer_pattern
      0x02, 0x00, 0x00, 0x00,                                         // model.state count
      0x02, 0x00, 0x00, 0x00,                                         //   [0].elem_bytes 2
      0x02, 0x00, 0x00, 0x00,                                         //   [0].segments count
      0x40, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00,                 //     units 64, elems 3
      0x08, 0x00, 0x00, 0x00, 0x80, 0x01, 0x00, 0x00,                 //     units 8, elems 384
      0x04, 0x00, 0x00, 0x00,                                         //   [1].elem_bytes 4
      0x01, 0x00, 0x00, 0x00,                                         //   [1].segments count
      0x40, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00,                 //     units 64, 4096
      0x01,                                                           // state_layout.kind
      0x40, 0x00, 0x00, 0x00,                                         // num_slots 64
      0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,                 // base
      0x03, 0x00, 0x00, 0x00,                                         // layer_bases count
      0x00, 0x00, 0x00, 0x00, 0x20, 0x7F, 0x00, 0x00,                 //   0x7f2000000000
      0x00, 0x00, 0x10, 0x00, 0x20, 0x7F, 0x00, 0x00,                 //   0x7f2000100000
      0x00, 0x00, 0x20, 0x00, 0x20, 0x7F, 0x00, 0x00,                 //   0x7f2000200000
  });
  const size_t tail = HelloPatternOffset(hello);
  ASSERT_EQ(frame.size(), tail + expected_tail.size());
  EXPECT_TRUE(Frame(frame.begin() + static_cast<ptrdiff_t>(tail), frame.end()) == expected_tail);
  EXPECT_EQ(HelloStateLayoutOffset(hello) - tail, 4 + 7 + 4 + 24 + 16u);
}

TEST(CodecHybridTest, StateSlotsRoundTrip) {
  for (uint32_t slot : {0u, 5u, kNoStateSlot - 1, kNoStateSlot}) {
    SCOPED_TRACE(slot);
    KvRequest request = SmallKvRequest();
    request.state_slot = slot;
    const Frame request_frame = MustEncode(request);
    EXPECT_EQ(LoadLe32(request_frame.data() + kHeaderSize + 76), slot);
    Result<KvRequest> decoded_request = DecodeKvRequest(request_frame);
    ASSERT_TRUE(decoded_request.ok()) << decoded_request.status();
    EXPECT_TRUE(*decoded_request == request);
    EXPECT_EQ(decoded_request->state_slot, slot);

    const KvReady ready{.request_id = 1, .block_table = {3}, .state_slot = slot};
    const Frame ready_frame = MustEncode(ready);
    EXPECT_EQ(LoadLe32(ready_frame.data() + kHeaderSize + 24), slot);
    Result<KvReady> decoded_ready = DecodeKvReady(ready_frame);
    ASSERT_TRUE(decoded_ready.ok()) << decoded_ready.status();
    EXPECT_TRUE(*decoded_ready == ready);
  }
  // KV only is the default.
  EXPECT_EQ(KvRequest{}.state_slot, kNoStateSlot);
  EXPECT_EQ(KvReady{}.state_slot, kNoStateSlot);
}

// What a hybrid model's HELLO may be: the rules that do not refuse.
TEST(CodecHybridTest, ValidPatternsAndShapes) {
  struct Case {
    std::string name;
    void (*mutate)(Hello&);
  };
  const std::vector<Case> cases = {
      {"elem_bytes_1", [](Hello& h) { h.model.state[0].elem_bytes = 1; }},
      {"elem_bytes_8", [](Hello& h) { h.model.state[1].elem_bytes = 8; }},
      {"max_tensors_and_segments",
       [](Hello& h) {
         h.model.state.resize(kMaxStateTensors, h.model.state[0]);
         h.model.state[0].segments.resize(kMaxStateSegments, {.units = 1, .unit_elems = 1});
       }},
      // A pattern without recurrent layers carries no state and no pool.
      {"no_recurrent",
       [](Hello& h) {
         h.model.layer_pattern = "*--*";
         h.model.num_layers = 2;
         h.model.state.clear();
         h.placement.layers_per_stage = {4};
         h.layout.layer_bases = {1, 2};
         h.state_layout = {};
       }},
      // Slots are the rank's to have or not; the pool may be at address 0.
      {"no_slots", [](Hello& h) { h.state_layout = {.kind = StateLayoutKind::kLayerMajor}; }},
      {"slots_at_zero", [](Hello& h) { h.state_layout.layer_bases.clear(); }},
      {"recurrent_only",
       [](Hello& h) {
         h.model.layer_pattern = "MM";
         h.model.num_layers = 0;
         h.placement.layers_per_stage = {2};
         h.layout.layer_bases.clear();
         h.state_layout.layer_bases = {1, 2};
       }},
      {"pattern_at_limit",
       [](Hello& h) {
         h.model.layer_pattern.assign(kMaxLayers, '-');
         h.model.layer_pattern.front() = 'M';
         h.model.layer_pattern.back() = '*';
         h.placement.layers_per_stage = {kMaxLayers};
         h.state_layout.layer_bases = {1};
       }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    Hello h = HybridHello();
    c.mutate(h);
    ASSERT_EQ(Validate(h), Status::Ok());
    Result<Hello> decoded = DecodeHello(MustEncode(h));
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_TRUE(*decoded == h);
  }
}

// Each rule, broken in the message: the encoder refuses it as
// INVALID_ARGUMENT naming the field.
TEST(CodecHybridTest, EncoderRefusesAMalformedHybridHello) {
  struct Case {
    std::string name;
    std::function<void(Hello&)> mutate;
    std::string want;
  };
  const std::vector<Case> cases = {
      {"pattern_character", [](Hello& h) { h.model.layer_pattern[1] = 'x'; },
       "HELLO.model.layer_pattern: 'x' at index 1 is not '*', 'M' or '-'"},
      {"pattern_byte", [](Hello& h) { h.model.layer_pattern[4] = '\0'; },
       "HELLO.model.layer_pattern: byte 0 at index 4 is not"},
      {"pattern_length",
       [](Hello& h) {
         h.model.layer_pattern.assign(kMaxLayers + 1, '*');
         h.model.num_layers = kMaxLayers;
       },
       "HELLO.model.layer_pattern: 4097 bytes exceed limit 4096"},
      {"pattern_attention", [](Hello& h) { h.model.layer_pattern[1] = '*'; },
       "HELLO.model.layer_pattern: 2 attention layers ('*'), model.num_layers is 1"},
      {"num_layers", [](Hello& h) { h.model.num_layers = 7; },
       "HELLO.model.layer_pattern: 1 attention layers ('*'), model.num_layers is 7"},
      {"state_without_recurrent", [](Hello& h) { h.model.layer_pattern = "--*----"; },
       "HELLO.model.state: 2 tensors, but model.layer_pattern has no recurrent layer ('M')"},
      {"state_without_pattern",
       [](Hello& h) {
         h.model.layer_pattern.clear();
         h.placement.layers_per_stage = {1};
         h.state_layout = {};
       },
       "HELLO.model.state: 2 tensors, but model.layer_pattern has no recurrent layer ('M')"},
      {"recurrent_without_state", [](Hello& h) { h.model.state.clear(); },
       "HELLO.model.state: empty, but model.layer_pattern has 3 recurrent layers ('M')"},
      {"state_count",
       [](Hello& h) { h.model.state.resize(kMaxStateTensors + 1, h.model.state[0]); },
       "HELLO.model.state: 9 entries exceed limit 8"},
      {"elem_bytes_0", [](Hello& h) { h.model.state[1].elem_bytes = 0; },
       "HELLO.model.state[1].elem_bytes: 0, must be 1, 2, 4 or 8"},
      {"elem_bytes_3", [](Hello& h) { h.model.state[1].elem_bytes = 3; },
       "HELLO.model.state[1].elem_bytes: 3, must be 1, 2, 4 or 8"},
      {"elem_bytes_16", [](Hello& h) { h.model.state[0].elem_bytes = 16; },
       "HELLO.model.state[0].elem_bytes: 16, must be 1, 2, 4 or 8"},
      {"segments_empty", [](Hello& h) { h.model.state[1].segments.clear(); },
       "HELLO.model.state[1].segments: empty, a state tensor has 1 to 8 segments"},
      {"segments_count",
       [](Hello& h) {
         h.model.state[0].segments.resize(kMaxStateSegments + 1, {.units = 1, .unit_elems = 1});
       },
       "HELLO.model.state[0].segments: 9 entries exceed limit 8"},
      {"units", [](Hello& h) { h.model.state[0].segments[1].units = 0; },
       "HELLO.model.state[0].segments[1].units: 0, must be at least 1"},
      {"unit_elems", [](Hello& h) { h.model.state[1].segments[0].unit_elems = 0; },
       "HELLO.model.state[1].segments[0].unit_elems: 0, must be at least 1"},
      {"layers_per_stage", [](Hello& h) { h.placement.layers_per_stage = {1}; },
       "HELLO.placement.layers_per_stage: entries sum to 1, model.layer_pattern has 7 layers"},
      {"layers_per_stage_split",
       [](Hello& h) {
         h.placement = HybridStageHello(0, false).placement;
         h.placement.layers_per_stage = {3, 3};
       },
       "HELLO.placement.layers_per_stage: entries sum to 6, model.layer_pattern has 7 layers"},
      {"layout_layer_bases", [](Hello& h) { h.layout.layer_bases = {1, 2, 3, 4, 5, 6, 7}; },
       "HELLO.layout.layer_bases: 7 entries, must be 0 or the 1 attention layers of stage 0"},
      {"layout_layer_bases_stage",
       [](Hello& h) {
         h = HybridStageHello(0, false);
         h.layout.layer_bases = {1};
       },
       "HELLO.layout.layer_bases: 1 entries, must be 0 or the 0 attention layers of stage 0"},
      {"state_layout_kind", [](Hello& h) { h.state_layout.kind = static_cast<StateLayoutKind>(2); },
       "HELLO.state_layout.kind: value 2 out of range 0..1"},
      {"state_layer_bases_limit",
       [](Hello& h) { h.state_layout.layer_bases.resize(kMaxLayers + 1); },
       "HELLO.state_layout.layer_bases: 4097 entries exceed limit 4096"},
      {"no_slots_with_base",
       [](Hello& h) {
         h = HybridStageHello(1, true);
         h.state_layout.num_slots = 0;
       },
       "HELLO.state_layout.base: 139775415681024 with num_slots 0"},
      {"no_slots_with_layer_bases", [](Hello& h) { h.state_layout.num_slots = 0; },
       "HELLO.state_layout.layer_bases: 3 entries with num_slots 0"},
      {"base_and_layer_bases", [](Hello& h) { h.state_layout.base = 4096; },
       "HELLO.state_layout.layer_bases: 3 entries and base 4096"},
      {"state_layer_bases_count", [](Hello& h) { h.state_layout.layer_bases.pop_back(); },
       "HELLO.state_layout.layer_bases: 2 entries, must be 0 or the 3 recurrent layers of stage 0"},
      {"state_layer_bases_stage",
       [](Hello& h) {
         h = HybridStageHello(1, false);
         h.state_layout.layer_bases = {1, 2};
       },
       "HELLO.state_layout.layer_bases: 2 entries, must be 0 or the 1 recurrent layers of stage 1"},
      {"state_layer_bases_not_hybrid",
       [](Hello& h) {
         h = SmallHello();
         h.state_layout = {.num_slots = 1, .layer_bases = {1}};
       },
       "HELLO.state_layout.layer_bases: 1 entries, must be 0 or the 0 recurrent layers of stage 1"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    Hello h = HybridHello();
    c.mutate(h);
    EXPECT_THAT(Validate(h), IsError(StatusCode::kInvalidArgument, c.want));
    EXPECT_THAT(Encode(h).status(), IsError(StatusCode::kInvalidArgument, c.want));
    EXPECT_THAT(EncodeFrame(Message(h)).status(), IsError(StatusCode::kInvalidArgument, c.want));
  }
}

// The same rules on the wire: a frame patched to break one is DATA_LOSS
// naming the field, and so is a count or length over its limit.
TEST(CodecHybridTest, DecoderRefusesAMalformedHybridHello) {
  const Hello hello = HybridHello();
  const Frame frame = MustEncode(hello);
  const size_t pattern = HelloPatternOffset(hello) + 4;  // the first character
  const size_t state = HelloStateOffset(hello);
  const size_t tensor0 = HelloTensorOffset(hello, 0);
  const size_t tensor1 = HelloTensorOffset(hello, 1);
  const size_t state_layout = HelloStateLayoutOffset(hello);
  const Hello single = HybridStageHello(1, true);
  const Frame single_frame = MustEncode(single);

  struct Case {
    std::string name;
    std::function<Frame()> make;
    std::string want;
  };
  auto patched8 = [&](size_t offset, uint8_t v) {
    return [&frame, offset, v] {
      Frame f = frame;
      PatchU8(f, offset, v);
      return f;
    };
  };
  auto patched32 = [&](size_t offset, uint32_t v) {
    return [&frame, offset, v] {
      Frame f = frame;
      PatchU32(f, offset, v);
      return f;
    };
  };
  const std::vector<Case> cases = {
      {"pattern_character", patched8(pattern + 1, 'x'),
       "HELLO.model.layer_pattern: 'x' at index 1 is not '*', 'M' or '-'"},
      {"pattern_byte", patched8(pattern + 4, 0xFF),
       "HELLO.model.layer_pattern: byte 255 at index 4 is not '*', 'M' or '-'"},
      {"pattern_attention", patched8(pattern + 6, '*'),
       "HELLO.model.layer_pattern: 2 attention layers ('*'), model.num_layers is 1"},
      {"num_layers", patched32(kHeaderSize + 20, 2),
       "HELLO.model.layer_pattern: 1 attention layers ('*'), model.num_layers is 2"},
      {"pattern_length", patched32(pattern - 4, kMaxLayers + 1),
       "HELLO.model.layer_pattern: length 4097 exceeds limit 4096"},
      {"pattern_length_short", patched32(pattern - 4, kMaxLayers),
       "HELLO.model.layer_pattern: length 4096 needs 4096 bytes"},
      {"state_without_recurrent",
       [&] {
         Frame f = frame;
         for (size_t i : {0, 2, 5}) PatchU8(f, pattern + i, '-');
         return f;
       },
       "HELLO.model.state: 2 tensors, but model.layer_pattern has no recurrent layer ('M')"},
      {"recurrent_without_state",
       [&] {
         Frame f = Splice(frame, tensor0, state_layout - tensor0);
         PatchU32(f, state, 0);
         return f;
       },
       "HELLO.model.state: empty, but model.layer_pattern has 3 recurrent layers ('M')"},
      {"state_count", patched32(state, kMaxStateTensors + 1),
       "HELLO.model.state: count 9 exceeds limit 8"},
      {"elem_bytes", patched32(tensor1, 3),
       "HELLO.model.state[1].elem_bytes: 3, must be 1, 2, 4 or 8"},
      {"segments_empty",
       [&] {
         Frame f = Splice(frame, tensor1 + 8, kStateSegmentBytes);
         PatchU32(f, tensor1 + 4, 0);
         return f;
       },
       "HELLO.model.state[1].segments: empty, a state tensor has 1 to 8 segments"},
      {"segments_count", patched32(tensor0 + 4, kMaxStateSegments + 1),
       "HELLO.model.state[0].segments: count 9 exceeds limit 8"},
      // Cut inside the second segment: the segment count is checked against
      // the bytes left before any segment is read.
      {"segments_truncated",
       [&] {
         Frame f(frame.begin(), frame.begin() + static_cast<ptrdiff_t>(tensor0 + 8 + 8 + 6));
         PatchU32(f, kLengthOffset, static_cast<uint32_t>(f.size() - kHeaderSize));
         return f;
       },
       "HELLO.model.state[0].segments: count 2 needs 16 bytes, have 14"},
      {"units", patched32(tensor0 + 8 + 8, 0),
       "HELLO.model.state[0].segments[1].units: 0, must be at least 1"},
      {"unit_elems", patched32(tensor1 + 8 + 4, 0),
       "HELLO.model.state[1].segments[0].unit_elems: 0, must be at least 1"},
      {"state_layout_kind", patched8(state_layout, 2),
       "HELLO.state_layout.kind: value 2 out of range 0..1"},
      {"no_slots_with_layer_bases", patched32(state_layout + 1, 0),
       "HELLO.state_layout.layer_bases: 3 entries with num_slots 0"},
      {"no_slots_with_base",
       [&] {
         Frame f = single_frame;
         PatchU32(f, HelloStateLayoutOffset(single) + 1, 0);
         return f;
       },
       "HELLO.state_layout.base: 139775415681024 with num_slots 0"},
      {"base_and_layer_bases",
       [&] {
         Frame f = frame;
         PatchU64(f, state_layout + 5, 4096);
         return f;
       },
       "HELLO.state_layout.layer_bases: 3 entries and base 4096"},
      {"state_layer_bases_count",
       [&] {
         Frame f = Splice(frame, state_layout + 17, 8);
         PatchU32(f, state_layout + 13, 2);
         return f;
       },
       "HELLO.state_layout.layer_bases: 2 entries, must be 0 or the 3 recurrent layers of stage 0"},
      {"state_layer_bases_limit", patched32(state_layout + 13, kMaxLayers + 1),
       "HELLO.state_layout.layer_bases: count 4097 exceeds limit 4096"},
      {"layers_per_stage", patched32(kHelloInstanceIdOffset + 4 + hello.instance_id.size() + 4, 6),
       "HELLO.placement.layers_per_stage: entries sum to 6, model.layer_pattern has 7 layers"},
      {"layout_layer_bases",
       [&] {
         const size_t bases = HelloRegionsOffset(hello) - 8 * hello.layout.layer_bases.size();
         Frame f = Splice(frame, bases, 0, Frame(8, std::byte{0x11}));
         PatchU32(f, bases - 4, 2);
         return f;
       },
       "HELLO.layout.layer_bases: 2 entries, must be 0 or the 1 attention layers of stage 0"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const Frame bad = c.make();
    EXPECT_THAT(DecodeHello(bad).status(), IsError(StatusCode::kDataLoss, c.want));
    EXPECT_THAT(DecodeFrame(bad).status(), IsError(StatusCode::kDataLoss, c.want));
  }
}

}  // namespace
}  // namespace kvbounce::protocol
