"""Official clients' calls that tests/test_clients.py does not make, as an outside suite would.

The JavaScript clients (npm `ollama`, `openai`) are reproduced here by the bytes
they send (captured from ollama 0.6.4 and openai 6.49.0 on Node 20), so no
Node or npm is needed.
"""

from __future__ import annotations

import httpx
import openai
import pytest
from harness import Stack, fast_sim_options, start_stack

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
