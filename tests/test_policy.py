"""Usage policy (issue 6): rate limits, in-flight / queue limits, max_tokens caps,
token accounting and quotas, the response cache, and limits shared by replicas.

Pure parts (sniffing spans, byte splicing, the usage stripper, the cache's LRU,
the token bucket and its reconciliation) are tested without sockets; the rest
runs a real gateway in front of the simulator.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import Stack, fast_sim_options, start_stack
from test_state import REDIS_SERVER, RedisServer

from ollamamq_fast.config import ConfigError, Settings, apply_toml
from ollamamq_fast.limits import check_limit, resolve
from ollamamq_fast.policy.cache import (
    NO_CACHE,
    NO_STORE,
    Entry,
    ResponseCache,
    cache_control,
    cache_key,
)
from ollamamq_fast.policy.caps import (
    CAP_RULES,
    CapError,
    cap_native,
    cap_openai,
    parse_object,
    splice,
)
from ollamamq_fast.policy.ratelimit import RateLimiter, RateSync, retry_after
from ollamamq_fast.policy.streamusage import UsageStripper, usage_edits
from ollamamq_fast.state.windows import LocalWindows
from ollamamq_fast.stats import GatewayStats
from ollamamq_fast.wire.sniff import sniff_spans

MODEL = "llama3.2"
CHAT = [{"role": "user", "content": "Why is the sky blue?"}]


def _wait(pred: Any, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def _sse_events(text: str) -> list[str]:
    """SSE data payloads with the random id and the clock normalized away."""
    out = []
    for event in text.split("\n\n"):
        if event.strip():
            event = re.sub(r'"id":"(chat)?cmpl-\d+"', '"id":"X"', event)
            out.append(re.sub(r'"created":\d+', '"created":0', event))
    return out


# -- Pure parts ---------------------------------------------------------------------


def test_sniff_spans_reads_top_level_values_in_one_pass() -> None:
    body = (b'{"messages":[{"content":"\\"max_tokens\\":1"}],"Model":"m",'
            b' "MAX_TOKENS" : 7 ,"max_tokens":9,"options":{"a":[1,"}"]}}  trailing')
    sn = sniff_spans(body, ("model",), ("max_tokens", "options"))
    assert sn.found == {"model": "m"}
    start, end = sn.spans["max_tokens"]
    assert body[start:end] == b"9"  # the last duplicate wins, as in Go
    start, end = sn.spans["options"]
    assert body[start:end] == b'{"a":[1,"}"]}'
    assert body[sn.close : sn.close + 1] == b"}" and sn.members == 5


def test_openai_cap_clamps_by_splicing_and_keeps_every_other_byte() -> None:
    body = (b'{"model":"m","temperature":1.0,"top_p":1e-3,"seed":12345678901234567890123,'
            b'"max_tokens":5000,"messages":[{"role":"user","content":"caf\\u00e9 <ok>"}]}')
    rule = CAP_RULES[b"/v1/chat/completions"]
    sn = sniff_spans(body, ("model",), (*rule.keys, rule.insert))
    out = splice(body, cap_openai(body, sn, rule, 100, reject=False))
    assert out == body.replace(b'"max_tokens":5000', b'"max_tokens":100')
    # Absent: the cap is added as the last member, nothing else moves.
    body = b'{"model":"m","temperature":1.0,"messages":[] }'
    sn = sniff_spans(body, ("model",), (*rule.keys, rule.insert))
    out = splice(body, cap_openai(body, sn, rule, 100, reject=False))
    assert out == b'{"model":"m","temperature":1.0,"messages":[] ,"max_tokens":100}'
    # Within the cap: untouched. Above it in reject mode: a clear error.
    body = b'{"model":"m","max_tokens":50}'
    sn = sniff_spans(body, ("model",), (*rule.keys, rule.insert))
    assert cap_openai(body, sn, rule, 100, reject=True) == []
    body = b'{"model":"m","max_tokens":-1}'
    sn = sniff_spans(body, ("model",), (*rule.keys, rule.insert))
    with pytest.raises(CapError, match="cap of 100 tokens"):
        cap_openai(body, sn, rule, 100, reject=True)


def test_native_cap_reencodes_only_options_keeping_numbers_exact() -> None:
    prefix = b'{"model":"m","prompt":"\\u003cthink\\u003e","options":'
    options = (b'{"temperature":1.0,"num_predict":-1,"stop":["\\n"],"top_k":40,'
               b'"big":123456789012345678901234567890,"tiny":1.5e-7}')
    suffix = b',"stream":false,"format":{"type":"object","properties":{"a":{"type":"number"}}}}'
    body = prefix + options + suffix
    sn = sniff_spans(body, ("model",), ("options",))
    span = sn.spans["options"]
    out = splice(body, cap_native(body, sn, parse_object(body[span[0]:span[1]]), 64, False))
    assert out.startswith(prefix) and out.endswith(suffix)
    rewritten = out[len(prefix) : len(out) - len(suffix)]
    assert rewritten == (b'{"temperature":1.0,"num_predict":64,"stop":["\\n"],"top_k":40,'
                         b'"big":123456789012345678901234567890,"tiny":1.5e-07}')
    assert json.loads(rewritten)["big"] == 123456789012345678901234567890
    # No options at all: a fresh object is appended; reject mode refuses -1.
    body = b'{"model":"m","prompt":"x"}'
    sn = sniff_spans(body, ("model",), ("options",))
    assert splice(body, cap_native(body, sn, None, 64, False)) == (
        b'{"model":"m","prompt":"x","options":{"num_predict":64}}')
    body = prefix + options + suffix
    sn = sniff_spans(body, ("model",), ("options",))
    with pytest.raises(CapError, match="unlimited"):
        cap_native(body, sn, parse_object(body[sn.spans["options"][0]:sn.spans["options"][1]]),
                   64, True)


def test_usage_edit_and_stripper_give_back_the_stream_the_client_asked_for() -> None:
    body = b'{"model":"m","stream":true,"messages":[]}'
    sn = sniff_spans(body, ("model",), ("stream", "stream_options"))
    edits = usage_edits(body, sn)
    assert splice(body, edits) == (
        b'{"model":"m","stream":true,"messages":[],"stream_options":{"include_usage":true}}')
    asked = b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}'
    assert usage_edits(asked, sniff_spans(asked, ("model",), ("stream", "stream_options"))) == []

    wanted = (b'data: {"choices":[{"delta":{"content":"\\"usage\\""}}]}\n\n'
              b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n')
    extra = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
    stream = wanted + extra + b"data: [DONE]\n\n"
    for size in (1, 7, 64, len(stream)):  # any split across reads
        s = UsageStripper(per_chunk=False)
        out = b"".join(s.feed(stream[i : i + size]) for i in range(0, len(stream), size))
        assert out + s.flush() == wanted + b"data: [DONE]\n\n"
    zero = b',"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}'
    chunk = b'data: {"choices":[{"text":"a"}],"model":"m"' + zero + b"}\n\n"
    s = UsageStripper(per_chunk=True)
    assert s.feed(chunk + extra) == b'data: {"choices":[{"text":"a"}],"model":"m"}\n\n'


def test_response_cache_lru_budget_ttl_and_entry_bound() -> None:
    now = [0.0]
    stats = GatewayStats()
    cache = ResponseCache(stats, lambda: now[0])
    cache.configure("all", ttl=10.0, mb=8 * 4096 / (1024 * 1024))  # 32 KiB budget
    assert cache.entry_limit == 4096
    for i in range(12):
        cache.put(b"k%d" % i, 200, [(b"Content-Length", b"3000"), (b"Date", b"x")], b"x" * 3000)
    assert stats.cache_evictions > 0 and stats.cache_bytes <= 32 * 1024
    assert cache.get(b"k0") is None and cache.get(b"k11") is not None
    assert cache.get(b"k11").headers == [(b"Content-Length", b"3000")]  # Date is not kept
    cache.put(b"huge", 200, [], b"y" * 5000)
    assert cache.get(b"huge") is None  # larger than one entry may be
    now[0] = 11.0
    assert cache.get(b"k11") is None  # expired
    entry = Entry(200, [(b"A", b"b")], b"body", 0.0)
    assert Entry.unpack(entry.pack(), 1.0).body == b"body"
    assert cache_control(b"no-cache") == NO_CACHE and cache_control(b"no-store") & NO_STORE
    # Key: sorted keys and whitespace do not matter; the cap and the route do.
    a = cache_key(b"/api/chat", b"/api/chat", "m", 0, b'{"model":"m","messages":[1]}')
    b = cache_key(b"/api/chat", b"/api/chat", "m", 0, b'{ "messages": [1], "model": "m" }')
    assert a == b and a != cache_key(b"/api/chat", b"/api/chat", "m", 5, b'{"model":"m","messages":[1]}')
    assert cache_key(b"/api/generate", b"/api/generate", "m", 0, b'{"model":"m"}') is None


def test_token_bucket_and_limit_resolution() -> None:
    now = [0.0]
    limiter = RateLimiter(lambda: now[0])
    assert [limiter.take("u", 2.0, 3.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.take("u", 2.0, 3.0)
    assert wait == pytest.approx(0.5) and retry_after(wait) == 1
    now[0] = 0.5
    assert limiter.take("u", 2.0, 3.0) == 0.0
    assert retry_after(1.01) == 2
    limits = resolve([{"rate": 5, "max_tokens": 100}, {"max_tokens": 0, "max_tokens_mode": 1}], 7)
    assert (limits.rate, limits.burst, limits.max_tokens, limits.reject_over_cap,
            limits.max_queued) == (5.0, 5.0, 0, True, 7)
    with pytest.raises(ValueError):
        check_limit("rate", -1)
    with pytest.raises(ValueError):
        check_limit("nonsense", 1)


def test_a_burst_below_one_request_still_admits_at_the_rate() -> None:
    """A bucket that holds less than one request never admits one: a burst
    set below 1 (0.5, valid as a limit) refused the user for ever, each time
    with a Retry-After that promised a token. It counts as 1."""
    limits = resolve([{"rate": 2, "burst": 0.5}], 0)
    assert limits.burst == 1.0
    now = [0.0]
    limiter = RateLimiter(lambda: now[0])
    assert limiter.take("u", limits.rate, limits.burst) == 0.0
    wait = limiter.take("u", limits.rate, limits.burst)
    assert wait == pytest.approx(0.5)
    now[0] += wait
    assert limiter.take("u", limits.rate, limits.burst) == 0.0


def test_rate_sync_shares_one_bucket_between_replicas() -> None:
    asyncio.run(_rate_sync_scenario())


async def _rate_sync_scenario() -> None:
    windows = LocalWindows()  # stands in for Redis: one counter store for both

    async def incr(key: str, window_s: float, amount: float) -> float:
        return windows.incr(key, window_s, amount)

    now = [100.0]
    wall = [1000.25]
    a = RateLimiter(lambda: now[0])
    b = RateLimiter(lambda: now[0])
    sync_a = RateSync(a, incr, lambda: wall[0])
    sync_b = RateSync(b, incr, lambda: wall[0])
    a.shared = b.shared = True
    assert b.take("u", 0.01, 4) == 0.0
    await sync_b.sync_once()
    wall[0] += 1.0  # the next epoch: the first-sight look-back must still see it
    assert [a.take("u", 0.01, 4) for _ in range(3)] == [0.0] * 3
    await sync_a.sync_once()
    await sync_b.sync_once()
    assert a.take("u", 0.01, 4) > 0 and b.take("u", 0.01, 4) > 0  # 4 spent in all


# -- Through the gateway --------------------------------------------------------------


@pytest.fixture(scope="module")
def stack() -> Any:
    st = start_stack(sims=[fast_sim_options()])
    yield st
    st.close()


@pytest.fixture(scope="module", params=["paced", "instant"])
def any_stack(request: Any, stack: Stack) -> Any:
    """The paced stack, and one whose backend writes each answer in one piece
    (head and whole body in one read: the filter and the tee must cope)."""
    if request.param == "paced":
        yield stack
        return
    st = start_stack(sims=[fast_sim_options(tokens_per_s=0.0)])
    yield st
    st.close()


def _post(st: Stack, path: str, body: dict[str, Any], user: str, **headers: str) -> httpx.Response:
    return httpx.post(st.url + path, json=body, headers={"X-User-ID": user, **headers},
                      timeout=10)


def _set_limits(st: Stack, user: str, **limits: Any) -> dict[str, Any]:
    return st.lt.call(lambda: st.state.operator.set_limits(user, **limits))


def test_rate_limit_429_with_retry_after_in_the_route_shape(stack: Stack) -> None:
    row = _set_limits(stack, "rl", rate=0.5, burst=2)
    assert row["effective"]["rate"] == 0.5 and row["overrides"] == {"rate": 0.5, "burst": 2.0}
    body = {"model": MODEL, "prompt": "hi", "stream": False}
    assert [_post(stack, "/api/generate", body, "rl").status_code for _ in range(2)] == [200, 200]
    r = _post(stack, "/api/generate", body, "rl")
    assert r.status_code == 429 and r.headers["retry-after"] in ("1", "2")
    assert "rate limit" in r.json()["error"]
    r = _post(stack, "/v1/chat/completions", {"model": MODEL, "messages": CHAT}, "rl")
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    assert _post(stack, "/api/generate", body, "other").status_code == 200  # per user
    _set_limits(stack, "rl", rate=None, burst=None)
    assert _post(stack, "/api/generate", body, "rl").status_code == 200


def test_max_in_flight_and_max_queued_give_429(stack: Stack) -> None:
    _set_limits(stack, "inf", max_in_flight=1)
    slow = {"model": MODEL, "prompt": "slow", "stream": False}
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(_post, stack, "/api/generate", slow, "inf", **{"X-Sim-Delay-Ms": "600"})
        users = stack.state.stats.users
        assert _wait(lambda: "inf" in users and users["inf"].in_flight == 1)
        r = _post(stack, "/api/generate", slow, "inf")
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "in flight" in r.json()["error"]
        assert first.result().status_code == 200
    # max_queued: one slot, one running, one waiting, the next refused.
    st = start_stack(sims=[fast_sim_options()], slots=1, limits={"max_queued": 1})
    try:
        with ThreadPoolExecutor(4) as pool:
            running = pool.submit(_post, st, "/api/generate", slow, "q", **{"X-Sim-Delay-Ms": "700"})
            users = st.state.stats.users
            assert _wait(lambda: "q" in users and users["q"].in_flight == 1)
            waiting = pool.submit(_post, st, "/api/generate", slow, "q")
            assert _wait(lambda: users["q"].queued == 1)
            r = _post(st, "/api/generate", slow, "q")
            assert r.status_code == 429 and "too many queued requests" in r.json()["error"]
            assert r.headers["retry-after"] == "5"
            assert running.result().status_code == 200 and waiting.result().status_code == 200
    finally:
        st.close()


def test_max_tokens_clamp_and_reject(stack: Stack) -> None:
    _set_limits(stack, "cap", max_tokens=3)
    r = _post(stack, "/api/generate", {"model": MODEL, "prompt": "x", "stream": False}, "cap")
    assert r.json()["eval_count"] == 3 and r.json()["done_reason"] == "length"
    r = _post(stack, "/v1/chat/completions",
              {"model": MODEL, "messages": CHAT, "max_tokens": 1000, "temperature": 1.0}, "cap")
    assert r.json()["usage"]["completion_tokens"] == 3
    r = _post(stack, "/api/chat", {"model": MODEL, "messages": CHAT, "stream": False,
                                   "options": {"num_predict": 2, "temperature": 1.0}}, "cap")
    assert r.json()["eval_count"] == 2  # within the cap: untouched
    _set_limits(stack, "cap", max_tokens_mode="reject")
    r = _post(stack, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 4},
              "cap")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens 4 exceeds this gateway's cap of 3 tokens" in r.json()["error"]["message"]
    r = _post(stack, "/api/generate", {"model": MODEL, "prompt": "x", "stream": False,
                                       "options": {"num_predict": -1}}, "cap")
    assert r.status_code == 400 and "options.num_predict" in r.json()["error"]
    r = _post(stack, "/api/generate", {"model": MODEL, "prompt": "x", "stream": False}, "cap")
    assert r.status_code == 200 and r.json()["eval_count"] == 3  # absent: the cap is added


def test_accounting_equals_the_backends_own_counts(any_stack: Stack) -> None:
    stack = any_stack
    user = "acct"
    sim_url = stack.sims[0].url
    expected = [0, 0]

    def add(prompt: int, completion: int) -> None:
        expected[0] += prompt
        expected[1] += completion

    gen = {"model": MODEL, "prompt": "count me", "options": {"temperature": 0.9}}
    r = _post(stack, "/api/generate", {**gen, "stream": False}, user).json()
    add(r["prompt_eval_count"], r["eval_count"])
    lines = _post(stack, "/api/generate", gen, user).text.splitlines()
    last = json.loads(lines[-1])
    add(last["prompt_eval_count"], last["eval_count"])
    chat = {"model": MODEL, "messages": CHAT}
    usage = _post(stack, "/v1/chat/completions", chat, user).json()["usage"]
    add(usage["prompt_tokens"], usage["completion_tokens"])
    # OpenAI stream that asked for usage: relayed as it is.
    text = _post(stack, "/v1/chat/completions",
                 {**chat, "stream": True, "stream_options": {"include_usage": True}}, user).text
    usage = json.loads(_sse_events(text)[-2][len("data: "):])["usage"]
    add(usage["prompt_tokens"], usage["completion_tokens"])
    # OpenAI streams that did not: counted, and the client sees exactly what it asked for.
    for path, req in (("/v1/chat/completions", chat),
                      ("/v1/completions", {"model": MODEL, "prompt": "count me"})):
        text = _post(stack, path, {**req, "stream": True}, user).text
        direct = httpx.post(sim_url + path, json={**req, "stream": True}).text
        assert '"usage"' not in text and _sse_events(text) == _sse_events(direct)
        own = httpx.post(sim_url + path, json=req).json()["usage"]  # the backend's count
        add(own["prompt_tokens"], own["completion_tokens"])
    rows = stack.lt.run(stack.state.operator.usage(user))
    assert [(r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [tuple(expected)]
    assert rows[0]["requests"] == 6 and rows[0]["model"] == MODEL + ":latest"  # usage is keyed by the canonical name


def test_quota_403_once_spent_and_a_running_request_finishes(stack: Stack) -> None:
    body = {"model": MODEL, "prompt": "q", "stream": False}
    _set_limits(stack, "quota", quota_day=5)
    assert _post(stack, "/api/generate", body, "quota").status_code == 200
    r = _post(stack, "/api/generate", body, "quota")
    assert r.status_code == 403 and "daily token quota used up" in r.json()["error"]
    r = _post(stack, "/v1/chat/completions", {"model": MODEL, "messages": CHAT}, "quota")
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    quota = stack.lt.call(lambda: stack.state.operator.quota("quota"))
    assert quota["used_day"] >= 5 and quota["quota_day"] == 5
    # A stream running when its user's quota is set (and spent by it) finishes.
    with httpx.stream("POST", stack.url + "/api/generate", json={**body, "stream": True},
                      headers={"X-User-ID": "quota2", "X-Sim-Tokens": "200"}, timeout=10) as resp:
        it = resp.iter_lines()
        next(it)
        _set_limits(stack, "quota2", quota_total=1)
        lines = [next(it)] + list(it)
    assert json.loads(lines[-1])["done"] is True and json.loads(lines[-1])["eval_count"] == 200
    r = _post(stack, "/api/generate", body, "quota2")
    assert r.status_code == 403 and "in total" in r.json()["error"]


def test_cache_hit_is_byte_identical_and_calls_no_backend(any_stack: Stack) -> None:
    stack = any_stack
    sim = stack.sims[0]
    cases = [
        ("/api/generate", {"model": MODEL, "prompt": "c1", "stream": False,
                           "options": {"temperature": 0}}),
        ("/api/chat", {"model": MODEL, "messages": CHAT, "options": {"seed": 42}}),  # NDJSON
        ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "stream": True,
                                  "temperature": 0}),  # SSE, usage injected and stripped
        ("/v1/embeddings", {"model": MODEL, "input": "embed me"}),
    ]
    for path, body in cases:
        first = _post(stack, path, body, "cache")
        assert first.status_code == 200 and first.headers["x-cache"] == "MISS"
        before = sim.stats.requests
        again = _post(stack, path, body, "cache2")
        assert again.headers["x-cache"] == "HIT", path
        assert again.content == first.content, path
        assert again.headers["content-type"] == first.headers["content-type"]
        assert sim.stats.requests == before, path  # no backend call
        if path == "/v1/chat/completions":
            assert '"usage"' not in first.text and first.text.endswith("data: [DONE]\n\n")
    stats = stack.state.stats
    assert stats.cache_hits >= 4 and stats.cache_entries >= 4 and stats.cache_bytes > 0


@pytest.mark.parametrize("size", [10, 70_000])  # searched as text, then as bytes
def test_determinism_is_seen_in_small_and_large_bodies(stack: Stack, size: int) -> None:
    sim = stack.sims[0]
    det = {"model": MODEL, "prompt": "p" * size, "stream": False, "options": {"seed": 7}}
    assert _post(stack, "/api/generate", det, "big").headers["x-cache"] == "MISS"
    before = sim.stats.requests
    assert _post(stack, "/api/generate", det, "big").headers["x-cache"] == "HIT"
    assert sim.stats.requests == before
    hot = {"model": MODEL, "prompt": "q" * size, "stream": False}
    assert "x-cache" not in _post(stack, "/api/generate", hot, "big").headers


def test_cache_no_cache_bypasses_and_nondeterministic_is_not_cached(stack: Stack) -> None:
    sim = stack.sims[0]
    det = {"model": MODEL, "prompt": "nc", "stream": False, "options": {"temperature": 0}}
    assert _post(stack, "/api/generate", det, "nc").headers["x-cache"] == "MISS"
    before = sim.stats.requests
    r = _post(stack, "/api/generate", det, "nc", **{"Cache-Control": "no-cache"})
    assert r.headers["x-cache"] == "MISS" and sim.stats.requests == before + 1
    assert _post(stack, "/api/generate", det, "nc").headers["x-cache"] == "HIT"
    # A 200 stream that broke with an error line is not kept.
    broken = {"model": MODEL, "prompt": "err", "options": {"temperature": 0}}
    r = _post(stack, "/api/generate", broken, "nc", **{"X-Sim-Fault": "mid-stream-error"})
    assert r.status_code == 200 and '"error"' in r.text
    assert _post(stack, "/api/generate", broken, "nc").headers["x-cache"] == "MISS"
    hot = {"model": MODEL, "prompt": "nd", "stream": False, "options": {"temperature": 0.8}}
    for path, body in (("/api/generate", hot),
                       ("/v1/chat/completions", {"model": MODEL, "messages": CHAT})):
        before = sim.stats.requests
        r1, r2 = _post(stack, path, body, "nd"), _post(stack, path, body, "nd")
        assert "x-cache" not in r1.headers and "x-cache" not in r2.headers
        assert sim.stats.requests == before + 2


def test_limits_and_cache_from_toml_and_reload(tmp_path: Path) -> None:
    s = Settings()
    apply_toml(s, {"limits": {"rate": 2, "max_tokens_mode": "reject",
                              "users": {"vip": {"rate": 0, "quota_day": 1000}}},
                   "cache": {"mode": "all", "ttl": 60, "mb": 8}, "stream_usage": "off"})
    assert s.limits == {"rate": 2.0, "max_tokens_mode": 1}
    assert s.user_limits == {"vip": {"rate": 0.0, "quota_day": 1000}}
    assert (s.cache_mode, s.cache_ttl, s.cache_mb, s.stream_usage) == ("all", 60.0, 8.0, "off")
    for bad in ({"limits": {"rate": -1}}, {"limits": {"bogus": 1}}, {"cache": {"mode": "x"}},
                {"stream_usage": "maybe"}):
        with pytest.raises(ConfigError):
            apply_toml(Settings(), bad)
    config = tmp_path / "gw.toml"
    config.write_text('[limits]\nmax_tokens = 2\n')
    st = start_stack(sims=[fast_sim_options()], config_path=str(config), limits={"max_tokens": 2})
    try:
        body = {"model": MODEL, "prompt": "x", "stream": False}
        assert _post(st, "/api/generate", body, "u").json()["eval_count"] == 2
        config.write_text('[limits]\nmax_tokens = 5\n[cache]\nmode = "off"\n')
        st.lt.call(st.gateway.reload)
        assert _post(st, "/api/generate", body, "u").json()["eval_count"] == 5
        assert st.state.policy.cache.mode == "off"
    finally:
        st.close()


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH")
def test_two_replicas_share_rate_limits_and_cache(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.dir.mkdir()
    server.start()
    try:
        limits = {"rate": 0.01, "burst": 4}
        a = start_stack(sims=[fast_sim_options()], redis_url=server.url, limits=limits)
        b = start_stack(sims=[fast_sim_options()], redis_url=server.url, limits=limits)
        try:
            body = {"model": MODEL, "prompt": "shared", "stream": False}
            assert _post(b, "/api/generate", body, "sh").status_code == 200
            time.sleep(0.25)
            assert [_post(a, "/api/generate", body, "sh").status_code for _ in range(3)] == [200] * 3

            def spent(st: Stack) -> bool:
                def level() -> float:
                    bucket = st.state.policy.limiter.buckets["sh"]
                    return float(bucket.level(st.state.loop.time()))
                return bool(st.lt.call(level) < 1)

            # Each replica alone would still have tokens (A 1, B 3): only the
            # shared counters take them to zero.
            assert _wait(lambda: spent(a) and spent(b))
            assert _post(a, "/api/generate", body, "sh").status_code == 429
            assert _post(b, "/api/generate", body, "sh").status_code == 429
            # The response cache is shared too: A's answer is B's HIT.
            det = {"model": MODEL, "prompt": "shared cache", "stream": False,
                   "options": {"temperature": 0}}
            first = _post(a, "/api/generate", det, "c")
            assert first.headers["x-cache"] == "MISS"
            time.sleep(0.2)
            before = b.sims[0].stats.requests
            again = _post(b, "/api/generate", det, "c")
            assert again.headers["x-cache"] == "HIT" and again.content == first.content
            assert b.sims[0].stats.requests == before
        finally:
            a.close()
            b.close()
    finally:
        server.stop()


def test_a_request_that_ends_while_quotas_are_refreshed_counts_once(tmp_path: Path) -> None:
    """The quota book drops its own counts once a read of the store holds them.
    A request that ended while the refresh was writing the usage (after the
    book had noted what to drop, before the write took the sums) used to be
    counted twice -- in the rows read and in the book -- until the next
    refresh: a user near a quota was refused before it was used up."""
    import asyncio

    st = start_stack(sims=[fast_sim_options(tokens=7)], state_path=str(tmp_path / "s.db"),
                     limits={"quota_day": 1_000_000})
    try:
        state = st.state
        store = state.cache.store
        quota = state.policy.quota
        body = json.dumps({"model": MODEL, "prompt": "q", "stream": False}).encode()
        ask = (b"POST /api/generate HTTP/1.1\r\nHost: gw\r\nX-User-ID: near\r\n"
               b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

        async def one_request() -> None:
            """A request through the gateway, on its own loop; returns once it has ended."""
            users = state.stats.users
            done = users["near"].done if "near" in users else 0
            reader, writer = await asyncio.open_connection("127.0.0.1", st.port)
            writer.write(ask)
            assert (await reader.read()).startswith(b"HTTP/1.1 200")
            writer.close()
            deadline = time.monotonic() + 5
            while users["near"].done == done:
                assert time.monotonic() < deadline, "the request did not end"
                await asyncio.sleep(0.002)

        async def scenario() -> tuple[int, int]:
            await one_request()
            await quota.refresh(False)
            first = quota.used("near")[0]
            # The next request ends while a refresh writes queued state (before
            # it writes the usage sums).
            original = store.set_meta

            async def set_meta(key: str, value: str) -> None:
                await one_request()
                await original(key, value)

            store.set_meta = set_meta
            try:
                state.cache.put_meta("test", "x")
                await quota.refresh(False)
            finally:
                store.set_meta = original
            after = quota.used("near")[0]

            # An operator write the store refuses does not keep the usage
            # from being stored and read (the flusher retries the write).
            async def refuse(key: str, value: str) -> None:
                raise OSError("refused")

            await one_request()
            store.set_meta = refuse
            try:
                state.cache.put_meta("test", "y")
                await quota.refresh(False)
            finally:
                store.set_meta = original
            return first, after, quota.used("near")[0]

        first, after, third = st.lt.run(scenario())
        assert first > 7  # the prompt's tokens and 7 completion tokens
        assert after == 2 * first
        assert third == 3 * first and quota.today["near"] == third
    finally:
        st.close()
