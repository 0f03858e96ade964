"""Issue 14, critical and identity findings, probed from outside.

Gateway: `--auth keys --allow-all-routes --max-tokens 50`. Every request that
reaches the backend must have been authenticated first, whatever its path
and however that path is spelled; an encoded spelling of a known route gets
exactly that route's policy.

How the backend reads a path (PROTOCOL.md §1): Go's net/http percent-decodes
the path (`%63` -> `c`, `%2F` -> `/`) and takes the path of an absolute-form
target; gin then matches the decoded path exactly (case-sensitive, no
cleaning of `//` or `/./`). So `/api/%63hat`, `/api%2Fchat`, `/%61pi/chat`
and `http://h/api/chat` are `/api/chat` to Ollama.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from fakebackend import FakeBackend
from gatewayproc import GatewayProc
from readers import native_cap_holds, v1_cap_holds
from wire import exchange, request

CAP = 50
CHAT = json.dumps({"model": "fake", "stream": False,
                   "messages": [{"role": "user", "content": "hi"}],
                   "options": {"num_predict": 100000}}).encode()
V1 = json.dumps({"model": "fake", "max_tokens": 100000,
                 "messages": [{"role": "user", "content": "hi"}]}).encode()
BLOB = "sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def gw(backend: FakeBackend) -> Iterator[GatewayProc]:
    proc = GatewayProc([backend.url], "--auth", "keys", "--allow-all-routes",
                       "--max-tokens", str(CAP), admin=True)
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def alice(gw: GatewayProc) -> str:
    return gw.create_key("alice")


# Issue 14, critical: unknown and encoded paths reached the backend without a
# key. Absolute-form (RFC 9112 §3.2.2, read by Go as its path), fragments, %00
# and the asterisk form were found beyond the list.
# (method, target, body): none of these may reach the backend without a key.
UNKEYED = [
    pytest.param("POST", "/api/%63hat", CHAT, id="percent-encoded-letter"),
    pytest.param("POST", "/api%2Fchat", CHAT, id="encoded-slash"),
    pytest.param("POST", "/%61pi/chat", CHAT, id="encoded-first-segment"),
    pytest.param("POST", "/api/%2563hat", CHAT, id="double-encoded"),
    pytest.param("POST", "/api//chat", CHAT, id="double-slash"),
    pytest.param("POST", "/api/./chat", CHAT, id="dot-segment"),
    pytest.param("POST", "/api/x/../chat", CHAT, id="dot-dot-segment"),
    pytest.param("POST", "/API/chat", CHAT, id="upper-case"),
    pytest.param("POST", "/api/chat/", CHAT, id="trailing-slash"),
    pytest.param("POST", "/api/chat;x", CHAT, id="semicolon"),
    pytest.param("POST", "http://gw/api/chat", CHAT, id="absolute-form"),
    pytest.param("POST", "/v1/chat%2Fcompletions", V1, id="v1-encoded-slash"),
    pytest.param("POST", "/api/chat#x", CHAT, id="fragment"),
    pytest.param("POST", "/api/generate%00", CHAT, id="encoded-nul"),
    pytest.param("OPTIONS", "*", None, id="asterisk-form"),
    pytest.param("post", "/api/chat", CHAT, id="lower-case-method"),
    pytest.param("GET", "/api/chat", None, id="wrong-method"),
    pytest.param("POST", "/api/unknown", CHAT, id="unknown-path"),
    pytest.param("GET", "/api/unknown", None, id="unknown-get"),
    pytest.param("POST", f"/api/blobs/{BLOB}", b"\0" * 100, id="blob-upload"),
    pytest.param("HEAD", f"/api/blobs/{BLOB}", None, id="blob-head"),
    pytest.param("POST", "/api/chat", CHAT, id="plain-chat"),
    pytest.param("POST", "/v1/chat/completions", V1, id="plain-v1"),
]


@pytest.mark.parametrize(("method", "target", "body"), UNKEYED)
def test_no_request_reaches_the_backend_without_a_key(
        gw: GatewayProc, backend: FakeBackend, method: str, target: str,
        body: bytes | None) -> None:
    mark = backend.mark()
    headers = [("Content-Type", "application/json")] if body is not None else []
    responses, _, _ = exchange(gw.port, request(method, target, body, headers), expect=1,
                               head_requests=1 if method == "HEAD" else 0)
    assert len(responses) == 1, "one answer"
    # A forwarded request reaches the backend before its answer reaches the
    # client; 0.2 s more catches one forwarded after a local answer.
    leaked = backend.wait_for(1, mark, timeout=0.2)
    assert not leaked, f"{method} {target} reached the backend without a key: {leaked[0].raw[:200]!r}"
    # 307/308: gin's trailing-slash redirect, answered by the gateway itself.
    assert responses[0].status in (400, 401, 403, 404, 405, 307, 308)


@pytest.mark.parametrize(("target", "body", "holds"), [
    pytest.param("/api/%63hat", CHAT, native_cap_holds, id="percent-encoded-letter"),
    pytest.param("/api%2Fchat", CHAT, native_cap_holds, id="encoded-slash"),
    pytest.param("http://gw/api/chat", CHAT, native_cap_holds, id="absolute-form"),
    pytest.param("/v1/chat%2Fcompletions", V1, v1_cap_holds, id="v1-encoded-slash"),
    pytest.param("/api/chat", CHAT, native_cap_holds, id="plain"),
])
def test_encoded_route_gets_the_policy_of_the_route_it_names(
        gw: GatewayProc, backend: FakeBackend, alice: str, target: str, body: bytes,
        holds: object) -> None:
    """With a key, an encoded spelling is capped like the plain one (or refused)."""
    mark = backend.mark()
    headers = [("Content-Type", "application/json"), ("Authorization", f"Bearer {alice}")]
    responses, _, _ = exchange(gw.port, request("POST", target, body, headers), expect=1)
    assert len(responses) == 1
    for got in backend.wait_for(1, mark, timeout=0.2):
        if got.path in (b"/api/chat", b"/v1/chat/completions"):
            ok, why = holds(got.body, CAP)  # type: ignore[operator]
            assert ok, f"{target}: {why}"


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/api/pull", {"model": "fake", "stream": False}),
    ("DELETE", "/api/delete", {"model": "fake"}),
    ("POST", "/api/copy", {"source": "fake", "destination": "mine"}),
    ("POST", "/api/create", {"model": "mine", "from": "fake", "stream": False}),
    ("POST", "/api/push", {"model": "fake", "stream": False}),
])
def test_model_management_needs_more_than_an_ordinary_key(
        gw: GatewayProc, backend: FakeBackend, alice: str, method: str, path: str,
        body: dict[str, object]) -> None:
    mark = backend.mark()
    r = httpx.request(method, gw.url + path, json=body, timeout=10,
                      headers={"Authorization": f"Bearer {alice}"})
    assert not backend.wait_for(1, mark, timeout=0.3), f"{path} reached the backend"
    assert r.status_code == 403, r.text


def test_client_user_id_is_not_forwarded_under_keys(
        gw: GatewayProc, backend: FakeBackend, alice: str) -> None:
    mark = backend.mark()
    r = httpx.post(gw.url + "/api/chat", timeout=10,
                   headers={"Authorization": f"Bearer {alice}", "X-User-ID": "mallory"},
                   json={"model": "fake", "stream": False, "messages": []})
    assert r.status_code == 200
    got = backend.wait_for(1, mark)
    assert got
    forwarded = [v for n, v in got[-1].headers if n.lower() == b"x-user-id"]
    assert forwarded in ([], [b"alice"]), f"backend was told the user is {forwarded!r}"


def test_inference_with_a_key_is_served(gw: GatewayProc, alice: str) -> None:
    """The control case: a keyed request goes through, capped."""
    r = httpx.post(gw.url + "/api/chat", timeout=10, headers={"Authorization": f"Bearer {alice}"},
                   json={"model": "fake", "stream": False, "messages": []})
    assert r.status_code == 200 and r.json()["done"] is True


def _user(gw: GatewayProc, name: str) -> dict[str, object]:
    users = gw.admin("GET", "/api/users").json()["users"]
    return next((u for u in users if u["user"] == name), {})


def test_service_key_end_user_is_not_an_ordinary_user(gw: GatewayProc, alice: str) -> None:
    """A trusted service key naming `alice` must not spend alice's own account."""
    r = gw.admin("POST", "/api/keys", json={"user": "portal", "trusted": True})
    service = r.json()["secret"]
    body = {"model": "fake", "stream": False, "messages": []}
    assert httpx.post(gw.url + "/api/chat", json=body, timeout=10,
                      headers={"Authorization": f"Bearer {alice}"}).status_code == 200
    before = _user(gw, "alice").get("done")
    r = httpx.post(gw.url + "/api/chat", json=body, timeout=10,
                   headers={"Authorization": f"Bearer {service}", "X-User-ID": "alice"})
    assert r.status_code in (200, 400, 403)
    assert _user(gw, "alice").get("done") == before, "the service's end user counted as alice"
