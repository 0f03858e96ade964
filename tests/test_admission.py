"""The driver's helpers for admit, queue and relay (proxy/admission.py, proxy/response.py).

The exchange tests (test_exchange.py) play these steps through the client
protocol; here each helper is called directly on an exchange brought to the
step, to pin the contract the driver relies on: a value that says what comes
next (go on, or the request was answered), and no call back into the driver:
nothing started, queued or sent to a backend.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import blake3
import pytest
from test_exchange import CHAT, OK_HEAD, FakeTransport, Rig, chunk, post

from ollamamq_fast.policy import gate
from ollamamq_fast.policy.cache import Entry
from ollamamq_fast.proxy import admission, intake, response
from ollamamq_fast.proxy.downstream import ClientProtocol
from ollamamq_fast.proxy.exchange import Exchange
from ollamamq_fast.proxy.state import State
from ollamamq_fast.proxy.transport import Transport
from ollamamq_fast.proxy.upstream import ResponseSink, UpstreamConnection
from ollamamq_fast.sched import dispatcher
from ollamamq_fast.wire.routes import lookup


@pytest.fixture()
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def _read(rig: Rig, path: bytes = b"/api/chat", body: bytes = CHAT,
          extra: tuple[tuple[bytes, bytes], ...] = ()
          ) -> tuple[ClientProtocol, FakeTransport, Exchange]:
    """An exchange whose head and body are read and that reached admission, not routed yet."""
    proto, transport = rig.client()
    ex = Exchange(proto)
    ex.url = path
    for name, value in ((b"X-User-ID", b"alice"), *extra):
        ex.request_head.add(name, value)
    assert intake.read_head(ex, b"POST", True, True) is None and ex.route is lookup(path)
    ex.ustats = rig.state.ledger.arrived(ex.user, ex.client_ip)
    ex.body = [body[:5], body[5:]]  # as the parser delivers it: in pieces
    ex.body_size = len(body)
    ex.request_complete = True
    return proto, transport, ex


def _untouched(rig: Rig, ex: Exchange, transport: FakeTransport) -> None:
    assert ex.state is State.RECEIVING and not transport.data
    assert not any(p.opened for p in rig.pools) and not rig.state.dispatcher.queue


# -- admission.py ---------------------------------------------------------------------


def test_admit_reads_the_model_and_returns_the_policys_value(rig: Rig) -> None:
    _, transport, ex = _read(rig)
    route = ex.route
    assert route is not None
    assert admission.admit(ex, route) is gate.ADMIT
    assert ex.body == [CHAT] and ex.model == "m:latest" and ex.model_name == "m"
    _untouched(rig, ex, transport)


@pytest.mark.parametrize(("path", "body", "status"), [
    (b"/api/chat", b'{"model": 12}', 400),
    (b"/api/chat", b'{"messages": []}', 400),
    (b"/api/generate", b'{"prompt": "hi"}', 404),  # as Ollama answers it
])
def test_admit_of_a_body_naming_no_model_answers_and_returns_none(
        rig: Rig, path: bytes, body: bytes, status: int) -> None:
    _, transport, ex = _read(rig, path, body)
    route = ex.route
    assert route is not None
    assert admission.admit(ex, route) is None
    assert ex.state is State.DONE
    assert transport.take().startswith(b"HTTP/1.1 %d " % status)
    assert not any(p.opened for p in rig.pools)


def test_admit_of_a_compressed_body_reads_no_model(rig: Rig) -> None:
    _, transport, ex = _read(rig, b"/v1/chat/completions", CHAT,
                             ((b"Content-Encoding", b"zstd"),))
    route = ex.route
    assert route is not None and ex.encoded_body
    verdict = admission.admit(ex, route)
    assert verdict is not None and verdict.kind is gate.Verdict.ADMIT
    assert ex.model is None and ex.body == [CHAT]
    _untouched(rig, ex, transport)


def test_admitted_applies_what_the_policy_decided_and_goes_on(rig: Rig) -> None:
    _, transport, ex = _read(rig)
    a = gate.admitted(b'{"model":"m"}', b"key", 2, capped=True, cache_miss=True)
    assert admission.admitted(ex, a) is True
    assert (ex.body, ex.cache_key, ex.strip_usage) == ([b'{"model":"m"}'], b"key", 2)
    assert rig.state.stats.tokens_capped == 1 and rig.state.stats.cache_misses == 1
    _untouched(rig, ex, transport)


def test_admitted_answers_a_refusal_in_the_routes_format(rig: Rig) -> None:
    _, transport, ex = _read(rig, b"/v1/chat/completions")
    a = gate.refused(429, "slow down", retry_after=7, reason="rate")
    assert admission.admitted(ex, a) is False
    data = transport.take()
    assert data.startswith(b"HTTP/1.1 429 ") and b"Retry-After: 7\r\n" in data
    assert b'"message":"slow down"' in data  # OpenAI's error object on an OpenAI route
    assert rig.state.stats.rejected == 1 and rig.state.stats.rate_limited == 1
    assert ex.state is State.DONE


def test_admitted_answers_a_cache_hit_from_the_entry(rig: Rig) -> None:
    _, transport, ex = _read(rig)
    entry = Entry(200, [(b"Content-Type", b"application/json")], b'{"done":true}', 0.0)
    assert admission.admitted(ex, gate.cached(entry)) is False
    data = transport.take()
    assert data.startswith(b"HTTP/1.1 200 ") and b"X-Cache: HIT" in data
    assert data.endswith(b'{"done":true}') and rig.state.stats.cache_hits == 1
    assert not any(p.opened for p in rig.pools)


def test_settled_returns_the_resolved_admission(rig: Rig) -> None:
    _, transport, ex = _read(rig)
    future: asyncio.Future[gate.Admission] = rig.loop.create_future()
    future.set_result(gate.ADMIT)
    assert admission.settled(ex, future) is gate.ADMIT
    _untouched(rig, ex, transport)


def test_settled_answers_500_when_the_lookup_failed(rig: Rig) -> None:
    _, transport, ex = _read(rig)
    future: asyncio.Future[gate.Admission] = rig.loop.create_future()
    future.set_exception(ConnectionError("redis is gone"))
    assert admission.settled(ex, future) is None
    assert transport.take().startswith(b"HTTP/1.1 500 ") and ex.state is State.DONE


def test_affinity_is_the_user_and_the_opening_message(rig: Rig) -> None:
    _, _, ex = _read(rig)
    route = ex.route
    assert route is not None
    admission.admit(ex, route)
    opening = b'{"role":"user","content":"hi"}'
    assert admission.affinity(ex) == "alice:" + blake3.blake3(opening).hexdigest()[:16]
    ex.body = [b'{"model":"m","prompt":"hi"}']
    assert admission.affinity(ex) == "alice:"


@pytest.mark.parametrize("coding", [b"zstd", b"gzip"])
def test_a_native_body_is_read_as_it_came_whatever_its_content_encoding(
        rig: Rig, coding: bytes) -> None:
    # Ollama's native handlers decode nothing: the model and the policy are
    # what they read, the body as it came (a lying header changes nothing).
    for path, body in ((b"/api/chat", CHAT), (b"/api/pull", b'{"model":"m"}')):
        _, _, ex = _read(rig, path, body, ((b"Content-Encoding", coding),))
        route = ex.route
        assert route is not None and not ex.encoded_body
        admission.admit(ex, route)
        assert ex.model is not None


def test_refused_counts_the_dispatchers_refusal_and_answers_it(rig: Rig) -> None:
    _, transport, ex = _read(rig)
    placement = dispatcher.refused(503, "queue is full", retry_after=3, rejected=True)
    admission.refused(ex, placement)
    data = transport.take()
    assert data.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 3\r\n" in data
    assert rig.state.stats.rejected == 1 and ex.state is State.DONE


# -- response.py ----------------------------------------------------------------------


class _Spy(ResponseSink):
    """Holds a backend connection's parsed head without acting on it."""

    @property
    def client_transport(self) -> Transport | None:
        return None

    def response_head(self, conn: UpstreamConnection) -> bytes | None:
        return b""

    def response_complete(self, conn: UpstreamConnection) -> None:
        pass

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        pass


