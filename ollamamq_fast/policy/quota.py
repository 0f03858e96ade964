"""Token quotas per user: per UTC day, per UTC calendar month, and in total.

The check (`QuotaBook.exceeded`) is synchronous: dict lookups in counts kept
in memory. The counts are the store's usage rows (every replica writes its
usage there through the StateCache), refreshed in the background, plus the
tokens this process counted since the last refresh:

    used today = store rows of today             + local since refresh
    this month = store rows of the month before today + used today
    total      = store rows of every day before today + used today

The rows before today change only at midnight, so they are read once a day
(all history only when some user has a `quota_total`), with today's, which are
read every REFRESH_S. The process counts an ended request's tokens at the instant
it adds them to the usage tally (accounting/ledger.py), and today's rows are
read through `StateCache.flushed_usage`, which calls back at the instant the
tally is taken for the write and writes nothing more until the read is done:
the counts noted before that instant are exactly those the read holds, so
they are dropped then, and none is counted twice or missed. Another
replica's usage is seen within ~REFRESH_S plus its flush interval.

A request is refused once the user has used up a quota (>=); a request that
is running when the quota is crossed finishes, and its tokens count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from ollamamq_fast.limits import Limits
from ollamamq_fast.state.records import Usage, utc_day

log = logging.getLogger("ollamamq_fast.policy")

# How often today's usage is re-read from the store while quotas are configured:
# the lag with which another replica's usage counts here.
REFRESH_S = 1.0

# StateCache.flushed_usage: write what is queued, calling back when the usage
# tally is taken for the write, then read the rows since a day.
FlushedUsage = Callable[[str | None, Callable[[], None]], Awaitable[list[Usage]]]


def _tokens(row: Usage) -> int:
    return row.prompt_tokens + row.completion_tokens


class QuotaBook:
    """Per-user token counts for the quota check."""

    def __init__(self, flushed_usage: FlushedUsage,
                 wall: Callable[[], float] = time.time) -> None:
        self.flushed_usage = flushed_usage
        self.wall = wall
        self.today: dict[str, int] = {}
        self.month_before: dict[str, int] = {}
        self.total_before: dict[str, int] = {}
        # Tokens this process counted that `today` does not hold: `local` since
        # the last cut, `cutting` between a refresh's cut and its read's end.
        self.local: dict[str, int] = {}
        self.cutting: dict[str, int] = {}
        self.day = ""
        self.baseline_day = ""
        self.total_loaded = False
        self.loaded = False

    # -- Data plane ---------------------------------------------------------------

    def note(self, user: str, tokens: int) -> None:
        """Count tokens a request of `user` used (called when it finishes)."""
        if tokens:
            self.local[user] = self.local.get(user, 0) + tokens

    def used(self, user: str) -> tuple[int, int, int]:
        """Tokens used (today, this month, in total)."""
        today = self.today.get(user, 0) + self.local.get(user, 0)
        if self.cutting:
            today += self.cutting.get(user, 0)
        return (today, self.month_before.get(user, 0) + today,
                self.total_before.get(user, 0) + today)

    def exceeded(self, user: str, limits: Limits) -> str | None:
        """Why a new request of `user` is refused (403), or None."""
        day, month, total = self.used(user)
        if limits.quota_day and day >= limits.quota_day:
            return (f"daily token quota used up: {day} of {limits.quota_day} tokens today "
                    "(UTC); it resets at 00:00 UTC")
        if limits.quota_month and month >= limits.quota_month:
            return (f"monthly token quota used up: {month} of {limits.quota_month} tokens "
                    "this month (UTC); it resets on the 1st")
        if limits.quota_total and total >= limits.quota_total:
            return (f"token quota used up: {total} of {limits.quota_total} tokens in total; "
                    "ask the operator to raise it")
        return None

    # -- Background ----------------------------------------------------------------

    async def refresh(self, need_total: bool) -> None:
        """Re-read today's usage (and the older baseline once a day) from the store."""
        day = utc_day(self.wall())
        month_start = day[:8] + "01"
        rebase = day != self.baseline_day or (need_total and not self.total_loaded)
        since: str | None = day
        if rebase:
            since = None if need_total else month_start

        def cut() -> None:
            self.cutting, self.local = self.local, {}

        try:
            rows = await self.flushed_usage(since, cut)
        except BaseException:
            # Not read: what was cut is still this process's own count.
            for user, n in self.cutting.items():
                self.local[user] = self.local.get(user, 0) + n
            self.cutting = {}
            raise
        today: dict[str, int] = {}
        month: dict[str, int] = {}
        total: dict[str, int] = {}
        for row in rows:
            n = _tokens(row)
            if row.day == day:
                today[row.user] = today.get(row.user, 0) + n
            elif rebase and row.day < day:
                if need_total:
                    total[row.user] = total.get(row.user, 0) + n
                if row.day >= month_start:
                    month[row.user] = month.get(row.user, 0) + n
        if rebase:
            self.month_before, self.total_before = month, total
            self.baseline_day = day
            self.total_loaded = need_total
        # The read holds exactly what was cut: both change at this one instant.
        self.today, self.cutting = today, {}
        self.day = day
        self.loaded = True
