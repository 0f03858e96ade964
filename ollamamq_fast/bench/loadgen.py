"""Load drivers for one worker process: closed loop, open loop, and the `Worker`.

A worker owns one event loop's worth of connections to one target. Each
workload group gets a driver; the driver decides what to send next when a
connection frees up and records the finished exchange into its group's
`GroupStats`. Several worker processes split concurrency, rate and request
count between them (see `runner.py`).
"""

from __future__ import annotations

import abc
import asyncio
import random
import resource
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from .client import BenchConnection, Exchange, classify, clock
from .stats import GroupStats, Histogram
from .workload import GroupSpec, RequestFactory, RunSpec, Target

# Concurrent connection attempts per worker: a burst of thousands of SYNs
# overflows the listener's accept backlog (somaxconn is often 4096) and costs
# a 1 s SYN retransmit, which would show up as fake latency.
CONNECT_BURST = 256
# Back-off after a refused connection, so a dead target is probed, not hammered.
BACKOFF_MIN = 0.01
BACKOFF_MAX = 0.25
# Connecting never waits longer than this, even with a long --timeout.
CONNECT_TIMEOUT_MAX = 10.0
# Timeout sweep period ceiling; a run's timeout is honoured within this.
SWEEP_MAX = 0.1
# After the last request was issued, how long in-flight requests may take,
# beyond --timeout, before the worker gives up on them (nothing may hang).
FINISH_GRACE = 5.0
PROGRESS_INTERVAL = 1.0
# Open loop: arrivals waiting for a free connection, per process. Past this
# the target is hopelessly overloaded; further arrivals are dropped (counted
# as unfinished) instead of growing memory without bound.
MAX_BACKLOG = 100_000

Snapshot = tuple[int, int, int, int, int]  # ok, errors, chunks, in flight, sent
ProgressFn = Callable[[Snapshot], None]


def split_share(total: int, proc: int, nprocs: int) -> int:
    """This process's share of `total` when `nprocs` processes split it evenly."""
    return total // nprocs + (1 if proc < total % nprocs else 0)


