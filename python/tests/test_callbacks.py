"""Done callbacks, asyncio, and transfers and agents that outlive their
Python objects (or go away inside a callback)."""

import asyncio
import gc
import sys
import threading
import time
import weakref

import pytest

import kvbounce
from helpers import Cluster, block_table, check, fill

TOKENS = 64
MODEL = kvbounce.Model(layers=2, kv_heads=2, head_dim=16)


def make_cluster(config=None):
    ctx = kvbounce.Instance(MODEL, tp=1, dtype="fp16", tokens_per_block=16)
    gen = kvbounce.Instance(MODEL, tp=1, dtype="fp16", tokens_per_block=16)
    ctx_pools = [kvbounce.allocate_pool(ctx, 16, backend="numpy")]
    gen_pools = [kvbounce.allocate_pool(gen, 16, backend="numpy")]
    return Cluster(ctx, gen, ctx_pools, gen_pools, config=config), ctx_pools, gen_pools


def test_callback_runs_once_on_a_kvbounce_thread():
    cluster, ctx_pools, gen_pools = make_cluster()
    with cluster:
        ctx_table, gen_table = block_table(TOKENS, 16, 16, 1), block_table(TOKENS, 16, 16, 2)
        fill(ctx_pools[0], cluster.ctx, 0, ctx_table, TOKENS)
        calls = []
        settled = threading.Event()

        def on_done(t):
            calls.append((t, threading.get_ident(), t.done(), t.exception()))
            settled.set()

        t = cluster.gen_agents[0].pull(1, "ctx0", gen_table, TOKENS)
        t.add_done_callback(on_done)
        cluster.ctx_agents[0].publish(1, ctx_table, TOKENS)
        assert settled.wait(10)
        assert t.wait(10)
        assert len(calls) == 1
        got, thread, done, error = calls[0]
        assert got is t and done and error is None
        assert thread != threading.get_ident()
        check(gen_pools[0], cluster.gen, 0, gen_table, 0, TOKENS)
        # Added once settled: runs at once, on this thread.
        late = []
        t.add_done_callback(lambda x: late.append(threading.get_ident()))
        assert late == [threading.get_ident()]


def test_raising_callback_is_reported_and_others_still_run():
    cluster, _, _ = make_cluster()
    with cluster:
        reported, ran = [], threading.Event()
        old = sys.unraisablehook
        sys.unraisablehook = lambda u: reported.append(u.exc_value)
        try:
            t = cluster.gen_agents[0].pull(1, "ctx0", [0, 1, 2, 3], TOKENS, timeout=0.05)

            def boom(_):
                raise RuntimeError("boom")

            t.add_done_callback(boom)
            t.add_done_callback(lambda _: ran.set())
            assert ran.wait(10)
            with pytest.raises(kvbounce.DeadlineExceededError):
                t.wait(10)
        finally:
            sys.unraisablehook = old
        assert len(reported) == 1 and str(reported[0]) == "boom"


def test_callback_may_not_close_or_block():
    cluster, _, _ = make_cluster()
    with cluster:
        gen0 = cluster.gen_agents[0]
        seen = []
        done = threading.Event()
        other = gen0.pull(2, "ctx0", [4, 5, 6, 7], TOKENS)

        def inside(t):
            for call in (gen0.close, lambda: other.wait(1)):
                try:
                    call()
                except kvbounce.FailedPreconditionError as e:
                    seen.append(e.message)
            done.set()

        t = gen0.pull(1, "ctx0", [0, 1, 2, 3], TOKENS, timeout=0.05)
        t.add_done_callback(inside)
        assert done.wait(10)
        assert len(seen) == 2 and "callback" in seen[0] and "callback" in seen[1]
        assert not gen0.closed
        other.cancel()


