"""The tricky cases of docs/protocol-notes.md §7, one raw-socket test each, against a real gateway.

Clients here are plain sockets so that every byte the gateway writes is seen:
framing, blank lines, 1xx heads, what happens to the connection afterwards.
Backends are the simulator (`ollamamq_fast.sim`), except where the test must see
the exact request bytes the gateway forwards: then a tiny raw-socket
`FakeBackend` records them. Each test names its §7 item.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import orjson
import pytest
from harness import LoopThread, Stack, fast_sim_options, free_port, start_stack

from ollamamq_fast.sim import SimOptions, start_sim

pytestmark = pytest.mark.timeout(60)

# Every socket in this file gives up after this many seconds of silence.
SOCK_TIMEOUT = 10.0
# A disconnect must reach the backend within this (docs/protocol-notes.md §7.10).
CANCEL_BOUND_S = 0.05

MODEL_A = "llama3.2:latest"
MODEL_B = "qwen2.5:0.5b"


# -- a small blocking HTTP/1.1 client ------------------------------------------------


@dataclass
class Resp:
    """One parsed response."""

    status: int
    headers: dict[str, str]  # lower-case names, last value wins
    header_list: list[tuple[str, str]]
    body: bytes
    chunked: bool
    interim: list[int]  # 1xx statuses seen before this response

    def json(self) -> Any:
        return orjson.loads(self.body)

    def lines(self) -> list[Any]:
        """NDJSON body as parsed objects (fails on blank lines)."""
        text = self.body
        assert text.endswith(b"\n"), text[-200:]
        return [orjson.loads(line) for line in text[:-1].split(b"\n")]


class Conn:
    """One client connection; reads responses one at a time and keeps leftovers."""

    def __init__(self, port: int, timeout: float = SOCK_TIMEOUT) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.eof = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            self.eof = True
            raise EOFError("connection closed by the gateway")
        self.buf += data

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def head(self, stop_at_interim: bool = False) -> tuple[int, list[tuple[str, str]], list[int]]:
        """Status and headers of the next response (1xx heads skipped and listed)."""
        interim: list[int] = []
        while True:
            while b"\r\n\r\n" not in self.buf:
                self._fill()
            raw, _, self.buf = self.buf.partition(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ", 2)
            assert parts[0] == "HTTP/1.1", lines[0]
            status = int(parts[1])
            headers = []
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers.append((name.strip().lower(), value.strip()))
            if 100 <= status < 200:
                interim.append(status)
                if stop_at_interim:
                    return status, headers, interim
                continue
            return status, headers, interim

    def chunks(self) -> Iterator[bytes]:
        """Payloads of a chunked body, as they arrive, until the last chunk."""
        while True:
            size = int(self._line().split(b";")[0], 16)
            if size == 0:
                while self._line():  # trailers, then the blank line
                    pass
                return
            data = self._take(size)
            assert self._take(2) == b"\r\n", "chunk not followed by CRLF"
            yield data

    def response(self, head_request: bool = False) -> Resp:
        """Read one whole response."""
        status, header_list, interim = self.head()
        headers = dict(header_list)
        chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        if head_request or status in (204, 304):
            body = b""
        elif chunked:
            body = b"".join(self.chunks())
        elif "content-length" in headers:
            body = self._take(int(headers["content-length"]))
        else:
            try:
                while True:
                    self._fill()
            except EOFError:
                pass
            body, self.buf = self.buf, b""
        return Resp(status, headers, header_list, body, chunked, interim)

    def closed_by_peer(self, wait: float = 1.0) -> bool:
        """True when the gateway has closed (EOF or reset) within `wait` seconds."""
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(SOCK_TIMEOUT)
        if data:
            self.buf += data
            return False
        return True


def req(
    method: str,
    path: str,
    body: Any = None,
    headers: tuple[str, ...] | list[str] = (),
    host: str = "gateway.example.com",
) -> bytes:
    """Raw request bytes; `body` is bytes or a JSON-able object."""
    if body is not None and not isinstance(body, bytes):
        body = orjson.dumps(body)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def call(port: int, method: str, path: str, body: Any = None, headers: tuple[str, ...] | list[str] = ()) -> Resp:
    """One request on a fresh connection."""
    with Conn(port) as c:
        c.send(req(method, path, body, headers))
        return c.response(head_request=method == "HEAD")


def chunked_body(data: bytes, pieces: int = 3) -> bytes:
    """`data` as a chunked request body in `pieces` chunks."""
    step = max(1, len(data) // pieces + 1)
    out = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in (data[i : i + step] for i in range(0, len(data), step)))
    return out + b"0\r\n\r\n"


def wait_for(predicate: Any, timeout: float = 3.0, step: float = 0.002) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def loop_now(stack: Stack) -> float:
    return float(stack.lt.call(lambda: stack.lt.loop.time()))


def sse_events(body: bytes) -> list[bytes]:
    """The data payloads of an SSE body; asserts `data: ...\\n\\n` framing throughout."""
    assert body.endswith(b"\n\n"), body[-200:]
    events = body[:-2].split(b"\n\n")
    out = []
    for event in events:
        assert event.startswith(b"data: "), event[:200]
        assert b"\n" not in event, event[:200]
        out.append(event[len(b"data: ") :])
    return out


# -- stacks ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """One simulator with every model; fast tokens."""
    st = start_stack(health_interval=3600.0)
    yield st
    st.close()


@pytest.fixture(scope="module")
def split() -> Iterator[Stack]:
    """Two simulators with different models, so routing shows in X-Gateway-Backend."""
    st = start_stack(
        sims=[fast_sim_options(models=[MODEL_A]), fast_sim_options(models=[MODEL_B, "all-minilm:latest"])],
        health_interval=3600.0,
    )
    yield st
    st.close()


@pytest.fixture(scope="module")
def paced() -> Iterator[Stack]:
    """One simulator writing a token every 50 ms."""
    st = start_stack(sims=[fast_sim_options(tokens_per_s=20.0, tokens=8)], health_interval=3600.0)
    yield st
    st.close()


def backend_of(st: Stack, r: Resp) -> int:
    """Index of the simulator that served a response."""
    urls = [s.url for s in st.sims]
    assert r.headers.get("x-gateway-backend") in urls, (r.status, r.headers, r.body[:300])
    return urls.index(r.headers["x-gateway-backend"])


# -- §7.1, §7.2: stream defaults and one-object load/unload answers -----------------------


@pytest.mark.parametrize("stream", ["absent", "null"])
@pytest.mark.parametrize("path,extra", [("/api/generate", {"prompt": "hi"}),
                                        ("/api/chat", {"messages": [{"role": "user", "content": "hi"}]})])
def test_stream_default_is_ndjson(stack: Stack, path: str, extra: dict, stream: str) -> None:
    body = {"model": "llama3.2", **extra}
    if stream == "null":
        body["stream"] = None
    r = call(stack.port, "POST", path, body)
    assert r.status == 200
    assert r.headers["content-type"] == "application/x-ndjson"
    assert r.chunked
    lines = r.lines()
    assert len(lines) == 9  # 8 tokens + the done line
    assert [x["done"] for x in lines] == [False] * 8 + [True]


def test_stream_default_pull_is_ndjson(stack: Stack) -> None:
    r = call(stack.port, "POST", "/api/pull", {"model": "trap-pulled"})
    assert r.status == 200
    assert r.headers["content-type"] == "application/x-ndjson"
    lines = r.lines()
    assert len(lines) > 1
    assert lines[-1] == {"status": "success"}


def test_stream_false_is_one_json_object(stack: Stack) -> None:
    r = call(stack.port, "POST", "/api/generate", {"model": "llama3.2", "prompt": "hi", "stream": False})
    assert r.status == 200
    assert r.headers["content-type"] == "application/json; charset=utf-8"
    obj = r.json()
    assert obj["done"] is True and obj["response"]


@pytest.mark.parametrize("path,extra,kind", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "chat.completion"),
    ("/v1/completions", {"prompt": "hi"}, "text_completion"),
])
def test_v1_default_is_not_streamed(stack: Stack, path: str, extra: dict, kind: str) -> None:
    r = call(stack.port, "POST", path, {"model": "llama3.2", **extra})
    assert r.status == 200
    assert r.headers["content-type"] == "application/json"
    assert r.body.endswith(b"}\n")
    assert r.json()["object"] == kind


@pytest.mark.parametrize("path,body,reason", [
    ("/api/generate", {"model": "llama3.2"}, "load"),
    ("/api/generate", {"model": "llama3.2", "keep_alive": 0}, "unload"),
    ("/api/chat", {"model": "llama3.2", "messages": []}, "load"),
    ("/api/chat", {"model": "llama3.2", "messages": [], "keep_alive": 0}, "unload"),
])
def test_load_unload_answer_is_one_object(stack: Stack, path: str, body: dict, reason: str) -> None:
    r = call(stack.port, "POST", path, body)
    assert r.status == 200
    assert r.headers["content-type"] == "application/json; charset=utf-8"
    obj = r.json()  # exactly one object, not NDJSON
    assert obj["done"] is True and obj["done_reason"] == reason


# -- §7.3–7.5: the model key anywhere, escapes, Go's key rules -------------------------


def _routed(split: Stack, body: bytes, path: str = "/api/chat") -> int:
    r = call(split.port, "POST", path, body)
    assert r.status == 200, (r.status, r.body[:300])
    return backend_of(split, r)


def test_model_last_after_5mb_image(split: Stack) -> None:
    image = b"A" * (5 * 1024 * 1024)
    body = (b'{"messages":[{"role":"user","content":"hi","images":["' + image
            + b'"]}],"stream":false,"model":"qwen2.5:0.5b"}')
    assert _routed(split, body) == 1


@pytest.mark.parametrize("decoy,expect", [
    ('{"messages":[{"role":"user","content":"\\"model\\":\\"qwen2.5:0.5b\\""}],"stream":false,"model":"llama3.2"}', 0),
    ('{"options":{"model":"qwen2.5:0.5b"},"messages":[{"role":"user","content":"hi"}],"stream":false,"model":"llama3.2"}', 0),
    (('{"messages":[{"role":"user","content":"\\"model\\":\\"llama3.2\\"","x":{"model":"llama3.2"}}],'
      '"stream":false,"model":"qwen2.5:0.5b"}'), 1),
])
def test_model_nested_decoys(split: Stack, decoy: str, expect: int) -> None:
    assert _routed(split, decoy.encode()) == expect


@pytest.mark.parametrize("body,expect", [
    (rb'{"model":"qwen2\u002e5:0.5b","messages":[{"role":"user","content":"hi"}],"stream":false}', 1),
    (rb'{"\u006d\u006f\u0064\u0065\u006c":"qwen2.5:0.5b","messages":[],"stream":false}', 1),
    (rb'{"MODEL":"qwen2.5:0.5b","messages":[],"stream":false}', 1),
    (rb'{"Model":"qwen2.5:0.5b","messages":[],"stream":false}', 1),
    (rb'{"model":"llama3.2","model":"qwen2.5:0.5b","messages":[],"stream":false}', 1),
    (rb'{"model":"qwen2.5:0.5b","messages":[],"stream":false,"mOdEl":"llama3.2"}', 0),
])
def test_model_key_escapes_case_duplicates(split: Stack, body: bytes, expect: int) -> None:
    assert _routed(split, body) == expect


def test_model_trailing_bytes(split: Stack) -> None:
    """Go ignores bytes after the object: route as Ollama would, or reject with a clean 400."""
    body = b'{"model":"qwen2.5:0.5b","messages":[],"stream":false} {"model":"llama3.2"} trailing'
    r = call(split.port, "POST", "/api/chat", body)
    if r.status == 400:
        assert isinstance(r.json()["error"], str)
    else:
        assert r.status == 200 and backend_of(split, r) == 1


# -- §7.6: name normalization ------------------------------------------------------------


@pytest.mark.parametrize("name", ["LLaMA3.2", "library/llama3.2", "registry.ollama.ai/library/llama3.2:latest",
                                  "llama3.2:latest", "LIBRARY/Llama3.2:LATEST"])
def test_name_normalization_routes(split: Stack, name: str) -> None:
    body = {"model": name, "prompt": "hi", "stream": False}
    assert _routed(split, orjson.dumps(body), "/api/generate") == 0


def test_legacy_name_on_show_and_copy_source_and_delete(split: Stack) -> None:
    r = call(split.port, "POST", "/api/show", {"name": "qwen2.5:0.5b"})
    assert r.status == 200 and backend_of(split, r) == 1
    assert "model_info" in r.json()
    r = call(split.port, "POST", "/api/copy", {"source": "Qwen2.5:0.5b", "destination": "trap-copy:v1"})
    assert (r.status, r.body) == (200, b"") and backend_of(split, r) == 1
    r = call(split.port, "DELETE", "/api/delete", {"name": "trap-copy:v1"})
    assert (r.status, r.body) == (200, b"") and backend_of(split, r) == 1
    r = call(split.port, "POST", "/api/show", {"name": "trap-copy:v1"})
    assert r.status == 404


def test_v1_model_in_path(split: Stack) -> None:
    r = call(split.port, "GET", "/v1/models/llama3.2:latest")
    assert r.status == 200
    obj = r.json()
    assert obj["id"] == "llama3.2:latest" and obj["object"] == "model" and obj["owned_by"] == "library"
    assert isinstance(obj["created"], int)
    r = call(split.port, "GET", "/v1/models/LLaMA3.2")
    assert r.status == 200 and r.json()["id"] == "LLaMA3.2"
    r = call(split.port, "GET", "/v1/models/ns%2Fmodel")
    assert r.status == 404


# -- §7.7, §7.8: per-line flushing, split lines, no blank lines ----------------------


def test_lines_flushed_as_they_come(paced: Stack) -> None:
    """12 tokens 50 ms apart: the first line must arrive long before the stream ends."""
    with Conn(paced.port) as c:
        t0 = time.monotonic()
        c.send(req("POST", "/api/generate", {"model": "llama3.2", "prompt": "hi"}, ["X-Sim-Tokens: 12"]))
        status, headers, _ = c.head()
        assert status == 200 and dict(headers)["content-type"] == "application/x-ndjson"
        first_line_at = None
        seen = b""
        for data in c.chunks():
            seen += data
            if first_line_at is None and b"\n" in seen:
                first_line_at = time.monotonic() - t0
        total = time.monotonic() - t0
    assert first_line_at is not None
    assert total > 0.5, total
    assert first_line_at < 0.2, (first_line_at, total)


def test_split_lines_passed_intact(stack: Stack) -> None:
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
    plain = call(stack.port, "POST", "/api/chat", body).lines()
    r = call(stack.port, "POST", "/api/chat", body, ["X-Sim-Fault: split-lines"])
    assert r.status == 200
    split_lines = r.lines()

    def strip(x: dict) -> dict:
        return {k: v for k, v in x.items() if k != "created_at" and not k.endswith("duration")}

    assert [strip(x) for x in split_lines] == [strip(x) for x in plain]


@pytest.mark.parametrize("path,body,headers", [
    ("/api/generate", {"model": "llama3.2", "prompt": "hi"}, []),
    ("/api/chat", {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "think": True}, []),
    ("/api/chat", {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}, ["X-Sim-Fault: split-lines"]),
    ("/api/pull", {"model": "trap-pulled-2"}, []),
])
def test_no_blank_lines_in_ndjson(stack: Stack, path: str, body: dict, headers: list[str]) -> None:
    r = call(stack.port, "POST", path, body, headers)
    assert r.status == 200
    assert r.headers["content-type"] == "application/x-ndjson"
    assert b"\n\n" not in r.body and not r.body.startswith(b"\n") and b"\r" not in r.body
    r.lines()


# -- §7.9: SSE framing --------------------------------------------------------------------


@pytest.mark.parametrize("usage", [False, True])
def test_sse_framing_done_and_usage(stack: Stack, usage: bool) -> None:
    body: dict[str, Any] = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    if usage:
        body["stream_options"] = {"include_usage": True}
    r = call(stack.port, "POST", "/v1/chat/completions", body)
    assert r.status == 200
    assert r.headers["content-type"] == "text/event-stream"
    assert r.chunked
    events = sse_events(r.body)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] == "stop"]
    assert len(finish) == 1
    usage_chunks = [c for c in chunks if c["choices"] == []]
    if usage:
        assert len(usage_chunks) == 1 and chunks[-1] is usage_chunks[0]
        assert usage_chunks[0]["usage"]["completion_tokens"] == 8
    else:
        assert usage_chunks == []


# -- §7.10: client disconnect cancels the backend ----------------------------------------


def _cancel_delay(st: Stack, conn: Conn) -> float:
    stats = st.sims[0].stats
    n = len(stats.cancel_times)
    closed_at = loop_now(st)
    conn.close()
    assert wait_for(lambda: len(stats.cancel_times) > n, 2.0), "the backend never saw the client leave"
    return stats.cancel_times[n] - closed_at


def test_disconnect_mid_stream_cancels_backend(paced: Stack) -> None:
    c = Conn(paced.port)
    c.send(req("POST", "/api/chat", {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]},
               ["X-Sim-Tokens: 200"]))
    status, _, _ = c.head()
    assert status == 200
    next(c.chunks())
    assert _cancel_delay(paced, c) < CANCEL_BOUND_S


def test_disconnect_non_stream_cancels_backend(paced: Stack) -> None:
    stats = paced.sims[0].stats
    active = stats.active
    c = Conn(paced.port)
    c.send(req("POST", "/api/chat", {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
                                     "stream": False}, ["X-Sim-Delay-Ms: 3000"]))
    assert wait_for(lambda: stats.active > active, 2.0)
    assert _cancel_delay(paced, c) < CANCEL_BOUND_S


def test_disconnect_sse_cancels_backend(paced: Stack) -> None:
    c = Conn(paced.port)
    c.send(req("POST", "/v1/chat/completions", {"model": "llama3.2", "stream": True,
                                                "messages": [{"role": "user", "content": "hi"}]},
               ["X-Sim-Tokens: 200"]))
    assert c.head()[0] == 200
    next(c.chunks())
    assert _cancel_delay(paced, c) < CANCEL_BOUND_S


def test_disconnect_mid_pull_cancels_backend(paced: Stack) -> None:
    c = Conn(paced.port)
    c.send(req("POST", "/api/pull", {"model": "trap-pull-cancel"}))
    assert c.head()[0] == 200
    next(c.chunks())
    assert _cancel_delay(paced, c) < CANCEL_BOUND_S


def test_queued_request_whose_client_left_never_runs() -> None:
    st = start_stack(sims=[fast_sim_options(tokens_per_s=20.0)], slots=1, health_interval=3600.0)
    try:
        stats = st.sims[0].stats
        before = stats.requests
        chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
        first = Conn(st.port)
        first.send(req("POST", "/api/chat", chat, ["X-Sim-Tokens: 16", "X-User-ID: alice"]))
        assert first.head()[0] == 200
        waiting = Conn(st.port)
        waiting.send(req("POST", "/api/chat", chat, ["X-User-ID: bob"]))
        assert wait_for(lambda: st.lt.call(lambda: len(st.state.dispatcher.queue)) == 1, 2.0)
        waiting.close()
        assert wait_for(lambda: st.lt.call(lambda: len(st.state.dispatcher.queue)) == 0, 1.0)
        body = b"".join(first.chunks())
        first.close()
        assert orjson.loads(body.splitlines()[-1])["done"] is True
        time.sleep(0.2)
        assert stats.requests == before + 1, "the abandoned request reached the backend"
        # The slot was given back: a later request runs.
        r = call(st.port, "POST", "/api/chat", {**chat, "stream": False})
        assert r.status == 200
        assert stats.requests == before + 2
        assert st.lt.call(lambda: st.state.in_flight()) == 0
    finally:
        st.close()


# -- §7.11, §7.12: keep-alive and pipelining ------------------------------------------


def test_keep_alive_after_every_kind_of_answer(stack: Stack) -> None:
    with Conn(stack.port) as c:
        c.send(req("POST", "/api/generate", {"model": "llama3.2", "prompt": "hi"}))
        r = c.response()
        assert r.status == 200 and r.chunked and r.lines()[-1]["done"] is True
        c.send(req("HEAD", "/"))
        r = c.response(head_request=True)
        assert r.status == 200 and r.headers["content-length"] == "17"
        c.send(req("POST", "/api/copy", {"source": "llama3.2", "destination": "trap-ka:latest"}))
        r = c.response()
        assert (r.status, r.body) == (200, b"")
        c.send(req("DELETE", "/api/delete", {"model": "trap-ka"}))
        r = c.response()
        assert (r.status, r.body) == (200, b"")
        c.send(req("GET", "/no/such/path"))
        r = c.response()
        assert (r.status, r.body) == (404, b"404 page not found")
        c.send(req("POST", "/api/chat", b'{"model": "llama3.2", bad'))
        r = c.response()
        assert r.status == 400 and isinstance(r.json()["error"], str)
        c.send(req("POST", "/api/generate", {"model": "nonexistent", "prompt": "hi"}))
        r = c.response()
        assert r.status == 404
        c.send(req("GET", "/api/version"))
        r = c.response()
        assert r.status == 200 and "version" in r.json()
        assert "close" not in r.headers.get("connection", "")


def test_pipelined_requests_answered_in_order(stack: Stack) -> None:
    chat_b = orjson.dumps({"model": "qwen2.5:0.5b", "messages": [{"role": "user", "content": "two"}], "stream": False})
    data = (
        req("POST", "/api/generate", {"model": "llama3.2", "prompt": "one", "stream": False})
        + req("GET", "/api/version")
        + b"POST /api/chat HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked_body(chat_b)
        + req("POST", "/api/generate", {"model": "llama3.2", "prompt": "four"})
    )
    with Conn(stack.port) as c:
        c.send(data)
        r1, r2, r3, r4 = (c.response() for _ in range(4))
    assert r1.status == 200 and r1.json()["model"] == "llama3.2" and "response" in r1.json()
    assert r2.status == 200 and "version" in r2.json()
    assert r3.status == 200 and r3.json()["model"] == "qwen2.5:0.5b" and "message" in r3.json()
    assert r4.status == 200 and r4.lines()[-1]["done"] is True
    direct = call(stack.port, "POST", "/api/generate", {"model": "llama3.2", "prompt": "one", "stream": False})
    assert r1.json()["response"] == direct.json()["response"]


def test_pipelined_streams_not_mixed(paced: Stack) -> None:
    a = {"model": "llama3.2", "prompt": "alpha"}
    b = {"model": "llama3.2", "prompt": "beta"}
    with Conn(paced.port) as c:
        c.send(req("POST", "/api/generate", a) + req("POST", "/api/generate", b))
        ra, rb = c.response(), c.response()
    text_a = "".join(x["response"] for x in ra.lines())
    text_b = "".join(x["response"] for x in rb.lines())
    assert text_a == call(paced.port, "POST", "/api/generate", {**a, "stream": False}).json()["response"]
    assert text_b == call(paced.port, "POST", "/api/generate", {**b, "stream": False}).json()["response"]


# -- §7.13: Expect: 100-continue --------------------------------------------------------


def _expect(c: Conn, head: bytes, body: bytes) -> Resp:
    """Send the head, wait for 100 Continue (or an early final answer), then the body."""
    c.send(head)
    c.sock.settimeout(0.5)
    try:
        status, headers, _ = c.head(stop_at_interim=True)
    finally:
        c.sock.settimeout(SOCK_TIMEOUT)
    if status == 100:
        c.send(body)
        r = c.response()
        r.interim.insert(0, 100)
        return r
    hd = dict(headers)
    rest = c._take(int(hd.get("content-length", "0")))
    return Resp(status, hd, headers, rest, False, [])


def test_expect_continue_chat(stack: Stack) -> None:
    body = orjson.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False})
    head = (b"POST /api/chat HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    with Conn(stack.port) as c:
        r = _expect(c, head, body)
        assert r.interim == [100]
        assert r.status == 200 and r.json()["done"] is True
        c.send(req("GET", "/api/version"))
        assert c.response().status == 200


def test_expect_continue_blob_created_then_exists(stack: Stack) -> None:
    blob = os.urandom(256 * 1024)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    head = (b"POST /api/blobs/%s HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (digest.encode(), len(blob)))
    with Conn(stack.port) as c:
        r = _expect(c, head, blob)
        assert r.interim == [100]
        assert (r.status, r.body) == (201, b"")
    with Conn(stack.port) as c:
        r = _expect(c, head, blob)
        assert r.status == 200 and r.body == b""
        # Then the connection is closed, or the body was drained and it still works.
        if not c.closed_by_peer(0.7):
            c.send(req("GET", "/api/version"))
            assert c.response().status == 200
    r = call(stack.port, "HEAD", f"/api/blobs/{digest}")
    assert r.status == 200


# -- §7.14: large bodies ----------------------------------------------------------------


def test_50mb_chat_body(split: Stack) -> None:
    image = b"QUFB" * (50 * 1024 * 1024 // 4)
    body = (b'{"messages":[{"role":"user","content":"hi","images":["' + image
            + b'"]}],"stream":false,"model":"qwen2.5:0.5b"}')
    r = call(split.port, "POST", "/api/chat", body)
    assert r.status == 200, r.body[:300]
    assert backend_of(split, r) == 1 and r.json()["done"] is True


def _rss_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def test_200mb_blob_upload_is_streamed() -> None:
    """The gateway runs as its own process so its memory can be read from /proc."""
    lt = LoopThread()
    sim = lt.run(start_sim(SimOptions(ttft_ms=5.0, tokens_per_s=400.0, tokens=8), "127.0.0.1", 0))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ollamamq_fast", "serve", "--no-tui", "--state", "", "--log-file", "", "-p", str(port), "-o", sim.url,
         "--health-interval", "3600", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        def ready() -> bool:
            try:
                return call(port, "GET", "/api/tags").status == 200
            except OSError:
                return False

        assert wait_for(ready, 10.0, 0.05), "gateway subprocess did not start"
        assert call(port, "GET", "/api/version").status == 200
        base = _rss_kb(proc.pid, "VmHWM")
        piece = os.urandom(1 << 20)
        size = 200 * len(piece)
        h = hashlib.sha256()
        for _ in range(200):
            h.update(piece)
        digest = "sha256:" + h.hexdigest()
        with Conn(port, timeout=30.0) as c:
            c.send(b"POST /api/blobs/%s HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n" % (digest.encode(), size))
            for _ in range(200):
                c.send(piece)
            r = c.response()
        assert (r.status, r.body) == (201, b"")
        grown_mb = (_rss_kb(proc.pid, "VmHWM") - base) / 1024
        assert grown_mb < 50, f"gateway peak RSS grew by {grown_mb:.0f} MB for a 200 MB upload"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
        lt.run(sim.close())
        lt.stop()


# -- §7.15, §7.16: DELETE with a body, HEAD routes ---------------------------------------


def test_delete_with_body(stack: Stack) -> None:
    assert call(stack.port, "POST", "/api/copy", {"source": "llama3.2", "destination": "trap-del"}).status == 200
    r = call(stack.port, "DELETE", "/api/delete", {"model": "trap-del"})
    assert (r.status, r.body) == (200, b"")
    assert r.headers.get("content-length") == "0"
    r = call(stack.port, "DELETE", "/api/delete", {"model": "trap-del"})
    assert r.status == 404 and r.json() == {"error": "model 'trap-del' not found"}


@pytest.mark.parametrize("path", ["/", "/api/version", "/api/tags"])
def test_head_same_headers_no_body(stack: Stack, path: str) -> None:
    with Conn(stack.port) as c:
        c.send(req("GET", path))
        g = c.response()
        c.send(req("HEAD", path))
        h = c.response(head_request=True)
        # Nothing may follow the HEAD head: the next response must parse cleanly.
        c.send(req("GET", "/api/version"))
        after = c.response()
    assert g.status == h.status == 200
    assert h.headers.get("content-type") == g.headers.get("content-type")
    assert h.headers.get("content-length") == str(len(g.body))
    assert after.status == 200 and "version" in after.json()


def test_head_blob(stack: Stack) -> None:
    missing = "sha256:" + "0" * 64
    direct = Conn(stack.sims[0].port)
    with direct:
        direct.send(req("HEAD", f"/api/blobs/{missing}"))
        want = direct.response(head_request=True)
    with Conn(stack.port) as c:
        c.send(req("HEAD", f"/api/blobs/{missing}"))
        h = c.response(head_request=True)
        c.send(req("GET", "/api/version"))
        after = c.response()
    assert h.status == want.status == 404
    assert h.headers.get("content-type") == want.headers.get("content-type")
    assert h.headers.get("content-length") == want.headers.get("content-length")
    assert after.status == 200 and "version" in after.json()
    bad = call(stack.port, "HEAD", "/api/blobs/sha256:xyz")
    assert bad.status == 400


# -- §7.17: Host rewritten, path and query kept, hop-by-hop removed ------------------------


class FakeBackend:
    """A raw-socket Ollama stand-in that records every non-probe request byte for byte."""

    MODELS: ClassVar[dict[str, Any]] = {"models": [{"name": "fake:latest", "model": "fake:latest",
                          "modified_at": "2025-01-01T00:00:00Z", "size": 1, "digest": "x", "details": {}}]}

    def __init__(self) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.srv.settimeout(0.2)
        self.port = self.srv.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[bytes] = []
        self.stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.stopping = True
        self.srv.close()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(SOCK_TIMEOUT)
        buf = b""

        def more() -> bytes:
            data = conn.recv(65536)
            if not data:
                raise EOFError
            return data

        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    buf += more()
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                chunked = False
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                    elif name.strip().lower() == b"transfer-encoding":
                        chunked = b"chunked" in value.lower()
                body = b""
                if chunked:  # de-chunk so that the body can still be compared
                    while True:
                        while b"\r\n" not in buf:
                            buf += more()
                        size_line, _, buf = buf.partition(b"\r\n")
                        size = int(size_line.split(b";")[0], 16)
                        while len(buf) < size + 2:
                            buf += more()
                        body += buf[:size]
                        buf = buf[size + 2 :]
                        if size == 0:
                            break
                else:
                    while len(buf) < length:
                        buf += more()
                    body, buf = buf[:length], buf[length:]
                path = head.split(b" ")[1]
                if path in (b"/api/tags", b"/api/ps"):
                    out = orjson.dumps(self.MODELS if path == b"/api/tags" else {"models": []})
                elif path == b"/api/version":
                    out = b'{"version":"0.12.0"}'
                else:
                    self.requests.append(head + b"\r\n\r\n" + body)
                    out = b'{"ok":true}'
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
                             b"Connection: keep-alive, X-Backend-Hop\r\nKeep-Alive: timeout=5\r\n"
                             b"X-Backend-Hop: 1\r\nX-Backend-Kept: yes\r\n"
                             b"Content-Length: %d\r\n\r\n%b" % (len(out), out))
        except (OSError, EOFError):
            return
        finally:
            conn.close()


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[Stack, FakeBackend]]:
    backend = FakeBackend()
    st = start_stack(sims=[], extra_backends=[backend.url], health_interval=3600.0)
    yield st, backend
    st.close()
    backend.close()


def _forwarded(backend: FakeBackend, n: int) -> tuple[str, list[tuple[str, str]], bytes]:
    assert wait_for(lambda: len(backend.requests) > n, 2.0)
    raw = backend.requests[n]
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = [(k.strip().lower(), v.strip()) for k, _, v in (h.partition(":") for h in lines[1:])]
    return lines[0], headers, body


def test_host_rewritten_query_kept_hop_by_hop_removed(fake: tuple[Stack, FakeBackend]) -> None:
    st, backend = fake
    n = len(backend.requests)
    body = b'{"model":"fake","verbose":false}'
    head = (
        "POST /api/show?ts=123&sig=a%2Fb+c HTTP/1.1\r\n"
        "Host: gateway.example.com\r\n"
        "Connection: keep-alive, X-Hop\r\n"
        "Keep-Alive: timeout=5\r\n"
        "TE: trailers\r\n"
        "Upgrade: websocket\r\n"
        "Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        "X-Hop: drop-me\r\n"
        "X-Forwarded-For: 10.1.2.3\r\n"
        "X-Keep-Me: yes\r\n"
        "User-Agent: ollama-python/0.6.3\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    with Conn(st.port) as c:
        c.send(head.encode() + body)
        r = c.response()
    assert r.status == 200 and r.json() == {"ok": True}
    line, headers, fwd_body = _forwarded(backend, n)
    names = [k for k, _ in headers]
    hd = dict(headers)
    assert line == "POST /api/show?ts=123&sig=a%2Fb+c HTTP/1.1"
    assert names.count("host") == 1 and hd["host"] == f"127.0.0.1:{backend.port}"
    assert hd["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"
    for hop in ("keep-alive", "te", "upgrade", "proxy-authorization", "x-hop"):
        assert hop not in names, hop
    assert "x-hop" not in hd.get("connection", "").lower()
    assert hd["x-keep-me"] == "yes" and hd["user-agent"] == "ollama-python/0.6.3"
    assert hd["content-type"] == "application/json"
    assert fwd_body == body


def test_queued_route_keeps_path_query_and_body_bytes(fake: tuple[Stack, FakeBackend]) -> None:
    """§7.17, §7.22: path+query and the body (key order, 1.0, big ints) reach the backend as sent."""
    st, backend = fake
    n = len(backend.requests)
    body = (b'{"stream":false,"messages":[],"format":{"type":"object","properties":{"b":{"type":"number",'
            b'"minimum":1.0},"a":{"type":"integer","maximum":123456789012345678901234567890}}},'
            b'"model":"fake","options":{"temperature":0.10}}')
    r = call(st.port, "POST", "/api/chat?ts=123", body, ["Authorization: Bearer sig"])
    assert r.status == 200
    line, headers, fwd_body = _forwarded(backend, n)
    assert line == "POST /api/chat?ts=123 HTTP/1.1"
    assert dict(headers)["host"] == f"127.0.0.1:{backend.port}"
    assert dict(headers)["x-forwarded-for"] == "127.0.0.1"
    assert fwd_body == body


def test_chunked_request_body_forwarded(fake: tuple[Stack, FakeBackend]) -> None:
    st, backend = fake
    n = len(backend.requests)
    body = b'{"model":"fake","messages":[{"role":"user","content":"hi"}],"stream":false}'
    with Conn(st.port) as c:
        c.send(b"POST /api/chat HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked_body(body))
        r = c.response()
    assert r.status == 200
    _, headers, fwd_body = _forwarded(backend, n)
    assert fwd_body == body
    assert [k for k, _ in headers].count("transfer-encoding") + [k for k, _ in headers].count("content-length") == 1


def test_response_hop_by_hop_headers_dropped(fake: tuple[Stack, FakeBackend]) -> None:
    st, _ = fake
    r = call(st.port, "POST", "/api/show", {"model": "fake"})
    assert r.status == 200 and r.json() == {"ok": True}
    names = [k for k, _ in r.header_list]
    assert "keep-alive" not in names and "x-backend-hop" not in names
    assert r.headers["x-backend-kept"] == "yes"
    assert r.headers.get("connection", "keep-alive").lower() in ("keep-alive", "close")


def _zstd_raw(data: bytes) -> bytes:
    """A valid zstd frame holding `data` in raw (stored) blocks: no zstd module needed."""
    out = b"\x28\xb5\x2f\xfd" + bytes([0xA0]) + len(data).to_bytes(4, "little")
    step = 128 * 1024
    for i in range(0, len(data), step):
        block = data[i : i + step]
        last = 1 if i + step >= len(data) else 0
        out += ((len(block) << 3) | last).to_bytes(3, "little") + block
    return out


def test_v1_responses_zstd_body(fake: tuple[Stack, FakeBackend]) -> None:
    """§7.28: decompress to read the model, or pass the body through untouched."""
    st, backend = fake
    n = len(backend.requests)
    plain = b'{"model":"fake","input":"hi"}'
    packed = _zstd_raw(plain)
    r = call(st.port, "POST", "/v1/responses", packed, ["Content-Encoding: zstd", "Content-Type: application/json"])
    assert r.status == 200, (r.status, r.body)
    _, headers, fwd_body = _forwarded(backend, n)
    if dict(headers).get("content-encoding") == "zstd":
        assert fwd_body == packed
    else:
        assert fwd_body == plain


# -- §7.18: errors keep status and body; broken streams end cleanly ----------------------


@pytest.fixture(scope="module")
def errstack() -> Iterator[Stack]:
    """A stack of its own for fault tests, so that their failures touch no other test."""
    st = start_stack(health_interval=3600.0)
    yield st
    st.close()


CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("code", [400, 500, 503])
@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_backend_error_relayed_unchanged(errstack: Stack, code: int, path: str) -> None:
    fault = [f"X-Sim-Fault: status:{code}"]
    want = call(errstack.sims[0].port, "POST", path, CHAT, fault)
    got = call(errstack.port, "POST", path, CHAT, fault)
    assert want.status == code
    assert (got.status, got.headers.get("content-type"), got.body) == (
        want.status, want.headers.get("content-type"), want.body)
    # A normal answer in between, so that a breaker counting consecutive 5xx stays
    # closed here; test_relayed_5xx_answers_keep_the_backend_in_service looks at that.
    assert call(errstack.port, "POST", path, {**CHAT, "stream": False}).status == 200


def test_relayed_5xx_answers_keep_the_backend_in_service() -> None:
    """§7.18: a backend's own 500 answer (e.g. a model that fails to load) is relayed;
    it says nothing about the backend's health, so other requests must still be served."""
    st = start_stack(health_interval=3600.0)
    try:
        for _ in range(3):
            r = call(st.port, "POST", "/api/chat", CHAT, ["X-Sim-Fault: status:500"])
            assert r.status == 500
            assert r.json() == {"error": "an error was encountered while running the model"}
        r = call(st.port, "POST", "/api/chat", {**CHAT, "stream": False})
        assert r.status == 200, (r.status, r.body)
    finally:
        st.close()


