"""`GET /api/usage`: stored usage, filtered, grouped and summed, as JSON or CSV.

The store keeps one row per (UTC hour, user, key, model, backend) with the
counters of `USAGE_COUNTERS`. A report picks a time range (`from`, `to`), a
step (`hour`, `day` or `total`), the dimensions to group by (any of
`DIMENSIONS`) and optional filters on each dimension, and sums the rows that
fall together. Adding a dimension (a backend pool, say) is one entry in
`DIMENSIONS` and a field in the stored row.

Rows are summed here, in Python: the stored rows are bounded by the hourly
retention (`usage_retention_days`), and both stores then share one code path.
"""

from __future__ import annotations

import asyncio
import calendar
import csv
import io
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ollamamq_fast.control.http import Response, json_response
from ollamamq_fast.state.records import USAGE_COUNTERS, UsageHour

if TYPE_CHECKING:
    from ollamamq_fast.operator import Operator

# name -> how to read it from a stored row; the grouping vocabulary of the API.
DIMENSIONS: dict[str, Callable[[UsageHour], str]] = {
    "user": lambda r: r.user,
    "key": lambda r: r.key,
    "model": lambda r: r.model,
    "backend": lambda r: r.backend,
}
STEPS = ("hour", "day", "month", "total")
DEFAULT_BY = ("user", "model")
DEFAULT_DAYS = 7  # a report without `from` covers the last week, today included
CSV_TYPE = "text/csv; charset=utf-8"
SECONDS_PER_DAY = 86400


class UsageQueryError(ValueError):
    """A report request that makes no sense; the message says why (answered 400)."""


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """What a report asks for; hours are `YYYY-MM-DDTHH`, `until` exclusive."""

    since: str
    until: str
    step: str = "day"
    by: tuple[str, ...] = DEFAULT_BY
    filters: tuple[tuple[str, str], ...] = ()


def _hour_of(text: str, end: bool) -> str:
    """`YYYY-MM-DD` or `YYYY-MM-DDTHH[...]` (UTC) as an hour; the end of a range is exclusive."""
    text = text.strip()
    try:
        if len(text) == 10:
            ts, step = calendar.timegm(time.strptime(text, "%Y-%m-%d")), SECONDS_PER_DAY
        elif len(text) >= 13 and text[10] in "T ":
            ts = calendar.timegm(time.strptime(text[:10] + "T" + text[11:13], "%Y-%m-%dT%H"))
            step = 3600
        else:
            raise ValueError(text)
    except ValueError:
        raise UsageQueryError(
            f"invalid date {text!r}: use YYYY-MM-DD or YYYY-MM-DDTHH (UTC)") from None
    return time.strftime("%Y-%m-%dT%H", time.gmtime(ts + step if end else ts))


def parse_query(query: dict[str, list[str]], now: float | None = None) -> UsageQuery:
    """The report a query string asks for (UsageQueryError on nonsense)."""

    def one(name: str) -> str | None:
        values = query.get(name)
        if not values:
            return None
        if len(values) > 1:
            raise UsageQueryError(f"give {name!r} once")
        return values[0]

    now = time.time() if now is None else now
    step = one("step") or one("group_by_time") or "day"
    if step not in STEPS:
        raise UsageQueryError(f"step must be one of {', '.join(STEPS)}, got {step!r}")
    by_text = one("by")
    by = DEFAULT_BY if by_text is None else tuple(
        d.strip() for d in by_text.split(",") if d.strip())
    for name in by:
        if name not in DIMENSIONS:
            raise UsageQueryError(
                f"cannot group by {name!r} (known: {', '.join(DIMENSIONS)})")
    if len(set(by)) != len(by):
        raise UsageQueryError("each dimension once in 'by'")
    to_text = one("to")
    until = _hour_of(to_text, end=True) if to_text else time.strftime(
        "%Y-%m-%dT%H", time.gmtime(now + 3600))
    from_text = one("from")
    since = _hour_of(from_text, end=False) if from_text else time.strftime(
        "%Y-%m-%dT00", time.gmtime(now - (DEFAULT_DAYS - 1) * SECONDS_PER_DAY))
    if since >= until:
        raise UsageQueryError(f"'from' ({since}) must come before 'to' ({until}, exclusive)")
    filters = []
    for name in DIMENSIONS:
        value = one(name)
        if value is not None:
            filters.append((name, value))
    return UsageQuery(since, until, step, by, tuple(filters))


def _period(hour: str, step: str) -> str:
    if step == "hour":
        return hour
    if step == "day":
        return hour[:10]
    if step == "month":
        return hour[:7]
    return ""


