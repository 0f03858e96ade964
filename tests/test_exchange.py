"""The exchange, driven sans I/O: fake client and backend transports, a real gateway state.

Every path of a request's life is played by feeding bytes to the client
protocol and to the backend connection by hand, then reading what each fake
transport was given. No sockets, no timing: the loop is only turned to run
the callbacks a step schedules (a connect, the dispatcher's retry turn).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from ollamamq_fast.config import Settings, parse_backend_urls
from ollamamq_fast.fleet.backend import ApiKind, Backend
from ollamamq_fast.gateway import GatewayState
from ollamamq_fast.proxy.chunks import ChunkScanner
from ollamamq_fast.proxy.downstream import ClientProtocol
from ollamamq_fast.proxy.pool import UpstreamPool
from ollamamq_fast.proxy.state import State
from ollamamq_fast.proxy.upstream import UpstreamConnection

CHAT = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'


class FakeTransport:
    """Collects writes; records pauses; enough of a uvloop transport for both sides."""

    def __init__(self, peer: str = "127.0.0.1") -> None:
        self.data = bytearray()
        # Calls that hand bytes over: uvloop sends each at once (a syscall and
        # a TCP segment apiece), so pieces that go together go in one call.
        self.sends = 0
        self.paused = False
        self.closing = False
        self.aborted = False
        self.peer = peer

    def write(self, data: bytes) -> None:
        assert not self.closing, "write after close"
        self.data += data
        self.sends += 1

    def writelines(self, data: list[bytes]) -> None:
        assert not self.closing, "write after close"
        for piece in data:
            self.data += piece
        self.sends += 1

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def set_write_buffer_limits(self, high: int = 0, low: int = 0) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.peer, 40000) if name == "peername" else default

    def take(self) -> bytes:
        out = bytes(self.data)
        self.data.clear()
        return out


class FakePool(UpstreamPool):
    """A backend's pool whose connections are fake transports, opened on demand."""

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend, None)  # type: ignore[arg-type]
        self.idle: list[UpstreamConnection] = []
        self.opened: list[tuple[UpstreamConnection, FakeTransport]] = []
        self.open = 0
        self.closed = False
        # How the connections find a chunked body's end (see the rig fixture).
        self.scan_chunks = False

    def acquire_idle(self) -> UpstreamConnection | None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        return None

    async def connect(self) -> UpstreamConnection:
        conn = UpstreamConnection(self)
        conn.scan_chunks = self.scan_chunks
        conn.scan_from = 0  # whatever the size of the body in the head's read
        transport = FakeTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        self.opened.append((conn, transport))
        self.open += 1
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    def expire_idle(self, now: float) -> None:
        pass

    def close_all(self) -> None:
        pass

    @property
    def last(self) -> tuple[UpstreamConnection, FakeTransport]:
        return self.opened[-1]


class Rig:
    """A gateway state with fake backends and a way to open fake client connections."""

    def __init__(self, backends: int = 1, slots: int = 1, **settings: Any) -> None:
        self.loop = asyncio.new_event_loop()
        s = Settings()
        s.backends = parse_backend_urls(",".join(f"http://b{i}:11434" for i in range(backends)))
        s.slots = slots
        s.tui = False
        s.log_file = None
        s.state_path = None
        for key, value in settings.items():
            setattr(s, key, value)
        self.state = GatewayState(s, self.loop)
        self.pools: list[FakePool] = []
        for b in self.state.fleet.backends:
            b.kind = ApiKind.OLLAMA
            b.online = True
            b.models = {"m:latest": {"name": "m:latest", "model": "m:latest"}}
            b.refresh()
            pool = FakePool(b)
            b.pool = pool
            self.pools.append(pool)
        self.state.fleet.rebuild_index()

    def client(self, peer: str = "127.0.0.1") -> tuple[ClientProtocol, FakeTransport]:
        proto = ClientProtocol(self.state)
        transport = FakeTransport(peer)
        proto.connection_made(transport)  # type: ignore[arg-type]
        return proto, transport

    def turn(self) -> None:
        """Run what the last step scheduled (connects, the dispatcher's retry turn)."""
        for _ in range(3):
            self.loop.run_until_complete(asyncio.sleep(0))

    def close(self) -> None:
        self.loop.close()