def test_mid_stream_error_line_relayed(errstack: Stack) -> None:
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
    r = call(errstack.port, "POST", "/api/chat", body, ["X-Sim-Fault: mid-stream-error"])
    assert r.status == 200 and r.chunked
    lines = r.lines()
    assert len(lines) == 3
    assert [("error" in x) for x in lines] == [False, False, True]
    assert lines[-1] == {"error": "an error was encountered while running the model"}


def test_mid_stream_error_sse_relayed(errstack: Stack) -> None:
    body = {"model": "llama3.2", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    r = call(errstack.port, "POST", "/v1/chat/completions", body, ["X-Sim-Fault: mid-stream-error"])
    assert r.status == 200
    events = [orjson.loads(e) for e in sse_events(r.body)]
    assert "error" in events[-1] and events[-1]["error"]["message"]


def test_backend_dies_mid_stream_ndjson(errstack: Stack) -> None:
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
    with Conn(errstack.port) as c:
        c.send(req("POST", "/api/chat", body, ["X-Sim-Fault: die-after:3"]))
        r = c.response()  # raises if the chunked body is not terminated
    assert r.status == 200 and r.chunked
    lines = r.lines()
    assert len(lines) == 4
    assert all("error" not in x and x["done"] is False for x in lines[:3])
    assert list(lines[3]) == ["error"] and isinstance(lines[3]["error"], str)


def test_backend_dies_mid_stream_sse(errstack: Stack) -> None:
    body = {"model": "llama3.2", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with Conn(errstack.port) as c:
        c.send(req("POST", "/v1/chat/completions", body, ["X-Sim-Fault: die-after:3"]))
        r = c.response()
    assert r.status == 200 and r.chunked
    events = sse_events(r.body)
    assert len(events) == 4
    assert all("choices" in orjson.loads(e) for e in events[:3])
    err = orjson.loads(events[3])
    assert isinstance(err["error"]["message"], str)


# -- §7.24: long idle gaps are not cut ------------------------------------------------


def test_long_idle_gaps_not_cut() -> None:
    st = start_stack(sims=[fast_sim_options(ttft_ms=1500.0, tokens_per_s=0.8, tokens=2)],
                     timeout=4.0, health_interval=3600.0)
    try:
        t0 = time.monotonic()
        r = call(st.port, "POST", "/api/generate", {"model": "llama3.2", "prompt": "hi"})
        took = time.monotonic() - t0
        assert r.status == 200
        lines = r.lines()
        assert len(lines) == 3 and lines[-1]["done"] is True and "error" not in lines[-1]
        assert took > 2.5, took
    finally:
        st.close()


# -- §7.26, §4.5, §1: empty model lists, gateway-made 404/405 --------------------------


def test_v1_models_with_no_models() -> None:
    st = start_stack(sims=[fast_sim_options(models=[])], health_interval=3600.0)
    try:
        r = call(st.port, "GET", "/v1/models")
        assert r.status == 200 and r.headers["content-type"].startswith("application/json")
        assert r.json() == {"object": "list", "data": None}
        r = call(st.port, "GET", "/api/tags")
        assert r.status == 200 and r.json() == {"models": []}
    finally:
        st.close()


def test_404_and_405_text(stack: Stack) -> None:
    r = call(stack.port, "GET", "/api/nope")
    assert (r.status, r.body) == (404, b"404 page not found")
    assert r.headers["content-type"].startswith("text/plain")
    r = call(stack.port, "GET", "/api/chat")
    assert (r.status, r.body) == (405, b"405 method not allowed")
    assert r.headers["content-type"].startswith("text/plain")
    r = call(stack.port, "GET", "/api/tags/?x=1")
    assert r.status in (301, 307) and r.headers["location"] == "/api/tags?x=1"


def test_unknown_model_404_native(stack: Stack) -> None:
    r = call(stack.port, "POST", "/api/generate", {"model": "nonexistent", "prompt": "hi"})
    assert r.status == 404
    assert r.headers["content-type"] == "application/json; charset=utf-8"
    assert r.json() == {"error": "model 'nonexistent' not found"}


def test_unknown_model_404_openai(stack: Stack) -> None:
    r = call(stack.port, "POST", "/v1/chat/completions",
             {"model": "nonexistent", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status == 404
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"error": {"message": "model 'nonexistent' not found", "type": "not_found_error",
                                  "param": None, "code": None}}


# -- bad input: 431, 413, 400, and other clients are unaffected --------------------------


@pytest.fixture(scope="module")
def small() -> Iterator[Stack]:
    st = start_stack(max_body_bytes=4096, health_interval=3600.0)
    yield st
    st.close()


def _send_then_read(port: int, data: bytes) -> Resp:
    with Conn(port) as c:
        try:
            c.send(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return c.response()


def _others_still_served(port: int) -> None:
    r = call(port, "POST", "/api/chat", {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
                                         "stream": False})
    assert r.status == 200 and r.json()["done"] is True


@pytest.mark.parametrize("shape", ["one-header", "many-headers", "long-url"])
def test_oversized_head_431(small: Stack, shape: str) -> None:
    if shape == "one-header":
        data = req("GET", "/api/version", None, ["X-Big: " + "a" * (80 * 1024)])
    elif shape == "many-headers":
        data = req("GET", "/api/version", None, [f"X-H{i}: {'b' * 40}" for i in range(2000)])
    else:
        data = req("GET", "/api/version?q=" + "c" * (80 * 1024))
    r = _send_then_read(small.port, data)
    assert r.status == 431
    assert isinstance(r.json()["error"], str)
    _others_still_served(small.port)


@pytest.mark.parametrize("chunked", [False, True])
def test_oversized_body_413(small: Stack, chunked: bool) -> None:
    payload = orjson.dumps({"model": "llama3.2", "prompt": "x" * 8192})
    if chunked:
        data = b"POST /api/generate HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked_body(payload)
    else:
        data = req("POST", "/api/generate", payload)
    r = _send_then_read(small.port, data)
    assert r.status == 413
    assert isinstance(r.json()["error"], str)
    _others_still_served(small.port)


def test_openai_oversized_body_413_envelope(small: Stack) -> None:
    payload = orjson.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "x" * 8192}]})
    r = _send_then_read(small.port, req("POST", "/v1/chat/completions", payload))
    assert r.status == 413
    assert r.json()["error"]["type"] and r.json()["error"]["message"]


