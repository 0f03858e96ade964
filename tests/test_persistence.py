"""Operator state through the gateway: survives a restart (SQLite) and is shared
by replicas on one Redis."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from harness import fast_sim_options, start_stack
from test_state import REDIS_SERVER, RedisServer

BODY = {"model": "llama3.2", "prompt": "q", "stream": False}


def _wait(pred, timeout: float = 3.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_operator_state_survives_restart(tmp_path: Path) -> None:
    db = str(tmp_path / "gw.db")
    extra = start_stack(sims=[fast_sim_options()])  # a backend added at runtime
    runtime_url = extra.sims[0].url
    try:
        st = start_stack(sims=[fast_sim_options()], state_path=db, auth="keys")
        op = st.state.operator
        secret = st.lt.call(op.create_key, "alice")["secret"]
        st.lt.call(op.block_user, "mallory", True)
        st.lt.call(op.block_ip, "203.0.113.0/24", True)
        st.lt.call(op.set_user, "boss", True, None, 4)
        st.lt.call(op.add_backend, runtime_url, 3)
        st.lt.run(st.state.cache.flush())
        st.close()

        st = start_stack(sims=[fast_sim_options()], state_path=db, auth="keys")
        try:
            r = httpx.post(st.url + "/api/generate", json=BODY,
                           headers={"Authorization": f"Bearer {secret}"})
            assert r.status_code == 200
            op = st.state.operator
            assert op.list_blocked() == {"users": ["mallory"], "ips": ["203.0.113.0/24"],
                                         "total_users": 1, "total_ips": 1}
            queue = st.state.dispatcher.queue
            assert queue.is_vip("boss") and queue.weight("boss") == 4
            restored = st.state.fleet.find(runtime_url)
            assert restored is not None and restored.slots == 3
        finally:
            st.close()
    finally:
        extra.close()


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH")
def test_two_replicas_share_keys_blocks_and_users(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.dir.mkdir()
    server.start()
    try:
        a = start_stack(sims=[fast_sim_options()], redis_url=server.url, auth="keys")
        b = start_stack(sims=[fast_sim_options()], redis_url=server.url, auth="keys")
        try:
            secret = a.lt.call(a.state.operator.create_key, "carol")["secret"]
            auth = {"Authorization": f"Bearer {secret}"}
            assert _wait(lambda: httpx.post(b.url + "/api/generate", json=BODY,
                                            headers=auth).status_code == 200)
            b.lt.call(b.state.operator.block_user, "carol", True)
            assert _wait(lambda: httpx.post(a.url + "/api/generate", json=BODY,
                                            headers=auth).status_code == 403)
            a.lt.call(a.state.operator.set_user, "dave", None, True, 2)
            queue_b = b.state.dispatcher.queue
            assert _wait(lambda: queue_b.is_boost("dave") and queue_b.weight("dave") == 2)
        finally:
            a.close()
            b.close()
    finally:
        server.stop()
