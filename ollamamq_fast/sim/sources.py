"""Answer bodies: NDJSON for /api/generate and /api/chat, SSE for /v1, progress lines.

A source renders one planned answer either as stream chunks (`take`) or as the
single non-stream body (`whole`). Everything is assembled from pre-encoded byte
pieces with one created_at per batch, because unpaced mode must write millions of
lines per second and the non-stream path must not be the benchmark's bottleneck.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from .content import Plan, context_tokens
from .gojson import dumps, dumps_line
from .wire import Clock

# Cached JSON-string encodings of token texts (word tokens repeat constantly).
_FRAGMENTS: dict[str, bytes] = {}
_FRAGMENT_CACHE_MAX = 50_000
# Share of the time before the first token that Ollama would report as model load.
LOAD_SHARE = 0.1
METRICS = (
    b',"total_duration":%d,"load_duration":%d,"prompt_eval_count":%d,'
    b'"prompt_eval_duration":%d,"eval_count":%d,"eval_duration":%d}'
)
SSE_DONE = b"data: [DONE]\n\n"


def fragment(text: str) -> bytes:
    """A Go-escaped JSON string literal for `text`, cached."""
    encoded = _FRAGMENTS.get(text)
    if encoded is None:
        if len(_FRAGMENTS) >= _FRAGMENT_CACHE_MAX:
            _FRAGMENTS.clear()
        encoded = _FRAGMENTS[text] = dumps(text)
    return encoded


# Sim choice: `context` never holds more ids than a large num_ctx would keep.
CONTEXT_MAX = 32768


@lru_cache(maxsize=64)
def context_json(count: int) -> bytes:
    """The encoded `context` array for `count` tokens (capped at CONTEXT_MAX)."""
    return dumps(context_tokens(min(count, CONTEXT_MAX)))


def openai_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Native tool calls -> OpenAI ones (arguments as a JSON string)."""
    out = []
    for call in calls:
        func = call["function"]
        out.append(
            {
                "id": call.get("id", ""),
                "index": func.get("index", 0),
                "type": "function",
                "function": {"name": func["name"], "arguments": dumps(func["arguments"]).decode()},
            }
        )
    return out


def usage(plan: Plan) -> dict[str, int]:
    """OpenAI usage from a plan."""
    return {
        "prompt_tokens": plan.prompt_tokens,
        "completion_tokens": plan.eval_count,
        "total_tokens": plan.prompt_tokens + plan.eval_count,
    }


def _usage_json(plan: Plan) -> bytes:
    """Encoded usage object."""
    return b'{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}' % (
        plan.prompt_tokens, plan.eval_count, plan.prompt_tokens + plan.eval_count,
    )


