"""Runs one load phase against one target, in this process or in several.

`--procs 1` runs the worker on a uvloop loop right here. More processes are
started with the `spawn` method (a fork of a process that already ran an
event loop is not safe); each runs a `Worker` on its share of the load and
talks to the parent over a pipe: "ready", progress snapshots about once a
second, and finally its pickled `GroupStats`. The parent prints the merged
progress line and merges the results.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import signal
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, TextIO

import uvloop

from .loadgen import Snapshot, Worker
from .stats import GroupStats
from .workload import RunSpec, Target

# Spawned workers import the package before reporting ready; on a loaded
# 2-core machine that can take a few seconds each.
READY_TIMEOUT = 60.0
# After asking workers to stop, how long they get to send their results.
STOP_TIMEOUT = 10.0
# Beyond the run's own bound, how long the parent waits before stopping workers.
PARENT_GRACE = 15.0


@dataclass
class TargetRun:
    """The merged result of one phase (one target, one round)."""

    label: str
    url: str
    groups: list[GroupStats]
    interrupted: bool
    wall: float
    procs: int
    # Per worker process: (CPU seconds, wall seconds) of its run.
    load: list[tuple[float, float]]


class Progress:
    """The live status line on stderr (rewritten in place on a terminal)."""

    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.label = ""
        self.t0 = time.monotonic()
        self.last: tuple[float, int, int] = (self.t0, 0, 0)
        self.width = 0

    def begin(self, label: str) -> None:
        """Start a new phase named `label`."""
        self.label = label
        self.t0 = time.monotonic()
        self.last = (self.t0, 0, 0)

    def update(self, snap: Snapshot) -> None:
        """Show one merged snapshot; called about once a second."""
        if not self.enabled:
            return
        ok, errors, chunks, inflight, _sent = snap
        now = time.monotonic()
        t_prev, ok_prev, chunks_prev = self.last
        dt = max(now - t_prev, 1e-6)
        self.last = (now, ok, chunks)
        line = (
            f"[{self.label}] {now - self.t0:6.1f}s  ok {ok:,} ({(ok - ok_prev) / dt:,.0f}/s)"
            f"  errors {errors:,}  in flight {inflight:,}"
        )
        if chunks:
            line += f"  chunks {chunks:,} ({(chunks - chunks_prev) / dt:,.0f}/s)"
        self._write(line)

    def note(self, text: str) -> None:
        """A one-off message (scenario steps); kept on its own line."""
        if self.enabled:
            self._write(text)
            self.end()

    def end(self) -> None:
        """Finish the current line so the next output starts clean."""
        if self.enabled and self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()
        self.width = 0

    def _write(self, line: str) -> None:
        if self.tty:
            pad = max(0, self.width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self.width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def run_target(target: Target, spec: RunSpec, progress: Progress) -> TargetRun:
    """Run `spec` against `target` once and return the merged result."""
    spec.validate()
    progress.begin(target.label)
    started = time.monotonic()
    try:
        if spec.procs == 1:
            groups, interrupted, load = uvloop.run(_run_here(target, spec, progress))
        else:
            groups, interrupted, load = _run_spawned(target, spec, progress)
    finally:
        progress.end()
    return TargetRun(target.label, target.url, groups, interrupted, time.monotonic() - started, spec.procs, load)


Outcome = tuple[list[GroupStats], bool, list[tuple[float, float]]]


async def _run_here(target: Target, spec: RunSpec, progress: Progress) -> Outcome:
    worker = Worker(target, spec)
    loop = asyncio.get_running_loop()
    # First Ctrl-C stops the load and keeps what was measured.
    handled = True
    try:
        loop.add_signal_handler(signal.SIGINT, worker.stop)
    except (NotImplementedError, RuntimeError, ValueError):
        handled = False  # not the main thread (e.g. embedded): default handling
    try:
        stats = await worker.run(progress.update if progress.enabled else None)
    finally:
        if handled:
            loop.remove_signal_handler(signal.SIGINT)
    return stats, worker.interrupted, [(worker.cpu_s, worker.wall_s)]


def _child_main(target: Target, spec: RunSpec, proc: int, nprocs: int, conn: Connection) -> None:
    # The parent owns Ctrl-C and tells us to stop over the pipe, so every
    # worker gets to send its partial results.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    uvloop.run(_child_async(target, spec, proc, nprocs, conn))


async def _child_async(target: Target, spec: RunSpec, proc: int, nprocs: int, conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    worker = Worker(target, spec, proc, nprocs)
    go: asyncio.Future[None] = loop.create_future()

    def on_message() -> None:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            msg = ("stop",)  # the parent is gone: stop, nobody will read us
            loop.remove_reader(conn.fileno())
        if msg[0] == "stop":
            worker.stop()
        if not go.done():
            go.set_result(None)

    loop.add_reader(conn.fileno(), on_message)
    conn.send(("ready", proc))
    await go
    stats = await worker.run(lambda snap: conn.send(("progress", proc, snap)))
    try:
        loop.remove_reader(conn.fileno())
        conn.send(("result", proc, stats, worker.interrupted, (worker.cpu_s, worker.wall_s)))
    except OSError:
        pass


def _run_spawned(target: Target, spec: RunSpec, progress: Progress) -> Outcome:
    ctx = mp.get_context("spawn")
    nprocs = spec.procs
    procs: list[Any] = []
    conns: list[Connection] = []
    try:
        for p in range(nprocs):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(
                target=_child_main, args=(target, spec, p, nprocs, child_end), daemon=True, name=f"bench-worker-{p}"
            )
            proc.start()
            child_end.close()
            procs.append(proc)
            conns.append(parent_end)
        _await_ready(conns, procs)
        for c in conns:
            c.send(("go",))
        return _collect(conns, procs, spec, progress)
    finally:
        for c in conns:
            c.close()
        for proc in procs:
            proc.join(timeout=2.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=2.0)


def _await_ready(conns: list[Connection], procs: list[Any]) -> None:
    pending = set(range(len(conns)))
    deadline = time.monotonic() + READY_TIMEOUT
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"bench workers {sorted(pending)} did not start within {READY_TIMEOUT:.0f}s")
        for c in wait([conns[i] for i in pending], timeout=min(left, 0.5)):
            assert isinstance(c, Connection)
            i = conns.index(c)
            try:
                c.recv()
            except EOFError:
                raise RuntimeError(f"bench worker {i} exited during start-up (exit code {procs[i].exitcode})")
            pending.discard(i)
        for i in list(pending):
            if not procs[i].is_alive():
                raise RuntimeError(f"bench worker {i} exited during start-up (exit code {procs[i].exitcode})")


def _collect(conns: list[Connection], procs: list[Any], spec: RunSpec, progress: Progress) -> Outcome:
    n = len(conns)
    snaps: dict[int, Snapshot] = {}
    results: dict[int, list[GroupStats]] = {}
    load: dict[int, tuple[float, float]] = {}
    interrupted = False
    started = time.monotonic()
    bound: float | None = None
    if spec.duration is not None:
        bound = spec.warmup + spec.duration + spec.timeout + PARENT_GRACE
    stop_sent_at: float | None = None
    next_tick = started + 1.0
    while len(results) < n:
        try:
            pending = [conns[i] for i in range(n) if i not in results]
            for c in wait(pending, timeout=0.25):
                assert isinstance(c, Connection)
                i = conns.index(c)
                try:
                    msg = c.recv()
                except EOFError:
                    raise RuntimeError(f"bench worker {i} died (exit code {procs[i].exitcode})")
                if msg[0] == "progress":
                    snaps[msg[1]] = msg[2]
                elif msg[0] == "result":
                    results[msg[1]] = msg[2]
                    interrupted = interrupted or bool(msg[3])
                    load[msg[1]] = msg[4]
            now = time.monotonic()
            if now >= next_tick and snaps and progress.enabled:
                progress.update(_sum_snaps(snaps.values()))
                next_tick = now + 1.0
            if bound is not None and stop_sent_at is None and now - started > bound:
                stop_sent_at = _send_stop(conns, results)
            if stop_sent_at is not None and now - stop_sent_at > STOP_TIMEOUT:
                raise RuntimeError("bench workers did not return results after being stopped")
        except KeyboardInterrupt:
            if stop_sent_at is not None:
                raise
            interrupted = True
            stop_sent_at = _send_stop(conns, results)
    merged = [GroupStats(g.name, g.users) for g in spec.groups]
    for stats in results.values():
        for into, part in zip(merged, stats):
            into.merge(part, parallel=True)
    return merged, interrupted, [load[i] for i in sorted(load)]


def _send_stop(conns: list[Connection], results: dict[int, list[GroupStats]]) -> float:
    for i, c in enumerate(conns):
        if i not in results:
            try:
                c.send(("stop",))
            except OSError:
                pass
    return time.monotonic()


def _sum_snaps(snaps: Any) -> Snapshot:
    total = [0, 0, 0, 0, 0]
    for snap in snaps:
        for k, v in enumerate(snap):
            total[k] += v
    return total[0], total[1], total[2], total[3], total[4]
