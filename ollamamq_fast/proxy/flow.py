"""Flow control: the limits, and the one object that pauses and resumes sockets.

Backpressure is transport-to-transport: when a client's write buffer passes
HIGH_WATER its backend connection stops being read, and when a backend's write
buffer passes HIGH_WATER (a large upload) the client stops being read. So no
buffer in the gateway grows past about HIGH_WATER per direction per exchange.

`FlowControl` owns every pause and resume, each with its reason, as uvicorn's
`flow_control.py` does: nothing else calls `pause_reading`/`resume_reading`.
A backend connection is left read ("resumed") when its exchange lets go of
it, so a connection returned to the pool is never paused.
"""

from __future__ import annotations

from typing import Any, Final

# 256 KiB: a few hundred NDJSON lines, far above one token chunk, so a healthy
# client never trips it, while a stalled one costs at most this much memory.
HIGH_WATER: Final = 256 * 1024
LOW_WATER: Final = 64 * 1024

# Request bytes of pipelined requests queued behind the active one before the
# client is paused (each pipelined request waits its turn, RFC 9112 §9.3.2).
PIPELINE_BUFFER_LIMIT: Final = 1024 * 1024

# Request heads larger than this get 431 (h11 and nginx use limits of this order).
MAX_HEAD_BYTES: Final = 64 * 1024

# Why a transport's reading is paused. Reading resumes only when no reason is
# left, so one side letting go cannot undo another's pause.
CLIENT_SLOW: Final = 1  # the client reads responses slower than the backend sends them
BACKEND_SLOW: Final = 2  # the backend takes the upload slower than the client sends it
BODY_BUFFER: Final = 4  # request bytes held in the gateway reached their bound


class FlowControl:
    """The only owner of pause/resume for one client connection and its current backend connection.

    One per client connection; the backend connection of the exchange being
    answered is bound to it for the length of that response. Transports are
    typed loosely: uvloop's are not `asyncio.Transport` subclasses.
    """

    __slots__ = ("client", "client_reasons", "client_write_blocked", "upstream", "upstream_reasons")

    def __init__(self, client: Any) -> None:
        self.client: Any = client
        self.client_reasons = 0
        self.upstream: Any = None
        self.upstream_reasons = 0
        self.client_write_blocked = False

    # -- Client reading ----------------------------------------------------------

    def pause_client(self, reason: int) -> None:
        """Stop reading the client for `reason`; safe to repeat."""
        if not self.client_reasons and self.client is not None and not self.client.is_closing():
            self.client.pause_reading()
        self.client_reasons |= reason

    def resume_client(self, reason: int) -> None:
        """Drop `reason`; the client is read again once no reason is left."""
        if self.client_reasons & reason:
            self.client_reasons &= ~reason
            if not self.client_reasons and self.client is not None and not self.client.is_closing():
                self.client.resume_reading()

    @property
    def client_paused(self) -> bool:
        """Whether the client is not being read (for any reason)."""
        return bool(self.client_reasons)

    # -- Backend reading ----------------------------------------------------------

    def bind(self, upstream: Any) -> None:
        """A backend connection starts serving this client's current exchange."""
        self.upstream = upstream
        self.upstream_reasons = 0
        if self.client_write_blocked:
            self._pause_upstream()

    def unbind(self) -> None:
        """The exchange let go of its backend connection: leave it read, as the pool needs it."""
        upstream = self.upstream
        self.upstream = None
        if self.upstream_reasons:
            self.upstream_reasons = 0
            if upstream is not None and not upstream.is_closing():
                upstream.resume_reading()
        self.resume_client(BACKEND_SLOW)

    def _pause_upstream(self) -> None:
        if not self.upstream_reasons and self.upstream is not None:
            self.upstream.pause_reading()
        self.upstream_reasons |= CLIENT_SLOW

    # -- Transport callbacks (write buffers crossing their watermarks) -------------

    def client_writing_paused(self) -> None:
        """The client's write buffer is full: stop reading the backend."""
        self.client_write_blocked = True
        self._pause_upstream()

    def client_writing_resumed(self) -> None:
        """The client's write buffer drained: read the backend again."""
        self.client_write_blocked = False
        if self.upstream_reasons & CLIENT_SLOW:
            self.upstream_reasons &= ~CLIENT_SLOW
            upstream = self.upstream
            if not self.upstream_reasons and upstream is not None and not upstream.is_closing():
                upstream.resume_reading()

    def upstream_writing_paused(self) -> None:
        """The backend's write buffer is full (an upload): stop reading the client."""
        self.pause_client(BACKEND_SLOW)

    def upstream_writing_resumed(self) -> None:
        """The backend's write buffer drained: read the client again."""
        self.resume_client(BACKEND_SLOW)

    def client_closed(self) -> None:
        """The client connection is gone: nothing of it may be paused or resumed again."""
        self.client = None
        self.client_reasons = 0


class BodyBudget:
    """Request body bytes held in memory by all exchanges together (--max-bodies-mb).

    Bodies are read whole before a request is queued (the model must be read);
    without a global bound, a few clients sending large bodies at once could
    take the process's memory. Beyond the budget a request gets 503 with
    Retry-After; its bytes are given back when its exchange ends.
    """

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, n: int) -> bool:
        """Count `n` more bytes held; False (nothing counted) when that would pass the limit."""
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give_back(self, n: int) -> None:
        """`n` bytes are no longer held."""
        self.held -= n
