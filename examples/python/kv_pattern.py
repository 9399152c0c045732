"""What the two example processes agree on: the instances (the prefill
server's and the decode server's parallelism and cache layout), and the KV
values a request holds, so that the decode side can check every element it
received without seeing the prefill side's memory.

A real engine computes K and V in its forward pass; here each element is a
function of (request, global layer, k/v, global kv head, token, element)."""

import torch

import kvbounce

MODEL = kvbounce.Model(layers=8, kv_heads=8, head_dim=64)


def prefill_instance(tp=1):
    # TensorRT-LLM-style pool: [num_blocks, layers, 2, heads, 32 tokens, head_dim].
    return kvbounce.Instance(MODEL, tp=tp, dtype="bf16", layout="block-major-hnd",
                             tokens_per_block=32)


def decode_instance(tp=1):
    # vLLM-style cache: per layer [2, num_blocks, 16 tokens, heads, head_dim].
    return kvbounce.Instance(MODEL, tp=tp, dtype="bf16", layout="layer-major-nhd",
                             tokens_per_block=16)


# Where (layer, kv, block, head, token, dim) sit in pool_shape's axes.
_AXES = {
    "block-major-hnd": (1, 2, 0, 3, 4, 5),
    "layer-major-hnd": (0, 1, 2, 3, 4, 5),
    "layer-major-nhd": (0, 1, 2, 4, 3, 5),
}


def _layer_views(pool, inst):
    """Per local layer, an int16 view of the pool with axes (kv, block, head, token, dim)."""
    axes = _AXES[inst.layout]
    if isinstance(pool, list):
        per_layer = tuple(a - 1 for a in axes[1:])
        return [p.view(torch.int16).permute(per_layer) for p in pool]
    v = pool.view(torch.int16).permute(axes)
    return [v[layer] for layer in range(v.shape[0])]


def _values(inst, rank, request_id, tokens):
    """int16 values of shape (tokens, layers, kv, heads, dim)."""
    p = inst.placement(rank)
    t = tokens.view(-1, 1, 1, 1, 1)
    layer = (p["first_layer"] + torch.arange(p["num_layers"])).view(1, -1, 1, 1, 1)
    kv = torch.arange(inst.model.kv_factor).view(1, 1, -1, 1, 1)
    head = (p["first_head"] + torch.arange(p["num_heads"])).view(1, 1, 1, -1, 1)
    d = torch.arange(inst.model.head_dim).view(1, 1, 1, 1, -1)
    v = request_id * 977 + t * 31 + layer * 7919 + kv * 104729 + head * 131 + d * 17
    return (v % 32749).to(torch.int16)


def _where(inst, blocks, tokens):
    blocks = torch.as_tensor(blocks, dtype=torch.int64)
    return blocks[tokens // inst.tokens_per_block], tokens % inst.tokens_per_block


def write_request(pool, inst, rank, request_id, blocks, num_tokens):
    """The "forward pass": writes tokens [0, num_tokens) of K and V."""
    tokens = torch.arange(num_tokens)
    b, s = _where(inst, blocks, tokens)
    values = _values(inst, rank, request_id, tokens)
    for layer, view in enumerate(_layer_views(pool, inst)):
        view[:, b, :, s, :] = values[:, layer]


def count_mismatches(pool, inst, rank, request_id, blocks, start, end):
    """Elements of tokens [start, end) that differ from what prefill wrote."""
    tokens = torch.arange(start, end)
    b, s = _where(inst, blocks, tokens)
    want = _values(inst, rank, request_id, tokens)
    return sum(int((view[:, b, :, s, :] != want[:, layer]).sum())
               for layer, view in enumerate(_layer_views(pool, inst)))
