"""Ollama native request bodies -> OpenAI-compatible request bodies.

Each function takes the parsed client body and returns the backend body plus
the notes on what could not be carried (see docs/translation.md for the table).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final

from ollamamq_fast.wire.translate.common import (
    BackendTraits,
    Endpoint,
    TranslationError,
    dumps,
    image_data_uri,
    tool_arguments_string,
)

# Ollama options with an OpenAI field of the same meaning.
_SAME_OPTIONS: Final = ("temperature", "top_p", "seed", "frequency_penalty", "presence_penalty")
# Accepted by vLLM, llama.cpp, SGLang and LM Studio, not by OpenAI itself.
_EXTRA_OPTIONS: Final = ("top_k", "min_p")
_EFFORTS: Final = ("low", "medium", "high")


def ollama_stream(req: dict[str, Any]) -> bool:
    """Ollama's stream flag: absent or null means stream; anything but a bool is refused."""
    value = req.get("stream")
    if value is None:
        return True
    if not isinstance(value, bool):
        raise TranslationError(400, "stream must be a boolean")
    return value


def _options(req: dict[str, Any], traits: BackendTraits, out: dict[str, Any], notes: list[str]) -> None:
    options = req.get("options")
    if options is None:
        return
    if not isinstance(options, dict):
        raise TranslationError(400, "options must be an object")
    dropped: list[str] = []
    for key, value in options.items():
        if value is None:
            continue
        if key in _SAME_OPTIONS:
            out[key] = value
        elif key == "stop":
            out["stop"] = value
        elif key == "num_predict":
            # -1 (no limit) and -2 (fill the context) are the backend's default anyway.
            if isinstance(value, int) and value > 0:
                out["max_tokens"] = value
            elif not isinstance(value, int) or value == 0:
                dropped.append("options.num_predict")
        elif key in _EXTRA_OPTIONS and traits.sampler_extras:
            out[key] = value
        elif key == "repeat_penalty" and traits.sampler_extras:
            out[traits.repeat_penalty_field] = value
        elif key == "num_ctx" and traits.num_ctx:
            out["num_ctx"] = value
        else:
            dropped.append("options." + key)
    if dropped:
        notes.append(", ".join(dropped) + " dropped")


def _response_format(fmt: Any, traits: BackendTraits) -> dict[str, Any] | None:
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        if traits.schema_in_json_object:
            return {"type": "json_object", "schema": fmt}
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": fmt}}
    raise TranslationError(400, 'invalid format: expected "json" or a valid JSON schema')


def _think(req: dict[str, Any], out: dict[str, Any], notes: list[str]) -> None:
    think = req.get("think")
    if think is None:
        return
    if isinstance(think, bool):
        # The switch Qwen3-style templates read (vLLM, SGLang and llama.cpp pass it on).
        out["chat_template_kwargs"] = {"enable_thinking": think}
    elif think in _EFFORTS:
        out["reasoning_effort"] = think
    elif think == "max":
        out["reasoning_effort"] = "high"
        notes.append("think=max sent as reasoning_effort=high")
    elif isinstance(think, str):  # Ollama's own messages (api.ThinkValue)
        raise TranslationError(400, f"invalid think value: {dumps(think).decode()} "
                               '(must be "high", "medium", "low", "max", true, or false)')
    else:
        raise TranslationError(400, 'think must be a boolean or string ("high", "medium", "low", '
                               '"max", true, or false)')


def _common(req: dict[str, Any], stream: bool, out: dict[str, Any], notes: list[str]) -> None:
    out["stream"] = stream
    if stream:
        # Ask for the usage chunk: it carries the counts of Ollama's final line.
        out["stream_options"] = {"include_usage": True}
    if req.get("keep_alive") is not None:
        notes.append("keep_alive dropped")
    for key in ("truncate", "shift"):
        if req.get(key) is not None:
            notes.append(key + " dropped")
    if req.get("logprobs"):
        out["logprobs"] = True
        if req.get("top_logprobs") is not None:
            out["top_logprobs"] = req["top_logprobs"]


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TranslationError(400, f"{what} must be a string")
    return value


