"""Paces a stream like a GPU: first chunk after ttft, then one token per interval.

One `call_at` chain per stream (no task per token). With interval 0 the stream is
written in batches of BATCH_LINES chunks per transport.write, yielding to the loop
between batches. Writing stops while the transport is paused, so a slow reader
never makes the simulator buffer more than the transport's high-water mark.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

from . import wire
from .exchange import Exchange
from .faults import MID_STREAM_ERROR, MID_STREAM_ERROR_AFTER, SPLIT_GAP_S, Faults

# Chunks per write in unpaced mode: big enough to amortize the write and loop
# overhead (~100 KB per write), small enough to keep other connections served.
BATCH_LINES = 512


class Source(Protocol):
    """A stream body producer (NDJSON or SSE)."""

    # Separator that ends one event, used to cut multi-event chunks for faults.
    sep: bytes
    finished: bool

    def take(self, limit: int) -> list[bytes]:
        """Up to `limit` chunk payloads; the last one is produced when finished turns True."""
        ...

    def take_one(self) -> bytes:
        """Exactly the next chunk payload (paced mode)."""
        ...

    def error_event(self, message: str) -> bytes:
        """The stream's own way of reporting a failure after the 200 head."""
        ...


class StreamEmitter:
    """Writes one Source to one Exchange with pacing, backpressure and fault injection."""

    __slots__ = (
        "conn",
        "ex",
        "faults",
        "handle",
        "interval",
        "loop",
        "pending",
        "sent",
        "slow",
        "splitting",
        "src",
        "stats",
        "step",
        "stopped",
        "t0",
        "ttft",
    )

    def __init__(self, ex: Exchange, src: Source, ttft_s: float, interval_s: float) -> None:
        self.ex = ex
        self.src = src
        self.conn = ex.conn
        self.loop = ex.conn.loop
        self.stats = ex.conn.app.stats
        self.ttft = ttft_s
        self.interval = interval_s
        self.faults: Faults | None = ex.faults if ex.faults is not None and ex.faults.shapes_stream else None
        self.slow = self.faults is not None
        self.t0 = 0.0
        self.step = 0
        self.handle: asyncio.Handle | None = None
        self.stopped = False
        # Fault path state: events written so far, events waiting, a split in progress.
        self.sent = 0
        self.pending: deque[bytes] = deque()
        self.splitting = False

    def start(self, content_type: bytes) -> None:
        """Begin the response; the head goes out with the first chunk after ttft."""
        ex = self.ex
        ex.begin_stream(content_type)
        ex.cancel_cb = self.cancel
        faults = self.faults
        if faults is not None and faults.die_after == 0:
            ex.flush_head()
            ex.kill()
            return
        self.t0 = self.loop.time() + self.ttft
        if self.ttft > 0:
            self.handle = self.loop.call_at(self.t0, self._tick)
        else:
            self._tick()

    def cancel(self) -> None:
        """Stop for good (client gone or connection killed)."""
        self.stopped = True
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    # -- pacing ---------------------------------------------------------------

    def _tick(self) -> None:
        """Write the next token (paced) or the next batch (unpaced)."""
        self.handle = None
        ex = self.ex
        if self.stopped or ex.done or self.conn.closing:
            return
        if self.conn.writing_paused:
            self.conn.wait_writable(self._resume)
            return
        src = self.src
        self.step += 1
        if self.slow:
            self._queue_events(src.take(1))
            return
        if self.interval > 0:
            # Paced: one chunk per tick, the hot path of many concurrent slow streams.
            chunk = src.take_one()
            self.stats.lines += 1
            framed = b"%x\r\n%b\r\n" % (len(chunk), chunk)
            if src.finished:
                ex.end_stream(framed)
                return
            ex.write_framed(framed)
            self.handle = self.loop.call_at(self.t0 + self.step * self.interval, self._tick)
            return
        chunks = src.take(BATCH_LINES)
        self.stats.lines += len(chunks)
        if src.finished:
            ex.end_stream(wire.frame_many(chunks))
            return
        ex.write_framed(wire.frame_many(chunks))
        self.handle = self.loop.call_soon(self._tick)

    def _schedule(self) -> None:
        """Plan the next tick on the fixed grid t0 + k*interval (no drift), or soon."""
        if self.interval > 0:
            self.handle = self.loop.call_at(self.t0 + self.step * self.interval, self._tick)
        else:
            self.handle = self.loop.call_soon(self._tick)

    def _resume(self) -> None:
        """Writable again: continue, moving the grid so paused time is not caught up in a burst."""
        if self.stopped or not self.ex.alive:
            return
        self.t0 = self.loop.time() - self.step * self.interval
        self._tick()

    # -- fault path: one event per chunk ---------------------------------------

    def _queue_events(self, chunks: list[bytes]) -> None:
        """Split chunks into single events and write them through the fault rules."""
        sep = self.src.sep
        for chunk in chunks:
            start = 0
            while start < len(chunk):
                end = chunk.find(sep, start)
                end = len(chunk) if end < 0 else end + len(sep)
                self.pending.append(chunk[start:end])
                start = end
        self._drain()

    def _drain(self) -> None:
        """Write pending events one by one, applying die-after, mid-stream-error, hang-body, split."""
        faults = self.faults
        assert faults is not None
        ex = self.ex
        while self.pending and not self.splitting:
            if self.stopped or not ex.alive:
                return
            if faults.die_after is not None and self.sent >= faults.die_after:
                ex.kill()
                return
            if faults.mid_stream_error and self.sent >= MID_STREAM_ERROR_AFTER:
                self.cancel()
                ex.write_framed(wire.frame(self.src.error_event(MID_STREAM_ERROR)))
                ex.end_stream()
                return
            if faults.hang_body and self.sent >= 1:
                # Head and first line are out; never send more (the client must time out).
                self.cancel()
                return
            event = self.pending.popleft()
            self.sent += 1
            self.stats.lines += 1
            if faults.split_lines and len(event) > 1:
                half = len(event) // 2
                ex.write_framed(wire.frame(event[:half]))
                self.splitting = True
                self.handle = self.loop.call_later(SPLIT_GAP_S, self._second_half, event[half:])
                return
            ex.write_framed(wire.frame(event))
        if not self.pending and not self.splitting:
            self._after_events()

    def _second_half(self, rest: bytes) -> None:
        """The delayed rest of a split line."""
        self.handle = None
        self.splitting = False
        if self.stopped or not self.ex.alive:
            return
        self.ex.write_framed(wire.frame(rest))
        self._drain()

    def _after_events(self) -> None:
        """All taken events are out: end the stream or plan the next tick."""
        faults = self.faults
        if self.stopped or not self.ex.alive or faults is None:
            return
        if not self.src.finished:
            self._schedule()
            return
        if faults.die_after is not None and self.sent >= faults.die_after:
            self.ex.kill()
        elif faults.hang_body and self.sent >= 1:
            self.cancel()
        else:
            self.ex.end_stream()
