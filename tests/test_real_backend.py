"""Opt-in: the gateway in front of a real OpenAI-compatible server.

The simulator is built to the protocol notes; this module checks the gateway
against what users actually run as an OpenAI-compatible backend: the
llama-cpp-python server (uvicorn + sse-starlette), serving a tiny generated
model (tests/tiny_gguf.py). One simulator stands in for a native Ollama
backend next to it, so routing across the two kinds is exercised too.

Run: `OLLAMAMQ_REAL_BACKENDS=1 python -m pytest -q tests/test_real_backend.py`
(needs `pip install 'llama-cpp-python[server]' gguf`). Without the variable the
module skips at collection, before anything heavy is imported. The server may
live in a venv of its own: `OLLAMAMQ_LLAMA_PYTHON=/venv/bin/python` names the
interpreter that runs it and writes the model (then only `openai` and `ollama`
are needed here, beside the gateway).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest

from ollamamq_fast.fleet.backend import ApiKind
from ollamamq_fast.fleet.models import normalize_model

# The harness (the whole gateway, aiohttp), httpx and openai take about a
# second to import: they are imported where used, so that the skip without
# OLLAMAMQ_REAL_BACKENDS stays well under a second.
if TYPE_CHECKING:
    import httpx
    from harness import Stack
    from openai import OpenAI, Stream
    from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

T = TypeVar("T")

_ENABLED = os.environ.get("OLLAMAMQ_REAL_BACKENDS") == "1"
# The interpreter that runs the server and writes the tiny model: this one, or
# another that has llama-cpp-python and gguf (a venv kept apart from the gateway's).
_LLAMA_PYTHON = os.environ.get("OLLAMAMQ_LLAMA_PYTHON") or sys.executable
# find_spec only looks for the package: importing llama_cpp would load its
# shared library, and the skip must stay instant. Another interpreter is not
# asked at collection (a second of start-up): it is only checked to exist.
_MISSING = [m for m in ("llama_cpp", "gguf", "openai")
            if (m == "openai" or _LLAMA_PYTHON == sys.executable)
            and importlib.util.find_spec(m) is None]
if not os.access(_LLAMA_PYTHON, os.X_OK):
    _MISSING.append(f"OLLAMAMQ_LLAMA_PYTHON={_LLAMA_PYTHON}")

pytestmark = [
    pytest.mark.realbackend,
    pytest.mark.skipif(
        not _ENABLED, reason="real-backend tests are opt-in: set OLLAMAMQ_REAL_BACKENDS=1"
    ),
    pytest.mark.skipif(
        bool(_MISSING),
        reason=f"not installed: {', '.join(_MISSING)} "
        "(pip install 'llama-cpp-python[server]' gguf openai)",
    ),
]

MODEL = "tiny"
# Generation is capped by the context: prompt + completion <= N_CTX tokens.
N_CTX = 256
LONG_MAX_TOKENS = 250
SERVER_START_TIMEOUT_S = 60.0
# Printed by llama_cpp/server/app.py (get_event_publisher) when a stream's
# client goes away before the stream ends: the server saw the connection
# close and left its token loop. A stream that runs to its end prints nothing.
_DISCONNECT_RE = re.compile(
    r"Disconnected from client \(via refresh/close\) Address\(host='127\.0\.0\.1', port=(\d+)\)"
)
# Linux TCP states in /proc/net/tcp (include/net/tcp_states.h).
_ESTABLISHED, _CLOSE_WAIT = "01", "08"
_MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "say hello to the gateway"}]


@dataclass
class RealBackend:
    """A llama.cpp server process and a gateway in front of it and one simulator."""

    stack: Stack
    server_url: str
    server_port: int
    log_path: Path
    proc: subprocess.Popen[bytes]

    @property
    def sim_url(self) -> str:
        """The simulator's base URL (the gateway's name for that backend)."""
        return self.stack.sims[0].url

    def log(self) -> str:
        """Everything the server has printed so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace")

    def on_loop(self, fn: Callable[[], T]) -> T:
        """Read gateway state on its own loop thread, where it is mutated."""
        result: T = self.stack.lt.call(fn)
        return result


def _http(timeout: float = 30.0) -> httpx.Client:
    import httpx

    # trust_env=False: loopback only, whatever proxy the environment names.
    return httpx.Client(timeout=timeout, trust_env=False)


def _openai(base: str) -> OpenAI:
    from openai import OpenAI  # imported here: a skipped module must not pay for it

    # max_retries=0: a retried request would hide a gateway error behind a success.
    return OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)


