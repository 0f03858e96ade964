"""Settings: one object built from CLI flags > environment variables > defaults."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ollamamq_fast.wire.cors import parse_origins

DEFAULT_PORT = 11435
DEFAULT_ADMIN_PORT = 11436
DEFAULT_HOST = "127.0.0.1"
# The admin API changes the gateway: loopback only unless the operator says otherwise.
DEFAULT_ADMIN_HOST = "127.0.0.1"
DEFAULT_BACKEND = "http://localhost:11434"
# Seconds of silence allowed from a backend. Not a cap on a long stream: a model
# load or a pull can be silent for minutes (docs/protocol-notes.md §7.24).
DEFAULT_TIMEOUT = 300.0
# Large enough for chat requests with several base64 images (docs/protocol-notes.md §7.14);
# blob uploads are streamed and are not bound by it.
DEFAULT_MAX_BODY_MB = 100.0
# Request bodies held in memory at once, all clients together: a few large
# uploads must not take the process's memory (beyond it: 503, Retry-After).
DEFAULT_MAX_BODIES_MB = 512.0
# Idle users are forgotten after this many days without a request (idle.py).
DEFAULT_USER_IDLE_DAYS = 30.0


class ConfigError(ValueError):
    """A setting has a value the gateway cannot use (reported as one line, exit 2)."""


@dataclass(frozen=True, slots=True)
class BackendUrl:
    """A parsed backend address."""

    url: str  # normalized: scheme://host:port[/prefix], no trailing slash
    host: str
    port: int
    prefix: str  # path prefix, '' for none

    @property
    def authority(self) -> str:
        """Host header value for requests to this backend (docs/protocol-notes.md §7.17)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_backend_url(raw: str) -> BackendUrl:
    """Parse one backend URL; `http://` is added when missing, a trailing `/` trimmed."""
    text = raw.strip()
    if not text:
        raise ConfigError("empty backend URL")
    if "://" not in text:
        text = "http://" + text
    text = text.rstrip("/")
    try:
        parts = urlsplit(text)
    except ValueError as exc:  # "http://[::1": an unclosed IPv6 bracket
        raise ConfigError(f"backend URL {raw!r}: {exc}") from None
    if parts.scheme != "http":
        raise ConfigError(
            f"backend URL {raw!r}: only http:// is supported (put TLS in front of the backend)"
        )
    if not parts.hostname:
        raise ConfigError(f"backend URL {raw!r} has no host")
    try:
        port = parts.port or 80
    except ValueError:
        raise ConfigError(f"backend URL {raw!r} has an invalid port") from None
    if parts.query or parts.fragment:
        raise ConfigError(f"backend URL {raw!r} must not have a query or fragment")
    host = parts.hostname
    prefix = parts.path.rstrip("/")
    shown_host = f"[{host}]" if ":" in host else host
    return BackendUrl(f"http://{shown_host}:{port}{prefix}", host, port, prefix)


def parse_backend_urls(raw: str) -> list[BackendUrl]:
    """Parse a comma-separated list of backend URLs, dropping duplicates."""
    seen: dict[str, BackendUrl] = {}
    for item in raw.split(","):
        if item.strip():
            b = parse_backend_url(item)
            seen.setdefault(b.url, b)
    if not seen:
        raise ConfigError("no backend URL given")
    return list(seen.values())


# Backend kinds an operator may set (fleet.backend.ApiKind values); "auto" =
# detected at first contact.
BACKEND_KINDS = ("auto", "ollama", "openai", "llamacpp", "vllm", "lmstudio")


OPENAI_VIA = ("auto", "v1", "native")


@dataclass(slots=True)
class BackendOptions:
    """Per-backend settings beyond slots: API kind and health-probe override."""

    kind: str = "auto"
    # Probe this path every probe_interval seconds even while requests run
    # (only for paths the server answers at once while it generates).
    probe_path: str | None = None
    probe_interval: float | None = None
    # How OpenAI requests reach an Ollama backend: "auto" (its own /v1 layer
    # when it has one, asked at first contact), "v1", or "native" (translated to
    # /api/*, which honours top_k, min_p, repeat_penalty, num_ctx...).
    openai_via: str = "auto"


