"""Byte-level read of top-level JSON keys (`model`, `name`, `source`).

The gateway must route on the model without parsing the whole body
(bodies can be 50 MB of base64 images), yet must never be fooled
(docs/protocol-notes.md §7.3–7.5): the key may come last, after megabytes; nested
`"model"` keys and string contents that look like keys are decoys; keys and
values may use `\\u` escapes; keys match case-insensitively and the last
duplicate wins, exactly as Go's encoding/json (which Ollama uses) resolves them.

How it stays fast: strings are skipped with `bytes.find` (memchr speed), so
a 50 MB base64 string costs one call; only structural characters outside
strings are visited by a (C) regex search. Values of other keys are never
decoded.
"""

from __future__ import annotations

import json
import re
from typing import Final, NamedTuple

import orjson

from ollamamq_fast.wire.errors import printable_message

_QUOTE: Final = 0x22
_BACKSLASH: Final = 0x5C
_STRUCT: Final = re.compile(rb'["{}\[\]]')
_OPEN: Final = re.compile(rb"\s*\{\s*(\})?")
# Keys without escapes (nearly all) take the simple pattern; the general one
# handles `\u`-escaped keys.
_KEY: Final = re.compile(rb'"([^"\\]*)"\s*:\s*')
_KEY_ESCAPED: Final = re.compile(rb'"((?:[^"\\]|\\.)*)"\s*:\s*', re.DOTALL)
_SCALAR: Final = re.compile(rb"[^,}\]\s]+")
_SEP: Final = re.compile(rb"\s*([,}])\s*")
_wanted_memo: Final[dict[tuple[str, ...], dict[bytes, str]]] = {}


def _wanted(keys: tuple[str, ...]) -> dict[bytes, str]:
    wanted = _wanted_memo.get(keys)
    if wanted is None:
        wanted = _wanted_memo[keys] = {k.encode(): k for k in keys}
    return wanted


class SniffError(ValueError):
    """The body is not a JSON object the gateway can route on (answered with 400)."""


# Fast path: a small object with no escapes and no nesting (curl's and most
# generate bodies). One C-level regex proves the shape; with no backslashes a
# string cannot contain a quote, so every key/value match is a top-level pair.
_FAST_MAX: Final = 16 * 1024
# Bodies up to this size are decoded by latin1_text for substring searches.
TEXT_MAX: Final = 64 * 1024
_FLAT_SCALAR: Final = rb'(?:"[^"]*"|[-+.\w]+)'
_FLAT: Final = re.compile(
    rb'\s*\{\s*"[^"]*"\s*:\s*' + _FLAT_SCALAR
    + rb'(?:\s*,\s*"[^"]*"\s*:\s*' + _FLAT_SCALAR + rb')*\s*\}'
)
_FLAT_PAIR: Final = re.compile(rb'"([^"]*)"\s*:\s*(?:"([^"]*)"|([-+.\w]+))')
# Faster still, and for nested bodies too: the wanted key is the first member
# (the ollama client, curl, LangChain and openai >= 3 put `model` first) and no
# wanted key is written anywhere after it, in any ASCII case, and the body has
# no backslash: then a string cannot hold a quote, so a single `"model"` can
# only be that member. Go also folds two non-ASCII letters to ASCII ones (the
# Kelvin sign to k, the long s to s): a body with non-ASCII bytes takes the
# general path when a wanted key has either letter. Bytes after the member are
# not checked otherwise: a body broken further on goes to a backend serving
# that model, whose own Go decoder answers the 400 Ollama would (the same as a
# broken nested value after the general scan).
#
# The usual spellings (`{"model":"` and `{"model": "`, as JSON encoders write
# them) are recognised by a prefix compare; any other spacing, case or a null
# value by the pattern. Each bytes method or regex call costs about a
# thousand instructions, so the common case makes as few as it can.
_LEADING: Final = re.compile(rb'\s*\{\s*"([A-Za-z_]+)"\s*:\s*(?:"([^"]*)"|null)\s*[,}]')


class _Leading(NamedTuple):
    wanted: dict[bytes, str]
    prefixes: tuple[tuple[bytes, str], ...]  # the usual openings, and the key each names
    quoted: tuple[str, ...]  # each wanted key in quotes, lowercase
    fold_sensitive: bool  # a wanted key has a letter Go folds from a non-ASCII one


_leading_memo: Final[dict[tuple[str, ...], _Leading]] = {}