def _start_server(model: Path, port: int, log_path: Path, interrupt: bool = False,
                  n_ctx: int = N_CTX, embedding: bool = False) -> subprocess.Popen[bytes]:
    cmd = [
        _LLAMA_PYTHON, "-m", "llama_cpp.server",
        "--model", str(model), "--model_alias", MODEL,
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx),
        # By default the server ends a running stream as soon as another request
        # waits for the model. That would make a gateway that fails to cancel
        # look fine (the next request kills the orphan), so requests queue here,
        # as they do on a single-slot server (the health tests set it both ways).
        "--interrupt_requests", str(interrupt),
    ]
    if embedding:  # /v1/embeddings as well; chat and completions still work
        cmd += ["--embedding", "true"]
    # Unbuffered, so the disconnect line is in the log file when printed.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _write_tiny_model(path: Path) -> None:
    """tests/tiny_gguf.py's model at path, written by the server's interpreter (it has gguf)."""
    if _LLAMA_PYTHON == sys.executable:
        from tiny_gguf import write_tiny_llama  # needs gguf: only when the module runs

        write_tiny_llama(str(path))
        return
    script = Path(__file__).with_name("tiny_gguf.py")
    subprocess.run([_LLAMA_PYTHON, str(script), str(path)], check=True, timeout=120)


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    import httpx

    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    with _http(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}:\n{tail}")
            try:
                if client.get(url + "/v1/models").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    pytest.fail(f"llama_cpp.server not ready after {SERVER_START_TIMEOUT_S:g} s")


def _stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealBackend]:
    """The tiny model, a llama.cpp server on it, and a gateway over it and a simulator."""
    from harness import fast_sim_options, free_port, start_stack

    tmp = tmp_path_factory.mktemp("real_backend")
    model = tmp / "tiny.gguf"
    _write_tiny_model(model)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp / "llama_server.log"
    proc = _start_server(model, port, log_path)
    try:
        _wait_ready(proc, url, log_path)
        # The gateway probes every backend once before start_stack returns, so
        # kinds and model lists are known when the tests begin.
        stack = start_stack(sims=[fast_sim_options()], extra_backends=[url])
        try:
            yield RealBackend(stack, url, port, log_path, proc)
        finally:
            stack.close()
    finally:
        _stop_server(proc)


def _tcp_states(port_a: int, port_b: int) -> list[str]:
    """States of the IPv4 sockets connecting port_a and port_b (both ends, any direction)."""
    states = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local = int(fields[1].rsplit(":", 1)[1], 16)
        remote = int(fields[2].rsplit(":", 1)[1], 16)
        if {local, remote} == {port_a, port_b}:
            states.append(fields[3])
    return states


