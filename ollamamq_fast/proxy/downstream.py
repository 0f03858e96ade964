"""The client-facing protocol: parse requests, keep pipelining order, write back.

A thin adapter, as uvicorn's HttpToolsProtocol is: per-connection state here,
per-request state in `Exchange`. Requests are answered in the order they
arrived (RFC 9112 §9.3.2): the first is "active", later pipelined ones wait
with their bodies buffered (bounded, then the socket is paused).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Final, cast

import httptools

from ollamamq_fast.proxy.exchange import Exchange
from ollamamq_fast.proxy.flow import (
    BODY_BUFFER,
    HIGH_WATER,
    LOW_WATER,
    MAX_HEAD_BYTES,
    FlowControl,
)
from ollamamq_fast.proxy.state import State
from ollamamq_fast.proxy.transport import Transport
from ollamamq_fast.wire import framing
from ollamamq_fast.wire.errors import Api, error_body
from ollamamq_fast.wire.headers import KeptLines
from ollamamq_fast.wire.routes import api_of_path

_log = logging.getLogger("ollamamq_fast.proxy")


class HeadTooLarge(Exception):
    """Raised by a header callback to stop the parser: the head passed MAX_HEAD_BYTES."""

if TYPE_CHECKING:
    from ollamamq_fast.plane import DataPlane


# A request head must be complete this long after it began, however it trickles
# in (nginx's client_header_timeout is 60 s between reads; this is a total).
HEAD_DEADLINE_S: Final = 30.0
# After this long, a request body must have averaged at least BODY_MIN_RATE
# bytes a second (unless the gateway itself paused the client), so that slow
# senders cannot hold connections for free; real uploads are far faster.
BODY_GRACE_S: Final = 30.0
BODY_MIN_RATE: Final = 1024


class ClientProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, gw: DataPlane) -> None:
        # Per-connection state
        self.gw = gw
        self.transport: Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer_ip = ""
        self.peer_ip_bytes = b""
        # The last request's forwarded header lines (the next one's are usually the same).
        self.kept_lines = KeptLines()
        self.active: Exchange | None = None
        self.pipeline: deque[Exchange] = deque()
        self.parsing: Exchange | None = None
        self.flow = FlowControl(None)
        self.closing = False
        # A malformed request behind ones still being answered: its error
        # response, written after theirs, before the connection closes.
        self.rejected = b""
        # Nothing more is read: the connection ends once what was asked is answered.
        self.stop_reading = False
        # Seconds the request being parsed has taken so far (reaper ticks): the
        # total deadline for a head and the minimum rate of a body.
        self.parse_s = 0.0
        self.advancing = False
        self.last_done: Exchange | None = None
        # Bytes of the head being parsed, for the 431 limit and the head timeout.
        self.head_bytes = 0
        # Reaper bookkeeping: seconds idle between requests or stuck in a head.
        self.idle_s = 0.0
        self.rx_count = 0
        self.rx_seen = 0
        # The head being parsed has a Connection header (see on_headers_complete).
        self.connection_named = False

    # -- asyncio.Protocol interface ---------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(Transport, transport)
        self.flow = FlowControl(transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.peer_ip = str(peer[0])
        else:
            self.peer_ip = "local"
        self.peer_ip_bytes = self.peer_ip.encode()
        self.gw.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.rx_count += 1
        if self.closing or self.stop_reading:
            return
        before = self.parsing
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as failed:
            # Raised inside a callback: a head over the bound (on purpose), or a
            # bug of the gateway's, which is never a request left unanswered.
            if isinstance(failed.__context__, HeadTooLarge):
                if not self.stop_reading:  # else: bytes after a closing request, ignored
                    self._reject(431, "request head too large")
            else:
                self.internal_error(failed)
            return
        except httptools.HttpParserUpgrade:
            # An Upgrade (h2c, websocket) or CONNECT: the request itself was read
            # and is answered as usual (a server may ignore Upgrade, RFC 9110
            # §7.8); the parser cannot go on, so the connection ends after it.
            self._last_request()
            return
        except httptools.HttpParserError as exc:
            if self.stop_reading:
                return  # bytes after a request that closes the connection: ignored
            if self.head_bytes > MAX_HEAD_BYTES:
                self._reject(431, "request head too large")
            else:
                self._reject(400, f"malformed HTTP request: {exc}")
            return
        ex = self.parsing
        if ex is not None and ex is before and not ex.method:
            # A head spread over reads: bound it, since the parser keeps a partial
            # header line in memory until its end arrives. (Only a head that began
            # in an earlier read: the whole of this read is then part of it.)
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self._reject(431, "request head too large")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.flow.client_closed()
        self.gw.connections.discard(self)
        active = self.active
        self.active = None
        if active is not None:
            active.client_gone()
        for ex in self.pipeline:
            ex.client_gone()
        self.pipeline.clear()
        parsing = self.parsing
        if parsing is not None and parsing is not active:
            parsing.client_gone()
        self.transport = None

    def pause_writing(self) -> None:
        # The client reads slower than the backend writes: stop reading the backend.
        self.flow.client_writing_paused()

    def resume_writing(self) -> None:
        self.flow.client_writing_resumed()

    @property
    def writing_paused(self) -> bool:
        """Whether the client's write buffer is above its high-water mark."""
        return self.flow.client_write_blocked

    # -- httptools parser callbacks -----------------------------------------------

    def on_message_begin(self) -> None:
        if self.stop_reading or self.closing:
            # More bytes after a request that ends the connection (Connection:
            # close, a rejected request): never served (RFC 9112 §9.6).
            self.parsing = None
            return
        self.parsing = Exchange(self)
        self.idle_s = 0.0
        self.parse_s = 0.0
        self.connection_named = False

    def on_url(self, url: bytes) -> None:
        ex = self.parsing
        if ex is not None:
            ex.url += url
            self.head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.parsing
        if ex is not None:
            ex.request_head.add(name, value)
            if len(name) == 10 and name.lower() == b"connection":
                self.connection_named = True
            self.head_bytes += len(name) + len(value) + 4
            if self.head_bytes > MAX_HEAD_BYTES:
                raise HeadTooLarge()

    def on_headers_complete(self) -> None:
        ex = self.parsing
        if ex is None:
            return
        self.head_bytes = 0
        parser = self.parser
        keep_alive = parser.should_keep_alive()
        # Kept alive with no Connection header means HTTP/1.1 (1.0 closes by
        # default): httptools builds the version string with str.format, so it
        # is asked for only when the answer is not already known.
        http_11 = (keep_alive and not self.connection_named) or \
            parser.get_http_version() == "1.1"
        try:
            ex.head_complete(parser.get_method(), keep_alive, http_11)
        except ValueError as exc:
            self._reject(400, f"malformed HTTP request: {exc}")
            return
        if self.active is None:
            self.active = ex
            ex.activate()
        else:
            self.pipeline.append(ex)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is not None:
            ex.body_received(body)

    def on_message_complete(self) -> None:
        ex = self.parsing
        self.parsing = None
        if ex is not None:
            if not ex.keep_alive:
                self.stop_reading = True  # the connection ends with this request's answer
            ex.message_complete()

    # -- Exchange-facing API --------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write to the client unless the connection is gone."""
        transport = self.transport
        if transport is not None and not self.closing:
            transport.write(data)

    def pause_reading(self) -> None:
        """Stop reading the client: request bytes held reached their bound; safe to repeat."""
        if not self.closing:
            self.flow.pause_client(BODY_BUFFER)

    def resume_reading(self) -> None:
        """Read the client again once nothing else holds it paused; safe to repeat."""
        if self.flow.client_reasons and not self.closing:
            self.flow.resume_client(BODY_BUFFER)

    def exchange_done(self, ex: Exchange) -> None:
        """The active exchange has written its whole response: start the next one."""
        if ex is not self.active:
            return
        self.active = None
        self.last_done = ex
        self.idle_s = 0.0
        if self.advancing:
            return  # the loop below, further up the stack, moves on
        self.advancing = True
        try:
            # A loop, not recursion: many pipelined requests answered locally
            # would otherwise nest one call chain per request.
            while self.active is None:
                transport = self.transport
                done = self.last_done
                if transport is None or self.closing:
                    return
                if done is not None and not done.keep_alive:
                    self.closing = True
                    if self.rejected and not self.pipeline:
                        transport.write(self.rejected)
                    transport.close()
                    for waiting in self.pipeline:
                        waiting.client_gone()
                    self.pipeline.clear()
                    return
                if not self.pipeline:
                    if not self.flow.client_write_blocked:
                        self.resume_reading()
                    return
                nxt = self.pipeline.popleft()
                self.active = nxt
                nxt.activate()
        finally:
            self.advancing = False

    def internal_error(self, exc: Exception) -> None:
        """Log a bug with its cause; answer 500 unless an answer had begun; end the connection."""
        cause = exc.__cause__ or exc.__context__ or exc
        _log.error("internal error on a connection from %s (the client gets a 500): %r",
                   self.peer_ip, cause, exc_info=cause)
        transport = self.transport
        already = self.closing
        self.closing = True
        if transport is None or already:
            return
        ex = self.active if self.active is not None else self.parsing
        if ex is not None and ex.state >= State.STREAMING:
            transport.abort()  # its answer had begun: a cut is all that is honest
            return
        api = ex.api if ex is not None else Api.OLLAMA
        ctype, body = error_body(api, 500, "internal error in the gateway (it is in the "
                                           "gateway's log)")
        transport.write(framing.local_response(500, ctype, body, close=True))
        transport.close()

    def _reject(self, status: int, message: str) -> None:
        """A request we cannot parse: answer in order if possible, then close."""
        parsing = self.parsing
        api = Api.OLLAMA
        if parsing is not None:
            # Refused before its head was read (no route yet): its path says which API.
            api = parsing.api if parsing.method or not parsing.url else api_of_path(parsing.url)
        ctype, body = error_body(api, status, message)
        data = framing.local_response(status, ctype, body, close=True)
        transport = self.transport
        if transport is None or self.closing:
            self.closing = True
            return
        if parsing is not None and self.pipeline and self.pipeline[-1] is parsing:
            self.pipeline.pop()  # its head was fine, its body is not: it is never answered
            parsing.client_gone()
        if self._answer_then_close():
            # Requests before the bad one are answered in order; the error follows
            # the last of them, then the connection closes (RFC 9112 §9.3.2).
            self.rejected = data
            return
        self.closing = True
        transport.write(data)
        transport.close()

    def _answer_then_close(self) -> bool:
        """Read nothing more; close after the last unanswered request (False: none is left)."""
        # Still read (and drop) what comes, so that a client leaving is seen.
        self.stop_reading = True
        last = self.pipeline[-1] if self.pipeline else self.active
        if last is not None and last is not self.parsing and last.state is not State.DONE:
            last.keep_alive = False
            return True
        return False

    def _last_request(self) -> None:
        """The parser stopped after a complete request (Upgrade, CONNECT)."""
        if (not self._answer_then_close() and self.transport is not None
                and not self.closing and self.active is None):
            self.closing = True
            self.transport.close()

    def reap(self, tick_s: float, head_timeout: float, keepalive_timeout: float) -> None:
        """Called by the reaper every tick: close stalled heads and idle keep-alives."""
        if self.closing or self.transport is None:
            return
        ex = self.parsing
        if ex is not None and not ex.request_complete:
            # Totals, whatever trickles in: a slowloris client sending a byte now
            # and then is never idle, so idle time alone would never close it.
            self.parse_s += tick_s
            if not ex.method:
                if self.parse_s >= HEAD_DEADLINE_S:
                    self._reject(408, "request head not received in time")
                    return
            elif (self.parse_s >= BODY_GRACE_S and not self.flow.client_paused
                  and ex.body_size < BODY_MIN_RATE * self.parse_s):
                self._reject(408, f"request body arriving too slowly (under {BODY_MIN_RATE} "
                                  "bytes/s on average)")
                return
        if self.rx_count != self.rx_seen:
            self.rx_seen = self.rx_count
            self.idle_s = 0.0
            return
        self.idle_s += tick_s
        if ex is not None and ex.state is State.RECEIVING and not ex.method:
            if self.idle_s >= head_timeout:
                self._reject(408, "request head not received in time")
        elif ex is not None and ex.state is State.RECEIVING and not ex.request_complete:
            if self.idle_s >= head_timeout * 6 and not self.flow.client_paused:
                self._reject(408, "request body stalled")
        elif (self.active is None and not self.pipeline and ex is None
              and self.idle_s >= keepalive_timeout):
            self.closing = True
            self.transport.close()
