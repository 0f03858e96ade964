"""The backend's answer as the client gets it: its head, and what its end leaves behind.

Why apart from the exchange: the relay of body bytes is upstream.py's, and
the exchange only decides when a response starts and ends. What the answer
means for the gateway is here: the head the client reads (the backend's
headers minus hop-by-hop ones, plus the gateway's: queue time, request id,
X-Cache, keep-alive spelled out for HTTP/1.0, and the framing the client can
read), and, once the answer is whole, what it leaves: its tokens in the
ledger (the backend's own counts from the body's tail, or an estimate from
the stream's events), a cacheable answer kept, the model list refreshed after
a pull, copy or delete. The token counts are also read by recovery.py (a
client that left after the last event) and translating.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ollamamq_fast.fleet.backend import Breaker
from ollamamq_fast.proxy.state import State
from ollamamq_fast.stats import NEAR_BYTES, ollama_counts_near, whole_tail_counts
from ollamamq_fast.wire import framing
from ollamamq_fast.wire.cors import without_cors
from ollamamq_fast.wire.routes import Kind

if TYPE_CHECKING:
    from ollamamq_fast.fleet.backend import Backend
    from ollamamq_fast.proxy.exchange import Exchange
    from ollamamq_fast.proxy.upstream import UpstreamConnection


def head(ex: Exchange, conn: UpstreamConnection, backend: Backend) -> bytes:
    """The head for the client of `conn`'s answer, relayed from `backend` (not retried elsewhere).

    An answer that is not a 502/503/504 clears the backend's failures; the
    exchange is STREAMING from here and its first byte is counted.
    """
    status = conn.status
    if status not in (502, 503, 504) and (
            backend.consecutive_failures or backend.breaker is not Breaker.CLOSED):
        ex.gw.passive.success(backend)
    ex._to(State.STREAMING)
    ex.status = status
    ex.gw.ledger.first_byte(ex.started_at)
    dechunk = conn.dechunking and ex.http10  # else re-chunked (stream usage stripped)
    if conn.framing is framing.Framing.CLOSE or not ex.request_complete or dechunk:
        ex.keep_alive = False
    extra = (backend.gateway_headers + b"%d\r\nX-Request-ID: %s\r\n" % (
        ex.queue_ms, ex.request_id))
    if ex.cache_key is not None:
        extra += b"X-Cache: MISS\r\n"
        if status != 200 or conn.framing not in (framing.Framing.LENGTH, framing.Framing.CHUNKED):
            conn.tee = None  # only whole 200 answers are kept
    if ex.http10 and ex.keep_alive:
        extra += b"Connection: keep-alive\r\n"
    raw = conn.raw_head
    if ex.cors:  # the gateway's CORS lines replace any of the backend's own
        extra += ex.cors
        headers = without_cors(conn.response_headers.pairs())
    else:
        if not dechunk:
            relayed = framing.relay_head(raw, extra, not ex.keep_alive, conn.hop_by_hop)
            if relayed is not None:
                return relayed
        headers = conn.response_headers.pairs()
    return framing.response_head(conn.status, framing.reason_phrase(raw), headers,
                                 extra, not ex.keep_alive, dechunk)


def completed(ex: Exchange, conn: UpstreamConnection, backend: Backend) -> None:
    """`backend` answered the whole response on `conn`: count its tokens, keep it, refresh models."""
    backend.requests_done += 1
    route = ex.route
    if route is not None and route.kind is Kind.QUEUED and ex.status < 300:
        count_tokens(ex, conn)
        if ex.cache_key is not None:
            ex.gw.policy.response_done(ex, conn)
    if route is not None and route.refresh_models and ex.status < 300:
        # Route a request right after a pull/copy/delete correctly; the
        # probe that follows fills in the details.
        ex.fleet.note_model_change(backend, ex.path, ex.model_name,
                                   ex.body[0] if ex.body else b"")
        ex.gw.refresh_models(backend)


def whole_without_its_end(ex: Exchange, conn: UpstreamConnection) -> None:
    """The stream's last event was relayed but its end of body never will be (the
    backend closed after it, or the client left): a whole answer all the same, so
    its backend finished a request and its tokens are the backend's own counts."""
    backend = ex.backend
    if backend is not None:
        backend.requests_done += 1
    route = ex.route
    if ex.status < 300 and route is not None and route.kind is Kind.QUEUED:
        count_tokens(ex, conn)


def count_tokens(ex: Exchange, conn: UpstreamConnection) -> None:
    """Record the answer's tokens: the backend's counts from its tail, else an estimate."""
    relay = ex.xlate
    if relay is not None and relay.conn is conn:
        relay.count_tokens()  # the counts its translator read from the backend
        return
    # stats.tokens_in_tail, without copying more of the tail than its end
    # when Ollama's counts are there (a whole stream's tail is 4 KiB).
    found = ollama_counts_near(conn.tail(NEAR_BYTES))
    prompt, completion = found if found is not None else whole_tail_counts(conn.tail())
    if prompt or completion or not conn.events_seen():
        ex.gw.ledger.tokens(ex, prompt, completion)
    else:  # a stream with no usage in it
        estimate_tokens(ex, conn)


def estimate_tokens(ex: Exchange, conn: UpstreamConnection) -> None:
    """Count a stream's tokens from its events (about one token an event), marked estimated."""
    relay = ex.xlate
    path = relay.translated.path if relay is not None and relay.conn is conn else ex.path
    ex.gw.ledger.tokens(ex, 0, framing.estimated_tokens(
        conn.events_seen(), conn.content_type, conn.tail(), path.endswith(b"/chat/completions")),
        estimated=True)
