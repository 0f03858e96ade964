"""What a backend reads from a JSON body, modelled independently of the gateway.

Two readings:
- Go's `encoding/json` as Ollama uses it (PROTOCOL.md §1): only the first
  JSON value counts; a key binds to a struct field when it equals the field's
  name case-insensitively (`bytes.EqualFold`, where the Kelvin sign folds to
  `k` and the long s to `s`); later duplicates win for scalars, objects
  decoded into a map are merged into the map already there, and `null` resets
  a map or pointer. Map keys (inside `options`) match exactly.
- An exact reader (Python servers, llama.cpp): exact key names, last
  duplicate wins.
"""

from __future__ import annotations

import json
from typing import Any

Pairs = list[tuple[str, Any]]


def go_fold(name: str) -> str:
    """Go's case folding of a JSON object key (`foldName`)."""
    out = []
    for ch in name:
        if ch < "\x80":
            out.append(ch.upper())
        else:
            folded = ch.lower().upper()
            out.append(folded if len(folded) == 1 else ch)
    return "".join(out)


def first_value(body: bytes) -> Any:
    """The first JSON value of `body` with every object as a list of pairs, or None."""
    try:
        text = body.decode("utf-8", "replace")
        value, _ = json.JSONDecoder(object_pairs_hook=list).raw_decode(text.lstrip(" \t\r\n"))
    except ValueError:
        return None
    return value


def go_field(pairs: Pairs, name: str, pointer: bool = True) -> tuple[bool, Any]:
    """The value Go binds to the scalar field `name`: (present, value), later wins.

    `null` resets a pointer field (`*int`) and leaves a plain one (`bool`) as it was.
    """
    want = go_fold(name)
    found, value = False, None
    for key, item in pairs:
        if item is None and not pointer:
            continue
        if key == name or go_fold(key) == want:
            found, value = True, item
    return found, value


def go_map_field(pairs: Pairs, name: str) -> dict[str, Any] | None:
    """The map Go decodes into the field `name` (merged over duplicates), or None."""
    want = go_fold(name)
    merged: dict[str, Any] | None = None
    for key, item in pairs:
        if key != name and go_fold(key) != want:
            continue
        if item is None:
            merged = None
        elif isinstance(item, list) and all(isinstance(p, tuple) for p in item):
            merged = merged if merged is not None else {}
            for k, v in item:
                merged[k] = v
        else:
            # A non-object value is a decode error in Go: the request fails.
            raise ValueError(f"{name} is not an object")
    return merged


def exact_field(pairs: Pairs, name: str) -> tuple[bool, Any]:
    """The value an exact, last-wins reader sees for `name`."""
    found, value = False, None
    for key, item in pairs:
        if key == name:
            found, value = True, item
    return found, value


def within(value: Any, cap: int) -> bool:
    """Whether a token limit is a number between 1 and `cap`.

    Not 0: Ollama's runner stops at num_predict only when it is above 0, so 0
    (and a float Go truncates to 0) means no limit at all, as a negative one does.
    """
    return (not isinstance(value, bool) and isinstance(value, int | float)
            and 1 <= value <= cap)


def native_cap_holds(body: bytes, cap: int) -> tuple[bool, str]:
    """Go's reading of an /api/chat or /api/generate body: options.num_predict <= cap."""
    top = first_value(body)
    if not isinstance(top, list):
        return True, "not an object (Ollama answers 400)"
    try:
        options = go_map_field(top, "options")
    except ValueError:
        return True, "options not an object (Ollama answers 400)"
    value = (options or {}).get("num_predict")
    if within(value, cap):
        return True, ""
    return False, f"Go reads options.num_predict = {value!r} (cap {cap})"


V1_FIELDS_EXACT = ("max_tokens", "max_completion_tokens", "n_predict")


def v1_cap_holds_go(body: bytes, cap: int) -> tuple[bool, str]:
    """Ollama's /v1 reading (Go, case-insensitive): the field max_tokens is a number <= cap."""
    top = first_value(body)
    if not isinstance(top, list):
        return True, "not an object"
    present, value = go_field(top, "max_tokens")
    if not within(value, cap):
        return False, f"Go reads max_tokens = {value!r} (present={present}, cap {cap})"
    return True, ""


def v1_cap_holds_exact(body: bytes, cap: int) -> tuple[bool, str]:
    """An exact reader (vLLM, llama.cpp): max_tokens present and <= cap, and every
    other limit such a server honours, when present, <= cap too."""
    top = first_value(body)
    if not isinstance(top, list):
        return True, "not an object"
    for name in V1_FIELDS_EXACT:
        present, value = exact_field(top, name)
        if (present or name == "max_tokens") and not within(value, cap):
            return False, f"an exact reader sees {name} = {value!r} (cap {cap})"
    return True, ""


