"""Pure functions for HTTP/1.1 framing and head building (no sockets, no state).

Kept apart from the protocols so that every framing and keep-alive decision
can be tested with plain bytes (as h11 does with `_body_framing`).
"""

from __future__ import annotations

import enum
import re
import time
from email.utils import formatdate
from typing import Final

from ollamamq_fast.wire.errors import reason
from ollamamq_fast.wire.headers import NameKinds


class Framing(enum.Enum):
    """How a response body is delimited (RFC 9112 §6.3)."""

    EMPTY = "empty"  # 1xx, 204, 304, or a response to HEAD
    LENGTH = "length"
    CHUNKED = "chunked"
    CLOSE = "close"  # read until the connection closes


# Hop-by-hop headers (RFC 9110 §7.6.1) plus the ones we set ourselves: the
# gateway's X-Request-ID is the client's one (llama-cpp-python and vLLM answer
# with their own, made up when the gateway kept a client's non-UUID id).
# Transfer-Encoding and Content-Length are NOT dropped from responses: the
# body bytes are passed through as they are, chunk framing included.
_RESPONSE_DROP: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade",
     b"proxy-authenticate", b"x-request-id"}
)


# What response_framing does with a header (by name, any spelling).
_OTHER: Final = 0
_CONTENT_TYPE: Final = 1
_TRANSFER_ENCODING: Final = 2
_CONTENT_LENGTH: Final = 3
_HOP_BY_HOP: Final = 4
_RESPONSE_NAMES: Final = NameKinds(
    {b"content-type": _CONTENT_TYPE, b"transfer-encoding": _TRANSFER_ENCODING,
     b"content-length": _CONTENT_LENGTH, **dict.fromkeys(_RESPONSE_DROP, _HOP_BY_HOP)},
    _OTHER)


def _chunked_last(value: bytes) -> bool:
    """Whether a Transfer-Encoding value ends in the chunked coding, read as llhttp
    reads it: the last comma-separated coding is `chunked` in any case, with
    spaces or tabs before it and only spaces after (a tab there, and it is not).

    Read any other way, the gateway and its parser disagree on where the body
    ends: a body the gateway calls chunked that llhttp reads to the close
    relays the backend's next answer to the client, and the compiled build's
    chunk scanner ends a body llhttp still waits for.
    """
    return value.rsplit(b",", 1)[-1].lstrip(b" \t").rstrip(b" ").lower() == b"chunked"


