"""Run a planned answer as a paced stream or as one delayed JSON body."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import wire
from .emitter import StreamEmitter
from .exchange import Exchange
from .faults import MID_STREAM_ERROR
from .gojson import dumps
from .models import ModelEntry
from .sources import ProgressSource, TokenSource

if TYPE_CHECKING:
    from .app import SimApp


def run_generation(
    app: SimApp,
    ex: Exchange,
    source: TokenSource,
    stream: bool,
    stream_type: bytes,
    whole_type: bytes,
    fail: Callable[[Exchange, int, str], None],
    entry: ModelEntry | None = None,
    keep_alive: float | None = None,
) -> None:
    """Stream the source's plan token by token, or answer once after the whole generation's time.

    Instant native answers (no delay) are remembered by the fast lane when `entry` is given.
    """
    if stream:
        StreamEmitter(ex, source, app.ttft_s, app.interval_s).start(stream_type)
        return
    delay = app.ttft_s + source.plan.steps * app.interval_s
    if delay > 0:
        handle = app.loop.call_later(delay, _finish_whole, app, ex, source, whole_type, fail)
        ex.cancel_cb = handle.cancel
        return
    if entry is not None:
        app.fastlane.remember(ex, source, entry, keep_alive, whole_type)
    _finish_whole(app, ex, source, whole_type, fail)


def _finish_whole(
    app: SimApp, ex: Exchange, source: TokenSource, whole_type: bytes, fail: Callable[[Exchange, int, str], None]
) -> None:
    """The generation is "done": send the accumulated answer."""
    ex.cancel_cb = None
    if ex.done or ex.conn.closing:
        return
    source.first = source.started + app.ttft_s
    faults = ex.faults
    if faults is not None and faults.mid_stream_error:
        # Non-stream Ollama turns a runner failure into a 500 with the error text.
        fail(ex, 500, MID_STREAM_ERROR)
        return
    ex.send(200, source.whole(), whole_type)


def native_error(ex: Exchange, status: int, message: str) -> None:
    """`fail` callback for native routes: `{"error":"..."}`."""
    ex.send_error(status, message)


def run_after(app: SimApp, ex: Exchange, delay_s: float, action: Callable[[], None]) -> None:
    """Run `action` after `delay_s` unless the client leaves first (embeddings)."""
    if delay_s <= 0:
        action()
        return

    def fire() -> None:
        """Delay over."""
        ex.cancel_cb = None
        if ex.alive:
            action()

    handle = app.loop.call_later(delay_s, fire)
    ex.cancel_cb = handle.cancel


def run_progress(
    app: SimApp,
    ex: Exchange,
    events: list[dict[str, Any]],
    stream: bool,
    on_success: Callable[[], None] | None,
) -> None:
    """Pull/push/create: stream progress lines, or wait and answer with the last one.

    An `{"error":...}` event ends the stream; as the first event it becomes a 500
    (Go's streamResponse / waitForStream), with `application/json` as content type.
    """
    step = app.options.pull_step_s
    interval = app.interval_s if step is None else step
    error = next((e["error"] for e in events if "error" in e), None)
    if error is not None and "error" in events[0]:
        ex.send(500, dumps({"error": error}), wire.CT_JSON)
        return
    if stream:
        source = ProgressSource(events, on_success if error is None else None)
        StreamEmitter(ex, source, 0.0, interval).start(wire.CT_NDJSON)
        return

    def finish() -> None:
        """waitForStream: the last progress object, or the error with status 500."""
        if error is not None:
            ex.send(500, dumps({"error": error}), wire.CT_JSON)
            return
        if on_success is not None:
            on_success()
        ex.send(200, dumps(events[-1]), wire.CT_JSON)

    run_after(app, ex, interval * len(events), finish)
