"""The translating relay: a request whose backend speaks the other API.

The exchange hands a request here (one check in `forward.send`) only when
its route is an inference route of one API and the chosen backend does not
speak that API: an Ollama client on an OpenAI-compatible server, or an OpenAI
client on an Ollama backend without its `/v1` layer. Everything else keeps
the zero-copy relay of upstream.py and never reaches this module.

Here the request body is rewritten (wire/translate), and the backend's answer
goes through a `TranslatingRelay` that sits between the backend connection and
the exchange, in the place the exchange has as the connection's sink:

- a stream (2xx NDJSON or SSE) is translated event by event as it arrives and
  written to the client as chunks, so nothing is held but an unfinished line,
  and the client's slowness still pauses the backend (the writes go to the
  client's own transport, whose watermarks drive proxy/flow.py);
- a whole answer (2xx JSON) and an error answer (any other status) are held
  until their end, bounded by MAX_WHOLE_BYTES, and answered translated with a
  Content-Length.

The backend connection is asked to de-chunk (`http10`, as for an HTTP/1.0
client), so the relay sees the payload only. The exchange keeps its part:
retries before the first byte, breaker, slot, cancel on client close, and
token accounting from the backend's own figures (`tokens_in_tail` reads the
backend's bytes, which carry them in both APIs).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Final, cast

import orjson

from ollamamq_fast.fleet.backend import ApiKind
from ollamamq_fast.fleet.models import normalize_model
from ollamamq_fast.proxy import recovery, response
from ollamamq_fast.proxy.state import State
from ollamamq_fast.proxy.upstream import ResponseSink
from ollamamq_fast.stats import tokens_in_tail
from ollamamq_fast.wire import framing
from ollamamq_fast.wire.errors import Api, error_body, stream_error_frame
from ollamamq_fast.wire.headers import length_line
from ollamamq_fast.wire.routes import SPEAKS_OLLAMA
from ollamamq_fast.wire.translate import (
    DEFAULT_TRAITS,
    BackendTraits,
    StreamTranslator,
    Translated,
    TranslationError,
    open_stream,
    show_from_openai_model,
    translate_error,
    translate_request,
    translate_response,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ollamamq_fast.fleet.backend import Backend
    from ollamamq_fast.proxy.exchange import Exchange
    from ollamamq_fast.proxy.transport import Buffer, Transport
    from ollamamq_fast.proxy.upstream import UpstreamConnection

# A whole (non-stream) answer or an error body is held until its end to be
# translated: at most this much (a large batch of embeddings fits).
MAX_WHOLE_BYTES: Final = 256 * 1024 * 1024

# Where a whole answer's token counts are looked for: its last bytes (both
# APIs write them at the end).
_COUNTS_TAIL: Final = 8192

# What a backend of each kind accepts beyond the common OpenAI subset.
_TRAITS: Final[dict[ApiKind, BackendTraits]] = {
    ApiKind.LMSTUDIO: BackendTraits(completions_route=False, repeat_penalty_field="repeat_penalty"),
    ApiKind.OPENAI: BackendTraits(sampler_extras=False),
    ApiKind.LLAMACPP: BackendTraits(schema_in_json_object=True, repeat_penalty_field="repeat_penalty"),
}

_TO_OPENAI: Final = b"X-Translated: ollama->openai\r\n"
_TO_OLLAMA: Final = b"X-Translated: openai->ollama\r\n"
_JSON: Final = b"application/json; charset=utf-8"
_JSON_TYPE: Final = b"Content-Type: application/json\r\n"
# Client header lines a translated request does not carry (lowercased prefixes).
_NOT_FORWARDED: Final = (b"accept-encoding:", b"content-type:")

# What the relay does with the backend's body, decided at its head.
WAITING: Final = 0  # no head yet
STREAM: Final = 1  # 2xx stream: translated piece by piece
WHOLE: Final = 2  # 2xx JSON: held, translated at the end
ERROR: Final = 3  # any other status: held, answered in the client's error shape


def traits_for(backend: Backend) -> BackendTraits:
    """The translation settings for a backend's server kind."""
    return _TRAITS.get(backend.kind, DEFAULT_TRAITS)


