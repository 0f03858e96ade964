"""Failure handling: failover before the first byte, error frames after it,
the circuit breaker, drain."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from harness import LoopThread, fast_sim_options, free_port, start_stack


def _gen(client: httpx.Client, url: str, user: str = "u", stream: bool = False) -> httpx.Response:
    return client.post(url + "/api/generate", headers={"X-User-ID": user},
                       json={"model": "llama3.2", "prompt": "q", "stream": stream})


def test_backend_refusing_connections_loses_nothing() -> None:
    st = start_stack(sims=[fast_sim_options(), fast_sim_options()], slots=2)
    try:
        # Both probed online; now one dies and refuses connections.
        st.lt.run(st.sims[1].close())
        with httpx.Client(timeout=10) as client:
            statuses = [_gen(client, st.url, f"u{i % 3}").status_code for i in range(30)]
        assert statuses == [200] * 30
        dead = st.state.fleet.backends[1]
        assert dead.failures >= 1
        assert not dead.available  # its breaker opened
    finally:
        st.close()


def test_backend_killed_mid_run() -> None:
    slow = fast_sim_options(tokens=200, tokens_per_s=50.0)
    st = start_stack(sims=[slow, fast_sim_options(tokens=3)], slots=1)
    try:
        results: dict[str, object] = {}
        streaming = threading.Event()

        def stream_on_first() -> None:
            with httpx.Client(timeout=10) as client, client.stream(
                    "POST", st.url + "/api/chat", headers={"X-User-ID": "s"},
                    json={"model": "llama3.2",
                          "messages": [{"role": "user", "content": "q"}]}) as r:
                results["backend"] = r.headers["x-gateway-backend"]
                lines: list[dict[str, object]] = []
                results["lines"] = lines
                for ln in r.iter_lines():
                    if ln:
                        lines.append(json.loads(ln))
                        streaming.set()  # its backend is generating: the time to kill it

        t = threading.Thread(target=stream_on_first)
        t.start()
        assert streaming.wait(10), "the stream never started"
        busy = next(i for i, b in enumerate(st.state.fleet.backends) if b.in_flight)
        st.lt.run(st.sims[busy].close())
        t.join(10)
        assert not t.is_alive(), "the stream hung after its backend died"
        lines = results["lines"]
        assert isinstance(lines, list)
        assert "error" in lines[-1] and not any("error" in ln for ln in lines[:-1])
        # Queued and new requests go to the survivor.
        with httpx.Client(timeout=10) as client:
            statuses = [_gen(client, st.url, f"u{i}").status_code for i in range(10)]
        assert statuses == [200] * 10
    finally:
        st.close()


class _Busy503:
    """A backend that lists llama3.2 but answers every inference with a fast 503."""

    def __init__(self, lt: LoopThread) -> None:
        self.port = free_port()
        self.inference = 0
        self.lt = lt
        lt.run(self._start())

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tags = json.dumps({"models": [{"name": "llama3.2:latest", "model": "llama3.2:latest"}]})
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                path = head.split(b" ")[1]
                if path.startswith(b"/api/tags"):
                    status, body = 200, tags.encode()
                elif path.startswith(b"/api/version"):
                    status, body = 200, b'{"version":"0.12.0"}'
                elif path.startswith(b"/api/ps"):
                    status, body = 200, b'{"models":[]}'
                else:
                    self.inference += 1
                    status = 503
                    body = b'{"error":"server busy, please try again.  maximum pending requests exceeded"}'
                writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json; charset=utf-8\r\n"
                             b"Content-Length: %d\r\n\r\n%b" % (status, len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def close(self) -> None:
        self.server.close()


def test_fast_503_backend_does_not_swallow_traffic() -> None:
    lt = LoopThread()
    busy = _Busy503(lt)
    try:
        st = start_stack(sims=[fast_sim_options(tokens=2)], slots=4,
                         extra_backends=[f"http://127.0.0.1:{busy.port}"])
        try:
            with httpx.Client(timeout=10) as client:
                rs = [_gen(client, st.url, f"u{i % 4}") for i in range(40)]
            assert [r.status_code for r in rs] == [200] * 40
            assert all(r.headers["x-gateway-backend"] == st.sims[0].url for r in rs)
            # The breaker opened after a few fast 503s: the busy backend saw few requests.
            assert busy.inference <= 5
        finally:
            st.close()
    finally:
        lt.call(busy.close)
        lt.stop()


def test_only_backend_503_is_relayed_unchanged() -> None:
    lt = LoopThread()
    busy = _Busy503(lt)
    try:
        st = start_stack(sims=[], extra_backends=[f"http://127.0.0.1:{busy.port}"])
        try:
            r = httpx.post(st.url + "/api/generate", json={"model": "llama3.2", "prompt": "q"})
            assert r.status_code == 503
            assert r.json()["error"].startswith("server busy")
        finally:
            st.close()
    finally:
        lt.call(busy.close)
        lt.stop()


def test_drain_stops_new_requests_and_undrain_restores() -> None:
    st = start_stack(sims=[fast_sim_options(), fast_sim_options()], slots=2)
    try:
        first = st.sims[0].url
        st.lt.call(st.state.set_draining, first, True)
        with httpx.Client(timeout=10) as client:
            rs = [_gen(client, st.url, f"u{i}") for i in range(8)]
        assert all(r.headers["x-gateway-backend"] == st.sims[1].url for r in rs)
        st.lt.call(st.state.set_draining, first, False)
        with httpx.Client(timeout=10) as client:
            used = {_gen(client, st.url, f"v{i}").headers["x-gateway-backend"] for i in range(8)}
        assert first in used
        with pytest.raises(KeyError):
            st.lt.call(st.state.set_draining, "http://nowhere:1", True)
    finally:
        st.close()


def test_no_backend_online_is_503_not_a_hang() -> None:
    st = start_stack(sims=[], extra_backends=[f"http://127.0.0.1:{free_port()}"])
    try:
        r = httpx.post(st.url + "/v1/chat/completions", timeout=5,
                       json={"model": "llama3.2", "messages": [{"role": "user", "content": "q"}]})
        assert r.status_code == 503 and "retry-after" in r.headers
        assert r.json()["error"]["message"] == "no backend is online"
        assert httpx.get(st.url + "/").status_code == 503
    finally:
        st.close()


def test_api_version_invents_nothing_without_an_ollama_backend() -> None:
    # An OpenAI-only fleet, then a dead one: 503 in Ollama's shape, as if Ollama
    # were unreachable, never a made-up version number.
    st = start_stack(sims=[fast_sim_options(api="openai")],
                     extra_backends=[f"http://127.0.0.1:{free_port()}"])
    try:
        r = httpx.get(st.url + "/api/version", timeout=5)
        assert r.status_code == 503 and "retry-after" in r.headers
        assert r.json() == {"error": "no Ollama backend is online"}
        head = httpx.head(st.url + "/api/version", timeout=5)
        assert head.status_code == 503 and head.content == b""
    finally:
        st.close()
    st = start_stack()
    try:
        want = httpx.get(st.sims[0].url + "/api/version", timeout=5).json()
        assert httpx.get(st.url + "/api/version", timeout=5).json() == want
    finally:
        st.close()


def test_probe_thresholds_take_a_backend_out_and_back() -> None:
    from ollamamq_fast.sim import start_sim

    st = start_stack(sims=[fast_sim_options()], health_interval=3600.0,
                     health_fail_threshold=2, health_ok_threshold=2)
    try:
        sim = st.sims[0]
        port = sim.port
        backend = st.state.fleet.backends[0]
        probe = st.state.health.probe
        st.lt.run(sim.close())
        st.lt.run(probe(backend))
        assert backend.online  # one failed probe is not enough
        st.lt.run(probe(backend))
        assert not backend.online
        st.sims[0] = st.lt.run(start_sim(fast_sim_options(), "127.0.0.1", port))
        st.lt.run(probe(backend))
        assert not backend.online  # one good probe is not enough either
        st.lt.run(probe(backend))
        assert backend.online
        with httpx.Client(timeout=10) as client:
            assert _gen(client, st.url).status_code == 200
    finally:
        st.close()


def test_reset_cancels_the_breaker_timer_on_uvloop() -> None:
    # uvloop's TimerHandle is not an asyncio.TimerHandle: reset() must cancel
    # it all the same, or an old cool-down half-opens a later breaker early.
    import uvloop

    from ollamamq_fast.config import parse_backend_url
    from ollamamq_fast.fleet.backend import Backend, Breaker
    from ollamamq_fast.fleet.passive import BREAKER_THRESHOLD, PassiveHealth

    loop = uvloop.new_event_loop()
    try:
        passive = PassiveHealth(loop, lambda: None)
        backend = Backend(parse_backend_url("http://127.0.0.1:9"), 1)
        for _ in range(BREAKER_THRESHOLD):
            passive.failure(backend, "test")
        timer = backend.breaker_timer
        assert backend.breaker is Breaker.OPEN and timer is not None
        passive.reset(backend)
        assert backend.breaker is Breaker.CLOSED and backend.breaker_timer is None
        assert timer.cancelled()  # type: ignore[attr-defined]
    finally:
        loop.close()
