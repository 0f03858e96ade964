#!/usr/bin/env python3
"""Instructions per request, counted by valgrind's callgrind: a figure the machine's load cannot move.

Timings on this VM drift up to 1.6x between runs and swing further while
other work runs; callgrind counts the instructions executed, which are the
same for the same code and inputs whatever else the machine is doing. Use it
to tell whether a change to the data plane made it cheaper, then confirm the
speed with the interleaved bench (`bench/targets.py`).

    python profiling/instructions.py hotpath [--route generate|chat|stream]
        the gateway's own Python per request (profiling/hotpath.py, no sockets),
        by difference of two runs, so start-up cancels out
    python profiling/instructions.py process gateway|floor [-n 2000] [--stream]
        a whole proxy process under load (uvloop, httptools, syscall wrappers,
        the access-log thread: all user-space work, no kernel time), the
        gateway in the quick-start configuration, counted between
        `callgrind_control --zero` and `--dump` while N keep-alive requests run;
        with --stream each request is a 100-line NDJSON stream from
        bench/stream_source.py (the stream target's backend) instead of a tiny
        answer from the simulator

Needs valgrind (Debian package `valgrind`). About a minute per figure.
"""

from __future__ import annotations

import argparse
import glob
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# valgrind must run the interpreter itself, not a shim script (pyenv, venvs' links are fine).
PYTHON = os.path.realpath(sys.executable)
TINY = {"model": "llama3.2", "prompt": "hi", "stream": False, "options": {"num_predict": 1}}


def _collected(args: list[str]) -> int:
    out = tempfile.mktemp(prefix="callgrind.")
    try:
        run = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                              *args], capture_output=True, text=True, check=False)
        found = re.search(r"Collected : (\d+)", run.stderr)
        if run.returncode != 0 or found is None:
            raise SystemExit(f"callgrind run failed ({run.returncode}):\n{run.stderr[-2000:]}")
        return int(found.group(1))
    finally:
        for f in glob.glob(out + "*"):
            os.unlink(f)


def hotpath(route: str, low: int, high: int) -> float:
    """Instructions per request of profiling/hotpath.py, by difference."""
    script = str(ROOT / "profiling" / "hotpath.py")

    def count(n: int) -> int:
        return _collected([PYTHON, script, "--route", route, "-n", str(n), "--rounds", "1"])

    return (count(high) - count(low)) / (high - low)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"nothing listens on port {port} after {timeout:g} s")


def _requests(port: int, n: int, stream: bool = False) -> None:
    body = json.dumps({**TINY, "stream": True} if stream else TINY)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        for _ in range(n):
            conn.request("POST", "/api/generate", body, {"Content-Type": "application/json"})
            answer = conn.getresponse()
            answer.read()
            if answer.status != 200:
                raise SystemExit(f"answer {answer.status} from port {port}")
    finally:
        conn.close()


def process(which: str, n: int, stream: bool = False) -> float:
    """User-space instructions per request of a whole proxy process under load."""
    sim_port, port = _free_port(), _free_port()
    state = tempfile.mkdtemp(prefix="instructions.")
    out = os.path.join(state, "callgrind.out")
    backend = ([PYTHON, str(ROOT / "bench" / "stream_source.py"), str(sim_port), "100"] if stream
               else [PYTHON, "-m", "ollamamq_fast", "sim", "-p", str(sim_port),
                     "--ttft-ms", "0", "--tokens-per-s", "0"])
    sim = subprocess.Popen(backend, cwd=state, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    if which == "floor":
        cmd = [PYTHON, str(ROOT / "bench" / "floor_proxy.py"), str(port), str(sim_port)]
    else:  # the quick-start configuration, as bench/targets.py runs it
        cmd = [PYTHON, "-m", "ollamamq_fast", "serve", "--no-tui", "-p", str(port),
               "-o", f"127.0.0.1:{sim_port}", "--slots", "1024",
               "--state", os.path.join(state, "state.db"),
               "--log-file", os.path.join(state, "access.log"), "--admin-port", "0",
               "--log-level", "warning"]
    target = None
    try:
        _wait_port(sim_port, 60)
        target = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                                   *cmd], cwd=state, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        _wait_port(port, 300)
        _requests(port, 300, stream)  # warm: connections pooled, caches filled
        subprocess.run(["callgrind_control", "--zero", str(target.pid)], capture_output=True,
                       check=True)
        _requests(port, n, stream)
        subprocess.run(["callgrind_control", "--dump", str(target.pid)], capture_output=True,
                       check=True)
        dumped = out + ".1"
        deadline = time.monotonic() + 30
        while not os.path.exists(dumped) and time.monotonic() < deadline:
            time.sleep(0.1)
        summary = re.search(r"^summary: (\d+)", Path(dumped).read_text(errors="replace"),
                            re.MULTILINE)
        if summary is None:
            raise SystemExit(f"no summary line in {dumped}")
        return int(summary.group(1)) / n
    finally:
        for proc in (target, sim):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    hp = sub.add_parser("hotpath", help="the gateway's own Python per request")
    hp.add_argument("--route", default="generate", choices=("generate", "chat", "stream"))
    hp.add_argument("--low", type=int, default=500)
    hp.add_argument("--high", type=int, default=2500)
    pr = sub.add_parser("process", help="a whole proxy process under load")
    pr.add_argument("target", choices=("gateway", "floor"))
    pr.add_argument("-n", type=int, default=2000)
    pr.add_argument("--stream", action="store_true",
                    help="100-line NDJSON streams from bench/stream_source.py")
    args = ap.parse_args()
    if args.what == "hotpath":
        per = hotpath(args.route, args.low, args.high)
        print(f"hotpath {args.route}: {per:,.0f} instructions per request")
    else:
        per = process(args.target, args.n, args.stream)
        kind = "100-line stream" if args.stream else "request"
        print(f"process {args.target}: {per:,.0f} user-space instructions per {kind}"
              f" (counts in {os.path.dirname(PYTHON) and tempfile.gettempdir()}/instructions.*)")


if __name__ == "__main__":
    main()
