#!/usr/bin/env python3
"""Python cost of one proxied request, without sockets.

Starts a real simulator and a real gateway in this process (so the fleet is
probed and every part is built as `serve` builds it), then drives the data
plane's protocol objects directly: a client connection and a pooled backend
connection whose transports only record what is written. Each iteration feeds
one request head+body to the client protocol and one backend response to the
upstream protocol, exactly what one read on each socket would deliver.

What is measured is the gateway's own Python per request: parsing, routing,
the policy checks, dispatch, head rebuilding, accounting. The syscalls a real
proxy also pays (two reads and two writes per request) are not in it; see
bench/RESULTS.md for those.

    python profiling/hotpath.py                 # default: tiny /api/generate
    python profiling/hotpath.py --route chat    # /v1/chat/completions
    python profiling/hotpath.py --route stream  # a 100-line stream, one line a read
    python profiling/hotpath.py --profile       # cProfile the loop (top 30)
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop

from ollamamq_fast import buildinfo
from ollamamq_fast.config import Settings, parse_backend_url
from ollamamq_fast.gateway import Gateway
from ollamamq_fast.proxy.downstream import ClientProtocol
from ollamamq_fast.proxy.upstream import UpstreamConnection
from ollamamq_fast.sim import SimOptions, start_sim

REQUESTS = {
    "generate": (
        b"/api/generate",
        b'{"model":"llama3.2","prompt":"hi","stream":false,"options":{"num_predict":1}}',
    ),
    "chat": (
        b"/v1/chat/completions",
        b'{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"max_tokens":1}',
    ),
    # A 100-line NDJSON stream, fed one chunk (one line) per read: the relay's
    # per-event cost is the per-request figure over STREAM_EVENTS.
    "stream": (
        b"/api/generate",
        b'{"model":"llama3.2","prompt":"hi","stream":true,"options":{"num_predict":100}}',
    ),
}
STREAM_EVENTS = 100


class RecordingTransport:
    """Just enough of an asyncio transport: writes are counted, not sent."""

    def __init__(self) -> None:
        self.written = 0
        self.last = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += 1
        self.last = data

    def writelines(self, data: list[bytes]) -> None:
        self.written += 1
        self.last = b"".join(data)

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def backend_response(port: int, path: bytes, body: bytes) -> bytes:
    """One real response from the simulator, as bytes off the wire."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST %b HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%b" % (path, len(body), body))
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        if b"transfer-encoding: chunked" in head.lower():
            while not rest.endswith(b"0\r\n\r\n"):
                rest += s.recv(65536)
            return head + b"\r\n\r\n" + rest
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(rest) < length:
            rest += s.recv(65536)
        return head + b"\r\n\r\n" + rest


def reads_of(response: bytes) -> list[bytes]:
    """A chunked response as a backend streams it: the head, then one read per chunk."""
    head, sep, body = response.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in head.lower():
        return [response]
    payload = b""
    at = 0
    while at < len(body):
        size_end = body.index(b"\r\n", at)
        size = int(body[at:size_end], 16)
        payload += body[size_end + 2 : size_end + 2 + size]
        at = size_end + 2 + size + 2
        if size == 0:
            break
    # One line a chunk, one chunk a read: what a backend generating token by
    # token sends (the simulator, unpaced, writes many lines at once).
    lines = payload.splitlines(keepends=True)
    return [head + sep] + [b"%x\r\n%b\r\n" % (len(line), line) for line in lines] + [b"0\r\n\r\n"]


async def run(args: argparse.Namespace) -> None:
    options = SimOptions()
    options.ttft_ms = 0
    options.tokens_per_s = 0
    options.tokens = STREAM_EVENTS if args.route == "stream" else 1
    sim = await start_sim(options, "127.0.0.1", 0)
    settings = Settings()
    settings.port = 0
    settings.backends = [parse_backend_url(sim.url)]
    settings.slots = 256
    settings.state_path = None
    settings.log_file = None
    settings.admin_port = -1
    gateway = Gateway(settings)
    await gateway.start()
    state = gateway.state
    assert state is not None
    path, body = REQUESTS[args.route]
    request = (b"POST %b HTTP/1.1\r\nHost: 127.0.0.1:11435\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%b" % (path, len(body), body))
    response = await asyncio.get_running_loop().run_in_executor(
        None, backend_response, sim.port, path, body)

    client = ClientProtocol(state)
    client_transport = RecordingTransport()
    client.connection_made(client_transport)  # type: ignore[arg-type]
    backend = state.fleet.backends[0]
    assert backend.pool is not None
    upstream = UpstreamConnection(backend.pool)
    upstream.connection_made(RecordingTransport())  # type: ignore[arg-type]
    backend.pool.open += 1
    backend.pool.release(upstream)

    reads = reads_of(response)

    def one() -> None:
        client.data_received(request)
        for piece in reads:
            upstream.data_received(piece)

    for _ in range(2000):
        one()
    ok = (client_transport.last.endswith(b"0\r\n\r\n") if len(reads) > 1
          else client_transport.last.startswith(b"HTTP/1.1 200"))
    if not ok:
        raise SystemExit(f"unexpected answer: {client_transport.last[:200]!r}")
    n = args.n
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            one()
        prof.disable()
        pstats.Stats(prof).sort_stats(__import__("os").environ.get("HOTPATH_SORT", "tottime")).print_stats(int(__import__("os").environ.get("HOTPATH_TOP", "30")))
    best = float("inf")
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            one()
        best = min(best, (time.perf_counter() - t0) / n)
    print(f"{args.route}: {best * 1e6:.2f} us of gateway Python per request "
          f"(best of {args.rounds} x {n}, build: {buildinfo.build()})")
    if len(reads) > 1:
        print(f"  {len(reads) - 1} chunk reads per request: "
              f"{best * 1e6 / (len(reads) - 1):.2f} us per read")
    print("answer head:", client_transport.last.split(b"\r\n\r\n")[0].decode(errors="replace"))
    await gateway.stop()
    await sim.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--route", choices=sorted(REQUESTS), default="generate")
    parser.add_argument("-n", type=int, default=20000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="cProfile one round")
    uvloop.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
