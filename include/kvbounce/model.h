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

// Hybrid models (docs/hybrid.md): a part of one recurrent layer's state
// tensor that tensor parallelism splits like kv heads — `units` (heads,
// groups or channels) of `unit_elems` contiguous elements each. With units
// >= tp each TP rank holds units / tp of them (units must divide by tp);
// with units < tp, tp / units ranks hold each unit (tp must divide by
// units), and of those copies one writes it, as for kv heads.
struct StateSegment {
  int units = 0;
  int unit_elems = 0;
  friend bool operator==(const StateSegment&, const StateSegment&) = default;
};

// One state tensor of a recurrent layer (a Mamba layer's convolution state
// or SSM state, a linear-attention layer's recurrent state): its segments
// in order, channel-major. A rank holds, per segment, its share of the
// units, the segments' shares packed one after another.
struct StateTensor {
  std::string name;  // "conv", "ssm": for messages and reports
  DType dtype = DType::kBf16;
  std::vector<StateSegment> segments;
  friend bool operator==(const StateTensor& a, const StateTensor& b) {
    return a.dtype == b.dtype && a.segments == b.segments;
  }
};

struct ModelShape {
  std::string name;  // preset name, or "custom"
  // Attention layers: the layers that hold KV (all layers of a model that
  // is not hybrid).
  int num_layers = 0;
  int num_kv_heads = 0;  // global kv heads; 1 for MLA
  int head_dim = 0;      // elements per head and token
  int kv_factor = 2;     // 2: separate K and V; 1: MLA latent cache
  // Hybrid models: one character per model layer, in order — '*' attention
  // (holds KV), 'M' recurrent (holds state), '-' neither (MLP, MoE). Empty:
  // every layer is an attention layer. Pipeline stages split the model's
  // layers (all of the pattern's).
  std::string layer_pattern;
  // The state tensors every recurrent layer holds; empty unless the
  // pattern has an 'M'.
  std::vector<StateTensor> state;

  bool mla() const { return kv_factor == 1; }
  bool hybrid() const { return !layer_pattern.empty(); }
  // The model's layers: the pattern's length, or num_layers.
  int total_layers() const;
  // The recurrent ('M') layers of the pattern.
  int recurrent_layers() const;
  // Bytes of one recurrent layer's state of one request, all TP ranks'
  // shares together (duplicated units counted once).
  uint64_t state_bytes_per_layer() const;

  // Errors (kInvalidArgument): a non-positive field, a kv factor other than 1
  // or 2, or MLA with more than one kv head; a pattern with another
  // character than '*', 'M' or '-', whose '*' count is not num_layers, or
  // longer than kMaxModelLayers; state without an 'M' in the pattern or an
  // 'M' without state; a state tensor without segments or with more than
  // kMaxStateSegments, more than kMaxStateTensors tensors, a non-positive
  // segment field, or a tensor whose bytes per request overflow.
  Status Validate() const;

  static constexpr int kMaxModelLayers = 4096;
  static constexpr int kMaxStateTensors = 8;
  static constexpr int kMaxStateSegments = 8;

 private:
  Status ValidateHybrid(const std::string& prefix) const;

 public:
  friend bool operator==(const ModelShape& a, const ModelShape& b) {
    return a.num_layers == b.num_layers && a.num_kv_heads == b.num_kv_heads &&
           a.head_dim == b.head_dim && a.kv_factor == b.kv_factor &&
           a.layer_pattern == b.layer_pattern && a.state == b.state;
  }
};

// The presets of docs/architecture.md §2, in table order.
std::span<const ModelShape> ModelPresets();

// Errors: kNotFound naming the preset and listing the known ones.
Result<ModelShape> FindModelPreset(std::string_view name);

// A shape from explicit numbers. `mla` sets kv factor 1 (and requires one kv
// head). Errors: as ModelShape::Validate.
Result<ModelShape> CustomModel(int num_layers, int num_kv_heads, int head_dim, bool mla);

// Hybrid models: a layer pattern from a period — every `period`-th layer,
// starting at layer `offset`, is attention, the others recurrent (Jamba's
// attn_layer_period / attn_layer_offset, Qwen3-Next's
// full_attention_interval with offset interval - 1).
// Errors: kInvalidArgument for layers < 1, period < 1 or offset outside
// [0, period).
Result<std::string> PeriodicLayerPattern(int layers, int period, int offset);

// The named pool layouts of docs/architecture.md §2 (outer to inner dimension):
//   kBlockMajorHnd  [block][layer][kv][head][token][dim]   (TensorRT-LLM)
//   kLayerMajorHnd  per layer [kv][block][head][token][dim]
//   kLayerMajorNhd  per layer [kv][block][token][head][dim] (vLLM)
enum class LayoutKind : uint8_t { kBlockMajorHnd = 0, kLayerMajorHnd = 1, kLayerMajorNhd = 2 };

// "block-major-hnd", "layer-major-hnd", "layer-major-nhd".
std::string_view LayoutKindName(LayoutKind kind);
// Errors: kInvalidArgument naming the text and the known names.
Result<LayoutKind> ParseLayoutKind(std::string_view name);

// The layouts of a rank's recurrent-state pool (hybrid models; outer to
// inner, each tensor's local share innermost and contiguous):
//   kSlotMajor   [slot][layer][tensor][share]    (one slot holds a request's state)
//   kLayerMajor  per layer [tensor][slot][share] (a tensor per layer and
//                state kind, as vLLM keeps its Mamba caches)
enum class StateLayoutKind : uint8_t { kSlotMajor = 0, kLayerMajor = 1 };

// "slot-major", "layer-major".
std::string_view StateLayoutKindName(StateLayoutKind kind);
// Errors: kInvalidArgument naming the text and the known names.
Result<StateLayoutKind> ParseStateLayoutKind(std::string_view name);

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
  // Hybrid models: the layout of every rank's state pool.
  StateLayoutKind state_layout = StateLayoutKind::kSlotMajor;
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
