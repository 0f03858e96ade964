"""One access-log line as bytes: compiled, because it runs once per request.

The access log's writer thread formats the lines, and it shares the GIL with
the event loop: every instruction spent here is one the loop cannot spend on
requests. Interpreted, a line cost about 25,000 instructions (a frame, a
13-entry dict, three decodes, a str round trip); compiled and kept as bytes
from orjson to the file it costs a fraction of that.

Client-controlled text (user id, path, request id, model) reaches the log, so
no value may end a line or forge a field: orjson escapes quotes, backslashes
and control characters below 0x20, and the characters a line reader could
still take as a break or a control (DEL, C1 such as NEL, U+2028/2029, format
characters) are written as \\uXXXX escapes; the line stays valid JSON.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Final

import orjson

# Each line ends with "\n", added by orjson itself (no concatenation).
_NEWLINE = orjson.OPT_APPEND_NEWLINE


# ".000Z" to ".999Z": a table look-up, not a format call per line.
_MILLIS: Final = tuple(f".{ms:03d}Z" for ms in range(1000))


class Stamp:
    """ISO-8601 UTC time stamps to the millisecond; a second's text is made once."""

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def text(self, ts: float) -> str:
        """`2026-12-06T22:43:45.123Z` for a Unix time."""
        second = int(ts)
        if second != self.second:
            self.second = second
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        ms = int((ts - second) * 1000)
        if ms < 0 or ms > 999:  # a negative time stamp; never on a sane clock
            ms = 0
        return self.prefix + _MILLIS[ms]


def _text(value: Any) -> Any:
    """Bytes kept on the loop (method, path, request id) decoded here, byte for byte."""
    return value.decode("latin-1") if isinstance(value, bytes) else value


def json_line(stamp: Stamp, fields: tuple[Any, ...]) -> bytes:
    """One access record (accesslog.FIELDS order) as one JSON line, newline included."""
    (ts, user, ip, method, path, model, status, backend, queue_ms, duration_ms,
     prompt_tokens, completion_tokens, request_id) = fields
    line: bytes = orjson.dumps({
        "ts": stamp.text(ts), "user": user, "ip": ip, "method": _text(method),
        "path": _text(path), "model": model, "status": status, "backend": backend,
        "queue_ms": queue_ms, "duration_ms": duration_ms, "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens, "request_id": _text(request_id),
    }, option=_NEWLINE)
    if line.isascii() and line.find(b"\x7f") < 0:
        return line
    return escape_unprintable(line.decode()).encode()


def json_batch(stamp: Stamp, pending: deque[tuple[Any, ...]], limit: int) -> tuple[bytes, int]:
    """Up to `limit` queued records as JSON lines, joined; and how many were taken."""
    lines: list[bytes] = []
    n = 0
    while n < limit and pending:
        lines.append(json_line(stamp, pending.popleft()))
        n += 1
    return b"".join(lines), n


def escape_unprintable(text: str) -> str:
    """`text` with every non-printable character as a JSON \\uXXXX escape (pairs above U+FFFF).

    Line feeds stay: orjson has already escaped those inside values, so a raw
    one can only be the line's own end.
    """
    out: list[str] = []
    for c in text:
        if c.isprintable() or c == "\n":
            out.append(c)
            continue
        code = ord(c)
        if code > 0xFFFF:
            code -= 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
        else:
            out.append(f"\\u{code:04x}")
    return "".join(out)
