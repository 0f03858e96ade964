"""Health checks never hurt traffic (fakes of llama-cpp-python's locking, tests/fake_llama.py).

- a server whose probe path blocks while it generates is not marked offline,
  and queued users wait for it instead of getting 503;
- a server that cuts its running stream when any other request arrives
  streams to the end with checks running every few milliseconds;
- each check sends one request the backend's kind understands, none while busy;
- the kind is configured or detected once.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fake_llama import MODEL, FakeLlama, start_fake
from harness import LoopThread, Stack, start_stack, wait_until

from ollamamq_fast.config import (
    BACKEND_KINDS,
    BackendOptions,
    ConfigError,
    Settings,
    apply_toml,
)
from ollamamq_fast.fleet import health
from ollamamq_fast.fleet.backend import ApiKind, Backend


@pytest.fixture
def fake_loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.stop()


def stream_chat(url: str, user: str, out: dict[str, Any]) -> None:
    """Stream one chat completion; record the content pieces and the finish reason."""
    pieces: list[str] = []
    finish = None
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "q"}]}
    with httpx.Client(timeout=30) as client, client.stream(
            "POST", url + "/v1/chat/completions", headers={"X-User-ID": user}, json=body) as r:
        out["status"] = r.status_code
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices") or []:
                if choice["delta"].get("content"):
                    pieces.append(choice["delta"]["content"])
                finish = choice.get("finish_reason") or finish
    out["pieces"], out["finish"] = pieces, finish


def chat(url: str, user: str) -> int:
    with httpx.Client(timeout=30) as client:
        r = client.post(url + "/v1/chat/completions", headers={"X-User-ID": user},
                        json={"model": MODEL, "messages": [{"role": "user", "content": "q"}]})
        return r.status_code


def only_backend(st: Stack) -> Backend:
    backend: Backend = st.state.fleet.backends[0]
    return backend


def hits(lt: LoopThread, fake: FakeLlama) -> dict[str, int]:
    result: dict[str, int] = lt.call(lambda: dict(fake.hits))
    return result


def clear_hits(lt: LoopThread, fake: FakeLlama) -> None:
    lt.call(fake.hits.clear)


def watch_online(st: Stack, backend: Backend, stop: threading.Event) -> list[bool]:
    """Sample backend.online until `stop` is set (from a thread); returns the samples."""
    samples: list[bool] = []

    def run() -> None:
        while not stop.is_set():
            samples.append(backend.online)
            time.sleep(0.005)

    threading.Thread(target=run, daemon=True).start()
    return samples


def test_blocking_probe_never_marks_a_generating_backend_offline(
        fake_loop: LoopThread, monkeypatch: pytest.MonkeyPatch) -> None:
    # llama-cpp-python with interrupt_requests=False: /v1/models waits for the
    # generation. A probe sent then would time out; the backend must stay online
    # and users queued behind the stream must wait for it, not get 503.
    monkeypatch.setattr(health, "PROBE_TIMEOUT_S", 0.3)
    fake = start_fake(fake_loop, interrupt_requests=False, chunks=40, chunk_delay=0.03)
    st = start_stack(sims=[], extra_backends=[fake.url], slots=1, health_interval=0.05,
                     health_fail_threshold=1)
    try:
        backend = only_backend(st)
        assert backend.online
        stop = threading.Event()
        samples = watch_online(st, backend, stop)
        streamed: dict[str, Any] = {}
        streamer = threading.Thread(target=stream_chat, args=(st.url, "alice", streamed))
        streamer.start()
        wait_until(lambda: fake.generating == 1, "the stream to start")
        statuses: list[int] = []
        waiters = [threading.Thread(target=lambda u=u: statuses.append(chat(st.url, u)))
                   for u in ("bob", "carol")]
        for t in waiters:
            t.start()
        for t in [streamer, *waiters]:
            t.join(30)
        stop.set()
        assert statuses == [200, 200]
        assert streamed["status"] == 200 and len(streamed["pieces"]) == 40
        assert streamed["finish"] == "stop"
        assert samples and all(samples), "the backend was marked offline while generating"
    finally:
        st.close()
        fake_loop.run(fake.close())


def test_interrupting_server_long_stream_completes_with_checks_running(
        fake_loop: LoopThread) -> None:
    # llama-cpp-python's default: any request arriving while it generates (a
    # probe included) stops the running stream with [DONE] and no finish reason.
    fake = start_fake(fake_loop, interrupt_requests=True, chunks=80, chunk_delay=0.015)
    st = start_stack(sims=[], extra_backends=[fake.url], slots=1, health_interval=0.02)
    try:
        checks_before = st.lt.call(lambda: getattr(st.state.health, "skipped_busy", 0))
        streamed: dict[str, Any] = {}
        stream_chat(st.url, "alice", streamed)
        assert fake.interrupted == 0
        assert len(streamed["pieces"]) == 80 and streamed["finish"] == "stop"
        # Checks did run during the stream; they sent nothing.
        assert st.lt.call(lambda: st.state.health.skipped_busy) > checks_before
    finally:
        st.close()
        fake_loop.run(fake.close())


def test_one_request_per_check_and_none_while_busy(fake_loop: LoopThread) -> None:
    fake = start_fake(fake_loop, interrupt_requests=True, chunks=40, chunk_delay=0.02)
    st = start_stack(sims=[], extra_backends=[fake.url], slots=1, health_interval=3600.0)
    try:
        backend = only_backend(st)
        # Detected once, at first contact: the only time /api/tags is tried.
        assert backend.kind is ApiKind.LLAMACPP and backend.online
        assert hits(fake_loop, fake) == {"/api/tags": 1, "/v1/models": 1}
        clear_hits(fake_loop, fake)
        probe = st.state.health.probe
        for _ in range(5):
            st.lt.run(probe(backend))
        assert hits(fake_loop, fake) == {"/v1/models": 5}

        clear_hits(fake_loop, fake)
        streamed: dict[str, Any] = {}
        streamer = threading.Thread(target=stream_chat, args=(st.url, "alice", streamed))
        streamer.start()
        wait_until(lambda: fake.generating == 1, "the stream to start")
        for _ in range(5):
            st.lt.run(probe(backend))
        streamer.join(30)
        assert hits(fake_loop, fake) == {"/v1/chat/completions": 1}
        assert fake.interrupted == 0 and streamed["finish"] == "stop"
        # The stream just answered: the next check trusts it, the one after probes.
        st.lt.run(probe(backend))
        assert hits(fake_loop, fake) == {"/v1/chat/completions": 1}
        st.lt.run(probe(backend))
        assert hits(fake_loop, fake) == {"/v1/chat/completions": 1, "/v1/models": 1}
    finally:
        st.close()
        fake_loop.run(fake.close())


def test_ollama_kind_one_request_per_check_models_on_their_own_schedule(
        fake_loop: LoopThread) -> None:
    fake = start_fake(fake_loop, ollama=True)
    st = start_stack(sims=[], extra_backends=[fake.url], health_interval=3600.0)
    try:
        backend = only_backend(st)
        assert backend.kind is ApiKind.OLLAMA and backend.version == "0.12.3"
        # First contact also asks once whether its /v1 layer is there (translation).
        assert hits(fake_loop, fake) == {"/api/tags": 1, "/api/version": 1, "/v1/models": 1}
        clear_hits(fake_loop, fake)
        checker = st.state.health
        for _ in range(3):
            st.lt.run(checker.probe(backend))
        assert hits(fake_loop, fake) == {"/api/ps": 3}
        clear_hits(fake_loop, fake)
        st.lt.call(setattr, checker, "models_interval", 0.0)
        st.lt.run(checker.probe(backend))
        assert hits(fake_loop, fake) == {"/api/tags": 1}
    finally:
        st.close()
        fake_loop.run(fake.close())


def test_configured_kind_is_not_detected(fake_loop: LoopThread) -> None:
    fake = start_fake(fake_loop)
    st = start_stack(sims=[], extra_backends=[fake.url], health_interval=3600.0,
                     backend_options={fake.url: BackendOptions(kind="llamacpp")})
    try:
        backend = only_backend(st)
        assert backend.kind is ApiKind.LLAMACPP and backend.online
        assert set(backend.models) == {"tiny:latest"}
        assert hits(fake_loop, fake) == {"/v1/models": 1}  # no /api/tags 404
    finally:
        st.close()
        fake_loop.run(fake.close())


def test_probe_path_probed_while_busy_and_its_timeout_is_not_a_failure(
        fake_loop: LoopThread, monkeypatch: pytest.MonkeyPatch) -> None:
    # An operator-set probe path and interval are probed even while requests
    # run; this one blocks during generation, so those probes time out.
    monkeypatch.setattr(health, "PROBE_TIMEOUT_S", 0.1)
    fake = start_fake(fake_loop, interrupt_requests=False, chunks=30, chunk_delay=0.03)
    options = BackendOptions(kind="llamacpp", probe_path="/slow-health", probe_interval=0.05)
    st = start_stack(sims=[], extra_backends=[fake.url], slots=1, health_interval=3600.0,
                     health_fail_threshold=1, backend_options={fake.url: options})
    try:
        backend = only_backend(st)
        stop = threading.Event()
        samples = watch_online(st, backend, stop)
        streamed: dict[str, Any] = {}
        stream_chat(st.url, "alice", streamed)
        stop.set()
        assert streamed["finish"] == "stop"
        assert hits(fake_loop, fake).get("/slow-health", 0) >= 2
        assert samples and all(samples), "a slow probe took a busy backend offline"
    finally:
        st.close()
        fake_loop.run(fake.close())


def test_backend_kind_and_probe_settings_in_the_config_file() -> None:
    s = Settings()
    apply_toml(s, {"backends": [
        {"url": "http://a:8080", "kind": "llamacpp", "probe_path": "/health",
         "probe_interval": 5},
        {"url": "http://b:11434"},
    ]})
    assert s.backend_options == {
        "http://a:8080": BackendOptions("llamacpp", "/health", 5.0)}
    for bad in ({"kind": "llama"}, {"probe_path": "health"}, {"probe_interval": 0},
                {"probe_interval": True}):
        with pytest.raises(ConfigError):
            apply_toml(Settings(), {"backends": [{"url": "http://a:8080", **bad}]})


def test_backend_kind_flag() -> None:
    from ollamamq_fast.cli import build_parser, settings_from_args

    def parse(*argv: str) -> Settings:
        return settings_from_args(build_parser().parse_args(["serve", *argv]))

    s = parse("-o", "http://a:8080,http://b:8000", "--backend-kind", "llamacpp")
    assert {u: o.kind for u, o in s.backend_options.items()} == {
        "http://a:8080": "llamacpp", "http://b:8000": "llamacpp"}
    s = parse("-o", "a:8080,b:8000", "--backend-kind", "http://b:8000=vllm")
    assert {u: o.kind for u, o in s.backend_options.items()} == {"http://b:8000": "vllm"}
    with pytest.raises(ConfigError):
        parse("-o", "a:8080", "--backend-kind", "llama")
    with pytest.raises(ConfigError):
        parse("-o", "a:8080", "--backend-kind", "http://c:1=vllm")


def test_kind_names_match() -> None:
    assert set(BACKEND_KINDS) - {"auto"} == {k.value for k in ApiKind} - {"unknown"}


def test_reload_applies_backend_kind_and_probe_settings(fake_loop: LoopThread, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fake = start_fake(fake_loop)
    config = tmp_path / "gw.toml"
    config.write_text(f'[[backends]]\nurl = "{fake.url}"\nkind = "vllm"\n'
                      'probe_path = "/health"\nprobe_interval = 30\n')
    st = start_stack(sims=[], extra_backends=[fake.url], health_interval=3600.0,
                     config_path=str(config))
    try:
        backend = only_backend(st)
        assert backend.kind is ApiKind.LLAMACPP  # detected from owned_by
        st.lt.call(st.gateway.reload)
        assert backend.kind is ApiKind.VLLM and backend.kind_configured
        assert (backend.probe_path, backend.probe_interval) == ("/health", 30.0)
    finally:
        st.close()
        fake_loop.run(fake.close())


def test_request_ids_a_uuid_only_server_accepts(fake_loop: LoopThread) -> None:
    # llama-cpp-python refuses (400, empty body) any X-Request-ID that is not a
    # UUID: the gateway's own ids are UUIDs, and a client's other id is kept for
    # the client and the access log but not sent on.
    fake = start_fake(fake_loop, interrupt_requests=False, chunks=2, chunk_delay=0.0)
    st = start_stack(sims=[], extra_backends=[fake.url])
    body = {"model": MODEL, "messages": [{"role": "user", "content": "q"}]}
    try:
        with httpx.Client(timeout=10) as client:
            for sent in (None, "trace-42.a", "0f8fad5b-d9cb-469f-a165-70867728950e"):
                headers = {"X-Request-ID": sent} if sent else {}
                r = client.post(st.url + "/v1/chat/completions", json=body, headers=headers)
                assert r.status_code == 200, (sent, r.status_code, r.text)
                rid = r.headers["x-request-id"]
                if sent:
                    assert rid == sent
                else:
                    uuid.UUID(rid)  # the gateway's own id is a UUID
        assert fake.bad_request_ids == []
    finally:
        st.close()
        fake_loop.run(fake.close())


def test_a_busy_ollama_backend_still_has_its_model_list_read_when_due() -> None:
    # A backend never idle (steady traffic) got no check at all, so a model
    # pulled on its host was never routed there. Ollama answers /api/tags while
    # it generates: its list is read when due, even while requests run.
    from harness import fast_sim_options

    from ollamamq_fast.sim.models import parse_name

    slow = fast_sim_options(models=["llama3.2:latest"], tokens=60, tokens_per_s=40.0)
    st = start_stack(sims=[slow], slots=1, health_interval=3600.0)
    try:
        backend = only_backend(st)
        checker = st.state.health
        store = st.sims[0].app.store
        streamed: dict[str, Any] = {}

        def stream() -> None:
            with httpx.Client(timeout=30) as client, client.stream(
                    "POST", st.url + "/api/generate",
                    json={"model": "llama3.2", "prompt": "q"}) as r:
                streamed["lines"] = [json.loads(ln) for ln in r.iter_lines() if ln]

        streamer = threading.Thread(target=stream)
        streamer.start()
        wait_until(lambda: backend.in_flight == 1, "the stream to run")
        name = parse_name("qwen2.5:0.5b")
        assert name is not None
        st.lt.call(store.add, name)
        st.lt.run(checker.probe(backend))  # not due yet: live traffic answers
        assert "qwen2.5:0.5b" not in backend.models
        st.lt.call(setattr, checker, "models_interval", 0.0)
        st.lt.run(checker.probe(backend))
        assert "qwen2.5:0.5b" in backend.models and backend.in_flight == 1
        streamer.join(30)
        assert streamed["lines"][-1]["done"] is True
    finally:
        st.close()


def test_a_probe_sent_to_an_idle_server_holds_requests_until_it_is_answered(
        fake_loop: LoopThread) -> None:
    # The probe is decided on an idle llama-cpp-python; a request dispatched
    # there before the probe arrived reached the server first, and the probe
    # then cut its stream (interrupt_requests). The probe's way to the server
    # is made slow here, so that the request would always win the race.
    import asyncio

    fake = start_fake(fake_loop, interrupt_requests=True, chunks=40, chunk_delay=0.02)
    st = start_stack(sims=[], extra_backends=[fake.url], slots=1, health_interval=3600.0)
    try:
        backend = only_backend(st)
        checker = st.state.health
        real_get = checker._get_json

        async def slow_get(b: Backend, path: str, parse: bool = True) -> tuple[int, Any]:
            await asyncio.sleep(0.3)
            return await real_get(b, path, parse)

        st.lt.call(setattr, checker, "_get_json", slow_get)
        clear_hits(fake_loop, fake)
        probe = asyncio.run_coroutine_threadsafe(checker.probe(backend), st.lt.loop)
        wait_until(lambda: backend.probing > 0, "the probe to be on its way")
        streamed: dict[str, Any] = {}
        stream_chat(st.url, "alice", streamed)
        probe.result(10)
        assert streamed["status"] == 200
        assert fake.interrupted == 0 and streamed["finish"] == "stop"
        assert hits(fake_loop, fake) == {"/v1/models": 1, "/v1/chat/completions": 1}
        assert backend.online and backend.available and backend.probing == 0
    finally:
        st.close()
        fake_loop.run(fake.close())


def test_a_detected_backend_back_as_another_kind_of_server_is_detected_again(
        fake_loop: LoopThread) -> None:
    # Ollama on the address is replaced by llama-cpp-python: the Ollama probe
    # (/api/ps) would 404 for ever and keep it offline; an offline backend
    # whose kind was detected is detected again.
    from harness import fast_sim_options

    st = start_stack(sims=[fast_sim_options()], health_interval=0.05)
    fake: FakeLlama | None = None
    try:
        backend = only_backend(st)
        assert backend.kind is ApiKind.OLLAMA
        port = st.sims[0].port
        st.lt.run(st.sims[0].close())
        st.sims.clear()
        wait_until(lambda: not backend.online, "the backend to go offline")
        fake = start_fake(fake_loop, port=port)
        wait_until(lambda: backend.online, "the backend to come back")
        assert backend.kind is ApiKind.LLAMACPP and list(backend.models) == ["tiny:latest"]
        r = httpx.post(st.url + "/api/chat", timeout=10, json={
            "model": MODEL, "stream": False, "messages": [{"role": "user", "content": "q"}]})
        assert r.status_code == 200 and r.headers["x-translated"] == "ollama->openai"
    finally:
        st.close()
        if fake is not None:
            fake_loop.run(fake.close())


def test_an_endless_model_list_fails_the_check_instead_of_filling_memory() -> None:
    # A faulty backend whose /api/tags never ends: the check reads at most
    # CONTROL_BODY_MAX bytes, then fails, rather than buffering all that
    # arrives until the probe's timeout (gigabytes on a fast link).
    from harness import SocketBackend

    class Endless(SocketBackend):
        endless = False
        sent = 0

        def answer(self, conn: Any, head: bytes) -> None:
            tags = b'{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest"}]}'
            if not self.endless:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Connection: close\r\nContent-Length: %d\r\n\r\n%b"
                             % (len(tags), tags))
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            part = b"%x\r\n%b\r\n" % (1 << 20, b" " * (1 << 20))
            try:
                while self.sent < 400 << 20:
                    conn.sendall(part)
                    self.sent += 1 << 20
                    time.sleep(0.01)
            except OSError:
                return

    backend_server = Endless()
    st = start_stack(sims=[], extra_backends=[backend_server.url], health_interval=3600.0,
                     health_fail_threshold=1,
                     backend_options={backend_server.url: BackendOptions(kind="ollama")})
    try:
        backend = only_backend(st)
        assert backend.online
        backend_server.endless = True
        checker = st.state.health
        st.lt.call(setattr, checker, "models_interval", 0.0)
        began = time.monotonic()
        st.lt.run(checker.probe(backend))
        assert time.monotonic() - began < 2.0  # the probe's timeout is 3 s
        assert not backend.online and "longer than" in backend.last_error
        assert backend_server.sent < 100 << 20
    finally:
        st.close()
        backend_server.close()
