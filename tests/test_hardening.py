"""Regression tests for the adversarial pass's critical and high findings (issue 14).

- Authentication does not depend on routing: with `--auth keys
  --allow-all-routes` an unknown path, or an encoded spelling of a known one,
  reaches no backend without a key.
- Paths are normalized as the backend reads them, routed on that, and the
  canonical path is what is forwarded.
- A body with duplicate JSON keys is never cached, and a client's own
  credentials (auth off) are part of the cache key.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from harness import Stack, start_stack
from test_traps import Conn, FakeBackend, wait_for

from ollamamq_fast.policy.cache import CANONICAL_MAX_BODY, cache_key
from ollamamq_fast.wire.paths import PathError, normalize, request_path
from ollamamq_fast.wire.routes import CANONICAL

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": False}


@pytest.mark.parametrize(("raw", "canonical"), [
    (b"/api/chat", b"/api/chat"),
    (b"/api/%63hat", b"/api/chat"),
    (b"/api%2Fchat", b"/api/chat"),
    (b"/api//chat", b"/api/chat"),
    (b"//api/chat", b"/api/chat"),
    (b"/api/./chat", b"/api/chat"),
    (b"/api/x/../chat", b"/api/chat"),
    (b"/%2e%2e/api/chat", b"/api/chat"),
    (b"/../../api/chat", b"/api/chat"),
    (b"/api/tags/", b"/api/tags/"),
    (b"/api/chat/.", b"/api/chat/"),
    (b"/api/chat%3Fx=1", b"/api/chat%3Fx=1"),  # a decoded "?" must not start a query
    (b"/api/caf%C3%A9", b"/api/caf%C3%A9"),
    (b"/", b"/"),
])
def test_paths_normalize_as_the_backend_reads_them(raw: bytes, canonical: bytes) -> None:
    assert normalize(raw) == canonical
    assert normalize(canonical) == canonical  # idempotent


def test_canonical_paths_are_returned_without_copying() -> None:
    # A route's path comes back as the route table's own object (its hash kept,
    # found by identity in later look-ups); another canonical path as itself.
    route_path = bytes(bytearray(b"/api/chat"))  # a new object, as the parser gives
    assert normalize(route_path) is CANONICAL[b"/api/chat"]
    assert route_path is not CANONICAL[b"/api/chat"]
    other = bytes(bytearray(b"/api/unknown/route"))
    assert normalize(other) is other


@pytest.mark.parametrize("bad", [b"/api/%zz", b"/api/chat%", b"/api/%0achat", b"/api/%00"])
def test_undecodable_paths_are_refused(bad: bytes) -> None:
    with pytest.raises(PathError):
        normalize(bad)


def test_request_targets_reduce_to_their_path() -> None:
    assert request_path(b"/api/chat?x=1") == (b"/api/chat", b"?x=1")
    assert request_path(b"/api/chat") == (b"/api/chat", b"")
    assert request_path(b"/api/chat?") == (b"/api/chat", b"?")
    assert request_path(b"http://evil.example/api/chat?x") == (b"/api/chat", b"?x")
    assert request_path(b"http://evil.example") == (b"/", b"")
    for target in (b"*", b"evil.example:443", b"api/chat"):
        with pytest.raises(PathError):
            request_path(target)


@pytest.fixture(scope="module")
def keyed() -> Iterator[tuple[Stack, FakeBackend, str]]:
    backend = FakeBackend()
    st = start_stack(sims=[], extra_backends=[backend.url], auth="keys",
                     allow_all_routes=True, health_interval=3600.0)
    secret = st.lt.call(st.state.operator.create_key, "alice")["secret"]
    yield st, backend, secret
    st.close()
    backend.close()


def _raw(st: Stack, target: str, body: bytes, headers: str = "") -> tuple[int, bytes]:
    with Conn(st.port) as c:
        c.send((f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"{headers}Content-Length: {len(body)}\r\n\r\n").encode() + body)
        r = c.response()
    return r.status, r.body


def test_an_endless_body_after_an_early_answer_is_not_read_for_ever(
        keyed: tuple[Stack, FakeBackend, str]) -> None:
    """A refused request's body is read (and dropped) to keep the connection only up
    to 256 KiB, as Go's server does: past that the answer comes at once and the
    connection closes, so an unauthenticated client cannot keep it reading."""
    st, backend, _ = keyed
    before = len(backend.requests)
    piece = b"%x\r\n%s\r\n" % (16384, b"x" * 16384)
    with Conn(st.port) as c:
        c.send(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(8):  # 128 KiB: still read to keep the connection, no answer yet
            c.send(piece)
        c.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            c.sock.recv(1)
        c.sock.settimeout(10.0)
        for _ in range(9):  # past 256 KiB: the 401 comes without the body's end
            c.send(piece)
        r = c.response()
        assert r.status == 401, r.body
        assert r.headers.get("connection") == "close", r.headers
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:  # then the gateway closes the connection
            try:
                c.send(piece)
                if c.sock.recv(1 << 16) == b"":
                    break
            except OSError:
                break
        else:
            pytest.fail("the gateway kept reading the refused body")
    assert len(backend.requests) == before


@pytest.mark.parametrize("target", [
    "/not/a/route", "/api/%63hat", "/api//chat", "/api/./chat", "/API/chat",
    "http://evil.example/api/chat", "/api/blobs/sha256:abc", "/api/pull",
])
def test_no_key_no_backend_whatever_the_path(
        keyed: tuple[Stack, FakeBackend, str], target: str) -> None:
    st, backend, _ = keyed
    before = len(backend.requests)
    status, body = _raw(st, target, b'{"model":"fake","messages":[{"role":"user"}]}')
    assert status == 401, (target, body)
    assert b"API key" in body
    assert len(backend.requests) == before


def test_encoded_spellings_get_the_policy_of_the_route_they_name(
        keyed: tuple[Stack, FakeBackend, str]) -> None:
    st, backend, secret = keyed
    auth = f"Authorization: Bearer {secret}\r\nX-User-ID: mallory\r\n"
    for target in ("/api/%63hat", "/api//chat", "/x/../api/chat", "http://evil.example/api/chat"):
        before = len(backend.requests)
        stats = st.state.stats.user("alice")
        done = stats.done
        status, _ = _raw(st, target, b'{"model":"fake","messages":[{"role":"user"}]}', auth)
        assert status == 200, target
        assert wait_for(lambda before=before: len(backend.requests) > before, 2.0)
        head = backend.requests[-1].split(b"\r\n\r\n")[0]
        # Forwarded as the canonical path, so the backend reads what was routed...
        assert head.startswith(b"POST /api/chat HTTP/1.1\r\n"), head
        # ...queued as alice's inference request, with her identity, not the client's.
        assert stats.done == done + 1
        lowered = head.lower()
        assert b"x-user-id: alice" in lowered and b"mallory" not in lowered
        assert b"authorization" not in lowered


def test_a_bad_escape_is_a_400_in_the_route_shape(keyed: tuple[Stack, FakeBackend, str]) -> None:
    st, backend, secret = keyed
    before = len(backend.requests)
    status, body = _raw(st, "/v1/chat/%zzompletions", b"{}", f"Authorization: Bearer {secret}\r\n")
    assert status == 400 and b"percent escape" in body and b'"message"' in body
    assert len(backend.requests) == before


def test_unknown_paths_are_forwarded_with_a_key(keyed: tuple[Stack, FakeBackend, str]) -> None:
    st, backend, secret = keyed
    r = httpx.get(st.url + "/custom/thing", headers={"Authorization": f"Bearer {secret}"})
    assert r.status_code == 200
    assert backend.requests[-1].startswith(b"GET /custom/thing HTTP/1.1\r\n")
    assert httpx.get(st.url + "/api/tags").status_code == 200  # local routes need no key


def test_duplicate_keys_are_never_cached() -> None:
    url = b"/api/chat"
    base = b'{"model":"m","messages":[{"role":"user","content":"x"}],'
    plain = base + b'"options":{"temperature":0}}'
    assert cache_key(url, url, "m", 0, plain) is not None
    for body in (
        base + b'"options":{"temperature":0},"options":{"seed":1}}',  # Go merges the two
        base + b'"options":{"temperature":0},"OPTIONS":{"num_ctx":9}}',  # case variants
        base + b'"options":{"temperature":0,"temperature":1}}',  # nested
        b'{"model":"m","messages":[{"role":"user","content":"x","Content":"y"}]}',  # deep
        b'{"model":"m","messages":[{"role":"user","content":"x"}],"Model":"n"}',
    ):
        assert cache_key(url, url, "m", 0, body) is None, body
    big = b'{"model":"m","prompt":"' + b"a" * CANONICAL_MAX_BODY + b'"'
    gen = b"/api/generate"
    assert cache_key(gen, gen, "m", 0, big + b"}") is not None
    assert cache_key(gen, gen, "m", 0, big + b',"prompt":"b"}') is None
    # NaN is not JSON: the body is keyed by its bytes, never equal to a null body's key.
    nan = b'{"model":"m","prompt":"p","options":{"seed":NaN}}'
    null = b'{"model":"m","prompt":"p","options":{"seed":null}}'
    assert cache_key(gen, gen, "m", 0, nan) != cache_key(gen, gen, "m", 0, null)
    # Nor is a number beyond a float's range one (json.loads reads it as infinity,
    # which orjson writes as null): Go refuses it, an exact backend may not.
    for huge in (b"1e999", b"-1e999", b"1" + b"0" * 400 + b".0"):
        body = b'{"model":"m","prompt":"p","seed":1,"temperature":' + huge + b"}"
        null = b'{"model":"m","prompt":"p","seed":1,"temperature":null}'
        assert cache_key(gen, gen, "m", 0, body) != cache_key(gen, gen, "m", 0, null), huge


def test_a_lone_surrogate_escape_is_not_cached_and_raises_nothing() -> None:
    # Valid JSON syntax, no character: Go reads U+FFFD, json.loads a lone surrogate
    # that no UTF-8 writer takes (the canonical key raised: the request got a 500).
    gen = b"/api/generate"
    for body in (b'{"model":"m","prompt":"\\ud800"}', b'{"model":"m","prompt":"p","format":"\\udfff"}',
                 b'{"model":"m","prompt":"p","options":{"stop":["\\ud800x"]}}'):
        assert cache_key(gen, gen, "m", 0, body) is None, body
    assert cache_key(gen, gen, "m\ud800", 0, b'{"model":"m","prompt":"p"}') is not None


def test_credentials_not_owned_by_the_gateway_are_part_of_the_key() -> None:
    gen = b"/api/generate"
    body = b'{"model":"m","prompt":"p"}'
    anonymous = cache_key(gen, gen, "m", 0, body)
    assert anonymous is not None
    assert cache_key(gen, gen, "m", 0, body, b"Bearer a\n") not in (None, anonymous)
    assert cache_key(gen, gen, "m", 0, body, b"Bearer a\n") == cache_key(
        gen, gen, "m", 0, body, b"Bearer a\n")
    assert cache_key(gen, gen, "m", 0, body, b"Bearer a\n") != cache_key(
        gen, gen, "m", 0, body, b"Bearer b\n")


@pytest.fixture(scope="module")
def caching() -> Iterator[tuple[Stack, FakeBackend]]:
    backend = FakeBackend()
    st = start_stack(sims=[], extra_backends=[backend.url], cache_mode="all",
                     health_interval=3600.0)
    yield st, backend
    st.close()
    backend.close()


def test_an_attackers_duplicate_key_body_poisons_nobody(
        caching: tuple[Stack, FakeBackend]) -> None:
    st, backend = caching
    attack = (b'{"model":"fake","messages":[{"role":"user","content":"q"}],"stream":false,'
              b'"options":{"num_ctx":1},"options":{"temperature":0}}')
    victim = (b'{"model":"fake","messages":[{"role":"user","content":"q"}],"stream":false,'
              b'"options":{"temperature":0}}')
    for _ in range(2):
        r = httpx.post(st.url + "/api/chat", content=attack, headers={"X-User-ID": "mallory"})
        assert r.status_code == 200 and "x-cache" not in r.headers
    before = len(backend.requests)
    r = httpx.post(st.url + "/api/chat", content=victim, headers={"X-User-ID": "victim"})
    assert r.status_code == 200 and r.headers["x-cache"] == "MISS"
    assert len(backend.requests) == before + 1


def test_a_cached_answer_is_not_served_to_other_credentials(
        caching: tuple[Stack, FakeBackend]) -> None:
    st, backend = caching
    body = dict(CHAT, messages=[{"role": "user", "content": "secret question"}])
    ok = {"Authorization": "Bearer right"}
    assert httpx.post(st.url + "/api/chat", json=body, headers=ok).headers["x-cache"] == "MISS"
    assert httpx.post(st.url + "/api/chat", json=body, headers=ok).headers["x-cache"] == "HIT"
    for other in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "right"}):
        before = len(backend.requests)
        r = httpx.post(st.url + "/api/chat", json=body, headers=other)
        assert r.headers["x-cache"] == "MISS", other
        assert len(backend.requests) == before + 1


# -- medium findings fixed with the data-plane owners (flow.py, the reaper) ---------------


@pytest.fixture(scope="module")
def sim_stack() -> Iterator[Stack]:
    st = start_stack(timeout=1.0)
    yield st
    st.close()


def test_a_malformed_request_behind_a_waiting_one_answers_both(sim_stack: Stack) -> None:
    """The pending answer is sent, then the 400, then the connection closes."""
    st = sim_stack
    chat = (b'{"model":"llama3.2","messages":[{"role":"user","content":"x"}],"stream":false}')
    good = (b"POST /api/chat HTTP/1.1\r\nHost: x\r\nX-Sim-Tokens: 32\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(chat), chat))
    with Conn(st.port) as c:
        c.send(good + b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n" + b"BOGUS\x01 / HTTP/1.1\r\n\r\n")
        first = c.response()
        assert first.status == 200 and first.json()["done"] is True
        second = c.response()
        assert second.status == 200 and "models" in second.json()
        third = c.response()
        assert third.status == 400 and b"malformed" in third.body
        with pytest.raises(EOFError):
            c.response()


def test_a_slow_upload_is_not_a_silent_backend(sim_stack: Stack) -> None:
    """--timeout is backend silence; it does not run while the client still sends."""
    import hashlib
    import time

    st = sim_stack  # timeout=1.0
    blob = b"x" * 4000
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    with Conn(st.port) as c:
        c.send(b"POST /api/blobs/%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
               % (digest.encode(), len(blob)))
        deadline = time.monotonic() + 2.5  # well past the 1 s timeout
        sent = 0
        while sent < len(blob):
            piece = blob[sent : sent + 500]
            c.send(piece)
            sent += len(piece)
            time.sleep(max(0.0, min(0.3, deadline - time.monotonic())))
        r = c.response()
    assert r.status in (200, 201), (r.status, r.body)


# -- caps and usage decided on what every kind of backend reads (issue 14, medium) --------


class _Pairs(list):  # type: ignore[type-arg]
    """An object's members in order (duplicates kept)."""


