"""Bad input everywhere a user can type, and the security of the worker boundary.

Bad input: every value below gives an error that names it (settings and listen() raise
``SettingsError``/``OSError``, send() raises ``MessageError``, the CLI exits 2 with one
line and no traceback). Where it is tested:

=====================  ========================================  ===============================
where                  bad values                                test (file: test_…)
=====================  ========================================  ===============================
``Settings``,          every field: wrong type, out of range,    unit/test_settings (no
``Master(**settings)`` not a choice, not found; unknown and      process): bad_setting_is_a_
                       misspelt names; exec a directory, cwd a   settings_error_naming_the_
                       file, exec with target; target in         value and the tests after it
                       ``__main__``; bind an int, bytes, [None]
``bind=``, ``--bind``  port out of range or not digits, no port, unit/test_address
                       stray spaces, ``unix:`` alone, not a str
``fork(env=...)``      not a mapping, non-str items              test_settings: fork_with_bad_env…
``master.use(...)``    unknown plugin name; not a plugin         test_cli (--plugin nope); here:
                                                                 bad_signal_and_plugin_names
``Respawn(...)``       jitter a str, min_delay nan,              here: bad_respawn_options_are_
                       stop_exit_codes an int                    settings_errors
``Worker.kill(sig)``   unknown name, number, ''                  here: bad_signal_and_plugin_names
``pycluster run``      no APP; APP neither script nor            test_cli: usage_errors_exit_2_
                       module:function; --workers 0, 'two';      without_traceback
                       --bind localhost, :99999; --kill-timeout
                       -1; --log-format, --scheduling not a
                       choice; --plugin nope; unknown command
``pycluster run``      --kill-timeout nan, inf, 1e400; --workers here: more_cli_usage_errors_
                       -3; --bind '' and 'unix:'; APP 'a:b:c',   exit_2
                       ''; --plugin ''; WEB_CONCURRENCY=abc, 0
``worker.listen()``    port -1, 70000, '8000', True, 8.0, none;  test_listen: bad_listen_
                       host '', None; backlog 0, -5, True, '64'; arguments_raise_clear_errors…
                       on the IPC thread; after disconnect
``worker.listen()``    unix path too long, path that exists,     test_listen (4 tests)
                       EADDRINUSE, EACCES
``worker.listen()``    host with a NUL; a label over 63 bytes    here: bad_listen_hosts_are_…
``send()`` (master)    set, object, nan, nested inf, bytes; too  test_messages (3 tests)
                       large
``send()`` (worker)    set, object, nan, bytes; too large        test_messages (2 tests)
``send()`` (master)    circular list, tuple keys, an int over    here: more_unsendable_values_
                       the digit limit, 100 000-deep nesting;    name_the_value
                       pickle: a lambda
=====================  ========================================  ===============================

Security: the IPC channel is an unnamed socketpair (no TCP or filesystem endpoint, seen
in ``/proc``); a worker dropped to ``nobody`` cannot become root again. That pickle is
opt-in (JSON channels refuse pickle frames, the README says pickle trusts the workers)
is checked without a process in ``unit/test_protocol.py``.
"""

from __future__ import annotations

import contextlib
import math
import os
import pwd
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from helpers import DEADLINE, Events, Proc, run, script
from pycluster.plugins.respawn import Respawn

import pycluster
from pycluster import cli
from pycluster._procfs import inet_inodes, socket_inodes, unix_sockets

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parent.parent


# -- 6. bad input ----------------------------------------------------------------------------


MORE_CLI_ERRORS = [
    (["run", "app.py", "--kill-timeout", "nan"], {}, "--kill-timeout nan must be"),
    (["run", "app.py", "--kill-timeout", "inf"], {}, "--kill-timeout inf must be"),
    (["run", "app.py", "--kill-timeout", "1e400"], {}, "--kill-timeout inf must be"),
    (["run", "app.py", "--workers", "-3"], {}, "--workers -3 must be at least 1"),
    (["run", "app.py", "--bind", ""], {}, "bind address '' is not HOST:PORT"),
    (["run", "app.py", "--bind", "unix:"], {}, "bind address 'unix:' is not HOST:PORT"),
    (["run", "a:b:c"], {}, "APP 'a:b:c' is neither a script path nor 'module:function'"),
    (["run", ""], {}, "APP '' is neither"),
    (["run", "app.py", "--plugin", ""], {}, "no plugin named ''"),
    (["run", "app.py"], {"WEB_CONCURRENCY": "abc"}, "WEB_CONCURRENCY='abc' must be a whole"),
    (["run", "app.py"], {"WEB_CONCURRENCY": "0"}, "WEB_CONCURRENCY='0' must be a whole"),
]


