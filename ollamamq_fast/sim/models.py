"""The simulator's model library: name grammar, tags, loaded models (ps) and blobs."""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from .gojson import BodyError

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
# Ollama's default keep_alive (OLLAMA_KEEP_ALIVE unset).
DEFAULT_KEEP_ALIVE_S = 300.0
# A negative keep_alive means "for ever": Go stores math.MaxInt64 ns, about 292 years.
FOREVER_S = 292 * 365.25 * 86400

# Part grammar from ollama types/model/name.go (lengths as there).
_HOST_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}")
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,79}")
_MODEL_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")


class ModelName:
    """host/namespace/model:tag with Ollama's defaults filled in (immutable by convention)."""

    __slots__ = ("host", "key", "model", "namespace", "tag")

    def __init__(self, host: str, namespace: str, model: str, tag: str) -> None:
        self.host = host
        self.namespace = namespace
        self.model = model
        self.tag = tag
        # Case-folded identity: Ollama matches local names with EqualFold.
        self.key = f"{host}/{namespace}/{model}:{tag}".lower()

    def display(self) -> str:
        """DisplayShortest: drop the default host and namespace."""
        if self.host.lower() == DEFAULT_HOST:
            if self.namespace.lower() == DEFAULT_NAMESPACE:
                return f"{self.model}:{self.tag}"
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    def full(self) -> str:
        """The fully qualified form used in capability errors."""
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"


@lru_cache(maxsize=4096)
def parse_name(raw: str) -> ModelName | None:
    """Parse `[host/][namespace/]model[:tag][@digest]`; None when invalid."""
    text = raw.strip()
    text = text.split("@", 1)[0]
    tag = DEFAULT_TAG
    colon = text.rfind(":")
    if colon >= 0 and "/" not in text[colon + 1 :]:
        text, tag = text[:colon], text[colon + 1 :]
    parts = text.split("/")
    if len(parts) == 1:
        host, namespace, model = DEFAULT_HOST, DEFAULT_NAMESPACE, parts[0]
    elif len(parts) == 2:
        host, (namespace, model) = DEFAULT_HOST, parts
    elif len(parts) == 3:
        host, namespace, model = parts
    else:
        return None
    if not (
        _HOST_RE.fullmatch(host)
        and _NAMESPACE_RE.fullmatch(namespace)
        and _MODEL_RE.fullmatch(model)
        and _TAG_RE.fullmatch(tag)
    ):
        return None
    return ModelName(host, namespace, model, tag)


@dataclass(frozen=True, slots=True)
class Family:
    """What a model name implies about its architecture and size."""

    family: str
    parameter_size: str
    quantization: str
    context_length: int
    embedding_length: int
    embedding_only: bool = False


# First matching substring of the model's base name wins.
_FAMILIES: tuple[tuple[str, Family], ...] = (
    ("minilm", Family("bert", "23M", "F16", 512, 384, True)),
    ("nomic-embed", Family("nomic-bert", "137M", "F16", 2048, 768, True)),
    ("embed", Family("bert", "334M", "F16", 512, 1024, True)),
    ("bge", Family("bert", "567M", "F16", 8192, 1024, True)),
    ("llama3.2", Family("llama", "3.2B", "Q4_K_M", 131072, 3072)),
    ("llama", Family("llama", "8.0B", "Q4_K_M", 131072, 4096)),
    ("qwen3", Family("qwen3", "8.2B", "Q4_K_M", 40960, 4096)),
    ("qwen", Family("qwen2", "7.6B", "Q4_K_M", 32768, 3584)),
    ("gemma", Family("gemma3", "4.3B", "Q4_K_M", 131072, 2560)),
    ("mistral", Family("llama", "7.2B", "Q4_K_M", 32768, 4096)),
    ("phi", Family("phi3", "3.8B", "Q4_K_M", 131072, 3072)),
    ("gpt-oss", Family("gptoss", "20.9B", "MXFP4", 131072, 2880)),
)
_DEFAULT_FAMILY = Family("llama", "7B", "Q4_K_M", 8192, 4096)
_TAG_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)([bm])", re.IGNORECASE)