@dataclass(slots=True)
class Settings:
    """Everything the gateway is configured with."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    backends: list[BackendUrl] = field(default_factory=lambda: [parse_backend_url(DEFAULT_BACKEND)])
    timeout: float = DEFAULT_TIMEOUT
    tui: bool = True
    allow_all_routes: bool = False
    slots: int = 1
    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 1024 * 1024)
    max_bodies_bytes: int = int(DEFAULT_MAX_BODIES_MB * 1024 * 1024)
    # Control plane: -1 disables it, 0 picks a free port (Gateway.admin_port).
    admin_port: int = DEFAULT_ADMIN_PORT
    admin_host: str = DEFAULT_ADMIN_HOST
    # Admin bearer token; None = generate one at start and print it once.
    admin_token: str | None = None
    # Serve /metrics without the admin token (for Prometheus scrapers).
    metrics_public: bool = False
    health_interval: float = 10.0
    # Consecutive failed probes before a backend is offline, good ones before it returns.
    health_fail_threshold: int = 2
    health_ok_threshold: int = 1
    balance: str = "least-conn"
    # Per-backend slot overrides (from the TOML config): normalized URL -> slots.
    backend_slots: dict[str, int] = field(default_factory=dict)
    # Per-backend kind and probe settings (TOML, --backend-kind): normalized URL -> options.
    backend_options: dict[str, BackendOptions] = field(default_factory=dict)
    # Fair-share settings from config: users with absolute priority, boosted
    # users, and per-user weights (turns per round).
    vip_users: list[str] = field(default_factory=list)
    boost_users: list[str] = field(default_factory=list)
    user_weights: dict[str, int] = field(default_factory=dict)
    # The part of those given as flags (--vip, --boost, --weight): a reload
    # of the file keeps them (it re-reads the file's own lists).
    flag_vip_users: list[str] = field(default_factory=list)
    flag_boost_users: list[str] = field(default_factory=list)
    flag_user_weights: dict[str, int] = field(default_factory=dict)
    # Fair-queue bounds: beyond them 429 with Retry-After; waiting longer than
    # queue_timeout seconds gives 503 with Retry-After (0 = wait for ever).
    max_queue: int = 200_000
    max_queue_per_user: int = 1_000
    queue_timeout: float = 600.0
    # Access log: a rotated file, "-" for stderr (unrotated), None for none;
    # "json" or "logfmt" (accesslog.py).
    log_file: str | None = None
    log_format: str = "json"
    # The TOML file the settings came from, re-read on SIGHUP.
    config_path: str | None = None
    # Persistent state: SQLite file (None = in memory only) or a shared Redis.
    state_path: str | None = None
    redis_url: str | None = None
    # Identity: "off" (X-User-ID, else address) or "keys" (API key required).
    auth: str = "off"
    # Proxies whose X-Forwarded-For is believed for the client address.
    trusted_proxies: list[Any] = field(default_factory=list)
    # Browser origins allowed besides Ollama's own (wire/cors.py); "*" for all.
    origins: list[str] = field(default_factory=list)
    # Start an in-process simulator and use it as a backend (demo without Ollama).
    sim: bool = False
    sim_models: list[str] = field(default_factory=list)
    # With --sim: keep the -o backends as well (only when -o was given explicitly).
    sim_keep_backends: bool = False
    # Usage policy (policy/, README "Usage policy"): default per-user limits in
    # the limits.py vocabulary (rate, burst, max_in_flight, max_queued,
    # max_tokens, max_tokens_mode, quota_day/month/total; absent or 0 = none),
    # per-user limits from the config file, the response cache, and whether
    # OpenAI streams get include_usage injected for accounting.
    limits: dict[str, float | int] = field(default_factory=dict)
    user_limits: dict[str, dict[str, float | int]] = field(default_factory=dict)
    cache_mode: str = "deterministic"
    cache_ttl: float = 300.0
    cache_mb: float = 64.0
    stream_usage: str = "inject"
    # Token budgets per API key id (`[limits.keys.ID]`: budget_day, budget_month),
    # alerted on the event stream like the per-user budgets of `limits`.
    key_budgets: dict[str, dict[str, int]] = field(default_factory=dict)
    # Hourly usage rows (GET /api/usage) are kept this many days; 0 = for ever.
    usage_retention_days: int = 90
    # Users with no request for this many days and nothing the operator set
    # (settings, limits, key, block) are dropped from memory and the store
    # (idle.py); 0 = never.
    user_idle_days: float = DEFAULT_USER_IDLE_DAYS
    # Named pools of backends (`[pools.NAME]`, README "Pools"); the default
    # pool is the top-level `backends`, and `[pools.default]` may give it
    # aliases, hosts and required models.
    pools: dict[str, PoolConfig] = field(default_factory=dict)
    # Which pools a user or an API key id may use (`[pool_access]`); absent = all.
    pool_access_users: dict[str, list[str]] = field(default_factory=dict)
    pool_access_keys: dict[str, list[str]] = field(default_factory=dict)


DEFAULT_POOL = "default"
_POOL_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_HOST_NAME = re.compile(r"[a-z0-9.-]{1,253}(:[0-9]{1,5})?")


@dataclass(slots=True)
class PoolConfig:
    """One pool as configured (TOML `[pools.NAME]` or the admin API); see parse_pool."""

    name: str
    backends: list[BackendUrl] = field(default_factory=list)
    backend_slots: dict[str, int] = field(default_factory=dict)
    backend_options: dict[str, BackendOptions] = field(default_factory=dict)
    # Slots of its backends that set none (None: the gateway's --slots).
    slots: int | None = None
    balance: str | None = None
    # alias -> model name the backend reads ("fast" -> "llama3.2:1b").
    aliases: dict[str, str] = field(default_factory=dict)
    # Host header values (lower case, port optional) that reach this pool.
    hosts: list[str] = field(default_factory=list)
    # Fair-share defaults of the pool's own queue.
    vip_users: list[str] = field(default_factory=list)
    boost_users: list[str] = field(default_factory=list)
    user_weights: dict[str, int] = field(default_factory=dict)
    # Models each of its Ollama backends must have (pulled when missing).
    required_models: list[str] = field(default_factory=list)
    # Delete models a backend has that are not required (opt-in).
    remove_unlisted: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The JSON form parse_pool reads back (admin API answers, the store)."""
        backends: list[dict[str, Any]] = []
        for b in self.backends:
            item: dict[str, Any] = {"url": b.url}
            if b.url in self.backend_slots:
                item["slots"] = self.backend_slots[b.url]
            opts = self.backend_options.get(b.url)
            if opts is not None:
                item["kind"] = opts.kind
                if opts.probe_path is not None:
                    item["probe_path"] = opts.probe_path
                if opts.probe_interval is not None:
                    item["probe_interval"] = opts.probe_interval
            backends.append(item)
        out: dict[str, Any] = {
            "name": self.name, "backends": backends, "aliases": dict(self.aliases),
            "hosts": list(self.hosts), "required_models": list(self.required_models),
            "remove_unlisted": self.remove_unlisted,
            "users": {"vip": list(self.vip_users), "boost": list(self.boost_users),
                      "weights": dict(self.user_weights)},
        }
        if self.slots is not None:
            out["slots"] = self.slots
        if self.balance is not None:
            out["balance"] = self.balance
        return out


