"""Fair-share scenarios through a real gateway and simulator (slots=1, so the
dispatch order is the completion order)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import Counter

import httpx
import pytest
from harness import Stack, fast_sim_options, start_stack, wait_until

# ~2 tokens at 200 tokens/s after a 5 ms TTFT: a service time of ~15 ms.
SERVICE = fast_sim_options(tokens=2, tokens_per_s=200.0)


def _request(user: str, tokens: int | None = None, delay_ms: int = 0) -> bytes:
    body = json.dumps({"model": "llama3.2", "prompt": "q", "stream": False}).encode()
    extra = b""
    if tokens is not None:
        extra += b"X-Sim-Tokens: %d\r\n" % tokens
    if delay_ms:
        extra += b"X-Sim-Delay-Ms: %d\r\n" % delay_ms
    return (b"POST /api/generate HTTP/1.1\r\nHost: gw\r\nX-User-ID: " + user.encode() + b"\r\n"
            + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body)


async def _one(port: int, user: str, order: list[str], **kw) -> int:  # type: ignore[no-untyped-def]
    status, _ = await _timed(port, user, **kw)
    order.append(user)
    return status


async def _timed(port: int, user: str, **kw) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    """One request; its status and the backend's `created_at` (when it ran)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_request(user, **kw))
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    body = await reader.readexactly(length)
    writer.close()
    status = int(head.split(b" ")[1])
    return status, json.loads(body).get("created_at", "") if status == 200 else ""


def _ns(stamp: str) -> tuple[str, str]:
    """A sortable form of an RFC 3339 stamp with up to 9 fractional digits."""
    whole, _, frac = stamp.rstrip("Z").partition(".")
    return whole, frac.ljust(9, "0")


async def _dispatch_order(stack: Stack, plan: list[str]) -> list[str]:
    """Queue `plan` (users, in push order) while no slot is free, then free the
    slot and return the order in which the requests ran.

    No timing is involved: the backend's only slot is withheld until every
    request is queued, each request is pushed only after the previous one is
    in the queue, and the run order is read from the backend's own
    `created_at` stamps (one slot: one request at a time), not from the order
    in which this client happens to read the answers.
    """
    backend = stack.state.fleet.backends[0]
    queue = stack.state.dispatcher.queue
    stack.lt.call(setattr, backend, "slots", 0)
    tasks = []
    for n, user in enumerate(plan, 1):
        tasks.append(asyncio.ensure_future(_timed(stack.port, user)))
        deadline = time.monotonic() + 10
        while len(queue) < n:
            assert time.monotonic() < deadline, f"request {n} of {user} was not queued"
            await asyncio.sleep(0.001)
    return await _release_and_order(stack, plan, tasks)


async def _release_and_order(stack: Stack, plan: list[str],
                             tasks: list[asyncio.Future[tuple[int, str]]]) -> list[str]:
    """Give the backend its slot back and return the users of `plan` (one per task)
    in the order their requests ran, read from the backend's `created_at` stamps."""
    backend = stack.state.fleet.backends[0]

    def release() -> None:
        backend.slots = 1
        stack.state.dispatcher.pump()

    stack.lt.call(release)
    results = await asyncio.gather(*tasks)
    assert {status for status, _ in results} == {200}
    ran = sorted(zip(plan, [_ns(stamp) for _, stamp in results]), key=lambda pair: pair[1])
    return [user for user, _ in ran]


@pytest.fixture()
def one_slot() -> Stack:
    st = start_stack(sims=[SERVICE], slots=1, vip_users=["vip"], boost_users=["booster"],
                     user_weights={"heavy3": 3})
    yield st
    st.close()


def test_round_robin_across_backlogged_users(one_slot: Stack) -> None:
    plan = ["a"] * 6 + ["b"] * 6 + ["c"] * 6 + ["d"] * 6
    order = asyncio.run(_dispatch_order(one_slot, plan))
    # Every round serves each backlogged user exactly once.
    for r in range(6):
        assert sorted(order[4 * r: 4 * r + 4]) == ["a", "b", "c", "d"]
    counts = Counter(order[:12])
    shares = [counts[u] for u in "abcd"]
    jain = sum(shares) ** 2 / (len(shares) * sum(x * x for x in shares))
    assert jain >= 0.99


def test_vip_goes_first(one_slot: Stack) -> None:
    plan = ["x"] * 5 + ["y"] * 5 + ["vip"] * 3
    order = asyncio.run(_dispatch_order(one_slot, plan))
    assert order[:3] == ["vip"] * 3


def test_boost_gets_twice_a_normal_share(one_slot: Stack) -> None:
    plan = ["n1"] * 8 + ["n2"] * 8 + ["booster"] * 8
    order = asyncio.run(_dispatch_order(one_slot, plan))
    counts = Counter(order[:12])
    assert counts["booster"] == 6 and counts["n1"] == 3 and counts["n2"] == 3


