"""What an operator can see and change on a running gateway.

The admin API, the CLI and the dashboards all go through this one object, so
every change is applied the same way: to the live state the data plane reads,
then announced on the event bus. Runs on the gateway's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

import orjson

from ollamamq_fast.config import (
    DEFAULT_POOL,
    BackendOptions,
    ConfigError,
    check_pool_name,
    check_pools,
    check_setting,
    parse_pool,
)
from ollamamq_fast.limits import check_limit
from ollamamq_fast.policy.identity import check_key_user
from ollamamq_fast.state.cache import StateCache
from ollamamq_fast.state.records import (
    DEFAULT_SCOPES,
    BackendRecord,
    KeyRecord,
    UsageHour,
    UserSettings,
    key_digest,
    parse_scopes,
)

if TYPE_CHECKING:
    from ollamamq_fast.fleet.backend import Backend
    from ollamamq_fast.gateway import GatewayState

log = logging.getLogger("ollamamq_fast.operator")

# Admin lists are answered a page at a time: this many rows unless asked
# otherwise, never more than MAX_PAGE (an answer must not hold the loop long).
DEFAULT_PAGE = 1000
MAX_PAGE = 10_000
# Subscribers that fall this far behind lose events rather than grow memory.
EVENT_QUEUE_LIMIT = 1000


class NotStored(Exception):
    """An operator change is live but the store has not taken it yet (retried in the background)."""


class EventBus:
    """In-process publish/subscribe for state changes and per-second counters."""

    def __init__(self) -> None:
        self.subscribers: set[asyncio.Queue[dict[str, Any]]] = set()

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        """A queue that receives every event published from now on."""
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(EVENT_QUEUE_LIMIT)
        self.subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        """Stop delivering to `q`."""
        self.subscribers.discard(q)

    def publish(self, kind: str, **data: Any) -> None:
        """Send an event to every subscriber (dropped for a full queue)."""
        if not self.subscribers:
            return
        event = {"type": kind, "ts": time.time(), **data}
        for q in self.subscribers:
            if not q.full():
                q.put_nowait(event)


class Operator:
    """Operator actions and read models over a running gateway's state.

    Keys, user settings, blocks and runtime-added backends live in the
    StateCache (persisted by its store, shared across replicas with Redis);
    the fair queue and the fleet get the same settings applied live.
    """

    def __init__(self, state: GatewayState, cache: StateCache) -> None:
        self.state = state
        self.cache = cache
        self.events = EventBus()
        cache.on_change = self._changed_elsewhere

    async def stored(self) -> None:
        """Return once every change made so far is in the store (committed to SQLite,
        acknowledged by Redis): an admin answer of 200 promises the change survives a
        kill -9. Raises NotStored when the store fails; the write stays queued.
        """
        try:
            await self.cache.flush()
        except Exception as exc:  # any store failure is reported the same way
            raise NotStored(f"the change is live but not stored yet ({exc}); it is retried in "
                            "the background, and a restart before then loses it") from exc

    def restore(self) -> None:
        """Apply what the store remembers (at start, after the cache has loaded)."""
        self._apply_pools()
        self._apply_users()
        self._apply_backends()

    def _changed_elsewhere(self, topic: str) -> None:
        # Another replica changed something; keys and blocks are read through
        # the cache, users and backends must be applied to the live parts.
        if topic == "users":
            self._apply_users()
        elif topic == "backends":
            self._apply_backends()
        elif topic in ("pools", "pool_access"):
            self._apply_pools()
        self.events.publish("state_reloaded", topic=topic)

    def _apply_users(self) -> None:
        for dispatcher in self.state.pools.dispatchers():
            queue = dispatcher.queue
            for s in list(self.cache.users.values()):
                queue.set_vip(s.user, s.vip)
                queue.set_boost(s.user, s.boost)
                queue.set_weight(s.user, max(1, int(s.weight)))
        self.state.pools.pump_all()

    def _apply_backends(self) -> None:
        self.reconcile_backends()

    def _desired_backends(self) -> dict[str, int | None]:
        """URL -> slots (None: the default) of the fleet: the configured list with overrides."""
        desired: dict[str, int | None] = dict(self.state.configured)
        for rec in list(self.cache.backends.values()):
            if rec.removed:
                desired.pop(rec.url, None)
            elif rec.url not in desired or rec.slots is not None:
                desired[rec.url] = rec.slots
        return desired

    def reconcile_backends(
        self, options: dict[str, BackendOptions] | None = None
    ) -> dict[str, Any]:
        """Make the live fleet the configured list with the stored overrides applied.

        Called at start, when another replica changed the backends, and by a
        config reload (with the file's per-backend `options`). Backends no
        longer wanted stop receiving requests (running ones finish). Returns
        what changed: {"added": [...], "removed": [...], "slots": {url: n}}.
        """
        state = self.state
        fleet = state.fleet
        desired = self._desired_backends()
        changes: dict[str, Any] = {"added": [], "removed": [], "slots": {}}
        for backend in list(fleet.backends):
            if backend.name not in desired:
                state.remove_backend(backend.name)
                changes["removed"].append(backend.name)
        for url, slots in desired.items():
            want = slots or state.settings.slots
            opts = options.get(url) if options is not None else None
            existing = fleet.find(url)
            if existing is None:
                state.add_backend(url, want, opts)
                changes["added"].append(url)
                continue
            if existing.slots != want:
                existing.slots = want
                changes["slots"][url] = want
            if options is not None:
                existing.configure(opts if opts is not None else BackendOptions())
        state.pools.pump_all()
        return changes

    # -- Backends -----------------------------------------------------------

    def list_backends(self) -> list[dict[str, Any]]:
        """Every backend of every pool with its live state, the pools listing it, where it
        comes from and its runtime override.

        `source`: "config" (command line, TOML file or a pool's definition) or
        "runtime" (added through the admin API); `override`: null, or what a
        runtime change replaced in the configured entry ({"slots": n}).
        """
        pools = self.state.pools
        configured = self.state.configured
        records = self.cache.backends
        out = []
        for b in pools.backends:
            row = b.snapshot()
            row["pools"] = pools.pools_of(b)
            rec = records.get(b.name)
            if b.name in configured:
                row["source"] = "config"
                row["configured_slots"] = configured[b.name]
                row["override"] = ({"slots": rec.slots}
                                   if rec is not None and rec.slots is not None else None)
            else:
                row["source"] = "runtime" if rec is not None and not rec.removed else "config"
                row["override"] = None
            out.append(row)
        return out

    def removed_backends(self) -> list[str]:
        """Configured backends an operator removed at runtime (removal overrides), sorted."""
        configured = self.state.configured
        return sorted(r.url for r in list(self.cache.backends.values())
                      if r.removed and r.url in configured)

    # -- Pools ----------------------------------------------------------------
    # Pools made or changed here are stored (one JSON document in the store's
    # metadata, "pools"; a removed pool as null) and applied over the config
    # file's at the next start. Access rules alike ("pool_access").

    def restore_pools(self) -> None:
        """Re-apply the stored pools and access rules over the config file's (after a reload)."""
        self._apply_pools()

    def _apply_pools(self) -> None:
        pools = self.state.pools
        raw = self.cache.meta.get("pools")
        stored: dict[str, Any] = orjson.loads(raw) if raw else {}
        for name, data in stored.items():
            try:
                if data is None:
                    if name in pools.by_name and name != DEFAULT_POOL:
                        pools.remove(name)
                    continue
                pools.put(parse_pool(name, data, "stored pool"))
            except (ConfigError, KeyError, ValueError) as exc:
                log.warning("stored pool %s not applied: %s", name, exc)
        pools.set_access(*self._access())

    def _stored(self, key: str) -> dict[str, Any]:
        raw = self.cache.meta.get(key)
        return dict(orjson.loads(raw)) if raw else {}

    def _access(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """The access rules in force: the config file's, overridden by the stored ones."""
        settings = self.state.settings
        users, keys = dict(settings.pool_access_users), dict(settings.pool_access_keys)
        stored = self._stored("pool_access")
        for table, part in ((users, "users"), (keys, "keys")):
            for who, allowed in (stored.get(part) or {}).items():
                if allowed is None:
                    table.pop(who, None)
                else:
                    table[who] = list(allowed)
        return users, keys

    def list_pools(self) -> list[dict[str, Any]]:
        """Every pool with its definition and live numbers, default first."""
        return [self.pool_snapshot(p.name) for p in self.state.pools.pools()]

    def pool_snapshot(self, name: str) -> dict[str, Any]:
        """One pool (KeyError: unknown)."""
        pool = self.state.pools.by_name[name]
        row = pool.snapshot()
        row["pulls"] = [j for j in self.state.required.progress()
                        if name in j["pools"]]
        return row

    def set_pool(self, name: str, data: dict[str, Any], create: bool) -> dict[str, Any]:
        """Create (`create`) or replace a pool from its JSON definition; stored.

        ValueError: it exists (create) or does not (replace); ConfigError: invalid.
        """
        pools = self.state.pools
        check_pool_name(name)
        exists = name in pools.by_name
        if create and exists:
            raise ValueError(f"pool {name} already exists")
        if not create and not exists:
            raise KeyError(f"no pool {name}")
        config = parse_pool(name, {k: v for k, v in data.items() if k != "name"}, "pool")
        others = {p.name: p.config for p in pools.pools() if p.name != name}
        check_pools({**others, name: config}, self.state.settings.backends)
        pool = pools.put(config)
        stored = self._stored("pools")
        stored[name] = config.to_dict()
        self.cache.put_meta("pools", orjson.dumps(stored).decode())
        self.events.publish("pool_added" if create else "pool_changed", pool=pool.snapshot())
        return self.pool_snapshot(name)

    def patch_pool(self, name: str, data: dict[str, Any]) -> dict[str, Any]:
        """Change some fields of a pool's definition (the others are kept)."""
        pool = self.state.pools.by_name.get(name)
        if pool is None:
            raise KeyError(f"no pool {name}")
        merged = pool.config.to_dict()
        merged.update(data)
        if name == DEFAULT_POOL:
            merged.pop("backends", None)
        return self.set_pool(name, merged, create=False)

    def remove_pool(self, name: str) -> None:
        """Delete a named pool (KeyError: unknown; ValueError: the default pool)."""
        self.state.pools.remove(name)
        stored = self._stored("pools")
        stored[name] = None
        self.cache.put_meta("pools", orjson.dumps(stored).decode())
        self.events.publish("pool_removed", pool=name)

    def set_pool_access(self, part: str, who: str, allowed: list[str] | None) -> dict[str, Any]:
        """Limit a user ("users") or an API key id ("keys") to some pools; None lifts it."""
        if part not in ("users", "keys"):
            raise ValueError("part must be users or keys")
        checked = None if allowed is None else [check_pool_name(p) for p in allowed]
        stored = self._stored("pool_access")
        table = dict(stored.get(part) or {})
        table[who] = checked
        stored[part] = table
        self.cache.put_meta("pool_access", orjson.dumps(stored).decode())
        self.state.pools.set_access(*self._access())
        row = {part[:-1]: who, "pools": checked}
        self.events.publish("pool_access_changed", **row)
        return row

    def pool_access(self) -> dict[str, Any]:
        """The access rules in force: user / key id -> pools it may use."""
        users, keys = self._access()
        return {"users": users, "keys": keys}

    def _backend(self, url: str) -> Backend:
        backend = self.state.pools.find_backend(url)
        if backend is None:
            raise KeyError(f"no backend {url}")
        return backend

    def add_backend(self, url: str, slots: int | None = None) -> dict[str, Any]:
        """Add a backend at runtime (serves traffic after its first probe); persisted.

        Re-adding a configured backend that was removed clears its removal
        override (with `slots`, they become its slots override).
        """
        if slots is not None:
            check_setting("slots", slots)
        if self.state.fleet.find(url) is not None:
            raise ValueError(f"backend {url} already exists")
        configured = self.state.configured.get(url)
        backend = self.state.add_backend(url, slots or configured)
        if configured is not None and (slots is None or slots == configured):
            self.cache.delete_backend(backend.name)
        else:
            self.cache.put_backend(BackendRecord(backend.name, slots))
        self.state.pools.pump_all()
        self.events.publish("backend_added", backend=backend.snapshot())
        return backend.snapshot()

    def remove_backend(self, url: str) -> None:
        """Remove a backend; requests running on it finish.

        A configured backend stays removed (across restarts and reloads, on
        every replica) through a removal override; a runtime one is forgotten.
        """
        backend = self.state.remove_backend(url)
        if backend.name in self.state.configured:
            self.cache.put_backend(BackendRecord(backend.name, None, removed=True))
        else:
            self.cache.delete_backend(backend.name)
        self.events.publish("backend_removed", url=backend.name)

    def reset_backend(self, url: str) -> dict[str, Any]:
        """Drop the runtime override of a configured backend: its configured entry applies again.

        KeyError: the URL is not in the configured list; ValueError: it has no override.
        """
        configured = self.state.configured
        name = url.rstrip("/")
        if name not in configured:
            raise KeyError(f"{url} is not a configured backend (remove a runtime one instead)")
        if name not in self.cache.backends:
            raise ValueError(f"backend {name} has no runtime override")
        self.cache.delete_backend(name)
        changes = self.reconcile_backends()
        backend = self.state.fleet.find(name)
        assert backend is not None
        if name in changes["added"]:
            self.events.publish("backend_added", backend=backend.snapshot())
        else:
            self.events.publish("backend_changed", backend=backend.snapshot())
        return backend.snapshot()

    def set_draining(self, url: str, on: bool) -> dict[str, Any]:
        """Drain (no new requests) or undrain a backend."""
        backend = self.state.set_draining(url, on)
        self.events.publish("backend_changed", backend=backend.snapshot())
        return backend.snapshot()

    def set_slots(self, url: str, slots: int) -> dict[str, Any]:
        """Change how many requests run at once on a backend; persisted.

        For a configured backend this is a slots override (shown as such);
        setting its configured value again clears the override.
        """
        check_setting("slots", slots)
        backend = self._backend(url)
        backend.slots = slots
        configured = self.state.configured.get(backend.name)
        if configured is not None and slots == configured:
            if backend.name in self.cache.backends:
                self.cache.delete_backend(backend.name)
        elif configured is not None or backend.name in self.cache.backends:
            self.cache.put_backend(BackendRecord(backend.name, slots))
        # else: a backend only named pools list; their definitions own its slots.
        self.state.pools.pump_all()
        self.events.publish("backend_changed", backend=backend.snapshot())
        return backend.snapshot()

    # -- Users ----------------------------------------------------------------

    def list_users(self) -> list[dict[str, Any]]:
        """Every user seen or configured (in-process callers; the admin API pages)."""
        return self.users_page(None)[0]

    def users_page(self, limit: int | None = DEFAULT_PAGE, offset: int = 0,
                   sort: str = "name") -> tuple[list[dict[str, Any]], int]:
        """One page of users with traffic counters and fair-share settings, and the total.

        `sort`: "name", or "active" (queued + running first, then most recently
        seen), the order dashboards show. Only the page's rows are built, so
        an answer costs the page, not the user count.
        """
        queue = self.state.dispatcher.queue
        stats = self.state.stats.users
        blocked = self.cache.blocked_users
        names = list(set(stats) | set(blocked) | set(self.cache.users))
        if sort == "active":
            def activity(name: str) -> tuple[int, float]:
                s = stats.get(name)
                return (0, 0.0) if s is None else (s.queued + s.in_flight, s.last_seen)
            names.sort(key=activity, reverse=True)
        else:
            names.sort()
        page = names[offset:] if limit is None else names[offset:offset + limit]
        out = []
        for name in page:
            row: dict[str, Any] = stats[name].snapshot() if name in stats else {"user": name}
            row["vip"] = queue.is_vip(name)
            row["boost"] = queue.is_boost(name)
            row["weight"] = queue.weight(name)
            row["blocked"] = name in blocked
            out.append(row)
        return out, len(names)

    def set_user(self, user: str, vip: bool | None = None, boost: bool | None = None,
                 weight: int | None = None) -> dict[str, Any]:
        """Change a user's VIP / Boost / weight; takes effect on the next dispatch."""
        queue = self.state.dispatcher.queue
        if weight is not None:
            check_setting("weight", weight)
        for dispatcher in self.state.pools.dispatchers():
            if weight is not None:
                dispatcher.queue.set_weight(user, weight)
            if vip is not None:
                dispatcher.queue.set_vip(user, vip)
            if boost is not None:
                dispatcher.queue.set_boost(user, boost)
        old = self.cache.user(user)
        self.cache.put_user(UserSettings(user, queue.is_vip(user), queue.is_boost(user),
                                         queue.weight(user), dict(old.limits) if old else {}))
        self.state.pools.pump_all()
        row = {"user": user, "vip": queue.is_vip(user), "boost": queue.is_boost(user),
               "weight": queue.weight(user)}
        self.events.publish("user_changed", user=row)
        return row

    # -- Usage policy: limits, quotas, usage ------------------------------------

    def set_limits(self, user: str, **limits: Any) -> dict[str, Any]:
        """Override limits for one user (limits.py names; None drops an override).

        Persisted with the user's settings (shared with replicas on Redis);
        new requests see it at once. ValueError on an unknown name or bad value.
        """
        old = self.cache.user(user)
        overrides: dict[str, float | int] = dict(old.limits) if old else {}
        for name, value in limits.items():
            if value is None:
                check_limit(name, 0)  # the name must still be known
                overrides.pop(name, None)
            else:
                overrides[name] = check_limit(name, value)
        queue = self.state.dispatcher.queue
        self.cache.put_user(UserSettings(user, queue.is_vip(user), queue.is_boost(user),
                                         queue.weight(user), overrides))
        self.state.policy.limits_changed()
        row = self.limits(user)
        self.events.publish("user_limits_changed", **row)
        return row

    def limits(self, user: str) -> dict[str, Any]:
        """A user's limit overrides and the limits in effect (defaults applied)."""
        old = self.cache.user(user)
        effective = self.state.policy.limits_for(user).public()
        overrides = dict(old.limits) if old else {}
        if "max_tokens_mode" in overrides:
            overrides["max_tokens_mode"] = effective["max_tokens_mode"]
        return {"user": user, "overrides": overrides, "effective": effective}

    def quota(self, user: str) -> dict[str, Any]:
        """Tokens a user used today / this month / in total, as the quota check sees them."""
        policy = self.state.policy
        day, month, total = policy.quota.used(user)
        limits = policy.limits_for(user)
        return {"user": user, "used_day": day, "used_month": month, "used_total": total,
                "quota_day": limits.quota_day, "quota_month": limits.quota_month,
                "quota_total": limits.quota_total, "tracking": policy.quotas_on}

    async def usage(self, user: str | None = None,
                    since_day: str | None = None) -> list[dict[str, Any]]:
        """Token usage rows per (day, user, model) from the store, pending usage flushed first."""
        try:
            await self.cache.flush()
        except Exception as exc:  # noqa: BLE001 -- answer with what the store has
            log.debug("usage report: pending usage not flushed first: %r", exc)
        rows = await self.cache.store.usage(user, since_day)
        return [{"day": r.day, "user": r.user, "model": r.model, "requests": r.requests,
                 "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                 "total_tokens": r.prompt_tokens + r.completion_tokens} for r in rows]

    async def usage_hours(self, since_hour: str | None = None,
                          until_hour: str | None = None) -> list[UsageHour]:
        """Hourly usage rows from the store (since <= hour < until), pending usage flushed first."""
        with contextlib.suppress(Exception):  # a failed flush: answer with what the store has
            await self.cache.flush()
        return await self.cache.store.usage_hours(since_hour, until_hour)

    # -- Blocklist ------------------------------------------------------------

    def block_user(self, user: str, on: bool) -> None:
        """Block (403 at arrival and dispatch) or unblock a user."""
        self.cache.set_blocked_user(user, on)
        self.events.publish("user_blocked" if on else "user_unblocked", user=user)

    def block_ip(self, ip: str, on: bool) -> None:
        """Block or unblock an address or a CIDR range (ValueError if neither)."""
        self.cache.set_blocked_ip(ip, on)
        self.events.publish("ip_blocked" if on else "ip_unblocked", ip=ip)

    def is_blocked(self, user: str, ip: str) -> bool:
        """Whether a request from this user / address must be refused (hot path)."""
        cache = self.cache
        if not cache.any_blocked:
            return False  # the usual case: nothing is blocked
        return cache.is_blocked_user(user) or cache.is_blocked_ip(ip)

    def list_blocked(self, limit: int | None = None, offset: int = 0) -> dict[str, Any]:
        """Blocked users and IPs (each list paged alike), with their totals."""
        users, ips = sorted(self.cache.blocked_users), sorted(self.cache.blocked_ips)
        end = None if limit is None else offset + limit
        return {"users": users[offset:end], "ips": ips[offset:end],
                "total_users": len(users), "total_ips": len(ips)}

    # -- API keys ---------------------------------------------------------------

    def create_key(self, user: str, name: str = "", trusted: bool = False,
                   scopes: tuple[str, ...] = DEFAULT_SCOPES) -> dict[str, Any]:
        """Create a key for `user`; the secret is in the answer and nowhere else.

        ValueError for an unknown scope or a user a key may not have
        (policy.identity.check_key_user: empty, or with the service separator ':').
        """
        user = check_key_user(user)
        scopes = parse_scopes(list(scopes))
        secret = "omq-" + secrets.token_urlsafe(32)
        record = KeyRecord(secrets.token_hex(6), key_digest(secret), user, name, time.time(),
                           False, trusted, scopes)
        self.cache.put_key(record)
        self.events.publish("key_created", key_id=record.key_id, user=user)
        return {**self._public(record), "secret": secret}

    def list_keys(self) -> list[dict[str, Any]]:
        """Keys without their digests (in-process callers; the admin API pages)."""
        return self.keys_page(None)[0]

    def keys_page(self, limit: int | None = DEFAULT_PAGE,
                  offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """One page of keys, oldest first, without their digests; and the total."""
        records = sorted(self.cache.keys.values(), key=lambda r: (r.created_at, r.key_id))
        end = None if limit is None else offset + limit
        return [self._public(r) for r in records[offset:end]], len(records)

    def set_key_scopes(self, key_id: str, scopes: tuple[str, ...]) -> dict[str, Any]:
        """Change what a key may do (KeyError: no such key; ValueError: unknown scope)."""
        old = self.cache.keys.get(key_id)
        if old is None:
            raise KeyError(f"no key {key_id}")
        record = dataclasses.replace(old, scopes=parse_scopes(list(scopes)))
        self.cache.put_key(record)
        self.events.publish("key_changed", key_id=key_id, scopes=list(record.scopes))
        return self._public(record)

    def revoke_key(self, key_id: str) -> None:
        """Revoke a key: requests with it get 401 from now on."""
        if not self.cache.revoke_key(key_id):
            raise KeyError(f"no key {key_id}")
        self.events.publish("key_revoked", key_id=key_id)

    @staticmethod
    def _public(record: KeyRecord) -> dict[str, Any]:
        return {"key_id": record.key_id, "user": record.user, "name": record.name,
                "created_at": record.created_at, "revoked": record.revoked,
                "trusted": record.trusted, "scopes": list(record.scopes)}

    # -- Snapshots -------------------------------------------------------------

    def stats_snapshot(self) -> dict[str, Any]:
        """Gateway-wide numbers for dashboards."""
        state = self.state
        stats = state.stats
        queue = state.dispatcher.queue
        pools = state.pools.totals()
        return {
            "uptime_s": round(time.monotonic() - state.started_at, 1),
            "queued": sum(p["queued"] for p in pools.values()) if pools else len(queue),
            "in_flight": sum(b.in_flight for b in state.pools.backends),
            "pools": pools,
            "pulls": state.required.progress(),
            "completed": stats.completed,
            "cancelled": stats.cancelled,
            "failovers": stats.failovers,
            "rejected": stats.rejected,
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
            "estimated_tokens": stats.estimated_tokens,
            "latency_p50_s": stats.latency.quantile(0.5),
            "latency_p99_s": stats.latency.quantile(0.99),
            "ttfb_p50_s": stats.ttfb.quantile(0.5),
            "queue_wait_p99_s": stats.queue_wait.quantile(0.99),
            "backends": self.list_backends(),
            "users": len(stats.users),
            # Access lines written, dropped (the writer thread was behind), waiting.
            "access_log": state.access.counters(),
            # Operator writes and usage rows not yet in the state store, and
            # writes given up on because the store kept refusing them.
            "store": {"pending": self.cache.pending, "dropped": self.cache.writes_dropped},
            # With --redis: this replica's slot leases and whether it schedules locally.
            "shared_slots": state.shared.snapshot() if state.shared is not None else None,
        }