def _members(body: bytes) -> list[tuple[str, object]]:
    import json

    top = json.loads(body, object_pairs_hook=_Pairs)
    return [(k, dict(v) if isinstance(v, _Pairs) else v) for k, v in top]


def _go_read(body: bytes, key: str) -> object:
    """What Go's encoding/json binds to a top-level field: any case, the last one wins."""
    value = None
    for k, v in _members(body):
        if k.lower() == key:
            value = v
    return value


def _exact_read(body: bytes, key: str) -> object:
    """What an exact-name server (vLLM, llama.cpp) reads: the exact key, the last one wins."""
    value = None
    for k, v in _members(body):
        if k == key:
            value = v
    return value


@pytest.mark.parametrize("body", [
    b'{"model":"m","Max_Tokens":100000}',
    b'{"model":"m","MAX_TOKENS":100000,"max_tokens":5}',
    b'{"model":"m","max_tokens":5,"MAX_TOKENS":100000}',
    b'{"model":"m","max_completion_tokens":100000}',
    b'{"model":"m","n_predict":100000,"max_tokens":5}',
    b'{"model":"m","N_Predict":-1}',
    b'{"model":"m","max\\u005ftokens":100000}',
    b'{"model":"m","max_tokens":0}',
    b'{"model":"m","Max_Tokens":0}',
    b'{"model":"m","max_completion_tokens":0}',
])
def test_every_spelling_of_a_limit_is_capped(body: bytes) -> None:
    from ollamamq_fast.policy.caps import CAP_RULES, cap_openai, splice
    from ollamamq_fast.wire.sniff import sniff_spans

    rule = CAP_RULES[b"/v1/chat/completions"]
    sn = sniff_spans(body, ("model",), (*rule.keys, rule.insert))
    out = splice(body, cap_openai(body, sn, rule, 64, False))
    for key in ("max_tokens", "max_completion_tokens", "n_predict"):
        for read in (_go_read, _exact_read):
            value = read(out, key)
            # Not 0: Ollama stops at num_predict (its max_tokens) only above 0.
            assert value is None or 1 <= value <= 64, (key, read.__name__, out)  # type: ignore[operator]
    assert _exact_read(out, "max_tokens") is not None and _go_read(out, "max_tokens") is not None


