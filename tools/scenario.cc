#include "tools/scenario.h"

#include <algorithm>
#include <charconv>
#include <numeric>
#include <random>
#include <set>
#include <string>

#include "tools/resource_limits.h"

namespace kvbounce::tools {
namespace {

Result<int> ParsePositive(std::string_view what, std::string_view text) {
  int value = 0;
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, value);
  if (ec != std::errc() || ptr != end || text.empty()) {
    return InvalidArgumentError(std::string(what) + " = '" + std::string(text) +
                                "' is invalid: must be an integer");
  }
  if (value < 1) {
    return InvalidArgumentError(std::string(what) + " = " + std::to_string(value) +
                                " is invalid: must be >= 1");
  }
  return value;
}

std::string SideText(const Topology& t) {
  const InstanceSpec& s = t.spec();
  std::string out = "tp" + std::to_string(s.tp) + " pp" + std::to_string(s.pp);
  if (s.pp > 1) {
    out += " (";
    for (size_t i = 0; i < t.layers_per_stage().size(); ++i) {
      if (i > 0) out += '/';
      out += std::to_string(t.layers_per_stage()[i]);
    }
    out += " layers)";
  }
  out += " " + std::string(LayoutKindName(s.layout)) + "/" + std::to_string(s.tokens_per_block);
  return out;
}

}  // namespace

Result<SideSpec> ParseSideSpec(std::string_view side, std::string_view text) {
  SideSpec spec;
  std::set<std::string> seen;
  const std::string flag = "--" + std::string(side);
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t comma = text.find(',', pos);
    if (comma == std::string_view::npos) comma = text.size();
    const std::string_view item = text.substr(pos, comma - pos);
    pos = comma + 1;
    if (item.empty()) {
      return InvalidArgumentError(flag + " '" + std::string(text) +
                                  "': empty item (expected key=value pairs separated by commas)");
    }
    const size_t eq = item.find('=');
    if (eq == std::string_view::npos) {
      return InvalidArgumentError(flag + ": '" + std::string(item) + "' is not key=value");
    }
    const std::string key(item.substr(0, eq));
    const std::string_view value = item.substr(eq + 1);
    const std::string what = flag + " " + key;
    if (!seen.insert(key).second) {
      return InvalidArgumentError(flag + ": key '" + key + "' is given twice");
    }
    if (key == "tp") {
      KVB_ASSIGN_OR_RETURN(spec.tp, ParsePositive(what, value));
    } else if (key == "pp") {
      KVB_ASSIGN_OR_RETURN(spec.pp, ParsePositive(what, value));
    } else if (key == "layout") {
      Result<LayoutKind> kind = ParseLayoutKind(value);
      if (!kind.ok()) return kind.status().WithContext(flag);
      spec.layout = *kind;
    } else if (key == "tokens-per-block") {
      KVB_ASSIGN_OR_RETURN(spec.tokens_per_block, ParsePositive(what, value));
    } else if (key == "layers-per-stage") {
      size_t p = 0;
      while (p <= value.size()) {
        size_t slash = value.find('/', p);
        if (slash == std::string_view::npos) slash = value.size();
        KVB_ASSIGN_OR_RETURN(int n, ParsePositive(what, value.substr(p, slash - p)));
        spec.layers_per_stage.push_back(n);
        p = slash + 1;
      }
    } else {
      return InvalidArgumentError(flag + ": unknown key '" + key +
                                  "' (known: tp, pp, layout, tokens-per-block, layers-per-stage)");
    }
  }
  return spec;
}

