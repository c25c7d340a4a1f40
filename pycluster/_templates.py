"""The master's handle on one template process of ``start_method="forkserver"``.

A :class:`Template` is a fresh interpreter the master starts (``pycluster._template``)
that imports the app once and forks workers on request over its control socket.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import socket
import subprocess
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._emitter import logger
from ._forked import ForkServerError
from ._protocol import recv_fds
from ._spawn import ENV_PREFIX, main_command, popen_options

if TYPE_CHECKING:
    import asyncio

    from ._settings import Settings

__all__ = ["Template"]

log = logger()

_REPLY_LIMIT = 1024 * 1024


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
        #: Its spares (workers forked ahead: the master's children, see _spare.py) by pid,
        #: each with a pidfd and the socket it reads its request from.
        self._offered: dict[int, tuple[int, socket.socket]] = {}
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
        pid = self._to_spare(request, fds)
        if pid is not None:
            return pid
        try:
            socket.send_fds(self._ctl, [request], fds)
            reply = self._next()
        except OSError as exc:
            msg = f"the fork server's template (pid {self.pid}) is gone: {exc}"
            raise ForkServerError(msg) from None
        if reply is None:
            msg = f"the fork server's template (pid {self.pid}) died"
            raise ForkServerError(msg)
        if "pid" not in reply:
            raise ForkServerError(str(reply.get("error")))
        return int(reply["pid"])

    def _to_spare(self, request: bytes, fds: list[int]) -> int | None:
        """Give *request* to a spare the template offered, if there is one that takes
        it; return its pid (and ask the template for the next spare)."""
        with contextlib.suppress(OSError):
            self._next(block=False)  # the offers that came meanwhile
        while self._offered:
            pid, (pidfd, sock) = self._offered.popitem()
            try:
                socket.send_fds(sock, [request], fds)
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE:  # too big for a packet: no spare takes it
                    self._offered[pid] = (pidfd, sock)
                    return None
                _let_go(pidfd, sock)  # it died
                self._used(pid)
                continue
            sock.close()
            os.close(pidfd)  # a worker now: a ForkedProcess watches it
            self._used(pid)
            return pid
        return None

    def _used(self, pid: int) -> None:
        """Tell the template its spare *pid* is gone (used or dead): it forks the next."""
        with contextlib.suppress(OSError):
            self._ctl.send(b'{"used": %d}' % pid, socket.MSG_DONTWAIT)

    def _next(self, *, block: bool = True) -> dict[str, Any] | None:
        """The template's next answer, taking the spares it offers on the way; ``None``
        at EOF (or, not blocking, when nothing more is there)."""
        while True:
            try:
                data, fds = recv_fds(self._ctl, _REPLY_LIMIT, 2,
                                     0 if block else socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return None
            if not data:
                for fd in fds:
                    os.close(fd)
                return None
            reply = json.loads(data)
            if "spare" not in reply:
                for fd in fds:
                    os.close(fd)
                return dict(reply)
            pid = int(reply["spare"])
            if len(fds) == 2:  # its socket and a pidfd
                self._offered[pid] = (fds[1], socket.socket(fileno=fds[0]))
            else:  # the fds did not come through (out of fds?): let it be
                for fd in fds:
                    os.close(fd)
                self._used(pid)

    def _let_spares_go(self) -> None:
        """Kill and reap the spares it offered (it is retiring, or has exited)."""
        with contextlib.suppress(OSError):
            while self._next(block=False) is not None:
                pass
        for pidfd, sock in self._offered.values():
            _let_go(pidfd, sock)
        self._offered.clear()

    def retire(self) -> None:
        """Close its control socket: it exits (the master reaps it when it has)."""
        self._stop_reading()
        if self.status not in ("dead", "retired"):
            self.status = "retired"
        self._let_spares_go()
        with contextlib.suppress(OSError):  # its EOF; the master still reads what it said
            self._ctl.shutdown(socket.SHUT_WR)

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
        self._let_spares_go()
        self._ctl.close()

    def kill_and_wait(self, timeout: float) -> None:
        """SIGKILL it and wait up to *timeout* s (the master is ending)."""
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=timeout)


def _let_go(pidfd: int, sock: socket.socket) -> None:
    """Kill and reap a spare that will not be used (it is the master's child)."""
    sock.close()
    with contextlib.suppress(OSError):  # reaped already (the reaper plugin)
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
    os.close(pidfd)
