"""Named scenarios: start simulators (and the gateway), run load, tear down, report.

Each scenario is a function taking a `Scenario` context. It starts what it
needs through `ctx.procs` (stopped on exit, whatever happens), runs load
phases through `ctx.load`/`ctx.pair`, and puts its headline numbers into
`ctx.findings`. `bench/scenarios.md` describes what each one shows.
-c/-d/-n/--procs/--timeout override the scenario defaults where they apply.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import report
from .cli import (
    EXIT_INTERRUPTED,
    EXIT_NOTHING_SUCCEEDED,
    EXIT_OK,
    comparisons,
    emit,
    plot_runs,
    run_phases,
)
from .loadgen import fd_limit
from .procs import ProcessError, ProcessSet, RssSampler, open_files_limit, rss_kib
from .runner import Progress, TargetRun, run_target
from .stats import Histogram, jain_index, linear_slope
from .workload import GroupSpec, RunSpec, Target

# The CLI's --timeout default; a scenario uses its own unless the user changed it.
CLI_DEFAULT_TIMEOUT = 60.0
# flood: as many requests queued at once as descriptors allow. The gateway is
# one process holding every client connection, so its own open-files limit
# (read from /proc) caps the count, minus room for backend connections,
# listeners and logs; ours caps it too. 100 000 at once would need a limit
# above 100 000 in both processes, which machines rarely grant.
FLOOD_MAX_CONNECTIONS = 16_000
FLOOD_FD_RESERVE = 512


class Interrupted(Exception):
    """Ctrl-C during a phase: stop the scenario, still report what was measured."""


@dataclass
class Scenario:
    """What a scenario function works with: options, processes, and its report."""

    name: str
    args: argparse.Namespace
    progress: Progress
    procs: ProcessSet
    lines: list[str] = field(default_factory=list)
    phases: list[dict[str, Any]] = field(default_factory=list)
    comps: list[dict[str, Any]] = field(default_factory=list)
    findings: dict[str, Any] = field(default_factory=dict)
    plots: list[tuple[str, Histogram]] = field(default_factory=list)
    _last_title: str = ""

    # Option overrides

    def duration(self, default: float) -> float:
        """-d if given, else the scenario's phase length."""
        return float(self.args.duration) if self.args.duration is not None else default

    def concurrency(self, default: int) -> int:
        """-c if given, else the scenario's."""
        return int(self.args.concurrency) if self.args.concurrency is not None else default

    def timeout(self, default: float) -> float:
        """--timeout if the user changed it, else the scenario's."""
        return float(self.args.timeout) if self.args.timeout != CLI_DEFAULT_TIMEOUT else default

    def spec(self, groups: list[GroupSpec], duration: float | None, timeout: float, warmup: float = 0.0) -> RunSpec:
        """A RunSpec with the user's --procs and --seed."""
        spec = RunSpec(groups, duration=duration, timeout=timeout, warmup=warmup, procs=self.args.procs,
                       seed=self.args.seed)
        spec.validate()
        return spec

    # Running phases

    def step(self, text: str) -> None:
        """Announce a scenario step on stderr (unless --quiet)."""
        self.progress.note(f"{self.name}: {text}")

    def load(self, title: str, target: Target, spec: RunSpec) -> dict[str, Any]:
        """One phase against one target; its summary goes into the report."""
        run = run_target(target, spec, self.progress)
        summary = self._record(title, run, spec)
        if run.interrupted:
            raise Interrupted
        return summary

    def pair(self, title: str, gateway: str, direct: str, spec: RunSpec, rounds: int) -> dict[str, Any]:
        """The same load through the gateway and directly, alternating; returns the comparison."""
        targets = [Target.parse(gateway, "gateway"), Target.parse(direct, "direct")]
        runs, interrupted = run_phases(targets, spec, rounds, self.progress)
        summaries = {r.label: self._record(title, r, spec) for r in runs}
        comps = comparisons(summaries)
        for c in comps:
            c["phase"] = title
            self.comps.append(c)
            self.lines.extend(report.format_comparison(c))
            self.lines.append("")
        if interrupted:
            raise Interrupted
        return comps[0] if comps else {}

    def _record(self, title: str, run: TargetRun, spec: RunSpec) -> dict[str, Any]:
        summary = report.summarize_run(run, [g.user_prefix for g in spec.groups])
        summary["phase"] = title
        self.phases.append(summary)
        if self._last_title != title:
            self.lines.append(f"## {title}")
            self._last_title = title
        self.lines.extend(report.format_run(summary))
        self.lines.append("")
        self.plots.append((f"{title} {run.label}", report.merged_groups(run.groups).latency))
        return summary