@pytest.mark.parametrize("data", [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS hello
    b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef",
])
def test_garbage_request_400(small: Stack, data: bytes) -> None:
    r = _send_then_read(small.port, data)
    assert r.status == 400
    assert "close" in r.headers.get("connection", "").lower()
    _others_still_served(small.port)


# -- more of §1, §3, §7: empty model, Content-Type, relayed 400s, byte exactness ----------


@pytest.mark.parametrize("path,body,status,error", [
    ("/api/generate", {"model": "", "prompt": "hi"}, 404, "model '' not found"),
    ("/api/chat", {"model": "", "messages": []}, 400, "model is required"),
    ("/api/chat", b"", 400, "missing request body"),
])
def test_empty_model_and_empty_body_like_ollama(stack: Stack, path: str, body: Any, status: int, error: str) -> None:
    """§4.5: Ollama's own status and text for an empty model or body."""
    r = call(stack.port, "POST", path, body)
    assert (r.status, r.json()) == (status, {"error": error})


def test_request_content_type_not_checked(stack: Stack) -> None:
    """§7.25: curl -d sends a form content type; Ollama parses the JSON anyway."""
    r = call(stack.port, "POST", "/api/generate", {"model": "llama3.2", "prompt": "hi", "stream": False},
             ["Content-Type: application/x-www-form-urlencoded"])
    assert r.status == 200 and r.json()["done"] is True


