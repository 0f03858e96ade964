"""The compiled build: what setup.py recorded is what runs, and the pure switch works.

The suite runs once against whatever the install produced (compiled when a C
compiler was there) and a subset runs again with OLLAMAMQ_FAST_PURE=1 (see the
README's test command); these tests make sure neither run is silently the
other one.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import types
from pathlib import Path
from typing import Any

import pytest

from ollamamq_fast import buildinfo

PACKAGE_DIR = Path(buildinfo.__file__).resolve().parent


def _run_python(code: str, tmp_root: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter that imports the package from here (or tmp_root)."""
    environ = {k: v for k, v in os.environ.items() if k != buildinfo.PURE_ENV}
    root = str(tmp_root if tmp_root is not None else PACKAGE_DIR.parent)
    environ["PYTHONPATH"] = os.pathsep.join([root, environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code], check=False, env=environ, cwd=root,
                          capture_output=True, text=True, timeout=60)


def _compiler_present() -> bool:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return shutil.which(cc) is not None and header.exists()


_LOAD_ALL = (
    "import json, sys\n"
    "import ollamamq_fast.gateway\n"
    "from ollamamq_fast import buildinfo\n"
    "for m in buildinfo.COMPILED_MODULES: __import__(m)\n"
    "print(json.dumps({'build': buildinfo.build(), 'describe': buildinfo.describe(),\n"
    "  'files': {m: sys.modules[m].__file__ for m in buildinfo.COMPILED_MODULES}}))\n"
)


def test_the_install_compiled_what_it_could() -> None:
    """With a C compiler at install, every hot-path module runs compiled (unless forced pure)."""
    info = buildinfo.read_info()
    if info is None:
        pytest.skip("package not installed by setup.py (no _build_info.json): nothing to check")
    forced = os.environ.get(buildinfo.PURE_ENV, "") not in ("", "0")
    if info["build"] == "python":
        reason = str(info.get("reason", ""))
        if buildinfo.PURE_ENV in reason:
            pytest.skip(f"installed pure on purpose: {reason}")
        if _compiler_present():
            pytest.fail(f"a C compiler is here but the install built pure Python: {reason}")
        pytest.skip(f"no C compiler at install: {reason}")
    assert info["build"] == "mypyc"
    for module in buildinfo.COMPILED_MODULES:
        importlib.import_module(module)
    if forced:
        assert buildinfo.build() == "python", buildinfo.compiled_modules()
        return
    assert buildinfo.pure_reason() is None, (
        f"compiled at install but running pure: {buildinfo.pure_reason()}")
    assert buildinfo.compiled_modules() == list(buildinfo.COMPILED_MODULES)
    assert buildinfo.build() == "mypyc"
    # Functions of a compiled module are C functions, not Python ones.
    from ollamamq_fast.stats import tokens_in_tail

    assert isinstance(tokens_in_tail, types.BuiltinFunctionType)


def _requirement_names(specs: list[str]) -> set[str]:
    """Distribution names of requirement strings, normalized as pip compares them."""
    import re

    return {re.sub(r"[-_.]+", "-", re.split(r"[<>=!~;\[ ]", spec, 1)[0]).lower() for spec in specs}


def test_the_isolated_build_has_every_runtime_dependency() -> None:
    """pip builds in an environment holding only build-system.requires, and mypyc
    type-checks the package (following its imports) before compiling: a runtime
    dependency missing there makes mypy fail on the import, and a fresh
    `pip install .` with a working compiler then quietly installed pure Python."""
    import tomllib

    project = tomllib.loads((PACKAGE_DIR.parent / "pyproject.toml").read_text())
    build = _requirement_names(project["build-system"]["requires"])
    runtime = _requirement_names(project["project"]["dependencies"])
    assert runtime <= build, f"missing from build-system.requires: {sorted(runtime - build)}"


def test_pure_switch_loads_the_py_sources() -> None:
    done = _run_python(_LOAD_ALL, **{buildinfo.PURE_ENV: "1"})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["build"] == "python"
    assert out["describe"] == f"python: {buildinfo.PURE_ENV} is set"
    for module, path in out["files"].items():
        assert path == buildinfo.source_path(module), (module, path)


