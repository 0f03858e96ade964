"""Pools (virtual frontends) and required models, end to end against simulators.

Two simulators with different models: A is the default pool, B the pool
"gpu". Requests reach a pool by `/pool/NAME` or by Host, aliases are spliced
into the body the backend reads, access rules give 403, unknown pools 404,
and required models are pulled (progress, retries, removal) by the gateway.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from harness import Stack, fast_sim_options, start_stack

from ollamamq_fast.config import ConfigError, Settings, apply_toml, parse_pool
from ollamamq_fast.fleet.models import normalize_model
from ollamamq_fast.pools import unalias

A_MODELS = ["llama3.2:latest"]
B_MODELS = ["qwen2.5:0.5b", "llama3.2:1b"]


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `cond` until it is truthy, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def pools_config(**pool: Any) -> Callable[[Settings, list[Any]], None]:
    """Default pool = the first simulator; pool gpu = the second (with `pool` settings)."""
    def configure(s: Settings, sims: list[Any]) -> None:
        data = {"gpu": {"backends": [sims[1].url], "aliases": {"fast": "llama3.2:1b"},
                        "hosts": ["gpu.example.test"], **pool}}
        apply_toml(s, {"pools": data})
        s.backends = s.backends[:1]
    return configure


@pytest.fixture()
def stack() -> Iterator[Stack]:
    s = start_stack([fast_sim_options(models=list(A_MODELS)),
                     fast_sim_options(models=list(B_MODELS))], configure=pools_config())
    try:
        yield s
    finally:
        s.close()


def chat(url: str, model: str, path: str = "/api/chat", **headers: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False}
    return httpx.post(url + path, json=body, headers=headers, timeout=10)


def test_path_prefix_reaches_the_pool_and_default_is_unchanged(stack: Stack) -> None:
    a, b = stack.sims[0], stack.sims[1]
    wait_for(lambda: stack.lt.call(lambda: stack.state.pools.by_name["gpu"].fleet.serves(
        normalize_model("qwen2.5:0.5b"), True)), what="pool gpu online")
    r = chat(stack.url, "qwen2.5:0.5b", "/pool/gpu/api/chat")
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-backend"] == b.url
    # The default pool does not reach pool gpu's backend.
    r = chat(stack.url, "qwen2.5:0.5b")
    assert r.status_code == 404 and "not found" in r.json()["error"]
    r = chat(stack.url, "llama3.2")
    assert r.status_code == 200 and r.headers["x-gateway-backend"] == a.url
    # Merged model lists per pool.
    tags = httpx.get(stack.url + "/pool/gpu/api/tags").json()["models"]
    names = {m["name"] for m in tags}
    assert {"qwen2.5:0.5b", "llama3.2:1b", "fast"} <= names and "llama3.2:latest" not in names
    default = {m["name"] for m in httpx.get(stack.url + "/api/tags").json()["models"]}
    assert default == {"llama3.2:latest"}
    ids = {m["id"] for m in httpx.get(stack.url + "/pool/gpu/v1/models").json()["data"]}
    assert {"qwen2.5:0.5b", "fast"} <= ids and "llama3.2:latest" not in ids
    health = httpx.get(stack.url + "/pool/gpu/health").json()
    assert health["backends_total"] == 1 and health["backends_online"] == 1
    assert httpx.get(stack.url + "/pool/gpu/").headers["x-gateway-backends-online"] == "1/1"
    assert httpx.get(stack.url + "/pool/gpu/api/version").status_code == 200
    # OpenAI route through the pool.
    r = httpx.post(stack.url + "/pool/gpu/v1/chat/completions", timeout=10, json={
        "model": "qwen2.5:0.5b", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.headers["x-gateway-backend"] == b.url


def test_unknown_pool_is_404_in_the_routes_shape(stack: Stack) -> None:
    r = chat(stack.url, "llama3.2", "/pool/nope/api/chat")
    assert r.status_code == 404 and r.json() == {"error": "pool 'nope' not found"}
    r = httpx.post(stack.url + "/pool/nope/v1/chat/completions", json={"model": "x"})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["message"] == "pool 'nope' not found" and "type" in err


def test_host_header_reaches_the_pool(stack: Stack) -> None:
    b = stack.sims[1]
    wait_for(lambda: httpx.get(stack.url + "/pool/gpu/api/tags").json()["models"],
             what="pool gpu models")
    r = chat(stack.url, "qwen2.5:0.5b", Host="gpu.example.test:11435")
    assert r.status_code == 200 and r.headers["x-gateway-backend"] == b.url
    names = {m["name"] for m in httpx.get(stack.url + "/api/tags",
                                          headers={"Host": "GPU.example.test"}).json()["models"]}
    assert "qwen2.5:0.5b" in names


def test_alias_is_spliced_into_the_body_the_backend_reads(stack: Stack) -> None:
    b = stack.sims[1]
    wait_for(lambda: httpx.get(stack.url + "/pool/gpu/api/tags").json()["models"],
             what="pool gpu models")
    r = chat(stack.url, "fast", "/pool/gpu/api/chat")
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "llama3.2:1b"
    assert r.headers["x-gateway-backend"] == b.url
    # The alias is the pool's: the default pool does not know it.
    assert chat(stack.url, "fast").status_code == 404


def test_unalias_replaces_every_spelling_and_keeps_other_bytes() -> None:
    body = b'{"model": "fast", "messages":[{"x":"model"}], "MODEL":"fast" ,"n": 1.0}'
    out = unalias(body, ("model",), "llama3.2:1b")
    assert out == b'{"model": "llama3.2:1b", "messages":[{"x":"model"}], "MODEL":"llama3.2:1b" ,"n": 1.0}'


def test_pool_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="at least one backend"):
        parse_pool("x", {})
    with pytest.raises(ConfigError, match="pool name"):
        parse_pool("Bad Name", {"backends": ["http://h:1"]})
    with pytest.raises(ConfigError, match="unknown pool setting"):
        parse_pool("x", {"backends": ["http://h:1"], "bogus": 1})
    with pytest.raises(ConfigError, match="top-level"):
        parse_pool("default", {"backends": ["http://h:1"]})
    s = Settings()
    with pytest.raises(ConfigError, match="host a.test is given to pools"):
        apply_toml(s, {"pools": {"p": {"backends": ["h:1"], "hosts": ["a.test"]},
                                 "q": {"backends": ["h:2"], "hosts": ["a.test"]}}})
    pool = parse_pool("p", {"backends": [{"url": "h:1", "slots": 2}], "slots": 3,
                            "aliases": {"fast": "m:1b"}, "required_models": ["m:1b"],
                            "users": {"vip": ["ann"], "weights": {"bob": 2}}})
    assert parse_pool("p", {k: v for k, v in pool.to_dict().items() if k != "name"}) == pool


TOKEN = "t0k"


def admin(stack: Stack, method: str, path: str, **kw: Any) -> httpx.Response:
    port = stack.gateway.admin_port
    return httpx.request(method, f"http://127.0.0.1:{port}{path}",
                         headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10, **kw)


def test_access_rules_give_403_in_the_routes_shape() -> None:
    def configure(s: Settings, sims: list[Any]) -> None:
        pools_config()(s, sims)
        apply_toml(s, {"pool_access": {"users": {"alice": ["gpu"]}}})

    st = start_stack([fast_sim_options(models=list(A_MODELS)),
                      fast_sim_options(models=list(B_MODELS))], configure=configure)
    try:
        wait_for(lambda: httpx.get(st.url + "/pool/gpu/api/tags").json()["models"],
                 what="pool gpu models")
        r = chat(st.url, "llama3.2", **{"X-User-ID": "alice"})
        assert r.status_code == 403 and r.json() == {
            "error": "user 'alice' may not use pool 'default'"}
        r = httpx.post(st.url + "/v1/chat/completions", headers={"X-User-ID": "alice"},
                       json={"model": "llama3.2", "messages": []})
        assert r.status_code == 403 and "may not use pool" in r.json()["error"]["message"]
        assert chat(st.url, "qwen2.5:0.5b", "/pool/gpu/api/chat",
                    **{"X-User-ID": "alice"}).status_code == 200
        assert chat(st.url, "llama3.2", **{"X-User-ID": "bob"}).status_code == 200
    finally:
        st.close()


def test_admin_api_creates_changes_and_deletes_pools_persisted(tmp_path: Any) -> None:
    db = str(tmp_path / "gw.db")
    sims = [fast_sim_options(models=list(A_MODELS)), fast_sim_options(models=list(B_MODELS))]

    def configure(s: Settings, servers: list[Any]) -> None:
        s.backends = s.backends[:1]

    st = start_stack(sims, configure=configure, admin_port=0, admin_token=TOKEN, state_path=db)
    b_url = st.sims[1].url
    try:
        r = admin(st, "POST", "/api/pools", json={"name": "gpu", "backends": [b_url],
                                                  "aliases": {"fast": "llama3.2:1b"}})
        assert r.status_code == 201, r.text
        assert r.json()["backends"] == [b_url]
        assert admin(st, "POST", "/api/pools", json={"name": "gpu",
                                                     "backends": [b_url]}).status_code == 409
        bad = admin(st, "POST", "/api/pools", json={"name": "x", "backends": []})
        assert bad.status_code == 400 and "at least one backend" in bad.json()["error"]
        wait_for(lambda: chat(st.url, "fast", "/pool/gpu/api/chat").status_code == 200,
                 what="pool gpu serving")
        r = admin(st, "PATCH", "/api/pools/gpu", json={"aliases": {"quick": "qwen2.5:0.5b"}})
        assert r.status_code == 200 and r.json()["aliases"] == {"quick": "qwen2.5:0.5b"}
        assert chat(st.url, "quick", "/pool/gpu/api/chat").json()["model"] == "qwen2.5:0.5b"
        assert chat(st.url, "fast", "/pool/gpu/api/chat").status_code == 404
        listed = admin(st, "GET", "/api/pools").json()["pools"]
        assert [p["name"] for p in listed] == ["default", "gpu"]
        backends = admin(st, "GET", "/api/backends").json()["backends"]
        assert {b["url"]: b["pools"] for b in backends}[b_url] == ["gpu"]
        r = admin(st, "PUT", "/api/pool-access/users/carol", json={"pools": ["gpu"]})
        assert r.status_code == 200
        assert admin(st, "GET", "/api/pool-access").json()["users"] == {"carol": ["gpu"]}
        assert chat(st.url, "llama3.2", **{"X-User-ID": "carol"}).status_code == 403
        assert admin(st, "DELETE", "/api/pools/default").status_code == 400
        assert admin(st, "DELETE", "/api/pools/nope").status_code == 404
    finally:
        st.close()
    # Restart on the same store: the pool, its aliases and the access rule are back.
    st = start_stack(sims, configure=configure, admin_port=0, admin_token=TOKEN, state_path=db)
    try:
        b_url = st.sims[1].url  # a new simulator: the stored pool points at the old URL
        pool = admin(st, "GET", "/api/pools/gpu").json()
        assert pool["aliases"] == {"quick": "qwen2.5:0.5b"}
        assert chat(st.url, "llama3.2", **{"X-User-ID": "carol"}).status_code == 403
        assert admin(st, "DELETE", "/api/pools/gpu").status_code == 200
        assert chat(st.url, "quick", "/pool/gpu/api/chat").status_code == 404
    finally:
        st.close()
    st = start_stack(sims, configure=configure, admin_port=0, admin_token=TOKEN, state_path=db)
    try:
        assert admin(st, "GET", "/api/pools/gpu").status_code == 404
    finally:
        st.close()


def test_required_models_are_pulled_and_the_backend_is_skipped_until_present() -> None:
    sims = [fast_sim_options(models=list(A_MODELS)),
            fast_sim_options(models=["qwen2.5:0.5b", "llama3.2:1b"]),
            fast_sim_options(models=["llama3.2:1b"], pull_step_s=0.1, pull_failures=1)]

    def configure(s: Settings, servers: list[Any]) -> None:
        apply_toml(s, {"pools": {"gpu": {"backends": [servers[1].url, servers[2].url],
                                         "required_models": ["qwen2.5:0.5b"]}}})
        s.backends = s.backends[:1]

    st = start_stack(sims, configure=configure, admin_port=0, admin_token=TOKEN)
    b1, b2 = st.sims[1], st.sims[2]
    try:
        required = st.state.required
        # The first pull fails mid-stream (the simulator says so once), the retry succeeds.
        wait_for(lambda: b2.stats.pulls, what="the gateway's first pull")
        served = set()
        while not st.lt.call(lambda: [j for j in required.work[
                st.state.pools.find_backend(b2.url)].history if j.state == "done"]):
            r = chat(st.url, "qwen2.5:0.5b", "/pool/gpu/api/chat")
            assert r.status_code == 200
            served.add(r.headers["x-gateway-backend"])
        assert served == {b1.url}, "a backend without the model was chosen"
        assert b2.stats.pulls == ["qwen2.5:0.5b", "qwen2.5:0.5b"] and b1.stats.pulls == []
        status = admin(st, "GET", "/api/pools/gpu/models").json()
        row = {b["backend"]: b for b in status["backends"]}[b2.url]
        assert row["missing"] == [] and row["present"] == ["qwen2.5:0.5b"]
        done = row["recent"][-1]
        assert done["state"] == "done" and done["attempts"] == 2 and done["percent"] == 100.0
        # Now both serve it.
        wait_for(lambda: chat(st.url, "qwen2.5:0.5b", "/pool/gpu/api/chat").headers[
            "x-gateway-backend"] == b2.url, what="the pulled backend serving")
        # The default pool has no required models: nothing pulled there.
        assert st.sims[0].stats.pulls == []
    finally:
        st.close()


def test_sync_on_demand_streams_progress_and_removal_is_opt_in() -> None:
    sims = [fast_sim_options(models=list(A_MODELS)),
            fast_sim_options(models=["qwen2.5:0.5b", "llama3.2:1b"], pull_step_s=0.02)]

    def configure(s: Settings, servers: list[Any]) -> None:
        apply_toml(s, {"pools": {"gpu": {"backends": [servers[1].url],
                                         "required_models": ["qwen2.5:0.5b", "all-minilm"]}}})
        s.backends = s.backends[:1]

    st = start_stack(sims, configure=configure, admin_port=0, admin_token=TOKEN)
    sim = st.sims[1]
    try:
        wait_for(lambda: "all-minilm:latest" in {
            m["name"] for m in httpx.get(st.url + "/pool/gpu/api/tags").json()["models"]},
            what="all-minilm pulled at start")
        assert sim.stats.deletes == []  # removal is opt-in
        # A client request never pulls: an unknown model is a 404, the simulator saw no pull.
        pulls = list(sim.stats.pulls)
        assert chat(st.url, "phi3", "/pool/gpu/api/chat").status_code == 404
        assert sim.stats.pulls == pulls
        # The model goes away behind the gateway's back; a sync puts it back.
        r = httpx.request("DELETE", sim.url + "/api/delete", json={"model": "qwen2.5:0.5b"})
        assert r.status_code == 200
        events = st.lt.call(st.state.operator.events.subscribe)
        report = admin(st, "POST", "/api/pools/gpu/sync?remove=true").json()
        (row,) = report["backends"]
        assert row["missing"] == ["qwen2.5:0.5b"] and row["removed"] == ["llama3.2:1b"]
        assert sim.stats.deletes == ["qwen2.5:0.5b", "llama3.2:1b"]  # ours, then the gateway's
        wait_for(lambda: sim.stats.pulls[-1:] == ["qwen2.5:0.5b"] and not admin(
            st, "GET", "/api/pulls").json()["pulls"], what="the pull to finish")
        kinds = []
        while not events.empty():
            kinds.append(events.get_nowait())
        types = [e["type"] for e in kinds]
        assert {"required_check", "pull_queued", "pull_started", "pull_progress",
                "pull_done", "model_removed"} <= set(types)
        percents = [e["percent"] for e in kinds if e["type"] == "pull_progress"
                    and e["percent"] is not None]
        assert percents and percents == sorted(percents)
        assert types.index("pull_started") < types.index("pull_done")
        names = {m["name"] for m in httpx.get(st.url + "/pool/gpu/api/tags").json()["models"]}
        assert names == {"qwen2.5:0.5b", "all-minilm:latest"}
    finally:
        st.close()


def test_failed_pulls_are_retried_then_reported() -> None:
    sims = [fast_sim_options(models=list(A_MODELS), pull_step_s=0.01)]

    def configure(s: Settings, servers: list[Any]) -> None:
        apply_toml(s, {"pools": {"default": {"required_models": ["missing-model:1b"]}}})

    st = start_stack(sims, configure=configure, admin_port=0, admin_token=TOKEN)
    try:
        required = st.state.required
        st.lt.call(lambda: setattr(required, "retry_min_s", 0.01))
        st.lt.call(lambda: setattr(required, "max_attempts", 2))
        admin(st, "POST", "/api/pools/default/sync")
        row = wait_for(lambda: [j for b in admin(st, "GET", "/api/pools/default/models").json()[
            "backends"] for j in b["recent"] if j["state"] == "failed"], what="a failed pull")[0]
        assert "file does not exist" in row["error"] and row["attempts"] >= 2
    finally:
        st.close()


def test_reload_adds_changes_and_removes_pools_of_the_file(tmp_path: Any) -> None:
    sims = [fast_sim_options(models=list(A_MODELS)), fast_sim_options(models=list(B_MODELS))]
    cfg = tmp_path / "gw.toml"

    def write(pools: str) -> None:
        cfg.write_text(f'backends = ["{st_urls[0]}"]\n{pools}')

    st_urls: list[str] = []

    def configure(s: Settings, servers: list[Any]) -> None:
        st_urls.extend(srv.url for srv in servers)
        s.backends = s.backends[:1]
        write("")
        s.config_path = str(cfg)

    st = start_stack(sims, configure=configure, admin_port=0, admin_token=TOKEN)
    try:
        assert chat(st.url, "qwen2.5:0.5b", "/pool/gpu/api/chat").status_code == 404
        write(f'[pools.gpu]\nbackends = ["{st_urls[1]}"]\naliases = {{ fast = "llama3.2:1b" }}\n'
              '[pool_access.users]\ndave = ["gpu"]\n')
        r = admin(st, "POST", "/api/reload")
        assert r.status_code == 200 and r.json()["pools"]["set"] == ["gpu"], r.text
        wait_for(lambda: chat(st.url, "fast", "/pool/gpu/api/chat").status_code == 200,
                 what="pool gpu after the reload")
        assert chat(st.url, "llama3.2", **{"X-User-ID": "dave"}).status_code == 403
        write('[pools.default]\naliases = { small = "llama3.2" }\n')
        r = admin(st, "POST", "/api/reload")
        assert r.json()["pools"]["removed"] == ["gpu"]
        assert chat(st.url, "fast", "/pool/gpu/api/chat").status_code == 404
        assert chat(st.url, "small", **{"X-User-ID": "dave"}).json()["model"] == "llama3.2"
        write('[pools.gpu]\nbackends = []\n')
        r = admin(st, "POST", "/api/reload")
        assert r.status_code == 400 and "at least one backend" in r.json()["error"]
    finally:
        st.close()


def test_api_keys_limited_to_pools() -> None:
    st = start_stack([fast_sim_options(models=list(A_MODELS)),
                      fast_sim_options(models=list(B_MODELS))], configure=pools_config(),
                     auth="keys", admin_port=0, admin_token=TOKEN)
    try:
        key = admin(st, "POST", "/api/keys", json={"user": "erin"}).json()
        auth = {"Authorization": f"Bearer {key['secret']}"}
        wait_for(lambda: httpx.get(st.url + "/pool/gpu/api/tags").json()["models"],
                 what="pool gpu models")
        assert chat(st.url, "llama3.2", **auth).status_code == 200
        r = admin(st, "PUT", f"/api/pool-access/keys/{key['key_id']}", json={"pools": ["gpu"]})
        assert r.status_code == 200
        r = chat(st.url, "llama3.2", **auth)
        assert r.status_code == 403 and r.json() == {
            "error": "this API key may not use pool 'default'"}
        assert chat(st.url, "qwen2.5:0.5b", "/pool/gpu/api/chat", **auth).status_code == 200
        assert admin(st, "PUT", f"/api/pool-access/keys/{key['key_id']}",
                     json={"pools": None}).status_code == 200
        assert chat(st.url, "llama3.2", **auth).status_code == 200
        assert admin(st, "PUT", "/api/pool-access/keys/x", json={"pools": "gpu"}).status_code == 400
    finally:
        st.close()


def test_cli_pools_commands(capsys: pytest.CaptureFixture[str]) -> None:
    from ollamamq_fast.cli import main as cli_main

    sims = [fast_sim_options(models=list(A_MODELS)),
            fast_sim_options(models=list(B_MODELS), pull_step_s=0.01)]

    def configure(s: Settings, servers: list[Any]) -> None:
        s.backends = s.backends[:1]

    st = start_stack(sims, configure=configure, admin_port=0, admin_token=TOKEN)
    base = ["--admin", f"http://127.0.0.1:{st.gateway.admin_port}", "--token", TOKEN]
    try:
        def cli(*argv: str) -> str:
            capsys.readouterr()
            assert cli_main([*argv, *base]) == 0, capsys.readouterr().err
            return capsys.readouterr().out

        out = cli("pools", "create", "gpu", "--backend", st.sims[1].url, "--alias",
                  "fast=llama3.2:1b", "--require", "all-minilm", "--host", "gpu.test")
        assert "gpu" in out and "fast=llama3.2:1b" in out and "all-minilm" in out
        wait_for(lambda: "all-minilm" in st.sims[1].stats.pulls, what="the pull")
        out = cli("pools", "sync", "gpu")
        assert st.sims[1].url in out
        def present() -> bool:
            (row,) = json.loads(cli("pools", "show", "gpu", "--json"))["backends"]
            return bool(row["present"] == ["all-minilm"] and row["missing"] == [])

        wait_for(present, what="all-minilm present")
        assert "all-minilm" in cli("pools", "show", "gpu")
        assert "default" in cli("pools", "list") and "gpu" in cli("pools", "list")
        assert "no pulls" in cli("pools", "pulls")
        assert "all pools" in cli("pools", "access", "user", "zed", "all")
        assert "zed: gpu" in cli("pools", "access", "user", "zed", "gpu")
        assert "deleted pool gpu" in cli("pools", "delete", "gpu")
        capsys.readouterr()
        assert cli_main(["pools", "show", "gpu", *base]) == 1
        assert "no pool gpu" in capsys.readouterr().err
    finally:
        st.close()


def test_bench_pool_option_targets_the_pool_prefix() -> None:
    import argparse

    from ollamamq_fast.bench import cli as bench_cli

    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    args = parser.parse_args(["http://127.0.0.1:11435", "--pool", "gpu"])
    (target,) = bench_cli.targets_from_args(args)
    assert target.path_prefix == "/pool/gpu" and target.label == "target"


def test_official_clients_through_a_pool(stack: Stack) -> None:
    import ollama
    import openai

    wait_for(lambda: httpx.get(stack.url + "/pool/gpu/api/tags").json()["models"],
             what="pool gpu models")
    client = ollama.Client(host=stack.url + "/pool/gpu")
    names = {m.model for m in client.list().models}
    assert {"fast", "qwen2.5:0.5b"} <= names
    parts = list(client.chat(model="fast", messages=[{"role": "user", "content": "hi"}],
                             stream=True))
    assert parts[-1].done and parts[-1].model == "llama3.2:1b"
    oa = openai.OpenAI(base_url=stack.url + "/pool/gpu/v1", api_key="unused")
    chunks = list(oa.chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert chunks and chunks[0].model == "llama3.2:1b"
    assert "fast" in {m.id for m in oa.models.list()}
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=stack.url + "/pool/nope").chat(model="fast", messages=[])
    assert err.value.status_code == 404 and "pool 'nope' not found" in str(err.value)


def shared_backend_stack(**settings: Any) -> Stack:
    """One slow simulator in the default pool and in pool gpu, one slot."""
    def configure(s: Settings, servers: list[Any]) -> None:
        apply_toml(s, {"pools": {"gpu": {"backends": [servers[0].url],
                                         "users": {"vip": ["ann"]}}}})
        s.slots = 1
        s.health_interval = 60.0  # no probe may pump the queues for us

    return start_stack([fast_sim_options(models=list(A_MODELS), tokens_per_s=20.0, tokens=16)],
                       configure=configure, **settings)


def test_a_slot_freed_by_one_pool_starts_the_request_waiting_in_another() -> None:
    from concurrent.futures import ThreadPoolExecutor

    st = shared_backend_stack()
    try:
        pools = st.state.pools
        assert st.lt.call(lambda: pools.by_name["gpu"].dispatcher.queue.is_vip("ann"))
        assert not st.lt.call(lambda: st.state.dispatcher.queue.is_vip("ann"))
        backend = st.lt.call(lambda: pools.find_backend(st.sims[0].url))
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(chat, st.url, "llama3.2")
            wait_for(lambda: backend.in_flight == 1, what="the first request running")
            second = pool.submit(chat, st.url, "llama3.2", "/pool/gpu/api/chat")
            wait_for(lambda: st.lt.call(lambda: len(pools.by_name["gpu"].dispatcher.queue)) == 1,
                     what="the second request queued in pool gpu")
            assert first.result(10).status_code == 200
            t0 = time.monotonic()
            r = second.result(10)
        assert r.status_code == 200 and time.monotonic() - t0 < 5.0
        assert int(r.headers["x-gateway-queue-ms"]) > 0
    finally:
        st.close()


def test_deleting_a_pool_answers_its_queued_requests() -> None:
    from concurrent.futures import ThreadPoolExecutor

    st = shared_backend_stack(admin_port=0, admin_token=TOKEN)
    try:
        pools = st.state.pools
        backend = st.lt.call(lambda: pools.find_backend(st.sims[0].url))
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(chat, st.url, "llama3.2")
            wait_for(lambda: backend.in_flight == 1, what="the first request running")
            second = pool.submit(chat, st.url, "llama3.2", "/pool/gpu/api/chat")
            wait_for(lambda: st.lt.call(lambda: len(pools.by_name["gpu"].dispatcher.queue)) == 1,
                     what="the second request queued in pool gpu")
            assert admin(st, "DELETE", "/api/pools/gpu").status_code == 200
            r = second.result(10)
            assert r.status_code == 503 and r.json() == {"error": "pool 'gpu' was removed"}
            assert first.result(10).status_code == 200
        # The backend is still the default pool's.
        assert chat(st.url, "llama3.2").status_code == 200
    finally:
        st.close()


def test_a_required_model_no_backend_has_yet_is_503_while_it_is_pulled() -> None:
    sims = [fast_sim_options(models=list(A_MODELS), pull_step_s=0.3)]

    def configure(s: Settings, servers: list[Any]) -> None:
        apply_toml(s, {"pools": {"default": {"required_models": ["phi3:mini"]}}})

    st = start_stack(sims, configure=configure)
    try:
        wait_for(lambda: st.sims[0].stats.pulls, what="the pull")
        r = chat(st.url, "phi3:mini")
        assert r.status_code == 503 and "being pulled" in r.json()["error"]
        assert r.headers["retry-after"] == "30"
        assert st.sims[0].stats.pulls == ["phi3:mini"]  # the request pulled nothing
        wait_for(lambda: chat(st.url, "phi3:mini").status_code == 200, what="the model served")
        assert chat(st.url, "phi3:medium").status_code == 404
    finally:
        st.close()


def test_a_backend_joining_gets_the_required_models_and_metrics_show_pools() -> None:
    from harness import free_port

    from ollamamq_fast.sim import start_sim

    port = free_port()

    def configure(s: Settings, servers: list[Any]) -> None:
        apply_toml(s, {"pools": {"gpu": {"backends": [f"http://127.0.0.1:{port}"],
                                         "required_models": ["phi3:mini"]}}})
        s.health_interval = 0.1

    st = start_stack([fast_sim_options(models=list(A_MODELS))], configure=configure,
                     admin_port=0, admin_token=TOKEN)
    try:
        late = st.lt.run(start_sim(fast_sim_options(models=["llama3.2:1b"]), "127.0.0.1", port))
        st.sims.append(late)  # closed with the stack
        wait_for(lambda: late.stats.pulls == ["phi3:mini"], what="the pull when it joined")
        wait_for(lambda: chat(st.url, "phi3:mini", "/pool/gpu/api/chat").status_code == 200,
                 what="the pulled model served")
        metrics = admin(st, "GET", "/metrics").text
        assert 'ollamamq_pool_backends_up{pool="gpu"} 1.0' in metrics
        assert 'ollamamq_pool_slots{pool="default"} 4.0' in metrics
        assert f'ollamamq_backend_pool{{backend="http://127.0.0.1:{port}",pool="gpu"}} 1.0' \
            in metrics
        assert 'ollamamq_pool_requests_total{pool="gpu"}' in metrics
        assert 'ollamamq_model_pulls_total{result="done"} 1.0' in metrics
        stats = admin(st, "GET", "/api/stats").json()
        assert set(stats["pools"]) == {"default", "gpu"}
    finally:
        st.close()


def test_pool_lookup_by_path_and_host_and_access_rules() -> None:
    import asyncio

    from ollamamq_fast.config import PoolConfig
    from ollamamq_fast.fleet.select import Fleet
    from ollamamq_fast.pools import Pool, PoolError, Pools
    from ollamamq_fast.sched.dispatcher import Dispatcher

    loop = asyncio.new_event_loop()
    try:
        settings = Settings()
        fleet = Fleet([])
        default = Pool(PoolConfig("default"), fleet, Dispatcher(fleet, settings, loop))
        made: list[str] = []

        def make(url: str, slots: int, options: Any) -> Any:
            from ollamamq_fast.config import parse_backend_url
            from ollamamq_fast.fleet.backend import Backend

            made.append(url)
            return Backend(parse_backend_url(url), slots)

        pools = Pools(default, settings, loop, make, lambda b: None)
        assert not pools.active
        gpu = pools.put(parse_pool("gpu", {"backends": ["h:1"], "hosts": ["gpu.test"],
                                           "slots": 3}))
        assert made == ["http://h:1"] and gpu.fleet.backends[0].slots == 3
        assert pools.by_path(b"/pool/gpu/api/chat") == (gpu, b"/api/chat", "gpu")
        assert pools.by_path(b"/pool/gpu") == (gpu, b"/", "gpu")
        assert pools.by_path(b"/pool/x/v1/models")[0] is None
        assert pools.active  # a Host-routed pool
        assert pools.for_host(b"GPU.test:8080") is gpu and pools.for_host(b"gpu.test") is gpu
        assert pools.for_host(b"other.test") is None and pools.for_host(b"[::1]:80") is None
        pools.set_access({"ann": ["gpu"]}, {"k1": ["default"]})
        pools.check_access(gpu, "ann", "")
        pools.check_access(gpu, "bob", "")
        with pytest.raises(PoolError, match="user 'ann' may not use pool 'default'"):
            pools.check_access(default, "ann", "")
        with pytest.raises(PoolError, match="this API key may not use pool 'gpu'"):
            pools.check_access(gpu, "bob", "k1")
        # A second pool on the same backend shares it, with dispatch turns for both.
        pools.put(parse_pool("fast", {"backends": ["h:1"]}))
        assert made == ["http://h:1"] and len(gpu.fleet.backends[0].pumps) == 2
        pools.remove("fast")
        assert gpu.fleet.backends[0].pumps == ()
        with pytest.raises(ValueError):
            pools.remove("default")
    finally:
        loop.close()


def test_two_replicas_on_one_redis_share_pools_and_access_rules(tmp_path: Any) -> None:
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    from test_state import RedisServer

    server = RedisServer(tmp_path / "redis")
    server.dir.mkdir()
    server.start()
    try:
        sims = [fast_sim_options(models=list(A_MODELS)), fast_sim_options(models=list(B_MODELS))]

        def configure(s: Settings, servers: list[Any]) -> None:
            s.backends = s.backends[:1]

        a = start_stack(sims, configure=configure, redis_url=server.url)
        b = start_stack(sims, configure=configure, redis_url=server.url)
        try:
            b_url = a.sims[1].url
            a.lt.call(a.state.operator.set_pool, "gpu",
                      {"backends": [b_url], "aliases": {"fast": "llama3.2:1b"}}, True)
            wait_for(lambda: chat(b.url, "fast", "/pool/gpu/api/chat").status_code == 200,
                     what="pool gpu on the other replica")
            a.lt.call(a.state.operator.set_pool_access, "users", "fay", ["gpu"])
            wait_for(lambda: chat(b.url, "llama3.2", **{"X-User-ID": "fay"}).status_code == 403,
                     what="the access rule on the other replica")
            b.lt.call(b.state.operator.remove_pool, "gpu")
            wait_for(lambda: chat(a.url, "fast", "/pool/gpu/api/chat").status_code == 404,
                     what="the pool gone on the first replica")
        finally:
            a.close()
            b.close()
    finally:
        server.stop()


def test_a_pool_of_an_openai_only_backend_translates_with_aliases() -> None:
    sims = [fast_sim_options(models=list(A_MODELS)),
            fast_sim_options(models=["qwen2.5:0.5b"], api="openai")]

    def configure(s: Settings, servers: list[Any]) -> None:
        apply_toml(s, {"pools": {"vllm": {"backends": [servers[1].url],
                                          "aliases": {"small": "qwen2.5:0.5b"}}}})
        s.backends = s.backends[:1]

    st = start_stack(sims, configure=configure)
    try:
        names = wait_for(lambda: {m["name"] for m in httpx.get(
            st.url + "/pool/vllm/api/tags").json()["models"]}, what="the pool's models")
        assert {"qwen2.5:0.5b", "small"} <= names
        r = chat(st.url, "small", "/pool/vllm/api/chat")
        assert r.status_code == 200, r.text
        assert r.headers["x-translated"] == "ollama->openai"
        assert r.headers["x-gateway-backend"] == st.sims[1].url
        assert r.json()["message"]["role"] == "assistant"
        assert chat(st.url, "small").status_code == 404  # the default pool has no such alias
    finally:
        st.close()


def test_pools_sharing_a_busy_backend_take_turns_for_its_freed_slots() -> None:
    """A pool backlogged on a backend it shares with another pool must not keep
    every slot the backend frees: the other pool's request is offered the next
    one (one pool starved the other until its own queue was empty). The only
    slot is withheld until every request is queued; the run order is read
    from the backend's own `created_at` stamps."""
    import asyncio

    def configure(s: Settings, servers: list[Any]) -> None:
        apply_toml(s, {"pools": {"gpu": {"backends": [servers[0].url]}}})
        s.slots = 1
        s.health_interval = 60.0

    st = start_stack([fast_sim_options(models=list(A_MODELS), tokens=2, tokens_per_s=200.0)],
                     configure=configure)
    try:
        pools = st.state.pools
        gpu = st.lt.call(lambda: pools.by_name["gpu"])
        backend = st.lt.call(lambda: pools.find_backend(st.sims[0].url))
        st.lt.call(setattr, backend, "slots", 0)

        async def one(path: str, user: str) -> tuple[str, str]:
            async with httpx.AsyncClient(timeout=20) as client:
                r = await client.post(st.url + path, headers={"X-User-ID": user},
                                      json={"model": "llama3.2", "prompt": "q", "stream": False})
            assert r.status_code == 200
            return path, r.json()["created_at"]

        async def scenario() -> list[str]:
            tasks = []
            for n in range(1, 7):
                tasks.append(asyncio.ensure_future(one("/api/generate", f"u{n % 2}")))
                deadline = time.monotonic() + 10
                while len(st.state.dispatcher.queue) < n:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.002)
            tasks.append(asyncio.ensure_future(one("/pool/gpu/api/generate", "g")))
            deadline = time.monotonic() + 10
            while len(gpu.dispatcher.queue) < 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.002)

            def release() -> None:
                backend.slots = 1
                st.state.dispatcher.pump()

            st.lt.call(release)
            done = await asyncio.gather(*tasks)
            def stamp(pair: tuple[str, str]) -> tuple[str, str]:
                whole, _, frac = pair[1].rstrip("Z").partition(".")
                return whole, frac.ljust(9, "0")

            return [path for path, _ in sorted(done, key=stamp)]

        order = asyncio.run(scenario())
        # The default pool took the slot first; the next freed slot is gpu's turn.
        assert order.index("/pool/gpu/api/generate") <= 1, order
    finally:
        st.close()


