"""StatsHeader: the gateway-wide numbers at the top, from the per-second tick."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from ollamamq_fast.tui.view import rate


class StatsHeader(Static):
    """queued, in flight, req/s, tokens/s, and whether the admin API answers."""

    tick: reactive[dict[str, Any]] = reactive(dict, layout=False)
    # Empty while the API answers; the last error otherwise.
    link_error: reactive[str] = reactive("")
    source: reactive[str] = reactive("")

    def render(self) -> Text:
        """One line of figures; the connection state on the right."""
        t = self.tick
        text = Text.assemble(
            ("ollamamq-fast", "bold"), "  ",
            ("queued ", "dim"), (str(t.get("queued", 0)), "bold"), "   ",
            ("in flight ", "dim"), (str(t.get("in_flight", 0)), "bold"), "   ",
            (rate(t.get("requests_per_s", 0)), "bold"), (" req/s", "dim"), "   ",
            (rate(t.get("tokens_per_s", 0)), "bold"), (" tokens/s", "dim"), "   ",
        )
        if self.link_error:
            text.append(f"⚠ {self.link_error}", style="bold red")
        else:
            text.append(f"● {self.source}", style="green")
        return text

    def watch_link_error(self, error: str) -> None:
        """A CSS class lets the stylesheet turn the bar red while disconnected."""
        self.set_class(bool(error), "-disconnected")
