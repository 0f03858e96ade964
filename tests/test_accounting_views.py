"""Every way a request ends, seen from every view: they agree with each other and with what happened.

One gateway (with its control plane, a SQLite state file and a JSON access
log) in front of three simulators: one speaking both APIs, one OpenAI only
(native requests to it are translated) and one Ollama only (OpenAI requests
to it are translated). Each case sends its requests as a user of its own,
then reads that user's end from `/api/users`, `/api/usage`, the access log,
the quota book, and the gateway-wide deltas of `/api/stats` and `/metrics`,
and checks that they tell the same story.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_llama import MODEL as LLAMA
from fake_llama import FakeLlama, start_fake
from harness import (
    LoopThread,
    SocketBackend,
    Stack,
    fast_sim_options,
    start_stack,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

from ollamamq_fast.config import Settings
from ollamamq_fast.sim import SimServer

pytestmark = pytest.mark.timeout(120)

TOKEN = "t0k"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BOTH, OPENAI_ONLY, OLLAMA_ONLY = "llama3.2", "oai", "nat"
# Served by the first simulator and by a backend that closes every request
# (Closer), and by the Closer alone.
PAIR, ALONE = "pair", "alone"
# Served by a backend that closes after a stream's last event (Unended).
UNENDED_N, UNENDED_O = "unended-n", "unended-o"


@dataclass
class Views:
    """What every view says at one moment (gateway-wide counters, and per user)."""

    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float]
    stats: dict[str, Any]
    users: dict[str, dict[str, Any]]
    usage: list[dict[str, Any]]
    access: list[dict[str, Any]]
    quota: dict[str, int] = field(default_factory=dict)

    def metric(self, name: str, **labels: str) -> float:
        want = tuple(sorted(labels.items()))
        return sum(v for (n, ls), v in self.metrics.items()
                   if n == name and all(item in ls for item in want))


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.log = tmp / "access.log"
        self.db = tmp / "state.db"
        # llama-cpp-python's server, which writes its end of body apart from [DONE]
        # (0.3 s later here: a client leaving right after [DONE] leaves long before it).
        self.fake_loop = LoopThread()
        self.fake: FakeLlama = start_fake(self.fake_loop, chunks=5, chunk_delay=0.0,
                                          end_delay=0.3)
        self.closer = Closer()
        self.unended = [Unended(openai=False), Unended(openai=True)]
        self.st = self._start()

    def _start(self) -> Stack:
        sims = [fast_sim_options(models=[f"{BOTH}:latest", "all-minilm:latest", f"{PAIR}:latest"]),
                fast_sim_options(api="openai", models=[f"{OPENAI_ONLY}:latest"]),
                fast_sim_options(api="ollama", models=[f"{OLLAMA_ONLY}:latest"])]

        def configure(s: Settings, servers: list[SimServer]) -> None:
            s.user_limits = {
                "rate": {"rate": 0.001, "burst": 1},
                "quota": {"quota_day": 1},
                "capped": {"max_tokens": 4, "max_tokens_mode": "reject"},
                "inflight": {"max_in_flight": 1},
            }
            # Quotas on for everyone (a day's quota no case reaches): the quota book counts.
            s.limits = {"quota_day": 10_000_000}
            s.backend_slots[self.fake.url] = 1

        return start_stack(sims=sims, configure=configure, extra_backends=[
                               self.fake.url, self.closer.url, *(u.url for u in self.unended)], admin_port=0, admin_token=TOKEN,
                           state_path=str(self.db), log_file=str(self.log),
                           health_interval=3600.0)

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.st.gateway.admin_port}"

    def url(self, i: int) -> str:
        return self.st.sims[i].url

    def restart(self) -> None:
        self.st.close()
        self.st = self._start()

    def settled(self, user: str) -> None:
        """Wait until `user` has nothing in the gateway and its lines are written."""
        users = self.st.state.stats.users

        def idle() -> bool:
            u = users.get(user)
            return u is not None and u.in_flight == 0 and u.queued == 0
        wait_until(idle, f"{user}'s requests to end")
        self.settled_lines()

    def settled_lines(self) -> None:
        access = self.st.state.access
        wait_until(lambda: not access.pending and access.counters()["pending"] == 0,
                   "the access log to be written")

    def views(self, user: str | None = None) -> Views:
        with httpx.Client(base_url=self.admin, headers=AUTH, timeout=10) as admin:
            metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
            for family in text_string_to_metric_families(admin.get("/metrics").text):
                for s in family.samples:
                    metrics[(s.name, tuple(sorted(s.labels.items())))] = s.value
            stats = admin.get("/api/stats").json()
            users = {u["user"]: u for u in admin.get("/api/users").json()["users"]}
            params = {"by": "user,key,model,backend", "step": "total"}
            if user is not None:
                params["user"] = user
            usage = admin.get("/api/usage", params=params).json()["rows"]
        access = []
        if self.log.exists():
            for line in self.log.read_text().splitlines():
                row = json.loads(line)
                if user is None or row["user"] == user:
                    access.append(row)
        quota: dict[str, int] = {}
        if user is not None:
            quota = self.st.lt.call(self.st.state.operator.quota, user)
        return Views(metrics, stats, users, usage, access, quota)

    def close(self) -> None:
        self.st.close()
        self.fake_loop.run(self.fake.close())
        self.fake_loop.stop()
        self.closer.close()
        for u in self.unended:
            u.close()


def _chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces)


class Unended(SocketBackend):
    """A server that sends a whole stream, last event included, then closes
    without the end of its chunked body (a server killed at that moment).

    `openai`: an OpenAI-compatible server of model UNENDED_O (native requests
    to it are translated); else an Ollama server of model UNENDED_N.
    """

    def __init__(self, openai: bool) -> None:
        self.openai = openai
        super().__init__()

    def answer(self, conn: socket.socket, head: bytes) -> None:
        path = self.path_of(head)
        if self.openai and path == b"/v1/models":
            out = json.dumps({"object": "list", "data": [
                {"id": UNENDED_O, "object": "model", "owned_by": "vllm"}]}).encode()
        elif not self.openai and path == b"/api/tags":
            out = json.dumps({"models": [{"name": f"{UNENDED_N}:latest",
                                          "model": f"{UNENDED_N}:latest"}]}).encode()
        elif path in (b"/api/chat", b"/v1/chat/completions"):
            if self.openai:
                ctype = b"text/event-stream"
                body = _chunked(
                    b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n',
                    b'data: {"choices":[{"index":0,"delta":{"content":"a b"}}]}\n\n',
                    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
                    b'data: {"choices":[],"usage":{"prompt_tokens":7,'
                    b'"completion_tokens":2,"total_tokens":9}}\n\n',
                    b"data: [DONE]\n\n")
            else:
                ctype = b"application/x-ndjson"
                body = _chunked(
                    b'{"model":"n","message":{"role":"assistant","content":"a"},'
                    b'"done":false}\n',
                    b'{"model":"n","message":{"role":"assistant","content":""},'
                    b'"done":true,"done_reason":"stop","prompt_eval_count":7,'
                    b'"eval_count":2}\n')
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: %b\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n%b" % (ctype, body))
            return  # closed before the last chunk
        else:
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n"
                         b"Connection: close\r\n\r\n")
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%b" % (len(out), out))


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    r = Rig(tmp_path_factory.mktemp("views"))
    try:
        yield r
    finally:
        r.close()


def chat_body(model: str, stream: bool, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream,
            **extra}


def check(rig: Rig, before: Views, user: str, *, requests: int, errors: int = 0,
          cancelled: int = 0, done: int | None = None, rejected: int = 0,
          tokens: bool | None = None, backend: str | None = None,
          failovers: int = 0) -> Views:
    """Read every view after `user`'s requests ended and check that they agree."""
    rig.settled(user)
    after = rig.views(user)
    lines = after.access
    rows = after.usage
    u = after.users[user]
    # The access log: one line per request.
    assert len(lines) == requests, lines
    # The usage rows: the same requests, errors and cancellations.
    total = {k: sum(r[k] for r in rows) for k in ("requests", "errors", "cancelled",
                                                  "prompt_tokens", "completion_tokens",
                                                  "estimated_tokens")}
    assert total["requests"] == requests, rows
    assert total["cancelled"] == cancelled == sum(1 for x in lines if x["status"] == 499), (
        rows, lines)
    assert total["errors"] == errors == sum(1 for x in lines if 400 <= x["status"] != 499), (
        rows, lines)
    # Tokens: the same figures in the lines, the rows, the user, the quota book,
    # and the gateway-wide counters of /api/stats and /metrics.
    prompt = sum(x["prompt_tokens"] for x in lines)
    completion = sum(x["completion_tokens"] for x in lines)
    assert (total["prompt_tokens"], total["completion_tokens"]) == (prompt, completion), (
        rows, lines)
    assert (u["prompt_tokens"] - before.users.get(user, {}).get("prompt_tokens", 0),
            u["completion_tokens"] - before.users.get(user, {}).get("completion_tokens", 0)
            ) == (prompt, completion)
    assert u["estimated_tokens"] == total["estimated_tokens"]
    assert after.quota["used_day"] == prompt + completion
    for name, key in (("prompt_tokens", "prompt"), ("completion_tokens", "completion")):
        delta = after.stats[name] - before.stats[name]
        assert delta == (prompt if key == "prompt" else completion), name
        assert after.metric(f"ollamamq_{name}_total") - before.metric(
            f"ollamamq_{name}_total") == delta
    assert (after.stats["estimated_tokens"] - before.stats["estimated_tokens"]
            == total["estimated_tokens"])
    if tokens is not None:
        assert (prompt + completion > 0) is tokens, lines
    # Ends: cancelled (499) in the user's dropped, the gateway's cancelled and
    # the metric; every other end is a response by route, status and backend.
    assert u["dropped"] == cancelled
    assert after.stats["cancelled"] - before.stats["cancelled"] == cancelled
    assert after.metric("ollamamq_cancelled_total") - before.metric(
        "ollamamq_cancelled_total") == cancelled
    answered = [x for x in lines if x["status"] != 499]
    assert after.stats["completed"] - before.stats["completed"] == len(answered)
    for x in answered:
        labels = {"status": str(x["status"]), "backend": x["backend"]}
        assert after.metric("ollamamq_requests_total", **labels) > before.metric(
            "ollamamq_requests_total", **labels), x
    assert after.metric("ollamamq_requests_total") - before.metric(
        "ollamamq_requests_total") == len(answered)
    assert after.metric("ollamamq_request_duration_seconds_count") - before.metric(
        "ollamamq_request_duration_seconds_count") == len(answered)
    # Usage rows and lines name the same backends and models.
    assert sorted((r["backend"], r["requests"]) for r in rows) == sorted(
        (b, sum(1 for x in lines if x["backend"] == b)) for b in {x["backend"] for x in lines})
    if backend is not None:
        assert {x["backend"] for x in lines} == {backend}
    assert u["done"] == (done if done is not None else requests - cancelled)
    assert u["rejected"] == rejected
    assert after.stats["rejected"] - before.stats["rejected"] == rejected
    assert after.metric("ollamamq_rejected_total") - before.metric(
        "ollamamq_rejected_total") == rejected
    assert u["in_flight"] == 0 and u["queued"] == 0
    assert after.stats["failovers"] - before.stats["failovers"] == failovers
    return after


