"""The master's signals: the handler only queues; the loop calls ``handle_<signame>()``."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._emitter import logger

if TYPE_CHECKING:
    import asyncio

    from ._master import Master

__all__ = ["SIGNALS", "Signals"]

log = logger()

#: The signals a running master handles.
SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGTTIN", "SIGTTOU", "SIGUSR1", "SIGUSR2")


class Signals:
    """Gunicorn's vocabulary: TERM and INT graceful stop (a second INT: immediate), QUIT
    immediate stop, HUP rolling reload, TTIN/TTOU one worker more/less. Any other (USR1,
    USR2, HUP with no reload plugin) is a ``signal(name)`` event for plugins."""

    def __init__(self, master: Master) -> None:
        self._master = master
        self._interrupts = 0

    def install(self, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
        """Handle :data:`SIGNALS` on *loop* (main thread only); return what undoes it."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {}
        for name in SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                previous[sig] = signal.getsignal(sig)
                loop.add_signal_handler(sig, self.dispatch, sig)

        def restore() -> None:
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)
                with contextlib.suppress(TypeError, ValueError):
                    signal.signal(sig, handler)

        return restore

    def dispatch(self, sig: signal.Signals) -> None:
        """Act on *sig* (on the loop, never inside the signal handler)."""
        log.info("master received %s", sig.name)
        handle = getattr(self, f"handle_{sig.name.lower()}", None)
        acted = handle is not None and handle()
        if not acted and not self._master.emit("signal", sig.name):
            log.warning("%s ignored: no plugin handles it", sig.name)

    # Each returns whether it acted; if not, the signal becomes a ``signal`` event.

    def handle_sigterm(self) -> bool:
        self._master.stop()
        return True

    def handle_sigint(self) -> bool:
        self._interrupts += 1
        self._master.stop(graceful=self._interrupts == 1)
        return True

    def handle_sigquit(self) -> bool:
        self._master.stop(graceful=False)
        return True

    def handle_sighup(self) -> bool:
        if not self._master.has_listeners("reload"):
            return False
        self._master.reload()
        return True

    def handle_sigttin(self) -> bool:
        master = self._master
        if not master.stopping:
            master.scale(master.size + 1)
        return True

    def handle_sigttou(self) -> bool:
        master = self._master
        if master.size > 1:
            master.scale(master.size - 1)
        else:
            log.warning("SIGTTOU ignored: the last worker stays (stop the master instead)")
        return True
