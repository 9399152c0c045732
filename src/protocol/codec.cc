#include "protocol/codec.h"

#include <algorithm>
#include <string>
#include <utility>

namespace kvbounce::protocol {
namespace {

std::string N(uint64_t v) { return std::to_string(v); }

std::string Hex(uint64_t v, int digits) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string s = "0x";
  for (int i = digits - 1; i >= 0; --i) s += kDigits[(v >> (4 * i)) & 0xf];
  return s;
}

Status HeaderError(const std::string& what) { return DataLossError("frame header: " + what); }

// A Validate failure found on decoded bytes is a malformed frame, not a bad
// argument of the caller.
Status AsDataLoss(const Status& status) {
  if (status.ok()) return status;
  return Status(StatusCode::kDataLoss, status.message());
}

// --- Encoding ----------------------------------------------------------------

void WritePayload(WireWriter& w, const Hello& m) {
  w.PutU16(m.protocol_version);
  w.PutU8(static_cast<uint8_t>(m.role));
  w.PutU8(static_cast<uint8_t>(m.layout.kind));
  w.PutU32(m.placement.tp_rank);
  w.PutU32(m.placement.tp_size);
  w.PutU32(m.placement.pp_rank);
  w.PutU32(m.placement.pp_size);
  w.PutU32(m.model.num_layers);
  w.PutU32(m.model.num_kv_heads);
  w.PutU32(m.model.head_dim);
  w.PutU32(m.model.kv_factor);
  w.PutU32(m.model.elem_bytes);
  w.PutU32(m.layout.tokens_per_block);
  w.PutU32(m.layout.num_blocks);
  w.PutU64(m.layout.base);
  w.PutU64(m.layout.s_layer);
  w.PutU64(m.layout.s_kv);
  w.PutU64(m.layout.s_block);
  w.PutU64(m.layout.s_head);
  w.PutU64(m.layout.s_token);
  w.PutU64(m.capabilities);
  w.PutString(m.instance_id);
  w.PutU32Array(m.placement.layers_per_stage);
  w.PutU64Array(m.layout.layer_bases);
  w.PutU32(static_cast<uint32_t>(m.regions.size()));
  for (const RegionDescriptor& r : m.regions) {
    w.PutU8(static_cast<uint8_t>(r.kind));
    w.PutU8(static_cast<uint8_t>(r.memory));
    w.PutU32(r.device);
    w.PutU64(r.addr);
    w.PutU64(r.size);
    w.PutBytes(r.remote_key);
  }
  // Version 6: hybrid models' layer pattern, state shape and state pool.
  w.PutString(m.model.layer_pattern);
  w.PutU32(static_cast<uint32_t>(m.model.state.size()));
  for (const StateTensorDescriptor& t : m.model.state) {
    w.PutU32(t.elem_bytes);
    w.PutU32(static_cast<uint32_t>(t.segments.size()));
    for (const StateSegmentDescriptor& seg : t.segments) {
      w.PutU32(seg.units);
      w.PutU32(seg.unit_elems);
    }
  }
  w.PutU8(static_cast<uint8_t>(m.state_layout.kind));
  w.PutU32(m.state_layout.num_slots);
  w.PutU64(m.state_layout.base);
  w.PutU64Array(m.state_layout.layer_bases);
}

void WritePayload(WireWriter& w, const KvRequest& m) {
  w.PutU64(m.request_id);
  w.PutU64(m.token_start);
  w.PutU64(m.token_end);
  w.PutU64(m.recv_slot_addr);
  w.PutU64(m.recv_slot_size);
  w.PutU64(m.plan_fingerprint);
  w.PutU64(m.deadline_ms);
  w.PutU64(m.chunk_bytes);
  w.PutU32(m.slice_id);
  w.PutU32(m.receiver_rank);
  w.PutU32(m.writer_rank);
  w.PutU32(m.state_slot);
  w.PutU8(static_cast<uint8_t>(m.path));
  w.PutU32Array(m.block_table);
}

void WritePayload(WireWriter& w, const KvResult& m) {
  w.PutU64(m.request_id);
  w.PutU64(m.bytes_written);
  w.PutU64(m.plan_fingerprint);
  w.PutU32(m.slice_id);
  w.PutU32(m.writer_rank);
  w.PutU8(static_cast<uint8_t>(m.status));
  w.PutU8(m.error_code);
  w.PutString(m.error_text);
}

void WritePayload(WireWriter& w, const Cancel& m) {
  w.PutU64(m.request_id);
  w.PutString(m.reason);
}

void WritePayload(WireWriter& w, const Bye& m) {
  w.PutU8(static_cast<uint8_t>(m.reason));
  w.PutString(m.message);
}

void WritePayload(WireWriter& w, const KvReady& m) {
  w.PutU64(m.request_id);
  w.PutU64(m.plan_fingerprint);
  w.PutU32(m.slice_id);
  w.PutU32(m.writer_rank);
  w.PutU32(m.state_slot);
  w.PutU32Array(m.block_table);
}

void WritePayload(WireWriter& w, const KvReadDone& m) {
  w.PutU64(m.request_id);
  w.PutU64(m.bytes_read);
  w.PutU32(m.slice_id);
  w.PutU32(m.writer_rank);
  w.PutU8(static_cast<uint8_t>(m.status));
  w.PutString(m.error_text);
}

void WritePayload(WireWriter& w, const KvGrant& m) {
  w.PutU64(m.request_id);
  w.PutU64(m.chunk);
  w.PutU64(m.slot_addr);
  w.PutU64(m.slot_size);
  w.PutU32(m.slice_id);
  w.PutU32(m.writer_rank);
}

void WritePayload(WireWriter& w, const KvChunk& m) {
  w.PutU64(m.request_id);
  w.PutU64(m.chunk);
  w.PutU64(m.bytes);
  w.PutU32(m.slice_id);
  w.PutU32(m.writer_rank);
}

template <typename M>
Result<std::vector<std::byte>> EncodeMessage(const M& message) {
  KVB_RETURN_IF_ERROR(Validate(message));
  const MessageType type = TypeOf(message);
  std::vector<std::byte> out;
  out.reserve(256);
  WireWriter w(&out);
  w.PutU32(kMagic);
  w.PutU16(kProtocolVersion);
  w.PutU16(static_cast<uint16_t>(type));
  w.PutU32(0);  // length, patched below
  WritePayload(w, message);
  const size_t payload = out.size() - kHeaderSize;
  // Validate bounds every list and string, and the limits of wire.h are
  // chosen so the largest valid message fits; this guards that reasoning.
  if (payload > MaxPayloadBytes(type)) {
    return InternalError(std::string(MessageTypeName(type)) + ": encoded payload of " + N(payload) +
                         " bytes exceeds limit " + N(MaxPayloadBytes(type)));
  }
  w.PatchU32(kLengthOffset, static_cast<uint32_t>(payload));
  return Result<std::vector<std::byte>>(std::move(out));
}

// --- Decoding ----------------------------------------------------------------

template <typename E>
Status ReadEnum(WireReader& r, std::string_view field, uint8_t max, E* out) {
  uint8_t v = 0;
  KVB_RETURN_IF_ERROR(r.ReadU8(field, &v));
  if (v > max) return r.Error(field, "value " + N(v) + " out of range 0.." + N(max));
  *out = static_cast<E>(v);
  return Status::Ok();
}

Status ReadPayload(WireReader& r, Hello* m) {
  KVB_RETURN_IF_ERROR(r.ReadU16("protocol_version", &m->protocol_version));
  KVB_RETURN_IF_ERROR(ReadEnum(r, "role", kMaxRole, &m->role));
  KVB_RETURN_IF_ERROR(ReadEnum(r, "layout.kind", kMaxLayoutKind, &m->layout.kind));
  KVB_RETURN_IF_ERROR(r.ReadU32("placement.tp_rank", &m->placement.tp_rank));
  KVB_RETURN_IF_ERROR(r.ReadU32("placement.tp_size", &m->placement.tp_size));
  KVB_RETURN_IF_ERROR(r.ReadU32("placement.pp_rank", &m->placement.pp_rank));
  KVB_RETURN_IF_ERROR(r.ReadU32("placement.pp_size", &m->placement.pp_size));
  KVB_RETURN_IF_ERROR(r.ReadU32("model.num_layers", &m->model.num_layers));
  KVB_RETURN_IF_ERROR(r.ReadU32("model.num_kv_heads", &m->model.num_kv_heads));
  KVB_RETURN_IF_ERROR(r.ReadU32("model.head_dim", &m->model.head_dim));
  KVB_RETURN_IF_ERROR(r.ReadU32("model.kv_factor", &m->model.kv_factor));
  KVB_RETURN_IF_ERROR(r.ReadU32("model.elem_bytes", &m->model.elem_bytes));
  KVB_RETURN_IF_ERROR(r.ReadU32("layout.tokens_per_block", &m->layout.tokens_per_block));
  KVB_RETURN_IF_ERROR(r.ReadU32("layout.num_blocks", &m->layout.num_blocks));
  KVB_RETURN_IF_ERROR(r.ReadU64("layout.base", &m->layout.base));
  KVB_RETURN_IF_ERROR(r.ReadU64("layout.s_layer", &m->layout.s_layer));
  KVB_RETURN_IF_ERROR(r.ReadU64("layout.s_kv", &m->layout.s_kv));
  KVB_RETURN_IF_ERROR(r.ReadU64("layout.s_block", &m->layout.s_block));
  KVB_RETURN_IF_ERROR(r.ReadU64("layout.s_head", &m->layout.s_head));
  KVB_RETURN_IF_ERROR(r.ReadU64("layout.s_token", &m->layout.s_token));
  KVB_RETURN_IF_ERROR(r.ReadU64("capabilities", &m->capabilities));
  KVB_RETURN_IF_ERROR(r.ReadString("instance_id", kMaxInstanceIdBytes, &m->instance_id));
  KVB_RETURN_IF_ERROR(r.ReadU32Array("placement.layers_per_stage", kMaxPipelineStages,
                                     &m->placement.layers_per_stage));
  KVB_RETURN_IF_ERROR(r.ReadU64Array("layout.layer_bases", kMaxLayers, &m->layout.layer_bases));
  uint32_t num_regions = 0;
  KVB_RETURN_IF_ERROR(r.ReadCount("regions", kMaxRegions, kRegionFixedBytes, &num_regions));
  std::vector<RegionDescriptor> regions(num_regions);
  for (uint32_t i = 0; i < num_regions; ++i) {
    RegionDescriptor& region = regions[i];
    r.EnterElement("regions", i);
    KVB_RETURN_IF_ERROR(ReadEnum(r, "kind", kMaxRegionKind, &region.kind));
    KVB_RETURN_IF_ERROR(ReadEnum(r, "memory", kMaxMemoryKind, &region.memory));
    KVB_RETURN_IF_ERROR(r.ReadU32("device", &region.device));
    KVB_RETURN_IF_ERROR(r.ReadU64("addr", &region.addr));
    KVB_RETURN_IF_ERROR(r.ReadU64("size", &region.size));
    KVB_RETURN_IF_ERROR(r.ReadBytes("remote_key", kMaxRemoteKeyBytes, &region.remote_key));
    r.LeaveElement();
  }
  m->regions = std::move(regions);

  KVB_RETURN_IF_ERROR(r.ReadString("model.layer_pattern", kMaxLayers, &m->model.layer_pattern));
  uint32_t num_tensors = 0;
  KVB_RETURN_IF_ERROR(
      r.ReadCount("model.state", kMaxStateTensors, kStateTensorFixedBytes, &num_tensors));
  std::vector<StateTensorDescriptor> state(num_tensors);
  for (uint32_t i = 0; i < num_tensors; ++i) {
    StateTensorDescriptor& tensor = state[i];
    // Segment fields read "model.state[i].segments[j].units": the element
    // scope is not nested, so the segment index is part of the field name.
    r.EnterElement("model.state", i);
    KVB_RETURN_IF_ERROR(r.ReadU32("elem_bytes", &tensor.elem_bytes));
    uint32_t num_segments = 0;
    KVB_RETURN_IF_ERROR(
        r.ReadCount("segments", kMaxStateSegments, kStateSegmentBytes, &num_segments));
    tensor.segments.resize(num_segments);
    for (uint32_t j = 0; j < num_segments; ++j) {
      const std::string segment = "segments[" + N(j) + "].";
      KVB_RETURN_IF_ERROR(r.ReadU32(segment + "units", &tensor.segments[j].units));
      KVB_RETURN_IF_ERROR(r.ReadU32(segment + "unit_elems", &tensor.segments[j].unit_elems));
    }
    r.LeaveElement();
  }
  m->model.state = std::move(state);
  KVB_RETURN_IF_ERROR(ReadEnum(r, "state_layout.kind", kMaxStateLayoutKind, &m->state_layout.kind));
  KVB_RETURN_IF_ERROR(r.ReadU32("state_layout.num_slots", &m->state_layout.num_slots));
  KVB_RETURN_IF_ERROR(r.ReadU64("state_layout.base", &m->state_layout.base));
  KVB_RETURN_IF_ERROR(
      r.ReadU64Array("state_layout.layer_bases", kMaxLayers, &m->state_layout.layer_bases));
  return Status::Ok();
}

Status ReadPayload(WireReader& r, KvRequest* m) {
  KVB_RETURN_IF_ERROR(r.ReadU64("request_id", &m->request_id));
  KVB_RETURN_IF_ERROR(r.ReadU64("token_start", &m->token_start));
  KVB_RETURN_IF_ERROR(r.ReadU64("token_end", &m->token_end));
  KVB_RETURN_IF_ERROR(r.ReadU64("recv_slot_addr", &m->recv_slot_addr));
  KVB_RETURN_IF_ERROR(r.ReadU64("recv_slot_size", &m->recv_slot_size));
  KVB_RETURN_IF_ERROR(r.ReadU64("plan_fingerprint", &m->plan_fingerprint));
  KVB_RETURN_IF_ERROR(r.ReadU64("deadline_ms", &m->deadline_ms));
  KVB_RETURN_IF_ERROR(r.ReadU64("chunk_bytes", &m->chunk_bytes));
  KVB_RETURN_IF_ERROR(r.ReadU32("slice_id", &m->slice_id));
  KVB_RETURN_IF_ERROR(r.ReadU32("receiver_rank", &m->receiver_rank));
  KVB_RETURN_IF_ERROR(r.ReadU32("writer_rank", &m->writer_rank));
  KVB_RETURN_IF_ERROR(r.ReadU32("state_slot", &m->state_slot));
  KVB_RETURN_IF_ERROR(ReadEnum(r, "path", kMaxTransferPath, &m->path));
  KVB_RETURN_IF_ERROR(r.ReadU32Array("block_table", kMaxBlockTableEntries, &m->block_table));
  return Status::Ok();
}

Status ReadPayload(WireReader& r, KvResult* m) {
  KVB_RETURN_IF_ERROR(r.ReadU64("request_id", &m->request_id));
  KVB_RETURN_IF_ERROR(r.ReadU64("bytes_written", &m->bytes_written));
  KVB_RETURN_IF_ERROR(r.ReadU64("plan_fingerprint", &m->plan_fingerprint));
  KVB_RETURN_IF_ERROR(r.ReadU32("slice_id", &m->slice_id));
  KVB_RETURN_IF_ERROR(r.ReadU32("writer_rank", &m->writer_rank));
  KVB_RETURN_IF_ERROR(ReadEnum(r, "status", kMaxResultStatus, &m->status));
  KVB_RETURN_IF_ERROR(r.ReadU8("error_code", &m->error_code));
  KVB_RETURN_IF_ERROR(r.ReadString("error_text", kMaxErrorTextBytes, &m->error_text));
  return Status::Ok();
}

Status ReadPayload(WireReader& r, Cancel* m) {
  KVB_RETURN_IF_ERROR(r.ReadU64("request_id", &m->request_id));
  KVB_RETURN_IF_ERROR(r.ReadString("reason", kMaxReasonBytes, &m->reason));
  return Status::Ok();
}

Status ReadPayload(WireReader& r, Bye* m) {
  KVB_RETURN_IF_ERROR(ReadEnum(r, "reason", kMaxByeReason, &m->reason));
  KVB_RETURN_IF_ERROR(r.ReadString("message", kMaxReasonBytes, &m->message));
  return Status::Ok();
}

Status ReadPayload(WireReader& r, KvReady* m) {
  KVB_RETURN_IF_ERROR(r.ReadU64("request_id", &m->request_id));
  KVB_RETURN_IF_ERROR(r.ReadU64("plan_fingerprint", &m->plan_fingerprint));
  KVB_RETURN_IF_ERROR(r.ReadU32("slice_id", &m->slice_id));
  KVB_RETURN_IF_ERROR(r.ReadU32("writer_rank", &m->writer_rank));
  KVB_RETURN_IF_ERROR(r.ReadU32("state_slot", &m->state_slot));
  KVB_RETURN_IF_ERROR(r.ReadU32Array("block_table", kMaxBlockTableEntries, &m->block_table));
  return Status::Ok();
}

Status ReadPayload(WireReader& r, KvReadDone* m) {
  KVB_RETURN_IF_ERROR(r.ReadU64("request_id", &m->request_id));
  KVB_RETURN_IF_ERROR(r.ReadU64("bytes_read", &m->bytes_read));
  KVB_RETURN_IF_ERROR(r.ReadU32("slice_id", &m->slice_id));
  KVB_RETURN_IF_ERROR(r.ReadU32("writer_rank", &m->writer_rank));
  KVB_RETURN_IF_ERROR(ReadEnum(r, "status", kMaxResultStatus, &m->status));
  KVB_RETURN_IF_ERROR(r.ReadString("error_text", kMaxErrorTextBytes, &m->error_text));
  return Status::Ok();
}

Status ReadPayload(WireReader& r, KvGrant* m) {
  KVB_RETURN_IF_ERROR(r.ReadU64("request_id", &m->request_id));
  KVB_RETURN_IF_ERROR(r.ReadU64("chunk", &m->chunk));
  KVB_RETURN_IF_ERROR(r.ReadU64("slot_addr", &m->slot_addr));
  KVB_RETURN_IF_ERROR(r.ReadU64("slot_size", &m->slot_size));
  KVB_RETURN_IF_ERROR(r.ReadU32("slice_id", &m->slice_id));
  KVB_RETURN_IF_ERROR(r.ReadU32("writer_rank", &m->writer_rank));
  return Status::Ok();
}

Status ReadPayload(WireReader& r, KvChunk* m) {
  KVB_RETURN_IF_ERROR(r.ReadU64("request_id", &m->request_id));
  KVB_RETURN_IF_ERROR(r.ReadU64("chunk", &m->chunk));
  KVB_RETURN_IF_ERROR(r.ReadU64("bytes", &m->bytes));
  KVB_RETURN_IF_ERROR(r.ReadU32("slice_id", &m->slice_id));
  KVB_RETURN_IF_ERROR(r.ReadU32("writer_rank", &m->writer_rank));
  return Status::Ok();
}

// The payload of `frame` after checking its header names `expected` and that
// the frame holds exactly the payload the header announces.
Result<std::span<const std::byte>> OpenFrame(std::span<const std::byte> frame,
                                             MessageType expected) {
  KVB_ASSIGN_OR_RETURN(FrameHeader header, DecodeHeader(frame));
  const std::string name(MessageTypeName(expected));
  if (header.type != expected) {
    return DataLossError("expected a " + name + " frame, got " +
                         std::string(MessageTypeName(header.type)));
  }
  if (frame.size() < header.frame_length()) {
    return DataLossError(name + " frame: truncated, header says " + N(header.payload_length) +
                         " payload bytes, " + N(frame.size() - kHeaderSize) + " present");
  }
  if (frame.size() > header.frame_length()) {
    return DataLossError(name + " frame: " + N(frame.size() - header.frame_length()) +
                         " trailing bytes after the " + N(header.payload_length) + "-byte payload");
  }
  return frame.subspan(kHeaderSize);
}

template <typename M>
Result<M> DecodeMessage(std::span<const std::byte> frame, MessageType type) {
  KVB_ASSIGN_OR_RETURN(std::span<const std::byte> payload, OpenFrame(frame, type));
  WireReader reader(payload, MessageTypeName(type), kHeaderSize);
  M message;
  KVB_RETURN_IF_ERROR(ReadPayload(reader, &message));
  KVB_RETURN_IF_ERROR(reader.ExpectEnd());
  KVB_RETURN_IF_ERROR(AsDataLoss(Validate(message)));
  return message;
}

}  // namespace

