"""RedisStore: state shared by several gateway replicas through one Redis.

Layout, every key under `{namespace}:`
    keys          hash  key_id -> KeyRecord JSON
    users         hash  user -> UserSettings JSON
    backends      hash  url -> BackendRecord JSON
    blocked_users set
    blocked_ips   set   addresses and CIDRs, verbatim
    meta          hash  includes schema_version
    usage:days    zset  every day that has usage (all scores 0, ordered by name)
    usage:{day}   hash  one counter per (kind, user, model), kind r/p/c
    usage:hours   zset  every hour (YYYY-MM-DDTHH) that has hourly usage (scores 0)
    usage:h:{hour} hash one counter per (kind, user, key, model, backend),
                  kind r/e/x/s/p/c (requests, errors, cancelled, estimated tokens, tokens)
    win:{key}     string, incr_window counters with a TTL
    changes       pub/sub channel: "{topic} {origin}" after each operator write

Durability is the server's: with `appendonly yes` and `appendfsync always` a
write acknowledged to us survives a crash of Redis itself; with the default
`everysec` the last second can be lost. That is the operator's choice.

Each operator write and its announcement go in one MULTI/EXEC, so a replica
never hears of a change that did not happen, nor misses one that did while its
subscription is up. After the subscription drops and comes back, everything
is announced as changed, because messages published meanwhile are lost.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline, PubSub
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError, WatchError

from ollamamq_fast.config import redact_url

from . import codec
from .records import (
    META_TOPICS,
    TOPIC_BACKENDS,
    TOPIC_BLOCKS,
    TOPIC_KEYS,
    TOPIC_USERS,
    TOPICS,
    USAGE_COUNTERS,
    BackendRecord,
    KeyRecord,
    Snapshot,
    Usage,
    UsageHour,
    UserSettings,
)
from .store import SCHEMA_VERSION, StoreError

log = logging.getLogger("ollamamq_fast.state")

# The window counter must get its TTL in the same step as its first increment,
# or a replica dying in between would leave a counter that never resets.
_INCR_WINDOW_LUA = """
local total = redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return total
"""

# How long `open` waits for Redis to confirm the subscription: it answers at
# once when it is up, so this only bounds a hung server.
SUBSCRIBE_TIMEOUT_S = 5.0
# Retry pacing for the subscription while Redis is unreachable: fast enough to
# resync within a second of a restart, slow enough not to spin.
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 5.0

_USAGE_KINDS = (b"r", b"p", b"c")  # requests, prompt tokens, completion tokens
# One kind letter per UsageHour counter, in USAGE_COUNTERS order.
_HOUR_KINDS = dict(zip((b"r", b"e", b"x", b"s", b"p", b"c"), USAGE_COUNTERS, strict=True))

# redis-py leaves these two unannotated; typed here so mypy --strict still checks
# their callers.
_pubsub_aclose = cast(Callable[[PubSub], Awaitable[None]], PubSub.aclose)
_pipeline_multi = cast(Callable[[Pipeline], None], Pipeline.multi)


def _text(value: bytes | str) -> str:
    """A Redis reply item as text (replies are bytes: the client does not decode)."""
    return value.decode() if isinstance(value, bytes) else value


def _usage_field(kind: bytes, user: str, model: str) -> bytes:
    """One counter's field in a day hash; JSON keeps any user or model name unambiguous."""
    return kind + orjson.dumps([codec.storable(user), codec.storable(model)])


