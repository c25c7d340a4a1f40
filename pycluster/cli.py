"""The ``pycluster`` command: run an app in a cluster without writing a master.

    pycluster run app.py --workers 4 --bind 127.0.0.1:8000
    pycluster run mypkg.server:main --plugin mypkg-metrics -- --app-flag

Respawn, rolling reload on SIGHUP and logging are on by default.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, cast

from . import __version__
from ._apps import HTTP_IMPLEMENTATIONS, INTERFACES, ServeOptions
from ._child import process_title
from ._errors import PyclusterError
from ._settings import TARGET

__all__ = ["default_name", "default_workers", "main"]



class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would print and sys.exit(2) itself
        raise _UsageError(message)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        parsed, rest = super().parse_known_args(args, namespace)
        if args is not None and "argv" not in vars(parsed):
            parsed.argv = list(args)  # which flags were given (--config must not override them)
        return parsed, rest


def default_workers(environ: dict[str, str] | None = None) -> int:
    """How many workers to run: ``WEB_CONCURRENCY``, else the CPUs this process may use.

    The CPUs are the affinity mask, capped by the cgroup v2 ``cpu.max`` quota (a container
    limited to 2 CPUs on a 48-CPU host gets 2, not 48).
    """
    env = os.environ if environ is None else environ
    value = env.get("WEB_CONCURRENCY")
    if value:
        try:
            count = int(value)
        except ValueError:
            count = 0
        if count < 1:
            msg = f"WEB_CONCURRENCY={value!r} must be a whole number >= 1"
            raise _UsageError(msg)
        return count
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpus()
    return max(1, min(cpus, quota) if quota else cpus)


def _cgroup_cpus(path: str = "/sys/fs/cgroup") -> int | None:
    """CPUs allowed by this process's cgroup v2 ``cpu.max``, or ``None`` if unlimited."""
    try:
        with open("/proc/self/cgroup") as f:
            line = next((x for x in f if x.startswith("0::")), None)
        where = os.path.join(path, line[3:].strip().lstrip("/")) if line else path
        with open(os.path.join(where, "cpu.max")) as f:
            quota, period = f.read().split()
    except (OSError, ValueError, StopIteration):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pycluster",
        description="Run a Python app in a cluster of worker processes that share ports.",
    )
    parser.add_argument("--version", action="version", version=f"pycluster {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run = commands.add_parser(
        "run",
        help="run APP in N workers",
        description=(
            "Run APP in N worker processes. APP is 'module:app', an ASGI app (served by "
            "uvicorn) or a WSGI app (served by waitress); 'module:function', which each "
            "worker calls; or a script path, which each worker runs. A function or script "
            "calls pycluster.worker.listen() with no arguments to listen on the --bind "
            "address. "
            "Respawn, rolling reload on SIGHUP and logging are on. Arguments after '--' go "
            "to the workers (sys.argv[1:])."
        ),
    )
    run.add_argument("app", metavar="APP",
                     help="module:app (an ASGI or WSGI app), module:function, or script.py")
    run.add_argument("-w", "--workers", type=int, metavar="N",
                     help="worker processes (default: $WEB_CONCURRENCY, else the usable CPUs)")
    run.add_argument("-b", "--bind", action="append", metavar="ADDRESS", default=[],
                     help="HOST:PORT or unix:PATH workers listen on (repeatable; "
                          "default 0.0.0.0:$PORT when PORT is set, else 127.0.0.1:8000)")
    run.add_argument("--no-respawn", action="store_true",
                     help="do not replace workers that die unexpectedly")
    run.add_argument("--graceful-timeout", "--kill-timeout", dest="graceful_timeout",
                     type=float, default=30.0, metavar="S",
                     help="seconds a stopping worker gets to finish its requests before "
                          "SIGKILL (default 30)")
    run.add_argument("--log-format", choices=("text", "json"), default="text",
                     help="log lines as text or JSON lines (default text)")
    run.add_argument("--capture-output", action="store_true",
                     help="capture worker stdout/stderr and print it line by line, "
                          "prefixed with the worker id")
    run.add_argument("--scheduling", choices=("shared", "reuseport"), default="shared",
                     help="how workers share a port (default shared)")
    run.add_argument("--plugin", action="append", metavar="NAME", default=[],
                     help="also use the plugin registered as NAME (repeatable)")
    run.add_argument("--name", metavar="NAME",
                     help="the cluster's name, shown by ps in the process titles "
                          "(default: from APP)")
    run.add_argument("--reload", action="store_true",
                     help="development: a rolling reload whenever a *.py file in APP's "
                          "directory changes (needs watchfiles)")
    run.add_argument("--config", metavar="FILE",
                     help="read options from a TOML file (keys are the long option names, "
                          "such as workers = 4 or graceful-timeout = 10); flags win")
    _add_app_options(run)
    return parser


