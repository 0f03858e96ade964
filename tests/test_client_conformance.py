"""Official clients' calls that tests/test_clients.py does not make, as an outside suite would.

The JavaScript clients (npm `ollama`, `openai`) are reproduced here by the bytes
they send (captured from ollama 0.6.4 and openai 6.49.0 on Node 20), so no
Node or npm is needed.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import ollama
import openai
import orjson
import pytest
from aiohttp import web
from harness import LoopThread, Stack, fast_sim_options, start_stack

# An OpenAI-compatible server's ids, as vLLM lists them: namespaced.
VLLM_MODELS = ["Qwen/Qwen2.5-0.5B-Instruct", "BAAI/bge-small-en-v1.5"]


@pytest.fixture(scope="module")
def mixed() -> Stack:
    """An Ollama without /v1 and an OpenAI-only server with namespaced ids."""
    st = start_stack(sims=[fast_sim_options(api="ollama", models=["llama3.2:latest"]),
                           fast_sim_options(api="openai", models=VLLM_MODELS)])
    yield st
    st.close()


def test_every_listed_model_can_be_retrieved(mixed: Stack) -> None:
    """`models.retrieve(m.id)` for each `m` of `models.list()`: the SDKs (Python and
    JS alike) send a '/' in an id as %2F, which must find the namespaced ids
    an OpenAI-compatible server lists."""
    ai = openai.OpenAI(base_url=mixed.url + "/v1", api_key="k", max_retries=0)
    ids = [m.id for m in ai.models.list().data]
    assert any("/" in i for i in ids)
    for model_id in ids:
        got = ai.models.retrieve(model_id)
        assert got.id == model_id and got.object == "model"
    qwen = next(i for i in ids if i.startswith("Qwen/"))
    assert ai.models.retrieve(qwen).owned_by == "Qwen"
    # The path as the JS client writes it, and with a raw slash.
    for path in ("/v1/models/Qwen%2FQwen2.5-0.5B-Instruct", "/v1/models/Qwen/Qwen2.5-0.5B-Instruct"):
        r = httpx.get(mixed.url + path)
        assert r.status_code == 200, path
        assert r.json()["id"] == "Qwen/Qwen2.5-0.5B-Instruct"
    # A namespaced name nobody lists is still a 404 in OpenAI's shape.
    r = httpx.get(mixed.url + "/v1/models/ns%2Fmodel")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    with pytest.raises(openai.NotFoundError):
        ai.models.retrieve("Qwen/Qwen3-235B")


def test_api_status_is_the_primary_ollamas_and_cloud_account_routes_stay_home(
        mixed: Stack) -> None:
    """`GET /api/status` (the Go client's CloudStatusExperimental) is the primary
    Ollama's own answer; the routes that act with the backend's ollama.com
    account are not forwarded (README, Routes)."""
    r = httpx.get(mixed.url + "/api/status")
    assert r.status_code == 200 and r.json() == {"cloud": {"disabled": False, "source": "none"}}
    assert "x-gateway-backend" in r.headers
    for method, path in (("POST", "/api/me"), ("POST", "/api/signout"),
                         ("POST", "/api/experimental/web_search")):
        assert httpx.request(method, mixed.url + path, json={}).status_code == 404


def test_api_status_without_an_ollama_backend() -> None:
    st = start_stack(sims=[fast_sim_options(api="openai", models=VLLM_MODELS)])
    try:
        r = httpx.get(st.url + "/api/status")
        assert r.status_code == 503 and r.json() == {"error": "no Ollama backend is online"}
    finally:
        st.close()


def test_input_audio_reaches_an_ollama_without_v1(mixed: Stack) -> None:
    """An `input_audio` part (openai SDK, audio models such as gemma3n) is carried
    in `images`, as Ollama's own /v1 does, not refused."""
    ai = openai.OpenAI(base_url=mixed.url + "/v1", api_key="k", max_retries=0)
    wav = "UklGRiQAAABXQVZFZm10IBAAAAABAAEAQB8AAEAfAAABAAgAZGF0YQAAAAA="
    raw = ai.chat.completions.with_raw_response.create(
        model="llama3.2",
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is said?"},
            {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}]}],
    )
    assert raw.headers["x-translated"] == "openai->ollama"
    assert raw.parse().choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        ai.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"format": "wav"}}]}])
    assert "input_audio" in err.value.message


# ollama-js 0.6.4's requests, as it writes them (Node 20's fetch): JSON types on
# every request, GET included, `Accept: application/json` on streams too, and
# the legacy `name` on pull and delete.
OLLAMA_JS_HEADERS = {
    "Content-Type": "application/json", "Accept": "application/json",
    "User-Agent": "ollama-js/0.6.4 (x64 linux Node.js/v20.20.2)",
    "accept-language": "*", "sec-fetch-mode": "cors", "accept-encoding": "gzip, deflate",
}


