#!/usr/bin/env bash
# The Python module's suites on a GPU host whose python3 is not the one the
# module was built for (docs/python.md, "On a GPU host"). A GPU host's image
# may carry another Python than Debian's (with its own torch and NumPy) and
# none of the project's build dependencies; the extension is tied to one
# interpreter's ABI. So the library is built here and the small extension
# there, against that host's python3 and its pybind11:
#
#   ./scripts/python_device_check.sh --stage    # on the build machine, after
#                                               # the release preset's build
#
# strips the library's static archives (debug info off) into out/gpu/py
# with the header-only packages the module's sources include (CLI11,
# nlohmann-json); carry out/gpu and .deps (Debian's UCX runtime, as for
# scripts/cuda_device_check.sh) to the GPU host and run there
#
#   ./scripts/python_device_check.sh [out-folder] [pytest files...]
#
# It compiles python/src/*.cc with that host's c++ against its python3's
# headers and pybind11 (pip's), links them with the archives, lays the
# package out in a temporary folder and runs pytest on the files given (by
# default test_cuda.py, test_pools.py and test_agent.py), writing its output
# into the out-folder (default $OUT/python). With PYTHON_BENCH set (e.g.
# "python/bench/overhead.py --requests 3000 --rounds 5"), that script then
# runs with the same module, its output in bench.txt. Exit status: pytest's,
# or 2 when the host lacks Python headers, pybind11 or a C++ compiler.
set -uo pipefail
cd "$(dirname "$0")/.."
ARCHIVES=(tools/libkvbounce_tools.a src/session/libkvbounce_session.a
          src/transport/libkvbounce_transport.a src/copy/libkvbounce_device.a
          src/protocol/libkvbounce_protocol.a tools/libkvbounce_tools_cuda.a
          src/copy/libkvbounce_cuda.a src/memory/libkvbounce_memory.a
          src/copy/libkvbounce_copy.a src/layout/libkvbounce_layout.a
          src/common/libkvbounce_common.a)
if [ "${1:-}" = "--stage" ]; then
  rm -rf out/gpu/py
  mkdir -p out/gpu/py/lib out/gpu/py/include
  for a in "${ARCHIVES[@]}"; do
    [ -f "out/release/$a" ] || { echo "missing out/release/$a: build the release preset with CUDA"; exit 1; }
    strip --strip-debug -o "out/gpu/py/lib/$(basename "$a")" "out/release/$a"
  done
  cp -r /usr/include/CLI /usr/include/nlohmann out/gpu/py/include/
  echo "staged $(du -sh out/gpu/py | cut -f1) in out/gpu/py"
  exit 0
fi
dest=${1:-${OUT:-out/gpu/check}/python}
shift || true
tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=(python/tests/test_cuda.py python/tests/test_pools.py
                                 python/tests/test_agent.py)
mkdir -p "$dest"
PY=${PYTHON:-python3}
ucx=$PWD/.deps/ucx/usr/lib/x86_64-linux-gnu
include=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
pybind=$("$PY" -c 'import pybind11; print(pybind11.get_include())' 2>/dev/null)
suffix=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
{
  echo "python: $("$PY" --version 2>&1) at $(command -v "$PY")"
  echo "headers: $include"
  echo "pybind11: ${pybind:-none}"
  c++ --version 2>&1 | head -1
} | tee "$dest/build.txt"
if [ ! -f "$include/Python.h" ] || [ -z "$pybind" ] || ! command -v c++ >/dev/null; then
  echo "cannot build the module here: needs Python.h, pybind11 and c++" | tee -a "$dest/build.txt"
  exit 2
fi
build=$(mktemp -d)
mkdir -p "$build/kvbounce"
cp python/kvbounce/*.py "$build/kvbounce/"
pids=()
for src in python/src/*.cc; do
  c++ -std=c++20 -O2 -fPIC -fvisibility=hidden -I. -Iinclude -Isrc -isystem out/gpu/py/include \
    -isystem "$include" -isystem "$pybind" -isystem /usr/local/cuda/include \
    -c "$src" -o "$build/$(basename "$src" .cc).o" >> "$dest/build.txt" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do
  wait "$p" || { echo "compile failed:"; grep -m 20 -B2 -A6 "error" "$dest/build.txt"; exit 2; }
done
libs=()
for pattern in "$ucx/libucp.so*" "$ucx/libuct.so*" "$ucx/libucs.so*" "$ucx/libucm.so*" \
               "out/gpu/libcpp-httplib.so*" "out/gpu/libcudart.so*"; do
  # shellcheck disable=SC2206
  found=($pattern)
  [ -e "${found[0]}" ] && libs+=("${found[0]}")
done
if ! c++ -shared -o "$build/kvbounce/_kvbounce$suffix" "$build"/*.o \
    -Wl,--start-group out/gpu/py/lib/*.a -Wl,--end-group "${libs[@]}" -lrt -lpthread -ldl \
    >> "$dest/build.txt" 2>&1; then
  echo "link failed:"
  tail -20 "$dest/build.txt"
  exit 2
fi
export LD_LIBRARY_PATH=$PWD/out/gpu:$ucx${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export UCX_MODULE_DIR=$ucx/ucx
export KVBOUNCE_BINARY=$PWD/out/gpu/kvbounce
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PYTHONPATH=$build:$PWD/python/tests timeout 600 "$PY" -m pytest -q -p no:cacheprovider \
  "${tests[@]}" > "$dest/pytest.txt" 2>&1
rc=$?
tail -5 "$dest/pytest.txt"
if [ -n "${PYTHON_BENCH:-}" ]; then
  # shellcheck disable=SC2086
  PYTHONPATH=$build timeout 300 "$PY" $PYTHON_BENCH > "$dest/bench.txt" 2>&1
  tail -20 "$dest/bench.txt"
fi
rm -rf "$build"
exit $rc
