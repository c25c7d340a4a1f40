"""Master settings: every way of starting workers works; fork() refuses bad input.

Start modes are run for real: the default (re-run the main program, as ``python app.py``,
``python -m pkg.app`` and ``python -c``) from a master started as a subprocess, and
``exec``/``args``, ``target``, ``cwd``, ``silent`` and ``uid``/``gid`` from a master in
this process. Bad setting values never start a process; they are checked in
``unit/test_settings.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import DEADLINE, Events, Proc, run, script

import pycluster

# -- bad values (the settings themselves are checked in unit/test_settings.py) ----------


@pytest.mark.parametrize(("env", "match"), [
    ({"A": 1}, r"fork env item 'A': 1 must be"),
    ({"A": b"x"}, r"fork env item 'A': b'x' must be"),
    ("A=1", r"fork env='A=1' must be a mapping"),
])
def test_fork_with_bad_env_is_a_settings_error_and_starts_nothing(tmp_path, env, match):
    """fork(env=...) with a non-str value (or not a mapping) raises SettingsError naming
    it, starts no process, uses no worker id, and the master still runs normally."""
    master = pycluster.Master(exec=script(tmp_path, "import pycluster\n"), kill_timeout=5)
    with pytest.raises(pycluster.SettingsError, match=match):
        master.fork(env=env)
    assert dict(master.workers) == {}
    worker = master.fork()
    assert worker.id == 1
    assert run(master) == 0
    assert (worker.exit_code, worker.signal_code) == (0, None)


def test_fork_after_stop_is_a_state_error(tmp_path):
    """fork() after stop() raises StateError (also a RuntimeError) saying the master is
    stopping, before and after run(); no process is started."""
    master = pycluster.Master(exec=script(tmp_path, "import pycluster\n"), kill_timeout=5)
    master.stop()
    with pytest.raises(pycluster.StateError, match=r"cannot fork: the master is stopping") as info:
        master.fork()
    assert isinstance(info.value, RuntimeError)
    assert run(master) == 0
    with pytest.raises(pycluster.StateError, match=r"cannot fork: the master is stopping"):
        master.fork()
    assert dict(master.workers) == {}


# -- start modes: re-running the main program -------------------------------------------------

APP = """
    import json, os, sys, pycluster

    def info():
        spec = globals().get("__spec__")
        return {"argv": sys.argv, "name": __name__, "spec": getattr(spec, "name", None),
                "orig_argv": sys.orig_argv[1:], "utf8": sys.flags.utf8_mode,
                "worker": pycluster.is_worker, "id": pycluster.worker and pycluster.worker.id,
                "markers": sorted(k for k in os.environ if k.startswith("PYCLUSTER"))}

    if pycluster.is_primary:
        master = pycluster.Master(kill_timeout=5)
        master.on("message", lambda w, m: print(json.dumps({"worker": m}), flush=True))
        master.on("exit", lambda w, c, s: print(json.dumps({"exit": [c, s]}), flush=True))
        master.fork()
        print(json.dumps({"master": info()}), flush=True)
        sys.exit(master.run())
    else:
        pycluster.worker.send(info())
"""


def _run_app(argv: list[str], cwd: Path, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run a master with *argv*; return what it printed about itself and its worker."""
    with Proc(argv, cwd=cwd, **kwargs) as proc:
        master = proc.json(lambda d: "master" in d, "the master's own report")["master"]
        worker = proc.json(lambda d: "worker" in d, "the worker's report")["worker"]
        assert proc.json(lambda d: "exit" in d, "the worker's exit")["exit"] == [0, None]
        assert proc.wait() == 0, proc.finish()
        assert proc.finish() == ""
    return master, worker


def test_default_reruns_a_script_with_its_options_and_args(tmp_path):
    """``python -X utf8 app.py --flag 'two words'`` forks workers as the same command line:
    same interpreter options, same script, same arguments, ``__name__ == "__main__"``, and
    no PYCLUSTER_* variable left in its environment."""
    script(tmp_path, APP, "app.py")
    master, worker = _run_app(["-X", "utf8", "app.py", "--flag", "two words"], tmp_path)
    assert master["worker"] is False
    assert (worker["worker"], worker["id"]) == (True, 1)
    assert worker["argv"] == ["app.py", "--flag", "two words"] == master["argv"]
    assert worker["orig_argv"] == ["-X", "utf8", "app.py", "--flag", "two words"]
    assert (worker["name"], worker["spec"], worker["utf8"]) == ("__main__", None, 1)
    assert worker["markers"] == []


