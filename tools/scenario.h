// The model / topology / token flags that `kvbounce plan` and `kvbounce bench`
// share, and the Scenario they describe: a ctx instance, a gen instance and
// the token range of a request.
//
//   --model PRESET | --layers N --kv-heads H --head-dim D [--mla]
//   --dtype bf16|fp16|fp8|fp32          --tokens N   --start-token S
//   --tokens-per-block T  --layout NAME  (defaults for both sides)
//   --ctx tp=A,pp=B[,layout=NAME][,tokens-per-block=T][,layers-per-stage=a/b/c]
//   --gen (same keys)
//   --seed N
#ifndef KVBOUNCE_TOOLS_SCENARIO_H_
#define KVBOUNCE_TOOLS_SCENARIO_H_

#include <CLI/CLI.hpp>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "kvbounce/status.h"
#include "layout/planner.h"
#include "layout/topology.h"

namespace kvbounce::tools {

// One side's --ctx / --gen text, parsed. Unset fields take the shared default.
struct SideSpec {
  int tp = 1;
  int pp = 1;
  std::optional<LayoutKind> layout;
  std::optional<int> tokens_per_block;
  std::vector<int> layers_per_stage;
};

// Parses "tp=8,pp=1,layout=layer-major-nhd,tokens-per-block=16,
// layers-per-stage=40/40". Errors (kInvalidArgument) name the side, the key
// and the value: unknown keys, repeated keys, non-integers, values < 1.
Result<SideSpec> ParseSideSpec(std::string_view side, std::string_view text);

// The flags as given on the command line.
struct ScenarioFlags {
  std::string model;  // empty: --layers/--kv-heads/--head-dim, or the default
  int layers = 0;
  int kv_heads = 0;
  int head_dim = 0;
  bool mla = false;
  // Hybrid models (docs/hybrid.md), custom: the layer pattern ('*'
  // attention, 'M' recurrent, '-' neither; --layers may then be left out:
  // the pattern's '*' count) and the recurrent layers' state tensors, each
  // "NAME=DTYPE:UNITSxELEMS[,UNITSxELEMS...]" (segments split by TP like kv
  // heads). A preset's state layout may be chosen too.
  std::string layer_pattern;
  std::vector<std::string> state_tensors;
  std::string state_layout = "slot-major";
  std::string dtype = "bf16";
  int64_t tokens = 8192;
  int64_t start_token = 0;
  int tokens_per_block = 32;
  std::string layout = "block-major-hnd";
  std::string ctx = "tp=8,pp=1";
  std::string gen = "tp=4,pp=1";
  uint64_t seed = 1;
  // The preset used when neither --model nor explicit dimensions are given.
  std::string default_model = "llama-3.1-70b";
  // Ranks (tp × pp) an instance may have (see tools/resource_limits.h).
  int max_ranks_per_instance = 1024;
  // The memory a run may need; 0: the machine's physical memory. Not a flag
  // (tests set it).
  uint64_t memory_cap_bytes = 0;

  // Registers every flag above on `app`.
  void Register(CLI::App& app);
  // The flags that describe the same scenario to another process (every
  // value explicit, so the other side's defaults do not matter).
  std::vector<std::string> ToArgs() const;
};

struct Scenario {
  Topology ctx;
  Topology gen;
  TokenRange tokens;
  uint64_t seed = 1;
  uint64_t memory_cap_bytes = 0;  // ScenarioFlags::memory_cap_bytes
};

// Validates the flags into a scenario. Errors (kInvalidArgument / kNotFound)
// name the flag: --model together with explicit dimensions, an incomplete
// set of dimensions, an unknown preset / dtype / layout, tokens < 1, a start
// token outside [0, tokens), a bad --ctx/--gen, more ranks than
// max_ranks_per_instance, a request of more blocks than 32-bit block ids can
// name (its pool holds twice the table: at most 2^30 blocks), an impossible
// topology, or ctx and gen that cannot exchange KV.
Result<Scenario> BuildScenario(const ScenarioFlags& flags);

// Parses one --state-tensor value, "conv=bf16:8192x3" or
// "conv=bf16:128x192,8x384,8x384". Errors (kInvalidArgument) name the flag
// and what is wrong.
Result<StateTensor> ParseStateTensor(std::string_view text);

// One line: "llama-3.1-70b bf16, tokens [0, 8192), ctx tp8 pp1 block-major-hnd/32 ->
// gen tp4 pp1 block-major-hnd/32".
std::string DescribeScenario(const Scenario& scenario);

// A block table for a request of `tokens` tokens in a pool of `tokens_per_block`
// blocks: distinct ids drawn at random (from `seed`) from a pool twice the size
// needed, the way a serving engine's block manager hands out free blocks.
// Returns the table; `pool_blocks` receives the pool size.
std::vector<int32_t> RandomBlockTable(int64_t tokens, int tokens_per_block, uint64_t seed,
                                      int64_t* pool_blocks);

}  // namespace kvbounce::tools

#endif  // KVBOUNCE_TOOLS_SCENARIO_H_
