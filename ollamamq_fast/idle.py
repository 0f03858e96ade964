"""Idle users are forgotten: their counters in memory and their usage in the store.

Every distinct user id a client sends (or every client address, with auth
off) leaves per-user counters in memory and usage rows in the store. A user
is *idle* when it sent no request for `user_idle_days` (default 30; 0 =
never prune) and the operator gave it nothing to keep: no settings or limits
(admin API or config file), no API key, no block, no VIP / Boost / weight.
An idle user's counters are dropped from memory and its usage rows from the
store, once an hour. Usage of users that are kept stays for ever.

While a default `quota_total` is configured (it applies to every user and
counts all their usage), nothing is deleted from the store: pruning would
give an idle user its whole quota back. Likewise, while a default
`quota_month` is, the current month's usage is kept.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from ollamamq_fast.state.records import utc_day
from ollamamq_fast.tasks import cancel_and_wait

if TYPE_CHECKING:
    from ollamamq_fast.gateway import GatewayState

log = logging.getLogger("ollamamq_fast")

PRUNE_EVERY_S = 3600.0
# The first pass waits this long after the start (the store and quotas load first).
FIRST_PASS_S = 60.0
SECONDS_PER_DAY = 86400.0


class IdlePruner:
    """Drops idle users from memory and the store, hourly (started by the gateway)."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self._task: asyncio.Task[None] | None = None
        self.pruned_memory = 0
        self.pruned_store = 0

    def start(self) -> None:
        """Run the hourly passes in the background (nothing when pruning is off)."""
        if self.state.settings.user_idle_days > 0 and self._task is None:
            self._task = self.state.loop.create_task(self._run(), name="ollamamq-idle-users")

    async def stop(self) -> None:
        """Stop the background passes."""
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        await asyncio.sleep(FIRST_PASS_S)
        while True:
            try:
                await self.prune(time.time())
            except Exception as exc:  # noqa: BLE001 -- a store hiccup: try again next hour
                log.warning("idle users: pruning failed (%s); retrying in %g s", exc,
                            PRUNE_EVERY_S)
            await asyncio.sleep(PRUNE_EVERY_S)

    def kept(self) -> set[str]:
        """Users the operator gave something: never pruned however idle."""
        state, settings = self.state, self.state.settings
        cache = state.cache
        keep = set(cache.users) | set(cache.blocked_users)
        keep.update(rec.user for rec in cache.keys.values())
        keep.update(settings.vip_users, settings.boost_users, settings.user_weights,
                    settings.user_limits)
        return keep

    async def prune(self, now: float) -> tuple[int, int]:
        """One pass at wall time `now`: (users dropped from memory, users pruned in the store)."""
        days = self.state.settings.user_idle_days
        if days <= 0:
            return 0, 0
        cutoff = now - days * SECONDS_PER_DAY
        keep = self.kept()
        memory = self.prune_memory(cutoff, keep)
        stored = 0
        limits = self.state.settings.limits
        if not limits.get("quota_total"):
            before = utc_day(cutoff)
            if limits.get("quota_month"):
                # The month's usage is what the default monthly quota counts:
                # deleting it would give an idle user that quota back.
                before = min(before, utc_day(now)[:8] + "01")
            cache = self.state.cache
            await cache.flush()  # usage counted in memory is in the store before we look
            stored = await cache.store.prune_usage(before, keep)
        self.pruned_memory += memory
        self.pruned_store += stored
        if memory or stored:
            log.info("idle users: forgot %d in memory and %d in the store (no request for "
                     "%g days)", memory, stored, days)
        return memory, stored

    def prune_memory(self, cutoff: float, keep: set[str]) -> int:
        """Drop the counters of users not seen since `cutoff` with no work in the gateway."""
        users = self.state.stats.users
        idle = [name for name, s in users.items()
                if s.last_seen < cutoff and not s.queued and not s.in_flight
                and name not in keep]
        for name in idle:
            del users[name]
        return len(idle)
