#!/usr/bin/env bash
# Echo cost at a fixed rate: server CPU time per message, wsedge vs peers, alternating rounds.
#
# Saturated echo runs on this 2-core machine are bounded by the load generator as much as by
# the server (both sit at 95+% CPU), so their ratios are noisy. At a fixed rate below
# saturation the server's CPU time per message is a direct, steadier measure of its cost.
#
#   usage: benches/scripts/echo-cpu.sh            (from the repository root)
#   env:   RATE=60000 CONNS=100 SIZES="20 1024 16384" ROUNDS=3 DURATION=8 WARMUP=2
#          SERVER_CPU=0 LOAD_CPU=1 PEERS=../shared/peers
# Prints one line per run and a Markdown table of medians (µs of server CPU per message).
set -euo pipefail
RATE=${RATE:-60000}; CONNS=${CONNS:-100}; SIZES=${SIZES:-"20 1024 16384"}
ROUNDS=${ROUNDS:-3}; DURATION=${DURATION:-8}; WARMUP=${WARMUP:-2}
SERVER_CPU=${SERVER_CPU:-0}; LOAD_CPU=${LOAD_CPU:-1}
PEERS=${PEERS:-../shared/peers}
LOAD=target/release/wsedge-load
[ -x "$LOAD" ] && [ -x target/release/wsedge ] || { echo "run cargo build --release first" >&2; exit 2; }
FWS=$PEERS/rust/target/release/peer-fws
[ -x "$FWS" ] || { echo "peer-fws missing: run $PEERS/setup.sh" >&2; exit 2; }

ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }   # utime+stime in clock ticks (1/100 s)
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; return 1; }

declare -A PIDS URLS
taskset -c "$SERVER_CPU" target/release/wsedge --shards 1 >/dev/null 2>&1 & PIDS[wsedge]=$!; URLS[wsedge]=ws://127.0.0.1:8080/echo
taskset -c "$SERVER_CPU" "$FWS" >/dev/null 2>&1 & PIDS[fws]=$!; URLS[fws]=ws://127.0.0.1:9003/echo
if [ -n "${WITH_EPOLL:-}" ]; then
  cfg=$(mktemp); target/release/wsedge print-config | sed 's/:8080/:8089/; s/:9090/:9099/' > "$cfg"
  taskset -c "$SERVER_CPU" target/release/wsedge run --config "$cfg" --shards 1 --io epoll >/dev/null 2>&1 &
  PIDS[wsedge-epoll]=$!; URLS[wsedge-epoll]=ws://127.0.0.1:8089/echo
fi
SERVERS="fws wsedge${WITH_EPOLL:+ wsedge-epoll}"
trap 'kill ${PIDS[@]} 2>/dev/null || true' EXIT
wait_port 8080; wait_port 9003; [ -z "${WITH_EPOLL:-}" ] || wait_port 8089

declare -A RES
for size in $SIZES; do
  for round in $(seq "$ROUNDS"); do
    for srv in $SERVERS; do
      pid=${PIDS[$srv]}
      json=$(mktemp)
      taskset -c "$LOAD_CPU" "$LOAD" echo "${URLS[$srv]}" -c "$CONNS" -s "$size" --rate "$RATE" \
        -d "$DURATION" -w "$WARMUP" --json "$json" >/dev/null 2>&1 &
      lp=$!
      sleep "$WARMUP"; t0=$(ticks "$pid"); s0=$(date +%s.%N)
      wait $lp || { echo "load run failed for $srv" >&2; exit 1; }
      t1=$(ticks "$pid"); s1=$(date +%s.%N)
      msgs=$(python3 -c "import json;print(json.load(open('$json'))['messages'])")
      p99=$(python3 -c "import json;print(json.load(open('$json'))['latency']['p99_us'])")
      us=$(python3 -c "print(round(($t1-$t0)*10000/$msgs, 3))")
      cpu=$(python3 -c "print(round(($t1-$t0)/(($s1-$s0)*100)*100))")
      echo "size=$size round=$round server=$srv msgs=$msgs srv_cpu_pct=$cpu us_cpu_per_msg=$us p99_us=$p99"
      RES[$size,$srv]="${RES[$size,$srv]:-} $us"
      rm -f "$json"
    done
  done
done
median() { python3 -c "import statistics,sys;print(statistics.median(map(float,sys.argv[1:])))" $*; }
echo
echo "| size | fws µs CPU/msg | wsedge µs CPU/msg | wsedge cost vs fws |"
echo "|---|---|---|---|"
for size in $SIZES; do
  f=$(median ${RES[$size,fws]}); w=$(median ${RES[$size,wsedge]})
  echo "| $size B | $f | $w | $(python3 -c "print(f'{$w/$f:.2f}x')") |"
done
