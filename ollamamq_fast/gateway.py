"""Composition root: builds the parts, starts them, drains and stops them.

`GatewayState` is what the data plane reads (settings, fleet, dispatcher,
live connections, counters); `Gateway` owns the lifecycle, as uvicorn keeps
ServerState apart from Server.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ollamamq_fast.accesslog import AccessLog
from ollamamq_fast.accounting.keeper import UsageKeeper
from ollamamq_fast.accounting.ledger import Ledger
from ollamamq_fast.config import (
    DEFAULT_POOL,
    BackendOptions,
    ConfigError,
    PoolConfig,
    Settings,
    apply_toml,
    load_toml,
    parse_backend_url,
)
from ollamamq_fast.control.server import AdminServer
from ollamamq_fast.fleet.backend import Backend
from ollamamq_fast.fleet.health import HealthChecker
from ollamamq_fast.fleet.passive import PassiveHealth
from ollamamq_fast.fleet.required import RequiredModels
from ollamamq_fast.fleet.select import Balance, Fleet
from ollamamq_fast.idle import IdlePruner
from ollamamq_fast.limits import any_budget
from ollamamq_fast.operator import Operator
from ollamamq_fast.plane import DataPlane
from ollamamq_fast.policy.engine import Policy
from ollamamq_fast.policy.identity import Identity
from ollamamq_fast.pools import Pool, Pools
from ollamamq_fast.proxy.downstream import ClientProtocol
from ollamamq_fast.proxy.flow import BodyBudget
from ollamamq_fast.proxy.local import LocalRoutes
from ollamamq_fast.proxy.pool import UpstreamPool
from ollamamq_fast.proxy.state import State
from ollamamq_fast.sched.dispatcher import Dispatcher
from ollamamq_fast.state.cache import StateCache
from ollamamq_fast.state.store import open_store
from ollamamq_fast.stats import GatewayStats
from ollamamq_fast.wire.cors import Origins

if TYPE_CHECKING:
    from ollamamq_fast.sched.shared_slots import SharedSlots
    from ollamamq_fast.sim import SimServer

log = logging.getLogger("ollamamq_fast")

# Reaper period: timeouts are enforced to this granularity.
TICK_S = 1.0
# A request head must arrive within this; a stalled body gets 6x as long.
HEAD_TIMEOUT_S = 10.0
# Idle client keep-alive connections are closed after this (nginx's default).
KEEPALIVE_TIMEOUT_S = 75.0


# Warn when connections reach this share of the open-file limit, at most this often.
FD_WARN_SHARE = 0.9
FD_WARN_EVERY_S = 30.0


def raise_fd_limit() -> int:
    """Raise the open-file soft limit to the hard limit; the limit now in force (0: unknown).

    Each client and each backend connection is a file descriptor; the usual
    soft limit of 1024 would refuse clients long before the gateway is busy.
    """
    try:
        import resource
    except ImportError:  # not on this platform
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return 0
    log.debug("open-file limit: %d", soft)
    return int(soft)


class GatewayState(DataPlane):
    """Shared state of a running gateway; the data plane reads it as a DataPlane (plane.py)."""

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(settings, loop)
        backends = [
            Backend(addr, settings.backend_slots.get(addr.url, settings.slots))
            for addr in settings.backends
        ]
        for b in backends:
            b.pool = UpstreamPool(b, loop)
            options = settings.backend_options.get(b.name)
            if options is not None:
                b.configure(options)
        self.fleet = Fleet(backends, Balance(settings.balance))
        # The configured list (command line, TOML file; replaced by a reload):
        # URL -> slots. Runtime changes are stored as overrides of it
        # (operator.py), so the fleet is this list with the overrides applied.
        self.configured: dict[str, int] = {b.name: b.slots for b in backends}
        # Backends no pool lists any more whose requests still run there, by URL:
        # one added again takes the same record, so those requests keep their
        # slots (a new record would let the server be sent more than its slots
        # while they finish: llama-cpp-python cuts a running stream then).
        self.retired: dict[str, Backend] = {}
        self.dispatcher = Dispatcher(self.fleet, settings, loop)
        # The default pool is this fleet and dispatcher; named pools beside it.
        self.pools = Pools(
            Pool(settings.pools.get(DEFAULT_POOL) or PoolConfig(DEFAULT_POOL), self.fleet,
                 self.dispatcher),
            settings, loop, self._make_backend, self._drop_backend)
        self.default_pool = self.pools.default
        # With Redis, slots and fair share are shared with the other replicas.
        self.shared: SharedSlots | None = None
        if settings.redis_url:
            # Imported here: a single gateway never imports redis-py.
            from ollamamq_fast.sched.shared_slots import SharedSlots

            self.shared = SharedSlots(settings.redis_url, "ollamamq", uuid.uuid4().hex,
                                      self.pools, loop)
        self.health = HealthChecker(
            self.pools,
            settings.health_interval,
            fail_threshold=settings.health_fail_threshold,
            ok_threshold=settings.health_ok_threshold,
            on_change=self.pools.pump_all,
        )
        self.passive = PassiveHealth(loop, self.pools.pump_all)
        for config in settings.pools.values():
            if config.name != DEFAULT_POOL:
                self.pools.put(config)
        self.pools.set_access(settings.pool_access_users, settings.pool_access_keys)
        # Required models of every pool (fleet/required.py): compared and pulled off the data plane.
        self.required = RequiredModels(self.pools, self.health)
        self.local = LocalRoutes(self)
        self.cache = StateCache(open_store(settings.state_path or ":memory:", settings.redis_url))
        self.operator = Operator(self, self.cache)
        self.required.publish = self.operator.events.publish
        self.health.on_online = self.required.backend_joined
        self.pools.on_change = lambda pool, what: self.required.check_soon(pool, f"pool {what}")
        # Set by Gateway.start when a config file can be reloaded (admin API, SIGHUP).
        self.reload_hook: Callable[[], dict[str, Any]] | None = None
        self.access = AccessLog(settings.log_file, settings.log_format)
        self.identity = Identity(settings.auth, settings.trusted_proxies,
                                 self.cache.key_by_digest)
        # Browser origins that may use the gateway (wire/cors.py).
        self.origins = Origins(settings.origins)
        self.connections: set[ClientProtocol] = set()
        self.bodies = BodyBudget(settings.max_bodies_bytes)
        self.stats = GatewayStats()
        # Rate limits, caps, quotas, response cache (policy/engine.py).
        self.policy = Policy(self)
        # The one owner of counters, usage, end states and access lines.
        # The data plane's clock (time.monotonic, plane.py), which also stamps
        # each request's start: uvloop's loop.time() is whole milliseconds, and
        # a duration from it against that start came out up to 1 ms short
        # (negative for fast answers) in the access log and the histograms.
        self.ledger = Ledger(self.stats, self.cache.tally, self.policy, self.access,
                             self.loop_time)
        # Stored usage: counters at start, hourly retention, budget alerts.
        self.usage_keeper = UsageKeeper(
            self.cache.store, self.cache.flush, self.stats, self.operator.events.publish,
            self.policy.limits_for, settings.key_budgets, settings.usage_retention_days,
            lambda: any_budget([settings.limits, *settings.user_limits.values(),
                                *(u.limits for u in self.cache.users.values())]))
        # Forgets users idle for --user-idle-days (memory and store).
        self.idle = IdlePruner(self)
        self.started_at = time.monotonic()
        # Set when a stop (SIGTERM) begins: /ready answers 503 from then on.
        self.stopping = False
        # Wall clock updated by the reaper tick: "last seen" stamps need no
        # clock call per request.
        self.clock = time.time()

    def _new_backend(self, url: str, slots: int) -> Backend:
        """A backend record for `url`: the retired one while its requests still run, else new."""
        address = parse_backend_url(url)
        backend = self.retired.pop(address.url, None)
        if backend is not None and backend.busy:
            backend.slots = slots
        else:
            backend = Backend(address, slots)
        backend.pool = UpstreamPool(backend, self.loop)  # (the old one refuses to pool more)
        return backend

    def _make_backend(self, url: str, slots: int, options: BackendOptions | None) -> Backend:
        """A new backend for a pool: pooled connections, probed soon (pools.py)."""
        backend = self._new_backend(url, slots)
        if options is not None:
            backend.configure(options)
        if self.shared is not None:
            self.shared.adopt(backend)
        if self.health.session is not None:
            self.health.refresh_soon(backend)
        return backend

    def _drop_backend(self, backend: Backend) -> None:
        """No pool lists `backend` any more: stop using it (running requests finish)."""
        self.passive.reset(backend)
        if backend.pool is not None:
            backend.pool.close_all()
        for name in [n for n, b in self.retired.items() if not b.busy]:
            del self.retired[name]  # (bounded: idle ones are forgotten)
        if backend.busy:
            self.retired[backend.name] = backend

    def refresh_models(self, backend: Backend) -> None:
        """A model-changing request succeeded on `backend`: re-read its models."""
        self.health.refresh_soon(backend)

    def set_draining(self, url: str, on: bool) -> Backend:
        """Drain (no new requests; running ones finish) or undrain a backend."""
        backend = self.pools.find_backend(url)
        if backend is None:
            raise KeyError(url)
        backend.draining = on
        backend.refresh()
        # Undrained: requests may start there. Drained: a retry waiting for it
        # alone is answered (Dispatcher.pump).
        self.pools.pump_all()
        return backend

    def remove_backend(self, url: str) -> Backend:
        """Stop sending requests to a backend and forget it."""
        backend = self.fleet.find(url)
        if backend is None:
            raise KeyError(url)
        self.fleet.remove(backend)
        self.pools.relink()
        if backend not in self.pools.backends:
            self._drop_backend(backend)
        self.pools.pump_all()  # requests queued for a model only it served are answered
        return backend

    def add_backend(self, url: str, slots: int | None = None,
                    options: BackendOptions | None = None) -> Backend:
        """Add a backend at runtime; it takes traffic after its first probe."""
        backend = self.pools.find_backend(parse_backend_url(url).url)
        if backend is None:
            backend = self._new_backend(url, slots or self.settings.slots)
            if self.shared is not None:
                self.shared.adopt(backend)
        elif slots:
            backend.slots = slots
        if options is not None:
            backend.configure(options)
        self.fleet.add(backend)
        self.pools.relink()
        self.health.refresh_soon(backend)
        return backend

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether this gateway can serve now (`/ready`), with the reasons when it cannot.

        Ready: not stopping, at least one backend takes traffic, and Redis
        answers when one is configured. `/health` only says the process is alive.
        """
        reasons: list[str] = []
        if self.stopping:
            reasons.append("the gateway is stopping (draining its running requests)")
        online = sum(1 for b in self.pools.backends if b.serving)
        if not online:
            reasons.append("no backend is online (or every one is draining or failing)")
        redis = "off"
        if self.settings.redis_url:
            shared = self.shared
            if shared is not None and shared.rounds and not shared.degraded:
                redis = "ok"
            else:
                redis = "unreachable"
                reasons.append("Redis is unreachable: scheduling locally, state not shared")
        return not reasons, {"ready": not reasons, "reasons": reasons,
                             "backends_available": online,
                             "backends_total": len(self.pools.backends), "redis": redis}

    def in_flight(self) -> int:
        """Exchanges currently talking to a backend."""
        return sum(b.in_flight + b.unslotted for b in self.pools.backends)

    def waiting(self) -> int:
        """Requests waiting for a slot (fair queues and retry lines of every pool)."""
        return sum(len(d.queue) + len(d.retry_line) for d in self.pools.dispatchers())


