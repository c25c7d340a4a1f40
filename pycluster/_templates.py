"""The master's handle on one template process of ``start_method="forkserver"``.

A :class:`Template` is a fresh interpreter the master starts (``pycluster._template``)
that imports the app once and forks workers on request over its control socket.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._emitter import logger
from ._forked import ForkServerError
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
