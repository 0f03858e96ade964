"""Per-user and gateway counters: what the dashboards and metrics will show."""

from __future__ import annotations

import httpx
import openai
import pytest
from harness import fast_sim_options, start_stack
from hypothesis import given, settings
from hypothesis import strategies as st

from ollamamq_fast.stats import GatewayStats, Histogram, tokens_in_tail


def test_tokens_in_tail_reads_last_frames() -> None:
    ndjson = b'{"done":false}\n{"done":true,"prompt_eval_count":26,"eval_count":259}\n'
    assert tokens_in_tail(ndjson) == (26, 259)
    sse = (b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,'
           b'"total_tokens":10}}\n\ndata: [DONE]\n\n')
    assert tokens_in_tail(sse) == (7, 3)
    assert tokens_in_tail(b'{"response":"no counts"}') == (0, 0)


@pytest.mark.parametrize(("count", "read"), [
    (b"999999999999", 999999999999),  # 12 digits: the most a count has
    (b"1000000000000", 0),  # 13: no count (the stores' 64-bit sums stay far from overflow)
    (b"999999999999999999", 0),
    (b"1000000000000000000", 0),  # 19: no count (not a wrapped native integer)
    (b"99999999999999999999999999999999", 0),
    (b"0", 0), (b"007", 7)])
def test_a_count_is_read_up_to_twelve_digits(count: bytes, read: int) -> None:
    short = b'{"done":true,"prompt_eval_count":5,"eval_count":%b}\n' % count
    long = b'{"context":[%b],' % b",".join(b"1" for _ in range(200)) + short[1:]
    for tail in (short, long):  # the whole tail; its last NEAR_BYTES first
        assert tokens_in_tail(tail) == (5, read) == _whole_tail_counts(tail)


def _whole_tail_counts(tail: bytes) -> tuple[int, int]:
    """tokens_in_tail as it reads the whole tail, without its look at the tail's end first."""
    from ollamamq_fast import stats
    return stats.whole_tail_counts(tail)


def test_a_long_ndjson_tail_is_read_from_its_end() -> None:
    line = b'{"model":"m","response":" word","done":false}\n'
    final = (b'{"model":"m","done":true,"context":[%b],"total_duration":5,'
             b'"prompt_eval_count":26,"prompt_eval_duration":1,"eval_count":259,"eval_duration":2}\n'
             % b",".join(b"%d" % i for i in range(300)))
    tail = (line * 100 + final)[-8192:]
    assert tokens_in_tail(tail) == (26, 259) == _whole_tail_counts(tail)


_KEYS = (b'"prompt_eval_count"', b'"eval_count"', b'"prompt_tokens"', b'"completion_tokens"')
_VALUES = (b":7,", b": 42}", b":-1,", b':"x",', b"")


@given(st.lists(st.tuples(st.integers(0, 1500), st.sampled_from(_KEYS), st.sampled_from(_VALUES)),
                max_size=6), st.integers(0, 1500))
@settings(max_examples=500, deadline=None)
def test_the_tail_end_first_gives_what_the_whole_tail_gives(
        fields: list[tuple[int, bytes, bytes]], end: int) -> None:
    # Keys with their values (or junk), apart by gaps that put some before
    # the tail's end (stats.NEAR_BYTES) and some inside it.
    from ollamamq_fast.stats import NEAR_BYTES, ollama_counts_near
    tail = b"".join(b"y" * gap + key + value for gap, key, value in fields) + b"z" * end
    assert tokens_in_tail(tail) == _whole_tail_counts(tail)
    near = ollama_counts_near(tail[-NEAR_BYTES:])
    assert near is None or near == _whole_tail_counts(tail)


