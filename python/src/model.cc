#include "python/src/model.h"

#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "layout/pool_layout.h"
#include "python/src/errors.h"
#include "tools/plan_command.h"
#include "tools/scenario.h"

namespace kvbounce::python {
namespace py = pybind11;
namespace {

ModelShape ToModel(const py::handle& model) {
  if (py::isinstance<ModelShape>(model)) return model.cast<ModelShape>();
  if (py::isinstance<py::str>(model))
    return ValueOrThrow(FindModelPreset(model.cast<std::string>()));
  throw py::type_error("model must be a kvbounce.Model or a preset name, not " +
                       std::string(py::str(py::type::of(model).attr("__name__"))));
}

Instance MakeInstance(const py::object& model, int tp, int pp, const std::string& dtype,
                      const std::string& layout, int tokens_per_block,
                      const std::optional<std::vector<int>>& layers_per_stage) {
  InstanceSpec spec;
  spec.model = ToModel(model);
  spec.dtype = ValueOrThrow(ParseDType(dtype));
  spec.layout = ValueOrThrow(ParseLayoutKind(layout));
  spec.tp = tp;
  spec.pp = pp;
  spec.tokens_per_block = tokens_per_block;
  if (layers_per_stage) spec.layers_per_stage = *layers_per_stage;
  return Instance(ValueOrThrow(Topology::Create(std::move(spec), "Instance")));
}

// The layout of rank `rank`'s pool of `num_blocks` blocks: one allocation,
// or one per local layer.
PoolLayout RankLayout(const Instance& instance, int rank, int64_t num_blocks, bool per_layer) {
  PoolLayout layout =
      ValueOrThrow(PoolLayout::ForRank(instance.topology(), rank, num_blocks, Addr()));
  if (!per_layer) return layout;
  const int layers = layout.geometry().num_layers;
  return ValueOrThrow(PoolLayout::CreatePerLayer(layout.kind(), layout.geometry(),
                                                 std::vector<Addr>(static_cast<size_t>(layers))));
}

// The shape of one allocation, outer to inner, in the layout's own order of
// dimensions (PoolLayout::order) with the head dim last.
py::tuple PoolShape(const Instance& instance, int64_t num_blocks, int rank, bool per_layer) {
  const PoolLayout layout = RankLayout(instance, rank, num_blocks, per_layer);
  const PoolGeometry& g = layout.geometry();
  std::vector<int64_t> shape;
  for (PoolDim dim : layout.order()) {
    switch (dim) {
      case PoolDim::kLayer:
        if (!per_layer) shape.push_back(g.num_layers);
        break;
      case PoolDim::kKv:
        shape.push_back(g.kv_factor);
        break;
      case PoolDim::kBlock:
        shape.push_back(g.num_blocks);
        break;
      case PoolDim::kHead:
        shape.push_back(g.num_heads);
        break;
      case PoolDim::kToken:
        shape.push_back(g.tokens_per_block);
        break;
    }
  }
  shape.push_back(g.head_dim);
  return py::cast(shape);
}

// "tp=A,pp=B,layout=X,tokens-per-block=T[,layers-per-stage=a/b]": the --ctx /
// --gen text of `kvbounce plan` for one instance.
std::string SideFlag(const InstanceSpec& spec) {
  std::string text = "tp=" + std::to_string(spec.tp) + ",pp=" + std::to_string(spec.pp) +
                     ",layout=" + std::string(LayoutKindName(spec.layout)) +
                     ",tokens-per-block=" + std::to_string(spec.tokens_per_block);
  if (!spec.layers_per_stage.empty()) {
    text += ",layers-per-stage=";
    for (size_t i = 0; i < spec.layers_per_stage.size(); ++i) {
      if (i > 0) text += '/';
      text += std::to_string(spec.layers_per_stage[i]);
    }
  }
  return text;
}

// `kvbounce plan --json` of this scenario, as Python objects. The instances
// become the command's flags, so the checks and the JSON are the command's.
py::object Plan(const Instance& ctx, const Instance& gen, int64_t tokens, int64_t start_token,
                uint64_t seed) {
  ThrowIfError(CheckCompatible(ctx.topology(), gen.topology()));
  tools::ScenarioFlags flags;
  const ModelShape& model = ctx.spec().model;
  Result<ModelShape> preset = FindModelPreset(model.name);
  if (preset.ok() && *preset == model) {
    flags.model = model.name;
  } else {
    flags.layers = model.num_layers;
    flags.kv_heads = model.num_kv_heads;
    flags.head_dim = model.head_dim;
    flags.mla = model.mla();
  }
  flags.dtype = std::string(DTypeName(ctx.spec().dtype));
  flags.tokens = tokens;
  flags.start_token = start_token;
  flags.tokens_per_block = ctx.spec().tokens_per_block;
  flags.layout = std::string(LayoutKindName(ctx.spec().layout));
  flags.ctx = SideFlag(ctx.spec());
  flags.gen = SideFlag(gen.spec());
  flags.seed = seed;
  std::string text;
  Status status;
  {
    py::gil_scoped_release nogil;
    Result<tools::Scenario> scenario = tools::BuildScenario(flags);
    Result<nlohmann::json> plan =
        scenario.ok() ? tools::PlanScenario(*scenario) : Result<nlohmann::json>(scenario.status());
    if (plan.ok()) {
      text = plan->dump();
    } else {
      status = plan.status();
    }
  }
  ThrowIfError(status);
  return py::module_::import("json").attr("loads")(text);
}

py::dict Placement(const Instance& instance, int rank) {
  const RankPlacement p = ValueOrThrow(instance.topology().CheckedPlacement(rank));
  py::dict d;
  d["rank"] = p.rank;
  d["tp_rank"] = p.tp_rank;
  d["pp_rank"] = p.pp_rank;
  d["first_layer"] = p.first_layer;
  d["num_layers"] = p.num_layers;
  d["first_head"] = p.first_head;
  d["num_heads"] = p.num_heads;
  d["head_copies"] = p.head_copies;
  d["copy_index"] = p.copy_index;
  return d;
}

std::string ModelRepr(const ModelShape& m) {
  return "kvbounce.Model(name='" + m.name + "', layers=" + std::to_string(m.num_layers) +
         ", kv_heads=" + std::to_string(m.num_kv_heads) +
         ", head_dim=" + std::to_string(m.head_dim) + (m.mla() ? ", mla=True)" : ")");
}

}  // namespace

void RegisterModel(py::module_& m) {
  py::class_<ModelShape>(m, "Model",
                         "A model's KV shape: a preset (Model.preset(name), kvbounce.presets()) "
                         "or custom numbers (Model(layers, kv_heads, head_dim, mla=False)).")
      .def(py::init([](int layers, int kv_heads, int head_dim, bool mla) {
             return ValueOrThrow(CustomModel(layers, kv_heads, head_dim, mla));
           }),
           py::arg("layers"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("mla") = false)
      .def_static(
          "preset", [](const std::string& name) { return ValueOrThrow(FindModelPreset(name)); },
          py::arg("name"), "The named preset; NotFoundError lists the known ones.")
      .def_property_readonly("name", [](const ModelShape& s) { return s.name; })
      .def_property_readonly("layers", [](const ModelShape& s) { return s.num_layers; })
      .def_property_readonly("kv_heads", [](const ModelShape& s) { return s.num_kv_heads; })
      .def_property_readonly("head_dim", [](const ModelShape& s) { return s.head_dim; })
      .def_property_readonly("kv_factor", [](const ModelShape& s) { return s.kv_factor; })
      .def_property_readonly("mla", [](const ModelShape& s) { return s.mla(); })
      // Hybrid models (docs/hybrid.md): the layer pattern ("" when not
      // hybrid) and the state of one recurrent layer, all ranks' shares.
      .def_property_readonly("hybrid", [](const ModelShape& s) { return s.hybrid(); })
      .def_property_readonly("layer_pattern", [](const ModelShape& s) { return s.layer_pattern; })
      .def_property_readonly("recurrent_layers",
                             [](const ModelShape& s) { return s.recurrent_layers(); })
      .def_property_readonly("state_bytes_per_layer",
                             [](const ModelShape& s) { return s.state_bytes_per_layer(); })
      .def("__eq__", [](const ModelShape& a, const ModelShape& b) { return a == b; })
      .def("__hash__",
           [](const ModelShape& s) {
             return py::hash(py::make_tuple(s.num_layers, s.num_kv_heads, s.head_dim, s.kv_factor));
           })
      .def("__repr__", &ModelRepr);

  m.def(
      "presets",
      [] {
        py::dict out;
        for (const ModelShape& s : ModelPresets()) out[py::str(s.name)] = py::cast(s);
        return out;
      },
      "The model presets by name, in the order of the documentation's table.");

  py::class_<Instance>(m, "Instance",
                       "One ctx or gen instance: model, dtype, TP/PP split, pool layout and block "
                       "size. Checked when built (InvalidArgumentError names the field and rule).")
      .def(py::init(&MakeInstance), py::arg("model"), py::kw_only(), py::arg("tp") = 1,
           py::arg("pp") = 1, py::arg("dtype") = "bf16", py::arg("layout") = "block-major-hnd",
           py::arg("tokens_per_block") = 32, py::arg("layers_per_stage") = py::none())
      .def_property_readonly("model", [](const Instance& i) { return i.spec().model; })
      .def_property_readonly("tp", [](const Instance& i) { return i.spec().tp; })
      .def_property_readonly("pp", [](const Instance& i) { return i.spec().pp; })
      .def_property_readonly(
          "dtype", [](const Instance& i) { return std::string(DTypeName(i.spec().dtype)); })
      .def_property_readonly(
          "layout", [](const Instance& i) { return std::string(LayoutKindName(i.spec().layout)); })
      .def_property_readonly("tokens_per_block",
                             [](const Instance& i) { return i.spec().tokens_per_block; })
      .def_property_readonly("layers_per_stage",
                             [](const Instance& i) { return i.topology().layers_per_stage(); })
      .def_property_readonly("num_ranks",
                             [](const Instance& i) { return i.topology().num_ranks(); })
      .def_property_readonly("element_bytes",
                             [](const Instance& i) { return i.topology().elem_bytes(); })
      .def("placement", &Placement, py::arg("rank"),
           "What rank `rank` holds: its layers and kv heads (global indices).")
      .def(
          "block_bytes",
          [](const Instance& i, int rank, bool per_layer) {
            return RankLayout(i, rank, 1, per_layer).allocation_bytes();
          },
          py::arg("rank") = 0, py::arg("per_layer") = false,
          "Bytes of one block of rank `rank`'s pool (of one layer's allocation with per_layer).")
      .def("__repr__", [](const Instance& i) {
        const InstanceSpec& s = i.spec();
        return "kvbounce.Instance(" + ModelRepr(s.model) + ", tp=" + std::to_string(s.tp) +
               ", pp=" + std::to_string(s.pp) + ", dtype='" + std::string(DTypeName(s.dtype)) +
               "', layout='" + std::string(LayoutKindName(s.layout)) +
               "', tokens_per_block=" + std::to_string(s.tokens_per_block) + ")";
      });

  m.def("pool_shape", &PoolShape, py::arg("instance"), py::arg("num_blocks"), py::arg("rank") = 0,
        py::arg("per_layer") = false,
        "The shape of rank `rank`'s pool of `num_blocks` blocks, in element units, outer to "
        "inner: block-major-hnd (num_blocks, layers, kv, heads, tokens_per_block, head_dim); "
        "layer-major-hnd (layers, kv, num_blocks, heads, tokens_per_block, head_dim); "
        "layer-major-nhd (layers, kv, num_blocks, tokens_per_block, heads, head_dim). With "
        "per_layer (layer-major only) the shape of one layer's tensor, without the layer dim.");
  m.def("plan", &Plan, py::arg("ctx"), py::arg("gen"), py::kw_only(), py::arg("tokens"),
        py::arg("start_token") = 0, py::arg("seed") = 1,
        "The plan of one request from instance `ctx` to instance `gen`, as `kvbounce plan "
        "--json` prints it: {'scenario', 'pairs', 'gen_ranks', 'totals'}.");
}

}  // namespace kvbounce::python