def test_success_native_and_openai_streams_and_answers(rig: Rig) -> None:
    cases = [
        ("/api/chat", chat_body(BOTH, False), 0),
        ("/api/chat", chat_body(BOTH, True), 0),
        ("/api/generate", {"model": BOTH, "prompt": "x"}, 0),
        ("/v1/chat/completions", chat_body(BOTH, False), 0),
        ("/v1/chat/completions", chat_body(BOTH, True), 0),
        ("/v1/chat/completions", chat_body(BOTH, True, stream_options={"include_usage": True}),
         0),
        ("/v1/completions", {"model": BOTH, "prompt": "x", "stream": True}, 0),
        ("/v1/completions", {"model": BOTH, "prompt": "x", "stream": True,
                             "stream_options": {"include_usage": True}}, 0),
        # An OpenAI-only server (vLLM): the usage event asked for, or injected and stripped.
        ("/v1/chat/completions", chat_body(OPENAI_ONLY, True), 1),
        ("/v1/chat/completions", chat_body(OPENAI_ONLY, True,
                                           stream_options={"include_usage": True}), 1),
        ("/v1/completions", {"model": OPENAI_ONLY, "prompt": "x", "stream": True}, 1),
        # Translated: native to an OpenAI server, OpenAI to an Ollama server.
        ("/api/chat", chat_body(OPENAI_ONLY, False), 1),
        ("/api/chat", chat_body(OPENAI_ONLY, True), 1),
        ("/api/generate", {"model": OPENAI_ONLY, "prompt": "x"}, 1),
        ("/v1/chat/completions", chat_body(OLLAMA_ONLY, False), 2),
        ("/v1/chat/completions", chat_body(OLLAMA_ONLY, True), 2),
        ("/v1/chat/completions", chat_body(OLLAMA_ONLY, True,
                                           stream_options={"include_usage": True}), 2),
        ("/v1/completions", {"model": OLLAMA_ONLY, "prompt": "x", "stream": True}, 2),
    ]
    for n, (path, body, sim) in enumerate(cases):
        user = f"ok{n}"
        before = rig.views()
        r = httpx.post(rig.st.url + path, json=body, headers={"X-User-ID": user}, timeout=10)
        assert r.status_code == 200, (path, body, r.text)
        after = check(rig, before, user, requests=1, tokens=True, backend=rig.url(sim))
        (line,) = after.access
        assert line["completion_tokens"] == 8, (path, body, line)
        assert after.usage[0]["estimated_tokens"] == 0, (path, body, after.usage)