class Driver(abc.ABC):
    """Common part of both drivers: request budget, sending and recording."""

    def __init__(self, worker: Worker, group: GroupSpec, stats: GroupStats) -> None:
        self.worker = worker
        self.group = group
        self.stats = stats
        self.gaps: Histogram = stats.gaps
        spec = worker.spec
        self.factory = RequestFactory(worker.target, group, spec.seed + worker.proc)
        self.proc = worker.proc
        self.nprocs = worker.nprocs
        self.users = group.users
        self.budget: int | None = (
            None if group.requests is None else split_share(group.requests, worker.proc, worker.nprocs)
        )
        self.seq = 0
        self.sent = 0
        self.inflight = 0
        self.conns: set[BenchConnection] = set()
        self.finished = asyncio.Event()
        self.t_last = 0.0

    # Budget

    def take(self) -> int | None:
        """Number of the next request to issue, or None when the run is over."""
        worker = self.worker
        if worker.stopping:
            return None
        if worker.deadline is not None and clock() >= worker.deadline:
            return None
        if self.budget is not None:
            if self.budget <= 0:
                return None
            self.budget -= 1
        seq = self.seq
        self.seq += 1
        return seq

    def user_for(self, seq: int, slot: int) -> int:
        """User number for a request: per connection, or rotating over all users."""
        if self.group.user_per_connection and slot >= 0:
            return (slot * self.nprocs + self.proc) % self.users
        return (seq * self.nprocs + self.proc) % self.users

    # Sending and recording

    def send(self, conn: BenchConnection, seq: int, t_send: float) -> None:
        """Issue request `seq` on an idle connection."""
        user = self.user_for(seq, conn.slot)
        measured = t_send >= self.worker.t_measure
        if measured:
            self.stats.user_sent[user] += 1
        self.inflight += 1
        self.sent += 1
        conn.send(self.factory.request(seq, user), Exchange(user, t_send, measured))

    def record(self, ex: Exchange, kind: str | None) -> None:
        """Account one ended exchange; `kind` None means a complete response."""
        now = clock()
        self.inflight -= 1
        self.t_last = now
        if not ex.measured:
            return
        st = self.stats
        second = int(now - self.worker.t_measure)
        if ex.zero_gaps:
            st.gaps.record_n(0, ex.zero_gaps)
        if kind is None:
            st.status[ex.status] = st.status.get(ex.status, 0) + 1
            st.chunks += ex.lines
            st.body_bytes += ex.nbytes
            kind = classify(ex.status, ex.sep is not None, ex.terminated, ex.error_frame)
        if kind is not None:
            st.add_error(kind, second)
            return
        st.add_ok(ex.user, second)
        # The read that completed the response, not now: parsing and our own
        # bookkeeping are not the server's latency.
        st.latency.record(int(((ex.t_end or now) - ex.t_send) * 1_000_000))
        st.ttfb.record(int((ex.t_first - ex.t_send) * 1_000_000))
        if ex.t_body:
            st.ttft.record(int((ex.t_body - ex.t_send) * 1_000_000))

    def record_connect_error(self, seq: int, slot: int, t_send: float) -> None:
        """A request that failed before a connection existed."""
        user = self.user_for(seq, slot)
        now = clock()
        self.t_last = now
        if t_send >= self.worker.t_measure:
            self.stats.user_sent[user] += 1
            self.stats.add_error("connect", int(now - self.worker.t_measure))

    async def connect(self, slot: int) -> BenchConnection:
        """Open one connection (raises OSError or TimeoutError)."""
        target = self.worker.target
        loop = asyncio.get_running_loop()
        async with self.worker.connect_gate:
            _, proto = await asyncio.wait_for(
                loop.create_connection(lambda: BenchConnection(self, slot), target.host, target.port),
                self.worker.connect_timeout,
            )
        self.conns.add(proto)
        return proto

    def connection_gone(self, conn: BenchConnection) -> None:
        """Called by the connection when its transport is closed."""
        self.conns.discard(conn)

    @abc.abstractmethod
    def exchange_done(self, conn: BenchConnection, ex: Exchange, kind: str | None) -> None:
        """Called by the connection when a request ended."""

    @abc.abstractmethod
    def start(self) -> None:
        """Begin issuing requests (the worker calls this once)."""

    def abort(self) -> int:
        """Stop at once; returns the number of requests cut short."""
        cut = self.inflight
        for conn in list(self.conns):
            conn.abort()
        self.inflight = 0
        self.finished.set()
        return cut


class ClosedLoop(Driver):
    """N connections, each sending its next request when the previous one ends."""

    def __init__(self, worker: Worker, group: GroupSpec, stats: GroupStats) -> None:
        super().__init__(worker, group, stats)
        self.slots = split_share(group.concurrency, worker.proc, worker.nprocs)
        self.slots_open = 0

    def start(self) -> None:
        if self.slots == 0 or self.budget == 0:
            self.finished.set()
            return
        for i in range(self.slots):
            self.slots_open += 1
            self.worker.spawn(self._open_slot(i))

    async def _open_slot(self, slot: int) -> None:
        backoff = BACKOFF_MIN
        while True:
            seq = self.take()
            if seq is None:
                self._slot_done()
                return
            t_send = clock()
            try:
                conn = await self.connect(slot)
            except (TimeoutError, OSError):
                self.record_connect_error(seq, slot, t_send)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            self.send(conn, seq, clock())
            return

    def _slot_done(self) -> None:
        self.slots_open -= 1
        if self.slots_open <= 0:
            self.finished.set()

    def exchange_done(self, conn: BenchConnection, ex: Exchange, kind: str | None) -> None:
        self.record(ex, kind)
        if conn.usable:
            seq = self.take()
            if seq is not None:
                self.send(conn, seq, clock())
                return
            conn.close()
            self._slot_done()
        else:
            conn.close()
            self.worker.spawn(self._open_slot(conn.slot))


