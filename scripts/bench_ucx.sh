#!/usr/bin/env bash
# The UCX figures of docs/PERFORMANCE.md in one run: ucx_perftest's put
# bandwidth between two processes (the link's ceiling) and `kvbounce bench
# --transport ucx` on every path, over TCP and over shared memory, for a
# tiny-fragment shape and a whole-block shape.
#
#   ./scripts/bench_ucx.sh [path/to/kvbounce] [requests]
set -euo pipefail
cd "$(dirname "$0")/.."
KVBOUNCE=${1:-out/release/tools/kvbounce}
REQUESTS=${2:-8}
command -v ucx_perftest >/dev/null || { echo "ucx_perftest not found (ucx-utils)"; exit 1; }
[ -x "$KVBOUNCE" ] || { echo "no $KVBOUNCE: build the release preset first"; exit 1; }

perftest() {  # UCX_TLS size extra-flags -> MB/s
  local port=$((20000 + RANDOM % 20000))
  UCX_TLS=$1 ucx_perftest -p "$port" -t ucp_put_bw -s "$2" -n 2000 $3 >/dev/null 2>&1 &
  local server=$!
  sleep 0.5
  local line
  line=$(UCX_TLS=$1 timeout 120 ucx_perftest 127.0.0.1 -p "$port" -t ucp_put_bw -s "$2" -n 2000 $3 \
           2>/dev/null | grep Final || true)
  wait "$server" 2>/dev/null || true
  # Final: iters, latency typical/avg/overall, bandwidth avg/overall (MB/s), rate
  echo "$line" | awk '{print $7}'
}

echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%Y-%m-%dT%H:%MZ)"
echo
echo "ucx_perftest ucp_put_bw (MB/s, overall)"
for size in 65536 1048576; do
  echo "  tcp, peer error handling, ${size} B puts: $(perftest tcp $size -e)"
  echo "  shared memory, ${size} B puts:           $(perftest shm,tcp $size '')"
done
echo

run() {  # label tls paths shape...
  local label=$1 tls=$2 paths=$3
  shift 3
  echo "== $label"
  local tls_flag=()
  [ -n "$tls" ] && tls_flag=(--ucx-tls "$tls")
  "$KVBOUNCE" bench --transport ucx "${tls_flag[@]}" --requests "$REQUESTS" --concurrency 2 \
    --path "$paths" "$@" 2>/dev/null | sed -n '/^path/,/^$/p'
}
TINY=(--model llama-3.1-8b --ctx tp=2 --gen tp=1,layout=layer-major-nhd --tokens 2048)
WHOLE=(--model llama-3.1-8b --ctx tp=1 --gen tp=1 --tokens 2048)
# UCX_TLS=tcp is what two hosts would do: no shared memory, no same-host
# reads, so no direct. On one host the gen ranks read the ctx ranks' pools
# (direct read).
run "TCP, 256-byte fragments (ctx TP2 -> gen TP1, layer-major-nhd receiver)" tcp \
  per-block,bounce,auto "${TINY[@]}"
run "TCP, whole blocks (TP1 -> TP1)" tcp per-block,bounce,auto "${WHOLE[@]}"
run "shared memory, 256-byte fragments" "" per-block,bounce,direct,auto "${TINY[@]}"
run "shared memory, whole blocks" "" per-block,bounce,direct,auto "${WHOLE[@]}"
