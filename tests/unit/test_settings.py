"""Master settings without processes: every bad value of every field is a SettingsError
that names the field and the value; good values are normalised and frozen.

Moved here from ``tests/test_settings.py`` and ``tests/test_reliability_input.py`` (they
never started a process); the start modes themselves are run for real there.
"""

from __future__ import annotations

import math
import os
import re

import attrs
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import pycluster
from pycluster import Settings

PROPERTY = settings(deadline=None, database=None)

NO_FILE = "/nonexistent-pycluster-dir/worker.py"
NO_DIR = "/nonexistent-pycluster-dir/sub"


def _in_main() -> None:
    """A function that claims to live in the main script."""


_in_main.__module__ = "__main__"

BAD_SETTINGS = [
    pytest.param({"bogus": 1}, r"unknown setting 'bogus'; the settings are: args, ", id="unknown"),
    pytest.param({"kill_timout": 1}, r"unknown setting 'kill_timout'", id="misspelt"),
    pytest.param({"scheduling": "rr"},
                 r"scheduling='rr' is not one of 'shared', 'reuseport' \('rr' is not offered",
                 id="scheduling-rr"),
    pytest.param({"scheduling": "bogus"},
                 r"scheduling='bogus' is not one of 'shared', 'reuseport'$", id="scheduling-bogus"),
    pytest.param({"scheduling": None}, r"scheduling=None is not one of", id="scheduling-none"),
    pytest.param({"serialization": "xml"}, r"serialization='xml' is not one of 'json', 'pickle'",
                 id="serialization-xml"),
    pytest.param({"serialization": "advanced"}, r"serialization='advanced'",
                 id="serialization-node"),
    pytest.param({"kill_timeout": -1}, r"kill_timeout=-1 must be a number of seconds >= 0",
                 id="kill_timeout-negative"),
    pytest.param({"kill_timeout": math.nan}, r"kill_timeout=nan must be", id="kill_timeout-nan"),
    pytest.param({"kill_timeout": math.inf}, r"kill_timeout=inf must be", id="kill_timeout-inf"),
    pytest.param({"kill_timeout": True}, r"kill_timeout=True must be", id="kill_timeout-bool"),
    pytest.param({"kill_timeout": "5"}, r"kill_timeout='5' must be", id="kill_timeout-str"),
    pytest.param({"kill_timeout": None}, r"kill_timeout=None must be", id="kill_timeout-none"),
    pytest.param({"kill_timeout": 10**400}, r"kill_timeout=1000000.* must be a number",
                 id="kill_timeout-huge-int"),
    pytest.param({"exec": NO_FILE}, rf"exec='{NO_FILE}' is not a file", id="exec-missing"),
    pytest.param({"exec": 123}, r"exec=123 must be a path", id="exec-int"),
    pytest.param({"target": "not a target"},
                 r"target='not a target' is not of the form 'package.module:function'",
                 id="target-not-a-target"),
    pytest.param({"target": "module_only"}, r"target='module_only' is not of the form",
                 id="target-no-function"),
    pytest.param({"target": "pkg.mod:"}, r"target='pkg.mod:' is not of the form",
                 id="target-empty-func"),
    pytest.param({"target": 42}, r"target=42 is not of the form", id="target-int"),
    pytest.param({"target": lambda: 0},
                 r"target=<function .*<lambda> at 0x\w+> cannot be found again by a fresh "
                 r"interpreter", id="target-lambda"),
    pytest.param({"target": "__main__:main"}, r"target='__main__:main' is in the main script",
                 id="target-main-string"),
    pytest.param({"target": _in_main}, r"target='__main__:_in_main' is in the main script",
                 id="target-main-function"),
    pytest.param({"args": ["--port", 8000]},
                 r"args=\['--port', 8000\] must be a list of strings", id="args-int-item"),
    pytest.param({"args": "--port 8000"}, r"args='--port 8000' must be a list of strings",
                 id="args-str"),
    pytest.param({"args": [b"--port"]}, r"args=\[b'--port'\] must be a list", id="args-bytes"),
    pytest.param({"args": 123}, r"args=123 must be a list of strings", id="args-int"),
    pytest.param({"args": (a for a in ["x", 1])}, r"args=<generator object .* must be a list",
                 id="args-generator-int"),
    pytest.param({"env": {"A": 1}}, r"env item 'A': 1 must be a non-empty str name",
                 id="env-int-value"),
    pytest.param({"env": {"A": None}}, r"env item 'A': None must be", id="env-none-value"),
    pytest.param({"env": {1: "x"}}, r"env item 1: 'x' must be", id="env-int-name"),
    pytest.param({"env": {"A=B": "x"}}, r"env item 'A=B': 'x' must be .*no '='", id="env-equals"),
    pytest.param({"env": {"": "x"}}, r"env item '': 'x' must be a non-empty", id="env-empty-name"),
    pytest.param({"env": ["A=1"]}, r"env=\['A=1'\] must be a mapping of strings to strings",
                 id="env-list"),
    pytest.param({"cwd": NO_DIR}, rf"cwd='{NO_DIR}' is not a directory", id="cwd-missing"),
    pytest.param({"cwd": 123}, r"cwd=123 must be a path", id="cwd-int"),
    pytest.param({"uid": "no-such-user-pycluster"},
                 r"uid='no-such-user-pycluster' is not a known user name or id", id="uid-unknown"),
    pytest.param({"uid": -1}, r"uid=-1 is not a known user", id="uid-negative"),
    pytest.param({"uid": True}, r"uid=True is not a known user", id="uid-bool"),
    pytest.param({"uid": ""}, r"uid='' is not a known user", id="uid-empty"),
    pytest.param({"gid": "no-such-group-pycluster"},
                 r"gid='no-such-group-pycluster' is not a known group name or id",
                 id="gid-unknown"),
    pytest.param({"gid": -1}, r"gid=-1 is not a known group", id="gid-negative"),
    pytest.param({"gid": 1.0}, r"gid=1.0 is not a known group", id="gid-float"),
    pytest.param({"max_message_size": 100},
                 r"max_message_size=100 must be an int of at least 1024 bytes", id="size-small"),
    pytest.param({"max_message_size": 1023}, r"max_message_size=1023 must be", id="size-1023"),
    pytest.param({"max_message_size": 4096.0}, r"max_message_size=4096.0 must be", id="size-float"),
    pytest.param({"max_message_size": True}, r"max_message_size=True must be", id="size-bool"),
    pytest.param({"max_message_size": 2**32},
                 r"max_message_size=4294967296 must be .* below 2\*\*32", id="size-too-big"),
    pytest.param({"silent": "no"}, r"silent='no' must be True or False", id="silent-str"),
    pytest.param({"silent": 1}, r"silent=1 must be True or False", id="silent-int"),
    pytest.param({"bind": 123}, r"bind=123 must be an address", id="bind-int"),
    pytest.param({"bind": b"127.0.0.1:80"}, r"bind=b'127.0.0.1:80' must be an address",
                 id="bind-bytes"),
    pytest.param({"bind": [None]}, r"bind address None must be a string", id="bind-none-item"),
    pytest.param({"bind": ["127.0.0.1:80", ":99999"]}, r"bind address ':99999' is not HOST:PORT",
                 id="bind-second-item"),
]


