"""The command line: options, env vars, errors as one line with exit code 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from harness import free_port

from ollamamq_fast.cli import _Parser, add_serve_arguments, settings_from_args
from ollamamq_fast.config import ConfigError, parse_backend_url


def _settings(argv: list[str], env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    parser = _Parser()
    add_serve_arguments(parser)
    old = dict(os.environ)
    try:
        for key in ("OLLAMA_URLS", "BACKEND_URLS", "PORT", "HOST", "TIMEOUT"):
            os.environ.pop(key, None)
        os.environ.update(env or {})
        return settings_from_args(parser.parse_args(argv))
    finally:
        os.environ.clear()
        os.environ.update(old)


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "ollamamq_fast", *args], capture_output=True,
                          text=True, timeout=30, env=full_env, check=False)


def _wait_healthy(url: str, timeout: float = 15.0) -> None:
    """Wait until a gateway subprocess answers /health (it is starting up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not come up in {timeout:g} s")


def test_defaults_match_ollamamq() -> None:
    s = _settings([])
    assert (s.port, s.host, s.timeout, s.slots) == (11435, "127.0.0.1", 300.0, 1)
    assert [b.url for b in s.backends] == ["http://localhost:11434"]
    assert s.admin_port == 11436 and s.tui and not s.allow_all_routes


def test_backend_urls_normalized_and_aliases() -> None:
    for flag in ("-o", "-b", "--backend-urls", "--ollama-urls"):
        s = _settings([flag, "10.0.0.1:11434/, http://gpu2:8000/ "])
        assert [b.url for b in s.backends] == ["http://10.0.0.1:11434", "http://gpu2:8000"]
    b = parse_backend_url("gpu:1234/ollama/")
    assert (b.host, b.port, b.prefix, b.authority) == ("gpu", 1234, "/ollama", "gpu:1234")


def test_env_vars_and_flags_win() -> None:
    env = {"OLLAMA_URLS": "a:1,b:2", "PORT": "9000", "HOST": "0.0.0.0", "TIMEOUT": "42"}
    s = _settings([], env)
    assert s.port == 9000 and s.host == "0.0.0.0" and s.timeout == 42.0
    assert [b.url for b in s.backends] == ["http://a:1", "http://b:2"]
    s = _settings(["-p", "9100", "-o", "c:3", "-t", "7"], env)
    assert s.port == 9100 and s.timeout == 7.0 and [b.url for b in s.backends] == ["http://c:3"]
    assert [b.url for b in _settings([], {"BACKEND_URLS": "z:9"}).backends] == ["http://z:9"]


def test_bad_env_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        _settings([], {"PORT": "nope"})
    with pytest.raises(ConfigError):
        _settings([], {"OLLAMA_URLS": "ftp://x"})
    with pytest.raises(ConfigError, match="origins"):
        _settings([], {"OLLAMA_ORIGINS": "example.com"})  # no scheme, as Ollama refuses it


def test_origins_from_the_flag_or_ollamas_env_var() -> None:
    env = {"OLLAMA_ORIGINS": "'https://a.example, chrome-extension://*'"}
    assert _settings([], env).origins == ["https://a.example", "chrome-extension://*"]
    assert _settings(["--origins", "*"], env).origins == ["*"]  # the flag wins


@pytest.mark.parametrize("args", [
    ["-p", "99999"], ["-p", "abc"], ["-t", "0"], ["--slots", "0"], ["--max-body-mb", "-1"],
    ["--bogus"], ["-o", "https://secure:443"],
])
def test_bad_values_one_line_exit_2(args: list[str]) -> None:
    r = _run("serve", *args)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "error" in lines[0]
    assert "Traceback" not in r.stderr


def test_help_lists_every_option_with_defaults() -> None:
    r = _run("serve", "--help")
    assert r.returncode == 0
    for opt in ("--port", "--host", "--backend-urls", "--ollama-urls", "--timeout", "--no-tui",
                "--allow-all-routes", "--slots", "--max-body-mb", "--admin-port", "--sim"):
        assert opt in r.stdout
    assert "11435" in r.stdout and "300" in r.stdout
    top = _run("--help")
    assert top.returncode == 0 and "sim" in top.stdout and "bench" in top.stdout
    assert _run("sim", "--help").returncode == 0


def test_serve_with_sim_answers_and_stops_on_sigterm() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ollamamq_fast", "--sim", "--no-tui", "--state", "", "--log-file", "",
                             "-p", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}")
        r = httpx.post(f"http://127.0.0.1:{port}/api/generate", timeout=10,
                       json={"model": "llama3.2", "prompt": "hi", "stream": False})
        assert r.status_code == 200 and r.json()["done"] is True
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_start_with_no_backend_answering_says_what_to_do() -> None:
    """A new user who runs `ollamamq-fast` with no Ollama there is told why requests
    will get 503, and of --sim; a gateway whose backend answers is not."""
    port, dead = free_port(), free_port()
    for backend_args, hint in ((["-o", f"127.0.0.1:{dead}"], True), (["--sim"], False)):
        proc = subprocess.Popen([sys.executable, "-m", "ollamamq_fast", *backend_args, "--no-tui",
                                 "--state", "", "--log-file", "", "--no-admin", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _wait_healthy(f"http://127.0.0.1:{port}")
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert ("no backend answers yet" in err and "--sim" in err) is hint, err


def test_serve_freezes_what_start_up_built_out_of_the_collectors_passes() -> None:
    """A full collection over every module and class stalled the loop (~20 ms): the
    serve command freezes start-up's objects; /api/stats shows it."""
    port, admin = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ollamamq_fast", "--sim", "--no-tui", "--state", "",
                             "--log-file", "", "-p", str(port), "--admin-port", str(admin),
                             "--admin-token", "t0k"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}")
        stats = httpx.get(f"http://127.0.0.1:{admin}/api/stats", timeout=10,
                          headers={"Authorization": "Bearer t0k"}).json()
        assert stats["gc"]["frozen"] > 10_000, stats["gc"]
        assert len(stats["gc"]["collections"]) == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_state_and_log_default_to_the_state_folder(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    xdg = tmp_path / "xdg"
    s = _settings([], env={"XDG_STATE_HOME": str(xdg)})
    assert s.state_path == str(xdg / "ollamamq-fast" / "ollamamq.db")
    assert s.log_file == str(xdg / "ollamamq-fast" / "ollamamq.log")
    # A relative XDG_STATE_HOME is ignored (XDG base directory spec): ~/.local/state.
    home = tmp_path / "home"
    s = _settings([], env={"XDG_STATE_HOME": "relative", "HOME": str(home)})
    assert s.state_path == str(home / ".local" / "state" / "ollamamq-fast" / "ollamamq.db")
    folder = tmp_path / "d"
    s = _settings(["--state-dir", str(folder)])
    assert (s.state_path, s.log_file) == (str(folder / "ollamamq.db"), str(folder / "ollamamq.log"))
    s = _settings(["--state-dir", str(folder), "--state", "x.db", "--log-file", ""])
    assert (s.state_path, s.log_file) == ("x.db", None)
    assert _settings(["--state", ""]).state_path is None


def test_quick_start_writes_nothing_into_the_current_folder(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cwd, state_home = tmp_path / "cwd", tmp_path / "state"
    cwd.mkdir()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ollamamq_fast", "serve", "--sim", "--no-tui",
                             "-p", str(port), "--admin-port", "0"],
                            cwd=cwd, env={**os.environ, "XDG_STATE_HOME": str(state_home)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}")
        r = httpx.post(f"http://127.0.0.1:{port}/api/generate", timeout=10,
                       json={"model": "llama3.2", "prompt": "hi", "stream": False})
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert list(cwd.iterdir()) == []
    folder = state_home / "ollamamq-fast"
    assert (folder / "ollamamq.db").is_file() and (folder / "ollamamq.log").is_file()


def test_redis_mistakes_are_clear_errors() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = ("serve", "--no-tui", "--no-admin", "--state", "", "--log-file", "", "-p", "0",
            "--backend-urls", "http://127.0.0.1:9")
    # Redis down (or refusing the password) at start: one line, exit 1, no password.
    r = _run(*base, "--redis", f"redis://:s3cret@127.0.0.1:{port}/0")
    assert r.returncode == 1, r.stderr
    assert "cannot open Redis state at redis://:***@127.0.0.1" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "s3cret" not in r.stderr, r.stderr
    # A URL redis-py cannot use: a configuration error (exit 2), from the flag or the env.
    r = _run(*base, "--redis", "http://127.0.0.1:6379")
    assert r.returncode == 2 and "--redis / REDIS_URL" in r.stderr and "redis://" in r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    r = _run(*base, env={"REDIS_URL": "redis://:s3cret@127.0.0.1:port/0"})
    assert r.returncode == 2 and "Port could not be cast" in r.stderr, r.stderr
    assert "s3cret" not in r.stderr, r.stderr


def test_port_in_use_is_a_clear_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _run("--sim", "--no-tui", "-p", str(port))
    assert r.returncode == 1
    assert "cannot listen" in r.stderr and "Traceback" not in r.stderr
    # What had started (probe session, simulator) was closed: no asyncio noise.
    assert "Unclosed" not in r.stderr and "ERROR" not in r.stderr, r.stderr


def test_toml_config_and_sighup_reload(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import socket as _socket

    from harness import LoopThread, fast_sim_options

    from ollamamq_fast.sim import start_sim

    lt = LoopThread()
    sims = [lt.run(start_sim(fast_sim_options())) for _ in range(2)]
    port = free_port()
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'slots = 2\nbalance = "round-robin"\n[[backends]]\nurl = "{sims[0].url}"\n'
                   f'slots = 5\n[users]\nvip = ["boss"]\n[users.weights]\ncarol = 3\n')
    proc = subprocess.Popen([sys.executable, "-m", "ollamamq_fast", "--no-tui", "--state", "", "-p", str(port),
                             "--config", str(cfg), "--log-file", ""],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url)
        body = {"model": "llama3.2", "prompt": "q", "stream": False}
        r = httpx.post(url + "/api/generate", json=body)
        assert r.headers["x-gateway-backend"] == sims[0].url
        # Keep a connection open across the reload: it must survive.
        conn = _socket.create_connection(("127.0.0.1", port))
        cfg.write_text(f'[[backends]]\nurl = "{sims[1].url}"\nslots = 3\n')
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if httpx.post(url + "/api/generate", json=body).headers.get(
                    "x-gateway-backend") == sims[1].url:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("reload did not switch backends")
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.recv(100).startswith(b"HTTP/1.1 200")
        conn.close()
        cfg.write_text("not = [valid toml")
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        assert httpx.post(url + "/api/generate", json=body).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert b"reload failed" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        for sim in sims:
            lt.run(sim.close())
        lt.stop()


def test_sigterm_drains_running_streams() -> None:
    import json as _json
    import threading

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ollamamq_fast", "--sim", "--no-tui", "--state", "", "--log-file", "",
                             "-p", str(port), "--log-file", ""],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url)
        lines: list[dict] = []

        def stream() -> None:
            with httpx.stream("POST", url + "/api/chat", timeout=10,
                              headers={"X-Sim-Tokens": "40"},
                              json={"model": "llama3.2",
                                    "messages": [{"role": "user", "content": "q"}]}) as r:
                lines.extend(_json.loads(ln) for ln in r.iter_lines() if ln)

        t = threading.Thread(target=stream)
        t.start()
        time.sleep(0.3)  # the stream is running (40 tokens at 50/s: ~0.8 s)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=1)  # no longer accepting
        t.join(10)
        assert lines and lines[-1]["done"] is True and len(lines) == 41
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_body_limits_from_flags() -> None:
    s = _settings(["--max-body-mb", "2", "--max-bodies-mb", "8"])
    assert s.max_body_bytes == 2 * 1024 * 1024 and s.max_bodies_bytes == 8 * 1024 * 1024
    assert _settings([]).max_bodies_bytes == 512 * 1024 * 1024  # the README's default
