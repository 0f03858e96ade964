"""One request/response exchange: the per-request driver.

A request goes, top to bottom in this file:

    head      `head_complete`: intake.py reads the head (path normalized as
              the backend reads it, headers sorted, the key checked before the
              route decides anything, pool and route checked) and returns
              None or the gateway's own answer, held until the body is read
    route     `_route`: local answer, model management, inference
    admit     admission.py reads the model (intake.py) and asks the usage
              policy (policy/gate.py): ADMIT, REFUSE, CACHED or PENDING
    queue     the dispatcher answers STARTED, QUEUED or REFUSED (`_submit`)
    start     `start`: a pooled connection (or a new one); forward.py writes
              the request's head and body
    relay     the upstream connection relays bytes; response.py builds the
              client's head and, at `response_complete`, counts the answer
    finish    the ledger records the one end of the request (`_ended`)

Each step's helper returns a value the driver acts on; none calls back.
Off the straight line, each in its own module: answers.py writes the
gateway's own answers (errors, local replies, cache hits); recovery.py
handles failures (retry before the first byte, an error frame after it, the
client leaving). Their entry points stay methods here (`respond_error`,
`upstream_lost`, `upstream_timeout`, `client_gone`): the dispatcher may not
import the data plane, and the backend connection calls the exchange as its
ResponseSink (upstream.py).

Where the request is in its life is `state.py`'s table: every move goes
through `_to`, which refuses one the table does not allow. Pauses and
resumes belong to flow.py, counters to the ledger, slots to the dispatcher.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final

from mypy_extensions import mypyc_attr

from ollamamq_fast.accounting.ledger import End
from ollamamq_fast.fleet.select import Balance
from ollamamq_fast.policy.gate import ADMIT, Admission, Verdict
from ollamamq_fast.proxy import admission, answers, forward, intake, recovery, response
from ollamamq_fast.proxy.state import State, advance
from ollamamq_fast.proxy.upstream import ResponseSink
from ollamamq_fast.sched.dispatcher import Placed
from ollamamq_fast.wire import framing
from ollamamq_fast.wire.errors import Api
from ollamamq_fast.wire.headers import RequestHead
from ollamamq_fast.wire.routes import Kind, Route

if TYPE_CHECKING:
    from ollamamq_fast.fleet.backend import Backend
    from ollamamq_fast.fleet.select import Fleet
    from ollamamq_fast.limits import Limits
    from ollamamq_fast.plane import DataPlane
    from ollamamq_fast.pools import Pool
    from ollamamq_fast.proxy.downstream import ClientProtocol
    from ollamamq_fast.proxy.intake import Early
    from ollamamq_fast.proxy.translating import TranslatingRelay
    from ollamamq_fast.proxy.transport import Transport
    from ollamamq_fast.proxy.upstream import UpstreamConnection
    from ollamamq_fast.sched.dispatcher import Dispatcher
    from ollamamq_fast.sched.fairqueue import Ticket

# Body bytes read and dropped after an early answer (401, 404...) before the
# connection is given up on: Go's server reads up to 256 KiB of an unread body
# to keep a connection, then closes it.
DISCARD_MAX: Final = 256 * 1024


# One request at a time on most connections: the freed exchange's memory is
# reused for the next one (mypyc keeps one; plain Python ignores this).
@mypyc_attr(free_list_len=1)
class Exchange(ResponseSink):
    """Per-request state and the logic that moves a request through the gateway.

    A ResponseSink (what its backend connection reports to), and so a Record
    (what the ledger reads): see upstream.py and accounting/ledger.py.
    """

    # The fields the ledger reads (Record) and http10 are the base classes'.
    __slots__ = (
        "active", "affinity", "api", "attempts", "backend", "body", "body_forwarded",
        "body_held", "body_size", "cache_control", "cache_key", "chosen", "chunked_in",
        "client", "connect_task", "content_length", "continue_sent", "cors", "credential",
        "discard_body", "discarded", "dispatcher", "early_error", "encoded_body", "enqueued_at",
        "expect_continue", "failed", "fleet", "fwd_headers", "gw", "keep_alive",
        "lease", "limits", "pool", "request_complete", "request_head", "route", "sent_at", "state",
        "stream_body", "strip_usage", "ticket", "upstream", "url", "xlate",
    )

    def __init__(self, client: ClientProtocol) -> None:
        super().__init__()  # the request's record (user, path, status, tokens...) and http10
        self.client = client
        gw: DataPlane = client.gw
        self.gw = gw
        # The pool the request is in (pools.py): the default one unless its
        # path or Host names another; its fleet and dispatcher serve it.
        self.pool: Pool = gw.default_pool
        self.fleet: Fleet = gw.fleet
        self.dispatcher: Dispatcher = gw.dispatcher
        self.state = State.RECEIVING
        self.active = False  # the request the connection answers now (pipelining order)
        # The request, as intake.py reads its head. X-Request-ID is the
        # client's (if sane) or the gateway's.
        self.url = self.fwd_headers = b""
        # A browser's allowed cross-origin request: the CORS lines of every answer (wire/cors.py).
        self.cors = b""
        # Read header by header as the parser meets them (ClientProtocol.on_header).
        self.request_head = RequestHead(gw.identity.keys_required)
        self.route: Route | None = None
        self.api = Api.OLLAMA
        self.keep_alive = True
        self.chunked_in = self.expect_continue = self.encoded_body = False
        self.stream_body = self.continue_sent = False
        self.content_length = -1
        # (status, content type, body, extra head lines, immediate) answered
        # instead of routing (intake.Early); an immediate one is answered
        # without reading the body (and closes the connection).
        self.early_error: Early | None = None
        # The body; body_held is what of it counts in the gateway's body budget.
        self.body: list[bytes] = []
        self.body_size = self.body_held = 0
        self.request_complete = self.discard_body = self.body_forwarded = False
        self.discarded = 0  # body bytes read and dropped after an early answer
        # Who asks: the user (or address), the API key's id (usage rows,
        # budgets), and the client's own credentials when the gateway does not
        # own them (auth off): part of the cache key, the backend may check them.
        self.credential = b""
        # Usage policy (policy/engine.py): the user's limits, the response-cache
        # key of a cacheable request, Cache-Control flags, and whether the
        # stream's injected usage must be stripped (1 chat, 2 per chunk).
        self.limits: Limits | None = None
        self.cache_key: bytes | None = None
        self.cache_control = self.strip_usage = 0
        self.affinity = ""
        # Queue, backend and connection. lease: what it holds of its backend
        # (dispatcher.SLOT / UNSLOTTED, or 0). failed: backends that failed
        # this request; a retry never goes back to them.
        self.ticket: Ticket | None = None
        self.enqueued_at = 0.0
        self.chosen: Backend | None = None
        self.backend: Backend | None = None
        self.lease = self.attempts = 0
        self.upstream: UpstreamConnection | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.failed: tuple[Backend, ...] = ()
        # The translating relay (proxy/translating.py) when the backend speaks the other API.
        self.xlate: TranslatingRelay | None = None
        self.sent_at = 0.0

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
        """The request head is parsed: read it, authenticate, check pool and route (intake.py)."""
        early = intake.read_head(self, method, keep_alive, http_11)
        if early is not None:
            self._hold(early)

    def _hold(self, early: Early) -> None:
        """Keep the gateway's own answer for when the body is read, so the
        connection stays usable; an immediate one (413, 503) closes it and is
        answered now if this is the request the connection answers."""
        self.early_error = early
        self.discard_body = True
        if early[4]:
            self.keep_alive = False
            if self.active and self.state is not State.DONE:
                self._route()

    def body_received(self, data: bytes) -> None:
        """A piece of request body (de-chunked by the parser): streamed on (forward.py) or held (intake.py)."""
        if self.discard_body:
            self.discarded += len(data)
            early = self.early_error
            if self.discarded > DISCARD_MAX and early is not None and not early[4]:
                # Not worth reading on to keep the connection (an endless body
                # would never be answered): answered now, and the connection
                # closes after it, as Go's server does past 256 KiB.
                self._hold((early[0], early[1], early[2], early[3], True))
            return
        self.body_size += len(data)
        if self.stream_body:
            forward.body_piece(self, data)
            return
        early = intake.hold_body(self, data)  # None, or 413/503: over a body limit
        if early is not None:
            self._drop_body()
            self._hold(early)

    def message_complete(self) -> None:
        """The whole request has been read."""
        self.request_complete = True
        if self.stream_body:
            forward.body_end(self)
        if self.active and self.state is State.RECEIVING:
            self._route()

    def activate(self) -> None:
        """This exchange is now the one the connection answers (pipelining order)."""
        self.active = True
        if self.state is State.DONE:
            return
        early = self.early_error
        if early is not None:
            # Answered once the body is read; at once when immediate, or when the
            # client waits on Expect: 100-continue (Go answers the final status
            # without reading the body; so do we).
            if early[4] or self.expect_continue or self.request_complete:
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
        """The client connection closed: stop everything this exchange holds (recovery.py)."""
        recovery.client_gone(self)

    # -- Route, admit, queue, start --------------------------------------------------

    def _route(self) -> None:
        early = self.early_error
        if early is not None:
            answers.respond(self, early[0], early[1], early[2], early[3])
            return
        route = self.route
        assert route is not None
        kind = route.kind
        if kind is Kind.LOCAL:
            self.gw.local.answer(self, route)
            return
        self.ustats = self.gw.ledger.arrived(self.user, self.client_ip)
        if self.gw.cache.any_blocked and self.gw.operator.is_blocked(self.user, self.client_ip):
            self.gw.ledger.refused(self)
            answers.respond_error(self, 403, "blocked by the gateway operator")
            return
        if kind is Kind.PRIMARY:
            backend = self.fleet.primary(native=route.native)
            if backend is None:
                answers.respond_error(self, 503, "no Ollama backend is online" if route.native
                                      else "no backend is online", retry_after=5)
                return
            self.start(backend, slotted=False)
            return
        verdict = admission.admit(self, route)  # the model read, the policy asked; None: answered
        if verdict is ADMIT or (verdict is not None and self._admitted(verdict)):
            self._queue()

    def _admitted(self, a: Admission) -> bool:
        """Whether the request goes on to the dispatcher (admission.py acts on the verdict)."""
        if a.kind is Verdict.PENDING:
            assert a.pending is not None
            a.pending.add_done_callback(self._settled)
            return False
        return admission.admitted(self, a)

    def _settled(self, future: asyncio.Future[Admission]) -> None:
        # A PENDING admission resolved; the client may have left meanwhile.
        if self.state is State.DONE or future.cancelled():
            return
        verdict = admission.settled(self, future)
        if verdict is not None and self._admitted(verdict):
            self._queue()

    def _queue(self) -> None:
        """Hand the admitted request to the dispatcher."""
        if self.fleet.balance is Balance.AFFINITY:
            self.affinity = admission.affinity(self)
        self._submit()

    def _submit(self) -> None:
        placement = self.dispatcher.submit(self)
        kind = placement.kind
        if kind is Placed.STARTED:
            assert placement.backend is not None
            self.start(placement.backend, placement.slotted)
        elif kind is Placed.REFUSED:
            admission.refused(self, placement)
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
            self._send(conn, backend)  # WAITING: the request is on the wire
        else:
            self.connect_task = self.gw.loop.create_task(self._connect(backend))

    def _send(self, conn: UpstreamConnection, backend: Backend) -> None:
        """Write the request on `conn` (forward.py); a bug of the gateway's on the way
        fails this request alone, as one in a request callback does: a 500 and the
        connection closed (the ledger then ends it, and its slot is given back). Run
        from the connect task, it would otherwise hang the client and hold the slot
        for ever; from the dispatcher's pump, it would break another request's answer."""
        try:
            forward.send(self, conn, backend)
        except Exception as exc:  # noqa: BLE001 - a bug; OSError included: never a hang
            if self.upstream is not conn:
                conn.close()  # not handed to the request yet: nothing else closes it
            self.client.internal_error(exc)

    async def _connect(self, backend: Backend) -> None:
        assert backend.pool is not None
        try:
            conn = await backend.pool.connect()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - OSError, a timeout, or a bug: never a hang
            self.connect_task = None
            if self.state is State.CONNECTING:
                recovery.failed_before_response(self, None, exc)
            return
        self.connect_task = None
        if self.state is not State.CONNECTING:
            conn.close()
            return
        self._send(conn, backend)

    # -- Relay and finish (called by UpstreamConnection) -----------------------------

    @property
    def client_transport(self) -> Transport | None:
        """Where response bytes go; None once the client is gone."""
        return self.client.transport if self.state is not State.DONE else None

    def response_head(self, conn: UpstreamConnection) -> bytes | None:
        """The head for the client (response.py), or None: a fast 502/503/504 is
        not relayed when another backend can take the request instead, nor a 500
        to a body that is not JSON (answered 400 here; recovery.py)."""
        status = conn.status
        backend = self.backend
        assert backend is not None
        if status in (502, 503, 504) and recovery.retried_on_status(self, conn, backend, status):
            return None
        if status == 500 and recovery.refused_unreadable_body(self, conn):
            return None
        return response.head(self, conn, backend)

    def upstream_continue(self, conn: UpstreamConnection) -> None:
        """Nothing to do: the gateway answers Expect itself and never forwards it."""

    def response_complete(self, conn: UpstreamConnection) -> None:
        """The backend's response ended; recycle the connection, count it (response.py), finish."""
        self.upstream = None
        conn.finish_response(reusable=self.request_complete)
        backend = self.backend
        if backend is not None:
            response.completed(self, conn, backend)
        self._release_backend()
        self.finish()

    def _ended(self, end: End) -> None:
        backend = self.backend
        self.gw.ledger.ended(self, end, backend.name if backend is not None else "")

    def _release_backend(self) -> None:
        backend, lease = self.backend, self.lease
        if backend is not None and lease:
            self.lease = 0
            self.dispatcher.give_back(backend, lease)

    # -- Failures and the gateway's own answers: recovery.py, answers.py ---------------

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        """The backend connection closed before the response ended."""
        recovery.upstream_lost(self, conn, exc)

    def upstream_timeout(self) -> None:
        """The backend was silent longer than --timeout (called by the reaper)."""
        recovery.upstream_timeout(self)

    def respond(self, status: int, ctype: bytes, body: bytes, *, extra: bytes = b"") -> None:
        """Answer from the gateway itself and finish the exchange."""
        answers.respond(self, status, ctype, body, extra)

    def respond_error(self, status: int, message: str, *, retry_after: int | None = None) -> None:
        """Answer an error in the route's own format (Ollama or OpenAI)."""
        answers.respond_error(self, status, message, retry_after)

    def finish(self) -> None:
        """Mark done and let the connection move to its next request."""
        if self.state is not State.DONE:
            self._end()
            self._ended(End.DONE)
        if not self.request_complete:
            self.keep_alive = False
        self.client.exchange_done(self)
