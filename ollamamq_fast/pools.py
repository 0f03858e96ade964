"""Pools: named groups of backends, each a virtual frontend with its own queue.

A pool has its backends (a `Fleet` of its own over shared `Backend` objects),
its own fair queue and dispatcher (with the pool's fair-share defaults), its
model aliases, the Host names that reach it, and its required models
(fleet/required.py). The default pool is the gateway's top-level fleet and
dispatcher, unchanged: a request that names no pool costs one prefix test.

A request reaches a pool by path (`/pool/NAME/api/chat`: the prefix is cut
before anything else reads the path) or by its Host header. Users and API
keys may be limited to some pools (`pool_access`).

A backend listed by several pools is one `Backend` (one set of slots, one
health record); when one of its slots frees, every pool that lists it gets
to dispatch (`Backend.pumps`), the others before the pool whose request freed it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import orjson

from ollamamq_fast.config import DEFAULT_POOL, BackendOptions, PoolConfig
from ollamamq_fast.fleet.backend import Backend
from ollamamq_fast.fleet.models import normalize_model
from ollamamq_fast.fleet.select import Balance, Fleet
from ollamamq_fast.sched.dispatcher import Dispatcher
from ollamamq_fast.wire.sniff import sniff_spans

if TYPE_CHECKING:
    from ollamamq_fast.config import Settings

log = logging.getLogger("ollamamq_fast.pools")

POOL_PREFIX = b"/pool/"


def unalias(body: bytes, model_keys: tuple[str, ...], target: str) -> bytes:
    """`body` with every spelling of its model keys set to `target`, other bytes unchanged.

    Every occurrence is replaced (a Go server reads any case variant, the
    last one wins), so the backend and the policy read the same name.
    """
    found = sniff_spans(body, (), model_keys)
    value = orjson.dumps(target)
    edits = sorted((start, end) for spans in found.occurrences.values()
                   for _key, start, end in spans)
    out: list[bytes] = []
    pos = 0
    for start, end in edits:
        out.append(body[pos:start])
        out.append(value)
        pos = end
    out.append(body[pos:])
    return b"".join(out)


class PoolError(Exception):
    """A request may not use the pool it named (status and message in the route's shape)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Pool:
    """One pool: its fleet, its dispatcher and queue, aliases, hosts, required models."""

    def __init__(self, config: PoolConfig, fleet: Fleet, dispatcher: Dispatcher) -> None:
        self.name = config.name
        self.fleet = fleet
        self.dispatcher = dispatcher
        self.config = config
        self.aliases: dict[str, str] = {}
        # Requests that named this pool (path or Host); not counted for the default pool.
        self.requests = 0
        # Normalized models being pulled to its backends (fleet/required.py):
        # a request for one that no backend has yet gets 503, not 404.
        self.pulling: set[str] = set()
        self.apply(config)

    def apply(self, config: PoolConfig) -> None:
        """Take a (new) definition's aliases and fair-share defaults (backends: Pools.put)."""
        self.config = config
        # Normalized alias -> the model name the backend reads.
        self.aliases = {normalize_model(k): v for k, v in config.aliases.items()}
        if config.balance is not None:
            self.fleet.balance = Balance(config.balance)
        self.dispatcher.queue.grant(config.vip_users, config.boost_users, config.user_weights,
                                    source="pool")

    def alias_target(self, model: str) -> str | None:
        """The model name an alias stands for (None: `model` is no alias here)."""
        return self.aliases.get(model)

    def tag_aliases(self, listed: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """/api/tags entries for the aliases whose model is in `listed`."""
        by_name = {normalize_model(str(e.get("name") or e.get("model") or "")): e
                   for e in listed}
        out = []
        for alias, target in self.config.aliases.items():
            found = by_name.get(normalize_model(target))
            if found is not None and normalize_model(alias) not in by_name:
                out.append({**found, "name": alias, "model": alias})
        return out

    def v1_aliases(self, listed: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """/v1/models objects for the aliases whose model is in `listed`."""
        by_id = {normalize_model(str(item.get("id", ""))): item for item in listed}
        out = []
        for alias, target in self.config.aliases.items():
            found = by_id.get(normalize_model(target))
            if found is not None and normalize_model(alias) not in by_id:
                out.append({**found, "id": alias})
        return out

    def snapshot(self) -> dict[str, Any]:
        """The pool's definition and live numbers, for the admin API and dashboards."""
        backends = self.fleet.backends
        return {
            **self.config.to_dict(),
            "backends": [b.name for b in backends],
            "definition": self.config.to_dict(),
            "backends_online": sum(1 for b in backends if b.online),
            "backends_total": len(backends),
            "slots_total": sum(b.slots for b in backends),
            "in_flight": sum(b.in_flight for b in backends),
            "queued": len(self.dispatcher.queue),
            "requests": self.requests,
            "models": sorted({m for b in backends if b.online for m in b.models}),
        }


class Pools:
    """Every pool by name and Host, the access rules, and the union of their backends."""

    def __init__(self, default: Pool, settings: Settings, loop: asyncio.AbstractEventLoop,
                 make_backend: Callable[[str, int, BackendOptions | None], Backend],
                 drop_backend: Callable[[Backend], None]) -> None:
        self.default = default
        self.settings = settings
        self.loop = loop
        self.make_backend = make_backend
        self.drop_backend = drop_backend
        self.by_name: dict[str, Pool] = {DEFAULT_POOL: default}
        self.by_host: dict[bytes, Pool] = {}
        self.access_users: dict[str, frozenset[str]] = {}
        self.access_keys: dict[str, frozenset[str]] = {}
        # Something beyond the path prefix needs a look per request: Host
        # routing or access rules (False on a gateway without pools).
        self.active = False
        # Every backend of every pool, each once (health checks, dashboards).
        self.backends: list[Backend] = list(default.fleet.backends)
        # Called after a pool is added, changed or removed (required models).
        self.on_change: Callable[[Pool | None, str], None] | None = None

    # -- Per request --------------------------------------------------------

    def by_path(self, path: bytes) -> tuple[Pool | None, bytes, str]:
        """`/pool/NAME/rest` -> (the pool or None when unknown, `/rest`, NAME)."""
        end = path.find(b"/", len(POOL_PREFIX))
        raw = path[len(POOL_PREFIX):] if end < 0 else path[len(POOL_PREFIX):end]
        rest = b"/" if end < 0 else path[end:]
        name = raw.decode("utf-8", "replace")
        return self.by_name.get(name), rest, name

    def for_host(self, host: bytes) -> Pool | None:
        """The pool a Host header value reaches (with or without its port), if any."""
        by_host = self.by_host
        if not by_host or not host:
            return None
        host = host.strip().lower()
        pool = by_host.get(host)
        if pool is None and not host.endswith(b"]"):
            colon = host.rfind(b":")
            if colon > 0:
                pool = by_host.get(host[:colon])
        return pool

    def check_access(self, pool: Pool, user: str, key_id: str) -> None:
        """PoolError(403) when the user or the key is limited to other pools."""
        if self.access_keys and key_id:
            allowed = self.access_keys.get(key_id)
            if allowed is not None and pool.name not in allowed:
                raise PoolError(403, f"this API key may not use pool '{pool.name}'")
        if self.access_users:
            allowed = self.access_users.get(user)
            if allowed is not None and pool.name not in allowed:
                raise PoolError(403, f"user '{user}' may not use pool '{pool.name}'")

    # -- Topology -----------------------------------------------------------

    def pools(self) -> list[Pool]:
        """Default first, then the named pools by name."""
        return [self.default] + [self.by_name[n] for n in sorted(self.by_name)
                                 if n != DEFAULT_POOL]

    def pools_of(self, backend: Backend) -> list[str]:
        """Names of the pools that list `backend`."""
        return [p.name for p in self.pools() if backend in p.fleet.backends]

    def dispatchers(self) -> list[Dispatcher]:
        """Every pool's dispatcher, default first."""
        return [p.dispatcher for p in self.pools()]

    def pump_all(self) -> None:
        """A backend changed state: every pool may be able to start requests."""
        for pool in self.pools():
            pool.dispatcher.pump()

    def rebuild_index(self) -> None:
        """Recompute every pool's model index (after probes); the health checker calls it."""
        for pool in self.pools():
            pool.fleet.rebuild_index()

    def relink(self) -> None:
        """Recompute the backend union, Host table, shared-slot pumps and `active`."""
        seen: dict[Backend, list[Dispatcher]] = {}
        for pool in self.pools():
            for b in pool.fleet.backends:
                seen.setdefault(b, []).append(pool.dispatcher)
        self.backends = list(seen)
        for b, dispatchers in seen.items():
            b.pumps = tuple(dispatchers) if len(dispatchers) > 1 else ()
        by_host: dict[bytes, Pool] = {}
        for pool in self.pools():
            for host in pool.config.hosts:
                by_host[host.encode()] = pool
        self.by_host = by_host
        self.active = bool(by_host or self.access_users or self.access_keys)

    def set_access(self, users: dict[str, list[str]], keys: dict[str, list[str]]) -> None:
        """Replace the access rules (user / key id -> pools it may use)."""
        self.access_users = {u: frozenset(p) for u, p in users.items()}
        self.access_keys = {k: frozenset(p) for k, p in keys.items()}
        self.relink()

    def find_backend(self, url: str) -> Backend | None:
        """A backend of any pool by URL."""
        for b in self.backends:
            if b.name == url or b.name == url.rstrip("/"):
                return b
        return None

    def put(self, config: PoolConfig) -> Pool:
        """Create or replace a pool (the default pool: aliases, hosts, required models only).

        Requests queued in a changed pool stay queued, but for a model none of
        its backends lists any more (answered as a new request, Dispatcher.pump);
        backends no pool lists any more are forgotten (requests running there finish).
        """
        name = config.name
        old = self.by_name.get(name)
        if name == DEFAULT_POOL:
            assert old is not None
            old.apply(config)
            self.relink()
            self._changed(old, "changed")
            return old
        backends = []
        for addr in config.backends:
            b = self.find_backend(addr.url)
            slots = config.backend_slots.get(addr.url, config.slots or self.settings.slots)
            options = config.backend_options.get(addr.url)
            if b is None:
                b = self.make_backend(addr.url, slots, options)
            else:
                if addr.url in config.backend_slots or config.slots is not None:
                    b.slots = slots
                if options is not None:
                    b.configure(options)
            backends.append(b)
        if old is None:
            fleet = Fleet(backends, Balance(config.balance or self.settings.balance))
            dispatcher = Dispatcher(fleet, self.settings, self.loop)
            pool = Pool(config, fleet, dispatcher)
            self.by_name[name] = pool
        else:
            pool = old
            pool.fleet.backends = backends
            pool.fleet.balance = Balance(config.balance or self.settings.balance)
            pool.fleet.rebuild_index()
            pool.apply(config)
        before = set(self.backends)
        self.relink()
        self._forget(before)
        pool.dispatcher.pump()
        self._changed(pool, "added" if old is None else "changed")
        return pool

    def remove(self, name: str) -> Pool:
        """Delete a named pool; its queued requests are answered 503 (KeyError: unknown)."""
        if name == DEFAULT_POOL:
            raise ValueError("the default pool cannot be removed")
        pool = self.by_name.pop(name)
        dispatcher = pool.dispatcher
        while dispatcher.retry_line:
            dispatcher.retry_line.popleft().respond_error(503, f"pool '{name}' was removed")
        for ticket in dispatcher.queue.expired(float("inf")):
            ex = cast(Any, ticket.payload)
            ex.ticket = None
            ex.gw.ledger.left_queue(ex.ustats)
            ex.respond_error(503, f"pool '{name}' was removed")
        before = set(self.backends)
        self.relink()
        self._forget(before)
        self._changed(None, name)
        return pool

    def _forget(self, before: set[Backend]) -> None:
        for b in before - set(self.backends):
            b.pumps = ()
            self.drop_backend(b)

    def _changed(self, pool: Pool | None, what: str) -> None:
        if self.on_change is not None:
            try:
                self.on_change(pool, what)
            except Exception:  # a listener's bug must not undo the change
                log.exception("pool change listener failed")

    def totals(self) -> dict[str, dict[str, int]]:
        """Per pool: queued, in flight, slots, backends online (metrics, tick events)."""
        out = {}
        for pool in self.pools():
            backends = pool.fleet.backends
            out[pool.name] = {
                "queued": len(pool.dispatcher.queue),
                "in_flight": sum(b.in_flight for b in backends),
                "slots": sum(b.slots for b in backends),
                "backends_online": sum(1 for b in backends if b.online),
                "backends_total": len(backends),
            }
        return out
