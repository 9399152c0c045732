"""Agents over loopback: transfers between NumPy and torch pools on every
path, verified element by element, and the calls that must fail."""

import threading

import numpy as np
import pytest

import kvbounce
from helpers import Cluster, block_table, check, fill

TOKENS = 100
MODEL = kvbounce.Model(layers=4, kv_heads=4, head_dim=16)
CONFIG = {"bounce_size_mb": 4, "transfer_timeout_ms": 20000}


def numpy_cluster(path_config=CONFIG, ctx_faults=None, gen_layout="layer-major-nhd"):
    ctx = kvbounce.Instance(MODEL, tp=2, dtype="fp16", tokens_per_block=16)
    gen = kvbounce.Instance(MODEL, tp=1, dtype="fp16", layout=gen_layout, tokens_per_block=8)
    ctx_pools = [kvbounce.allocate_pool(ctx, 16, r, backend="numpy") for r in range(2)]
    gen_pools = [kvbounce.allocate_pool(gen, 32, 0, backend="numpy")]
    return Cluster(ctx, gen, ctx_pools, gen_pools, config=path_config, ctx_faults=ctx_faults), \
        ctx_pools, gen_pools


def move(cluster, ctx_pools, gen_pools, request_id, tokens=(0, TOKENS), path=None, salt=0):
    """Publishes request_id on every ctx rank, pulls it on every gen rank,
    waits for both sides and checks the gen pools."""
    ctx, gen = cluster.ctx, cluster.gen
    ctx_table = block_table(TOKENS, ctx.tokens_per_block, cluster.ctx_agents[0].num_blocks,
                            request_id)
    gen_table = block_table(TOKENS, gen.tokens_per_block, cluster.gen_agents[0].num_blocks,
                            request_id + 1000)
    for pool in gen_pools:
        for p in (pool if isinstance(pool, list) else [pool]):
            p.fill(0) if isinstance(p, np.ndarray) else p.zero_()
    published = []
    for r, (agent, pool) in enumerate(zip(cluster.ctx_agents, ctx_pools)):
        fill(pool, ctx, r, ctx_table, TOKENS, salt)
        published.append(agent.publish(request_id, ctx_table, TOKENS))
    pulls = [g.pull(request_id, "ctx0", gen_table, tokens, path=path) for g in cluster.gen_agents]
    for t in pulls:
        assert t.wait(timeout=30)
    for t in published:
        assert t.wait(timeout=30)
    for r, pool in enumerate(gen_pools):
        check(pool, gen, r, gen_table, tokens[0], tokens[1], salt)
    return pulls


@pytest.mark.parametrize("path", ["per-block", "bounce", "direct", "auto"])
def test_numpy_pools_every_path(path):
    cluster, ctx_pools, gen_pools = numpy_cluster()
    with cluster:
        pulls = move(cluster, ctx_pools, gen_pools, 7, path=path)
        info = pulls[0].info()
        assert info["request_id"] == 7 and info["bytes"] > 0 and info["writers"] == 2
        if path != "auto":
            assert info["path_taken"] == path
        # A second request, a token range the receiver does not yet hold.
        move(cluster, ctx_pools, gen_pools, 8, tokens=(40, TOKENS), path=path, salt=3)
        stats = cluster.gen_agents[0].stats()
        assert stats["requests_completed"] == 2 and stats["arena_outstanding_bytes"] == 0
        assert isinstance(stats["detail"], dict)


@pytest.mark.parametrize("path", ["per-block", "bounce", "direct"])
def test_torch_pools_trtllm_to_vllm(path):
    torch = pytest.importorskip("torch")
    # TensorRT-LLM's block-major pool on the ctx side, vLLM's per-layer
    # [2, num_blocks, block_size, heads, head_dim] tensors on the gen side.
    ctx = kvbounce.Instance(MODEL, tp=2, dtype="bf16", tokens_per_block=16)
    gen = kvbounce.Instance(MODEL, tp=1, dtype="bf16", layout="layer-major-nhd",
                            tokens_per_block=8)
    ctx_pools = [kvbounce.allocate_pool(ctx, 16, r) for r in range(2)]
    gen_pools = [kvbounce.allocate_pool(gen, 32, 0, per_layer=True)]
    assert gen_pools[0][0].shape == (2, 32, 8, 4, 16)
    assert gen_pools[0][0].dtype == torch.bfloat16
    with Cluster(ctx, gen, ctx_pools, gen_pools, config=CONFIG) as cluster:
        move(cluster, ctx_pools, gen_pools, 11, path=path)


