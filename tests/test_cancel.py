"""Cancellation: a client that leaves stops the work it asked for.

Closing the connection is Ollama's only cancel signal (docs/protocol-notes.md §1, §7.10),
so the backend must see its connection close within 50 ms of the client's.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
from harness import Stack, fast_sim_options, read_response, start_stack

CANCEL_BOUND_S = 0.050


def _chat(user: str, stream: bool = True, extra: str = "") -> bytes:
    body = json.dumps({"model": "llama3.2", "stream": stream,
                       "messages": [{"role": "user", "content": "tell me a long story"}]}).encode()
    return (b"POST /api/chat HTTP/1.1\r\nHost: gw\r\nX-User-ID: " + user.encode() + b"\r\n"
            + extra.encode() + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def _wait(pred, timeout: float = 3.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.005)
    return False


@pytest.fixture()
def slow_stack() -> Stack:
    # 20 tokens/s for 200 tokens: a 10 s stream, far longer than any test waits.
    st = start_stack(sims=[fast_sim_options(tokens_per_s=20.0, tokens=200)], slots=1)
    yield st
    st.close()


def _now(st: Stack) -> float:
    return float(st.lt.call(st.lt.loop.time))


def test_stream_cancel_reaches_backend_within_50ms(slow_stack: Stack) -> None:
    sim = slow_stack.sims[0]
    sock = socket.create_connection(("127.0.0.1", slow_stack.port), timeout=5)
    sock.sendall(_chat("alice"))
    first = b""
    while b"\r\n\r\n" not in first or b"done" not in first:
        first += sock.recv(65536)
    before = len(sim.stats.cancel_times)
    closed_at = _now(slow_stack)
    sock.close()
    assert _wait(lambda: len(sim.stats.cancel_times) > before)
    assert sim.stats.cancel_times[-1] - closed_at < CANCEL_BOUND_S
    # The slot is free again: the next request runs at once.
    assert _wait(lambda: slow_stack.state.fleet.backends[0].in_flight == 0)


def test_non_stream_cancel_reaches_backend_within_50ms(slow_stack: Stack) -> None:
    sim = slow_stack.sims[0]
    sock = socket.create_connection(("127.0.0.1", slow_stack.port), timeout=5)
    sock.sendall(_chat("bob", stream=False))
    assert _wait(lambda: sim.stats.active >= 1)
    before = len(sim.stats.connection_close_times)
    closed_at = _now(slow_stack)
    sock.close()
    assert _wait(lambda: len(sim.stats.connection_close_times) > before)
    assert sim.stats.connection_close_times[-1] - closed_at < CANCEL_BOUND_S


def test_a_half_closed_client_has_left_as_ollama_and_nginx_take_it(slow_stack: Stack) -> None:
    # shutdown(SHUT_WR) after a whole request: the running generation stops
    # (an answer nobody may read would hold the slot to its end; README,
    # Cancellation), and the connection ends without an answer.
    sim = slow_stack.sims[0]
    sock = socket.create_connection(("127.0.0.1", slow_stack.port), timeout=5)
    sock.sendall(_chat("carol", stream=False))
    assert _wait(lambda: sim.stats.active >= 1)
    before = len(sim.stats.connection_close_times)
    sock.shutdown(socket.SHUT_WR)
    assert _wait(lambda: len(sim.stats.connection_close_times) > before)
    assert sock.recv(65536) == b""
    assert _wait(lambda: slow_stack.state.fleet.backends[0].in_flight == 0)
    sock.close()


def test_queued_request_that_leaves_never_reaches_a_backend(slow_stack: Stack) -> None:
    sim = slow_stack.sims[0]
    busy = socket.create_connection(("127.0.0.1", slow_stack.port), timeout=5)
    busy.sendall(_chat("heavy"))
    assert _wait(lambda: sim.stats.active >= 1)
    requests_before = sim.stats.requests
    queued = socket.create_connection(("127.0.0.1", slow_stack.port), timeout=5)
    queued.sendall(_chat("leaver"))
    dispatcher = slow_stack.state.dispatcher
    assert _wait(lambda: len(dispatcher.queue) == 1)
    queued.close()
    assert _wait(lambda: len(dispatcher.queue) == 0)
    busy.close()  # frees the only slot
    time.sleep(0.2)
    assert sim.stats.requests == requests_before
    # And the gateway still serves the next request.
    with socket.create_connection(("127.0.0.1", slow_stack.port), timeout=5) as s:
        s.sendall(_chat("next", stream=False, extra="X-Sim-Tokens: 2\r\n"))
        assert read_response(s, 5).startswith(b"HTTP/1.1 200")


def test_cancel_while_other_users_stream_leaves_them_untouched(slow_stack: Stack) -> None:
    st = start_stack(sims=[fast_sim_options(tokens_per_s=200.0, tokens=40)], slots=4)
    try:
        keep = socket.create_connection(("127.0.0.1", st.port), timeout=5)
        keep.sendall(_chat("stayer"))
        leave = socket.create_connection(("127.0.0.1", st.port), timeout=5)
        leave.sendall(_chat("leaver"))
        leave.recv(100)
        leave.close()
        data = read_response(keep, 5)
        lines = [ln for ln in data.split(b"\r\n") if ln.startswith(b"{")]
        assert json.loads(lines[-1])["done"] is True
        keep.close()
    finally:
        st.close()
