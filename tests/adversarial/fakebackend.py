"""A fake Ollama backend that records the raw bytes of every request it gets.

It speaks just enough HTTP/1.1 to answer like Ollama: `/api/tags`,
`/api/version`, `/api/ps`, `/v1/models`, `/api/chat`, `/api/generate` and
`/v1/chat/completions`, streamed (NDJSON, SSE) and not, and `404 page not
found` for anything else, as gin does. Every request is checked strictly as
it is read: a valid HTTP/1.1 request line, token header names, no control
characters, exactly one Host, at most one Content-Length made of digits,
never Content-Length with Transfer-Encoding, and a well-formed chunked body.
A request that fails a check is recorded with the reason (`Received.error`),
answered 400 and its connection closed, so a test can assert that the gateway
never forwards anything malformed.

A test steers one request through the `X-Fake` header, which the gateway
forwards as it is (`;`-separated `name=value` items):

    hold=S      wait S seconds before answering
    big=N       answer a non-stream request with an N-byte JSON body
    auth=T      answer 401 unless the request carries `Authorization: Bearer T`
    bighead=N   put an N-byte header in the response head
    headlines=N send header lines (N bytes of them) and never end the head

Answers carry `"n": <serial>`, the number of the request that produced them,
so a test can tell a cached answer from a fresh one.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import urllib.parse
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
REQUEST_LINE = re.compile(rb"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([^\x00-\x20\x7f]+) HTTP/1\.1$")
CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
CHUNK_SIZE = re.compile(rb"^([0-9A-Fa-f]{1,16})[ \t]*(;[^\r\n]*)?$")
PROBES = frozenset({b"/api/tags", b"/api/version", b"/api/ps", b"/v1/models", b"/"})
MODEL = "fake:latest"
TAGS = {"models": [{"name": MODEL, "model": MODEL, "modified_at": "2025-01-01T00:00:00Z",
                    "size": 1, "digest": "0" * 64,
                    "details": {"format": "gguf", "family": "llama", "parameter_size": "1B",
                                "quantization_level": "Q4_0"}}]}
HEAD_LIMIT = 64 * 1024 * 1024


class Malformed(Exception):
    """The request breaks HTTP/1.1 framing rules."""


@dataclass
class Received:
    """One request as the backend read it."""

    serial: int
    conn: int
    raw: bytes  # head and body exactly as they came off the socket
    method: bytes = b""
    target: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""  # de-chunked
    error: str | None = None
    truncated: bool = False  # the gateway closed before the request was complete
    at: float = 0.0

    def header(self, name: bytes) -> bytes | None:
        """The value of the first header called `name` (any case), or None."""
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    @property
    def path(self) -> bytes:
        """The path as Go's net/http hands it to gin: query cut, percent-decoded.

        An absolute-form target (`http://host/api/chat`) is read as its path,
        as Go's `url.ParseRequestURI` does.
        """
        target = self.target
        if b"://" in target.split(b"?", 1)[0]:
            target = b"/" + target.split(b"://", 1)[1].partition(b"/")[2]
        return urllib.parse.unquote_to_bytes(target.split(b"?", 1)[0])

    @property
    def is_probe(self) -> bool:
        """A health probe or model listing (the gateway's own traffic)."""
        return self.method in (b"GET", b"HEAD") and (
            self.path in PROBES or self.path.startswith(b"/api/v0/"))

    def json(self) -> Any:
        """The body parsed with the stdlib (None when it is not JSON or over 1 MB)."""
        if len(self.body) > 1 << 20:
            return {"stream": False} if b'"stream":false' in self.body[:200] else None
        try:
            return json.loads(self.body)
        except ValueError:
            return None


def _fake_options(value: bytes | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in (value or b"").decode("latin-1").split(";"):
        name, _, arg = item.strip().partition("=")
        if name:
            out[name] = arg
    return out


class ThreadedServer:
    """An asyncio server on 127.0.0.1, on a free port, served from a thread of its own."""

    def _listen(self, serve: Any, **options: Any) -> None:
        """Start the thread and its loop, then serve connections with `serve`."""
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self._run(asyncio.start_server(serve, "127.0.0.1", 0, **options))
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def _run(self, coro: Any) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(10)

    def close(self) -> None:
        """Stop serving, cancel the connections' tasks and end the thread."""
        async def stop() -> None:
            self.server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
        try:
            self._run(stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


class FakeBackend(ThreadedServer):
    """The fake backend on 127.0.0.1, on a free port, served from its own thread."""

    def __init__(self, kind: str = "ollama") -> None:
        # "ollama": answers /api/*; "openai": only /v1/* (as vLLM or llama.cpp's
        # server), so the gateway takes it for an OpenAI-compatible backend.
        self.kind = kind
        self.requests: list[Received] = []
        self.lock = threading.Lock()
        self.serial = 0
        self.conns = 0
        self.open_conns = 0
        self.headline_bytes = 0
        self.head_request = False  # the request being answered is a HEAD (no body back)
        self._listen(self._serve, limit=HEAD_LIMIT)

    # -- What the tests read ----------------------------------------------------------

    def calls(self) -> list[Received]:
        """Every request that was not the gateway's own probe, in arrival order."""
        with self.lock:
            return [r for r in self.requests if not r.is_probe]

    def errors(self) -> list[Received]:
        """Requests that broke framing rules."""
        with self.lock:
            return [r for r in self.requests if r.error is not None]

    def mark(self) -> int:
        """A position in the log: `since(mark)` gives what came after it."""
        with self.lock:
            return len(self.requests)

    def since(self, mark: int) -> list[Received]:
        """Non-probe requests received after `mark`."""
        with self.lock:
            return [r for r in self.requests[mark:] if not r.is_probe]

    def wait_for(self, count: int, mark: int = 0, timeout: float = 5.0) -> list[Received]:
        """Wait until `count` non-probe requests arrived after `mark`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.since(mark)
            if len(got) >= count:
                return got
            time.sleep(0.005)
        return self.since(mark)

    # -- Serving ----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conns += 1
        self.open_conns += 1
        conn = self.conns
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        self._record(conn, exc.partial).truncated = True
                    return
                except asyncio.LimitOverrunError:
                    self._record(conn, b"", error="head over 64 MB")
                    return
                req = self._record(conn, head)
                try:
                    self._parse_head(req, head)
                    await self._read_body(req, reader)
                except Malformed as exc:
                    req.error = str(exc)
                    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
                    await writer.drain()
                    return
                except asyncio.IncompleteReadError:
                    req.truncated = True
                    return
                if not await self._answer(req, reader, writer):
                    return
        except (ConnectionError, OSError):
            return
        finally:
            self.open_conns -= 1
            writer.close()

    def _record(self, conn: int, raw: bytes, error: str | None = None) -> Received:
        with self.lock:
            self.serial += 1
            req = Received(self.serial, conn, raw, error=error, at=time.monotonic())
            self.requests.append(req)
        return req

    @staticmethod
    def _parse_head(req: Received, head: bytes) -> None:
        lines = head[:-4].split(b"\r\n")
        if b"\n" in head[:-4].replace(b"\r\n", b"") or b"\r" in head[:-4].replace(b"\r\n", b""):
            raise Malformed("bare CR or LF in the head")
        m = REQUEST_LINE.match(lines[0])
        if m is None:
            raise Malformed(f"bad request line {lines[0][:200]!r}")
        req.method, req.target = m.group(1), m.group(2)
        for line in lines[1:]:
            if line[:1] in (b" ", b"\t"):
                raise Malformed("obsolete line folding")
            name, sep, value = line.partition(b":")
            if not sep or not TOKEN.match(name):
                raise Malformed(f"bad header line {line[:200]!r}")
            value = value.strip(b" \t")
            if CTL.search(value):
                raise Malformed(f"control character in header {name!r}")
            req.headers.append((name, value))
        names = [n.lower() for n, _ in req.headers]
        if names.count(b"host") != 1:
            raise Malformed(f"{names.count(b'host')} Host headers")
        lengths = [v for n, v in req.headers if n.lower() == b"content-length"]
        codings = [v for n, v in req.headers if n.lower() == b"transfer-encoding"]
        if len(lengths) > 1:
            raise Malformed("several Content-Length headers")
        if lengths and not lengths[0].isdigit():
            raise Malformed(f"bad Content-Length {lengths[0][:40]!r}")
        if codings and lengths:
            raise Malformed("Content-Length with Transfer-Encoding")
        if len(codings) > 1 or (codings and codings[0].strip().lower() != b"chunked"):
            raise Malformed(f"Transfer-Encoding other than chunked: {codings!r}")

    async def _read_body(self, req: Received, reader: asyncio.StreamReader) -> None:
        length = req.header(b"content-length")
        if req.header(b"transfer-encoding") is not None:
            body = bytearray()
            while True:
                line = await reader.readuntil(b"\r\n")
                req.raw += line
                m = CHUNK_SIZE.match(line[:-2])
                if m is None or b"\n" in line[:-2] or b"\r" in line[:-2]:
                    raise Malformed(f"bad chunk size line {line[:60]!r}")
                size = int(m.group(1), 16)
                if size == 0:
                    while True:  # trailers, then the empty line
                        trailer = await reader.readuntil(b"\r\n")
                        req.raw += trailer
                        if trailer == b"\r\n":
                            break
                        name, sep, _ = trailer.partition(b":")
                        if not sep or not TOKEN.match(name):
                            raise Malformed(f"bad trailer {trailer[:60]!r}")
                    break
                data = await reader.readexactly(size + 2)
                req.raw += data
                if data[-2:] != b"\r\n":
                    raise Malformed("chunk data not followed by CRLF")
                body += data[:-2]
            req.body = bytes(body)
        elif length is not None:
            req.body = await reader.readexactly(int(length))
            req.raw += req.body

    # -- Answers ------------------------------------------------------------------------

    async def _answer(self, req: Received, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> bool:
        """Write the answer; False when the connection must close."""
        opts = _fake_options(req.header(b"x-fake"))
        if "hold" in opts:
            await asyncio.sleep(float(opts["hold"]))
        if "auth" in opts and req.header(b"authorization") != b"Bearer " + opts["auth"].encode():
            await self._send(writer, 401, b'{"error":"unauthorized"}')
            return True
        extra = b""
        if "bighead" in opts:
            extra = b"X-Big: " + b"a" * int(opts["bighead"]) + b"\r\n"
        if "headlines" in opts:
            writer.write(b"HTTP/1.1 200 OK\r\n")
            self.headline_bytes = 0
            try:
                while self.headline_bytes < int(opts["headlines"]):
                    writer.write(b"X-Line: " + b"b" * 1000 + b"\r\n")
                    self.headline_bytes += 1010
                    await writer.drain()
                while await reader.read(65536):  # until the gateway closes
                    pass
            except (ConnectionError, OSError):
                pass
            return False
        path = req.path
        n = req.serial
        self.head_request = req.method == b"HEAD"
        if self.kind == "openai" and path.startswith(b"/api/"):
            await self._send(writer, 404, b'{"detail":"Not Found"}')
        elif req.method in (b"GET", b"HEAD") and path == b"/api/tags":
            await self._send(writer, 200, json.dumps(TAGS).encode(), extra=extra)
        elif req.method in (b"GET", b"HEAD") and path == b"/api/version":
            await self._send(writer, 200, b'{"version":"0.12.0"}', extra=extra)
        elif req.method in (b"GET", b"HEAD") and path == b"/api/ps":
            await self._send(writer, 200, b'{"models":[]}', extra=extra)
        elif req.method == b"GET" and path == b"/v1/models":
            await self._send(writer, 200, json.dumps({"object": "list", "data": [
                {"id": MODEL, "object": "model", "created": 1, "owned_by": "library"}]}).encode(),
                extra=extra)
        elif req.method == b"POST" and path.startswith(b"/api/blobs/sha256"):
            await self._send(writer, 201, b"", "text/plain")
        elif req.method in (b"GET", b"HEAD") and path == b"/":
            await self._send(writer, 200, b"Ollama is running", "text/plain; charset=utf-8")
        elif req.method == b"POST" and path in (b"/api/chat", b"/api/generate"):
            await self._native(req, writer, opts, extra)
        elif req.method == b"POST" and path == b"/v1/chat/completions":
            await self._openai(req, writer, opts, extra)
        elif req.method in (b"POST", b"DELETE") and path in (
                b"/api/show", b"/api/delete", b"/api/copy", b"/api/pull", b"/api/push",
                b"/api/create", b"/api/embed", b"/api/embeddings"):
            await self._send(writer, 200, b'{"n":%d}' % n, extra=extra)
        else:
            await self._send(writer, 404, b"404 page not found", "text/plain")
        return True

    async def _send(self, writer: asyncio.StreamWriter, status: int, body: bytes,
                    ctype: str = "application/json; charset=utf-8", extra: bytes = b"") -> None:
        reason = {200: b"OK", 201: b"Created", 401: b"Unauthorized", 404: b"Not Found"}.get(status, b"X")
        writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s"
                     % (status, reason, ctype.encode(), len(body), extra,
                        b"" if self.head_request else body))
        await writer.drain()

    async def _chunks(self, writer: asyncio.StreamWriter, ctype: bytes, parts: list[bytes],
                      extra: bytes) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nTransfer-Encoding: chunked\r\n"
                     b"%s\r\n" % (ctype, extra))
        for part in parts:
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def _native(self, req: Received, writer: asyncio.StreamWriter, opts: dict[str, str],
                      extra: bytes) -> None:
        body = req.json()
        stream = not (isinstance(body, dict) and body.get("stream") is False)
        n = req.serial
        chat = req.path == b"/api/chat"
        done: dict[str, Any] = {"model": MODEL, "created_at": "2025-01-01T00:00:00Z",
                                "done": True, "done_reason": "stop", "n": n,
                                "prompt_eval_count": 3, "eval_count": 2}
        text = "x" * int(opts.get("big", "0")) or f"answer {n}"
        if chat:
            done["message"] = {"role": "assistant", "content": "" if stream else text}
        else:
            done["response"] = "" if stream else text
        if not stream:
            await self._send(writer, 200, json.dumps(done).encode(), extra=extra)
            return
        line: dict[str, Any] = {"model": MODEL, "created_at": "2025-01-01T00:00:00Z",
                                "done": False, "n": n}
        if chat:
            line["message"] = {"role": "assistant", "content": text}
        else:
            line["response"] = text
        await self._chunks(writer, b"application/x-ndjson",
                           [json.dumps(line).encode() + b"\n", json.dumps(done).encode() + b"\n"],
                           extra)

    async def _openai(self, req: Received, writer: asyncio.StreamWriter, opts: dict[str, str],
                      extra: bytes) -> None:
        body = req.json()
        stream = isinstance(body, dict) and body.get("stream") is True
        n = req.serial
        text = "x" * int(opts.get("big", "0")) or f"answer {n}"
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        base = {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": 1,
                "model": MODEL, "system_fingerprint": "fp_ollama", "n": n}
        if not stream:
            out = dict(base, choices=[{"index": 0, "message": {"role": "assistant",
                                                                "content": text},
                                       "finish_reason": "stop"}], usage=usage)
            await self._send(writer, 200, json.dumps(out).encode() + b"\n", "application/json",
                             extra)
            return
        chunk = dict(base, object="chat.completion.chunk")
        events = [dict(chunk, choices=[{"index": 0, "delta": {"role": "assistant",
                                                              "content": text},
                                         "finish_reason": None}]),
                  dict(chunk, choices=[{"index": 0, "delta": {"role": "assistant",
                                                              "content": ""},
                                         "finish_reason": "stop"}])]
        options = body.get("stream_options") if isinstance(body, dict) else None
        if isinstance(options, dict) and options.get("include_usage") is True:
            events.append(dict(chunk, choices=[], usage=usage))
        parts = [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events]
        parts.append(b"data: [DONE]\n\n")
        await self._chunks(writer, b"text/event-stream", parts, extra)
