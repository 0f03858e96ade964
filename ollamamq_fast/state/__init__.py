"""Persistent state: API keys, user settings, blocklist, runtime backends, usage.

`open_store` picks SQLite (one process) or Redis (shared by replicas);
`StateCache` is the in-memory view the data plane reads, with write-behind.
"""

from .cache import StateCache
from .records import (
    BackendRecord,
    KeyRecord,
    Snapshot,
    Usage,
    UsageHour,
    UserSettings,
    utc_day,
    utc_hour,
)
from .store import Store, StoreError, open_store

__all__ = [
    "BackendRecord",
    "KeyRecord",
    "Snapshot",
    "StateCache",
    "Store",
    "StoreError",
    "Usage",
    "UsageHour",
    "UserSettings",
    "open_store",
    "utc_day",
    "utc_hour",
]
