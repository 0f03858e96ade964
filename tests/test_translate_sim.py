"""Translation against the simulator in each mode: the translated request is
sent to a real (simulated) backend of the other API, its answer is read in the
pieces the socket gives, translated, and checked with the official clients'
own types. No gateway: this tests the pure functions on real wire output.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from ollama import _types as ot
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ollamamq_fast.sim import SimServer, start_sim
from ollamamq_fast.wire.errors import Api
from ollamamq_fast.wire.translate import (
    Translated,
    ollama_model_items,
    open_stream,
    openai_model_from_tag,
    openai_model_items,
    tag_from_openai_model,
    translate_error,
    translate_request,
    translate_response,
)
from tests.harness import LoopThread, fast_sim_options

TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def sims() -> Iterator[dict[str, SimServer]]:
    lt = LoopThread()

    async def boot() -> dict[str, SimServer]:
        return {api: await start_sim(fast_sim_options(api=api, tokens=12), "127.0.0.1", 0)
                for api in ("openai", "ollama")}

    servers = lt.run(boot())
    yield servers

    async def shutdown() -> None:
        for server in servers.values():
            await server.close()

    lt.run(shutdown())
    lt.stop()


def exchange(sim: SimServer, t: Translated) -> tuple[int, str, bytes, Any]:
    """Send t to the sim; translate its answer piece by piece as it arrives."""
    with httpx.Client(base_url=sim.url, timeout=10) as client, client.stream(
            "POST", t.path.decode(), content=t.body) as r:
        ctype = r.headers.get("content-type", "")
        if r.status_code >= 400:
            return r.status_code, ctype, r.read(), None
        if t.stream and ("event-stream" in ctype or "ndjson" in ctype):
            s = open_stream(t)
            out = b"".join(s.feed(piece) for piece in r.iter_raw(7)) + s.finish()
            return r.status_code, ctype, out, s
        return r.status_code, ctype, translate_response(t, r.read()), None


def lines(data: bytes) -> list[bytes]:
    return [line for line in data.split(b"\n") if line]


def events(data: bytes) -> list[Any]:
    return [orjson.loads(b[6:]) if b != b"data: [DONE]" else "[DONE]" for b in data.split(b"\n\n") if b]


def test_ollama_chat_stream_with_a_tool_on_an_openai_backend(sims: dict[str, SimServer]) -> None:
    body = {"model": "llama3.2", "tools": [TOOL], "messages": [
        {"role": "user", "content": "Use get_weather for Paris"}]}
    t = translate_request("/api/chat", orjson.dumps(body), Api.OPENAI)
    status, ctype, out, s = exchange(sims["openai"], t)
    assert status == 200 and "event-stream" in ctype
    parsed = [ot.ChatResponse.model_validate_json(line) for line in lines(out)]
    calls = [c for p in parsed for c in (p.message.tool_calls or [])]
    assert calls and calls[0].function.name == "get_weather" and isinstance(calls[0].function.arguments, dict)
    assert parsed[-1].done and not any(p.done for p in parsed[:-1])
    assert s.complete and s.completion_tokens == parsed[-1].eval_count and s.prompt_tokens


def test_ollama_chat_and_generate_whole_on_an_openai_backend(sims: dict[str, SimServer]) -> None:
    body = {"model": "llama3.2", "stream": False, "messages": [{"role": "user", "content": "hello"}],
            "options": {"num_predict": 5}, "keep_alive": "5m"}
    t = translate_request("/api/chat", orjson.dumps(body), Api.OPENAI)
    assert t.notes == ("keep_alive dropped",)
    _, _, out, _ = exchange(sims["openai"], t)
    answer = ot.ChatResponse.model_validate_json(out)
    assert answer.done and answer.eval_count == 5 and answer.done_reason == "length" and answer.message.content
    for extra in ({}, {"raw": True}):
        t = translate_request("/api/generate", orjson.dumps(
            {"model": "llama3.2", "prompt": "why?", "stream": True, **extra}), Api.OPENAI)
        _, _, out, s = exchange(sims["openai"], t)
        parsed = [ot.GenerateResponse.model_validate_json(line) for line in lines(out)]
        assert "".join(p.response or "" for p in parsed) and parsed[-1].done and s.complete


def test_ollama_embed_on_an_openai_backend(sims: dict[str, SimServer]) -> None:
    t = translate_request("/api/embed", b'{"model":"all-minilm","input":["a","b"]}', Api.OPENAI)
    _, _, out, _ = exchange(sims["openai"], t)
    answer = ot.EmbedResponse.model_validate_json(out)
    assert len(answer.embeddings) == 2 and len(answer.embeddings[0]) > 2


def test_openai_chat_stream_with_reasoning_and_usage_on_an_ollama_backend(sims: dict[str, SimServer]) -> None:
    body = {"model": "llama3.2", "stream": True, "stream_options": {"include_usage": True},
            "reasoning_effort": "low", "messages": [{"role": "user", "content": "think about it"}]}
    t = translate_request("/v1/chat/completions", orjson.dumps(body), Api.OLLAMA)
    status, ctype, out, s = exchange(sims["ollama"], t)
    assert status == 200 and "ndjson" in ctype
    evs = events(out)
    assert evs[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(e) for e in evs[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert any(c.choices and c.choices[0].delta.model_extra and c.choices[0].delta.model_extra.get("reasoning")
               for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == s.completion_tokens >= 12  # thinking counts too


def test_openai_tools_whole_and_embeddings_on_an_ollama_backend(sims: dict[str, SimServer]) -> None:
    body = {"model": "llama3.2", "tools": [TOOL], "messages": [{"role": "user", "content": "call get_weather"}]}
    t = translate_request("/v1/chat/completions", orjson.dumps(body), Api.OLLAMA)
    _, _, out, _ = exchange(sims["ollama"], t)
    answer = ChatCompletion.model_validate_json(out)
    calls = answer.choices[0].message.tool_calls
    assert answer.choices[0].finish_reason == "tool_calls" and calls
    assert isinstance(orjson.loads(orjson.loads(out)["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]), dict)
    t = translate_request("/v1/completions", b'{"model":"llama3.2","prompt":"once","max_tokens":3}', Api.OLLAMA)
    _, _, out, _ = exchange(sims["ollama"], t)
    usage = Completion.model_validate_json(out).usage
    assert usage is not None and usage.completion_tokens == 3
    t = translate_request("/v1/embeddings", b'{"model":"all-minilm","input":"x","encoding_format":"base64"}',
                          Api.OLLAMA)
    _, _, out, _ = exchange(sims["ollama"], t)
    # The SDK decodes base64 itself before its type sees the answer.
    vector = orjson.loads(out)["data"][0]["embedding"]
    assert isinstance(vector, str) and len(base64.b64decode(vector)) % 4 == 0
    t = translate_request("/v1/embeddings", b'{"model":"all-minilm","input":["x","y"]}', Api.OLLAMA)
    assert len(CreateEmbeddingResponse.model_validate_json(exchange(sims["ollama"], t)[2]).data) == 2


def test_backend_errors_reach_the_client_in_its_shape(sims: dict[str, SimServer]) -> None:
    t = translate_request("/api/chat", b'{"model":"nope","stream":false,"messages":[{"role":"user","content":"x"}]}',
                          Api.OPENAI)
    status, _, body, _ = exchange(sims["openai"], t)
    assert status == 404
    _, out = translate_error(t.client.api, status, body)
    assert "nope" in orjson.loads(out)["error"]
    t = translate_request("/v1/chat/completions", b'{"model":"nope","messages":[{"role":"user","content":"x"}]}',
                          Api.OLLAMA)
    status, _, body, _ = exchange(sims["ollama"], t)
    _, out = translate_error(t.client.api, status, body)
    assert status == 404 and orjson.loads(out)["error"]["type"] == "not_found_error"


def test_model_lists_across_apis(sims: dict[str, SimServer]) -> None:
    v1 = httpx.get(sims["openai"].url + "/v1/models").content
    tags = [tag_from_openai_model(i) for i in openai_model_items(v1)]
    ot.ListResponse.model_validate({"models": tags})
    assert {e["name"] for e in tags} >= {"llama3.2:latest", "all-minilm:latest"}
    native = httpx.get(sims["ollama"].url + "/api/tags").content
    models = [openai_model_from_tag(e) for e in ollama_model_items(native)]
    assert {m["id"] for m in models} >= {"llama3.2:latest"} and all(m["created"] > 0 for m in models)
