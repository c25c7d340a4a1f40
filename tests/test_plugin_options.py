"""Plugins from the command line: ``--plugin NAME:KEY=VALUE,...`` configures built-in and
third-party plugins; ``--log-format json`` makes every line JSON, third-party loggers and
worker output included; each event is logged once."""

from __future__ import annotations

import json
import os
import signal

import pytest
from helpers import Proc, script

from pycluster import SettingsError, cli
from pycluster._pluginspec import parse_plugin_spec

#: Listens on the --bind address; on disconnect, exits. Logs one JSON line of its own
#: and prints one plain line.
APP = """
    import json, sys, threading, pycluster
    done = threading.Event()
    pycluster.worker.on("disconnect", done.set)
    pycluster.worker.listen()
    print("plain line from a worker", flush=True)
    print(json.dumps({"message": "worker's own JSON", "level": "info"}), flush=True)
    done.wait(60)
"""

#: A third-party plugin with options, logging on its own logger (not under pycluster).
GREETER = """
    import logging

    class Greeter:
        name = "greeter"

        def __init__(self, *, greeting="hello", times=1, tags=()):
            if not isinstance(times, int):
                raise TypeError(f"times={times!r} must be an int")
            self.greeting, self.times, self.tags = greeting, times, list(tags)

        def install(self, master):
            log = logging.getLogger("greeter")
            log.warning("%s x%d %s", self.greeting, self.times, self.tags)
            master.on("listening", lambda w, a: log.info("greeted worker %d", w.id))
"""


@pytest.fixture
def greeter(tmp_path):
    """A third-party plugin 'greeter', registered in the pycluster.plugins entry-point
    group of a distribution found on PYTHONPATH=tmp_path."""
    script(tmp_path, GREETER, "greeter.py")
    info = tmp_path / "greeter-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: greeter\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[pycluster.plugins]\ngreeter = greeter:Greeter\n")
    return {"PYTHONPATH": str(tmp_path)}


@pytest.mark.parametrize(("spec", "expected"), [
    ("respawn", ("respawn", {})),
    ("respawn:max_restarts=5,min_delay=0.5", ("respawn", {"max_restarts": 5, "min_delay": 0.5})),
    ("respawn:stop_exit_codes=[0,3]", ("respawn", {"stop_exit_codes": [0, 3]})),
    ("logging:level=DEBUG", ("logging", {"level": "DEBUG"})),
    ('x:text="a, b",flag=true,none=null', ("x", {"text": "a, b", "flag": True, "none": None})),
    ("x:py=True,obj={\"a\":[1,2]}", ("x", {"py": True, "obj": {"a": [1, 2]}})),
    ("my-plugin.v2:n=-1", ("my-plugin.v2", {"n": -1})),
])
def test_spec_values_are_json_or_plain_strings(spec, expected):
    """NAME:KEY=VALUE,... gives the name and options: JSON values (lists and objects may
    hold commas), Python's True/False/None, anything else a plain string."""
    assert parse_plugin_spec(spec) == expected


