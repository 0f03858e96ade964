"""A backend that breaks HTTP/1.1 framing must never desynchronise a client connection.

The gateway relays a backend's answer raw. Bytes a backend sends past the end
of its answer (a second, unsolicited response; the start of one; a body after
the head of a HEAD answer) are not part of the answer: relayed, the client
reads them as the answer to its *next* request (response splitting), and a
cached copy hands them to other users. Each probe sends the request with a
second one pipelined behind it (`GET /api/version`) and checks that:

- the bytes the client gets parse strictly as one answer per request, and
  none of them is the backend's extra response;
- the first answer is the backend's (200) or a clean 502 in Ollama's shape
  (an answer whose head was already relayed may end in a cut connection,
  which every client reports as an error);
- the connection the backend misbehaved on is not used again, the process is
  alive and another user is served.

Gateway: auth off, `--timeout 3`, one slot; a second one with `--cache all`;
a third with `--max-in-flight-per-user 1`, for answers cut after their head:
the request must still end (its user's in-flight count given back, counted).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from gatewayproc import GatewayProc
from rawbackend import CHAT_OK, RawBackend, Script, answer, chunked
from wire import exchange, request, wait_until

SMUGGLED = b'{"smuggled":true}'
CHAT = json.dumps({"model": "fake", "stream": False, "temperature": 0,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()
HEAD_OF_OK = answer(CHAT_OK)[: answer(CHAT_OK).index(b"\r\n\r\n") + 4]
BLOB = "/api/blobs/sha256:" + "ab" * 32
# The request pipelined behind each probe. It closes the connection once
# answered, so that a probe reads everything the gateway ever writes on it up
# to that close, instead of waiting out its read timeout on a kept-alive
# connection (3-5 s a probe).
LAST = request("GET", "/api/version?after", None, [("Connection", "close")])
# A chunked stream with more than 1 KiB of body after its head.
STREAM = chunked([b'{"model":"fake:latest","message":{"content":"%04d"},"done":false}\n' % i
                  for i in range(20)] + [CHAT_OK + b"\n"])

SCRIPTS = {
    # A whole second response in the read that ends the first.
    "second-response": Script([answer(CHAT_OK) + answer(SMUGGLED)]),
    "second-after-chunked": Script([chunked([CHAT_OK + b"\n"]) + answer(SMUGGLED)]),
    # The head first, then the body and a second response in a later read.
    "second-after-body": Script([HEAD_OF_OK, 0.05, CHAT_OK + answer(SMUGGLED)]),
    # Only the start of a second response: it would prefix the client's next answer.
    "partial-second": Script([answer(CHAT_OK) + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-J: "]),
    # A body after the head of a HEAD answer (a HEAD answer has none).
    "head-with-body": Script([answer(b"HTTP/1.1 200 OK\r\n")]),
    # An upgrade nobody asked for.
    "switching": Script([(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n"
                          b"Connection: Upgrade\r\n\r\nRAW")], close=True),
    "plain": Script([answer(CHAT_OK)]),
    # Answers cut after their head was relayed, where no clean error frame fits.
    "cut-length": Script([HEAD_OF_OK, 0.05, b'{"mod'], close=True),
    "cut-mid-line": Script([(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n"), 0.05, b'5\r\n{"mod\r\n'],
                           close=True),
    "silent-after-head": Script([HEAD_OF_OK, 0.05, b'{"mod', 6.0]),
    # An interim (1xx) answer with a body, which llhttp reads as a body (all
    # but 100, 102 and 103 may have one): the second response inside it.
    "interim-length-body": Script([b"HTTP/1.1 150 X\r\nContent-Length: %d\r\n\r\n"
                                   % len(answer(SMUGGLED)) + answer(SMUGGLED) + STREAM]),
    "interim-chunked-body": Script([b"HTTP/1.1 199 X\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    + b"%x\r\n%s\r\n0\r\n\r\n" % (len(answer(SMUGGLED)),
                                                                answer(SMUGGLED)) + STREAM]),
    # Stray CRLFs after a whole answer (llhttp skips them between messages, so
    # they raise no parse error): in the read that ends the answer, after a
    # body that itself ends in LF, after a trailer, in a read of their own
    # that also holds the end of the last chunk, after a later body read, after
    # a body the chunk scanner reads, and after a 204.
    "crlf-after-length": Script([answer(CHAT_OK) + b"\r\n"]),
    "crlf-after-length-lf": Script([answer(CHAT_OK + b"\n") + b"\r\n\r\n"]),
    "crlf-after-chunked": Script([chunked([CHAT_OK + b"\n"]) + b"\r\n"]),
    "crlf-after-trailer": Script([chunked([CHAT_OK + b"\n"])[:-2] + b"X-T: v\r\n\r\n\r\n"]),
    "crlf-split-chunked": Script([chunked([CHAT_OK + b"\n"])[:-1], 0.05, b"\n\r\n"]),
    "crlf-after-later-body": Script([HEAD_OF_OK, 0.05, CHAT_OK + b"\r\n"]),
    "crlf-after-scanned": Script([STREAM + b"\r\n"]),
    "crlf-after-204": Script([b"HTTP/1.1 204 No Content\r\n\r\n\r\n"]),
}
CRLF_MODES = [m for m in SCRIPTS if m.startswith("crlf-")]
# Transfer-Encoding values llhttp does not read as chunked (it reads the body to
# the close), with a second answer after the chunked body's end: in the same
# read as the head and 1 KiB of body (the compiled build's chunk scanner), or
# after a head that came alone (llhttp follows the body).
for _te in ("chunked\t", "xchunked", "gzip;q=chunked"):
    _head, _body = STREAM.replace(b"Transfer-Encoding: chunked",
                                  b"Transfer-Encoding: " + _te.encode()).split(b"\r\n\r\n", 1)
    SCRIPTS[f"te-{_te!r}-scanned"] = Script([_head + b"\r\n\r\n" + _body, 0.05, answer(SMUGGLED)])
    SCRIPTS[f"te-{_te!r}-parsed"] = Script([_head + b"\r\n\r\n", 0.05, _body, 0.05,
                                            answer(SMUGGLED)])
TE_MODES = [m for m in SCRIPTS if m.startswith("te-")]


@pytest.fixture(scope="module")
def raw() -> Iterator[RawBackend]:
    fake = RawBackend(SCRIPTS)
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def gw(raw: RawBackend) -> Iterator[GatewayProc]:
    proc = GatewayProc([raw.url], "--timeout", "3", "--slots", "1", "--cache", "off")
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def cache_gw(raw: RawBackend) -> Iterator[GatewayProc]:
    proc = GatewayProc([raw.url], "--timeout", "3", "--slots", "1", "--cache", "all")
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def limited_gw(raw: RawBackend) -> Iterator[GatewayProc]:
    proc = GatewayProc([raw.url], "--timeout", "1", "--slots", "1", "--cache", "off",
                       "--max-in-flight-per-user", "1", admin=True)
    yield proc
    proc.close()


def _served(gw: GatewayProc, raw: RawBackend, user: str) -> bool:
    """Another user's request is answered 200 by the backend, on a connection of its own."""
    before = {g.conn for g in raw.inference()}
    responses, _, _ = exchange(gw.port, request("POST", "/api/chat", CHAT,
                                                [("X-User-ID", user), ("X-Mode", "plain")]),
                               expect=1)
    got = raw.inference("plain")
    return (bool(responses) and responses[0].status == 200
            and responses[0].body == CHAT_OK and bool(got) and got[-1].conn not in before)