def test_asyncio_await_success_failure_and_cancel():
    cluster, ctx_pools, gen_pools = make_cluster()

    async def main():
        gen0, ctx0 = cluster.gen_agents[0], cluster.ctx_agents[0]
        ctx_table, gen_table = block_table(TOKENS, 16, 16, 3), block_table(TOKENS, 16, 16, 4)
        fill(ctx_pools[0], cluster.ctx, 0, ctx_table, TOKENS)
        pull = gen0.pull(1, "ctx0", gen_table, TOKENS)
        pub = ctx0.publish(1, ctx_table, TOKENS)
        assert await asyncio.wait_for(asyncio.gather(pull, pub), 10) == [None, None]
        check(gen_pools[0], cluster.gen, 0, gen_table, 0, TOKENS)
        # Awaiting a settled transfer returns at once.
        await pull

        with pytest.raises(kvbounce.DeadlineExceededError):
            await gen0.pull(2, "ctx0", gen_table, TOKENS, timeout=0.05)

        # Cancelling the awaiting task cancels the transfer.
        t = gen0.pull(3, "ctx0", gen_table, TOKENS)
        task = asyncio.ensure_future(_await(t))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(kvbounce.CancelledError):
            t.wait(10)

    async def _await(t):
        await t

    with cluster:
        asyncio.run(main())


def test_transfer_outlives_its_python_objects():
    cluster, _, _ = make_cluster()
    with cluster:
        class Token:
            pass

        token = Token()
        alive = weakref.ref(token)
        settled = threading.Event()
        t = cluster.gen_agents[0].pull(1, "ctx0", [0, 1, 2, 3], TOKENS, timeout=1)
        t.add_done_callback(lambda _t, token=token: settled.set())
        transfer_ref = weakref.ref(t)
        del t, token
        gc.collect()
        assert alive() is not None and not settled.is_set()  # the pending callback holds it
        assert settled.wait(10)
        deadline = time.monotonic() + 5
        while (alive() is not None or transfer_ref() is not None) and time.monotonic() < deadline:
            time.sleep(0.01)
            gc.collect()
        assert alive() is None and transfer_ref() is None  # no leak once settled


def test_agent_released_inside_a_callback_shuts_down_later():
    ctx = kvbounce.Instance(MODEL, tp=1, dtype="fp16", tokens_per_block=16)
    fabric = kvbounce.LoopbackFabric()
    pool = kvbounce.allocate_pool(ctx, 16, backend="numpy")
    holder = [kvbounce.Agent("gen", ctx, pool=pool, fabric=fabric)]
    agent_ref = weakref.ref(holder[0])
    pool_ref = weakref.ref(pool)
    released = threading.Event()
    ctx_agent = kvbounce.Agent("ctx", ctx, pool=kvbounce.allocate_pool(ctx, 16, backend="numpy"),
                               fabric=fabric)
    holder[0].connect(ctx_agent.address)
    t = holder[0].pull(1, "ctx0", [0, 1, 2, 3], TOKENS, timeout=0.05)

    def drop(_):
        holder.clear()  # the last reference: the agent is destroyed on this thread
        released.set()

    t.add_done_callback(drop)
    del pool
    assert released.wait(10)
    # The main thread's pending call (at the next bytecode) shuts it down.
    deadline = time.monotonic() + 10
    while (agent_ref() is not None or pool_ref() is not None) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert agent_ref() is None and pool_ref() is None
    ctx_agent.close()


def test_close_with_callbacks_in_flight_does_not_deadlock():
    cluster, _, _ = make_cluster()
    gen0 = cluster.gen_agents[0]
    outcomes = []
    transfers = []
    for i in range(8):
        t = gen0.pull(10 + i, "ctx0", [i], 16)
        # Each callback needs the GIL, which close() must not hold.
        t.add_done_callback(lambda t: (time.sleep(0.01), outcomes.append(type(t.exception()))))
        transfers.append(t)
    cluster.close()
    assert len(outcomes) == 8
    assert all(issubclass(o, kvbounce.Error) for o in outcomes)
    assert all(t.done() for t in transfers)
