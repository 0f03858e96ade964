"""The gateway's own answers: errors, local replies and cache hits, written without a backend.

Why apart from the exchange: every way a request can end without a backend
(an early error held since its head, a refusal, a local route, a cached
response, a failure before the first byte) ends in one of these three
writers, so the rules they share live once: an answer given before the body
is read closes the connection, HTTP/1.0 keep-alive is said out loud, the
request id goes back, a HEAD gets the head only, and an error is in the
route's own format (Ollama `{"error": ...}` or OpenAI's error object).
Each writes the answer and finishes the exchange.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ollamamq_fast.proxy.state import State
from ollamamq_fast.wire import framing
from ollamamq_fast.wire.cors import without_cors
from ollamamq_fast.wire.errors import error_body

if TYPE_CHECKING:
    from ollamamq_fast.policy.cache import Entry
    from ollamamq_fast.proxy.exchange import Exchange


def respond(ex: Exchange, status: int, ctype: bytes, body: bytes, extra: bytes = b"") -> None:
    """Answer from the gateway itself and finish the exchange."""
    if ex.state is State.DONE:
        return
    if not ex.request_complete:
        ex.keep_alive = False
    ex.status = status
    if ex.http10 and ex.keep_alive:
        extra += b"Connection: keep-alive\r\n"
    if ex.request_id:
        extra += b"X-Request-ID: " + ex.request_id + b"\r\n"
    if ex.cors:
        extra += ex.cors
    data = framing.local_response(
        status, ctype, body, close=not ex.keep_alive,
        head_only=ex.method == b"HEAD", extra=extra,
    )
    ex.client.write(data)
    ex.finish()


def respond_cached(ex: Exchange, entry: Entry) -> None:
    """Answer from the response cache: the stored bytes, no backend."""
    if ex.state is State.DONE:
        return
    ex.status = entry.status
    extra = (b"X-Cache: HIT\r\nDate: " + framing.http_date() + b"\r\nX-Request-ID: "
             + ex.request_id + b"\r\n")
    headers = entry.headers
    if ex.cors:
        extra += ex.cors
        headers = without_cors(headers)
    head = framing.response_head(entry.status, b"", headers, extra, not ex.keep_alive)
    ex.client.write(head + entry.body)
    ex.finish()


def respond_error(ex: Exchange, status: int, message: str, retry_after: int | None = None) -> None:
    """Answer an error in the route's own format (Ollama or OpenAI)."""
    ctype, body = error_body(ex.api, status, message)
    extra = b""
    if retry_after is not None:
        extra = b"Retry-After: %d\r\n" % retry_after
    respond(ex, status, ctype, body, extra)
