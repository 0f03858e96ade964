"""translate_request: a client's inference request rewritten for the other API."""

from __future__ import annotations

from typing import Any

from ollamamq_fast.wire.errors import Api
from ollamamq_fast.wire.translate import to_ollama, to_openai
from ollamamq_fast.wire.translate.common import (
    DEFAULT_TRAITS,
    BackendTraits,
    Clock,
    Endpoint,
    Translated,
    TranslationError,
    dumps,
    endpoint_for,
    keep_alive_ns,
    loads_object,
)
from ollamamq_fast.wire.translate.gobody import loads_go_object


def needs_translation(path: bytes | str, backend: Api) -> bool:
    """True when `path` is an inference route of the other API than the backend's."""
    client = endpoint_for(path)
    return client is not None and client.api is not backend


def translate_request(
    path: bytes | str, body: bytes, target: Api, traits: BackendTraits = DEFAULT_TRAITS
) -> Translated:
    """Rewrite a request to `path` with `body` for a backend speaking `target`.

    Raises TranslationError (status and message) for a body the client must
    fix; ValueError when the path is not an inference route of the other API.
    """
    try:
        return _translate(path, body, target, traits)
    except RecursionError:
        # Go reads up to 10,000 levels; Python's parser and the translation's
        # walks stop near 1,000: a 400 that says so, not a gateway error.
        raise TranslationError(400, "request body nested too deeply to translate") from None


def _translate(
    path: bytes | str, body: bytes, target: Api, traits: BackendTraits
) -> Translated:
    client = endpoint_for(path)
    if client is None or client.api is target:
        raise ValueError(f"no translation from {path!r} to {target.value}")
    # A native body is read as Ollama's Go server would have read it (field
    # names in any case, repeated objects merged); an OpenAI one by exact names.
    req = loads_go_object(body) if target is Api.OPENAI else loads_object(body)
    model = req.get("model")
    if not isinstance(model, str) or not model.strip():
        raise TranslationError(400, "model is required")
    notes: list[str] = []
    if target is Api.OPENAI:
        return _to_openai(client, req, model, traits, notes)
    return _to_ollama(client, req, model, notes)


def _to_openai(
    client: Endpoint, req: dict[str, Any], model: str, traits: BackendTraits, notes: list[str]
) -> Translated:
    # Ollama binds keep_alive with the rest of the body, before anything else
    # is looked at: a value it refuses ("10", no unit) is a 400 on every route,
    # the load form included. The OpenAI server never sees it (noted).
    keep_alive = keep_alive_ns(req.get("keep_alive"))
    if not client.embeds:
        _check_top_logprobs(req.get("top_logprobs"))
    if client is Endpoint.OLLAMA_CHAT:
        if not req.get("messages"):
            return _load_reply(client, model, keep_alive == 0)
        out = to_openai.chat(req, traits, notes)
        backend = Endpoint.OPENAI_CHAT
    elif client is Endpoint.OLLAMA_GENERATE:
        if not req.get("prompt") and not req.get("images"):
            return _load_reply(client, model, keep_alive == 0)
        backend = to_openai.generate_route(req, traits)
        if backend is Endpoint.OPENAI_COMPLETIONS:
            out = to_openai.generate_as_completion(req, traits, notes)
        else:
            out = to_openai.generate_as_chat(req, traits, notes)
    else:
        legacy = client is Endpoint.OLLAMA_EMBEDDINGS
        if legacy and not req.get("prompt"):
            return _local(client, model, b'{"embedding":[]}')
        if not legacy and req.get("input") in (None, "", []):
            # Ollama answers no input (ollama-python's default "", an empty
            # batch) with no vectors; an OpenAI server would embed "" or refuse [].
            return _local(client, model, dumps({"model": model, "embeddings": []}))
        out = to_openai.embed(req, legacy, notes)
        backend = Endpoint.OPENAI_EMBEDDINGS
    stream = bool(out.get("stream"))
    dims = req.get("dimensions") if client is Endpoint.OLLAMA_EMBED else None
    return Translated(backend.path, dumps(out), client, backend, model, stream, notes=tuple(notes),
                      dimensions=dims if type(dims) is int and dims > 0 else 0)


def _check_top_logprobs(value: Any) -> None:
    """Ollama's chat and generate handlers refuse a top_logprobs outside 0..20
    before looking at the model (an OpenAI server may allow more, or fewer)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TranslationError(400, "top_logprobs must be an integer")
    if not 0 <= value <= 20:
        raise TranslationError(400, "top_logprobs must be between 0 and 20")


def _to_ollama(client: Endpoint, req: dict[str, Any], model: str, notes: list[str]) -> Translated:
    include_usage = False
    base64_vectors = False
    if client is Endpoint.OPENAI_CHAT:
        out = to_ollama.chat(req, notes)
        include_usage = to_ollama.openai_stream(req)[1]
        backend = Endpoint.OLLAMA_CHAT
    elif client is Endpoint.OPENAI_COMPLETIONS:
        out = to_ollama.completion(req, notes)
        include_usage = to_ollama.openai_stream(req)[1]
        backend = Endpoint.OLLAMA_GENERATE
    else:
        out, base64_vectors = to_ollama.embeddings(req)
        backend = Endpoint.OLLAMA_EMBED
    stream = bool(out.get("stream"))
    return Translated(
        backend.path, dumps(out), client, backend, model, stream,
        include_usage=include_usage, base64_embeddings=base64_vectors, notes=tuple(notes),
    )


def _load_reply(client: Endpoint, model: str, unload: bool) -> Translated:
    """Ollama's load/unload form (no prompt, no messages): an OpenAI backend has
    no such route, and loads on its own, so the gateway answers it. A keep_alive
    of zero, in any spelling ("0", "0m", 0.0), is the unload form."""
    reply: dict[str, Any] = {"model": model, "created_at": Clock().now()}
    if client is Endpoint.OLLAMA_CHAT:
        reply["message"] = {"role": "assistant", "content": ""}
    else:
        reply["response"] = ""
    reply["done"] = True
    reply["done_reason"] = "unload" if unload else "load"
    return _local(client, model, dumps(reply))


def _local(client: Endpoint, model: str, reply: bytes) -> Translated:
    return Translated(b"", b"", client, client, model, False, local_reply=reply)
