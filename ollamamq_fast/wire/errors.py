"""Error responses in the shape of the API the client is speaking.

Ollama native routes get `{"error": "..."}` with `application/json; charset=utf-8`;
OpenAI-compatible `/v1` routes get the OpenAI envelope with `application/json`
(docs/protocol-notes.md §4.5, §5.4). Gin's own plain-text 404/405 are kept for unknown
paths and wrong methods so clients see what a real Ollama would send.
"""

from __future__ import annotations

import enum
import re
from typing import Final

import orjson


class Api(enum.Enum):
    """Which error dialect a route speaks."""

    OLLAMA = "ollama"
    OPENAI = "openai"


# A UTF-16 surrogate alone (orjson refuses to write one). Not a literal:
# mypyc refuses surrogates in one.
_LONE_SURROGATE: Final = re.compile(f"[{chr(0xD800)}-{chr(0xDFFF)}]")
_REASONS: Final = {
    200: b"OK",
    201: b"Created",
    204: b"No Content",
    301: b"Moved Permanently",
    307: b"Temporary Redirect",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    415: b"Unsupported Media Type",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def reason(status: int) -> bytes:
    """The reason phrase for a status code (empty when unknown, which HTTP allows)."""
    return _REASONS.get(status, b"")


def openai_error_type(status: int) -> str:
    """Ollama's mapping of a status to an OpenAI error `type` (docs/protocol-notes.md §5.4)."""
    if status == 400:
        return "invalid_request_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status in (401, 403):
        return "permission_error" if status == 403 else "authentication_error"
    return "api_error"


def printable_message(message: str) -> str:
    """`message` that any JSON writer takes: a lone UTF-16 surrogate (text from a
    client can hold one) becomes U+FFFD, as Go's decoder reads it."""
    if message.isascii():
        return message
    return _LONE_SURROGATE.sub("\ufffd", message)


def error_body(api: Api, status: int, message: str) -> tuple[bytes, bytes]:
    """(content type, body) of an error in the route's own format."""
    message = printable_message(message)
    if api is Api.OPENAI:
        body = orjson.dumps(
            {
                "error": {
                    "message": message,
                    "type": openai_error_type(status),
                    "param": None,
                    "code": None,
                }
            }
        )
        return b"application/json", body + b"\n"
    return b"application/json; charset=utf-8", orjson.dumps({"error": message})


def stream_error_frame(content_type: bytes, message: str,
                       anthropic: bool = False) -> bytes | None:
    """The frame that ends a broken stream, in the stream's own format.

    NDJSON gets one more `{"error": ...}` line (both official clients raise on it);
    SSE gets a data event with an OpenAI error object, or, on Anthropic's
    `/v1/messages` (`anthropic`), its `error` event: the anthropic SDKs raise
    only on an event named so, and skip a data-only one (the openai SDK raises
    on both). None for other formats.
    """
    message = printable_message(message)
    ct = content_type.lower()
    if ct.find(b"ndjson") >= 0:
        return orjson.dumps({"error": message}) + b"\n"
    if anthropic and ct.find(b"event-stream") >= 0:
        payload = orjson.dumps(
            {"type": "error", "error": {"type": "api_error", "message": message}})
        return b"event: error\ndata: " + payload + b"\n\n"
    if ct.find(b"event-stream") >= 0:
        payload = orjson.dumps(
            {"error": {"message": message, "type": "api_error", "param": None, "code": None}}
        )
        return b"data: " + payload + b"\n\n"
    return None
