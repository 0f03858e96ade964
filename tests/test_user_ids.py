"""User ids are bounded, idle users are forgotten, admin lists are paged (issue 14).

3,000 distinct 60 KB X-User-IDs grew the process by 220 MB and the store by
455 MB, were never pruned, and /api/users answered 180 MB in one piece.
"""

from __future__ import annotations

import asyncio
import calendar
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from harness import Stack, start_stack
from test_state import REDIS_SERVER, RedisServer

from ollamamq_fast.cli import main as cli_main
from ollamamq_fast.config import ConfigError, Settings, apply_toml
from ollamamq_fast.policy.identity import MAX_USER_ID_BYTES, UserIdError, check_user_id
from ollamamq_fast.state.records import Usage, UserSettings
from ollamamq_fast.state.redis_store import RedisStore
from ollamamq_fast.state.sqlite import SQLiteStore
from ollamamq_fast.state.store import Store
from ollamamq_fast.stats import UserStats

TOKEN = "t0k"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DAY = 86400.0


@pytest.mark.parametrize(("raw", "user"), [
    (b"alice", "alice"), (b"  bob\t", "bob"), (b"", ""), (b"a b", "a b"),
    (b"x" * MAX_USER_ID_BYTES, "x" * MAX_USER_ID_BYTES), ("\u00fcn\u00ef".encode(), "\u00fcn\u00ef"),
])
def test_good_user_ids(raw: bytes, user: str) -> None:
    assert check_user_id(raw) == user


@pytest.mark.parametrize("raw", [
    b"x" * (MAX_USER_ID_BYTES + 1), "\u00fc".encode() * 65, b"\xff\xfe", b"a\x00b", b"a\nb",
    b"a\rb", b"a\x1bb", b"a\x7fb", "a\u0085b".encode(), "a\u2028b".encode(),
    "a\u200bb".encode(),
])
def test_bad_user_ids(raw: bytes) -> None:
    with pytest.raises(UserIdError) as err:
        check_user_id(raw)
    assert "X-User-ID" in str(err.value)


def test_idle_days_setting_is_validated() -> None:
    s = Settings()
    apply_toml(s, {"user_idle_days": 7})
    assert s.user_idle_days == 7.0
    with pytest.raises(ConfigError):
        apply_toml(Settings(), {"user_idle_days": -1})


# -- Pruning ----------------------------------------------------------------------


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    st = start_stack(admin_port=0, admin_token=TOKEN, state_path=str(tmp_path / "s.db"),
                     user_idle_days=10.0)
    yield st
    st.close()


def _seen(st: Stack, user: str, when: float) -> None:
    stats = st.state.stats.user(user)
    stats.last_seen = when
    stats.done = 1


def test_idle_users_are_forgotten_in_memory_and_store(stack: Stack) -> None:
    st = stack
    now = time.time()
    state, op = st.state, st.state.operator
    for user in ("old", "old-vip", "old-keyed", "old-blocked", "old-limited", "recent", "busy"):
        _seen(st, user, now - 30 * DAY)
    _seen(st, "recent", now - DAY)
    st.state.stats.user("busy").in_flight = 1
    st.lt.call(op.set_user, "old-vip", True)
    st.lt.call(op.create_key, "old-keyed")
    st.lt.call(op.block_user, "old-blocked", True)
    st.lt.call(lambda: op.set_limits("old-limited", rate=5))

    old_day = time.strftime("%Y-%m-%d", time.gmtime(now - 30 * DAY))
    new_day = time.strftime("%Y-%m-%d", time.gmtime(now - DAY))
    rows = [Usage(u, "m", old_day, 1, 1, 1) for u in ("old", "old-vip", "old-keyed")]
    rows += [Usage("recent", "m", old_day, 1, 1, 1), Usage("recent", "m", new_day, 1, 1, 1)]
    st.lt.run(state.cache.store.add_usage(rows))

    memory, stored = st.lt.run(state.idle.prune(now))
    assert memory == 1 and stored == 1
    users = set(state.stats.users)
    assert "old" not in users
    assert {"old-vip", "old-keyed", "old-blocked", "old-limited", "recent", "busy"} <= users
    left = {r.user for r in st.lt.run(state.cache.store.usage())}
    assert left == {"old-vip", "old-keyed", "recent"}
    # Off when 0 days.
    state.settings.user_idle_days = 0
    assert st.lt.run(state.idle.prune(now + 365 * DAY)) == (0, 0)


