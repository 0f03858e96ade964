"""Backend slots and fair share shared by several replicas through Redis (`--redis`).

Without Redis every replica runs up to `slots` requests on a backend, so two
replicas send it twice its slots, and a user flooding one replica is not
slowed for a light user on another. With Redis:

* Leases. Each replica holds a lease of some of a backend's slots, kept in a
  hash `{ns}:sched:slots:{url}` (replica -> slots held). A Lua script grants
  only what is free, so the leases of all replicas never add up to more than
  the backend's slots, and the dispatcher runs at most its lease
  (`Backend.cap`). Leases are tied to the replica's liveness key
  `{ns}:sched:alive:{replica}`, renewed every TICK_S with a TTL of
  LEASE_TTL_S: a replica killed with -9 loses its leases when the key
  expires, and the next script run by any replica drops them.
* Batches. Slots are leased for as long as they are used, not per request:
  a slot freed while nobody waits (here or on another replica) stays leased
  for the next request, so a replica under steady traffic makes no Redis
  round trip per request. Unused leases are given back after LINGER_S, at
  once when another replica waits.
* Fair share. Each replica counts the service every user got (one per started
  request, divided by the user's weight, doubled weight for Boost) in
  `{ns}:sched:svc:{user}`, a counter that halves every HALF_LIFE_S, as in
  start-time fair queuing: a request starts at the later of its user's counter
  and a shared virtual clock (`{ns}:sched:vclock`, the latest start served),
  so a new or returning user joins at the clock, not far behind. A replica
  with requests waiting announces the smallest count among its waiting users
  (its priority; -1 for a VIP) in `{ns}:sched:wait:{url}`; a free slot goes to
  the waiting replica with the smallest one, and while anybody waits a replica
  does not reuse a slot that frees without asking Redis. So a light user on
  one replica is served before a heavy user flooding another, and two
  backlogged users on two replicas take turns.
* Degraded mode. When Redis cannot be reached the replicas schedule locally
  (every backend's full slots), with a warning, and come back to shared slots
  when it answers again, re-leasing what they run; nothing queued is lost.

The dispatcher calls three hooks (sched/dispatcher.py SharedSlotsHook); all
Redis traffic happens in one background task, one script call per round.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING, Any, Protocol

from redis.exceptions import RedisError

from ollamamq_fast.config import redact_url
from ollamamq_fast.tasks import cancel_and_wait

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

    from ollamamq_fast.fleet.backend import Backend
    from ollamamq_fast.proxy.exchange import Exchange
    from ollamamq_fast.sched.dispatcher import Dispatcher
    from ollamamq_fast.sched.fairqueue import FairQueue

log = logging.getLogger("ollamamq_fast.sched")

# A replica's leases last this long after its last renewal.
LEASE_TTL_S = 3.0
# Renewal and housekeeping period (also how soon a busy replica notices waiters).
TICK_S = 0.1
# A replica whose requests wait for a slot asks again this often.
POLL_S = 0.01
# Leased slots unused this long go back to the fleet.
LINGER_S = 1.0
# Per-user service counters halve in this time.
HALF_LIFE_S = 10.0
# A waiting replica's announcement is ignored after this long without renewal.
STALE_S = 1.0
# While Redis is unreachable, it is tried again this often.
RETRY_S = 0.5
# Redis must answer within this, or the replica schedules locally. Going local
# lets every replica run a backend's full slots (over-commit until Redis is
# back), so a Redis that is merely slow for a moment (a busy host) must not
# trigger it; a Redis that is down refuses connections at once anyway.
REDIS_TIMEOUT_S = 2.0
# At most this many queued requests and users are looked at per round.
SCAN_LIMIT = 256
USERS_LIMIT = 64

# One round for one replica, atomically: renew its liveness, add its users'
# service, compute its priority, then for each backend drop dead replicas'
# leases and stale waiters, and grant free slots (none that a replica with a
# better priority waits for). Keys are built from ARGV[2] (standalone Redis).
_ROUND_LUA = """
local me = ARGV[1]
local prefix = ARGV[2]
local ttl = tonumber(ARGV[3])
local half = tonumber(ARGV[4])
local stale = tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', prefix .. 'alive:' .. me, '1', 'PX', ttl)
-- A decaying counter and when it was last written (0: never).
local function decayed(key)
  local raw = redis.call('GET', key)
  if not raw then return 0, 0 end
  local v, s = string.match(raw, '([^:]+):([^:]+)')
  v = tonumber(v)
  s = tonumber(s)
  if now > s then v = v * math.pow(0.5, (now - s) / half) end
  return v, s
