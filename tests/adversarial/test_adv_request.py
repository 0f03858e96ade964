"""The request side: what the gateway decides on is what the backend reads.

A header or a body field the gateway and the backend could read differently
is a way around the gateway's policy: identity (the user the queue, limits
and quotas count), credentials (the cache key, the backend's own check), the
body's framing and the model the request is routed and accounted on.

- A request that names its identity, credentials or Host twice is refused
  (400 in the route's format) and reaches no backend: the gateway took the
  last `X-User-ID` and forwarded both, where Go's `Header.Get` (Ollama, and
  most servers) reads the first, so the backend saw another user than the
  one the gateway queued, limited and counted.
- Underscore spellings of those headers (`X_User_ID`), which CGI-style
  servers read as the dashed name, are never forwarded (nginx drops them too).
- A Transfer-Encoding other than `chunked` (`gzip, chunked`) is refused with
  501, as Go refuses it: the gateway de-chunked the body and forwarded it with
  a Content-Length, silently dropping the gzip coding.
- A Content-Length with trailing blanks (allowed around any field value) is
  read, not refused.
- `X-Forwarded-For` and `Cache-Control` sent on several lines are one list
  (RFC 9110 §5.3): `no-store` on the first of two lines kept the answer in the
  cache shared by all users.
- A JSON `null` for a string field leaves it as it was, as in Go:
  `{"model":"a","model":null}` is model `a` to Ollama.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fakebackend import FakeBackend
from gatewayproc import GatewayProc
from wire import exchange

CHAT = json.dumps({"model": "fake", "stream": False,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()
V1 = json.dumps({"model": "fake", "messages": [{"role": "user", "content": "hi"}]}).encode()


def _gateway(backend: FakeBackend, *args: str, admin: bool = False) -> Iterator[GatewayProc]:
    proc = GatewayProc([backend.url], *args, admin=admin)
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def gw(backend: FakeBackend) -> Iterator[GatewayProc]:
    yield from _gateway(backend, "--cache", "off")


@pytest.fixture(scope="module")
def kgw(backend: FakeBackend) -> Iterator[GatewayProc]:
    yield from _gateway(backend, "--cache", "off", "--auth", "keys", admin=True)


@pytest.fixture(scope="module")
def cgw(backend: FakeBackend) -> Iterator[GatewayProc]:
    yield from _gateway(backend, "--cache", "all")


@pytest.fixture(scope="module")
def alice(kgw: GatewayProc) -> str:
    return kgw.create_key("alice")


def _post(path: str, headers: bytes, body: bytes, host: bytes = b"Host: gw\r\n") -> bytes:
    return (b"POST " + path.encode() + b" HTTP/1.1\r\n" + host + headers
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def _refused(port: int, backend: FakeBackend, data: bytes, path: str, status: int = 400) -> str:
    """The request is answered `status` in the route's error format and reaches no backend."""
    mark = backend.mark()
    responses, _, _ = exchange(port, data, expect=1)
    assert [r.status for r in responses] == [status], [(r.status, r.body) for r in responses]
    leaked = backend.wait_for(1, mark, timeout=0.3)
    assert not leaked, f"it reached the backend: {leaked[0].raw[:300]!r}"
    error = responses[0].json()["error"]
    if path.startswith("/v1/"):
        assert isinstance(error, dict) and error["type"], error
        return str(error["message"])
    assert isinstance(error, str), error
    return error


REPEATED = {
    "x-user-id": b"X-User-ID: alice\r\nX-User-ID: bob\r\n",
    "x-user-id-same-value": b"X-User-ID: alice\r\nx-user-id: alice\r\n",
    "x-user-id-empty-first": b"X-User-ID: \r\nX-User-ID: bob\r\n",
    "authorization": b"Authorization: Bearer a\r\nAuthorization: Bearer b\r\n",
    "x-api-key": b"X-API-Key: a\r\nX-Api-Key: b\r\n",
}


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
@pytest.mark.parametrize("case", list(REPEATED))
def test_a_repeated_identity_header_is_refused(gw: GatewayProc, backend: FakeBackend,
                                               path: str, case: str) -> None:
    body = CHAT if path == "/api/chat" else V1
    message = _refused(gw.port, backend, _post(path, REPEATED[case], body), path)
    assert "more than once" in message, message


def test_two_hosts_are_refused(gw: GatewayProc, backend: FakeBackend) -> None:
    """RFC 9112 §3.2: a request with two Host lines gets 400 (Go's server says so too)."""
    data = _post("/api/chat", b"", CHAT, host=b"Host: a\r\nHost: b\r\n")
    assert "Host" in _refused(gw.port, backend, data, "/api/chat")


@pytest.mark.parametrize("case", ["authorization", "x-api-key"])
def test_a_repeated_key_is_refused_under_keys(kgw: GatewayProc, backend: FakeBackend,
                                              alice: str, case: str) -> None:
    """One valid key and another one: which user is it? Neither: 400."""
    name = b"Authorization: Bearer " if case == "authorization" else b"X-API-Key: "
    headers = name + alice.encode() + b"\r\n" + name + b"not-a-key\r\n"
    _refused(kgw.port, backend, _post("/api/chat", headers, CHAT), "/api/chat")
    headers = name + b"not-a-key\r\n" + name + alice.encode() + b"\r\n"
    _refused(kgw.port, backend, _post("/api/chat", headers, CHAT), "/api/chat")


def test_a_single_key_is_served_under_keys(kgw: GatewayProc, backend: FakeBackend,
                                           alice: str) -> None:
    """The control case: one key, served, and the backend is told the key's user."""
    mark = backend.mark()
    headers = b"Authorization: Bearer " + alice.encode() + b"\r\nX-User-ID: mallory\r\n"
    responses, _, _ = exchange(kgw.port, _post("/api/chat", headers, CHAT), expect=1)
    assert [r.status for r in responses] == [200]
    got = backend.wait_for(1, mark)
    assert [v for n, v in got[-1].headers if n.lower() == b"x-user-id"] == [b"alice"]