class TokenSource:
    """Walks a Plan: thinking tokens, content tokens, a tool call, then the final chunk."""

    sep = b"\n"
    needs_ts = True

    def __init__(self, plan: Plan, clock: Clock, model: str) -> None:
        self.plan = plan
        self.clock = clock
        self.model = model
        self.model_json = dumps(model)
        self.finished = False
        # perf_counter readings behind Ollama's duration metrics.
        self.started = time.perf_counter()
        self.first = 0.0
        self._segment = 0
        self._pos = 0

    def metrics(self) -> bytes:
        """total/load/prompt_eval/eval durations (ns) and counts, closing the object."""
        started = self.started
        end = time.perf_counter()
        first = self.first or end
        first = min(first, end)
        before_ns = int((first - started) * 1e9)
        load_ns = int(before_ns * LOAD_SHARE)
        plan = self.plan
        return METRICS % (
            int((end - started) * 1e9), load_ns, plan.prompt_tokens,
            before_ns - load_ns, plan.eval_count, int((end - first) * 1e9),
        )

    def take(self, limit: int) -> list[bytes]:
        """Up to `limit` chunks, each one token line (the final chunk may hold several events)."""
        out: list[bytes] = []
        if self.finished:
            return out
        if not self.first:
            self.first = time.perf_counter()
        ts = self.clock.created_at().encode() if self.needs_ts else b""
        plan = self.plan
        while len(out) < limit:
            segment = self._segment
            if segment < 2:
                tokens = plan.thinking if segment == 0 else plan.content
                render = self.render_think if segment == 0 else self.render_content
                start = self._pos
                stop = min(len(tokens), start + limit - len(out))
                out.extend([render(fragment(tok), ts) for tok in tokens[start:stop]])
                if stop >= len(tokens):
                    self._segment, self._pos = segment + 1, 0
                else:
                    self._pos = stop
            elif segment == 2:
                self._segment = 3
                if plan.tool_calls:
                    out.append(self.render_tool(plan.tool_calls, ts))
            else:
                out.append(self.render_final(ts))
                self.finished = True
                break
        return out

    def take_one(self) -> bytes:
        """Exactly the next chunk; a content token takes a short path (paced streams)."""
        if self._segment == 1 and self.first:
            content = self.plan.content
            pos = self._pos
            if pos < len(content) - 1:
                self._pos = pos + 1
                ts = self.clock.created_at().encode() if self.needs_ts else b""
                return self.render_content(fragment(content[pos]), ts)
        return self.take(1)[0]

    def render_think(self, frag: bytes, ts: bytes) -> bytes:
        """One reasoning token."""
        raise NotImplementedError

    def render_content(self, frag: bytes, ts: bytes) -> bytes:
        """One answer token."""
        raise NotImplementedError

    def render_tool(self, calls: list[dict[str, Any]], ts: bytes) -> bytes:
        """The whole tool call in one chunk (only chat has tools)."""
        return b""

    def render_final(self, ts: bytes) -> bytes:
        """The done line (NDJSON) or the finish/usage/[DONE] events (SSE)."""
        raise NotImplementedError

    def whole(self) -> bytes:
        """The stream:false body, stamped now."""
        before, after = self.whole_parts()
        return before + self.clock.created_at().encode() + after

    def whole_parts(self) -> tuple[bytes, bytes]:
        """The stream:false body split around its created_at value (NDJSON sources)."""
        raise NotImplementedError

    def error_event(self, message: str) -> bytes:
        """Ollama's mid-stream error line."""
        return dumps_line({"error": message})


class GenerateSource(TokenSource):
    """/api/generate NDJSON and its non-stream object."""

    def __init__(self, plan: Plan, clock: Clock, model: str, with_context: bool) -> None:
        super().__init__(plan, clock, model)
        self.with_context = with_context
        self._pre = b'{"model":' + self.model_json + b',"created_at":"'

    def render_think(self, frag: bytes, ts: bytes) -> bytes:
        """`"response":"","thinking":"..."` line."""
        return self._pre + ts + b'","response":"","thinking":' + frag + b',"done":false}\n'

    def render_content(self, frag: bytes, ts: bytes) -> bytes:
        """`"response":"..."` line."""
        return self._pre + ts + b'","response":' + frag + b',"done":false}\n'

    def _done(self) -> bytes:
        """`"done":true,"done_reason":..,"context":[..]` then the metrics."""
        plan = self.plan
        count = min(plan.prompt_tokens + plan.eval_count, CONTEXT_MAX)
        context = b',"context":' + context_json(count) if self.with_context else b""
        return b',"done":true,"done_reason":' + plan.reason_json + context + self.metrics()

    def render_final(self, ts: bytes) -> bytes:
        """The done:true line with metrics and context."""
        return self._pre + ts + b'","response":""' + self._done() + b"\n"

    def whole_parts(self) -> tuple[bytes, bytes]:
        """The accumulated answer in one object."""
        plan = self.plan
        thinking = b',"thinking":' + plan.thought_json if plan.thinking else b""
        return self._pre, b'","response":' + plan.text_json + thinking + self._done()


