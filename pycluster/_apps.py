"""Application objects: loading ``module:attr``, telling ASGI from WSGI, serving one.

The worker entry point for ``pycluster run module:app`` is :func:`boot`, run through
``python -m pycluster._boot pycluster._apps:boot OPTIONS-JSON [args...]``. It loads the app,
decides its interface, and hands it to :mod:`pycluster._asgi` (uvicorn) or
:mod:`pycluster._wsgi` (waitress); a ``module:function`` that is neither is called, as
before. Anything that stops the app from loading is one line on stderr and exit code 3
(a boot failure) before the worker listens, so the respawn plugin gives up at once.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import traceback
from typing import Any

import attrs

from ._errors import BOOT_FAILURE, ChannelClosedError, StateError

__all__ = ["BOOT_FAILURE", "AppError", "ServeOptions", "boot", "detect", "listen_or_leave", "load",
           "serve_app"]

INTERFACES = ("auto", "asgi", "wsgi", "main")
HTTP_IMPLEMENTATIONS = ("auto", "h11", "httptools")


class AppError(Exception):
    """The app cannot be loaded or served; the message is the one line the user sees."""


def _one_of(choices: tuple[str, ...]) -> Any:
    def check(_: Any, attribute: Any, value: Any) -> None:
        if value not in choices:
            msg = f"{attribute.name}={value!r} must be one of {', '.join(choices)}"
            raise ValueError(msg)

    return check


def _at_least(low: float, *, optional: bool = False, whole: bool = True) -> Any:
    def check(_: Any, attribute: Any, value: Any) -> None:
        if optional and value is None:
            return
        kinds = (int,) if whole else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not (
            low <= value < float("inf")
        ):
            what = "an int" if whole else "a number"
            msg = f"{attribute.name}={value!r} must be {what} >= {low:g}"
            raise ValueError(msg)

    return check


def _tls_pair(instance: Any, attribute: Any, value: Any) -> None:
    if bool(instance.ssl_keyfile) != bool(value):
        msg = "ssl_keyfile and ssl_certfile go together: give both or neither"
        raise ValueError(msg)


@attrs.frozen(kw_only=True)
class ServeOptions:
    """How a worker serves an application object (the ``pycluster run`` options)."""

    interface: str = attrs.field(default="auto", validator=_one_of(INTERFACES))
    factory: bool = False
    graceful_timeout: float = attrs.field(default=30.0, validator=_at_least(0, whole=False))
    proxy_headers: bool = False
    forwarded_allow_ips: str = "127.0.0.1"
    root_path: str = ""
    keep_alive: int = attrs.field(default=5, validator=_at_least(0))
    limit_concurrency: int | None = attrs.field(default=None,
                                                validator=_at_least(1, optional=True))
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = attrs.field(default=None, validator=_tls_pair)
    http: str = attrs.field(default="auto", validator=_one_of(HTTP_IMPLEMENTATIONS))
    access_log: bool = False
    threads: int = attrs.field(default=4, validator=_at_least(1))

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ServeOptions:
        return cls(**json.loads(text))


def load(spec: str, *, factory: bool = False) -> Any:
    """Import ``module:attr`` (``attr`` may be dotted) and return the object.

    With *factory*, call it with no arguments and return what it returns.

    Raises:
        AppError: the module or attribute is missing, or importing it raised.
    """
    module_name, sep, qualname = spec.partition(":")
    if not sep or not module_name or not qualname:
        msg = f"APP {spec!r} must be 'module:attribute', such as 'main:app'"
        raise AppError(msg)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            msg = f"cannot import {module_name!r} for APP {spec!r}: no module named {exc.name!r}"
            raise AppError(msg) from None
        msg = f"importing {module_name!r} for APP {spec!r} failed: {exc}"
        raise AppError(msg) from exc
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            msg = f"APP {spec!r}: {module_name!r} has no attribute {qualname!r}"
            raise AppError(msg) from None
    if factory:
        if not callable(obj):
            msg = f"--factory: APP {spec!r} is {_kind(obj)}, not a function to call"
            raise AppError(msg)
        obj = obj()
    return obj


def detect(app: Any, interface: str = "auto", name: str = "APP") -> str:
    """Return ``"asgi3"``, ``"asgi2"``, ``"wsgi"`` or ``"main"`` for *app*.

    ``auto`` decides as uvicorn does between ASGI 3 (an async callable) and ASGI 2 (a
    class with ``__await__``), then takes a callable that accepts
    ``(environ, start_response)`` for WSGI and one that takes no arguments for a main
    function (called in each worker, its return value the exit code). An explicit
    *interface* must fit the object.

    Raises:
        AppError: *app* is not an application of that interface (or of any).
    """
    if interface not in INTERFACES:
        msg = f"--interface {interface!r} must be one of {', '.join(INTERFACES)}"
        raise AppError(msg)
    if not callable(app):
        msg = f"{name} is {_kind(app)}: not an ASGI app, a WSGI app nor a function"
        raise AppError(msg)
    is_async = _is_async(app)
    is_asgi2 = inspect.isclass(app) and hasattr(app, "__await__")
    takes2, takes3, takes0 = (_accepts(app, n) for n in (2, 3, 0))
    if interface in ("auto", "asgi"):
        if is_asgi2:
            return "asgi2"
        if is_async and takes3:
            return "asgi3"
    if interface == "asgi":
        if takes3 and not takes2:  # a sync callable returning an awaitable
            return "asgi3"
        looks = "a WSGI app (it is not async and takes 2 arguments)" if takes2 else _kind(app)
        msg = f"--interface asgi: {name} is {looks}; use --interface auto"
        raise AppError(msg)
    if interface in ("auto", "wsgi") and not is_async and takes2:
        return "wsgi"
    if interface == "wsgi":
        looks = "an ASGI app (it is async)" if is_async else _kind(app)
        msg = f"--interface wsgi: {name} is {looks}, not a WSGI app(environ, start_response)"
        raise AppError(msg)
    if not is_async and takes0:
        return "main"
    if interface == "main":
        msg = f"--interface main: {name} is {_kind(app)}, not a function taking no arguments"
        raise AppError(msg)
    msg = (
        f"{name} is {_kind(app)}: not an ASGI app (async (scope, receive, send)), a WSGI app "
        "(environ, start_response) nor a function taking no arguments"
    )
    raise AppError(msg)


def _is_async(app: Any) -> bool:
    if inspect.iscoroutinefunction(app):
        return True
    call = getattr(app, "__call__", None)  # noqa: B004 - the method itself is what we test
    return inspect.iscoroutinefunction(call)


def _accepts(app: Any, count: int) -> bool:
    try:
        inspect.signature(app).bind(*range(count))
    except TypeError:
        return False
    except ValueError:  # no signature (a builtin): give it the benefit of the doubt
        return True
    return True


def _kind(obj: Any) -> str:
    if inspect.ismodule(obj):
        return f"the module {obj.__name__!r}"
    if inspect.isclass(obj):
        return f"the class {obj.__qualname__!r}"
    if inspect.isroutine(obj):
        try:
            signature = str(inspect.signature(obj))
        except (TypeError, ValueError):
            signature = "(...)"
        return f"the function {getattr(obj, '__qualname__', obj)}{signature}"
    text = repr(obj)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(obj).__name__} {text}"


def serve_app(app: Any, options: ServeOptions, interface: str | None = None) -> Any:
    """Serve *app* in this worker until it is disconnected; return the exit code (for a
    main function, what it returns, as ``sys.exit()`` takes it).

    Raises:
        AppError: *app* does not fit ``options.interface``, or a dependency is missing.
    """
    kind = interface or detect(app, options.interface)
    if kind == "main":
        return app()
    if kind in ("asgi3", "asgi2"):
        try:
            from . import _asgi
        except ImportError as exc:
            msg = f"serving an ASGI app needs uvicorn: pip install 'pycluster[asgi]' ({exc})"
            raise AppError(msg) from None
        return _asgi.serve(app, options, asgi2=kind == "asgi2")
    try:
        from . import _wsgi
    except ImportError as exc:
        msg = f"serving a WSGI app needs waitress: pip install 'pycluster[wsgi]' ({exc})"
        raise AppError(msg) from None
    return _wsgi.serve(app, options)


def listen_or_leave(worker: Any) -> Any:
    """The worker's listening socket, or ``None`` if it was disconnected before it could
    listen (the master stopped or replaced it while it started): the server then returns
    0 without serving, rather than ending with a traceback."""
    try:
        return worker.listen()
    except (StateError, ChannelClosedError):
        if worker.is_connected():
            raise
        return None


def _print_app_traceback(exc: BaseException) -> None:
    """The traceback without pycluster's and importlib's frames: only the app's code."""
    import os

    ours = os.path.dirname(os.path.abspath(__file__)) + os.sep
    shown = traceback.TracebackException.from_exception(exc)
    shown.stack = traceback.StackSummary.from_list(
        [f for f in shown.stack if not f.filename.startswith((ours, "<frozen"))
         and "importlib" not in f.filename]
    )
    print("".join(shown.format()), end="", file=sys.stderr, flush=True)


