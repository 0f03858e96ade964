"""The control-plane RSGI application: admin REST API, /metrics, events, OpenAPI.

Served by granian's embedded server on the gateway's own event loop, so every
handler reads and changes live state directly, through the Operator facade,
without locks. Handlers are short and never block: the slowest is a metrics
scrape, a pass over the counters.
"""

from __future__ import annotations

import gc
import logging
from typing import TYPE_CHECKING, Any

import orjson

from ollamamq_fast import buildinfo
from ollamamq_fast.config import ConfigError, parse_backend_url
from ollamamq_fast.control.auth import AdminAuth
from ollamamq_fast.control.events import EventStreams
from ollamamq_fast.control.http import (
    ApiError,
    Request,
    Response,
    Route,
    Router,
    bool_field,
    check_fields,
    error_response,
    int_field,
    ip_or_cidr,
    json_response,
    parse_query,
    str_field,
)
from ollamamq_fast.control.metrics import CONTENT_TYPE, Metrics
from ollamamq_fast.control.openapi import build_openapi
from ollamamq_fast.control.usage import UsageQueryError, usage_response
from ollamamq_fast.control.web import WebRoutes
from ollamamq_fast.operator import DEFAULT_PAGE, MAX_PAGE, NotStored
from ollamamq_fast.policy.identity import MAX_USER_ID_BYTES
from ollamamq_fast.state.records import DEFAULT_SCOPES, parse_scopes

if TYPE_CHECKING:
    from ollamamq_fast.gateway import GatewayState

log = logging.getLogger("ollamamq_fast.control")

# Admin requests are small JSON objects; anything bigger is a mistake or abuse.
MAX_BODY_BYTES = 64 * 1024
# A user named in a path: what the data plane can produce, a user id
# (policy/identity.py) or a service key's SERVICE:NAME, so two of them and ':'.
MAX_PATH_USER_BYTES = 2 * MAX_USER_ID_BYTES + 1
# A key's name is a label shown in lists (CLI, dashboards).
MAX_KEY_NAME = 200
# The query string of an event stream that carries ?token= (a token is 43 characters).
MAX_TOKEN_QUERY = 1024
# `offset` of a list route: answered back as a JSON number, a 64-bit integer.
MAX_OFFSET = 2**63 - 1
BODY_METHODS = frozenset({"POST", "PATCH", "PUT", "DELETE"})


def gc_figures() -> dict[str, Any]:
    """The garbage collector's work: objects frozen at start (out of its passes), and
    collections so far per generation (a full one, generation 2, pauses the loop)."""
    return {"frozen": gc.get_freeze_count(),
            "collections": [g["collections"] for g in gc.get_stats()]}


