"""Ollama <-> OpenAI translation: requests, whole answers, streams, model lists.

Pure functions and small incremental objects, no I/O. The data plane uses it
only when the client's API differs from the backend's:

    t = translate_request(path, body, Api.OPENAI)      # or Api.OLLAMA
    if t.local_reply is not None: answer 200 t.local_reply (t.content_type)
    send t.body to t.path on the backend
    2xx JSON:  translate_response(t, backend_body)
    2xx stream: s = open_stream(t); s.feed(piece) per piece; s.finish() at end
    error:     translate_error(t.client.api, status, backend_body)

The mapping tables, and what is dropped or approximated, are in docs/translation.md.
"""

from ollamamq_fast.wire.translate.common import (
    DEFAULT_TRAITS,
    BackendTraits,
    Endpoint,
    Translated,
    TranslationError,
    content_type,
    endpoint_for,
)
from ollamamq_fast.wire.translate.models import (
    ollama_model_items,
    openai_model_from_show,
    openai_model_from_tag,
    openai_model_items,
    ps_from_openai_model,
    show_from_openai_model,
    tag_from_openai_model,
)
from ollamamq_fast.wire.translate.request import needs_translation, translate_request
from ollamamq_fast.wire.translate.responses import (
    error_message,
    translate_error,
    translate_response,
)
from ollamamq_fast.wire.translate.streams import (
    NdjsonToSse,
    SseToNdjson,
    StreamTranslator,
    open_stream,
)

__all__ = [
    "DEFAULT_TRAITS",
    "BackendTraits",
    "Endpoint",
    "NdjsonToSse",
    "SseToNdjson",
    "StreamTranslator",
    "Translated",
    "TranslationError",
    "content_type",
    "endpoint_for",
    "error_message",
    "needs_translation",
    "ollama_model_items",
    "open_stream",
    "openai_model_from_show",
    "openai_model_from_tag",
    "openai_model_items",
    "ps_from_openai_model",
    "show_from_openai_model",
    "tag_from_openai_model",
    "translate_error",
    "translate_request",
    "translate_response",
]
