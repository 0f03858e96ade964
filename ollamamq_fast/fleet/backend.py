"""One backend server: its address, API kind, models, slots and health."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Final, Protocol

from ollamamq_fast.config import BackendOptions, BackendUrl
from ollamamq_fast.wire.routes import SPEAKS_ALL, SPEAKS_OLLAMA, SPEAKS_OPENAI

if TYPE_CHECKING:
    from ollamamq_fast.proxy.pool import UpstreamPool


class ApiKind(enum.Enum):
    """What a backend speaks: configured per backend, else detected at first contact."""

    UNKNOWN = "unknown"
    OLLAMA = "ollama"  # native /api/* and /v1/*
    OPENAI = "openai"  # /v1/* only: any OpenAI-compatible server
    LLAMACPP = "llamacpp"  # llama.cpp's llama-server or llama-cpp-python (/v1/*)
    VLLM = "vllm"  # /v1/*
    LMSTUDIO = "lmstudio"  # /v1/*


class Cancellable(Protocol):
    """A scheduled call (asyncio's or uvloop's TimerHandle: uvloop's is not a subclass)."""

    def cancel(self) -> None:
        """Do not run it."""


class Pump(Protocol):
    """A pool's dispatcher, as a backend listed by several pools knows it (sched/dispatcher.py)."""

    def pump(self) -> None:
        """Start queued requests while backends have free slots."""


class Breaker(enum.Enum):
    """Circuit-breaker state, from passive failures (refused, reset, fast 5xx)."""

    CLOSED = "closed"  # normal traffic
    OPEN = "open"  # no traffic until the cooldown ends
    HALF_OPEN = "half-open"  # one trial request at a time; its outcome closes or re-opens it


# Consecutive passive failures that open the breaker. A backend that fails fast
# looks idle to least-connections, so without this it would attract traffic.
BREAKER_THRESHOLD: Final = 3
BREAKER_COOLDOWN_S: Final = 2.0
BREAKER_MAX_COOLDOWN_S: Final = 30.0


class Backend:
    """Live state of one backend. Mutated only from the event loop."""

    __slots__ = (
        "_slots",
        "address",
        "available",
        "breaker",
        "breaker_cooldown",
        "breaker_timer",
        "cap",
        "consecutive_failures",
        "consecutive_successes",
        "draining",
        "exact_names",
        "failures",
        "gateway_headers",
        "host_header",
        "in_flight",
        "kind",
        "kind_configured",
        "last_error",
        "loaded",
        "models",
        "name",
        "online",
        "openai_via",
        "path_prefix",
        "pool",
        "probe_failures",
        "probe_interval",
        "probe_path",
        "probes_ok",
        "probing",
        "pumps",
        "requests_done",
        "shared",
        "speaks",
        "unslotted",
        "v1",
        "v1_models",
        "version",
    )

    def __init__(self, address: BackendUrl, slots: int) -> None:
        self.address = address
        self.name = address.url
        # Precomputed so the hot path only concatenates bytes.
        self.host_header = b"Host: " + address.authority.encode() + b"\r\n"
        # The gateway's own response headers, all but the queue time's digits.
        self.gateway_headers = (b"X-Gateway-Backend: " + self.name.encode()
                                + b"\r\nX-Gateway-Queue-Ms: ")
        self.path_prefix = address.prefix.encode()
        self._slots = slots
        # Slotted requests this gateway may run here now: `slots`, unless the
        # slots are shared with other replicas through Redis, where it is this
        # replica's lease (sched/shared_slots.py sets `shared` and keeps it).
        self.cap = slots
        self.shared = False
        self.in_flight = 0  # queued-route requests running (bounded by cap)
        self.unslotted = 0  # model-management / passthrough requests running
        self.kind = ApiKind.UNKNOWN
        # Set by the operator (config `kind`, --backend-kind): never re-detected.
        self.kind_configured = False
        # An Ollama backend's own /v1 layer: None until the health check asked
        # (assumed there), False when /v1/models is not served (native API only).
        self.v1: bool | None = None
        # The operator's choice for OpenAI requests to an Ollama backend
        # (config.OPENAI_VIA): "auto" follows `v1`; "v1" or "native" are kept.
        self.openai_via = "auto"
        # The APIs it speaks (wire/routes.py SPEAKS_*), kept by refresh(): a
        # request to a route whose bit is missing is translated.
        self.speaks = SPEAKS_ALL
        # Per-backend probe override: this path every probe_interval seconds,
        # even while requests run (health.py); None = the kind's own request.
        self.probe_path: str | None = None
        self.probe_interval: float | None = None
        self.online = False
        self.draining = False
        # A health probe is on its way to this idle backend of a kind that cuts
        # its running stream when another request comes (llama-cpp-python):
        # no request starts here until its answer is in (health.py). A count:
        # a model refresh may overlap the periodic check.
        self.probing = 0
        # normalized name -> the backend's own /api/tags entry (or a synthesized one)
        self.models: dict[str, dict[str, Any]] = {}
        # the backend's /v1/models items, for OpenAI-kind backends
        self.v1_models: list[dict[str, Any]] = []
        # An OpenAI-kind backend's model ids by normalized name: such a server
        # (vLLM) finds a model only by its exact id, where routing folds case
        # and `:latest`, so a request is sent with the id spelled as listed.
        # Empty for Ollama, which folds names itself.
        self.exact_names: dict[str, str] = {}
        self.loaded: set[str] = set()
        self.version: str | None = None
        self.requests_done = 0
        self.failures = 0
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        self.probe_failures = 0
        self.probes_ok = 0
        self.last_error = ""
        self.pool: UpstreamPool | None = None
        # online and not draining and breaker closed (or half-open and idle:
        # its one trial): kept up to date by refresh(), so the dispatcher's
        # hot path reads one attribute.
        self.available = False
        self.breaker = Breaker.CLOSED
        self.breaker_cooldown = BREAKER_COOLDOWN_S
        self.breaker_timer: Cancellable | None = None
        # The dispatchers of every pool listing this backend, when more than one
        # does (pools.py): a freed slot is offered to each, the others before
        # the one whose request freed it. Empty otherwise.
        self.pumps: tuple[Pump, ...] = ()

    def configure(self, options: BackendOptions) -> None:
        """Apply the operator's kind and probe settings (`auto` leaves the kind to detection)."""
        if options.kind != "auto":
            self.kind = ApiKind(options.kind)
        self.kind_configured = options.kind != "auto"
        self.probe_path = options.probe_path
        self.probe_interval = options.probe_interval
        self.openai_via = options.openai_via
        self.refresh()

    @property
    def slots(self) -> int:
        """How many inference requests run at once on this backend (fleet-wide with Redis)."""
        return self._slots

    @slots.setter
    def slots(self, value: int) -> None:
        self._slots = value
        if not self.shared:
            self.cap = value

    @property
    def busy(self) -> bool:
        """Whether any request is running on this backend now."""
        return self.in_flight > 0 or self.unslotted > 0

    @property
    def serving(self) -> bool:
        """Available, or half-open with its trial running: a request for its
        models waits for it rather than being refused."""
        return self.available or (self.online and not self.draining and (
            self.breaker is Breaker.HALF_OPEN
            or (self.probing > 0 and self.breaker is Breaker.CLOSED)))

    def refresh(self) -> None:
        """Recompute `available` after online / draining / breaker changed (and, half-open,
        after a request started or ended: the trial is one request, on an idle backend)."""
        breaker = self.breaker
        self.available = self.online and not self.draining and self.probing == 0 and (
            breaker is Breaker.CLOSED or (breaker is Breaker.HALF_OPEN and not self.busy))
        kind = self.kind
        if kind is ApiKind.OLLAMA:
            via = self.openai_via
            native_only = via == "native" or (via == "auto" and self.v1 is False)
            self.speaks = SPEAKS_OLLAMA if native_only else SPEAKS_ALL
        elif kind is ApiKind.UNKNOWN:
            self.speaks = SPEAKS_ALL  # serves nothing until detected
        else:
            self.speaks = SPEAKS_OPENAI

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready view for status pages and the admin API."""
        return {
            "url": self.name,
            "kind": self.kind.value,
            "online": self.online,
            "draining": self.draining,
            "breaker": self.breaker.value,
            "slots": self.slots,
            "in_flight": self.in_flight,
            "requests_done": self.requests_done,
            "failures": self.failures,
            "models": sorted(self.models),
            "loaded": sorted(self.loaded),
            "version": self.version,
            "last_error": self.last_error,
        }
