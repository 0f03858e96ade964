"""StateView: the synchronous, in-memory state the data plane reads.

Only the view lives here: dicts and sets read in O(1) on the event loop's
thread, and the private updates `StateCache` applies for local writes, replays
and reloads. Nothing here awaits or touches a store.
"""

from __future__ import annotations

import logging

from .ipblock import IpBlocklist
from .records import (
    TOPIC_BACKENDS,
    TOPIC_BLOCKS,
    TOPIC_KEYS,
    TOPIC_USERS,
    BackendRecord,
    KeyRecord,
    Snapshot,
    UserSettings,
)

log = logging.getLogger("ollamamq_fast.state")


class StateView:
    """Keys, users, blocklist and runtime backends as plain dicts and sets."""

    def __init__(self) -> None:
        self.keys: dict[str, KeyRecord] = {}  # key_id ->
        self._by_digest: dict[str, KeyRecord] = {}
        self.users: dict[str, UserSettings] = {}
        self.blocked_users: set[str] = set()
        self._ips = IpBlocklist()
        self.backends: dict[str, BackendRecord] = {}  # url ->
        # Whether anything at all is blocked: one attribute read on the data
        # plane for the usual answer (nothing is), kept in step by every update.
        self.any_blocked = False

    # Reads (synchronous, O(1))

    def key_by_digest(self, digest: str) -> KeyRecord | None:
        """The live key with this secret digest; None if unknown or revoked."""
        rec = self._by_digest.get(digest)
        return None if rec is None or rec.revoked else rec

    def user(self, user: str) -> UserSettings | None:
        """One user's settings, None for a user the operator never configured."""
        return self.users.get(user)

    def is_blocked_user(self, user: str) -> bool:
        """Whether a user is on the blocklist."""
        return user in self.blocked_users

    def is_blocked_ip(self, ip: str) -> bool:
        """Whether a peer address is blocked, exactly or by a CIDR entry."""
        return ip in self._ips

    @property
    def ips_blocked(self) -> bool:
        """Whether any address or CIDR is blocked."""
        return len(self._ips) > 0

    @property
    def blocked_ips(self) -> set[str]:
        """Blocked addresses and CIDRs in canonical spelling; for the admin API."""
        return self._ips.entries

    # Updates, applied by StateCache for local writes, replays and reloads

    def _install(self, snap: Snapshot, topics: set[str]) -> None:
        """Replace the view of the given topics with a snapshot's."""
        if TOPIC_KEYS in topics:
            self.keys = {k.key_id: k for k in snap.keys}
            self._by_digest = {k.digest: k for k in snap.keys}
        if TOPIC_USERS in topics:
            self.users = {u.user: u for u in snap.users}
        if TOPIC_BLOCKS in topics:
            self.blocked_users = set(snap.blocked_users)
            ips = IpBlocklist()
            for entry in snap.blocked_ips:
                try:
                    ips.add(entry)
                except ValueError:
                    log.warning(
                        "state: ignoring blocklist entry %r: not an address or CIDR",
                        entry,
                    )
            self._ips = ips
            self._blocks_changed()
        if TOPIC_BACKENDS in topics:
            self.backends = {b.url: b for b in snap.backends}

    def _set_key(self, rec: KeyRecord) -> None:
        """Put a key in the view, keeping the digest index in step."""
        old = self.keys.get(rec.key_id)
        if old is not None and self._by_digest.get(old.digest) is old:
            del self._by_digest[old.digest]
        self.keys[rec.key_id] = rec
        self._by_digest[rec.digest] = rec

    def _set_user(self, user: str, s: UserSettings | None) -> None:
        """Put or drop one user's settings in the view."""
        if s is None:
            self.users.pop(user, None)
        else:
            self.users[user] = s

    def _set_blocked_user(self, user: str, blocked: bool) -> None:
        """Add or remove a blocked user in the view."""
        if blocked:
            self.blocked_users.add(user)
        else:
            self.blocked_users.discard(user)
        self._blocks_changed()

    def _set_blocked_ip(self, key: str, blocked: bool) -> None:
        """Add or remove a blocked address or CIDR (canonical spelling) in the view."""
        if blocked:
            self._ips.add(key)
        else:
            self._ips.discard(key)
        self._blocks_changed()

    def _blocks_changed(self) -> None:
        self.any_blocked = bool(self.blocked_users) or len(self._ips) > 0

    def _set_backend(self, url: str, rec: BackendRecord | None) -> None:
        """Put or drop a runtime backend in the view."""
        if rec is None:
            self.backends.pop(url, None)
        else:
            self.backends[url] = rec