def test_weights_hold(one_slot: Stack) -> None:
    plan = ["heavy3"] * 9 + ["light"] * 9
    order = asyncio.run(_dispatch_order(one_slot, plan))
    counts = Counter(order[:8])
    assert counts["heavy3"] == 6 and counts["light"] == 2


def test_heavy_user_does_not_delay_light_user() -> None:
    st = start_stack(sims=[fast_sim_options(tokens=4, tokens_per_s=100.0)], slots=1)
    try:
        async def scenario() -> int:
            order: list[str] = []
            heavy = [asyncio.ensure_future(_one(st.port, "heavy", order)) for _ in range(100)]
            deadline = time.monotonic() + 5
            while len(st.state.dispatcher.queue) < 95 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            async with httpx.AsyncClient() as client:
                r = await client.post(st.url + "/api/generate", headers={"X-User-ID": "light"},
                                      json={"model": "llama3.2", "prompt": "q", "stream": False})
            for t in heavy:
                t.cancel()
            await asyncio.gather(*heavy, return_exceptions=True)
            assert r.status_code == 200
            return int(r.headers["x-gateway-queue-ms"])

        waited_ms = asyncio.run(scenario())
        # One heavy request runs ahead at most: a service time is ~45 ms.
        assert waited_ms < 120
    finally:
        st.close()


def test_newcomer_waits_for_the_running_request_only(one_slot: Stack) -> None:
    """A flooder's request runs (its turn is over); a user who arrives then
    is served next, not after a second request of the flooder: one service
    slot of delay, not two. Deterministic: the only slot is given for exactly
    one dispatch, then withheld until the newcomer is queued."""
    st = one_slot
    backend = st.state.fleet.backends[0]
    queue = st.state.dispatcher.queue

    async def scenario() -> list[str]:
        st.lt.call(setattr, backend, "slots", 0)
        plan = ["flood"] * 4
        tasks = []
        for n in range(1, 5):
            tasks.append(asyncio.ensure_future(_timed(st.port, "flood")))
            await _until(lambda n=n: len(queue) >= n, f"flood request {n} queued")

        def one_dispatch() -> None:
            backend.slots = 1
            st.state.dispatcher.pump()
            backend.slots = 0

        st.lt.call(one_dispatch)
        await _until(lambda: len(queue) == 3, "the first flood request dispatched")
        tasks.append(asyncio.ensure_future(_timed(st.port, "light")))
        plan.append("light")
        await _until(lambda: len(queue) == 4, "the light request queued")
        return await _release_and_order(st, plan, tasks)

    assert asyncio.run(scenario()) == ["flood", "light", "flood", "flood", "flood"]


def test_newcomer_goes_ahead_of_a_flooder_whose_first_request_did_not_wait(
        one_slot: Stack) -> None:
    """The flooder's first request found the gateway idle and started at once,
    without waiting in the queue; its second waits. A user who arrives then
    has not been served, the flooder has: the newcomer runs next. (The rule
    knew only the queue's own dispatches, so the newcomer waited for the
    flooder's running request and then a second one.)"""
    st = one_slot
    backend = st.state.fleet.backends[0]
    queue = st.state.dispatcher.queue

    async def scenario() -> list[str]:
        first = asyncio.ensure_future(_timed(st.port, "flood"))
        await _until(lambda: backend.in_flight == 1, "the first flood request running")
        st.lt.call(setattr, backend, "slots", 0)  # its end frees no slot
        tasks, plan = [], ["flood", "flood", "light"]
        for n, user in enumerate(plan[1:], 1):
            tasks.append(asyncio.ensure_future(_timed(st.port, user)))
            await _until(lambda n=n: len(queue) == n, f"request {n} queued")
        assert (await first)[0] == 200
        return await _release_and_order(st, plan[1:], tasks)

    assert asyncio.run(scenario()) == ["light", "flood"]


async def _until(check, what: str, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.002)


def test_clients_leaving_the_queue_are_counted_and_leave_nothing(one_slot: Stack) -> None:
    """Connect, queue, disconnect, many times: the queue and the in-flight
    counts go back to zero, and every request whose client left is counted as
    cancelled, gateway-wide as per user (`dropped`), whether it had reached a
    backend or was still waiting."""
    st = one_slot
    backend = st.state.fleet.backends[0]
    queue = st.state.dispatcher.queue
    stats = st.state.stats
    st.lt.call(setattr, backend, "slots", 0)
    socks = []
    try:
        for n in range(1, 31):
            sock = socket.create_connection(("127.0.0.1", st.port), timeout=5)
            sock.sendall(_request(f"leaver{n % 3}"))
            socks.append(sock)
            wait_until(lambda n=n: len(queue) >= n, f"request {n} queued")
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: len(queue) == 0, "the queue emptied")
    users = [stats.users[f"leaver{k}"] for k in range(3)]
    wait_until(lambda: sum(u.dropped for u in users) == 30, "every request counted as dropped")
    assert [(u.queued, u.in_flight) for u in users] == [(0, 0)] * 3
    assert stats.cancelled == 30
    assert backend.in_flight == 0


