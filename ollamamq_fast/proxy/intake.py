"""What a request says, read once: its head (path, identity, pool, route), its body and its model.

Why apart from the exchange: everything here decides *whether* a request may
go on, before anything is queued or sent, and it is the part that keeps
growing (pools, scopes, trusted proxies, user ids). Each function fills in
the exchange's request fields and returns a value: None when the request may
go on, or the gateway's own answer (an `Early`) that the exchange holds until
the body is read (`Exchange._hold`); `read_model` returns what the policy
asked to see, or raises Unroutable. Nothing here calls back into the
exchange's driver.

`read_head` goes in the security order, top to bottom: the path is
normalized as the backend will read it, then the key is checked (before
routing, so an unknown path forwarded with --allow-all-routes needs a key
too), then the pool's access rules, then the route, its method and the body
size. `hold_body` keeps a body the gateway reads (not a streamed one, which
forward.py passes on) within --max-body-mb and the gateway's body budget.
`read_model` reads the model from the body when the request is routed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from ollamamq_fast.fleet.models import normalize_model
from ollamamq_fast.policy.cache import cache_control
from ollamamq_fast.policy.identity import AuthError, UserIdError, check_user_id
from ollamamq_fast.pools import PoolError, unalias
from ollamamq_fast.proxy.flow import PIPELINE_BUFFER_LIMIT
from ollamamq_fast.wire.errors import Api, error_body
from ollamamq_fast.wire.headers import (
    backend_request_id,
    forwarded_block,
)
from ollamamq_fast.wire.paths import PathError, normalize, request_path
from ollamamq_fast.wire.routes import FALLBACK_ROUTE, Kind, Route, api_of_path, lookup
from ollamamq_fast.wire.sniff import (
    Sniffed,
    SniffError,
    exact_disagrees,
    first_model,
    sniff_fields,
    sniff_spans,
)

if TYPE_CHECKING:
    from ollamamq_fast.proxy.exchange import Exchange

# The gateway's own answer to a request it will not forward: status, content
# type, body, extra head lines, and whether it is answered at once, without
# reading the body, closing the connection (413, 503) rather than once the
# body is read (so the connection stays usable).
Early = tuple[int, bytes, bytes, bytes, bool]

_NOT_FOUND: Final[Early] = (404, b"text/plain", b"404 page not found", b"", False)
_NOT_ALLOWED: Final[Early] = (405, b"text/plain", b"405 method not allowed", b"", False)


def _error(ex: Exchange, status: int, message: str) -> Early:
    ctype, body = error_body(ex.api, status, message)
    return status, ctype, body, b"", False


def read_head(ex: Exchange, method: bytes, keep_alive: bool, http_11: bool) -> Early | None:
    """The request head is parsed: classify the route and process headers."""
    ex.method = method
    ex.keep_alive = keep_alive
    ex.http10 = not http_11
    gw = ex.gw
    try:
        raw_path, query = request_path(ex.url)
        path = normalize(raw_path)
    except PathError as exc:
        ex.request_id = gw.ledger.request_id()
        ex.path = ex.url.split(b"?", 1)[0]
        ex.api = api_of_path(ex.path)
        ex.started_at = gw.loop_time()
        ex.user = ex.client_ip = ex.client.peer_ip
        ex.keep_alive = False
        return _error(ex, 400, str(exc))
    pool_missing = ""
    if path.startswith(b"/pool/"):  # a named pool (pools.py); the default costs this test
        pool_missing, path = _enter_pool(ex, path)
    if (path is not raw_path and path != raw_path) or len(raw_path) + len(query) != len(ex.url):
        # Forward the spelling that was routed: the backend reads what the policy saw.
        ex.url = path + query
    ex.path = path
    route = lookup(path)
    ex.api = route.api if route is not None else api_of_path(path)
    identity = gw.identity
    keys_required = identity.keys_required
    head = ex.request_head
    head.finish(http_11)
    own_id = gw.ledger.request_id() if not head.request_id else b""
    ex.request_id = head.request_id or own_id
    ex.content_length = head.content_length
    ex.chunked_in = head.chunked
    ex.expect_continue = head.expect_continue
    # Only Ollama's /v1 routes decode a body (zstd); the native ones read it as it is.
    ex.encoded_body = head.encoded_body and ex.api is Api.OPENAI
    if head.cache_control:
        ex.cache_control = cache_control(head.cache_control)
    if (head.authorization or head.api_key) and not keys_required:
        ex.credential = head.authorization + b"\n" + head.api_key
    peer_ip = ex.client.peer_ip
    ex.client_ip = (identity.client_ip(peer_ip, head.forwarded_for)
                    if identity.trusted_proxies else peer_ip)
    ex.started_at = gw.loop_time()
    if head.repeated or head.coding:
        return _ambiguous(ex, head.repeated, head.coding)
    if head.origin:  # a browser's request: CORS comes first, as in Ollama
        early = _cross_origin(ex, head.origin, head.host, method)
        if early is not None:
            return early
    try:
        ex.user = check_user_id(head.user) if head.user else ""
    except UserIdError as bad_id:
        ex.user = ex.client_ip  # the id is not one: logged by address
        return _error(ex, 400, str(bad_id))
    forwarded_user = None
    if keys_required and (route is None or route.kind is not Kind.LOCAL):
        # Authentication comes before routing: an unknown path forwarded with
        # --allow-all-routes reaches a backend too, so it needs a key as well.
        try:
            ex.user, ex.key_id = identity.user_and_key(
                head.authorization, head.api_key, ex.user, path)
            forwarded_user = ex.user
        except AuthError as denied:  # not `exc`: compiled code gives a name one type
            # 401 without a valid key, 403 (ScopeError) without the path's scope.
            return _error(ex, denied.status, str(denied))
    client = ex.client
    ex.fwd_headers = forwarded_block(client.kept_lines.of(head.kept), forwarded_user,
                                     head.forwarded_for, client.peer_ip_bytes,
                                     backend_request_id(head.request_id, own_id))
    if pool_missing or gw.pools.active:
        early = _check_pool(ex, pool_missing, head.host)
        if early is not None:
            return early
    if not ex.user:
        ex.user = ex.client_ip
    # The route: known, or a redirect, or forwarded as it is (--allow-all-routes);
    # its method; a body the gateway may hold.
    settings = gw.settings
    if route is None:
        stripped = path.rstrip(b"/")
        if stripped != path and stripped and lookup(stripped) is not None:
            # gin redirects a trailing slash (docs/protocol-notes.md §7.27); clients follow it.
            status = 301 if method in (b"GET", b"HEAD") else 307
            location = b"Location: " + stripped + ex.url[len(path) :] + b"\r\n"
            return status, b"", b"", location, False
        if not settings.allow_all_routes:
            return _NOT_FOUND
        route = FALLBACK_ROUTE
    elif route.methods:
        known = _route_method(route.methods, method)
        if known is None:
            return _NOT_ALLOWED
        ex.method = known
    ex.route = route
    if route.kind is Kind.PRIMARY:
        ex.stream_body = True
    elif route.kind is not Kind.LOCAL and ex.content_length > settings.max_body_bytes:
        return too_large(ex)
    return None


def _route_method(methods: tuple[bytes, ...], method: bytes) -> bytes | None:
    """The route's own object for `method` (the parser's is new on every request:
    the access log's row then matches by identity), None if the route refuses it."""
    for known in methods:
        if known == method:
            return known
    return None