def _add_app_options(run: argparse.ArgumentParser) -> None:
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


def _apply_config(options: argparse.Namespace, path: str) -> None:
    """Set the options *path* (TOML) names, except those given as flags."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        try:
            import tomli as tomllib
        except ImportError:
            msg = f"--config {path!r}: reading TOML needs Python 3.11, or 'pip install tomli'"
            raise _UsageError(msg) from None
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as exc:
        msg = f"--config {path!r}: {exc.strerror}"
        raise _UsageError(msg) from None
    except tomllib.TOMLDecodeError as exc:
        msg = f"--config {path!r}: not valid TOML: {exc}"
        raise _UsageError(msg) from None
    actions = {s: a for a in _run_parser()._actions for s in a.option_strings}
    argv = getattr(options, "argv", [])
    given = {a.dest for token in argv if token.startswith("-")
             if (a := actions.get(token.split("=", 1)[0])) is not None}
    for key, value in table.items():
        flag = "--" + key.replace("_", "-")
        action = actions.get(flag)
        if action is None or key in ("config", "help") or flag == "--version":
            msg = f"--config {path!r}: unknown option {key!r} (keys are long option names)"
            raise _UsageError(msg)
        if action.dest in given:
            continue
        setattr(options, action.dest, _config_value(path, key, action, value))


def _watch_plugin(options: argparse.Namespace) -> Any:
    """The --reload plugin, watching APP's source directory."""
    try:
        import watchfiles  # noqa: F401
    except ImportError:
        msg = "--reload needs watchfiles: pip install 'pycluster[reload]'"
        raise _UsageError(msg) from None
    from ._watch import WatchReload, source_dir

    try:
        return WatchReload([source_dir(options.app, os.getcwd())])
    except ValueError as exc:
        raise _UsageError(str(exc)) from None


def _run_parser() -> argparse.ArgumentParser:
    """The ``run`` sub-parser (argparse lists a parser's actions only privately)."""
    for action in _parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return cast(argparse.ArgumentParser, action.choices["run"])
    raise AssertionError("no run sub-command")  # noqa: EM101 - cannot happen


def _config_value(path: str, key: str, action: argparse.Action, value: Any) -> Any:
    where = f"--config {path!r}: {key} = {value!r}"
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            msg = f"{where} must be true or false"
            raise _UsageError(msg)
        return value
    if isinstance(action, argparse._AppendAction):
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            msg = f"{where} must be a string or a list of strings"
            raise _UsageError(msg)
        return values
    if isinstance(value, (dict, list, bool)):
        msg = f"{where} must be a single value"
        raise _UsageError(msg)
    convert = action.type if callable(action.type) else str
    try:
        converted = convert(value)
    except (TypeError, ValueError):
        msg = f"{where} is not a valid value"
        raise _UsageError(msg) from None
    if isinstance(value, float) and convert is int and converted != value:
        msg = f"{where} must be a whole number"
        raise _UsageError(msg)
    if action.choices is not None and converted not in action.choices:
        msg = f"{where} must be one of {', '.join(map(str, action.choices))}"
        raise _UsageError(msg)
    return converted


def _default_bind(environ: Mapping[str, str] | None = None) -> str:
    """``0.0.0.0:$PORT`` when ``PORT`` is set (Heroku, gunicorn), else ``127.0.0.1:8000``."""
    port = (os.environ if environ is None else environ).get("PORT", "").strip()
    if not port:
        return "127.0.0.1:8000"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        msg = f"PORT={port!r} must be a port number from 0 to 65535"
        raise _UsageError(msg)
    return f"0.0.0.0:{port}"


