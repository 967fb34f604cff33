#!/usr/bin/env bash
# Proxy route benchmark (issue 5): wsedge with one shard and a `proxy` route to the
# peer-fws backend, against direct, nginx and HAProxy, with ../shared/peers/scripts/proxy.sh
# (the proxy under test alone on CPU 0; backend and wsbench share CPU 1).
#   usage: benches/scripts/proxy.sh [targets...]   default: direct nginx haproxy new
#   env:   ROUNDS=2 and everything proxy.sh reads (SCENARIOS, DURATION, LAT_RATE, ...);
#          WSEDGE_IO=uring|epoll (default uring)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PEERS=${PEERS_DIR:-$ROOT/../shared/peers}
BIN=$ROOT/target/release/wsedge
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }
CONF=$(mktemp --suffix=.toml)
trap 'rm -f "$CONF"' EXIT
PORT=${NEW_PORT:-8090}
BACKEND_PORT=${BACKEND_PORT:-9001}
cat >"$CONF" <<TOML
[[listener]]
name = "proxy"
bind = "127.0.0.1:$PORT"
[[listener.route]]
path = "/echo"
kind = "proxy"
upstream = "ws://127.0.0.1:$BACKEND_PORT/"
[admin]
enabled = false
TOML
"$BIN" check "$CONF" >/dev/null
[ $# -eq 0 ] && set -- direct nginx haproxy new
ROUNDS=${ROUNDS:-2} NEW_PORT=$PORT NEW_PATH=/echo \
  NEW_CMD="$BIN run --config $CONF --shards 1 --io ${WSEDGE_IO:-uring}" \
  exec "$PEERS/scripts/proxy.sh" "$@"
