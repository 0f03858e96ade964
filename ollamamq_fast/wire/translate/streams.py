"""Streams translated event by event: OpenAI SSE <-> Ollama NDJSON.

A translator is fed the backend's body in whatever pieces it arrives and
returns the client's bytes for every event those pieces complete; nothing but
the unfinished last line is held. Tool-call fragments are the one thing
accumulated (Ollama carries whole calls), and only until the finish event.

Each translator also keeps what the gateway accounts: `prompt_tokens`,
`completion_tokens` (None until the backend reports them), `complete` (the
client got the stream's proper end) and `error` (the message of an error event
it got instead).
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson

from ollamamq_fast.wire.errors import stream_error_frame
from ollamamq_fast.wire.translate.common import (
    Clock,
    Endpoint,
    Translated,
    completion_logprobs,
    done_reason,
    dumps,
    finish_reason,
    ollama_logprobs,
    reasoning_of,
    tool_arguments_object,
)
from ollamamq_fast.wire.translate.lines import LineBuffer
from ollamamq_fast.wire.translate.responses import (
    error_message,
    ollama_metrics,
    openai_tool_calls,
    openai_usage,
)

_NDJSON = b"application/x-ndjson"
_SSE = b"text/event-stream"
ENDED_EARLY = "the backend stream ended before its last event"


class StreamTranslator(Protocol):
    """What the data plane drives: bytes in, bytes out, counts kept."""

    prompt_tokens: int | None
    completion_tokens: int | None
    complete: bool
    error: str | None

    def feed(self, data: bytes) -> bytes:
        """The client's bytes for the events `data` completes (maybe b"")."""
        ...

    def finish(self) -> bytes:
        """At the backend's end of body: the rest, and an error event if the stream was cut."""
        ...


def open_stream(t: Translated) -> StreamTranslator:
    """The translator for a streamed answer to the request `t`."""
    if t.client.api is t.backend.api or t.client.embeds:
        raise ValueError(f"no stream translation from {t.backend.value} to {t.client.value}")
    if t.backend.api.value == "openai":
        return SseToNdjson(t)
    return NdjsonToSse(t)


class _Tool:
    __slots__ = ("arguments", "call_id", "name")

    def __init__(self) -> None:
        self.call_id = ""
        self.name = ""
        self.arguments: list[str] = []


