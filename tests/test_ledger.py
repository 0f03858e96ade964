"""The ledger (accounting/ledger.py): one end per request, counted once, logged once."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from harness import SocketBackend, Stack, start_stack
from hypothesis import given, settings
from hypothesis import strategies as st
from test_traps import wait_for

from ollamamq_fast.accounting.ledger import CLIENT_CLOSED, End, Ledger, Record
from ollamamq_fast.state.tally import UsageTally
from ollamamq_fast.stats import GatewayStats, UserStats
from ollamamq_fast.wire.framing import terminal_event_relayed


class Access:
    """The access log's side the ledger writes to: its queue of records."""

    enabled = True
    max_pending = 1000

    def __init__(self) -> None:
        self.pending: list[tuple[Any, ...]] = []
        self.dropped = 0
        self.armed = 0

    def arm(self) -> None:
        """Told that a line reached an empty queue (the log then formats it)."""
        self.armed += 1

    @property
    def lines(self) -> list[tuple[Any, ...]]:
        return list(self.pending)


def rows(usage: UsageTally) -> list[tuple[str, str, int, int]]:
    """The real tally read back: (user, model, prompt, completion) per ended request."""
    return [(user, model, c.prompt, c.completion)
            for (_, user, _, model, _), c in usage.hours.items()]


def ends(usage: UsageTally) -> list[tuple[str, str, bool, bool, bool]]:
    """(key, backend, error, cancelled, estimated) per ended request."""
    return [(key, backend, c.errors > 0, c.cancelled > 0, c.estimated > 0)
            for (_, _, key, _, backend), c in usage.hours.items()]


class Quotas:
    quotas_on = True

    def __init__(self) -> None:
        self.used: list[tuple[str, int]] = []

    def tokens_used(self, user: str, prompt: int, completion: int) -> None:
        self.used.append((user, prompt + completion))


class Req(Record):
    def __init__(self, ustats: UserStats) -> None:
        super().__init__()  # the rest as a fresh exchange has them
        self.user = "alice"
        self.client_ip = "10.0.0.1"
        self.method = b"POST"
        self.path = b"/api/chat"
        self.model = "tiny:latest"
        self.model_name = "tiny"
        self.status = 200
        self.started_at = 1.0
        self.request_id = b"rid-1"
        self.ustats = ustats
        self.key_id = "k1"


def _ledger(max_pending: int = 1000) -> tuple[Ledger, GatewayStats, Access, UsageTally, Quotas]:
    stats, access, usage, quotas = GatewayStats(), Access(), UsageTally(), Quotas()
    access.max_pending = max_pending
    now = [2.0]
    ledger = Ledger(stats, usage, quotas, access, lambda: now[0])  # type: ignore[arg-type]
    return ledger, stats, access, usage, quotas


def test_a_done_request_is_counted_once_with_its_tokens_under_the_canonical_model() -> None:
    ledger, stats, access, usage, quotas = _ledger()
    ustats = ledger.arrived("alice", "10.0.0.1")
    r = Req(ustats)
    ledger.running(r)
    ledger.running(r)  # a retry does not count it twice
    assert ustats.in_flight == 1
    ledger.tokens(r, 3, 5)
    ledger.ended(r, End.DONE, "http://b")
    assert (ustats.in_flight, ustats.done, ustats.dropped) == (0, 1, 0)
    assert (ustats.prompt_tokens, ustats.completion_tokens) == (3, 5)
    assert rows(usage) == [("alice", "tiny:latest", 3, 5)] and quotas.used == [("alice", 8)]
    assert ends(usage) == [("k1", "http://b", False, False, False)]
    assert {key: c.n for key, c in stats.responses.items()} == {("/api/chat", 200, "http://b"): 1}
    assert len(access.lines) == 1 and access.lines[0][6] == 200
    assert access.lines[0][-3:] == (3, 5, b"rid-1")


def test_a_cancelled_request_gets_a_499_line_and_counts_as_dropped() -> None:
    ledger, stats, access, usage, _ = _ledger()
    ustats = ledger.arrived("alice", "10.0.0.1")
    r = Req(ustats)
    ledger.running(r)
    ledger.tokens(r, 0, 2, estimated=True)
    ledger.ended(r, End.CANCELLED, "http://b")
    assert rows(usage) == [("alice", "tiny:latest", 0, 2)]
    assert ends(usage) == [("k1", "http://b", False, True, True)]
    assert (ustats.in_flight, ustats.done, ustats.dropped) == (0, 0, 1)
    assert stats.cancelled == 1 and not stats.responses
    assert access.lines[0][6] == CLIENT_CLOSED and access.lines[0][-3:-1] == (0, 2)