def _leading_for(keys: tuple[str, ...]) -> _Leading:
    found = _leading_memo.get(keys)
    if found is None:
        prefixes = tuple((b'{"' + k.encode() + sep + b'"', k)
                         for k in keys for sep in (b'":', b'": '))
        found = _leading_memo[keys] = _Leading(
            _wanted(keys), prefixes, tuple('"' + k.lower() + '"' for k in keys),
            any(c in k.lower() for k in keys for c in "ks"))
    return found


def _leading_fields(body: bytes, text: str, keys: tuple[str, ...]) -> dict[str, str] | None:
    """`sniff_fields` for a body whose first member is the only wanted key; else None.

    `text` is the body decoded as Latin-1 (byte for byte, the same indexes):
    compiled, its searches are direct calls where each bytes.find goes through
    Python's argument parsing. Its lower() folds only ASCII letters to ASCII
    ones, as bytes.lower() does (Latin-1 letters fold to Latin-1 letters, one
    character each). The caller has checked the body is small and has no
    backslash.
    """
    memo = _leading_for(keys)
    key = ""
    value: bytes | None = None
    after = 0  # where the first member's value ends
    for prefix, name in memo.prefixes:
        if body.startswith(prefix):
            at = len(prefix)
            end = text.find('"', at)
            if end < 0 or end + 1 >= len(body):
                return None
            c = body[end + 1]
            if c != 0x2C and c != 0x7D:  # ',' or '}' right after: else the pattern decides
                break
            key, value, after = name, body[at:end], end + 1
            break
    if not key:
        m = _LEADING.match(body)
        if m is None:
            return None
        raw_key = m[1]
        wanted = memo.wanted
        found = wanted.get(raw_key) or wanted.get(raw_key.lower())
        if found is None:
            return None
        key, value, after = found, m[2], m.end() - 1
    if not (body.endswith(b"}") or body.rstrip().endswith(b"}")):
        return None
    lowered = text.lower()
    for q in memo.quoted:
        if lowered.find(q, after) >= 0:
            return None
    if memo.fold_sensitive and not body.isascii():
        return None
    return {key: value.decode("utf-8", "replace")} if value is not None else {}


def latin1_text(body: bytes) -> str | None:
    """The body as Latin-1 text (the same bytes, the same indexes), None beyond TEXT_MAX.

    Compiled, `in` and find on a str are direct calls, where each bytes.find
    goes through Python's argument parsing (about 800 instructions). The
    admission decodes a body once for body_keys and the model sniffer; larger
    bodies are not copied for it.
    """
    return body.decode("latin-1") if len(body) <= TEXT_MAX else None


def sniff_fields(body: bytes, keys: tuple[str, ...], text: str | None = None) -> dict[str, str]:
    """Values of the wanted top-level string keys of a JSON object body.

    Keys are matched case-insensitively and the last occurrence wins (Go's
    rules). A `null` value is skipped: Go leaves a string field as it was
    (`{"model":"a","model":null}` is model "a"). A wanted key holding a
    non-string value raises SniffError, as Go's decoder rejects it.

    `text`, when given, is the body decoded as Latin-1 (a caller that has
    already decoded it saves the copy).
    """
    if len(body) <= _FAST_MAX:
        if text is None:
            text = body.decode("latin-1")
        if "\\" not in text:
            leading = _leading_fields(body, text, keys)
            if leading is not None:
                return leading
            flat = _FLAT.match(body)
            if flat is not None:
                return _flat_fields(body, flat.end(), _wanted(keys))
    return scanned_fields(body, keys)


def scanned_fields(body: bytes, keys: tuple[str, ...]) -> dict[str, str]:
    """`sniff_fields` by the general member scan alone (what the fast paths must agree with)."""
    wanted = _wanted(keys)
    members, _ = _members(body)
    found: dict[str, str] = {}
    for raw_key, plain, start, end in members:
        key = wanted.get(raw_key.lower()) if plain else _match_key(raw_key, wanted)
        if key is not None:
            _take(body, start, end, key, found)
    return found


