#!/usr/bin/env python3
"""The data plane's targets, measured side by side in one run, printed as ratios.

    python3 bench/targets.py [--seconds 4] [--rounds 3] [--compare CHECKOUT]
                                                            (needs wrk; nginx optional)

Starts, on loopback ports: the simulator (unpaced), nginx (bench/nginx.conf),
the feature-less floor proxy (bench/floor_proxy.py), and the gateway in the
quick-start configuration -- access log, admin API and SQLite state on, in a
temporary folder, `--slots` high enough not to queue -- plus the same gateway
forced to pure Python when the install is compiled. Every measurement
alternates the targets within a round, so the machine's drift between runs
(up to 1.6x here) cancels out of the ratios.

Streams come from a second backend, bench/stream_source.py, which writes the
same pre-built 100-line Ollama stream (head and every line in one write, as
the unpaced simulator does) for every request: the simulator renders each
line in Python and was the slowest process in the chain, so every proxy in
front of it relayed exactly its rate. A second nginx, floor and gateway stand
in front of that source. What it measures:

1. tiny non-stream POST /api/generate at c=64: req/s and CPU per request
   (utime+stime from /proc around the run) -> gateway/floor;
2. a 100-line NDJSON stream at c=32 from the stream source: lines/s ->
   gateway/nginx;
3. c=1: the p50 each proxy adds over the direct backend -> gateway/floor;
4. paced load at half of nginx's maximum rate: the p99 the gateway adds over
   the direct backend. wrk is a closed-loop generator: each connection waits
   `delay()` ms before its next request, which approximates an open-loop
   arrival rate while responses take far less than the delay.

`--compare CHECKOUT` adds a gateway run from another checkout (built in place:
`python3 setup.py build_ext --inplace` there) to every round, as `compared`:
an A/B of two versions of the code in one run, with its own ratios printed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
TICK = os.sysconf("SC_CLK_TCK")

TINY = '{"model":"llama3.2","prompt":"hi","stream":false,"options":{"num_predict":1}}'
STREAM_LINES = 100
STREAM = ('{"model":"llama3.2","prompt":"hi","stream":true,"options":{"num_predict":'
          f'{STREAM_LINES}}}}}')

# The targets (issue 12): (name, comparison, bound).
TARGETS = (
    ("tiny c=64 req/s, gateway / floor", ">=", 0.7),
    ("tiny c=64 CPU per request, gateway / floor", "<=", 1.45),
    ("tiny c=64 req/s, pure-Python gateway / floor", ">=", 0.5),
    ("stream c=32 lines/s, gateway / nginx", ">=", 1.3),
    ("c=1 added p50, gateway / floor", "<=", 1.5),
    ("paced at nginx max / 2: gateway added p99 (ms)", "<", 1.0),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(port: int, path: str = "/api/version", timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(
                f"http://127.0.0.1:{port}{path}", timeout=1) as r:
            if r.status < 500:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing answers on port {port} after {timeout:g} s")


@dataclass
class Target:
    name: str
    port: int
    pids: list[int] = field(default_factory=list)  # whose CPU is counted (empty: not counted)
    stream_port: int = 0  # the same proxy in front of the stream source


@dataclass
class WrkResult:
    rps: float
    p50_us: float
    p99_us: float
    errors: int


_LAT = re.compile(r"^\s+(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)


def wrk(tmp: Path, port: int, body: str, conns: int, seconds: float,
        delay_ms: int = 0) -> WrkResult:
    script = tmp / f"post-{abs(hash((body, delay_ms)))}.lua"
    if not script.exists():
        lua = (f"wrk.method = 'POST'\nwrk.body = '{body}'\n"
               "wrk.headers['Content-Type'] = 'application/json'\n")
        if delay_ms:
            lua += f"function delay() return {delay_ms} end\n"
        script.write_text(lua)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", "-s", str(script), "--latency",
         f"http://127.0.0.1:{port}/api/generate"],
        capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = {q: float(v) * {"us": 1, "ms": 1e3, "s": 1e6}[u] for q, v, u in _LAT.findall(out)}
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(bad.group(1)) if bad else 0
    errors += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return WrkResult(rps, lat.get("50", 0.0), lat.get("99", 0.0), errors)


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total


def children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait()


def spawn(procs: list[subprocess.Popen[bytes]], cmd: list[str],
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    # Started from / (absolute paths only): `python -m` puts its working folder
    # first on sys.path, ahead of PYTHONPATH (which --compare relies on).
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, **(env or {})}, start_new_session=True, cwd="/")
    procs.append(p)
    return p


def compiled() -> bool:
    try:
        from ollamamq_fast import buildinfo  # type: ignore[attr-defined]
    except ImportError:
        return False
    return bool(buildinfo.build() == "mypyc")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each wrk run")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    ap.add_argument("--compare", metavar="CHECKOUT",
                    help="also run the gateway from this checkout (an A/B in one run)")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    d, rounds = args.seconds, args.rounds
    tmp = Path(tempfile.mkdtemp(prefix="ollamamq-targets-"))
    py = sys.executable
    with processes() as procs:
        sim_port, source_port = free_port(), free_port()
        spawn(procs, [py, "-m", "ollamamq_fast", "sim", "-p", str(sim_port), "--ttft-ms", "0",
                      "--tokens-per-s", "0", "--tokens", str(STREAM_LINES)])
        spawn(procs, [py, str(HERE / "stream_source.py"), str(source_port), str(STREAM_LINES)])
        wait_ready(sim_port)
        wait_ready(source_port)
        targets = [Target("direct", sim_port, stream_port=source_port)]

        def gateway(name: str, backend: int, env: dict[str, str] | None = None
                    ) -> tuple[int, int]:
            port = free_port()
            state = tmp / f"{name}-{backend}"
            state.mkdir()
            p = spawn(procs, [py, "-m", "ollamamq_fast", "serve", "--no-tui", "-p", str(port),
                              "-o", f"127.0.0.1:{backend}", "--slots", "1024",
                              "--state", str(state / "state.db"),
                              "--log-file", str(state / "access.log"), "--admin-port", "0",
                              "--log-level", "warning"], env)
            wait_ready(port)
            return port, p.pid

        def floor(backend: int) -> tuple[int, int]:
            port = free_port()
            p = spawn(procs, [py, str(HERE / "floor_proxy.py"), str(port), str(backend)])
            wait_ready(port)
            return port, p.pid

        def nginx(backend: int) -> tuple[int, list[int]]:
            port = free_port()
            conf = tmp / f"nginx-{backend}.conf"
            conf.write_text((HERE / "nginx.conf").read_text().replace(
                "SIM_PORT", str(backend)).replace("NGINX_PORT", str(port)).replace(
                "/tmp/ollamamq-bench-nginx.pid", str(tmp / f"nginx-{backend}.pid")))
            master = spawn(procs, ["nginx", "-c", str(conf), "-p", str(tmp)])
            wait_ready(port)
            return port, [master.pid, *children(master.pid)]

        variants: list[tuple[str, dict[str, str] | None]] = [
            ("gateway", None), ("gateway-py", {"OLLAMAMQ_FAST_PURE": "1"})]
        if args.compare:
            variants.append(("compared", {"PYTHONPATH": str(Path(args.compare).resolve())}))
        for name, env in variants:
            if name == "gateway-py" and not compiled():
                continue
            port, pid = gateway(name, sim_port, env)
            targets.append(Target(name, port, [pid], gateway(name, source_port, env)[0]))
        port, pid = floor(sim_port)
        targets.append(Target("floor", port, [pid], floor(source_port)[0]))
        if shutil.which("nginx"):
            port, pids = nginx(sim_port)
            targets.append(Target("nginx", port, pids, nginx(source_port)[0]))
        names = [t.name for t in targets]
        print(f"targets: {', '.join(names)}; {rounds} rounds of {d:g} s each, alternating")
        print(f"{'round':<6}{'target':<12}{'tiny r/s':>10}{'cpu us/req':>11}{'c1 p50 us':>10}"
              f"{'stream lines/s':>15}")
        tiny: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}
        c1: dict[str, list[float]] = {n: [] for n in names}
        stream: dict[str, list[float]] = {n: [] for n in names}
        for r in range(1, rounds + 1):
            for t in targets:
                wrk(tmp, t.port, TINY, 64, 1)  # warm up
                before = cpu_ticks(t.pids)
                res = wrk(tmp, t.port, TINY, 64, d)
                used = cpu_ticks(t.pids) - before
                tiny[t.name].append(res.rps)
                if t.pids and res.rps:
                    cpu[t.name].append(used / TICK * 1e6 / (res.rps * d))
                c1[t.name].append(wrk(tmp, t.port, TINY, 1, d).p50_us)
                wrk(tmp, t.stream_port, STREAM, 32, 1)  # warm up
                st = wrk(tmp, t.stream_port, STREAM, 32, d)
                stream[t.name].append(st.rps * STREAM_LINES)
                errors = res.errors + st.errors
                cpu_txt = f"{cpu[t.name][-1]:.1f}" if t.pids else "-"
                print(f"{r:<6}{t.name:<12}{res.rps:>10.0f}{cpu_txt:>11}{c1[t.name][-1]:>10.0f}"
                      f"{stream[t.name][-1]:>15.0f}" + (f"  ERRORS {errors}" if errors else ""))
        med = statistics.median
        paced: dict[str, float] = {}
        if "nginx" in tiny:
            rate = med(tiny["nginx"]) / 2
            conns = max(1, round(rate / 1000))  # 1 ms between a connection's requests
            print(f"paced load: about {conns * 1000:.0f} req/s offered "
                  f"(half of nginx's {med(tiny['nginx']):.0f}), {conns} connections, p99:")
            for t in targets:
                if t.name in ("direct", "gateway", "gateway-py", "floor", "nginx"):
                    paced[t.name] = wrk(tmp, t.port, TINY, conns, d, delay_ms=1).p99_us
                    print(f"      {t.name:<12}{paced[t.name]:>10.0f} us")
        results: dict[str, float] = {}
        if "floor" in tiny:
            results[TARGETS[0][0]] = med(tiny["gateway"]) / med(tiny["floor"])
            if cpu["gateway"] and cpu["floor"]:
                results[TARGETS[1][0]] = med(cpu["gateway"]) / med(cpu["floor"])
            if "gateway-py" in tiny:
                results[TARGETS[2][0]] = med(tiny["gateway-py"]) / med(tiny["floor"])
            floor_added = med(c1["floor"]) - med(c1["direct"])
            if floor_added > 0:
                results[TARGETS[4][0]] = (med(c1["gateway"]) - med(c1["direct"])) / floor_added
        if "nginx" in stream:
            results[TARGETS[3][0]] = med(stream["gateway"]) / med(stream["nginx"])
        if paced:
            results[TARGETS[5][0]] = (paced["gateway"] - paced["direct"]) / 1000
        print("\nmedians of the rounds; the targets of issue 12:")
        for name, op, bound in TARGETS:
            if name not in results:
                print(f"  {name:<50} (not measured)")
                continue
            value = results[name]
            ok = {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]
            print(f"  {name:<50} {value:7.2f}   target {op} {bound:g}   {'met' if ok else 'MISSED'}")
        for name in names:
            if cpu[name]:
                print(f"  CPU per tiny request, {name}: {med(cpu[name]):.1f} us")
        if "compared" in tiny and "floor" in tiny:
            print(f"  the compared checkout ({args.compare}): req/s / floor "
                  f"{med(tiny['compared']) / med(tiny['floor']):.2f}, CPU / floor "
                  f"{med(cpu['compared']) / med(cpu['floor']):.2f}"
                  + (f", streams / nginx {med(stream['compared']) / med(stream['nginx']):.2f}"
                     if "nginx" in stream else "")
                  + f"; the gateway's streams / compared's "
                  f"{med(stream['gateway']) / med(stream['compared']):.2f}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
