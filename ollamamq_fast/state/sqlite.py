"""SQLiteStore: the default, single-process state store in one WAL-mode file.

Every sqlite3 call runs on one dedicated worker thread that also created the
connection: the event loop never waits on the disk, and one thread means one
connection with no locking between our own writers.

Durability: WAL with `synchronous=NORMAL` (the default here) commits by
appending to the WAL without an fsync. A committed write survives the gateway
being killed (`kill -9`), because the bytes are already in the OS page cache; an
OS crash or power loss can lose the last transactions (never corrupt the file).
Pass `synchronous="FULL"` to fsync every commit when that matters more than
write latency; operator writes are rare, usage flushes batch many requests.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, TypeVar

import orjson

from .codec import limits_from, storable
from .records import (
    DEFAULT_SCOPES,
    SCOPES,
    BackendRecord,
    KeyRecord,
    Snapshot,
    Usage,
    UsageHour,
    UserSettings,
)
from .store import SCHEMA_VERSION, StoreError
from .windows import LocalWindows

T = TypeVar("T")

# Another process holding the write lock (an operator running `sqlite3` on the
# file, a backup) is waited for this long before a write fails and is retried by
# the cache's flusher.
BUSY_TIMEOUT_MS = 5000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY, digest TEXT NOT NULL, user TEXT NOT NULL,
    name TEXT NOT NULL, created_at REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0, trusted INTEGER NOT NULL DEFAULT 0,
    scopes TEXT NOT NULL DEFAULT 'inference') WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS users (
    user TEXT PRIMARY KEY, vip INTEGER NOT NULL, boost INTEGER NOT NULL,
    weight INTEGER NOT NULL, limits TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blocked_users (user TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blocked_ips (ip TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS backends (
    url TEXT PRIMARY KEY, slots INTEGER, removed INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage (
    user TEXT NOT NULL, model TEXT NOT NULL, day TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0, prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user, model, day)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_by_day ON usage (day);
CREATE TABLE IF NOT EXISTS usage_hours (
    hour TEXT NOT NULL, user TEXT NOT NULL, key_id TEXT NOT NULL, model TEXT NOT NULL,
    backend TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0, errors INTEGER NOT NULL DEFAULT 0,
    cancelled INTEGER NOT NULL DEFAULT 0, estimated_tokens INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, user, key_id, model, backend)) WITHOUT ROWID;
"""

# v1 kept daily rows only: each becomes hour 00 of its day, with no key or
# backend, so the history before the upgrade still shows in /api/usage.
_MIGRATE_V1_USAGE = """
INSERT OR IGNORE INTO usage_hours
    (hour, user, key_id, model, backend, requests, prompt_tokens, completion_tokens)
SELECT day || 'T00', user, '', model, '', requests, prompt_tokens, completion_tokens FROM usage
"""

_ADD_USAGE_HOUR = """
INSERT INTO usage_hours (hour, user, key_id, model, backend, requests, errors, cancelled,
    estimated_tokens, prompt_tokens, completion_tokens)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (hour, user, key_id, model, backend) DO UPDATE SET
    requests = requests + excluded.requests,
    errors = errors + excluded.errors,
    cancelled = cancelled + excluded.cancelled,
    estimated_tokens = estimated_tokens + excluded.estimated_tokens,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens
"""

_ADD_USAGE = """
INSERT INTO usage (user, model, day, requests, prompt_tokens, completion_tokens)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (user, model, day) DO UPDATE SET
    requests = requests + excluded.requests,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens
"""


