"""`ollamamq-fast` entry point: serve (default), sim, bench.

Flags win over environment variables, which win over defaults. Bad values
print one line and exit with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

from ollamamq_fast import __version__, argtypes, buildinfo
from ollamamq_fast.accesslog import STDERR
from ollamamq_fast.cli_policy import add_policy_arguments, apply_policy_args
from ollamamq_fast.config import (
    BACKEND_KINDS,
    BALANCE_CHOICES,
    DEFAULT_ADMIN_PORT,
    DEFAULT_BACKEND,
    DEFAULT_HOST,
    DEFAULT_MAX_BODIES_MB,
    DEFAULT_MAX_BODY_MB,
    DEFAULT_PORT,
    DEFAULT_TIMEOUT,
    DEFAULT_USER_IDLE_DAYS,
    BackendOptions,
    ConfigError,
    Settings,
    apply_toml,
    check_redis_url,
    env_default,
    load_toml,
    parse_backend_url,
    parse_backend_urls,
    parse_weights,
    validate_settings,
)
from ollamamq_fast.policy.identity import parse_networks
from ollamamq_fast.wire.cors import parse_origins

SUBCOMMANDS = ("serve", "sim", "bench", "users", "keys", "backends", "pools", "usage", "top")
# Default file names, in the state folder (never the current folder).
STATE_FILE = "ollamamq.db"
LOG_FILE = "ollamamq.log"
# On SIGTERM/SIGINT: stop accepting, let running streams finish this long, exit.
DRAIN_GRACE_S = 30.0


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line (exit 2) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


_port = argtypes.port
_positive_float = argtypes.positive_float
_non_negative_float = argtypes.non_negative_float
_positive_int = argtypes.positive_int


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The gateway's options (ollamaMQ-compatible names first).

    Defaults are None here so that a TOML config value can sit between the
    built-in default and an explicit flag; the help text states each default.
    """
    p.add_argument("-p", "--port", type=_port, default=None,
                   help=f"port to listen on (env PORT; default {DEFAULT_PORT})")
    p.add_argument("-H", "--host", default=None,
                   help=f"address to listen on (env HOST; default {DEFAULT_HOST})")
    p.add_argument("-o", "-b", "--backend-urls", "--ollama-urls", dest="backend_urls", default=None,
                   metavar="URL[,URL...]",
                   help="comma-separated backend URLs: Ollama, LM Studio, vLLM, any "
                        "OpenAI-compatible server; http:// is added when missing "
                        f"(env OLLAMA_URLS or BACKEND_URLS; default {DEFAULT_BACKEND})")
    p.add_argument("--backend-kind", default=None, metavar="KIND|URL=KIND[,...]",
                   help="API kind of the backends instead of detecting it at first contact: "
                        f"{', '.join(BACKEND_KINDS)}; a bare KIND applies to every backend "
                        "(env BACKEND_KIND; per backend also `kind` in the config file)")
    p.add_argument("-t", "--timeout", type=_positive_float, default=None,
                   help="seconds of silence allowed from a backend before the request fails; "
                        "not a cap on a long stream "
                        f"(env TIMEOUT; default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--no-tui", action="store_true",
                   help="no terminal dashboard: event logs to stderr, access lines to "
                        "--log-file (for services, Docker, CI)")
    p.add_argument("--allow-all-routes", action="store_true", default=None,
                   help="forward unknown paths to the primary backend instead of answering 404")
    p.add_argument("-c", "--config", default=None, metavar="FILE",
                   help="TOML config file (backends with per-backend slots, users, limits); "
                        "flags and env vars override it")
    p.add_argument("--slots", type=_positive_int, default=None,
                   help="inference requests run at once on each backend (default 1; "
                        "per-backend overrides in the config file)")
    p.add_argument("--balance", choices=BALANCE_CHOICES, default=None,
                   help="backend choice among those with a free slot (default least-conn)")
    p.add_argument("--max-body-mb", type=_positive_float, default=None,
                   help="largest inference request body in MB; larger gets 413 "
                        f"(default {DEFAULT_MAX_BODY_MB:g}; blob uploads are streamed, not bounded)")
    p.add_argument("--max-bodies-mb", type=_positive_float, default=None,
                   help="request bodies held in memory at once, all clients together, in MB; "
                        f"beyond it 503 with Retry-After (default {DEFAULT_MAX_BODIES_MB:g})")
    p.add_argument("--admin-port", type=_port, default=None,
                   help=f"control-plane port; 0 = any free port (default {DEFAULT_ADMIN_PORT})")
    p.add_argument("--admin-host", default=None,
                   help="control-plane address (default 127.0.0.1: local admins only)")
    p.add_argument("--no-admin", action="store_true",
                   help="no control plane (admin API, /metrics, events)")
    p.add_argument("--admin-token", default=None,
                   help="admin API bearer token (env OLLAMAMQ_ADMIN_TOKEN; default: generated "
                        "at start and printed once)")
    p.add_argument("--metrics-public", action="store_true", default=None,
                   help="serve /metrics without the admin token")
    p.add_argument("--health-interval", type=_positive_float, default=None,
                   help="seconds between backend health probes (default 10)")
    p.add_argument("--health-fail-threshold", type=_positive_int, default=None,
                   help="failed probes in a row before a backend is offline (default 2)")
    p.add_argument("--health-ok-threshold", type=_positive_int, default=None,
                   help="good probes in a row before an offline backend returns (default 1)")
    p.add_argument("--max-queue", type=_positive_int, default=None,
                   help="queued requests in all; beyond it 429 (default 200000)")
    p.add_argument("--max-queue-per-user", type=_positive_int, default=None,
                   help="queued requests per user; beyond it 429 (default 1000)")
    p.add_argument("--queue-timeout", type=_non_negative_float, default=None,
                   help="seconds a request may wait in the queue before 503; 0 = no limit "
                        "(default 600)")
    p.add_argument("--user-idle-days", type=_non_negative_float, default=None,
                   help="forget users (counters in memory, usage in the store) with no request "
                        "for this many days and no settings, limits, key or block; 0 = never "
                        f"(default {DEFAULT_USER_IDLE_DAYS:g})")
    p.add_argument("--vip", default=None, metavar="USER[,USER...]",
                   help="users with absolute priority (round robin among themselves)")
    p.add_argument("--boost", default=None, metavar="USER[,USER...]",
                   help="users served on every second dispatch ahead of the normal ring")
    p.add_argument("--weight", default=None, metavar="USER=N[,...]",
                   help="users that get N turns per round instead of 1")
    p.add_argument("--state-dir", default=None, metavar="DIR",
                   help="folder of the default state and log files (default "
                        "$XDG_STATE_HOME/ollamamq-fast, else ~/.local/state/ollamamq-fast)")
    p.add_argument("--state", default=None, metavar="PATH",
                   help="SQLite file keeping keys, users, blocks and runtime backends across "
                        f"restarts; '' = memory only (default {STATE_FILE} in the state folder)")
    p.add_argument("--redis", default=None, metavar="URL",
                   help="share state with other replicas through this Redis "
                        "(env REDIS_URL; replaces --state)")
    p.add_argument("--auth", choices=["off", "keys"], default=None,
                   help="off: the user is X-User-ID, else the client address; keys: an API key "
                        "(Authorization: Bearer or X-API-Key) is required and decides the user "
                        "(default off)")
    p.add_argument("--trusted-proxies", default=None, metavar="CIDR[,CIDR...]",
                   help="believe X-Forwarded-For for the client address only from these "
                        "(default: nobody)")
    p.add_argument("--origins", default=None, metavar="ORIGIN[,ORIGIN...]",
                   help="browser origins that may call the gateway besides Ollama's own "
                        "(localhost, 127.0.0.1, app://, file://...), e.g. "
                        "https://chat.example.com or chrome-extension://*; '*' = any "
                        "(env OLLAMA_ORIGINS, as Ollama reads it)")
    p.add_argument("--sim", action="store_true",
                   help="start a built-in simulated Ollama backend in-process and use it "
                        "(a demo with no Ollama around; -o backends are added when given)")
    p.add_argument("--sim-models", default=None, metavar="M[,M...]",
                   help="models of the --sim backend (default: the simulator's own list)")
    p.add_argument("--log-file", default=None, metavar="PATH",
                   help="access log file (and the dashboard's event log), rotated at 20 MB, "
                        "5 kept; '-' = stderr, unrotated (for a supervisor or collector; not "
                        f"with the dashboard); '' = none (default {LOG_FILE} in the state "
                        "folder, with or without --no-tui)")
    p.add_argument("--no-access-log", action="store_true",
                   help="write no access lines (file or stderr), e.g. for benchmarks")
    p.add_argument("--log-format", choices=["json", "logfmt"], default="json",
                   help="access log line format (default json)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log level (default info)")
    add_policy_arguments(p)


