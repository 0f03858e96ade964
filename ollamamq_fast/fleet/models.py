"""Model-name normalization, the way Ollama resolves names (docs/protocol-notes.md §2, §7.6).

`llama3.2`, `LLaMA3.2`, `llama3.2:latest`, `library/llama3.2` and
`registry.ollama.ai/library/llama3.2:latest` are one model. Both the names a
client sends and the names a backend lists go through `normalize_model`, so
OpenAI-style names (`meta-llama/Llama-3-8B`) compare consistently too.
"""

from __future__ import annotations

from typing import Final

DEFAULT_HOST: Final = "registry.ollama.ai"
DEFAULT_NAMESPACE: Final = "library"
DEFAULT_TAG: Final = "latest"

# Names repeat endlessly on the hot path; a small memo avoids re-splitting them.
# Bounded so that a client inventing names cannot grow it without limit.
_MEMO_LIMIT: Final = 4096
_memo: Final[dict[str, str]] = {}


def normalize_model(name: str) -> str:
    """Canonical, case-folded `[host/][namespace/]model:tag` form of a model name."""
    cached = _memo.get(name)
    if cached is not None:
        return cached
    result = _normalize(name)
    if len(_memo) >= _MEMO_LIMIT:
        _memo.clear()
    _memo[name] = result
    return result


def _normalize(name: str) -> str:
    n = name.strip().casefold()
    if not n:
        return ""
    # A pinned digest does not change which backend can serve the name.
    at = n.find("@")
    if at >= 0:
        n = n[:at]
    slash = n.rfind("/")
    colon = n.rfind(":")
    if colon > slash:
        base, tag = n[:colon], n[colon + 1 :] or DEFAULT_TAG
    else:
        base, tag = n, DEFAULT_TAG
    parts = base.split("/")
    if len(parts) == 3 and parts[0] == DEFAULT_HOST:
        parts = parts[1:]
    if len(parts) == 2 and parts[0] == DEFAULT_NAMESPACE:
        parts = parts[1:]
    return "/".join(parts) + ":" + tag


def namespace_of(name: str) -> str:
    """The namespace part of a model name (`library` when none), for /v1 `owned_by`."""
    n = name.strip()
    at = n.find("@")
    if at >= 0:
        n = n[:at]
    parts = n.split("/")
    if len(parts) >= 2:
        return parts[-2]
    return DEFAULT_NAMESPACE
