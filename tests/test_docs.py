"""The documentation a newcomer reads: examples that work, citations that resolve."""

from __future__ import annotations

import argparse
import os
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
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


# -- The command line as the README tables describe it ------------------------------

def _subparser(name: str) -> argparse.ArgumentParser:
    from ollamamq_fast.cli import build_parser

    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    parser: argparse.ArgumentParser = actions[0].choices[name]
    return parser


def _table_rows(heading: str) -> list[list[str]]:
    """The rows of the first table under a README heading, cells stripped."""
    section = README.split(heading, 1)[1].split("\n#", 1)[0]
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("| `")]


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")}


def test_every_serve_flag_is_in_the_readme_and_every_documented_one_exists() -> None:
    options = _options(_subparser("serve"))
    documented = {f for row in _table_rows("### `ollamamq-fast serve`")
                  for f in re.findall(r"`(-[-\w]+)", row[0])}
    assert documented - set(options) == set(), "documented flags serve does not take"
    # The usage-policy flags are described in their own section.
    missing = [f for f in options
               if f.startswith("--") and not re.search(rf"(?<![\w-]){f}(?![\w-])", README)]
    assert missing == [], f"serve flags the README never names: {missing}"


def test_serve_table_defaults_and_env_vars_are_the_real_ones(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from ollamamq_fast.cli import build_parser, settings_from_args

    for name in ("PORT", "HOST", "OLLAMA_URLS", "BACKEND_URLS", "BACKEND_KIND", "TIMEOUT",
                 "OLLAMAMQ_ADMIN_TOKEN", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    settings = settings_from_args(build_parser().parse_args(["serve"]))
    mb = 1024 * 1024
    # README flag -> the setting it sets, as the table's default reads it.
    actual = {
        "--port": str(settings.port), "--host": settings.host,
        "--backend-urls": ",".join(b.url for b in settings.backends),
        "--timeout": f"{settings.timeout:g}", "--slots": str(settings.slots),
        "--max-body-mb": f"{settings.max_body_bytes / mb:g}",
        "--max-bodies-mb": f"{settings.max_bodies_bytes / mb:g}",
        "--admin-port": str(settings.admin_port), "--admin-host": settings.admin_host,
        "--health-interval": f"{settings.health_interval:g}",
        "--max-queue": str(settings.max_queue),
        "--max-queue-per-user": str(settings.max_queue_per_user),
        "--queue-timeout": f"{settings.queue_timeout:g}", "--balance": settings.balance,
        "--health-fail-threshold": str(settings.health_fail_threshold),
        "--health-ok-threshold": str(settings.health_ok_threshold),
        "--auth": settings.auth, "--log-format": settings.log_format,
        "--state-dir": "~/.local/state/ollamamq-fast", "--log-level": "info",
    }
    options = _options(_subparser("serve"))
    seen = set()
    for row in _table_rows("### `ollamamq-fast serve`"):
        flags = re.findall(r"`(-[-\w]+)", row[0])
        long_flag = next(f for f in flags if f.startswith("--"))
        for env in re.findall(r"`([A-Z_]+)`", row[1]):
            assert env in (options[long_flag].help or ""), f"{long_flag}: env {env} not in --help"
        default = re.fullmatch(r"`([^`]*)`", row[2])
        if long_flag in actual and default:
            seen.add(long_flag)
            assert default.group(1) == actual[long_flag], long_flag
    assert seen == set(actual)
    assert os.path.dirname(settings.state_path or "") == str(tmp_path / "ollamamq-fast")


def test_every_sim_flag_is_in_its_table() -> None:
    documented = {f for row in _table_rows("### `ollamamq-fast sim`")
                  for f in re.findall(r"`(-[-\w]+)", row[0])}
    options = _options(_subparser("sim"))
    assert documented - set(options) == set()
    assert [f for f in options if f.startswith("--") and f not in documented] == []


def test_the_readme_command_lines_parse() -> None:
    """Every `ollamamq-fast ...` line of a bash block is one the parser takes."""
    from ollamamq_fast.cli import build_parser

    parser = build_parser()
    lines = [c for doc in DOCS for c in _commands(doc.read_text())]
    checked = 0
    for line in lines:
        for part in re.split(r"&&|\|", line.split(" #", 1)[0]):
            if not part.strip().startswith("ollamamq-fast "):
                continue
            argv = shlex.split(part.strip())
            checked += 1
            try:
                parser.parse_args(argv[1:])
            except SystemExit as exc:
                pytest.fail(f"{part.strip()!r} exits with {exc.code}")
    assert checked >= 10


def test_the_readme_config_examples_load() -> None:
    """Each ```toml block is a config file the gateway accepts (unknown keys are errors)."""
    import tomllib

    from ollamamq_fast.config import Settings, apply_toml, validate_settings

    blocks = re.findall(r"```toml\n(.*?)```", README, re.DOTALL)
    assert blocks
    for n, block in enumerate(blocks):
        settings = Settings()
        apply_toml(settings, tomllib.loads(block), f"README toml block {n}")
        validate_settings(settings)
