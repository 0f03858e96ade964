"""Where an exchange is in its life, and the only moves it may make.

Every change of an exchange's state goes through `advance`, which checks the
move against `TRANSITIONS` and raises `IllegalTransition` otherwise (as h11's
`_state.py` does): a bug that would move a request backwards, or revive a
finished one, fails loudly at the line that tried, instead of leaking a slot
or answering twice. Everyone else reads the state; nobody assigns it.

    RECEIVING --> QUEUED --> CONNECTING --> WAITING --> STREAMING --> DONE
        |                       ^  |           |  |
        +-----------------------+  |           |  +--> CONNECTING (stale pooled
        |  (unqueued routes)       |           |       connection: reconnect)
        |                          +-----------+--> QUEUED (failed before the
        |                                           first byte: retried elsewhere)
        +--> DONE (answered by the gateway, refused, client gone) from any state
"""

from __future__ import annotations

import enum
from typing import Final


class State(enum.IntEnum):
    """Where an exchange is in its life.

    An IntEnum, so that checking a move is integer arithmetic: a plain Enum
    member hashes through a Python-level `__hash__` on every table lookup.
    """

    RECEIVING = 0  # head parsed; body being read, admission pending
    QUEUED = 1  # waiting in its user's queue (or the retry line) for a slot
    CONNECTING = 2  # has a backend; taking or opening a connection
    WAITING = 3  # request written; no response head yet
    STREAMING = 4  # response head relayed; body bytes flowing
    DONE = 5  # answered, refused, failed or abandoned: nothing more happens


TRANSITIONS: Final[dict[State, frozenset[State]]] = {
    State.RECEIVING: frozenset({State.QUEUED, State.CONNECTING, State.DONE}),
    State.QUEUED: frozenset({State.CONNECTING, State.DONE}),
    State.CONNECTING: frozenset({State.WAITING, State.QUEUED, State.DONE}),
    State.WAITING: frozenset({State.STREAMING, State.CONNECTING, State.QUEUED, State.DONE}),
    State.STREAMING: frozenset({State.DONE}),
    State.DONE: frozenset(),
}

# The table as one bit mask per state (bit n: State(n) may follow), for `advance`.
ALLOWED: Final[tuple[int, ...]] = tuple(
    sum(1 << target for target in TRANSITIONS[State(n)]) for n in range(len(State)))


class IllegalTransition(Exception):
    """A move the table does not allow: a bug in the gateway, never the client's doing.

    (An Exception, not a RuntimeError: mypyc compiles subclasses of only a few
    built-in exceptions.)
    """

    def __init__(self, current: State, target: State) -> None:
        super().__init__(f"exchange cannot move from {current.name} to {target.name}")
        self.current = current
        self.target = target


def allowed(current: int, target: int) -> bool:
    """Whether the table allows the move from `current` to `target`.

    Typed `int`, not State: compiled, a State argument is read as the native
    integer it is, and the look-up and shift are machine operations; with
    State operands they are generic calls (about 150 instructions a move).
    """
    return (ALLOWED[current] >> target) & 1 == 1


def advance(current: State, target: State) -> State:
    """`target` if the move from `current` is allowed; IllegalTransition otherwise."""
    if not allowed(current, target):
        raise IllegalTransition(current, target)
    return target
