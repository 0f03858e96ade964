"""Active health checks and model discovery (aiohttp: control traffic, off the data plane).

Health checks must never hurt the traffic they watch:
- Live traffic is the first judge. A backend with requests running, or one that
  answered a request since the last check, is alive: the check sends nothing.
  Passive failures (refused, reset, fast 5xx) still open its breaker (passive.py).
- Some servers serve one request at a time behind a lock. llama-cpp-python stops
  its running stream when any other request arrives (`interrupt_requests`, on by
  default); with that off, the other request waits for the generation to end.
  So a probe goes only to an idle backend, and a probe that fails or times out
  while requests run there is not held against the backend.
- The API kind is configured per backend or detected once, at first contact.
  After that each check sends exactly one request the kind understands (no
  `/api/tags` 404s in an OpenAI-compatible server's log).
- Model lists refresh every `models_interval` seconds, or at once after a
  pull/create/delete through the gateway. For OpenAI-compatible kinds the
  liveness request is the model list itself, so it is always fresh.
- A backend may set `probe_path` and `probe_interval` (a path known to answer
  at once even while the server generates, e.g. llama-server's `/health`): that
  path is then probed on that schedule, idle or not.

Every backend is checked concurrently, each request with its own short timeout,
so one hung backend never delays the others.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import aiohttp
import orjson

from ollamamq_fast.fleet.backend import ApiKind, Backend, Breaker
from ollamamq_fast.fleet.models import normalize_model
from ollamamq_fast.tasks import cancel_and_wait

log = logging.getLogger("ollamamq_fast.health")

# Probe answers are small JSON documents; a short budget keeps a hung backend
# from holding the check round.
PROBE_TIMEOUT_S = 3.0
# Model lists change rarely (and the gateway re-reads them itself after a
# pull/create/delete it relayed): refreshed this often, not at every check.
MODELS_REFRESH_S = 60.0
# The loop never sleeps less than this between rounds (a tiny probe_interval
# must not spin it).
MIN_TICK_S = 0.01
# The largest answer read from a backend's control routes (model lists, /api/ps,
# a pull's error): a thousand models' /api/tags is under 1 MiB. A faulty backend
# sending more (an endless body) fails the check instead of filling memory for
# as long as the probe's timeout lets it.
CONTROL_BODY_MAX = 16 * 1024 * 1024

# What `owned_by` in a /v1/models answer says about the server behind it.
_OWNERS = {
    "llamacpp": ApiKind.LLAMACPP,  # llama.cpp's llama-server
    "me": ApiKind.LLAMACPP,  # llama-cpp-python's server
    "vllm": ApiKind.VLLM,
    "organization_owner": ApiKind.LMSTUDIO,
}

_PROBE_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError)

# Kinds that answer a model-list request at once while they generate: their list
# is re-read when due even while requests run, so that one never idle (steady
# traffic) still learns of a model pulled on its host or a LoRA adapter loaded.
# Not llama.cpp's kind: llama-cpp-python's server would stop its running stream.
_LISTS_WHILE_BUSY = frozenset((ApiKind.OLLAMA, ApiKind.VLLM, ApiKind.LMSTUDIO))


class FleetView(Protocol):
    """What the checker needs of the fleet: every backend, and a model index to rebuild."""

    @property
    def backends(self) -> list[Backend]:
        """Every backend to check."""
        ...

    def rebuild_index(self) -> None:
        """Recompute model indexes after a check."""
        ...


@dataclass(slots=True)
class _Watch:
    """What the checker remembers about one backend between checks."""

    next_check: float = 0.0  # loop time of the next check
    done_seen: int = -1  # backend.requests_done at the last check
    models_at: float = -math.inf  # loop time of the last model-list refresh


class HealthChecker:
    """Periodic checks with failure thresholds; refreshes the fleet's model index."""

    def __init__(
        self,
        fleet: FleetView,
        interval: float,
        fail_threshold: int = 2,
        ok_threshold: int = 1,
        on_change: Callable[[], None] | None = None,
        probe_timeout: float | None = None,
        models_interval: float | None = None,
    ) -> None:
        self.fleet = fleet
        self.interval = interval
        self.fail_threshold = fail_threshold
        self.ok_threshold = ok_threshold
        self.on_change = on_change
        # Called when a backend comes online (required models compare then).
        self.on_online: Callable[[Backend], None] | None = None
        self.probe_timeout = PROBE_TIMEOUT_S if probe_timeout is None else probe_timeout
        self.models_interval = MODELS_REFRESH_S if models_interval is None else models_interval
        self.session: aiohttp.ClientSession | None = None
        self.task: asyncio.Task[None] | None = None
        self.pending: set[asyncio.Task[Any]] = set()
        self.watches: dict[Backend, _Watch] = {}
        # Checks that sent nothing because live traffic answered for the backend.
        self.skipped_busy = 0

    async def start(self) -> None:
        """Check every backend once (bounded by the probe timeout), then keep checking."""
        self.session = aiohttp.ClientSession(
            json_serialize=lambda o: orjson.dumps(o).decode(),
        )
        await self.probe_all()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop checking and close the HTTP session."""
        await cancel_and_wait(self.task)
        for task in list(self.pending):
            task.cancel()
        if self.pending:
            await asyncio.gather(*self.pending, return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._sleep_time(loop.time()))
            now = loop.time()
            due = [b for b in list(self.fleet.backends) if self._watch(b).next_check <= now]
            results = await asyncio.gather(*(self.probe(b) for b in due), return_exceptions=True)
            for backend, result in zip(due, results):
                if isinstance(result, Exception):  # a bug must not end all checks
                    log.error("health check of %s failed: %r", backend.name, result)

    def _sleep_time(self, now: float) -> float:
        """Until the earliest backend is due (never longer than the interval)."""
        earliest = now + self.interval
        for b in self.fleet.backends:
            earliest = min(earliest, self._watch(b).next_check)
        return max(MIN_TICK_S, earliest - now)

    def _watch(self, backend: Backend) -> _Watch:
        watch = self.watches.get(backend)
        if watch is None:
            watch = self.watches[backend] = _Watch()
            # Forget backends that left the fleet (bounded by the fleet's size).
            for gone in [b for b in self.watches if b not in self.fleet.backends]:
                if gone is not backend:
                    del self.watches[gone]
        return watch

    async def probe_all(self) -> None:
        """Check all backends at once and rebuild the model index."""
        await asyncio.gather(*(self.probe(b) for b in list(self.fleet.backends)))

    def refresh_soon(self, backend: Backend) -> None:
        """Re-read one backend's models now (a pull/create/delete changed them, or it is new).

        A busy backend that is not Ollama is left alone: its list is re-read at
        its next idle check (an extra request could stop its running stream).
        """
        if backend.busy and backend.kind is not ApiKind.OLLAMA:
            self._watch(backend).models_at = -math.inf
            return
        task = asyncio.get_running_loop().create_task(self.probe(backend, refresh=True))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def probe(self, backend: Backend, refresh: bool = False) -> None:
        """One check of one backend: live traffic first, else one request.

        `refresh` re-reads the model list (and loaded models) whatever the
        traffic, for a model change the gateway relayed itself.
        """
        watch = self._watch(backend)
        now = asyncio.get_running_loop().time()
        custom = backend.probe_path is not None and backend.probe_interval is not None
        watch.next_check = now + (backend.probe_interval or self.interval)
        answered = backend.requests_done != watch.done_seen
        watch.done_seen = backend.requests_done
        # A backend that failed (a probe, or requests that opened its breaker)
        # may have been restarted with other models: its list is read again
        # at its next check, not up to models_interval later.
        models_due = (refresh or backend.breaker is not Breaker.CLOSED
                      or now - watch.models_at >= self.models_interval)
        detected = backend.kind is not ApiKind.UNKNOWN
        if not refresh and detected and not custom and backend.online:
            if (backend.busy and not (models_due and backend.kind in _LISTS_WHILE_BUSY)) or (
                    answered and not models_due):
                # Live traffic says it is alive; a probe could only disturb it.
                self.skipped_busy += 1
                backend.probe_failures = 0
                return
        elif not refresh and backend.busy and not custom:
            # Offline or never reached, and yet requests run there (admitted
            # before it went offline): wait until they end.
            self.skipped_busy += 1
            return
        # The probe was decided on an idle backend; a request dispatched there
        # before it arrives would reach llama-cpp-python first, and the probe
        # would then cut its stream: none starts until the probe is answered
        # (a few milliseconds; at most the probe timeout).
        hold = (backend.kind is ApiKind.LLAMACPP and backend.online and not backend.busy
                and not custom)
        if hold:
            backend.probing += 1
            backend.refresh()
        try:
            await self._request(backend, watch, models_due, refresh)
        except _PROBE_ERRORS as exc:
            if backend.busy or backend.requests_done != watch.done_seen:
                # Slow because it is generating (or serving one request at a
                # time): not a failure. Live traffic judges this backend.
                log.debug("probe of busy backend %s failed, ignored: %r", backend.name, exc)
            else:
                self._failed(backend, f"probe failed: {exc!r}")
                watch.models_at = -math.inf  # its next good probe reads its models
        else:
            backend.probe_failures = 0
            backend.consecutive_successes += 1
            first = backend.probes_ok == 0
            backend.probes_ok += 1
            if not backend.online and (first or backend.consecutive_successes >= self.ok_threshold):
                log.info("backend %s is online (%s)", backend.name, backend.kind.value)
                backend.online = True
                if self.on_online is not None:
                    self.on_online(backend)
        finally:
            if hold:
                backend.probing -= 1
                backend.refresh()
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

    async def _request(self, backend: Backend, watch: _Watch, models_due: bool,
                       refresh: bool) -> None:
        """Send this check's one request (a few more only at first contact)."""
        loop = asyncio.get_running_loop()
        kind = backend.kind
        if kind is ApiKind.UNKNOWN or (not backend.online and not backend.kind_configured):
            # First contact, or a detected backend that went offline: it may
            # come back as another server (Ollama replaced by llama-server on
            # its address), whose kind's probe would fail for ever.
            await self._detect(backend)
            watch.models_at = loop.time()
            if kind is not ApiKind.UNKNOWN and backend.kind is not kind:
                log.info("backend %s now speaks %s (was %s)", backend.name,
                         backend.kind.value, kind.value)
                backend.version = None  # asked again below
                backend.v1 = None
        elif backend.probe_path is not None and not refresh and not (
                models_due and (not backend.busy or kind in _LISTS_WHILE_BUSY)):
            # The operator's path; the model list is read instead when it is due
            # and the backend is idle or lists while busy (one request per check
            # either way).
            status, _ = await self._get_json(backend, backend.probe_path, parse=False)
            if not 200 <= status < 300:
                raise ValueError(f"{backend.probe_path} answered {status}")
        elif kind is ApiKind.OLLAMA:
            if models_due:
                self._take_tags(backend, await self._expect(backend, "/api/tags"))
                watch.models_at = loop.time()
            if refresh or not models_due:
                self._take_ps(backend, await self._expect(backend, "/api/ps"))
        else:
            self._take_v1_models(backend, await self._expect(backend, "/v1/models"))
            watch.models_at = loop.time()
        if backend.kind is ApiKind.OLLAMA and backend.version is None:
            # Once, at first contact (again only until it is known); not a
            # liveness question, so its failure is not the check's.
            try:
                _, version = await self._get_json(backend, "/api/version")
            except _PROBE_ERRORS:
                version = None
            if isinstance(version, dict):
                backend.version = str(version.get("version") or "") or None
        if backend.kind is ApiKind.OLLAMA and backend.v1 is None and backend.openai_via == "auto":
            # Once: whether its own /v1 layer is there. Without it, OpenAI
            # requests sent there are translated to the native API.
            try:
                status, _ = await self._get_json(backend, "/v1/models", parse=False)
            except _PROBE_ERRORS:
                status = 0
            if status:
                backend.v1 = status == 200

    async def _detect(self, backend: Backend) -> None:
        """Find the API kind at first contact (the only time more than one path is tried)."""
        status, tags = await self._get_json(backend, "/api/tags")
        if status == 200 and isinstance(tags, dict) and "models" in tags:
            backend.kind = ApiKind.OLLAMA
            self._take_tags(backend, tags)
            return
        status, listing = await self._get_json(backend, "/v1/models")
        if status != 200 or not isinstance(listing, dict):
            raise ValueError(f"neither /api/tags nor /v1/models answered (status {status})")
        backend.kind = _openai_kind(listing)
        self._take_v1_models(backend, listing)
        log.info("backend %s speaks %s", backend.name, backend.kind.value)

    async def _expect(self, backend: Backend, path: str) -> dict[str, Any]:
        status, doc = await self._get_json(backend, path)
        if status != 200 or not isinstance(doc, dict):
            raise ValueError(f"{path} answered {status}")
        return doc

    async def _get_json(self, backend: Backend, path: str, parse: bool = True) -> tuple[int, Any]:
        assert self.session is not None
        timeout = aiohttp.ClientTimeout(total=self.probe_timeout)
        async with self.session.get(backend.address.url + path, timeout=timeout) as resp:
            raw = await read_capped(resp)
            if resp.status != 200 or not parse:
                return resp.status, None
            return 200, orjson.loads(raw)

    @staticmethod
    def _take_tags(backend: Backend, tags: dict[str, Any]) -> None:
        models: dict[str, dict[str, Any]] = {}
        for entry in tags.get("models") or []:
            if not isinstance(entry, dict):
                continue
            name = entry.get("name") or entry.get("model")
            if isinstance(name, str) and name:
                models[normalize_model(name)] = entry
        backend.models = models
        backend.v1_models = []
        backend.exact_names = {}

    @staticmethod
    def _take_ps(backend: Backend, ps: dict[str, Any]) -> None:
        backend.loaded = {
            normalize_model(m.get("name") or m.get("model") or "")
            for m in ps.get("models") or [] if isinstance(m, dict)
        }

    @staticmethod
    def _take_v1_models(backend: Backend, listing: dict[str, Any]) -> None:
        items = [i for i in (listing.get("data") or []) if isinstance(i, dict) and i.get("id")]
        for item in items:
            # OpenAI's model object requires `created`; llama-cpp-python omits it.
            # 0 is what /api/tags and /api/show say then (1970), so all views agree.
            if not isinstance(item.get("created"), int):
                item["created"] = 0
        backend.v1_models = items
        backend.models = {normalize_model(str(i["id"])): _tags_entry(i) for i in items}
        backend.exact_names = {normalize_model(str(i["id"])): str(i["id"]) for i in items}
        backend.loaded = set()

    async def fetch_ps(self, among: list[Backend] | None = None) -> list[dict[str, Any]]:
        """Loaded models across online Ollama backends (of `among`), asked live, de-duplicated."""
        backends = [b for b in (self.fleet.backends if among is None else among)
                    if b.online and b.kind is ApiKind.OLLAMA]

        async def one(b: Backend) -> list[dict[str, Any]]:
            try:
                status, ps = await self._get_json(b, "/api/ps")
            except _PROBE_ERRORS:
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


async def read_capped(resp: aiohttp.ClientResponse, limit: int = CONTROL_BODY_MAX) -> bytes:
    """A control answer's body, at most `limit` bytes (ValueError past it)."""
    if resp.content_length is not None and resp.content_length > limit:
        raise ValueError(f"answer of {resp.content_length} bytes (at most {limit} read)")
    parts: list[bytes] = []
    size = 0
    async for part in resp.content.iter_chunked(65536):
        size += len(part)
        if size > limit:
            raise ValueError(f"answer longer than {limit} bytes")
        parts.append(part)
    return b"".join(parts)


def _openai_kind(listing: dict[str, Any]) -> ApiKind:
    """The server behind an OpenAI-compatible /v1/models answer, from its `owned_by`."""
    for item in listing.get("data") or []:
        if isinstance(item, dict):
            kind = _OWNERS.get(str(item.get("owned_by") or ""))
            if kind is not None:
                return kind
    return ApiKind.OPENAI


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