@pytest.mark.parametrize("gateway", ["gw", "kgw"])
def test_underscore_spellings_of_identity_headers_are_not_forwarded(
        request: pytest.FixtureRequest, backend: FakeBackend, gateway: str) -> None:
    """CGI-style servers (WSGI, PHP) read `X_User_ID` as `X-User-ID`: it never goes on."""
    proc: GatewayProc = request.getfixturevalue(gateway)
    headers = (b"X_User_ID: root\r\nX_API_Key: k\r\nX_Forwarded_For: 10.0.0.1\r\n"
               b"X-Fake-Harmless: 1\r\n")
    if gateway == "kgw":
        headers += b"Authorization: Bearer " + request.getfixturevalue("alice").encode() + b"\r\n"
    mark = backend.mark()
    responses, _, _ = exchange(proc.port, _post("/api/chat", headers, CHAT), expect=1)
    assert [r.status for r in responses] == [200]
    got = backend.wait_for(1, mark)[-1]
    names = [n.lower() for n, _ in got.headers]
    assert b"x-fake-harmless" in names
    assert not [n for n in names if b"_" in n], got.headers


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"identity, chunked"])
def test_a_transfer_coding_other_than_chunked_is_refused(gw: GatewayProc, backend: FakeBackend,
                                                         coding: bytes) -> None:
    """The body was de-chunked and sent on with a Content-Length: its gzip coding was lost."""
    data = (b"POST /api/chat HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: " + coding
            + b"\r\n\r\n%x\r\n" % len(CHAT) + CHAT + b"\r\n0\r\n\r\n")
    _refused(gw.port, backend, data, "/api/chat", 501)


def test_transfer_encoding_on_two_lines_is_refused(gw: GatewayProc, backend: FakeBackend) -> None:
    data = (b"POST /api/chat HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: identity\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(CHAT) + CHAT + b"\r\n0\r\n\r\n")
    _refused(gw.port, backend, data, "/api/chat", 501)


@pytest.mark.parametrize("coding", [b"chunked", b"Chunked", b"CHUNKED "])
def test_a_chunked_body_is_served(gw: GatewayProc, backend: FakeBackend, coding: bytes) -> None:
    """The control case: `chunked` alone, in any case, with blanks around it."""
    mark = backend.mark()
    data = (b"POST /api/chat HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: " + coding
            + b"\r\n\r\n%x\r\n" % len(CHAT) + CHAT + b"\r\n0\r\n\r\n")
    responses, _, _ = exchange(gw.port, data, expect=1)
    assert [r.status for r in responses] == [200]
    assert backend.wait_for(1, mark)[-1].body == CHAT


@pytest.mark.parametrize("length", [b"%d ", b"%d\t", b"00%d"])
def test_a_content_length_with_blanks_or_zeros_is_read(gw: GatewayProc, backend: FakeBackend,
                                                      length: bytes) -> None:
    mark = backend.mark()
    data = (b"POST /api/chat HTTP/1.1\r\nHost: gw\r\nContent-Length: " + length % len(CHAT)
            + b"\r\n\r\n" + CHAT)
    responses, _, _ = exchange(gw.port, data, expect=1)
    assert [r.status for r in responses] == [200], [(r.status, r.body) for r in responses]
    assert backend.wait_for(1, mark)[-1].body == CHAT


def test_forwarded_for_on_several_lines_is_one_list(gw: GatewayProc,
                                                    backend: FakeBackend) -> None:
    mark = backend.mark()
    headers = b"X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2, 10.0.0.3\r\n"
    responses, _, _ = exchange(gw.port, _post("/api/chat", headers, CHAT), expect=1)
    assert [r.status for r in responses] == [200]
    got = backend.wait_for(1, mark)[-1]
    assert [v for n, v in got.headers if n.lower() == b"x-forwarded-for"] == [
        b"10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1"]



def test_no_store_on_any_cache_control_line_holds(cgw: GatewayProc) -> None:
    body = json.dumps({"model": "fake", "stream": False,
                       "messages": [{"role": "user", "content": "private"}]}).encode()
    headers = b"Cache-Control: no-store\r\nCache-Control: max-age=60\r\n"
    first, _, _ = exchange(cgw.port, _post("/api/chat", headers, body), expect=1)
    assert [r.status for r in first] == [200]
    again, _, _ = exchange(cgw.port, _post("/api/chat", b"X-User-ID: other\r\n", body), expect=1)
    assert [r.status for r in again] == [200]
    assert again[0].header("x-cache") == "MISS", "a no-store answer was kept and replayed"


@pytest.mark.parametrize("body", [
    pytest.param(b'{"model":"fake","model":null,"stream":false,"messages":[]}', id="flat"),
    pytest.param(b'{"model":"fake","stream":false,"messages":[{"role":"user","content":"hi"}],'
                 b'"Model":null}', id="nested"),
    pytest.param(b'{"\\u006dodel":"fake","model":null,"stream":false}', id="escaped"),
])
def test_a_null_model_after_a_model_leaves_it_as_go_does(gw: GatewayProc, backend: FakeBackend,
                                                         body: bytes) -> None:
    """Go ignores `null` for a string field: Ollama serves model `fake`, so does the gateway."""
    mark = backend.mark()
    responses, _, _ = exchange(gw.port, _post("/api/chat", b"", body), expect=1)
    assert [r.status for r in responses] == [200], [(r.status, r.body) for r in responses]
    assert backend.wait_for(1, mark)[-1].body == body