def test_embeddings_count_their_prompt_tokens_everywhere(rig: Rig) -> None:
    for n, (path, body, sim, tokens) in enumerate((
            ("/api/embed", {"model": "all-minilm", "input": ["one two three", "four"]}, 0, True),
            # Ollama's legacy route reports no count.
            ("/api/embeddings", {"model": "all-minilm", "prompt": "one two three"}, 0, False),
            ("/v1/embeddings", {"model": "all-minilm", "input": "one two three"}, 0, True),
            ("/api/embed", {"model": OPENAI_ONLY, "input": "one two three"}, 1, True),
            ("/v1/embeddings", {"model": OLLAMA_ONLY, "input": "one two three"}, 2, True))):
        user = f"emb{n}"
        before = rig.views()
        r = httpx.post(rig.st.url + path, json=body, headers={"X-User-ID": user}, timeout=10)
        assert r.status_code == 200, r.text
        after = check(rig, before, user, requests=1, backend=rig.url(sim), tokens=tokens)
        assert after.access[0]["completion_tokens"] == 0


def test_a_cache_hit_is_a_request_without_tokens(rig: Rig) -> None:
    user = "cached"
    before = rig.views()
    body = chat_body(BOTH, False, options={"temperature": 0})
    for want in ("MISS", "HIT"):
        r = httpx.post(rig.st.url + "/api/chat", json=body, headers={"X-User-ID": user})
        assert r.status_code == 200 and r.headers["x-cache"] == want
    after = check(rig, before, user, requests=2, tokens=True)  # both answered: done
    assert [x["backend"] for x in after.access] == [rig.url(0), ""]
    assert after.access[1]["prompt_tokens"] == after.access[1]["completion_tokens"] == 0


