"""What the fake model "says": token plans, tool calls, JSON output, embeddings, show data."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import struct
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, overload

from .gojson import dumps
from .models import ModelEntry

# A fixed vocabulary that reads as prose when walked in order.
WORDS: tuple[str, ...] = (
    "the", "sky", "appears", "blue", "because", "of", "a", "process", "called", "Rayleigh",
    "scattering", "when", "sunlight", "enters", "atmosphere", "it", "collides", "with", "gas", "molecules",
    "shorter", "wavelengths", "scatter", "more", "than", "longer", "ones", "so", "we", "see",
    "light", "coming", "from", "all", "directions", "in", "daytime", "sunsets", "look", "red",
    "orange", "since", "path", "through", "air", "is", "much", "and", "most", "has",
    "been", "scattered", "away", "before", "reaching", "our", "eyes", "however,", "clouds", "stay",
    "white", "droplets", "are", "large", "enough", "to", "every", "color", "equally", "this",
    "effect", "also", "explains", "why", "distant", "mountains", "seem", "hazy", "R&D", "teams",
    "measure", "it", "precisely", "using", "spectrometers", "<ok>", "café", "models", "predict", "patterns",
    "well.", "In", "short,", "physics", "makes", "the", "world", "colorful", "every", "day.",
    "indeed",
)
_SPACED: tuple[str, ...] = tuple(" " + w for w in WORDS)
_FIRST: tuple[str, ...] = tuple(w[:1].upper() + w[1:] for w in WORDS)

# 31 words (prime) for `thinking` output.
THINK_WORDS: tuple[str, ...] = (
    "Let", "me", "think", "about", "this", "carefully", "first", "the", "user", "wants",
    "a", "clear", "answer", "so", "I", "should", "recall", "the", "key", "facts",
    "then", "check", "each", "step", "and", "summarize", "it", "briefly", "okay", "now",
    "done",
)
_THINK_SPACED: tuple[str, ...] = tuple(" " + w for w in THINK_WORDS)

# Template overhead a chat template adds to every prompt (llama3.2 gives 26 tokens for a short question).
PROMPT_OVERHEAD_TOKENS = 20


def _seed_pair(text: str, seed: int) -> tuple[int, int]:
    """Two stable integers from the prompt and seed (Python's hash() is randomized)."""
    digest = hashlib.blake2b(f"{seed}\0{text}".encode("utf-8", "replace"), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


class Walk(Sequence[str]):
    """Tokens of a walk over a word list, made on demand: a 10M-token answer costs no memory."""

    __slots__ = ("_count", "_first", "_spaced", "_start")

    def __init__(self, first: tuple[str, ...], spaced: tuple[str, ...], start: int, count: int) -> None:
        self._first = first
        self._spaced = spaced
        self._start = start
        self._count = max(0, count)

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        """Token i is the word after the start, with a space; the very first is capitalized."""
        if not isinstance(index, slice):
            if 0 < index < self._count:
                return self._spaced[(self._start + index) % len(self._spaced)]
            if index < 0:
                index += self._count
            if not 0 <= index < self._count:
                raise IndexError(index)
            position = (self._start + index) % len(self._spaced)
            return self._first[position] if index == 0 else self._spaced[position]
        lo, hi, step = index.indices(self._count)
        if step != 1:
            return [self[i] for i in range(lo, hi, step)]
        if hi <= lo:
            return []
        size = len(self._spaced)
        begin = (self._start + lo) % size
        # Enough repetitions of the ring to cover the slice, then one C-level slice.
        ring = self._spaced * ((begin + hi - lo) // size + 1)
        out = list(ring[begin : begin + hi - lo])
        if lo == 0:
            out[0] = self._first[self._start % size]
        return out


def word_tokens(text: str, seed: int, count: int) -> Walk:
    """`count` plausible tokens, deterministic for (text, seed)."""
    first, _ = _seed_pair(text, seed)
    # Walking the list in order reads like (odd) prose; the start depends on the prompt.
    return Walk(_FIRST, _SPACED, first % len(WORDS), count)


def think_tokens(text: str, seed: int, count: int) -> Walk:
    """Reasoning tokens for `think`, deterministic like word_tokens."""
    first, _ = _seed_pair(text, seed + 1)
    return Walk(THINK_WORDS, _THINK_SPACED, first % len(THINK_WORDS), count)


def estimate_tokens(text: str) -> int:
    """Rough tokenizer: about four characters per token."""
    return max(1, (len(text) + 3) // 4)


def token_budget(default: int, header: str | None, num_predict: Any) -> tuple[int, str]:
    """Tokens to generate and the done_reason: X-Sim-Tokens sets the natural length, num_predict caps it."""
    count = default
    if header is not None:
        try:
            count = max(0, int(header.strip()))
        except ValueError:
            pass
    if isinstance(num_predict, int) and not isinstance(num_predict, bool) and 0 <= num_predict < count:
        return num_predict, "length"
    return count, "stop"


_PLACE_RE = re.compile(r"\b(?:in|at|for) ([A-Z][A-Za-z-]+)")


def _string_for(name: str, prompt: str = "") -> str:
    """A believable string argument for a property name (a place named in the prompt wins)."""
    lowered = name.lower()
    if lowered in ("city", "location", "place", "town"):
        found = _PLACE_RE.search(prompt)
        return found.group(1) if found else "Tokyo"
    if lowered in ("unit", "units", "format"):
        return "celsius"
    return "sim"


def value_for(name: str, schema: Any, depth: int = 0, prompt: str = "") -> Any:
    """A value that satisfies a (simple) JSON Schema."""
    if not isinstance(schema, dict) or depth > 6:
        return _string_for(name, prompt)
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "integer":
        return 1
    if kind == "number":
        return 1.5
    if kind == "boolean":
        return True
    if kind == "array":
        items = schema.get("items")
        return [value_for(name, items, depth + 1, prompt)] if isinstance(items, dict) else []
    if kind == "object" or "properties" in schema:
        return object_for(schema, depth + 1, prompt)
    return _string_for(name, prompt)


def object_for(schema: Any, depth: int = 0, prompt: str = "") -> dict[str, Any]:
    """An object with the schema's required properties (all of them if none are required)."""
    if not isinstance(schema, dict):
        return {}
    props = schema.get("properties")
    if not isinstance(props, dict):
        return {}
    required = schema.get("required")
    wanted = set(required) if isinstance(required, list) and required else set(props)
    return {key: value_for(key, sub, depth, prompt) for key, sub in props.items() if key in wanted}


_TOOL_WORD_RE = re.compile(r"\btools?\b")


def pick_tool(tools: Any, prompt: str) -> dict[str, Any] | None:
    """Sim trigger: call a tool whose name the user's last message mentions, or the first tool if it says "tool"."""
    if not isinstance(tools, list):
        return None
    funcs: list[dict[str, Any]] = [
        t["function"] for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)
    ]
    funcs = [f for f in funcs if isinstance(f.get("name"), str) and f["name"]]
    if not funcs:
        return None
    lowered = prompt.lower()
    for func in funcs:
        if func["name"].lower() in lowered:
            return func
    if _TOOL_WORD_RE.search(lowered):
        return funcs[0]
    return None


def tool_call(func: dict[str, Any], prompt: str, seed: int) -> dict[str, Any]:
    """A native tool call (object arguments) for `func`."""
    first, _ = _seed_pair(prompt, seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    ident = "".join(alphabet[(first >> (5 * i)) % len(alphabet)] for i in range(8))
    return {
        "id": "call_" + ident,
        "function": {"index": 0, "name": func["name"], "arguments": object_for(func.get("parameters"), 0, prompt)},
    }


def format_pieces(fmt: Any, words: list[str]) -> list[str] | None:
    """For `format`, valid JSON text cut into len(words) pieces; None when no format applies."""
    if fmt == "json":
        text = json.dumps({"response": "".join(words).strip()}, ensure_ascii=False)
    elif isinstance(fmt, dict):
        text = json.dumps(object_for(fmt), ensure_ascii=False)
    else:
        return None
    count = max(1, min(len(words), len(text)))
    size, extra = divmod(len(text), count)
    pieces: list[str] = []
    pos = 0
    for i in range(count):
        step = size + (1 if i < extra else 0)
        pieces.append(text[pos : pos + step])
        pos += step
    return pieces


class Plan:
    """Everything one generation will emit, decided up front; never mutated (plans are cached)."""

    __slots__ = (
        "_text", "_text_json", "_thought", "_thought_json", "content", "done_reason", "eval_count",
        "prompt_tokens", "reason_json", "steps", "thinking", "tool_calls",
    )

    def __init__(
        self,
        thinking: Sequence[str],
        content: Sequence[str],
        tool_calls: list[dict[str, Any]] | None,
        done_reason: str,
        prompt_tokens: int,
    ) -> None:
        self.thinking = thinking
        self.content = content
        self.tool_calls = tool_calls
        self.done_reason = done_reason
        self.prompt_tokens = prompt_tokens
        # Generated tokens, counting thinking and a tool call, as Ollama's eval_count does.
        self.eval_count = len(thinking) + len(content) + (1 if tool_calls else 0)
        # Paced token steps before the final `done` chunk.
        self.steps = self.eval_count
        self.reason_json = dumps(done_reason)
        # The joined texts are only needed by non-stream answers: built on first use.
        self._text: str | None = None
        self._text_json: bytes | None = None
        self._thought: str | None = None
        self._thought_json: bytes | None = None

    @property
    def text(self) -> str:
        """The whole answer, as a non-streaming response carries it."""
        if self._text is None:
            self._text = "".join(self.content[0 : len(self.content)])
        return self._text

    @property
    def text_json(self) -> bytes:
        """`text` as an encoded JSON string."""
        if self._text_json is None:
            self._text_json = dumps(self.text)
        return self._text_json

    @property
    def thought(self) -> str:
        """The whole reasoning text."""
        if self._thought is None:
            self._thought = "".join(self.thinking[0 : len(self.thinking)])
        return self._thought

    @property
    def thought_json(self) -> bytes:
        """`thought` as an encoded JSON string."""
        if self._thought_json is None:
            self._thought_json = dumps(self.thought)
        return self._thought_json


def make_plan(
    prompt: str,
    seed: int,
    count: int,
    done_reason: str,
    think: bool,
    fmt: Any = None,
    tool: dict[str, Any] | None = None,
) -> Plan:
    """Decide the tokens of one answer (thinking first, then content or a tool call)."""
    if tool is None and fmt is None:
        if count <= PLAN_CACHE_MAX_TOKENS:
            return _text_plan(prompt, seed, count, done_reason, think)
        return _build_text_plan(prompt, seed, count, done_reason, think)
    thinking = think_tokens(prompt, seed, max(1, count // 4)) if think else ()
    prompt_tokens = estimate_tokens(prompt) + PROMPT_OVERHEAD_TOKENS
    if tool is not None:
        return Plan(thinking, (), [tool_call(tool, prompt, seed)], "stop", prompt_tokens)
    words = word_tokens(prompt, seed, count)
    pieces = format_pieces(fmt, words[0:count]) if count else None
    return Plan(thinking, words if pieces is None else pieces, None, done_reason, prompt_tokens)


def _build_text_plan(prompt: str, seed: int, count: int, done_reason: str, think: bool) -> Plan:
    """A plain-text plan."""
    thinking = think_tokens(prompt, seed, max(1, count // 4)) if think else ()
    prompt_tokens = estimate_tokens(prompt) + PROMPT_OVERHEAD_TOKENS
    return Plan(thinking, word_tokens(prompt, seed, count), None, done_reason, prompt_tokens)


# Benchmarks repeat the same small requests: cache their plans (and the joined
# text a non-stream answer needs), but never keep huge ones alive.
PLAN_CACHE_MAX_TOKENS = 4096
_text_plan = lru_cache(maxsize=4096)(_build_text_plan)


def empty_plan(done_reason: str) -> Plan:
    """No prompt, no tokens (the load answer of /v1/completions with an empty prompt)."""
    return Plan((), (), None, done_reason, 0)


def context_tokens(count: int) -> tuple[int, ...]:
    """Token ids for generate's deprecated `context` array."""
    return tuple((i * 7919 + 128) % 128000 for i in range(count))


@lru_cache(maxsize=2048)
def embedding(key: str, text: str, dim: int) -> tuple[float, ...]:
    """A unit vector derived from a hash of (model, text): same input, same vector."""
    raw = hashlib.shake_256(f"{key}\0{text}".encode("utf-8", "replace")).digest(dim * 2)
    values = struct.unpack(f"<{dim}h", raw)
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return tuple(round(v / norm, 7) for v in values)


def truncate_dims(vector: tuple[float, ...], dims: Any) -> list[float]:
    """/api/embed `dimensions`: cut and renormalize like Ollama."""
    if isinstance(dims, int) and not isinstance(dims, bool) and 0 < dims < len(vector):
        cut = vector[:dims]
        norm = math.sqrt(sum(v * v for v in cut)) or 1.0
        return [round(v / norm, 7) for v in cut]
    return list(vector)


def float32_base64(vector: list[float]) -> str:
    """/v1/embeddings encoding_format=base64: little-endian float32, std base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


_TEMPLATES = {
    "llama": (
        (
            "<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>"
            "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    ),
    "qwen2": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        ["<|im_start|>", "<|im_end|>"],
    ),
}
# Large enough that verbose show is a big, chunked body, small enough to build fast.
VERBOSE_VOCAB = 32000


def show_body(entry: ModelEntry, verbose: bool, modified_at: str) -> dict[str, Any]:
    """The /api/show response object, in api.ShowResponse field order."""
    fam = entry.family
    arch = fam.family
    template, stops = _TEMPLATES.get(arch, ("{{ .Prompt }}", []))
    if entry.template:
        template = entry.template
    params: dict[str, Any] = {"stop": stops} if stops else {"num_ctx": fam.context_length}
    params.update(entry.parameters)
    param_lines = []
    for key, value in params.items():
        for item in value if isinstance(value, list) else [value]:
            shown = json.dumps(item) if isinstance(item, str) else str(item)
            param_lines.append(f"{key:<30} {shown}")
    display = entry.name.display()
    modelfile = (
        '# Modelfile generated by "ollama show"\n'
        "# To build a new Modelfile based on this, replace FROM with:\n"
        f"# FROM {display}\n\n"
        f"FROM /root/.ollama/models/blobs/sha256-{entry.digest}\n"
        f'TEMPLATE """{template}"""\n'
        + "".join(f"PARAMETER {k} {json.dumps(v) if isinstance(v, str) else v}\n" for k, vs in params.items()
                  for v in (vs if isinstance(vs, list) else [vs]))
    )
    tokens: list[str] = [f"tok{i}" for i in range(VERBOSE_VOCAB)] + stops if verbose else []
    model_info: dict[str, Any] = {
        "general.architecture": arch,
        "general.basename": entry.name.model,
        "general.file_type": 1 if fam.quantization == "F16" else 15,
        "general.parameter_count": int(entry.size / (2.0 if fam.quantization == "F16" else 0.6)),
        "general.quantization_version": 2,
        f"{arch}.block_count": 28,
        f"{arch}.context_length": fam.context_length,
        f"{arch}.embedding_length": fam.embedding_length,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * len(tokens),
        "tokenizer.ggml.merges": [],
    }
    body: dict[str, Any] = {
        "license": "Sim License: generated text, for testing only.",
        "modelfile": modelfile,
        "parameters": "\n".join(param_lines),
        "template": template,
    }
    if entry.system:
        body["system"] = entry.system
    body["details"] = entry.details()
    body["model_info"] = model_info
    body["tensors"] = [
        {"name": "token_embd.weight", "type": "Q4_K", "shape": [fam.embedding_length, 128256]},
        {"name": "output_norm.weight", "type": "F32", "shape": [fam.embedding_length]},
    ]
    body["capabilities"] = entry.capabilities
    body["modified_at"] = modified_at
    return body