// --- Public API --------------------------------------------------------------

Result<std::vector<std::byte>> Encode(const Hello& hello) { return EncodeMessage(hello); }
Result<std::vector<std::byte>> Encode(const KvRequest& request) { return EncodeMessage(request); }
Result<std::vector<std::byte>> Encode(const KvResult& result) { return EncodeMessage(result); }
Result<std::vector<std::byte>> Encode(const Cancel& cancel) { return EncodeMessage(cancel); }
Result<std::vector<std::byte>> Encode(const Bye& bye) { return EncodeMessage(bye); }
Result<std::vector<std::byte>> Encode(const KvReady& ready) { return EncodeMessage(ready); }
Result<std::vector<std::byte>> Encode(const KvReadDone& done) { return EncodeMessage(done); }
Result<std::vector<std::byte>> Encode(const KvGrant& grant) { return EncodeMessage(grant); }
Result<std::vector<std::byte>> Encode(const KvChunk& chunk) { return EncodeMessage(chunk); }

Result<std::vector<std::byte>> EncodeFrame(const Message& message) {
  return std::visit([](const auto& m) { return EncodeMessage(m); }, message);
}

Result<FrameHeader> DecodeHeader(std::span<const std::byte> bytes) {
  if (bytes.size() < kHeaderSize) {
    return HeaderError("truncated (need " + N(kHeaderSize) + " bytes, have " + N(bytes.size()) +
                       ")");
  }
  const uint32_t magic = LoadLe32(bytes.data() + kMagicOffset);
  if (magic != kMagic) {
    return HeaderError("bad magic " + Hex(magic, 8) + " (expected " + Hex(kMagic, 8) + ")");
  }
  const uint16_t version = LoadLe16(bytes.data() + kVersionOffset);
  if (version != kProtocolVersion) {
    return HeaderError("unsupported protocol version " + N(version) + " (this build speaks " +
                       N(kProtocolVersion) + ")");
  }
  const uint16_t type = LoadLe16(bytes.data() + kTypeOffset);
  if (type < kMinMessageType || type > kMaxMessageType) {
    return HeaderError("unknown message type " + N(type));
  }
  FrameHeader header;
  header.version = version;
  header.type = static_cast<MessageType>(type);
  header.payload_length = LoadLe32(bytes.data() + kLengthOffset);
  if (header.payload_length > MaxPayloadBytes(header.type)) {
    return HeaderError(std::string(MessageTypeName(header.type)) + " payload length " +
                       N(header.payload_length) + " exceeds limit " +
                       N(MaxPayloadBytes(header.type)));
  }
  return header;
}