@pytest.mark.parametrize(("settings", "match"), BAD_SETTINGS)
def test_bad_setting_is_a_settings_error_naming_the_value(settings, match):
    """Each bad setting (of the wrong type, out of range, not a choice, not found, or
    which a worker could not import) raises SettingsError (also a ValueError) whose
    message names the setting and the bad value."""
    with pytest.raises(pycluster.SettingsError, match=match) as info:
        Settings.make(settings)
    assert isinstance(info.value, ValueError)


def test_master_checks_its_settings_when_it_is_made():
    """Master(**settings) raises the SettingsError of Settings.make before anything
    else (so before any worker starts), and keeps the checked settings."""
    with pytest.raises(pycluster.SettingsError, match=r"kill_timeout=-1 must be a number"):
        pycluster.Master(kill_timeout=-1)
    master = pycluster.Master(exec=__file__, kill_timeout=2)
    assert master.settings == Settings(exec=__file__, kill_timeout=2.0)


def test_an_unknown_setting_lists_every_known_one():
    """An unknown name raises SettingsError naming it (the first, sorted, of several)
    and listing every real setting, so a typo can be corrected from the message."""
    known = ", ".join(sorted(f.name for f in attrs.fields(Settings)))
    with pytest.raises(pycluster.SettingsError,
                       match=rf"^unknown setting 'a_bogus'; the settings are: {known}$"):
        Settings.make({"kill_timeout": 1, "z_bogus": 1, "a_bogus": 2})