def test_publish_and_pull_errors():
    cluster, ctx_pools, gen_pools = numpy_cluster()
    with cluster:
        ctx0, gen0 = cluster.ctx_agents[0], cluster.gen_agents[0]
        table = list(range(7))
        ctx0.publish(1, table, TOKENS)
        with pytest.raises(kvbounce.AlreadyExistsError, match="1"):
            ctx0.publish(1, table, TOKENS)
        with pytest.raises(kvbounce.OutOfRangeError):
            ctx0.publish(2, [0, 1, 2, 3, 4, 5, 99], TOKENS)
        with pytest.raises(kvbounce.OutOfRangeError, match="32 bits"):
            ctx0.publish(3, [0, 2**40], 20)
        with pytest.raises(kvbounce.InvalidArgumentError):
            gen0.publish(4, table, TOKENS)  # a gen rank does not publish
        with pytest.raises(kvbounce.NotFoundError):
            gen0.pull(5, "nobody", list(range(13)), TOKENS)
        with pytest.raises(kvbounce.InvalidArgumentError, match="path"):
            gen0.pull(6, "ctx0", list(range(13)), TOKENS, path="teleport")
        with pytest.raises(kvbounce.InvalidArgumentError, match="timeout"):
            gen0.pull(7, "ctx0", list(range(13)), TOKENS, timeout=-1)
        with pytest.raises(TypeError):
            gen0.pull(8, "ctx0", [0.5, 1.0], TOKENS)
        with pytest.raises(kvbounce.NotFoundError):
            ctx0.retire(12345)
        assert gen0.paths("ctx0") == ["per-block", "bounce", "direct"]
        assert ctx0.receiver_count("gen0") == 1


def test_pull_before_connect_and_bad_config():
    ctx = kvbounce.Instance(MODEL, tp=1, dtype="fp16")
    pool = kvbounce.allocate_pool(ctx, 8, backend="numpy")
    fabric = kvbounce.LoopbackFabric()
    with kvbounce.Agent("gen", ctx, pool=pool, fabric=fabric) as gen:
        with pytest.raises(kvbounce.NotFoundError):
            gen.pull(1, "ctx0", [0, 1], 40)
    with pytest.raises(kvbounce.InvalidArgumentError, match="bounce_size_mb"):
        kvbounce.Agent("ctx", ctx, pool=pool, fabric=fabric, config={"bounce_size_mb": -1})
    with pytest.raises(kvbounce.InvalidArgumentError, match="no_such_key"):
        kvbounce.Agent("ctx", ctx, pool=pool, fabric=fabric, config={"no_such_key": 1})
    with pytest.raises(kvbounce.InvalidArgumentError, match="role"):
        kvbounce.Agent("decode", ctx, pool=pool, fabric=fabric)
    with pytest.raises(kvbounce.InvalidArgumentError, match="rank"):
        kvbounce.Agent("ctx", ctx, 3, pool=pool, fabric=fabric)
    with pytest.raises(kvbounce.InvalidArgumentError, match="transport"):
        kvbounce.Agent("ctx", ctx, pool=pool, transport="carrier-pigeon")


def test_closed_agent_raises_aborted():
    ctx = kvbounce.Instance(MODEL, tp=1, dtype="fp16")
    pool = kvbounce.allocate_pool(ctx, 8, backend="numpy")
    agent = kvbounce.Agent("ctx", ctx, pool=pool, fabric=kvbounce.LoopbackFabric())
    assert not agent.closed
    agent.close()
    agent.close()  # idempotent
    assert agent.closed and "closed" in repr(agent)
    with pytest.raises(kvbounce.AbortedError) as e:
        agent.publish(1, [0, 1], 40)
    assert e.value.code == "ABORTED" and e.value.message