def _members(body: bytes) -> tuple[list[tuple[bytes, bool, int, int]], int]:
    """The top-level members of a JSON object body, and its closing brace's index.

    Each member is (raw key, key is plain ASCII without escapes, value start,
    value end). Values are skipped, not decoded. Raises SniffError when the body
    is not an object or its top level is malformed; bytes after the closing
    brace are ignored, as Go's decoder ignores them.
    """
    m = _OPEN.match(body)
    if m is None:
        if not body.strip():
            raise SniffError("missing request body")
        raise SniffError("request body must be a JSON object")
    members: list[tuple[bytes, bool, int, int]] = []
    if m.group(1):  # '{}'
        return members, m.start(1)
    i = m.end()
    key_match = _KEY.match
    while True:
        km = key_match(body, i)
        if km is not None:
            raw_key = km.group(1)
            plain = raw_key.isascii()
        else:
            km = _KEY_ESCAPED.match(body, i)
            if km is None:
                raise SniffError("invalid JSON: expected a string key and ':'")
            raw_key = km.group(1)
            plain = False
        start = i = km.end()
        c = body[i] if i < len(body) else -1
        if c == _QUOTE:
            i = _string_end(body, i + 1) + 1
        elif c == 0x7B or c == 0x5B:  # '{' or '['
            i = _skip_container(body, i)
        else:
            sm = _SCALAR.match(body, i)
            if sm is None:
                raise SniffError("unexpected end of JSON input")
            i = sm.end()
        members.append((raw_key, plain, start, i))
        sep = _SEP.match(body, i)
        if sep is None:
            if i >= len(body.rstrip()):
                raise SniffError("unexpected end of JSON input")
            raise SniffError("invalid JSON: expected ',' or '}' after object value")
        if sep.group(1) == b"}":
            return members, sep.start(1)
        i = sep.end()


def _take(body: bytes, start: int, end: int, key: str, found: dict[str, str]) -> None:
    """Record a wanted key's value as Go would bind it to a string field."""
    c = body[start]
    if c == _QUOTE:
        found[key] = _decode_string(body[start + 1 : end - 1])
    elif c == 0x7B or c == 0x5B:
        raise SniffError(f"json: cannot unmarshal object into field {key} of type string")
    elif body[start:end] == b"null":
        pass  # Go leaves a string field as it was
    else:
        raise SniffError(
            f"json: cannot unmarshal {_kind(body[start:end])} into field {key} of type string"
        )


