#!/usr/bin/env bash
# A/B comparison with wsedge-load: wsedge ("new") against one peer of ../shared/peers, on
# the same machine in the same run. Each server is pinned to SERVER_CPU (default 0) and
# wsedge-load to LOAD_CPU (default 1); the runs alternate A B A B for ROUNDS rounds (default
# 3); the table reports medians over rounds and the median of the per-round ratios.
#
#   benches/compare.sh SCENARIO PEER [wsedge-load options...]
#     SCENARIO  echo | broadcast
#     PEER      fws | tt | node   (the peers' echo servers on /, broadcast on /pub and /sub)
#   env: ROUNDS, SERVER_CPU, LOAD_CPU, NEW_PORT (8080), NEW_CMD (release wsedge, 1 shard),
#        NAME (table name, default SCENARIO-PEER), WRITE_DOCS=1 to replace the table between
#        <!-- compare:NAME --> and <!-- /compare:NAME --> in docs/benchmarks.md (appended at
#        the end the first time).
#   example: benches/compare.sh broadcast node -c 1000 -s 64 --rate 100 -d 8 -w 2
#
# Server CPU is the server's process-tree CPU over the whole run (connect, warm-up, measured
# window, grace), as a percentage of one core; per-CPU throughput divides the measured rate
# by it, so it slightly understates every server alike.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS_DIR=${PEERS_DIR:-$ROOT/../shared/peers}
SCENARIO=${1:?usage: benches/compare.sh echo|broadcast PEER [wsedge-load options]}
PEER=${2:?usage: benches/compare.sh echo|broadcast PEER [wsedge-load options]}
shift 2
case $SCENARIO in echo | broadcast) ;; *) echo "unknown scenario $SCENARIO" >&2; exit 2 ;; esac
case $PEER in fws | tt | node) ;; *) echo "peer must be fws, tt or node" >&2; exit 2 ;; esac
export NEW_PORT=${NEW_PORT:-8080}
export NEW_CMD=${NEW_CMD:-"$ROOT/target/release/wsedge --shards 1"}
# shellcheck source=/dev/null
source "$PEERS_DIR/scripts/lib.sh"
LOADGEN=$ROOT/target/release/wsedge-load
[ -x "$LOADGEN" ] || { echo "build first: cargo build --release" >&2; exit 1; }
NAME=${NAME:-$SCENARIO-$PEER}
OUT=$RUN_DIR/compare-$NAME
rm -rf "$OUT"; mkdir -p "$OUT" "$RUN_DIR/logs"

targets() { # server -> wsedge-load target arguments
  local base
  if [ "$1" = new ]; then base="ws://127.0.0.1:$NEW_PORT"; else base="ws://127.0.0.1:${PPORT[$1]}"; fi
  case $SCENARIO in
    echo) if [ "$1" = new ]; then echo "$base/echo"; else echo "$base/"; fi ;;
    broadcast)
      if [ "$1" = new ]; then echo "--pub-url $base/pub/bench --sub-url $base/sub/bench"
      else echo "--pub-url $base/pub --sub-url $base/sub"; fi ;;
  esac
}

for s in new "$PEER"; do start_server "$s"; done
for ((r = 1; r <= ROUNDS; r++)); do
  for s in new "$PEER"; do
    t0=$(cpu_ticks $(srv_pids "$s")); w0=$(date +%s%N)
    # shellcheck disable=SC2046
    timeout 120 taskset -c "$LOAD_CPU" "$LOADGEN" "$SCENARIO" $(targets "$s") "$@" \
      --json "$OUT/$s-$r.json" >"$OUT/$s-$r.txt" 2>&1 || log "run $s round $r failed: see $OUT/$s-$r.txt"
    t1=$(cpu_ticks $(srv_pids "$s")); w1=$(date +%s%N)
    awk -v t=$((t1 - t0)) -v w=$((w1 - w0)) 'BEGIN{printf "%.1f\n", t*100/(w/1e7)}' >"$OUT/$s-$r.cpu"
    log "$SCENARIO round $r $s: srv cpu $(cat "$OUT/$s-$r.cpu")%"
    sleep 1
  done
done
for s in new "$PEER"; do stop_server "$s"; done

python3 - "$OUT" "$SCENARIO" "$PEER" "$ROUNDS" "$NAME" "$*" "${WRITE_DOCS:-0}" "$ROOT/docs/benchmarks.md" <<'PY'
import json, os, re, statistics, sys, time
out, scenario, peer, rounds, name, args, write, doc = sys.argv[1:]
rounds = int(rounds)
def load(s, r):
    try:
        j = json.load(open(f"{out}/{s}-{r}.json"))
        cpu = float(open(f"{out}/{s}-{r}.cpu").read())
    except (OSError, ValueError):
        return None
    rate = j["rate_msgs_per_s"] if scenario == "echo" else j["delivered_per_s"]
    row = {"rate": rate, "p50": j["latency"]["p50_us"], "p99": j["latency"]["p99_us"],
           "cpu": cpu, "per_cpu": rate * 100 / cpu if cpu > 0 else float("nan")}
    if scenario == "broadcast":
        row["lost"] = j["lost"]
    return row
runs = {s: [load(s, r) for r in range(1, rounds + 1)] for s in ("new", peer)}
metrics = [("rate", "msgs/s" if scenario == "echo" else "deliveries/s", True),
           ("per_cpu", "per server CPU-second", True), ("cpu", "server CPU %", False),
           ("p50", "p50 µs", False), ("p99", "p99 µs", False)]
if scenario == "broadcast":
    metrics.append(("lost", "lost", False))
def med(xs):
    xs = [x for x in xs if x is not None and x == x]
    return statistics.median(xs) if xs else float("nan")
def fmt(v):
    if v != v: return "n/a"
    return f"{v/1e6:.2f}M" if v >= 1e6 else f"{v/1e3:.1f}k" if v >= 1e4 else f"{v:.0f}" if v >= 10 else f"{v:.2f}"
lines = [f"<!-- compare:{name} -->",
         f"`benches/compare.sh {scenario} {peer} {args}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
         f"{rounds} rounds, medians; ratio = median of per-round wsedge/{peer}.", "",
         f"| metric | wsedge | {peer} | ratio |", "| --- | --- | --- | --- |"]
for key, label, _ in metrics:
    a = [r[key] if r else None for r in runs["new"]]
    b = [r[key] if r else None for r in runs[peer]]
    ratios = [x / y for x, y in zip(a, b) if x is not None and y not in (None, 0)]
    lines.append(f"| {label} | {fmt(med(a))} | {fmt(med(b))} | {med(ratios):.2f}x |" if key != "lost"
                 else f"| {label} | {fmt(med(a))} | {fmt(med(b))} | |")
lines.append(f"<!-- /compare:{name} -->")
table = "\n".join(lines)
print(table)
if write == "1":
    text = open(doc).read()
    pat = re.compile(rf"<!-- compare:{re.escape(name)} -->.*?<!-- /compare:{re.escape(name)} -->", re.S)
    text = pat.sub(lambda _: table, text) if pat.search(text) else text.rstrip("\n") + "\n\n" + table + "\n"
    open(doc, "w").write(text)
PY