def _waiting(rig: Rig, backend_head: bytes, request: bytes | None = None
             ) -> tuple[FakeTransport, Exchange, UpstreamConnection]:
    """An exchange WAITING on its backend, whose connection has parsed `backend_head`."""
    proto, client = rig.client()
    proto.data_received(request or post())
    rig.turn()
    ex = proto.active
    conn, _ = rig.pools[0].last
    assert ex is not None and ex.state is State.WAITING and ex.upstream is conn
    conn.sink = _Spy()
    conn.data_received(backend_head)
    conn.sink = ex
    client.take()
    return client, ex, conn


def test_head_returns_the_clients_head_and_counts_the_first_byte(rig: Rig) -> None:
    client, ex, conn = _waiting(rig, OK_HEAD)
    backend = ex.backend
    assert backend is not None
    head = response.head(ex, conn, backend)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head and b"X-Gateway-Backend: http://b0:11434" in head
    assert b"X-Request-ID: " + ex.request_id in head and b"X-Cache" not in head
    assert ex.state is State.STREAMING and ex.status == 200 and ex.keep_alive
    assert rig.state.stats.ttfb.count == 1
    assert not client.data  # the connection writes it, not the helper


def test_head_of_an_uncacheable_answer_drops_the_cache_tee(rig: Rig) -> None:
    _, ex, conn = _waiting(rig, b"HTTP/1.1 500 Oops\r\nContent-Length: 2\r\n\r\n")
    ex.cache_key = b"key"
    conn.tee = []
    backend = ex.backend
    assert backend is not None
    head = response.head(ex, conn, backend)
    assert head.startswith(b"HTTP/1.1 500 Oops\r\n") and b"X-Cache: MISS\r\n" in head
    assert conn.tee is None and ex.status == 500


