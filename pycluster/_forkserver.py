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
import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from ._emitter import logger
from ._errors import PyclusterError
from ._spawn import ENV_PREFIX, main_command, popen_options

if TYPE_CHECKING:
    import asyncio

    from ._settings import Settings

__all__ = ["ForkServer", "ForkServerError", "ForkedProcess", "Template"]

log = logger()

_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37
_REPLY_LIMIT = 1024 * 1024


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


def _prctl(option: int, value: int = 0) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if option == _PR_GET_CHILD_SUBREAPER:
        out = ctypes.c_int(0)
        if libc.prctl(option, ctypes.byref(out), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_GET_CHILD_SUBREAPER)")
        return out.value
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    return 0


class Template:
    """One template process, seen from the master (see the module docstring).

    ``status`` is ``"starting"`` (importing the app), ``"ready"``, ``"failed"`` (the import
    failed or left a thread running: ``reason`` says how; it still forks, and each worker
    fails to boot with that text), ``"dead"`` or ``"retired"``.
    """

    def __init__(self, settings: Settings, number: int) -> None:
        self.number = number
        self.status = "starting"
        self.reason: str | None = None
        self._on_hello: Callable[[Template], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        env.update(settings.env)
        env["PYCLUSTER_TEMPLATE_FD"] = str(theirs.fileno())
        env["PYCLUSTER_MASTER_PID"] = str(os.getpid())
        if settings.name:
            env["PYCLUSTER_NAME"] = settings.name
        command = main_command(settings)
        at = command.index("pycluster._boot")
        command[at] = "pycluster._template"
        try:
            self.process = subprocess.Popen(
                command, env=env, cwd=settings.cwd, stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),), **popen_options(settings),  # type: ignore[call-overload]
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self._ctl = mine
        self.pid: int = self.process.pid
        self.pidfd: int | None
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except OSError:
            self.pidfd = None

    def __repr__(self) -> str:
        return f"<Template #{self.number} pid={self.pid} {self.status}>"

    @property
    def usable(self) -> bool:
        """Whether it forks workers (ready or failed)."""
        return self.status in ("ready", "failed")

    def watch(self, loop: asyncio.AbstractEventLoop, on_hello: Callable[[Template], None]
              ) -> None:
        """Read its first word (ready or failed) on *loop*, then call *on_hello*."""
        self._loop, self._on_hello = loop, on_hello
        if self.status == "starting" and not self._reading:
            self._reading = True
            loop.add_reader(self._ctl.fileno(), self._read_hello)
        elif self.status != "starting":
            loop.call_soon(on_hello, self)

    def _stop_reading(self) -> None:
        if self._reading and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._ctl.fileno())
        self._reading = False

    def _read_hello(self) -> None:
        self._stop_reading()
        self._hello(block=False)
        if self.status == "starting":  # a spurious wake-up: read again
            if self._loop is not None:
                self._reading = True
                self._loop.add_reader(self._ctl.fileno(), self._read_hello)
            return
        if self._on_hello is not None:
            self._on_hello(self)

    def wait_ready(self) -> None:
        """Block until it has imported the app (or failed to, or died)."""
        if self.status != "starting":
            return
        self._stop_reading()
        self._hello(block=True)
        if self._on_hello is not None:
            self._on_hello(self)

    def _hello(self, *, block: bool) -> None:
        if block:
            select.select([self._ctl], [], [])
        try:
            data = self._ctl.recv(_REPLY_LIMIT, 0 if block else socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._died_early()
            return
        hello = json.loads(data)
        if hello.get("ready"):
            self.status = "ready"
        else:
            self.status, self.reason = "failed", str(hello.get("failed"))

    def _died_early(self) -> None:
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        how = f"exit code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        self.status = "dead"
        self.reason = (f"the fork server's template (pid {self.pid}) died ({how}) "
                       "before it was ready")

    def fork(self, env: dict[str, str], fds: list[int]) -> int:
        """Ask for a worker with *env*, its IPC socket and output pipes *fds*; its pid.

        Raises:
            ForkServerError: the template is gone or could not fork.
        """
        self.wait_ready()
        if not self.usable:
            raise ForkServerError(self.reason or f"the fork server's template is {self.status}")
        request = json.dumps({"env": env}).encode()
        try:
            socket.send_fds(self._ctl, [request], fds)
            data = self._ctl.recv(_REPLY_LIMIT)
        except OSError as exc:
            msg = f"the fork server's template (pid {self.pid}) is gone: {exc}"
            raise ForkServerError(msg) from None
        if not data:
            msg = f"the fork server's template (pid {self.pid}) died"
            raise ForkServerError(msg)
        reply = json.loads(data)
        if "pid" not in reply:
            raise ForkServerError(str(reply.get("error")))
        return int(reply["pid"])

    def retire(self) -> None:
        """Close its control socket: it exits (the master reaps it when it has)."""
        self._stop_reading()
        if self.status not in ("dead", "retired"):
            self.status = "retired"
        self._ctl.close()

    def reaped(self) -> bool:
        """Whether it has exited (it is reaped then)."""
        return self.process.poll() is not None

    def release(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """It has exited: stop watching it."""
        self._stop_reading()
        if self.pidfd is not None:
            if loop is not None and not loop.is_closed():
                loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None
        self._ctl.close()

    def kill_and_wait(self, timeout: float) -> None:
        """SIGKILL it and wait up to *timeout* s (the master is ending)."""
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=timeout)


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
        if not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"):
            msg = "start_method='forkserver' needs Linux (PR_SET_CHILD_SUBREAPER, pidfd_open)"
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

    # -- templates ----------------------------------------------------------------

    def _start(self) -> Template:
        if self._subreaper_was is None:
            self._subreaper_was = _prctl(_PR_GET_CHILD_SUBREAPER)
            _prctl(_PR_SET_CHILD_SUBREAPER, 1)
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
                _prctl(_PR_SET_CHILD_SUBREAPER, 0)
            self._subreaper_was = None

    def pids(self) -> list[int]:
        """The pids of the templates alive."""
        return [t.pid for t in self._templates]

    def describe(self) -> dict[str, Any]:
        """What the fork server runs (for status output)."""
        current = self.current
        return {"template": current.pid if current else None,
                "status": current.status if current else None}
