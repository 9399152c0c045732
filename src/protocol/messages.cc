#include "protocol/messages.h"

#include <string>
#include <string_view>

namespace kvbounce::protocol {
namespace {

Status Invalid(std::string_view message_name, std::string_view field, const std::string& what) {
  std::string message(message_name);
  message += '.';
  message += field;
  message += ": ";
  message += what;
  return InvalidArgumentError(message);
}

std::string N(uint64_t v) { return std::to_string(v); }

Status CheckLength(std::string_view message_name, std::string_view field, size_t size,
                   size_t limit) {
  if (size <= limit) return Status::Ok();
  return Invalid(message_name, field, N(size) + " bytes exceed limit " + N(limit));
}

Status CheckEntries(std::string_view message_name, std::string_view field, size_t size,
                    size_t limit) {
  if (size <= limit) return Status::Ok();
  return Invalid(message_name, field, N(size) + " entries exceed limit " + N(limit));
}

Status CheckEnum(std::string_view message_name, std::string_view field, uint8_t value,
                 uint8_t max) {
  if (value <= max) return Status::Ok();
  return Invalid(message_name, field, "value " + N(value) + " out of range 0.." + N(max));
}

// addr + size must be representable: a range that wraps is never a real one.
Status CheckRange(std::string_view message_name, std::string_view field, uint64_t addr,
                  uint64_t size) {
  if (size <= UINT64_MAX - addr) return Status::Ok();
  return Invalid(message_name, field,
                 "address " + N(addr) + " + size " + N(size) + " wraps past 2^64");
}

// ModelShape::layer_pattern characters.
constexpr char kAttentionLayer = '*';  // holds KV
constexpr char kRecurrentLayer = 'M';  // holds recurrent state
constexpr char kOtherLayer = '-';      // holds neither (MLP, MoE)

// A pattern character for an error message: 'x', or its value when it is not
// printable.
std::string Describe(char c) {
  const auto byte = static_cast<unsigned char>(c);
  if (byte >= 0x20 && byte < 0x7f) return std::string("'") + c + "'";
  return "byte " + N(byte);
}

// The hybrid-model part of the model shape: the layer pattern, and the state
// tensors of its recurrent layers.
Status ValidateHybrid(const ModelShape& model) {
  constexpr std::string_view kMsg = "HELLO";
  const std::string& pattern = model.layer_pattern;
  KVB_RETURN_IF_ERROR(CheckLength(kMsg, "model.layer_pattern", pattern.size(), kMaxLayers));
  uint64_t attention = 0;
  uint64_t recurrent = 0;
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == kAttentionLayer) {
      ++attention;
    } else if (c == kRecurrentLayer) {
      ++recurrent;
    } else if (c != kOtherLayer) {
      return Invalid(kMsg, "model.layer_pattern",
                     Describe(c) + " at index " + N(i) + " is not '*', 'M' or '-'");
    }
  }
  // An empty pattern means every layer is an attention layer.
  if (!pattern.empty() && attention != model.num_layers) {
    return Invalid(
        kMsg, "model.layer_pattern",
        N(attention) + " attention layers ('*'), model.num_layers is " + N(model.num_layers));
  }

