"""The worker lifecycle state machine, move by move: ``WorkerState.to()`` allows exactly
the moves of the lifecycle and refuses every other one with a StateError naming both
states."""

from __future__ import annotations

import itertools

import pytest

import pycluster
from pycluster import WorkerState as S

#: The lifecycle, written out here as the spec: none → online → listening →
#: (disconnecting →) disconnected → dead; a worker may skip online and listening (it died
#: booting), a listening worker may listen again, and nothing goes back.
ALLOWED = {
    S.NONE: {S.ONLINE, S.DISCONNECTING, S.DISCONNECTED},
    S.ONLINE: {S.LISTENING, S.DISCONNECTING, S.DISCONNECTED},
    S.LISTENING: {S.LISTENING, S.DISCONNECTING, S.DISCONNECTED},
    S.DISCONNECTING: {S.DISCONNECTED},
    S.DISCONNECTED: {S.DEAD},
    S.DEAD: set(),
}
PAIRS = list(itertools.product(S, S))


def test_the_table_names_every_state():
    """The spec above covers every member of WorkerState (a new state needs a row)."""
    assert set(ALLOWED) == set(S)


@pytest.mark.parametrize(("old", "new"), [(o, n) for o, n in PAIRS if n in ALLOWED[o]],
                         ids=lambda s: s.value)
def test_an_allowed_move_returns_the_new_state(old, new):
    """Each move the lifecycle allows returns the state moved to."""
    assert old.to(new) is new


@pytest.mark.parametrize(("old", "new"), [(o, n) for o, n in PAIRS if n not in ALLOWED[o]],
                         ids=lambda s: s.value)
def test_a_disallowed_move_is_a_state_error_naming_both_states(old, new):
    """Every other move raises StateError (also a RuntimeError) whose message names the
    state moved from and the state asked for, and lists where the worker can go."""
    with pytest.raises(pycluster.StateError,
                       match=f"a worker cannot go from {old.value!r} to {new.value!r}; "
                             f"from {old.value!r} it can only go to ") as info:
        old.to(new)
    assert isinstance(info.value, RuntimeError)
    for allowed in ALLOWED[old]:
        assert repr(allowed.value) in str(info.value)


@pytest.mark.parametrize("new", list(S), ids=lambda s: s.value)
def test_dead_is_final(new):
    """From DEAD no move is allowed, not even to DEAD; the message says it is final."""
    with pytest.raises(pycluster.StateError, match=r"it can only go to nothing \(it is final\)"):
        S.DEAD.to(new)
