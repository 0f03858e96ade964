"""What the data plane reads of the running gateway: one compiled view.

`gateway.GatewayState` builds and owns every part (fleet, pools, policy,
ledger, caches, control plane); the per-request code reaches them through
this base class, never through the composition root's own class. Compiled,
each `gw.ledger` or `gw.policy` is then a read of the object's struct, where
a read from an interpreted class is a lookup by name (a dozen of those ran
on every request).

Only what a request needs is declared here; GatewayState sets these in its
constructor, and adds the rest (control plane, health checker, state cache
internals) as its own attributes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mypy_extensions import mypyc_attr

if TYPE_CHECKING:
    from ollamamq_fast.accesslog import AccessLog
    from ollamamq_fast.accounting.ledger import Ledger
    from ollamamq_fast.config import Settings
    from ollamamq_fast.fleet.backend import Backend
    from ollamamq_fast.fleet.health import HealthChecker
    from ollamamq_fast.fleet.passive import PassiveHealth
    from ollamamq_fast.fleet.select import Fleet
    from ollamamq_fast.operator import Operator
    from ollamamq_fast.policy.engine import Policy
    from ollamamq_fast.policy.identity import Identity
    from ollamamq_fast.pools import Pool, Pools
    from ollamamq_fast.proxy.downstream import ClientProtocol
    from ollamamq_fast.proxy.flow import BodyBudget
    from ollamamq_fast.proxy.local import LocalRoutes
    from ollamamq_fast.sched.dispatcher import Dispatcher
    from ollamamq_fast.state.cache import StateCache
    from ollamamq_fast.stats import GatewayStats
    from ollamamq_fast.wire.cors import Origins


@mypyc_attr(allow_interpreted_subclasses=True)
class DataPlane:
    """The parts of a running gateway that requests use (GatewayState is one)."""

    settings: Settings
    loop: asyncio.AbstractEventLoop
    # The clock of request durations, first-byte times and the access log's
    # times, bound once. time.monotonic, not the loop's clock: uvloop's
    # loop.time() is in whole milliseconds (libuv's uv_now), which made every
    # sub-millisecond answer take 0 or 1 ms. Same clock base; about the same cost.
    loop_time: Callable[[], float]
    pools: Pools
    default_pool: Pool  # pools.default, which never changes
    fleet: Fleet  # the default pool's (its fleet and dispatcher never change either)
    dispatcher: Dispatcher  # the default pool's
    passive: PassiveHealth
    health: HealthChecker
    local: LocalRoutes
    cache: StateCache
    operator: Operator
    access: AccessLog
    identity: Identity
    origins: Origins
    connections: set[ClientProtocol]
    bodies: BodyBudget
    stats: GatewayStats
    policy: Policy
    ledger: Ledger
    started_at: float

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.loop = loop
        self.loop_time = time.monotonic

    def refresh_models(self, backend: Backend) -> None:
        """Probe a backend's models soon (after a pull, copy or delete through it)."""
        raise NotImplementedError

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether this gateway should get traffic, and why not (`/ready`)."""
        raise NotImplementedError