def header_value(text: str) -> bytes:
    """A note made safe for one header line (printable ASCII, bounded)."""
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)
    return clean[:1024].encode()


def send(ex: Exchange, conn: UpstreamConnection, backend: Backend) -> None:
    """Translate `ex`'s request for `backend` and write it on `conn` (called by `forward.send`).

    A body the client must fix is answered 400 in its API's shape; Ollama's
    load/unload form (nothing to generate) and `/api/show` of a model only an
    OpenAI-compatible server lists are answered here, without the backend.
    """
    route = ex.route
    assert route is not None
    target = Api.OPENAI if route.translate == SPEAKS_OLLAMA else Api.OLLAMA
    if ex.path == b"/api/show":
        _answer_show(ex, conn, backend)
        return
    if ex.encoded_body:
        _answer_here(ex, conn, 415, *error_body(
            ex.api, 415, f"backend {backend.name} speaks the other API and a compressed "
            "request body cannot be translated; send it uncompressed"))
        return
    t = ex.xlate.translated if ex.xlate is not None else None
    if t is None or t.backend.api is not target:
        try:
            t = translate_request(ex.path, ex.body[0] if ex.body else b"", target,
                                  traits_for(backend))
        except TranslationError as bad:
            _answer_here(ex, conn, bad.status, *bad.body(ex.api))
            return
        if ex.strip_usage and t.include_usage:
            # The usage chunk was asked for by the gateway's policy, not the client.
            t = dataclasses.replace(t, include_usage=False)
    marker = _TO_OPENAI if target is Api.OPENAI else _TO_OLLAMA
    notes = b"X-Translation-Notes: " + header_value("; ".join(t.notes)) + b"\r\n" if t.notes else b""
    if t.local_reply is not None:
        _answer_here(ex, conn, 200, t.content_type, t.local_reply, marker + notes)
        return
    relay = TranslatingRelay(ex, t, conn, marker + notes)
    ex.xlate = relay
    # No response cache for translated answers (the cache keeps the bytes the
    # backend sent, which are not the client's).
    ex.cache_key = None
    head = b"".join((b"POST ", backend.path_prefix, t.path, b" HTTP/1.1\r\n", backend.host_header,
                     _translated_headers(ex.fwd_headers), _JSON_TYPE, length_line(len(t.body))))
    conn.send(relay, ex.client.flow, [head + t.body], False, None, 0, True)
    ex.body_forwarded = True


def _translated_headers(headers: bytes) -> bytes:
    """The forwarded header lines without Accept-Encoding (the relay must read the
    answer) and Content-Type: the body is the gateway's own JSON, whatever type the
    client named (Ollama reads any body as JSON, and its docs' `curl -d` examples send
    a form type, which OpenAI-compatible servers such as llama-cpp-python refuse)."""
    lines = headers.split(b"\r\n")
    return b"\r\n".join(line for line in lines if not line.lower().startswith(_NOT_FORWARDED))


def _answer_here(ex: Exchange, conn: UpstreamConnection, status: int, ctype: bytes,
                 body: bytes, extra: bytes = b"") -> None:
    """Answer without the backend: its unused connection goes back to the pool."""
    ex.upstream = None
    # Unused, it goes back to the pool; counted as having served, like every
    # pooled connection (a stale one is then reconnected, not blamed).
    conn.responses += 1
    conn.pool.release(conn)
    ex._release_backend()
    ex.respond(status, ctype, body, extra=extra)


def _answer_show(ex: Exchange, conn: UpstreamConnection, backend: Backend) -> None:
    for item in backend.v1_models:
        if normalize_model(str(item.get("id", ""))) == ex.model:
            body = orjson.dumps(show_from_openai_model(item))
            _answer_here(ex, conn, 200, _JSON, body, _TO_OPENAI)
            return
    _answer_here(ex, conn, 404, *error_body(Api.OLLAMA, 404, f"model '{ex.model_name}' not found"))


