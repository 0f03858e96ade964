"""Issue 14, low: no log line injection through X-User-ID (logfmt access log).

Every access line must parse as logfmt with unique keys, and its `user`
value must be exactly the id that was sent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fakebackend import FakeBackend
from gatewayproc import GatewayProc
from wire import wait_until

PAIR = re.compile(r'([^\s=]+)=("(?:[^"\\]|\\.)*"|[^\s"]*)(?:\s+|$)')
IDS = [b"plain", b"a b", b"x status=999 user=root", b'q" status=999 z="', b"back\\slash",
       b'end\\" status=999', b"a\tstatus=999", b"k=v", b'"', b"\\", "\u00fcn\u00ef".encode()]


def parse_logfmt(line: str) -> list[tuple[str, str]]:
    """Pairs of a logfmt line; ValueError when the line is not pure logfmt."""
    pairs = []
    pos = 0
    while pos < len(line):
        m = PAIR.match(line, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"not logfmt at {pos}: {line[pos:pos + 60]!r}")
        key, value = m.group(1), m.group(2)
        if value.startswith('"'):
            value = json.loads(value)
        pairs.append((key, value))
        pos = m.end()
    return pairs


@pytest.fixture(scope="module")
def logged(backend: FakeBackend, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[GatewayProc, Path]]:
    log = tmp_path_factory.mktemp("logs") / "access.log"
    proc = GatewayProc([backend.url], "--log-format", "logfmt", "--log-file", str(log))
    yield proc, log
    proc.close()


def test_user_ids_cannot_forge_logfmt_fields(logged: tuple[GatewayProc, Path]) -> None:
    gw, log = logged
    body = {"model": "fake", "stream": False, "messages": []}
    accepted = []
    for uid in IDS:
        r = httpx.post(gw.url + "/api/chat", json=body, headers=[(b"X-User-ID", uid)], timeout=10)
        assert r.status_code in (200, 400)
        if r.status_code == 200:  # a 400 (not a valid user id) is logged by address
            accepted.append(uid)
    assert wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= len(IDS), 5)
    users = []
    for line in log.read_text("utf-8").splitlines():
        pairs = parse_logfmt(line)
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)), f"repeated key in {line!r}"
        users.append(dict(pairs)["user"])
    for uid in accepted:
        assert uid.decode("latin-1").strip() in users or uid.decode("utf-8").strip() in users, (
            uid, users)
