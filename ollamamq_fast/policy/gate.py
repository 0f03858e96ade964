"""What admission answers: one value the exchange acts on, never a callback.

The usage policy (`engine.Policy.admit`) looks at an inference request once
its model is known and returns one of:

- `ADMIT` (the shared value: nothing to change, the usual request), or an
  `Admission` of kind ADMIT carrying the rewritten body, the cache key and the
  stream-usage filter to apply;
- REFUSE: answer `status` with `message` (and `Retry-After`);
- CACHED: answer with the stored `entry`, no backend;
- PENDING: a Redis cache lookup is under way; `pending` resolves to one of the
  above. The exchange checks, when it does, that its client is still there.

Nothing here touches a socket or an exchange, so the policy can be tested
with plain values and the exchange reads top to bottom.
"""

from __future__ import annotations

import asyncio
import enum
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from ollamamq_fast.policy.cache import Entry


class Verdict(enum.Enum):
    """The kind of an admission answer."""

    ADMIT = "admit"
    REFUSE = "refuse"
    CACHED = "cached"
    PENDING = "pending"


class Admission:
    """One admission answer; build it with the functions below."""

    __slots__ = ("body", "cache_key", "cache_miss", "capped", "entry", "kind", "message",
                 "pending", "reason", "rejected", "retry_after", "status", "strip_usage")

    def __init__(self, kind: Verdict) -> None:
        self.kind = kind
        # ADMIT: the body to forward (None: unchanged), the response-cache key of
        # a cacheable request, and how the stream's injected usage is stripped
        # (0 none, 1 the chat event, 2 also a member of every chunk).
        self.body: bytes | None = None
        self.cache_key: bytes | None = None
        self.strip_usage = 0
        # What the ledger counts: a cap rewrote the body; a cache lookup missed.
        self.capped = False
        self.cache_miss = False
        # REFUSE
        self.status = 0
        self.message = ""
        self.retry_after: int | None = None
        self.rejected = False  # counts as a refusal by the policy (not a bad request)
        self.reason = ""  # which limit refused it: "rate", "quota" or "in_flight"
        # CACHED
        self.entry: Entry | None = None
        # PENDING
        self.pending: asyncio.Future[Admission] | None = None


ADMIT: Final = Admission(Verdict.ADMIT)


def admitted(body: bytes | None, cache_key: bytes | None, strip_usage: int,
             capped: bool = False, cache_miss: bool = False) -> Admission:
    """Go on to the dispatcher with these changes (the shared ADMIT when there are none)."""
    if body is None and cache_key is None and not strip_usage:
        return ADMIT
    a = Admission(Verdict.ADMIT)
    a.body = body
    a.cache_key = cache_key
    a.strip_usage = strip_usage
    a.capped = capped
    a.cache_miss = cache_miss
    return a


def refused(status: int, message: str, retry_after: int | None = None,
            rejected: bool = True, reason: str = "") -> Admission:
    """Answer `status` now; `rejected` counts it as the policy's refusal, `reason` by which limit."""
    a = Admission(Verdict.REFUSE)
    a.status = status
    a.message = message
    a.retry_after = retry_after
    a.rejected = rejected
    a.reason = reason
    return a


def cached(entry: Entry) -> Admission:
    """Answer from the response cache."""
    a = Admission(Verdict.CACHED)
    a.entry = entry
    return a


def pending(future: asyncio.Future[Admission]) -> Admission:
    """The answer comes later (a remote cache lookup)."""
    a = Admission(Verdict.PENDING)
    a.pending = future
    return a
