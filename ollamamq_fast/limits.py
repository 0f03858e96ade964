"""Per-user usage limits: the vocabulary, validation, and how a user's limits are resolved.

One vocabulary serves the flags, the TOML file and `Operator.set_limits`:

    rate             requests per second (token bucket refill), 0 = no rate limit
    burst            token bucket size; 0 = max(1, rate); below 1 counts as 1
    max_in_flight    requests of the user inside the gateway at once (waiting or
                     running), 0 = no limit
    max_queued       requests of the user waiting in the fair queue, 0 = no limit
                     beyond the gateway-wide queue (default --max-queue-per-user)
    max_tokens       cap on `max_tokens` (OpenAI) / `options.num_predict` (Ollama), 0 = none
    max_tokens_mode  "clamp" (rewrite to the cap) or "reject" (400)
    quota_day        tokens (prompt + completion) per UTC day, 0 = none
    quota_month      tokens per UTC calendar month, 0 = none
    quota_total      tokens ever, 0 = none
    budget_day       tokens per UTC day after which the operator is alerted (events
                     `budget_alert` at 80 % and 100 %); never refuses, 0 = none
    budget_month     the same per UTC calendar month

Resolution, later wins: built-in defaults < flags/TOML `[limits]` < TOML
`[limits.users.NAME]` < the operator's per-user overrides (persisted in the
state store as `UserSettings.limits`). An override of 0 lifts a default.

The stored limits dict is numeric only (the store's codec drops other types),
so `max_tokens_mode` is kept there as 0 (clamp) or 1 (reject).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

MODES: Final = ("clamp", "reject")
_MODE_CODE: Final = {"clamp": 0, "reject": 1}

# name -> kind: "float", "int" or "mode" (clamp / reject)
LIMIT_KINDS: Final[dict[str, str]] = {
    "rate": "float",
    "burst": "float",
    "max_in_flight": "int",
    "max_queued": "int",
    "max_tokens": "int",
    "max_tokens_mode": "mode",
    "quota_day": "int",
    "quota_month": "int",
    "quota_total": "int",
    "budget_day": "int",
    "budget_month": "int",
}
LIMIT_NAMES: Final = tuple(LIMIT_KINDS)
# Whole-number limits are stored (SQLite, Redis) and answered (orjson) as 64-bit
# integers; one beyond would stall every later write of the state store.
MAX_INT_LIMIT: Final = 2**63 - 1
QUOTA_NAMES: Final = ("quota_day", "quota_month", "quota_total")
BUDGET_NAMES: Final = ("budget_day", "budget_month")


@dataclass(frozen=True, slots=True)
class Limits:
    """One user's effective limits (0 = none), resolved once and memoized by the Policy."""

    rate: float = 0.0
    burst: float = 0.0
    max_in_flight: int = 0
    max_queued: int = 0
    max_tokens: int = 0
    reject_over_cap: bool = False
    quota_day: int = 0
    quota_month: int = 0
    quota_total: int = 0
    budget_day: int = 0
    budget_month: int = 0
    # Whether admission must look at each request (rate, quota, in-flight, cap);
    # derived, so that the usual request costs one attribute read.
    checks_requests: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "checks_requests", bool(
            self.rate > 0 or self.max_in_flight or self.max_tokens or self.has_quota))

    @property
    def has_quota(self) -> bool:
        """Whether any token quota applies."""
        return bool(self.quota_day or self.quota_month or self.quota_total)

    def public(self) -> dict[str, Any]:
        """JSON-ready view in the flag/TOML vocabulary (for the admin API)."""
        return {
            "rate": self.rate,
            "burst": self.burst,
            "max_in_flight": self.max_in_flight,
            "max_queued": self.max_queued,
            "max_tokens": self.max_tokens,
            "max_tokens_mode": "reject" if self.reject_over_cap else "clamp",
            "quota_day": self.quota_day,
            "quota_month": self.quota_month,
            "quota_total": self.quota_total,
            "budget_day": self.budget_day,
            "budget_month": self.budget_month,
        }


def any_budget(layers: Iterable[dict[str, Any]]) -> bool:
    """Whether any layer of limits sets a token budget (the usage keeper then checks them)."""
    return any(layer.get(name) for layer in layers for name in BUDGET_NAMES)


def check_limit(name: str, value: Any) -> float | int:
    """Validate one limit; returns its stored (numeric) form or raises ValueError."""
    kind = LIMIT_KINDS.get(name)
    if kind is None:
        raise ValueError(f"unknown limit {name!r} (known: {', '.join(LIMIT_NAMES)})")
    if kind == "mode":
        if isinstance(value, str) and value in _MODE_CODE:
            return _MODE_CODE[value]
        if value in (0, 1) and not isinstance(value, bool):
            return int(value)
        raise ValueError(f"{name} must be one of {', '.join(MODES)}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")  # noqa: TRY004 -- a config error
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be 0 or more, got {value!r}")
    if kind == "int":
        if value != int(value):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        if value > MAX_INT_LIMIT:
            raise ValueError(f"{name} must be at most {MAX_INT_LIMIT}, got {value!r}")
        return int(value)
    return float(value)


def check_limits(values: dict[str, Any]) -> dict[str, float | int]:
    """Validate a whole dict of limits (ValueError names the first bad one)."""
    return {name: check_limit(name, value) for name, value in values.items()}


def resolve(
    layers: list[dict[str, Any]], default_max_queued: int
) -> Limits:
    """Effective limits from layers of overrides, lowest precedence first."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer)
    rate = float(merged.get("rate", 0.0))
    burst = float(merged.get("burst", 0.0))
    if rate > 0 and burst <= 0:
        burst = max(1.0, rate)
    elif rate > 0 and burst < 1.0:
        burst = 1.0  # a bucket that holds less than one request would never admit one
    mode = merged.get("max_tokens_mode", 0)
    max_queued = merged.get("max_queued")
    return Limits(
        rate=rate,
        burst=burst if rate > 0 else 0.0,
        max_in_flight=int(merged.get("max_in_flight", 0)),
        max_queued=default_max_queued if max_queued is None else int(max_queued),
        max_tokens=int(merged.get("max_tokens", 0)),
        reject_over_cap=mode in (1, "reject"),
        quota_day=int(merged.get("quota_day", 0)),
        quota_month=int(merged.get("quota_month", 0)),
        quota_total=int(merged.get("quota_total", 0)),
        budget_day=int(merged.get("budget_day", 0)),
        budget_month=int(merged.get("budget_month", 0)),
    )