def _family_for(name: ModelName) -> Family:
    """Guess the family from the name; a size in the tag (`0.5b`) overrides."""
    base = name.model.lower()
    fam = next((f for sub, f in _FAMILIES if sub in base), _DEFAULT_FAMILY)
    sized = _TAG_SIZE_RE.match(name.tag)
    if sized and not fam.embedding_only:
        fam = Family(
            fam.family,
            sized.group(1) + sized.group(2).upper(),
            fam.quantization,
            fam.context_length,
            fam.embedding_length,
        )
    return fam


def _parameter_count(size: str) -> int:
    """`3.2B` -> 3_200_000_000."""
    scale = 1_000_000_000 if size.endswith("B") else 1_000_000
    return int(float(size[:-1]) * scale)


def go_time(epoch: float) -> str:
    """A local time the way Go marshals time.Time (RFC 3339, offset or Z)."""
    moment = datetime.fromtimestamp(epoch).astimezone()
    text = moment.isoformat(timespec="microseconds")
    if moment.utcoffset() == UTC.utcoffset(None):
        text = text[:-6] + "Z"
    return text


@dataclass
class ModelEntry:
    """One local model, as /api/tags and /api/show describe it."""

    name: ModelName
    family: Family
    size: int
    digest: str
    modified: float
    parent_model: str = ""
    system: str = ""
    template: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def capabilities(self) -> list[str]:
        """Sim choice: every completion model can call tools and think."""
        if self.family.embedding_only:
            return ["embedding"]
        return ["completion", "tools", "thinking"]

    def details(self) -> dict[str, Any]:
        """The `details` object shared by tags, ps and show."""
        fam = self.family
        return {
            "parent_model": self.parent_model,
            "format": "gguf",
            "family": fam.family,
            "families": [fam.family],
            "parameter_size": fam.parameter_size,
            "quantization_level": fam.quantization,
        }

    def tag_item(self) -> dict[str, Any]:
        """One element of /api/tags `models`."""
        display = self.name.display()
        return {
            "name": display,
            "model": display,
            "modified_at": go_time(self.modified),
            "size": self.size,
            "digest": self.digest,
            "details": self.details(),
        }


def _describe(name: ModelName, modified: float, like: ModelEntry | None = None) -> ModelEntry:
    """Build a deterministic entry for `name`, optionally copying another's looks."""
    fam = like.family if like is not None else _family_for(name)
    bytes_per_param = 2.0 if fam.quantization == "F16" else 0.6
    size = int(_parameter_count(fam.parameter_size) * bytes_per_param) + 1_000_000
    digest = hashlib.sha256(name.key.encode()).hexdigest()
    return ModelEntry(name=name, family=fam, size=size, digest=digest, modified=modified)


@dataclass
class Loaded:
    """A model held in (simulated) memory, listed by /api/ps."""

    entry: ModelEntry
    expires: float