def test_without_the_switch_the_recorded_build_runs() -> None:
    done = _run_python(_LOAD_ALL)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    info = buildinfo.read_info()
    expected = "mypyc" if info is not None and info.get("build") == "mypyc" else "python"
    if expected == "mypyc" and "changed after it was compiled" in out["describe"]:
        pytest.skip(f"this checkout's compiled build is stale: {out['describe']}")
    assert out["build"] == expected, out
    suffix = tuple(importlib.machinery.EXTENSION_SUFFIXES) if expected == "mypyc" else (".py",)
    assert all(path.endswith(suffix) for path in out["files"].values()), out["files"]


def _copy_sources(tmp_path: Path) -> Path:
    """The package's .py files (no extensions) under tmp_path/ollamamq_fast."""
    dest = tmp_path / "ollamamq_fast"
    shutil.copytree(PACKAGE_DIR, dest, ignore=shutil.ignore_patterns(
        "*.so", "*.pyd", "__pycache__", buildinfo.INFO_FILE))
    return dest


def test_a_source_edited_after_the_build_runs_as_python(tmp_path: Path) -> None:
    """A stale compiled module would run old code: all of the hot path then loads the .py files."""
    dest = _copy_sources(tmp_path)
    digests = {m: buildinfo.source_digest(buildinfo.source_path(m, str(dest)))
               for m in buildinfo.COMPILED_MODULES}
    digests["ollamamq_fast.stats"] = "0" * 64  # as if stats.py changed since
    (dest / buildinfo.INFO_FILE).write_text(json.dumps({"build": "mypyc", "sources": digests}))
    done = _run_python("from ollamamq_fast import buildinfo; print(buildinfo.describe())", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "python: ollamamq_fast.stats changed after it was compiled (reinstall to recompile)")
    assert "RuntimeWarning: ollamamq-fast runs pure Python" in done.stderr


