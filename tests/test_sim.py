"""The backend simulator (`ollamamq_fast.sim`) against docs/protocol-notes.md.

The simulators run in a background thread with their own loop, so the official
`ollama` and `openai` clients and raw sockets are used exactly as users do.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Self

import ollama
import openai
import pytest

from ollamamq_fast.sim import SimOptions, SimServer, start_sim
from ollamamq_fast.sim.cli import add_arguments
from ollamamq_fast.sim.content import word_tokens
from ollamamq_fast.sim.faults import parse_faults
from ollamamq_fast.sim.gojson import BodyError, decode_object, dumps
from ollamamq_fast.sim.models import parse_go_duration, parse_keep_alive, parse_name

pytestmark = pytest.mark.timeout(20)


# -- background loop and simulators ---------------------------------------------


class LoopThread:
    """An event loop in a daemon thread; simulators live on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        """Run a coroutine on the loop and wait for it."""
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def now(self) -> float:
        """loop.time() as the simulator sees it."""

        async def read() -> float:
            return self.loop.time()

        return float(self.run(read()))

    def stop(self) -> None:
        """Stop the loop and join the thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def lt() -> Iterator[LoopThread]:
    """One loop thread for the whole module."""
    thread = LoopThread()
    yield thread
    thread.stop()


def start(lt: LoopThread, **overrides: Any) -> SimServer:
    """A simulator with quick test defaults."""
    options = SimOptions(**{"ttft_ms": 5.0, "tokens_per_s": 400.0, "tokens": 8, **overrides})
    return lt.run(start_sim(options))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def sim(lt: LoopThread) -> Iterator[SimServer]:
    """The shared default simulator (tests that change models use their own)."""
    server = start(lt)
    yield server
    lt.run(server.close())


@pytest.fixture()
def own(lt: LoopThread) -> Iterator[Any]:
    """Factory for per-test simulators, closed afterwards."""
    made: list[SimServer] = []

    def make(**overrides: Any) -> SimServer:
        server = start(lt, **overrides)
        made.append(server)
        return server

    yield make
    for server in made:
        lt.run(server.close())


def wait_for(pred: Any, timeout: float = 3.0) -> bool:
    """Poll `pred` until it is true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.002)
    return bool(pred())


# -- a raw HTTP/1.1 client ------------------------------------------------------


@dataclass
class Response:
    """One parsed response, with chunk boundaries kept."""

    status: int
    headers: dict[str, str]
    head: bytes
    body: bytes = b""
    chunks: list[bytes] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)
    complete: bool = True

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)

    def lines(self) -> list[Any]:
        """NDJSON lines as objects."""
        return [json.loads(line) for line in self.body.split(b"\n") if line]

    def events(self) -> list[bytes]:
        """SSE data payloads."""
        return [e[len(b"data: "):] for e in self.body.split(b"\n\n") if e]