end
local function served(user)
  return (decayed(prefix .. 'svc:' .. user))
end
local keep = math.floor(half * 10)
local i = 6
local n = tonumber(ARGV[i])
local charges = i + 1
i = charges + 2 * n
n = tonumber(ARGV[i])
local users = i + 1
local first = users + 2 * n
-- Start-time fair queuing over decaying counters: a user's counter is the
-- finish tag of its last request. A user served within the last second goes
-- on from there; a new one, or one back after a pause, starts at the virtual
-- clock (the latest start served) instead of far behind: it is served first
-- once, then shares, with no catch-up burst.
local vclock = (decayed(prefix .. 'vclock'))
for c = charges, users - 3, 2 do
  local user = ARGV[c]
  local start, stamp = decayed(prefix .. 'svc:' .. user)
  if now - stamp > 1000 and vclock > start then start = vclock end
  redis.call('SET', prefix .. 'svc:' .. user,
             string.format('%.6f:%d', start + tonumber(ARGV[c + 1]), now), 'PX', keep)
  if start > vclock then vclock = start end
end
if charges < users - 1 then  -- there were charges
  redis.call('SET', prefix .. 'vclock', string.format('%.6f:%d', vclock, now), 'PX', keep)
end
-- Priority: the least service among this replica's waiting users (-1: a VIP);
-- `unit` is what one request of that user adds (1 / weight).
local prio = 1e15
local unit = 0
for c = users, first - 1, 2 do
  local p = -1
  if ARGV[c + 1] ~= '0' then p = served(ARGV[c]) end
  if p < prio then
    prio = p
    unit = tonumber(ARGV[c + 1])
  end
