"""HTTP/1.1 response framing as Go's net/http writes it: pure functions and caches."""

from __future__ import annotations

import time
from email.utils import formatdate

REASONS: dict[int, str] = {
    100: "Continue",
    200: "OK",
    201: "Created",
    204: "No Content",
    301: "Moved Permanently",
    307: "Temporary Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Request Entity Too Large",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    499: "Client Closed Request",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

# Go's net/http buffers this much handler output before it must choose between
# Content-Length and chunked (bufferBeforeChunkingSize): larger bodies written
# in one go by a still-running handler come out chunked.
GO_CHUNKING_THRESHOLD = 2048

CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"

CT_JSON_GIN = b"application/json; charset=utf-8"
CT_JSON = b"application/json"
CT_NDJSON = b"application/x-ndjson"
CT_SSE = b"text/event-stream"
CT_TEXT_GIN = b"text/plain; charset=utf-8"
CT_TEXT = b"text/plain"
CT_HTML = b"text/html; charset=utf-8"

_STATUS_LINES: dict[int, bytes] = {}


def status_line(status: int) -> bytes:
    """`HTTP/1.1 200 OK\\r\\n`, cached per code."""
    line = _STATUS_LINES.get(status)
    if line is None:
        reason = REASONS.get(status, "Status")
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {reason}\r\n".encode()
    return line


class Clock:
    """Caches the HTTP Date header and the RFC 3339 second prefix once per second."""

    __slots__ = ("_date", "_rfc_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._date = b""
        self._rfc_prefix = ""

    def _refresh(self, second: int) -> None:
        """Recompute the per-second strings; called at most once a second."""
        self._second = second
        self._date = formatdate(second, usegmt=True).encode()
        self._rfc_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))

    def http_date(self) -> bytes:
        """The value of the Date header for now."""
        second = int(time.time())
        if second != self._second:
            self._refresh(second)
        return self._date

    def created_at(self) -> str:
        """time.Now().UTC() in Go's RFC3339Nano form (trailing zeros trimmed)."""
        ns = time.time_ns()
        second, frac = divmod(ns, 1_000_000_000)
        if second != self._second:
            self._refresh(second)
        if frac == 0:
            return self._rfc_prefix + "Z"
        return f"{self._rfc_prefix}.{frac:09d}".rstrip("0") + "Z"


# (status, content type, close) -> the head split around Content-Length's value and the date.
_LENGTH_HEADS: dict[tuple[int, bytes | None, bool], tuple[bytes, bytes]] = {}


def head(status: int, date: bytes, content_type: bytes | None, length: int | None, close: bool, extra: bytes = b"") -> bytes:
    """A response head; length None means chunked, -1 means neither header (HEAD of a large body)."""
    if length is not None and length >= 0 and not extra:
        # Hot path (every non-stream answer): two cached pieces around the length and date.
        key = (status, content_type, close)
        pieces = _LENGTH_HEADS.get(key)
        if pieces is None:
            pieces = _LENGTH_HEADS[key] = length_head_pieces(status, content_type, close)
        return pieces[0] + b"%d" % length + pieces[1] + date + b"\r\n\r\n"
    parts = [status_line(status)]
    if close:
        parts.append(b"Connection: close\r\n")
    if length is not None and length >= 0:
        parts.append(b"Content-Length: %d\r\n" % length)
    if content_type is not None:
        parts.append(b"Content-Type: " + content_type + b"\r\n")
    parts.append(b"Date: " + date + b"\r\n")
    if extra:
        parts.append(extra)
    if length is None:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def length_head_pieces(status: int, content_type: bytes | None, close: bool) -> tuple[bytes, bytes]:
    """Build the cached halves of a Content-Length head (Go's alphabetical header order)."""
    first = status_line(status) + (b"Connection: close\r\n" if close else b"") + b"Content-Length: "
    second = b"\r\n" + (b"Content-Type: " + content_type + b"\r\n" if content_type is not None else b"") + b"Date: "
    return first, second


def frame(data: bytes) -> bytes:
    """One chunk of a chunked body (RFC 9112 §7.1)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def frame_many(chunks: list[bytes]) -> bytes:
    """Several chunks in one buffer, so a batch costs one transport.write."""
    parts: list[bytes] = []
    append = parts.append
    for data in chunks:
        append(b"%x\r\n" % len(data))
        append(data)
        append(b"\r\n")
    return b"".join(parts)

