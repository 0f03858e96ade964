"""Structured access log, written off the event loop.

Where the lines go (one place, `--log-file`): a size-rotated file (default
`ollamamq.log` in the state folder, with or without the dashboard); `-` for
stderr, unrotated, for a supervisor or collector that keeps it (the Docker
image does so); `''` or `--no-access-log` for none.

The data plane appends one tuple per finished request to a list (a C-level
append, no formatting, no I/O, no logging call, no lock). The event loop
formats them (compiled, accessline.py: about a microsecond a line) in slices
of SLICE_LINES, from FORMAT_INTERVAL_S after a line reaches an empty queue
until the queue is empty again (an idle gateway is not woken), and a writer
thread writes the
formatted bytes in batches a few times a second, the GIL released during the
write. The thread used to format the lines itself: then it held the GIL about
a fifth of the time and every loop callback in that time waited for it, which
cost the loop more than the formatting (bench/RESULTS.md, round 7).

If the writer falls behind (a stalled disk, a stderr pipe nobody reads),
formatted bytes stop at MAX_READY_BYTES, the loop stops formatting, and beyond
`max_pending` waiting lines new lines are counted as dropped instead of
growing memory; `written`, `dropped` and `pending` are in /api/stats and
/metrics. The loop never waits for the disk.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import logging.handlers
import re
import sys
import threading
from typing import Any, TextIO

from ollamamq_fast.accessline import FIELDS, LineWriter, json_text, text_of

_log = logging.getLogger("ollamamq_fast.accesslog")

# Lines waiting for the writer thread; beyond this they are dropped (and counted).
MAX_PENDING = 100_000
FLUSH_INTERVAL_S = 0.2
# The loop formats what is waiting this often, SLICE_LINES per callback
# (about 50 µs: a request that arrives meanwhile waits no longer than that),
# with more slices right after while lines remain.
FORMAT_INTERVAL_S = 0.02
SLICE_LINES = 64
# Formatted bytes not yet written, at most: then the loop stops formatting.
MAX_READY_BYTES = 16 * 1024 * 1024
# Lines formatted per write call by flush() (at stop): a backlog is written in
# pieces, so no huge string is held.
BATCH_LINES = 5_000
# Rotation: 20 MB per file, 5 old files kept.
ROTATE_BYTES = 20 * 1024 * 1024
ROTATE_KEEP = 5
# `--log-file -`: the lines go to stderr.
STDERR = "-"

__all__ = ["FIELDS", "AccessLog", "json_line", "logfmt_line"]


class AccessLog:
    """Collects access records on the loop, formats them there; writes them from a thread."""

    def __init__(self, path: str | None, fmt: str = "json", max_pending: int = MAX_PENDING,
                 stream: TextIO | None = None) -> None:
        # Records waiting to be formatted, oldest first: a list, whose append is a
        # C-level call from the compiled ledger (a deque's is a method look-up).
        self.pending: list[tuple[Any, ...]] = []
        self.max_pending = max_pending
        self.dropped = 0
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
        # Formatted pieces (bytes, lines) for the writer. Each counter has one
        # writer thread: the loop the `formatted_*`, the writer the `written*`.
        self.ready: collections.deque[tuple[bytes, int]] = collections.deque()
        self.formatted_lines = 0
        self.formatted_bytes = 0
        self.written = 0
        self.written_bytes = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        # The next formatting slice, when lines wait; none while idle (no wake-ups).
        self._timer: asyncio.Handle | None = None
        self._write_lock = threading.Lock()  # the writer thread, or stop() after it

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start formatting on `loop` and the writer thread (no-op when logging nowhere).

        Without a loop nothing is formatted until flush() (tests, tools)."""
        if not self.enabled or self._thread is not None:
            return
        if loop is not None:
            self._loop = loop
            if self.pending:
                self.arm()
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    def record(self, *fields: Any) -> None:
        """Queue one line: an append, or a counter bump when full. The ledger applies
        the same rule to `pending` itself (a call into this interpreted method cost
        more than the append)."""
        if len(self.pending) < self.max_pending:
            self.pending.append(fields)
            if len(self.pending) == 1:
                self.arm()
        else:
            self.dropped += 1

    # -- on the loop ------------------------------------------------------------------

    def arm(self) -> None:
        """Lines wait: format them in FORMAT_INTERVAL_S, unless a slice is due already.

        Whoever appends the first line to an empty queue calls this (the
        ledger, record()); the slices re-arm while lines remain."""
        loop = self._loop
        if self._timer is None and loop is not None and not self._stop.is_set():
            self._timer = loop.call_later(FORMAT_INTERVAL_S, self._format_slice)

    def _format_slice(self) -> None:
        """Format up to SLICE_LINES waiting lines; again at once while more wait."""
        self._timer = None
        loop = self._loop
        if loop is None or self._stop.is_set() or not self.pending:
            return
        if self.formatted_bytes - self.written_bytes >= MAX_READY_BYTES:
            self.arm()  # the writer is behind: try again later
            return
        self._format(SLICE_LINES)
        if self.pending:
            self._timer = loop.call_soon(self._format_slice)

    def _format(self, limit: int) -> None:
        """Format up to `limit` waiting lines into one piece for the writer.

        A record that cannot be formatted (a bug: client text is escaped)
        costs its slice, counted as dropped and logged; never the log itself."""
        pending = self.pending
        waiting = len(pending)
        try:
            if self.fmt == "logfmt":
                lines: list[bytes] = []
                try:
                    for fields in pending[:limit]:
                        lines.append(self._logfmt(fields))
                finally:
                    del pending[:min(len(lines) + 1, limit)]
                data, n = b"".join(lines), len(lines)
            else:
                data, n = self._lines.batch(pending, limit)
        except Exception:  # noqa: BLE001 - whatever it is, the next lines still go out
            lost = waiting - len(pending)
            self.dropped += lost
            _log.exception("access log: %d line(s) could not be formatted and were dropped",
                           lost)
            return
        if n:
            self.ready.append((data, n))
            self.formatted_lines += n
            self.formatted_bytes += len(data)

    # -- on the writer thread ---------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL_S):
            self._write_ready()

    def _write_ready(self) -> None:
        """Write every formatted piece so far in one write (the GIL is let go in it)."""
        with self._write_lock:
            ready = self.ready
            parts: list[bytes] = []
            lines = 0
            while ready:
                data, n = ready.popleft()
                parts.append(data)
                lines += n
            if not parts:
                return
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            self._write(data)
            self.written += lines
            self.written_bytes += len(data)

    def flush(self) -> None:
        """Format and write everything waiting (at stop; tests), BATCH_LINES at a time."""
        while True:
            self._write_ready()
            if not self.pending:
                return
            while self.pending and len(self.ready) * SLICE_LINES < BATCH_LINES:
                self._format(SLICE_LINES)

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
        waiting = len(self.pending) + self.formatted_lines - self.written
        return {"written": self.written, "dropped": self.dropped, "pending": waiting}

    def _logfmt(self, fields: tuple[Any, ...]) -> bytes:
        record = {name: text_of(value) for name, value in zip(FIELDS, fields, strict=True)}
        record["ts"] = self._lines.stamp.text(fields[0]).decode()
        return (logfmt_line(record) + "\n").encode()

    def stop(self) -> None:
        """Flush and stop the writer thread."""
        self._stop.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
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