class SseToNdjson:
    """An OpenAI backend's SSE stream -> an Ollama client's NDJSON lines."""

    def __init__(self, t: Translated) -> None:
        self._lines = LineBuffer()
        self._data: list[bytes] = []
        self._clock = Clock()
        # Every line starts with the model; the rest is written per line.
        self._model = b'{"model":' + dumps(t.model)
        self._head = self._model + b',"created_at":"'
        self._chat = t.client is Endpoint.OLLAMA_CHAT
        self._text_key = "text" if t.backend is Endpoint.OPENAI_COMPLETIONS else None
        self._tools: dict[int, _Tool] = {}
        self._done_reason: str | None = None
        self._usage: Any = None
        self._timings: Any = None
        # After the end of body, an unreadable last event is a cut stream, not a bad event.
        self._not_json = "the backend sent an event that is not JSON"
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.complete = False
        self.error: str | None = None

    # -- input ------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        pending = self._data
        for line in self._lines.lines(data):
            if self.complete or self.error is not None:
                break
            # The usual event, `data: {...}` then a blank line (LF endings), is
            # handled here; every other line goes through _line.
            if not pending and line.startswith(b"data: {"):
                pending.append(line[6:])
            elif not line and len(pending) == 1:
                payload = pending[0]
                pending.clear()
                self._event(payload, out)
            else:
                self._line(line, out)
        return b"".join(out)

    def finish(self) -> bytes:
        out: list[bytes] = []
        if not (self.complete or self.error is not None):
            self._not_json = ENDED_EARLY
            tail = self._lines.rest()
            if tail:
                self._line(tail, out)
            if self._data:
                self._line(b"", out)
        if not (self.complete or self.error is not None):
            if self._done_reason is not None:
                self._end(out)  # finished, only the [DONE] marker is missing
            else:
                self._fail(ENDED_EARLY, out)
        return b"".join(out)

    def _line(self, line: bytes, out: list[bytes]) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if line.startswith(b"data:"):
            self._data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif not line and self._data:
            payload = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
            self._data.clear()
            self._event(payload, out)
        # comments (":"), event:, id: and retry: lines carry nothing to translate

    def _event(self, payload: bytes, out: list[bytes]) -> None:
        if payload.startswith(b"[DONE]"):
            self._end(out)
            return
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self._fail(self._not_json, out)
            return
        if not isinstance(obj, dict):
            return
        if "error" in obj or obj.get("object") == "error":
            self._fail(error_message(obj), out)
            return
        if "usage" in obj or "timings" in obj:
            self._count(obj.get("usage"), obj.get("timings"))
        choices = obj.get("choices")
        if not choices or not isinstance(choices, list):
            return
        choice = choices[0]
        thinking = None
        if self._text_key is not None:
            text = choice.get("text")
        else:
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if "reasoning_content" in delta or "reasoning" in delta:
                thinking = reasoning_of(delta)
            if delta.get("tool_calls"):
                self._gather(delta["tool_calls"])
        tokens = ollama_logprobs(choice.get("logprobs"))
        if text or thinking or tokens:
            out.append(self._chunk(text, thinking, tokens))
        if choice.get("finish_reason"):
            self._done_reason = done_reason(choice["finish_reason"])
            self._flush_tools(out)

    def _count(self, usage: Any, timings: Any) -> None:
        if timings is not None:
            self._timings = timings
        if isinstance(usage, dict):
            self._usage = usage
            if isinstance(usage.get("prompt_tokens"), int):
                self.prompt_tokens = usage["prompt_tokens"]
            if isinstance(usage.get("completion_tokens"), int):
                self.completion_tokens = usage["completion_tokens"]

    def _gather(self, fragments: Any) -> None:
        for position, frag in enumerate(fragments):
            if not isinstance(frag, dict):
                continue
            index = frag.get("index", position)
            tool = self._tools.get(index)
            if tool is None:
                tool = self._tools[index] = _Tool()
            if frag.get("id"):
                tool.call_id = frag["id"]
            fn = frag.get("function")
            if isinstance(fn, dict):
                if fn.get("name"):
                    tool.name += fn["name"]
                if isinstance(fn.get("arguments"), str):
                    tool.arguments.append(fn["arguments"])

    # -- output -----------------------------------------------------------------

    def _chunk(self, text: Any, thinking: str | None, tokens: Any = None) -> bytes:
        body = orjson.dumps(text if isinstance(text, str) else "")
        think = b',"thinking":' + orjson.dumps(thinking) if thinking else b""
        if self._chat:
            middle = b'","message":{"role":"assistant","content":' + body + think + b"}"
        else:
            middle = b'","response":' + body + think
        if tokens:
            middle += b',"logprobs":' + orjson.dumps(tokens)
        return self._head + self._clock.now().encode() + middle + b',"done":false}\n'

    def _flush_tools(self, out: list[bytes]) -> None:
        if not self._tools:
            return
        calls: list[dict[str, Any]] = []
        for index in sorted(self._tools):
            tool = self._tools[index]
            call: dict[str, Any] = {"id": tool.call_id} if tool.call_id else {}
            call["function"] = {"index": len(calls), "name": tool.name,
                                "arguments": tool_arguments_object("".join(tool.arguments))}
            calls.append(call)
        self._tools.clear()
        if self._chat:  # /api/generate has no place for tool calls from a chat backend
            line = {"created_at": self._clock.now(),
                    "message": {"role": "assistant", "content": "", "tool_calls": calls},
                    "done": False}
            out.append(self._after_model(line))

    def _end(self, out: list[bytes]) -> None:
        self._flush_tools(out)
        last: dict[str, Any] = {"created_at": self._clock.now()}
        if self._chat:
            last["message"] = {"role": "assistant", "content": ""}
        else:
            last["response"] = ""
        last["done"] = True
        last["done_reason"] = self._done_reason or "stop"
        last.update(ollama_metrics(self._usage, self._timings, None))
        out.append(self._after_model(last))
        self.complete = True

    def _after_model(self, rest: dict[str, Any]) -> bytes:
        return self._model + b"," + dumps(rest)[1:] + b"\n"

    def _fail(self, message: str, out: list[bytes]) -> None:
        self.error = message
        frame = stream_error_frame(_NDJSON, message)
        out.append(frame or b"")