def test_ollama_js_requests_as_it_sends_them(mixed: Stack) -> None:
    with httpx.Client(base_url=mixed.url, headers=OLLAMA_JS_HEADERS) as js:
        names = [m["name"] for m in js.get("/api/tags").json()["models"]]
        assert "llama3.2:latest" in names and "Qwen/Qwen2.5-0.5B-Instruct:latest" in names
        assert js.post("/api/pull", content=b'{"name":"tinyllama","stream":false}').json() == {
            "status": "success"}
        r = js.post("/api/copy", content=b'{"source":"tinyllama","destination":"tcopy"}')
        assert r.status_code == 200
        r = js.request("DELETE", "/api/delete", content=b'{"name":"tcopy"}')
        assert r.status_code == 200
        r = js.request("DELETE", "/api/delete", content=b'{"name":"tcopy"}')
        assert r.status_code == 404 and r.json() == {"error": "model 'tcopy' not found"}
        # A stream, for a model of each backend (the second one translated).
        for model in ("llama3.2", "Qwen/Qwen2.5-0.5B-Instruct"):
            body = (b'{"model":"' + model.encode()
                    + b'","messages":[{"role":"user","content":"hi","images":["AQID"]}],'
                    b'"stream":true,"options":{"num_predict":3}}')
            with js.stream("POST", "/api/chat", content=body) as r:
                assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
                # ollama-js splits on "\n" and JSON.parses every non-empty piece.
                lines = b"".join(r.iter_bytes()).decode().split("\n")
            assert lines[-1] == ""
            parts = [httpx.Response(200, content=line).json() for line in lines[:-1]]
            assert all(not p["done"] for p in parts[:-1]) and parts[-1]["done"] is True
            assert "".join(p["message"]["content"] for p in parts)


# -- Parallel tool calls, both ways through the translation -----------------------

def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return _sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                 "model": "toolbox", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def _frag(index: int, **fields: Any) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, **fields}]}


