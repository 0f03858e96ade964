"""The package's layout rules: no import cycles between its parts; nothing below imports proxy."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ollamamq_fast"
# Who may import the data plane: the composition root (and the data plane itself).
MAY_IMPORT_PROXY = {"gateway", "proxy"}


def _edges() -> dict[str, dict[str, str]]:
    """part -> {imported part: "file:line"}; a part is a subpackage or a top-level module.

    Imports under `if TYPE_CHECKING:` do not count (they never run).
    """
    edges: dict[str, dict[str, str]] = defaultdict(dict)
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("").parts
        part = rel[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip.update(id(n) for n in ast.walk(node))
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                bits = name.split(".")
                if bits[0] == "ollamamq_fast" and len(bits) > 1:
                    target = bits[1]
                    if target != part and (PACKAGE / target).exists() or (
                            PACKAGE / f"{target}.py").exists() and target != part:
                        edges[part].setdefault(target, f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return edges


def _cycles(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """Strongly connected groups of more than one part (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_between_the_parts() -> None:
    edges = _edges()
    cycles = _cycles(edges)
    detail = [f"{a} -> {b} ({where})" for group in cycles for a in group
              for b, where in edges[a].items() if b in group]
    assert not cycles, "\n".join(detail)


def test_only_the_composition_root_imports_the_data_plane() -> None:
    offenders = {part: where["proxy"] for part, where in _edges().items()
                 if "proxy" in where and part not in MAY_IMPORT_PROXY}
    assert not offenders, offenders


def test_the_check_can_fail() -> None:
    assert _cycles({"a": {"b": "x"}, "b": {"a": "y"}}) == [["a", "b"]]
