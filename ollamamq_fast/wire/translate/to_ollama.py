"""OpenAI-compatible request bodies -> Ollama native request bodies.

Used when the backend is Ollama and a field has no equivalent on Ollama's own
`/v1` layer, or when the gateway prefers the native API. See docs/translation.md.
"""

from __future__ import annotations

from typing import Any, Final

from ollamamq_fast.wire.translate.common import (
    TranslationError,
    image_base64,
    reasoning_of,
    tool_arguments_object,
)

_SAME_OPTIONS: Final = (
    "temperature", "top_p", "seed", "frequency_penalty", "presence_penalty", "top_k", "min_p",
)
# reasoning_effort -> think, as Ollama's own /v1 layer maps it.
_EFFORT_TO_THINK: Final[dict[str, bool | str]] = {
    "none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high",
    "xhigh": "max", "ultra": "max", "max": "max",
}
# Fields that change the answer and that Ollama cannot honour: named in a note.
_NOTED: Final = ("logit_bias", "prediction", "modalities", "audio", "web_search_options",
                 "functions", "function_call", "best_of", "echo")


def openai_stream(req: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage): OpenAI's stream defaults to false."""
    value = req.get("stream")
    if value is None:
        value = False
    if not isinstance(value, bool):
        raise TranslationError(400, "stream must be a boolean")
    opts = req.get("stream_options")
    include_usage = value and isinstance(opts, dict) and opts.get("include_usage") is True
    return value, include_usage


def _options(req: dict[str, Any]) -> dict[str, Any]:
    # OpenAI's defaults, which Ollama's own /v1 layer sends when they are absent
    # (else the model's Modelfile values would apply: Ollama's 0.8 and 0.9).
    options: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0}
    for key in _SAME_OPTIONS:
        if req.get(key) is not None:
            options[key] = req[key]
    if req.get("repetition_penalty") is not None:
        options["repeat_penalty"] = req["repetition_penalty"]
    stop = req.get("stop")
    if isinstance(stop, str):
        options["stop"] = [stop]
    elif stop is not None:
        options["stop"] = stop
    limit = req.get("max_completion_tokens")
    if limit is None:
        limit = req.get("max_tokens")
    if limit is not None:
        options["num_predict"] = limit
    return options


def _common(req: dict[str, Any], out: dict[str, Any], notes: list[str]) -> None:
    n = req.get("n")
    if n is not None and n != 1:
        raise TranslationError(400, "n other than 1 is not supported by this backend")
    out["stream"] = openai_stream(req)[0]
    out["options"] = _options(req)
    fmt = _format(req.get("response_format"))
    if fmt is not None:
        out["format"] = fmt
    noted = [key for key in _NOTED if req.get(key)]
    if noted:
        notes.append(", ".join(noted) + " dropped")


def _format(response_format: Any) -> str | dict[str, Any] | None:
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise TranslationError(400, "response_format.json_schema.schema must be an object")
        return schema
    raise TranslationError(400, f"invalid response_format type: {kind!r}")


def _think(req: dict[str, Any]) -> bool | str | None:
    effort = req.get("reasoning_effort")
    reasoning = req.get("reasoning")
    if effort is None and isinstance(reasoning, dict):
        effort = reasoning.get("effort")
    if effort is not None:
        if not isinstance(effort, str) or effort not in _EFFORT_TO_THINK:  # a list: unhashable
            raise TranslationError(400, f"invalid reasoning_effort: {effort!r}")
        return _EFFORT_TO_THINK[effort]
    kwargs = req.get("chat_template_kwargs")
    if isinstance(kwargs, dict) and isinstance(kwargs.get("enable_thinking"), bool):
        return bool(kwargs["enable_thinking"])
    return None


