"""Choosing a backend: model match, free slot, then the balancing policy.

Policies (`--balance`):
- `least-conn` (default): fewest in flight relative to slots; among equals,
  one that already has the model loaded; then round robin.
- `round-robin`: the next backend in rotation that has a free slot.
- `random`: a random backend with a free slot.
- `affinity`: the same user (or conversation) goes to the same backend while it
  has a free slot, so its KV cache is reused; otherwise least-conn.
"""

from __future__ import annotations

import enum
import random
import zlib
from typing import Any

from ollamamq_fast.fleet.backend import ApiKind, Backend
from ollamamq_fast.fleet.models import normalize_model
from ollamamq_fast.wire.sniff import SniffError, sniff_fields


class Balance(enum.Enum):
    """Backend choice policy."""

    LEAST_CONN = "least-conn"
    ROUND_ROBIN = "round-robin"
    RANDOM = "random"
    AFFINITY = "affinity"


class Fleet:
    """All backends and the model index used to route requests."""

    def __init__(self, backends: list[Backend], balance: Balance = Balance.LEAST_CONN) -> None:
        self.backends = backends
        self.balance = balance
        self._rr = 0
        self._random = random.Random()
        # normalized model -> backends listing it; native requests use only Ollama backends
        self._index_native: dict[str, list[Backend]] = {}
        self._index_any: dict[str, list[Backend]] = {}
        self._native_all: list[Backend] = []
        # Models listed by both an Ollama backend and one of another kind: where a
        # native request first tries an Ollama backend with the model loaded.
        self._mixed: frozenset[str] = frozenset()
        # Set when a model left the index (its backends were removed, or came
        # back without it): the dispatcher then answers the requests queued
        # for it, which no backend would ever take (Dispatcher.pump).
        self.models_gone = False
        for b in backends:
            b.refresh()
        self.rebuild_index()

    def rebuild_index(self) -> None:
        """Recompute the model index; called after probes or state changes."""
        native: dict[str, list[Backend]] = {}
        anyk: dict[str, list[Backend]] = {}
        for b in self.backends:
            b.refresh()
            for model in b.models:
                anyk.setdefault(model, []).append(b)
                if b.kind is ApiKind.OLLAMA:
                    native.setdefault(model, []).append(b)
        if not self.models_gone and (
                any(m not in anyk for m in self._index_any)
                or any(m not in native for m in self._index_native)):
            self.models_gone = True
        self._index_native = native
        self._index_any = anyk
        self._native_all = [b for b in self.backends if b.kind is ApiKind.OLLAMA]
        self._mixed = frozenset(m for m, listed in native.items() if len(listed) != len(anyk[m]))

    def add(self, backend: Backend) -> None:
        """Add a backend (it serves nothing until its first probe)."""
        self.backends.append(backend)
        self.rebuild_index()

    def remove(self, backend: Backend) -> None:
        """Remove a backend; requests already running on it finish."""
        if backend in self.backends:
            self.backends.remove(backend)
            self.rebuild_index()

    def find(self, url: str) -> Backend | None:
        """The backend with this URL (as given or normalized)."""
        for b in self.backends:
            if b.name == url or b.name == url.rstrip("/"):
                return b
        return None

    def candidates(self, model: str | None, native: bool) -> list[Backend]:
        """Backends that list `model` (normalized) and speak the route's API."""
        if model is None:
            return self._native_all if native else self.backends
        index = self._index_native if native else self._index_any
        return index.get(model, [])

    def serves(self, model: str, native: bool) -> bool:
        """Whether any available backend lists the model (or a half-open one, whose
        trial runs: the request waits for its outcome)."""
        for b in self.candidates(model, native):
            if b.serving:
                return True
        return False

    def any_online(self) -> bool:
        """Whether at least one backend takes traffic (or will once its health probe is in)."""
        for b in self.backends:
            if b.available or b.probing > 0:
                return True
        return False

    def has_free_slot(self) -> bool:
        """Whether any backend could start a queued request now (the dispatcher's fast exit)."""
        for b in self.backends:
            if b.available and b.in_flight < b.cap:
                return True
        return False

    def pick(self, model: str | None, native: bool, affinity: str = "",
             exclude: tuple[Backend, ...] = (), native_first: bool = False) -> Backend | None:
        """The backend to run a queued request on now, or None when none is free.

        `exclude`: backends that already failed this request (a retry never
        goes back to them while their breaker has not opened yet).
        `native_first` (a native route any backend may serve, translated): an
        Ollama backend with the model loaded first, then the policy among all
        backends listing it. A request whose model could not be read stays on
        Ollama backends (its body cannot be translated).
        """
        if native_first:
            if model is None:
                native = True
            elif model in self._mixed:
                loaded = self._loaded_native(model, exclude)
                if loaded is not None:
                    return loaded
        pool = self.candidates(model, native)
        if exclude:
            pool = [b for b in pool if b not in exclude]
        n = len(pool)
        if n == 0:
            return None
        if n == 1:
            b = pool[0]
            return b if b.available and b.in_flight < b.cap else None
        policy = self.balance
        if policy is Balance.AFFINITY and affinity:
            preferred = pool[zlib.crc32(affinity.encode()) % n]
            if preferred.available and preferred.in_flight < preferred.cap:
                return preferred
        elif policy is Balance.ROUND_ROBIN:
            start = self._rr
            for k in range(n):
                b = pool[(start + k) % n]
                if b.available and b.in_flight < b.cap:
                    self._rr = start + k + 1
                    return b
            return None
        elif policy is Balance.RANDOM:
            free = [b for b in pool if b.available and b.in_flight < b.cap]
            return self._random.choice(free) if free else None
        return self._least_conn(pool, model)

    def _loaded_native(self, model: str, exclude: tuple[Backend, ...]) -> Backend | None:
        """The least loaded Ollama backend with `model` in memory and a free slot."""
        best: Backend | None = None
        best_load = 2.0
        for b in self._index_native.get(model, ()):
            if (b.available and b.in_flight < b.slots and model in b.loaded
                    and b not in exclude and b.in_flight / b.slots < best_load):
                best, best_load = b, b.in_flight / b.slots
        return best

    def _least_conn(self, pool: list[Backend], model: str | None) -> Backend | None:
        best: Backend | None = None
        best_key = (2.0, 1)
        n = len(pool)
        start = self._rr % n
        for k in range(n):
            b = pool[(start + k) % n]
            if not b.available or b.in_flight >= b.cap:
                continue
            # Lower load first; at equal load, a backend with the model already
            # in memory (no load time) first. The rotating start breaks ties.
            key = (b.in_flight / b.slots, 0 if model in b.loaded else 1)
            if key < best_key:
                best, best_key = b, key
        if best is not None:
            self._rr += 1
        return best

    def pick_unslotted(self, model: str | None, native: bool,
                       exclude: tuple[Backend, ...] = (), native_first: bool = False,
                       ) -> Backend | None:
        """A backend for a request that needs no slot (show, pull, blobs...): least busy.

        `native_first`: an Ollama backend listing the model when there is one.
        """
        if native_first and model is not None and model in self._mixed:
            best = self.pick_unslotted(model, True, exclude)
            if best is not None:
                return best
        best = None
        for b in self.candidates(model, native):
            if not b.available or b in exclude:
                continue
            if best is None or (b.in_flight + b.unslotted) < (best.in_flight + best.unslotted):
                best = b
        return best

    def primary(self, native: bool = True) -> Backend | None:
        """The first available backend in configuration order (blobs, create, fallback).

        Blobs must land on the backend that later runs `create` with them, so these
        routes are pinned to one backend rather than balanced.
        """
        for b in self.backends:
            if b.available and (b.kind is ApiKind.OLLAMA or not native):
                return b
        return None

    def find_model_entry(self, model: str) -> tuple[Backend, dict[str, Any]] | None:
        """Any online backend's tags entry for a normalized model name.

        Online, not `available`: model listings describe the fleet, and must agree
        with /v1/models and /api/tags while a breaker is briefly open.
        """
        for b in self._index_any.get(model, []):
            if b.online:
                return b, b.models[model]
        return None

    def any_up(self) -> bool:
        """Whether any backend answers probes (it may still be draining or tripped)."""
        return any(b.online for b in self.backends)

    def note_model_added(self, backend: Backend, name: str) -> None:
        """A pull/create/copy succeeded: route to the model now, before the next probe."""
        key = normalize_model(name)
        if key and key not in backend.models:
            backend.models[key] = {"name": name, "model": name, "size": 0, "digest": "",
                                   "details": {}}
            self.rebuild_index()

    def note_model_change(self, backend: Backend, path: bytes, model: str, body: bytes) -> None:
        """A pull, create, copy or delete succeeded on `backend`: update the index now."""
        if path == b"/api/delete":
            self.note_model_removed(backend, model)
        elif path == b"/api/copy":
            try:
                found = sniff_fields(body, ("destination",))
            except SniffError:
                return
            if found.get("destination"):
                self.note_model_added(backend, found["destination"])
        else:
            self.note_model_added(backend, model)

    def note_model_removed(self, backend: Backend, name: str) -> None:
        """A delete succeeded: stop routing the model there at once."""
        if backend.models.pop(normalize_model(name), None) is not None:
            self.rebuild_index()
