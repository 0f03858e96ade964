"""Tests for state/: both stores, the cache's write-behind, CIDR blocks, kill -9, replicas.

Every store test runs against SQLite (a file in tmp_path) and Redis (a throwaway
`redis-server` on a loopback port, one per module, a namespace per test).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis
from blake3 import blake3
from hypothesis import given, settings
from hypothesis import strategies as st

from ollamamq_fast.state import (
    BackendRecord,
    KeyRecord,
    StateCache,
    Store,
    StoreError,
    Usage,
    UsageHour,
    UserSettings,
    open_store,
    utc_day,
)
from ollamamq_fast.state import windows as windows_mod
from ollamamq_fast.state.ipblock import IpBlocklist, canonical
from ollamamq_fast.state.redis_store import RedisStore
from ollamamq_fast.state.sqlite import SQLiteStore
from ollamamq_fast.state.store import DEFAULT_SQLITE_PATH, SCHEMA_VERSION
from ollamamq_fast.state.windows import LocalWindows

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None,
    reason="redis-server is not on PATH (apt-get install redis-server)",
)
StoreFactory = Callable[[], Store]


def run(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    """Run one test body on a fresh event loop, bounded so a hang fails instead of stalling."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def digest(secret: str) -> str:
    """An API key digest as the gateway computes it."""
    return blake3(secret.encode()).hexdigest()


