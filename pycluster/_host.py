"""What plugins build on: installing them, their channels to workers, their timers.

:class:`PluginHost` is the part of :class:`pycluster.Master` that plugins use beyond the
lifecycle events: ``use``/``unuse``, ``channel()``, ``worker_setup()``,
``call_later``/``call_every`` and ``hold()``. The master supplies the loop and the
bookkeeping behind them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ._emitter import Emitter
from ._errors import SettingsError, StateError
from ._pluginchannel import PluginChannel, check_name
from ._plugins import PluginRegistry
from ._settings import TARGET
from ._timers import Scheduler, Timer, check_delay

if TYPE_CHECKING:
    import asyncio

    from ._worker import Worker

_Host = TypeVar("_Host", bound="PluginHost")

__all__ = ["PluginHost"]


class PluginHost(Emitter):
    """The plugin-facing half of a master (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._registry = PluginRegistry(self.remove_listener)
        self._channels: dict[str, PluginChannel] = {}
        self._scheduler = Scheduler(self._handler_failed)
        self._holds = 0
        self._setups: list[str] = []

    def _soon(self, call: Callable[[], None]) -> None:
        raise NotImplementedError

    def _check_done(self) -> None:
        raise NotImplementedError

    def _finished(self) -> bool:
        raise NotImplementedError

    def _message_limit(self) -> int:
        raise NotImplementedError

    def _request(self, worker: Worker, name: str, data: Any, timeout: float
                 ) -> asyncio.Future[Any]:
        raise NotImplementedError

    def use(self: _Host, plugin: Any, /, **options: Any) -> _Host:
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
        self._registry.install(self, plugin, options)
        return self

    def unuse(self, plugin: Any) -> None:
        """Remove *plugin*: its listeners go, then its ``uninstall(master)`` runs if it has one.

        Raises:
            StateError: *plugin* is not installed.
        """
        self._registry.uninstall(self, plugin)

    @property
    def plugins(self) -> tuple[Any, ...]:
        """The installed plugins, in installation order."""
        return self._registry.plugins

    def _add_event_handler(self, event: str, k: Callable[..., Any], v: Callable[..., Any]) -> None:
        super()._add_event_handler(event, k, self._registry.adopt(event, k, v))

    def channel(self, name: str) -> PluginChannel:
        """The master's end of plugin channel *name* (the same object on every call): a
        plugin's own conversation with its workers, apart from user messages.

        Raises:
            SettingsError: *name* is not a non-empty str.
        """
        check_name(name)
        found = self._channels.get(name)
        if found is None:
            found = self._channels[name] = PluginChannel(self, name)
        return found

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Call ``callback(*args)`` in *delay* seconds, keeping the master running until then.

        For plugins that will fork later (a respawn after a backoff). Before :meth:`run`,
        the delay counts from when the master starts. What *callback* raises becomes an
        ``error`` event. Cancel the returned timer to let the master end.

        Raises:
            SettingsError: *delay* is not a number of seconds >= 0.
            StateError: the master has finished running.
        """
        delay = check_delay("delay", delay)
        self._check_not_finished("call_later")
        return self._scheduler.call_later(delay, self.hold(), callback, args)

    def call_every(self, interval: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Call ``callback(*args)`` every *interval* seconds while the master runs.

        Periodic work for plugins (a watchdog, a resource poll): it does not keep the
        master running by itself, and it ends with the master. Before :meth:`run`, the
        first tick comes *interval* seconds after the master starts. What *callback*
        raises becomes an ``error`` event; the ticks go on.

        Raises:
            SettingsError: *interval* is not a number of seconds > 0.
            StateError: the master has finished running.
        """
        interval = check_delay("interval", interval, positive=True)
        self._check_not_finished("call_every")
        return self._scheduler.call_every(interval, callback, args)

    def _check_not_finished(self, what: str) -> None:
        if self._finished():
            msg = f"{what}() needs a running master (or one not yet run): this one has finished"
            raise StateError(msg)

    def worker_setup(self, spec: str) -> None:
        """Have every worker forked from now on call ``spec`` (``"module:function"``) with
        ``pycluster.worker`` as it starts, before the app's code: the worker-side half of
        a plugin (answering its channel, say). A hook that fails is the worker's boot
        failure. Adding the same hook twice does nothing.

        Raises:
            SettingsError: *spec* is not a ``"module:function"`` string.
        """
        if not isinstance(spec, str) or not TARGET.match(spec):
            msg = f"worker_setup({spec!r}) needs a 'package.module:function' string"
            raise SettingsError(msg)
        if spec not in self._setups:
            self._setups.append(spec)

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

