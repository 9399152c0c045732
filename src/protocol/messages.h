// The control messages of docs/wire_format.md as plain C++ values.
//
// These structs hold only integers, enums, strings and vectors: the protocol
// module knows nothing of layouts, memory or sessions. The session layer
// converts between these and its own types (Layout, RankPlacement, Region,
// Addr ...), and checks what only it can check (that block ids are below the
// pool's block count, that a layout's strides match its named kind, that a
// fingerprint matches its own plan).
//
// What the protocol itself guarantees about a decoded message, and what an
// encoder requires of one, is Validate() below (see also docs/wire_format.md):
// enum values in range, every list and string within the limits of wire.h,
// a consistent rank placement, a well-formed hybrid layer pattern and state
// shape, a non-inverted token range, no address range that wraps around 2^64.
//
// Every struct compares with == field by field (the fuzz targets and tests
// rely on it). Default-constructed values are valid messages except Hello,
// whose instance_id must be set (and placement/model made consistent).
//
// Thread safety: plain values; see status.h.
#ifndef KVBOUNCE_PROTOCOL_MESSAGES_H_
#define KVBOUNCE_PROTOCOL_MESSAGES_H_

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "kvbounce/status.h"
#include "protocol/wire.h"

namespace kvbounce::protocol {

// ---------------------------------------------------------------------------
// Enums. Each travels as one u8; a decoder rejects any value not listed.
// ---------------------------------------------------------------------------

// Which side of the disaggregated pair an instance is.
enum class Role : uint8_t {
  kCtx = 0,  // prefill; writes KV
  kGen = 1,  // decode; receives KV
};
inline constexpr uint8_t kMaxRole = 1;

// The named layouts of docs/architecture.md §2. The strides in LayoutDescriptor are what
// addresses are computed from; the kind says which dimension order they
// describe (the planner's walk order).
enum class LayoutKind : uint8_t {
  kBlockMajorHnd = 0,  // [block][layer][kv][head][token][dim]
  kLayerMajorHnd = 1,  // per layer [kv][block][head][token][dim]
  kLayerMajorNhd = 2,  // per layer [kv][block][token][head][dim]
};
inline constexpr uint8_t kMaxLayoutKind = 2;

// How a rank's recurrent-state pool is laid out (hybrid models): which of
// slot and layer is the outer dimension. As with LayoutKind, the addresses
// are the session layer's to compute; the kind names the order.
enum class StateLayoutKind : uint8_t {
  kSlotMajor = 0,   // the slot is the outer dimension
  kLayerMajor = 1,  // the layer is the outer dimension
};
inline constexpr uint8_t kMaxStateLayoutKind = 1;

// What a registered region is for (docs/architecture.md §6).
enum class RegionKind : uint8_t {
  kPool = 0,       // the rank's KV pool
  kSendArena = 1,  // staging region the rank gathers into
  kRecvArena = 2,  // staging region peers write bounce transfers into
};
inline constexpr uint8_t kMaxRegionKind = 2;

// Where a region's memory lives.
enum class MemoryKind : uint8_t {
  kHost = 0,        // pageable host memory
  kPinnedHost = 1,  // page-locked host memory
  kCuda = 2,        // device memory
};
inline constexpr uint8_t kMaxMemoryKind = 2;
// RegionDescriptor::device of host memory, and the largest device ordinal.
inline constexpr uint32_t kNoDevice = 0xFFFFFFFFu;
inline constexpr uint32_t kMaxDevice = 1023;

// How a writer executes a plan (docs/paths.md).
enum class TransferPath : uint8_t {
  kPerBlock = 0,
  kBounce = 1,
  kDirect = 2,
  kAuto = 3,
  // `direct` copied by the receiver: the writer lends its blocks (KV_READY)
  // and the receiver reads them into its own pool (docs/sessions.md).
  kDirectRead = 4,
};
inline constexpr uint8_t kMaxTransferPath = 4;

// Outcome a KV_RESULT reports.
enum class ResultStatus : uint8_t {
  kSuccess = 0,
  kFailed = 1,
  kCancelled = 2,
};
inline constexpr uint8_t kMaxResultStatus = 2;

// KV_RESULT.error_code: the writer's status code, numbered as kvbounce's
// StatusCode (status.h: 0 OK, 1 INVALID_ARGUMENT ... 13 INTERNAL), so the
// receiver reports a refusal as what it is (OUT_OF_RANGE, DATA_LOSS ...)
// rather than as a generic failure. The session layer converts through one
// checked function (a static_assert ties the two numberings together).
inline constexpr uint8_t kMaxErrorCode = 13;

// Why a peer says BYE.
enum class ByeReason : uint8_t {
  kShutdown = 0,       // orderly shutdown
  kProtocolError = 1,  // the peer sent something undecodable or unexpected
  kIncompatible = 2,   // HELLO showed the peers cannot work together
};
inline constexpr uint8_t kMaxByeReason = 2;

// Names for logs and error messages ("CTX", "BOUNCE", "SUCCESS" ...).
// "UNKNOWN" for a value outside the enum.
std::string_view RoleName(Role role);
std::string_view LayoutKindName(LayoutKind kind);
std::string_view StateLayoutKindName(StateLayoutKind kind);
std::string_view RegionKindName(RegionKind kind);
std::string_view MemoryKindName(MemoryKind kind);
std::string_view TransferPathName(TransferPath path);
std::string_view ResultStatusName(ResultStatus status);
std::string_view ByeReasonName(ByeReason reason);

// HELLO.capabilities bits. Bits not listed here are carried unchanged (a
// newer peer may set them) and ignored by this version.
inline constexpr uint64_t kCapabilityBounce = uint64_t{1} << 0;        // has arenas
inline constexpr uint64_t kCapabilityDirect = uint64_t{1} << 1;        // can map peer memory
inline constexpr uint64_t kCapabilityHostMemory = uint64_t{1} << 2;    // reaches host memory
inline constexpr uint64_t kCapabilityDeviceMemory = uint64_t{1} << 3;  // reaches device memory

// KvRequest.deadline_ms value meaning "no deadline".
inline constexpr uint64_t kNoDeadline = std::numeric_limits<uint64_t>::max();

// KvRequest.state_slot and KvReady.state_slot value meaning "no recurrent
// state moves with this request" (KV only).
inline constexpr uint32_t kNoStateSlot = 0xFFFFFFFF;

// ---------------------------------------------------------------------------
// HELLO: sent by both sides once, on connect.
// ---------------------------------------------------------------------------

// Where a rank sits in its instance (docs/architecture.md §3).
struct RankPlacement {
  uint32_t tp_rank = 0;  // < tp_size
  uint32_t tp_size = 1;  // >= 1
  uint32_t pp_rank = 0;  // < pp_size
  uint32_t pp_size = 1;  // 1 .. kMaxPipelineStages
  // Layers of each pipeline stage, stage 0 first: exactly pp_size entries,
  // summing to the length of ModelShape::layer_pattern when it is not empty
  // (the pipeline split is over all model layers, of every kind), to
  // ModelShape::num_layers otherwise. Entries may be 0.
  std::vector<uint32_t> layers_per_stage;