def test_default_reruns_a_module_started_with_dash_m(tmp_path):
    """``python -m pkg.app a`` forks workers that run ``-m pkg.app a`` too: the module is
    ``__main__`` with spec ``pkg.app``, and the arguments are the master's."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    script(tmp_path / "pkg", APP, "app.py")
    master, worker = _run_app(["-m", "pkg.app", "a", "--b=c"], tmp_path)
    assert worker["orig_argv"] == ["-m", "pkg.app", "a", "--b=c"]
    assert worker["argv"] == [str(tmp_path / "pkg" / "app.py"), "a", "--b=c"] == master["argv"]
    assert (worker["name"], worker["spec"]) == ("__main__", "pkg.app")


def test_default_reruns_dash_c_code(tmp_path):
    """``python -c CODE arg`` forks workers that run the same code with the same argument."""
    code = Path(script(tmp_path, APP, "app.py")).read_text()
    master, worker = _run_app(["-c", code, "arg"], tmp_path)
    assert worker["argv"] == ["-c", "arg"] == master["argv"]
    assert worker["orig_argv"] == ["-c", code, "arg"]


def test_default_without_a_main_program_is_a_settings_error(tmp_path):
    """A master whose program came from stdin has nothing to re-run: Master() raises a
    SettingsError that says to pass exec= or target=."""
    body = """
        import json, pycluster
        try:
            pycluster.Master()
        except pycluster.SettingsError as exc:
            print(json.dumps({"error": str(exc)}), flush=True)
    """
    path = script(tmp_path, body, "stdin_app.py")
    with open(path) as stdin, Proc(["-"], cwd=tmp_path, stdin=stdin) as proc:
        error = proc.json(lambda d: "error" in d, "the settings error")["error"]
        assert proc.wait() == 0
    assert "there is no main program to re-run" in error
    assert "Master(exec='worker.py')" in error
    assert "Master(target=" in error


# -- start modes: exec, target, cwd ---------------------------------------------------------------

REPORT = """
    import os, sys, pycluster
    pycluster.worker.send({"argv": sys.argv, "cwd": os.getcwd(), "name": __name__})
"""


def test_exec_with_args_gives_the_worker_those_args(tmp_path):
    """exec= runs that script in every worker and args= become its sys.argv[1:] exactly
    (spaces, empty strings and dashes untouched)."""
    path = script(tmp_path, REPORT)
    args = ["--port", "8000", "two words", "", "-", "--", "é"]
    master = pycluster.Master(exec=path, args=args, kill_timeout=5)
    events = Events(master)
    master.fork()
    master.fork()
    assert run(master) == 0
    reports = [m for _, m in events.of("message")]
    assert len(reports) == 2
    for report in reports:
        assert report["argv"] == [path, *args]
        assert report["name"] == "__main__"


TARGET_MODULE = """
    import os, sys, pycluster

    def main():
        pycluster.worker.send({"argv": sys.argv, "cwd": os.getcwd(),
                               "worker": pycluster.is_worker})
        return 7

    class App:
        @staticmethod
        def run():
            pycluster.worker.send("App.run")
            return 0