@pytest.fixture(params=[False, True], ids=["llhttp", "scanner"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    """Every exchange test runs twice: the body's end found by llhttp (the
    pure-Python build's way) and by proxy/chunks.py's scanner (the compiled one's)."""
    r = Rig()
    for pool in r.pools:
        pool.scan_chunks = request.param
    yield r
    r.close()


def post(path: bytes = b"/api/chat", body: bytes = CHAT, user: bytes = b"alice",
         extra: bytes = b"") -> bytes:
    return (b"POST %b HTTP/1.1\r\nHost: gw\r\nX-User-ID: %b\r\n%bContent-Length: %d\r\n\r\n%b"
            % (path, user, extra, len(body), body))


OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(line: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(line), line)


FINAL = b'{"model":"m","done":true,"prompt_eval_count":3,"eval_count":4}\n'


def test_success_relays_the_stream_and_counts_it(rig: Rig) -> None:
    proto, client = rig.client()
    proto.data_received(post())
    rig.turn()
    conn, backend = rig.pools[0].last
    sent = backend.take()
    assert sent.startswith(b"POST /api/chat HTTP/1.1\r\nHost: b0:11434\r\n") and sent.endswith(CHAT)
    conn.data_received(OK_HEAD + chunk(b'{"done":false}\n'))
    assert b'{"done":false}' in client.data and b"X-Gateway-Backend: http://b0:11434" in client.data
    conn.data_received(chunk(FINAL) + b"0\r\n\r\n")
    assert client.data.endswith(b"0\r\n\r\n") and not client.closing
    user = rig.state.stats.users["alice"]
    assert (user.done, user.in_flight, user.prompt_tokens, user.completion_tokens) == (1, 0, 3, 4)
    assert rig.pools[0].idle == [conn]  # back to the pool, unpaused
    assert proto.active is None


LINE = b'{"model":"m","response":" word","done":false}\n'
NO_USAGE_FINAL = b'{"model":"m","done":true}\n'


def start_stream(rig: Rig) -> tuple[ClientProtocol, FakeTransport, UpstreamConnection]:
    proto, client = rig.client()
    proto.data_received(post())
    rig.turn()
    conn, _ = rig.pools[0].last
    return proto, client, conn


def test_a_whole_stream_in_the_head_read_is_relayed_exactly_and_not_scanned(rig: Rig) -> None:
    # A fast backend writes head and every line at once (as the simulator and
    # bench/stream_source.py do): the body is written from the read itself.
    body = b"".join(chunk(LINE) for _ in range(200)) + chunk(FINAL) + b"0\r\n\r\n"
    assert len(body) > 4096
    _, client, conn = start_stream(rig)
    sends = client.sends
    conn.data_received(OK_HEAD + body)
    head, _, relayed = bytes(client.data).partition(b"\r\n\r\n")
    assert relayed == body and b"X-Gateway-Backend: http://b0:11434" in head
    assert client.sends == sends + 1  # head and body in one send
    user = rig.state.stats.users["alice"]
    assert (user.done, user.prompt_tokens, user.completion_tokens, user.estimated_tokens) == (1, 3, 4, 0)
    assert conn.events == 0  # the usage was in the tail: no read was ever counted


@pytest.mark.parametrize("lines", [3, 200])
def test_a_stream_without_usage_in_one_read_is_estimated_from_its_events(rig: Rig, lines: int) -> None:
    body = b"".join(chunk(LINE) for _ in range(lines)) + chunk(NO_USAGE_FINAL) + b"0\r\n\r\n"
    _, client, conn = start_stream(rig)
    conn.data_received(OK_HEAD + body)
    assert bytes(client.data).endswith(body)
    user = rig.state.stats.users["alice"]
    assert (user.done, user.completion_tokens, user.estimated_tokens) == (1, lines, lines)


@pytest.mark.parametrize("head_with_first", [False, True])
def test_events_of_a_stream_over_many_reads_are_each_counted_once(rig: Rig, head_with_first: bool) -> None:
    _, client, conn = start_stream(rig)
    conn.data_received(OK_HEAD + (chunk(LINE) if head_with_first else b""))
    for _ in range(9 if head_with_first else 10):
        conn.data_received(chunk(LINE))
        assert conn.events_seen() <= 10
    conn.data_received(chunk(LINE) + chunk(LINE))  # two events in one read
    conn.data_received(chunk(NO_USAGE_FINAL))
    conn.data_received(b"0\r\n\r\n")
    user = rig.state.stats.users["alice"]
    assert (user.done, user.completion_tokens, user.estimated_tokens) == (1, 12, 12)
    assert client.data.endswith(b"0\r\n\r\n")


@pytest.mark.parametrize("seed", range(40))
def test_the_tail_is_the_end_of_the_two_reads_kept_whatever_their_sizes(rig: Rig, seed: int) -> None:
    # A stream in reads of random sizes, the first with the head: tail(n) is
    # the last n body bytes of the last two reads, for n below, at and above
    # their size (the token tap asks for 256 bytes, the end checks for 4 KiB).
    rnd = random.Random(seed)
    body = b"".join(chunk(LINE) for _ in range(300))
    cuts = sorted(rnd.sample(range(1, len(body)), rnd.randint(0, 6)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    if rnd.random() < 0.3:
        pieces.insert(0, b"")  # a head alone in its read
    _, _, conn = start_stream(rig)
    conn.data_received(OK_HEAD + pieces[0])
    kept = [pieces[0]]
    for piece in pieces[1:]:
        conn.data_received(piece)
        kept = [kept[-1], piece]
    both = b"".join(kept)
    for n in (1, 100, 256, 4096, len(both), len(both) + 1, 3 * len(both)):
        if n > 0:
            assert conn.tail(n) == both[-n:], (n, [len(p) for p in kept])
    assert conn.tail() == both[-4096:]


def test_a_backend_dead_after_its_head_read_ends_the_stream_cleanly(rig: Rig) -> None:
    body = b"".join(chunk(LINE) for _ in range(100))
    _, client, conn = start_stream(rig)
    conn.data_received(OK_HEAD + body)
    assert conn.tail() == body[-4096:]
    conn.connection_lost(ConnectionResetError("gone"))
    text = bytes(client.data)
    assert text.partition(b"\r\n\r\n")[2].startswith(body)
    assert b'"error"' in text[-200:] and text.endswith(b"0\r\n\r\n")
    assert rig.state.stats.users["alice"].in_flight == 0


@pytest.mark.parametrize("cut", [
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b'{"mod', id="length"),
    pytest.param(OK_HEAD + b'9\r\n{"model":', id="mid-line"),
])
def test_a_stream_cut_where_no_error_frame_fits_still_ends_the_request(rig: Rig, cut: bytes) -> None:
    """The client's connection is cut, and the request has its one end: its user's in-flight
    count is given back (it was not, and a user with a limit of one was locked out)."""
    proto, client, conn = start_stream(rig)
    conn.data_received(cut)
    conn.connection_lost(ConnectionResetError("gone"))
    assert client.aborted
    proto.connection_lost(None)
    user = rig.state.stats.users["alice"]
    assert user.in_flight == 0 and user.done == 1 and user.dropped == 0


@pytest.mark.parametrize(("reads", "relayed"), [
    pytest.param([OK_HEAD + chunk(FINAL) + b"0\r\n\r\n" + b"HTTP/1.1 200 OK\r\n"], b"",
                 id="one-read"),
    pytest.param([OK_HEAD, chunk(FINAL) + b"0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
                 OK_HEAD, id="later-read"),
])
def test_bytes_past_the_answer_are_never_relayed(rig: Rig, reads: list[bytes],
                                                 relayed: bytes) -> None:
    """A second response (or the start of one) after the answer: never written to the client,
    whose next request would read it as its answer; the backend connection is dropped."""
    _, client, conn = start_stream(rig)
    for data in reads:
        conn.data_received(data)
    text = bytes(client.data)
    assert text.count(b"HTTP/1.1") <= 1 and FINAL not in text
    if relayed:  # the head was relayed: the stream ends with an error line (or a cut)
        assert text.startswith(relayed[:15]) and (client.aborted or b'"error"' in text)
    else:
        assert text.startswith(b"HTTP/1.1 502")
    assert conn.closed and conn not in rig.pools[0].idle


@pytest.mark.parametrize("later_reads", [0, 1, 5])
def test_a_client_gone_mid_stream_is_charged_the_events_it_was_sent(rig: Rig, later_reads: int) -> None:
    proto, _, conn = start_stream(rig)
    conn.data_received(OK_HEAD + b"".join(chunk(LINE) for _ in range(100)))
    for _ in range(later_reads):
        conn.data_received(chunk(LINE))
    proto.connection_lost(None)
    user = rig.state.stats.users["alice"]
    expected = 100 + later_reads  # every line a token: Ollama's final line never came
    assert (user.dropped, user.completion_tokens, user.estimated_tokens) == (1, expected, expected)


def test_a_chunked_answer_split_anywhere_is_relayed_whole_and_the_connection_reused(rig: Rig) -> None:
    body = chunk(LINE) * 3 + chunk(FINAL) + b"0\r\n\r\n"
    answer = OK_HEAD + body
    for cut in range(1, len(answer)):
        proto, client = rig.client()
        proto.data_received(post())
        rig.turn()
        conn, _ = rig.pools[0].last
        conn.data_received(answer[:cut])
        conn.data_received(answer[cut:])
        assert bytes(client.data).partition(b"\r\n\r\n")[2] == body, cut
        assert rig.pools[0].idle == [conn], cut
        # The same connection, and its parser, serve the next request.
        proto.data_received(post())
        rig.turn()
        assert rig.pools[0].last[0] is conn and len(rig.pools[0].opened) == 1
        client.take()
        conn.data_received(answer)
        assert client.take().endswith(body) and rig.pools[0].idle == [conn]
        proto.connection_lost(None)
    assert rig.state.stats.users["alice"].completion_tokens == 4 * 2 * (len(answer) - 1)


class _Broken:
    """A setting whose every comparison raises: a stand-in for a bug in the data plane."""

    def __gt__(self, other: object) -> bool:
        raise RuntimeError("a bug")

    __lt__ = __ge__ = __le__ = __gt__


@pytest.mark.parametrize("path, body, expect", [
    (b"/api/chat", CHAT, b'{"error":"internal error'),
    (b"/v1/chat/completions", CHAT, b'{"error":{"message":"internal error'),
])
def test_a_bug_in_a_request_callback_answers_500_and_ends_the_connection(
        rig: Rig, caplog: pytest.LogCaptureFixture, path: bytes, body: bytes,
        expect: bytes) -> None:
    rig.state.settings.max_body_bytes = _Broken()  # read for every body a request holds
    proto, client = rig.client()
    with caplog.at_level("ERROR", logger="ollamamq_fast.proxy"):
        proto.data_received(post(path, body))
    head, _, answer = bytes(client.data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500 ") and b"Connection: close" in head
    assert answer.startswith(expect) and client.closing
    # Logged with its cause (compiled, the bug shows as a type check instead).
    [record] = [r for r in caplog.records if r.name == "ollamamq_fast.proxy"]
    assert "internal error" in record.getMessage() and record.exc_info is not None
    assert not rig.pools[0].opened


def test_an_unexpected_error_while_connecting_answers_instead_of_hanging(rig: Rig) -> None:
    async def broken_connect() -> UpstreamConnection:
        raise RuntimeError("not an OSError")

    rig.pools[0].connect = broken_connect  # type: ignore[method-assign]
    proto, client = rig.client()
    proto.data_received(post())
    rig.turn()
    head, _, body = bytes(client.data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 ") and b"not an OSError" in body
    assert rig.state.stats.users["alice"].in_flight == 0


def test_a_bug_while_sending_on_a_new_connection_answers_500_and_frees_the_slot(
        rig: Rig) -> None:
    """A bug between the connect and the request on the wire (the translator raised
    on a keep_alive of 1e308) was an exception in the connect task nobody read: the
    client waited for ever, its backend slot and in-flight count held, never logged."""
    connect = rig.pools[0].connect

    def broken_clock() -> float:
        raise RuntimeError("a bug")

    async def connect_then_break() -> UpstreamConnection:
        conn = await connect()
        rig.state.loop_time = broken_clock  # read as the request goes on the wire
        return conn

    rig.pools[0].connect = connect_then_break  # type: ignore[method-assign]
    proto, client = rig.client()
    proto.data_received(post())
    rig.turn()
    head, _, body = bytes(client.data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500 ") and body.startswith(b'{"error":"internal error')
    assert client.closing
    proto.connection_lost(None)  # the close the 500 asked for
    user = rig.state.stats.users["alice"]
    assert (user.in_flight, user.dropped) == (0, 1)
    assert rig.state.fleet.backends[0].in_flight == 0
    assert all(transport.closing for _, transport in rig.pools[0].opened)


def test_an_early_error_never_reaches_a_backend(rig: Rig) -> None:
    proto, client = rig.client()
    proto.data_received(post(body=b'{"model": 12}'))
    rig.turn()
    assert not rig.pools[0].opened
    head, _, body = bytes(client.data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and "error" in orjson.loads(body)


def test_a_cache_hit_is_answered_without_a_backend() -> None:
    rig = Rig(cache_mode="all")
    try:
        proto, client = rig.client()
        body = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":false}'
        proto.data_received(post(body=body))
        rig.turn()
        conn, _ = rig.pools[0].last
        answer = b'{"model":"m","done":true,"eval_count":2}'
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%b" % (len(answer), answer))
        assert b"X-Cache: MISS" in client.take()
        proto.data_received(post(body=body, user=b"bob"))
        rig.turn()
        again = client.take()
        assert b"X-Cache: HIT" in again and again.endswith(answer)
        assert len(rig.pools[0].opened) == 1  # no second connection, nothing sent
    finally:
        rig.close()


def test_queued_then_cancelled_leaves_the_queue(rig: Rig) -> None:
    first, _ = rig.client()
    first.data_received(post())
    rig.turn()
    second, second_t = rig.client("10.0.0.2")
    second.data_received(post(user=b"bob"))
    rig.turn()
    ex = second.active
    assert ex is not None and ex.state is State.QUEUED
    assert len(rig.state.dispatcher.queue) == 1
    second.connection_lost(None)
    assert len(rig.state.dispatcher.queue) == 0 and ex.state is State.DONE
    bob = rig.state.stats.users["bob"]
    assert (bob.queued, bob.dropped, bob.done) == (0, 1, 0)
    assert not second_t.data


def test_a_backend_that_fails_before_the_first_byte_is_retried_elsewhere() -> None:
    rig = Rig(backends=2)
    try:
        proto, client = rig.client()
        proto.data_received(post())
        rig.turn()
        used = [p for p in rig.pools if p.opened]
        assert len(used) == 1
        conn, _ = used[0].last
        conn.connection_lost(ConnectionResetError("reset"))
        rig.turn()  # the retry runs from the dispatcher's own turn
        other = next(p for p in rig.pools if p is not used[0])
        assert other.opened, "not retried on the other backend"
        conn2, backend2 = other.last
        assert backend2.data.endswith(CHAT)
        conn2.data_received(OK_HEAD + chunk(FINAL) + b"0\r\n\r\n")
        assert client.data.startswith(b"HTTP/1.1 200 OK")
        assert rig.state.stats.failovers == 1
    finally:
        rig.close()


def test_backend_death_mid_stream_ends_with_an_error_line(rig: Rig) -> None:
    proto, client = rig.client()
    proto.data_received(post())
    rig.turn()
    conn, _ = rig.pools[0].last
    conn.data_received(OK_HEAD + chunk(b'{"done":false}\n'))
    conn.connection_lost(ConnectionResetError("gone"))
    text = bytes(client.data)
    assert b'"error"' in text.split(b'{"done":false}')[1] and text.endswith(b"0\r\n\r\n")
    assert rig.state.stats.users["alice"].in_flight == 0


def test_client_gone_mid_stream_aborts_the_backend(rig: Rig) -> None:
    proto, _ = rig.client()
    proto.data_received(post())
    rig.turn()
    conn, backend = rig.pools[0].last
    conn.data_received(OK_HEAD + chunk(b'{"done":false}\n'))
    proto.connection_lost(None)
    assert backend.aborted  # Ollama's only cancel signal
    user = rig.state.stats.users["alice"]
    assert (user.dropped, user.done, user.in_flight) == (1, 0, 0)
    assert rig.state.stats.cancelled == 1
    assert rig.state.fleet.backends[0].in_flight == 0  # the slot is free again


def test_terminal_event_relayed_then_client_gone_is_done(rig: Rig) -> None:
    proto, _ = rig.client()
    proto.data_received(post())
    rig.turn()
    conn, _ = rig.pools[0].last
    conn.data_received(OK_HEAD + chunk(FINAL))  # the end of body has not come yet
    proto.connection_lost(None)
    user = rig.state.stats.users["alice"]
    assert (user.done, user.dropped) == (1, 0)
    assert (user.prompt_tokens, user.completion_tokens) == (3, 4)
    assert rig.state.fleet.backends[0].in_flight == 0  # the slot is free at once
    # Nothing was left to stop: the connection reads the end of body and is pooled.
    assert not conn.closed
    conn.data_received(b"0\r\n\r\n")
    assert rig.pools[0].idle == [conn] and not conn.closed


def test_backpressure_both_ways(rig: Rig) -> None:
    proto, client = rig.client()
    proto.data_received(post())
    rig.turn()
    conn, backend = rig.pools[0].last
    conn.data_received(OK_HEAD + chunk(b'{"done":false}\n'))
    proto.pause_writing()  # the client reads slowly
    assert backend.paused
    proto.resume_writing()
    assert not backend.paused
    conn.pause_writing()  # the backend takes the upload slowly
    assert client.paused
    conn.resume_writing()
    assert not client.paused
    proto.pause_writing()
    conn.data_received(chunk(FINAL) + b"0\r\n\r\n")  # ends while the client is slow
    assert rig.pools[0].idle == [conn] and not backend.paused  # pooled only resumed


# -- limits on what clients and backends may make the gateway hold (issue 14) ------------


def responses(data: bytes) -> list[int]:
    """Statuses of the responses in a byte stream (bodies skipped by Content-Length)."""
    out = []
    rest = bytes(data)
    while rest:
        head, _, rest = rest.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        out.append(int(lines[0].split(b" ")[1]))
        length = next((int(v) for n, _, v in (ln.partition(b": ") for ln in lines[1:])
                       if n.lower() == b"content-length"), 0)
        rest = rest[length:]
    return out


@pytest.mark.parametrize("request_bytes", [
    (b"GET /api/tags HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
     b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\nPRI * HTTP/2.0\r\n\r\n"),
    b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\x16\x03\x01",
])
def test_an_upgrade_or_connect_gets_exactly_one_response(rig: Rig, request_bytes: bytes) -> None:
    proto, client = rig.client()
    proto.data_received(request_bytes)
    rig.turn()
    proto.data_received(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")  # nothing more is read
    assert len(responses(client.data)) == 1 and client.closing


def test_thousands_of_tiny_pipelined_requests_in_one_read_are_not_a_large_head(rig: Rig) -> None:
    proto, client = rig.client()
    one = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    data = one * 5000
    proto.data_received(data[: len(data) - 10])  # ends inside the last head
    proto.data_received(data[len(data) - 10 :])
    statuses = responses(client.data)
    assert statuses == [200] * 5000


def test_a_head_trickling_in_is_cut_at_the_total_deadline(rig: Rig) -> None:
    from ollamamq_fast.proxy.downstream import HEAD_DEADLINE_S

    proto, client = rig.client()
    proto.data_received(b"GET /api/tags HTTP/1.1\r\n")
    ticks = 0
    while not client.closing and ticks < HEAD_DEADLINE_S + 2:
        proto.data_received(b"X-A: b\r\n")  # a byte now and then: never idle
        proto.reap(1.0, 10.0, 75.0)
        ticks += 1
    assert client.closing and responses(client.data) == [408]
    assert ticks >= HEAD_DEADLINE_S - 1


def test_a_body_below_the_minimum_rate_is_cut(rig: Rig) -> None:
    from ollamamq_fast.proxy.downstream import BODY_GRACE_S, BODY_MIN_RATE

    proto, client = rig.client()
    proto.data_received(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
    for _ in range(int(BODY_GRACE_S) + 1):
        proto.data_received(b"x" * (BODY_MIN_RATE // 4))
        proto.reap(1.0, 10.0, 75.0)
    assert client.closing and responses(client.data) == [408]


def test_a_backend_head_without_end_is_bounded(rig: Rig) -> None:
    proto, client = rig.client()
    proto.data_received(post())
    rig.turn()
    conn, backend = rig.pools[0].last
    conn.data_received(b"HTTP/1.1 200 OK\r\n")
    for _ in range(100):
        if backend.closing:
            break
        conn.data_received(b"X-Filler: " + b"a" * 1000 + b"\r\n")
    assert backend.aborted
    assert responses(client.data) == [502] and b"response head larger" in client.data


def test_the_global_body_budget_answers_503_with_retry_after() -> None:
    rig = Rig(max_bodies_bytes=100_000)
    try:
        first, _ = rig.client()
        first.data_received(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 90000\r\n\r\n"
                            + b"x" * 80_000)  # held while the rest comes
        second, second_t = rig.client("10.0.0.2")
        second.data_received(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\n\r\n"
                             + b"y" * 30_000)
        assert responses(second_t.data) == [503] and b"Retry-After: 5" in second_t.data
        assert rig.state.bodies.held == 80_000
        first.connection_lost(None)  # its bytes are given back
        assert rig.state.bodies.held == 0
        third, third_t = rig.client("10.0.0.3")
        third.data_received(post())
        rig.turn()
        assert not third_t.data and rig.pools[0].opened  # admitted and sent on
    finally:
        rig.close()


def test_nearing_the_open_file_limit_is_logged_once_in_a_while(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    from ollamamq_fast.gateway import Gateway, raise_fd_limit

    assert raise_fd_limit() > 0
    gateway = Gateway(rig.state.settings)
    gateway.fd_limit = 10
    for i in range(9):
        rig.client(f"10.0.0.{i}")
    with caplog.at_level("WARNING", logger="ollamamq_fast"):
        gateway._check_fds(rig.state, 100.0)
        gateway._check_fds(rig.state, 101.0)  # not again so soon
    warnings = [r for r in caplog.records if "open-file limit" in r.getMessage()]
    assert len(warnings) == 1 and "9 client and backend connections" in warnings[0].getMessage()


def test_a_retry_never_goes_back_to_a_backend_that_failed_it() -> None:
    """Issue 16: with one backend dead and the other busy, the retry waits for the live one."""
    rig = Rig(backends=2)
    try:
        busy, _ = rig.client("10.0.0.9")
        busy.data_received(post(user=b"busy"))
        rig.turn()
        taken = next(p for p in rig.pools if p.opened)  # its one slot is in use
        dead = next(p for p in rig.pools if p is not taken)
        proto, client = rig.client()
        proto.data_received(post())
        rig.turn()
        conn, _ = dead.last
        conn.connection_lost(ConnectionResetError("killed"))
        rig.turn()
        # The dead backend still counts as available (its breaker needs more
        # failures), yet the retry waits for the busy one instead of going back.
        assert len(dead.opened) == 1 and not client.data
        busy_conn, busy_backend = taken.last
        busy_backend.take()
        busy_conn.data_received(OK_HEAD + chunk(FINAL) + b"0\r\n\r\n")  # the slot frees
        rig.turn()
        # The retry runs on the live backend, over the connection it just pooled.
        assert len(dead.opened) == 1 and busy_backend.take().endswith(CHAT)
        busy_conn.data_received(OK_HEAD + chunk(FINAL) + b"0\r\n\r\n")
        assert client.data.startswith(b"HTTP/1.1 200 OK")
    finally:
        rig.close()


def test_nothing_after_a_closing_request_is_served(rig: Rig) -> None:
    """Expect: 100-continue answered 404 closes the connection; what follows never runs."""
    proto, client = rig.client()
    body = b'{"model":"m","messages":[]}'
    first = (b"POST /api/nope HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
             b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
    proto.data_received(first + post(b"/api/chat") + post(b"/api/chat", user=b"bob"))
    rig.turn()
    assert not rig.pools[0].opened
    assert responses(client.data) == [404] and client.closing


def test_bytes_after_connection_close_are_ignored_not_answered(rig: Rig) -> None:
    proto, client = rig.client()
    proto.data_received(b"GET /api/tags HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                        b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
    assert responses(client.data) == [200] and client.closing


@pytest.mark.parametrize(("status_line", "expected"), [
    (b"HTTP/1.1 201 Made Here", b"HTTP/1.1 201 Made Here\r\n"),  # relayed as it came
    (b"HTTP/1.1 200", b"HTTP/1.1 200 OK\r\n"),  # no phrase: the usual one
    (b"HTTP/1.1 200 ", b"HTTP/1.1 200 OK\r\n"),
    (b"HTTP/1.0 202 Taken", b"HTTP/1.1 202 Taken\r\n"),  # rebuilt, the phrase kept
])
@pytest.mark.parametrize("hop_by_hop", [b"", b"Keep-Alive: timeout=5\r\n"])
def test_the_reason_phrase_reaches_the_client(rig: Rig, status_line: bytes, expected: bytes,
                                              hop_by_hop: bytes) -> None:
    proto, client = rig.client()
    proto.data_received(post())
    rig.turn()
    conn, backend = rig.pools[0].last
    backend.take()
    conn.data_received(status_line + b"\r\nContent-Type: application/json\r\n" + hop_by_hop
                       + b"Content-Length: 2\r\n\r\nok")
    head = bytes(client.data)
    assert head.startswith(expected) and head.endswith(b"\r\n\r\nok"), head
    assert b"Keep-Alive" not in head  # hop-by-hop: never relayed


@pytest.mark.parametrize("reads", [
    pytest.param([OK_HEAD + chunk(LINE) + b"zz\r\n"], id="with-the-head"),
    pytest.param([OK_HEAD + chunk(LINE), b"5\r\nabcdefgh\r\n"], id="later-read"),
])
def test_broken_chunk_framing_ends_the_stream_like_a_dead_backend(rig: Rig,
                                                                  reads: list[bytes]) -> None:
    """Framing the backend broke: the answer is cut with an error line, the backend
    connection is dropped (never pooled), and the request has its one end."""
    proto, client = rig.client()
    proto.data_received(post())
    rig.turn()
    conn, _ = rig.pools[0].last
    for data in reads:
        conn.data_received(data)
    text = bytes(client.data)
    assert text.startswith(b"HTTP/1.1 502") or b'"error"' in text or client.aborted
    assert b"zz" not in text and b"abcdefgh" not in text
    assert conn.closed and conn not in rig.pools[0].idle
    assert rig.state.stats.users["alice"].in_flight == 0


def test_crlf_after_the_answer_keeps_the_connection(rig: Rig) -> None:
    """Blank lines between answers are allowed (RFC 9112 §2.2): the answer is complete
    and the connection goes back to the pool. They are not relayed, by the chunk
    scanner or by llhttp's way (Python's http.client would read them as the
    status line of its next answer)."""
    proto, client = rig.client()
    proto.data_received(post())
    rig.turn()
    conn, _ = rig.pools[0].last
    conn.data_received(OK_HEAD + chunk(FINAL) + b"0\r\n\r\n\r\n")
    text = bytes(client.data)
    assert text.endswith(FINAL + b"\r\n0\r\n\r\n") and FINAL in text
    assert not conn.closed and conn in rig.pools[0].idle
    user = rig.state.stats.users["alice"]
    assert user.in_flight == 0 and user.done == 1


@pytest.mark.parametrize("interim", [b"", b"HTTP/1.1 100 Continue\r\n\r\n",
                                     b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"])
@pytest.mark.parametrize("body", [b'{"done":true}', b'{"a":"\r\n\r\n"}\r\n\r\nX', b"x"])
def test_a_whole_length_answer_in_one_read_is_relayed_exactly(rig: Rig, interim: bytes,
                                                               body: bytes) -> None:
    """The head's end is found from the Content-Length when the answer comes whole
    (a blank line inside the body, an interim head before it): head and body exact."""
    proto, client = rig.client()
    proto.data_received(post())
    rig.turn()
    conn, _ = rig.pools[0].last
    conn.data_received(interim + b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                       b"X-Kept: yes\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
    text = bytes(client.data)
    head, _, got = text.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"X-Kept: yes" in head
    assert b"Content-Length: %d" % len(body) in head and got == body
    assert not conn.closed and conn in rig.pools[0].idle


def test_a_scanned_end_llhttp_does_not_agree_with_is_not_relayed_as_complete(rig: Rig) -> None:
    """Insurance: should the scanner ever follow a body llhttp reads otherwise (here a
    Content-Length one, forced), the answer is cut and the connection dropped, never
    ended as complete with llhttp still in the middle of a message."""
    proto, client = rig.client()
    proto.data_received(post())
    rig.turn()
    conn, _ = rig.pools[0].last
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                       b"Content-Length: 100\r\n\r\n")
    conn.scanner = ChunkScanner()
    conn.data_received(chunk(FINAL) + b"0\r\n\r\n")
    assert conn.closed and conn not in rig.pools[0].idle
    assert client.aborted or b'"error"' in bytes(client.data)
    assert rig.state.stats.users["alice"].in_flight == 0
