"""What to send: targets, workload groups, and the precomputed request bytes.

The measuring path never builds JSON: every (route, model) pair becomes a
request prefix and body once, and each user's identity headers are rendered
once and cached, so issuing a request is a table lookup and a concatenation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import orjson

# Routes the generator knows how to build a body for. Ollama-native routes
# stream by default; the OpenAI-compatible ones only when asked (docs/protocol-notes.md §3).
GENERATE_ROUTES: tuple[str, ...] = ("/api/generate", "/v1/completions")
CHAT_ROUTES: tuple[str, ...] = ("/api/chat", "/v1/chat/completions")
EMBED_ROUTES: tuple[str, ...] = ("/api/embed", "/api/embeddings", "/v1/embeddings")
ROUTES: tuple[str, ...] = GENERATE_ROUTES + CHAT_ROUTES + EMBED_ROUTES

DEFAULT_MODEL = "llama3.2:latest"
# Filler for prompts of an exact byte size: plain ASCII, so a byte is a
# character and the JSON encoding never escapes anything.
_FILLER = b"The quick brown fox jumps over the lazy dog. "
# Route/model choices follow a shuffled pattern of this prime length, so the
# mix is even and stays uncorrelated with any round-robin user count.
_PATTERN_LEN = 1009


@dataclass(frozen=True)
class Target:
    """One server under test: where to connect and what to put in `Host`."""

    label: str
    url: str
    host: str
    port: int
    path_prefix: str

    @classmethod
    def parse(cls, url: str, label: str) -> Target:
        """Parse `http://host[:port][/prefix]`; raises ValueError on anything else."""
        if "://" not in url:
            url = "http://" + url
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise ValueError(f"{url}: only plain http:// targets are supported")
        if not parts.hostname:
            raise ValueError(f"{url}: no host")
        port = parts.port or 80
        return cls(label, url, parts.hostname, port, parts.path.rstrip("/"))

    @property
    def authority(self) -> str:
        """The `Host` header value (host:port, IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass
class GroupSpec:
    """One homogeneous slice of the load: its users, requests and pacing.

    A plain CLI run has one group; scenarios mix several (e.g. one heavy
    user against several light ones) and get stats per group.
    """

    name: str = "main"
    routes: tuple[str, ...] = ("/api/generate",)
    models: tuple[str, ...] = (DEFAULT_MODEL,)
    stream: bool = True
    prompt_bytes: int = 64
    max_tokens: int = 32
    users: int = 1
    user_prefix: str = "user-"
    # Closed loop: connection k always speaks for user k % users (one
    # outstanding request per user) instead of rotating users per request.
    user_per_connection: bool = False
    send_user_header: bool = True
    # `Authorization: Bearer` value; "{user}" is replaced by the user number.
    api_key: str | None = None
    # Explicit keys (from --api-keys-file): user K uses api_keys[K % len].
    api_keys: tuple[str, ...] = ()
    concurrency: int = 16
    # Open loop when set: Poisson arrivals at this many requests per second.
    rate: float | None = None
    # Stop after this many requests (else the run's duration decides).
    requests: int | None = None
    extra_headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def validate(self) -> None:
        """Raise ValueError with a readable message for impossible settings."""
        for route in self.routes:
            if route not in ROUTES:
                raise ValueError(f"unknown route {route!r}; known: {', '.join(ROUTES)}")
        if not self.routes or not self.models:
            raise ValueError("at least one route and one model are needed")
        if self.prompt_bytes < 1:
            raise ValueError("--prompt-bytes must be at least 1 (an empty prompt means 'load model' to Ollama)")
        if self.max_tokens < 1:
            raise ValueError("--max-tokens must be at least 1")
        if self.users < 1:
            raise ValueError("--users must be at least 1")
        if self.concurrency < 1:
            raise ValueError("-c/--concurrency must be at least 1")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("--rate must be positive")
        if self.rate is not None and self.user_per_connection:
            raise ValueError("--per-connection-users needs the closed loop (open-loop connections are shared)")
        if self.requests is not None and self.requests < 1:
            raise ValueError("-n/--requests must be at least 1")

    def user_name(self, user: int) -> str:
        """Name sent in X-User-ID for user number `user`."""
        return f"{self.user_prefix}{user}"


@dataclass
class RunSpec:
    """A whole load run against one target: groups plus global limits."""

    groups: list[GroupSpec]
    # Seconds of measured load; None means every group stops on its -n count.
    duration: float | None = 10.0
    timeout: float = 60.0
    warmup: float = 0.0
    procs: int = 1
    seed: int = 1

    def validate(self) -> None:
        """Raise ValueError when the run could not end or makes no sense."""
        if not self.groups:
            raise ValueError("no workload groups")
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError("group names must be unique")
        for g in self.groups:
            g.validate()
            if self.duration is None and g.requests is None:
                raise ValueError(f"group {g.name}: give -n/--requests or -d/--duration")
        if self.duration is not None and self.duration <= 0:
            raise ValueError("-d/--duration must be positive")
        if self.timeout <= 0:
            raise ValueError("--timeout must be positive")
        if self.warmup < 0 or (self.warmup > 0 and self.duration is None):
            raise ValueError("--warmup needs -d/--duration (warm-up requests are not counted)")
        if self.procs < 1:
            raise ValueError("--procs must be at least 1")


def make_prompt(n: int) -> str:
    """An ASCII prompt of exactly `n` bytes."""
    reps = n // len(_FILLER) + 1
    return (_FILLER * reps)[:n].decode("ascii")


def build_body(route: str, model: str, stream: bool, prompt: str, max_tokens: int) -> bytes:
    """JSON body for `route`, asking for at most `max_tokens` tokens."""
    obj: dict[str, object]
    if route == "/api/generate":
        obj = {"model": model, "prompt": prompt, "stream": stream, "options": {"num_predict": max_tokens}}
    elif route == "/api/chat":
        obj = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "stream": stream,
            "options": {"num_predict": max_tokens},
        }
    elif route == "/v1/chat/completions":
        obj = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "stream": stream,
            "max_tokens": max_tokens,
        }
    elif route == "/v1/completions":
        obj = {"model": model, "prompt": prompt, "stream": stream, "max_tokens": max_tokens}
    elif route == "/api/embed":
        obj = {"model": model, "input": prompt}
    elif route in ("/api/embeddings",):
        obj = {"model": model, "prompt": prompt}
    elif route == "/v1/embeddings":
        obj = {"model": model, "input": prompt}
    else:
        raise ValueError(f"unknown route {route!r}")
    return orjson.dumps(obj)