void ScenarioFlags::Register(CLI::App& app) {
  app.add_option("--model", model, "Model preset (default " + default_model + ")");
  app.add_option("--layers", layers, "Layers of a custom model");
  app.add_option("--kv-heads", kv_heads, "KV heads of a custom model");
  app.add_option("--head-dim", head_dim, "Head dim of a custom model");
  app.add_flag("--mla", mla, "Custom model keeps one MLA latent cache (kv factor 1)");
  app.add_option("--layer-pattern", layer_pattern,
                 "Hybrid custom model: one character per layer, '*' attention, 'M' recurrent, "
                 "'-' neither (--layers may be left out)");
  app.add_option("--state-tensor", state_tensors,
                 "Hybrid custom model: a state tensor of every recurrent layer, "
                 "NAME=DTYPE:UNITSxELEMS[,UNITSxELEMS...] (repeat for each)");
  app.add_option("--state-layout", state_layout,
                 "Hybrid models: state pool layout, slot-major or layer-major")
      ->capture_default_str();
  app.add_option("--dtype", dtype, "Element type: bf16, fp16, fp8, fp32")->capture_default_str();
  app.add_option("--tokens", tokens, "Tokens of the request")->capture_default_str();
  app.add_option("--start-token", start_token,
                 "First token to move (the receiver already holds [0, S))")
      ->capture_default_str();
  app.add_option("--tokens-per-block", tokens_per_block, "Tokens per block, both sides")
      ->capture_default_str();
  app.add_option("--layout", layout,
                 "Pool layout, both sides: block-major-hnd, layer-major-hnd, layer-major-nhd")
      ->capture_default_str();
  app.add_option("--ctx", ctx,
                 "Ctx instance: tp=A,pp=B[,layout=NAME][,tokens-per-block=T]"
                 "[,layers-per-stage=a/b/c]")
      ->capture_default_str();
  app.add_option("--gen", gen, "Gen instance, same keys as --ctx")->capture_default_str();
  // An unsigned option would take "-1" as 2^64 - 1: refuse the sign instead.
  app.add_option("--seed", seed, "Seed of the random block tables")
      ->capture_default_str()
      ->check(CLI::Validator(
          [](std::string& text) {
            return text.find('-') == std::string::npos
                       ? std::string()
                       : "'" + text + "' is invalid: must be an integer >= 0";
          },
          "UINT"));
}

std::vector<std::string> ScenarioFlags::ToArgs() const {
  std::vector<std::string> args;
  const bool explicit_dims = layers != 0 || kv_heads != 0 || head_dim != 0 || mla ||
                             !layer_pattern.empty() || !state_tensors.empty();
  if (explicit_dims) {
    args = {"--kv-heads", std::to_string(kv_heads), "--head-dim", std::to_string(head_dim)};
    if (layers != 0) args.insert(args.end(), {"--layers", std::to_string(layers)});
    if (mla) args.push_back("--mla");
    if (!layer_pattern.empty()) args.insert(args.end(), {"--layer-pattern", layer_pattern});
    for (const std::string& t : state_tensors) args.insert(args.end(), {"--state-tensor", t});
  } else {
    args = {"--model", model.empty() ? default_model : model};
  }
  args.insert(args.end(), {"--state-layout", state_layout});
  const std::vector<std::string> rest = {"--dtype",
                                         dtype,
                                         "--tokens",
                                         std::to_string(tokens),
                                         "--start-token",
                                         std::to_string(start_token),
                                         "--tokens-per-block",
                                         std::to_string(tokens_per_block),
                                         "--layout",
                                         layout,
                                         "--ctx",
                                         ctx,
                                         "--gen",
                                         gen,
                                         "--seed",
                                         std::to_string(seed)};
  args.insert(args.end(), rest.begin(), rest.end());
  return args;
}

Result<StateTensor> ParseStateTensor(std::string_view text) {
  const std::string where = "--state-tensor '" + std::string(text) + "'";
  const size_t eq = text.find('=');
  const size_t colon = text.find(':', eq == std::string_view::npos ? 0 : eq);
  if (eq == std::string_view::npos || eq == 0 || colon == std::string_view::npos) {
    return InvalidArgumentError(where + " is invalid: use NAME=DTYPE:UNITSxELEMS[,UNITSxELEMS...]");
  }
  StateTensor t;
  t.name = std::string(text.substr(0, eq));
  Result<DType> dtype = ParseDType(text.substr(eq + 1, colon - eq - 1));
  if (!dtype.ok()) return dtype.status().WithContext(where);
  t.dtype = *dtype;
  std::string_view rest = text.substr(colon + 1);
  while (!rest.empty()) {
    const size_t comma = rest.find(',');
    const std::string_view seg = rest.substr(0, comma);
    const size_t x = seg.find('x');
    int units = 0, elems = 0;
    auto number = [](std::string_view v, int* out) {
      if (v.empty() || v.size() > 9) return false;
      int n = 0;
      for (char c : v) {
        if (c < '0' || c > '9') return false;
        n = n * 10 + (c - '0');
      }
      *out = n;
      return n >= 1;
    };
    if (x == std::string_view::npos || !number(seg.substr(0, x), &units) ||
        !number(seg.substr(x + 1), &elems)) {
      return InvalidArgumentError(where + ": segment '" + std::string(seg) +
                                  "' is invalid: use UNITSxELEMS with both >= 1");
    }
    t.segments.push_back(StateSegment{units, elems});
    if (comma == std::string_view::npos) break;
    rest = rest.substr(comma + 1);
  }
  if (t.segments.empty()) return InvalidArgumentError(where + " has no segment");
  return t;
}

