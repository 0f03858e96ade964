"""Failure handling: failover before the first byte, error frames after it,
the circuit breaker, drain."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
from harness import (
    LoopThread,
    SocketBackend,
    fast_sim_options,
    free_port,
    start_stack,
    wait_until,
)


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


def test_a_backend_back_from_offline_is_routed_by_its_new_model_list() -> None:
    # A backend restarted with other models (another model folder, another
    # server on the address) must be routed by what it serves now: its list is
    # read at its first good probe, not up to a minute later (MODELS_REFRESH_S).
    from ollamamq_fast.sim import start_sim

    st = start_stack(sims=[fast_sim_options(models=["llama3.2:latest"])], health_interval=0.1)
    try:
        backend = st.state.fleet.backends[0]
        port = st.sims[0].port
        st.lt.run(st.sims[0].close())
        wait_until(lambda: not backend.online, "the dead backend to go offline")
        st.sims[0] = st.lt.run(start_sim(fast_sim_options(models=["qwen2.5:0.5b"]),
                                         "127.0.0.1", port))
        wait_until(lambda: backend.online, "the backend to come back")
        assert list(backend.models) == ["qwen2.5:0.5b"]
        with httpx.Client(timeout=10) as client:
            r = client.post(st.url + "/api/generate", json={"model": "qwen2.5:0.5b", "prompt": "q",
                                                            "stream": False})
            assert r.status_code == 200
            r = client.post(st.url + "/api/generate", json={"model": "llama3.2", "prompt": "q",
                                                            "stream": False})
            assert r.status_code == 404 and r.json() == {"error": "model 'llama3.2' not found"}
            names = [m["name"] for m in client.get(st.url + "/api/tags").json()["models"]]
            assert names == ["qwen2.5:0.5b"]
    finally:
        st.close()


def test_a_tripped_breaker_makes_the_next_probe_read_the_model_list() -> None:
    # Requests, not probes, found the backend failing (it died and came back
    # between two checks): its next check reads its models too.
    from ollamamq_fast.fleet.passive import BREAKER_THRESHOLD

    st = start_stack(sims=[fast_sim_options(models=["llama3.2:latest"])], health_interval=3600.0)
    try:
        backend = st.state.fleet.backends[0]
        store = st.sims[0].app.store

        def other_models() -> None:
            from ollamamq_fast.sim.models import parse_name

            name = parse_name("qwen2.5:0.5b")
            assert name is not None
            store.add(name)
            entry = store.find("llama3.2")
            assert entry is not None
            store.remove(entry)

        st.lt.call(other_models)
        for _ in range(BREAKER_THRESHOLD):
            st.lt.call(st.state.passive.failure, backend, "test")
        st.lt.run(st.state.health.probe(backend))
        assert list(backend.models) == ["qwen2.5:0.5b"]
    finally:
        st.close()


class _SlowHead(SocketBackend):
    """An Ollama-like backend whose inference answers come after `delay` seconds of silence."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        super().__init__()

    def answer(self, conn: socket.socket, head: bytes) -> None:
        path = self.path_of(head)
        if path.startswith(b"/api/tags"):
            body = b'{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest"}]}'
        elif path.startswith((b"/api/ps", b"/api/version", b"/v1/models")):
            body = b'{"models":[],"version":"0.12.0","data":[]}'
        else:
            time.sleep(self.delay)
            body = b'{"model":"llama3.2","response":"ok","done":true}'
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%b" % (len(body), body))


def test_timeout_allows_a_silence_shorter_than_it() -> None:
    # --timeout 2 and a backend silent for 1.7 s before its head: never a 504.
    # The reaper ticks once a second; counting whole ticks from the write cut
    # such a request whenever the first tick came less than 0.7 s after it,
    # so of two requests half a second apart, one was always cut.
    slow = _SlowHead(1.7)
    st = start_stack(sims=[], extra_backends=[slow.url], timeout=2.0, health_interval=3600.0)
    try:
        statuses: list[int] = []

        def one(user: str) -> None:
            r = httpx.post(st.url + "/api/generate", headers={"X-User-ID": user}, timeout=10,
                           json={"model": "llama3.2", "prompt": "q", "stream": False})
            statuses.append(r.status_code)

        threads = [threading.Thread(target=one, args=(f"u{i}",)) for i in range(2)]
        threads[0].start()
        time.sleep(0.5)
        threads[1].start()
        for t in threads:
            t.join(10)
        assert statuses == [200, 200]
    finally:
        st.close()
        slow.close()