@pytest.mark.parametrize("mode", CRLF_MODES)
def test_stray_crlf_after_an_answer_is_not_relayed(gw: GatewayProc, mode: str) -> None:
    # Relayed, the CRLF would start the client's next answer: Python's
    # http.client reads it as a bad status line, a strict parser as garbage.
    data = (request("POST", "/api/chat", CHAT, [("X-Mode", mode)])
            + LAST)
    responses, rest, _ = exchange(gw.port, data, timeout=3, expect=2)
    assert [r.status for r in responses] == [204 if mode.endswith("204") else 200, 200], (
        responses, rest)
    assert rest == b"", f"{mode}: bytes past the answers: {rest[:80]!r}"
    first = responses[0]
    if mode.endswith("204"):
        assert first.body == b""
    else:
        assert first.body.endswith(CHAT_OK + b"\n" if mode != "crlf-after-length" and
                                   mode != "crlf-after-later-body" else CHAT_OK), first.body[-80:]


@pytest.mark.parametrize("mode", ["second-response", "second-after-chunked", "second-after-body",
                                  "partial-second", "interim-length-body",
                                  "interim-chunked-body"])
def test_bytes_after_the_answer_never_reach_the_client(gw: GatewayProc, raw: RawBackend,
                                                       mode: str) -> None:
    data = (request("POST", "/api/chat", CHAT, [("X-Mode", mode)])
            + LAST)
    responses, rest, closed = exchange(gw.port, data, timeout=3)
    statuses = [r.status for r in responses]
    assert all(SMUGGLED not in r.body for r in responses), f"{mode}: the extra answer was relayed"
    assert len(responses) <= 2 and SMUGGLED not in rest, (statuses, rest)
    if rest:  # an answer whose head was relayed, cut: the client sees the connection close
        assert closed and not responses and rest.count(b"HTTP/1.1") == 1, (statuses, rest)
    if responses:
        first = responses[0]
        assert first.status in (200, 502), statuses
        if first.status == 200:
            assert first.body.rstrip(b"\n").endswith(CHAT_OK) or first.body == CHAT_OK
        else:
            assert "error" in first.json()
    if len(responses) == 2:
        assert responses[1].status == 200 and responses[1].json() == {"version": "0.12.0"}
    assert gw.alive(), gw.stderr()[-3000:]
    assert _served(gw, raw, f"next-{mode}")


