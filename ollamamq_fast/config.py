"""Settings: one object built from CLI flags > environment variables > defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

DEFAULT_PORT = 11435
DEFAULT_ADMIN_PORT = 11436
DEFAULT_HOST = "127.0.0.1"
DEFAULT_BACKEND = "http://localhost:11434"
# Seconds of silence allowed from a backend. Not a cap on a long stream: a model
# load or a pull can be silent for minutes (PROTOCOL.md §7.24).
DEFAULT_TIMEOUT = 300.0
# Large enough for chat requests with several base64 images (PROTOCOL.md §7.14);
# blob uploads are streamed and are not bound by it.
DEFAULT_MAX_BODY_MB = 100.0


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
        """Host header value for requests to this backend (PROTOCOL.md §7.17)."""
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
    parts = urlsplit(text)
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
    admin_port: int = DEFAULT_ADMIN_PORT
    health_interval: float = 10.0
    # Fair-queue bounds: beyond them 429 with Retry-After; waiting longer than
    # queue_timeout seconds gives 503 with Retry-After (0 = wait for ever).
    max_queue: int = 200_000
    max_queue_per_user: int = 1_000
    queue_timeout: float = 600.0
    # Start an in-process simulator and use it as a backend (demo without Ollama).
    sim: bool = False
    sim_models: list[str] = field(default_factory=list)
    # With --sim: keep the -o backends as well (only when -o was given explicitly).
    sim_keep_backends: bool = False


def env_default(names: tuple[str, ...], default: str | None = None) -> str | None:
    """The first set, non-empty environment variable of `names`, else `default`."""
    for name in names:
        value = os.environ.get(name)
        if value is not None and value.strip():
            return value
    return default
