"""proxy/chunks.py: the chunked-body scanner agrees with llhttp on where a body ends.

The gateway relays a backend's chunked body as it is and the client parses it
with its own parser: the scanner must end a body exactly where llhttp (which it
replaces in the compiled build) does, and refuse what llhttp refuses.
"""

from __future__ import annotations

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ollamamq_fast.proxy.chunks import ChunkError, ChunkScanner
from ollamamq_fast.wire import framing

HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


class _Ends:
    def __init__(self) -> None:
        self.done = False

    def on_message_complete(self) -> None:
        self.done = True


def llhttp_verdict(body: bytes) -> tuple[str, int]:
    """("end", offset past the body) | ("error", 0) | ("more", 0), fed a byte at a time."""
    ends = _Ends()
    parser = httptools.HttpResponseParser(ends)
    parser.feed_data(HEAD)
    for i in range(len(body)):
        try:
            parser.feed_data(body[i : i + 1])
        except httptools.HttpParserError:
            return "error", 0
        if ends.done:
            return "end", i + 1
    return "more", 0


def scanner_verdict(body: bytes, cuts: list[int]) -> tuple[str, int]:
    """The same, fed in reads cut at `cuts`."""
    scanner = ChunkScanner()
    start = 0
    for cut in [*sorted(set(cuts)), len(body)]:
        if cut < start:
            continue
        try:
            end = scanner.feed(body[start:cut])
        except ChunkError:
            return "error", 0
        if end >= 0:
            assert scanner.done
            return "end", start + end
        start = cut
    return "more", 0


def test_a_stream_ends_after_its_last_chunk_and_not_before() -> None:
    body = b"4\r\nabcd\r\n1A\r\n" + b"x" * 26 + b"\r\n0\r\n\r\n"
    scanner = ChunkScanner()
    assert scanner.feed(body[:-1]) == -1
    assert not scanner.done
    assert scanner.feed(body[-1:]) == 1
    assert scanner.done


def test_the_offset_is_past_the_end_within_the_read_and_from_the_start_given() -> None:
    read = b"HEAD-BYTES" + b"3\r\nabc\r\n0\r\n\r\n" + b"HTTP/1.1 200 OK\r\n"
    assert ChunkScanner().feed(read, 10) == 10 + len(b"3\r\nabc\r\n0\r\n\r\n")


def test_a_chunk_split_across_reads_anywhere() -> None:
    body = b"a;name=\"v\"\r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\n"
    for cut in range(len(body) + 1):
        assert scanner_verdict(body, [cut]) == ("end", len(body)), cut


@pytest.mark.parametrize("body", [
    b"g\r\n",  # not hex
    b"\r\n",  # no size
    b"4\nabcd\r\n0\r\n\r\n",  # bare LF after the size
    b"4\r\nabcde\r\n0\r\n\r\n",  # data longer than the size
    b"4\r\nabcd\n0\r\n\r\n",  # bare LF after the data
    b"4 ;a\r\nabcd\r\n",  # space before an extension
    b"4;a b\r\nabcd\r\n",  # space in an extension
    b"4;a\x01\r\nabcd\r\n",  # control byte in an extension
    b"0\r\nX T: v\r\n\r\n",  # trailer name with a space
    b"0\r\n: v\r\n\r\n",  # trailer without a name
    b"0\r\nX-T: \x00\r\n\r\n",  # control byte in a trailer
    b"0\r\n\r\r\n",  # the blank line's CR not followed by LF
    b"10000000000000000\r\n",  # a size past 64 bits
    b"0\r\nContent-Length: 0\r\n\r\n",  # llhttp takes no Content-Length trailer
    b"3\r\nabc\r\n0\r\nX: 1\r\ncontent-LENGTH:5\r\n\r\n",
])
def test_framing_llhttp_refuses_is_refused(body: bytes) -> None:
    assert llhttp_verdict(body)[0] == "error"
    with pytest.raises(ChunkError):
        ChunkScanner().feed(body)


def test_a_size_past_60_bits_is_refused_though_llhttp_would_wait_for_it() -> None:
    # No backend sends an exabyte chunk; the bound keeps sizes small integers.
    with pytest.raises(ChunkError, match="too large"):
        ChunkScanner().feed(b"1000000000000000\r\n")