class Gateway:
    """Starts and stops the data plane, health probes and the reaper."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state: GatewayState | None = None
        self.server: asyncio.Server | None = None
        self.sim: SimServer | None = None
        self.reaper: asyncio.TimerHandle | None = None
        self.admin: AdminServer | None = None
        self.stopped = asyncio.Event()
        self._last_tick = (0, 0)
        self.fd_limit = 0
        self._fd_warned = -FD_WARN_EVERY_S
        # Pools the config file defines (a reload removes those it no longer lists).
        self.file_pools: set[str] = set(settings.pools)

    @property
    def port(self) -> int:
        """The bound data-plane port (useful with port 0)."""
        assert self.server is not None
        sock = self.server.sockets[0]
        return int(sock.getsockname()[1])

    @property
    def admin_port(self) -> int | None:
        """The bound control-plane port; None when disabled or its port was busy."""
        return self.admin.port if self.admin is not None else None

    async def start(self) -> None:
        """Probe the fleet once, then listen.

        A start that fails (the port is taken...) stops what it had started
        (probe session, simulator, store) before the error propagates.
        """
        try:
            await self._start()
        except BaseException:
            await self.stop(grace=0.0)
            raise

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        settings = self.settings
        if settings.sim:
            from ollamamq_fast.sim import SimOptions, start_sim

            options = SimOptions()
            if settings.sim_models:
                options.models = list(settings.sim_models)
            self.sim = await start_sim(options, "127.0.0.1", 0)
            settings.backends = [parse_backend_url(self.sim.url)] + [
                b for b in settings.backends if settings.sim_keep_backends
            ]
        state = GatewayState(settings, loop)
        self.state = state
        self.fd_limit = raise_fd_limit()
        if settings.config_path:
            state.reload_hook = self.reload
        state.access.start(loop)
        await state.cache.start()
        state.operator.restore()
        if state.shared is not None:
            await state.shared.start()
        await state.policy.start()
        await state.usage_keeper.start()
        state.idle.start()
        await state.health.start()
        state.required.start()
        self.server = await loop.create_server(
            lambda: ClientProtocol(state),
            settings.host,
            settings.port,
            backlog=4096,
            reuse_address=True,
        )
        if not settings.port:
            # Port 0 asked for any free port: record the bound one, so the
            # admin plane (playground, /api/info) can reach the data plane.
            settings.port = self.port
        self.reaper = loop.call_later(TICK_S, self._tick)
        self.admin = AdminServer(state, settings)
        await self.admin.start()

    def _tick(self) -> None:
        state = self.state
        if state is None:
            return
        loop = state.loop
        now = loop.time()
        state.clock = time.time()
        try:
            timeout = state.settings.timeout
            # Silence is measured on the data plane's clock, from the request's
            # write (ex.sent_at) or the last tick that saw activity: counting
            # whole ticks instead cut a backend that had been silent for less
            # than --timeout (the first tick after the write may come at once).
            clock = state.loop_time()
            for conn in list(state.connections):
                conn.reap(TICK_S, HEAD_TIMEOUT_S, KEEPALIVE_TIMEOUT_S)
                ex = conn.active
                if ex is None:
                    continue
                up = ex.upstream
                if up is None or ex.state not in (State.WAITING, State.STREAMING):
                    continue
                if (up.rx_count != up.rx_seen and ex.state is State.STREAMING) or (
                        conn.writing_paused) or (
                        not ex.request_complete and conn.idle_s < timeout):
                    # Data arrived, or we paused the backend ourselves, or the
                    # client is still sending the body: a backend may rightly
                    # say nothing until the upload ends. Bytes of a head not
                    # yet whole are no sign of life: a head trickled a byte at
                    # a time would otherwise hold the request for hours.
                    up.rx_seen = up.rx_count
                    up.silent_since = clock
                    continue
                if clock - max(up.silent_since, ex.sent_at) >= timeout:
                    ex.upstream_timeout()
            for dispatcher in state.pools.dispatchers():
                dispatcher.sweep(now)
            self._check_fds(state, now)
            self._publish_tick(state)
            idle_now = state.loop_time()  # the clock pools stamp idle connections with
            for b in state.pools.backends:
                if b.pool is not None:
                    b.pool.expire_idle(idle_now)
        except Exception:  # the reaper must survive a bug in one connection
            log.exception("reaper tick failed")
        self.reaper = loop.call_later(TICK_S, self._tick)

    def _check_fds(self, state: GatewayState, now: float) -> None:
        """Warn while client connections near the open-file limit (the OS then refuses new ones)."""
        limit = self.fd_limit
        if limit <= 0:
            return
        used = len(state.connections) + state.in_flight()
        if used >= limit * FD_WARN_SHARE and now - self._fd_warned >= FD_WARN_EVERY_S:
            self._fd_warned = now
            log.warning("%d client and backend connections open, near the open-file limit of %d: "
                        "new clients may be refused by the system (raise `ulimit -n`)", used, limit)

    def _publish_tick(self, state: GatewayState) -> None:
        """Per-second counters for dashboards (only when someone listens)."""
        events = state.operator.events
        stats = state.stats
        completed, tokens = stats.completed, stats.completion_tokens
        last = self._last_tick
        self._last_tick = (completed, tokens)
        if not events.subscribers:
            return
        pools = state.pools.totals()
        events.publish(
            "tick",
            queued=sum(p["queued"] for p in pools.values()),
            in_flight=sum(b.in_flight for b in state.pools.backends),
            requests_per_s=completed - last[0],
            tokens_per_s=tokens - last[1],
            backends=state.operator.list_backends(),
            pools=pools,
            pulls=state.required.progress(),
        )

    def reload(self) -> dict[str, Any]:
        """Re-read the TOML config (SIGHUP): backends, slots, limits, VIP lists.

        Connections and running requests are untouched; backends no longer
        listed stop receiving requests and the ones running there finish.
        Raises ConfigError when there is no config file or it is invalid.
        """
        state = self.state
        path = self.settings.config_path
        if state is None or not path:
            raise ConfigError("no config file to reload (start with --config FILE)")
        data = load_toml(path)
        fresh = Settings()
        apply_toml(fresh, data, path)
        live = self.settings
        for name in ("timeout", "max_queue", "max_queue_per_user", "queue_timeout", "slots",
                     "allow_all_routes", "health_fail_threshold", "health_ok_threshold",
                     "user_idle_days"):
            if name in data:
                setattr(live, name, getattr(fresh, name))
        if "max_body_mb" in data:
            live.max_body_bytes = fresh.max_body_bytes
        if "max_bodies_mb" in data:
            live.max_bodies_bytes = fresh.max_bodies_bytes
        if "limits" in data:
            live.limits, live.user_limits = fresh.limits, fresh.user_limits
        if "cache" in data:
            live.cache_mode, live.cache_ttl, live.cache_mb = (
                fresh.cache_mode, fresh.cache_ttl, fresh.cache_mb)
        if "stream_usage" in data:
            live.stream_usage = fresh.stream_usage
        if "origins" in data:
            live.origins = fresh.origins
            state.origins = Origins(fresh.origins)
        state.policy.reload()
        state.idle.start()  # user_idle_days may have turned pruning on
        state.bodies.limit = state.settings.max_bodies_bytes
        fleet = state.fleet
        if "balance" in data:
            fleet.balance = Balance(fresh.balance)
        changes: dict[str, Any] = {"added": [], "removed": [], "slots": {}}
        if "backends" in data:
            # The file is the new configured list; runtime overrides still
            # apply over it (operator.reconcile_backends).
            state.configured = {
                b.url: fresh.backend_slots.get(b.url, fresh.slots) for b in fresh.backends}
            live.backend_options = dict(fresh.backend_options)
            changes = state.operator.reconcile_backends(
                {url: fresh.backend_options.get(url, BackendOptions()) for url in state.configured})
        if ("pools" in data or "pool_access" in data or self.file_pools
                or live.pool_access_users or live.pool_access_keys):
            changes["pools"] = self._reload_pools(state, fresh, data)
        # The file's VIP, Boost and weights replace what it granted before (the
        # flags' stay); every pool's queue took them when it was made.
        live.vip_users = list(dict.fromkeys(fresh.vip_users + live.flag_vip_users))
        live.boost_users = list(dict.fromkeys(fresh.boost_users + live.flag_boost_users))
        live.user_weights = {**fresh.user_weights, **live.flag_user_weights}
        for dispatcher in state.pools.dispatchers():
            dispatcher.queue.grant(live.vip_users, live.boost_users, live.user_weights)
        state.pools.pump_all()
        state.operator.events.publish("config_reloaded", **changes)
        log.info("config reloaded from %s: %s", path, changes)
        return changes

    def _reload_pools(self, state: GatewayState, fresh: Settings,
                      data: dict[str, object]) -> dict[str, list[str]]:
        """Pools of the file: added, changed, and removed when the file no longer has them."""
        pools = state.pools
        out: dict[str, list[str]] = {"set": [], "removed": []}
        for name in sorted(self.file_pools - set(fresh.pools)):
            if name in pools.by_name and name != DEFAULT_POOL:
                pools.remove(name)
                out["removed"].append(name)
        if DEFAULT_POOL not in fresh.pools and DEFAULT_POOL in self.file_pools:
            pools.put(PoolConfig(DEFAULT_POOL))
        for config in fresh.pools.values():
            pools.put(config)
            out["set"].append(config.name)
        self.file_pools = set(fresh.pools)
        live = self.settings
        live.pools = fresh.pools
        live.pool_access_users = fresh.pool_access_users
        live.pool_access_keys = fresh.pool_access_keys
        state.operator.restore_pools()
        state.required.check_soon(None, "reload")
        return out

    def summary(self) -> dict[str, Any]:
        """Backends and queue in one dict (for the startup banner and status)."""
        assert self.state is not None
        return {
            "listen": f"http://{self.settings.host}:{self.port}",
            "backends": [b.snapshot() for b in self.state.pools.backends],
        }

    async def stop(self, grace: float = 10.0) -> None:
        """Drain: stop accepting, let in-flight responses finish up to `grace`, close."""
        state = self.state
        if state is not None:
            state.stopping = True
        if self.server is not None:
            self.server.close()
        if state is not None:
            deadline = time.monotonic() + grace
            # Waiting requests too: with --redis a replica's requests may wait
            # with nothing running here (another replica holds the slots).
            while (state.in_flight() or state.waiting()) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            for d in state.pools.dispatchers():
                d.refuse_all("the gateway is stopping; retry")
            if self.admin is not None:
                await self.admin.stop()
            if state.shared is not None:
                await state.shared.stop()
            for conn in list(state.connections):
                if conn.transport is not None:
                    conn.transport.close()
            await state.required.stop()
            for b in state.pools.backends:
                if b.pool is not None:
                    b.pool.close_all()
            await state.health.close()
            state.access.stop()
            await state.idle.stop()
            await state.policy.stop()
            await state.usage_keeper.stop()
            await state.cache.stop()
        if self.reaper is not None:
            self.reaper.cancel()
        if self.server is not None:
            try:
                await asyncio.wait_for(self.server.wait_closed(), 1.0)
            except TimeoutError:
                pass
        if self.sim is not None:
            await self.sim.close()
        self.stopped.set()