class RedisStore:
    """The Store for several replicas sharing one Redis."""

    def __init__(self, url: str, namespace: str = "ollamamq") -> None:
        self.url = url
        self.namespace = namespace
        # This replica's name in change announcements, so it can ignore its own.
        self.origin = uuid.uuid4().hex
        self._redis: aioredis.Redis | None = None
        self._pubsub: PubSub | None = None
        self._listener: asyncio.Task[None] | None = None
        self._incr_window: AsyncScript | None = None
        self._callbacks: list[Callable[[str], None]] = []
        ns = namespace
        self._keys = f"{ns}:keys"
        self._users = f"{ns}:users"
        self._backends = f"{ns}:backends"
        self._blocked_users = f"{ns}:blocked_users"
        self._blocked_ips = f"{ns}:blocked_ips"
        self._meta = f"{ns}:meta"
        self._days = f"{ns}:usage:days"
        self._hours = f"{ns}:usage:hours"
        self._channel = f"{ns}:changes"

    # Lifecycle

    async def open(self) -> None:
        """Connect, check the schema version, and subscribe before returning."""
        if self._redis is not None:
            return
        r = aioredis.Redis.from_url(self.url, decode_responses=False)
        try:
            await r.hsetnx(self._meta, "schema_version", str(SCHEMA_VERSION))
            stored = await r.hget(self._meta, "schema_version")
            if stored is not None and int(stored) > SCHEMA_VERSION:
                raise StoreError(
                    f"state schema v{int(stored)} in {redact_url(self.url)} is newer than"
                    f" this gateway's v{SCHEMA_VERSION}"
                )
            if stored is not None and int(stored) < SCHEMA_VERSION:
                await self._migrate(r, int(stored))
            pubsub = r.pubsub()
            await pubsub.subscribe(self._channel)
            # Wait for the confirmation: from here on no announcement is missed,
            # which lets the cache subscribe first and then load a snapshot.
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT_S):
                while True:
                    msg = await pubsub.get_message(timeout=SUBSCRIBE_TIMEOUT_S)
                    if msg is not None and msg["type"] == "subscribe":
                        break
        except RedisError as exc:
            await r.aclose()
            raise StoreError(f"cannot open Redis state at {redact_url(self.url)}: {exc}") from exc
        except BaseException:
            await r.aclose()
            raise
        self._redis, self._pubsub = r, pubsub
        self._incr_window = r.register_script(_INCR_WINDOW_LUA)
        self._listener = asyncio.get_running_loop().create_task(
            self._listen(pubsub), name="ollamamq-state-changes"
        )

    async def close(self) -> None:
        """Stop listening and close both connections."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            try:
                await listener
            except asyncio.CancelledError:
                # Our own cancel ends the listener; a cancel of close() itself goes on up.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            await _pubsub_aclose(pubsub)
        r, self._redis = self._redis, None
        self._incr_window = None
        if r is not None:
            await r.aclose()

    async def _migrate(self, r: aioredis.Redis, version: int) -> None:
        """Bring a store written by an older gateway up to SCHEMA_VERSION (once, by one replica)."""
        if version < 2 and await r.hsetnx(self._meta, "migrated_v2", "1"):
            # v1 kept daily rows only: each becomes hour 00 of its day, no key or backend.
            ns = self.namespace
            raw_days = cast(list[bytes], await r.zrange(self._days, 0, -1))
            for raw_day in raw_days:
                day = _text(raw_day)
                fields = cast(dict[bytes, bytes], await r.hgetall(f"{ns}:usage:{day}"))
                if not fields:
                    continue
                hour = f"{day}T00"
                mapping: dict[bytes | bytearray | memoryview | str | int | float,
                              bytes | bytearray | memoryview | str | int | float] = {}
                for raw_field, value in fields.items():
                    u_name, model = orjson.loads(raw_field[1:])
                    mapping[_hour_field(raw_field[:1], UsageHour(hour, u_name, "", model))] = value
                async with r.pipeline(transaction=True) as pipe:
                    pipe.hset(f"{ns}:usage:h:{hour}", mapping=mapping)
                    pipe.zadd(self._hours, {hour: 0})
                    await pipe.execute()
        await r.hset(self._meta, "schema_version", str(SCHEMA_VERSION))

    @property
    def _r(self) -> aioredis.Redis:
        """The open client; every call goes through here."""
        if self._redis is None:
            raise StoreError("Redis store is not open")
        return self._redis

    # Change announcements

    def subscribe(self, callback: Callable[[str], None]) -> None:
        """Register a sync callback for topics that ANOTHER replica changed."""
        self._callbacks.append(callback)

    def _announce(self, topic: str) -> bytes:
        """The message other replicas receive after a write to `topic`."""
        return f"{topic} {self.origin}".encode()

    async def _listen(self, pubsub: PubSub) -> None:
        """Dispatch other replicas' announcements; resync everything after a reconnect."""
        delay = RECONNECT_MIN_S
        while True:
            try:
                msg = await pubsub.get_message(timeout=None)
            except (RedisError, OSError) as exc:
                log.warning(
                    "state: change subscription lost (%s); retrying in %.1fs",
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            delay = RECONNECT_MIN_S
            if msg is None:
                continue
            if msg["type"] == "subscribe":
                # A reconnect re-subscribed us: what was published meanwhile is gone.
                await self._check_not_wiped()
                for topic in TOPICS + META_TOPICS:
                    self._dispatch(topic)
            elif msg["type"] == "message":
                topic, _, origin = _text(msg["data"]).partition(" ")
                if origin != self.origin and (topic in TOPICS or topic in META_TOPICS):
                    self._dispatch(topic)

    async def _check_not_wiped(self) -> None:
        """After a reconnect: say so loudly if Redis came back without our data.

        A Redis restarted without persistence (or a failover to an empty
        replica) has lost keys, users, blocks and backends; the replicas
        then follow the empty store. The schema version, written at the first
        start, is the witness; written again here, so one replica reports it.
        """
        try:
            wiped = await self._r.hsetnx(self._meta, "schema_version", str(SCHEMA_VERSION))
        except (RedisError, OSError):
            return  # down again: the next reconnect checks
        if wiped:
            log.error("state: Redis at %s came back without the gateway's data (restarted "
                      "without persistence, or an empty replica): keys, users, blocks "
                      "and runtime backends stored there are gone, on every replica; restore "
                      "them (or Redis from a backup) and give Redis persistence "
                      "(appendonly yes)", redact_url(self.url))

    def _dispatch(self, topic: str) -> None:
        """Call every callback; one that raises must not end the listener."""
        for callback in self._callbacks:
            try:
                callback(topic)
            except Exception:
                log.exception("state: change callback failed for topic %s", topic)

    async def _put(self, topic: str, name: str, field: str, value: bytes) -> None:
        """HSET one record and announce its topic in the same transaction."""
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hset(name, field, value)
            pipe.publish(self._channel, self._announce(topic))
            await pipe.execute()

    async def _remove(self, topic: str, name: str, field: str) -> None:
        """HDEL one record and announce its topic in the same transaction."""
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hdel(name, field)
            pipe.publish(self._channel, self._announce(topic))
            await pipe.execute()

    async def _set_member(self, name: str, member: str, present: bool) -> None:
        """SADD or SREM one blocklist entry and announce `blocks`."""
        async with self._r.pipeline(transaction=True) as pipe:
            if present:
                pipe.sadd(name, member)
            else:
                pipe.srem(name, member)
            pipe.publish(self._channel, self._announce(TOPIC_BLOCKS))
            await pipe.execute()

    # Operator state

    async def load_all(self) -> Snapshot:
        """Read everything but usage in one MULTI/EXEC (a consistent snapshot)."""
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hvals(self._keys)
            pipe.hvals(self._users)
            pipe.smembers(self._blocked_users)
            pipe.smembers(self._blocked_ips)
            pipe.hvals(self._backends)
            keys, users, blocked_users, blocked_ips, backends = await pipe.execute()
        return Snapshot(
            keys=sorted((codec.load_key(v) for v in keys), key=lambda k: k.key_id),
            users=sorted((codec.load_user(v) for v in users), key=lambda u: u.user),
            blocked_users={_text(u) for u in blocked_users},
            blocked_ips={_text(ip) for ip in blocked_ips},
            backends=sorted(
                (codec.load_backend(v) for v in backends), key=lambda b: b.url
            ),
        )

    async def put_key(self, rec: KeyRecord) -> None:
        """Insert or replace an API key by `key_id`."""
        await self._put(TOPIC_KEYS, self._keys, rec.key_id, codec.dumps(rec))

    async def revoke_key(self, key_id: str) -> bool:
        """Mark a key revoked; False when no such key exists (optimistic WATCH/MULTI)."""
        async with self._r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self._keys)
                    raw = await pipe.hget(self._keys, key_id)
                    if raw is None:
                        return False  # leaving the block resets the pipeline: UNWATCH
                    rec = codec.load_key(raw)
                    rec.revoked = True
                    _pipeline_multi(pipe)
                    pipe.hset(self._keys, key_id, codec.dumps(rec))
                    pipe.publish(self._channel, self._announce(TOPIC_KEYS))
                    await pipe.execute()
                    return True
                except WatchError:
                    # Another replica wrote a key between our read and write: redo.
                    continue

    async def put_user(self, s: UserSettings) -> None:
        """Insert or replace one user's settings."""
        await self._put(TOPIC_USERS, self._users, s.user, codec.dumps(s))

    async def delete_user(self, user: str) -> None:
        """Drop one user's settings (keys and blocks are left as they are)."""
        await self._remove(TOPIC_USERS, self._users, user)

    async def set_blocked_user(self, user: str, blocked: bool) -> None:
        """Add a user to or remove it from the blocklist."""
        await self._set_member(self._blocked_users, user, blocked)

    async def set_blocked_ip(self, ip: str, blocked: bool) -> None:
        """Add an address or CIDR to or remove it from the blocklist (stored verbatim)."""
        await self._set_member(self._blocked_ips, ip, blocked)

    async def put_backend(self, rec: BackendRecord) -> None:
        """Insert or replace a runtime backend by URL."""
        await self._put(TOPIC_BACKENDS, self._backends, rec.url, codec.dumps(rec))

    async def delete_backend(self, url: str) -> None:
        """Forget a runtime backend."""
        await self._remove(TOPIC_BACKENDS, self._backends, url)

    # Usage accounting

    async def add_usage(self, items: list[Usage], hours: Sequence[UsageHour] = ()) -> None:
        """Add a batch of deltas with HINCRBY in one MULTI/EXEC (all or none)."""
        if not items and not hours:
            return
        async with self._r.pipeline(transaction=True) as pipe:
            hour_names: set[str] = set()
            for h in hours:
                hour_hash = f"{self.namespace}:usage:h:{h.hour}"
                hour_names.add(h.hour)
                for kind, name in _HOUR_KINDS.items():
                    delta = getattr(h, name)
                    if delta:
                        pipe.hincrby(hour_hash, _hour_field(kind, h), delta)
            if hour_names:
                pipe.zadd(self._hours, {hour: 0 for hour in hour_names})
            days: set[str] = set()
            for u in items:
                day_hash = f"{self.namespace}:usage:{u.day}"
                days.add(u.day)
                for kind, delta in zip(
                    _USAGE_KINDS,
                    (u.requests, u.prompt_tokens, u.completion_tokens),
                    strict=True,
                ):
                    if delta:
                        pipe.hincrby(
                            day_hash, _usage_field(kind, u.user, u.model), delta
                        )
            if days:
                pipe.zadd(self._days, {day: 0 for day in days})
            await pipe.execute()

    async def usage(
        self, user: str | None = None, since_day: str | None = None
    ) -> list[Usage]:
        """Usage rows, filtered by user and first day, ordered by (day, user, model)."""
        # Days share score 0, so a lexicographic range is a date range for YYYY-MM-DD.
        low = f"[{since_day}" if since_day else "-"
        days = [_text(d) for d in await self._r.zrangebylex(self._days, low, "+")]
        if not days:
            return []
        async with self._r.pipeline(transaction=False) as pipe:
            for day in days:
                pipe.hgetall(f"{self.namespace}:usage:{day}")
            hashes: list[dict[bytes, bytes]] = await pipe.execute()
        rows: dict[tuple[str, str, str], Usage] = {}
        for day, fields in zip(days, hashes, strict=True):
            for raw_field, raw_value in fields.items():
                kind = raw_field[:1]
                u_name, model = orjson.loads(raw_field[1:])
                if user is not None and u_name != user:
                    continue
                row = rows.get((day, u_name, model))
                if row is None:
                    row = rows[(day, u_name, model)] = Usage(u_name, model, day)
                _add_counter(row, kind, int(raw_value))
        return [rows[k] for k in sorted(rows)]

    async def usage_hours(
        self, since_hour: str | None = None, until_hour: str | None = None
    ) -> list[UsageHour]:
        """Hourly rows with since_hour <= hour < until_hour, ordered by hour."""
        low = f"[{since_hour}" if since_hour else "-"
        high = f"({until_hour}" if until_hour else "+"
        hours = [_text(h) for h in await self._r.zrangebylex(self._hours, low, high)]
        if not hours:
            return []
        async with self._r.pipeline(transaction=False) as pipe:
            for hour in hours:
                pipe.hgetall(f"{self.namespace}:usage:h:{hour}")
            hashes: list[dict[bytes, bytes]] = await pipe.execute()
        out: list[UsageHour] = []
        for hour, fields in zip(hours, hashes, strict=True):
            rows: dict[tuple[str, str, str, str], UsageHour] = {}
            for raw_field, raw_value in fields.items():
                name = _HOUR_KINDS.get(raw_field[:1])
                if name is None:
                    continue
                dims = tuple(orjson.loads(raw_field[1:]))
                row = rows.get(dims)
                if row is None:
                    row = rows[dims] = UsageHour(hour, *dims)
                setattr(row, name, getattr(row, name) + int(raw_value))
            out.extend(rows[k] for k in sorted(rows))
        return out

    async def prune_usage_hours(self, before_hour: str) -> int:
        """Drop hourly hashes older than `before_hour`; returns the number of hours dropped."""
        hours = [_text(h) for h in await self._r.zrangebylex(
            self._hours, "-", f"({before_hour}")]
        if not hours:
            return 0
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.delete(*(f"{self.namespace}:usage:h:{hour}" for hour in hours))
            pipe.zrem(self._hours, *hours)
            await pipe.execute()
        return len(hours)

    async def prune_usage(self, before_day: str, keep: set[str]) -> int:
        """Delete all usage of users last seen before `before_day`, except `keep`.

        Reads the day hashes once (a background job, hourly at most); HDEL is
        idempotent, so replicas pruning at once agree.
        """
        days = [_text(d) for d in await self._r.zrangebylex(self._days, "-", "+")]
        old = [d for d in days if d < before_day]
        if not old:
            return 0
        async with self._r.pipeline(transaction=False) as pipe:
            for day in days:
                pipe.hkeys(f"{self.namespace}:usage:{day}")
            fields_by_day: list[list[bytes]] = await pipe.execute()
        recent: set[str] = set()
        old_fields: dict[str, list[tuple[str, bytes]]] = {}
        for day, fields in zip(days, fields_by_day, strict=True):
            for raw in fields:
                user = orjson.loads(raw[1:])[0]
                if day >= before_day:
                    recent.add(user)
                else:
                    old_fields.setdefault(user, []).append((day, raw))
        idle = [u for u in old_fields if u not in recent and u not in keep]
        if not idle:
            return 0
        async with self._r.pipeline(transaction=True) as pipe:
            for user in idle:
                for day, raw in old_fields[user]:
                    pipe.hdel(f"{self.namespace}:usage:{day}", raw)
            await pipe.execute()
        return len(idle)

    # Metadata, windows

    async def get_meta(self, key: str) -> str | None:
        """Read one free-form metadata value."""
        raw = await self._r.hget(self._meta, key)
        return None if raw is None else _text(raw)

    async def set_meta(self, key: str, value: str) -> None:
        """Write one free-form metadata value (announced when it is one of META_TOPICS)."""
        if key in META_TOPICS:
            await self._put(key, self._meta, key, value.encode())
        else:
            await self._r.hset(self._meta, key, value)

    async def claim_meta(self, key: str, value: str) -> bool:
        """Write one metadata value unless the key has one (HSETNX: one replica wins)."""
        return bool(await self._r.hsetnx(self._meta, key, value))

    async def incr_window(self, key: str, window_s: float, amount: float) -> float:
        """Add to a counter shared by all replicas; it expires `window_s` after its first hit."""
        script = self._incr_window
        if script is None:
            raise StoreError("Redis store is not open")
        ttl_ms = max(1, int(window_s * 1000))
        total: Any = await script(
            keys=[f"{self.namespace}:win:{key}"], args=[repr(float(amount)), ttl_ms]
        )
        return float(total)


def _hour_field(kind: bytes, h: UsageHour) -> bytes:
    """One counter's field in an hour hash: the kind letter, then the row's dimensions."""
    return kind + orjson.dumps([codec.storable(h.user), codec.storable(h.key),
                                codec.storable(h.model), codec.storable(h.backend)])


def _add_counter(row: Usage, kind: bytes, value: int) -> None:
    """Add one decoded day-hash counter to its usage row."""
    if kind == b"r":
        row.requests += value
    elif kind == b"p":
        row.prompt_tokens += value
    elif kind == b"c":
        row.completion_tokens += value
