"""The head phase (proxy/intake.py) returns its verdict as a value and answers nothing itself.

The exchange tests (test_exchange.py) play these paths through the client
protocol; here `read_head` is called directly on a fresh exchange, to pin
the contract the exchange relies on: None when the request may go on, the
gateway's own answer (an `Early`) when not, and in both cases nothing written
to the client and no move of the exchange's state.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from test_exchange import Rig

from ollamamq_fast.proxy import intake
from ollamamq_fast.proxy.exchange import Exchange
from ollamamq_fast.proxy.state import State


@pytest.fixture()
def rig() -> Iterator[Rig]:
    r = Rig(max_body_bytes=100)
    yield r
    r.close()


def _read(rig: Rig, method: bytes, url: bytes,
          headers: tuple[tuple[bytes, bytes], ...] = ()) -> tuple[Exchange, intake.Early | None]:
    proto, transport = rig.client()
    ex = Exchange(proto)
    ex.url = url
    for name, value in headers:
        ex.request_head.add(name, value)
    early = intake.read_head(ex, method, True, True)
    assert not transport.data and ex.state is State.RECEIVING  # a value, never an answer
    return ex, early


def test_a_routable_head_reads_to_none(rig: Rig) -> None:
    ex, early = _read(rig, b"POST", b"/api//chat?x=1", ((b"Content-Length", b"10"),))
    assert early is None
    assert ex.route is not None and ex.path == b"/api/chat" and ex.url == b"/api/chat?x=1"
    assert ex.content_length == 10 and ex.user == "127.0.0.1" and ex.request_id


@pytest.mark.parametrize(("method", "url", "status"), [
    (b"POST", b"/api/nothing", 404),
    (b"GET", b"/api/chat", 405),
    (b"POST", b"/api/chat%zz", 400),
])
def test_a_head_the_gateway_refuses_comes_back_as_its_answer(
        rig: Rig, method: bytes, url: bytes, status: int) -> None:
    _, early = _read(rig, method, url)
    assert early is not None
    assert early[0] == status and early[2] and not early[4]  # answered once the body is read


def test_a_trailing_slash_comes_back_as_a_redirect(rig: Rig) -> None:
    _, early = _read(rig, b"GET", b"/api/tags/?a=b")
    assert early == (301, b"", b"", b"Location: /api/tags?a=b\r\n", False)


def test_a_declared_body_over_the_limit_is_answered_at_once(rig: Rig) -> None:
    ex, early = _read(rig, b"POST", b"/api/chat", ((b"Content-Length", b"101"),))
    assert early is not None and early[0] == 413 and early[4]  # immediate: the body is not read
    assert b"--max-body-mb" in early[2]
    ex.head_complete(b"POST", True, True)  # the exchange holds it: the connection closes
    assert ex.early_error is not None and ex.discard_body and not ex.keep_alive
