"""Model listings: OpenAI `/v1/models` items <-> Ollama `/api/tags`, `/api/ps`, `/api/show`.

An OpenAI server tells little about a model (id, created, owner); vLLM adds
`max_model_len`, llama.cpp's server a `meta` block (size, parameter count,
training context). What is known is carried; the rest gets Ollama's empty
values, because Ollama's clients require the keys (ollama-python's
ShowResponse fails without `model_info`).
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

import orjson

from ollamamq_fast.wire.translate.common import format_rfc3339, parse_rfc3339

# /api/ps shows when a model unloads; an OpenAI server keeps its model for as
# long as it runs, which Ollama writes as a time far in the future.
FOREVER: Final = "2318-01-01T00:00:00Z"
DEFAULT_CAPABILITIES: Final = ("completion",)


def _items(body: bytes | Any, key: str) -> list[dict[str, Any]]:
    if isinstance(body, (bytes, bytearray, memoryview)):
        try:
            body = orjson.loads(body)
        except orjson.JSONDecodeError:
            return []
    items = body.get(key) if isinstance(body, dict) else None  # `data` may be null
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def openai_model_items(body: bytes | Any) -> list[dict[str, Any]]:
    """The model objects of a `/v1/models` answer (an empty list for `data: null`)."""
    return [i for i in _items(body, "data") if isinstance(i.get("id"), str)]


def ollama_model_items(body: bytes | Any) -> list[dict[str, Any]]:
    """The entries of an `/api/tags` or `/api/ps` answer."""
    return _items(body, "models")


def _parameter_size(count: Any) -> str:
    if not isinstance(count, int) or count <= 0:
        return ""
    if count >= 1_000_000_000:
        return f"{count / 1e9:.1f}B"
    if count >= 1_000_000:
        return f"{count / 1e6:.2f}M"
    return str(count)


def _meta(item: dict[str, Any]) -> dict[str, Any]:
    meta = item.get("meta")
    return meta if isinstance(meta, dict) else {}


def context_length(item: dict[str, Any]) -> int | None:
    """The context a server runs the model with, when it says (vLLM, llama.cpp)."""
    for value in (item.get("max_model_len"), _meta(item).get("n_ctx"), _meta(item).get("n_ctx_train")):
        if isinstance(value, int) and value > 0:
            return value
    return None


def _details(item: dict[str, Any]) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf" if _meta(item) else "",
        "family": "",
        "families": None,
        "parameter_size": _parameter_size(_meta(item).get("n_params")),
        "quantization_level": "",
    }


def tag_from_openai_model(item: dict[str, Any]) -> dict[str, Any]:
    """One `/v1/models` object -> one `/api/tags` entry.

    The digest is the SHA-256 of the id: stable across calls and backends, so
    clients that tell models apart by digest see one model per id.
    """
    model_id = str(item.get("id", ""))
    created = item.get("created")
    size = _meta(item).get("size")
    return {
        "name": model_id,
        "model": model_id,
        "modified_at": format_rfc3339(created if isinstance(created, int) else 0),
        "size": size if isinstance(size, int) else 0,
        "digest": hashlib.sha256(model_id.encode()).hexdigest(),
        "details": _details(item),
    }


def ps_from_openai_model(item: dict[str, Any]) -> dict[str, Any]:
    """One `/v1/models` object -> one `/api/ps` entry (served models are loaded)."""
    entry = tag_from_openai_model(item)
    entry["expires_at"] = FOREVER
    entry["size_vram"] = entry["size"]
    ctx = context_length(item)
    if ctx is not None:
        entry["context_length"] = ctx
    return entry


def show_from_openai_model(
    item: dict[str, Any], capabilities: tuple[str, ...] = DEFAULT_CAPABILITIES
) -> dict[str, Any]:
    """One `/v1/models` object -> an `/api/show` answer.

    `capabilities` is what the operator knows of the model ("tools", "vision",
    "thinking", "embedding"): an OpenAI server does not say.
    """
    created = item.get("created")
    info: dict[str, Any] = {"general.architecture": "", "general.basename": str(item.get("id", ""))}
    n_params = _meta(item).get("n_params")
    if isinstance(n_params, int):
        info["general.parameter_count"] = n_params
    ctx = context_length(item)
    if ctx is not None:
        info["general.context_length"] = ctx
    return {
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": _details(item),
        "model_info": info,
        "capabilities": list(capabilities),
        "modified_at": format_rfc3339(created if isinstance(created, int) else 0),
    }


def _owner(name: str) -> str:
    """The namespace of an Ollama model name, as Ollama's /v1/models writes `owned_by`."""
    path = name.split(":", 1)[0].split("@", 1)[0]
    parts = path.split("/")
    return parts[-2] if len(parts) >= 2 else "library"


def openai_model_from_tag(entry: dict[str, Any]) -> dict[str, Any]:
    """One `/api/tags` (or `/api/ps`) entry -> one `/v1/models` object."""
    name = str(entry.get("model") or entry.get("name") or "")
    return {
        "id": name,
        "object": "model",
        "created": parse_rfc3339(entry.get("modified_at")) or 0,
        "owned_by": _owner(name),
    }


def openai_model_from_show(name: str, show: dict[str, Any]) -> dict[str, Any]:
    """An `/api/show` answer for `name` -> the `/v1/models/{name}` object."""
    return {
        "id": name,
        "object": "model",
        "created": parse_rfc3339(show.get("modified_at")) or 0,
        "owned_by": _owner(name),
    }