@pytest.mark.parametrize(("user", "body", "status", "first"), [
    ("rate", chat_body(BOTH, False), 429, 200),
    ("quota", chat_body(BOTH, False), 403, 200),
    ("capped", chat_body(BOTH, False, options={"num_predict": 100}), 400, 400),
])
def test_refusals_are_errors_without_tokens(rig: Rig, user: str, body: dict[str, Any],
                                            status: int, first: int) -> None:
    before = rig.views()
    got = [httpx.post(rig.st.url + "/api/chat", json=body, headers={"X-User-ID": user}).status_code
           for _ in range(2)]
    assert got == [first, status]
    ok = got.count(200)
    check(rig, before, user, requests=2, errors=2 - ok, done=ok,
          rejected=2 - ok if user != "capped" else 0)


def test_a_blocked_user_is_refused_and_counted(rig: Rig) -> None:
    user = "blk"
    rig.st.lt.call(rig.st.state.operator.block_user, user, True)
    try:
        before = rig.views()
        r = httpx.post(rig.st.url + "/api/chat", json=chat_body(BOTH, False),
                       headers={"X-User-ID": user})
        assert r.status_code == 403
        after = check(rig, before, user, requests=1, errors=1, done=0, rejected=1)
        print(after.stats["rejected"] - before.stats["rejected"])
    finally:
        rig.st.lt.call(rig.st.state.operator.block_user, user, False)


