"""Issue 14, medium: caps and usage accounting are decided on what the backend reads.

Gateway: auth off, `--max-tokens 50`, cache off. For each body the fake
backend records what arrived, and `readers` checks it the way a backend
reads it: Go's case-insensitive, merging decoder for Ollama (`/api/*` and
Ollama's `/v1/*`), and an exact, last-wins reader for OpenAI-compatible
servers (which also honour `max_completion_tokens` and llama.cpp's
`n_predict`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
from fakebackend import FakeBackend
from gatewayproc import GatewayProc
from readers import (
    native_cap_holds,
    v1_cap_holds_exact,
    v1_cap_holds_go,
    v1_usage_holds,
    v1_usage_holds_exact,
)

CAP = 50


@pytest.fixture(scope="module")
def gw(backend: FakeBackend) -> Iterator[GatewayProc]:
    """In front of an Ollama backend."""
    proc = GatewayProc([backend.url], "--max-tokens", str(CAP), "--cache", "off")
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def oa_gw(oa_backend: FakeBackend) -> Iterator[GatewayProc]:
    """In front of an OpenAI-compatible backend."""
    proc = GatewayProc([oa_backend.url], "--max-tokens", str(CAP), "--cache", "off")
    yield proc
    proc.close()


MSG = b'"messages":[{"role":"user","content":"hi"}]'
V1_BODIES = {
    "plain": b'"max_tokens":100000',
    "absent": b'"stream":false',
    "max_completion_tokens": b'"max_completion_tokens":100000',
    "Max_Tokens-alone": b'"Max_Tokens":100000',
    "Max_Tokens-after": b'"max_tokens":10,"Max_Tokens":100000',
    "MAX_TOKENS-after": b'"max_tokens":10,"MAX_TOKENS":100000',
    "kelvin-sign-after": b'"max_tokens":10,"max_to\\u212aens":100000',
    "exact-duplicate": b'"max_tokens":10,"max_tokens":100000',
    "exact-duplicate-first-big": b'"max_tokens":100000,"max_tokens":10',
    "case-variant-null": b'"max_tokens":10,"Max_Tokens":null',
    "null": b'"max_tokens":null',
    "n_predict": b'"n_predict":100000',
    "n_predict-small-max-tokens": b'"max_tokens":10,"n_predict":100000',
    # 0 is no limit to Ollama (its runner stops at num_predict only above 0).
    "zero": b'"max_tokens":0',
    "minus-zero": b'"max_tokens":-0',
    "zero-in-another-spelling": b'"Max_Tokens":0',
    "zero-after-small": b'"max_tokens":10,"Max_Tokens":0',
    "max_completion_tokens-zero": b'"max_completion_tokens":0',
}
V1_GO_XFAIL: dict[str, str] = {}
V1_EXACT_XFAIL: dict[str, str] = {}


def _v1(xfail: dict[str, str]) -> list[object]:
    return [pytest.param(b'{"model":"fake",' + MSG + b',' + extra + b'}', id=name,
                         marks=[pytest.mark.xfail(strict=True, reason=xfail[name])]
                         if name in xfail else [])
            for name, extra in V1_BODIES.items()]


V1_GO = _v1(V1_GO_XFAIL)
V1_EXACT = _v1(V1_EXACT_XFAIL)
NATIVE = [
    pytest.param(b'{"model":"fake","stream":false,' + MSG + b',"options":{"num_predict":100000}}',
                 id="plain"),
    pytest.param(b'{"model":"fake","stream":false,' + MSG + b'}', id="absent"),
    pytest.param(b'{"model":"fake","stream":false,' + MSG + b',"options":{"num_predict":-1}}',
                 id="unlimited"),
    pytest.param(b'{"model":"fake","stream":false,' + MSG + b',"Options":{"num_predict":100000}}',
                 id="Options-alone"),
    pytest.param(b'{"model":"fake","stream":false,' + MSG + b',"options":{"temperature":0},'
                 b'"Options":{"num_predict":100000}}', id="Options-after"),
    pytest.param(b'{"model":"fake","stream":false,' + MSG + b',"options":{"num_predict":10},'
                 b'"OPTIONS":{"num_predict":100000}}', id="OPTIONS-after"),
    pytest.param(b'{"model":"fake","stream":false,' + MSG + b',"options":{"num_predict":100000},'
                 b'"options":{"temperature":0}}', id="options-twice-merged"),
    pytest.param(b'{"model":"fake","stream":false,' + MSG + b',"options":{"temperature":0},'
                 b'"options":{"num_predict":100000}}', id="options-twice-last-big"),
    pytest.param(b'{"model":"fake","stream":false,' + MSG + b',"options":{"num_predict":10},'
                 b'"\\u006fptions":{"num_predict":100000}}', id="escaped-key"),
    pytest.param(b'{"model":"fake","stream":false,' + MSG + b',"options":null,'
                 b'"Options":{"num_predict":100000}}', id="null-then-Options"),
    # 0, and what Go truncates to 0, is no limit to Ollama's runner.
    *[pytest.param(b'{"model":"fake","stream":false,' + MSG + b',"options":{"num_predict":'
                   + zero + b'}}', id=f"zero-{zero.decode()}")
      for zero in (b"0", b"-0", b"0.5", b"-0.5", b"1e-400", b"0.0")],
]


def _send(gw: GatewayProc, backend: FakeBackend, path: str, body: bytes) -> list[bytes]:
    mark = backend.mark()
    r = httpx.post(gw.url + path, content=body, timeout=10,
                   headers={"Content-Type": "application/json", "X-User-ID": "capped"})
    assert r.status_code in (200, 400), r.text
    return [got.body for got in backend.wait_for(1 if r.status_code == 200 else 0, mark,
                                                  timeout=1.0)]


def _check(bodies: list[bytes], holds: Callable[[bytes, int], tuple[bool, str]]) -> None:
    for body in bodies:
        ok, why = holds(body, CAP)
        assert ok, f"{why}; the backend got {body!r}"


@pytest.mark.parametrize("body", V1_GO)
def test_v1_cap_holds_as_ollama_reads_it(gw: GatewayProc, backend: FakeBackend,
                                         body: bytes) -> None:
    _check(_send(gw, backend, "/v1/chat/completions", body), v1_cap_holds_go)


@pytest.mark.parametrize("body", V1_EXACT)
def test_v1_cap_holds_as_an_openai_server_reads_it(oa_gw: GatewayProc, oa_backend: FakeBackend,
                                                    body: bytes) -> None:
    _check(_send(oa_gw, oa_backend, "/v1/chat/completions", body), v1_cap_holds_exact)


@pytest.mark.parametrize("body", NATIVE)
@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
def test_native_cap_holds_as_go_reads_it(gw: GatewayProc, backend: FakeBackend, path: str,
                                         body: bytes) -> None:
    _check(_send(gw, backend, path, body), native_cap_holds)


STREAM_BODIES = {
    "plain": b'"stream":true',
    "usage-false": b'"stream":true,"stream_options":{"include_usage":false}',
    "Stream_Options": b'"stream":true,"Stream_Options":{"include_usage":false}',
    "Include_Usage": b'"stream":true,"stream_options":{"Include_Usage":false}',
    "Stream-after": b'"stream":false,"Stream":true',
    "options-null-after": b'"stream":true,"stream_options":{"include_usage":true},'
                          b'"Stream_Options":null',
    "stream-true-then-null": b'"stream":true,"stream":null',
    "STREAM-alone": b'"STREAM":true',
    # A spelling only Go reads holds no object: Go refuses the body, vLLM reads the
    # exact one (the gateway gave up on the whole request's usage).
    "Stream_Options-array": b'"stream":true,"stream_options":{"include_usage":false},'
                            b'"Stream_Options":[]',
    "Stream_Options-string-first": b'"stream":true,"Stream_Options":"x",'
                                   b'"stream_options":{"include_usage":false}',
    # Every JSON decoder reads `"\u0073tream"` as `stream`: the gateway looked for the
    # key's letters, so it never read such a stream's value and asked for no usage.
    "escaped-stream": b'"\\u0073tream":true',
    "escaped-mid-stream": b'"st\\u0072eam":true',
    "escaped-STREAM": b'"\\u0053TREAM":true',
}
STREAMS_EXACT_XFAIL: dict[str, str] = {}


def _streams(xfail: dict[str, str]) -> list[object]:
    return [pytest.param(b'{"model":"fake",' + extra + b',' + MSG + b'}', id=name,
                         marks=[pytest.mark.xfail(strict=True, reason=xfail[name])]
                         if name in xfail else [])
            for name, extra in STREAM_BODIES.items()]


STREAMS_GO = _streams({})
STREAMS_EXACT = _streams(STREAMS_EXACT_XFAIL)


@pytest.mark.parametrize("body", STREAMS_GO)
def test_v1_stream_always_asks_for_usage_as_go_reads_it(gw: GatewayProc, backend: FakeBackend,
                                                         body: bytes) -> None:
    for got in _send(gw, backend, "/v1/chat/completions", body):
        ok, why = v1_usage_holds(got)
        assert ok, f"{why}; the backend got {got!r}"


@pytest.mark.parametrize("body", STREAMS_EXACT)
def test_v1_stream_always_asks_for_usage_as_an_openai_server_reads_it(
        oa_gw: GatewayProc, oa_backend: FakeBackend, body: bytes) -> None:
    for got in _send(oa_gw, oa_backend, "/v1/chat/completions", body):
        ok, why = v1_usage_holds_exact(got)
        assert ok, f"{why}; the backend got {got!r}"
