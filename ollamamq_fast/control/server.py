"""The control-plane server: granian's embedded server on the gateway's loop.

Started by Gateway.start() once the data plane listens, stopped by
Gateway.stop(). The control plane is optional to the gateway's job: when its
port is taken, the gateway logs a warning and serves traffic without it,
rather than refusing to start.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from typing import TYPE_CHECKING, Any

from granian._granian import SocketHolder
from granian.constants import HTTPModes, Interfaces
from granian.log import LogLevels
from granian.server.embed import Server as EmbeddedServer

from ollamamq_fast.config import Settings
from ollamamq_fast.control.app import AdminApp
from ollamamq_fast.control.auth import AdminAuth, token_digest

# State-store meta key of the generated admin token's blake3 digest.
TOKEN_META_KEY = "admin_token_digest"
from ollamamq_fast.control.events import EventStreams

if TYPE_CHECKING:
    from ollamamq_fast.gateway import GatewayState

log = logging.getLogger("ollamamq_fast.control")

# Admin clients are a handful of people and dashboards.
BACKLOG = 128
# How long stop() waits for granian to finish answering before giving up on it.
STOP_TIMEOUT_S = 5.0
# granian.server.common.configure_logging runs logging.config.dictConfig on
# every Server(), which closes all existing handlers (the access log's, a
# test runner's). An incremental config only sets the level of granian's own
# logger and touches nothing else.
_GRANIAN_LOGGING: dict[str, Any] = {"incremental": True, "handlers": {}, "formatters": {},
                                    "loggers": {}}


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (0 = any free port); OSError if taken.

    SO_REUSEADDR only: granian's own listener sets SO_REUSEPORT, which would
    let a second gateway on the same port silently take half the admin
    connections instead of failing to bind.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Embedded(EmbeddedServer):
    """granian's embedded server, serving a socket we bound ourselves.

    Overrides granian's private `_init_shared_socket` (granian 2.8): binding
    ourselves is what lets us refuse a busy port (see bind_listener) and know
    the port chosen for port 0, which granian does not report.
    """

    def __init__(self, app: AdminApp, sock: socket.socket) -> None:
        host, port = sock.getsockname()[:2]
        self._listener: socket.socket | None = sock
        super().__init__(
            app,
            address=host,
            port=port,
            interface=Interfaces.RSGI,
            http=HTTPModes.auto,
            websockets=False,
            backlog=BACKLOG,
            log_enabled=True,
            # Errors only: granian warns "Embedded server is experimental!" on
            # every start, which operators cannot act on.
            log_level=LogLevels.error,
            log_dictconfig=_GRANIAN_LOGGING,
        )

    def _init_shared_socket(self) -> None:
        sock = self._listener
        if sock is None:
            raise RuntimeError("the admin listener was already handed to granian")
        self._listener = None
        # granian owns and closes the descriptor from here on. Its stubs declare
        # these attributes None and SocketHolder argument-less, so they are set
        # through vars() and an Any-typed constructor rather than fought with casts.
        fd = sock.detach()
        holder: Any = SocketHolder
        vars(self).update(_shd=holder(fd, False, BACKLOG), _sfd=fd, _ssp=None)


class AdminServer:
    """Lifecycle of the control plane of one gateway."""

    def __init__(self, state: GatewayState, settings: Settings) -> None:
        self.state = state
        self.settings = settings
        self.port: int | None = None
        self.app: AdminApp | None = None
        self.streams: EventStreams | None = None
        self._server: _Embedded | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str | None:
        """The admin base URL, or None when the control plane is not running."""
        if self.port is None:
            return None
        host = self.settings.admin_host
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}"

    async def start(self) -> None:
        """Listen on settings.admin_host:admin_port (-1 = disabled; 0 = a free port)."""
        settings = self.settings
        if settings.admin_port < 0:
            return
        try:
            sock = bind_listener(settings.admin_host, settings.admin_port)
        except OSError as exc:
            log.warning("control plane disabled: cannot listen on %s:%s: %s",
                        settings.admin_host, settings.admin_port, exc.strerror or exc)
            return
        port = int(sock.getsockname()[1])
        auth = await self._auth()
        self.streams = EventStreams(self.state.operator.events)
        self.app = AdminApp(self.state, auth, settings.metrics_public, self.streams)
        try:
            self._server = _Embedded(self.app, sock)
        except BaseException:
            sock.close()
            raise
        self._task = asyncio.get_running_loop().create_task(self._server.serve())
        self._task.add_done_callback(self._served)
        # One loop turn lets granian spawn its worker; a configuration error
        # surfaces here instead of on the first request.
        await asyncio.sleep(0)
        if self._task.done():
            self._task = None
            self._server = None
            return
        self.port = port
        log.info("admin API on %s", self.url)

    async def _auth(self) -> AdminAuth:
        if self.settings.admin_token:
            return AdminAuth.from_token(self.settings.admin_token)
        store = self.state.cache.store
        try:
            stored = await store.get_meta(TOKEN_META_KEY)
        except Exception as exc:  # noqa: BLE001 - a store hiccup must not keep the admin plane down
            log.warning("cannot read the stored admin token digest: %s", exc)
            stored = None
        if stored:
            # Generated on an earlier start and printed then; only its digest was kept.
            log.info("admin token: the one generated on first start (stored hashed; lost it? "
                     "start with --admin-token or OLLAMAMQ_ADMIN_TOKEN set to one of your own)")
            return AdminAuth(bytes.fromhex(stored))
        auth, token = AdminAuth.generate()
        # Shown once; from here on only its digest exists (control/auth.py).
        print(f"admin token: {token}", file=sys.stderr, flush=True)
        try:
            await store.set_meta(TOKEN_META_KEY, token_digest(token).hex())
        except Exception as exc:  # noqa: BLE001 - nor a failed write of the digest
            log.warning("cannot store the admin token digest: %s", exc)
        return auth

    def _served(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("control plane stopped: %s", exc, exc_info=exc)
            self.port = None

    async def stop(self) -> None:
        """End event streams, stop granian, wait for it (bounded)."""
        if self.streams is not None:
            self.streams.close()
        server, task = self._server, self._task
        self._server = self._task = None
        self.port = None
        if server is None or task is None:
            return
        server.stop()  # type: ignore[no-untyped-call,unused-ignore]  # untyped in granian 2.8.9
        # asyncio.wait, not wait_for: a failed task was already logged by _served.
        done, _ = await asyncio.wait({task}, timeout=STOP_TIMEOUT_S)
        if not done:
            log.warning("control plane did not stop within %.0f s; cancelling it",
                        STOP_TIMEOUT_S)
            task.cancel()