def boot() -> Any:
    """Worker entry for ``pycluster run module:app``.

    ``sys.argv`` is ``[_, OPTIONS-JSON, SPEC, *args]``; the app sees ``[SPEC, *args]``.
    """
    _, options_json, spec, *args = sys.argv
    options = ServeOptions.from_json(options_json)
    sys.argv = [spec, *args]
    try:
        app = load(spec, factory=options.factory)
        kind = detect(app, options.interface, name=f"APP {spec!r}")
    except AppError as exc:
        print(f"pycluster: error: {exc}", file=sys.stderr, flush=True)
        return BOOT_FAILURE
    except Exception as exc:  # the app's module raised while importing: show where, no loop
        _print_app_traceback(exc)
        print(f"pycluster: error: loading APP {spec!r} failed (above)", file=sys.stderr,
              flush=True)
        return BOOT_FAILURE
    try:
        return serve_app(app, options, kind)
    except AppError as exc:
        print(f"pycluster: error: {exc}", file=sys.stderr, flush=True)
        return BOOT_FAILURE


def preload() -> None:
    """Import APP's module without serving it: what the fork server's template runs
    before it forks workers (``start_method="forkserver"``), so they share it."""
    spec = sys.argv[2]
    importlib.import_module(spec.partition(":")[0])


boot.preload = preload  # type: ignore[attr-defined]
