"""BackendsTable: online / offline / draining, API kind, slots, models."""

from __future__ import annotations

from typing import Any, ClassVar

from textual.binding import Binding, BindingType
from textual.message import Message
from textual.reactive import var

from ollamamq_fast.tui.view import BACKEND_COLUMNS, backend_rows, backend_url_of
from ollamamq_fast.tui.widgets.table import LiveTable


class BackendsTable(LiveTable):
    """The fleet; Space/Enter expands a backend's model list, d drains it."""

    BINDINGS: ClassVar[list[BindingType]] = [
        # Replaces DataTable's enter = select_cursor: here Enter means expand,
        # as in ollamaMQ.
        Binding("enter,space", "toggle_expand", "Models", priority=False),
        Binding("d", "drain", "Drain/undrain"),
    ]
    COLUMNS = BACKEND_COLUMNS
    TITLE = "Backends"

    backends: var[list[dict[str, Any]]] = var(list)

    class DrainRequested(Message):
        """The operator pressed d on a backend (the app calls the API)."""

        def __init__(self, backend: dict[str, Any]) -> None:
            super().__init__()
            self.backend = backend

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        # Expansion is a view choice, kept by URL so it survives refreshes.
        self.expanded: set[str] = set()

    def watch_backends(self, backends: list[dict[str, Any]]) -> None:
        """New data from the app: redraw the rows that changed."""
        self._render_rows()

    def _render_rows(self) -> None:
        urls = {str(b["url"]) for b in self.backends}
        self.expanded &= urls
        online = sum(1 for b in self.backends if b.get("online") and not b.get("draining"))
        self.show(backend_rows(self.backends, self.expanded),
                  f"{online}/{len(self.backends)} taking requests")

    @property
    def selected_backend(self) -> dict[str, Any] | None:
        """The backend under the cursor (a model row counts as its backend)."""
        return self.row_data(self.selected_key, self.backends, "url", backend_url_of)

    def action_toggle_expand(self) -> None:
        """Space/Enter: show or hide the selected backend's models."""
        backend = self.selected_backend
        if backend is None:
            return
        url = str(backend["url"])
        self.expanded ^= {url}
        self._render_rows()
        # Collapsing from a model row would leave the cursor on a vanished row.
        self.select_key(f"b|{url}")

    def action_drain(self) -> None:
        """d: ask the app to drain or undrain the selected backend."""
        backend = self.selected_backend
        if backend is not None:
            self.post_message(self.DrainRequested(backend))
