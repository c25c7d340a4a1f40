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
from collections.abc import Sequence
from typing import Any, cast

from . import __version__
from ._activation import listen_fds
from ._child import process_title
from ._emitter import logger as master_log
from ._errors import PyclusterError
from ._operate import add_commands, operate
from ._plugins import load_plugin, plugin_name
from ._pluginspec import parse_plugin_spec
from ._runopts import UsageError as _UsageError
from ._runopts import add_app_options, app_settings, apply_config, default_bind, watch_plugin

__all__ = ["default_name", "default_workers", "main"]





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
            "address. Respawn, rolling reload on SIGHUP, logging, the control socket and "
            "the reaping of orphans are on, and systemd notification when NOTIFY_SOCKET is "
            "set. Arguments after '--' go "
            "to the workers (sys.argv[1:])."
        ),
    )
    run.add_argument("app", metavar="APP",
                     help="module:app (an ASGI or WSGI app), module:function, or script.py")
    run.add_argument("-w", "--workers", type=int, metavar="N",
                     help="worker processes (default: $WEB_CONCURRENCY, else the usable CPUs)")
    run.add_argument("-b", "--bind", action="append", metavar="ADDRESS", default=[],
                     help="HOST:PORT, unix:PATH or fd://N (an inherited listening socket) "
                          "workers listen on (repeatable; default: the sockets systemd "
                          "passes, else 0.0.0.0:$PORT when PORT is set, else 127.0.0.1:8000)")
    run.add_argument("--no-respawn", action="store_true",
                     help="do not replace workers that die unexpectedly")
    run.add_argument("--graceful-timeout", "--kill-timeout", dest="graceful_timeout",
                     type=float, default=30.0, metavar="S",
                     help="seconds a stopping worker gets to finish its requests before "
                          "SIGKILL (default 30)")
    run.add_argument("--log-format", choices=("text", "json"), default=None,
                     help="every log line as text or as JSON (default text); json also "
                          "captures worker output as JSON lines")
    run.add_argument("--capture-output", action="store_true",
                     help="capture worker stdout/stderr and print it line by line, "
                          "prefixed with the worker id")
    run.add_argument("--scheduling", choices=("shared", "reuseport"), default="shared",
                     help="how workers share a port (default shared)")
    run.add_argument("--plugin", action="append", metavar="NAME[:KEY=VALUE,...]", default=[],
                     help="use the plugin registered as NAME, with options (JSON values), "
                          "e.g. respawn:max_restarts=5,min_delay=0.5 (repeatable; "
                          "also configures the built-ins respawn, reload, logging, systemd, "
                          "reaper, control)")
    run.add_argument("--timeout", type=float, default=0.0, metavar="S",
                     help="kill (after logging its stacks) a worker whose app sent no "
                          "heartbeat for S seconds; respawn replaces it (default 0: off)")
    run.add_argument("--max-requests", type=int, default=0, metavar="N",
                     help="replace a worker gracefully after N requests, as counted by "
                          "pycluster.worker.count_request() (default 0: off)")
    run.add_argument("--max-requests-jitter", type=int, default=0, metavar="J",
                     help="each worker's limit is N plus up to J more, at random")
    run.add_argument("--max-memory", type=float, default=0.0, metavar="MIB",
                     help="replace a worker gracefully once its RSS is over MIB MiB "
                          "(default 0: off)")
    run.add_argument("--max-age", type=float, default=0.0, metavar="S",
                     help="replace a worker gracefully after S seconds (default 0: off)")
    run.add_argument("--start-method", choices=("spawn", "forkserver"), default="spawn",
                     help="spawn: every worker is a fresh interpreter (default); forkserver: "
                          "a template process imports APP ('module:function' only) once and "
                          "forks each worker from it (fast starts, shared memory)")
    run.add_argument("--metrics", metavar="ADDRESS",
                     help="serve /metrics (Prometheus), /healthz and /readyz from the master "
                          "on HOST:PORT (needs prometheus_client for the app's own metrics)")
    run.add_argument("--name", metavar="NAME",
                     help="the cluster's name: its control socket and process titles "
                          "(default: from APP); 'pycluster status --name NAME' finds it")
    run.add_argument("--pid-file", metavar="PATH",
                     help="write the master's pid to PATH (removed at exit)")
    run.add_argument("--reload", action="store_true",
                     help="development: a rolling reload whenever a *.py file in APP's "
                          "directory changes (needs watchfiles)")
    run.add_argument("--config", metavar="FILE",
                     help="read options from a TOML file (keys are the long option names, "
                          "such as workers = 4 or graceful-timeout = 10); flags win")
    add_app_options(run)
    add_commands(commands)
    return parser


def _run_parser() -> argparse.ArgumentParser:
    """The ``run`` sub-parser (argparse lists a parser's actions only privately)."""
    for action in _parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return cast(argparse.ArgumentParser, action.choices["run"])
    raise AssertionError("no run sub-command")  # noqa: EM101 - cannot happen


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
        if options.command != "run":
            return operate(options)
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
    except KeyboardInterrupt:  # Ctrl-C while a client command waits
        return 130


