#!/usr/bin/env python3
"""Profile the gateway under load with py-spy.

Starts an unpaced simulator and a gateway on free loopback ports, drives them
with the bundled bench driver, and records from the gateway process:

- `flame.svg`     py-spy flame graph (open in a browser; width = time)
- `profile.txt`   the same samples summarised: top functions by self time and
                  by total (inclusive) time, with native frames when --native
- `dump.txt`      a `py-spy dump` snapshot of every thread mid-load
- `bench.json`    the bench driver's report for the profiled run

Usage:
    python profiling/profile_gateway.py                     # tiny non-stream, c=64
    python profiling/profile_gateway.py --workload stream   # long NDJSON streams
    python profiling/profile_gateway.py --native --seconds 15 --out profiling/out/run1

Needs py-spy (`pip install py-spy`); run as root or with ptrace permission.
See profiling/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

WORKLOADS = {
    # name: (sim args, bench args)
    "tiny": (["--ttft-ms", "0", "--tokens-per-s", "0", "--tokens", "1"],
             ["--no-stream", "--max-tokens", "1", "--prompt-bytes", "16"]),
    "stream": (["--ttft-ms", "0", "--tokens-per-s", "0", "--tokens", "2000"],
               ["--stream", "--route", "/api/chat", "--max-tokens", "2000"]),
    "users": (["--ttft-ms", "0", "--tokens-per-s", "0", "--tokens", "1"],
              ["--no-stream", "--max-tokens", "1", "--users", "5000"]),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def summarise(raw: Path, out: Path, top: int = 30) -> str:
    """Top functions by self and inclusive samples from py-spy's raw format."""
    total = 0
    inclusive: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] += n
        self_time[frames[-1]] += n
    lines = [f"samples: {total}", "", "self time (where the CPU is):"]
    for frame, n in self_time.most_common(top):
        lines.append(f"  {100 * n / max(total, 1):5.1f}%  {frame}")
    lines += ["", "inclusive time (what it is spent under):"]
    for frame, n in inclusive.most_common(top):
        lines.append(f"  {100 * n / max(total, 1):5.1f}%  {frame}")
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="tiny")
    p.add_argument("--seconds", type=float, default=10.0, help="profiled load duration")
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("--slots", type=int, default=256)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--native", action="store_true", help="include C frames (libuv, syscalls)")
    p.add_argument("--out", default="profiling/out", help="output directory")
    args = p.parse_args()
    if shutil.which("py-spy") is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sim_args, bench_args = WORKLOADS[args.workload]
    sim_port, gw_port = free_port(), free_port()
    py = sys.executable
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen([py, "-m", "ollamamq_fast", "sim", "-p", str(sim_port),
                                       *sim_args], stdout=subprocess.DEVNULL))
        wait_http(f"http://127.0.0.1:{sim_port}/api/version")
        gw = subprocess.Popen([py, "-m", "ollamamq_fast", "serve", "--no-tui", "--state", "", "--no-access-log", "-p", str(gw_port),
                               "-o", f"127.0.0.1:{sim_port}", "--slots", str(args.slots),
                               "--log-level", "warning"], stderr=subprocess.DEVNULL)
        procs.append(gw)
        wait_http(f"http://127.0.0.1:{gw_port}/health")
        bench = subprocess.Popen([py, "-m", "ollamamq_fast", "bench", f"http://127.0.0.1:{gw_port}",
                                  "-c", str(args.concurrency), "-d", str(args.seconds + 2),
                                  "--json", "--quiet", *bench_args], stdout=subprocess.PIPE)
        procs.append(bench)
        time.sleep(1.0)  # past connection set-up
        native = ["--native"] if args.native else []
        raw = out / "profile.raw"
        subprocess.run(["py-spy", "record", "-p", str(gw.pid), "-r", str(args.rate), "-d",
                        str(int(args.seconds)), "-f", "raw", "-o", str(raw), *native],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(out / "dump.txt", "w") as f:
            subprocess.run(["py-spy", "dump", "-p", str(gw.pid), *native], stdout=f, check=False)
        # The flame graph from the same kind of samples, a second short window.
        subprocess.run(["py-spy", "record", "-p", str(gw.pid), "-r", str(args.rate), "-d", "1",
                        "-o", str(out / "flame.svg"), *native],
                       check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        report, _ = bench.communicate(timeout=args.seconds + 60)
        (out / "bench.json").write_bytes(report)
        print(summarise(raw, out / "profile.txt"))
        try:
            data = json.loads(report)
            print("bench:", json.dumps(data.get("summary", data), indent=None)[:600])
        except ValueError:
            pass
        print(f"written: {out}/flame.svg, profile.txt, dump.txt, bench.json")
        return 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    raise SystemExit(main())
