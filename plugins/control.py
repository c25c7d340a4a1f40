"""``control``: operate a running cluster from another shell, over a unix socket.

The master serves one socket per cluster, ``RUNTIME/NAME.sock``, where RUNTIME is
``$XDG_RUNTIME_DIR/pycluster`` (else ``/tmp/pycluster-UID``), a directory of this user
with mode 0700, and the socket has mode 0600. Only this user or root may talk to it
(checked with ``SO_PEERCRED``). A request is one JSON object on one line,
``{"verb": "status"}``; the answer is one line, ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "why"}``. ``pycluster status|reload|scale|stop|list`` are the
client; :func:`call`, :func:`find` and :func:`clusters` are the same from Python.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pycluster import PyclusterError, SettingsError, StateError

from ._proc import cpu_seconds as _cpu_seconds
from .control_client import (
    _CREDS,
    MAX_LINE,
    ControlError,
    _is_pycluster_master,
    _unlink_if_same,
    call,
    check_name,
    clusters,
    find,
    probe,
    runtime_dir,
    socket_path,
)
from .control_verbs import Verbs
from .guard_hooks import STATUS

if TYPE_CHECKING:  # the client side (pycluster status) does without asyncio and the master
    import asyncio

    from pycluster import Master, Timer, Worker

__all__ = [
    "MAX_LINE",
    "ControlError",
    "ControlSocket",
    "call",
    "clusters",
    "find",
    "probe",
    "runtime_dir",
    "socket_path",
]

log = logging.getLogger("pycluster.control")

# -- the master side -----------------------------------------------------------------------


class ControlSocket(Verbs):
    """Serve the cluster's control socket (on by default under ``pycluster run``).

    Installing binds the socket at once, so a second master with the same name fails
    before it forks anything: :class:`pycluster.StateError` "the name 'app' is taken by
    pid N". A socket left by a master that died is found stale and replaced. Requests
    are served on the master's loop; a malformed one (not JSON, not an object, an
    unknown verb, a line over :data:`MAX_LINE` bytes, a client too slow to finish its
    line within *idle_timeout*) gets an error answer or a closed connection, never more.

    Verbs: ``hello``, ``status``, ``reload`` (answers when the reload ends, with the
    reload plugin's ``reloaded`` or ``reload_failed`` reason), ``scale`` (``count`` or
    ``delta``), ``stop`` (``now``: immediate). ``status`` emits ``status_row(worker,
    row)`` on the master for each worker, so other plugins can add fields to its row
    (``row["requests"] = n`` fills the requests column). The requests column comes from
    the workers themselves: each answers with its ``count_request()`` count, which served
    apps keep (a worker that counted none, or does not answer within half a second,
    shows none).

    Args:
        name: the cluster's name (default: the master's ``name`` setting, else the main
            script's name).
        path: the socket's path (default: :func:`socket_path` of *name*).
        pid_file: also write the master's pid there (removed at exit); a file naming a
            live pycluster master makes installing fail.
        idle_timeout: seconds a client has to send a whole request line (and to read
            its answer) before the connection is closed.
        max_clients: connections served at once; more are closed at once.
        sample_interval: seconds between CPU samples (``status`` shows CPU% over the
            last interval).
    """

    name = "control"

    def __init__(
        self,
        *,
        name: str | None = None,
        path: str | None = None,
        pid_file: str | None = None,
        idle_timeout: float = 10.0,
        max_clients: int = 16,
        sample_interval: float = 2.0,
    ) -> None:
        if name is not None:
            check_name(name)
        for key, value in (("idle_timeout", idle_timeout), ("sample_interval", sample_interval)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                msg = f"control {key}={value!r} must be a number of seconds > 0"
                raise SettingsError(msg)
        if isinstance(max_clients, bool) or not isinstance(max_clients, int) or max_clients < 1:
            msg = f"control max_clients={max_clients!r} must be an int >= 1"
            raise SettingsError(msg)
        self.cluster = name
        self.path = None if path is None else os.path.abspath(path)
        self.pid_file = None if pid_file is None else os.path.abspath(pid_file)
        self.idle_timeout = float(idle_timeout)
        self.max_clients = max_clients
        self.sample_interval = float(sample_interval)
        self._master: Master | None = None
        self._sock: socket.socket | None = None
        self._inode = 0
        self._task: asyncio.Task[None] | None = None
        self._ticks: Timer | None = None
        self._clients = 0
        self._started = time.monotonic()
        self._restarts: dict[int, int] = {}  # slot -> replacements of its worker
        self._crashed: dict[int, bool] = {}  # slot -> its last worker died unexpectedly
        self._last_exit: dict[int, dict[str, Any]] = {}  # slot -> its last exit
        self._cpu: dict[int, tuple[float, float, float, float]] = {}  # pid -> t0, c0, t1, c1
        self._reloading = False
        self._verbs: dict[str, Callable[[dict[str, Any], int], Awaitable[Any]]] = {
            "hello": self._hello, "status": self._status, "reload": self._reload,
            "scale": self._scale, "stop": self._stop,
        }

    # -- installing ------------------------------------------------------------------

    def install(self, master: Master) -> None:
        """Bind the socket (and write the pid file); serve once the master runs.

        Raises:
            StateError: the name is taken by a running master, the control directory
                is not safe, or the pid file names a running master.
        """
        self._master = master
        if self.cluster is None:
            from pycluster.cli import default_name

            self.cluster = master.settings.name or default_name(sys.argv[0] or "app")
        if self.path is None:
            self.path = socket_path(self.cluster)
        self._sock = self._bind(self.path)
        try:
            if self.pid_file is not None:
                self._write_pid_file(self.pid_file)
        except BaseException:
            self.close()
            raise
        atexit.register(self.close)
        self._status_channel = master.channel(STATUS)
        master.worker_setup("pycluster.plugins.guard_hooks:status")  # answers "requests"
        master.on("setup", self._start)
        master.on("fork", self._on_fork)
        master.on("exit", self._on_exit)
        master.on("reloading", self._on_reloading)
        master.on("reloaded", self._on_reload_end)
        master.on("reload_failed", self._on_reload_end)
        self._ticks = master.call_every(self.sample_interval, self._sample)

    def uninstall(self, master: Master) -> None:
        """Stop serving; remove the socket and the pid file."""
        self.close()

    def close(self) -> None:
        """Stop serving; remove the socket and the pid file (if still ours). Idempotent."""
        atexit.unregister(self.close)
        ticks, self._ticks = self._ticks, None
        if ticks is not None:
            ticks.cancel()
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
            if self.path is not None:
                _unlink_if_same(self.path, self._inode)
        pid_file, self.pid_file = self.pid_file, None
        if pid_file is not None:
            try:
                with open(pid_file) as f:
                    mine = f.read().strip() == str(os.getpid())
                if mine:
                    os.unlink(pid_file)
            except OSError:
                pass

    def _bind(self, path: str) -> socket.socket:
        for _ in range(3):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(path)
            except OSError as exc:
                sock.close()
                if exc.errno != errno.EADDRINUSE:
                    msg = f"cannot make the control socket {path}: {exc.strerror}"
                    raise StateError(msg) from None
                holder = probe(path)
                if holder is not None:
                    who = (f"pid {holder['pid']}" if holder.get("pid")
                           else "a master that does not answer")
                    msg = (f"the name {self.cluster!r} is taken by {who} (control socket "
                           f"{path}); give this cluster another --name")
                    raise StateError(msg) from None
                continue  # it was stale and is gone now: bind again
            try:
                os.chmod(path, 0o600)
                self._inode = os.lstat(path).st_ino
                sock.listen(64)
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
            return sock
        msg = f"cannot make the control socket {path}: it keeps reappearing"
        raise StateError(msg)

    def _write_pid_file(self, path: str) -> None:
        try:
            with open(path) as f:
                text = f.read(64)
        except FileNotFoundError:
            text = ""
        except OSError as exc:
            msg = f"cannot read the pid file {path}: {exc.strerror}"
            raise StateError(msg) from None
        old = int(text) if text.strip().isdigit() else None
        if old is not None and old != os.getpid() and _is_pycluster_master(old):
            msg = (f"the pid file {path} names a running pycluster master (pid {old}); "
                   "stop it first, or choose another --pid-file")
            raise StateError(msg)
        temp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(temp, "w") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(temp, path)
        except OSError as exc:
            msg = f"cannot write the pid file {path}: {exc.strerror}"
            raise StateError(msg) from None

    # -- serving ---------------------------------------------------------------------

    def _start(self, settings: Any) -> None:
        import asyncio

        self._started = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        import asyncio

        sock = self._sock
        assert sock is not None
        server = await asyncio.start_unix_server(self._client, sock=sock, limit=MAX_LINE)
        try:
            await server.serve_forever()
        finally:  # the master ended (its loop cancels this task) or close() was called
            self._task = None
            server.close()
            self.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import asyncio

        if self._clients >= self.max_clients:
            writer.close()
            return
        self._clients += 1
        try:
            peer = writer.get_extra_info("socket")
            refused, peer_pid = _peer_check(peer)
            if refused:
                await self._answer(writer, {"ok": False, "error": refused})
                return
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), self.idle_timeout)
                except asyncio.TimeoutError:
                    return  # idle, or too slow to send one line: let the slot go
                except ValueError:  # longer than the reader's limit
                    await self._answer(writer, _error(
                        f"request longer than {MAX_LINE} bytes; a request is one short line"))
                    return
                if not line.endswith(b"\n"):
                    return  # end of input (a partial line is not a request)
                answer = await self._handle(line, peer_pid)
                if not await self._answer(writer, answer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:  # never let a client take the master down
            log.exception("control socket: a client's connection failed")
        finally:
            self._clients -= 1
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, answer: dict[str, Any]) -> bool:
        import asyncio

        writer.write(json.dumps(answer, default=str).encode() + b"\n")
        try:
            await asyncio.wait_for(writer.drain(), self.idle_timeout)
        except (asyncio.TimeoutError, ConnectionError):
            return False
        return True

    async def _handle(self, line: bytes, peer_pid: int) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except (ValueError, RecursionError) as exc:
            return _error(f"the request is not JSON ({exc}); send one object per line, "
                          'like {"verb": "status"}')
        if not isinstance(request, dict):
            return _error('a request is one JSON object per line, like {"verb": "status"}')
        verb = request.get("verb")
        handler = self._verbs.get(verb) if isinstance(verb, str) else None
        if handler is None:
            return _error(f"unknown verb {verb!r}; verbs: {', '.join(self._verbs)}")
        try:
            return {"ok": True, "result": await handler(request, peer_pid)}
        except PyclusterError as exc:
            return _error(str(exc))
        except Exception as exc:
            log.exception("control socket: %r failed", verb)
            return _error(f"{verb} failed in the master: {exc!r}")

    # -- verbs -----------------------------------------------------------------------

    # -- what status shows -----------------------------------------------------------

    def _on_fork(self, worker: Worker) -> None:
        master = self._master
        assert master is not None
        slot = worker.slot
        replacing = any(
            w is not worker and w.slot == slot and not w.exited_after_disconnect
            for w in master.workers.values()
        )  # a reload's replacement: the old worker still holds the slot
        if replacing or self._crashed.get(slot):
            self._restarts[slot] = self._restarts.get(slot, 0) + 1
        else:
            self._restarts[slot] = 0  # a fresh slot (the start, or a scale up)
        self._crashed[slot] = False

    def _on_exit(self, worker: Worker, code: int | None, signal: str | None) -> None:
        self._crashed[worker.slot] = not worker.exited_after_disconnect
        self._last_exit[worker.slot] = {
            "worker": worker.id, "pid": worker.pid, "code": code, "signal": signal,
            "after_disconnect": bool(worker.exited_after_disconnect), "at": time.monotonic(),
        }
        if worker.pid is not None:
            self._cpu.pop(worker.pid, None)

    def _on_reloading(self) -> None:
        self._reloading = True

    def _on_reload_end(self, *args: Any) -> None:
        self._reloading = False

    def _sample(self) -> None:
        master = self._master
        assert master is not None
        now = time.monotonic()
        pids = [w.pid for w in master.workers.values() if w.pid is not None]
        for pid in (*pids, os.getpid()):
            seconds = _cpu_seconds(pid)
            if seconds is not None:
                last = self._cpu.get(pid)
                self._cpu[pid] = (now, seconds, now, seconds) if last is None else (
                    last[2], last[3], now, seconds)

    def _cpu_percent(self, pid: int, started: float | None) -> float | None:
        """CPU% of *pid* over the last sample interval; before two samples, its average."""
        sample = self._cpu.get(pid)
        if sample is not None and sample[2] > sample[0]:
            return round(100 * (sample[3] - sample[1]) / (sample[2] - sample[0]), 1)
        seconds = _cpu_seconds(pid)
        if seconds is None or started is None:
            return None
        return round(100 * seconds / max(time.monotonic() - started, 1e-3), 1)


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def _peer_check(sock: Any) -> tuple[str | None, int]:
    """Return (why the peer is refused or ``None``, its pid) from ``SO_PEERCRED``."""
    try:
        pid, uid, _gid = _CREDS.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size))
    except (OSError, AttributeError, struct.error):
        return "refused: cannot read the client's credentials", 0
    if uid in (0, os.getuid()):
        return None, pid
    log.warning("control socket: refused a client with uid %d (pid %d)", uid, pid)
    return f"refused: uid {uid} is neither the cluster's user (uid {os.getuid()}) nor root", pid
