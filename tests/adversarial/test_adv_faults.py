"""Backend faults at every seam: what the client gets, and what the gateway keeps.

A backend programmed per request (`faultbackend.py`, steered by `X-Mode`)
closes, resets, stalls or cuts its answer at a chosen point; the gateway runs
as users run it (`gatewayproc.py`). Each probe checks what an outside client
sees (status, error shape, a stream ended in a way clients detect) and what
the gateway keeps afterwards (in-flight counts, usage, the backend's blame).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from faultbackend import (
    CHAT_OK,
    NDJSON_HEAD,
    SSE_HEAD,
    Ctx,
    FaultBackend,
    answer,
    chunk,
)
from gatewayproc import GatewayProc
from wire import exchange, request, wait_until

CHAT_STREAM = json.dumps({"model": "fake", "stream": True,
                          "messages": [{"role": "user", "content": "hi"}]}).encode()
LINE = b'{"model":"fake","message":{"role":"assistant","content":"a"},"done":false}\n'
DONE_LINE = (b'{"model":"fake","message":{"role":"assistant","content":""},"done":true,'
             b'"prompt_eval_count":7,"eval_count":5}\n')


async def ndjson_cut(ctx: Ctx) -> bool:
    """One line, then the connection closes mid-stream."""
    await ctx.send(NDJSON_HEAD + chunk(LINE))
    await asyncio.sleep(0.05)
    return False


async def done_then_close(ctx: Ctx) -> bool:
    """The whole stream, its final line included, then a close before the last chunk."""
    await ctx.send(NDJSON_HEAD + chunk(LINE) + chunk(DONE_LINE))
    await asyncio.sleep(0.05)
    return False


async def sse_done_then_close(ctx: Ctx) -> bool:
    await ctx.send(SSE_HEAD + chunk(b'data: {"id":"x","object":"chat.completion.chunk","choices":'
                                    b'[{"index":0,"delta":{"content":"a"}}]}\n\n')
                   + chunk(b"data: [DONE]\n\n"))
    await asyncio.sleep(0.05)
    return False


HANDLERS = {"ndjson-cut": ndjson_cut, "done-then-close": done_then_close,
            "sse-done-then-close": sse_done_then_close}


@pytest.fixture(scope="module")
def fault() -> Iterator[FaultBackend]:
    fake = FaultBackend(HANDLERS)
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def gw(fault: FaultBackend) -> Iterator[GatewayProc]:
    proc = GatewayProc([fault.url], "--timeout", "3", "--slots", "2", "--cache", "off",
                       admin=True)
    yield proc
    proc.close()


def _read_until_close(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    buf = b""
    while True:
        try:
            data = sock.recv(65536)
        except OSError:
            break
        if not data:
            break
        buf += data
    return buf


def _user(gw: GatewayProc, name: str) -> dict[str, int]:
    for u in gw.admin("GET", "/api/users").json()["users"]:
        if u["user"] == name:
            return u  # type: ignore[no-any-return]
    return {}


def _backend(gw: GatewayProc) -> dict[str, object]:
    return gw.admin("GET", "/api/stats").json()["backends"][0]  # type: ignore[no-any-return]


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_a_broken_stream_to_an_http10_client_ends_in_its_own_framing(
        gw: GatewayProc, path: str) -> None:
    # An HTTP/1.0 client reads a de-chunked body to the close: the error line
    # that ends a broken stream must come without chunk framing.
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(f"POST {path} HTTP/1.0\r\nHost: gw\r\nX-Mode: ndjson-cut\r\n"
                     f"Content-Length: {len(CHAT_STREAM)}\r\n\r\n".encode() + CHAT_STREAM)
        raw = _read_until_close(sock)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" not in head.lower()
    lines = body.split(b"\n")
    assert lines[0] + b"\n" == LINE
    assert json.loads(lines[1]) == {"error": "the backend closed the connection mid-response"}
    assert lines[2:] == [b""], f"bytes after the error line: {body!r}"


@pytest.mark.parametrize(("mode", "path"), [("done-then-close", "/api/chat"),
                                            ("sse-done-then-close", "/v1/chat/completions")])
def test_a_stream_whose_last_event_came_is_complete_without_its_last_chunk(
        gw: GatewayProc, fault: FaultBackend, mode: str, path: str) -> None:
    # The backend sent the stream's final event and closed before the chunked
    # body's end: the answer is whole. The client gets it ended cleanly, with
    # no error line after the final one (the ollama client raises on it).
    user = f"complete-{mode}"
    failures = _backend(gw)["failures"]
    responses, rest, _ = exchange(gw.port, request(
        "POST", path, CHAT_STREAM, [("X-Mode", mode), ("X-User-ID", user)]), expect=1)
    assert responses, rest
    body = responses[0].body
    assert responses[0].status == 200 and b"error" not in body, body
    if mode == "done-then-close":
        assert body == LINE + DONE_LINE
        # The backend's own counts, not an estimate.
        assert wait_until(lambda: _user(gw, user).get("completion_tokens") == 5), _user(gw, user)
        assert _user(gw, user)["estimated_tokens"] == 0
    assert wait_until(lambda: _user(gw, user).get("in_flight") == 0)
    assert _backend(gw)["failures"] == failures, "a complete answer is not a failure"
    # The connection still serves the next request.
    responses, _, _ = exchange(gw.port, [request(
        "POST", path, CHAT_STREAM, [("X-Mode", mode), ("X-User-ID", user)]),
        request("GET", "/api/version")], expect=2)
    assert [r.status for r in responses] == [200, 200]


async def fail_late(ctx: Ctx) -> bool:
    """Close without answering, after a moment: every request of a burst reaches it first."""
    await asyncio.sleep(0.3)
    return False


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[FaultBackend, FaultBackend, GatewayProc]]:
    bad = FaultBackend({"": fail_late})
    good = FaultBackend()
    proc = GatewayProc([bad.url, good.url], "--timeout", "5", "--slots", "4", "--cache", "off",
                       admin=True)
    yield bad, good, proc
    proc.close()
    bad.close()
    good.close()


def _breaker(gw: GatewayProc, url: str) -> str:
    backends = gw.admin("GET", "/api/stats").json()["backends"]
    return str(next(b["breaker"] for b in backends if b["url"] == url))


def _chat(gw: GatewayProc, user: str) -> int:
    responses, _, _ = exchange(gw.port, request("POST", "/api/chat", CHAT_STREAM.replace(
        b'"stream": true', b'"stream": false'), [("X-User-ID", user)]), expect=1, timeout=10)
    return responses[0].status if responses else 0


def test_a_half_open_breaker_lets_one_trial_through(
        pair: tuple[FaultBackend, FaultBackend, GatewayProc]) -> None:
    # README: after the cooldown, *one* half-open trial. A burst arriving then
    # must not all go to the backend that just failed (least-conn finds it idle).
    bad, _, gw = pair
    for i in range(12):
        assert _chat(gw, f"warm{i}") == 200  # failed over to the good backend
        if _breaker(gw, bad.url) == "open":
            break
    assert _breaker(gw, bad.url) == "open"
    assert wait_until(lambda: _breaker(gw, bad.url) == "half-open", 5)
    before = len(bad.inference())
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda i: _chat(gw, f"burst{i}"), range(8)))
    assert statuses == [200] * 8
    assert len(bad.inference()) - before == 1, "more than one half-open trial"
    assert _breaker(gw, bad.url) == "open"


async def crash_on_reuse(ctx: Ctx) -> bool:
    """A request on a reused connection is worked on for a while, then the backend drops it."""
    if ctx.nth > 1:
        await asyncio.sleep(0.8)
        return False
    await ctx.send(answer(CHAT_OK))
    return True


async def close_on_reuse(ctx: Ctx) -> bool:
    """A reused connection is closed (FIN) as the request arrives: it had gone stale."""
    if ctx.nth > 1:
        return False
    await ctx.send(answer(CHAT_OK))
    return True


async def reset_on_reuse(ctx: Ctx) -> bool:
    if ctx.nth > 1:
        ctx.reset()
        return False
    await ctx.send(answer(CHAT_OK))
    return True


HANDLERS.update({"crash-on-reuse": crash_on_reuse, "close-on-reuse": close_on_reuse,
                 "reset-on-reuse": reset_on_reuse})
CHAT = CHAT_STREAM.replace(b'"stream": true', b'"stream": false')


def _pooled(gw: GatewayProc, user: str) -> None:
    """An ordinary answer first: the gateway then holds a pooled connection to reuse."""
    responses, _, _ = exchange(gw.port, request("POST", "/api/chat", CHAT, [("X-User-ID", user)]),
                               expect=1)
    assert responses and responses[0].status == 200


@pytest.mark.parametrize("mode", ["close-on-reuse", "reset-on-reuse"])
def test_a_stale_pooled_connection_is_retried_on_a_fresh_one(
        gw: GatewayProc, fault: FaultBackend, mode: str) -> None:
    user = f"stale-{mode}"
    _pooled(gw, user)
    responses, rest, _ = exchange(gw.port, request(
        "POST", "/api/chat", CHAT, [("X-Mode", mode), ("X-User-ID", user)]), expect=1)
    assert responses and responses[0].status == 200 and responses[0].body == CHAT_OK, rest
    # Sent on the pooled connection (closed as it came), then once on a fresh one.
    assert [c.nth > 1 for c in fault.inference(mode)] == [True, False]
    assert wait_until(lambda: _user(gw, user).get("in_flight") == 0)


def test_a_pooled_connection_dropped_after_working_on_the_request_was_not_stale(
        gw: GatewayProc, fault: FaultBackend) -> None:
    # A connection that carried the request for a while and then closed did
    # not "go stale": the backend failed it (it may have done the work). It is
    # not sent again to the same backend as if nothing happened (README:
    # never to one that already failed it), and the backend is blamed.
    user = "crash-on-reuse"
    _pooled(gw, user)
    failures = _backend(gw)["failures"]
    responses, _, _ = exchange(gw.port, request(
        "POST", "/api/chat", CHAT, [("X-Mode", user), ("X-User-ID", user)]), expect=1)
    assert responses and responses[0].status == 502, responses and responses[0].body
    assert "retry-after" in dict(responses[0].headers)
    assert len(fault.inference(user)) == 1, "sent again to the backend that failed it"
    assert _backend(gw)["failures"] == failures + 1
    assert wait_until(lambda: _user(gw, user).get("in_flight") == 0)


async def slow_stream(ctx: Ctx) -> bool:
    await ctx.send(NDJSON_HEAD)
    for _ in range(10):
        await ctx.send(chunk(LINE))
        await asyncio.sleep(0.03)
    await ctx.send(chunk(DONE_LINE) + b"0\r\n\r\n")
    return True


def test_a_backend_dying_under_load_loses_no_request_and_leaks_nothing() -> None:
    # 40 streams from 4 users over two backends; one dies (refuses, resets its
    # connections) while they run. Every client gets a whole answer or one
    # that ends in an error line (never a hang or a silent cut), and the
    # gateway ends with nothing in flight.
    dying, survivor = FaultBackend({"": slow_stream}), FaultBackend({"": slow_stream})
    proc = GatewayProc([dying.url, survivor.url], "--timeout", "5", "--slots", "4",
                       "--cache", "off", admin=True)
    try:
        def stream(i: int) -> str:
            responses, rest, _ = exchange(proc.port, request(
                "POST", "/api/chat", CHAT_STREAM, [("X-User-ID", f"load{i % 4}")]),
                expect=1, timeout=20)
            if not responses:
                return f"no answer: {rest[:80]!r}"
            body = responses[0].body
            if responses[0].status == 200 and body.endswith(DONE_LINE):
                return "whole"
            last = json.loads(body.splitlines()[-1])
            return "error line" if "error" in last else f"other: {body[-80:]!r}"

        with ThreadPoolExecutor(40) as pool:
            futures = [pool.submit(stream, i) for i in range(40)]
            assert wait_until(lambda: len(dying.inference()) >= 4, 5)
            dying.stop()
            outcomes = [f.result(30) for f in futures]
        assert set(outcomes) <= {"whole", "error line"}, outcomes
        assert outcomes.count("whole") >= 40 - 4  # only those running on it were cut
        stats = proc.admin("GET", "/api/stats").json()
        assert wait_until(lambda: proc.admin("GET", "/api/stats").json()["in_flight"] == 0)
        assert stats["queued"] == 0
        users = proc.admin("GET", "/api/users").json()["users"]
        assert all(u["in_flight"] == 0 and u["queued"] == 0 for u in users)
    finally:
        proc.close()
        dying.close()
        survivor.close()