@pytest.mark.parametrize("limit", [b"0", b"-0", b"0.5", b"1e-400", b"-1", b"100000"])
@pytest.mark.parametrize("reject", [False, True])
def test_a_native_limit_ollama_reads_as_none_is_capped(limit: bytes, reject: bool) -> None:
    """num_predict 0 (or a float Go truncates to 0) is no limit to Ollama's runner, like -1."""
    from ollamamq_fast.policy.caps import CapError, cap_native, parse_object, splice
    from ollamamq_fast.wire.sniff import sniff_spans

    body = b'{"model":"m","options":{"num_predict":' + limit + b'}}'
    sn = sniff_spans(body, ("model",), ("options",))
    start, end = sn.spans["options"]
    options = parse_object(body[start:end])
    if reject:
        with pytest.raises(CapError):
            cap_native(body, sn, options, 64, True)
        return
    out = splice(body, cap_native(body, sn, options, 64, False))
    assert _go_read(out, "options") == {"num_predict": 64}, out


def test_a_lower_limit_in_another_spelling_is_kept() -> None:
    from ollamamq_fast.policy.caps import CAP_RULES, cap_openai, splice
    from ollamamq_fast.wire.sniff import sniff_spans

    rule = CAP_RULES[b"/v1/chat/completions"]
    body = b'{"model":"m","Max_Tokens":5}'
    sn = sniff_spans(body, ("model",), (*rule.keys, rule.insert))
    out = splice(body, cap_openai(body, sn, rule, 64, False))
    assert _go_read(out, "max_tokens") == 5 and _exact_read(out, "max_tokens") == 5


