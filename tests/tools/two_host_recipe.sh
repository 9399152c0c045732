#!/bin/sh
# The README's two-host recipe ("Running across processes and hosts") on one
# host: two ctx workers and one gen worker run 12 requests on their own, with
# no controller; every request completes and verifies, every worker exits 0.
# Usage: two_host_recipe.sh path/to/kvbounce [path]
set -u
KVBOUNCE=$1
PULL_PATH=${2:-per-block}
DIR=$(mktemp -d)
PIDS=""
cleanup() {
  for p in $PIDS; do kill -9 "$p" 2>/dev/null; done
  rm -rf "$DIR"
}
trap cleanup EXIT
SHAPE="--layers 4 --kv-heads 8 --head-dim 64 --tokens 512 --ctx tp=2 --gen tp=1"

# Host A: one process per ctx rank; port 0 here (the README uses fixed ports).
for r in 0 1; do
  "$KVBOUNCE" worker --role ctx --rank "$r" $SHAPE --listen 127.0.0.1:0 --requests 12 \
    --connect-timeout 30 >"$DIR/ctx$r.out" 2>"$DIR/ctx$r.err" &
  PIDS="$PIDS $!"
done
PEERS=""
for r in 0 1; do
  i=0
  until grep -q '^ready ' "$DIR/ctx$r.out" 2>/dev/null; do
    i=$((i + 1))
    if [ "$i" -gt 300 ]; then echo "ctx rank $r never printed ready"; cat "$DIR/ctx$r.err"; exit 1; fi
    sleep 0.1
  done
  ADDR=$(sed -n 's/^ready \([^ ]*\) .*/\1/p' "$DIR/ctx$r.out")
  PEERS="$PEERS${PEERS:+,}$ADDR"
done

# Host B: the gen rank pulls requests 1..12 from both ctx ranks and verifies.
"$KVBOUNCE" worker --role gen --rank 0 $SHAPE --peers "$PEERS" --requests 12 --path "$PULL_PATH" \
  --json "$DIR/gen.json" >"$DIR/gen.out" 2>"$DIR/gen.err"
GEN=$?
STATUS=0
for p in $PIDS; do
  wait "$p" || STATUS=1
done
PIDS=""
cat "$DIR/gen.out"
if [ "$GEN" -ne 0 ] || [ "$STATUS" -ne 0 ]; then
  echo "FAILED: gen exit $GEN, ctx exit $STATUS"
  cat "$DIR"/*.err "$DIR"/ctx*.out
  exit 1
fi
grep -q '"completed": 12' "$DIR/gen.json" || { echo "gen did not complete 12"; exit 1; }
grep -q '"mismatches": 0' "$DIR/gen.json" || { echo "mismatches"; exit 1; }
for r in 0 1; do
  grep -q '12 publications settled, 12 served, 0 failed' "$DIR/ctx$r.out" || { echo "ctx $r"; exit 1; }
done
echo "two-host recipe: OK"
