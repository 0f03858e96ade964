"""Routes the gateway answers itself, from fleet state (no backend slot taken)."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.parse
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import orjson

from ollamamq_fast import __version__
from ollamamq_fast.fleet.backend import ApiKind
from ollamamq_fast.fleet.models import namespace_of, normalize_model
from ollamamq_fast.proxy.state import State
from ollamamq_fast.wire.routes import V1_MODEL_PREFIX, Local, Route
from ollamamq_fast.wire.translate.models import (
    ps_from_openai_model,
    tag_from_openai_model,
)

if TYPE_CHECKING:
    from ollamamq_fast.fleet.backend import Backend
    from ollamamq_fast.fleet.select import Fleet
    from ollamamq_fast.plane import DataPlane
    from ollamamq_fast.proxy.exchange import Exchange

_JSON: Final = b"application/json; charset=utf-8"
_OPENAI_JSON: Final = b"application/json"
_TEXT: Final = b"text/plain; charset=utf-8"


class LocalRoutes:
    """Answers LOCAL routes for an exchange."""

    def __init__(self, gw: DataPlane) -> None:
        self.gw = gw
        self.tasks: set[asyncio.Task[None]] = set()
        # /api/ps fetches under way, by fleet: requests that arrive meanwhile
        # share one (the route needs no key; one fetch per request would let
        # any client multiply backend requests and starve the health probes).
        self.ps_flights: dict[Fleet, asyncio.Task[list[dict[str, Any]]]] = {}

    def answer(self, ex: Exchange, route: Route) -> None:
        """Write the answer for a local route (async ones finish later)."""
        which = route.local
        if which is Local.HEALTH:
            ex.respond(200, _JSON, orjson.dumps(self.health(ex)))
        elif which is Local.READY:
            ready, answer = self.gw.readiness()
            ex.respond(200 if ready else 503, _JSON, orjson.dumps(answer))
        elif which is Local.ROOT:
            self._root(ex)
        elif which is Local.VERSION:
            version = self.version(ex)
            if version is None:
                # As if Ollama were unreachable: no version is made up.
                ex.respond_error(503, "no Ollama backend is online", retry_after=5)
            else:
                ex.respond(200, _JSON, orjson.dumps({"version": version}))
        elif which is Local.TAGS:
            tags = self.tags(ex.fleet.backends)
            if ex.pool.aliases:
                tags += ex.pool.tag_aliases(tags)
            ex.respond(200, _JSON, orjson.dumps({"models": tags}))
        elif which is Local.V1_MODELS:
            data = self.v1_models(ex.fleet.backends)
            if ex.pool.aliases:
                data += ex.pool.v1_aliases(data)
            body = orjson.dumps({"object": "list", "data": data or None}) + b"\n"
            ex.respond(200, _OPENAI_JSON, body)
        elif which is Local.V1_MODEL:
            self._v1_model(ex)
        elif which is Local.PS:
            task = self.gw.loop.create_task(self._ps(ex))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def health(self, ex: Exchange | None = None) -> dict[str, Any]:
        """Liveness plus a short summary of the fleet and queue (of the request's pool)."""
        fleet = self.gw.fleet if ex is None else ex.fleet
        dispatcher = self.gw.dispatcher if ex is None else ex.dispatcher
        online = sum(1 for b in fleet.backends if b.online)
        return {
            "status": "ok" if online else "degraded",
            "version": __version__,
            "backends_online": online,
            "backends_total": len(fleet.backends),
            "queued": len(dispatcher.queue),
            "in_flight": sum(b.in_flight for b in fleet.backends),
            "uptime_s": round(time.monotonic() - self.gw.started_at, 1),
        }

    def _root(self, ex: Exchange) -> None:
        fleet = ex.fleet
        online = sum(1 for b in fleet.backends if b.online)
        extra = b"X-Gateway-Backends-Online: %d/%d\r\n" % (online, len(fleet.backends))
        if online:
            ex.respond(200, _TEXT, b"Ollama is running", extra=extra)
        else:
            ex.respond(503, _TEXT, b"Ollama gateway is running, but no backend is online", extra=extra)

    def version(self, ex: Exchange | None = None) -> str | None:
        """The version of the first online Ollama backend (clients compare it with theirs)."""
        for b in (self.gw.fleet if ex is None else ex.fleet).backends:
            if b.online and b.kind is ApiKind.OLLAMA and b.version:
                return b.version
        return None

    def tags(self, backends: list[Backend] | None = None) -> list[dict[str, Any]]:
        """Models of all online backends (of a pool), de-duplicated by normalized name.

        Ollama backends' own entries come first; a model only OpenAI-compatible
        servers list is described from their /v1/models items (its requests
        are translated, proxy/translating.py).
        """
        merged: dict[str, dict[str, Any]] = {}
        if backends is None:
            backends = self.gw.fleet.backends
        for b in backends:
            if b.online and b.kind is ApiKind.OLLAMA:
                for key, entry in b.models.items():
                    merged.setdefault(key, entry)
        for b in backends:
            if b.online and b.kind is not ApiKind.OLLAMA:
                for item in b.v1_models:
                    key = normalize_model(str(item.get("id", "")))
                    if key not in merged:
                        merged[key] = tag_from_openai_model(item)
        return list(merged.values())

    def v1_models(self, backends: list[Backend] | None = None) -> list[dict[str, Any]]:
        """OpenAI model objects across all online backends (of a pool), de-duplicated by id."""
        merged: dict[str, dict[str, Any]] = {}
        for b in self.gw.fleet.backends if backends is None else backends:
            if not b.online:
                continue
            if b.kind is not ApiKind.OLLAMA:
                for item in b.v1_models:
                    merged.setdefault(normalize_model(str(item["id"])), item)
            else:
                for key, entry in b.models.items():
                    name = str(entry.get("name") or entry.get("model") or key)
                    merged.setdefault(
                        key,
                        {
                            "id": name,
                            "object": "model",
                            "created": _epoch(entry.get("modified_at")),
                            "owned_by": namespace_of(name),
                        },
                    )
        return list(merged.values())

    def _v1_model(self, ex: Exchange) -> None:
        raw = ex.path[len(V1_MODEL_PREFIX) :].decode("utf-8", "replace")
        name = urllib.parse.unquote(raw)
        found = None
        if "/" not in name:
            model = normalize_model(name)
            target = ex.pool.alias_target(model) if ex.pool.aliases else None
            found = ex.fleet.find_model_entry(normalize_model(target) if target else model)
        else:
            # Ollama's route has no room for a '/' (a 404, kept for the models
            # Ollama serves), but an OpenAI-compatible server's ids are often
            # namespaced (vLLM's "Qwen/Qwen2.5-0.5B-Instruct", which the SDKs send
            # as Qwen%2F...): each id /v1/models lists can be retrieved.
            model = normalize_model(name)
            for b in ex.fleet.backends:
                if b.online and b.kind is not ApiKind.OLLAMA and model in b.models:
                    found = b, b.models[model]
                    break
        if found is None:
            ex.respond_error(404, f"model '{name}' not found")
            return
        backend, entry = found
        created = _epoch(entry.get("modified_at"))
        owner = namespace_of(name)
        if backend.kind is not ApiKind.OLLAMA:
            # As the list gives it: the server's own item.
            for item in backend.v1_models:
                if normalize_model(str(item["id"])) == normalize_model(name):
                    stamp = item.get("created")
                    created = stamp if isinstance(stamp, int) else created
                    owner = str(item.get("owned_by") or owner)
        body = {"id": name, "object": "model", "created": created, "owned_by": owner}
        ex.respond(200, _OPENAI_JSON, orjson.dumps(body) + b"\n")

    async def _ps(self, ex: Exchange) -> None:
        fleet = ex.fleet
        flight = self.ps_flights.get(fleet)
        if flight is None:
            flight = self.gw.loop.create_task(self.gw.health.fetch_ps(fleet.backends))
            self.ps_flights[fleet] = flight
            flight.add_done_callback(lambda _done: self.ps_flights.pop(fleet, None))
        models = list(await asyncio.shield(flight))  # a copy: the others' answers share it
        seen = {normalize_model(str(m.get("name") or m.get("model") or "")) for m in models}
        for b in ex.fleet.backends:
            # An OpenAI-compatible server keeps the models it serves loaded.
            if b.online and b.kind is not ApiKind.OLLAMA:
                for item in b.v1_models:
                    key = normalize_model(str(item.get("id", "")))
                    if key not in seen:
                        seen.add(key)
                        models.append(ps_from_openai_model(item))
        if ex.state is not State.DONE:
            ex.respond(200, _JSON, orjson.dumps({"models": models}))


_FRACTION: Final = re.compile(r"(\.\d{1,6})\d*")


def _epoch(stamp: object) -> int:
    """Unix seconds of an RFC 3339 stamp (Go writes up to 9 fractional digits)."""
    if isinstance(stamp, str):
        try:
            text = _FRACTION.sub(r"\1", stamp.replace("Z", "+00:00"), count=1)
            return int(datetime.fromisoformat(text).timestamp())
        except ValueError:
            pass
    return int(time.time())
