"""A stand-in for llama-cpp-python's server, reproducing how it serialises requests.

llama-cpp-python guards its model with two locks: a request takes the outer
one, then the inner one, then lets the outer one go while it runs. A stream
checks between tokens whether the outer lock is held, i.e. whether another
request is waiting:
- `interrupt_requests=True` (its default): the running stream stops at once
  with `data: [DONE]` and no finish reason, and the waiting request runs;
- `interrupt_requests=False`: the waiting request (a `/v1/models` probe too)
  blocks until the generation ends.
Paths it does not serve (`/api/tags`...) answer 404 without touching the locks.

With `ollama=True` it answers the few native paths a health check uses
instead (`/api/tags`, `/api/ps`, `/api/version`), without locks.
Every request is counted by path, so tests can check what probes send. As
the real server, it refuses (400) an X-Request-ID that is not a UUID.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import orjson
from aiohttp import web

MODEL = "tiny"


class FakeLlama:
    """One fake server; start() and close() on the loop that serves it."""

    def __init__(self, interrupt_requests: bool = True, chunks: int = 20,
                 chunk_delay: float = 0.02, ollama: bool = False) -> None:
        self.interrupt_requests = interrupt_requests
        self.chunks = chunks
        self.chunk_delay = chunk_delay
        self.ollama = ollama
        self.bad_request_ids: list[str] = []
        self.hits: Counter[str] = Counter()
        self.interrupted = 0
        self.generating = 0
        self._outer = asyncio.Lock()
        self._inner = asyncio.Lock()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/slow-health", self._slow_health)
        app.router.add_post("/v1/chat/completions", self._chat)
        if self.ollama:
            app.router.add_get("/api/tags", self._tags)
            app.router.add_get("/api/ps", self._ps)
            app.router.add_get("/api/version", self._version)
        app.middlewares.append(self._count)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _count(self, request: web.Request, handler: web.Handler) -> web.StreamResponse:
        self.hits[request.path] += 1
        # starlette-context's RequestIdPlugin: an X-Request-ID that is not a
        # UUID gets 400 with an empty body, before any route runs.
        rid = request.headers.get("X-Request-ID")
        if rid is not None:
            try:
                uuid.UUID(rid)
            except ValueError:
                self.bad_request_ids.append(rid)
                return web.Response(status=400)
        return await handler(request)

    @contextlib.asynccontextmanager
    async def _model_lock(self) -> AsyncIterator[None]:
        """llama-cpp-python's double lock (server/app.py, get_llama_proxy)."""
        await self._outer.acquire()
        outer_held = True
        try:
            await self._inner.acquire()
            try:
                self._outer.release()
                outer_held = False
                yield
            finally:
                self._inner.release()
        finally:
            if outer_held:
                self._outer.release()

    async def _models(self, request: web.Request) -> web.Response:
        async with self._model_lock():
            return web.json_response({"object": "list", "data": [
                {"id": MODEL, "object": "model", "owned_by": "me", "permissions": []}]})

    async def _slow_health(self, request: web.Request) -> web.Response:
        async with self._model_lock():
            return web.json_response({"status": "ok"})

    async def _tags(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [{"name": MODEL + ":latest", "model": MODEL + ":latest"}]})

    async def _ps(self, request: web.Request) -> web.Response:
        return web.json_response({"models": []})

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.12.3"})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        async with self._model_lock():
            self.generating += 1
            try:
                if body.get("stream"):
                    return await self._stream(request)
                await asyncio.sleep(self.chunks * self.chunk_delay)
                return web.json_response({
                    "id": "c", "object": "chat.completion", "created": int(time.time()),
                    "model": MODEL, "choices": [{"index": 0, "finish_reason": "stop",
                                                 "message": {"role": "assistant",
                                                             "content": self._words()}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": self.chunks,
                              "total_tokens": 1 + self.chunks}})
            finally:
                self.generating -= 1

    def _words(self) -> str:
        """A whole answer's text: the stream's pieces, joined (one word a token)."""
        return "".join(f"w{i} " for i in range(self.chunks))

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        for i in range(self.chunks + 1):
            if self.interrupt_requests and self._outer.locked():
                self.interrupted += 1
                break
            last = i == self.chunks
            choice = {"index": 0, "delta": {} if last else {"content": f"w{i} "},
                      "finish_reason": "stop" if last else None}
            event = {"id": "c", "object": "chat.completion.chunk", "created": 0,
                     "model": MODEL, "choices": [choice]}
            await resp.write(b"data: " + orjson.dumps(event) + b"\r\n\r\n")
            if not last:
                await asyncio.sleep(self.chunk_delay)
        await resp.write(b"data: [DONE]\r\n\r\n")
        await resp.write_eof()
        return resp
