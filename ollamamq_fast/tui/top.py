"""`ollamamq-fast top`: the dashboard attached to a running gateway's admin API.

Kept free of Textual imports at module level: the main parser imports this to
register the subcommand, and every other subcommand should not pay for it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from ollamamq_fast.control.cli import DEFAULT_ADMIN_URL
from ollamamq_fast.tui.client import AdminApi, AdminApiError


def add_arguments(sub: Any) -> None:
    """Add the `top` subcommand to the main parser."""
    top = sub.add_parser("top", help="terminal dashboard of a running gateway (admin API); "
                         "q leaves it running")
    top.add_argument("--admin", default=None, metavar="URL",
                     help=f"admin API of the gateway (env OLLAMAMQ_ADMIN; "
                          f"default {DEFAULT_ADMIN_URL})")
    top.add_argument("--token", default=None,
                     help="admin token (env OLLAMAMQ_ADMIN_TOKEN)")


async def check_access(base: str, token: str | None) -> None:
    """One authenticated call, so a wrong URL or token fails before the screen is taken."""
    api = AdminApi(base, token)
    try:
        await api.call("GET", "/api/blocked")
    finally:
        await api.close()


def run(args: argparse.Namespace) -> int:
    """Run the dashboard until q; the process exit code."""
    base = args.admin or os.environ.get("OLLAMAMQ_ADMIN") or DEFAULT_ADMIN_URL
    token = args.token or os.environ.get("OLLAMAMQ_ADMIN_TOKEN") or None
    try:
        asyncio.run(check_access(base, token))
    except AdminApiError as exc:
        print(f"ollamamq-fast top: error: {exc}", file=sys.stderr)
        return 1
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("ollamamq-fast top: error: needs a terminal (for scripts use "
              "`ollamamq-fast users list` / `backends list`)", file=sys.stderr)
        return 2
    from ollamamq_fast.tui.app import Dashboard

    app = Dashboard(base, token)
    app.run()
    return app.return_code or 0
