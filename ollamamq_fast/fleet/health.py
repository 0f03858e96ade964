"""Health probes and model discovery (aiohttp: control traffic, off the data plane).

Every backend is probed concurrently, each probe with its own short timeout,
so one hung backend never delays the others. A probe finds the API kind
(`/api/tags` answers: Ollama; else `/v1/models` answers: OpenAI-compatible),
the models, the loaded models (`/api/ps`) and the version.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import aiohttp
import orjson

from ollamamq_fast.fleet.backend import ApiKind, Backend
from ollamamq_fast.fleet.models import normalize_model
from ollamamq_fast.fleet.select import Fleet
from ollamamq_fast.tasks import cancel_and_wait

log = logging.getLogger("ollamamq_fast.health")

# Probe answers are small JSON documents; a short budget keeps a hung backend
# from holding the probe round.
PROBE_TIMEOUT_S = 3.0


class HealthChecker:
    """Periodic probes with failure thresholds; refreshes the fleet's model index."""

    def __init__(
        self,
        fleet: Fleet,
        interval: float,
        fail_threshold: int = 2,
        ok_threshold: int = 1,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.fleet = fleet
        self.interval = interval
        self.fail_threshold = fail_threshold
        self.ok_threshold = ok_threshold
        self.on_change = on_change
        self.session: aiohttp.ClientSession | None = None
        self.task: asyncio.Task[None] | None = None
        self.pending: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Probe every backend once (bounded by the probe timeout), then keep probing."""
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S),
            json_serialize=lambda o: orjson.dumps(o).decode(),
        )
        await self.probe_all()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop probing and close the HTTP session."""
        await cancel_and_wait(self.task)
        for task in list(self.pending):
            task.cancel()
        if self.session is not None:
            await self.session.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.probe_all()

    async def probe_all(self) -> None:
        """Probe all backends at once and rebuild the model index."""
        await asyncio.gather(*(self.probe(b) for b in list(self.fleet.backends)))

    def refresh_soon(self, backend: Backend) -> None:
        """Probe one backend now (after a pull/create/delete changed its models)."""
        task = asyncio.get_running_loop().create_task(self.probe(backend))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def probe(self, backend: Backend) -> None:
        """Probe one backend and update its state."""
        try:
            await self._probe(backend)
            backend.probe_failures = 0
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            self._failed(backend, f"probe failed: {exc!r}")
        else:
            backend.consecutive_successes += 1
            first = backend.probes_ok == 0
            backend.probes_ok += 1
            if not backend.online and (first or backend.consecutive_successes >= self.ok_threshold):
                log.info("backend %s is online (%s)", backend.name, backend.kind.value)
                backend.online = True
        self.fleet.rebuild_index()
        if self.on_change is not None:
            self.on_change()

    def _failed(self, backend: Backend, why: str) -> None:
        backend.consecutive_successes = 0
        backend.probe_failures += 1
        backend.last_error = why
        if backend.online and backend.probe_failures >= self.fail_threshold:
            log.warning("backend %s is offline: %s", backend.name, why)
            backend.online = False

    async def _get_json(self, backend: Backend, path: str) -> tuple[int, Any]:
        assert self.session is not None
        async with self.session.get(backend.address.url + path) as resp:
            raw = await resp.read()
            if resp.status != 200:
                return resp.status, None
            return 200, orjson.loads(raw)

    async def _probe(self, backend: Backend) -> None:
        status, tags = await self._get_json(backend, "/api/tags")
        if status == 200 and isinstance(tags, dict) and "models" in tags:
            backend.kind = ApiKind.OLLAMA
            models: dict[str, dict[str, Any]] = {}
            for entry in tags.get("models") or []:
                name = entry.get("name") or entry.get("model")
                if isinstance(name, str) and name:
                    models[normalize_model(name)] = entry
            backend.models = models
            backend.v1_models = []
            _, version = await self._get_json(backend, "/api/version")
            if isinstance(version, dict):
                backend.version = str(version.get("version") or "") or None
            status, ps = await self._get_json(backend, "/api/ps")
            if status == 200 and isinstance(ps, dict):
                backend.loaded = {
                    normalize_model(m.get("name") or m.get("model") or "")
                    for m in ps.get("models") or []
                }
            return
        status, listing = await self._get_json(backend, "/v1/models")
        if status != 200 or not isinstance(listing, dict):
            raise ValueError(f"neither /api/tags nor /v1/models answered (status {status})")
        lmstudio, _ = await self._get_json(backend, "/api/v0/models")
        backend.kind = ApiKind.LMSTUDIO if lmstudio == 200 else ApiKind.OPENAI
        items = [i for i in (listing.get("data") or []) if isinstance(i, dict) and i.get("id")]
        backend.v1_models = items
        backend.models = {normalize_model(str(i["id"])): _tags_entry(i) for i in items}
        backend.loaded = set()

    async def fetch_ps(self) -> list[dict[str, Any]]:
        """Loaded models across online Ollama backends, asked live, de-duplicated."""
        backends = [b for b in self.fleet.backends if b.online and b.kind is ApiKind.OLLAMA]

        async def one(b: Backend) -> list[dict[str, Any]]:
            try:
                status, ps = await self._get_json(b, "/api/ps")
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
                return []
            if status != 200 or not isinstance(ps, dict):
                return []
            return [m for m in ps.get("models") or [] if isinstance(m, dict)]

        merged: dict[str, dict[str, Any]] = {}
        for models in await asyncio.gather(*(one(b) for b in backends)):
            for m in models:
                key = normalize_model(str(m.get("name") or m.get("model") or ""))
                merged.setdefault(key, m)
        return list(merged.values())


def _tags_entry(item: dict[str, Any]) -> dict[str, Any]:
    """An /api/tags-shaped entry for a model an OpenAI-compatible backend lists."""
    created = item.get("created")
    when = datetime.fromtimestamp(created if isinstance(created, int) else time.time())
    name = str(item["id"])
    return {
        "name": name,
        "model": name,
        "modified_at": when.astimezone().isoformat(),
        "size": 0,
        "digest": "",
        "details": {"parent_model": "", "format": "", "family": "", "families": None,
                    "parameter_size": "", "quantization_level": ""},
    }