_POOL_KEYS = {"name", "backends", "slots", "balance", "aliases", "hosts", "users",
              "required_models", "remove_unlisted"}


def check_pool_name(name: object, where: str = "pool") -> str:
    """A pool name: 1-63 of a-z, 0-9, '-', '_' (it appears in URL paths and metric labels)."""
    if not isinstance(name, str) or not _POOL_NAME.fullmatch(name):
        raise ConfigError(f"{where}: a pool name is 1-63 characters of a-z, 0-9, '-' and '_' "
                          f"starting with a letter or digit, got {name!r}")
    return name


def parse_pool(name: str, value: object, where: str = "pool") -> PoolConfig:
    """One pool's definition from its TOML table or admin-API JSON (ConfigError if invalid)."""
    where = f"{where} {name}"
    check_pool_name(name, where)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = set(value) - _POOL_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown pool setting {min(unknown)!r}")
    pool = PoolConfig(name)
    raw_backends = value.get("backends", [])
    if name == DEFAULT_POOL and raw_backends:
        raise ConfigError(f"{where}: the default pool's backends are the top-level `backends`")
    if not isinstance(raw_backends, list):
        raise ConfigError(f"{where}: backends must be an array of URLs or tables")
    for item in raw_backends:
        if isinstance(item, str):
            item = {"url": item}
        if not isinstance(item, dict) or not isinstance(item.get("url"), str):
            raise ConfigError(f"{where}: each backend needs a url")
        extra = set(item) - {"url", "slots", "kind", "probe_path", "probe_interval"}
        if extra:
            raise ConfigError(f"{where}: unknown backend setting {min(extra)!r}")
        b = parse_backend_url(item["url"])
        if any(o.url == b.url for o in pool.backends):
            raise ConfigError(f"{where}: backend {b.url} is listed twice")
        pool.backends.append(b)
        if item.get("slots") is not None:
            pool.backend_slots[b.url] = check_setting("slots", item["slots"],
                                                      f"{where}: backend {b.url}: slots")
        options = _backend_options(item, f"{where}: backend {b.url}")
        if options is not None:
            pool.backend_options[b.url] = options
    if name != DEFAULT_POOL and not pool.backends:
        raise ConfigError(f"{where}: a pool needs at least one backend")
    if value.get("slots") is not None:
        pool.slots = check_setting("slots", value["slots"], f"{where}: slots")
    balance = value.get("balance")
    if balance is not None:
        if balance not in BALANCE_CHOICES:
            raise ConfigError(f"{where}: balance must be one of {', '.join(BALANCE_CHOICES)}")
        pool.balance = str(balance)
    aliases = value.get("aliases", {})
    if not isinstance(aliases, dict) or not all(
            isinstance(k, str) and k.strip() and isinstance(v, str) and v.strip()
            for k, v in aliases.items()):
        raise ConfigError(f"{where}: aliases must be a table of alias = \"model name\"")
    pool.aliases = {k.strip(): v.strip() for k, v in aliases.items()}
    hosts = value.get("hosts", [])
    if not isinstance(hosts, list) or not all(
            isinstance(h, str) and _HOST_NAME.fullmatch(h.strip().lower()) for h in hosts):
        raise ConfigError(f"{where}: hosts must be a list of host names (port optional)")
    pool.hosts = [h.strip().lower() for h in hosts]
    required = value.get("required_models", [])
    if not isinstance(required, list) or not all(isinstance(m, str) and m.strip()
                                                  for m in required):
        raise ConfigError(f"{where}: required_models must be a list of model names")
    pool.required_models = [m.strip() for m in required]
    remove = value.get("remove_unlisted", False)
    if not isinstance(remove, bool):
        raise ConfigError(f"{where}: remove_unlisted must be true or false")
    pool.remove_unlisted = remove
    users = value.get("users", {})
    if users:
        shadow = Settings()
        _apply_users(shadow, users, where)
        pool.vip_users, pool.boost_users = shadow.vip_users, shadow.boost_users
        pool.user_weights = shadow.user_weights
    return pool


