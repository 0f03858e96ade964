"""The measuring client: one raw HTTP/1.1 keep-alive connection per `BenchConnection`.

An `asyncio.Protocol` fed straight into an httptools `HttpResponseParser`:
no streams, no futures, no per-line JSON. Stream frames are counted with
`bytes.count` on whatever the socket delivered, and the owner (a driver in
`loadgen.py`) is called back synchronously when a response ends, so the next
request leaves in the same event-loop iteration.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol, cast

import httptools

from .stats import Histogram

clock = time.perf_counter

# Stream framing by response Content-Type (docs/protocol-notes.md §1): NDJSON lines end in
# LF, SSE events end in a blank line. The terminator proves the stream ended
# properly: Ollama's last line has "done":true, OpenAI SSE ends with [DONE].
NDJSON_SEP = b"\n"
SSE_SEP = b"\n\n"
NDJSON_END = b'"done":true'
SSE_END = b"[DONE]"
# A JSON key "error" (with quotes) never occurs inside a token string,
# because quotes in content are escaped (\"error\"), so this finds real
# mid-stream error frames only.
ERROR_MARK = b'"error"'
# Bytes on each side of a piece boundary searched for a marker split across
# two pieces; must be at least the longest marker minus one.
CARRY = 16


def frame_kind(content_type: bytes) -> tuple[bytes | None, bytes | None]:
    """(frame separator, terminator) for a Content-Type; (None, None) if not a stream."""
    ct = content_type.lower()
    if b"ndjson" in ct:
        return NDJSON_SEP, NDJSON_END
    if b"event-stream" in ct:
        return SSE_SEP, SSE_END
    return None, None


def classify(status: int, streaming: bool, terminated: bool, error_frame: bool) -> str | None:
    """Error kind of a complete response, or None when it is a success (pure)."""
    if not 200 <= status < 300:
        return "http"
    if error_frame:
        return "stream_error"
    if streaming and not terminated:
        return "malformed"
    return None


class Exchange:
    """Per-request state: timestamps and counters of one request/response."""

    __slots__ = (
        "error_frame",
        "lines",
        "measured",
        "nbytes",
        "sep",
        "status",
        "t_body",
        "t_end",
        "t_first",
        "t_line",
        "t_send",
        "t_write",
        "tail",
        "terminated",
        "terminator",
        "user",
        "zero_gaps",
    )

    def __init__(self, user: int, t_send: float, measured: bool) -> None:
        self.user = user
        self.measured = measured
        # Latency is measured from t_send (open loop: the intended arrival
        # time, so queueing inside the generator is not hidden); the timeout
        # runs from t_write, when the bytes were actually handed to the socket.
        self.t_send = t_send
        self.t_write = 0.0
        # When the last byte was read (0.0 until the response is complete).
        self.t_end = 0.0
        self.t_first = 0.0
        self.t_body = 0.0
        self.t_line = 0.0
        self.status = 0
        self.lines = 0
        self.nbytes = 0
        self.sep: bytes | None = None
        self.terminator: bytes | None = None
        self.terminated = False
        self.error_frame = False
        self.tail = b""
        # Frames that arrived in the same socket read as the previous one
        # have a gap of exactly 0; they are counted here and recorded in one
        # go at the end instead of one histogram call each.
        self.zero_gaps = 0


class ConnectionOwner(Protocol):
    """What a connection needs from its driver."""

    gaps: Histogram

    def exchange_done(self, conn: BenchConnection, ex: Exchange, kind: str | None) -> None:
        """A request ended: kind None = a complete response (still to classify)."""

    def connection_gone(self, conn: BenchConnection) -> None:
        """The connection is closed for good (after any exchange_done)."""


class BenchConnection(asyncio.Protocol):
    """One keep-alive connection that carries one request at a time."""

    def __init__(self, owner: ConnectionOwner, slot: int) -> None:
        # Per-connection state
        self.owner = owner
        self.slot = slot
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.usable = True
        # True when we closed the connection ourselves (done, timeout, abort),
        # False when the peer dropped it: only the latter is a "reset".
        self.closing = False
        # Per-request state
        self.exchange: Exchange | None = None
        self.complete = False
        # Time of the socket read being parsed: every body callback of one
        # read shares it (fewer clock calls, and same-read gaps are exactly 0).
        self.now = 0.0
        # Read at headers-complete: llhttp only answers this question reliably
        # while the message is current (RFC 9112 §9.3 rules: version + Connection).
        self.keep_alive = True

    # Transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            # Bytes nobody asked for: the peer is confused; never reuse it.
            self.abort()
            return
        self.now = now = clock()
        if ex.t_first == 0.0:
            ex.t_first = now
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail(ex, "malformed")
            return
        if self.complete:
            self.complete = False
            self.exchange = None
            ex.t_end = now
            if not self.keep_alive:
                self.usable = False
            self.owner.exchange_done(self, ex, None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        ex = self.exchange
        if ex is not None:
            self.exchange = None
            self.owner.exchange_done(self, ex, "reset")
        self.owner.connection_gone(self)

    # Parser callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.exchange
        if ex is not None and len(name) == 12 and name.lower() == b"content-type":
            ex.sep, ex.terminator = frame_kind(value)

    def on_headers_complete(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.status = self.parser.get_status_code()
            self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            return
        now = self.now
        if ex.t_body == 0.0:
            ex.t_body = now
        ex.nbytes += len(data)
        sep = ex.sep
        if sep is None:
            return
        n = data.count(sep)
        tail = ex.tail
        if tail:
            # The previous piece ended mid-frame, so a separator or marker may
            # straddle the boundary. Frames are whole lines in practice (one
            # per chunk), so this costs nothing on the common path.
            if sep is SSE_SEP and tail[-1:] == b"\n" and data[:1] == b"\n":
                n += 1
            probe = tail[-CARRY:] + data[:CARRY]
            if ERROR_MARK in probe:
                ex.error_frame = True
            if ex.terminator is not None and ex.terminator in probe:
                ex.terminated = True
        if n:
            if ex.lines and now != ex.t_line:
                if ex.measured:
                    self.owner.gaps.record(int((now - ex.t_line) * 1_000_000))
                ex.zero_gaps += n - 1
            elif ex.lines:
                ex.zero_gaps += n
            else:
                ex.zero_gaps += n - 1
            ex.lines += n
            ex.t_line = now
        if ERROR_MARK in data:
            ex.error_frame = True
        if not ex.terminated and ex.terminator is not None and ex.terminator in data:
            ex.terminated = True
        # Markers contain no newline, so after a piece that ends a frame
        # there is nothing to carry over.
        ex.tail = b"" if data.endswith(sep) else data

    def on_message_complete(self) -> None:
        self.complete = True

    # Exchange API (called by the driver)

    def send(self, data: bytes, ex: Exchange) -> None:
        """Start a request on this idle connection."""
        transport = self.transport
        assert transport is not None and self.exchange is None
        self.exchange = ex
        ex.t_write = clock()
        transport.write(data)

    def expire(self) -> None:
        """Give up on the request in flight (the timeout sweeper calls this)."""
        ex = self.exchange
        if ex is not None:
            self._fail(ex, "timeout")

    def close(self) -> None:
        """Close an idle connection gracefully (run over, or not keep-alive)."""
        self.usable = False
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once; a request in flight is not recorded."""
        self.usable = False
        self.closing = True
        self.exchange = None
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, ex: Exchange, kind: str) -> None:
        # The connection's state is in doubt after any failure: never reuse it.
        self.exchange = None
        self.usable = False
        self.closing = True
        if self.transport is not None:
            self.transport.abort()
        self.owner.exchange_done(self, ex, kind)