def test_an_observation_lands_in_the_bucket_bisect_would_choose() -> None:
    from bisect import bisect_left

    from ollamamq_fast.stats import LATENCY_BUCKETS
    for bounds in (LATENCY_BUCKETS, (1.0,), (1.0, 2.0)):
        values = [b + d for b in bounds for d in (-1e-9, 0.0, 1e-9)] + [-1.0, 0.0, 1e9]
        for v in values:
            h = Histogram(bounds)
            h.observe(v)
            assert h.counts.index(1) == bisect_left(bounds, v), (bounds, v)


def test_histogram_quantiles() -> None:
    h = Histogram((1.0, 2.0, 5.0))
    for v in (0.5, 0.5, 1.5, 4.0, 10.0):
        h.observe(v)
    assert h.count == 5 and h.counts == [2, 1, 1, 1]
    # Interpolated within the bucket, bounded by the smallest and largest seen.
    assert h.quantile(0.4) == 1.0 and h.quantile(0.5) == 1.5 and h.quantile(0.8) == 5.0
    assert h.quantile(1.0) == 10.0 and h.quantile(0.0) == 0.5
    assert Histogram().quantile(0.5) == 0.0


def test_histogram_quantiles_are_not_bucket_edges() -> None:
    # Every first byte at 2.6 s, every whole answer at 4.9 s: both fall in the
    # 2.5-5 s bucket, and neither may be reported as 5 s (nor first byte > latency).
    ttfb, latency = Histogram(), Histogram()
    for _ in range(10):
        ttfb.observe(2.6)
        latency.observe(4.9)
    assert ttfb.quantile(0.5) == 2.6 and latency.quantile(0.5) == 4.9
    spread = Histogram((1.0, 2.0, 5.0, 10.0))
    for i in range(100):
        spread.observe(2.5 + i * 0.02)  # 2.5 .. 4.48, true median 3.49
    assert abs(spread.quantile(0.5) - 3.5) < 0.05
    assert abs(spread.quantile(0.99) - 4.47) < 0.05


def test_user_and_token_accounting_match_the_backend() -> None:
    st = start_stack(sims=[fast_sim_options(tokens=5)])
    try:
        with httpx.Client(timeout=10) as client:
            for stream in (False, True):
                r = client.post(st.url + "/api/generate", headers={"X-User-ID": "acct"},
                                json={"model": "llama3.2", "prompt": "count me", "stream": stream})
                assert r.status_code == 200
        ai = openai.OpenAI(base_url=st.url + "/v1", api_key="x", max_retries=0,
                           default_headers={"X-User-ID": "acct"})
        done = ai.chat.completions.create(model="llama3.2",
                                          messages=[{"role": "user", "content": "hi"}])
        assert done.usage is not None
        stats = st.state.stats
        user = stats.users["acct"]
        assert user.done == 3 and user.in_flight == 0 and user.queued == 0
        assert user.completion_tokens == 15
        assert user.prompt_tokens > 0 and user.last_ip == "127.0.0.1"
        assert stats.responses[("/api/generate", 200, st.sims[0].url)].n == 2
        assert stats.latency.count >= 3 and stats.ttfb.count >= 3
    finally:
        st.close()


