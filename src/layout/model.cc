#include "kvbounce/model.h"

#include <algorithm>
#include <array>
#include <string>
#include <utility>
#include <vector>

namespace kvbounce {
namespace {

// Hybrid presets (docs/hybrid.md): layer patterns and state shapes from
// the models' published configurations; state kept in the model dtype.
ModelShape Hybrid(std::string name, std::string pattern, int kv_heads, int head_dim,
                  std::vector<StateTensor> state) {
  ModelShape m;
  m.name = std::move(name);
  m.num_layers = static_cast<int>(std::count(pattern.begin(), pattern.end(), '*'));
  m.num_kv_heads = kv_heads;
  m.head_dim = head_dim;
  m.kv_factor = 2;
  m.layer_pattern = std::move(pattern);
  m.state = std::move(state);
  return m;
}

std::vector<ModelShape> BuildPresets() {
  std::vector<ModelShape> presets = {
      {"llama-3.1-8b", 32, 8, 128, 2, {}, {}},
      {"llama-3.1-70b", 80, 8, 128, 2, {}, {}},
      {"mistral-7b", 32, 8, 128, 2, {}, {}},
      {"qwen2.5-7b", 28, 4, 128, 2, {}, {}},
      {"qwen3-235b-a22b", 94, 4, 128, 2, {}, {}},
      // MLA: 512 latent + 64 rope dims in one cache, the same on every TP rank.
      {"deepseek-v3", 61, 1, 576, 1, {}, {}},
  };
  // Jamba v0.1: 32 layers, attention every 8th from layer 4; Mamba-1 with
  // d_inner = 2 * 4096 channels, d_conv 4 (3 kept), d_state 16.
  presets.push_back(
      Hybrid("jamba-v0.1", PeriodicLayerPattern(32, 8, 4).value(), 8, 128,
             {{"conv", DType::kBf16, {{8192, 3}}}, {"ssm", DType::kBf16, {{8192, 16}}}}));
  // Nemotron-H 8B: its hybrid_override_pattern (M Mamba-2, * attention,
  // - MLP); 128 Mamba heads of dim 64, 8 groups, d_state 128, d_conv 4. The
  // convolution runs over x (per head), B and C (per group), each split by
  // TP.
  presets.push_back(Hybrid("nemotron-h-8b", "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
                           8, 128,
                           {{"conv", DType::kBf16, {{128, 64 * 3}, {8, 128 * 3}, {8, 128 * 3}}},
                            {"ssm", DType::kBf16, {{128, 64 * 128}}}}));
  // Qwen3-Next 80B-A3B: 48 layers, full attention every 4th (the others
  // Gated DeltaNet); 16 key heads and 32 value heads of dim 128, conv
  // kernel 4 over q, k (per key head) and v (per value head); recurrent
  // state per value head 128 x 128.
  presets.push_back(Hybrid("qwen3-next-80b-a3b", PeriodicLayerPattern(48, 4, 3).value(), 2, 256,
                           {{"conv", DType::kBf16, {{16, 128 * 3}, {16, 128 * 3}, {32, 128 * 3}}},
                            {"recurrent", DType::kBf16, {{32, 128 * 128}}}}));
  return presets;
}

const std::vector<ModelShape>& Presets() {
  static const std::vector<ModelShape> presets = BuildPresets();
  return presets;
}

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
  return ValidateHybrid(prefix);
}

Status ModelShape::ValidateHybrid(const std::string& prefix) const {
  if (layer_pattern.empty()) {
    if (!state.empty()) {
      return InvalidArgumentError(prefix +
                                  "state tensors given without a layer pattern: only a "
                                  "hybrid model's recurrent ('M') layers hold state");
    }
    return Status::Ok();
  }
  if (layer_pattern.size() > static_cast<size_t>(kMaxModelLayers)) {
    return InvalidArgumentError(prefix + "layer pattern has " +
                                std::to_string(layer_pattern.size()) + " layers: at most " +
                                std::to_string(kMaxModelLayers));
  }
  for (size_t i = 0; i < layer_pattern.size(); ++i) {
    const char c = layer_pattern[i];
    if (c != '*' && c != 'M' && c != '-') {
      return InvalidArgumentError(prefix + "layer pattern '" + layer_pattern + "': layer " +
                                  std::to_string(i) + " is '" + std::string(1, c) +
                                  "': use '*' (attention), 'M' (recurrent) or '-' (neither)");
    }
  }
  const int attention =
      static_cast<int>(std::count(layer_pattern.begin(), layer_pattern.end(), '*'));
  if (attention != num_layers) {
    return InvalidArgumentError(
        prefix + "layer pattern has " + std::to_string(attention) +
        " attention ('*') layers but layers = " + std::to_string(num_layers) +
        ": the attention layers are the layers that hold KV");
  }
  const int recurrent = recurrent_layers();
  if (recurrent == 0 && !state.empty()) {
    return InvalidArgumentError(prefix +
                                "state tensors given but the layer pattern has no "
                                "recurrent ('M') layer");
  }
  if (recurrent > 0 && state.empty()) {
    return InvalidArgumentError(prefix + "the layer pattern has " + std::to_string(recurrent) +
                                " recurrent ('M') layers but no state tensor is described");
  }
  if (state.size() > static_cast<size_t>(kMaxStateTensors)) {
    return InvalidArgumentError(prefix + std::to_string(state.size()) + " state tensors: at most " +
                                std::to_string(kMaxStateTensors));
  }
  for (const StateTensor& t : state) {
    const std::string where = prefix + "state tensor '" + t.name + "': ";
    if (DTypeBytes(t.dtype) == 0) {
      return InvalidArgumentError(where + "dtype = " + std::to_string(static_cast<int>(t.dtype)) +
                                  " is not a DType: use bf16, fp16, fp8 or fp32");
    }
    if (t.segments.empty() || t.segments.size() > static_cast<size_t>(kMaxStateSegments)) {
      return InvalidArgumentError(where + "has " + std::to_string(t.segments.size()) +
                                  " segments: must have 1 to " + std::to_string(kMaxStateSegments));
    }
    uint64_t bytes = 0;
    for (size_t i = 0; i < t.segments.size(); ++i) {
      const StateSegment& g = t.segments[i];
      if (g.units < 1 || g.unit_elems < 1) {
        return InvalidArgumentError(
            where + "segment " + std::to_string(i) + " has units = " + std::to_string(g.units) +
            ", unit_elems = " + std::to_string(g.unit_elems) + ": both must be >= 1");
      }
      // int x int stays below 2^62; bounded before it is scaled and summed.
      const uint64_t elems = static_cast<uint64_t>(g.units) * static_cast<uint64_t>(g.unit_elems);
      if (elems <= (uint64_t{1} << 40)) bytes += elems * DTypeBytes(t.dtype);
      if (elems > (uint64_t{1} << 40) || bytes > (uint64_t{1} << 40)) {
        return InvalidArgumentError(where + "is larger than 1 TiB per layer and request");
      }
    }
  }
  return Status::Ok();
}

int ModelShape::total_layers() const {
  return layer_pattern.empty() ? num_layers : static_cast<int>(layer_pattern.size());
}

int ModelShape::recurrent_layers() const {
  return static_cast<int>(std::count(layer_pattern.begin(), layer_pattern.end(), 'M'));
}

uint64_t ModelShape::state_bytes_per_layer() const {
  uint64_t bytes = 0;
  for (const StateTensor& t : state) {
    for (const StateSegment& g : t.segments) {
      bytes += static_cast<uint64_t>(g.units) * static_cast<uint64_t>(g.unit_elems) *
               DTypeBytes(t.dtype);
    }
  }
  return bytes;
}

Result<std::string> PeriodicLayerPattern(int layers, int period, int offset) {
  if (layers < 1 || layers > ModelShape::kMaxModelLayers || period < 1 || offset < 0 ||
      offset >= period) {
    return InvalidArgumentError(
        "layer pattern of " + std::to_string(layers) + " layers with attention every " +
        std::to_string(period) + " from layer " + std::to_string(offset) +
        " is invalid: need 1 <= layers <= " + std::to_string(ModelShape::kMaxModelLayers) +
        ", period >= 1 and 0 <= offset < period");
  }
  std::string pattern(static_cast<size_t>(layers), 'M');
  for (int i = offset; i < layers; i += period) pattern[static_cast<size_t>(i)] = '*';
  return pattern;
}

std::string_view StateLayoutKindName(StateLayoutKind kind) {
  switch (kind) {
    case StateLayoutKind::kSlotMajor:
      return "slot-major";
    case StateLayoutKind::kLayerMajor:
      return "layer-major";
  }
  return "?";
}

Result<StateLayoutKind> ParseStateLayoutKind(std::string_view name) {
  for (StateLayoutKind k : {StateLayoutKind::kSlotMajor, StateLayoutKind::kLayerMajor}) {
    if (name == StateLayoutKindName(k)) return k;
  }
  return InvalidArgumentError("state layout '" + std::string(name) +
                              "' is not known: use slot-major or layer-major");
}

std::span<const ModelShape> ModelPresets() { return Presets(); }

Result<ModelShape> FindModelPreset(std::string_view name) {
  std::string known;
  for (const ModelShape& m : Presets()) {
    if (m.name == name) return m;
    if (!known.empty()) known += ", ";
    known += m.name;
  }
  return NotFoundError("model preset '" + std::string(name) + "' is not known (known: " + known +
                       ")");
}

Result<ModelShape> CustomModel(int num_layers, int num_kv_heads, int head_dim, bool mla) {
  ModelShape shape{"custom", num_layers, num_kv_heads, head_dim, mla ? 1 : 2, {}, {}};
  KVB_RETURN_IF_ERROR(shape.Validate());
  return shape;
}

}  // namespace kvbounce
