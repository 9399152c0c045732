#!/usr/bin/python3
"""The prefill side of a disaggregated pair, as a KV connector would drive
kvbounce: one ctx rank with its KV cache in a torch tensor, publishing each
request's blocks once its forward pass wrote them.

    python3 prefill.py --listen 127.0.0.1:0 --requests 8
    # prints "ready <address>"; give the address to decode.py --peer

Exits 0 once every publication was served, 1 when one failed."""

import argparse
import sys

import kvbounce
from kv_pattern import prefill_instance, write_request


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:0", help="UCX address to listen on")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1000, help="prompt tokens per request")
    ap.add_argument("--first-request-id", type=int, default=1)
    ap.add_argument("--ttl", type=float, default=60, help="seconds a publication waits")
    args = ap.parse_args()

    inst = prefill_instance()
    blocks_per_request = -(-args.tokens // inst.tokens_per_block)
    num_blocks = blocks_per_request * args.requests
    pool = kvbounce.allocate_pool(inst, num_blocks)  # the engine's KV cache
    agent = kvbounce.Agent("ctx", inst, 0, pool=pool, instance_id="prefill", transport="ucx",
                           listen=args.listen, config={"bounce_size_mb": 64})
    with agent:
        print("ready", agent.address, flush=True)
        publications = []
        freed = []  # blocks handed back to the block manager
        for i in range(args.requests):
            request_id = args.first_request_id + i
            # The engine's block manager hands the request its blocks (here,
            # in reverse order, so that nothing lines up by accident).
            first = num_blocks - (i + 1) * blocks_per_request
            blocks = list(range(first + blocks_per_request - 1, first - 1, -1))
            write_request(pool, inst, 0, request_id, blocks, args.tokens)
            # Publishing lends kvbounce the blocks until the publication
            # settles, whatever its outcome; then the connector frees them.
            t = agent.publish(request_id, blocks, args.tokens, ttl=args.ttl)
            t.add_done_callback(lambda t, blocks=blocks: freed.extend(blocks))
            publications.append(t)
        failed = 0
        for t in publications:
            try:
                t.wait()
            except kvbounce.Error as e:
                failed += 1
                print(f"request {t.request_id}: {type(e).__name__}: {e}", file=sys.stderr)
        print(f"prefill: {len(publications) - failed} of {len(publications)} requests served, "
              f"{len(freed)} blocks freed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
