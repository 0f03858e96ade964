"""The dashboard's side of the admin API: JSON calls and the event stream.

aiohttp on whatever loop the app runs in: in `top` that is Textual's own loop,
inside `serve` it is the gateway's loop, talking to its own admin port over
loopback. Going through HTTP even in-process keeps one code path for both
modes and lets the TUI see exactly what any admin client sees.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

# Every admin call answers from memory; one slower than this means a stuck gateway.
CALL_TIMEOUT_S = 5.0
# The server sends a keep-alive comment every 15 s (control/events.py); twice
# that without a byte means the stream is dead even if TCP has not noticed.
STREAM_IDLE_TIMEOUT_S = 35.0
# aiohttp refuses a line longer than twice its read buffer; 2 x 1 MiB is more
# than any event the bus publishes (a tick carries every backend's snapshot).
READ_BUFSIZE = 1024 * 1024


class AdminApiError(Exception):
    """A failed admin call, phrased for the operator on one line."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def normalize_base(url: str) -> str:
    """`host:port` or a URL, as a base URL without the trailing slash."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


class AdminApi:
    """One gateway's admin API, with the bearer token, over one aiohttp session.

    Created and closed on the loop that uses it (aiohttp sessions are bound to
    their loop).
    """

    def __init__(self, base: str, token: str | None) -> None:
        self.base = normalize_base(base)
        self.token = token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session = aiohttp.ClientSession(
            headers=headers, json_serialize=lambda obj: orjson.dumps(obj).decode())

    async def close(self) -> None:
        """Release the connection pool (when the app stops)."""
        await self._session.close()

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None,
                   query: dict[str, str] | None = None) -> Any:
        """One request; the decoded JSON answer, or AdminApiError."""
        url = self.base + path
        timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
        try:
            async with self._session.request(method, url, json=body, params=query,
                                             timeout=timeout) as resp:
                data = await resp.read()
                if resp.status >= 400:
                    raise AdminApiError(self._http_error(resp.status, resp.reason, data),
                                        resp.status)
                return orjson.loads(data) if data else None
        except aiohttp.ClientConnectorError as exc:
            raise AdminApiError(self._unreachable(exc)) from None
        except aiohttp.InvalidURL:
            raise AdminApiError(f"invalid admin URL {self.base!r}") from None
        except (aiohttp.ClientError, orjson.JSONDecodeError) as exc:
            raise AdminApiError(f"admin API at {self.base}: {type(exc).__name__}: {exc}") \
                from None
        except TimeoutError:
            raise AdminApiError(f"the admin API at {self.base} did not answer within "
                                f"{CALL_TIMEOUT_S:g} s") from None

    def _unreachable(self, exc: aiohttp.ClientConnectorError) -> str:
        if isinstance(exc.os_error, ConnectionRefusedError):
            why = "connection refused (is the gateway running with its admin port?)"
        else:
            why = exc.os_error.strerror or str(exc.os_error) or type(exc.os_error).__name__
        return f"cannot reach the admin API at {self.base}: {why}"

    def _http_error(self, status: int, reason: str | None, data: bytes) -> str:
        if status == 401:
            how = "wrong" if self.token else "missing"
            return (f"the admin API at {self.base} refused the token (401): {how} token; "
                    "pass --token or set OLLAMAMQ_ADMIN_TOKEN")
        try:
            message = str(orjson.loads(data).get("error", ""))
        except (orjson.JSONDecodeError, AttributeError):
            message = ""
        return f"{status} {reason or ''}".strip() + (f": {message}" if message else "")

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Events from `GET /api/events` until the stream ends (AdminApiError on failure)."""
        timeout = aiohttp.ClientTimeout(total=None, connect=CALL_TIMEOUT_S,
                                        sock_read=STREAM_IDLE_TIMEOUT_S)
        try:
            async with self._session.get(self.base + "/api/events", timeout=timeout,
                                         read_bufsize=READ_BUFSIZE) as resp:
                if resp.status >= 400:
                    raise AdminApiError(self._http_error(resp.status, resp.reason,
                                                         await resp.read()), resp.status)
                parser = SseParser()
                async for line in resp.content:
                    event = parser.feed(line)
                    if event is not None:
                        yield event
        except aiohttp.ClientConnectorError as exc:
            raise AdminApiError(self._unreachable(exc)) from None
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            # ValueError: aiohttp's "Chunk too big" for an over-long line.
            raise AdminApiError(f"event stream lost: {type(exc).__name__}") from None


class SseParser:
    """Server-Sent Events framing, one line at a time (WHATWG HTML, "event stream").

    Only what the gateway sends is kept: `data:` lines (joined), ended by a
    blank line; `event:` is ignored because the JSON carries its own `type`.
    Comments (keep-alives) and `retry:` fields produce nothing.
    """

    def __init__(self) -> None:
        self._data: list[bytes] = []

    def feed(self, line: bytes) -> dict[str, Any] | None:
        """Take one line (with or without its newline); an event when one is complete."""
        line = line.rstrip(b"\r\n")
        if not line:
            data, self._data = self._data, []
            if not data:
                return None
            try:
                event = orjson.loads(b"\n".join(data))
            except orjson.JSONDecodeError:
                return None
            return event if isinstance(event, dict) else None
        if line.startswith(b"data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(b" ") else value)
        return None
