"""The worker lifecycle as one state machine."""

from __future__ import annotations

import enum

from ._errors import StateError

__all__ = ["WorkerState"]


class WorkerState(enum.Enum):
    """Where a worker is in its life, as seen by the master.

    ``NONE → ONLINE → LISTENING → DISCONNECTED → DEAD``; a worker may skip ``ONLINE`` and
    ``LISTENING`` (it died while booting) but never goes back. Inside the worker process,
    ``DISCONNECTING`` marks a disconnect in progress.
    """

    NONE = "none"
    ONLINE = "online"
    LISTENING = "listening"
    DISCONNECTING = "disconnecting"
    DISCONNECTED = "disconnected"
    DEAD = "dead"

    def to(self, new: WorkerState) -> WorkerState:
        """Return *new* if the lifecycle allows moving there from this state.

        Raises:
            StateError: the move is not allowed (for example ``dead → online``).
        """
        if new in _ALLOWED[self]:
            return new
        msg = (
            f"a worker cannot go from {self.value!r} to {new.value!r}; "
            f"from {self.value!r} it can only go to "
            f"{sorted(s.value for s in _ALLOWED[self]) or 'nothing (it is final)'}"
        )
        raise StateError(msg)


_ALLOWED: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.NONE: frozenset(
        {WorkerState.ONLINE, WorkerState.DISCONNECTING, WorkerState.DISCONNECTED}
    ),
    WorkerState.ONLINE: frozenset(
        {WorkerState.LISTENING, WorkerState.DISCONNECTING, WorkerState.DISCONNECTED}
    ),
    WorkerState.LISTENING: frozenset(
        {WorkerState.LISTENING, WorkerState.DISCONNECTING, WorkerState.DISCONNECTED}
    ),
    WorkerState.DISCONNECTING: frozenset({WorkerState.DISCONNECTED}),
    WorkerState.DISCONNECTED: frozenset({WorkerState.DEAD}),
    WorkerState.DEAD: frozenset(),
}
