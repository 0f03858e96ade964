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
the real server, it refuses (400) an X-Request-ID that is not a UUID, and
answers with an `x-request-id` (the one it was sent, or one it makes).

Its answers are shaped like the real server's (llama-cpp-python 0.3.36):
`/v1/chat/completions` and `/v1/completions`, one word a token, `max_tokens`
honoured and `max_completion_tokens` ignored; a chat stream opens with a role
event, every stream ends with a finish event without content and `[DONE]`, and
carries no usage; a whole answer comes with its head in one write and carries
its usage; a body sent as another type than JSON gets 500, and so does a
`response_format` other than `text` or `json_object` (with an optional `schema`);
a body that is not JSON gets uvicorn's bare `500 Internal Server Error`, plain
text (Starlette's `request.json()` raised before any handler). `end_delay`
waits that long between `[DONE]` and the body's end. `die_after`
cuts a stream's connection after that many tokens (`die_mid_event`: halfway
through the next event), as a killed server does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

MODEL = "tiny"


class FakeLlama:
    """One fake server; start() and close() on the loop that serves it."""

    def __init__(self, interrupt_requests: bool = True, chunks: int = 20,
                 chunk_delay: float = 0.02, ollama: bool = False,
                 die_after: int | None = None, die_mid_event: bool = False,
                 end_delay: float = 0.0) -> None:
        self.interrupt_requests = interrupt_requests
        self.end_delay = end_delay
        self.die_after = die_after
        self.die_mid_event = die_mid_event
        self.chunks = chunks
        self.chunk_delay = chunk_delay
        self.ollama = ollama
        self.bad_request_ids: list[str] = []
        self.wrong_content_types: list[str] = []
        self.formats: list[object] = []  # each generation's response_format (None: none)
        self.messages: list[object] = []  # each chat generation's messages
        self.peers: list[int] = []  # each generation's client port (one a connection)
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

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/slow-health", self._slow_health)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        if self.ollama:
            app.router.add_get("/api/tags", self._tags)
            app.router.add_get("/api/ps", self._ps)
            app.router.add_get("/api/version", self._version)
        app.middlewares.append(self._count)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
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
        response = await handler(request)
        # The plugin echoes the id in every answer, or sends one it made (hex).
        if not response.prepared:
            response.headers["x-request-id"] = rid or uuid.uuid4().hex
        return response

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

    def _count_of(self, body: dict[str, object]) -> int:
        """Tokens to generate: `max_tokens` caps them, as on the real server; it
        ignores `max_completion_tokens` (and generates to the end of its context)."""
        cap = body.get("max_tokens")
        return min(self.chunks, cap) if isinstance(cap, int) and cap > 0 else self.chunks

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        ctype = request.headers.get("Content-Type", "")
        if ctype and "json" not in ctype.split(";")[0]:
            # FastAPI reads a body without a Content-Type as JSON, but a body sent
            # as another type (curl -d's form type) is not an object: 500 from the
            # server's exception handler, in the OpenAI envelope.
            self.wrong_content_types.append(ctype)
            return web.json_response({"error": {"message": "1 validation error: Input should be "
                                                "a valid dictionary", "type": "internal_server_error",
                                                "param": None, "code": None}}, status=500)
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            # Starlette's request.json() raised: uvicorn's bare 500, plain text.
            return web.Response(status=500, text="Internal Server Error")
        fmt = body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") not in ("text", "json_object"):
            # Its pydantic model takes a schema only as {"type": "json_object", "schema": ...}.
            return web.json_response({"error": {"message": "1 validation error: Input should be "
                                                "'text' or 'json_object'", "type": "internal_server_error",
                                                "param": None, "code": None}}, status=500)
        self.formats.append(fmt)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.peers.append(peer[1] if peer else 0)
        if chat:
            self.messages.append(body.get("messages"))
        tokens = self._count_of(body)
        async with self._model_lock():
            self.generating += 1
            try:
                if body.get("stream"):
                    return await self._stream(request, chat, tokens)
                await asyncio.sleep(tokens * self.chunk_delay)
                finish = "length" if tokens < self.chunks else "stop"
                if chat:
                    choice: dict[str, object] = {
                        "index": 0, "finish_reason": finish,
                        "message": {"role": "assistant", "content": self._words(tokens)}}
                else:
                    choice = {"index": 0, "text": self._words(tokens), "logprobs": None,
                              "finish_reason": finish}
                return web.json_response({
                    "id": "c", "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()), "model": MODEL, "choices": [choice],
                    "usage": {"prompt_tokens": 1, "completion_tokens": tokens,
                              "total_tokens": 1 + tokens}})
            finally:
                self.generating -= 1

    async def _embeddings(self, request: web.Request) -> web.Response:
        """As the real server serves a model without pooling: one vector per token
        (here a word, 4 wide, not unit length), whatever `dimensions` asks for."""
        body = orjson.loads(await request.read())
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i, "embedding": [
            [float(len(word)), 1.0, 2.0, float(t)] for t, word in enumerate(text.split())]}
            for i, text in enumerate(inputs)]
        tokens = sum(len(text.split()) for text in inputs)
        return web.json_response({"object": "list", "data": data, "model": MODEL,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    def _words(self, tokens: int) -> str:
        """A whole answer's text: the stream's pieces, joined (one word a token)."""
        return "".join(f"w{i} " for i in range(tokens))

    async def _stream(self, request: web.Request, chat: bool, tokens: int) -> web.StreamResponse:
        """The real server's events: a chat stream opens with a role event; one
        event a token; a finish event with no content; `[DONE]`. With `die_after`,
        the connection is cut after that many tokens (mid-event with `die_mid_event`)."""
        resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "x-request-id": request.headers.get("X-Request-ID") or uuid.uuid4().hex})
        await resp.prepare(request)
        finish = "length" if tokens < self.chunks else "stop"

        def event(content: str | None, finish_reason: str | None) -> bytes:
            if chat:
                delta = {} if content is None else {"content": content}
                choice: dict[str, object] = {"index": 0, "delta": delta,
                                             "finish_reason": finish_reason}
            else:
                choice = {"text": content or "", "index": 0, "logprobs": None,
                          "finish_reason": finish_reason}
            data = {"id": "c", "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": 0, "model": MODEL, "choices": [choice]}
            return b"data: " + orjson.dumps(data) + b"\r\n\r\n"

        if chat:
            await resp.write(event(None, None).replace(b'"delta":{}', b'"delta":{"role":"assistant"}'))
        for i in range(tokens + 1):
            if self.interrupt_requests and self._outer.locked():
                self.interrupted += 1
                break
            if self.die_after is not None and i == self.die_after:
                if self.die_mid_event:
                    piece = event(f"w{i} ", None)
                    await resp.write(piece[: len(piece) // 2])
                assert request.transport is not None
                request.transport.abort()
                return resp
            last = i == tokens
            await resp.write(event(None, finish) if last else event(f"w{i} ", None))
            if not last:
                await asyncio.sleep(self.chunk_delay)
        await resp.write(b"data: [DONE]\r\n\r\n")
        if self.end_delay:
            # uvicorn writes the end of body apart from [DONE]: a client may have
            # read its stream whole (and closed, as the openai SDK does) in between.
            await asyncio.sleep(self.end_delay)
        await resp.write_eof()
        return resp


def start_fake(lt: Any, **options: Any) -> FakeLlama:
    """A FakeLlama serving on `lt` (a harness.LoopThread), started (on `port`, if given)."""
    port = options.pop("port", 0)
    fake = FakeLlama(**options)
    lt.run(fake.start(port))
    return fake
