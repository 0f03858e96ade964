"""Issue 14, connection-level findings, probed with raw sockets.

Gateway: auth off, cache off, `--timeout 1.5` (seconds of backend silence),
one slot, so that a request that hangs or a pooled connection left paused
shows within seconds.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from fakebackend import FakeBackend
from gatewayproc import GatewayProc
from wire import bystander_ok, exchange, parse_responses, request

TIMEOUT_S = 1.5
CHAT = json.dumps({"model": "fake", "stream": False,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture(scope="module")
def gw(backend: FakeBackend) -> Iterator[GatewayProc]:
    proc = GatewayProc([backend.url], "--timeout", str(TIMEOUT_S), "--slots", "1",
                       "--cache", "off")
    yield proc
    proc.close()


@pytest.fixture(autouse=True)
def still_serving(gw: GatewayProc) -> Iterator[None]:
    """After each probe: the process is alive and another user is served."""
    yield
    assert gw.alive(), gw.stderr()[-3000:]
    # Twice: after a probe that leaves a pooled backend connection paused (issue
    # 14, test_connection_released_paused_serves_the_next_user) the first request
    # on it fails once; the second must not.
    assert bystander_ok(gw.url) or bystander_ok(gw.url)


def test_malformed_request_behind_a_waiting_one(gw: GatewayProc) -> None:
    waiting = request("POST", "/api/chat", CHAT, [("X-Fake", "hold=0.5")])
    responses, rest, closed = exchange(gw.port, waiting + b"GARBAGE\r\n\r\n", timeout=5)
    assert responses and responses[0].status == 200, "the waiting request is answered"
    assert [r.status for r in responses[1:]] in ([], [400]) and not rest
    assert closed, "the connection is closed after the malformed request"


def test_malformed_request_behind_a_local_answer(gw: GatewayProc) -> None:
    """The control case: behind an answer that needs no backend, 200, 400, close."""
    responses, rest, closed = exchange(
        gw.port, request("GET", "/api/version") + b"GARBAGE\r\n\r\n", timeout=5)
    assert [r.status for r in responses] == [200, 400] and not rest and closed


def test_h2c_upgrade_gets_exactly_one_response(gw: GatewayProc) -> None:
    data = (b"GET /api/version HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
    responses, rest, _ = exchange(gw.port, data, timeout=2)
    assert len(responses) == 1 and not rest, [r.status for r in responses]


def test_connect_gets_exactly_one_response(gw: GatewayProc) -> None:
    data = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    responses, rest, _ = exchange(gw.port, data, timeout=2)
    assert len(responses) == 1 and not rest, [r.status for r in responses]


def test_five_thousand_pipelined_gets_in_one_write(gw: GatewayProc) -> None:
    count = 5000
    data = b"GET /api/version HTTP/1.1\r\nHost: gw\r\n\r\n" * count
    responses, rest, _ = exchange(gw.port, data, timeout=20, expect=count)
    statuses = [r.status for r in responses]
    assert 431 not in statuses
    assert len(responses) == count and set(statuses) == {200} and not rest


def test_huge_backend_response_head_is_refused(gw: GatewayProc, backend: FakeBackend) -> None:
    r = httpx.post(gw.url + "/api/chat", content=CHAT, timeout=30,
                   headers={"X-Fake": f"bighead={16 * 1024 * 1024}"})
    assert r.status_code == 502, (r.status_code, len(r.headers.get("x-big", "")))


def test_endless_backend_response_head_is_cut(gw: GatewayProc, backend: FakeBackend) -> None:
    """Header lines without end: the gateway gives up early instead of buffering them."""
    start = gw.rss_kb()
    try:
        r = httpx.post(gw.url + "/api/chat", content=CHAT, timeout=8,
                       headers={"X-Fake": f"headlines={64 * 1024 * 1024}"})
        status = r.status_code
    except httpx.ReadTimeout:
        status = 0
    grown_mb = (gw.rss_kb() - start) / 1024
    assert status == 502 and backend.headline_bytes < 16 * 1024 * 1024, (
        f"status {status}, the backend sent {backend.headline_bytes >> 20} MB of head, "
        f"gateway RSS +{grown_mb:.0f} MB")


def test_connection_released_paused_serves_the_next_user(gw: GatewayProc) -> None:
    """A slow reader of a large answer, then another user's request on the same slot.

    The large part is the head (16 MB of one header): relayed in one write, it
    filled the client's buffers, so the backend connection was paused right as
    the response completed and went back to the pool. (A large body did not
    leave it paused in our runs.) Since response heads are bounded this answer
    is a 502; the probe still checks that the next user is served.
    """
    body = json.dumps({"model": "fake", "prompt": "big", "stream": False}).encode()
    with socket.create_connection(("127.0.0.1", gw.port)) as slow:
        slow.sendall(request("POST", "/api/generate", body,
                             [("X-Fake", f"bighead={16 * 1024 * 1024}")]))
        slow.settimeout(5)
        buf = b""
        while True:
            chunk = slow.recv(65536)
            if not chunk:
                break
            buf += chunk
            if parse_responses(buf)[0]:
                break
            time.sleep(0.002)
    started = time.monotonic()
    r = httpx.post(gw.url + "/api/chat", content=CHAT, timeout=10,
                   headers={"X-User-ID": "next"})
    assert r.status_code == 200, f"{r.status_code} after {time.monotonic() - started:.1f} s"


def _slow_parts(head: bytes, payload: bytes, pieces: int = 12) -> list[bytes]:
    step = len(payload) // pieces + 1
    return [head] + [payload[i : i + step] for i in range(0, len(payload), step)]


def test_slow_blob_upload_is_not_cut_by_the_backend_timeout(gw: GatewayProc) -> None:
    """A streamed upload (blobs go to the backend as they arrive) sent over 3.3 s."""
    payload = b"\0" * 200_000
    head = (b"POST /api/blobs/sha256:" + b"ab" * 32 + b" HTTP/1.1\r\nHost: gw\r\n"
            b"Content-Length: %d\r\n\r\n" % len(payload))
    responses, _, _ = exchange(gw.port, _slow_parts(head, payload), timeout=15, expect=1,
                               pause=0.3)
    assert responses and responses[0].status == 201, [r.status for r in responses]


def test_slow_inference_upload_is_not_cut_by_the_backend_timeout(gw: GatewayProc) -> None:
    """An inference body is read whole before dispatch: sent over 3.3 s, still 200."""
    payload = json.dumps({"model": "fake", "stream": False, "prompt": "p" * 200_000}).encode()
    head = (b"POST /api/generate HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(payload))
    responses, _, _ = exchange(gw.port, _slow_parts(head, payload), timeout=15, expect=1,
                               pause=0.3)
    assert responses and responses[0].status == 200, [r.status for r in responses]


def test_slow_upload_then_quick_answer_control(gw: GatewayProc) -> None:
    """The control case: the same upload sent at once is answered 200."""
    payload = json.dumps({"model": "fake", "stream": False, "prompt": "p" * 200_000}).encode()
    responses, _, _ = exchange(gw.port, request("POST", "/api/generate", payload), expect=1)
    assert responses[0].status == 200


def test_pipelined_requests_each_answered_once(gw: GatewayProc, backend: FakeBackend) -> None:
    """Three inference requests in one write: three answers, in order, three forwarded."""
    mark = backend.mark()
    data = b"".join(request("POST", "/api/chat", CHAT, [("X-Req", str(i))]) for i in range(3))
    responses, rest, _ = exchange(gw.port, data, expect=3)
    assert [r.status for r in responses] == [200, 200, 200] and not rest
    got = backend.wait_for(3, mark)
    assert [r.header(b"x-req") for r in got] == [b"0", b"1", b"2"]


class _Drip(threading.Thread):
    def __init__(self, port: int, data: bytes, interval: float, budget: float) -> None:
        super().__init__(daemon=True)
        self.port, self.data, self.interval, self.budget = port, data, interval, budget
        self.closed_after: float | None = None

    def run(self) -> None:
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.port)) as sock:
            sock.settimeout(self.interval)
            for i in range(len(self.data)):
                if time.monotonic() - start > self.budget:
                    return
                try:
                    sock.sendall(self.data[i : i + 1])
                    if sock.recv(4096) == b"":
                        self.closed_after = time.monotonic() - start
                        return
                except TimeoutError:
                    continue
                except OSError:
                    self.closed_after = time.monotonic() - start
                    return
            self.closed_after = None


@pytest.fixture(scope="module", autouse=True)
def slow_head(gw: GatewayProc) -> _Drip:
    """A slowloris client, started with the module's first test: its head takes at
    least the gateway's 30 s total deadline to be cut, which it spends while the
    other probes of this module run (instead of a test of its own waiting 30 s)."""
    head = b"GET /api/version HTTP/1.1\r\nHost: gw\r\nX-Pad: " + b"a" * 200 + b"\r\n\r\n"
    drip = _Drip(gw.port, head, 1.0, 40.0)
    drip.start()
    return drip


# Found beyond issue 14's list on the way (fixed on main since): a closing
# request routed to a backend, with bytes pipelined behind it, was answered but
# the connection was never closed (> 90 s).
@pytest.mark.parametrize("closing", [
    pytest.param(request("POST", "/api/chat", CHAT, [("Connection", "close")]), id="conn-close"),
    pytest.param(b"POST /api/chat HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(CHAT), CHAT),
                 id="http10"),
    pytest.param(request("POST", "/api/show", b'{"model":"fake"}', [("Connection", "close")]),
                 id="model-route"),
])
def test_closing_request_with_pipelined_bytes_closes(gw: GatewayProc, backend: FakeBackend,
                                                     closing: bytes) -> None:
    mark = backend.mark()
    after = request("POST", "/api/chat", CHAT, [("X-Req", "after-close")])
    responses, _, closed = exchange(gw.port, closing + after, timeout=4)
    statuses = [r.status for r in responses]
    assert statuses[:1] == [200] and all(s >= 400 for s in statuses[1:]), statuses
    assert closed, "still open 4 s after answering a closing request"
    assert not [r for r in backend.since(mark) if r.header(b"x-req") == b"after-close"]


def test_closing_local_request_with_pipelined_bytes_closes(gw: GatewayProc) -> None:
    """The control case: the same on a route answered by the gateway itself."""
    data = request("GET", "/api/version", None, [("Connection", "close")])
    responses, _, closed = exchange(gw.port, data + request("GET", "/api/version"), timeout=4)
    assert [r.status for r in responses] == [200] and closed


@pytest.mark.timeout(120)
def test_nothing_runs_after_the_connection_is_closing(gw: GatewayProc,
                                                      backend: FakeBackend) -> None:
    """Under concurrent load, 300 tries: the request after the closing answer never runs."""
    body = b'{"model":"fake","stream":false,"messages":[]}'
    first = request("POST", "/api/nope", body, [("Expect", "100-continue")])
    second = request("POST", "/api/show", b'{"model":"fake"}', [("X-Req", "after-close")])
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                client.post(gw.url + "/api/chat", content=CHAT, headers={"X-User-ID": "load"})

    threads = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    ran = 0
    try:
        for _ in range(300):
            mark = backend.mark()
            responses, _, _ = exchange(gw.port, first + second, timeout=2)
            assert responses and responses[0].status == 404
            time.sleep(0.005)
            if len(responses) == 1 and any(r.header(b"x-req") == b"after-close"
                                           for r in backend.since(mark)):
                ran += 1
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert ran == 0, f"{ran} of 300 requests ran on the backend after the connection was closing"


# Last in the module: the slow head has been dripping since its first test.
@pytest.mark.timeout(90)
def test_slowloris_head_hits_a_total_deadline(slow_head: _Drip) -> None:
    """One header byte a second, for 40 s: the gateway must close the connection."""
    slow_head.join(60)
    assert slow_head.closed_after is not None, "still open after 40 s of a slow head"
