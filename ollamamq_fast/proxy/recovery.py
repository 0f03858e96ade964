"""When a side of an exchange fails: the backend dies, goes silent or answers busy, or the client leaves.

Why apart from the exchange: the success path is one straight line, and
every failure branches off it differently depending on how far the request
got. Before the first response byte a request can be tried again (a stale
pooled connection on the same backend, else another backend, at most
MAX_ATTEMPTS connections); after it, the client gets an error frame in its
stream's own format when the stream is at a clean boundary, or a cut
connection (an error in every HTTP client) when it is not, never a hang.
The backend's blame goes to passive health (fleet/passive.py), a retry to
the dispatcher's retry turn, and the request's end to the ledger.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Final

from ollamamq_fast.accounting.ledger import End
from ollamamq_fast.fleet.passive import FAST_FAIL_S
from ollamamq_fast.proxy import answers, response
from ollamamq_fast.proxy.state import State
from ollamamq_fast.wire import framing
from ollamamq_fast.wire.errors import stream_error_frame
from ollamamq_fast.wire.routes import Kind

if TYPE_CHECKING:
    from ollamamq_fast.fleet.backend import Backend
    from ollamamq_fast.proxy.exchange import Exchange
    from ollamamq_fast.proxy.upstream import UpstreamConnection

# A request whose backend fails before answering is tried on this many
# connections in all (a stale pooled connection, then other backends).
MAX_ATTEMPTS: Final = 3
# A pooled connection found closed within this of the request being written had
# gone stale while idle (its close crossed the request); closed later, the
# backend had the request and dropped it.
STALE_S: Final = FAST_FAIL_S
# What the ledger records for an answer the backend broke after its head was
# relayed (the client read that head's status, then an error line or a cut).
BROKEN_STATUS: Final = 502


def retried_on_status(ex: Exchange, conn: UpstreamConnection, backend: Backend, status: int) -> bool:
    """A 502/503/504 answer: True when the request goes to another backend instead of relaying it."""
    # Busy or unavailable, answered fast: the backend's state, not the
    # request's. A 500 is usually about one request (bad template, a
    # model that fails to load) and is relayed without blame.
    if ex.gw.loop_time() - ex.sent_at < FAST_FAIL_S:
        note_backend_failure(ex, f"answered {status}")
    if not can_retry_elsewhere(ex, backend):
        return False
    ex.upstream = None
    conn.abort()
    ex.attempts += 1
    if backend not in ex.failed:
        ex.failed += (backend,)
    ex._release_backend()
    ex.dispatcher.retry(ex)
    return True


def refused_unreadable_body(ex: Exchange, conn: UpstreamConnection) -> bool:
    """A 500 to an inference body that is not JSON: True when answered 400 here instead.

    The gateway reads only the top level of a body (wire/sniff.py); a body broken
    further in goes to the backend, whose own decoder answers. Ollama answers
    400; llama-cpp-python (and FastAPI servers) a bare `500 Internal Server
    Error` in plain text, which the client reads as the server failing, in no
    API's format. Only on that error path is the body parsed, as a Python
    server parses it (json.loads: NaN taken), to tell the client what is wrong.
    """
    route = ex.route
    if (route is None or route.kind is not Kind.QUEUED or ex.stream_body or ex.encoded_body
            or not ex.body):
        return False
    try:
        json.loads(ex.body[0])
    except ValueError as exc:  # UnicodeDecodeError included
        why = f"invalid JSON in request body: {exc}"
    except RecursionError:  # a Python server's json.loads fails the same way
        why = "invalid JSON in request body: nested too deeply"
    else:
        return False
    ex.upstream = None
    conn.abort()  # its body is not relayed
    ex._release_backend()
    answers.respond_error(ex, 400, why)
    return True


def can_retry_elsewhere(ex: Exchange, failed: Backend) -> bool:
    """Whether another available backend could take this request (bounded tries)."""
    if ex.attempts >= MAX_ATTEMPTS or (ex.stream_body and ex.body_forwarded):
        return False
    route = ex.route
    if route is None:
        return False
    for b in ex.fleet.candidates(ex.model if route.kind is not Kind.PRIMARY else None,
                                 route.native):
        # (One held for a health probe takes it once the probe is answered.)
        if b is not failed and (b.available or b.probing > 0) and b not in ex.failed:
            return True
    return False


def upstream_lost(ex: Exchange, conn: UpstreamConnection, exc: Exception | None) -> None:
    """The backend connection closed before the response ended."""
    ex.upstream = None
    if ex.state is State.STREAMING:
        broken_stream(ex, conn, "the backend closed the connection mid-response")
        return
    if ex.state is State.WAITING:
        failed_before_response(ex, conn, exc)


def upstream_timeout(ex: Exchange) -> None:
    """The backend was silent longer than --timeout (called by the reaper)."""
    conn = ex.upstream
    ex.upstream = None
    secs = ex.gw.settings.timeout
    if conn is not None:
        conn.abort()
    if ex.state is State.STREAMING and conn is not None:
        broken_stream(ex, conn, f"the backend sent nothing for {secs:g} s")
    elif ex.state in (State.WAITING, State.CONNECTING):
        note_backend_failure(ex, f"timed out after {secs:g} s of silence")
        ex._release_backend()
        said = ("no whole response head in" if conn is not None and conn.got_bytes
                else "nothing for")
        answers.respond_error(ex, 504, f"backend {backend_name(ex)} sent {said} {secs:g} s")


def broken_stream(ex: Exchange, conn: UpstreamConnection, why: str) -> None:
    """The backend failed after the response began: end the client's stream as cleanly as it can be."""
    relay = ex.xlate
    if relay is not None and relay.conn is conn:
        relay.broken(why)  # the client's stream is in the other API's format
        return
    transport = ex.client.transport
    tail = conn.tail()
    # Chunked, and the last read ended on a line or event: the client's body can
    # be ended here (chunked to the client, or de-chunked to an HTTP/1.0 one,
    # whose body the close ends).
    clean = (transport is not None and not transport.is_closing()
             and conn.framing is framing.Framing.CHUNKED
             and (not tail or framing.at_stream_boundary(tail, conn.content_type)))
    if clean and ex.status < 300 and framing.terminal_event_relayed(tail, conn.content_type):
        # Only the backend's end of body was lost, after the stream's last event:
        # a complete answer (as translating.py ends a translated stream).
        assert transport is not None
        if not ex.http10:
            transport.write(framing.LAST_CHUNK)
        response.whole_without_its_end(ex, conn)
        ex._release_backend()
        ex.finish()
        return
    note_backend_failure(ex, why)
    # The client's status line said 200, but the backend failed the request:
    # the access log, the status metrics and the usage rows' errors say 502.
    ex.status = BROKEN_STATUS
    ex._release_backend()
    ex.keep_alive = False
    if conn.events_seen():
        response.estimate_tokens(ex, conn)  # what was relayed was generated: it counts
    end = End.CANCELLED  # the client is leaving anyway
    if transport is not None and not transport.is_closing():
        end = End.DONE
        frame = stream_error_frame(conn.content_type, why,
                                   ex.path == b"/v1/messages") if clean else None
        if frame is not None:
            transport.write(frame if ex.http10 else framing.chunk(frame) + framing.LAST_CHUNK)
            ex.finish()
            return
        # Mid-line or unframed: no clean frame is possible; the client sees
        # a truncated message (an error in every HTTP client), never a hang.
        transport.abort()
    if ex.state is not State.DONE:
        # Its one end, recorded here: the client's connection_lost finds it done.
        ex._end()
        ex._ended(end)