async def eventually(pred: Callable[[], bool], timeout: float = 1.0) -> float:
    """Wait until `pred()` holds; returns the seconds it took, fails after `timeout`."""
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A throwaway redis-server on 127.0.0.1 with AOF fsync'd on every write."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The redis:// URL the stores connect to."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart, on the same port and data dir) and wait until it answers PING."""
        assert REDIS_SERVER is not None
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.5
                ) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            time.sleep(0.02)
        raise RuntimeError("redis-server did not answer within 10 s")

    def kill(self) -> None:
        """SIGKILL the server: what survives is what the AOF had on disk."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        """Stop gracefully, killing it if it lingers."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the module; tests keep apart by namespace."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for one test, which may kill and restart it."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH (apt-get install redis-server)")
    server = RedisServer(tmp_path / "redis")
    server.dir.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=needs_redis)])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Builds unopened stores that all see the same data (one file, or one namespace)."""
    if request.param == "sqlite":
        path = str(tmp_path / "state.db")
        return lambda: SQLiteStore(path)
    server: RedisServer = request.getfixturevalue("redis_server")
    namespace = f"t{uuid.uuid4().hex[:10]}"
    return lambda: RedisStore(server.url, namespace=namespace)


# Store round trips


async def write_everything(store: Store) -> None:
    """One of every operator write, including replacements, deletes and no-ops."""
    await store.put_key(
        KeyRecord("k1", digest("s1"), "alice", "laptop", 1732250000.123456)
    )
    await store.put_key(
        KeyRecord("k2", digest("s2"), "svc", "service", 1.5, trusted=True)
    )
    await store.put_key(KeyRecord("k3", digest("s3"), "bob", "old", 2.0))
    await store.put_key(KeyRecord("k3", digest("s3b"), "bob", "new", 3.0))  # replaces
    await store.put_user(
        UserSettings("alice", vip=True, weight=3, limits={"rate": 2.5, "burst": 10})
    )
    await store.put_user(UserSettings("bob", boost=True))
    await store.put_user(UserSettings("carol"))
    await store.delete_user("carol")
    await store.delete_user("nobody")
    for user, blocked in [
        ("mallory", True),
        ("eve", True),
        ("eve", False),
        ("nobody", False),
    ]:
        await store.set_blocked_user(user, blocked)
    for ip, blocked in [
        ("10.0.0.0/8", True),
        ("192.0.2.7", True),
        ("2001:db8::/32", True),
        ("192.0.2.7", False),
    ]:
        await store.set_blocked_ip(ip, blocked)
    await store.put_backend(BackendRecord("http://a:1", slots=4))
    await store.put_backend(BackendRecord("http://b:2"))
    await store.put_backend(BackendRecord("http://a:1", slots=2))  # replaces
    await store.put_backend(BackendRecord("http://c:3"))
    await store.delete_backend("http://c:3")
    await store.set_meta("owner", "first")
    await store.set_meta("owner", "second")


async def check_everything(store: Store) -> None:
    """What `write_everything` must leave behind, as `load_all` and meta report it."""
    snap = await store.load_all()
    assert snap.keys == [
        KeyRecord(
            "k1", digest("s1"), "alice", "laptop", 1732250000.123456, revoked=True
        ),
        KeyRecord("k2", digest("s2"), "svc", "service", 1.5, trusted=True),
        KeyRecord("k3", digest("s3b"), "bob", "new", 3.0),
    ]
    assert snap.users == [
        UserSettings("alice", vip=True, weight=3, limits={"rate": 2.5, "burst": 10}),
        UserSettings("bob", boost=True),
    ]
    limits = snap.users[0].limits
    assert isinstance(limits["rate"], float) and isinstance(limits["burst"], int)
    assert snap.blocked_users == {"mallory"}
    assert snap.blocked_ips == {"10.0.0.0/8", "2001:db8::/32"}
    assert snap.backends == [
        BackendRecord("http://a:1", slots=2),
        BackendRecord("http://b:2"),
    ]
    assert await store.get_meta("owner") == "second"
    assert await store.get_meta("missing") is None
    assert await store.get_meta("schema_version") == str(SCHEMA_VERSION)


def test_a_meta_claim_is_won_once_whoever_claims_at_the_same_time(
        make_store: StoreFactory) -> None:
    # Budget alerts are marked with claim_meta: two replicas checking at the same
    # instant each read "no mark" before, and both alerted.
    async def body() -> None:
        stores = [make_store() for _ in range(3)]
        for store in stores:
            await store.open()
        try:
            won = await asyncio.gather(*(st.claim_meta("budget_alert:x", str(i))
                                         for i, st in enumerate(stores)))
            assert sorted(won) == [False, False, True]
            assert await stores[0].get_meta("budget_alert:x") == str(won.index(True))
            assert not await stores[1].claim_meta("budget_alert:x", "again")
            await stores[1].set_meta("owner", "x")
            assert not await stores[2].claim_meta("owner", "y")
        finally:
            for store in stores:
                await store.close()

    run(body())


def test_two_keepers_checking_at_once_alert_once(make_store: StoreFactory) -> None:
    from ollamamq_fast.accounting.keeper import UsageKeeper

    async def body() -> None:
        stores = [make_store(), make_store()]
        events: list[dict[str, Any]] = []
        keepers = []
        for store in stores:
            await store.open()
            keepers.append(UsageKeeper(
                store, flush=None, stats=None,  # type: ignore[arg-type]
                publish=lambda _kind, **event: events.append(event),
                limits_for=None, key_budgets={}, retention_days=0,  # type: ignore[arg-type]
                budgets_on=lambda: True))
        try:
            await asyncio.gather(*(k._check("user", "alice", "day", "2026-12-08", 95, 100)
                                   for k in keepers))
            assert [e["threshold"] for e in events] == [80]  # once, not once per replica
        finally:
            for store in stores:
                await store.close()

    run(body())


def test_round_trip_and_reopen(make_store: StoreFactory) -> None:
    async def body() -> None:
        store = make_store()
        await store.open()
        try:
            await write_everything(store)
            assert await store.revoke_key("k1") is True
            assert await store.revoke_key("k1") is True  # already revoked: still exists
            assert await store.revoke_key("missing") is False
            await check_everything(store)
        finally:
            await store.close()
        reopened = make_store()
        await reopened.open()
        try:
            await check_everything(reopened)
        finally:
            await reopened.close()

    run(body())


def test_usage_deltas_add_up(make_store: StoreFactory) -> None:
    odd = 'we"ird\x1f user'  # separators and quotes must not confuse the row key

    async def body() -> None:
        store = make_store()
        await store.open()
        try:
            await store.add_usage([])
            await store.add_usage(
                [
                    Usage("alice", "llama3", "2024-01-01", 1, 10, 20),
                    Usage(
                        "alice", "llama3", "2024-01-01", 2, 5, 5
                    ),  # same row twice in a batch
                    Usage("bob", "qwen", "2024-01-02", 1, 3, 4),
                ]
            )
            await store.add_usage(
                [
                    Usage("alice", "llama3", "2024-01-01", 1, 1, 1),
                    Usage("alice", "qwen", "2024-01-02", 1, 0, 7),
                    Usage(odd, "m:1", "2024-01-03", 4, 40, 400),
                ]
            )
            everything = await store.usage()
            assert everything == [
                Usage("alice", "llama3", "2024-01-01", 4, 16, 26),
                Usage("alice", "qwen", "2024-01-02", 1, 0, 7),
                Usage("bob", "qwen", "2024-01-02", 1, 3, 4),
                Usage(odd, "m:1", "2024-01-03", 4, 40, 400),
            ]
            assert await store.usage(user="alice") == everything[:2]
            assert await store.usage(since_day="2024-01-02") == everything[1:]
            assert await store.usage(user="bob", since_day="2024-01-03") == []
            assert await store.usage(user=odd) == everything[3:]
        finally:
            await store.close()

    run(body())


def test_a_name_no_utf8_writer_takes_is_stored_with_a_replacement(
        make_store: StoreFactory) -> None:
    # A lone surrogate (a client's `\ud800`) cannot be UTF-8: a batch holding one
    # failed and was retried forever, blocking every later usage write.
    lone = "m\ud800"

    async def body() -> None:
        store = make_store()
        await store.open()
        try:
            await store.add_usage([Usage("alice", lone, "2024-01-01", 1, 2, 3)],
                                  [UsageHour("2024-01-01T00", "alice", "", lone, "b", 1, 0, 0,
                                             0, 2, 3)])
            assert await store.usage() == [Usage("alice", "m\ufffd", "2024-01-01", 1, 2, 3)]
            hours = await store.usage_hours()
            assert [(h.model, h.prompt_tokens) for h in hours] == [("m\ufffd", 2)]
        finally:
            await store.close()

    run(body())


def test_schema_version_guards_newer_data(make_store: StoreFactory) -> None:
    async def body() -> None:
        store = make_store()
        await store.open()
        await store.set_meta("schema_version", str(SCHEMA_VERSION + 1))
        await store.close()
        with pytest.raises(StoreError, match="newer"):
            await make_store().open()

    run(body())


def test_incr_window_counts_and_expires(make_store: StoreFactory) -> None:
    async def body() -> None:
        store = make_store()
        await store.open()
        try:
            assert await store.incr_window("alice", 0.3, 1) == 1
            assert await store.incr_window("alice", 0.3, 2.5) == 3.5
            assert await store.incr_window("bob", 0.3, 1) == 1
            await asyncio.sleep(0.45)
            assert await store.incr_window("alice", 0.3, 1) == 1  # a new window
        finally:
            await store.close()

    run(body())


def test_local_windows_sweep_expired(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(windows_mod, "SWEEP_EVERY", 3)
    w = LocalWindows(clock=lambda: now[0])
    assert w.incr("a", 1.0, 1) == 1 and w.incr("b", 1.0, 1) == 1
    now[0] = 2.0
    assert w.incr("c", 1.0, 5) == 5  # third new window: sweeps a and b
    assert len(w) == 1
    assert w.incr("c", 1.0, 1) == 6


def test_open_store_picks_the_backend() -> None:
    default = open_store()
    assert isinstance(default, SQLiteStore) and default.path == DEFAULT_SQLITE_PATH
    custom = open_store(sqlite_path="/tmp/x.db")
    assert isinstance(custom, SQLiteStore) and custom.path == "/tmp/x.db"
    shared = open_store(
        sqlite_path="/tmp/x.db", redis_url="redis://127.0.0.1:1/0", namespace="gw"
    )
    assert isinstance(shared, RedisStore) and shared.namespace == "gw"
    assert all(isinstance(s, Store) for s in (default, custom, shared))


def test_sqlite_never_blocks_the_event_loop(tmp_path: Path) -> None:
    """Another process holds the write lock: the store waits on its thread, the loop runs on."""
    path = str(tmp_path / "state.db")

    async def body() -> None:
        store = SQLiteStore(path)
        await store.open()
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            write = asyncio.ensure_future(
                store.put_user(UserSettings("alice", vip=True))
            )
            # The write now waits up to BUSY_TIMEOUT_MS for the lock; on the loop's
            # thread that would freeze these 20 short sleeps for seconds.
            start = time.monotonic()
            for _ in range(20):
                await asyncio.sleep(0.01)
            assert time.monotonic() - start < 1.0
            assert not write.done()  # still waiting for the lock, on its own thread
            other.execute("COMMIT")
            await asyncio.wait_for(write, 5)
            assert (await store.load_all()).users == [UserSettings("alice", vip=True)]
        finally:
            other.close()
            await store.close()

    run(body())


# CIDR blocklist


def test_ip_blocklist_matching() -> None:
    b = IpBlocklist(
        ["10.1.2.3/8", "2001:db8::/32", "192.0.2.7", "::ffff:198.51.100.0/120"]
    )
    assert b.entries == {"10.0.0.0/8", "2001:db8::/32", "192.0.2.7", "198.51.100.0/24"}
    for ip in [
        "10.200.0.1",
        "2001:db8:ffff::1",
        "192.0.2.7",
        "::ffff:10.0.0.1",
        "198.51.100.77",
        "::ffff:192.0.2.7",
        "2001:DB8::1",
    ]:
        assert ip in b, ip
    for ip in ["11.0.0.1", "2001:db9::1", "192.0.2.8", "not-an-ip", "", "::1"]:
        assert ip not in b, ip
    assert b.discard("10.0.0.0/8") == {"10.0.0.0/8", "10.1.2.3/8"}
    assert "10.200.0.1" not in b
    assert canonical("10.0.0.1/32") == "10.0.0.1"
    with pytest.raises(ValueError):
        canonical("10.0.0.0/33")


networks4 = st.builds(
    lambda n, p: IPv4Network((n, p), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
networks6 = st.builds(
    lambda n, p: IPv6Network((n, p), strict=False),
    st.integers(0, 2**128 - 1),
    st.integers(0, 128),
)


def blocked_by_reference(
    addr: IPv4Address | IPv6Address, nets: list[IPv4Network | IPv6Network]
) -> bool:
    """The rule spelled out: the peer in its IPv4 form if mapped, against canonical networks."""
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    canon = [ip_network(canonical(str(n))) for n in nets]
    return any(addr.version == n.version and addr in n for n in canon)


@settings(max_examples=150, deadline=None)
@given(
    nets=st.lists(st.one_of(networks4, networks6), max_size=8),
    probes=st.lists(
        st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 2**128 - 1)), max_size=8
    ),
    drop=st.integers(0, 8),
)
def test_ip_blocklist_agrees_with_ipaddress(
    nets: list[IPv4Network | IPv6Network], probes: list[int], drop: int
) -> None:
    b = IpBlocklist(str(n) for n in nets)
    # Probe inside every network too, or random addresses would almost never hit.
    addrs = [ip_address(p) for p in probes] + [n.network_address for n in nets]
    for n in nets:  # and just past every network
        after = int(n.broadcast_address) + 1
        if after < 2**n.max_prefixlen:
            addrs.append(IPv4Address(after) if n.version == 4 else IPv6Address(after))
    for addr in addrs:
        assert (str(addr) in b) == blocked_by_reference(addr, nets), (addr, nets)
    kept, dropped = nets[drop:], nets[:drop]
    kept_keys = {canonical(str(n)) for n in kept}
    for n in dropped:
        if canonical(str(n)) not in kept_keys:
            b.discard(str(n))
    for addr in addrs:
        assert (str(addr) in b) == blocked_by_reference(addr, kept), (addr, kept)


def test_cache_cidr_blocks_persist(make_store: StoreFactory) -> None:
    async def body() -> None:
        seed = make_store()
        await seed.open()
        await seed.set_blocked_ip("172.16.9.9/12", True)  # a non-canonical spelling
        await seed.close()

        cache = StateCache(make_store(), flush_interval=60)
        await cache.start()
        assert cache.is_blocked_ip("172.20.0.1")
        cache.set_blocked_ip("10.1.2.3/8", True)
        cache.set_blocked_ip("2001:db8::/32", True)
        cache.set_blocked_ip("192.0.2.7", True)
        with pytest.raises(ValueError):
            cache.set_blocked_ip("nonsense", True)
        assert cache.is_blocked_ip("10.9.9.9") and cache.is_blocked_ip("2001:db8::42")
        assert cache.is_blocked_ip("192.0.2.7") and not cache.is_blocked_ip("192.0.2.8")
        cache.set_blocked_ip("172.16.0.0/12", False)  # removes the stored spelling too
        assert not cache.is_blocked_ip("172.20.0.1")
        await cache.stop()

        store = make_store()
        await store.open()
        try:
            snap = await store.load_all()
            assert snap.blocked_ips == {"10.0.0.0/8", "2001:db8::/32", "192.0.2.7"}
        finally:
            await store.close()

    run(body())


# The cache: write-behind, reads, usage


def test_cache_reads_its_writes_at_once_and_stores_them_on_flush(
    make_store: StoreFactory,
) -> None:
    async def body() -> None:
        cache = StateCache(make_store(), flush_interval=60)  # only explicit flushes
        observer = make_store()
        await cache.start()
        await observer.open()
        try:
            cache.put_key(KeyRecord("k1", digest("s1"), "alice", "laptop", 1.0))
            cache.put_user(UserSettings("alice", vip=True, limits={"rate": 1}))
            cache.set_blocked_user("mallory", True)
            cache.put_backend(BackendRecord("http://gpu:11434", slots=3))
            rec = cache.key_by_digest(digest("s1"))
            assert rec is not None and rec.user == "alice"
            assert cache.user("alice") == UserSettings(
                "alice", vip=True, limits={"rate": 1}
            )
            assert cache.is_blocked_user("mallory") and not cache.is_blocked_user(
                "alice"
            )
            assert cache.backends["http://gpu:11434"].slots == 3
            assert cache.pending == 4
            assert (await observer.load_all()).keys == []  # not written yet

            await cache.flush()
            assert cache.pending == 0
            snap = await observer.load_all()
            assert [k.key_id for k in snap.keys] == ["k1"] and snap.blocked_users == {
                "mallory"
            }

            # Replace the secret: the old digest stops working at once.
            cache.put_key(KeyRecord("k1", digest("s1-rotated"), "alice", "laptop", 2.0))
            assert cache.key_by_digest(digest("s1")) is None
            assert cache.key_by_digest(digest("s1-rotated")) is not None
            assert cache.revoke_key("k1") is True
            assert cache.revoke_key("missing") is False
            assert cache.key_by_digest(digest("s1-rotated")) is None
            assert cache.keys["k1"].revoked
            cache.delete_user("alice")
            cache.set_blocked_user("mallory", False)
            cache.delete_backend("http://gpu:11434")
            assert cache.user("alice") is None and not cache.is_blocked_user("mallory")
            assert cache.pending == 4  # the put and the revoke of k1 coalesced
            await cache.flush()
            snap = await observer.load_all()
            assert snap.keys == [
                KeyRecord("k1", digest("s1-rotated"), "alice", "laptop", 2.0, True)
            ]
            assert (
                snap.users == [] and snap.blocked_users == set() and snap.backends == []
            )
        finally:
            await observer.close()
            await cache.stop()

    run(body())


def test_cache_usage_aggregates_and_flushes_deltas(make_store: StoreFactory) -> None:
    async def body() -> None:
        cache = StateCache(make_store(), flush_interval=60)
        await cache.start()
        day = utc_day()
        for _ in range(3):
            cache.add_usage("alice", "llama3", 10, 100)
        cache.add_usage("bob", "llama3", 1, 2)
        assert cache.pending == 2  # summed in memory, one row per (user, model, day)
        await cache.flush()
        cache.add_usage("alice", "llama3", 5, 5)
        await cache.flush()
        await cache.flush()  # nothing queued: adds nothing
        assert await cache.store.usage() == [
            Usage("alice", "llama3", day, 4, 35, 305),
            Usage("bob", "llama3", day, 1, 1, 2),
        ]
        cache.add_usage("bob", "llama3", 1, 1)
        await cache.stop()  # stop flushes what is left

        store = make_store()
        await store.open()
        try:
            assert await store.usage(user="bob") == [
                Usage("bob", "llama3", day, 2, 2, 3)
            ]
        finally:
            await store.close()

    run(body())


def test_cache_usage_rolls_over_at_utc_midnight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    midnight = 1704067200.0  # 2024-01-01T00:00:00Z

    async def body() -> None:
        cache = StateCache(SQLiteStore(str(tmp_path / "state.db")), flush_interval=60)
        await cache.start()
        try:
            monkeypatch.setattr(time, "time", lambda: midnight - 1)
            cache.add_usage("alice", "m", 1, 1)
            monkeypatch.setattr(time, "time", lambda: midnight + 1)
            cache.add_usage("alice", "m", 2, 2)
            monkeypatch.undo()
            await cache.flush()
            assert await cache.store.usage() == [
                Usage("alice", "m", "2023-12-31", 1, 1, 1),
                Usage("alice", "m", "2024-01-01", 1, 2, 2),
            ]
        finally:
            monkeypatch.undo()
            await cache.stop()

    run(body())


def test_background_flusher_writes_within_the_interval(
    make_store: StoreFactory,
) -> None:
    async def body() -> None:
        cache = StateCache(make_store(), flush_interval=0.05)
        await cache.start()
        try:
            cache.put_user(UserSettings("alice", weight=5))
            cache.add_usage("alice", "m", 1, 1)
            await eventually(lambda: cache.pending == 0, timeout=2)
            assert (await cache.store.load_all()).users == [
                UserSettings("alice", weight=5)
            ]
        finally:
            await cache.stop()

    run(body())


class FlakyStore(SQLiteStore):
    """A SQLite store whose user and usage writes fail while `broken` is set."""

    broken = False

    async def put_user(self, s: UserSettings) -> None:
        """Fail like an unreachable store would, or write."""
        if self.broken:
            raise OSError("store unreachable")
        await super().put_user(s)

    async def add_usage(self, items: list[Usage], hours: Sequence[UsageHour] = ()) -> None:
        """Fail like an unreachable store would, or write."""
        if self.broken:
            raise OSError("store unreachable")
        await super().add_usage(items, hours)


def test_failed_flush_keeps_every_write_for_the_retry(tmp_path: Path) -> None:
    async def body() -> None:
        store = FlakyStore(str(tmp_path / "state.db"))
        cache = StateCache(store, flush_interval=0.05)
        await cache.start()
        try:
            store.broken = True
            cache.set_blocked_user("mallory", True)
            cache.put_user(UserSettings("alice", weight=2))
            cache.put_user(UserSettings("bob", vip=True))
            cache.add_usage("alice", "m", 10, 10)
            with pytest.raises(OSError):
                await cache.flush()
            assert (
                cache.pending == 3
            )  # the blocked user was written, then put_user failed
            cache.put_user(UserSettings("alice", weight=7))  # newer than the failed one
            cache.add_usage("alice", "m", 1, 1)
            await asyncio.sleep(
                0.3
            )  # the background flusher fails too, and keeps going
            assert cache.pending == 3
            store.broken = False
            await eventually(lambda: cache.pending == 0, timeout=3)
            snap = await store.load_all()
            assert snap.users == [
                UserSettings("alice", weight=7),
                UserSettings("bob", vip=True),
            ]
            assert snap.blocked_users == {"mallory"}
            assert await store.usage() == [Usage("alice", "m", utc_day(), 2, 11, 11)]
            # Usage alone failing: the deltas are added back, not lost or doubled.
            store.broken = True
            cache.add_usage("alice", "m", 100, 100)
            with pytest.raises(OSError):
                await cache.flush()
            cache.add_usage("alice", "m", 1, 1)
            store.broken = False
            await cache.flush()
            assert await store.usage() == [Usage("alice", "m", utc_day(), 4, 112, 112)]
        finally:
            await cache.stop()

    run(body())


class RefusingStore(FlakyStore):
    """A working SQLite store that refuses every write of one user (a value it cannot hold)."""

    refused = "poison"

    async def put_user(self, s: UserSettings) -> None:
        """Refuse the one user, like a store rejecting a value; write the rest."""
        if s.user == self.refused:
            raise ValueError("the store cannot hold this value")
        await super().put_user(s)


def test_a_write_the_working_store_keeps_refusing_is_dropped_not_retried_for_ever(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> None:
        store = RefusingStore(str(tmp_path / "state.db"))
        cache = StateCache(store, flush_interval=30)  # flushed by hand below
        await cache.start()
        try:
            cache.put_user(UserSettings("poison", weight=3))
            cache.put_user(UserSettings("alice", weight=2))
            cache.add_usage("alice", "m", 10, 10)
            # The refused write does not hold back the others or the usage.
            with pytest.raises(ValueError):
                await cache.flush()
            assert (await store.load_all()).users == [UserSettings("alice", weight=2)]
            assert await store.usage() == [Usage("alice", "m", utc_day(), 1, 10, 10)]
            assert cache.pending == 1 and cache.writes_dropped == 0
            # Refused again while the store takes other writes: dropped at the third.
            cache.add_usage("alice", "m", 1, 1)
            with pytest.raises(ValueError):
                await cache.flush()
            assert cache.pending == 1
            cache.put_user(UserSettings("bob", vip=True))
            with caplog.at_level(logging.ERROR, logger="ollamamq_fast.state"):
                await cache.flush()  # nothing left to retry: no error
            assert cache.pending == 0 and cache.writes_dropped == 1
            assert "refused the users write for 'poison' 3 times" in caplog.text
            assert cache.users["poison"].weight == 3  # the running gateway keeps it
            assert {u.user for u in (await store.load_all()).users} == {"alice", "bob"}
            # A store that is down is no proof of a refusal: nothing is dropped.
            cache.put_user(UserSettings("poison", weight=4))
            store.broken = True
            for _ in range(5):
                cache.add_usage("alice", "m", 1, 1)
                with pytest.raises((ValueError, OSError)):
                    await cache.flush()
            assert cache.writes_dropped == 1 and cache.pending == 2  # the write + a usage row
        finally:
            store.broken = False
            store.refused = ""
            await cache.stop()

    run(body())


# kill -9: what a flushed cache wrote survives the writer's (and Redis's) sudden death

CHILD = """
import asyncio, sys
from ollamamq_fast.state import BackendRecord, KeyRecord, StateCache, UserSettings, open_store

