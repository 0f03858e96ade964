"""Control plane: admin REST API, OpenAPI, /metrics, SSE events and the admin CLI.

One gateway (admin port 0, token "t0k") in front of a fast simulator serves
most tests; the admin API is driven over real HTTP, the data plane with real
requests, and the CLI both in-process and as a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import Stack, admin_client, free_port, start_stack
from prometheus_client.parser import text_string_to_metric_families

from ollamamq_fast import buildinfo
from ollamamq_fast.cli import main as cli_main
from ollamamq_fast.control.app import AdminApp
from ollamamq_fast.control.auth import token_digest
from ollamamq_fast.control.events import KEEPALIVE, EventStreams, format_event
from ollamamq_fast.control.metrics import TOP_USERS, top_users
from ollamamq_fast.operator import EventBus
from ollamamq_fast.stats import UserStats

TOKEN = "t0k"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODY = {"model": "llama3.2", "prompt": "q", "stream": False}


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    st = start_stack(admin_port=0, admin_token=TOKEN)
    try:
        yield st
    finally:
        st.close()


@pytest.fixture(scope="module")
def admin(stack: Stack) -> Iterator[httpx.Client]:
    with admin_client(stack, TOKEN) as client:
        yield client


def generate(stack: Stack, user: str = "tester") -> httpx.Response:
    return httpx.post(stack.url + "/api/generate", json=BODY, headers={"X-User-ID": user},
                      timeout=10)


def admin_app(stack: Stack) -> AdminApp:
    assert stack.gateway.admin is not None and stack.gateway.admin.app is not None
    return stack.gateway.admin.app


def backend_urls(stack: Stack) -> list[str]:
    return [b["url"] for b in stack.lt.call(stack.state.operator.list_backends)]


# -- Auth, routing, OpenAPI -------------------------------------------------------


def test_every_route_needs_the_token(stack: Stack, admin: httpx.Client) -> None:
    routes = admin_app(stack).routes
    assert len(routes) == 38  # 26 + 12 for pools, access and required models
    with httpx.Client(base_url=admin.base_url, timeout=5) as anonymous:
        for route in routes:
            if route.public:  # /health and /ready: for probes, tested below
                assert route.template in ("/health", "/ready")
                continue
            path = route.template.replace("{user}", "alice").replace("{key_id}", "abc")
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "t0k"},
                            {"Authorization": "Basic dDBrOg=="}, {"Authorization": "Bearer"}):
                r = anonymous.request(route.method, path, headers=headers)
                assert r.status_code == 401, (route, headers, r.status_code)
                assert "token" in r.json()["error"]
                assert r.headers["www-authenticate"].startswith("Bearer")
        # Without the token even unknown paths answer 401: nothing to enumerate.
        assert anonymous.get("/nope").status_code == 401
        # Nothing changed on the way.
        assert "alice" not in stack.lt.call(stack.state.operator.list_blocked)["users"]


def test_unknown_route_and_wrong_method(admin: httpx.Client) -> None:
    r = admin.get("/api/nope")
    assert r.status_code == 404 and r.json() == {"error": "no route /api/nope"}
    r = admin.put("/api/backends")
    assert r.status_code == 405 and "error" in r.json()
    assert r.headers["allow"] == "DELETE, GET, PATCH, POST"
    assert admin.get("/api/users/alice").status_code == 405


def test_openapi_document_covers_every_route(stack: Stack, admin: httpx.Client) -> None:
    doc = admin.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    assert doc["info"]["title"] and doc["info"]["version"]
    assert doc["components"]["securitySchemes"]["adminToken"]["scheme"] == "bearer"
    app = admin_app(stack)
    routes = {(r.template, r.method.lower()) for r in app.routes + app.web.routes}
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert routes == documented
    schemas = doc["components"]["schemas"]
    op_ids = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            op_ids.append(op["operationId"])
            assert op["summary"] and op["responses"]
            assert any(code in op["responses"] for code in ("200", "201"))
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == set(re.findall(r"{(\w+)}", path)), (path, method)
            if method in ("post", "patch") and "{" not in path:
                assert "requestBody" in op, (path, method)
    assert len(op_ids) == len(set(op_ids))
    for ref in re.findall(r'"\$ref":\s*"#/components/schemas/(\w+)"', json.dumps(doc)):
        assert ref in schemas


def test_bad_bodies(admin: httpx.Client) -> None:
    cases: list[tuple[str, str, Any]] = [
        ("POST", "/api/backends", b"{not json"),
        ("POST", "/api/backends", b"[1, 2]"),
        ("POST", "/api/backends", {"slots": 2}),
        ("POST", "/api/backends", {"url": "http://x:1", "slot": 2}),
        ("POST", "/api/backends", {"url": "ftp://x:1"}),
        ("POST", "/api/backends", {"url": "http://x:1", "slots": 0}),
        ("PATCH", "/api/backends", {"url": "http://x:1"}),
        ("PATCH", "/api/users/alice", {}),
        ("PATCH", "/api/users/alice", {"vip": "yes"}),
        ("PATCH", "/api/users/alice", {"weight": 0}),
        ("PATCH", "/api/users/alice", {"weight": True}),
        ("POST", "/api/keys", {"name": "x"}),
        ("POST", "/api/keys", {"user": ""}),
        ("POST", "/api/keys", {"user": "a", "trusted": 1}),
        ("POST", "/api/blocked/ips", {"ip": "not-an-ip"}),
        ("DELETE", "/api/blocked/ips", None),
        ("DELETE", "/api/backends", None),
    ]
    for method, path, body in cases:
        content = body if isinstance(body, bytes) else (
            json.dumps(body).encode() if body is not None else None)
        r = admin.request(method, path, content=content)
        assert r.status_code == 400, (method, path, body, r.text)
        assert r.json()["error"]
    r = admin.post("/api/keys", content=b'{"user": "' + b"x" * 70_000 + b'"}')
    assert r.status_code == 413


# -- Backends -------------------------------------------------------------------------


def test_backend_add_slots_drain_remove(stack: Stack, admin: httpx.Client) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert [b["url"] for b in admin.get("/api/backends").json()["backends"]] == backend_urls(stack)
    r = admin.post("/api/backends", json={"url": url.removeprefix("http://"), "slots": 2})
    assert r.status_code == 201 and r.json()["url"] == url and r.json()["slots"] == 2
    assert url in backend_urls(stack)
    assert admin.post("/api/backends", json={"url": url}).status_code == 409
    r = admin.patch("/api/backends", json={"url": url, "slots": 5})
    assert r.status_code == 200 and r.json()["slots"] == 5
    r = admin.post("/api/backends/drain", json={"url": url})
    assert r.status_code == 200 and r.json()["draining"] is True
    listed = {b["url"]: b for b in stack.lt.call(stack.state.operator.list_backends)}
    assert listed[url]["draining"] and listed[url]["slots"] == 5
    assert admin.post("/api/backends/undrain", json={"url": url}).json()["draining"] is False
    r = admin.delete("/api/backends", params={"url": url})
    assert r.status_code == 200 and r.json() == {"removed": url}
    assert url not in backend_urls(stack)
    for r in (admin.delete("/api/backends", params={"url": url}),
              admin.post("/api/backends/drain", json={"url": url}),
              admin.patch("/api/backends", json={"url": url, "slots": 1})):
        assert r.status_code == 404 and url in r.json()["error"]


# -- Users and blocklist ------------------------------------------------------------


def test_user_settings_reach_the_operator(stack: Stack, admin: httpx.Client) -> None:
    r = admin.patch("/api/users/alice", json={"vip": True, "weight": 3})
    assert r.status_code == 200
    assert r.json() == {"user": "alice", "vip": True, "boost": False, "weight": 3}
    rows = {u["user"]: u for u in stack.lt.call(stack.state.operator.list_users)}
    assert rows["alice"]["vip"] is True and rows["alice"]["weight"] == 3
    r = admin.patch("/api/users/alice", json={"vip": False, "boost": True})
    assert r.json()["vip"] is False and r.json()["boost"] is True
    users = {u["user"]: u for u in admin.get("/api/users").json()["users"]}
    assert users["alice"]["boost"] is True and users["alice"]["weight"] == 3
    # Percent-encoded ids arrive decoded.
    assert admin.patch("/api/users/bob%20smith", json={"vip": True}).json()["user"] == "bob smith"


def test_blocked_user_gets_403_then_is_served_again(stack: Stack, admin: httpx.Client) -> None:
    assert generate(stack, "mallory").status_code == 200
    r = admin.post("/api/users/mallory/block")
    assert r.status_code == 200 and r.json() == {"user": "mallory", "blocked": True}
    assert "mallory" in admin.get("/api/blocked").json()["users"]
    assert generate(stack, "mallory").status_code == 403
    assert generate(stack, "someone-else").status_code == 200
    assert admin.post("/api/users/mallory/unblock").json()["blocked"] is False
    assert "mallory" not in admin.get("/api/blocked").json()["users"]
    assert generate(stack, "mallory").status_code == 200


def test_ip_blocklist(stack: Stack, admin: httpx.Client) -> None:
    r = admin.post("/api/blocked/ips", json={"ip": "10.1.2.3/8"})
    assert r.status_code == 200 and "10.0.0.0/8" in r.json()["ips"]
    assert generate(stack).status_code == 200
    try:
        admin.post("/api/blocked/ips", json={"ip": "127.0.0.1"}).raise_for_status()
        assert generate(stack).status_code == 403
    finally:
        r = admin.delete("/api/blocked/ips", params={"ip": "127.0.0.1"})
    assert r.status_code == 200 and "127.0.0.1" not in r.json()["ips"]
    assert generate(stack).status_code == 200
    assert admin.delete("/api/blocked/ips", params={"ip": "10.0.0.0/8"}).json()["ips"] == []


# -- Keys ------------------------------------------------------------------------------


def test_key_secret_is_shown_once(stack: Stack, admin: httpx.Client) -> None:
    r = admin.post("/api/keys", json={"user": "carol", "name": "laptop"})
    assert r.status_code == 201
    created = r.json()
    secret, key_id = created["secret"], created["key_id"]
    assert secret.startswith("omq-") and created["user"] == "carol"
    listing = admin.get("/api/keys")
    assert secret not in listing.text and "digest" not in listing.text
    record = next(k for k in listing.json()["keys"] if k["key_id"] == key_id)
    assert "secret" not in record and record["name"] == "laptop" and not record["revoked"]
    r = admin.delete(f"/api/keys/{key_id}")
    assert r.status_code == 200 and r.json() == {"key_id": key_id, "revoked": True}
    record = next(k for k in admin.get("/api/keys").json()["keys"] if k["key_id"] == key_id)
    assert record["revoked"] is True
    assert admin.delete("/api/keys/nosuchkey").status_code == 404


def test_stats(stack: Stack, admin: httpx.Client) -> None:
    generate(stack).raise_for_status()
    stats = admin.get("/api/stats").json()
    assert stats["completed"] >= 1 and stats["queued"] == 0
    assert stats["backends"][0]["url"] == backend_urls(stack)[0]
    assert stats["build"] == buildinfo.build()  # "mypyc" or "python"


# -- Metrics --------------------------------------------------------------------------


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_after_requests(stack: Stack, admin: httpx.Client) -> None:
    for _ in range(3):
        generate(stack, "metrics-user").raise_for_status()
    assert httpx.get(str(admin.base_url) + "/metrics", timeout=5).status_code == 401
    r = admin.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fams = _families(r.text)
    sim = backend_urls(stack)[0]
    requests = [s for s in fams["ollamamq_requests"].samples if s.name == "ollamamq_requests_total"
                and s.labels == {"route": "/api/generate", "status": "200", "backend": sim}]
    assert len(requests) == 1 and requests[0].value >= 3
    latency = {s.name: s.value for s in fams["ollamamq_request_duration_seconds"].samples
               if "le" not in s.labels}
    assert latency["ollamamq_request_duration_seconds_count"] >= 3
    buckets = [s for s in fams["ollamamq_queue_wait_seconds"].samples if "le" in s.labels]
    assert buckets[-1].labels["le"] == "+Inf"
    assert [s.value for s in buckets] == sorted(s.value for s in buckets)
    up = {s.labels["backend"]: s.value for s in fams["ollamamq_backend_up"].samples}
    assert up[sim] == 1
    breaker = {s.labels["state"]: s.value for s in fams["ollamamq_backend_breaker"].samples
               if s.labels["backend"] == sim}
    assert breaker == {"closed": 1, "open": 0, "half-open": 0}
    user = {s.labels["user"]: s.value for s in fams["ollamamq_user_requests"].samples}
    assert user["metrics-user"] == 3
    user_tokens = {(s.labels["user"], s.labels["direction"]): s.value
                   for s in fams["ollamamq_user_tokens"].samples}
    assert user_tokens[("metrics-user", "out")] > 0
    assert {s.labels["user"]: s.value
            for s in fams["ollamamq_user_rejected"].samples}["metrics-user"] == 0
    tokens = [s for s in fams["ollamamq_completion_tokens"].samples]
    assert tokens[0].value > 0
    assert fams["ollamamq_state_pending"].samples[0].value >= 0
    assert fams["ollamamq_state_writes_dropped"].samples[0].value == 0
    assert admin.get("/api/stats").json()["store"]["dropped"] == 0


def test_metrics_count_cache_hits_and_misses(stack: Stack, admin: httpx.Client) -> None:
    """The README's metrics list names cache hits and misses: they reach /metrics."""
    def counters() -> dict[str, float]:
        fams = _families(admin.get("/metrics").text)
        return {name: fams[name].samples[0].value
                for name in ("ollamamq_cache_hits", "ollamamq_cache_misses",
                             "ollamamq_cache_entries", "ollamamq_tokens_capped")}

    before = counters()
    # temperature 0 makes the request deterministic: cached by the default --cache mode.
    body = {"model": "llama3.2", "prompt": "cache me", "stream": False,
            "options": {"temperature": 0, "num_predict": 2}}
    for _ in range(2):
        httpx.post(stack.url + "/api/generate", json=body, headers={"X-User-ID": "cacher"},
                   timeout=10).raise_for_status()
    after = counters()
    assert after["ollamamq_cache_misses"] == before["ollamamq_cache_misses"] + 1
    assert after["ollamamq_cache_hits"] == before["ollamamq_cache_hits"] + 1
    assert after["ollamamq_cache_entries"] >= 1