  KVB_RETURN_IF_ERROR(CheckEntries(kMsg, "model.state", model.state.size(), kMaxStateTensors));
  if (recurrent == 0 && !model.state.empty()) {
    return Invalid(
        kMsg, "model.state",
        N(model.state.size()) + " tensors, but model.layer_pattern has no recurrent layer ('M')");
  }
  if (recurrent != 0 && model.state.empty()) {
    return Invalid(kMsg, "model.state",
                   "empty, but model.layer_pattern has " + N(recurrent) +
                       " recurrent layers ('M'), which hold state");
  }
  for (size_t i = 0; i < model.state.size(); ++i) {
    const StateTensorDescriptor& tensor = model.state[i];
    const std::string prefix = "model.state[" + N(i) + "].";
    const uint32_t eb = tensor.elem_bytes;
    if (eb != 1 && eb != 2 && eb != 4 && eb != 8) {
      return Invalid(kMsg, prefix + "elem_bytes", N(eb) + ", must be 1, 2, 4 or 8");
    }
    if (tensor.segments.empty()) {
      return Invalid(kMsg, prefix + "segments",
                     "empty, a state tensor has 1 to " + N(kMaxStateSegments) + " segments");
    }
    KVB_RETURN_IF_ERROR(
        CheckEntries(kMsg, prefix + "segments", tensor.segments.size(), kMaxStateSegments));
    for (size_t j = 0; j < tensor.segments.size(); ++j) {
      const StateSegmentDescriptor& segment = tensor.segments[j];
      const std::string segment_prefix = prefix + "segments[" + N(j) + "].";
      if (segment.units == 0) {
        return Invalid(kMsg, segment_prefix + "units", "0, must be at least 1");
      }
      if (segment.unit_elems == 0) {
        return Invalid(kMsg, segment_prefix + "unit_elems", "0, must be at least 1");
      }
    }
  }
  return Status::Ok();
}

Status ValidatePlacement(const Hello& hello) {
  constexpr std::string_view kMsg = "HELLO";
  const RankPlacement& p = hello.placement;
  if (p.tp_size == 0) return Invalid(kMsg, "placement.tp_size", "0, must be at least 1");
  if (p.tp_rank >= p.tp_size) {
    return Invalid(kMsg, "placement.tp_rank", N(p.tp_rank) + " not below tp_size " + N(p.tp_size));
  }
  if (p.pp_size == 0) return Invalid(kMsg, "placement.pp_size", "0, must be at least 1");
  if (p.pp_size > kMaxPipelineStages) {
    return Invalid(kMsg, "placement.pp_size",
                   N(p.pp_size) + " exceeds limit " + N(kMaxPipelineStages));
  }
  if (p.pp_rank >= p.pp_size) {
    return Invalid(kMsg, "placement.pp_rank", N(p.pp_rank) + " not below pp_size " + N(p.pp_size));
  }
  KVB_RETURN_IF_ERROR(CheckEntries(kMsg, "placement.layers_per_stage", p.layers_per_stage.size(),
                                   kMaxPipelineStages));
  if (p.layers_per_stage.size() != p.pp_size) {
    return Invalid(kMsg, "placement.layers_per_stage",
                   N(p.layers_per_stage.size()) + " entries, pp_size is " + N(p.pp_size));
  }
  if (hello.model.num_layers > kMaxLayers) {
    return Invalid(kMsg, "model.num_layers",
                   N(hello.model.num_layers) + " exceeds limit " + N(kMaxLayers));
  }
  KVB_RETURN_IF_ERROR(ValidateHybrid(hello.model));
  // The pipeline split is over all model layers: those of the pattern when
  // there is one (attention, recurrent and others), else the attention layers.
  uint64_t sum = 0;  // at most kMaxPipelineStages * UINT32_MAX: no overflow
  for (uint32_t layers : p.layers_per_stage) sum += layers;
  const std::string& pattern = hello.model.layer_pattern;
  if (!pattern.empty() && sum != pattern.size()) {
    return Invalid(
        kMsg, "placement.layers_per_stage",
        "entries sum to " + N(sum) + ", model.layer_pattern has " + N(pattern.size()) + " layers");
  }
  if (pattern.empty() && sum != hello.model.num_layers) {
    return Invalid(
        kMsg, "placement.layers_per_stage",
        "entries sum to " + N(sum) + ", model.num_layers is " + N(hello.model.num_layers));
  }
  return Status::Ok();
}

// The layers of the rank's pipeline stage that hold something.
struct StageLayers {
  uint64_t attention = 0;  // hold KV
  uint64_t recurrent = 0;  // hold state
};