async def main() -> None:
    store = open_store(sqlite_path=sys.argv[1] or None, redis_url=sys.argv[2] or None,
                       namespace=sys.argv[3])
    cache = StateCache(store, flush_interval=0.05)
    await cache.start()
    cache.put_key(KeyRecord("k1", "d1", "alice", "laptop", 1.0))
    cache.put_user(UserSettings("alice", vip=True, limits={"rate": 1.5}))
    cache.set_blocked_user("mallory", True)
    cache.set_blocked_ip("10.0.0.0/8", True)
    cache.put_backend(BackendRecord("http://127.0.0.1:9", slots=2))
    for _ in range(5):
        cache.add_usage("alice", "llama3", 10, 20)
    await cache.store.set_meta("owner", "child")
    await cache.flush()
    # The second batch is left to the background flusher: flush_interval is 0.05 s.
    cache.put_key(KeyRecord("k2", "d2", "bob", "ci", 2.0))
    cache.add_usage("bob", "llama3", 1, 1)
    await asyncio.sleep(0.5)
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def run_and_kill_writer(sqlite_path: str, redis_url: str, namespace: str) -> None:
    """Run CHILD until it reports ready, then SIGKILL it: no shutdown code runs."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, sqlite_path, redis_url, namespace],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=str(REPO),
        env=env,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        line = proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            proc.kill()
            _, err = proc.communicate(timeout=5)
            raise AssertionError(
                f"writer did not get ready: {line!r} {err.decode()[-2000:]}"
            )
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(5) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


async def check_writer_state(store: Store) -> None:
    """What CHILD wrote before it was killed, as a fresh store reads it."""
    await store.open()
    try:
        snap = await store.load_all()
        assert [(k.key_id, k.user) for k in snap.keys] == [
            ("k1", "alice"),
            ("k2", "bob"),
        ]
        assert snap.users == [UserSettings("alice", vip=True, limits={"rate": 1.5})]
        assert snap.blocked_users == {"mallory"} and snap.blocked_ips == {"10.0.0.0/8"}
        assert snap.backends == [BackendRecord("http://127.0.0.1:9", slots=2)]
        assert await store.get_meta("owner") == "child"
        day = utc_day()
        assert await store.usage() == [
            Usage("alice", "llama3", day, 5, 50, 100),
            Usage("bob", "llama3", day, 1, 1, 1),
        ]
    finally:
        await store.close()


def test_sqlite_survives_kill_9(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    run_and_kill_writer(path, "", "ollamamq")
    run(check_writer_state(SQLiteStore(path)))


def test_redis_survives_kill_9_of_writer_and_server(own_redis: RedisServer) -> None:
    run_and_kill_writer("", own_redis.url, "crash")
    own_redis.kill()
    own_redis.start()  # replays the AOF
    run(check_writer_state(RedisStore(own_redis.url, namespace="crash")))


# Replicas sharing one Redis


@needs_redis
def test_replicas_see_each_others_changes(redis_server: RedisServer) -> None:
    namespace = f"t{uuid.uuid4().hex[:10]}"

    async def body() -> None:
        a = StateCache(RedisStore(redis_server.url, namespace), flush_interval=0.02)
        b = StateCache(RedisStore(redis_server.url, namespace), flush_interval=0.02)
        seen_a: list[str] = []
        seen_b: list[str] = []
        a.on_change, b.on_change = seen_a.append, seen_b.append
        await a.start()
        await b.start()
        try:
            a.put_key(KeyRecord("k1", digest("s1"), "alice", "laptop", 1.0))
            await eventually(lambda: b.key_by_digest(digest("s1")) is not None)
            a.set_blocked_ip("10.0.0.0/8", True)
            a.set_blocked_user("mallory", True)
            await eventually(
                lambda: b.is_blocked_ip("10.1.1.1") and b.is_blocked_user("mallory")
            )
            a.put_user(UserSettings("alice", vip=True))
            await eventually(lambda: b.user("alice") == UserSettings("alice", vip=True))
            a.put_backend(BackendRecord("http://gpu:1", slots=1))
            await eventually(lambda: "http://gpu:1" in b.backends)
            assert a.revoke_key("k1")
            await eventually(lambda: b.key_by_digest(digest("s1")) is None)
            b.delete_user("alice")  # and the other way round
            b.set_blocked_ip("10.0.0.0/8", False)
            await eventually(
                lambda: a.user("alice") is None and not a.is_blocked_ip("10.1.1.1")
            )
            assert {"keys", "users", "blocks", "backends"} <= set(seen_b)
            assert set(seen_a) == {"users", "blocks"}  # never told of its own writes
        finally:
            await a.stop()
            await b.stop()

    run(body())


@needs_redis
def test_reload_keeps_local_writes_not_yet_flushed(redis_server: RedisServer) -> None:
    namespace = f"t{uuid.uuid4().hex[:10]}"

    async def body() -> None:
        a = StateCache(RedisStore(redis_server.url, namespace), flush_interval=0.02)
        b = StateCache(RedisStore(redis_server.url, namespace), flush_interval=60)
        await a.start()
        await b.start()
        try:
            b.put_user(UserSettings("bob", weight=9))  # queued in b, not stored yet
            a.put_user(UserSettings("alice", vip=True))
            await eventually(lambda: b.user("alice") is not None)  # b reloaded "users"
            assert b.user("bob") == UserSettings("bob", weight=9)
            await b.flush()
            await eventually(lambda: a.user("bob") is not None)
        finally:
            await a.stop()
            await b.stop()

    run(body())


@needs_redis
def test_incr_window_is_shared_across_replicas(redis_server: RedisServer) -> None:
    namespace = f"t{uuid.uuid4().hex[:10]}"

    async def body() -> None:
        a = StateCache(RedisStore(redis_server.url, namespace))
        b = StateCache(RedisStore(redis_server.url, namespace))
        await a.start()
        await b.start()
        try:
            assert await a.incr_window("rate:alice", 5, 1) == 1
            assert await b.incr_window("rate:alice", 5, 2) == 3
            assert await a.incr_window("rate:alice", 5, 0.5) == 3.5
            assert await b.incr_window("rate:bob", 5, 1) == 1
        finally:
            await a.stop()
            await b.stop()

    run(body())


def test_replicas_resync_after_redis_restarts(own_redis: RedisServer) -> None:
    async def body() -> None:
        a = StateCache(RedisStore(own_redis.url, "ha"), flush_interval=0.02)
        b = StateCache(RedisStore(own_redis.url, "ha"), flush_interval=0.02)
        await a.start()
        await b.start()
        try:
            # A change nobody announces, like one published while b was disconnected:
            # only the resync after b's subscription comes back can pick it up.
            raw = aioredis.Redis.from_url(own_redis.url)
            await raw.hset("ha:users", "carol", b'{"user": "carol", "weight": 4}')
            await raw.aclose()
            own_redis.kill()
            a.set_blocked_user("mallory", True)  # queued while Redis is down
            await asyncio.sleep(0.3)
            assert b.user("carol") is None
            own_redis.start()
            await eventually(lambda: b.is_blocked_user("mallory"), timeout=10)
            await eventually(
                lambda: b.user("carol") == UserSettings("carol", weight=4), timeout=10
            )
            assert a.pending == 0
        finally:
            await a.stop()
            await b.stop()

    run(body(), timeout=30)


@needs_redis
def test_a_redis_back_without_its_data_is_reported(
        own_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    # Restarted without its data (no persistence, a flush, an empty replica):
    # every key, user and block is gone, and the replicas follow the empty
    # store. That used to happen without a word; now it is an error in the log.
    async def body() -> None:
        a = StateCache(RedisStore(own_redis.url, "wp"), flush_interval=0.02)
        await a.start()
        try:
            a.set_blocked_user("mallory", True)
            await a.flush()
            own_redis.kill()
            shutil.rmtree(own_redis.dir)
            own_redis.dir.mkdir()
            own_redis.start()
            await eventually(lambda: "came back without the gateway's data" in caplog.text,
                             timeout=10)
            # A plain restart (the data kept) says nothing of the kind. A record
            # nobody announced shows once the resync after the check has run.
            caplog.clear()
            raw = aioredis.Redis.from_url(own_redis.url)
            try:
                await raw.hset("wp:users", "probe", b'{"user": "probe"}')
            finally:
                await raw.aclose()
            own_redis.kill()
            own_redis.start()
            await eventually(lambda: a.user("probe") is not None, timeout=10)
            assert "without the gateway's data" not in caplog.text
        finally:
            await a.stop()

    with caplog.at_level(logging.WARNING, logger="ollamamq_fast.state"):
        run(body(), timeout=30)


@needs_redis
def test_stop_with_redis_hung_ends_and_says_what_is_lost(
        own_redis: RedisServer, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Redis stops answering (SIGSTOP: a partition looks the same) with a write
    # pending: the last flush at stop used to wait for it forever, so a SIGTERM
    # never ended, and a Redis that refused it raised out of the gateway's stop
    # (a traceback, exit 1). Now stop gives up after STOP_FLUSH_S and logs it.
    import ollamamq_fast.state.cache as cache_mod

    monkeypatch.setattr(cache_mod, "STOP_FLUSH_S", 0.5, raising=False)

    async def body() -> None:
        a = StateCache(RedisStore(own_redis.url, "hung"), flush_interval=60)
        await a.start()
        assert own_redis.proc is not None
        own_redis.proc.send_signal(signal.SIGSTOP)
        try:
            a.set_blocked_user("mallory", True)
            start = time.monotonic()
            await a.stop()
            assert time.monotonic() - start < 3
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        # Refused rather than hung (Redis gone): the same, no exception out of stop.
        b = StateCache(RedisStore(own_redis.url, "hung"), flush_interval=60)
        await b.start()
        own_redis.kill()
        b.set_blocked_user("eve", True)
        await b.stop()

    with caplog.at_level(logging.ERROR, logger="ollamamq_fast.state"):
        run(body(), timeout=20)
    assert caplog.text.count("the store is unavailable at stop") == 2, caplog.text


def test_records_are_plain_slotted_dataclasses() -> None:
    for cls in (KeyRecord, UserSettings, BackendRecord, Usage):
        assert dataclasses.is_dataclass(cls) and hasattr(cls, "__slots__")


# Hourly usage (issue 15: usage an operator can see)


def test_hourly_usage_round_trip_and_prune(make_store: StoreFactory) -> None:
    odd = 'we"ird\x1f user'

    async def body() -> None:
        store = make_store()
        await store.open()
        try:
            await store.add_usage([], [
                UsageHour("2024-01-01T09", "alice", "k1", "llama3", "http://b1", 1, 0, 0, 1, 10, 20),
                UsageHour("2024-01-01T09", "alice", "k1", "llama3", "http://b1", 2, 1, 1, 0, 5, 5),
                UsageHour("2024-01-01T10", odd, "", "m:1", "", 1, 1, 0, 0, 0, 0),
            ])
            await store.add_usage([Usage("bob", "qwen", "2024-01-03", 1, 3, 4)], [
                UsageHour("2024-01-03T00", "bob", "k2", "qwen", "http://b2", 1, 0, 0, 0, 3, 4),
            ])
            everything = await store.usage_hours()
            assert everything == [
                UsageHour("2024-01-01T09", "alice", "k1", "llama3", "http://b1", 3, 1, 1, 1, 15, 25),
                UsageHour("2024-01-01T10", odd, "", "m:1", "", 1, 1, 0, 0, 0, 0),
                UsageHour("2024-01-03T00", "bob", "k2", "qwen", "http://b2", 1, 0, 0, 0, 3, 4),
            ]
            assert await store.usage() == [Usage("bob", "qwen", "2024-01-03", 1, 3, 4)]
            assert await store.usage_hours("2024-01-01T10", "2024-01-03T00") == everything[1:2]
            assert await store.usage_hours(since_hour="2024-01-02") == everything[2:]
            assert await store.usage_hours(until_hour="2024-01-01T10") == everything[:1]
            assert await store.prune_usage_hours("2024-01-02T00") == 2
            assert await store.usage_hours() == everything[2:]
            assert await store.prune_usage_hours("2024-01-02T00") == 0
        finally:
            await store.close()

    run(body())


def test_cache_counts_hourly_usage_with_outcomes(tmp_path: Path) -> None:
    async def body() -> None:
        cache = StateCache(SQLiteStore(str(tmp_path / "state.db")), flush_interval=30)
        await cache.start()
        try:
            cache.add_usage("alice", "m", 10, 20, key="k1", backend="http://b")
            cache.add_usage("alice", "m", 0, 5, key="k1", backend="http://b",
                            cancelled=True, estimated=True)
            cache.add_usage("alice", "m", 0, 0, key="k1", error=True)
            await cache.flush()
            rows = await cache.store.usage_hours()
            hour = rows[0].hour
            assert rows == [
                UsageHour(hour, "alice", "k1", "m", "", 1, 1, 0, 0, 0, 0),
                UsageHour(hour, "alice", "k1", "m", "http://b", 2, 0, 1, 5, 10, 25),
            ]
            assert await cache.store.usage() == [Usage("alice", "m", utc_day(), 3, 10, 25)]
        finally:
            await cache.stop()

    run(body())


def test_usage_of_a_failed_write_is_added_back_and_merged(tmp_path: Path) -> None:
    class FailingOnce(SQLiteStore):
        failed = False

        async def add_usage(self, items: list[Usage], hours: Sequence[UsageHour] = ()) -> None:
            if not self.failed:
                self.failed = True
                raise OSError("disk full")
            await super().add_usage(items, hours)

    async def body() -> None:
        cache = StateCache(FailingOnce(str(tmp_path / "state.db")), flush_interval=30)
        await cache.start()
        try:
            cache.add_usage("alice", "m", 10, 20, key="k", backend="http://b", estimated=True)
            with pytest.raises(OSError):
                await cache.flush()
            cache.add_usage("alice", "m", 1, 2, key="k", backend="http://b", error=True)
            cache.add_usage("alice", "m", 0, 0, key="k", backend="http://b", cancelled=True)
            await cache.flush()
            hour = (await cache.store.usage_hours())[0].hour
            assert await cache.store.usage_hours() == [
                UsageHour(hour, "alice", "k", "m", "http://b", 3, 1, 1, 30, 11, 22)]
            assert await cache.store.usage() == [Usage("alice", "m", utc_day(), 3, 11, 22)]
        finally:
            await cache.stop()

    run(body())


V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE usage (
    user TEXT NOT NULL, model TEXT NOT NULL, day TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0, prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user, model, day)) WITHOUT ROWID;
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO usage VALUES ('alice', 'llama3', '2024-01-01', 3, 30, 300);
"""


