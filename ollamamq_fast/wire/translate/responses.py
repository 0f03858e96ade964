"""Whole (non-streaming) answers and error bodies, translated to the client's API."""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

import orjson

from ollamamq_fast.wire.errors import Api, error_body
from ollamamq_fast.wire.translate.common import (
    Clock,
    Endpoint,
    Translated,
    TranslationError,
    completion_logprobs,
    done_reason,
    dumps,
    finish_reason,
    ollama_logprobs,
    reasoning_of,
    tool_arguments_object,
    tool_arguments_string,
)


def translate_response(t: Translated, body: bytes, total_duration_ns: int | None = None) -> bytes:
    """A backend's whole 2xx JSON answer -> the client's JSON answer.

    `total_duration_ns` (the gateway's own measure of the exchange) fills
    Ollama's `total_duration` when the backend reports no timings. Raises
    TranslationError(502) when the backend's body is not what its API promises.
    """
    data = _backend_json(body)
    if t.client.api is Api.OLLAMA:
        return dumps(_to_ollama(t, data, total_duration_ns))
    return dumps(_to_openai(t, data)) + b"\n"


def _backend_json(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise TranslationError(502, "the backend answered with invalid JSON") from None
    if not isinstance(data, dict):
        raise TranslationError(502, "the backend answered with JSON that is not an object")
    if "error" in data or data.get("object") == "error":
        raise TranslationError(502, error_message(data))
    return data


# -- errors -------------------------------------------------------------------


def error_message(data: Any) -> str:
    """The message of an error body in any shape backends use.

    Ollama `{"error": "..."}`, OpenAI and llama.cpp `{"error": {"message": ...}}`,
    vLLM's older `{"object": "error", "message": ...}`, FastAPI `{"detail": ...}`.
    """
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, str):
            return err
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        if isinstance(data.get("message"), str):
            return str(data["message"])
        detail = data.get("detail")
        if isinstance(detail, str):
            return detail
        if isinstance(detail, list) and detail and isinstance(detail[0], dict):
            return "; ".join(str(d.get("msg", d)) for d in detail)
        if err is not None:
            return dumps(err).decode()
    return dumps(data).decode()


def translate_error(client: Api, status: int, body: bytes) -> tuple[bytes, bytes]:
    """A backend's error answer -> (content type, body) in the client's error shape.

    A body that is not JSON (llama.cpp's plain-text 500s, gin's `404 page not
    found`) becomes the message as it is.
    """
    try:
        message = error_message(orjson.loads(body)) if body.strip() else ""
    except orjson.JSONDecodeError:
        message = body.decode("utf-8", "replace").strip()
    if not message:
        message = f"the backend answered with status {status}"
    return error_body(client, status, message)


# -- OpenAI answer -> Ollama answer --------------------------------------------


def ollama_metrics(usage: Any, timings: Any, total_duration_ns: int | None) -> dict[str, int]:
    """Ollama's final-line metrics from OpenAI usage and, where a server sends
    them (llama.cpp), its `timings`; Ollama omits what it does not know."""
    out: dict[str, int] = {}
    prompt_ns = eval_ns = None
    if isinstance(timings, dict):
        if isinstance(timings.get("prompt_ms"), (int, float)):
            prompt_ns = int(timings["prompt_ms"] * 1_000_000)
        if isinstance(timings.get("predicted_ms"), (int, float)):
            eval_ns = int(timings["predicted_ms"] * 1_000_000)
    if total_duration_ns is None and prompt_ns is not None and eval_ns is not None:
        total_duration_ns = prompt_ns + eval_ns
    if total_duration_ns is not None:
        out["total_duration"] = total_duration_ns
    usage = usage if isinstance(usage, dict) else {}
    if isinstance(usage.get("prompt_tokens"), int):
        out["prompt_eval_count"] = usage["prompt_tokens"]
    if prompt_ns is not None:
        out["prompt_eval_duration"] = prompt_ns
    if isinstance(usage.get("completion_tokens"), int):
        out["eval_count"] = usage["completion_tokens"]
    if eval_ns is not None:
        out["eval_duration"] = eval_ns
    return out


def ollama_tool_calls(calls: list[Any]) -> list[dict[str, Any]]:
    """OpenAI tool calls (string arguments) -> Ollama tool calls (object arguments)."""
    out = []
    for index, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            continue
        item: dict[str, Any] = {}
        if call.get("id"):
            item["id"] = call["id"]
        item["function"] = {
            "index": index,
            "name": fn.get("name", ""),
            "arguments": tool_arguments_object(fn.get("arguments")),
        }
        out.append(item)
    return out


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _first_choice(data: dict[str, Any]) -> dict[str, Any]:
    choices = data.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return {}


def _to_ollama(t: Translated, data: dict[str, Any], total_ns: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"model": t.model, "created_at": Clock().now()}
    if t.client.embeds:
        return _embeddings_to_ollama(t, data, out, total_ns)
    choice = _first_choice(data)
    message = _object(choice.get("message"))
    text = choice.get("text") if t.backend is Endpoint.OPENAI_COMPLETIONS else message.get("content")
    text = text if isinstance(text, str) else ""
    thinking = reasoning_of(message)
    if t.client is Endpoint.OLLAMA_CHAT:
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        if thinking:
            msg["thinking"] = thinking
        if isinstance(message.get("tool_calls"), list) and message["tool_calls"]:
            msg["tool_calls"] = ollama_tool_calls(message["tool_calls"])
        out["message"] = msg
    else:
        out["response"] = text
        if thinking:
            out["thinking"] = thinking
    out["done"] = True
    out["done_reason"] = done_reason(choice.get("finish_reason"))
    logprobs = ollama_logprobs(choice.get("logprobs"))
    if logprobs is not None:
        out["logprobs"] = logprobs
    out.update(ollama_metrics(data.get("usage"), data.get("timings"), total_ns))
    return out