class ResponseHeaders:
    """A backend response's headers, sorted as the parser hands them over.

    One per backend connection, reset for each response. Each header is
    classified once, when it arrives (`add`, from the parser's on_header), so
    the framing is known without a second pass. The pairs are kept flat
    (name, value, name, value...): `pairs()` makes the list of tuples only for
    a head that is rebuilt or an answer that is cached, not for every response.
    """

    flat: list[bytes]  # name, value, name, value...
    content_type: bytes
    chunked: bool  # the last Transfer-Encoding ends in chunked
    transfer_encoding: bool  # a Transfer-Encoding header came
    has_length: bool
    length: bytes  # the last Content-Length value as sent (b"": none)
    # A hop-by-hop header (RFC 9110 §7.6.1) that must go: then the head cannot
    # be relayed as the backend wrote it (`relay_head`).
    hop_by_hop: bool

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Empty, for the next response (or the final head after an interim one)."""
        self.flat = []
        self.content_type = b""
        self.chunked = False
        self.transfer_encoding = False
        self.has_length = False
        self.length = b""
        self.hop_by_hop = False

    def add(self, name: bytes, value: bytes) -> None:
        """One header, as the parser read it."""
        flat = self.flat
        flat.append(name)
        flat.append(value)
        kind = _RESPONSE_NAMES.kind(name)
        if kind == _OTHER:
            return
        if kind == _CONTENT_TYPE:
            self.content_type = value
        elif kind == _TRANSFER_ENCODING:
            self.transfer_encoding = True
            self.chunked = value == b"chunked" or _chunked_last(value)
        elif kind == _CONTENT_LENGTH:
            self.has_length = True
            self.length = value
        else:
            self.hop_by_hop = True

    def framing(self, status: int, head_request: bool) -> Framing:
        """How the body is delimited (RFC 9112 §6.3)."""
        if head_request or status < 200 or status in (204, 304):
            return Framing.EMPTY
        if self.chunked:
            return Framing.CHUNKED
        if self.has_length:
            return Framing.LENGTH
        return Framing.CLOSE

    def declares_body(self) -> bool:
        """Whether the head has a Content-Length or a Transfer-Encoding header."""
        return self.has_length or self.transfer_encoding

    def pairs(self) -> list[tuple[bytes, bytes]]:
        """The headers as (name, value) pairs, in order: a new list."""
        flat = self.flat
        return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def response_framing(
    status: int, headers: list[tuple[bytes, bytes]], head_request: bool
) -> tuple[Framing, bytes, bool]:
    """(framing, content type, has a hop-by-hop header) of a response with these headers."""
    sorted_headers = ResponseHeaders()
    for name, value in headers:
        sorted_headers.add(name, value)
    return (sorted_headers.framing(status, head_request), sorted_headers.content_type,
            sorted_headers.hop_by_hop)


def response_head(
    status: int,
    reason_phrase: bytes,
    headers: list[tuple[bytes, bytes]],
    extra: bytes,
    close: bool,
    drop_chunked: bool = False,
) -> bytes:
    """The head sent to the client for a proxied response.

    Hop-by-hop headers are dropped (and any header the backend's Connection
    header names), `extra` (gateway headers, already CRLF-terminated) is added,
    and `Connection: close` when the client connection will not be kept.
    `drop_chunked` removes Transfer-Encoding for a body re-emitted de-chunked
    to an HTTP/1.0 client (its end is then the connection close).
    """
    out = [b"HTTP/1.1 ", str(status).encode(), b" ", reason_phrase or reason(status), b"\r\n"]
    named: frozenset[bytes] | None = None
    for name, value in headers:
        lname = name.lower()
        if lname == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")} - {b"close", b"keep-alive"}
            if tokens:
                named = frozenset(tokens)
    for name, value in headers:
        lname = name.lower()
        if lname in _RESPONSE_DROP or (named is not None and lname in named):
            continue
        if drop_chunked and lname == b"transfer-encoding":
            continue
        out.append(name)
        out.append(b": ")
        out.append(value)
        out.append(b"\r\n")
    out.append(extra)
    if close:
        out.append(b"Connection: close\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def relay_head(raw: bytes, extra: bytes, close: bool, hop_by_hop: bool) -> bytes | None:
    """The client's head made from the backend's own bytes, or None to rebuild it.

    `raw` is the backend's status line and header lines without the blank
    line that ends them. Most backend heads need nothing dropped, and then
    the bytes are the head `response_head` would build, with no per-header
    work: only `extra` (and `Connection: close`) is added. `hop_by_hop`:
    whether the head has a hop-by-hop header (RFC 9110 §7.6.1), which must
    go, as `response_framing` found among the parser's header names.
    """
    # `HTTP/1.1 200 ` and a reason phrase: a status line without one is rebuilt
    # with the usual phrase (byte 12 is the space after the three digits).
    if (hop_by_hop or len(raw) < 14 or raw[12] != 0x20 or raw[13] == 0x0D
            or not raw.startswith(b"HTTP/1.1 ")):
        return None
    if close:
        return raw + b"\r\n" + extra + b"Connection: close\r\n\r\n"
    return raw + b"\r\n" + extra + b"\r\n"


def reason_phrase(raw: bytes) -> bytes:
    """The reason phrase of a head's status line (`HTTP/1.1 200 OK` -> b"OK"); b"" if none."""
    end = raw.find(b"\r\n")
    line = raw if end < 0 else raw[:end]
    parts = line.split(b" ", 2)
    return parts[2] if len(parts) == 3 else b""


_date_cache: Final[list[object]] = [0, b""]