def test_a_pool_change_answers_requests_queued_for_a_model_it_no_longer_serves() -> None:
    # Pool gpu's one backend serves qwen; a request for it waits behind a
    # running one when the operator points the pool at the other simulator:
    # the waiting request gets the 404 a new one gets, not a wait until
    # --queue-timeout; the running one finishes on the backend it started on.
    import threading

    from harness import wait_until

    slow_b = fast_sim_options(models=list(B_MODELS), tokens=100, tokens_per_s=50.0)
    st = start_stack([fast_sim_options(models=list(A_MODELS)), slow_b],
                     configure=pools_config(slots=1), queue_timeout=60.0)
    try:
        pool = st.state.pools.by_name["gpu"]
        results: dict[str, httpx.Response] = {}

        def ask(user: str) -> None:
            results[user] = chat(st.url + "/pool/gpu", "qwen2.5:0.5b", **{"X-User-ID": user})

        first = threading.Thread(target=ask, args=("a",))
        first.start()
        wait_until(lambda: pool.fleet.backends[0].in_flight == 1, "the first request to run")
        second = threading.Thread(target=ask, args=("b",))
        second.start()
        wait_until(lambda: len(pool.dispatcher.queue) == 1, "the second request to wait")
        st.lt.call(st.state.operator.patch_pool, "gpu", {"backends": [st.sims[0].url]})
        second.join(5)
        assert not second.is_alive()
        assert results["b"].status_code == 404
        assert results["b"].json() == {"error": "model 'qwen2.5:0.5b' not found"}
        first.join(10)
        assert results["a"].status_code == 200
    finally:
        st.close()
