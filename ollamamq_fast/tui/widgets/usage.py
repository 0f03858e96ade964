"""The usage screen (t): stored token usage of the last days, per user and per model.

Three `GET /api/usage` reports (per day, per user, per model over the range),
drawn as a bar per day and two tables. Opened over the dashboard; `r`
reloads, `n` / `p` widen or narrow the range, Esc or `t` closes. Figures
with estimated tokens are marked `~`.
"""

from __future__ import annotations

import calendar
import time
from typing import Any, ClassVar

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from ollamamq_fast.display import printable
from ollamamq_fast.tui.client import AdminApi, AdminApiError

DEFAULT_DAYS = 7
RANGES = (1, 7, 30, 90)
BAR_WIDTH = 40
ROWS_SHOWN = 20  # per table; the biggest first
SECONDS_PER_DAY = 86400


def _number(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    if n >= 10_000:
        return f"{n / 1e3:.1f}k"
    return str(n)


def _tokens(row: dict[str, Any]) -> str:
    text = _number(int(row["total_tokens"]))
    return text if row.get("exact", True) else "~" + text


def daily_bars(daily: dict[str, Any]) -> Text:
    """One line per day: the date, a bar scaled to the busiest day, the tokens."""
    rows = {r["period"]: r for r in daily["rows"]}
    text = Text()
    if not rows:
        return Text(f"no usage since {daily['from'][:10]} (UTC)", style="dim")
    top = max(int(r["total_tokens"]) for r in rows.values()) or 1
    for day in _days(daily["from"], daily["to"]):
        r = rows.get(day)
        text.append(f"{day}  ")
        if r is None:
            text.append("▏ -\n", style="dim")
            continue
        width = round(BAR_WIDTH * int(r["total_tokens"]) / top)
        text.append("█" * width or "▏", style="bold cyan")
        text.append(f" {_tokens(r)}  ({r['requests']} requests)\n")
    return text


def _days(since_hour: str, until_hour: str) -> list[str]:
    """Every UTC day from the first hour of a report to its (exclusive) last."""
    start = calendar.timegm(time.strptime(since_hour[:10], "%Y-%m-%d"))
    end = calendar.timegm(time.strptime(until_hour, "%Y-%m-%dT%H"))
    return [time.strftime("%Y-%m-%d", time.gmtime(t))
            for t in range(start, end, SECONDS_PER_DAY)]


def usage_table(report: dict[str, Any], dim: str, title: str) -> Table:
    """One dimension's rows, the biggest first."""
    table = Table(title=title, title_justify="left", expand=True, show_edge=False)
    table.add_column(dim.capitalize())
    for label in ("requests", "errors", "cancelled", "in", "out", "total"):
        table.add_column(label, justify="right")
    rows = sorted(report["rows"], key=lambda r: -int(r["total_tokens"]))
    for r in rows[:ROWS_SHOWN]:
        # Text, not str: a str cell is console markup, and a user id or model
        # name like "[/x]" would end the screen with a MarkupError.
        table.add_row(Text(printable(str(r[dim] or "(none)"))), str(r["requests"]), str(r["errors"]),
                      str(r["cancelled"]), _number(int(r["prompt_tokens"])),
                      _number(int(r["completion_tokens"])), _tokens(r))
    if len(rows) > ROWS_SHOWN:
        table.add_row(f"… {len(rows) - ROWS_SHOWN} more", "", "", "", "", "", "")
    return table


class UsageScreen(ModalScreen[None]):
    """t: usage of the last days over the dashboard."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,t,q", "close", "Close"),
        Binding("r", "reload", "Reload"),
        Binding("n", "range(1)", "Longer range"),
        Binding("p", "range(-1)", "Shorter range"),
    ]

    def __init__(self, api: AdminApi, days: int = DEFAULT_DAYS) -> None:
        super().__init__()
        self.api = api
        self.days = days

    def compose(self) -> ComposeResult:
        """A scrollable report; filled in by `load`."""
        with VerticalScroll(id="usage-box", classes="dialog"):
            yield Static("loading usage…", id="usage-body")

    def on_mount(self) -> None:
        """Load the report once shown."""
        self.run_worker(self.load(), exclusive=True, group="usage")

    async def load(self) -> None:
        """Fetch the three reports and draw them."""
        body = self.query_one("#usage-body", Static)
        try:
            daily = await self.api.call("GET", "/api/usage", query=self._query("", "day"))
            users = await self.api.call("GET", "/api/usage", query=self._query("user", "total"))
            models = await self.api.call("GET", "/api/usage",
                                         query=self._query("model", "total"))
        except AdminApiError as exc:
            body.update(Text(f"usage: {exc}", style="red"))
            return
        total = daily["totals"]
        head = Text.assemble(
            (f"Usage of the last {self.days} day{'s' if self.days > 1 else ''} (UTC)  ",
             "bold"),
            f"{total['requests']} requests, {_tokens(total)} tokens, "
            f"{total['errors']} errors, {total['cancelled']} cancelled",
            ("   n/p: range  r: reload  Esc: close", "dim"))
        body.update(Group(head, Text(), daily_bars(daily),
                          usage_table(users, "user", "Per user"), Text(),
                          usage_table(models, "model", "Per model")))

    def _query(self, by: str, step: str) -> dict[str, str]:
        """The last `days` UTC days, today included."""
        start = time.gmtime(time.time() - (self.days - 1) * SECONDS_PER_DAY)
        return {"from": time.strftime("%Y-%m-%d", start), "by": by, "step": step}

    def action_reload(self) -> None:
        """r: fetch again."""
        self.run_worker(self.load(), exclusive=True, group="usage")

    def action_range(self, step: int) -> None:
        """n / p: the next longer or shorter range of RANGES."""
        shorter = [d for d in RANGES if d < self.days]
        longer = [d for d in RANGES if d > self.days]
        if step > 0 and longer:
            self.days = longer[0]
        elif step < 0 and shorter:
            self.days = shorter[-1]
        else:
            return
        self.action_reload()

    def action_close(self) -> None:
        """Back to the dashboard."""
        self.dismiss(None)
