#!/usr/bin/env python3
"""Translated streaming throughput: stream events per second through the gateway.

Starts the simulator (one process) and the gateway (another) on free loopback
ports, then reads long streams through the gateway from raw sockets and counts
the events the client gets (NDJSON lines, or SSE `data:` events; the final `[DONE]` counts as one). The
simulator writes its tokens as fast as it can (`--tokens-per-s 0`), so the
figure is what the gateway sustains, as long as the simulator and the reader
keep up (all three share the machine's cores: see the CPU columns).

Modes:
  ollama->openai  Ollama client (/api/chat), simulator OpenAI-only: SSE -> NDJSON
  openai->ollama  OpenAI client (/v1/chat/completions), simulator Ollama-only: NDJSON -> SSE
  native          Ollama client, simulator Ollama-only: no translation (the baseline)

    python3 bench/translate_stream.py [--events 200000] [--streams 1] [--rounds 3] [MODE ...]

Also prints the translator alone (no sockets): events per second of one
StreamTranslator fed the simulator's own bytes in 16 KiB pieces.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODES = ("ollama->openai", "openai->ollama", "native")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_ready(gw_port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{gw_port}/api/tags", timeout=1) as r:
                if json.load(r).get("models"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit("the gateway did not list the simulator's models in time")


def request(mode: str, events: int) -> bytes:
    msgs = [{"role": "user", "content": "stream"}]
    if mode == "openai->ollama":
        path, body = "/v1/chat/completions", {"model": "llama3.2", "stream": True, "messages": msgs}
    else:
        path, body = "/api/chat", {"model": "llama3.2", "messages": msgs}
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: bench\r\nX-Sim-Tokens: {events}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def read_stream(port: int, req: bytes, mark: bytes, out: list[int]) -> None:
    """Send one request; count `mark` in everything read until the last chunk."""
    count = 0
    tail = b""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(req)
        while True:
            data = s.recv(1 << 20)
            if not data:
                break
            count += data.count(mark)
            tail = (tail + data)[-16:]
            if tail.endswith(b"\r\n0\r\n\r\n"):
                break
    out.append(count)


def run_mode(mode: str, events: int, streams: int, rounds: int) -> list[dict[str, float]]:
    sim_port, gw_port = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=ROOT)
    api = "openai" if mode == "ollama->openai" else "ollama"
    sim = subprocess.Popen([sys.executable, "-m", "ollamamq_fast", "sim", "-p", str(sim_port),
                            "--api", api, "--ttft-ms", "0", "--tokens-per-s", "0"],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gw = subprocess.Popen([sys.executable, "-m", "ollamamq_fast", "serve", "--no-tui", "--state", "",
                           "--no-access-log", "--no-admin", "-p", str(gw_port),
                           "-o", f"127.0.0.1:{sim_port}", "--slots", "64",
                           "--log-level", "warning"],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(gw_port)
        # One per event: SSE `data: ` lines; NDJSON lines all carry `"done":`.
        mark = b"data: " if mode == "openai->ollama" else b'"done":'
        req = request(mode, events)
        read_stream(gw_port, request(mode, 1000), mark, [])  # warm up
        results = []
        for _ in range(rounds):
            counts: list[int] = []
            threads = [threading.Thread(target=read_stream, args=(gw_port, req, mark, counts))
                       for _ in range(streams)]
            cpu_gw, cpu_sim = cpu_seconds(gw.pid), cpu_seconds(sim.pid)
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - start
            got = sum(counts)
            results.append({
                "events": got, "seconds": elapsed, "events_per_s": got / elapsed,
                "gateway_cpu_s": cpu_seconds(gw.pid) - cpu_gw, "sim_cpu_s": cpu_seconds(sim.pid) - cpu_sim,
            })
        return results
    finally:
        for p in (gw, sim):
            p.terminate()
        for p in (gw, sim):
            p.wait(10)


def translator_alone(events: int) -> dict[str, float]:
    """One StreamTranslator fed SSE chunk events in 16 KiB pieces: no sockets, no gateway."""
    sys.path.insert(0, ROOT)
    from ollamamq_fast.wire.errors import Api
    from ollamamq_fast.wire.translate import open_stream, translate_request

    t = translate_request("/api/chat", b'{"model":"m","messages":[{"role":"user","content":"x"}]}',
                          Api.OPENAI)
    event = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
             b'"choices":[{"index":0,"delta":{"content":" word"},"finish_reason":null}]}\n\n')
    body = event * events
    stream = open_stream(t)
    start = time.perf_counter()
    out = 0
    for i in range(0, len(body), 16384):
        out += stream.feed(body[i:i + 16384]).count(b"\n")
    elapsed = time.perf_counter() - start
    return {"events": out, "seconds": elapsed, "events_per_s": out / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("modes", nargs="*", metavar="MODE", help=" | ".join(MODES))
    parser.add_argument("--events", type=int, default=200_000, help="tokens per stream")
    parser.add_argument("--streams", type=int, default=1, help="concurrent streams")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for mode in args.modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}: one of {', '.join(MODES)}")
    alone = translator_alone(args.events)
    print(f"translator alone (SSE -> NDJSON): {alone['events_per_s']:,.0f} events/s")
    for mode in args.modes or MODES:
        for r in run_mode(mode, args.events, args.streams, args.rounds):
            per_event = r["gateway_cpu_s"] / max(1, r["events"]) * 1e6
            print(f"{mode:15} {args.streams} stream(s): {r['events_per_s']:>10,.0f} events/s "
                  f"({r['events']:,} in {r['seconds']:.2f} s; gateway CPU {r['gateway_cpu_s']:.2f} s "
                  f"= {per_event:.2f} us/event, simulator CPU {r['sim_cpu_s']:.2f} s)")


if __name__ == "__main__":
    main()
