"""The store interface both backends implement, and `open_store` to pick one.

A store is the durable side of the state: the admin API's writes end here and
every replica warms its cache from here. The data plane never calls a store
directly (it reads `StateCache`), so every method may take a network or disk
round trip.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from .records import BackendRecord, KeyRecord, Snapshot, Usage, UsageHour, UserSettings

__all__ = [
    "DEFAULT_SQLITE_PATH",
    "SCHEMA_VERSION",
    "Snapshot",
    "Store",
    "StoreError",
    "open_store",
]

# Bumped when a stored layout changes incompatibly; a gateway refuses to open a
# store written by a newer schema instead of misreading it.
# v2 added hourly usage rows (key, backend, errors, cancelled, estimated); a v1
# store is migrated on open.
SCHEMA_VERSION = 2
DEFAULT_SQLITE_PATH = "./ollamamq.db"


class StoreError(RuntimeError):
    """The store cannot be used as it is (newer schema, unreadable file...)."""


@runtime_checkable
class Store(Protocol):
    """Durable state shared by the gateway's replicas; implemented by SQLiteStore and RedisStore."""

    async def open(self) -> None:
        """Connect and create the schema; called once by `StateCache.start`."""
        ...

    async def close(self) -> None:
        """Release connections and threads; called once by `StateCache.stop`."""
        ...

    async def load_all(self) -> Snapshot:
        """Everything except usage; read at start and on another replica's change."""
        ...

    async def put_key(self, rec: KeyRecord) -> None:
        """Insert or replace an API key by `key_id`."""
        ...

    async def revoke_key(self, key_id: str) -> bool:
        """Mark a key revoked; False when no such key exists."""
        ...

    async def put_user(self, s: UserSettings) -> None:
        """Insert or replace one user's settings."""
        ...

    async def delete_user(self, user: str) -> None:
        """Drop one user's settings (keys and blocks are left as they are)."""
        ...

    async def set_blocked_user(self, user: str, blocked: bool) -> None:
        """Add a user to or remove it from the blocklist."""
        ...

    async def set_blocked_ip(self, ip: str, blocked: bool) -> None:
        """Add an address or CIDR to or remove it from the blocklist (stored verbatim)."""
        ...

    async def put_backend(self, rec: BackendRecord) -> None:
        """Insert or replace a runtime backend by URL."""
        ...

    async def delete_backend(self, url: str) -> None:
        """Forget a runtime backend."""
        ...

    async def add_usage(self, items: list[Usage], hours: Sequence[UsageHour] = ()) -> None:
        """Add batched deltas to the (user, model, day) rows and the hourly rows, atomically."""
        ...

    async def usage_hours(
        self, since_hour: str | None = None, until_hour: str | None = None
    ) -> list[UsageHour]:
        """Hourly rows with since_hour <= hour < until_hour (YYYY-MM-DDTHH), ordered by hour."""
        ...

    async def prune_usage_hours(self, before_hour: str) -> int:
        """Drop hourly rows older than `before_hour`; returns how many hours or rows went."""
        ...

    async def usage(
        self, user: str | None = None, since_day: str | None = None
    ) -> list[Usage]:
        """Usage rows, filtered by user and first day, ordered by (day, user, model)."""
        ...

    async def prune_usage(self, before_day: str, keep: set[str]) -> int:
        """Delete every usage row of each user whose latest row is older than `before_day`
        (YYYY-MM-DD), except the users in `keep`; the number of users pruned."""
        ...

    async def get_meta(self, key: str) -> str | None:
        """Read one free-form metadata value."""
        ...

    async def set_meta(self, key: str, value: str) -> None:
        """Write one free-form metadata value, durably on return."""
        ...

    async def claim_meta(self, key: str, value: str) -> bool:
        """Write a metadata value only if the key has none; whether this call wrote it.

        Atomic: of replicas claiming one key at once, exactly one gets True."""
        ...

    async def incr_window(self, key: str, window_s: float, amount: float) -> float:
        """Add to a counter that resets `window_s` after its first hit; returns the new total."""
        ...

    def subscribe(self, callback: Callable[[str], None]) -> None:
        """Register a sync callback for topics that ANOTHER replica changed."""
        ...


def open_store(
    sqlite_path: str | None = None,
    redis_url: str | None = None,
    namespace: str = "ollamamq",
) -> Store:
    """Build (not open) the store the settings ask for: Redis if a URL is given, else SQLite."""
    # Imported here so a single-process gateway never imports redis-py, and so the
    # backends can import this module's names without an import cycle.
    if redis_url:
        from .redis_store import RedisStore

        return RedisStore(redis_url, namespace=namespace)
    from .sqlite import SQLiteStore

    return SQLiteStore(sqlite_path or DEFAULT_SQLITE_PATH)
