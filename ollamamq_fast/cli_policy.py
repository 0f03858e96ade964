"""Command-line flags of the usage policy (added to `serve` by cli.py).

Defaults are None, so that a TOML `[limits]` / `[cache]` value sits between
the built-in default and an explicit flag (defaults < TOML < flags).
"""

from __future__ import annotations

import argparse

from ollamamq_fast import argtypes
from ollamamq_fast.config import CACHE_CHOICES, STREAM_USAGE_CHOICES, Settings
from ollamamq_fast.limits import MODES
from ollamamq_fast.policy.cache import DEFAULT_MB, DEFAULT_TTL_S

# flag dest -> limit name (limits.py vocabulary)
_LIMIT_FLAGS = {
    "rate_limit": "rate",
    "rate_burst": "burst",
    "max_in_flight_per_user": "max_in_flight",
    "max_tokens": "max_tokens",
    "max_tokens_mode": "max_tokens_mode",
    "quota_day": "quota_day",
    "quota_month": "quota_month",
    "quota_total": "quota_total",
    "budget_day": "budget_day",
    "budget_month": "budget_month",
}


def add_policy_arguments(p: argparse.ArgumentParser) -> None:
    """Rate limits, caps, quotas and the response cache (README "Usage policy")."""
    g = p.add_argument_group("usage policy (per-user defaults; operator overrides per user)")
    g.add_argument("--rate-limit", type=argtypes.non_negative_float, default=None, metavar="R",
                   help="requests per second per user, token bucket; beyond it 429 with "
                        "Retry-After (default 0 = no limit)")
    g.add_argument("--rate-burst", type=argtypes.non_negative_float, default=None, metavar="N",
                   help="token bucket size: requests a user may send at once "
                        "(default max(1, --rate-limit))")
    g.add_argument("--max-in-flight-per-user", type=argtypes.non_negative_int, default=None,
                   metavar="N", help="requests per user inside the gateway at once, waiting or "
                                     "running; beyond it 429 (default 0 = no limit)")
    g.add_argument("--max-tokens", type=argtypes.non_negative_int, default=None, metavar="N",
                   help="cap on max_tokens (OpenAI) / options.num_predict (Ollama); "
                        "added when a request sets none (default 0 = no cap)")
    g.add_argument("--max-tokens-mode", choices=MODES, default=None,
                   help="over the cap: clamp (rewrite the request) or reject (400) "
                        "(default clamp)")
    g.add_argument("--quota-day", type=argtypes.non_negative_int, default=None, metavar="TOKENS",
                   help="tokens (prompt + completion) per user per UTC day; then 403 "
                        "(default 0 = none)")
    g.add_argument("--quota-month", type=argtypes.non_negative_int, default=None,
                   metavar="TOKENS", help="tokens per user per UTC month (default 0 = none)")
    g.add_argument("--quota-total", type=argtypes.non_negative_int, default=None,
                   metavar="TOKENS", help="tokens per user in total (default 0 = none)")
    g.add_argument("--budget-day", type=argtypes.non_negative_int, default=None,
                   metavar="TOKENS", help="tokens per user per UTC day after which a "
                   "budget_alert event is sent (at 80 %% and 100 %%; never refuses)")
    g.add_argument("--budget-month", type=argtypes.non_negative_int, default=None,
                   metavar="TOKENS", help="the same per UTC month (default 0 = none)")
    g.add_argument("--usage-retention-days", type=argtypes.non_negative_int, default=None,
                   metavar="DAYS", help="hourly usage rows (GET /api/usage) are kept this "
                   "long; 0 = for ever (default 90)")
    g.add_argument("--cache", dest="cache_mode", choices=CACHE_CHOICES, default=None,
                   help="response cache: deterministic requests only (temperature 0, a "
                        "fixed seed, embeddings), all inference requests, or off "
                        "(default deterministic)")
    g.add_argument("--cache-ttl", type=argtypes.positive_float, default=None, metavar="S",
                   help=f"seconds a cached answer is served (default {DEFAULT_TTL_S:g})")
    g.add_argument("--cache-mb", type=argtypes.non_negative_float, default=None, metavar="MB",
                   help=f"local cache budget in MB, least recently used evicted "
                        f"(default {DEFAULT_MB:g})")
    g.add_argument("--stream-usage", choices=STREAM_USAGE_CHOICES, default=None,
                   help="OpenAI streams without stream_options.include_usage: inject it for "
                        "token accounting and strip it from the answer, or off (not "
                        "counted) (default inject)")


def apply_policy_args(settings: Settings, args: argparse.Namespace) -> None:
    """Copy the policy flags that were given onto settings (after the TOML file)."""
    for dest, name in _LIMIT_FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            settings.limits[name] = 1 if value == "reject" else 0 if value == "clamp" else value
    for name in ("cache_mode", "cache_ttl", "cache_mb", "stream_usage", "usage_retention_days"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(settings, name, value)
