"""How a fork server's template forks workers: twice, so that the master adopts them, and
ahead of time, so that a new worker costs no fork at all.

A worker is forked by a middle process that exits at once, so the worker is reparented to
the nearest subreaper: the master. The worker waits until that has happened (the middle's
pidfd turns readable only once its children have been handed over), so its parent is the
master when it arms ``PR_SET_PDEATHSIG`` and checks its parent's pid.

A :class:`Spare` is such a worker forked before anyone asked for it. The template gives
the master its pid and the other end of the socket it waits on: the master sends a new
worker's request (environment and fds) straight to it, so no process forks on the way to
a new worker, and the template is not involved. The master closing that socket (it retires
the template, or ends) makes the spare exit. While it waits it rehearses what a new worker
runs (:func:`rehearse`).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import sys
import threading
from typing import Any

__all__ = ["Adoption", "Spare", "double_fork", "fork_adopted", "rehearse", "take_env"]


class Adoption:
    """A double fork under way, seen from the template: readable (``select``) once the
    middle process has told the worker's pid and exited."""

    def __init__(self, middle: int, report: int) -> None:
        self.middle = middle
        self._report = report

    def fileno(self) -> int:
        return self._report

    def finish(self) -> int:
        """Wait for the middle process; return the worker's pid (the master's child now).

        Raises:
            OSError: the middle process could not fork.
        """
        try:
            chunks = []
            while chunk := os.read(self._report, 32):
                chunks.append(chunk)
            os.waitpid(self.middle, 0)
        finally:
            self.close()
        if not chunks:
            msg = "the fork server could not fork a worker (fork failed in its middle process)"
            raise OSError(msg)
        return int(b"".join(chunks))

    def close(self) -> None:
        if self._report >= 0:
            os.close(self._report)
            self._report = -1


def fork_adopted() -> Adoption | None:
    """Start forking a worker that the master adopts. Return the :class:`Adoption` here;
    return ``None`` in the worker, once it is the master's child."""
    report_r, report_w = os.pipe()
    try:
        middle = os.fork()
    except BaseException:
        os.close(report_r)
        os.close(report_w)
        raise
    if middle == 0:
        code = 1
        try:
            os.close(report_r)
            me = os.getpid()
            pid = os.fork()
            if pid == 0:
                middle_fd = _pidfd(me)  # before the template can read EOF and reap it
                os.close(report_w)
                _until_gone(middle_fd)
                return None
            os.write(report_w, b"%d" % pid)
            code = 0
        except BaseException:  # noqa: BLE001, S110 - the template sees no pid: an error
            pass
        os._exit(code)
    os.close(report_w)
    return Adoption(middle, report_r)


def double_fork() -> int:
    """Fork a worker the master adopts; return its pid here, 0 in it.

    Raises:
        OSError: either fork failed.
    """
    adoption = fork_adopted()
    return 0 if adoption is None else adoption.finish()


def _pidfd(pid: int) -> int | None:
    """A pidfd of *pid*, or ``None`` if it has exited and been reaped already."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def _until_gone(pidfd: int | None) -> None:
    """Wait until the process of *pidfd* (this one's parent, the middle one) has exited."""
    if pidfd is None:
        return
    try:
        select.select([pidfd], [], [])
    finally:
        os.close(pidfd)


class Spare:
    """A worker forked ahead, seen from the template while the master adopts it; then
    :meth:`offer` gives the master its pid and the socket it waits on."""

    def __init__(self, adoption: Adoption, sock: socket.socket) -> None:
        self.adoption = adoption
        self.sock = sock

    def offer(self, ctl: socket.socket) -> None:
        """Finish its adoption and send the master ``{"spare": pid}`` with the socket the
        spare reads its request from and a pidfd of it; let go of it here.

        Raises:
            OSError: the middle process could not fork, or the master is gone.
        """
        try:
            pid = self.adoption.finish()
            pidfd = os.pidfd_open(pid)  # here, while it cannot have been reaped: no pid reuse
            try:
                notice = json.dumps({"spare": pid}).encode()
                socket.send_fds(ctl, [notice], [self.sock.fileno(), pidfd])
            finally:
                os.close(pidfd)
        finally:
            self.close()

    def close(self) -> None:
        """Let go of it. (In a worker forked while the spare was being adopted, this
        closes the copies it inherited.)"""
        self.adoption.close()
        self.sock.close()


def take_env(env: dict[str, str]) -> None:
    """Make ``os.environ`` *env*, setting only the variables that differ (a worker's
    environment is mostly the template's)."""
    for key in [key for key in os.environ if key not in env]:
        del os.environ[key]
    for key, value in env.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def rehearse() -> None:
    """In a spare: run once what a new worker runs on its way to listening (start a
    thread; make an event loop if the app uses asyncio), so that the shared pages this
    writes are copied now, while it waits, and not after its request came: each
    copy-on-write fault costs microseconds. The worker would write those pages anyway,
    so the memory it shares with the template is the same."""
    with contextlib.suppress(Exception):  # a rehearsal that fails costs only time
        thread = threading.Thread(target=int, name="pycluster-rehearsal")
        thread.start()
        thread.join()
        asyncio: Any = sys.modules.get("asyncio")
        if asyncio is not None:
            asyncio.new_event_loop().close()