@pytest.mark.parametrize("body", [
    b'{"model":"m","stream":true,"Stream_Options":{"include_usage":false}}',
    (b'{"model":"m","stream":true,"stream_options":{"include_usage":true},'
     b'"STREAM_OPTIONS":{"include_usage":false}}'),
    b'{"model":"m","STREAM":true}',
    b'{"model":"m","stream":true,"stream_options":null}',
])
def test_no_spelling_turns_the_usage_off(body: bytes) -> None:
    from ollamamq_fast.policy.caps import splice
    from ollamamq_fast.policy.streamusage import INJECT_KEYS, usage_edits
    from ollamamq_fast.wire.sniff import sniff_spans

    sn = sniff_spans(body, ("model",), INJECT_KEYS)
    out = splice(body, usage_edits(body, sn))
    for read in (_go_read, _exact_read):
        options = read(out, "stream_options")
        assert isinstance(options, dict) and options.get("include_usage") is True, (read, out)


def test_user_ids_are_bounded_and_printable(sim_stack: Stack) -> None:
    st = sim_stack
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}], "stream": False}
    for bad in (b"u" * 200, "a\u200bb".encode(), b"\xff\xfe"):
        r = httpx.post(st.url + "/api/chat", json=chat, headers={"X-User-ID": bad})
        assert r.status_code == 400 and "X-User-ID" in r.json()["error"]
    r = httpx.post(st.url + "/v1/chat/completions", json=chat, headers={"X-User-ID": "x" * 129})
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = httpx.post(st.url + "/api/chat", json=chat, headers={"X-User-ID": "ok-user"})
    assert r.status_code == 200 and "ok-user" in st.state.stats.users