def test_every_metric_the_docs_name_is_served(stack: Stack, admin: httpx.Client) -> None:
    root = Path(__file__).resolve().parent.parent
    text = "\n".join(p.read_text() for p in (root / "README.md", *(root / "docs").glob("*.md")))
    named = set(re.findall(r"`(ollamamq_\w+)", text)) - {"ollamamq_fast"}
    assert len(named) >= 10
    families = _families(admin.get("/metrics").text)
    # A counter family without samples yet (no pool named) is served by its base name.
    served = {s.name for f in families.values() for s in f.samples} | set(families) | {
        name + "_total" for name, f in families.items() if f.type == "counter"}
    assert sorted(named - served) == []


def test_per_user_series_are_bounded() -> None:
    users = {}
    for i in range(TOP_USERS + 20):
        s = UserStats(f"u{i:03d}")
        s.done = i
        users[s.user] = s
    top = top_users(users)
    assert len(top) == TOP_USERS
    assert top[0].user == f"u{TOP_USERS + 19:03d}" and top[-1].user == "u020"


# -- Events ---------------------------------------------------------------------------


def _read_events(lines: Iterator[str], want: str, deadline: float) -> dict[str, Any]:
    kind = None
    for line in lines:
        if time.monotonic() > deadline:
            break
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: ") and kind == want:
            return dict(json.loads(line[6:]))
    raise AssertionError(f"no {want} event in time")