def http_date() -> bytes:
    """The current Date header value, computed at most once per second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = formatdate(now, usegmt=True).encode()
    value = _date_cache[1]
    assert isinstance(value, bytes)
    return value


def local_response(
    status: int,
    content_type: bytes,
    body: bytes,
    *,
    close: bool = False,
    head_only: bool = False,
    extra: bytes = b"",
) -> bytes:
    """A complete response the gateway answers itself (errors, local routes)."""
    parts = [
        b"HTTP/1.1 ",
        str(status).encode(),
        b" ",
        reason(status),
        b"\r\nDate: ",
        http_date(),
        b"\r\n",
    ]
    if content_type:
        parts += [b"Content-Type: ", content_type, b"\r\n"]
    if status != 204:  # a 204 has no body, and no Content-Length (RFC 9110 §8.6)
        parts += [b"Content-Length: ", str(len(body)).encode(), b"\r\n"]
    parts.append(extra)
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    if not head_only:
        parts.append(body)
    return b"".join(parts)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (used when re-chunking a streamed upload)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK: Final = b"0\r\n\r\n"
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


def at_stream_boundary(last_data: bytes, content_type: bytes) -> bool:
    """Whether a chunked stream that broke after `last_data` ended on a clean
    line (NDJSON) or event (SSE) boundary, so an error frame can be appended.

    The chunk terminator CRLF follows the payload. NDJSON payloads never hold a
    raw CR (JSON escapes it), so `}\\n\\r\\n` only occurs at a chunk's end.
    """
    ct = content_type.lower()
    if ct.find(b"ndjson") >= 0:
        return last_data.endswith(b"\n\r\n")
    if ct.find(b"event-stream") >= 0:
        return last_data.endswith((b"\n\n\r\n", b"\r\n\r\n\r\n"))
    return False


# The last event of a stream in each format: Ollama's NDJSON `"done": true`
# line, OpenAI's `data: [DONE]`, the Responses API's `response.completed` and
# Anthropic's `message_stop`. Searched in the stream's last bytes only.
_TERMINAL_SSE: Final = (b"data: [DONE]", b"data:[DONE]", b"event: response.completed",
                        b"event: message_stop")
_DONE_TRUE: Final = re.compile(rb'"done"\s*:\s*true')


def terminal_event_relayed(tail: bytes, content_type: bytes) -> bool:
    """Whether a stream's last bytes hold its terminal event (the answer is complete).

    A client may close as soon as it has read that event (the openai SDK does,
    before the backend's end of body): the request is then done, not dropped.
    """
    ct = content_type.lower()
    if ct.find(b"event-stream") >= 0:
        return any(mark in tail for mark in _TERMINAL_SSE)
    if ct.find(b"ndjson") >= 0:
        body = tail.rstrip(b"\r\n0")  # the chunk framing after the last line, if any
        last = body[body.rfind(b"\n", 0, len(body) - 1) + 1 :]
        return _DONE_TRUE.search(last) is not None
    return False


# One occurrence per stream event: the end of an NDJSON line, an SSE `data:` field.
_NDJSON_MARK: Final = b"}\n"
_SSE_MARK: Final = b"data:"
# Events of a stream that carry no generated token, when they came (a stream cut
# short has no last ones): Ollama's final line; an OpenAI chat stream's role
# event (a completions stream has none), its finish event (no content on the
# servers that send no usage: llama-cpp-python) and `[DONE]`.
_DONE_EVENT: Final = b"[DONE]"
_FINISH_KEY: Final = b'"finish_reason"'
_FINISHED: Final = re.compile(rb'"finish_reason"\s*:\s*"')


# Content types seen -> their event mark: a backend answers with the same few
# types, and one dict lookup is cheaper than lower() and two finds. Bounded: a
# backend inventing types gets them computed each time, not kept.
_marks: Final[dict[bytes, bytes]] = {}
_MARKS_KEPT: Final = 64


def event_mark(content_type: bytes) -> bytes:
    """The bytes that occur once per event of a stream of this type (b"" if not a stream)."""
    mark = _marks.get(content_type)
    if mark is not None:
        return mark
    ct = content_type.lower()
    if ct.find(b"ndjson") >= 0:
        mark = _NDJSON_MARK
    elif ct.find(b"event-stream") >= 0:
        mark = _SSE_MARK
    else:
        mark = b""
    if len(_marks) < _MARKS_KEPT:
        _marks[content_type] = mark
    return mark


def estimated_tokens(events: int, content_type: bytes, tail: bytes, chat: bool) -> int:
    """Generated tokens estimated from a stream's event count (about one token an
    event), less the events without a token that came: `tail` is the stream's last
    bytes (at least its last read), `chat` whether it is an OpenAI chat stream.

    The finish event comes just before `[DONE]`, but maybe not among the last
    reads (a server may write each event, and the end of body, apart): a
    complete stream is taken to have one unless the event before `[DONE]` is in
    `tail` and has no finish reason (llama-cpp-python's interrupted stream).
    """
    overhead = 0
    if content_type.lower().find(b"event-stream") >= 0:
        if chat:
            overhead = 1
        at = tail.rfind(_DONE_EVENT)
        if at >= 0:
            overhead += 1
            before = tail[:at]
            if before.find(_FINISH_KEY) < 0 or _FINISHED.search(before) is not None:
                overhead += 1
        elif _FINISHED.search(tail) is not None:
            overhead += 1
    elif terminal_event_relayed(tail, content_type):
        overhead = 1
    return max(events - overhead, 0)
