"""Per-request output caps: `max_tokens` (OpenAI) and `options.num_predict` (Ollama).

A request is rewritten only where it must be, by splicing bytes: the top-level
value of the limiting key is replaced (or the key appended before the closing
brace), and every other byte of the body is kept, so key order, number
spellings (`1.0` stays `1.0`) and escapes are untouched. For Ollama the small
`options` object is the only thing parsed and re-encoded (stdlib `json`, which
keeps integers of any size exact and writes floats with `repr`, so `1.0` stays
`1.0`; orjson would turn an integer beyond 64 bits into a float).

Mode `clamp` rewrites a value above the cap to the cap; `reject` answers 400
instead. In both modes a request that sets no limit gets the cap added:
without it Ollama generates until the context is full. Negative values mean
"unlimited" to Ollama (-1, -2) and count as above the cap; so does 0 (and a
float Go truncates to 0): Ollama's runner stops at num_predict only when it is
above 0, and its OpenAI layer passes `max_tokens` on as num_predict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

import orjson

from ollamamq_fast.wire.sniff import Sniffed, array_items, key_text

# (start, end, replacement) in the original body; start == end inserts.
Edit = tuple[int, int, bytes]


class CapError(ValueError):
    """The request asks for more than its cap (reject mode) or names no usable limit (400)."""


@dataclass(frozen=True, slots=True)
class CapRule:
    """Where a route keeps its output limit."""

    keys: tuple[str, ...]  # top-level keys capped when present (OpenAI shapes)
    insert: str  # the key that must end up present ("" for Ollama's options)
    native: bool  # options.num_predict
    # Keys asking for several sequences, each up to the limit (vLLM's `n`, `best_of`):
    # the cap is shared among them.
    fanout: tuple[str, ...] = ()
    # A key whose list value is a batch, one sequence (or `n`) per item
    # (/v1/completions' `prompt`: strings or token lists; a list of token ids is one).
    batch: str = ""


CAP_RULES: Final[dict[bytes, CapRule]] = {
    b"/api/generate": CapRule((), "", True),
    b"/api/chat": CapRule((), "", True),
    # Every field an OpenAI-compatible server honours for the output length:
    # Ollama reads max_tokens, vLLM also max_completion_tokens, and llama.cpp's
    # n_predict overrides max_tokens.
    b"/v1/chat/completions": CapRule(("max_tokens", "max_completion_tokens", "n_predict"),
                                     "max_tokens", False, ("n", "best_of")),
    b"/v1/completions": CapRule(("max_tokens", "n_predict"), "max_tokens", False,
                                ("n", "best_of"), "prompt"),
    b"/v1/responses": CapRule(("max_output_tokens",), "max_output_tokens", False),
    b"/v1/messages": CapRule(("max_tokens",), "max_tokens", False),
}


def splice(body: bytes, edits: list[Edit]) -> bytes:
    """Apply non-overlapping edits to `body` (any order)."""
    out: list[bytes] = []
    pos = 0
    for start, end, data in sorted(edits, key=lambda e: (e[0], e[1])):
        out.append(body[pos:start])
        out.append(data)
        pos = end
    out.append(body[pos:])
    return b"".join(out)


def append_member(sn: Sniffed, key: str, value: bytes) -> Edit:
    """An edit adding `"key":value` as the object's last member."""
    member = b'"' + key.encode() + b'":' + value
    return (sn.close, sn.close, b"," + member if sn.members else member)


