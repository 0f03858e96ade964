"""Structured access log, written off the event loop.

The data plane appends one tuple per finished request to a bounded deque (a
C-level append, no formatting, no I/O, no logging call). A writer thread
drains it a few times a second, formats JSON (or logfmt) lines and writes them
to a size-rotated file and, when wanted, to stderr. If the writer falls behind
by more than MAX_PENDING lines, new lines are counted as dropped instead of
growing memory.
"""

from __future__ import annotations

import collections
import logging
import logging.handlers
import sys
import threading
import time
from typing import Any, TextIO

import orjson

# Lines waiting for the writer thread; beyond this they are dropped (and counted).
MAX_PENDING = 100_000
FLUSH_INTERVAL_S = 0.2
# Rotation: 20 MB per file, 5 old files kept.
ROTATE_BYTES = 20 * 1024 * 1024
ROTATE_KEEP = 5

FIELDS = ("ts", "user", "ip", "method", "path", "model", "status", "backend", "queue_ms",
          "duration_ms", "prompt_tokens", "completion_tokens", "request_id")


class AccessLog:
    """Collects access records on the loop; writes them from a thread."""

    def __init__(self, path: str | None, stderr: bool, fmt: str = "json") -> None:
        self.pending: collections.deque[tuple[Any, ...]] = collections.deque()
        self.dropped = 0
        self.written = 0
        self.fmt = fmt
        self.stream: TextIO | None = sys.stderr if stderr else None
        self.handler: logging.handlers.RotatingFileHandler | None = None
        if path:
            self.handler = logging.handlers.RotatingFileHandler(
                path, maxBytes=ROTATE_BYTES, backupCount=ROTATE_KEEP, encoding="utf-8"
            )
        self.enabled = self.handler is not None or self.stream is not None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the writer thread (no-op when logging nowhere)."""
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
            self._thread.start()

    def record(self, *fields: Any) -> None:
        """Queue one line (hot path: an append, or a counter bump when full)."""
        if len(self.pending) < MAX_PENDING:
            self.pending.append(fields)
        else:
            self.dropped += 1

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL_S):
            self.flush()
        self.flush()

    def flush(self) -> None:
        """Write everything queued so far (writer thread, or at stop)."""
        pending = self.pending
        if not pending:
            return
        lines = []
        while pending:
            lines.append(self._format(pending.popleft()))
        text = "".join(lines)
        if self.handler is not None:
            stream = self.handler.stream
            if self.handler.shouldRollover(_SizeProbe(text)):
                self.handler.doRollover()
                stream = self.handler.stream
            if stream is not None:  # None only after the handler was closed
                stream.write(text)
                stream.flush()
        if self.stream is not None:
            self.stream.write(text)
            self.stream.flush()
        self.written += len(lines)

    def _format(self, fields: tuple[Any, ...]) -> str:
        record = dict(zip(FIELDS, fields))
        for key in ("method", "path", "request_id"):  # kept as bytes on the loop; decoded here
            value = record[key]
            if isinstance(value, bytes):
                record[key] = value.decode("latin-1")
        record["ts"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record["ts"])) + (
            ".%03dZ" % int((record["ts"] % 1) * 1000)
        )
        if self.fmt == "logfmt":
            return " ".join(f"{k}={_logfmt(v)}" for k, v in record.items()) + "\n"
        return orjson.dumps(record).decode() + "\n"

    def stop(self) -> None:
        """Flush and stop the writer thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.flush()
        if self.handler is not None:
            self.handler.close()


class _SizeProbe(logging.LogRecord):
    """Lets RotatingFileHandler.shouldRollover size a batch of lines."""

    def __init__(self, text: str) -> None:
        super().__init__("access", logging.INFO, "", 0, "%s", (text,), None)

    def getMessage(self) -> str:  # noqa: N802 (logging's name)
        return str(self.args[0]) if isinstance(self.args, tuple) else ""


def _logfmt(value: Any) -> str:
    text = "" if value is None else str(value)
    if not text or any(c in text for c in ' ="'):
        return '"' + text.replace('"', '\\"') + '"'
    return text
