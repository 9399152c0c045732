#include "layout/topology.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "layout/pool_layout.h"

namespace kvbounce {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

InstanceSpec Spec(const char* preset, int tp, int pp) {
  InstanceSpec spec;
  spec.model = *FindModelPreset(preset);
  spec.tp = tp;
  spec.pp = pp;
  return spec;
}

void ExpectInvalid(const InstanceSpec& spec, const std::string& needle) {
  auto t = Topology::Create(spec, "ctx");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(t.status().message()), HasSubstr(needle));
  EXPECT_THAT(std::string(t.status().message()), HasSubstr("ctx"));
}

TEST(ModelTest, PresetsMatchPublicConfigs) {
  auto m = FindModelPreset("llama-3.1-70b");
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->num_layers, 80);
  EXPECT_EQ(m->num_kv_heads, 8);
  EXPECT_EQ(m->head_dim, 128);
  EXPECT_EQ(m->kv_factor, 2);
  auto ds = FindModelPreset("deepseek-v3");
  ASSERT_TRUE(ds.ok());
  EXPECT_TRUE(ds->mla());
  EXPECT_EQ(ds->head_dim, 576);
  EXPECT_EQ(ModelPresets().size(), 9u);
  for (const ModelShape& p : ModelPresets()) EXPECT_TRUE(p.Validate().ok()) << p.name;
}

TEST(ModelTest, UnknownPresetListsKnownOnes) {
  auto m = FindModelPreset("llama-9");
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), StatusCode::kNotFound);
  EXPECT_THAT(std::string(m.status().message()), HasSubstr("llama-9"));
  EXPECT_THAT(std::string(m.status().message()), HasSubstr("deepseek-v3"));
}

TEST(ModelTest, CustomModelRules) {
  EXPECT_TRUE(CustomModel(4, 2, 64, false).ok());
  EXPECT_TRUE(CustomModel(4, 1, 576, true).ok());
  EXPECT_THAT(std::string(CustomModel(4, 4, 64, true).status().message()), HasSubstr("MLA"));
  EXPECT_THAT(std::string(CustomModel(0, 4, 64, false).status().message()), HasSubstr("layers"));
  EXPECT_THAT(std::string(CustomModel(4, 0, 64, false).status().message()), HasSubstr("kv heads"));
  EXPECT_THAT(std::string(CustomModel(4, 4, -1, false).status().message()), HasSubstr("head dim"));
}

TEST(ModelTest, DTypes) {
  EXPECT_EQ(DTypeBytes(*ParseDType("bf16")), 2u);
  EXPECT_EQ(DTypeBytes(*ParseDType("fp16")), 2u);
  EXPECT_EQ(DTypeBytes(*ParseDType("fp8")), 1u);
  EXPECT_EQ(DTypeBytes(*ParseDType("fp32")), 4u);
  EXPECT_EQ(ParseDType("int4").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseLayoutKind("layer-major-nhd").value(), LayoutKind::kLayerMajorNhd);
  EXPECT_EQ(ParseLayoutKind("nhd").status().code(), StatusCode::kInvalidArgument);
}

TEST(TopologyTest, TpSplitsHeads) {
  auto t = Topology::Create(Spec("llama-3.1-70b", 4, 1));
  ASSERT_TRUE(t.ok());
  const RankPlacement p = t->Placement(3);
  EXPECT_EQ(p.tp_rank, 3);
  EXPECT_EQ(p.first_head, 6);
  EXPECT_EQ(p.num_heads, 2);
  EXPECT_EQ(p.head_copies, 1);
}

TEST(TopologyTest, TpBeyondHeadsDuplicates) {
  auto t = Topology::Create(Spec("qwen2.5-7b", 8, 1));  // 4 kv heads
  ASSERT_TRUE(t.ok());
  for (int r = 0; r < 8; ++r) {
    const RankPlacement p = t->Placement(r);
    EXPECT_EQ(p.first_head, r / 2);
    EXPECT_EQ(p.num_heads, 1);
    EXPECT_EQ(p.head_copies, 2);
    EXPECT_EQ(p.copy_index, r % 2);
  }
}

TEST(TopologyTest, MlaIsReplicatedOnEveryTpRank) {
  auto t = Topology::Create(Spec("deepseek-v3", 8, 1));
  ASSERT_TRUE(t.ok());
  for (int r = 0; r < 8; ++r) {
    EXPECT_EQ(t->Placement(r).first_head, 0);
    EXPECT_EQ(t->Placement(r).head_copies, 8);
  }
}