class ChatSource(TokenSource):
    """/api/chat NDJSON and its non-stream object."""

    def __init__(self, plan: Plan, clock: Clock, model: str) -> None:
        super().__init__(plan, clock, model)
        self._pre = b'{"model":' + self.model_json + b',"created_at":"'

    def render_think(self, frag: bytes, ts: bytes) -> bytes:
        """message.thinking line."""
        return self._pre + ts + b'","message":{"role":"assistant","content":"","thinking":' + frag + b'},"done":false}\n'

    def render_content(self, frag: bytes, ts: bytes) -> bytes:
        """message.content line."""
        return self._pre + ts + b'","message":{"role":"assistant","content":' + frag + b'},"done":false}\n'

    def render_tool(self, calls: list[dict[str, Any]], ts: bytes) -> bytes:
        """Whole tool calls with object arguments in a done:false line."""
        return (
            self._pre + ts + b'","message":{"role":"assistant","content":"","tool_calls":'
            + dumps(calls) + b'},"done":false}\n'
        )

    def _done(self) -> bytes:
        """Chat puts done_reason before done."""
        return b'},"done_reason":' + self.plan.reason_json + b',"done":true' + self.metrics()

    def render_final(self, ts: bytes) -> bytes:
        """The done:true line."""
        return self._pre + ts + b'","message":{"role":"assistant","content":""' + self._done() + b"\n"

    def whole_parts(self) -> tuple[bytes, bytes]:
        """The accumulated message in one object."""
        plan = self.plan
        extra = b""
        if plan.thinking:
            extra += b',"thinking":' + plan.thought_json
        if plan.tool_calls:
            extra += b',"tool_calls":' + dumps(plan.tool_calls)
        return self._pre, b'","message":{"role":"assistant","content":' + plan.text_json + extra + self._done()


def _sse_error(message: str) -> bytes:
    """An OpenAI-shaped error event (the openai client raises APIError on it)."""
    body = {"error": {"message": message, "type": "api_error", "param": None, "code": None}}
    return b"data: " + dumps(body) + b"\n\n"


class ChatSSESource(TokenSource):
    """/v1/chat/completions: SSE in the current layout (role once, finish chunk, optional usage)."""

    sep = b"\n\n"
    needs_ts = False

    def __init__(self, plan: Plan, clock: Clock, model: str, ident: str, created: int, include_usage: bool) -> None:
        super().__init__(plan, clock, model)
        self.include_usage = include_usage
        # `{"id":..,"object":..,"created":..,"model":..,"system_fingerprint":"fp_ollama"` without the brace.
        self._head = (
            b'{"id":' + dumps(ident) + b',"object":"chat.completion.chunk","created":%d,"model":' % created
            + self.model_json + b',"system_fingerprint":"fp_ollama"'
        )
        self._ident = ident
        self._created = created
        self._pre = b"data: " + self._head + b',"choices":[{"index":0,"delta":{'
        self._first = True

    def _role(self) -> bytes:
        """`"role":"assistant",` on the first chunk only."""
        if self._first:
            self._first = False
            return b'"role":"assistant",'
        return b""

    def render_think(self, frag: bytes, ts: bytes) -> bytes:
        """delta.reasoning chunk."""
        return self._pre + self._role() + b'"reasoning":' + frag + b'},"finish_reason":null}]}\n\n'

    def render_content(self, frag: bytes, ts: bytes) -> bytes:
        """delta.content chunk."""
        return self._pre + self._role() + b'"content":' + frag + b'},"finish_reason":null}]}\n\n'

    def render_tool(self, calls: list[dict[str, Any]], ts: bytes) -> bytes:
        """Whole tool calls, string arguments."""
        return (
            self._pre + self._role() + b'"content":"","tool_calls":' + dumps(openai_tool_calls(calls))
            + b'},"finish_reason":null}]}\n\n'
        )

    def _finish_reason(self) -> bytes:
        """tool_calls wins over the plan's own reason."""
        return b'"tool_calls"' if self.plan.tool_calls else self.plan.reason_json

    def render_final(self, ts: bytes) -> bytes:
        """Finish chunk, usage chunk (include_usage), then [DONE], flushed together as Ollama does."""
        delta = b'"role":"assistant","content":""' if self._first else b""
        parts = [self._pre + delta + b'},"finish_reason":' + self._finish_reason() + b"}]}\n\n"]
        if self.include_usage:
            parts.append(b"data: " + self._head + b',"choices":[],"usage":' + _usage_json(self.plan) + b"}\n\n")
        parts.append(SSE_DONE)
        return b"".join(parts)

    def whole(self) -> bytes:
        """The chat.completion object (json.Encoder adds the newline)."""
        plan = self.plan
        extra = b""
        if plan.thinking:
            extra += b',"reasoning":' + plan.thought_json
        if plan.tool_calls:
            extra += b',"tool_calls":' + dumps(openai_tool_calls(plan.tool_calls))
        return (
            b'{"id":' + dumps(self._ident) + b',"object":"chat.completion","created":%d,"model":' % self._created
            + self.model_json + b',"system_fingerprint":"fp_ollama","choices":[{"index":0,"message":{"role":"assistant","content":'
            + plan.text_json + extra + b'},"finish_reason":' + self._finish_reason() + b'}],"usage":'
            + _usage_json(plan) + b"}\n"
        )

    def error_event(self, message: str) -> bytes:
        """OpenAI error envelope as an SSE event."""
        return _sse_error(message)