class Conn:
    """A keep-alive socket that reads responses one at a time."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.data = bytearray()
        self.pos = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    @property
    def buf(self) -> bytes:
        """Received bytes not consumed yet."""
        return bytes(self.data[self.pos:])

    def send(self, data: bytes) -> None:
        """Write raw bytes."""
        self.sock.sendall(data)

    def _fill(self) -> None:
        if self.pos > 1 << 20:
            del self.data[: self.pos]
            self.pos = 0
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError("connection closed")
        self.data += data

    def _take(self, n: int) -> bytes:
        while len(self.data) - self.pos < n:
            self._fill()
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def _until(self, sep: bytes) -> bytes:
        while True:
            end = self.data.find(sep, self.pos)
            if end >= 0:
                out = bytes(self.data[self.pos : end])
                self.pos = end + len(sep)
                return out
            self._fill()

    def closed(self, timeout: float = 2.0) -> bool:
        """True if the server closes the connection (after any buffered bytes)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.data += data
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def response(self, head_only: bool = False) -> Response:
        """Read one response (HEAD: no body whatever the headers say)."""
        raw = self._until(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        resp = Response(status, headers, raw)
        if head_only or 100 <= status < 200 or status in (204, 304):
            return resp
        if "content-length" in headers:
            resp.body = self._take(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            try:
                while True:
                    size = int(self._until(b"\r\n").split(b";")[0], 16)
                    if size == 0:
                        self._until(b"\r\n")
                        break
                    resp.chunks.append(self._take(size))
                    self._take(2)
                    resp.chunk_times.append(time.monotonic())
            except EOFError:
                resp.complete = False
            resp.body = b"".join(resp.chunks)
        else:
            try:
                while True:
                    self._fill()
            except EOFError:
                resp.body = self.buf
                self.pos = len(self.data)
        return resp


def request(method: str, path: str, body: Any = None, headers: list[str] | None = None) -> bytes:
    """Build request bytes (a dict body is JSON-encoded)."""
    data = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"] + (headers or [])
    if body is not None:
        head.append(f"Content-Length: {len(data)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


def call(port: int, method: str, path: str, body: Any = None, headers: list[str] | None = None) -> Response:
    """One request on a fresh connection."""
    with Conn(port) as conn:
        conn.send(request(method, path, body, headers))
        return conn.response(head_only=method == "HEAD")


CHAT: dict[str, Any] = {"model": "llama3.2", "messages": [{"role": "user", "content": "Why is the sky blue?"}]}
GEN: dict[str, Any] = {"model": "llama3.2", "prompt": "Why is the sky blue?"}


# -- pure helpers (no I/O) -------------------------------------------------------


def test_name_normalization() -> None:
    keys = {parse_name(n).key for n in ("llama3.2", "LLaMA3.2", "llama3.2:latest", "library/llama3.2",
                                         "registry.ollama.ai/library/llama3.2:latest", " llama3.2 ")}
    assert len(keys) == 1
    assert parse_name("hf.co/user/model:q4").display() == "hf.co/user/model:q4"
    assert parse_name("ns/model").display() == "ns/model:latest"
    assert parse_name("") is None and parse_name("a/b/c/d") is None and parse_name("bad name") is None


def test_go_duration_and_keep_alive() -> None:
    assert parse_go_duration("5m") == 300 and parse_go_duration("1h30m") == 5400 and parse_go_duration("0") == 0
    assert parse_keep_alive(0) == 0 and parse_keep_alive(-1) == -1 and parse_keep_alive("-1m") == -1
    with pytest.raises(BodyError, match='missing unit in duration "10"'):
        parse_keep_alive("10")
    with pytest.raises(BodyError, match="Unsupported type: 'bool'"):
        parse_keep_alive(True)


def test_go_json_escaping_and_decoding() -> None:
    assert dumps({"t": "<a&b>"}) == b'{"t":"\\u003ca\\u0026b\\u003e"}'
    assert decode_object(b'{"Model":"a","model":"b"} trailing', "x") == {"model": "b"}
    assert decode_object(b"null", "x") == {}
    with pytest.raises(BodyError, match="missing request body"):
        decode_object(b"  ", "x")
    with pytest.raises(BodyError, match="cannot unmarshal array"):
        decode_object(b"[]", "api.ChatRequest")
    # A lone surrogate escape is U+FFFD, keys and nested values too (a valid pair is one).
    assert decode_object(b'{"model":"\\ud800x","\\udfffk":["\\ud83d\\ude00","\\ud83d"]}',
                         "x") == {"model": "\ufffdx", "\ufffdk": ["\U0001f600", "\ufffd"]}


def test_a_lone_surrogate_is_read_as_go_reads_it(sim: SimServer) -> None:
    r = call(sim.port, "POST", "/api/show", b'{"model":"\\ud800"}')
    assert (r.status, r.json()) == (404, {"error": "model '\ufffd' not found"})
    r = call(sim.port, "POST", "/api/generate",
             b'{"model":"llama3.2","prompt":"\\ud800","keep_alive":"5m","stream":false}')
    assert r.status == 200 and r.json()["done"] is True


def test_token_walk_is_lazy_and_consistent() -> None:
    walk = word_tokens("Why is the sky blue?", 3, 10_000_000)
    assert len(walk) == 10_000_000 and walk[0][0].isupper() and walk[1].startswith(" ")
    assert walk[0:300] == [walk[i] for i in range(300)]
    assert walk[9_999_990:] == [walk[i] for i in range(9_999_990, 10_000_000)]
    assert word_tokens("Why is the sky blue?", 3, 5)[0:5] == walk[0:5]


def test_fault_header_parsing() -> None:
    faults = parse_faults(b"die-after:3, split-lines")
    assert faults is not None and faults.die_after == 3 and faults.split_lines
    assert parse_faults(b"status:503").status == 503  # type: ignore[union-attr]
    assert parse_faults(b"nonsense") is None and parse_faults(None) is None


# -- the official ollama client ----------------------------------------------------


def test_ollama_client_list_show_version(sim: SimServer) -> None:
    client = ollama.Client(host=sim.url)
    names = [m.model for m in client.list().models]
    assert names == ["llama3.2:latest", "qwen2.5:0.5b", "all-minilm:latest"]
    show = client.show("llama3.2")
    assert "completion" in show.capabilities and show.details.family == "llama"
    assert show.modelinfo["llama.context_length"] == 131072
    assert show.modelfile.startswith("# Modelfile generated by") and show.template and show.parameters
    assert call(sim.port, "GET", "/api/version").json() == {"version": "0.12.0"}


def test_ollama_client_chat_stream_and_not(sim: SimServer) -> None:
    client = ollama.Client(host=sim.url)
    whole = client.chat(model="llama3.2", messages=CHAT["messages"])
    assert whole.done and whole.done_reason == "stop" and whole.eval_count == 8
    parts = list(client.chat(model="llama3.2", messages=CHAT["messages"], stream=True))
    assert len(parts) == 9 and parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].total_duration >= parts[-1].eval_duration > 0
    ps = client.ps()
    assert "llama3.2:latest" in [m.model for m in ps.models]


def test_ollama_client_generate(sim: SimServer) -> None:
    client = ollama.Client(host=sim.url)
    whole = client.generate(model="llama3.2", prompt="Why is the sky blue?", options={"num_predict": 3})
    assert whole.done_reason == "length" and whole.eval_count == 3 and whole.context
    parts = list(client.generate(model="llama3.2", prompt="Why is the sky blue?", stream=True))
    assert parts[-1].done and parts[-1].context and len(parts) == 9


def test_ollama_client_think_and_tools(sim: SimServer) -> None:
    client = ollama.Client(host=sim.url)
    parts = list(client.chat(model="llama3.2", messages=CHAT["messages"], stream=True, think=True))
    kinds = ["t" if p.message.thinking else "c" if p.message.content else "-" for p in parts]
    assert kinds[0] == "t" and "c" in kinds and kinds.index("c") > max(i for i, k in enumerate(kinds) if k == "t")
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    reply = client.chat(model="llama3.2", messages=[{"role": "user", "content": "get_weather in Paris?"}], tools=tools)
    call_ = reply.message.tool_calls[0]
    assert call_.function.name == "get_weather" and call_.function.arguments == {"city": "Paris"}
    streamed = [p for p in client.chat(model="llama3.2", messages=[{"role": "user", "content": "use a tool"}],
                                       tools=tools, stream=True) if p.message.tool_calls]
    assert len(streamed) == 1 and streamed[0].message.tool_calls[0].function.arguments == {"city": "Tokyo"}
    plain = client.chat(model="llama3.2", messages=[{"role": "user", "content": "hello"}], tools=tools)
    assert not plain.message.tool_calls and plain.message.content


def test_ollama_client_embeddings(sim: SimServer) -> None:
    client = ollama.Client(host=sim.url)
    out = client.embed(model="all-minilm", input=["a", "b"])
    assert len(out.embeddings) == 2 and len(out.embeddings[0]) == 384
    assert abs(math.sqrt(sum(v * v for v in out.embeddings[0])) - 1.0) < 1e-3
    again = client.embed(model="library/all-minilm:latest", input="a")
    assert again.embeddings[0] == out.embeddings[0] and out.embeddings[0] != out.embeddings[1]
    legacy = client.embeddings(model="all-minilm", prompt="a")
    assert len(legacy.embedding) == 384
    assert call(sim.port, "POST", "/api/embed", {"model": "all-minilm", "input": "x", "dimensions": 8}).json()["embeddings"][0].__len__() == 8


def test_ollama_client_model_management(own: Any, tmp_path: Any) -> None:
    server = own(tokens_per_s=0.0)
    client = ollama.Client(host=server.url)
    assert client.pull("tinyllama").status == "success"
    statuses = [p.status for p in client.pull("phi3:mini", stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert client.copy("llama3.2", "mine").status == "success"
    names = [m.model for m in client.list().models]
    assert {"tinyllama:latest", "phi3:mini", "mine:latest"} <= set(names)
    assert client.delete("mine").status == "success"
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("mine")
    assert err.value.status_code == 404
    assert client.push("llama3.2").status == "success"
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(300_000))
    digest = client.create_blob(blob)
    assert digest == "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    assert call(server.port, "HEAD", f"/api/blobs/{digest}").status == 200
    assert client.create(model="custom", files={"model.gguf": digest}).status == "success"
    assert client.create(model="brief", from_="llama3.2", system="Be brief.").status == "success"
    assert client.show("brief").details.family == "llama"
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("missing-model")
    assert err.value.status_code == 500 and "file does not exist" in err.value.error


def test_ollama_client_errors(sim: SimServer) -> None:
    client = ollama.Client(host=sim.url)
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="nope", messages=CHAT["messages"])
    assert err.value.status_code == 404 and err.value.error == "model 'nope' not found"
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="all-minilm", messages=CHAT["messages"])
    assert err.value.status_code == 400 and "does not support chat" in err.value.error


# -- the official openai client ------------------------------------------------------


def test_openai_client_models(sim: SimServer) -> None:
    client = openai.OpenAI(base_url=sim.url + "/v1", api_key="sim")
    ids = [m.id for m in client.models.list()]
    assert "llama3.2:latest" in ids
    model = client.models.retrieve("llama3.2")
    assert model.id == "llama3.2" and model.owned_by == "library"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_openai_client_chat(sim: SimServer) -> None:
    client = openai.OpenAI(base_url=sim.url + "/v1", api_key="sim", max_retries=0)
    whole = client.chat.completions.create(model="llama3.2", messages=CHAT["messages"])
    assert whole.choices[0].finish_reason == "stop" and whole.usage.completion_tokens == 8
    chunks = list(client.chat.completions.create(model="llama3.2", messages=CHAT["messages"], stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 8
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=CHAT["messages"])
    assert "model 'nope' not found" in str(err.value)


def test_openai_client_completions_and_embeddings(sim: SimServer) -> None:
    client = openai.OpenAI(base_url=sim.url + "/v1", api_key="sim", max_retries=0)
    whole = client.completions.create(model="llama3.2", prompt="hi", max_tokens=4)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="llama3.2", prompt="hi", stream=True))
    assert all(c.object == "text_completion" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    floats = client.embeddings.create(model="all-minilm", input=["a", "b"])
    assert len(floats.data) == 2 and len(floats.data[0].embedding) == 384
    raw = call(sim.port, "POST", "/v1/embeddings", {"model": "all-minilm", "input": "a", "encoding_format": "base64"})
    packed = base64.b64decode(raw.json()["data"][0]["embedding"])
    assert struct.unpack("<384f", packed)[0] == pytest.approx(floats.data[0].embedding[0], abs=1e-6)


# -- wire details with raw sockets ---------------------------------------------------


def test_stream_framing_is_one_ndjson_line_per_chunk(sim: SimServer) -> None:
    r = call(sim.port, "POST", "/api/chat", CHAT)
    assert r.status == 200 and r.headers["content-type"] == "application/x-ndjson"
    assert r.headers["transfer-encoding"] == "chunked" and "content-length" not in r.headers
    assert all(c.endswith(b"\n") and c.count(b"\n") == 1 for c in r.chunks)
    lines = r.lines()
    assert [ln["done"] for ln in lines] == [False] * 8 + [True]
    final = lines[-1]
    for key in ("done_reason", "total_duration", "load_duration", "prompt_eval_count",
                "prompt_eval_duration", "eval_count", "eval_duration"):
        assert key in final
    assert final["message"] == {"role": "assistant", "content": ""}


def test_non_stream_json_and_determinism(sim: SimServer) -> None:
    body = {**GEN, "stream": False, "options": {"seed": 7}}
    a, b = call(sim.port, "POST", "/api/generate", body), call(sim.port, "POST", "/api/generate", body)
    assert a.headers["content-type"] == "application/json; charset=utf-8" and "content-length" in a.headers
    assert a.json()["response"] == b.json()["response"]
    other = call(sim.port, "POST", "/api/generate", {**body, "options": {"seed": 8}})
    assert other.json()["response"] != a.json()["response"]


def test_stream_defaults_and_load_unload_forms(sim: SimServer) -> None:
    assert call(sim.port, "POST", "/api/generate", {**GEN, "stream": None}).headers["content-type"] == "application/x-ndjson"
    r = call(sim.port, "POST", "/api/generate", {"model": "llama3.2"})
    assert r.headers["content-type"] == "application/json; charset=utf-8"
    assert r.json()["done_reason"] == "load" and r.json()["response"] == ""
    r = call(sim.port, "POST", "/api/chat", {"model": "qwen2.5:0.5b", "messages": []})
    assert r.json()["done_reason"] == "load" and r.json()["message"] == {"role": "assistant", "content": ""}
    assert "qwen2.5:0.5b" in [m["name"] for m in call(sim.port, "GET", "/api/ps").json()["models"]]
    r = call(sim.port, "POST", "/api/chat", {"model": "qwen2.5:0.5b", "messages": [], "keep_alive": 0})
    assert r.json()["done_reason"] == "unload"
    assert "qwen2.5:0.5b" not in [m["name"] for m in call(sim.port, "GET", "/api/ps").json()["models"]]


def test_request_errors(sim: SimServer) -> None:
    r = call(sim.port, "POST", "/api/chat", b"")
    assert (r.status, r.json()) == (400, {"error": "missing request body"})
    assert call(sim.port, "POST", "/api/chat", b"{bad").status == 400
    r = call(sim.port, "POST", "/api/chat", {**CHAT, "stream": "false"})
    assert r.status == 400 and "cannot unmarshal string" in r.json()["error"]
    r = call(sim.port, "POST", "/api/chat", {**CHAT, "model": ""})
    assert (r.status, r.json()) == (400, {"error": "model is required"})
    r = call(sim.port, "POST", "/api/generate", {**GEN, "model": "nope"})
    assert r.status == 404 and r.body == b'{"error":"model \'nope\' not found"}'
    r = call(sim.port, "POST", "/api/copy", {"source": "nope", "destination": "x"})
    assert r.status == 404 and r.json() == {"error": 'model "nope" not found'}
    r = call(sim.port, "POST", "/api/chat", {**CHAT, "think": "loud"})
    assert r.status == 400 and r.json()["error"].startswith('invalid think value: "loud"')
    r = call(sim.port, "POST", "/v1/chat/completions", {"model": "nope", "messages": CHAT["messages"]})
    assert r.status == 404 and r.body.endswith(b"\n") and r.headers["content-type"] == "application/json"
    assert r.json() == {"error": {"message": "model 'nope' not found", "type": "not_found_error", "param": None, "code": None}}
    r = call(sim.port, "POST", "/v1/chat/completions", {"model": "llama3.2", "messages": []})
    assert r.status == 400 and r.json()["error"]["message"] == "[] is too short - 'messages'"


def test_model_names_match_case_insensitively(sim: SimServer) -> None:
    for name in ("LLaMA3.2", "library/llama3.2", "registry.ollama.ai/library/llama3.2:latest"):
        assert call(sim.port, "POST", "/api/show", {"model": name}).status == 200, name


def test_404_405_and_trailing_slash(sim: SimServer) -> None:
    r = call(sim.port, "GET", "/nope")
    assert (r.status, r.body, r.headers["content-type"]) == (404, b"404 page not found", "text/plain")
    r = call(sim.port, "GET", "/api/chat")
    assert (r.status, r.body) == (405, b"405 method not allowed")
    r = call(sim.port, "GET", "/api/tags/")
    assert r.status == 301 and r.headers["location"] == "/api/tags"
    assert call(sim.port, "GET", "/v1/models/ns%2Fmodel").status == 404


def test_v1_models_data_null_when_empty(own: Any) -> None:
    server = own(models=[])
    assert call(server.port, "GET", "/v1/models").body == b'{"object":"list","data":null}\n'
    assert call(server.port, "GET", "/api/tags").json() == {"models": []}


def test_go_escapes_on_the_wire(sim: SimServer) -> None:
    r = call(sim.port, "POST", "/api/show", {"model": "llama3.2"})
    assert b"\\u003c|start_header_id|\\u003e" in r.body and b"<|" not in r.body
    # Bodies over Go's 2 KiB buffer come back chunked, as from Go's net/http.
    big = call(sim.port, "POST", "/api/show", {"model": "llama3.2", "verbose": True})
    assert big.headers.get("transfer-encoding") == "chunked" and len(big.json()["model_info"]["tokenizer.ggml.tokens"]) > 1000


def test_head_requests(sim: SimServer) -> None:
    with Conn(sim.port) as conn:
        conn.send(request("HEAD", "/"))
        r = conn.response(head_only=True)
        assert r.status == 200 and r.headers["content-length"] == "17"
        conn.send(request("HEAD", "/api/version") + request("GET", "/"))
        assert conn.response(head_only=True).status == 200
        after = conn.response()
        assert after.body == b"Ollama is running"


def test_keep_alive_across_kinds_of_responses(sim: SimServer) -> None:
    with Conn(sim.port) as conn:
        for req, head_only in [
            (request("POST", "/api/chat", CHAT), False),
            (request("HEAD", "/api/tags"), True),
            (request("GET", "/missing"), False),
            (request("POST", "/api/copy", {"source": "llama3.2", "destination": "ka-copy"}), False),
            (request("DELETE", "/api/delete", {"model": "ka-copy"}), False),
            (request("POST", "/api/chat", {**CHAT, "stream": False}), False),
        ]:
            conn.send(req)
            r = conn.response(head_only=head_only)
            assert r.status in (200, 404), r.head
        assert r.json()["done"] is True


def test_connection_close_and_http10(sim: SimServer) -> None:
    with Conn(sim.port) as conn:
        conn.send(request("GET", "/api/version", headers=["Connection: close"]))
        r = conn.response()
        assert r.headers["connection"] == "close" and conn.closed()
    with Conn(sim.port) as conn:
        conn.send(b"GET / HTTP/1.0\r\n\r\n")
        assert conn.response().body == b"Ollama is running" and conn.closed()


def test_pipelined_requests_answered_in_order(sim: SimServer) -> None:
    with Conn(sim.port) as conn:
        conn.send(request("POST", "/api/chat", CHAT) + request("GET", "/api/version")
                  + request("POST", "/api/generate", {**GEN, "stream": False}))
        assert conn.response().lines()[-1]["done"] is True
        assert conn.response().json() == {"version": "0.12.0"}
        assert conn.response().json()["done"] is True


def test_chunked_request_body(sim: SimServer) -> None:
    body = json.dumps({**CHAT, "stream": False}).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7)) + b"0\r\n\r\n"
    with Conn(sim.port) as conn:
        conn.send(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
        assert conn.response().json()["done"] is True


def test_expect_100_continue(sim: SimServer) -> None:
    body = json.dumps({**CHAT, "stream": False}).encode()
    with Conn(sim.port) as conn:
        conn.send(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert conn.response().status == 100
        conn.send(body)
        assert conn.response().json()["done"] is True
    data = os.urandom(1000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert call(sim.port, "POST", f"/api/blobs/{digest}", data).status == 201
    with Conn(sim.port) as conn:
        # An existing blob: 200 at once, no 100 Continue, body never read, connection closed.
        conn.send(b"POST /api/blobs/%s HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1000\r\n\r\n" % digest.encode())
        r = conn.response()
        assert r.status == 200 and r.body == b""
        assert conn.closed()


def test_expect_100_continue_refused_without_reading_the_body(sim: SimServer) -> None:
    with Conn(sim.port) as conn:
        conn.send(b"POST /api/nope HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 100\r\n\r\n")
        r = conn.response()
        assert (r.status, r.body) == (404, b"404 page not found") and conn.closed()


def test_blobs(sim: SimServer) -> None:
    data = os.urandom(5000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert call(sim.port, "HEAD", f"/api/blobs/{digest}").status == 404
    assert call(sim.port, "POST", "/api/blobs/sha256:123", data).status == 400
    wrong = "sha256:" + "0" * 64
    r = call(sim.port, "POST", f"/api/blobs/{wrong}", data)
    assert r.status == 400 and r.json()["error"].startswith(f'digest mismatch, expected "{wrong}"')
    assert call(sim.port, "POST", f"/api/blobs/{digest}", data).status == 201
    assert call(sim.port, "HEAD", f"/api/blobs/{digest.replace(':', '-')}").status == 200


def test_large_blob_is_hashed_while_streaming(sim: SimServer) -> None:
    piece = os.urandom(1 << 20)
    count = 64
    digest = hashlib.sha256()
    for _ in range(count):
        digest.update(piece)
    name = "sha256:" + digest.hexdigest()
    with Conn(sim.port, timeout=15) as conn:
        conn.send(b"POST /api/blobs/%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (name.encode(), count * len(piece)))
        for _ in range(count):
            conn.send(piece)
        assert conn.response().status == 201


def test_fifty_megabyte_body(sim: SimServer) -> None:
    image = base64.b64encode(b"\0" * (37 << 20)).decode()
    body = {**CHAT, "stream": False, "messages": [{"role": "user", "content": "what is this", "images": [image]}]}
    with Conn(sim.port, timeout=15) as conn:
        conn.send(request("POST", "/api/chat", body))
        assert conn.response().json()["done"] is True


def test_max_parallel_answers_503(own: Any) -> None:
    server = own(max_parallel=1, tokens_per_s=50.0, tokens=50)
    with Conn(server.port) as busy:
        busy.send(request("POST", "/api/chat", CHAT))
        assert wait_for(lambda: server.stats.active == 1)
        r = call(server.port, "POST", "/api/chat", CHAT)
        assert r.status == 503
        assert r.body == b'{"error":"server busy, please try again.  maximum pending requests exceeded"}'
        assert call(server.port, "GET", "/api/tags").status == 200


def test_api_modes(own: Any) -> None:
    only_openai = own(api="openai")
    assert call(only_openai.port, "GET", "/api/tags").status == 404
    assert call(only_openai.port, "GET", "/").body == b"404 page not found"
    assert call(only_openai.port, "GET", "/v1/models").status == 200
    only_ollama = own(api="ollama")
    assert call(only_ollama.port, "GET", "/v1/models").status == 404
    assert call(only_ollama.port, "GET", "/api/tags").status == 200


# -- pacing, throughput, backpressure, cancellation -------------------------------------


def test_pacing_follows_ttft_and_rate(own: Any) -> None:
    server = own(ttft_ms=80.0, tokens_per_s=50.0, tokens=5)
    start_ = time.monotonic()
    with Conn(server.port) as conn:
        conn.send(request("POST", "/api/chat", CHAT))
        r = conn.response()
    first = r.chunk_times[0] - start_
    total = r.chunk_times[-1] - start_
    assert 0.07 <= first < 0.5, first
    # Five tokens then the done line: 5 intervals of 20 ms after the first token.
    assert 0.08 <= total - first < 0.6, total - first
    whole_start = time.monotonic()
    assert call(server.port, "POST", "/api/chat", {**CHAT, "stream": False}).status == 200
    assert time.monotonic() - whole_start >= 0.17


def test_fast_lane_replays_identical_requests(own: Any) -> None:
    server = own(ttft_ms=0.0, tokens_per_s=0.0)
    body = {**GEN, "stream": False}
    first = call(server.port, "POST", "/api/generate", body).json()
    assert len(server.app.fastlane.recipes) == 1
    again = call(server.port, "POST", "/api/generate", body).json()
    assert again["response"] == first["response"] and again["context"] == first["context"]
    assert again["created_at"] != first["created_at"] and server.stats.requests == 2
    # Deleting the model invalidates the remembered answer.
    assert call(server.port, "DELETE", "/api/delete", {"model": "llama3.2"}).status == 200
    assert call(server.port, "POST", "/api/generate", body).status == 404


def test_delay_header(sim: SimServer) -> None:
    begin = time.monotonic()
    assert call(sim.port, "GET", "/api/version", headers=["X-Sim-Delay-Ms: 150"]).status == 200
    assert time.monotonic() - begin >= 0.14


def test_unpaced_mode_writes_many_lines_fast(own: Any) -> None:
    server = own(ttft_ms=0.0, tokens_per_s=0.0)
    begin = time.monotonic()
    r = call(server.port, "POST", "/api/generate", GEN, ["X-Sim-Tokens: 200000"])
    elapsed = time.monotonic() - begin
    lines = r.body.count(b"\n")
    assert lines == 200_001 and len(r.chunks) == lines
    assert elapsed < 5.0


def test_slow_reader_does_not_grow_server_buffer(own: Any, lt: LoopThread) -> None:
    server = own(ttft_ms=0.0, tokens_per_s=0.0)
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(request("POST", "/api/chat", CHAT, ["X-Sim-Tokens: 5000000"]))
    time.sleep(0.5)

    async def buffered() -> int:
        return max(c.transport.get_write_buffer_size() for c in server.app.connections if c.transport)

    assert lt.run(buffered()) < 4 << 20
    assert server.stats.lines < 5_000_000
    sock.close()
    assert wait_for(lambda: server.stats.cancelled == 1)


def test_client_close_cancels_within_50ms(own: Any, lt: LoopThread) -> None:
    server = own(tokens_per_s=20.0, tokens=200)
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(request("POST", "/api/chat", CHAT))
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    closed_at = lt.now()
    sock.close()
    assert wait_for(lambda: server.stats.cancelled == 1)
    assert server.stats.cancel_times[-1] - closed_at < 0.05
    assert server.stats.connection_close_times and server.stats.active == 0
    # Non-stream: the close is seen while the answer is still being "generated".
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(request("POST", "/api/chat", {**CHAT, "stream": False}))
    assert wait_for(lambda: server.stats.active == 1)
    sock.close()
    assert wait_for(lambda: server.stats.cancelled == 2) and server.stats.active == 0


# -- fault injection --------------------------------------------------------------------


def test_fault_die_after(sim: SimServer) -> None:
    for path, body in (("/api/chat", CHAT), ("/v1/chat/completions", {**CHAT, "stream": True})):
        with Conn(sim.port) as conn:
            conn.send(request("POST", path, body, ["X-Sim-Fault: die-after:3"]))
            r = conn.response()
            assert r.status == 200 and not r.complete and len(r.chunks) == 3


def test_fault_split_lines(sim: SimServer) -> None:
    with Conn(sim.port) as conn:
        conn.send(request("POST", "/api/chat", {**CHAT, "options": {"num_predict": 2}}, ["X-Sim-Fault: split-lines"]))
        r = conn.response()
    assert len(r.chunks) == 6 and not r.chunks[0].endswith(b"\n") and r.chunks[1].endswith(b"\n")
    assert r.chunk_times[1] - r.chunk_times[0] >= 0.015
    assert [ln["done"] for ln in r.lines()] == [False, False, True]


def test_fault_status(sim: SimServer) -> None:
    r = call(sim.port, "POST", "/api/chat", CHAT, ["X-Sim-Fault: status:503"])
    assert r.status == 503 and "server busy" in r.json()["error"]
    r = call(sim.port, "POST", "/v1/chat/completions", CHAT, ["X-Sim-Fault: status:500"])
    assert r.status == 500 and r.json()["error"]["type"] == "api_error"


def test_fault_hang_and_close(own: Any) -> None:
    server = own()
    with Conn(server.port, timeout=0.3) as conn:
        conn.send(request("POST", "/api/chat", CHAT, ["X-Sim-Fault: hang"]))
        with pytest.raises(TimeoutError):
            conn.response()
        # A hung generation is still in progress on the backend.
        assert server.stats.active == 1
    assert wait_for(lambda: server.stats.cancelled == 1) and server.stats.active == 0
    with Conn(server.port) as conn:
        conn.send(request("POST", "/api/chat", CHAT, ["X-Sim-Fault: close"]))
        assert conn.closed() and conn.buf == b""


def test_fault_hang_body(sim: SimServer) -> None:
    with Conn(sim.port) as conn:
        conn.send(request("POST", "/api/chat", CHAT, ["X-Sim-Fault: hang-body"]))
        r = conn.response(head_only=True)
        assert r.status == 200
        assert not conn.closed(timeout=0.3)
        assert conn.buf.count(b'"done":false') == 1 and b'"done":true' not in conn.buf


def test_fault_mid_stream_error(sim: SimServer) -> None:
    r = call(sim.port, "POST", "/api/chat", CHAT, ["X-Sim-Fault: mid-stream-error"])
    lines = r.lines()
    assert r.complete and len(lines) == 3
    assert lines[-1] == {"error": "an error was encountered while running the model"}
    client = ollama.Client(host=sim.url, headers={"X-Sim-Fault": "mid-stream-error"})
    with pytest.raises(ollama.ResponseError):
        list(client.chat(model="llama3.2", messages=CHAT["messages"], stream=True))
    r = call(sim.port, "POST", "/api/chat", {**CHAT, "stream": False}, ["X-Sim-Fault: mid-stream-error"])
    assert r.status == 500
    events = call(sim.port, "POST", "/v1/chat/completions", {**CHAT, "stream": True},
                  ["X-Sim-Fault: mid-stream-error"]).events()
    assert len(events) == 3 and json.loads(events[-1])["error"]["type"] == "api_error"


# -- command line -------------------------------------------------------------------------


def test_cli_help_and_bad_values() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = parser.format_help()
    for flag in ("--port", "--host", "--models", "--ttft-ms", "--tokens-per-s", "--tokens", "--max-parallel", "--api"):
        assert flag in text
    assert "default: 11434" in text and "default: both" in text
    args = parser.parse_args(["-p", "0", "--models", "a,b", "--api", "openai"])
    assert args.models == ["a", "b"] and args.api == "openai"
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--tokens-per-s", "-1"])
    assert exit_.value.code == 2


def test_cli_runs_and_stops_on_sigterm() -> None:
    code = ("import argparse,sys; from ollamamq_fast.sim.cli import add_arguments, run; "
            "p=argparse.ArgumentParser(); add_arguments(p); sys.exit(run(p.parse_args()))")
    proc = subprocess.Popen([sys.executable, "-c", code, "-p", "0", "--models", "m1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("ollamamq-fast sim listening on http://127.0.0.1:") and "(models: m1)" in line
        port = int(line.split(":")[2].split()[0])
        assert call(port, "GET", "/").body == b"Ollama is running"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
