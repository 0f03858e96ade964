"""An admin write answered 200 is in the store before the answer (issue 14).

The state cache writes behind (every 0.2 s); a block answered 200 and a kill -9
0.1 s later used to lose the block. Now each admin write waits for its commit.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
from harness import free_port, start_stack

TOKEN = "t0k"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def test_every_admin_write_is_committed_before_its_answer(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    st = start_stack(admin_port=0, admin_token=TOKEN, state_path=str(db))
    # A long flush interval: only the answer's own wait can have stored the writes.
    st.state.cache.flush_interval = 60.0
    admin = f"http://127.0.0.1:{st.gateway.admin_port}"
    try:
        with httpx.Client(base_url=admin, headers=AUTH, timeout=5) as c:
            assert c.post("/api/users/mallory/block").status_code == 200
            assert _rows(db, "SELECT user FROM blocked_users") == [("mallory",)]
            assert c.post("/api/blocked/ips", json={"ip": "10.9.0.0/16"}).status_code == 200
            assert _rows(db, "SELECT ip FROM blocked_ips") == [("10.9.0.0/16",)]
            key = c.post("/api/keys", json={"user": "alice"}).json()
            assert _rows(db, "SELECT user FROM api_keys") == [("alice",)]
            assert c.delete(f"/api/keys/{key['key_id']}").status_code == 200
            assert _rows(db, "SELECT revoked FROM api_keys") == [(1,)]
            assert c.patch("/api/users/bob", json={"weight": 3}).status_code == 200
            assert _rows(db, "SELECT weight FROM users WHERE user = 'bob'") == [(3,)]
            assert c.patch("/api/users/bob/limits", json={"rate": 5}).status_code == 200
            assert "rate" in str(_rows(db, "SELECT limits FROM users WHERE user = 'bob'"))
            assert c.post("/api/backends", json={"url": "127.0.0.1:9"}).status_code == 201
            assert _rows(db, "SELECT url FROM backends") == [("http://127.0.0.1:9",)]
            assert c.delete("/api/backends", params={"url": "127.0.0.1:9"}).status_code == 200
            assert _rows(db, "SELECT url FROM backends") == []
            assert c.post("/api/users/mallory/unblock").status_code == 200
            assert _rows(db, "SELECT user FROM blocked_users") == []
    finally:
        st.close()


def test_a_block_survives_kill_9_right_after_its_answer(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    port, admin_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ollamamq_fast", "--sim", "--no-tui",
                             "--state", str(db), "--log-file", "", "-p", str(port),
                             "--admin-port", str(admin_port), "--admin-token", TOKEN],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        admin = f"http://127.0.0.1:{admin_port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(admin + "/api/stats", headers=AUTH, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.05)
        r = httpx.post(admin + "/api/users/mallory/block", headers=AUTH, timeout=5)
        assert r.status_code == 200
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert _rows(db, "SELECT user FROM blocked_users") == [("mallory",)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
