"""`ollamamq-fast bench`: command-line options and the plain (non-scenario) run.

The main `ollamamq-fast` CLI calls `add_arguments(parser)` to build the
sub-command and `run(args)` to execute it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from . import report
from .runner import Progress, TargetRun, run_target
from .stats import GroupStats
from .workload import DEFAULT_MODEL, ROUTES, GroupSpec, RunSpec, Target

# Defaults shared with the scenarios.
DEFAULT_CONCURRENCY = 16
# Open loop: the connection cap when -c is not given; arrivals beyond it queue
# inside the generator (and that wait counts in their latency).
DEFAULT_OPEN_LOOP_CONNECTIONS = 1024
DEFAULT_DURATION = 10.0

EXIT_OK = 0
EXIT_NOTHING_SUCCEEDED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

SCENARIO_NAMES = ("overhead", "stream", "fairness", "flood", "failover", "soak")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the bench options to `parser` (the main CLI calls this)."""
    parser.description = (
        "Load generator for ollamamq-fast and Ollama/OpenAI-compatible servers: closed loop (-c N connections) "
        "or open loop (--rate R Poisson arrivals), many users, streaming or not; reports throughput, latency "
        "percentiles, time to first byte/token, chunk gaps, status and error mix, per-user fairness."
    )
    parser.add_argument("url", nargs="?", metavar="URL", help="server to load, e.g. http://127.0.0.1:11435")
    parser.add_argument("--pool", default=None, metavar="NAME",
                        help="load one pool of the gateway: requests go to URL/pool/NAME/... "
                             "(the --baseline and --compare targets are left as given)")
    load = parser.add_argument_group("load shape")
    load.add_argument("-c", "--concurrency", type=int, default=None,
                      help=f"connections (closed loop, default {DEFAULT_CONCURRENCY}); "
                      f"with --rate the connection cap (default {DEFAULT_OPEN_LOOP_CONNECTIONS})")
    load.add_argument("-n", "--requests", type=int, default=None, help="stop after this many requests")
    load.add_argument("-d", "--duration", type=float, default=None,
                      help=f"seconds of load (default {DEFAULT_DURATION:g} unless -n is given)")
    load.add_argument("--rate", type=float, default=None,
                      help="open loop: Poisson arrivals at this many requests/s (latency counts from arrival)")
    load.add_argument("--warmup", type=float, default=0.0, help="seconds of unrecorded load before measuring (with -d)")
    load.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds (default 60)")
    load.add_argument("--procs", type=int, default=1, help="worker processes; load is split, results merged (default 1)")
    load.add_argument("--seed", type=int, default=1, help="seed for the route/model mix and open-loop arrivals")
    req = parser.add_argument_group("requests")
    req.add_argument("--route", action="append", default=None,
                     help=f"route(s), repeat or comma-separate to mix; one of {', '.join(ROUTES)} (default /api/generate)")
    req.add_argument("--model", default=DEFAULT_MODEL, help=f"model name(s), comma-separated to mix (default {DEFAULT_MODEL})")
    req.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                     help="ask for streamed responses (NDJSON / SSE); embeddings never stream (default on)")
    req.add_argument("--prompt-bytes", type=int, default=64, help="prompt size in bytes (default 64)")
    req.add_argument("--max-tokens", type=int, default=32,
                     help="response size: options.num_predict / max_tokens (default 32)")
    req.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'", help="extra request header")
    who = parser.add_argument_group("users")
    who.add_argument("--users", type=int, default=1, help="distinct users, sent as X-User-ID: user-K (default 1)")
    who.add_argument("--user-prefix", default="user-", help="user name prefix (default user-)")
    who.add_argument("--per-connection-users", action="store_true",
                     help="connection K always speaks for user K (one request in flight per user); "
                     "default rotates users per request")
    who.add_argument("--no-user-header", dest="user_header", action="store_false",
                     help="do not send X-User-ID (identify users by API key only)")
    who.add_argument("--api-key", default=None,
                     help="send Authorization: Bearer KEY; '{user}' in KEY becomes the user number")
    who.add_argument("--api-keys-file", default=None, help="one key per line; user K uses line K (mod the count)")
    cmp = parser.add_argument_group("comparison")
    cmp.add_argument("--baseline", metavar="URL",
                     help="also run the same load directly against this backend; report the added latency")
    cmp.add_argument("--compare", metavar="URL", help="also run the same load against another proxy (e.g. nginx)")
    cmp.add_argument("--rounds", type=int, default=1,
                     help="with --baseline/--compare: rounds of phases, order alternating each round (default 1)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the table")
    out.add_argument("--plot", metavar="FILE.png", help="write a latency CDF plot (needs matplotlib)")
    out.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    sc = parser.add_argument_group("scenarios")
    sc.add_argument("--scenario", choices=SCENARIO_NAMES,
                    help="start the simulator (and gateway) itself, run a named scenario, tear down; "
                    "-c/-d/-n/--procs override its defaults (see bench/scenarios.md)")
    sc.add_argument("--log-dir", default=None, help="scenarios: keep the started processes' logs in this directory")