# As vLLM streams two calls (here interleaved, which any server may do): the id
# and name first, then pieces of the JSON arguments.
OPENAI_STREAM = b"".join([
    _chunk({"role": "assistant", "content": None}),
    _chunk(_frag(0, id="call_a", type="function", function={"name": "get_weather", "arguments": ""})),
    _chunk(_frag(0, function={"arguments": '{"city": '})),
    _chunk(_frag(1, id="call_b", type="function", function={"name": "get_time", "arguments": ""})),
    _chunk(_frag(0, function={"arguments": '"Paris"}'})),
    _chunk(_frag(1, function={"arguments": '{"tz": "CET"}'})),
    _chunk({}, "tool_calls"),
    _sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "toolbox",
          "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}}),
    b"data: [DONE]\n\n",
])
OPENAI_WHOLE = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "toolbox",
                "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                    "role": "assistant", "content": None, "tool_calls": [
                        {"id": "call_a", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                        {"id": "call_b", "type": "function",
                         "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}}]}}],
                "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}}

# As Ollama streams two calls: each in its own line as soon as it is parsed.
CALL_A = {"id": "call_a", "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}}
CALL_B = {"id": "call_b", "function": {"index": 1, "name": "get_time", "arguments": {"tz": "CET"}}}


def _line(message: dict[str, Any], **rest: Any) -> bytes:
    return orjson.dumps({"model": "toolbox", "created_at": "2026-01-01T00:00:00Z",
                         "message": {"role": "assistant", "content": "", **message}, **rest}) + b"\n"


OLLAMA_STREAM = b"".join([
    _line({"tool_calls": [CALL_A]}, done=False),
    _line({"tool_calls": [CALL_B]}, done=False),
    _line({}, done=True, done_reason="stop", prompt_eval_count=9, eval_count=4),
])
OLLAMA_WHOLE = _line({"tool_calls": [CALL_A, CALL_B]}, done=True, done_reason="stop",
                     prompt_eval_count=9, eval_count=4)


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


async def _openai_server(request: web.Request) -> web.StreamResponse:
    if request.path == "/v1/models":
        return web.json_response({"object": "list", "data": [{"id": "toolbox", "object": "model"}]})
    body = await request.json()
    if not body.get("stream"):
        return web.json_response(OPENAI_WHOLE)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(OPENAI_STREAM)
    await resp.write_eof()
    return resp


async def _ollama_server(request: web.Request) -> web.StreamResponse:
    if request.path == "/api/tags":
        return web.json_response({"models": [{"name": "toolbox:latest", "model": "toolbox:latest"}]})
    if request.path == "/api/ps":
        return web.json_response({"models": []})
    if request.path == "/api/version":
        return web.json_response({"version": "0.12.0"})
    if request.path != "/api/chat":
        return web.Response(status=404, text="404 page not found")  # no /v1: translated
    body = await request.json()
    if body.get("stream") is False:
        return web.Response(body=OLLAMA_WHOLE, content_type="application/json")
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    await resp.write(OLLAMA_STREAM)
    await resp.write_eof()
    return resp


@pytest.fixture(scope="module", params=["openai-backend", "ollama-backend"])
def toolbox(request: pytest.FixtureRequest) -> Stack:
    lt = LoopThread()
    app = web.Application()
    handler = _openai_server if request.param == "openai-backend" else _ollama_server
    app.router.add_route("*", "/{tail:.*}", handler)
    runner, url = lt.run(_serve(app))
    st = start_stack(sims=[], extra_backends=[url], health_interval=3600.0)
    yield st
    st.close()
    lt.run(runner.cleanup())
    lt.stop()


TOOLS = [{"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}
         for name in ("get_weather", "get_time")]
ASK = [{"role": "user", "content": "weather in Paris, and the time?"}]


def test_parallel_tool_calls_for_the_openai_client(toolbox: Stack) -> None:
    ai = openai.OpenAI(base_url=toolbox.url + "/v1", api_key="k", max_retries=0)
    want = [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    whole = ai.chat.completions.create(model="toolbox", messages=ASK, tools=TOOLS,  # type: ignore[arg-type]
                                       parallel_tool_calls=True)
    calls = whole.choices[0].message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == want
    assert len({c.id for c in calls}) == 2 and whole.choices[0].finish_reason == "tool_calls"
    # The SDK's stream helper joins deltas by index: two calls, not one merged.
    with ai.chat.completions.stream(model="toolbox", messages=ASK, tools=TOOLS,  # type: ignore[arg-type]
                                    stream_options={"include_usage": True}) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == want
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.usage is not None and final.usage.completion_tokens == 4


def test_parallel_tool_calls_for_the_ollama_client(toolbox: Stack) -> None:
    oc = ollama.Client(host=toolbox.url)
    want = [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    whole = oc.chat(model="toolbox", messages=ASK, tools=TOOLS)
    assert [(c.function.name, dict(c.function.arguments)) for c in whole.message.tool_calls or []] == want
    calls = [c for part in oc.chat(model="toolbox", messages=ASK, tools=TOOLS, stream=True)
             for c in part.message.tool_calls or []]
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == want


@pytest.fixture(scope="module")
def vllm_like() -> Stack:
    """An OpenAI-only server that, as vLLM, finds a model only by its exact id."""
    st = start_stack(sims=[fast_sim_options(api="openai", models=VLLM_MODELS, exact_ids=True)])
    yield st
    st.close()


def test_an_exact_id_server_gets_the_model_spelled_as_it_lists_it(vllm_like: Stack) -> None:
    """Routing folds case and `:latest` (Ollama's rules, which Ollama users type
    by): the backend still reads its own id."""
    sim_url = vllm_like.sims[0].url
    # The simulator itself, as vLLM: any other spelling is a 404.
    direct = openai.OpenAI(base_url=sim_url + "/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        direct.chat.completions.create(model="qwen/qwen2.5-0.5b-instruct",
                                       messages=[{"role": "user", "content": "hi"}])
    ai = openai.OpenAI(base_url=vllm_like.url + "/v1", api_key="k", max_retries=0)
    for spelling in ("Qwen/Qwen2.5-0.5B-Instruct", "qwen/qwen2.5-0.5b-instruct",
                     "QWEN/Qwen2.5-0.5B-Instruct:latest"):
        answer = ai.chat.completions.create(model=spelling,
                                            messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content, spelling
    assert ai.embeddings.create(model="baai/bge-small-en-v1.5", input="hi").data[0].embedding
    oc = ollama.Client(host=vllm_like.url)
    listed = [m.model for m in oc.list().models]
    assert "Qwen/Qwen2.5-0.5B-Instruct" in listed
    # What an Ollama client picks from the list, or with Ollama's `:latest`, translated.
    for name in [n for n in listed if "bge" not in n] + ["qwen/qwen2.5-0.5b-instruct:latest"]:
        if "bge" not in name:
            assert oc.chat(model=name, messages=[{"role": "user", "content": "hi"}]).message
            assert "".join(p.message.content for p in oc.chat(
                model=name, messages=[{"role": "user", "content": "hi"}], stream=True))
    with pytest.raises(openai.NotFoundError):
        ai.chat.completions.create(model="Qwen/Qwen3-235B",
                                   messages=[{"role": "user", "content": "hi"}])
