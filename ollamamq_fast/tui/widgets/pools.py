"""PoolsTable: each pool's backends, slots, queue, required models and running pulls."""

from __future__ import annotations

from typing import Any

from textual.reactive import var

from ollamamq_fast.tui.view import POOL_COLUMNS, pool_rows
from ollamamq_fast.tui.widgets.table import LiveTable


class PoolsTable(LiveTable):
    """Read-only: pools are changed with the admin API or `ollamamq-fast pools`."""

    can_focus = False
    COLUMNS = POOL_COLUMNS
    TITLE = "Pools"

    pools: var[list[dict[str, Any]]] = var(list)

    def watch_pools(self, pools: list[dict[str, Any]]) -> None:
        """New data from the app."""
        pulling = sum(len(p.get("pulls", [])) for p in pools)
        self.show(pool_rows(pools), f"{pulling} pull(s) running" if pulling else "")