def check_pools(pools: dict[str, PoolConfig], default_backends: list[BackendUrl],
                where: str = "pools") -> None:
    """Rules across pools: a host reaches one pool; a backend shared by pools has one slot count."""
    hosts: dict[str, str] = {}
    slots: dict[str, tuple[str, int]] = {}
    for pool in pools.values():
        for host in pool.hosts:
            if host in hosts and hosts[host] != pool.name:
                raise ConfigError(f"{where}: host {host} is given to pools {hosts[host]} "
                                  f"and {pool.name}")
            hosts[host] = pool.name
        for url, n in pool.backend_slots.items():
            if url in slots and slots[url][1] != n:
                raise ConfigError(f"{where}: backend {url} has {slots[url][1]} slots in pool "
                                  f"{slots[url][0]} and {n} in pool {pool.name}")
            slots[url] = (pool.name, n)
    del default_backends


def parse_pool_access(value: object, where: str) -> tuple[dict[str, list[str]],
                                                           dict[str, list[str]]]:
    """`[pool_access]`: `users = {NAME = [pools]}`, `keys = {KEY_ID = [pools]}`."""
    if not isinstance(value, dict) or set(value) - {"users", "keys"}:
        raise ConfigError(f"{where}: pool_access must be a table with `users` and/or `keys`")
    out: list[dict[str, list[str]]] = []
    for part in ("users", "keys"):
        table = value.get(part, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: pool_access.{part} must be a table of name = [pools]")
        rows: dict[str, list[str]] = {}
        for who, pools in table.items():
            if not isinstance(pools, list):
                raise ConfigError(f"{where}: pool_access.{part}.{who} must be a list of pools")
            rows[who] = [check_pool_name(p, f"{where}: pool_access.{part}.{who}") for p in pools]
        out.append(rows)
    return out[0], out[1]


# -- Validation ---------------------------------------------------------------
# One table of what each numeric setting may be, read by every way a value
# comes in: flags and env vars (settings_from_args ends with validate_settings),
# the TOML file (at start and on reload), and the admin API (slots, weights).
# A value outside it would make the gateway hang or refuse everything (slots
# 0 runs nothing, timeout 0 fails every request), so it is refused with one
# line naming the setting, and a reload keeps the old config.


@dataclass(frozen=True, slots=True)
class Rule:
    """The accepted range of one numeric setting."""

    integer: bool
    minimum: float
    # True: the value must be greater than `minimum`; False: at least `minimum`.
    exclusive: bool = False
    maximum: float | None = None
    note: str = ""

    def describe(self) -> str:
        """The rule in words, for error messages."""
        kind = "an integer" if self.integer else "a number"
        if self.maximum is not None:
            text = f"{kind} from {self.minimum:g} to {self.maximum:g}"
        elif self.exclusive:
            text = f"{kind} greater than {self.minimum:g}"
        else:
            text = f"{kind} >= {self.minimum:g}"
        return text + (f" ({self.note})" if self.note else "")


# Far above any real backend's concurrency or any useful share of turns.
MAX_SLOTS_OR_WEIGHT = 100_000

RULES: dict[str, Rule] = {
    "port": Rule(True, 0, maximum=65535, note="0 = any free port"),
    "admin_port": Rule(True, -1, maximum=65535, note="-1 = no admin API, 0 = any free port"),
    "timeout": Rule(False, 0, exclusive=True),
    # Bounded: a slots or weight is stored as a 64-bit integer (SQLite, Redis), and
    # one that does not fit would stall every later write of the state store.
    "slots": Rule(True, 1, maximum=MAX_SLOTS_OR_WEIGHT),
    "weight": Rule(True, 1, maximum=MAX_SLOTS_OR_WEIGHT),
    "health_interval": Rule(False, 0, exclusive=True),
    "health_fail_threshold": Rule(True, 1),
    "health_ok_threshold": Rule(True, 1),
    "max_queue": Rule(True, 1),
    "max_queue_per_user": Rule(True, 1),
    "queue_timeout": Rule(False, 0, note="0 = no limit"),
    "max_body_mb": Rule(False, 0, exclusive=True),
    "max_bodies_mb": Rule(False, 0, exclusive=True),
    "max_body_bytes": Rule(True, 1),
    "max_bodies_bytes": Rule(True, 1),
    "cache_ttl": Rule(False, 0, exclusive=True),
    "cache_mb": Rule(False, 0),
    "user_idle_days": Rule(False, 0, note="0 = never prune"),
}
CHOICES: dict[str, tuple[str, ...]] = {}  # filled below, once the choice tuples exist


def check_setting(name: str, value: object, where: str | None = None) -> Any:
    """`value` if it is valid for setting `name` (RULES), else ConfigError naming `where`."""
    rule = RULES[name]
    label = where or name
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            rule.integer and not isinstance(value, int)):
        raise ConfigError(f"{label} must be {rule.describe()}, got {value!r}")
    if not math.isfinite(value) or value < rule.minimum or (
            rule.exclusive and value == rule.minimum) or (
            rule.maximum is not None and value > rule.maximum):
        raise ConfigError(f"{label} must be {rule.describe()}, got {value!r}")
    return value