def test_a_default_total_quota_keeps_the_store(stack: Stack) -> None:
    st = stack
    state = st.state
    now = time.time()
    state.settings.limits["quota_total"] = 1000
    old_day = time.strftime("%Y-%m-%d", time.gmtime(now - 30 * DAY))
    st.lt.run(state.cache.store.add_usage([Usage("old", "m", old_day, 1, 1, 1)]))
    _seen(st, "old", now - 30 * DAY)
    assert st.lt.run(state.idle.prune(now)) == (1, 0)
    assert [r.user for r in st.lt.run(state.cache.store.usage())] == ["old"]


def test_a_default_monthly_quota_keeps_the_months_usage(stack: Stack) -> None:
    """Pruning an idle user's usage of the current month would give it its
    monthly quota back: with `user_idle_days` shorter than a month, a user
    could spend a default `quota_month`, wait, and spend it again."""
    st = stack
    state = st.state
    now = calendar.timegm((2026, 12, 20, 12, 0, 0))
    state.settings.limits["quota_month"] = 1000
    state.settings.user_idle_days = 2.0
    st.lt.run(state.cache.store.add_usage([Usage("old", "m", "2026-11-28", 1, 1, 1),
                                           Usage("old", "m", "2026-12-05", 1, 500, 500)]))
    _seen(st, "old", now - 15 * DAY)
    assert st.lt.run(state.idle.prune(now)) == (1, 0)  # forgotten in memory only
    assert [r.day for r in st.lt.run(state.cache.store.usage())] == ["2026-11-28", "2026-12-05"]
    st.lt.run(state.cache.store.add_usage([Usage("gone", "m", "2026-11-28", 1, 1, 1)]))
    assert st.lt.run(state.idle.prune(now)) == (0, 1)  # nothing this month: pruned


def _prune_in(store: Store) -> tuple[int, set[str]]:
    async def run() -> tuple[int, set[str]]:
        await store.open()
        try:
            await store.add_usage([Usage("a", "m", "2020-01-01", 1, 2, 3),
                                   Usage("a", "n", "2020-01-02", 1, 2, 3),
                                   Usage("b", "m", "2020-01-01", 1, 2, 3),
                                   Usage("b", "m", "2020-03-01", 1, 2, 3),
                                   Usage("kept", "m", "2020-01-01", 1, 2, 3)])
            await store.put_user(UserSettings("kept"))
            pruned = await store.prune_usage("2020-02-01", {"kept"})
            return pruned, {u.user for u in await store.usage()}
        finally:
            await store.close()

    return asyncio.run(run())


def test_sqlite_prunes_idle_usage(tmp_path: Path) -> None:
    assert _prune_in(SQLiteStore(str(tmp_path / "p.db"))) == (1, {"b", "kept"})


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH")
def test_redis_prunes_idle_usage(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        got = _prune_in(RedisStore(server.url, namespace=f"t{uuid.uuid4().hex[:8]}"))
    finally:
        server.stop()
    assert got == (1, {"b", "kept"})


# -- Paged admin lists --------------------------------------------------------------


def test_admin_lists_are_paged(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    st = stack
    users = st.state.stats.users
    for i in range(30_000):  # beyond what the data plane keeps: only the answer is measured
        users[f"u{i:05d}"] = UserStats(f"u{i:05d}")
    admin = f"http://127.0.0.1:{st.gateway.admin_port}"
    with httpx.Client(base_url=admin, headers=AUTH, timeout=10) as c:
        t0 = time.perf_counter()
        r = c.get("/api/users")
        took = time.perf_counter() - t0
        page = r.json()
        assert r.status_code == 200 and page["total"] == 30_000
        assert len(page["users"]) == page["limit"] == 1000 and page["offset"] == 0
        assert len(r.content) < 1024 * 1024 and took < 2.0, (len(r.content), took)
        page = c.get("/api/users", params={"limit": 5, "offset": 29_998}).json()
        assert [u["user"] for u in page["users"]] == ["u29998", "u29999"]
        users["u12345"].in_flight = 2
        assert c.get("/api/users", params={"sort": "active", "limit": 1}).json()[
            "users"][0]["user"] == "u12345"
        for bad in ({"limit": 0}, {"limit": 10_001}, {"limit": "x"}, {"offset": -1},
                    {"sort": "size"}):
            assert c.get("/api/users", params=bad).status_code == 400, bad
        for i in range(3):
            c.post("/api/keys", json={"user": f"k{i}"})
            c.post(f"/api/users/b{i}/block")
        keys = c.get("/api/keys", params={"limit": 2}).json()
        assert keys["total"] == 3 and len(keys["keys"]) == 2
        blocked = c.get("/api/blocked", params={"limit": 2, "offset": 1}).json()
        assert blocked["users"] == ["b1", "b2"] and blocked["total_users"] == 3
    # The CLI still lists everything, a page at a time.
    assert cli_main(["keys", "list", "--admin", admin, "--token", TOKEN, "--json"]) == 0
    assert '"total": 3' in capsys.readouterr().out
