"""``reaper``: reap the processes a master adopts (as PID 1, or as a child subreaper)."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import signal
import threading
from typing import Any

from pycluster import Master, SettingsError, Timer

__all__ = ["Reaper", "set_child_subreaper"]

log = logging.getLogger("pycluster.reaper")

_PR_SET_CHILD_SUBREAPER = 36


def set_child_subreaper() -> bool:
    """Make this process the reaper of its descendants' orphans
    (``prctl(PR_SET_CHILD_SUBREAPER)``, Linux ≥ 3.4); return whether it worked."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _children() -> list[int]:
    """This process's children (every thread's ``/proc/self/task/*/children``)."""
    found: list[int] = []
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return found
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                found.extend(int(p) for p in f.read().split())
        except (OSError, ValueError):
            continue
    return found


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2][1:2] == b"Z"
    except OSError:
        return False


class Reaper:
    """Reap orphaned processes the master inherits, so none stays a zombie.

    As PID 1 of a container (``docker run`` without ``--init``) every orphan of the
    container is reparented to the master; as a child subreaper (*subreaper*, Linux's
    ``PR_SET_CHILD_SUBREAPER``) the orphans of its workers' children are. Either way
    their exits must be collected by the master, or they stay zombies. The reaper does
    it on every ``SIGCHLD`` and every *interval* seconds, for the children of the master
    that are not its workers (those are reaped, with their exit status, by the master
    itself: the reaper never calls ``waitpid(-1)``). Signals still reach the master as
    PID 1: it handles SIGTERM, SIGINT, SIGQUIT and SIGHUP itself.

    Caution: a child the master starts in some other way (``subprocess`` in a plugin)
    is reaped too once it exits, unless its owner waited for it first.

    ``pycluster run`` installs it; so does :meth:`Master.run` when the master is PID 1.

    Args:
        subreaper: become a child subreaper (no effect needed as PID 1).
        interval: seconds between sweeps besides those ``SIGCHLD`` starts (signals
            coalesce, and ``SIGCHLD`` is not ours to take when something else handles it).
    """

    name = "reaper"

    def __init__(self, *, subreaper: bool = True, interval: float = 1.0) -> None:
        if not isinstance(subreaper, bool):
            msg = f"reaper subreaper={subreaper!r} must be True or False"
            raise SettingsError(msg)
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not (
            0 < interval < float("inf")
        ):
            msg = f"reaper interval={interval!r} must be a number of seconds > 0"
            raise SettingsError(msg)
        self.subreaper = subreaper
        self.interval = float(interval)
        #: Orphans reaped so far.
        self.reaped = 0
        self._master: Master | None = None
        self._timer: Timer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, master: Master) -> None:
        """Become a subreaper (if asked and not PID 1) and sweep while *master* runs."""
        self._master = master
        if self.subreaper and os.getpid() != 1 and not set_child_subreaper():
            log.warning("could not become a child subreaper; orphans go to init as before")
        self._timer = master.call_every(self.interval, self.sweep)
        master.on("setup", self._on_setup)

    def uninstall(self, master: Master) -> None:
        """Stop sweeping (the process stays a subreaper)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._unhook()

    def _on_setup(self, settings: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        if signal.getsignal(signal.SIGCHLD) not in (signal.SIG_DFL, signal.SIG_IGN, None):
            return  # someone else's handler (the master's fallback without pidfd): poll
        loop.add_signal_handler(signal.SIGCHLD, self._soon)
        self._loop = loop  # the handler goes when the loop closes

    def _soon(self) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon(self.sweep)

    def _unhook(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            loop.remove_signal_handler(signal.SIGCHLD)

    def sweep(self) -> int:
        """Reap every exited child of the master that is not one of its workers; return
        how many."""
        master = self._master
        if master is None:
            return 0
        workers = {w.pid for w in master.workers.values()}
        count = 0
        for pid in _children():
            if pid in workers or not _is_zombie(pid):
                continue
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if done:
                count += 1
        if count:
            self.reaped += count
            log.debug("reaped %d orphaned process(es)", count)
        return count
