#!/usr/bin/env bash
# Same-run comparison with wrk (a C load generator, so that the generator takes
# little of the 2 cores): tiny non-stream POST /api/generate against
#   direct     the simulator (unpaced, 1 token)
#   nginx      nginx 1 worker, keep-alive upstream (bench/nginx.conf)
#   floor      bench/floor_proxy.py: uvloop + httptools with no features
#   gateway    ollamamq-fast serve --slots 256 (defaults otherwise, no admin port)
#   gateway-py the same gateway with OLLAMAMQ_FAST_PURE=1, when the install is
#              compiled (mypyc): the compiled and the pure build side by side
# each at c=64 and c=1, alternating for ROUNDS rounds; the gateway's CPU per
# request (and the pure gateway's and the floor's) is read from /proc/PID/stat
# around their c=64 runs.
#   bash bench/compare_wrk.sh [seconds] [rounds]      (needs: apt-get install wrk nginx-light)
set -euo pipefail
D=${1:-4}
ROUNDS=${2:-3}
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)" >&2; exit 2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SIM_PORT=$(free_port); GW_PORT=$(free_port); NGINX_PORT=$(free_port); FLOOR_PORT=$(free_port)
TMP=$(mktemp -d)
cleanup() { kill -9 $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
cat > "$TMP/post.lua" <<'EOF'
wrk.method = "POST"
wrk.body   = '{"model":"llama3.2","prompt":"hi","stream":false,"options":{"num_predict":1}}'
wrk.headers["Content-Type"] = "application/json"
EOF
python3 -m ollamamq_fast sim -p "$SIM_PORT" --ttft-ms 0 --tokens-per-s 0 --tokens 1 >/dev/null 2>&1 &
python3 -m ollamamq_fast serve --no-tui --state '' --no-access-log --no-admin -p "$GW_PORT" \
    -o "127.0.0.1:$SIM_PORT" --slots 256 --log-level warning >/dev/null 2>&1 &
GW_PID=$!
GWPY_PID=""
if [ "$(python3 -c 'from ollamamq_fast import buildinfo; print(buildinfo.build())')" = mypyc ]; then
    GWPY_PORT=$(free_port)
    OLLAMAMQ_FAST_PURE=1 python3 -m ollamamq_fast serve --no-tui --state '' --no-access-log --no-admin \
        -p "$GWPY_PORT" -o "127.0.0.1:$SIM_PORT" --slots 256 --log-level warning >/dev/null 2>&1 &
    GWPY_PID=$!
fi
python3 bench/floor_proxy.py "$FLOOR_PORT" "$SIM_PORT" >/dev/null 2>&1 &
FLOOR_PID=$!
HAVE_NGINX=0
if command -v nginx >/dev/null; then
    sed -e "s/SIM_PORT/$SIM_PORT/" -e "s/NGINX_PORT/$NGINX_PORT/" -e "s#/tmp/ollamamq-bench-nginx.pid#$TMP/nginx.pid#" \
        bench/nginx.conf > "$TMP/nginx.conf"
    nginx -c "$TMP/nginx.conf" -p "$TMP" >/dev/null 2>&1 &
    HAVE_NGINX=1
fi
for port in "$SIM_PORT" "$GW_PORT" "$FLOOR_PORT" ${GWPY_PID:+"$GWPY_PORT"}; do
    for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/api/version" >/dev/null && break; sleep 0.1; done
done
sleep 0.5

targets="direct:$SIM_PORT gateway:$GW_PORT floor:$FLOOR_PORT"
[ -n "$GWPY_PID" ] && targets="$targets gateway-py:$GWPY_PORT"
[ "$HAVE_NGINX" = 1 ] && targets="$targets nginx:$NGINX_PORT"
run() {  # run NAME PORT CONNS -> "req/s p50_us"
    wrk -t1 -c"$3" -d"${D}s" -s "$TMP/post.lua" --latency "http://127.0.0.1:$2/api/generate" | python3 -c '
import re, sys
out = sys.stdin.read()
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
v, unit = re.search(r"\s50%\s+([\d.]+)(us|ms|s)", out).groups()
p50 = float(v) * {"us": 1, "ms": 1e3, "s": 1e6}[unit]
bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
print(f"{rps:.0f} {p50:.0f} {bad.group(1) if bad else 0}")'
}
ticks() { awk '{print $14 + 0, $15 + 0}' "/proc/$1/stat"; }  # ticks PID -> user sys
printf "%-6s %-8s %10s %9s %s\n" round target "req/s" "p50_us" "(c=64, then c=1 p50)"
for r in $(seq "$ROUNDS"); do
    for t in $targets; do
        name=${t%%:*}; port=${t##*:}
        wrk -t1 -c64 -d1s -s "$TMP/post.lua" "http://127.0.0.1:$port/api/generate" >/dev/null
        pid=""
        [ "$name" = gateway ] && pid=$GW_PID
        [ "$name" = gateway-py ] && pid=$GWPY_PID
        [ "$name" = floor ] && pid=$FLOOR_PID
        [ -n "$pid" ] && read -r u0 s0 < <(ticks "$pid")
        read -r rps p50 bad < <(run "$name" "$port" 64)
        cpu=""
        if [ -n "$pid" ]; then
            read -r u1 s1 < <(ticks "$pid")
            n=$(python3 -c "print(int($rps * $D))")
            cpu=$(python3 -c "print(f'$name CPU/request: user {($u1-$u0)*1e4/$n:.1f} us, sys {($s1-$s0)*1e4/$n:.1f} us')")
        fi
        read -r _ p50c1 _ < <(run "$name" "$port" 1)
        printf "%-6s %-8s %10s %9s   c=1 p50 %s us %s %s\n" "$r" "$name" "$rps" "$p50" "$p50c1" \
            "$([ "$bad" != 0 ] && echo "NON-2XX: $bad")" "$cpu"
    done
done
