"""Usage rows summed in memory between two flushes of the state cache.

Every request that reached admission adds one row here when it ends; the
state flusher (state/cache.py) takes the sums and writes them to the store as
deltas. This is on the per-request path, so it is compiled with mypyc and
does only dict and list work: one clock read, two dict lookups, a few adds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .records import utc_day, utc_hour

SECONDS_PER_DAY = 86400  # Unix time has no leap seconds, so UTC days are exactly this
SECONDS_PER_HOUR = 3600
# The counters of an hourly usage delta, in UsageHour field order: requests,
# errors, cancelled, estimated tokens, prompt tokens, completion tokens.
HOUR_SLOTS = 6

DayKey = tuple[str, str, str]  # user, model, day
HourKey = tuple[str, str, str, str, str]  # hour, user, key, model, backend


class UsageTally:
    """Sums per (user, model, day) and per (hour, user, key, model, backend)."""

    def __init__(self, on_first: Callable[[], None] | None = None) -> None:
        self.days: dict[DayKey, list[int]] = {}
        self.hours: dict[HourKey, list[int]] = {}
        # Called when the first row after a flush arrives (wakes the flusher),
        # not on every request.
        self.on_first = on_first
        self._hour = ""
        self._hour_ends = 0.0
        self._day = ""
        self._day_ends = 0.0

    def add_usage(self, user: str, model: str, prompt: int, completion: int, key: str = "",
                  backend: str = "", error: bool = False, cancelled: bool = False,
                  estimated: bool = False, now: float = 0.0) -> None:
        """Count one ended request and its tokens; `now`: the wall clock if the caller has it."""
        if not now:
            now = time.time()
        if now >= self._hour_ends:
            self._hour = utc_hour(now)
            self._hour_ends = (now // SECONDS_PER_HOUR + 1) * SECONDS_PER_HOUR
            if now >= self._day_ends:
                self._day = utc_day(now)
                self._day_ends = (now // SECONDS_PER_DAY + 1) * SECONDS_PER_DAY
        hours = self.hours
        if not hours and self.on_first is not None:
            self.on_first()
        hour_key = (self._hour, user, key, model, backend)
        hour = hours.get(hour_key)
        if hour is None:
            hour = [0, 0, 0, 0, 0, 0]
            hours[hour_key] = hour
        hour[0] += 1
        if error:
            hour[1] += 1
        if cancelled:
            hour[2] += 1
        if estimated:
            hour[3] += prompt + completion
        hour[4] += prompt
        hour[5] += completion
        day_key = (user, model, self._day)
        day = self.days.get(day_key)
        if day is None:
            self.days[day_key] = [1, prompt, completion]
        else:
            day[0] += 1
            day[1] += prompt
            day[2] += completion

    def take(self) -> tuple[dict[DayKey, list[int]], dict[HourKey, list[int]]]:
        """The sums so far, leaving the tally empty (the flusher writes them)."""
        days, hours = self.days, self.hours
        self.days, self.hours = {}, {}
        return days, hours

    def give_back(self, days: dict[DayKey, list[int]], hours: dict[HourKey, list[int]]) -> None:
        """Sums whose write failed: added back, to go with the next flush."""
        for key, counts in days.items():
            now = self.days.setdefault(key, [0, 0, 0])
            for j in range(3):
                now[j] += counts[j]
        for dims, counts in hours.items():
            now = self.hours.setdefault(dims, [0] * HOUR_SLOTS)
            for j in range(HOUR_SLOTS):
                now[j] += counts[j]
