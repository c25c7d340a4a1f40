"""``pycluster.serve(app)``: what ``pycluster run main:app`` does, from Python.

The same call runs in the master and in every worker, as the rest of pycluster's API:
in the master it forks the workers (each re-runs the main program, as ``Master()``
does) and supervises them until the cluster stops; in a worker it serves *app* until
the worker is disconnected. Either way it returns the process's exit code::

    app = FastAPI()
    ...
    if __name__ == "__main__":
        raise SystemExit(pycluster.serve(app, workers=4, bind="0.0.0.0:8000"))
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import attrs

from ._apps import BOOT_FAILURE, AppError, ServeOptions, detect, load, serve_app
from ._errors import SettingsError

__all__ = ["serve"]


def serve(
    app: Any,
    *,
    workers: int | None = None,
    bind: str | Iterable[str] | None = None,
    respawn: bool = True,
    log_format: str = "text",
    plugins: Iterable[str] = (),
    **options: Any,
) -> Any:
    """Serve an ASGI or WSGI *app* in a cluster of workers; return the exit code.

    Args:
        app: the application object (ASGI 3 or 2, or WSGI), a function each worker calls
            (``interface="main"``), or ``"module:attr"`` naming one (then workers import
            it instead of re-running the main program).
        workers: how many (default ``$WEB_CONCURRENCY``, else the CPUs this process may use).
        bind: ``"HOST:PORT"``, ``":PORT"`` or ``"unix:PATH"``, or several (default
            ``0.0.0.0:$PORT`` when ``PORT`` is set, else ``127.0.0.1:8000``).
        respawn: replace workers that die unexpectedly.
        log_format: ``"text"`` or ``"json"`` for the master's lifecycle log.
        plugins: names of more plugins to use.
        **options: as ``pycluster run``'s, in snake case: ``interface``, ``factory``,
            ``graceful_timeout``, ``proxy_headers``, ``forwarded_allow_ips``,
            ``root_path``, ``keep_alive``, ``limit_concurrency``, ``ssl_keyfile``,
            ``ssl_certfile``, ``http``, ``access_log``, ``threads``.

    Returns:
        In the master, what ``Master.run()`` returns (0 after a clean stop, 1 when the
        cluster failed, e.g. the app could not boot). In a worker, its exit code (3 when
        the app could not be served). For a main function, what it returned.

    Raises:
        SettingsError: an unknown option or a bad value; in the master, an *app* object
            that is not an application (a string is checked in the workers).
    """
    known = {f.name for f in attrs.fields(ServeOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        msg = f"pycluster.serve() got unknown option(s) {', '.join(unknown)}; known: " + (
            ", ".join(sorted(known)))
        raise SettingsError(msg)
    try:
        settings = ServeOptions(**options)
    except (TypeError, ValueError) as exc:
        raise SettingsError(str(exc)) from None
    import pycluster

    if pycluster.worker is not None:
        return _serve_here(app, settings)
    return _supervise(app, settings, workers, bind, respawn, log_format, plugins)


def _serve_here(app: Any, options: ServeOptions) -> Any:
    try:
        if isinstance(app, str):
            app = load(app, factory=options.factory)
        elif options.factory:
            app = app()
        return serve_app(app, options)
    except AppError as exc:
        print(f"pycluster: error: {exc}", file=sys.stderr, flush=True)
        return BOOT_FAILURE


def _supervise(app: Any, options: ServeOptions, workers: int | None,
               bind: str | Iterable[str] | None, respawn: bool, log_format: str,
               plugins: Iterable[str]) -> int:
    from ._master import Master
    from ._runopts import UsageError, default_bind
    from .cli import default_workers

    try:
        count = default_workers() if workers is None else workers
        addresses = [bind] if isinstance(bind, str) else list(bind or [default_bind()])
    except UsageError as exc:
        raise SettingsError(str(exc)) from None
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        msg = f"workers={workers!r} must be an int >= 1"
        raise SettingsError(msg)
    settings: dict[str, Any] = {"bind": addresses, "kill_timeout": options.graceful_timeout}
    if isinstance(app, str):
        settings.update(target="pycluster._apps:boot", args=[options.to_json(), app])
    elif not options.factory:
        try:
            detect(app, options.interface, name="app")
        except AppError as exc:
            raise SettingsError(str(exc)) from None
    master = Master(**settings)
    master.use("logging", format=log_format)
    if respawn:
        master.use("respawn")
    master.use("reload")
    for name in plugins:
        master.use(name)
    for _ in range(count):
        master.fork()
    return master.run()