def run_scenario(name: str, args: argparse.Namespace, progress: Progress) -> int:
    """Run scenario `name` end to end; prints the report and returns the exit code."""
    fn = SCENARIOS[name]
    status = EXIT_OK
    with ProcessSet(args.log_dir) as procs:
        ctx = Scenario(name, args, progress, procs)
        try:
            fn(ctx)
        except Interrupted:
            status = EXIT_INTERRUPTED
            ctx.findings["interrupted"] = True
        except KeyboardInterrupt:
            status = EXIT_INTERRUPTED
            ctx.findings["interrupted"] = True
        except (ProcessError, RuntimeError, ValueError) as exc:
            print(f"bench --scenario {name}: {exc}", file=sys.stderr)
            status = EXIT_NOTHING_SUCCEEDED
            ctx.findings["error"] = str(exc)
        finally:
            progress.end()
    lines = list(ctx.lines)
    if ctx.findings:
        lines.append(f"== {name}: findings")
        lines.extend(_format_findings(ctx.findings))
    doc = {"scenario": name, "phases": ctx.phases, "comparisons": ctx.comps, "findings": ctx.findings}
    emit(doc, args, lines)
    plot_runs(args, ctx.plots)
    return status


def _format_findings(findings: dict[str, Any], indent: str = "  ") -> list[str]:
    out: list[str] = []
    for k, v in findings.items():
        if isinstance(v, dict):
            out.append(f"{indent}{k}:")
            out.extend(_format_findings(v, indent + "  "))
        elif isinstance(v, float):
            text = f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
            out.append(f"{indent}{k}: {text}")
        else:
            out.append(f"{indent}{k}: {v}")
    return out


# Scenarios


def overhead(ctx: Scenario) -> None:
    """Tiny non-stream requests through the gateway vs direct, at c=1 and c=64."""
    levels = [ctx.concurrency(0)] if ctx.args.concurrency is not None else [1, 64]
    top = max(levels)
    ctx.step("starting simulator (unpaced, 1 token) and gateway")
    sim = ctx.procs.start_sim(ttft_ms=0, tokens_per_s=0, tokens=1)
    gw = ctx.procs.start_gateway([sim], slots=max(top, 1))
    duration = ctx.duration(5.0)
    for c in levels:
        g = GroupSpec(name="tiny", routes=("/api/generate",), stream=False, prompt_bytes=16, max_tokens=1,
                      users=min(c, 16), concurrency=c)
        spec = ctx.spec([g], duration, ctx.timeout(10.0), warmup=0.5)
        ctx.step(f"c={c}: gateway vs direct, {duration:g}s each, 2 rounds")
        comp = ctx.pair(f"overhead c={c}", gw.url, sim.url, spec, rounds=2)
        if comp:
            gw_s, direct_s = ctx.phases[-2]["total"], ctx.phases[-1]["total"]
            ctx.findings[f"c={c}"] = {
                "added_latency_ms": comp["added_latency_ms"],
                "gateway_ok_per_s": gw_s["ok_per_s"],
                "direct_ok_per_s": direct_s["ok_per_s"],
                "throughput_ratio": comp["throughput_ratio"],
            }


def stream(ctx: Scenario) -> None:
    """Long NDJSON and SSE streams from an unpaced simulator: lines/s forwarded."""
    tokens = 2000
    ctx.step(f"starting simulator (unpaced, {tokens} tokens) and gateway")
    c = ctx.concurrency(8)
    sim = ctx.procs.start_sim(ttft_ms=0, tokens_per_s=0, tokens=tokens)
    gw = ctx.procs.start_gateway([sim], slots=c)
    duration = ctx.duration(5.0)
    for kind, route in (("ndjson", "/api/chat"), ("sse", "/v1/chat/completions")):
        g = GroupSpec(name=kind, routes=(route,), stream=True, prompt_bytes=64, max_tokens=tokens, users=c,
                      concurrency=c)
        spec = ctx.spec([g], duration, ctx.timeout(60.0), warmup=0.5)
        ctx.step(f"{kind} ({route}), c={c}: gateway vs direct, {duration:g}s each")
        comp = ctx.pair(f"stream {kind}", gw.url, sim.url, spec, rounds=1)
        gw_s, direct_s = ctx.phases[-2]["total"], ctx.phases[-1]["total"]
        ctx.findings[kind] = {
            "gateway_lines_per_s": gw_s["chunks_per_s"],
            "direct_lines_per_s": direct_s["chunks_per_s"],
            "lines_ratio": comp.get("chunks_ratio"),
            "gateway_gap_p99_ms": gw_s["gap_ms"]["p99"],
            "direct_gap_p99_ms": direct_s["gap_ms"]["p99"],
            "gateway_ttft_p50_ms": gw_s["ttft_ms"]["p50"],
            "errors": gw_s["errors_total"],
        }