class AdminApp:
    """Routes admin requests to Operator actions; an RSGI application."""

    def __init__(self, state: GatewayState, auth: AdminAuth, metrics_public: bool = False,
                 streams: EventStreams | None = None) -> None:
        self.state = state
        self.operator = state.operator
        self.auth = auth
        self.metrics = Metrics(state)
        self.streams = streams or EventStreams(self.operator.events)
        self.routes = self._routes(metrics_public)
        # The dashboard's pages and the routes only they use (control/web/):
        # routed here too, but not part of the API contract in self.routes.
        self.web = WebRoutes(state)
        self.router = Router(self.routes + self.web.routes)
        self.openapi = orjson.dumps(build_openapi(metrics_public))

    def _routes(self, metrics_public: bool) -> list[Route]:
        return [
            Route("GET", "/api/backends", self.list_backends),
            Route("POST", "/api/backends", self.add_backend),
            Route("PATCH", "/api/backends", self.set_slots),
            Route("DELETE", "/api/backends", self.remove_backend),
            Route("DELETE", "/api/backends/override", self.reset_backend),
            Route("POST", "/api/backends/drain", self.drain),
            Route("POST", "/api/backends/undrain", self.undrain),
            Route("GET", "/api/users", self.list_users),
            Route("PATCH", "/api/users/{user}", self.set_user),
            Route("POST", "/api/users/{user}/block", self.block_user),
            Route("POST", "/api/users/{user}/unblock", self.unblock_user),
            Route("GET", "/api/blocked", self.list_blocked),
            Route("POST", "/api/blocked/ips", self.block_ip),
            Route("DELETE", "/api/blocked/ips", self.unblock_ip),
            Route("GET", "/api/keys", self.list_keys),
            Route("POST", "/api/keys", self.create_key),
            Route("DELETE", "/api/keys/{key_id}", self.revoke_key),
            Route("PATCH", "/api/keys/{key_id}", self.set_key_scopes),
            Route("GET", "/api/pools", self.list_pools),
            Route("POST", "/api/pools", self.create_pool),
            Route("GET", "/api/pools/{name}", self.get_pool),
            Route("PUT", "/api/pools/{name}", self.replace_pool),
            Route("PATCH", "/api/pools/{name}", self.patch_pool),
            Route("DELETE", "/api/pools/{name}", self.remove_pool),
            Route("GET", "/api/pools/{name}/models", self.pool_models),
            Route("POST", "/api/pools/{name}/sync", self.sync_pool),
            Route("GET", "/api/pulls", self.pulls),
            Route("GET", "/api/pool-access", self.pool_access),
            Route("PUT", "/api/pool-access/users/{user}", self.set_user_pools),
            Route("PUT", "/api/pool-access/keys/{key_id}", self.set_key_pools),
            Route("GET", "/api/stats", self.stats),
            Route("GET", "/api/usage", self.usage),
            Route("POST", "/api/reload", self.reload),
            Route("GET", "/api/events", self.events),
            Route("GET", "/metrics", self.prometheus, public=metrics_public),
            Route("GET", "/openapi.json", self.openapi_document),
            Route("GET", "/health", self.health, public=True),
            Route("GET", "/ready", self.ready, public=True),
        ]

    # -- RSGI interface -------------------------------------------------------

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        """Called by granian for every request on the admin port."""
        try:
            response = await self._handle(scope, proto)
        except ApiError as err:
            response = error_response(err)
        except ConfigError as exc:  # a value outside config.RULES (slots, weight...)
            response = error_response(ApiError(400, str(exc)))
        except NotStored as exc:
            response = error_response(ApiError(503, str(exc), [("retry-after", "5")]))
        except Exception:  # a bug in one handler must not take the admin port down
            log.exception("admin request %s %s failed", scope.method, scope.path)
            response = error_response(ApiError(500, "internal error (see the gateway log)"))
        if response is not None:
            proto.response_bytes(response.status, response.headers, response.body)

    async def _handle(self, scope: Any, proto: Any) -> Response | None:
        method = scope.method.upper()
        page = self.web.page(method, scope.path, scope.headers.get("if-none-match"))
        if page is not None:
            return page  # the page files hold no data; the login form needs no token
        authorized = self.auth.check(scope.headers.get("authorization"))
        try:
            route, params = self.router.match(method, scope.path)
        except ApiError:
            # Without the token a client learns nothing, not even which paths exist.
            if not authorized:
                raise _unauthorized() from None
            raise
        # Parsed once the client may use it: a query string near granian's limit
        # takes parse_qs about 10 ms of the gateway's loop. Without the header,
        # the event stream's ?token= is short.
        query = parse_query(scope.query_string) if authorized or route.public or (
            route.handler == self.events and len(scope.query_string) <= MAX_TOKEN_QUERY) else {}
        if not authorized and route.handler == self.events:
            authorized = self._query_token(query)
        if not (authorized or route.public):
            raise _unauthorized()
        if "user" in params:
            _check_path_user(params["user"])
        body = await _read_body(scope, proto) if method in BODY_METHODS else b""
        request = Request(method, scope.path, params, query, body, proto,
                          scope.headers.get("accept"))
        return await route.handler(request)

    def _query_token(self, query: dict[str, list[str]]) -> bool:
        """`?token=` on /api/events only: a browser's EventSource cannot send headers.

        Checked by the same digest comparison as the header (constant time).
        A URL can end up in proxy logs and browser history, so every other
        route insists on the header.
        """
        values = query.get("token", [])
        return len(values) == 1 and self.auth.check("Bearer " + values[0])

    # -- Backends -------------------------------------------------------------

    async def list_backends(self, req: Request) -> Response:
        """GET /api/backends: every backend with its live state, and configured ones removed."""
        return json_response({"backends": self.operator.list_backends(),
                              "removed": self.operator.removed_backends()})

    async def add_backend(self, req: Request) -> Response:
        """POST /api/backends {url, slots?}: add a backend at runtime."""
        data = req.json()
        check_fields(data, {"url", "slots"}, {"url"})
        url = _backend_url(str_field(data, "url") or "")
        slots = int_field(data, "slots")
        if any(b["url"] == url for b in self.operator.list_backends()):
            raise ApiError(409, f"backend {url} already exists")
        answer = self.operator.add_backend(url, slots)
        await self.operator.stored()
        return json_response(answer, 201)

    async def remove_backend(self, req: Request) -> Response:
        """DELETE /api/backends?url=: remove a backend (running requests finish)."""
        url = _backend_url(req.query_one("url"))
        try:
            self.operator.remove_backend(url)
        except KeyError:
            raise ApiError(404, f"no backend {url}") from None
        await self.operator.stored()
        return json_response({"removed": url})

    async def reset_backend(self, req: Request) -> Response:
        """DELETE /api/backends/override?url=: a configured backend's entry applies again."""
        url = _backend_url(req.query_one("url"))
        try:
            answer = self.operator.reset_backend(url)
        except KeyError:
            raise ApiError(404, f"{url} is not a configured backend") from None
        except ValueError as exc:
            raise ApiError(404, str(exc)) from None
        await self.operator.stored()
        return json_response(answer)

    async def set_slots(self, req: Request) -> Response:
        """PATCH /api/backends {url, slots}: change a backend's concurrency."""
        data = req.json()
        check_fields(data, {"url", "slots"}, {"url", "slots"})
        url = _backend_url(str_field(data, "url") or "")
        slots = int_field(data, "slots")
        assert slots is not None  # required above
        try:
            answer = self.operator.set_slots(url, slots)
        except KeyError:
            raise ApiError(404, f"no backend {url}") from None
        await self.operator.stored()
        return json_response(answer)

    async def drain(self, req: Request) -> Response:
        """POST /api/backends/drain {url}: no new requests to the backend."""
        return self._set_draining(req, True)

    async def undrain(self, req: Request) -> Response:
        """POST /api/backends/undrain {url}: the backend takes requests again."""
        return self._set_draining(req, False)

    def _set_draining(self, req: Request, on: bool) -> Response:
        data = req.json()
        check_fields(data, {"url"}, {"url"})
        url = _backend_url(str_field(data, "url") or "")
        try:
            return json_response(self.operator.set_draining(url, on))
        except KeyError:
            raise ApiError(404, f"no backend {url}") from None

    # -- Users ----------------------------------------------------------------

    async def list_users(self, req: Request) -> Response:
        """GET /api/users?limit=&offset=&sort=name|active: a page of users, and the total."""
        limit, offset = _page(req)
        sort = req.query.get("sort", ["name"])[-1]
        if sort not in ("name", "active"):
            raise ApiError(400, "sort must be name or active")
        rows, total = self.operator.users_page(limit, offset, sort)
        return json_response({"users": rows, "total": total, "limit": limit, "offset": offset})

    async def set_user(self, req: Request) -> Response:
        """PATCH /api/users/{user} {vip?, boost?, weight?}: fair-share settings."""
        data = req.json()
        check_fields(data, {"vip", "boost", "weight"})
        if not data:
            raise ApiError(400, "nothing to change: give vip, boost and/or weight")
        vip, boost = bool_field(data, "vip"), bool_field(data, "boost")
        weight = int_field(data, "weight")
        answer = self.operator.set_user(req.params["user"], vip, boost, weight)
        await self.operator.stored()
        return json_response(answer)

    async def block_user(self, req: Request) -> Response:
        """POST /api/users/{user}/block: refuse the user's requests with 403."""
        self.operator.block_user(req.params["user"], True)
        await self.operator.stored()
        return json_response({"user": req.params["user"], "blocked": True})

    async def unblock_user(self, req: Request) -> Response:
        """POST /api/users/{user}/unblock: accept the user's requests again."""
        self.operator.block_user(req.params["user"], False)
        await self.operator.stored()
        return json_response({"user": req.params["user"], "blocked": False})

    # -- Blocklist ------------------------------------------------------------

    async def list_blocked(self, req: Request) -> Response:
        """GET /api/blocked?limit=&offset=: blocked users and addresses (each list paged)."""
        limit, offset = _page(req)
        return json_response(self.operator.list_blocked(limit, offset))

    async def block_ip(self, req: Request) -> Response:
        """POST /api/blocked/ips {ip}: block an address or CIDR range."""
        data = req.json()
        check_fields(data, {"ip"}, {"ip"})
        ip = ip_or_cidr(str_field(data, "ip") or "")
        self._block_ip(ip, True)
        await self.operator.stored()
        return json_response(self.operator.list_blocked(DEFAULT_PAGE))

    async def unblock_ip(self, req: Request) -> Response:
        """DELETE /api/blocked/ips?ip=: unblock an address or range (idempotent)."""
        ip = ip_or_cidr(req.query_one("ip"))
        self._block_ip(ip, False)
        await self.operator.stored()
        return json_response(self.operator.list_blocked(DEFAULT_PAGE))

    def _block_ip(self, ip: str, on: bool) -> None:
        try:
            self.operator.block_ip(ip, on)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    # -- API keys -------------------------------------------------------------

    async def list_keys(self, req: Request) -> Response:
        """GET /api/keys?limit=&offset=: a page of key records (never secrets), and the total."""
        limit, offset = _page(req)
        rows, total = self.operator.keys_page(limit, offset)
        return json_response({"keys": rows, "total": total, "limit": limit, "offset": offset})

    async def create_key(self, req: Request) -> Response:
        """POST /api/keys {user, name?, trusted?}: a new key; the secret is shown once."""
        data = req.json()
        check_fields(data, {"user", "name", "trusted", "scopes"}, {"user"})
        user = str_field(data, "user") or ""
        name = data.get("name", "")
        if not isinstance(name, str) or len(name) > MAX_KEY_NAME or not name.isprintable():
            raise ApiError(400, f"'name' must be a string of at most {MAX_KEY_NAME} printable "
                                "characters")
        trusted = bool_field(data, "trusted") or False
        try:
            answer = self.operator.create_key(user, name, trusted,
                                              _scopes(data.get("scopes", DEFAULT_SCOPES)))
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        await self.operator.stored()
        return json_response(answer, 201)

    async def set_key_scopes(self, req: Request) -> Response:
        """PATCH /api/keys/{key_id} {scopes}: change what a key may do."""
        data = req.json()
        check_fields(data, {"scopes"}, {"scopes"})
        key_id = req.params["key_id"]
        try:
            answer = self.operator.set_key_scopes(key_id, _scopes(data["scopes"]))
        except KeyError:
            raise ApiError(404, f"no key {key_id}") from None
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        await self.operator.stored()
        return json_response(answer)

    async def revoke_key(self, req: Request) -> Response:
        """DELETE /api/keys/{key_id}: requests with the key get 401 from now on."""
        key_id = req.params["key_id"]
        try:
            self.operator.revoke_key(key_id)
        except KeyError:
            raise ApiError(404, f"no key {key_id}") from None
        await self.operator.stored()
        return json_response({"key_id": key_id, "revoked": True})

    # -- Pools ----------------------------------------------------------------

    def _pool(self, name: str) -> Any:
        pool = self.state.pools.by_name.get(name)
        if pool is None:
            raise ApiError(404, f"no pool {name}")
        return pool

    async def list_pools(self, req: Request) -> Response:
        """GET /api/pools: every pool with its definition and live numbers."""
        return json_response({"pools": self.operator.list_pools()})

    async def get_pool(self, req: Request) -> Response:
        """GET /api/pools/{name}: one pool."""
        self._pool(req.params["name"])
        return json_response(self.operator.pool_snapshot(req.params["name"]))

    async def create_pool(self, req: Request) -> Response:
        """POST /api/pools {name, backends, ...}: a new pool (stored)."""
        data = req.json()
        name = str_field(data, "name")
        if not name:
            raise ApiError(400, "'name' is required")
        try:
            answer = self.operator.set_pool(name, data, create=True)
        except ValueError as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ApiError(409, str(exc)) from None
        await self.operator.stored()
        return json_response(answer, 201)

    async def replace_pool(self, req: Request) -> Response:
        """PUT /api/pools/{name} {backends, ...}: replace a pool's definition (created if new)."""
        name = req.params["name"]
        create = name not in self.state.pools.by_name
        answer = self.operator.set_pool(name, req.json(), create=create)
        await self.operator.stored()
        return json_response(answer, 201 if create else 200)

    async def patch_pool(self, req: Request) -> Response:
        """PATCH /api/pools/{name} {field: value, ...}: change some fields of a pool."""
        self._pool(req.params["name"])
        data = req.json()
        if not data:
            raise ApiError(400, "nothing to change")
        answer = self.operator.patch_pool(req.params["name"], data)
        await self.operator.stored()
        return json_response(answer)

    async def remove_pool(self, req: Request) -> Response:
        """DELETE /api/pools/{name}: delete a pool; its queued requests get 503."""
        name = req.params["name"]
        self._pool(name)
        try:
            self.operator.remove_pool(name)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        await self.operator.stored()
        return json_response({"removed": name})

    async def pool_models(self, req: Request) -> Response:
        """GET /api/pools/{name}/models: required models per backend, pulls and their progress."""
        return json_response(self.state.required.status(self._pool(req.params["name"])))

    async def sync_pool(self, req: Request) -> Response:
        """POST /api/pools/{name}/sync[?remove=true]: compare with /api/tags now, pull what is missing."""
        pool = self._pool(req.params["name"])
        values = req.query.get("remove")
        remove = None
        if values:
            if values[-1] not in ("true", "false"):
                raise ApiError(400, "remove must be true or false")
            remove = values[-1] == "true"
        return json_response(await self.state.required.check(pool, "on demand", remove))

    async def pulls(self, req: Request) -> Response:
        """GET /api/pulls: model pulls running or queued now, every pool."""
        return json_response({"pulls": self.state.required.progress()})

    async def pool_access(self, req: Request) -> Response:
        """GET /api/pool-access: users and API keys limited to some pools."""
        return json_response(self.operator.pool_access())

    async def set_user_pools(self, req: Request) -> Response:
        """PUT /api/pool-access/users/{user} {pools: [...] | null}: limit a user to pools."""
        return await self._set_access(req, "users", req.params["user"])

    async def set_key_pools(self, req: Request) -> Response:
        """PUT /api/pool-access/keys/{key_id} {pools: [...] | null}: limit a key to pools."""
        return await self._set_access(req, "keys", req.params["key_id"])

    async def _set_access(self, req: Request, part: str, who: str) -> Response:
        data = req.json()
        check_fields(data, {"pools"}, {"pools"})
        pools = data["pools"]
        if pools is not None and (not isinstance(pools, list)
                                  or not all(isinstance(p, str) for p in pools)):
            raise ApiError(400, "'pools' must be a list of pool names or null")
        answer = self.operator.set_pool_access(part, who, pools)
        await self.operator.stored()
        return json_response(answer)

    # -- Read models ----------------------------------------------------------

    async def stats(self, req: Request) -> Response:
        """GET /api/stats: gateway-wide numbers, and which build runs ("mypyc" | "python")."""
        return json_response({**self.operator.stats_snapshot(), "build": buildinfo.build(),
                              "gc": gc_figures()})

    async def usage(self, req: Request) -> Response:
        """GET /api/usage: stored usage grouped and summed (control/usage.py), JSON or CSV."""
        try:
            return await usage_response(self.operator, req.query, req.accept)
        except UsageQueryError as exc:
            raise ApiError(400, str(exc)) from None

    async def reload(self, req: Request) -> Response:
        """POST /api/reload: re-read the TOML config, as SIGHUP does."""
        hook = self.state.reload_hook
        if hook is None:
            raise ApiError(409, "no config file to reload (start with --config FILE)")
        try:
            changes = hook()
        except ConfigError as exc:
            raise ApiError(400, f"reload failed, the old config stays: {exc}") from None
        return json_response({"reloaded": True, **changes})

    async def events(self, req: Request) -> None:
        """GET /api/events: the event bus as Server-Sent Events (streamed here)."""
        if self.streams.open >= self.streams.max_open:
            raise ApiError(503, f"too many open event streams (at most {self.streams.max_open});"
                                " retry later", [("retry-after", "5")])
        await self.streams.serve(req.proto)

    async def prometheus(self, req: Request) -> Response:
        """GET /metrics: Prometheus text exposition."""
        return Response(200, self.metrics.render(),
                        [("content-type", CONTENT_TYPE), ("cache-control", "no-store")])

    async def health(self, req: Request) -> Response:
        """GET /health: the process is alive (public, for liveness probes)."""
        return json_response({"status": "alive"})

    async def ready(self, req: Request) -> Response:
        """GET /ready: 200 when the gateway can serve, else 503 with the reasons (public)."""
        ready, body = self.state.readiness()
        return json_response(body, 200 if ready else 503)

    async def openapi_document(self, req: Request) -> Response:
        """GET /openapi.json: the OpenAPI 3.1 description of this API."""
        return Response(200, self.openapi)


