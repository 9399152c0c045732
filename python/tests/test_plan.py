"""kvbounce.plan against the command line's `kvbounce plan --json`."""

import json
import os
import subprocess

import pytest

import kvbounce

CLI = os.environ.get("KVBOUNCE_CLI")


def cli_plan(*args):
    if not CLI:
        pytest.skip("KVBOUNCE_CLI (the kvbounce command) is not set")
    out = subprocess.run([CLI, "plan", "--json", *args], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out)


CASES = [
    # (ctx instance, gen instance, tokens, start_token, seed, CLI flags)
    (dict(model="llama-3.1-70b", tp=8), dict(model="llama-3.1-70b", tp=4), 8192, 0, 1,
     ["--model", "llama-3.1-70b", "--tokens", "8192", "--ctx", "tp=8,pp=1", "--gen",
      "tp=4,pp=1"]),
    (dict(model="deepseek-v3", tp=4, dtype="fp8", layout="layer-major-nhd", tokens_per_block=64),
     dict(model="deepseek-v3", tp=2, dtype="fp8", tokens_per_block=16), 3000, 1000, 7,
     ["--model", "deepseek-v3", "--dtype", "fp8", "--tokens", "3000", "--start-token", "1000",
      "--seed", "7", "--ctx", "tp=4,layout=layer-major-nhd,tokens-per-block=64", "--gen",
      "tp=2,tokens-per-block=16"]),
    (dict(model=kvbounce.Model(layers=10, kv_heads=4, head_dim=64), tp=2, pp=2,
          layers_per_stage=[3, 7]),
     dict(model=kvbounce.Model(layers=10, kv_heads=4, head_dim=64), tp=4, pp=1,
          layout="layer-major-hnd"), 500, 0, 3,
     ["--layers", "10", "--kv-heads", "4", "--head-dim", "64", "--tokens", "500", "--seed", "3",
      "--ctx", "tp=2,pp=2,layers-per-stage=3/7", "--gen", "tp=4,layout=layer-major-hnd"]),
]


@pytest.mark.parametrize("case", CASES, ids=["preset", "mla-fp8-offset", "custom-pp"])
def test_plan_matches_the_cli(case):
    ctx_kw, gen_kw, tokens, start, seed, flags = case
    ctx = kvbounce.Instance(ctx_kw.pop("model"), **ctx_kw)
    gen = kvbounce.Instance(gen_kw.pop("model"), **gen_kw)
    got = kvbounce.plan(ctx, gen, tokens=tokens, start_token=start, seed=seed)
    assert got == cli_plan(*flags)
    assert set(got) == {"scenario", "pairs", "gen_ranks", "totals"}
    assert got["totals"]["pairs"] == len(got["pairs"])


def test_design_example_fragment_counts():
    # llama-3.1-70b, 8192 tokens, TP8 -> TP4: each writer sends 40,960 fragments.
    p = kvbounce.plan(kvbounce.Instance("llama-3.1-70b", tp=8),
                      kvbounce.Instance("llama-3.1-70b", tp=4), tokens=8192)
    assert all(pair["direct_fragments"] == 40960 for pair in p["pairs"])
    assert [g["writers"] for g in p["gen_ranks"]] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_plan_errors():
    with pytest.raises(kvbounce.InvalidArgumentError, match="start"):
        kvbounce.plan(kvbounce.Instance("llama-3.1-8b"), kvbounce.Instance("llama-3.1-8b"),
                      tokens=100, start_token=100)
    with pytest.raises(kvbounce.InvalidArgumentError):
        kvbounce.plan(kvbounce.Instance("llama-3.1-8b"), kvbounce.Instance("mistral-7b", tp=2,
                                                                           dtype="fp32"),
                      tokens=100)
    with pytest.raises(kvbounce.InvalidArgumentError, match="tokens"):
        kvbounce.plan(kvbounce.Instance("llama-3.1-8b"), kvbounce.Instance("llama-3.1-8b"),
                      tokens=0)
