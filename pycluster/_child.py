"""The worker side: ``pycluster.worker``, this process's end of the IPC channel.

A daemon thread (``pycluster-ipc``) always has a read pending on the channel. It routes
replies to ``listen()`` and delivers ``message`` and ``disconnect`` events: on that thread,
or on an asyncio loop after :meth:`ThisWorker.attach_loop`. When the channel reaches EOF
the master is gone and the worker exits (Node's behaviour); ``PR_SET_PDEATHSIG`` and a
parent-pid check back that up. Nothing here imports asyncio, so a synchronous worker does
not pay for it.
"""

from __future__ import annotations

import array
import collections
import errno
import json
import os
import select
import signal
import socket
import sys
import threading
from typing import Any

from ._errors import ChannelClosedError, ProtocolError, SettingsError, StateError
from ._protocol import (
    CONTROL,
    FrameDecoder,
    decode_control,
    decode_message,
    encode_control,
    encode_message,
)
from ._state import WorkerState
from ._worker import Worker

__all__ = ["SharedSocket", "ThisWorker", "setup"]

#: Seconds ``listen()`` waits for the master's answer.
LISTEN_TIMEOUT = 30.0
#: Messages kept for a worker that has not added a ``message`` listener yet.
EARLY_LIMIT = 10_000
# 64 KiB: a larger buffer is above malloc's mmap threshold and costs ~25 µs per read.
_READ_SIZE = 64 * 1024
_PR_SET_PDEATHSIG = 1


class SharedSocket(socket.socket):
    """A listening socket the master bound and shares with this worker.

    It is a plain :class:`socket.socket` except that :meth:`listen` keeps the master's
    backlog: servers such as asyncio call ``listen(100)`` on a socket they are given,
    which would shrink the accept queue every worker shares.

    It is non-blocking. Every process holding it shares one open file, so one blocking
    flag: when a connection arrives, every worker waiting for it wakes up, and those
    that lose the race must get ``BlockingIOError`` from ``accept()`` instead of blocking
    there (``socketserver`` then just waits again; asyncio expects it). A server that
    wants a plain blocking ``accept()`` loop calls ``setblocking(True)`` in every worker.
    """

    __slots__ = ()

    def listen(self, backlog: int = 0, /) -> None:
        """Do nothing: the socket is already listening with the master's backlog."""


