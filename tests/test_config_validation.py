"""One validation path for settings (issue 14): flags, env, the TOML file, reload, admin API.

A TOML `slots = 0` or `timeout = 0` used to be accepted at start and on
SIGHUP, and every request then hung; now every way a value comes in goes
through config.RULES and a bad reload keeps the old config.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from harness import free_port, start_stack

from ollamamq_fast.cli import build_parser, settings_from_args
from ollamamq_fast.config import (
    ConfigError,
    Settings,
    apply_toml,
    load_toml,
    validate_settings,
)

TOKEN = "t0k"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

BAD_TOML = [
    "slots = 0", "slots = -5", "timeout = 0", "timeout = -1.5", "timeout = inf", "timeout = nan",
    "max_queue = 0", "max_queue_per_user = -1", "queue_timeout = -1", "health_interval = 0",
    "health_fail_threshold = 0", "port = 70000", "admin_port = -2", "max_body_mb = 0",
    "max_bodies_mb = -3", 'balance = "nope"', "[cache]\nttl = 0", "[cache]\nmb = -1",
    '[[backends]]\nurl = "a:1"\nslots = 0', "[users.weights]\nbob = 0",
]


@pytest.mark.parametrize("text", BAD_TOML)
def test_bad_toml_values_are_refused(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        apply_toml(Settings(), tomllib.loads(text), "gw.toml")
    assert str(err.value).startswith("gw.toml: ")


def test_good_toml_and_defaults_pass() -> None:
    validate_settings(Settings())
    s = Settings()
    apply_toml(s, tomllib.loads("slots = 3\ntimeout = 0.5\nqueue_timeout = 0\nadmin_port = -1\n"
                                "[cache]\nmb = 0\n"))
    assert (s.slots, s.timeout, s.queue_timeout, s.cache_mb) == (3, 0.5, 0.0, 0.0)


def test_flags_and_env_end_in_the_same_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """A value no flag type checks (here a TIMEOUT that is not finite) is still refused."""
    monkeypatch.setenv("TIMEOUT", "inf")
    args = build_parser().parse_args(["serve", "--state", "", "--log-file", ""])
    with pytest.raises(ConfigError, match="timeout"):
        settings_from_args(args)


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_bytes(b"slots = \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_toml(str(path))


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ollamamq_fast", "--no-tui", "--state", "",
                           "--log-file", "", "--no-admin", "-p", str(free_port()), *args],
                          check=False, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("text", ["slots = 0", "timeout = 0"])
def test_bad_toml_stops_the_start_with_one_line(tmp_path: Path, text: str) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(text + "\n")
    r = _serve("-o", "127.0.0.1:9", "--config", str(cfg))
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "must be" in lines[0], r.stderr


@pytest.mark.parametrize("content", [b"slots = 0\n", b"timeout = 0\n", b"slots = \xff\n"])
def test_bad_reload_keeps_the_old_config(tmp_path: Path, content: bytes) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text("slots = 2\ntimeout = 30\n")
    st = start_stack(admin_port=0, admin_token=TOKEN, config_path=str(cfg))
    try:
        cfg.write_bytes(content)
        r = httpx.post(f"http://127.0.0.1:{st.gateway.admin_port}/api/reload", headers=AUTH,
                       timeout=5)
        assert r.status_code == 400 and "old config stays" in r.json()["error"], r.text
        assert (st.state.settings.slots, st.state.settings.timeout) == (4, 300.0)
    finally:
        st.close()


def test_admin_api_slots_go_through_the_rules() -> None:
    st = start_stack(admin_port=0, admin_token=TOKEN)
    try:
        url = f"http://127.0.0.1:{st.gateway.admin_port}/api/backends"
        backend = st.sims[0].url
        r = httpx.patch(url, json={"url": backend, "slots": 0}, headers=AUTH, timeout=5)
        assert r.status_code == 400
        with pytest.raises(ConfigError):
            st.lt.call(st.state.operator.set_slots, backend, 0)
        with pytest.raises(ConfigError):
            st.lt.call(st.state.operator.set_user, "bob", None, None, 0)
    finally:
        st.close()


def test_sighup_with_a_non_utf8_file_logs_one_clean_line(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text("slots = 2\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ollamamq_fast", "--sim", "--no-tui", "--state",
                             "", "--log-file", "", "--no-admin", "-p", str(port), "--config",
                             str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")),
                              daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        assert _wait(lambda: any("listening on" in ln for ln in lines), 20), lines
        cfg.write_bytes(b"slots = \xff\xfe\n")
        proc.send_signal(signal.SIGHUP)
        assert _wait(lambda: any("reload failed" in ln for ln in lines), 10), lines
        body = {"model": "llama3.2", "prompt": "q", "stream": False}
        r = httpx.post(f"http://127.0.0.1:{port}/api/generate", json=body, timeout=10)
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        reader.join(5)
        failed = [ln for ln in lines if "reload failed" in ln]
        assert len(failed) == 1 and "not UTF-8" in failed[0], lines
        assert not any("Traceback" in ln for ln in lines), lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()
