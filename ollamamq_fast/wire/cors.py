"""Cross-origin requests from browsers (CORS), decided as Ollama decides them. Pure functions.

Ollama answers browsers with gin-contrib/cors (docs/protocol-notes.md §1):
its own origins (`http(s)://localhost`, `127.0.0.1`, `0.0.0.0`, any port;
`app://`, `file://`, `tauri://`, `vscode-webview://`, `vscode-file://`)
plus those in `OLLAMA_ORIGINS`, where `*` allows every origin and one `*`
inside an origin matches anything there. A request whose Origin is another
origin is refused with 403 before anything else, so that a web page the
user happens to open cannot drive the models behind the user's back; an
`OPTIONS` preflight from an allowed origin gets 204 with the methods and
headers it may use; other requests from one get `Access-Control-Allow-Origin`.
An Origin that is the request's own host (`http://` or `https://` and the
Host header) is no cross-origin request and is left alone.

The gateway does the same, on every route, before authentication (a
preflight carries no credentials). The Origin header is not forwarded, so
a backend never applies its own, different, rule and never adds a second
`Access-Control-Allow-Origin` (the gateway drops the backend's
`Access-Control-*` headers from answers to cross-origin requests).
Differences: the gateway's own request headers (`X-User-ID`, `X-API-Key`,
`X-Request-ID`, `Cache-Control`) may be sent, its answer headers may be
read (`Access-Control-Expose-Headers`), and a refusal has a body that says
why.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

# Ollama's own origins (envconfig.AllowedOrigins), added to the configured ones.
OLLAMA_ORIGINS: Final = tuple(
    [f"{scheme}://{host}{port}" for host in ("localhost", "127.0.0.1", "0.0.0.0")
     for port in ("", ":*") for scheme in ("http", "https")]
    + ["app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*"])
# Schemes an origin without `*` may have (gin-contrib/cors, with browser extensions on).
_SCHEMES: Final = ("http://", "https://", "chrome-extension://", "safari-extension://",
                   "moz-extension://", "ms-browser-extension://")

# What a preflight allows: gin-contrib/cors's default methods, Ollama's headers
# (as Go's CanonicalHeaderKey writes them) and the gateway's own.
_METHODS: Final = b"GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"
_HEADERS: Final = b",".join([
    b"Authorization", b"Content-Type", b"User-Agent", b"Accept", b"X-Requested-With",
    b"Openai-Beta", b"X-Stainless-Arch", b"X-Stainless-Async",
    b"X-Stainless-Custom-Poll-Interval", b"X-Stainless-Helper-Method", b"X-Stainless-Lang",
    b"X-Stainless-Os", b"X-Stainless-Package-Version", b"X-Stainless-Poll-Helper",
    b"X-Stainless-Retry-Count", b"X-Stainless-Runtime", b"X-Stainless-Runtime-Version",
    b"X-Stainless-Timeout",
    b"X-User-Id", b"X-Api-Key", b"X-Request-Id", b"Cache-Control",
])
_MAX_AGE_S: Final = 12 * 3600
# The gateway's answer headers a page may read.
_EXPOSE: Final = (b"Access-Control-Expose-Headers: X-Request-ID, X-Gateway-Backend, "
                  b"X-Gateway-Queue-Ms, X-Cache, Retry-After\r\n")
_PREFLIGHT: Final = (b"Access-Control-Allow-Methods: " + _METHODS + b"\r\n"
                     b"Access-Control-Allow-Headers: " + _HEADERS + b"\r\n"
                     b"Access-Control-Max-Age: %d\r\n" % _MAX_AGE_S)
_VARY_PREFLIGHT: Final = (b"Vary: Origin\r\nVary: Access-Control-Request-Method\r\n"
                          b"Vary: Access-Control-Request-Headers\r\n")
# An origin is echoed into a header line: visible ASCII only, and short.
_MAX_ORIGIN: Final = 512


def parse_origins(items: Iterable[str], where: str = "origins") -> list[str]:
    """Configured origins (a list, or a comma-separated `OLLAMA_ORIGINS`), checked: ValueError.

    As Ollama: quotes and blanks around are trimmed, empty items skipped;
    `*` alone allows all; one `*` may stand anywhere else; an origin
    without one needs a scheme (`http://`, `https://`, a browser extension's).
    """
    out: list[str] = []
    for raw in items:
        for item in raw.split(","):
            origin = item.strip().strip("\"'").strip()
            if not origin:
                continue
            stars = origin.count("*")
            if stars > 1:
                raise ValueError(f"{where}: {origin!r} has more than one *")
            if not stars and not origin.lower().startswith(_SCHEMES):
                raise ValueError(f"{where}: {origin!r} needs a scheme (http://, https://, "
                                 "a browser extension's) or a *")
            if not origin.isascii() or not origin.isprintable() or " " in origin:
                raise ValueError(f"{where}: {origin!r} is not an origin")
            out.append(origin)
    return out


class Origins:
    """Which browser origins may use the gateway: Ollama's and the configured ones."""

    def __init__(self, configured: Iterable[str] = ()) -> None:
        every = [*configured, *OLLAMA_ORIGINS]
        self.allow_all = "*" in every
        self.exact: set[bytes] = {o.lower().encode() for o in every if "*" not in o}
        # (before the *, after it) of each wildcard origin; Ollama's have the * last.
        self.wildcards: list[tuple[bytes, bytes]] = []
        for o in every:
            if "*" in o and o != "*":
                before, _, after = o.partition("*")
                self.wildcards.append((before.encode(), after.encode()))

    def allows(self, origin: bytes) -> bool:
        """Whether a browser page of `origin` may send requests (gin-contrib/cors's rule)."""
        if len(origin) > _MAX_ORIGIN or not all(0x21 <= c <= 0x7E for c in origin):
            return False
        if self.allow_all or origin in self.exact:
            return True
        for before, after in self.wildcards:
            if origin.startswith(before) and origin.endswith(after) \
                    and len(origin) >= len(before) + len(after):
                return True
        return False

    def check(self, origin: bytes, host: bytes) -> bytes | None:
        """A request's Origin: b"" for none to add (the request's own host), the
        header lines an allowed origin's answers carry, or None: refused."""
        if origin in (b"http://" + host, b"https://" + host):
            return b""
        if not self.allows(origin):
            return None
        if self.allow_all:
            return b"Access-Control-Allow-Origin: *\r\n" + _EXPOSE
        return b"Access-Control-Allow-Origin: " + origin + b"\r\nVary: Origin\r\n" + _EXPOSE

    def preflight(self, origin: bytes) -> bytes:
        """The header lines of the 204 answer to an allowed origin's OPTIONS preflight."""
        if self.allow_all:
            return _PREFLIGHT + b"Access-Control-Allow-Origin: *\r\n"
        return _PREFLIGHT + _VARY_PREFLIGHT + b"Access-Control-Allow-Origin: " + origin + b"\r\n"


def without_cors(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """A backend's answer headers without its own `Access-Control-*` ones (the gateway's replace them)."""
    return [h for h in headers if not h[0].lower().startswith(b"access-control-")]