TEST(TopologyTest, PipelineStagesDefaultAndExplicit) {
  auto even = Topology::Create(Spec("deepseek-v3", 1, 4));  // 61 layers
  ASSERT_TRUE(even.ok());
  EXPECT_THAT(even->layers_per_stage(), ElementsAre(16, 15, 15, 15));
  EXPECT_EQ(even->Placement(2).first_layer, 31);

  InstanceSpec spec = Spec("llama-3.1-8b", 2, 3);
  spec.layers_per_stage = {10, 20, 2};
  auto uneven = Topology::Create(spec);
  ASSERT_TRUE(uneven.ok());
  const RankPlacement p = uneven->Placement(5);  // pp 2, tp 1
  EXPECT_EQ(p.pp_rank, 2);
  EXPECT_EQ(p.tp_rank, 1);
  EXPECT_EQ(p.first_layer, 30);
  EXPECT_EQ(p.num_layers, 2);
}

TEST(TopologyTest, ImpossibleTopologiesAreClearErrors) {
  ExpectInvalid(Spec("llama-3.1-70b", 3, 1), "kv heads = 8 cannot be split over tp = 3");
  ExpectInvalid(Spec("qwen2.5-7b", 6, 1), "tp = 6 cannot duplicate kv heads = 4");
  ExpectInvalid(Spec("llama-3.1-8b", 0, 1), "tp = 0");
  ExpectInvalid(Spec("llama-3.1-8b", 1, 33), "pp = 33 exceeds the model's 32 layers");
  InstanceSpec spec = Spec("llama-3.1-8b", 1, 2);
  spec.layers_per_stage = {10, 20};
  ExpectInvalid(spec, "covers 30 layers");
  spec.layers_per_stage = {32};
  ExpectInvalid(spec, "one per pipeline stage");
  spec.layers_per_stage = {32, 0};
  ExpectInvalid(spec, "at least one layer");
  spec = Spec("llama-3.1-8b", 1, 1);
  spec.tokens_per_block = 0;
  ExpectInvalid(spec, "tokens_per_block = 0");
  spec = Spec("llama-3.1-8b", 1, 1);
  spec.model.head_dim = 0;
  ExpectInvalid(spec, "head dim");
  EXPECT_EQ(Topology::Create(Spec("llama-3.1-8b", 2, 1))->CheckedPlacement(2).status().code(),
            StatusCode::kOutOfRange);
}

TEST(TopologyTest, CompatibilityRejectsDifferentModelsAndElementSizes) {
  auto a = *Topology::Create(Spec("llama-3.1-8b", 1, 1));
  auto b = *Topology::Create(Spec("llama-3.1-70b", 1, 1));
  EXPECT_THAT(std::string(CheckCompatible(a, b).message()), HasSubstr("models differ"));
  InstanceSpec fp32 = Spec("llama-3.1-8b", 1, 1);
  fp32.dtype = DType::kFp32;
  Status s = CheckCompatible(a, *Topology::Create(fp32));
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("element sizes differ"));
  InstanceSpec fp16 = Spec("llama-3.1-8b", 1, 1);
  fp16.dtype = DType::kFp16;
  EXPECT_TRUE(CheckCompatible(a, *Topology::Create(fp16)).ok());  // same size: bytes move as-is
}

