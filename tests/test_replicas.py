"""Several gateway replicas, one fleet, through one Redis (issue 16, part 2).

Real processes: a redis-server, two or three `ollamamq-fast serve --redis`
replicas and simulators in this process. Checked from outside:

- the fleet-wide number of requests running on a backend never exceeds its
  slots (the simulator records its peak);
- a light user on one replica waits about one service time while a heavy
  user floods another; two backlogged users on two replicas get equal
  service (Jain >= 0.95), and weights hold across replicas;
- a replica killed with -9 while holding leases frees them within seconds;
- Redis restarted under load: replicas schedule locally meanwhile (warning),
  nothing is lost, and slots are shared again afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import LoopThread, free_port, wait_until
from test_state import REDIS_SERVER, RedisServer

from ollamamq_fast.sim import SimOptions, SimServer, start_sim

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH")

BODY = {"model": "llama3.2", "prompt": "q", "stream": False}
# Simulated service time: 100 ms to the first token, then 4 tokens at 400/s.
SERVICE_S = 0.11


class Replica:
    """One `ollamamq-fast serve --redis` process on a free port."""

    def __init__(self, redis_url: str, backend: str, slots: int, tmp: Path,
                 extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"replica-{self.port}.log"
        self._log = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ollamamq_fast", "serve", "--no-tui", "--no-admin",
             "-p", str(self.port), "--backend-urls", backend, "--slots", str(slots),
             "--redis", redis_url, "--state", "", "--log-file", "", "--no-access-log",
             "--health-interval", "0.5", *extra],
            stdout=subprocess.DEVNULL, stderr=self._log,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{self.url} not ready in {timeout:g} s: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class Fleet:
    """Redis, one simulator and the replicas in front of it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.redis = RedisServer(tmp / "redis")
        self.redis.dir.mkdir()
        self.redis.start()
        self.lt = LoopThread()
        self.sims: list[SimServer] = []
        self.replicas: list[Replica] = []

    def sim(self, **options: Any) -> SimServer:
        opts = SimOptions(ttft_ms=100.0, tokens_per_s=400.0, tokens=4)
        for key, value in options.items():
            setattr(opts, key, value)
        server = self.lt.run(start_sim(opts, "127.0.0.1", 0))
        self.sims.append(server)
        return server

    def start(self, n: int, backend: str, slots: int, extra: tuple[str, ...] = ()) -> list[Replica]:
        new = [Replica(self.redis.url, backend, slots, self.tmp, extra) for _ in range(n)]
        self.replicas += new
        for r in new:
            r.wait_ready()
        return new

    def close(self) -> None:
        for r in self.replicas:
            r.stop()
        for s in self.sims:
            self.lt.run(s.close())
        self.lt.stop()
        self.redis.stop()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        f.close()


def _loop(url: str, user: str, until: float, out: list[tuple[int, float, float]],
          gap: float = 0.0) -> None:
    """Send requests as `user` until `until`; record (status, wait in queue s, end)."""
    with httpx.Client(timeout=30) as client:
        while time.monotonic() < until:
            r = client.post(url + "/api/generate", json=BODY, headers={"X-User-ID": user})
            queued = int(r.headers.get("x-gateway-queue-ms", "0")) / 1000
            out.append((r.status_code, queued, time.monotonic()))
            if gap:
                time.sleep(gap)


