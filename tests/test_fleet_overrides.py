"""Runtime changes to the fleet are overrides of the configured list (issue 16, part 1).

- A backend removed on one replica is removed on every replica (Redis), and a
  configured backend stays removed after a restart.
- Slots changed at runtime on a configured backend survive a restart, and
  /api/backends shows them as an override of the configured value.
- DELETE /api/backends/override puts the configured entry back.
- A config reload does not bring back a backend removed at runtime.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from harness import Stack, fast_sim_options, start_stack
from test_state import REDIS_SERVER, RedisServer
from test_traps import wait_for

TOKEN = "t0k"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _urls(st: Stack) -> set[str]:
    return {b["url"] for b in st.lt.call(st.state.operator.list_backends)}


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH")
def test_removal_on_one_replica_applies_on_the_others(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.dir.mkdir()
    server.start()
    shared = start_stack(sims=[fast_sim_options(), fast_sim_options()])
    configured, runtime = shared.sims[0].url, shared.sims[1].url
    try:
        a = start_stack(sims=[fast_sim_options()], extra_backends=[configured],
                        redis_url=server.url)
        b = start_stack(sims=[fast_sim_options()], extra_backends=[configured],
                        redis_url=server.url)
        try:
            # A runtime backend added on A reaches B; removed on A, it leaves B.
            a.lt.call(a.state.operator.add_backend, runtime, 2)
            assert wait_for(lambda: runtime in _urls(b))
            a.lt.call(a.state.operator.remove_backend, runtime)
            assert wait_for(lambda: runtime not in _urls(b)), _urls(b)
            # A configured backend removed on B leaves A too (the defect: A kept it).
            b.lt.call(b.state.operator.remove_backend, configured)
            assert wait_for(lambda: configured not in _urls(a)), _urls(a)
            assert a.lt.call(a.state.operator.removed_backends) == [configured]
        finally:
            a.close()
        # A replica started afterwards with the same configured list honours the removal.
        c = start_stack(sims=[fast_sim_options()], extra_backends=[configured],
                        redis_url=server.url)
        try:
            assert configured not in _urls(c)
            # Re-adding it on C clears the removal everywhere.
            c.lt.call(c.state.operator.add_backend, configured, None)
            assert wait_for(lambda: configured in _urls(b))
            assert b.lt.call(b.state.operator.removed_backends) == []
        finally:
            c.close()
            b.close()
    finally:
        shared.close()
        server.stop()


def test_runtime_changes_to_configured_backends_survive_restart(tmp_path: Path) -> None:
    db = str(tmp_path / "gw.db")
    other = start_stack(sims=[fast_sim_options()])
    gone = other.sims[0].url
    try:
        st = start_stack(extra_backends=[gone], state_path=db, admin_port=0, admin_token=TOKEN)
        kept = st.sims[0].url
        st.lt.call(st.state.operator.set_slots, kept, 7)
        st.lt.call(st.state.operator.remove_backend, gone)
        st.lt.run(st.state.cache.flush())
        st.close()

        st = start_stack(extra_backends=[gone], state_path=db, admin_port=0, admin_token=TOKEN,
                         sims=[fast_sim_options()])
        try:
            # The new simulator has another port: re-point the override at it.
            kept = st.sims[0].url
            st.lt.call(st.state.operator.set_slots, kept, 7)
            assert gone not in _urls(st)
            admin = f"http://127.0.0.1:{st.gateway.admin_port}"
            answer = httpx.get(admin + "/api/backends", headers=AUTH).json()
            assert answer["removed"] == [gone]
            row = next(r for r in answer["backends"] if r["url"] == kept)
            assert row["source"] == "config" and row["configured_slots"] == 4
            assert row["slots"] == 7 and row["override"] == {"slots": 7}
            # Dropping the override puts the configured entry back.
            r = httpx.delete(admin + "/api/backends/override", params={"url": gone}, headers=AUTH)
            assert r.status_code == 200 and r.json()["url"] == gone
            assert gone in _urls(st)
            r = httpx.delete(admin + "/api/backends/override", params={"url": kept}, headers=AUTH)
            assert r.status_code == 200 and r.json()["slots"] == 4
            r = httpx.delete(admin + "/api/backends/override", params={"url": kept}, headers=AUTH)
            assert r.status_code == 404 and "no runtime override" in r.json()["error"]
            answer = httpx.get(admin + "/api/backends", headers=AUTH).json()
            assert answer["removed"] == []
            assert all(r["override"] is None for r in answer["backends"])
        finally:
            st.close()
    finally:
        other.close()


def test_slots_override_survives_restart_same_urls(tmp_path: Path) -> None:
    db = str(tmp_path / "gw.db")
    backend = start_stack(sims=[fast_sim_options()])
    url = backend.sims[0].url
    try:
        st = start_stack(sims=[], extra_backends=[url], state_path=db)
        st.lt.call(st.state.operator.set_slots, url, 9)
        st.lt.run(st.state.cache.flush())
        st.close()
        st = start_stack(sims=[], extra_backends=[url], state_path=db)
        try:
            found = st.state.fleet.find(url)
            assert found is not None and found.slots == 9
            row = st.lt.call(st.state.operator.list_backends)[0]
            assert row["override"] == {"slots": 9} and row["configured_slots"] == 4
            # Setting the configured value again clears the override.
            st.lt.call(st.state.operator.set_slots, url, 4)
            assert st.lt.call(st.state.operator.list_backends)[0]["override"] is None
        finally:
            st.close()
    finally:
        backend.close()


def test_reload_keeps_a_runtime_removal(tmp_path: Path) -> None:
    backend = start_stack(sims=[fast_sim_options(), fast_sim_options()])
    one, two = backend.sims[0].url, backend.sims[1].url
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'backends = ["{one}", "{two}"]\nslots = 3\n')
    try:
        st = start_stack(sims=[], extra_backends=[one, two], config_path=str(cfg),
                         state_path=str(tmp_path / "gw.db"))
        try:
            st.lt.call(st.state.operator.remove_backend, two)
            st.lt.call(st.state.operator.set_slots, one, 5)
            changes = st.lt.call(st.gateway.reload)
            assert changes["added"] == [] and two not in _urls(st)
            found = st.state.fleet.find(one)
            assert found is not None and found.slots == 5  # the override wins over the file
            st.lt.call(st.state.operator.reset_backend, one)
            assert found.slots == 3  # the file's value once the override is dropped
        finally:
            st.close()
    finally:
        backend.close()


def test_cli_shows_overrides_and_resets_them(capsys: pytest.CaptureFixture[str]) -> None:
    from ollamamq_fast.cli import main as cli_main

    other = start_stack(sims=[fast_sim_options()])
    gone = other.sims[0].url
    st = start_stack(extra_backends=[gone], admin_port=0, admin_token=TOKEN)
    try:
        kept = st.sims[0].url
        admin = ["--admin", f"http://127.0.0.1:{st.gateway.admin_port}", "--token", TOKEN]

        def cli(*argv: str) -> str:
            capsys.readouterr()
            assert cli_main([*argv, *admin]) == 0
            return capsys.readouterr().out

        cli("backends", "slots", kept, "6")
        cli("backends", "remove", gone)
        out = cli("backends", "list")
        row = next(line for line in out.splitlines() if line.startswith(kept))
        assert "6 (config 4)" in row
        assert out.splitlines()[-1].endswith(gone) and "removed at runtime" in out
        out = cli("backends", "reset", gone)
        assert gone in out and gone in _urls(st)
        out = cli("backends", "reset", kept)
        row = next(line for line in out.splitlines() if line.startswith(kept))
        assert row.split()[3] == "4"
    finally:
        st.close()
        other.close()


def test_a_backend_removed_and_added_again_mid_request_keeps_that_requests_slot() -> None:
    # Removed at run time while a request ran there, then added again: the
    # request still holds one of the server's slots. A new record with no
    # request in flight sent a second one to a one-slot server (llama-cpp-python
    # cuts its running stream then).
    import threading

    from harness import wait_until

    st = start_stack(sims=[fast_sim_options(tokens=100, tokens_per_s=50.0)], slots=1,
                     health_interval=3600.0)
    try:
        backend = st.state.fleet.backends[0]
        url = backend.name
        statuses: list[int] = []

        def gen(user: str) -> None:
            statuses.append(httpx.post(
                st.url + "/api/generate", headers={"X-User-ID": user}, timeout=30,
                json={"model": "llama3.2", "prompt": "q", "stream": False}).status_code)

        first = threading.Thread(target=gen, args=("a",))
        first.start()
        wait_until(lambda: backend.in_flight == 1, "the first request to run")
        st.lt.call(st.state.operator.remove_backend, url)
        st.lt.call(st.state.operator.add_backend, url)
        again = st.lt.call(lambda: st.state.fleet.find(url))
        assert again is not None and again.in_flight == 1
        second = threading.Thread(target=gen, args=("b",))
        second.start()
        wait_until(lambda: len(st.state.dispatcher.queue) == 1, "the second request to wait")
        assert st.sims[0].app.stats.active == 1
        first.join(10)
        second.join(10)
        assert statuses == [200, 200]
        assert again.in_flight == 0 and st.state.retired == {}
    finally:
        st.close()
