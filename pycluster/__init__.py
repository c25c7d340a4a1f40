"""pycluster: Node.js's ``cluster`` for Python.

A master process forks worker processes that share server ports. ``Master`` and ``Worker``
are pyee EventEmitters publishing the lifecycle: ``fork``, ``online``, ``listening``,
``message``, ``disconnect``, ``exit``.

In a worker, importing this package connects it to its master. The master-side names
(``Master``, ``Settings``, ``Address``) are imported on first use, so a worker does not pay
for asyncio or attrs unless it uses them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._child import in_template, run_setups, setup
from ._errors import (
    BOOT_FAILURE,
    ChannelClosedError,
    MessageError,
    ProtocolError,
    PyclusterError,
    RequestError,
    SettingsError,
    StateError,
)
from ._listen import SharedSocket
from ._pluginchannel import PluginChannel, WorkerChannel
from ._plugins import Plugin, PluginError
from ._state import WorkerState
from ._thisworker import ThisWorker
from ._worker import Worker

if TYPE_CHECKING:
    from ._master import Master
    from ._serve import serve
    from ._settings import Settings
    from ._sockets import Address
    from ._timers import Timer

__all__ = [
    "BOOT_FAILURE",
    "Address",
    "ChannelClosedError",
    "Master",
    "MessageError",
    "Plugin",
    "PluginChannel",
    "PluginError",
    "ProtocolError",
    "PyclusterError",
    "RequestError",
    "Settings",
    "SettingsError",
    "SharedSocket",
    "StateError",
    "ThisWorker",
    "Timer",
    "Worker",
    "WorkerChannel",
    "WorkerState",
    "__version__",
    "is_master",
    "is_primary",
    "is_worker",
    "serve",
    "worker",
]

__version__ = "0.1.0.dev0"

#: This process's worker (``None`` in the primary).
worker: ThisWorker | None = setup()
#: True in the primary (master) process (false in a fork server's template too).
is_primary: bool = worker is None and not in_template()
#: Same as :data:`is_primary` (Node's older name).
is_master: bool = is_primary
#: True in a worker process.
is_worker: bool = not is_primary

_LAZY = {"Master": "._master", "Settings": "._settings", "Address": "._sockets",
         "Timer": "._timers", "serve": "._serve"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        msg = f"module 'pycluster' has no attribute {name!r}"
        raise AttributeError(msg)
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    value.__module__ = __name__
    globals()[name] = value
    return value


def _public_module() -> None:
    for name in ("ChannelClosedError", "MessageError", "Plugin", "PluginChannel", "PluginError",
                 "ProtocolError", "PyclusterError", "RequestError", "SettingsError",
                 "SharedSocket", "StateError", "ThisWorker", "Worker", "WorkerChannel",
                 "WorkerState"):
        globals()[name].__module__ = __name__


_public_module()

if worker is not None:  # last: a plugin's worker-side hook sees the whole package
    run_setups(worker)