def test_operator_actions_take_effect() -> None:
    st = start_stack(sims=[fast_sim_options(), fast_sim_options()])
    try:
        op = st.state.operator
        body = {"model": "llama3.2", "prompt": "q", "stream": False}
        st.lt.call(op.block_user, "mallory", True)
        r = httpx.post(st.url + "/api/generate", headers={"X-User-ID": "mallory"}, json=body)
        assert r.status_code == 403 and "blocked" in r.json()["error"]
        r = httpx.post(st.url + "/v1/chat/completions", headers={"X-User-ID": "mallory"},
                       json={"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        st.lt.call(op.block_user, "mallory", False)
        st.lt.call(op.block_ip, "127.0.0.0/8", True)
        assert httpx.post(st.url + "/api/generate", json=body).status_code == 403
        assert httpx.get(st.url + "/api/tags").status_code == 200  # local routes stay open
        st.lt.call(op.block_ip, "127.0.0.0/8", False)
        assert httpx.post(st.url + "/api/generate", json=body).status_code == 200
        row = st.lt.call(op.set_user, "carol", True, None, 3)
        assert row == {"user": "carol", "vip": True, "boost": False, "weight": 3}
        st.lt.call(op.set_slots, st.sims[0].url, 7)
        assert st.state.fleet.backends[0].slots == 7
        key = st.lt.call(op.create_key, "dave", "laptop")
        assert key["secret"].startswith("omq-") and "digest" not in key
        assert [k["key_id"] for k in st.lt.call(op.list_keys)] == [key["key_id"]]
        users = {u["user"]: u for u in st.lt.call(op.list_users)}
        assert users["mallory"]["rejected"] == 2 and users["mallory"]["blocked"] is False
        snap = st.lt.call(op.stats_snapshot)
        assert snap["completed"] >= 4 and len(snap["backends"]) == 2
    finally:
        st.close()


def test_access_log_lines(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json as _json

    log = tmp_path / "access.log"
    st = start_stack(sims=[fast_sim_options(tokens=4)], log_file=str(log))
    try:
        r = httpx.post(st.url + "/api/generate", headers={"X-User-ID": "logged"},
                       json={"model": "llama3.2", "prompt": "q", "stream": False})
        assert r.status_code == 200
        httpx.post(st.url + "/api/generate", json={"model": "nope", "prompt": "q"})
    finally:
        st.close()
    lines = [_json.loads(ln) for ln in log.read_text().splitlines()]
    ok = next(ln for ln in lines if ln["user"] == "logged")
    assert ok["status"] == 200 and ok["path"] == "/api/generate" and ok["model"] == "llama3.2"
    assert ok["completion_tokens"] == 4 and ok["backend"] == st.sims[0].url
    assert ok["duration_ms"] > 0 and ok["ts"].endswith("Z")
    assert any(ln["status"] == 404 for ln in lines)


def test_access_log_logfmt(tmp_path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "access.log"
    st = start_stack(sims=[fast_sim_options(tokens=2)], log_file=str(log), log_format="logfmt")
    try:
        assert httpx.post(st.url + "/api/generate", headers={"X-User-ID": "a b"},
                          json={"model": "llama3.2", "prompt": "q", "stream": False}
                          ).status_code == 200
    finally:
        st.close()
    line = log.read_text().splitlines()[0]
    assert 'user="a b"' in line and "status=200" in line and "path=/api/generate" in line
    assert "completion_tokens=2" in line


def test_user_table_is_bounded_and_keeps_busy_and_recent_users(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ollamamq_fast import stats as stats_module
    from ollamamq_fast.stats import GatewayStats

    monkeypatch.setattr(stats_module, "MAX_TRACKED_USERS", 100)
    stats = GatewayStats()
    busy = stats.user("busy")
    busy.in_flight = 1
    for i in range(1000):
        stats.user(f"u{i}").last_seen = float(i)
    assert len(stats.users) <= 100
    assert "busy" in stats.users  # work in the gateway: never evicted
    assert "u999" in stats.users and "u0" not in stats.users  # the longest idle go first


def test_responses_are_counted_by_route_status_and_backend_however_they_alternate() -> None:
    # Consecutive responses with the same key reuse the last counter; any other
    # order, and equal keys that are other objects, still land in one counter each.
    stats = GatewayStats()
    route = "/api/chat"
    for status in (200, 200, 500, 200):
        stats.response(route, status, "b1")
    stats.response(route[:5] + route[5:], 200, "b1")  # equal, not the same object
    stats.response(route, 200, "b2")
    counts = {key: count.n for key, count in stats.responses.items()}
    assert counts == {("/api/chat", 200, "b1"): 4, ("/api/chat", 500, "b1"): 1,
                      ("/api/chat", 200, "b2"): 1}
    assert stats.completed == 6
