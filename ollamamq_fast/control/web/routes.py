"""Routes the dashboard pages need beyond the admin API, and the pages themselves.

Kept apart from AdminApp.routes, which is the admin API contract (each of its
routes is described in openapi.json and checked by tests/test_admin.py): these
serve the bundled pages. All but the static files need the admin token like
any API route.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ollamamq_fast import __version__
from ollamamq_fast.control.http import ApiError, Request, Response, Route, json_response
from ollamamq_fast.control.web.playground import DataPlane, Playground
from ollamamq_fast.control.web.static_files import StaticFiles
from ollamamq_fast.limits import LIMIT_NAMES

if TYPE_CHECKING:
    from ollamamq_fast.gateway import GatewayState


class WebRoutes:
    """Static pages plus /api/info, the playground relay and per-user limits."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.operator = state.operator
        self.files = StaticFiles.from_package()
        self.playground = Playground(state.settings)
        self.routes = [
            Route("GET", "/api/info", self.info),
            Route("GET", "/api/playground/models", self.models),
            Route("POST", "/api/playground/chat", self.chat),
            Route("GET", "/api/users/{user}/limits", self.get_limits),
            Route("PATCH", "/api/users/{user}/limits", self.set_limits),
        ]

    def page(self, method: str, path: str, if_none_match: str | None) -> Response | None:
        """A page or static file for a GET, else None (then the API router decides)."""
        if method != "GET":
            return None
        return self.files.response(path, if_none_match)

    async def info(self, req: Request) -> Response:
        """GET /api/info: where the data plane listens (the playground shows it)."""
        settings = self.state.settings
        plane = DataPlane.from_settings(settings)
        return json_response({
            "version": __version__,
            # None for a port-0 gateway: its bound port is not known here.
            "data_plane_url": plane.url if plane is not None else None,
            # The page shows its own hostname instead of a wildcard bind.
            "data_plane_host": settings.host,
            "data_plane_port": settings.port or None,
        })

    async def models(self, req: Request) -> Response:
        """GET /api/playground/models: the data plane's /v1/models ids, loaded ones marked."""
        loaded = {m for b in self.state.fleet.backends for m in b.loaded}
        return await self.playground.models(loaded)

    async def chat(self, req: Request) -> Response | None:
        """POST /api/playground/chat: stream /api/chat from the data plane as NDJSON."""
        return await self.playground.chat(req.json(), req.proto)

    async def get_limits(self, req: Request) -> Response:
        """GET /api/users/{user}/limits: overrides and the limits in effect."""
        return json_response(self.operator.limits(req.params["user"]))

    async def set_limits(self, req: Request) -> Response:
        """PATCH /api/users/{user}/limits {name: value | null}: set or drop overrides."""
        data: dict[str, Any] = req.json()
        if not data:
            raise ApiError(400, "nothing to change: give one or more limits")
        # Names first: a body key is passed as a keyword, so "user" or "self" must
        # be refused here rather than collide with set_limits' own parameters.
        for name in data:
            if name not in LIMIT_NAMES:
                raise ApiError(400, f"unknown limit {name!r} (known: {', '.join(LIMIT_NAMES)})")
        try:
            answer = self.operator.set_limits(req.params["user"], **data)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        await self.operator.stored()
        return json_response(answer)
