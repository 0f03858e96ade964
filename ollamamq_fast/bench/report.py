"""Turning merged stats into summaries: the end table, the JSON object, the CDF plot."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from typing import Any

from .runner import TargetRun
from .stats import (
    ERROR_KINDS,
    REPORT_PERCENTILES,
    GroupStats,
    Histogram,
    exact_percentile,
    jain_index,
)

# A worker process busier than this fraction of one core is probably limiting
# the load itself (an event loop cannot use more than one core).
SATURATED_CORE = 0.9
# Per-user completions are listed one by one up to this many users; beyond
# that only min/median/max and Jain's index are shown.
PER_USER_LIMIT = 32


def pct_key(q: float) -> str:
    """`50.0` -> "p50", `99.9` -> "p99.9"."""
    return f"p{q:g}"


def hist_ms(h: Histogram) -> dict[str, float]:
    """Percentiles, mean and max of a microsecond histogram, in milliseconds."""
    out = {pct_key(q): h.percentile(q) / 1000.0 for q in REPORT_PERCENTILES}
    out["mean"] = h.mean() / 1000.0
    out["max"] = (h.max if h.total else 0) / 1000.0
    out["count"] = float(h.total)
    return out


def merged_groups(groups: Sequence[GroupStats]) -> GroupStats:
    """All groups of a run folded into one (the run's totals)."""
    if len(groups) == 1:
        return groups[0]
    total = GroupStats("all", 0)
    sent: list[int] = []
    ok: list[int] = []
    for g in groups:
        total.merge(g, parallel=True)
        # Users of different groups are different people: list them side by side.
        sent.extend(g.user_sent)
        ok.extend(g.user_ok)
    total.user_sent, total.user_ok, total.users = sent, ok, len(sent)
    return total


def summarize_group(st: GroupStats, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Everything a report shows about one group, as plain JSON-able data.

    `names[u]` is user u's name for the per-user listing (default "user-u").
    """
    elapsed = st.elapsed if st.elapsed > 0 else 1e-9
    errors = {k: st.errors.get(k, 0) for k in ERROR_KINDS}
    requests = st.ok + st.error_total
    active = [(u, st.user_ok[u]) for u in range(len(st.user_ok)) if st.user_sent[u] > 0]
    done = [c for _, c in active]
    users: dict[str, Any] = {
        "count": len(active),
        "jain": round(jain_index(done), 6),
        "min": min(done) if done else 0,
        "median": exact_percentile(done, 50) if done else 0,
        "max": max(done) if done else 0,
    }
    if len(active) <= PER_USER_LIMIT:
        users["per_user"] = {(names[u] if names else f"user-{u}"): c for u, c in active}
    return {
        "elapsed_s": round(st.elapsed, 4),
        "requests": requests,
        "ok": st.ok,
        "errors_total": st.error_total,
        "unfinished": st.unfinished,
        "req_per_s": requests / elapsed,
        "ok_per_s": st.ok / elapsed,
        "latency_ms": hist_ms(st.latency),
        "ttfb_ms": hist_ms(st.ttfb),
        "ttft_ms": hist_ms(st.ttft),
        "gap_ms": hist_ms(st.gaps),
        "chunks": st.chunks,
        "chunks_per_s": st.chunks / elapsed,
        "body_mb_per_s": st.body_bytes / elapsed / 1e6,
        "status": {str(k): v for k, v in sorted(st.status.items())},
        "errors": errors,
        "users": users,
        "ok_timeline": list(st.ok_timeline),
        "error_timeline": list(st.err_timeline),
    }


def summarize_run(run: TargetRun, prefixes: Sequence[str] | None = None) -> dict[str, Any]:
    """One target's summary: totals plus one entry per group.

    `prefixes[i]` is group i's user-name prefix (its --user-prefix).
    """
    prefixes = list(prefixes) if prefixes else ["user-"] * len(run.groups)
    per_group = [[f"{p}{u}" for u in range(g.users)] for g, p in zip(run.groups, prefixes)]
    all_names = [n for names in per_group for n in names]
    out: dict[str, Any] = {
        "label": run.label,
        "url": run.url,
        "procs": run.procs,
        "wall_s": round(run.wall, 3),
        "interrupted": run.interrupted,
        "total": summarize_group(merged_groups(run.groups), all_names),
        "generator": generator_load(run.load),
    }
    if len(run.groups) > 1:
        out["groups"] = {g.name: summarize_group(g, n) for g, n in zip(run.groups, per_group)}
    return out


def generator_load(load: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """The load generator's own CPU use per worker process, in cores."""
    cores = [cpu / wall if wall > 0 else 0.0 for cpu, wall in load]
    busiest = max(cores) if cores else 0.0
    return {
        "cores_per_proc": [round(c, 3) for c in cores],
        "busiest_proc_cores": round(busiest, 3),
        "saturated": busiest >= SATURATED_CORE,
    }


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """How summary `a` differs from `b`: added latency per percentile and throughput ratio."""
    out: dict[str, Any] = {"of": a["label"], "vs": b["label"]}
    ta, tb = a["total"], b["total"]
    for metric in ("latency_ms", "ttfb_ms", "ttft_ms"):
        out[f"added_{metric}"] = {
            k: round(ta[metric][k] - tb[metric][k], 4) for k in [pct_key(q) for q in REPORT_PERCENTILES] + ["mean"]
        }
    out["throughput_ratio"] = ta["ok_per_s"] / tb["ok_per_s"] if tb["ok_per_s"] else None
    out["chunks_ratio"] = ta["chunks_per_s"] / tb["chunks_per_s"] if tb["chunks_per_s"] else None
    return out


# Text rendering


def _fmt_ms(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.3f}"


def _hist_row(name: str, h: dict[str, float]) -> str:
    cells = [_fmt_ms(h[pct_key(q)]) for q in REPORT_PERCENTILES] + [_fmt_ms(h["mean"]), _fmt_ms(h["max"])]
    return f"  {name:<12}" + "".join(f"{c:>11}" for c in cells)


def format_group(s: dict[str, Any], title: str) -> list[str]:
    """Readable lines for one group summary."""
    lines = [f"{title}"]
    lines.append(
        f"  requests {s['requests']:,}  ok {s['ok']:,}  errors {s['errors_total']:,}"
        f"  in {s['elapsed_s']:.2f}s  ->  {s['req_per_s']:,.1f} req/s  ({s['ok_per_s']:,.1f} ok/s)"
    )
    if s["unfinished"]:
        lines.append(f"  unfinished (never sent, or cut off when the run stopped): {s['unfinished']:,}")
    header = "  " + " " * 12 + "".join(f"{h:>11}" for h in [pct_key(q) for q in REPORT_PERCENTILES] + ["mean", "max"])
    lines.append(header + "   (ms)")
    lines.append(_hist_row("latency", s["latency_ms"]))
    lines.append(_hist_row("ttfb", s["ttfb_ms"]))
    if s["ttft_ms"]["count"]:
        lines.append(_hist_row("ttft", s["ttft_ms"]))
    if s["gap_ms"]["count"]:
        lines.append(_hist_row("chunk gap", s["gap_ms"]))
    if s["chunks"]:
        per_req = s["chunks"] / max(1, s["requests"])
        lines.append(f"  chunks {s['chunks']:,} ({s['chunks_per_s']:,.0f}/s, {per_req:.1f} per request)")
    lines.append(f"  body {s['body_mb_per_s']:.2f} MB/s")
    status = "  ".join(f"{k}: {v:,}" for k, v in s["status"].items()) or "none"
    lines.append(f"  status  {status}")
    errs = "  ".join(f"{k} {v:,}" for k, v in s["errors"].items())
    lines.append(f"  errors  {errs}")
    u = s["users"]
    lines.append(
        f"  users {u['count']:,}  completions min {u['min']:,} median {u['median']:,} max {u['max']:,}"
        f"  Jain {u['jain']:.4f}"
    )
    if "per_user" in u and 1 < len(u["per_user"]) <= PER_USER_LIMIT:
        cells = [f"{k}={v:,}" for k, v in u["per_user"].items()]
        for i in range(0, len(cells), 6):
            lines.append("    " + "  ".join(cells[i : i + 6]))
    return lines


def format_run(s: dict[str, Any]) -> list[str]:
    """Readable lines for one target summary (totals and groups)."""
    flag = "  [interrupted]" if s["interrupted"] else ""
    lines = format_group(s["total"], f"== {s['label']}  {s['url']}  (procs {s['procs']}){flag}")
    gen = s["generator"]
    note = "  <- the load generator itself may be the limit: try more --procs" if gen["saturated"] else ""
    per = ", ".join(f"{c:.2f}" for c in gen["cores_per_proc"])
    lines.append(f"  load generator CPU per process (cores): {per}{note}")
    for name, g in s.get("groups", {}).items():
        lines.append("")
        lines.extend(format_group(g, f"-- group {name}"))
    return lines


def format_comparison(c: dict[str, Any]) -> list[str]:
    """Readable lines for one comparison (gateway vs direct, etc.)."""
    qs = [pct_key(q) for q in REPORT_PERCENTILES] + ["mean"]
    lines = [f"== {c['of']} minus {c['vs']}  (ms; positive = {c['of']} slower)"]
    lines.append("  " + " " * 12 + "".join(f"{q:>11}" for q in qs))
    for metric, name in (("added_latency_ms", "latency"), ("added_ttfb_ms", "ttfb"), ("added_ttft_ms", "ttft")):
        lines.append(f"  {name:<12}" + "".join(f"{c[metric][q]:>+11.3f}" for q in qs))
    if c["throughput_ratio"] is not None:
        lines.append(f"  throughput ratio {c['of']}/{c['vs']}: {c['throughput_ratio']:.3f}")
    if c["chunks_ratio"] is not None:
        lines.append(f"  chunks/s ratio {c['of']}/{c['vs']}: {c['chunks_ratio']:.3f}")
    return lines


# Plot


def matplotlib_available() -> bool:
    """True when matplotlib can be imported (it is optional, not a dependency)."""
    return importlib.util.find_spec("matplotlib") is not None


def plot_cdf(series: Sequence[tuple[str, Histogram]], path: str, title: str = "latency CDF") -> str | None:
    """Write a latency CDF per series to `path`; returns an error message or None."""
    if not matplotlib_available():
        return f"--plot {path}: the plot needs matplotlib, which is not installed (pip install matplotlib)"
    # Imported by name: matplotlib is optional and has no stubs here.
    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, h in series:
        points = h.cdf()
        if not points:
            continue
        ax.step([v / 1000.0 for v, _ in points], [f for _, f in points], where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