def run(args: argparse.Namespace) -> int:
    """Execute `ollamamq-fast bench` with parsed `args`; returns the exit code."""
    progress = Progress(sys.stderr, enabled=not args.quiet)
    if args.plot and not report.matplotlib_available():
        print(f"bench: --plot {args.plot}: the plot needs matplotlib, which is not installed "
              "(pip install matplotlib); continuing without it", file=sys.stderr)
    try:
        if args.scenario:
            from .scenarios import run_scenario

            ignored = [name for name, value in (("URL", args.url), ("--baseline", args.baseline),
                                                ("--compare", args.compare)) if value]
            if ignored:
                print(f"bench: {', '.join(ignored)} ignored: --scenario {args.scenario} starts its own servers",
                      file=sys.stderr)
            return run_scenario(args.scenario, args, progress)
        if not args.url:
            print("bench: a URL is needed unless --scenario is given", file=sys.stderr)
            return EXIT_USAGE
        spec = spec_from_args(args)
        targets = targets_from_args(args)
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run_plain(spec, targets, args, progress)


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    """Build the RunSpec of a plain run from the options (raises ValueError)."""
    routes: list[str] = []
    for item in args.route or ["/api/generate"]:
        routes.extend(r.strip() for r in item.split(",") if r.strip())
    models = tuple(m.strip() for m in args.model.split(",") if m.strip())
    keys: tuple[str, ...] = ()
    if args.api_keys_file:
        with open(args.api_keys_file, encoding="utf-8") as fh:
            keys = tuple(line.strip() for line in fh if line.strip())
        if not keys:
            raise ValueError(f"{args.api_keys_file}: no keys")
    headers: list[tuple[str, str]] = []
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"-H {h!r}: expected 'Name: value'")
        headers.append((name.strip(), value.strip()))
    conc = args.concurrency
    if conc is None:
        conc = DEFAULT_OPEN_LOOP_CONNECTIONS if args.rate is not None else DEFAULT_CONCURRENCY
    duration = args.duration
    if duration is None and args.requests is None:
        duration = DEFAULT_DURATION
    group = GroupSpec(
        name="main",
        routes=tuple(routes),
        models=models,
        stream=args.stream,
        prompt_bytes=args.prompt_bytes,
        max_tokens=args.max_tokens,
        users=args.users,
        user_prefix=args.user_prefix,
        user_per_connection=args.per_connection_users,
        send_user_header=args.user_header,
        api_key=args.api_key,
        api_keys=keys,
        concurrency=conc,
        rate=args.rate,
        requests=args.requests,
        extra_headers=tuple(headers),
    )
    spec = RunSpec([group], duration=duration, timeout=args.timeout, warmup=args.warmup, procs=args.procs, seed=args.seed)
    spec.validate()
    if args.rounds < 1:
        raise ValueError("--rounds must be at least 1")
    return spec


def targets_from_args(args: argparse.Namespace) -> list[Target]:
    """The main URL plus --baseline/--compare, labelled for the report."""
    extra = bool(args.baseline or args.compare)
    url = args.url
    pool = getattr(args, "pool", None)
    if pool:
        url = url.rstrip("/") + "/pool/" + pool
    targets = [Target.parse(url, "gateway" if extra else "target")]
    if args.baseline:
        targets.append(Target.parse(args.baseline, "direct"))
    if args.compare:
        targets.append(Target.parse(args.compare, "compare"))
    return targets