// REQUIRES: ValidatePlacement(hello) is OK (the stages split the pattern).
StageLayers LayersOfStage(const Hello& hello) {
  const RankPlacement& p = hello.placement;
  const std::string& pattern = hello.model.layer_pattern;
  StageLayers layers;
  if (pattern.empty()) {
    layers.attention = p.layers_per_stage[p.pp_rank];
    return layers;
  }
  size_t first = 0;
  for (uint32_t stage = 0; stage < p.pp_rank; ++stage) first += p.layers_per_stage[stage];
  const std::string_view stage_pattern =
      std::string_view(pattern).substr(first, p.layers_per_stage[p.pp_rank]);
  for (char c : stage_pattern) {
    if (c == kAttentionLayer) ++layers.attention;
    if (c == kRecurrentLayer) ++layers.recurrent;
  }
  return layers;
}

Status ValidateStateLayout(const Hello& hello, const StageLayers& local) {
  constexpr std::string_view kMsg = "HELLO";
  const StateLayoutDescriptor& state = hello.state_layout;
  KVB_RETURN_IF_ERROR(
      CheckEnum(kMsg, "state_layout.kind", static_cast<uint8_t>(state.kind), kMaxStateLayoutKind));
  KVB_RETURN_IF_ERROR(
      CheckEntries(kMsg, "state_layout.layer_bases", state.layer_bases.size(), kMaxLayers));
  if (state.num_slots == 0 && state.base != 0) {
    return Invalid(kMsg, "state_layout.base",
                   N(state.base) + " with num_slots 0: a rank without state slots has no pool");
  }
  if (state.num_slots == 0 && !state.layer_bases.empty()) {
    return Invalid(kMsg, "state_layout.layer_bases",
                   N(state.layer_bases.size()) +
                       " entries with num_slots 0: a rank without state slots has no pool");
  }
  if (state.base != 0 && !state.layer_bases.empty()) {
    return Invalid(kMsg, "state_layout.layer_bases",
                   N(state.layer_bases.size()) + " entries and base " + N(state.base) +
                       ": the pool is one allocation or one per layer, not both");
  }
  if (!state.layer_bases.empty() && state.layer_bases.size() != local.recurrent) {
    return Invalid(kMsg, "state_layout.layer_bases",
                   N(state.layer_bases.size()) + " entries, must be 0 or the " +
                       N(local.recurrent) + " recurrent layers of stage " +
                       N(hello.placement.pp_rank));
  }
  return Status::Ok();
}

}  // namespace

std::string_view RoleName(Role role) {
  switch (role) {
    case Role::kCtx:
      return "CTX";
    case Role::kGen:
      return "GEN";
  }
  return "UNKNOWN";
}

std::string_view LayoutKindName(LayoutKind kind) {
  switch (kind) {
    case LayoutKind::kBlockMajorHnd:
      return "BLOCK_MAJOR_HND";
    case LayoutKind::kLayerMajorHnd:
      return "LAYER_MAJOR_HND";
    case LayoutKind::kLayerMajorNhd:
      return "LAYER_MAJOR_NHD";
  }
  return "UNKNOWN";
}

std::string_view StateLayoutKindName(StateLayoutKind kind) {
  switch (kind) {
    case StateLayoutKind::kSlotMajor:
      return "SLOT_MAJOR";
    case StateLayoutKind::kLayerMajor:
      return "LAYER_MAJOR";
  }
  return "UNKNOWN";
}

std::string_view RegionKindName(RegionKind kind) {
  switch (kind) {
    case RegionKind::kPool:
      return "POOL";
    case RegionKind::kSendArena:
      return "SEND_ARENA";
    case RegionKind::kRecvArena:
      return "RECV_ARENA";
  }
  return "UNKNOWN";
}

std::string_view MemoryKindName(MemoryKind kind) {
  switch (kind) {
    case MemoryKind::kHost:
      return "HOST";
    case MemoryKind::kPinnedHost:
      return "PINNED_HOST";
    case MemoryKind::kCuda:
      return "CUDA";
  }
  return "UNKNOWN";
}

std::string_view TransferPathName(TransferPath path) {
  switch (path) {
    case TransferPath::kPerBlock:
      return "PER_BLOCK";
    case TransferPath::kBounce:
      return "BOUNCE";
    case TransferPath::kDirect:
      return "DIRECT";
    case TransferPath::kAuto:
      return "AUTO";
    case TransferPath::kDirectRead:
      return "DIRECT_READ";
  }
  return "UNKNOWN";
}