def test_a_silent_backend_gets_504_soon_after_the_timeout() -> None:
    slow = _SlowHead(30.0)
    st = start_stack(sims=[], extra_backends=[slow.url], timeout=1.0, health_interval=3600.0)
    try:
        began = time.monotonic()
        r = httpx.post(st.url + "/v1/chat/completions", timeout=10,
                       json={"model": "llama3.2", "messages": [{"role": "user", "content": "q"}]})
        took = time.monotonic() - began
        assert r.status_code == 504
        assert r.json()["error"]["message"].endswith("sent nothing for 1 s")
        assert 1.0 <= took < 3.0
        assert st.lt.call(lambda: st.state.fleet.backends[0].in_flight) == 0
    finally:
        st.close()
        slow.close()


def test_a_model_whose_backends_are_offline_is_503_not_404() -> None:
    # Another backend is up, so the gateway is; the model's own backend went
    # offline (a restart): clients must get a 503 they retry, not a 404 they
    # take for good.
    st = start_stack(sims=[fast_sim_options(models=["llama3.2:latest"]),
                           fast_sim_options(models=["qwen2.5:0.5b"])], health_interval=0.1)
    try:
        backend = st.state.fleet.backends[0]
        st.lt.run(st.sims[0].close())
        wait_until(lambda: not backend.online, "the dead backend to go offline")
        with httpx.Client(timeout=5) as client:
            r = _gen(client, st.url)
            assert r.status_code == 503 and r.headers["retry-after"] == "5"
            assert r.json() == {"error": "every backend serving 'llama3.2' is offline; "
                                         "retry shortly"}
            r = client.post(st.url + "/v1/chat/completions", json={
                "model": "llama3.2", "messages": [{"role": "user", "content": "q"}]})
            assert r.status_code == 503 and r.json()["error"]["type"] == "api_error"
            # A model no backend ever listed is still unknown.
            r = client.post(st.url + "/api/generate", json={"model": "nope", "prompt": "q"})
            assert r.status_code == 404
    finally:
        st.close()


def test_requests_queued_for_a_removed_backends_model_are_answered_at_once() -> None:
    # The only backend serving qwen is removed at run time while one request
    # runs there and another waits: the running one finishes, the waiting one
    # gets what a new request gets (404 here, another backend being up), not a
    # wait until --queue-timeout for a backend that will never take it.
    slow = fast_sim_options(models=["qwen2.5:0.5b"], tokens=100, tokens_per_s=100.0)
    st = start_stack(sims=[fast_sim_options(models=["llama3.2:latest"]), slow], slots=1,
                     health_interval=3600.0, queue_timeout=60.0)
    try:
        backend = st.state.fleet.backends[1]
        results: dict[str, httpx.Response] = {}

        def gen(user: str) -> None:
            results[user] = httpx.post(
                st.url + "/api/generate", headers={"X-User-ID": user}, timeout=30,
                json={"model": "qwen2.5:0.5b", "prompt": "q", "stream": False})

        running = threading.Thread(target=gen, args=("a",))
        running.start()
        wait_until(lambda: backend.in_flight == 1, "the first request to run")
        waiting = threading.Thread(target=gen, args=("b",))
        waiting.start()
        wait_until(lambda: len(st.state.dispatcher.queue) == 1, "the second request to queue")
        began = time.monotonic()
        st.lt.call(st.state.operator.remove_backend, backend.name)
        waiting.join(5)
        assert not waiting.is_alive() and time.monotonic() - began < 5
        assert results["b"].status_code == 404
        assert results["b"].json() == {"error": "model 'qwen2.5:0.5b' not found"}
        running.join(10)
        assert results["a"].status_code == 200  # running requests finish
        assert len(st.state.dispatcher.queue) == 0
    finally:
        st.close()


def _responses(st: object, status: int) -> int:
    stats = st.state.stats  # type: ignore[attr-defined]
    return sum(c.n for (path, code, _), c in list(stats.responses.items())
               if code == status and path.endswith("chat"))


