"""Key scopes (issue 14): model management needs the `models` scope.

Any ordinary key could pull, push, create, copy and delete models and upload
blobs. Keys now carry scopes; new keys get `inference` only, keys stored
before scopes existed keep working for inference, and a management route
without the scope is refused with 403 in the route's error shape before
anything reaches a backend.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from harness import Stack, start_stack
from test_state import REDIS_SERVER, RedisServer
from test_traps import FakeBackend

from ollamamq_fast.cli import main as cli_main
from ollamamq_fast.policy.identity import Identity, ScopeError, scope_for
from ollamamq_fast.state.records import KeyRecord, key_digest
from ollamamq_fast.state.redis_store import RedisStore
from ollamamq_fast.state.sqlite import SQLiteStore
from ollamamq_fast.state.store import Store

TOKEN = "t0k"
BLOB = "/api/blobs/sha256:" + "ab" * 32
MANAGEMENT = [("POST", "/api/pull", {"model": "fake"}), ("DELETE", "/api/delete", {"model": "fake"}),
              ("POST", "/api/copy", {"source": "fake", "destination": "x"}),
              ("POST", "/api/create", {"model": "x", "from": "fake"}),
              ("POST", "/api/push", {"model": "fake"}), ("POST", BLOB, None)]


def test_scope_of_each_path() -> None:
    for _, path, _ in MANAGEMENT:
        assert scope_for(path.encode()) == "models"
    for path in (b"/api/chat", b"/api/generate", b"/api/show", b"/v1/chat/completions",
                 b"/api/embed", b"/custom/unknown"):
        assert scope_for(path) == "inference"


def test_identity_checks_the_scope() -> None:
    plain = KeyRecord("k1", key_digest("s1"), "alice", "", 0.0)
    admin = KeyRecord("k2", key_digest("s2"), "ops", "", 0.0, scopes=("inference", "models"))
    keys = {r.digest: r for r in (plain, admin)}
    ident = Identity("keys", [], keys.get)
    assert ident.user_for_key(b"Bearer s1", b"", "", b"/api/chat") == "alice"
    with pytest.raises(ScopeError) as err:
        ident.user_for_key(b"Bearer s1", b"", "", b"/api/pull")
    assert err.value.status == 403 and "models" in str(err.value)
    assert ident.user_for_key(b"", b"s2", "", b"/api/pull") == "ops"
    assert ident.authenticate(b"Bearer s2", b"", "").scopes == ("inference", "models")


@pytest.fixture(scope="module")
def keyed() -> Iterator[tuple[Stack, FakeBackend, str, str]]:
    backend = FakeBackend()
    st = start_stack(sims=[], extra_backends=[backend.url], auth="keys", health_interval=3600.0,
                     admin_port=0, admin_token=TOKEN)
    op = st.state.operator
    plain = st.lt.call(op.create_key, "alice")["secret"]
    manager = st.lt.call(op.create_key, "ops", "", False, ("inference", "models"))["secret"]
    yield st, backend, plain, manager
    st.close()
    backend.close()


@pytest.mark.parametrize(("method", "path", "body"), MANAGEMENT)
def test_management_needs_the_models_scope(keyed: tuple[Stack, FakeBackend, str, str],
                                           method: str, path: str,
                                           body: dict[str, str] | None) -> None:
    st, backend, plain, manager = keyed
    before = len(backend.requests)
    kwargs = {"json": body} if body is not None else {"content": b"\0" * 10}
    r = httpx.request(method, st.url + path, headers={"Authorization": f"Bearer {plain}"},
                      timeout=10, **kwargs)  # type: ignore[arg-type]
    assert r.status_code == 403, r.text
    assert "'models' scope" in r.json()["error"]
    assert len(backend.requests) == before
    r = httpx.request(method, st.url + path, headers={"Authorization": f"Bearer {manager}"},
                      timeout=10, **kwargs)  # type: ignore[arg-type]
    assert r.status_code == 200, r.text
    assert len(backend.requests) == before + 1


def test_inference_keys_still_infer(keyed: tuple[Stack, FakeBackend, str, str]) -> None:
    st, _, plain, _ = keyed
    r = httpx.post(st.url + "/api/chat", headers={"Authorization": f"Bearer {plain}"},
                   json={"model": "fake", "messages": [], "stream": False}, timeout=10)
    assert r.status_code == 200
    r = httpx.post(st.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {plain}"},
                   json={"model": "fake", "messages": []}, timeout=10)
    assert r.status_code == 200


def test_admin_api_and_cli_create_and_show_scopes(
        keyed: tuple[Stack, FakeBackend, str, str], capsys: pytest.CaptureFixture[str]) -> None:
    st = keyed[0]
    admin = f"http://127.0.0.1:{st.gateway.admin_port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.post(admin + "/api/keys", json={"user": "carol"}, headers=auth)
    assert r.status_code == 201 and r.json()["scopes"] == ["inference"]
    r = httpx.post(admin + "/api/keys", json={"user": "dave", "scopes": ["models", "inference"]},
                   headers=auth)
    assert r.json()["scopes"] == ["inference", "models"]
    key_id = r.json()["key_id"]
    for bad in (["admin"], [], "models", [1]):
        r = httpx.post(admin + "/api/keys", json={"user": "eve", "scopes": bad}, headers=auth)
        assert r.status_code == 400, bad
    r = httpx.patch(admin + f"/api/keys/{key_id}", json={"scopes": ["inference"]}, headers=auth)
    assert r.status_code == 200 and r.json()["scopes"] == ["inference"]
    assert httpx.patch(admin + "/api/keys/nope", json={"scopes": ["models"]},
                       headers=auth).status_code == 404
    listed = {k["key_id"]: k for k in httpx.get(admin + "/api/keys", headers=auth).json()["keys"]}
    assert listed[key_id]["scopes"] == ["inference"]
    common = ["--admin", admin, "--token", TOKEN]
    assert cli_main(["keys", "create", "--user", "frank", "--scopes", "inference,models",
                     *common]) == 0
    assert "inference,models" in capsys.readouterr().out
    assert cli_main(["keys", "scopes", key_id, "models", *common]) == 0
    assert cli_main(["keys", "list", *common]) == 0
    out = capsys.readouterr().out
    assert "SCOPES" in out and "inference,models" in out
    assert cli_main(["keys", "create", "--user", "gil", "--scopes", "root", *common]) == 1


def test_keys_stored_before_scopes_keep_inference(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:  # the api_keys table as it was before scopes
        conn.execute("CREATE TABLE api_keys (key_id TEXT PRIMARY KEY, digest TEXT NOT NULL,"
                     " user TEXT NOT NULL, name TEXT NOT NULL, created_at REAL NOT NULL,"
                     " revoked INTEGER NOT NULL DEFAULT 0, trusted INTEGER NOT NULL DEFAULT 0)"
                     " WITHOUT ROWID")
        conn.execute("INSERT INTO api_keys VALUES ('k1', ?, 'alice', 'old', 1.0, 0, 0)",
                     (key_digest("s1"),))

    async def load() -> list[KeyRecord]:
        store = SQLiteStore(str(db))
        await store.open()
        try:
            return (await store.load_all()).keys
        finally:
            await store.close()

    (key,) = asyncio.run(load())
    assert key.user == "alice" and key.scopes == ("inference",)


def _round_trip(store: Store) -> list[KeyRecord]:
    async def run() -> list[KeyRecord]:
        await store.open()
        try:
            await store.put_key(KeyRecord("k1", "d1", "a", "", 1.0))
            await store.put_key(KeyRecord("k2", "d2", "b", "", 1.0, scopes=("inference",
                                                                             "models")))
            await store.put_key(KeyRecord("k3", "d3", "c", "", 1.0, scopes=("models",)))
            return (await store.load_all()).keys
        finally:
            await store.close()

    return asyncio.run(run())


def test_scopes_persist_in_sqlite(tmp_path: Path) -> None:
    keys = _round_trip(SQLiteStore(str(tmp_path / "s.db")))
    assert [k.scopes for k in keys] == [("inference",), ("inference", "models"), ("models",)]


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH")
def test_scopes_persist_in_redis(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        keys = _round_trip(RedisStore(server.url, namespace=f"t{uuid.uuid4().hex[:8]}"))
    finally:
        server.stop()
    assert [k.scopes for k in keys] == [("inference",), ("inference", "models"), ("models",)]
