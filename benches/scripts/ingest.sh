#!/usr/bin/env bash
# Ingest benchmark (issue 5): ~200-byte JSON telemetry readings (varied values:
# `wsedge-load ingest --telemetry`) from 10 wsedge-load connections into an
# ingest route of wsedge (one shard on SERVER_CPU), validated (a real JSON parse), batched
# (1000 messages / 1 MiB / 100 ms), framed as NDJSON, compressed (zstd or none), and sent to
# a WebSocket sink: a second wsedge on LOAD_CPU whose `subscribe` route takes the batches
# (and answers the sink's acknowledgement pings). Reports accepted messages/s, server CPU,
# messages per server CPU-second and the compression ratio (NDJSON bytes / bytes sent).
#   env: ROUNDS (3), DURATION (8), WARMUP (2), SERVER_CPU (0), LOAD_CPU (1), CONNS (10)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PEERS_DIR=${PEERS_DIR:-$ROOT/../shared/peers}
# shellcheck source=/dev/null
source "$PEERS_DIR/scripts/lib.sh"
LOADGEN=$ROOT/target/release/wsedge-load
WSEDGE=$ROOT/target/release/wsedge
[ -x "$LOADGEN" ] && [ -x "$WSEDGE" ] || { echo "build first: cargo build --release" >&2; exit 1; }
CONNS=${CONNS:-10}
OUT=$RUN_DIR/ingest
rm -rf "$OUT"; mkdir -p "$OUT"
UP_PORT=19100 IN_PORT=19180 ADMIN_PORT=19190

cat >"$OUT/upstream.toml" <<TOML
[runtime]
shards = 1
[[listener]]
bind = "127.0.0.1:$UP_PORT"
[[listener.route]]
path = "/sink/{topic}"
kind = "subscribe"
[admin]
enabled = false
TOML
taskset -c "$LOAD_CPU" "$WSEDGE" --config "$OUT/upstream.toml" >"$RUN_DIR/logs/ingest-up.log" 2>&1 &
STARTED+=("$!")
wait_port "$UP_PORT" 15

for comp in zstd none; do
  cat >"$OUT/wsedge-$comp.toml" <<TOML
[runtime]
shards = 1
[[listener]]
bind = "127.0.0.1:$IN_PORT"
[[listener.route]]
path = "/ingest"
kind = "ingest"
format = "json"
sink = "up"
[[sink]]
name = "up"
kind = "websocket"
url = "ws://127.0.0.1:$UP_PORT/sink/batches"
framing = "ndjson"
compression = "$comp"
max_batch_messages = 1000
max_batch_bytes = 1048576
max_batch_delay_ms = 100
[admin]
bind = "127.0.0.1:$ADMIN_PORT"
TOML
done

metric() { # name -> value from /metrics
  curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" | awk -v n="$1" '$1 ~ "^"n"({|$)" {s += $2} END {print s + 0}'
}

for ((r = 1; r <= ROUNDS; r++)); do
  for comp in zstd none; do
    taskset -c "$SERVER_CPU" "$WSEDGE" --config "$OUT/wsedge-$comp.toml" >"$RUN_DIR/logs/ingest-$comp.log" 2>&1 &
    pid=$!; STARTED+=("$pid")
    wait_port "$IN_PORT" 15; sleep 0.5
    t0=$(cpu_ticks "$pid"); w0=$(date +%s%N)
    timeout 120 taskset -c "$LOAD_CPU" "$LOADGEN" ingest "ws://127.0.0.1:$IN_PORT/ingest" -c "$CONNS" --telemetry \
      -d "$DURATION" -w "$WARMUP" --metrics "http://127.0.0.1:$ADMIN_PORT/metrics" \
      --json "$OUT/$comp-$r.json" >"$OUT/$comp-$r.txt" 2>&1 || log "run $comp $r failed"
    t1=$(cpu_ticks "$pid"); w1=$(date +%s%N)
    sleep 0.5   # the last batch (max_batch_delay_ms) goes out
    echo "$(metric wsedge_sink_messages_total) $(metric wsedge_sink_bytes_written_total)" >"$OUT/$comp-$r.sink"
    awk -v t=$((t1 - t0)) -v w=$((w1 - w0)) 'BEGIN{printf "%.1f\n", t*100/(w/1e7)}' >"$OUT/$comp-$r.cpu"
    stop_pid "$pid"
    log "round $r $comp: srv cpu $(cat "$OUT/$comp-$r.cpu")% sink $(cat "$OUT/$comp-$r.sink")"
  done
done

python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
med = statistics.median
print("| compression | accepted msgs/s | server CPU | msgs per server CPU-s | NDJSON bytes per message | bytes sent per message | ratio |")
print("|---|---|---|---|---|---|---|")
for comp in ("zstd", "none"):
    rate, cpu, per, bpm, line = [], [], [], [], []
    for r in range(1, rounds + 1):
        j = json.load(open(f"{out}/{comp}-{r}.json"))
        c = float(open(f"{out}/{comp}-{r}.cpu").read())
        msgs, sent = map(float, open(f"{out}/{comp}-{r}.sink").read().split())
        rate.append(j["rate_msgs_per_s"]); cpu.append(c); per.append(j["rate_msgs_per_s"] / max(c, 1) * 100)
        bpm.append(sent / max(msgs, 1))
        # An NDJSON line is the message plus its newline.
        line.append(j["sent_bytes"] / max(j["sent"], 1) + 1)
    print(f"| {comp} | {med(rate)/1e3:.0f}k | {med(cpu):.0f}% | {med(per)/1e3:.0f}k | {med(line):.0f} | {med(bpm):.1f} | {med(line)/med(bpm):.1f}x |")
PY
cleanup
