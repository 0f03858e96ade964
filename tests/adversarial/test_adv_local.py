"""Local routes anyone may call must not multiply into backend traffic.

`GET /api/ps` needs no key, even with `--auth keys` (it is one of the local
info routes), and the gateway answers it by asking every Ollama backend live.
One fetch per request let any client turn its requests into as many backend
requests, through the session the health probes use: with a backend slow to
answer `/api/ps`, a flood of them queued the probes behind it until they
timed out, and a healthy backend was taken offline for every user. Requests
that arrive while a fetch is under way share it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from gatewayproc import GatewayProc
from rawbackend import RawBackend
from wire import Response, exchange

PS_DELAY = 0.5
CLIENTS = 40


@pytest.fixture(scope="module")
def raw() -> Iterator[RawBackend]:
    fake = RawBackend({}, ps_delay=PS_DELAY)
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def gw(raw: RawBackend) -> Iterator[GatewayProc]:
    proc = GatewayProc([raw.url], "--auth", "keys")
    yield proc
    proc.close()


def _ps(port: int, out: list[Response | None], i: int, start: threading.Barrier) -> None:
    start.wait(10)
    got, _, _ = exchange(port, b"GET /api/ps HTTP/1.1\r\nHost: gw\r\n\r\n", timeout=10, expect=1)
    out[i] = got[0] if got else None


def test_concurrent_ps_requests_share_one_backend_fetch(gw: GatewayProc, raw: RawBackend) -> None:
    before = raw.ps_count
    out: list[Response | None] = [None] * CLIENTS
    start = threading.Barrier(CLIENTS)
    threads = [threading.Thread(target=_ps, args=(gw.port, out, i, start), daemon=True)
               for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert all(r is not None and r.status == 200 for r in out), [r and r.status for r in out]
    for r in out:
        assert r is not None
        assert [m["name"] for m in r.json()["models"]] == ["fake:latest"]
    asked = raw.ps_count - before
    assert asked <= 3, f"{CLIENTS} unauthenticated /api/ps requests made {asked} backend requests"


def test_ps_answers_are_fresh_after_a_fetch_ends(gw: GatewayProc, raw: RawBackend) -> None:
    """The control case: requests one after another each ask the backend."""
    before = raw.ps_count
    for _ in range(2):
        responses, _, _ = exchange(gw.port, b"GET /api/ps HTTP/1.1\r\nHost: gw\r\n\r\n", expect=1)
        assert responses and responses[0].status == 200
    assert raw.ps_count - before == 2
