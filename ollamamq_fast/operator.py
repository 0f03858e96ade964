"""What an operator can see and change on a running gateway.

The admin API, the CLI and the dashboards all go through this one object, so
every change is applied the same way: to the live state the data plane reads,
then announced on the event bus. Runs on the gateway's event loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import time
from typing import TYPE_CHECKING, Any

import blake3

if TYPE_CHECKING:
    from ollamamq_fast.fleet.backend import Backend
    from ollamamq_fast.gateway import GatewayState

# Subscribers that fall this far behind lose events rather than grow memory.
EVENT_QUEUE_LIMIT = 1000


class EventBus:
    """In-process publish/subscribe for state changes and per-second counters."""

    def __init__(self) -> None:
        self.subscribers: set[asyncio.Queue[dict[str, Any]]] = set()

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        """A queue that receives every event published from now on."""
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(EVENT_QUEUE_LIMIT)
        self.subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        """Stop delivering to `q`."""
        self.subscribers.discard(q)

    def publish(self, kind: str, **data: Any) -> None:
        """Send an event to every subscriber (dropped for a full queue)."""
        if not self.subscribers:
            return
        event = {"type": kind, "ts": time.time(), **data}
        for q in self.subscribers:
            if not q.full():
                q.put_nowait(event)


def key_digest(secret: str) -> str:
    """The blake3 hex digest under which an API key is stored (never the key)."""
    return blake3.blake3(secret.encode()).hexdigest()


class Operator:
    """Operator actions and read models over a running gateway's state."""

    def __init__(self, state: "GatewayState") -> None:
        self.state = state
        self.events = EventBus()
        self.blocked_users: set[str] = set()
        self.blocked_ips: set[str] = set()
        self._blocked_nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        # key_id -> record dict (digest, user, name, created_at, revoked, trusted)
        self.keys: dict[str, dict[str, Any]] = {}
        self.keys_by_digest: dict[str, dict[str, Any]] = {}

    # -- Backends -----------------------------------------------------------

    def list_backends(self) -> list[dict[str, Any]]:
        """Every backend with its live state."""
        return [b.snapshot() for b in self.state.fleet.backends]

    def _backend(self, url: str) -> "Backend":
        backend = self.state.fleet.find(url)
        if backend is None:
            raise KeyError(f"no backend {url}")
        return backend

    def add_backend(self, url: str, slots: int | None = None) -> dict[str, Any]:
        """Add a backend at runtime (serves traffic after its first probe)."""
        if self.state.fleet.find(url) is not None:
            raise ValueError(f"backend {url} already exists")
        backend = self.state.add_backend(url, slots)
        self.events.publish("backend_added", backend=backend.snapshot())
        return backend.snapshot()

    def remove_backend(self, url: str) -> None:
        """Remove a backend; requests running on it finish."""
        backend = self.state.remove_backend(url)
        self.events.publish("backend_removed", url=backend.name)

    def set_draining(self, url: str, on: bool) -> dict[str, Any]:
        """Drain (no new requests) or undrain a backend."""
        backend = self.state.set_draining(url, on)
        self.events.publish("backend_changed", backend=backend.snapshot())
        return backend.snapshot()

    def set_slots(self, url: str, slots: int) -> dict[str, Any]:
        """Change how many requests run at once on a backend."""
        if slots < 1:
            raise ValueError("slots must be at least 1")
        backend = self._backend(url)
        backend.slots = slots
        self.state.dispatcher.pump()
        self.events.publish("backend_changed", backend=backend.snapshot())
        return backend.snapshot()

    # -- Users ----------------------------------------------------------------

    def list_users(self) -> list[dict[str, Any]]:
        """Users seen or configured, with traffic counters and fair-share settings."""
        queue = self.state.dispatcher.queue
        stats = self.state.stats.users
        names = set(stats) | self.blocked_users
        out = []
        for name in sorted(names):
            row: dict[str, Any] = stats[name].snapshot() if name in stats else {"user": name}
            row["vip"] = queue.is_vip(name)
            row["boost"] = queue.is_boost(name)
            row["weight"] = queue.weight(name)
            row["blocked"] = name in self.blocked_users
            out.append(row)
        return out

    def set_user(self, user: str, vip: bool | None = None, boost: bool | None = None,
                 weight: int | None = None) -> dict[str, Any]:
        """Change a user's VIP / Boost / weight; takes effect on the next dispatch."""
        queue = self.state.dispatcher.queue
        if weight is not None:
            queue.set_weight(user, weight)
        if vip is not None:
            queue.set_vip(user, vip)
        if boost is not None:
            queue.set_boost(user, boost)
        self.state.dispatcher.pump()
        row = {"user": user, "vip": queue.is_vip(user), "boost": queue.is_boost(user),
               "weight": queue.weight(user)}
        self.events.publish("user_changed", user=row)
        return row

    # -- Blocklist ------------------------------------------------------------

    def block_user(self, user: str, on: bool) -> None:
        """Block (403 at arrival and dispatch) or unblock a user."""
        if on:
            self.blocked_users.add(user)
        else:
            self.blocked_users.discard(user)
        self.events.publish("user_blocked" if on else "user_unblocked", user=user)

    def block_ip(self, ip: str, on: bool) -> None:
        """Block or unblock an address or a CIDR range."""
        net = ipaddress.ip_network(ip, strict=False)
        text = str(net) if net.num_addresses > 1 else str(net.network_address)
        if on:
            self.blocked_ips.add(text)
        else:
            self.blocked_ips.discard(text)
        self._blocked_nets = [ipaddress.ip_network(n, strict=False) for n in self.blocked_ips
                              if "/" in n]
        self.events.publish("ip_blocked" if on else "ip_unblocked", ip=text)

    def is_blocked(self, user: str, ip: str) -> bool:
        """Whether a request from this user / address must be refused (hot path)."""
        if not self.blocked_users and not self.blocked_ips:
            return False
        if user in self.blocked_users or ip in self.blocked_ips:
            return True
        if self._blocked_nets:
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                return False
            return any(addr in net for net in self._blocked_nets)
        return False

    def list_blocked(self) -> dict[str, list[str]]:
        """Blocked users and IPs."""
        return {"users": sorted(self.blocked_users), "ips": sorted(self.blocked_ips)}

    # -- API keys ---------------------------------------------------------------

    def create_key(self, user: str, name: str = "", trusted: bool = False) -> dict[str, Any]:
        """Create a key for `user`; the secret is in the answer and nowhere else."""
        secret = "omq-" + secrets.token_urlsafe(32)
        key_id = secrets.token_hex(6)
        record = {"key_id": key_id, "digest": key_digest(secret), "user": user, "name": name,
                  "created_at": time.time(), "revoked": False, "trusted": trusted}
        self.keys[key_id] = record
        self.keys_by_digest[record["digest"]] = record
        self.events.publish("key_created", key_id=key_id, user=user)
        return {**self._public(record), "secret": secret}

    def list_keys(self) -> list[dict[str, Any]]:
        """Keys without their digests."""
        return [self._public(r) for r in self.keys.values()]

    def revoke_key(self, key_id: str) -> None:
        """Revoke a key: requests with it get 401 from now on."""
        record = self.keys.get(key_id)
        if record is None:
            raise KeyError(f"no key {key_id}")
        record["revoked"] = True
        self.events.publish("key_revoked", key_id=key_id)

    @staticmethod
    def _public(record: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in record.items() if k != "digest"}

    # -- Snapshots -------------------------------------------------------------

    def stats_snapshot(self) -> dict[str, Any]:
        """Gateway-wide numbers for dashboards."""
        state = self.state
        stats = state.stats
        queue = state.dispatcher.queue
        return {
            "uptime_s": round(time.monotonic() - state.started_at, 1),
            "queued": len(queue),
            "in_flight": sum(b.in_flight for b in state.fleet.backends),
            "completed": stats.completed,
            "cancelled": stats.cancelled,
            "failovers": stats.failovers,
            "rejected": stats.rejected,
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
            "latency_p50_s": stats.latency.quantile(0.5),
            "latency_p99_s": stats.latency.quantile(0.99),
            "ttfb_p50_s": stats.ttfb.quantile(0.5),
            "queue_wait_p99_s": stats.queue_wait.quantile(0.99),
            "backends": self.list_backends(),
            "users": len(stats.users),
        }