def v1_cap_holds(body: bytes, cap: int) -> tuple[bool, str]:
    """Both readings of a /v1 body keep the output within `cap`."""
    ok, why = v1_cap_holds_go(body, cap)
    return (ok, why) if not ok else v1_cap_holds_exact(body, cap)


def has_duplicate_keys(body: bytes) -> bool:
    """Whether any object in the first JSON value repeats a key, exactly or by Go's folding."""
    def walk(value: Any) -> bool:
        if isinstance(value, list) and value and all(isinstance(p, tuple) for p in value):
            folded = [go_fold(k) for k, _ in value]
            if len(set(folded)) != len(folded):
                return True
            return any(walk(v) for _, v in value)
        if isinstance(value, list):
            return any(walk(v) for v in value)
        return False

    return walk(first_value(body))


def go_struct_field(pairs: Pairs, name: str) -> dict[str, Any] | None:
    """A struct-pointer field (`stream_options`): merged over duplicates, inner keys folded."""
    merged: dict[str, Any] | None = None
    want = go_fold(name)
    for key, item in pairs:
        if go_fold(key) != want:
            continue
        if item is None:
            merged = None
        elif isinstance(item, list) and all(isinstance(p, tuple) for p in item):
            merged = merged if merged is not None else {}
            for k, v in item:
                if v is not None:  # null leaves a bool field as it was
                    merged[go_fold(k)] = v
        else:
            raise ValueError(f"{name} is not an object")
    return merged


def v1_usage_holds(body: bytes) -> tuple[bool, str]:
    """When Go reads a streamed /v1 request, it also reads include_usage true.

    The gateway counts a stream's tokens from the usage chunk it asks for; a
    stream the backend runs without it is a stream nobody pays for.
    """
    top = first_value(body)
    if not isinstance(top, list):
        return True, "not an object"
    _, stream = go_field(top, "stream", pointer=False)
    if stream is not True:
        return True, ""
    try:
        options = go_struct_field(top, "stream_options")
    except ValueError:
        return True, "stream_options not an object (Ollama answers 400)"
    if (options or {}).get(go_fold("include_usage")) is True:
        return True, ""
    return False, f"Go streams with stream_options = {options!r}: no usage, tokens not counted"


def v1_usage_holds_exact(body: bytes) -> tuple[bool, str]:
    """An exact reader that streams also reads stream_options.include_usage true."""
    top = first_value(body)
    if not isinstance(top, list):
        return True, "not an object"
    _, stream = exact_field(top, "stream")
    if stream is not True:
        return True, ""
    _, options = exact_field(top, "stream_options")
    if isinstance(options, list) and exact_field(options, "include_usage") == (True, True):
        return True, ""
    return False, f"an exact reader streams with stream_options = {options!r}: no usage"


def capped(value: Any, cap: int) -> Any:
    """A token limit as it ends up under a clamping cap (absent / unlimited -> cap)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return cap if value is None else value
    return cap if value < 0 or value > cap else value


def go_view(body: bytes, native: bool, cap: int) -> Any:
    """What Ollama's Go decoder takes from a body, as a comparable value (None: a 400)."""
    top = first_value(body)
    if not isinstance(top, list):
        return None
    try:
        view: dict[str, Any] = {}
        for name in ("model", "prompt", "temperature"):
            # A string field (model) keeps its value through a later null.
            view[name] = go_field(top, name, pointer=name != "model")[1]
        view["stream"] = go_field(top, "stream", pointer=native)[1]
        messages = go_field(top, "messages")[1]
        if isinstance(messages, list):
            view["messages"] = [
                {f: go_field(m, f)[1] for f in ("role", "content", "images")}
                if isinstance(m, list) else m for m in messages]
        if native:
            opts = dict(go_map_field(top, "options") or {})
            opts["num_predict"] = capped(opts.get("num_predict"), cap)
            view["options"] = sorted(opts.items())
        else:
            view["max_tokens"] = capped(go_field(top, "max_tokens")[1], cap)
            so = go_struct_field(top, "stream_options")
            view["stream_options"] = sorted(so.items()) if so is not None else None
    except ValueError:
        return None
    return view


def v1_model_holds(body: bytes, model: str | None = None) -> tuple[bool, str]:
    """Go (Ollama's /v1) and an exact reader (vLLM, llama.cpp) both run one model
    (`model`, the one the gateway routed and billed, when given): an exact reader
    takes only the exact key (the last one, a null as none), Go any case variant
    (the last non-null one)."""
    top = first_value(body)
    if not isinstance(top, list):
        return True, "not an object"
    go = go_field(top, "model", pointer=False)[1]
    exact = exact_field(top, "model")[1]
    if go == exact and (model is None or go == model):
        return True, ""
    return False, f"Go reads model {go!r}, an exact reader {exact!r}; the gateway routed {model!r}"