def default_state_dir() -> str:
    """`$XDG_STATE_HOME/ollamamq-fast`, else `~/.local/state/ollamamq-fast` (XDG base dirs)."""
    base = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):  # the spec says relative values are to be ignored
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "ollamamq-fast")


def _users(text: str) -> list[str]:
    return [u.strip() for u in text.split(",") if u.strip()]


def _apply_backend_kinds(settings: Settings, text: str) -> None:
    """`--backend-kind llamacpp` (every backend) or `URL=KIND,URL=KIND`."""
    for item in text.split(","):
        url, sep, kind = item.strip().rpartition("=")
        kind = kind.strip()
        if kind not in BACKEND_KINDS:
            raise ConfigError(f"--backend-kind: {kind!r} is not one of {', '.join(BACKEND_KINDS)}")
        if sep:
            key = parse_backend_url(url).url
            if key not in {b.url for b in settings.backends}:
                raise ConfigError(f"--backend-kind: {url.strip()!r} is not a backend")
            targets = [key]
        else:
            targets = [b.url for b in settings.backends]
        for key in targets:
            settings.backend_options.setdefault(key, BackendOptions()).kind = kind


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Build Settings: defaults < TOML config < environment < flags."""
    settings = Settings()
    if args.config:
        apply_toml(settings, load_toml(args.config), args.config)
    port_text = env_default(("PORT",))
    if args.port is not None:
        settings.port = args.port
    elif port_text is not None:
        try:
            settings.port = _port(port_text)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"PORT: {exc}") from None
    host = args.host or env_default(("HOST",))
    if host:
        settings.host = host
    urls = args.backend_urls or env_default(("OLLAMA_URLS", "BACKEND_URLS"))
    if urls:
        settings.backends = parse_backend_urls(urls)
    kinds = args.backend_kind or env_default(("BACKEND_KIND",))
    if kinds:
        _apply_backend_kinds(settings, kinds)
    timeout_text = env_default(("TIMEOUT",))
    if args.timeout is not None:
        settings.timeout = args.timeout
    elif timeout_text is not None:
        try:
            settings.timeout = _positive_float(timeout_text)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"TIMEOUT: {exc}") from None
    settings.tui = not args.no_tui
    state_dir = args.state_dir or default_state_dir()
    log_file = args.log_file if args.log_file is not None else os.path.join(state_dir, LOG_FILE)
    settings.log_file = None if args.no_access_log else (log_file or None)
    settings.log_format = args.log_format
    settings.config_path = args.config
    if args.allow_all_routes:
        settings.allow_all_routes = True
    if args.admin_host:
        settings.admin_host = args.admin_host
    settings.admin_token = args.admin_token or env_default(("OLLAMAMQ_ADMIN_TOKEN",))
    if args.metrics_public:
        settings.metrics_public = True
    if args.max_body_mb is not None:
        settings.max_body_bytes = int(args.max_body_mb * 1024 * 1024)
    if args.max_bodies_mb is not None:
        settings.max_bodies_bytes = int(args.max_bodies_mb * 1024 * 1024)
    for name in ("slots", "balance", "admin_port", "health_interval", "health_fail_threshold",
                 "health_ok_threshold", "max_queue", "max_queue_per_user", "queue_timeout",
                 "user_idle_days"):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    if args.no_admin:
        settings.admin_port = -1
    apply_policy_args(settings, args)
    if args.vip:
        settings.flag_vip_users = _users(args.vip)
        settings.vip_users.extend(settings.flag_vip_users)
    if args.boost:
        settings.flag_boost_users = _users(args.boost)
        settings.boost_users.extend(settings.flag_boost_users)
    if args.weight:
        settings.flag_user_weights = parse_weights(args.weight)
        settings.user_weights.update(settings.flag_user_weights)
    state = args.state if args.state is not None else os.path.join(state_dir, STATE_FILE)
    settings.state_path = state or None
    settings.redis_url = args.redis or env_default(("REDIS_URL",))
    if settings.redis_url:
        check_redis_url(settings.redis_url)
    if args.auth is not None:
        settings.auth = args.auth
    if args.trusted_proxies:
        try:
            settings.trusted_proxies = parse_networks(args.trusted_proxies)
        except ValueError as exc:
            raise ConfigError(f"--trusted-proxies: {exc}") from None
    origins = args.origins if args.origins is not None else env_default(("OLLAMA_ORIGINS",))
    if origins:
        try:
            settings.origins = parse_origins([origins], "--origins")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    settings.sim = args.sim
    settings.sim_keep_backends = bool(urls)
    if args.sim_models:
        settings.sim_models = _users(args.sim_models)
    validate_settings(settings)
    return settings


def build_parser() -> argparse.ArgumentParser:
    """The full command-line parser with its subcommands."""
    parser = _Parser(
        prog="ollamamq-fast",
        description="A fast, fair, per-user queuing gateway for Ollama and "
                    "OpenAI-compatible LLM servers. Without a subcommand, `serve` runs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # The build ("mypyc" or "python: why") tells whether the hot path is compiled.
    parser.add_argument("-V", "--version", action="version",
                        version=f"%(prog)s {__version__} ({buildinfo.describe()})")
    sub = parser.add_subparsers(dest="command",
                                metavar="{serve,sim,bench,users,keys,backends,pools,usage,top}",
                                parser_class=_Parser)
    serve = sub.add_parser("serve", help="run the gateway in the foreground (default)")
    add_serve_arguments(serve)
    sim = sub.add_parser("sim", help="run a simulated Ollama / OpenAI-compatible backend")
    from ollamamq_fast.sim import cli as sim_cli

    sim_cli.add_arguments(sim)
    bench = sub.add_parser("bench", help="load-test a gateway or backend")
    from ollamamq_fast.bench import cli as bench_cli

    bench_cli.add_arguments(bench)
    from ollamamq_fast.control import cli as admin_cli

    admin_cli.add_arguments(sub)
    from ollamamq_fast.control import usage_cli

    usage_cli.add_arguments(sub)
    from ollamamq_fast.tui import top as tui_top

    tui_top.add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (args_list[0] not in SUBCOMMANDS and args_list[0] not in
                         ("-h", "--help", "-V", "--version")):
        args_list.insert(0, "serve")
    parser = build_parser()
    args = parser.parse_args(args_list)
    if args.command == "sim":
        from ollamamq_fast.sim import cli as sim_cli

        return sim_cli.run(args)
    if args.command == "bench":
        from ollamamq_fast.bench import cli as bench_cli

        return bench_cli.run(args)
    if args.command in ("users", "keys", "backends", "pools"):
        from ollamamq_fast.control import cli as admin_cli

        return _to_a_pipe(admin_cli.run, args)
    if args.command == "usage":
        from ollamamq_fast.control import usage_cli

        return _to_a_pipe(usage_cli.run, args)
    if args.command == "top":
        from ollamamq_fast.tui import top as tui_top

        return tui_top.run(args)
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"ollamamq-fast: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return serve(settings)


def _to_a_pipe(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command whose output may go to a pipe that closes early (`| head`):
    that ends it quietly (exit 1), as for other command-line tools, not with a traceback."""
    try:
        code = run(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return code


def serve(settings: Settings) -> int:
    """Run the gateway until SIGINT / SIGTERM, then drain."""
    import uvloop

    try:
        return uvloop.run(_serve(settings))
    except KeyboardInterrupt:
        return 0


async def _serve(settings: Settings) -> int:
    from ollamamq_fast.gateway import Gateway
    from ollamamq_fast.state.store import StoreError
    from ollamamq_fast.tui.inprocess import (
        dashboard_wanted,
        ensure_admin_token,
        run_dashboard,
    )

    dashboard = dashboard_wanted(settings)
    # Before start(): the control plane must be guarded by a token the
    # dashboard holds, not one it generates and forgets.
    generated_token = ensure_admin_token(settings) if dashboard else None
    if dashboard and settings.log_file == STDERR:
        print("ollamamq-fast: error: --log-file -: stderr is the dashboard's terminal; "
              "add --no-tui, or give a file", file=sys.stderr)
        return 2
    for path in (settings.state_path, settings.log_file):
        if path and path != STDERR:
            folder = os.path.dirname(os.path.abspath(path))
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as exc:
                print(f"ollamamq-fast: error: cannot create {folder}: {exc.strerror or exc}",
                      file=sys.stderr)
                return 1
    gateway = Gateway(settings)
    try:
        await gateway.start()
    except OSError as exc:
        print(f"ollamamq-fast: error: cannot listen on {settings.host}:{settings.port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    except StoreError as exc:  # Redis down or refusing us at start, a newer schema...
        print(f"ollamamq-fast: error: {exc}", file=sys.stderr)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def reload() -> None:
        try:
            gateway.reload()
        except ConfigError as exc:
            logging.getLogger("ollamamq_fast").error("reload failed, keeping the old config: %s",
                                                     exc)

    loop.add_signal_handler(signal.SIGHUP, reload)
    # What start-up built (modules, classes, the parts) lives as long as the
    # process: keep it out of the collector's full passes. Without this a full
    # collection walks all of it (about 20 ms here), stalling every request in
    # flight; it was the p99 of a paced load (bench/RESULTS.md, round 5).
    gc.collect()
    gc.freeze()
    summary = gateway.summary()
    print(f"ollamamq-fast {__version__} listening on {summary['listen']}", file=sys.stderr)
    if gateway.admin is not None and gateway.admin.url is not None:
        print(f"  admin API on {gateway.admin.url}", file=sys.stderr)
    if settings.state_path and not settings.redis_url:
        print(f"  state in {settings.state_path}", file=sys.stderr)
    if settings.log_file == STDERR:
        print("  access log on stderr", file=sys.stderr)
    elif settings.log_file:
        print(f"  access log in {settings.log_file}", file=sys.stderr)
    for b in summary["backends"]:
        state = "online" if b["online"] else "offline"
        models = ", ".join(b["models"]) or "no models"
        print(f"  backend {b['url']} [{state}, {b['kind']}, {b['slots']} slot(s)]: {models}",
              file=sys.stderr)
    if summary["backends"] and not any(b["online"] for b in summary["backends"]):
        print("  no backend answers yet: requests get 503 until one does (checked every "
              f"{settings.health_interval:g} s); is the server running there? "
              "`--sim` starts a simulated Ollama for a demo", file=sys.stderr)
    if generated_token is not None and gateway.admin_port is not None:
        print(f"admin token: {generated_token}", file=sys.stderr, flush=True)
    if dashboard:
        await run_dashboard(gateway, stop, generated_token)
    else:
        await stop.wait()
    print(f"ollamamq-fast: draining (up to {DRAIN_GRACE_S:g} s for running requests)...",
          file=sys.stderr)
    await gateway.stop(grace=DRAIN_GRACE_S)
    return 0