def build_prefix(target: Target, route: str, body_len: int, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """Request line and fixed headers, up to (not including) the per-user headers."""
    lines = [
        f"POST {target.path_prefix}{route} HTTP/1.1",
        f"Host: {target.authority}",
        "Content-Type: application/json",
        "Accept: application/json",
        f"Content-Length: {body_len}",
    ]
    lines.extend(f"{k}: {v}" for k, v in extra)
    return ("\r\n".join(lines) + "\r\n").encode("latin-1")


def user_headers(group: GroupSpec, user: int) -> bytes:
    """Identity headers for one user, ending the header block (`\\r\\n\\r\\n`)."""
    parts: list[str] = []
    if group.send_user_header:
        parts.append(f"X-User-ID: {group.user_name(user)}\r\n")
    key: str | None = None
    if group.api_keys:
        key = group.api_keys[user % len(group.api_keys)]
    elif group.api_key is not None:
        key = group.api_key.replace("{user}", str(user))
    if key is not None:
        parts.append(f"Authorization: Bearer {key}\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("latin-1")


class RequestFactory:
    """Precomputed request bytes for one group against one target."""

    def __init__(self, target: Target, group: GroupSpec, seed: int) -> None:
        prompt = make_prompt(group.prompt_bytes)
        self.templates: list[tuple[bytes, bytes]] = []
        for route in group.routes:
            for model in group.models:
                body = build_body(route, model, group.stream, prompt, group.max_tokens)
                self.templates.append((build_prefix(target, route, len(body), group.extra_headers), body))
        n = len(self.templates)
        pattern = [i % n for i in range(_PATTERN_LEN)]
        random.Random(seed).shuffle(pattern)
        self.pattern = pattern
        self.group = group
        # Rendered lazily: 100 000 users each get their bytes on first use only.
        self._user_bytes: list[bytes | None] = [None] * group.users

    def request(self, seq: int, user: int) -> bytes:
        """Complete request bytes for the `seq`-th request, sent as `user`."""
        prefix, body = self.templates[self.pattern[seq % _PATTERN_LEN]]
        tail = self._user_bytes[user]
        if tail is None:
            tail = self._user_bytes[user] = user_headers(self.group, user)
        return prefix + tail + body
