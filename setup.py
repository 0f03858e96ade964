"""Build: compile the per-request modules with mypyc when a C compiler works.

Everything else about the package is in pyproject.toml. The compiled build is
an optimisation, never a requirement: with no working C compiler, with
OLLAMAMQ_FAST_PURE=1, or when mypyc or the C compiler fails, the install goes
on as plain Python with a warning. The outcome is recorded in
ollamamq_fast/_build_info.json, which the package reads at import
(ollamamq_fast/buildinfo.py) to decide what it loads.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_buildinfo() -> ModuleType:
    # By path: the package itself cannot be imported before it is built.
    path = os.path.join(HERE, "ollamamq_fast", "buildinfo.py")
    spec = importlib.util.spec_from_file_location("_ollamamq_fast_buildinfo", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


buildinfo = _load_buildinfo()


def _say(message: str) -> None:
    # pip shows a build's output only with -v; a warning about a slower build
    # should still reach a plain `pip install`, so it goes to stderr as well.
    print(f"ollamamq-fast build: {message}", file=sys.stderr, flush=True)


def _probe_compiler() -> tuple[Any, Callable[[list[str]], bool]]:
    """The C compiler setuptools would use, and a test: does it build a file that
    includes Python.h with these extra arguments?"""
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    compiler = new_compiler()
    customize_compiler(compiler)
    include = sysconfig.get_paths()["include"]

    def builds(extra: list[str]) -> bool:
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write("#include <Python.h>\nint probe(void) { return PY_MAJOR_VERSION; }\n")
            try:
                compiler.compile([src], output_dir=tmp, include_dirs=[include],
                                 extra_postargs=extra)
            except Exception:  # noqa: BLE001 - any failure means "no"
                return False
        return True

    return compiler, builds


def _compiler_works() -> str | None:
    """None if a C compiler can build against Python.h here, else why not."""
    compiler, builds = _probe_compiler()
    if builds([]):
        return None
    cc = (getattr(compiler, "compiler_so", None) or ["cc"])[0]
    include = sysconfig.get_paths()["include"]
    return f"no working C compiler ({cc} cannot build against {include}/Python.h)"


# Code-generation flags for the compiled modules, used when the compiler takes them.
# mypyc puts all compiled modules in one shared library whose functions call
# each other by exported symbols: without -fno-semantic-interposition every
# such call goes through the PLT and none is inlined, in case another library
# overrides the symbol (which never happens here). -fno-plt calls libpython
# through the GOT directly. Measured with callgrind (profiling/instructions.py):
# fewer instructions and instruction-cache misses per request (bench/RESULTS.md).
EXTRA_CFLAGS = ("-fno-semantic-interposition", "-fno-plt")


def _accepted_flags(flags: tuple[str, ...]) -> list[str]:
    """The flags of `flags` the C compiler accepts (each tried alone, as an error if unknown)."""
    if os.name != "posix":
        return []
    _, builds = _probe_compiler()
    return [flag for flag in flags if builds(["-Werror", flag])]


# Decided once per process: setuptools may finalize build_ext more than once
# (editable installs reinitialize it), and running mypyc takes a while.
_plan: dict[str, Any] = {}
# setup.py commands that only describe the package (pip's metadata hooks).
_METADATA_COMMANDS = frozenset({"egg_info", "dist_info", "sdist", "check"})


class BuildExt(build_ext):
    """build_ext that compiles the hot path with mypyc, or builds nothing."""

    def finalize_options(self) -> None:
        # egg_info (pip's metadata hooks) finalizes build_ext too, to list the
        # sources of a source distribution: run mypyc only when building.
        if self._building():
            if not _plan:
                _plan.update(self._plan())
            # The extensions must be known before the base class sets them up.
            self.distribution.ext_modules = list(_plan["extensions"])
        super().finalize_options()

    def _building(self) -> bool:
        return not _METADATA_COMMANDS.issuperset(self.distribution.commands)

    def _plan(self) -> dict[str, Any]:
        start = time.monotonic()
        reason = self._why_not()
        extensions: list[Extension] = []
        cflags: list[str] = []
        if reason is None:
            try:
                extensions, cflags = self._mypyc_extensions()
                # mypy leaves a large object graph behind; without this the
                # interpreter's last collection at exit takes ~20 s.
                gc.freeze()
            except SystemExit as exc:  # mypy printed its errors (seen with pip install -v)
                reason = (f"mypyc's type check failed (exit {exc.code}; `pip install -v .` "
                          "shows mypy's errors)")
            except Exception as exc:  # noqa: BLE001 - never fail the install
                reason = f"mypyc failed ({type(exc).__name__}: {str(exc)[:300]})"
        return {"extensions": extensions, "cflags": cflags, "reason": reason, "start": start}

    def run(self) -> None:
        if not _plan:  # finalized for metadata only, then asked to build anyway
            fallback: dict[str, Any] = {"extensions": [], "cflags": [], "start": time.monotonic(),
                                        "reason": "build_ext ran without a build command"}
            _plan.update(fallback)
        reason: str | None = _plan["reason"]
        if reason is None:
            try:
                super().run()
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - never fail the install
                reason = f"compiling failed ({type(exc).__name__}: {str(exc)[:300]})"
        if reason is not None:
            self._remove_outputs()
            self.extensions = []
            _say(f"pure Python build: {reason}")
            self._write_info({"build": "python", "reason": reason})
            return
        took = time.monotonic() - _plan["start"]
        _say(f"compiled {len(buildinfo.COMPILED_MODULES)} modules with mypyc in {took:.0f} s")
        self._write_info({
            "build": "mypyc",
            "seconds": round(took, 1),
            "cflags": _plan["cflags"],
            "sources": {
                m: buildinfo.source_digest(buildinfo.source_path(m, self._package_src()))
                for m in buildinfo.COMPILED_MODULES
            },
        })

    def _why_not(self) -> str | None:
        if os.environ.get(buildinfo.PURE_ENV, "") not in ("", "0"):
            return f"{buildinfo.PURE_ENV} is set"
        if importlib.util.find_spec("mypyc") is None:
            return "mypyc is not installed (it comes with mypy)"
        return _compiler_works()

    def _package_src(self) -> str:
        return os.path.join(HERE, "ollamamq_fast")

    def _mypyc_extensions(self) -> tuple[list[Extension], list[str]]:
        """mypyc's extensions for COMPILED_MODULES, and the EXTRA_CFLAGS they are built with."""
        from mypyc.build import mypycify

        paths = [
            os.path.relpath(buildinfo.source_path(m, self._package_src()), HERE)
            for m in buildinfo.COMPILED_MODULES
        ]
        opt = os.environ.get("OLLAMAMQ_FAST_OPT", "3")
        exts: list[Extension] = mypycify(
            paths,
            opt_level=opt,
            group_name=buildinfo.GROUP,
            # Relative to setup.py's directory (where pip runs it), so that
            # setuptools can list the generated headers in its manifest.
            target_dir=os.path.relpath(os.path.join(HERE, "build", "mypyc")),
            verbose=False,
        )
        flags = _accepted_flags(EXTRA_CFLAGS)
        for ext in exts:
            ext.extra_compile_args = [*ext.extra_compile_args, *flags]
        return exts, flags

    def _remove_outputs(self) -> None:
        """Delete compiled modules a failed or earlier build left (build tree and, in place, source).

        A pure build must not ship or leave stale extensions: a wheel takes
        whatever is in the build tree.
        """
        roots = [self.build_lib]
        if self.inplace or getattr(self, "editable_mode", False):
            roots.append(HERE)
        for name in (*buildinfo.COMPILED_MODULES, buildinfo.LIBRARY):
            for root in roots:
                path = os.path.join(root, self.get_ext_filename(name))
                if os.path.exists(path):
                    os.remove(path)

    def _write_info(self, info: dict[str, Any]) -> None:
        """Record the outcome in the package: in the build tree and, in place, in the source."""
        text = json.dumps(info, indent=1, sort_keys=True) + "\n"
        targets = [os.path.join(self.build_lib, "ollamamq_fast")]
        if self.inplace or getattr(self, "editable_mode", False):
            targets.append(self._package_src())
        for target in targets:
            os.makedirs(target, exist_ok=True)
            with open(os.path.join(target, buildinfo.INFO_FILE), "w", encoding="utf-8") as f:
                f.write(text)

    def get_outputs(self) -> list[str]:
        outputs: list[str] = super().get_outputs()
        return [*outputs, os.path.join(self.build_lib, "ollamamq_fast", buildinfo.INFO_FILE)]


# A placeholder so that setuptools knows the package may have extensions
# (build_ext runs); BuildExt replaces it with mypyc's, or with none.
setup(
    ext_modules=[Extension(buildinfo.GROUP + "__placeholder", sources=[])],
    cmdclass={"build_ext": BuildExt},
)
