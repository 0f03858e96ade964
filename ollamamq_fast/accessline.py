"""One access-log line as bytes: compiled, because it runs once per request.

The access log's writer thread formats the lines, and it shares the GIL with
the event loop: every instruction spent here is one the loop cannot spend on
requests. Interpreted, a line cost about 25,000 instructions (a frame, a
13-entry dict, three decodes, a str round trip, one big orjson call); here it
is joined from a dozen pieces: the values that repeat (user, address,
method, path, model, backend, and the numbers) are encoded once and kept with
their key, and only the request id is new on each line.

Client-controlled text (user id, path, request id, model) reaches the log, so
no value may end a line or forge a field: orjson escapes quotes, backslashes
and control characters below 0x20, and the characters a line reader could
still take as a break or a control (DEL, C1 such as NEL, U+2028/2029, format
characters) are written as \\uXXXX escapes; the line stays valid JSON.
"""

from __future__ import annotations

import time
from typing import Any, Final

import orjson

from ollamamq_fast.wire.errors import printable_message

# The fields of a line, in order (the records are tuples in this order).
FIELDS: Final = ("ts", "user", "ip", "method", "path", "model", "status", "backend",
                 "queue_ms", "duration_ms", "prompt_tokens", "completion_tokens", "request_id")

# ".000Z" to ".999Z": a table look-up, not a format call per line.
_MILLIS: Final = tuple(b".%03dZ" % ms for ms in range(1000))
# Encoded values kept per writer; cleared when full, so a flood of distinct
# values costs their encoding, never memory.
_KEPT_MAX: Final = 4096
# No value yet (NumberPieces.last).
_UNSET: Final = object()
_KEPT_LEN: Final = 256
_ROW_LEN: Final = 1024


class Stamp:
    """ISO-8601 UTC time stamps to the millisecond; a second's text is made once."""

    def __init__(self) -> None:
        self.second = -1
        self.prefix = b""

    def text(self, ts: float) -> bytes:
        """`2026-12-06T22:43:45.123Z` for a Unix time."""
        second, millis = self.parts(ts)
        return second + millis

    def parts(self, ts: float) -> tuple[bytes, bytes]:
        """`2026-12-06T22:43:45` and `.123Z` for a Unix time (joined by the caller)."""
        second = int(ts)
        if second != self.second:
            self.second = second
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()
        ms = int((ts - second) * 1000)
        if ms < 0 or ms > 999:  # a negative time stamp; never on a sane clock
            ms = 0
        return self.prefix, _MILLIS[ms]


_dumps = orjson.dumps
# Bytes a request id may hold without escaping (the gateway's ids are UUIDs;
# a client's is kept only when it is made of these, wire/headers.py).
_PLAIN_ID: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@/+=-"
# Each of those bytes maps to itself, every other byte to another one (NUL to
# "!", the rest to NUL): an id is plain when translating it changes nothing.
# One translate (a C loop; mypyc calls it directly) instead of a loop per byte.
_PLAIN_TABLE: Final = bytes(c if c in _PLAIN_ID else (33 if c == 0 else 0) for c in range(256))
# ".00" .. ".99": the hundredths of a duration (the ledger rounds to two places).
_HUNDREDTHS: Final = tuple(b".%02d" % n for n in range(100))


def text_of(value: Any) -> Any:
    """Bytes kept on the loop (method, path, request id) as text, byte for byte (Latin-1)."""
    return value.decode("latin-1") if isinstance(value, bytes) else value


def json_text(value: Any) -> bytes:
    """A value as JSON, safe to put in a line (bytes are read as Latin-1, byte for byte)."""
    text = text_of(value)
    try:
        out: bytes = _dumps(text)
    except TypeError:  # a str with a lone surrogate: written as U+FFFD
        out = _dumps(printable_message(text) if isinstance(text, str) else repr(text))
    if out.isascii() and out.find(b"\x7f") < 0:
        return out
    return escape_unprintable(out.decode()).encode()


def _plain_id(request_id: bytes) -> bool:
    """Whether a request id needs no escaping: every byte is one of _PLAIN_ID."""
    return request_id.translate(_PLAIN_TABLE) == request_id


def _keep(kept: dict[Any, bytes], key: Any, out: bytes, longest: int) -> bytes:
    """`out`, kept under `key` when it is at most `longest` bytes (a client's
    megabyte model name is not kept); the table is emptied when full."""
    if len(out) <= longest:
        if len(kept) >= _KEPT_MAX:
            kept.clear()
        kept[key] = out
    return out


