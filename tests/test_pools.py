"""Pools (virtual frontends) and required models, end to end against simulators.

Two simulators with different models: A is the default pool, B the pool
"gpu". Requests reach a pool by `/pool/NAME` or by Host, aliases are spliced
into the body the backend reads, access rules give 403, unknown pools 404,
and required models are pulled (progress, retries, removal) by the gateway.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from ollamamq_fast.config import ConfigError, Settings, apply_toml, parse_pool
from ollamamq_fast.fleet.models import normalize_model
from ollamamq_fast.pools import unalias
from tests.harness import Stack, fast_sim_options, start_stack

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
