"""``pycluster run``'s options for serving an app: what APP is and how it is served, the
default bind address, ``--config`` files and ``--reload``."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

from ._apps import HTTP_IMPLEMENTATIONS, INTERFACES, ServeOptions
from ._settings import TARGET

__all__ = ["UsageError", "add_app_options", "app_settings", "apply_config", "default_bind",
           "watch_plugin"]


class UsageError(Exception):
    """A mistake on the command line: ``pycluster`` exits 2 with the message."""


def add_app_options(run: argparse.ArgumentParser) -> None:
    app = run.add_argument_group("serving an ASGI or WSGI app (APP is module:app)")
    app.add_argument("--interface", choices=INTERFACES, default="auto",
                     help="what APP is: auto detects an ASGI app, a WSGI app or a function "
                          "to call (default auto)")
    app.add_argument("--factory", action="store_true",
                     help="APP is a function that returns the app")
    app.add_argument("--proxy-headers", action="store_true",
                     help="trust X-Forwarded-For/-Proto from --forwarded-allow-ips")
    app.add_argument("--forwarded-allow-ips", metavar="IPS",
                     default=os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1"),
                     help="proxies whose forwarded headers are trusted ('*' for all; "
                          "default $FORWARDED_ALLOW_IPS, else 127.0.0.1)")
    app.add_argument("--root-path", default="", metavar="PATH",
                     help="the path prefix the app is mounted under behind a proxy")
    app.add_argument("--keep-alive", type=int, default=5, metavar="S",
                     help="seconds an idle keep-alive connection stays open (default 5)")
    app.add_argument("--limit-concurrency", type=int, metavar="N",
                     help="connections per worker beyond which new ones get 503")
    app.add_argument("--ssl-keyfile", metavar="FILE", help="TLS private key (ASGI)")
    app.add_argument("--ssl-certfile", metavar="FILE", help="TLS certificate (ASGI)")
    app.add_argument("--http", choices=HTTP_IMPLEMENTATIONS, default="auto",
                     help="uvicorn's HTTP implementation (default auto: httptools if "
                          "installed)")
    app.add_argument("--threads", type=int, default=4, metavar="N",
                     help="request threads per worker for a WSGI app (default 4)")
    app.add_argument("--access-log", action="store_true",
                     help="log one line per request (off by default)")


def apply_config(options: argparse.Namespace, path: str, run: argparse.ArgumentParser) -> None:
    """Set the options *path* (TOML) names, except those given as flags."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        try:
            import tomli as tomllib
        except ImportError:
            msg = f"--config {path!r}: reading TOML needs Python 3.11, or 'pip install tomli'"
            raise UsageError(msg) from None
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as exc:
        msg = f"--config {path!r}: {exc.strerror}"
        raise UsageError(msg) from None
    except tomllib.TOMLDecodeError as exc:
        msg = f"--config {path!r}: not valid TOML: {exc}"
        raise UsageError(msg) from None
    actions = {s: a for a in run._actions for s in a.option_strings}
    argv = getattr(options, "argv", [])
    given = {a.dest for token in argv if token.startswith("-")
             if (a := actions.get(token.split("=", 1)[0])) is not None}
    for key, value in table.items():
        flag = "--" + key.replace("_", "-")
        action = actions.get(flag)
        if action is None or key in ("config", "help") or flag == "--version":
            msg = f"--config {path!r}: unknown option {key!r} (keys are long option names)"
            raise UsageError(msg)
        if action.dest in given:
            continue
        setattr(options, action.dest, _config_value(path, key, action, value))


def watch_plugin(options: argparse.Namespace) -> Any:
    """The --reload plugin, watching APP's source directory."""
    try:
        import watchfiles  # noqa: F401
    except ImportError:
        msg = "--reload needs watchfiles: pip install 'pycluster[reload]'"
        raise UsageError(msg) from None
    from ._watch import WatchReload, source_dir

    try:
        return WatchReload([source_dir(options.app, os.getcwd())])
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _config_value(path: str, key: str, action: argparse.Action, value: Any) -> Any:
    where = f"--config {path!r}: {key} = {value!r}"
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            msg = f"{where} must be true or false"
            raise UsageError(msg)
        return value
    if isinstance(action, argparse._AppendAction):
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            msg = f"{where} must be a string or a list of strings"
            raise UsageError(msg)
        return values
    if isinstance(value, (dict, list, bool)):
        msg = f"{where} must be a single value"
        raise UsageError(msg)
    convert = action.type if callable(action.type) else str
    try:
        converted = convert(value)
    except (TypeError, ValueError):
        msg = f"{where} is not a valid value"
        raise UsageError(msg) from None
    if isinstance(value, float) and convert is int and converted != value:
        msg = f"{where} must be a whole number"
        raise UsageError(msg)
    if action.choices is not None and converted not in action.choices:
        msg = f"{where} must be one of {', '.join(map(str, action.choices))}"
        raise UsageError(msg)
    return converted