def test_backend_error_statuses_are_relayed_and_counted_as_errors(rig: Rig) -> None:
    for n, (path, status) in enumerate((("/api/chat", 500), ("/api/chat", 404),
                                        ("/v1/chat/completions", 400),
                                        ("/v1/chat/completions", 503))):
        user = f"err{n}"
        before = rig.views()
        r = httpx.post(rig.st.url + path, json=chat_body(BOTH, False),
                       headers={"X-User-ID": user, "X-Sim-Fault": f"status:{status}"})
        assert r.status_code == status
        check(rig, before, user, requests=1, errors=1, tokens=False, backend=rig.url(0))


def raw_post(port: int, path: str, body: dict[str, Any], user: str, extra: str = "") -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nX-User-ID: {user}\r\n{extra}"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
                 .encode() + data)
    return sock


def read_until(sock: socket.socket, marker: bytes, times: int = 1) -> bytes:
    got = b""
    deadline = time.monotonic() + 10
    while got.count(marker) < times and time.monotonic() < deadline:
        data = sock.recv(65536)
        if not data:
            break
        got += data
    assert marker in got, got[-300:]
    return got


@pytest.mark.parametrize(("path", "model", "marker"), [
    ("/api/chat", BOTH, b'"done":false'),
    ("/v1/chat/completions", BOTH, b"data: {"),
    ("/api/chat", OPENAI_ONLY, b'"done":false'),
    ("/v1/chat/completions", OLLAMA_ONLY, b"data: {"),
])
def test_a_client_gone_mid_stream_is_cancelled_with_what_was_generated(
        rig: Rig, path: str, model: str, marker: bytes) -> None:
    user = f"gone-{path.rsplit('/', 1)[1]}-{model}"
    before = rig.views()
    sock = raw_post(rig.st.port, path, chat_body(model, True), user, "X-Sim-Tokens: 100000\r\n")
    read_until(sock, marker, 4)
    sock.close()
    after = check(rig, before, user, requests=1, cancelled=1, done=0, tokens=True)
    assert after.usage[0]["estimated_tokens"] > 0


def test_a_client_gone_while_a_whole_answer_is_made_is_cancelled_without_tokens(
        rig: Rig) -> None:
    user = "gone-waiting"
    before = rig.views()
    sock = raw_post(rig.st.port, "/api/chat", chat_body(BOTH, False), user,
                    "X-Sim-Delay-Ms: 5000\r\n")
    wait_until(lambda: user in rig.st.state.stats.users
               and rig.st.state.stats.users[user].in_flight == 1, "the request to run")
    sock.close()
    check(rig, before, user, requests=1, cancelled=1, done=0, tokens=False)


def test_a_client_gone_while_queued_is_cancelled_without_tokens(rig: Rig) -> None:
    # The Ollama-only simulator's four slots held by long streams; the fifth waits.
    holders = [raw_post(rig.st.port, "/api/chat", chat_body(OLLAMA_ONLY, True), "holder",
                        "X-Sim-Tokens: 100000\r\n") for _ in range(4)]
    for sock in holders:
        read_until(sock, b'"done":false')
    user = "queued-gone"
    before = rig.views()
    sock = raw_post(rig.st.port, "/api/chat", chat_body(OLLAMA_ONLY, True), user)
    wait_until(lambda: user in rig.st.state.stats.users
               and rig.st.state.stats.users[user].queued == 1, "the request to queue")
    sock.close()
    check(rig, before, user, requests=1, cancelled=1, done=0, tokens=False)
    for sock in holders:
        sock.close()
    rig.settled("holder")


def test_a_backend_dying_mid_stream_is_done_with_estimated_tokens(rig: Rig) -> None:
    for n, (path, model) in enumerate((("/api/chat", BOTH), ("/v1/chat/completions", BOTH),
                                       ("/api/chat", OPENAI_ONLY),
                                       ("/v1/chat/completions", OLLAMA_ONLY))):
        user = f"died{n}"
        before = rig.views()
        r = httpx.post(rig.st.url + path, json=chat_body(model, True),
                       headers={"X-User-ID": user, "X-Sim-Fault": "die-after:3"}, timeout=10)
        assert r.status_code == 200 and "error" in r.text[-300:], r.text
        # The backend failed it after the head: recorded as a 502 in every view
        # (an error, still done), with the tokens relayed before the cut.
        after = check(rig, before, user, requests=1, errors=1, tokens=True)
        assert [x["status"] for x in after.access] == [502], after.access