TEST(TopologyTest, WritersFanInFanOutAndDuplicates) {
  auto ctx8 = *Topology::Create(Spec("llama-3.1-70b", 8, 1));
  auto gen4 = *Topology::Create(Spec("llama-3.1-70b", 4, 1));
  EXPECT_THAT(Writers(ctx8, gen4, 1), ElementsAre(2, 3));
  EXPECT_THAT(Receivers(gen4, 1, ctx8), ElementsAre(2, 3));  // gen4 as ctx: fan-out
  const Box box = WriterBox(ctx8, 3, gen4, 1);
  EXPECT_EQ(box.first_head, 3);
  EXPECT_EQ(box.num_heads, 1);
  EXPECT_EQ(box.num_layers, 80);

  // qwen2.5-7b: 4 kv heads; ctx TP8 holds two copies of each head. Gen TP4
  // rank g takes head g from copy g % 2.
  auto ctx_dup = *Topology::Create(Spec("qwen2.5-7b", 8, 1));
  auto gen_q = *Topology::Create(Spec("qwen2.5-7b", 4, 1));
  EXPECT_THAT(Writers(ctx_dup, gen_q, 0), ElementsAre(0));
  EXPECT_THAT(Writers(ctx_dup, gen_q, 1), ElementsAre(3));
  EXPECT_THAT(Writers(ctx_dup, gen_q, 2), ElementsAre(4));
  EXPECT_THAT(Writers(ctx_dup, gen_q, 3), ElementsAre(7));

  // MLA: one writer per gen rank, spread over the ctx TP ranks.
  auto ctx_mla = *Topology::Create(Spec("deepseek-v3", 4, 1));
  auto gen_mla = *Topology::Create(Spec("deepseek-v3", 8, 1));
  for (int g = 0; g < 8; ++g) EXPECT_THAT(Writers(ctx_mla, gen_mla, g), ElementsAre(g % 4));

  // Uneven PP on both sides: writers follow the layer overlap.
  InstanceSpec cs = Spec("llama-3.1-8b", 1, 2);
  cs.layers_per_stage = {30, 2};
  InstanceSpec gs = Spec("llama-3.1-8b", 1, 2);
  gs.layers_per_stage = {1, 31};
  auto cpp = *Topology::Create(cs);
  auto gpp = *Topology::Create(gs);
  EXPECT_THAT(Writers(cpp, gpp, 0), ElementsAre(0));
  EXPECT_THAT(Writers(cpp, gpp, 1), ElementsAre(0, 1));
  EXPECT_EQ(WriterBox(cpp, 0, gpp, 1).num_layers, 29);
  EXPECT_EQ(WriterBox(cpp, 1, gpp, 1).num_layers, 2);
}

TEST(PoolLayoutTest, StridesFollowTheNamedLayouts) {
  PoolGeometry g{/*layers=*/3, /*kv=*/2, /*heads=*/4, /*tpb=*/16, /*dim=*/8, /*elem=*/2,
                 /*blocks=*/10};
  const uint64_t row = 16;
  auto bm = *PoolLayout::Create(LayoutKind::kBlockMajorHnd, g, Addr(0));
  EXPECT_EQ(bm.token_stride(), row);
  EXPECT_EQ(bm.head_stride(), 16 * row);
  EXPECT_EQ(bm.kv_stride(), 4 * 16 * row);
  EXPECT_EQ(bm.layer_stride(), 2 * 4 * 16 * row);
  EXPECT_EQ(bm.block_stride(), 3 * 2 * 4 * 16 * row);
  auto nhd = *PoolLayout::Create(LayoutKind::kLayerMajorNhd, g, Addr(0));
  EXPECT_EQ(nhd.head_stride(), row);
  EXPECT_EQ(nhd.token_stride(), 4 * row);
  EXPECT_EQ(nhd.block_stride(), 16 * 4 * row);
  EXPECT_EQ(nhd.kv_stride(), 10 * 16 * 4 * row);
  EXPECT_EQ(nhd.layer_stride(), 2 * 10 * 16 * 4 * row);
  EXPECT_EQ(nhd.pool_bytes(), 3 * 2 * 10 * 16 * 4 * row);
  auto per_layer = PoolLayout::CreatePerLayer(LayoutKind::kLayerMajorHnd, g,
                                              {Addr(1000), Addr(900000), Addr(50)});
  ASSERT_TRUE(per_layer.ok());
  EXPECT_EQ(per_layer->RowAddress(1, 1, 2, 3, 4).value(),
            900000 + 1 * 10 * 4 * 16 * row + 2 * 4 * 16 * row + 3 * 16 * row + 4 * row);
  EXPECT_EQ(PoolLayout::CreatePerLayer(LayoutKind::kBlockMajorHnd, g, {Addr(), Addr(), Addr()})
                .status()
                .code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(PoolLayout::CreatePerLayer(LayoutKind::kLayerMajorHnd, g, {Addr()}).status().code(),
            StatusCode::kInvalidArgument);
  g.num_blocks = 0;
  EXPECT_THAT(
      std::string(PoolLayout::Create(LayoutKind::kLayerMajorHnd, g, Addr()).status().message()),
      HasSubstr("num_blocks = 0"));
  g.num_blocks = int64_t{1} << 60;
  EXPECT_THAT(
      std::string(PoolLayout::Create(LayoutKind::kLayerMajorHnd, g, Addr()).status().message()),
      HasSubstr("too large"));
}

}  // namespace
}  // namespace kvbounce
