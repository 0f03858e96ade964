"""Required models: each pool's list of models that must be on every one of its Ollama backends.

The list is compared with each backend's own `/api/tags` at start, on reload,
when a pool changes, when a backend comes online (joins), and on demand
(admin API `POST /api/pools/NAME/sync`, CLI `ollamamq-fast pools sync NAME`).
What is missing is pulled with `/api/pull`, streamed, so its progress is
visible (admin API, event stream, dashboard, TUI):

- one pull per backend at a time (a worker per backend works through its
  queue); different backends pull in parallel;
- a failed pull is retried with exponential back-off, `MAX_ATTEMPTS` times,
  then reported as failed until the next check;
- deleting models that no pool requires is opt-in (`remove_unlisted`), and
  only done on a backend whose every pool has a required list;
- a client request never triggers a pull: routing simply does not choose a
  backend for a model it does not list (fleet/select.py), so the backends
  that have it serve it while the others pull.

Control traffic only (aiohttp, like the health checks): nothing here runs on
the data plane.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from ollamamq_fast.fleet.backend import ApiKind, Backend
from ollamamq_fast.fleet.health import read_capped
from ollamamq_fast.fleet.models import normalize_model
from ollamamq_fast.tasks import cancel_and_wait

if TYPE_CHECKING:
    from ollamamq_fast.fleet.health import HealthChecker
    from ollamamq_fast.pools import Pool, Pools

log = logging.getLogger("ollamamq_fast.required")

# Tries of one pull before it is reported failed (until the next check).
MAX_ATTEMPTS = 5
RETRY_MIN_S = 2.0
RETRY_MAX_S = 300.0
# A pull may be silent for minutes while a layer is verified; the socket read
# timeout is generous, the connect one short.
PULL_READ_TIMEOUT_S = 600.0
CONNECT_TIMEOUT_S = 10.0
TAGS_TIMEOUT_S = 10.0
# Progress events are published at most this often per backend (plus every status change).
PROGRESS_EVERY_S = 0.5
# Finished pulls remembered per backend for the admin API.
HISTORY = 20

_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError)


class PullJob:
    """One model to pull on one backend, and how far it got."""

    def __init__(self, backend: str, model: str, pools: list[str]) -> None:
        self.backend = backend
        self.model = model
        self.pools = pools
        self.state = "queued"  # queued | pulling | retrying | done | failed
        self.status = ""  # the backend's last progress status line
        self.completed = 0
        self.total = 0
        self.attempts = 0
        self.error = ""
        self.queued_at = time.time()
        self.started_at = 0.0
        self.finished_at = 0.0
        self.next_try_at = 0.0

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready progress."""
        percent = round(100.0 * self.completed / self.total, 1) if self.total else None
        return {
            "backend": self.backend, "model": self.model, "pools": self.pools,
            "state": self.state, "status": self.status, "completed": self.completed,
            "total": self.total, "percent": percent, "attempts": self.attempts,
            "error": self.error, "queued_at": self.queued_at, "started_at": self.started_at,
            "finished_at": self.finished_at, "next_try_at": self.next_try_at,
        }


class _BackendWork:
    """A backend's pull queue, its worker, and its recent history."""

    def __init__(self) -> None:
        self.queue: deque[PullJob] = deque()
        self.current: PullJob | None = None
        self.worker: asyncio.Task[None] | None = None
        self.history: deque[PullJob] = deque(maxlen=HISTORY)
        self.removed: list[str] = []


