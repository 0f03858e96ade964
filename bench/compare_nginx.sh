#!/usr/bin/env bash
# Same-run comparison: the bench driver against the gateway, nginx (1 worker,
# keep-alive upstream) and the simulator directly, all on this machine.
#   bash bench/compare_nginx.sh [concurrency] [seconds]
set -euo pipefail
C=${1:-64}
D=${2:-5}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SIM_PORT=$(free_port); GW_PORT=$(free_port); NGINX_PORT=$(free_port)
TMP=$(mktemp -d)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
python3 -m ollamamq_fast sim -p "$SIM_PORT" --ttft-ms 0 --tokens-per-s 0 --tokens 1 >/dev/null 2>&1 &
python3 -m ollamamq_fast serve --no-tui --state '' --no-access-log -p "$GW_PORT" \
    -o "127.0.0.1:$SIM_PORT" --slots 256 --log-level warning >/dev/null 2>&1 &
sed -e "s/SIM_PORT/$SIM_PORT/" -e "s/NGINX_PORT/$NGINX_PORT/" "$(dirname "$0")/nginx.conf" > "$TMP/nginx.conf"
nginx -c "$TMP/nginx.conf" -p "$TMP" >/dev/null 2>&1 &
for url in "http://127.0.0.1:$SIM_PORT/api/version" "http://127.0.0.1:$GW_PORT/health" "http://127.0.0.1:$NGINX_PORT/api/version"; do
    for _ in $(seq 50); do curl -sf "$url" >/dev/null && break; sleep 0.1; done
done
python3 -m ollamamq_fast bench "http://127.0.0.1:$GW_PORT" -c "$C" -d "$D" --warmup 0.5 \
    --no-stream --max-tokens 1 --prompt-bytes 16 --rounds 2 --quiet \
    --baseline "http://127.0.0.1:$SIM_PORT" --compare "http://127.0.0.1:$NGINX_PORT"
