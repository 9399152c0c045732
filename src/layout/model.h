// Model shapes, element types and named presets (DESIGN §2).
//
// A ModelShape is the part of a model's config that decides the size of its KV
// cache: layers, kv heads, head dim and whether K and V are separate (kv
// factor 2) or one latent cache (MLA, kv factor 1). Element types only matter
// through their size: kvbounce moves bytes, it never converts a dtype.
//
// Thread safety: plain values and pure functions; safe from any thread.
#ifndef KVBOUNCE_LAYOUT_MODEL_H_
#define KVBOUNCE_LAYOUT_MODEL_H_

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

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

// The presets of DESIGN §2, in table order.
std::span<const ModelShape> ModelPresets();

// Errors: kNotFound naming the preset and listing the known ones.
Result<ModelShape> FindModelPreset(std::string_view name);

// A shape from explicit numbers. `mla` sets kv factor 1 (and requires one kv
// head). Errors: as ModelShape::Validate.
Result<ModelShape> CustomModel(int num_layers, int num_kv_heads, int head_dim, bool mla);

}  // namespace kvbounce

#endif  // KVBOUNCE_LAYOUT_MODEL_H_