def default_bind(environ: Mapping[str, str] | None = None) -> str:
    """``0.0.0.0:$PORT`` when ``PORT`` is set (Heroku, gunicorn), else ``127.0.0.1:8000``."""
    port = (os.environ if environ is None else environ).get("PORT", "").strip()
    if not port:
        return "127.0.0.1:8000"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        msg = f"PORT={port!r} must be a port number from 0 to 65535"
        raise UsageError(msg)
    return f"0.0.0.0:{port}"


def app_settings(options: argparse.Namespace) -> dict[str, Any]:
    """The master settings (``exec`` or ``target``, ``args``) that run APP in each worker."""
    app = options.app
    if options.graceful_timeout < 0 or not math.isfinite(options.graceful_timeout):
        msg = (f"--graceful-timeout/--kill-timeout {options.graceful_timeout} must be a "
               "number of seconds >= 0")
        raise UsageError(msg)
    if os.path.isfile(app) or app.endswith(".py"):
        if not os.path.isfile(app):
            msg = f"APP {app!r}: no such file"
            raise UsageError(msg)
        return {"exec": app, "args": options.args}
    if not TARGET.match(app):
        msg = f"APP {app!r} is neither a script path nor 'module:function' (or 'module:app')"
        raise UsageError(msg)
    _find_module(app)
    serve = _serve_options(options)
    return {"target": "pycluster._apps:boot", "args": [serve.to_json(), app, *options.args]}


def _find_module(app: str) -> None:
    """Fail now, in one line, when APP's top-level module is nowhere to be found."""
    import importlib.machinery

    top = app.partition(":")[0].partition(".")[0]
    if top in sys.modules or importlib.machinery.PathFinder.find_spec(
        top, [os.getcwd(), *sys.path[1:]]
    ) is not None:
        return
    msg = f"APP {app!r}: no module named {top!r} in {os.getcwd()!r} or on sys.path"
    raise UsageError(msg)


def _serve_options(options: argparse.Namespace) -> ServeOptions:
    for name in ("keep_alive", "limit_concurrency", "threads"):
        value = getattr(options, name)
        if value is not None and value < (0 if name == "keep_alive" else 1):
            flag = "--" + name.replace("_", "-")
            msg = f"{flag} {value} must be at least {0 if name == 'keep_alive' else 1}"
            raise UsageError(msg)
    if bool(options.ssl_keyfile) != bool(options.ssl_certfile):
        msg = "--ssl-keyfile and --ssl-certfile go together: give both or neither"
        raise UsageError(msg)
    for flag, path in (("--ssl-keyfile", options.ssl_keyfile),
                       ("--ssl-certfile", options.ssl_certfile)):
        if path and not os.path.isfile(path):
            msg = f"{flag} {path!r}: no such file"
            raise UsageError(msg)
        if path and not os.access(path, os.R_OK):
            msg = f"{flag} {path!r}: not readable"
            raise UsageError(msg)
    return ServeOptions(
        interface=options.interface,
        factory=options.factory,
        graceful_timeout=options.graceful_timeout,
        proxy_headers=options.proxy_headers,
        forwarded_allow_ips=options.forwarded_allow_ips,
        root_path=options.root_path,
        keep_alive=options.keep_alive,
        limit_concurrency=options.limit_concurrency,
        ssl_keyfile=os.path.abspath(options.ssl_keyfile) if options.ssl_keyfile else None,
        ssl_certfile=os.path.abspath(options.ssl_certfile) if options.ssl_certfile else None,
        http=options.http,
        access_log=options.access_log,
        threads=options.threads,
    )