def _flat_fields(body: bytes, end: int, wanted: dict[bytes, str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for m in _FLAT_PAIR.finditer(body, 0, end):
        raw_key = m.group(1)
        key = wanted.get(raw_key.lower()) if raw_key.isascii() else _match_key(raw_key, wanted)
        if key is None:
            continue
        value = m.group(2)
        if value is not None:
            found[key] = value.decode("utf-8", "replace")
        elif m.group(3) == b"null":
            continue  # Go leaves a string field as it was
        else:
            raise SniffError(
                f"json: cannot unmarshal {_kind(m.group(3))} into field {key} of type string"
            )
    return found


def first_model(found: dict[str, str], keys: tuple[str, ...]) -> str:
    """Go's `cmp.Or(req.Model, req.Name)`: the first non-empty value in key order."""
    for key in keys:
        value = found.get(key)
        if value:
            return value
    return ""


def _string_end(body: bytes, start: int) -> int:
    """Index of the closing quote of a string whose content starts at `start`."""
    i = start
    while True:
        j = body.find(b'"', i)
        if j < 0:
            raise SniffError("unexpected end of JSON input")
        k = j - 1
        while k >= start and body[k] == _BACKSLASH:
            k -= 1
        if (j - 1 - k) % 2 == 0:  # an even run of backslashes escapes nothing
            return j
        i = j + 1


def _skip_container(body: bytes, i: int) -> int:
    """Index just past the object or array opening at `i`."""
    depth = 0
    pos = i
    search = _STRUCT.search
    while True:
        m = search(body, pos)
        if m is None:
            raise SniffError("unexpected end of JSON input")
        at = m.start()
        c = body[at]
        if c == _QUOTE:
            pos = _string_end(body, at + 1) + 1
        elif c == 0x7B or c == 0x5B:
            depth += 1
            pos = at + 1
        else:
            depth -= 1
            pos = at + 1
            if depth == 0:
                return pos


def go_fold(key: str) -> str:
    """A key as Go's decoder compares it with a field's (lowercase ASCII) name.

    Go folds by Unicode simple folding: the only non-ASCII letters that fold
    to ASCII ones are the Kelvin sign (to k, which lower() does) and the long
    s (to s). Not casefold(): its full folding makes `ß` "ss" and the `ﬅ`
    ligature "st", which Go never matches.
    """
    return key.lower().replace("\u017f", "s")


def _match_key(raw: bytes, wanted: dict[bytes, str]) -> str | None:
    """The wanted key name this raw key selects, under Go's case folding."""
    if raw.find(_BACKSLASH) < 0 and raw.isascii():
        return wanted.get(raw.lower())
    return wanted.get(go_fold(_decode_string(raw)).encode("utf-8", "surrogatepass"))


def _decode_string(raw: bytes) -> str:
    """Decode JSON string content; invalid UTF-8 becomes U+FFFD, as in Go."""
    if raw.find(_BACKSLASH) < 0:
        return raw.decode("utf-8", "replace")
    try:
        value = orjson.loads(b'"' + raw + b'"')
    except orjson.JSONDecodeError:
        # orjson refuses a lone surrogate escape (`\ud800`); Go reads it as
        # U+FFFD, and so does this: json.loads keeps it as a lone surrogate,
        # which no UTF-8 writer (the access log, SQLite) could encode.
        try:
            value = json.loads('"' + raw.decode("utf-8", "replace") + '"')
        except json.JSONDecodeError as exc:
            raise SniffError(f"invalid JSON string: {exc.msg}") from None
        return printable_message(str(value))  # json.loads pairs the valid ones
    return str(value)


# Go folds these non-ASCII letters to ASCII ones (go_fold): the Kelvin sign, the long s.
_FOLDS_TO: Final = {"k": "\u212a", "s": "\u017f"}
_spelling_memo: Final[dict[str, re.Pattern[bytes]]] = {}


def any_spelling(key: str) -> re.Pattern[bytes]:
    """`"key"` as a JSON string in every spelling Go matches: any case, any letter
    `\\u`-escaped (hex digits in any case), the letters Go folds from non-ASCII ones."""
    found = _spelling_memo.get(key)
    if found is None:
        parts = [b'"']
        for c in key:
            forms = {c.lower(), c.upper(), *([_FOLDS_TO[c]] if c in _FOLDS_TO else [])}
            alts = []
            for form in sorted(forms):
                hexes = b"".join(b"[" + bytes([h]) + bytes([h]).upper() + b"]"
                                 if h > 0x39 else bytes([h]) for h in b"%04x" % ord(form))
                alts += [re.escape(form.encode()), rb"\\u" + hexes]
            parts.append(b"(?:" + b"|".join(alts) + b")")
        parts.append(b'"')
        found = _spelling_memo[key] = re.compile(b"".join(parts))
    return found


def exact_disagrees(body: bytes, keys: tuple[str, ...], found: dict[str, str]) -> str:
    """The first of `keys` an exact-name server reads otherwise than Go's `found` ("" if none).

    A /v1 request may reach Go (Ollama: a key in any case, the last non-null
    one wins, `found`) or an exact-name server (vLLM and pydantic, llama.cpp's
    nlohmann: only the exact spelling, escapes resolved, the last duplicate
    winning, `null` as no value). The model must be the same to both, or the
    gateway would route and bill one model while the server runs another.

    One regex search when the key is written once, exactly (every request
    but odd ones); otherwise the top level is scanned again.
    """
    odd = False
    for key in keys:
        spellings = any_spelling(key).finditer(body)
        first = next(spellings, None)
        if first is not None and (first.group() != b'"' + key.encode() + b'"'
                                  or next(spellings, None) is not None):
            odd = True
            break
    if not odd:
        return ""
    wanted = _wanted(keys)
    exact: dict[str, str | None] = {}
    members, _ = _members(body)
    for raw_key, is_plain, start, end in members:
        name: str | None
        if is_plain:
            name = wanted.get(raw_key)  # the wanted names are spelled exactly
        else:
            text = _decode_string(raw_key)
            name = text if text in keys else None
        if name is not None:
            exact[name] = (_decode_string(body[start + 1 : end - 1])
                           if body[start] == _QUOTE else None)
    for key in keys:
        if exact.get(key) != found.get(key):
            return key
    return ""


def key_text(raw: bytes) -> str:
    """A member's key as a server decodes it (escapes resolved), for exact-name matching."""
    return _decode_string(raw)


def _kind(scalar: bytes) -> str:
    if scalar in (b"true", b"false"):
        return "bool"
    return "number"


def first_item(body: bytes, key: str) -> bytes:
    """Raw bytes of the first element of the top-level array `key` (b"" if none).

    Used for conversation affinity: the first message of a chat stays the same
    for every turn of that conversation, so its hash picks the same backend.
    """
    try:
        members, _ = _members(body)
    except SniffError:
        return b""
    wanted = _wanted((key,))
    value = b""
    for raw_key, _plain, start, end in members:
        if _match_key(raw_key, wanted) is not None:
            value = body[start:end]  # the last duplicate wins, as everywhere
    if not value.startswith(b"["):
        return b""
    j = 1
    while j < len(value) and value[j] in b" \t\r\n":
        j += 1
    if j >= len(value) or value[j] == 0x5D:
        return b""
    if value[j] in (0x7B, 0x5B):
        return value[j : _skip_container(value, j)]
    if value[j] == _QUOTE:
        return value[j : _string_end(value, j + 1) + 1]
    return b""


_WS: Final = re.compile(rb"[ \t\r\n]*")


def array_items(body: bytes, start: int, end: int) -> tuple[int, int]:
    """(number of items, first byte of the first item) of the array at body[start:end].

    (0, 0) when the value is not an array or is empty. Items are skipped as the
    member scan skips values (strings with a memchr), never decoded; the count
    stops where the array is broken (its server refuses it).
    """
    if body[start : start + 1] != b"[":
        return 0, 0
    ws = _WS.match
    m = ws(body, start + 1)
    i = m.end() if m is not None else start + 1
    if i >= end or body[i] == 0x5D:
        return 0, 0
    first = body[i]
    count = 0
    try:
        while i < end:
            c = body[i]
            if c == _QUOTE:
                i = _string_end(body, i + 1) + 1
            elif c == 0x7B or c == 0x5B:
                i = _skip_container(body, i)
            else:
                sm = _SCALAR.match(body, i)
                if sm is None:
                    break
                i = sm.end()
            count += 1
            m = ws(body, i)
            i = m.end() if m is not None else i
            if i >= end or body[i] != 0x2C:  # ','
                break
            m = ws(body, i + 1)
            i = m.end() if m is not None else i + 1
    except SniffError:
        pass
    return count, first


def duplicate_members(body: bytes) -> bool:
    """Whether the body's top level names a key twice, up to Go's case folding."""
    members, _ = _members(body)
    seen: set[bytes] = set()
    for raw_key, plain, _start, _end in members:
        key = raw_key.lower() if plain else _decode_string(raw_key).casefold().encode()
        if key in seen:
            return True
        seen.add(key)
    return False


class Sniffed(NamedTuple):
    """What `sniff_spans` read from a body's top level."""

    found: dict[str, str]  # wanted string keys, decoded (as `sniff_fields` returns)
    spans: dict[str, tuple[int, int]]  # raw keys: byte span of the value (null included)
    close: int  # index of the object's closing brace
    members: int  # number of top-level members
    # Raw keys: every occurrence, in body order, as (key as spelled, start, end).
    # A Go server reads all case variants (the last wins, objects merge); an
    # exact-name server reads only the exact spelling: the policy needs both.
    occurrences: dict[str, list[tuple[bytes, int, int]]]


def sniff_spans(
    body: bytes, string_keys: tuple[str, ...], raw_keys: tuple[str, ...]
) -> Sniffed:
    """`sniff_fields` plus the raw byte spans of other top-level values, in one pass.

    Used by the usage policy (max_tokens caps, cacheability, stream usage),
    which needs a few top-level values and the place to insert a key, without
    parsing the body. Same key rules as `sniff_fields`: case-insensitive, the
    last duplicate wins (`spans`); `occurrences` keeps every spelling.
    Raises SniffError as `sniff_fields` does.
    """
    wanted = _wanted(string_keys)
    raw = _wanted(raw_keys)
    found: dict[str, str] = {}
    spans: dict[str, tuple[int, int]] = {}
    occurrences: dict[str, list[tuple[bytes, int, int]]] = {}
    members, close = _members(body)
    for raw_key, plain, start, end in members:
        lowered = raw_key.lower()
        key = wanted.get(lowered) if plain else _match_key(raw_key, wanted)
        if key is not None:
            _take(body, start, end, key, found)
        rkey = raw.get(lowered) if plain else _match_key(raw_key, raw)
        if rkey is not None:
            spans[rkey] = (start, end)
            seen = occurrences.get(rkey)
            if seen is None:
                occurrences[rkey] = [(raw_key, start, end)]
            else:
                seen.append((raw_key, start, end))
    return Sniffed(found, spans, close, len(members), occurrences)