def report(rows: Iterable[UsageHour], q: UsageQuery) -> list[dict[str, Any]]:
    """Rows summed per (period, *by), in order; each with its totals and exactness."""
    filters = [(DIMENSIONS[name], value) for name, value in q.filters]
    readers = [DIMENSIONS[name] for name in q.by]
    sums: dict[tuple[str, ...], list[int]] = {}
    for row in rows:
        if not (q.since <= row.hour < q.until):
            continue
        if any(read(row) != value for read, value in filters):
            continue
        group = (_period(row.hour, q.step), *(read(row) for read in readers))
        counts = sums.get(group)
        if counts is None:
            counts = sums[group] = [0] * len(USAGE_COUNTERS)
        for i, name in enumerate(USAGE_COUNTERS):
            counts[i] += getattr(row, name)
    out = []
    for group in sorted(sums):
        item: dict[str, Any] = {}
        if q.step != "total":
            item["period"] = group[0]
        item.update(zip(q.by, group[1:], strict=True))
        item.update(zip(USAGE_COUNTERS, sums[group], strict=True))
        out.append(_finish(item))
    return out


def _finish(item: dict[str, Any]) -> dict[str, Any]:
    item["total_tokens"] = item["prompt_tokens"] + item["completion_tokens"]
    # "exact": every token figure came from the backend; else some were estimated
    # from stream events (a backend that ignores the usage request, a cut stream).
    item["exact"] = item["estimated_tokens"] == 0
    return item


def totals(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The sum of a report's rows."""
    total: dict[str, Any] = dict.fromkeys(USAGE_COUNTERS, 0)
    for item in items:
        for name in USAGE_COUNTERS:
            total[name] += item[name]
    return _finish(total)


def columns(q: UsageQuery) -> list[str]:
    """A report's columns, in order (CSV header, CLI table)."""
    head = [] if q.step == "total" else ["period"]
    return [*head, *q.by, *USAGE_COUNTERS, "total_tokens", "exact"]


# A spreadsheet reads a cell starting with one of these as a formula
# (=HYPERLINK(...), =cmd|...): "CSV injection".
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A CSV cell: booleans as true/false, numbers as they are, and text a client
    chose (a user id, a model name) prefixed with "'" when a spreadsheet would
    take it for a formula."""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def to_csv(items: list[dict[str, Any]], q: UsageQuery) -> bytes:
    """A report as CSV (RFC 4180, header line first)."""
    buf = io.StringIO()
    names = columns(q)
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(names)
    for item in items:
        writer.writerow([csv_cell(item[n]) for n in names])
    return buf.getvalue().encode()


def document(items: list[dict[str, Any]], q: UsageQuery) -> dict[str, Any]:
    """The JSON answer of `GET /api/usage`."""
    return {"from": q.since, "to": q.until, "step": q.step, "by": list(q.by),
            "filters": dict(q.filters), "rows": items, "totals": totals(items)}


def wants_csv(query: dict[str, list[str]], accept: str | None) -> bool:
    """`?format=csv`, or an Accept header that prefers text/csv to JSON."""
    fmt = query.get("format", [""])[-1].lower()
    if fmt:
        if fmt not in ("csv", "json"):
            raise UsageQueryError(f"format must be csv or json, got {fmt!r}")
        return fmt == "csv"
    return bool(accept) and "text/csv" in (accept or "") and "application/json" not in (
        accept or "")


async def usage_response(operator: Operator, query: dict[str, list[str]],
                         accept: str | None) -> Response:
    """The answer of `GET /api/usage` (UsageQueryError for a bad query)."""
    as_csv = wants_csv(query, accept)
    q = parse_query(query)
    rows = await operator.usage_hours(q.since, q.until)
    # Summing and encoding take a few microseconds a row, and clients decide how
    # many rows an hour has (each user id, each model name, even refused ones):
    # in a worker thread, the gateway's loop keeps serving meanwhile.
    return await asyncio.to_thread(render, rows, q, as_csv)


def render(rows: Iterable[UsageHour], q: UsageQuery, as_csv: bool) -> Response:
    """The report of `rows` as the response `GET /api/usage` sends."""
    items = report(rows, q)
    if as_csv:
        return Response(200, to_csv(items, q), [
            ("content-type", CSV_TYPE), ("cache-control", "no-store"),
            ("content-disposition", f'attachment; filename="usage-{q.since}-{q.until}.csv"')])
    return json_response(document(items, q))