def test_http_version_with_and_without_a_connection_header() -> None:
    # The version decides the answer's framing and whether the connection stays:
    # HTTP/1.0 never gets a chunked body (a stream then ends with the close) and
    # keeps the connection only when it asks; HTTP/1.1 keeps it unless told not to.
    import socket

    from harness import fast_sim_options, read_response

    st = start_stack(sims=[fast_sim_options(tokens=5)])

    def post(sock: socket.socket, version: bytes, connection: bytes, body: bytes) -> None:
        sock.sendall(b"POST /api/generate %b\r\nHost: x\r\n%bContent-Length: %d\r\n\r\n%b"
                     % (version, connection, len(body), body))

    whole = b'{"model":"llama3.2","prompt":"q","stream":false}'
    stream = b'{"model":"llama3.2","prompt":"q","stream":true}'
    try:
        for version, connection, kept in (
            (b"HTTP/1.0", b"", False),
            (b"HTTP/1.0", b"Connection: keep-alive\r\n", True),
            (b"HTTP/1.1", b"", True),
            (b"HTTP/1.1", b"Connection: keep-alive\r\n", True),
            (b"HTTP/1.1", b"Connection: close\r\n", False),
        ):
            case = (version, connection)
            with socket.create_connection(("127.0.0.1", st.port), timeout=5) as sock:
                post(sock, version, connection, whole)
                head = read_response(sock, 5.0).split(b"\r\n\r\n", 1)[0].lower()
                assert head.startswith(b"http/1.1 200"), (case, head)
                assert (b"connection: close" in head) is (not kept), (case, head)
                if version == b"HTTP/1.0" and kept:
                    assert b"connection: keep-alive" in head, (case, head)
                if kept:  # the same connection answers a streamed request next
                    post(sock, version, connection, stream)
                    answer = read_response(sock, 5.0, until_close=version == b"HTTP/1.0")
                    head = answer.split(b"\r\n\r\n", 1)[0].lower()
                    assert head.startswith(b"http/1.1 200"), (case, answer[:200])
                    chunked = b"transfer-encoding: chunked" in head
                    assert chunked is (version == b"HTTP/1.1"), (case, head)
                    assert answer.count(b'"done":true') == 1, (case, answer[-300:])
    finally:
        st.close()