@pytest.mark.parametrize("extra", [{"think": "bogus"}, {"stream": "false"}, {"keep_alive": "10"}])
def test_backend_400_relayed(stack: Stack, extra: dict) -> None:
    """§7.21, §3: values only the backend judges come back with its status and text."""
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], **extra}
    want = call(stack.sims[0].port, "POST", "/api/chat", body)
    got = call(stack.port, "POST", "/api/chat", body)
    assert want.status == 400
    assert (got.status, got.body) == (want.status, want.body)


@pytest.mark.parametrize("raw", [b'{"model":"llama3.2",}', b'{"model":"llama3.2","prompt":}'])
def test_malformed_json_after_the_model_gets_the_backends_400(stack: Stack, raw: bytes) -> None:
    """§1, §7.5: Go's decoder judges the body; its 400 and text come back unchanged."""
    want = call(stack.sims[0].port, "POST", "/api/generate", raw)
    got = call(stack.port, "POST", "/api/generate", raw)
    assert want.status == 400 and "invalid character" in want.json()["error"]
    assert (got.status, got.body) == (want.status, want.body)


_VOLATILE = re.compile(rb'"created_at":"[^"]*"|"(total|load|prompt_eval|eval)_duration":\d+')


@pytest.mark.parametrize("path,body", [
    ("/api/generate", {"model": "llama3.2", "prompt": "escapes please"}),
    ("/api/chat", {"model": "llama3.2", "messages": [{"role": "user", "content": "call get_weather"}],
                   "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
                       "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city", "days"]}}}]}),
    ("/api/show", {"model": "llama3.2", "verbose": True}),
])
def test_pass_through_is_byte_exact(stack: Stack, path: str, body: dict) -> None:
    """§7.20, §7.23: Go escapes, key order and tool-call objects reach the client unchanged."""
    headers = ["X-Sim-Tokens: 300"]
    want = call(stack.sims[0].port, "POST", path, body, headers)
    got = call(stack.port, "POST", path, body, headers)
    assert got.status == want.status == 200
    assert got.headers["content-type"] == want.headers["content-type"]
    assert _VOLATILE.sub(b"", got.body) == _VOLATILE.sub(b"", want.body)
    if path == "/api/generate":
        assert b"\\u003c" in got.body or b"\\u0026" in got.body


