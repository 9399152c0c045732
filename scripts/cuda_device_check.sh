#!/usr/bin/env bash
# The GPU checks of docs/cuda.md in one run, on a machine with a CUDA device:
# every gpu-labelled test program, compute-sanitizer's memcheck over the
# data-moving cases, the copy-engine and chunk-pipeline benches and `kvbounce bench --memory cuda`
# on three fragment sizes, the chaos bench over device pools, and host-staged bounce between
# processes over UCX. Runs binaries built elsewhere (the GPU host may
# have no GoogleTest or UCX packages): build with the release preset, then
#
#   ./scripts/cuda_device_check.sh --stage        # on the build machine
#
# strips the programs into out/gpu with libcudart beside them; carry out/gpu
# and .deps (Debian's UCX runtime, unpacked by the project's dependency
# script) to the GPU host and run there
#
#   ./scripts/cuda_device_check.sh [out-folder] [quick]
#
# It writes one file per step into $OUT (or the folder given) and prints a
# summary. `quick` runs the tests and memcheck only.
set -uo pipefail
cd "$(dirname "$0")/.."
PROGRAMS=(tests/copy/copy_cuda_engine_test tests/copy/copy_cuda_memory_test
          tests/tools/tools_device_rows_test tests/session/session_device_pool_test
          tests/tools/tools_cuda_ipc_process_test tests/transport/cuda_ipc_transport_test
          tests/transport/cuda_ipc_test_peer tools/kvbounce bench/cuda_copy_bench
          bench/chunk_pipeline_bench)
if [ "${1:-}" = "--stage" ]; then
  mkdir -p out/gpu
  for p in "${PROGRAMS[@]}"; do
    [ -x "out/release/$p" ] || { echo "missing out/release/$p: build the release preset"; exit 1; }
    strip -o "out/gpu/$(basename "$p")" "out/release/$p"
  done
  cudart=$(ldd out/release/tools/kvbounce | awk '/libcudart/ {print $3}')
  [ -n "$cudart" ] || { echo "no libcudart in ldd out/release/tools/kvbounce"; exit 1; }
  cp -L "$cudart" out/gpu/
  # The metrics endpoint's HTTP library and its compression libraries are
  # Debian packages a GPU host's image may lack.
  for lib in $(ldd out/release/tools/kvbounce | awk '/libcpp-httplib|libbrotli/ {print $3}'); do
    cp -L "$lib" out/gpu/
  done
  echo "staged $(du -sh out/gpu | cut -f1) in out/gpu"
  exit 0
fi
dest=${1:-${OUT:-out/gpu/check}}
mode=${2:-full}
mkdir -p "$dest"
ucx=$PWD/.deps/ucx/usr/lib/x86_64-linux-gnu
export LD_LIBRARY_PATH=$PWD/out/gpu:$ucx${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export UCX_MODULE_DIR=$ucx/ucx
nvidia-smi -L > "$dest/device.txt" 2>&1
export KVBOUNCE_BINARY=$PWD/out/gpu/kvbounce  # the workers of the cuda-ipc tests
export KVBOUNCE_CUDA_IPC_TEST_PEER=$PWD/out/gpu/cuda_ipc_test_peer  # the transport test's peers
for t in copy_cuda_engine_test copy_cuda_memory_test tools_device_rows_test \
         session_device_pool_test tools_cuda_ipc_process_test cuda_ipc_transport_test; do
  timeout 300 "out/gpu/$t" > "$dest/$t.txt" 2>&1; echo "rc=$?" >> "$dest/$t.txt"
done
if command -v compute-sanitizer >/dev/null; then
  timeout 240 compute-sanitizer --tool memcheck --error-exitcode 3 out/gpu/copy_cuda_engine_test \
    --gtest_filter='*Matches*:*Pinned*:*Stop*:*Destruction*' > "$dest/memcheck_engine.txt" 2>&1
  echo "rc=$?" >> "$dest/memcheck_engine.txt"
  timeout 300 compute-sanitizer --tool memcheck --error-exitcode 3 \
    out/gpu/session_device_pool_test --gtest_filter='*HeadMismatch*:*Settle*' \
    > "$dest/memcheck_sessions.txt" 2>&1
  echo "rc=$?" >> "$dest/memcheck_sessions.txt"
fi
if [ "$mode" != quick ]; then
  timeout 150 out/gpu/cuda_copy_bench > "$dest/copy_bench.txt" 2>&1
  echo "rc=$?" >> "$dest/copy_bench.txt"
  timeout 60 out/gpu/chunk_pipeline_bench > "$dest/chunk_pipeline_bench.txt" 2>&1
  echo "rc=$?" >> "$dest/chunk_pipeline_bench.txt"
  # Fragments of 256 B (head mismatch into a layer-major-nhd receiver),
  # 4 KiB (one kv head per ctx rank, 16-token blocks) and whole blocks.
  bench() {
    local name=$1; shift
    timeout 240 out/gpu/kvbounce bench --memory cuda --json "$dest/bench_$name.json" "$@" \
      > "$dest/bench_$name.txt" 2>&1
    echo "rc=$?" >> "$dest/bench_$name.txt"
  }
  bench 256b --ctx tp=2 --gen tp=1,layout=layer-major-nhd --tokens 512 --tokens-per-block 16 \
    --requests 8 --concurrency 2
  bench 4k --ctx tp=8 --gen tp=2 --tokens 2048 --tokens-per-block 16 --requests 16 \
    --concurrency 4
  bench blocks --ctx tp=2 --gen tp=2 --tokens 8192 --requests 16 --concurrency 4
  # Settle-safety over device pools: random cancels, deadlines, retires and
  # restarts on every path; a settled request's blocks never change.
  bench chaos --chaos --chaos-seconds 30 --ctx tp=2 --gen tp=1,layout=layer-major-nhd \
    --tokens 256 --tokens-per-block 16 --concurrency 4
  # Device pools of worker processes on one host over cuda-ipc.
  bench ipc_256b --transport cuda-ipc --ctx tp=2 --gen tp=1,layout=layer-major-nhd \
    --tokens 512 --tokens-per-block 16 --requests 8 --concurrency 2
  bench ipc_4k --transport cuda-ipc --ctx tp=8 --gen tp=2 --tokens 2048 --tokens-per-block 16 \
    --requests 16 --concurrency 4
  # Host-staged bounce between processes: UCX reaches host memory only.
  bench ucx_staged --transport ucx --ctx tp=2 --gen tp=1,layout=layer-major-nhd --tokens 2048 \
    --tokens-per-block 16 --requests 16 --concurrency 2
fi
cat "$dest/device.txt"
for f in "$dest"/*_test.txt; do
  echo "$(basename "$f" .txt): $(grep -E '^\[  (PASSED|FAILED|SKIPPED)  \]' "$f" | tr '\n' ' ') $(tail -1 "$f")"
done
for f in "$dest"/memcheck_*.txt; do [ -f "$f" ] && echo "$(basename "$f"): $(tail -2 "$f" | tr '\n' ' ')"; done
[ -f "$dest/copy_bench.txt" ] && tail -12 "$dest/copy_bench.txt"
for f in "$dest"/bench_*.txt; do [ -f "$f" ] && { echo "== $(basename "$f")"; tail -14 "$f"; }; done
exit 0
