"""BlockedTable: blocked users and addresses; u unblocks the selected one."""

from __future__ import annotations

from typing import ClassVar

from textual.binding import Binding, BindingType
from textual.message import Message
from textual.reactive import var

from ollamamq_fast.tui.view import BLOCKED_COLUMNS, blocked_item, blocked_rows
from ollamamq_fast.tui.widgets.table import LiveTable


class BlockedTable(LiveTable):
    """The blocklist, users first."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("u", "unblock", "Unblock")]
    COLUMNS = BLOCKED_COLUMNS
    TITLE = "Blocked"

    blocked: var[dict[str, list[str]]] = var(dict)

    class UnblockRequested(Message):
        """The operator pressed u on a blocked user or address."""

        def __init__(self, kind: str, value: str) -> None:
            super().__init__()
            self.kind = kind
            self.value = value

    def watch_blocked(self, blocked: dict[str, list[str]]) -> None:
        """New data from the app."""
        self.show(blocked_rows(blocked))

    def action_unblock(self) -> None:
        """u: ask the app to lift the selected block."""
        key = self.selected_key
        item = blocked_item(key) if key is not None else None
        if item is not None:
            self.post_message(self.UnblockRequested(*item))
