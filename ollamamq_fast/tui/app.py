"""The terminal dashboard: a Textual app that is a client of the admin API.

Data comes from two workers: one polls /api/backends, /api/users and
/api/blocked about once a second, the other follows /api/events for the
per-second tick and the change events. Both only set the app's reactives; the
panels are bound to them (attributes down) and report key presses back as
messages (messages up), which the app turns into admin API calls.

The same app runs attached to a remote gateway (`ollamamq-fast top`, q just
leaves) or inside `ollamamq-fast serve` on the gateway's own loop (q asks,
then the gateway drains and stops).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any, ClassVar

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.reactive import var
from textual.widgets import Footer

from ollamamq_fast.tui import actions
from ollamamq_fast.tui.actions import AdminCall, NoTarget
from ollamamq_fast.tui.client import AdminApi, AdminApiError
from ollamamq_fast.tui.widgets.backends import BackendsTable
from ollamamq_fast.tui.widgets.blocked import BlockedTable
from ollamamq_fast.tui.widgets.dialogs import ConfirmScreen, HelpScreen, WeightScreen
from ollamamq_fast.tui.widgets.eventlog import EventLog
from ollamamq_fast.tui.widgets.header import StatsHeader
from ollamamq_fast.tui.widgets.pools import PoolsTable
from ollamamq_fast.tui.widgets.usage import UsageScreen
from ollamamq_fast.tui.widgets.users import UsersTable

# About once a second, like ollamaMQ's own refresh; the admin API answers
# from memory, so this costs the gateway three small JSON encodes a second.
POLL_INTERVAL_S = 1.0
# Change events and key presses wake the poller early, but never more often
# than this: a burst of changes must not turn into a burst of redraws that
# would take loop time from the data plane (in-process mode shares its loop).
MIN_REFRESH_GAP_S = 0.5
# After a lost event stream, try again this often (the server's `retry` hint).
RECONNECT_S = 3.0
# Events queued between two refreshes; far more than a second's worth.
MAX_PENDING_EVENTS = 1000
# Returned by run_async() when the operator confirmed stopping the gateway.
STOP_GATEWAY = "stop"


class Dashboard(App[str | None]):
    """Backends, users, blocklist, header figures and a live log of one gateway."""

    CSS_PATH = "app.tcss"
    TITLE = "ollamamq-fast"
    # Every key is listed in the footer and under ?; a palette would only add
    # a second way in (and a key, ctrl+p, that operators do not expect here).
    ENABLE_COMMAND_PALETTE = False
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        # In raw mode Ctrl+C is a key, not SIGINT: treat it as q.
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("question_mark", "help", "Help"),
        Binding("t", "usage", "Usage"),
        Binding("l", "app.focus_next", "Next panel", show=False),
        Binding("h", "app.focus_previous", "Previous panel", show=False),
        # Keys that belong to one panel: pressed elsewhere, say where they work.
        Binding("p,b,w,x,X", "wrong_panel('Users')", show=False),
        Binding("d", "wrong_panel('Backends')", show=False),
        Binding("u", "wrong_panel('Users or Blocked')", show=False),
    ]

    backends: var[list[dict[str, Any]]] = var(list)
    pools: var[list[dict[str, Any]]] = var(list)
    users: var[list[dict[str, Any]]] = var(list)
    blocked: var[dict[str, list[str]]] = var(dict)
    blocked_ips: var[frozenset[str]] = var(frozenset)
    tick: var[dict[str, Any]] = var(dict)
    link_error: var[str] = var("")

    def __init__(self, admin_url: str, token: str | None, *, in_process: bool = False,
                 help_footer: str = "", poll_interval: float = POLL_INTERVAL_S) -> None:
        super().__init__()
        self.admin_url = admin_url
        self.token = token
        self.in_process = in_process
        self.help_footer = help_footer
        self.poll_interval = poll_interval
        # Created on mount: an aiohttp session belongs to the loop that runs the app.
        self.api: AdminApi | None = None
        self._wake = asyncio.Event()
        # Events wait here for the next refresh (bounded: a stalled UI drops the oldest).
        self._pending: deque[dict[str, Any]] = deque(maxlen=MAX_PENDING_EVENTS)
        self._stream_up = False

    # -- Layout ---------------------------------------------------------------

    def compose(self) -> ComposeResult:
        """Header, Backends on top, Users beside Blocked, the log, the key footer."""
        header = StatsHeader(id="stats")
        header.source = self.admin_url
        yield header.data_bind(tick=Dashboard.tick, link_error=Dashboard.link_error)
        with Horizontal(id="top"):
            yield BackendsTable(id="backends").data_bind(backends=Dashboard.backends)
            yield PoolsTable(id="pools").data_bind(pools=Dashboard.pools)
        with Horizontal(id="middle"):
            yield UsersTable(id="users").data_bind(users=Dashboard.users,
                                                   blocked_ips=Dashboard.blocked_ips)
            yield BlockedTable(id="blocked").data_bind(blocked=Dashboard.blocked)
        yield EventLog(id="log")
        yield Footer()

    def on_mount(self) -> None:
        """Connect and start the two data workers; the Users panel has the keys."""
        self.api = AdminApi(self.admin_url, self.token)
        self.query_one(UsersTable).focus()
        self.poll()
        self.follow_events()

    async def on_unmount(self) -> None:
        """Close the HTTP session (workers are cancelled by then)."""
        if self.api is not None:
            await self.api.close()

    # -- Data workers -----------------------------------------------------------

    @work(exclusive=True, group="poll")
    async def poll(self) -> None:
        """Refresh about once a second: on each tick, or on a timer without events."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            self._wake.clear()
            await self.refresh_data()
            self._flush_events()
            # With the event stream up, the tick wakes us; the timer is only a
            # fallback, made longer so it does not add a second refresh.
            wait = self.poll_interval * (1.5 if self._stream_up else 1.0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            rest = MIN_REFRESH_GAP_S - (loop.time() - started)
            if rest > 0:
                await asyncio.sleep(rest)

    async def refresh_data(self) -> None:
        """One round of GETs; the reactives change only when the data did."""
        assert self.api is not None
        try:
            backends, users, blocked, pools = await asyncio.gather(
                self.api.call("GET", "/api/backends"), self.api.call("GET", "/api/users?sort=active"),
                self.api.call("GET", "/api/blocked"), self.api.call("GET", "/api/pools"))
        except AdminApiError as exc:
            self._lost(str(exc))
            return
        self.link_error = ""
        self.backends = backends["backends"]
        self.pools = pools["pools"]
        self.users = users["users"]
        self.blocked = blocked
        self.blocked_ips = frozenset(blocked.get("ips", []))

    @work(exclusive=True, group="events")
    async def follow_events(self) -> None:
        """Follow /api/events for ever, reconnecting after RECONNECT_S."""
        assert self.api is not None
        while True:
            try:
                async for event in self.api.events():
                    self._stream_up = True
                    self.on_admin_event(event)
            except AdminApiError as exc:
                self._lost(str(exc))
            self._stream_up = False
            await asyncio.sleep(RECONNECT_S)
            self.query_one(EventLog).note("reconnecting to the event stream...", "dim")

    def on_admin_event(self, event: dict[str, Any]) -> None:
        """Queue the event and wake the poller, which shows both in one frame.

        Applying a tick at once and the polled lists a few milliseconds later
        would draw two frames a second; each frame is loop time the gateway
        shares in `serve`.
        """
        self._pending.append(event)
        self._wake.set()

    def _flush_events(self) -> None:
        log = self.query_one(EventLog)
        tick: dict[str, Any] | None = None
        while self._pending:
            event = self._pending.popleft()
            log.add_event(event)
            if event.get("type") == "tick":
                tick = event
        if tick is not None:
            self.tick = {k: v for k, v in tick.items() if k != "backends"}

    def _lost(self, error: str) -> None:
        if error != self.link_error:
            self.query_one(EventLog).note(error, "red")
        self.link_error = error

    # -- Panel requests (messages up) ----------------------------------------------

    @on(UsersTable.UserAction)
    def user_action(self, message: UsersTable.UserAction) -> None:
        """p, b, w, x, X, u on a user."""
        user = message.user
        if message.action == "weight":
            self._ask_weight(user)
            return
        try:
            calls = self._user_calls(message.action, user)
        except NoTarget as exc:
            self.notify(str(exc), severity="warning", markup=False)
            return
        self.send(calls)

    def _user_calls(self, action: str, user: dict[str, Any]) -> list[AdminCall]:
        if action == "vip":
            return [actions.toggle_vip(user)]
        if action == "boost":
            return [actions.toggle_boost(user)]
        if action == "block":
            return [actions.block_user(user)]
        if action == "block_ip":
            return [actions.block_ip(user)]
        if action == "unblock":
            return actions.unblock_for_user(user, set(self.blocked_ips))
        raise NoTarget(f"unknown user action {action!r}")

    def _ask_weight(self, user: dict[str, Any]) -> None:
        def apply(weight: int | None) -> None:
            if weight is not None:
                self.send([actions.set_weight(user, weight)])

        self.push_screen(WeightScreen(str(user["user"]), int(user.get("weight", 1))), apply)

    @on(BlockedTable.UnblockRequested)
    def unblock_item(self, message: BlockedTable.UnblockRequested) -> None:
        """u in the Blocked panel."""
        self.send([actions.unblock_item(message.kind, message.value)])

    @on(BackendsTable.DrainRequested)
    def drain(self, message: BackendsTable.DrainRequested) -> None:
        """d in the Backends panel."""
        self.send([actions.toggle_drain(message.backend)])

    @work(group="admin")
    async def send(self, calls: list[AdminCall]) -> None:
        """Run admin calls in order; log each outcome, then refresh at once."""
        assert self.api is not None
        log = self.query_one(EventLog)
        for call in calls:
            try:
                await self.api.call(call.method, call.path, call.body, call.query)
            except AdminApiError as exc:
                log.note(f"{call.label}: failed: {exc}", "red")
                # markup=False: the label names the user, the error may quote it.
                self.notify(f"{call.label}: {exc}", severity="error", markup=False)
                break
            log.note(f"✓ {call.label}", "green")
        self._wake.set()

    # -- Keys -----------------------------------------------------------------------

    def action_help(self) -> None:
        """?: the help overlay."""
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self._help_footer()))

    def action_usage(self) -> None:
        """t: stored token usage of the last days (GET /api/usage)."""
        if self.api is not None and not isinstance(self.screen, UsageScreen):
            self.push_screen(UsageScreen(self.api))

    def _help_footer(self) -> str:
        if self.in_process:
            text = "q stops the gateway (after asking): running requests finish first."
        else:
            text = f"q leaves the dashboard; the gateway at {self.admin_url} keeps running."
        return text + ("\n" + self.help_footer if self.help_footer else "")

    async def action_quit(self) -> None:
        """q: leave (top) or, after confirmation, stop the gateway (serve)."""
        if not self.in_process:
            self.exit()
            return
        if isinstance(self.screen, ConfirmScreen):
            return

        def decided(yes: bool | None) -> None:
            if yes:
                self.exit(STOP_GATEWAY)

        self.push_screen(ConfirmScreen("Stop the gateway? Running requests finish first "
                                       "(drain), new ones are refused."), decided)

    def action_wrong_panel(self, panel: str) -> None:
        """A panel key pressed in another panel: say where it works."""
        self.notify(f"that key works in the {panel} panel (Tab / h / l to get there)",
                    severity="warning", timeout=3)

    def log_line(self, message: str, style: str = "") -> None:
        """Show a line in the log panel (the in-process runner's log records)."""
        self.query_one(EventLog).note(message, style)