def test_no_build_record_runs_python(tmp_path: Path) -> None:
    _copy_sources(tmp_path)
    done = _run_python("from ollamamq_fast import buildinfo; print(buildinfo.describe())", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "python: not built by setup.py"
    assert done.stderr == ""


def test_version_names_the_build() -> None:
    done = _run_python("from ollamamq_fast.cli import main; main(['--version'])")
    assert done.returncode == 0, done.stderr
    out = " ".join(done.stdout.split())  # argparse wraps a long line
    build = _run_python("from ollamamq_fast import buildinfo; print(buildinfo.describe())")
    assert out == f"ollamamq-fast 0.1.0 ({build.stdout.strip()})"
    assert build.stdout.startswith(("mypyc", "python"))
    pure = _run_python("from ollamamq_fast.cli import main; main(['--version'])",
                       **{buildinfo.PURE_ENV: "1"})
    assert pure.stdout.strip() == f"ollamamq-fast 0.1.0 (python: {buildinfo.PURE_ENV} is set)"


# setup.py's EXTRA_CFLAGS (setup.py runs setup() when imported, so not imported here).
_EXTRA_CFLAGS = ("-fno-semantic-interposition", "-fno-plt")


def test_the_compiled_library_was_built_with_the_extra_flags() -> None:
    """The flags setup.py found the compiler to take are recorded and are in the library's code.

    GCC writes its command line into the debug info's producer string (mypyc
    builds with -g1), so the library itself shows whether they were used: a
    build that recorded them but compiled without them fails here.
    """
    info = buildinfo.read_info()
    if info is None or info.get("build") != "mypyc":
        pytest.skip("not a compiled install: no compiler flags to check")
    recorded = info.get("cflags")
    assert isinstance(recorded, list) and set(recorded) <= set(_EXTRA_CFLAGS), info
    library = PACKAGE_DIR.parent / (buildinfo.LIBRARY + sysconfig.get_config_var("EXT_SUFFIX"))
    assert library.exists(), library
    data = library.read_bytes()
    at = data.find(b"GNU C")
    if at < 0:
        pytest.skip("the library names no GCC command line (another compiler, or stripped)")
    producer = data[at : data.find(b"\0", at)].decode("latin-1")
    # Every GCC since 6 takes both; the probe must not have dropped them.
    assert list(recorded) == list(_EXTRA_CFLAGS), (recorded, producer)
    for flag in recorded:
        assert f" {flag}" in producer, (flag, producer)

def test_user_stats_snapshot_lists_every_field() -> None:
    """snapshot() names its fields (compiled classes have no __slots__ to read)."""
    from ollamamq_fast.stats import UserStats

    snap = UserStats("u").snapshot()
    slots = getattr(UserStats, "__slots__", None)
    if slots is None:
        pytest.skip("compiled: __slots__ is not there to compare with (the pure run checks it)")
    assert sorted(snap) == sorted(slots)  # every field, in the order the API shows them


def _except_names_with_two_types(path: str) -> list[str]:
    """`except A as e` and `except B as e` in one function: mypyc gives `e` A's type.

    Compiled, the second handler then fails with a TypeError when it catches a
    B (mypy accepts it, so only running the compiled build would show it).
    """
    tree = ast.parse(Path(path).read_text(), path)
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        seen: dict[str, str] = {}
        for node in ast.walk(fn):
            if isinstance(node, ast.ExceptHandler) and node.name and node.type is not None:
                caught = ast.unparse(node.type)
                if seen.setdefault(node.name, caught) != caught:
                    found.append(f"{path}:{node.lineno} {fn.name}: `{node.name}` is "
                                 f"{seen[node.name]} and {caught}")
    return found


def test_compiled_modules_avoid_what_mypyc_runs_differently() -> None:
    """Checked on the sources, so the pure build and a machine with no compiler see it too."""
    problems = []
    for module in buildinfo.COMPILED_MODULES:
        path = buildinfo.source_path(module)
        problems += _except_names_with_two_types(path)
        text = Path(path).read_text()
        if ".__slots__" in text:  # compiled classes have none at run time
            problems.append(f"{path}: reads __slots__")
    assert problems == []


def test_the_lint_finds_a_reused_except_name(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    try:\n        g()\n    except KeyError as e:\n        pass\n"
                   "    try:\n        g()\n    except ValueError as e:\n        pass\n")
    assert len(_except_names_with_two_types(str(bad))) == 1


def test_a_missing_compiled_library_runs_python(tmp_path: Path) -> None:
    """Compiled modules without their shared library would fail to import: the sources run instead."""
    info = buildinfo.read_info()
    if info is None or info.get("build") != "mypyc":
        pytest.skip("this checkout is not compiled")
    # The package with its compiled extensions and build record, but not the
    # top-level library they all load; -S keeps site-packages' .pth files, and so
    # the editable install's finder (which finds this checkout's library), away.
    dest = tmp_path / "ollamamq_fast"
    shutil.copytree(PACKAGE_DIR, dest, ignore=shutil.ignore_patterns("__pycache__"))
    assert not list(tmp_path.glob(buildinfo.LIBRARY + "*"))
    code = ("import site, sys; sys.path.insert(0, sys.argv[1])\n"
            "sys.path += site.getsitepackages()  # its libraries, not its .pth files\n"
            "from ollamamq_fast import buildinfo\n"
            "import ollamamq_fast.stats, ollamamq_fast.proxy.state\n"
            "print(buildinfo.describe(), ollamamq_fast.stats.__file__.endswith('.py'))\n")
    environ = {k: v for k, v in os.environ.items() if k not in (buildinfo.PURE_ENV, "PYTHONPATH")}
    done = subprocess.run([sys.executable, "-S", "-c", code, str(tmp_path)], check=False,
                          env=environ, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"python: the compiled library {buildinfo.LIBRARY} is not importable "
        "(reinstall to repair) True")
    assert "RuntimeWarning: ollamamq-fast runs pure Python" in done.stderr


def test_a_failed_type_check_says_where_to_read_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """mypyc exits (SystemExit) when mypy finds errors: the recorded reason, which
    `--version` prints, points at `pip install -v` instead of 'SystemExit: 1'."""
    import importlib.util

    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **_: None)
    spec = importlib.util.spec_from_file_location("_setup_under_test", PACKAGE_DIR.parent / "setup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class Stub:
        def _why_not(self) -> None:
            return None

        def _mypyc_extensions(self) -> Any:
            raise SystemExit(1)

    reason = module.BuildExt._plan(Stub())["reason"]
    assert "type check failed" in reason and "pip install -v" in reason
