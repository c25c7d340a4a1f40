"""Bad input to ``pycluster run module:app``: one line each, non-zero exit, nothing left
running (the conftest fixture fails a test that leaves a process behind)."""

from __future__ import annotations

import pytest
from serve_helpers import start, stderr_of

from pycluster import cli
from pycluster._runopts import UsageError, default_bind

pytestmark = pytest.mark.slow

WSGI = """
    def app(environ, start_response):
        start_response("200 OK", [])
        return [b""]
    not_an_app = 42
"""


@pytest.mark.parametrize(
    ("app", "options", "line"),
    [
        ("main:nope", (), "pycluster: error: APP 'main:nope': 'main' has no attribute 'nope'"),
        ("main:not_an_app", (),
         "pycluster: error: APP 'main:not_an_app' is int 42: not an ASGI app, a WSGI app"),
        ("main:app", ("--interface", "asgi"),
         "pycluster: error: --interface asgi: APP 'main:app' is a WSGI app"),
        ("main:app", ("--interface", "main"),
         "pycluster: error: --interface main: APP 'main:app' is the function app"),
    ],
)
def test_app_that_cannot_be_served_is_a_boot_failure(tmp_path, app, options, line):
    """What is only found by importing APP (in the worker) is one line from the worker,
    then a boot failure: no respawn, the master exits 1, no traceback."""
    with start(tmp_path, WSGI, *options, app=app) as proc:
        assert proc.wait() == 1
        stderr = stderr_of(proc)
    errors = [x for x in stderr.splitlines() if x.startswith("pycluster: error:")]
    assert len(errors) == 1 and errors[0].startswith(line), stderr
    assert "failed to boot" in stderr
    assert "Traceback" not in stderr


def test_module_that_raises_on_import_is_a_boot_failure(tmp_path):
    """An app module that raises while importing shows its traceback once and is a boot
    failure (not a crash loop): the master exits 1."""
    with start(tmp_path, "raise RuntimeError('no config')\n") as proc:
        assert proc.wait() == 1
        stderr = stderr_of(proc)
    assert "RuntimeError: no config" in stderr
    assert "pycluster: error: loading APP 'main:app' failed (above)" in stderr
    assert "failed to boot" in stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "nosuchmodule_q:app"], "APP 'nosuchmodule_q:app': no module named "
                                        "'nosuchmodule_q'"),
        (["run", "main:app", "--ssl-keyfile", "nokey.pem", "--ssl-certfile", "cert.pem"],
         "--ssl-keyfile 'nokey.pem': no such file"),
        (["run", "main:app", "--ssl-keyfile", "cert.pem"],
         "--ssl-keyfile and --ssl-certfile go together"),
        (["run", "main:app", "--interface", "rsgi"], "invalid choice: 'rsgi'"),
        (["run", "main:app", "--http", "h3"], "invalid choice: 'h3'"),
        (["run", "main:app", "--keep-alive", "-1"], "--keep-alive -1 must be at least 0"),
        (["run", "main:app", "--limit-concurrency", "0"], "--limit-concurrency 0 must be"),
        (["run", "main:app", "--graceful-timeout", "-2"], "--graceful-timeout/--kill-timeout"),
        (["run", "gone.py"], "APP 'gone.py': no such file"),
    ],
)
def test_usage_errors_exit_2_before_any_worker(tmp_path, monkeypatch, capsys, argv, message):
    """Mistakes the master can see (a wrong module path, TLS files that do not exist, bad
    values) exit 2 with one line, before any worker starts."""
    (tmp_path / "main.py").write_text(WSGI)
    (tmp_path / "cert.pem").write_text("")
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err.splitlines()[0], err
    assert "Traceback" not in err


def test_default_bind_follows_port():
    """The default bind is 0.0.0.0:$PORT when PORT is set (as gunicorn, Heroku), else
    127.0.0.1:8000; a PORT that is not a port is a usage error."""
    assert default_bind({}) == "127.0.0.1:8000"
    assert default_bind({"PORT": "5000"}) == "0.0.0.0:5000"
    with pytest.raises(UsageError, match="PORT='http' must be a port number"):
        default_bind({"PORT": "http"})


def test_help_names_the_app_options(capsys):
    """run --help explains module:app and the serving options."""
    assert cli.main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for word in ("module:app", "--interface", "--factory", "--graceful-timeout",
                 "--kill-timeout", "--proxy-headers", "--forwarded-allow-ips", "--root-path",
                 "--keep-alive", "--limit-concurrency", "--ssl-keyfile", "--ssl-certfile",
                 "--http", "--access-log", "$PORT"):
        assert word in out, word