def test_head_says_keep_alive_to_an_http10_client(rig: Rig) -> None:
    request = post().replace(b"HTTP/1.1\r\n", b"HTTP/1.0\r\nConnection: keep-alive\r\n", 1)
    _, ex, conn = _waiting(rig, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", request)
    backend = ex.backend
    assert backend is not None and ex.http10
    head = response.head(ex, conn, backend)
    assert b"Connection: keep-alive\r\n" in head and b"Content-Length: 2" in head


def test_count_tokens_reads_the_backends_counts_else_estimates(rig: Rig) -> None:
    _, ex, conn = _waiting(rig, OK_HEAD)
    conn.sink = _Spy()
    conn.data_received(chunk(b'{"done":false}\n') * 3)
    response.count_tokens(ex, conn)  # no usage in it: one token an event (no final line yet)
    assert (ex.prompt_tokens, ex.completion_tokens, ex.tokens_estimated) == (0, 3, True)
    conn.data_received(chunk(b'{"done":true,"prompt_eval_count":5,"eval_count":6}\n'))
    response.count_tokens(ex, conn)
    assert (ex.prompt_tokens, ex.completion_tokens) == (5, 6)


def test_completed_counts_the_answer_on_its_backend(rig: Rig) -> None:
    _, ex, conn = _waiting(rig, OK_HEAD)
    backend = ex.backend
    assert backend is not None
    response.head(ex, conn, backend)
    conn.sink = _Spy()
    conn.data_received(chunk(b'{"done":true,"prompt_eval_count":1,"eval_count":2}\n'))
    done = backend.requests_done
    response.completed(ex, conn, backend)
    assert backend.requests_done == done + 1
    assert (ex.prompt_tokens, ex.completion_tokens) == (1, 2)
    assert ex.state is State.STREAMING  # finishing is the driver's