def failed_before_response(ex: Exchange, conn: UpstreamConnection | None,
                           exc: Exception | None) -> None:
    """No response byte yet: reconnect, retry on another backend, or answer 502."""
    ex.upstream = None
    ex.attempts += 1
    replayable = (not ex.stream_body or not ex.body_forwarded) and (
        conn is None or not conn.got_bytes
    )
    backend = ex.backend
    if (conn is not None and conn.responses > 0 and not conn.got_bytes
            and ex.gw.loop_time() - ex.sent_at < STALE_S):
        # A pooled connection the backend had already closed: not the backend's
        # fault. Reconnect to the same backend, keeping the slot; a fresh
        # connection cannot be stale, so this happens at most once in a row.
        # (One that carried the request longer and then dropped it was working
        # on it: that is the backend failing the request, handled below.)
        if replayable and backend is not None and backend.serving:  # (a half-open trial too)
            ex._to(State.CONNECTING)
            ex.connect_task = ex.gw.loop.create_task(ex._connect(backend))
            return
    else:
        note_backend_failure(ex, repr(exc) if exc else "connection closed before a response")
    ex._release_backend()
    if replayable and backend is not None and can_retry_elsewhere(ex, backend):
        ex.dispatcher.retry(ex)
        return
    answers.respond_error(
        ex, 502,
        f"backend {backend_name(ex)} failed before answering: {exc or 'connection closed'}",
        retry_after=5,
    )


def note_backend_failure(ex: Exchange, why: str) -> None:
    """Blame the backend (passive health) and never send this request back to it."""
    backend = ex.backend
    if backend is not None:
        ex.gw.passive.failure(backend, why)
        if backend not in ex.failed:
            ex.failed += (backend,)


def backend_name(ex: Exchange) -> str:
    return ex.backend.name if ex.backend is not None else "?"


def client_gone(ex: Exchange) -> None:
    """The client connection closed: stop everything the exchange holds."""
    state = ex.state
    if state is State.DONE:
        return
    ex._end()
    answered = False  # the client read the stream's last event
    if ex.ustats is not None:  # it reached admission: it ends here, in the ledger
        end = End.CANCELLED
        conn = ex.upstream
        if state is State.STREAMING and conn is not None:
            if framing.terminal_event_relayed(conn.tail(), conn.content_type):
                # The client read the last event and left before the backend's
                # end of body (the openai SDK does): a complete answer.
                end = End.DONE
                answered = True
                response.whole_without_its_end(ex, conn)
            elif conn.events_seen():
                response.estimate_tokens(ex, conn)  # cut short: what was generated still counts
        elif state is State.QUEUED and ex.enqueued_at:
            ex.queue_ms = int((ex.gw.loop.time() - ex.enqueued_at) * 1000)  # waited, then left
        ex._ended(end)
    if state is State.QUEUED:
        ex.dispatcher.cancel(ex)
    elif state is State.CONNECTING:
        if ex.connect_task is not None:
            ex.connect_task.cancel()
        ex._release_backend()
    elif state in (State.WAITING, State.STREAMING):
        conn = ex.upstream
        ex.upstream = None
        if conn is not None:
            if answered and ex.request_complete and ex.xlate is None:
                conn.drain(ex.gw.loop)  # nothing left to stop: its end is read, and it is pooled
            else:
                conn.abort()
        ex._release_backend()
