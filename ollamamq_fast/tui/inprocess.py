"""The dashboard inside `ollamamq-fast serve`, on the gateway's own event loop.

The app talks to the gateway's admin port over loopback like any admin
client, with the gateway's admin token (generated in memory when the operator
gave none). While it owns the terminal, log records go to the log file (and
warnings also to the dashboard's log panel) instead of stderr, where they
would scribble over the screen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
import secrets
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ollamamq_fast.accesslog import STDERR, json_line, logfmt_line
from ollamamq_fast.config import Settings
from ollamamq_fast.control.auth import TOKEN_BYTES

if TYPE_CHECKING:
    from ollamamq_fast.gateway import Gateway
    from ollamamq_fast.tui.app import Dashboard

log = logging.getLogger("ollamamq_fast")

# Records at this level and above also appear in the dashboard's log panel.
PANEL_LEVEL = logging.WARNING


def dashboard_wanted(settings: Settings) -> bool:
    """Whether `serve` shows the dashboard: asked for, and on a terminal.

    stdin for the keys, stdout as the brief check, stderr because Textual
    draws there: a redirected stderr would fill a log with escape codes.
    """
    return settings.tui and all(s.isatty() for s in (sys.stdin, sys.stdout, sys.stderr))


def ensure_admin_token(settings: Settings) -> str | None:
    """Give the control plane a token the dashboard knows; the new token, if made.

    The admin server would otherwise generate its own and keep only the
    digest, leaving the in-process dashboard unable to authenticate.
    """
    if settings.admin_port < 0 or settings.admin_token:
        return None
    settings.admin_token = secrets.token_urlsafe(TOKEN_BYTES)
    return settings.admin_token


def loopback_url(host: str, port: int | None) -> str | None:
    """The admin base URL the dashboard can reach (a wildcard bind means loopback)."""
    if port is None:
        return None
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


async def run_dashboard(gateway: Gateway, stop: asyncio.Event,
                        generated_token: str | None) -> None:
    """Show the dashboard until q (confirmed) or a stop signal; then return to drain."""
    url = loopback_url(gateway.settings.admin_host, gateway.admin_port)
    token = gateway.settings.admin_token
    if url is None or not token:
        print("  (no dashboard: the control plane is not running; Ctrl+C stops the gateway)",
              file=sys.stderr)
        await stop.wait()
        return
    from ollamamq_fast.tui.app import STOP_GATEWAY, Dashboard

    shown_token = generated_token or "$OLLAMAMQ_ADMIN_TOKEN"
    app = Dashboard(url, token, in_process=True,
                    help_footer=f"Attach from another terminal:\n  ollamamq-fast top "
                                f"--admin {url} --token {shown_token}")
    with logs_off_the_terminal(gateway.settings, app):
        result = await _run_until_stopped(app, stop)
    if result != STOP_GATEWAY and not stop.is_set():
        # The app ended without being asked to stop the gateway (it failed):
        # the gateway keeps serving, as it would have without a dashboard.
        print("ollamamq-fast: the dashboard closed; still serving (Ctrl+C or SIGTERM stops)",
              file=sys.stderr)
        await stop.wait()


async def _run_until_stopped(app: Dashboard, stop: asyncio.Event) -> str | None:
    task = asyncio.ensure_future(app.run_async())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            # SIGTERM / SIGINT: give the terminal back before the drain messages.
            app.exit()
        return await task
    finally:
        stopping.cancel()


@contextlib.contextmanager
def logs_off_the_terminal(settings: Settings, app: Dashboard) -> Iterator[None]:
    """Swap terminal log handlers for the log file and the log panel, then restore."""
    root = logging.getLogger()
    removed = [h for h in root.handlers if _on_terminal(h)]
    added: list[logging.Handler] = [PanelHandler(app, asyncio.get_running_loop())]
    if settings.log_file and settings.log_file != STDERR:
        # Watched: the access log rotates the same file; this handler then
        # reopens the new one instead of writing into the rotated copy.
        file_handler = logging.handlers.WatchedFileHandler(settings.log_file, encoding="utf-8")
        file_handler.setFormatter(LineFormatter(settings.log_format))
        added.append(file_handler)
    for handler in removed:
        root.removeHandler(handler)
    for handler in added:
        root.addHandler(handler)
    try:
        yield
    finally:
        for handler in added:
            root.removeHandler(handler)
            handler.close()
        for handler in removed:
            root.addHandler(handler)


def _on_terminal(handler: logging.Handler) -> bool:
    if not isinstance(handler, logging.StreamHandler) or isinstance(handler,
                                                                     logging.FileHandler):
        return False
    stream = getattr(handler, "stream", None)
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class PanelHandler(logging.Handler):
    """Shows warnings and errors in the dashboard's log panel.

    Records may come from other threads (granian's workers), so the line is
    handed to the app's loop with call_soon_threadsafe.
    """

    def __init__(self, app: Dashboard, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(PANEL_LEVEL)
        self.app = app
        self.loop = loop

    def emit(self, record: logging.LogRecord) -> None:
        """Queue the line for the log panel."""
        try:
            text = f"{record.levelname.lower()}: {record.name}: {record.getMessage()}"
            style = "red" if record.levelno >= logging.ERROR else "yellow"
            self.loop.call_soon_threadsafe(self._show, text, style)
        except RuntimeError:  # the loop is closed: the dashboard is gone
            pass
        except Exception:  # noqa: BLE001 - logging's own convention (Handler.emit)
            self.handleError(record)

    def _show(self, text: str, style: str) -> None:
        if self.app.is_running:
            self.app.log_line(text, style)


class LineFormatter(logging.Formatter):
    """Log records in the access log's format, so the shared file stays one format."""

    def __init__(self, fmt: str) -> None:
        super().__init__()
        self.fmt = fmt

    def format(self, record: logging.LogRecord) -> str:
        """One JSON object or one logfmt line."""
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + (
            f".{int(record.msecs):03d}Z")
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        fields = {"ts": ts, "level": record.levelname.lower(), "logger": record.name,
                  "msg": message}
        if self.fmt == "logfmt":
            return logfmt_line(fields)
        return json_line(fields)