def test_disconnect_during_blob_upload_closes_backend(stack: Stack) -> None:
    stats = stack.sims[0].stats
    digest = "sha256:" + "1" * 64
    c = Conn(stack.port)
    c.send(b"POST /api/blobs/%s HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n"
           % (digest.encode(), 64 << 20))
    c.send(b"\0" * (1 << 20))
    time.sleep(0.3)
    n = len(stats.connection_close_times)
    closed_at = loop_now(stack)
    c.close()
    assert wait_for(lambda: len(stats.connection_close_times) > n, 2.0), "the backend upload was not dropped"
    assert stats.connection_close_times[n] - closed_at < CANCEL_BOUND_S


def test_pipelined_local_answers_wait_for_stream(paced: Stack) -> None:
    data = (req("POST", "/api/generate", {"model": "llama3.2", "prompt": "p"}, ["X-Sim-Tokens: 6"])
            + req("GET", "/api/version") + req("HEAD", "/")
            + req("POST", "/api/generate", {"model": "llama3.2", "prompt": "q", "stream": False}))
    with Conn(paced.port) as c:
        c.send(data)
        r1 = c.response()
        r2 = c.response()
        r3 = c.response(head_request=True)
        r4 = c.response()
    assert r1.status == 200 and len(r1.lines()) == 7
    assert r2.status == 200 and "version" in r2.json()
    assert r3.status == 200 and r3.body == b"" and r3.headers["content-type"].startswith("text/plain")
    assert r4.status == 200 and r4.json()["done"] is True