def _images(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
        raise TranslationError(400, "images must be a list of base64 strings")
    return value


def _user_content(text: str, images: list[str]) -> str | list[dict[str, Any]]:
    if not images:
        return text
    parts: list[dict[str, Any]] = []
    if text:
        parts.append({"type": "text", "text": text})
    parts.extend({"type": "image_url", "image_url": {"url": image_data_uri(i)}} for i in images)
    return parts


class _CallIds:
    """Ids for the assistant's tool calls, so a later tool message can name its call.

    Ollama tool results name the function (`tool_name`), often with no id;
    OpenAI needs `tool_call_id`. Calls without an id get one here, and each
    tool message takes the oldest unanswered call of its function.
    """

    def __init__(self) -> None:
        self._by_name: dict[str, deque[str]] = {}
        self._all: deque[str] = deque()

    def issue(self, given: Any, name: str, position: str) -> str:
        call_id = given if isinstance(given, str) and given else f"call_{position}"
        self._by_name.setdefault(name, deque()).append(call_id)
        self._all.append(call_id)
        return call_id

    def answer(self, given: Any, name: Any, position: int) -> str:
        if isinstance(given, str) and given:
            call_id = given
        elif isinstance(name, str) and self._by_name.get(name):
            call_id = self._by_name[name][0]
        elif self._all:
            call_id = self._all[0]
        else:
            return f"call_tool_{position}"  # a result with no call: the backend judges it
        if call_id in self._all:
            self._all.remove(call_id)
        for queue in self._by_name.values():
            if call_id in queue:
                queue.remove(call_id)
        return call_id


def _tool_calls(calls: Any, ids: _CallIds, m_index: int) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise TranslationError(400, "tool_calls must be a list")
    out = []
    for c_index, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise TranslationError(400, "each tool call needs a function with a name")
        call_id = ids.issue(call.get("id"), fn["name"], f"{m_index}_{c_index}")
        out.append({
            "id": call_id,
            "type": "function",
            "function": {"name": fn["name"], "arguments": tool_arguments_string(fn.get("arguments"))},
        })
    return out


def messages(msgs: Any, notes: list[str]) -> list[dict[str, Any]]:
    """Ollama chat messages -> OpenAI messages."""
    if not isinstance(msgs, list):
        raise TranslationError(400, "messages must be a list")
    ids = _CallIds()
    out: list[dict[str, Any]] = []
    for index, msg in enumerate(msgs):
        if not isinstance(msg, dict):
            raise TranslationError(400, "each message must be an object")
        role = _text(msg.get("role"), "role").lower()
        text = _text(msg.get("content"), "content")
        images = _images(msg.get("images"))
        if role == "assistant":
            item: dict[str, Any] = {"role": "assistant", "content": text}
            if msg.get("tool_calls"):
                item["tool_calls"] = _tool_calls(msg["tool_calls"], ids, index)
                if not text:
                    item["content"] = None
            if images:
                notes.append("images on assistant messages dropped")
        elif role == "tool":
            call_id = ids.answer(msg.get("tool_call_id"), msg.get("tool_name"), index)
            item = {"role": "tool", "content": text, "tool_call_id": call_id}
        else:
            item = {"role": role, "content": _user_content(text, images)}
        out.append(item)
    return out


def chat(req: dict[str, Any], traits: BackendTraits, notes: list[str]) -> dict[str, Any]:
    """/api/chat -> /v1/chat/completions."""
    out: dict[str, Any] = {"model": req.get("model"), "messages": messages(req.get("messages"), notes)}
    _common(req, ollama_stream(req), out, notes)
    tools = req.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise TranslationError(400, "tools must be a list")
        out["tools"] = tools
    fmt = _response_format(req.get("format"), traits)
    if fmt is not None:
        out["response_format"] = fmt
    _think(req, out, notes)
    _options(req, traits, out, notes)
    return out


def generate_route(req: dict[str, Any], traits: BackendTraits) -> Endpoint:
    """Where an /api/generate request goes on this backend (see BackendTraits.generate_via)."""
    via = traits.generate_via
    if not traits.completions_route:
        return Endpoint.OPENAI_CHAT
    if via == "auto":
        wants_raw = bool(req.get("raw")) or bool(req.get("suffix"))
        via = "completions" if wants_raw and not req.get("images") else "chat"
    return Endpoint.OPENAI_COMPLETIONS if via == "completions" else Endpoint.OPENAI_CHAT


def _generate_notes(req: dict[str, Any], notes: list[str]) -> None:
    for key in ("context", "template"):
        if req.get(key):
            notes.append(key + " dropped")


def generate_as_completion(req: dict[str, Any], traits: BackendTraits, notes: list[str]) -> dict[str, Any]:
    """/api/generate -> /v1/completions: the prompt goes as it is, untemplated."""
    prompt = _text(req.get("prompt"), "prompt")
    system = _text(req.get("system"), "system")
    if _images(req.get("images")):
        raise TranslationError(400, "images need a chat route; this backend was asked for completions")
    if system and not req.get("raw"):
        prompt = system + "\n\n" + prompt
        notes.append("system prepended to the prompt")
    out: dict[str, Any] = {"model": req.get("model"), "prompt": prompt}
    if req.get("suffix"):
        out["suffix"] = _text(req.get("suffix"), "suffix")
    _common(req, ollama_stream(req), out, notes)
    if out.get("logprobs"):
        # /v1/completions takes the number of alternatives per token; at least 1,
        # as llama.cpp gives no logprobs at all for 0.
        top = out.pop("top_logprobs", 0)
        out["logprobs"] = top if isinstance(top, int) and top > 0 else 1
    fmt = _response_format(req.get("format"), traits)
    if fmt is not None:
        out["response_format"] = fmt
    if req.get("think") is not None:
        notes.append("think dropped")
    _generate_notes(req, notes)
    _options(req, traits, out, notes)
    return out


def generate_as_chat(req: dict[str, Any], traits: BackendTraits, notes: list[str]) -> dict[str, Any]:
    """/api/generate -> /v1/chat/completions with one user message (and the system one)."""
    prompt = _text(req.get("prompt"), "prompt")
    system = _text(req.get("system"), "system")
    msgs: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": _user_content(prompt, _images(req.get("images")))})
    out: dict[str, Any] = {"model": req.get("model"), "messages": msgs}
    _common(req, ollama_stream(req), out, notes)
    fmt = _response_format(req.get("format"), traits)
    if fmt is not None:
        out["response_format"] = fmt
    if req.get("raw"):
        notes.append("raw approximated: the chat template is applied")
    if req.get("suffix"):
        notes.append("suffix dropped")
    _think(req, out, notes)
    _generate_notes(req, notes)
    _options(req, traits, out, notes)
    return out


def embed(req: dict[str, Any], legacy: bool, notes: list[str]) -> dict[str, Any]:
    """/api/embed (input) or /api/embeddings (prompt) -> /v1/embeddings."""
    if legacy:
        value: Any = _text(req.get("prompt"), "prompt")
    else:
        value = req.get("input")
        ok = isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        )
        if not ok:
            raise TranslationError(400, "input must be a string or a list of strings")
    out: dict[str, Any] = {"model": req.get("model"), "input": value, "encoding_format": "float"}
    if req.get("dimensions") is not None:
        out["dimensions"] = req["dimensions"]
    if req.get("truncate") is not None:
        notes.append("truncate dropped")
    if req.get("keep_alive") is not None:
        notes.append("keep_alive dropped")
    if req.get("options"):
        notes.append("options dropped")
    return out
