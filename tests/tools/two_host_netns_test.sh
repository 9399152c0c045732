#!/bin/sh
# Two "hosts" on one machine: network namespaces kvb-a-PID and kvb-b-PID
# joined by a veth pair (10.77.X.1 and 10.77.X.2), created and removed here.
# Host A runs one process per ctx rank of a TP2 instance, host B one gen rank
# of a TP1 instance (fan-in) pulling 8 requests over UCX TCP; every request
# must complete and verify, every worker exit 0.
#
# Usage: two_host_netns_test.sh path/to/kvbounce [path]
# Skips (exit 77) without the privilege to create namespaces or without `ip`.
set -u
KVBOUNCE=$1
PULL_PATH=${2:-bounce}
if ! command -v ip >/dev/null 2>&1; then
  echo "SKIP: no 'ip' command (iproute2) to create network namespaces"
  exit 77
fi
NS_A=kvb-a-$$
NS_B=kvb-b-$$
if ! ip netns add "$NS_A" 2>/dev/null; then
  echo "SKIP: cannot create network namespaces here (needs root / CAP_SYS_ADMIN)"
  exit 77
fi
DIR=$(mktemp -d)
PIDS=""
cleanup() {
  for p in $PIDS; do kill -9 "$p" 2>/dev/null; done
  ip netns del "$NS_A" 2>/dev/null
  ip netns del "$NS_B" 2>/dev/null
  rm -rf "$DIR"
}
trap cleanup EXIT INT TERM
ip netns add "$NS_B" || exit 1
# A /24 of its own per run, so parallel runs do not collide.
NET=$(( ($$ % 200) + 20 ))
ADDR_A=10.77.$NET.1
ADDR_B=10.77.$NET.2
ip link add "va$$" type veth peer name "vb$$" || exit 1
ip link set "va$$" netns "$NS_A" || exit 1
ip link set "vb$$" netns "$NS_B" || exit 1
ip -n "$NS_A" addr add "$ADDR_A/24" dev "va$$" || exit 1
ip -n "$NS_B" addr add "$ADDR_B/24" dev "vb$$" || exit 1
for ns in "$NS_A" "$NS_B"; do
  ip -n "$ns" link set lo up || exit 1
done
ip -n "$NS_A" link set "va$$" up || exit 1
ip -n "$NS_B" link set "vb$$" up || exit 1

# TCP only: the hosts share a kernel, so without this UCX would find its
# shared-memory transports.
export UCX_TLS=tcp
SHAPE="--layers 4 --kv-heads 8 --head-dim 64 --tokens 512 --ctx tp=2 --gen tp=1"
REQUESTS=8

# Host A.
for r in 0 1; do
  ip netns exec "$NS_A" "$KVBOUNCE" worker --role ctx --rank "$r" $SHAPE \
    --listen "$ADDR_A:0" --requests $REQUESTS --connect-timeout 30 \
    >"$DIR/ctx$r.out" 2>"$DIR/ctx$r.err" &
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
  case "$ADDR" in
    "$ADDR_A":*) ;;
    *) echo "ctx rank $r listens at '$ADDR', not on host A ($ADDR_A)"; exit 1 ;;
  esac
  PEERS="$PEERS${PEERS:+,}$ADDR"
done

# Host B: reaches host A only through the veth pair.
ip netns exec "$NS_B" "$KVBOUNCE" worker --role gen --rank 0 $SHAPE --peers "$PEERS" \
  --requests $REQUESTS --path "$PULL_PATH" --json "$DIR/gen.json" \
  >"$DIR/gen.out" 2>"$DIR/gen.err"
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
grep -q "\"completed\": $REQUESTS" "$DIR/gen.json" || { echo "gen did not complete $REQUESTS"; cat "$DIR/gen.json"; exit 1; }
grep -q '"mismatches": 0' "$DIR/gen.json" || { echo "mismatches"; exit 1; }
echo "two hosts over veth ($ADDR_A -> $ADDR_B), $PULL_PATH: OK"
