"""Choosing a backend: model match, free slot, least connections, round-robin ties."""

from __future__ import annotations

from ollamamq_fast.fleet.backend import ApiKind, Backend
from ollamamq_fast.fleet.models import normalize_model


class Fleet:
    """All backends and the model index used to route requests."""

    def __init__(self, backends: list[Backend]) -> None:
        self.backends = backends
        self._rr = 0
        # normalized model -> backends listing it; native requests use only Ollama backends
        self._index_native: dict[str, list[Backend]] = {}
        self._index_any: dict[str, list[Backend]] = {}
        self.rebuild_index()

    def rebuild_index(self) -> None:
        """Recompute the model index; called after probes change any model list."""
        native: dict[str, list[Backend]] = {}
        anyk: dict[str, list[Backend]] = {}
        for b in self.backends:
            for model in b.models:
                anyk.setdefault(model, []).append(b)
                if b.kind is ApiKind.OLLAMA:
                    native.setdefault(model, []).append(b)
        self._index_native = native
        self._index_any = anyk

    def add(self, backend: Backend) -> None:
        """Add a backend (it serves nothing until its first probe)."""
        self.backends.append(backend)
        self.rebuild_index()

    def candidates(self, model: str, native: bool) -> list[Backend]:
        """Backends that list `model` (normalized) and speak the route's API."""
        index = self._index_native if native else self._index_any
        return index.get(model, [])

    def serves(self, model: str, native: bool) -> bool:
        """Whether any online backend lists the model."""
        return any(b.online for b in self.candidates(model, native))

    def any_online(self) -> bool:
        """Whether at least one backend is online."""
        return any(b.online for b in self.backends)

    def has_free_slot(self) -> bool:
        """Whether any backend could start a queued request now (the dispatcher's fast exit)."""
        for b in self.backends:
            if b.online and not b.draining and b.in_flight < b.slots:
                return True
        return False

    def pick(self, model: str | None, native: bool) -> Backend | None:
        """The backend to run a queued request on now, or None when none is free.

        Fewest in flight relative to slots wins; ties rotate round-robin so equal
        backends share the load. `model` None means any backend of the right kind.
        """
        if model is None:
            pool = [b for b in self.backends if b.kind is ApiKind.OLLAMA or not native]
        else:
            pool = self.candidates(model, native)
        best: Backend | None = None
        best_load = 2.0
        ties = 0
        n = len(pool)
        if n == 0:
            return None
        start = self._rr % n
        for k in range(n):
            b = pool[(start + k) % n]
            if not b.online or b.draining or b.in_flight >= b.slots:
                continue
            load = b.in_flight / b.slots
            if load < best_load:
                best, best_load, ties = b, load, 1
            elif load == best_load:
                ties += 1
        if best is not None:
            self._rr += 1
        return best

    def pick_unslotted(self, model: str | None, native: bool) -> Backend | None:
        """A backend for a request that needs no slot (show, pull, blobs...): least busy."""
        if model is None:
            pool = [b for b in self.backends if (b.kind is ApiKind.OLLAMA or not native)]
        else:
            pool = self.candidates(model, native)
        best: Backend | None = None
        for b in pool:
            if not b.online or b.draining:
                continue
            if best is None or (b.in_flight + b.unslotted) < (best.in_flight + best.unslotted):
                best = b
        return best

    def primary(self, native: bool = True) -> Backend | None:
        """The first eligible backend in configuration order (blobs, create, fallback routes).

        Blobs must land on the backend that later runs `create` with them, so these
        routes are pinned to one backend rather than balanced.
        """
        for b in self.backends:
            if b.eligible and (b.kind is ApiKind.OLLAMA or not native):
                return b
        return None

    def find_model_entry(self, model: str) -> tuple[Backend, dict] | None:
        """Any online backend's tags entry for a normalized model name."""
        for b in self._index_any.get(model, []):
            if b.online:
                return b, b.models[model]
        return None

    def note_model_added(self, backend: Backend, name: str) -> None:
        """A pull/create/copy succeeded: route to the model now, before the next probe."""
        key = normalize_model(name)
        if key and key not in backend.models:
            backend.models[key] = {"name": name, "model": name, "size": 0, "digest": "",
                                   "details": {}}
            self.rebuild_index()

    def note_model_removed(self, backend: Backend, name: str) -> None:
        """A delete succeeded: stop routing the model there at once."""
        if backend.models.pop(normalize_model(name), None) is not None:
            self.rebuild_index()

    @staticmethod
    def normalize(name: str) -> str:
        """Normalize a client-given model name for lookups."""
        return normalize_model(name)