def test_connection_close_is_honoured(stack: Stack) -> None:
    with Conn(stack.port) as c:
        c.send(req("POST", "/api/generate", {"model": "llama3.2", "prompt": "hi"}, ["Connection: close"]))
        r = c.response()
        assert r.status == 200 and r.lines()[-1]["done"] is True
        assert r.headers.get("connection", "").lower() == "close"
        assert c.closed_by_peer(1.0)


def test_no_backend_online_503_with_retry_after() -> None:
    st = start_stack(sims=[], extra_backends=[f"http://127.0.0.1:{free_port()}"], health_interval=3600.0)
    try:
        r = call(st.port, "POST", "/api/chat", {"model": "llama3.2", "messages": []})
        assert r.status == 503 and isinstance(r.json()["error"], str)
        assert int(r.headers["retry-after"]) > 0
        r = call(st.port, "POST", "/v1/chat/completions", {"model": "llama3.2", "messages": []})
        assert r.status == 503 and r.json()["error"]["type"] == "api_error"
        assert int(r.headers["retry-after"]) > 0
    finally:
        st.close()


@pytest.mark.parametrize("path,length,status", [
    ("/api/chat", 100_000, 413),
    ("/api/nope", 100, 404),
    ("/api/tags", 100, 405),
    ("/api/chat/", 100, 307),
])
def test_expect_continue_refused_answers_at_once(small: Stack, path: str, length: int, status: int) -> None:
    """§7.13, §1: a body the server will not read gets its final status at once, no 100, no wait."""
    with Conn(small.port) as c:
        c.send(b"POST %b HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
               % (path.encode(), length))
        c.sock.settimeout(0.5)
        try:
            got, _, _ = c.head(stop_at_interim=True)
        except TimeoutError:
            pytest.fail(f"no answer within 0.5 s to an Expect request that gets {status}")
    assert got == status