  friend bool operator==(const RankPlacement&, const RankPlacement&) = default;
};

// One segment of a recurrent state tensor: `units` units of `unit_elems`
// elements each, model-global counts. How units map onto memory and onto
// tensor-parallel ranks is the session layer's to decide.
struct StateSegmentDescriptor {
  uint32_t units = 0;       // >= 1
  uint32_t unit_elems = 0;  // >= 1

  friend bool operator==(const StateSegmentDescriptor&, const StateSegmentDescriptor&) = default;
};

// One fixed-size state tensor of a recurrent layer (e.g. conv state, SSM
// state), per request: its segments, in order, are all its elements.
struct StateTensorDescriptor {
  uint32_t elem_bytes = 0;  // 1, 2, 4 or 8
  // 1 .. kMaxStateSegments entries.
  std::vector<StateSegmentDescriptor> segments;

  friend bool operator==(const StateTensorDescriptor&, const StateTensorDescriptor&) = default;
};

// The model's KV shape (docs/architecture.md §2 presets), and for hybrid
// models which layers hold KV and what state the others hold. Global, not
// rank-local.
struct ModelShape {
  // Attention layers (the layers that hold KV), <= kMaxLayers. For a hybrid
  // model the number of '*' in layer_pattern.
  uint32_t num_layers = 0;
  uint32_t num_kv_heads = 0;  // global kv heads H
  uint32_t head_dim = 0;
  uint32_t kv_factor = 0;   // 2 = K and V, 1 = MLA latent
  uint32_t elem_bytes = 0;  // bytes per element (bf16 = 2)
  // Hybrid models: one character per model layer, in order: '*' attention
  // (holds KV), 'M' recurrent (holds state), '-' neither (MLP, MoE). Empty:
  // every layer is an attention layer. At most kMaxLayers characters.
  std::string layer_pattern;
  // The state tensors every recurrent layer holds, at most kMaxStateTensors.
  // Not empty exactly when layer_pattern holds an 'M'.
  std::vector<StateTensorDescriptor> state;

