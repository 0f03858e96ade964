"""Which build runs: the mypyc-compiled hot path or plain Python, and the switch.

`setup.py` compiles COMPILED_MODULES with mypyc when it finds a working C
compiler and writes the outcome to `_build_info.json` beside this file. At
package import, `choose()` keeps the compiled extensions only when that record
says "mypyc" and every compiled source is byte-for-byte the one that was
compiled; otherwise (OLLAMAMQ_FAST_PURE=1, a source edited after the build, no
record) a finder placed first on `sys.meta_path` loads the `.py` files.

All or none: a compiled module reaches the native classes of the others
directly, so mixing compiled and interpreted copies of the same module would
give two classes per name. This module imports nothing from the package
(setup.py loads it by path, before the package can be imported).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Final

PACKAGE: Final = "ollamamq_fast"
PURE_ENV: Final = "OLLAMAMQ_FAST_PURE"
INFO_FILE: Final = "_build_info.json"
# mypyc puts the code of all compiled modules in one shared library, the
# top-level module GROUP + "__mypyc" beside the package; each compiled module's
# own extension only forwards to it.
GROUP: Final = "ollamamq_fast"
LIBRARY: Final = GROUP + "__mypyc"

# The per-request path, compiled together (order does not matter). Left out:
# - fleet/health.py, policy/ratelimit.py, policy/quota.py: timers and control
#   traffic (probes, syncs), not per request.
# - gateway.py, config.py, operator.py, control/, state/ (but state/tally.py,
#   which sums a usage row per request): start-up, admin and storage.
# - accesslog.py: the writer thread's loop and file handling (but accessline.py,
#   which formats a line per request on that thread, under the loop's GIL).
COMPILED_MODULES: Final[tuple[str, ...]] = (
    "ollamamq_fast.wire.errors",
    "ollamamq_fast.wire.framing",
    "ollamamq_fast.wire.headers",
    "ollamamq_fast.wire.paths",
    "ollamamq_fast.wire.routes",
    "ollamamq_fast.wire.sniff",
    "ollamamq_fast.proxy.state",
    "ollamamq_fast.proxy.flow",
    "ollamamq_fast.proxy.pool",
    "ollamamq_fast.proxy.chunks",
    "ollamamq_fast.proxy.upstream",
    "ollamamq_fast.proxy.intake",
    "ollamamq_fast.proxy.answers",
    "ollamamq_fast.proxy.recovery",
    "ollamamq_fast.proxy.forward",
    "ollamamq_fast.proxy.admission",
    "ollamamq_fast.proxy.response",
    "ollamamq_fast.proxy.exchange",
    "ollamamq_fast.proxy.downstream",
    "ollamamq_fast.proxy.local",
    "ollamamq_fast.sched.fairqueue",
    "ollamamq_fast.sched.dispatcher",
    "ollamamq_fast.fleet.models",
    "ollamamq_fast.fleet.backend",
    "ollamamq_fast.fleet.select",
    "ollamamq_fast.fleet.passive",
    "ollamamq_fast.limits",
    "ollamamq_fast.policy.gate",
    "ollamamq_fast.policy.identity",
    "ollamamq_fast.policy.caps",
    "ollamamq_fast.policy.streamusage",
    "ollamamq_fast.policy.cache",
    "ollamamq_fast.policy.engine",
    "ollamamq_fast.accounting.ledger",
    "ollamamq_fast.state.tally",
    "ollamamq_fast.stats",
    "ollamamq_fast.accessline",
    "ollamamq_fast.plane",
)

_HERE: Final = os.path.dirname(os.path.abspath(__file__))

# Set once by choose(): why the .py sources are loaded (None: compiled allowed).
_pure_reason: str | None = None


def source_path(module: str, root: str = _HERE) -> str:
    """The .py file of a package module, under the package directory `root`."""
    parts = module.split(".")
    assert parts[0] == PACKAGE, module
    return os.path.join(root, *parts[1:]) + ".py"


def source_digest(path: str) -> str:
    """What identifies the source a module was compiled from."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_info(root: str = _HERE) -> dict[str, object] | None:
    """The build record written by setup.py, or None (never installed, unreadable)."""
    try:
        with open(os.path.join(root, INFO_FILE), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Finds the compiled modules' .py files ahead of their extensions."""

    def __init__(self, modules: Sequence[str]) -> None:
        self.modules = frozenset(modules)

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.modules:
            return None
        return importlib.util.spec_from_file_location(fullname, source_path(fullname))


def _why_pure() -> str | None:
    """Why the compiled extensions must not be loaded, or None if they may."""
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return f"{PURE_ENV} is set"
    info = read_info()
    if info is None:
        return "not built by setup.py"
    if info.get("build") != "mypyc":
        return str(info.get("reason") or "built without mypyc")
    sources = info.get("sources")
    if not isinstance(sources, dict):
        return "build record has no sources"
    for module in COMPILED_MODULES:
        try:
            digest = source_digest(source_path(module))
        except OSError:
            return f"{module}: source missing"
        if sources.get(module) != digest:
            return f"{module} changed after it was compiled (reinstall to recompile)"
    # Without the shared library every compiled module fails to import, and the
    # gateway with them (seen with an editable install whose finder did not list
    # it): the sources still run.
    if importlib.util.find_spec(LIBRARY) is None:
        return f"the compiled library {LIBRARY} is not importable (reinstall to repair)"
    return None


def choose() -> None:
    """Decide, once per process, whether the compiled extensions may load.

    Called by the package's __init__ before any compiled module is imported.
    """
    global _pure_reason
    if any(isinstance(f, _SourceFinder) for f in sys.meta_path):
        return
    _pure_reason = _why_pure()
    if _pure_reason is None:
        return
    sys.meta_path.insert(0, _SourceFinder(COMPILED_MODULES))
    info = read_info()
    if info is not None and info.get("build") == "mypyc" and PURE_ENV not in _pure_reason:
        # Compiled once, now stale: say so, since the code runs slower than built.
        warnings.warn(f"ollamamq-fast runs pure Python: {_pure_reason}",
                      RuntimeWarning, stacklevel=2)


def _is_compiled(module: str) -> bool:
    loaded = sys.modules.get(module)
    spec = loaded.__spec__ if loaded is not None else importlib.util.find_spec(module)
    origin = spec.origin if spec is not None else None
    return origin is not None and origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def compiled_modules() -> list[str]:
    """The hot-path modules that load (or loaded) from compiled extensions."""
    return [m for m in COMPILED_MODULES if _is_compiled(m)]


def build() -> str:
    """"mypyc" when the whole hot path is compiled, "python" when none of it is."""
    n = len(compiled_modules())
    if n == len(COMPILED_MODULES):
        return "mypyc"
    return "python" if n == 0 else "mixed"


def pure_reason() -> str | None:
    """Why this process runs the .py sources (None when compiled is allowed)."""
    return _pure_reason


def describe() -> str:
    """One line for `--version`: the build, and why pure when it could be compiled."""
    kind = build()
    reason = _pure_reason
    return kind if kind == "mypyc" or reason is None else f"{kind}: {reason}"