def fairness(ctx: Scenario) -> None:
    """One heavy user (many requests in flight) vs four light users on 2 slots."""
    heavy_c = ctx.concurrency(32)
    light_users = 4
    slots = 2
    ctx.step(f"starting simulator (max {slots} parallel, 10 tokens at 200/s) and gateway (--slots {slots})")
    sim = ctx.procs.start_sim(ttft_ms=0, tokens_per_s=200, tokens=10, max_parallel=slots)
    gw = ctx.procs.start_gateway([sim], slots=slots)
    heavy = GroupSpec(name="heavy", routes=("/api/generate",), stream=True, max_tokens=10, users=1,
                      user_prefix="heavy-", concurrency=heavy_c)
    light = GroupSpec(name="light", routes=("/api/generate",), stream=True, max_tokens=10, users=light_users,
                      user_prefix="light-", concurrency=light_users, user_per_connection=True)
    duration = ctx.duration(10.0)
    spec = ctx.spec([heavy, light], duration, ctx.timeout(60.0), warmup=1.0)
    ctx.step(f"heavy-0 with {heavy_c} in flight + {light_users} light users with 1 each, {duration:g}s")
    s = ctx.load("fairness", Target.parse(gw.url, "gateway"), spec)
    per_user = s["total"]["users"].get("per_user", {})
    lg, hg = s["groups"]["light"], s["groups"]["heavy"]
    # What first-come-first-served would give: completions in proportion to
    # requests in flight, heavy_c : 1 : 1 : 1 : 1.
    fifo = jain_index([heavy_c] + [1] * light_users)
    ctx.findings.update({
        "jain_index": s["total"]["users"]["jain"],
        "jain_if_fifo": round(fifo, 4),
        "per_user_completions": per_user,
        "light_latency_ms": {k: lg["latency_ms"][k] for k in ("p50", "p90", "p99")},
        "heavy_latency_ms": {k: hg["latency_ms"][k] for k in ("p50", "p90", "p99")},
        "errors": s["total"]["errors_total"],
    })


def flood(ctx: Scenario) -> None:
    """100 000 distinct users, one request each, on 2 slots; vs the same load from 10 users."""
    n = int(ctx.args.requests) if ctx.args.requests is not None else 100_000
    wanted = min(ctx.concurrency(FLOOD_MAX_CONNECTIONS), n)
    slots = 2
    ctx.step(f"starting simulator (unpaced, 1 token) and gateway (--slots {slots})")
    sim = ctx.procs.start_sim(ttft_ms=0, tokens_per_s=0, tokens=1)
    gw = ctx.procs.start_gateway([sim], slots=slots, extra=[
        "--max-queue", str(n + 1000), "--max-queue-per-user", str(wanted + 1000)])
    # Each bench process holds its share of the connections.
    ours = fd_limit() * max(1, ctx.args.procs)
    theirs = open_files_limit(gw.pid) or ours
    c = max(1, min(wanted, ours - FLOOD_FD_RESERVE, theirs - FLOOD_FD_RESERVE))
    if c < wanted:
        ctx.step(f"open-files limits allow {c:,} connections, not {wanted:,}")
    results: dict[str, dict[str, Any]] = {}
    for label, users in (("distinct", n), ("10-users", 10)):
        g = GroupSpec(name=label, routes=("/api/generate",), stream=False, prompt_bytes=16, max_tokens=1,
                      users=users, concurrency=c, requests=n)
        spec = ctx.spec([g], None, ctx.timeout(120.0))
        ctx.step(f"{label}: {n:,} requests from {users:,} users, {c:,} connections (queued at the gateway)")
        rss_before = rss_kib(gw.pid)
        s = ctx.load(f"flood {label}", Target.parse(gw.url, "gateway"), spec)
        t = s["total"]
        results[label] = {
            "ok_per_s": t["ok_per_s"],
            "us_per_request": 1e6 / t["ok_per_s"] if t["ok_per_s"] else None,
            "latency_p50_ms": t["latency_ms"]["p50"],
            "latency_p99_ms": t["latency_ms"]["p99"],
            "errors": t["errors_total"],
            "gateway_rss_kib_before": rss_before,
            "gateway_rss_kib_after": rss_kib(gw.pid),
        }
    a, b = results["distinct"]["us_per_request"], results["10-users"]["us_per_request"]
    ctx.findings.update(results)
    ctx.findings["connections"] = c
    ctx.findings["cost_ratio_distinct_vs_10"] = (a / b) if a and b else None