def _cross_origin(ex: Exchange, origin: bytes, host: bytes, method: bytes) -> Early | None:
    """A request from a browser page (wire/cors.py): 403 from an origin not
    allowed, 204 to an allowed one's preflight; else its answer's CORS lines."""
    origins = ex.gw.origins
    lines = origins.check(origin, host)
    if lines is None:
        ex.user = ex.client_ip
        return _error(ex, 403, f"origin {origin[:100].decode('latin-1')!r} is not allowed "
                               "(the gateway's --origins, as Ollama's OLLAMA_ORIGINS)")
    if lines and method == b"OPTIONS":
        ex.user = ex.client_ip
        return 204, b"", b"", origins.preflight(origin), False
    ex.cors = lines
    return None


def _ambiguous(ex: Exchange, repeated: bytes, coding: bytes) -> Early:
    """400 for a header named twice that may come once, 501 for a transfer coding
    other than chunked; the connection closes after the answer."""
    ex.user = ex.client_ip
    ex.keep_alive = False
    if repeated:
        name = repeated.decode("latin-1")
        return _error(ex, 400, f"{name} sent more than once: the gateway does not guess "
                               "which one counts")
    return _error(ex, 501, "unsupported Transfer-Encoding "
                           f"{coding[:40].decode('latin-1')!r}: only chunked is accepted")


def _enter_pool(ex: Exchange, path: bytes) -> tuple[str, bytes]:
    """Cut `/pool/NAME` off the path and join that pool; the name when it is unknown."""
    pool, rest, name = ex.gw.pools.by_path(path)
    if pool is None:
        return name or "?", rest
    ex.pool = pool
    ex.fleet = pool.fleet
    ex.dispatcher = pool.dispatcher
    pool.requests += 1
    return "", rest


