"""A backend whose faults a test programs: per request, a coroutine decides what happens.

Probes and model lists are answered like Ollama (one model, `fake:latest`).
Every other request is handed to the handler registered under its `X-Mode`
header (the gateway forwards it as it is): `handler(ctx)` may write, wait,
close (FIN) or reset (RST) the connection, and returns whether the
connection goes on to read the next request. `ctx.nth` is the request's
number on its connection (1 = a fresh connection), so a handler can tell a
request that came on a pooled keep-alive connection. Every inference request
is logged (`requests`) with its connection, mode and number on it.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fakebackend import ThreadedServer
from rawbackend import CHAT_OK, TAGS, answer, read_request


def chunk(part: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(part), part)


NDJSON_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")
SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


@dataclass
class Ctx:
    """One inference request, and the means to answer it."""

    conn: int
    nth: int
    mode: str
    line: bytes
    head: bytes
    body: bytes
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    at: float = field(default_factory=time.monotonic)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def reset(self) -> None:
        """Close with an RST (SO_LINGER 0), not a FIN."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Handler = Callable[[Ctx], Awaitable[bool]]


async def ok(ctx: Ctx) -> bool:
    await ctx.send(answer(CHAT_OK))
    return True


class FaultBackend(ThreadedServer):
    """The programmable backend on 127.0.0.1, on a free port, served from its own thread."""

    def __init__(self, handlers: dict[str, Handler] | None = None) -> None:
        self.handlers: dict[str, Handler] = dict(handlers or {})
        self.requests: list[Ctx] = []
        self.lock = threading.Lock()
        self.conns = 0
        self.open = 0  # connections open now
        self.writers: set[asyncio.StreamWriter] = set()
        self._listen(self._serve)

    def stop(self) -> None:
        """Die: stop listening (connections are refused) and reset every open connection."""
        async def stop() -> None:
            self.server.close()
            for w in list(self.writers):
                w.transport.abort()
        self._run(stop())

    def restart(self) -> None:
        """Come back on the same port."""
        self.server = self._run(asyncio.start_server(self._serve, "127.0.0.1", self.port))

    def inference(self, mode: str | None = None) -> list[Ctx]:
        """The inference requests read so far (with `mode`: only those of that X-Mode)."""
        with self.lock:
            return [c for c in self.requests if mode is None or c.mode == mode]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conns += 1
        self.open += 1
        conn = self.conns
        nth = 0
        self.writers.add(writer)
        try:
            while True:
                head, body, line, mode = await read_request(reader)
                path = line.split(b" ")[1]
                if path.startswith(b"/api/tags"):
                    writer.write(answer(TAGS))
                elif path.startswith(b"/api/version"):
                    writer.write(answer(b'{"version":"0.12.0"}'))
                elif path.startswith(b"/api/ps"):
                    writer.write(answer(b'{"models":[{"name":"fake:latest","model":"fake:latest"}]}'))
                elif path.startswith(b"/v1/models"):
                    writer.write(answer(b'{"object":"list","data":[{"id":"fake:latest",'
                                        b'"object":"model","owned_by":"fake"}]}'))
                else:
                    nth += 1
                    ctx = Ctx(conn, nth, mode, line, head, body, reader, writer)
                    with self.lock:
                        self.requests.append(ctx)
                    if not await self.handlers.get(mode, ok)(ctx):
                        return
                    continue
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError):
            return
        finally:
            self.open -= 1
            self.writers.discard(writer)
            writer.close()
