"""Simulator settings (`SimOptions`) and the live counters tests read (`SimStats`)."""

from __future__ import annotations

from dataclasses import dataclass, field

API_MODES = ("ollama", "openai", "both")

DEFAULT_MODELS = ["llama3.2:latest", "qwen2.5:0.5b", "all-minilm:latest"]


@dataclass
class SimOptions:
    """How the fake backend behaves; every field maps to one `ollamamq-fast sim` flag."""

    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    # Time from request to first token (prompt eval + scheduling on a real GPU).
    ttft_ms: float = 50.0
    # Decode speed per stream; 0 writes every token at once in large batched writes.
    tokens_per_s: float = 50.0
    # Tokens per generation unless num_predict / max_tokens / X-Sim-Tokens says otherwise.
    tokens: int = 20
    # Concurrent inference requests before answering 503 like Ollama's full queue; 0 = no limit.
    max_parallel: int = 0
    # "ollama": /api/* and /, "openai": /v1/* only (vLLM, llama.cpp), "both": everything.
    api: str = "both"
    # As vLLM: an OpenAI request must name a model exactly as /v1/models lists it
    # (Ollama folds case and a missing `:latest`).
    exact_ids: bool = False
    version: str = "0.12.0"
    # The first N pulls fail mid-stream ("pull model manifest: ... connection reset"),
    # so a gateway's retries can be tested; 0 = pulls succeed.
    pull_failures: int = 0
    # Seconds between a pull's progress lines (None: the token interval).
    pull_step_s: float | None = None

    def __post_init__(self) -> None:
        """Reject settings that would make the simulator misbehave silently."""
        if self.api not in API_MODES:
            raise ValueError(f"api must be one of {', '.join(API_MODES)}, not {self.api!r}")
        if self.ttft_ms < 0 or self.tokens_per_s < 0:
            raise ValueError("ttft_ms and tokens_per_s must be >= 0")
        if self.tokens < 0 or self.max_parallel < 0:
            raise ValueError("tokens and max_parallel must be >= 0")


@dataclass
class SimStats:
    """Counters updated by the event loop; tests read them from any thread."""

    # Requests fully parsed (every route).
    requests: int = 0
    # Inference requests (generate, chat, embed, /v1 completions, ...) in progress now.
    active: int = 0
    # The most inference requests ever in progress at once (shared-slot tests).
    peak_active: int = 0
    # Responses left unfinished because the client closed the connection.
    cancelled: int = 0
    # loop.time() of each such cancellation, recorded inside connection_lost.
    cancel_times: list[float] = field(default_factory=list)
    # loop.time() of every connection close, whoever closed it.
    connection_close_times: list[float] = field(default_factory=list)
    # Connections open now, and accepted since start.
    connections: int = 0
    connections_total: int = 0
    # Requests refused with 503 because max_parallel was reached.
    rejected: int = 0
    # Models asked for by /api/pull and removed by /api/delete, in order.
    pulls: list[str] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    # NDJSON lines / SSE events written by streams.
    lines: int = 0
