"""EventLog: the live log of change events and per-second counters."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import RichLog

from ollamamq_fast.tui.view import clock, event_line, tick_active, tick_line

# Enough to scroll back over the last minutes; older lines are dropped so the
# widget's memory and redraw cost stay flat over days.
MAX_LINES = 1000


class EventLog(RichLog):
    """Appends one line per event; not focusable, so Tab cycles the tables only."""

    can_focus = False

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(max_lines=MAX_LINES, wrap=False, markup=False, id=id)
        self.border_title = "Log"

    def add_event(self, event: dict[str, Any]) -> None:
        """An event from the stream: ticks only when something happened."""
        if event.get("type") == "tick":
            if tick_active(event):
                self.write(tick_line(event))
        else:
            self.write(event_line(event))

    def note(self, message: str, style: str = "") -> None:
        """A line of our own (an action's outcome, a lost connection)."""
        self.write(Text.assemble((clock(), "dim"), "  ", (message, style)))
