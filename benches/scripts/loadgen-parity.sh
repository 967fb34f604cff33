#!/usr/bin/env bash
# Load generator capacity (issue 3): wsedge-load echo against wsbench (../shared/peers), both
# driving the same fastwebsockets echo server (peer-fws, SERVER_CPU) from one core
# (LOAD_CPU), 100 connections x SIZE bytes, closed loop, alternating A B for ROUNDS rounds.
# The client that is faster moves more messages: the server has headroom when both clients
# saturate their core. Prints one line per run and the median ratio wsedge-load / wsbench.
#   env: ROUNDS (3), DURATION (8), WARMUP (2), SIZE (20), CONNS (100)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PEERS_DIR=${PEERS_DIR:-$ROOT/../shared/peers}
# shellcheck source=/dev/null
source "$PEERS_DIR/scripts/lib.sh"
LOADGEN=$ROOT/target/release/wsedge-load
[ -x "$LOADGEN" ] || { echo "build first: cargo build --release" >&2; exit 1; }
SIZE=${SIZE:-20} CONNS=${CONNS:-100}
OUT=$RUN_DIR/parity; rm -rf "$OUT"; mkdir -p "$OUT"
start_server fws
url="ws://127.0.0.1:${PPORT[fws]}/"
for ((r = 1; r <= ROUNDS; r++)); do
  wb=$(wsb_echo fws "$CONNS" "$SIZE" "$DURATION" "$WARMUP")
  wbr=$(field msgs_per_s "$wb")
  timeout 60 taskset -c "$LOAD_CPU" "$LOADGEN" echo "$url" -c "$CONNS" -s "$SIZE" -d "$DURATION" \
    -w "$WARMUP" --json "$OUT/wl-$r.json" >"$OUT/wl-$r.txt" 2>&1
  wlr=$(python3 -c "import json;print(round(json.load(open('$OUT/wl-$r.json'))['rate_msgs_per_s']))")
  echo "round $r: wsbench $wbr msg/s ($(field client_cpu_pct "$wb")% client cpu), wsedge-load $wlr msg/s" | tee -a "$OUT/rounds.txt"
  echo "$wbr $wlr" >>"$OUT/pairs.txt"
  sleep 1
done
python3 -c "import statistics,sys; r=[float(b)/float(a) for a,b in (l.split() for l in open(sys.argv[1]))]; print('median ratio wsedge-load / wsbench: %.2fx (rounds: %s)' % (statistics.median(r), ', '.join('%.2f' % x for x in r)))" "$OUT/pairs.txt"
cleanup
