"""Liveness and readiness (issue 16, part 3): /health is alive, /ready is "can serve".

/ready answers on the data port and on the admin port (no token): 200 when a
backend takes traffic (and Redis answers, when configured), else 503 with the
reasons in JSON; during a SIGTERM drain it says so while running requests finish.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from harness import free_port, start_stack, wait_until


def test_ready_on_both_ports_follows_the_fleet() -> None:
    st = start_stack(admin_port=0, admin_token="t0k")
    try:
        admin = f"http://127.0.0.1:{st.gateway.admin_port}"
        for base in (st.url, admin):
            r = httpx.get(base + "/ready")
            assert r.status_code == 200, r.text
            assert r.json() == {"ready": True, "reasons": [], "backends_available": 1,
                                "backends_total": 1, "redis": "off"}
        assert httpx.get(admin + "/health").json() == {"status": "alive"}
        # The only backend drains: alive, but not ready.
        url = st.sims[0].url
        st.lt.call(st.state.operator.set_draining, url, True)
        for base in (st.url, admin):
            r = httpx.get(base + "/ready")
            assert r.status_code == 503
            assert r.json()["ready"] is False
            assert "no backend is online" in r.json()["reasons"][0]
        assert httpx.get(st.url + "/health").status_code == 200
        st.lt.call(st.state.operator.set_draining, url, False)
        assert httpx.get(st.url + "/ready").status_code == 200
    finally:
        st.close()


def test_ready_is_503_while_sigterm_drains(tmp_path: Path) -> None:
    port, admin_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ollamamq_fast", "--sim", "--no-tui", "--state", "",
         "--log-file", "", "-p", str(port), "--admin-port", str(admin_port),
         "--admin-token", "t0k"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if httpx.get(admin + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        else:
            raise AssertionError("the gateway did not become ready")
        done: list[int] = []

        def stream() -> None:  # 60 tokens at 50/s: about 1.2 s
            r = httpx.post(url + "/api/generate", timeout=10, headers={"X-Sim-Tokens": "60"},
                           json={"model": "llama3.2", "prompt": "q", "stream": False})
            done.append(r.status_code)

        t = threading.Thread(target=stream)
        t.start()
        time.sleep(0.3)
        proc.terminate()  # SIGTERM: drain
        deadline = time.monotonic() + 2
        answer = None
        while time.monotonic() < deadline:
            r = httpx.get(admin + "/ready", timeout=1)
            if r.status_code == 503:
                answer = r.json()
                break
            time.sleep(0.02)
        assert answer is not None and "stopping" in answer["reasons"][0]
        t.join(10)
        assert done == [200]  # the running request finished
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_drain_waits_for_queued_requests_then_answers_them() -> None:
    # One slot: a request runs, three of the same user wait (in order). The
    # drain lets the running one finish and runs the waiting ones; those still
    # waiting when the grace is over get a 503 in the API's shape, not a closed
    # connection. (With --redis a replica's requests may wait with nothing
    # running here: its drain then ended at once and dropped them all.)
    st = start_stack(slots=1)
    out: dict[str, object] = {}

    def post(name: str, delay_ms: int) -> None:
        try:
            r = httpx.post(st.url + "/api/generate", timeout=20,
                           json={"model": "llama3.2", "prompt": "q", "stream": False},
                           headers={"X-User-ID": "u", "X-Sim-Delay-Ms": str(delay_ms)})
            out[name] = (r.status_code, r.json())
        except httpx.HTTPError as exc:
            out[name] = type(exc).__name__

    threads = [threading.Thread(target=post, args=("runs", 300))]
    threads[0].start()
    wait_until(lambda: st.sims[0].stats.active == 1, "the first request to run")
    for name, delay in (("waits", 0), ("long", 3000), ("last", 0)):
        threads.append(threading.Thread(target=post, args=(name, delay)))
        threads[-1].start()
        wait_until(lambda: st.lt.call(lambda: len(st.state.dispatcher.queue)) >= len(threads) - 1,
                   f"{name} to wait in the queue")
    try:
        st.lt.run(st.gateway.stop(grace=1.0))
        for t in threads:
            t.join(10)
    finally:
        st.close()
    assert out["runs"] == (200, out["runs"][1]) and out["waits"][0] == 200, out  # type: ignore[index]
    # "long" started before the grace ended (cut at the end of it); "last" never started.
    assert out["last"] == (503, {"error": "the gateway is stopping; retry"}), out
