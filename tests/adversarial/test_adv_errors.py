"""The gateway's own refusals come in the API's own format, whenever they happen.

A request refused while its head is still being read (conflicting framing
headers, a head over 64 KiB, a control byte in a header, a head that never
ends) has already named its path: on `/v1/*` the answer is the OpenAI error
envelope (`{"error": {"message", "type", ...}}`) that OpenAI clients parse,
on `/api/*` Ollama's `{"error": "..."}`, each with the right status, and the
connection closes. Refusals after the head (a bad chunk, a 413) are checked
alongside as the control case.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fakebackend import FakeBackend
from gatewayproc import GatewayProc
from wire import exchange


@pytest.fixture(scope="module")
def gw(backend: FakeBackend) -> Iterator[GatewayProc]:
    proc = GatewayProc([backend.url], "--max-body-mb", "1", "--cache", "off")
    yield proc
    proc.close()


BAD_HEADS = {
    "conflicting-lengths": (b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello", 400),
    "length-and-chunked": (b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                           400),
    "nul-in-value": (b"X-A: a\x00b\r\nContent-Length: 2\r\n\r\n{}", 400),
    "space-before-colon": (b"X-A : b\r\nContent-Length: 2\r\n\r\n{}", 400),
    "head-too-large": (b"X-Pad: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    "bad-chunk-size": (b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", 400),
    "body-too-large": (b"Content-Length: 2000000\r\n\r\n{", 413),
}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
@pytest.mark.parametrize("case", list(BAD_HEADS))
def test_refusals_while_reading_come_in_the_routes_format(gw: GatewayProc, path: str,
                                                          case: str) -> None:
    rest_of_head, status = BAD_HEADS[case]
    data = f"POST {path} HTTP/1.1\r\nHost: gw\r\n".encode() + rest_of_head
    responses, _, closed = exchange(gw.port, data, timeout=5)
    assert len(responses) == 1 and responses[0].status == status, [r.status for r in responses]
    assert closed, "the connection is closed after the refusal"
    error = responses[0].json()["error"]
    if path.startswith("/v1/"):
        assert isinstance(error, dict) and error["message"] and error["type"], error
    else:
        assert isinstance(error, str) and error, error
