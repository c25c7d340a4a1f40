"""The logging plugin: lifecycle records on the ``pycluster`` logger with worker id, pid,
event and reason at a level that fits; JSON lines; whole, prefixed lines of worker output.
"""

from __future__ import annotations

import io
import json
import logging
import re

import pytest
from helpers import DEADLINE, Events, Proc, script
from plugin_helpers import Running, drive
from pycluster.plugins.logging import Logging

import pycluster

#: Listens; says hello; on {"do": "exit", "code": n} exits with n.
WORKER = """
    import os, threading, pycluster
    w = pycluster.worker
    done = threading.Event()
    w.on("disconnect", done.set)
    w.on("message", lambda m: os._exit(m["code"]))
    w.listen(0, "127.0.0.1")
    w.send("hello")
    done.wait(60)
"""


class Keep(logging.Handler):
    """Keeps every record."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def pycluster_logger():
    """The ``pycluster`` logger, its level, handlers and propagation restored afterwards."""
    logger = logging.getLogger("pycluster")
    saved = logger.level, logger.propagate, list(logger.handlers)
    try:
        yield logger
    finally:
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers[:] = saved[2]


@pytest.fixture
def records(pycluster_logger):
    """Records of the ``pycluster`` logger (and its children), from a handler of our own."""
    keep = Keep()
    pycluster_logger.addHandler(keep)
    return keep.records


def of(records, event, worker_id=None):
    return [r for r in records if getattr(r, "event", None) == event
            and (worker_id is None or getattr(r, "worker_id", None) == worker_id)]


def test_lifecycle_records_carry_worker_fields_and_fitting_levels(tmp_path, records):
    """fork/online/listening/disconnect/exit records carry worker_id, pid and event; an
    exit by SIGKILL is an ERROR that says "out of memory", a non-zero exit is an ERROR,
    an exit after disconnect and a SIGTERM from the master are INFO; an unexpected
    disconnect is a WARNING."""
    master = pycluster.Master(exec=script(tmp_path, WORKER), kill_timeout=10)
    master.use("logging")
    workers = [master.fork() for _ in range(4)]
    hello = []
    master.on("message", lambda w, m: hello.append(w))

    async def scenario(r: Running):
        await r.until(lambda: len(hello) == 4, "four workers listening")
        workers[0].kill("SIGKILL")
        workers[1].disconnect()
        workers[2].send({"code": 2})
        workers[3].kill("SIGTERM")

    assert drive(master, scenario) == 1  # workers died unexpectedly
    pids = {w.id: w.pid for w in workers}
    for event in ("fork", "online", "listening", "disconnect", "exit"):
        got = of(records, event)
        assert sorted(r.worker_id for r in got) == [1, 2, 3, 4], event
        assert all(r.pid == pids[r.worker_id] and r.name == "pycluster" for r in got), event
        assert all(f"worker {r.worker_id} " in r.getMessage() and str(r.pid) in r.getMessage()
                   for r in got), event
    assert all(re.fullmatch(r"127\.0\.0\.1:\d+", r.address) for r in of(records, "listening"))
    exits = {r.worker_id: r for r in of(records, "exit")}
    assert [(exits[i].levelno, exits[i].code, exits[i].signal, exits[i].reason)
            for i in (1, 2, 3, 4)] == [
        (logging.ERROR, None, "SIGKILL", "unexpectedly"),
        (logging.INFO, 0, None, "after disconnect"),
        (logging.ERROR, 2, None, "unexpectedly"),
        (logging.INFO, None, "SIGTERM", "unexpectedly"),
    ]
    assert "out of memory" in exits[1].getMessage()
    assert "out of memory" not in exits[4].getMessage()
    assert "exited with code 2" in exits[3].getMessage()
    disconnects = {r.worker_id: r.levelno for r in of(records, "disconnect")}
    assert disconnects == {1: logging.WARNING, 2: logging.INFO, 3: logging.WARNING,
                           4: logging.WARNING}
    assert {r.levelno for e in ("fork", "online", "listening") for r in of(records, e)} == {
        logging.INFO}


def test_respawn_and_reload_outcomes_are_logged_with_their_reason(tmp_path, records):
    """respawn_give_up is an ERROR record with worker_id, pid and the reason as a field;
    reloading/reloaded are INFO; reload_failed is an ERROR with the reason."""
    body = """
        import os, threading, pycluster
        w = pycluster.worker
        if w.id >= 3:
            raise SystemExit(3)
        done = threading.Event()
        w.on("disconnect", done.set)
        w.listen(0, "127.0.0.1")
        w.send("hello")
        done.wait(60)
    """
    master = pycluster.Master(exec=script(tmp_path, body), kill_timeout=10)
    master.use("logging").use("respawn").use("reload")
    events = Events(master)
    master.fork()
    rounds = []
    for name in ("reloaded", "reload_failed"):
        master.on(name, lambda *a, n=name: rounds.append(n))

    async def scenario(r: Running):
        await r.until(lambda: events.of("message"), "worker 1 listening")
        master.reload()  # worker 2 replaces worker 1
        await r.until(lambda: rounds == ["reloaded"], "the first reload done")
        master.reload()  # its replacement, worker 3, exits 3 while booting
        await r.until(lambda: rounds == ["reloaded", "reload_failed"], "the reload failed")
        master.fork()  # worker 4 (a new slot) exits 3 while booting: respawn gives up

    assert drive(master, scenario) == 1
    (give_up,) = of(records, "respawn_give_up")
    assert (give_up.levelno, give_up.worker_id) == (logging.ERROR, 4)
    assert give_up.pid == events.of("fork")[3][0].pid
    assert "failed to boot" in give_up.reason
    assert give_up.reason in give_up.getMessage()
    assert [r.levelno for r in of(records, "reloading")] == [logging.INFO] * 2
    assert [r.levelno for r in of(records, "reloaded")] == [logging.INFO]
    (failed,) = of(records, "reload_failed")
    assert failed.levelno == logging.ERROR
    assert "replacement worker 3 died before it was ready (exit code 3)" in failed.reason


def test_json_format_writes_one_json_object_per_line(tmp_path, pycluster_logger):
    """format="json" adds a handler writing each record to the given stream as one line
    of JSON with time, level, logger, message, worker_id, pid, event (and code/signal on
    exit); unuse() removes that handler again."""
    stream = io.StringIO()
    plugin = Logging(format="json", stream=stream)
    master = pycluster.Master(exec=script(tmp_path, WORKER), kill_timeout=10)
    master.use(plugin)
    worker = master.fork()
    master.on("message", lambda w, m: w.kill("SIGKILL"))
    assert drive(master) == 1
    master.unuse(plugin)
    assert pycluster_logger.handlers == []
    lines = stream.getvalue().splitlines()
    entries = [json.loads(line) for line in lines]
    assert len(entries) == len(lines) >= 5
    by_event = {e.get("event"): e for e in entries}
    for event in ("fork", "online", "listening", "disconnect", "exit"):
        entry = by_event[event]
        assert (entry["worker_id"], entry["pid"], entry["logger"]) == (1, worker.pid, "pycluster")
        assert isinstance(entry["time"], float)
        assert entry["message"]
    assert (by_event["exit"]["level"], by_event["exit"]["signal"]) == ("error", "SIGKILL")
    assert "out of memory" in by_event["exit"]["message"]
    assert by_event["fork"]["level"] == "info"


def test_bad_options_are_settings_errors(tmp_path, pycluster_logger):
    """An unknown format or level is a SettingsError naming it; nothing is installed."""
    master = pycluster.Master(exec=script(tmp_path, WORKER))
    with pytest.raises(pycluster.SettingsError, match="format='xml'"):
        master.use("logging", format="xml")
    with pytest.raises(pycluster.SettingsError, match="LOUD"):
        master.use("logging", level="LOUD")
    assert master.plugins == ()


# Each worker writes LINES long lines to stdout, each in two halves with a flush between
# (so the master reads half lines), every 300th to stderr (few: the test reads the
# master's stderr only at the end), then a last line without "\n".
CHATTY = """
    import sys, pycluster
    wid = pycluster.worker.id
    for i in range({lines}):
        line = f"w{{wid}} {{i}} " + "x" * {length} + " end"
        out = sys.stderr if i % 300 == 0 else sys.stdout
        out.write(line[: len(line) // 2])
        out.flush()
        out.write(line[len(line) // 2 :] + "\\n")
        out.flush()
    sys.stdout.write(f"w{{wid}} last line without a newline")
"""

CHATTY_MASTER = """
    import sys, pycluster
    master = pycluster.Master(exec={worker!r}, silent=True)
    master.use("logging", format={format!r})
    master.fork()
    master.fork()
    sys.exit(master.run())
"""


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_silent_output_is_reemitted_as_whole_prefixed_lines(tmp_path, fmt):
    """With silent=True, what two workers write quickly to stdout, in long lines written in
    halves, comes out of the master's stdout one whole line at a time, prefixed
    "[worker N] " (or as JSON with worker_id and stream): no line mixes two workers, none
    is lost or cut, each worker's lines keep their order, and a last line without a
    newline comes out too. stderr lines go to the master's stderr the same way."""
    lines, length = 1500, 2000
    worker = script(tmp_path, CHATTY.format(lines=lines, length=length))
    master = script(tmp_path, CHATTY_MASTER.format(worker=worker, format=fmt), "master.py")
    out = []
    with Proc([master], cwd=tmp_path) as proc:
        assert proc.wait() == 0
        while (line := proc.lines.get(timeout=DEADLINE)) is not None:
            out.append(line)
        err = proc.finish().splitlines()
    whole = re.compile(rf"w(\d+) (\d+) x{{{length}}} end|w(\d+) last line without a newline")

    def parse(line):
        if fmt == "text":
            match = re.fullmatch(r"\[worker (\d+)\] (.*)", line)
            assert match, line[:200]
            return int(match[1]), match[2], None
        entry = json.loads(line)
        return entry["worker_id"], entry["line"], entry["stream"]

    seen = {1: [], 2: []}
    for line in out:
        wid, text, stream = parse(line)
        match = whole.fullmatch(text)
        assert match, f"cut or mixed line: {line[:200]!r}"
        assert int(match[1] or match[3]) == wid, f"worker {wid} printed {line[:200]!r}"
        assert stream in (None, "stdout")
        seen[wid].append(int(match[2]) if match[2] else "last")
    expected = [i for i in range(lines) if i % 300] + ["last"]
    assert seen == {1: expected, 2: expected}
    if fmt == "text":
        from_workers = [parse(line) for line in err if line.startswith("[worker ")]
    else:
        from_workers = [parse(line) for line in err
                        if line.startswith("{") and "stream" in json.loads(line)]
    assert all(stream in (None, "stderr") for _, _, stream in from_workers)
    assert sorted((wid, whole.fullmatch(text)[2]) for wid, text, _ in from_workers) == sorted(
        (wid, str(i)) for wid in (1, 2) for i in range(0, lines, 300))
