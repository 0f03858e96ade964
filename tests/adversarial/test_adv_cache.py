"""Issue 14, high: the response cache never serves one user's answer to another
for a body the backend reads differently; a body with duplicate keys at any
depth (exact, escaped or case-variant under Go's folding) is never cached.
Medium: with auth off, credentials the gateway does not own keep a cached
answer from being served to someone without them.

Gateway: auth off, cache `deterministic` (the default), so every body here
sets temperature 0.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import httpx
import pytest
from fakebackend import FakeBackend
from gatewayproc import GatewayProc
from readers import has_duplicate_keys

_nonce = itertools.count()


@pytest.fixture(scope="module")
def gw(backend: FakeBackend) -> Iterator[GatewayProc]:
    proc = GatewayProc([backend.url])
    yield proc
    proc.close()


def post(gw: GatewayProc, path: str, body: bytes, user: str,
         headers: dict[str, str] | None = None) -> httpx.Response:
    h = {"Content-Type": "application/json", "X-User-ID": user}
    h.update(headers or {})
    return httpx.post(gw.url + path, content=body, headers=h, timeout=10)



# (attacker body, victim body): the gateway's old cache key kept only the last
# duplicate, so both had one key, while Ollama reads them differently.
PAIRS = [
    pytest.param(
        b'{"model":"fake","prompt":"%s","stream":false,'
        b'"options":{"num_predict":1},"options":{"temperature":0}}',
        b'{"model":"fake","prompt":"%s","stream":false,"options":{"temperature":0}}',
        id="options-twice-merged"),
    pytest.param(
        b'{"model":"fake","prompt":"%s","stream":false,'
        b'"options":{"num_predict":1},"\\u006fptions":{"temperature":0}}',
        b'{"model":"fake","prompt":"%s","stream":false,"options":{"temperature":0}}',
        id="escaped-key-merged"),
    pytest.param(
        b'{"model":"fake","stream":false,"options":{"temperature":0},'
        b'"messages":[{"role":"user","content":"%s","images":["ZXZpbA=="]}],'
        b'"messages":[{"role":"user","content":"%s"}]}',
        b'{"model":"fake","stream":false,"options":{"temperature":0},'
        b'"messages":[{"role":"user","content":"%s"}]}',
        id="messages-twice-element-reused"),
    pytest.param(
        b'{"model":"fake","prompt":"%s","stream":false,"options":{"temperature":0},'
        b'"Options":{"num_predict":1}}',
        b'{"model":"fake","prompt":"%s","stream":false,"options":{"temperature":0}}',
        id="case-variant-options"),
]


@pytest.mark.parametrize(("attack", "victim"), PAIRS)
def test_duplicate_keys_never_poison_another_users_answer(
        gw: GatewayProc, backend: FakeBackend, attack: bytes, victim: bytes) -> None:
    nonce = b"q%d" % next(_nonce)
    attack = attack.replace(b"%s", nonce)
    victim = victim.replace(b"%s", nonce)
    path = "/api/chat" if b'"messages"' in attack else "/api/generate"
    first = post(gw, path, attack, "attacker")
    assert first.status_code == 200
    mark = backend.mark()
    second = post(gw, path, victim, "victim")
    assert second.status_code == 200
    assert second.json()["n"] != first.json()["n"], (
        f"victim got the attacker's answer (X-Cache: {second.headers.get('x-cache')})")
    assert backend.wait_for(1, mark), "the victim's request reached no backend"


DUPLICATES = [
    pytest.param(b'{"model":"fake","prompt":"%s","prompt":"%s","stream":false,'
                 b'"options":{"temperature":0}}', id="top-level-exact"),
    pytest.param(b'{"model":"fake","prompt":"%s","stream":false,'
                 b'"options":{"temperature":0,"temperature":0}}', id="nested-exact"),
    pytest.param(b'{"model":"fake","prompt":"%s","stream":false,'
                 b'"options":{"temperature":0},"\\u006fptions":{"seed":1}}', id="escaped"),
    pytest.param(b'{"model":"fake","stream":false,"options":{"temperature":0},'
                 b'"messages":[{"role":"user","content":"%s","content":"%s"}]}',
                 id="in-array-element"),
    pytest.param(b'{"model":"fake","prompt":"%s","stream":false,"options":{"temperature":0},'
                 b'"OPTIONS":{"temperature":0}}', id="case-variant"),
    pytest.param(b'{"model":"fake","prompt":"%s","stream":false,"options":{"temperature":0},'
                 b'"\\u212aeep_alive":"1m","keep_alive":"2m"}', id="kelvin-sign-fold"),
]


@pytest.mark.parametrize("body", DUPLICATES)
def test_a_body_with_duplicate_keys_is_never_served_from_the_cache(
        gw: GatewayProc, backend: FakeBackend, body: bytes) -> None:
    body = body.replace(b"%s", b"d%d" % next(_nonce))
    assert has_duplicate_keys(body)
    path = "/api/chat" if b'"messages"' in body else "/api/generate"
    first = post(gw, path, body, "one")
    assert first.status_code == 200
    mark = backend.mark()
    second = post(gw, path, body, "two")
    assert second.status_code == 200
    assert second.headers.get("x-cache") != "HIT"
    assert backend.wait_for(1, mark), "answered without the backend"


def test_a_clean_deterministic_body_is_cached(gw: GatewayProc, backend: FakeBackend) -> None:
    """The control case: the cache does work for an ordinary body."""
    body = b'{"model":"fake","prompt":"c%d","stream":false,"options":{"temperature":0}}' % (
        next(_nonce))
    first = post(gw, "/api/generate", body, "one")
    mark = backend.mark()
    second = post(gw, "/api/generate", body, "two")
    assert first.status_code == second.status_code == 200
    assert second.headers.get("x-cache") == "HIT" and second.json()["n"] == first.json()["n"]
    assert not backend.wait_for(1, mark, timeout=0.2)


@pytest.mark.parametrize("creds", [None, "Bearer wrong"], ids=["no-authorization", "wrong-key"])
def test_cached_answer_not_served_without_the_backends_credentials(
        gw: GatewayProc, backend: FakeBackend, creds: str | None) -> None:
    body = b'{"model":"fake","prompt":"a%d","stream":false,"options":{"temperature":0}}' % (
        next(_nonce))
    ok = post(gw, "/api/generate", body, "owner",
              {"Authorization": "Bearer good", "X-Fake": "auth=good"})
    assert ok.status_code == 200
    other = {"X-Fake": "auth=good"}
    if creds is not None:
        other["Authorization"] = creds
    r = post(gw, "/api/generate", body, "stranger", other)
    assert r.status_code == 401, f"{r.status_code} X-Cache: {r.headers.get('x-cache')}"