class NdjsonToSse:
    """An Ollama backend's NDJSON lines -> an OpenAI client's SSE events."""

    def __init__(self, t: Translated) -> None:
        self._lines = LineBuffer()
        self._chat = t.client is Endpoint.OPENAI_CHAT
        obj = "chat.completion.chunk" if self._chat else "text_completion"
        self._envelope = (
            b'data: {"id":' + dumps(t.response_id) + b',"object":"' + obj.encode()
            + b'","created":' + str(t.created).encode() + b',"model":' + dumps(t.model)
        )
        field = b'"delta":' if self._chat else b'"text":'
        self._open = self._envelope + b',"choices":[{"index":0,' + field
        self._close = b',"finish_reason":null}]}\n\n' if self._chat else (
            b',"logprobs":null,"finish_reason":null}]}\n\n')
        self._include_usage = t.include_usage
        self._id_prefix = t.response_id[-8:]
        self._role_sent = not self._chat
        self._tool_count = 0
        self._text_offset = 0  # completions logprobs: where the next token starts
        self._not_json = "the backend sent a line that is not JSON"
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.complete = False
        self.error: str | None = None

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        for line in self._lines.lines(data):
            if self.complete or self.error is not None:
                break
            self._line(line, out)
        return b"".join(out)

    def finish(self) -> bytes:
        out: list[bytes] = []
        if not (self.complete or self.error is not None):
            self._not_json = ENDED_EARLY
            tail = self._lines.rest()
            if tail:
                self._line(tail, out)
        if not (self.complete or self.error is not None):
            self._fail(ENDED_EARLY, out)
        return b"".join(out)

    def _line(self, line: bytes, out: list[bytes]) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            return
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            self._fail(self._not_json, out)
            return
        if not isinstance(obj, dict):
            return
        if "error" in obj:
            self._fail(error_message(obj), out)
            return
        if not self._role_sent:
            out.append(self._open + b'{"role":"assistant","content":""}' + self._close)
            self._role_sent = True
        if self._chat:
            self._chat_line(obj, out)
        else:
            text = obj.get("response")
            tokens = obj.get("logprobs")
            if isinstance(tokens, list) and tokens:
                logprobs, self._text_offset = completion_logprobs(tokens, self._text_offset)
                out.append(self._open + dumps(text if isinstance(text, str) else "")
                           + b',"logprobs":' + dumps(logprobs) + b',"finish_reason":null}]}\n\n')
            elif text:
                out.append(self._open + dumps(text) + self._close)
        if obj.get("done"):
            self._end(obj, out)

    def _chat_line(self, obj: dict[str, Any], out: list[bytes]) -> None:
        msg = obj.get("message")
        if not isinstance(msg, dict):
            return
        if msg.get("thinking"):
            out.append(self._open + b'{"reasoning":' + dumps(msg["thinking"]) + b"}" + self._close)
        if msg.get("content") or isinstance(obj.get("logprobs"), list):
            delta = b'{"content":' + dumps(msg.get("content") or "") + b"}"
            if isinstance(obj.get("logprobs"), list):
                logprobs = b',"logprobs":' + dumps({"content": obj["logprobs"]})
                out.append(self._open + delta + logprobs + self._close)
            else:
                out.append(self._open + delta + self._close)
        calls = msg.get("tool_calls")
        if isinstance(calls, list) and calls:
            converted = openai_tool_calls(calls, self._id_prefix, self._tool_count)
            self._tool_count += len(converted)
            out.append(self._open + dumps({"tool_calls": converted}) + self._close)

    def _end(self, obj: dict[str, Any], out: list[bytes]) -> None:
        prompt, completion = obj.get("prompt_eval_count"), obj.get("eval_count")
        self.prompt_tokens = prompt if isinstance(prompt, int) else None
        self.completion_tokens = completion if isinstance(completion, int) else None
        reason = finish_reason(obj.get("done_reason"), self._tool_count > 0).encode()
        empty = b"{}" if self._chat else b'""'
        tail = b',"finish_reason":"' + reason + b'"}]}\n\n'
        if not self._chat:
            tail = b',"logprobs":null' + tail
        out.append(self._open + empty + tail)
        if self._include_usage:
            usage = dumps(openai_usage(prompt, completion))
            out.append(self._envelope + b',"choices":[],"usage":' + usage + b"}\n\n")
        out.append(b"data: [DONE]\n\n")
        self.complete = True

    def _fail(self, message: str, out: list[bytes]) -> None:
        self.error = message
        frame = stream_error_frame(_SSE, message)
        out.append(frame or b"")