@pytest.mark.parametrize(("path", "marker"), [
    ("/v1/chat/completions", b"data: [DONE]"),
    ("/v1/completions", b"data: [DONE]"),
    ("/api/chat", b'"done":true'),  # translated from the server's stream
    ("/api/generate", b'"done":true'),
])
def test_a_client_gone_right_after_the_terminal_event_is_done_with_its_tokens(
        rig: Rig, path: str, marker: bytes) -> None:
    user = "after-end" + path.replace("/", "-")
    before = rig.views()
    body = (chat_body(LLAMA, True) if "chat" in path
            else {"model": LLAMA, "prompt": "x", "stream": True})
    sock = raw_post(rig.st.port, path, body, user)
    read_until(sock, marker)
    sock.close()  # before the server's end of body (0.3 s later)
    after = check(rig, before, user, requests=1, tokens=True, backend=rig.fake.url)
    (line,) = after.access
    assert (line["status"], line["completion_tokens"]) == (200, 5), line
    # The server answered in full: one more request it finished.
    backend = {"backend": rig.fake.url}
    assert after.metric("ollamamq_backend_requests_total", **backend) - before.metric(
        "ollamamq_backend_requests_total", **backend) == 1


class Closer(SocketBackend):
    """An Ollama backend listing PAIR and ALONE that closes every inference request unanswered."""

    def __init__(self) -> None:
        self.closed = 0
        super().__init__()

    def answer(self, conn: socket.socket, head: bytes) -> None:
        path = self.path_of(head)
        if path == b"/api/tags":
            out = json.dumps({"models": [{"name": m, "model": m} for m in (
                f"{PAIR}:latest", f"{ALONE}:latest")]}).encode()
        elif path in (b"/api/ps", b"/api/version"):
            out = b'{"models": [], "version": "0.12.0"}'
        else:
            self.closed += 1
            return  # closed before any byte of an answer
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%b" % (len(out), out))


@pytest.mark.parametrize("translated", [False, True])
def test_a_backend_closing_after_the_last_event_answered_in_full(rig: Rig,
                                                                  translated: bool) -> None:
    """Done with the backend's own counts, one more request the backend finished,
    and no failure held against it; translated (an OpenAI server's stream to an
    ollama client) as well."""
    server = rig.unended[int(translated)]
    user = f"unended-{translated}"
    before = rig.views()
    r = httpx.post(rig.st.url + "/api/chat", headers={"X-User-ID": user}, timeout=10,
                   json=chat_body(UNENDED_O if translated else UNENDED_N, True))
    assert r.status_code == 200 and '"done":true' in r.text and "error" not in r.text, r.text
    after = check(rig, before, user, requests=1, backend=server.url)
    (line,) = after.access
    assert (line["prompt_tokens"], line["completion_tokens"]) == (7, 2)
    assert after.usage[0]["estimated_tokens"] == 0
    for name, delta in (("ollamamq_backend_failures_total", 0),
                        ("ollamamq_backend_requests_total", 1)):
        assert after.metric(name, backend=server.url) - before.metric(
            name, backend=server.url) == delta, name


def test_a_retry_before_the_first_byte_counts_once_on_the_backend_that_served(rig: Rig) -> None:
    # A stream on the simulator: the closer, with fewer requests in flight, is tried first.
    holder = raw_post(rig.st.port, "/api/chat", chat_body(PAIR, True), "pair-holder",
                      "X-Sim-Tokens: 100000\r\n")
    read_until(holder, b'"done":false')
    user = "retried"
    before = rig.views()
    closed = rig.closer.closed
    r = httpx.post(rig.st.url + "/api/chat", json=chat_body(PAIR, False),
                   headers={"X-User-ID": user}, timeout=10)
    assert r.status_code == 200, r.text
    assert rig.closer.closed - closed == 1
    after = check(rig, before, user, requests=1, tokens=True, backend=rig.url(0), failovers=1)
    assert after.metric("ollamamq_backend_requests_total", backend=rig.closer.url) == 0
    assert after.metric("ollamamq_failovers_total") - before.metric("ollamamq_failovers_total") == 1
    holder.close()
    rig.settled("pair-holder")

def test_a_backend_failing_every_try_is_a_502_on_that_backend(rig: Rig) -> None:
    user = "alone"
    before = rig.views()
    r = httpx.post(rig.st.url + "/api/chat", json=chat_body(ALONE, False),
                   headers={"X-User-ID": user}, timeout=10)
    assert r.status_code == 502, r.text
    check(rig, before, user, requests=1, errors=1, tokens=False, backend=rig.closer.url)


