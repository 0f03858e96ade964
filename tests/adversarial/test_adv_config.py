"""Issue 14, medium and low: the TOML file is validated like the flags.

`slots = 0`, `slots = -5`, `timeout = 0` made every request hang; they must
stop the start with one clear line (exit 2), as the same values do as flags,
and be refused on SIGHUP with the old config kept. A non-UTF-8 file on SIGHUP
is a clean error, not a traceback.
"""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest
from fakebackend import FakeBackend
from gatewayproc import GatewayProc
from wire import bystander_ok, wait_until


def _refused_at_start(backend: FakeBackend, config: Path) -> tuple[bool, str]:
    try:
        proc = GatewayProc([backend.url], "-c", str(config), start_timeout=15)
    except RuntimeError as exc:
        return True, str(exc)
    text = proc.stderr()
    proc.close()
    return False, text


@pytest.mark.parametrize("setting", [
    pytest.param("slots = 0", id="slots-0"),
    pytest.param("slots = -5", id="slots-negative"),
    pytest.param("timeout = 0", id="timeout-0"),
    pytest.param("timeout = -1.5", id="timeout-negative"),
    pytest.param("max_queue = 0", id="max-queue-0"),
    pytest.param('balance = "nope"', id="balance-control"),
])
def test_bad_toml_value_stops_the_start(backend: FakeBackend, tmp_path: Path,
                                        setting: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(setting + "\n")
    refused, text = _refused_at_start(backend, config)
    assert refused, f"started with {setting!r}"
    assert "exited with 2" in text and "Traceback" not in text, text[-2000:]


@pytest.mark.parametrize("content", [
    pytest.param(b"slots = 0\n", id="slots-0"),
    pytest.param(b"slots = \xff\xfe\n", id="not-utf8"),
    pytest.param(b"slots = [\n", id="toml-syntax-control"),
])
def test_bad_config_on_sighup_is_refused_cleanly(backend: FakeBackend, tmp_path: Path,
                                                 content: bytes) -> None:
    config = tmp_path / "gw.toml"
    config.write_text("slots = 2\n")
    proc = GatewayProc([backend.url], "-c", str(config))
    try:
        before = proc.stderr()
        config.write_bytes(content)
        proc.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "reload" in proc.stderr()[len(before):].lower(), 5), (
            proc.stderr()[len(before):])
        after = proc.stderr()[len(before):]
        assert "Traceback" not in after, after
        assert "keeping the old config" in after, after
        assert proc.alive() and bystander_ok(proc.url)
        r = httpx.get(proc.url + "/api/version", timeout=5)
        assert r.status_code == 200
    finally:
        proc.close()
