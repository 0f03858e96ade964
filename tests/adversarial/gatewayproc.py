"""The gateway as users run it: `python -m ollamamq_fast serve` in a child process.

Only the command line, the data-plane port and the admin API are used, so
these tests hold whatever the package looks like inside. The child imports
the package from this checkout (PYTHONPATH), listens on 127.0.0.1 port 0 and
prints where; its stderr goes to a file the tests can read.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "adversarial-admin-token"
LISTEN = re.compile(r"listening on http://[^\s:]+:(\d+)")
ADMIN = re.compile(r"admin API on (http://\S+)")


class GatewayProc:
    """One gateway child process in front of `backends`."""

    def __init__(self, backends: list[str], *args: str, admin: bool = False,
                 start_timeout: float = 30.0) -> None:
        # Closed (and removed) in close(); the child writes to it meanwhile.
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="adv-gw-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "ollamamq_fast", "serve", "--no-tui", "-H", "127.0.0.1",
               "-p", "0", "--state", "", "--log-file", "", "--health-interval", "3600",
               "-o", ",".join(backends)]
        if admin:
            cmd += ["--admin-port", "0", "--admin-token", ADMIN_TOKEN]
        else:
            cmd += ["--no-admin"]
        cmd += list(args)
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        for name in ("OLLAMA_URLS", "BACKEND_URLS", "PORT", "HOST", "TIMEOUT", "REDIS_URL",
                     "OLLAMAMQ_ADMIN_TOKEN"):
            env.pop(name, None)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log,
                                     stdin=subprocess.DEVNULL, env=env, cwd=tempfile.gettempdir())
        self.port = 0
        self.admin_url: str | None = None
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            text = self.stderr()
            m = LISTEN.search(text)
            if m and (not admin or ADMIN.search(text)):
                self.port = int(m.group(1))
                a = ADMIN.search(text)
                self.admin_url = a.group(1) if a else None
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.02)
        else:
            self.close()
            raise RuntimeError(f"gateway did not start:\n{self.stderr()}")
        self.url = f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        """Everything the child wrote to stderr so far."""
        return Path(self.log.name).read_text("utf-8", "replace")

    def alive(self) -> bool:
        """Whether the child still runs."""
        return self.proc.poll() is None

    def rss_kb(self) -> int:
        """Resident memory of the child in KiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A call to the admin API with the admin token."""
        assert self.admin_url is not None, "start the gateway with admin=True"
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        return httpx.request(method, self.admin_url + path, headers=headers, timeout=10,
                             **kwargs)

    def create_key(self, user: str) -> str:
        """A new API key for `user` (its secret)."""
        r = self.admin("POST", "/api/keys", json={"user": user})
        assert r.status_code == 201, r.text
        return str(r.json()["secret"])

    def close(self) -> None:
        """SIGTERM, then SIGKILL if it does not go."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        os.unlink(self.log.name)
