"""``systemd``: tell a service manager how the cluster is doing (``Type=notify``).

The ``sd_notify`` protocol is one datagram per message to the ``AF_UNIX`` socket named
in ``NOTIFY_SOCKET`` (a leading ``@`` names an abstract socket), each message a few
``KEY=VALUE`` lines. Standard library only.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from typing import Any

from pycluster import Master, SettingsError, Timer, Worker

__all__ = ["Systemd", "notify_address"]

log = logging.getLogger("pycluster.systemd")

_WAIT_FOR = ("listening", "ready", "online")


def notify_address(value: str) -> str | bytes:
    """The address to send to for a ``NOTIFY_SOCKET`` value: a path, or for ``@name``
    the abstract name (a NUL byte first).

    Raises:
        SettingsError: *value* is empty, or not a path or an ``@`` name (``vsock:`` is
            not supported).
    """
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return value
    msg = (
        f"NOTIFY_SOCKET={value!r} is not a socket path or an @abstract name "
        "(vsock addresses are not supported)"
    )
    raise SettingsError(msg)


class Systemd:
    """Report the cluster's state to systemd (or anything speaking ``sd_notify``).

    - ``READY=1`` once every worker forked before the master ran is ready (its first
      ``listening``, by default), with a ``STATUS=`` line saying how many serve;
    - ``RELOADING=1`` with ``MONOTONIC_USEC=`` when a rolling reload starts (the reload
      plugin's ``reloading``), ``READY=1`` when it ends (``reloaded``, or
      ``reload_failed``: the old workers still serve), so ``Type=notify-reload`` and
      ``systemctl reload`` wait for the real end;
    - ``STOPPING=1`` when the master stops; ``STATUS=`` lines on the way (a worker that
      died unexpectedly, a reload that failed);
    - ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` while the master's loop turns, when
      systemd set ``WatchdogSec=`` (and ``WATCHDOG_PID``, if set, is this process): a
      master whose loop hangs is restarted.

    Without ``NOTIFY_SOCKET`` it does nothing. The variables are removed from the
    environment once read, so workers do not notify on their own. A send that fails
    (the socket is gone, full, refused) is logged once and never stops the master.
    ``pycluster run`` installs it by itself when ``NOTIFY_SOCKET`` is set.

    Args:
        socket_path: where to send (default: ``$NOTIFY_SOCKET``).
        wait_for: what makes a worker count as ready for ``READY=1``: ``"listening"``,
            ``"ready"`` (``pycluster.worker.ready()``) or ``"online"`` (apps that never
            listen).
        watchdog: ``True``/``False`` to force the keep-alive pings on or off; default
            ``None`` follows ``WATCHDOG_USEC``.
        watchdog_interval: seconds between ``WATCHDOG=1`` pings when *watchdog* is
            ``True`` without ``WATCHDOG_USEC`` (default: half of ``WATCHDOG_USEC``).
    """

    name = "systemd"

    def __init__(self, *, socket_path: str | None = None, wait_for: str = "listening",
                 watchdog: bool | None = None, watchdog_interval: float | None = None) -> None:
        if wait_for not in _WAIT_FOR:
            msg = f"systemd wait_for={wait_for!r} must be one of {', '.join(map(repr, _WAIT_FOR))}"
            raise SettingsError(msg)
        if watchdog is not None and not isinstance(watchdog, bool):
            msg = f"systemd watchdog={watchdog!r} must be True, False or None"
            raise SettingsError(msg)
        if watchdog_interval is not None and (
            isinstance(watchdog_interval, bool)
            or not isinstance(watchdog_interval, (int, float))
            or not 0 < watchdog_interval < float("inf")
        ):
            msg = f"systemd watchdog_interval={watchdog_interval!r} must be seconds > 0"
            raise SettingsError(msg)
        env = os.environ
        raw = socket_path if socket_path is not None else env.get("NOTIFY_SOCKET")
        self.address = notify_address(raw) if raw else None
        self.wait_for = wait_for
        self.interval = self._watchdog_interval(watchdog, watchdog_interval)
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(name, None)  # the workers are not the service's main process
        self._sock: socket.socket | None = None
        self._failed = False
        self._master: Master | None = None
        self._initial: set[int] = set()
        self._ready_ids: set[int] = set()
        self._announced = False
        self._timer: Timer | None = None

    @staticmethod
    def _watchdog_interval(forced: bool | None, interval: float | None) -> float | None:
        if forced is False:
            return None
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        ours = not pid or (pid.isdigit() and int(pid) == os.getpid())
        if interval is not None:
            return float(interval) if forced or (usec and ours) else None
        if usec.isdigit() and int(usec) > 0 and ours:
            return int(usec) / 2e6
        if forced:
            msg = "systemd watchdog=True needs WATCHDOG_USEC or a watchdog_interval"
            raise SettingsError(msg)
        if usec and not usec.isdigit():
            log.warning("WATCHDOG_USEC=%r is not a number of microseconds; no watchdog pings",
                        usec)
        elif usec and not ours:
            log.info("WATCHDOG_PID=%s is not this process: no watchdog pings", pid)
        return None

    def install(self, master: Master) -> None:
        """Follow *master*'s lifecycle and its reload plugin's events."""
        self._master = master
        if self.address is None:
            log.debug("NOTIFY_SOCKET is not set: nothing to notify")
            return
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)
        master.on("setup", self._on_setup)
        master.on(self.wait_for, self._on_worker_ready)
        master.on("exit", self._on_exit)
        master.on("reloading", self._on_reloading)
        master.on("reloaded", lambda: self._after_reload("reload finished"))
        master.on("reload_failed", lambda reason: self._after_reload(f"reload failed: {reason}"))
        master.on("stop", self._on_stop)
        if self.interval is not None:
            self._timer = master.call_every(self.interval, self._ping)

    def uninstall(self, master: Master) -> None:
        """Stop the watchdog pings and close the socket."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def notify(self, **fields: str) -> bool:
        """Send one ``sd_notify`` message (``READY="1"``, ``STATUS="..."``); return
        whether it went. A failure is logged once, at WARNING, and never raises."""
        sock = self._sock
        if sock is None or self.address is None:
            return False
        data = "\n".join(f"{key}={value}" for key, value in fields.items()) + "\n"
        try:
            sock.sendto(data.encode("utf-8", "replace"), self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                where = self.address if isinstance(self.address, str) else "@" + os.fsdecode(
                    self.address[1:])
                log.warning("cannot notify systemd at %s: %s (further failures are not logged)",
                            where, exc.strerror or exc,
                            extra={"event": "notify_failed", "reason": errno.errorcode.get(
                                exc.errno or 0, str(exc))})
            return False
        return True

    def _ping(self) -> None:
        self.notify(WATCHDOG="1")

    # -- the cluster's lifecycle --------------------------------------------------------

    def _on_setup(self, settings: Any) -> None:
        master = self._master
        assert master is not None
        self._initial = set(master.workers)
        self.notify(STATUS=f"starting {len(self._initial)} worker(s)")
        self._check_ready()

    def _on_worker_ready(self, worker: Worker, *_: Any) -> None:
        self._ready_ids.add(worker.id)
        self._check_ready()

    def _check_ready(self) -> None:
        master = self._master
        if self._announced or master is None or master.stopping:
            return
        # as many slots as there were initial workers have a ready worker (a respawned
        # worker counts for its slot); with none forked before run(), the first one
        slots = {w.slot for w in master.workers.values() if w.id in self._ready_ids}
        if slots and len(slots) >= len(self._initial):
            self._announced = True
            self.notify(READY="1", STATUS=self._status())

    def _on_exit(self, worker: Worker, code: int | None, signal: str | None) -> None:
        self._ready_ids.discard(worker.id)
        master = self._master
        if master is None or master.stopping or worker.exited_after_disconnect:
            return
        how = f"signal {signal}" if signal else f"exit code {code}"
        self.notify(STATUS=f"worker {worker.id} died ({how}); {self._status()}")

    def _on_reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify(RELOADING="1", MONOTONIC_USEC=str(usec), STATUS="reloading")

    def _after_reload(self, what: str) -> None:
        master = self._master
        if master is None or master.stopping:
            return
        self.notify(READY="1", STATUS=f"{what}; {self._status()}")

    def _on_stop(self) -> None:
        self.notify(STOPPING="1", STATUS="stopping")

    def _status(self) -> str:
        master = self._master
        assert master is not None
        serving = sum(1 for w in master.workers.values()
                      if w.id in self._ready_ids and w.is_active())
        return f"{serving} worker(s) {'serving' if self.wait_for != 'online' else 'running'}"
