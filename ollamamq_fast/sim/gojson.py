"""JSON the way Ollama's Go server reads and writes it.

Writing: Go's `json.Marshal` HTML-escapes `<`, `>`, `&` (and U+2028/U+2029), so a
byte-exact pass-through test sees `\\u003c`.  orjson is used for speed and the
escapes are patched in afterwards; outside strings those bytes cannot occur in
JSON, so a plain byte replace is safe.

Reading: `encoding/json` v1 `Decoder.Decode` reads only the first value (trailing
bytes are ignored), matches field names case-insensitively (last duplicate wins)
and replaces invalid UTF-8 with U+FFFD.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

_ESCAPES = ((b"<", b"\\u003c"), (b">", b"\\u003e"), (b"&", b"\\u0026"))
_LINE_SEPS = ((b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def go_escape(data: bytes) -> bytes:
    """Apply Go's HTML-safe escapes to JSON text produced by orjson."""
    for raw, esc in _ESCAPES:
        if raw in data:
            data = data.replace(raw, esc)
    if b"\xe2\x80" in data:
        for raw, esc in _LINE_SEPS:
            data = data.replace(raw, esc)
    return data


def dumps(obj: Any) -> bytes:
    """Serialize like Go's json.Marshal (compact, HTML-escaped, raw UTF-8)."""
    return go_escape(orjson.dumps(obj))


def dumps_line(obj: Any) -> bytes:
    """json.Marshal plus the newline that NDJSON streams and json.Encoder add."""
    return go_escape(orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE))


class BodyError(Exception):
    """The request body could not be bound; `str()` is the Go error text."""


class MissingBody(BodyError):
    """Decode hit io.EOF: the body was empty or only whitespace."""

    def __init__(self) -> None:
        super().__init__("missing request body")


# Python's json messages mapped to the words Go's scanner uses for the same spot.
_GO_SCAN_CONTEXT = {
    "Expecting value": "looking for beginning of value",
    "Expecting property name enclosed in double quotes": "looking for beginning of object key string",
    "Expecting ':' delimiter": "after object key",
    "Expecting ',' delimiter": "after object key:value pair",
}


def _go_syntax_error(text: str, err: json.JSONDecodeError) -> str:
    """Approximate the Go decoder's message for malformed JSON."""
    if err.pos >= len(text.rstrip()):
        return "unexpected EOF"
    context = _GO_SCAN_CONTEXT.get(err.msg, "looking for beginning of value")
    char = text[err.pos]
    shown = "\\\\" if char == "\\" else "\\'" if char == "'" else char
    return f"invalid character '{shown}' {context}"


def decode_value(body: bytes) -> Any:
    """Decode the first JSON value of `body`; raise BodyError with Go's wording."""
    if not body or not body.strip():
        raise MissingBody()
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    # Slow path only for odd input: trailing bytes, invalid UTF-8, or a real error.
    text = body.decode("utf-8", errors="replace")
    start = len(text) - len(text.lstrip())
    try:
        value, _end = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError as err:
        raise BodyError(_go_syntax_error(text, err)) from None
    return _go_strings(value)


_LONE_SURROGATE = re.compile(f"[{chr(0xD800)}-{chr(0xDFFF)}]")


def _go_strings(value: Any) -> Any:
    """`value` with every lone surrogate escape (`"\\ud800"`) as U+FFFD, as Go decodes
    it (json.loads keeps them; orjson, which refuses them, sent the body here)."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_go_strings(v) for v in value]
    if isinstance(value, dict):
        return {_go_strings(k): _go_strings(v) for k, v in value.items()}
    return value


def go_kind(value: Any) -> str:
    """The JSON kind name Go uses in UnmarshalTypeError messages."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def type_error(value: Any, struct: str, field: str, go_type: str) -> BodyError:
    """json: cannot unmarshal X into Go struct field S.f of type T (S without its package)."""
    kind = go_kind(value)
    if kind == "number":
        kind = f"number {value}"
    name = struct.rsplit(".", 1)[-1]
    return BodyError(f"json: cannot unmarshal {kind} into Go struct field {name}.{field} of type {go_type}")


def decode_object(body: bytes, struct: str) -> dict[str, Any]:
    """Decode a request object the way gin's ShouldBindJSON fills a Go struct."""
    value = decode_value(body)
    if value is None:
        # `null` into a struct is a no-op in Go: every field keeps its zero value.
        return {}
    if not isinstance(value, dict):
        raise BodyError(f"json: cannot unmarshal {go_kind(value)} into Go value of type {struct}")
    for key in value:
        if not key.islower():
            # Go matches field names case-insensitively; the last duplicate wins.
            return {k.lower(): v for k, v in value.items()}
    return value


def opt_bool(req: dict[str, Any], key: str, struct: str) -> bool | None:
    """Read a `*bool` field: absent or null is None, a non-bool is a 400."""
    value = req.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise type_error(value, struct, key, "bool")


def opt_str(req: dict[str, Any], key: str, struct: str) -> str:
    """Read a `string` field: absent or null is "", a non-string is a 400."""
    value = req.get(key)
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    raise type_error(value, struct, key, "string")