class OpenLoop(Driver):
    """Poisson arrivals at a fixed rate, independent of how fast answers come."""

    def __init__(self, worker: Worker, group: GroupSpec, stats: GroupStats) -> None:
        super().__init__(worker, group, stats)
        assert group.rate is not None
        self.rate = group.rate / worker.nprocs
        # Connection cap for this process; arrivals beyond it wait in backlog.
        self.max_conns = max(1, split_share(group.concurrency, worker.proc, worker.nprocs))
        self.open_count = 0
        self.idle: list[BenchConnection] = []
        self.backlog: deque[tuple[int, float]] = deque()
        self.arrivals_done = False
        self.rng = random.Random(worker.spec.seed * 7919 + worker.proc)

    def start(self) -> None:
        self.worker.spawn(self._arrivals())

    async def _arrivals(self) -> None:
        next_t = clock()
        try:
            while True:
                now = clock()
                while next_t <= now:
                    seq = self.take()
                    if seq is None:
                        return
                    self._dispatch(seq, next_t)
                    next_t += self.rng.expovariate(self.rate)
                await asyncio.sleep(next_t - now)
        finally:
            self.arrivals_done = True
            if self.worker.deadline is not None and self.backlog:
                # The run is over: arrivals still waiting never got sent.
                self.stats.unfinished += len(self.backlog)
                self.backlog.clear()
            self._check_finished()

    def _dispatch(self, seq: int, intended: float) -> None:
        if self.idle:
            self.send(self.idle.pop(), seq, intended)
        elif self.open_count < self.max_conns:
            self.open_count += 1
            self.worker.spawn(self._open_for(seq, intended))
        elif len(self.backlog) < MAX_BACKLOG:
            self.backlog.append((seq, intended))
        else:
            self.stats.unfinished += 1

    async def _open_for(self, seq: int, intended: float) -> None:
        try:
            conn = await self.connect(-1)
        except (TimeoutError, OSError):
            self.open_count -= 1
            self.record_connect_error(seq, -1, intended)
            self._after_free()
            return
        self.send(conn, seq, intended)

    def exchange_done(self, conn: BenchConnection, ex: Exchange, kind: str | None) -> None:
        self.record(ex, kind)
        if conn.usable:
            if self.backlog:
                seq, intended = self.backlog.popleft()
                self.send(conn, seq, intended)
                return
            self.idle.append(conn)
        else:
            conn.close()
            self.open_count -= 1
        self._after_free()

    def connection_gone(self, conn: BenchConnection) -> None:
        super().connection_gone(conn)
        if conn in self.idle:
            # The server closed an idle keep-alive connection.
            self.idle.remove(conn)
            self.open_count -= 1

    def _after_free(self) -> None:
        if self.backlog and self.open_count < self.max_conns:
            seq, intended = self.backlog.popleft()
            self.open_count += 1
            self.worker.spawn(self._open_for(seq, intended))
            return
        self._check_finished()

    def _check_finished(self) -> None:
        if self.arrivals_done and self.inflight == 0 and not self.backlog and len(self.idle) == self.open_count:
            for conn in self.idle:
                conn.close()
            self.idle.clear()
            self.open_count = 0
            self.finished.set()

    def abort(self) -> int:
        cut = len(self.backlog)
        self.backlog.clear()
        return cut + super().abort()