def test_sse_delivers_ticks_and_changes(stack: Stack, admin: httpx.Client) -> None:
    events = stack.state.operator.events
    with admin.stream("GET", "/api/events") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        tick = _read_events(lines, "tick", time.monotonic() + 5)
        assert {"queued", "in_flight", "requests_per_s", "tokens_per_s", "backends"} <= set(tick)
        admin.patch("/api/users/eve", json={"weight": 2}).raise_for_status()
        changed = _read_events(lines, "user_changed", time.monotonic() + 5)
        assert changed["user"] == {"user": "eve", "vip": False, "boost": False, "weight": 2}
        assert len(events.subscribers) == 1
    deadline = time.monotonic() + 3
    while events.subscribers and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not events.subscribers, "the subscription outlived the client"


class _FakeTransport:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send_bytes(self, data: bytes) -> None:
        self.sent.append(data)


class _FakeProto:
    def __init__(self) -> None:
        self.transport = _FakeTransport()
        self.gone = asyncio.Event()

    def response_stream(self, status: int, headers: list[tuple[str, str]]) -> _FakeTransport:
        assert status == 200 and ("content-type", "text/event-stream") in headers
        return self.transport

    async def client_disconnect(self) -> None:
        await self.gone.wait()


def test_event_stream_keepalive_disconnect_and_close() -> None:
    async def scenario() -> None:
        bus = EventBus()
        streams = EventStreams(bus, keepalive_s=0.05)
        proto = _FakeProto()
        task = asyncio.create_task(streams.serve(proto))
        await asyncio.sleep(0.12)
        bus.publish("user_blocked", user="x\ny")
        bus.publish("odd", value=object())  # not JSON: must not end the stream
        bus.publish("after", n=1)
        await asyncio.sleep(0.02)
        proto.gone.set()
        await asyncio.wait_for(task, 1)
        sent = b"".join(proto.transport.sent)
        assert sent.count(KEEPALIVE) >= 2
        assert b"event: user_blocked\ndata: {" in sent and b'"user":"x\\ny"' in sent
        assert b"event: odd\n" in sent and b"event: after\n" in sent
        assert not bus.subscribers and streams.open == 0
        # close() ends streams whose clients never hang up.
        other = _FakeProto()
        task = asyncio.create_task(streams.serve(other))
        await asyncio.sleep(0.01)
        streams.close()
        await asyncio.wait_for(task, 1)
        assert not bus.subscribers

    asyncio.run(scenario())
    assert format_event({"type": "tick", "n": 1}).endswith(b"\n\n")


def test_admin_api_does_not_disturb_the_data_plane(stack: Stack, admin: httpx.Client) -> None:
    seen: list[str] = []
    stop = threading.Event()

    def listen() -> None:
        with admin.stream("GET", "/api/events", timeout=10) as r:
            for line in r.iter_lines():
                seen.append(line)
                if stop.is_set():
                    return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        def one(i: int) -> int:
            return client.post("/api/generate", json=BODY,
                               headers={"X-User-ID": f"load{i % 7}"}).status_code

        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(one, range(200)))
    assert statuses == [200] * 200
    # Admin reads interleaved with traffic still answer.
    assert admin.get("/api/stats").status_code == 200
    deadline = time.monotonic() + 3
    while "event: tick" not in seen and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    listener.join(3)
    assert "event: tick" in seen


# -- Lifecycle ------------------------------------------------------------------------


def test_busy_or_disabled_admin_port_keeps_the_gateway_up() -> None:
    with socket.socket() as taken:
        # SO_REUSEPORT, as granian's own listener sets it: a gateway must still
        # notice the port is taken rather than share it.
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for admin_port in (port, -1):
            st = start_stack(admin_port=admin_port, admin_token=TOKEN)
            try:
                assert st.gateway.admin_port is None
                assert generate(st).status_code == 200
            finally:
                st.close()


def test_generated_token_public_metrics_and_stop_with_open_stream(
        capsys: pytest.CaptureFixture[str]) -> None:
    st = start_stack(admin_port=0, metrics_public=True)
    try:
        err = capsys.readouterr().err
        tokens = re.findall(r"admin token: (\S+)", err)
        assert len(tokens) == 1
        base = f"http://127.0.0.1:{st.gateway.admin_port}"
        assert st.state.settings.admin_token is None
        # Only the digest is kept.
        auth = admin_app(st).auth
        assert [getattr(auth, name) for name in auth.__slots__] == [token_digest(tokens[0])]
        ok = {"Authorization": f"Bearer {tokens[0]}"}
        assert httpx.get(base + "/api/users", headers=ok).status_code == 200
        assert httpx.get(base + "/api/users").status_code == 401
        assert httpx.get(base + "/metrics").status_code == 200
        doc = httpx.get(base + "/openapi.json", headers=ok).json()
        assert doc["paths"]["/metrics"]["get"]["security"] == []
        # Stopping does not wait for an event stream whose client never leaves.
        with httpx.stream("GET", base + "/api/events", headers=ok, timeout=5) as r:
            assert r.status_code == 200
            started = time.monotonic()
            st.close()
            assert time.monotonic() - started < 3
    finally:
        if st.lt.thread.is_alive():
            st.close()


# -- CLI -------------------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], stack: Stack, *argv: str,
         token: str = TOKEN) -> tuple[int, str, str]:
    capsys.readouterr()
    base = f"http://127.0.0.1:{stack.gateway.admin_port}"
    code = cli_main([*argv, "--admin", base, "--token", token])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_users_keys_backends(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, stack, "users", "set", "frank", "--vip", "on", "--weight", "3")
    assert code == 0 and out.strip() == "frank: vip on, boost off, weight 3"
    code, out, _ = _cli(capsys, stack, "users", "list")
    assert code == 0 and out.startswith("USER")
    row = next(line for line in out.splitlines() if line.startswith("frank "))
    assert row.split()[1:4] == ["yes", "no", "3"]
    code, out, _ = _cli(capsys, stack, "users", "block", "frank")
    assert code == 0 and out.strip() == "blocked frank"
    code, out, _ = _cli(capsys, stack, "users", "list", "--json")
    frank = next(u for u in json.loads(out)["users"] if u["user"] == "frank")
    assert frank["blocked"] is True
    assert _cli(capsys, stack, "users", "unblock", "frank")[0] == 0

    code, out, _ = _cli(capsys, stack, "keys", "create", "--user", "frank", "--name", "laptop")
    secret = re.search(r"omq-\S+", out)
    assert code == 0 and secret and "shown only now" in out
    key_id = out.splitlines()[1].split()[0]
    code, out, _ = _cli(capsys, stack, "keys", "list")
    assert code == 0 and key_id in out and secret.group(0) not in out
    assert _cli(capsys, stack, "keys", "revoke", key_id)[1].strip() == f"revoked {key_id}"

    url = f"http://127.0.0.1:{free_port()}"
    code, out, _ = _cli(capsys, stack, "backends", "add", url, "--slots", "2")
    assert code == 0 and url in out
    for argv, check in ((("slots", url, "7"), "7"), (("drain", url), "draining"),
                        (("undrain", url), "offline")):
        code, out, _ = _cli(capsys, stack, "backends", *argv)
        row = next(line for line in out.splitlines() if line.startswith(url))
        assert code == 0 and check in row.split(), (argv, out)
    code, out, _ = _cli(capsys, stack, "backends", "list")
    assert code == 0 and url in out and backend_urls(stack)[0] in out
    assert _cli(capsys, stack, "backends", "remove", url)[1].strip() == f"removed {url}"
    code, _, err = _cli(capsys, stack, "backends", "remove", url)
    assert code == 1 and "404" in err and len(err.strip().splitlines()) == 1


