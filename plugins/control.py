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
import re
import socket
import stat
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pycluster import PyclusterError, SettingsError, StateError, __version__

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

#: Longest request line the master reads (bytes); a longer one is answered with an error.
MAX_LINE = 64 * 1024
#: Most workers ``scale`` accepts (a typo like ``scale 10000`` should not fork forever).
MAX_SCALE = 1024
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SUFFIX = ".sock"
_CREDS = struct.Struct("3i")


class ControlError(PyclusterError):
    """A control request failed: no such cluster, no answer, refused, or an error answer.

    :attr:`stale` is true when nothing listens on the socket (its master is gone).
    """

    def __init__(self, message: str, *, stale: bool = False) -> None:
        super().__init__(message)
        self.stale = stale


# -- where the sockets live ----------------------------------------------------------------


def runtime_dir(*, create: bool = True) -> str:
    """Return this user's control directory, made (mode 0700) if *create* and missing.

    Raises:
        StateError: it is not a directory owned by this user with no group or other
            permissions (someone else could plant or read sockets there), or it cannot
            be made.
    """
    uid = os.getuid()
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    if base and os.path.isabs(base) and os.path.isdir(base):
        path = os.path.join(base, "pycluster")
    else:
        path = f"/tmp/pycluster-{uid}"
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            msg = f"cannot make the control directory {path}: {exc.strerror}"
            raise StateError(msg) from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path  # nothing runs yet (only when not creating)
    if not stat.S_ISDIR(st.st_mode):
        why = "it is not a directory"
    elif st.st_uid != uid:
        why = f"it belongs to uid {st.st_uid}, not to this user (uid {uid})"
    elif st.st_mode & 0o077:
        why = f"its mode is {stat.S_IMODE(st.st_mode):04o}; group and others must have none"
    else:
        return path
    msg = (f"refusing the control directory {path}: {why}; it must be this user's, mode "
           f"0700 (fix: chmod 700 {path}, or remove it)")
    raise StateError(msg)


