#include "kvbounce/model.h"

#include <array>
#include <string>

namespace kvbounce {
namespace {

const std::array<ModelShape, 6> kPresets = {{
    {"llama-3.1-8b", 32, 8, 128, 2},
    {"llama-3.1-70b", 80, 8, 128, 2},
    {"mistral-7b", 32, 8, 128, 2},
    {"qwen2.5-7b", 28, 4, 128, 2},
    {"qwen3-235b-a22b", 94, 4, 128, 2},
    // MLA: 512 latent + 64 rope dims in one cache, the same on every TP rank.
    {"deepseek-v3", 61, 1, 576, 1},
}};

}  // namespace

std::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kBf16:
      return "bf16";
    case DType::kFp16:
      return "fp16";
    case DType::kFp8:
      return "fp8";
    case DType::kFp32:
      return "fp32";
  }
  return "?";
}

Result<DType> ParseDType(std::string_view name) {
  for (DType d : {DType::kBf16, DType::kFp16, DType::kFp8, DType::kFp32}) {
    if (name == DTypeName(d)) return d;
  }
  return InvalidArgumentError("dtype '" + std::string(name) +
                              "' is not known: use bf16, fp16, fp8 or fp32");
}

uint32_t DTypeBytes(DType dtype) {
  switch (dtype) {
    case DType::kBf16:
      return 2;
    case DType::kFp16:
      return 2;
    case DType::kFp8:
      return 1;
    case DType::kFp32:
      return 4;
  }
  return 0;
}

Status ModelShape::Validate() const {
  const std::string prefix = "model '" + name + "': ";
  if (num_layers <= 0) {
    return InvalidArgumentError(prefix + "layers = " + std::to_string(num_layers) +
                                " is invalid: must be >= 1");
  }
  if (num_kv_heads <= 0) {
    return InvalidArgumentError(prefix + "kv heads = " + std::to_string(num_kv_heads) +
                                " is invalid: must be >= 1");
  }
  if (head_dim <= 0) {
    return InvalidArgumentError(prefix + "head dim = " + std::to_string(head_dim) +
                                " is invalid: must be >= 1");
  }
  if (kv_factor != 1 && kv_factor != 2) {
    return InvalidArgumentError(prefix + "kv factor = " + std::to_string(kv_factor) +
                                " is invalid: must be 2 (K and V) or 1 (MLA)");
  }
  if (kv_factor == 1 && num_kv_heads != 1) {
    return InvalidArgumentError(
        prefix + "MLA keeps one latent kv head, got kv heads = " + std::to_string(num_kv_heads));
  }
  return Status::Ok();
}

std::span<const ModelShape> ModelPresets() { return kPresets; }

Result<ModelShape> FindModelPreset(std::string_view name) {
  std::string known;
  for (const ModelShape& m : kPresets) {
    if (m.name == name) return m;
    if (!known.empty()) known += ", ";
    known += m.name;
  }
  return NotFoundError("model preset '" + std::string(name) + "' is not known (known: " + known +
                       ")");
}

Result<ModelShape> CustomModel(int num_layers, int num_kv_heads, int head_dim, bool mla) {
  ModelShape shape{"custom", num_layers, num_kv_heads, head_dim, mla ? 1 : 2};
  KVB_RETURN_IF_ERROR(shape.Validate());
  return shape;
}

}  // namespace kvbounce
