"""Who a request is from: the user (for fair queuing) and the client address.

- `--auth off` (default): the user is `X-User-ID`, else the client address.
- `--auth keys`: `Authorization: Bearer <key>` or `X-API-Key: <key>` is
  required; the key decides the user. A client's `X-User-ID` is ignored unless
  the key is a trusted service key, which may name its own end users: they
  are the service's users, `SERVICE:NAME` (the key's user, a colon, the name),
  so a service can never act as an ordinary user (spend its quota, take its
  VIP rank, weight or limits, or dodge its block), nor as another service's
  user. A key's own user may not contain the colon (`check_key_user`).
- Key scopes: `inference` for every route that reads or generates, `models`
  for model management (`scope_for`); a key without the scope a path needs
  gets 403.
- `--trusted-proxies CIDR,...`: only connections from these addresses may set
  the client address through `X-Forwarded-For` (used for IP blocks and the
  address fallback); otherwise the socket's peer address is the client.

Keys are looked up by their blake3 digest (the secret itself is never kept)
and the match is confirmed with a constant-time comparison.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Callable
from typing import Final, NamedTuple

from ollamamq_fast.state.records import (
    SCOPE_INFERENCE,
    SCOPE_MODELS,
    KeyRecord,
    key_digest,
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Model management: these change what a backend holds, so they need the
# `models` scope (paths as the route table knows them, after normalization).
MODEL_MANAGEMENT_PATHS: Final = frozenset({b"/api/delete", b"/api/pull", b"/api/push", b"/api/create",
                                    b"/api/copy"})
BLOBS_PREFIX: Final = b"/api/blobs/"
# Separates a service key's user from the end user it names (`portal:alice`);
# not allowed in the user of a key, so the two never meet.
SERVICE_SEPARATOR: Final = ":"

# User ids (X-User-ID; the users of keys): at most this many bytes...
MAX_USER_ID_BYTES: Final = 128
# ...of printable ASCII (the common case, one C-level match), else printable UTF-8.
_PRINTABLE_ASCII_ID: Final = re.compile(rb"[\x20-\x7e]{1,%d}" % MAX_USER_ID_BYTES)


class AuthError(Exception):
    """The request has no valid key (answered 401 in the route's shape).

    The status is set per instance: compiled by mypyc, an exception class's
    class attributes are not visible on its instances.
    """

    def __init__(self, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.status = status


class ScopeError(AuthError):
    """The key is valid but lacks the scope the path needs (answered 403)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 403)


class UserIdError(ValueError):
    """An X-User-ID the gateway does not accept (answered 400 in the route's shape)."""


class Principal(NamedTuple):
    """Who a keyed request is from, and what its key may do."""

    user: str
    key_id: str
    scopes: tuple[str, ...]


def scope_for(path: bytes) -> str:
    """The scope a request to this normalized path needs."""
    if path in MODEL_MANAGEMENT_PATHS or path.startswith(BLOBS_PREFIX):
        return SCOPE_MODELS
    return SCOPE_INFERENCE


def check_user_id(raw: bytes, label: str = "X-User-ID") -> str:
    """The user id an `X-User-ID` value names, surrounding blanks dropped (UserIdError).

    At most MAX_USER_ID_BYTES bytes of UTF-8, printable characters only (no
    control, line-break or format characters). b"" (no header) gives "".
    Cheap on the hot path: one regex match for the usual short ASCII id.
    """
    value = raw.strip(b" \t")
    if not value or _PRINTABLE_ASCII_ID.fullmatch(value):
        return value.decode("ascii")
    if len(value) > MAX_USER_ID_BYTES:
        raise UserIdError(f"{label} is too long: at most {MAX_USER_ID_BYTES} bytes")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise UserIdError(f"{label} must be UTF-8 text") from None
    if not text.isprintable():
        raise UserIdError(f"{label} may hold printable characters only "
                          "(no control or line-break characters)")
    return text