def check_name(name: str) -> str:
    """Return *name* if it can name a cluster's socket, else raise SettingsError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        msg = (f"cluster name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
               "starting with a letter or digit")
        raise SettingsError(msg)
    return name


def socket_path(name: str, directory: str | None = None) -> str:
    """The control socket of the cluster named *name* (in :func:`runtime_dir`)."""
    check_name(name)
    return os.path.join(runtime_dir() if directory is None else directory, name + _SUFFIX)


# -- the client side -----------------------------------------------------------------------


def call(path: str, request: dict[str, Any], timeout: float | None = 10.0) -> Any:
    """Send *request* to the control socket at *path* and return the answer's result.

    Args:
        timeout: seconds for connecting and for the answer (``None``: no limit).

    Raises:
        ControlError: nothing listens there (``stale``), no answer in time, the
            connection closed, or the master answered with an error (its message).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            msg = f"no master listens on {path} ({exc.strerror})"
            raise ControlError(msg, stale=True) from None
        except TimeoutError:
            msg = f"the master behind {path} did not accept within {timeout:g} s"
            raise ControlError(msg) from None
        except OSError as exc:
            msg = f"cannot connect to {path}: {exc.strerror}"
            raise ControlError(msg) from None
        try:
            try:
                sock.sendall(json.dumps(request).encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # it answered (a refusal) and closed before reading: read that
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    msg = f"the master behind {path} closed the connection without an answer"
                    raise ControlError(msg)
                data += chunk
        except TimeoutError:
            msg = f"no answer from the master behind {path} within {timeout:g} s"
            raise ControlError(msg) from None
        except OSError as exc:
            msg = f"the connection to {path} failed: {exc.strerror or exc}"
            raise ControlError(msg) from None
    finally:
        sock.close()
    try:
        answer = json.loads(data)
    except ValueError:
        msg = f"the answer from {path} is not JSON: {data[:80]!r}"
        raise ControlError(msg) from None
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        msg = f"the answer from {path} is not a control answer: {data[:80]!r}"
        raise ControlError(msg)
    if not answer["ok"]:
        raise ControlError(str(answer.get("error")))
    return answer.get("result")


def probe(path: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """Ask the socket at *path* who it is: ``{"name", "pid", "workers", ...}``.

    Returns ``None`` when no master is there; a stale socket (its master died) is
    removed on the way. A master that accepts but does not answer gives a dict with
    ``"error"``.
    """
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(before.st_mode):
        return None
    try:
        hello = call(path, {"verb": "hello"}, timeout)
    except ControlError as exc:
        if exc.stale:
            _unlink_if_same(path, before.st_ino)
            return None
        name = os.path.basename(path)[: -len(_SUFFIX)]
        return {"name": name, "pid": None, "socket": path, "error": str(exc)}
    if not isinstance(hello, dict):
        return None
    return {**hello, "socket": path}


def clusters(timeout: float = 2.0) -> list[dict[str, Any]]:
    """This user's running clusters, by name (see :func:`probe`); stale sockets go."""
    directory = runtime_dir(create=False)
    try:
        entries = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        if entry.endswith(_SUFFIX):
            info = probe(os.path.join(directory, entry), timeout)
            if info is not None:
                found.append(info)
    return found


def find(name: str | None = None, timeout: float = 2.0) -> dict[str, Any]:
    """The running cluster named *name*, or the only one when *name* is ``None``.

    Returns its :func:`probe` answer (``"socket"`` is the path to :func:`call`).

    Raises:
        ControlError: no such cluster, none or several running (the message lists them),
            or it does not answer.
    """
    if name is not None:
        path = socket_path(name, runtime_dir(create=False))
        info = probe(path, timeout)
        if info is None:
            others = ", ".join(c["name"] for c in clusters(timeout))
            msg = (f"no cluster named {name!r} is running"
                   + (f" (running: {others})" if others else ""))
            raise ControlError(msg)
    else:
        running = clusters(timeout)
        if not running:
            msg = ("no pycluster cluster of this user is running (no live socket in "
                   f"{runtime_dir(create=False)})")
            raise ControlError(msg)
        if len(running) > 1:
            names = ", ".join(f"{c['name']} (pid {c['pid']})" for c in running)
            msg = f"{len(running)} clusters are running: {names}; choose one with --name NAME"
            raise ControlError(msg)
        info = running[0]
    if "error" in info:
        raise ControlError(str(info["error"]))
    return info


def _unlink_if_same(path: str, inode: int) -> None:
    """Remove *path* if it is still the file with *inode* (not a newer master's socket)."""
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass


# -- /proc, for the status table ----------------------------------------------------------

_HZ = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
        fields = text[text.rfind(b")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _HZ
    except (OSError, IndexError, ValueError):
        return None


def _rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def _is_pycluster_master(pid: int) -> bool:
    """Whether *pid* is alive and looks like a pycluster master (its title or argv)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read()
        with open(f"/proc/{pid}/comm", "rb") as f:
            comm = f.read()
    except OSError:
        return False
    return b"pycluster" in argv or comm.startswith(b"pyc-master")


# -- the master side -----------------------------------------------------------------------


class ControlSocket:
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
    (``row["requests"] = n`` fills the requests column).

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

    def _summary(self) -> dict[str, Any]:
        master = self._master
        assert master is not None
        return {
            "name": self.cluster, "pid": os.getpid(), "version": __version__,
            "uptime": round(time.monotonic() - self._started, 3),
            "workers": master.size, "stopping": master.stopping,
        }

    async def _hello(self, request: dict[str, Any], peer_pid: int) -> Any:
        return self._summary()

    async def _status(self, request: dict[str, Any], peer_pid: int) -> Any:
        master = self._master
        assert master is not None
        now = time.monotonic()
        rows = []
        for worker in sorted(master.workers.values(), key=lambda w: (w.slot, w.id)):
            pid = worker.pid
            last = self._last_exit.get(worker.slot)
            row: dict[str, Any] = {
                "id": worker.id,
                "pid": pid,
                "slot": worker.slot,
                "state": worker.state.value,
                "leaving": bool(worker.exited_after_disconnect),
                "uptime": None if worker.started_at is None else round(now - worker.started_at, 3),
                "restarts": self._restarts.get(worker.slot, 0),
                "cpu_percent": None if pid is None else self._cpu_percent(pid, worker.started_at),
                "rss_bytes": None if pid is None else _rss_bytes(pid),
                "requests": None,
                "last_exit": None if last is None else {**last, "ago": round(now - last["at"], 3)},
            }
            master.emit("status_row", worker, row)
            rows.append(row)
        return {
            **self._summary(),
            "socket": self.path,
            "reloading": self._reloading,
            "cpu_percent": self._cpu_percent(os.getpid(), self._started),
            "rss_bytes": _rss_bytes(os.getpid()),
            "workers": rows,
        }

    async def _reload(self, request: dict[str, Any], peer_pid: int) -> Any:
        import asyncio

        master = self._master
        assert master is not None
        outcome: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        started = False

        def reloading() -> None:
            nonlocal started
            started = True

        def settle(why: str | None) -> None:
            if not outcome.done():
                outcome.set_result(why)

        def reloaded() -> None:
            if started:  # else: the round before ours ended; ours runs next
                settle(None)

        def failed(reason: str) -> None:
            if started:
                settle(reason)
            else:
                settle(f"the reload in progress failed, so the one asked for did not run: "
                       f"{reason}")

        def stopping() -> None:
            settle("the master is stopping")

        handlers: list[tuple[str, Callable[..., None]]] = [
            ("reloading", reloading), ("reloaded", reloaded), ("reload_failed", failed),
            ("stop", stopping)]
        for event, handler in handlers:
            master.on(event, handler)
        try:
            if master.stopping:
                stopping()
            else:
                log.info("reload asked for on the control socket (client pid %d)", peer_pid)
                master.reload()
            why = await outcome
        finally:
            for event, handler in handlers:
                master.remove_listener(event, handler)
        if why is not None:
            msg = f"reload failed: {why}"
            raise StateError(msg)
        return {"reloaded": True, "workers": master.size}

    async def _scale(self, request: dict[str, Any], peer_pid: int) -> Any:
        master = self._master
        assert master is not None
        before = master.size
        count, delta = request.get("count"), request.get("delta")
        if (count is None) == (delta is None):
            msg = 'scale needs either "count" (workers to run) or "delta" (+N or -N)'
            raise SettingsError(msg)
        if delta is not None:
            if isinstance(delta, bool) or not isinstance(delta, int):
                msg = f"scale delta={delta!r} must be a whole number like 1 or -1"
                raise SettingsError(msg)
            count = before + delta
            if count < 1:
                msg = (f"cannot scale by {delta:+d}: {before} worker(s) run and at least one "
                       "must stay; to end the cluster, stop it")
                raise SettingsError(msg)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_SCALE:
            msg = f"scale count={count!r} must be a whole number from 1 to {MAX_SCALE}"
            raise SettingsError(msg)
        log.info("scale to %d asked for on the control socket (client pid %d)", count, peer_pid)
        master.scale(count)
        return {"from": before, "to": count}

    async def _stop(self, request: dict[str, Any], peer_pid: int) -> Any:
        master = self._master
        assert master is not None
        now = request.get("now", False)
        if not isinstance(now, bool):
            msg = f"stop now={now!r} must be true or false"
            raise SettingsError(msg)
        log.info("%s stop asked for on the control socket (client pid %d)",
                 "immediate" if now else "graceful", peer_pid)
        workers = len(master.workers)
        master.stop(graceful=not now)
        return {"stopping": True, "pid": os.getpid(), "workers": workers}

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