def test_timeout_cancel_and_wait_timeout():
    cluster, ctx_pools, gen_pools = numpy_cluster()
    with cluster:
        gen0 = cluster.gen_agents[0]
        table = list(range(13))
        # Nothing is published: the pull runs out of time.
        t = gen0.pull(1, "ctx0", table, TOKENS, timeout=0.2)
        with pytest.raises(kvbounce.DeadlineExceededError) as e:
            t.wait(timeout=10)
        assert isinstance(e.value, TimeoutError) and e.value.message
        assert t.done() and isinstance(t.exception(), kvbounce.DeadlineExceededError)

        t = gen0.pull(2, "ctx0", table, TOKENS)
        assert t.wait(timeout=0.05) is False and not t.done() and t.exception() is None
        assert "pending" in repr(t)
        t.cancel()
        with pytest.raises(kvbounce.CancelledError):
            t.wait()
        t.cancel()  # idempotent once settled

        # A publication nobody pulls, retired.
        p = cluster.ctx_agents[0].publish(3, list(range(7)), TOKENS, ttl=30)
        cluster.ctx_agents[0].retire(3)
        with pytest.raises(kvbounce.CancelledError):
            p.wait(timeout=10)
        # ... and one that outlives its ttl.
        p = cluster.ctx_agents[0].publish(4, list(range(7)), TOKENS, ttl=0.1)
        with pytest.raises(kvbounce.DeadlineExceededError):
            p.wait(timeout=10)
        assert gen0.stats()["arena_outstanding_bytes"] == 0


def test_failing_transfer_carries_message():
    # Every transport write of the ctx ranks fails.
    cluster, ctx_pools, gen_pools = numpy_cluster(ctx_faults={"write_fail_rate": 1.0})
    with cluster:
        ctx_table = list(range(7))
        for agent in cluster.ctx_agents:
            agent.publish(1, ctx_table, TOKENS, ttl=10)
        t = cluster.gen_agents[0].pull(1, "ctx0", list(range(13)), TOKENS, path="per-block")
        with pytest.raises(kvbounce.Error) as e:
            t.wait(timeout=20)
        assert isinstance(e.value, kvbounce.UnavailableError), repr(e.value)
        assert "inject" in e.value.message
        assert cluster.gen_agents[0].stats()["requests_failed"] == 1
    with pytest.raises(kvbounce.InvalidArgumentError, match="unknown key"):
        numpy_cluster(ctx_faults={"fail": 1})


def test_several_python_threads_share_agents():
    cluster, ctx_pools, gen_pools = numpy_cluster()
    ctx, gen = cluster.ctx, cluster.gen
    with cluster:
        # Every request uses its own blocks on both sides, so that requests
        # of different threads can run at once.
        for r, pool in enumerate(ctx_pools):
            fill(pool, ctx, r, list(range(16)), 16 * 16)
        errors = []

        def worker(i):
            try:
                ctx_blocks = [i]  # one ctx block: 16 tokens
                gen_blocks = [2 * i, 2 * i + 1]
                pubs = [a.publish(100 + i, ctx_blocks, 16) for a in cluster.ctx_agents]
                t = cluster.gen_agents[0].pull(100 + i, "ctx0", gen_blocks, 16)
                assert t.wait(timeout=30)
                for p in pubs:
                    assert p.wait(timeout=30)
            except Exception as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors
        # Block i of the ctx pools held tokens [16 i, 16 i + 16); they now
        # sit at gen blocks 2i, 2i+1 as tokens [0, 16) of request 100 + i.
        from helpers import expected, logical_views
        for i in range(8):
            for l, view in enumerate(logical_views(gen_pools[0], gen)):
                got = view[:, [2 * i] * 8 + [2 * i + 1] * 8, :, list(range(8)) * 2, :]
                # Gen rank 0 holds all 4 heads; ctx rank r wrote heads 2r, 2r+1.
                for r in range(2):
                    part = expected(ctx, r, np.arange(16 * i, 16 * i + 16), 16)
                    assert np.array_equal(got[:, :, 2 * r:2 * r + 2], part[:, l])
