"""Shared by the suites: a semantic fill and check of pools, independent of
kvbounce's planner. Every element of a request's KV is a function of (global
layer, k/v, global head, absolute token, element), written into the ctx
pools through each layout's own axes and checked the same way on the gen
side, along with every byte outside the request staying zero."""

import numpy as np

import kvbounce

# Axes of pool_shape in each layout, as positions of (layer, kv, block,
# head, token, dim); the layer axis is absent from a per-layer tensor.
_TO_LOGICAL = {
    "block-major-hnd": (1, 2, 0, 3, 4, 5),
    "layer-major-hnd": (0, 1, 2, 3, 4, 5),
    "layer-major-nhd": (0, 1, 2, 4, 3, 5),
}


def as_numpy_u(pool):
    """A NumPy view of the same memory as unsigned integers of the element's
    width (works for NumPy arrays and CPU torch tensors)."""
    if isinstance(pool, np.ndarray):
        return pool.view(np.dtype(f"u{pool.dtype.itemsize}"))
    import torch
    signed = {1: torch.int8, 2: torch.int16, 4: torch.int32}[pool.element_size()]
    return pool.view(signed).numpy().view(np.dtype(f"u{pool.element_size()}"))


def logical_views(pool, inst):
    """One view per local layer with axes (kv, block, head, token, dim)."""
    if isinstance(pool, list):
        order = _TO_LOGICAL[inst.layout]
        # Without the layer axis: drop it and renumber.
        per_layer = tuple(a - 1 for a in order[1:])
        return [as_numpy_u(p).transpose(per_layer) for p in pool]
    v = as_numpy_u(pool).transpose(_TO_LOGICAL[inst.layout])
    return [v[l] for l in range(v.shape[0])]


def expected(inst, rank, tokens, bits, salt=0):
    """Values of shape (tokens, layers, kv, heads, dim) for `tokens`."""
    p = inst.placement(rank)
    m = inst.model
    t = np.asarray(tokens, dtype=np.int64)[:, None, None, None, None]
    layer = (p["first_layer"] + np.arange(p["num_layers"]))[None, :, None, None, None]
    kv = np.arange(m.kv_factor)[None, None, :, None, None]
    head = (p["first_head"] + np.arange(p["num_heads"]))[None, None, None, :, None]
    d = np.arange(m.head_dim)[None, None, None, None, :]
    v = t * 31 + layer * 7919 + kv * 104729 + head * 131 + d * 17 + salt
    return (v % ((1 << bits) - 5) + 1).astype(np.dtype(f"u{bits // 8}"))


def _index(inst, table, tokens):
    t = np.asarray(tokens, dtype=np.int64)
    tpb = inst.tokens_per_block
    return np.asarray(table, dtype=np.int64)[t // tpb], t % tpb


def fill(pool, inst, rank, table, num_tokens, salt=0):
    """Writes tokens [0, num_tokens) of a request into `pool` at `table`."""
    tokens = np.arange(num_tokens)
    blocks, slots = _index(inst, table, tokens)
    bits = inst.element_bytes * 8
    values = expected(inst, rank, tokens, bits, salt)  # (t, L, K, H, D)
    for l, view in enumerate(logical_views(pool, inst)):
        # view[kv, block, head, token, dim] -> advanced indices first: (t, K, H, D)
        view[:, blocks, :, slots, :] = values[:, l]


def check(pool, inst, rank, table, start, end, salt=0):
    """Asserts tokens [start, end) hold the request's values and every other
    element of the pool is still zero."""
    tokens = np.arange(start, end)
    blocks, slots = _index(inst, table, tokens)
    bits = inst.element_bytes * 8
    want = expected(inst, rank, tokens, bits, salt)
    for l, view in enumerate(logical_views(pool, inst)):
        got = view[:, blocks, :, slots, :]
        if not np.array_equal(got, want[:, l]):
            bad = np.argwhere(got != want[:, l])[0]
            raise AssertionError(f"rank {rank} layer {l}: element (token, kv, head, dim) "
                                 f"{tuple(int(x) for x in bad)} differs")
        rest = view.copy()
        rest[:, blocks, :, slots, :] = 0
        assert not rest.any(), f"rank {rank} layer {l}: bytes outside the request changed"


def block_table(num_tokens, tpb, pool_blocks, seed):
    """Distinct block ids drawn from the pool, as a block manager hands them out."""
    rng = np.random.default_rng(seed)
    n = -(-num_tokens // tpb)
    return rng.permutation(pool_blocks)[:n].astype(np.int32)


class Cluster:
    """Every rank of one ctx and one gen instance as agents of this process,
    on a fabric of their own."""

    def __init__(self, ctx, gen, ctx_pools, gen_pools, config=None, ctx_faults=None,
                 gen_config=None):
        self.ctx, self.gen = ctx, gen
        self.fabric = kvbounce.LoopbackFabric()
        self.ctx_agents = [
            kvbounce.Agent("ctx", ctx, r, pool=p, fabric=self.fabric, config=config,
                           faults=ctx_faults)
            for r, p in enumerate(ctx_pools)
        ]
        self.gen_agents = [
            kvbounce.Agent("gen", gen, r, pool=p, fabric=self.fabric,
                           config=gen_config if gen_config is not None else config)
            for r, p in enumerate(gen_pools)
        ]
        addresses = [a.address for a in self.ctx_agents]
        for g in self.gen_agents:
            g.connect(addresses)

    def close(self):
        for a in self.gen_agents + self.ctx_agents:
            a.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
