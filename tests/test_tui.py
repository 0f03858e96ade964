"""The terminal dashboard: Textual's headless pilot against a real gateway.

One gateway (admin port 0, token "t") in front of a fast simulator serves the
pilot tests; requests go to its data plane with X-User-ID from a worker
thread while the dashboard runs on the test's own loop, so what the panels
show and what each key changes is checked end to end, through the admin API.
`top` with a wrong token runs as a subprocess; `serve` with the in-process
dashboard runs in a pseudo-terminal.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import Stack, free_port, start_stack
from textual.widget import Widget

from ollamamq_fast.config import Settings
from ollamamq_fast.tui.actions import (
    NoTarget,
    block_ip,
    toggle_drain,
    toggle_vip,
    unblock_for_user,
    unblock_item,
)
from ollamamq_fast.tui.app import STOP_GATEWAY, Dashboard
from ollamamq_fast.tui.client import SseParser
from ollamamq_fast.tui.inprocess import LineFormatter, ensure_admin_token, loopback_url
from ollamamq_fast.tui.view import (
    backend_rows,
    backend_url_of,
    blocked_item,
    user_marks,
)
from ollamamq_fast.tui.widgets.backends import BackendsTable
from ollamamq_fast.tui.widgets.blocked import BlockedTable
from ollamamq_fast.tui.widgets.dialogs import ConfirmScreen, HelpScreen, WeightScreen
from ollamamq_fast.tui.widgets.eventlog import EventLog
from ollamamq_fast.tui.widgets.users import UsersTable

pytestmark = pytest.mark.timeout(30)

TOKEN = "t"
SIZE = (140, 45)
BODY = {"model": "llama3.2", "prompt": "q", "stream": False}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    st = start_stack(admin_port=0, admin_token=TOKEN)
    try:
        yield st
    finally:
        st.close()


def admin_url(stack: Stack) -> str:
    port = stack.gateway.admin_port
    assert port, "the control plane did not start"
    return f"http://127.0.0.1:{port}"


def generate(stack: Stack, user: str) -> int:
    """One non-streamed request on the data plane; its status."""
    r = httpx.post(stack.url + "/api/generate", json=BODY, headers={"X-User-ID": user},
                   timeout=10)
    return r.status_code


async def agenerate(stack: Stack, user: str) -> int:
    """generate() off the loop: the dashboard must keep running meanwhile."""
    return await asyncio.to_thread(generate, stack, user)


async def wait_for(check: Callable[[], Any], what: str, timeout: float = 5.0) -> None:
    """Poll `check` until true while the app keeps running; fail with `what`."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def focused(app: Dashboard) -> Widget | None:
    """The focused widget (a call, so each check reads it afresh)."""
    return app.focused