def test_model_management_is_a_usage_row_without_tokens_and_local_answers_none(rig: Rig) -> None:
    cases = [
        ("POST", "/api/show", {"model": BOTH}, 200, 1),
        ("POST", "/api/show", {"model": "no-such"}, 404, 1),
        ("HEAD", "/api/blobs/sha256:" + "0" * 64, None, 404, 1),
        ("POST", "/api/pull", {"model": "pulled", "stream": True}, 200, 1),
        ("DELETE", "/api/delete", {"model": "pulled"}, 200, 1),
        ("GET", "/api/tags", None, 200, 0),
        ("HEAD", "/api/tags", None, 200, 0),
        ("HEAD", "/", None, 200, 0),
        ("GET", "/api/version", None, 200, 0),
        ("GET", "/v1/models", None, 200, 0),
        ("GET", "/api/ps", None, 200, 0),
    ]
    for n, (method, path, body, status, rows) in enumerate(cases):
        user = f"mm{n}"
        before = rig.views()
        r = httpx.request(method, rig.st.url + path, json=body, headers={"X-User-ID": user},
                          timeout=10)
        assert r.status_code == status, (path, r.text)
        if rows:
            after = check(rig, before, user, requests=1, errors=int(status >= 400),
                          tokens=False)
        else:
            rig.settled_lines()
            after = rig.views(user)
            assert after.usage == [] and user not in after.users
            (line,) = after.access
            assert (line["method"], line["status"], line["backend"]) == (method, status, "")
            assert after.metric("ollamamq_requests_total") - before.metric(
                "ollamamq_requests_total") == 1
            assert after.stats["completed"] - before.stats["completed"] == 1


@pytest.mark.parametrize("stream", [False, True])
def test_bodies_that_broke_the_translator_are_answered_and_end_once(rig: Rig,
                                                                     stream: bool) -> None:
    """A keep_alive beyond a Duration's range (Ollama takes any number) and a
    reasoning_effort that is not a string raised inside the translator: a 500
    ("internal error", logged as a 499) on a pooled connection, and on a new one
    a request that never ended, its client waiting and its slot held for ever."""
    cases = [
        ("/api/chat", chat_body(OPENAI_ONLY, stream, keep_alive=1e308), 200),
        ("/api/generate", {"model": OPENAI_ONLY, "prompt": "x", "stream": stream,
                           "keep_alive": 1e300}, 200),
        ("/v1/chat/completions", chat_body(OLLAMA_ONLY, stream, reasoning_effort=[None]), 400),
        ("/v1/chat/completions", chat_body(OLLAMA_ONLY, stream, reasoning={"effort": {}}), 400),
    ]
    for n, (path, body, status) in enumerate(cases):
        user = f"xlate-bug{n}-{stream}"
        before = rig.views()
        for _ in range(2):  # a pooled connection and a new one
            r = httpx.post(rig.st.url + path, json=body, timeout=5, headers={"X-User-ID": user})
            assert r.status_code == status, (path, body, r.text)
        check(rig, before, user, requests=2, errors=0 if status == 200 else 2,
              tokens=status == 200)


def hold_slots(rig: Rig) -> list[socket.socket]:
    """The Ollama-only simulator's four slots, each held by a long stream."""
    holders = [raw_post(rig.st.port, "/api/chat", chat_body(OLLAMA_ONLY, True), "holder",
                        "X-Sim-Tokens: 100000\r\n") for _ in range(4)]
    for sock in holders:
        read_until(sock, b'"done":false')
    return holders


def release(rig: Rig, holders: list[socket.socket]) -> None:
    for sock in holders:
        sock.close()
    rig.settled("holder")