std::string_view ResultStatusName(ResultStatus status) {
  switch (status) {
    case ResultStatus::kSuccess:
      return "SUCCESS";
    case ResultStatus::kFailed:
      return "FAILED";
    case ResultStatus::kCancelled:
      return "CANCELLED";
  }
  return "UNKNOWN";
}

std::string_view ByeReasonName(ByeReason reason) {
  switch (reason) {
    case ByeReason::kShutdown:
      return "SHUTDOWN";
    case ByeReason::kProtocolError:
      return "PROTOCOL_ERROR";
    case ByeReason::kIncompatible:
      return "INCOMPATIBLE";
  }
  return "UNKNOWN";
}

MessageType TypeOf(const Message& message) {
  return std::visit([](const auto& m) { return TypeOf(m); }, message);
}

Status Validate(const Hello& hello) {
  constexpr std::string_view kMsg = "HELLO";
  if (hello.protocol_version != kProtocolVersion) {
    return Invalid(kMsg, "protocol_version",
                   N(hello.protocol_version) + ", this build speaks " + N(kProtocolVersion));
  }
  if (hello.instance_id.empty()) return Invalid(kMsg, "instance_id", "empty");
  KVB_RETURN_IF_ERROR(
      CheckLength(kMsg, "instance_id", hello.instance_id.size(), kMaxInstanceIdBytes));
  KVB_RETURN_IF_ERROR(CheckEnum(kMsg, "role", static_cast<uint8_t>(hello.role), kMaxRole));
  KVB_RETURN_IF_ERROR(ValidatePlacement(hello));

  const LayoutDescriptor& layout = hello.layout;
  KVB_RETURN_IF_ERROR(
      CheckEnum(kMsg, "layout.kind", static_cast<uint8_t>(layout.kind), kMaxLayoutKind));
  KVB_RETURN_IF_ERROR(
      CheckEntries(kMsg, "layout.layer_bases", layout.layer_bases.size(), kMaxLayers));
  // KV pools hold the attention layers only: of a hybrid model, the '*' of
  // the rank's stage.
  const StageLayers local = LayersOfStage(hello);
  if (!layout.layer_bases.empty() && layout.layer_bases.size() != local.attention) {
    return Invalid(kMsg, "layout.layer_bases",
                   N(layout.layer_bases.size()) + " entries, must be 0 or the " +
                       N(local.attention) +
                       (hello.model.layer_pattern.empty() ? " layers" : " attention layers") +
                       " of stage " + N(hello.placement.pp_rank));
  }
  KVB_RETURN_IF_ERROR(ValidateStateLayout(hello, local));

  KVB_RETURN_IF_ERROR(CheckEntries(kMsg, "regions", hello.regions.size(), kMaxRegions));
  for (size_t i = 0; i < hello.regions.size(); ++i) {
    const RegionDescriptor& region = hello.regions[i];
    const std::string prefix = "regions[" + N(i) + "].";
    KVB_RETURN_IF_ERROR(
        CheckEnum(kMsg, prefix + "kind", static_cast<uint8_t>(region.kind), kMaxRegionKind));
    KVB_RETURN_IF_ERROR(
        CheckEnum(kMsg, prefix + "memory", static_cast<uint8_t>(region.memory), kMaxMemoryKind));
    if (region.memory == MemoryKind::kCuda ? region.device > kMaxDevice
                                           : region.device != kNoDevice) {
      return Invalid(
          kMsg, prefix + "device",
          N(region.device) + (region.memory == MemoryKind::kCuda
                                  ? " is not a CUDA device ordinal (at most " + N(kMaxDevice) + ")"
                                  : " for host memory, must be " + N(kNoDevice)));
    }
    KVB_RETURN_IF_ERROR(CheckRange(kMsg, prefix + "size", region.addr, region.size));
    KVB_RETURN_IF_ERROR(
        CheckLength(kMsg, prefix + "remote_key", region.remote_key.size(), kMaxRemoteKeyBytes));
  }
  return Status::Ok();
}