def _run(jobs: list[tuple[str, str, int, float]], seconds: float
         ) -> dict[str, list[tuple[int, float, float]]]:
    """Run (url, user, clients, gap) loops in threads for `seconds`; results per user."""
    until = time.monotonic() + seconds
    results: dict[str, list[tuple[int, float, float]]] = {}
    threads = []
    for url, user, clients, gap in jobs:
        out = results.setdefault(user, [])
        for _ in range(clients):
            threads.append(threading.Thread(target=_loop, args=(url, user, until, out, gap)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def _jain(xs: list[float]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))


def test_slot_cap_holds_across_three_replicas(fleet: Fleet) -> None:
    sim = fleet.sim()
    a, b, c = fleet.start(3, sim.url, slots=2)
    results = _run([(r.url, f"user{i}", 4, 0.0) for i, r in enumerate((a, b, c))], 2.0)
    statuses = [s for rows in results.values() for s, _, _ in rows]
    assert statuses and set(statuses) == {200}
    # 3 replicas x 4 clients, each replica alone would run 2: the backend saw 2 at most.
    assert sim.stats.peak_active == 2
    # ...and the slots were used: about 2 / SERVICE_S requests per second.
    assert len(statuses) >= 0.6 * 2.0 * 2 / SERVICE_S, len(statuses)


def test_fair_share_across_replicas(fleet: Fleet) -> None:
    sim = fleet.sim()
    a, b = fleet.start(2, sim.url, slots=2, extra=("--weight", "wendy=3", "--vip", "boss"))
    # A light user on B while a heavy user floods A with 8 clients.
    results = _run([(a.url, "heavy", 8, 0.0), (b.url, "light", 1, 0.15)], 3.0)
    light = [q for s, q, end in results["light"] if s == 200]
    assert len(light) >= 8 and all(s == 200 for s, _, _ in results["heavy"])
    light.sort()
    # Without sharing, light would queue behind ~8 heavy requests (0.4 s and more).
    assert light[len(light) // 2] <= SERVICE_S, light
    assert light[-1] <= 2.5 * SERVICE_S, light
    # Two backlogged users on two replicas: equal service.
    results = _run([(a.url, "ann", 6, 0.0), (b.url, "bob", 6, 0.0)], 3.0)
    counts = [len(results["ann"]), len(results["bob"])]
    assert _jain([float(n) for n in counts]) >= 0.95, counts
    # Weights hold across replicas as within one: wendy (weight 3) against carl
    # on one replica, then against bob on the other (2.4x both ways here: the
    # fair queue's turns with 6 clients each and 2 slots).
    results = _run([(a.url, "wendy", 6, 0.0), (a.url, "carl", 6, 0.0)], 3.0)
    local = len(results["wendy"]) / max(1, len(results["carl"]))
    results = _run([(a.url, "wendy", 6, 0.0), (b.url, "bob", 6, 0.0)], 3.0)
    ratio = len(results["wendy"]) / max(1, len(results["bob"]))
    # Counted over 3 s windows of a few dozen requests on 2 shared cores, a
    # ratio moves by a third from one window to the next (2.2x to 2.9x seen
    # for the same code): the bound is that far, and below weight 3's excess.
    assert 1.8 <= ratio <= 3.6 and abs(ratio - local) <= 0.4 * local, (ratio, local)
    # A VIP on one replica goes ahead of everyone on the other.
    results = _run([(a.url, "ann", 6, 0.0), (b.url, "boss", 6, 0.0)], 2.0)
    assert len(results["boss"]) >= 3 * len(results["ann"]), (
        len(results["boss"]), len(results["ann"]))
    assert sim.stats.peak_active == 2


def test_replica_killed_while_holding_leases(fleet: Fleet) -> None:
    sim = fleet.sim()
    a, b = fleet.start(2, sim.url, slots=2)

    def hold() -> None:
        try:  # a request that holds its slot for 20 s
            httpx.post(a.url + "/api/generate", json=BODY, timeout=30,
                       headers={"X-User-ID": "holder", "X-Sim-Delay-Ms": "20000"})
        except httpx.HTTPError:
            pass  # the replica is killed under it

    holders = [threading.Thread(target=hold, daemon=True) for _ in range(2)]
    for t in holders:
        t.start()
    deadline = time.monotonic() + 5
    while sim.stats.active < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sim.stats.active == 2
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait()
    killed = time.monotonic()
    done: list[float] = []

    def on_b() -> None:
        r = httpx.post(b.url + "/api/generate", json=BODY, timeout=30,
                       headers={"X-User-ID": "after"})
        if r.status_code == 200:
            done.append(time.monotonic() - killed)

    workers = [threading.Thread(target=on_b) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(15)
    # The dead replica's leases lasted until their TTL (3 s), not forever.
    assert len(done) == 2, done
    assert max(done) <= 5.0, done
    assert sim.stats.peak_active == 2


def test_redis_restarted_under_load(fleet: Fleet) -> None:
    sim = fleet.sim()
    a, b = fleet.start(2, sim.url, slots=2)
    results: dict[str, list[tuple[int, float, float]]] = {}

    def load() -> None:
        results.update(_run([(a.url, "ann", 3, 0.0), (b.url, "bob", 3, 0.0)], 4.0))

    t = threading.Thread(target=load)
    t.start()
    time.sleep(0.8)
    fleet.redis.kill()
    # Both replicas notice and say so on /ready (503, with the reason).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        answers = [httpx.get(r.url + "/ready", timeout=2) for r in (a, b)]
        if all(x.status_code == 503 for x in answers):
            break
        time.sleep(0.05)
    assert all(x.status_code == 503 for x in answers)
    assert "Redis is unreachable" in answers[0].json()["reasons"][0]
    time.sleep(0.8)
    fleet.redis.start()
    t.join(30)
    statuses = [s for rows in results.values() for s, _, _ in rows]
    # Nothing lost: every request of the run was answered 200.
    assert statuses and set(statuses) == {200}, {s for s in statuses if s != 200}
    for r in (a, b):
        r.wait_ready(10)
        text = r.log.read_text()
        assert "unreachable" in text and "answers again" in text, text
    # Shared again: a fresh burst stays within the slots fleet-wide.
    sim.stats.peak_active = sim.stats.active
    results = _run([(a.url, "ann", 4, 0.0), (b.url, "bob", 4, 0.0)], 1.5)
    assert {s for rows in results.values() for s, _, _ in rows} == {200}
    assert sim.stats.peak_active <= 2


def test_slots_shared_again_after_redis_returns_without_queueing(fleet: Fleet) -> None:
    # Two clients per replica on 2 slots: while Redis is away each replica runs
    # its full slots (4 at the backend). When it answers again, the replicas
    # keep what they run; none queues, so nothing used to make them give the
    # excess back and the backend saw 4 for as long as the load lasted.
    sim = fleet.sim()
    a, b = fleet.start(2, sim.url, slots=2)
    stop = threading.Event()
    statuses: list[int] = []

    def client(url: str, user: str) -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                statuses.append(c.post(url + "/api/generate", json=BODY,
                                       headers={"X-User-ID": user}).status_code)

    threads = [threading.Thread(target=client, args=(r.url, user))
               for r, user in ((a, "ann"), (a, "ann"), (b, "bob"), (b, "bob"))]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: sim.stats.requests >= 10, "traffic through both replicas")
        fleet.redis.kill()
        wait_until(lambda: sim.stats.active == 4, "local scheduling (Redis down)", 5)
        # Back without the old leases (as after an outage longer than their
        # 3 s TTL, here at once: restarted without its data).
        shutil.rmtree(fleet.redis.dir)
        fleet.redis.dir.mkdir()
        fleet.redis.start()
        for r in (a, b):
            r.wait_ready(5)
        # In-flight requests of the outage drain in a service time or two.
        start = sim.stats.requests
        wait_until(lambda: sim.stats.requests >= start + 8, "requests after the recovery")
        sim.stats.peak_active = sim.stats.active
        start = sim.stats.requests
        wait_until(lambda: sim.stats.requests >= start + 16, "a second of requests")
        assert sim.stats.peak_active <= 2, sim.stats.peak_active
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert statuses and set(statuses) == {200}


def _probes(cli: Any) -> int:
    """Commands the replicas sent Redis that could be a recovery probe, refused or not."""
    stats = cli.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get(kind, 0))
               for name in ("ping", "set", "evalsha", "eval")
               for kind in ("calls", "rejected_calls", "failed_calls"))


