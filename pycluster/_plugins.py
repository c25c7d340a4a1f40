"""Plugins: objects a master installs, whose listeners it tracks, blames and removes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from ._errors import PyclusterError, SettingsError, StateError

__all__ = [
    "ENTRY_POINT_GROUP",
    "Plugin",
    "PluginError",
    "PluginRegistry",
    "load_plugin",
    "plugin_name",
]

#: (event, listener) pairs a plugin added while it was installed.
Record = list[tuple[str, Callable[..., Any]]]

#: The entry-point group through which plugins are found by name.
ENTRY_POINT_GROUP = "pycluster.plugins"


@runtime_checkable
class Plugin(Protocol):
    """What :meth:`Master.use` accepts (a plain ``function(master)`` works too).

    ``install(master)`` subscribes to the master's events with ``master.on(...)``; every
    listener added during ``install`` belongs to the plugin: an exception it raises becomes
    a :class:`PluginError` ``error`` event naming the plugin, and :meth:`Master.unuse`
    removes it. An optional ``uninstall(master)`` releases anything else (timers, tasks).
    An optional ``name`` attribute names the plugin in errors and logs.
    """

    def install(self, master: Any) -> None:
        """Subscribe to *master*'s events."""


class PluginError(PyclusterError):
    """A plugin's event handler raised; ``__cause__`` is what it raised."""

    def __init__(self, plugin: str, event: str, error: BaseException) -> None:
        super().__init__(f"plugin {plugin!r} failed in its {event!r} handler: {error!r}")
        self.plugin = plugin
        self.event = event


def plugin_name(plugin: Any) -> str:
    """The name a plugin goes by in errors and logs."""
    name = getattr(plugin, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(plugin, "__qualname__", None) or type(plugin).__qualname__


def blame(name: str, event: str, handler: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap *handler* so that what it raises is reported as plugin *name*'s failure."""

    @functools.wraps(handler)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*args, **kwargs)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(name, event, exc) from exc

    return run


def available() -> dict[str, Any]:
    """The plugins installed in this environment, by entry-point name."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_plugin(name: str, options: dict[str, Any]) -> Any:
    """Make the plugin registered as *name*, passing it *options*.

    Raises:
        SettingsError: no plugin has that name (the message lists those that exist), or
            it does not accept *options*.
    """
    found = available()
    entry = found.get(name)
    if entry is None:
        msg = f"no plugin named {name!r}; installed plugins: {', '.join(sorted(found)) or 'none'}"
        raise SettingsError(msg)
    factory = entry.load()
    try:
        return factory(**options)
    except TypeError as exc:
        msg = f"plugin {name!r} does not accept the options {options!r}: {exc}"
        raise SettingsError(msg) from exc


class PluginRegistry:
    """A master's installed plugins, and the listeners each of them added."""

    def __init__(self, remove_listener: Callable[[str, Callable[..., Any]], None]) -> None:
        self._remove_listener = remove_listener
        self._plugins: dict[Any, Record] = {}
        self._installing: tuple[str, Record] | None = None

    @property
    def plugins(self) -> tuple[Any, ...]:
        """The installed plugins, in installation order."""
        return tuple(self._plugins)

    def install(self, master: Any, plugin: Any, options: dict[str, Any]) -> None:
        """Install *plugin* (an object, a function or a registered name) on *master*.

        Raises:
            SettingsError: an unknown name, options with an object, or not a plugin.
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
        record: Record = []
        self._installing = (plugin_name(plugin), record)
        try:
            install(master)
        except BaseException:
            self._remove(record)
            raise
        finally:
            self._installing = None
        self._plugins[plugin] = record

    def uninstall(self, master: Any, plugin: Any) -> None:
        """Remove *plugin*'s listeners, then call its ``uninstall(master)`` if it has one.

        Raises:
            StateError: *plugin* is not installed.
        """
        record = self._plugins.pop(plugin, None)
        if record is None:
            msg = f"plugin {plugin_name(plugin)!r} is not installed on this master"
            raise StateError(msg)
        self._remove(record)
        uninstall = getattr(plugin, "uninstall", None)
        if uninstall is not None:
            uninstall(master)

    def adopt(self, event: str, key: Callable[..., Any], handler: Callable[..., Any]
              ) -> Callable[..., Any]:
        """A listener is being added: while a plugin installs, it is that plugin's (and
        its failures are blamed on it). Returns the handler to register."""
        if self._installing is None:
            return handler
        name, record = self._installing
        record.append((event, key))
        return blame(name, event, handler)

    def _remove(self, record: Record) -> None:
        for event, handler in record:
            self._remove_listener(event, handler)
