#!/usr/bin/env python3
"""A backend that answers every generation with the same pre-built NDJSON stream.

A yardstick for the stream measurement of `bench/targets.py`, not a product.
The simulator renders each of a stream's lines in Python, about a microsecond
a line; at 100-line streams it is the slowest process in the chain, and every
proxy in front of it then relays exactly the simulator's rate (direct ≈ nginx ≈
floor ≈ gateway). This source builds one Ollama-shaped `/api/generate` stream
at start (one chunk per line, as Ollama sends it) and writes it whole for every
POST, so the measurement shows what each proxy costs to relay a stream.

It answers what a gateway's health checks and model discovery ask for
(`/api/version`, `/api/tags`, `/api/ps`) and nothing else.

    python bench/stream_source.py PORT [LINES]
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop

MODEL = "llama3.2:latest"
STAMP = "2026-01-01T00:00:00.000000000Z"


def chunked(payload: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(payload), payload)


def stream_response(lines: int) -> bytes:
    """The whole HTTP response: head, one chunk per NDJSON line, the last chunk."""
    words = (b" the", b" quick", b" brown", b" fox", b" jumps", b" over", b" a", b" dog")
    body = []
    for i in range(lines - 1):
        body.append(chunked(b'{"model":"%b","created_at":"%b","response":"%b","done":false}\n'
                            % (MODEL.encode(), STAMP.encode(), words[i % len(words)])))
    body.append(chunked(
        b'{"model":"%b","created_at":"%b","response":"","done":true,"done_reason":"stop",'
        b'"context":[1,2,3],"total_duration":1000,"load_duration":10,"prompt_eval_count":1,'
        b'"prompt_eval_duration":10,"eval_count":%d,"eval_duration":900}\n'
        % (MODEL.encode(), STAMP.encode(), lines - 1)))
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
            b"Date: Thu, 01 Jan 2026 00:00:00 GMT\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"".join(body) + b"0\r\n\r\n")


def json_response(status: bytes, body: bytes) -> bytes:
    return (b"HTTP/1.1 %b\r\nContent-Type: application/json; charset=utf-8\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (status, len(body), body))


TAGS = (b'{"models":[{"name":"%b","model":"%b","modified_at":"%b","size":2019393189,'
        b'"digest":"a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",'
        b'"details":{"format":"gguf","family":"llama","parameter_size":"3.2B",'
        b'"quantization_level":"Q4_K_M"}}]}' % (MODEL.encode(), MODEL.encode(), STAMP.encode()))
GETS = {
    b"/api/version": json_response(b"200 OK", b'{"version":"0.5.7"}'),
    b"/api/tags": json_response(b"200 OK", TAGS),
    b"/api/ps": json_response(b"200 OK", b'{"models":[]}'),
    b"/": json_response(b"200 OK", b'"Ollama is running"'),
}
NOT_FOUND = json_response(b"404 Not Found", b'{"error":"not found"}')


class Source(asyncio.Protocol):
    """One connection: every POST gets the canned stream, a known GET its fixed answer."""

    answer = b""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        if self.transport is None:
            return
        if self.parser.get_method() == b"POST":
            self.transport.write(Source.answer)
        else:
            self.transport.write(GETS.get(self.url.split(b"?", 1)[0], NOT_FOUND))


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(Source, "127.0.0.1", port, backlog=4096)
    await asyncio.Event().wait()


def main() -> None:
    lines = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    Source.answer = stream_response(lines)
    uvloop.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
