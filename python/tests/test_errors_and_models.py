"""The exception hierarchy, model presets, instances and pool shapes."""

import pytest

import kvbounce

CODES = {
    "InvalidArgumentError": ("INVALID_ARGUMENT", ValueError),
    "OutOfRangeError": ("OUT_OF_RANGE", ValueError),
    "ResourceExhaustedError": ("RESOURCE_EXHAUSTED", None),
    "DeadlineExceededError": ("DEADLINE_EXCEEDED", TimeoutError),
    "CancelledError": ("CANCELLED", None),
    "DataLossError": ("DATA_LOSS", None),
    "UnavailableError": ("UNAVAILABLE", None),
    "AbortedError": ("ABORTED", None),
    "FailedPreconditionError": ("FAILED_PRECONDITION", None),
    "NotFoundError": ("NOT_FOUND", LookupError),
    "AlreadyExistsError": ("ALREADY_EXISTS", None),
    "UnimplementedError": ("UNIMPLEMENTED", NotImplementedError),
    "InternalError": ("INTERNAL", None),
}


@pytest.mark.parametrize("name", sorted(CODES))
def test_error_classes(name):
    cls = getattr(kvbounce, name)
    code, builtin = CODES[name]
    assert issubclass(cls, kvbounce.Error) and issubclass(cls, Exception)
    assert cls.code == code and cls.__module__ == "kvbounce"
    if builtin is not None:
        assert issubclass(cls, builtin)
    e = cls("what went wrong")
    assert e.message == "what went wrong" and str(e) == "what went wrong"


def test_presets_match_the_documented_table():
    presets = kvbounce.presets()
    assert list(presets) == ["llama-3.1-8b", "llama-3.1-70b", "mistral-7b", "qwen2.5-7b",
                             "qwen3-235b-a22b", "deepseek-v3", "jamba-v0.1", "nemotron-h-8b",
                             "qwen3-next-80b-a3b"]
    j = presets["jamba-v0.1"]
    assert (j.hybrid, j.layers, j.recurrent_layers, len(j.layer_pattern)) == (True, 4, 28, 32)
    assert j.state_bytes_per_layer == 8192 * (3 + 16) * 2
    assert not presets["mistral-7b"].hybrid and presets["mistral-7b"].layer_pattern == ""
    m = presets["llama-3.1-70b"]
    assert (m.name, m.layers, m.kv_heads, m.head_dim, m.kv_factor, m.mla) == \
        ("llama-3.1-70b", 80, 8, 128, 2, False)
    d = kvbounce.Model.preset("deepseek-v3")
    assert (d.layers, d.kv_heads, d.head_dim, d.kv_factor, d.mla) == (61, 1, 576, 1, True)
    assert kvbounce.Model.preset("qwen2.5-7b") == kvbounce.Model(layers=28, kv_heads=4,
                                                                   head_dim=128)
    assert "llama-3.1-8b" in repr(presets["llama-3.1-8b"])


def test_bad_models_and_instances_name_the_problem():
    with pytest.raises(kvbounce.NotFoundError, match="llama-3.1-8b") as e:
        kvbounce.Model.preset("gpt-5")
    assert isinstance(e.value, LookupError) and "gpt-5" in e.value.message
    with pytest.raises(kvbounce.InvalidArgumentError, match="MLA|mla|kv"):
        kvbounce.Model(layers=4, kv_heads=2, head_dim=64, mla=True)
    with pytest.raises(kvbounce.InvalidArgumentError, match="layers"):
        kvbounce.Model(layers=0, kv_heads=2, head_dim=64)
    with pytest.raises(kvbounce.InvalidArgumentError, match="tp"):
        kvbounce.Instance("llama-3.1-8b", tp=3)
    with pytest.raises(kvbounce.InvalidArgumentError, match="fp64"):
        kvbounce.Instance("llama-3.1-8b", dtype="fp64")
    with pytest.raises(kvbounce.InvalidArgumentError, match="nhd-major"):
        kvbounce.Instance("llama-3.1-8b", layout="nhd-major")
    with pytest.raises(kvbounce.InvalidArgumentError):
        kvbounce.Instance("llama-3.1-8b", pp=2, layers_per_stage=[10, 10])
    with pytest.raises(TypeError):
        kvbounce.Instance(42)


def test_instance_placement():
    inst = kvbounce.Instance("llama-3.1-70b", tp=4, pp=2, layers_per_stage=[30, 50],
                             dtype="fp8", layout="layer-major-nhd", tokens_per_block=16)
    assert (inst.tp, inst.pp, inst.num_ranks, inst.dtype, inst.layout, inst.tokens_per_block,
            inst.element_bytes, inst.layers_per_stage) == \
        (4, 2, 8, "fp8", "layer-major-nhd", 16, 1, [30, 50])
    p = inst.placement(5)
    assert (p["tp_rank"], p["pp_rank"], p["first_layer"], p["num_layers"], p["first_head"],
            p["num_heads"]) == (1, 1, 30, 50, 2, 2)
    with pytest.raises(kvbounce.OutOfRangeError):
        inst.placement(8)
    assert kvbounce.Instance("llama-3.1-8b", pp=2).layers_per_stage == [16, 16]


def test_pool_shapes_follow_the_engines():
    m = kvbounce.Model(layers=6, kv_heads=8, head_dim=64)
    # TensorRT-LLM: [num_blocks, layers, kv, heads, tokens_per_block, head_dim].
    trt = kvbounce.Instance(m, tp=2, tokens_per_block=32)
    assert kvbounce.pool_shape(trt, 10, rank=1) == (10, 6, 2, 4, 32, 64)
    # vLLM: per layer [2, num_blocks, block_size, num_kv_heads, head_dim].
    vllm = kvbounce.Instance(m, tp=4, layout="layer-major-nhd", tokens_per_block=16)
    assert kvbounce.pool_shape(vllm, 10, per_layer=True) == (2, 10, 16, 2, 64)
    assert kvbounce.pool_shape(vllm, 10) == (6, 2, 10, 16, 2, 64)
    hnd = kvbounce.Instance(m, pp=3, layout="layer-major-hnd", tokens_per_block=16)
    assert kvbounce.pool_shape(hnd, 10, rank=2) == (2, 2, 10, 8, 16, 64)
    mla = kvbounce.Instance("deepseek-v3", tp=8, layout="layer-major-nhd", tokens_per_block=64)
    assert kvbounce.pool_shape(mla, 3, per_layer=True) == (1, 3, 64, 1, 576)
    for inst, per_layer in ((trt, False), (vllm, True), (vllm, False), (hnd, False)):
        shape = kvbounce.pool_shape(inst, 1, per_layer=per_layer)
        n = 1
        for s in shape:
            n *= s
        assert inst.block_bytes(0, per_layer) == n * inst.element_bytes
    with pytest.raises(kvbounce.InvalidArgumentError, match="layer-major"):
        kvbounce.pool_shape(trt, 10, per_layer=True)
    with pytest.raises(kvbounce.InvalidArgumentError, match="num_blocks"):
        kvbounce.pool_shape(trt, 0)