def test_unknown_model_and_full_queue_answers() -> None:
    st = start_stack(sims=[fast_sim_options(tokens=2, tokens_per_s=50.0)], slots=1,
                     max_queue_per_user=2)
    try:
        async def scenario() -> list[int]:
            order: list[str] = []
            tasks = [asyncio.ensure_future(_one(st.port, "greedy", order)) for _ in range(5)]
            return list(await asyncio.gather(*tasks))

        statuses = asyncio.run(scenario())
        assert statuses.count(429) == 2 and statuses.count(200) == 3
        r = httpx.post(st.url + "/api/generate", json={"model": "x", "prompt": "q"},
                       headers={"X-User-ID": "greedy"})
        assert r.status_code == 404
    finally:
        st.close()


def test_queue_timeout_gives_503_with_retry_after() -> None:
    st = start_stack(sims=[fast_sim_options()], slots=1, queue_timeout=1.0)
    try:
        async def scenario() -> httpx.Response:
            order: list[str] = []
            blocker = asyncio.ensure_future(_one(st.port, "blocker", order, delay_ms=2000))
            await asyncio.sleep(0.1)
            async with httpx.AsyncClient(timeout=10) as client:
                r = await client.post(st.url + "/v1/chat/completions",
                                      json={"model": "llama3.2",
                                            "messages": [{"role": "user", "content": "q"}]})
            await blocker
            return r

        r = asyncio.run(scenario())
        assert r.status_code == 503
        assert int(r.headers["retry-after"]) > 0
        assert "queue" in r.json()["error"]["message"]
    finally:
        st.close()


def test_a_reload_takes_back_what_the_file_no_longer_grants(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SIGHUP re-reads VIP, Boost and weights: a user the file no longer lists
    loses what the file gave them (a reload only ever added, so a VIP taken
    out of the file kept absolute priority until a restart), while what the
    operator set at run time stays, as it does over a restart."""
    config = tmp_path / "gw.toml"
    config.write_text('[users]\nvip = ["alice", "carl"]\nboost = ["bea"]\n'
                      '[users.weights]\nbob = 3\n')
    # "flag" came with --vip: a reload of the file keeps it.
    st = start_stack(sims=[SERVICE], config_path=str(config), vip_users=["alice", "carl", "flag"],
                     boost_users=["bea"], user_weights={"bob": 3}, flag_vip_users=["flag"])
    try:
        queue = st.state.dispatcher.queue
        st.lt.call(lambda: st.state.operator.set_user("dora", vip=True))
        st.lt.call(lambda: st.state.operator.set_user("carl", weight=2))  # stored: vip, weight 2
        config.write_text('[users]\nvip = ["ed"]\n')
        st.lt.call(st.gateway.reload)
        got = st.lt.call(lambda: {u: (queue.is_vip(u), queue.is_boost(u), queue.weight(u))
                                  for u in ("alice", "bea", "bob", "carl", "dora", "ed", "flag")})
        assert got == {"alice": (False, False, 1), "bea": (False, False, 1),
                       "bob": (False, False, 1), "carl": (True, False, 2),
                       "dora": (True, False, 1), "ed": (True, False, 1),
                       "flag": (True, False, 1)}
    finally:
        st.close()


def test_users_waiting_for_a_busy_model_cost_a_pump_one_pick_per_model(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Many users' requests wait for the one busy backend of their model while
    another backend is free: each arrival's pump asks the fleet once for that
    model, not once per waiting user (it was O(users) picks per arrival, so a
    queue of distinct users filled in quadratic time)."""
    from ollamamq_fast import buildinfo
    from ollamamq_fast.fleet.select import Fleet
    if buildinfo.build() == "mypyc":
        pytest.skip("counts calls by patching Fleet.pick: the pure run does")
    st = start_stack(sims=[fast_sim_options(models=["big:latest"], tokens=400,
                                            tokens_per_s=20.0),
                           fast_sim_options(models=["small:latest"])], slots=1)
    socks: list[socket.socket] = []
    try:
        body = json.dumps({"model": "big", "prompt": "q"}).encode()

        def send(user: str) -> None:
            s = socket.create_connection(("127.0.0.1", st.port), timeout=10)
            s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: gw\r\nX-User-ID: " + user.encode()
                      + b"\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
            socks.append(s)

        queue = st.state.dispatcher.queue
        send("runner")  # holds big's only slot for 20 s
        wait_until(lambda: st.state.fleet.backends[0].in_flight == 1, "the runner started")
        for i in range(60):
            send(f"user{i}")
        wait_until(lambda: len(queue) == 60, "60 users queued")
        picks = 0
        real_pick = Fleet.pick

        def counting(self: Fleet, *args: object, **kwargs: object) -> object:
            nonlocal picks
            picks += 1
            return real_pick(self, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(Fleet, "pick", counting)
        send("late")
        wait_until(lambda: len(queue) == 61, "the late user queued")
        assert picks <= 3, picks
    finally:
        for s in socks:
            s.close()
        st.close()
