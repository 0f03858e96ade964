"""Starting, watching and stopping the processes a scenario needs.

Every process is `sys.executable -m ollamamq_fast ...` in its own session
(process group), with output going to a log file. `ProcessSet` is a context
manager whose exit stops everything it started (SIGTERM, then SIGKILL),
also on Ctrl-C or an exception, so a scenario never leaves servers behind.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

# A server that is not answering its readiness probe after this long is
# broken; the gateway's first health probe plus Python start-up fit easily.
READY_TIMEOUT = 30.0
READY_POLL = 0.05
# SIGTERM first so servers can drain and close sockets; SIGKILL after this.
STOP_GRACE = 5.0
# How much of a failed process's log to show in the error.
LOG_TAIL_BYTES = 3000


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to 0 and let the kernel pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def http_status(host: str, port: int, path: str, timeout: float = 1.0) -> int | None:
    """Status of `GET path`, or None when nothing answers (readiness probes)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def rss_kib(pid: int) -> int | None:
    """Resident set size of `pid` in KiB from /proc/PID/status (None if gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def open_files_limit(pid: int) -> int | None:
    """Soft "Max open files" of `pid` from /proc/PID/limits (None if unknown or unlimited)."""
    try:
        with open(f"/proc/{pid}/limits", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Max open files"):
                    soft = line.split()[3]
                    return int(soft) if soft.isdigit() else None
    except (OSError, IndexError):
        return None
    return None


class ProcessError(RuntimeError):
    """A scenario process failed to start or died."""


@dataclass
class ManagedProcess:
    """One started server: its command, port, log file and Popen handle."""

    name: str
    argv: list[str]
    port: int
    ready_path: str
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the server."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """Process id (valid once started)."""
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> None:
        """Launch the process in its own session, output to the log file."""
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        """True while the process runs."""
        return self.popen is not None and self.popen.poll() is None

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Poll the readiness path until it answers 200; raise ProcessError if not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ProcessError(f"{self.name} exited with code {self.exit_code()}:\n{self.log_tail()}")
            if http_status("127.0.0.1", self.port, self.ready_path, timeout=0.5) == 200:
                return
            time.sleep(READY_POLL)
        raise ProcessError(f"{self.name} not ready after {timeout:.0f}s (GET {self.ready_path}):\n{self.log_tail()}")

    def exit_code(self) -> int | None:
        """Exit status, None while running."""
        return None if self.popen is None else self.popen.poll()

    def kill_now(self) -> None:
        """SIGKILL the process group at once (failover: a backend dies mid-run)."""
        self._signal(signal.SIGKILL)
        if self.popen is not None:
            try:
                self.popen.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                pass

    def stop(self) -> None:
        """SIGTERM, wait up to STOP_GRACE, then SIGKILL; safe to call twice."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            try:
                self.popen.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                pass

    def _signal(self, sig: signal.Signals) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        # The process leads its own session, so its group id is its pid: this
        # reaches any helper it started, and nothing else.
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def log_tail(self) -> str:
        """The end of the process's log, for error messages."""
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return "(no log)"
        return data[-LOG_TAIL_BYTES:].decode("utf-8", errors="replace")


@dataclass
class ProcessSet:
    """The processes of one scenario; stops them all on exit."""

    log_dir: str | None = None
    procs: list[ManagedProcess] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Self:
        if self.log_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="ollamamq-bench-")
            self.log_dir = self._tmp.name
        os.makedirs(self.log_dir, exist_ok=True)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()
        if self._tmp is not None:
            self._tmp.cleanup()

    def stop_all(self) -> None:
        """Stop every process, newest first (the gateway before its backends)."""
        for p in reversed(self.procs):
            p.stop()

    def _launch(self, name: str, args: list[str], port: int, ready_path: str) -> ManagedProcess:
        assert self.log_dir is not None
        argv = [sys.executable, "-m", "ollamamq_fast", *args]
        proc = ManagedProcess(name, argv, port, ready_path, Path(self.log_dir) / f"{name}.log")
        self.procs.append(proc)
        proc.start()
        return proc

    def start_sim(
        self,
        name: str = "sim",
        models: str = "llama3.2:latest",
        ttft_ms: float = 0.0,
        tokens_per_s: float = 0.0,
        tokens: int = 8,
        max_parallel: int = 0,
    ) -> ManagedProcess:
        """Start a simulator and wait until `GET /api/version` answers 200."""
        port = free_port()
        args = [
            "sim", "-H", "127.0.0.1", "-p", str(port), "--models", models,
            "--ttft-ms", f"{ttft_ms:g}", "--tokens-per-s", f"{tokens_per_s:g}",
            "--tokens", str(tokens), "--max-parallel", str(max_parallel),
        ]
        proc = self._launch(name, args, port, "/api/version")
        proc.wait_ready()
        return proc

    def start_gateway(self, backends: list[ManagedProcess], slots: int, extra: list[str] | None = None,
                      name: str = "gateway") -> ManagedProcess:
        """Start the gateway in front of `backends`; ready when `GET /health` is 200."""
        port = free_port()
        # The admin (control-plane) port gets a free port too: its default
        # would collide with any other gateway running on this machine.
        args = [
            "serve", "--no-tui", "--state", "", "--no-access-log", "-H", "127.0.0.1", "-p", str(port),
            "-o", ",".join(b.url for b in backends), "--slots", str(slots),
            "--admin-port", str(free_port()), *(extra or []),
        ]
        proc = self._launch(name, args, port, "/health")
        proc.wait_ready()
        return proc


class RssSampler:
    """Samples a process's RSS once a second on a background thread (soak)."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t0 = 0.0

    def __enter__(self) -> Self:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval * 2 + 1)

    def _run(self) -> None:
        # Bounded by the owner: __exit__ sets the event; a vanished process ends it too.
        while not self._stop.is_set():
            rss = rss_kib(self.pid)
            if rss is None:
                return
            self.samples.append((time.monotonic() - self._t0, rss))
            self._stop.wait(self.interval)
