"""framing.ResponseHeaders: a backend response's headers sorted as the parser hands them over."""

from __future__ import annotations

from ollamamq_fast.wire import framing
from ollamamq_fast.wire.framing import Framing, ResponseHeaders


def _read(*pairs: tuple[bytes, bytes]) -> ResponseHeaders:
    headers = ResponseHeaders()
    for name, value in pairs:
        headers.add(name, value)
    return headers


def test_the_framing_is_known_from_the_headers_as_they_came() -> None:
    chunked = _read((b"Content-Type", b"application/x-ndjson"), (b"Transfer-Encoding", b"chunked"))
    assert chunked.framing(200, False) is Framing.CHUNKED
    assert chunked.content_type == b"application/x-ndjson" and not chunked.hop_by_hop
    assert _read((b"content-length", b"2")).framing(200, False) is Framing.LENGTH
    assert _read((b"Date", b"x")).framing(200, False) is Framing.CLOSE
    for status in (101, 204, 304):
        assert _read((b"Content-Length", b"2")).framing(status, False) is Framing.EMPTY
    assert _read((b"Content-Length", b"2")).framing(200, True) is Framing.EMPTY


def test_the_last_transfer_encoding_decides_as_llhttp_reads_it() -> None:
    te = _read((b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"gzip"))
    assert te.framing(200, False) is Framing.CLOSE and te.transfer_encoding
    assert te.declares_body()
    assert _read((b"Transfer-Encoding", b"gzip, Chunked")).framing(200, False) is Framing.CHUNKED
    assert not _read((b"Content-Type", b"text/plain")).declares_body()


def test_a_hop_by_hop_header_is_noticed_in_any_spelling() -> None:
    assert _read((b"CONNECTION", b"close")).hop_by_hop
    assert _read((b"X-Request-Id", b"abc")).hop_by_hop
    assert not _read((b"X-Other", b"1")).hop_by_hop


def test_pairs_come_back_in_order_and_reset_empties_everything() -> None:
    headers = _read((b"Content-Type", b"a"), (b"X-One", b"1"), (b"Transfer-Encoding", b"chunked"),
                    (b"Connection", b"close"))
    pairs = headers.pairs()
    assert pairs == [(b"Content-Type", b"a"), (b"X-One", b"1"),
                     (b"Transfer-Encoding", b"chunked"), (b"Connection", b"close")]
    headers.reset()
    assert headers.pairs() == [] and pairs[1] == (b"X-One", b"1")  # the list given out stays
    assert headers.content_type == b"" and not headers.hop_by_hop
    assert headers.framing(200, False) is Framing.CLOSE and not headers.declares_body()


def test_response_framing_reads_a_list_the_same_way() -> None:
    assert framing.response_framing(200, [(b"Content-Type", b"t"), (b"Connection", b"x"),
                                          (b"Content-Length", b"1")], False) == (
        Framing.LENGTH, b"t", True)
