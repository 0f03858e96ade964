"""A backend connection: writes one request at a time and relays the response raw.

The response is not re-encoded: its head is rebuilt (hop-by-hop headers
dropped, gateway headers added) and every body byte, chunk framing included, is
written to the client as it arrives. An httptools response parser reads the
same bytes only to learn where the message ends; no Python code looks at the
body, except the last bytes kept by reference for a clean error frame if the
backend dies mid-stream.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final, cast

import httptools
from mypy_extensions import mypyc_attr

from ollamamq_fast.accounting.ledger import Record
from ollamamq_fast.proxy.chunks import SCAN_CHUNKS, ChunkError, ChunkScanner
from ollamamq_fast.proxy.flow import HIGH_WATER, LOW_WATER, MAX_HEAD_BYTES, FlowControl
from ollamamq_fast.proxy.transport import Transport
from ollamamq_fast.wire import framing

# A body that came with the head is joined to the rebuilt head below this size
# (one small copy) and written from the read itself above it.
_JOIN_BELOW: Final = 4096
_CR: Final = 13
_LF: Final = 10
# How much of the body's end the token tap and the end-of-stream checks see.
_TAIL: Final = 4096
# A chunked body's end is found by a ChunkScanner (when scan_chunks) if at least
# this much of it came with the head: below, one llhttp call for the whole read
# costs less than splitting it. A stream whose first read is smaller (a backend
# sending token by token) stays with llhttp, one chunk a read.
_SCAN_FROM: Final = 1024
# A connection whose client left after the stream's last event is read to the
# answer's end (its last chunk, a few bytes behind) and pooled, if that end
# comes within this; else dropped.
DRAIN_S: Final = 2.0

if TYPE_CHECKING:
    from ollamamq_fast.policy.streamusage import UsageStripper
    from ollamamq_fast.proxy.pool import UpstreamPool

@mypyc_attr(allow_interpreted_subclasses=True)
class ResponseSink(Record):
    """What an upstream connection reports to: the exchange it is bound to, or
    the translating relay that stands for it (proxy/translating.py).

    A base class, not a Protocol: compiled, the connection then calls these
    methods directly (a Protocol call is a lookup by name and an argument
    check, on every response and every streamed read). It extends the ledger's
    Record only because a class has one base and the exchange is both.
    """

    __slots__ = ("http10",)

    def __init__(self) -> None:
        super().__init__()
        self.http10 = False  # the client speaks HTTP/1.0: chunked bodies must be de-chunked

    @property
    def client_transport(self) -> Transport | None:
        """Where response bytes go; None once the client is gone."""
        raise NotImplementedError

    def response_head(self, conn: UpstreamConnection) -> bytes | None:
        """Build the head to send to the client; None if the exchange retries elsewhere."""
        raise NotImplementedError

    def response_complete(self, conn: UpstreamConnection) -> None:
        """The backend's response ended cleanly."""
        raise NotImplementedError

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        """The connection closed before the response ended."""
        raise NotImplementedError

    def upstream_continue(self, conn: UpstreamConnection) -> None:
        """The backend answered 100 Continue."""
        raise NotImplementedError


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to a backend; carries one exchange at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        # Per-connection state
        self.pool = pool
        self.transport: Transport | None = None
        self.closed = False
        self.sink: ResponseSink | None = None
        self.responses = 0  # completed responses; > 0 means it came from the pool
        self.idle_since = 0.0
        # Silence detection: the reaper compares rx_count between its ticks,
        # which costs one integer add per read instead of a clock call, and
        # stamps the tick that last saw activity (the data plane's clock; the
        # request's own write time, Exchange.sent_at, bounds it from below).
        self.rx_count = 0
        self.rx_seen = 0
        self.silent_since = 0.0
        self.writing_paused = False
        # The client connection's flow control, while an exchange uses this connection.
        self.flow: FlowControl | None = None
        self.counted = True  # still counted in pool.open
        # The response parser is kept from one response to the next when it can be.
        self.parser_plain = False
        self.parser_idle = False
        # A relayed chunked body's end is found by a ChunkScanner instead of
        # llhttp when that is cheaper (compiled; proxy/chunks.py).
        self.scan_chunks = SCAN_CHUNKS
        self.scan_from = _SCAN_FROM
        # The last answer's content type and its event mark (on_headers_complete).
        self.marked_type = b""
        self.marked_as = framing.event_mark(b"")
        # The response's headers, sorted as they come (reset for each response).
        self.response_headers = framing.ResponseHeaders()
        # Per-response state
        self._reset_response(False)

    def _reset_response(self, head_request: bool, http10: bool = False,
                        strip: UsageStripper | None = None, tee: int = 0) -> None:
        # HTTP/1.0 clients cannot read chunked bodies (RFC 9112 §6.1): for them a
        # parser with an on_body callback re-emits the payload, ended by close.
        # The same path filters a stream whose usage the gateway injected.
        plain = not http10 and strip is None
        if not (plain and self.parser_plain and self.parser_idle):
            # llhttp is ready for the next response only after a message it
            # ended itself; a HEAD answer or a failed parse needs a new parser.
            self.parser = httptools.HttpResponseParser(self if plain else _Dechunker(self))
            self.parser_plain = plain
        self.parser_idle = False
        self.http10 = http10
        self.strip = strip
        # Response cache tee: the bytes forwarded to the client, up to `tee_room`
        # bytes (then dropped: too large to keep). None when not cacheable.
        self.tee: list[bytes] | None = [] if tee else None
        self.tee_room = tee
        self.dechunking = False
        # Set once a chunked body's head is read, when scan_chunks: llhttp then
        # reads no more of this response (see _scanned).
        self.scanner: ChunkScanner | None = None
        self.pending_body: list[bytes] = []
        self.head_request = head_request
        self.head_sent = False
        self.head_buf: bytes | bytearray = b""
        self.head_scan_from = 0
        self.head_end = -1  # where the head's blank line starts in head_buf, once found
        # The final head's status and header lines as the backend sent them:
        # relayed as they are when nothing must go (b"" means rebuild).
        self.raw_head = b""
        self.response_headers.reset()
        self.status = 0
        self.headers_done = False
        self.interim = False
        self.complete = False
        # A message began after this one ended: the backend sent bytes past its answer.
        self.overrun = False
        self.got_bytes = False
        # The last two reads of the body, kept by reference for the token tap
        # and a clean end if the backend dies; a read that came with the head
        # starts its body at `*_from` (the head is not sliced off: no copy).
        self.last_data = b""
        self.last_from = 0
        self.body_got = 0  # body bytes read so far (see _answer_end)
        self.prev_data = b""
        self.prev_from = 0
        self.content_type = b""
        self.hop_by_hop = False  # the head names a hop-by-hop header: rebuilt, not relayed
        self.framing = framing.Framing.EMPTY
        self.backend_keep_alive = False
        # Stream events (only for inference streams): the estimate when a
        # backend reports no usage. A read's events are counted (one C-level
        # `count`) when it leaves the two kept reads; the kept ones only if
        # the estimate is asked for (events_seen), so an answer that comes in
        # one or two reads with its usage is never scanned.
        self.tally = False
        self.event_mark = b""
        self.events = 0

    # -- asyncio.Protocol interface -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(Transport, transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)

    def data_received(self, data: bytes) -> None:
        self.rx_count += 1
        sink = self.sink
        if sink is None:
            # Bytes on an idle connection: the backend is confused; drop it.
            self.abort()
            return
        self.got_bytes = True
        if self.head_sent:
            # Parsed before it is relayed: bytes past the answer's end (a second
            # response, the start of one) would be read by the client as the
            # answer to its next request. Such a read is never relayed.
            scanner = self.scanner
            if scanner is not None:
                data = self._scanned(scanner, data, 0)
                if not data:
                    return
            else:
                if not self._parsed(data):
                    return
                self.body_got += len(data)
                if self.complete and (data[-1] == _CR or data[-1] == _LF):
                    data = data[:self._answer_end(data, 0)]
                    if not data:
                        self.sink = None
                        sink.response_complete(self)
                        return
            gone = self.prev_data
            if gone and self.event_mark:
                self.events += _count(gone, self.event_mark, self.prev_from)
            self.prev_data = self.last_data
            self.prev_from = self.last_from
            self.last_data = data
            self.last_from = 0
            client = sink.client_transport
            if client is not None and not self.dechunking:
                client.write(data)
                if self.tee is not None:
                    self.keep(data)
            if self.dechunking:
                self.flush_body(sink)
        else:
            self._receive_head(data, sink)
            if self.sink is not sink:
                return  # the exchange let go of this connection (retry elsewhere)
        if self.complete:
            self.sink = None
            sink.response_complete(self)

    def _parsed(self, data: bytes | memoryview) -> bool:
        """Feed a read to the response parser. False when the backend broke HTTP or
        sent more than one answer: the connection is then dropped (_protocol_error)."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            cause = exc.__context__  # what a callback raised, for httptools' generic error
            self._protocol_error(cause if isinstance(cause, _RefusedHead) else exc)
            return False
        except httptools.HttpParserUpgrade:
            # A 101 after the answer is a second answer; as the answer, one not asked for.
            self._protocol_error(_Overrun() if self.head_sent else ValueError(
                "the backend answered 101 Switching Protocols to a request that asked for no "
                "upgrade"))
            return False
        if self.overrun:
            self._protocol_error(_Overrun())
            return False
        return True

    def _scanned(self, scanner: ChunkScanner, data: bytes, start: int) -> bytes:
        """Scan a chunked body's read from `start`: the read to relay (cut after the
        body's end), or b"" when the backend broke the framing or sent more than
        one answer (the connection is then dropped)."""
        try:
            end = scanner.feed(data, start)
        except ChunkError as exc:
            self._protocol_error(exc)
            return b""
        if end < 0:
            return data
        if end < len(data):
            if data[end:].strip(b"\r\n"):
                self._protocol_error(_Overrun())
                return b""
            data = data[:end]  # CRLFs between messages (llhttp skips them): not relayed
        # llhttp saw the head only: end its message, so it reads the next answer.
        # It must agree that the body was chunked (wire/framing.py reads the head
        # as llhttp does); if not, the answer is not relayed as complete.
        if not self._parsed(b"0\r\n\r\n") or not self.complete:
            if not self.closed:
                self._protocol_error(ValueError("the backend's answer has no clear end"))
            return b""
        return data

    def _whole_answer_head_end(self, buf: bytes, start: int) -> int:
        """Where the head ends in a read that holds a whole Content-Length answer; else -1.

        The usual small answer: its body is the read's last Content-Length
        bytes, so the head's blank line is found without bytes.find (about
        1,100 instructions through Python's argument parsing). Not when the
        read ends in CR or LF: a stray CRLF may follow the body (_answer_end).
        """
        if not self.complete or self.framing is not framing.Framing.LENGTH:
            return -1
        size = len(buf)
        if size == 0 or buf[size - 1] == _CR or buf[size - 1] == _LF:
            return -1
        try:
            length = int(self.response_headers.length)
        except ValueError:
            return -1
        end = size - length - 4
        if length < 0 or end < start or buf[end] != _CR or buf[end + 1] != _LF or buf[end + 2] != _CR \
                or buf[end + 3] != _LF:
            return -1
        return end

    def _answer_end(self, data: bytes, body_at: int) -> int:
        """Where the answer ends in the read that completed it, its body starting at body_at.

        llhttp skips CR and LF bytes after a message (RFC 9112 §2.2 robustness),
        so a backend's stray CRLF after its answer comes in the same read
        without a parse error. Relayed, it would start the client's next
        answer (Python's http.client reads it as a bad status line): it is cut
        off here, as the chunk scanner cuts it (_scanned). Only called when
        the read ends in CR or LF.
        """
        kind = self.framing
        if kind is framing.Framing.LENGTH:
            try:
                length = int(self.response_headers.length)
            except ValueError:
                return len(data)
            return max(body_at, len(data) - max(0, self.body_got - length))
        if kind is framing.Framing.CHUNKED:
            # The answer ends in CRLFCRLF (after the last chunk or a trailer),
            # right after a byte that is neither CR nor LF.
            run = _crlf_run(data, body_at)
            if run < len(data) - body_at:
                return len(data) - run + 4 if run > 4 else len(data)
            # All CR/LF: the last CRLFCRLF began in the previous read.
            prev = self.last_data
            return body_at + max(0, 4 - _crlf_run(prev, self.last_from))
        if kind is framing.Framing.EMPTY:
            return body_at
        return len(data)

    def _feed_head(self, data: bytes) -> bool:
        """Feed the parser a read that holds (part of) the head; False if the
        connection was dropped. With scan_chunks, only up to the head's end: a
        chunked body after it goes to a ChunkScanner."""
        if not (self.scan_chunks and self.parser_plain) or self.head_request \
                or len(data) < self.scan_from:
            # (A read shorter than scan_from cannot hold that much body: the
            # usual small answer is fed whole without searching it here.)
            return self._parsed(data)
        held = self.head_buf
        start = self.head_scan_from
        end = held.find(b"\r\n\r\n", max(start, len(held) - len(data) - 3))
        self.head_end = end  # _receive_head needs it too
        cut = end + 4 - (len(held) - len(data))
        # Split only a head followed by enough body to be worth it, and that may
        # announce a chunked one ("chunked" in any case but upper): llhttp reads
        # any other answer whole in one call. (Not `in`: bytes' __contains__
        # tries the operand as an int first, and builds a TypeError to drop.)
        if end < 0 or len(data) - cut < self.scan_from or held.find(b"hunked", start, end) < 0:
            return self._parsed(data)
        if not self._parsed(memoryview(data)[:cut]):
            return False
        if self.headers_done and self.framing is framing.Framing.CHUNKED and not self.complete:
            self.scanner = ChunkScanner()
            return True
        return self._parsed(memoryview(data)[cut:])

    def _receive_head(self, data: bytes, sink: ResponseSink) -> None:
        # Nearly always the whole head comes in one read: then no copy is made.
        # A head in many pieces grows a bytearray (amortized, not quadratic).
        held = self.head_buf
        if not held:
            self.head_buf = data
        elif isinstance(held, bytearray):
            held += data
        else:
            self.head_buf = bytearray(held) + data
        if not self._feed_head(data):
            return
        if not self.headers_done:
            if len(self.head_buf) > MAX_HEAD_BYTES:
                # The same bound as for client heads: a backend cannot make the
                # gateway hold an endless head.
                self._protocol_error(ValueError(
                    f"response head larger than {MAX_HEAD_BYTES // 1024} KiB"))
            return
        # The first blank line after the scan start ends the final head: headers
        # cannot contain one, interim (1xx) heads were skipped past already, and
        # llhttp refuses a bare LF, so it is a CRLFCRLF.
        held = self.head_buf
        buf = held if isinstance(held, bytes) else bytes(held)
        start = self.head_scan_from
        end = self.head_end
        if end < start:  # not found by _feed_head, or an interim head's end
            end = self._whole_answer_head_end(buf, start)
        if end < start:
            end = buf.find(b"\r\n\r\n", start)
        if end < 0:  # cannot happen after llhttp ended a head; rebuild, relay no body
            body_at = len(buf)
            self.raw_head = b""
        else:
            body_at = end + 4
            self.raw_head = buf[start:end]
        if self.head_request and len(buf) > body_at:
            # A body after a HEAD answer's head: not relayed.
            self._protocol_error(_Overrun())
            return
        self.body_got = len(buf) - body_at
        scanner = self.scanner
        if scanner is not None and len(buf) > body_at:
            buf = self._scanned(scanner, buf, body_at)
            if not buf:
                return
        elif self.complete and len(buf) > body_at and (buf[-1] == _CR or buf[-1] == _LF):
            buf = buf[:self._answer_end(buf, body_at)]
        self.head_buf = b""
        self.head_sent = True
        head = sink.response_head(self)
        if head is None:
            return
        client = sink.client_transport
        size = len(buf) - body_at
        if size > 0:
            # Raw, as data_received keeps it (for the token tap).
            self.last_data = buf
            self.last_from = body_at
        if self.dechunking:
            body = self.transform(b"".join(self.pending_body))
            self.pending_body = []
            if self.complete and self.strip is not None:
                body += self.strip_tail()  # the whole filtered answer came with its head
            if client is not None:
                client.write(head + body)
                if body and self.tee is not None:
                    self.keep(body)
            return
        if client is None:
            return
        if size <= 0:
            client.write(head)
        elif size < _JOIN_BELOW:
            body = buf[body_at:]
            client.write(head + body)
            if self.tee is not None:
                self.keep(body)
        else:
            # A large body that came with the head (a whole stream from a fast
            # backend, a big embedding): written from the read itself, not
            # copied twice (slice, join). One writelines, not two writes:
            # uvloop sends each write() at once, so two would cost a second
            # syscall and a second TCP segment; writelines sends one writev.
            client.writelines((head, memoryview(buf)[body_at:]))
            if self.tee is not None:
                self.keep(buf[body_at:])

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._let_go()
        sink = self.sink
        self.sink = None
        if sink is not None:
            if not self.complete and self.head_sent and self.framing is framing.Framing.CLOSE:
                # Close-delimited body: the close is the end of the message.
                try:
                    self.parser.feed_data(b"")
                except httptools.HttpParserError:
                    pass
                self.complete = True
                if self.dechunking:
                    self.flush_body(sink)
                sink.response_complete(self)
                return
            sink.upstream_lost(self, exc)
        else:
            self.pool.forget(self)

    def pause_writing(self) -> None:
        # Request body faster than the backend reads it: stop reading the client.
        self.writing_paused = True
        if self.flow is not None:
            self.flow.upstream_writing_paused()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.flow is not None:
            self.flow.upstream_writing_resumed()

    def _let_go(self) -> None:
        """The exchange is done with this connection: hand flow control back, unpaused."""
        flow = self.flow
        if flow is not None:
            self.flow = None
            if flow.upstream is self.transport:
                flow.unbind()

    # -- httptools parser callbacks -------------------------------------------------

    # No on_status: the reason phrase is read from the relayed head when a head
    # is rebuilt (framing.reason_phrase), not collected by a callback per response.

    def on_header(self, name: bytes, value: bytes) -> None:
        self.response_headers.add(name, value)

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # Interim response: not forwarded (we sent no Expect upstream), but a
            # 100 Continue tells a waiting request body that it may go.
            if status not in (100, 102, 103) and self.response_headers.declares_body():
                # A 1xx has no body (RFC 9112 §6.1, §8.6), but llhttp reads the one
                # such a head announces: the final head looked for after it would
                # be found in that body, and the rest relayed as the answer.
                raise _InterimBody(status)
            self.interim = True
            end = self.head_buf.find(b"\r\n\r\n", self.head_scan_from)
            self.head_scan_from = end + 4 if end >= 0 else len(self.head_buf)
            self.response_headers.reset()
            if status == 100 and self.sink is not None:
                self.sink.upstream_continue(self)
            return
        self.status = status
        self.headers_done = True
        # Only meaningful inside a parser callback: llhttp resets it afterwards.
        self.backend_keep_alive = self.parser.should_keep_alive()
        headers = self.response_headers
        self.framing = headers.framing(status, self.head_request)
        self.content_type = headers.content_type
        self.hop_by_hop = headers.hop_by_hop
        if self.framing is framing.Framing.CLOSE and headers.transfer_encoding:
            # A Transfer-Encoding whose last coding is not chunked: the body ends
            # at the close (RFC 9112 §6.3), but a lenient client that reads, say,
            # "chunked<TAB>" as chunked would take what follows for another
            # answer. No LLM server sends one; refused, as nginx does.
            raise _UnknownCoding()
        if self.tally and status == 200:
            # A backend sends the same content type on every answer: a compare
            # with the last one is cheaper than framing.event_mark's dict look-up
            # (which hashes the new bytes object).
            content_type = self.content_type
            if content_type != self.marked_type:
                self.marked_type = content_type
                self.marked_as = framing.event_mark(content_type)
            self.event_mark = self.marked_as
        if self.head_request or self.framing is framing.Framing.EMPTY:
            # No body follows (HEAD, 204, 304). The parser cannot be told about
            # HEAD, so the message ends here and the parser is replaced.
            self.complete = True
            if self.head_request:
                # Nor is the connection kept: a body the backend sent after a
                # HEAD answer anyway would be read as the next request's answer.
                self.backend_keep_alive = False

    def on_message_begin(self) -> None:
        if self.complete:
            self.overrun = True

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.complete = True
        self.parser_idle = True

    # -- Re-emitted bodies (HTTP/1.0 de-chunking, stream usage stripping) ----------

    def transform(self, payload: bytes) -> bytes:
        """A de-chunked body piece as the client gets it: filtered, re-chunked if chunked."""
        strip = self.strip
        if strip is not None:
            payload = strip.feed(payload)
            if payload and self.framing is framing.Framing.CHUNKED and not self.http10:
                payload = framing.chunk(payload)
        return payload

    def flush_body(self, sink: ResponseSink) -> None:
        """Write what the parser re-emitted from one read in one write (with a filter's end)."""
        pending = self.pending_body
        payload = b""
        if pending:
            self.pending_body = []
            payload = self.transform(pending[0] if len(pending) == 1 else b"".join(pending))
        if self.complete and self.strip is not None:
            payload += self.strip_tail()
        client = sink.client_transport
        if payload and client is not None:
            client.write(payload)
            if self.tee is not None:
                self.keep(payload)

    def strip_tail(self) -> bytes:
        """End of a filtered body: what the stripper held back, then the last chunk."""
        strip, self.strip = self.strip, None
        if strip is None:
            return b""
        rest = strip.flush()
        if self.framing is framing.Framing.CHUNKED and not self.http10:
            rest = (framing.chunk(rest) if rest else b"") + framing.LAST_CHUNK
        return rest

    def keep(self, data: bytes) -> None:
        """Tee forwarded bytes for the response cache, within the entry bound."""
        tee = self.tee
        if tee is None:
            return
        self.tee_room -= len(data)
        if self.tee_room < 0:
            self.tee = None  # too large to cache
        else:
            tee.append(data)

    # -- Exchange-facing API ----------------------------------------------------------

    def send(self, sink: ResponseSink, flow: FlowControl, data: list[bytes], head_request: bool,
             strip: UsageStripper | None = None, tee: int = 0, tally: bool = False) -> None:
        """Bind to an exchange and write its request head (and body, if any).

        `strip` filters the injected usage out of an SSE answer; `tee` > 0 keeps
        up to that many forwarded bytes for the response cache; `tally` counts
        a 200 stream's events (a token estimate when the backend reports none).
        """
        self._reset_response(head_request, sink.http10, strip, tee)
        self.tally = tally
        self.sink = sink
        self.flow = flow
        flow.bind(self.transport)
        self.rx_seen = self.rx_count
        assert self.transport is not None
        if len(data) == 1:
            self.transport.write(data[0])
        else:
            self.transport.writelines(data)

    def write(self, data: bytes) -> None:
        """Write more request body bytes."""
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def tail(self, limit: int = _TAIL) -> bytes:
        """The body's last `limit` bytes (all of it when shorter) of the two reads kept.

        For the token tap and the end-of-stream checks; the body of a read
        that came with the head starts at its `last_from`. One read that
        holds them all is sliced, never joined.
        """
        last = self.last_data
        start = self.last_from
        size = len(last) - start
        if size >= limit:
            return last[-limit:]
        body = last[start:] if start else last
        prev = self.prev_data
        if not prev:
            return body
        return prev[max(self.prev_from, len(prev) - (limit - size)) :] + body

    def events_seen(self) -> int:
        """The stream's events so far (0 unless it is an inference stream)."""
        mark = self.event_mark
        if not mark:
            return 0
        events = self.events
        if self.prev_data:
            events += _count(self.prev_data, mark, self.prev_from)
        if self.last_data:
            events += _count(self.last_data, mark, self.last_from)
        return events

    def finish_response(self, reusable: bool) -> None:
        """Called by the exchange after response_complete: back to the pool or closed."""
        self.responses += 1
        self._let_go()
        if reusable and not self.closed and self.backend_keep_alive:
            self.pool.release(self)
        else:
            self.close()

    def drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """The client left after the stream's last event, before the answer's end (the
        openai SDK closes on `[DONE]`; uvicorn writes the last chunk apart): read the
        rest, relayed nowhere, and pool the connection, instead of dropping it."""
        if (self.closed or not self.backend_keep_alive or self.head_request
                or self.framing is framing.Framing.CLOSE):
            self.abort()
            return
        sink = _Drain()
        self.sink = sink
        self._let_go()  # its reading resumed, were the client's slowness pausing it
        loop.call_later(DRAIN_S, self._drain_expired, sink)

    def _drain_expired(self, sink: ResponseSink) -> None:
        if self.sink is sink:  # not ended yet (a pooled one has another sink, or none)
            self.abort()

    def close(self) -> None:
        """Close gracefully (flushes what was written)."""
        self.sink = None
        self._let_go()
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
        self.pool.forget(self)

    def abort(self) -> None:
        """Close at once. The backend sees the connection drop, which is Ollama's
        only cancel signal (docs/protocol-notes.md §1, §7.10)."""
        self.sink = None
        self._let_go()
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()
        self.pool.forget(self)

    def _protocol_error(self, exc: Exception) -> None:
        sink = self.sink
        self.sink = None
        self._let_go()
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()
        self.pool.forget(self)
        if sink is not None:
            sink.upstream_lost(self, exc)


class _Drain(ResponseSink):
    """The sink of a connection read to its answer's end for the pool (drain)."""

    @property
    def client_transport(self) -> Transport | None:
        return None

    def response_complete(self, conn: UpstreamConnection) -> None:
        conn.responses += 1
        conn.pool.release(conn)

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        conn.pool.forget(conn)


class _Overrun(ValueError):
    """The backend sent bytes past the end of its answer (a second response, or
    the start of one): the connection is dropped and those bytes are not relayed."""

    def __init__(self) -> None:
        super().__init__("the backend sent more than one answer to one request")


class _RefusedHead(ValueError):
    """A response head the gateway refuses (raised in a parser callback)."""


class _InterimBody(_RefusedHead):
    """The backend announced a body in an interim (1xx) answer."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the backend announced a body in an interim {status} answer")


class _UnknownCoding(_RefusedHead):
    """The backend's Transfer-Encoding does not end in chunked."""

    def __init__(self) -> None:
        super().__init__("the backend sent a Transfer-Encoding that does not end in chunked")


def _crlf_run(data: bytes, start: int) -> int:
    """How many CR and LF bytes end data (not counting back past start)."""
    i = len(data)
    while i > start and (data[i - 1] == _CR or data[i - 1] == _LF):
        i -= 1
    return len(data) - i


def _count(data: bytes, mark: bytes, start: int) -> int:
    """Occurrences of `mark` in data[start:] (the start argument only when needed: it costs)."""
    return data.count(mark, start) if start else data.count(mark)


class _Dechunker:
    """Parser callbacks for an HTTP/1.0 client: the connection's own, plus on_body."""

    def __init__(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        self.on_message_begin = conn.on_message_begin
        self.on_header = conn.on_header
        self.on_message_complete = conn.on_message_complete

    def on_headers_complete(self) -> None:
        conn = self.conn
        conn.on_headers_complete()
        if conn.interim:
            return
        if conn.strip is not None and (
            conn.status != 200 or conn.content_type.lower().find(b"event-stream") < 0
            or conn.framing is framing.Framing.LENGTH
        ):
            conn.strip = None  # not the SSE stream we asked usage for: pass it as it is
        conn.dechunking = (conn.framing is framing.Framing.CHUNKED and conn.http10) or (
            conn.strip is not None
        )

    def on_body(self, body: bytes) -> None:
        conn = self.conn
        if conn.dechunking:
            # Collected, and written once per read by the connection (flush_body).
            conn.pending_body.append(body)