class ThisWorker(Worker):
    """``pycluster.worker``: this worker process, seen from inside.

    Events: ``message(message)`` for each message the master sends, ``disconnect()`` when
    the cluster asks this worker to stop (close your servers, finish the requests in
    flight, then return from your main function), ``error(exc)``. Handlers run on the
    ``pycluster-ipc`` thread, or on the loop given to :meth:`attach_loop`.
    """

    def __init__(
        self,
        id: int,  # noqa: A002 - Node's name
        sock: socket.socket,
        serialization: str,
        limit: int,
        master_pid: int,
    ) -> None:
        super().__init__(id)
        #: The master's ``bind`` addresses, each as ``listen()`` arguments:
        #: ``(port, host)`` or ``(path,)``. ``listen(*address)`` listens on one.
        self.bind: list[tuple[Any, ...]] = []
        self._master_pid = master_pid
        self.state = WorkerState.ONLINE
        self._sock = sock
        self._serialization = serialization
        self._limit = limit
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._seq = 0
        self._waiting: dict[int, list[Any]] = {}
        self._loop: Any = None
        # Messages that arrive before the first ``message`` listener are kept (up to
        # EARLY_LIMIT) and delivered once it is added, as Node delivers them after the
        # worker's startup code: a master may send as soon as it forks.
        self._early: list[Any] | None = []
        self._early_lock = threading.Lock()
        self._flushing = False
        self._reader = threading.Thread(target=self._read_loop, name="pycluster-ipc", daemon=True)

    def __repr__(self) -> str:
        return f"<Worker id={self.id} pid={self.pid} state={self.state.value} (this process)>"

    @property
    def pid(self) -> int:
        """This process's id."""
        return os.getpid()

    def is_connected(self) -> bool:
        """Whether this worker can still talk to the master (false once disconnecting)."""
        return self.state in (WorkerState.ONLINE, WorkerState.LISTENING)

    def is_dead(self) -> bool:
        """Always false: this process is running."""
        return False

    # -- sending ---------------------------------------------------------------------

    def send(self, message: Any) -> bool:
        """Send *message* to the master, where it becomes a ``message`` event.

        Safe from any thread; messages from one thread arrive in order. Returns ``True``.

        Raises:
            MessageError: *message* does not serialize or is over the size limit; nothing
                was sent and the channel still works.
            ChannelClosedError: this worker is disconnecting, or the master is gone.
        """
        if not self.is_connected():
            msg = f"cannot send: worker {self.id} is {self.state.value}"
            raise ChannelClosedError(msg)
        self._write(encode_message(message, self._serialization, self._limit))
        return True

    def _write(self, frame: bytes) -> None:
        try:
            with self._send_lock:
                self._sock.sendall(frame)
        except OSError as exc:
            msg = "cannot send: the channel to the master is closed"
            raise ChannelClosedError(msg) from exc

    # -- listening -------------------------------------------------------------------

    def listen(
        self,
        port: int | str | os.PathLike[str] | None = None,
        host: str = "0.0.0.0",
        *,
        backlog: int = 2048,
    ) -> SharedSocket:
        """Return a listening socket for *host*:*port*, shared through the master.

        The master binds the address once and every worker that asks for it gets the same
        socket (``scheduling="shared"``) or its slot's own ``SO_REUSEPORT`` socket
        (``"reuseport"``). Port 0 gives every worker the same real port. A ``str`` or path
        *port* is a unix socket path (relative to this worker's cwd). With no *port*, the
        first address of the master's ``bind`` setting (the CLI's ``--bind``) is used; see
        :attr:`bind` for all of them. Fires ``listening(worker, address)`` in the master.

        Raises:
            SettingsError: bad *port*, *host* or *backlog*.
            OSError: the master could not bind (``EADDRINUSE``, ``EACCES``, ...): the errno
                is the master's, the message names the address.
            StateError: this worker is disconnecting, or ``listen()`` was called on the
                ``pycluster-ipc`` thread (from a handler: it would wait on itself).
        """
        if port is None:
            if not self.bind:
                msg = "listen() needs a port: none was given and the master has no bind setting"
                raise SettingsError(msg)
            port, host = (*self.bind[0], host)[:2]
        request: dict[str, Any] = {"backlog": backlog}
        if isinstance(port, (str, os.PathLike)):
            if isinstance(port, str) and (not port.strip() or port.strip().isdigit()):
                msg = (
                    f"port={port!r} is not a unix socket path: pass an int for a TCP port, "
                    "or a path such as './app.sock' (a pathlib.Path for any name)"
                )
                raise SettingsError(msg)
            path = os.path.abspath(os.fspath(port))
            if "\0" in path:
                msg = f"port={port!r}: a unix socket path cannot contain a NUL character"
                raise SettingsError(msg)
            request["path"] = path
            where = path
        else:
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
                msg = f"port={port!r} must be an int from 0 to 65535, or a unix socket path"
                raise SettingsError(msg)
            if not isinstance(host, str) or not host or "\0" in host:
                msg = f"host={host!r} must be a non-empty string such as '127.0.0.1' (no NUL)"
                raise SettingsError(msg)
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            request.update(host=_numeric_host(host, port, where), port=port)
        if isinstance(backlog, bool) or not isinstance(backlog, int) or not 1 <= backlog < 2**31:
            msg = f"backlog={backlog!r} must be an int from 1 to 2**31 - 1"
            raise SettingsError(msg)
        if threading.current_thread() is self._reader:
            msg = (
                "listen() cannot run on the pycluster-ipc thread (inside an event handler): "
                "call it from your main code, or attach_loop() first"
            )
            raise StateError(msg)
        if not self.is_connected():
            msg = f"cannot listen on {where}: worker {self.id} is {self.state.value}"
            raise StateError(msg)
        reply, fds = self._request("listen", request, where)
        if not reply.get("ok"):
            err = reply.get("errno") or 0
            text = f"{reply.get('error')} (listening on {where})"
            if not err:
                raise StateError(text)
            raise OSError(err, text)
        if not fds:
            msg = f"the master's answer for {where} carried no socket"
            raise ProtocolError(msg)
        sock = SharedSocket(fileno=fds[0])
        sock.setblocking(False)  # it already is (the master set it); say so to Python
        for extra in fds[1:]:
            os.close(extra)
        self._write(encode_control("listening", seq=reply["seq"]))
        with self._state_lock:
            if self.state is WorkerState.ONLINE:
                self.state = WorkerState.LISTENING
        return sock

    def _request(
        self, act: str, fields: dict[str, Any], where: str
    ) -> tuple[dict[str, Any], list[int]]:
        event = threading.Event()
        with self._state_lock:
            self._seq += 1
            seq = self._seq
            slot: list[Any] = [event, None, []]
            self._waiting[seq] = slot
        try:
            self._write(encode_control(act, seq=seq, **fields))
            if not event.wait(LISTEN_TIMEOUT):
                msg = f"the master did not answer listen() for {where} in {LISTEN_TIMEOUT} s"
                raise StateError(msg)
        finally:
            with self._state_lock:
                self._waiting.pop(seq, None)
        if slot[1] is None:
            msg = f"cannot listen on {where}: the channel to the master closed"
            raise ChannelClosedError(msg)
        return slot[1], slot[2]

    def ready(self) -> None:
        """Tell the master this worker is ready to serve (a ``ready`` event there).

        For apps that need to warm up after ``listen()``: a rolling reload can wait for
        this instead of ``listening``.

        Raises:
            ChannelClosedError: this worker is disconnecting, or the master is gone.
        """
        if not self.is_connected():
            msg = f"cannot report ready: worker {self.id} is {self.state.value}"
            raise ChannelClosedError(msg)
        self._write(encode_control("ready"))

    # -- stopping --------------------------------------------------------------------

    def disconnect(self) -> ThisWorker:
        """Leave the cluster: the master marks this worker ``exited_after_disconnect``,
        ``disconnect`` handlers run (close your servers and let requests finish), and the
        process is expected to exit 0. Without a ``disconnect`` handler it exits at once.

        Returns this worker. Repeated calls do nothing.
        """
        self._begin_disconnect()
        return self

    def kill(self, signal: int | str = "SIGTERM") -> None:  # noqa: ARG002 - Node's signature
        """Leave the cluster now: tell the master, then exit 0 (``exited_after_disconnect``)."""
        try:
            self._write(encode_control("disconnecting"))
        except ChannelClosedError:
            pass
        _exit(0)

    def attach_loop(self, loop: Any = None) -> None:
        """Run this worker's event handlers on an asyncio *loop* (default: the running one).

        Call it from inside the loop, before serving, in an asyncio app.
        """
        if loop is None:
            import asyncio

            loop = asyncio.get_running_loop()
        self._loop = loop

    def _begin_disconnect(self) -> None:
        with self._state_lock:
            if not self.is_connected():
                return
            self.state = WorkerState.DISCONNECTING
        self.exited_after_disconnect = True
        try:
            self._write(encode_control("disconnecting"))
        except ChannelClosedError:
            pass
        if not self._events.get("disconnect"):
            _exit(0)
        self._dispatch("disconnect")

    # -- reading ---------------------------------------------------------------------

    def _add_event_handler(self, event: str, k: Any, v: Any) -> None:
        super()._add_event_handler(event, k, v)
        if event != "message":
            return
        with self._early_lock:
            early = self._early
            if early is None or self._flushing:
                return
            if not early:
                self._early = None
                return
            self._flushing = True
        # Not on the caller's thread: its handler may use names defined after on().
        threading.Thread(target=self._flush_early, name="pycluster-ipc-early", daemon=True).start()

    def _flush_early(self) -> None:
        """Deliver the kept messages in order, then let the reader deliver directly."""
        try:
            while True:
                with self._early_lock:
                    batch = self._early
                    if not batch:
                        self._early = None
                        return
                    self._early = []
                for message in batch:
                    self._dispatch("message", message)
        except SystemExit as exc:  # sys.exit() in a handler ends the process, as on the reader
            code = exc.code
            _exit(code if isinstance(code, int) else (0 if code is None else 1))

    def _deliver(self, message: Any) -> None:
        """Dispatch *message*, or keep it while no ``message`` listener was ever added."""
        if self._early is None:  # the usual case, once a listener exists: no lock needed
            self._dispatch("message", message)
            return
        with self._early_lock:
            early = self._early
            if early is not None:
                if len(early) < EARLY_LIMIT:
                    early.append(message)
                return
        self._dispatch("message", message)

    def _dispatch(self, event: str, *args: Any) -> threading.Event | None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            done = threading.Event()

            def run() -> None:
                try:
                    self.emit(event, *args)
                finally:
                    done.set()

            try:
                loop.call_soon_threadsafe(run)
            except RuntimeError:  # closed in between
                pass
            else:
                return done
        self.emit(event, *args)
        return None

    def _read_loop(self) -> None:
        try:
            self._read_frames()
        except SystemExit as exc:  # sys.exit() in a handler on this thread ends the process
            code = exc.code
            _exit(code if isinstance(code, int) else (0 if code is None else 1))
        finally:
            self._master_lost()

    def _read_frames(self) -> None:
        sock = self._sock
        decoder = FrameDecoder(self._limit)
        fds: collections.deque[int] = collections.deque()
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        # On Linux PR_SET_PDEATHSIG backs up EOF, so a plain blocking read (one syscall a
        # message) is enough; elsewhere poll with a timeout to check the parent pid.
        flags = socket.MSG_CMSG_CLOEXEC
        if not sys.platform.startswith("linux"):
            flags |= socket.MSG_DONTWAIT
        master_pid = self._master_pid
        ancsize = socket.CMSG_SPACE(16 * array.array("i").itemsize)
        while True:
            try:
                data, ancdata, _, _ = sock.recvmsg(_READ_SIZE, ancsize, flags)
            except (BlockingIOError, InterruptedError):
                if not poller.poll(1000) and os.getppid() != master_pid:
                    break  # the master is gone, though its end of the channel is not
                continue
            except OSError:
                data, ancdata = b"", []
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(cdata[: len(cdata) - len(cdata) % got.itemsize])
                    fds.extend(got)
            if not data:
                break
            try:
                frames = decoder.feed(data)
            except ProtocolError as exc:
                self._dispatch("error", exc)
                break
            for kind, payload in frames:
                try:
                    if kind == CONTROL:
                        self._on_control(decode_control(payload), fds)
                    else:
                        self._deliver(decode_message(kind, payload, self._serialization))
                except ProtocolError as exc:
                    self._dispatch("error", exc)

    def _on_control(self, ctl: dict[str, Any], fds: collections.deque[int]) -> None:
        act = ctl["act"]
        if act == "reply":
            got = [fds.popleft()] if ctl.get("ok") and fds else []
            with self._state_lock:
                slot = self._waiting.get(ctl.get("seq", -1))
            if slot is None:
                for fd in got:
                    os.close(fd)
                return
            slot[1], slot[2] = ctl, got
            slot[0].set()
        elif act == "disconnect":
            self._begin_disconnect()

    def _master_lost(self) -> None:
        with self._state_lock:
            was_connected = self.is_connected()
            self.state = WorkerState.DISCONNECTED
            for slot in self._waiting.values():
                slot[0].set()
        if was_connected and self._events.get("disconnect"):
            done = self._dispatch("disconnect")
            if done is not None:
                done.wait(1.0)
        _exit(0)


