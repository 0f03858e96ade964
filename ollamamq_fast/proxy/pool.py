"""Keep-alive connections to each backend: a LIFO of idle ones, opened on demand.

The pool only keeps and hands out connections; what runs over them is the
upstream connection's business (upstream.py). A connection comes back here
only after a clean response and only unpaused (flow.py lets go of it first).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Final

from mypy_extensions import mypyc_attr

from ollamamq_fast.proxy.upstream import UpstreamConnection

if TYPE_CHECKING:
    from ollamamq_fast.fleet.backend import Backend

# Idle keep-alive connections kept per backend. Enough for a burst at high
# --slots without holding thousands of sockets open.
MAX_IDLE_PER_BACKEND: Final = 256
# Seconds an idle pooled connection is kept. Shorter than common server idle
# timeouts (Go's default keep-alive is longer), so we close first and rarely
# pick a connection the backend is closing.
IDLE_EXPIRY_S: Final = 30.0
# A backend that does not accept a TCP connection within this is failing.
CONNECT_TIMEOUT_S: Final = 5.0
# The clock, bound once: compiled, a Final global is a static, where
# `time.monotonic` looks the name up in the module on every response.
_monotonic: Final = time.monotonic


@mypyc_attr(allow_interpreted_subclasses=True)
class UpstreamPool:
    """Idle keep-alive connections to one backend, most recently used first.

    Connections and backends name this class, so that compiled code calls its
    methods directly; a test's pool of fake connections subclasses it.
    """

    def __init__(self, backend: Backend, loop: asyncio.AbstractEventLoop) -> None:
        self.backend = backend
        self.loop = loop
        self.idle: list[UpstreamConnection] = []
        self.open = 0
        self.closed = False

    def acquire_idle(self) -> UpstreamConnection | None:
        """A pooled connection ready to use, or None (then call `connect`)."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def connect(self) -> UpstreamConnection:
        """Open a new connection to the backend (raises OSError / TimeoutError)."""
        address = self.backend.address
        _, conn = await asyncio.wait_for(
            self.loop.create_connection(
                lambda: UpstreamConnection(self), address.host, address.port
            ),
            CONNECT_TIMEOUT_S,
        )
        self.open += 1
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Return a connection after a clean response."""
        if self.closed or len(self.idle) >= MAX_IDLE_PER_BACKEND:
            conn.close()
            return
        # The data plane's clock (plane.py), a C call; the loop's time() is a
        # Python-level call into uvloop on every response.
        conn.idle_since = _monotonic()
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        """A connection closed: stop counting it."""
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.counted:
            conn.counted = False
            self.open -= 1

    def expire_idle(self, now: float) -> None:
        """Close connections idle longer than IDLE_EXPIRY_S at `now` (time.monotonic;
        called by the reaper)."""
        if not self.idle:
            return
        keep = []
        for conn in self.idle:
            if conn.closed:
                continue
            if now - conn.idle_since > IDLE_EXPIRY_S:
                conn.closed = True
                if conn.transport is not None:
                    conn.transport.close()
            else:
                keep.append(conn)
        self.idle = keep

    def close_all(self) -> None:
        """Close every idle connection and refuse to pool more."""
        self.closed = True
        for conn in self.idle:
            conn.close()
        self.idle = []