class RequiredModels:
    """Keeps every pool's required models on its Ollama backends."""

    def __init__(self, pools: Pools, health: HealthChecker) -> None:
        self.pools = pools
        self.health = health
        self.publish: Callable[..., None] = _no_publish
        self.work: dict[Backend, _BackendWork] = {}
        self.session: aiohttp.ClientSession | None = None
        self.checks: set[asyncio.Task[Any]] = set()
        self.retry_min_s = RETRY_MIN_S
        self.retry_max_s = RETRY_MAX_S
        self.max_attempts = MAX_ATTEMPTS
        self.started = False
        self.last_check: dict[str, Any] = {}
        # Pulls that ended, for /metrics.
        self.done = 0
        self.failed = 0

    # -- Lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """First comparison, once the backends' first probes are in (called by the gateway)."""
        self.started = True
        self.check_soon(None, "start")

    async def stop(self) -> None:
        """Cancel checks and pulls (a pull cut short is resumed by Ollama next time)."""
        self.started = False
        for task in list(self.checks):
            await cancel_and_wait(task)
        for work in self.work.values():
            await cancel_and_wait(work.worker)
        if self.session is not None:
            await self.session.close()
            self.session = None

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            self.session = aiohttp.ClientSession()
        return self.session

    # -- What each backend must have -----------------------------------------

    def required_for(self, backend: Backend) -> tuple[dict[str, str], list[str], bool]:
        """(normalized -> name to pull, pools asking, whether removing others is allowed)."""
        wanted: dict[str, str] = {}
        asking: list[str] = []
        listing = [p for p in self.pools.pools() if backend in p.fleet.backends]
        for pool in listing:
            if pool.config.required_models:
                asking.append(pool.name)
            for name in pool.config.required_models:
                wanted.setdefault(normalize_model(name), name)
        remove = bool(listing) and any(p.config.remove_unlisted for p in listing) and all(
            p.config.required_models for p in listing)
        return wanted, asking, remove

    def check_soon(self, pool: Pool | None, reason: str) -> None:
        """Compare and pull in the background (start, reload, pool change)."""
        if not self.started:
            return
        task = asyncio.get_running_loop().create_task(self.check(pool, reason))
        self.checks.add(task)
        task.add_done_callback(self.checks.discard)

    def backend_joined(self, backend: Backend) -> None:
        """A backend came online: compare its models with what its pools require."""
        if not self.started or backend.kind is not ApiKind.OLLAMA:
            return
        task = asyncio.get_running_loop().create_task(self._check_backend(backend, "joined"))
        self.checks.add(task)
        task.add_done_callback(self.checks.discard)

    async def check(self, pool: Pool | None = None, reason: str = "on demand",
                    remove: bool | None = None) -> dict[str, Any]:
        """Compare the required lists with each backend's /api/tags now and queue the pulls.

        `pool`: only that pool's backends (None: all). `remove` overrides the
        pools' `remove_unlisted` for this check (None: as configured).
        Answers per backend what is present, missing (queued), extra and removed.
        """
        backends = pool.fleet.backends if pool is not None else self.pools.backends
        results = await asyncio.gather(
            *(self._check_backend(b, reason, remove) for b in list(backends)))
        report = {"reason": reason, "pool": pool.name if pool is not None else None,
                  "at": time.time(), "backends": [r for r in results if r is not None]}
        self.last_check = report
        self.publish("required_check", **report)
        return report

    async def _check_backend(self, backend: Backend, reason: str,
                             remove: bool | None = None) -> dict[str, Any] | None:
        wanted, asking, may_remove = self.required_for(backend)
        if remove is not None:
            may_remove = remove and bool(asking)
        if not wanted and not may_remove:
            return None
        row: dict[str, Any] = {"backend": backend.name, "pools": asking}
        if backend.kind is not ApiKind.OLLAMA:
            row["skipped"] = ("not an Ollama backend" if backend.kind is not ApiKind.UNKNOWN
                              else "not reached yet")
            return row
        try:
            names = await self._tags(backend)
        except _ERRORS as exc:
            row["error"] = f"/api/tags failed: {exc!r}"
            return row
        present = {normalize_model(n): n for n in names}
        missing = [name for key, name in wanted.items() if key not in present]
        extra = sorted(name for key, name in present.items() if key not in wanted)
        row.update(present=sorted(n for k, n in present.items() if k in wanted),
                   missing=missing, extra=extra, removed=[])
        for name in missing:
            self._enqueue(backend, name, asking)
        if may_remove and extra:
            row["removed"] = await self._remove(backend, extra)
        log.debug("required models on %s (%s): missing %s", backend.name, reason, missing)
        return row

    async def _tags(self, backend: Backend) -> list[str]:
        timeout = aiohttp.ClientTimeout(total=TAGS_TIMEOUT_S)
        async with self._session().get(backend.address.url + "/api/tags",
                                       timeout=timeout) as resp:
            if resp.status != 200:
                raise ValueError(f"status {resp.status}")
            doc = orjson.loads(await read_capped(resp))
        out = []
        for entry in (doc.get("models") or []) if isinstance(doc, dict) else []:
            if isinstance(entry, dict):
                name = entry.get("name") or entry.get("model")
                if isinstance(name, str) and name:
                    out.append(name)
        return out

    async def _remove(self, backend: Backend, names: list[str]) -> list[str]:
        removed = []
        for name in names:
            try:
                async with self._session().delete(
                        backend.address.url + "/api/delete", data=orjson.dumps({"model": name}),
                        headers={"Content-Type": "application/json"},
                        timeout=aiohttp.ClientTimeout(total=TAGS_TIMEOUT_S)) as resp:
                    await read_capped(resp)
                    ok = resp.status == 200
            except _ERRORS as exc:
                log.warning("removing %s from %s failed: %r", name, backend.name, exc)
                continue
            if ok:
                removed.append(name)
                for pool in self.pools.pools():
                    if backend in pool.fleet.backends:
                        pool.fleet.note_model_removed(backend, name)
                self._work(backend).removed.append(name)
                self.publish("model_removed", backend=backend.name, model=name)
        return removed

    # -- Pulls ------------------------------------------------------------------

    def _work(self, backend: Backend) -> _BackendWork:
        work = self.work.get(backend)
        if work is None:
            work = self.work[backend] = _BackendWork()
        return work

    def _enqueue(self, backend: Backend, name: str, pools: list[str]) -> None:
        work = self._work(backend)
        key = normalize_model(name)
        if work.current is not None and normalize_model(work.current.model) == key:
            return
        if any(normalize_model(j.model) == key for j in work.queue):
            return
        job = PullJob(backend.name, name, pools)
        work.queue.append(job)
        self._mark_pulling()
        self.publish("pull_queued", **job.snapshot())
        if work.worker is None or work.worker.done():
            work.worker = asyncio.get_running_loop().create_task(self._run(backend, work))

    async def _run(self, backend: Backend, work: _BackendWork) -> None:
        """The backend's worker: one pull at a time, in order, each retried with back-off."""
        while work.queue:
            job = work.queue.popleft()
            work.current = job
            try:
                await self._pull_with_retries(backend, job)
            finally:
                work.current = None
                work.history.append(job)
                self._mark_pulling()

    def _mark_pulling(self) -> None:
        """Tell each pool which models are on their way to its backends."""
        for pool in self.pools.pools():
            models: set[str] = set()
            for b in pool.fleet.backends:
                work = self.work.get(b)
                if work is not None:
                    if work.current is not None:
                        models.add(normalize_model(work.current.model))
                    models.update(normalize_model(j.model) for j in work.queue)
            pool.pulling = models

    async def _pull_with_retries(self, backend: Backend, job: PullJob) -> None:
        delay = self.retry_min_s
        while True:
            if backend not in self.pools.backends:
                job.state, job.error = "failed", "the backend left every pool"
                break
            job.attempts += 1
            job.state = "pulling"
            job.started_at = job.started_at or time.time()
            self.publish("pull_started", **job.snapshot())
            try:
                await self._pull(backend, job)
            except _ERRORS as exc:
                job.error = str(exc) or repr(exc)
            else:
                job.state, job.error = "done", ""
                job.finished_at = time.time()
                self.done += 1
                self._arrived(backend, job.model)
                self.publish("pull_done", **job.snapshot())
                log.info("pulled %s on %s", job.model, backend.name)
                return
            if job.attempts >= self.max_attempts:
                job.state = "failed"
                break
            job.state = "retrying"
            job.next_try_at = time.time() + delay
            self.publish("pull_retrying", **job.snapshot())
            log.warning("pull of %s on %s failed (attempt %d): %s; retrying in %.1fs",
                        job.model, backend.name, job.attempts, job.error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_max_s)
        job.finished_at = time.time()
        self.failed += 1
        self.publish("pull_failed", **job.snapshot())
        log.warning("pull of %s on %s failed: %s", job.model, backend.name, job.error)

    async def _pull(self, backend: Backend, job: PullJob) -> None:
        """POST /api/pull, streamed: progress into `job`; raises on any failure."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S,
                                        sock_read=PULL_READ_TIMEOUT_S)
        last_sent = 0.0
        async with self._session().post(
                backend.address.url + "/api/pull",
                data=orjson.dumps({"model": job.model, "stream": True}),
                headers={"Content-Type": "application/json"}, timeout=timeout) as resp:
            if resp.status != 200:
                body = await read_capped(resp)
                raise ValueError(f"/api/pull answered {resp.status}: {_error_text(body)}")
            success = False
            async for line in resp.content:
                if not line.strip():
                    continue
                event = orjson.loads(line)
                if not isinstance(event, dict):
                    continue
                if "error" in event:
                    raise ValueError(str(event["error"]))
                status = str(event.get("status", ""))
                changed = status != job.status
                job.status = status
                if isinstance(event.get("total"), int):
                    job.total = event["total"]
                    job.completed = int(event.get("completed") or 0)
                if status == "success":
                    success = True
                now = time.monotonic()
                if changed or now - last_sent >= PROGRESS_EVERY_S:
                    last_sent = now
                    self.publish("pull_progress", **job.snapshot())
            if not success:
                raise ValueError("the pull ended without success")

    def _arrived(self, backend: Backend, name: str) -> None:
        """Route the model to `backend` now; the probe that follows fills in the details."""
        for pool in self.pools.pools():
            if backend in pool.fleet.backends:
                pool.fleet.note_model_added(backend, name)
        self.health.refresh_soon(backend)
        self.pools.pump_all()

    # -- Read models ----------------------------------------------------------

    def progress(self) -> list[dict[str, Any]]:
        """Pulls running or waiting now, every backend."""
        out = []
        for work in self.work.values():
            if work.current is not None:
                out.append(work.current.snapshot())
            out.extend(j.snapshot() for j in work.queue)
        return out

    def status(self, pool: Pool | None = None) -> dict[str, Any]:
        """Per backend of `pool` (None: all): required, present, pulls running, queued, recent."""
        backends = pool.fleet.backends if pool is not None else self.pools.backends
        rows = []
        for b in backends:
            wanted, asking, remove = self.required_for(b)
            work = self.work.get(b)
            present = [n for k, n in wanted.items() if k in b.models]
            rows.append({
                "backend": b.name, "kind": b.kind.value, "online": b.online, "pools": asking,
                "required": list(wanted.values()), "present": present,
                "missing": [n for k, n in wanted.items() if k not in b.models],
                "remove_unlisted": remove,
                "pulling": work.current.snapshot() if work and work.current else None,
                "queued": [j.snapshot() for j in work.queue] if work else [],
                "recent": [j.snapshot() for j in work.history] if work else [],
                "removed": list(work.removed) if work else [],
            })
        return {"pool": pool.name if pool is not None else None, "backends": rows,
                "last_check": self.last_check}


def _error_text(body: bytes) -> str:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:200].decode("utf-8", "replace")
    if isinstance(doc, dict) and "error" in doc:
        return str(doc["error"])
    return body[:200].decode("utf-8", "replace")


def _no_publish(kind: str, **data: Any) -> None:
    """Until the gateway connects the event bus."""
