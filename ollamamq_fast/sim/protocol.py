"""The simulator's HTTP/1.1 server protocol: httptools parsing, pipelining, flow control."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, cast
from urllib.parse import unquote

import httptools

from . import wire
from .exchange import Exchange, Request

if TYPE_CHECKING:
    from .app import SimApp

# Headers the simulator acts on; everything else is skipped while parsing.
KEPT_HEADERS = frozenset((b"expect", b"x-sim-fault", b"x-sim-delay-ms", b"x-sim-tokens"))
# Pipelined requests parsed ahead of the one being answered before reading pauses.
PIPELINE_HIGH = 32
PIPELINE_LOW = 8
# After answering a request whose body we will not read, keep draining input this
# long before closing, so a client still uploading sees our answer instead of an RST
# (Go's rstAvoidanceDelay is 500 ms).
LINGER_S = 0.5

_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")}

BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n\r\n400 Bad Request"
)


class SimProtocol(asyncio.Protocol):
    """One client connection. Requests are answered strictly in order, one at a time."""

    def __init__(self, app: SimApp) -> None:
        # Per-connection state
        self.app = app
        self.loop = app.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.closing = False
        self.discarding = False
        self.writing_paused = False
        self.reading_paused = False
        self.resume_waiters: list[Callable[[], None]] = []
        self.queue: deque[Request] = deque()
        self.current: Exchange | None = None
        self._running_queue = False
        # Per-request parse state
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._req: Request | None = None

    # -- transport callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Register the connection with the server."""
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        stats = self.app.stats
        stats.connections += 1
        stats.connections_total += 1
        self.app.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        """Record the close at once (tests time cancel propagation) and stop the response."""
        now = self.loop.time()
        self.closing = True
        stats = self.app.stats
        stats.connections -= 1
        stats.connection_close_times.append(now)
        self.app.connections.discard(self)
        self.queue.clear()
        current = self.current
        self.current = None
        if current is not None:
            current.connection_lost(now)
        # Wake stream emitters waiting for resume_writing so they notice the close.
        self._wake_writers()

    def data_received(self, data: bytes) -> None:
        """Feed bytes to the parser; a malformed request gets Go's plain 400 and a close."""
        if self.discarding or self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._bad_request()
        except httptools.HttpParserError:
            self._bad_request()

    def eof_received(self) -> bool | None:
        """A half-close is treated as the client leaving, as Go's background read does."""
        return None

    def pause_writing(self) -> None:
        """The transport buffer is above its high-water mark: stop producing."""
        self.writing_paused = True

    def resume_writing(self) -> None:
        """The buffer drained: let paused streams and queued requests continue."""
        self.writing_paused = False
        self._wake_writers()
        if self.current is None and self.queue:
            self._run_queue()

    # -- parser callbacks ----------------------------------------------------

    def on_message_begin(self) -> None:
        """A new request starts."""
        self._url = b""
        self._headers = {}

    def on_url(self, url: bytes) -> None:
        """The target may arrive in pieces."""
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        """Keep only the headers the simulator reads."""
        name = name.lower()
        if name in KEPT_HEADERS:
            self._headers[name] = value

    def on_headers_complete(self) -> None:
        """Build the Request; blob uploads decide here whether the body is read at all."""
        raw = self._url
        query = b""
        if b"?" in raw:
            raw, query = raw.split(b"?", 1)
        path = raw.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        parser = self.parser
        method = _METHODS.get(parser.get_method()) or parser.get_method().decode("ascii")
        headers = self._headers
        req = Request(method, path, query.decode("latin-1") if query else "", headers, parser.should_keep_alive())
        self._req = req
        idle = self.current is None and not self.queue
        if method == "POST" and path.startswith("/api/blobs/") and self.app.blob_headers(self, req, idle):
            return
        if idle and headers and headers.get(b"expect", b"").lower() == b"100-continue":
            if not self.app.reads_body(req):
                # 404/405/redirect: Go answers without reading the body, never sends 100, then closes.
                self.app.dispatch(self.start_early(req))
                return
            # Go sends 100 Continue when the handler first reads the body; JSON handlers do so at once.
            self.write(wire.CONTINUE_100)

    def on_body(self, body: bytes) -> None:
        """Collect the body, or hash it as it streams in (blob uploads)."""
        req = self._req
        if req is None or req.answered:
            return
        if req.sink is not None:
            req.sink.update(body)
            req.size += len(body)
        else:
            req.body_parts.append(body)

    def on_message_complete(self) -> None:
        """Queue the request; answer it now if nothing is in flight."""
        req = self._req
        self._req = None
        if req is None or req.answered or self.closing:
            return
        self.app.stats.requests += 1
        if self.current is None and not self.queue and not self.writing_paused:
            # Common case (no pipelining): answer at once without touching the queue.
            if self.app.fastlane.recipes and self.app.fastlane.try_answer(self, req):
                return
            exchange = Exchange(self, req)
            self.current = exchange
            self._running_queue = True
            try:
                self.app.dispatch(exchange)
            finally:
                self._running_queue = False
            if self.current is None and self.queue:
                self._run_queue()
            return
        self.queue.append(req)
        if self.current is None:
            self._run_queue()
        elif len(self.queue) >= PIPELINE_HIGH and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    # -- exchange API ----------------------------------------------------------

    def start_early(self, req: Request) -> Exchange:
        """Answer a request before its body is read (blob already there); the connection then closes."""
        req.answered = True
        req.keep_alive = False
        self.app.stats.requests += 1
        exchange = Exchange(self, req)
        self.current = exchange
        return exchange

    def exchange_finished(self, exchange: Exchange) -> None:
        """Called once per exchange when its response is complete."""
        if self.current is exchange:
            self.current = None
        if not exchange.req.keep_alive:
            if exchange.req.answered:
                self._linger_close()
            else:
                self.close()
            return
        if self.queue and not self._running_queue:
            self._run_queue()

    def write(self, data: bytes) -> None:
        """Write to the socket unless the connection is going away."""
        if not self.closing and self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        """Close after flushing what is buffered."""
        if not self.closing and self.transport is not None:
            self.closing = True
            self.transport.close()

    def wait_writable(self, callback: Callable[[], None]) -> None:
        """Run `callback` when the transport asks for more data again."""
        self.resume_waiters.append(callback)

    # -- internals -------------------------------------------------------------

    def _run_queue(self) -> None:
        """Answer queued requests in order; loops instead of recursing on synchronous answers."""
        self._running_queue = True
        try:
            while self.current is None and self.queue and not self.closing and not self.writing_paused:
                req = self.queue.popleft()
                if self.reading_paused and len(self.queue) <= PIPELINE_LOW and self.transport is not None:
                    self.reading_paused = False
                    self.transport.resume_reading()
                exchange = Exchange(self, req)
                self.current = exchange
                self.app.dispatch(exchange)
        finally:
            self._running_queue = False

    def _wake_writers(self) -> None:
        """Run every callback parked by wait_writable."""
        if self.resume_waiters:
            waiters, self.resume_waiters = self.resume_waiters, []
            for waiter in waiters:
                waiter()

    def _linger_close(self) -> None:
        """Half-close, drop further input for a moment, then close (see LINGER_S)."""
        transport = self.transport
        if transport is None or self.closing:
            return
        self.discarding = True
        if transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(LINGER_S, self.close)

    def _bad_request(self) -> None:
        """Unparseable request: Go answers a bare 400 and closes."""
        self.write(BAD_REQUEST)
        self.close()