  friend bool operator==(const ModelShape&, const ModelShape&) = default;
};

// A rank's pool layout (docs/architecture.md §2):
//   address(layer, kv, block, head, token, d) = pool_base(layer)
//       + layer*s_layer + kv*s_kv + block*s_block + head*s_head
//       + token*s_token + d*elem_bytes
// where `layer` is the rank-local layer index (counting attention layers
// only, for a hybrid model) and pool_base(layer) = layer_bases[layer] when
// layer_bases is non-empty, `base` otherwise. Whether the strides are
// consistent with `kind` and the model is the layout module's to check.
struct LayoutDescriptor {
  LayoutKind kind = LayoutKind::kBlockMajorHnd;
  uint32_t tokens_per_block = 0;
  uint32_t num_blocks = 0;  // block ids are 0 .. num_blocks-1
  uint64_t base = 0;        // pool address
  uint64_t s_layer = 0;
  uint64_t s_kv = 0;
  uint64_t s_block = 0;
  uint64_t s_head = 0;
  uint64_t s_token = 0;
  // Empty, or one base address per attention layer this rank holds: the
  // placement.layers_per_stage[placement.pp_rank] layers of its stage, or of
  // a hybrid model the '*' among them in model.layer_pattern.
  std::vector<uint64_t> layer_bases;

  friend bool operator==(const LayoutDescriptor&, const LayoutDescriptor&) = default;
};

// A rank's recurrent-state pool (hybrid models). num_slots 0: the rank has none
// (not a hybrid model, or its pipeline stage holds no recurrent layer).
//
// A slot holds one request's state: for each recurrent layer the rank holds,
// every tensor of ModelShape::state. Where each slot's tensors lie, from
// `kind` and the bases, is the session layer's to compute.
struct StateLayoutDescriptor {
  // One u8 on the wire, like every enum.
  StateLayoutKind kind = StateLayoutKind::kSlotMajor;
  uint32_t num_slots = 0;  // slot ids are 0 .. num_slots-1
  uint64_t base = 0;       // pool address (single allocation)
  // Or, instead of `base` (which is then 0), one base per recurrent layer this
  // rank holds: the 'M' of its stage in model.layer_pattern. Empty with
  // num_slots 0. At most kMaxLayers.
  std::vector<uint64_t> layer_bases;

  friend bool operator==(const StateLayoutDescriptor&, const StateLayoutDescriptor&) = default;
};

// One registered region a peer may address (docs/architecture.md §6, §8).
struct RegionDescriptor {
  RegionKind kind = RegionKind::kPool;
  MemoryKind memory = MemoryKind::kHost;
  // The owner's CUDA device ordinal for CUDA memory (0 .. kMaxDevice);
  // kNoDevice for the host kinds.
  uint32_t device = kNoDevice;
  uint64_t addr = 0;  // addr + size must not exceed 2^64
  uint64_t size = 0;
  // Opaque to the protocol: a packed UCX rkey, a CUDA IPC handle, a VMM
  // export handle. At most kMaxRemoteKeyBytes; may be empty.
  std::vector<std::byte> remote_key;

  friend bool operator==(const RegionDescriptor&, const RegionDescriptor&) = default;
};

struct Hello {
  // The version the sender speaks; a decoded HELLO always has the header's
  // version here (the decoder checks they agree).
  uint16_t protocol_version = kProtocolVersion;
  std::string instance_id;  // 1 .. kMaxInstanceIdBytes bytes
  Role role = Role::kCtx;
  RankPlacement placement;
  ModelShape model;
  LayoutDescriptor layout;
  StateLayoutDescriptor state_layout;
  std::vector<RegionDescriptor> regions;  // at most kMaxRegions
  uint64_t capabilities = 0;              // kCapability* bits

