"""Background work on the stored usage: counters at start, retention, token budgets.

- At start, the counters that `/api/users`, `/metrics` and the dashboards show
  (tokens, answered and cancelled requests, per user and gateway-wide) are
  loaded from the store's usage rows, so a restart does not zero them. With
  several replicas on one Redis each starts from the shared totals.
- Hourly usage rows older than `usage_retention_days` are dropped once an hour
  (the daily per-user, per-model totals that quotas read are kept).
- Token budgets (`budget_day`, `budget_month` per user in the limits
  vocabulary, per API key in `[limits.keys.ID]`) never refuse a request: when
  a user's or key's tokens of the UTC day or month reach 80 % and 100 % of a
  budget, one `budget_alert` event goes on the event stream, once per period
  and threshold (remembered in the store, so a restart does not repeat it).

Budget totals are the store's hourly rows: those of the month before today
are read once a day, today's every CHECK_S after pending usage is flushed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ollamamq_fast.state.records import UsageHour
from ollamamq_fast.state.store import Store
from ollamamq_fast.stats import GatewayStats
from ollamamq_fast.tasks import cancel_and_wait

log = logging.getLogger("ollamamq_fast.accounting")

# How often budgets are checked: the lag of an alert behind the traffic.
CHECK_S = 5.0
# How often hourly rows past the retention are dropped.
PRUNE_EVERY_S = 3600.0
THRESHOLDS = (80, 100)
SECONDS_PER_DAY = 86400


class Budgets(Protocol):
    """A user's budgets (the policy's resolved limits)."""

    @property
    def budget_day(self) -> int: ...

    @property
    def budget_month(self) -> int: ...


def _hour(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H", time.gmtime(ts))


class UsageKeeper:
    """Restores counters, prunes old hourly rows and watches budgets for one gateway."""

    def __init__(self, store: Store, flush: Callable[[], Awaitable[None]], stats: GatewayStats,
                 publish: Callable[..., None], limits_for: Callable[[str], Budgets],
                 key_budgets: dict[str, dict[str, int]], retention_days: int,
                 budgets_on: Callable[[], bool], wall: Callable[[], float] = time.time) -> None:
        self.store = store
        self.flush = flush
        self.stats = stats
        self.publish = publish
        self.limits_for = limits_for
        self.key_budgets = key_budgets
        self.retention_days = retention_days
        self.budgets_on = budgets_on
        self.wall = wall
        self.baseline_day = ""
        self.month_before: dict[tuple[str, str], int] = {}  # (scope, id) -> tokens
        self.alerted: set[str] = set()
        self.pruned_at = 0.0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Load the counters, then start the background loop (called by the gateway)."""
        try:
            await self.restore_counters()
        except Exception as exc:  # noqa: BLE001 -- a store hiccup must not stop the gateway
            log.warning("usage: cannot load counters from the store (%s); starting from 0", exc)
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="ollamamq-usage")

    async def stop(self) -> None:
        """Stop the background loop (before the state cache stops)."""
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def restore_counters(self) -> None:
        """Add the stored usage to the live counters (at start, before any traffic)."""
        stats = self.stats
        for row in await self.store.usage():
            ustats = stats.user(row.user)
            ustats.prompt_tokens += row.prompt_tokens
            ustats.completion_tokens += row.completion_tokens
            stats.prompt_tokens += row.prompt_tokens
            stats.completion_tokens += row.completion_tokens
        for h in await self.store.usage_hours():
            ustats = stats.user(h.user)
            # As the ledger counts `done`: every answer a backend gave (its
            # errors too), and the gateway's own answers without an error
            # (cache hits); a refusal is not done.
            answered = h.requests - h.cancelled
            ustats.done += answered if h.backend else answered - h.errors
            ustats.dropped += h.cancelled
            ustats.estimated_tokens += h.estimated_tokens
            stats.cancelled += h.cancelled
            stats.estimated_tokens += h.estimated_tokens

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(CHECK_S)
            try:
                await self.tick()
            except Exception as exc:  # noqa: BLE001 -- keep going, try again next tick
                log.warning("usage: background check failed (%s)", exc)

    async def tick(self) -> None:
        """One round: prune when due, check budgets when any is set."""
        now = self.wall()
        if self.retention_days and now - self.pruned_at >= PRUNE_EVERY_S:
            self.pruned_at = now
            await self.store.prune_usage_hours(
                _hour(now - self.retention_days * SECONDS_PER_DAY))
        if self.key_budgets or self.budgets_on():
            await self.check_budgets()

    async def check_budgets(self) -> None:
        """Publish the budget alerts due now."""
        now = self.wall()
        today = time.strftime("%Y-%m-%d", time.gmtime(now))
        month = today[:7]
        await self.flush()
        if self.baseline_day != today:
            self.alerted.clear()  # older periods' marks stay in the store
            self.month_before = _totals(await self.store.usage_hours(
                month + "-01T00", today + "T00"))
            self.baseline_day = today
        day_totals = _totals(await self.store.usage_hours(today + "T00"))
        for ident, used_today in sorted(day_totals.items()):
            scope, name = ident
            if scope == "user":
                limits = self.limits_for(name)
                day_budget, month_budget = limits.budget_day, limits.budget_month
            else:
                budgets = self.key_budgets.get(name, {})
                day_budget = budgets.get("budget_day", 0)
                month_budget = budgets.get("budget_month", 0)
            used_month = self.month_before.get(ident, 0) + used_today
            await self._check(scope, name, "day", today, used_today, day_budget)
            await self._check(scope, name, "month", month, used_month, month_budget)

    async def _check(self, scope: str, name: str, period: str, period_id: str, used: int,
                     budget: int) -> None:
        if not budget:
            return
        for threshold in THRESHOLDS:
            if used * 100 < budget * threshold:
                break
            mark = f"budget_alert:{scope}:{name}:{period_id}:{threshold}"
            if mark in self.alerted:
                continue
            self.alerted.add(mark)
            if not await self.store.claim_meta(mark, str(self.wall())):
                continue  # alerted before a restart, or by another replica (one claim wins)
            event: dict[str, Any] = {"scope": scope, scope: name, "period": period,
                                     "period_start": period_id, "threshold": threshold,
                                     "used": used, "budget": budget}
            self.publish("budget_alert", **event)
            log.warning("usage: %s %r used %d%% of its %s budget (%d of %d tokens)",
                        scope, name, used * 100 // budget, period, used, budget)


def _totals(rows: list[UsageHour]) -> dict[tuple[str, str], int]:
    """Tokens per ("user", name) and per ("key", id) (requests without a key have none)."""
    out: dict[tuple[str, str], int] = {}
    for r in rows:
        n = r.prompt_tokens + r.completion_tokens
        if not n:
            continue
        out[("user", r.user)] = out.get(("user", r.user), 0) + n
        if r.key:
            out[("key", r.key)] = out.get(("key", r.key), 0) + n
    return out
