"""Tests for `ollamamq-fast bench`: statistics, request bytes, the raw client, end-to-end runs.

The end-to-end tests run the real CLI entry (`add_arguments` + `run`) against
a tiny in-test server (a thread with its own event loop) whose behaviour is
chosen by a path prefix: `/hang/...` never answers, `/reset/...` drops the
connection mid-stream, and so on. Tests against the real simulator and
gateway run when those commands exist.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import pickle
import threading
from collections.abc import Iterator
from typing import Any

import httptools
import orjson
import pytest

from ollamamq_fast.bench import cli as bench_cli
from ollamamq_fast.bench.client import BenchConnection, Exchange, classify, frame_kind
from ollamamq_fast.bench.scenarios import SCENARIOS
from ollamamq_fast.bench.stats import (
    GroupStats,
    Histogram,
    bucket_bounds,
    bucket_index,
    exact_percentile,
    jain_index,
    linear_slope,
)
from ollamamq_fast.bench.workload import GroupSpec, RequestFactory, Target, make_prompt

pytestmark = pytest.mark.timeout(60)


# Statistics


def test_bucket_bounds_contain_value_and_stay_narrow() -> None:
    values = [0, 1, 2, 255, 256, 257, 511, 512, 1000, 4095, 4096, 123_456, 10**9, 2**36 - 1]
    values += [2**k + d for k in range(8, 35) for d in (-1, 0, 1)]
    for v in values:
        low, high = bucket_bounds(bucket_index(v))
        assert low <= v <= high, v
        assert high - low <= max(1, v // 128), v


def test_percentiles_exact_below_256() -> None:
    h = Histogram()
    for v in range(1, 101):
        h.record(v)
    assert [h.percentile(q) for q in (50, 90, 99, 99.9, 100)] == [50, 90, 99, 100, 100]
    assert h.percentile(1) == 1
    assert h.mean() == 50.5
    assert (h.min, h.max, h.total) == (1, 100, 100)


def test_percentiles_nearest_rank_hand_computed() -> None:
    h = Histogram()
    for v in (10, 20, 30, 40):
        h.record(v)
    # Nearest rank: ceil(q/100 * 4) -> p25 = 1st, p50 = 2nd, p75 = 3rd, p76 = 4th value.
    assert (h.percentile(25), h.percentile(50), h.percentile(75), h.percentile(76)) == (10, 20, 30, 40)


def test_percentiles_large_values_within_half_a_percent() -> None:
    values = [1000 + 37 * i for i in range(20_000)]
    h = Histogram()
    for v in values:
        h.record(v)
    for q in (50, 90, 99, 99.9):
        exact = sorted(values)[math.ceil(q / 100 * len(values)) - 1]
        assert abs(h.percentile(q) - exact) <= exact * 0.005, q


def test_record_n_and_merge_equal_single_histogram() -> None:
    a, b, both = Histogram(), Histogram(), Histogram()
    for v in (5, 700, 9000):
        a.record(v)
        both.record(v)
    b.record_n(0, 3)
    b.record(123_456)
    both.record_n(0, 3)
    both.record(123_456)
    a.merge(b)
    assert a.counts == both.counts
    assert (a.total, a.sum, a.min, a.max) == (both.total, both.sum, both.min, both.max)


def test_histogram_pickles_sparse_and_back() -> None:
    h = Histogram()
    for v in (1, 2, 3, 10**6):
        h.record(v)
    back = pickle.loads(pickle.dumps(h))
    assert back.counts == h.counts and back.total == 4 and back.max == 10**6
    assert len(pickle.dumps(h)) < 400  # sparse: not 3840 zeros


def test_jain_index_hand_computed() -> None:
    assert jain_index([5, 5, 5, 5]) == 1.0
    assert jain_index([1, 0, 0, 0]) == 0.25
    assert jain_index([1, 2, 3]) == pytest.approx(36 / 42)
    assert jain_index([32, 1, 1, 1, 1]) == pytest.approx(36**2 / (5 * (1024 + 4)))
    assert jain_index([]) == 1.0
    assert jain_index([0, 0]) == 1.0


def test_exact_percentile_and_slope() -> None:
    assert exact_percentile([3, 1, 2, 4], 50) == 2
    assert exact_percentile([3, 1, 2, 4], 75) == 3
    assert exact_percentile([], 50) == 0.0
    assert linear_slope([(0, 1), (1, 3), (2, 5)]) == pytest.approx(2.0)
    assert linear_slope([(0, 1)]) == 0.0


def test_group_stats_merge_parallel_and_sequential() -> None:
    a, b = GroupStats("g", 2), GroupStats("g", 2)
    a.add_ok(0, 0)
    a.elapsed = 2.0
    b.add_ok(1, 1)
    b.add_error("reset", 0)
    b.elapsed = 3.0
    par = GroupStats("g", 2)
    par.merge(a)
    par.merge(b)
    assert (par.ok, par.user_ok, par.ok_timeline, par.elapsed) == (2, [1, 1], [1, 1], 3.0)
    seq = GroupStats("g", 2)
    seq.merge(a, parallel=False)
    seq.merge(b, parallel=False)
    assert (seq.ok_timeline, seq.err_timeline, seq.elapsed) == ([1, 0, 1], [0, 1, 0], 5.0)


# Request bytes


class _ReqCapture:
    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body = b""
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


def _parse_request(data: bytes) -> _ReqCapture:
    cap = _ReqCapture()
    httptools.HttpRequestParser(cap).feed_data(data)
    assert cap.done
    return cap


@pytest.mark.parametrize(
    ("route", "stream", "budget_key"),
    [
        ("/api/generate", True, "options.num_predict"),
        ("/api/chat", False, "options.num_predict"),
        ("/v1/chat/completions", True, "max_tokens"),
        ("/v1/completions", False, "max_tokens"),
        ("/api/embed", True, None),
    ],
)
def test_request_bytes_frame_and_body(route: str, stream: bool, budget_key: str | None) -> None:
    target = Target.parse("http://127.0.0.1:9/prefix", "t")
    group = GroupSpec(routes=(route,), stream=stream, prompt_bytes=300, max_tokens=7, users=3,
                      api_key="sk-{user}")
    req = _parse_request(RequestFactory(target, group, seed=1).request(seq=4, user=2))
    assert req.url == f"/prefix{route}".encode()
    assert req.headers[b"host"] == b"127.0.0.1:9"
    assert req.headers[b"x-user-id"] == b"user-2"
    assert req.headers[b"authorization"] == b"Bearer sk-2"
    assert int(req.headers[b"content-length"]) == len(req.body)
    body = orjson.loads(req.body)
    text = body.get("prompt") or body.get("input") or body["messages"][0]["content"]
    assert len(text.encode()) == 300
    if budget_key == "options.num_predict":
        assert body["options"]["num_predict"] == 7 and body["stream"] is stream
    elif budget_key == "max_tokens":
        assert body["max_tokens"] == 7 and body["stream"] is stream
    else:
        assert "stream" not in body


def test_route_model_mix_is_even_and_keys_file_wraps() -> None:
    target = Target.parse("127.0.0.1:9", "t")
    group = GroupSpec(routes=("/api/generate", "/api/chat"), models=("a", "b"), users=5,
                      api_keys=("k0", "k1"), send_user_header=False)
    f = RequestFactory(target, group, seed=3)
    seen: dict[tuple[bytes, str], int] = {}
    for seq in range(1009):
        req = _parse_request(f.request(seq, seq % 5))
        key = (req.url, orjson.loads(req.body)["model"])
        seen[key] = seen.get(key, 0) + 1
    assert len(seen) == 4 and max(seen.values()) - min(seen.values()) <= 1
    req = _parse_request(f.request(0, 3))
    assert b"x-user-id" not in req.headers and req.headers[b"authorization"] == b"Bearer k1"
    assert make_prompt(5) == "The q"


def test_target_parse_rejects_https() -> None:
    with pytest.raises(ValueError):
        Target.parse("https://example.com", "t")
    assert Target.parse("localhost:8080", "t").authority == "localhost:8080"


# The raw client, driven through a fake transport


class _FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.aborted = False
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True


class _Owner:
    def __init__(self) -> None:
        self.gaps = Histogram()
        self.done: list[tuple[Exchange, str | None]] = []
        self.gone = 0

    def exchange_done(self, conn: BenchConnection, ex: Exchange, kind: str | None) -> None:
        self.done.append((ex, kind))

    def connection_gone(self, conn: BenchConnection) -> None:
        self.gone += 1


def _connected() -> tuple[BenchConnection, _Owner, _FakeTransport]:
    owner = _Owner()
    conn = BenchConnection(owner, slot=0)
    transport = _FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, owner, transport


def _chunked(ct: bytes, pieces: list[bytes]) -> list[bytes]:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: " + ct + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
    return [head] + [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]


def test_sse_event_split_across_reads_counts_once_and_finds_split_terminator() -> None:
    conn, owner, _ = _connected()
    conn.send(b"req", Exchange(0, 0.0, True))
    pieces = [b'data: {"a":1}\n', b'\ndata: {"a":2}\n\n', b"data: [DO", b"NE]\n\n"]
    for raw in _chunked(b"text/event-stream", pieces):
        conn.data_received(raw)
    ex, kind = owner.done[0]
    assert kind is None and ex.lines == 3 and ex.terminated and not ex.error_frame
    assert classify(ex.status, ex.sep is not None, ex.terminated, ex.error_frame) is None
    # 3 events -> 2 gaps: events 1 and 2 came in one read (a zero gap, counted
    # for the driver to record), event 3 in a later read (recorded at once).
    assert owner.gaps.total == 1 and ex.zero_gaps == 1


def test_ndjson_error_line_and_missing_done_are_classified() -> None:
    conn, owner, _ = _connected()
    conn.send(b"req", Exchange(0, 0.0, True))
    for raw in _chunked(b"application/x-ndjson", [b'{"done":false}\n', b'{"err', b'or":"boom"}\n']):
        conn.data_received(raw)
    ex, _ = owner.done[0]
    assert ex.error_frame and not ex.terminated
    assert classify(ex.status, True, ex.terminated, ex.error_frame) == "stream_error"
    assert classify(200, True, False, False) == "malformed"
    assert classify(503, False, False, False) == "http"
    assert frame_kind(b"application/json; charset=utf-8") == (None, None)


def test_reset_garbage_and_keep_alive_close() -> None:
    conn, owner, transport = _connected()
    conn.send(b"req", Exchange(0, 0.0, True))
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    conn.connection_lost(None)
    assert owner.done[-1][1] == "reset" and owner.gone == 1
    conn, owner, transport = _connected()
    conn.send(b"req", Exchange(0, 0.0, True))
    conn.data_received(b"NOT HTTP AT ALL\r\n\r\n")
    assert owner.done[-1][1] == "malformed" and transport.aborted
    conn, owner, transport = _connected()
    conn.send(b"req", Exchange(0, 0.0, True))
    conn.data_received(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")
    assert owner.done[-1][1] is None and not conn.usable


# A tiny server for end-to-end runs


class _TinyServer(asyncio.Protocol):
    """Answers like Ollama (NDJSON / SSE / JSON); misbehaves by path prefix."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body = b""
        self.headers: dict[bytes, bytes] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.body, self.headers = b"", b"", {}

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        t = self.transport
        assert t is not None
        path = self.url.decode()
        mode = ""
        if not path.startswith(("/api/", "/v1/")):
            _, mode, rest = path.split("/", 2)
            path = "/" + rest
        req = orjson.loads(self.body) if self.body else {}
        n = (req.get("options") or {}).get("num_predict") or req.get("max_tokens") or 3
        user = self.headers.get(b"x-user-id", b"").decode()
        self.state["users"][user] = self.state["users"].get(user, 0) + 1
        if mode == "hang":
            return
        if mode == "garbage":
            t.write(b"HELLO WORLD\r\n\r\n")
            return
        if user in self.state["reject"]:
            body = b'{"error":"busy"}'
            t.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            return
        stream = req.get("stream", path.startswith("/api/") and "embed" not in path)
        if not stream:
            body = orjson.dumps({"model": req.get("model"), "response": "x" * n, "done": True})
            t.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            return
        if path.startswith("/v1/"):
            ct = b"text/event-stream"
            frames = [b'data: {"choices":[{"delta":{"content":"t"}}]}\n\n'] * n + [b"data: [DONE]\n\n"]
        else:
            ct = b"application/x-ndjson"
            frames = [b'{"model":"m","response":"t","done":false}\n'] * n + [b'{"model":"m","done":true}\n']
        if mode == "trunc":
            frames = frames[:-1]
        if mode == "err":
            frames = frames[:1] + [b'{"error":"an error was encountered while running the model"}\n']
        out = [b"HTTP/1.1 200 OK\r\nContent-Type: " + ct + b"\r\nTransfer-Encoding: chunked\r\n\r\n"]
        out += [b"%x\r\n%s\r\n" % (len(f), f) for f in frames]
        if mode == "reset":
            t.write(b"".join(out[:2]))
            t.close()
            return
        t.write(b"".join(out) + b"0\r\n\r\n")


