"""The documentation a newcomer reads: examples that work, citations that resolve."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CITING = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
          *sorted((ROOT / "bench").glob("*.md")), *sorted((ROOT / "ollamamq_fast").rglob("*.py")),
          *sorted((ROOT / "tests").glob("*.py"))]
# Notes kept outside the repository; the code must cite docs/ instead. Spelled in
# pieces so that this file does not match itself.
OUTSIDE = re.compile("|".join([r"\.\./" + "shared", "/work/" + "shared",
                               r"(?<![\w/-])PROTOCOL" + r"\.md", r"(?<![\w/-])DESIGN" + r"\.md"]))


def _commands(text: str) -> list[str]:
    """Shell commands in ```bash blocks, continuation lines joined."""
    out = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.DOTALL):
        out.extend(c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip())
    return out


def test_curl_examples_with_a_json_body_say_so() -> None:
    curls = [c for doc in DOCS for c in _commands(doc.read_text()) if c.startswith("curl ")]
    assert curls
    for command in curls:
        if " -d " in command or " --data" in command:
            assert "Content-Type: application/json" in command, command


def test_nothing_cites_notes_outside_the_repository() -> None:
    offenders = []
    for path in CITING:
        rel = path.relative_to(ROOT).as_posix()
        if path == Path(__file__).resolve():
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_protocol_note_citations_resolve() -> None:
    notes = (ROOT / "docs" / "protocol-notes.md").read_text()
    sections = set(re.findall(r"^#+ (\d+(?:\.\d+)?)\.? ", notes, re.MULTILINE))
    traps = set(re.findall(r"^(\d+)\. ", notes.split("## 7.", 1)[1], re.MULTILINE))
    known = sections | {f"7.{n}" for n in traps}
    cite = re.compile(r"docs/protocol-notes\.md((?:[ ,]+§[\d.–]+)*)")
    for path in CITING:
        for match in cite.finditer(path.read_text(encoding="utf-8")):
            for ref in re.findall(r"§([\d.]+)", match.group(1)):
                assert ref.rstrip(".") in known, f"{path.name}: §{ref} is not in the notes"
    for path in CITING:
        for doc in re.findall(r"docs/([\w-]+\.md)", path.read_text(encoding="utf-8")):
            assert (ROOT / "docs" / doc).is_file(), f"{path.name} cites missing docs/{doc}"
