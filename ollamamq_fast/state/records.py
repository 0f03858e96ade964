"""Plain records the state store keeps: keys, user settings, backends, usage, snapshots.

No I/O here: both stores and the in-memory cache share these shapes, so the
gateway never sees which store is behind them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import blake3

# Topics a replica announces after an operator write; the cache reloads one topic
# at a time and the gateway's `on_change` hook receives the same names.
TOPIC_KEYS = "keys"
TOPIC_USERS = "users"
TOPIC_BLOCKS = "blocks"
TOPIC_BACKENDS = "backends"
TOPICS: tuple[str, ...] = (TOPIC_KEYS, TOPIC_USERS, TOPIC_BLOCKS, TOPIC_BACKENDS)
# Metadata values announced to the other replicas when written (pools.py's
# pools and pool access rules): each is its own topic, re-read with get_meta.
META_TOPICS: tuple[str, ...] = ("pools", "pool_access")


# What a key may do (docs: SECURITY.md "Key scopes"). `inference` covers every
# route that reads or generates (chat, generate, embed, show, /v1, unknown
# paths forwarded with --allow-all-routes); `models` covers model management
# (pull, push, create, copy, delete, blob uploads). A key stored before scopes
# existed has `inference` only.
SCOPE_INFERENCE = "inference"
SCOPE_MODELS = "models"
SCOPES: tuple[str, ...] = (SCOPE_INFERENCE, SCOPE_MODELS)
DEFAULT_SCOPES: tuple[str, ...] = (SCOPE_INFERENCE,)


def parse_scopes(value: object) -> tuple[str, ...]:
    """Scopes from a list or a comma-separated string, in SCOPES order (ValueError if unknown)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError("scopes must be a list of: " + ", ".join(SCOPES))  # noqa: TRY004
    wanted = set()
    for item in items:
        name = item.strip() if isinstance(item, str) else item
        if name not in SCOPES:
            raise ValueError(f"unknown scope {name!r} (known: {', '.join(SCOPES)})")
        wanted.add(name)
    if not wanted:
        raise ValueError("a key needs at least one scope: " + ", ".join(SCOPES))
    return tuple(s for s in SCOPES if s in wanted)


def key_digest(secret: str) -> str:
    """The blake3 hex digest under which an API key is stored (never the key)."""
    return blake3.blake3(secret.encode()).hexdigest()


@dataclass(slots=True)
class KeyRecord:
    """One API key. Only the blake3 digest of the secret is ever stored."""

    key_id: str
    digest: str  # blake3 hex of the secret
    user: str
    name: str
    created_at: float
    revoked: bool = False
    trusted: bool = False  # a service key that may name its end users via X-User-ID
    scopes: tuple[str, ...] = DEFAULT_SCOPES


@dataclass(slots=True)
class UserSettings:
    """Operator settings for one user; `limits` is opaque to the store."""

    user: str
    vip: bool = False
    boost: bool = False
    weight: int = 1
    limits: dict[str, float | int] = field(default_factory=dict)


@dataclass(slots=True)
class BackendRecord:
    """A runtime change to the fleet, kept as an override of the configured list.

    For a URL that is not in the configured list (command line, TOML file):
    a backend the operator added at runtime (`slots=None`: the fleet default).
    For a configured URL: its slots override (`slots` set), or, with
    `removed`, the operator removed it and it stays removed across restarts
    and config reloads until the override is cleared or the backend re-added.
    """

    url: str
    slots: int | None = None
    removed: bool = False


@dataclass(slots=True)
class Usage:
    """Token accounting for one (user, model, UTC day); also used as a batched delta."""

    user: str
    model: str
    day: str  # YYYY-MM-DD (UTC)
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(slots=True)
class UsageHour:
    """Usage of one (UTC hour, user, key, model, backend); also used as a batched delta.

    `requests` counts every inference request that ended in the hour, of which
    `errors` were answered with a status >= 400 (refusals included) and
    `cancelled` were left by their client; `estimated_tokens` of the tokens were
    estimated from stream events instead of reported by the backend.
    `key` is the API key id ("" without one), `backend` the backend URL ("" when
    none was reached).
    """

    hour: str  # YYYY-MM-DDTHH (UTC)
    user: str
    key: str = ""
    model: str = ""
    backend: str = ""
    requests: int = 0
    errors: int = 0
    cancelled: int = 0
    estimated_tokens: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


# The summed fields of a UsageHour, in storage order.
USAGE_COUNTERS: tuple[str, ...] = (
    "requests", "errors", "cancelled", "estimated_tokens", "prompt_tokens", "completion_tokens")
# The fields that say whose usage a UsageHour is (besides its hour).
USAGE_DIMENSIONS: tuple[str, ...] = ("user", "key", "model", "backend")


@dataclass(slots=True)
class Snapshot:
    """Everything but usage, as `Store.load_all` returns it to warm the cache."""

    keys: list[KeyRecord] = field(default_factory=list)
    users: list[UserSettings] = field(default_factory=list)
    blocked_users: set[str] = field(default_factory=set)
    blocked_ips: set[str] = field(default_factory=set)
    backends: list[BackendRecord] = field(default_factory=list)


def utc_hour(ts: float | None = None) -> str:
    """The UTC hour (YYYY-MM-DDTHH) of a wall-clock time, now by default; hourly usage key."""
    return time.strftime("%Y-%m-%dT%H", time.gmtime(time.time() if ts is None else ts))


def utc_day(ts: float | None = None) -> str:
    """The UTC day (YYYY-MM-DD) of a wall-clock time, now by default; usage rows are keyed by it."""
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() if ts is None else ts))
