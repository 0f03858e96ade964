"""Structured access log, written off the event loop.

Where the lines go (one place, `--log-file`): a size-rotated file (default
`ollamamq.log` in the state folder, with or without the dashboard); `-` for
stderr, unrotated, for a supervisor or collector that keeps it (the Docker
image does so); `''` or `--no-access-log` for none.

The data plane appends one tuple per finished request to a deque (a C-level
append, no formatting, no I/O, no logging call, no lock). A writer thread
drains it a few times a second, formats JSON (compiled, accessline.py) or
logfmt lines and writes them as bytes in batches. If the writer falls behind (a stalled disk, a stderr pipe
nobody reads) by more than `max_pending` lines, new lines are counted as
dropped instead of growing memory; `written`, `dropped` and `pending` are in
/api/stats and /metrics.
"""

from __future__ import annotations

import collections
import logging
import logging.handlers
import re
import sys
import threading
import time
from typing import Any, TextIO

from ollamamq_fast.accessline import FIELDS, LineWriter, json_text, text_of

# Lines waiting for the writer thread; beyond this they are dropped (and counted).
MAX_PENDING = 100_000
FLUSH_INTERVAL_S = 0.2
# Lines formatted and written per write call: a backlog is written in pieces,
# so the thread never holds a huge string.
BATCH_LINES = 5_000
# Lines formatted per compiled call (about 0.2 ms of the GIL), then a yield.
SLICE_LINES = 128
# Rotation: 20 MB per file, 5 old files kept.
ROTATE_BYTES = 20 * 1024 * 1024
ROTATE_KEEP = 5
# `--log-file -`: the lines go to stderr.
STDERR = "-"

__all__ = ["FIELDS", "AccessLog", "json_line", "logfmt_line"]


class AccessLog:
    """Collects access records on the loop; writes them from a thread."""

    def __init__(self, path: str | None, fmt: str = "json", max_pending: int = MAX_PENDING,
                 stream: TextIO | None = None) -> None:
        self.pending: collections.deque[tuple[Any, ...]] = collections.deque()
        self.max_pending = max_pending
        self.dropped = 0
        self.written = 0
        self.fmt = fmt
        # `stream` is for tests; `-` is stderr.
        self.stream: TextIO | None = stream or (sys.stderr if path == STDERR else None)
        self.handler: logging.handlers.RotatingFileHandler | None = None
        if path and path != STDERR and stream is None:
            self.handler = logging.handlers.RotatingFileHandler(
                path, maxBytes=ROTATE_BYTES, backupCount=ROTATE_KEEP, encoding="utf-8"
            )
        self.enabled = self.handler is not None or self.stream is not None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lines = LineWriter()

    def start(self) -> None:
        """Start the writer thread (no-op when logging nowhere)."""
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
            self._thread.start()

    def record(self, *fields: Any) -> None:
        """Queue one line: an append, or a counter bump when full. The ledger applies
        the same rule to `pending` itself (a call into this interpreted method cost
        more than the append)."""
        if len(self.pending) < self.max_pending:
            self.pending.append(fields)
        else:
            self.dropped += 1

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL_S):
            self.flush()
        self.flush()

    def flush(self) -> None:
        """Write everything queued so far, BATCH_LINES at a time (writer thread, or at stop)."""
        pending = self.pending
        while pending:
            if self.fmt == "logfmt":
                lines: list[bytes] = []
                while pending and len(lines) < BATCH_LINES:
                    lines.append(self._logfmt(pending.popleft()))
                data, n = b"".join(lines), len(lines)
            else:
                # Formatted in slices: compiled code never hands the GIL back on
                # its own, so one call over a whole batch (thousands of lines
                # under load, ~10 ms) would stall the event loop that long.
                # Between slices the thread yields, and the loop runs.
                parts: list[bytes] = []
                n = 0
                while pending and n < BATCH_LINES:
                    part, k = self._lines.batch(pending, SLICE_LINES)
                    parts.append(part)
                    n += k
                    time.sleep(0)
                data = b"".join(parts)
            self._write(data)
            self.written += n

    def _write(self, data: bytes) -> None:
        handler = self.handler
        if handler is not None:
            stream = handler.stream
            if (stream is not None and handler.maxBytes > 0 and stream.tell()
                    and stream.tell() + len(data) >= handler.maxBytes):
                handler.doRollover()  # reopens the stream (the handler is not delayed)
                stream = handler.stream
            if stream is not None:
                _write_bytes(stream, data)
        if self.stream is not None:
            _write_bytes(self.stream, data)

    def counters(self) -> dict[str, int]:
        """Lines written, dropped (the writer was behind), and waiting; for stats and metrics."""
        return {"written": self.written, "dropped": self.dropped, "pending": len(self.pending)}

    def _logfmt(self, fields: tuple[Any, ...]) -> bytes:
        record = {name: text_of(value) for name, value in zip(FIELDS, fields, strict=True)}
        record["ts"] = self._lines.stamp.text(fields[0]).decode()
        return (logfmt_line(record) + "\n").encode()

    def stop(self) -> None:
        """Flush and stop the writer thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            if self._thread.is_alive():
                # The writer is stuck in a write (a stalled disk): it still owns the
                # line writer, and what it has not written is counted as pending.
                return
        self.flush()
        if self.handler is not None:
            self.handler.close()


def _write_bytes(stream: TextIO, data: bytes) -> None:
    """Bytes to a text stream's binary buffer (files, stderr); decoded for one without."""
    buffer = getattr(stream, "buffer", None)
    if buffer is None:
        stream.write(data.decode())
        stream.flush()
        return
    stream.flush()  # anything written as text goes first
    buffer.write(data)
    buffer.flush()


# Client-controlled text (user id, path, request id, model) reaches the log:
# no value may end a line or forge a field. Characters a line reader could
# take as a line break or control (C0, DEL, C1 such as NEL, U+2028/2029,
# format characters) are written as \\uXXXX escapes in both formats.
_LOGFMT_SAFE = re.compile(r"[!#-<>-\[\]-~]+")  # printable ASCII but space, '"', '=', '\\'


def logfmt_value(value: Any) -> str:
    """One logfmt value: bare when plainly safe, else a JSON-style quoted string."""
    text = "" if value is None else str(value)
    if _LOGFMT_SAFE.fullmatch(text):
        return text
    return json_text(text).decode()


def logfmt_line(fields: dict[str, Any]) -> str:
    """`key=value ...` with every value escaped (keys are ours)."""
    return " ".join(f"{k}={logfmt_value(v)}" for k, v in fields.items())


def json_line(fields: dict[str, Any]) -> str:
    """One JSON object on one line, whatever the values hold."""
    return json_text(fields).decode()
