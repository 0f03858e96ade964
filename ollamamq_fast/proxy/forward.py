"""The request as the backend reads it: head and body written on a backend connection.

Why apart from the exchange: these are the bytes, not the decisions. The
exchange decides when a request is written; here its head is built from what
intake.py kept (the routed path, with the backend's prefix and Host, and the
forwarding headers) and its body is framed as the backend expects: a whole
body with its Content-Length, or a streamed body as it came (re-chunked when
it came chunked), the rest following as the client sends it (`body_piece`,
`body_end`). A backend that speaks the other API gets the translating relay
instead (translating.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ollamamq_fast.fleet.backend import ApiKind
from ollamamq_fast.policy.streamusage import UsageStripper
from ollamamq_fast.pools import unalias
from ollamamq_fast.proxy import translating
from ollamamq_fast.proxy.flow import HIGH_WATER
from ollamamq_fast.proxy.state import State
from ollamamq_fast.wire import framing
from ollamamq_fast.wire.headers import json_content_type, length_line
from ollamamq_fast.wire.routes import Kind

if TYPE_CHECKING:
    from ollamamq_fast.fleet.backend import Backend
    from ollamamq_fast.proxy.exchange import Exchange
    from ollamamq_fast.proxy.upstream import UpstreamConnection


def send(ex: Exchange, conn: UpstreamConnection, backend: Backend) -> None:
    """Write the request on `conn`, a connection to `backend`: the exchange now waits for its answer."""
    ex.upstream = conn
    ex._to(State.WAITING)
    ex.sent_at = ex.gw.loop_time()
    route = ex.route
    if backend.exact_names and route is not None and route.model_keys and ex.model:
        spell_model_as_listed(ex, route.model_keys, backend.exact_names)
    if route is not None and route.translate & ~backend.speaks:
        translating.send(ex, conn, backend)  # the backend speaks the other API
        return
    fwd = ex.fwd_headers
    if (backend.kind is not ApiKind.OLLAMA and route is not None and route.kind is Kind.QUEUED
            and not ex.encoded_body):
        # An inference body is a JSON object (intake refused any other), sent so
        # that an OpenAI-compatible server reads it as one, whatever type the
        # client named (Ollama itself reads any body as JSON).
        fwd = json_content_type(fwd)
    head = [
        ex.method, b" ", backend.path_prefix, ex.url, b" HTTP/1.1\r\n",
        backend.host_header, fwd,
    ]
    head_request = ex.method == b"HEAD"
    if not ex.stream_body:
        body = ex.body[0] if ex.body else b""
        if body or ex.content_length >= 0 or ex.chunked_in:
            head.append(length_line(len(body)))
        else:
            head.append(b"\r\n")
        head.append(body)
        strip = UsageStripper(ex.strip_usage == 2) if ex.strip_usage else None
        tee = ex.gw.policy.cache.entry_limit if ex.cache_key is not None else 0
        conn.send(ex, ex.client.flow, [b"".join(head)], head_request, strip, tee,
                  route is not None and route.kind is Kind.QUEUED)
        ex.body_forwarded = True
        return
    if ex.chunked_in:
        head.append(b"Transfer-Encoding: chunked\r\n\r\n")
    elif ex.content_length >= 0:
        head.append(b"Content-Length: %d\r\n\r\n" % ex.content_length)
    else:
        head.append(b"\r\n")
    data = [b"".join(head)]
    for piece in ex.body:
        data.append(framing.chunk(piece) if ex.chunked_in else piece)
    if ex.request_complete and ex.chunked_in:
        data.append(framing.LAST_CHUNK)
    ex.body = []
    ex.body_forwarded = True
    conn.send(ex, ex.client.flow, data, head_request)
    ex.client.resume_reading()


def spell_model_as_listed(ex: Exchange, model_keys: tuple[str, ...],
                          exact_names: dict[str, str]) -> None:
    """Name the model in the body as the backend lists it (an exact-id server: vLLM).

    Routing folds case and a missing `:latest` (Ollama's rules), and /api/tags
    shows an OpenAI server's ids with `:latest`, which Ollama clients send
    back; vLLM answers 404 to any spelling but its own. The body keeps every
    other byte; the client's spelling stays in logs and usage.
    """
    exact = exact_names.get(ex.model or "")
    if exact is None or exact == ex.model_name or not ex.body or ex.encoded_body:
        return
    ex.body = [unalias(ex.body[0], model_keys, exact)]


def body_piece(ex: Exchange, data: bytes) -> None:
    """A piece of a streamed body: written on once the request is on the wire, else kept for `send`.

    Kept pieces are bounded: the client is paused past HIGH_WATER (`send`
    resumes it).
    """
    conn = ex.upstream
    if conn is not None and ex.state in (State.WAITING, State.STREAMING) and ex.body_forwarded:
        conn.write(framing.chunk(data) if ex.chunked_in else data)
        return
    ex.body.append(data)
    if ex.body_size > HIGH_WATER:
        ex.client.pause_reading()


def body_end(ex: Exchange) -> None:
    """A streamed body ended: a chunked one already on the wire gets its last chunk."""
    if ex.body_forwarded and ex.chunked_in:
        conn = ex.upstream
        if conn is not None:
            conn.write(framing.LAST_CHUNK)
