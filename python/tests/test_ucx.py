"""The example pair: a prefill process and a decode process over UCX."""

import importlib.util
import os
import subprocess
import sys

import pytest

import kvbounce

EXAMPLES = os.environ.get("KVBOUNCE_EXAMPLES",
                          os.path.join(os.path.dirname(__file__), "../../examples/python"))


@pytest.mark.skipif(not kvbounce.ucx_available(), reason="this build has no UCX transport")
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the example uses torch")
def test_prefill_and_decode_processes_over_ucx():
    common = ["--requests", "6", "--tokens", "300"]
    prefill = subprocess.Popen([sys.executable, "-s", os.path.join(EXAMPLES, "prefill.py"),
                                *common], stdout=subprocess.PIPE, text=True)
    try:
        line = prefill.stdout.readline().split()
        assert line and line[0] == "ready", line
        decode = subprocess.run([sys.executable, "-s", os.path.join(EXAMPLES, "decode.py"),
                                 "--peer", line[1], *common], capture_output=True, text=True,
                                timeout=90)
        assert decode.returncode == 0, decode.stderr
        assert "decode: 6 of 6 requests intact" in decode.stdout
        out, _ = prefill.communicate(timeout=60)
        assert prefill.returncode == 0
        assert "6 of 6 requests served" in out
    finally:
        if prefill.poll() is None:
            prefill.kill()
            prefill.wait()
