"""Browsers' cross-origin requests (CORS), answered as Ollama answers them (wire/cors.py)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import orjson
import pytest
from harness import SocketBackend, Stack, fast_sim_options, split_responses, start_stack

from ollamamq_fast.config import BackendOptions, ConfigError, Settings, apply_toml
from ollamamq_fast.wire.cors import OLLAMA_ORIGINS, Origins, parse_origins, without_cors

pytestmark = pytest.mark.pure

GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False, "options": {"num_predict": 2}}


# -- The rule, without sockets -----------------------------------------------------------


@pytest.mark.parametrize(("origin", "allowed"), [
    (b"http://localhost", True), (b"http://localhost:3000", True),
    (b"https://127.0.0.1:8443", True), (b"http://0.0.0.0:5173", True),
    (b"app://obsidian.md", True), (b"file://", True), (b"tauri://localhost", True),
    (b"vscode-webview://abc", True),
    (b"http://evil.example", False), (b"http://localhost.evil.example", False),
    (b"https://localhost:3000@evil", True),  # a prefix rule, as gin-contrib/cors has it
    (b"chrome-extension://abcdef", False), (b"null", False),
    (b"http://localhost:3000\x7f", False), (b"", False),
])
def test_ollamas_own_origins(origin: bytes, allowed: bool) -> None:
    assert Origins().allows(origin) is allowed


def test_configured_origins_add_to_ollamas_and_star_allows_all() -> None:
    origins = Origins(parse_origins(["https://chat.example.com, chrome-extension://*"]))
    assert origins.allows(b"https://chat.example.com")
    assert origins.allows(b"chrome-extension://abcdef")
    assert origins.allows(b"http://localhost:3000")
    assert not origins.allows(b"https://chat.example.com.evil")
    assert not origins.allows(b"http://chat.example.com")
    # Upper case in the configuration matches the browser's lower-case origin.
    assert Origins(["HTTPS://Chat.Example.com"]).allows(b"https://chat.example.com")
    everyone = Origins(parse_origins(['"*"']))  # quotes trimmed, as Ollama's Var does
    assert everyone.allows(b"https://anything.example")
    assert everyone.check(b"https://a.example", b"gw:1") == (
        b"Access-Control-Allow-Origin: *\r\nAccess-Control-Expose-Headers: X-Request-ID, "
        b"X-Gateway-Backend, X-Gateway-Queue-Ms, X-Cache, Retry-After\r\n")
    assert b"Vary" not in everyone.preflight(b"https://a.example")


def test_check_and_preflight_lines() -> None:
    origins = Origins()
    assert origins.check(b"http://gw:11435", b"gw:11435") == b""  # its own host: not CORS
    assert origins.check(b"https://gw:11435", b"gw:11435") == b""
    assert origins.check(b"http://evil.example", b"gw:11435") is None
    lines = origins.check(b"http://localhost:3000", b"gw:11435")
    assert lines is not None
    assert lines.startswith(b"Access-Control-Allow-Origin: http://localhost:3000\r\n"
                            b"Vary: Origin\r\n")
    pre = origins.preflight(b"http://localhost:3000")
    assert b"Access-Control-Allow-Methods: GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS\r\n" in pre
    assert b"X-Stainless-Os" in pre and b"X-User-Id" in pre and b"Authorization" in pre
    assert b"Access-Control-Max-Age: 43200\r\n" in pre
    assert pre.endswith(b"Access-Control-Allow-Origin: http://localhost:3000\r\n")


@pytest.mark.parametrize("bad", ["example.com", "http://a*b*", "http://exa mple.com"])
def test_bad_origins_are_configuration_errors(bad: str) -> None:
    with pytest.raises(ValueError, match="origins"):
        parse_origins([bad])
    with pytest.raises(ConfigError, match="origins"):
        apply_toml(Settings(), {"origins": [bad]})


def test_toml_origins_string_or_list() -> None:
    s = Settings()
    apply_toml(s, {"origins": "https://a.example,https://b.example"})
    assert s.origins == ["https://a.example", "https://b.example"]
    apply_toml(s, {"origins": ["https://c.example"]})
    assert s.origins == ["https://c.example"]
    assert len(OLLAMA_ORIGINS) == 17


def test_backend_cors_headers_are_dropped() -> None:
    headers = [(b"Content-Type", b"x"), (b"Access-Control-Allow-Origin", b""),
               (b"access-control-allow-credentials", b"true")]
    assert without_cors(headers) == [(b"Content-Type", b"x")]


# -- Through a gateway -------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    st = start_stack(sims=[fast_sim_options()], cache_mode="all",
                     origins=["https://chat.example.com"])
    yield st
    st.close()


def _post(stack: Stack, origin: str | None, path: str = "/api/generate",
          body: dict[str, object] | None = None, **headers: str) -> httpx.Response:
    h = {"X-User-ID": "browser"} | headers
    if origin is not None:
        h["Origin"] = origin
    return httpx.post(stack.url + path, json=body or GENERATE, headers=h, timeout=10)


def test_a_preflight_from_an_allowed_origin_gets_204(stack: Stack) -> None:
    r = httpx.options(stack.url + "/api/chat", headers={
        "Origin": "https://chat.example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-user-id"}, timeout=5)
    assert r.status_code == 204 and r.content == b""
    assert "content-length" not in r.headers
    assert r.headers["access-control-allow-origin"] == "https://chat.example.com"
    assert "X-User-Id" in r.headers["access-control-allow-headers"].split(",")
    assert "POST" in r.headers["access-control-allow-methods"].split(",")
    assert r.headers.get_list("vary") == [
        "Origin", "Access-Control-Request-Method", "Access-Control-Request-Headers"]
    # Any path, as Ollama's middleware answers before routing.
    assert httpx.options(stack.url + "/no/such/path", headers={
        "Origin": "http://localhost:5173"}, timeout=5).status_code == 204


def test_options_without_an_origin_is_still_not_allowed(stack: Stack) -> None:
    assert httpx.options(stack.url + "/api/chat", timeout=5).status_code == 405


def test_an_allowed_origin_reads_every_answer(stack: Stack) -> None:
    for path, body in (("/api/generate", GENERATE),
                       ("/v1/chat/completions", {"model": "llama3.2", "max_tokens": 2,
                        "messages": [{"role": "user", "content": "hi"}]}),
                       ("/api/generate", {"model": "no-such-model", "prompt": "x"})):
        r = _post(stack, "https://chat.example.com", path, body)
        assert r.headers.get_list("access-control-allow-origin") == ["https://chat.example.com"]
        assert "Origin" in r.headers.get_list("vary")
        assert "X-Request-ID" in r.headers["access-control-expose-headers"]
    assert r.status_code == 404  # the last: an error answer carries them too
    tags = httpx.get(stack.url + "/api/tags", headers={"Origin": "http://localhost:3000"},
                     timeout=5)
    assert tags.status_code == 200
    assert tags.headers["access-control-allow-origin"] == "http://localhost:3000"


def test_a_cached_answer_carries_the_origin_once(stack: Stack) -> None:
    body = dict(GENERATE, options={"num_predict": 2, "seed": 7, "temperature": 0})
    first = _post(stack, "https://chat.example.com", body=body)
    second = _post(stack, "https://chat.example.com", body=body)
    assert first.status_code == second.status_code == 200
    assert second.headers.get("x-cache") == "HIT"
    assert second.headers.get_list("access-control-allow-origin") == ["https://chat.example.com"]


def test_a_stream_from_an_allowed_origin(stack: Stack) -> None:
    with httpx.stream("POST", stack.url + "/api/chat", timeout=10, headers={
            "Origin": "http://127.0.0.1:8080"}, json={
            "model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.headers["access-control-allow-origin"] == "http://127.0.0.1:8080"
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] is True


def test_another_origin_is_refused_before_any_backend(stack: Stack) -> None:
    sim = stack.sims[0]
    before = sim.stats.requests
    r = _post(stack, "https://evil.example")
    assert r.status_code == 403
    assert "origin 'https://evil.example' is not allowed" in r.json()["error"]
    assert "access-control-allow-origin" not in r.headers
    openai = _post(stack, "https://evil.example", "/v1/chat/completions",
                   {"model": "llama3.2", "messages": []})
    assert openai.status_code == 403 and openai.json()["error"]["type"]
    pre = httpx.options(stack.url + "/api/chat", headers={"Origin": "https://evil.example"},
                        timeout=5)
    assert pre.status_code == 403
    assert sim.stats.requests == before


def test_the_requests_own_host_is_no_cross_origin_request(stack: Stack) -> None:
    host = stack.url.removeprefix("http://")
    r = _post(stack, f"http://{host}")
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_two_origins_are_refused(stack: Stack) -> None:
    body = orjson.dumps(GENERATE)
    with socket.create_connection(("127.0.0.1", stack.port), timeout=5) as sock:
        sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: gw\r\nOrigin: http://localhost\r\n"
                     b"Origin: https://evil.example\r\nContent-Length: %d\r\n\r\n%b"
                     % (len(body), body))
        data = b""
        while not split_responses(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status, _, answer = split_responses(data)[0]
    assert status == 400 and b"Origin sent more than once" in answer


class CorsBackend(SocketBackend):
    """An OpenAI server that adds CORS headers of its own (llama.cpp's server always does)."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        super().__init__()

    def answer(self, conn: socket.socket, head: bytes) -> None:
        self.heads.append(head)
        if self.path_of(head) == b"/v1/models":
            out = orjson.dumps({"object": "list", "data": [{"id": "tiny", "object": "model"}]})
        else:
            out = orjson.dumps({"id": "x", "object": "chat.completion", "model": "tiny",
                                "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                    "role": "assistant", "content": "hi"}}],
                                "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Access-Control-Allow-Origin: \r\nAccess-Control-Allow-Credentials: true\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%b" % (len(out), out))


def test_the_origin_is_not_forwarded_and_the_backends_cors_headers_are_replaced() -> None:
    backend = CorsBackend()
    st = start_stack(sims=[], extra_backends=[backend.url], health_interval=3600.0,
                     backend_options={backend.url: BackendOptions(kind="openai")})
    try:
        r = httpx.post(st.url + "/v1/chat/completions", timeout=10, headers={
            "Origin": "http://localhost:3000"}, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        assert r.headers.get_list("access-control-allow-origin") == ["http://localhost:3000"]
        assert "access-control-allow-credentials" not in r.headers
        chat = [h for h in backend.heads if h.startswith(b"POST")]
        assert chat and b"origin:" not in chat[-1].lower()
        # Without an Origin the backend's headers are relayed as they came.
        plain = httpx.post(st.url + "/v1/chat/completions", timeout=10, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        assert plain.headers.get_list("access-control-allow-origin") == [""]
    finally:
        st.close()
        backend.close()


def test_keys_a_preflight_needs_none_and_a_refusal_is_readable() -> None:
    st = start_stack(auth="keys")
    try:
        pre = httpx.options(st.url + "/v1/chat/completions", timeout=5, headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 204
        r = _post(st, "http://localhost:3000")
        assert r.status_code == 401
        assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    finally:
        st.close()


def test_a_reload_reads_the_files_origins_again(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "gw.toml"
    config.write_text('origins = ["https://a.example"]\n')
    st = start_stack(config_path=str(config), origins=["https://a.example"])
    try:
        def status(origin: str) -> int:
            return httpx.options(st.url + "/api/chat", headers={"Origin": origin},
                                 timeout=5).status_code

        assert (status("https://a.example"), status("https://b.example")) == (204, 403)
        config.write_text('origins = ["https://b.example"]\n')
        st.lt.call(st.gateway.reload)
        assert (status("https://a.example"), status("https://b.example")) == (403, 204)
        assert status("http://localhost:3000") == 204  # Ollama's own stay
    finally:
        st.close()