@pytest.mark.parametrize(("spec", "message"), [
    (":a=1", "'' is not a plugin name"),
    ("respawn:5", "'5' is not KEY=VALUE"),
    ("respawn:max-restarts=5", "'max-restarts=5' is not KEY=VALUE"),
    ("respawn:a=1,a=2", "option 'a' is given twice"),
    ("respawn:a=[1,2", "unbalanced ']'"),
    ('respawn:a="x', "unbalanced quote"),
    ("respawn:a=1.2.3", "'1.2.3' is not a valid value"),
    ("respawn:a={b:1}", "'{b:1}' is not a valid value"),
])
def test_bad_specs_say_what_is_wrong(spec, message):
    """A malformed --plugin value is a SettingsError quoting the spec and the part that
    is wrong."""
    with pytest.raises(SettingsError) as info:
        parse_plugin_spec(spec)
    assert f"--plugin {spec!r}" in str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize(("argv", "message"), [
    (["--plugin", "respawn:max_restarts=x"], "respawn max_restarts='x' must be an int"),
    (["--plugin", "respawn:bogus=1"], "plugin 'respawn' does not accept the options"),
    (["--plugin", "reload:wait_for=soon"], "reload wait_for='soon'"),
    (["--plugin", "respawn:5"], "'5' is not KEY=VALUE"),
    (["--no-respawn", "--plugin", "respawn:max_restarts=1"], "contradict each other"),
    (["--log-format", "json", "--plugin", "logging:format=text"], "disagree"),
    (["--plugin", "reaper:interval=0"], "reaper interval=0 must be"),
    (["--plugin", "systemd:wait_for=never"], "systemd wait_for='never'"),
])
def test_bad_plugin_options_exit_2_and_install_nothing(tmp_path, monkeypatch, capsys, argv,
                                                       message):
    """Options a plugin refuses exit 2 with its message and no traceback; every plugin
    is made before any is installed, so nothing (the root logger included) was touched."""
    import logging

    script(tmp_path, "import pycluster\n", "app.py")
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    before = list(root.handlers), root.level
    assert cli.main(["run", "app.py", "-b", "127.0.0.1:0", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert (list(root.handlers), root.level) == before


def test_options_reach_a_builtin_plugin(tmp_path):
    """--plugin respawn:max_restarts=0 configures the default respawn (not a second one):
    the first crash after listening makes it give up, saying max_restarts=0; exit 1."""
    app = script(tmp_path, """
        import os, pycluster
        pycluster.worker.listen()
        os._exit(5)
    """, "app.py")
    argv = ["-m", "pycluster", "run", app, "-w", "1", "-b", "127.0.0.1:0",
            "--plugin", "respawn:max_restarts=0,fail_fast=false"]
    with Proc(argv, cwd=tmp_path) as proc:
        assert proc.wait() == 1
    stderr = proc.finish()
    gave_up = [line for line in stderr.splitlines() if "respawn gives up" in line]
    assert len(gave_up) == 1, stderr
    assert "(max_restarts=0)" in gave_up[0]


def test_json_means_every_line_is_json(tmp_path, greeter):
    """With --log-format json and a third-party plugin given options on the command
    line, every line on stdout and stderr is a JSON object: pycluster's records, the
    plugin's own logger's (with its options in the message), a worker's plain print
    (wrapped, with worker_id) and a worker's own JSON line (kept, worker_id added)."""
    app = script(tmp_path, APP, "app.py")
    argv = ["-m", "pycluster", "run", app, "-w", "1", "-b", "127.0.0.1:0", "--log-format",
            "json", "--plugin", 'greeter:greeting="hi, there",times=2,tags=["a","b"]']
    with Proc(argv, cwd=tmp_path, env=greeter, read_stderr=True) as proc:
        proc.expect_err(lambda line: "greeted worker 1" in line, "the plugin's record")
        proc.expect(lambda line: "worker's own JSON" in line, "the worker's JSON line")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait() == 0
        proc.finish()
        out = [json.loads(line) for line in proc.seen + list(_rest(proc.lines))]
        err = [json.loads(line) for line in proc.seen_err + list(_rest(proc.err_lines))]
    assert all(isinstance(entry, dict) for entry in out + err)
    greeted = [e for e in err if e.get("logger") == "greeter"]
    assert greeted[0]["message"] == "hi, there x2 ['a', 'b']"
    assert greeted[0]["level"] == "warning"
    lines = {e.get("line") or e.get("message"): e for e in out}
    assert lines["plain line from a worker"]["worker_id"] == 1
    assert lines["worker's own JSON"]["worker_id"] == 1
    assert lines["worker's own JSON"]["level"] == "info"


def _rest(lines):
    while not lines.empty():
        line = lines.get_nowait()
        if line is not None:
            yield line


def test_a_reload_is_logged_once(tmp_path):
    """A rolling reload under ``pycluster run`` logs one 'started' and one 'finished'
    line (by the reload plugin; the logging plugin no longer repeats them)."""
    app = script(tmp_path, APP, "app.py")
    argv = ["-m", "pycluster", "run", app, "-w", "2", "-b", "127.0.0.1:0"]
    with Proc(argv, cwd=tmp_path, read_stderr=True) as proc:
        for _ in (1, 2):
            proc.expect_err(lambda line: " listening on " in line, "both workers listening")
        os.kill(proc.pid, signal.SIGHUP)
        proc.expect_err(lambda line: "rolling reload finished" in line, "the reload finished")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait() == 0
        stderr = proc.finish()
    reload_lines = [line for line in stderr.splitlines() if "reload" in line
                    and "SIGHUP" not in line]
    assert [line.split(": ", 1)[1].split(":")[0] for line in reload_lines] == [
        "rolling reload started", "rolling reload finished"], reload_lines