def _vector(value: Any) -> Any:
    if isinstance(value, str):  # base64 of little-endian float32s
        raw = base64.b64decode(value)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    if isinstance(value, list) and value and all(isinstance(row, list) and row for row in value):
        # One vector per token (llama-cpp-python's server, for a model without
        # pooling): Ollama gives one per input, so they are averaged.
        width = len(value[0])
        if all(len(row) == width for row in value):
            return [sum(column) / len(value) for column in zip(*value)]
    return value


def _unit(vector: Any, dimensions: int) -> Any:
    """An /api/embed vector as Ollama gives it: cut to `dimensions` (when fewer), at
    unit length. An OpenAI server may ignore `dimensions` (llama-cpp-python does)
    and send vectors of any length (an average of per-token ones is not unit);
    Ollama's /api/embeddings (legacy) answers its vector as it comes."""
    if not isinstance(vector, list) or not all(type(v) in (float, int) for v in vector):
        return vector
    if 0 < dimensions < len(vector):
        vector = vector[:dimensions]
    norm = math.sqrt(sum(v * v for v in vector))
    # A vector already of unit length (most servers') is passed as it came.
    return [v / norm for v in vector] if norm and abs(norm - 1.0) > 1e-6 else vector


def _embeddings_to_ollama(
    t: Translated, data: dict[str, Any], out: dict[str, Any], total_ns: int | None
) -> dict[str, Any]:
    items = data.get("data")
    items = [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []
    items.sort(key=lambda i: i.get("index", 0))
    vectors = [_vector(i.get("embedding")) for i in items]
    if t.client is Endpoint.OLLAMA_EMBEDDINGS:
        return {"embedding": vectors[0] if vectors else []}
    del out["created_at"]  # /api/embed answers carry no timestamp
    out["embeddings"] = [_unit(v, t.dimensions) for v in vectors]
    metrics = ollama_metrics(data.get("usage"), None, total_ns)
    metrics.pop("eval_count", None)
    out.update(metrics)
    return out


# -- Ollama answer -> OpenAI answer --------------------------------------------


def openai_usage(prompt: Any, completion: Any) -> dict[str, int]:
    """OpenAI usage from Ollama's counts (missing counts are 0, as Ollama's /v1 writes them)."""
    p = prompt if isinstance(prompt, int) else 0
    c = completion if isinstance(completion, int) else 0
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def openai_tool_calls(calls: list[Any], id_prefix: str, first_index: int = 0) -> list[dict[str, Any]]:
    """Ollama tool calls (object arguments) -> OpenAI tool calls (string arguments)."""
    out = []
    for offset, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            continue
        index = first_index + offset
        call_id = call.get("id") or f"call_{id_prefix}_{index}"
        out.append({
            "index": index,
            "id": call_id,
            "type": "function",
            "function": {"name": fn.get("name", ""), "arguments": tool_arguments_string(fn.get("arguments"))},
        })
    return out


def _to_openai(t: Translated, data: dict[str, Any]) -> dict[str, Any]:
    if t.client.embeds:
        return _embeddings_to_openai(t, data)
    usage = openai_usage(data.get("prompt_eval_count"), data.get("eval_count"))
    if t.client is Endpoint.OPENAI_COMPLETIONS:
        text = data.get("response") if isinstance(data.get("response"), str) else ""
        tokens = data.get("logprobs")
        logprobs = completion_logprobs(tokens)[0] if isinstance(tokens, list) else None
        choice: dict[str, Any] = {"text": text, "index": 0, "logprobs": logprobs,
                                  "finish_reason": finish_reason(data.get("done_reason"), False)}
        return {"id": t.response_id, "object": "text_completion", "created": t.created,
                "model": t.model, "choices": [choice], "usage": usage}
    msg = _object(data.get("message"))
    message: dict[str, Any] = {"role": "assistant", "content": msg.get("content") or ""}
    if msg.get("thinking"):
        message["reasoning"] = msg["thinking"]
    calls = msg.get("tool_calls")
    if isinstance(calls, list) and calls:
        message["tool_calls"] = [
            {k: v for k, v in c.items() if k != "index"}
            for c in openai_tool_calls(calls, t.response_id[-8:])
        ]
    choice = {"index": 0, "message": message,
              "finish_reason": finish_reason(data.get("done_reason"), bool(calls))}
    if isinstance(data.get("logprobs"), list):
        choice["logprobs"] = {"content": data["logprobs"]}
    return {"id": t.response_id, "object": "chat.completion", "created": t.created,
            "model": t.model, "choices": [choice], "usage": usage}


def _embeddings_to_openai(t: Translated, data: dict[str, Any]) -> dict[str, Any]:
    vectors = data.get("embeddings")
    vectors = vectors if isinstance(vectors, list) else []
    items = []
    for index, vector in enumerate(vectors):
        value: Any = vector
        if t.base64_embeddings and isinstance(vector, list):
            value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        items.append({"object": "embedding", "embedding": value, "index": index})
    count = data.get("prompt_eval_count") if isinstance(data.get("prompt_eval_count"), int) else 0
    return {"object": "list", "data": items, "model": t.model,
            "usage": {"prompt_tokens": count, "total_tokens": count}}
