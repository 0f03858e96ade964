"""UsersTable: per-user traffic, fair-share settings and the keys that change them."""

from __future__ import annotations

from typing import Any, ClassVar

from textual.binding import Binding, BindingType
from textual.message import Message
from textual.reactive import var

from ollamamq_fast.tui.view import MAX_USER_ROWS, USER_COLUMNS, user_of, user_rows
from ollamamq_fast.tui.widgets.table import LiveTable


class UsersTable(LiveTable):
    """Users with ★ VIP, ⚡ Boost and ⛔ blocked markers."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("p", "user('vip')", "VIP"),
        Binding("b", "user('boost')", "Boost"),
        Binding("w", "user('weight')", "Weight"),
        Binding("x", "user('block')", "Block"),
        Binding("X", "user('block_ip')", "Block IP"),
        Binding("u", "user('unblock')", "Unblock"),
    ]
    COLUMNS = USER_COLUMNS
    TITLE = "Users"

    users: var[list[dict[str, Any]]] = var(list)
    blocked_ips: var[frozenset[str]] = var(frozenset)

    class UserAction(Message):
        """The operator pressed a user key; the app turns it into an API call."""

        def __init__(self, action: str, user: dict[str, Any]) -> None:
            super().__init__()
            self.action = action
            self.user = user

    def watch_users(self, users: list[dict[str, Any]]) -> None:
        """New data from the app: redraw the rows that changed."""
        self._render_rows()

    def watch_blocked_ips(self, ips: frozenset[str]) -> None:
        """The blocklist changed: the last-IP markers may have."""
        self._render_rows()

    def _render_rows(self) -> None:
        users = self.users
        suffix = f"{MAX_USER_ROWS} of {len(users)}" if len(users) > MAX_USER_ROWS else ""
        self.show(user_rows(users, set(self.blocked_ips)), suffix)

    @property
    def selected_user(self) -> dict[str, Any] | None:
        """The user record under the cursor."""
        return self.row_data(self.selected_key, self.users, "user", user_of)

    def action_user(self, action: str) -> None:
        """p, b, w, x, X, u: hand the selected user to the app with what to do."""
        user = self.selected_user
        if user is not None:
            self.post_message(self.UserAction(action, user))
