"""Policy decided on what every kind of backend reads: the readings Go and exact
servers disagree on that the gateway must not pick one of silently.

- The model of a /v1 request: Go (Ollama's /v1) reads `"Model"`, `"MODEL"` or
  an escaped spelling and skips a `null`; vLLM (pydantic) and llama.cpp
  (nlohmann) read only `"model"` exactly, the last one, a `null` as none (their
  default model). A body naming one model to each was routed and billed as
  Go's while an OpenAI-compatible server ran the other one: such a body is
  refused with 400, in OpenAI's error format, and reaches no backend.
- The default cache keeps answers to deterministic requests (temperature 0,
  a seed) only when every server reads them so: exactly spelled keys.
- A cached answer is replayed only in the pool whose backends gave it.
- A stream vLLM's lax pydantic reading runs (`"stream": 1`, `"true"`) asks
  for its usage, as a `true` one does.
- Under a token cap, the sequences `n` / `best_of` ask for share it (vLLM
  makes each up to max_tokens).
- A compressed body cannot be read, so a stream cannot be asked for its
  usage: refused while a quota applies (as while a cap does); an
  `identity` coding, even listed twice, is no compression.
- Nesting deeper than Python's parser goes (Go reads 10,000 levels): a body
  the gateway parses to translate it is the client's 400, not a gateway 500.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from fakebackend import MODEL, FakeBackend
from gatewayproc import GatewayProc
from readers import (
    exact_field,
    first_value,
    go_field,
    v1_model_holds,
    v1_usage_holds_exact,
)


@pytest.fixture(scope="module")
def oa_gw(oa_backend: FakeBackend) -> Iterator[GatewayProc]:
    """In front of an OpenAI-compatible backend (an exact-name reader)."""
    proc = GatewayProc([oa_backend.url], "--cache", "off")
    yield proc
    proc.close()


MSG = b'"messages":[{"role":"user","content":"hi"}]'
M = MODEL.encode()
AMBIGUOUS = {
    "Model-after": b'"model":"other","Model":"' + M + b'"',
    "MODEL-after": b'"model":"other","MODEL":"' + M + b'"',
    "escaped-variant-after": b'"model":"other","MOD\\u0045L":"' + M + b'"',
    "Model-alone": b'"Model":"' + M + b'"',
    "null-after": b'"model":"' + M + b'","model":null',
}
AGREED = {
    "plain": b'"model":"' + M + b'"',
    "exact-duplicate": b'"model":"other","model":"' + M + b'"',
    "escaped-exact": b'"mod\\u0065l":"' + M + b'"',
    "variant-before": b'"Model":"other","model":"' + M + b'"',
    "same-value-twice": b'"model":"' + M + b'","Model":"' + M + b'"',
    "model-as-a-value": b'"model":"' + M + b'","x":{"role":"model"}',
}


def _post(gw: GatewayProc, body: bytes) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", content=body, timeout=10,
                      headers={"Content-Type": "application/json", "X-User-ID": "reader"})


@pytest.mark.parametrize("members", [pytest.param(v, id=k) for k, v in AMBIGUOUS.items()])
def test_a_v1_model_servers_read_differently_is_refused(
        oa_gw: GatewayProc, oa_backend: FakeBackend, members: bytes) -> None:
    body = b"{" + members + b"," + MSG + b"}"
    mark = oa_backend.mark()
    r = _post(oa_gw, body)
    got = [req.body for req in oa_backend.wait_for(1, mark, timeout=0.3)]
    for sent in got:
        ok, why = v1_model_holds(sent, MODEL)
        assert ok, f"{why}; the backend got {sent!r}"
    assert r.status_code == 400, r.text
    assert "ambiguous" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert not got


@pytest.mark.parametrize("members", [pytest.param(v, id=k) for k, v in AGREED.items()])
def test_a_v1_model_every_server_reads_alike_is_served(
        oa_gw: GatewayProc, oa_backend: FakeBackend, members: bytes) -> None:
    body = b"{" + members + b"," + MSG + b"}"
    mark = oa_backend.mark()
    r = _post(oa_gw, body)
    assert r.status_code == 200, r.text
    (sent,) = [req.body for req in oa_backend.wait_for(1, mark)]
    ok, why = v1_model_holds(sent, MODEL)
    assert ok, f"{why}; the backend got {sent!r}"


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


DEEP = [
    # Past the parser's limit: json.loads raised RecursionError.
    pytest.param("/api/generate", b'{"model":"fake","stream":false,"prompt":"hi","x":'
                 + _nested(5000) + b"}", id="generate-unknown-field"),
    pytest.param("/api/chat", b'{"model":"fake","stream":false,"messages":[{"role":"user",'
                 b'"content":"hi","x":' + _nested(5000) + b"}]}", id="chat-in-a-message"),
    # Within it, in a field the translation walks (a tool call's arguments).
    pytest.param("/api/chat", b'{"model":"fake","stream":false,"messages":[{"role":"assistant",'
                 b'"content":"","tool_calls":[{"function":{"name":"f","arguments":{"a":'
                 + _nested(900) + b"}}}]}]}", id="chat-tool-arguments"),
]


@pytest.mark.parametrize(("path", "body"), DEEP)
def test_a_deeply_nested_body_to_translate_is_a_400(
        oa_gw: GatewayProc, oa_backend: FakeBackend, path: str, body: bytes) -> None:
    """A native body for an OpenAI-compatible backend is parsed to be translated: one
    nested deeper than Python's parser and the translation's walks go (Go reads up to
    10,000 levels) was a RecursionError, answered 500 (which the clients retry) with a
    traceback in the log for each. It is the client's 400, in Ollama's format."""
    mark = oa_backend.mark()
    r = httpx.post(oa_gw.url + path, content=body, timeout=10,
                   headers={"Content-Type": "application/json", "X-User-ID": "deep"})
    assert r.status_code == 400, r.text
    assert "nested too deeply" in r.json()["error"]
    assert not oa_backend.wait_for(1, mark, timeout=0.2)
    assert "Traceback" not in oa_gw.stderr()


@pytest.fixture(scope="module")
def quota_gw(oa_backend: FakeBackend) -> Iterator[GatewayProc]:
    """A daily token quota, no cap, in front of an OpenAI-compatible backend."""
    proc = GatewayProc([oa_backend.url], "--quota-day", "1000000", "--cache", "off")
    yield proc
    proc.close()


STREAM = b'{"model":"fake","stream":true,' + MSG + b"}"


@pytest.mark.parametrize("coding", ["zstd"])
def test_a_compressed_stream_under_a_quota_is_refused(
        quota_gw: GatewayProc, oa_backend: FakeBackend, coding: str) -> None:
    """The gateway cannot read a compressed body, so it could not ask the stream for
    its usage: the quota counted an estimate of the answer alone, no prompt token. A
    server that ignores Content-Encoding (vLLM, Ollama's /v1) reads a plain body sent
    with the header as it is: a free prompt of any size. Refused while a quota applies,
    as it is while a cap does."""
    mark = oa_backend.mark()
    r = httpx.post(quota_gw.url + "/v1/chat/completions", content=STREAM, timeout=10,
                   headers={"Content-Type": "application/json", "X-User-ID": "quota",
                            "Content-Encoding": coding})
    for req in oa_backend.wait_for(1, mark, timeout=0.3):
        ok, why = v1_usage_holds_exact(req.body)
        assert ok, f"{why}; the backend got {req.body!r}"
    assert r.status_code == 400, r.text
    assert "uncompressed" in r.json()["error"]["message"]


@pytest.mark.parametrize("headers", [
    {"Content-Encoding": "identity"},
    {"Content-Encoding": "identity, identity"},
    {"Content-Encoding": "IDENTITY"},
    # Named in Connection, the coding is hop-by-hop: not forwarded, so the backend
    # reads the body as it is, and so does the gateway.
    {"Content-Encoding": "gzip", "Connection": "keep-alive, Content-Encoding"},
    # Codings no backend decodes (Ollama's /v1 decodes a first `zstd` alone; vLLM
    # and llama.cpp none): the backend reads the plain body, and so does the gateway.
    {"Content-Encoding": "gzip"},
    {"Content-Encoding": "identity, gzip"},
    {"Content-Encoding": "ZSTD"},
], ids=["identity", "identity-twice", "IDENTITY", "hop-by-hop", "gzip", "identity-gzip",
        "ZSTD"])
def test_an_uncoded_stream_under_a_quota_asks_for_usage(
        quota_gw: GatewayProc, oa_backend: FakeBackend, headers: dict[str, str]) -> None:
    mark = oa_backend.mark()
    r = httpx.post(quota_gw.url + "/v1/chat/completions", content=STREAM, timeout=10,
                   headers={"Content-Type": "application/json", "X-User-ID": "quota",
                            **headers})
    assert r.status_code == 200, r.text
    (req,) = oa_backend.wait_for(1, mark)
    assert req.header(b"content-encoding") in (None, b"identity", b"identity, identity",
                                               b"IDENTITY", b"gzip", b"identity, gzip", b"ZSTD")
    ok, why = v1_usage_holds_exact(req.body)
    assert ok, f"{why}; the backend got {req.body!r}"


@pytest.fixture(scope="module")
def cache_gw(oa_backend: FakeBackend) -> Iterator[GatewayProc]:
    """The default cache (`deterministic`) in front of an OpenAI-compatible backend."""
    proc = GatewayProc([oa_backend.url])
    yield proc
    proc.close()


@pytest.mark.parametrize(("members", "cached"), [
    pytest.param(b'"temperature":0', True, id="temperature"),
    pytest.param(b'"seed":7', True, id="seed"),
    pytest.param(b'"Temperature":0', False, id="Temperature"),
    pytest.param(b'"TEMPERATURE":0', False, id="TEMPERATURE"),
    pytest.param(b'"Seed":7', False, id="Seed"),
])
def test_only_what_every_server_reads_as_deterministic_is_cached(
        cache_gw: GatewayProc, oa_backend: FakeBackend, members: bytes, cached: bool) -> None:
    """vLLM and llama.cpp read only `"temperature"` and `"seed"` exactly: to them a body
    with `"Temperature": 0` samples at their default, and its answer, cached as a
    deterministic one, was replayed to everyone sending that body. The word
    `temperature` in the prompt made the gateway look for the key at all."""
    body = (b'{"model":"fake",' + members + b',"messages":[{"role":"user",'
            b'"content":"the temperature in %s?"}]}' % members.replace(b'"', b""))
    headers = {"Content-Type": "application/json"}
    first = httpx.post(cache_gw.url + "/v1/chat/completions", content=body, timeout=10,
                       headers={**headers, "X-User-ID": "one"})
    second = httpx.post(cache_gw.url + "/v1/chat/completions", content=body, timeout=10,
                        headers={**headers, "X-User-ID": "two"})
    assert first.status_code == second.status_code == 200
    assert (second.headers.get("x-cache") == "HIT") is cached, second.headers.get("x-cache")


@pytest.fixture(scope="module")
def other_backend() -> Iterator[FakeBackend]:
    fake = FakeBackend()
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def pools_gw(backend: FakeBackend, other_backend: FakeBackend,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    """Two pools, each with its own backend serving a model of the same name."""
    config = tmp_path_factory.mktemp("pools") / "gateway.toml"
    config.write_text(f'[pools.team]\nbackends = ["{other_backend.url}"]\n'
                      '[pool_access]\nusers = { outsider = ["default"] }\n')
    proc = GatewayProc([backend.url], "--config", str(config))
    yield proc
    proc.close()


@pytest.mark.parametrize("first_pool", ["", "/pool/team"])
def test_a_cached_answer_stays_in_its_pool(pools_gw: GatewayProc, backend: FakeBackend,
                                           other_backend: FakeBackend, first_pool: str) -> None:
    """Pools keep groups of backends apart, each with its own models behind a name and
    its own access rules; the cache key named no pool, so a deterministic answer of one
    pool's backend was replayed in another: to a user the pool's access rules keep
    out, and over the answer of the pool's own model."""
    body = (b'{"model":"fake","stream":false,"prompt":"pool %s","options":{"temperature":0}}'
            % first_pool.encode())
    second_pool = "/pool/team" if not first_pool else ""
    headers = {"Content-Type": "application/json"}
    first = httpx.post(pools_gw.url + first_pool + "/api/generate", content=body, timeout=10,
                       headers={**headers, "X-User-ID": "insider"})
    assert first.status_code == 200, first.text
    again = httpx.post(pools_gw.url + first_pool + "/api/generate", content=body, timeout=10,
                       headers={**headers, "X-User-ID": "insider"})
    assert again.headers.get("x-cache") == "HIT"  # the cache works within the pool
    own = other_backend if second_pool else backend
    mark = own.mark()
    user = "outsider" if not second_pool else "insider"
    r = httpx.post(pools_gw.url + second_pool + "/api/generate", content=body, timeout=10,
                   headers={**headers, "X-User-ID": user})
    assert r.status_code == 200, r.text
    assert r.headers.get("x-cache") != "HIT", "another pool's cached answer was replayed"
    assert own.wait_for(1, mark), "the pool's own backend was not asked"


@pytest.mark.parametrize("stream", [b"1", b"1.0", b'"true"', b'"1"', b'"yes"', b'"on"'])
def test_a_stream_pydantic_reads_as_true_asks_for_usage(
        quota_gw: GatewayProc, oa_backend: FakeBackend, stream: bytes) -> None:
    """vLLM's request models read in pydantic's lax mode: `"stream": 1` or `"true"`
    streams there (Go refuses it). The gateway asked for usage only beside `true`:
    such a stream ran without it, its prompt tokens never counted against the quota."""
    body = b'{"model":"fake","stream":' + stream + b"," + MSG + b"}"
    mark = oa_backend.mark()
    httpx.post(quota_gw.url + "/v1/chat/completions", content=body, timeout=10,
               headers={"Content-Type": "application/json", "X-User-ID": "lax"})
    (req,) = oa_backend.wait_for(1, mark)
    top = first_value(req.body)
    assert isinstance(top, list)
    _, options = exact_field(top, "stream_options")
    assert isinstance(options, list) and exact_field(options, "include_usage") == (True, True), (
        f"no usage asked of a stream: the backend got {req.body!r}")


@pytest.mark.parametrize("stream", [b"false", b"0", b"null"])
def test_no_usage_is_asked_beside_a_stream_no_server_runs(
        quota_gw: GatewayProc, oa_backend: FakeBackend, stream: bytes) -> None:
    """vLLM refuses `stream_options` beside a falsy `stream`: none is added there."""
    body = b'{"model":"fake","stream":' + stream + b"," + MSG + b"}"
    mark = oa_backend.mark()
    httpx.post(quota_gw.url + "/v1/chat/completions", content=body, timeout=10,
               headers={"Content-Type": "application/json", "X-User-ID": "lax"})
    (req,) = oa_backend.wait_for(1, mark)
    assert b"stream_options" not in req.body


@pytest.fixture(scope="module")
def cap_gw(oa_backend: FakeBackend) -> Iterator[GatewayProc]:
    """A token cap (clamp) in front of an OpenAI-compatible backend."""
    proc = GatewayProc([oa_backend.url], "--max-tokens", str(CAP), "--cache", "off")
    yield proc
    proc.close()


CAP = 50


def _lax_int(value: object) -> int:
    """A number as pydantic's lax mode reads it (vLLM), 1 when it is none."""
    if isinstance(value, str):
        value = value.strip()
    try:
        return max(1, int(float(value)))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 1


@pytest.mark.parametrize(("members", "path"), [
    pytest.param(b'"n":4', "/v1/chat/completions", id="n"),
    pytest.param(b'"n":4,"max_tokens":50', "/v1/chat/completions", id="n-with-max"),
    pytest.param(b'"n":"4","max_tokens":40', "/v1/chat/completions", id="n-as-string"),
    pytest.param(b'"n":2.0,"max_completion_tokens":30', "/v1/chat/completions", id="n-float"),
    pytest.param(b'"N":4,"max_tokens":50', "/v1/chat/completions", id="N"),
    pytest.param(b'"best_of":5,"max_tokens":50', "/v1/chat/completions", id="best_of"),
])
def test_sequences_share_the_cap(cap_gw: GatewayProc, oa_backend: FakeBackend,
                                 members: bytes, path: str) -> None:
    """vLLM makes `n` choices (sampling `best_of`), each up to max_tokens: a user
    capped at 50 tokens got n x 50. The cap is shared by the sequences."""
    body = (b'{"model":"fake",' + members + b',"prompt":"hi",' + MSG + b"}")
    mark = oa_backend.mark()
    r = httpx.post(cap_gw.url + path, content=body, timeout=10,
                   headers={"Content-Type": "application/json", "X-User-ID": "fan"})
    got = oa_backend.wait_for(1, mark, timeout=1.0 if r.status_code == 200 else 0.3)
    for req in got:
        top = first_value(req.body)
        assert isinstance(top, list)
        many = max(_lax_int(exact_field(top, "n")[1]), _lax_int(exact_field(top, "best_of")[1]),
                   _lax_int(go_field(top, "n")[1]))
        for name in ("max_tokens", "max_completion_tokens", "n_predict"):
            present, value = exact_field(top, name)
            if present or name == "max_tokens":
                assert isinstance(value, int) and 1 <= value and many * value <= CAP, (
                    f"{many} sequences of {name}={value!r}: the backend got {req.body!r}")
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("prompt", "many"), [
    pytest.param(b'["a","b","c","d"]', 4, id="strings"),
    pytest.param(b'[[1,2],[3],[4],[5],[6]]', 5, id="token-lists"),
    pytest.param(b'[1,2,3,4,5,6,7,8]', 1, id="one-prompt-of-token-ids"),
])
def test_a_prompt_list_shares_the_cap(cap_gw: GatewayProc, oa_backend: FakeBackend,
                                      prompt: bytes, many: int) -> None:
    """vLLM and llama.cpp complete every prompt of a /v1/completions list, each up to
    max_tokens: a batch of prompts is as many sequences."""
    body = b'{"model":"fake","max_tokens":50,"prompt":' + prompt + b"}"
    mark = oa_backend.mark()
    r = httpx.post(cap_gw.url + "/v1/completions", content=body, timeout=10,
                   headers={"Content-Type": "application/json", "X-User-ID": "fan"})
    assert r.status_code != 400, r.text
    (req,) = oa_backend.wait_for(1, mark)
    top = first_value(req.body)
    assert isinstance(top, list)
    _, value = exact_field(top, "max_tokens")
    assert isinstance(value, int) and 1 <= value and many * value <= CAP, req.body
    assert many * (value + 1) > CAP, f"capped more than it must: {req.body!r}"


def test_more_sequences_than_the_cap_is_refused(cap_gw: GatewayProc,
                                                oa_backend: FakeBackend) -> None:
    body = b'{"model":"fake","n":51,' + MSG + b"}"
    mark = oa_backend.mark()
    r = httpx.post(cap_gw.url + "/v1/chat/completions", content=body, timeout=10,
                   headers={"Content-Type": "application/json", "X-User-ID": "fan"})
    assert r.status_code == 400, r.text
    assert "sequences" in r.json()["error"]["message"]
    assert not oa_backend.wait_for(1, mark, timeout=0.2)