def _in_transaction(db: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run `fn` inside BEGIN IMMEDIATE ... COMMIT, rolling back on any error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        result = fn(db)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return result


def _scopes(text: str) -> tuple[str, ...]:
    """A stored key's scopes ('inference,models'); unknown names (a newer gateway's) are skipped."""
    known = tuple(s for s in SCOPES if s in text.split(","))
    return known or DEFAULT_SCOPES


class SQLiteStore:
    """The Store for one gateway process, in a single SQLite file."""

    def __init__(
        self, path: str, synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    ) -> None:
        self.path = path
        self.synchronous = synchronous
        self._db: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._windows = LocalWindows()
        # Kept only to honour the interface: one process has no other replica.
        self._callbacks: list[Callable[[str], None]] = []

    # Lifecycle

    async def open(self) -> None:
        """Start the worker thread, open the file there, create the schema."""
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="ollamamq-sqlite"
        )
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self._connect
            )
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    def _connect(self) -> None:
        """Open the connection on the worker thread and bring the schema up to date."""
        try:
            # Autocommit mode: single statements commit on their own, batches use
            # explicit BEGIN IMMEDIATE so they take the write lock up front.
            db = sqlite3.connect(
                self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000
            )
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(f"PRAGMA synchronous={self.synchronous}")
                db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
                _in_transaction(db, self._create_schema)
            except BaseException:
                db.close()
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open state file {self.path!r}: {exc}") from exc
        self._db = db

    @staticmethod
    def _create_schema(db: sqlite3.Connection) -> None:
        """Create missing tables and check the stored schema version against ours."""
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        columns = {name for _, name, *_ in db.execute("PRAGMA table_info(api_keys)")}
        if "scopes" not in columns:
            # A file from before key scopes: its keys keep inference only. Older
            # gateways still read the file (they name their columns).
            db.execute("ALTER TABLE api_keys ADD COLUMN scopes TEXT NOT NULL"
                       " DEFAULT 'inference'")
        columns = {name for _, name, *_ in db.execute("PRAGMA table_info(backends)")}
        if "removed" not in columns:
            # A file from before removal overrides of configured backends.
            db.execute("ALTER TABLE backends ADD COLUMN removed INTEGER NOT NULL DEFAULT 0")
        row = db.execute(
            "SELECT value FROM meta WHERE key = 'schema_version'"
        ).fetchone()
        if row is None:
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
        elif int(row[0]) > SCHEMA_VERSION:
            raise StoreError(
                f"state schema v{row[0]} is newer than this gateway's v{SCHEMA_VERSION}"
            )
        elif int(row[0]) < SCHEMA_VERSION:
            if int(row[0]) < 2:
                db.execute(_MIGRATE_V1_USAGE)
            db.execute(
                "UPDATE meta SET value = ? WHERE key = 'schema_version'",
                (str(SCHEMA_VERSION),),
            )

    async def close(self) -> None:
        """Close the connection on its thread, then let the thread end."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._disconnect)
        finally:
            executor.shutdown(wait=False)

    def _disconnect(self) -> None:
        """Close the connection; runs on the worker thread after every queued call."""
        if self._db is not None:
            self._db.close()
            self._db = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run one call on the worker thread with the connection and await its result."""
        if self._executor is None:
            raise StoreError("SQLite store is not open")
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self._call, fn
        )

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Worker-thread side of `_run`."""
        if self._db is None:
            raise StoreError("SQLite store is not open")
        return fn(self._db)

    # Operator state

    async def load_all(self) -> Snapshot:
        """Read everything but usage in one read transaction (a consistent snapshot)."""
        return await self._run(self._load_all)

    @staticmethod
    def _load_all(db: sqlite3.Connection) -> Snapshot:
        """Worker-thread side of `load_all`."""
        db.execute("BEGIN")
        try:
            keys = [
                KeyRecord(k, d, u, n, c, bool(r), bool(t), _scopes(sc))
                for k, d, u, n, c, r, t, sc in db.execute(
                    "SELECT key_id, digest, user, name, created_at, revoked, trusted, scopes"
                    " FROM api_keys ORDER BY key_id"
                )
            ]
            users = [
                UserSettings(
                    u, bool(v), bool(b), int(w), limits_from(orjson.loads(lim))
                )
                for u, v, b, w, lim in db.execute(
                    "SELECT user, vip, boost, weight, limits FROM users ORDER BY user"
                )
            ]
            blocked_users = {u for (u,) in db.execute("SELECT user FROM blocked_users")}
            blocked_ips = {ip for (ip,) in db.execute("SELECT ip FROM blocked_ips")}
            backends = [
                BackendRecord(url, slots, bool(removed))
                for url, slots, removed in db.execute(
                    "SELECT url, slots, removed FROM backends ORDER BY url"
                )
            ]
        finally:
            db.execute("COMMIT")
        return Snapshot(keys, users, blocked_users, blocked_ips, backends)

    async def put_key(self, rec: KeyRecord) -> None:
        """Insert or replace an API key by `key_id`."""
        row = (
            rec.key_id,
            rec.digest,
            rec.user,
            rec.name,
            rec.created_at,
            rec.revoked,
            rec.trusted,
            ",".join(rec.scopes),
        )
        await self._run(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO api_keys"
                " (key_id, digest, user, name, created_at, revoked, trusted, scopes)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
        )

    async def revoke_key(self, key_id: str) -> bool:
        """Mark a key revoked; False when no such key exists."""
        cur = await self._run(
            lambda db: db.execute(
                "UPDATE api_keys SET revoked = 1 WHERE key_id = ?", (key_id,)
            )
        )
        return cur.rowcount > 0

    async def put_user(self, s: UserSettings) -> None:
        """Insert or replace one user's settings."""
        row = (s.user, s.vip, s.boost, s.weight, orjson.dumps(s.limits).decode())
        await self._run(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO users (user, vip, boost, weight, limits)"
                " VALUES (?, ?, ?, ?, ?)",
                row,
            )
        )

    async def delete_user(self, user: str) -> None:
        """Drop one user's settings (keys and blocks are left as they are)."""
        await self._run(
            lambda db: db.execute("DELETE FROM users WHERE user = ?", (user,))
        )

    async def set_blocked_user(self, user: str, blocked: bool) -> None:
        """Add a user to or remove it from the blocklist."""
        sql = (
            "INSERT OR IGNORE INTO blocked_users (user) VALUES (?)"
            if blocked
            else "DELETE FROM blocked_users WHERE user = ?"
        )
        await self._run(lambda db: db.execute(sql, (user,)))

    async def set_blocked_ip(self, ip: str, blocked: bool) -> None:
        """Add an address or CIDR to or remove it from the blocklist (stored verbatim)."""
        sql = (
            "INSERT OR IGNORE INTO blocked_ips (ip) VALUES (?)"
            if blocked
            else "DELETE FROM blocked_ips WHERE ip = ?"
        )
        await self._run(lambda db: db.execute(sql, (ip,)))

    async def put_backend(self, rec: BackendRecord) -> None:
        """Insert or replace a runtime backend by URL."""
        row = (rec.url, rec.slots, int(rec.removed))
        await self._run(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO backends (url, slots, removed) VALUES (?, ?, ?)", row
            )
        )

    async def delete_backend(self, url: str) -> None:
        """Forget a runtime backend."""
        await self._run(
            lambda db: db.execute("DELETE FROM backends WHERE url = ?", (url,))
        )

    # Usage accounting

    async def add_usage(self, items: list[Usage], hours: Sequence[UsageHour] = ()) -> None:
        """Add a batch of deltas in one transaction (all rows or none)."""
        if not items and not hours:
            return
        rows = [
            (storable(u.user), storable(u.model), u.day, u.requests, u.prompt_tokens,
             u.completion_tokens)
            for u in items
        ]
        hour_rows = [
            (h.hour, storable(h.user), storable(h.key), storable(h.model), storable(h.backend),
             h.requests, h.errors, h.cancelled, h.estimated_tokens, h.prompt_tokens,
             h.completion_tokens)
            for h in hours
        ]

        def write(db: sqlite3.Connection) -> None:
            db.executemany(_ADD_USAGE, rows)
            db.executemany(_ADD_USAGE_HOUR, hour_rows)

        await self._run(lambda db: _in_transaction(db, write))

    async def usage_hours(
        self, since_hour: str | None = None, until_hour: str | None = None
    ) -> list[UsageHour]:
        """Hourly rows with since_hour <= hour < until_hour, ordered by hour."""
        params = (since_hour, since_hour, until_hour, until_hour)
        # The rows are built in the store's thread too: there may be many.
        rows: list[UsageHour] = await self._run(
            lambda db: [UsageHour(*row) for row in db.execute(
                "SELECT hour, user, key_id, model, backend, requests, errors, cancelled,"
                " estimated_tokens, prompt_tokens, completion_tokens FROM usage_hours"
                " WHERE (? IS NULL OR hour >= ?) AND (? IS NULL OR hour < ?)"
                " ORDER BY hour, user, key_id, model, backend",
                params,
            )]
        )
        return rows

    async def prune_usage_hours(self, before_hour: str) -> int:
        """Drop hourly rows older than `before_hour`; returns the number of rows dropped."""
        cur = await self._run(
            lambda db: db.execute("DELETE FROM usage_hours WHERE hour < ?", (before_hour,))
        )
        return int(cur.rowcount)

    async def usage(
        self, user: str | None = None, since_day: str | None = None
    ) -> list[Usage]:
        """Usage rows, filtered by user and first day, ordered by (day, user, model)."""
        params = (user, user, since_day, since_day)
        rows = await self._run(
            lambda db: db.execute(
                "SELECT user, model, day, requests, prompt_tokens, completion_tokens FROM usage"
                " WHERE (? IS NULL OR user = ?) AND (? IS NULL OR day >= ?)"
                " ORDER BY day, user, model",
                params,
            ).fetchall()
        )
        return [Usage(*row) for row in rows]

    async def prune_usage(self, before_day: str, keep: set[str]) -> int:
        """Delete all usage of users last seen before `before_day`, except `keep`."""
        def prune(db: sqlite3.Connection) -> int:
            idle = [u for (u,) in db.execute(
                "SELECT user FROM usage GROUP BY user HAVING MAX(day) < ?", (before_day,))
                if u not in keep]
            for i in range(0, len(idle), 500):
                batch = idle[i:i + 500]
                db.execute(f"DELETE FROM usage WHERE user IN ({','.join('?' * len(batch))})",
                           batch)
            return len(idle)

        return await self._run(lambda db: _in_transaction(db, prune))

    # Metadata, windows, notifications

    async def get_meta(self, key: str) -> str | None:
        """Read one free-form metadata value."""
        row = await self._run(
            lambda db: db.execute(
                "SELECT value FROM meta WHERE key = ?", (key,)
            ).fetchone()
        )
        return None if row is None else str(row[0])

    async def set_meta(self, key: str, value: str) -> None:
        """Write one free-form metadata value, committed on return."""
        await self._run(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value)
            )
        )

    async def claim_meta(self, key: str, value: str) -> bool:
        """Write one metadata value unless the key has one; whether it was written."""
        written = await self._run(
            lambda db: db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, value)
            ).rowcount
        )
        return written == 1

    async def incr_window(self, key: str, window_s: float, amount: float) -> float:
        """In-process window counter: SQLite serves one process, so no other replica shares it."""
        return self._windows.incr(key, window_s, amount)

    def subscribe(self, callback: Callable[[str], None]) -> None:
        """Accepted but never called: a single process has no other replica to hear from."""
        self._callbacks.append(callback)
