"""One backend server: its address, API kind, models, slots and health."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

from ollamamq_fast.config import BackendUrl

if TYPE_CHECKING:
    from ollamamq_fast.proxy.upstream import UpstreamPool


class ApiKind(enum.Enum):
    """What a backend speaks, as found by probing it."""

    UNKNOWN = "unknown"
    OLLAMA = "ollama"  # native /api/* and /v1/*
    OPENAI = "openai"  # /v1/* only (vLLM, llama.cpp, LM Studio's OpenAI mode, ...)


class Backend:
    """Live state of one backend. Mutated only from the event loop."""

    __slots__ = (
        "address",
        "name",
        "host_header",
        "path_prefix",
        "slots",
        "in_flight",
        "unslotted",
        "kind",
        "online",
        "draining",
        "models",
        "v1_models",
        "loaded",
        "version",
        "requests_done",
        "failures",
        "consecutive_failures",
        "consecutive_successes",
        "last_error",
        "pool",
    )

    def __init__(self, address: BackendUrl, slots: int) -> None:
        self.address = address
        self.name = address.url
        # Precomputed so the hot path only concatenates bytes.
        self.host_header = b"Host: " + address.authority.encode() + b"\r\n"
        self.path_prefix = address.prefix.encode()
        self.slots = slots
        self.in_flight = 0  # queued-route requests running (bounded by slots)
        self.unslotted = 0  # model-management / passthrough requests running
        self.kind = ApiKind.UNKNOWN
        self.online = False
        self.draining = False
        # normalized name -> the backend's own /api/tags entry (or a synthesized one)
        self.models: dict[str, dict[str, Any]] = {}
        # the backend's /v1/models items, for OpenAI-kind backends
        self.v1_models: list[dict[str, Any]] = []
        self.loaded: set[str] = set()
        self.version: str | None = None
        self.requests_done = 0
        self.failures = 0
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        self.last_error = ""
        self.pool: UpstreamPool | None = None

    @property
    def serves_native(self) -> bool:
        """Whether native /api/* requests may go here (only to Ollama backends)."""
        return self.kind is ApiKind.OLLAMA

    @property
    def eligible(self) -> bool:
        """Online and accepting new requests."""
        return self.online and not self.draining

    def has_free_slot(self) -> bool:
        """Whether a queued-route request can start here now."""
        return self.online and not self.draining and self.in_flight < self.slots

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready view for status pages and the admin API."""
        return {
            "url": self.name,
            "kind": self.kind.value,
            "online": self.online,
            "draining": self.draining,
            "slots": self.slots,
            "in_flight": self.in_flight,
            "requests_done": self.requests_done,
            "failures": self.failures,
            "models": sorted(self.models),
            "loaded": sorted(self.loaded),
            "version": self.version,
            "last_error": self.last_error,
        }
