#!/usr/bin/env bash
# TLS benchmarks (issue 6), in one run on one machine:
#  1. wss echo against ws echo on the same wsedge process (one shard on SERVER_CPU):
#     msgs/s and msgs per server CPU-second, 100 conns x 20 B and 100 x 1 KiB, the ratio
#     wss/ws per round;
#  2. TLS handshakes per second per core: `wsedge-load connect --churn` over wss with full
#     handshakes (--tls-no-resume) and with resumption, against wsedge and against nginx,
#     each terminating TLS in front of the same peer-fws backend (wsedge: a proxy route).
# Servers alternate within each round (A B A B). Needs ../shared/peers/setup.sh (nginx,
# peer-fws) and `cargo build --release`. Prints markdown tables.
#   env: ROUNDS (3), DURATION (8), WARMUP (2), SERVER_CPU (0), LOAD_CPU (1), CHURN (3000)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PEERS_DIR=${PEERS_DIR:-$ROOT/../shared/peers}
# shellcheck source=/dev/null
source "$PEERS_DIR/scripts/lib.sh"
LOADGEN=$ROOT/target/release/wsedge-load
WSEDGE=$ROOT/target/release/wsedge
[ -x "$LOADGEN" ] && [ -x "$WSEDGE" ] || { echo "build first: cargo build --release" >&2; exit 1; }
CHURN=${CHURN:-3000}
OUT=$RUN_DIR/tls
rm -rf "$OUT"; mkdir -p "$OUT"

# A CA and a P-256 server certificate for localhost (what a typical deployment uses).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -keyout "$OUT/ca.key" -out "$OUT/ca.pem" -subj /CN=bench-ca 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$OUT/server.key" -out "$OUT/server.csr" -subj /CN=localhost 2>/dev/null
printf 'subjectAltName=DNS:localhost\n' >"$OUT/ext.cnf"
openssl x509 -req -in "$OUT/server.csr" -CA "$OUT/ca.pem" -CAkey "$OUT/ca.key" \
  -CAcreateserial -days 2 -extfile "$OUT/ext.cnf" -out "$OUT/server.pem" 2>/dev/null

WS_PORT=18080 WSS_PORT=18443 NGINX_PORT=18444
cat >"$OUT/wsedge.toml" <<TOML
[runtime]
shards = 1
[[listener]]
name = "plain"
bind = "127.0.0.1:$WS_PORT"
[[listener.route]]
path = "/echo"
kind = "echo"
[[listener]]
name = "tls"
bind = "127.0.0.1:$WSS_PORT"
[listener.tls]
cert = "$OUT/server.pem"
key = "$OUT/server.key"
[[listener.route]]
path = "/echo"
kind = "echo"
[[listener.route]]
path = "/proxy"
kind = "proxy"
upstream = "ws://127.0.0.1:$BACKEND_PORT/"
[admin]
enabled = false
TOML

start_server backend "$LOAD_CPU"
taskset -c "$SERVER_CPU" "$WSEDGE" --config "$OUT/wsedge.toml" >"$RUN_DIR/logs/wsedge-tls.log" 2>&1 &
WSEDGE_PID=$!; STARTED+=("$WSEDGE_PID")
mkdir -p "$OUT/nginx"
render "$ROOT/benches/conf/nginx-tls.conf.in" "$OUT/nginx/nginx.conf" RUNDIR="$OUT/nginx" \
  LISTEN="127.0.0.1:$NGINX_PORT" BACKEND="127.0.0.1:$BACKEND_PORT" CERT="$OUT/server.pem" KEY="$OUT/server.key"
taskset -c "$SERVER_CPU" nginx -p "$OUT/nginx" -c "$OUT/nginx/nginx.conf" -e stderr >"$RUN_DIR/logs/nginx-tls.log" 2>&1 &
NGINX_PID=$!; STARTED+=("$NGINX_PID")
wait_port "$WS_PORT" 15; wait_port "$WSS_PORT" 15; wait_port "$NGINX_PORT" 15
TLSARGS=(--tls-ca "$OUT/ca.pem" --tls-server-name localhost)

