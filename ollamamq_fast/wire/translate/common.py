"""What every translation shares: endpoints, the translated request, the error
type, JSON and time helpers, and the small value maps used both ways.
"""

from __future__ import annotations

import calendar
import enum
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import orjson

from ollamamq_fast.wire.errors import Api, error_body


class Endpoint(enum.Enum):
    """An inference route of either API, by its path."""

    OLLAMA_CHAT = "/api/chat"
    OLLAMA_GENERATE = "/api/generate"
    OLLAMA_EMBED = "/api/embed"
    OLLAMA_EMBEDDINGS = "/api/embeddings"
    OPENAI_CHAT = "/v1/chat/completions"
    OPENAI_COMPLETIONS = "/v1/completions"
    OPENAI_EMBEDDINGS = "/v1/embeddings"

    @property
    def api(self) -> Api:
        """The API this route belongs to."""
        return Api.OPENAI if self.value.startswith("/v1/") else Api.OLLAMA

    @property
    def path(self) -> bytes:
        """The route's path as the data plane writes it."""
        return self.value.encode()

    @property
    def embeds(self) -> bool:
        """An embedding route (never streams)."""
        return self in _EMBEDDING_ROUTES


_EMBEDDING_ROUTES: Final = frozenset(
    {Endpoint.OLLAMA_EMBED, Endpoint.OLLAMA_EMBEDDINGS, Endpoint.OPENAI_EMBEDDINGS}
)
_BY_PATH: Final = {e.value: e for e in Endpoint}


def endpoint_for(path: bytes | str) -> Endpoint | None:
    """The inference endpoint a (normalized) path names, None for any other path."""
    key = path.decode("latin-1") if isinstance(path, bytes) else path
    key = key.split("?", 1)[0]
    return _BY_PATH.get(key.rstrip("/") if len(key) > 1 else key)


GenerateVia = Literal["auto", "completions", "chat"]


@dataclass(frozen=True, slots=True)
class BackendTraits:
    """What an OpenAI-compatible backend accepts beyond the common subset.

    completions_route: it serves `/v1/completions` (LM Studio and some proxies do not).
    num_ctx: it honours a per-request `num_ctx` (most OpenAI servers fix the
        context at start, so by default it is dropped with a note).
    sampler_extras: it takes `top_k`, `min_p`, a repeat penalty (vLLM,
        llama.cpp, SGLang and LM Studio do; OpenAI itself does not).
    generate_via: where `/api/generate` goes. "auto" sends raw prompts (and
        prompts with a `suffix`) to `/v1/completions`, which applies no chat
        template, and everything else to `/v1/chat/completions` as one user
        message, because Ollama applies the model's template to a non-raw prompt.
    schema_in_json_object: it takes a JSON schema as `{"type": "json_object",
        "schema": …}` (llama.cpp's servers; llama-cpp-python refuses OpenAI's
        `json_schema` type), not as `{"type": "json_schema", "json_schema": …}`.
    repeat_penalty_field: the name it reads Ollama's `repeat_penalty` under
        (with sampler_extras): `repetition_penalty` for vLLM and SGLang,
        `repeat_penalty` for llama.cpp's servers and LM Studio.
    """

    completions_route: bool = True
    num_ctx: bool = False
    sampler_extras: bool = True
    generate_via: GenerateVia = "auto"
    schema_in_json_object: bool = False
    repeat_penalty_field: str = "repetition_penalty"


DEFAULT_TRAITS: Final = BackendTraits()


class TranslationError(ValueError):
    """A request or response that cannot be translated: carries the status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self, api: Api) -> tuple[bytes, bytes]:
        """(content type, body) of this error in the client's API."""
        return error_body(api, self.status, self.message)


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class Translated:
    """A request rewritten for the backend, and what is needed to translate its answer.

    The data plane sends `body` to `path` on the backend; it hands this object
    to `translate_response` or `open_stream` when the answer comes back.
    `local_reply`, when set, is the whole 200 answer (Ollama's load/unload
    form, which an OpenAI backend has no route for): send it without a backend.
    """

    path: bytes
    body: bytes
    client: Endpoint
    backend: Endpoint
    model: str
    stream: bool
    include_usage: bool = False
    base64_embeddings: bool = False
    # /api/embed's `dimensions` (0: none): Ollama cuts its unit vectors to it.
    dimensions: int = 0
    notes: tuple[str, ...] = ()
    local_reply: bytes | None = None
    response_id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.response_id:
            prefix = "cmpl-" if self.client is Endpoint.OPENAI_COMPLETIONS else "chatcmpl-"
            object.__setattr__(self, "response_id", _new_id(prefix))

    @property
    def content_type(self) -> bytes:
        """The content type of the client's answer (stream or single JSON object)."""
        return content_type(self.client, self.stream)

    @property
    def note_header(self) -> bytes:
        """The notes joined for one response header value ("" when nothing was lost)."""
        return "; ".join(self.notes).encode("ascii", "replace")


def content_type(client: Endpoint, stream: bool) -> bytes:
    """The content type the client's API uses for an answer."""
    if client.api is Api.OPENAI:
        return b"text/event-stream" if stream else b"application/json"
    return b"application/x-ndjson" if stream else b"application/json; charset=utf-8"


# -- JSON ---------------------------------------------------------------------


# orjson reads integers beyond 64 bits as floats, which would change a schema's
# numbers (docs/protocol-notes.md §7.22). A run of 19 digits
# anywhere (even inside a string) sends the body to the exact stdlib parser.
_LONG_DIGITS: Final = re.compile(rb"\d{19}")


def loads_object(body: bytes, what: str = "request body") -> dict[str, Any]:
    """Parse a JSON object, or raise a 400 TranslationError that says why."""
    if not body or not body.strip():
        raise TranslationError(400, f"missing {what}")
    try:
        if _LONG_DIGITS.search(body) is None:
            value = orjson.loads(body)
        else:
            value = json.loads(body, parse_constant=refuse_constant, parse_float=finite_float)
    except ValueError as exc:
        raise TranslationError(400, f"invalid JSON in {what}: {exc}") from None
    if not isinstance(value, dict):
        raise TranslationError(400, f"{what} must be a JSON object")
    return value


def finite_float(text: str) -> float:
    """json's parse_float: a number beyond a float's range is an error, not infinity."""
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text} is out of range")
    return value


def refuse_constant(name: str) -> Any:
    """json's parse_constant: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not JSON")


def dumps(value: Any) -> bytes:
    """Compact JSON; key order and float spelling kept (orjson writes 1.0 as 1.0)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        # Integers beyond 64 bits (see _LONG_DIGITS) are written by the stdlib.
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


# -- time -----------------------------------------------------------------------

_RFC3339: Final = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.\d+)?([Zz]|[+-]\d\d:\d\d)?$"
)


def parse_rfc3339(text: Any) -> int | None:
    """Unix seconds of an RFC 3339 time (Ollama's 9-digit fractions included)."""
    if not isinstance(text, str):
        return None
    m = _RFC3339.match(text.strip())
    if m is None:
        return None
    year, mon, day, hour, minute, sec = (int(m.group(i)) for i in range(1, 7))
    try:
        seconds = calendar.timegm((year, mon, day, hour, minute, sec, 0, 0, 0))
    except (ValueError, OverflowError):
        return None
    zone = m.group(7)
    if zone and zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return seconds


def format_rfc3339(seconds: int) -> str:
    """An RFC 3339 UTC time for Unix seconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


class Clock:
    """Ollama's `created_at` for now, with the date part formatted once a second."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        """Now as RFC 3339 UTC with nanoseconds, as Ollama writes it."""
        ns = time.time_ns()
        second, frac = divmod(ns, 1_000_000_000)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{frac:09d}Z"


# -- Go durations (Ollama's keep_alive) -------------------------------------------

_NS_PER_UNIT: Final = {
    b"ns": 1, b"us": 1_000, "\u00b5s".encode(): 1_000, "\u03bcs".encode(): 1_000,
    b"ms": 1_000_000, b"s": 1_000_000_000, b"m": 60_000_000_000, b"h": 3_600_000_000_000,
}
_DIGITS: Final = b"0123456789"
_MAX_DURATION: Final = 1 << 63


def _go_quote(raw: bytes) -> str:
    """Go's time.quote: the text in double quotes, bytes outside printable ASCII as \\xNN."""
    out = []
    for byte in raw:
        if byte < 0x20 or byte >= 0x80:
            out.append(f"\\x{byte:02x}")
        else:
            out.append(("\\" if byte in b'"\\' else "") + chr(byte))
    return '"' + "".join(out) + '"'


def go_duration_ns(text: str) -> int:
    """Go's time.ParseDuration: nanoseconds, or ValueError with Go's message.

    A signed sequence of decimal numbers, each with an optional fraction and a
    unit (ns, us, µs, ms, s, m, h); "0" alone needs no unit.
    """
    raw = orig = text.encode("utf-8", "surrogatepass")
    invalid = "time: invalid duration " + _go_quote(orig)
    negative = raw[:1] == b"-"
    if raw[:1] in (b"-", b"+"):
        raw = raw[1:]
    if raw == b"0":
        return 0
    if not raw:
        raise ValueError(invalid)
    total = 0
    pos = 0
    while pos < len(raw):
        start = pos
        while pos < len(raw) and raw[pos] in _DIGITS:
            pos += 1
        whole = raw[start:pos]
        fraction = b""
        if pos < len(raw) and raw[pos] == 0x2E:  # "."
            pos += 1
            begin = pos
            while pos < len(raw) and raw[pos] in _DIGITS:
                pos += 1
            fraction = raw[begin:pos]
            if not whole and not fraction:
                raise ValueError(invalid)
        elif not whole:
            raise ValueError(invalid)
        begin = pos
        while pos < len(raw) and raw[pos] != 0x2E and raw[pos] not in _DIGITS:
            pos += 1
        unit = raw[begin:pos]
        if not unit:
            raise ValueError("time: missing unit in duration " + _go_quote(orig))
        scale = _NS_PER_UNIT.get(unit)
        if scale is None:
            raise ValueError("time: unknown unit " + _go_quote(unit) + " in duration "
                             + _go_quote(orig))
        value = int(whole) if whole else 0
        if value > _MAX_DURATION // scale:
            raise ValueError(invalid)
        value *= scale
        if fraction:
            value += int(float(b"0." + fraction) * scale)
            if value > _MAX_DURATION:
                raise ValueError(invalid)
        total += value
        if total > _MAX_DURATION:
            raise ValueError(invalid)
    if not negative and total > _MAX_DURATION - 1:
        raise ValueError(invalid)
    return -total if negative else total


def keep_alive_ns(value: Any) -> int | None:
    """Ollama's api.Duration as it reads a request's keep_alive: nanoseconds
    (negative: for ever), None when absent; a 400 TranslationError with Go's
    message for a value Ollama refuses."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TranslationError(400, "Unsupported type: 'bool'")
    if isinstance(value, (int, float)):
        if value < 0:
            return -1
        # Go takes any number; one beyond a Duration's range (1e308 seconds) is
        # kept for ever here (int() of the float's infinity would raise).
        ns = value * 1_000_000_000
        return int(ns) if ns < _MAX_DURATION else _MAX_DURATION - 1
    if isinstance(value, str):
        try:
            return go_duration_ns(value)
        except ValueError as exc:
            raise TranslationError(400, str(exc)) from None
    kind = "[]interface {}" if isinstance(value, list) else "map[string]interface {}"
    raise TranslationError(400, f"Unsupported type: '{kind}'")


# -- shared value maps ----------------------------------------------------------


def done_reason(finish_reason: Any) -> str:
    """OpenAI finish_reason -> Ollama done_reason (Ollama knows only stop and length)."""
    return "length" if finish_reason == "length" else "stop"


def finish_reason(done_reason_value: Any, tool_calls: bool) -> str:
    """Ollama done_reason -> OpenAI finish_reason."""
    if tool_calls:
        return "tool_calls"
    return "length" if done_reason_value == "length" else "stop"


def reasoning_of(obj: dict[str, Any]) -> str | None:
    """The reasoning text of an OpenAI message or delta, under either common key."""
    value = obj.get("reasoning_content")
    if not isinstance(value, str) or not value:
        value = obj.get("reasoning")
    return value if isinstance(value, str) and value else None


def completion_logprobs(tokens: list[Any], offset: int = 0) -> tuple[dict[str, Any], int]:
    """Ollama's logprobs (api.Logprob items) -> the completions API's logprobs
    object (`tokens`, `token_logprobs`, `top_logprobs` as {token: logprob},
    `text_offset` from `offset`), and the text offset after these tokens."""
    texts: list[str] = []
    values: list[Any] = []
    tops: list[dict[str, Any]] = []
    offsets: list[int] = []
    for item in tokens:
        if not isinstance(item, dict):
            continue
        token = item.get("token")
        token = token if isinstance(token, str) else ""
        texts.append(token)
        values.append(item.get("logprob"))
        top = item.get("top_logprobs")
        alternatives = top if isinstance(top, list) else []
        tops.append({str(a.get("token", "")): a.get("logprob") for a in alternatives
                     if isinstance(a, dict)})
        offsets.append(offset)
        offset += len(token)
    out = {"tokens": texts, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
    return out, offset


def ollama_logprobs(logprobs: Any) -> list[Any] | None:
    """An OpenAI choice's logprobs -> Ollama's list, or None when there are none.

    The chat shape (`{"content": [...]}`, also llama.cpp's on /v1/completions)
    is Ollama's own items; the completions shape (vLLM: parallel `tokens`,
    `token_logprobs`, `top_logprobs` lists) is rebuilt item by item.
    """
    if not isinstance(logprobs, dict):
        return None
    content = logprobs.get("content")
    if isinstance(content, list):
        return content
    tokens = logprobs.get("tokens")
    if not isinstance(tokens, list):
        return None
    values = logprobs.get("token_logprobs")
    values = values if isinstance(values, list) else []
    tops = logprobs.get("top_logprobs")
    tops = tops if isinstance(tops, list) else []
    out: list[Any] = []
    for index, token in enumerate(tokens):
        item: dict[str, Any] = {"token": token,
                                "logprob": values[index] if index < len(values) else None}
        top = tops[index] if index < len(tops) else None
        if isinstance(top, dict) and top:
            item["top_logprobs"] = [{"token": k, "logprob": v} for k, v in top.items()]
        out.append(item)
    return out


# Images: Ollama carries bare base64; OpenAI carries data URIs.
_MAGIC: Final = (
    ("iVBORw0KGgo", "image/png"),
    ("/9j/", "image/jpeg"),
    ("R0lGOD", "image/gif"),
    ("UklGR", "image/webp"),
    ("Qk", "image/bmp"),
)
_DATA_URI: Final = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),", re.DOTALL)


def image_data_uri(b64: str) -> str:
    """A data URI for an Ollama base64 image, the media type read from its magic bytes."""
    media = next((m for prefix, m in _MAGIC if b64.startswith(prefix)), "image/png")
    return f"data:{media};base64,{b64}"


def image_base64(url: str) -> str:
    """The base64 payload of a data URI; other URLs are refused (the gateway fetches nothing)."""
    m = _DATA_URI.match(url)
    if m is None:
        raise TranslationError(
            400, "image URLs are not supported, only base64 data URIs (data:image/...;base64,...)"
        )
    payload = url[m.end():]
    if ";base64" not in m.group(2):
        raise TranslationError(400, "image data URIs must be base64-encoded")
    return payload


def tool_arguments_object(arguments: Any) -> Any:
    """OpenAI's JSON-string tool arguments -> the object Ollama carries.

    A string that is not JSON is kept as it is (rather than dropped): the
    client then sees exactly what the model produced.
    """
    if isinstance(arguments, str):
        if not arguments.strip():
            return {}
        try:
            return orjson.loads(arguments)
        except orjson.JSONDecodeError:
            return arguments
    return arguments if arguments is not None else {}


def tool_arguments_string(arguments: Any) -> str:
    """Ollama's object tool arguments -> OpenAI's JSON string (key order kept)."""
    if isinstance(arguments, str):
        return arguments
    return dumps(arguments if arguments is not None else {}).decode()