def _content(content: Any) -> tuple[str, list[str]]:
    """An OpenAI message content -> (text, base64 images)."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise TranslationError(400, "message content must be a string or a list of parts")
    texts: list[str] = []
    images: list[str] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            if isinstance(url, dict):
                url = url.get("url")
            if not isinstance(url, str):
                raise TranslationError(400, "image_url must carry a url")
            images.append(image_base64(url))
        elif kind == "input_audio":
            # Ollama's own /v1 passes the audio's base64 on in `images`, where
            # its audio-capable models (gemma3n ...) read it.
            audio = part.get("input_audio")
            if not isinstance(audio, dict):
                raise TranslationError(400, "invalid input_audio format")
            if not isinstance(audio.get("data"), str):
                raise TranslationError(400, "invalid input_audio format: missing data")
            images.append(audio["data"])
        else:
            raise TranslationError(400, f"unsupported content part type: {kind!r}")
    return "\n".join(texts), images


def _tool_calls(calls: Any, names: dict[str, str]) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise TranslationError(400, "tool_calls must be a list")
    out = []
    for index, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise TranslationError(400, "each tool call needs a function with a name")
        item: dict[str, Any] = {}
        if isinstance(call.get("id"), str):
            item["id"] = call["id"]
            names[call["id"]] = fn["name"]
        item["function"] = {
            "index": index, "name": fn["name"], "arguments": tool_arguments_object(fn.get("arguments")),
        }
        out.append(item)
    return out


def messages(msgs: Any) -> list[dict[str, Any]]:
    """OpenAI chat messages -> Ollama messages."""
    if not isinstance(msgs, list):
        raise TranslationError(400, "messages must be a list")
    if not msgs:
        raise TranslationError(400, "[] is too short - 'messages'")
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for msg in msgs:
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise TranslationError(400, "each message must be an object with a role")
        role = msg["role"].lower()
        if role == "developer":
            role = "system"
        text, images = _content(msg.get("content"))
        item: dict[str, Any] = {"role": role, "content": text}
        if images:
            item["images"] = images
        if role == "assistant":
            thinking = reasoning_of(msg)
            if thinking:
                item["thinking"] = thinking
            if msg.get("tool_calls"):
                item["tool_calls"] = _tool_calls(msg["tool_calls"], names)
        elif role == "tool":
            call_id = msg.get("tool_call_id")
            if isinstance(call_id, str):
                item["tool_call_id"] = call_id
                if call_id in names:
                    item["tool_name"] = names[call_id]
            # The message's own name first, as Ollama's /v1 reads it.
            if isinstance(msg.get("name"), str) and msg["name"]:
                item["tool_name"] = msg["name"]
        out.append(item)
    return out


def chat(req: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """/v1/chat/completions -> /api/chat."""
    out: dict[str, Any] = {"model": req.get("model"), "messages": messages(req.get("messages"))}
    _common(req, out, notes)
    tools = req.get("tools")
    choice = req.get("tool_choice")
    if tools and choice != "none":
        if not isinstance(tools, list):
            raise TranslationError(400, "tools must be a list")
        out["tools"] = tools
        if choice not in (None, "auto"):
            notes.append("tool_choice approximated as auto")
    think = _think(req)
    if think is not None:
        out["think"] = think
    if req.get("logprobs"):
        out["logprobs"] = True
        if req.get("top_logprobs") is not None:
            out["top_logprobs"] = req["top_logprobs"]
    return out


def completion(req: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """/v1/completions -> /api/generate (templated, as Ollama's own /v1/completions is)."""
    prompt = req.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise TranslationError(400, "prompt must be a string")
    out: dict[str, Any] = {"model": req.get("model"), "prompt": prompt}
    if req.get("suffix"):
        out["suffix"] = req["suffix"]
    _common(req, out, notes)
    # The completions API's logprobs is the number of alternatives per token;
    # Ollama's own /v1/completions asks /api/generate for them so (openai.go
    # FromCompleteRequest), and the answer's become the completions shape.
    logprobs = req.get("logprobs")
    if logprobs is not None:
        if isinstance(logprobs, bool) or not isinstance(logprobs, int):
            raise TranslationError(400, "logprobs must be an integer (the number of top "
                                   "alternatives per token)")
        if logprobs > 0:
            out["logprobs"] = True
            out["top_logprobs"] = logprobs
    return out


def embeddings(req: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """/v1/embeddings -> /api/embed; also says whether the client wants base64 vectors."""
    value = req.get("input")
    ok = isinstance(value, str) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
    )
    if not ok:
        raise TranslationError(400, "input must be a string or a non-empty list of strings")
    encoding = req.get("encoding_format")
    if encoding not in (None, "float", "base64"):
        raise TranslationError(400, f"invalid encoding_format: {encoding!r}, expected float or base64")
    # "" is one input to OpenAI servers (and Ollama's own /v1); to /api/embed it
    # would be the load form, answered with no vector.
    out: dict[str, Any] = {"model": req.get("model"), "input": [""] if value == "" else value}
    if req.get("dimensions") is not None:
        out["dimensions"] = req["dimensions"]
    return out, encoding == "base64"
