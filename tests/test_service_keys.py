"""A trusted service key's end users never take over ordinary users (issue 14).

A service key may name its end users in X-User-ID; they used to be plain user
names, so a service naming `alice` spent alice's quota, took a VIP's rank and
escaped a block. Its end users are now `SERVICE:NAME`, and no key's own user
may contain the colon.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from harness import Stack, start_stack
from test_traps import FakeBackend, wait_for

from ollamamq_fast.policy.identity import Identity, check_key_user
from ollamamq_fast.state.records import KeyRecord, key_digest

CHAT = {"model": "fake", "messages": [], "stream": False}


def test_a_service_names_its_own_users() -> None:
    svc = KeyRecord("k1", key_digest("s1"), "portal", "", 0.0, trusted=True)
    plain = KeyRecord("k2", key_digest("s2"), "alice", "", 0.0)
    keys = {r.digest: r for r in (svc, plain)}
    ident = Identity("keys", [], keys.get)
    assert ident.user_for_key(b"Bearer s1", b"", "alice") == "portal:alice"
    assert ident.user_for_key(b"Bearer s1", b"", "") == "portal"
    assert ident.user_for_key(b"Bearer s2", b"", "bob") == "alice"  # ordinary: header ignored
    assert check_key_user(" ops ") == "ops"
    for bad in ("", "  ", "portal:alice", ":x"):
        with pytest.raises(ValueError):
            check_key_user(bad)


@pytest.fixture(scope="module")
def keyed() -> Iterator[tuple[Stack, FakeBackend, str, str]]:
    backend = FakeBackend()
    st = start_stack(sims=[], extra_backends=[backend.url], auth="keys", health_interval=3600.0)
    op = st.state.operator
    alice = st.lt.call(op.create_key, "alice")["secret"]
    service = st.lt.call(op.create_key, "portal", "", True)["secret"]
    yield st, backend, alice, service
    st.close()
    backend.close()


def _chat(st: Stack, secret: str, user: str = "") -> httpx.Response:
    headers = {"Authorization": f"Bearer {secret}"}
    if user:
        headers["X-User-ID"] = user
    return httpx.post(st.url + "/api/chat", json=CHAT, headers=headers, timeout=10)


def test_a_service_cannot_spend_an_ordinary_users_account(
        keyed: tuple[Stack, FakeBackend, str, str]) -> None:
    st, backend, alice, service = keyed
    assert _chat(st, alice).status_code == 200
    done = st.state.stats.user("alice").done
    before = len(backend.requests)
    assert _chat(st, service, "alice").status_code == 200
    assert st.state.stats.user("alice").done == done
    assert st.state.stats.user("portal:alice").done == 1
    assert wait_for(lambda: len(backend.requests) > before, 2.0)
    head = backend.requests[-1].split(b"\r\n\r\n")[0].lower()
    assert b"x-user-id: portal:alice\r\n" in head + b"\r\n"


def test_a_service_cannot_dodge_a_block_or_take_a_vip_rank(
        keyed: tuple[Stack, FakeBackend, str, str]) -> None:
    st, _, _, service = keyed
    op = st.state.operator
    st.lt.call(op.block_user, "portal:mallory", True)
    try:
        assert _chat(st, service, "mallory").status_code == 403
    finally:
        st.lt.call(op.block_user, "portal:mallory", False)
    st.lt.call(op.set_user, "boss", True)
    assert _chat(st, service, "boss").status_code == 200
    queue = st.state.dispatcher.queue
    assert queue.is_vip("boss") and not queue.is_vip("portal:boss")


def test_no_key_may_be_made_for_a_service_users_name(
        keyed: tuple[Stack, FakeBackend, str, str]) -> None:
    st = keyed[0]
    with pytest.raises(ValueError):
        st.lt.call(st.state.operator.create_key, "portal:alice")
