"""Added latency of shared slots (--redis) per request, same run, loopback Redis.

Starts a redis-server, one simulator (no delay: TTFT 0, one token) and three
gateways in front of it: `local` (no Redis) and two replicas `redis-a`,
`redis-b` sharing the simulator's slots through Redis. A single keep-alive
client sends tiny non-stream requests one at a time (c=1), alternating the
targets round by round, and prints p50 / p99 latency per target and the p50
added by shared slots. `redis-a` is measured while `redis-b` idles (the usual
case: a replica with its lease in hand) and, in the `busy-b` rows, while a
second client keeps `redis-b` busy with requests of another user on the same
backend (compared with `local+busy`: the local gateway measured under the same
extra load, since the 2 cores are shared by everything here). Last, the cost of the one Redis script call that a replica makes per
dispatch while requests wait (its own queue or another replica's): p50 / p99
of the round script (sched/shared_slots.py) called from redis-py, as a replica
does, with one backend and another replica waiting.

    python3 bench/shared_slots.py [rounds] [requests-per-round]
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BODY = b'{"model":"llama3.2","prompt":"q","stream":false}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(port: int, path: str = "/", timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not answer {path}")


def spawn(args: list[str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "ollamamq_fast", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure(port: int, n: int, user: str = "bench") -> list[float]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Content-Type": "application/json", "X-User-ID": user}
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        c.request("POST", "/api/generate", BODY, headers)
        r = c.getresponse()
        r.read()
        out.append(time.perf_counter() - t0)
        if r.status != 200:
            raise RuntimeError(f"status {r.status}")
    c.close()
    return out


def busy(port: int, stop: threading.Event) -> None:
    while not stop.is_set():
        measure(port, 20, user="other")


def script_cost(rport: int, n: int) -> None:
    """Time the round script as a waiting replica calls it (asyncio redis-py, loopback)."""
    import asyncio

    import redis.asyncio as aioredis

    sys.path.insert(0, ROOT)
    from ollamamq_fast.sched.shared_slots import _ROUND_LUA

    async def run() -> list[float]:
        r = aioredis.Redis.from_url(f"redis://127.0.0.1:{rport}/1")
        script = r.register_script(_ROUND_LUA)
        prefix = "bench:sched:"
        # Another replica waits for the backend (so the script reads its entry).
        await r.set(prefix + "alive:other", "1", px=60_000)
        await r.hset(prefix + "wait:http://b", "other", f"5:{int(time.time() * 1000)}")
        out = []
        for k in range(n):
            args = ["me", prefix, 3000, 10_000, 60_000, 1, "alice", "1.0", 1, "alice", "1",
                    "http://b", 4, k % 4, 1, 1]
            t0 = time.perf_counter()
            await script(args=args)
            out.append(time.perf_counter() - t0)
        await r.flushdb()
        await r.aclose()
        return out

    times = sorted(asyncio.run(run()))
    print(f"round script per call: p50 {times[len(times) // 2] * 1e6:.0f} µs, "
          f"p99 {times[int(len(times) * 0.99)] * 1e6:.0f} µs")


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise SystemExit("redis-server is not installed")
    tmp = tempfile.mkdtemp()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        rport = free_port()
        procs.append(subprocess.Popen([redis_server, "--port", str(rport), "--bind", "127.0.0.1",
                                       "--save", "", "--dir", tmp],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        sport = free_port()
        procs.append(spawn(["sim", "--port", str(sport), "--ttft-ms", "0", "--tokens", "1",
                            "--tokens-per-s", "0"]))
        wait_http(sport)
        ports = {name: free_port() for name in ("local", "redis-a", "redis-b")}
        for name, port in ports.items():
            args = ["serve", "--no-tui", "--no-admin", "--state", "", "--log-file", "",
                    "--no-access-log", "-p", str(port), "--backend-urls",
                    f"http://127.0.0.1:{sport}", "--slots", "4"]
            if name != "local":
                args += ["--redis", f"redis://127.0.0.1:{rport}/0"]
            procs.append(spawn(args))
        for port in ports.values():
            wait_http(port, "/ready")
        for port in ports.values():
            measure(port, 200)  # warm up: connections, leases
        rows: dict[str, list[float]] = {"local": [], "redis-a": [], "local+busy": [], "busy-b": []}
        for _ in range(rounds):
            rows["local"].append(statistics.median(measure(ports["local"], n)))
            rows["redis-a"].append(statistics.median(measure(ports["redis-a"], n)))
            stop = threading.Event()
            t = threading.Thread(target=busy, args=(ports["redis-b"], stop))
            t.start()
            time.sleep(0.3)
            rows["local+busy"].append(statistics.median(measure(ports["local"], n)))
            rows["busy-b"].append(statistics.median(measure(ports["redis-a"], n)))
            stop.set()
            t.join()
        print(f"c=1, {rounds} rounds x {n} requests, p50 per round in µs")
        for name, values in rows.items():
            print(f"{name:10s} " + " ".join(f"{v * 1e6:7.0f}" for v in values))
        for name, base in (("redis-a", "local"), ("busy-b", "local+busy")):
            added = [r - loc for r, loc in zip(rows[name], rows[base], strict=True)]
            print(f"added p50 {name:10s} " + " ".join(f"{a * 1e6:+6.0f}" for a in added)
                  + f"   median {statistics.median(added) * 1e6:+.0f} µs")
        script_cost(rport, n)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