def test_sqlite_v1_database_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    path = str(tmp_path / "old.db")
    db = sqlite3.connect(path)
    db.executescript(V1_SCHEMA)
    db.close()

    async def body() -> None:
        store = SQLiteStore(path)
        await store.open()
        try:
            assert await store.get_meta("schema_version") == str(SCHEMA_VERSION)
            assert await store.usage_hours() == [
                UsageHour("2024-01-01T00", "alice", "", "llama3", "", 3, 0, 0, 0, 30, 300)]
            assert await store.usage() == [Usage("alice", "llama3", "2024-01-01", 3, 30, 300)]
        finally:
            await store.close()
        reopened = SQLiteStore(path)  # migrating again must not add the rows twice
        await reopened.open()
        try:
            assert len(await reopened.usage_hours()) == 1
        finally:
            await reopened.close()

    run(body())


@needs_redis
def test_redis_v1_usage_is_migrated(redis_server: RedisServer) -> None:
    namespace = f"t{uuid.uuid4().hex[:10]}"

    async def body() -> None:
        r = aioredis.Redis.from_url(redis_server.url)
        try:
            await r.hset(f"{namespace}:meta", "schema_version", "1")
            await r.hset(f"{namespace}:usage:2024-01-01",
                         mapping={b"r" + b'["alice","llama3"]': 3,
                                  b"p" + b'["alice","llama3"]': 30,
                                  b"c" + b'["alice","llama3"]': 300})
            await r.zadd(f"{namespace}:usage:days", {"2024-01-01": 0})
        finally:
            await r.aclose()
        for _ in range(2):  # a second open must not migrate again
            store = RedisStore(redis_server.url, namespace=namespace)
            await store.open()
            try:
                assert await store.get_meta("schema_version") == str(SCHEMA_VERSION)
                assert await store.usage_hours() == [
                    UsageHour("2024-01-01T00", "alice", "", "llama3", "", 3, 0, 0, 0, 30, 300)]
            finally:
                await store.close()

    run(body())