@pytest.mark.parametrize(("argv", "env", "message"), MORE_CLI_ERRORS,
                         ids=[" ".join(a[1:]) + (f" {e}" if e else "")
                              for a, e, _ in MORE_CLI_ERRORS])
def test_more_cli_usage_errors_exit_2(tmp_path, monkeypatch, capsys, argv, env, message):
    """Each of these command lines exits 2 with one line naming the bad value and no
    traceback, and starts no process."""
    script(tmp_path, "import pycluster\n", "app.py")
    monkeypatch.chdir(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err


def test_bad_signal_and_plugin_names(tmp_path):
    """Worker.kill() with an unknown signal name or number, and use() of an unknown
    plugin name or of a non-plugin, raise SettingsError naming the value; nothing is
    signalled and the worker then exits normally."""
    master = pycluster.Master(exec=script(tmp_path, "import pycluster\n"), args=[],
                              kill_timeout=5)
    worker = master.fork()
    for bad, shown in (("SIGBOGUS", "'SIGBOGUS'"), (999, "999"), ("", "''")):
        with pytest.raises(pycluster.SettingsError, match=f"unknown signal {re.escape(shown)}"):
            worker.kill(bad)
    with pytest.raises(pycluster.SettingsError, match="no plugin named 'respawm'; installed"):
        master.use("respawm")
    with pytest.raises(pycluster.SettingsError, match="42 is not a plugin"):
        master.use(42)
    assert run(master) == 0
    assert (worker.exit_code, worker.signal_code) == (0, None)


@pytest.mark.parametrize("options", [{"jitter": "x"}, {"min_delay": math.nan},
                                     {"stop_exit_codes": 5}], ids=["jitter-str", "min_delay-nan",
                                                                   "stop_exit_codes-int"])
def test_bad_respawn_options_are_settings_errors(options):
    """Respawn options of the wrong type or a NaN delay raise SettingsError naming them."""
    name, value = next(iter(options.items()))
    with pytest.raises(pycluster.SettingsError, match=f"{name}={re.escape(repr(value))}"):
        Respawn(**options)


def test_more_unsendable_values_name_the_value(tmp_path):
    """worker.send() of a circular list, a dict with tuple keys, an int over Python's
    digit limit, 100 000 levels of nesting (JSON), or a lambda (pickle) raises
    MessageError naming the value — even when the value's own repr fails — and the
    channel stays usable: the worker still gets the next message."""
    body = """
        import pycluster
        w = pycluster.worker
        w.on("message", lambda m: (w.send({"got": m}), w.disconnect()))
        w.send("ready")
        import threading; threading.Event().wait(60)
    """
    circular: list[Any] = []
    circular.append(circular)
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    bad = [
        (circular, r"cannot send \[\[\.\.\.\]\]: .* recursion"),
        ({(1, 2): "x"}, r"cannot send \{\(1, 2\): 'x'\}: .* keys must be str"),
        ([10**5000], r"cannot send <list object at 0x\w+>: .*\(4300 digits\)"),
        (deep, r"cannot send <list object at 0x\w+>: .* recursion"),
    ]
    for serialization in ("json", "pickle"):
        master = pycluster.Master(exec=script(tmp_path, body), args=[], kill_timeout=10,
                                  serialization=serialization)
        worker = master.fork()
        events = Events(master)
        cases = bad if serialization == "json" else [
            (lambda: 0, r"cannot send <function .*<lambda>.*: it does not serialize as pickle")]

        raised: list[tuple[BaseException | None, str]] = []

        def on_message(w, m, cases=cases, raised=raised):
            if m == "ready":
                for value, match in cases:
                    try:
                        w.send(value)
                    except pycluster.MessageError as exc:
                        raised.append((exc, match))
                    else:
                        raised.append((None, match))
                w.send("after")

        master.on("message", on_message)
        assert run(master) == 0
        assert len(raised) == len(cases)
        for error, match in raised:
            assert error is not None, match
            assert re.search(match, str(error)), (match, str(error)[:300])
        assert [m for _, m in events.of("message")] == ["ready", {"got": "after"}]
        assert (worker.exit_code, worker.exited_after_disconnect) == (0, True)


BAD_HOSTS = """
    import pycluster
    w = pycluster.worker
    out = {}
    for host in ("127.0.0.1\\0evil", "a" * 64 + ".example", "x" * 300):
        try:
            w.listen(0, host)
            out[repr(host)] = ["no error", ""]
        except Exception as exc:
            out[repr(host)] = [type(exc).__name__, str(exc)]
    sock = w.listen(0, "127.0.0.1")  # the worker and its master still work
    out["then"] = sock.getsockname()[1]
    w.send(out)
"""


def test_bad_listen_hosts_are_errors_in_the_worker_not_a_kill(tmp_path):
    """listen() with a host containing a NUL (which getaddrinfo would silently cut short)
    or a host name the IDNA codec refuses (a label over 63 bytes) raises an error in the
    worker that names the host — the master does not take it for a protocol violation
    and SIGKILL the worker — and a correct listen() afterwards works."""
    master = pycluster.Master(exec=script(tmp_path, BAD_HOSTS), args=[], kill_timeout=10)
    events = Events(master)
    worker = master.fork()
    assert run(master) == 0
    assert events.of("error") == []
    ((_, out),) = events.of("message")
    then = out.pop("then")
    assert then > 0
    for host, (kind, text) in out.items():
        assert kind in ("SettingsError", "OSError"), (host, kind, text)
        assert host in text, (host, text)  # the host's repr
    assert (worker.exit_code, worker.signal_code) == (0, None)


# -- 7. security ---------------------------------------------------------------------------


CHANNEL_REPORT = """
    import os, socket, struct, threading, pycluster
    w = pycluster.worker
    s = w._sock
    pid, uid, gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                     struct.calcsize("3i")))
    w.send({"pid": os.getpid(), "family": int(s.family), "type": int(s.type),
            "name": s.getsockname(), "peer": s.getpeername(), "peer_pid": pid,
            "env": sorted(k for k in os.environ if k.startswith("PYCLUSTER_"))})
    w.on("message", lambda m: w.disconnect())
    threading.Event().wait(60)
"""


def test_ipc_channel_is_an_unnamed_socketpair_only(tmp_path):
    """The worker's IPC channel is an AF_UNIX stream socket with no name on either end,
    whose peer was created by the master (SO_PEERCRED: the master's pid, as for a
    socketpair); the worker has no other socket at all, and none of the sockets the
    master opened for it is a TCP/UDP socket or a named (filesystem or abstract) unix
    socket. No PYCLUSTER_ variable is left in the worker's environment."""
    master = pycluster.Master(exec=script(tmp_path, CHANNEL_REPORT), args=[], kill_timeout=10)
    before = socket_inodes(os.getpid())
    seen: dict[str, Any] = {}

    def on_message(worker, report):
        table, inet = unix_sockets(), inet_inodes()
        mine = socket_inodes(worker.pid)
        opened = socket_inodes(os.getpid()) - before
        seen.update(report=report, worker=[(i, table.get(i), i in inet) for i in mine],
                    master=[(i, table.get(i), i in inet) for i in opened])
        worker.send("bye")

    master.on("message", on_message)
    master.fork()
    assert run(master) == 0
    report = seen["report"]
    assert (report["family"], report["type"]) == (socket.AF_UNIX, socket.SOCK_STREAM)
    assert (report["name"], report["peer"]) == ("", "")
    assert report["peer_pid"] == os.getpid()
    assert report["env"] == []
    assert len(seen["worker"]) == 1, seen["worker"]
    assert [(path, inet) for _, path, inet in seen["worker"]] == [("", False)]
    assert seen["master"], "the master's end of the channel was not found"
    assert {(path, inet) for _, path, inet in seen["master"]} == {("", False)}, seen["master"]


# -- uid/gid drop ----------------------------------------------------------------------------


def _others_can_run(path: str) -> bool:
    real = Path(os.path.realpath(path))
    if not all(p.stat().st_mode & stat.S_IXOTH for p in real.parents):
        return False
    return bool(real.stat().st_mode & stat.S_IXOTH)


def _public_python() -> tuple[str | None, str]:
    """An interpreter (3.10+) that user nobody can execute, or None and why not."""
    seen = []
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3",
                      shutil.which("python3") or ""):
        if not candidate or not os.path.exists(candidate) or candidate in seen:
            continue
        seen.append(candidate)
        if not _others_can_run(candidate):
            continue
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info >= (3, 10))"],
                               capture_output=True, text=True, timeout=DEADLINE, user=65534,
                               cwd="/", check=False)
        if probe.stdout.strip() == "True":
            return candidate, ""
    return None, f"no Python >= 3.10 that user nobody may execute among {seen}"


