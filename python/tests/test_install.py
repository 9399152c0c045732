"""cmake --install puts an importable package into the prefix's Python folder."""

import os
import shutil
import site
import subprocess
import sys

import pytest

BUILD = os.environ.get("KVBOUNCE_BUILD_DIR")
INSTALL_DIR = os.environ.get("KVBOUNCE_PYTHON_INSTALL_DIR")


@pytest.mark.skipif(not BUILD or not INSTALL_DIR, reason="run from CTest")
def test_install_into_a_prefix(tmp_path):
    cmake = shutil.which("cmake")
    subprocess.run([cmake, "--install", BUILD, "--prefix", str(tmp_path)], check=True,
                   capture_output=True)
    package = tmp_path / INSTALL_DIR / "kvbounce"
    assert (package / "__init__.py").is_file()
    assert any(p.name.startswith("_kvbounce.") and p.suffix == ".so" for p in package.iterdir())
    env = dict(os.environ, PYTHONPATH=str(tmp_path / INSTALL_DIR))
    code = ("import kvbounce; i = kvbounce.Instance('llama-3.1-8b', tp=2); "
            "p = kvbounce.plan(i, i, tokens=64); print(kvbounce.__file__, p['totals']['pairs'])")
    # Run from the prefix: the build tree's package must not be found instead.
    out = subprocess.run([sys.executable, "-s", "-c", code], env=env, cwd=tmp_path, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out[0].startswith(str(package)) and out[1] == "2"


@pytest.mark.skipif(not INSTALL_DIR, reason="run from CTest")
def test_default_prefix_is_on_this_pythons_path():
    # cmake's default prefix is /usr/local: this interpreter must search the
    # folder the package goes to there.
    if sys.prefix != "/usr":
        pytest.skip("not a system interpreter")
    assert os.path.join("/usr/local", INSTALL_DIR) in site.getsitepackages()
