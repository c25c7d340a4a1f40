"""What the master holds for one worker process, owned in one place and released in one.

A :class:`Supervision` owns the worker's ``Popen``, its IPC :class:`Channel`, its pidfd
(how the loop learns of its exit), the SIGKILL deadline of a leaving worker, the readers
of its output pipes, and its requests that wait for a reply. :meth:`Supervision.release`
undoes all of it, once, when the worker has exited.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._acts import Pending
from ._output import OutputReader

if TYPE_CHECKING:
    import asyncio

    from ._channel import Channel

__all__ = ["Supervision"]


class Supervision:
    """The master's hold on one worker process (see the module docstring)."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        channel: Channel,
        outputs: list[OutputReader],
    ) -> None:
        self.process = process
        self.channel = channel
        self.outputs = outputs
        self.pending = Pending()
        #: Whether the master's loop watches this worker (its ``fork`` event fired).
        self.attached = False
        self._pidfd: int | None
        try:
            self._pidfd = os.pidfd_open(process.pid)
        except (AttributeError, OSError):
            self._pidfd = None  # no pidfd here: SIGCHLD tells the loop instead
        self._deadline: asyncio.TimerHandle | None = None
        self._released = False

    @property
    def watches_exit(self) -> bool:
        """Whether a pidfd tells the loop of the exit (else the master needs SIGCHLD)."""
        return self._pidfd is not None

    def attach(self, loop: asyncio.AbstractEventLoop, on_exit: Callable[[], None]) -> None:
        """Watch the worker on *loop*: its channel, its exit, its output."""
        self.attached = True
        self.channel.attach(loop)
        if self._pidfd is not None:
            loop.add_reader(self._pidfd, on_exit)
        for output in self.outputs:
            output.attach(loop)

    def returncode(self) -> int | None:
        """The exit status if the process has exited (it is reaped then), else ``None``."""
        return self.process.poll()

    def arm_deadline(
        self, loop: asyncio.AbstractEventLoop, seconds: float, expire: Callable[[], None]
    ) -> None:
        """Call *expire* in *seconds* unless the worker exits first; once per worker."""
        if self._deadline is not None or self._released or self.returncode() is not None:
            return
        self._deadline = loop.call_later(seconds, expire)

    def release(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """The worker has exited: deliver what it wrote last, then let go of everything."""
        if self._released:
            return
        self._released = True
        if self._pidfd is not None:
            if loop is not None and not loop.is_closed():
                loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.channel.read()  # whatever it wrote before dying is delivered before exit
        self.channel.close(None)  # a grandchild may hold its end; the worker is gone anyway
        for output in self.outputs:
            output.read(final=True)

    def kill_and_wait(self, timeout: float) -> None:
        """SIGKILL the process and wait up to *timeout* s for it (the master is ending)."""
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=timeout)