def test_a_queue_timeout_and_a_block_while_queued_are_refusals(rig: Rig) -> None:
    holders = hold_slots(rig)
    users = rig.st.state.stats.users
    try:
        rig.st.lt.call(setattr, rig.st.state.settings, "queue_timeout", 0.2)
        before = rig.views()
        r = httpx.post(rig.st.url + "/api/chat", json=chat_body(OLLAMA_ONLY, False),
                       headers={"X-User-ID": "qtimeout"}, timeout=10)
        assert r.status_code == 503, r.text
        check(rig, before, "qtimeout", requests=1, errors=1, done=0, rejected=1, tokens=False)
    finally:
        rig.st.lt.call(setattr, rig.st.state.settings, "queue_timeout", 600.0)
    before = rig.views()
    sock = raw_post(rig.st.port, "/api/chat", chat_body(OLLAMA_ONLY, False), "qblocked")
    wait_until(lambda: "qblocked" in users and users["qblocked"].queued == 1, "the queue")
    rig.st.lt.call(rig.st.state.operator.block_user, "qblocked", True)
    admin = httpx.Client(base_url=rig.admin, headers=AUTH, timeout=10)
    try:
        # A fifth slot: the blocked user's request is refused, not run.
        assert admin.patch("/api/backends", json={"url": rig.url(2), "slots": 5}).is_success
        assert read_until(sock, b"blocked").startswith(b"HTTP/1.1 403 ")
        sock.close()
        check(rig, before, "qblocked", requests=1, errors=1, done=0, rejected=1, tokens=False)
    finally:
        admin.delete("/api/backends/override", params={"url": rig.url(2)})
        admin.close()
        rig.st.lt.call(rig.st.state.operator.block_user, "qblocked", False)
        release(rig, holders)


def test_an_in_flight_limit_refuses_beside_a_running_stream(rig: Rig) -> None:
    user = "inflight"
    before = rig.views()
    sock = raw_post(rig.st.port, "/api/chat", chat_body(BOTH, True), user,
                    "X-Sim-Tokens: 100000\r\n")
    read_until(sock, b'"done":false', 3)
    r = httpx.post(rig.st.url + "/api/chat", json=chat_body(BOTH, False),
                   headers={"X-User-ID": user})
    assert r.status_code == 429, r.text
    sock.close()
    check(rig, before, user, requests=2, errors=1, cancelled=1, done=0, rejected=1,
          tokens=True)


def test_a_restart_keeps_every_total_and_counts_nothing_twice(rig: Rig) -> None:
    """Last in this module: the state of every case above, before and after a restart."""
    with httpx.Client(base_url=rig.admin, headers=AUTH, timeout=10) as admin:
        assert admin.get("/api/stats").json()["in_flight"] == 0
    before = rig.views()
    quotas = {u: rig.st.lt.call(rig.st.state.operator.quota, u)["used_day"]
              for u in before.users}
    rig.restart()
    after = rig.views()
    assert after.usage == before.usage
    kept = ("done", "dropped", "prompt_tokens", "completion_tokens", "estimated_tokens")
    assert {u: {k: s[k] for k in kept} for u, s in after.users.items()} == {
        u: {k: s[k] for k in kept} for u, s in before.users.items()}
    for key in ("prompt_tokens", "completion_tokens", "estimated_tokens", "cancelled"):
        assert after.stats[key] == before.stats[key], key
    for name in ("ollamamq_prompt_tokens_total", "ollamamq_completion_tokens_total",
                 "ollamamq_cancelled_total"):
        assert after.metric(name) == before.metric(name), name
    policy = rig.st.state.policy
    rig.st.lt.run(policy.quota.refresh(False))
    assert {u: rig.st.lt.call(rig.st.state.operator.quota, u)["used_day"]
            for u in before.users} == quotas


def test_a_request_refused_by_auth_is_a_line_and_a_response_not_usage(
        tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    st = start_stack(admin_port=0, admin_token=TOKEN, auth="keys", log_file=str(log))
    try:
        admin = f"http://127.0.0.1:{st.gateway.admin_port}"
        for headers in ({}, {"Authorization": "Bearer nope"}):
            r = httpx.post(st.url + "/api/chat", json=chat_body(BOTH, False), headers=headers)
            assert r.status_code == 401
        wait_until(lambda: log.exists() and len(log.read_text().splitlines()) == 2,
                   "two access lines")
        assert [json.loads(x)["status"] for x in log.read_text().splitlines()] == [401, 401]
        metrics = httpx.get(admin + "/metrics", headers=AUTH).text
        assert 'ollamamq_requests_total{backend="",route="/api/chat",status="401"} 2.0' in metrics
        assert httpx.get(admin + "/api/usage", headers=AUTH).json()["rows"] == []
        assert httpx.get(admin + "/api/users", headers=AUTH).json()["users"] == []
    finally:
        st.close()
