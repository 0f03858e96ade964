"""Token counts for OpenAI streams that did not ask for them.

An OpenAI-compatible stream carries usage only when the request sets
`stream_options.include_usage`; most clients (openai-python 1.x by default)
do not, so the gateway would have nothing to account. Decision: the gateway
**injects** `"stream_options":{"include_usage":true}` into such requests and
**strips** what that adds from the stream before the client sees it:

* the extra `"choices":[]` event carrying `usage` (before `data: [DONE]`),
  which is all it adds to chat streams on Ollama, vLLM and llama.cpp;
* on `/v1/completions`, Ollama also puts a zero `"usage":{...}` member in every
  chunk: that member is removed again (`per_chunk`).

The client gets exactly the events it asked for, byte for byte; only the HTTP
chunk boundaries may differ (events are re-chunked as they complete, so
nothing is delayed). The counts are then exact, from the backend itself
(counting content chunks instead would miss the prompt tokens and only guess
the completion tokens). Only `200 text/event-stream` responses framed with
chunked encoding or connection close are filtered; a backend answering an SSE
stream with a Content-Length (none known) is passed through as it is.
"""

from __future__ import annotations

import re
from typing import Final

import orjson

from ollamamq_fast.policy.caps import Edit, append_member, encode_object, exact_object
from ollamamq_fast.wire.sniff import Sniffed, key_text

# Routes whose streams get usage injected, and whether the backend then adds a
# zero usage member to every chunk (Ollama's /v1/completions does).
INJECT_ROUTES: Final[dict[bytes, bool]] = {
    b"/v1/chat/completions": False,
    b"/v1/completions": True,
}
INJECT_KEYS: Final = ("stream", "stream_options")

_INCLUDE: Final = b'{"include_usage":true}'
# The zero usage member Ollama adds to every /v1/completions chunk. A JSON
# string cannot hold a raw `"` (it is escaped), so `,"usage":{` only matches a key.
_CHUNK_USAGE: Final = re.compile(rb',\s*"usage"\s*:\s*\{[^{}]*\}')
# An empty `choices` list, however it is spaced: the usage event's mark.
_EMPTY_CHOICES: Final = re.compile(rb'"choices"\s*:\s*\[\s*\]')


def usage_edits(body: bytes, sn: Sniffed) -> list[Edit]:
    """The edits that ask the backend for usage ([] when not a stream, or already asked).

    The request may reach a Go server (any spelling of a field counts, the
    last wins) or an exact-name one: every spelling of `stream_options` asks
    for usage, and the exact spelling is added when missing, so that no
    variant can turn the usage (and so the quota) off.
    """
    if not any(may_stream(body[start:end]) for _, start, end in sn.occurrences.get("stream", ())):
        return []  # no spelling of `stream` asks for one on any server
    edits: list[Edit] = []
    exact = False
    for raw, start, end in sn.occurrences.get("stream_options", ()):
        exact = exact or key_text(raw) == "stream_options"
        value = body[start:end]
        if value == b"null":
            edits.append((start, end, _INCLUDE))
            continue
        options = exact_object(value)
        if options is None:
            # Not an object: a server that reads this spelling refuses the body, one
            # that reads only another spelling (vLLM: `"Stream_Options": []` beside
            # `"stream_options"`) does not, and must still be asked.
            continue
        if options.get("include_usage") is not True:
            options["include_usage"] = True
            edits.append((start, end, encode_object(options)))
    if not exact:
        edits.append(append_member(sn, "stream_options", _INCLUDE))
    return edits


def may_stream(raw: bytes) -> bool:
    """Whether a server may read the raw JSON `stream` value as true.

    Go (Ollama) takes only `true` (anything else but null is a 400), but vLLM's
    pydantic models read in lax mode: `1`, `1.0`, `"true"`, `"1"`, `"yes"`,
    `"on"` are true there. Usage is asked for whenever some server streams: a
    non-empty string or a non-zero number (a value pydantic then refuses is
    refused with or without it). Not for a falsy one: vLLM refuses
    `stream_options` beside a falsy `stream`.
    """
    if raw == b"true":
        return True
    if raw[:1] == b'"':
        return len(raw) > 2
    if raw[:1] and b"-0123456789".find(raw[:1]) >= 0:
        try:
            return float(raw) != 0
        except ValueError:
            return False
    return False


class UsageStripper:
    """Removes the injected usage from an SSE byte stream, event by event."""

    __slots__ = ("buf", "per_chunk")

    def __init__(self, per_chunk: bool) -> None:
        self.buf = b""
        self.per_chunk = per_chunk

    def feed(self, data: bytes) -> bytes:
        """Bytes of complete events to pass on; an incomplete event waits for its end."""
        buf = self.buf + data if self.buf else data
        end = buf.rfind(b"\n\n")
        cut = end + 2 if end >= 0 else 0
        crlf = buf.rfind(b"\r\n\r\n")
        if crlf >= 0 and crlf + 4 > cut:
            cut = crlf + 4
        if cut == 0:
            self.buf = buf
            return b""
        self.buf = buf[cut:]
        ready = buf[:cut] if cut < len(buf) else buf
        if ready.find(b'"usage"') < 0:
            return ready  # the common case: content events, passed as they are
        return self._filter(ready)

    def flush(self) -> bytes:
        """What is left at the end of the stream (an unterminated last event)."""
        rest, self.buf = self.buf, b""
        return self._filter(rest) if rest.find(b'"usage"') >= 0 else rest

    def _filter(self, data: bytes) -> bytes:
        """Drop the injected usage events, then (per_chunk) the usage members left.

        A candidate is an event whose `choices` is an empty list, in any
        spacing; it is parsed (the one or two such events of a stream, never
        the content events) and dropped only if it is that usage event.
        """
        out: list[bytes] = []
        pos = 0  # start of what is not copied yet
        for m in _EMPTY_CHOICES.finditer(data):
            if m.start() < pos:
                continue
            start = _event_start(data, m.start())
            end = _event_end(data, m.start())
            if _is_usage_event(data[start:end]):
                out.append(data[pos:start])
                pos = end
        if pos:
            out.append(data[pos:])
            data = b"".join(out)
        if self.per_chunk:
            data = _CHUNK_USAGE.sub(b"", data)
        return data


def _is_usage_event(event: bytes) -> bool:
    """Whether an SSE event is the usage-only chunk (`"choices": []` and a `usage` object)."""
    payload = b"".join(line[5:] for line in event.splitlines() if line.startswith(b"data:"))
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return False
    return (isinstance(obj, dict) and obj.get("choices") == []
            and isinstance(obj.get("usage"), dict))


def _event_start(data: bytes, at: int) -> int:
    """Index where the SSE event holding `at` starts (after the previous blank line)."""
    lf = data.rfind(b"\n\n", 0, at)
    crlf = data.rfind(b"\r\n\r\n", 0, at)
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def _event_end(data: bytes, at: int) -> int:
    """Index just past the blank line that ends the SSE event holding `at` (or the end)."""
    lf = data.find(b"\n\n", at)
    crlf = data.find(b"\r\n\r\n", at)
    ends = [i + n for i, n in ((lf, 2), (crlf, 4)) if i >= 0]
    return min(ends) if ends else len(data)
