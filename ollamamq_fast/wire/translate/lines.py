"""Incremental line splitting for NDJSON and SSE bodies that arrive in pieces.

Splitting only at LF is safe for UTF-8 (a 0x0A byte never occurs inside a
multi-byte sequence), so a piece may end anywhere, even mid-character.
"""

from __future__ import annotations

from typing import Final

from ollamamq_fast.wire.translate.common import TranslationError

# The longest line held while waiting for its end. A tool-call line or an
# embedding can be large, but not this large; past it the stream is broken.
MAX_LINE_BYTES: Final = 64 * 1024 * 1024


class LineBuffer:
    """Complete lines out of arbitrary pieces; the unfinished tail is kept."""

    __slots__ = ("_limit", "_pending")

    def __init__(self, limit: int = MAX_LINE_BYTES) -> None:
        self._pending = bytearray()
        self._limit = limit

    def lines(self, data: bytes) -> list[bytes]:
        """The lines `data` completes (without their LF), in order."""
        if self._pending:
            cut = data.find(b"\n")
            if cut < 0:
                self._hold(data)
                return []
            first = bytes(self._pending) + data[:cut]
            self._pending.clear()
            parts = data[cut + 1:].split(b"\n")
            parts.insert(0, first)
        else:
            parts = data.split(b"\n")
        self._hold(parts.pop())
        return parts

    def _hold(self, tail: bytes) -> None:
        self._pending += tail
        if len(self._pending) > self._limit:
            self._pending.clear()
            raise TranslationError(502, "the backend sent a line longer than the gateway accepts")

    def rest(self) -> bytes:
        """The unfinished last line (a body may end without a final LF)."""
        tail = bytes(self._pending)
        self._pending.clear()
        return tail
