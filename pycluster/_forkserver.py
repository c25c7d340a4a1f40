"""The master's side of ``start_method="forkserver"``: templates, and workers forked from them.

A :class:`Template` is one template process (``pycluster._template``): a fresh interpreter
the master starts, which imports the app once and then forks workers on request. The
master itself keeps no app code. :class:`ForkServer` keeps the current template, replaces
one that dies, starts a new one for a reload (a template whose import fails makes the
reload fail; the old workers keep serving), and retires the old one afterwards.

Workers are forked twice by the template so that they are reparented to the master, which
is a ``PR_SET_CHILD_SUBREAPER`` while it has a fork server: the master reaps a forked
worker and watches it with a pidfd exactly as it does a spawned one (:class:`ForkedProcess`
is the little of ``subprocess.Popen`` that :class:`~pycluster._supervise.Supervision`
uses), and the worker re-arms ``PR_SET_PDEATHSIG`` against the master once adopted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._emitter import logger
from ._forked import (
    PR_GET_CHILD_SUBREAPER,
    PR_SET_CHILD_SUBREAPER,
    ForkedProcess,
    ForkServerError,
    prctl,
)
from ._templates import Template

if TYPE_CHECKING:
    import asyncio

    from ._master import Master
    from ._settings import Settings

__all__ = ["ForkServer", "ForkServerError", "ForkedProcess", "Template"]

log = logger()


class ForkServer:
    """The master's fork server: the current template, its replacement, the old ones.

    *on_reload* emits the master's ``reload`` event (a new template is ready: the reload
    plugin forks the replacements from it); *on_reload_failed(reason)* reports a new
    template that could not load the app.
    """

    def __init__(
        self,
        settings: Settings,
        on_reload: Callable[[], None],
        on_reload_failed: Callable[[str], None],
    ) -> None:
        if not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open") or not hasattr(
                os, "P_PIDFD"):
            msg = ("start_method='forkserver' needs Linux (PR_SET_CHILD_SUBREAPER, pidfd_open, "
                   "waitid(P_PIDFD))")
            raise ForkServerError(msg)
        self._settings = settings
        self._on_reload = on_reload
        self._on_reload_failed = on_reload_failed
        self.current: Template | None = None
        self._previous: Template | None = None  # retired once the reload round is over
        self._next: Template | None = None  # starting for a reload
        self._again = False
        self._templates: list[Template] = []  # every one not yet reaped
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._count = 0
        self._subreaper_was: int | None = None

    @classmethod
    def for_master(cls, master: Master) -> ForkServer:
        """The fork server of *master*: a reload first imports the new code in a new
        template, then emits ``reload`` on the master (or ``reload_failed(reason)`` if
        the new code does not import, touching no worker)."""

        def reload_now() -> None:
            if not master.stopping:
                master.emit("reload")

        def reload_failed(reason: str) -> None:
            reason = f"the new code does not load in the fork server's template: {reason.strip()}"
            log.error("reload failed: %s; keeping the old workers", reason)
            master.emit("reload_failed", reason)

        server = cls(master.settings, reload_now, reload_failed)
        master.on("reloaded", server.reload_over)
        master.on("reload_failed", lambda reason: server.reload_over())
        return server

    # -- templates ----------------------------------------------------------------

    def _start(self) -> Template:
        if self._subreaper_was is None:
            self._subreaper_was = prctl(PR_GET_CHILD_SUBREAPER)
            prctl(PR_SET_CHILD_SUBREAPER, 1)
        self._count += 1
        template = Template(self._settings, self._count)
        self._templates.append(template)
        if self._loop is not None:
            self._watch_exit(template)
        return template

    def _watch_exit(self, template: Template) -> None:
        loop = self._loop
        assert loop is not None
        if template.pidfd is not None:
            loop.add_reader(template.pidfd, self._exited, template)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch the templates on *loop* (the master runs now)."""
        self._loop = loop
        for template in list(self._templates):
            self._watch_exit(template)
            self._exited(template)  # it may have died before the loop ran

    def _exited(self, template: Template) -> None:
        if not template.reaped():
            return
        if template.status == "starting":
            template.wait_ready()  # reads the EOF and says why (a reload reports it failed)
        usable_before = template.status not in ("starting", "dead")
        template.release(self._loop)
        self._templates.remove(template)
        if template is not self.current or self._closed or not usable_before:
            return  # one that never got ready is started again only by the next fork()
        code = template.process.returncode
        how = f"exit code {code}" if code is not None and code >= 0 else (
            f"signal {signal.Signals(-code).name}" if code else "?")
        log.warning("the fork server's template (pid %d) died (%s); starting a new one",
                    template.pid, how)
        template.status = "dead"
        self.current = self._start()
        if self._loop is not None:
            self.current.watch(self._loop, lambda t: None)

    # -- forking -----------------------------------------------------------------

    def fork(self, env: dict[str, str], silent: bool) -> tuple[ForkedProcess, socket.socket]:
        """Fork a worker with the whole environment *env* from the current template
        (starting one first if there is none); return it and the master's end of its
        IPC socketpair.

        Raises:
            ForkServerError: the template died before it was ready, or could not fork.
        """
        if self.current is None or self.current.status in ("dead", "retired"):
            self.current = self._start()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pipes: list[tuple[int, int]] = []
        try:
            if silent:
                pipes = [os.pipe(), os.pipe()]
            fds = [theirs.fileno(), *(w for _, w in pipes)]
            try:
                pid = self.current.fork(env, fds)
            except ForkServerError:
                if self.current.status in ("starting", "dead"):
                    raise  # it never got ready: a new one would fail the same way
                # it died since it was ready (killed?): one more try with a new one
                self.current.retire()
                self.current = self._start()
                if self._loop is not None:
                    self.current.watch(self._loop, lambda t: None)
                pid = self.current.fork(env, fds)
        except BaseException:
            mine.close()
            for r, _ in pipes:
                os.close(r)
            raise
        finally:
            theirs.close()
            for _, w in pipes:
                os.close(w)
        if pipes:
            out, err = (os.fdopen(r, "rb", buffering=0) for r, _ in pipes)
            return ForkedProcess(pid, out, err), mine
        return ForkedProcess(pid, None, None), mine

    # -- reload ------------------------------------------------------------------

    def reload(self) -> None:
        """Start a new template; once it has imported the (new) code, make it current and
        call *on_reload*; if it cannot, retire it and call *on_reload_failed*."""
        if self._next is not None:
            self._again = True  # the template starting now may predate the change
            return
        assert self._loop is not None
        self._next = self._start()
        self._next.watch(self._loop, self._next_hello)

    def _next_hello(self, template: Template) -> None:
        if template is not self._next:
            return
        self._next = None
        if self._closed:
            template.retire()
            return
        if template.status != "ready":
            template.retire()
            reason = template.reason or "the new template could not load the app"
            self._again = False
            self._on_reload_failed(reason)
            return
        if self._again:  # asked again while it imported: load once more
            self._again = False
            template.retire()
            self.reload()
            return
        if self._previous is not None:
            self._previous.retire()
        self._previous, self.current = self.current, template
        self._on_reload()

    def reload_over(self) -> None:
        """The reload round ended (well or not): retire the template it replaced."""
        if self._previous is not None and self._next is None:
            self._previous.retire()
            self._previous = None

    # -- the end -----------------------------------------------------------------

    def close(self) -> None:
        """The master is ending: retire every template, kill any that lingers, and stop
        being a subreaper if the master was not one before."""
        self._closed = True
        for template in list(self._templates):
            template.retire()
        for template in list(self._templates):
            with contextlib.suppress(subprocess.TimeoutExpired):
                template.process.wait(timeout=1)
            template.kill_and_wait(5)
            template.release(self._loop)
        self._templates.clear()
        self.current = self._previous = self._next = None
        if self._subreaper_was == 0:
            with contextlib.suppress(OSError):
                prctl(PR_SET_CHILD_SUBREAPER, 0)
            self._subreaper_was = None

    def pids(self) -> list[int]:
        """The pids of the templates alive."""
        return [t.pid for t in self._templates]

    def describe(self) -> dict[str, Any]:
        """What the fork server runs (for status output)."""
        current = self.current
        return {"template": current.pid if current else None,
                "status": current.status if current else None}
