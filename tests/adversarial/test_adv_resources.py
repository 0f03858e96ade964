"""Issue 14, medium: memory a client can make the gateway hold.

- Request bodies: each is bounded (--max-body-mb, 100 MB by default) but there
  was no bound on all of them together; eight 95 MB bodies at once must meet a
  global budget (503 with Retry-After beyond it), whatever its default is, as
  long as it is below 760 MB.
- User ids: 1000 distinct 60 KB X-User-IDs must not cost the process their
  size in memory, nor make the admin user list that large.
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
from wire import Response, bystander_ok, parse_responses


@pytest.fixture(scope="module")
def gw(backend: FakeBackend) -> Iterator[GatewayProc]:
    proc = GatewayProc([backend.url], "--slots", "1", "--cache", "off", admin=True)
    yield proc
    proc.close()


def _chunked_upload(port: int, size: int, out: list[Response | None], i: int) -> None:
    """POST /api/chat with a `size`-byte chunked JSON body, 1 MB per chunk.

    The answer is read while the body is still being sent: a gateway that
    refuses early answers before the upload ends, then closes.
    """
    prefix = b'{"model":"fake","stream":false,"messages":[{"role":"user","content":"'
    suffix = b'"}]}'
    piece = b"a" * (1 << 20)
    received = bytearray()

    def read(sock: socket.socket) -> None:
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except OSError:
                return
            if not chunk:
                return
            received.extend(chunk)
            if parse_responses(bytes(received))[0]:
                return

    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        reader = threading.Thread(target=read, args=(sock,), daemon=True)
        reader.start()
        try:
            sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: gw\r\nX-Fake: hold=0.3\r\n"
                         b"X-User-ID: big%d\r\nTransfer-Encoding: chunked\r\n\r\n" % i)
            sock.sendall(b"%x\r\n%s\r\n" % (len(prefix), prefix))
            sent = len(prefix)
            while sent < size - len(suffix) and reader.is_alive():
                n = min(len(piece), size - len(suffix) - sent)
                sock.sendall(b"%x\r\n%s\r\n" % (n, piece[:n]))
                sent += n
            if reader.is_alive():
                sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(suffix), suffix))
        except OSError:
            pass  # refused and closed while we sent: the answer came first
        reader.join(60)
    got, _ = parse_responses(bytes(received))
    out[i] = got[0] if got else None


@pytest.mark.timeout(120)
def test_concurrent_large_bodies_meet_a_global_budget(gw: GatewayProc) -> None:
    count, size = 8, 95 * 1024 * 1024
    base = gw.rss_kb()
    out: list[Response | None] = [None] * count
    threads = [threading.Thread(target=_chunked_upload, args=(gw.port, size, out, i))
               for i in range(count)]
    peak = base
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, gw.rss_kb())
        time.sleep(0.05)
    statuses = [r.status if r is not None else None for r in out]
    grown_mb = (peak - base) / 1024
    refused = [r for r in out if r is not None and r.status == 503]
    assert refused and all(r.header("retry-after") for r in refused), (
        f"statuses {statuses}, peak RSS +{grown_mb:.0f} MB for {count * 95} MB of bodies")
    assert set(statuses) <= {200, 503}, statuses
    assert bystander_ok(gw.url)


@pytest.mark.timeout(120)
def test_many_long_user_ids_cost_little(gw: GatewayProc) -> None:
    count = 1000
    body = json.dumps({"model": "fake", "stream": False, "messages": []}).encode()
    base = gw.rss_kb()
    statuses: dict[int, int] = {}
    with httpx.Client(timeout=10) as client:
        for i in range(count):
            user = f"{i:06d}" + "u" * (60 * 1024)
            r = client.post(gw.url + "/api/chat", content=body, headers={"X-User-ID": user})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    grown_mb = (gw.rss_kb() - base) / 1024
    users = gw.admin("GET", "/api/users")
    assert bystander_ok(gw.url)
    assert grown_mb < 30, f"RSS +{grown_mb:.0f} MB for {count} ids of 60 KB ({statuses})"
    assert len(users.content) < 2 * 1024 * 1024, f"/api/users is {len(users.content) >> 20} MB"
