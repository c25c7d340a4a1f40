"""``pycluster status|reload|scale|stop|list``: operate a running cluster over its
control socket (the ``control`` plugin, on under ``pycluster run``)."""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import sys
import time
from typing import Any

__all__ = ["add_commands", "operate"]

_COUNT = re.compile(r"[+-]?[0-9]{1,6}")


def add_commands(commands: Any) -> None:
    """Add the client sub-commands to the ``pycluster`` parser's *commands*."""

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(
            name, help=help, description=description)
        parser.add_argument("--name", metavar="NAME",
                            help="the cluster to act on (needed only when several run)")
        parser.add_argument("--timeout", type=float, metavar="S",
                            help="seconds to wait for the master (default: 10; for reload "
                                 "and stop, as long as it takes)")
        return parser

    status = command("status", "show a running cluster's workers",
                     "Show the workers of a running cluster: id, pid, slot, state, uptime, "
                     "restarts, CPU%%, memory, requests served (where known), last exit.")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    command("reload", "rolling reload of a running cluster",
            "Replace every worker of a running cluster, one slot at a time; wait for the "
            "result and exit 1 if the reload failed.")
    scale = command("scale", "run N workers (or +N / -N more or fewer)",
                    "Set how many workers a running cluster runs; newest workers drain first.")
    scale.add_argument("count", metavar="N", help="worker count, or +N / -N")
    stop = command("stop", "stop a running cluster",
                   "Stop a running cluster gracefully (workers finish their requests) and "
                   "wait until its master has exited.")
    stop.add_argument("--now", action="store_true",
                      help="immediate stop: SIGTERM to every worker")
    listing = command("list", "list this user's running clusters",
                      "List this user's running clusters.")
    listing.add_argument("--json", action="store_true", help="print a JSON list")


def operate(options: argparse.Namespace) -> int:
    """Run one client command; return the exit code (1: the cluster refused or is missing).

    Raises:
        pycluster.SettingsError: a bad argument (a usage error, exit 2).
        pycluster.plugins.control.ControlError: no such cluster, no answer, an error answer.
    """
    import importlib

    from ._errors import SettingsError

    control: Any = importlib.import_module("pycluster.plugins.control")  # the plugin's client

    if options.name is not None:
        control.check_name(options.name)
    if options.timeout is not None and not options.timeout > 0:
        msg = f"--timeout {options.timeout} must be a number of seconds > 0"
        raise SettingsError(msg)
    short = options.timeout or 10.0
    if options.command == "list":
        found = control.clusters(short)
        if options.name is not None:
            found = [c for c in found if c["name"] == options.name]
        if options.json:
            print(json.dumps(found))
        elif found:
            print(_table(["name", "pid", "workers", "uptime", "socket"], [
                [c["name"], c.get("pid") or "-", c.get("workers", "-"),
                 _duration(c.get("uptime")), c["socket"] + (f"  ({c['error']})"
                                                            if "error" in c else "")]
                for c in found]))
        else:
            print("no pycluster cluster of this user is running", file=sys.stderr)
        return 0
    request: dict[str, Any] = {"verb": options.command}
    if options.command == "scale":
        request.update(_scale_request(options.count))
    elif options.command == "stop":
        request["now"] = options.now
    cluster = control.find(options.name, min(short, 10.0))
    path, name = cluster["socket"], cluster["name"]
    slow = options.command in ("reload", "stop")
    result = control.call(path, request, options.timeout if slow else short)
    if options.command == "status":
        print(json.dumps(result) if options.json else _status_table(result))
    elif options.command == "reload":
        print(f"{name}: reloaded, {result['workers']} worker(s) serving")
    elif options.command == "scale":
        print(f"{name}: scaling from {result['from']} to {result['to']} worker(s)")
    elif options.command == "stop":
        print(f"{name}: stopping master pid {result['pid']} and {result['workers']} "
              f"worker(s){' now' if options.now else ''}", flush=True)
        if not _wait_exit(int(result["pid"]), options.timeout):
            print(f"pycluster: error: master pid {result['pid']} still runs after "
                  f"{options.timeout:g} s", file=sys.stderr)
            return 1
        print(f"{name}: stopped")
    return 0


def _scale_request(text: str) -> dict[str, int]:
    from ._errors import SettingsError

    if not _COUNT.fullmatch(text):
        msg = f"scale {text!r}: N must be a whole number of workers, or +N / -N"
        raise SettingsError(msg)
    value = int(text)
    if text[0] in "+-":
        if value == 0:
            msg = f"scale {text!r}: +N / -N must not be zero"
            raise SettingsError(msg)
        return {"delta": value}
    if value < 1:
        msg = f"scale {text!r}: at least one worker must run; to end the cluster: pycluster stop"
        raise SettingsError(msg)
    return {"count": value}


def _wait_exit(pid: int, timeout: float | None) -> bool:
    """Wait until process *pid* has exited (up to *timeout* s); return whether it has."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except (AttributeError, OSError):
        fd = -1
    try:
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if fd >= 0:
                return bool(select.select([fd], [], [], left)[0])
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            if left == 0.0:
                return False
            time.sleep(0.05)  # no pidfd: poll
    finally:
        if fd >= 0:
            os.close(fd)


# -- formatting --------------------------------------------------------------------------


def _duration(seconds: Any) -> str:
    """``12s``, ``5m``, ``3h``, ``2d``: pm2's compact uptimes."""
    if not isinstance(seconds, (int, float)):
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _memory(size: Any) -> str:
    if not isinstance(size, (int, float)):
        return "-"
    return f"{size / (1 << 20):.1f} MiB"


def _last_exit(last: Any) -> str:
    if not isinstance(last, dict):
        return "-"
    how = f"signal {last['signal']}" if last.get("signal") else f"code {last.get('code')}"
    why = " (drained)" if last.get("after_disconnect") else ""
    return f"{how}{why}, {_duration(last.get('ago'))} ago"


def _state(row: dict[str, Any]) -> str:
    state = str(row.get("state"))
    return "draining" if row.get("leaving") and state not in ("dead",) else state


def _status_table(status: dict[str, Any]) -> str:
    head = (f"cluster {status['name']}: master pid {status['pid']}, up "
            f"{_duration(status.get('uptime'))}, {status.get('cpu_percent', '-')}% CPU, "
            f"{_memory(status.get('rss_bytes'))}"
            + (", reloading" if status.get("reloading") else "")
            + (", stopping" if status.get("stopping") else ""))
    rows = [
        [w["id"], w.get("pid") or "-", w.get("slot", "-"), _state(w), _duration(w.get("uptime")),
         w.get("restarts", 0),
         "-" if w.get("cpu_percent") is None else f"{w['cpu_percent']}%",
         _memory(w.get("rss_bytes")),
         "-" if w.get("requests") is None else w["requests"],
         _last_exit(w.get("last_exit"))]
        for w in status["workers"]
    ]
    table = _table(["id", "pid", "slot", "state", "uptime", "restarts", "cpu", "mem",
                    "requests", "last exit"], rows)
    return f"{head}\n{table}"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)