def _stays_local_then_recovers(replica: Replica, cli: Any, undo: Any) -> None:
    """`replica` went local once and stays so (no flapping), then `undo()` brings it back."""
    wait_until(lambda: "is unreachable" in replica.log.read_text(), "the replica to go local")
    start = _probes(cli)
    wait_until(lambda: _probes(cli) >= start + 6, "the replica to try Redis again", 10)
    assert httpx.get(replica.url + "/ready", timeout=2).status_code == 503
    text = replica.log.read_text()
    assert text.count("is unreachable") == 1 and "answers again" not in text, text
    # Requests are served meanwhile (locally).
    r = httpx.post(replica.url + "/api/generate", json=BODY, timeout=10)
    assert r.status_code == 200
    undo()
    replica.wait_ready(5)
    assert replica.log.read_text().count("answers again") == 1


def test_redis_refusing_writes_is_down_until_it_takes_them(fleet: Fleet) -> None:
    # Out of memory (noeviction): Redis answers PING but refuses the round's
    # writes. The replica used to take each PING for a recovery, fail the next
    # round at once and flap, two warnings every 0.5 s and /ready flickering.
    import redis

    sim = fleet.sim()
    (a,) = fleet.start(1, sim.url, slots=2)
    cli = redis.Redis.from_url(fleet.redis.url)
    try:
        cli.config_set("maxmemory-policy", "noeviction")
        cli.config_set("maxmemory", "1")
        _stays_local_then_recovers(a, cli, lambda: cli.config_set("maxmemory", "0"))
    finally:
        cli.close()