class CompletionSSESource(TokenSource):
    """/v1/completions: `text_completion` chunks; with include_usage every chunk carries zero usage."""

    sep = b"\n\n"
    needs_ts = False

    def __init__(self, plan: Plan, clock: Clock, model: str, ident: str, created: int, include_usage: bool) -> None:
        super().__init__(plan, clock, model)
        self.include_usage = include_usage
        self._ident = ident
        self._created = created
        self._head = b'{"id":' + dumps(ident) + b',"object":"text_completion","created":%d' % created
        self._pre = b"data: " + self._head + b',"choices":[{"text":'
        zero = b',"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}' if include_usage else b""
        self._tail = b',"model":' + self.model_json + b',"system_fingerprint":"fp_ollama"' + zero + b"}\n\n"

    def render_think(self, frag: bytes, ts: bytes) -> bytes:
        """Thinking never reaches /v1/completions text: an empty chunk, as Ollama sends."""
        return self._pre + b'"","index":0,"finish_reason":null}]' + self._tail

    def render_content(self, frag: bytes, ts: bytes) -> bytes:
        """One text chunk."""
        return self._pre + frag + b',"index":0,"finish_reason":null}]' + self._tail

    def render_final(self, ts: bytes) -> bytes:
        """Finish chunk, usage chunk (include_usage), [DONE]."""
        plan = self.plan
        parts = [self._pre + b'"","index":0,"finish_reason":' + plan.reason_json + b"}]" + self._tail]
        if self.include_usage:
            parts.append(
                b"data: " + self._head + b',"choices":[],"model":' + self.model_json
                + b',"system_fingerprint":"fp_ollama","usage":' + _usage_json(plan) + b"}\n\n"
            )
        parts.append(SSE_DONE)
        return b"".join(parts)

    def whole(self) -> bytes:
        """The text_completion object."""
        plan = self.plan
        return (
            self._head + b',"model":' + self.model_json + b',"system_fingerprint":"fp_ollama","choices":[{"text":'
            + plan.text_json + b',"index":0,"finish_reason":' + plan.reason_json + b'}],"usage":'
            + _usage_json(plan) + b"}\n"
        )

    def error_event(self, message: str) -> bytes:
        """OpenAI error envelope as an SSE event."""
        return _sse_error(message)


class ProgressSource:
    """Pull/push/create progress lines; `on_success` runs when the last line is produced."""

    sep = b"\n"

    def __init__(self, events: list[dict[str, Any]], on_success: Callable[[], None] | None = None) -> None:
        self.lines = [dumps_line(event) for event in events]
        self.on_success = on_success
        self.finished = False
        self._pos = 0

    def take_one(self) -> bytes:
        """The next progress line."""
        return self.take(1)[0]

    def take(self, limit: int) -> list[bytes]:
        """Next progress lines."""
        start = self._pos
        stop = min(len(self.lines), start + limit)
        self._pos = stop
        if stop >= len(self.lines) and not self.finished:
            self.finished = True
            if self.on_success is not None:
                self.on_success()
        return self.lines[start:stop]

    def error_event(self, message: str) -> bytes:
        """Ollama's error line."""
        return dumps_line({"error": message})
