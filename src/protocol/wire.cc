#include "protocol/wire.h"

#include <utility>

namespace kvbounce::protocol {

std::string_view MessageTypeName(MessageType type) {
  switch (type) {
    case MessageType::kHello:
      return "HELLO";
    case MessageType::kKvRequest:
      return "KV_REQUEST";
    case MessageType::kKvResult:
      return "KV_RESULT";
    case MessageType::kCancel:
      return "CANCEL";
    case MessageType::kBye:
      return "BYE";
    case MessageType::kKvReady:
      return "KV_READY";
    case MessageType::kKvReadDone:
      return "KV_READ_DONE";
    case MessageType::kKvGrant:
      return "KV_GRANT";
    case MessageType::kKvChunk:
      return "KV_CHUNK";
  }
  return "UNKNOWN";
}

// --- WireWriter --------------------------------------------------------------

void WireWriter::PutU16(uint16_t v) {
  std::byte b[2];
  StoreLe16(b, v);
  out_->insert(out_->end(), b, b + 2);
}

void WireWriter::PutU32(uint32_t v) {
  std::byte b[4];
  StoreLe32(b, v);
  out_->insert(out_->end(), b, b + 4);
}

void WireWriter::PutU64(uint64_t v) {
  std::byte b[8];
  StoreLe64(b, v);
  out_->insert(out_->end(), b, b + 8);
}

void WireWriter::PutRaw(std::span<const std::byte> bytes) {
  out_->insert(out_->end(), bytes.begin(), bytes.end());
}

void WireWriter::PutString(std::string_view s) {
  PutU32(static_cast<uint32_t>(s.size()));
  PutRaw(std::as_bytes(std::span<const char>(s.data(), s.size())));
}

void WireWriter::PutBytes(std::span<const std::byte> bytes) {
  PutU32(static_cast<uint32_t>(bytes.size()));
  PutRaw(bytes);
}

void WireWriter::PutU32Array(std::span<const uint32_t> values) {
  PutU32(static_cast<uint32_t>(values.size()));
  size_t at = out_->size();
  out_->resize(at + 4 * values.size());
  for (uint32_t v : values) {
    StoreLe32(out_->data() + at, v);
    at += 4;
  }
}

void WireWriter::PutU64Array(std::span<const uint64_t> values) {
  PutU32(static_cast<uint32_t>(values.size()));
  size_t at = out_->size();
  out_->resize(at + 8 * values.size());
  for (uint64_t v : values) {
    StoreLe64(out_->data() + at, v);
    at += 8;
  }
}

void WireWriter::PatchU32(size_t offset, uint32_t v) { StoreLe32(out_->data() + offset, v); }

// --- WireReader --------------------------------------------------------------

std::string WireReader::FieldName(std::string_view field) const {
  std::string name(context_);
  name += '.';
  if (in_element_) {
    name += element_array_;
    name += '[';
    name += std::to_string(element_index_);
    name += "].";
  }
  name += field;
  return name;
}

Status WireReader::Error(std::string_view field, std::string_view what) const {
  std::string message = FieldName(field);
  message += ": ";
  message += what;
  return DataLossError(message);
}

Status WireReader::Need(std::string_view field, size_t need) const {
  if (need <= remaining()) return Status::Ok();
  return Error(field, "truncated at offset " + std::to_string(offset()) + " (need " +
                          std::to_string(need) + " bytes, have " + std::to_string(remaining()) +
                          ")");
}

Status WireReader::ReadU8(std::string_view field, uint8_t* out) {
  KVB_RETURN_IF_ERROR(Need(field, 1));
  *out = static_cast<uint8_t>(data_[pos_]);
  pos_ += 1;
  return Status::Ok();
}

Status WireReader::ReadU16(std::string_view field, uint16_t* out) {
  KVB_RETURN_IF_ERROR(Need(field, 2));
  *out = LoadLe16(data_.data() + pos_);
  pos_ += 2;
  return Status::Ok();
}

Status WireReader::ReadU32(std::string_view field, uint32_t* out) {
  KVB_RETURN_IF_ERROR(Need(field, 4));
  *out = LoadLe32(data_.data() + pos_);
  pos_ += 4;
  return Status::Ok();
}

Status WireReader::ReadU64(std::string_view field, uint64_t* out) {
  KVB_RETURN_IF_ERROR(Need(field, 8));
  *out = LoadLe64(data_.data() + pos_);
  pos_ += 8;
  return Status::Ok();
}

Status WireReader::ReadI64(std::string_view field, int64_t* out) {
  uint64_t v = 0;
  KVB_RETURN_IF_ERROR(ReadU64(field, &v));
  *out = static_cast<int64_t>(v);  // two's complement, well defined since C++20
  return Status::Ok();
}

Status WireReader::CheckCount(std::string_view field, std::string_view noun, uint64_t count,
                              uint64_t limit, size_t element_bytes, size_t count_offset) const {
  const std::string what = std::string(noun) + " " + std::to_string(count);
  if (count > limit) return Error(field, what + " exceeds limit " + std::to_string(limit));
  // count <= UINT32_MAX and element_bytes is small, so this cannot overflow.
  const uint64_t need = count * element_bytes;
  if (need > remaining()) {
    return Error(field, what + " needs " + std::to_string(need) + " bytes, have " +
                            std::to_string(remaining()) + " (offset " +
                            std::to_string(count_offset) + ")");
  }
  return Status::Ok();
}

Status WireReader::ReadCount(std::string_view field, uint32_t max_count, size_t min_element_bytes,
                             uint32_t* out) {
  return ReadPrefix(field, "count", max_count, min_element_bytes, out);
}

Status WireReader::ReadPrefix(std::string_view field, std::string_view noun, uint32_t limit,
                              size_t element_bytes, uint32_t* out) {
  const size_t start = pos_;
  uint32_t count = 0;
  KVB_RETURN_IF_ERROR(ReadU32(field, &count));
  Status status = CheckCount(field, noun, count, limit, element_bytes, base_offset_ + start);
  if (!status.ok()) {
    pos_ = start;
    return status;
  }
  *out = count;
  return Status::Ok();
}

Status WireReader::ReadString(std::string_view field, uint32_t max_bytes, std::string* out) {
  uint32_t length = 0;
  KVB_RETURN_IF_ERROR(ReadPrefix(field, "length", max_bytes, 1, &length));
  out->assign(reinterpret_cast<const char*>(data_.data() + pos_), length);
  pos_ += length;
  return Status::Ok();
}

Status WireReader::ReadBytes(std::string_view field, uint32_t max_bytes,
                             std::vector<std::byte>* out) {
  uint32_t length = 0;
  KVB_RETURN_IF_ERROR(ReadPrefix(field, "length", max_bytes, 1, &length));
  auto first = data_.begin() + static_cast<std::ptrdiff_t>(pos_);
  out->assign(first, first + length);
  pos_ += length;
  return Status::Ok();
}

Status WireReader::ReadU32Array(std::string_view field, uint32_t max_count,
                                std::vector<uint32_t>* out) {
  uint32_t count = 0;
  KVB_RETURN_IF_ERROR(ReadCount(field, max_count, 4, &count));
  std::vector<uint32_t> values(count);
  for (uint32_t i = 0; i < count; ++i) values[i] = LoadLe32(data_.data() + pos_ + 4 * size_t{i});
  pos_ += 4 * size_t{count};
  *out = std::move(values);
  return Status::Ok();
}

Status WireReader::ReadU64Array(std::string_view field, uint32_t max_count,
                                std::vector<uint64_t>* out) {
  uint32_t count = 0;
  KVB_RETURN_IF_ERROR(ReadCount(field, max_count, 8, &count));
  std::vector<uint64_t> values(count);
  for (uint32_t i = 0; i < count; ++i) values[i] = LoadLe64(data_.data() + pos_ + 8 * size_t{i});
  pos_ += 8 * size_t{count};
  *out = std::move(values);
  return Status::Ok();
}

Status WireReader::ExpectEnd() const {
  if (remaining() == 0) return Status::Ok();
  return DataLossError(std::string(context_) + ": " + std::to_string(remaining()) +
                       " trailing bytes after the last field (offset " + std::to_string(offset()) +
                       ")");
}

}  // namespace kvbounce::protocol