DROP_MASTER = """
    import json, os, sys, pycluster
    master = pycluster.Master(exec="worker.py", args=[], uid="nobody", gid=int(sys.argv[1]),
                              kill_timeout=5)
    master.on("message", lambda w, m: os.write(1, (json.dumps(m) + "\\n").encode()))
    master.on("error", lambda e: os.write(1, (json.dumps({"error": repr(e)}) + "\\n").encode()))
    master.fork()
    sys.exit(master.run())
"""

DROP_WORKER = """
    import os, threading, pycluster
    def attempt(fn, *args):
        try:
            fn(*args)
        except PermissionError:
            return "PermissionError"
        return "succeeded"
    with open("/proc/self/status") as f:
        caps = {k: v.strip() for k, v in (l.split(":", 1) for l in f) if k.startswith("Cap")}
    report = {
        "pid": os.getpid(), "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid()],
        "groups": os.getgroups(), "caps": [caps["CapEff"], caps["CapPrm"]],
        "setuid": attempt(os.setuid, 0), "seteuid": attempt(os.seteuid, 0),
        "setreuid": attempt(os.setreuid, 0, 0), "setgid": attempt(os.setgid, 0),
        "setgroups": attempt(os.setgroups, [0]),
        "signal_master": attempt(os.kill, os.getppid(), 0),
        "read_root": attempt(os.listdir, "/root"),
    }
    pycluster.worker.send(report)
    threading.Event().wait(120)
"""