def run_phases(targets: list[Target], spec: RunSpec, rounds: int, progress: Progress) -> tuple[list[TargetRun], bool]:
    """Run every target `rounds` times, alternating the order; merge per target."""
    merged: dict[str, TargetRun] = {}
    interrupted = False
    for r in range(rounds):
        order = targets if r % 2 == 0 else list(reversed(targets))
        for target in order:
            if rounds > 1:
                progress.note(f"round {r + 1}/{rounds}: {target.label} {target.url}")
            result = run_target(target, spec, progress)
            if target.label in merged:
                into = merged[target.label]
                for g_into, g_new in zip(into.groups, result.groups):
                    g_into.merge(g_new, parallel=False)
                into.wall += result.wall
                into.load = [(c0 + c1, w0 + w1) for (c0, w0), (c1, w1) in zip(into.load, result.load)]
                into.interrupted = into.interrupted or result.interrupted
            else:
                merged[target.label] = result
            if result.interrupted:
                interrupted = True
                break
        if interrupted:
            break
    return [merged[t.label] for t in targets if t.label in merged], interrupted


def comparisons(summaries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """gateway - direct, gateway - compare, compare - direct (whichever exist)."""
    out = []
    for a, b in (("gateway", "direct"), ("gateway", "compare"), ("compare", "direct")):
        if a in summaries and b in summaries:
            out.append(report.compare(summaries[a], summaries[b]))
    return out


def config_of(spec: RunSpec, args: argparse.Namespace) -> dict[str, Any]:
    """The run's parameters, echoed in the JSON output."""
    g = spec.groups[0]
    return {
        "mode": "open" if g.rate is not None else "closed",
        "concurrency": g.concurrency,
        "rate": g.rate,
        "requests": g.requests,
        "duration": spec.duration,
        "warmup": spec.warmup,
        "timeout": spec.timeout,
        "procs": spec.procs,
        "rounds": args.rounds,
        "routes": list(g.routes),
        "models": list(g.models),
        "stream": g.stream,
        "prompt_bytes": g.prompt_bytes,
        "max_tokens": g.max_tokens,
        "users": g.users,
    }


def run_plain(spec: RunSpec, targets: list[Target], args: argparse.Namespace, progress: Progress) -> int:
    """A plain run (URL, optional --baseline/--compare): load, report, exit code."""
    try:
        runs, interrupted = run_phases(targets, spec, args.rounds, progress)
    except RuntimeError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return EXIT_NOTHING_SUCCEEDED
    prefix = [spec.groups[0].user_prefix]
    summaries = {r.label: report.summarize_run(r, prefix) for r in runs}
    comps = comparisons(summaries)
    doc = {"config": config_of(spec, args), "targets": list(summaries.values()), "comparisons": comps}
    emit(doc, args, _text_lines(summaries, comps))
    plot_runs(args, [(r.label, _latency(r.groups)) for r in runs])
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if runs and runs[0].groups and sum(g.ok for g in runs[0].groups) > 0 else EXIT_NOTHING_SUCCEEDED


def _latency(groups: list[GroupStats]) -> Any:
    return report.merged_groups(groups).latency


def _text_lines(summaries: dict[str, dict[str, Any]], comps: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for s in summaries.values():
        lines.extend(report.format_run(s))
        lines.append("")
    for c in comps:
        lines.extend(report.format_comparison(c))
        lines.append("")
    return lines


def emit(doc: dict[str, Any], args: argparse.Namespace, lines: list[str]) -> None:
    """Print the result: one JSON object with --json, else the readable table."""
    if args.json:
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS).decode() + "\n")
    else:
        sys.stdout.write("\n".join(lines).rstrip() + "\n")
    sys.stdout.flush()


def plot_runs(args: argparse.Namespace, series: list[tuple[str, Any]]) -> None:
    """Write the --plot file if asked for (the message about matplotlib was given up front)."""
    if not args.plot or not report.matplotlib_available():
        return
    err = report.plot_cdf(series, args.plot)
    if err:
        print(f"bench: {err}", file=sys.stderr)
    elif not args.quiet:
        print(f"bench: latency CDF written to {args.plot}", file=sys.stderr)
