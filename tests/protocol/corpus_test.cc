// The fuzzers' seed corpus (tests/fuzz/corpus): the messages it holds, the
// generator that writes it, and the check that it speaks the current protocol
// version.
//
// Every seed is one message, written as four files:
//   <dir>/<name>.frame          the whole frame, for protocol_<dir>_fuzzer
//   <dir>/<name>.payload        the payload alone (a fuzzer also decodes its
//                               input wrapped in a header of its type)
//   frame/<dir>_<name>.frame    the whole frame, for protocol_frame_fuzzer
//   frame/<dir>_<name>.typed    the type selector byte (type - 1), then the
//                               payload (see protocol_frame_fuzzer.cc)
// After any change of the wire format, regenerate the seeds (remove the old
// files first when seeds were renamed or dropped), from the source root:
//   KVBOUNCE_WRITE_FUZZ_CORPUS=1 out/release/tests/protocol/protocol_codec_test
//       --gtest_filter='CodecCorpusTest.*'
#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>
#include <vector>

#include "protocol/codec.h"
#include "protocol/messages.h"
#include "protocol/wire.h"

namespace kvbounce::protocol {
namespace {

namespace fs = std::filesystem;

using Frame = std::vector<std::byte>;

struct Seed {
  std::string dir;   // the typed fuzzer's corpus directory, e.g. "kv_request"
  std::string name;  // file name without extension
  Message message;
};

std::vector<Seed> Seeds() {
  std::vector<Seed> seeds;

  // HELLO. A minimal one, a small pipeline-parallel one with per-layer pool
  // bases and two regions, and two of hybrid models.
  {
    Hello h;
    h.instance_id = "g";
    h.placement = {.tp_rank = 0, .tp_size = 1, .pp_rank = 0, .pp_size = 1, .layers_per_stage = {0}};
    seeds.push_back({"hello", "minimal", h});
  }
  {
    Hello h;
    h.instance_id = "ctx-0";
    h.role = Role::kCtx;
    h.placement = {
        .tp_rank = 1, .tp_size = 2, .pp_rank = 1, .pp_size = 2, .layers_per_stage = {2, 2}};
    h.model = {
        .num_layers = 4, .num_kv_heads = 8, .head_dim = 128, .kv_factor = 2, .elem_bytes = 2};
    h.layout = {.kind = LayoutKind::kLayerMajorHnd,
                .tokens_per_block = 16,
                .num_blocks = 64,
                .base = 0x1000,
                .s_layer = 0x100000,
                .s_kv = 0x80000,
                .s_block = 0x2000,
                .s_head = 0x1000,
                .s_token = 0x100,
                .layer_bases = {0x1000, 0x200000}};
    h.regions = {{.kind = RegionKind::kPool,
                  .memory = MemoryKind::kCuda,
                  .device = 0,
                  .addr = 0x7f0000000000,
                  .size = 0x1000000,
                  .remote_key = {std::byte{1}, std::byte{2}, std::byte{3}}},
                 {.kind = RegionKind::kRecvArena,
                  .memory = MemoryKind::kPinnedHost,
                  .device = kNoDevice,
                  .addr = 0x5000,
                  .size = 0x100000,
                  .remote_key = {}}};
    h.capabilities = kCapabilityBounce | kCapabilityHostMemory;
    seeds.push_back({"hello", "small", h});
  }
  {
    // Hybrid, one stage: recurrent layers with a two-segment conv state and
    // an SSM state, a layer-major state pool with one base per recurrent layer.
    Hello h;
    h.instance_id = "gen-hybrid";
    h.role = Role::kGen;
    h.placement = {.tp_rank = 0, .tp_size = 1, .pp_rank = 0, .pp_size = 1, .layers_per_stage = {7}};
    h.model = {
        .num_layers = 1,
        .num_kv_heads = 8,
        .head_dim = 128,
        .kv_factor = 2,
        .elem_bytes = 2,
        .layer_pattern = "M-M*-M-",
        .state = {{.elem_bytes = 2,
                   .segments = {{.units = 64, .unit_elems = 3}, {.units = 8, .unit_elems = 384}}},
                  {.elem_bytes = 4, .segments = {{.units = 64, .unit_elems = 4096}}}}};
    h.layout = {.kind = LayoutKind::kBlockMajorHnd,
                .tokens_per_block = 16,
                .num_blocks = 32,
                .base = 0x10000,
                .s_layer = 0x8000,
                .s_kv = 0x4000,
                .s_block = 0x10000,
                .s_head = 0x1000,
                .s_token = 0x100};
    h.state_layout = {.kind = StateLayoutKind::kLayerMajor,
                      .num_slots = 16,
                      .base = 0,
                      .layer_bases = {0x200000, 0x300000, 0x400000}};
    h.regions = {{.kind = RegionKind::kPool,
                  .memory = MemoryKind::kHost,
                  .device = kNoDevice,
                  .addr = 0x10000,
                  .size = 0x400000,
                  .remote_key = {std::byte{9}}}};
    h.capabilities = kCapabilityDirect | kCapabilityHostMemory;
    seeds.push_back({"hello", "hybrid", h});
  }
  {
    // Hybrid, stage 1 of two ("M-M" and "*-M-"): one attention and one
    // recurrent layer, a single slot-major state pool.
    Hello h;
    h.instance_id = "ctx-hybrid-pp1";
    h.role = Role::kCtx;
    h.placement = {
        .tp_rank = 0, .tp_size = 1, .pp_rank = 1, .pp_size = 2, .layers_per_stage = {3, 4}};
    h.model = {.num_layers = 1,
               .num_kv_heads = 4,
               .head_dim = 64,
               .kv_factor = 2,
               .elem_bytes = 2,
               .layer_pattern = "M-M*-M-",
               .state = {{.elem_bytes = 2, .segments = {{.units = 16, .unit_elems = 3}}}}};
    h.layout = {.kind = LayoutKind::kLayerMajorNhd,
                .tokens_per_block = 8,
                .num_blocks = 16,
                .base = 0x20000,
                .s_layer = 0,
                .s_kv = 0x10000,
                .s_block = 0x1000,
                .s_head = 0x80,
                .s_token = 0x200,
                .layer_bases = {0x20000}};
    h.state_layout = {.kind = StateLayoutKind::kSlotMajor, .num_slots = 8, .base = 0x800000};
    seeds.push_back({"hello", "hybrid_stage1", h});
  }

  // KV_REQUEST.
  seeds.push_back({"kv_request", "empty", KvRequest{}});
  seeds.push_back({"kv_request", "small",
                   KvRequest{.request_id = 42,
                             .slice_id = 1,
                             .token_start = 0,
                             .token_end = 100,
                             .block_table = {3, 9, 27, 81, 243, 729, 2187},
                             .path = TransferPath::kBounce,
                             .recv_slot_addr = 0x10000,
                             .recv_slot_size = 0x8000,
                             .plan_fingerprint = 0x1234567890abcdef,
                             .deadline_ms = 60000,
                             .receiver_rank = 1,
                             .writer_rank = 3}});
  seeds.push_back({"kv_request", "streamed",
                   KvRequest{.request_id = 5,
                             .token_end = 64,
                             .block_table = {3, 4},
                             .path = TransferPath::kBounce,
                             .chunk_bytes = 1 << 20,
                             .plan_fingerprint = 0x1234,
                             .deadline_ms = 1000}});
  seeds.push_back({"kv_request", "state_slot",
                   KvRequest{.request_id = 43,
                             .token_end = 48,
                             .block_table = {7, 8, 9},
                             .path = TransferPath::kDirectRead,
                             .plan_fingerprint = 0xabcdef,
                             .deadline_ms = 30000,
                             .receiver_rank = 1,
                             .state_slot = 12}});

  // KV_RESULT.
  seeds.push_back({"kv_result", "failed",
                   KvResult{.request_id = 42,
                            .slice_id = 1,
                            .writer_rank = 3,
                            .status = ResultStatus::kFailed,
                            .error_code = 6,  // DATA_LOSS
                            .bytes_written = 0,
                            .plan_fingerprint = 0x1234567890abcdef,
                            .error_text = "fingerprint mismatch"}});
  seeds.push_back({"kv_result", "success", KvResult{.request_id = 42, .bytes_written = 0x10000}});

  // CANCEL, BYE.
  seeds.push_back({"cancel", "empty", Cancel{}});
  seeds.push_back({"cancel", "reason", Cancel{.request_id = 42, .reason = "deadline exceeded"}});
  seeds.push_back({"bye", "shutdown", Bye{}});
  seeds.push_back({"bye", "incompatible",
                   Bye{.reason = ByeReason::kIncompatible, .message = "layout mismatch"}});

  // KV_READY, KV_READ_DONE.
  seeds.push_back({"kv_ready", "two_blocks",
                   KvReady{.request_id = 7,
                           .slice_id = 1,
                           .writer_rank = 2,
                           .plan_fingerprint = 0xdeadbeef,
                           .block_table = {5, 0x01020304}}});
  seeds.push_back({"kv_ready", "state_slot",
                   KvReady{.request_id = 43,
                           .plan_fingerprint = 0xabcdef,
                           .block_table = {20, 21, 22},
                           .state_slot = 5}});
  seeds.push_back({"kv_read_done", "failed",
                   KvReadDone{.request_id = 7,
                              .slice_id = 1,
                              .writer_rank = 2,
                              .status = ResultStatus::kFailed,
                              .bytes_read = 0x1000,
                              .error_text = "io"}});
  seeds.push_back({"kv_read_done", "success", KvReadDone{.request_id = 9, .bytes_read = 0x1000}});

  // KV_GRANT, KV_CHUNK: a stream's first full chunk and its short last one.
  seeds.push_back({"kv_grant", "first",
                   KvGrant{.request_id = 42,
                           .slice_id = 3,
                           .writer_rank = 1,
                           .chunk = 0,
                           .slot_addr = 0x7f0000001000,
                           .slot_size = 0x100000}});
  seeds.push_back({"kv_grant", "last_short",
                   KvGrant{.request_id = 7,
                           .slice_id = 0,
                           .writer_rank = 7,
                           .chunk = 99,
                           .slot_addr = 0x1000,
                           .slot_size = 300}});
  seeds.push_back(
      {"kv_chunk", "first",
       KvChunk{.request_id = 42, .slice_id = 3, .writer_rank = 1, .chunk = 0, .bytes = 0x100000}});
  seeds.push_back(
      {"kv_chunk", "last_short",
       KvChunk{.request_id = 7, .slice_id = 0, .writer_rank = 7, .chunk = 99, .bytes = 300}});
  return seeds;
}

// The files of one seed: path relative to the corpus directory, and contents.
std::vector<std::pair<std::string, Frame>> SeedFiles(const Seed& seed) {
  Result<Frame> encoded = EncodeFrame(seed.message);
  EXPECT_TRUE(encoded.ok()) << seed.dir << "/" << seed.name << ": " << encoded.status();
  if (!encoded.ok()) return {};
  const Frame& frame = *encoded;
  const Frame payload(frame.begin() + kHeaderSize, frame.end());
  Frame typed;
  typed.push_back(static_cast<std::byte>(static_cast<uint16_t>(TypeOf(seed.message)) - 1));
  typed.insert(typed.end(), payload.begin(), payload.end());
  const std::string in_frame_dir = "frame/" + seed.dir + "_" + seed.name;
  return {{seed.dir + "/" + seed.name + ".frame", frame},
          {seed.dir + "/" + seed.name + ".payload", payload},
          {in_frame_dir + ".frame", frame},
          {in_frame_dir + ".typed", typed}};
}

std::optional<Frame> ReadFile(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::nullopt;
  const std::vector<char> raw((std::istreambuf_iterator<char>(in)),
                              std::istreambuf_iterator<char>());
  Frame bytes(raw.size());
  for (size_t i = 0; i < raw.size(); ++i) bytes[i] = static_cast<std::byte>(raw[i]);
  return bytes;
}

bool WriteFile(const fs::path& path, const Frame& bytes) {
  std::error_code error;
  fs::create_directories(path.parent_path(), error);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  return static_cast<bool>(out);
}

// Every seed's files are checked in, with the bytes the current encoder
// writes. With KVBOUNCE_WRITE_FUZZ_CORPUS set, (re)writes them first.
TEST(CodecCorpusTest, GeneratedSeedsAreCheckedIn) {
  const fs::path corpus = KVBOUNCE_FUZZ_CORPUS;
  const char* write = std::getenv("KVBOUNCE_WRITE_FUZZ_CORPUS");
  const bool writing = write != nullptr && *write != '\0' && std::string(write) != "0";
  for (const Seed& seed : Seeds()) {
    for (const auto& [relative, bytes] : SeedFiles(seed)) {
      SCOPED_TRACE(relative);
      const fs::path path = corpus / relative;
      if (writing) {
        ASSERT_TRUE(WriteFile(path, bytes)) << "cannot write " << path;
      }
      const std::optional<Frame> present = ReadFile(path);
      ASSERT_TRUE(present.has_value())
          << path << " is missing: regenerate the corpus (see corpus_test.cc)";
      EXPECT_TRUE(*present == bytes)
          << path << " differs from what this build encodes: regenerate the corpus";
    }
  }
}

// The seed corpus speaks the current version: every seed frame, generated or
// added by hand, decodes and re-encodes to itself (a stale corpus would only
// exercise the header check).
TEST(CodecCorpusTest, EverySeedFrameDecodes) {
  int frames = 0;
  for (const auto& entry : fs::recursive_directory_iterator(KVBOUNCE_FUZZ_CORPUS)) {
    if (entry.path().extension() != ".frame") continue;
    SCOPED_TRACE(entry.path().string());
    const std::optional<Frame> frame = ReadFile(entry.path());
    ASSERT_TRUE(frame.has_value());
    Result<Message> decoded = DecodeFrame(*frame);
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    Result<Frame> again = EncodeFrame(*decoded);
    ASSERT_TRUE(again.ok());
    EXPECT_TRUE(*again == *frame);
    ++frames;
  }
  EXPECT_GE(frames, 20);
}

}  // namespace
}  // namespace kvbounce::protocol