def _check_pool(ex: Exchange, missing: str, host: bytes) -> Early | None:
    """Unknown pool (404), Host routing, access rules (403)."""
    pools = ex.gw.pools
    status, message = 0, ""
    if missing:
        status, message = 404, f"pool '{missing}' not found"
    else:
        if ex.pool is pools.default and host:
            chosen = pools.for_host(host)
            if chosen is not None and chosen is not pools.default:
                ex.pool = chosen
                ex.fleet = chosen.fleet
                ex.dispatcher = chosen.dispatcher
                chosen.requests += 1
        try:
            pools.check_access(ex.pool, ex.user or ex.client_ip, ex.key_id)
        except PoolError as err:
            status, message = err.status, err.message
    if not status:
        return None
    if not ex.user:
        ex.user = ex.client_ip
    return _error(ex, status, message)


def too_large(ex: Exchange) -> Early:
    """413, answered at once: the body is over --max-body-mb."""
    mb = ex.gw.settings.max_body_bytes / (1024 * 1024)
    ctype, body = error_body(
        ex.api, 413, f"request body too large: the gateway accepts at most {mb:g} MB (--max-body-mb)")
    return 413, ctype, body, b"", True


def bodies_full(ex: Exchange) -> Early:
    """503, answered at once: the gateway holds as many request bodies as it may."""
    mb = ex.gw.settings.max_bodies_bytes / (1024 * 1024)
    ctype, body = error_body(ex.api, 503, "the gateway is holding as many request bodies as "
                                          f"it may ({mb:g} MB in all, --max-bodies-mb); retry shortly")
    return 503, ctype, body, b"Retry-After: 5\r\n", True


def hold_body(ex: Exchange, data: bytes) -> Early | None:
    """Keep a piece of a body the gateway holds until it is routed (`ex.body_size` counts it).

    Returns the answer when the body goes over --max-body-mb or the gateway's
    body budget (the exchange drops what it holds). A request read ahead of
    the one the connection answers pauses the client past its share.
    """
    if ex.body_size > ex.gw.settings.max_body_bytes:
        return too_large(ex)
    if not ex.gw.bodies.take(len(data)):
        return bodies_full(ex)
    ex.body_held += len(data)
    ex.body.append(data)
    if not ex.active and ex.body_size > PIPELINE_BUFFER_LIMIT:
        ex.client.pause_reading()
    return None


class Unroutable(Exception):
    """A body that names no model the gateway can route by (answered 400, or 404 as Ollama does)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def read_model(ex: Exchange, route: Route, body: bytes, keys: tuple[str, ...],
               text: str | None = None) -> Sniffed | None:
    """The model the body names, as the backend will read it; the values the policy asked for.

    Sets the exchange's model (and its body, when the pool's alias is spliced
    in) and returns the spans of `keys` (None when the policy asked for none).
    `text` is the body decoded as Latin-1, when the caller has it.
    Raises Unroutable when there is no model to route by.
    """
    spans = None
    try:
        if keys:
            spans = sniff_spans(body, route.model_keys, keys)
            found = spans.found
        else:
            found = sniff_fields(body, route.model_keys, text)
        if route.api is Api.OPENAI:
            # An exact-name server (vLLM, llama.cpp) must run the model routed and billed.
            odd = exact_disagrees(body, route.model_keys, found)
            if odd:
                raise Unroutable(400, f'ambiguous "{odd}": Ollama reads it in any case, '
                                      f'other servers only as "{odd}" exactly (the last one, '
                                      'a null as none), and here they would run different '
                                      f'models; send one "{odd}"')
    except SniffError as exc:
        raise Unroutable(400, str(exc)) from None
    name = first_model(found, route.model_keys)
    if not name:
        # Ollama's own answers: generate looks the empty name up (404),
        # the other handlers check for it first (400).
        if ex.path == b"/api/generate":
            raise Unroutable(404, "model '' not found")
        raise Unroutable(400, "model is required")
    aliases = ex.pool.aliases
    if aliases and normalize_model(name) in aliases:
        # The backend reads the model the alias stands for, and so does
        # the policy: the body is spliced, then read again.
        body = unalias(body, route.model_keys, aliases[normalize_model(name)])
        ex.body = [body]
        if keys:
            spans = sniff_spans(body, route.model_keys, keys)
            found = spans.found
        else:
            found = sniff_fields(body, route.model_keys)
        name = first_model(found, route.model_keys)
    ex.model_name = name
    ex.model = normalize_model(name)
    return spans