Status Validate(const KvRequest& request) {
  constexpr std::string_view kMsg = "KV_REQUEST";
  if (request.token_start > request.token_end) {
    return Invalid(kMsg, "token_range",
                   "start " + N(request.token_start) + " > end " + N(request.token_end));
  }
  KVB_RETURN_IF_ERROR(
      CheckEntries(kMsg, "block_table", request.block_table.size(), kMaxBlockTableEntries));
  KVB_RETURN_IF_ERROR(
      CheckEnum(kMsg, "path", static_cast<uint8_t>(request.path), kMaxTransferPath));
  KVB_RETURN_IF_ERROR(
      CheckRange(kMsg, "recv_slot_size", request.recv_slot_addr, request.recv_slot_size));
  if (request.chunk_bytes != 0 && (request.path != TransferPath::kBounce ||
                                   request.recv_slot_addr != 0 || request.recv_slot_size != 0)) {
    return Invalid(kMsg, "chunk_bytes",
                   N(request.chunk_bytes) + " with path " +
                       std::string(TransferPathName(request.path)) + " and a recv slot of " +
                       N(request.recv_slot_size) +
                       " bytes: a streamed request is BOUNCE and has no recv slot");
  }
  return Status::Ok();
}

Status Validate(const KvResult& result) {
  constexpr std::string_view kMsg = "KV_RESULT";
  KVB_RETURN_IF_ERROR(
      CheckEnum(kMsg, "status", static_cast<uint8_t>(result.status), kMaxResultStatus));
  KVB_RETURN_IF_ERROR(CheckEnum(kMsg, "error_code", result.error_code, kMaxErrorCode));
  if ((result.status == ResultStatus::kSuccess) != (result.error_code == 0)) {
    return InvalidArgumentError("KV_RESULT.error_code: " + std::to_string(result.error_code) +
                                " with status " + std::string(ResultStatusName(result.status)) +
                                ": must be 0 exactly when the status is SUCCESS");
  }
  KVB_RETURN_IF_ERROR(
      CheckLength(kMsg, "error_text", result.error_text.size(), kMaxErrorTextBytes));
  return Status::Ok();
}

Status Validate(const Cancel& cancel) {
  return CheckLength("CANCEL", "reason", cancel.reason.size(), kMaxReasonBytes);
}

Status Validate(const Bye& bye) {
  constexpr std::string_view kMsg = "BYE";
  KVB_RETURN_IF_ERROR(CheckEnum(kMsg, "reason", static_cast<uint8_t>(bye.reason), kMaxByeReason));
  KVB_RETURN_IF_ERROR(CheckLength(kMsg, "message", bye.message.size(), kMaxReasonBytes));
  return Status::Ok();
}

Status Validate(const KvReady& ready) {
  return CheckEntries("KV_READY", "block_table", ready.block_table.size(), kMaxBlockTableEntries);
}

Status Validate(const KvReadDone& done) {
  constexpr std::string_view kMsg = "KV_READ_DONE";
  KVB_RETURN_IF_ERROR(
      CheckEnum(kMsg, "status", static_cast<uint8_t>(done.status), kMaxResultStatus));
  KVB_RETURN_IF_ERROR(CheckLength(kMsg, "error_text", done.error_text.size(), kMaxErrorTextBytes));
  return Status::Ok();
}

Status Validate(const KvGrant& grant) {
  constexpr std::string_view kMsg = "KV_GRANT";
  if (grant.slot_size == 0) return Invalid(kMsg, "slot_size", "0: a granted slot holds bytes");
  return CheckRange(kMsg, "slot_size", grant.slot_addr, grant.slot_size);
}

Status Validate(const KvChunk& chunk) {
  if (chunk.bytes == 0) return Invalid("KV_CHUNK", "bytes", "0: a chunk holds bytes");
  return Status::Ok();
}

Status Validate(const Message& message) {
  return std::visit([](const auto& m) { return Validate(m); }, message);
}

}  // namespace kvbounce::protocol
