"""Hypothesis strategies for inference bodies full of the spellings decoders disagree on.

Keys are written exactly, in upper case, title case, random case, with some
characters as `\\uXXXX` escapes, or with the Kelvin sign / long s that Go
folds to `k` / `s`. Policy fields (`options`, `num_predict`, `max_tokens`,
`max_completion_tokens`, `n_predict`, `stream`, `stream_options`) are
repeated, nested objects hold duplicates too, and key order is shuffled. The
body is built as text, so duplicates and escapes reach the gateway as drawn.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

LIMITS = ["null", "0", "10", "50", "51", "100000", "-1"]
NATIVE_LIMITS = [*LIMITS, "1e9", "49.5"]
SPELLINGS = ["exact", "exact", "exact", "upper", "title", "random", "escaped", "fold-unicode"]


@st.composite
def spelled(draw: Any, key: str) -> str:
    """`key` as a JSON string literal in one of the spellings Go folds together."""
    how = draw(st.sampled_from(SPELLINGS))
    if how == "upper":
        text = json.dumps(key.upper())
    elif how == "title":
        text = json.dumps("_".join(p.capitalize() for p in key.split("_")))
    elif how == "random":
        flips = draw(st.lists(st.booleans(), min_size=len(key), max_size=len(key)))
        text = json.dumps("".join(c.upper() if f else c for c, f in zip(key, flips, strict=True)))
    elif how == "escaped":
        picks = draw(st.lists(st.booleans(), min_size=len(key), max_size=len(key)))
        text = '"' + "".join(f"\\u{ord(c):04x}" if p else c for c, p in zip(key, picks,
                                                                           strict=True)) + '"'
    elif how == "fold-unicode" and ("k" in key or "s" in key):
        text = '"' + key.replace("k", "\\u212a").replace("s", "\\u017f") + '"'
    else:
        text = json.dumps(key)
    return text


def obj(members: list[tuple[str, str]], sep: str = "") -> str:
    """A JSON object from already-encoded (key, value) texts."""
    return "{" + ("," + sep).join(f"{k}:{sep}{v}" for k, v in members) + "}"


@st.composite
def options(draw: Any) -> str:
    """Ollama's `options`: a map (exact inner keys), sometimes null, with duplicates."""
    if draw(st.integers(0, 9)) == 0:
        return "null"
    members = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(["num_predict", "num_predict", "temperature", "seed",
                                     "Num_Predict"]))
        if name in ("num_predict", "Num_Predict"):
            value = draw(st.sampled_from(NATIVE_LIMITS))
        elif name == "temperature":
            value = draw(st.sampled_from(["0", "0.7"]))
        else:
            value = "1"
        key = json.dumps(name)
        if draw(st.booleans()) and draw(st.booleans()):
            key = '"' + "".join(f"\\u{ord(c):04x}" for c in name) + '"'
        members.append((key, value))
    return obj(members)


@st.composite
def stream_options(draw: Any) -> str:
    """OpenAI's `stream_options` (a struct to Go: inner keys fold too)."""
    if draw(st.integers(0, 7)) == 0:
        return "null"
    members = [(draw(spelled("include_usage")), draw(st.sampled_from(["true", "false", "null"])))
               for _ in range(draw(st.integers(0, 2)))]
    return obj(members)


@st.composite
def messages(draw: Any) -> str:
    """A chat history whose message objects may repeat or re-spell keys."""
    members = [('"role"', '"user"'), ('"content"', '"hi"')]
    if draw(st.booleans()):
        members.append((draw(spelled("content")), draw(st.sampled_from(['"hi"', '"other"']))))
    order = draw(st.permutations(members))
    return "[" + obj(list(order)) + "]"


@st.composite
def inference_body(draw: Any, route: str, nonce: str) -> bytes:
    """A body for `route` with policy fields drawn to confuse a decoder."""
    native = route.startswith("/api/")
    members: list[tuple[str, str]] = [(draw(spelled("model")), '"fake"')]
    if route == "/api/generate":
        members.append(('"prompt"', '"hi"'))
    else:
        members.append(('"messages"', draw(messages())))
    for _ in range(draw(st.integers(0, 2))):
        members.append((draw(spelled("stream")), draw(st.sampled_from(["true", "false",
                                                                         "null"]))))
    if native:
        for _ in range(draw(st.integers(0, 3))):
            members.append((draw(spelled("options")), draw(options())))
    else:
        for _ in range(draw(st.integers(0, 3))):
            name = draw(st.sampled_from(["max_tokens", "max_tokens", "max_completion_tokens",
                                         "n_predict"]))
            members.append((draw(spelled(name)), draw(st.sampled_from(LIMITS))))
        for _ in range(draw(st.integers(0, 2))):
            members.append((draw(spelled("stream_options")), draw(stream_options())))
        if draw(st.booleans()):
            members.append(('"temperature"', "0"))
    members.append(('"x_nonce"', json.dumps(nonce)))
    order = draw(st.permutations(members))
    sep = draw(st.sampled_from(["", " ", "\n"]))
    return obj(list(order), sep).encode()