end
local granted = 0
i = first
local out = {tostring(prio)}
while i <= #ARGV do
  local url = ARGV[i]
  local slots = tonumber(ARGV[i + 1])
  local floor = tonumber(ARGV[i + 2])
  local need = tonumber(ARGV[i + 3])
  local extra = tonumber(ARGV[i + 4])
  i = i + 5
  local hk = prefix .. 'slots:' .. url
  local wk = prefix .. 'wait:' .. url
  local others = 0
  local holds = redis.call('HGETALL', hk)
  for j = 1, #holds, 2 do
    local r = holds[j]
    if r ~= me then
      if redis.call('EXISTS', prefix .. 'alive:' .. r) == 1 then
        others = others + tonumber(holds[j + 1])
      else
        redis.call('HDEL', hk, r)
      end
    end
  end
  local better = 0
  local waiting = 0
  local waits = redis.call('HGETALL', wk)
  for j = 1, #waits, 2 do
    local r = waits[j]
    if r ~= me then
      local p, ts = string.match(waits[j + 1], '([^:]+):([^:]+)')
      if now - tonumber(ts) > stale or redis.call('EXISTS', prefix .. 'alive:' .. r) == 0 then
        redis.call('HDEL', wk, r)
      else
        waiting = waiting + 1
        if tonumber(p) < prio then better = better + 1 end
      end
    end
  end
  local grant = 0
  local over = others + floor - slots
  if over > 0 then
    -- More is leased than the backend has (this replica scheduled locally
    -- while Redis was away, or the slots were lowered): give back the excess.
    -- A negative grant; the replica starts nothing more until it is under it.
    grant = -math.min(over, floor)
  elseif need > 0 then
    local want = need
    if waiting == 0 then want = need + extra end
    grant = math.min(want, slots - others - floor - better)
    if grant < 0 then grant = 0 end
  end
  local held = floor + grant
  if held > 0 then
    redis.call('HSET', hk, me, held)
    redis.call('PEXPIRE', hk, ttl * 10)
  else
    redis.call('HDEL', hk, me)
  end
  if grant > 0 then granted = granted + grant end
  if need > 0 and need > grant then
    -- Announced as if the slots just granted were already charged (they are
    -- at this replica's next round), so others do not see it better than it is.
    redis.call('HSET', wk, me, tostring(prio + granted * unit) .. ':' .. now)
    redis.call('PEXPIRE', wk, ttl * 10)
  else
    redis.call('HDEL', wk, me)
  end
  out[#out + 1] = grant
  out[#out + 1] = waiting
end
return out
"""

# Gives back everything this replica holds (clean stop).
_LEAVE_LUA = """
local me = ARGV[1]
local prefix = ARGV[2]
redis.call('DEL', prefix .. 'alive:' .. me)
for i = 3, #ARGV do
  redis.call('HDEL', prefix .. 'slots:' .. ARGV[i], me)
  redis.call('HDEL', prefix .. 'wait:' .. ARGV[i], me)
end
return 1
"""


class PoolsView(Protocol):
    """What shared slots read of the gateway's pools (pools.py `Pools`)."""

    @property
    def backends(self) -> list[Backend]:
        """Every backend of every pool, each once."""

    def dispatchers(self) -> list[Dispatcher]:
        """Every pool's dispatcher, default first."""

    def pump_all(self) -> None:
        """Let every pool start what it can."""


class SharedSlots:
    """This replica's side of the shared slots; runs one background task on the loop.

    A backend listed by several pools is one set of slots: its lease serves
    every pool, and the demand and waiting users of every pool count.
    """

    def __init__(self, url: str, namespace: str, replica: str, pools: PoolsView,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.url = url
        self.prefix = f"{namespace}:sched:"
        self.replica = replica
        self.pools = pools
        self.loop = loop
        self.degraded = False
        self.rounds = 0
        self.failures = 0
        # Backends we hold (or held) a lease on, by URL; removed ones stay until idle.
        self.tracked: dict[str, Backend] = {}
        # Other replicas waited for a backend at our last round.
        self.contended: set[str] = set()
        # Rounds in a row in which a backend's lease had unused slots and no demand.
        self.idle_rounds: dict[str, int] = {}
        # The lease Redis last recorded for each backend (0: none).
        self.reported: dict[str, int] = {}
        self.charges: dict[str, float] = {}
        self.priority = math.inf
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._redis: Redis | None = None
        self._round: AsyncScript | None = None
        self._leave: AsyncScript | None = None

    # -- Lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Connect and start the background task (leases are taken on demand)."""
        import redis.asyncio as aioredis

        r = aioredis.Redis.from_url(self.url, decode_responses=False,
                                    socket_timeout=REDIS_TIMEOUT_S,
                                    socket_connect_timeout=REDIS_TIMEOUT_S)
        self._redis = r
        self._round = r.register_script(_ROUND_LUA)
        self._leave = r.register_script(_LEAVE_LUA)
        self._attach()
        for b in self.pools.backends:
            self._share(b)
        try:
            await self._round_once()  # registers this replica; /ready waits for it
        except Exception as exc:  # noqa: BLE001 -- start degraded, recover in the background
            self._go_local(exc)
        self._task = self.loop.create_task(self._run(), name="ollamamq-shared-slots")

    async def stop(self) -> None:
        """Stop the task and give back every lease (requests have drained by now)."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        r, self._redis = self._redis, None
        if r is None:
            return
        try:
            if self._leave is not None and not self.degraded:
                await self._leave(args=[self.replica, self.prefix, *self.tracked])
        except Exception as exc:  # noqa: BLE001 -- the leases then expire with the TTL
            log.warning("shared slots: could not give back the leases (%s); they expire "
                        "within %.0f s", exc, LEASE_TTL_S)
        finally:
            await r.aclose()
        for b in self.tracked.values():
            b.shared = False
            b.cap = b.slots

    # -- Hooks (the dispatcher, on the loop) -------------------------------------------

    def charge(self, user: str, queue: FairQueue) -> None:
        """A slotted request of `user` starts (from `queue`): count its service fleet-wide.

        One request adds 1 / weight (Boost doubles the weight; a VIP counts 1).
        """
        unit = 1.0 if queue.is_vip(user) else 1.0 / _weight(queue, user)
        self.charges[user] = self.charges.get(user, 0.0) + unit

    def wanted(self) -> None:
        """Requests wait: lease slots now rather than at the next tick."""
        if not self.degraded:
            self._wake.set()

    def gave_back(self, backend: Backend) -> None:
        """A slot freed: keep it for the next request unless someone may be owed it."""
        if not backend.shared or backend.cap <= backend.in_flight:
            return
        if backend.name in self.contended or self._backlogged():
            # Waiters here or elsewhere: Redis decides who gets the slot next.
            backend.cap = backend.in_flight
            self._wake.set()

    def adopt(self, backend: Backend) -> None:
        """A backend made at run time (a pool, the admin API): under shared slots at once,
        not at the next round, so it never runs its full slots here meanwhile."""
        if not self.degraded and self._redis is not None:
            self._share(backend)

    # -- Readiness, status -----------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """State for /ready, /api/stats and tests."""
        return {"degraded": self.degraded, "rounds": self.rounds, "failures": self.failures,
                "leases": {url: b.cap for url, b in self.tracked.items() if b.shared}}

    # -- Background task ------------------------------------------------------------

    def _share(self, backend: Backend) -> None:
        """Put a backend under shared slots: it runs only what this replica leases."""
        if backend.shared:
            return
        backend.shared = True
        # Running requests keep their slots (re-leased at the next round).
        backend.cap = backend.in_flight
        self.tracked[backend.name] = backend

    def _go_local(self, exc: BaseException) -> None:
        """Redis is unreachable: every backend's full slots, until it answers again."""
        self.failures += 1
        if not self.degraded:
            log.warning("shared slots: Redis at %s is unreachable (%s); scheduling locally "
                        "(each replica up to every backend's slots) until it answers",
                        redact_url(self.url), str(exc) or type(exc).__name__)
        self.degraded = True
        self.charges.clear()
        for b in self.tracked.values():
            b.shared = False
            b.cap = b.slots
        self.tracked.clear()
        self.contended.clear()
        self.reported.clear()
        self.pools.pump_all()

    async def _run(self) -> None:
        delay = TICK_S
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass
            self._wake.clear()
            if self.degraded:
                delay = await self._try_recover()
                continue
            try:
                delay = await self._round_once()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                self._go_local(exc)
                delay = RETRY_S
            except Exception as exc:  # a bug: say so, and stay safe (local)
                log.exception("shared slots: round failed")
                self._go_local(exc)
                delay = RETRY_S

    async def _try_recover(self) -> float:
        script = self._round
        assert script is not None
        try:
            # The round itself with no backend (it renews our liveness), not a
            # PING: a Redis that answers but refuses writes (out of memory, a
            # read-only replica) or scripts (an ACL) would fail the next round
            # at once, flapping between shared and local (two warnings a RETRY_S).
            await script(args=[self.replica, self.prefix, int(LEASE_TTL_S * 1000),
                               int(HALF_LIFE_S * 1000), int(STALE_S * 1000), 0, 0])
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 -- still down
            return RETRY_S
        log.warning("shared slots: Redis at %s answers again; slots are shared again",
                    redact_url(self.url))
        self.degraded = False
        for b in self.pools.backends:
            self._share(b)
        return 0.0

    def _attach(self) -> None:
        """Give every pool's dispatcher the hooks (pools may be added at run time)."""
        for d in self.pools.dispatchers():
            if d.shared is not self:
                d.shared = self

    def _backlogged(self) -> bool:
        """Whether requests wait in any pool (a freed slot may be owed elsewhere)."""
        for d in self.pools.dispatchers():
            if d.queue or d.retry_line:
                return True
        return False

    def _demand(self) -> dict[str, int]:
        """Queued requests each backend could take (per pool the oldest SCAN_LIMIT, and retries)."""
        demand: dict[str, int] = {}
        for d in self.pools.dispatchers():
            if not d.queue and not d.retry_line:
                continue
            waiting: list[Exchange] = [t.payload for t in  # type: ignore[misc]
                                       d.queue.oldest(SCAN_LIMIT)]
            waiting.extend(list(d.retry_line)[:SCAN_LIMIT])
            fleet = d.fleet
            for ex in waiting:
                route = ex.route
                if route is None:
                    continue
                for b in fleet.candidates(ex.model, route.native):
                    if (b.available or b.probing > 0) and b not in ex.failed:
                        demand[b.name] = demand.get(b.name, 0) + 1
        return demand

    def _users(self) -> list[str]:
        """Waiting users, each followed by what one request adds to its counter
        (1 / weight, Boost doubling the weight) or "0" for a VIP, flattened for the script.
        """
        seen: dict[str, FairQueue] = {}
        for d in self.pools.dispatchers():
            queue = d.queue
            for user in queue.users()[:USERS_LIMIT]:
                seen.setdefault(user, queue)
            for ex in list(d.retry_line)[:USERS_LIMIT]:
                seen.setdefault(ex.user, queue)
            if len(seen) >= USERS_LIMIT:
                break
        out: list[str] = []
        for user, queue in seen.items():
            out += [user, "0" if queue.is_vip(user) else repr(1.0 / _weight(queue, user))]
        return out

    async def _round_once(self) -> float:
        """One script call: renew, charge, lease. Returns the wait before the next round."""
        script = self._round
        assert script is not None
        self._attach()
        backends = self.pools.backends
        for b in backends:
            self._share(b)
        live = {b.name for b in backends}
        demand = self._demand()
        args: list[str | int | float] = [self.replica, self.prefix, int(LEASE_TTL_S * 1000),
                                         int(HALF_LIFE_S * 1000), int(STALE_S * 1000)]
        charges, self.charges = self.charges, {}
        args.append(len(charges))
        for user, amount in charges.items():
            args += [user, repr(amount)]
        users = self._users()
        args.append(len(users) // 2)
        args += users
        order: list[Backend] = []
        needs: list[int] = []
        floors: list[int] = []
        linger = max(1, round(LINGER_S / TICK_S))
        for url, b in list(self.tracked.items()):
            removed = url not in live
            usable = (b.available or b.probing > 0) and not removed  # (probing: for milliseconds)
            # The operator may have lowered the slots: lease no more than that.
            b.cap = min(b.cap, b.slots)
            need = max(0, demand.get(url, 0) - (b.cap - b.in_flight)) if usable else 0
            if b.cap > b.in_flight:
                idle = self.idle_rounds.get(url, 0) + 1 if need == 0 else 0
                self.idle_rounds[url] = idle
                if not usable or url in self.contended or idle >= linger:
                    b.cap = b.in_flight  # give the unused slots back
            if removed and b.in_flight == 0:
                del self.tracked[url]  # forgotten and idle: its lease goes back below
            if b.cap == 0 and need == 0 and self.reported.get(url, 0) == 0 \
                    and url not in self.contended:
                continue  # nothing held, nothing wanted, nothing to tell
            order.append(b)
            needs.append(need)
            floors.append(b.cap)
            args += [url, b.slots, b.cap, need, 1]
        reply: Any = await script(args=args)
        self.rounds += 1
        self.priority = float(reply[0])
        waiting_more = False
        granted = False
        for k, b in enumerate(order):
            grant, others_waiting = int(reply[1 + 2 * k]), int(reply[2 + 2 * k])
            if others_waiting:
                self.contended.add(b.name)
            else:
                self.contended.discard(b.name)
            if grant > 0 and b.shared:
                b.cap += grant
                granted = True
                self.idle_rounds[b.name] = 0
            elif grant < 0 and b.shared:
                # Over the backend's slots fleet-wide: runs down to the lease
                # (the cap may be below the requests still running).
                b.cap += grant
            self.reported[b.name] = floors[k] + grant
            if needs[k] > max(grant, 0):
                waiting_more = True
        if granted:
            self.pools.pump_all()
        return POLL_S if waiting_more else TICK_S


def _weight(queue: FairQueue, user: str) -> int:
    """A user's weight in the shared counters: its fair-queue weight, doubled by Boost."""
    return queue.weight(user) * (2 if queue.is_boost(user) else 1)
