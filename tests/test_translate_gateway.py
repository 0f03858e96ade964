"""Translation through the gateway, end to end, with the official clients.

Two stacks: a gateway in front of the simulator in OpenAI-only mode (like
vLLM or llama.cpp's server), driven with the `ollama` client; and one in front
of the simulator in Ollama-only mode (no `/v1` layer), driven with the
`openai` client. Every answer is read by the client's own types; the
gateway's accounting is checked against the backend's own counts.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import openai
import orjson
import pytest
from harness import Stack, fast_sim_options, start_stack
from test_traps import wait_for

TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
# A 1x1 PNG.
PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5E"
       "rkJggg==")
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
          "required": ["city", "days"]}


@pytest.fixture(scope="module")
def openai_backend() -> Iterator[Stack]:
    """The gateway in front of an OpenAI-only server: Ollama clients are translated."""
    st = start_stack(sims=[fast_sim_options(api="openai", tokens=8)])
    yield st
    st.close()


@pytest.fixture(scope="module")
def ollama_backend() -> Iterator[Stack]:
    """The gateway in front of an Ollama without /v1: OpenAI clients are translated."""
    st = start_stack(sims=[fast_sim_options(api="ollama", tokens=8)])
    yield st
    st.close()


def tokens_of(st: Stack, user: str) -> tuple[int, int]:
    stats = st.state.stats.users[user]
    return stats.prompt_tokens, stats.completion_tokens


def done_count(st: Stack, user: str) -> int:
    users = st.state.stats.users
    return users[user].done if user in users else 0


def ollama_client(st: Stack, user: str) -> ollama.Client:
    return ollama.Client(host=st.url, headers={"X-User-ID": user})


def openai_client(st: Stack, user: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=st.url + "/v1", api_key="x", max_retries=0,
                         default_headers={"X-User-ID": user})


# -- Ollama client, OpenAI-compatible backend ----------------------------------------


def test_the_backend_is_detected_as_openai_only(openai_backend: Stack) -> None:
    backend = openai_backend.state.fleet.backends[0]
    assert backend.kind.value == "openai" and backend.speaks == 2


def test_model_lists_include_the_openai_backends_models(openai_backend: Stack) -> None:
    c = ollama_client(openai_backend, "lists")
    names = [m.model for m in c.list().models]
    assert "llama3.2:latest" in names or "llama3.2" in names
    show = c.show("llama3.2")
    assert show.modelinfo is not None and "completion" in (show.capabilities or [])
    assert any((m.model or "").startswith("llama3.2") for m in c.ps().models)
    with pytest.raises(ollama.ResponseError) as missing:
        c.show("no-such-model")
    assert missing.value.status_code == 404
    # /v1/models still answers from the backend's own list.
    models = httpx.get(openai_backend.url + "/v1/models").json()
    assert "llama3.2:latest" in {m["id"] for m in models["data"]}


def test_ollama_chat_whole_and_streamed(openai_backend: Stack) -> None:
    st = openai_backend
    c = ollama_client(st, "chat")
    whole = c.chat(model="llama3.2", messages=[{"role": "user", "content": "hello"}],
                   options={"num_predict": 5, "temperature": 0.1})
    assert whole.done and whole.message.content and whole.eval_count == 5
    assert whole.done_reason == "length"
    parts = list(c.chat(model="llama3.2", messages=[{"role": "user", "content": "hello"}],
                        stream=True))
    assert len(parts) > 3 and parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content or "" for p in parts)
    last = parts[-1]
    assert last.eval_count == 8 and last.prompt_eval_count
    # Accounting uses the backend's own counts for both requests.
    assert wait_for(lambda: done_count(st, "chat") == 2, 5.0)
    prompt, completion = tokens_of(st, "chat")
    assert completion == 5 + 8 and prompt == (whole.prompt_eval_count or 0) + last.prompt_eval_count
    assert not st.state.stats.users["chat"].estimated_tokens


def test_translated_answers_say_so_in_a_header(openai_backend: Stack) -> None:
    r = httpx.post(openai_backend.url + "/api/chat", json={
        "model": "llama3.2", "stream": False, "keep_alive": "10m",
        "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.headers["x-translated"] == "ollama->openai"
    assert "keep_alive dropped" in r.headers["x-translation-notes"]
    assert r.headers["content-type"].startswith("application/json") and r.json()["done"] is True


def test_ollama_generate_whole_streamed_and_raw(openai_backend: Stack) -> None:
    c = ollama_client(openai_backend, "gen")
    whole = c.generate(model="llama3.2", prompt="why is the sky blue?")
    assert whole.done and whole.response and whole.eval_count == 8
    parts = list(c.generate(model="llama3.2", prompt="once upon", raw=True, stream=True))
    assert parts[-1].done and "".join(p.response for p in parts)
    loaded = c.generate(model="llama3.2", prompt="")  # the load form: answered by the gateway
    assert loaded.done and loaded.done_reason == "load"


def test_ollama_embed_and_legacy_embeddings(openai_backend: Stack) -> None:
    c = ollama_client(openai_backend, "embed")
    out = c.embed(model="all-minilm", input=["a", "b"])
    assert len(out.embeddings) == 2 and len(out.embeddings[0]) > 2
    legacy = c.embeddings(model="all-minilm", prompt="a")
    assert legacy.embedding == pytest.approx(out.embeddings[0], rel=1e-5)
    # An empty batch, and embed() without input (ollama-python sends "": Ollama's
    # load form), give no vectors, as from Ollama, not an error or a vector of "".
    assert c.embed(model="all-minilm", input=[]).embeddings == []
    assert c.embed(model="all-minilm").embeddings == []


def test_ollama_tools_whole_and_streamed(openai_backend: Stack) -> None:
    c = ollama_client(openai_backend, "tools")
    msgs = [{"role": "user", "content": "Use get_weather for Paris"}]
    whole = c.chat(model="llama3.2", messages=msgs, tools=[TOOL])
    calls = whole.message.tool_calls or []
    assert calls and calls[0].function.name == "get_weather"
    assert isinstance(calls[0].function.arguments, dict) and calls[0].function.arguments
    streamed = [call for part in c.chat(model="llama3.2", messages=msgs, tools=[TOOL], stream=True)
                for call in (part.message.tool_calls or [])]
    # Streamed tool-call deltas are joined into one whole call.
    assert len(streamed) == 1 and streamed[0].function.arguments == calls[0].function.arguments
    # The answer goes back with the tool's result, and the model answers.
    history = msgs + [whole.message, {"role": "tool", "tool_name": "get_weather", "content": "sunny"}]
    after = c.chat(model="llama3.2", messages=history, tools=[TOOL])
    assert after.done and after.message.content


def test_ollama_images_and_format(openai_backend: Stack) -> None:
    c = ollama_client(openai_backend, "media")
    seen = c.chat(model="llama3.2", messages=[{"role": "user", "content": "what is this?",
                                               "images": [PNG]}])
    assert seen.done and seen.message.content
    shaped = c.chat(model="llama3.2", messages=[{"role": "user", "content": "weather"}],
                    format=SCHEMA)
    assert set(json.loads(shaped.message.content or "")) >= {"city", "days"}
    as_json = c.generate(model="llama3.2", prompt="give json", format="json")
    assert isinstance(json.loads(as_json.response), dict)


def test_ollama_errors_come_back_in_ollama_shape(openai_backend: Stack) -> None:
    c = ollama_client(openai_backend, "errors")
    with pytest.raises(ollama.ResponseError) as bad:
        c.chat(model="llama3.2", messages=[{"role": "user", "content": "x"}], think="sideways")  # type: ignore[arg-type]
    assert bad.value.status_code == 400
    failing = ollama.Client(host=openai_backend.url, headers={"X-Sim-Fault": "status:500"})
    with pytest.raises(ollama.ResponseError) as broken:
        failing.chat(model="llama3.2", messages=[{"role": "user", "content": "x"}])
    assert broken.value.status_code == 500 and broken.value.error
    mid = ollama.Client(host=openai_backend.url, headers={"X-Sim-Fault": "mid-stream-error"})
    with pytest.raises(ollama.ResponseError) as cut:
        list(mid.chat(model="llama3.2", messages=[{"role": "user", "content": "x"}], stream=True))
    assert "error" in str(cut.value)
    r = httpx.post(openai_backend.url + "/api/chat", headers={"X-Sim-Fault": "status:500"},
                   json={"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 500 and isinstance(r.json()["error"], str)


def test_a_keep_alive_ollama_refuses_is_refused_as_ollama_does(
        openai_backend: Stack, ollama_backend: Stack) -> None:
    # "10" has no unit: Ollama's time.ParseDuration refuses it with a 400, the
    # load form included; the translated path says the same as the Ollama one.
    msgs = [{"role": "user", "content": "x"}]
    for st in (ollama_backend, openai_backend):
        c = ollama_client(st, "keep-alive")
        for call, kwargs in ((c.chat, {"model": "llama3.2", "messages": msgs}),
                             (c.chat, {"model": "llama3.2"}),
                             (c.generate, {"model": "llama3.2", "prompt": "x"}),
                             (c.embed, {"model": "all-minilm", "input": "x"})):
            with pytest.raises(ollama.ResponseError) as bad:
                call(**kwargs, keep_alive="10")  # type: ignore[operator]
            assert bad.value.status_code == 400
            assert bad.value.error == 'time: missing unit in duration "10"'
        # Zero in any spelling unloads.
        assert c.generate(model="llama3.2", keep_alive="0m").done_reason == "unload"
        assert c.chat(model="llama3.2", messages=msgs, keep_alive="1h30m").done


def test_a_backend_that_dies_mid_stream_ends_the_ollama_stream_with_an_error(openai_backend: Stack) -> None:
    with httpx.stream("POST", openai_backend.url + "/api/chat", headers={"X-Sim-Fault": "die-after:3"},
                      json={"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]}) as r:
        lines = [orjson.loads(line) for line in r.iter_lines() if line]
    assert r.status_code == 200 and lines[-1]["error"]
    assert not any(line.get("done") for line in lines)


def _cancel_translated_stream(st: Stack, request: bytes) -> None:
    sim = st.sims[0]
    before = sim.stats.cancelled
    sock = socket.create_connection(("127.0.0.1", st.port), timeout=5)
    sock.sendall(request)
    got = b""
    while got.count(b"content") < 3:
        got += sock.recv(65536)
    assert b"X-Translated" in got
    sock.close()
    assert wait_for(lambda: sim.stats.cancelled > before, 5.0), "the backend never saw the client leave"
    assert wait_for(lambda: st.state.fleet.backends[0].in_flight == 0, 5.0)


def test_leaving_a_translated_ollama_stream_cancels_the_backend(openai_backend: Stack) -> None:
    body = orjson.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "long"}]})
    _cancel_translated_stream(openai_backend, b"POST /api/chat HTTP/1.1\r\nHost: gw\r\n"
                              b"X-Sim-Tokens: 100000\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))


# -- OpenAI client, Ollama backend without /v1 ------------------------------------------


def test_the_ollama_backend_without_v1_is_detected(ollama_backend: Stack) -> None:
    backend = ollama_backend.state.fleet.backends[0]
    assert backend.kind.value == "ollama" and backend.v1 is False and backend.speaks == 1


def test_openai_models_and_chat_whole(ollama_backend: Stack) -> None:
    st = ollama_backend
    c = openai_client(st, "oa-chat")
    assert "llama3.2:latest" in {m.id for m in c.models.list()}
    raw = c.chat.completions.with_raw_response.create(
        model="llama3.2", messages=[{"role": "user", "content": "hello"}], max_tokens=4)
    assert raw.headers["x-translated"] == "openai->ollama"
    answer = raw.parse()
    assert answer.choices[0].message.content and answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 4
    assert wait_for(lambda: done_count(st, "oa-chat") == 1, 5.0)
    assert tokens_of(st, "oa-chat") == (answer.usage.prompt_tokens, 4)


def test_openai_chat_streamed_with_and_without_usage(ollama_backend: Stack) -> None:
    st = ollama_backend
    c = openai_client(st, "oa-stream")
    chunks = list(c.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "hello"}], stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 8 and not chunks[-1].choices
    plain = list(c.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "hello"}], stream=True))
    assert all(ch.usage is None for ch in plain) and plain[-1].choices[0].finish_reason == "stop"
    # Both counted from the backend's own eval counts, the second too (no usage chunk asked).
    assert wait_for(lambda: done_count(st, "oa-stream") == 2, 5.0)
    prompt, completion = tokens_of(st, "oa-stream")
    assert completion == 16 and prompt == 2 * usage.prompt_tokens
    assert not st.state.stats.users["oa-stream"].estimated_tokens


def test_openai_completions_and_embeddings(ollama_backend: Stack) -> None:
    c = openai_client(ollama_backend, "oa-misc")
    done = c.completions.create(model="llama3.2", prompt="once", max_tokens=3)
    assert done.choices[0].text and done.usage is not None and done.usage.completion_tokens == 3
    pieces = list(c.completions.create(model="llama3.2", prompt="once", stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices)
    # The SDK asks for base64 vectors by default and decodes them.
    emb = c.embeddings.create(model="all-minilm", input=["a", "b"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) > 2
    floats = c.embeddings.create(model="all-minilm", input="a", encoding_format="float")
    # An empty string is embedded (one vector), as Ollama's own /v1 does.
    assert len(c.embeddings.create(model="all-minilm", input="").data) == 1
    assert floats.data[0].embedding == pytest.approx(emb.data[0].embedding, rel=1e-5)


def test_openai_tools_whole_and_streamed(ollama_backend: Stack) -> None:
    c = openai_client(ollama_backend, "oa-tools")
    msgs: list[Any] = [{"role": "user", "content": "Use get_weather for Paris"}]
    whole = c.chat.completions.create(model="llama3.2", messages=msgs, tools=[TOOL])  # type: ignore[list-item]
    call = (whole.choices[0].message.tool_calls or [])[0]
    assert whole.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments), dict)
    chunks = list(c.chat.completions.create(model="llama3.2", messages=msgs, tools=[TOOL],  # type: ignore[list-item]
                                            stream=True))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function is not None and deltas[0].function.name == "get_weather"
    assert deltas[0].id and deltas[0].index == 0
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"
    history = msgs + [whole.choices[0].message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    after = c.chat.completions.create(model="llama3.2", messages=history, tools=[TOOL])  # type: ignore[list-item]
    assert after.choices[0].message.content


def test_openai_images_and_response_format(ollama_backend: Stack) -> None:
    c = openai_client(ollama_backend, "oa-media")
    seen = c.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}}]}])
    assert seen.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as remote:
        c.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    assert "data URI" in remote.value.message
    shaped = c.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "weather"}],
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}})
    assert set(json.loads(shaped.choices[0].message.content or "")) >= {"city", "days"}


def test_openai_errors_come_back_in_openai_shape(ollama_backend: Stack) -> None:
    failing = openai.OpenAI(base_url=ollama_backend.url + "/v1", api_key="x", max_retries=0,
                            default_headers={"X-Sim-Fault": "status:500"})
    with pytest.raises(openai.InternalServerError) as broken:
        failing.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "x"}])
    assert isinstance(broken.value.body, dict) and broken.value.body.get("message")
    mid = openai.OpenAI(base_url=ollama_backend.url + "/v1", api_key="x", max_retries=0,
                        default_headers={"X-Sim-Fault": "mid-stream-error"})
    with pytest.raises(openai.APIError):
        list(mid.chat.completions.create(model="llama3.2", stream=True,
                                         messages=[{"role": "user", "content": "x"}]))
    with pytest.raises(openai.BadRequestError):
        openai_client(ollama_backend, "oa-err").chat.completions.create(
            model="llama3.2", n=2, messages=[{"role": "user", "content": "x"}])


def test_leaving_a_translated_openai_stream_cancels_the_backend(ollama_backend: Stack) -> None:
    body = orjson.dumps({"model": "llama3.2", "stream": True,
                         "messages": [{"role": "user", "content": "long"}]})
    _cancel_translated_stream(ollama_backend, b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
                              b"X-Sim-Tokens: 100000\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))


def test_native_openai_and_ollama_requests_are_not_translated() -> None:
    st = start_stack(sims=[fast_sim_options(tokens=4)])  # both APIs: nothing to translate
    try:
        for path, body in (("/api/chat", {"model": "llama3.2", "stream": False}),
                           ("/v1/chat/completions", {"model": "llama3.2"})):
            r = httpx.post(st.url + path, json={**body, "messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 200 and "x-translated" not in r.headers
    finally:
        st.close()



def test_a_mixed_fleet_routes_by_model_and_translates_only_where_needed() -> None:
    st = start_stack(sims=[fast_sim_options(api="ollama", tokens=4, models=["llama3.2"]),
                           fast_sim_options(api="openai", tokens=4, models=["qwen2.5:0.5b"])])
    try:
        ollama_url, openai_url = (sim.url for sim in st.sims)
        c = ollama_client(st, "mixed")
        names = {m.model for m in c.list().models}
        assert {"llama3.2:latest", "qwen2.5:0.5b"} <= names
        for model, backend, translated in (("llama3.2", ollama_url, None),
                                           ("qwen2.5:0.5b", openai_url, "ollama->openai")):
            r = httpx.post(st.url + "/api/chat", json={
                "model": model, "stream": False, "messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 200 and r.json()["done"] is True
            assert r.headers["x-gateway-backend"] == backend
            assert r.headers.get("x-translated") == translated
        # OpenAI clients: the OpenAI server directly, the Ollama without /v1 translated.
        ai = openai_client(st, "mixed")
        for model, backend, translated in (("qwen2.5:0.5b", openai_url, None),
                                           ("llama3.2", ollama_url, "openai->ollama")):
            raw = ai.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "x"}])
            assert raw.headers["x-gateway-backend"] == backend
            assert raw.headers.get("x-translated") == translated
            assert raw.parse().choices[0].message.content
    finally:
        st.close()


def test_a_native_body_is_translated_as_go_reads_it(openai_backend: Stack) -> None:
    # Go matches field names in any case and merges a repeated object: the
    # translation reads the same, so the model routed on and the cap the
    # gateway applied are the ones the OpenAI server gets.
    st = openai_backend
    body = (b'{"MODEL":"llama3.2","Messages":[{"ROLE":"user","Content":"hi"}],'
            b'"stream":false,"Options":{"num_predict":3},"options":{"temperature":0.1}}')
    r = httpx.post(st.url + "/api/chat", content=body, timeout=10,
                   headers={"Content-Type": "application/json", "X-User-ID": "go-case"})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["eval_count"] == 3 and answer["done_reason"] == "length", answer
    assert r.headers["x-translated"] == "ollama->openai"
