#!/usr/bin/env python3
"""The floor for a Python proxy on this machine: uvloop + httptools and nothing else.

A yardstick for `bench/compare_wrk.sh`, not a product: one backend, keep-alive
upstream connections, the request head re-sent with its headers, the response
bytes passed through as they come. No routing, model sniff, queue, policy,
accounting or error handling -- everything the gateway adds is what separates
its figures from these.

    python bench/floor_proxy.py LISTEN_PORT BACKEND_PORT
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop

BACKEND = ("127.0.0.1", 0)
idle: list[Upstream] = []


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the backend."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.client: Downstream | None = None
        self.transport: asyncio.Transport | None = None
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is not None and client.transport is not None and not client.transport.is_closing():
            client.transport.write(data)
        self.parser.feed_data(data)
        if self.done:
            self.done = False
            self.client = None
            idle.append(self)

    def on_message_complete(self) -> None:
        self.done = True


class Downstream(asyncio.Protocol):
    """One client connection."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        head = [self.parser.get_method(), b" ", self.url, b" HTTP/1.1\r\nHost: backend\r\n"]
        for name, value in self.headers:
            if name.lower() not in (b"host", b"connection"):
                head.append(name + b": " + value + b"\r\n")
        head.append(b"\r\n")
        head.extend(self.body)
        request = b"".join(head)
        if idle:
            upstream = idle.pop()
            upstream.client = self
            assert upstream.transport is not None
            upstream.transport.write(request)
        else:
            asyncio.get_running_loop().create_task(self._connect(request))

    async def _connect(self, request: bytes) -> None:
        _, upstream = await asyncio.get_running_loop().create_connection(Upstream, *BACKEND)
        upstream.client = self
        assert upstream.transport is not None
        upstream.transport.write(request)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(Downstream, "127.0.0.1", port, backlog=4096)
    await asyncio.Event().wait()


def main() -> None:
    global BACKEND
    BACKEND = ("127.0.0.1", int(sys.argv[2]))
    uvloop.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