def _wait_for(check: Callable[[], T | None], timeout: float, step: float = 0.005) -> T | None:
    """Poll `check` until it returns something other than None, or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None or time.monotonic() >= deadline:
            return value
        time.sleep(step)


# -- 1. Kind detection ---------------------------------------------------------------


def test_backend_kinds_detected(real: RealBackend) -> None:
    def view() -> dict[str, tuple[ApiKind, set[str], bool]]:
        return {b.name: (b.kind, set(b.models), b.online) for b in real.stack.state.fleet.backends}

    backends = real.on_loop(view)
    # llama-cpp-python answers 404 to /api/tags; its /v1/models says owned_by "me".
    assert backends[real.server_url] == (ApiKind.LLAMACPP, {normalize_model(MODEL)}, True)
    kind, models, online = backends[real.sim_url]
    assert kind is ApiKind.OLLAMA and online
    assert normalize_model("llama3.2") in models


# -- 2. Routing by model -------------------------------------------------------------


def test_routing_by_model_and_api(real: RealBackend) -> None:
    url = real.stack.url
    with _http() as client:
        r = client.post(url + "/v1/chat/completions",
                        json={"model": MODEL, "messages": _MESSAGES, "max_tokens": 8})
        assert r.status_code == 200, r.text
        assert r.headers["x-gateway-backend"] == real.server_url
        assert r.json()["object"] == "chat.completion"

        r = client.post(url + "/v1/chat/completions",
                        json={"model": "llama3.2", "messages": _MESSAGES, "max_tokens": 8})
        assert r.status_code == 200, r.text
        assert r.headers["x-gateway-backend"] == real.sim_url

        # No Ollama backend lists tiny: native requests for it go to the
        # llama.cpp server, translated (proxy/translating.py).
        for path, body in (
            ("/api/chat", {"model": MODEL, "messages": _MESSAGES, "options": {"num_predict": 4}}),
            ("/api/generate", {"model": MODEL, "prompt": "hi", "stream": False,
                               "options": {"num_predict": 4}}),
        ):
            r = client.post(url + path, json=body, timeout=30.0)
            assert r.status_code == 200, (path, r.status_code, r.text)
            assert r.headers["x-gateway-backend"] == real.server_url
            assert r.headers["x-translated"] == "ollama->openai"
            assert r.text.rstrip().splitlines()[-1].startswith('{"model":"tiny"')
        # A model no backend lists: the gateway answers 404 itself, at once,
        # in Ollama's error shape.
        started = time.monotonic()
        r = client.post(url + "/api/chat", json={"model": "nonexistent", "messages": _MESSAGES},
                        timeout=5.0)
        elapsed = time.monotonic() - started
        assert r.status_code == 404 and r.json() == {"error": "model 'nonexistent' not found"}
        assert "x-gateway-backend" not in r.headers  # never reached a backend
        assert elapsed < 1.0, f"took {elapsed:.2f} s to answer 404"

        # llama.cpp itself answers 200 for any model name; the gateway must not
        # send it a model it does not list, and answers in the OpenAI shape.
        r = client.post(url + "/v1/chat/completions",
                        json={"model": "nonexistent", "messages": _MESSAGES, "max_tokens": 4})
        assert r.status_code == 404
        assert r.json()["error"]["message"] == "model 'nonexistent' not found"
        assert r.json()["error"]["type"] == "not_found_error"


# -- 3. The official openai client through the gateway --------------------------------


def test_openai_client_stream_nonstream_completions_models(real: RealBackend) -> None:
    with _openai(real.stack.url) as client:
        stream = client.chat.completions.create(
            model=MODEL, messages=_MESSAGES, max_tokens=48, stream=True
        )
        chunks = list(stream)  # returns only after `data: [DONE]`: the stream ended
        deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        # A role chunk, one chunk per token (the model never emits end-of-text,
        # see tiny_gguf), and the finish chunk.
        assert sum(1 for d in deltas if d) >= 40, deltas
        assert "".join(deltas).strip()
        assert chunks[-1].choices[0].finish_reason == "length"

        resp = client.chat.completions.create(model=MODEL, messages=_MESSAGES, max_tokens=16)
        assert resp.choices[0].message.content
        assert resp.choices[0].finish_reason == "length"
        assert resp.usage is not None and resp.usage.completion_tokens == 16

        comp = client.completions.create(model=MODEL, prompt="the quick brown fox", max_tokens=16)
        assert comp.choices[0].text
        assert comp.choices[0].finish_reason == "length"
        assert comp.usage is not None and comp.usage.completion_tokens == 16

        texts = [c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt="the quick brown fox", max_tokens=24, stream=True
        )]
        assert len([t for t in texts if t]) >= 20

        ids = {m.id for m in client.models.list()}
        assert MODEL in ids
        assert {"llama3.2:latest", "qwen2.5:0.5b", "all-minilm:latest"} <= ids
        # The gateway answers /v1/models/{id} from its index, for either kind.
        assert client.models.retrieve(MODEL).id == MODEL
        assert client.models.retrieve("llama3.2").id == "llama3.2"


def test_sse_passes_through_unchanged(real: RealBackend) -> None:
    # The gateway relays the body bytes: llama.cpp's own SSE framing (blank-line
    # separated `data:` events, `[DONE]` last, its charset parameter) arrives as is.
    with _http() as client, client.stream(
        "POST", real.stack.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": _MESSAGES, "max_tokens": 8, "stream": True},
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert r.headers["x-gateway-backend"] == real.server_url
        body = r.read().decode()
    events = [e for e in body.replace("\r\n", "\n").split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events), events
    assert events[-1] == "data: [DONE]"


# -- 4. Cancellation reaches the real server ------------------------------------------


def _long_stream(ai: OpenAI) -> Stream[ChatCompletionChunk]:
    """A stream that runs until the context is full (the model never ends early)."""
    return ai.chat.completions.create(
        model=MODEL, messages=_MESSAGES, max_tokens=LONG_MAX_TOKENS, stream=True
    )


def test_client_disconnect_stops_real_generation(real: RealBackend) -> None:
    """A client that leaves mid-stream must stop the server's generation.

    How this is observed without flakiness:
    * The decisive evidence comes from the server itself: llama-cpp-python
      prints "Disconnected from client ... port=P" only when a stream's
      connection closes before the stream ends. The stream would run for about
      LONG_MAX_TOKENS tokens (hundreds of ms, measured below as `full_s`), while
      the close happens a few ms after the first tokens, so the margin is wide.
    * P identifies the gateway's upstream socket, so /proc/net/tcp then shows
      whether that very connection is closed on both ends (no ESTABLISHED, no
      CLOSE_WAIT), with no guessing about pooled or health-probe connections.
    * The server runs with interrupt_requests off, so a request that arrives
      while a generation runs waits for it. A short request sent right after
      the client leaves therefore answers quickly only if the generation
      stopped: its latency is compared with a full uncancelled stream measured
      on the same machine in the same run, not with a fixed number.
    """
    url = real.stack.url
    with _openai(url) as ai:
        started = time.monotonic()
        full = list(_long_stream(ai))
        full_s = time.monotonic() - started
    assert len(full) > 200, "the long stream is too short to be cancelled midway"

    cancelled_before = real.on_loop(lambda: real.stack.state.stats.cancelled)
    log_offset = len(real.log())
    noticed: list[tuple[int, float]] = []  # (gateway's upstream port, seconds after the close)

    def watch_log(closed_at: float) -> None:
        # Polled from its own thread so that the time is measured from the
        # close, independently of the follow-up request below.
        while time.monotonic() - closed_at < 5.0:
            match = _DISCONNECT_RE.search(real.log()[log_offset:])
            if match:
                noticed.append((int(match.group(1)), time.monotonic() - closed_at))
                return
            time.sleep(0.002)

    with _openai(url) as ai:
        stream = _long_stream(ai)
        iterator = iter(stream)
        next(iterator)  # role chunk
        next(iterator)  # first token
        watcher = threading.Thread(target=watch_log, args=(time.monotonic(),))
        stream.close()  # the response was not read to its end: the client drops the connection
        watcher.start()

    # The follow-up goes out at once, without waiting for any sign of the cancel.
    with _http() as client:
        started = time.monotonic()
        r = client.post(url + "/v1/chat/completions",
                        json={"model": MODEL, "messages": _MESSAGES, "max_tokens": 1})
        follow_s = time.monotonic() - started
    assert r.status_code == 200 and r.headers["x-gateway-backend"] == real.server_url

    watcher.join(6.0)
    assert noticed, (
        "llama.cpp never saw the gateway's connection close: it generated the whole stream.\n"
        + real.log()[log_offset:][-2000:]
    )
    upstream_port, notice_s = noticed[0]
    assert follow_s < full_s / 2, (
        f"a 1-token request took {follow_s:.3f} s after the cancel, against {full_s:.3f} s "
        "for a whole stream: the server was still busy with the cancelled one"
    )

    def closed_both_ends() -> bool | None:
        states = _tcp_states(upstream_port, real.server_port)
        return True if _ESTABLISHED not in states and _CLOSE_WAIT not in states else None

    assert _wait_for(closed_both_ends, timeout=2.0), _tcp_states(upstream_port, real.server_port)

    def gateway_settled() -> tuple[int, int] | None:
        backend = real.stack.state.fleet.find(real.server_url)
        assert backend is not None
        done = (backend.in_flight, real.stack.state.stats.cancelled - cancelled_before)
        return done if done == (0, 1) else None

    settled = _wait_for(lambda: real.on_loop(gateway_settled), timeout=2.0, step=0.02)
    assert settled == (0, 1), "the gateway still holds a slot for, or did not count, the cancel"
    print(f"\nfull {LONG_MAX_TOKENS}-token stream {full_s * 1000:.0f} ms; "
          f"follow-up after cancel {follow_s * 1000:.0f} ms; "
          f"server noticed the close {notice_s * 1000:.0f} ms after the client left")


def test_translated_ollama_stream_and_its_cancel_on_the_real_server(real: RealBackend) -> None:
    """The ollama client's stream on llama.cpp (translated SSE -> NDJSON), read whole,
    then one left midway: the server sees its connection close and stops."""
    import ollama

    client = ollama.Client(host=real.stack.url, headers={"X-User-ID": "translated"})
    parts = list(client.chat(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                             options={"num_predict": 20}, stream=True))
    assert parts[-1].done and parts[-1].done_reason == "length"
    assert sum(1 for p in parts if p.message.content) == 20
    # llama-cpp-python sends no usage chunk: no counts are made up (Ollama omits
    # unknown metrics), and the gateway estimates the tokens from the events.
    assert parts[-1].eval_count is None
    estimated = _wait_for(lambda: real.on_loop(
        lambda: real.stack.state.stats.users["translated"].estimated_tokens or None), timeout=2.0)
    assert estimated is not None and estimated >= 20

    log_offset = len(real.log())
    with _http() as http, http.stream("POST", real.stack.url + "/api/chat", json={
            "model": MODEL, "messages": _MESSAGES,
            "options": {"num_predict": LONG_MAX_TOKENS}}) as r:
        assert r.headers["x-translated"] == "ollama->openai"
        lines = r.iter_lines()
        assert '"done":false' in next(lines) and '"done":false' in next(lines)
        # Leaving the block closes the connection before the stream's end.
    noticed = _wait_for(lambda: _DISCONNECT_RE.search(real.log()[log_offset:]), timeout=5.0)
    assert noticed, "llama.cpp never saw the translated stream's client leave"

    def idle() -> bool | None:
        backend = real.stack.state.fleet.find(real.server_url)
        assert backend is not None
        return True if backend.in_flight == 0 else None

    assert _wait_for(lambda: real.on_loop(idle), timeout=2.0, step=0.02)


# -- 5. The server's idle keep-alive timeout ------------------------------------------


def test_pooled_connection_closed_by_server_idle_timeout(real: RealBackend) -> None:
    """uvicorn closes an idle keep-alive connection after 5 s; the gateway keeps
    pooled connections longer, so it must notice the close (no socket left in
    CLOSE_WAIT) and serve the next request on a fresh connection."""
    url = real.stack.url
    with _http() as client:
        body = {"model": MODEL, "messages": _MESSAGES, "max_tokens": 2}
        assert client.post(url + "/v1/chat/completions", json=body).status_code == 200
        time.sleep(6.0)
        stuck = [line for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                 if line.split()[3] == _CLOSE_WAIT
                 and int(line.split()[2].rsplit(":", 1)[1], 16) == real.server_port]
        assert not stuck, f"sockets to llama.cpp left half-closed: {stuck}"
        r = client.post(url + "/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.headers["x-gateway-backend"] == real.server_url


def test_concurrent_streams_all_complete(real: RealBackend) -> None:
    # Several users at once: the gateway passes them to the server (slots=4)
    # where they queue on the model lock; every stream must still end cleanly.
    results: dict[int, int] = {}
    errors: list[Exception] = []

    def one(i: int) -> None:
        try:
            with _openai(real.stack.url) as client:
                chunks = list(client.chat.completions.create(
                    model=MODEL, messages=_MESSAGES, max_tokens=32, stream=True,
                    extra_headers={"X-User-ID": f"user{i}"},
                ))
                results[i] = len(chunks)
        except Exception as exc:  # noqa: BLE001 - any failure is reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert sorted(results) == list(range(6))
    assert all(n >= 32 for n in results.values()), results


# -- 6. Health checks never hurt traffic --------------------------------------------

# A context long enough for a stream that outlasts many health checks.
HEALTH_N_CTX = 2048
HEALTH_MAX_TOKENS = 2000


@contextlib.contextmanager
def _own_server(real: RealBackend, interrupt: bool) -> Iterator[str]:
    """A second llama.cpp server on the same tiny model, with interrupt_requests as given."""
    from harness import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = real.log_path.parent / f"llama_server_{port}.log"
    proc = _start_server(real.log_path.parent / "tiny.gguf", port, log_path, interrupt=interrupt,
                         n_ctx=HEALTH_N_CTX)
    try:
        _wait_ready(proc, url, log_path)
        yield url
    finally:
        _stop_server(proc)


def _stream_tokens(base: str, user: str) -> tuple[int, str | None]:
    """Stream HEALTH_MAX_TOKENS tokens: (content chunks, finish reason)."""
    with _openai(base) as ai:
        chunks = list(ai.chat.completions.create(
            model=MODEL, messages=_MESSAGES, max_tokens=HEALTH_MAX_TOKENS, stream=True,
            extra_headers={"X-User-ID": user}))
    pieces = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    finish = next((c.choices[0].finish_reason for c in reversed(chunks)
                   if c.choices and c.choices[0].finish_reason), None)
    return pieces, finish


def test_long_stream_is_never_cut_by_health_checks(real: RealBackend) -> None:
    # Its default interrupt_requests=True: any request arriving during a
    # generation (a probe included) ends the running stream early, with no
    # finish reason. Checks run every 20 ms here, dozens during the stream.
    from harness import start_stack

    with _own_server(real, interrupt=True) as url:
        stack = start_stack(sims=[], extra_backends=[url], slots=1, health_interval=0.02)
        try:
            checks = stack.lt.call(lambda: getattr(stack.state.health, "skipped_busy", 0))
            started = time.monotonic()
            pieces, finish = _stream_tokens(stack.url, "long")
            took = time.monotonic() - started
            checks = stack.lt.call(lambda: getattr(stack.state.health, "skipped_busy", 0)) - checks
            assert finish == "length" and pieces >= HEALTH_MAX_TOKENS - 5, (pieces, finish)
            assert checks >= 5, f"only {checks} checks during a {took:.2f} s stream"
        finally:
            stack.close()


def test_busy_backend_is_never_marked_offline(real: RealBackend,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # With interrupt_requests=False its /v1/models waits for the generation: a
    # probe then times out. The backend must stay online and a second user
    # must wait in the gateway's queue, not get 503.
    from harness import start_stack

    from ollamamq_fast.fleet import health

    monkeypatch.setattr(health, "PROBE_TIMEOUT_S", 0.2)
    with _own_server(real, interrupt=False) as url:
        stack = start_stack(sims=[], extra_backends=[url], slots=1, health_interval=0.02,
                            health_fail_threshold=1)
        try:
            backend = stack.state.fleet.backends[0]
            assert backend.kind is ApiKind.LLAMACPP and backend.online
            offline_seen: list[float] = []
            done = threading.Event()

            def watch() -> None:
                while not done.is_set():
                    if not backend.online:
                        offline_seen.append(time.monotonic())
                    time.sleep(0.002)

            streamed: dict[str, tuple[int, str | None]] = {}
            streamer = threading.Thread(
                target=lambda: streamed.update(first=_stream_tokens(stack.url, "first")))
            watcher = threading.Thread(target=watch)
            watcher.start()
            streamer.start()
            assert _wait_for(lambda: True if backend.in_flight else None, timeout=10.0)
            with _http() as client:
                r = client.post(stack.url + "/v1/chat/completions",
                                headers={"X-User-ID": "second"},
                                json={"model": MODEL, "messages": _MESSAGES, "max_tokens": 4})
            streamer.join(60)
            done.set()
            watcher.join(5)
            assert r.status_code == 200, r.text
            assert int(r.headers["x-gateway-queue-ms"]) > 0  # it waited for the stream
            pieces, finish = streamed["first"]
            assert finish == "length" and pieces >= HEALTH_MAX_TOKENS - 5
            assert not offline_seen, "the backend was marked offline while it generated"
        finally:
            stack.close()


def test_server_killed_mid_stream_then_restarted(real: RealBackend) -> None:
    # SIGKILL while it streams: the client's stream ends with an error event,
    # the slot is given back, requests while it is down get 502/503 in the
    # OpenAI shape, and once restarted on its port it serves again.
    import signal

    from harness import free_port, start_stack, wait_until

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    model = real.log_path.parent / "tiny.gguf"
    log_path = real.log_path.parent / f"llama_server_{port}.log"
    proc = _start_server(model, port, log_path, interrupt=True, n_ctx=HEALTH_N_CTX)
    try:
        _wait_ready(proc, url, log_path)
        stack = start_stack(sims=[], extra_backends=[url], slots=1, health_interval=0.1)
        try:
            backend = stack.state.fleet.backends[0]
            lines: list[str] = []
            body = {"model": MODEL, "messages": _MESSAGES, "max_tokens": HEALTH_MAX_TOKENS,
                    "stream": True}

            def kill_once_streaming() -> None:
                wait_until(lambda: len(lines) >= 5, "the stream to start", 30)
                proc.send_signal(signal.SIGKILL)

            killer = threading.Thread(target=kill_once_streaming)
            killer.start()
            with _http() as client, client.stream(
                    "POST", stack.url + "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                lines.extend(ln for ln in r.iter_lines() if ln)
            killer.join(10)
            assert '"error"' in lines[-1] and "[DONE]" not in lines[-1], lines[-3:]
            wait_until(lambda: backend.in_flight == 0, "the slot to be given back")
            with _http() as client:
                r = client.post(stack.url + "/v1/chat/completions",
                                json={**body, "stream": False, "max_tokens": 4})
            assert r.status_code in (502, 503), r.text
            assert r.json()["error"]["type"] == "api_error" and "retry-after" in r.headers
            wait_until(lambda: not backend.online, "the dead server to go offline")
            proc.wait(10)
            proc = _start_server(model, port, log_path, interrupt=True, n_ctx=HEALTH_N_CTX)
            _wait_ready(proc, url, log_path)
            wait_until(lambda: backend.available, "the server to be back", 15)
            with _http() as client:
                r = client.post(stack.url + "/v1/chat/completions",
                                json={**body, "stream": False, "max_tokens": 4})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["finish_reason"] == "length"
        finally:
            stack.close()
    finally:
        _stop_server(proc)


def test_short_streams_with_idle_gaps_are_never_cut_by_probes(real: RealBackend) -> None:
    # Probes every 5 ms to an often idle one-slot server that cuts a running
    # stream when another request arrives: a probe sent to the idle server and
    # a request dispatched in the same instant must not reach it in the wrong
    # order. Every stream ends with its finish reason.
    from harness import start_stack

    with _own_server(real, interrupt=True) as url:
        stack = start_stack(sims=[], extra_backends=[url], slots=1, health_interval=0.005)
        try:
            finishes = []
            with _openai(stack.url) as ai:
                for i in range(40):
                    chunks = list(ai.chat.completions.create(
                        model=MODEL, messages=_MESSAGES, max_tokens=8, stream=True))
                    finishes.append(next((c.choices[0].finish_reason for c in reversed(chunks)
                                          if c.choices and c.choices[0].finish_reason), None))
                    time.sleep(0.001 * (i % 9))
            assert finishes == ["length"] * 40
        finally:
            stack.close()


# -- 6. Every token counted, for every client, kept across a restart --------------------

ADMIN_TOKEN = "real-backend-admin"


def _usage_rows(stack: Stack) -> dict[tuple[str, str], dict[str, object]]:
    """/api/usage of today, per user and model."""
    with _http() as client:
        r = client.get(f"http://127.0.0.1:{stack.gateway.admin_port}/api/usage",
                       params={"by": "user,model", "step": "day"},
                       headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert r.status_code == 200, r.text
    return {(str(row["user"]), str(row["model"])): row for row in r.json()["rows"]}


def test_usage_of_every_client_counted_and_kept_after_restart(
        real: RealBackend, tmp_path: Path) -> None:
    """The openai SDK, LangChain and the ollama client on a real llama.cpp server: every
    request counted with the server's own figures (or marked estimated where it reports
    none), per user and model and day in /api/usage, and still there after a restart."""
    import ollama
    from harness import free_port, start_stack

    # LangChain is optional: without it the other clients are still counted.
    try:
        import langchain_openai
    except ImportError:
        langchain_openai = None

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "llama_embedding.log"
    proc = _start_server(real.log_path.parent / "tiny.gguf", port, log_path, embedding=True)
    state = str(tmp_path / "state.db")
    model = normalize_model(MODEL)

    def gateway() -> Stack:
        return start_stack(sims=[], extra_backends=[url], admin_port=0,
                           admin_token=ADMIN_TOKEN, state_path=state)

    try:
        _wait_ready(proc, url, log_path)
        stack = gateway()
        try:
            # The openai SDK: a chat, a stream (llama.cpp ignores the usage
            # request: estimated), a completion and an embedding (prompt only).
            from openai import OpenAI
            with OpenAI(base_url=stack.url + "/v1", api_key="x", max_retries=0,
                        default_headers={"X-User-ID": "sdk"}) as ai:
                chat = ai.chat.completions.create(model=MODEL, messages=_MESSAGES, max_tokens=8)
                assert chat.usage is not None and chat.usage.completion_tokens == 8
                streamed = list(ai.chat.completions.create(
                    model=MODEL, messages=_MESSAGES, max_tokens=12, stream=True))
                assert streamed[-1].choices and streamed[-1].choices[0].finish_reason == "length"
                comp = ai.completions.create(model=MODEL, prompt="the quick brown fox",
                                             max_tokens=6)
                assert comp.usage is not None and comp.usage.completion_tokens == 6
                emb = ai.embeddings.create(model=MODEL, input="hello world")
                assert emb.usage is not None and emb.usage.prompt_tokens > 0
            sdk_exact = (chat.usage.prompt_tokens + comp.usage.prompt_tokens
                         + emb.usage.prompt_tokens, 8 + 6)

            if langchain_openai is not None:
                # LangChain's ChatOpenAI sends max_completion_tokens, which llama.cpp
                # ignores: the gateway mirrors it as max_tokens, so the answer stops.
                lc = langchain_openai.ChatOpenAI(
                    base_url=stack.url + "/v1", api_key="x", model=MODEL, max_tokens=5,
                    max_retries=0, default_headers={"X-User-ID": "langchain"})
                answer = lc.invoke("say hello")
                assert answer.content and answer.usage_metadata is not None
                assert answer.usage_metadata["output_tokens"] == 5
                pieces = [c.content for c in lc.stream("say hello")]
                assert "".join(str(p) for p in pieces)
                # check_embedding_ctx_length=False: else it tokenizes with tiktoken,
                # whose tables come from the network.
                vectors = langchain_openai.OpenAIEmbeddings(
                    base_url=stack.url + "/v1", api_key="x", model=MODEL, max_retries=0,
                    check_embedding_ctx_length=False,
                    default_headers={"X-User-ID": "langchain"}).embed_documents(["hello world"])
                assert len(vectors) == 1 and vectors[0]

            # The ollama client speaks /api/*: translated to the OpenAI server.
            oc = ollama.Client(host=stack.url, headers={"X-User-ID": "ollama"})
            reply = oc.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                            options={"num_predict": 7})
            assert reply.message.content and reply.eval_count == 7
            parts = list(oc.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                 options={"num_predict": 9}, stream=True))
            assert parts[-1].done and sum(1 for p in parts if p.message.content) >= 5
            # Ollama answers unit vectors cut to `dimensions`; the server ignores it.
            embedded = oc.embed(model=MODEL, input="hello world", dimensions=8)
            assert embedded.embeddings and embedded.prompt_eval_count
            assert len(embedded.embeddings[0]) == 8
            assert abs(sum(v * v for v in embedded.embeddings[0]) - 1.0) < 1e-6

            lc_requests = 0 if langchain_openai is None else 3

            def settled() -> dict[tuple[str, str], dict[str, object]] | None:
                stack.lt.run(stack.state.cache.flush())
                rows = _usage_rows(stack)
                done = rows.get(("sdk", model), {}).get("requests") == 4 and \
                    rows.get(("langchain", model), {}).get("requests", 0) == lc_requests and \
                    rows.get(("ollama", model), {}).get("requests") == 3
                return rows if done else None

            rows = _wait_for(settled, timeout=10.0, step=0.1)
            assert rows is not None, _usage_rows(stack)
            sdk = rows[("sdk", model)]
            # The server's own figures for the three answers that carry usage, and
            # the stream's 12 tokens counted from its events, marked estimated.
            assert sdk["prompt_tokens"] == sdk_exact[0], sdk
            assert sdk["completion_tokens"] == sdk_exact[1] + 12, sdk
            assert sdk["estimated_tokens"] == 12 and sdk["exact"] is False, sdk
            oll = rows[("ollama", model)]
            assert oll["completion_tokens"] >= 7 + 5 and oll["prompt_tokens"] > 0, oll
            checked = [sdk, oll]
            if langchain_openai is not None:
                lang = rows[("langchain", model)]
                assert lang["completion_tokens"] >= 5 + 4 and lang["prompt_tokens"] > 0, lang
                checked.append(lang)
            assert all(row["errors"] == 0 and row["cancelled"] == 0 for row in checked), rows
        finally:
            stack.close()

        # A new process on the same state: the same report.
        stack = gateway()
        try:
            after = _usage_rows(stack)
            for who in ("sdk", "ollama") + (("langchain",) if lc_requests else ()):
                assert after[(who, model)] == rows[(who, model)], (who, after)
        finally:
            stack.close()
    finally:
        _stop_server(proc)


# -- 10. What a new user met in front of the real server ---------------------------------
# (tests/fake_llama.py copies each of these for the default suite: test_llama_gateway.py)


def _user_row(real: RealBackend, user: str) -> tuple[int, int, int, int] | None:
    def view() -> tuple[int, int, int, int] | None:
        u = real.stack.state.stats.users.get(user)
        if u is None or u.in_flight:
            return None
        return u.done, u.dropped, u.completion_tokens, u.estimated_tokens
    return real.on_loop(view)


def test_one_request_id_per_answer_the_gateways(real: RealBackend) -> None:
    # The server answers with an x-request-id of its own: the one it was sent, or
    # one it made up when the gateway kept the client's (not a UUID) to itself.
    with _http() as client:
        for sent in ({}, {"X-Request-ID": "trace-42"}):
            r = client.post(real.stack.url + "/v1/chat/completions", headers=sent,
                            json={"model": MODEL, "messages": _MESSAGES, "max_tokens": 4})
            assert r.status_code == 200, r.text
            ids = r.headers.get_list("x-request-id")
            assert len(ids) == 1 and ids[0] == sent.get("X-Request-ID", ids[0]), ids


def test_an_ollama_curl_without_a_json_type_is_translated(real: RealBackend) -> None:
    # Ollama's docs: `curl .../api/chat -d '{...}'`, which sends a form type; the
    # server refuses a body of that type (500), the gateway sends its JSON as JSON.
    import orjson

    body = orjson.dumps({"model": MODEL, "stream": False, "messages": _MESSAGES,
                         "options": {"num_predict": 4}})
    with _http() as client:
        r = client.post(real.stack.url + "/api/chat", content=body,
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    assert r.json()["done"] is True and r.json()["eval_count"] == 4


def test_an_openai_curl_without_a_json_type_is_sent_as_json(real: RealBackend) -> None:
    # `curl .../v1/chat/completions -d '{...}'` without -H 'Content-Type: ...' sends a
    # form type: the server (FastAPI) read no object and answered 500; relayed, the
    # body is now sent as the JSON the gateway read.
    import orjson

    with _http() as client:
        for path, extra in (("/v1/chat/completions", {"messages": _MESSAGES}),
                            ("/v1/completions", {"prompt": "hello"})):
            body = orjson.dumps({"model": MODEL, "max_tokens": 4, **extra})
            r = client.post(real.stack.url + path, content=body,
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_stream_tokens_without_usage_are_counted_exactly(real: RealBackend, path: str) -> None:
    # The server sends no usage in streams: one event a token, counted exactly
    # (a completions stream has no role event to take off).
    user = "exact" + path.replace("/", "-")
    body: dict[str, object] = {"model": MODEL, "max_tokens": 12, "stream": True}
    body.update({"messages": _MESSAGES} if "chat" in path else {"prompt": "the quick brown fox"})
    with _http() as client:
        r = client.post(real.stack.url + path, json=body, headers={"X-User-ID": user})
    assert r.status_code == 200
    assert r.text.count('"finish_reason": "length"') == 1
    row = _wait_for(lambda: _user_row(real, user), timeout=5.0)
    assert row == (1, 0, 12, 12), row


def test_a_client_leaving_is_charged_the_tokens_it_was_sent(real: RealBackend) -> None:
    user = "leaves-early"
    with _openai(real.stack.url) as ai:
        stream = ai.with_options(default_headers={"X-User-ID": user}).chat.completions.create(
            model=MODEL, messages=_MESSAGES, max_tokens=LONG_MAX_TOKENS, stream=True)
        seen = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content is not None:
                seen += 1
                if seen == 10:
                    break
        stream.close()
    row = _wait_for(lambda: _user_row(real, user), timeout=5.0)
    assert row is not None and row[:2] == (0, 1), row
    # At least what it read, more if the gateway had relayed further (this model
    # makes thousands of tokens a second), never more than the server made.
    assert row[2] == row[3] and 10 <= row[2] <= LONG_MAX_TOKENS, row


def test_a_body_that_is_not_json_gets_400_in_the_apis_shape(real: RealBackend) -> None:
    # The server answers a bare "500 Internal Server Error" (plain text) to a body
    # that is not JSON; the gateway reads only the top level, and says what is wrong.
    with _http() as client:
        r = client.post(real.stack.url + "/v1/chat/completions", headers={
            "Content-Type": "application/json"}, content=b'{"model":"tiny","messages":'
            b'[{"role":"user","content":"hi",}],"max_tokens":2}')
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"].startswith("invalid JSON in request body"), r.text
        r = client.post(real.stack.url + "/v1/chat/completions",
                        json={"model": MODEL, "messages": _MESSAGES, "max_tokens": 2})
        assert r.status_code == 200, r.text


def test_an_ollama_body_with_a_lone_surrogate_is_read_as_go_reads_it(real: RealBackend) -> None:
    with _http() as client:
        r = client.post(real.stack.url + "/api/chat", content=b'{"model":"tiny","stream":false,'
                        b'"options":{"num_predict":2},'
                        b'"messages":[{"role":"user","content":"a\\ud800b"}]}')
    assert r.status_code == 200, r.text
    assert r.json()["done"] is True
