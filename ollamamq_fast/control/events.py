"""`GET /api/events`: the operator event bus as a Server-Sent Events stream.

Each bus event becomes `event: <type>` + `data: <json>` (WHATWG HTML, "Server-
sent events"); a comment line every KEEPALIVE_S keeps proxies and idle timers
from closing a quiet stream. The subscription lives exactly as long as the
HTTP response: it ends when the client goes away or the control plane stops.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import orjson

from ollamamq_fast.operator import EventBus

log = logging.getLogger("ollamamq_fast.control")

# Under the 30-60 s idle timeouts of common reverse proxies and load balancers.
KEEPALIVE_S = 15.0
KEEPALIVE = b": keep-alive\n\n"
# Open streams at once: each dashboard tab or `top` holds one. Every event is
# formatted and written once per stream on the gateway's own loop, so their
# number is bounded; beyond it a new stream gets 503 and the client retries.
MAX_STREAMS = 100
# Sent first so the client sees the headers and a byte at once, and knows how
# long to wait before reconnecting (the `retry` field, in milliseconds).
PREAMBLE = b"retry: 3000\n: connected\n\n"

SSE_HEADERS = [
    ("content-type", "text/event-stream"),
    ("cache-control", "no-store"),
    # Tells nginx not to buffer the stream.
    ("x-accel-buffering", "no"),
]


class StreamTransport(Protocol):
    """What the stream writes to (granian's RSGIHTTPStreamTransport)."""

    async def send_bytes(self, data: bytes) -> None: ...


class StreamProtocol(Protocol):
    """The part of granian's RSGIHTTPProtocol an event stream uses."""

    def response_stream(self, status: int, headers: list[tuple[str, str]]) -> StreamTransport: ...

    async def client_disconnect(self) -> None: ...


def format_event(event: dict[str, Any]) -> bytes:
    """One SSE message; the JSON has no raw newlines, so one `data:` line suffices.

    default=str: an event field orjson cannot encode must not end the stream.
    """
    kind = str(event.get("type", "message")).replace("\n", " ").encode()
    return b"event: " + kind + b"\ndata: " + orjson.dumps(event, default=str) + b"\n\n"


class EventStreams:
    """The open event streams of one control-plane server."""

    def __init__(self, bus: EventBus, keepalive_s: float = KEEPALIVE_S,
                 max_open: int = MAX_STREAMS) -> None:
        self.bus = bus
        self.keepalive_s = keepalive_s
        self.max_open = max_open
        self.open = 0
        # Set by close(): every stream returns, so the server's graceful
        # shutdown does not wait for clients that would never hang up.
        self.closing = asyncio.Event()

    def close(self) -> None:
        """End every open stream (the control plane is stopping)."""
        self.closing.set()

    async def serve(self, proto: StreamProtocol) -> None:
        """Stream events to one client until it disconnects or close() is called."""
        queue = self.bus.subscribe()
        self.open += 1
        gone = asyncio.ensure_future(proto.client_disconnect())
        closing = asyncio.ensure_future(self.closing.wait())
        try:
            transport = proto.response_stream(200, SSE_HEADERS)
            await transport.send_bytes(PREAMBLE)
            await self._pump(queue, transport, gone, closing)
        except (RuntimeError, ConnectionError) as exc:
            # granian raises RSGIProtocolClosed / RSGIProtocolError (RuntimeError
            # subclasses) when the client left between two writes.
            log.debug("event stream ended: %s", exc)
        finally:
            self.bus.unsubscribe(queue)
            self.open -= 1
            gone.cancel()
            closing.cancel()

    async def _pump(self, queue: asyncio.Queue[dict[str, Any]], transport: StreamTransport,
                    gone: asyncio.Future[None], closing: asyncio.Future[Any]) -> None:
        while True:
            getter = asyncio.ensure_future(queue.get())
            waiters: set[asyncio.Future[Any]] = {getter, gone, closing}
            try:
                done, _ = await asyncio.wait(waiters, timeout=self.keepalive_s,
                                             return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                getter.cancel()
                raise
            if gone in done or closing in done:
                getter.cancel()
                return
            if getter in done:
                chunk = format_event(getter.result())
                # Send whatever else is already waiting in the same write.
                while not queue.empty():
                    chunk += format_event(queue.get_nowait())
                await transport.send_bytes(chunk)
            else:
                getter.cancel()
                await transport.send_bytes(KEEPALIVE)