class ModelStore:
    """Everything the simulator knows about models and blobs; loop-thread only."""

    def __init__(self, names: list[str]) -> None:
        """Register the configured models, first one most recently modified."""
        self.models: dict[str, ModelEntry] = {}
        self.loaded: dict[str, Loaded] = {}
        # Bumped on every change to the model set (answers cached by the fast lane depend on it).
        self.version = 0
        # Blob files by their on-disk name (`sha256-<hex as given>`) -> size.
        self.blobs: dict[str, int] = {}
        now = time.time()
        for i, raw in enumerate(names):
            name = parse_name(raw)
            if name is None:
                raise ValueError(f"invalid model name: {raw!r}")
            self.models[name.key] = _describe(name, now - 60.0 * (i + 1))

    def find(self, raw: str) -> ModelEntry | None:
        """Resolve a request's model name (case-insensitive, defaults applied)."""
        name = parse_name(raw)
        if name is None:
            return None
        return self.models.get(name.key)

    def add(self, name: ModelName, like: ModelEntry | None = None) -> ModelEntry:
        """Create or replace a model (pull, create, copy) as modified now."""
        entry = _describe(name, time.time(), like)
        if like is not None:
            entry.parent_model = like.parent_model
            entry.template = like.template
            entry.system = like.system
            entry.parameters = dict(like.parameters)
        self.models[name.key] = entry
        self.version += 1
        return entry

    def remove(self, entry: ModelEntry) -> None:
        """Delete a model; it also leaves memory."""
        self.models.pop(entry.name.key, None)
        self.loaded.pop(entry.name.key, None)
        self.version += 1

    def ordered(self) -> list[ModelEntry]:
        """Models most recently modified first (by whole seconds, stable, as Ollama sorts)."""
        return sorted(self.models.values(), key=lambda e: -int(e.modified))

    def tags(self) -> list[dict[str, Any]]:
        """/api/tags models."""
        return [e.tag_item() for e in self.ordered()]

    def touch(self, entry: ModelEntry, keep_alive_s: float | None) -> None:
        """Mark a model used now; keep_alive 0 unloads it, negative keeps it for ever."""
        seconds = DEFAULT_KEEP_ALIVE_S if keep_alive_s is None else keep_alive_s
        if seconds == 0:
            self.loaded.pop(entry.name.key, None)
            return
        if seconds < 0:
            seconds = FOREVER_S
        loaded = self.loaded.get(entry.name.key)
        if loaded is not None and loaded.entry is entry:
            loaded.expires = time.time() + seconds
        else:
            self.loaded[entry.name.key] = Loaded(entry, time.time() + seconds)

    def unload(self, entry: ModelEntry) -> None:
        """keep_alive 0 with an empty prompt: drop it from memory at once."""
        self.loaded.pop(entry.name.key, None)

    def ps(self) -> list[dict[str, Any]]:
        """/api/ps models, longest remaining keep-alive first; expired ones dropped."""
        now = time.time()
        for key in [k for k, v in self.loaded.items() if v.expires <= now]:
            del self.loaded[key]
        items = sorted(self.loaded.values(), key=lambda v: -v.expires)
        out = []
        for item in items:
            entry = item.entry
            display = entry.name.display()
            out.append(
                {
                    "name": display,
                    "model": display,
                    "size": entry.size,
                    "digest": entry.digest,
                    "details": entry.details(),
                    "expires_at": go_time(min(item.expires, 253402300000.0)),
                    "size_vram": entry.size,
                    "context_length": min(entry.family.context_length, 4096),
                }
            )
        return out

    def blob_exists(self, digest: str) -> bool:
        """HEAD /api/blobs: the file name swaps the first ':' for '-'."""
        return digest.replace(":", "-", 1) in self.blobs

    def add_blob(self, digest: str, size: int) -> None:
        """Record an uploaded blob under its file name."""
        self.blobs[digest.replace(":", "-", 1)] = size


_DURATION_RE = re.compile(r"([0-9]*\.?[0-9]*)(ns|us|µs|μs|ms|s|m|h)?")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_go_duration(text: str) -> float:
    """time.ParseDuration, in seconds; raises BodyError with Go's message."""
    quoted = '"' + text + '"'
    body = text
    sign = 1.0
    if body[:1] in ("+", "-"):
        sign = -1.0 if body[0] == "-" else 1.0
        body = body[1:]
    if body == "0":
        return 0.0
    if not body:
        raise BodyError(f"time: invalid duration {quoted}")
    total = 0.0
    pos = 0
    while pos < len(body):
        match = _DURATION_RE.match(body, pos)
        number = match.group(1) if match else ""
        if not number or number == ".":
            raise BodyError(f"time: invalid duration {quoted}")
        unit = match.group(2) if match else None
        if unit is None:
            rest = body[pos + len(number) :]
            if not rest:
                raise BodyError(f"time: missing unit in duration {quoted}")
            bad = re.match(r"[^0-9.]+", rest)
            raise BodyError(f'time: unknown unit "{bad.group(0) if bad else rest}" in duration {quoted}')
        total += float(number) * _UNIT_S[unit]
        pos = match.end() if match else len(body)
    return sign * total


def parse_keep_alive(value: Any) -> float | None:
    """api.Duration.UnmarshalJSON: seconds, None when absent, -1 for ever."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise BodyError("Unsupported type: 'bool'")
    if isinstance(value, (int, float)):
        return -1.0 if value < 0 else float(value)
    if isinstance(value, str):
        seconds = parse_go_duration(value)
        return -1.0 if seconds < 0 else seconds
    go_type = "[]interface {}" if isinstance(value, list) else "map[string]interface {}"
    raise BodyError(f"Unsupported type: '{go_type}'")