@pytest.fixture(scope="module")
def tiny() -> Iterator[tuple[str, dict[str, Any]]]:
    state: dict[str, Any] = {"users": {}, "reject": {"user-1"}}
    ready = threading.Event()
    box: dict[str, Any] = {}

    def serve() -> None:
        loop = asyncio.new_event_loop()
        box["loop"] = loop
        server = loop.run_until_complete(loop.create_server(lambda: _TinyServer(state), "127.0.0.1", 0))
        box["port"] = server.sockets[0].getsockname()[1]
        ready.set()
        loop.run_forever()
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(5)
    yield f"http://127.0.0.1:{box['port']}", state
    box["loop"].call_soon_threadsafe(box["loop"].stop)
    thread.join(5)


def _bench(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    code = bench_cli.run(parser.parse_args(list(argv)))
    out, err = capsys.readouterr()
    return code, out, err


def _bench_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code, out, _ = _bench(capsys, *argv, "--json", "--quiet")
    assert out.count("\n") == 1  # exactly one JSON object on stdout
    return code, json.loads(out)


def test_closed_loop_stream_run_counts_chunks_users_and_status(tiny: tuple[str, dict[str, Any]],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = tiny
    code, doc = _bench_json(capsys, url, "-d", "1.5", "-c", "4", "--users", "4", "--user-prefix", "u",
                            "--max-tokens", "5", "--route", "/api/generate,/v1/chat/completions")
    assert code == 0
    t = doc["targets"][0]["total"]
    assert t["ok"] > 50 and t["errors_total"] == 0
    assert t["status"] == {"200": t["ok"]}
    assert t["chunks"] == t["ok"] * 6  # 5 tokens + done line / [DONE] event
    assert t["latency_ms"]["p50"] > 0 and t["latency_ms"]["p50"] <= t["latency_ms"]["p99"]
    assert t["ttft_ms"]["count"] == t["ok"] and t["gap_ms"]["count"] == t["ok"] * 5
    users = t["users"]
    assert users["count"] == 4 and sum(users["per_user"].values()) == t["ok"]
    assert set(users["per_user"]) == {"u0", "u1", "u2", "u3"} and users["jain"] > 0.99
    assert 1.4 < t["elapsed_s"] < 3.0 and sum(t["ok_timeline"]) == t["ok"]


def test_request_count_and_status_mix(tiny: tuple[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = tiny
    code, doc = _bench_json(capsys, url, "-n", "300", "-c", "6", "--users", "3", "--no-stream")
    assert code == 0
    t = doc["targets"][0]["total"]
    # user-1 gets 503s from the tiny server: exactly one request in three.
    assert t["requests"] == 300 and t["ok"] == 200
    assert t["status"] == {"200": 200, "503": 100}
    assert t["errors"]["http"] == 100 and t["errors_total"] == 100
    assert t["users"]["per_user"] == {"user-0": 100, "user-1": 0, "user-2": 100}
    assert t["users"]["jain"] == pytest.approx(2 / 3)
    assert t["chunks"] == 0 and doc["config"]["stream"] is False


@pytest.mark.parametrize(
    ("prefix", "kind"),
    [("/hang", "timeout"), ("/garbage", "malformed"), ("/trunc", "malformed"), ("/err", "stream_error"),
     ("/reset", "reset")],
)
def test_error_kinds(tiny: tuple[str, dict[str, Any]], capsys: pytest.CaptureFixture[str], prefix: str,
                     kind: str) -> None:
    url, _ = tiny
    code, doc = _bench_json(capsys, url + prefix, "-n", "4", "-c", "2", "--timeout", "0.3")
    t = doc["targets"][0]["total"]
    assert code == 1  # nothing succeeded
    assert t["errors"][kind] == 4 and t["errors_total"] == 4 and t["ok"] == 0


def test_connect_errors_against_a_closed_port(capsys: pytest.CaptureFixture[str]) -> None:
    from ollamamq_fast.bench.procs import free_port

    code, doc = _bench_json(capsys, f"http://127.0.0.1:{free_port()}", "-n", "5", "-c", "1")
    assert code == 1 and doc["targets"][0]["total"]["errors"]["connect"] == 5


def test_open_loop_rate(tiny: tuple[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = tiny
    code, doc = _bench_json(capsys, url, "--rate", "300", "-d", "1", "--users", "2", "--user-prefix", "x")
    t = doc["targets"][0]["total"]
    assert code == 0 and doc["config"]["mode"] == "open"
    assert 150 < t["ok"] < 450 and t["errors_total"] == 0


def test_open_loop_overload_drops_backlog_at_the_deadline(tiny: tuple[str, dict[str, Any]],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = tiny
    code, doc = _bench_json(capsys, url, "--rate", "100000", "-c", "1", "-d", "0.5", "--no-stream",
                            "--user-prefix", "o")
    t = doc["targets"][0]["total"]
    assert code == 0 and t["ok"] > 0 and t["errors_total"] == 0
    # Far more arrived than one connection could carry; the rest is reported, not waited for.
    assert t["unfinished"] > t["ok"] and doc["targets"][0]["wall_s"] < 3


def test_two_worker_processes_split_and_merge(tiny: tuple[str, dict[str, Any]],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = tiny
    code, doc = _bench_json(capsys, url, "-n", "401", "-c", "4", "--procs", "2", "--users", "5",
                            "--user-prefix", "p")
    t = doc["targets"][0]["total"]
    assert code == 0 and t["ok"] == 401 and doc["targets"][0]["procs"] == 2
    assert sum(t["users"]["per_user"].values()) == 401 and t["users"]["count"] == 5


def test_baseline_comparison_and_table(tiny: tuple[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = tiny
    code, out, err = _bench(capsys, url, "--baseline", url, "-d", "0.4", "-c", "2", "--rounds", "2",
                            "--user-prefix", "b", "--plot", "/tmp/never-written.png")
    assert code == 0
    assert "== gateway" in out and "== direct" in out and "gateway minus direct" in out
    assert "throughput ratio gateway/direct" in out and "p99.9" in out
    assert "round 2/2" in err
    if importlib.util.find_spec("matplotlib") is None:
        assert "needs matplotlib" in err
    code, doc = _bench_json(capsys, url, "--compare", url, "-d", "0.3", "-c", "2", "--user-prefix", "b")
    comp = doc["comparisons"][0]
    assert (comp["of"], comp["vs"]) == ("gateway", "compare")
    assert set(comp["added_latency_ms"]) == {"p50", "p90", "p99", "p99.9", "mean"}
    assert 0.2 < comp["throughput_ratio"] < 5


def test_plot_writes_a_png_or_explains_matplotlib_is_missing(tmp_path: Any) -> None:
    from ollamamq_fast.bench.report import plot_cdf

    h = Histogram()
    for v in (100, 200, 300, 5000):
        h.record(v)
    path = str(tmp_path / "cdf.png")
    err = plot_cdf([("a", h), ("empty", Histogram())], path)
    if importlib.util.find_spec("matplotlib") is None:
        assert err is not None and "needs matplotlib" in err
    else:
        assert err is None
        with open(path, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_options_reach_the_request_bytes(tmp_path: Any) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-a\n\nsk-b\n")
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    args = parser.parse_args(["http://127.0.0.1:9", "-H", "X-Trace: on", "--api-keys-file", str(keys),
                              "--no-user-header", "--route", "/v1/completions", "--model", "m1,m2",
                              "--prompt-bytes", "10", "--max-tokens", "3", "--no-stream", "-n", "5", "--users", "2"])
    spec = bench_cli.spec_from_args(args)
    g = spec.groups[0]
    assert (g.models, g.requests, spec.duration, g.concurrency) == (("m1", "m2"), 5, None, 16)
    req = _parse_request(RequestFactory(Target.parse(args.url, "t"), g, seed=1).request(0, 1))
    assert req.headers[b"x-trace"] == b"on" and req.headers[b"authorization"] == b"Bearer sk-b"
    assert b"x-user-id" not in req.headers
    body = orjson.loads(req.body)
    assert body["max_tokens"] == 3 and body["stream"] is False and len(body["prompt"]) == 10


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert _bench(capsys, "-n", "1")[0] == 2  # no URL, no scenario
    assert _bench(capsys, "http://127.0.0.1:9", "--route", "/nope")[0] == 2
    assert _bench(capsys, "http://127.0.0.1:9", "-n", "5", "--warmup", "1")[0] == 2


def test_scenario_names_match_cli_choices() -> None:
    assert tuple(SCENARIOS) == bench_cli.SCENARIO_NAMES


# Against the real simulator and gateway (when they exist)

_HAVE_SIM = importlib.util.find_spec("ollamamq_fast.sim.cli") is not None
_HAVE_GATEWAY = importlib.util.find_spec("ollamamq_fast.gateway") is not None


@pytest.mark.skipif(not _HAVE_SIM, reason="ollamamq_fast.sim.cli not built yet")
def test_against_simulator_stream_and_non_stream(capsys: pytest.CaptureFixture[str]) -> None:
    from ollamamq_fast.bench.procs import ProcessSet

    with ProcessSet() as procs:
        sim = procs.start_sim(ttft_ms=0, tokens_per_s=0, tokens=8)
        for stream_flag, route in (("--stream", "/api/chat"), ("--no-stream", "/api/generate"),
                                   ("--stream", "/v1/chat/completions")):
            code, doc = _bench_json(capsys, sim.url, "-d", "0.5", "-c", "4", "--users", "3", "--max-tokens", "8",
                                    "--route", route, stream_flag)
            t = doc["targets"][0]["total"]
            assert code == 0 and t["ok"] > 20 and t["errors_total"] == 0, (route, t["errors"])
            assert t["status"] == {"200": t["ok"]}
            if stream_flag == "--stream":
                # 8 token frames plus the final frame(s): at least 9 per response.
                assert t["chunks"] >= 9 * t["ok"], (route, t["chunks"], t["ok"])
            else:
                assert t["chunks"] == 0


@pytest.mark.skipif(not (_HAVE_SIM and _HAVE_GATEWAY), reason="simulator or gateway not built yet")
def test_overhead_scenario_short(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = _bench_json(capsys, "--scenario", "overhead", "-c", "4", "-d", "0.5")
    assert code == 0, doc["findings"]
    f = doc["findings"]["c=4"]
    assert f["gateway_ok_per_s"] > 0 and f["direct_ok_per_s"] > 0
    assert set(f["added_latency_ms"]) == {"p50", "p90", "p99", "p99.9", "mean"}
    assert len(doc["phases"]) == 2 and doc["phases"][0]["total"]["errors_total"] == 0
