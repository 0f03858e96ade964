"""The official `ollama` and `openai` Python clients against the gateway, every route."""

from __future__ import annotations

import hashlib

import httpx
import ollama
import openai
import pytest
from harness import Stack, start_stack


@pytest.fixture(scope="module")
def stack() -> Stack:
    st = start_stack()
    yield st
    st.close()


@pytest.fixture()
def oc(stack: Stack) -> ollama.Client:
    return ollama.Client(host=stack.url, headers={"X-User-ID": "client-tests"})


@pytest.fixture()
def ai(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="test", max_retries=0)


def test_list_merges_backend_models(oc: ollama.Client) -> None:
    names = {m.model for m in oc.list().models}
    assert {"llama3.2:latest", "qwen2.5:0.5b", "all-minilm:latest"} <= names


def test_chat_non_stream(oc: ollama.Client) -> None:
    r = oc.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    assert r.done is True
    assert r.message.role == "assistant"
    assert r.message.content
    assert r.eval_count == 8


def test_chat_stream_tokens_arrive_in_order(oc: ollama.Client) -> None:
    parts = list(oc.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    whole = oc.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].done_reason == "stop"


def test_generate_stream_and_non_stream(oc: ollama.Client) -> None:
    r = oc.generate(model="llama3.2", prompt="Why is the sky blue?")
    streamed = list(oc.generate(model="llama3.2", prompt="Why is the sky blue?", stream=True))
    assert "".join(p.response for p in streamed) == r.response
    assert streamed[-1].done and streamed[-1].eval_count == r.eval_count


def test_generate_load_answer_is_one_object(oc: ollama.Client) -> None:
    r = oc.generate(model="llama3.2", prompt="")
    assert r.done and r.done_reason == "load"


def test_chat_with_tools(oc: ollama.Client) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "w",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                             "required": ["city"]}}}]
    r = oc.chat(model="llama3.2", messages=[{"role": "user", "content": "get_weather please"}],
                tools=tools)
    assert r.message.tool_calls
    assert r.message.tool_calls[0].function.name == "get_weather"


def test_embed_and_embeddings(oc: ollama.Client) -> None:
    r = oc.embed(model="all-minilm", input=["a", "b"])
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) > 8
    legacy = oc.embeddings(model="all-minilm", prompt="a")
    assert len(legacy.embedding) > 8


def test_show_ps_version(oc: ollama.Client, stack: Stack) -> None:
    shown = oc.show("llama3.2")
    assert "completion" in (shown.capabilities or [])
    assert shown.modelinfo is not None
    oc.generate(model="llama3.2", prompt="warm up")
    assert any(m.model.startswith("llama3.2") for m in oc.ps().models)
    assert httpx.get(stack.url + "/api/version").json()["version"]


def test_pull_copy_delete_cycle(oc: ollama.Client) -> None:
    assert oc.pull("tinyllama").status == "success"
    # Usable at once: the gateway notes the new model before the next probe.
    assert oc.generate(model="tinyllama", prompt="hi").done
    assert oc.copy("tinyllama", "tinycopy").status == "success"
    assert oc.chat(model="tinycopy", messages=[{"role": "user", "content": "x"}]).done
    assert oc.delete("tinycopy").status == "success"
    with pytest.raises(ollama.ResponseError) as err:
        oc.chat(model="tinycopy", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404


def test_pull_stream_progress(oc: ollama.Client) -> None:
    statuses = [p.status for p in oc.pull("other-model", stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"


def test_pull_failure_relayed(oc: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        oc.pull("nonexistent-model")
    assert "file does not exist" in str(err.value)


def test_create_from_blob(oc: ollama.Client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = b"GGUF" + bytes(range(256)) * 400
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    digest = oc.create_blob(path)
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    r = oc.create(model="made-here", files={"model.gguf": digest})
    assert r.status == "success"
    assert oc.generate(model="made-here", prompt="hi").done


def test_push(oc: ollama.Client) -> None:
    assert oc.push("llama3.2").status == "success"


def test_unknown_model_is_404_not_a_hang(oc: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        oc.chat(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404
    assert "no-such-model" in err.value.error


def test_openai_models(ai: openai.OpenAI) -> None:
    ids = {m.id for m in ai.models.list().data}
    assert "llama3.2:latest" in ids
    m = ai.models.retrieve("llama3.2")
    assert m.id == "llama3.2" and m.object == "model"
    with pytest.raises(openai.NotFoundError):
        ai.models.retrieve("missing-model")


def test_openai_chat_non_stream_and_stream(ai: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    full = ai.chat.completions.create(model="llama3.2", messages=msgs)  # type: ignore[arg-type]
    assert full.choices[0].message.content
    assert full.usage is not None and full.usage.completion_tokens == 8
    chunks = list(ai.chat.completions.create(
        model="llama3.2", messages=msgs, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_openai_completions_and_embeddings(ai: openai.OpenAI) -> None:
    c = ai.completions.create(model="llama3.2", prompt="Say hi")
    assert c.choices[0].text
    e = ai.embeddings.create(model="all-minilm", input=["a", "b"])
    assert len(e.data) == 2 and len(e.data[0].embedding) > 8


def test_openai_errors_have_openai_shape(ai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        ai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert "nope" in err.value.message
    body = err.value.body
    assert isinstance(body, dict) and body.get("type") == "not_found_error"


def test_async_ollama_client(stack: Stack) -> None:
    import asyncio

    async def run() -> list[str]:
        clients = [ollama.AsyncClient(host=stack.url, headers={"X-User-ID": f"user{k}"})
                   for k in range(3)]
        outs = await asyncio.gather(*(
            clients[i % 3].chat(model="llama3.2", messages=[{"role": "user", "content": f"q{i}"}])
            for i in range(12)
        ))
        return [o.message.content for o in outs]

    outs = asyncio.run(run())
    assert len(outs) == 12 and all(outs)


def test_root_and_health(stack: Stack) -> None:
    r = httpx.get(stack.url + "/")
    assert r.status_code == 200 and r.text == "Ollama is running"
    h = httpx.head(stack.url + "/")
    assert h.status_code == 200 and h.headers["content-length"] == str(len("Ollama is running"))
    health = httpx.get(stack.url + "/health").json()
    assert health["status"] == "ok" and health["backends_online"] == 1