def check_key_user(user: str) -> str:
    """The user of a new key: a valid user id, not empty, without SERVICE_SEPARATOR
    (UserIdError, a ValueError)."""
    name = check_user_id(user.encode("utf-8", "surrogatepass"), "a key's user")
    if not name:
        raise UserIdError("a key needs a user")
    if SERVICE_SEPARATOR in name:
        raise UserIdError(f"a key's user may not contain {SERVICE_SEPARATOR!r}: it names the "
                         "end users of service keys (SERVICE:USER)")
    return name


def parse_networks(text: str) -> list[Network]:
    """Parse `10.0.0.0/8,127.0.0.1` into networks (ValueError on a bad entry)."""
    return [ipaddress.ip_network(item.strip(), strict=False)
            for item in text.split(",") if item.strip()]


def _address(hop: str) -> str:
    """One X-Forwarded-For hop as an address, in the one spelling the blocklist and
    the per-address user use: without the port some proxies add (`203.0.113.9:51234`,
    `[2001:db8::1]:443`, as Azure's Application Gateway sends), brackets, or another
    spelling of the same IPv6 address. Anything else is kept as it is."""
    hop = hop.strip()
    host = hop
    if host.startswith("["):
        end = host.find("]")
        if end > 0:
            host = host[1:end]
    elif host.count(":") == 1:
        host = host.partition(":")[0]  # IPv4 with a port (an IPv6 address has more colons)
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return hop


class Identity:
    """Resolves users and client addresses for the data plane."""

    def __init__(self, mode: str, trusted_proxies: list[Network],
                 key_lookup: Callable[[str], KeyRecord | None]) -> None:
        self.keys_required = mode == "keys"
        self.trusted_proxies = trusted_proxies
        self.key_lookup = key_lookup

    def client_ip(self, peer_ip: str, forwarded_for: bytes) -> str:
        """The client address: the peer, or the nearest untrusted X-Forwarded-For hop."""
        if not self.trusted_proxies or not forwarded_for or not self._trusted(peer_ip):
            return peer_ip
        hops = [_address(h) for h in forwarded_for.decode("latin-1").split(",") if h.strip()]
        for hop in reversed(hops):
            if not self._trusted(hop):
                return hop
        return hops[0] if hops else peer_ip

    def _trusted(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.trusted_proxies)

    def authenticate(self, authorization: bytes, api_key: bytes, header_user: str) -> Principal:
        """The user a request's key stands for, the key's id and scopes (raises AuthError).

        A trusted service key naming an end user in `header_user` acts as
        `KEYUSER:END_USER`, never as the end user's bare name.
        """
        secret = b""
        if authorization:
            scheme, _, value = authorization.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                secret = value.strip()
        if not secret and api_key:
            secret = api_key.strip()
        if not secret:
            raise AuthError("an API key is required: send Authorization: Bearer <key>")
        digest = key_digest(secret.decode("latin-1"))
        record = self.key_lookup(digest)  # None for unknown and for revoked keys
        if record is None or record.revoked or not hmac.compare_digest(record.digest, digest):
            raise AuthError("invalid or revoked API key")
        if record.trusted and header_user:
            return Principal(record.user + SERVICE_SEPARATOR + header_user, record.key_id,
                             record.scopes)
        return Principal(record.user, record.key_id, record.scopes)

    def user_and_key(self, authorization: bytes, api_key: bytes, header_user: str,
                     path: bytes | None = None) -> tuple[str, str]:
        """The user a request's key stands for and the key's id.

        Raises AuthError (401) without a valid key, and ScopeError (403) when
        the key lacks the scope `path` needs (scope_for).
        """
        principal = self.authenticate(authorization, api_key, header_user)
        if path is not None:
            needed = scope_for(path)
            if needed not in principal.scopes:
                raise ScopeError(f"this API key may not call {path.decode('latin-1')}: it needs "
                                 f"the {needed!r} scope (the key has: "
                                 f"{', '.join(principal.scopes)})")
        return principal.user, principal.key_id

    def user_for_key(self, authorization: bytes, api_key: bytes, header_user: str,
                     path: bytes | None = None) -> str:
        """The user a request's key stands for (as user_and_key)."""
        return self.user_and_key(authorization, api_key, header_user, path)[0]
