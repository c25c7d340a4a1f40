"""``pycluster run --config FILE``: TOML keys are the long option names; flags win."""

from __future__ import annotations

import textwrap

import psutil
import pytest
from serve_helpers import get, port_of, start, stop

from pycluster import cli

APP = """
    def app(environ, start_response):
        body = environ["SCRIPT_NAME"].encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]
"""


@pytest.mark.slow
def test_config_file_sets_options_and_flags_win(tmp_path):
    """Options come from the TOML file (root-path, bind) unless a flag gives them
    (--workers 1 beats workers = 3)."""
    pytest.importorskip("waitress")
    (tmp_path / "prod.toml").write_text(textwrap.dedent("""
        workers = 3
        bind = "127.0.0.1:0"
        root-path = "/from-config"
        graceful_timeout = 10
    """))
    with start(tmp_path, APP, "--config", "prod.toml", workers=1) as proc:
        port = port_of(proc)
        assert get(port)[2] == b"/from-config"
        assert len(psutil.Process(proc.pid).children()) == 1
        assert stop(proc) == 0


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("wokers = 2", "unknown option 'wokers' (keys are long option names)"),
        ("workers = 'two'", "workers = 'two' is not a valid value"),
        ("workers = 2.5", "workers = 2.5 must be a whole number"),
        ("access-log = 'yes'", "access-log = 'yes' must be true or false"),
        ("bind = 8000", "bind = 8000 must be a string or a list of strings"),
        ("http = 'h3'", "http = 'h3' must be one of auto, h11, httptools"),
        ("workers = ", "not valid TOML"),
        ("config = 'other.toml'", "unknown option 'config'"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, toml, message):
    """A config file with an unknown key, a value of the wrong type or broken TOML is a
    usage error naming the file and the key; no worker starts."""
    (tmp_path / "main.py").write_text(textwrap.dedent(APP))
    (tmp_path / "c.toml").write_text(toml + "\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "main:app", "--config", "c.toml"]) == 2
    err = capsys.readouterr().err
    assert "--config 'c.toml': " in err and message in err, err


def test_missing_config_file(tmp_path, monkeypatch, capsys):
    """A config file that does not exist is one line and exit 2."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "main.py").write_text(textwrap.dedent(APP))
    assert cli.main(["run", "main:app", "--config", "nope.toml"]) == 2
    assert "--config 'nope.toml': No such file or directory" in capsys.readouterr().err
