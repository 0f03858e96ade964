"""Deployment files (issue 16, part 3): the replicas compose file and the systemd unit.

Neither can be run here (no Docker daemon or image registry, no systemd as
PID 1), so this checks what can be checked: the compose file's structure and
that its gateway flags parse; the unit's directives, and `systemd-analyze
verify` finds nothing to say about it when systemd's tools are installed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_cli import _settings

ROOT = Path(__file__).resolve().parent.parent


def test_replicas_compose_file() -> None:
    doc = yaml.safe_load((ROOT / "docker-compose.replicas.yml").read_text())
    services = doc["services"]
    assert set(services) == {"redis", "simulator", "gateway-1", "gateway-2"}
    for name, svc in services.items():
        assert svc["healthcheck"]["test"][0] == "CMD", name
    gateways = [services["gateway-1"], services["gateway-2"]]
    published = set()
    for gw in gateways:
        assert gw["depends_on"] == {"redis": {"condition": "service_healthy"},
                                    "simulator": {"condition": "service_healthy"}}
        assert "/ready" in " ".join(gw["healthcheck"]["test"])
        # The image's entrypoint flags plus the service's command parse, with Redis.
        env = {k: str(v) for k, v in gw["environment"].items()}
        s = _settings(["--no-tui", "--log-file", "-", *gw["command"]], env=env)
        assert s.redis_url == "redis://redis:6379/0" and s.slots == 4
        assert [b.url for b in s.backends] == ["http://simulator:11434"]
        assert (s.host, s.port, s.admin_host) == ("0.0.0.0", 11435, "0.0.0.0")
        published |= {p.split(":")[0] for p in gw["ports"]}
    assert len(published) == 4  # no two replicas on one host port


def test_compose_config_validates() -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed")
    r = subprocess.run([tool, "-f", str(ROOT / "docker-compose.replicas.yml"), "config", "-q"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr


UNIT = ROOT / "deploy" / "ollamamq-fast.service"


def _directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_systemd_unit_directives() -> None:
    d = _directives()
    assert d["User"] == ["ollamamq-fast"] and d["StateDirectory"] == ["ollamamq-fast"]
    assert d["Restart"] == ["on-failure"] and d["KillSignal"] == ["SIGTERM"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "RestrictSUIDSGID", "LockPersonality"):
        assert d[key] == ["yes"], key
    assert d["ProtectSystem"] == ["strict"]
    assert "--state-dir ${STATE_DIRECTORY}" in d["ExecStart"][0]
    # The drain (30 s, cli.DRAIN_GRACE_S) fits in the stop timeout.
    from ollamamq_fast.cli import DRAIN_GRACE_S
    assert int(d["TimeoutStopSec"][0]) > DRAIN_GRACE_S


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart exists: point it at this Python for the check.
    unit = tmp_path / "ollamamq-fast.service"
    unit.write_text(UNIT.read_text().replace("/opt/ollamamq-fast/bin/ollamamq-fast",
                                             sys.executable))
    r = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), (
        r.stdout + r.stderr)


def test_the_example_env_file_starts_the_unit_as_installed(tmp_path: Path) -> None:
    """The README installs deploy/env.example as /etc/ollamamq-fast/env and nothing
    else: the unit's ExecStart with its variables must make a gateway that starts
    (a --config naming a file the steps never create stopped it with exit 2)."""
    import shlex

    env = {}
    for line in (ROOT / "deploy" / "env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    exec_start = _directives()["ExecStart"][0]
    argv = shlex.split(exec_start.replace("${STATE_DIRECTORY}", str(tmp_path)))[2:]
    extra = shlex.split(env.pop("OLLAMAMQ_ARGS", ""))
    assert argv[-1] == "$OLLAMAMQ_ARGS"
    settings = _settings([*argv[:-1], *extra], env)
    assert settings.host == env["HOST"] and str(settings.port) == env["PORT"]
    assert settings.admin_token == env["OLLAMAMQ_ADMIN_TOKEN"]
