"""``Master``: forks workers, shares ports with them and publishes their lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from ._channel import Channel
from ._emitter import Emitter, logger
from ._errors import ProtocolError, SettingsError, StateError
from ._plugins import blame, load_plugin, plugin_name
from ._protocol import CONTROL, decode_control, decode_message, encode_control
from ._settings import Settings, check_env
from ._sockets import Listeners
from ._spawn import main_command, spawn
from ._state import WorkerState
from ._worker import Worker

__all__ = ["Master"]

log = logger()

#: Longest line of a silent worker's output kept whole; longer ones come in pieces.
_LONGEST_LINE = 1024 * 1024
_SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGTTIN", "SIGTTOU", "SIGUSR1", "SIGUSR2")


class Master(Emitter):
    """The primary process of a cluster: an EventEmitter that forks and watches workers.

    Args:
        **settings: see :class:`pycluster.Settings` (``exec``, ``target``, ``args``,
            ``env``, ``cwd``, ``silent``, ``scheduling``, ``serialization``,
            ``kill_timeout``, ``uid``, ``gid``, ``max_message_size``, ``bind``).

    Events (on a worker's handle first, then here with the worker first):
    ``fork(worker)``, ``online(worker)``, ``listening(worker, address)``,
    ``ready(worker)`` (the worker called ``pycluster.worker.ready()``),
    ``message(worker, message)``, ``disconnect(worker)``, ``exit(worker, code, signal)``,
    ``output(worker, stream, line)`` (``silent=True``), ``setup(settings)`` once when the
    master starts running, ``stop()`` when :meth:`stop` is first called, ``reload()``
    (see :meth:`reload`), ``signal(name)`` for
    SIGUSR1, SIGUSR2 and an unhandled SIGHUP, and ``error(exc)``.
    Order per worker: ``fork → online → listening* → disconnect → exit``.

    Raises:
        SettingsError: a setting is unknown or has a bad value.
    """

    def __init__(self, **settings: Any) -> None:
        super().__init__()
        self.settings = Settings.make(settings)
        self._command = main_command(self.settings)
        self._workers: dict[int, Worker] = {}
        self.workers: Mapping[int, Worker] = MappingProxyType(self._workers)
        self._next_id = 1
        self._listeners = Listeners(self.settings.scheduling)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deferred: list[Callable[[], None]] = []
        self._pidfds: dict[int, int] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._listen_addresses: dict[tuple[int, int], Any] = {}
        self._holds = 0
        self._stopping = False
        self._exit_code: int | None = None
        self._abnormal = False
        self._done: asyncio.Future[int] | None = None
        self._interrupts = 0
        self._plugins: dict[Any, list[tuple[str, Callable[..., Any]]]] = {}
        self._installing: tuple[str, list[tuple[str, Callable[..., Any]]]] | None = None
        self._buffers: dict[tuple[int, str], bytearray] = {}
        self._sigchld = False  # whether SIGCHLD reaps (where pidfd is missing)

    # -- forking -----------------------------------------------------------------------

    def fork(self, env: Mapping[str, str] | None = None, *, slot: int | None = None) -> Worker:
        """Start a worker process and return its handle.

        Args:
            env: variables added to this worker's environment (over ``settings.env``).
            slot: the slot the worker fills; default: the lowest slot no connected worker
                holds. A replacement passes the slot of the worker it replaces.

        Emits ``fork(worker)`` once the master is running (so handlers added after
        ``fork()`` returns still see it).

        Raises:
            StateError: the master is stopping or stopped.
            SettingsError: *env* is not a mapping of strings, or *slot* is not an int >= 0.
        """
        if self._stopping:
            msg = "cannot fork: the master is stopping; fork() before stop() or in a new Master"
            raise StateError(msg)
        extra = check_env(env, "fork env")
        if slot is not None and (isinstance(slot, bool) or not isinstance(slot, int) or slot < 0):
            msg = f"slot={slot!r} must be an int >= 0 (the slot of the worker replaced)"
            raise SettingsError(msg)
        if slot is None:
            taken = {w.slot for w in self._workers.values() if not w.exited_after_disconnect}
            slot = next(i for i in range(len(taken) + 1) if i not in taken)
        worker = Worker(self._next_id, slot=slot)
        process, sock = spawn(self.settings, self._command, worker.id, extra)
        self._next_id += 1
        worker.process = process
        worker.env = extra
        worker.started_at = time.monotonic()
        worker._master = self
        worker._channel = Channel(
            sock,
            self.settings.max_message_size,
            lambda frames: self._on_frames(worker, frames),
            lambda error: self._on_channel_close(worker, error),
        )
        self._workers[worker.id] = worker
        try:
            self._pidfds[worker.id] = os.pidfd_open(process.pid)
        except (AttributeError, OSError):
            pass  # no pidfd here: SIGCHLD tells the loop instead
        self._soon(lambda: self._attach(worker))
        return worker

    def _attach(self, worker: Worker) -> None:
        loop = self._loop
        assert loop is not None and worker._channel is not None
        worker._channel.attach(loop)
        worker._attached = True
        pidfd = self._pidfds.get(worker.id)
        if pidfd is not None:
            loop.add_reader(pidfd, self._reap, worker)
        elif not self._sigchld:
            self._sigchld = self._watch_sigchld(loop)
        if self.settings.silent:
            self._read_output(worker)
        worker.emit("fork")
        self.emit("fork", worker)
        self._reap(worker)  # it may have died before the loop ran

    # -- running ---------------------------------------------------------------------

    def run(self) -> int:
        """Run the master until no worker is left and nothing will fork another.

        Installs SIGTERM/SIGINT (graceful stop), SIGQUIT (immediate stop), SIGTTIN/
        SIGTTOU (one worker more/less) and SIGHUP/SIGUSR1/SIGUSR2 (``signal`` events)
        handlers when called from the main thread. Returns the exit code for the process:
        the one given to :meth:`stop`, else 1 if the cluster ended because workers died
        unexpectedly, else 0.
        """
        return asyncio.run(self.serve())

    async def serve(self) -> int:
        """Like :meth:`run`, inside a running asyncio loop."""
        if self._done is not None:
            msg = "this master has already run; make a new Master to run again"
            raise StateError(msg)
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._done = loop.create_future()
        restore = self._install_signals(loop)
        if not hasattr(os, "pidfd_open"):
            self._sigchld = self._watch_sigchld(loop)
        try:
            self.emit("setup", self.settings)
            deferred, self._deferred = self._deferred, []
            for call in deferred:
                call()
            self._check_done()
            return await self._done
        finally:
            if self._sigchld:
                loop.remove_signal_handler(signal.SIGCHLD)
                self._sigchld = False
            restore()
            self._shutdown_now()

    def stop(self, *, graceful: bool = True, exit_code: int | None = None) -> None:
        """Stop the cluster: no more forks; every worker disconnects (or is signalled).

        Emits ``stop()`` the first time (plugins drop what they planned to fork).

        Args:
            graceful: ``True`` (SIGTERM/SIGINT): workers are disconnected and get
                ``kill_timeout`` seconds to finish. ``False`` (SIGQUIT): workers get SIGTERM
                at once, then SIGKILL after ``kill_timeout``.
            exit_code: what :meth:`run` returns (default 0).
        """
        if exit_code is not None:
            if isinstance(exit_code, bool) or not isinstance(exit_code, int):
                msg = f"exit_code={exit_code!r} must be an int (what run() returns)"
                raise SettingsError(msg)
            self._exit_code = exit_code
        first = not self._stopping
        self._stopping = True
        if first:
            log.info("stopping %d worker(s)%s", len(self._workers), "" if graceful else " now")
            self.emit("stop")
        for worker in list(self._workers.values()):
            if graceful:
                worker.disconnect()
            else:
                worker.kill("SIGTERM")
                self._soon(functools.partial(self._deadline, worker))
        self._soon(self._check_done)

    def disconnect(self) -> None:
        """Disconnect every connected worker (see :meth:`Worker.disconnect`)."""
        for worker in list(self._workers.values()):
            if worker.is_connected():
                worker.disconnect()

    def reload(self) -> None:
        """Ask the installed reload plugin for a rolling reload (what SIGHUP does).

        Emits ``reload()``.

        Raises:
            StateError: no plugin handles ``reload`` (install one: ``master.use("reload")``).
        """
        if not self._events.get("reload"):
            msg = "nothing handles reload(); install the reload plugin: master.use('reload')"
            raise StateError(msg)
        self.emit("reload")

    # -- plugins ---------------------------------------------------------------------

    def use(self, plugin: Any, /, **options: Any) -> Master:
        """Install *plugin*: an object with ``install(master)``, a ``function(master)``, or
        the name of a plugin registered in the ``pycluster.plugins`` entry-point group
        (built-ins: ``"respawn"``, ``"reload"``, ``"logging"``), made with *options*.

        Listeners the plugin adds to this master while installing belong to it: an
        exception they raise becomes an ``error`` event carrying a
        :class:`pycluster.PluginError` that names the plugin, and :meth:`unuse` removes
        them. Returns the master, so calls chain.

        Raises:
            SettingsError: an unknown plugin name (the message lists the installed ones),
                options given with a plugin object, or an object that is not a plugin.
            StateError: this plugin object is installed already.
        """
        if isinstance(plugin, str):
            plugin = load_plugin(plugin, options)
        elif options:
            msg = f"options {options!r} go with a plugin name, not with the object {plugin!r}"
            raise SettingsError(msg)
        install = getattr(plugin, "install", None)
        if install is None and callable(plugin) and not isinstance(plugin, type):
            install = plugin
        if install is None:
            msg = f"{plugin!r} is not a plugin: give an object with install(master) or a function"
            raise SettingsError(msg)
        if plugin in self._plugins:
            msg = f"plugin {plugin_name(plugin)!r} is already installed on this master"
            raise StateError(msg)
        record: list[tuple[str, Callable[..., Any]]] = []
        self._installing = (plugin_name(plugin), record)
        try:
            install(self)
        except BaseException:
            self._remove_listeners(record)
            raise
        finally:
            self._installing = None
        self._plugins[plugin] = record
        return self

    def unuse(self, plugin: Any) -> None:
        """Remove *plugin*: its listeners go, then its ``uninstall(master)`` runs if it has one.

        Raises:
            StateError: *plugin* is not installed.
        """
        record = self._plugins.pop(plugin, None)
        if record is None:
            msg = f"plugin {plugin_name(plugin)!r} is not installed on this master"
            raise StateError(msg)
        self._remove_listeners(record)
        uninstall = getattr(plugin, "uninstall", None)
        if uninstall is not None:
            uninstall(self)

    @property
    def plugins(self) -> tuple[Any, ...]:
        """The installed plugins, in installation order."""
        return tuple(self._plugins)

    def _remove_listeners(self, record: list[tuple[str, Callable[..., Any]]]) -> None:
        for event, handler in record:
            self.remove_listener(event, handler)

    def _add_event_handler(self, event: str, k: Callable[..., Any], v: Callable[..., Any]) -> None:
        if self._installing is not None:
            name, record = self._installing
            v = blame(name, event, v)
            record.append((event, k))
        super()._add_event_handler(event, k, v)

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Call ``callback(*args)`` in *delay* seconds, keeping the master running until then.

        For plugins that will fork later (a respawn after a backoff). What *callback*
        raises becomes an ``error`` event. Cancel the returned timer to let the master end.

        Raises:
            StateError: the master is not running.
        """
        if self._loop is None or self._done is None or self._done.done():
            msg = "call_later() needs a running master (call it from an event handler)"
            raise StateError(msg)
        timer = Timer(self.hold())

        def fire() -> None:
            timer.release()
            try:
                callback(*args)
            except Exception as exc:
                self._handler_failed(callback, exc)

        timer.handle = self._loop.call_later(delay, fire)
        return timer

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called (plugins must not fork then)."""
        return self._stopping

    def hold(self) -> Callable[[], None]:
        """Keep the master running while something (a plugin) may still fork.

        Returns a function that releases the hold; call it exactly once.
        """
        self._holds += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._holds -= 1
                self._soon(self._check_done)

        return release

    def _soon(self, call: Callable[[], None]) -> None:
        if self._loop is None:
            self._deferred.append(call)  # runs when serve() starts
        elif not self._loop.is_closed():
            self._loop.call_soon(call)
        # else: run() has returned; there is nothing left to do it for

    def _check_done(self) -> None:
        done = self._done
        if done is None or done.done() or self._workers or self._holds:
            return
        code = self._exit_code
        if code is None:
            code = 1 if self._abnormal and not self._stopping else 0
        done.set_result(code)

    # -- signals ---------------------------------------------------------------------

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {}
        for name in _SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            previous[sig] = signal.getsignal(sig)
            loop.add_signal_handler(sig, self._on_signal, sig)

        def restore() -> None:
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)
                with contextlib.suppress(TypeError, ValueError):
                    signal.signal(sig, handler)

        return restore

    def _on_signal(self, sig: signal.Signals) -> None:
        name = sig.name
        log.info("master received %s", name)
        if name == "SIGINT":
            self._interrupts += 1
            self.stop(graceful=self._interrupts == 1)
        elif name == "SIGTERM":
            self.stop()
        elif name == "SIGQUIT":
            self.stop(graceful=False)
        elif name == "SIGTTIN" and not self._stopping:
            self.fork()
        elif name == "SIGTTOU":
            live = [w for w in self._workers.values()
                    if w.is_connected() and not w.exited_after_disconnect]
            if len(live) > 1:
                max(live, key=lambda w: w.id).disconnect()
            else:
                log.warning("SIGTTOU ignored: the last worker stays (stop the master instead)")
        elif name == "SIGHUP" and self._events.get("reload"):
            self.reload()
        elif not self.emit("signal", name):
            log.warning("%s ignored: no plugin handles it", name)

    def _watch_sigchld(self, loop: asyncio.AbstractEventLoop) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False

        def reap_all() -> None:
            for worker in list(self._workers.values()):
                self._reap(worker)

        loop.add_signal_handler(signal.SIGCHLD, reap_all)
        return True

    # -- IPC -------------------------------------------------------------------------

    def _on_frames(self, worker: Worker, frames: list[tuple[int, bytes]]) -> None:
        serialization = self.settings.serialization
        channel = worker._channel
        assert channel is not None
        for kind, payload in frames:
            if channel.closed:
                return
            try:
                if kind == CONTROL:
                    self._on_control(worker, decode_control(payload))
                else:
                    message = decode_message(kind, payload, serialization)
                    worker.emit("message", message)
                    self.emit("message", worker, message)
            except ProtocolError as exc:
                channel.close(exc)
            except StateError as exc:
                channel.close(ProtocolError(f"out-of-order control message: {exc}"))
            except (TypeError, ValueError, OverflowError) as exc:  # a field of the wrong shape
                channel.close(ProtocolError(f"bad control message: {exc!r}"))

    def _on_control(self, worker: Worker, ctl: dict[str, Any]) -> None:
        act = ctl["act"]
        if act == "online":
            worker.state = worker.state.to(WorkerState.ONLINE)
            worker.emit("online")
            self.emit("online", worker)
        elif act == "listen":
            self._on_listen(worker, ctl)
        elif act == "listening":
            address = self._listen_addresses.pop((worker.id, ctl.get("seq", -1)), None)
            if address is None:
                msg = f"'listening' for a listen() that never happened: {ctl!r}"
                raise ProtocolError(msg)
            worker.state = worker.state.to(WorkerState.LISTENING)
            worker.emit("listening", address)
            self.emit("listening", worker, address)
        elif act == "ready":
            worker.emit("ready")
            self.emit("ready", worker)
        elif act == "disconnecting":
            worker.exited_after_disconnect = True
            self._deadline(worker)
        else:
            msg = f"unknown control act {act!r}"
            raise ProtocolError(msg)

    def _on_listen(self, worker: Worker, ctl: dict[str, Any]) -> None:
        seq, host, port = ctl.get("seq"), ctl.get("host"), ctl.get("port")
        path, backlog = ctl.get("path"), ctl.get("backlog")
        if not (
            isinstance(seq, int)
            and (host is None or isinstance(host, str))
            and (port is None or (isinstance(port, int) and 0 <= port <= 65535))
            and (path is None
                 or (isinstance(path, str) and path.startswith("/") and "\0" not in path))
            and (port is None) != (path is None)
            and isinstance(backlog, int)
            and 0 < backlog < 2**31
        ):
            msg = f"malformed listen request: {ctl!r}"
            raise ProtocolError(msg)
        channel = worker._channel
        assert channel is not None
        if self._stopping or worker.exited_after_disconnect:
            channel.write(
                encode_control(
                    "reply", seq=seq, ok=False, errno=0, error="the worker is disconnecting"
                )
            )
            return
        try:
            sock, address = self._listeners.listen(
                worker.id, worker.slot, host, port, path, backlog
            )
        except (OSError, ValueError) as exc:  # ValueError: a path or name the OS refuses
            err = getattr(exc, "errno", None) or errno.EINVAL
            text = getattr(exc, "strerror", None) or str(exc)
            channel.write(encode_control("reply", seq=seq, ok=False, errno=err, error=text))
            return
        self._listen_addresses[worker.id, seq] = address
        channel.write(
            encode_control(
                "reply", seq=seq, ok=True, host=address.host, port=address.port
            ),
            [sock.fileno()],
        )

    def _on_channel_close(self, worker: Worker, error: ProtocolError | None) -> None:
        if error is not None:
            error.worker_id = worker.id
            log.error("worker %d (pid %s) broke the IPC protocol: %s; ending it",
                      worker.id, worker.pid, error)
            worker.kill("SIGKILL")
            self._report(worker, error)
        if worker.exited_after_disconnect is None:
            worker.exited_after_disconnect = False
        worker.state = worker.state.to(WorkerState.DISCONNECTED)
        worker.emit("disconnect")
        self.emit("disconnect", worker)
        if not worker.is_dead():
            self._deadline(worker)

    def _report(self, worker: Worker, error: Exception) -> None:
        handled = False
        if worker._events.get("error"):
            worker.emit("error", error)
            handled = True
        if self._events.get("error"):
            self.emit("error", error)
            handled = True
        if not handled:
            log.error("unhandled error from worker %d: %s", worker.id, error)

    # -- exits -----------------------------------------------------------------------

    def _deadline(self, worker: Worker) -> None:
        """SIGKILL *worker* if it is still alive ``kill_timeout`` seconds from now."""
        if worker.id in self._timers or worker.is_dead():
            return
        if worker.process is not None and worker.process.poll() is not None:
            return  # it has exited; the reap is on its way
        if self._loop is None:
            self._deferred.append(lambda: self._deadline(worker))
            return

        def expire() -> None:
            if not worker.is_dead():
                log.warning("worker %d (pid %s) did not exit within %.1f s; SIGKILL",
                            worker.id, worker.pid, self.settings.kill_timeout)
                worker.kill("SIGKILL")

        self._timers[worker.id] = self._loop.call_later(self.settings.kill_timeout, expire)

    def _reap(self, worker: Worker, *, force: bool = False) -> None:
        process = worker.process
        if process is None or worker.is_dead() or (not worker._attached and not force):
            return  # not attached yet: _attach reaps it first thing, in order after fork
        if process.poll() is None:
            return
        rc = process.returncode
        code, sig = (rc, None) if rc >= 0 else (None, _signal_name(-rc))
        loop = self._loop
        pidfd = self._pidfds.pop(worker.id, None)
        if pidfd is not None:
            if loop is not None:
                loop.remove_reader(pidfd)
            os.close(pidfd)
        timer = self._timers.pop(worker.id, None)
        if timer is not None:
            timer.cancel()
        channel = worker._channel
        assert channel is not None
        channel.read()  # whatever it wrote before dying is delivered before exit
        channel.close(None)  # a grandchild may hold its end; the worker is gone anyway
        if self.settings.silent:
            self._close_output(worker)
        timer = self._timers.pop(worker.id, None)  # again: closing may have set one
        if timer is not None:
            timer.cancel()
        worker.exit_code, worker.signal_code = code, sig
        worker.state = worker.state.to(WorkerState.DEAD)
        if not worker.exited_after_disconnect and rc != 0 and not self._stopping:
            self._abnormal = True
        del self._workers[worker.id]
        self._listeners.release(worker.id)
        for key in [k for k in self._listen_addresses if k[0] == worker.id]:
            del self._listen_addresses[key]
        worker.emit("exit", code, sig)
        self.emit("exit", worker, code, sig)
        if worker.exited_after_disconnect and not any(
            w.slot == worker.slot for w in self._workers.values()
        ):  # a crashed worker's slot keeps its queue for the replacement
            self._listeners.release_slot(worker.slot)
        self._check_done()

    def _shutdown_now(self) -> None:
        """Leave nothing behind: kill and reap any worker still alive, close sockets."""
        self._stopping = True
        for worker in list(self._workers.values()):
            process = worker.process
            if process is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
            self._reap(worker, force=True)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._listeners.close()

    # -- silent output ----------------------------------------------------------------

    def _read_output(self, worker: Worker) -> None:
        loop = self._loop
        assert loop is not None
        for name, stream in self._streams(worker):
            os.set_blocking(stream.fileno(), False)
            self._buffers[worker.id, name] = bytearray()
            loop.add_reader(stream.fileno(), self._on_output, worker, name)

    def _streams(self, worker: Worker) -> list[tuple[str, Any]]:
        process = worker.process
        assert process is not None
        pairs = (("stdout", process.stdout), ("stderr", process.stderr))
        return [(n, s) for n, s in pairs if s is not None and not s.closed]

    def _on_output(self, worker: Worker, name: str, final: bool = False) -> None:
        """Read one stream of a silent worker; emit ``output`` once per whole line."""
        process = worker.process
        assert process is not None and self._loop is not None
        stream = process.stdout if name == "stdout" else process.stderr
        assert stream is not None
        buffer = self._buffers[worker.id, name]
        data: bytes | None = None
        while True:
            try:
                data = os.read(stream.fileno(), 65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if not data:
                break
            buffer += data
        *complete, rest = buffer.split(b"\n")
        lines: list[bytes | bytearray] = list(complete)
        while len(rest) > _LONGEST_LINE:  # a line that never ends is cut, not hoarded
            lines.append(rest[:_LONGEST_LINE])
            rest = rest[_LONGEST_LINE:]
        buffer[:] = rest
        if data == b"" or final:  # EOF, or the worker is dead: the rest is a last line
            self._loop.remove_reader(stream.fileno())
            stream.close()
            del self._buffers[worker.id, name]
            if rest:
                lines.append(bytes(rest))
        for line in lines:
            text = line.decode("utf-8", "replace")
            worker.emit("output", name, text)
            self.emit("output", worker, name, text)

    def _close_output(self, worker: Worker) -> None:
        for name, _ in self._streams(worker):
            self._on_output(worker, name, final=True)


def _signal_name(number: int) -> str:
    """``"SIGKILL"`` for 9; real-time and other unnamed signals as ``"SIG35"``."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


class Timer:
    """A pending :meth:`Master.call_later` call; :meth:`cancel` it to drop it."""

    def __init__(self, release: Callable[[], None]) -> None:
        self.release = release
        self.handle: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        """Drop the call (if it has not run) and stop holding the master."""
        if self.handle is not None:
            self.handle.cancel()
        self.release()