Result<Scenario> BuildScenario(const ScenarioFlags& flags) {
  const bool hybrid_flags = !flags.layer_pattern.empty() || !flags.state_tensors.empty();
  const bool explicit_dims =
      flags.layers != 0 || flags.kv_heads != 0 || flags.head_dim != 0 || flags.mla || hybrid_flags;
  ModelShape model;
  if (!flags.model.empty() && explicit_dims) {
    return InvalidArgumentError(
        "--model cannot be combined with --layers/--kv-heads/--head-dim/--mla/--layer-pattern/"
        "--state-tensor");
  }
  if (explicit_dims) {
    int layers = flags.layers;
    if (layers == 0 && !flags.layer_pattern.empty()) {
      layers =
          static_cast<int>(std::count(flags.layer_pattern.begin(), flags.layer_pattern.end(), '*'));
    }
    if (layers == 0 || flags.kv_heads == 0 || flags.head_dim == 0) {
      return InvalidArgumentError(
          "a custom model needs all of --layers (or --layer-pattern), --kv-heads and --head-dim");
    }
    KVB_ASSIGN_OR_RETURN(model, CustomModel(layers, flags.kv_heads, flags.head_dim, flags.mla));
    if (hybrid_flags) {
      model.layer_pattern = flags.layer_pattern;
      for (const std::string& text : flags.state_tensors) {
        KVB_ASSIGN_OR_RETURN(StateTensor t, ParseStateTensor(text));
        model.state.push_back(std::move(t));
      }
      Status valid = model.Validate();
      if (!valid.ok()) return valid.WithContext("--layer-pattern / --state-tensor");
    }
  } else {
    KVB_ASSIGN_OR_RETURN(model,
                         FindModelPreset(flags.model.empty() ? flags.default_model : flags.model));
  }
  Result<DType> dtype = ParseDType(flags.dtype);
  if (!dtype.ok()) return dtype.status().WithContext("--dtype");
  Result<LayoutKind> layout = ParseLayoutKind(flags.layout);
  if (!layout.ok()) return layout.status().WithContext("--layout");
  Result<StateLayoutKind> state_layout = ParseStateLayoutKind(flags.state_layout);
  if (!state_layout.ok()) return state_layout.status().WithContext("--state-layout");
  if (flags.tokens_per_block < 1) {
    return InvalidArgumentError("--tokens-per-block = " + std::to_string(flags.tokens_per_block) +
                                " is invalid: must be >= 1");
  }
  if (flags.tokens < 1) {
    return InvalidArgumentError("--tokens = " + std::to_string(flags.tokens) +
                                " is invalid: must be >= 1");
  }
  if (flags.start_token < 0 || flags.start_token >= flags.tokens) {
    return InvalidArgumentError(
        "--start-token = " + std::to_string(flags.start_token) +
        " is invalid: must be in [0, tokens = " + std::to_string(flags.tokens) + ")");
  }
  auto make = [&](std::string_view side, const std::string& text) -> Result<Topology> {
    KVB_ASSIGN_OR_RETURN(SideSpec s, ParseSideSpec(side, text));
    const int cap = flags.max_ranks_per_instance;
    if (static_cast<int64_t>(s.tp) * s.pp > cap) {
      return InvalidArgumentError(
          "--" + std::string(side) + " tp=" + std::to_string(s.tp) + ",pp=" + std::to_string(s.pp) +
          " is invalid: an instance has at most " + std::to_string(cap) +
          " ranks (tp x pp <= " + std::to_string(cap) + ")" +
          (cap < kPlanMaxRanksPerInstance
               ? ": the bench runs every rank as an agent with its own threads in this process"
               : ""));
    }
    const int tpb = s.tokens_per_block.value_or(flags.tokens_per_block);
    // RandomBlockTable and the bench's pools hold twice the table.
    constexpr int64_t kMaxTableBlocks = (kMaxPoolBlocks + 1) / 2;
    if (const int64_t blocks = CeilDiv(flags.tokens, tpb); blocks > kMaxTableBlocks) {
      return InvalidArgumentError("--tokens = " + std::to_string(flags.tokens) +
                                  " is invalid: it needs " + std::to_string(blocks) +
                                  " blocks of " + std::to_string(tpb) + " tokens on the " +
                                  std::string(side) +
                                  " side; block ids are 32-bit and a pool holds twice the table, "
                                  "so a request has at most " +
                                  std::to_string(kMaxTableBlocks) + " blocks");
    }
    InstanceSpec spec;
    spec.model = model;
    spec.dtype = *dtype;
    spec.tp = s.tp;
    spec.pp = s.pp;
    spec.layers_per_stage = s.layers_per_stage;
    spec.layout = s.layout.value_or(*layout);
    spec.tokens_per_block = s.tokens_per_block.value_or(flags.tokens_per_block);
    spec.state_layout = *state_layout;
    return Topology::Create(spec, "--" + std::string(side));
  };
  KVB_ASSIGN_OR_RETURN(Topology ctx, make("ctx", flags.ctx));
  KVB_ASSIGN_OR_RETURN(Topology gen, make("gen", flags.gen));
  KVB_RETURN_IF_ERROR(CheckCompatible(ctx, gen));
  // Every byte count of the request (packed streams, pools, offsets) must fit
  // in 63 bits; the planner and the layouts compute with uint64_t.
  const ModelShape& m = ctx.spec().model;
  uint64_t kv_bytes = SatMul(SatMul(static_cast<uint64_t>(m.num_layers),
                                    static_cast<uint64_t>(m.kv_factor * m.num_kv_heads)),
                             SatMul(static_cast<uint64_t>(flags.tokens),
                                    SatMul(static_cast<uint64_t>(m.head_dim), ctx.elem_bytes())));
  if (kv_bytes > static_cast<uint64_t>(INT64_MAX)) {
    return InvalidArgumentError("--tokens = " + std::to_string(flags.tokens) +
                                " is invalid: the request's KV would be " + HumanBytes(kv_bytes) +
                                ", more than the 2^63 bytes a byte count can hold");
  }
  return Scenario{std::move(ctx), std::move(gen), TokenRange{flags.start_token, flags.tokens},
                  flags.seed, flags.memory_cap_bytes};
}

std::string DescribeScenario(const Scenario& s) {
  const ModelShape& m = s.ctx.spec().model;
  return m.name + " " + std::string(DTypeName(s.ctx.spec().dtype)) + ", tokens [" +
         std::to_string(s.tokens.start) + ", " + std::to_string(s.tokens.end) + "), ctx " +
         SideText(s.ctx) + " -> gen " + SideText(s.gen);
}

std::vector<int32_t> RandomBlockTable(int64_t tokens, int tokens_per_block, uint64_t seed,
                                      int64_t* pool_blocks) {
  const int64_t needed = (tokens + tokens_per_block - 1) / tokens_per_block;
  *pool_blocks = 2 * needed;
  std::vector<int32_t> ids(static_cast<size_t>(*pool_blocks));
  std::iota(ids.begin(), ids.end(), 0);
  // Fisher-Yates with the raw engine: the same table from the same seed with
  // any standard library (std::shuffle's algorithm is not specified).
  std::mt19937_64 rng(seed);
  for (size_t i = ids.size(); i > 1; --i) std::swap(ids[i - 1], ids[rng() % i]);
  ids.resize(static_cast<size_t>(needed));
  return ids;
}

}  // namespace kvbounce::tools
