"""The route table: for each path, how the gateway handles the request.

Kinds:
- LOCAL: answered by the gateway from fleet state (health, status, version,
  merged model lists). No backend slot is taken.
- QUEUED: inference. The body is read (bounded), its top-level model sniffed,
  and the request waits in its user's fair queue for a backend slot.
- MODEL: model management routed to a backend that has the model (show, delete,
  copy, push) or to any Ollama backend (pull, create). Not queued, no slot: these
  do not use the GPU, and must not wait behind a user's generations.
- PRIMARY: routed to the primary Ollama backend with the body streamed through
  (blob uploads can be GBs), and unknown paths with --allow-all-routes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from ollamamq_fast.wire.errors import Api


class Kind(enum.Enum):
    """How a route is served."""

    LOCAL = "local"
    QUEUED = "queued"
    MODEL = "model"
    PRIMARY = "primary"


class Local(enum.Enum):
    """Which local handler answers a LOCAL route."""

    HEALTH = "health"
    READY = "ready"
    ROOT = "root"
    VERSION = "version"
    TAGS = "tags"
    PS = "ps"
    V1_MODELS = "v1_models"
    V1_MODEL = "v1_model"


@dataclass(frozen=True, slots=True)
class Route:
    """One entry of the route table."""

    kind: Kind
    api: Api
    # A tuple, not a set: the method is a new bytes object on every request, and
    # comparing it with one or two names costs less than hashing it.
    methods: tuple[bytes, ...]
    # Top-level JSON keys naming the model, in Go's cmp.Or order (first non-empty wins).
    model_keys: tuple[str, ...] = ()
    # Any backend may serve it when the model is not known yet (pull, create).
    any_backend: bool = False
    # Native routes go to Ollama backends only; /v1 routes to any backend.
    native: bool = True
    local: Local | None = None
    # Model lists change after these succeed: refresh that backend's models.
    refresh_models: bool = False
    # Translatable (wire/translate): the API bit (SPEAKS_OLLAMA or SPEAKS_OPENAI)
    # of this inference route. A backend whose `speaks` lacks the bit gets the
    # request translated (proxy/translating.py); 0 = never translated.
    translate: int = 0
    # Native routes that any backend may serve (translated): an Ollama backend
    # with the model loaded is tried first (fleet/select.py).
    native_first: bool = False


# What a backend speaks (Backend.speaks), as bits a route's `translate` is tested against.
SPEAKS_OLLAMA: Final = 1  # native /api/*
SPEAKS_OPENAI: Final = 2  # OpenAI-compatible /v1/*
SPEAKS_ALL: Final = SPEAKS_OLLAMA | SPEAKS_OPENAI

_GET: Final = (b"GET", b"HEAD")
_POST: Final = (b"POST",)


def _queued(api: Api, native: bool, translate: int = 0) -> Route:
    return Route(Kind.QUEUED, api, _POST, ("model",), native=native, translate=translate)


def _translated(api: Api) -> Route:
    # Any backend with the model may run it: translated when it speaks the other API.
    if api is Api.OLLAMA:
        return Route(Kind.QUEUED, api, _POST, ("model",), native=False,
                     translate=SPEAKS_OLLAMA, native_first=True)
    return _queued(api, False, SPEAKS_OPENAI)


_OLLAMA, _OPENAI = Api.OLLAMA, Api.OPENAI

EXACT: Final[dict[bytes, Route]] = {
    b"/health": Route(Kind.LOCAL, _OLLAMA, _GET, local=Local.HEALTH),
    b"/ready": Route(Kind.LOCAL, _OLLAMA, _GET, local=Local.READY),
    b"/": Route(Kind.LOCAL, _OLLAMA, _GET, local=Local.ROOT),
    b"/api/version": Route(Kind.LOCAL, _OLLAMA, _GET, local=Local.VERSION),
    b"/api/tags": Route(Kind.LOCAL, _OLLAMA, _GET, local=Local.TAGS),
    b"/api/ps": Route(Kind.LOCAL, _OLLAMA, _GET, local=Local.PS),
    # The primary Ollama's own (newer versions: whether its cloud features are on).
    b"/api/status": Route(Kind.PRIMARY, _OLLAMA, (b"GET",)),
    b"/api/generate": _translated(_OLLAMA),
    b"/api/chat": _translated(_OLLAMA),
    b"/api/embed": _translated(_OLLAMA),
    b"/api/embeddings": _translated(_OLLAMA),
    # Answered by the gateway for a model only OpenAI-compatible backends serve.
    b"/api/show": Route(Kind.MODEL, _OLLAMA, _POST, ("model", "name"), native=False,
                        translate=SPEAKS_OLLAMA, native_first=True),
    b"/api/delete": Route(
        Kind.MODEL, _OLLAMA, (b"DELETE",), ("model", "name"), refresh_models=True
    ),
    b"/api/copy": Route(Kind.MODEL, _OLLAMA, _POST, ("source",), refresh_models=True),
    b"/api/push": Route(Kind.MODEL, _OLLAMA, _POST, ("model", "name")),
    b"/api/pull": Route(
        Kind.MODEL, _OLLAMA, _POST, ("model", "name"), any_backend=True, refresh_models=True
    ),
    b"/api/create": Route(
        Kind.MODEL, _OLLAMA, _POST, ("model", "name"), any_backend=True, refresh_models=True
    ),
    b"/v1/chat/completions": _translated(_OPENAI),
    b"/v1/completions": _translated(_OPENAI),
    b"/v1/embeddings": _translated(_OPENAI),
    b"/v1/responses": _queued(_OPENAI, False),
    b"/v1/messages": _queued(_OPENAI, False),
    b"/v1/models": Route(Kind.LOCAL, _OPENAI, (b"GET",), local=Local.V1_MODELS, native=False),
}

# Each route path to the table's own bytes object: a request's path (a new
# object from the parser) is swapped for it, so that the look-ups keyed by the
# path later in the request find it by identity, its hash already kept.
CANONICAL: Final[dict[bytes, bytes]] = {path: path for path in EXACT}

BLOBS_PREFIX: Final = b"/api/blobs/"
V1_MODEL_PREFIX: Final = b"/v1/models/"

BLOB_ROUTE: Final = Route(Kind.PRIMARY, _OLLAMA, (b"HEAD", b"POST"))
V1_MODEL_ROUTE: Final = Route(
    Kind.LOCAL, _OPENAI, (b"GET",), local=Local.V1_MODEL, native=False
)
# Unknown paths forwarded with --allow-all-routes: any method, to the primary backend.
FALLBACK_ROUTE: Final = Route(Kind.PRIMARY, _OLLAMA, (), native=False)


def lookup(path: bytes) -> Route | None:
    """The route for a path (without query string), or None when unknown."""
    route = EXACT.get(path)
    if route is not None:
        return route
    if path.startswith(BLOBS_PREFIX) and len(path) > len(BLOBS_PREFIX):
        return BLOB_ROUTE
    if path.startswith(V1_MODEL_PREFIX) and len(path) > len(V1_MODEL_PREFIX):
        return V1_MODEL_ROUTE
    return None


def api_of_path(path: bytes) -> Api:
    """Error dialect for a path that has no route entry."""
    return Api.OPENAI if path.startswith(b"/v1/") else Api.OLLAMA