@pytest.mark.parametrize("translated", [False, True])
def test_a_stream_the_backend_broke_is_recorded_as_failed(translated: bool) -> None:
    # The client read a 200 head, then an error line: the access log, the
    # status metrics and the usage rows must not count that as a success.
    st = start_stack(sims=[fast_sim_options(tokens=50, api="openai" if translated else "both")])
    try:
        with httpx.Client(timeout=10) as client:
            r = client.post(st.url + "/api/chat", headers={"X-Sim-Fault": "die-after:3"},
                            json={"model": "llama3.2",
                                  "messages": [{"role": "user", "content": "q"}]})
        assert r.status_code == 200
        last = json.loads(r.text.strip().splitlines()[-1])
        assert "error" in last
        wait_until(lambda: st.lt.call(_responses, st, 502) == 1, "the request recorded as a 502")
        assert st.lt.call(_responses, st, 200) == 0
    finally:
        st.close()


class _TrickledHead(SocketBackend):
    """An Ollama-like backend that sends an inference answer's head a byte at a time, for ever."""

    def answer(self, conn: socket.socket, head: bytes) -> None:
        path = self.path_of(head)
        if path.startswith((b"/api/tags", b"/api/ps", b"/api/version", b"/v1/models")):
            body = b'{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest"}]}'
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close"
                         b"\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
            return
        for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Pad: " + b"a" * 600:
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                return
            time.sleep(0.05)


def test_a_head_trickled_a_byte_at_a_time_gets_504() -> None:
    # Bytes of a head that never ends are no sign of life: --timeout bounds
    # the time to a whole head (before, each byte reset the silence).
    slow = _TrickledHead()
    st = start_stack(sims=[], extra_backends=[slow.url], timeout=1.0, health_interval=3600.0)
    try:
        r = httpx.post(st.url + "/api/generate", timeout=10,
                       json={"model": "llama3.2", "prompt": "q", "stream": False})
        assert r.status_code == 504
        assert r.json()["error"].endswith("sent no whole response head in 1 s")
        assert st.lt.call(lambda: st.state.fleet.backends[0].in_flight) == 0
    finally:
        st.close()
        slow.close()


class _DropsInference(SocketBackend):
    """Lists two models and closes every inference connection before answering."""

    def answer(self, conn: socket.socket, head: bytes) -> None:
        path = self.path_of(head)
        if not path.startswith((b"/api/tags", b"/api/ps", b"/api/version", b"/v1/models")):
            return  # closed without a byte
        body = (b'{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest"},'
                b'{"name":"qwen2.5:0.5b","model":"qwen2.5:0.5b"}]}')
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close"
                     b"\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))


def test_a_retry_waiting_for_a_busy_backend_does_not_hold_up_other_retries() -> None:
    # r1 (llama3.2) and r2 (qwen) both failed on the dropping backend and wait
    # to be retried; r1's other backend is busy for seconds, r2's is free
    # again at once: r2 must run then, not wait behind r1 in the retry line.
    hog = fast_sim_options(models=["llama3.2:latest", "mistral:latest"], tokens=150,
                           tokens_per_s=50.0)
    quick = fast_sim_options(models=["qwen2.5:0.5b"], tokens=20, tokens_per_s=40.0)
    drops = _DropsInference()
    st = start_stack(sims=[hog, quick], extra_backends=[drops.url], slots=1,
                     health_interval=3600.0)
    try:
        hog_backend, quick_backend, _ = st.state.fleet.backends
        results: dict[str, tuple[int, float]] = {}
        began = time.monotonic()

        def gen(user: str, model: str) -> None:
            r = httpx.post(st.url + "/api/generate", headers={"X-User-ID": user}, timeout=30,
                           json={"model": model, "prompt": "q", "stream": False,
                                 "options": {"num_predict": {"hog": 150, "busy": 40}.get(user, 5)}})
            results[user] = (r.status_code, time.monotonic() - began)

        threads = [threading.Thread(target=gen, args=("hog", "mistral"))]
        threads[0].start()
        wait_until(lambda: hog_backend.in_flight == 1, "the long request to run")
        threads.append(threading.Thread(target=gen, args=("busy", "qwen2.5:0.5b")))
        threads[1].start()
        wait_until(lambda: quick_backend.in_flight == 1, "the short request to run")
        for user, model in (("r1", "llama3.2"), ("r2", "qwen2.5:0.5b")):
            threads.append(threading.Thread(target=gen, args=(user, model)))
            threads[-1].start()
            wait_until(lambda u=user: any(ex.user == u for ex in st.state.dispatcher.retry_line),
                       f"{user} to wait for its retry")
        for t in threads:
            t.join(30)
        assert {u: s for u, (s, _) in results.items()} == {
            "hog": 200, "busy": 200, "r1": 200, "r2": 200}
        assert results["r2"][1] < results["hog"][1] - 1.0, results
    finally:
        st.close()
        drops.close()