def failover(ctx: Scenario) -> None:
    """Two simulators behind the gateway; one is SIGKILLed a third of the way in."""
    ctx.step("starting two simulators (20 tokens at 200/s) and gateway")
    sims = [ctx.procs.start_sim(name=f"sim{i}", ttft_ms=20, tokens_per_s=200, tokens=20) for i in (1, 2)]
    gw = ctx.procs.start_gateway(sims, slots=8, extra=["--health-interval", "1"])
    duration = ctx.duration(12.0)
    timeout = ctx.timeout(10.0)
    c = ctx.concurrency(16)
    g = GroupSpec(name="failover", routes=("/api/chat",), stream=True, max_tokens=20, users=8, concurrency=c)
    spec = ctx.spec([g], duration, timeout)
    kill_at = duration / 3
    killed: list[float] = []
    t0 = time.monotonic()

    def kill() -> None:
        killed.append(time.monotonic() - t0)
        sims[1].kill_now()

    timer = threading.Timer(kill_at, kill)
    ctx.step(f"{duration:g}s of streams, c={c}; killing sim2 at {kill_at:.1f}s")
    timer.start()
    try:
        s = ctx.load("failover", Target.parse(gw.url, "gateway"), spec)
    finally:
        timer.cancel()
    wall = time.monotonic() - t0
    t = s["total"]
    k = int(killed[0]) if killed else int(kill_at)
    ok_tl, err_tl = t["ok_timeline"], t["error_timeline"]
    after = [i for i, e in enumerate(err_tl) if e and i >= k]
    bound = duration + timeout + 5
    ctx.findings.update({
        "killed_at_s": round(killed[0], 2) if killed else None,
        "errors_by_kind": t["errors"],
        "errors_before_kill": sum(err_tl[:k]),
        "errors_after_kill": sum(err_tl[k:]),
        "last_error_second": after[-1] if after else None,
        "ok_per_s_before": sum(ok_tl[:k]) / max(1, k),
        "ok_per_s_after": sum(ok_tl[k + 2:]) / max(1, len(ok_tl) - k - 2),
        "unfinished": t["unfinished"],
        "wall_s": round(wall, 2),
        "hung": wall > bound or t["unfinished"] > 0,
        "gateway_alive": gw.alive(),
    })


def soak(ctx: Scenario) -> None:
    """A long mixed run with the gateway's RSS sampled every second."""
    duration = ctx.duration(120.0)
    c = ctx.concurrency(32)
    ctx.step("starting simulator (16 tokens, unpaced, 5 ms TTFT) and gateway")
    sim = ctx.procs.start_sim(models="llama3.2:latest,all-minilm:latest", ttft_ms=5, tokens_per_s=0, tokens=16)
    gw = ctx.procs.start_gateway([sim], slots=c)
    gen = GroupSpec(name="generate", routes=("/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions"),
                    models=("llama3.2:latest",), stream=True, max_tokens=16, users=50, concurrency=max(1, c - c // 8))
    emb = GroupSpec(name="embed", routes=("/api/embed",), models=("all-minilm:latest",), stream=False, users=10,
                    user_prefix="embed-", concurrency=max(1, c // 8))
    spec = ctx.spec([gen, emb], duration, ctx.timeout(30.0))
    ctx.step(f"{duration:g}s mixed load, c={c}, sampling gateway RSS every second")
    with RssSampler(gw.pid) as sampler:
        s = ctx.load("soak", Target.parse(gw.url, "gateway"), spec)
    samples = sampler.samples
    ctx.findings.update(_rss_findings(samples, duration))
    tl = s["total"]["ok_timeline"]
    tenth = max(1, len(tl) // 10)
    ctx.findings["ok_per_s_first_10pct"] = sum(tl[:tenth]) / tenth
    ctx.findings["ok_per_s_last_10pct"] = sum(tl[-tenth - 1 : -1] or tl[-tenth:]) / tenth
    ctx.findings["errors"] = s["total"]["errors"]
    ctx.findings["gateway_alive"] = gw.alive()


def _rss_findings(samples: list[tuple[float, int]], duration: float) -> dict[str, Any]:
    """RSS growth over a soak, ignoring the first 10 % (pools and caches filling)."""
    if len(samples) < 2:
        return {"rss_samples": len(samples)}
    settle = duration * 0.1
    steady = [(t, float(v)) for t, v in samples if t >= settle] or [(t, float(v)) for t, v in samples]
    first, last = steady[0][1], steady[-1][1]
    slope = linear_slope(steady)
    return {
        "rss_samples": len(samples),
        "rss_kib_start": samples[0][1],
        "rss_kib_after_settle": int(first),
        "rss_kib_end": int(last),
        "rss_kib_max": max(v for _, v in samples),
        "rss_growth_kib": int(last - first),
        "rss_growth_pct": round((last - first) / first * 100, 2) if first else None,
        "rss_slope_kib_per_min": round(slope * 60, 1),
    }


SCENARIOS: dict[str, Callable[[Scenario], None]] = {
    "overhead": overhead,
    "stream": stream,
    "fairness": fairness,
    "flood": flood,
    "failover": failover,
    "soak": soak,
}

