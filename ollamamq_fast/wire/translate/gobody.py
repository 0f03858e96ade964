"""An Ollama client's request body, read the way Ollama's Go server reads it.

The gateway decides routing, caps and usage on what the backend will read
(docs/protocol-notes.md). A native request translated for an OpenAI server
is read by the translator instead of Go, so the translator must read it as Go
would, or a body could route on one model and be translated with another, or
carry a cap (`"Options": {"num_predict": 5}`) the translation then drops:

- struct field names match case-insensitively (`"Model"`, `"MESSAGES"`); the
  last occurrence in the text wins;
- a repeated object-valued field is merged into the first (Go decodes the
  second into the same struct or map), a repeated list or scalar replaces it;
- fields Go does not know are ignored; keys inside a map (`options`, a tool
  call's `arguments`) are exact, as Go's map keys are;
- invalid UTF-8 and a lone surrogate escape (`"\\ud800"`, no character) are
  U+FFFD in strings and keys: json.loads keeps the surrogate, which no UTF-8
  writer takes (the translated body could not be written).

Only the fields the translation reads are named here; the canonical body keeps
their lower-case names.
"""

from __future__ import annotations

import json
from typing import Any, Final

from ollamamq_fast.wire.errors import printable_message
from ollamamq_fast.wire.sniff import go_fold
from ollamamq_fast.wire.translate.common import (
    TranslationError,
    finite_float,
    refuse_constant,
)


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as its members in text order, duplicates included."""


# A schema maps a folded key to (canonical name, how its value is read):
# None: the value as plain JSON (objects with exact keys, last one wins; null
# resets it, as for Go's pointers, slices and `any`);
# _SCALAR: a Go string, bool or number: as plain JSON, but null leaves it as it was;
# _MAP: an object read into a Go map: exact keys, merged into an earlier one;
# a dict: a struct (merged); a one-item list: a list of that struct.
_MAP: Final = "map"
_SCALAR: Final = "scalar"
Schema = dict[str, tuple[str, Any]]


def _schema(*plain: str, **nested: Any) -> Schema:
    out: Schema = {name: (name, None) for name in plain}
    out.update({name: (name, how) for name, how in nested.items()})
    return out


_FUNCTION: Final = _schema("parameters", "index", name=_SCALAR, description=_SCALAR,
                           arguments=_MAP)
_TOOL_CALL: Final = _schema("id", "type", function=_FUNCTION)
_TOOL: Final = _schema("type", "items", function=_FUNCTION)
_MESSAGE: Final = _schema("images", "tool_call_id", "name", role=_SCALAR, content=_SCALAR,
                          thinking=_SCALAR, tool_name=_SCALAR, tool_calls=[_TOOL_CALL])
# The fields of Ollama's ChatRequest, GenerateRequest, EmbedRequest and
# EmbeddingRequest together (a field one of them lacks is never read for it).
REQUEST: Final = _schema(
    "context", "stream", "format", "images", "keep_alive", "think", "input", "truncate",
    "shift",
    model=_SCALAR, prompt=_SCALAR, suffix=_SCALAR, system=_SCALAR, template=_SCALAR,
    raw=_SCALAR, dimensions=_SCALAR, logprobs=_SCALAR, top_logprobs=_SCALAR,
    options=_MAP, messages=[_MESSAGE], tools=[_TOOL],
)


def loads_go_object(body: bytes, what: str = "request body") -> dict[str, Any]:
    """Parse a native request as Go does, or raise a 400 TranslationError that says why."""
    if not body or not body.strip():
        raise TranslationError(400, f"missing {what}")
    try:
        value = json.loads(body.decode("utf-8", "replace"), object_pairs_hook=_Pairs,
                           parse_constant=refuse_constant, parse_float=finite_float)
    except ValueError as exc:
        raise TranslationError(400, f"invalid JSON in {what}: {exc}") from None
    if not isinstance(value, _Pairs):
        raise TranslationError(400, f"{what} must be a JSON object")
    return _struct(value, REQUEST, {})


def _struct(pairs: _Pairs, schema: Schema, into: dict[str, Any]) -> dict[str, Any]:
    for key, value in pairs:
        spec = schema.get(go_fold(key))
        if spec is None:
            continue  # Go ignores fields its struct does not have
        name, how = spec
        into[name] = _read(value, how, into.get(name))
    return into


def _read(value: Any, how: Any, earlier: Any) -> Any:
    if isinstance(how, dict):
        if isinstance(value, _Pairs):
            return _struct(value, how, earlier if isinstance(earlier, dict) else {})
        return earlier if value is None else _plain(value)  # null leaves a struct as it was
    if isinstance(how, list):
        if isinstance(value, list):
            return [_struct(item, how[0], {}) if isinstance(item, _Pairs) else _plain(item)
                    for item in value]
        return _plain(value)
    if how == _SCALAR and value is None:
        return earlier  # Go ignores null for a string, bool or number
    if how == _MAP and isinstance(value, _Pairs):
        merged = dict(earlier) if isinstance(earlier, dict) else {}
        merged.update(_plain(value))
        return merged
    return _plain(value)


def _plain(value: Any) -> Any:
    """Parsed JSON with objects as dicts (exact keys; a repeated key: the last one)."""
    if isinstance(value, str):
        return printable_message(value)
    if isinstance(value, _Pairs):
        return {printable_message(key): _plain(item) for key, item in value}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value

