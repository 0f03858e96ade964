"""Ollama's native routes (`/`, `/api/*`), statuses and bodies as in docs/protocol-notes.md §2–§4."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from . import wire
from .app import BLOBS_PREFIX, DIGEST_RE, Route
from .content import (
    embedding,
    estimate_tokens,
    make_plan,
    pick_tool,
    show_body,
    token_budget,
    truncate_dims,
)
from .exchange import Exchange
from .fields import (
    check_images,
    check_top_logprobs,
    conversation_text,
    go_quote,
    last_user_text,
    options_of,
    parse_think,
    seed_of,
)
from .generation import native_error, run_after, run_generation, run_progress
from .gojson import BodyError, decode_object, dumps, opt_bool, opt_str, type_error
from .models import ModelEntry, go_time, parse_keep_alive, parse_name
from .sources import ChatSource, GenerateSource

if TYPE_CHECKING:
    from .app import SimApp

# Progress steps reported for the big layer of a pull or push.
PROGRESS_STEPS = 4
# Model names the fake registry does not have (pull fails mid-stream like Ollama's).
MISSING_PREFIXES = ("missing", "nonexistent")


class NativeRoutes:
    """Handlers for the native API; each takes an Exchange and answers it."""

    def __init__(self, app: SimApp) -> None:
        self.app = app
        self.store = app.store

    def register(self) -> None:
        """Add the native routes to the app's table (gin's GenerateRoutes)."""
        add = self.app.add
        add("/", Route({"GET": self.root, "HEAD": self.root}))
        add("/api/version", Route({"GET": self.version, "HEAD": self.version}))
        add("/api/status", Route({"GET": self.status}))
        add("/api/tags", Route({"GET": self.tags, "HEAD": self.tags}))
        add("/api/ps", Route({"GET": self.ps}))
        add("/api/generate", Route({"POST": self.generate}, inference=True))
        add("/api/chat", Route({"POST": self.chat}, inference=True))
        add("/api/embed", Route({"POST": self.embed}, inference=True))
        add("/api/embeddings", Route({"POST": self.embeddings}, inference=True))
        add("/api/show", Route({"POST": self.show}))
        add("/api/pull", Route({"POST": self.pull}))
        add("/api/push", Route({"POST": self.push}))
        add("/api/create", Route({"POST": self.create}))
        add("/api/copy", Route({"POST": self.copy}))
        add("/api/delete", Route({"DELETE": self.delete}))
        self.app.blob_route = Route({"HEAD": self.head_blob, "POST": self.post_blob})

    # -- helpers ---------------------------------------------------------------

    @staticmethod
    def _bind(ex: Exchange, struct: str) -> dict[str, Any] | None:
        """ShouldBindJSON: the request object, or None after answering 400."""
        try:
            return decode_object(ex.req.body, struct)
        except BodyError as err:
            ex.send_error(400, str(err))
            return None

    def _created_at(self) -> str:
        """time.Now().UTC() as Go marshals it."""
        return self.app.clock.created_at()

    # -- general ---------------------------------------------------------------

    def root(self, ex: Exchange) -> None:
        """GET/HEAD / — the CLI's heartbeat."""
        ex.send_text(200, b"Ollama is running", wire.CT_TEXT_GIN)

    def version(self, ex: Exchange) -> None:
        """GET/HEAD /api/version."""
        ex.send_json(200, {"version": self.app.options.version})

    def status(self, ex: Exchange) -> None:
        """GET /api/status (newer versions): cloud features on, decided by no setting."""
        ex.send_json(200, {"cloud": {"disabled": False, "source": "none"}})

    def tags(self, ex: Exchange) -> None:
        """GET/HEAD /api/tags: `models` is [] (never null) when empty."""
        ex.send_json(200, {"models": self.store.tags()})

    def ps(self, ex: Exchange) -> None:
        """GET /api/ps: models used within their keep_alive."""
        ex.send_json(200, {"models": self.store.ps()})

    # -- inference ---------------------------------------------------------------

    def generate(self, ex: Exchange) -> None:
        """POST /api/generate (streams by default; empty prompt loads or unloads)."""
        struct = "api.GenerateRequest"
        req = self._bind(ex, struct)
        if req is None:
            return
        try:
            model = opt_str(req, "model", struct)
            prompt = opt_str(req, "prompt", struct)
            stream = opt_bool(req, "stream", struct)
            # Optional fields are only validated when present (hot path of benchmarks).
            keep_alive = parse_keep_alive(req["keep_alive"]) if "keep_alive" in req else None
            think = parse_think(req["think"]) if "think" in req else False
            options = options_of(req, struct) if "options" in req else {}
            if "images" in req:
                check_images(req["images"], struct)
            if "top_logprobs" in req:
                check_top_logprobs(req)
        except BodyError as err:
            ex.send_error(400, str(err))
            return
        entry = self.store.find(model)
        if entry is None:
            ex.send_error(404, f"model '{model}' not found")
            return
        if prompt == "" and keep_alive == 0:
            self.store.unload(entry)
            ex.send_json(200, self._generate_stub(model, "unload"))
            return
        if entry.family.embedding_only:
            ex.send_error(400, f"{go_quote(model)} does not support generate")
            return
        self.store.touch(entry, keep_alive)
        if prompt == "":
            ex.send_json(200, self._generate_stub(model, "load"))
            return
        count, reason = token_budget(self.app.options.tokens, ex.req.header(b"x-sim-tokens"), options.get("num_predict"))
        plan = make_plan(prompt, seed_of(options), count, reason, think, req.get("format"))
        source = GenerateSource(plan, self.app.clock, model, req.get("raw") is not True)
        run_generation(
            self.app, ex, source, stream is not False, wire.CT_NDJSON, wire.CT_JSON_GIN, native_error, entry, keep_alive
        )

    def _generate_stub(self, model: str, reason: str) -> dict[str, Any]:
        """The single-object load/unload answer of /api/generate."""
        return {"model": model, "created_at": self._created_at(), "response": "", "done": True, "done_reason": reason}

    def chat(self, ex: Exchange) -> None:
        """POST /api/chat (streams by default; empty messages load or unload)."""
        struct = "api.ChatRequest"
        req = self._bind(ex, struct)
        if req is None:
            return
        try:
            model = opt_str(req, "model", struct)
            stream = opt_bool(req, "stream", struct)
            keep_alive = parse_keep_alive(req["keep_alive"]) if "keep_alive" in req else None
            think = parse_think(req["think"]) if "think" in req else False
            options = options_of(req, struct) if "options" in req else {}
            messages = req.get("messages") or []
            if not isinstance(messages, list):
                raise type_error(messages, struct, "messages", "[]api.Message")
            for message in messages:
                if isinstance(message, dict):
                    check_images(message.get("images"), "api.Message")
            tools = req.get("tools") or []
            if "top_logprobs" in req:
                check_top_logprobs(req)
        except BodyError as err:
            ex.send_error(400, str(err))
            return
        if model.strip() == "" or parse_name(model) is None:
            ex.send_error(400, "model is required")
            return
        entry = self.store.find(model)
        if entry is None:
            ex.send_error(404, f"model '{model}' not found")
            return
        if not messages and keep_alive == 0:
            self.store.unload(entry)
            ex.send_json(200, self._chat_stub(model, "unload"))
            return
        if entry.family.embedding_only:
            ex.send_error(400, f"{go_quote(model)} does not support chat")
            return
        self.store.touch(entry, keep_alive)
        if not messages:
            ex.send_json(200, self._chat_stub(model, "load"))
            return
        count, reason = token_budget(self.app.options.tokens, ex.req.header(b"x-sim-tokens"), options.get("num_predict"))
        text = conversation_text(messages)
        user_text = last_user_text(messages)
        tool = pick_tool(tools, user_text) if tools and user_text is not None else None
        plan = make_plan(text, seed_of(options), count, reason, think, req.get("format"), tool)
        run_generation(
            self.app, ex, ChatSource(plan, self.app.clock, model), stream is not False,
            wire.CT_NDJSON, wire.CT_JSON_GIN, native_error, entry, keep_alive,
        )

    def _chat_stub(self, model: str, reason: str) -> dict[str, Any]:
        """The single-object load/unload answer of /api/chat."""
        return {
            "model": model,
            "created_at": self._created_at(),
            "message": {"role": "assistant", "content": ""},
            "done_reason": reason,
            "done": True,
        }

    def embed(self, ex: Exchange) -> None:
        """POST /api/embed: normalized deterministic vectors, after ttft."""
        struct = "api.EmbedRequest"
        req = self._bind(ex, struct)
        if req is None:
            return
        try:
            model = opt_str(req, "model", struct)
            keep_alive = parse_keep_alive(req.get("keep_alive"))
        except BodyError as err:
            ex.send_error(400, str(err))
            return
        raw_input = req.get("input")
        if isinstance(raw_input, str):
            inputs = [raw_input] if raw_input else []
        elif isinstance(raw_input, list) and all(isinstance(v, str) for v in raw_input):
            inputs = list(raw_input)
        elif raw_input is None:
            inputs = []
        else:
            ex.send_error(400, "invalid input type")
            return
        entry = self.store.find(model)
        if entry is None:
            ex.send_error(404, f"model '{model}' not found")
            return
        self.store.touch(entry, keep_alive)
        if not inputs:
            ex.send_json(200, {"model": model, "embeddings": []})
            return
        started = self.app.loop.time()

        def answer() -> None:
            """Vectors are ready."""
            dim = entry.family.embedding_length
            vectors = [truncate_dims(embedding(entry.name.key, text, dim), req.get("dimensions")) for text in inputs]
            total = int((self.app.loop.time() - started) * 1e9)
            ex.send_json(200, {
                "model": model,
                "embeddings": vectors,
                "total_duration": total,
                "load_duration": total // 10,
                "prompt_eval_count": sum(estimate_tokens(text) for text in inputs),
            })

        run_after(self.app, ex, self.app.ttft_s, answer)

    def embeddings(self, ex: Exchange) -> None:
        """POST /api/embeddings (legacy): one vector, `embedding: []` for an empty prompt."""
        struct = "api.EmbeddingRequest"
        req = self._bind(ex, struct)
        if req is None:
            return
        try:
            model = opt_str(req, "model", struct)
            prompt = opt_str(req, "prompt", struct)
            keep_alive = parse_keep_alive(req.get("keep_alive"))
        except BodyError as err:
            ex.send_error(400, str(err))
            return
        if model.strip() == "" or parse_name(model) is None:
            ex.send_error(400, "model is required")
            return
        entry = self.store.find(model)
        if entry is None:
            ex.send_error(404, f"model {go_quote(model)} not found, try pulling it first")
            return
        self.store.touch(entry, keep_alive)
        if prompt == "":
            ex.send_json(200, {"embedding": []})
            return
        vector = list(embedding(entry.name.key, prompt, entry.family.embedding_length))
        run_after(self.app, ex, self.app.ttft_s, lambda: ex.send_json(200, {"embedding": vector}))

    # -- model management --------------------------------------------------------

    def show(self, ex: Exchange) -> None:
        """POST /api/show: always has model_info, details, capabilities, modelfile, parameters, template."""
        struct = "api.ShowRequest"
        req = self._bind(ex, struct)
        if req is None:
            return
        try:
            model = opt_str(req, "model", struct) or opt_str(req, "name", struct)
        except BodyError as err:
            ex.send_error(400, str(err))
            return
        if model == "":
            ex.send_error(400, "model is required")
            return
        entry = self.store.find(model)
        if entry is None:
            ex.send_error(404, f"model '{model}' not found")
            return
        ex.send_json(200, show_body(entry, req.get("verbose") is True, go_time(entry.modified)))

    def _progress_target(self, ex: Exchange, struct: str) -> tuple[dict[str, Any], str, bool | None] | None:
        """Common head of pull/push/create: body, `model`/`name`, `stream`."""
        req = self._bind(ex, struct)
        if req is None:
            return None
        try:
            name = opt_str(req, "model", struct) or opt_str(req, "name", struct)
            stream = opt_bool(req, "stream", struct)
        except BodyError as err:
            ex.send_error(400, str(err))
            return None
        return req, name, stream

    def pull(self, ex: Exchange) -> None:
        """POST /api/pull: progress lines; the model appears in tags at `success`."""
        target = self._progress_target(ex, "api.PullRequest")
        if target is None:
            return
        _req, raw, stream = target
        name = parse_name(raw)
        if name is None:
            ex.send_error(400, "invalid model name")
            return
        self.app.stats.pulls.append(raw)
        failing = self.app.options.pull_failures > 0
        if failing:
            self.app.options.pull_failures -= 1
        if name.model.lower().startswith(MISSING_PREFIXES):
            events: list[dict[str, Any]] = [
                {"status": "pulling manifest"},
                {"error": "pull model manifest: file does not exist"},
            ]
            run_progress(self.app, ex, events, stream is not False, None)
            return
        existing = self.store.models.get(name.key)
        digest = hashlib.sha256(name.key.encode()).hexdigest()
        total = existing.size if existing is not None else 1_000_000_000
        events = [{"status": "pulling manifest"}]
        for step in range(PROGRESS_STEPS + 1):
            events.append({
                "status": f"pulling {digest[:12]}",
                "digest": f"sha256:{digest}",
                "total": total,
                "completed": total * step // PROGRESS_STEPS,
            })
        small = hashlib.sha256(digest.encode()).hexdigest()
        events.append({"status": f"pulling {small[:12]}", "digest": f"sha256:{small}", "total": 1482, "completed": 1482})
        if failing:
            events.append({"error": "max retries exceeded: read tcp: connection reset by peer"})
        else:
            events += [{"status": "verifying sha256 digest"}, {"status": "writing manifest"},
                       {"status": "success"}]

        def commit() -> None:
            """The model is now local."""
            self.store.add(name)

        run_progress(self.app, ex, events, stream is not False, commit)

    def push(self, ex: Exchange) -> None:
        """POST /api/push: progress lines to the (fake) registry."""
        target = self._progress_target(ex, "api.PushRequest")
        if target is None:
            return
        _req, raw, stream = target
        if raw == "":
            ex.send_error(400, "model is required")
            return
        entry = self.store.find(raw)
        name = parse_name(raw)
        if entry is None or name is None:
            path = f"{name.host}/{name.namespace}/{name.model}/{name.tag}" if name else raw
            error = f"open /root/.ollama/models/manifests/{path}: no such file or directory"
            run_progress(self.app, ex, [{"error": error}], stream is not False, None)
            return
        events: list[dict[str, Any]] = [{"status": "retrieving manifest"}]
        for step in range(PROGRESS_STEPS + 1):
            events.append({
                "status": f"pushing {entry.digest[:12]}",
                "digest": f"sha256:{entry.digest}",
                "total": entry.size,
                "completed": entry.size * step // PROGRESS_STEPS,
            })
        events += [{"status": "pushing manifest"}, {"status": "success"}]
        run_progress(self.app, ex, events, stream is not False, None)

    def create(self, ex: Exchange) -> None:
        """POST /api/create from an existing model (`from`) and/or uploaded blobs (`files`)."""
        struct = "api.CreateRequest"
        target = self._progress_target(ex, struct)
        if target is None:
            return
        req, raw, stream = target
        name = parse_name(raw)
        if name is None:
            ex.send_error(400, "invalid model name")
            return
        try:
            source_name = opt_str(req, "from", struct)
            files = req.get("files") or {}
            if not isinstance(files, dict):
                raise type_error(files, struct, "files", "map[string]string")
        except BodyError as err:
            ex.send_error(400, str(err))
            return
        if not source_name and not files:
            ex.send_error(400, "neither 'from' or 'files' was specified")
            return
        parent: ModelEntry | None = None
        events: list[dict[str, Any]] = []
        if source_name:
            parent = self.store.find(source_name)
            if parent is None:
                ex.send(404, dumps({"error": f"model '{source_name}' not found"}), wire.CT_JSON)
                return
            events.append({"status": f"using existing layer sha256:{parent.digest}"})
        for digest in files.values():
            if not isinstance(digest, str) or not self.store.blob_exists(digest):
                ex.send_error(400, f"blob {go_quote(str(digest))} not found")
                return
            events.append({"status": f"using existing layer {digest.replace('-', ':', 1)}"})
        quantize = req.get("quantize")
        if isinstance(quantize, str) and quantize:
            events.append({"status": f"quantizing F16 model to {quantize}"})
        extras = {k: req[k] for k in ("template", "system", "parameters", "license", "messages") if req.get(k)}
        if extras:
            layer = hashlib.sha256(dumps(extras)).hexdigest()
            events.append({"status": f"creating new layer sha256:{layer}"})
        events += [{"status": "writing manifest"}, {"status": "success"}]

        def commit() -> None:
            """Register the new model."""
            entry = self.store.add(name, parent)
            if parent is not None:
                entry.parent_model = parent.name.display()
            if isinstance(req.get("template"), str):
                entry.template = req["template"]
            if isinstance(req.get("system"), str):
                entry.system = req["system"]
            if isinstance(req.get("parameters"), dict):
                entry.parameters.update(req["parameters"])

        run_progress(self.app, ex, events, stream is not False, commit)

    def copy(self, ex: Exchange) -> None:
        """POST /api/copy: 200 with an empty body; Go %q quotes in the errors."""
        struct = "api.CopyRequest"
        req = self._bind(ex, struct)
        if req is None:
            return
        try:
            source = opt_str(req, "source", struct)
            destination = opt_str(req, "destination", struct)
        except BodyError as err:
            ex.send_error(400, str(err))
            return
        if parse_name(source) is None:
            ex.send_error(400, f"source {go_quote(source)} is invalid")
            return
        dest_name = parse_name(destination)
        if dest_name is None:
            ex.send_error(400, f"destination {go_quote(destination)} is invalid")
            return
        entry = self.store.find(source)
        if entry is None:
            ex.send_error(404, f"model {go_quote(source)} not found")
            return
        self.store.add(dest_name, entry)
        ex.send(200, b"", None)

    def delete(self, ex: Exchange) -> None:
        """DELETE /api/delete with a JSON body: 200 and an empty body."""
        struct = "api.DeleteRequest"
        req = self._bind(ex, struct)
        if req is None:
            return
        try:
            raw = opt_str(req, "model", struct) or opt_str(req, "name", struct)
        except BodyError as err:
            ex.send_error(400, str(err))
            return
        if parse_name(raw) is None:
            ex.send_error(400, f"name {go_quote(raw)} is invalid")
            return
        entry = self.store.find(raw)
        if entry is None:
            ex.send_error(404, f"model '{raw}' not found")
            return
        self.store.remove(entry)
        self.app.stats.deletes.append(raw)
        ex.send(200, b"", None)

    # -- blobs -----------------------------------------------------------------

    def head_blob(self, ex: Exchange) -> None:
        """HEAD /api/blobs/:digest: 200 if present, 404 if not, 400 for a bad digest."""
        digest = ex.req.path[len(BLOBS_PREFIX) :]
        if DIGEST_RE.fullmatch(digest) is None:
            ex.send_error(400, "invalid digest format")
        elif self.store.blob_exists(digest):
            ex.send(200, b"", None)
        else:
            ex.send_error(404, f"blob {go_quote(digest)} not found")

    def post_blob(self, ex: Exchange) -> None:
        """POST /api/blobs/:digest after the body was hashed: 201, 200 (exists) or 400 (mismatch)."""
        req = ex.req
        digest = req.path[len(BLOBS_PREFIX) :]
        if DIGEST_RE.fullmatch(digest) is None:
            ex.send_error(400, "invalid digest format")
            return
        if self.store.blob_exists(digest):
            ex.send(200, b"", None)
            return
        if req.sink is None:
            # Defensive: an unexpected path without the streaming hasher.
            req.sink = hashlib.sha256(req.body)
            req.size = len(req.body)
        got = "sha256:" + req.sink.hexdigest()
        if got != digest:
            ex.send_error(400, f"digest mismatch, expected {go_quote(digest)}, got {go_quote(got)}")
            return
        self.store.add_blob(digest, req.size)
        ex.send(201, b"", None)

