// The model, element type, pool layout and parallel shape of a KV cache: the
// value types a serving engine fills in to describe one ctx or gen instance
// (docs/architecture.md §2, §3), with the named presets.
//
// Thread safety: plain values and pure functions; safe from any thread.
#ifndef KVBOUNCE_MODEL_H_
#define KVBOUNCE_MODEL_H_

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvbounce/status.h"

namespace kvbounce {

enum class DType : uint8_t { kBf16, kFp16, kFp8, kFp32 };

// "bf16", "fp16", "fp8", "fp32".
std::string_view DTypeName(DType dtype);
// Errors: kInvalidArgument naming the text and the accepted names.
Result<DType> ParseDType(std::string_view name);
// Bytes per element: 2, 2, 1, 4.
uint32_t DTypeBytes(DType dtype);

struct ModelShape {
  std::string name;  // preset name, or "custom"
  int num_layers = 0;
  int num_kv_heads = 0;  // global kv heads; 1 for MLA
  int head_dim = 0;      // elements per head and token
  int kv_factor = 2;     // 2: separate K and V; 1: MLA latent cache

  bool mla() const { return kv_factor == 1; }

  // Errors (kInvalidArgument): a non-positive field, a kv factor other than 1
  // or 2, or MLA with more than one kv head.
  Status Validate() const;

  friend bool operator==(const ModelShape& a, const ModelShape& b) {
    return a.num_layers == b.num_layers && a.num_kv_heads == b.num_kv_heads &&
           a.head_dim == b.head_dim && a.kv_factor == b.kv_factor;
  }
};

// The presets of docs/architecture.md §2, in table order.
std::span<const ModelShape> ModelPresets();

// Errors: kNotFound naming the preset and listing the known ones.
Result<ModelShape> FindModelPreset(std::string_view name);

// A shape from explicit numbers. `mla` sets kv factor 1 (and requires one kv
// head). Errors: as ModelShape::Validate.
Result<ModelShape> CustomModel(int num_layers, int num_kv_heads, int head_dim, bool mla);

// The named pool layouts of docs/architecture.md §2 (outer to inner dimension):
//   kBlockMajorHnd  [block][layer][kv][head][token][dim]   (TensorRT-LLM)
//   kLayerMajorHnd  per layer [kv][block][head][token][dim]
//   kLayerMajorNhd  per layer [kv][block][token][head][dim] (vLLM)
enum class LayoutKind : uint8_t { kBlockMajorHnd = 0, kLayerMajorHnd = 1, kLayerMajorNhd = 2 };

// "block-major-hnd", "layer-major-hnd", "layer-major-nhd".
std::string_view LayoutKindName(LayoutKind kind);
// Errors: kInvalidArgument naming the text and the known names.
Result<LayoutKind> ParseLayoutKind(std::string_view name);

struct InstanceSpec {
  ModelShape model;
  DType dtype = DType::kBf16;
  int tp = 1;
  int pp = 1;
  // Layers of each pipeline stage, in stage order. Empty: as even as possible,
  // earlier stages take the remainder.
  std::vector<int> layers_per_stage;
  LayoutKind layout = LayoutKind::kBlockMajorHnd;
  int tokens_per_block = 32;
};

// Absolute token positions [start, end) of a request.
struct TokenRange {
  int64_t start = 0;
  int64_t end = 0;

  int64_t size() const { return end - start; }
  friend bool operator==(const TokenRange&, const TokenRange&) = default;
};

}  // namespace kvbounce

#endif  // KVBOUNCE_MODEL_H_