def test_worker_dropped_to_nobody_cannot_regain_root(tmp_path):
    """A root master with uid="nobody" and nobody's group: the worker runs with real and
    effective uid/gid of nobody, no supplementary group and no capability; setuid(0),
    seteuid(0), setreuid(0, 0), setgid(0) and setgroups([0]) all fail with
    PermissionError; it cannot signal its root master nor read /root; and it still
    leaves when the master is SIGKILLed (the parent-death signal survives the drop).

    The pyenv interpreter lives under /root (mode 0700), which nobody cannot enter, so
    the master runs with an interpreter nobody can execute (the system one), with
    pycluster from this checkout and copies of its dependencies in a public temp dir."""
    if os.geteuid() != 0:
        pytest.skip("dropping a worker's uid needs a root master")
    python, why = _public_python()
    if python is None:
        pytest.skip(why)
    if not all(p.stat().st_mode & stat.S_IXOTH for p in ROOT.parents) or not (
            (ROOT / "pycluster" / "__init__.py").stat().st_mode & stat.S_IROTH):
        pytest.skip(f"user nobody cannot read {ROOT}")
    nobody = pwd.getpwnam("nobody")
    public = Path(tempfile.mkdtemp(prefix="pycluster-drop-", dir="/tmp"))
    pidfd = None
    try:
        site = public / "site"
        site.mkdir()
        import attr
        import attrs
        import pyee
        import typing_extensions

        for module in (attr, attrs, pyee):
            shutil.copytree(Path(module.__file__).parent, site / module.__name__,
                            ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(typing_extensions.__file__, site)
        for name, body in (("master.py", DROP_MASTER), ("worker.py", DROP_WORKER)):
            script(public, body, name)
        for path in [public, *public.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        env = {"PYTHONPATH": f"{site}:{ROOT}", "PYTHONNOUSERSITE": "1"}
        # Proc runs sys.executable: it execs the public interpreter in place (same pid)
        with Proc(["-c", "import os, sys; os.execv(sys.argv[1], sys.argv[1:])", python,
                   "master.py", str(nobody.pw_gid)], cwd=public, env=env) as proc:
            report = proc.json(lambda m: True, "the worker's report")
            assert "error" not in report, report
            pidfd = os.pidfd_open(report["pid"])
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            gone, _, _ = select.select([pidfd], [], [], DEADLINE)
            assert gone, "the dropped worker outlived its master"
    finally:
        if pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.close(pidfd)
        shutil.rmtree(public, ignore_errors=True)
    uid, gid = nobody.pw_uid, nobody.pw_gid
    assert report["ids"] == [uid, uid, gid, gid]
    assert set(report["groups"]) <= {gid}
    assert report["caps"] == ["0000000000000000", "0000000000000000"]
    for what in ("setuid", "seteuid", "setreuid", "setgid", "setgroups", "read_root"):
        assert report[what] == "PermissionError", (what, report)
    assert report["signal_master"] == "PermissionError", report
