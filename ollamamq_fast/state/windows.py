"""In-process window counters: `incr_window` for a store that serves one process.

SQLite backs a single gateway process, so there is no other replica to share a
rate-limit counter with and a dict is exact. The counters are not persisted: a
restart forgets the current windows, which at worst lets a user spend one more
window's allowance, the same as Redis losing a key's TTL on a restart without AOF.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# Expired counters are swept when this many have been created since the last
# sweep: the sweep is O(n), so it runs at most once per that many new windows
# and the dict stays within about twice the number of live windows.
SWEEP_EVERY = 4096


class LocalWindows:
    """Fixed windows that start at a key's first hit, like Redis INCRBYFLOAT + EXPIRE."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._counters: dict[
            str, tuple[float, float]
        ] = {}  # key -> (expires_at, total)
        self._created = 0

    def __len__(self) -> int:
        """How many counters are held, expired ones included until the next sweep."""
        return len(self._counters)

    def incr(self, key: str, window_s: float, amount: float) -> float:
        """Add `amount` to the key's current window and return the window's total."""
        now = self._clock()
        entry = self._counters.get(key)
        if entry is None or entry[0] <= now:
            self._created += 1
            if self._created >= SWEEP_EVERY:
                self._sweep(now)
            total = amount
            expires = now + window_s
        else:
            expires, total = entry[0], entry[1] + amount
        self._counters[key] = (expires, total)
        return total

    def _sweep(self, now: float) -> None:
        """Drop every expired counter; called from `incr` every SWEEP_EVERY new windows."""
        self._created = 0
        self._counters = {k: v for k, v in self._counters.items() if v[0] > now}
