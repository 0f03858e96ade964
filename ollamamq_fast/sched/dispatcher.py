"""Binds the next fair request to a free backend slot that serves its model.

Runs whenever a request arrives or a slot frees (no polling). Requests that
failed on a backend before any response byte wait in a small retry line that
is served before the fair queue: they already had their turn.
"""

from __future__ import annotations

import asyncio
import enum
import math
from collections import deque
from typing import TYPE_CHECKING, Final, Protocol, cast

from ollamamq_fast.fleet.backend import Breaker
from ollamamq_fast.sched.fairqueue import FairQueue
from ollamamq_fast.wire.routes import Kind, Route


class SharedSlotsHook(Protocol):
    """What the dispatcher tells the Redis slot sharing (sched/shared_slots.py), when on."""

    def charge(self, user: str, queue: FairQueue) -> None:
        """A slotted request of `user` starts from `queue` (its service is counted fleet-wide)."""

    def wanted(self) -> None:
        """Requests wait in the queue: lease more slots."""

    def gave_back(self, backend: Backend) -> None:
        """A slot of `backend` freed (it may be handed to another replica)."""


if TYPE_CHECKING:
    from ollamamq_fast.config import Settings
    from ollamamq_fast.fleet.backend import Backend
    from ollamamq_fast.fleet.select import Fleet
    from ollamamq_fast.proxy.exchange import Exchange


class Placed(enum.Enum):
    """What `submit` decided."""

    STARTED = "started"
    QUEUED = "queued"
    REFUSED = "refused"


class Placement:
    """`submit`'s answer: STARTED on `backend`, QUEUED, or REFUSED with an error to answer."""

    __slots__ = ("backend", "kind", "message", "rejected", "retry_after", "slotted", "status")

    def __init__(self, kind: Placed) -> None:
        self.kind = kind
        self.backend: Backend | None = None
        self.slotted = False
        self.status = 0
        self.message = ""
        self.retry_after: int | None = None
        self.rejected = False  # a refusal by the gateway's limits (queue full), counted


QUEUED: Final = Placement(Placed.QUEUED)

# What a running request holds of its backend: one of its slots (inference),
# or a place among the unslotted requests (model management, blobs).
SLOT: Final = 1
UNSLOTTED: Final = 2


def started(backend: Backend, slotted: bool) -> Placement:
    """Run now on `backend` (taking one of its slots when `slotted`)."""
    p = Placement(Placed.STARTED)
    p.backend = backend
    p.slotted = slotted
    return p


class _StartedCache:
    """The two STARTED answers of each backend, made once (answers are never changed)."""

    __slots__ = ("slotted", "unslotted")

    def __init__(self) -> None:
        self.slotted: dict[Backend, Placement] = {}
        self.unslotted: dict[Backend, Placement] = {}

    def get(self, backend: Backend, slotted: bool) -> Placement:
        table = self.slotted if slotted else self.unslotted
        p = table.get(backend)
        if p is None:
            if len(table) > 4096:  # backends come and go at run time: stay bounded
                table.clear()
            p = table[backend] = started(backend, slotted)
        return p


def refused(status: int, message: str, retry_after: int | None = None,
            rejected: bool = False) -> Placement:
    """Answer this error now."""
    p = Placement(Placed.REFUSED)
    p.status = status
    p.message = message
    p.retry_after = retry_after
    p.rejected = rejected
    return p


class Dispatcher:
    """The scheduler's front: admission to the fair queue and dispatch out of it."""

    def __init__(
        self, fleet: Fleet, settings: Settings, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.fleet = fleet
        self.settings = settings
        self.loop = loop
        self.queue = FairQueue()
        self.queue.grant(settings.vip_users, settings.boost_users, settings.user_weights)
        self.retry_line: deque[Exchange] = deque()
        # Set when slots are shared with other replicas through Redis (--redis).
        self.shared: SharedSlotsHook | None = None
        self._started = _StartedCache()
        self.retry_scheduled = False
        self.pumping = False
        # Models found with no free backend during a pump, per route (see
        # _can_run); emptied whenever a request starts and when the pump ends.
        self._blocked: dict[Route, set[str | None]] = {}
        self.dispatched = 0
        self.rejected_full = 0
        self.expired = 0

    # -- Admission --------------------------------------------------------------

    def submit(self, ex: Exchange) -> Placement:
        """Where a request whose model is known goes now (called by the exchange).

        STARTED: run it on `backend` at once; QUEUED: it waits in its user's
        queue and the dispatcher starts it when a slot frees; REFUSED: answer
        the error.
        """
        route = ex.route
        assert route is not None
        fleet = self.fleet
        model = ex.model
        native = route.native
        if model is None:
            # The model could not be read (compressed body): any backend of the
            # route's kind may take it, through the fair queue like the rest.
            if not fleet.any_online():
                return self._no_backend_for(ex)
        elif route.kind is Kind.MODEL:
            # Model management is not queued. An unknown model goes to the
            # primary backend, which answers with authority (404, or success
            # for a model created since the last probe).
            if fleet.serves(model, native):
                backend = fleet.pick_unslotted(model, native, ex.failed, route.native_first)
            elif route.any_backend:
                backend = fleet.pick_unslotted(None, native, ex.failed)
            else:
                backend = fleet.primary(native or route.native_first)
            if backend is None:
                return self._no_backend_for(ex)
            return self._started.get(backend, False)
        elif not fleet.serves(model, native):
            return self._no_backend_for(ex)
        if not self.queue and not self.retry_line:
            # Nobody is waiting, so this request is next in fair order anyway.
            backend = fleet.pick(model, native, ex.affinity, ex.failed, route.native_first)
            if backend is not None:
                self.dispatched += 1
                self.queue.served(ex.user)  # the newcomer rule counts this dispatch
                if self.shared is not None:
                    self.shared.charge(ex.user, self.queue)
                return self._started.get(backend, True)
        settings = self.settings
        if len(self.queue) >= settings.max_queue:
            self.rejected_full += 1
            return refused(429, f"the gateway queue is full ({settings.max_queue} requests)",
                           5, rejected=True)
        # The user's max_queued (limits.py; defaults to --max-queue-per-user, 0 = none).
        per_user = ex.limits.max_queued if ex.limits is not None else settings.max_queue_per_user
        if per_user and self.queue.depth(ex.user) >= per_user:
            self.rejected_full += 1
            return refused(429, f"too many queued requests for user {ex.user!r} "
                                f"(at most {per_user})", 5, rejected=True)
        now = self.loop.time()
        ex.enqueued_at = now
        ex.enter_queue()
        ex.ticket = self.queue.push(ex.user, ex, now)
        ex.gw.ledger.queued(ex.ustats)
        self.pump()
        if self.shared is not None and ex.ticket is not None:
            self.shared.wanted()
        return QUEUED

    def _no_backend_for(self, ex: Exchange) -> Placement:
        route = ex.route
        native = route.native if route is not None else True
        candidates = self.fleet.candidates(ex.model, native)
        listed = [b for b in candidates if b.online]
        if not self.fleet.any_up():
            return refused(503, "no backend is online", 5)
        if not self.fleet.any_online() and ex.model is None:
            return refused(503, "no backend is available right now (draining or failing)", 5)
        if listed:
            # Known model, but every backend serving it is draining or failing.
            return refused(503, f"every backend serving '{ex.model_name}' is unavailable "
                                "(draining or failing); retry shortly", 5)
        if candidates and ex.model is not None:
            # Its backends are offline (the probes fail): the model is not
            # unknown, and they may be back in a moment (a restart). Not a 404,
            # which clients take for good and do not retry.
            return refused(503, f"every backend serving '{ex.model_name}' is offline; "
                                "retry shortly", 5)
        if ex.model in ex.pool.pulling:
            # A required model on its way (fleet/required.py): not a client error.
            return refused(503, f"model '{ex.model_name}' is being pulled to the backends; "
                                "retry shortly", 30)
        if native and route is not None and route.kind is Kind.MODEL:
            # Pull, create, copy, delete, push: Ollama backends only, and the
            # model may well be served by an OpenAI-compatible one.
            if not any(b.online for b in self.fleet.candidates(None, True)):
                return refused(501, "managing models (pull, create, copy, delete, push) needs "
                                    "an Ollama backend, and none is online")
            if self.fleet.candidates(ex.model, False):
                return refused(501, f"model '{ex.model_name}' is served by OpenAI-compatible "
                                    "backends only; an Ollama backend is needed to manage it")
        return refused(404, f"model '{ex.model_name}' not found")

    # -- Dispatch ---------------------------------------------------------------

    def _can_run(self, payload: object) -> bool:
        ex: Exchange = payload  # type: ignore[assignment]
        route = ex.route
        assert route is not None
        failed = ex.failed
        blocked: set[str | None] | None = None
        if not failed:
            # Whether a backend is free for a model depends on the model and the
            # route only (affinity picks among free ones): once one user's oldest
            # request found none, the others' for that model are skipped at a set
            # look-up. Many users waiting for a busy model while another backend
            # is free made each pump a fleet.pick per user (O(users) picks on
            # every arrival and every freed slot).
            blocked = self._blocked.get(route)
            if blocked is None:
                blocked = self._blocked[route] = set()
            elif ex.model in blocked:
                ex.chosen = None
                return False
        backend = self.fleet.pick(ex.model, route.native, ex.affinity, failed,
                                  route.native_first)
        ex.chosen = backend
        if backend is None and blocked is not None:
            blocked.add(ex.model)
        return backend is not None

    def pump(self) -> None:
        """Start queued requests while backends have free slots."""
        if self.pumping:
            return
        self.pumping = True
        try:
            fleet = self.fleet
            if fleet.models_gone:
                fleet.models_gone = False
                self._answer_unlisted()
            line = self.retry_line
            # Every retry that can run now starts, in order; one whose backends
            # are busy does not hold up the others (of other models) behind it.
            for _ in range(len(line)):
                ex = line.popleft()
                if self._can_run(ex):
                    self._start(ex)
                elif self._no_other_backend(ex):
                    self._give_up(ex)
                else:
                    line.append(ex)
            queue = self.queue
            while queue and fleet.has_free_slot():
                ticket = queue.pop(self._can_run)
                if ticket is None:
                    break
                ex = cast("Exchange", ticket.payload)
                ex.ticket = None
                ex.gw.ledger.left_queue(ex.ustats)
                self._start(ex)
        finally:
            self._blocked.clear()
            self.pumping = False

    def _no_other_backend(self, ex: Exchange) -> bool:
        """Whether no backend that has not failed this retry can take it any more (the
        one it waited for went offline or is draining; a tripped breaker closes again)."""
        route = ex.route
        assert route is not None
        for b in self.fleet.candidates(ex.model if route.kind is not Kind.PRIMARY else None,
                                       route.native):
            if b.online and not b.draining and b not in ex.failed:
                return False
        return True

    def _give_up(self, ex: Exchange) -> None:
        """A retry no backend can take: the 502 it would have had with no other backend,
        now rather than at --queue-timeout."""
        ex.queue_ms = int((self.loop.time() - ex.enqueued_at) * 1000)
        name = ex.backend.name if ex.backend is not None else "?"
        ex.respond_error(502, f"backend {name} failed before answering, and no other "
                              "backend that serves the request is available", retry_after=5)

    def _unlisted(self, payload: object) -> bool:
        ex: Exchange = payload  # type: ignore[assignment]
        route = ex.route
        return (route is not None and ex.model is not None
                and not self.fleet.candidates(ex.model, route.native))

    def _answer_unlisted(self) -> None:
        """Answer the waiting requests whose model no backend lists any more (its
        backends were removed, or came back without it): what a new request for it
        gets (404, or 503 while a required model is pulled), not a wait until
        --queue-timeout for a backend that will never take them."""
        now = self.loop.time()
        for ticket in self.queue.take_where(self._unlisted):
            ex = cast("Exchange", ticket.payload)
            ex.ticket = None
            ex.gw.ledger.left_queue(ex.ustats)
            ex.queue_ms = int((now - ex.enqueued_at) * 1000)
            placement = self._no_backend_for(ex)
            ex.respond_error(placement.status, placement.message,
                             retry_after=placement.retry_after)
        line = self.retry_line
        for _ in range(len(line)):
            ex = line.popleft()
            if self._unlisted(ex):
                ex.resubmit()  # refused as a new request would be
            else:
                line.append(ex)

    def _start(self, ex: Exchange) -> None:
        # A start may free capacity at once (a request refused or failing on the
        # spot gives its slot back): what _can_run found blocked is asked again.
        self._blocked.clear()
        backend = ex.chosen
        assert backend is not None
        ex.chosen = None
        if ex.gw.cache.any_blocked and ex.gw.operator.is_blocked(ex.user, ex.client_ip):
            # Blocked while it waited: refuse it now rather than run it.
            ex.gw.ledger.refused(ex)
            ex.respond_error(403, "blocked by the gateway operator")
            return
        if ex.enqueued_at:
            waited = self.loop.time() - ex.enqueued_at
            ex.queue_ms = int(waited * 1000)
            ex.gw.ledger.waited(waited)
        self.dispatched += 1
        route = ex.route
        assert route is not None
        slotted = route.kind is Kind.QUEUED
        if slotted and self.shared is not None:
            self.shared.charge(ex.user, self.queue)
        ex.start(backend, slotted=slotted)

    def take(self, backend: Backend, slotted: bool) -> int:
        """A request starts on `backend`: the lease it holds until `give_back`."""
        if slotted:
            backend.in_flight += 1
            lease = SLOT
        else:
            backend.unslotted += 1
            lease = UNSLOTTED
        if backend.breaker is Breaker.HALF_OPEN:
            backend.refresh()  # its one trial runs: no other request until it ends
        return lease

    def give_back(self, backend: Backend, lease: int) -> None:
        """A request is done with its backend (called by the exchange, once per lease)."""
        if lease == SLOT:
            backend.in_flight -= 1
            if backend.breaker is Breaker.HALF_OPEN:
                backend.refresh()  # a trial ended with no verdict: the next request is one
            if self.shared is not None:
                self.shared.gave_back(backend)
            pumps = backend.pumps
            if pumps:
                # Listed by several pools (pools.py): each may use the slot, the
                # other pools first. Offered to this pool first, the slot would
                # stay with it while it is backlogged, however long the other
                # pools' queues wait: pools that share a backend alternate.
                n = len(pumps)
                mine = pumps.index(self) if self in pumps else n - 1
                for i in range(1, n + 1):
                    pumps[(mine + i) % n].pump()
            elif self.queue or self.retry_line:
                self.pump()
        elif lease == UNSLOTTED:
            backend.unslotted -= 1
            if backend.breaker is Breaker.HALF_OPEN:
                backend.refresh()
                if self.queue or self.retry_line:
                    self.pump()

    def retry(self, ex: Exchange) -> None:
        """Run a request again after its backend failed before answering (called by the exchange).

        The request waits in the retry line and is started from the dispatcher's
        own next turn on the loop, never inside the failed connection's callback.
        """
        ex.gw.ledger.failover()
        ex.enter_queue()
        if not ex.enqueued_at:
            ex.enqueued_at = self.loop.time()
        self.retry_line.append(ex)
        if self.shared is not None:
            self.shared.wanted()
        if not self.retry_scheduled:
            self.retry_scheduled = True
            self.loop.call_soon(self._run_retries)

    def _run_retries(self) -> None:
        self.retry_scheduled = False
        line = self.retry_line
        for _ in range(len(line)):
            ex = line.popleft()
            route = ex.route
            assert route is not None
            if route.kind is not Kind.QUEUED or (
                    ex.model is not None and not self.fleet.serves(ex.model, route.native)):
                ex.resubmit()  # model management is picked again, unslotted; or refused
            else:
                line.append(ex)
        self.pump()

    def cancel(self, ex: Exchange) -> None:
        """The client of a waiting request left: forget it, O(1)."""
        ticket = ex.ticket
        if ticket is not None:
            ex.ticket = None
            self.queue.cancel(ticket)
            ex.gw.ledger.left_queue(ex.ustats)
        elif ex in self.retry_line:
            self.retry_line.remove(ex)

    # -- Housekeeping ----------------------------------------------------------

    def refuse_all(self, message: str) -> None:
        """Answer every waiting request 503 (the gateway stops: its drain is over)."""
        now = self.loop.time()
        for ticket in self.queue.expired(math.inf):
            self._turn_away(cast("Exchange", ticket.payload), now, True, message, 1)
        while self.retry_line:
            self._turn_away(self.retry_line.popleft(), now, False, message, 1)

    def sweep(self, now: float) -> None:
        """Answer 503 to requests that waited longer than --queue-timeout (reaper tick)."""
        limit = self.settings.queue_timeout
        if limit <= 0:
            return
        for ticket in self.queue.expired(now - limit):
            self.expired += 1
            self._turn_away(cast("Exchange", ticket.payload), now, True,
                            f"request waited more than {limit:g} s in the queue", 10)
        while self.retry_line and now - self.retry_line[0].enqueued_at > limit:
            self.expired += 1
            self._turn_away(self.retry_line.popleft(), now, False,
                            "no backend could take the request in time", 10)

    @staticmethod
    def _turn_away(ex: Exchange, now: float, queued: bool, message: str,
                   retry_after: int) -> None:
        """Answer 503 to a request that waited: in the queue (it leaves the queue and
        is counted refused), or in the retry line (it ran on a backend already)."""
        if queued:
            ex.ticket = None
            ex.gw.ledger.left_queue(ex.ustats)
            ex.gw.ledger.refused(ex)
        ex.queue_ms = int((now - ex.enqueued_at) * 1000)
        ex.respond_error(503, message, retry_after=retry_after)
