"""The exchange's state table (proxy/state.py): every move, allowed or not, without I/O."""

from __future__ import annotations

import itertools

import pytest

from ollamamq_fast.proxy.state import TRANSITIONS, IllegalTransition, State, advance

S = State
ALLOWED = {
    (S.RECEIVING, S.QUEUED), (S.RECEIVING, S.CONNECTING), (S.RECEIVING, S.DONE),
    (S.QUEUED, S.CONNECTING), (S.QUEUED, S.DONE),
    (S.CONNECTING, S.WAITING), (S.CONNECTING, S.QUEUED), (S.CONNECTING, S.DONE),
    (S.WAITING, S.STREAMING), (S.WAITING, S.CONNECTING), (S.WAITING, S.QUEUED),
    (S.WAITING, S.DONE),
    (S.STREAMING, S.DONE),
}


@pytest.mark.parametrize(("current", "target"), sorted(
    itertools.product(State, State), key=lambda p: (p[0].value, p[1].value)))
def test_every_move_is_allowed_or_refused_as_the_table_says(current: State, target: State) -> None:
    if (current, target) in ALLOWED:
        assert advance(current, target) is target
    else:
        with pytest.raises(IllegalTransition) as info:
            advance(current, target)
        assert current.name in str(info.value) and target.name in str(info.value)


def test_the_table_has_every_state_and_nothing_leaves_done() -> None:
    assert set(TRANSITIONS) == set(State)
    assert not TRANSITIONS[State.DONE]
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == ALLOWED


def test_nothing_moves_backwards_to_receiving_or_out_of_streaming() -> None:
    assert all(State.RECEIVING not in targets for targets in TRANSITIONS.values())
    assert TRANSITIONS[State.STREAMING] == {State.DONE}
