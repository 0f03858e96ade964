"""Access log lines cannot be forged or split by client-controlled text (issue 14).

The user id, path, request id and model come from the client; whatever they
hold, a logfmt line parses to exactly our fields with the values sent, and a
JSON line is one JSON object, in a file read line by line with any reader's
idea of a line break.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ollamamq_fast.accesslog import FIELDS, AccessLog

HOSTILE = ["plain", "a b", "x status=999 user=root", 'q" status=999 z="', "back\\slash",
           'end\\" status=999', "a\tstatus=999", "k=v", '"', "\\", "", "line\nstatus=999",
           "cr\rstatus=999", "nul\x00x", "del\x7fx", "nel\x85status=999", "ls\u2028status=999",
           "ps\u2029x", "esc\x1b[31mred", "\u00fcn\u00ef", "tag\U000e0001", "=", "a=b=c"]
PAIR = re.compile(r'([^\s=]+)=("(?:[^"\\]|\\.)*"|[^\s"=\\]*)(?: |$)')


def parse_logfmt(line: str) -> list[tuple[str, str]]:
    """Pairs of one logfmt line (quoted values are JSON strings); ValueError otherwise."""
    pairs, pos = [], 0
    while pos < len(line):
        m = PAIR.match(line, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"not logfmt at {pos}: {line[pos:pos + 40]!r}")
        value = m.group(2)
        pairs.append((m.group(1), json.loads(value) if value.startswith('"') else value))
        pos = m.end()
    return pairs


def _write(tmp_path: Path, fmt: str) -> list[str]:
    path = tmp_path / "access.log"
    log = AccessLog(str(path), False, fmt)
    for i, text in enumerate(HOSTILE):
        log.record(1_700_000_000.5 + i, text, "10.0.0.1", b"POST", ("/api/" + text).encode(
            "latin-1", "replace"), text, 200, "http://b:1", 1, 2, 3, 4, text.encode(
            "latin-1", "replace"))
    log.stop()
    text = path.read_bytes().decode("utf-8")
    lines = text.splitlines()  # splits on \x85, \u2028... too: none may appear raw
    assert len(lines) == len(HOSTILE) and text.count("\n") == len(HOSTILE)
    return lines


def test_logfmt_values_never_forge_or_split(tmp_path: Path) -> None:
    lines = _write(tmp_path, "logfmt")
    for text, line in zip(HOSTILE, lines, strict=True):
        pairs = parse_logfmt(line)
        assert [k for k, _ in pairs] == list(FIELDS), line
        values = dict(pairs)
        assert values["user"] == text and values["model"] == text, (text, line)
        assert values["status"] == "200"


@pytest.mark.parametrize("fmt", ["json"])
def test_json_lines_are_one_object_each(tmp_path: Path, fmt: str) -> None:
    for text, line in zip(HOSTILE, _write(tmp_path, fmt), strict=True):
        assert json.loads(line)["user"] == text