def _run(options: argparse.Namespace) -> int:
    from ._master import Master

    if options.config:
        apply_config(options, options.config, _run_parser())
    plugins = _plugin_options(options.plugin)
    control_options = plugins.pop("control", {})  # always on: --plugin only configures it
    if options.pid_file is not None:
        control_options["pid_file"] = options.pid_file
    log_format = options.log_format or plugins.get("logging", {}).get("format", "text")
    if options.log_format and plugins.get("logging", {}).get("format", log_format) != log_format:
        msg = "--log-format and --plugin logging:format=... disagree; give one of them"
        raise _UsageError(msg)
    if options.no_respawn and "respawn" in plugins:
        msg = "--no-respawn and --plugin respawn contradict each other; give one of them"
        raise _UsageError(msg)
    settings: dict[str, Any] = {
        "kill_timeout": options.graceful_timeout,
        "scheduling": options.scheduling,
        "silent": options.capture_output or log_format == "json",
        "start_method": options.start_method,
    }
    settings["bind"], activation_warning = _bind_addresses(options.bind)
    if options.start_method == "forkserver" and (
        os.path.isfile(options.app) or options.app.endswith(".py")
    ):
        msg = (f"--start-method forkserver needs APP as 'module:function', not the script "
               f"{options.app!r}: a script runs its whole program at import, so the fork "
               "server has nothing it could preload safely")
        raise _UsageError(msg)
    settings.update(app_settings(options))
    workers = options.workers if options.workers is not None else default_workers()
    if workers < 1:
        msg = f"--workers {workers} must be at least 1"
        raise _UsageError(msg)
    _check_guards(options)
    watch = watch_plugin(options) if options.reload else None
    settings["name"] = options.name or default_name(options.app)
    master = Master(**settings)
    plugins["logging"] = {"root": True, **plugins.get("logging", {}), "format": log_format}
    if options.timeout:
        plugins["watchdog"] = {**plugins.get("watchdog", {}), "timeout": options.timeout}
    if options.max_requests or options.max_memory or options.max_age:
        plugins["recycle"] = {**plugins.get("recycle", {}), "max_requests": options.max_requests,
                              "max_requests_jitter": options.max_requests_jitter,
                              "max_memory": options.max_memory, "max_age": options.max_age}
    if options.metrics:
        plugins["metrics"] = {**plugins.get("metrics", {}), "address": options.metrics}
    defaults = ["logging", "respawn", "reaper", "reload"]
    if options.no_respawn:
        defaults.remove("respawn")
    if os.environ.get("NOTIFY_SOCKET"):
        defaults.append("systemd")  # started by systemd with Type=notify
    names = defaults + [name for name in plugins if name not in defaults]
    # every plugin is made (its options checked) before any is installed
    made = [load_plugin(name, plugins.get(name, {})) for name in names]
    control = load_plugin("control", control_options)
    if watch is not None:
        made.append(watch)
    for plugin in made:
        try:  # metrics binds its address here, before any worker forks
            master.use(plugin)
        except OSError as exc:
            print(f"pycluster: error: {exc.strerror or exc}", file=sys.stderr)
            return 1
        if activation_warning and plugin_name(plugin) == "logging":
            master_log().warning("%s", activation_warning)
    listened: list[bool] = []
    stopped: list[bool] = []
    master.once("listening", lambda worker, address: listened.append(True))
    master.once("stop", lambda: stopped.append(True))
    master.use(control)  # a name already taken fails here, before any worker starts
    process_title(f"pycluster master [{settings['name']}]")
    try:
        for _ in range(workers):
            master.fork()
    except OSError as exc:  # a --bind address is in use or not ours: no worker started
        control.close()
        print(f"pycluster: error: {exc.strerror or exc}", file=sys.stderr)
        return 1
    code: int = master.run()
    if master.stop_reason and code:
        print(f"pycluster: stopped: {master.stop_reason}", file=sys.stderr)
    elif not listened and not stopped:
        print("pycluster: warning: every worker exited without listening; does "
              f"{options.app!r} call pycluster.worker.listen()?", file=sys.stderr)
    return code


def _check_guards(options: argparse.Namespace) -> None:
    """Usage errors for the watchdog and recycling options, by their command-line names."""
    for flag, value in (("--timeout", options.timeout), ("--max-memory", options.max_memory),
                        ("--max-age", options.max_age)):
        if not math.isfinite(value) or value < 0:
            unit = "MiB" if flag == "--max-memory" else "seconds"
            msg = f"{flag} {value:g} must be a number of {unit} >= 0 (0 = off)"
            raise _UsageError(msg)
    for flag, count in (("--max-requests", options.max_requests),
                        ("--max-requests-jitter", options.max_requests_jitter)):
        if count < 0:
            msg = f"{flag} {count} must be a whole number >= 0 (0 = off)"
            raise _UsageError(msg)
    if options.max_requests_jitter and not options.max_requests:
        msg = "--max-requests-jitter needs --max-requests (the jitter is added to it)"
        raise _UsageError(msg)


def _plugin_options(specs: list[str]) -> dict[str, dict[str, Any]]:
    """``--plugin`` values by plugin name, in order; the options of a name given twice
    are merged (the later value of a key wins)."""
    found: dict[str, dict[str, Any]] = {}
    for spec in specs:
        name, plugin_options = parse_plugin_spec(spec)
        found.setdefault(name, {}).update(plugin_options)
    return found


def _bind_addresses(binds: list[str]) -> tuple[list[str], str | None]:
    """The ``--bind`` addresses, after the sockets systemd passed (``LISTEN_FDS``) unless
    an ``fd://N`` is given explicitly, or the default (:func:`_default_bind`) when there are
    none; and a warning about inherited sockets meant for another process, if any."""
    inherited, warning = listen_fds()
    if any(b.startswith("fd://") for b in binds):
        inherited = []
    return (inherited + binds) or [default_bind()], warning


def default_name(app: str) -> str:
    """The cluster's name when ``--name`` is not given: the script's or module's name."""
    base = os.path.splitext(os.path.basename(app))[0] if app.endswith(".py") else app
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", base.split(":")[0]).strip("-._")
    return name[:64] or "app"
