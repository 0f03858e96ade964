"""`ollamamq-fast sim`: run the simulator in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import uvloop

from .. import argtypes
from .options import API_MODES, DEFAULT_MODELS, SimOptions
from .server import start_sim

_port = argtypes.port
_non_negative_float = argtypes.non_negative_float
_non_negative_int = argtypes.non_negative_int


def _models(text: str) -> list[str]:
    """Comma-separated model names."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one model name")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's flags to `parser` (used by the main CLI's `sim` command)."""
    parser.add_argument("-p", "--port", type=_port, default=11434, help="TCP port to listen on, 0 for any (default: %(default)s)")
    parser.add_argument("-H", "--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument(
        "--models", type=_models, default=list(DEFAULT_MODELS), metavar="M1,M2",
        help=f"comma-separated models to serve (default: {','.join(DEFAULT_MODELS)})",
    )
    parser.add_argument("--ttft-ms", type=_non_negative_float, default=50.0, metavar="MS",
                        help="time to first token in milliseconds (default: %(default)s)")
    parser.add_argument("--tokens-per-s", type=_non_negative_float, default=50.0, metavar="N",
                        help="decode speed per stream; 0 writes every token at once (default: %(default)s)")
    parser.add_argument("--tokens", type=_non_negative_int, default=20, metavar="N",
                        help="tokens per answer unless num_predict/max_tokens/X-Sim-Tokens say otherwise (default: %(default)s)")
    parser.add_argument("--max-parallel", type=_non_negative_int, default=0, metavar="N",
                        help="concurrent inference requests before answering 503 like a full Ollama queue; 0 = unlimited (default: %(default)s)")
    parser.add_argument("--api", choices=API_MODES, default="both",
                        help="ollama: native /api/* only; openai: /v1/* only (like vLLM); both (default: %(default)s)")
    parser.add_argument("--exact-ids", action="store_true",
                        help="as vLLM: OpenAI requests must name a model exactly as /v1/models lists it")
    parser.add_argument("--ollama-version", default="0.12.0", metavar="V",
                        help="version reported by /api/version (default: %(default)s)")
    parser.add_argument("--pull-failures", type=_non_negative_int, default=0, metavar="N",
                        help="the first N /api/pull requests fail mid-stream (default: %(default)s)")
    parser.add_argument("--pull-step-s", type=_non_negative_float, default=None, metavar="S",
                        help="seconds between a pull's progress lines (default: the token interval)")


def options_from(args: argparse.Namespace) -> SimOptions:
    """SimOptions from parsed flags."""
    return SimOptions(
        models=list(args.models),
        ttft_ms=args.ttft_ms,
        tokens_per_s=args.tokens_per_s,
        tokens=args.tokens,
        max_parallel=args.max_parallel,
        api=args.api,
        exact_ids=getattr(args, "exact_ids", False),
        version=getattr(args, "ollama_version", "0.12.0"),
        pull_failures=getattr(args, "pull_failures", 0),
        pull_step_s=getattr(args, "pull_step_s", None),
    )


async def _serve(options: SimOptions, host: str, port: int) -> int:
    """Listen until SIGINT/SIGTERM."""
    loop = asyncio.get_running_loop()
    try:
        sim = await start_sim(options, host, port)
    except OSError as err:
        print(f"ollamamq-fast sim: cannot listen on {host}:{port}: {err.strerror or err}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"ollamamq-fast sim listening on {sim.url} (models: {', '.join(options.models)})", flush=True)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await sim.close()
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the simulator in the foreground on uvloop; 0 on a clean stop."""
    try:
        options = options_from(args)
    except ValueError as err:
        print(f"ollamamq-fast sim: {err}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_serve(options, args.host, args.port))


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: `python -m ollamamq_fast.sim.cli`."""
    parser = argparse.ArgumentParser(prog="ollamamq-fast sim", description="Simulated Ollama / OpenAI-compatible backend.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
