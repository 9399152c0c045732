#!/usr/bin/python3
"""What the Python layer adds to a request: publish + pull + wait of a
one-block request, one at a time, through kvbounce's Python API and through
its C++ API (kvbounce._kvbounce._roundtrip_seconds) on the same two loopback
agents, in alternating rounds; prints the median microseconds per request of
each and their difference.

    PYTHONPATH=out/release/python python3 python/bench/overhead.py [--requests N] [--rounds R]
"""

import argparse
import statistics
import time

import kvbounce
from kvbounce import _kvbounce


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--path", default="direct")
    ap.add_argument("--head-dim", type=int, default=128, help="of a 2-layer, 8-head model")
    args = ap.parse_args()

    model = kvbounce.Model(layers=2, kv_heads=8, head_dim=args.head_dim)
    inst = kvbounce.Instance(model, tp=1, dtype="bf16", tokens_per_block=32)
    fabric = kvbounce.LoopbackFabric()
    config = {"path": args.path, "bounce_size_mb": 4}
    ctx = kvbounce.Agent("ctx", inst, pool=kvbounce.allocate_pool(inst, 4, backend="numpy"),
                         fabric=fabric, config=config)
    gen = kvbounce.Agent("gen", inst, pool=kvbounce.allocate_pool(inst, 4, backend="numpy"),
                         fabric=fabric, config=config)
    gen.connect(ctx.address)
    ctx_table, gen_table, tokens = [1], [2], 32
    request_id = 1

    def python_round(n):
        nonlocal request_id
        start = time.perf_counter()
        for _ in range(n):
            pub = ctx.publish(request_id, ctx_table, tokens)
            pull = gen.pull(request_id, "ctx0", gen_table, tokens)
            pull.wait()
            pub.wait()
            request_id += 1
        return time.perf_counter() - start

    def cpp_round(n):
        nonlocal request_id
        s = _kvbounce._roundtrip_seconds(ctx, gen, "ctx0", request_id, n, ctx_table, gen_table,
                                         tokens)
        request_id += n
        return s

    python_round(200)  # warm-up
    cpp_round(200)
    py_us, cpp_us = [], []
    for _ in range(args.rounds):
        py_us.append(python_round(args.requests) / args.requests * 1e6)
        cpp_us.append(cpp_round(args.requests) / args.requests * 1e6)
    p, c = statistics.median(py_us), statistics.median(cpp_us)
    print(f"path {args.path}, {args.rounds} rounds of {args.requests} one-block requests "
          f"({inst.block_bytes()} bytes)")
    print(f"  python: {p:8.2f} us/request (rounds: {', '.join(f'{x:.1f}' for x in py_us)})")
    print(f"  c++:    {c:8.2f} us/request (rounds: {', '.join(f'{x:.1f}' for x in cpp_us)})")
    print(f"  python layer adds {p - c:.2f} us/request")
    gen.close()
    ctx.close()


if __name__ == "__main__":
    main()
