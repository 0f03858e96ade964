"""Passive health: a circuit breaker fed by what real requests see.

Probes run every few seconds; a backend can die or start answering 503 in
between. A backend that fails fast looks idle to least-connections and would
attract all traffic, so after BREAKER_THRESHOLD consecutive failures
(refused, reset, closed before answering, or a 5xx within FAST_FAIL_S) its
breaker opens: no traffic for a cooldown, then one half-open trial (one
request, on the backend once idle; others wait for its outcome). A success
closes it; a failure re-opens it with a doubled cooldown (bounded).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

from ollamamq_fast.fleet.backend import (
    BREAKER_COOLDOWN_S,
    BREAKER_MAX_COOLDOWN_S,
    BREAKER_THRESHOLD,
    Backend,
    Breaker,
)

log = logging.getLogger("ollamamq_fast.breaker")

# A 5xx answered faster than this is a failing backend, not a slow model.
FAST_FAIL_S: Final = 0.5


class PassiveHealth:
    """Counts request outcomes per backend and drives each backend's breaker."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_change: Callable[[], None]) -> None:
        self.loop = loop
        self.on_change = on_change

    def failure(self, backend: Backend, why: str) -> None:
        """A request failed on `backend` in a way that is the backend's fault."""
        backend.failures += 1
        backend.consecutive_failures += 1
        backend.last_error = why
        if backend.breaker is Breaker.HALF_OPEN or (
            backend.breaker is Breaker.CLOSED and backend.consecutive_failures >= BREAKER_THRESHOLD
        ):
            self._open(backend)

    def success(self, backend: Backend) -> None:
        """A request got a non-5xx answer from `backend`."""
        backend.consecutive_failures = 0
        if backend.breaker is Breaker.HALF_OPEN:
            backend.breaker = Breaker.CLOSED
            backend.breaker_cooldown = BREAKER_COOLDOWN_S
            backend.refresh()
            log.info("backend %s breaker closed", backend.name)
            self.on_change()  # requests that waited for the trial may start

    def _open(self, backend: Backend) -> None:
        backend.breaker = Breaker.OPEN
        backend.refresh()
        cooldown = backend.breaker_cooldown
        backend.breaker_cooldown = min(cooldown * 2, BREAKER_MAX_COOLDOWN_S)
        log.warning("backend %s breaker open for %.1f s: %s", backend.name, cooldown,
                    backend.last_error)
        backend.breaker_timer = self.loop.call_later(cooldown, self._half_open, backend)

    def _half_open(self, backend: Backend) -> None:
        backend.breaker_timer = None
        if backend.breaker is Breaker.OPEN:
            backend.breaker = Breaker.HALF_OPEN
            backend.refresh()
            self.on_change()

    def reset(self, backend: Backend) -> None:
        """Close the breaker (e.g. the backend was removed or re-added)."""
        timer = backend.breaker_timer
        if timer is not None:
            timer.cancel()
        backend.breaker_timer = None
        backend.breaker = Breaker.CLOSED
        backend.breaker_cooldown = BREAKER_COOLDOWN_S
        backend.consecutive_failures = 0
        backend.refresh()
