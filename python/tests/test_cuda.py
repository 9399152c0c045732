"""CUDA tensors as pools (builds with CUDA, machines with a GPU)."""

import pytest

import kvbounce

# Decided before importing torch, which takes seconds.
if not kvbounce.cuda_available() or kvbounce.cuda_device_count() == 0:
    pytest.skip("needs kvbounce built with CUDA and a CUDA device", allow_module_level=True)
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a torch with CUDA", allow_module_level=True)

from helpers import Cluster, block_table  # noqa: E402

MODEL = kvbounce.Model(layers=4, kv_heads=4, head_dim=64)
TOKENS = 200


@pytest.mark.parametrize("path", ["bounce", "direct", "auto"])
def test_cuda_tensor_pools_over_loopback(path):
    ctx = kvbounce.Instance(MODEL, tp=2, dtype="bf16", tokens_per_block=32)
    gen = kvbounce.Instance(MODEL, tp=1, dtype="bf16", layout="layer-major-nhd",
                            tokens_per_block=16)
    ctx_pools = [kvbounce.allocate_pool(ctx, 8, r, device="cuda") for r in range(2)]
    gen_pools = [kvbounce.allocate_pool(gen, 16, per_layer=True, device="cuda")]
    for r, p in enumerate(ctx_pools):
        g = torch.Generator(device="cuda").manual_seed(r)
        p.view(torch.int16).copy_(torch.randint(-32768, 32767, p.shape, generator=g,
                                                device="cuda", dtype=torch.int16))
    config = {"bounce_size_mb": 16}
    with Cluster(ctx, gen, ctx_pools, gen_pools, config=config) as cluster:
        assert cluster.ctx_agents[0].memory == "cuda"
        ctx_table = block_table(TOKENS, 32, 8, 1).tolist()
        gen_table = block_table(TOKENS, 16, 16, 2).tolist()
        pubs = [a.publish(1, ctx_table, TOKENS) for a in cluster.ctx_agents]
        t = cluster.gen_agents[0].pull(1, "ctx0", gen_table, TOKENS, path=path)
        assert t.wait(30)
        for p in pubs:
            assert p.wait(30)
    # Every token of every layer, kv and head, on the host, element by element.
    tok = torch.arange(TOKENS)
    for layer in range(4):
        got = gen_pools[0][layer].cpu()  # [kv, block, token, head, dim]
        gb = torch.tensor(gen_table)[tok // 16]
        received = got[:, gb, tok % 16]  # (kv, t, heads, dim)
        for r in range(2):
            src = ctx_pools[r].cpu()  # [block, layer, kv, head, token, dim]
            cb = torch.tensor(ctx_table)[tok // 32]
            sent = src[cb, layer, :, :, tok % 32]  # (t, kv, heads, dim)
            assert torch.equal(received[:, :, 2 * r:2 * r + 2].view(torch.int16),
                               sent.permute(1, 0, 2, 3).view(torch.int16))


def test_cuda_tensor_of_the_wrong_device_is_refused():
    pool = kvbounce.allocate_pool(kvbounce.Instance(MODEL), 4, device="cuda")
    with pytest.raises(kvbounce.InvalidArgumentError):
        kvbounce.Agent("ctx", kvbounce.Instance(MODEL), pool=(pool.data_ptr(),
                       pool.numel() * 2, "cuda", kvbounce.cuda_device_count()),
                       fabric=kvbounce.LoopbackFabric())
