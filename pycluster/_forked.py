"""A worker forked by a template and adopted by the master: the little of
``subprocess.Popen`` that :class:`~pycluster._supervise.Supervision` uses, for a process
the master did not start itself (it is the master's child because the master is a child
subreaper while it has a fork server)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import time
from typing import IO

from ._errors import PyclusterError

__all__ = ["PR_GET_CHILD_SUBREAPER", "PR_SET_CHILD_SUBREAPER", "ForkServerError",
           "ForkedProcess", "prctl"]

PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37


class ForkServerError(PyclusterError, OSError):
    """The fork server could not start a worker (its template died, or fork failed)."""


class ForkedProcess:
    """A worker forked by a template and adopted by the master: ``pid``, ``poll()``,
    ``wait()``, ``send_signal()``, ``terminate()``, ``kill()``, ``returncode`` and, with
    ``silent=True``, ``stdout``/``stderr`` — what a ``subprocess.Popen`` offers for it."""

    def __init__(self, pid: int, stdout: IO[bytes] | None, stderr: IO[bytes] | None) -> None:
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None

    def __repr__(self) -> str:
        return f"<ForkedProcess pid={self.pid} returncode={self.returncode}>"

    def poll(self) -> int | None:
        """The exit status (``-N`` for signal N) if it has exited (then reaped), else None."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # not ours after all: nothing can tell its status
                self.returncode = -signal.SIGKILL if _gone(self.pid) else None
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit and return its status.

        Raises:
            subprocess.TimeoutExpired: still alive after *timeout* seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            pidfd: int | None = os.pidfd_open(self.pid)
        except OSError:
            pidfd = None
        try:
            while (code := self.poll()) is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
                if pidfd is not None:
                    select.select([pidfd], [], [], left)
                else:  # gone already (reaped by someone): poll() says so next
                    time.sleep(0.001)
            return code
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def send_signal(self, sig: int) -> None:
        """Send *sig*, unless the process has been reaped (its pid may be reused)."""
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def prctl(option: int, value: int = 0) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if option == PR_GET_CHILD_SUBREAPER:
        out = ctypes.c_int(0)
        if libc.prctl(option, ctypes.byref(out), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_GET_CHILD_SUBREAPER)")
        return out.value
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    return 0
