"""Usage rows summed in memory between two flushes of the state cache.

Every request that reached admission adds one row here when it ends; the
state flusher (state/cache.py) takes the sums and writes them to the store as
deltas. This is on the per-request path, so it is compiled with mypyc and
does only dict and list work: one clock read, two dict lookups, a few adds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from .records import utc_day, utc_hour

SECONDS_PER_DAY: Final = 86400  # Unix time has no leap seconds, so UTC days are exactly this
SECONDS_PER_HOUR: Final = 3600

DayKey = tuple[str, str, str]  # user, model, day
HourKey = tuple[str, str, str, str, str]  # hour, user, key, model, backend


class DaySums:
    """The sums of one (user, model, day). A native class: compiled, adding to
    its fields is plain integer arithmetic, where list slots are boxed ints."""

    def __init__(self, requests: int = 0, prompt: int = 0, completion: int = 0) -> None:
        self.requests = requests
        self.prompt = prompt
        self.completion = completion

    def add(self, other: DaySums) -> None:
        self.requests += other.requests
        self.prompt += other.prompt
        self.completion += other.completion


class HourSums:
    """The sums of one (hour, user, key, model, backend), in UsageHour's field order:
    requests, of which errors and cancelled; estimated, prompt and completion tokens."""

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.cancelled = 0
        self.estimated = 0
        self.prompt = 0
        self.completion = 0

    def add(self, other: HourSums) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.cancelled += other.cancelled
        self.estimated += other.estimated
        self.prompt += other.prompt
        self.completion += other.completion

    def counts(self) -> tuple[int, int, int, int, int, int]:
        """The sums in UsageHour's field order."""
        return (self.requests, self.errors, self.cancelled, self.estimated, self.prompt,
                self.completion)


class UsageTally:
    """Sums per (user, model, day) and per (hour, user, key, model, backend)."""

    def __init__(self, on_first: Callable[[], None] | None = None) -> None:
        self.days: dict[DayKey, DaySums] = {}
        self.hours: dict[HourKey, HourSums] = {}
        # Called when the first row after a flush arrives (wakes the flusher),
        # not on every request.
        self.on_first = on_first
        self._hour = ""
        self._hour_ends = 0.0
        self._day = ""
        self._day_ends = 0.0
        # The sums the last row went to, and its key (see add_usage).
        self._last_hour: HourSums | None = None
        self._last_day: DaySums | None = None
        self._last_user = ""
        self._last_model = ""
        self._last_key = ""
        self._last_backend = ""

    def add_usage(self, user: str, model: str, prompt: int, completion: int, key: str = "",
                  backend: str = "", error: bool = False, cancelled: bool = False,
                  estimated: bool = False, now: float = 0.0) -> None:
        """Count one ended request and its tokens; `now`: the wall clock if the caller has it."""
        if not now:
            now = time.time()
        if now >= self._hour_ends:
            self._hour = utc_hour(now)
            self._hour_ends = (now // SECONDS_PER_HOUR + 1) * SECONDS_PER_HOUR
            self._last_hour = None  # the memo's sums are the last hour's
            if now >= self._day_ends:
                self._day = utc_day(now)
                self._day_ends = (now // SECONDS_PER_DAY + 1) * SECONDS_PER_DAY
        hours = self.hours
        if not hours and self.on_first is not None:
            self.on_first()
        # Consecutive rows mostly have the same user, key, model and backend:
        # four string compares cost a fraction of hashing two fresh key tuples.
        hour = self._last_hour
        day = self._last_day
        if (hour is None or day is None or user != self._last_user or model != self._last_model
                or key != self._last_key or backend != self._last_backend):
            hour_key = (self._hour, user, key, model, backend)
            hour = hours.get(hour_key)
            if hour is None:
                hour = hours[hour_key] = HourSums()
            day_key = (user, model, self._day)
            day = self.days.get(day_key)
            if day is None:
                day = self.days[day_key] = DaySums()
            self._last_hour, self._last_day = hour, day
            self._last_user, self._last_model = user, model
            self._last_key, self._last_backend = key, backend
        hour.requests += 1
        if error:
            hour.errors += 1
        if cancelled:
            hour.cancelled += 1
        if estimated:
            hour.estimated += prompt + completion
        hour.prompt += prompt
        hour.completion += completion
        day.requests += 1
        day.prompt += prompt
        day.completion += completion

    def take(self) -> tuple[dict[DayKey, DaySums], dict[HourKey, HourSums]]:
        """The sums so far, leaving the tally empty (the flusher writes them)."""
        days, hours = self.days, self.hours
        self.days, self.hours = {}, {}
        self._last_hour = None  # its sums went with the taken ones
        self._last_day = None
        return days, hours

    def give_back(self, days: dict[DayKey, DaySums], hours: dict[HourKey, HourSums]) -> None:
        """Sums whose write failed: added back, to go with the next flush."""
        for key, sums in days.items():
            now = self.days.get(key)
            if now is None:
                self.days[key] = now = DaySums()
            now.add(sums)
        for dims, counts in hours.items():
            hour = self.hours.get(dims)
            if hour is None:
                self.hours[dims] = hour = HourSums()
            hour.add(counts)