Result<std::optional<size_t>> FrameLength(std::span<const std::byte> bytes) {
  const size_t magic_bytes_present = std::min<size_t>(bytes.size(), 4);
  for (size_t i = 0; i < magic_bytes_present; ++i) {
    const auto expected = static_cast<std::byte>(kMagic >> (8 * i));
    if (bytes[i] != expected) {
      return HeaderError("bad magic: byte " + N(i) + " is " +
                         Hex(static_cast<uint8_t>(bytes[i]), 2) + ", expected " +
                         Hex(static_cast<uint8_t>(expected), 2));
    }
  }
  if (bytes.size() < kHeaderSize) return std::optional<size_t>();
  KVB_ASSIGN_OR_RETURN(FrameHeader header, DecodeHeader(bytes));
  return std::optional<size_t>(header.frame_length());
}

Result<Hello> DecodeHello(std::span<const std::byte> frame) {
  // The header's version is kProtocolVersion by then, and Validate requires
  // the same of the payload's protocol_version, so the two always agree.
  return DecodeMessage<Hello>(frame, MessageType::kHello);
}

Result<KvRequest> DecodeKvRequest(std::span<const std::byte> frame) {
  return DecodeMessage<KvRequest>(frame, MessageType::kKvRequest);
}

Result<KvResult> DecodeKvResult(std::span<const std::byte> frame) {
  return DecodeMessage<KvResult>(frame, MessageType::kKvResult);
}