class _MessagesDies(SocketBackend):
    """An Ollama with Anthropic's /v1/messages that dies after the stream's first event."""

    def answer(self, conn: socket.socket, head: bytes) -> None:
        path = self.path_of(head)
        if path.startswith((b"/api/tags", b"/api/ps", b"/api/version", b"/v1/models")):
            body = (b'{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest"}],'
                    b'"data":[{"id":"llama3.2:latest","object":"model","owned_by":"library"}]}')
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close"
                         b"\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
            return
        event = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"m",'
                 b'"type":"message","role":"assistant","content":[],"model":"llama3.2"}}\n\n')
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n" % (len(event), event))
        time.sleep(0.05)


def test_a_broken_anthropic_messages_stream_ends_with_its_error_event() -> None:
    # The anthropic SDKs raise only on an SSE event named `error`: a data-only
    # error object (the OpenAI form) was skipped, and the client saw a stream
    # that just stopped.
    dies = _MessagesDies()
    st = start_stack(sims=[], extra_backends=[dies.url], health_interval=3600.0)
    try:
        r = httpx.post(st.url + "/v1/messages", timeout=10, json={
            "model": "llama3.2", "max_tokens": 10, "stream": True,
            "messages": [{"role": "user", "content": "q"}]})
        assert r.status_code == 200
        events = [e for e in r.text.split("\n\n") if e.strip()]
        assert events[0].startswith("event: message_start")
        name, data = events[-1].split("\n")
        assert name == "event: error"
        error = json.loads(data.removeprefix("data: "))
        assert error["type"] == "error" and error["error"]["type"] == "api_error"
        assert "closed the connection" in error["error"]["message"]
    finally:
        st.close()
        dies.close()


def test_a_retry_whose_last_other_backend_is_drained_gets_502_at_once() -> None:
    # r failed on the dropping backend and waits for the other one, busy; the
    # operator then drains that one: no backend is left that has not failed r,
    # so r gets its 502 now, not a wait until --queue-timeout (the running
    # request finishes).
    hog = fast_sim_options(models=["llama3.2:latest"], tokens=100, tokens_per_s=50.0)
    drops = _DropsInference()
    st = start_stack(sims=[hog], extra_backends=[drops.url], slots=1, health_interval=3600.0,
                     queue_timeout=60.0)
    try:
        other = st.state.fleet.backends[0]
        results: dict[str, httpx.Response | Exception] = {}

        def gen(user: str) -> None:
            try:
                results[user] = httpx.post(
                    st.url + "/api/generate", headers={"X-User-ID": user}, timeout=30,
                    json={"model": "llama3.2", "prompt": "q", "stream": False})
            except httpx.HTTPError as exc:
                results[user] = exc

        hog_thread = threading.Thread(target=gen, args=("hog",))
        hog_thread.start()
        wait_until(lambda: other.in_flight == 1, "the long request to run")
        r_thread = threading.Thread(target=gen, args=("r",))
        r_thread.start()
        wait_until(lambda: len(st.state.dispatcher.retry_line) == 1, "r to wait for its retry")
        began = time.monotonic()
        st.lt.call(st.state.operator.set_draining, other.name, True)
        r_thread.join(10)
        assert not r_thread.is_alive() and time.monotonic() - began < 1.0
        assert hog_thread.is_alive()  # answered before the running request ended
        r = results["r"]
        assert isinstance(r, httpx.Response) and r.status_code == 502, r
        assert r.headers["retry-after"] == "5" and "no other backend" in r.json()["error"]
        assert len(st.state.dispatcher.retry_line) == 0
        hog_thread.join(20)
        hog = results["hog"]
        assert isinstance(hog, httpx.Response) and hog.status_code == 200
    finally:
        st.close()
        drops.close()