def screen_text(app: Dashboard) -> str:
    """The screen as plain text, as a terminal would show it."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


def on_loop(stack: Stack, fn: Callable[..., Any], *args: Any) -> Any:
    return stack.lt.call(fn, *args)


def sim_url(stack: Stack) -> str:
    return str(on_loop(stack, stack.state.operator.list_backends)[0]["url"])


async def select_user(app: Dashboard, user: str) -> UsersTable:
    table = app.query_one(UsersTable)
    await wait_for(lambda: table.select_key(f"u|{user}"), f"{user} in the Users panel")
    table.focus()
    return table


def user_row(table: UsersTable, user: str) -> dict[str, Any]:
    row = next((u for u in table.users if u["user"] == user), None)
    assert row is not None, user
    return row


# -- Panels show live data ---------------------------------------------------------


def test_panels_show_live_data(stack: Stack) -> None:
    for _ in range(3):
        assert generate(stack, "tui-alice") == 200
    url = sim_url(stack)

    async def scenario() -> None:
        app = Dashboard(admin_url(stack), TOKEN)
        async with app.run_test(size=SIZE):
            users = app.query_one(UsersTable)
            backends = app.query_one(BackendsTable)
            await wait_for(lambda: users.select_key("u|tui-alice"), "the user row")
            await wait_for(lambda: backends.select_key(f"b|{url}"), "the backend row")
            alice = user_row(users, "tui-alice")
            assert alice["done"] >= 3 and alice["last_ip"] == "127.0.0.1"
            # Traffic while the dashboard runs: the next tick counts it.
            for _ in range(3):
                assert await agenerate(stack, "tui-alice") == 200
            await wait_for(lambda: app.tick.get("requests_per_s", 0) > 0, "a busy tick")
            await wait_for(lambda: user_row(users, "tui-alice")["done"] >= 6, "done >= 6")
            text = screen_text(app)
            assert url in text and "online" in text and "ollama" in text
            assert "tui-alice" in text and "127.0.0.1" in text
            assert "req/s" in text and "tokens/s" in text
            assert "● " + admin_url(stack) in text  # connected
            log = app.query_one(EventLog)
            assert any("req/s" in line.plain for line in log.lines)

    run(scenario)


# -- Keys ------------------------------------------------------------------------------


def test_vip_boost_weight_keys(stack: Stack) -> None:
    assert generate(stack, "tui-bob") == 200
    queue = stack.state.dispatcher.queue

    async def scenario() -> None:
        app = Dashboard(admin_url(stack), TOKEN)
        async with app.run_test(size=SIZE) as pilot:
            table = await select_user(app, "tui-bob")
            await pilot.press("p")
            await wait_for(lambda: on_loop(stack, queue.is_vip, "tui-bob"), "VIP on")
            await wait_for(lambda: user_row(table, "tui-bob")["vip"], "★ in the panel")
            assert "★" in screen_text(app)
            await pilot.press("p")
            await wait_for(lambda: not on_loop(stack, queue.is_vip, "tui-bob"), "VIP off")
            await wait_for(lambda: not user_row(table, "tui-bob")["vip"], "★ gone")

            await pilot.press("b")
            await wait_for(lambda: on_loop(stack, queue.is_boost, "tui-bob"), "Boost on")
            await wait_for(lambda: user_row(table, "tui-bob")["boost"], "⚡ in the panel")
            assert "⚡" in screen_text(app)

            await pilot.press("w")
            await wait_for(lambda: isinstance(app.screen, WeightScreen), "the weight prompt")
            await pilot.press("0", "enter")  # refused: stays open with a hint
            assert isinstance(app.screen, WeightScreen)
            await pilot.press("backspace", "3", "enter")
            await wait_for(lambda: on_loop(stack, queue.weight, "tui-bob") == 3, "weight 3")
            await wait_for(lambda: user_row(table, "tui-bob")["weight"] == 3, "weight shown")
            await pilot.press("w", "escape")  # Esc changes nothing
            assert not isinstance(app.screen, WeightScreen)
            assert on_loop(stack, queue.weight, "tui-bob") == 3
        on_loop(stack, stack.state.operator.set_user, "tui-bob", False, False, 1)

    run(scenario)


def test_block_keys(stack: Stack) -> None:
    assert generate(stack, "tui-carol") == 200
    cache = stack.state.cache

    async def scenario() -> None:
        app = Dashboard(admin_url(stack), TOKEN)
        async with app.run_test(size=SIZE) as pilot:
            table = await select_user(app, "tui-carol")
            await pilot.press("x")
            await wait_for(lambda: "tui-carol" in cache.blocked_users, "user blocked")
            assert await agenerate(stack, "tui-carol") == 403
            assert await agenerate(stack, "tui-dave") == 200
            await wait_for(lambda: user_row(table, "tui-carol")["blocked"], "⛔ in the panel")
            blocked = app.query_one(BlockedTable)
            await wait_for(lambda: blocked.select_key("user|tui-carol"), "Blocked panel row")
            await pilot.press("u")  # in the Users panel: lifts the user's block
            await wait_for(lambda: "tui-carol" not in cache.blocked_users, "user unblocked")
            assert await agenerate(stack, "tui-carol") == 200

            await pilot.press("X")  # the user's last address: 127.0.0.1, everyone here
            await wait_for(lambda: "127.0.0.1" in cache.blocked_ips, "address blocked")
            assert await agenerate(stack, "tui-dave") == 403
            await wait_for(lambda: blocked.select_key("ip|127.0.0.1"), "the address row")
            await pilot.press("tab")  # Users -> Blocked
            assert focused(app) is blocked
            blocked.select_key("ip|127.0.0.1")
            await pilot.press("u")
            await wait_for(lambda: "127.0.0.1" not in cache.blocked_ips, "address unblocked")
            assert await agenerate(stack, "tui-dave") == 200

    try:
        run(scenario)
    finally:
        on_loop(stack, stack.state.operator.block_ip, "127.0.0.1", False)
        on_loop(stack, stack.state.operator.block_user, "tui-carol", False)


def test_backend_keys_drain_and_expand(stack: Stack) -> None:
    url = sim_url(stack)
    backend = on_loop(stack, stack.state.fleet.find, url)
    assert generate(stack, "tui-erin") == 200
    # Re-probe now so /api/ps shows the model just used as loaded.
    on_loop(stack, stack.state.health.refresh_soon, backend)

    async def scenario() -> None:
        app = Dashboard(admin_url(stack), TOKEN)
        async with app.run_test(size=SIZE) as pilot:
            table = app.query_one(BackendsTable)
            await wait_for(lambda: table.select_key(f"b|{url}"), "the backend row")
            await wait_for(lambda: table.backends and table.backends[0]["loaded"],
                           "a loaded model")
            await pilot.press("h")  # Users -> Backends
            assert focused(app) is table
            models = table.backends[0]["models"]
            await pilot.press("space")
            assert table.row_count == 1 + len(models)
            text = screen_text(app)
            assert "▼ " + url in text and "● loaded" in text
            for model in models:
                assert model in text
            await pilot.press("j")  # onto a model row: keys still mean its backend
            assert backend_url_of(table.selected_key or "") == url
            await pilot.press("d")
            await wait_for(lambda: backend.draining, "backend draining")
            # d toggles from what the panel shows: wait for the refresh.
            await wait_for(lambda: table.backends[0]["draining"], "draining in the panel")
            assert "draining" in screen_text(app)
            await pilot.press("d")
            await wait_for(lambda: not backend.draining, "backend undrained")
            await pilot.press("enter")  # collapse, cursor back on the backend
            assert table.row_count == 1 and table.selected_key == f"b|{url}"
            assert "▶ " + url in screen_text(app)

    try:
        run(scenario)
    finally:
        on_loop(stack, stack.state.set_draining, url, False)


def test_focus_navigation_and_help(stack: Stack) -> None:
    for user in ("tui-nav1", "tui-nav2"):
        assert generate(stack, user) == 200

    async def scenario() -> None:
        app = Dashboard(admin_url(stack), TOKEN)
        async with app.run_test(size=SIZE) as pilot:
            backends, users = app.query_one(BackendsTable), app.query_one(UsersTable)
            blocked = app.query_one(BlockedTable)
            assert focused(app) is users
            await pilot.press("tab")
            assert focused(app) is blocked
            await pilot.press("tab")
            assert focused(app) is backends
            await pilot.press("l")
            assert focused(app) is users
            await pilot.press("h")
            assert focused(app) is backends
            await pilot.press("l")
            await wait_for(lambda: users.row_count >= 2, "two users")
            users.move_cursor(row=0)
            await pilot.press("j")
            assert users.cursor_row == 1
            await pilot.press("k")
            assert users.cursor_row == 0
            await pilot.press("down")
            assert users.cursor_row == 1
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            text = screen_text(app)
            assert "toggle VIP" in text and "drain" in text and "keeps running" in text
            await pilot.press("question_mark")
            assert not isinstance(app.screen, HelpScreen)
            # A user key in the Backends panel does nothing to any user.
            await pilot.press("h", "p")
            await pilot.pause()
            assert not any(u["vip"] for u in users.users)

    run(scenario)


def test_q_leaves_top_and_the_gateway_running(stack: Stack) -> None:
    async def scenario() -> None:
        app = Dashboard(admin_url(stack), TOKEN)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("q")
            await wait_for(lambda: not app.is_running, "the app to exit")
        assert app.return_value is None

    run(scenario)
    assert generate(stack, "tui-after") == 200


def test_q_in_process_asks_before_stopping(stack: Stack) -> None:
    async def scenario() -> None:
        app = Dashboard(admin_url(stack), TOKEN, in_process=True)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("q")
            assert isinstance(app.screen, ConfirmScreen)
            assert "Stop the gateway" in screen_text(app)
            await pilot.press("n")
            assert app.is_running and not isinstance(app.screen, ConfirmScreen)
            await pilot.press("q", "y")
            await wait_for(lambda: not app.is_running, "the app to exit")
        assert app.return_value == STOP_GATEWAY

    run(scenario)


def test_lost_gateway_is_shown_not_fatal() -> None:
    async def scenario() -> None:
        app = Dashboard(f"http://127.0.0.1:{free_port()}", TOKEN)
        async with app.run_test(size=SIZE):
            await wait_for(lambda: "connection refused" in app.link_error, "the error")
            assert "⚠" in screen_text(app)
            assert app.is_running

    run(scenario)


# -- `top` and `serve` as processes --------------------------------------------------


def run_top(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ollamamq_fast", "top", *args],
                          capture_output=True, text=True, timeout=20, cwd=ROOT,
                          env={**os.environ, **env}, check=False)


def test_top_refuses_a_wrong_token_in_one_line(stack: Stack) -> None:
    result = run_top("--admin", admin_url(stack), "--token", "wrong")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "401" in lines[0] and "wrong token" in lines[0]
    # The same from the environment, and a port where nothing listens.
    result = run_top(OLLAMAMQ_ADMIN=f"127.0.0.1:{free_port()}", OLLAMAMQ_ADMIN_TOKEN=TOKEN)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "connection refused" in result.stderr


class Pty:
    """A child process on a pseudo-terminal of a fixed size, as a user would run it."""

    def __init__(self, argv: list[str], cwd: Path, rows: int = 45, cols: int = 140) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color"}
        env.pop("OLLAMAMQ_ADMIN_TOKEN", None)
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd,
                                     env=env, start_new_session=True)
        os.close(slave)
        self.output = b""

    def read_until(self, pattern: bytes, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while pattern not in self.output:
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(min(left, 0.2)):
                return pattern in self.output
        return True

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            try:
                self.output += os.read(self.master, 65536)
            except OSError:  # the child closed the terminal
                return False
        return True

    def send(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.1)
        return self.proc.poll()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self.master)

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")


def test_serve_shows_the_dashboard_in_process_and_q_drains(tmp_path: Path) -> None:
    term = Pty([sys.executable, "-m", "ollamamq_fast", "serve", "--sim", "--port", "0",
                "--admin-port", "0", "--state", "", "--log-file", str(tmp_path / "gw.log")],
               cwd=tmp_path)
    try:
        assert term.read_until(b"Backends", 15), term.text[-2000:]
        token = re.search(r"admin token: (\S+)", term.text)
        admin = re.search(r"admin API on (http://\S+)", term.text)
        assert token and admin, term.text[:2000]
        # The generated token reached the control plane (and the dashboard).
        r = httpx.get(admin.group(1) + "/api/users", timeout=5,
                      headers={"Authorization": f"Bearer {token.group(1)}"})
        assert r.status_code == 200
        assert term.read_until(b"taking requests", 10)
        # A log record while the dashboard runs (SIGHUP without a config
        # file logs an error): into the log file and the log panel, never as
        # a raw stderr line over the screen.
        drawn = len(term.output)
        os.kill(term.proc.pid, signal.SIGHUP)
        assert term.read_until(b"reload failed", 5)
        assert b"ERROR ollamamq_fast" not in term.output[drawn:]
        logged = (tmp_path / "gw.log").read_text()
        assert '"level":"error"' in logged and "reload failed" in logged
        term.send(b"q")
        assert term.read_until(b"Stop the gateway", 5)
        term.send(b"y")
        assert term.wait(15) == 0, term.text[-2000:]
        assert "draining" in term.text
    finally:
        term.close()


# -- Pure parts -------------------------------------------------------------------------


def test_sse_parser() -> None:
    parser = SseParser()
    assert parser.feed(b"retry: 3000\n") is None
    assert parser.feed(b": connected\n") is None
    assert parser.feed(b"\n") is None  # a comment-only block is no event
    assert parser.feed(b"event: tick\n") is None
    assert parser.feed(b'data: {"type": "tick", "queued": 2}\r\n') is None
    assert parser.feed(b"\n") == {"type": "tick", "queued": 2}
    assert parser.feed(b"data: not json\n") is None
    assert parser.feed(b"\n") is None


def test_rows_and_actions() -> None:
    b = {"url": "http://h:1", "online": True, "draining": False, "breaker": "closed",
         "kind": "ollama", "slots": 4, "in_flight": 1, "requests_done": 9, "failures": 0,
         "models": ["a", "b", "c", "d"], "loaded": ["b"]}
    (key, cells), = backend_rows([b], set())
    assert key == "b|http://h:1" and cells[3].plain == "1/4" and cells[6].plain == "a, b, c +1"
    # Runtime changes show as such: a slots override, a backend added at runtime.
    (_, cells), = backend_rows([{**b, "source": "config", "configured_slots": 2,
                                 "override": {"slots": 4}}], set())
    assert cells[3].plain == "1/4 (config 2)"
    (_, cells), = backend_rows([{**b, "source": "runtime", "override": None}], set())
    assert cells[3].plain == "1/4 +"
    rows = backend_rows([b], {"http://h:1"})
    assert [backend_url_of(k) for k, _ in rows] == ["http://h:1"] * 5
    assert [str(c[1]) for _, c in rows[1:]] == ["", "● loaded", "", ""]
    assert toggle_drain(b).path == "/api/backends/drain"
    assert toggle_drain({**b, "draining": True}).path == "/api/backends/undrain"

    user = {"user": "a/b", "vip": True, "boost": True, "blocked": True, "last_ip": "10.0.0.1"}
    assert user_marks(user).plain == "⛔★⚡"
    assert toggle_vip(user).body == {"vip": False}
    assert toggle_vip(user).path == "/api/users/a%2Fb"
    calls = unblock_for_user(user, {"10.0.0.1"})
    assert [c.path for c in calls] == ["/api/users/a%2Fb/unblock", "/api/blocked/ips"]
    with pytest.raises(NoTarget):
        unblock_for_user({**user, "blocked": False}, set())
    with pytest.raises(NoTarget):
        block_ip({"user": "new", "last_ip": ""})
    assert unblock_item("ip", "10.0.0.0/8").query == {"ip": "10.0.0.0/8"}
    assert blocked_item("ip|::1") == ("ip", "::1") and blocked_item("junk") is None


def test_in_process_token_and_log_format() -> None:
    settings = Settings()
    token = ensure_admin_token(settings)
    assert token and settings.admin_token == token and len(token) >= 40
    assert ensure_admin_token(settings) is None  # an existing token is kept
    off = Settings()
    off.admin_port = -1
    assert ensure_admin_token(off) is None and off.admin_token is None

    assert loopback_url("0.0.0.0", 9) == "http://127.0.0.1:9"
    assert loopback_url("::", 9) == "http://[::1]:9"
    assert loopback_url("127.0.0.2", 9) == "http://127.0.0.2:9"
    assert loopback_url("127.0.0.1", None) is None

    import logging

    record = logging.LogRecord("ollamamq_fast", logging.WARNING, "", 0, 'say "%s"', ("hi",),
                               None)
    assert '"msg":"say \\"hi\\""' in LineFormatter("json").format(record)
    assert 'msg="say \\"hi\\""' in LineFormatter("logfmt").format(record)


# -- Usage screen --------------------------------------------------------------------


def test_usage_screen_shows_stored_usage_per_user_and_model(stack: Stack) -> None:
    from ollamamq_fast.tui.widgets.usage import UsageScreen

    for _ in range(2):
        assert generate(stack, "tui-usage") == 200

    async def scenario() -> None:
        app = Dashboard(admin_url(stack), TOKEN)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("t")
            assert isinstance(app.screen, UsageScreen)
            await wait_for(lambda: "Per model" in screen_text(app), "the usage report")
            text = screen_text(app)
            assert "Usage of the last 7 days (UTC)" in text and "Per user" in text
            assert "tui-usage" in text and "llama3.2:latest" in text
            today = time.strftime("%Y-%m-%d", time.gmtime())
            assert today in text and "█" in text
            await pilot.press("n")  # a longer range
            await wait_for(lambda: "last 30 days" in screen_text(app), "the 30-day range")
            await pilot.press("escape")
            assert not isinstance(app.screen, UsageScreen)

    run(scenario)


def test_pools_panel_shows_pools_and_a_running_pull(stack: Stack) -> None:
    from ollamamq_fast.tui.view import pool_rows
    from ollamamq_fast.tui.widgets.pools import PoolsTable

    sim = stack.sims[0]
    sim.app.options.pull_step_s = 0.3  # about 3 s of progress: long enough to see it
    headers = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.post(admin_url(stack) + "/api/pools", headers=headers, timeout=10, json={
        "name": "tui-gpu", "backends": [sim.url], "required_models": ["phi3:mini"]})
    assert r.status_code == 201, r.text

    async def scenario() -> None:
        app = Dashboard(admin_url(stack), TOKEN)
        async with app.run_test(size=SIZE):
            pools = app.query_one(PoolsTable)
            await wait_for(lambda: pools.select_key("p|tui-gpu"), "the pool row")
            def pull_shown() -> bool:
                rows = dict(pool_rows(pools.pools))
                cells = rows.get("p|tui-gpu")
                return cells is not None and "phi3:mini" in cells[5].plain and "% on" in cells[
                    5].plain

            await wait_for(pull_shown, "the pull's progress in the Pools panel")
            assert "pull(s) running" in str(pools.border_title)
            await wait_for(lambda: any("pull_done" in line.plain
                                       for line in app.query_one(EventLog).lines),
                           "the pull's end in the log", timeout=10)
            assert "tui-gpu" in screen_text(app) and "default" in screen_text(app)

    try:
        run(scenario)
    finally:
        sim.app.options.pull_step_s = None
        httpx.delete(admin_url(stack) + "/api/pools/tui-gpu", headers=headers, timeout=10)
    (key, cells), = pool_rows([{"name": "p", "backends_online": 1, "backends_total": 2,
                               "in_flight": 1, "slots_total": 4, "queued": 3,
                               "required_models": ["m"], "pulls": [
                                   {"model": "m", "percent": 50.0, "backend": "http://h:1"}]}])
    assert key == "p|p" and [c.plain for c in cells] == ["p", "1/2", "1/4", "3", "m",
                                                         "m 50% on h:1"]