def test_an_error_without_tokens_is_a_usage_row_with_its_error() -> None:
    ledger, _, _, usage, _ = _ledger()
    r = Req(ledger.arrived("alice", "10.0.0.1"))
    r.status = 403  # refused by a quota: no backend, no tokens
    ledger.ended(r, End.DONE, "")
    assert rows(usage) == [("alice", "tiny:latest", 0, 0)]
    assert ends(usage) == [("k1", "", True, False, False)]


def test_refusals_count_for_the_gateway_and_the_user_alike() -> None:
    ledger, stats, _, _, _ = _ledger()
    ustats = ledger.arrived("bob", "10.0.0.2")
    ledger.refused(Req(ustats), "rate")
    ledger.refused(Req(ustats))  # a block, the queue's bound or its wait
    assert (stats.rejected, stats.rate_limited, ustats.rejected) == (2, 1, 2)
    ran = Req(ustats)
    ledger.running(ran)
    ledger.refused(ran)  # a retry refused on its way back: an answer, counted done
    assert (stats.rejected, ustats.rejected) == (2, 2)


@pytest.mark.parametrize(("tail", "ctype", "done"), [
    (b'data: {"choices":[]}\n\ndata: [DONE]\n\n\r\n', b"text/event-stream", True),
    (b'data: {"choices":[{"delta":{}}]}\n\n\r\n', b"text/event-stream", False),
    (b'{"done":false}\n\r\n19\r\n{"done":true,"eval_count":5}\n\r\n', b"application/x-ndjson", True),
    (b'{"done":true,"eval_count":5}\n\r\n0\r\n\r\n', b"application/x-ndjson", True),
    (b'{"done": true}\n', b"application/x-ndjson", True),
    (b'{"response":"said \\"done\\":true"}\n', b"application/x-ndjson", False),
    (b'{"done":false}\n', b"application/x-ndjson", False),
    (b'{"done":true}', b"application/json", False),
])
def test_terminal_events(tail: bytes, ctype: bytes, done: bool) -> None:
    assert terminal_event_relayed(tail, ctype) is done


class LateEndBackend(SocketBackend):
    """Sends a whole stream, terminal event included, then holds the end of body back."""

    def __init__(self) -> None:
        self.release = threading.Event()
        super().__init__()

    def answer(self, conn: socket.socket, head: bytes) -> None:
        path = self.path_of(head)
        if path in (b"/api/tags", b"/api/ps", b"/api/version", b"/v1/models"):
            out = orjson.dumps({"models": [{"name": "tiny:latest", "model": "tiny:latest"}]}
                               if path == b"/api/tags" else {"models": []})
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%b" % (len(out), out))
            return
        lines = [b'{"model":"tiny","message":{"role":"assistant","content":"hi"},"done":false}\n',
                 (b'{"model":"tiny","done":true,"done_reason":"stop",'
                  b'"prompt_eval_count":7,"eval_count":11}\n')]
        body = b"".join(b"%x\r\n%b\r\n" % (len(line), line) for line in lines)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + body)
        self.release.wait(10)  # the end of body comes late, or never
        try:
            conn.sendall(b"0\r\n\r\n")
        except OSError:
            pass

    def close(self) -> None:
        self.release.set()
        super().close()


@pytest.fixture()
def late() -> Iterator[tuple[Stack, LateEndBackend]]:
    backend = LateEndBackend()
    st = start_stack(sims=[], extra_backends=[backend.url], health_interval=3600.0)
    yield st, backend
    st.close()
    backend.close()


def test_a_client_leaving_after_the_terminal_event_is_done_not_dropped(
        late: tuple[Stack, LateEndBackend]) -> None:
    st, _ = late
    body = b'{"model":"tiny","messages":[{"role":"user","content":"x"}]}'
    with socket.create_connection(("127.0.0.1", st.port), timeout=10) as c:
        c.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nX-User-ID: sdk\r\n"
                  b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        got = b""
        deadline = time.monotonic() + 10
        while b'"done":true' not in got and time.monotonic() < deadline:
            got += c.recv(65536)
    # The client closed at its terminal event, before the backend's end of body.
    stats = st.state.stats
    assert wait_for(lambda: "sdk" in stats.users and stats.users["sdk"].in_flight == 0, 5.0)
    user = stats.users["sdk"]
    assert (user.done, user.dropped) == (1, 0)
    assert (user.prompt_tokens, user.completion_tokens) == (7, 11)


