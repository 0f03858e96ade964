"""Request, response and routing primitives of the control plane (no framework).

The admin API is a dozen small JSON routes, so a table of path templates and
a few helpers do the work of a web framework without the dependency. Errors
are raised as ApiError and turned into `{"error": "..."}` bodies, the shape
Ollama itself uses.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import orjson

JSON_HEADERS = [("content-type", "application/json"), ("cache-control", "no-store")]


class ApiError(Exception):
    """A request the API refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str,
                 headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


@dataclass(slots=True)
class Response:
    """A complete (non-streamed) response."""

    status: int
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=lambda: list(JSON_HEADERS))


def json_response(data: Any, status: int = 200) -> Response:
    """A JSON response; orjson writes NaN/inf (empty histograms) as null."""
    return Response(status, orjson.dumps(data))


def error_response(err: ApiError) -> Response:
    """The JSON body of a refused request."""
    return Response(err.status, orjson.dumps({"error": err.message}),
                    list(JSON_HEADERS) + err.headers)


@dataclass(slots=True)
class Request:
    """One admin request, with its path parameters and (already read) body."""

    method: str
    path: str
    params: dict[str, str]
    query: dict[str, list[str]]
    body: bytes
    # The server protocol object, for the handlers that stream (events).
    proto: Any = None
    # The Accept header, for the handlers that answer in more than one format.
    accept: str | None = None

    def json(self) -> dict[str, Any]:
        """The body as a JSON object (400 when it is not one)."""
        if not self.body.strip():
            return {}
        try:
            data = orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"invalid JSON body: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the JSON body must be an object")
        return data

    def query_one(self, name: str) -> str:
        """A required query parameter given exactly once."""
        values = self.query.get(name, [])
        if len(values) != 1 or not values[0]:
            raise ApiError(400, f"query parameter {name!r} is required (once)")
        return values[0]


def parse_query(query_string: str) -> dict[str, list[str]]:
    """Query parameters (percent-decoded)."""
    return parse_qs(query_string, keep_blank_values=True)


# -- Body field checks --------------------------------------------------------


def check_fields(data: dict[str, Any], allowed: set[str],
                 required: frozenset[str] | set[str] = frozenset()) -> None:
    """400 for a missing or unknown field: a typo must not pass silently."""
    for name in sorted(required):
        if name not in data:
            raise ApiError(400, f"missing field {name!r}")
    for name in sorted(data):
        if name not in allowed:
            raise ApiError(400, f"unknown field {name!r} (expected {', '.join(sorted(allowed))})")


def str_field(data: dict[str, Any], name: str, required: bool = True) -> str | None:
    """A non-empty string field."""
    value = data.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ApiError(400, f"{name!r} must be a non-empty string")
    return value.strip()


def bool_field(data: dict[str, Any], name: str) -> bool | None:
    """An optional boolean field."""
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise ApiError(400, f"{name!r} must be true or false")
    return value


def int_field(data: dict[str, Any], name: str, minimum: int = 1) -> int | None:
    """An optional integer field of at least `minimum` (booleans are not integers)."""
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ApiError(400, f"{name!r} must be an integer >= {minimum}")
    return value


def ip_or_cidr(text: str) -> str:
    """An address or CIDR range as given (400 when it is neither)."""
    try:
        ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ApiError(400, f"{text!r} is not an IP address or CIDR range") from None
    return text.strip()


# -- Routing ------------------------------------------------------------------

Handler = Callable[[Request], Awaitable[Response | None]]


@dataclass(frozen=True, slots=True)
class Route:
    """One method on one path template; `{name}` segments become parameters."""

    method: str
    template: str
    handler: Handler
    # Whether the route is readable without the admin token (only /metrics
    # with --metrics-public).
    public: bool = False

    @property
    def segments(self) -> tuple[str, ...]:
        """The template split at '/' (no empty segments)."""
        return tuple(s for s in self.template.split("/") if s)


# Path parameters that may hold '/': a user id is any printable text (an
# X-User-ID "team/alice" is valid), and granian hands the path over already
# percent-decoded, so "%2F" arrives as '/'. Such a parameter takes every
# segment between the template's fixed head and tail, when no template
# matches the path segment for segment (so "/api/users/bob/limits" stays
# bob's limits, and "/api/users/team/alice/block" blocks "team/alice").
SLASH_PARAMS = frozenset({"user"})


class Router:
    """Matches a path against route templates: 404 for no path, 405 for no method."""

    def __init__(self, routes: list[Route]) -> None:
        self.routes = routes
        # For spanning matches, the longest fixed tail first: "/api/users/a/b/limits"
        # is a/b's limits, not a user "a/b/limits".
        self._spanning = sorted(routes, key=lambda r: -len(r.segments))

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """The route for this request and its decoded path parameters."""
        parts = [p for p in path.split("/") if p]
        allowed: list[str] = []
        for spanning in (False, True):
            for route in self._spanning if spanning else self.routes:
                params = (_match_spanning(route.segments, path) if spanning
                          else _match(route.segments, parts))
                if params is None:
                    continue
                if route.method == method:
                    return route, params
                allowed.append(route.method)
        if allowed:
            raise ApiError(405, f"method {method} not allowed on {path}",
                           [("allow", ", ".join(sorted(set(allowed))))])
        raise ApiError(404, f"no route {path}")


def _match(template: tuple[str, ...], parts: list[str]) -> dict[str, str] | None:
    if len(template) != len(parts):
        return None
    params: dict[str, str] = {}
    for want, got in zip(template, parts):
        if want.startswith("{") and want.endswith("}"):
            # granian hands over the path already percent-decoded (UTF-8), so
            # the segment is the value.
            params[want[1:-1]] = got
        elif want != got:
            return None
    return params


def _match_spanning(template: tuple[str, ...], path: str) -> dict[str, str] | None:
    """A template whose one parameter is in SLASH_PARAMS, against the whole path:
    the parameter is what lies between the fixed head and tail, '/' included."""
    params = [i for i, want in enumerate(template) if want.startswith("{")]
    if len(params) != 1 or template[params[0]][1:-1] not in SLASH_PARAMS:
        return None
    i = params[0]
    head = "/" + "/".join(template[:i]) + "/"
    tail = "".join("/" + w for w in template[i + 1:])
    if len(path) <= len(head) + len(tail) or not path.startswith(head) or not path.endswith(tail):
        return None
    return {template[i][1:-1]: path[len(head):len(path) - len(tail)]}
