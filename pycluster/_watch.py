"""``pycluster run --reload``: a rolling reload whenever a source file changes.

A plugin that watches directories with watchfiles (the ``reload`` extra) on the master's
loop and calls ``master.reload()`` after each batch of changed ``*.py`` files. The
rolling reload forks each replacement before it disconnects the old worker, so the
developer never sees a refused connection; a replacement that fails to boot (an edit
that breaks the app) ends the reload, the old workers keep serving and the error is
shown once.
"""

from __future__ import annotations

import asyncio
import importlib.machinery
import logging
import os
import sysconfig
from collections.abc import Sequence
from typing import Any

__all__ = ["WatchReload", "source_dir"]

log = logging.getLogger("pycluster.watch")


def source_dir(app: str, cwd: str) -> str:
    """The directory to watch for APP (``script.py`` or ``module:attr``).

    Raises:
        ValueError: APP's module is not a source file of its own (installed in
            site-packages, a built-in or an extension module): there is nothing to edit.
    """
    if ":" not in app:
        return os.path.dirname(os.path.abspath(app))
    top = app.partition(":")[0].partition(".")[0]
    spec = importlib.machinery.PathFinder.find_spec(top, [cwd, *_sys_path()])
    origin = spec.origin if spec is not None else None
    if origin is None and spec is not None and spec.submodule_search_locations:
        origin = os.path.join(list(spec.submodule_search_locations)[0], "__init__.py")
    if origin is None or not origin.endswith(".py"):
        msg = f"--reload: APP {app!r} has no source file to watch"
        raise ValueError(msg)
    installed = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    path = os.path.realpath(origin)
    if any(path.startswith(os.path.realpath(d) + os.sep) for d in installed):
        msg = (f"--reload: APP {app!r} is an installed package ({os.path.dirname(path)}); "
               "install it editable (pip install -e) or run it from its source tree")
        raise ValueError(msg)
    folder = os.path.dirname(path)
    if spec is not None and spec.submodule_search_locations:
        folder = os.path.dirname(folder)  # a package: its parent holds it
    return folder


def _short(path: str, cwd: str) -> str:
    return path[len(cwd) + 1 :] if path.startswith(cwd + os.sep) else path


def _sys_path() -> list[str]:
    import sys

    return sys.path[1:]


class WatchReload:
    """Reload the cluster (``master.reload()``) when a ``*.py`` file under *paths* changes."""

    name = "watch-reload"

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._master: Any = None
        self._cwd = ""

    def install(self, master: Any) -> None:
        self._master = master
        master.on("setup", self._start)
        master.on("stop", self._end)

    def uninstall(self, master: Any) -> None:
        self._end()

    def _start(self, settings: Any) -> None:
        self._cwd = os.getcwd()
        self._stop = asyncio.Event()
        self._task = asyncio.ensure_future(self._watch(self._stop))
        log.info("watching %s for changes to *.py files", ", ".join(self.paths))

    def _end(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._task is not None:
            self._task.cancel()

    async def _watch(self, stop: asyncio.Event) -> None:
        from watchfiles import PythonFilter, awatch

        async for changes in awatch(*self.paths, watch_filter=PythonFilter(),
                                    stop_event=stop, debounce=400):
            names = sorted({_short(path, self._cwd) for _, path in changes})
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            log.info("%s changed: rolling reload", shown)
            self._master.reload()