def test_cli_errors(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(capsys, stack, "users", "list", token="wrong")
    assert code == 1 and not out and "401" in err and len(err.strip().splitlines()) == 1
    code, _, err = _cli(capsys, stack, "users", "set", "frank")
    assert code == 2 and "nothing to change" in err
    capsys.readouterr()
    code = cli_main(["backends", "list", "--admin", f"http://127.0.0.1:{free_port()}"])
    err = capsys.readouterr().err
    assert code == 1 and "connection refused" in err
    with pytest.raises(SystemExit) as exc:
        cli_main(["backends", "slots", "http://x:1", "0"])
    assert exc.value.code == 2


def test_cli_commands_alone_list(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("users", "keys", "backends"):
        alone = _cli(capsys, stack, command, "--json")
        listed = _cli(capsys, stack, command, "list", "--json")
        assert alone[0] == 0 and json.loads(alone[1]) == json.loads(listed[1]), command
    code, out, _ = _cli(capsys, stack, "backends")
    assert code == 0 and out.startswith("URL") and backend_urls(stack)[0] in out


def test_cli_subprocess(stack: Stack) -> None:
    base = f"http://127.0.0.1:{stack.gateway.admin_port}"
    env = {**os.environ, "OLLAMAMQ_ADMIN": base, "OLLAMAMQ_ADMIN_TOKEN": TOKEN}
    run = subprocess.run([sys.executable, "-m", "ollamamq_fast", "users", "list", "--admin",
                          base, "--token", TOKEN], capture_output=True, text=True, timeout=20, check=False)
    assert run.returncode == 0 and run.stdout.startswith("USER"), run.stderr
    run = subprocess.run([sys.executable, "-m", "ollamamq_fast", "backends", "list", "--json"],
                         capture_output=True, text=True, timeout=20, check=False, env=env)
    assert run.returncode == 0, run.stderr
    assert [b["url"] for b in json.loads(run.stdout)["backends"]] == backend_urls(stack)
    run = subprocess.run([sys.executable, "-m", "ollamamq_fast", "keys", "list"],
                         capture_output=True, text=True, timeout=20, check=False,
                         env={**env, "OLLAMAMQ_ADMIN_TOKEN": "nope"})
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and "401" in run.stderr


def test_generated_token_is_kept_across_restarts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import contextlib
    import io

    db = str(tmp_path / "gw.db")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        first = start_stack(admin_port=0, state_path=db)
    try:
        token = next(ln.split(": ", 1)[1] for ln in err.getvalue().splitlines()
                     if ln.startswith("admin token: "))
    finally:
        first.close()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        second = start_stack(admin_port=0, state_path=db)
    try:
        assert "admin token: " not in err.getvalue()  # not generated (or printed) again
        url = f"http://127.0.0.1:{second.gateway.admin_port}"
        assert httpx.get(url + "/api/stats", headers={"Authorization": f"Bearer {token}"},
                         timeout=5).status_code == 200
        assert httpx.get(url + "/api/stats", headers={"Authorization": "Bearer other"},
                         timeout=5).status_code == 401
    finally:
        second.close()


def test_reload_route(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from harness import fast_sim_options

    cfg = tmp_path / "gw.toml"
    cfg.write_text("max_queue_per_user = 7\n")
    st = start_stack(admin_port=0, admin_token=TOKEN, config_path=str(cfg))
    try:
        url = f"http://127.0.0.1:{st.gateway.admin_port}/api/reload"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        cfg.write_text("max_queue_per_user = 3\n")
        r = httpx.post(url, headers=auth, timeout=5)
        assert r.status_code == 200 and r.json()["reloaded"] is True
        assert st.state.settings.max_queue_per_user == 3
        cfg.write_text("bogus = [")
        r = httpx.post(url, headers=auth, timeout=5)
        assert r.status_code == 400 and "old config stays" in r.json()["error"]
        assert st.state.settings.max_queue_per_user == 3
    finally:
        st.close()
    plain = start_stack(sims=[fast_sim_options()], admin_port=0, admin_token=TOKEN)
    try:
        r = httpx.post(f"http://127.0.0.1:{plain.gateway.admin_port}/api/reload",
                       headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
        assert r.status_code == 409
    finally:
        plain.close()


def test_cli_output_into_a_pipe_closed_early_ends_quietly(stack: Stack) -> None:
    """`ollamamq-fast users list | head -3`: the reader leaves before the table is
    written; no traceback on the terminal."""
    base = f"http://127.0.0.1:{stack.gateway.admin_port}"
    for argv in (["users", "list"], ["usage"]):
        proc = subprocess.Popen([sys.executable, "-m", "ollamamq_fast", *argv, "--admin", base,
                                 "--token", TOKEN], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # before the command has written anything
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=20) == 1 and "Traceback" not in err and "Broken" not in err, err