  friend bool operator==(const Hello&, const Hello&) = default;
};

// ---------------------------------------------------------------------------
// KV_REQUEST: gen rank -> each of its writers, one per (request, slice).
// ---------------------------------------------------------------------------
struct KvRequest {
  uint64_t request_id = 0;
  uint32_t slice_id = 0;
  uint64_t token_start = 0;  // token range [token_start, token_end)
  uint64_t token_end = 0;    // >= token_start
  // The receiver's block ids for tokens [0, token_end), in token order. May
  // be empty. At most kMaxBlockTableEntries.
  std::vector<uint32_t> block_table;
  TransferPath path = TransferPath::kAuto;
  // The receiver-granted recv-arena slot for this writer's packed stream.
  // Meaningful for the bounce path; 0/0 when none was granted.
  // recv_slot_addr + recv_slot_size must not exceed 2^64.
  uint64_t recv_slot_addr = 0;
  uint64_t recv_slot_size = 0;
  // Streaming bounce (docs/sessions.md, "Streaming bounce"): the writer's
  // packed stream is cut into chunks of this many bytes (the last one
  // shorter) and each chunk is written into a chunk slot the receiver grants
  // with KV_GRANT, announced with KV_CHUNK. 0: not streamed (the whole
  // stream goes into recv_slot). Non-zero only with path BOUNCE and no
  // recv slot (0/0).
  uint64_t chunk_bytes = 0;
  uint64_t plan_fingerprint = 0;
  // Milliseconds the writer has, counted from when it receives the frame
  // (relative, so it survives clock skew between hosts). 0 means already
  // expired; kNoDeadline means none.
  uint64_t deadline_ms = kNoDeadline;
  // Rank indices within their instances (pp_rank * tp_size + tp_rank).
  uint32_t receiver_rank = 0;
  uint32_t writer_rank = 0;
  // Hybrid models: the receiver's state slot for this request (the writer's
  // recurrent state for it moves with the KV, into this slot), or
  // kNoStateSlot for KV only. Below the receiver's state_layout.num_slots,
  // which is the session layer's to check.
  uint32_t state_slot = kNoStateSlot;

  friend bool operator==(const KvRequest&, const KvRequest&) = default;
};

// ---------------------------------------------------------------------------
// KV_RESULT: writer -> gen rank; the one frame for every outcome.
// ---------------------------------------------------------------------------
struct KvResult {
  uint64_t request_id = 0;
  uint32_t slice_id = 0;
  uint32_t writer_rank = 0;
  ResultStatus status = ResultStatus::kSuccess;
  // 0 with SUCCESS; the writer's error code otherwise (kMaxErrorCode).
  uint8_t error_code = 0;
  uint64_t bytes_written = 0;
  uint64_t plan_fingerprint = 0;
  std::string error_text;  // at most kMaxErrorTextBytes; usually empty on success

  friend bool operator==(const KvResult&, const KvResult&) = default;
};

// ---------------------------------------------------------------------------
// KV_READY: writer -> gen rank, for a KV_REQUEST on the DIRECT_READ path: the
// writer's blocks are lent to the receiver, which reads them itself.
// ---------------------------------------------------------------------------
struct KvReady {
  uint64_t request_id = 0;
  uint32_t slice_id = 0;
  uint32_t writer_rank = 0;
  uint64_t plan_fingerprint = 0;
  // The writer's block ids for tokens [0, token_end) of the request, in
  // token order. At most kMaxBlockTableEntries.
  std::vector<uint32_t> block_table;
  // Hybrid models: the writer's state slot holding the request's recurrent
  // state, lent with the blocks: the receiver reads it from there into the
  // state slot its KV_REQUEST named. kNoStateSlot when no state moves (the
  // KV_REQUEST named none). Below the writer's state_layout.num_slots, which
  // is the session layer's to check.
  uint32_t state_slot = kNoStateSlot;

  friend bool operator==(const KvReady&, const KvReady&) = default;
};

// ---------------------------------------------------------------------------
// KV_READ_DONE: gen rank -> writer, once its reads of a KV_READY's blocks
// ended. The writer answers with KV_RESULT: SUCCESS only when it held the
// blocks until this arrived (the bytes read are then the request's KV).
// ---------------------------------------------------------------------------
struct KvReadDone {
  uint64_t request_id = 0;
  uint32_t slice_id = 0;
  uint32_t writer_rank = 0;
  ResultStatus status = ResultStatus::kSuccess;
  uint64_t bytes_read = 0;
  std::string error_text;  // at most kMaxErrorTextBytes; empty on success