def validate_settings(settings: Settings, where: str = "settings") -> None:
    """Check every setting against RULES and CHOICES (ConfigError on the first bad one).

    Called on the finished Settings of a start (flags > env > file) and on the
    fresh Settings of a reload before anything live is changed.
    """
    for name in RULES:
        if hasattr(settings, name):
            check_setting(name, getattr(settings, name), f"{where}: {name}")
    for name, choices in CHOICES.items():
        if getattr(settings, name) not in choices:
            raise ConfigError(f"{where}: {name} must be one of {', '.join(choices)}, "
                              f"got {getattr(settings, name)!r}")
    for url, slots in settings.backend_slots.items():
        check_setting("slots", slots, f"{where}: backend {url}: slots")
    for user, weight in settings.user_weights.items():
        check_setting("weight", weight, f"{where}: weight of {user}")
    if not settings.backends:
        raise ConfigError(f"{where}: no backend URL given")


def check_redis_url(url: str) -> str:
    """A `--redis` / `REDIS_URL` value redis-py can use (ConfigError naming the problem).

    redis-py itself raises a bare ValueError when it connects: a traceback at start.
    """
    # Imported here: a gateway without --redis never imports redis-py.
    from redis.connection import parse_url

    try:
        parse_url(url)  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
    except ValueError as exc:
        raise ConfigError(f"--redis / REDIS_URL {redact_url(url)!r}: {exc}") from None
    return url