def test_redis_user_without_scripts_is_told_and_stays_local(fleet: Fleet) -> None:
    # An ACL user that may read and write but not run scripts: the state store
    # works, the shared slots cannot: one warning saying why, no flapping.
    import redis

    cli = redis.Redis.from_url(fleet.redis.url)
    try:
        cli.acl_setuser("gw", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                        commands=["+@all", "-@scripting"])
        sim = fleet.sim()
        url = fleet.redis.url.replace("redis://", "redis://gw:pw@")
        a = Replica(url, sim.url, 2, fleet.tmp)
        fleet.replicas.append(a)
        _stays_local_then_recovers(a, cli, lambda: cli.acl_setuser("gw", commands=["+@scripting"]))
        assert "no permissions" in a.log.read_text() and ":pw@" not in a.log.read_text()
    finally:
        cli.close()

def test_sigterm_keeps_requests_waiting_for_another_replicas_slots(fleet: Fleet) -> None:
    # A rolling restart: B is stopped while its requests wait for slots A
    # holds. Nothing ran on B, so its drain ended at once and closed their
    # connections unanswered; now they wait for A's slots and are served.
    import redis

    sim = fleet.sim()
    a, b = fleet.start(2, sim.url, slots=2)
    out: list[object] = []

    def post(url: str, user: str, delay_ms: int) -> None:
        try:
            r = httpx.post(url + "/api/generate", json=BODY, timeout=20,
                           headers={"X-User-ID": user, "X-Sim-Delay-Ms": str(delay_ms)})
            out.append(r.status_code)
        except httpx.HTTPError as exc:
            out.append(type(exc).__name__)

    threads = [threading.Thread(target=post, args=(a.url, "holder", 800)) for _ in range(2)]
    for t in threads:
        t.start()
    wait_until(lambda: sim.stats.active == 2, "A to hold both slots")
    threads.append(threading.Thread(target=post, args=(b.url, "waiter", 0)))
    threads[-1].start()
    cli = redis.Redis.from_url(fleet.redis.url)
    try:  # B announces that it waits for the backend's slots
        wait_until(lambda: cli.hlen(f"ollamamq:sched:wait:{sim.url}") == 1, "B to wait")
    finally:
        cli.close()
    b.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(20)
    assert b.proc.wait(20) == 0
    assert out == [200] * 3, out


def test_sigterm_while_redis_is_down_exits_cleanly(fleet: Fleet) -> None:
    # Redis gone, requests served locally (their usage not stored), then a
    # SIGTERM: the last flush used to raise out of the stop (traceback, exit 1).
    sim = fleet.sim()
    (a,) = fleet.start(1, sim.url, slots=2)
    fleet.redis.kill()
    for _ in range(3):
        assert httpx.post(a.url + "/api/generate", json=BODY, timeout=10,
                          headers={"X-User-ID": "ann"}).status_code == 200
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(20) == 0, a.log.read_text()
    text = a.log.read_text()
    assert "Traceback" not in text and "the store is unavailable at stop" in text, text


def test_slot_cap_holds_for_a_backend_of_a_named_pool(fleet: Fleet) -> None:
    default, pooled = fleet.sim(), fleet.sim()
    cfg = fleet.tmp / "pools.toml"
    cfg.write_text(f'[pools.team]\nbackends = [{{ url = "{pooled.url}", slots = 2 }}]\n')
    a, b = fleet.start(2, default.url, slots=2, extra=("--config", str(cfg)))
    results = _run([(a.url + "/pool/team", "ann", 4, 0.0),
                    (b.url + "/pool/team", "bob", 4, 0.0)], 2.0)
    statuses = [s for rows in results.values() for s, _, _ in rows]
    assert statuses and set(statuses) == {200}
    # A replica that found Redis slow or gone would schedule locally: its log says so.
    logs = "\n".join(r.log.read_text() for r in (a, b))
    assert pooled.stats.peak_active == 2 and default.stats.peak_active == 0, logs