def _unauthorized() -> ApiError:
    return ApiError(401, "missing or wrong admin token (Authorization: Bearer <token>)",
                    [("www-authenticate", 'Bearer realm="ollamamq-fast admin"')])


def _page(req: Request) -> tuple[int, int]:
    """`limit` (1..MAX_PAGE, default DEFAULT_PAGE) and `offset` (>= 0) of a list route."""
    out = []
    for name, default, low, high in (("limit", DEFAULT_PAGE, 1, MAX_PAGE),
                                     ("offset", 0, 0, MAX_OFFSET)):
        values = req.query.get(name)
        if not values:
            out.append(default)
            continue
        text = values[-1]
        # ASCII digits only: str.isdigit() also takes "١" or "²".
        if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
            raise ApiError(400, f"{name} must be an integer from {low} to {high}")
        out.append(int(text))
    return out[0], out[1]


def _check_path_user(user: str) -> None:
    """400 for a user in a path that no request could ever have: control characters
    (a terminal escape in the CLI's and dashboards' lists), or over-long."""
    if not user.isprintable() or len(user.encode("utf-8", "surrogatepass")) > MAX_PATH_USER_BYTES:
        raise ApiError(400, f"invalid user {user[:40]!r}: at most {MAX_PATH_USER_BYTES} bytes "
                            "of printable characters")


def _scopes(value: object) -> tuple[str, ...]:
    """A `scopes` field: a list of scope names (400 otherwise)."""
    if not isinstance(value, list | tuple):
        raise ApiError(400, "'scopes' must be a list, e.g. [\"inference\", \"models\"]")
    try:
        return parse_scopes(value)
    except ValueError as exc:
        raise ApiError(400, f"'scopes': {exc}") from None


def _backend_url(text: str) -> str:
    """A backend URL in the normalized form the fleet knows it by (400 if invalid)."""
    try:
        return parse_backend_url(text).url
    except ConfigError as exc:
        raise ApiError(400, str(exc)) from None


async def _read_body(scope: Any, proto: Any) -> bytes:
    """The request body, refused with 413 beyond MAX_BODY_BYTES."""
    declared = scope.headers.get("content-length")
    if declared is not None:
        if not (declared.strip().isascii() and declared.strip().isdigit()):
            raise ApiError(400, "invalid Content-Length")
        if int(declared) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    body = b""
    async for chunk in proto:
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    return body
