"""Pools from tensors, arrays and raw memory: zero-copy, kept alive, and
checked before anything runs."""

import ctypes
import gc
import weakref

import numpy as np
import pytest

import kvbounce

MODEL = kvbounce.Model(layers=4, kv_heads=4, head_dim=16)
INST = kvbounce.Instance(MODEL, tp=2, dtype="bf16", tokens_per_block=8)
NHD = kvbounce.Instance(MODEL, tp=1, dtype="fp16", layout="layer-major-nhd", tokens_per_block=8)


def agent(pool, inst=INST, role="ctx", **kw):
    return kvbounce.Agent(role, inst, 0, pool=pool, fabric=kvbounce.LoopbackFabric(), **kw)


def test_allocate_pool_shapes_and_dtypes():
    torch = pytest.importorskip("torch")
    t = kvbounce.allocate_pool(INST, 5)
    assert t.shape == (5, 4, 2, 2, 8, 16) and t.dtype == torch.bfloat16 and t.is_contiguous()
    a = kvbounce.allocate_pool(INST, 5, backend="numpy")
    assert a.shape == (5, 4, 2, 2, 8, 16) and a.dtype == np.uint16  # NumPy has no bfloat16
    layers = kvbounce.allocate_pool(NHD, 5, per_layer=True, backend="numpy")
    assert len(layers) == 4 and all(x.shape == (2, 5, 8, 4, 16) for x in layers)
    fp8 = kvbounce.Instance(MODEL, dtype="fp8")
    assert kvbounce.allocate_pool(fp8, 1, backend="numpy").dtype == np.uint8
    with pytest.raises(kvbounce.InvalidArgumentError, match="backend"):
        kvbounce.allocate_pool(INST, 1, backend="jax")


def test_wrong_dtype_is_refused():
    torch = pytest.importorskip("torch")
    with pytest.raises(kvbounce.InvalidArgumentError, match=r"torch.float32.*bf16"):
        agent(torch.zeros(kvbounce.pool_shape(INST, 4), dtype=torch.float32))
    with pytest.raises(kvbounce.InvalidArgumentError, match=r"float32.*fp16"):
        agent(np.zeros(kvbounce.pool_shape(NHD, 4), np.float32), NHD)


def test_wrong_size_is_refused_with_the_expected_shape():
    torch = pytest.importorskip("torch")
    with pytest.raises(kvbounce.InvalidArgumentError, match=r"not a whole number of blocks") as e:
        agent(torch.zeros(1000, dtype=torch.bfloat16))
    assert "pool_shape" in e.value.message and "(1, 4, 2, 2, 8, 16)" in e.value.message
    with pytest.raises(kvbounce.InvalidArgumentError, match="whole number"):
        agent(torch.zeros(0, dtype=torch.bfloat16))
    with pytest.raises(kvbounce.InvalidArgumentError, match="num_blocks = 3"):
        agent(kvbounce.allocate_pool(INST, 4), num_blocks=3)


def test_non_contiguous_is_refused():
    torch = pytest.importorskip("torch")
    t = kvbounce.allocate_pool(INST, 4).transpose(0, 1)
    with pytest.raises(kvbounce.InvalidArgumentError, match="not contiguous"):
        agent(t)
    a = np.zeros((8,) + kvbounce.pool_shape(NHD, 4), np.float16)[::2]
    with pytest.raises(kvbounce.InvalidArgumentError, match="not C-contiguous"):
        agent(a, NHD)


def test_device_and_memory_kind_checks():
    torch = pytest.importorskip("torch")
    with pytest.raises(kvbounce.InvalidArgumentError, match="device 'meta'"):
        agent(torch.zeros(kvbounce.pool_shape(INST, 4), dtype=torch.bfloat16, device="meta"))
    buf = ctypes.create_string_buffer(INST.block_bytes() * 4)
    raw = (ctypes.addressof(buf), len(buf), "cuda")
    if kvbounce.cuda_available():
        # The library checks the address is device memory: this one is not.
        with pytest.raises(kvbounce.Error):
            agent(raw)
    else:
        with pytest.raises(kvbounce.UnimplementedError, match="CUDA"):
            agent(raw)
    with pytest.raises(kvbounce.InvalidArgumentError, match="memory kind"):
        agent((ctypes.addressof(buf), len(buf), "disk"))
    with pytest.raises(kvbounce.InvalidArgumentError, match="null"):
        agent((0, len(buf), "host"))
    with pytest.raises(TypeError, match="torch tensor, a NumPy array"):
        agent("a pool")


def test_read_only_array_is_refused_for_a_gen_rank():
    a = kvbounce.allocate_pool(NHD, 4, backend="numpy")
    a.flags.writeable = False
    with pytest.raises(kvbounce.InvalidArgumentError, match="read-only"):
        agent(a, NHD, role="gen")
    agent(a, NHD, role="ctx").close()  # a ctx rank only reads its pool


def test_per_layer_pools():
    layers = kvbounce.allocate_pool(NHD, 4, per_layer=True, backend="numpy")
    with agent(layers, NHD) as a:
        assert a.num_blocks == 4
    with pytest.raises(kvbounce.InvalidArgumentError, match="3 per-layer"):
        agent(layers[:3], NHD)
    with pytest.raises(kvbounce.InvalidArgumentError, match="holds 3 blocks"):
        agent(layers[:3] + [kvbounce.allocate_pool(NHD, 3, per_layer=True,
                                                   backend="numpy")[0]], NHD)
    with pytest.raises(kvbounce.InvalidArgumentError, match="layer-major"):
        agent([kvbounce.allocate_pool(INST, 4)] * 4)


def test_raw_pool():
    buf = ctypes.create_string_buffer(INST.block_bytes() * 6)
    with agent((ctypes.addressof(buf), len(buf), "host")) as a:
        assert a.num_blocks == 6 and a.memory == "host"


def test_pool_is_kept_alive_until_close():
    torch = pytest.importorskip("torch")
    t = kvbounce.allocate_pool(INST, 4)
    ref = weakref.ref(t)
    a = agent(t)
    del t
    gc.collect()
    assert ref() is not None
    a.close()
    gc.collect()
    assert ref() is None