class TranslatingRelay(ResponseSink):
    """The backend connection's sink for a translated exchange (an upstream.ResponseSink;
    the ledger's record is the exchange's, not this one's)."""

    __slots__ = ("chunked", "completion", "conn", "ex", "extra", "held", "held_bytes",
                 "mode", "prompt", "stream", "translated")

    def __init__(self, ex: Exchange, t: Translated, conn: UpstreamConnection,
                 extra: bytes) -> None:
        super().__init__()
        self.ex = ex
        self.translated = t
        self.conn = conn
        self.extra = extra
        # Read by the backend connection: de-chunk the backend's body, so that
        # `write` gets payload bytes only.
        self.http10 = True
        self.mode = WAITING
        self.stream: StreamTranslator | None = None
        self.held: list[bytes] = []
        self.held_bytes = 0
        self.chunked = not ex.http10
        # The backend's own token counts of a whole answer (a stream's are its translator's).
        self.prompt = 0
        self.completion = 0

    # -- ResponseSink -------------------------------------------------------------

    @property
    def client_transport(self) -> Transport | None:
        """The relay itself receives the body (translated, then written to the client)."""
        return cast("Transport", self) if self.ex.state is not State.DONE else None

    def response_head(self, conn: UpstreamConnection) -> bytes | None:
        """The backend's head arrived: decide how its body is translated.

        The exchange's own bookkeeping runs first (a retry elsewhere on a fast
        502/503/504, the breaker, first byte); its relay head is not used.
        """
        ex = self.ex
        if ex.response_head(conn) is None:
            return None
        status = conn.status
        t = self.translated
        ctype = conn.content_type.lower()
        if 200 <= status < 300 and t.stream and (b"ndjson" in ctype or b"event-stream" in ctype):
            self.mode = STREAM
            self.stream = open_stream(t)
            transport = ex.client_transport
            if transport is not None:
                transport.write(self._stream_head(status))
        elif 200 <= status < 300:
            self.mode = WHOLE
        else:
            self.mode = ERROR
        return b""

    def upstream_continue(self, conn: UpstreamConnection) -> None:
        """Nothing to do (the gateway sends no Expect upstream)."""

    def write(self, data: bytes) -> None:
        """A piece of the backend's body (de-chunked)."""
        if not data:
            return
        if self.mode == STREAM:
            stream = self.stream
            assert stream is not None
            try:
                out = stream.feed(data)
            except TranslationError as bad:
                self._cut(bad.message)
                return
            if out:
                self._emit(out)
            return
        self.held_bytes += len(data)
        if self.held_bytes > MAX_WHOLE_BYTES:
            self._cut(f"the backend's answer is larger than the gateway translates "
                      f"({MAX_WHOLE_BYTES // (1024 * 1024)} MB)")
            return
        self.held.append(data)

    def writelines(self, list_of_data: Iterable[Buffer], /) -> None:
        """Pieces of the body at once: the backend connection writes a large body
        that came in one read with its head as (head, view of the read), and the
        head it gets from `response_head` here is empty."""
        for piece in list_of_data:
            self.write(bytes(piece))

    def response_complete(self, conn: UpstreamConnection) -> None:
        """The backend's answer ended: write the rest, then let the exchange finish."""
        ex = self.ex
        transport = ex.client_transport
        if self.mode == STREAM:
            stream = self.stream
            assert stream is not None
            out = stream.finish()
            if transport is not None:
                if self.chunked:
                    transport.write((framing.chunk(out) if out else b"") + framing.LAST_CHUNK)
                elif out:
                    transport.write(out)
        elif transport is not None:
            status, ctype, body = self._whole_answer(conn)
            ex.status = status
            transport.write(framing.local_response(
                status, ctype, body, close=not ex.keep_alive, extra=self._extra()))
        ex.response_complete(conn)

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        """The backend connection closed before its answer ended."""
        if self.mode == WAITING:
            self.ex.upstream_lost(conn, exc)  # nothing sent yet: the exchange may retry
            return
        self.broken("the backend closed the connection mid-response")

    # -- Endings --------------------------------------------------------------------

    def broken(self, why: str) -> None:
        """The backend stopped mid-answer (lost, silent, or unreadable): end the client's answer.

        A stream gets its translator's last word (a clean end if the last event
        came, else an error event in the client's format); a held answer becomes
        a 502 in the client's error shape.
        """
        ex = self.ex
        ex.upstream = None
        stream = self.stream if self.mode == STREAM and ex.state is not State.DONE else None
        out = stream.finish() if stream is not None else b""
        if stream is None or not stream.complete:
            # (A stream whose last event came has only lost its end: no failure.)
            recovery.note_backend_failure(ex, why)
            if stream is not None:
                ex.status = recovery.BROKEN_STATUS  # recorded as failed (recovery.broken_stream)
        ex._release_backend()
        ex.keep_alive = False
        if ex.state is State.DONE:
            return
        if stream is not None:
            if not stream.complete:  # cut short: say why, in the client's stream format
                out = stream_error_frame(self.translated.content_type, why) or out
            transport = ex.client_transport
            if transport is not None and not transport.is_closing():
                if self.chunked:
                    transport.write((framing.chunk(out) if out else b"") + framing.LAST_CHUNK)
                elif out:
                    transport.write(out)
            if stream.complete:
                response.whole_without_its_end(ex, self.conn)
            elif self.conn.events_seen():
                response.estimate_tokens(ex, self.conn)  # what was relayed was generated
            ex.finish()
            return
        ex.respond_error(502, f"backend {recovery.backend_name(ex)} failed mid-answer: {why}")

    def count_tokens(self) -> None:
        """Record the request's tokens (called by the exchange where it counts an answer's).

        The backend's own figures, read whole by the translator (the usage
        chunk, or the final NDJSON line), wherever the reads split them; an
        estimate from the stream's events when the backend gave none.
        """
        ex = self.ex
        stream = self.stream
        if stream is not None:
            self.prompt = stream.prompt_tokens or 0
            self.completion = stream.completion_tokens or 0
        if self.prompt or self.completion or not self.conn.events_seen():
            ex.gw.ledger.tokens(ex, self.prompt, self.completion)
        else:
            response.estimate_tokens(ex, self.conn)

    def _cut(self, why: str) -> None:
        conn = self.conn
        conn.abort()  # the backend sees the close: it stops generating
        self.broken(why)

    # -- Output ---------------------------------------------------------------------

    def _emit(self, out: bytes) -> None:
        transport = self.ex.client_transport
        if transport is not None:
            transport.write(framing.chunk(out) if self.chunked else out)

    def _extra(self) -> bytes:
        ex = self.ex
        backend = ex.backend
        assert backend is not None
        return (backend.gateway_headers + b"%d\r\nX-Request-ID: %s\r\n" % (ex.queue_ms, ex.request_id)
                + self.extra + ex.cors)

    def _stream_head(self, status: int) -> bytes:
        ex = self.ex
        headers: list[tuple[bytes, bytes]] = [
            (b"Content-Type", self.translated.content_type),
            (b"Date", framing.http_date()),
        ]
        if self.chunked:
            headers.append((b"Transfer-Encoding", b"chunked"))
        else:
            ex.keep_alive = False  # an HTTP/1.0 client reads to the close
        extra = self._extra()
        if ex.http10 and ex.keep_alive:
            extra += b"Connection: keep-alive\r\n"
        return framing.response_head(status, b"", headers, extra, not ex.keep_alive)

    def _whole_answer(self, conn: UpstreamConnection) -> tuple[int, bytes, bytes]:
        t = self.translated
        body = b"".join(self.held)
        self.held = []
        status = conn.status
        if self.mode == ERROR:
            ctype, out = translate_error(t.client.api, status, body)
            return status, ctype, out
        self.prompt, self.completion = tokens_in_tail(body[-_COUNTS_TAIL:])
        ex = self.ex
        elapsed = int((ex.gw.loop_time() - ex.sent_at) * 1e9)
        try:
            return status, t.content_type, translate_response(t, body, elapsed)
        except TranslationError as bad:
            ctype, out = error_body(t.client.api, bad.status, bad.message)
            return bad.status, ctype, out

