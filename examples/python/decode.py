#!/usr/bin/python3
"""The decode side of a disaggregated pair: one gen rank whose KV cache is
vLLM-style per-layer torch tensors, pulling each request's prompt KV from
the prefill instance and checking every element.

    python3 decode.py --peer <address printed by prefill.py> --requests 8

Exits 0 when every request arrived intact, 1 otherwise."""

import argparse
import asyncio
import sys

import kvbounce
from kv_pattern import count_mismatches, decode_instance


async def pull_all(agent, pool, inst, args):
    blocks_per_request = -(-args.tokens // inst.tokens_per_block)
    tables = {}
    transfers = []
    for i in range(args.requests):
        request_id = args.first_request_id + i
        tables[request_id] = list(range(i * blocks_per_request, (i + 1) * blocks_per_request))
        transfers.append(agent.pull(request_id, "prefill", tables[request_id], args.tokens,
                                    path=args.path))
    outcomes = await asyncio.gather(*transfers, return_exceptions=True)
    bad = 0
    for t, outcome in zip(transfers, outcomes):
        if isinstance(outcome, BaseException):
            print(f"request {t.request_id}: {type(outcome).__name__}: {outcome}",
                  file=sys.stderr)
            bad += 1
            continue
        wrong = count_mismatches(pool, inst, 0, t.request_id, tables[t.request_id], 0,
                                 args.tokens)
        if wrong:
            print(f"request {t.request_id}: {wrong} elements differ", file=sys.stderr)
            bad += 1
    return bad


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer", required=True, help="the prefill rank's address")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--first-request-id", type=int, default=1)
    ap.add_argument("--path", default=None, help="per-block, bounce, direct or auto")
    args = ap.parse_args()

    inst = decode_instance()
    blocks = -(-args.tokens // inst.tokens_per_block) * args.requests
    pool = kvbounce.allocate_pool(inst, blocks, per_layer=True)
    with kvbounce.Agent("gen", inst, 0, pool=pool, instance_id="decode", transport="ucx",
                        config={"bounce_size_mb": 64}) as agent:
        agent.connect([args.peer])
        bad = asyncio.run(pull_all(agent, pool, inst, args))
        stats = agent.stats()
    print(f"decode: {args.requests - bad} of {args.requests} requests intact, "
          f"{stats['bytes_completed']} bytes", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
