"""A backend that answers inference requests with exactly the bytes a test gives it.

Probes and model lists are answered like Ollama (one model, `fake:latest`,
loaded; `/api/ps` after `ps_delay` seconds, counted in `ps_count`), so
the gateway takes it for an online Ollama backend. Any other request is
answered by the `Script` registered under its `X-Mode` header (the gateway
forwards that header as it is), else with a plain non-stream chat answer. A
script is a list of steps: bytes to write, or a float (seconds to wait, after
flushing what was written); `close=True` closes the connection after it.
Every request is logged (`requests`), with the connection it came on, so a
test can tell whether the gateway reused a connection after a bad answer.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from dataclasses import dataclass, field

from fakebackend import ThreadedServer

MODEL = "fake:latest"
TAGS = json.dumps({"models": [{"name": MODEL, "model": MODEL,
                               "modified_at": "2025-01-01T00:00:00Z", "size": 1,
                               "digest": "0" * 64, "details": {}}]}).encode()
CHAT_OK = (b'{"model":"fake:latest","created_at":"2025-01-01T00:00:00Z","done":true,'
           b'"message":{"role":"assistant","content":"ok"},"prompt_eval_count":3,'
           b'"eval_count":2}')
_LENGTH = re.compile(rb"(?i)\r\ncontent-length:[ \t]*(\d+)")
_MODE = re.compile(rb"(?i)\r\nx-mode:[ \t]*([^\r]*)")


def answer(body: bytes, status: bytes = b"200 OK", ctype: bytes = b"application/json",
           extra: bytes = b"") -> bytes:
    """A complete response with a Content-Length."""
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype
            + b"\r\nContent-Length: %d\r\n" % len(body) + extra + b"\r\n" + body)


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes, bytes, str]:
    """The next request on a connection: (head, body, request line, X-Mode value)."""
    head = await reader.readuntil(b"\r\n\r\n")
    m = _LENGTH.search(head)
    body = await reader.readexactly(int(m.group(1))) if m else b""
    found = _MODE.search(head)
    mode = found.group(1).decode("latin-1") if found else ""
    return head, body, head.split(b"\r\n", 1)[0], mode


def chunked(parts: list[bytes], ctype: bytes = b"application/x-ndjson") -> bytes:
    """A complete chunked response, one chunk per part."""
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)
    return (b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype
            + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n")


@dataclass
class Script:
    """What the backend writes for one request."""

    steps: list[bytes | float]
    close: bool = False


@dataclass
class Got:
    """One request as the backend read it."""

    conn: int
    line: bytes
    mode: str
    head: bytes
    body: bytes
    at: float = field(default_factory=time.monotonic)


class RawBackend(ThreadedServer):
    """The scripted backend on 127.0.0.1, on a free port, served from its own thread."""

    def __init__(self, scripts: dict[str, Script], ps_delay: float = 0.0) -> None:
        self.scripts = scripts
        self.ps_delay = ps_delay  # seconds before /api/ps is answered
        self.ps_count = 0
        self.requests: list[Got] = []
        self.lock = threading.Lock()
        self.conns = 0
        self._listen(self._serve)

    def inference(self, mode: str | None = None) -> list[Got]:
        """Requests that were not probes (with `mode`: only those of that X-Mode)."""
        with self.lock:
            return [g for g in self.requests if not g.line.startswith((b"GET", b"HEAD /api/"))
                    and (mode is None or g.mode == mode)]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conns += 1
        conn = self.conns
        try:
            while True:
                head, body, line, mode = await read_request(reader)
                with self.lock:
                    self.requests.append(Got(conn, line, mode, head, body))
                path = line.split(b" ")[1]
                script = self.scripts.get(mode)
                if path.startswith(b"/api/tags"):
                    writer.write(answer(TAGS))
                elif path.startswith(b"/api/version"):
                    writer.write(answer(b'{"version":"0.12.0"}'))
                elif path.startswith(b"/api/ps"):
                    self.ps_count += 1
                    await asyncio.sleep(self.ps_delay)
                    writer.write(answer(b'{"models":[{"name":"fake:latest","model":"fake:latest"}]}'))
                elif path.startswith(b"/v1/models"):
                    writer.write(answer(b'{"object":"list","data":[]}'))
                elif script is not None:
                    for step in script.steps:
                        if isinstance(step, float):
                            await writer.drain()
                            await asyncio.sleep(step)
                        else:
                            writer.write(step)
                    await writer.drain()
                    if script.close:
                        return
                    continue
                else:
                    writer.write(answer(CHAT_OK))
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError):
            return
        finally:
            writer.close()