class Worker:
    """All drivers of one process against one target, plus timeout and progress."""

    def __init__(self, target: Target, spec: RunSpec, proc: int = 0, nprocs: int = 1) -> None:
        self.target = target
        self.spec = spec
        self.proc = proc
        self.nprocs = nprocs
        self.stopping = False
        self.interrupted = False
        # This process's CPU seconds and wall seconds during run(): a worker
        # near one full core is itself the bottleneck (the report says so).
        self.cpu_s = 0.0
        self.wall_s = 0.0
        self.t_start = 0.0
        self.t_measure = 0.0
        self.deadline: float | None = None
        self.connect_timeout = min(spec.timeout, CONNECT_TIMEOUT_MAX)
        self.stats = [GroupStats(g.name, g.users) for g in spec.groups]
        self.drivers: list[Driver] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        # A helper task that died of an exception is our bug: stop and re-raise.
        self.failure: BaseException | None = None
        self.connect_gate = asyncio.Semaphore(CONNECT_BURST)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a helper coroutine, keeping a reference so it is not collected."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self.failure is None:
            self.failure = task.exception()
            self.stop(interrupted=False)

    def snapshot(self) -> Snapshot:
        """Totals so far, for the progress line."""
        ok = sum(s.ok for s in self.stats)
        errors = sum(s.error_total for s in self.stats)
        chunks = sum(s.chunks for s in self.stats)
        inflight = sum(d.inflight for d in self.drivers)
        sent = sum(d.sent for d in self.drivers)
        return ok, errors, chunks, inflight, sent

    def stop(self, interrupted: bool = True) -> None:
        """End the run now (Ctrl-C, or the parent said so); results so far are kept."""
        if self.stopping:
            return
        self.stopping = True
        self.interrupted = interrupted
        for driver, st in zip(self.drivers, self.stats):
            st.unfinished += driver.abort()
        for task in list(self.tasks):
            task.cancel()

    async def run(self, on_progress: ProgressFn | None = None) -> list[GroupStats]:
        """Run every group to completion and return this process's stats."""
        _raise_fd_limit()
        spec = self.spec
        cpu0 = time.process_time()
        self.t_start = clock()
        self.t_measure = self.t_start + spec.warmup
        if spec.duration is not None:
            self.deadline = self.t_measure + spec.duration
        for group, st in zip(spec.groups, self.stats):
            cls = OpenLoop if group.rate is not None else ClosedLoop
            self.drivers.append(cls(self, group, st))
        for driver in self.drivers:
            driver.start()
        helpers = [asyncio.ensure_future(self._sweep())]
        if on_progress is not None:
            helpers.append(asyncio.ensure_future(self._progress(on_progress)))
        try:
            waiter = asyncio.gather(*(d.finished.wait() for d in self.drivers))
            cap = None
            if spec.duration is not None:
                cap = spec.warmup + spec.duration + spec.timeout + FINISH_GRACE
            try:
                await asyncio.wait_for(waiter, cap)
            except TimeoutError:
                # Requests outlived --timeout plus grace: cut them, never hang.
                self.stop(interrupted=False)
        finally:
            for h in helpers:
                h.cancel()
            if not self.stopping:
                for task in list(self.tasks):
                    task.cancel()
            for driver in self.drivers:
                for conn in list(driver.conns):
                    conn.abort()
        self.cpu_s = time.process_time() - cpu0
        self.wall_s = clock() - self.t_start
        if self.failure is not None:
            raise RuntimeError("load generator failed") from self.failure
        for driver, st in zip(self.drivers, self.stats):
            st.elapsed = max(0.0, (driver.t_last or clock()) - self.t_measure)
        return self.stats

    async def _sweep(self) -> None:
        interval = min(SWEEP_MAX, self.spec.timeout / 4)
        timeout = self.spec.timeout
        while True:
            await asyncio.sleep(interval)
            limit = clock() - timeout
            for driver in self.drivers:
                for conn in list(driver.conns):
                    ex = conn.exchange
                    if ex is not None and ex.t_write < limit:
                        conn.expire()

    async def _progress(self, on_progress: ProgressFn) -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL)
            on_progress(self.snapshot())


def _raise_fd_limit() -> None:
    # Thousands of connections need thousands of descriptors; the soft limit
    # is often 1024 while the hard one allows far more.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def fd_limit() -> int:
    """Descriptors one process may open (after raising the soft limit)."""
    _raise_fd_limit()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft
