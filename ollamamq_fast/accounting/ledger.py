"""The ledger: the one place that counts what happened to a request.

Counters (gateway-wide and per user), token usage (the usage store and the
quota book), the latency and first-byte histograms and the access log are
written here and nowhere else. The exchange reports events; the ledger
decides what each one counts as. Every request ends exactly once, in one of
the `End` states, and gets exactly one access-log line.
"""

from __future__ import annotations

import enum
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

from mypy_extensions import mypyc_attr

from ollamamq_fast.state.tally import UsageTally
from ollamamq_fast.stats import GatewayStats, UserStats
from ollamamq_fast.wire.routes import EXACT

if TYPE_CHECKING:
    from ollamamq_fast.accesslog import AccessLog

# The status logged for a request whose client left before its answer ended
# (nginx's convention; no response with it is ever sent).
CLIENT_CLOSED: Final = 499


_HEX_BYTE: Final = tuple(b"%02x" % i for i in range(256))
_LABELS: Final = {path: path.decode() for path in EXACT}


def path_label(path: bytes) -> str:
    """A bounded metric label for a request path."""
    label = _LABELS.get(path)
    if label is not None:
        return label
    if path.startswith(b"/api/blobs/"):
        return "/api/blobs"
    if path.startswith(b"/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class End(enum.Enum):
    """How a request ended."""

    DONE = "done"  # answered (by a backend, the cache or the gateway), whatever the status
    REFUSED = "refused"  # refused by a limit, a quota, the queue bound or a block
    CANCELLED = "cancelled"  # the client left before the answer ended


class Quotas(Protocol):
    """The quota book's side of token counting (policy/engine.py)."""

    quotas_on: bool

    def tokens_used(self, user: str, prompt: int, completion: int) -> None:
        """A request finished with these counts."""
        ...


@mypyc_attr(allow_interpreted_subclasses=True)
class Record:
    """What the ledger reads of a request; the exchange is one (its base class).

    A class, not a Protocol: compiled, the ledger then reads these fields from
    the object's struct instead of looking each one up by name (about 3,000
    instructions a request). Tests' stand-ins subclass it.
    """

    __slots__ = ("client_ip", "completion_tokens", "in_flight_counted", "key_id", "method",
                 "model", "model_name", "path", "prompt_tokens", "queue_ms", "request_id",
                 "started_at", "status", "tokens_estimated", "user", "ustats")

    def __init__(self) -> None:
        self.user = ""
        self.client_ip = ""
        self.method = b""
        self.path = b""
        self.model: str | None = None
        self.model_name = ""
        self.status = 0
        self.queue_ms = 0
        self.started_at = 0.0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.request_id = b""  # X-Request-ID: the client's (if sane) or the gateway's
        self.ustats: UserStats | None = None
        self.in_flight_counted = False
        self.key_id = ""  # the API key's id, for usage rows and budgets; "" without one
        self.tokens_estimated = False  # set by `Ledger.tokens`


class Ledger:
    """Counts requests, tokens and end states; writes the access log."""

    def __init__(self, stats: GatewayStats, usage: UsageTally, quotas: Quotas,
                 access: AccessLog, loop_time: Callable[[], float]) -> None:
        self.stats = stats
        self.usage = usage
        self.quotas = quotas
        self.access = access
        # The access log's queue, appended to directly (a C-level append; a call
        # into the interpreted AccessLog.record cost more than the append).
        self.access_on: bool = access.enabled
        self.access_pending: list[tuple[Any, ...]] = access.pending
        self.access_max: int = access.max_pending
        # Typed (not Any), so the sums and differences of times below are
        # unboxed floats when compiled, not generic number calls.
        self.loop_time: Callable[[], float] = loop_time
        # Request ids: a random prefix per process and a counter, so ids are
        # unique across replicas and restarts without a random draw per request.
        # Shaped as a UUID (version 4 and variant bits set), because some
        # backends refuse any other X-Request-ID (llama-cpp-python: 400).
        r = secrets.token_hex(10)
        variant = "89ab"[int(r[15], 16) % 4]
        self.id_prefix = f"{r[:8]}-{r[8:12]}-4{r[12:15]}-{variant}{r[16:19]}-".encode()
        self.id_counter = 0
        self.id_head = b""
        # Wall time = loop time + offset: a millisecond-good timestamp for each
        # access line without a clock call per request beyond the loop's own.
        self.wall_offset: float = time.time() - loop_time()

    def request_id(self) -> bytes:
        """A fresh id for a request that brought no (sane) X-Request-ID of its own."""
        # prefix + the counter as 12 hex digits: the first ten change once in
        # 256 ids and are kept; the last two come from a table (a format call
        # per request cost more than the rest of this method).
        n = (self.id_counter + 1) & 0xFFFFFFFFFFFF
        self.id_counter = n
        low = n & 0xFF
        if low == 0 or not self.id_head:
            self.id_head = b"%s%010x" % (self.id_prefix, n >> 8)
        return self.id_head + _HEX_BYTE[low]

    def arrived(self, user: str, client_ip: str) -> UserStats:
        """A request of `user` is about to be admitted: their live record."""
        ustats = self.stats.user(user)
        ustats.last_ip = client_ip
        ustats.last_seen = self.loop_time() + self.wall_offset
        return ustats

    def refused(self, r: Record, reason: str = "") -> None:
        """A request was refused by a limit, a quota, the queue bound or its wait, or a block.

        `reason` names the usage-policy limit: "rate", "quota" or "in_flight".
        Counted gateway-wide and for its user alike (the sum of the users' is the
        gateway's), unless it had run on a backend already: a retry refused on
        its way back is an answer, counted done when it ends.
        """
        if r.in_flight_counted:
            return
        stats = self.stats
        stats.rejected += 1
        if reason == "rate":
            stats.rate_limited += 1
        elif reason == "quota":
            stats.quota_refused += 1
        elif reason == "in_flight":
            stats.limit_refused += 1
        ustats = r.ustats
        if ustats is not None:
            ustats.rejected += 1

    def admitted(self, capped: bool, cache_miss: bool) -> None:
        """The policy let a request through: whether a cap rewrote it, whether the cache missed."""
        if capped:
            self.stats.tokens_capped += 1
        if cache_miss:
            self.stats.cache_misses += 1

    def cache_hit(self) -> None:
        """A request was answered from the response cache."""
        self.stats.cache_hits += 1

    def queued(self, ustats: UserStats | None) -> None:
        """A request started waiting in its user's queue."""
        if ustats is not None:
            ustats.queued += 1

    def left_queue(self, ustats: UserStats | None) -> None:
        """A request left its user's queue (started, cancelled or expired)."""
        if ustats is not None:
            ustats.queued -= 1

    def waited(self, seconds: float) -> None:
        """A request waited this long for its slot before it started."""
        self.stats.queue_wait.observe(seconds)

    def running(self, r: Record) -> None:
        """The request was handed to a backend (counted in flight once, even across retries)."""
        ustats = r.ustats
        if ustats is not None and not r.in_flight_counted:
            r.in_flight_counted = True
            ustats.in_flight += 1

    def first_byte(self, started_at: float) -> None:
        """The response head went to the client."""
        if started_at:
            self.stats.ttfb.observe(self.loop_time() - started_at)

    def failover(self) -> None:
        """A request is tried again on another connection or backend."""
        self.stats.failovers += 1

    def tokens(self, r: Record, prompt: int, completion: int, estimated: bool = False) -> None:
        """A request's token counts: the backend's own, or `estimated` from its stream's events
        (a backend that ignores the usage request, or a stream cut short)."""
        r.prompt_tokens, r.completion_tokens = prompt, completion
        if not (prompt or completion):
            return
        r.tokens_estimated = estimated
        if estimated:
            self.stats.estimated_tokens += prompt + completion
            if r.ustats is not None:
                r.ustats.estimated_tokens += prompt + completion
        stats = self.stats
        stats.prompt_tokens += prompt
        stats.completion_tokens += completion
        ustats = r.ustats
        if ustats is not None:
            ustats.prompt_tokens += prompt
            ustats.completion_tokens += completion

    def ended(self, r: Record, end: End, backend: str) -> None:
        """The request's one and only end: counters, histograms, its access line."""
        stats = self.stats
        now = self.loop_time()
        wall = now + self.wall_offset
        elapsed = now - r.started_at if r.started_at else 0.0
        status = r.status if end is not End.CANCELLED else CLIENT_CLOSED
        ustats = r.ustats
        if end is End.CANCELLED:
            # Every request whose client left, queued or running: the same
            # count as the users' `dropped` and the usage rows' `cancelled`
            # (which the counters start from after a restart, keeper.py).
            stats.cancelled += 1
            if ustats is not None:
                ustats.dropped += 1
        else:
            stats.response(path_label(r.path), status, backend)
            if r.started_at:
                stats.latency.observe(elapsed)
        if ustats is not None:  # it reached admission: an inference request, in the usage rows
            self.usage.add_usage(r.user, r.model or r.model_name, r.prompt_tokens,
                                 r.completion_tokens, r.key_id, backend,
                                 end is not End.CANCELLED and status >= 400,
                                 end is End.CANCELLED, r.tokens_estimated,
                                 wall)
            # Counted for the quotas at the same instant as in the usage rows,
            # which the quota book re-reads: it can then tell exactly which of
            # its own counts a read of the store already holds (policy/quota.py).
            quotas = self.quotas
            if quotas.quotas_on and (r.prompt_tokens or r.completion_tokens):
                quotas.tokens_used(r.user, r.prompt_tokens, r.completion_tokens)
        # "done": answered by a backend (whatever its status) or from the cache.
        # The restart rebuilds it from the usage rows by the same rule (keeper.py).
        if r.in_flight_counted:
            r.in_flight_counted = False
            if ustats is not None:
                ustats.in_flight -= 1
                if end is End.DONE:
                    ustats.done += 1
        elif ustats is not None and end is End.DONE and status < 400:
            ustats.done += 1  # no backend and no error: a cache hit
        if self.access_on:
            pending = self.access_pending
            if len(pending) < self.access_max:
                # Milliseconds to two places; round(x, 2) costs twice this on every request.
                ms = int(elapsed * 100000.0 + 0.5) / 100
                pending.append((wall, r.user, r.client_ip, r.method, r.path,
                                r.model_name, status, backend, r.queue_ms, ms,
                                r.prompt_tokens, r.completion_tokens, r.request_id))
                if len(pending) == 1:
                    self.access.arm()  # the first line since the queue was empty
            else:
                self.access.dropped += 1
