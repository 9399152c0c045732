#!/usr/bin/env bash
# The GPU checks of docs/cuda.md in one run, on a machine with a CUDA device:
# the gpu-labelled test program, the copy bench, and compute-sanitizer's
# memcheck over the data-moving cases. Runs binaries built elsewhere (the
# GPU host may have no GoogleTest): build them with the release preset, copy
# libcudart beside them (--stage) and carry out/release/tests/copy/
# copy_cuda_engine_test, out/release/bench/cuda_copy_bench and
# out/release/devlib to the GPU host. Writes tests.txt, bench.txt and
# memcheck.txt into $OUT (or the folder given) and prints a summary.
#
#   ./scripts/cuda_device_check.sh --stage        # on the build machine
#   ./scripts/cuda_device_check.sh [out-folder]   # on the GPU host
set -uo pipefail
cd "$(dirname "$0")/.."
TEST=out/release/tests/copy/copy_cuda_engine_test
BENCH=out/release/bench/cuda_copy_bench
if [ "${1:-}" = "--stage" ]; then
  cudart=$(ldd "$TEST" | awk '/libcudart/ {print $3}')
  [ -n "$cudart" ] || { echo "no libcudart in ldd $TEST: build the release preset first"; exit 1; }
  mkdir -p out/release/devlib && cp -L "$cudart" out/release/devlib/
  echo "staged $(ls out/release/devlib)"
  exit 0
fi
dest=${1:-${OUT:-out/release/gpu-check}}
mkdir -p "$dest"
export LD_LIBRARY_PATH=$PWD/out/release/devlib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi -L > "$dest/device.txt" 2>&1
timeout 240 "$TEST" > "$dest/tests.txt" 2>&1; echo "rc=$?" >> "$dest/tests.txt"
timeout 150 "$BENCH" > "$dest/bench.txt" 2>&1; echo "rc=$?" >> "$dest/bench.txt"
if command -v compute-sanitizer >/dev/null; then
  timeout 180 compute-sanitizer --tool memcheck --error-exitcode 3 "$TEST" \
    --gtest_filter='*Matches*:*Pinned*:*Stop*:*Destruction*' > "$dest/memcheck.txt" 2>&1
  echo "rc=$?" >> "$dest/memcheck.txt"
fi
cat "$dest/device.txt"
grep -E "^\[  (FAILED|PASSED|SKIPPED) |^rc=" "$dest/tests.txt"
cat "$dest/bench.txt"
[ -f "$dest/memcheck.txt" ] && tail -3 "$dest/memcheck.txt"
exit 0