def parse_object(raw: bytes) -> dict[str, Any] | None:
    """A small JSON object (e.g. `options`) to read, or None when it is not an object."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return exact_object(raw)  # e.g. invalid UTF-8, which Go would replace
    return value if isinstance(value, dict) else None


def exact_object(raw: bytes) -> dict[str, Any] | None:
    """A small JSON object parsed for re-encoding: integers of any size stay exact."""
    try:
        value = json.loads(raw.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def encode_object(obj: dict[str, Any]) -> bytes:
    """Re-encode a parsed small object: key order kept, ints exact, `1.0` kept."""
    return json.dumps(obj, separators=(",", ":")).encode()


def number(raw: bytes, key: str) -> int | float | None:
    """A raw JSON number (None for null); CapError for anything else."""
    if raw == b"null":
        return None
    if b"-0123456789".find(raw[:1]) >= 0:
        try:
            return int(raw)
        except ValueError:
            try:
                return float(raw)
            except ValueError:
                pass
    raise CapError(f"{key} must be an integer, got {raw[:40].decode('utf-8', 'replace')}")


def _too_many(key: str, value: float, cap: int) -> str:
    if value < 1:
        return (f"{key} {value:g} (unlimited) exceeds this gateway's cap of {cap} tokens; "
                f"ask for at most {cap}")
    return f"{key} {value:g} exceeds this gateway's cap of {cap} tokens; ask for at most {cap}"


def sequences(body: bytes, sn: Sniffed, rule: CapRule) -> int:
    """How many sequences a server may generate for the request, each up to its limit.

    vLLM makes `n` choices (and samples `best_of`, at least `n`), each up to
    max_tokens. Its pydantic models read in lax mode (`"n": "4"` and `4.0` are 4),
    Go any case of the key: the largest value any reading may take counts. A
    value no server takes as a number is left for the server to refuse.
    """
    most = 1
    for key in rule.fanout:
        for _raw, start, end in sn.occurrences.get(key, ()):
            raw = body[start:end]
            if raw[:1] == b'"':
                raw = raw[1:-1].strip()
            try:
                value = float(raw)
            except ValueError:
                continue
            if value > most:
                most = int(value) if value < 2**62 else 2**62
    if rule.batch:
        prompts = 1
        for _raw, start, end in sn.occurrences.get(rule.batch, ()):
            count, first = array_items(body, start, end)
            if count > prompts and first in (0x22, 0x5B):  # strings or token lists
                prompts = count
        most = most * prompts
    return most


def cap_openai(body: bytes, sn: Sniffed, rule: CapRule, cap: int, reject: bool) -> list[Edit]:
    """Edits that bring an OpenAI-shaped request within `cap` (CapError in reject mode).

    A /v1 request may reach a Go server (Ollama: field names match in any case,
    the last duplicate wins) or an exact-name one (vLLM, llama.cpp: only the
    exact spelling counts). So every occurrence of a limiting field, in any
    spelling, is brought within the cap, and the exactly spelled `insert` key
    is added when missing, with the value a Go server would have read.
    """
    edits: list[Edit] = []
    capped = str(cap).encode()
    for key in rule.keys:
        for _raw, start, end in sn.occurrences.get(key, ()):
            value = number(body[start:end], key)
            if value is None or value < 1 or value > cap:
                if value is not None and reject:
                    raise CapError(_too_many(key, value, cap))
                edits.append((start, end, capped))
    seen = sn.occurrences.get(rule.insert, ())
    if not any(key_text(raw) == rule.insert for raw, _, _ in seen):
        # The smallest limit the client asked for in any field or spelling, if
        # within the cap, else the cap: what it wanted, and no more than allowed.
        asked = [v for v in (_limit(body, start, end) for key in rule.keys
                             for _, start, end in sn.occurrences.get(key, ()))
                 if v is not None and v <= cap]
        value_raw = b"%d" % min(asked) if asked else capped
        edits.append(append_member(sn, rule.insert, value_raw))
    return edits


def mirror_max_tokens(body: bytes, sn: Sniffed) -> Edit | None:
    """`max_tokens` added beside a `max_completion_tokens` that has none (no cap in force).

    Newer clients (LangChain's ChatOpenAI, recent openai SDKs) send only
    `max_completion_tokens`; servers that read only `max_tokens` (Ollama,
    llama-cpp-python) would then generate to the end of their context. Every
    server this gateway fronts accepts both, so the value is mirrored.
    """
    if any(key_text(raw) == "max_tokens" for raw, _, _ in sn.occurrences.get("max_tokens", ())):
        return None
    for raw, start, end in reversed(sn.occurrences.get("max_completion_tokens", ())):
        if key_text(raw) == "max_completion_tokens":
            value = _limit(body, start, end)
            return append_member(sn, "max_tokens", b"%d" % value) if value is not None else None
    return None


def _limit(body: bytes, start: int, end: int) -> int | None:
    """A usable output limit (a positive integer: 0 is none to Ollama) at body[start:end], else None."""
    try:
        value = number(body[start:end], "limit")
    except CapError:
        return None
    if value is None or value < 1 or value != int(value):
        return None
    return int(value)


def cap_native(
    body: bytes, sn: Sniffed, options: dict[str, Any] | None, cap: int, reject: bool
) -> list[Edit]:
    """Edits that bring `options.num_predict` within `cap` (CapError in reject mode).

    `options` is the parsed top-level `options` object (None when absent or null).
    """
    span = sn.spans.get("options")
    fresh = b'{"num_predict":%d}' % cap
    if span is None:
        return [append_member(sn, "options", fresh)]
    if options is None:
        if body[span[0] : span[1]] == b"null":
            return [(span[0], span[1], fresh)]
        raise CapError("options must be a JSON object")
    value = options.get("num_predict")
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CapError(f"options.num_predict must be an integer, got {value!r:.40}")
        if 1 <= value <= cap:  # Go truncates a float; below 1 is 0, no limit
            return []
        if reject:
            raise CapError(_too_many("options.num_predict", value, cap))
    rewritten = exact_object(body[span[0] : span[1]]) or dict(options)
    rewritten["num_predict"] = cap
    return [(span[0], span[1], encode_object(rewritten))]
