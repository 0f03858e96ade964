"""`ollamamq-fast usage`: the stored usage report (`GET /api/usage`) from the command line.

Same filters as the API; an aligned table for people, `--csv` or `--json` for
scripts. Errors are one line with exit code 1, as for the other admin commands.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from typing import Any

import orjson

from ollamamq_fast.control.cli import (
    DEFAULT_ADMIN_URL,
    AdminClient,
    AdminError,
    common_options,
    table,
)
from ollamamq_fast.control.usage import csv_cell
from ollamamq_fast.state.records import USAGE_COUNTERS

# Table headings: shorter than the JSON names so a row fits a terminal.
_HEADINGS = {"prompt_tokens": "in", "completion_tokens": "out", "total_tokens": "total",
             "estimated_tokens": "estimated", "requests": "requests", "errors": "errors",
             "cancelled": "cancelled"}


def add_arguments(sub: Any) -> None:
    """Add the `usage` subcommand to the main parser."""
    p = sub.add_parser("usage", parents=[common_options()],
                       help="stored token usage per user, key, model, backend (admin API)")
    p.add_argument("--from", dest="since", metavar="DATE",
                   help="first day or hour, UTC: YYYY-MM-DD or YYYY-MM-DDTHH "
                        "(default: 6 days before today)")
    p.add_argument("--to", dest="until", metavar="DATE",
                   help="last day or hour, UTC, included (default: now)")
    p.add_argument("--step", choices=("hour", "day", "month", "total"), default=None,
                   help="one row per hour, day, month, or one for the whole range "
                        "(default day)")
    p.add_argument("--by", metavar="DIMS",
                   help="comma-separated dimensions to group by: user, key, model, backend "
                        "(default user,model)")
    for name in ("user", "key", "model", "backend"):
        p.add_argument(f"--{name}", metavar=name.upper(), help=f"only this {name}")
    p.add_argument("--csv", action="store_true", help="print CSV instead of a table")


def run(args: argparse.Namespace) -> int:
    """Fetch and print one report; the process exit code."""
    base = getattr(args, "admin", None) or os.environ.get("OLLAMAMQ_ADMIN") or DEFAULT_ADMIN_URL
    token = getattr(args, "token", None) or os.environ.get("OLLAMAMQ_ADMIN_TOKEN") or None
    query = {name: value for name, value in (
        ("from", args.since), ("to", args.until), ("step", args.step), ("by", args.by),
        ("user", args.user), ("key", args.key), ("model", args.model),
        ("backend", args.backend)) if value is not None}
    try:
        answer = AdminClient(base, token).call("GET", "/api/usage", query=query)
    except AdminError as exc:
        print(f"ollamamq-fast: error: {exc}", file=sys.stderr)
        return 1
    if getattr(args, "json", False):
        print(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode())
    elif args.csv:
        sys.stdout.write(to_csv(answer))
    else:
        print(to_table(answer))
    return 0


def columns(answer: dict[str, Any]) -> list[str]:
    """The report's columns, in the API's order."""
    head = [] if answer["step"] == "total" else ["period"]
    return [*head, *answer["by"], *USAGE_COUNTERS, "total_tokens", "exact"]


def _cell(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    return str(value)


def to_csv(answer: dict[str, Any]) -> str:
    """The report as CSV, header first (the same as `GET /api/usage?format=csv`)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    names = columns(answer)
    writer.writerow(names)
    for row in answer["rows"]:
        writer.writerow([csv_cell(row.get(n, "")) for n in names])
    return buf.getvalue()


def to_table(answer: dict[str, Any]) -> str:
    """The report as an aligned table with a totals line; estimated figures marked `~`."""
    names = [n for n in columns(answer) if n != "exact"]
    headers = [_HEADINGS.get(n, n) for n in names]

    def line(row: dict[str, Any]) -> list[str]:
        cells = [_cell(row.get(n, "")) or "-" for n in names]
        if not row.get("exact", True):
            cells[names.index("total_tokens")] = "~" + cells[names.index("total_tokens")]
        return cells

    rows = [line(r) for r in answer["rows"]]
    if rows:
        totals = {**answer["totals"], **{n: "" for n in names[: len(names) - len(
            USAGE_COUNTERS) - 1]}}
        totals[names[0]] = "total"
        rows.append(line(totals))
    text = table(headers, rows, empty=f"no usage from {answer['from']} to {answer['to']} "
                                     "(UTC, end excluded)")
    if any(not r.get("exact", True) for r in answer["rows"]):
        text += "\n~ some tokens estimated from stream events (the backend reported none)"
    return text
