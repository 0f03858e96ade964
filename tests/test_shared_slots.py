"""The round script of sched/shared_slots.py against a real Redis, call by call.

Each call is one replica's round: (replica, slots, floor = slots it keeps,
need = requests waiting, extra = batch headroom). Checked: grants never make
the leases exceed the slots; a dead replica's lease is dropped once its
liveness key expires; a waiting replica with a less-served user gets a freed
slot before a replica whose user was served more; a VIP is ahead of all; a
new user starts at the shared virtual clock.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from test_state import REDIS_SERVER, RedisServer

from ollamamq_fast.sched.shared_slots import _ROUND_LUA

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH")

URL = "http://backend:11434"
PREFIX = "t:sched:"


@pytest.fixture
def r(tmp_path: Path) -> Iterator[redis.Redis]:
    server = RedisServer(tmp_path / "redis")
    server.dir.mkdir()
    server.start()
    client = redis.Redis.from_url(server.url)
    try:
        yield client
    finally:
        client.close()
        server.stop()


def call(r: redis.Redis, me: str, *, floor: int, need: int, slots: int = 4, extra: int = 0,
         ttl_ms: int = 3000, charges: dict[str, float] | None = None,
         users: dict[str, str] | None = None) -> tuple[float, int, int]:
    """One round for one backend; returns (priority, grant, replicas waiting)."""
    args: list[str | int] = [me, PREFIX, ttl_ms, 10_000, 1000]
    charges = charges or {}
    args.append(len(charges))
    for user, amount in charges.items():
        args += [user, repr(amount)]
    users = users or {}
    args.append(len(users))
    for user, flag in users.items():
        args += [user, flag]
    args += [URL, slots, floor, need, extra]
    reply = r.eval(_ROUND_LUA, 0, *args)
    return float(reply[0]), int(reply[1]), int(reply[2])


def held(r: redis.Redis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall(PREFIX + "slots:" + URL).items()}


def test_grants_never_exceed_the_slots(r: redis.Redis) -> None:
    assert call(r, "a", floor=0, need=3)[1] == 3
    assert call(r, "b", floor=0, need=3)[1] == 1  # only one left
    assert call(r, "c", floor=0, need=2)[1] == 0
    assert sum(held(r).values()) == 4
    # a keeps one of its three (floor 1): the two it gave back go to c, still waiting.
    assert call(r, "a", floor=1, need=0)[1] == 0
    assert call(r, "c", floor=0, need=2)[1] == 2
    assert held(r) == {"a": 1, "b": 1, "c": 2}
    # Batch headroom only when nobody else waits.
    assert call(r, "a", floor=1, need=0, extra=1)[1] == 0  # need 0: no grant at all
    assert call(r, "b", floor=1, need=1, extra=2)[1] == 0  # full


def test_a_dead_replicas_lease_is_dropped_after_its_ttl(r: redis.Redis) -> None:
    assert call(r, "dead", floor=0, need=4, ttl_ms=300)[1] == 4
    assert call(r, "live", floor=0, need=2)[1] == 0
    time.sleep(0.4)  # "dead" renews no more: its liveness key expires
    assert call(r, "live", floor=0, need=2)[1] == 2
    assert held(r) == {"live": 2}


def test_a_less_served_waiter_gets_the_freed_slot(r: redis.Redis) -> None:
    # heavy (on a) has been served 10 times, light (on b) once.
    call(r, "a", floor=0, need=0, charges={"heavy": 10.0})
    call(r, "b", floor=0, need=0, charges={"light": 1.0})
    assert call(r, "a", floor=0, need=4, users={"heavy": "1"})[1] == 4
    # b waits for light: it is announced, a sees it.
    prio_b, grant, _ = call(r, "b", floor=0, need=1, users={"light": "1"})
    assert grant == 0 and prio_b == pytest.approx(1.0, abs=0.01)
    # a finishes one request and asks to reuse the slot for heavy: refused, b is better.
    _, grant, waiting = call(r, "a", floor=3, need=1, users={"heavy": "1"})
    assert (grant, waiting) == (0, 1)
    assert call(r, "b", floor=0, need=1, users={"light": "1"})[1] == 1
    # A VIP (flag "0") is ahead of everyone: priority -1.
    call(r, "b", floor=1, need=0)
    assert call(r, "c", floor=0, need=1, users={"boss": "0"})[0] == -1


def test_a_newcomer_joins_at_the_virtual_clock(r: redis.Redis) -> None:
    for _ in range(20):  # old is served 20 times, one request a round
        call(r, "a", floor=0, need=0, charges={"old": 1.0})
    call(r, "b", floor=0, need=0, charges={"new": 1.0})
    served = float(r.get(PREFIX + "svc:new").decode().split(":")[0])
    # It starts at the clock (old's last start, 19), not at zero: no catch-up burst.
    assert served == pytest.approx(20.0, abs=0.1)
    # A user served less recently than the clock still comes first (priority).
    prio, _, _ = call(r, "a", floor=0, need=1, users={"old": "1", "new": "1"})
    assert prio == pytest.approx(20.0, abs=0.1)


def test_vip_boost_and_weights_in_the_shared_counters() -> None:
    import asyncio

    from ollamamq_fast.config import Settings
    from ollamamq_fast.fleet.select import Fleet
    from ollamamq_fast.sched.dispatcher import Dispatcher
    from ollamamq_fast.sched.shared_slots import SharedSlots

    loop = asyncio.new_event_loop()
    try:
        dispatcher = Dispatcher(Fleet([]), Settings(), loop)

        class OnePool:
            def __init__(self) -> None:
                self.backends: list[object] = []

            def dispatchers(self) -> list[Dispatcher]:
                return [dispatcher]

            def pump_all(self) -> None:
                dispatcher.pump()

        shared = SharedSlots("redis://127.0.0.1:1/0", "t", "me", OnePool(), loop)
        queue = dispatcher.queue
        queue.set_vip("vip", True)
        queue.set_boost("boosted", True)
        queue.set_weight("heavy", 3)
        queue.set_weight("both", 2)
        queue.set_boost("both", True)
        for user in ("vip", "boosted", "heavy", "both", "plain"):
            queue.push(user, object(), 0.0)
        units = dict(zip(shared._users()[::2], shared._users()[1::2], strict=True))
        # What one request adds to the counter: 1 / weight, Boost doubling it; VIP: "0".
        assert units == {"vip": "0", "boosted": "0.5", "heavy": repr(1 / 3), "both": "0.25",
                         "plain": "1.0"}
        # Charges alike (a VIP's request counts 1: its priority is -1 anyway).
        for user in ("vip", "heavy", "both"):
            shared.charge(user, queue)
        assert shared.charges == {"vip": 1.0, "heavy": 1 / 3, "both": 0.25}
    finally:
        loop.close()



def test_leases_over_the_slots_are_given_back(r: redis.Redis) -> None:
    # Both replicas ran the full slots locally while Redis was away and come
    # back keeping what they run (floor 2 each on 2 slots): the one that finds
    # the other's lease gives back the excess (a negative grant), even with
    # nothing waiting, so the fleet is within the slots again.
    assert call(r, "a", floor=2, need=0, slots=2)[1] == 0
    _, grant, _ = call(r, "b", floor=2, need=0, slots=2)
    assert grant == -2 and held(r) == {"a": 2}
    assert not r.exists(PREFIX + "wait:" + URL)  # giving back is not waiting
    assert call(r, "a", floor=2, need=0, slots=2)[1] == 0
    # Only the excess goes (slots lowered from 4 to 3 under a 2 + 2 lease).
    assert call(r, "b", floor=2, need=1, slots=3)[1] == -1
    assert held(r) == {"a": 2, "b": 1}
    assert call(r, "a", floor=2, need=0, slots=3)[1] == 0
