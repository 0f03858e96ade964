"""Admin token: one bearer token guards the whole control plane.

Only the token's blake3 digest is kept. A generated token is handed back once
(to be printed) and then exists nowhere in the process, the same way API keys
are stored by digest only (state/records.py key_digest). The digest of a generated
token is kept in the state store's meta table, so later starts accept the same
token (control/server.py); with `--state ''` it lasts one run.
"""

from __future__ import annotations

import hmac
import secrets

import blake3

# 32 random bytes: the same strength as a gateway API key.
TOKEN_BYTES = 32


def token_digest(token: str) -> bytes:
    """The blake3 digest a token is compared by."""
    return blake3.blake3(token.encode()).digest()


class AdminAuth:
    """Checks `Authorization: Bearer <token>` against one stored digest."""

    __slots__ = ("_digest",)

    def __init__(self, digest: bytes) -> None:
        self._digest = digest

    @classmethod
    def from_token(cls, token: str) -> AdminAuth:
        """Guard with a token the operator chose (--admin-token / OLLAMAMQ_ADMIN_TOKEN)."""
        if not token:
            raise ValueError("the admin token must not be empty")
        return cls(token_digest(token))

    @classmethod
    def generate(cls) -> tuple[AdminAuth, str]:
        """A fresh random token: the guard, and the token to show the operator once."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        return cls(token_digest(token)), token

    def check(self, authorization: str | None) -> bool:
        """Whether an Authorization header value carries the admin token.

        Digests are compared, not the tokens, so the comparison takes the same
        time whatever the length of the guess; compare_digest keeps it
        independent of where the first differing byte is.
        """
        if not authorization:
            return False
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        if scheme.lower() != "bearer" or not value:
            return False
        return hmac.compare_digest(token_digest(value), self._digest)
