"""Per-request state and the response API that route handlers call."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import wire
from .faults import SPLIT_GAP_S, Faults
from .gojson import dumps

if TYPE_CHECKING:
    from .protocol import SimProtocol


class Request:
    """One parsed request. Only the headers the simulator acts on are kept."""

    __slots__ = ("answered", "body_parts", "headers", "keep_alive", "method", "path", "query", "sink", "size")

    def __init__(self, method: str, path: str, query: str, headers: dict[bytes, bytes], keep_alive: bool) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body_parts: list[bytes] = []
        self.keep_alive = keep_alive
        # Set when the response went out before the body was read (blob exists).
        self.answered = False
        # Incremental hasher for blob uploads; the body is then never stored.
        self.sink: Any = None
        self.size = 0

    @property
    def body(self) -> bytes:
        """The whole request body (joined once)."""
        parts = self.body_parts
        if len(parts) == 1:
            return parts[0]
        joined = b"".join(parts)
        self.body_parts = [joined]
        return joined

    def header(self, name: bytes) -> str | None:
        """A kept header (lower-case name) as text."""
        value = self.headers.get(name)
        return None if value is None else value.decode("latin-1")


class Exchange:
    """One request/response cycle on a connection; finished exactly once."""

    __slots__ = ("cancel_cb", "conn", "done", "faults", "head_only", "inference", "pending_head", "req", "streaming")

    def __init__(self, conn: SimProtocol, req: Request) -> None:
        self.conn = conn
        self.req = req
        self.head_only = req.method == "HEAD"
        self.faults: Faults | None = None
        # Response state: done once complete, killed, or cancelled by the client.
        self.done = False
        self.inference = False
        self.streaming = False
        self.pending_head: bytes | None = None
        # Stops timers of a response in progress when the client goes away.
        self.cancel_cb: Callable[[], None] | None = None

    # -- state -------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """False once the response is finished or the connection is gone."""
        return not self.done and not self.conn.closing

    def mark_inference(self) -> None:
        """Count this request in stats.active until it ends."""
        self.inference = True
        stats = self.conn.app.stats
        stats.active += 1
        stats.peak_active = max(stats.peak_active, stats.active)

    def _release(self) -> None:
        """Leave stats.active and forget timers."""
        self.done = True
        self.cancel_cb = None
        if self.inference:
            self.inference = False
            self.conn.app.stats.active -= 1

    def _complete(self) -> None:
        """The response is fully written: hand the connection to the next request."""
        self._release()
        self.conn.exchange_finished(self)

    def connection_lost(self, when: float) -> None:
        """Called by the protocol: the client left before the response was finished."""
        if self.done:
            return
        cancel = self.cancel_cb
        self._release()
        self.conn.app.stats.cancelled += 1
        self.conn.app.stats.cancel_times.append(when)
        if cancel is not None:
            cancel()

    def kill(self) -> None:
        """Drop the connection mid-response on purpose (faults); not a client cancel."""
        if self.done:
            return
        cancel = self.cancel_cb
        self._release()
        if cancel is not None:
            cancel()
        self.conn.close()

    # -- whole responses ---------------------------------------------------

    def send(self, status: int, body: bytes, content_type: bytes | None, go_buffered: bool = True, extra: bytes = b"") -> None:
        """Write a complete response; bodies over 2 KiB go out chunked like Go's (go_buffered)."""
        if self.done or self.conn.closing:
            return
        close = not self.req.keep_alive
        date = self.conn.app.clock.http_date()
        chunked = go_buffered and len(body) > wire.GO_CHUNKING_THRESHOLD
        if self.head_only:
            # Go eats HEAD bodies; a large one leaves neither Content-Length nor chunking.
            self.conn.write(wire.head(status, date, content_type, -1 if chunked else len(body), close, extra))
            self._complete()
            return
        faults = self.faults
        if faults is not None and (faults.split_lines or faults.hang_body) and len(body) > 1:
            self._send_split(status, body, content_type, chunked, close, extra)
            return
        if chunked:
            data = wire.head(status, date, content_type, None, close, extra) + wire.frame(body) + wire.LAST_CHUNK
        else:
            data = wire.head(status, date, content_type, len(body), close, extra) + body
        self.conn.write(data)
        self._complete()

    def _send_split(self, status: int, body: bytes, content_type: bytes | None, chunked: bool, close: bool, extra: bytes) -> None:
        """split-lines / hang-body on a non-stream answer: the body in two halves."""
        half = len(body) // 2
        date = self.conn.app.clock.http_date()
        first, rest = body[:half], body[half:]
        if chunked:
            self.conn.write(wire.head(status, date, content_type, None, close, extra) + wire.frame(first))
            rest = wire.frame(rest) + wire.LAST_CHUNK
        else:
            self.conn.write(wire.head(status, date, content_type, len(body), close, extra) + first)
        faults = self.faults
        if faults is not None and faults.hang_body:
            return

        def second_half() -> None:
            """Finish the body after the gap."""
            if self.alive:
                self.conn.write(rest)
                self._complete()

        handle = self.conn.loop.call_later(SPLIT_GAP_S, second_half)
        self.cancel_cb = handle.cancel

    def send_json(self, status: int, obj: Any, content_type: bytes = wire.CT_JSON_GIN) -> None:
        """gin's c.JSON: Go-escaped JSON, `application/json; charset=utf-8`."""
        self.send(status, dumps(obj), content_type)

    def send_error(self, status: int, message: str, content_type: bytes = wire.CT_JSON_GIN) -> None:
        """Ollama's native error body `{"error":"..."}`."""
        self.send(status, dumps({"error": message}), content_type)

    def send_text(self, status: int, text: bytes, content_type: bytes = wire.CT_TEXT) -> None:
        """Plain-text answers (`Ollama is running`, gin's 404/405)."""
        self.send(status, text, content_type)

    # -- streamed responses ------------------------------------------------

    def begin_stream(self, content_type: bytes) -> None:
        """Prepare a chunked 200; the head leaves with the first chunk, as in Go."""
        self.streaming = True
        self.pending_head = wire.head(200, self.conn.app.clock.http_date(), content_type, None, not self.req.keep_alive)

    def write_framed(self, data: bytes) -> None:
        """Write already-framed chunk bytes (head first if still pending)."""
        if not self.alive:
            return
        pending = self.pending_head
        if pending is not None:
            self.pending_head = None
            data = pending + data
        self.conn.write(data)

    def flush_head(self) -> None:
        """Send the head alone (die-after:0)."""
        self.write_framed(b"")

    def end_stream(self, framed: bytes = b"") -> None:
        """Write the final framed chunks and the terminating chunk in one write, and finish."""
        if not self.alive:
            return
        self.write_framed(framed + wire.LAST_CHUNK)
        self._complete()
