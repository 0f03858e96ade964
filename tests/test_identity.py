"""Identity on the data plane: API keys, trusted service keys, trusted proxies."""

from __future__ import annotations

import ipaddress

import httpx
import ollama
import openai
import pytest
from harness import fast_sim_options, start_stack

from ollamamq_fast.policy.identity import AuthError, Identity, parse_networks

BODY = {"model": "llama3.2", "prompt": "q", "stream": False}


def test_keys_required_and_decide_the_user() -> None:
    st = start_stack(sims=[fast_sim_options()], auth="keys")
    try:
        op = st.state.operator
        alice = st.lt.call(op.create_key, "alice", "laptop")["secret"]
        service = st.lt.call(op.create_key, "svc", "portal", True)["secret"]
        r = httpx.post(st.url + "/api/generate", json=BODY)
        assert r.status_code == 401 and "API key" in r.json()["error"]
        r = httpx.post(st.url + "/v1/chat/completions",
                       json={"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.post(st.url + "/api/generate", json=BODY,
                          headers={"Authorization": "Bearer nope"}).status_code == 401
        # A key decides the user; a client-sent X-User-ID is ignored...
        r = httpx.post(st.url + "/api/generate", json=BODY,
                       headers={"Authorization": f"Bearer {alice}", "X-User-ID": "mallory"})
        assert r.status_code == 200
        assert "alice" in st.state.stats.users and "mallory" not in st.state.stats.users
        # ...unless the key is a trusted service key naming its end user (as SERVICE:NAME).
        r = httpx.post(st.url + "/api/generate", json=BODY,
                       headers={"X-API-Key": service, "X-User-ID": "end-user-7"})
        assert r.status_code == 200 and "svc:end-user-7" in st.state.stats.users
        assert "end-user-7" not in st.state.stats.users  # never a bare (ordinary) user
        # Official clients pass keys the usual way.
        oc = ollama.Client(host=st.url, headers={"Authorization": f"Bearer {alice}"})
        assert oc.generate(model="llama3.2", prompt="hi").done
        ai = openai.OpenAI(base_url=st.url + "/v1", api_key=alice, max_retries=0)
        assert ai.chat.completions.create(model="llama3.2",
                                          messages=[{"role": "user", "content": "x"}]).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=st.url + "/v1", api_key="wrong", max_retries=0
                          ).chat.completions.create(model="llama3.2",
                                                    messages=[{"role": "user", "content": "x"}])
        # Revoked keys stop working at once; local routes need no key.
        key_id = st.lt.call(op.list_keys)[0]["key_id"]
        st.lt.call(op.revoke_key, key_id)
        r = httpx.post(st.url + "/api/generate", json=BODY,
                       headers={"Authorization": f"Bearer {alice}"})
        assert r.status_code == 401 and "revoked" in r.json()["error"]
        assert httpx.get(st.url + "/api/tags").status_code == 200
    finally:
        st.close()


def test_gateway_key_is_not_forwarded_but_other_headers_are() -> None:
    from test_traps import FakeBackend

    backend = FakeBackend()
    st = start_stack(sims=[], extra_backends=[backend.url], auth="keys")
    try:
        secret = st.lt.call(st.state.operator.create_key, "bob")["secret"]
        r = httpx.post(st.url + "/api/generate",
                       json={"model": "fake", "prompt": "q", "stream": False},
                       headers={"Authorization": f"Bearer {secret}", "X-Custom": "kept"})
        assert r.status_code == 200
        head = backend.requests[-1].split(b"\r\n\r\n")[0].lower()
        assert b"authorization:" not in head and secret.lower().encode() not in head
        assert b"x-custom: kept" in head
    finally:
        st.close()
        backend.close()


def test_trusted_proxies_decide_client_address() -> None:
    ident = Identity("off", parse_networks("10.0.0.0/8,127.0.0.1"), lambda d: None)
    assert ident.client_ip("127.0.0.1", b"203.0.113.9, 10.1.2.3") == "203.0.113.9"
    assert ident.client_ip("198.51.100.1", b"203.0.113.9") == "198.51.100.1"
    none = Identity("off", [], lambda d: None)
    assert none.client_ip("127.0.0.1", b"203.0.113.9") == "127.0.0.1"
    # A hop with the port some proxies add, or another spelling of an address,
    # is the address itself: an IP block or the per-address user holds whatever
    # source port the client picks.
    for hop, address in ((b"203.0.113.9:51234", "203.0.113.9"),
                         (b"[2001:db8:0:0::1]:443", "2001:db8::1"),
                         (b"[2001:DB8::1]", "2001:db8::1"), (b"2001:0db8::0001", "2001:db8::1"),
                         (b"unknown", "unknown")):
        assert ident.client_ip("127.0.0.1", hop + b", 10.1.2.3") == address, hop
    assert ident.client_ip("127.0.0.1", b"203.0.113.9, 10.1.2.3:8080") == "203.0.113.9"
    with pytest.raises(AuthError):
        Identity("keys", [], lambda d: None).user_for_key(b"", b"", "")
    assert isinstance(parse_networks("::1")[0], ipaddress.IPv6Network)


def test_ip_block_uses_forwarded_address_from_trusted_proxy() -> None:
    st = start_stack(sims=[fast_sim_options()], trusted_proxies=parse_networks("127.0.0.1"))
    try:
        st.lt.call(st.state.operator.block_ip, "203.0.113.9", True)
        blocked = httpx.post(st.url + "/api/generate", json=BODY,
                             headers={"X-Forwarded-For": "203.0.113.9"})
        assert blocked.status_code == 403
        ok = httpx.post(st.url + "/api/generate", json=BODY,
                        headers={"X-Forwarded-For": "203.0.113.10"})
        assert ok.status_code == 200
    finally:
        st.close()