def test_a_full_access_queue_drops_the_line_with_a_count() -> None:
    ledger, _, access, _, _ = _ledger(max_pending=1)  # the writer is behind (a stalled disk)
    for _ in range(3):
        ustats = ledger.arrived("alice", "10.0.0.1")
        ledger.ended(Req(ustats), End.DONE, "http://b")
    assert len(access.lines) == 1 and access.dropped == 2


def test_the_log_is_told_when_a_line_reaches_an_empty_queue_and_only_then() -> None:
    ledger, _, access, _, _ = _ledger()
    for n in range(3):
        ledger.ended(Req(ledger.arrived("alice", "10.0.0.1")), End.DONE, "http://b")
        assert access.armed == 1 and len(access.lines) == n + 1
    access.pending.clear()  # formatted
    ledger.ended(Req(ledger.arrived("alice", "10.0.0.1")), End.DONE, "http://b")
    assert access.armed == 2


def test_request_ids_are_the_prefix_and_the_counter_in_twelve_hex_digits() -> None:
    ledger, *_ = _ledger()
    for start in (0, 250, 0xFFFFFFFFFFF0):
        ledger.id_counter = start
        ledger.id_head = b""
        for k in range(1, 40):
            n = (start + k) & 0xFFFFFFFFFFFF
            assert ledger.request_id() == b"%s%012x" % (ledger.id_prefix, n), (start, k)


_ROW = st.tuples(st.sampled_from(["ann", "bob"]), st.sampled_from(["m1", "m2"]),
                 st.sampled_from(["", "k1"]), st.sampled_from(["b1", "b2"]),
                 st.integers(0, 5), st.integers(0, 5), st.booleans(),
                 # a step: 0 the same hour, 1 a later hour, 2 a later day
                 st.sampled_from([0, 0, 0, 1, 2]), st.booleans())


@given(st.lists(_ROW, max_size=40))
@settings(max_examples=300, deadline=None)
def test_the_tally_sums_every_row_under_its_own_key_across_takes_and_hours(
        steps: list[tuple[str, str, str, str, int, int, bool, int, bool]]) -> None:
    # The tally remembers the sums its last row went to (state/tally.py); whatever
    # the order of users, keys, models and backends, hour and day changes and takes
    # in between, every row is summed under its own key, exactly as a plain count would.
    tally = UsageTally()
    now = 1_700_000_000.0
    want_hours: dict[tuple[str, ...], list[int]] = {}
    want_days: dict[tuple[str, ...], list[int]] = {}
    got_hours: dict[tuple[str, ...], list[int]] = {}
    got_days: dict[tuple[str, ...], list[int]] = {}

    def take() -> None:
        days, hours = tally.take()
        for k, h in hours.items():
            got = got_hours.setdefault(k, [0, 0, 0, 0])
            for i, v in enumerate((h.requests, h.errors, h.prompt, h.completion)):
                got[i] += v
        for k, d in days.items():
            got = got_days.setdefault(k, [0, 0, 0])
            for i, v in enumerate((d.requests, d.prompt, d.completion)):
                got[i] += v

    for user, model, key, backend, prompt, completion, error, step, taken in steps:
        now += (0.0, 3600.0, 86400.0)[step] + 1.0
        tally.add_usage(user, model, prompt, completion, key, backend, error, now=now)
        hour = time.strftime("%Y-%m-%dT%H", time.gmtime(now))
        day = time.strftime("%Y-%m-%d", time.gmtime(now))
        h = want_hours.setdefault((hour, user, key, model, backend), [0, 0, 0, 0])
        for i, v in enumerate((1, int(error), prompt, completion)):
            h[i] += v
        d = want_days.setdefault((user, model, day), [0, 0, 0])
        for i, v in enumerate((1, prompt, completion)):
            d[i] += v
        if taken:
            take()
    take()
    assert got_hours == want_hours
    assert got_days == want_days
