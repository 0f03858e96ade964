"""EventLog: the live log of change events and per-second counters."""

from __future__ import annotations

from collections import deque
from typing import Any

from rich.console import RenderableType
from rich.text import Text
from textual.widget import Widget

from ollamamq_fast.display import printable
from ollamamq_fast.tui.view import clock, event_line, tick_active, tick_line

# Lines kept; only the newest that fit are drawn. Bounded so memory stays
# flat over days.
MAX_LINES = 200


class EventLog(Widget):
    """The newest lines at the bottom; not focusable, so Tab cycles the tables only.

    Not a RichLog on purpose: a growing scrollable log changes its virtual
    size with every line, and each such change re-lays out the whole screen,
    which in `serve` costs the gateway's loop a full redraw every second. A
    fixed-size tail repaints only itself.
    """

    can_focus = False

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.lines: deque[Text] = deque(maxlen=MAX_LINES)
        self.border_title = "Log"

    def render(self) -> RenderableType:
        """The last lines that fit, one per row, cut rather than wrapped."""
        height = max(self.content_size.height, 1)
        shown = list(self.lines)[-height:]
        text = Text("\n").join(shown)
        text.no_wrap = True
        text.overflow = "ellipsis"
        return text

    def add_event(self, event: dict[str, Any]) -> None:
        """An event from the stream: ticks only when something happened."""
        if event.get("type") == "tick":
            if tick_active(event):
                self._append(tick_line(event))
        else:
            self._append(event_line(event))

    def note(self, message: str, style: str = "") -> None:
        """A line of our own (an action's outcome, a lost connection)."""
        self._append(Text.assemble((clock(), "dim"), "  ", (printable(message), style)))

    def _append(self, line: Text) -> None:
        self.lines.append(line)
        self.refresh()