def _numeric_host(host: str, port: int, where: str) -> str:
    """Resolve *host* here, in the worker, so the master never blocks on a DNS lookup.

    Raises:
        OSError: the name does not resolve; the message names the address.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise socket.gaierror(exc.errno, f"{exc.strerror} (listening on {where})") from None
    except ValueError as exc:  # UnicodeError from the IDNA codec
        raise OSError(errno.EINVAL, f"host name {host!r} is not valid: {exc}") from None
    return str(infos[0][4][0])


def _exit(code: int) -> None:
    """End the process now (from any thread), flushing what Python buffered for stdio."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass
    os._exit(code)


def setup() -> ThisWorker | None:
    """Make this process a worker if the master said so in its environment.

    Reads (and removes) every ``PYCLUSTER_*`` variable, so this process's own children are
    not workers; arms ``PR_SET_PDEATHSIG``; checks the master is still this process's
    parent; starts the IPC thread and tells the master this worker is online.
    """
    env = os.environ
    if "PYCLUSTER_WORKER_ID" not in env:
        return None
    mine = {k: env.pop(k) for k in [k for k in env if k.startswith("PYCLUSTER_")]}
    try:
        worker_id = int(mine["PYCLUSTER_WORKER_ID"])
        fd = int(mine["PYCLUSTER_IPC_FD"])
        master_pid = int(mine["PYCLUSTER_MASTER_PID"])
        serialization = mine.get("PYCLUSTER_SERIALIZATION", "json")
        limit = int(mine.get("PYCLUSTER_MAX_MESSAGE", "16777216"))
    except (KeyError, ValueError) as exc:
        msg = f"this process looks like a pycluster worker but its environment is incomplete: {exc}"
        raise SettingsError(msg) from None
    _arm_parent_death_signal()
    if os.getppid() != master_pid:
        _exit(0)  # the master died before we got here
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)
    worker = ThisWorker(worker_id, sock, serialization, limit, master_pid)
    try:
        worker.bind = [tuple(a) for a in json.loads(mine.get("PYCLUSTER_BIND", "[]"))]
    except (ValueError, TypeError):
        worker.bind = []
    worker._write(encode_control("online"))
    worker._reader.start()
    return worker


def _arm_parent_death_signal() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
