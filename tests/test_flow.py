"""FlowControl (proxy/flow.py): the one owner of pause/resume, tested with fake transports."""

from __future__ import annotations

from typing import Any

from ollamamq_fast.config import parse_backend_url
from ollamamq_fast.fleet.backend import Backend
from ollamamq_fast.proxy.flow import BODY_BUFFER, FlowControl
from ollamamq_fast.proxy.pool import UpstreamPool
from ollamamq_fast.proxy.upstream import ResponseSink, UpstreamConnection


class FakeTransport:
    """Records pause/resume calls; enough of a transport for FlowControl and the upstream side."""

    def __init__(self) -> None:
        self.paused = False
        self.calls: list[str] = []
        self.closing = False
        self.written: list[bytes] = []

    def pause_reading(self) -> None:
        assert not self.paused, "paused twice"
        self.paused = True
        self.calls.append("pause")

    def resume_reading(self) -> None:
        assert self.paused, "resumed while not paused"
        self.paused = False
        self.calls.append("resume")

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writelines(self, data: list[bytes]) -> None:
        self.written.extend(data)

    def set_write_buffer_limits(self, high: int = 0, low: int = 0) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


class FakePool(UpstreamPool):
    def __init__(self) -> None:
        super().__init__(Backend(parse_backend_url("http://b:1"), 1), None)  # type: ignore[arg-type]
        self.released: list[UpstreamConnection] = []

    def release(self, conn: UpstreamConnection) -> None:
        self.released.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        pass


class Sink(ResponseSink):
    def __init__(self, client: FakeTransport) -> None:
        super().__init__()
        self.client = client
        self.done = False

    @property
    def client_transport(self) -> Any:
        return self.client

    def response_head(self, conn: UpstreamConnection) -> bytes | None:
        return b"HTTP/1.1 200 OK\r\n\r\n"

    def response_complete(self, conn: UpstreamConnection) -> None:
        self.done = True
        conn.finish_response(reusable=True)

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        raise AssertionError(exc)

    def upstream_continue(self, conn: UpstreamConnection) -> None:
        pass


def test_reasons_add_up_and_only_the_last_one_resumes() -> None:
    client = FakeTransport()
    flow = FlowControl(client)
    flow.pause_client(BODY_BUFFER)
    flow.pause_client(BODY_BUFFER)  # safe to repeat
    flow.upstream_writing_paused()
    flow.resume_client(BODY_BUFFER)
    assert client.paused  # the backend is still slow to take the upload
    flow.upstream_writing_resumed()
    assert not client.paused and client.calls == ["pause", "resume"]
    flow.resume_client(BODY_BUFFER)  # nothing left to resume: no call
    assert client.calls == ["pause", "resume"]


def test_a_connection_goes_back_to_the_pool_only_resumed() -> None:
    """The adversarial pass's finding: released while paused, the next user timed out."""
    client, backend = FakeTransport(), FakeTransport()
    pool = FakePool()
    conn = UpstreamConnection(pool)
    conn.connection_made(backend)  # type: ignore[arg-type]
    flow = FlowControl(client)
    sink = Sink(client)
    conn.send(sink, flow, [b"GET / HTTP/1.1\r\n\r\n"], head_request=False)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
    flow.client_writing_paused()  # the slow client's buffer filled up
    assert backend.paused
    conn.data_received(b"56789")  # the rest was already in flight: the response ends
    assert sink.done and pool.released == [conn]
    assert not backend.paused, "pooled connection left paused"
    # The client draining later must not touch the connection another exchange may own.
    flow.client_writing_resumed()
    assert backend.calls == ["pause", "resume"]


def test_a_new_backend_connection_starts_paused_while_the_client_is_slow() -> None:
    client, first, second = FakeTransport(), FakeTransport(), FakeTransport()
    flow = FlowControl(client)
    flow.client_writing_paused()
    flow.bind(first)
    assert first.paused
    flow.unbind()
    assert not first.paused
    flow.bind(second)
    assert second.paused and not first.paused
    flow.client_writing_resumed()
    assert not second.paused


def test_a_closed_client_is_never_touched_again() -> None:
    client = FakeTransport()
    flow = FlowControl(client)
    flow.pause_client(BODY_BUFFER)
    flow.client_closed()
    flow.resume_client(BODY_BUFFER)
    flow.pause_client(BODY_BUFFER)
    assert client.calls == ["pause"]


def test_idle_pooled_connections_expire_after_their_time_and_not_before() -> None:
    # The real pool (not FakePool): release stamps a connection with the data
    # plane's clock (time.monotonic), which the reaper passes to expire_idle.
    import time

    from ollamamq_fast.proxy.pool import IDLE_EXPIRY_S

    pool = UpstreamPool(Backend(parse_backend_url("http://b:1"), 1), None)  # type: ignore[arg-type]
    stale, fresh = UpstreamConnection(pool), UpstreamConnection(pool)
    transports = {}
    for conn in (stale, fresh):
        transports[id(conn)] = transport = FakeTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        pool.open += 1
    before = time.monotonic()
    pool.release(stale)
    pool.release(fresh)
    assert before <= stale.idle_since <= time.monotonic()
    pool.expire_idle(time.monotonic())
    assert pool.idle == [stale, fresh]  # nothing is idle for long yet
    stale.idle_since -= IDLE_EXPIRY_S + 1  # idle for longer than the expiry
    pool.expire_idle(time.monotonic())
    assert pool.idle == [fresh]
    assert stale.closed and transports[id(stale)].closing
    assert not fresh.closed and not transports[id(fresh)].closing
    assert pool.acquire_idle() is fresh and pool.acquire_idle() is None
