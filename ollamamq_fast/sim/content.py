"""What the fake model "says": token plans, tool calls, JSON output, embeddings, show data."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import struct
from functools import lru_cache
from typing import Any

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


def word_tokens(text: str, seed: int, count: int) -> list[str]:
    """`count` plausible tokens, deterministic for (text, seed)."""
    if count <= 0:
        return []
    first, _ = _seed_pair(text, seed)
    size = len(WORDS)
    start = first % size
    # Walking the list in order reads like (odd) prose; the start depends on the prompt.
    out = [_FIRST[start]]
    out.extend(_SPACED[(start + i) % size] for i in range(1, count))
    return out


def think_tokens(text: str, seed: int, count: int) -> list[str]:
    """Reasoning tokens for `think`, deterministic like word_tokens."""
    if count <= 0:
        return []
    first, _ = _seed_pair(text, seed + 1)
    size = len(THINK_WORDS)
    start = first % size
    return [THINK_WORDS[start]] + [_THINK_SPACED[(start + i) % size] for i in range(1, count)]


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
        "content",
        "done_reason",
        "eval_count",
        "prompt_tokens",
        "reason_json",
        "steps",
        "text",
        "text_json",
        "thinking",
        "thought",
        "thought_json",
        "tool_calls",
    )

    def __init__(
        self,
        thinking: tuple[str, ...],
        content: tuple[str, ...],
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
        # The whole answer and reasoning, as a non-streaming response carries them.
        self.text = "".join(content)
        self.thought = "".join(thinking)
        # Pre-encoded JSON strings: non-stream bodies are assembled from bytes.
        self.text_json = dumps(self.text)
        self.thought_json = dumps(self.thought)
        self.reason_json = dumps(done_reason)


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
        return _text_plan(prompt, seed, count, done_reason, think)
    thinking = tuple(think_tokens(prompt, seed, max(1, count // 4))) if think else ()
    prompt_tokens = estimate_tokens(prompt) + PROMPT_OVERHEAD_TOKENS
    if tool is not None:
        return Plan(thinking, (), [tool_call(tool, prompt, seed)], "stop", prompt_tokens)
    words = word_tokens(prompt, seed, count)
    pieces = format_pieces(fmt, words) if count else None
    return Plan(thinking, tuple(pieces if pieces is not None else words), None, done_reason, prompt_tokens)


@lru_cache(maxsize=4096)
def _text_plan(prompt: str, seed: int, count: int, done_reason: str, think: bool) -> Plan:
    """Plain-text plans repeat a lot under benchmarks: build each once."""
    thinking = tuple(think_tokens(prompt, seed, max(1, count // 4))) if think else ()
    prompt_tokens = estimate_tokens(prompt) + PROMPT_OVERHEAD_TOKENS
    return Plan(thinking, tuple(word_tokens(prompt, seed, count)), None, done_reason, prompt_tokens)


def empty_plan(done_reason: str) -> Plan:
    """No prompt, no tokens (the load answer of /v1/completions with an empty prompt)."""
    return Plan((), (), None, done_reason, 0)


@lru_cache(maxsize=256)
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