# run NAME PID ARGS...: one wsedge-load run pinned to LOAD_CPU; writes NAME.json and NAME.cpu
run() {
  local name=$1 pid=$2; shift 2
  local t0 t1 w0 w1
  t0=$(cpu_ticks "$pid"); w0=$(date +%s%N)
  timeout 120 taskset -c "$LOAD_CPU" "$LOADGEN" "$@" --json "$OUT/$name.json" >"$OUT/$name.txt" 2>&1 \
    || log "run $name failed: see $OUT/$name.txt"
  t1=$(cpu_ticks "$pid"); w1=$(date +%s%N)
  awk -v t=$((t1 - t0)) -v w=$((w1 - w0)) 'BEGIN{printf "%.1f\n", t*100/(w/1e7)}' >"$OUT/$name.cpu"
  sleep 1
}

for ((r = 1; r <= ROUNDS; r++)); do
  for size in 20 1024; do
    run "echo-ws-$size-$r" "$WSEDGE_PID" echo "ws://127.0.0.1:$WS_PORT/echo" -c 100 -s "$size" -d "$DURATION" -w "$WARMUP"
    run "echo-wss-$size-$r" "$WSEDGE_PID" echo "wss://127.0.0.1:$WSS_PORT/echo" -c 100 -s "$size" -d "$DURATION" -w "$WARMUP" "${TLSARGS[@]}"
  done
  for mode in full resumed; do
    extra=(); [ "$mode" = full ] && extra=(--tls-no-resume)
    for srv in wsedge nginx; do
      if [ "$srv" = wsedge ]; then url="wss://127.0.0.1:$WSS_PORT/proxy"; pid=$WSEDGE_PID
      else url="wss://127.0.0.1:$NGINX_PORT/"; pid=$NGINX_PID; fi
      run "hs-$mode-$srv-$r" "$pid" connect "$url" -c 100 -r 1000 --hold "$DURATION" --churn "$CHURN" "${TLSARGS[@]}" "${extra[@]}"
    done
  done
  log "round $r done"
done

python3 - "$OUT" "$ROUNDS" "$DURATION" <<'PY'
import json, statistics, sys
out, rounds, dur = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def j(n): return json.load(open(f"{out}/{n}.json"))
def cpu(n): return float(open(f"{out}/{n}.cpu").read())
med = statistics.median
print("| echo, 100 conns | ws msgs/s | wss msgs/s | wss/ws | ws per CPU-s | wss per CPU-s | wss/ws per CPU |")
print("|---|---|---|---|---|---|---|")
for size in (20, 1024):
    ws = [j(f"echo-ws-{size}-{r}")["rate_msgs_per_s"] for r in range(1, rounds + 1)]
    wss = [j(f"echo-wss-{size}-{r}")["rate_msgs_per_s"] for r in range(1, rounds + 1)]
    wsc = [j(f"echo-ws-{size}-{r}")["rate_msgs_per_s"] / max(cpu(f"echo-ws-{size}-{r}"), 1) * 100 for r in range(1, rounds + 1)]
    wssc = [j(f"echo-wss-{size}-{r}")["rate_msgs_per_s"] / max(cpu(f"echo-wss-{size}-{r}"), 1) * 100 for r in range(1, rounds + 1)]
    ratio = med([b / a for a, b in zip(ws, wss)])
    ratio_c = med([b / a for a, b in zip(wsc, wssc)])
    print(f"| {size} B | {med(ws)/1e3:.0f}k | {med(wss)/1e3:.0f}k | **{ratio:.2f}x** | {med(wsc)/1e3:.0f}k | {med(wssc)/1e3:.0f}k | {ratio_c:.2f}x |")
print()
print("| TLS handshakes (connect --churn) | wsedge /s | nginx /s | wsedge srv CPU | nginx srv CPU | wsedge per CPU-s | nginx per CPU-s | ratio per CPU |")
print("|---|---|---|---|---|---|---|---|")
for mode in ("full", "resumed"):
    row = {}
    for srv in ("wsedge", "nginx"):
        rates, cpus, per = [], [], []
        for r in range(1, rounds + 1):
            n = f"hs-{mode}-{srv}-{r}"
            rep = j(n)
            rate = rep["reconnects"] / dur
            c = cpu(n)
            rates.append(rate); cpus.append(c); per.append(rate / max(c, 1) * 100)
        row[srv] = (rates, cpus, per)
    ratio = med([a / b for a, b in zip(row["wsedge"][2], row["nginx"][2])])
    w, n = row["wsedge"], row["nginx"]
    print(f"| {mode} | {med(w[0]):.0f} | {med(n[0]):.0f} | {med(w[1]):.0f}% | {med(n[1]):.0f}% | {med(w[2]):.0f} | {med(n[2]):.0f} | **{ratio:.2f}x** |")
PY
cleanup
