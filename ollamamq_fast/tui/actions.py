"""What each dashboard key asks of the admin API, as data.

The widgets say *what* the operator wants (toggle VIP for this user); this
module turns it into the HTTP calls, from the row data the table showed, so
the mapping is testable without a terminal and shared by every panel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote


class NoTarget(Exception):
    """The key makes no sense for the selected row (told to the operator)."""


@dataclass(frozen=True)
class AdminCall:
    """One admin API request and how to describe it in the log."""

    method: str
    path: str
    label: str
    body: dict[str, Any] | None = None
    query: dict[str, str] | None = None


def _seg(text: str) -> str:
    """A path segment: everything percent-encoded, '/' included."""
    return quote(text, safe="")


def _user_path(user: dict[str, Any]) -> str:
    return f"/api/users/{_seg(str(user['user']))}"


def toggle_vip(user: dict[str, Any]) -> AdminCall:
    """p: VIP on when off, off when on."""
    on = not user.get("vip", False)
    return AdminCall("PATCH", _user_path(user), f"{user['user']}: VIP {'on' if on else 'off'}",
                     {"vip": on})


def toggle_boost(user: dict[str, Any]) -> AdminCall:
    """b: Boost on when off, off when on."""
    on = not user.get("boost", False)
    return AdminCall("PATCH", _user_path(user),
                     f"{user['user']}: Boost {'on' if on else 'off'}", {"boost": on})


def set_weight(user: dict[str, Any], weight: int) -> AdminCall:
    """w: turns per round."""
    if weight < 1:
        raise NoTarget("the weight must be at least 1")
    return AdminCall("PATCH", _user_path(user), f"{user['user']}: weight {weight}",
                     {"weight": weight})


def block_user(user: dict[str, Any]) -> AdminCall:
    """x: refuse the user's requests with 403."""
    return AdminCall("POST", _user_path(user) + "/block", f"blocked user {user['user']}")


def block_ip(user: dict[str, Any]) -> AdminCall:
    """X: refuse every request from the user's last address."""
    ip = str(user.get("last_ip") or "")
    if not ip:
        raise NoTarget(f"{user['user']} has no known address yet")
    return AdminCall("POST", "/api/blocked/ips", f"blocked address {ip} ({user['user']})",
                     {"ip": ip})


def unblock_for_user(user: dict[str, Any], blocked_ips: set[str]) -> list[AdminCall]:
    """u on a user: undo x and X, whichever apply (both when both do)."""
    calls: list[AdminCall] = []
    if user.get("blocked"):
        calls.append(AdminCall("POST", _user_path(user) + "/unblock",
                               f"unblocked user {user['user']}"))
    ip = str(user.get("last_ip") or "")
    if ip and ip in blocked_ips:
        calls.append(unblock_item("ip", ip))
    if not calls:
        raise NoTarget(f"{user['user']} is not blocked, nor is their address")
    return calls


def unblock_item(kind: str, value: str) -> AdminCall:
    """u on a Blocked row: a user or an address / range."""
    if kind == "user":
        return AdminCall("POST", f"/api/users/{_seg(value)}/unblock", f"unblocked user {value}")
    return AdminCall("DELETE", "/api/blocked/ips", f"unblocked address {value}",
                     query={"ip": value})


def toggle_drain(backend: dict[str, Any]) -> AdminCall:
    """d: drain a backend taking requests; undrain a draining one."""
    url = str(backend["url"])
    if backend.get("draining"):
        return AdminCall("POST", "/api/backends/undrain", f"undrained {url}", {"url": url})
    return AdminCall("POST", "/api/backends/drain", f"draining {url}", {"url": url})