@pytest.mark.parametrize("body", [
    b"4;a=b;c;d=\"q \\\" s\"\r\nabcd\r\n0\r\n\r\n",
    b"0;=v\r\n\r\n",
    b"0\r\nA: 1\r\nB:\r\nC: \xff obs-text\r\n\r\n",
    b"00000004\r\nabcd\r\n000\r\n\r\n",
])
def test_framing_llhttp_takes_is_taken(body: bytes) -> None:
    assert llhttp_verdict(body) == ("end", len(body))
    assert scanner_verdict(body, []) == ("end", len(body))


_PIECES = [b"0", b"1", b"5", b"a", b"F", b"g", b";", b"=", b"\"", b"\\", b":", b" ", b"\t",
           b"\r", b"\n", b"\r\n", b"x", b"\x00", b"\x7f", b"\xff", b"HTTP/1.1 200 OK\r\n"]


@st.composite
def chunked_bodies(draw: st.DrawFn) -> bytes:
    """Mostly well-formed chunked bodies, some with a few bytes changed."""
    out = bytearray()
    for _ in range(draw(st.integers(0, 3))):
        data = draw(st.binary(min_size=1, max_size=40))
        size = draw(st.sampled_from(["x", "X", "04x"]))
        ext = draw(st.sampled_from([b"", b";a=b", b";x", b";a=\"q s\"", b";=v", b";a=", b";;a"]))
        out += format(len(data), size).encode() + ext + b"\r\n" + data + b"\r\n"
    out += draw(st.sampled_from([b"0", b"000", b"0;e"])) + b"\r\n"
    for _ in range(draw(st.integers(0, 2))):
        out += draw(st.sampled_from([b"X-T: v\r\n", b"X-T:v\r\n", b"X-T:\r\n", b"X-T: a\tb\r\n",
                                     b"Content-Length: 1\r\n", b"content-lengt: 1\r\n",
                                     b"Content-Lengths: 1\r\n"]))
    out += b"\r\n"
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(out)))
        piece = draw(st.sampled_from(_PIECES))
        if draw(st.booleans()):
            out[at:at] = piece
        else:
            out[at : at + 1] = piece
    out += draw(st.sampled_from([b"", b"\r\n", b"HTTP/1.1 200 OK\r\n"]))
    return bytes(out)


@settings(max_examples=400, deadline=None)
@given(body=chunked_bodies(), cuts=st.lists(st.integers(0, 400), max_size=4))
def test_the_scanner_agrees_with_llhttp_however_the_body_is_cut(body: bytes, cuts: list[int]) -> None:
    cuts = [c for c in cuts if c <= len(body)]
    assert scanner_verdict(body, cuts) == llhttp_verdict(body)


class _Head:
    """Parser callbacks: the headers as the gateway gets them, and whether the message ended."""

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_message_complete(self) -> None:
        self.done = True


_TE_PIECES = [b"chunked", b"CHUNKED", b"Chunked", b"gzip", b"x", b",", b", ", b" ", b"\t", b";q=1",
              b"identity", b"chunkedx"]


@settings(max_examples=600, deadline=None)
@given(values=st.lists(st.lists(st.sampled_from(_TE_PIECES), min_size=1, max_size=5)
                       .map(b"".join), min_size=1, max_size=3))
def test_the_gateway_reads_transfer_encoding_as_llhttp_does(values: list[bytes]) -> None:
    """framing.response_framing says chunked exactly when llhttp reads a chunked body.

    Else the gateway and its parser disagree on where the body ends: the
    scanner ended a body llhttp still read (the exchange hung, and its end
    wrote a second last chunk to the client), and llhttp relayed a backend's
    next answer as the body of one the gateway called chunked.
    """
    got = _Head()
    parser = httptools.HttpResponseParser(got)
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"Transfer-Encoding: " + v + b"\r\n" for v in values)
    try:
        parser.feed_data(head + b"\r\n0\r\n\r\n")
    except httptools.HttpParserError:
        return  # a head llhttp refuses is never relayed
    chunked = framing.response_framing(200, got.headers, False)[0] is framing.Framing.CHUNKED
    assert chunked == got.done, (values, got.headers)