def test_a_head_answer_with_a_body_does_not_prefix_the_next_answer(
        gw: GatewayProc, raw: RawBackend) -> None:
    data = request("HEAD", BLOB, None, [("X-Mode", "head-with-body")]) + LAST
    responses, rest, _ = exchange(gw.port, data, timeout=3, head_requests=[True, False])
    assert b"HTTP/1.1" not in rest and len(responses) <= 2, ([r.status for r in responses], rest)
    assert responses and responses[0].status in (200, 502)
    if len(responses) == 2:
        assert responses[1].status == 200 and responses[1].json() == {"version": "0.12.0"}
    assert _served(gw, raw, "next-head")


def test_an_upgrade_nobody_asked_for_is_a_clean_502(gw: GatewayProc, raw: RawBackend) -> None:
    responses, _, _ = exchange(gw.port, request("POST", "/api/chat", CHAT,
                                                [("X-Mode", "switching")]), expect=1)
    assert responses and responses[0].status == 502
    assert "101" in responses[0].json()["error"]
    assert "Fatal error on transport" not in gw.stderr()
    assert _served(gw, raw, "next-switching")


def test_a_cached_answer_never_carries_the_backends_extra_bytes(
        cache_gw: GatewayProc, raw: RawBackend) -> None:
    """One user's answer with a second response behind it; another user asks the same."""
    exchange(cache_gw.port, request("POST", "/api/chat", CHAT,
                                    [("X-Mode", "second-response"), ("X-User-ID", "mallory"),
                                     ("Connection", "close")]),
             timeout=2)
    data = (request("POST", "/api/chat", CHAT, [("X-User-ID", "victim"), ("X-Mode", "plain")])
            + LAST)
    responses, rest, _ = exchange(cache_gw.port, data, timeout=3)  # parses strictly
    assert [r.status for r in responses] == [200, 200] and not rest
    assert responses[0].body == CHAT_OK
    assert responses[1].json() == {"version": "0.12.0"}


@pytest.mark.parametrize("mode", ["cut-length", "cut-mid-line", "silent-after-head"])
def test_an_answer_cut_after_its_head_still_ends_the_request(
        limited_gw: GatewayProc, raw: RawBackend, mode: str) -> None:
    user = f"cut-{mode}"
    responses, rest, closed = exchange(
        limited_gw.port, request("POST", "/api/chat", CHAT, [("X-Mode", mode), ("X-User-ID", user)]),
        timeout=5)
    assert not responses and rest.startswith(b"HTTP/1.1 200") and closed, "a cut answer"

    def ended() -> bool:
        users = limited_gw.admin("GET", "/api/users").json()["users"]
        return any(u["user"] == user and u["in_flight"] == 0 for u in users)

    assert wait_until(ended, 3), f"{user} still has a request in flight"
    # With at most one request in flight, the user can ask again.
    responses, _, _ = exchange(limited_gw.port, request(
        "POST", "/api/chat", CHAT, [("X-Mode", "plain"), ("X-User-ID", user)]), expect=1)
    assert responses and responses[0].status == 200, responses and responses[0].body


@pytest.mark.parametrize("mode", TE_MODES)
def test_a_transfer_encoding_llhttp_reads_to_the_close_is_relayed_to_the_close(
        gw: GatewayProc, raw: RawBackend, mode: str) -> None:
    """The gateway reads the Transfer-Encoding as its parser does: not chunked, so the
    body would end at the close. Read as chunked, the backend's second answer
    reached the client as the answer to its next request, or the compiled build's
    scanner ended the body, the exchange waited for an end llhttp never saw, and a
    second last chunk followed it. Such an answer is refused (502, as nginx does):
    relayed to the close, a lenient client could still read it as chunked."""
    data = (request("POST", "/api/chat", CHAT, [("X-Mode", mode)])
            + LAST)
    responses, _, _ = exchange(gw.port, data, timeout=5)
    assert responses, mode
    assert responses[0].status == 502, [r.status for r in responses]
    assert b"Transfer-Encoding" in responses[0].body, responses[0].body
    assert len(responses) <= 2 and all(SMUGGLED not in r.body for r in responses)
    assert gw.alive(), gw.stderr()[-3000:]
    assert _served(gw, raw, f"next-{mode}")
