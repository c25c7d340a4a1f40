"""What a served app's worker does when the master lets it go before it listens."""

from __future__ import annotations

import pytest

import pycluster
from pycluster._apps import listen_or_leave


class FakeWorker:
    """A worker whose listen() fails as pycluster.worker.listen() does."""

    def __init__(self, error: Exception, connected: bool) -> None:
        self.error = error
        self.connected = connected

    def listen(self) -> object:
        raise self.error

    def is_connected(self) -> bool:
        return self.connected


@pytest.mark.parametrize("error", [pycluster.StateError("worker 7 is disconnecting"),
                                   pycluster.ChannelClosedError("the channel closed")])
def test_a_worker_disconnected_before_it_listens_serves_nothing(error):
    """listen() failing because the worker was disconnected while it started (the master
    stops or replaces it) gives None: the server returns 0 instead of a traceback."""
    assert listen_or_leave(FakeWorker(error, connected=False)) is None


def test_a_listen_failure_of_a_connected_worker_is_raised():
    """The same errors while the worker is still connected are real errors: raised."""
    with pytest.raises(pycluster.StateError):
        listen_or_leave(FakeWorker(pycluster.StateError("no answer"), connected=True))
    with pytest.raises(OSError, match="in use"):
        listen_or_leave(FakeWorker(OSError(98, "Address already in use"), connected=False))


def test_a_listening_worker_gets_its_socket():
    """The usual case: the socket listen() returns."""

    class Listening(FakeWorker):
        def listen(self) -> object:
            return "socket"

    assert listen_or_leave(Listening(RuntimeError(), connected=True)) == "socket"
