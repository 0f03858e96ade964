"""LiveTable: a cheap row-cursor table refreshed in place from freshly built rows.

Every panel is rebuilt from an API answer about once a second. Textual's
DataTable was the first choice, but any cell update there drops its whole
render cache (`_update_count` is part of every cell's cache key), so with
busy users each refresh re-rendered every visible cell through Rich's Padding
and Styled: measured inside `serve` at saturation, that took about a tenth
of the gateway loop's CPU. This table uses Textual's Line API instead: one
Strip per row, cached until that row's cells change, with the cursor applied
as a style when the line is drawn. Redrawing the screen then costs a copy of
cached strips, and a refresh re-renders only the rows whose numbers moved.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rich.segment import Segment
from rich.text import Text
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Size
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from ollamamq_fast.tui.view import Cell, Row

# Blank cells between columns.
COLUMN_GAP = 2


class LiveTable(ScrollView, can_focus=True):
    """A fixed header and keyed rows; show() replaces them, touching only what changed."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("down,j", "cursor_down", "Down", show=False),
        Binding("up,k", "cursor_up", "Up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("home", "first", "First", show=False),
        Binding("end", "last", "Last", show=False),
    ]
    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "live-table--header", "live-table--cursor",
    }
    # (label, key) of each column, set by subclasses.
    COLUMNS: ClassVar[tuple[tuple[str, str], ...]] = ()
    # The panel's name in its border; the row count is added to it.
    TITLE: ClassVar[str] = ""

    cursor_row: reactive[int] = reactive(0, always_update=True)

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._keys: list[str] = []
        self._cells: list[tuple[Cell, ...]] = []
        self._widths: list[int] = [len(label) for label, _ in self.COLUMNS]
        # Rendered rows by index; an entry is dropped when its row changes.
        self._strips: dict[int, Strip] = {}

    def on_mount(self) -> None:
        """Show the (empty) table's title."""
        self.border_title = f"{self.TITLE} (0)"

    # -- Content --------------------------------------------------------------------

    @property
    def row_count(self) -> int:
        """Rows in the table (the header not counted)."""
        return len(self._keys)

    def show(self, rows: list[Row], title_suffix: str = "") -> None:
        """Replace the content with `rows`; the cursor stays on its row key."""
        keys = [key for key, _ in rows]
        cells = [c for _, c in rows]
        title = f"{self.TITLE} ({title_suffix or len(rows)})"
        if title != self.border_title:
            self.border_title = title
        widths = [max([len(label)] + [row[i].cell_len for row in cells])
                  for i, (label, _) in enumerate(self.COLUMNS)]
        if widths != self._widths or keys != self._keys:
            self._strips.clear()
        else:
            for i, (new, old) in enumerate(zip(cells, self._cells, strict=True)):
                if new != old:
                    self._strips.pop(i, None)
        selected, cursor = self.selected_key, self.cursor_row
        self._keys, self._cells, self._widths = keys, cells, widths
        self.virtual_size = Size(sum(widths) + COLUMN_GAP * len(widths), len(keys) + 1)
        if selected in keys:
            self.cursor_row = keys.index(selected)
        else:
            # The selected row went away: stay at the same height rather than
            # jumping to the top.
            self.cursor_row = max(0, min(cursor, len(keys) - 1))
        self.refresh()

    @property
    def selected_key(self) -> str | None:
        """The key of the row under the cursor (None for an empty table)."""
        if not 0 <= self.cursor_row < len(self._keys):
            return None
        return self._keys[self.cursor_row]

    def select_key(self, key: str) -> bool:
        """Move the cursor to the row with this key; False when there is none."""
        if key not in self._keys:
            return False
        self.cursor_row = self._keys.index(key)
        return True

    def move_cursor(self, *, row: int) -> None:
        """Put the cursor on row `row` (clamped to the table)."""
        self.cursor_row = max(0, min(row, len(self._keys) - 1))

    def row_data(self, key: str | None, items: list[dict[str, Any]], field: str,
                 key_of: Any) -> dict[str, Any] | None:
        """The API record behind a row key (`key_of` maps a row key to its id)."""
        if key is None:
            return None
        ident = key_of(key)
        return next((item for item in items if str(item.get(field)) == ident), None)

    # -- Cursor -------------------------------------------------------------------

    def watch_cursor_row(self, old: int, new: int) -> None:
        """Keep the cursor row in view and repaint the two rows involved."""
        visible = max(self.scrollable_content_region.height - 1, 1)
        top = round(self.scroll_offset.y)
        if new < top:
            self.scroll_to(y=new, animate=False)
        elif new >= top + visible:
            self.scroll_to(y=new - visible + 1, animate=False)
        self.refresh()

    def action_cursor_down(self) -> None:
        """j / ↓."""
        self.move_cursor(row=self.cursor_row + 1)

    def action_cursor_up(self) -> None:
        """k / ↑."""
        self.move_cursor(row=self.cursor_row - 1)

    def action_page(self, direction: int) -> None:
        """PgDn / PgUp: a screenful of rows."""
        step = max(self.scrollable_content_region.height - 2, 1)
        self.move_cursor(row=self.cursor_row + direction * step)

    def action_first(self) -> None:
        """Home."""
        self.move_cursor(row=0)

    def action_last(self) -> None:
        """End."""
        self.move_cursor(row=len(self._keys) - 1)

    def on_click(self, event: events.Click) -> None:
        """A click selects the row under the pointer (the header is line 0)."""
        row = round(self.scroll_offset.y) + event.y - 1
        if event.y >= 1 and 0 <= row < len(self._keys):
            self.cursor_row = row

    # -- Line API -------------------------------------------------------------------

    def render_line(self, y: int) -> Strip:
        """The header on line 0, then rows from the scroll position down."""
        width = self.scrollable_content_region.width
        scroll_x = round(self.scroll_offset.x)
        base = self.rich_style
        if y == 0:
            header = self._line(tuple(Text(label) for label, _ in self.COLUMNS))
            style = base + self.get_component_rich_style("live-table--header")
            return header.apply_style(style).crop_extend(scroll_x, scroll_x + width, style)
        index = round(self.scroll_offset.y) + y - 1
        if index >= len(self._keys):
            return Strip.blank(width, base)
        strip = self._strips.get(index)
        if strip is None:
            strip = self._strips[index] = self._line(self._cells[index])
        style = base
        if index == self.cursor_row:
            style = base + self.get_component_rich_style("live-table--cursor")
            # Under the cells' own styles: coloured markers keep their colour.
            strip = strip.apply_style(style)
        return strip.crop_extend(scroll_x, scroll_x + width, style)

    def _line(self, cells: tuple[Cell, ...]) -> Strip:
        """One row padded to the column widths, as segments (no markup, no wrap)."""
        segments: list[Segment] = []
        gap = Segment(" " * COLUMN_GAP)
        for cell, width in zip(cells, self._widths, strict=True):
            piece = cell.copy()
            piece.truncate(width, overflow="ellipsis", pad=True)
            segments.extend(piece.render(self.app.console, end=""))
            segments.append(gap)
        return Strip(segments, sum(self._widths) + COLUMN_GAP * len(self._widths))