Result<Cancel> DecodeCancel(std::span<const std::byte> frame) {
  return DecodeMessage<Cancel>(frame, MessageType::kCancel);
}

Result<Bye> DecodeBye(std::span<const std::byte> frame) {
  return DecodeMessage<Bye>(frame, MessageType::kBye);
}

Result<KvReady> DecodeKvReady(std::span<const std::byte> frame) {
  return DecodeMessage<KvReady>(frame, MessageType::kKvReady);
}

Result<KvReadDone> DecodeKvReadDone(std::span<const std::byte> frame) {
  return DecodeMessage<KvReadDone>(frame, MessageType::kKvReadDone);
}

Result<KvGrant> DecodeKvGrant(std::span<const std::byte> frame) {
  return DecodeMessage<KvGrant>(frame, MessageType::kKvGrant);
}

Result<KvChunk> DecodeKvChunk(std::span<const std::byte> frame) {
  return DecodeMessage<KvChunk>(frame, MessageType::kKvChunk);
}

Result<Message> DecodeFrame(std::span<const std::byte> frame) {
  KVB_ASSIGN_OR_RETURN(FrameHeader header, DecodeHeader(frame));
  switch (header.type) {
    case MessageType::kHello: {
      KVB_ASSIGN_OR_RETURN(Hello m, DecodeHello(frame));
      return Message(std::move(m));
    }
    case MessageType::kKvRequest: {
      KVB_ASSIGN_OR_RETURN(KvRequest m, DecodeKvRequest(frame));
      return Message(std::move(m));
    }
    case MessageType::kKvResult: {
      KVB_ASSIGN_OR_RETURN(KvResult m, DecodeKvResult(frame));
      return Message(std::move(m));
    }
    case MessageType::kCancel: {
      KVB_ASSIGN_OR_RETURN(Cancel m, DecodeCancel(frame));
      return Message(std::move(m));
    }
    case MessageType::kBye: {
      KVB_ASSIGN_OR_RETURN(Bye m, DecodeBye(frame));
      return Message(std::move(m));
    }
    case MessageType::kKvReady: {
      KVB_ASSIGN_OR_RETURN(KvReady m, DecodeKvReady(frame));
      return Message(std::move(m));
    }
    case MessageType::kKvReadDone: {
      KVB_ASSIGN_OR_RETURN(KvReadDone m, DecodeKvReadDone(frame));
      return Message(std::move(m));
    }
    case MessageType::kKvGrant: {
      KVB_ASSIGN_OR_RETURN(KvGrant m, DecodeKvGrant(frame));
      return Message(std::move(m));
    }
    case MessageType::kKvChunk: {
      KVB_ASSIGN_OR_RETURN(KvChunk m, DecodeKvChunk(frame));
      return Message(std::move(m));
    }
  }
  return InternalError("DecodeFrame: unhandled message type " +
                       N(static_cast<uint16_t>(header.type)));
}

}  // namespace kvbounce::protocol
