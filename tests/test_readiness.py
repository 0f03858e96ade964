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
from harness import free_port, start_stack


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