def test_exec_must_be_a_file_not_a_directory(tmp_path):
    """exec= naming a directory is refused like a missing file."""
    match = rf"exec='{re.escape(str(tmp_path))}' is not a file"
    with pytest.raises(pycluster.SettingsError, match=match):
        Settings(exec=tmp_path)


def test_cwd_must_be_a_directory_not_a_file(tmp_path):
    """cwd= naming a file is refused, naming it."""
    path = tmp_path / "worker.py"
    path.write_text("")
    match = rf"cwd='{re.escape(str(path))}' is not a directory"
    with pytest.raises(pycluster.SettingsError, match=match):
        Settings(cwd=path)


def test_exec_and_target_together_are_refused(tmp_path):
    """exec= and target= exclude each other; the error names both values."""
    path = tmp_path / "worker.py"
    path.write_text("")
    with pytest.raises(pycluster.SettingsError,
                       match=rf"pass exec= or target=, not both \(exec='{re.escape(str(path))}', "
                             r"target='os:getcwd'\)"):
        Settings(exec=path, target="os:getcwd")


def test_settings_are_normalised_and_frozen(tmp_path, monkeypatch):
    """Good settings are normalised (paths made absolute, names resolved to ids, args to a
    tuple) and cannot be changed afterwards."""
    (tmp_path / "worker.py").write_text("")
    monkeypatch.chdir(tmp_path)
    settings = Settings.make({"exec": "worker.py", "cwd": ".", "args": ["a"],
                              "kill_timeout": 1, "uid": "root", "gid": 0})
    assert (settings.exec, settings.cwd) == (str(tmp_path / "worker.py"), str(tmp_path))
    assert settings.args == ("a",)
    assert (settings.uid, settings.gid, settings.kill_timeout) == (0, 0, 1.0)
    assert settings.scheduling == "shared"
    assert (settings.serialization, settings.silent) == ("json", False)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        settings.kill_timeout = 5  # type: ignore[misc]


def test_args_from_a_generator_are_all_kept():
    """args= given as a generator keeps every item (it is read once, not twice)."""
    assert Settings(args=(a for a in ["x", "y"])).args == ("x", "y")


def test_target_and_bind_are_normalised():
    """A module-level function as target= is stored as 'module:qualname'; one bind
    address or a list of them becomes a tuple of listen() arguments."""
    assert Settings(target=os.getcwd).target == "posix:getcwd"
    assert Settings(bind=":8000").bind == ((8000, "0.0.0.0"),)
    assert Settings(bind=["[::1]:1", "unix:/run/a.sock"]).bind == ((1, "::1"), ("/run/a.sock",))


@PROPERTY
@given(value=st.integers(0, 10**6) | st.floats(0, 1e9, allow_nan=False, allow_infinity=False))
def test_any_finite_kill_timeout_from_zero_up_is_kept_as_float(value):
    """Any int or finite float >= 0 is a good kill_timeout, kept as the same float."""
    kept = Settings(kill_timeout=value).kill_timeout
    assert type(kept) is float
    assert kept == float(value)


@PROPERTY
@given(value=st.floats(max_value=-1e-300) | st.integers(max_value=-1))
def test_any_negative_kill_timeout_is_refused(value):
    """Any negative number (float or int, however small) is refused, naming it."""
    with pytest.raises(pycluster.SettingsError, match=rf"kill_timeout={re.escape(repr(value))} "):
        Settings(kill_timeout=value)


@PROPERTY
@given(value=st.integers(-(2**40), 2**40))
@example(1023)
@example(1024)
@example(2**32 - 1)
@example(2**32)
def test_max_message_size_is_1024_up_to_below_2_to_the_32(value):
    """max_message_size accepts exactly the ints from 1024 to 2**32 - 1 (what the frame
    header's length field can carry) and refuses every other int, naming it."""
    if 1024 <= value < 2**32:
        assert Settings(max_message_size=value).max_message_size == value
    else:
        with pytest.raises(pycluster.SettingsError, match=rf"max_message_size={value} must"):
            Settings(max_message_size=value)
