"""LiveTable: a DataTable refreshed in place from freshly built rows.

Every panel is rebuilt from an API answer about once a second. Clearing and
refilling a DataTable each time would redraw everything and lose the cursor;
instead, when the row keys are the same as last time (the usual case), only
the cells that changed are updated, and the cursor stays on its row key.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from textual.binding import Binding, BindingType
from textual.widgets import DataTable

from ollamamq_fast.tui.view import Cell, Row


class LiveTable(DataTable[Text]):
    """A row-cursor table with vi keys whose content is replaced by show()."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
    ]
    # (label, key) of each column, set by subclasses.
    COLUMNS: ClassVar[tuple[tuple[str, str], ...]] = ()
    # The panel's name in its border; the row count is added to it.
    TITLE: ClassVar[str] = ""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(cursor_type="row", id=id)
        self._keys: list[str] = []
        self._cells: list[tuple[Cell, ...]] = []
        self._widths: list[int] = [len(label) for label, _ in self.COLUMNS]

    def on_mount(self) -> None:
        """Create the columns once; rows come with the first refresh."""
        for label, key in self.COLUMNS:
            self.add_column(label, key=key)
        self.border_title = self.TITLE

    @property
    def selected_key(self) -> str | None:
        """The key of the row under the cursor (None for an empty table)."""
        if not self._keys or not 0 <= self.cursor_row < len(self._keys):
            return None
        return self._keys[self.cursor_row]

    def select_key(self, key: str) -> bool:
        """Move the cursor to the row with this key; False when there is none."""
        if key not in self._keys:
            return False
        self.move_cursor(row=self._keys.index(key))
        return True

    def show(self, rows: list[Row], title_suffix: str = "") -> None:
        """Replace the content with `rows`, touching only what changed."""
        keys = [key for key, _ in rows]
        self.border_title = f"{self.TITLE} ({title_suffix or len(rows)})"
        if keys == self._keys:
            self._update_cells(rows)
        else:
            self._rebuild(rows, keys)
        self._cells = [cells for _, cells in rows]

    def _update_cells(self, rows: list[Row]) -> None:
        widths = self._widths
        for (key, cells), old in zip(rows, self._cells, strict=True):
            if cells == old:
                continue
            for i, ((_, column), new, prev) in enumerate(zip(self.COLUMNS, cells, old,
                                                              strict=True)):
                if new != prev:
                    # Re-measuring a column walks every row (DataTable's own
                    # _update_column_widths): only when this cell outgrows it.
                    wider = new.cell_len > widths[i]
                    if wider:
                        widths[i] = new.cell_len
                    self.update_cell(key, column, new, update_width=wider)

    def _rebuild(self, rows: list[Row], keys: list[str]) -> None:
        selected = self.selected_key
        cursor = self.cursor_row
        self.clear()
        for key, cells in rows:
            self.add_row(*cells, key=key)
        self._keys = keys
        # add_row sized the columns to fit; remember those widths.
        self._widths = [max([len(label)] + [cells[i].cell_len for _, cells in rows])
                        for i, (label, _) in enumerate(self.COLUMNS)]
        if selected in keys:
            self.move_cursor(row=keys.index(selected), animate=False)
        elif keys:
            # The selected row went away: stay at the same height rather than
            # jumping to the top.
            self.move_cursor(row=min(cursor, len(keys) - 1), animate=False)

    def row_data(self, key: str | None, items: list[dict[str, Any]], field: str,
                 key_of: Any) -> dict[str, Any] | None:
        """The API record behind a row key (`key_of` maps a row key to its id)."""
        if key is None:
            return None
        ident = key_of(key)
        return next((item for item in items if str(item.get(field)) == ident), None)
