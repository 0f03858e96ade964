"""Text a client chose, made safe to show on an operator's terminal."""

from __future__ import annotations


def printable(text: str) -> str:
    """`text` with each control or format character shown as U+FFFD.

    A model name is whatever a client put in its JSON body (a refused one is
    still counted in the usage) or a backend listed, so it may hold an escape
    sequence that a terminal would obey (retitle the window, move the cursor,
    hide what follows). User ids are checked at the door; names are not.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else "\ufffd" for c in text)