def _kept(kept: dict[Any, bytes], prefix: bytes, value: Any) -> bytes:
    """`prefix` and the JSON of a value that repeats, made once (a few thousand kept)."""
    out = kept.get(value)
    if out is None:
        out = _keep(kept, value, prefix + json_text(value), _KEPT_LEN)
    return out


class NumberPieces:
    """The `,"key":N` pieces of one number field of the access lines.

    The last piece is reused when the next line has the very same value
    object (CPython keeps one object per small int: a 0 ms queue, small token
    counts are found by an identity test, without a look-up); other values
    are made once and kept in a bounded table (_kept).
    """

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.kept: dict[Any, bytes] = {}
        self.last: Any = _UNSET  # a line's numbers may be None
        self.last_piece = b""

    def of(self, value: Any) -> bytes:
        """The piece for `value`."""
        if value is self.last:
            return self.last_piece
        piece = _kept(self.kept, self.prefix, value)
        self.last = value
        self.last_piece = piece
        return piece


class LineWriter:
    """Access records (tuples in FIELDS order) to JSON lines. Used by one thread at a time.

    A line is joined from few pieces, in one join: the fields from user to
    backend, which repeat together (one client, one route, one model, one
    backend), are kept as one piece by their tuple; the numbers are kept each
    with its key in front (`,"queue_ms":3`), and the last one of each is
    reused when the next line has the same; only the time stamp, the
    duration's hundredths and the request id are new.
    """

    def __init__(self) -> None:
        self.stamp = Stamp()
        # (user, ip, method, path, model, status, backend) -> their part of a line.
        self.rows: dict[tuple[Any, ...], bytes] = {}
        self.last_row: tuple[Any, ...] = ()
        self.last_middle = b""
        self.queue_ms = NumberPieces(b',"queue_ms":')
        self.whole_ms = NumberPieces(b',"duration_ms":')  # whole milliseconds
        self.prompts = NumberPieces(b',"prompt_tokens":')
        self.completions = NumberPieces(b',"completion_tokens":')

    def line(self, fields: tuple[Any, ...]) -> bytes:
        """One access record as one JSON object on one line, newline included."""
        return b"".join(self._pieces(fields))

    def _pieces(self, fields: tuple[Any, ...]) -> tuple[bytes, ...]:
        """The pieces of one record's line, in order (batch joins a whole batch's at once)."""
        (ts, user, ip, method, path, model, status, backend, queue_ms, duration_ms,
         prompt_tokens, completion_tokens, request_id) = fields
        row = (user, ip, method, path, model, status, backend)
        # Consecutive lines mostly share their row: comparing with the last one
        # costs a fraction of hashing the tuple (its path and request text are
        # new objects on every request, so their hashes are not cached).
        if row == self.last_row:
            middle = self.last_middle
        else:
            found = self.rows.get(row)
            if found is None:
                found = _keep(self.rows, row, b"".join((
                    b'","user":', json_text(user), b',"ip":', json_text(ip),
                    b',"method":', json_text(method), b',"path":', json_text(path),
                    b',"model":', json_text(model), b',"status":', json_text(status),
                    b',"backend":', json_text(backend))), _ROW_LEN)
            middle = found
            self.last_row = row
            self.last_middle = middle
        if isinstance(duration_ms, float) and 0.0 <= duration_ms < 1e12:
            hundredths = int(duration_ms * 100.0 + 0.5)
            whole = self.whole_ms.of(hundredths // 100)
            fraction = _HUNDREDTHS[hundredths % 100]
        else:
            whole = b',"duration_ms":' + _dumps(duration_ms)
            fraction = b""
        if isinstance(request_id, bytes) and _plain_id(request_id):
            rid_open, rid, rid_close = b',"request_id":"', request_id, b'"}\n'
        else:
            rid_open, rid, rid_close = b',"request_id":', json_text(request_id), b"}\n"
        second, millis = self.stamp.parts(ts)
        return (
            b'{"ts":"', second, millis, middle, self.queue_ms.of(queue_ms), whole, fraction,
            self.prompts.of(prompt_tokens), self.completions.of(completion_tokens),
            rid_open, rid, rid_close,
        )

    def batch(self, pending: list[tuple[Any, ...]], limit: int) -> tuple[bytes, int]:
        """Up to `limit` queued records as JSON lines, joined; and how many were taken.

        The records are taken off the queue's front, also when one of them
        cannot be formatted (it and those before it: the exception goes on).
        """
        # One join for the batch: a join per line would copy every line twice.
        pieces: list[bytes] = []
        n = min(limit, len(pending))
        i = 0
        try:
            while i < n:
                pieces.extend(self._pieces(pending[i]))
                i += 1
        finally:
            del pending[:min(i + 1, n)]
        return b"".join(pieces), n


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
