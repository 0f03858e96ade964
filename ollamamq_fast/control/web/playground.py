"""The chat playground's path to the data plane: a same-origin relay on the admin port.

The page cannot call the data plane itself: it listens on another port (another
origin, and the data plane answers no CORS preflight on purpose), and the
admin token must never travel to it. So the admin app opens an ordinary client
connection to the gateway's own data plane over loopback and relays the NDJSON
stream back unchanged: the playground's requests go through the same identity
checks, limits, fair queue and backends as any client's.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from ollamamq_fast.config import Settings
from ollamamq_fast.control.http import ApiError, Response, json_response

log = logging.getLogger("ollamamq_fast.control")

NDJSON_HEADERS = [
    ("content-type", "application/x-ndjson"),
    ("cache-control", "no-store"),
    ("x-accel-buffering", "no"),
]
# Connecting over loopback is immediate or broken. No read timeout: the reply
# may wait in the fair queue for as long as the gateway's queue_timeout, which
# the data plane enforces itself.
CHAT_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=None)
MODELS_TIMEOUT = aiohttp.ClientTimeout(total=10.0)
# An error answer is one short JSON object; read no more than this of it.
MAX_ERROR_BYTES = 8192
ROLES = frozenset({"system", "user", "assistant"})
WILDCARD_HOSTS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


@dataclass(frozen=True, slots=True)
class DataPlane:
    """Where the gateway's data plane listens, as the admin app reaches it."""

    host: str
    port: int

    @classmethod
    def from_settings(cls, settings: Settings) -> DataPlane | None:
        """The loopback-reachable address, or None for a gateway started on port 0.

        The bound port of a port-0 gateway lives only on Gateway.server, which
        the admin app does not see; such gateways (tests, mostly) get a clear
        503 from the playground instead of a guess.
        """
        if not settings.port:
            return None
        return cls(WILDCARD_HOSTS.get(settings.host, settings.host), settings.port)

    @property
    def url(self) -> str:
        """Base URL for the relay's client requests."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def chat_request(data: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """The upstream /api/chat body and identity headers for a playground request.

    `data` is {model, messages, user?, key?, options?}: the user id goes out
    as X-User-ID, the API key as a bearer token, exactly as a client sends them.
    """
    unknown = set(data) - {"model", "messages", "user", "key", "options"}
    if unknown:
        raise ApiError(400, f"unknown field {min(unknown)!r}")
    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ApiError(400, "'model' must be a non-empty string")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list")
    for m in messages:
        if not (isinstance(m, dict) and m.get("role") in ROLES
                and isinstance(m.get("content"), str)):
            raise ApiError(400, "each message needs a role (system, user, assistant) "
                                "and string content")
    options = data.get("options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "'options' must be an object")
    headers = {"content-type": "application/json"}
    for field, header, prefix in (("user", "x-user-id", ""), ("key", "authorization", "Bearer ")):
        value = data.get(field)
        if value in (None, ""):
            continue
        # A CR or LF would let the value end the header early (header injection).
        if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
            raise ApiError(400, f"{field!r} must be a single-line string")
        headers[header] = prefix + value.strip()
    body: dict[str, Any] = {"model": model.strip(), "messages": messages, "stream": True}
    if options:
        body["options"] = options
    return orjson.dumps(body), headers


def upstream_error(status: int, raw: bytes) -> Response:
    """The data plane refused: its status and message, marked as coming from there.

    The page tells this 401 (a wrong API key) from the admin API's own 401 (a
    wrong admin token) by `source`.
    """
    try:
        parsed = orjson.loads(raw)
        message = parsed.get("error") if isinstance(parsed, dict) else None
        if isinstance(message, dict):  # the OpenAI error envelope
            message = message.get("message")
    except orjson.JSONDecodeError:
        message = None
    text = str(message) if message else raw.decode("utf-8", "replace").strip()
    return Response(status, orjson.dumps({"error": text or f"HTTP {status}",
                                          "source": "data plane"}),
                    [("content-type", "application/json"), ("cache-control", "no-store")])


class Playground:
    """Model list and streamed chat for the playground page, via the data plane."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _data_plane(self) -> DataPlane:
        plane = DataPlane.from_settings(self.settings)
        if plane is None:
            raise ApiError(503, "the playground needs a fixed data-plane port "
                                "(this gateway was started with port 0)")
        return plane

    async def models(self, loaded: set[str]) -> Response:
        """The data plane's GET /v1/models ids, and which of them a backend has loaded.

        The page preselects a loaded model: it answers without a load delay,
        and it is most likely a chat model (an embedding model cannot chat).
        """
        url = self._data_plane().url + "/v1/models"
        try:
            async with aiohttp.ClientSession(timeout=MODELS_TIMEOUT) as session, \
                    session.get(url) as resp:
                raw = await resp.content.read(1 << 20)
                if resp.status != 200:
                    return upstream_error(resp.status, raw[:MAX_ERROR_BYTES])
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ApiError(502, f"cannot reach the data plane at {url}: {exc}") from None
        listed = orjson.loads(raw).get("data", [])
        models = sorted(str(m["id"]) for m in listed if "id" in m)
        return json_response({"models": models, "loaded": [m for m in models if m in loaded]})

    async def chat(self, data: dict[str, Any], proto: Any) -> Response | None:
        """Relay one streamed /api/chat; None once the stream was started here.

        Runs until the reply ends or the browser goes away; in the second case
        the upstream request is cancelled, so the gateway frees the queue
        entry or backend slot just as for any client that hangs up.
        """
        body, headers = chat_request(data)
        url = self._data_plane().url + "/api/chat"
        gone = asyncio.ensure_future(proto.client_disconnect())
        relay = asyncio.ensure_future(self._relay(url, body, headers, proto))
        try:
            done, _ = await asyncio.wait({gone, relay}, return_when=asyncio.FIRST_COMPLETED)
            if relay in done:
                return relay.result()
            relay.cancel()
            await asyncio.wait({relay})
            return None
        except asyncio.CancelledError:
            relay.cancel()
            raise
        finally:
            gone.cancel()

    async def _relay(self, url: str, body: bytes, headers: dict[str, str],
                     proto: Any) -> Response | None:
        transport = None
        try:
            async with aiohttp.ClientSession(timeout=CHAT_TIMEOUT) as session, \
                    session.post(url, data=body, headers=headers) as resp:
                if resp.status != 200:
                    return upstream_error(resp.status, await resp.content.read(MAX_ERROR_BYTES))
                transport = proto.response_stream(200, NDJSON_HEADERS)
                async for chunk in resp.content.iter_any():
                    await transport.send_bytes(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            message = f"cannot reach the data plane at {url}: {exc}"
            if transport is None:
                raise ApiError(502, message) from None
            # Headers are out: the failure can only be told in-band, as the
            # last NDJSON line (Ollama's own mid-stream error shape).
            await _send_quietly(transport, orjson.dumps({"error": message}) + b"\n")
        except RuntimeError as exc:
            # granian's RSGIProtocolClosed: the browser left between two writes.
            log.debug("playground stream ended: %s", exc)
        return None


async def _send_quietly(transport: Any, data: bytes) -> None:
    try:
        await transport.send_bytes(data)
    except RuntimeError:
        pass  # the browser is gone too; nobody is left to tell