  friend bool operator==(const KvReadDone&, const KvReadDone&) = default;
};

// ---------------------------------------------------------------------------
// KV_GRANT: gen rank -> writer, on a streamed bounce (KvRequest.chunk_bytes >
// 0): chunk `chunk` of the writer's packed stream may be written into the
// receiver's recv arena at [slot_addr, slot_addr + slot_size). A grant is a
// credit: the receiver grants each chunk once, and at most a bounded window
// of a writer's chunks at a time.
// ---------------------------------------------------------------------------
struct KvGrant {
  uint64_t request_id = 0;
  uint32_t slice_id = 0;
  uint32_t writer_rank = 0;
  uint64_t chunk = 0;      // index in the writer's chunk cut
  uint64_t slot_addr = 0;  // slot_addr + slot_size must not exceed 2^64
  uint64_t slot_size = 0;  // >= 1: the chunk's bytes

  friend bool operator==(const KvGrant&, const KvGrant&) = default;
};

// ---------------------------------------------------------------------------
// KV_CHUNK: writer -> gen rank, once the writes of a granted chunk are
// remotely visible (flushed): the receiver may scatter it and reuse its slot.
// ---------------------------------------------------------------------------
struct KvChunk {
  uint64_t request_id = 0;
  uint32_t slice_id = 0;
  uint32_t writer_rank = 0;
  uint64_t chunk = 0;
  uint64_t bytes = 0;  // the chunk's bytes written, >= 1

  friend bool operator==(const KvChunk&, const KvChunk&) = default;
};

// ---------------------------------------------------------------------------
// CANCEL: either side; every slice of the request.
// ---------------------------------------------------------------------------
struct Cancel {
  uint64_t request_id = 0;
  std::string reason;  // at most kMaxReasonBytes

  friend bool operator==(const Cancel&, const Cancel&) = default;
};

// ---------------------------------------------------------------------------
// BYE: either side, before closing the connection.
// ---------------------------------------------------------------------------
struct Bye {
  ByeReason reason = ByeReason::kShutdown;
  std::string message;  // at most kMaxReasonBytes; free text for logs

  friend bool operator==(const Bye&, const Bye&) = default;
};

// Any one message.
using Message =
    std::variant<Hello, KvRequest, KvResult, Cancel, Bye, KvReady, KvReadDone, KvGrant, KvChunk>;

// The header type of a message.
constexpr MessageType TypeOf(const Hello&) { return MessageType::kHello; }
constexpr MessageType TypeOf(const KvRequest&) { return MessageType::kKvRequest; }
constexpr MessageType TypeOf(const KvResult&) { return MessageType::kKvResult; }
constexpr MessageType TypeOf(const Cancel&) { return MessageType::kCancel; }
constexpr MessageType TypeOf(const Bye&) { return MessageType::kBye; }
constexpr MessageType TypeOf(const KvReady&) { return MessageType::kKvReady; }
constexpr MessageType TypeOf(const KvReadDone&) { return MessageType::kKvReadDone; }
constexpr MessageType TypeOf(const KvGrant&) { return MessageType::kKvGrant; }
constexpr MessageType TypeOf(const KvChunk&) { return MessageType::kKvChunk; }
MessageType TypeOf(const Message& message);

// ---------------------------------------------------------------------------
// Validation: the protocol-level invariants every encoded and every decoded
// message satisfies. Returns OK, or kInvalidArgument whose message names the
// field and the rule, e.g.
//   "KV_REQUEST.token_range: start 9 > end 4"
//   "HELLO.placement.tp_rank: 4 not below tp_size 4"
//   "HELLO.regions[2].remote_key: 20000 bytes exceed limit 16384"
//   "HELLO.model.state[0].segments[1].units: 0, must be at least 1"
// The encoders call these first; the decoders run the same checks on what
// they decoded and report a failure as kDataLoss.
// ---------------------------------------------------------------------------
Status Validate(const Hello& hello);
Status Validate(const KvRequest& request);
Status Validate(const KvResult& result);
Status Validate(const Cancel& cancel);
Status Validate(const Bye& bye);
Status Validate(const KvReady& ready);
Status Validate(const KvReadDone& done);
Status Validate(const KvGrant& grant);
Status Validate(const KvChunk& chunk);
Status Validate(const Message& message);

}  // namespace kvbounce::protocol

#endif  // KVBOUNCE_PROTOCOL_MESSAGES_H_
