"""Routing and request admission: route table, 404/405, faults, delay, max_parallel."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import wire
from .exchange import Exchange, Request
from .fastlane import FastLane
from .faults import fault_message, parse_faults
from .gojson import dumps
from .models import ModelStore
from .options import SimOptions, SimStats

if TYPE_CHECKING:
    from .protocol import SimProtocol

log = logging.getLogger(__name__)

Handler = Callable[[Exchange], None]

BUSY = "server busy, please try again.  maximum pending requests exceeded"
BLOBS_PREFIX = "/api/blobs/"
MODELS_PREFIX = "/v1/models/"
DIGEST_RE = re.compile(r"sha256[:-][0-9a-fA-F]{64}")


@dataclass(slots=True)
class Route:
    """The handlers of one path, by method."""

    methods: dict[str, Handler]
    # Inference routes count toward max_parallel and stats.active.
    inference: bool = False
    # OpenAI-compatible routes answer errors in the OpenAI envelope.
    openai: bool = False


def openai_error_body(status: int, message: str) -> bytes:
    """openai.NewError encoded by json.Encoder (trailing newline)."""
    kind = "invalid_request_error" if status == 400 else "not_found_error" if status == 404 else "api_error"
    return dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}) + b"\n"


class SimApp:
    """Shared state of one simulator: options, counters, models, routes."""

    def __init__(self, options: SimOptions, loop: asyncio.AbstractEventLoop) -> None:
        from .native import NativeRoutes
        from .openai_routes import OpenAIRoutes

        self.options = options
        self.loop = loop
        self.stats = SimStats()
        self.clock = wire.Clock()
        self.store = ModelStore(options.models)
        self.fastlane = FastLane(self)
        self.connections: set[SimProtocol] = set()
        self.routes: dict[str, Route] = {}
        self.blob_route: Route | None = None
        self.model_route: Route | None = None
        if options.api in ("ollama", "both"):
            NativeRoutes(self).register()
        if options.api in ("openai", "both"):
            OpenAIRoutes(self).register()

    # -- timing derived from options -----------------------------------------

    @property
    def ttft_s(self) -> float:
        """Delay before the first token."""
        return self.options.ttft_ms / 1000.0

    @property
    def interval_s(self) -> float:
        """Delay between tokens; 0 means unpaced."""
        tps = self.options.tokens_per_s
        return 1.0 / tps if tps > 0 else 0.0

    # -- routing ---------------------------------------------------------------

    def add(self, path: str, route: Route) -> None:
        """Register a fixed path."""
        self.routes[path] = route

    def match(self, path: str) -> Route | None:
        """Fixed paths first, then the two parameterised ones (`:digest`, `:model`)."""
        route = self.routes.get(path)
        if route is not None:
            return route
        if path.startswith(BLOBS_PREFIX) and self.blob_route is not None:
            param = path[len(BLOBS_PREFIX) :]
            return self.blob_route if param and "/" not in param else None
        if path.startswith(MODELS_PREFIX) and self.model_route is not None:
            param = path[len(MODELS_PREFIX) :]
            return self.model_route if param and "/" not in param else None
        return None

    def dispatch(self, ex: Exchange) -> None:
        """Route one request: gin's 404/405/redirects, then admission (max_parallel), faults and the handler."""
        req = ex.req
        route = self.routes.get(req.path) or self.match(req.path)
        if route is None:
            self._not_found(ex)
            return
        handler = route.methods.get(req.method)
        if handler is None:
            ex.send_text(405, b"405 method not allowed")
            return
        headers = req.headers
        if route.inference:
            limit = self.options.max_parallel
            if limit and self.stats.active >= limit:
                self.stats.rejected += 1
                self.send_error(ex, route, 503, BUSY)
                return
            ex.mark_inference()
        faults = parse_faults(headers.get(b"x-sim-fault")) if headers else None
        if faults is not None:
            ex.faults = faults
            if faults.close:
                ex.kill()
                return
            if faults.hang:
                return
            if faults.status is not None:
                self.send_error(ex, route, faults.status, fault_message(faults.status, _model_hint(req)))
                return
        if headers:
            delay = _delay_s(req)
            if delay > 0:
                handle = self.loop.call_later(delay, self._run, handler, ex)
                ex.cancel_cb = handle.cancel
                return
        try:
            handler(ex)
        except Exception as err:  # noqa: BLE001 - any handler bug must still answer the client
            self._handler_failed(ex, err)

    def _run(self, handler: Handler, ex: Exchange) -> None:
        """Call a handler after X-Sim-Delay-Ms."""
        ex.cancel_cb = None
        if not ex.alive:
            return
        try:
            handler(ex)
        except Exception as err:  # noqa: BLE001 - any handler bug must still answer the client
            self._handler_failed(ex, err)

    def _handler_failed(self, ex: Exchange, err: Exception) -> None:
        """A handler bug: 500 before the head, a dropped connection after it."""
        log.exception("sim handler failed for %s %s", ex.req.method, ex.req.path)
        if ex.alive:
            if ex.streaming:
                ex.kill()
            else:
                ex.send_error(500, str(err) or type(err).__name__)

    def send_error(self, ex: Exchange, route: Route, status: int, message: str) -> None:
        """An error in the route's own shape (native or OpenAI envelope)."""
        if route.openai:
            ex.send(status, openai_error_body(status, message), wire.CT_JSON)
        else:
            ex.send_error(status, message)

    def _not_found(self, ex: Exchange) -> None:
        """gin: redirect a trailing slash to the known path, else `404 page not found`."""
        req = ex.req
        path = req.path
        if len(path) > 1 and path.endswith("/") and self.match(path.rstrip("/")) is not None:
            target = path.rstrip("/") + ("?" + req.query if req.query else "")
            location = b"Location: " + target.encode("latin-1", "replace") + b"\r\n"
            if req.method in ("GET", "HEAD"):
                body = b'<a href="' + target.encode("latin-1", "replace") + b'">Moved Permanently</a>.\n\n'
                ex.send(301, body, wire.CT_HTML, extra=location)
            else:
                ex.send(307, b"", None, extra=location)
            return
        ex.send_text(404, b"404 page not found")

    def reads_body(self, req: Request) -> bool:
        """False when routing alone answers the request (gin's 404/405/redirect)."""
        route = self.routes.get(req.path) or self.match(req.path)
        return route is not None and req.method in route.methods

    # -- blob uploads decided at header time -----------------------------------

    def blob_headers(self, conn: SimProtocol, req: Request, idle: bool) -> bool:
        """Before the body: answer at once if it will not be read; else hash it as it arrives.

        Returns True when the response has been sent (the connection then closes).
        """
        if self.blob_route is None:
            return False
        digest = req.path[len(BLOBS_PREFIX) :]
        valid = DIGEST_RE.fullmatch(digest) is not None
        if valid and not self.store.blob_exists(digest):
            req.sink = hashlib.sha256()
            return False
        if not idle or parse_faults(req.headers.get(b"x-sim-fault")) is not None:
            return False
        ex = conn.start_early(req)
        if valid:
            ex.send(200, b"", None)
        else:
            ex.send_error(400, "invalid digest format")
        return True


def _delay_s(req: Request) -> float:
    """X-Sim-Delay-Ms in seconds (0 when absent or malformed)."""
    value = req.headers.get(b"x-sim-delay-ms")
    if not value:
        return 0.0
    try:
        return max(0.0, float(value) / 1000.0)
    except ValueError:
        return 0.0


def _model_hint(req: Request) -> str:
    """The request's model for fault messages, without a full parse of big bodies."""
    body = req.body
    if len(body) > 65536:
        return ""
    match = re.search(rb'"model"\s*:\s*"([^"]*)"', body)
    return match.group(1).decode("utf-8", "replace") if match else ""
