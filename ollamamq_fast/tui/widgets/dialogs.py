"""Small modal screens: the help overlay, the weight prompt, the stop confirmation."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

HELP_TEXT = """\
[b]Move[/b]
  j / k, ↓ / ↑      move in the focused panel
  Tab, h / l        switch panel (Backends, Users, Blocked)
  Space / Enter     expand a backend's models (● = loaded)

[b]Users panel[/b]
  p   toggle VIP ★ (absolute priority)
  b   toggle Boost ⚡ (every second dispatch)
  w   set the user's weight (turns per round)
  x   block the user ⛔ (403)
  X   block the user's last IP address
  u   unblock the user and/or their address

[b]Blocked panel[/b]
  u   unblock the selected user or address

[b]Backends panel[/b]
  d   drain / undrain (no new requests; running ones finish)

  t   token usage of the last days, per user and model (stored)
  ?   this help        q   quit
"""


class HelpScreen(ModalScreen[None]):
    """? : the keys, over the dashboard; any of ?, Esc, q closes it."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,question_mark,q", "close", "Close"),
    ]

    def __init__(self, footer: str = "") -> None:
        super().__init__()
        self.footer = footer

    def compose(self) -> ComposeResult:
        """The key table, plus what the app adds (quit behaviour, attach command)."""
        with Vertical(id="help-box"):
            yield Static(HELP_TEXT + ("\n" + self.footer if self.footer else ""), id="help-text")

    def action_close(self) -> None:
        """Back to the dashboard."""
        self.dismiss(None)


class WeightScreen(ModalScreen[int | None]):
    """w: a one-line prompt; Enter applies, Esc cancels."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, user: str, weight: int) -> None:
        super().__init__()
        self.user = user
        self.weight = weight

    def compose(self) -> ComposeResult:
        """A label and a number input holding the current weight."""
        with Vertical(id="weight-box", classes="dialog"):
            # Not markup: the user id is the client's own text ("[/b]", "[link=...]").
            yield Label(Text.assemble("Weight for ", (self.user, "bold"),
                                      " (turns per round, 1 or more):"))
            yield Input(str(self.weight), type="integer", id="weight-input")
            yield Label("", id="weight-error")

    @on(Input.Submitted, "#weight-input")
    def submit(self, event: Input.Submitted) -> None:
        """Enter: close with the number, or say why it is not one."""
        text = event.value.strip()
        if not text.isdigit() or int(text) < 1:
            self.query_one("#weight-error", Label).update("a whole number, at least 1")
            return
        self.dismiss(int(text))

    def action_cancel(self) -> None:
        """Esc: leave the weight as it is."""
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; y or Enter on Yes confirms, n or Esc declines."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        """The question and two buttons, No focused so a stray Enter is harmless."""
        with Vertical(id="confirm-box", classes="dialog"):
            yield Label(self.question, id="confirm-question")
            with Horizontal(id="confirm-buttons"):
                yield Button("Yes (y)", variant="error", id="yes")
                yield Button("No (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        """Start on No."""
        self.query_one("#no", Button).focus()

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        """A button was clicked or activated."""
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        """y / n / Esc."""
        self.dismiss(yes)
