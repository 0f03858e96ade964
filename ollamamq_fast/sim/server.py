"""Start and stop a simulator inside the running event loop."""

from __future__ import annotations

import asyncio
from typing import Self

from .app import SimApp
from .options import SimOptions, SimStats
from .protocol import SimProtocol

# Large enough for benchmark bursts of thousands of connections.
LISTEN_BACKLOG = 4096


class SimServer:
    """A listening simulator: its address, live counters, and close()."""

    def __init__(self, app: SimApp, server: asyncio.Server, host: str, port: int) -> None:
        self.app = app
        self._server = server
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:11434."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def stats(self) -> SimStats:
        """Counters: requests, active, cancelled, cancel_times, connection_close_times, ..."""
        return self.app.stats

    @property
    def options(self) -> SimOptions:
        """The settings it runs with."""
        return self.app.options

    async def close(self) -> None:
        """Stop listening and close every connection (unfinished responses count as cancelled)."""
        self._server.close()
        for conn in list(self.app.connections):
            conn.close()
        await self._server.wait_closed()
        # Let transports run connection_lost before the caller tears the loop down.
        await asyncio.sleep(0)

    async def __aenter__(self) -> Self:
        """`async with await start_sim(...) as sim:`."""
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Close on leaving the block."""
        await self.close()


async def start_sim(options: SimOptions, host: str = "127.0.0.1", port: int = 0) -> SimServer:
    """Listen on host:port (0 = any free port) in the running loop (uvloop or asyncio)."""
    loop = asyncio.get_running_loop()
    app = SimApp(options, loop)
    server = await loop.create_server(
        lambda: SimProtocol(app), host, port, reuse_address=True, backlog=LISTEN_BACKLOG
    )
    bound = server.sockets[0].getsockname()
    return SimServer(app, server, host, int(bound[1]))
