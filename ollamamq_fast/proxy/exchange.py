"""One request/response exchange: the per-request driver.

A request goes, top to bottom in this file:

    head      `head_complete`: path normalized as the backend reads it
              (wire/paths.py), headers sorted (wire/headers.py)
    auth      the key is checked before the route decides anything
    route     `_check_route` / `_route`: local answer, model management, inference
    admit     the usage policy answers a value (policy/gate.py): ADMIT, REFUSE,
              CACHED or PENDING, acted on by `_admitted`
    queue     the dispatcher answers STARTED, QUEUED or REFUSED (`_submit`)
    start     `start` / `_send`: a pooled connection, head and body written
    relay     the upstream connection relays bytes; `response_head`,
              `response_complete`, and the failure paths (retry before the
              first byte, an error frame after it)
    finish    the ledger records the one end of the request (`_ended`)

Where the request is in its life is `state.py`'s table: every move goes
through `_to`, which refuses one the table does not allow. Pauses and
resumes belong to flow.py, counters to the ledger, slots to the dispatcher.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import blake3

from ollamamq_fast.accounting.ledger import End
from ollamamq_fast.fleet.backend import Breaker
from ollamamq_fast.fleet.models import normalize_model
from ollamamq_fast.fleet.passive import FAST_FAIL_S
from ollamamq_fast.fleet.select import Balance
from ollamamq_fast.policy.cache import cache_control
from ollamamq_fast.policy.gate import ADMIT, Admission, Verdict
from ollamamq_fast.policy.identity import AuthError, UserIdError, check_user_id
from ollamamq_fast.policy.streamusage import UsageStripper
from ollamamq_fast.pools import PoolError, unalias
from ollamamq_fast.proxy import translating
from ollamamq_fast.proxy.flow import HIGH_WATER, PIPELINE_BUFFER_LIMIT
from ollamamq_fast.proxy.state import State, advance
from ollamamq_fast.sched.dispatcher import Placed
from ollamamq_fast.stats import UserStats, tokens_in_tail
from ollamamq_fast.wire import framing
from ollamamq_fast.wire.errors import Api, error_body, stream_error_frame
from ollamamq_fast.wire.headers import (
    backend_request_id,
    forwarded_block,
    length_line,
    read_request_head,
)
from ollamamq_fast.wire.paths import PathError, normalize, request_path
from ollamamq_fast.wire.routes import (
    BLOB_ROUTE,
    FALLBACK_ROUTE,
    Kind,
    Route,
    api_of_path,
    lookup,
)
from ollamamq_fast.wire.sniff import (
    SniffError,
    first_item,
    first_model,
    sniff_fields,
    sniff_spans,
)

if TYPE_CHECKING:
    from ollamamq_fast.fleet.backend import Backend
    from ollamamq_fast.fleet.select import Fleet
    from ollamamq_fast.gateway import GatewayState
    from ollamamq_fast.limits import Limits
    from ollamamq_fast.policy.cache import Entry
    from ollamamq_fast.pools import Pool
    from ollamamq_fast.proxy.downstream import ClientProtocol
    from ollamamq_fast.proxy.translating import TranslatingRelay
    from ollamamq_fast.proxy.transport import Transport
    from ollamamq_fast.proxy.upstream import UpstreamConnection
    from ollamamq_fast.sched.dispatcher import Dispatcher
    from ollamamq_fast.sched.fairqueue import Ticket

log = logging.getLogger("ollamamq_fast.proxy")

# A request whose backend fails before answering is tried on this many
# connections in all (a stale pooled connection, then other backends).
MAX_ATTEMPTS = 3

_NOT_FOUND_TEXT = b"404 page not found"
_NOT_ALLOWED_TEXT = b"405 method not allowed"
_TEXT_PLAIN = b"text/plain"


class Exchange:
    """Per-request state and the logic that moves a request through the gateway."""

    __slots__ = (
        "active",
        "affinity",
        "api",
        "attempts",
        "backend",
        "body",
        "body_forwarded",
        "body_held",
        "body_size",
        "cache_control",
        "cache_key",
        "chosen",
        "chunked_in",
        "client",
        "client_ip",
        "completion_tokens",
        "connect_task",
        "content_length",
        "continue_sent",
        "credential",
        "discard_body",
        "dispatcher",
        "early_error",
        "early_extra",
        "early_immediate",
        "encoded_body",
        "enqueued_at",
        "expect_continue",
        "failed",
        "fleet",
        "fwd_headers",
        "gw",
        "headers",
        "http10",
        "in_flight_counted",
        "keep_alive",
        "key_id",
        "lease",
        "limits",
        "method",
        "model",
        "model_name",
        "path",
        "pool",
        "prompt_tokens",
        "queue_ms",
        "request_complete",
        "request_id",
        "route",
        "sent_at",
        "started_at",
        "state",
        "status",
        "stream_body",
        "strip_usage",
        "ticket",
        "tokens_estimated",
        "upstream",
        "url",
        "user",
        "ustats",
        "xlate",
    )

    def __init__(self, client: ClientProtocol) -> None:
        self.client = client
        gw: GatewayState = client.gw
        self.gw = gw
        # The pool the request is in (pools.py): the default one unless its
        # path or Host names another; its fleet and dispatcher serve it.
        pool = gw.pools.default
        self.pool: Pool = pool
        self.fleet: Fleet = pool.fleet
        self.dispatcher: Dispatcher = pool.dispatcher
        self.method = b""
        self.url = b""
        self.path = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.route: Route | None = None
        self.api = Api.OLLAMA
        self.keep_alive = True
        self.user = ""
        self.state = State.RECEIVING
        self.body: list[bytes] = []
        self.body_size = 0
        self.body_held = 0  # bytes of this body counted in the gateway's body budget
        self.request_id = b""  # X-Request-ID: the client's (if sane) or the gateway's
        # Backends that failed this request: a retry never goes back to them.
        self.failed: tuple[Backend, ...] = ()
        self.request_complete = False
        self.stream_body = False
        self.chunked_in = False
        self.content_length = -1
        self.expect_continue = False
        self.active = False
        self.upstream: UpstreamConnection | None = None
        self.backend: Backend | None = None
        self.lease = 0  # what it holds of its backend: dispatcher.SLOT / UNSLOTTED, or 0
        self.ticket: Ticket | None = None
        self.model: str | None = None
        self.model_name = ""
        self.chosen: Backend | None = None
        self.enqueued_at = 0.0
        self.queue_ms = 0
        self.attempts = 0
        self.fwd_headers = b""
        self.connect_task: asyncio.Task[None] | None = None
        # (status, content type, body) answered instead of routing; "immediate"
        # ones are answered without reading the body (and close the connection).
        self.early_error: tuple[int, bytes, bytes] | None = None
        self.early_immediate = False
        self.encoded_body = False
        self.http10 = False
        self.ustats: UserStats | None = None
        self.in_flight_counted = False
        self.client_ip = ""
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.tokens_estimated = False
        self.key_id = ""  # the API key's id, for usage rows and budgets
        self.affinity = ""
        # Usage policy (policy/engine.py): the user's limits, the response-cache
        # key of a cacheable request, Cache-Control flags, and whether the
        # stream's injected usage must be stripped (1 chat, 2 per chunk).
        self.limits: Limits | None = None
        self.cache_key: bytes | None = None
        self.cache_control = 0
        self.strip_usage = 0
        # The client's own credentials when the gateway does not own them (auth
        # off): part of the cache key, since the backend may check them.
        self.credential = b""
        self.discard_body = False
        self.body_forwarded = False
        self.status = 0
        self.started_at = 0.0
        self.continue_sent = False
        self.early_extra = b""
        self.sent_at = 0.0
        # The translating relay (proxy/translating.py) when the backend speaks the other API.
        self.xlate: TranslatingRelay | None = None

    # -- State (state.py holds the table of allowed moves) ---------------------------

    def _to(self, target: State) -> None:
        self.state = advance(self.state, target)

    def _end(self) -> None:
        if self.state is not State.DONE:
            self.state = State.DONE  # allowed from every other state (state.py)
            self._give_back_body()

    def _drop_body(self) -> None:
        self.body = []
        self.discard_body = True
        self._give_back_body()

    def _give_back_body(self) -> None:
        if self.body_held:
            self.gw.bodies.give_back(self.body_held)
            self.body_held = 0

    def enter_queue(self) -> None:
        """The request waits for a slot (called by the dispatcher: first turn or a retry)."""
        self._to(State.QUEUED)

    # -- Request side (called by ClientProtocol) ----------------------------------

    def head_complete(self, method: bytes, keep_alive: bool, http_11: bool) -> None:
        """The request head is parsed: classify the route and process headers."""
        self.method = method
        self.keep_alive = keep_alive
        self.http10 = not http_11
        try:
            raw_path, query = request_path(self.url)
            path = normalize(raw_path)
        except PathError as exc:
            self.request_id = self.gw.ledger.request_id()
            self.path = self.url.split(b"?", 1)[0]
            self.api = api_of_path(self.path)
            self.started_at = self.gw.loop.time()
            self.user = self.client_ip = self.client.peer_ip
            self.keep_alive = False
            ctype, body = error_body(self.api, 400, str(exc))
            self._set_early_error(400, ctype, body)
            return
        pool_missing = ""
        if path.startswith(b"/pool/"):  # a named pool (pools.py); the default costs this test
            pool_missing, path = self._enter_pool(path)
        if path is not raw_path or len(raw_path) + len(query) != len(self.url):
            # Forward the spelling that was routed: the backend reads what the policy saw.
            self.url = path + query
        self.path = path
        route = lookup(path)
        self.api = route.api if route is not None else api_of_path(path)
        identity = self.gw.identity
        keys_required = identity.keys_required
        head = read_request_head(self.headers, http_11, keys_required)
        own_id = self.gw.ledger.request_id() if not head.request_id else b""
        self.request_id = head.request_id or own_id
        self.content_length = head.content_length
        self.chunked_in = head.chunked
        self.expect_continue = head.expect_continue
        self.encoded_body = head.encoded_body
        if head.cache_control:
            self.cache_control = cache_control(head.cache_control)
        if (head.authorization or head.api_key) and not keys_required:
            self.credential = head.authorization + b"\n" + head.api_key
        peer_ip = self.client.peer_ip
        self.client_ip = (identity.client_ip(peer_ip, head.forwarded_for)
                          if identity.trusted_proxies else peer_ip)
        self.started_at = self.gw.loop.time()
        try:
            self.user = check_user_id(head.user) if head.user else ""
        except UserIdError as bad_id:
            self.user = self.client_ip  # the id is not one: logged by address
            ctype, body = error_body(self.api, 400, str(bad_id))
            self._set_early_error(400, ctype, body)
            return
        forwarded_user = None
        if keys_required and (route is None or route.kind is not Kind.LOCAL):
            # Authentication comes before routing: an unknown path forwarded with
            # --allow-all-routes reaches a backend too, so it needs a key as well.
            try:
                self.user, self.key_id = identity.user_and_key(
                    head.authorization, head.api_key, self.user, path)
                forwarded_user = self.user
            except AuthError as denied:  # not `exc`: compiled code gives a name one type
                # 401 without a valid key, 403 (ScopeError) without the path's scope.
                ctype, body = error_body(self.api, denied.status, str(denied))
                self._set_early_error(denied.status, ctype, body)
                return
        self.fwd_headers = forwarded_block(head.kept, forwarded_user, head.forwarded_for,
                                           self.client.peer_ip_bytes,
                                           backend_request_id(head.request_id, own_id))
        if (pool_missing or self.gw.pools.active) and self._check_pool(pool_missing, head.host):
            return
        self._check_route(route, method)
        if not self.user:
            self.user = self.client_ip

    def _enter_pool(self, path: bytes) -> tuple[str, bytes]:
        """Cut `/pool/NAME` off the path and join that pool; the name when it is unknown."""
        pool, rest, name = self.gw.pools.by_path(path)
        if pool is None:
            return name or "?", rest
        self.pool = pool
        self.fleet = pool.fleet
        self.dispatcher = pool.dispatcher
        pool.requests += 1
        return "", rest

    def _check_pool(self, missing: str, host: bytes) -> bool:
        """Unknown pool (404), Host routing, access rules (403); True when answered."""
        pools = self.gw.pools
        status, message = 0, ""
        if missing:
            status, message = 404, f"pool '{missing}' not found"
        else:
            if self.pool is pools.default and host:
                chosen = pools.for_host(host)
                if chosen is not None and chosen is not pools.default:
                    self.pool = chosen
                    self.fleet = chosen.fleet
                    self.dispatcher = chosen.dispatcher
                    chosen.requests += 1
            try:
                pools.check_access(self.pool, self.user or self.client_ip, self.key_id)
            except PoolError as err:
                status, message = err.status, err.message
        if not status:
            return False
        if not self.user:
            self.user = self.client_ip
        ctype, body = error_body(self.api, status, message)
        self._set_early_error(status, ctype, body)
        return True

    def _check_route(self, route: Route | None, method: bytes) -> None:
        settings = self.gw.settings
        if route is None:
            stripped = self.path.rstrip(b"/")
            if stripped != self.path and stripped and lookup(stripped) is not None:
                # gin redirects a trailing slash (docs/protocol-notes.md §7.27); clients follow it.
                status = 301 if method in (b"GET", b"HEAD") else 307
                query = self.url[len(self.path) :]
                self._set_early_error(status, b"", b"", extra=b"Location: " + stripped + query + b"\r\n")
                return
            if settings.allow_all_routes:
                route = FALLBACK_ROUTE
            else:
                self._set_early_error(404, _TEXT_PLAIN, _NOT_FOUND_TEXT)
                return
        elif route.methods and method not in route.methods:
            self._set_early_error(405, _TEXT_PLAIN, _NOT_ALLOWED_TEXT)
            return
        self.route = route
        if route.kind is Kind.PRIMARY:
            self.stream_body = True
        elif route.kind is not Kind.LOCAL and self.content_length > settings.max_body_bytes:
            self._error_now(413, self._too_large_message(), close=True)

    def _too_large_message(self) -> str:
        mb = self.gw.settings.max_body_bytes / (1024 * 1024)
        return f"request body too large: the gateway accepts at most {mb:g} MB (--max-body-mb)"

    def _set_early_error(
        self, status: int, ctype: bytes, body: bytes, extra: bytes = b"", immediate: bool = False
    ) -> None:
        # Answered once the request body is read, so the connection stays usable;
        # or at once (413, or a client waiting on Expect: 100-continue), closing it.
        self.early_error = (status, ctype, body)
        self.early_extra = extra
        self.early_immediate = immediate
        self.discard_body = True

    def body_received(self, data: bytes) -> None:
        """A piece of request body (de-chunked by the parser)."""
        if self.discard_body:
            return
        self.body_size += len(data)
        if self.stream_body:
            conn = self.upstream
            if conn is not None and self.state in (State.WAITING, State.STREAMING) and self.body_forwarded:
                conn.write(framing.chunk(data) if self.chunked_in else data)
                return
            self.body.append(data)
            if self.body_size > HIGH_WATER:
                self.client.pause_reading()
            return
        if self.body_size > self.gw.settings.max_body_bytes:
            self._drop_body()
            self._error_now(413, self._too_large_message(), close=True)
            return
        if not self.gw.bodies.take(len(data)):
            self._drop_body()
            mb = self.gw.settings.max_bodies_bytes / (1024 * 1024)
            self._error_now(503, "the gateway is holding as many request bodies as it may "
                                 f"({mb:g} MB in all, --max-bodies-mb); retry shortly",
                            close=True, retry_after=5)
            return
        self.body_held += len(data)
        self.body.append(data)
        if not self.active and self.body_size > PIPELINE_BUFFER_LIMIT:
            self.client.pause_reading()

    def message_complete(self) -> None:
        """The whole request has been read."""
        self.request_complete = True
        if self.stream_body and self.body_forwarded and self.chunked_in:
            conn = self.upstream
            if conn is not None:
                conn.write(framing.LAST_CHUNK)
        if self.active and self.state is State.RECEIVING:
            self._route()

    def activate(self) -> None:
        """This exchange is now the one the connection answers (pipelining order)."""
        self.active = True
        if self.state is State.DONE:
            return
        if self.early_error is not None:
            if self.early_immediate or (self.expect_continue and not self.request_complete):
                # Go answers the final status without reading the body; so do we.
                self._route()
            elif self.request_complete:
                self._route()
            return
        if (
            self.expect_continue
            and not self.request_complete
            and not self.discard_body
            and not self.continue_sent
        ):
            # We will read the body, so tell the client to send it (RFC 9110 §10.1.1).
            self.continue_sent = True
            self.client.write(framing.CONTINUE)
        if self.request_complete or (self.stream_body and self.route is not None):
            self._route()
        elif self.body_size:
            self.client.resume_reading()

    def client_gone(self) -> None:
        """The client connection closed: stop everything this exchange holds."""
        state = self.state
        if state is State.DONE:
            return
        self._end()
        if self.ustats is not None:  # it reached admission: it ends here, in the ledger
            end = End.CANCELLED
            conn = self.upstream
            if state is State.STREAMING and conn is not None:
                if framing.terminal_event_relayed(conn.tail(), conn.content_type):
                    # The client read the last event and left before the backend's
                    # end of body (the openai SDK does): a complete answer.
                    end = End.DONE
                    if (self.status < 300 and self.route is not None
                            and self.route.kind is Kind.QUEUED):
                        self._count_tokens(conn)
                elif conn.events:
                    self._estimate_tokens(conn)  # cut short: what was generated still counts
            self._ended(end)
        if state is State.QUEUED:
            self.dispatcher.cancel(self)
        elif state is State.CONNECTING:
            if self.connect_task is not None:
                self.connect_task.cancel()
            self._release_backend()
        elif state in (State.WAITING, State.STREAMING):
            conn = self.upstream
            self.upstream = None
            if conn is not None:
                conn.abort()
            self._release_backend()

    # -- Routing --------------------------------------------------------------------

    def _route(self) -> None:
        early = self.early_error
        if early is not None:
            status, ctype, body = early
            self.respond(status, ctype, body, extra=self.early_extra)
            return
        route = self.route
        assert route is not None
        kind = route.kind
        if kind is Kind.LOCAL:
            self.gw.local.answer(self, route)
            return
        self.ustats = self.gw.ledger.arrived(self.user, self.client_ip)
        if self.gw.cache.any_blocked and self.gw.operator.is_blocked(self.user, self.client_ip):
            self.gw.ledger.refused(self.ustats, by_policy=False)
            self.respond_error(403, "blocked by the gateway operator")
            return
        if kind is Kind.PRIMARY:
            backend = self.fleet.primary(native=route is BLOB_ROUTE)
            if backend is None:
                self.respond_error(503, "no backend is online", retry_after=5)
                return
            self.start(backend, slotted=False)
            return
        body = b"".join(self.body) if len(self.body) != 1 else self.body[0]
        self.body = [body]
        policy = self.gw.policy
        keys = policy.body_keys(self, body) if kind is Kind.QUEUED else ()
        if self.encoded_body:
            self.model = None
            if kind is Kind.QUEUED:
                self._admitted(policy.admit(self, body, None, readable=False))
            else:
                self._submit()
            return
        spans = None
        try:
            if keys:
                spans = sniff_spans(body, route.model_keys, keys)
                found = spans.found
            else:
                found = sniff_fields(body, route.model_keys)
        except SniffError as exc:
            self.respond_error(400, str(exc))
            return
        name = first_model(found, route.model_keys)
        if not name:
            # Ollama's own answers: generate looks the empty name up (404),
            # the other handlers check for it first (400).
            if self.path == b"/api/generate":
                self.respond_error(404, "model '' not found")
            else:
                self.respond_error(400, "model is required")
            return
        aliases = self.pool.aliases
        if aliases and normalize_model(name) in aliases:
            # The backend reads the model the alias stands for, and so does
            # the policy: the body is spliced, then read again.
            body = unalias(body, route.model_keys, aliases[normalize_model(name)])
            self.body = [body]
            if keys:
                spans = sniff_spans(body, route.model_keys, keys)
                found = spans.found
            else:
                found = sniff_fields(body, route.model_keys)
            name = first_model(found, route.model_keys)
        self.model_name = name
        self.model = normalize_model(name)
        if kind is Kind.QUEUED:
            verdict = policy.admit(self, body, spans)
            if verdict is not ADMIT:
                self._admitted(verdict)
                return
        self._proceed()

    def _admitted(self, a: Admission) -> None:
        """Act on what admission answered (policy/gate.py)."""
        kind = a.kind
        if kind is Verdict.ADMIT:
            self.gw.ledger.admitted(a.capped, a.cache_miss)
            if a.body is not None:
                self.body = [a.body]
            self.cache_key = a.cache_key
            self.strip_usage = a.strip_usage
            self._proceed()
        elif kind is Verdict.REFUSE:
            if a.rejected:
                self.gw.ledger.refused(self.ustats, True, a.reason)
            self.respond_error(a.status, a.message, retry_after=a.retry_after)
        elif kind is Verdict.CACHED:
            assert a.entry is not None
            self.gw.ledger.cache_hit()
            self.respond_cached(a.entry)
        else:
            assert a.pending is not None
            a.pending.add_done_callback(self._settled)

    def _settled(self, future: asyncio.Future[Admission]) -> None:
        # A PENDING admission resolved; the client may have left meanwhile.
        if self.state is State.DONE or future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            log.error("policy: cache lookup failed: %r", exc)
            self.respond_error(500, "internal error in the gateway's response cache")
            return
        self._admitted(future.result())

    def _proceed(self) -> None:
        """Hand the admitted request to the dispatcher."""
        if self.fleet.balance is Balance.AFFINITY:
            body = self.body[0]
            # Same user and same opening message: same backend, so its KV cache is reused.
            opening = first_item(body, "messages")
            self.affinity = self.user + ":" + (
                blake3.blake3(opening).hexdigest()[:16] if opening else "")
        self._submit()

    def _submit(self) -> None:
        placement = self.dispatcher.submit(self)
        kind = placement.kind
        if kind is Placed.STARTED:
            assert placement.backend is not None
            self.start(placement.backend, placement.slotted)
        elif kind is Placed.REFUSED:
            if placement.rejected:
                self.gw.ledger.refused(self.ustats, by_policy=True)
            self.respond_error(placement.status, placement.message,
                               retry_after=placement.retry_after)
        # QUEUED: the dispatcher starts it when a slot frees.

    def resubmit(self) -> None:
        """Ask for a backend again after a failure (called from the dispatcher's retry turn)."""
        if self.state is State.QUEUED:
            self._submit()

    def start(self, backend: Backend, slotted: bool) -> None:
        """Run on `backend` now (called by the dispatcher or for unqueued routes)."""
        self.backend = backend
        self.gw.ledger.running(self)
        self.lease = self.dispatcher.take(backend, slotted)
        self._to(State.CONNECTING)
        assert backend.pool is not None
        conn = backend.pool.acquire_idle()
        if conn is not None:
            self._send(conn)
        else:
            self.connect_task = self.gw.loop.create_task(self._connect(backend))

    async def _connect(self, backend: Backend) -> None:
        assert backend.pool is not None
        try:
            conn = await backend.pool.connect()
        except asyncio.CancelledError:
            raise
        except (TimeoutError, OSError) as exc:
            self.connect_task = None
            if self.state is State.CONNECTING:
                self._failed_before_response(None, exc)
            return
        self.connect_task = None
        if self.state is not State.CONNECTING:
            conn.close()
            return
        self._send(conn)

    def _send(self, conn: UpstreamConnection) -> None:
        backend = self.backend
        assert backend is not None
        self.upstream = conn
        self._to(State.WAITING)
        self.sent_at = self.gw.loop.time()
        route = self.route
        if route is not None and route.translate & ~backend.speaks:
            translating.send(self, conn, backend)  # the backend speaks the other API
            return
        head = [
            self.method, b" ", backend.path_prefix, self.url, b" HTTP/1.1\r\n",
            backend.host_header, self.fwd_headers,
        ]
        head_request = self.method == b"HEAD"
        if not self.stream_body:
            body = self.body[0] if self.body else b""
            if body or self.content_length >= 0 or self.chunked_in:
                head.append(length_line(len(body)))
            else:
                head.append(b"\r\n")
            head.append(body)
            strip = UsageStripper(self.strip_usage == 2) if self.strip_usage else None
            tee = self.gw.policy.cache.entry_limit if self.cache_key is not None else 0
            conn.send(self, self.client.flow, [b"".join(head)], head_request, strip, tee,
                      route is not None and route.kind is Kind.QUEUED)
            self.body_forwarded = True
            return
        if self.chunked_in:
            head.append(b"Transfer-Encoding: chunked\r\n\r\n")
        elif self.content_length >= 0:
            head.append(b"Content-Length: %d\r\n\r\n" % self.content_length)
        else:
            head.append(b"\r\n")
        data = [b"".join(head)]
        for piece in self.body:
            data.append(framing.chunk(piece) if self.chunked_in else piece)
        if self.request_complete and self.chunked_in:
            data.append(framing.LAST_CHUNK)
        self.body = []
        self.body_forwarded = True
        conn.send(self, self.client.flow, data, head_request)
        self.client.resume_reading()

    # -- Response side (called by UpstreamConnection) -------------------------------

    @property
    def client_transport(self) -> Transport | None:
        """Where response bytes go; None once the client is gone."""
        return self.client.transport if self.state is not State.DONE else None

    def response_head(self, conn: UpstreamConnection) -> bytes | None:
        """The head for the client: backend headers minus hop-by-hop, plus ours.

        A 5xx answered fast counts against the backend's breaker; a 502/503/504
        is not relayed when another backend can take the request instead.
        """
        status = conn.status
        backend = self.backend
        assert backend is not None
        if status in (502, 503, 504):
            # Busy or unavailable, answered fast: the backend's state, not the
            # request's. A 500 is usually about one request (bad template, a
            # model that fails to load) and is relayed without blame.
            if self.gw.loop.time() - self.sent_at < FAST_FAIL_S:
                self._note_backend_failure(f"answered {status}")
            if self._can_retry_elsewhere(backend):
                self.upstream = None
                conn.abort()
                self.attempts += 1
                if backend not in self.failed:
                    self.failed += (backend,)
                self._release_backend()
                self.dispatcher.retry(self)
                return None
        elif backend.consecutive_failures or backend.breaker is not Breaker.CLOSED:
            self.gw.passive.success(backend)
        self._to(State.STREAMING)
        self.status = status
        self.gw.ledger.first_byte(self.started_at)
        dechunk = conn.dechunking and self.http10  # else re-chunked (stream usage stripped)
        if conn.framing is framing.Framing.CLOSE or not self.request_complete or dechunk:
            self.keep_alive = False
        extra = (backend.gateway_headers + b"%d\r\nX-Request-ID: %s\r\n" % (
            self.queue_ms, self.request_id))
        if self.cache_key is not None:
            extra += b"X-Cache: MISS\r\n"
            if status != 200 or conn.framing not in (framing.Framing.LENGTH, framing.Framing.CHUNKED):
                conn.tee = None  # only whole 200 answers are kept
        if self.http10 and self.keep_alive:
            extra += b"Connection: keep-alive\r\n"
        if conn.reason and not dechunk:
            head = framing.relay_head(conn.raw_head, extra, not self.keep_alive,
                                     conn.hop_by_hop)
            if head is not None:
                return head
        return framing.response_head(
            conn.status, conn.reason, conn.headers, extra, not self.keep_alive, dechunk
        )

    def _can_retry_elsewhere(self, failed: Backend) -> bool:
        """Whether another available backend could take this request (bounded tries)."""
        if self.attempts >= MAX_ATTEMPTS or (self.stream_body and self.body_forwarded):
            return False
        route = self.route
        if route is None:
            return False
        for b in self.fleet.candidates(self.model if route.kind is not Kind.PRIMARY else None,
                                          route.native):
            if b is not failed and b.available and b not in self.failed:
                return True
        return False

    def upstream_continue(self, conn: UpstreamConnection) -> None:
        """Nothing to do: the gateway answers Expect itself and never forwards it."""

    def response_complete(self, conn: UpstreamConnection) -> None:
        """The backend's response ended; recycle the connection and finish."""
        self.upstream = None
        conn.finish_response(reusable=self.request_complete)
        backend = self.backend
        if backend is not None:
            backend.requests_done += 1
            route = self.route
            if route is not None and route.kind is Kind.QUEUED and self.status < 300:
                self._count_tokens(conn)
                if self.cache_key is not None:
                    self.gw.policy.response_done(self, conn)
            if route is not None and route.refresh_models and self.status < 300:
                # Route a request right after a pull/copy/delete correctly; the
                # probe that follows fills in the details.
                self.fleet.note_model_change(backend, self.path, self.model_name,
                                                self.body[0] if self.body else b"")
                self.gw.refresh_models(backend)
        self._release_backend()
        self.finish()

    def _count_tokens(self, conn: UpstreamConnection) -> None:
        relay = self.xlate
        if relay is not None and relay.conn is conn:
            relay.count_tokens()  # the counts its translator read from the backend
            return
        prompt, completion = tokens_in_tail(conn.tail())
        if prompt or completion or not conn.events:
            self.gw.ledger.tokens(self, prompt, completion)
        else:  # a stream with no usage in it
            self._estimate_tokens(conn)

    def _estimate_tokens(self, conn: UpstreamConnection) -> None:
        """Count a stream's tokens from its events (about one token an event), marked estimated."""
        self.gw.ledger.tokens(self, 0, framing.estimated_tokens(conn.events, conn.content_type),
                              estimated=True)

    def _ended(self, end: End) -> None:
        backend = self.backend
        self.gw.ledger.ended(self, end, backend.name if backend is not None else "")

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        """The backend connection closed before the response ended."""
        self.upstream = None
        if self.state is State.STREAMING:
            self._broken_stream(conn, "the backend closed the connection mid-response")
            return
        if self.state is State.WAITING:
            self._failed_before_response(conn, exc)

    def upstream_timeout(self) -> None:
        """The backend was silent longer than --timeout (called by the reaper)."""
        conn = self.upstream
        self.upstream = None
        secs = self.gw.settings.timeout
        if conn is not None:
            conn.abort()
        if self.state is State.STREAMING and conn is not None:
            self._broken_stream(conn, f"the backend sent nothing for {secs:g} s")
        elif self.state in (State.WAITING, State.CONNECTING):
            self._note_backend_failure(f"timed out after {secs:g} s of silence")
            self._release_backend()
            self.respond_error(504, f"backend {self._backend_name()} sent nothing for {secs:g} s")

    def _broken_stream(self, conn: UpstreamConnection, why: str) -> None:
        relay = self.xlate
        if relay is not None and relay.conn is conn:
            relay.broken(why)  # the client's stream is in the other API's format
            return
        self._note_backend_failure(why)
        self._release_backend()
        self.keep_alive = False
        transport = self.client.transport
        if transport is not None and not transport.is_closing():
            frame = None
            if conn.framing is framing.Framing.CHUNKED and (
                not conn.last_data or framing.at_stream_boundary(conn.last_data, conn.content_type)
            ):
                frame = stream_error_frame(conn.content_type, why)
            if frame is not None:
                transport.write(framing.chunk(frame) + framing.LAST_CHUNK)
                self.finish()
                return
            # Mid-line or unframed: no clean frame is possible; the client sees
            # a truncated message (an error in every HTTP client), never a hang.
            transport.abort()
        self._end()

    def _failed_before_response(self, conn: UpstreamConnection | None, exc: Exception | None) -> None:
        self.upstream = None
        self.attempts += 1
        replayable = (not self.stream_body or not self.body_forwarded) and (
            conn is None or not conn.got_bytes
        )
        backend = self.backend
        if conn is not None and conn.responses > 0 and not conn.got_bytes:
            # A pooled connection the backend had already closed: not the backend's
            # fault. Reconnect to the same backend, keeping the slot; a fresh
            # connection cannot be stale, so this happens at most once in a row.
            if replayable and backend is not None and backend.available:
                self._to(State.CONNECTING)
                self.connect_task = self.gw.loop.create_task(self._connect(backend))
                return
        else:
            self._note_backend_failure(repr(exc) if exc else "connection closed before a response")
        self._release_backend()
        if replayable and backend is not None and self._can_retry_elsewhere(backend):
            self.dispatcher.retry(self)
            return
        self.respond_error(
            502,
            f"backend {self._backend_name()} failed before answering: {exc or 'connection closed'}",
            retry_after=5,
        )

    def _note_backend_failure(self, why: str) -> None:
        backend = self.backend
        if backend is not None:
            self.gw.passive.failure(backend, why)
            if backend not in self.failed:
                self.failed += (backend,)

    def _release_backend(self) -> None:
        backend, lease = self.backend, self.lease
        if backend is not None and lease:
            self.lease = 0
            self.dispatcher.give_back(backend, lease)

    def _backend_name(self) -> str:
        return self.backend.name if self.backend is not None else "?"

    # -- Answering --------------------------------------------------------------

    def respond(self, status: int, ctype: bytes, body: bytes, *, extra: bytes = b"") -> None:
        """Answer from the gateway itself and finish the exchange."""
        if self.state is State.DONE:
            return
        if not self.request_complete:
            self.keep_alive = False
        self.status = status
        if self.http10 and self.keep_alive:
            extra += b"Connection: keep-alive\r\n"
        if self.request_id:
            extra += b"X-Request-ID: " + self.request_id + b"\r\n"
        data = framing.local_response(
            status, ctype, body, close=not self.keep_alive,
            head_only=self.method == b"HEAD", extra=extra,
        )
        self.client.write(data)
        self.finish()

    def respond_cached(self, entry: Entry) -> None:
        """Answer from the response cache: the stored bytes, no backend (called by the policy)."""
        if self.state is State.DONE:
            return
        self.status = entry.status
        extra = (b"X-Cache: HIT\r\nDate: " + framing.http_date() + b"\r\nX-Request-ID: "
                 + self.request_id + b"\r\n")
        head = framing.response_head(entry.status, b"", entry.headers, extra, not self.keep_alive)
        self.client.write(head + entry.body)
        self.finish()

    def respond_error(self, status: int, message: str, *, retry_after: int | None = None) -> None:
        """Answer an error in the route's own format (Ollama or OpenAI)."""
        ctype, body = error_body(self.api, status, message)
        extra = b""
        if retry_after is not None:
            extra = b"Retry-After: %d\r\n" % retry_after
        self.respond(status, ctype, body, extra=extra)

    def _error_now(self, status: int, message: str, close: bool,
                   retry_after: int | None = None) -> None:
        """An error answered without reading the rest of the body (413, 503)."""
        if close:
            self.keep_alive = False
        ctype, body = error_body(self.api, status, message)
        extra = b"Retry-After: %d\r\n" % retry_after if retry_after is not None else b""
        self._set_early_error(status, ctype, body, extra=extra, immediate=True)
        if self.active and self.state is not State.DONE:
            self._route()

    def finish(self) -> None:
        """Mark done and let the connection move to its next request."""
        if self.state is not State.DONE:
            self._end()
            self._ended(End.DONE)
        if not self.request_complete:
            self.keep_alive = False
        self.client.exchange_done(self)
