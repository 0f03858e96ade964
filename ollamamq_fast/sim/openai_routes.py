"""Ollama's OpenAI-compatible routes (`/v1/*`), docs/protocol-notes.md §5, current SSE layout."""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Any

from . import wire
from .app import MODELS_PREFIX, Route, openai_error_body
from .content import (
    embedding,
    empty_plan,
    estimate_tokens,
    float32_base64,
    make_plan,
    pick_tool,
    token_budget,
    truncate_dims,
)
from .exchange import Exchange
from .fields import conversation_text, go_quote, last_user_text, seed_of
from .generation import run_after, run_generation
from .gojson import BodyError, MissingBody, decode_object, dumps, opt_str, type_error
from .models import DEFAULT_NAMESPACE, ModelEntry, parse_name
from .sources import ChatSSESource, CompletionSSESource

if TYPE_CHECKING:
    from .app import SimApp

_IMAGE_PREFIXES = ("data:;base64,", "data:image/jpeg;base64,", "data:image/jpg;base64,", "data:image/png;base64,", "data:image/webp;base64,")


class OpenAIRoutes:
    """Handlers for /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models."""

    def __init__(self, app: SimApp) -> None:
        self.app = app
        self.store = app.store

    def register(self) -> None:
        """Add the /v1 routes to the app's table."""
        add = self.app.add
        add("/v1/chat/completions", Route({"POST": self.chat}, inference=True, openai=True))
        add("/v1/completions", Route({"POST": self.completions}, inference=True, openai=True))
        add("/v1/embeddings", Route({"POST": self.embeddings}, inference=True, openai=True))
        add("/v1/models", Route({"GET": self.list_models}, openai=True))
        self.app.model_route = Route({"GET": self.retrieve_model}, openai=True)

    # -- helpers ---------------------------------------------------------------

    @staticmethod
    def _middleware_error(ex: Exchange, message: str) -> None:
        """A 400 from an OpenAI middleware: gin's AbortWithStatusJSON (charset, no newline)."""
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
        ex.send(400, dumps(body), wire.CT_JSON_GIN)

    @staticmethod
    def _error(ex: Exchange, status: int, message: str) -> None:
        """A handler error rewritten by the middleware's writeError (json.Encoder, newline)."""
        ex.send(status, openai_error_body(status, message), wire.CT_JSON)

    def _bind(self, ex: Exchange, struct: str) -> dict[str, Any] | None:
        """ShouldBindJSON in the middleware; an empty body reports Go's bare `EOF`."""
        try:
            return decode_object(ex.req.body, struct)
        except MissingBody:
            self._middleware_error(ex, "EOF")
        except BodyError as err:
            self._middleware_error(ex, str(err))
        return None

    @staticmethod
    def _stream_options(req: dict[str, Any], struct: str) -> tuple[bool, bool]:
        """(`stream`, `stream_options.include_usage`); stream is a plain bool defaulting to false."""
        stream = req.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise type_error(stream, struct, "stream", "bool")
        options = req.get("stream_options")
        include = isinstance(options, dict) and options.get("include_usage") is True
        return bool(stream), include

    @staticmethod
    def _max_tokens(req: dict[str, Any], struct: str) -> int | None:
        """`max_tokens` becomes num_predict."""
        value = req.get("max_tokens")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise type_error(value, struct, "max_tokens", "int")
        return value

    # -- chat ----------------------------------------------------------------------

    def chat(self, ex: Exchange) -> None:
        """POST /v1/chat/completions: JSON by default, SSE with `stream:true`."""
        struct = "openai.ChatCompletionRequest"
        req = self._bind(ex, struct)
        if req is None:
            return
        try:
            stream, include_usage = self._stream_options(req, struct)
            model = opt_str(req, "model", struct)
            max_tokens = self._max_tokens(req, struct)
            messages = req.get("messages") or []
            if not isinstance(messages, list):
                raise type_error(messages, struct, "messages", "[]openai.Message")
        except BodyError as err:
            self._middleware_error(ex, str(err))
            return
        if not messages:
            self._middleware_error(ex, "[] is too short - 'messages'")
            return
        problem = _check_messages(messages)
        if problem is not None:
            self._middleware_error(ex, problem)
            return
        if model.strip() == "" or parse_name(model) is None:
            self._error(ex, 400, "model is required")
            return
        entry = self._model(ex, model)
        if entry is None:
            return
        if entry.family.embedding_only:
            self._error(ex, 400, f"{go_quote(model)} does not support chat")
            return
        self.store.touch(entry, None)
        count, reason = token_budget(self.app.options.tokens, ex.req.header(b"x-sim-tokens"), max_tokens)
        think = _reasoning(req)
        tools = req.get("tools") or []
        user_text = last_user_text(messages)
        tool = pick_tool(tools, user_text) if tools and user_text is not None else None
        fmt = _response_format(req.get("response_format"))
        seed = seed_of({"seed": req.get("seed")})
        plan = make_plan(conversation_text(messages), seed, count, reason, think, fmt, tool)
        ident = f"chatcmpl-{random.randrange(999)}"
        source = ChatSSESource(plan, self.app.clock, model, ident, int(time.time()), include_usage)
        run_generation(self.app, ex, source, stream, wire.CT_SSE, wire.CT_JSON, self._error)

    # -- completions -----------------------------------------------------------------

    def completions(self, ex: Exchange) -> None:
        """POST /v1/completions: `prompt` must be a string; chunks are `text_completion`."""
        struct = "openai.CompletionRequest"
        req = self._bind(ex, struct)
        if req is None:
            return
        try:
            stream, include_usage = self._stream_options(req, struct)
            model = opt_str(req, "model", struct)
            prompt = opt_str(req, "prompt", struct)
            max_tokens = self._max_tokens(req, struct)
        except BodyError as err:
            self._middleware_error(ex, str(err))
            return
        entry = self._model(ex, model)
        if entry is None:
            return
        if entry.family.embedding_only:
            self._error(ex, 400, f"{go_quote(model)} does not support generate")
            return
        self.store.touch(entry, None)
        if prompt == "":
            # Ollama's generate treats an empty prompt as a load: no tokens, finish_reason "load".
            plan = empty_plan("load")
        else:
            count, reason = token_budget(self.app.options.tokens, ex.req.header(b"x-sim-tokens"), max_tokens)
            plan = make_plan(prompt, seed_of({"seed": req.get("seed")}), count, reason, False)
        ident = f"cmpl-{random.randrange(999)}"
        source = CompletionSSESource(plan, self.app.clock, model, ident, int(time.time()), include_usage)
        run_generation(self.app, ex, source, stream, wire.CT_SSE, wire.CT_JSON, self._error)

    # -- embeddings ------------------------------------------------------------------

    def embeddings(self, ex: Exchange) -> None:
        """POST /v1/embeddings: float lists or base64 float32."""
        struct = "openai.EmbedRequest"
        req = self._bind(ex, struct)
        if req is None:
            return
        try:
            model = opt_str(req, "model", struct)
            encoding = opt_str(req, "encoding_format", struct)
        except BodyError as err:
            self._middleware_error(ex, str(err))
            return
        if encoding and encoding.lower() not in ("float", "base64"):
            self._middleware_error(ex, f"Invalid value for 'encoding_format' = {encoding}. Supported values: ['float', 'base64'].")
            return
        raw_input = req.get("input")
        if raw_input == "":
            raw_input = [""]
        if raw_input is None or raw_input == []:
            self._middleware_error(ex, "invalid input")
            return
        if isinstance(raw_input, str):
            inputs = [raw_input]
        elif isinstance(raw_input, list) and all(isinstance(v, str) for v in raw_input):
            inputs = list(raw_input)
        else:
            self._error(ex, 400, "invalid input type")
            return
        entry = self._model(ex, model)
        if entry is None:
            return
        self.store.touch(entry, None)
        as_base64 = encoding.lower() == "base64"

        def answer() -> None:
            """The embedding list."""
            dim = entry.family.embedding_length
            data = []
            for index, text in enumerate(inputs):
                vector = truncate_dims(embedding(entry.name.key, text, dim), req.get("dimensions"))
                data.append({"object": "embedding", "embedding": float32_base64(vector) if as_base64 else vector, "index": index})
            tokens = sum(estimate_tokens(text) for text in inputs)
            body = {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
            ex.send(200, dumps(body) + b"\n", wire.CT_JSON)

        run_after(self.app, ex, self.app.ttft_s, answer)

    def _model(self, ex: Exchange, model: str) -> ModelEntry | None:
        """The model a request names, or None when answered 404 (as Ollama, or as vLLM
        with `exact_ids`: only the id exactly as /v1/models lists it)."""
        entry = self.store.find(model)
        if entry is None:
            self._error(ex, 404, f"model '{model}' not found")
            return None
        if self.app.options.exact_ids and self._listed_id(entry) != model:
            self._error(ex, 404, f"The model `{model}` does not exist.")
            return None
        return entry

    def _listed_id(self, entry: ModelEntry) -> str:
        """A model's id in /v1/models: Ollama's name with its tag; with `exact_ids`, as
        vLLM serves names, without the default `:latest`."""
        name = entry.name.display()
        if self.app.options.exact_ids and name.endswith(":latest"):
            return name[: -len(":latest")]
        return name

    # -- models ----------------------------------------------------------------------

    def list_models(self, ex: Exchange) -> None:
        """GET /v1/models: `data` is null when there are no models."""
        data = [
            {"id": self._listed_id(e), "object": "model", "created": int(e.modified), "owned_by": e.name.namespace}
            for e in self.store.ordered()
        ]
        ex.send(200, dumps({"object": "list", "data": data or None}) + b"\n", wire.CT_JSON)

    def retrieve_model(self, ex: Exchange) -> None:
        """GET /v1/models/:model: the id echoes the path as given."""
        param = ex.req.path[len(MODELS_PREFIX) :]
        entry = self.store.find(param)
        if entry is None:
            self._error(ex, 404, f"model '{param}' not found")
            return
        name = parse_name(param)
        owner = name.namespace if name is not None else DEFAULT_NAMESPACE
        body = {"id": param, "object": "model", "created": int(entry.modified), "owned_by": owner}
        ex.send(200, dumps(body) + b"\n", wire.CT_JSON)


def _check_messages(messages: list[Any]) -> str | None:
    """openai.FromChatRequest validation; returns the error text or None."""
    for message in messages:
        if not isinstance(message, dict):
            return "invalid message format"
        content = message.get("content")
        if isinstance(content, str):
            continue
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    return "invalid message format"
                kind = part.get("type")
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        return "invalid message format"
                elif kind == "image_url":
                    url = part.get("image_url")
                    if isinstance(url, dict):
                        url = url.get("url")
                    if not isinstance(url, str):
                        return "invalid message format"
                    if not url.startswith(_IMAGE_PREFIXES):
                        return "invalid image input"
                elif kind != "input_audio":
                    return "invalid message format"
            continue
        if message.get("tool_calls") is None:
            return f"invalid message content type: {_go_type_name(content)}"
    return None


def _go_type_name(value: Any) -> str:
    """%T of a decoded JSON value."""
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "float64"
    return "map[string]interface {}"


def _reasoning(req: dict[str, Any]) -> bool:
    """reasoning_effort / reasoning.effort -> think ("none" turns it off)."""
    effort = req.get("reasoning_effort")
    reasoning = req.get("reasoning")
    if effort is None and isinstance(reasoning, dict):
        effort = reasoning.get("effort")
    return isinstance(effort, str) and effort != "" and effort != "none"


def _response_format(value: Any) -> Any:
    """response_format -> Ollama `format`: json_object is "json", json_schema its schema."""
    if not isinstance(value, dict):
        return None
    kind = value.get("type")
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        schema = value.get("json_schema")
        if isinstance(schema, dict) and isinstance(schema.get("schema"), dict):
            return schema["schema"]
    return None