def test_413_answered_before_the_body_is_sent(small: Stack) -> None:
    """A body over the limit is refused from its Content-Length, not after reading it all."""
    with Conn(small.port) as c:
        c.send(b"POST /api/chat HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % (50 << 20))
        c.send(b'{"model":"llama3.2","messages":[' + b" " * 1024)
        c.sock.settimeout(1.0)
        try:
            r = c.response()
        except TimeoutError:
            pytest.fail("no 413 until the whole 50 MB body is sent")
    assert r.status == 413


def test_pipelined_errors_behind_a_stream(paced: Stack) -> None:
    data = (req("POST", "/api/generate", {"model": "llama3.2", "prompt": "p"}, ["X-Sim-Tokens: 6"])
            + req("POST", "/api/nope", {"x": 1})
            + req("POST", "/api/chat", b'{"model": oops}')
            + req("GET", "/api/tags/")
            + req("GET", "/api/version"))
    with Conn(paced.port) as c:
        c.send(data)
        rs = [c.response() for _ in range(5)]
    assert [r.status for r in rs] == [200, 404, 400, 301, 200]
    assert len(rs[0].lines()) == 7
    assert rs[1].body == b"404 page not found"
    assert isinstance(rs[2].json()["error"], str)
    assert "version" in rs[4].json()


def test_backend_silence_past_timeout() -> None:
    """--timeout cuts a silent backend: 504 before the head, an error line after it."""
    st = start_stack(sims=[fast_sim_options()], timeout=2.0, health_interval=3600.0)
    try:
        results: dict[str, Any] = {}
        body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}

        def run(key: str, fault: str) -> None:
            t0 = time.monotonic()
            results[key] = (call(st.port, "POST", "/api/chat", body, [f"X-Sim-Fault: {fault}"]), time.monotonic() - t0)

        threads = [threading.Thread(target=run, args=(k, k)) for k in ("hang", "hang-body")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        hang, hang_s = results["hang"]
        assert hang.status == 504 and isinstance(hang.json()["error"], str)
        assert 1.5 < hang_s < 4.5, hang_s
        broken, broken_s = results["hang-body"]
        assert broken.status == 200 and broken.chunked
        lines = broken.lines()
        assert "error" not in lines[0] and list(lines[-1]) == ["error"]
        assert 1.5 < broken_s < 4.5, broken_s
    finally:
        st.close()


def test_http10_client_gets_no_chunked_stream(stack: Stack) -> None:
    """§1 (RFC 9112 §6.1): Transfer-Encoding must not be sent to an HTTP/1.0 client;
    Go's server close-delimits the stream instead."""
    body = b'{"model":"llama3.2","prompt":"hi"}'
    with Conn(stack.port) as c:
        c.send(b"POST /api/generate HTTP/1.0\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        status, headers, _ = c.head()
        try:
            while True:
                c._fill()
        except EOFError:
            pass
    assert status == 200
    assert "transfer-encoding" not in dict(headers)
    lines = [orjson.loads(x) for x in c.buf.splitlines()]
    assert lines[-1]["done"] is True
