"""Per-user token-bucket request rate, checked locally and shared across replicas.

The check (`RateLimiter.take`) is synchronous and local: a dict lookup and a
few float operations, never a store call. With several replicas on one Redis
each replica keeps its own bucket per user and a background task reconciles
every `SYNC_INTERVAL_S`:

* it pushes the requests it admitted since the last round into a per-user
  counter for the current wall-clock epoch (`incr_window`), which returns the
  total all replicas pushed into that epoch;
* the growth of that total beyond its own push is the other replicas'
  consumption since the last round, and is taken out of the local bucket (which
  may then go negative: a debt repaid by the refill, bounded at -burst).

So every replica's bucket follows the global one with a lag of one round plus
a Redis round trip. The approximation, in numbers:

* Lag: requests admitted elsewhere are seen here up to ~100 ms later. A burst
  that hits N replicas within the same round can be admitted up to N x burst
  in all; after that the shared rate holds (debts make up for the overshoot).
* First sight: a replica that has never seen the user starts from a full
  bucket; at its first round it takes out what the others pushed in the
  current and the previous epoch (1-2 s, conservative: consumption that the
  refill has already paid back may be counted again, at most rate x 2 s).
* Epoch change: the last counts of the old epoch are read once more, so
  nothing is lost across the boundary.
* Redis unreachable: each replica limits alone (its pushes are kept and sent
  when Redis is back); admission never waits.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable

from ollamamq_fast.tasks import cancel_and_wait

log = logging.getLogger("ollamamq_fast.policy")

# How often local consumption is pushed and the global totals pulled: the lag
# of the shared limit. 100 ms keeps overshoot small at one Redis call per
# active user per round.
SYNC_INTERVAL_S = 0.1
# Length of one shared counter's epoch (wall clock, so replicas agree). Short,
# because the first-sight deduction looks back over up to two epochs.
EPOCH_S = 1.0
# A counter must outlive its epoch even when first hit late in it.
EPOCH_TTL_S = 3 * EPOCH_S
# Buckets full and untouched this long are forgotten (a full bucket is the state
# of a user never seen, so nothing is lost).
IDLE_FORGET_S = 60.0
# Warnings about an unreachable store at most this often.
WARN_EVERY_S = 10.0

IncrWindow = Callable[[str, float, float], Awaitable[float]]


class _Bucket:
    """One user's bucket plus what the reconciler knows of the shared counter."""

    __slots__ = ("burst", "epoch", "pending", "rate", "seen", "stamp", "tokens", "touched")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.stamp = now
        self.rate = 0.0
        self.burst = burst
        self.pending = 0  # admitted here, not pushed yet
        self.epoch = -1  # epoch of `seen`; -1 before the first round
        self.seen = 0.0  # the shared counter's total after our last push
        self.touched = now

    def level(self, now: float) -> float:
        """Tokens now, after the refill since the last update."""
        return min(self.burst, self.tokens + (now - self.stamp) * self.rate)


class RateLimiter:
    """Token buckets per user; `take` is the data plane's check."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.buckets: dict[str, _Bucket] = {}
        self.shared = False  # set when a reconciler runs: count pushes

    def take(self, user: str, rate: float, burst: float) -> float:
        """Admit one request: 0.0, or the seconds until a token is available."""
        now = self.clock()
        b = self.buckets.get(user)
        if b is None:
            b = self.buckets[user] = _Bucket(burst, now)
        b.rate = rate
        b.burst = burst
        tokens = b.level(now)
        b.stamp = now
        b.touched = now
        if tokens >= 1.0:
            b.tokens = tokens - 1.0
            if self.shared:
                b.pending += 1
            return 0.0
        b.tokens = tokens
        return (1.0 - tokens) / rate

    def forget_idle(self) -> None:
        """Drop full, idle buckets (called by the reconciler or the reaper)."""
        now = self.clock()
        stale = [
            u for u, b in self.buckets.items()
            if not b.pending and now - b.touched > IDLE_FORGET_S and b.level(now) >= b.burst
        ]
        for u in stale:
            del self.buckets[u]


def retry_after(wait_s: float) -> int:
    """Retry-After in whole seconds, rounded up, at least 1 (RFC 9110 §10.2.3)."""
    return max(1, math.ceil(wait_s))


class RateSync:
    """Background reconciliation of the local buckets through the store's window counters."""

    def __init__(self, limiter: RateLimiter, incr: IncrWindow,
                 wall: Callable[[], float] = time.time) -> None:
        self.limiter = limiter
        self.incr = incr
        self.wall = wall
        self.task: asyncio.Task[None] | None = None
        self.rounds = 0
        self._warned = 0.0

    def start(self) -> None:
        """Start reconciling (called by the Policy when a Redis store is shared)."""
        self.limiter.shared = True
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._loop(), name="ollamamq-ratesync")

    async def stop(self) -> None:
        """Stop the background task."""
        task, self.task = self.task, None
        await cancel_and_wait(task)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL_S)
            try:
                await self.sync_once()
            except Exception as exc:  # noqa: BLE001 -- a store failure must not stop the loop
                now = time.monotonic()
                if now - self._warned > WARN_EVERY_S:
                    self._warned = now
                    log.warning("rate limits: cannot reach the shared store (%s); "
                                "limiting per replica until it is back", exc)

    async def sync_once(self) -> None:
        """One round: push local consumption, pull others', for every user that needs it."""
        limiter = self.limiter
        now = limiter.clock()
        work = [
            (u, b) for u, b in limiter.buckets.items()
            if b.pending or b.level(now) < b.burst
        ]
        self.rounds += 1
        if self.rounds % 50 == 0:
            limiter.forget_idle()
        if not work:
            return
        epoch = int(self.wall() // EPOCH_S)
        results = await asyncio.gather(
            *(self._sync_user(u, b, epoch) for u, b in work), return_exceptions=True
        )
        for r in results:
            if isinstance(r, Exception):
                raise r

    async def _sync_user(self, user: str, b: _Bucket, epoch: int) -> None:
        pushed, b.pending = b.pending, 0
        try:
            others = 0.0
            if b.epoch != epoch:
                # New epoch, or first sight: read the previous epoch's counter once
                # (the tail we have not seen, or everything on first sight).
                previous = await self.incr(_key(user, epoch - 1), EPOCH_TTL_S, 0.0)
                seen_before = b.seen if b.epoch == epoch - 1 else 0.0
                others += max(0.0, previous - seen_before)
                b.seen = 0.0
            total = await self.incr(_key(user, epoch), EPOCH_TTL_S, float(pushed))
        except BaseException:
            b.pending += pushed  # pushed again next round
            raise
        others += max(0.0, total - b.seen - pushed)
        b.epoch = epoch
        b.seen = total
        if others:
            now = self.limiter.clock()
            b.tokens = max(-b.burst, b.level(now) - others)
            b.stamp = now


def _key(user: str, epoch: int) -> str:
    return f"rl:{epoch}:{user}"
