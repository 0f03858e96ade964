"""wire/headers.py: request head rules as pure functions, bytes in, bytes out."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ollamamq_fast.policy.cache import NO_STORE, cache_control
from ollamamq_fast.wire.headers import (
    DROP,
    KEEP,
    LENGTH,
    KeptLines,
    RequestHead,
    classify,
    forwarded_block,
    kept_lines,
    length_line,
    read_request_head,
)

HEADERS = [
    (b"Host", b"gw.example"), (b"Content-Length", b"12"), (b"X-User-ID", b" alice "),
    (b"Authorization", b"Bearer k"), (b"X-API-Key", b"k2"), (b"Cache-Control", b"no-cache"),
    (b"Connection", b"keep-alive, X-Hop"), (b"X-Hop", b"1"), (b"Keep-Alive", b"timeout=5"),
    (b"TE", b"trailers"), (b"Upgrade", b"h2c"), (b"Proxy-Authorization", b"Basic x"),
    (b"X-Forwarded-For", b"10.1.2.3"), (b"User-Agent", b"ua"), (b"Expect", b"100-continue"),
]


def test_every_spelling_classifies_alike() -> None:
    for name in (b"content-length", b"Content-Length", b"CONTENT-LENGTH", b"cOnTeNt-LeNgTh"):
        assert classify(name) == LENGTH
    assert classify(b"Proxy-Connection") == DROP and classify(b"X-Anything") == KEEP


def test_auth_off_forwards_identity_and_credentials() -> None:
    head = read_request_head(HEADERS, http_11=True, owns_credentials=False)
    assert head.content_length == 12 and head.expect_continue and not head.chunked
    assert head.user == b" alice " and head.authorization == b"Bearer k" and head.api_key == b"k2"
    assert head.cache_control == b"no-cache" and head.forwarded_for == b"10.1.2.3"
    names = [n.lower() for n, _ in head.kept]
    assert names == [b"x-user-id", b"authorization", b"x-api-key", b"cache-control", b"user-agent"]


def test_auth_keys_forwards_neither_keys_nor_the_claimed_identity() -> None:
    head = read_request_head(HEADERS, http_11=True, owns_credentials=True)
    names = [n.lower() for n, _ in head.kept]
    assert names == [b"cache-control", b"user-agent"]
    block = forwarded_block(kept_lines(head.kept), "alice", head.forwarded_for, b"127.0.0.1")
    assert block == (b"Cache-Control: no-cache\r\nUser-Agent: ua\r\nX-User-ID: alice\r\n"
                     b"X-Forwarded-For: 10.1.2.3, 127.0.0.1\r\n")


@pytest.mark.parametrize("user", ["", "bad\nname", "caf\u00e9", " lead", "x" * 300])
def test_a_name_that_cannot_be_a_header_value_is_left_out(user: str) -> None:
    assert b"X-User-ID" not in forwarded_block(b"", user, b"", b"1.2.3.4")


def test_expect_only_counts_on_http_11_and_bad_lengths_raise() -> None:
    assert not read_request_head([(b"Expect", b"100-continue")], False, False).expect_continue
    assert read_request_head([(b"Transfer-Encoding", b"gzip, Chunked")], True, False).chunked
    assert read_request_head([(b"Content-Encoding", b"zstd")], True, False).encoded_body
    assert not read_request_head([(b"Content-Encoding", b"identity")], True, False).encoded_body


@pytest.mark.parametrize(("lines", "encoded"), [
    ([b"zstd"], True), ([b" zstd "], True),
    # What no backend decodes is read as it came (Ollama's Header.Get == "zstd").
    ([b"gzip"], False), ([b"ZSTD"], False), ([b"zstd, gzip"], False), ([b"br"], False),
    ([b"identity", b"zstd"], False),  # the first line is the one read
    ([b"zstd", b"gzip"], True),
])
def test_only_a_first_content_encoding_of_zstd_is_a_compressed_body(
        lines: list[bytes], encoded: bool) -> None:
    head = read_request_head([(b"Content-Encoding", v) for v in lines], True, False)
    assert head.encoded_body is encoded
    assert [v for n, v in head.kept if n == b"Content-Encoding"] == lines  # forwarded as sent


def test_bad_content_lengths_raise() -> None:
    for bad in (b"12abc", b"", b" 12", b"+12", b"1_2", b"-1", b"\xd9\xa1"):
        with pytest.raises(ValueError):
            read_request_head([(b"Content-Length", bad)], True, False)
    for good in (b"0", b"7", b"0012", b"123456789012345678", b"99999999999999999999"):
        assert read_request_head([(b"Content-Length", good)], True, False).content_length == int(good)
    # Blanks after the value are the field's own (RFC 9110 §5.5): the parser keeps them.
    for good in (b"12 ", b"12\t", b"0012 \t", b"99999999999999999999 "):
        assert read_request_head([(b"Content-Length", good)], True, False).content_length == \
            int(good)
    for bad in (b" ", b"\t", b"1 2 ", b"12 x"):
        with pytest.raises(ValueError):
            read_request_head([(b"Content-Length", bad)], True, False)


@pytest.mark.parametrize("owns", [False, True])
@pytest.mark.parametrize("name", [b"X-User-ID", b"Authorization", b"X-API-Key", b"Host"])
def test_a_header_that_may_come_once_is_named_when_it_comes_twice(name: bytes,
                                                                  owns: bool) -> None:
    head = read_request_head([(name, b"a"), (b"X-Other", b"1"), (name.upper(), b"a")], True, owns)
    assert head.repeated == name.upper()
    assert read_request_head([(name, b""), (name, b"b")], True, owns).repeated == name
    assert read_request_head([(name, b"a"), (b"X-User-Id2", b"b")], True, owns).repeated == b""


def test_other_headers_may_come_twice_and_lists_are_read_whole() -> None:
    pairs = [(b"Accept", b"a"), (b"Accept", b"b"), (b"Cache-Control", b"no-store"),
             (b"Cache-Control", b"max-age=60"), (b"X-Forwarded-For", b"1.1.1.1"),
             (b"X-Forwarded-For", b"2.2.2.2, 3.3.3.3"), (b"Content-Encoding", b"zstd"),
             (b"Content-Encoding", b"identity")]
    head = read_request_head(pairs, True, False)
    assert head.repeated == b""
    assert head.forwarded_for == b"1.1.1.1, 2.2.2.2, 3.3.3.3"
    assert cache_control(head.cache_control) & NO_STORE  # on any line, it holds
    assert head.encoded_body


@pytest.mark.parametrize(("codings", "chunked", "refused"), [
    ([b"chunked"], True, b""),
    ([b"Chunked "], True, b""),
    ([b"gzip, chunked"], True, b"gzip, chunked"),
    ([b"identity"], False, b"identity"),
    ([b"identity", b"chunked"], True, b"identity"),
    ([b"chunked", b"chunked"], True, b"chunked"),
])
def test_only_chunked_alone_is_a_transfer_coding_the_gateway_takes(
        codings: list[bytes], chunked: bool, refused: bytes) -> None:
    head = read_request_head([(b"Transfer-Encoding", c) for c in codings], True, False)
    assert head.chunked is chunked and head.coding == refused


@pytest.mark.parametrize("owns", [False, True])
def test_underscore_spellings_of_identity_headers_never_go_on(owns: bool) -> None:
    pairs = [(b"X_User_ID", b"root"), (b"x_api_key", b"k"), (b"X_FORWARDED_FOR", b"1.2.3.4"),
             (b"X_Other", b"kept")]
    head = read_request_head(pairs, True, owns)
    assert head.kept == [(b"X_Other", b"kept")]
    assert head.user == head.api_key == head.forwarded_for == b""


def test_length_lines() -> None:
    assert length_line(0) == b"Content-Length: 0\r\n\r\n"
    assert length_line(10**7) == b"Content-Length: 10000000\r\n\r\n"


def _spellings(draw: st.DrawFn) -> bytes:
    from ollamamq_fast.wire.framing import _RESPONSE_NAMES
    from ollamamq_fast.wire.headers import _SPECIAL

    names = sorted({*_SPECIAL, *_RESPONSE_NAMES.table})
    token = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_!#$%&'*+.^`|~",
                    min_size=1, max_size=40)
    base = draw(st.one_of(st.sampled_from([n.decode() for n in names]), token))
    flips = draw(st.lists(st.booleans(), min_size=len(base), max_size=len(base)))
    return "".join(c.upper() if f else c for c, f in zip(base, flips, strict=True)).encode()


@given(st.lists(st.composite(_spellings)(), min_size=1, max_size=30))
@settings(max_examples=300, deadline=None)
def test_a_name_kind_is_the_table_s_word_for_its_lowercase_whatever_the_shape(
        names: list[bytes]) -> None:
    from ollamamq_fast.wire.framing import _RESPONSE_NAMES
    from ollamamq_fast.wire.headers import _SPECIAL, KEEP, NameKinds

    fresh = NameKinds(_SPECIAL, KEEP)  # an empty memo: learn and then recall
    for name in names + names:
        assert fresh.kind(name) == _SPECIAL.get(name.lower(), KEEP), name
        assert _RESPONSE_NAMES.kind(name) == _RESPONSE_NAMES.table.get(
            name.lower(), _RESPONSE_NAMES.default), name


def test_a_connections_kept_lines_are_reused_only_for_the_same_headers() -> None:
    memo = KeptLines()
    assert memo.of([]) == b""
    first = [(b"User-Agent", b"ua"), (b"Accept", b"*/*")]
    lines = memo.of(first)
    assert lines == b"User-Agent: ua\r\nAccept: */*\r\n" == kept_lines(first)
    assert memo.of(list(first)) is lines  # the next request's equal list: no new join
    for other in ([(b"User-Agent", b"ua")], [(b"User-Agent", b"ub"), (b"Accept", b"*/*")],
                  [(b"user-agent", b"ua"), (b"Accept", b"*/*")], []):
        assert memo.of(other) == kept_lines(other)
    assert memo.of(first) == kept_lines(first)


@given(st.lists(st.lists(st.tuples(st.sampled_from([b"A", b"B", b"a"]),
                                   st.sampled_from([b"1", b"2", b""])), max_size=3),
                max_size=8))
@settings(max_examples=200, deadline=None)
def test_kept_lines_through_the_memo_are_always_the_requests_own(
        requests: list[list[tuple[bytes, bytes]]]) -> None:
    memo = KeptLines()
    for kept in requests:
        assert memo.of(kept) == kept_lines(kept)


def test_every_connection_line_names_hop_by_hop_headers() -> None:
    # Connection is a list like the others: a header named on any of its lines
    # is hop-by-hop (RFC 9110 §7.6.1) and does not reach the backend.
    head = read_request_head([(b"Connection", b"X-One"), (b"X-One", b"1"), (b"X-Two", b"2"),
                              (b"Connection", b"x-two"), (b"X-Three", b"3")], True, False)
    assert head.kept == [(b"X-Three", b"3")]


def test_a_head_read_header_by_header_refuses_a_bad_length_only_at_its_end() -> None:
    # The parser hands each header to add(), which never raises inside its callback.
    head = RequestHead()
    head.add(b"Content-Length", b"12x")
    head.add(b"Expect", b"100-continue")
    with pytest.raises(ValueError, match="invalid Content-Length"):
        head.finish(True)
    http10 = RequestHead()
    http10.add(b"Expect", b"100-continue")
    http10.finish(False)
    assert not http10.expect_continue


def test_json_content_type_names_the_body_json_for_an_openai_server() -> None:
    from ollamamq_fast.wire.headers import json_content_type

    xff = b"X-Forwarded-For: 127.0.0.1\r\n"
    for ok in (b"Content-Type: application/json\r\n", b"content-type: Application/JSON; charset=utf-8\r\n",
               b"Content-Type: application/vnd.api+json\r\n"):
        lines = b"Accept: */*\r\n" + ok + xff
        assert json_content_type(lines) is lines
    json_line = b"Content-Type: application/json\r\n"
    assert json_content_type(xff) == xff + json_line
    form = b"Content-Type: application/x-www-form-urlencoded\r\nAccept: */*\r\n" + xff
    assert json_content_type(form) == b"Accept: */*\r\n" + xff + json_line
    twice = b"Content-Type: application/json\r\ncontent-type: text/plain\r\n" + xff
    assert json_content_type(twice) == xff + json_line
    # A header whose name only ends in content-type is not one.
    other = b"X-Original-Content-Type: text/plain\r\n" + xff
    assert json_content_type(other) == other + json_line