"""


def test_target_string_runs_the_function_and_its_return_is_the_exit_code(tmp_path):
    """target="mod:func" imports mod (found on the worker's cwd) and calls func in each
    worker; sys.argv is [target, *args]; func's return value is the exit code."""
    script(tmp_path, TARGET_MODULE, "pyc_target_mod.py")
    master = pycluster.Master(target="pyc_target_mod:main", cwd=tmp_path, args=["x", "y"],
                              kill_timeout=5)
    events = Events(master)
    worker = master.fork()
    assert run(master) == 1  # a worker exited non-zero by itself
    assert events.of("message") == [(worker, {"argv": ["pyc_target_mod:main", "x", "y"],
                                              "cwd": str(tmp_path), "worker": True})]
    assert (worker.exit_code, worker.signal_code) == (7, None)
    assert worker.exited_after_disconnect is False


@pytest.fixture
def target_module(tmp_path: Path) -> Iterator[Any]:
    """TARGET_MODULE imported in this process from *tmp_path*, as a uniquely named module."""
    name = f"pyc_target_{os.getpid()}_{tmp_path.name}".replace("-", "_")
    path = script(tmp_path, TARGET_MODULE, f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]


def test_target_callable_is_found_again_by_name(tmp_path, target_module):
    """A module-level function (or a static method, by its dotted qualname) passed as
    target= is stored as 'module:qualname' and called in the worker."""
    master = pycluster.Master(target=target_module.App.run, cwd=tmp_path, kill_timeout=5)
    assert master.settings.target == f"{target_module.__name__}:App.run"
    events = Events(master)
    worker = master.fork()
    assert run(master) == 0
    assert events.of("message") == [(worker, "App.run")]
    assert (worker.exit_code, worker.signal_code) == (0, None)


@pytest.mark.parametrize(("target", "reason"), [
    ("pyc_no_such_module:main", "No module named 'pyc_no_such_module'"),
    ("pyc_target_mod:missing", "module 'pyc_target_mod' has no attribute 'missing'"),
    ("pyc_target_mod:App.missing", "type object 'App' has no attribute 'missing'"),
])
def test_target_that_cannot_be_loaded_exits_3_with_one_clear_line(tmp_path, target, reason):
    """A target whose module or function cannot be found ends the worker with exit code 3
    (a boot failure) after exactly one stderr line naming the target and the reason."""
    script(tmp_path, TARGET_MODULE, "pyc_target_mod.py")
    master = pycluster.Master(target=target, cwd=tmp_path, silent=True, kill_timeout=5)
    lines: list[tuple[str, str]] = []
    master.on("output", lambda w, stream, line: lines.append((stream, line)))
    worker = master.fork()
    assert run(master) == 1
    assert (worker.exit_code, worker.signal_code) == (3, None)
    assert lines == [("stderr", f"pycluster: cannot load target {target!r}: {reason}")]


def test_cwd_is_the_workers_working_directory(tmp_path):
    """cwd= (a Path is fine) is where the workers start; the master's own cwd is unchanged."""
    (tmp_path / "run dir").mkdir()
    before = os.getcwd()
    master = pycluster.Master(exec=script(tmp_path, REPORT), cwd=tmp_path / "run dir",
                              kill_timeout=5)
    events = Events(master)
    master.fork()
    assert run(master) == 0
    ((_, report),) = events.of("message")
    assert report["cwd"] == str(tmp_path / "run dir")
    assert os.getcwd() == before


# -- silent -----------------------------------------------------------------------------------

SILENT_APP = """
    import json, sys, pycluster
    if pycluster.is_primary:
        master = pycluster.Master(silent=True, kill_timeout=5)
        master.on("output", lambda w, stream, line: print(
            json.dumps({"output": [w.id, stream, line]}), flush=True))
        master.on("exit", lambda w, c, s: print(json.dumps({"exit": [w.id, c, s]}), flush=True))
        master.fork()
        master.fork()
        sys.exit(master.run())
    else:
        out = sys.stdout.buffer
        print("RAW-OUT one", flush=True)
        print("RAW-ERR one", file=sys.stderr, flush=True)
        out.write(b"RAW-OUT part-")
        out.flush()
        out.write(b"two\\nRAW-OUT three\\n")
        out.write("RAW-OUT \\u00fcn\\u00efcode \\u2713\\n".encode())
        out.write(b"RAW-OUT bad \\xff byte\\n")
        out.write(b"RAW-OUT " + b"x" * 200000 + b"\\n")
        out.flush()
        sys.stderr.write("RAW-ERR last, no newline")
"""


def test_silent_delivers_whole_lines_as_output_events_and_nothing_on_stdout(tmp_path):
    """With silent=True the master gets each worker's stdout and stderr as whole lines in
    ``output(worker, stream, line)`` events (a line written in parts is one event, bad
    UTF-8 is replaced, a last line without newline still comes), and nothing of the
    workers reaches the master's own stdout or stderr."""
    script(tmp_path, SILENT_APP, "app.py")
    with Proc(["app.py"], cwd=tmp_path) as proc:
        exits = [proc.json(lambda d: "exit" in d, "a worker's exit") for _ in range(2)]
        assert proc.wait() == 0
        while (line := proc.lines.get(timeout=DEADLINE)) is not None:  # the rest, to EOF
            proc.seen.append(line)
        stderr = proc.finish()
    assert sorted(e["exit"] for e in exits) == [[1, 0, None], [2, 0, None]]
    assert all(line.startswith("{") for line in proc.seen), [s[:80] for s in proc.seen]
    assert "RAW" not in stderr
    outputs = [json.loads(line)["output"] for line in proc.seen if '"output"' in line]
    for wid in (1, 2):
        stdout = [text for i, stream, text in outputs if i == wid and stream == "stdout"]
        stderr_lines = [text for i, stream, text in outputs if i == wid and stream == "stderr"]
        assert stdout == ["RAW-OUT one", "RAW-OUT part-two", "RAW-OUT three",
                          "RAW-OUT ünïcode ✓", "RAW-OUT bad \ufffd byte", "RAW-OUT " + "x" * 200000]
        assert stderr_lines == ["RAW-ERR one", "RAW-ERR last, no newline"]


# -- uid / gid --------------------------------------------------------------------------------

ID_REPORT = """
    import os, pycluster
    try:
        os.setuid(0)
        regain = "regained root"
    except PermissionError as exc:
        regain = type(exc).__name__
    pycluster.worker.send({"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
                           "egid": os.getegid(), "groups": os.getgroups(), "regain": regain})
"""


def _others_can_run(path: str) -> bool:
    """Whether a user with no special rights can reach and execute *path*."""
    real = Path(os.path.realpath(path))
    for parent in real.parents:
        if not parent.stat().st_mode & stat.S_IXOTH:
            return False
    return bool(real.stat().st_mode & stat.S_IXOTH)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory under /tmp that any user can read (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="pycluster-ids-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing a worker's user needs root")


@needs_root
def test_uid_and_gid_drop_the_worker_to_nobody(public_dir):
    """uid=/gid= of ``nobody`` make the worker run as nobody with no supplementary groups;
    it cannot become root again, and IPC still works."""
    if not _others_can_run(sys.executable):
        pytest.skip(f"user nobody cannot run {sys.executable} (a parent directory is private)")
    nobody = pwd.getpwnam("nobody")
    path = script(public_dir, ID_REPORT)
    os.chmod(path, 0o644)
    master = pycluster.Master(exec=path, uid="nobody", gid=nobody.pw_gid, cwd=public_dir,
                              kill_timeout=5)
    events = Events(master)
    worker = master.fork()
    assert run(master) == 0
    ((_, report),) = events.of("message")
    assert (report["uid"], report["euid"]) == (nobody.pw_uid, nobody.pw_uid)
    assert (report["gid"], report["egid"]) == (nobody.pw_gid, nobody.pw_gid)
    assert set(report["groups"]) <= {nobody.pw_gid}
    assert report["regain"] == "PermissionError"
    assert (worker.exit_code, worker.signal_code) == (0, None)


@needs_root
def test_gid_alone_drops_group_and_supplementary_groups(public_dir):
    """gid= alone changes the worker's real and effective group and drops every
    supplementary group (root's included); the user stays the master's."""
    nobody = pwd.getpwnam("nobody")
    path = script(public_dir, ID_REPORT)
    master = pycluster.Master(exec=path, gid=nobody.pw_gid, kill_timeout=5)
    events = Events(master)
    worker = master.fork()
    assert run(master) == 0
    ((_, report),) = events.of("message")
    assert (report["uid"], report["euid"]) == (0, 0)
    assert (report["gid"], report["egid"]) == (nobody.pw_gid, nobody.pw_gid)
    assert set(report["groups"]) <= {nobody.pw_gid}
    assert (worker.exit_code, worker.signal_code) == (0, None)


@needs_root
def test_uid_that_cannot_run_the_interpreter_fails_fork_cleanly(public_dir):
    """When the worker's user cannot execute the interpreter, fork() raises
    PermissionError naming it, leaves no process, fd or worker behind, and the master
    still runs (and returns at once)."""
    if _others_can_run(sys.executable):
        pytest.skip(f"user nobody can run {sys.executable}")
    master = pycluster.Master(exec=script(public_dir, ID_REPORT), uid="nobody", kill_timeout=5)
    with pytest.raises(PermissionError, match=re.escape(sys.executable)):
        master.fork()
    assert dict(master.workers) == {}
    assert run(master, timeout=10) == 0