def _app_settings(options: argparse.Namespace) -> dict[str, Any]:
    """The master settings (``exec`` or ``target``, ``args``) that run APP in each worker."""
    app = options.app
    if options.graceful_timeout < 0 or not math.isfinite(options.graceful_timeout):
        msg = (f"--graceful-timeout/--kill-timeout {options.graceful_timeout} must be a "
               "number of seconds >= 0")
        raise _UsageError(msg)
    if os.path.isfile(app) or app.endswith(".py"):
        if not os.path.isfile(app):
            msg = f"APP {app!r}: no such file"
            raise _UsageError(msg)
        return {"exec": app, "args": options.args}
    if not TARGET.match(app):
        msg = f"APP {app!r} is neither a script path nor 'module:function' (or 'module:app')"
        raise _UsageError(msg)
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
    raise _UsageError(msg)


def _serve_options(options: argparse.Namespace) -> ServeOptions:
    for name in ("keep_alive", "limit_concurrency", "threads"):
        value = getattr(options, name)
        if value is not None and value < (0 if name == "keep_alive" else 1):
            flag = "--" + name.replace("_", "-")
            msg = f"{flag} {value} must be at least {0 if name == 'keep_alive' else 1}"
            raise _UsageError(msg)
    if bool(options.ssl_keyfile) != bool(options.ssl_certfile):
        msg = "--ssl-keyfile and --ssl-certfile go together: give both or neither"
        raise _UsageError(msg)
    for flag, path in (("--ssl-keyfile", options.ssl_keyfile),
                       ("--ssl-certfile", options.ssl_certfile)):
        if path and not os.path.isfile(path):
            msg = f"{flag} {path!r}: no such file"
            raise _UsageError(msg)
        if path and not os.access(path, os.R_OK):
            msg = f"{flag} {path!r}: not readable"
            raise _UsageError(msg)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line *argv* (default ``sys.argv[1:]``); return the exit code.

    Exit codes: what the cluster returns (0 after a clean stop), 1 for a runtime error,
    2 for a usage error (with the reason on stderr, no traceback).
    """
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    worker_args: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, worker_args = argv[:at], argv[at + 1 :]
    try:
        options = parser.parse_args(argv)
        options.args = worker_args
        if options.command is None:
            parser.print_help(sys.stderr)
            return 2
        return _run(options)
    except _UsageError as exc:
        print(f"pycluster: error: {exc}", file=sys.stderr)
        print("Try 'pycluster run --help'.", file=sys.stderr)
        return 2
    except PyclusterError as exc:
        print(f"pycluster: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0


def _run(options: argparse.Namespace) -> int:
    from ._master import Master

    if options.config:
        _apply_config(options, options.config)

    settings: dict[str, Any] = {
        "kill_timeout": options.graceful_timeout,
        "scheduling": options.scheduling,
        "silent": options.capture_output,
        "bind": options.bind or [_default_bind()],
    }
    settings.update(_app_settings(options))
    workers = options.workers if options.workers is not None else default_workers()
    if workers < 1:
        msg = f"--workers {workers} must be at least 1"
        raise _UsageError(msg)
    watch = _watch_plugin(options) if options.reload else None
    settings["name"] = options.name or default_name(options.app)
    master = Master(**settings)
    master.use("logging", format=options.log_format)
    if not options.no_respawn:
        master.use("respawn")
    master.use("reload")
    if watch is not None:
        master.use(watch)
    for name in options.plugin:
        master.use(name)
    listened: list[bool] = []
    stopped: list[bool] = []
    master.once("listening", lambda worker, address: listened.append(True))
    master.once("stop", lambda: stopped.append(True))
    process_title(f"pycluster master [{settings['name']}]")
    try:
        for _ in range(workers):
            master.fork()
    except OSError as exc:  # a --bind address is in use or not ours: no worker started
        print(f"pycluster: error: {exc.strerror or exc}", file=sys.stderr)
        return 1
    code = master.run()
    if master.stop_reason and code:
        print(f"pycluster: stopped: {master.stop_reason}", file=sys.stderr)
    elif not listened and not stopped:
        print("pycluster: warning: every worker exited without listening; does "
              f"{options.app!r} call pycluster.worker.listen()?", file=sys.stderr)
    return code


def default_name(app: str) -> str:
    """The cluster's name when ``--name`` is not given: the script's or module's name."""
    base = os.path.splitext(os.path.basename(app))[0] if app.endswith(".py") else app
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", base.split(":")[0]).strip("-._")
    return name[:64] or "app"