def redact_url(url: str) -> str:
    """`url` with its password replaced by `***`, for messages and logs."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url.split("@", 1)[-1] if "@" in url else url
    if not password:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def env_default(names: tuple[str, ...], default: str | None = None) -> str | None:
    """The first set, non-empty environment variable of `names`, else `default`."""
    for name in names:
        value = os.environ.get(name)
        if value is not None and value.strip():
            return value
    return default


# Keys a TOML config file may set at the top level, with their Settings field
# and a converter. Anything else is an error, so typos do not pass silently.
_TOML_SCALARS: dict[str, tuple[str, type]] = {
    "host": ("host", str),
    "port": ("port", int),
    "timeout": ("timeout", float),
    "allow_all_routes": ("allow_all_routes", bool),
    "slots": ("slots", int),
    "admin_port": ("admin_port", int),
    "admin_host": ("admin_host", str),
    "metrics_public": ("metrics_public", bool),
    "health_interval": ("health_interval", float),
    "health_fail_threshold": ("health_fail_threshold", int),
    "health_ok_threshold": ("health_ok_threshold", int),
    "balance": ("balance", str),
    "max_queue": ("max_queue", int),
    "max_queue_per_user": ("max_queue_per_user", int),
    "queue_timeout": ("queue_timeout", float),
    "usage_retention_days": ("usage_retention_days", int),
    "user_idle_days": ("user_idle_days", float),
}
BALANCE_CHOICES = ("least-conn", "round-robin", "random", "affinity")
CACHE_CHOICES = ("deterministic", "all", "off")
STREAM_USAGE_CHOICES = ("inject", "off")
CHOICES.update(balance=BALANCE_CHOICES, cache_mode=CACHE_CHOICES,
               stream_usage=STREAM_USAGE_CHOICES, auth=("off", "keys"),
               log_format=("json", "logfmt"))


def load_toml(path: str) -> dict[str, object]:
    """Read a TOML config file (errors become ConfigError with the file name)."""
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                          f"at offset {exc.start})") from None


def apply_toml(settings: Settings, data: dict[str, object], path: str = "config") -> None:
    """Apply a parsed TOML config to settings (called before env vars and flags)."""
    for key, value in data.items():
        if key in _TOML_SCALARS:
            field_name, kind = _TOML_SCALARS[key]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ConfigError(f"{path}: {key} must be a {kind.__name__}")
            if field_name in RULES:
                value = check_setting(field_name, value, f"{path}: {key}")
            setattr(settings, field_name, value)
        elif key in ("max_body_mb", "max_bodies_mb"):
            mb = check_setting(key, value, f"{path}: {key}")
            setattr(settings, key.replace("_mb", "_bytes"), int(mb * 1024 * 1024))
        elif key == "backends":
            _apply_backends(settings, value, path)
        elif key == "users":
            _apply_users(settings, value, path)
        elif key == "limits":
            _apply_limits(settings, value, path)
        elif key == "cache":
            _apply_cache(settings, value, path)
        elif key == "pools":
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: pools must be a table of [pools.NAME] tables")
            settings.pools = {name: parse_pool(name, item, f"{path}: pool")
                              for name, item in value.items()}
        elif key == "pool_access":
            settings.pool_access_users, settings.pool_access_keys = parse_pool_access(
                value, path)
        elif key == "origins":
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise ConfigError(f"{path}: origins must be a string or an array of strings")
            try:
                settings.origins = parse_origins(items, f"{path}: origins")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        elif key == "stream_usage":
            if value not in STREAM_USAGE_CHOICES:
                raise ConfigError(f"{path}: stream_usage must be one of "
                                  f"{', '.join(STREAM_USAGE_CHOICES)}")
            settings.stream_usage = str(value)
        else:
            raise ConfigError(f"{path}: unknown setting {key!r}")
    if settings.usage_retention_days < 0:
        raise ConfigError(f"{path}: usage_retention_days must be 0 (for ever) or more")
    check_pools(settings.pools, settings.backends, f"{path}: pools")
    validate_settings(settings, path)


def _apply_backends(settings: Settings, value: object, path: str) -> None:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{path}: backends must be a non-empty array of tables")
    backends: list[BackendUrl] = []
    for item in value:
        if isinstance(item, str):
            item = {"url": item}
        if not isinstance(item, dict) or not isinstance(item.get("url"), str):
            raise ConfigError(f"{path}: each backend needs a url")
        b = parse_backend_url(item["url"])
        backends.append(b)
        slots = item.get("slots")
        if slots is not None:
            settings.backend_slots[b.url] = check_setting(
                "slots", slots, f"{path}: backend {b.url}: slots")
        options = _backend_options(item, f"{path}: backend {b.url}")
        if options is not None:
            settings.backend_options[b.url] = options
    settings.backends = backends


def _backend_options(item: dict[str, Any], where: str) -> BackendOptions | None:
    """`kind`, `probe_path`, `probe_interval` and `openai_via` of one `[[backends]]` table."""
    if not any(k in item for k in ("kind", "probe_path", "probe_interval", "openai_via")):
        return None
    options = BackendOptions()
    kind = item.get("kind", "auto")
    if kind not in BACKEND_KINDS:
        raise ConfigError(f"{where}: kind must be one of {', '.join(BACKEND_KINDS)}")
    options.kind = str(kind)
    probe_path = item.get("probe_path")
    if probe_path is not None:
        if not isinstance(probe_path, str) or not probe_path.startswith("/"):
            raise ConfigError(f"{where}: probe_path must be a path starting with /")
        options.probe_path = probe_path
    interval = item.get("probe_interval")
    if interval is not None:
        if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
            raise ConfigError(f"{where}: probe_interval must be a positive number of seconds")
        options.probe_interval = float(interval)
    via = item.get("openai_via", "auto")
    if via not in OPENAI_VIA:
        raise ConfigError(f"{where}: openai_via must be one of {', '.join(OPENAI_VIA)}")
    options.openai_via = str(via)
    return options


def _apply_users(settings: Settings, value: object, path: str) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: users must be a table")
    for key in ("vip", "boost"):
        names = value.get(key, [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{path}: users.{key} must be a list of user ids")
        getattr(settings, f"{key}_users").extend(names)
    weights = value.get("weights", {})
    if not isinstance(weights, dict):
        raise ConfigError(f"{path}: users.weights must be a table of user = weight")
    for user, weight in weights.items():
        settings.user_weights[user] = check_setting("weight", weight,
                                                    f"{path}: users.weights.{user}")
    unknown = set(value) - {"vip", "boost", "weights"}
    if unknown:
        raise ConfigError(f"{path}: unknown users setting {min(unknown)!r}")


def _apply_limits(settings: Settings, value: object, path: str) -> None:
    """`[limits]` defaults and `[limits.users.NAME]` per-user limits."""
    from ollamamq_fast.limits import check_limits

    if not isinstance(value, dict):
        raise ConfigError(f"{path}: limits must be a table")
    defaults = {k: v for k, v in value.items() if k not in ("users", "keys")}
    try:
        settings.limits.update(check_limits(defaults))
    except ValueError as exc:
        raise ConfigError(f"{path}: limits: {exc}") from None
    users = value.get("users", {})
    if not isinstance(users, dict):
        raise ConfigError(f"{path}: limits.users must be a table of user = {{ limits }}")
    for user, limits in users.items():
        if not isinstance(limits, dict):
            raise ConfigError(f"{path}: limits.users.{user} must be a table")
        try:
            settings.user_limits[user] = check_limits(limits)
        except ValueError as exc:
            raise ConfigError(f"{path}: limits.users.{user}: {exc}") from None
    keys = value.get("keys", {})
    if not isinstance(keys, dict):
        raise ConfigError(f"{path}: limits.keys must be a table of key_id = {{ budgets }}")
    for key_id, budgets in keys.items():
        if not isinstance(budgets, dict):
            raise ConfigError(f"{path}: limits.keys.{key_id} must be a table")
        unknown = set(budgets) - {"budget_day", "budget_month"}
        if unknown:
            raise ConfigError(f"{path}: limits.keys.{key_id}: only budget_day and "
                              f"budget_month apply to a key, not {', '.join(sorted(unknown))}")
        try:
            settings.key_budgets[key_id] = {
                name: int(v) for name, v in check_limits(budgets).items()}
        except ValueError as exc:
            raise ConfigError(f"{path}: limits.keys.{key_id}: {exc}") from None


def _apply_cache(settings: Settings, value: object, path: str) -> None:
    """`[cache]`: mode, ttl (seconds), mb (local byte budget)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: cache must be a table")
    for key, item in value.items():
        if key == "mode":
            if item not in CACHE_CHOICES:
                raise ConfigError(f"{path}: cache.mode must be one of {', '.join(CACHE_CHOICES)}")
            settings.cache_mode = str(item)
        elif key in ("ttl", "mb"):
            name = "cache_ttl" if key == "ttl" else "cache_mb"
            setattr(settings, name, float(check_setting(name, item, f"{path}: cache.{key}")))
        else:
            raise ConfigError(f"{path}: unknown cache setting {key!r}")


def parse_weights(text: str) -> dict[str, int]:
    """Parse `user=3,other=2` (the --weight flag)."""
    out: dict[str, int] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        user, sep, num = item.rpartition("=")
        if not sep or not user.strip():
            raise ConfigError(f"--weight: expected USER=N, got {item!r}")
        try:
            weight = int(num)
        except ValueError:
            raise ConfigError(f"--weight: {item!r}: weight must be an integer") from None
        out[user.strip()] = check_setting("weight", weight, f"--weight: {item!r}: weight")
    return out
