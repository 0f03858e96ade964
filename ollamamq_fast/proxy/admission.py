"""Admit and queue: what the usage policy and the dispatcher answer, read into the exchange.

Why apart from the exchange: between "the request is read" and "it runs on a
backend" sit two deciders (the usage policy, policy/gate.py, and the
dispatcher, sched/dispatcher.py), each answering a value with several kinds.
Reading those values (the body the policy rewrote, its cache key, a refusal
counted in the ledger and answered in the route's format, a cache hit) is
bookkeeping the driver need not spell out. Each function here reads or acts
on one value and returns what the driver does next: go on, or stop because
the request was answered. None of them starts, queues or waits for anything
(the PENDING admission's callback is the exchange's own `_settled`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import blake3

from ollamamq_fast.policy.gate import ADMIT, Admission, Verdict
from ollamamq_fast.proxy import answers, intake
from ollamamq_fast.wire.routes import Kind
from ollamamq_fast.wire.sniff import first_item, latin1_text

if TYPE_CHECKING:
    import asyncio

    from ollamamq_fast.proxy.exchange import Exchange
    from ollamamq_fast.sched.dispatcher import Placement
    from ollamamq_fast.wire.routes import Route

log = logging.getLogger("ollamamq_fast.proxy")


def admit(ex: Exchange, route: Route) -> Admission | None:
    """Read the model of an inference or model-management request and ask the policy.

    The body is joined into one piece (forward.py sends `ex.body[0]`). Returns
    ADMIT (go on unchanged), another admission for `admitted` to act on, or
    None when the request was answered: its body names no model to route by.
    A compressed body is not read; only a queued route asks the policy then.
    """
    body = b"".join(ex.body) if len(ex.body) != 1 else ex.body[0]
    ex.body = [body]
    kind = route.kind
    policy = ex.gw.policy
    text = latin1_text(body)  # searched by the policy and the model sniffer
    keys = policy.body_keys(ex, body, text) if kind is Kind.QUEUED else ()
    if ex.encoded_body:
        ex.model = None
        return policy.admit(ex, body, None, readable=False) if kind is Kind.QUEUED else ADMIT
    try:
        spans = intake.read_model(ex, route, body, keys, text)
    except intake.Unroutable as bad:
        answers.respond_error(ex, bad.status, bad.message)
        return None
    if kind is Kind.QUEUED:
        return policy.admit(ex, ex.body[0], spans)  # the body an alias was spliced into
    return ADMIT


def admitted(ex: Exchange, a: Admission) -> bool:
    """Act on an ADMIT, REFUSE or CACHED admission: True when the request goes on to the dispatcher.

    ADMIT applies what the policy decided (rewritten body, cache key, stream
    usage to strip) and counts it; REFUSE and CACHED are answered here.
    """
    kind = a.kind
    if kind is Verdict.ADMIT:
        ex.gw.ledger.admitted(a.capped, a.cache_miss)
        if a.body is not None:
            ex.body = [a.body]
        ex.cache_key = a.cache_key
        ex.strip_usage = a.strip_usage
        return True
    if kind is Verdict.REFUSE:
        if a.rejected:
            ex.gw.ledger.refused(ex, a.reason)
        answers.respond_error(ex, a.status, a.message, retry_after=a.retry_after)
    else:
        assert kind is Verdict.CACHED and a.entry is not None
        ex.gw.ledger.cache_hit()
        answers.respond_cached(ex, a.entry)
    return False


def settled(ex: Exchange, future: asyncio.Future[Admission]) -> Admission | None:
    """What a PENDING admission resolved to, or None when the lookup failed (answered 500)."""
    exc = future.exception()
    if exc is not None:
        log.error("policy: cache lookup failed: %r", exc)
        answers.respond_error(ex, 500, "internal error in the gateway's response cache")
        return None
    return future.result()


def affinity(ex: Exchange) -> str:
    """The key that sends a user's same conversation to the same backend (its KV cache is reused).

    The user and a digest of the opening message; a compressed body sent to
    model management has none.
    """
    route = ex.route
    if ex.encoded_body and route is not None and route.kind is not Kind.QUEUED:
        return ""
    opening = first_item(ex.body[0], "messages")
    return ex.user + ":" + (blake3.blake3(opening).hexdigest()[:16] if opening else "")


def refused(ex: Exchange, placement: Placement) -> None:
    """The dispatcher refused the request: count it (when the policy's) and answer its error."""
    if placement.rejected:
        ex.gw.ledger.refused(ex)
    answers.respond_error(ex, placement.status, placement.message,
                          retry_after=placement.retry_after)
